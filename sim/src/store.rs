//! A client's durable store as the simulator keeps it: it outlives the `Client` holding it, as a
//! directory outlives a process, and a crash decides what of it survives.
//!
//! Records reach the store in two steps, as they reach a disk: appended (written to the operating
//! system) and then made durable by [`Store::flush`], which the core calls before an acknowledgement
//! or a send's `Ok` leaves it. A **process** crash keeps every record appended, flushed or not (the
//! operating system still has them); a **machine** crash (power loss) loses the ones appended since
//! the last flush. Either way, whatever the core promised by flushing survives.

use std::sync::{Arc, Mutex, MutexGuard};

use steadfast_core::Seq;
use steadfast_core::store::{Identity, MemoryStore, Recovered, Store, StoreError, Stored};

/// One record not yet flushed.
#[derive(Debug, Clone)]
enum Record {
    Identity(Identity),
    Sent(Stored),
    Acknowledged(Seq),
    Arrived(Stored),
    Consumed(Seq),
    Clear,
}

#[derive(Debug, Default)]
struct Disk {
    /// Everything flushed.
    durable: MemoryStore,
    /// Appended since the last flush, in order.
    tail: Vec<Record>,
}

impl Disk {
    fn apply(&mut self, r: Record) {
        let s = &mut self.durable;
        // A memory store never fails.
        let _ = match r {
            Record::Identity(id) => s.identity(id),
            Record::Sent(m) => s.sent(&m),
            Record::Acknowledged(below) => s.acknowledged(below),
            Record::Arrived(m) => s.arrived(&m),
            Record::Consumed(seq) => s.consumed(seq),
            Record::Clear => s.clear(),
        };
    }

    fn flush(&mut self) {
        // Drained in place, so the tail keeps its allocation from one flush to the next.
        let mut tail = std::mem::take(&mut self.tail);
        for r in tail.drain(..) {
            self.apply(r);
        }
        self.tail = tail;
    }
}

/// What a machine crash took from a store.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Lost {
    /// Records appended since the last flush.
    pub records: usize,
    /// Of those, the consumptions: these messages come out again after the restart.
    pub consumed: Vec<Seq>,
}

/// A store shared between a simulated client node and the `Client` it currently runs.
#[derive(Debug, Clone, Default)]
pub struct Kept(Arc<Mutex<Disk>>);

impl Kept {
    /// An empty store.
    pub fn new() -> Kept {
        Kept::default()
    }

    fn disk(&self) -> MutexGuard<'_, Disk> {
        // Only one thread ever touches a run's stores.
        self.0.lock().expect("a simulated store is never poisoned")
    }

    /// The process died: with `machine` (power loss) the records since the last flush are lost,
    /// else they survive. Says what was lost.
    pub fn crash(&self, machine: bool) -> Lost {
        let mut d = self.disk();
        if !machine {
            d.flush();
            return Lost::default();
        }
        let tail = std::mem::take(&mut d.tail);
        Lost {
            records: tail.len(),
            consumed: tail
                .iter()
                .filter_map(|r| match r {
                    Record::Consumed(seq) => Some(*seq),
                    _ => None,
                })
                .collect(),
        }
    }

    /// The store is deleted (a new disk, `rm -rf`): the next process starts from nothing.
    pub fn wipe(&self) {
        *self.disk() = Disk::default();
    }

    /// What is durable now.
    pub fn snapshot(&self) -> Recovered {
        self.disk().durable.snapshot().clone()
    }

    fn append(&mut self, r: Record) -> Result<(), StoreError> {
        self.disk().tail.push(r);
        Ok(())
    }
}

impl Store for Kept {
    fn recover(&mut self) -> Result<Recovered, StoreError> {
        let mut d = self.disk();
        d.flush();
        d.durable.recover()
    }
    fn identity(&mut self, identity: Identity) -> Result<(), StoreError> {
        self.append(Record::Identity(identity))
    }
    fn sent(&mut self, m: &Stored) -> Result<(), StoreError> {
        self.append(Record::Sent(m.clone()))
    }
    fn acknowledged(&mut self, below: Seq) -> Result<(), StoreError> {
        self.append(Record::Acknowledged(below))
    }
    fn arrived(&mut self, m: &Stored) -> Result<(), StoreError> {
        self.append(Record::Arrived(m.clone()))
    }
    fn consumed(&mut self, seq: Seq) -> Result<(), StoreError> {
        self.append(Record::Consumed(seq))
    }
    fn flush(&mut self) -> Result<(), StoreError> {
        self.disk().flush();
        Ok(())
    }
    fn clear(&mut self) -> Result<(), StoreError> {
        self.append(Record::Clear)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn msg(seq: Seq) -> Stored {
        Stored {
            seq,
            stream: 0,
            unordered: false,
            payload: Bytes::from_static(b"x"),
        }
    }

    #[test]
    fn a_process_crash_keeps_unflushed_records_and_a_machine_crash_loses_them() {
        for (machine, unconsumed) in [(false, 0), (true, 1)] {
            let mut s = Kept::new();
            s.arrived(&msg(0)).unwrap();
            s.flush().unwrap();
            s.consumed(0).unwrap();
            let lost = s.crash(machine);
            assert_eq!(lost.consumed, if machine { vec![0] } else { vec![] });
            let r = s.clone().recover().unwrap();
            assert_eq!(r.unconsumed.len(), unconsumed, "machine crash: {machine}");
            assert_eq!(r.watermark, 1, "the flushed arrival survives either way");
        }
    }

    #[test]
    fn a_wiped_store_recovers_nothing() {
        let mut s = Kept::new();
        s.sent(&msg(0)).unwrap();
        s.flush().unwrap();
        s.wipe();
        assert_eq!(s.recover().unwrap(), Recovered::default());
    }
}
