//! Properties of the wire codec: every frame survives encoding on each transport, encoded lengths
//! are exact, and no input from a peer, however malformed, makes a decoder panic.

use bytes::Bytes;
use proptest::prelude::*;
use steadfast_core::Seq;
use steadfast_core::frame::{
    AckFrame, AckRanges, CloseFrame, DataFrame, DecodeError, DecodeLimits, Frame, HelloFrame,
    MAX_ACK_RANGES, RefuseFrame, UnreliableFrame, WelcomeFrame,
};
use steadfast_core::framing::{self, PREFACE, StreamDecoder};
use steadfast_core::identity::{Resume, SessionId, Token};
use steadfast_core::varint;

const CASES: u32 = 2000;

/// Integers spread over every varint length, with the length boundaries and the extremes over-weighted.
fn wide_u64() -> impl Strategy<Value = u64> {
    prop_oneof![
        prop::sample::select(vec![
            0,
            63,
            64,
            16_383,
            16_384,
            (1 << 30) - 1,
            1 << 30,
            varint::MAX - 1,
            varint::MAX,
        ]),
        0..64u64,
        0..16_384u64,
        0..(1u64 << 30),
        0..=varint::MAX,
    ]
}

/// Mostly small numbers, sometimes huge: gaps and lengths of ack ranges.
fn small_or_wide() -> impl Strategy<Value = u64> {
    prop_oneof![4 => 0..8u64, 1 => wide_u64()]
}

fn payload(max: usize) -> impl Strategy<Value = Bytes> {
    prop::collection::vec(any::<u8>(), 0..=max).prop_map(Bytes::from)
}

fn data_frame() -> impl Strategy<Value = DataFrame> {
    (
        prop_oneof![Just(0u64), wide_u64()],
        wide_u64(),
        prop::option::of(wide_u64()),
        any::<bool>(),
        payload(200),
    )
        .prop_map(|(stream, seq, ack, unordered, payload)| DataFrame {
            stream,
            seq,
            ack,
            unordered,
            payload,
        })
}

fn unreliable_frame() -> impl Strategy<Value = UnreliableFrame> {
    (
        prop_oneof![Just(0u64), wide_u64()],
        wide_u64(),
        any::<bool>(),
        payload(200),
    )
        .prop_map(|(stream, seq, sequenced, payload)| UnreliableFrame {
            stream,
            seq,
            sequenced,
            payload,
        })
}

fn token() -> impl Strategy<Value = Token> {
    any::<[u8; 16]>().prop_map(Token::from_bytes)
}

fn hello_frame() -> impl Strategy<Value = HelloFrame> {
    let resume = (any::<u64>(), token(), wide_u64(), wide_u64()).prop_map(
        |(session, token, epoch, received)| Resume {
            session: SessionId(session),
            token,
            epoch,
            received,
        },
    );
    (
        any::<u64>(),
        wide_u64(),
        prop::option::of(resume),
        payload(100),
    )
        .prop_map(|(nonce, recv_window, resume, credentials)| HelloFrame {
            nonce,
            recv_window,
            resume,
            credentials,
        })
}

fn welcome_frame() -> impl Strategy<Value = WelcomeFrame> {
    (
        (any::<u64>(), any::<u64>(), token(), wide_u64()),
        (any::<bool>(), wide_u64(), wide_u64(), wide_u64()),
    )
        .prop_map(
            |(
                (nonce, session, token, epoch),
                (resumed, received, recv_window, retention_millis),
            )| {
                WelcomeFrame {
                    nonce,
                    session: SessionId(session),
                    token,
                    epoch,
                    resumed,
                    received,
                    recv_window,
                    retention_millis,
                }
            },
        )
}

fn refuse_frame() -> impl Strategy<Value = RefuseFrame> {
    (wide_u64(), wide_u64(), payload(256)).prop_map(|(code, epoch, reason)| RefuseFrame {
        code,
        epoch,
        reason,
    })
}

/// Valid ack ranges above `cumulative`, built from (gap, length − 1) pairs the way the wire
/// encodes them; stops at the first range that would leave the sequence space.
fn ranges_above(cumulative: Seq, pairs: &[(u64, u64)]) -> AckRanges {
    let mut ranges = AckRanges::new();
    let mut prev = cumulative;
    for &(gap, len_minus_one) in pairs {
        let Some(start) = prev.checked_add(gap).and_then(|s| s.checked_add(1)) else {
            break;
        };
        let Some(end) = start
            .checked_add(len_minus_one)
            .and_then(|e| e.checked_add(1))
        else {
            break;
        };
        if end > varint::MAX + 1 || ranges.push(start..end).is_err() {
            break;
        }
        prev = end;
    }
    ranges
}

fn ack_frame() -> impl Strategy<Value = AckFrame> {
    (
        prop_oneof![0..1_000_000u64, wide_u64()],
        wide_u64(),
        prop::collection::vec((small_or_wide(), small_or_wide()), 0..=MAX_ACK_RANGES),
    )
        .prop_map(|(cumulative, delay_micros, pairs)| AckFrame {
            cumulative,
            delay_micros,
            ranges: ranges_above(cumulative, &pairs),
        })
}

fn close_frame() -> impl Strategy<Value = CloseFrame> {
    (wide_u64(), payload(256)).prop_map(|(code, reason)| CloseFrame { code, reason })
}

fn frame() -> impl Strategy<Value = Frame> {
    prop_oneof![
        3 => data_frame().prop_map(Frame::Data),
        3 => ack_frame().prop_map(Frame::Ack),
        1 => wide_u64().prop_map(|id| Frame::Ping { id }),
        1 => wide_u64().prop_map(|id| Frame::Pong { id }),
        1 => close_frame().prop_map(Frame::Close),
        2 => unreliable_frame().prop_map(Frame::Unreliable),
        1 => hello_frame().prop_map(Frame::Hello),
        1 => welcome_frame().prop_map(Frame::Welcome),
        1 => refuse_frame().prop_map(Frame::Refuse),
    ]
}

/// Arbitrary bytes, with the first byte often a real frame type so decoding gets past it.
fn frame_like_bytes() -> impl Strategy<Value = Vec<u8>> {
    (
        prop_oneof![
            prop::sample::select(vec![
                0x00u8, 0x01, 0x02, 0x03, 0x07, 0x10, 0x20, 0x30, 0x40, 0x50, 0x53, 0x60, 0x61,
                0x70, 0x71, 0x80
            ]),
            any::<u8>(),
        ],
        prop::collection::vec(any::<u8>(), 0..300),
    )
        .prop_map(|(first, mut rest)| {
            rest.insert(0, first);
            rest
        })
}

fn encoded(frame: &Frame) -> Vec<u8> {
    let mut buf = Vec::new();
    frame.encode(&mut buf);
    buf
}

/// Feeds `wire` to a fresh decoder in chunks of the given sizes (cycled), draining after each feed.
fn decode_stream_in_chunks(
    wire: &[u8],
    chunk_sizes: &[usize],
    limits: DecodeLimits,
) -> (Vec<Frame>, Option<DecodeError>, StreamDecoder) {
    let mut decoder = StreamDecoder::new(limits);
    let mut frames = Vec::new();
    let mut rest = wire;
    let mut sizes = chunk_sizes.iter().copied().cycle();
    while !rest.is_empty() {
        let size = sizes.next().unwrap_or(1).clamp(1, rest.len());
        let (chunk, tail) = rest.split_at(size);
        rest = tail;
        decoder.feed(chunk);
        loop {
            match decoder.next_frame() {
                Ok(Some(frame)) => frames.push(frame),
                Ok(None) => break,
                Err(e) => {
                    // Poisoned for good: the same error again, and input is dropped.
                    decoder.feed(rest);
                    assert_eq!(decoder.next_frame(), Err(e));
                    assert_eq!(decoder.buffered(), 0);
                    return (frames, Some(e), decoder);
                }
            }
            // Memory bound: never more than the limit, a length prefix and the last feed.
            assert!(decoder.buffered() <= limits.max_frame_size + 8 + size);
        }
        assert!(decoder.buffered() < limits.max_frame_size + 8);
    }
    (frames, None, decoder)
}

/// A successfully decoded frame is well-formed: it re-encodes and decodes to itself.
fn assert_canonical(frame: &Frame, limits: &DecodeLimits) {
    if let Frame::Ack(ack) = frame {
        assert_eq!(ack.validate(), Ok(()));
    }
    let again = Frame::decode(Bytes::from(encoded(frame)), limits);
    assert_eq!(again.as_ref(), Ok(frame));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES))]

    // (1) Round trips.

    #[test]
    fn every_frame_round_trips_bare(frame in frame()) {
        let bytes = encoded(&frame);
        prop_assert_eq!(Frame::decode(Bytes::from(bytes), &DecodeLimits::default()), Ok(frame));
    }

    #[test]
    fn every_frame_round_trips_as_a_datagram(frame in frame()) {
        let mut buf = Vec::new();
        framing::encode_datagram(&frame, &mut buf);
        prop_assert_eq!(
            framing::decode_datagram(Bytes::from(buf), &DecodeLimits::default()),
            Ok(frame)
        );
    }

    #[test]
    fn a_sequence_of_frames_round_trips_over_a_stream_in_any_chunking(
        frames in prop::collection::vec(frame(), 0..8),
        chunk_sizes in prop::collection::vec(prop_oneof![1usize..8, 1usize..2000], 1..16),
    ) {
        let mut wire = Vec::new();
        framing::encode_preface(&mut wire);
        for frame in &frames {
            framing::encode_stream_frame(frame, &mut wire);
        }
        let (decoded, error, decoder) =
            decode_stream_in_chunks(&wire, &chunk_sizes, DecodeLimits::default());
        prop_assert_eq!(error, None);
        prop_assert_eq!(decoded, frames);
        prop_assert_eq!(decoder.buffered(), 0);
    }

    #[test]
    fn data_frames_written_on_the_hot_path_round_trip_on_both_transports(data in data_frame()) {
        let limits = DecodeLimits::default();
        let mut wire = PREFACE.to_vec();
        framing::encode_stream_data_frame(
            data.stream, data.seq, data.ack, data.unordered, &data.payload, &mut wire,
        );
        let mut decoder = StreamDecoder::new(limits);
        decoder.feed(&wire);
        prop_assert_eq!(decoder.next_frame(), Ok(Some(Frame::Data(data.clone()))));

        let mut datagram = Vec::new();
        framing::encode_datagram_data_frame(
            data.stream, data.seq, data.ack, data.unordered, &data.payload, &mut datagram,
        );
        prop_assert_eq!(
            framing::decode_datagram(Bytes::from(datagram), &limits),
            Ok(Frame::Data(data))
        );
    }

    // (2) Arbitrary input never panics, and whatever decodes is well-formed.

    #[test]
    fn decoding_arbitrary_bytes_as_a_frame_never_panics(
        bytes in frame_like_bytes(),
        max_frame_size in prop_oneof![Just(DecodeLimits::default().max_frame_size), 0usize..300],
    ) {
        let limits = DecodeLimits::new(max_frame_size);
        if let Ok(frame) = Frame::decode(Bytes::from(bytes), &limits) {
            assert_canonical(&frame, &limits);
        }
    }

    #[test]
    fn decoding_arbitrary_bytes_as_a_datagram_never_panics(
        version in prop_oneof![Just(framing::VERSION), any::<u8>()],
        bytes in frame_like_bytes(),
    ) {
        let mut datagram = vec![version];
        datagram.extend_from_slice(&bytes);
        let limits = DecodeLimits::default();
        if let Ok(frame) = framing::decode_datagram(Bytes::from(datagram), &limits) {
            assert_canonical(&frame, &limits);
        }
    }

    #[test]
    fn a_corrupted_or_truncated_datagram_never_decodes_as_a_different_frame(
        frame in frame(),
        flips in prop::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 1..4),
        cut in any::<prop::sample::Index>(),
        truncate in any::<bool>(),
    ) {
        let mut bytes = Vec::new();
        framing::encode_datagram(&frame, &mut bytes);
        let clean = bytes.clone();
        for (at, mask) in flips {
            let i = at.index(bytes.len());
            bytes[i] ^= mask;
        }
        if truncate {
            bytes.truncate(cut.index(bytes.len()));
        }
        prop_assume!(bytes != clean);
        let decoded = framing::decode_datagram(Bytes::from(bytes), &DecodeLimits::default());
        prop_assert!(decoded.is_err(), "a damaged datagram decoded as {decoded:?}");
    }

    #[test]
    fn a_corrupted_encoding_never_panics(
        frame in frame(),
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
        cut in any::<prop::sample::Index>(),
        truncate in any::<bool>(),
    ) {
        let mut bytes = encoded(&frame);
        for (at, value) in flips {
            let i = at.index(bytes.len());
            bytes[i] = value;
        }
        if truncate {
            bytes.truncate(cut.index(bytes.len() + 1));
        }
        let limits = DecodeLimits::default();
        if let Ok(frame) = Frame::decode(Bytes::from(bytes), &limits) {
            assert_canonical(&frame, &limits);
        }
    }

    #[test]
    fn a_stream_of_arbitrary_bytes_after_a_valid_preface_never_panics(
        bytes in prop::collection::vec(any::<u8>(), 0..600),
        chunk_sizes in prop::collection::vec(1usize..64, 1..8),
        max_frame_size in 1usize..300,
    ) {
        let mut wire = PREFACE.to_vec();
        wire.extend_from_slice(&bytes);
        let limits = DecodeLimits::new(max_frame_size);
        let (frames, _error, _) = decode_stream_in_chunks(&wire, &chunk_sizes, limits);
        for frame in &frames {
            assert_canonical(frame, &limits);
        }
    }

    #[test]
    fn a_stream_of_arbitrary_bytes_without_a_preface_never_panics(
        bytes in prop::collection::vec(any::<u8>(), 0..600),
        chunk_sizes in prop::collection::vec(1usize..64, 1..8),
    ) {
        let limits = DecodeLimits::default();
        let (frames, error, _) = decode_stream_in_chunks(&bytes, &chunk_sizes, limits);
        if !bytes.starts_with(&PREFACE) {
            // Unless the bytes are a prefix of the preface, the preface check fails first.
            prop_assert!(frames.is_empty());
            if !PREFACE.starts_with(&bytes) {
                prop_assert!(matches!(
                    error,
                    Some(DecodeError::BadPreface | DecodeError::UnsupportedVersion(_))
                ));
            }
        }
    }

    #[test]
    fn a_stream_of_valid_frames_with_corrupted_bytes_never_panics(
        frames in prop::collection::vec(frame(), 1..6),
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
        chunk_sizes in prop::collection::vec(1usize..300, 1..8),
    ) {
        let mut wire = PREFACE.to_vec();
        for frame in &frames {
            framing::encode_stream_frame(frame, &mut wire);
        }
        for (at, value) in flips {
            let i = at.index(wire.len() - PREFACE.len()) + PREFACE.len();
            wire[i] = value;
        }
        let limits = DecodeLimits::default();
        let (decoded, _error, _) = decode_stream_in_chunks(&wire, &chunk_sizes, limits);
        for frame in &decoded {
            assert_canonical(frame, &limits);
        }
    }

    // (3) Encoded lengths are exact.

    #[test]
    fn encoded_len_is_the_number_of_bytes_written(frame in frame()) {
        prop_assert_eq!(encoded(&frame).len(), frame.encoded_len());

        let mut stream = Vec::new();
        framing::encode_stream_frame(&frame, &mut stream);
        let prefix = varint::encoded_len(frame.encoded_len() as u64);
        prop_assert_eq!(stream.len(), prefix + frame.encoded_len());

        let mut datagram = Vec::new();
        framing::encode_datagram(&frame, &mut datagram);
        prop_assert_eq!(datagram.len(), framing::DATAGRAM_OVERHEAD + frame.encoded_len());
    }

    #[test]
    fn data_frame_lengths_are_the_number_of_bytes_written(data in data_frame()) {
        let mut header = Vec::new();
        DataFrame::encode_header(data.stream, data.seq, data.ack, data.unordered, &mut header);
        prop_assert_eq!(header.len(), DataFrame::header_len(data.stream, data.seq, data.ack));

        let mut stream = Vec::new();
        framing::encode_stream_data_frame(
            data.stream, data.seq, data.ack, data.unordered, &data.payload, &mut stream,
        );
        prop_assert_eq!(
            stream.len(),
            framing::stream_data_frame_len(data.stream, data.seq, data.ack, data.payload.len())
        );
    }

    #[test]
    fn a_varint_round_trips_in_exactly_its_encoded_length(v in wide_u64()) {
        let mut buf = Vec::new();
        varint::encode(v, &mut buf);
        prop_assert_eq!(buf.len(), varint::encoded_len(v));
        let mut rest = &buf[..];
        prop_assert_eq!(varint::decode(&mut rest), Ok(v));
        prop_assert!(rest.is_empty());
    }
}
