//! The delivery contract over the `Pair` harness: exactly once, in order, with bounded state, under
//! any schedule of drops, duplicates and reorders.

mod util;

use bytes::Bytes;
use proptest::prelude::*;
use steadfast_core::config::RECV_RANGES;
use steadfast_core::time::Duration;
use steadfast_core::{Config, Delivery, Event, Transport};
use util::{Faults, Pair, payloads, received};

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// A datagram configuration with small bounds, so the bounds are actually reached.
fn small(delivery: Delivery, window: u64, queue: usize) -> Config {
    let mut c = Config::new(Transport::Datagram);
    c.delivery = delivery;
    c.recv_window = window;
    c.max_in_flight = window;
    c.max_queued_messages = queue;
    c.max_queued_bytes = queue * 64;
    c.max_reorder_bytes = (window as usize / 2) * 64;
    c
}

fn lossy() -> impl Strategy<Value = Faults> {
    (0u64..20, 0u64..40, 0.0f64..0.5, 0.0f64..0.5).prop_map(|(lat, jit, drop, dup)| Faults {
        latency: ms(lat),
        jitter: ms(jit),
        drop,
        duplicate: dup,
        max_chunk: 0,
    })
}

/// Runs the pair to completion, checking the state bounds after every step.
fn drive_checking_bounds(pair: &mut Pair) {
    loop {
        for ch in [&pair.a, &pair.b] {
            let c = ch.config();
            let r = ch.receiver();
            assert!(r.ranges().len() <= RECV_RANGES);
            assert!(r.reorder_slots() as u64 <= c.recv_window);
            assert!(r.reorder_bytes() <= c.max_reorder_bytes);
            let s = ch.sender();
            assert!(s.queued_messages() <= c.max_queued_messages);
            assert!(s.queued_bytes() <= c.max_queued_bytes);
            assert!(s.retransmit_len() <= c.max_queued_messages);
        }
        if !pair.step().expect("livelock: step bound reached") {
            break;
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]

    #[test]
    fn every_message_arrives_exactly_once_and_in_order_over_any_lossy_link(
        seed in any::<u64>(),
        faults in lossy(),
        n in 1usize..200,
        window in prop::sample::select(vec![4u64, 16, 64, 256]),
    ) {
        let mut pair = Pair::new(small(Delivery::Ordered, window, 64), faults, seed);
        let sent = payloads(n, 16);
        // Both directions at once, so acks ride on data as well as travelling alone.
        let back = payloads(n / 2, 24);
        for p in &back {
            if pair.b.send(p.clone()).is_err() { break; }
        }
        let back_sent = pair.b.sender().queued_messages();
        pair.send_all_from_a(&sent).expect("livelock while sending");
        drive_checking_bounds(&mut pair);
        prop_assert_eq!(received(&pair.b_events), sent);
        prop_assert_eq!(received(&pair.a_events), back[..back_sent].to_vec());
        prop_assert_eq!(pair.a.sender().queued_messages(), 0, "everything acknowledged");
        prop_assert_eq!(pair.b.sender().queued_messages(), 0, "everything acknowledged");
    }

    #[test]
    fn unordered_delivery_is_exactly_once_and_complete_over_any_lossy_link(
        seed in any::<u64>(),
        faults in lossy(),
        n in 1usize..200,
    ) {
        let mut pair = Pair::new(small(Delivery::Unordered, 32, 64), faults, seed);
        let sent = payloads(n, 16);
        pair.send_all_from_a(&sent).expect("livelock while sending");
        drive_checking_bounds(&mut pair);
        let mut got = received(&pair.b_events);
        let mut want = sent.clone();
        got.sort();
        want.sort();
        prop_assert_eq!(got, want);
    }

    #[test]
    fn a_stream_transport_delivers_in_order_however_its_bytes_are_chunked(
        seed in any::<u64>(),
        max_chunk in 1usize..64,
        n in 1usize..300,
        size in 0usize..300,
    ) {
        let mut faults = Faults::clean(ms(1));
        faults.max_chunk = max_chunk;
        let mut config = Config::new(Transport::Stream);
        config.max_queued_messages = 50;
        let mut pair = Pair::new(config, faults, seed);
        let sent = payloads(n, size);
        pair.send_all_from_a(&sent).expect("livelock while sending");
        drive_checking_bounds(&mut pair);
        prop_assert_eq!(received(&pair.b_events), sent);
        prop_assert_eq!(pair.a.stats().retransmitted, 0, "streams never retransmit within a connection");
    }
}

#[test]
fn a_link_that_drops_everything_is_reported_as_stuck_rather_than_spinning_forever() {
    let mut faults = Faults::clean(ms(5));
    faults.drop = 1.0;
    let mut pair = Pair::new(Config::new(Transport::Datagram), faults, 1);
    pair.max_steps = 10_000;
    pair.a.send(Bytes::from_static(b"into the void")).unwrap();
    let err = pair.drive().expect_err("a black hole never settles");
    assert_eq!(err.steps, 10_001);
    assert!(
        pair.a.stats().rto_expiries > 10,
        "it kept retransmitting with backoff"
    );
}

#[test]
fn bulk_stream_traffic_spends_only_a_few_percent_of_frames_on_acks() {
    let mut pair = Pair::new(Config::new(Transport::Stream), Faults::clean(ms(1)), 7);
    let sent = payloads(100_000, 64);
    pair.send_all_from_a(&sent).unwrap();
    pair.drive().unwrap();
    assert_eq!(received(&pair.b_events).len(), sent.len());
    let acks = pair.b.stats().acks_sent as f64;
    let data = pair.a.stats().data_sent as f64;
    let share = acks / (acks + data);
    eprintln!("bulk stream: acks were {:.2}% of frames", share * 100.0);
    assert!(share < 0.05, "acks were {:.2}% of frames", share * 100.0);
}

#[test]
fn a_lone_message_on_an_idle_link_is_acknowledged_within_the_ack_delay() {
    let config = Config::new(Transport::Datagram);
    let max_delay = config.max_ack_delay;
    let mut pair = Pair::new(config, Faults::clean(ms(10)), 3);
    pair.a.send(Bytes::from_static(b"ping")).unwrap();
    let acked = pair
        .drive_until(|p| {
            p.a_events
                .iter()
                .any(|e| matches!(e, Event::Acknowledged { below: 1 }))
        })
        .unwrap();
    assert!(acked);
    assert!(pair.now <= steadfast_core::time::Instant::ZERO + ms(20) + max_delay);
}

#[test]
fn a_full_queue_refuses_with_backpressure_and_hands_the_payload_back() {
    let mut config = Config::new(Transport::Stream);
    config.max_queued_messages = 3;
    let mut pair = Pair::new(config, Faults::clean(ms(1)), 0);
    for p in payloads(3, 8) {
        pair.a.send(p).unwrap();
    }
    let refused = Bytes::from_static(b"one too many");
    match pair.a.send(refused.clone()) {
        Err(steadfast_core::SendError::QueueFull(p)) => assert_eq!(p, refused),
        other => panic!("expected backpressure, got {other:?}"),
    }
    pair.drive().unwrap();
    assert!(pair.a.send(refused).is_ok(), "acks free the queue");
}
