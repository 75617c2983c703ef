//! Two servers sharing their sessions, as a cluster does, through the core's reference store kept
//! in memory: a session taken over by the other server ends what its first server's application
//! awaited.

use std::time::Duration;

use bytes::Bytes;
use steadfast_core::identity::SessionId;
use steadfast_tokio::chaos::{ChaosProxy, Fault, Target};
use steadfast_tokio::{
    ClientOptions, FlushError, Listener, Mode, RequestError, ServerEvent, ServerHandle,
    ServerOptions, SessionEvent, Tokio,
};

// The core's reference store of a cluster's sessions, in memory.
#[allow(dead_code)]
#[path = "../../core/tests/util/cluster.rs"]
mod cluster;

/// A server of the cluster whose sessions `shelf` holds.
async fn server_on(shelf: cluster::Shared) -> ServerHandle {
    let mut options = ServerOptions::new();
    options.config.retention = Duration::from_secs(60);
    let listener = Listener::new(tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap());
    let (handle, driver) = steadfast_core::driver::server::server_with_sessions(
        Tokio::current(),
        listener,
        options,
        Box::new(rand_core::UnwrapErr(rand_core::OsRng)),
        Box::new(shelf),
    )
    .unwrap();
    tokio::spawn(driver);
    handle
}

/// `server`'s next event about a session that matches `wanted`, within 20 s.
async fn until(
    server: &ServerHandle,
    what: &str,
    wanted: impl Fn(&SessionEvent) -> bool,
) -> SessionId {
    tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            if let ServerEvent::Session { session, event } =
                server.next_event().await.expect("the server runs")
                && wanted(&event)
            {
                return session;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{what} within 20 s"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_taken_over_by_another_server_ends_the_flush_and_request_awaited_on_the_first() {
    let shelf = cluster::Shared::default();
    let a = server_on(shelf.for_server(1)).await;
    let b = server_on(shelf.for_server(2)).await;
    let to_a = ChaosProxy::start(a.local_addr()).await.unwrap();
    let client =
        steadfast_tokio::connect(ClientOptions::new(vec![to_a.local_addr(), b.local_addr()]))
            .unwrap();
    client
        .send(0, Mode::Ordered, Bytes::from_static(b"hello"))
        .await
        .unwrap();
    let session = until(&a, "the hello on a", |e| {
        matches!(e, SessionEvent::Received(_))
    })
    .await;

    // a's path goes silent and takes no new connection: its messages wait unacknowledged.
    to_a.apply(Target::All, Fault::Blackhole);
    to_a.refuse_new(true);
    a.send(session, 0, Mode::Ordered, Bytes::from_static(b"from a"))
        .await
        .unwrap();
    let flush = tokio::spawn({
        let a = a.clone();
        async move { a.flush(session).await }
    });
    let request = tokio::spawn({
        let a = a.clone();
        async move {
            a.request(
                session,
                0,
                Bytes::from_static(b"asked on a"),
                Duration::from_secs(600),
            )
            .await
        }
    });

    // The client finds the path dead and resumes on b, which claims the session at a newer epoch.
    until(&b, "the resume on b", |e| {
        matches!(e, SessionEvent::Connected { resumed: true, .. })
    })
    .await;
    // a's next write to the session's store finds it fenced.
    let _ = a.try_send(session, 0, Mode::Ordered, Bytes::from_static(b"too late"));
    until(&a, "a fenced", |e| matches!(e, SessionEvent::Fenced { .. })).await;

    let flushed = tokio::time::timeout(Duration::from_secs(20), flush)
        .await
        .expect("the flush ends with the session, not at a's shutdown")
        .unwrap();
    assert_eq!(flushed, Err(FlushError::SessionEnded));
    let answered = tokio::time::timeout(Duration::from_secs(20), request)
        .await
        .expect("the request ends with the session, not at its deadline")
        .unwrap();
    assert_eq!(answered, Err(RequestError::SessionEnded));
    drop(client);
}
