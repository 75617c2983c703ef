//! A server split into parts (`ServerOptions::shards`): each connection lands on the part that
//! holds its session, through resumes, authentication and a silent client.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use bytes::Bytes;
use steadfast_tokio::chaos::{ChaosProxy, Fault, Target};
use steadfast_tokio::core::identity::SessionId;
use steadfast_tokio::{
    ClientHandle, ClientOptions, Mode, ServerEvent, ServerOptions, SessionEvent,
};

mod common;

const CLIENTS: usize = 12;
const SHARDS: usize = 4;
/// Messages each way per session, half before the connections are reset and half after.
const MESSAGES: u64 = 400;

fn split(shards: usize) -> ServerOptions {
    let mut options = ServerOptions::new();
    options.shards = shards;
    options
}

/// A server in two parts whose connections have `timeout` to complete their handshake, and one
/// connection to it that says nothing.
async fn silent_connection(
    timeout: Duration,
) -> (steadfast_tokio::ServerHandle, tokio::net::TcpStream) {
    let mut options = split(2);
    options.config.handshake_timeout = timeout;
    let server = steadfast_tokio::listen("127.0.0.1:0".parse().unwrap(), options)
        .await
        .unwrap();
    let silent = tokio::net::TcpStream::connect(server.local_addr())
        .await
        .unwrap();
    (server, silent)
}

fn number(payload: &[u8]) -> u64 {
    u64::from_be_bytes(payload.try_into().expect("an 8-byte number"))
}

/// Asserts the server closes `stream` within 10 s without a byte.
async fn closed_within_10_s(mut stream: tokio::net::TcpStream, why: &str) {
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::io::AsyncReadExt::read(&mut stream, &mut buf),
    )
    .await
    .expect(why);
    assert!(
        matches!(read, Ok(0)) || read.is_err(),
        "closed without a byte: {read:?}"
    );
}

/// Sends `range` to the server, one message at a time.
async fn send_numbers(client: &ClientHandle, range: std::ops::Range<u64>) {
    for n in range {
        let payload = Bytes::copy_from_slice(&n.to_be_bytes());
        client.send(0, Mode::Ordered, payload).await.unwrap();
    }
}

/// Takes the client's messages until `count` arrived; returns their numbers, in arrival order.
async fn receive_numbers(client: ClientHandle, count: usize) -> Vec<u64> {
    let mut got = Vec::new();
    while got.len() < count {
        match client.next_event().await.expect("the session runs") {
            SessionEvent::Received(m) => got.push(number(&m.payload)),
            SessionEvent::SessionLost { reason, .. } => panic!("session lost: {reason:?}"),
            _ => {}
        }
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_split_server_keeps_each_session_on_the_part_its_id_names_through_resumes_both_ways() {
    let server = steadfast_tokio::listen("127.0.0.1:0".parse().unwrap(), split(SHARDS))
        .await
        .unwrap();
    let proxy = ChaosProxy::start(server.local_addr()).await.unwrap();
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        let client =
            steadfast_tokio::connect(ClientOptions::new(vec![proxy.local_addr()])).unwrap();
        assert!(client.connected().await);
        clients.push(client);
    }
    let sessions: Vec<SessionId> = clients.iter().map(|c| c.session().unwrap()).collect();

    // Every session is held by the part its id names, and only there: part 0 holds none of the
    // others'. The parts came from the clients' random nonces: a dozen all in one part would be
    // a one-in-four-million draw.
    let parts: BTreeSet<u64> = sessions.iter().map(|s| s.0 % SHARDS as u64).collect();
    assert!(parts.len() > 1, "sessions spread over the parts: {parts:?}");
    for &s in &sessions {
        assert!(server.inspect_session(s, |sv| sv.channel(s).is_some()));
        assert_eq!(
            server.inspect(|sv| sv.channel(s).is_some()),
            s.0 % SHARDS as u64 == 0,
            "part 0 holds {s} only if its id names part 0"
        );
    }

    let server_side = {
        let server = server.clone();
        tokio::spawn(async move {
            let mut got: BTreeMap<SessionId, Vec<u64>> = BTreeMap::new();
            let mut total = 0;
            while total < CLIENTS as u64 * MESSAGES {
                if let ServerEvent::Session {
                    session,
                    event: SessionEvent::Received(m),
                } = server.next_event().await.expect("the server runs")
                {
                    got.entry(session).or_default().push(number(&m.payload));
                    total += 1;
                }
            }
            got
        })
    };
    let receivers: Vec<_> = clients
        .iter()
        .map(|c| tokio::spawn(receive_numbers(c.clone(), MESSAGES as usize)))
        .collect();

    let half = MESSAGES / 2;
    let send_half = |range: std::ops::Range<u64>| {
        let server = server.clone();
        let clients = clients.clone();
        let sessions = sessions.clone();
        async move {
            for (client, &session) in clients.iter().zip(&sessions) {
                send_numbers(client, range.clone()).await;
                let mut batch = range
                    .clone()
                    .map(|n| Bytes::copy_from_slice(&n.to_be_bytes()))
                    .collect();
                server
                    .send_many(session, 0, Mode::Ordered, &mut batch)
                    .await
                    .unwrap();
            }
        }
    };
    send_half(0..half).await;
    assert_eq!(proxy.apply(Target::All, Fault::Reset), CLIENTS);
    send_half(half..MESSAGES).await;

    let within = Duration::from_secs(30);
    let got = tokio::time::timeout(within, server_side)
        .await
        .expect("every message reached the server")
        .unwrap();
    let expected: Vec<u64> = (0..MESSAGES).collect();
    for &s in &sessions {
        assert_eq!(got[&s], expected, "{s}: exactly once, in order");
    }
    for receiver in receivers {
        let numbers = tokio::time::timeout(within, receiver)
            .await
            .expect("every message reached its client")
            .unwrap();
        assert_eq!(numbers, expected, "exactly once, in order");
    }
    for client in &clients {
        assert!(client.counters().resumes >= 1, "{:?}", client.counters());
    }
    for (client, &s) in clients.iter().zip(&sessions) {
        assert_eq!(client.session(), Some(s), "resumed, not replaced");
    }
    server.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_split_server_routes_each_authentication_to_the_part_that_asked() {
    let mut options = split(SHARDS);
    options.config.authenticate = true;
    let server = steadfast_tokio::listen("127.0.0.1:0".parse().unwrap(), options)
        .await
        .unwrap();
    let judge = {
        let server = server.clone();
        tokio::spawn(async move {
            while let Some(event) = server.next_event().await {
                if let ServerEvent::Authenticate { conn, credentials } = event {
                    server.authenticate(conn, credentials.as_ref() == b"open");
                }
            }
        })
    };
    let connect = |credentials: &'static [u8]| {
        let mut options = ClientOptions::new(vec![server.local_addr()]);
        options.config.credentials = Bytes::from_static(credentials);
        steadfast_tokio::connect(options).unwrap()
    };
    let accepted: Vec<_> = (0..8).map(|_| connect(b"open")).collect();
    let refused = connect(b"wrong");
    for client in &accepted {
        let connected = tokio::time::timeout(Duration::from_secs(20), client.connected()).await;
        assert_eq!(
            connected,
            Ok(true),
            "accepted by whichever part it landed on"
        );
    }
    let lost = common::session_lost(&refused).await;
    assert!(
        matches!(lost, steadfast_tokio::LostReason::Refused { .. }),
        "{lost:?}"
    );
    server.shutdown();
    judge.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_split_server_closes_a_connection_that_never_says_hello() {
    let (_server, silent) = silent_connection(Duration::from_millis(200)).await;
    closed_within_10_s(silent, "closed at the 200 ms handshake timeout").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_split_server_shut_down_closes_a_connection_still_waiting_for_its_hello() {
    let (server, silent) = silent_connection(Duration::from_secs(600)).await;
    // Past the accept: a connection the server holds, not one waiting in the listener's backlog.
    let client = steadfast_tokio::connect(ClientOptions::new(vec![server.local_addr()])).unwrap();
    assert!(client.connected().await);
    server.shutdown();
    closed_within_10_s(
        silent,
        "closed at the shutdown, not at the 600 s handshake timeout",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_split_server_closes_connections_past_its_bound_on_hellos_awaited() {
    let mut options = split(2);
    options.config.handshake_timeout = Duration::from_secs(600);
    options.config.max_pending_handshakes = 2;
    let server = steadfast_tokio::listen("127.0.0.1:0".parse().unwrap(), options)
        .await
        .unwrap();
    let mut silent = Vec::new();
    for _ in 0..3 {
        silent.push(
            tokio::net::TcpStream::connect(server.local_addr())
                .await
                .unwrap(),
        );
    }
    // Two are awaited; the third is closed at once, long before any timeout.
    closed_within_10_s(
        silent.pop().unwrap(),
        "closed at once, not at the 600 s handshake timeout",
    )
    .await;
    // Room again once one of the two goes: a client gets through.
    drop(silent.remove(0));
    let client = steadfast_tokio::connect(ClientOptions::new(vec![server.local_addr()])).unwrap();
    let connected = tokio::time::timeout(Duration::from_secs(20), client.connected()).await;
    assert_eq!(connected, Ok(true));
}
