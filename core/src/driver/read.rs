//! Reading a connection's byte stream in chunks cut where its frames end.
//!
//! The core's stream decoder takes the stream cut anywhere, but a frame cut across two chunks must be
//! copied to be made whole. For large frames that copy, into fresh memory the kernel must fault in
//! and zero, was about 40% of a receiving connection's time at 64 KiB payloads. So the reader
//! follows the framing itself (the preface, then each frame's length prefix) and reads a large frame
//! into a buffer of the frame's own size, handing the core whole large frames that it cuts without a
//! copy. Small frames are read many at a time into two buffers used in turn, as before.
//!
//! The decoder stays the judge of what is valid: the reader only chooses where to cut, and hands on
//! every byte it read, in order, whatever it makes of them. Its memory is bounded like the decoder's:
//! a frame gets a buffer of its own only up to the decoder's frame limit, and only once half of it
//! has arrived or a frame of that size has been read whole before.

use alloc::vec::Vec;
use bytes::{Bytes, BytesMut};
use core::task::{Context, Poll};
use std::io;

use super::Io;
use super::shared::Recycler;
use super::sync::Arc;
use crate::framing::PREFACE;

/// Bytes read per call for small frames: large enough that a saturated link costs few syscalls.
const READ_CHUNK: usize = 64 * 1024;

/// The most bytes read per call, on a connection whose reads keep filling the room they are given.
/// A receiver acks once per read, so on a busy link larger reads mean fewer acks, and fewer
/// wake-ups for the sender to process them.
const READ_MAX: usize = 256 * 1024;

/// A read of at least this many bytes of small frames means a busy link: the read room is not
/// taken back, and an application woken by the read is let run (see [`ReadBuf::busy`]).
const BUSY: usize = READ_CHUNK / 4;

/// Frames of at least this many bytes (length prefix included) are read into a buffer of their own.
const LARGE: usize = 16 * 1024;

/// Where the bytes read so far leave the stream's framing.
#[derive(Debug)]
struct Boundary {
    /// Bytes of the preface or of a frame still to come before the next length prefix.
    skip: usize,
    /// A length prefix cut across reads, gathered until whole.
    prefix: [u8; 8],
    prefix_len: usize,
    /// The whole length (prefix included) of the frame being read.
    total: usize,
    /// The whole length of the last frame read to its end.
    last_total: usize,
}

/// A frame the bytes just followed end inside, its length prefix among them.
#[derive(Debug, Clone, Copy)]
struct Open {
    /// Where its length prefix starts, counted from the start of those bytes.
    start: usize,
    /// Its whole length, prefix included.
    total: usize,
}

impl Boundary {
    fn new() -> Self {
        Boundary {
            skip: PREFACE.len(),
            prefix: [0; 8],
            prefix_len: 0,
            total: 0,
            last_total: 0,
        }
    }

    /// Between two frames, or after the preface: the next byte starts a length prefix.
    fn between_frames(&self) -> bool {
        self.skip == 0 && self.prefix_len == 0
    }

    /// Just past a frame.
    fn at_frame_start(&self) -> bool {
        self.between_frames() && self.total != 0
    }

    /// Follows `bytes`, the stream's next bytes; returns the frame they end inside when its whole
    /// length prefix is among them.
    fn follow(&mut self, bytes: &[u8]) -> Option<Open> {
        let mut at = 0;
        let mut open = None;
        loop {
            if self.skip == 0 && self.prefix_len == 0 {
                at = self.step_whole_frames(bytes, at);
            }
            let left = bytes.len() - at;
            if self.skip >= left {
                self.skip -= left;
                if self.skip == 0 && self.total != 0 {
                    self.last_total = self.total;
                    open = None;
                }
                return open;
            }
            if self.skip > 0 {
                // The rest of a frame begun earlier: past it, the fast path takes over again.
                at += self.skip;
                if self.total != 0 {
                    self.last_total = self.total;
                }
                self.skip = 0;
                open = None;
                continue;
            }
            // At a length prefix, perhaps begun in an earlier read.
            let start = at;
            let first = if self.prefix_len > 0 {
                self.prefix[0]
            } else {
                bytes[at]
            };
            let need = 1usize << (first >> 6);
            let take = (need - self.prefix_len).min(bytes.len() - at);
            self.prefix[self.prefix_len..self.prefix_len + take]
                .copy_from_slice(&bytes[at..at + take]);
            let began_here = self.prefix_len == 0;
            self.prefix_len += take;
            at += take;
            if self.prefix_len < need {
                return None;
            }
            self.prefix_len = 0;
            // A prefix the decoder will refuse: what follows is its business, not the reader's.
            let len = usize::try_from(crate::varint::read(&self.prefix[..need]))
                .unwrap_or(usize::MAX - 8);
            self.total = need + len;
            self.skip = len;
            if began_here {
                open = Some(Open {
                    start,
                    total: self.total,
                });
            }
            if self.skip == 0 {
                // An empty frame: the decoder refuses it; keep following anyway.
                self.last_total = self.total;
                open = None;
            }
        }
    }
}

impl Boundary {
    /// Steps over the whole frames in `bytes` from `at`, a frame's start, reading each length
    /// prefix in place: a saturated link of small frames has hundreds per read. Stops at the first
    /// frame that is not all there (or is empty), for [`Boundary::follow`] to take from there.
    fn step_whole_frames(&mut self, bytes: &[u8], mut at: usize) -> usize {
        while let Ok((need, len)) =
            crate::framing::length_prefix(bytes.get(at..).unwrap_or_default())
        {
            let Ok(len) = usize::try_from(len) else {
                break;
            };
            if len == 0 || len > bytes.len() - at - need {
                break;
            }
            self.total = need + len;
            self.last_total = self.total;
            at += self.total;
        }
        at
    }
}

/// Where a connection's reads land.
///
/// Each chunk handed on is frozen and zero-copy: the payloads of its frames keep its buffer alive
/// until the application drops them, so a buffer cannot be refilled in place while they live.
/// Small frames are read into two buffers in turn, each taken back once its payloads are gone;
/// large frames into buffers of their own size, lent out and handed back through a [`Recycler`].
pub(crate) struct ReadBuf {
    /// Small frames land here: room kept zero-filled, so that reads stay safe code.
    current: BytesMut,
    /// The previous buffer, waiting for its last payload to be dropped.
    spare: BytesMut,
    /// A large frame, or a read expected to be one, gathered in a buffer of its own.
    gather: Option<Gather>,
    framing: Boundary,
    /// The room `current` gets at its next refill: [`READ_CHUNK`], doubled up to [`READ_MAX`] after
    /// each read that filled all the room it had, and back to `READ_CHUNK` after one of fewer than
    /// [`BUSY`] bytes.
    room: usize,
    /// The decoder's limit on a frame's length (prefix excluded).
    max_frame: usize,
    recycler: Arc<Recycler>,
    /// The last read brought at least [`BUSY`] bytes of small frames.
    busy: bool,
}

/// A buffer being filled with one large frame.
struct Gather {
    buf: Vec<u8>,
    /// Bytes read into it.
    filled: usize,
    /// Where reads into it stop: the frame's end once its length is known, until then the size
    /// the frame is expected to have.
    end: usize,
    /// Whether `end` is the frame's known end.
    known: bool,
}

impl ReadBuf {
    /// A reader for a connection whose decoder refuses frames longer than `max_frame`; its large
    /// buffers come home to `recycler`.
    pub(crate) fn new(max_frame: usize, recycler: Arc<Recycler>) -> Self {
        ReadBuf {
            current: BytesMut::new(),
            spare: BytesMut::new(),
            gather: None,
            framing: Boundary::new(),
            room: READ_CHUNK,
            max_frame,
            recycler,
            busy: false,
        }
    }

    /// Starts over for a new connection, whose stream begins again with the preface.
    pub(crate) fn reset(&mut self) {
        self.current.clear();
        self.gather = None;
        self.framing = Boundary::new();
        self.room = READ_CHUNK;
        self.busy = false;
    }

    /// Whether the last read brought at least [`BUSY`] bytes of small frames: a busy link, where
    /// more are likely waiting. (A large frame fills the buffer of its own size whether or not
    /// more follow.)
    pub(crate) fn busy(&self) -> bool {
        self.busy
    }

    /// Whether `open` gets a buffer of its own.
    fn is_large(&self, open: Open) -> bool {
        open.total >= LARGE && open.total - 8 <= self.max_frame
    }

    /// Where the next read lands.
    fn target(&mut self) -> &mut [u8] {
        let last = self.framing.last_total;
        if self.gather.is_none() && last >= LARGE && self.framing.at_frame_start() {
            // Exactly one frame of the last one's size: if that is its size, it arrives whole.
            self.gather = Some(Gather {
                buf: self.recycler.take(last),
                filled: 0,
                end: last,
                known: false,
            });
        }
        if self.gather.is_none() && self.current.len() < READ_CHUNK / 4 {
            self.refill();
        }
        match &mut self.gather {
            Some(g) => &mut g.buf[g.filled..g.end],
            None => &mut self.current[..],
        }
    }

    /// Gives `current` a full read's zero-filled room, reusing memory whose payloads are gone.
    fn refill(&mut self) {
        let room = self.room;
        if !reuse(&mut self.current, room) {
            core::mem::swap(&mut self.current, &mut self.spare);
            if !reuse(&mut self.current, room) {
                // Both still referenced, or sized for another room: a new buffer; an older one
                // is left to its payloads.
                self.current = BytesMut::with_capacity(room);
            }
        }
        self.current.resize(room, 0);
    }

    /// Takes in `n` bytes just read; returns what to hand the core now (empty while a large frame
    /// is still being gathered).
    fn filled(&mut self, n: usize) -> Bytes {
        self.busy = false;
        let Some(mut g) = self.gather.take() else {
            self.busy = n >= BUSY;
            if n == self.current.len() {
                self.room = (2 * self.room).min(READ_MAX);
            } else if !self.busy {
                self.room = READ_CHUNK;
            }
            let open = self.framing.follow(&self.current[..n]);
            let chunk = self.current.split_to(n).freeze();
            return match open {
                Some(open) => self.hold(open, chunk, 0),
                None => chunk,
            };
        };
        let begin = g.filled;
        g.filled += n;
        let open = self.framing.follow(&g.buf[begin..g.filled]);
        if self.framing.between_frames() {
            return Recycler::lend(&self.recycler, g.buf, g.filled);
        }
        match open {
            Some(o) if begin + o.start == 0 && self.is_large(o) && o.total <= g.buf.len() => {
                // The frame it was read for: gather the rest of it in place.
                g.end = o.total;
                g.known = true;
                self.gather = Some(g);
                Bytes::new()
            }
            None if g.known => {
                self.gather = Some(g);
                Bytes::new()
            }
            Some(o) => {
                let filled = g.filled;
                let chunk = Recycler::lend(&self.recycler, g.buf, filled);
                self.hold(o, chunk, begin)
            }
            None => Recycler::lend(&self.recycler, g.buf, g.filled),
        }
    }

    /// `chunk` ends inside `open`, which began `offset + open.start` bytes into it: hands on the
    /// frames before it, and moves its start into a buffer of its size if it is large and half of it
    /// is here (the decoder's own bound on what a length prefix may make it reserve).
    fn hold(&mut self, open: Open, chunk: Bytes, offset: usize) -> Bytes {
        let start = offset + open.start;
        let head = chunk.len() - start;
        if !self.is_large(open) || 2 * head < open.total {
            return chunk;
        }
        let mut buf = self.recycler.take(open.total);
        buf[..head].copy_from_slice(&chunk[start..]);
        self.gather = Some(Gather {
            buf,
            filled: head,
            end: open.total,
            known: true,
        });
        chunk.slice(..start)
    }
}

/// Empties `buf` for `room` bytes of reading if its memory is free again and of about that size;
/// memory sized for a larger room than reads now get is let go.
fn reuse(buf: &mut BytesMut, room: usize) -> bool {
    buf.clear();
    if !buf.try_reclaim(room) {
        return false;
    }
    if buf.capacity() > 2 * room {
        *buf = BytesMut::new();
        return false;
    }
    true
}

/// Reads once from `io` into `buf`. Returns the bytes to hand the core as a frozen, zero-copy chunk,
/// which is empty when all that was read is held back to complete a large frame; `Ready(None)` is
/// the end of the stream.
pub(crate) fn poll_read_chunk<S: Io>(
    io: &mut S,
    cx: &mut Context<'_>,
    buf: &mut ReadBuf,
) -> Poll<io::Result<Option<Bytes>>> {
    match io.poll_read(cx, buf.target()) {
        Poll::Ready(Ok(0)) => Poll::Ready(Ok(None)),
        Poll::Ready(Ok(n)) => Poll::Ready(Ok(Some(buf.filled(n)))),
        Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
        Poll::Pending => Poll::Pending,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::DecodeLimits;
    use crate::framing::{StreamDecoder, encode_preface, encode_stream_data_frame};
    use alloc::vec::Vec;
    use proptest::prelude::*;

    /// A stream that gives at most `cuts[i]` bytes on its i-th read (the last cut repeats).
    struct Scripted {
        wire: Vec<u8>,
        at: usize,
        cuts: Vec<usize>,
        reads: usize,
    }

    impl Io for Scripted {
        fn poll_read(&mut self, _: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
            let cut = self.cuts[self.reads.min(self.cuts.len() - 1)];
            self.reads += 1;
            let n = cut.min(buf.len()).min(self.wire.len() - self.at);
            buf[..n].copy_from_slice(&self.wire[self.at..self.at + n]);
            self.at += n;
            Poll::Ready(Ok(n))
        }
        fn poll_write(&mut self, _: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_shutdown(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    fn wire(sizes: &[usize]) -> Vec<u8> {
        let mut wire = BytesMut::new();
        encode_preface(&mut wire);
        for (seq, &size) in sizes.iter().enumerate() {
            let payload = alloc::vec![seq as u8; size];
            encode_stream_data_frame(0, seq as u64, None, false, &payload, &mut wire);
        }
        wire.to_vec()
    }

    /// Reads the whole stream; returns the chunks handed on, empty ones left out.
    fn read_all(wire: Vec<u8>, cuts: Vec<usize>, max_frame: usize) -> Vec<Bytes> {
        let mut io = Scripted {
            wire,
            at: 0,
            cuts,
            reads: 0,
        };
        let mut buf = ReadBuf::new(max_frame, Recycler::new());
        let mut cx = Context::from_waker(core::task::Waker::noop());
        let mut chunks = Vec::new();
        loop {
            match poll_read_chunk(&mut io, &mut cx, &mut buf) {
                Poll::Ready(Ok(Some(chunk))) if chunk.is_empty() => {}
                Poll::Ready(Ok(Some(chunk))) => chunks.push(chunk),
                Poll::Ready(Ok(None)) => return chunks,
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    #[test]
    fn large_frames_of_one_size_arrive_whole_after_the_first() {
        let sizes = [65_536; 20];
        let chunks = read_all(wire(&sizes), alloc::vec![usize::MAX], 1 << 20);
        let mut decoder = StreamDecoder::new(DecodeLimits::default());
        let mut frames = 0;
        for (i, chunk) in chunks.into_iter().enumerate() {
            decoder.feed_bytes(chunk);
            while decoder.next_frame().expect("valid").is_some() {
                frames += 1;
            }
            // Past the first two reads, every chunk ends where a frame ends: nothing to reassemble.
            if i >= 2 {
                assert_eq!(decoder.buffered(), 0, "chunk {i} left a partial frame");
            }
        }
        assert_eq!(frames, sizes.len());
    }

    #[test]
    fn large_frames_whose_payloads_are_dropped_are_read_into_the_same_memory_again() {
        let mut io = Scripted {
            wire: wire(&[65_536; 30]),
            at: 0,
            cuts: alloc::vec![usize::MAX],
            reads: 0,
        };
        let recycler = Recycler::new();
        let mut buf = ReadBuf::new(1 << 20, recycler.clone());
        let mut cx = Context::from_waker(core::task::Waker::noop());
        let mut whole = 0;
        while let Poll::Ready(Ok(Some(chunk))) = poll_read_chunk(&mut io, &mut cx, &mut buf) {
            // The application is done with each frame at once.
            whole += usize::from(chunk.len() > 65_536);
        }
        assert!(whole >= 28, "{whole} frames read whole");
        // The first buffer went round and round: each frame did not need one of its own.
        let (_, made) = recycler.counts();
        assert!(made <= 2, "{made} buffers made for 30 frames");
    }

    #[test]
    fn a_large_frame_read_in_small_pieces_is_still_handed_on_whole() {
        let sizes = [100, 40_000, 40_000, 100];
        let chunks = read_all(wire(&sizes), alloc::vec![100_000, 1_000], 1 << 20);
        let lens: Vec<usize> = chunks.iter().map(Bytes::len).collect();
        // The first read takes everything the first 100 000 bytes hold; the second frame's rest,
        // read 1 000 bytes at a time, is handed on only when whole, with none of the next frame.
        let whole = 3 + 2 + 1 + 40_000;
        assert!(lens.contains(&whole), "chunks {lens:?}");
    }

    #[test]
    fn a_length_prefix_alone_reserves_no_frame_sized_buffer() {
        // A peer announces a frame of almost 1 MiB and sends 100 bytes of it.
        let mut wire = PREFACE.to_vec();
        let mut prefix = BytesMut::new();
        crate::varint::encode(1_000_000, &mut prefix);
        wire.extend_from_slice(&prefix);
        wire.extend_from_slice(&[0; 100]);
        let mut io = Scripted {
            wire,
            at: 0,
            cuts: alloc::vec![usize::MAX],
            reads: 0,
        };
        let mut buf = ReadBuf::new(1 << 20, Recycler::new());
        let mut cx = Context::from_waker(core::task::Waker::noop());
        let Poll::Ready(Ok(Some(chunk))) = poll_read_chunk(&mut io, &mut cx, &mut buf) else {
            panic!("a chunk");
        };
        // Handed on for the decoder to bound, not held in a buffer of the announced size.
        assert_eq!(chunk.len(), 4 + 4 + 100);
        assert!(buf.current.capacity() <= READ_CHUNK);
        assert!(buf.gather.is_none());
    }

    /// The length of each chunk handed on, in order, for a stream of frames of `sizes` cut by `cuts`.
    fn chunk_lens(sizes: &[usize], cuts: Vec<usize>) -> Vec<usize> {
        read_all(wire(sizes), cuts, 1 << 20)
            .iter()
            .map(Bytes::len)
            .collect()
    }

    #[test]
    fn reads_that_fill_their_room_grow_to_a_quarter_mebibyte_and_no_more() {
        // 2 MiB of small frames, every read taking all it is given.
        let lens = chunk_lens(&[100; 20_000], alloc::vec![usize::MAX]);
        assert!(lens[0] <= READ_CHUNK, "the first read is the usual size");
        assert!(
            lens.contains(&READ_MAX),
            "a busy link reads more at a time: {lens:?}"
        );
        assert!(lens.iter().all(|&n| n <= READ_MAX));
    }

    /// Reads `wire` cut by `cuts`; returns, per chunk handed on, whether the reader then called
    /// the link busy.
    fn busy_after_each_read(wire: Vec<u8>, cuts: Vec<usize>) -> Vec<bool> {
        let mut io = Scripted {
            wire,
            at: 0,
            cuts,
            reads: 0,
        };
        let mut buf = ReadBuf::new(1 << 20, Recycler::new());
        let mut cx = Context::from_waker(core::task::Waker::noop());
        let mut waiting = Vec::new();
        loop {
            match poll_read_chunk(&mut io, &mut cx, &mut buf) {
                Poll::Ready(Ok(Some(chunk))) if chunk.is_empty() => {}
                Poll::Ready(Ok(Some(_))) => waiting.push(buf.busy()),
                Poll::Ready(Ok(None)) => return waiting,
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    #[test]
    fn only_reads_of_many_small_frames_call_the_link_busy() {
        // Small frames read 20 000 bytes at a time, then the last 900.
        let busy = busy_after_each_read(wire(&[100; 200]), alloc::vec![20_000]);
        assert_eq!(busy.len(), 2, "{busy:?}");
        assert_eq!(busy, [true, false], "the stream's tail came in short");
        // The same frames trickling in: no read is large enough.
        let trickle = busy_after_each_read(wire(&[100; 200]), alloc::vec![1_000]);
        assert!(trickle.iter().all(|&w| !w), "{trickle:?}");
        // Large frames each fill the buffer of their own size, more following or not.
        let large = busy_after_each_read(wire(&[65_536; 8]), alloc::vec![usize::MAX]);
        assert!(large.iter().skip(1).all(|&w| !w), "{large:?}");
    }

    #[test]
    fn reads_that_come_in_short_fall_back_to_the_usual_room() {
        // Four full reads grow the room; then the peer trickles 1 000 bytes at a time.
        let mut cuts = alloc::vec![usize::MAX; 4];
        cuts.push(1_000);
        let mut io = Scripted {
            wire: wire(&[100; 20_000]),
            at: 0,
            cuts,
            reads: 0,
        };
        let mut buf = ReadBuf::new(1 << 20, Recycler::new());
        let mut cx = Context::from_waker(core::task::Waker::noop());
        let mut read = |buf: &mut ReadBuf| {
            let Poll::Ready(Ok(Some(_))) = poll_read_chunk(&mut io, &mut cx, buf) else {
                panic!("a chunk");
            };
        };
        for _ in 0..5 {
            read(&mut buf);
        }
        assert!(
            buf.current.capacity() > READ_CHUNK,
            "the full reads grew the room"
        );
        assert_eq!(buf.room, READ_CHUNK, "a short read shrinks it back");
        // The large buffer serves until its room runs out, then goes: 1 000 reads is 1 MB.
        let mut reads = 0;
        while buf.current.capacity() > READ_CHUNK || buf.spare.capacity() > READ_CHUNK {
            read(&mut buf);
            reads += 1;
            assert!(reads < 1_000, "the large buffers are let go");
        }
    }

    proptest! {
        #[test]
        fn every_byte_is_handed_on_once_in_order_however_the_reads_cut(
            sizes in proptest::collection::vec(
                prop_oneof![0usize..200, 15_000usize..70_000], 1..12),
            cuts in proptest::collection::vec(1usize..80_000, 1..8),
            garbage in any::<bool>(),
        ) {
            let mut wire = wire(&sizes);
            if garbage {
                // Bytes the decoder will refuse: the reader must pass them on all the same.
                let at = wire.len() / 2;
                wire[at] ^= 0xc0;
            }
            let chunks = read_all(wire.clone(), cuts, 1 << 20);
            let mut got = Vec::new();
            for chunk in &chunks {
                got.extend_from_slice(chunk);
            }
            prop_assert_eq!(got, wire);
        }
    }
}
