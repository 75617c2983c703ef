//! Servers sharing a session store: a client whose server died resumes on the server that took
//! over, with nothing lost and nothing delivered twice in either direction, and the server that
//! lost the session to a newer attach epoch is fenced: it stops serving it and does not end it.

mod util;

use bytes::Bytes;
use steadfast_core::client::ClientConfig;
use steadfast_core::identity::SessionId;
use steadfast_core::server::{Server, ServerConfig, ServerEvent};
use steadfast_core::session::SessionEvent;
use steadfast_core::time::Duration;
use steadfast_core::{Config, Mode, Transport};
use util::cluster::Shared;
use util::net::Net;

fn net(shared: &Shared) -> Net {
    let server = ServerConfig::new(Config::new(Transport::Stream));
    let client = ClientConfig::new(Config::new(Transport::Stream), 1);
    Net::new(server, vec![client], 23).with_sessions(Box::new(shared.for_server(1)))
}

fn numbered(n: u32) -> Bytes {
    Bytes::copy_from_slice(&n.to_be_bytes())
}

fn number(p: &Bytes) -> u32 {
    u32::from_be_bytes(p[..4].try_into().unwrap())
}

/// What the servers' applications were handed, over every server that served the session:
/// received once, or handed out again after a takeover because the first server's application
/// never took it.
fn server_ledger(events: &[ServerEvent]) -> Vec<u32> {
    events
        .iter()
        .filter_map(|e| match e {
            ServerEvent::Session {
                event: SessionEvent::Received(m) | SessionEvent::Redelivered(m),
                ..
            } => Some(number(&m.payload)),
            _ => None,
        })
        .collect()
}

fn session_of(n: &Net) -> SessionId {
    n.clients[0].session().expect("a session")
}

fn connected_and_quiet(n: &mut Net) {
    n.run_until(|n| n.clients[0].is_connected()).unwrap();
    n.run_for(Duration::from_millis(200)).unwrap();
}

#[test]
fn a_session_resumes_on_the_server_that_took_over_with_nothing_lost_or_delivered_twice() {
    let shared = Shared::default();
    let mut n = net(&shared);
    connected_and_quiet(&mut n);
    let session = session_of(&n);
    let mut events = Vec::new();

    let (mut up, mut down) = (0u32, 0u32);
    for round in 0..6u64 {
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
        // Part of it crosses; then the server dies mid-flight and another takes over.
        n.run_for(Duration::from_millis(3 + round)).unwrap();
        events.append(&mut n.server_events);
        n.fail_over(Box::new(shared.for_server(2 + round)));
        n.run_until(|n| n.server.is_connected(session)).unwrap();
    }
    n.run_for(Duration::from_secs(10)).unwrap();
    events.append(&mut n.server_events);

    assert_eq!(server_ledger(&events), (0..up).collect::<Vec<_>>());
    let received: Vec<u32> = n.client_received(0).iter().map(number).collect();
    assert_eq!(received, (0..down).collect::<Vec<_>>());
    assert_eq!(n.clients[0].session(), Some(session), "the same session");
    assert_eq!(n.clients[0].epoch(), 7, "one attach per server");
    let kept = shared.kept(session).expect("still kept");
    assert!(kept.unacknowledged.is_empty(), "everything acknowledged");
    assert_eq!(kept.watermark, u64::from(up), "every arrival recorded");
    assert!(kept.unconsumed.is_empty(), "every arrival consumed");
}

/// A server frozen (not killed) while its client failed over, as it finds out.
fn fenced_server() -> (Net, Shared, Server, SessionId) {
    let shared = Shared::default();
    let mut n = net(&shared);
    connected_and_quiet(&mut n);
    let session = session_of(&n);
    let old = n.fail_over(Box::new(shared.for_server(2)));
    n.run_until(|n| n.server.is_connected(session)).unwrap();
    (n, shared, old, session)
}

#[test]
fn the_server_that_lost_the_session_to_a_newer_epoch_is_fenced_at_its_next_write() {
    let (mut n, _shared, mut old, session) = fenced_server();
    assert_eq!(old.session_count(), 1, "the frozen server still holds it");

    let refused = old.send(session, 0, Mode::Ordered, numbered(7));
    assert!(refused.is_err(), "a fenced server takes no message for it");
    let events: Vec<_> = std::iter::from_fn(|| old.poll_event()).collect();
    assert!(
        matches!(
            events.as_slice(),
            [ServerEvent::Session { session: s, event: SessionEvent::Fenced { epoch: 2 } }] if *s == session
        ),
        "{events:?}"
    );
    assert_eq!(old.session_count(), 0);

    // The new owner serves it.
    n.server
        .send(session, 0, Mode::Ordered, numbered(8))
        .expect("queued");
    n.run_for(Duration::from_secs(1)).unwrap();
    let received: Vec<u32> = n.client_received(0).iter().map(number).collect();
    assert_eq!(received, vec![8]);
}

#[test]
fn a_fenced_server_whose_retention_runs_out_does_not_end_the_session_it_lost() {
    let (n, shared, mut old, session) = fenced_server();
    // Its connection went silent: idle timeout, then the whole retention time.
    let mut events = Vec::new();
    let mut buf = bytes::BytesMut::new();
    for secs in 1..=60 {
        old.handle_timeout(n.now + Duration::from_secs(secs));
        while old.poll_transmit(n.now, &mut buf).is_some() {}
        events.extend(std::iter::from_fn(|| old.poll_event()));
    }
    assert!(
        events.iter().any(|e| matches!(
            e,
            ServerEvent::Session {
                event: SessionEvent::Fenced { epoch: 2 },
                ..
            }
        )),
        "{events:?}"
    );
    assert!(
        !events.iter().any(|e| matches!(
            e,
            ServerEvent::Session {
                event: SessionEvent::SessionLost { .. },
                ..
            }
        )),
        "only the owner ends a session: {events:?}"
    );
    assert!(shared.kept(session).is_some(), "still kept for its owner");
}

#[test]
fn a_session_nobody_resumes_is_forgotten_by_its_owner_when_retention_runs_out() {
    let shared = Shared::default();
    let mut n = net(&shared);
    connected_and_quiet(&mut n);
    let session = session_of(&n);
    assert_eq!(shared.len(), 1);
    n.unreachable[0] = true;
    n.reset(0);
    n.run_for(Duration::from_secs(40)).unwrap();
    assert!(n.server_events.iter().any(|e| matches!(
        e,
        ServerEvent::Session { session: s, event: SessionEvent::SessionLost { .. } } if *s == session
    )));
    assert_eq!(shared.len(), 0, "nothing left behind");
}
