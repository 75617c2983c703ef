//! Unreliable delivery: at-most-once messages, plain or sequenced (newest wins per stream).
//!
//! These messages never enter the reliable sequence space: a lost one is simply gone, so it must not
//! leave a gap that would stall the reliable watermark. They get numbers from a sequence space of
//! their own, used only to refuse duplicates (an anti-replay window, as DTLS and IPsec keep) and, for
//! sequenced streams, to drop anything older than what was already delivered.
//!
//! | mode | guarantee |
//! |---|---|
//! | unreliable | at most once, in any order; lost while disconnected or past the queue bound |
//! | sequenced | at most once, and never an older message after a newer one on the same stream; while queued, only the newest per stream is kept |

use alloc::collections::{BTreeMap, VecDeque};

use bytes::Bytes;

/// Arrivals more than this far below the newest one are refused: they may be replays.
pub const REPLAY_WINDOW: u64 = 64;

/// How many sequenced streams the receiver tracks; past this the stalest is forgotten, and its last
/// number becomes a floor for every untracked stream (so forgetting can drop, never reorder).
pub const MAX_SEQUENCED_STREAMS: usize = 256;

/// One queued unreliable message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Queued {
    /// Its stream.
    pub stream: u64,
    /// Whether it is sequenced (newest wins).
    pub sequenced: bool,
    /// Its payload.
    pub payload: Bytes,
}

/// The sending half: a bounded queue that drops its oldest entry when full (loss is allowed).
#[derive(Debug)]
pub struct UnreliableSender {
    queue: VecDeque<Queued>,
    bytes: usize,
    max_messages: usize,
    max_bytes: usize,
    next_seq: u64,
    dropped: u64,
}

impl UnreliableSender {
    /// A queue holding at most `max_messages` messages and `max_bytes` payload bytes.
    pub fn new(max_messages: usize, max_bytes: usize) -> Self {
        UnreliableSender {
            queue: VecDeque::new(),
            bytes: 0,
            max_messages,
            max_bytes,
            next_seq: 0,
            dropped: 0,
        }
    }

    /// Queues a message. A sequenced message replaces a queued one of its stream; when the queue is
    /// full, the oldest messages are dropped to make room.
    pub fn push(&mut self, stream: u64, sequenced: bool, payload: Bytes) {
        if sequenced
            && let Some(q) = self
                .queue
                .iter_mut()
                .find(|q| q.sequenced && q.stream == stream)
        {
            self.bytes = self.bytes - q.payload.len() + payload.len();
            q.payload = payload;
            self.dropped += 1;
            self.shed();
            return;
        }
        self.bytes += payload.len();
        self.queue.push_back(Queued {
            stream,
            sequenced,
            payload,
        });
        self.shed();
    }

    /// Drops the oldest until within bounds (a message larger than the byte bound drops itself).
    fn shed(&mut self) {
        while self.queue.len() > self.max_messages || self.bytes > self.max_bytes {
            match self.queue.pop_front() {
                Some(q) => {
                    self.bytes -= q.payload.len();
                    self.dropped += 1;
                }
                None => break,
            }
        }
    }

    /// The next message to send, with its number; it leaves the queue.
    pub fn pop(&mut self) -> Option<(u64, Queued)> {
        let q = self.queue.pop_front()?;
        self.bytes -= q.payload.len();
        let seq = self.next_seq;
        self.next_seq += 1;
        Some((seq, q))
    }

    /// The next message's stream and payload size, without taking it.
    pub fn peek(&self) -> Option<&Queued> {
        self.queue.front()
    }

    /// Messages waiting.
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Messages dropped by the bounds or replaced by a newer sequenced one.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }
}

/// The receiving half: refuses duplicates and, on sequenced streams, anything older than delivered.
#[derive(Debug, Default)]
pub struct UnreliableReceiver {
    /// The newest number seen, and a bitmap of the [`REPLAY_WINDOW`] numbers at and below it.
    newest: Option<u64>,
    seen: u64,
    /// Per sequenced stream, the newest number delivered.
    sequenced: BTreeMap<u64, u64>,
    /// Untracked sequenced streams deliver only above this.
    floor: Option<u64>,
}

impl UnreliableReceiver {
    /// An empty receiver.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether a message numbered `seq` on `stream` is to be delivered; records it if so.
    pub fn accept(&mut self, stream: u64, seq: u64, sequenced: bool) -> bool {
        if !self.fresh(seq) {
            return false;
        }
        if sequenced {
            let last = self.sequenced.get(&stream).copied().or(self.floor);
            if last.is_some_and(|l| seq <= l) {
                self.record(seq);
                return false;
            }
            if !self.sequenced.contains_key(&stream)
                && self.sequenced.len() >= MAX_SEQUENCED_STREAMS
            {
                self.forget_stalest();
            }
            self.sequenced.insert(stream, seq);
        }
        self.record(seq);
        true
    }

    fn fresh(&self, seq: u64) -> bool {
        match self.newest {
            None => true,
            Some(n) if seq > n => true,
            Some(n) => {
                let back = n - seq;
                back < REPLAY_WINDOW && self.seen & (1 << back) == 0
            }
        }
    }

    fn record(&mut self, seq: u64) {
        match self.newest {
            Some(n) if seq <= n => self.seen |= 1 << (n - seq),
            Some(n) => {
                let shift = seq - n;
                self.seen = if shift >= REPLAY_WINDOW {
                    0
                } else {
                    self.seen << shift
                };
                self.seen |= 1;
                self.newest = Some(seq);
            }
            None => {
                self.newest = Some(seq);
                self.seen = 1;
            }
        }
    }

    fn forget_stalest(&mut self) {
        if let Some((&stream, &last)) = self.sequenced.iter().min_by_key(|(_, l)| **l) {
            self.sequenced.remove(&stream);
            self.floor = Some(self.floor.map_or(last, |f| f.max(last)));
        }
    }

    /// Sequenced streams tracked (at most [`MAX_SEQUENCED_STREAMS`]).
    pub fn tracked_streams(&self) -> usize {
        self.sequenced.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_duplicate_is_refused_within_the_replay_window() {
        let mut r = UnreliableReceiver::new();
        assert!(r.accept(0, 5, false));
        assert!(r.accept(0, 3, false), "late but new");
        assert!(!r.accept(0, 5, false));
        assert!(!r.accept(0, 3, false));
    }

    #[test]
    fn an_arrival_older_than_the_replay_window_is_refused() {
        let mut r = UnreliableReceiver::new();
        assert!(r.accept(0, 100, false));
        assert!(!r.accept(0, 100 - REPLAY_WINDOW, false));
        assert!(r.accept(0, 101 - REPLAY_WINDOW, false));
    }

    #[test]
    fn a_sequenced_stream_never_delivers_an_older_message_after_a_newer_one() {
        let mut r = UnreliableReceiver::new();
        assert!(r.accept(1, 10, true));
        assert!(!r.accept(1, 9, true));
        assert!(r.accept(2, 8, true), "another stream is independent");
        assert!(r.accept(1, 11, true));
    }

    #[test]
    fn forgetting_a_sequenced_stream_can_drop_but_never_reorder() {
        let mut r = UnreliableReceiver::new();
        for s in 0..MAX_SEQUENCED_STREAMS as u64 {
            assert!(r.accept(s, 1000 + s, true));
        }
        assert!(
            r.accept(9999, 5000, true),
            "forces stream 0 (last 1000) out"
        );
        assert_eq!(r.tracked_streams(), MAX_SEQUENCED_STREAMS);
        assert!(
            !r.accept(0, 999, true),
            "older than its forgotten newest: refused"
        );
    }

    #[test]
    fn a_sequenced_message_replaces_the_queued_one_of_its_stream() {
        let mut s = UnreliableSender::new(8, 1024);
        s.push(1, true, Bytes::from_static(b"old"));
        s.push(2, true, Bytes::from_static(b"other"));
        s.push(1, true, Bytes::from_static(b"new"));
        assert_eq!(s.len(), 2);
        assert_eq!(
            s.pop().map(|(_, q)| q.payload),
            Some(Bytes::from_static(b"new"))
        );
        assert_eq!(s.dropped(), 1);
    }

    #[test]
    fn a_full_unreliable_queue_drops_its_oldest() {
        let mut s = UnreliableSender::new(2, 1024);
        for p in [&b"a"[..], b"b", b"c"] {
            s.push(0, false, Bytes::copy_from_slice(p));
        }
        let got: alloc::vec::Vec<_> = core::iter::from_fn(|| s.pop())
            .map(|(n, q)| (n, q.payload))
            .collect();
        assert_eq!(
            got,
            [(0, Bytes::from_static(b"b")), (1, Bytes::from_static(b"c"))]
        );
    }
}
