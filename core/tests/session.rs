//! Sessions over connections that break: resume, expiry, supersede, stale epochs, liveness, frozen
//! processes, backoff, delivery modes, replies and requests, tie-breaking.

mod util;

use bytes::{Bytes, BytesMut};
use steadfast_core::client::{ClientConfig, Directive};
use steadfast_core::frame::{Frame, HelloFrame};
use steadfast_core::framing;
use steadfast_core::identity::Resume;
use steadfast_core::reconnect::{Backoff, Jitter};
use steadfast_core::server::{ServerConfig, ServerEvent};
use steadfast_core::session::{DisconnectCause, LostReason, SessionEvent};
use steadfast_core::time::{Duration, Instant};
use steadfast_core::{Config, Mode, Transport};
use util::net::Net;
use util::payloads;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

fn net(clients: usize) -> Net {
    let server = ServerConfig::new(Config::new(Transport::Stream));
    let client = ClientConfig::new(Config::new(Transport::Stream), 1);
    Net::new(server, vec![client; clients], 7)
}

fn connected(n: &Net, i: usize) -> bool {
    n.clients[i].is_connected()
}

fn session_of(n: &Net, i: usize) -> steadfast_core::identity::SessionId {
    n.clients[i].session().expect("client has a session")
}

/// A raw connection `conn` opens, sends `frames` after the preface, and collects every frame the
/// server writes back to it (one decoder across writes, as on a real stream), and whether the
/// server closed it.
fn raw_exchange(n: &mut Net, conn: u64, frames: &[Frame]) -> (Vec<Frame>, bool) {
    n.server.on_connection(n.now, conn);
    let mut wire = BytesMut::new();
    framing::encode_preface(&mut wire);
    for f in frames {
        framing::encode_stream_frame(f, &mut wire);
    }
    n.server.handle_input(n.now, conn, wire.freeze());
    let mut out = BytesMut::new();
    let mut decoder = framing::StreamDecoder::new(Default::default());
    let mut closed = false;
    let mut got = Vec::new();
    while let Some(t) = n.server.poll_transmit(n.now, &mut out) {
        let bytes = out.split_to(t.len).freeze();
        if t.conn == conn {
            closed |= t.close;
            decoder.feed(&bytes);
            while let Ok(Some(f)) = decoder.next_frame() {
                got.push(f);
            }
        }
    }
    (got, closed)
}

/// A raw connection `conn` presents `resume` in a hello, as a stale copy or a forger would;
/// returns the server's refusal, if it refused, and whether it closed the connection.
fn raw_resume(
    n: &mut Net,
    conn: u64,
    resume: Resume,
) -> Option<(steadfast_core::frame::RefuseFrame, bool)> {
    let hello = Frame::Hello(HelloFrame {
        nonce: 1,
        recv_window: 1024,
        resume: Some(resume),
        credentials: Bytes::new(),
    });
    let (frames, closed) = raw_exchange(n, conn, &[hello]);
    frames.into_iter().find_map(|f| match f {
        Frame::Refuse(r) => Some((r, closed)),
        _ => None,
    })
}

/// Sends `count` tagged messages each way, breaking the connection with `fault` halfway.
fn exchange_across(fault: impl FnOnce(&mut Net), count: usize) -> Net {
    let mut n = net(1);
    assert!(n.run_until(|n| connected(n, 0)).unwrap());
    let id = session_of(&n, 0);
    let up = payloads(count, 32);
    let down = payloads(count, 40);
    for p in &up[..count / 2] {
        n.clients[0].send(1, Mode::Ordered, p.clone()).unwrap();
    }
    for p in &down[..count / 2] {
        n.server.send(id, 1, Mode::Ordered, p.clone()).unwrap();
    }
    n.step().unwrap();
    n.step().unwrap();
    fault(&mut n);
    for p in &up[count / 2..] {
        n.clients[0].send(1, Mode::Ordered, p.clone()).unwrap();
    }
    for p in &down[count / 2..] {
        n.server.send(id, 1, Mode::Ordered, p.clone()).unwrap();
    }
    let done = n
        .run_until(|n| n.server_received().len() >= count && n.client_received(0).len() >= count)
        .unwrap();
    assert!(done, "not everything arrived");
    n.run_for(secs(1)).unwrap();
    assert_eq!(
        n.server_received(),
        up,
        "client to server: lost, duplicated or reordered"
    );
    assert_eq!(
        n.client_received(0),
        down,
        "server to client: lost, duplicated or reordered"
    );
    n
}

#[test]
fn a_session_resumes_after_a_connection_reset_with_nothing_lost_or_duplicated_both_ways() {
    let n = exchange_across(|n| n.reset(0), 200);
    assert_eq!(n.clients[0].counters().resumes, 1);
    assert!(
        n.client_events[0]
            .iter()
            .any(|e| matches!(e, SessionEvent::Connected { resumed: true, .. }))
    );
}

#[test]
fn a_session_resumes_after_a_silent_blackhole_once_the_idle_timeout_notices() {
    let n = exchange_across(|n| n.blackhole(0), 200);
    assert_eq!(n.clients[0].counters().idle_timeouts, 1);
}

#[test]
fn resuming_an_expired_session_yields_session_lost_with_exactly_the_unacknowledged_messages() {
    let mut server = ServerConfig::new(Config::new(Transport::Stream));
    server.retention = secs(5);
    let mut client = ClientConfig::new(Config::new(Transport::Stream), 1);
    client.reconnect.backoff = Backoff::Fixed { delay: secs(10) };
    client.reconnect.first_attempt_immediate = false;
    client.reconnect.jitter = Jitter::None;
    let mut n = Net::new(server, vec![client], 3);
    assert!(n.run_until(|n| connected(n, 0)).unwrap());
    n.clients[0]
        .send(1, Mode::Ordered, Bytes::from_static(b"delivered"))
        .unwrap();
    assert!(n.run_until(|n| n.server_received().len() == 1).unwrap());
    n.run_for(secs(1)).unwrap();
    n.reset(0);
    n.step().unwrap();
    // While it is away, the client queues two more; the server expires the session meanwhile.
    let unsent = [
        Bytes::from_static(b"in doubt 1"),
        Bytes::from_static(b"in doubt 2"),
    ];
    for p in &unsent {
        n.clients[0].send(1, Mode::Ordered, p.clone()).unwrap();
    }
    let lost = n
        .run_until(|n| {
            n.client_events[0]
                .iter()
                .any(|e| matches!(e, SessionEvent::SessionLost { .. }))
        })
        .unwrap();
    assert!(lost);
    let (reason, unacked) = n.client_events[0]
        .iter()
        .find_map(|e| match e {
            SessionEvent::SessionLost {
                reason,
                unacknowledged,
            } => Some((reason.clone(), unacknowledged.clone())),
            _ => None,
        })
        .unwrap();
    assert_eq!(reason, LostReason::Expired);
    let handed_back: Vec<Bytes> = unacked.into_iter().map(|m| m.payload).collect();
    assert_eq!(handed_back, unsent);
    assert!(n.server_events.iter().any(|e| matches!(
        e,
        ServerEvent::Session {
            event: SessionEvent::SessionLost {
                reason: LostReason::RetentionExpired,
                ..
            },
            ..
        }
    )));
    assert_eq!(n.server.session_count(), 0);
}

#[test]
fn a_server_restart_ends_the_session_loudly_instead_of_starting_a_silent_fresh_one() {
    let mut n = net(1);
    assert!(n.run_until(|n| connected(n, 0)).unwrap());
    let id = session_of(&n, 0);
    n.server
        .send(id, 0, Mode::Ordered, Bytes::from_static(b"before"))
        .unwrap();
    assert!(n.run_until(|n| n.client_received(0).len() == 1).unwrap());
    n.clients[0]
        .send(0, Mode::Ordered, Bytes::from_static(b"maybe"))
        .unwrap();
    n.restart_server();
    let lost = n
        .run_until(|n| {
            n.client_events[0]
                .iter()
                .any(|e| matches!(e, SessionEvent::SessionLost { .. }))
        })
        .unwrap();
    assert!(lost);
    assert!(
        n.clients[0].send(0, Mode::Ordered, Bytes::new()).is_err(),
        "the session is over"
    );
}

#[test]
fn a_new_attach_supersedes_a_half_open_old_connection() {
    let mut n = net(1);
    assert!(n.run_until(|n| connected(n, 0)).unwrap());
    let id = session_of(&n, 0);
    let before = n.server.connection_count();
    n.half_open(0);
    assert!(
        n.run_until(|n| n.clients[0].counters().resumes == 1)
            .unwrap()
    );
    assert!(n.server_events.iter().any(|e| matches!(
        e,
        ServerEvent::Session {
            event: SessionEvent::Disconnected {
                cause: DisconnectCause::Superseded
            },
            ..
        }
    )));
    n.run_for(ms(100)).unwrap();
    assert_eq!(
        n.server.connection_count(),
        before,
        "the old connection was closed, not leaked"
    );
    assert!(n.server.is_connected(id));
    assert_eq!(n.server.epoch(id), Some(2));
}

#[test]
fn an_attach_with_a_stale_epoch_is_refused_and_the_live_session_is_undisturbed() {
    let mut n = net(1);
    assert!(n.run_until(|n| connected(n, 0)).unwrap());
    let (id, token, epoch) = n.clients[0].identity().unwrap();
    // A copy of the client restored from an old snapshot attaches with the epoch it remembers.
    let refused = raw_resume(
        &mut n,
        999,
        Resume {
            session: id,
            token,
            epoch,
            received: 0,
        },
    );
    let (refusal, closed) = refused.expect("a refusal");
    assert_eq!(
        steadfast_core::session::RefuseCode::from_wire(refusal.code),
        steadfast_core::session::RefuseCode::StaleEpoch
    );
    assert_eq!(refusal.epoch, epoch);
    assert!(closed, "the refused connection is closed");
    assert!(
        n.server.is_connected(id),
        "the live attach keeps the session"
    );
    assert_eq!(n.server.epoch(id), Some(epoch));
}

#[test]
fn a_wrong_token_is_refused_and_counted() {
    let mut n = net(1);
    assert!(n.run_until(|n| connected(n, 0)).unwrap());
    let (id, _, epoch) = n.clients[0].identity().unwrap();
    let forged = steadfast_core::identity::Token::from_bytes([0x42; 16]);
    let refused = raw_resume(
        &mut n,
        999,
        Resume {
            session: id,
            token: forged,
            epoch: epoch + 1,
            received: 0,
        },
    );
    assert!(refused.is_some_and(|(_, closed)| closed));
    assert_eq!(n.server.refused_tokens(), 1);
    assert_eq!(
        n.server.epoch(id),
        Some(epoch),
        "a forger cannot bump the epoch"
    );
}

#[test]
fn a_silently_dead_path_is_detected_within_the_idle_timeout() {
    let mut n = net(1);
    assert!(n.run_until(|n| connected(n, 0)).unwrap());
    let idle = steadfast_core::liveness::LivenessConfig::default().idle_timeout;
    n.run_for(secs(2)).unwrap();
    let start = n.now;
    n.blackhole(0);
    let detected = n
        .run_until(|n| {
            n.client_events[0]
                .iter()
                .any(|e| matches!(e, SessionEvent::Disconnected { .. }))
        })
        .unwrap();
    assert!(detected);
    let took = n.now - start;
    eprintln!("blackhole detected after {took:?} (idle timeout {idle:?})");
    assert!(took <= idle, "detection took {took:?}, bound {idle:?}");
    assert!(matches!(
        n.client_events[0]
            .iter()
            .find(|e| matches!(e, SessionEvent::Disconnected { .. })),
        Some(SessionEvent::Disconnected {
            cause: DisconnectCause::IdleTimeout { .. }
        })
    ));
}

#[test]
fn a_frozen_client_does_not_declare_its_peer_dead_on_waking() {
    let mut server = ServerConfig::new(Config::new(Transport::Stream));
    server.liveness.idle_timeout = secs(120);
    server.liveness.stall_grace = secs(120);
    let client = ClientConfig::new(Config::new(Transport::Stream), 1);
    let mut n = Net::new(server, vec![client], 11);
    assert!(n.run_until(|n| connected(n, 0)).unwrap());
    n.run_for(secs(1)).unwrap();
    n.freeze(0, secs(30));
    n.run_for(secs(35)).unwrap();
    assert!(
        !n.client_events[0]
            .iter()
            .any(|e| matches!(e, SessionEvent::Disconnected { .. })),
        "the client blamed the server for its own freeze: {:?}",
        n.client_events[0]
    );
    assert!(n.clients[0].counters().stalls >= 1, "the stall was noticed");
    assert!(connected(&n, 0));
}

#[test]
fn failed_connects_back_off_and_rotate_through_the_server_list() {
    let server = ServerConfig::new(Config::new(Transport::Stream));
    let mut client = ClientConfig::new(Config::new(Transport::Stream), 3);
    client.reconnect.backoff = Backoff::Exponential {
        initial: ms(100),
        factor: 2,
        max: secs(1),
    };
    client.reconnect.jitter = Jitter::None;
    let mut n = Net::new(server, vec![client], 5);
    n.refusing_servers = vec![0, 1];
    assert!(n.run_until(|n| connected(n, 0)).unwrap());
    let tried: Vec<(u64, usize)> = n.directives[0]
        .iter()
        .filter_map(|(t, d)| match d {
            Directive::Connect { server, .. } => Some((t.as_nanos() / 1_000_000, *server)),
            _ => None,
        })
        .collect();
    assert_eq!(
        tried,
        [(0, 0), (100, 1), (200, 2)],
        "first pass waits the base delay"
    );
    assert_eq!(n.clients[0].reconnector().failures(2), 0);
    assert_eq!(n.clients[0].reconnector().total_failures(0), 1);
}

#[test]
fn giving_up_ends_the_session_with_a_typed_event() {
    let server = ServerConfig::new(Config::new(Transport::Stream));
    let mut client = ClientConfig::new(Config::new(Transport::Stream), 1);
    client.reconnect.max_attempts = Some(3);
    let mut n = Net::new(server, vec![client], 5);
    n.unreachable[0] = true;
    n.clients[0]
        .send(0, Mode::Ordered, Bytes::from_static(b"never"))
        .unwrap();
    n.run_for(secs(60)).unwrap();
    assert!(matches!(
        n.client_events[0].last(),
        Some(SessionEvent::SessionLost { reason: LostReason::GaveUp(_), unacknowledged }) if unacknowledged.len() == 1
    ));
}

#[test]
fn reliable_modes_survive_a_reset_and_unreliable_ones_are_at_most_once() {
    let mut n = net(1);
    assert!(n.run_until(|n| connected(n, 0)).unwrap());
    let id = session_of(&n, 0);
    n.reset(0);
    n.step().unwrap();
    // While disconnected: conflated keeps the newest per key; sequenced the newest per stream;
    // unreliable is dropped; ordered and unordered queue.
    let s = &mut n.server;
    s.send(id, 1, Mode::Ordered, Bytes::from_static(b"o1"))
        .unwrap();
    s.send(id, 2, Mode::Unordered, Bytes::from_static(b"u1"))
        .unwrap();
    s.send(
        id,
        3,
        Mode::Conflated { key: 7 },
        Bytes::from_static(b"price 1"),
    )
    .unwrap();
    s.send(
        id,
        3,
        Mode::Conflated { key: 8 },
        Bytes::from_static(b"other 1"),
    )
    .unwrap();
    s.send(
        id,
        3,
        Mode::Conflated { key: 7 },
        Bytes::from_static(b"price 2"),
    )
    .unwrap();
    s.send(id, 4, Mode::Sequenced, Bytes::from_static(b"tick 1"))
        .unwrap();
    s.send(id, 4, Mode::Sequenced, Bytes::from_static(b"tick 2"))
        .unwrap();
    s.send(id, 5, Mode::Unreliable, Bytes::from_static(b"gone"))
        .unwrap();
    s.send(id, 1, Mode::Ordered, Bytes::from_static(b"o2"))
        .unwrap();
    n.run_for(secs(2)).unwrap();
    let mut got: Vec<Bytes> = n.client_received(0);
    got.sort();
    let mut want: Vec<Bytes> = ["o1", "u1", "price 2", "other 1", "tick 2", "o2"]
        .iter()
        .map(|s| Bytes::from_static(s.as_bytes()))
        .collect();
    want.sort();
    assert_eq!(got, want);
    // Ordered messages kept their order.
    let ordered: Vec<Bytes> = n.client_events[0]
        .iter()
        .filter_map(|e| match e {
            SessionEvent::Received(m) if m.stream == 1 => Some(m.payload.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(
        ordered,
        [Bytes::from_static(b"o1"), Bytes::from_static(b"o2")]
    );
    // Connected, an unreliable message goes through.
    n.server
        .send(id, 5, Mode::Unreliable, Bytes::from_static(b"now"))
        .unwrap();
    n.run_for(ms(100)).unwrap();
    assert_eq!(
        n.client_received(0).last(),
        Some(&Bytes::from_static(b"now"))
    );
}

#[test]
fn a_reply_survives_a_reconnect_and_arrives_exactly_once() {
    let mut n = net(1);
    assert!(n.run_until(|n| connected(n, 0)).unwrap());
    let id = session_of(&n, 0);
    let deadline = n.now + secs(60);
    let req = n
        .server
        .request(id, 0, Bytes::from_static(b"ack me"), deadline)
        .unwrap();
    assert!(n.run_until(|n| n.client_received(0).len() == 1).unwrap());
    let to = n.client_events[0]
        .iter()
        .find_map(|e| match e {
            SessionEvent::Received(m) => Some(m.seq),
            _ => None,
        })
        .unwrap();
    assert_eq!(to, req);
    // The connection dies before the reply gets out; the client replies anyway.
    n.blackhole(0);
    n.clients[0]
        .reply(to, Bytes::from_static(b"acked"))
        .unwrap();
    let replied = n
        .run_until(|n| {
            n.server_events.iter().any(|e| {
                matches!(
                    e,
                    ServerEvent::Session {
                        event: SessionEvent::Reply { .. },
                        ..
                    }
                )
            })
        })
        .unwrap();
    assert!(replied);
    n.run_for(secs(1)).unwrap();
    let replies: Vec<_> = n
        .server_events
        .iter()
        .filter_map(|e| match e {
            ServerEvent::Session {
                event: SessionEvent::Reply { to, payload },
                ..
            } => Some((*to, payload.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(replies, [(req, Bytes::from_static(b"acked"))]);
    assert!(n.clients[0].counters().resumes >= 1);
    assert!(!n.server_events.iter().any(|e| matches!(
        e,
        ServerEvent::Session {
            event: SessionEvent::RequestTimedOut { .. },
            ..
        }
    )));
}

#[test]
fn a_request_without_a_reply_times_out_with_a_typed_event() {
    let mut n = net(1);
    assert!(n.run_until(|n| connected(n, 0)).unwrap());
    let deadline = n.now + secs(2);
    let seq = n.clients[0]
        .request(0, Bytes::from_static(b"anyone?"), deadline)
        .unwrap();
    n.run_for(secs(3)).unwrap();
    assert!(n.client_events[0].contains(&SessionEvent::RequestTimedOut { seq }));
    assert!(
        n.client_events[0]
            .iter()
            .any(|e| matches!(e, SessionEvent::Acknowledged { below } if *below > seq)),
        "received, just not answered"
    );
}

#[test]
fn closing_a_session_reaches_the_other_side_as_closed() {
    let mut n = net(1);
    assert!(n.run_until(|n| connected(n, 0)).unwrap());
    n.clients[0].close(0, Bytes::from_static(b"done"));
    n.run_for(ms(100)).unwrap();
    assert!(matches!(
        n.client_events[0].last(),
        Some(SessionEvent::Closed { .. })
    ));
    assert!(n.server_events.iter().any(|e| matches!(
        e,
        ServerEvent::Session {
            event: SessionEvent::Closed { .. },
            ..
        }
    )));
    assert_eq!(n.server.session_count(), 0);
}

#[test]
fn both_ends_agree_on_the_favourite_of_their_connection() {
    for seed in 0..200 {
        let server = ServerConfig::new(Config::new(Transport::Stream));
        let client = ClientConfig::new(Config::new(Transport::Stream), 1);
        let mut n = Net::new(server, vec![client], seed);
        assert!(n.run_until(|n| connected(n, 0)).unwrap());
        let id = session_of(&n, 0);
        let c = n.clients[0].arbiter().unwrap();
        let s = n.server.arbiter(id).unwrap();
        assert_eq!(c.favourite(), s.favourite(), "seed {seed}");
        for key in 0..16 {
            assert_eq!(
                c.favourite_for(key),
                s.favourite_for(key),
                "seed {seed} key {key}"
            );
        }
        assert_ne!(c.local_wins(), s.local_wins());
    }
}

#[test]
fn the_session_runs_over_a_datagram_transport_too() {
    let server = ServerConfig::new(Config::new(Transport::Datagram));
    let client = ClientConfig::new(Config::new(Transport::Datagram), 1);
    let mut n = Net::new(server, vec![client], 9);
    assert!(n.run_until(|n| connected(n, 0)).unwrap());
    let id = session_of(&n, 0);
    for p in payloads(50, 20) {
        n.server.send(id, 0, Mode::Ordered, p).unwrap();
    }
    n.run_for(secs(1)).unwrap();
    assert_eq!(n.client_received(0), payloads(50, 20));
    let _ = Instant::ZERO;
}

fn closed_reason(events: &[SessionEvent]) -> Option<steadfast_core::CloseReason> {
    events.iter().find_map(|e| match e {
        SessionEvent::Closed { reason, .. } => Some(reason.clone()),
        _ => None,
    })
}

fn server_closed_reason(n: &Net) -> Option<steadfast_core::CloseReason> {
    n.server_events.iter().find_map(|e| match e {
        ServerEvent::Session {
            event: SessionEvent::Closed { reason, .. },
            ..
        } => Some(reason.clone()),
        _ => None,
    })
}

#[test]
fn a_simultaneous_close_is_resolved_to_the_same_close_on_both_ends() {
    use steadfast_core::CloseReason::{Local, Peer};
    let mut favourites = [0usize; 2];
    for seed in 0..100 {
        let server = ServerConfig::new(Config::new(Transport::Stream));
        let client = ClientConfig::new(Config::new(Transport::Stream), 1);
        let mut n = Net::new(server, vec![client], seed);
        assert!(n.run_until(|n| connected(n, 0)).unwrap());
        let id = session_of(&n, 0);
        let client_wins = n.clients[0].arbiter().unwrap().local_wins();
        favourites[usize::from(client_wins)] += 1;
        // Both applications close at the same instant, with different codes.
        n.clients[0].close(10, Bytes::from_static(b"client done"));
        n.server
            .close_session(id, 20, Bytes::from_static(b"server done"));
        n.run_for(secs(2)).unwrap();
        let c = closed_reason(&n.client_events[0]).expect("client reports a close");
        let s = server_closed_reason(&n).expect("server reports a close");
        let agreed_code = |r: &steadfast_core::CloseReason| match r {
            Local { code } | Peer { code, .. } => *code,
            other => panic!("unexpected close {other:?}"),
        };
        assert_eq!(
            agreed_code(&c),
            agreed_code(&s),
            "seed {seed}: {c:?} vs {s:?}"
        );
        assert_eq!(
            agreed_code(&c),
            if client_wins { 10 } else { 20 },
            "seed {seed}"
        );
        assert_eq!(n.server.session_count(), 0);
    }
    assert!(
        favourites[0] > 0 && favourites[1] > 0,
        "both sides won some: {favourites:?}"
    );
}

#[test]
fn a_server_close_reaches_the_client_and_ends_the_session_on_both_sides() {
    let mut n = net(1);
    assert!(n.run_until(|n| connected(n, 0)).unwrap());
    let id = session_of(&n, 0);
    n.server
        .close_session(id, 7, Bytes::from_static(b"maintenance"));
    n.run_for(secs(2)).unwrap();
    assert!(matches!(
        closed_reason(&n.client_events[0]),
        Some(steadfast_core::CloseReason::Peer { code: 7, .. })
    ));
    assert_eq!(
        server_closed_reason(&n),
        Some(steadfast_core::CloseReason::Local { code: 7 })
    );
    assert_eq!(n.server.session_count(), 0);
    assert_eq!(n.server.connection_count(), 0);
}

#[test]
fn an_overflow_under_the_close_policy_loses_the_session_loudly_on_both_sides() {
    let mut channel = Config::new(Transport::Stream);
    channel.max_queued_messages = 4;
    let mut server = ServerConfig::new(channel);
    server.disconnected_max_queued_messages = 8;
    server
        .stream_overflow
        .insert(3, steadfast_core::server::Overflow::CloseSession);
    let client = ClientConfig::new(Config::new(Transport::Stream), 1);
    let mut n = Net::new(server, vec![client], 2);
    assert!(n.run_until(|n| connected(n, 0)).unwrap());
    let id = session_of(&n, 0);
    // The client freezes, so nothing it is sent gets acknowledged and the queue fills.
    n.freeze(0, secs(2));
    let mut refused = 0;
    for p in payloads(6, 8) {
        // Stream 1 keeps the default policy: backpressure.
        if n.server.send(id, 1, Mode::Ordered, p).is_err() {
            refused += 1;
        }
    }
    assert_eq!(refused, 2, "backpressure on the default stream");
    assert_eq!(n.server.session_count(), 1);
    // Stream 3 closes the session on overflow.
    assert!(
        n.server
            .send(id, 3, Mode::Ordered, Bytes::from_static(b"one too many"))
            .is_err()
    );
    n.run_for(secs(3)).unwrap();
    let lost = n.server_events.iter().find_map(|e| match e {
        ServerEvent::Session {
            event:
                SessionEvent::SessionLost {
                    reason,
                    unacknowledged,
                },
            ..
        } => Some((reason.clone(), unacknowledged.len())),
        _ => None,
    });
    assert_eq!(lost, Some((LostReason::Overflow, 4)));
    assert!(
        n.client_events[0].iter().any(|e| matches!(
            e,
            SessionEvent::SessionLost {
                reason: LostReason::Overflow,
                ..
            }
        )),
        "the client hears of it too: {:?}",
        n.client_events[0]
    );
}

#[test]
fn traffic_on_a_connection_without_a_session_is_refused_not_attached_and_pings_go_unanswered() {
    let mut n = net(1);
    let (frames, closed) = raw_exchange(&mut n, 4242, &[Frame::Ping { id: 1 }]);
    assert!(
        !frames.iter().any(|f| matches!(f, Frame::Pong { .. })),
        "{frames:?}"
    );
    assert!(
        frames.iter().any(|f| matches!(f, Frame::Refuse(r)
            if steadfast_core::session::RefuseCode::from_wire(r.code)
                == steadfast_core::session::RefuseCode::NotAttached)),
        "{frames:?}"
    );
    assert!(closed);
}

#[test]
fn a_client_told_its_connection_is_not_attached_resumes_on_a_new_one() {
    let mut n = net(1);
    assert!(n.run_until(|n| connected(n, 0)).unwrap());
    let id = session_of(&n, 0);
    // The server forgets the connection without a word to the client (a dropped datagram
    // binding); the client's next bytes then meet a connection with no session.
    let stale = n.server.connection_count();
    assert_eq!(stale, 1);
    let mut wire = BytesMut::new();
    framing::encode_stream_frame(
        &Frame::Refuse(steadfast_core::frame::RefuseFrame {
            code: steadfast_core::session::RefuseCode::NotAttached.to_wire(),
            epoch: 0,
            reason: Bytes::new(),
        }),
        &mut wire,
    );
    n.clients[0].handle_input(n.now, wire.freeze());
    assert!(n.clients[0].poll_directive(n.now) == Some(Directive::Disconnect));
    let resumed = n
        .run_until(|n| n.clients[0].counters().resumes == 1)
        .unwrap();
    assert!(resumed);
    assert!(
        n.clients[0]
            .poll_event()
            .is_none_or(|e| !matches!(e, SessionEvent::SessionLost { .. }))
    );
    assert!(n.server.is_connected(id));
}
