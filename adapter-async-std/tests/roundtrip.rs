//! Real loopback sockets on async-std: ordered exactly-once delivery, correlated replies, and a session
//! that ends loudly when its server is gone for good.

use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use steadfast_async_std::core::reconnect::Backoff;
use steadfast_async_std::{
    ClientOptions, LostReason, Mode, ServerEvent, ServerHandle, ServerOptions, SessionEvent,
};

const MESSAGES: u32 = 500;

/// Runs `test` to completion, failing it if it takes longer than `limit` rather than hanging.
fn run<T>(limit: Duration, test: impl Future<Output = T>) -> T {
    async_std::task::block_on(futures_lite::future::or(
        async { Some(test.await) },
        async {
            async_io::Timer::after(limit).await;
            None
        },
    ))
    .unwrap_or_else(|| panic!("no outcome within {limit:?}"))
}

async fn server() -> ServerHandle {
    steadfast_async_std::listen("127.0.0.1:0".parse().unwrap(), ServerOptions::new())
        .await
        .expect("bind a loopback port")
}

/// The next message the server receives, skipping session bookkeeping.
async fn next_received(server: &ServerHandle) -> steadfast_async_std::Message {
    loop {
        match server.next_event().await.expect("the server is running") {
            ServerEvent::Session {
                event: SessionEvent::Received(m),
                ..
            } => return m,
            _ => continue,
        }
    }
}

#[test]
fn five_hundred_ordered_messages_arrive_exactly_once_and_in_order() {
    run(Duration::from_secs(30), async {
        let server = server().await;
        let client =
            steadfast_async_std::connect(ClientOptions::new(vec![server.local_addr()])).unwrap();
        for i in 0..MESSAGES {
            let payload = Bytes::copy_from_slice(&i.to_be_bytes());
            client.send(0, Mode::Ordered, payload).await.unwrap();
        }
        // Sent last on the same ordered stream: anything after it would be a duplicate or late.
        client
            .send(0, Mode::Ordered, Bytes::from_static(b"end"))
            .await
            .unwrap();

        let mut got = Vec::new();
        loop {
            let m = next_received(&server).await;
            if m.payload == "end" {
                break;
            }
            let id: [u8; 4] = m.payload[..].try_into().expect("a 4-byte message id");
            got.push(u32::from_be_bytes(id));
        }
        assert_eq!(got, (0..MESSAGES).collect::<Vec<_>>());
    });
}

#[test]
fn every_request_resolves_with_the_reply_to_that_request() {
    run(Duration::from_secs(30), async {
        let server = server().await;
        let client =
            steadfast_async_std::connect(ClientOptions::new(vec![server.local_addr()])).unwrap();

        // The server answers each request with its own payload behind a prefix.
        let answering = server.clone();
        let answerer = async_std::task::spawn(async move {
            for _ in 0..MESSAGES {
                let (session, m) = loop {
                    match answering.next_event().await.expect("the server is running") {
                        ServerEvent::Session {
                            session,
                            event: SessionEvent::Received(m),
                        } => break (session, m),
                        _ => continue,
                    }
                };
                let mut reply = b"re:".to_vec();
                reply.extend_from_slice(&m.payload);
                answering.reply(session, m.seq, reply.into()).unwrap();
            }
        });

        // All in flight at once, so a reply routed to the wrong request would show.
        let requests: Vec<_> = (0..MESSAGES)
            .map(|i| {
                let client = client.clone();
                async_std::task::spawn(async move {
                    let payload = Bytes::from(format!("q{i}"));
                    client.request(1, payload, Duration::from_secs(20)).await
                })
            })
            .collect();
        for (i, request) in requests.into_iter().enumerate() {
            let reply = request.await.expect("a reply before the deadline");
            assert_eq!(reply, format!("re:q{i}"));
        }
        answerer.await;
    });
}

#[test]
fn a_server_gone_for_good_ends_the_client_session_loudly() {
    run(Duration::from_secs(20), async {
        let server = server().await;
        let mut options = ClientOptions::new(vec![server.local_addr()]);
        options.config.reconnect.backoff = Backoff::Fixed {
            delay: Duration::from_millis(100),
        };
        options.config.reconnect.max_total = Some(Duration::from_secs(2));
        options.connect_timeout = Duration::from_secs(1);
        let client = steadfast_async_std::connect(options).unwrap();
        // A message through proves the server holds the session, not just a connection.
        client
            .send(0, Mode::Ordered, Bytes::from_static(b"hello"))
            .await
            .unwrap();
        assert_eq!(next_received(&server).await.payload, "hello");

        server.shutdown();

        let mut disconnected = false;
        let reason = loop {
            match client.next_event().await {
                Some(SessionEvent::Disconnected { .. }) => disconnected = true,
                Some(SessionEvent::SessionLost { reason, .. }) => break reason,
                Some(_) => continue,
                None => panic!("the session ended without SessionLost"),
            }
        };
        assert!(disconnected, "the break is reported before the loss");
        assert!(
            matches!(reason, LostReason::GaveUp(_)),
            "lost because reconnecting gave up, not {reason:?}"
        );
        assert!(client.next_event().await.is_none(), "SessionLost is last");
        assert!(!client.connected().await);
    });
}
