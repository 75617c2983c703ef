//! A hostile or broken peer: whatever it sends, the channel never panics, never delivers a sequence
//! number twice or out of order, and its state stays within the configured bounds.

use std::collections::BTreeSet;

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;
use steadfast_core::config::RECV_RANGES;
use steadfast_core::frame::{AckFrame, AckRanges, CloseFrame, DataFrame, Frame};
use steadfast_core::framing;
use steadfast_core::time::Instant;
use steadfast_core::{Channel, Config, Delivery, Event, Transport};

const WINDOW: u64 = 64;

fn seq() -> impl Strategy<Value = u64> {
    // Mostly near the window, where the interesting cases are; sometimes anywhere.
    prop_oneof![4 => 0..WINDOW * 2, 1 => 0..steadfast_core::varint::MAX]
}

fn frame() -> impl Strategy<Value = Frame> {
    prop_oneof![
        8 => (0u64..4, seq(), prop::option::of(seq()), prop::collection::vec(any::<u8>(), 0..64)).prop_map(
            |(stream, seq, ack, p)| Frame::Data(DataFrame { stream, seq, ack, unordered: false, payload: Bytes::from(p) })
        ),
        2 => (seq(), any::<u32>(), prop::collection::vec((0u64..8, 1u64..8), 0..8)).prop_map(
            |(cumulative, delay, gaps)| {
                let mut ranges = AckRanges::new();
                let mut at = cumulative;
                for (gap, len) in gaps {
                    let start = at + 1 + gap;
                    let _ = ranges.push(start..start + len);
                    at = start + len;
                }
                Frame::Ack(AckFrame { cumulative, delay_micros: delay.into(), ranges })
            }
        ),
        1 => any::<u64>().prop_map(|id| Frame::Ping { id: id & steadfast_core::varint::MAX }),
        1 => any::<u64>().prop_map(|id| Frame::Pong { id: id & steadfast_core::varint::MAX }),
        1 => Just(Frame::Close(CloseFrame { code: 9, reason: Bytes::from_static(b"x") })),
    ]
}

#[derive(Debug, Clone)]
enum Input {
    Frame(Box<Frame>),
    Garbage(Vec<u8>),
    Tick(u32),
    Send(u8),
}

fn input() -> impl Strategy<Value = Input> {
    prop_oneof![
        10 => frame().prop_map(|f| Input::Frame(Box::new(f))),
        1 => prop::collection::vec(any::<u8>(), 0..32).prop_map(Input::Garbage),
        2 => any::<u32>().prop_map(Input::Tick),
        2 => any::<u8>().prop_map(Input::Send),
    ]
}

/// Only data the channel must survive: no close, no garbage, no acks (which may claim unsent data),
/// so every case keeps the channel open and pounds on the receiver's bounds.
fn survivable_input() -> impl Strategy<Value = Input> {
    let data =
        (0u64..4, seq(), prop::collection::vec(any::<u8>(), 0..64)).prop_map(|(stream, seq, p)| {
            Input::Frame(Box::new(Frame::Data(DataFrame {
                stream,
                seq,
                ack: None,
                unordered: false,
                payload: Bytes::from(p),
            })))
        });
    prop_oneof![
        10 => data,
        1 => any::<u32>().prop_map(Input::Tick),
        1 => any::<u8>().prop_map(Input::Send),
    ]
}

fn config(transport: Transport, delivery: Delivery) -> Config {
    let mut c = Config::new(transport);
    c.delivery = delivery;
    c.recv_window = WINDOW;
    c.max_in_flight = WINDOW;
    c.max_reorder_bytes = 512;
    c.max_queued_messages = 16;
    c.max_queued_bytes = 1024;
    c
}

/// Feeds `inputs`, checking the contract after each; returns how many messages were delivered and
/// whether the channel is still open.
fn run(
    transport: Transport,
    delivery: Delivery,
    inputs: Vec<Input>,
) -> Result<(usize, bool), TestCaseError> {
    let c = config(transport, delivery);
    let mut ch = Channel::new(c.clone(), Instant::ZERO).unwrap();
    let mut now = Instant::ZERO;
    let mut delivered = BTreeSet::new();
    let mut last = None;
    let mut only_ordered_frames = true;
    let mut buf = BytesMut::new();
    if transport == Transport::Stream {
        let mut preface = BytesMut::new();
        framing::encode_preface(&mut preface);
        ch.handle_input(now, preface.freeze());
    }
    for input in inputs {
        match input {
            Input::Frame(f) => {
                let mut b = BytesMut::new();
                match transport {
                    Transport::Stream => framing::encode_stream_frame(&f, &mut b),
                    _ => framing::encode_datagram(&f, &mut b),
                }
                ch.handle_input(now, b.freeze());
            }
            Input::Garbage(g) => {
                // Garbage can decode as frames flagged unordered, which may rightly overtake.
                only_ordered_frames = false;
                ch.handle_input(now, Bytes::from(g))
            }
            Input::Tick(us) => {
                now = now + std::time::Duration::from_micros(us.into());
                ch.handle_timeout(now);
            }
            Input::Send(n) => {
                let _ = ch.send(Bytes::from(vec![n; usize::from(n) % 100]));
            }
        }
        while let Some(n) = ch.poll_transmit(now, &mut buf) {
            let _ = buf.split_to(n);
        }
        while let Some(e) = ch.poll_event() {
            if let Event::Received(m) = e {
                prop_assert!(delivered.insert(m.seq), "seq {} delivered twice", m.seq);
                if delivery == Delivery::Ordered && only_ordered_frames {
                    prop_assert_eq!(m.seq, last.map_or(0, |l: u64| l + 1), "out of order");
                }
                last = Some(m.seq);
            }
        }
        let r = ch.receiver();
        prop_assert!(r.ranges().len() <= RECV_RANGES);
        prop_assert!(r.reorder_slots() as u64 <= c.recv_window);
        prop_assert!(r.reorder_bytes() <= c.max_reorder_bytes);
        prop_assert!(
            r.ranges()
                .iter()
                .all(|x| x.end <= r.watermark() + c.recv_window)
        );
        let s = ch.sender();
        prop_assert!(s.queued_messages() <= c.max_queued_messages);
        prop_assert!(s.queued_bytes() <= c.max_queued_bytes);
        if let Some(t) = ch.poll_timeout() {
            // A deadline in the past must be cleared by handling it, or a driver would spin.
            if t <= now {
                ch.handle_timeout(now);
                while ch.poll_transmit(now, &mut buf).is_some() {}
                prop_assert!(
                    ch.poll_timeout().is_none_or(|t| t > now),
                    "deadline stuck in the past"
                );
            }
        }
    }
    Ok((delivered.len(), !ch.is_closed()))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn a_hostile_datagram_peer_never_breaks_exactly_once_order_or_bounds(
        inputs in prop::collection::vec(input(), 0..200),
        ordered in any::<bool>(),
    ) {
        let d = if ordered { Delivery::Ordered } else { Delivery::Unordered };
        run(Transport::Datagram, d, inputs)?;
    }

    #[test]
    fn a_hostile_stream_peer_never_breaks_exactly_once_order_or_bounds(
        inputs in prop::collection::vec(input(), 0..200),
    ) {
        run(Transport::Stream, Delivery::Ordered, inputs)?;
    }

    #[test]
    fn a_peer_flooding_arbitrary_sequence_numbers_cannot_grow_state_past_the_bounds(
        inputs in prop::collection::vec(survivable_input(), 1..400),
        ordered in any::<bool>(),
        stream in any::<bool>(),
    ) {
        let d = if ordered { Delivery::Ordered } else { Delivery::Unordered };
        let t = if stream { Transport::Stream } else { Transport::Datagram };
        let (_, open) = run(t, d, inputs)?;
        prop_assert!(open, "well-formed data, however hostile its numbering, is never fatal");
    }
}

#[test]
fn the_flood_test_actually_delivers_and_fills_the_de_dup_set() {
    // Every other sequence number within the window, then the gaps: the worst case for the sparse set.
    let mut inputs: Vec<Input> = (1..WINDOW)
        .step_by(2)
        .chain((0..WINDOW).step_by(2))
        .map(|seq| {
            Input::Frame(Box::new(Frame::Data(DataFrame {
                stream: 0,
                seq,
                ack: None,
                unordered: false,
                payload: Bytes::from_static(b"x"),
            })))
        })
        .collect();
    inputs.push(Input::Tick(1));
    let (delivered, open) = run(Transport::Datagram, Delivery::Ordered, inputs).unwrap();
    assert_eq!(delivered as u64, WINDOW);
    assert!(open);
}
