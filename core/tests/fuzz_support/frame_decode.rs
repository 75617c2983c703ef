//! `frame_decode`: arbitrary bytes through every decoder — a bare frame, a datagram, a stream cut
//! at arbitrary points. Nothing panics; every decoded frame re-encodes to exactly its
//! `encoded_len` and decodes back to itself through each framing; how the stream is cut changes
//! nothing; a stream decoder holds no more than its documented bound.

use arbitrary::Arbitrary;
use bytes::{BufMut, Bytes, BytesMut};
use steadfast_core::frame::{DecodeError, DecodeLimits, Frame};
use steadfast_core::framing::{self, StreamDecoder};

use super::{Violation, ensure, ensure_eq};

/// One fuzz case.
#[derive(Debug, Clone, Arbitrary)]
pub struct FrameInput {
    /// The frame size limit, folded into `1..=4096` so inputs reach it.
    pub limit: u16,
    /// Prepend the stream preface (most stream cases need it to reach a frame).
    pub preface: bool,
    /// Wrap the bytes in a datagram with a correct checksum, so the datagram path reaches the frame.
    pub seal: bool,
    /// How the stream is cut into feeds (each folded into `1..=256`; cycled).
    pub cuts: Vec<u8>,
    /// The bytes.
    pub bytes: Vec<u8>,
}

/// What one case exercised, so a smoke run can show it reached the interesting paths.
#[derive(Debug, Default, Clone, Copy)]
pub struct FrameOutcome {
    /// Frames decoded (all paths) and round-tripped.
    pub frames: usize,
    /// Decode errors returned.
    pub errors: usize,
}

/// Runs one case.
pub fn check(input: &FrameInput) -> Result<FrameOutcome, Violation> {
    let limits = DecodeLimits::new(usize::from(input.limit % 4096) + 1);
    let mut out = FrameOutcome::default();

    // A bare frame.
    let bare = Frame::decode(Bytes::copy_from_slice(&input.bytes), &limits);
    tally(&bare, &mut out, &limits)?;

    // A datagram: the bytes as they are, and sealed with a correct checksum, which must decode
    // exactly as the bare frame did.
    let raw = framing::decode_datagram(Bytes::copy_from_slice(&input.bytes), &limits);
    tally(&raw, &mut out, &limits)?;
    if input.seal {
        let mut d = vec![framing::VERSION];
        d.put_u32(crc32fast_hash(&input.bytes));
        d.extend_from_slice(&input.bytes);
        let sealed = framing::decode_datagram(Bytes::from(d), &limits);
        ensure_eq(
            &sealed,
            &bare,
            "a sealed datagram decodes as its bare frame",
        )?;
    }

    // A stream, fed whole and fed in cuts: the same frames and the same end.
    let mut wire = Vec::new();
    if input.preface {
        framing::encode_preface(&mut wire);
    }
    wire.extend_from_slice(&input.bytes);
    let whole = decode_stream(&wire, &[u8::MAX], &limits)?;
    let cut = decode_stream(&wire, &input.cuts, &limits)?;
    ensure_eq(&cut, &whole, "the same stream cut differently")?;
    for f in &whole.0 {
        roundtrip(f, &limits)?;
        out.frames += 1;
    }
    out.errors += usize::from(whole.1.is_some());
    Ok(out)
}

fn tally(
    r: &Result<Frame, DecodeError>,
    out: &mut FrameOutcome,
    limits: &DecodeLimits,
) -> Result<(), Violation> {
    match r {
        Ok(f) => {
            roundtrip(f, limits)?;
            out.frames += 1;
        }
        Err(_) => out.errors += 1,
    }
    Ok(())
}

/// The frames a stream decoder yields for `wire` fed in `cuts`, and the error it ended on.
fn decode_stream(
    wire: &[u8],
    cuts: &[u8],
    limits: &DecodeLimits,
) -> Result<(Vec<Frame>, Option<DecodeError>), Violation> {
    let mut d = StreamDecoder::new(*limits);
    let mut frames = Vec::new();
    let mut rest = wire;
    let mut sizes = cuts.iter().map(|&c| usize::from(c) + 1).cycle();
    let mut end = None;
    'feeding: while !rest.is_empty() {
        let n = sizes.next().unwrap_or(usize::MAX).min(rest.len());
        let (chunk, tail) = rest.split_at(n);
        rest = tail;
        d.feed(chunk);
        loop {
            match d.next_frame() {
                Ok(Some(f)) => frames.push(f),
                Ok(None) => {
                    // Documented: less than a frame plus its length prefix is held between feeds.
                    ensure(d.buffered() < limits.max_frame_size + 8, || {
                        format!("stream decoder holds {} bytes", d.buffered())
                    })?;
                    break;
                }
                Err(e) => {
                    ensure_eq(
                        &d.next_frame(),
                        &Err(e),
                        "a poisoned decoder repeats its error",
                    )?;
                    ensure_eq(&d.buffered(), &0, "a poisoned decoder drops its buffer")?;
                    end = Some(e);
                    break 'feeding;
                }
            }
        }
    }
    Ok((frames, end))
}

/// `f` encodes to exactly `encoded_len` bytes and decodes back to itself bare, on a stream and in
/// a datagram.
pub fn roundtrip(f: &Frame, limits: &DecodeLimits) -> Result<(), Violation> {
    let mut bare = BytesMut::new();
    f.encode(&mut bare);
    ensure_eq(&bare.len(), &f.encoded_len(), "encoded_len")?;
    // Re-encoding is canonical, so never longer than what was decoded: the same limits hold.
    let again = Frame::decode(bare.clone().freeze(), limits);
    ensure_eq(&again, &Ok(f.clone()), "bare frame round trip")?;

    let mut stream = BytesMut::new();
    framing::encode_preface(&mut stream);
    framing::encode_stream_frame(f, &mut stream);
    let mut d = StreamDecoder::new(*limits);
    d.feed(&stream);
    ensure_eq(&d.next_frame(), &Ok(Some(f.clone())), "stream round trip")?;
    ensure_eq(&d.next_frame(), &Ok(None), "nothing after the one frame")?;

    let mut dgram = BytesMut::new();
    framing::encode_datagram(f, &mut dgram);
    let back = framing::decode_datagram(dgram.freeze(), limits);
    ensure_eq(&back, &Ok(f.clone()), "datagram round trip")
}

/// The datagram checksum (CRC-32, IEEE), computed here so the check does not trust the encoder.
fn crc32fast_hash(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}
