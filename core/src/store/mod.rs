//! Durability: what a client session records so that it survives a restart of its process.
//!
//! A client given a [`Store`] records, at the points where durability matters:
//! - its **identity** (session id, resume token, attach epoch) before a hello claiming that epoch
//!   goes out, so a restarted process resumes the session instead of being refused as stale;
//! - every reliable message it **sent** (replies included) before `send` reports it accepted, until
//!   the peer acknowledges it: a restarted client republishes what the server lacks, under the same
//!   sequence numbers, and the server's de-duplication drops what it already had;
//! - every message that **arrived** before its receipt is acknowledged: a restarted client knows
//!   what it already received (the server does not send it twice, and a copy is dropped) and hands
//!   the application again, flagged [`crate::session::SessionEvent::Redelivered`], each message the
//!   application had not yet **consumed**.
//!
//! So delivery into the application is exactly-once for messages it consumed and at-least-once,
//! flagged, for the ones it held when the process died: an application whose own effects are
//! recorded with the message id (a ledger) recognises the flagged ones and the end result is
//! exactly-once. [`Store::flush`] is called before an acknowledgement or a send's `Ok` leaves the
//! core; how durable that makes the records (written to the OS, or synced to disk) is the store's
//! sync policy.
//!
//! The trait is `no_std`; [`MemoryStore`] keeps everything in memory (what a client without a store
//! has anyway, but recoverable within one process, which the tests use to model a crash), and with
//! the `file-store` feature `file::FileStore` keeps it in an append-only log on disk.

use alloc::vec::Vec;
use core::fmt;
use core::ops::Range;

use bytes::Bytes;

use crate::Seq;
use crate::identity::{SessionId, Token};

#[cfg(feature = "file-store")]
pub mod file;

/// The session's identity as the server knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    /// The session.
    pub session: SessionId,
    /// Its resume token.
    pub token: Token,
    /// The highest attach epoch claimed.
    pub epoch: u64,
}

/// One message as a store keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    /// Its sequence number in its direction.
    pub seq: Seq,
    /// Its stream.
    pub stream: u64,
    /// Whether it may be delivered before earlier ones.
    pub unordered: bool,
    /// Its payload.
    pub payload: Bytes,
}

/// What a previous run left in a store.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Recovered {
    /// The session, if the server had named one.
    pub identity: Option<Identity>,
    /// One past the highest sequence number ever sent (0 if none): new messages continue from here.
    pub next_seq: Seq,
    /// Sent messages not yet acknowledged, in sequence order.
    pub unacknowledged: Vec<Stored>,
    /// Every sequence number that arrived: below `watermark`, all of them.
    pub watermark: Seq,
    /// Arrivals above the watermark.
    pub arrived_above: Vec<Range<Seq>>,
    /// Arrived messages the application had not consumed, in sequence order.
    pub unconsumed: Vec<Stored>,
}

/// Why a store failed. The session carries on in memory and says so
/// ([`crate::session::SessionEvent::DurabilityLost`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum StoreError {
    /// The medium failed (disk full, I/O error), with the platform's description.
    Io(alloc::string::String),
    /// What was read back is not a valid record past the point a torn write explains.
    Corrupt(alloc::string::String),
    /// Another server claimed the session with a newer attach epoch: this one must stop serving it
    /// (a shared [`SessionStore`] refuses the older owner's writes).
    Fenced {
        /// The epoch that won.
        epoch: u64,
    },
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreError::Io(e) => write!(f, "store I/O failed: {e}"),
            StoreError::Corrupt(e) => write!(f, "store is corrupt: {e}"),
            StoreError::Fenced { epoch } => {
                write!(f, "another server owns the session (attach epoch {epoch})")
            }
        }
    }
}

impl core::error::Error for StoreError {}

/// Where a client session records what must survive its process. See the [module docs](self).
///
/// Calls come from inside the core's entry points, in the order the events happened; a store only
/// has to append, and to answer [`Store::recover`] once at start.
pub trait Store: Send {
    /// What a previous run left (`Recovered::default()` for a new store).
    fn recover(&mut self) -> Result<Recovered, StoreError>;
    /// The identity changed (the server named the session, or a new epoch is about to be claimed).
    fn identity(&mut self, identity: Identity) -> Result<(), StoreError>;
    /// A reliable message was accepted; a conflated value replacing an unsent one comes again under
    /// the same sequence number and supersedes it.
    fn sent(&mut self, message: &Stored) -> Result<(), StoreError>;
    /// The peer acknowledged every message below `below`: they may be forgotten.
    fn acknowledged(&mut self, below: Seq) -> Result<(), StoreError>;
    /// A message arrived (delivered or held for reordering).
    fn arrived(&mut self, message: &Stored) -> Result<(), StoreError>;
    /// The application consumed message `seq`: it is not handed out again after a restart.
    fn consumed(&mut self, seq: Seq) -> Result<(), StoreError>;
    /// Makes everything recorded so far as durable as the store promises. Called before an ack or a
    /// send's `Ok` leaves the core.
    fn flush(&mut self) -> Result<(), StoreError>;
    /// The session is over (closed or lost): nothing in the store will be needed again.
    fn clear(&mut self) -> Result<(), StoreError>;
}

/// Where a server keeps its sessions so that they outlive it: each session it creates or resumes
/// records through a [`Store`] of its own, as a durable client does, and a session it does not hold
/// can be loaded, so a client whose server died resumes on another. The servers of a cluster share
/// one.
///
/// Ownership follows the attach epoch: [`Store::identity`] claims the session for this server at
/// a new epoch and fails with [`StoreError::Fenced`] if another server holds a newer one, and once
/// another server has claimed it every write through the older server's store fails the same way.
/// So two servers never both serve one session: the older stops at its next write.
pub trait SessionStore: Send {
    /// Records a session this server just created, under `identity`.
    fn create(&mut self, identity: Identity) -> Result<alloc::boxed::Box<dyn Store>, StoreError>;
    /// A session this server does not hold, with what was recorded of it, if any server kept it.
    #[allow(clippy::type_complexity)]
    fn load(
        &mut self,
        session: SessionId,
    ) -> Result<Option<(alloc::boxed::Box<dyn Store>, Recovered)>, StoreError>;
}

/// A store in memory: survives the session object, not the process.
#[derive(Debug, Clone, Default)]
pub struct MemoryStore {
    state: Recovered,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// What it holds now.
    pub fn snapshot(&self) -> &Recovered {
        &self.state
    }
}

impl Store for MemoryStore {
    fn recover(&mut self) -> Result<Recovered, StoreError> {
        Ok(self.state.clone())
    }

    fn identity(&mut self, identity: Identity) -> Result<(), StoreError> {
        self.state.identity = Some(identity);
        Ok(())
    }

    fn sent(&mut self, message: &Stored) -> Result<(), StoreError> {
        let s = &mut self.state;
        s.next_seq = s.next_seq.max(message.seq + 1);
        match s
            .unacknowledged
            .binary_search_by_key(&message.seq, |m| m.seq)
        {
            Ok(i) => s.unacknowledged[i] = message.clone(),
            Err(i) => s.unacknowledged.insert(i, message.clone()),
        }
        Ok(())
    }

    fn acknowledged(&mut self, below: Seq) -> Result<(), StoreError> {
        self.state.unacknowledged.retain(|m| m.seq >= below);
        Ok(())
    }

    fn arrived(&mut self, message: &Stored) -> Result<(), StoreError> {
        let s = &mut self.state;
        if message.seq < s.watermark || s.arrived_above.iter().any(|r| r.contains(&message.seq)) {
            return Ok(());
        }
        insert_range(&mut s.arrived_above, message.seq);
        while let Some(r) = s.arrived_above.first()
            && r.start == s.watermark
        {
            s.watermark = r.end;
            s.arrived_above.remove(0);
        }
        if let Err(i) = s.unconsumed.binary_search_by_key(&message.seq, |m| m.seq) {
            s.unconsumed.insert(i, message.clone());
        }
        Ok(())
    }

    fn consumed(&mut self, seq: Seq) -> Result<(), StoreError> {
        if let Ok(i) = self.state.unconsumed.binary_search_by_key(&seq, |m| m.seq) {
            self.state.unconsumed.remove(i);
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), StoreError> {
        Ok(())
    }

    fn clear(&mut self) -> Result<(), StoreError> {
        self.state = Recovered::default();
        Ok(())
    }
}

/// Adds `seq` to a sorted list of disjoint ranges, merging neighbours.
fn insert_range(ranges: &mut Vec<Range<Seq>>, seq: Seq) {
    let i = ranges.partition_point(|r| r.end < seq);
    match ranges.get_mut(i) {
        Some(r) if r.contains(&seq) => {}
        Some(r) if r.end == seq => {
            r.end = seq + 1;
            if ranges.get(i + 1).is_some_and(|n| n.start == seq + 1) {
                let next = ranges.remove(i + 1);
                ranges[i].end = next.end;
            }
        }
        Some(r) if r.start == seq + 1 => r.start = seq,
        _ => ranges.insert(i, seq..seq + 1),
    }
}

#[cfg(test)]
// One-range lists are what these tests mean, not a mistaken `vec![x; n]`.
#[allow(clippy::single_range_in_vec_init)]
mod tests {
    use super::*;
    use alloc::vec;

    fn msg(seq: Seq) -> Stored {
        Stored {
            seq,
            stream: 0,
            unordered: false,
            payload: Bytes::new(),
        }
    }

    #[test]
    fn arrivals_fold_into_the_watermark_once_contiguous() {
        let mut s = MemoryStore::new();
        for seq in [2, 0, 4, 1, 3, 7] {
            s.arrived(&msg(seq)).unwrap();
        }
        let r = s.recover().unwrap();
        assert_eq!((r.watermark, r.arrived_above), (5, vec![7..8]));
    }

    #[test]
    fn acknowledged_messages_are_forgotten_but_the_next_sequence_number_is_kept() {
        let mut s = MemoryStore::new();
        for seq in 0..4 {
            s.sent(&msg(seq)).unwrap();
        }
        s.acknowledged(4).unwrap();
        let r = s.recover().unwrap();
        assert!(r.unacknowledged.is_empty());
        assert_eq!(r.next_seq, 4);
    }

    #[test]
    fn consumed_messages_are_not_handed_out_again() {
        let mut s = MemoryStore::new();
        s.arrived(&msg(0)).unwrap();
        s.arrived(&msg(1)).unwrap();
        s.consumed(0).unwrap();
        let r = s.recover().unwrap();
        assert_eq!(r.unconsumed, vec![msg(1)]);
    }

    #[test]
    fn ranges_merge_from_either_side() {
        let mut r = vec![];
        for seq in [5, 7, 6, 3, 4, 10] {
            insert_range(&mut r, seq);
        }
        assert_eq!(r, vec![3..8, 10..11]);
    }
}
