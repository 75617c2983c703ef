//! Decoding peer input allocates nothing, and a stream decoder's memory stays within a stated bound.
//!
//! The global allocator counts every allocation of the process, so this binary holds exactly one
//! test: no other test thread can allocate while a measurement is running.

use std::alloc::System;

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, Stats, StatsAlloc};
use steadfast_core::frame::{DataFrame, DecodeLimits, Frame, MAX_ACK_RANGES};
use steadfast_core::framing::{self, StreamDecoder};
use steadfast_core::varint;

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// The decoder's frame size limit in this test: small, so that inputs reach it often.
const MAX_FRAME_SIZE: usize = 1000;

/// The largest single `feed()` in this test.
const MAX_FEED: usize = 700;

/// What `StreamDecoder::buffered()` may reach: a partial frame (less than the limit plus an 8-byte
/// length prefix) left over from the previous reads, plus one feed.
const BUFFERED_BOUND: usize = MAX_FRAME_SIZE + MAX_FEED + 8;

/// Live heap bytes a `StreamDecoder` may hold. Its `BytesMut` only grows when a feed does not fit,
/// then to at most twice what it needs, counting consumed bytes at the front that it did not
/// reclaim (it reclaims them once they outnumber the live ones): hence at most 4 × the leftover
/// partial frame plus 2 × the feed. The 64 bytes are the shared header `bytes` allocates once, when
/// the first frame is split off the buffer.
const LIVE_BYTES_BOUND: usize = 4 * (MAX_FRAME_SIZE + 8) + 2 * MAX_FEED + 64;

/// Heap bytes allocated and not yet freed since the region started.
fn live_bytes(stats: Stats) -> isize {
    stats.bytes_allocated as isize - stats.bytes_deallocated as isize
}

/// The ways a caller may hand bytes to a decoder; each has a different `Bytes` representation.
#[derive(Debug, Clone, Copy)]
enum Repr {
    /// `Bytes::from(Vec)`: the "promotable" representation, whose clones allocate.
    FromVec,
    /// `BytesMut::freeze()` after a split: the shared, reference-counted representation.
    SplitFrozen,
    /// A slice of a larger shared buffer.
    Slice,
}

fn to_bytes(input: &[u8], repr: Repr) -> Bytes {
    match repr {
        Repr::FromVec => Bytes::from(input.to_vec()),
        Repr::SplitFrozen => {
            let mut buf = BytesMut::from(input);
            buf.extend_from_slice(b"tail");
            buf.split_to(input.len()).freeze()
        }
        Repr::Slice => {
            let mut whole = b"head".to_vec();
            whole.extend_from_slice(input);
            let whole = Bytes::from(whole);
            whole.slice(4..)
        }
    }
}

/// One stretch of a byte stream: well-formed or not.
#[derive(Debug, Clone)]
enum Segment {
    /// A valid data frame whose size is near the limit.
    Data(Vec<u8>),
    /// A valid ack frame with many ranges.
    Ack(u64, u8),
    /// A length prefix up to the limit followed by arbitrary bytes, possibly fewer or more.
    Prefixed(u64, Vec<u8>),
    /// Anything.
    Raw(Vec<u8>),
}

fn segment() -> impl Strategy<Value = Segment> {
    prop_oneof![
        3 => prop::collection::vec(any::<u8>(), 0..MAX_FRAME_SIZE - 8).prop_map(Segment::Data),
        1 => (any::<u64>(), 0..=MAX_ACK_RANGES as u8).prop_map(|(c, n)| Segment::Ack(c, n)),
        2 => (1..=MAX_FRAME_SIZE as u64 + 2, prop::collection::vec(any::<u8>(), 0..MAX_FRAME_SIZE))
            .prop_map(|(len, body)| Segment::Prefixed(len, body)),
        1 => prop::collection::vec(any::<u8>(), 0..64).prop_map(Segment::Raw),
    ]
}

fn stream_wire(with_preface: bool, segments: &[Segment]) -> Vec<u8> {
    let mut wire = Vec::new();
    if with_preface {
        framing::encode_preface(&mut wire);
    }
    for s in segments {
        match s {
            Segment::Data(payload) => {
                framing::encode_stream_data_frame(0, 1, None, false, payload, &mut wire);
            }
            Segment::Ack(cumulative, count) => {
                let cumulative = cumulative & (varint::MAX >> 1);
                let ranges = (0..u64::from(*count))
                    .map(|i| cumulative + 2 * i + 1..cumulative + 2 * i + 2)
                    .collect();
                let ack = steadfast_core::frame::AckFrame {
                    cumulative,
                    delay_micros: 0,
                    ranges,
                };
                framing::encode_stream_frame(&Frame::Ack(ack), &mut wire);
            }
            Segment::Prefixed(len, body) => {
                varint::encode(*len, &mut wire);
                wire.extend_from_slice(body);
            }
            Segment::Raw(bytes) => wire.extend_from_slice(bytes),
        }
    }
    wire
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn decoding_never_allocates_and_stream_buffering_stays_bounded(
        frame_bytes in prop_oneof![
            prop::collection::vec(any::<u8>(), 0..1200),
            // A valid data frame header first, so decoding reaches the payload.
            prop::collection::vec(any::<u8>(), 0..1200).prop_map(|payload| {
                let mut buf = Vec::new();
                DataFrame::encode_header(5, 1 << 20, Some(7), false, &mut buf);
                buf.extend_from_slice(&payload);
                buf
            }),
        ],
        repr in prop_oneof![Just(Repr::FromVec), Just(Repr::SplitFrozen), Just(Repr::Slice)],
        with_preface in prop::bool::weighted(0.9),
        segments in prop::collection::vec(segment(), 0..12),
        feeds in prop::collection::vec(prop_oneof![1..16usize, 1..=MAX_FEED], 1..16),
    ) {
        let limits = DecodeLimits::new(MAX_FRAME_SIZE);

        // Bare frames and datagrams: zero allocations, whatever the input and its representation.
        let input = to_bytes(&frame_bytes, repr);
        let region = Region::new(GLOBAL);
        let decoded = Frame::decode(input, &limits);
        let change = region.change();
        prop_assert_eq!(change.allocations + change.reallocations, 0, "Frame::decode: {:?}", change);
        prop_assert_eq!(change.bytes_allocated, 0);
        drop(decoded);

        let mut datagram = vec![framing::VERSION];
        datagram.extend_from_slice(&frame_bytes);
        let input = to_bytes(&datagram, repr);
        let region = Region::new(GLOBAL);
        let decoded = framing::decode_datagram(input, &limits);
        let change = region.change();
        prop_assert_eq!(change.allocations + change.reallocations, 0, "decode_datagram: {:?}", change);
        prop_assert_eq!(change.bytes_allocated, 0);
        drop(decoded);

        // A stream decoder: bounded buffering and bounded heap, however the input is cut.
        let wire = stream_wire(with_preface, &segments);
        let region = Region::new(GLOBAL);
        let mut decoder = StreamDecoder::new(limits);
        let mut rest = &wire[..];
        let mut sizes = feeds.iter().copied().cycle();
        let mut peak_live = 0isize;
        'feeding: while !rest.is_empty() {
            let size = sizes.next().unwrap_or(1).min(rest.len());
            let (chunk, tail) = rest.split_at(size);
            rest = tail;
            decoder.feed(chunk);
            loop {
                prop_assert!(decoder.buffered() <= BUFFERED_BOUND, "buffered {}", decoder.buffered());
                let live = live_bytes(region.change());
                peak_live = peak_live.max(live);
                prop_assert!(live <= LIVE_BYTES_BOUND as isize, "live heap {} bytes", live);
                match decoder.next_frame() {
                    // Dropped at once: a held payload would keep its part of the buffer alive.
                    Ok(Some(frame)) => drop(frame),
                    Ok(None) => break,
                    Err(_) => break 'feeding,
                }
            }
        }
        prop_assert!(decoder.buffered() <= BUFFERED_BOUND);
        drop(decoder);
        prop_assert!(live_bytes(region.change()) <= 0, "the decoder leaked");
        prop_assert!(peak_live <= LIVE_BYTES_BOUND as isize);
    }
}
