//! Frames: the messages the two ends of a session exchange, and their wire encoding.
//!
//! A frame is always delimited by its transport (a length prefix on streams, the datagram itself
//! on UDP; see [`crate::framing`]), so the last field of a frame runs to its end with no length of
//! its own. Decoding is zero-copy: a data payload or a close reason is a [`Bytes`] slice of the
//! input, and ack ranges land in a fixed-capacity [`heapless::Vec`], so decoding never allocates.
//!
//! # Wire layout
//!
//! All integers are [varints](crate::varint). The first byte holds the frame type in its high
//! nibble and flags in its low nibble; flag bits a type does not define must be zero.
//!
//! | first byte | frame | fields after the first byte |
//! |------------|-------|-----------------------------|
//! | `0000_0UAS` (`0x00`–`0x07`) | [`Frame::Data`] | `stream` (only if `S`), `seq`, `ack` (only if `A`), payload (rest of the frame) |
//! | `0x10` | [`Frame::Ack`] | `cumulative`, `delay_micros`, `count`, then `count` × (`gap`, `len − 1`) |
//! | `0x20` | [`Frame::Ping`] | `id` |
//! | `0x30` | [`Frame::Pong`] | `id` |
//! | `0x40` | [`Frame::Close`] | `code`, `reason_len`, `reason` (`reason_len` bytes) |
//! | `0101_00QS` (`0x50`–`0x53`) | [`Frame::Unreliable`] | `stream` (only if `S`), `seq`, payload (rest); `Q`: sequenced |
//! | `0110_000R` (`0x60`, `0x61`) | [`Frame::Hello`] | `nonce` (8 bytes), `recv_window`; if `R`: `session` (8 bytes), `token` (16 bytes), `epoch`, `received`; then `credentials` (rest) |
//! | `0111_000R` (`0x70`, `0x71`) | [`Frame::Welcome`] | `nonce` (8 bytes), `session` (8 bytes), `token` (16 bytes), `epoch`, `received`, `recv_window`, `retention_millis`; `R`: resumed |
//! | `0x80` | [`Frame::Refuse`] | `code`, `epoch`, `reason` (rest, at most `max_reason_len`) |
//!
//! Flags of a data frame: `S = 0x01` means a `stream` field follows (it is left out for the
//! default stream 0), `A = 0x02` means a piggy-backed cumulative `ack` follows, `U = 0x04` means
//! the message may be delivered before earlier ones (reliable unordered).
//!
//! On stream transports only, a data frame may carry a short sequence number: the first byte is
//! then `0000_1UAS` (`0x08`–`0x0F`, flag `N = 0x08`) and `seq` is replaced by its low 16 bits (2
//! bytes, big-endian). The receiver expands them to the number nearest to one past the largest it
//! decoded on the same connection (as QUIC expands packet numbers, RFC 9000 §A.3). A sender only
//! shortens a number when all the numbers it wrote on that connection, this one included, lie
//! within [`SHORT_SEQ_SPAN`](crate::framing::SHORT_SEQ_SPAN) of each other (see
//! [`WrittenSeqs`](crate::framing::WrittenSeqs)), and the first data frame on a connection always
//! carries its full number, so the expansion is exact even when frames in between never arrive.
//! Only the [`StreamDecoder`](crate::framing::StreamDecoder) knows the connection, so
//! [`Frame::decode`], which sees one frame alone (as datagrams are), rejects the flag as an unknown
//! frame type.
//!
//! Ack ranges are sent relative to the previous point, starting from `cumulative`, so that they
//! stay small: each range `[start, end)` goes out as `gap = start − prev − 1` and `len − 1` where
//! `len = end − start`, then `prev = end`. Since a range always starts above the previous point and is never empty,
//! the two numbers are never negative, and every pair on the wire describes a valid range; the
//! decoder only has to guard against sums beyond the sequence space.
//!
//! Fixed-layout frames (ack, ping, pong, close) must end exactly where their last field does.
//! Encoders write the shortest form of everything; decoders also accept non-minimal varints and a
//! data frame whose `S` flag carries stream 0, since both are unambiguous.
//!
//! A data frame on the default stream with `seq < 2^14` and no ack has a 3-byte header.
//!
//! ```
//! use bytes::Bytes;
//! use steadfast_core::frame::{DataFrame, DecodeLimits, Frame};
//!
//! let frame = Frame::Data(DataFrame {
//!     stream: 0,
//!     seq: 7,
//!     ack: None,
//!     unordered: false,
//!     payload: Bytes::from_static(b"hello"),
//! });
//! let mut buf = Vec::new();
//! frame.encode(&mut buf);
//! assert_eq!(buf.len(), frame.encoded_len());
//! assert_eq!(buf, b"\x00\x07hello");
//!
//! let decoded = Frame::decode(Bytes::from(buf), &DecodeLimits::default())?;
//! assert_eq!(decoded, frame);
//! # Ok::<(), steadfast_core::frame::DecodeError>(())
//! ```

use core::fmt;
use core::ops::Range;

use bytes::{Buf, BufMut, Bytes};

use crate::Seq;
use crate::varint;

/// The most ack ranges one ack frame carries; a receiver reports the lowest ones first.
///
/// Six, not more: the ranges sit inline in [`Frame`] so that decoding never allocates, and every
/// decoded frame is moved a few times on its way; at 32 ranges a frame was 544 bytes, at 8 it was
/// 160, at 6 it is 128, which the compiler moves inline instead of calling `memcpy` (those calls
/// were a sixth of a server connection's time at 64 B messages). The lowest gaps are the ones the
/// sender must fill first anyway.
pub const MAX_ACK_RANGES: usize = 6;

/// Ranges of received sequence numbers above the cumulative point, half-open `[start, end)`,
/// ascending, disjoint, non-adjacent, every `start > cumulative`, and every `end <=
/// varint::MAX + 1` (so each sequence number in them fits a varint).
///
/// Fixed capacity so that decoding an ack never allocates.
pub type AckRanges = heapless::Vec<Range<Seq>, MAX_ACK_RANGES>;

/// Default for [`DecodeLimits::max_frame_size`]: a 1 MiB payload plus room for its header.
pub const DEFAULT_MAX_FRAME_SIZE: usize = 1024 * 1024 + 64;

/// Default for [`DecodeLimits::max_reason_len`].
pub const DEFAULT_MAX_REASON_LEN: usize = 256;

/// First-byte values; see the table in the module documentation.
const TYPE_DATA: u8 = 0x00;
const DATA_HAS_STREAM: u8 = 0x01;
const DATA_HAS_ACK: u8 = 0x02;
const DATA_UNORDERED: u8 = 0x04;
const DATA_ALL_FLAGS: u8 = TYPE_DATA | DATA_HAS_STREAM | DATA_HAS_ACK | DATA_UNORDERED;
/// On a stream: `seq` as its low 16 bits.
pub(crate) const DATA_SHORT_SEQ: u8 = 0x08;
const TYPE_ACK: u8 = 0x10;
const TYPE_PING: u8 = 0x20;
const TYPE_PONG: u8 = 0x30;
const TYPE_CLOSE: u8 = 0x40;
const TYPE_UNRELIABLE: u8 = 0x50;
const UNRELIABLE_HAS_STREAM: u8 = 0x01;
const UNRELIABLE_SEQUENCED: u8 = 0x02;
const UNRELIABLE_ALL_FLAGS: u8 = TYPE_UNRELIABLE | UNRELIABLE_HAS_STREAM | UNRELIABLE_SEQUENCED;
const TYPE_HELLO: u8 = 0x60;
const TYPE_WELCOME: u8 = 0x70;
/// On a hello: a resume follows. On a welcome: the session was resumed.
const HANDSHAKE_RESUME: u8 = 0x01;
const TYPE_REFUSE: u8 = 0x80;

/// One protocol message.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
#[allow(
    clippy::large_enum_variant,
    reason = "an ack's ranges are inline so decoding never allocates; the size is fixed and small"
)]
pub enum Frame {
    /// An application message on a stream.
    Data(DataFrame),
    /// Which sequence numbers have been received.
    Ack(AckFrame),
    /// A liveness probe; the peer answers with a [`Frame::Pong`] carrying the same id.
    Ping {
        /// Chosen by the sender to match the answer to its probe.
        id: u64,
    },
    /// The answer to a [`Frame::Ping`].
    Pong {
        /// The id of the ping being answered.
        id: u64,
    },
    /// The end of the session, with the reason.
    Close(CloseFrame),
    /// An at-most-once message, outside the reliable sequence space.
    Unreliable(UnreliableFrame),
    /// A client opens a connection: a new session, or a resume of an old one.
    Hello(HelloFrame),
    /// The server accepts a hello.
    Welcome(WelcomeFrame),
    /// The server refuses a hello; the connection closes after it.
    Refuse(RefuseFrame),
}

/// An at-most-once message: never acknowledged or retransmitted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnreliableFrame {
    /// Its stream.
    pub stream: u64,
    /// Its number in the unreliable sequence space of this direction (for duplicate refusal).
    pub seq: u64,
    /// Newest wins: never deliver it after a newer one on the same stream.
    pub sequenced: bool,
    /// The message (rest of the frame).
    pub payload: Bytes,
}

/// The first frame a client sends on a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HelloFrame {
    /// The client's tie-breaking nonce for this connection.
    pub nonce: u64,
    /// How far ahead of its watermark the client accepts messages.
    pub recv_window: u64,
    /// Present when resuming a session.
    pub resume: Option<crate::identity::Resume>,
    /// Opaque to steadfast; the server's authentication hook judges them (rest of the frame).
    pub credentials: Bytes,
}

/// The server's acceptance of a hello.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WelcomeFrame {
    /// The server's tie-breaking nonce for this connection.
    pub nonce: u64,
    /// The session, new or resumed.
    pub session: crate::identity::SessionId,
    /// Its resume secret.
    pub token: crate::identity::Token,
    /// The attach epoch now current.
    pub epoch: u64,
    /// Whether an existing session was resumed (else it is new).
    pub resumed: bool,
    /// Every client message below this sequence number has been received.
    pub received: Seq,
    /// How far ahead of its watermark the server accepts messages.
    pub recv_window: u64,
    /// How long the server keeps the session after a disconnection.
    pub retention_millis: u64,
}

/// The server's refusal of a hello.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefuseFrame {
    /// Why; see [`crate::session::RefuseCode`].
    pub code: u64,
    /// The session's current epoch, for a stale-epoch refusal (else 0).
    pub epoch: u64,
    /// A human-readable reason (rest of the frame, at most `max_reason_len`).
    pub reason: Bytes,
}

/// An application message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataFrame {
    /// The stream it belongs to; 0 is the default stream and costs no bytes on the wire.
    pub stream: u64,
    /// Its sequence number in this direction of the session.
    pub seq: Seq,
    /// A piggy-backed cumulative ack: every sequence number below it has been received. Saves a
    /// separate ack frame when traffic flows both ways.
    pub ack: Option<Seq>,
    /// Deliver on arrival rather than in sequence order (reliable unordered).
    pub unordered: bool,
    /// The message itself. Runs to the end of the frame, so it needs no length field.
    pub payload: Bytes,
}

/// A cumulative acknowledgement plus selective ranges above it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AckFrame {
    /// Every sequence number below it has been received.
    pub cumulative: Seq,
    /// How long the receiver held this ack before sending it, so the sender can take it out of its
    /// round-trip time sample (as QUIC's `ack_delay`). Values above [`varint::MAX`] are sent as
    /// [`varint::MAX`].
    pub delay_micros: u64,
    /// Sequence numbers received above `cumulative`; see [`AckRanges`] for the invariants.
    pub ranges: AckRanges,
}

/// The end of a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseFrame {
    /// Why the session ended, as a machine-readable code.
    pub code: u64,
    /// Human-readable detail for logs; a peer rejects one longer than its
    /// [`DecodeLimits::max_reason_len`] (256 bytes by default), so keep it short.
    pub reason: Bytes,
}

/// Bounds a decoder enforces on peer input, so a hostile peer cannot make it buffer or accept more
/// than the application configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeLimits {
    /// The largest frame accepted, in bytes, not counting its transport prefix (length or version).
    pub max_frame_size: usize,
    /// The longest close reason accepted, in bytes.
    pub max_reason_len: usize,
}

impl Default for DecodeLimits {
    /// [`DEFAULT_MAX_FRAME_SIZE`] (1 MiB + 64) and [`DEFAULT_MAX_REASON_LEN`] (256).
    fn default() -> Self {
        Self::new(DEFAULT_MAX_FRAME_SIZE)
    }
}

impl DecodeLimits {
    /// Limits with the given largest frame size and the default reason length.
    #[must_use]
    pub const fn new(max_frame_size: usize) -> Self {
        Self {
            max_frame_size,
            max_reason_len: DEFAULT_MAX_REASON_LEN,
        }
    }
}

/// Why some bytes from the peer are not a valid frame.
///
/// Every one of these means the peer is broken or hostile (or speaks another version): the
/// connection should be closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum DecodeError {
    /// The input ended inside a field.
    Truncated,
    /// A zero-length frame.
    Empty,
    /// The first byte of a frame is not a known type with valid flags.
    UnknownFrameType(u8),
    /// A frame longer than [`DecodeLimits::max_frame_size`].
    FrameTooLarge {
        /// The length the peer sent or announced.
        len: u64,
        /// The configured limit.
        max: usize,
    },
    /// More than [`MAX_ACK_RANGES`] ranges in an ack frame.
    TooManyAckRanges,
    /// Ack ranges that break the [`AckRanges`] invariants (out of order, overlapping, adjacent,
    /// empty, not above the cumulative point, or beyond the sequence space).
    InvalidAckRanges,
    /// A close reason longer than [`DecodeLimits::max_reason_len`].
    ReasonTooLong {
        /// The length the peer announced.
        len: usize,
        /// The configured limit.
        max: usize,
    },
    /// Bytes after the last field of a fixed-layout frame.
    TrailingBytes,
    /// A stream connection that did not start with [`crate::framing::PREFACE`].
    BadPreface,
    /// The peer speaks a protocol version this build does not.
    UnsupportedVersion(u8),
    /// A datagram's frame does not match its checksum: corrupted on the way.
    BadChecksum,
    /// A varint field too large for the type it must fit, or a sum of fields that overflows.
    ValueTooLarge,
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Truncated => f.write_str("input ended inside a field"),
            Self::Empty => f.write_str("empty frame"),
            Self::UnknownFrameType(t) => write!(f, "unknown frame type {t:#04x}"),
            Self::FrameTooLarge { len, max } => {
                write!(f, "frame of {len} bytes exceeds the limit of {max}")
            }
            Self::TooManyAckRanges => write!(f, "more than {MAX_ACK_RANGES} ack ranges"),
            Self::InvalidAckRanges => f.write_str("invalid ack ranges"),
            Self::ReasonTooLong { len, max } => {
                write!(f, "close reason of {len} bytes exceeds the limit of {max}")
            }
            Self::TrailingBytes => f.write_str("trailing bytes after the frame"),
            Self::BadPreface => f.write_str("connection did not start with the steadfast preface"),
            Self::UnsupportedVersion(v) => write!(f, "unsupported protocol version {v}"),
            Self::BadChecksum => f.write_str("datagram checksum mismatch"),
            Self::ValueTooLarge => f.write_str("value too large for its field"),
        }
    }
}

impl core::error::Error for DecodeError {}

/// A length as a wire value; lengths of real buffers always fit.
fn len_u64(len: usize) -> u64 {
    u64::try_from(len).unwrap_or(u64::MAX)
}

impl Frame {
    /// The exact number of bytes [`Frame::encode`] writes.
    #[must_use]
    pub fn encoded_len(&self) -> usize {
        match self {
            Self::Data(d) => DataFrame::header_len(d.stream, d.seq, d.ack) + d.payload.len(),
            Self::Ack(a) => a.encoded_len(),
            Self::Ping { id } | Self::Pong { id } => 1 + varint::encoded_len(*id),
            Self::Close(c) => {
                1 + varint::encoded_len(c.code)
                    + varint::encoded_len(len_u64(c.reason.len()))
                    + c.reason.len()
            }
            Self::Unreliable(u) => {
                let stream = if u.stream == 0 {
                    0
                } else {
                    varint::encoded_len(u.stream)
                };
                1 + stream + varint::encoded_len(u.seq) + u.payload.len()
            }
            Self::Hello(h) => {
                let resume = h.resume.map_or(0, |r| {
                    8 + 16 + varint::encoded_len(r.epoch) + varint::encoded_len(r.received)
                });
                1 + 8 + varint::encoded_len(h.recv_window) + resume + h.credentials.len()
            }
            Self::Welcome(w) => {
                1 + 8
                    + 8
                    + 16
                    + varint::encoded_len(w.epoch)
                    + varint::encoded_len(w.received)
                    + varint::encoded_len(w.recv_window)
                    + varint::encoded_len(w.retention_millis.min(varint::MAX))
            }
            Self::Refuse(r) => {
                1 + varint::encoded_len(r.code) + varint::encoded_len(r.epoch) + r.reason.len()
            }
        }
    }

    /// Writes the frame, exactly [`Frame::encoded_len`] bytes, without any transport prefix.
    ///
    /// Integer fields above [`varint::MAX`] are a caller bug (see [`varint::encode`]), as are ack
    /// ranges that break the [`AckRanges`] invariants; both are checked in debug builds.
    pub fn encode<B: BufMut>(&self, buf: &mut B) {
        match self {
            Self::Data(d) => {
                DataFrame::encode_header(d.stream, d.seq, d.ack, d.unordered, buf);
                buf.put_slice(&d.payload);
            }
            Self::Ack(a) => a.encode(buf),
            Self::Ping { id } => {
                buf.put_u8(TYPE_PING);
                varint::encode(*id, buf);
            }
            Self::Pong { id } => {
                buf.put_u8(TYPE_PONG);
                varint::encode(*id, buf);
            }
            Self::Close(c) => {
                buf.put_u8(TYPE_CLOSE);
                varint::encode(c.code, buf);
                varint::encode(len_u64(c.reason.len()), buf);
                buf.put_slice(&c.reason);
            }
            Self::Unreliable(u) => {
                UnreliableFrame::encode_header(u.stream, u.seq, u.sequenced, buf);
                buf.put_slice(&u.payload);
            }
            Self::Hello(h) => {
                buf.put_u8(
                    TYPE_HELLO
                        | if h.resume.is_some() {
                            HANDSHAKE_RESUME
                        } else {
                            0
                        },
                );
                buf.put_u64(h.nonce);
                varint::encode(h.recv_window, buf);
                if let Some(r) = &h.resume {
                    buf.put_u64(r.session.0);
                    buf.put_slice(r.token.as_bytes());
                    varint::encode(r.epoch, buf);
                    varint::encode(r.received, buf);
                }
                buf.put_slice(&h.credentials);
            }
            Self::Welcome(w) => {
                buf.put_u8(TYPE_WELCOME | if w.resumed { HANDSHAKE_RESUME } else { 0 });
                buf.put_u64(w.nonce);
                buf.put_u64(w.session.0);
                buf.put_slice(w.token.as_bytes());
                varint::encode(w.epoch, buf);
                varint::encode(w.received, buf);
                varint::encode(w.recv_window, buf);
                varint::encode(w.retention_millis.min(varint::MAX), buf);
            }
            Self::Refuse(r) => {
                buf.put_u8(TYPE_REFUSE);
                varint::encode(r.code, buf);
                varint::encode(r.epoch, buf);
                buf.put_slice(&r.reason);
            }
        }
    }

    /// Decodes `frame`, which must hold exactly one frame (the transport delimits it).
    ///
    /// Never panics and never allocates: a data payload or close reason is `frame` itself, advanced
    /// past the header.
    ///
    /// ```
    /// use bytes::Bytes;
    /// use steadfast_core::frame::{DecodeError, DecodeLimits, Frame};
    ///
    /// let limits = DecodeLimits::default();
    /// assert_eq!(
    ///     Frame::decode(Bytes::from_static(&[0x20, 0x05]), &limits),
    ///     Ok(Frame::Ping { id: 5 })
    /// );
    /// assert_eq!(
    ///     Frame::decode(Bytes::from_static(&[0x20, 0x05, 0x00]), &limits),
    ///     Err(DecodeError::TrailingBytes)
    /// );
    /// ```
    pub fn decode(mut frame: Bytes, limits: &DecodeLimits) -> Result<Frame, DecodeError> {
        if frame.len() > limits.max_frame_size {
            return Err(DecodeError::FrameTooLarge {
                len: len_u64(frame.len()),
                max: limits.max_frame_size,
            });
        }
        let Ok(first) = frame.try_get_u8() else {
            return Err(DecodeError::Empty);
        };
        match first {
            TYPE_DATA..=DATA_ALL_FLAGS => {
                DataFrame::decode_body(first, None, frame).map(Frame::Data)
            }
            TYPE_ACK => AckFrame::decode_body(&mut frame).map(Frame::Ack),
            TYPE_PING => Ok(Frame::Ping {
                id: decode_last_varint(&mut frame)?,
            }),
            TYPE_PONG => Ok(Frame::Pong {
                id: decode_last_varint(&mut frame)?,
            }),
            TYPE_CLOSE => {
                let code = varint::decode(&mut frame)?;
                let len = varint::decode(&mut frame)?;
                let len = usize::try_from(len).map_err(|_| DecodeError::ValueTooLarge)?;
                if len > limits.max_reason_len {
                    return Err(DecodeError::ReasonTooLong {
                        len,
                        max: limits.max_reason_len,
                    });
                }
                match frame.len().cmp(&len) {
                    core::cmp::Ordering::Less => Err(DecodeError::Truncated),
                    core::cmp::Ordering::Greater => Err(DecodeError::TrailingBytes),
                    core::cmp::Ordering::Equal => Ok(Frame::Close(CloseFrame {
                        code,
                        reason: frame,
                    })),
                }
            }
            TYPE_UNRELIABLE..=UNRELIABLE_ALL_FLAGS => {
                let stream = if first & UNRELIABLE_HAS_STREAM != 0 {
                    varint::decode(&mut frame)?
                } else {
                    0
                };
                let seq = varint::decode(&mut frame)?;
                Ok(Frame::Unreliable(UnreliableFrame {
                    stream,
                    seq,
                    sequenced: first & UNRELIABLE_SEQUENCED != 0,
                    payload: frame,
                }))
            }
            TYPE_HELLO | 0x61 => {
                let nonce = get_u64(&mut frame)?;
                let recv_window = varint::decode(&mut frame)?;
                let resume = if first & HANDSHAKE_RESUME != 0 {
                    Some(crate::identity::Resume {
                        session: crate::identity::SessionId(get_u64(&mut frame)?),
                        token: get_token(&mut frame)?,
                        epoch: varint::decode(&mut frame)?,
                        received: varint::decode(&mut frame)?,
                    })
                } else {
                    None
                };
                Ok(Frame::Hello(HelloFrame {
                    nonce,
                    recv_window,
                    resume,
                    credentials: frame,
                }))
            }
            TYPE_WELCOME | 0x71 => {
                let welcome = WelcomeFrame {
                    nonce: get_u64(&mut frame)?,
                    session: crate::identity::SessionId(get_u64(&mut frame)?),
                    token: get_token(&mut frame)?,
                    epoch: varint::decode(&mut frame)?,
                    resumed: first & HANDSHAKE_RESUME != 0,
                    received: varint::decode(&mut frame)?,
                    recv_window: varint::decode(&mut frame)?,
                    retention_millis: varint::decode(&mut frame)?,
                };
                if frame.is_empty() {
                    Ok(Frame::Welcome(welcome))
                } else {
                    Err(DecodeError::TrailingBytes)
                }
            }
            TYPE_REFUSE => {
                let code = varint::decode(&mut frame)?;
                let epoch = varint::decode(&mut frame)?;
                if frame.len() > limits.max_reason_len {
                    return Err(DecodeError::ReasonTooLong {
                        len: frame.len(),
                        max: limits.max_reason_len,
                    });
                }
                Ok(Frame::Refuse(RefuseFrame {
                    code,
                    epoch,
                    reason: frame,
                }))
            }
            other => Err(DecodeError::UnknownFrameType(other)),
        }
    }
}

/// A fixed 8-byte big-endian field (nonces and session ids use all 64 bits, past varint range).
fn get_u64(frame: &mut Bytes) -> Result<u64, DecodeError> {
    frame.try_get_u64().map_err(|_| DecodeError::Truncated)
}

fn get_token(frame: &mut Bytes) -> Result<crate::identity::Token, DecodeError> {
    let mut t = [0u8; 16];
    frame
        .try_copy_to_slice(&mut t)
        .map_err(|_| DecodeError::Truncated)?;
    Ok(crate::identity::Token::from_bytes(t))
}

impl UnreliableFrame {
    /// The length of an unreliable frame's header.
    #[must_use]
    pub fn header_len(stream: u64, seq: u64) -> usize {
        let stream_len = if stream == 0 {
            0
        } else {
            varint::encoded_len(stream)
        };
        1 + stream_len + varint::encoded_len(seq)
    }

    /// Writes an unreliable frame's header; the payload follows.
    pub fn encode_header<B: BufMut>(stream: u64, seq: u64, sequenced: bool, buf: &mut B) {
        let mut first = TYPE_UNRELIABLE;
        if stream != 0 {
            first |= UNRELIABLE_HAS_STREAM;
        }
        if sequenced {
            first |= UNRELIABLE_SEQUENCED;
        }
        buf.put_u8(first);
        if stream != 0 {
            varint::encode(stream, buf);
        }
        varint::encode(seq, buf);
    }
}

/// Reads the final varint of a fixed-layout frame.
fn decode_last_varint(frame: &mut Bytes) -> Result<u64, DecodeError> {
    let v = varint::decode(frame)?;
    if frame.is_empty() {
        Ok(v)
    } else {
        Err(DecodeError::TrailingBytes)
    }
}

/// The sequence number whose low 16 bits are `low` nearest to `largest + 1` (RFC 9000 §A.3 with a
/// 16-bit window).
fn expand_short_seq(largest: Seq, low: u16) -> Result<Seq, DecodeError> {
    const WIN: u64 = 1 << 16;
    const HALF: u64 = WIN / 2;
    let expected = largest.checked_add(1).ok_or(DecodeError::ValueTooLarge)?;
    let candidate = (expected & !(WIN - 1)) | u64::from(low);
    let seq = if candidate.saturating_add(HALF) <= expected {
        candidate + WIN
    } else if candidate > expected.saturating_add(HALF) && candidate >= WIN {
        candidate - WIN
    } else {
        candidate
    };
    if seq > varint::MAX {
        return Err(DecodeError::ValueTooLarge);
    }
    Ok(seq)
}

impl DataFrame {
    /// The longest header: the first byte and three 8-byte varints.
    pub(crate) const MAX_HEADER_LEN: usize = 1 + 3 * 8;

    /// Decodes what follows a data frame's first byte; `largest` is the largest sequence number
    /// decoded on the connection, around which a short one (the `N` flag) is expanded, `None`
    /// where the flag is not allowed.
    // Always: a call returns the frame through memory, stored field by field and read back whole.
    #[inline(always)]
    pub(crate) fn decode_body(
        first: u8,
        largest: Option<Seq>,
        mut frame: Bytes,
    ) -> Result<DataFrame, DecodeError> {
        let stream = if first & DATA_HAS_STREAM != 0 {
            varint::decode(&mut frame)?
        } else {
            0
        };
        let seq = if first & DATA_SHORT_SEQ == 0 {
            varint::decode(&mut frame)?
        } else {
            let largest = largest.ok_or(DecodeError::UnknownFrameType(first))?;
            let low = frame.try_get_u16().map_err(|_| DecodeError::Truncated)?;
            expand_short_seq(largest, low)?
        };
        let ack = if first & DATA_HAS_ACK != 0 {
            Some(varint::decode(&mut frame)?)
        } else {
            None
        };
        Ok(DataFrame {
            stream,
            seq,
            ack,
            unordered: first & DATA_UNORDERED != 0,
            payload: frame,
        })
    }

    /// Writes a data frame's header into `out` and returns its length; `short` writes the sequence
    /// number as its low 16 bits (the `N` flag: streams only).
    #[inline(always)]
    pub(crate) fn write_header(
        stream: u64,
        seq: Seq,
        short: bool,
        ack: Option<Seq>,
        unordered: bool,
        out: &mut [u8],
    ) -> usize {
        let mut first = TYPE_DATA;
        if unordered {
            first |= DATA_UNORDERED;
        }
        if stream != 0 {
            first |= DATA_HAS_STREAM;
        }
        if ack.is_some() {
            first |= DATA_HAS_ACK;
        }
        if short {
            first |= DATA_SHORT_SEQ;
        }
        out[0] = first;
        let mut n = 1;
        if stream != 0 {
            n += varint::write(stream, &mut out[n..]);
        }
        if short {
            // The cast keeps the low 16 bits: the point of the short form.
            out[n..n + 2].copy_from_slice(&(seq as u16).to_be_bytes());
            n += 2;
        } else {
            n += varint::write(seq, &mut out[n..]);
        }
        if let Some(ack) = ack {
            n += varint::write(ack, &mut out[n..]);
        }
        n
    }

    /// The length of a data frame's header (everything but the payload), so a sender can size its
    /// buffer without building a [`Frame`].
    ///
    /// ```
    /// use steadfast_core::frame::DataFrame;
    ///
    /// assert_eq!(DataFrame::header_len(0, 100, None), 3);
    /// assert_eq!(DataFrame::header_len(2, 100, Some(90)), 6);
    /// ```
    #[must_use]
    pub fn header_len(stream: u64, seq: Seq, ack: Option<Seq>) -> usize {
        let stream_len = if stream == 0 {
            0
        } else {
            varint::encoded_len(stream)
        };
        1 + stream_len + varint::encoded_len(seq) + ack.map_or(0, varint::encoded_len)
    }

    /// Writes a data frame's header, exactly [`DataFrame::header_len`] bytes; the payload is to be
    /// written right after it. This is the hot path: no [`Frame`] and no payload clone needed.
    pub fn encode_header<B: BufMut>(
        stream: u64,
        seq: Seq,
        ack: Option<Seq>,
        unordered: bool,
        buf: &mut B,
    ) {
        // One copy out of a header built on the stack, not one small write per field.
        let mut header = [0; Self::MAX_HEADER_LEN];
        let n = Self::write_header(stream, seq, false, ack, unordered, &mut header);
        buf.put_slice(&header[..n]);
    }
}

impl AckFrame {
    /// Checks the [`AckRanges`] invariants against `cumulative`; the decoder guarantees them, and a
    /// sender should hold to them (encoding checks them in debug builds).
    ///
    /// ```
    /// use steadfast_core::frame::{AckFrame, AckRanges, DecodeError};
    ///
    /// let mut ranges = AckRanges::new();
    /// ranges.push(12..14).unwrap();
    /// ranges.push(15..20).unwrap();
    /// let ack = AckFrame { cumulative: 10, delay_micros: 0, ranges };
    /// assert_eq!(ack.validate(), Ok(()));
    ///
    /// let mut adjacent = ack.clone();
    /// adjacent.ranges[1].start = 14;
    /// assert_eq!(adjacent.validate(), Err(DecodeError::InvalidAckRanges));
    /// ```
    pub fn validate(&self) -> Result<(), DecodeError> {
        let mut prev = self.cumulative;
        for r in &self.ranges {
            if r.start <= prev || r.end <= r.start || r.end > varint::MAX + 1 {
                return Err(DecodeError::InvalidAckRanges);
            }
            prev = r.end;
        }
        Ok(())
    }

    /// The delay as sent: the wire cannot carry more than [`varint::MAX`].
    fn wire_delay(&self) -> u64 {
        self.delay_micros.min(varint::MAX)
    }

    /// `(gap, len - 1)` of each range, as sent. Wrapping arithmetic keeps an invalid frame (a
    /// caller bug caught by `validate` in debug builds) from panicking in release builds.
    fn wire_ranges(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        let mut prev = self.cumulative;
        self.ranges.iter().map(move |r| {
            let gap = r.start.wrapping_sub(prev).wrapping_sub(1);
            let len_minus_one = r.end.wrapping_sub(r.start).wrapping_sub(1);
            prev = r.end;
            (gap, len_minus_one)
        })
    }

    fn encoded_len(&self) -> usize {
        let ranges: usize = self
            .wire_ranges()
            .map(|(gap, len)| varint::encoded_len(gap) + varint::encoded_len(len))
            .sum();
        1 + varint::encoded_len(self.cumulative)
            + varint::encoded_len(self.wire_delay())
            + varint::encoded_len(len_u64(self.ranges.len()))
            + ranges
    }

    fn encode<B: BufMut>(&self, buf: &mut B) {
        debug_assert_eq!(self.validate(), Ok(()), "encoding invalid ack ranges");
        buf.put_u8(TYPE_ACK);
        varint::encode(self.cumulative, buf);
        varint::encode(self.wire_delay(), buf);
        varint::encode(len_u64(self.ranges.len()), buf);
        for (gap, len_minus_one) in self.wire_ranges() {
            varint::encode(gap, buf);
            varint::encode(len_minus_one, buf);
        }
    }

    /// Decodes everything after the type byte.
    fn decode_body(frame: &mut Bytes) -> Result<Self, DecodeError> {
        let cumulative = varint::decode(frame)?;
        let delay_micros = varint::decode(frame)?;
        let count = varint::decode(frame)?;
        if count > len_u64(MAX_ACK_RANGES) {
            return Err(DecodeError::TooManyAckRanges);
        }
        let mut ranges = AckRanges::new();
        let mut prev = cumulative;
        for _ in 0..count {
            let gap = varint::decode(frame)?;
            let len_minus_one = varint::decode(frame)?;
            let start = prev
                .checked_add(gap)
                .and_then(|s| s.checked_add(1))
                .ok_or(DecodeError::InvalidAckRanges)?;
            let end = start
                .checked_add(len_minus_one)
                .and_then(|e| e.checked_add(1))
                .ok_or(DecodeError::InvalidAckRanges)?;
            if end > varint::MAX + 1 {
                return Err(DecodeError::InvalidAckRanges);
            }
            ranges
                .push(start..end)
                .map_err(|_| DecodeError::TooManyAckRanges)?;
            prev = end;
        }
        if !frame.is_empty() {
            return Err(DecodeError::TrailingBytes);
        }
        Ok(Self {
            cumulative,
            delay_micros,
            ranges,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec::Vec;

    fn encode(frame: &Frame) -> Vec<u8> {
        let mut buf = Vec::new();
        frame.encode(&mut buf);
        assert_eq!(buf.len(), frame.encoded_len(), "encoded_len of {frame:?}");
        buf
    }

    fn decode(bytes: &[u8]) -> Result<Frame, DecodeError> {
        Frame::decode(Bytes::copy_from_slice(bytes), &DecodeLimits::default())
    }

    #[test]
    #[cfg(target_pointer_width = "64")]
    fn a_frame_is_small_enough_to_be_moved_without_a_call_to_memcpy() {
        assert!(
            core::mem::size_of::<Frame>() <= 128,
            "{}",
            core::mem::size_of::<Frame>()
        );
    }

    fn assert_round_trips(frame: Frame) {
        let bytes = encode(&frame);
        assert_eq!(decode(&bytes), Ok(frame));
    }

    /// An ack frame with ranges given as `(start, end)` pairs.
    fn ack(cumulative: Seq, ranges: &[(Seq, Seq)]) -> AckFrame {
        AckFrame {
            cumulative,
            delay_micros: 250,
            ranges: ranges.iter().map(|&(start, end)| start..end).collect(),
        }
    }

    fn data(stream: u64, seq: Seq, ack: Option<Seq>, payload: &'static [u8]) -> Frame {
        Frame::Data(DataFrame {
            stream,
            seq,
            ack,
            unordered: seq % 2 == 1,
            payload: Bytes::from_static(payload),
        })
    }

    #[test]
    fn a_data_frame_round_trips_with_every_flag_combination() {
        for stream in [0, 1, varint::MAX] {
            for ack in [None, Some(0), Some(varint::MAX)] {
                assert_round_trips(data(stream, 42, ack, b"payload"));
            }
        }
    }

    #[test]
    fn a_data_frame_with_an_empty_payload_round_trips() {
        assert_round_trips(data(3, varint::MAX, Some(1), b""));
    }

    #[test]
    fn a_small_data_frame_on_the_default_stream_has_a_three_byte_header() {
        let payload = [0xAB; 64];
        let frame = Frame::Data(DataFrame {
            stream: 0,
            seq: (1 << 14) - 1,
            ack: None,
            unordered: false,
            payload: Bytes::copy_from_slice(&payload),
        });
        assert_eq!(DataFrame::header_len(0, (1 << 14) - 1, None), 3);
        assert_eq!(frame.encoded_len(), 64 + 3);
    }

    #[test]
    fn the_data_header_written_alone_matches_the_frame_encoding() {
        let frame = data(9, 1000, Some(990), b"abc");
        let mut header = Vec::new();
        DataFrame::encode_header(9, 1000, Some(990), false, &mut header);
        assert_eq!(header.len(), DataFrame::header_len(9, 1000, Some(990)));
        header.extend_from_slice(b"abc");
        assert_eq!(header, encode(&frame));
    }

    #[test]
    fn a_decoded_payload_shares_the_input_buffer() {
        let input = Bytes::from(encode(&data(0, 1, None, b"zero-copy")));
        let Ok(Frame::Data(d)) = Frame::decode(input.clone(), &DecodeLimits::default()) else {
            panic!("not a data frame");
        };
        assert_eq!(d.payload.as_ptr(), input[2..].as_ptr());
    }

    #[test]
    fn an_ack_without_ranges_round_trips() {
        assert_round_trips(Frame::Ack(ack(0, &[])));
        assert_round_trips(Frame::Ack(ack(varint::MAX, &[])));
    }

    #[test]
    fn an_ack_with_ranges_round_trips() {
        assert_round_trips(Frame::Ack(ack(10, &[(11, 12), (13, 20), (1000, 1001)])));
    }

    #[test]
    fn an_ack_with_the_most_ranges_round_trips() {
        let ranges: Vec<_> = (0..MAX_ACK_RANGES as u64)
            .map(|i| (2 * i + 1, 2 * i + 2))
            .collect();
        assert_round_trips(Frame::Ack(ack(0, &ranges)));
    }

    #[test]
    fn an_ack_range_may_reach_the_end_of_the_sequence_space() {
        assert_round_trips(Frame::Ack(ack(0, &[(varint::MAX, varint::MAX + 1)])));
    }

    #[test]
    fn ack_ranges_are_sent_as_gaps_and_lengths() {
        let bytes = encode(&Frame::Ack(ack(10, &[(12, 14), (15, 20)])));
        // type, cumulative, delay (250: two bytes), count, (gap 1, len-1 1), (gap 0, len-1 4)
        assert_eq!(bytes, [0x10, 10, 0x40, 250, 2, 1, 1, 0, 4]);
    }

    #[test]
    fn an_oversized_ack_delay_is_sent_as_the_largest_varint() {
        let mut frame = ack(5, &[]);
        frame.delay_micros = u64::MAX;
        let Ok(Frame::Ack(decoded)) = decode(&encode(&Frame::Ack(frame))) else {
            panic!("not an ack");
        };
        assert_eq!(decoded.delay_micros, varint::MAX);
    }

    #[test]
    fn ping_and_pong_round_trip() {
        for id in [0, 63, 64, varint::MAX] {
            assert_round_trips(Frame::Ping { id });
            assert_round_trips(Frame::Pong { id });
        }
    }

    #[test]
    fn a_close_frame_round_trips() {
        assert_round_trips(Frame::Close(CloseFrame {
            code: 7,
            reason: Bytes::from_static(b"shutting down"),
        }));
        assert_round_trips(Frame::Close(CloseFrame {
            code: varint::MAX,
            reason: Bytes::new(),
        }));
    }

    #[test]
    fn a_close_reason_at_the_limit_is_accepted() {
        let reason = [b'x'; DEFAULT_MAX_REASON_LEN];
        assert_round_trips(Frame::Close(CloseFrame {
            code: 1,
            reason: Bytes::copy_from_slice(&reason),
        }));
    }

    #[test]
    fn an_empty_frame_is_an_error() {
        assert_eq!(decode(&[]), Err(DecodeError::Empty));
    }

    #[test]
    fn an_unknown_frame_type_is_an_error() {
        assert_eq!(decode(&[0x90, 0]), Err(DecodeError::UnknownFrameType(0x90)));
    }

    #[test]
    fn an_undefined_flag_bit_is_an_unknown_frame_type() {
        assert_eq!(decode(&[0x08, 0]), Err(DecodeError::UnknownFrameType(0x08)));
        assert_eq!(decode(&[0x21, 0]), Err(DecodeError::UnknownFrameType(0x21)));
    }

    #[test]
    fn a_frame_above_the_size_limit_is_an_error() {
        let bytes = encode(&data(0, 1, None, &[0; 100]));
        let limits = DecodeLimits::new(bytes.len() - 1);
        assert_eq!(
            Frame::decode(Bytes::from(bytes), &limits),
            Err(DecodeError::FrameTooLarge { len: 102, max: 101 })
        );
    }

    #[test]
    fn a_data_frame_cut_inside_its_header_is_truncated() {
        // Stream and ack flags set, stream present, seq cut after its first byte.
        assert_eq!(decode(&[0x03, 0x05, 0x40]), Err(DecodeError::Truncated));
        assert_eq!(decode(&[0x00]), Err(DecodeError::Truncated));
    }

    #[test]
    fn every_strict_prefix_of_a_fixed_layout_frame_is_truncated() {
        let frames = [
            Frame::Ack(ack(10, &[(12, 14), (15, 20)])),
            Frame::Ping { id: 1 << 40 },
            Frame::Close(CloseFrame {
                code: 300,
                reason: Bytes::from_static(b"bye"),
            }),
        ];
        for frame in frames {
            let bytes = encode(&frame);
            for cut in 1..bytes.len() {
                assert_eq!(
                    decode(&bytes[..cut]),
                    Err(DecodeError::Truncated),
                    "{frame:?}"
                );
            }
        }
    }

    #[test]
    fn more_than_the_maximum_ack_ranges_is_an_error() {
        assert_eq!(
            decode(&[0x10, 0, 0, MAX_ACK_RANGES as u8 + 1]),
            Err(DecodeError::TooManyAckRanges)
        );
    }

    #[test]
    fn ack_ranges_beyond_the_sequence_space_are_invalid() {
        let mut bytes = alloc::vec![0x10, 0, 0, 2];
        // First range ends exactly at MAX + 1, the second would start after it.
        varint::encode(varint::MAX - 1, &mut bytes);
        varint::encode(0, &mut bytes);
        varint::encode(0, &mut bytes);
        varint::encode(0, &mut bytes);
        assert_eq!(decode(&bytes), Err(DecodeError::InvalidAckRanges));
    }

    #[test]
    fn ack_ranges_overflowing_u64_are_invalid() {
        let mut bytes = Vec::from([0x10]);
        varint::encode(varint::MAX, &mut bytes); // cumulative
        bytes.extend_from_slice(&[0, 3]); // delay, count
        for _ in 0..3 {
            varint::encode(varint::MAX, &mut bytes);
            varint::encode(varint::MAX, &mut bytes);
        }
        assert_eq!(decode(&bytes), Err(DecodeError::InvalidAckRanges));
    }

    #[test]
    fn validation_rejects_each_broken_invariant() {
        let cases: [&[(Seq, Seq)]; 6] = [
            &[(10, 12)],           // starts at the cumulative point
            &[(5, 8)],             // starts below it
            &[(12, 12)],           // empty
            &[(12, 15), (15, 17)], // adjacent
            &[(12, 15), (14, 17)], // overlapping
            &[(20, 25), (12, 15)], // out of order
        ];
        for ranges in cases {
            assert_eq!(
                ack(10, ranges).validate(),
                Err(DecodeError::InvalidAckRanges),
                "{ranges:?}"
            );
        }
        assert_eq!(
            ack(10, &[(varint::MAX, varint::MAX + 2)]).validate(),
            Err(DecodeError::InvalidAckRanges)
        );
    }

    #[test]
    fn a_close_reason_above_the_limit_is_an_error() {
        let mut bytes = alloc::vec![0x40, 1];
        varint::encode(257, &mut bytes);
        bytes.extend_from_slice(&[b'x'; 257]);
        assert_eq!(
            decode(&bytes),
            Err(DecodeError::ReasonTooLong { len: 257, max: 256 })
        );
    }

    #[test]
    fn bytes_after_a_fixed_layout_frame_are_an_error() {
        let frames = [
            Frame::Ack(ack(10, &[(12, 14)])),
            Frame::Ping { id: 1 },
            Frame::Pong { id: 1 },
            Frame::Close(CloseFrame {
                code: 1,
                reason: Bytes::from_static(b"r"),
            }),
        ];
        for frame in frames {
            let mut bytes = encode(&frame);
            bytes.push(0);
            assert_eq!(decode(&bytes), Err(DecodeError::TrailingBytes), "{frame:?}");
        }
    }

    #[test]
    fn every_error_has_a_message() {
        let errors = [
            DecodeError::Truncated,
            DecodeError::Empty,
            DecodeError::UnknownFrameType(0x50),
            DecodeError::FrameTooLarge { len: 10, max: 5 },
            DecodeError::TooManyAckRanges,
            DecodeError::InvalidAckRanges,
            DecodeError::ReasonTooLong { len: 10, max: 5 },
            DecodeError::TrailingBytes,
            DecodeError::BadPreface,
            DecodeError::UnsupportedVersion(9),
            DecodeError::ValueTooLarge,
        ];
        for e in errors {
            assert!(!alloc::format!("{e}").is_empty());
        }
        assert_eq!(
            alloc::format!("{}", DecodeError::UnknownFrameType(0x50)),
            "unknown frame type 0x50"
        );
    }

    #[test]
    fn the_default_limits_allow_a_mebibyte_payload() {
        let limits = DecodeLimits::default();
        assert_eq!(limits.max_frame_size, 1024 * 1024 + 64);
        assert_eq!(limits.max_reason_len, 256);
        assert!(DataFrame::header_len(u64::MAX >> 2, u64::MAX >> 2, Some(0)) <= 64);
    }
}
