//! How frames travel on transports: delimiting them on byte streams, and one per datagram.
//!
//! # Stream transports (TCP, TLS)
//!
//! Each direction starts with the 4-byte [`PREFACE`] (`"SFS"` and the [`VERSION`] byte), so a
//! peer that speaks something else, or another version, is caught on its first bytes. Then each
//! frame follows as a [varint] length and that many frame bytes:
//!
//! | bytes | content |
//! |-------|---------|
//! | 4 | `S F S` [`VERSION`], once per direction |
//! | 1–8 | frame length `n` (varint, `1 <= n <= max_frame_size`) |
//! | `n` | one [frame](crate::frame) |
//! | … | more length + frame pairs |
//!
//! # Datagram transports (UDP)
//!
//! One frame per datagram: the [`VERSION`] byte, a CRC-32 of the frame (big-endian), the frame.
//! There is no length: the datagram delimits the frame. UDP's own checksum is optional and weak,
//! so a flipped bit that still decoded would be delivered as data; the CRC turns corruption into
//! a dropped datagram, which retransmission already handles. It goes first so that decoding can
//! skip past it without copying or allocating.
//!
//! | bytes | content |
//! |-------|---------|
//! | 1 | [`VERSION`] |
//! | 4 | CRC-32 (IEEE) of the frame bytes |
//! | `n` | one [frame](crate::frame) |
//!
//! ```
//! use steadfast_core::frame::{DecodeLimits, Frame};
//! use steadfast_core::framing::{self, StreamDecoder};
//!
//! let mut wire = Vec::new();
//! framing::encode_preface(&mut wire);
//! framing::encode_stream_data_frame(0, 1, None, false, b"hello", &mut wire);
//! framing::encode_stream_frame(&Frame::Ping { id: 9 }, &mut wire);
//!
//! let mut decoder = StreamDecoder::new(DecodeLimits::default());
//! decoder.feed(&wire);
//! let Some(Frame::Data(data)) = decoder.next_frame()? else { panic!("expected data") };
//! assert_eq!(&data.payload[..], b"hello");
//! assert_eq!(decoder.next_frame()?, Some(Frame::Ping { id: 9 }));
//! assert_eq!(decoder.next_frame()?, None); // needs more bytes
//! # Ok::<(), steadfast_core::frame::DecodeError>(())
//! ```

use alloc::boxed::Box;
use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::Seq;
use crate::frame::{DataFrame, DecodeError, DecodeLimits, Frame};
use crate::varint;

/// The protocol version this build speaks.
pub const VERSION: u8 = 1;

/// Sent once at the start of a stream connection, in each direction.
pub const PREFACE: [u8; 4] = [b'S', b'F', b'S', VERSION];

/// A length as a wire value; lengths of real buffers always fit.
fn len_u64(len: usize) -> u64 {
    u64::try_from(len).unwrap_or(u64::MAX)
}

/// Writes the [`PREFACE`]; do it once, before the first frame of a stream connection.
pub fn encode_preface<B: BufMut>(buf: &mut B) {
    buf.put_slice(&PREFACE);
}

/// Writes `frame` for a stream transport: its length, then the frame.
///
/// The peer rejects frames longer than its [`DecodeLimits::max_frame_size`]; keep payloads within
/// the limit both ends agreed on.
pub fn encode_stream_frame<B: BufMut>(frame: &Frame, buf: &mut B) {
    varint::encode(len_u64(frame.encoded_len()), buf);
    frame.encode(buf);
}

/// The total bytes [`encode_stream_data_frame`] writes, length prefix included.
///
/// ```
/// use steadfast_core::framing;
///
/// // A 64-byte message on the default stream: 2-byte length, 3-byte header, payload.
/// assert_eq!(framing::stream_data_frame_len(0, 1000, None, 64), 2 + 3 + 64);
/// ```
#[must_use]
pub fn stream_data_frame_len(stream: u64, seq: Seq, ack: Option<Seq>, payload_len: usize) -> usize {
    let frame_len = DataFrame::header_len(stream, seq, ack) + payload_len;
    varint::encoded_len(len_u64(frame_len)) + frame_len
}

/// Writes a data frame for a stream transport straight from a payload slice: the hot path, with no
/// [`Frame`] built and nothing cloned. Writes exactly [`stream_data_frame_len`] bytes.
pub fn encode_stream_data_frame<B: BufMut>(
    stream: u64,
    seq: Seq,
    ack: Option<Seq>,
    unordered: bool,
    payload: &[u8],
    buf: &mut B,
) {
    encode_stream_data_frame_short(false, stream, seq, ack, unordered, payload, buf);
}

/// How far apart the sequence numbers written on one connection may lie for a data frame to carry
/// its number short (its low 16 bits): well inside half the 16-bit window, so the receiver's
/// expansion around any number it decoded on that connection is exact.
pub const SHORT_SEQ_SPAN: u64 = 1 << 14;

/// The sequence numbers of the data frames written on one stream connection: which frames may
/// carry a short number (see [`crate::frame`]). Start a new one for each connection.
///
/// The receiver expands a short number around the largest it decoded on the connection. The
/// sender bounds that number without trusting the stream to have delivered everything written:
/// it is at most the highest number written on the connection, and at least the lowest, or, once
/// the peer has acknowledged a number first queued after the connection began (one that can only
/// have reached it on this connection), at least that. A number is shortened only when it and
/// those bounds span less than [`SHORT_SEQ_SPAN`], so the expansion is exact whichever frames in
/// between were lost. The first data frame on a connection carries its full number.
///
/// ```
/// use steadfast_core::frame::{DecodeLimits, Frame};
/// use steadfast_core::framing::{self, StreamDecoder, WrittenSeqs};
///
/// let mut wire = Vec::new();
/// framing::encode_preface(&mut wire);
/// let mut written = WrittenSeqs::new(0);
/// for seq in [70_000, 70_001] {
///     let short = written.may_shorten(seq, 0);
///     framing::encode_stream_data_frame_short(short, 0, seq, None, false, b"m", &mut wire);
///     written.record(seq);
/// }
/// // The second: length, first byte, 2-byte number, payload.
/// assert_eq!(framing::stream_data_frame_len_short(true, 0, 70_001, None, 1), 1 + 1 + 2 + 1);
///
/// let mut decoder = StreamDecoder::new(DecodeLimits::default());
/// decoder.feed(&wire);
/// let seqs: Vec<u64> = core::iter::from_fn(|| match decoder.next_frame() {
///     Ok(Some(Frame::Data(d))) => Some(d.seq),
///     _ => None,
/// })
/// .collect();
/// assert_eq!(seqs, [70_000, 70_001]);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WrittenSeqs {
    /// Numbers from here on were first queued after the connection began.
    fresh_from: Seq,
    /// The lowest and highest number written; `lo > hi` until one has been (an `Option` of the
    /// pair would take 8 bytes more in every session).
    lo: Seq,
    hi: Seq,
}

impl WrittenSeqs {
    /// For a connection that begins when `fresh_from` is the lowest number not yet queued.
    #[must_use]
    pub fn new(fresh_from: Seq) -> Self {
        WrittenSeqs {
            fresh_from,
            lo: Seq::MAX,
            hi: 0,
        }
    }

    /// Whether a data frame numbered `seq` may carry its number short, every number below
    /// `acked_below` having been acknowledged by the peer (and whether that gains anything: below
    /// 64 the full number takes 1 byte).
    #[must_use]
    pub fn may_shorten(&self, seq: Seq, acked_below: Seq) -> bool {
        let (lo, hi) = (self.lo, self.hi);
        varint::encoded_len(seq) >= 2 && lo <= hi && {
            let lower = if acked_below > self.fresh_from {
                lo.max(acked_below - 1)
            } else {
                lo
            };
            hi.max(seq) - lower.min(seq) < SHORT_SEQ_SPAN
        }
    }

    /// Notes that a data frame numbered `seq` was written on the connection.
    pub fn record(&mut self, seq: Seq) {
        self.lo = self.lo.min(seq);
        self.hi = self.hi.max(seq);
    }
}

/// Writes a data frame for a stream transport, its sequence number short (its low 16 bits) if
/// `short`, which only [`WrittenSeqs::may_shorten`] may decide. Returns the bytes written.
pub fn encode_stream_data_frame_short<B: BufMut>(
    short: bool,
    stream: u64,
    seq: Seq,
    ack: Option<Seq>,
    unordered: bool,
    payload: &[u8],
    buf: &mut B,
) -> usize {
    let head = StreamDataHead::new(short, stream, seq, ack, unordered, payload.len());
    head.write(payload, buf);
    head.len()
}

/// A stream data frame's length prefix and header, measured before anything is written (for a
/// write budget), then written.
pub(crate) struct StreamDataHead {
    short: bool,
    stream: u64,
    seq: Seq,
    ack: Option<Seq>,
    unordered: bool,
    /// The header and the payload: the value of the length prefix.
    frame_len: usize,
    /// The bytes of the length prefix.
    prefix: usize,
}

impl StreamDataHead {
    /// The longest length prefix and header.
    const MAX_LEN: usize = 8 + DataFrame::MAX_HEADER_LEN;

    /// The head of a frame carrying `payload_len` bytes, as [`encode_stream_data_frame_short`]
    /// writes it.
    #[inline(always)]
    pub(crate) fn new(
        short: bool,
        stream: u64,
        seq: Seq,
        ack: Option<Seq>,
        unordered: bool,
        payload_len: usize,
    ) -> Self {
        let mut header_len = DataFrame::header_len(stream, seq, ack);
        if short {
            header_len = header_len - varint::encoded_len(seq) + 2;
        }
        let frame_len = header_len + payload_len;
        StreamDataHead {
            short,
            stream,
            seq,
            ack,
            unordered,
            frame_len,
            prefix: varint::encoded_len(len_u64(frame_len)),
        }
    }

    /// The whole frame's bytes on the wire, length prefix included.
    #[inline(always)]
    pub(crate) fn len(&self) -> usize {
        self.prefix + self.frame_len
    }

    /// Writes the length prefix and the header at the front of `out`; returns their length.
    #[inline(always)]
    fn fill(&self, out: &mut [u8]) -> usize {
        varint::write(len_u64(self.frame_len), out);
        self.prefix
            + DataFrame::write_header(
                self.stream,
                self.seq,
                self.short,
                self.ack,
                self.unordered,
                &mut out[self.prefix..],
            )
    }

    /// Writes the head, then `payload` (the bytes it was made for).
    pub(crate) fn write<B: BufMut>(&self, payload: &[u8], buf: &mut B) {
        let mut head = [0; Self::MAX_LEN];
        let n = self.fill(&mut head);
        buf.put_slice(&head[..n]);
        buf.put_slice(payload);
    }

    /// As [`StreamDataHead::write`], the head written in place: assembled on the stack and copied
    /// out, its bytes would be read back before they are stored, a stall on every frame.
    #[inline(always)]
    pub(crate) fn write_in_place(&self, payload: &[u8], buf: &mut BytesMut) {
        let at = buf.len();
        // A fixed-size zeroing is a few stores in line; a variable one is a call to `memset`.
        buf.extend_from_slice(&[0; Self::MAX_LEN]);
        let n = self.fill(&mut buf[at..]);
        buf.truncate(at + n);
        buf.put_slice(payload);
    }
}

/// The total bytes [`encode_stream_data_frame_short`] writes, length prefix included.
#[must_use]
pub fn stream_data_frame_len_short(
    short: bool,
    stream: u64,
    seq: Seq,
    ack: Option<Seq>,
    payload_len: usize,
) -> usize {
    StreamDataHead::new(short, stream, seq, ack, false, payload_len).len()
}

/// Cuts a byte stream from a stream transport into frames.
///
/// Feed it whatever the socket returned, then call [`StreamDecoder::next_frame`] until it returns
/// `Ok(None)`. Decoded frames are zero-copy: a chunk given to [`StreamDecoder::feed_bytes`] is cut
/// into frames in place, and their payloads share its memory, so a payload the application holds
/// keeps its chunk alive (the session's receive window bounds how many it may hold). Only a frame
/// cut across two chunks is copied, once, to make it whole.
///
/// Memory is bounded: a length prefix above [`DecodeLimits::max_frame_size`] is rejected before any
/// of the body is buffered, so once `next_frame` has returned `Ok(None)` the decoder holds less than
/// `max_frame_size + 8` bytes, and at most one `feed` more on top of that.
///
/// After an error the decoder is poisoned: it drops its buffer, ignores further input and returns
/// the same error from every call. The connection must be closed.
///
/// ```
/// use steadfast_core::frame::{DecodeError, DecodeLimits};
/// use steadfast_core::framing::StreamDecoder;
///
/// let mut decoder = StreamDecoder::new(DecodeLimits::default());
/// decoder.feed(b"GET / HTTP/1.1\r\n");
/// assert_eq!(decoder.next_frame(), Err(DecodeError::BadPreface));
/// assert_eq!(decoder.next_frame(), Err(DecodeError::BadPreface));
/// ```
#[derive(Debug)]
pub struct StreamDecoder {
    /// Made at the first frame cut across chunks: a connection whose frames all arrive whole (an
    /// idle one after its handshake) carries 8 bytes here instead of 64.
    carry: Option<Box<Carry>>,
    /// The unread rest of the last chunk fed: whole frames are cut from it without copying.
    chunk: Bytes,
    /// The largest sequence number decoded on this connection, around which short ones are
    /// expanded (see [`crate::frame`]).
    largest_seq: Option<Seq>,
    /// Whether the preface has been received and checked.
    preface_done: bool,
    limits: DecodeLimits,
    /// Set on the first error; every later call returns it.
    poisoned: Option<Box<DecodeError>>,
}

/// Where frames cut across chunks are made whole.
#[derive(Debug, Default)]
struct Carry {
    /// The rest of a frame (or preface) begun in an earlier chunk, gathered here until whole; bytes
    /// given to [`StreamDecoder::feed`] also wait here. Always before `chunk` in stream order.
    partial: BytesMut,
    /// The buffer `partial` used before, kept to be taken back once the frame cut from it is
    /// dropped: large frames that straddle reads then cost no fresh memory each (fresh pages are
    /// zeroed by the kernel, a fault per page).
    spare: BytesMut,
}

/// Checks the start of a stream against the [`PREFACE`], a byte at a time so that a wrong peer is
/// caught on its first byte; `true` once all of it is there.
fn check_preface(bytes: &[u8]) -> Result<bool, DecodeError> {
    for (i, (&got, &want)) in bytes.iter().zip(PREFACE.iter()).enumerate() {
        if got != want {
            return Err(if i + 1 == PREFACE.len() {
                DecodeError::UnsupportedVersion(got)
            } else {
                DecodeError::BadPreface
            });
        }
    }
    Ok(bytes.len() >= PREFACE.len())
}

/// Where the bytes at the front of a buffer stand.
enum Front {
    /// A whole frame: its length prefix, then `len` bytes.
    Whole { prefix: usize, len: usize },
    /// Not yet: at least this many bytes in all are needed before looking again.
    Need(usize),
}

/// What a frame cut across chunks may reserve ahead of the bytes that arrived: twice those, or the
/// whole frame, whichever is less, so a peer's length prefix alone cannot make the decoder reserve a
/// frame's worth of memory.
fn carry_reserve(have: usize, total: usize) -> usize {
    total.min(2 * have.max(1024))
}

impl StreamDecoder {
    /// A decoder at the start of a connection, expecting the [`PREFACE`] first.
    #[must_use]
    pub fn new(limits: DecodeLimits) -> Self {
        Self {
            carry: None,
            chunk: Bytes::new(),
            largest_seq: None,
            preface_done: false,
            limits,
            poisoned: None,
        }
    }

    /// Appends bytes received from the transport, copying them. Ignored once the decoder is
    /// poisoned. [`StreamDecoder::feed_bytes`] takes an owned chunk without copying.
    pub fn feed(&mut self, data: &[u8]) {
        if self.poisoned.is_none() {
            self.carry_chunk();
            self.carry().partial.extend_from_slice(data);
        }
    }

    /// Appends a chunk received from the transport; whole frames in it are cut from it in place.
    /// Ignored once the decoder is poisoned.
    pub fn feed_bytes(&mut self, data: Bytes) {
        if self.poisoned.is_none() && !data.is_empty() {
            self.carry_chunk();
            self.chunk = data;
        }
    }

    /// Moves what is left of the current chunk behind `partial`, so a new chunk can follow it.
    fn carry_chunk(&mut self) {
        if !self.chunk.is_empty() {
            let chunk = core::mem::take(&mut self.chunk);
            self.carry().partial.extend_from_slice(&chunk);
        }
    }

    fn carry(&mut self) -> &mut Carry {
        self.carry.get_or_insert_with(Box::default)
    }

    /// Bytes waiting in `carry` for the rest of their frame.
    fn carried(&self) -> usize {
        self.carry.as_ref().map_or(0, |c| c.partial.len())
    }

    /// The next complete frame, `Ok(None)` if more bytes are needed, or the error that poisoned
    /// the decoder.
    #[inline]
    pub fn next_frame(&mut self) -> Result<Option<Frame>, DecodeError> {
        match self.next_delimited()? {
            Some(frame) => self.decode(frame).map(Some),
            None => Ok(None),
        }
    }

    /// The next complete frame's bytes (after its length prefix), not yet decoded: give them to
    /// [`StreamDecoder::decode`], or a data frame's to [`StreamDecoder::decode_data`].
    ///
    /// The two steps are apart so that a caller can take a data frame's fields straight from
    /// `decode_data` into its own locals: a [`Frame`] built and moved on costs a stalled copy of
    /// its 128 bytes at every step.
    #[inline(always)]
    pub(crate) fn next_delimited(&mut self) -> Result<Option<Bytes>, DecodeError> {
        // A busy connection's every frame, in line: whole in the current chunk, with nothing
        // carried over. Anything else, errors included, is the general path's.
        if self.carried() == 0
            && self.preface_done
            && let Ok(Front::Whole { prefix, len }) = self.front(&self.chunk)
        {
            return Ok(Some(self.cut(prefix, len)));
        }
        self.next_delimited_general()
    }

    /// [`StreamDecoder::next_delimited`] for any input.
    fn next_delimited_general(&mut self) -> Result<Option<Bytes>, DecodeError> {
        if let Some(e) = self.poisoned.as_deref().copied() {
            return Err(e);
        }
        let next = self.delimit();
        if let Err(e) = &next {
            self.poison(*e);
        }
        next
    }

    /// Decodes a frame [`StreamDecoder::next_delimited`] returned.
    pub(crate) fn decode(&mut self, frame: Bytes) -> Result<Frame, DecodeError> {
        if is_data(&frame) {
            self.decode_data(frame).map(Frame::Data)
        } else {
            Frame::decode(frame, &self.limits).inspect_err(|e| self.poison(*e))
        }
    }

    /// Decodes a data frame [`StreamDecoder::next_delimited`] returned (one that passed
    /// [`is_data`]), filling in a sequence number left implicit.
    #[inline(always)]
    pub(crate) fn decode_data(&mut self, mut frame: Bytes) -> Result<DataFrame, DecodeError> {
        let first = frame.first().copied().unwrap_or_default();
        // Advanced in place: a `slice` would cost a reference count up and down.
        frame.advance(1);
        match DataFrame::decode_body(first, self.largest_seq, frame) {
            Ok(data) => {
                self.largest_seq = Some(self.largest_seq.map_or(data.seq, |l| l.max(data.seq)));
                Ok(data)
            }
            Err(e) => {
                self.poison(e);
                Err(e)
            }
        }
    }

    /// Keeps `e` for every later call and lets go of what was buffered.
    #[cold]
    fn poison(&mut self, e: DecodeError) {
        self.poisoned = Some(Box::new(e));
        self.carry = None;
        self.chunk = Bytes::new();
    }

    /// How many received bytes are held, waiting to complete a frame.
    #[must_use]
    pub fn buffered(&self) -> usize {
        self.carried() + self.chunk.len()
    }

    /// The length prefix at the front of `buf`, checked against the limits.
    #[inline(always)]
    fn front(&self, buf: &[u8]) -> Result<Front, DecodeError> {
        let (prefix, len) = match length_prefix(buf) {
            Ok(p) => p,
            Err(need) => return Ok(Front::Need(need)),
        };
        if len == 0 {
            return Err(DecodeError::Empty);
        }
        let max = self.limits.max_frame_size;
        if len > len_u64(max) {
            return Err(DecodeError::FrameTooLarge { len, max });
        }
        let len = usize::try_from(len).map_err(|_| DecodeError::ValueTooLarge)?;
        Ok(if buf.len() - prefix < len {
            Front::Need(prefix + len)
        } else {
            Front::Whole { prefix, len }
        })
    }

    /// The frame of `len` bytes after a `prefix` at the front of the chunk, cut from it.
    // Never in line: `split_to` returns its frame through memory, and a call of our own passes its
    // caller's destination down to it. In line, the frame is copied out of that memory whole just
    // after it was written field by field: a stalled load on every frame.
    #[inline(never)]
    fn cut(&mut self, prefix: usize, len: usize) -> Bytes {
        self.chunk.advance(prefix);
        if self.chunk.len() == len {
            // The chunk's last frame: let go of the chunk, so its owner can reuse the memory once
            // the payloads are dropped.
            core::mem::take(&mut self.chunk)
        } else {
            self.chunk.split_to(len)
        }
    }

    /// Gives the empty `partial` room for `additional` bytes, reusing an earlier buffer whose
    /// frames are all dropped before asking for a new one.
    fn make_room(&mut self, additional: usize) {
        let c = self.carry();
        if c.partial.try_reclaim(additional) {
            return;
        }
        core::mem::swap(&mut c.partial, &mut c.spare);
        if !c.partial.try_reclaim(additional) {
            c.partial = BytesMut::with_capacity(additional);
        }
    }

    /// Moves up to `want` bytes in all into `partial`, from the front of `chunk`.
    fn top_up(&mut self, want: usize) {
        let take = want.saturating_sub(self.carried()).min(self.chunk.len());
        let carry = self.carry.get_or_insert_with(Box::default);
        carry.partial.extend_from_slice(&self.chunk[..take]);
        if take == self.chunk.len() {
            self.chunk = Bytes::new();
        } else {
            self.chunk.advance(take);
        }
    }

    #[inline]
    fn delimit(&mut self) -> Result<Option<Bytes>, DecodeError> {
        if !self.preface_done {
            if self.carried() == 0 && self.chunk.len() >= PREFACE.len() {
                // The common case, the whole preface in the first chunk: checked in place.
                check_preface(&self.chunk[..PREFACE.len()])?;
                if self.chunk.len() == PREFACE.len() {
                    self.chunk = Bytes::new();
                } else {
                    self.chunk.advance(PREFACE.len());
                }
            } else {
                self.top_up(PREFACE.len());
                let Some(c) = &mut self.carry else {
                    return Ok(None);
                };
                if !check_preface(&c.partial)? {
                    return Ok(None);
                }
                c.partial.advance(PREFACE.len());
            }
            self.preface_done = true;
        }

        if self.carried() == 0 {
            // The hot path: a whole frame inside the chunk, cut from it without a copy.
            match self.front(&self.chunk)? {
                Front::Whole { prefix, len } => return Ok(Some(self.cut(prefix, len))),
                Front::Need(total) => {
                    if !self.chunk.is_empty() {
                        self.make_room(carry_reserve(self.chunk.len(), total));
                        self.top_up(total);
                    }
                    return Ok(None);
                }
            }
        }
        // A frame begun in an earlier chunk: complete it from this one.
        loop {
            let Some(c) = &self.carry else {
                return Ok(None);
            };
            match self.front(&c.partial)? {
                Front::Whole { prefix, len } => {
                    let Some(c) = &mut self.carry else {
                        return Ok(None);
                    };
                    c.partial.advance(prefix);
                    return Ok(Some(c.partial.split_to(len).freeze()));
                }
                Front::Need(_) if self.chunk.is_empty() => return Ok(None),
                Front::Need(total) => self.top_up(total),
            }
        }
    }
}

/// Whether a delimited `frame` is a data frame, the common case, which
/// [`StreamDecoder::decode_data`] decodes.
#[inline(always)]
pub(crate) fn is_data(frame: &[u8]) -> bool {
    frame.first().is_some_and(|first| first & !0x0f == 0)
}

/// The length prefix at the front of `buf`: how many bytes it takes and the frame length it
/// gives, or `Err(n)` while fewer than the `n` bytes it takes are there.
#[inline(always)]
pub(crate) fn length_prefix(buf: &[u8]) -> Result<(usize, u64), usize> {
    let Some(&first) = buf.first() else {
        return Err(1);
    };
    let prefix = 1usize << (first >> 6);
    buf.get(..prefix)
        .map(|bytes| (prefix, varint::read(bytes)))
        .ok_or(prefix)
}

/// Bytes a datagram spends before its frame: the version and the checksum.
pub const DATAGRAM_OVERHEAD: usize = 1 + 4;

/// Writes `frame` as a datagram: the [`VERSION`] byte, the checksum, then the frame.
pub fn encode_datagram<B: BufMut + AsMut<[u8]>>(frame: &Frame, buf: &mut B) {
    let start = begin_datagram(buf);
    frame.encode(buf);
    seal_datagram(buf, start);
}

/// Writes the version and a checksum placeholder; returns where the datagram starts.
fn begin_datagram<B: BufMut + AsMut<[u8]>>(buf: &mut B) -> usize {
    let start = buf.as_mut().len();
    // One write for the version and the placeholder: this runs for every datagram.
    let head: [u8; DATAGRAM_OVERHEAD] = [VERSION, 0, 0, 0, 0];
    buf.put_slice(&head);
    start
}

/// Fills in the checksum of the frame written since `start`.
fn seal_datagram<B: AsMut<[u8]>>(buf: &mut B, start: usize) {
    let bytes = buf.as_mut();
    let crc = crc32fast::hash(&bytes[start + DATAGRAM_OVERHEAD..]);
    bytes[start + 1..start + DATAGRAM_OVERHEAD].copy_from_slice(&crc.to_be_bytes());
}

/// Writes a data frame as a datagram straight from a payload slice, with no [`Frame`] built.
/// Writes exactly `DATAGRAM_OVERHEAD + DataFrame::header_len(stream, seq, ack) + payload.len()`
/// bytes.
pub fn encode_datagram_data_frame<B: BufMut + AsMut<[u8]>>(
    stream: u64,
    seq: Seq,
    ack: Option<Seq>,
    unordered: bool,
    payload: &[u8],
    buf: &mut B,
) {
    let start = begin_datagram(buf);
    DataFrame::encode_header(stream, seq, ack, unordered, buf);
    buf.put_slice(payload);
    seal_datagram(buf, start);
}

/// Decodes one datagram. Never panics and never allocates; a payload shares `datagram`'s memory.
///
/// The size limit applies to the frame, not counting the version byte and checksum. A datagram
/// whose frame does not match its checksum is [`DecodeError::BadChecksum`].
///
/// ```
/// use bytes::Bytes;
/// use steadfast_core::frame::{DecodeError, DecodeLimits, Frame};
/// use steadfast_core::framing;
///
/// let mut buf = Vec::new();
/// framing::encode_datagram(&Frame::Pong { id: 3 }, &mut buf);
/// let limits = DecodeLimits::default();
/// assert_eq!(framing::decode_datagram(Bytes::from(buf), &limits), Ok(Frame::Pong { id: 3 }));
/// assert_eq!(
///     framing::decode_datagram(Bytes::from_static(&[2, 0, 0, 0, 0, 0x30, 3]), &limits),
///     Err(DecodeError::UnsupportedVersion(2))
/// );
/// let mut flipped = Vec::new();
/// framing::encode_datagram(&Frame::Pong { id: 3 }, &mut flipped);
/// *flipped.last_mut().unwrap() ^= 0x01;
/// assert_eq!(
///     framing::decode_datagram(Bytes::from(flipped), &limits),
///     Err(DecodeError::BadChecksum)
/// );
/// ```
pub fn decode_datagram(mut datagram: Bytes, limits: &DecodeLimits) -> Result<Frame, DecodeError> {
    let Ok(version) = datagram.try_get_u8() else {
        return Err(DecodeError::Empty);
    };
    if version != VERSION {
        return Err(DecodeError::UnsupportedVersion(version));
    }
    let Ok(crc) = datagram.try_get_u32() else {
        return Err(DecodeError::Truncated);
    };
    if datagram.len() > limits.max_frame_size {
        return Err(DecodeError::FrameTooLarge {
            len: u64::try_from(datagram.len()).unwrap_or(u64::MAX),
            max: limits.max_frame_size,
        });
    }
    if crc32fast::hash(&datagram) != crc {
        return Err(DecodeError::BadChecksum);
    }
    Frame::decode(datagram, limits)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{AckFrame, CloseFrame};
    use alloc::vec::Vec;

    fn sample_frames() -> Vec<Frame> {
        Vec::from([
            Frame::Data(DataFrame {
                stream: 0,
                seq: 1,
                ack: None,
                unordered: false,
                payload: Bytes::from_static(b"first"),
            }),
            Frame::Ack(AckFrame {
                cumulative: 5,
                delay_micros: 100,
                ranges: [7..9, 20..21].into_iter().collect(),
            }),
            Frame::Data(DataFrame {
                stream: 4,
                seq: 70_000,
                ack: Some(3),
                unordered: false,
                payload: Bytes::from(alloc::vec![7; 300]),
            }),
            Frame::Ping { id: 1 },
            Frame::Pong { id: 1 },
            Frame::Close(CloseFrame {
                code: 2,
                reason: Bytes::from_static(b"done"),
            }),
        ])
    }

    fn stream_bytes(frames: &[Frame]) -> Vec<u8> {
        let mut wire = Vec::new();
        encode_preface(&mut wire);
        for f in frames {
            encode_stream_frame(f, &mut wire);
        }
        wire
    }

    fn drain(decoder: &mut StreamDecoder, out: &mut Vec<Frame>) {
        while let Some(frame) = decoder.next_frame().expect("valid stream") {
            out.push(frame);
        }
    }

    #[test]
    fn frames_fed_at_once_decode_in_order() {
        let frames = sample_frames();
        let mut decoder = StreamDecoder::new(DecodeLimits::default());
        decoder.feed(&stream_bytes(&frames));
        let mut out = Vec::new();
        drain(&mut decoder, &mut out);
        assert_eq!(out, frames);
        assert_eq!(decoder.buffered(), 0);
    }

    #[test]
    fn frames_fed_one_byte_at_a_time_decode_identically() {
        let frames = sample_frames();
        let mut decoder = StreamDecoder::new(DecodeLimits::default());
        let mut out = Vec::new();
        for byte in stream_bytes(&frames) {
            decoder.feed(&[byte]);
            drain(&mut decoder, &mut out);
        }
        assert_eq!(out, frames);
        assert_eq!(decoder.buffered(), 0);
    }

    #[test]
    fn a_small_data_frame_costs_a_few_bytes_of_overhead() {
        let payload = [0x55; 64];
        let mut wire = Vec::new();
        encode_stream_data_frame(0, (1 << 14) - 1, None, false, &payload, &mut wire);
        assert_eq!(
            wire.len(),
            stream_data_frame_len(0, (1 << 14) - 1, None, 64)
        );
        // 2-byte length prefix (67 > 63), then a header of at most 4 bytes.
        assert!(wire.len() <= 2 + 4 + 64, "{} bytes", wire.len());
    }

    #[test]
    fn the_data_frame_hot_path_matches_the_generic_encoding() {
        let frame = Frame::Data(DataFrame {
            stream: 3,
            seq: 1 << 20,
            ack: Some(1 << 19),
            unordered: false,
            payload: Bytes::from_static(b"same bytes"),
        });
        let mut generic = Vec::new();
        encode_stream_frame(&frame, &mut generic);
        let mut hot = Vec::new();
        encode_stream_data_frame(3, 1 << 20, Some(1 << 19), false, b"same bytes", &mut hot);
        assert_eq!(hot, generic);

        let mut generic = Vec::new();
        encode_datagram(&frame, &mut generic);
        let mut hot = Vec::new();
        encode_datagram_data_frame(3, 1 << 20, Some(1 << 19), false, b"same bytes", &mut hot);
        assert_eq!(hot, generic);
    }

    /// Data frames with these numbers, each short when [`WrittenSeqs`] allows.
    fn data_frames(seqs: &[Seq]) -> Vec<u8> {
        let mut wire = Vec::new();
        encode_preface(&mut wire);
        let mut written = WrittenSeqs::new(0);
        for &seq in seqs {
            let short = written.may_shorten(seq, 0);
            let n = encode_stream_data_frame_short(short, 0, seq, None, false, b"abc", &mut wire);
            assert_eq!(n, stream_data_frame_len_short(short, 0, seq, None, 3));
            written.record(seq);
        }
        wire
    }

    fn data_seqs(decoder: &mut StreamDecoder) -> Vec<(Seq, Bytes)> {
        let mut out = Vec::new();
        while let Some(frame) = decoder.next_frame().expect("valid stream") {
            let Frame::Data(d) = frame else {
                panic!("expected data, got {frame:?}")
            };
            out.push((d.seq, d.payload));
        }
        out
    }

    fn decoded_seqs(wire: &[u8]) -> Vec<Seq> {
        let mut decoder = StreamDecoder::new(DecodeLimits::default());
        decoder.feed_bytes(Bytes::copy_from_slice(wire));
        data_seqs(&mut decoder).iter().map(|(s, _)| *s).collect()
    }

    #[test]
    fn after_the_first_data_frame_a_connection_carries_two_byte_sequence_numbers() {
        let wire = data_frames(&[70_000, 70_001, 70_002]);
        // Preface, then 1 + (1 + 4) + 3, then twice 1 + (1 + 2) + 3.
        assert_eq!(wire.len(), 4 + 9 + 7 + 7);
        assert_eq!(decoded_seqs(&wire), [70_000, 70_001, 70_002]);
    }

    #[test]
    fn short_numbers_expand_across_the_16_bit_boundary_and_backwards() {
        let seqs = [
            65_530, 65_535, 65_536, 65_540, 65_531, 131_071, 131_072, 120_000,
        ];
        assert_eq!(decoded_seqs(&data_frames(&seqs)), seqs);
    }

    #[test]
    fn numbers_spanning_too_far_go_out_in_full() {
        let mut written = WrittenSeqs::new(0);
        assert!(
            !written.may_shorten(5000, 0),
            "the first frame carries its number"
        );
        written.record(5000);
        assert!(written.may_shorten(5000 + SHORT_SEQ_SPAN - 1, 0));
        assert!(!written.may_shorten(5000 + SHORT_SEQ_SPAN, 0));
        let seqs = [5, 5 + SHORT_SEQ_SPAN, 5 + 3 * SHORT_SEQ_SPAN, 6];
        assert_eq!(decoded_seqs(&data_frames(&seqs)), seqs);
    }

    #[test]
    fn a_long_connection_keeps_short_numbers_once_fresh_numbers_are_acknowledged() {
        // The connection began when 1000 was the next number to queue.
        let mut written = WrittenSeqs::new(1000);
        written.record(900); // a resend from before the connection
        written.record(40_000);
        // Acks of resent numbers prove nothing about this connection; of fresh ones, they do.
        assert!(!written.may_shorten(40_001, 1000));
        assert!(written.may_shorten(40_001, 30_000));
        assert!(!written.may_shorten(40_001, 20_000));
    }

    #[test]
    fn short_numbers_survive_any_chunking() {
        let wire = data_frames(&[70_000, 70_001, 70_002]);
        for cut in 1..wire.len() {
            let mut decoder = StreamDecoder::new(DecodeLimits::default());
            decoder.feed_bytes(Bytes::copy_from_slice(&wire[..cut]));
            let mut got = data_seqs(&mut decoder);
            decoder.feed_bytes(Bytes::copy_from_slice(&wire[cut..]));
            got.extend(data_seqs(&mut decoder));
            let seqs: Vec<Seq> = got.iter().map(|(s, _)| *s).collect();
            assert_eq!(seqs, [70_000, 70_001, 70_002], "cut at {cut}");
            assert_eq!(decoder.buffered(), 0);
        }
    }

    #[test]
    fn a_short_number_with_no_data_frame_before_it_is_refused() {
        let mut wire = Vec::from(PREFACE);
        // Length 4: the first byte with the N flag, two bytes of number, one payload byte.
        wire.extend_from_slice(&[4, 0x08, 0x00, 0x05, 0xAA]);
        let mut decoder = StreamDecoder::new(DecodeLimits::default());
        decoder.feed(&wire);
        assert_eq!(
            decoder.next_frame(),
            Err(DecodeError::UnknownFrameType(0x08))
        );
        // Alone, outside a stream, the flag is never valid.
        assert_eq!(
            Frame::decode(
                Bytes::from_static(&[0x08, 0x00, 0x05, 0xAA]),
                &DecodeLimits::default()
            ),
            Err(DecodeError::UnknownFrameType(0x08))
        );
    }

    #[test]
    fn frames_whole_inside_a_chunk_share_its_memory_and_a_split_one_is_copied_once() {
        let mut wire = Vec::from(PREFACE);
        encode_stream_data_frame(0, 1, None, false, &[1; 100], &mut wire);
        encode_stream_data_frame(0, 2, None, false, &[2; 100], &mut wire);
        let cut = wire.len() - 50;
        let chunk = Bytes::copy_from_slice(&wire[..cut]);
        let range = chunk.as_ptr_range();
        let mut decoder = StreamDecoder::new(DecodeLimits::default());
        decoder.feed_bytes(chunk);
        let first = data_seqs(&mut decoder);
        assert_eq!(first.len(), 1);
        assert!(
            range.contains(&first[0].1.as_ptr()),
            "zero-copy from the chunk"
        );
        assert_eq!(
            decoder.buffered(),
            stream_data_frame_len(0, 2, None, 100) - 50
        );
        decoder.feed_bytes(Bytes::copy_from_slice(&wire[cut..]));
        let second = data_seqs(&mut decoder);
        assert_eq!(second.len(), 1);
        assert_eq!(second[0].0, 2);
        assert_eq!(&second[0].1[..], &[2; 100][..]);
    }

    proptest::proptest! {
        /// Whatever the frames (data with consecutive, jumping or earlier sequence numbers, some
        /// of them lost on the way after the first, acks, pings) and however the stream is cut
        /// into chunks, zero-copy decoding yields the frames that arrived, every short sequence
        /// number expanded to the one written.
        #[test]
        fn any_chunking_of_any_frame_mix_decodes_to_the_frames_written(
            kinds in proptest::collection::vec((0u8..7, 0usize..2000), 1..60),
            cuts in proptest::collection::vec(1usize..4000, 0..20),
        ) {
            let mut wire = Vec::new();
            encode_preface(&mut wire);
            let mut expected = Vec::new();
            let mut seq = 100_000u64;
            let mut written = WrittenSeqs::new(0);
            for (kind, size) in kinds {
                match kind {
                    0 | 1 | 4 | 5 | 6 => {
                        // 1 jumps ahead, 5 goes back (a retransmission), 6 jumps past the span.
                        seq = match kind {
                            1 => seq + 7,
                            5 => seq.saturating_sub(size as u64 % 300),
                            6 => seq + SHORT_SEQ_SPAN + size as u64,
                            _ => seq + 1,
                        };
                        let payload = alloc::vec![kind; size];
                        let mut frame = Vec::new();
                        encode_stream_data_frame_short(
                            written.may_shorten(seq, 0), 0, seq, None, false, &payload, &mut frame,
                        );
                        // Kind 4 is lost on the way (never the first: the decoder needs one).
                        let lost = kind == 4 && written != WrittenSeqs::new(0);
                        written.record(seq);
                        if lost {
                            continue;
                        }
                        wire.extend_from_slice(&frame);
                        expected.push(Frame::Data(DataFrame {
                            stream: 0,
                            seq,
                            ack: None,
                            unordered: false,
                            payload: Bytes::from(payload),
                        }));
                    }
                    2 => {
                        let ack = Frame::Ack(AckFrame {
                            cumulative: size as u64,
                            delay_micros: 3,
                            ranges: Default::default(),
                        });
                        encode_stream_frame(&ack, &mut wire);
                        expected.push(ack);
                    }
                    _ => {
                        encode_stream_frame(&Frame::Ping { id: size as u64 }, &mut wire);
                        expected.push(Frame::Ping { id: size as u64 });
                    }
                }
            }
            let mut decoder = StreamDecoder::new(DecodeLimits::default());
            let mut got = Vec::new();
            let mut rest = &wire[..];
            for cut in cuts.into_iter().chain(core::iter::once(usize::MAX)) {
                let (chunk, tail) = rest.split_at(cut.min(rest.len()));
                decoder.feed_bytes(Bytes::copy_from_slice(chunk));
                drain(&mut decoder, &mut got);
                rest = tail;
            }
            proptest::prop_assert_eq!(got, expected);
            proptest::prop_assert_eq!(decoder.buffered(), 0);
        }
    }

    #[test]
    fn a_single_stream_frame_decodes_with_its_payload() {
        let mut decoder = StreamDecoder::new(DecodeLimits::default());
        decoder.feed(&stream_bytes(&sample_frames()[..1]));
        let Ok(Some(Frame::Data(d))) = decoder.next_frame() else {
            panic!("expected a data frame");
        };
        assert_eq!(&d.payload[..], b"first");
    }

    #[test]
    fn a_partial_preface_waits_for_more_bytes() {
        let mut decoder = StreamDecoder::new(DecodeLimits::default());
        decoder.feed(b"SF");
        assert_eq!(decoder.next_frame(), Ok(None));
        decoder.feed(b"S");
        assert_eq!(decoder.next_frame(), Ok(None));
        decoder.feed(&[VERSION]);
        assert_eq!(decoder.next_frame(), Ok(None));
        assert_eq!(decoder.buffered(), 0);
    }

    #[test]
    fn a_wrong_first_byte_is_a_bad_preface_at_once() {
        let mut decoder = StreamDecoder::new(DecodeLimits::default());
        decoder.feed(b"X");
        assert_eq!(decoder.next_frame(), Err(DecodeError::BadPreface));
    }

    #[test]
    fn another_version_in_the_preface_is_unsupported() {
        let mut decoder = StreamDecoder::new(DecodeLimits::default());
        decoder.feed(b"SFS\x02");
        assert_eq!(
            decoder.next_frame(),
            Err(DecodeError::UnsupportedVersion(2))
        );
    }

    #[test]
    fn a_poisoned_decoder_keeps_its_error_and_drops_input() {
        let mut decoder = StreamDecoder::new(DecodeLimits::default());
        decoder.feed(b"SFT");
        assert_eq!(decoder.next_frame(), Err(DecodeError::BadPreface));
        decoder.feed(&stream_bytes(&sample_frames()));
        assert_eq!(decoder.buffered(), 0);
        assert_eq!(decoder.next_frame(), Err(DecodeError::BadPreface));
    }

    #[test]
    fn an_oversized_length_prefix_is_rejected_before_the_body_arrives() {
        let mut decoder = StreamDecoder::new(DecodeLimits::new(1000));
        let mut wire = Vec::from(PREFACE);
        varint::encode(1001, &mut wire);
        decoder.feed(&wire);
        assert_eq!(
            decoder.next_frame(),
            Err(DecodeError::FrameTooLarge {
                len: 1001,
                max: 1000
            })
        );
        assert_eq!(decoder.buffered(), 0);
    }

    #[test]
    fn a_frame_of_exactly_the_size_limit_is_accepted() {
        let payload = [1; 997];
        let mut wire = Vec::from(PREFACE);
        encode_stream_data_frame(0, 1, None, false, &payload, &mut wire);
        let mut decoder = StreamDecoder::new(DecodeLimits::new(1000));
        decoder.feed(&wire);
        assert!(matches!(decoder.next_frame(), Ok(Some(Frame::Data(_)))));
    }

    #[test]
    fn a_zero_length_stream_frame_is_empty() {
        let mut decoder = StreamDecoder::new(DecodeLimits::default());
        decoder.feed(&PREFACE);
        decoder.feed(&[0]);
        assert_eq!(decoder.next_frame(), Err(DecodeError::Empty));
    }

    #[test]
    fn a_malformed_frame_inside_a_stream_poisons_the_decoder() {
        let mut decoder = StreamDecoder::new(DecodeLimits::default());
        decoder.feed(&PREFACE);
        decoder.feed(&[2, 0x7F, 0]);
        assert_eq!(
            decoder.next_frame(),
            Err(DecodeError::UnknownFrameType(0x7F))
        );
        assert_eq!(
            decoder.next_frame(),
            Err(DecodeError::UnknownFrameType(0x7F))
        );
    }

    #[test]
    fn a_partial_length_prefix_waits_for_more_bytes() {
        let mut decoder = StreamDecoder::new(DecodeLimits::default());
        decoder.feed(&PREFACE);
        decoder.feed(&[0x40]);
        assert_eq!(decoder.next_frame(), Ok(None));
        assert_eq!(decoder.buffered(), 1);
    }

    #[test]
    fn every_frame_kind_round_trips_as_a_datagram() {
        for frame in sample_frames() {
            let mut buf = Vec::new();
            encode_datagram(&frame, &mut buf);
            assert_eq!(buf.len(), DATAGRAM_OVERHEAD + frame.encoded_len());
            assert_eq!(
                decode_datagram(Bytes::from(buf), &DecodeLimits::default()),
                Ok(frame)
            );
        }
    }

    #[test]
    fn an_empty_datagram_is_empty_and_one_cut_inside_its_checksum_is_truncated() {
        let limits = DecodeLimits::default();
        assert_eq!(
            decode_datagram(Bytes::new(), &limits),
            Err(DecodeError::Empty)
        );
        assert_eq!(
            decode_datagram(Bytes::from_static(&[VERSION, 0, 0]), &limits),
            Err(DecodeError::Truncated)
        );
        let empty_frame_crc = crc32fast::hash(&[]).to_be_bytes();
        let mut no_frame = alloc::vec![VERSION];
        no_frame.extend_from_slice(&empty_frame_crc);
        assert_eq!(
            decode_datagram(Bytes::from(no_frame), &limits),
            Err(DecodeError::Empty)
        );
    }

    #[test]
    fn every_single_bit_flip_in_a_datagram_is_caught() {
        let mut clean = Vec::new();
        encode_datagram_data_frame(3, 77, Some(70), false, b"payload bytes", &mut clean);
        for bit in 0..clean.len() * 8 {
            let mut bad = clean.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            let got = decode_datagram(Bytes::from(bad), &DecodeLimits::default());
            assert!(
                matches!(
                    got,
                    Err(DecodeError::BadChecksum | DecodeError::UnsupportedVersion(_))
                ),
                "bit {bit}: {got:?}"
            );
        }
    }

    #[test]
    fn a_truncated_datagram_fails_its_checksum() {
        let mut clean = Vec::new();
        encode_datagram_data_frame(0, 1, None, false, b"0123456789", &mut clean);
        for len in DATAGRAM_OVERHEAD..clean.len() {
            let cut = Bytes::copy_from_slice(&clean[..len]);
            assert_ne!(
                decode_datagram(cut, &DecodeLimits::default())
                    .ok()
                    .map(|_| ()),
                Some(()),
                "cut at {len}"
            );
        }
    }

    #[test]
    fn a_datagram_of_another_version_is_unsupported() {
        assert_eq!(
            decode_datagram(
                Bytes::from_static(&[0, 0, 0, 0, 0, 0x20, 0]),
                &DecodeLimits::default()
            ),
            Err(DecodeError::UnsupportedVersion(0))
        );
    }

    #[test]
    fn an_oversized_datagram_is_too_large() {
        let mut buf = Vec::new();
        encode_datagram_data_frame(0, 1, None, false, &[0; 100], &mut buf);
        assert_eq!(
            decode_datagram(Bytes::from(buf), &DecodeLimits::new(50)),
            Err(DecodeError::FrameTooLarge { len: 102, max: 50 })
        );
    }
}
