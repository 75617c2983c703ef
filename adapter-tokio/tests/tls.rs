//! Sessions over TLS on real loopback sockets: messages cross, a session resumes through a reset
//! connection, a certificate the client does not trust is reported rather than waited on, and a
//! client that stalls its handshake holds up no one.
//!
//! Waits are bounded by `PATIENCE`, generous so that a loaded CI machine does not fail a correct
//! adapter.
#![cfg(feature = "tls")]

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use steadfast_tokio::chaos::{ChaosProxy, Fault, Target};
use steadfast_tokio::core::reconnect::GaveUp;
use steadfast_tokio::tls::rustls;
use steadfast_tokio::tls::rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use steadfast_tokio::tls::{HandshakeRejected, TlsClientOptions, TlsServerOptions};
use steadfast_tokio::{
    ClientHandle, ClientOptions, LostReason, Mode, ServerEvent, ServerHandle, ServerOptions,
    SessionEvent,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout};

const PATIENCE: Duration = Duration::from_secs(10);

async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    match timeout(PATIENCE, future).await {
        Ok(value) => value,
        Err(_) => panic!("timed out waiting for {what}"),
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A fresh self-signed certificate for `localhost`, and its key.
fn self_signed() -> (CertificateDer<'static>, PrivateKeyDer<'static>) {
    let key = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let der = PrivatePkcs8KeyDer::from(key.signing_key.serialize_der());
    (key.cert.der().clone(), der.into())
}

fn server_tls(cert: CertificateDer<'static>, key: PrivateKeyDer<'static>) -> TlsServerOptions {
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)
        .unwrap();
    TlsServerOptions::new(Arc::new(config))
}

/// A client that trusts `root` alone and expects the name `localhost`.
fn client_tls(root: CertificateDer<'static>) -> TlsClientOptions {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(root).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    TlsClientOptions::new(Arc::new(config), "localhost".try_into().unwrap())
}

/// A TLS server on loopback with `tls`, and the certificate clients should trust.
async fn tls_server(
    tls: impl FnOnce(TlsServerOptions) -> TlsServerOptions,
) -> (ServerHandle, CertificateDer<'static>) {
    let (cert, key) = self_signed();
    let server = steadfast_tokio::listen_tls(
        "127.0.0.1:0".parse().unwrap(),
        ServerOptions::new(),
        tls(server_tls(cert.clone(), key)),
    )
    .await
    .unwrap();
    (server, cert)
}

fn connect(to: SocketAddr, tls: TlsClientOptions) -> ClientHandle {
    steadfast_tokio::connect_tls(ClientOptions::new(vec![to]), tls).unwrap()
}

/// Takes server events until `count` messages have arrived, checking they are `from..from+count`
/// in order, each once.
async fn receive_numbered(server: &ServerHandle, from: u64, count: u64) {
    let mut next = from;
    while next < from + count {
        let event = within("the server's messages", server.next_event())
            .await
            .expect("the server runs");
        if let ServerEvent::Session {
            event: SessionEvent::Received(m),
            ..
        } = event
        {
            assert_eq!(
                m.payload.as_ref(),
                next.to_be_bytes(),
                "in order, exactly once"
            );
            next += 1;
        }
    }
}

async fn send_numbered(client: &ClientHandle, from: u64, count: u64) {
    for n in from..from + count {
        let payload = Bytes::copy_from_slice(&n.to_be_bytes());
        within("room in the queue", client.send(0, Mode::Ordered, payload))
            .await
            .unwrap();
    }
}

/// Sends `payload` to the client's session and waits for it to arrive.
async fn server_to_client(server: &ServerHandle, client: &ClientHandle, payload: &'static [u8]) {
    let session = client.session().expect("the server named the session");
    server
        .try_send(session, 0, Mode::Ordered, Bytes::from_static(payload))
        .unwrap();
    loop {
        match within("the client's message", client.next_event()).await {
            Some(SessionEvent::Received(m)) => {
                assert_eq!(m.payload, payload);
                return;
            }
            Some(_) => continue,
            None => panic!("the session ended"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_cross_a_tls_session_both_ways_in_order() {
    let (server, cert) = tls_server(|t| t).await;
    let client = connect(server.local_addr(), client_tls(cert));
    assert!(within("the TLS connection", client.connected()).await);

    send_numbered(&client, 0, 500).await;
    receive_numbered(&server, 0, 500).await;
    server_to_client(&server, &client, b"and back").await;
}

/// Whether the client's next connection resumed its session.
async fn next_connect(client: &ClientHandle) -> bool {
    loop {
        match within("a connection", client.next_event()).await {
            Some(SessionEvent::Connected { resumed, .. }) => return resumed,
            Some(_) => continue,
            None => panic!("the session ended"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_session_resumes_after_its_connection_is_reset() {
    let (server, cert) = tls_server(|t| t).await;
    // The proxy forwards bytes, so the TLS handshake passes through it to the server.
    let proxy = ChaosProxy::start(server.local_addr()).await.unwrap();
    let client = connect(proxy.local_addr(), client_tls(cert));
    assert!(within("the TLS connection", client.connected()).await);
    let session = client.session();

    send_numbered(&client, 0, 100).await;
    receive_numbered(&server, 0, 100).await;
    assert_eq!(
        proxy.apply(Target::All, Fault::Reset),
        1,
        "one connection to reset"
    );

    // Sent while the connection is down or coming back: queued, then carried by the new one.
    send_numbered(&client, 100, 100).await;
    assert!(
        !next_connect(&client).await,
        "the first connection starts the session"
    );
    assert!(next_connect(&client).await, "the second resumes it");
    assert_eq!(client.session(), session);
    receive_numbered(&server, 100, 100).await;
    server_to_client(&server, &client, b"after the reset").await;
    assert_eq!(
        proxy.stats().accepted,
        2,
        "a second TLS connection carried the session"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_does_not_trust_the_servers_certificate_is_told_which_and_why() {
    let (server, _) = tls_server(|t| t).await;
    let (other_authority, _) = self_signed();
    let (rejections, mut rejected) = tokio::sync::mpsc::unbounded_channel();
    let tls = client_tls(other_authority).on_rejected(move |r: &HandshakeRejected| {
        let _ = rejections.send(r.clone());
    });
    let client = connect(server.local_addr(), tls);

    let rejection = within("the rejection", rejected.recv()).await.unwrap();
    assert_eq!(rejection.server, server.local_addr());
    // rustls names the flaw; both test certificates carry rcgen's one subject, so the trusted
    // one is taken for the issuer and the signature is what fails.
    assert!(
        matches!(rejection.error, rustls::Error::InvalidCertificate(_)),
        "{rejection}"
    );
    assert!(!client.is_connected());
    // The application that would rather stop than retry closes the session; it ends at once.
    client.close(0, Bytes::from_static(b"untrusted server"));
    within("the session to end", client.closed()).await;
    assert!(
        server.try_event().is_none(),
        "the server never heard of a session"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_certificate_under_a_limited_reconnect_policy_ends_the_session_loudly() {
    let (server, _) = tls_server(|t| t).await;
    let (other_authority, _) = self_signed();
    let mut options = ClientOptions::new(vec![server.local_addr()]);
    options.config.reconnect.max_attempts = Some(3);
    let client = steadfast_tokio::connect_tls(options, client_tls(other_authority)).unwrap();

    let reason = loop {
        match within("the session to end", client.next_event()).await {
            Some(SessionEvent::SessionLost { reason, .. }) => break reason,
            Some(SessionEvent::Connected { .. }) => panic!("connected to an untrusted server"),
            Some(_) => continue,
            None => panic!("the session ended without saying why"),
        }
    };
    assert_eq!(
        reason,
        LostReason::GaveUp(GaveUp::MaxAttempts { attempts: 3 })
    );
}

/// Opens a TCP connection to `server` and sends the first bytes of a TLS record, never the rest.
async fn stall_a_handshake(server: SocketAddr) -> TcpStream {
    let mut stalled = TcpStream::connect(server).await.unwrap();
    stalled.write_all(&[0x16, 0x03, 0x01]).await.unwrap();
    stalled
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_stalling_its_tls_handshake_does_not_hold_up_another() {
    // A deadline far beyond the test's patience: only concurrency can let the second client in.
    let (server, cert) = tls_server(|mut t| {
        t.handshake_timeout = Duration::from_secs(600);
        t
    })
    .await;
    let stalled = stall_a_handshake(server.local_addr()).await;

    let client = connect(server.local_addr(), client_tls(cert));
    assert!(within("the second client's connection", client.connected()).await);
    send_numbered(&client, 0, 10).await;
    receive_numbered(&server, 0, 10).await;

    let mut byte = [0u8; 1];
    assert_eq!(
        stalled.try_read(&mut byte).unwrap_err().kind(),
        std::io::ErrorKind::WouldBlock,
        "the stalled handshake is still open: the second client did not wait for it to end"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_tls_handshake_is_dropped_at_its_deadline_and_frees_its_place() {
    const DEADLINE: Duration = Duration::from_millis(500);
    // One handshake at a time: the stalled one holds the only place until its deadline.
    let (server, cert) = tls_server(|mut t| {
        t.handshake_timeout = DEADLINE;
        t.max_handshakes = 1;
        t
    })
    .await;
    let start = Instant::now();
    let mut stalled = stall_a_handshake(server.local_addr()).await;
    let client = connect(server.local_addr(), client_tls(cert));

    let mut rest = Vec::new();
    // Dropped: end of stream, or a reset if the server's socket still held the unread bytes.
    let _ = within(
        "the stalled handshake's end",
        stalled.read_to_end(&mut rest),
    )
    .await;
    assert!(
        rest.is_empty(),
        "the server never answered the stalled handshake"
    );
    assert!(start.elapsed() >= DEADLINE, "dropped before its deadline");

    assert!(within("the second client's connection", client.connected()).await);
    send_numbered(&client, 0, 10).await;
    receive_numbered(&server, 0, 10).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_that_fills_the_socket_arrives_whole_without_waiting_for_a_heartbeat() {
    // Heartbeats far beyond the test's patience: a write rustls held back while the socket was
    // full must go out when the socket drains, not with the next write.
    let mut slow = steadfast_tokio::core::liveness::LivenessConfig::default();
    slow.heartbeat_interval = Duration::from_secs(600);
    slow.idle_timeout = Duration::from_secs(1800);
    slow.stall_grace = Duration::from_secs(1800);
    let (cert, key) = self_signed();
    let mut server_options = ServerOptions::new();
    server_options.config.liveness = slow;
    let server = steadfast_tokio::listen_tls(
        "127.0.0.1:0".parse().unwrap(),
        server_options,
        server_tls(cert.clone(), key),
    )
    .await
    .unwrap();
    let proxy = ChaosProxy::start(server.local_addr()).await.unwrap();
    let mut options = ClientOptions::new(vec![proxy.local_addr()]);
    options.config.liveness = slow;
    let client = steadfast_tokio::connect_tls(options, client_tls(cert)).unwrap();
    assert!(within("the TLS connection", client.connected()).await);
    let session = client.session().unwrap();

    // Paced by the proxy, the server's socket is full nearly all the time, so its last write
    // almost surely leaves rustls holding bytes.
    let throttle = Fault::Throttle {
        bytes_per_sec: 8 << 20,
    };
    assert_eq!(proxy.apply(Target::All, throttle), 1);
    const MESSAGES: u64 = 64;
    let payload = Bytes::from(vec![7u8; 64 * 1024]);
    for _ in 0..MESSAGES {
        server
            .try_send(session, 0, Mode::Ordered, payload.clone())
            .unwrap();
    }

    let mut received = 0;
    while received < MESSAGES {
        match within("the whole burst", client.next_event()).await {
            Some(SessionEvent::Received(m)) => {
                assert_eq!(m.payload, payload);
                received += 1;
            }
            Some(_) => continue,
            None => panic!("the session ended"),
        }
    }
}
