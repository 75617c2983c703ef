//! QUIC-style variable-length integers (RFC 9000 §16).
//!
//! The two high bits of the first byte give the encoded length; the remaining bits hold the value,
//! big-endian. Small numbers (sequence numbers early in a session, stream ids, lengths) take one or
//! two bytes, so frame headers stay a few bytes long, while any value up to [`MAX`] still fits.
//!
//! | first two bits | length  | usable bits | largest value     |
//! |----------------|---------|-------------|-------------------|
//! | `00`           | 1 byte  | 6           | 63                |
//! | `01`           | 2 bytes | 14          | 16 383            |
//! | `10`           | 4 bytes | 30          | 1 073 741 823     |
//! | `11`           | 8 bytes | 62          | 2^62 − 1 ([`MAX`]) |
//!
//! Encoding always picks the shortest form. Decoding also accepts longer (non-minimal) forms, as
//! QUIC does: they are unambiguous, and rejecting them would only add an error case.
//!
//! ```
//! use steadfast_core::varint;
//!
//! let mut buf = Vec::new();
//! varint::encode(16_384, &mut buf);
//! assert_eq!(buf.len(), varint::encoded_len(16_384));
//! assert_eq!(buf, [0x80, 0x00, 0x40, 0x00]);
//! assert_eq!(varint::decode(&mut &buf[..]), Ok(16_384));
//! ```

use bytes::{Buf, BufMut};

use crate::frame::DecodeError;

/// The largest value a varint can carry: 2^62 − 1.
pub const MAX: u64 = (1 << 62) - 1;

/// Largest values of the 1-, 2- and 4-byte forms.
const MAX_1: u64 = (1 << 6) - 1;
const MAX_2: u64 = (1 << 14) - 1;
const MAX_4: u64 = (1 << 30) - 1;

/// How many bytes [`encode`] writes for `v`: 1, 2, 4 or 8.
///
/// `v` must be at most [`MAX`] (checked in debug builds); a larger value reports 8, matching what
/// [`encode`] writes for it.
#[must_use]
pub const fn encoded_len(v: u64) -> usize {
    debug_assert!(v <= MAX, "varint value above varint::MAX");
    if v <= MAX_1 {
        1
    } else if v <= MAX_2 {
        2
    } else if v <= MAX_4 {
        4
    } else {
        8
    }
}

/// Writes `v` in its shortest form.
///
/// Passing a value above [`MAX`] is a caller bug: debug builds panic, release builds encode
/// `v & MAX` (the wire cannot carry the top two bits), so the peer sees a wrong but well-formed
/// value rather than a corrupt stream. Every field steadfast encodes is kept below [`MAX`] by
/// construction (sequence numbers never get near 2^62 in a session's life).
///
/// Like every [`BufMut`] writer, panics if `buf` cannot grow and has fewer than
/// [`encoded_len`]`(v)` bytes left.
pub fn encode<B: BufMut>(v: u64, buf: &mut B) {
    debug_assert!(v <= MAX, "varint value above varint::MAX");
    let v = v & MAX;
    // The `as` casts below only drop bits that `encoded_len` has just shown to be zero.
    match encoded_len(v) {
        1 => buf.put_u8(v as u8),
        2 => buf.put_u16(0x4000 | v as u16),
        4 => buf.put_u32(0x8000_0000 | v as u32),
        _ => buf.put_u64(0xC000_0000_0000_0000 | v),
    }
}

/// Reads one varint from the front of `buf`.
///
/// Returns [`DecodeError::Truncated`] if `buf` ends before the varint does; in that case nothing
/// is consumed, so a caller may retry once more bytes have arrived.
pub fn decode<B: Buf>(buf: &mut B) -> Result<u64, DecodeError> {
    // `chunk()` is non-empty whenever `remaining() > 0` (a `Buf` contract).
    let chunk = buf.chunk();
    let Some(&first) = chunk.first() else {
        return Err(DecodeError::Truncated);
    };
    let len = 1usize << (first >> 6);
    // The usual case, the whole varint in one contiguous chunk, reads it in place: `get_uint` would
    // copy it out through a temporary first.
    if let Some(bytes) = chunk.get(..len) {
        let v = read(bytes);
        buf.advance(len);
        return Ok(v);
    }
    if buf.remaining() < len {
        return Err(DecodeError::Truncated);
    }
    // Big-endian read of all `len` bytes, then drop the two length bits at the top.
    let raw = buf.get_uint(len);
    Ok(raw & (u64::MAX >> (66 - 8 * len)))
}

/// The value of a whole varint, `bytes` being exactly its 1, 2, 4 or 8 bytes.
#[inline]
pub(crate) fn read(bytes: &[u8]) -> u64 {
    match *bytes {
        [a] => u64::from(a),
        [a, b] => u64::from(u16::from_be_bytes([a & 0x3f, b])),
        [a, b, c, d] => u64::from(u32::from_be_bytes([a & 0x3f, b, c, d])),
        [a, b, c, d, e, f, g, h] => u64::from_be_bytes([a & 0x3f, b, c, d, e, f, g, h]),
        _ => 0,
    }
}

/// Writes `v` in its shortest form at the start of `out` and returns how many bytes that took:
/// the same bytes as [`encode`], for callers that write a header into a slice.
/// `out` must have room for [`encoded_len`]`(v)` bytes.
#[inline]
pub(crate) fn write(v: u64, out: &mut [u8]) -> usize {
    debug_assert!(v <= MAX, "varint value above varint::MAX");
    let v = v & MAX;
    let len = encoded_len(v);
    // The `as` casts only drop bits that `encoded_len` has just shown to be zero.
    match len {
        1 => out[0] = v as u8,
        2 => out[..2].copy_from_slice(&(0x4000 | v as u16).to_be_bytes()),
        4 => out[..4].copy_from_slice(&(0x8000_0000 | v as u32).to_be_bytes()),
        _ => out[..8].copy_from_slice(&(0xC000_0000_0000_0000 | v).to_be_bytes()),
    }
    len
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec::Vec;

    fn encoded(v: u64) -> Vec<u8> {
        let mut buf = Vec::new();
        encode(v, &mut buf);
        buf
    }

    fn round_trip(v: u64) -> u64 {
        let buf = encoded(v);
        assert_eq!(buf.len(), encoded_len(v), "encoded_len disagrees for {v}");
        let mut rest = &buf[..];
        let out = decode(&mut rest).expect("decodes");
        assert!(rest.is_empty(), "decode left bytes behind for {v}");
        out
    }

    #[test]
    fn each_length_boundary_picks_the_shortest_form() {
        let cases = [
            (0, 1),
            (63, 1),
            (64, 2),
            (16_383, 2),
            (16_384, 4),
            ((1 << 30) - 1, 4),
            (1 << 30, 8),
            (MAX, 8),
        ];
        for (v, len) in cases {
            assert_eq!(encoded_len(v), len, "length of {v}");
            assert_eq!(round_trip(v), v);
        }
    }

    #[test]
    fn the_rfc_9000_examples_decode_to_their_values() {
        let examples: [(&[u8], u64); 4] = [
            (
                &[0xc2, 0x19, 0x7c, 0x5e, 0xff, 0x14, 0xe8, 0x8c],
                151_288_809_941_952_652,
            ),
            (&[0x9d, 0x7f, 0x3e, 0x7d], 494_878_333),
            (&[0x7b, 0xbd], 15_293),
            (&[0x25], 37),
        ];
        for (bytes, value) in examples {
            assert_eq!(decode(&mut &bytes[..]), Ok(value));
            assert_eq!(encoded(value), bytes);
        }
    }

    #[test]
    fn a_non_minimal_encoding_is_accepted() {
        // 37 in the two-byte form, as RFC 9000 §A.1 shows.
        assert_eq!(decode(&mut &[0x40, 0x25][..]), Ok(37));
    }

    #[test]
    fn an_empty_input_is_truncated() {
        assert_eq!(decode(&mut &[][..]), Err(DecodeError::Truncated));
    }

    #[test]
    fn a_truncated_varint_is_an_error_and_consumes_nothing() {
        for v in [64, 16_384, 1 << 30, MAX] {
            let buf = encoded(v);
            for cut in 1..buf.len() {
                let mut rest = &buf[..cut];
                assert_eq!(
                    decode(&mut rest),
                    Err(DecodeError::Truncated),
                    "{v} cut at {cut}"
                );
                assert_eq!(rest.len(), cut, "nothing consumed");
            }
        }
    }

    #[test]
    fn decoding_consumes_only_the_varint() {
        let mut buf = encoded(300);
        buf.extend_from_slice(b"rest");
        let mut rest = &buf[..];
        assert_eq!(decode(&mut rest), Ok(300));
        assert_eq!(rest, b"rest");
    }

    #[test]
    fn writing_into_a_slice_matches_encode() {
        for v in [0, 63, 64, 16_383, 16_384, (1 << 30) - 1, 1 << 30, MAX] {
            let mut out = [0u8; 8];
            let n = write(v, &mut out);
            assert_eq!(&out[..n], &encoded(v)[..], "{v}");
        }
    }

    #[test]
    fn a_non_contiguous_buffer_decodes_the_same() {
        let buf = encoded(MAX - 1);
        let (a, b) = buf.split_at(3);
        let mut chained = a.chain(b);
        assert_eq!(decode(&mut chained), Ok(MAX - 1));
    }
}
