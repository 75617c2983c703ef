//! Regression tests for the server bugs a review of the session layer found (each failed before
//! its fix): hangs in poll_transmit, a lost datagram welcome, a missed timer, bounds exceeded
//! through authentication, a double terminal event, and a closed session revived by a resume.

mod util;

use std::sync::mpsc;
use std::time::Duration as StdDuration;

use bytes::{Bytes, BytesMut};
use steadfast_core::client::{Client, ClientConfig, Directive};
use steadfast_core::frame::{Frame, HelloFrame};
use steadfast_core::framing;
use steadfast_core::server::{Server, ServerConfig, ServerEvent};
use steadfast_core::session::{LostReason, SessionEvent};
use steadfast_core::time::{Duration, Instant};
use steadfast_core::{Config, Mode, Transport};
use util::net::{Net, entropy};

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// Drains `server.poll_transmit` on another thread; `None` if it has not returned within 2 s
/// (it spins forever).
fn drain_with_deadline(mut server: Server, now: Instant) -> Option<(Server, usize)> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = BytesMut::new();
        let mut n = 0;
        while server.poll_transmit(now, &mut buf).is_some() {
            n += 1;
        }
        let _ = tx.send((server, n));
    });
    rx.recv_timeout(StdDuration::from_secs(2)).ok()
}

fn stream_hello() -> Bytes {
    let mut wire = BytesMut::new();
    framing::encode_preface(&mut wire);
    framing::encode_stream_frame(
        &Frame::Hello(HelloFrame {
            nonce: 1,
            recv_window: 1024,
            resume: None,
            credentials: Bytes::new(),
        }),
        &mut wire,
    );
    wire.freeze()
}

// ---------------------------------------------------------------------------------------------
// F1: poll_transmit spins forever on a closing, session-less connection that still "wants" to
// transmit (preface never sent, or a pong owed).
// ---------------------------------------------------------------------------------------------

#[test]
fn a_connection_past_max_pending_handshakes_does_not_hang_poll_transmit() {
    let mut config = ServerConfig::new(Config::new(Transport::Stream));
    config.max_pending_handshakes = 1;
    let mut server = Server::new(config, Instant::ZERO, entropy(1)).unwrap();
    server.on_connection(Instant::ZERO, 1); // pending handshake #1
    server.on_connection(Instant::ZERO, 2); // past the bound: to be closed unread
    let out = drain_with_deadline(server, Instant::ZERO);
    assert!(
        out.is_some(),
        "Server::poll_transmit never returned (busy loop)"
    );
}

#[test]
fn a_peer_that_pings_then_sends_garbage_does_not_hang_poll_transmit() {
    let server = Server::new(
        ServerConfig::new(Config::new(Transport::Stream)),
        Instant::ZERO,
        entropy(1),
    )
    .unwrap();
    let mut server = server;
    server.on_connection(Instant::ZERO, 1);
    let mut buf = BytesMut::new();
    while server.poll_transmit(Instant::ZERO, &mut buf).is_some() {} // preface goes out
    let mut wire = BytesMut::new();
    framing::encode_preface(&mut wire);
    framing::encode_stream_frame(&Frame::Ping { id: 7 }, &mut wire);
    wire.extend_from_slice(&[0xff; 64]); // not a frame
    server.handle_input(Instant::ZERO, 1, wire.freeze());
    let out = drain_with_deadline(server, Instant::ZERO);
    assert!(
        out.is_some(),
        "Server::poll_transmit never returned (busy loop)"
    );
}

#[test]
fn a_superseded_connection_owing_a_pong_does_not_hang_poll_transmit() {
    let mut n = Net::new(
        ServerConfig::new(Config::new(Transport::Stream)),
        vec![ClientConfig::new(Config::new(Transport::Stream), 1)],
        3,
    );
    assert!(n.run_until(|n| n.clients[0].is_connected()).unwrap());
    let (id, token, epoch) = n.clients[0].identity().unwrap();
    let now = n.now;
    let mut server = std::mem::replace(
        &mut n.server,
        Server::new(
            ServerConfig::new(Config::new(Transport::Stream)),
            now,
            entropy(0),
        )
        .unwrap(),
    );
    // The old connection (1) pings; before the next drain a new attach (conn 99) supersedes it.
    let mut ping = BytesMut::new();
    framing::encode_stream_frame(&Frame::Ping { id: 1 }, &mut ping);
    server.handle_input(now, 1, ping.freeze());
    server.on_connection(now, 99);
    let mut wire = BytesMut::new();
    framing::encode_preface(&mut wire);
    framing::encode_stream_frame(
        &Frame::Hello(HelloFrame {
            nonce: 2,
            recv_window: 1024,
            resume: Some(steadfast_core::identity::Resume {
                session: id,
                token,
                epoch: epoch + 1,
                received: 0,
            }),
            credentials: Bytes::new(),
        }),
        &mut wire,
    );
    server.handle_input(now, 99, wire.freeze());
    let out = drain_with_deadline(server, now);
    assert!(
        out.is_some(),
        "Server::poll_transmit never returned (busy loop)"
    );
}

// ---------------------------------------------------------------------------------------------
// F2: datagram transport, a fresh session whose welcome is lost: the retried hello (no resume)
// is ignored by the server, so the client neither connects nor loses the session, forever.
// ---------------------------------------------------------------------------------------------

#[test]
fn on_datagrams_a_lost_welcome_for_a_new_session_is_answered_again() {
    let now0 = Instant::ZERO;
    let mut server = Server::new(
        ServerConfig::new(Config::new(Transport::Datagram)),
        now0,
        entropy(1),
    )
    .unwrap();
    let mut client = Client::new(
        ClientConfig::new(Config::new(Transport::Datagram), 1),
        now0,
        entropy(2),
    )
    .unwrap();
    let mut now = now0;
    let mut dropped_first = false;
    let mut events = Vec::new();
    let mut buf = BytesMut::new();
    while now < now0 + Duration::from_secs(60) {
        while let Some(d) = client.poll_directive(now) {
            if let Directive::Connect { .. } = d {
                server.on_connection(now, 1);
                client.on_connected(now);
            }
        }
        while let Some(n) = client.poll_transmit(now, &mut buf) {
            server.handle_input(now, 1, buf.split_to(n).freeze());
        }
        while let Some(t) = server.poll_transmit(now, &mut buf) {
            let bytes = buf.split_to(t.len).freeze();
            if !dropped_first && !bytes.is_empty() {
                dropped_first = true; // the welcome datagram is lost
                continue;
            }
            client.handle_input(now, bytes);
        }
        events.extend(std::iter::from_fn(|| client.poll_event()));
        if client.is_connected() {
            break;
        }
        let next = [client.poll_timeout(), server.poll_timeout()]
            .into_iter()
            .flatten()
            .min()
            .unwrap();
        now = now.max(next).max(now + Duration::from_millis(1));
        server.handle_timeout(now);
        client.handle_timeout(now);
    }
    let lost = events
        .iter()
        .any(|e| matches!(e, SessionEvent::SessionLost { .. }));
    assert!(
        client.is_connected() || lost,
        "after 60 s the client is neither connected nor told the session is lost \
         (server: {} session(s), bound: {}): a silent hang",
        server.session_count(),
        server.connection_count()
    );
}

// ---------------------------------------------------------------------------------------------
// F3: server timer set: a datagram session's retransmission timer, armed inside poll_transmit,
// is never put into the server's timer set, so a lost datagram waits for unrelated traffic.
// ---------------------------------------------------------------------------------------------

#[test]
fn on_datagrams_the_server_wakes_for_its_sessions_retransmission_timer() {
    let mut n = Net::new(
        ServerConfig::new(Config::new(Transport::Datagram)),
        vec![ClientConfig::new(Config::new(Transport::Datagram), 1)],
        5,
    );
    assert!(n.run_until(|n| n.clients[0].is_connected()).unwrap());
    n.run_for(ms(50)).unwrap();
    let id = n.clients[0].session().unwrap();
    n.server
        .send(id, 0, Mode::Ordered, Bytes::from_static(b"x"))
        .unwrap();
    let mut buf = BytesMut::new();
    // The data datagram goes out (and is lost).
    while n.server.poll_transmit(n.now, &mut buf).is_some() {}
    let rto = n
        .server
        .channel(id)
        .unwrap()
        .poll_timeout()
        .expect("RTO armed");
    let wake = n.server.poll_timeout().expect("a wake-up");
    assert!(
        wake <= rto,
        "the server sleeps until {wake:?} past its session's retransmission deadline {rto:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// F4: max_sessions is checked when the hello arrives, not when authentication accepts it.
// ---------------------------------------------------------------------------------------------

#[test]
fn authentication_cannot_push_the_session_count_past_max_sessions() {
    let mut config = ServerConfig::new(Config::new(Transport::Stream));
    config.max_sessions = 1;
    config.authenticate = true;
    let mut server = Server::new(config, Instant::ZERO, entropy(1)).unwrap();
    for conn in 1..=5 {
        server.on_connection(Instant::ZERO, conn);
        server.handle_input(Instant::ZERO, conn, stream_hello());
    }
    let asks: Vec<u64> = std::iter::from_fn(|| server.poll_event())
        .filter_map(|e| match e {
            ServerEvent::Authenticate { conn, .. } => Some(conn),
            _ => None,
        })
        .collect();
    for conn in asks {
        server.authenticate(Instant::ZERO, conn, true);
    }
    assert!(
        server.session_count() <= 1,
        "max_sessions = 1 but {} sessions are held",
        server.session_count()
    );
}

// ---------------------------------------------------------------------------------------------
// F5: a session closed by the peer ends twice if the transport close is reported before the
// next drain: Closed, then (after retention) SessionLost { RetentionExpired }.
// ---------------------------------------------------------------------------------------------

#[test]
fn a_closed_session_gets_exactly_one_terminal_event() {
    let mut n = Net::new(
        ServerConfig::new(Config::new(Transport::Stream)),
        vec![ClientConfig::new(Config::new(Transport::Stream), 1)],
        3,
    );
    assert!(n.run_until(|n| n.clients[0].is_connected()).unwrap());
    let id = n.clients[0].session().unwrap();
    n.clients[0].close(7, Bytes::new());
    let mut buf = BytesMut::new();
    let mut close = BytesMut::new();
    while let Some(k) = n.clients[0].poll_transmit(n.now, &mut buf) {
        close.extend_from_slice(&buf.split_to(k));
    }
    // The adapter reads the close frame and then EOF in one go.
    let now = n.now + ms(5);
    n.server.handle_input(now, 1, close.freeze());
    n.server.on_disconnected(now, 1);
    while n.server.poll_transmit(now, &mut buf).is_some() {}
    let mut t = now;
    while let Some(next) = n.server.poll_timeout() {
        t = t.max(next);
        n.server.handle_timeout(t);
        if t > now + Duration::from_secs(120) {
            break;
        }
    }
    let terminal: Vec<_> = std::iter::from_fn(|| n.server.poll_event())
        .filter_map(|e| match e {
            ServerEvent::Session {
                session,
                event: e @ (SessionEvent::Closed { .. } | SessionEvent::SessionLost { .. }),
            } if session == id => Some(e),
            _ => None,
        })
        .collect();
    assert_eq!(terminal.len(), 1, "terminal events: {terminal:?}");
    let _ = LostReason::Expired;
}

// ---------------------------------------------------------------------------------------------
// F6: a resume processed between close_session and the next drain revives a closed session:
// Connected after Closed, the close frame never sent, a zombie session with a closed channel.
// ---------------------------------------------------------------------------------------------

#[test]
fn a_resume_racing_close_session_does_not_revive_it() {
    let mut n = Net::new(
        ServerConfig::new(Config::new(Transport::Stream)),
        vec![ClientConfig::new(Config::new(Transport::Stream), 1)],
        3,
    );
    assert!(n.run_until(|n| n.clients[0].is_connected()).unwrap());
    let (id, token, epoch) = n.clients[0].identity().unwrap();
    let now = n.now;
    n.server.close_session(id, 9, Bytes::new());
    // Before the adapter drains, the client's new connection (it had timed out the old one) resumes.
    n.server.on_connection(now, 99);
    let mut wire = BytesMut::new();
    framing::encode_preface(&mut wire);
    framing::encode_stream_frame(
        &Frame::Hello(HelloFrame {
            nonce: 2,
            recv_window: 1024,
            resume: Some(steadfast_core::identity::Resume {
                session: id,
                token,
                epoch: epoch + 1,
                received: 0,
            }),
            credentials: Bytes::new(),
        }),
        &mut wire,
    );
    n.server.handle_input(now, 99, wire.freeze());
    let mut buf = BytesMut::new();
    while n.server.poll_transmit(now, &mut buf).is_some() {}
    let events: Vec<_> = std::iter::from_fn(|| n.server.poll_event()).collect();
    assert!(
        !events.iter().any(|e| matches!(
            e,
            ServerEvent::Session {
                event: SessionEvent::Connected { .. },
                ..
            }
        )),
        "a closed session was resumed: {events:?}"
    );
    // The close settles (no close came back within CLOSE_TIMEOUT) and the session is gone.
    let later = now + steadfast_core::session::CLOSE_TIMEOUT;
    n.server.handle_timeout(later);
    while n.server.poll_transmit(later, &mut buf).is_some() {}
    assert_eq!(n.server.session_count(), 0);
    let events: Vec<_> = std::iter::from_fn(|| n.server.poll_event()).collect();
    assert!(
        events.iter().any(|e| matches!(
            e,
            ServerEvent::Session {
                event: SessionEvent::Closed { .. },
                ..
            }
        )),
        "{events:?}"
    );
}
