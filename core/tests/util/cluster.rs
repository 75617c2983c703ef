//! A store of server sessions shared by the servers of a cluster, in memory: the reference the
//! Redis store is held to. Ownership follows the attach epoch, as [`SessionStore`] requires.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use steadfast_core::Seq;
use steadfast_core::identity::SessionId;
use steadfast_core::store::{
    Identity, MemoryStore, Recovered, SessionStore, Store, StoreError, Stored,
};

struct Entry {
    kept: MemoryStore,
    owner: u64,
    epoch: u64,
}

type Map = Arc<Mutex<BTreeMap<SessionId, Entry>>>;

/// One server's view of the shared sessions.
#[derive(Clone, Default)]
pub struct Shared {
    map: Map,
    server: u64,
}

impl Shared {
    /// The same sessions, seen by another server.
    pub fn for_server(&self, server: u64) -> Self {
        Shared {
            map: self.map.clone(),
            server,
        }
    }

    /// How many sessions are kept.
    pub fn len(&self) -> usize {
        self.map.lock().unwrap().len()
    }

    /// What is kept of `id`.
    pub fn kept(&self, id: SessionId) -> Option<Recovered> {
        let map = self.map.lock().unwrap();
        map.get(&id).map(|e| e.kept.snapshot().clone())
    }
}

impl SessionStore for Shared {
    fn create(&mut self, identity: Identity) -> Result<Box<dyn Store>, StoreError> {
        let mut kept = MemoryStore::new();
        kept.identity(identity)?;
        let entry = Entry {
            kept,
            owner: self.server,
            epoch: identity.epoch,
        };
        self.map.lock().unwrap().insert(identity.session, entry);
        Ok(Box::new(Owned {
            map: self.map.clone(),
            id: identity.session,
            server: self.server,
            claimed: Some(identity.epoch),
            cleared: false,
        }))
    }

    fn load(&mut self, id: SessionId) -> Result<Option<(Box<dyn Store>, Recovered)>, StoreError> {
        let map = self.map.lock().unwrap();
        Ok(map.get(&id).map(|e| {
            let owned: Box<dyn Store> = Box::new(Owned {
                map: self.map.clone(),
                id,
                server: self.server,
                claimed: None,
                cleared: false,
            });
            (owned, e.kept.snapshot().clone())
        }))
    }
}

/// One session's record, written by one server.
struct Owned {
    map: Map,
    id: SessionId,
    server: u64,
    /// The epoch this server claimed, if it did.
    claimed: Option<u64>,
    /// This server ended the session and removed its record.
    cleared: bool,
}

impl Owned {
    /// Writes if this server still owns the session at the epoch it claimed.
    fn write(
        &mut self,
        f: impl FnOnce(&mut MemoryStore) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        if self.cleared {
            return Ok(());
        }
        let mut map = self.map.lock().unwrap();
        let gone = || StoreError::Io("the session's record is gone".into());
        let e = map.get_mut(&self.id).ok_or_else(gone)?;
        if e.owner != self.server || Some(e.epoch) != self.claimed {
            return Err(StoreError::Fenced { epoch: e.epoch });
        }
        f(&mut e.kept)
    }
}

impl Store for Owned {
    fn recover(&mut self) -> Result<Recovered, StoreError> {
        let map = self.map.lock().unwrap();
        Ok(map
            .get(&self.id)
            .map(|e| e.kept.snapshot().clone())
            .unwrap_or_default())
    }
    fn identity(&mut self, identity: Identity) -> Result<(), StoreError> {
        let mut map = self.map.lock().unwrap();
        let gone = || StoreError::Io("the session's record is gone".into());
        let e = map.get_mut(&self.id).ok_or_else(gone)?;
        let newer = identity.epoch > e.epoch;
        let ours = identity.epoch == e.epoch && e.owner == self.server;
        if !(newer || ours) {
            return Err(StoreError::Fenced { epoch: e.epoch });
        }
        e.epoch = identity.epoch;
        e.owner = self.server;
        self.claimed = Some(identity.epoch);
        e.kept.identity(identity)
    }
    fn sent(&mut self, m: &Stored) -> Result<(), StoreError> {
        self.write(|k| k.sent(m))
    }
    fn acknowledged(&mut self, below: Seq) -> Result<(), StoreError> {
        self.write(|k| k.acknowledged(below))
    }
    fn arrived(&mut self, m: &Stored) -> Result<(), StoreError> {
        self.write(|k| k.arrived(m))
    }
    fn consumed(&mut self, seq: Seq) -> Result<(), StoreError> {
        self.write(|k| k.consumed(seq))
    }
    fn flush(&mut self) -> Result<(), StoreError> {
        self.write(|_| Ok(()))
    }
    fn clear(&mut self) -> Result<(), StoreError> {
        self.write(|_| Ok(()))?;
        self.map.lock().unwrap().remove(&self.id);
        self.cleared = true;
        Ok(())
    }
}
