//! Durable client sessions: a client process that dies and starts again on the same store resumes
//! its session with nothing lost and nothing delivered twice; a store that fails is said so loudly.

mod util;

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use steadfast_core::client::ClientConfig;
use steadfast_core::identity::SessionId;
use steadfast_core::server::{ServerConfig, ServerEvent};
use steadfast_core::session::SessionEvent;
use steadfast_core::store::{Identity, MemoryStore, Recovered, Store, StoreError, Stored};
use steadfast_core::time::Duration;
use steadfast_core::{Config, Mode, Seq, Transport};
use util::net::Net;

/// A store that outlives the client holding it, as a directory outlives a process.
#[derive(Clone, Default)]
struct Kept(Arc<Mutex<MemoryStore>>);

impl Store for Kept {
    fn recover(&mut self) -> Result<Recovered, StoreError> {
        self.0.lock().unwrap().recover()
    }
    fn identity(&mut self, identity: Identity) -> Result<(), StoreError> {
        self.0.lock().unwrap().identity(identity)
    }
    fn sent(&mut self, m: &Stored) -> Result<(), StoreError> {
        self.0.lock().unwrap().sent(m)
    }
    fn acknowledged(&mut self, below: Seq) -> Result<(), StoreError> {
        self.0.lock().unwrap().acknowledged(below)
    }
    fn arrived(&mut self, m: &Stored) -> Result<(), StoreError> {
        self.0.lock().unwrap().arrived(m)
    }
    fn consumed(&mut self, seq: Seq) -> Result<(), StoreError> {
        self.0.lock().unwrap().consumed(seq)
    }
    fn flush(&mut self) -> Result<(), StoreError> {
        Ok(())
    }
    fn clear(&mut self) -> Result<(), StoreError> {
        self.0.lock().unwrap().clear()
    }
}

/// A store whose every write fails.
struct Broken;

impl Store for Broken {
    fn recover(&mut self) -> Result<Recovered, StoreError> {
        Ok(Recovered::default())
    }
    fn identity(&mut self, _: Identity) -> Result<(), StoreError> {
        Err(StoreError::Io("disk full".into()))
    }
    fn sent(&mut self, _: &Stored) -> Result<(), StoreError> {
        Err(StoreError::Io("disk full".into()))
    }
    fn acknowledged(&mut self, _: Seq) -> Result<(), StoreError> {
        Err(StoreError::Io("disk full".into()))
    }
    fn arrived(&mut self, _: &Stored) -> Result<(), StoreError> {
        Err(StoreError::Io("disk full".into()))
    }
    fn consumed(&mut self, _: Seq) -> Result<(), StoreError> {
        Err(StoreError::Io("disk full".into()))
    }
    fn flush(&mut self) -> Result<(), StoreError> {
        Ok(())
    }
    fn clear(&mut self) -> Result<(), StoreError> {
        Ok(())
    }
}

fn net() -> Net {
    let server = ServerConfig::new(Config::new(Transport::Stream));
    let client = ClientConfig::new(Config::new(Transport::Stream), 1);
    Net::new(server, vec![client], 11)
}

fn numbered(n: u32) -> Bytes {
    Bytes::copy_from_slice(&n.to_be_bytes())
}

fn numbers(payloads: &[Bytes]) -> Vec<u32> {
    payloads
        .iter()
        .map(|p| u32::from_be_bytes(p[..4].try_into().unwrap()))
        .collect()
}

fn the_session(n: &Net) -> SessionId {
    n.server_events
        .iter()
        .find_map(|e| match e {
            ServerEvent::Session {
                session,
                event: SessionEvent::Connected { .. },
            } => Some(*session),
            _ => None,
        })
        .expect("a session was established")
}

#[test]
fn a_client_restarted_on_its_store_resumes_with_nothing_lost_or_delivered_twice() {
    let store = Kept::default();
    let mut n = net();
    n.restart_client(0, Box::new(store.clone()));
    n.run_until(|n| n.clients[0].is_connected()).unwrap();
    let session = the_session(&n);

    let (mut up, mut down) = (0u32, 0u32);
    for round in 0..6 {
        for _ in 0..25 {
            n.clients[0]
                .send(0, Mode::Ordered, numbered(up))
                .expect("queued");
            up += 1;
            n.server
                .send(session, 0, Mode::Ordered, numbered(down))
                .expect("queued");
            down += 1;
        }
        // Part of it crosses; then the process dies mid-flight.
        n.run_for(Duration::from_millis(3 + round)).unwrap();
        n.restart_client(0, Box::new(store.clone()));
    }
    n.run_for(Duration::from_secs(10)).unwrap();

    assert_eq!(numbers(&n.server_received()), (0..up).collect::<Vec<_>>());
    assert_eq!(
        numbers(&n.client_received(0)),
        (0..down).collect::<Vec<_>>()
    );
    assert_eq!(n.clients[0].session(), Some(session), "the same session");
    assert_eq!(n.server.session_count(), 1);
    assert!(
        n.client_events[0]
            .iter()
            .all(|e| !matches!(e, SessionEvent::SessionLost { .. })),
        "never lost"
    );
    assert!(n.clients[0].is_durable());
}

#[test]
fn a_message_the_application_had_not_consumed_comes_out_again_flagged() {
    let store = Kept::default();
    let mut n = net();
    n.restart_client(0, Box::new(store.clone()));
    n.run_until(|n| n.clients[0].is_connected()).unwrap();
    let session = the_session(&n);
    n.server
        .send(session, 0, Mode::Ordered, numbered(7))
        .unwrap();
    n.run_for(Duration::from_millis(50)).unwrap();
    assert_eq!(numbers(&n.client_received(0)), [7]);

    // Model a crash before the application was done with it: the store as it stood after the
    // arrival was recorded and before the consumption was.
    let identity = store.0.lock().unwrap().snapshot().identity;
    let mut before = MemoryStore::new();
    before
        .identity(identity.expect("identity recorded"))
        .unwrap();
    before
        .arrived(&Stored {
            seq: 0,
            stream: 0,
            unordered: false,
            payload: numbered(7),
        })
        .unwrap();
    *store.0.lock().unwrap() = before;

    n.restart_client(0, Box::new(store.clone()));
    n.run_for(Duration::from_millis(200)).unwrap();
    let redelivered: Vec<_> = n.client_events[0]
        .iter()
        .filter_map(|e| match e {
            SessionEvent::Redelivered(m) => Some(m.payload.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(numbers(&redelivered), [7]);
    assert_eq!(numbers(&n.client_received(0)), [7], "not received twice");
}

#[test]
fn a_failing_store_is_reported_and_the_session_carries_on_in_memory() {
    let mut n = net();
    n.restart_client(0, Box::new(Broken));
    n.run_until(|n| n.clients[0].is_connected()).unwrap();
    n.clients[0]
        .send(0, Mode::Ordered, numbered(1))
        .expect("still accepted");
    n.run_for(Duration::from_millis(100)).unwrap();
    assert!(
        n.client_events[0]
            .iter()
            .any(|e| matches!(e, SessionEvent::DurabilityLost { .. }))
    );
    assert!(!n.clients[0].is_durable());
    assert_eq!(numbers(&n.server_received()), [1]);
}
