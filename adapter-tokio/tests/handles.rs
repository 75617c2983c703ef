//! The application's handles beyond async tasks: plain threads that block on backpressure, and the
//! handles as streams of events.

use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;
use futures_core::Stream;
use steadfast_tokio::{ClientOptions, Mode, ServerEvent, ServerOptions, SessionEvent};

mod common;

const MESSAGES: u64 = 1000;

/// Message `n`'s payload: its number.
fn numbered(n: u64) -> Bytes {
    Bytes::copy_from_slice(&n.to_be_bytes())
}

/// A server on a free loopback port.
async fn listening() -> steadfast_tokio::ServerHandle {
    steadfast_tokio::listen("127.0.0.1:0".parse().unwrap(), ServerOptions::new())
        .await
        .unwrap()
}

/// A server, and a client of it with the options `configure` makes.
async fn client_of_a_server(
    configure: impl FnOnce(&mut ClientOptions),
) -> (steadfast_tokio::ServerHandle, steadfast_tokio::ClientHandle) {
    let server = listening().await;
    let mut options = ClientOptions::new(vec![server.local_addr()]);
    configure(&mut options);
    let client = steadfast_tokio::connect(options).unwrap();
    (server, client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_thread_pushes_a_thousand_messages_through_a_queue_of_eight_by_blocking() {
    let mut server = steadfast_tokio::listen("127.0.0.1:0".parse().unwrap(), ServerOptions::new())
        .await
        .unwrap();
    let mut options = ClientOptions::new(vec![server.local_addr()]);
    options.config.channel.max_queued_messages = 8;
    let client = steadfast_tokio::connect(options).unwrap();

    let sender = client.clone();
    let thread = std::thread::spawn(move || {
        let mut refused = 0;
        for n in 0..MESSAGES {
            let payload = numbered(n);
            // A try first shows the queue really is full at times; the blocking send then waits.
            if let Err(e) = sender.try_send(0, Mode::Ordered, payload.clone()) {
                refused += 1;
                drop(e);
                sender.send_blocking(0, Mode::Ordered, payload).unwrap();
            }
        }
        refused
    });

    let mut next = 0u64;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while next < MESSAGES {
        let event = tokio::time::timeout_at(
            deadline,
            std::future::poll_fn(|cx| Pin::new(&mut server).poll_next(cx)),
        )
        .await
        .expect("all messages within 20 s")
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
    let refused = thread.join().unwrap();
    assert!(
        refused > 0,
        "a queue of 8 never filled: backpressure went untested"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sends_into_an_in_flight_window_of_two_all_arrive_in_order() {
    // The window is full at most sends: each one waits for the driver to write it once an ack
    // opens the window, the sending thread writing nothing.
    let (server, client) = client_of_a_server(|o| o.config.channel.max_in_flight = 2).await;
    assert!(client.connected().await);
    // A clone sends: the last handle dropped would close the session, handing back what is still
    // unacknowledged.
    let sender = tokio::spawn({
        let client = client.clone();
        async move {
            let mut most_waiting = 0;
            for n in 0..MESSAGES {
                let payload = numbered(n);
                client.send(0, Mode::Ordered, payload).await.unwrap();
                most_waiting =
                    most_waiting.max(client.inspect(|c| c.channel().sender().queued_messages()));
            }
            most_waiting
        }
    });
    let (got, _) = receive_in_batches(&server, MESSAGES).await;
    let expected: Vec<Bytes> = (0..MESSAGES).map(numbered).collect();
    assert_eq!(got, expected, "every message, in order, exactly once");
    let most_waiting = sender.await.unwrap();
    assert!(
        most_waiting > 2,
        "never more queued than the window holds: a full window went untested"
    );
}

/// The server's next `Received` payloads, taken in batches, until `count` arrived; also the session.
async fn receive_in_batches(
    server: &steadfast_tokio::ServerHandle,
    count: u64,
) -> (Vec<Bytes>, steadfast_tokio::core::identity::SessionId) {
    let mut got = Vec::new();
    let mut session = None;
    let mut events = Vec::new();
    while (got.len() as u64) < count {
        let n = tokio::time::timeout(Duration::from_secs(20), server.next_events(&mut events, 64))
            .await
            .expect("events within 20 s");
        assert!(n > 0 && n <= 64, "a batch of 1 to 64 events, not {n}");
        assert_eq!(events.len(), n);
        for event in events.drain(..) {
            if let ServerEvent::Session {
                session: s,
                event: SessionEvent::Received(m),
            } = event
            {
                session = Some(s);
                got.push(m.payload);
            }
        }
    }
    (got, session.expect("a session"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_of_sends_and_events_keep_order_and_wait_for_room_in_a_queue_of_eight() {
    let (server, client) = client_of_a_server(|o| o.config.channel.max_queued_messages = 8).await;

    // Client to server: one batch far larger than the queue, so it must wait for room.
    let mut batch: std::collections::VecDeque<Bytes> = (0..MESSAGES).map(numbered).collect();
    let sending = {
        let client = client.clone();
        tokio::spawn(async move {
            client
                .send_many(0, Mode::Ordered, &mut batch)
                .await
                .map(|()| batch.len())
        })
    };
    let (got, session) = receive_in_batches(&server, MESSAGES).await;
    assert_eq!(sending.await.unwrap(), Ok(0), "every payload was taken");
    let want: Vec<Bytes> = (0..MESSAGES).map(numbered).collect();
    assert_eq!(got, want, "in order, exactly once");

    // Server to client, the same way back.
    let mut batch: std::collections::VecDeque<Bytes> = (0..MESSAGES).map(numbered).collect();
    let sending = {
        let server = server.clone();
        tokio::spawn(async move {
            server
                .send_many(session, 0, Mode::Ordered, &mut batch)
                .await
                .map(|()| batch.len())
        })
    };
    let mut got = Vec::new();
    let mut events = Vec::new();
    while (got.len() as u64) < MESSAGES {
        tokio::time::timeout(Duration::from_secs(20), client.next_events(&mut events, 64))
            .await
            .expect("events within 20 s");
        for event in events.drain(..) {
            if let SessionEvent::Received(m) = event {
                got.push(m.payload);
            }
        }
    }
    assert_eq!(sending.await.unwrap(), Ok(0));
    assert_eq!(got, want, "in order, exactly once, back to the client");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_stops_at_the_payload_refused_and_keeps_the_rest_unsent() {
    let (_server, client) = client_of_a_server(|_| {}).await;
    assert!(client.connected().await);
    client.close(steadfast_tokio::core::CLOSE_NORMAL, Bytes::new());
    client.closed().await;

    let mut batch: std::collections::VecDeque<Bytes> =
        [&b"a"[..], b"b", b"c"].map(Bytes::from_static).into();
    match client.send_many(0, Mode::Ordered, &mut batch).await {
        Err(steadfast_tokio::SendError::Closed(p)) => assert_eq!(&p[..], b"a"),
        other => panic!("a closed session refuses the first payload: {other:?}"),
    }
    assert_eq!(batch, [&b"b"[..], b"c"], "the rest stay, unsent");

    // After the session's end, a batch of events gives what is left, then 0.
    let mut events = Vec::new();
    while client.next_events(&mut events, 8).await > 0 {}
    assert!(
        matches!(events.last(), Some(SessionEvent::Closed { .. })),
        "the last event is the close: {events:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_driver_authenticates_inline_and_hands_a_reply_to_the_awaiting_request_not_to_events() {
    let options = ServerOptions::new().authenticate_with(|credentials| credentials == b"open");
    let server = steadfast_tokio::listen("127.0.0.1:0".parse().unwrap(), options)
        .await
        .unwrap();
    let connect = |credentials: &'static [u8]| {
        let mut options = ClientOptions::new(vec![server.local_addr()]);
        options.config.credentials = Bytes::from_static(credentials);
        steadfast_tokio::connect(options).unwrap()
    };

    // Refused inline: the application never sees an Authenticate event.
    let refused = connect(b"wrong");
    let lost = common::session_lost(&refused).await;
    assert!(
        matches!(
            lost,
            steadfast_tokio::LostReason::Refused {
                code: steadfast_tokio::core::session::RefuseCode::AuthenticationFailed,
                ..
            }
        ),
        "{lost:?}"
    );

    // Accepted inline; the client answers the server's request.
    let client = connect(b"open");
    assert!(client.connected().await);
    let answering = {
        let client = client.clone();
        tokio::spawn(async move {
            while let Some(event) = client.next_event().await {
                if let SessionEvent::Received(m) = event {
                    let mut answer = b"re: ".to_vec();
                    answer.extend_from_slice(&m.payload);
                    client.reply(m.seq, Bytes::from(answer)).unwrap();
                }
            }
        })
    };
    let session = client.session().expect("a session");
    let reply = server
        .request(
            session,
            0,
            Bytes::from_static(b"ping"),
            Duration::from_secs(20),
        )
        .await
        .expect("the reply");
    assert_eq!(&reply[..], b"re: ping");

    // Neither the verdicts nor the reply reached the application's events.
    let mut events = Vec::new();
    server.try_events(&mut events, usize::MAX);
    for event in &events {
        assert!(
            !matches!(
                event,
                ServerEvent::Authenticate { .. }
                    | ServerEvent::Session {
                        event: SessionEvent::Reply { .. },
                        ..
                    }
            ),
            "routed by the driver, yet handed out: {event:?}"
        );
    }
    assert!(
        events.iter().any(|e| matches!(
            e,
            ServerEvent::Session {
                event: SessionEvent::Connected { .. },
                ..
            }
        )),
        "the accepted session's connect is an event: {events:?}"
    );
    client.close(steadfast_tokio::core::CLOSE_NORMAL, Bytes::new());
    answering.await.unwrap();
}

/// A store that keeps everything but fails to record a message as consumed.
struct ConsumeFails(steadfast_tokio::core::store::MemoryStore);

mod consume_fails {
    use steadfast_tokio::core::Seq;
    use steadfast_tokio::core::store::{Identity, Recovered, Store, StoreError, Stored};

    impl Store for super::ConsumeFails {
        fn recover(&mut self) -> Result<Recovered, StoreError> {
            self.0.recover()
        }
        fn identity(&mut self, identity: Identity) -> Result<(), StoreError> {
            self.0.identity(identity)
        }
        fn sent(&mut self, message: &Stored) -> Result<(), StoreError> {
            self.0.sent(message)
        }
        fn acknowledged(&mut self, below: Seq) -> Result<(), StoreError> {
            self.0.acknowledged(below)
        }
        fn arrived(&mut self, message: &Stored) -> Result<(), StoreError> {
            self.0.arrived(message)
        }
        fn consumed(&mut self, _: Seq) -> Result<(), StoreError> {
            Err(StoreError::Io("disk full".into()))
        }
        fn flush(&mut self) -> Result<(), StoreError> {
            self.0.flush()
        }
        fn clear(&mut self) -> Result<(), StoreError> {
            self.0.clear()
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_fails_as_a_message_is_taken_says_so_at_once() {
    let server = steadfast_tokio::listen("127.0.0.1:0".parse().unwrap(), ServerOptions::new())
        .await
        .unwrap();
    let client = steadfast_tokio::connect_with_store(
        ClientOptions::new(vec![server.local_addr()]),
        Box::new(ConsumeFails(Default::default())),
    )
    .unwrap();
    assert!(client.connected().await);
    let session = client.session().expect("a session");
    server
        .try_send(session, 0, Mode::Ordered, Bytes::from_static(b"hello"))
        .unwrap();
    let deadline = Duration::from_secs(20);
    loop {
        let event = tokio::time::timeout(deadline, client.next_event())
            .await
            .expect("the message within 20 s")
            .expect("the session runs");
        if let SessionEvent::Received(m) = event {
            assert_eq!(&m.payload[..], b"hello");
            break;
        }
    }
    // Taking the message made the store fail: the event saying so is ready when the call
    // returns, not left for the next read or timer to route.
    assert!(
        matches!(
            client.try_event(),
            Some(SessionEvent::DurabilityLost { .. })
        ),
        "DurabilityLost is ready at once"
    );
}

/// One round of [`a_server_shut_down_mid_flood_acknowledges_only_what_its_application_was_given`],
/// on a server split into `shards` parts: how many messages the client had acknowledged, and how
/// many the server's application got.
async fn shut_down_mid_flood(shards: usize) -> (u64, u64) {
    let mut options = ServerOptions::new();
    options.shards = shards;
    let server = steadfast_tokio::listen("127.0.0.1:0".parse().unwrap(), options)
        .await
        .unwrap();
    let client = steadfast_tokio::connect(ClientOptions::new(vec![server.local_addr()])).unwrap();
    assert!(client.connected().await);
    let first = client
        .send(0, Mode::Ordered, Bytes::from_static(&[0; 64]))
        .await
        .unwrap()
        .seq()
        .expect("a reliable message");
    let flood = {
        let client = client.clone();
        tokio::spawn(async move {
            let mut batch = std::collections::VecDeque::new();
            loop {
                batch.extend(std::iter::repeat_n(Bytes::from_static(&[0; 64]), 64));
                if client
                    .send_many(0, Mode::Ordered, &mut batch)
                    .await
                    .is_err()
                {
                    return;
                }
            }
        })
    };
    let mut given = 0u64;
    let mut events = Vec::new();
    let mut stopped = false;
    loop {
        let n = tokio::time::timeout(Duration::from_secs(20), server.next_events(&mut events, 64))
            .await
            .expect("events within 20 s");
        if n == 0 {
            break;
        }
        for event in events.drain(..) {
            if let ServerEvent::Session {
                event: SessionEvent::Received(_),
                ..
            } = event
            {
                given += 1;
            }
        }
        // Mid-flood, while the connection is reading: every message the application is given
        // from here on was read before the shutdown.
        if !stopped && given >= 20_000 {
            server.shutdown();
            stopped = true;
        }
    }
    assert!(stopped, "the flood reached the shutdown");
    tokio::time::timeout(Duration::from_secs(20), async {
        while client.is_connected() {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await
    .expect("the client sees the connection end within 20 s");
    let acknowledged = client.inspect(|c| c.channel().sender().base() - first);
    drop(client);
    flood.abort();
    (acknowledged, given)
}

/// Ten rounds of [`shut_down_mid_flood`] on a server of `shards` parts: rounds make the race
/// likely to show.
async fn acknowledges_only_what_was_given(shards: usize) {
    for round in 0..10 {
        let (acknowledged, given) = shut_down_mid_flood(shards).await;
        assert!(
            acknowledged <= given,
            "round {round}: the client had {acknowledged} messages acknowledged, the application \
             was given {given}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_shut_down_mid_flood_acknowledges_only_what_its_application_was_given() {
    // A read the connection made just before the shutdown, decoded just after, must not be
    // acknowledged: the application, told the events are over, never takes what it brought, and
    // the client, told it arrived, would not hand it back.
    acknowledges_only_what_was_given(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_split_server_shut_down_mid_flood_acknowledges_only_what_its_application_was_given() {
    // The parts stop one after another: the events may end only once the last has stopped, or a
    // part still reading acknowledges what the application is never given.
    acknowledges_only_what_was_given(4).await;
}

/// A server, and a client connected to it through a chaos proxy.
async fn through_proxy() -> (
    steadfast_tokio::ServerHandle,
    steadfast_tokio::chaos::ChaosProxy,
    steadfast_tokio::ClientHandle,
) {
    let server = listening().await;
    let proxy = steadfast_tokio::chaos::ChaosProxy::start(server.local_addr())
        .await
        .unwrap();
    let client = steadfast_tokio::connect(ClientOptions::new(vec![proxy.local_addr()])).unwrap();
    assert!(client.connected().await);
    (server, proxy, client)
}

/// Silences every connection through `proxy`; new ones go through.
fn blackhole(proxy: &steadfast_tokio::chaos::ChaosProxy) {
    proxy.apply(
        steadfast_tokio::chaos::Target::All,
        steadfast_tokio::chaos::Fault::Blackhole,
    );
}

/// Polls `future` once, in this task.
async fn polled_once<F: std::future::Future>(future: Pin<&mut F>) -> std::task::Poll<F::Output> {
    let mut future = Some(future);
    std::future::poll_fn(|cx| std::task::Poll::Ready(future.take().expect("polled once").poll(cx)))
        .await
}

/// `client`'s events until its session's end: the `Received` payloads, and what its last event
/// handed back.
async fn client_until_end(client: &steadfast_tokio::ClientHandle) -> (Vec<Bytes>, usize) {
    let mut got = Vec::new();
    loop {
        let event = tokio::time::timeout(Duration::from_secs(20), client.next_event())
            .await
            .expect("the session's end within 20 s")
            .expect("a last event");
        match event {
            SessionEvent::Received(m) => got.push(m.payload),
            SessionEvent::Closed { unacknowledged, .. }
            | SessionEvent::SessionLost { unacknowledged, .. } => {
                return (got, unacknowledged.len());
            }
            _ => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flush_then_a_close_loses_nothing_and_hands_nothing_back() {
    // Without the flush, a close made at once hands back every message not yet acknowledged,
    // and the server never gets them.
    let (server, client) = client_of_a_server(|_| {}).await;
    for n in 0..MESSAGES {
        client.send(0, Mode::Ordered, numbered(n)).await.unwrap();
    }
    tokio::time::timeout(Duration::from_secs(20), client.flush())
        .await
        .expect("flushed within 20 s")
        .expect("the session lives");
    client.close(0, Bytes::from_static(b"done"));
    let (_, handed_back) = client_until_end(&client).await;
    assert_eq!(
        handed_back, 0,
        "everything sent was acknowledged before the close"
    );
    let (got, _) = receive_in_batches(&server, MESSAGES).await;
    assert_eq!(got, (0..MESSAGES).map(numbered).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flush_waiting_on_a_silent_path_ends_when_the_session_does() {
    let (_server, proxy, client) = through_proxy().await;
    blackhole(&proxy);
    client
        .send(0, Mode::Ordered, Bytes::from_static(b"lost in the hole"))
        .await
        .unwrap();
    // Another task waits on the flush, so that only a wake-up can end it.
    let (waiting, waits) = tokio::sync::oneshot::channel();
    let flush = tokio::spawn({
        let client = client.clone();
        async move {
            let mut flush = std::pin::pin!(client.flush());
            let first = polled_once(flush.as_mut()).await;
            waiting.send(first.is_pending()).unwrap();
            flush.await
        }
    });
    assert!(waits.await.unwrap(), "no ack can come through a blackhole");
    client.close(0, Bytes::new());
    let flushed = tokio::time::timeout(Duration::from_secs(20), flush)
        .await
        .expect("the flush ends with the session")
        .unwrap();
    assert_eq!(flushed, Err(steadfast_tokio::FlushError::SessionEnded));
    let mut events = Vec::new();
    client.try_events(&mut events, usize::MAX);
    assert!(
        !events.iter().any(SessionEvent::ends_session),
        "the flush ended at the close, not a second later when the close gave up on a reply"
    );
    assert_eq!(
        client_until_end(&client).await.1,
        1,
        "the message comes back"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_flush_waiting_on_a_silent_path_ends_when_the_server_closes_the_session() {
    let (server, proxy, client) = through_proxy().await;
    client
        .send(0, Mode::Ordered, Bytes::from_static(b"hello"))
        .await
        .unwrap();
    let (_, session) = receive_in_batches(&server, 1).await;
    blackhole(&proxy);
    server
        .send(
            session,
            0,
            Mode::Ordered,
            Bytes::from_static(b"lost in the hole"),
        )
        .await
        .unwrap();
    let mut flush = std::pin::pin!(server.flush(session));
    assert!(
        polled_once(flush.as_mut()).await.is_pending(),
        "no ack can come through a blackhole"
    );
    server.close_session(session, 0, Bytes::new());
    let flushed = tokio::time::timeout(Duration::from_secs(20), flush)
        .await
        .expect("the flush ends with the session");
    assert_eq!(flushed, Err(steadfast_tokio::FlushError::SessionEnded));
    let mut events = Vec::new();
    server.try_events(&mut events, usize::MAX);
    assert!(
        !events
            .iter()
            .any(|e| matches!(e, ServerEvent::Session { event, .. } if event.ends_session())),
        "the flush ended at the close, not a second later when the close gave up on a reply"
    );
    drop(client);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_flush_returns_once_the_client_holds_every_message_sent_before_it() {
    let (server, client) = client_of_a_server(|_| {}).await;
    client
        .send(0, Mode::Ordered, Bytes::from_static(b"hello"))
        .await
        .unwrap();
    let (_, session) = receive_in_batches(&server, 1).await;
    for n in 0..MESSAGES {
        server
            .send(session, 0, Mode::Ordered, numbered(n))
            .await
            .unwrap();
    }
    tokio::time::timeout(Duration::from_secs(20), server.flush(session))
        .await
        .expect("flushed within 20 s")
        .expect("the session lives");
    let mut events = Vec::new();
    client.try_events(&mut events, usize::MAX);
    let got: Vec<Bytes> = events
        .into_iter()
        .filter_map(|e| match e {
            SessionEvent::Received(m) => Some(m.payload),
            _ => None,
        })
        .collect();
    assert_eq!(
        got,
        (0..MESSAGES).map(numbered).collect::<Vec<_>>(),
        "every message acknowledged is already among the client's events"
    );
    assert_eq!(
        server.flush(session).await,
        Ok(()),
        "nothing sent since: flushed at once"
    );
    server.close_session(session, 0, Bytes::new());
    loop {
        let event = tokio::time::timeout(Duration::from_secs(20), server.next_event())
            .await
            .expect("the session's end within 20 s")
            .expect("the server runs");
        if let ServerEvent::Session { event, .. } = event
            && event.ends_session()
        {
            break;
        }
    }
    assert_eq!(
        server.flush(session).await,
        Err(steadfast_tokio::FlushError::SessionEnded),
        "a session gone cannot be flushed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_most_once_sends_on_an_idle_connection_go_out_at_once_not_at_the_next_heartbeat() {
    // Heartbeats 20 s apart: a send left for the driver's next wake-up would wait that long.
    let mut server_options = ServerOptions::new();
    server_options.config.liveness.heartbeat_interval = Duration::from_secs(20);
    server_options.config.liveness.idle_timeout = Duration::from_secs(60);
    let server = steadfast_tokio::listen("127.0.0.1:0".parse().unwrap(), server_options)
        .await
        .unwrap();
    let mut options = ClientOptions::new(vec![server.local_addr()]);
    options.config.liveness.heartbeat_interval = Duration::from_secs(20);
    options.config.liveness.idle_timeout = Duration::from_secs(60);
    let client = steadfast_tokio::connect(options).unwrap();
    assert!(client.connected().await);
    for mode in [Mode::Unreliable, Mode::Sequenced, Mode::Ordered] {
        let payload = Bytes::from(format!("{mode:?}"));
        client.send(0, mode, payload.clone()).await.unwrap();
        let got = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                match server.next_event().await.expect("the server runs") {
                    ServerEvent::Session {
                        event: SessionEvent::Received(m),
                        ..
                    } => return m.payload,
                    ServerEvent::Session {
                        event: SessionEvent::ReceivedUnreliable { payload, .. },
                        ..
                    } => return payload,
                    _ => {}
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{mode:?} within 5 s, not at the next heartbeat"));
        assert_eq!(got, payload);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flush_waits_through_a_blackhole_and_the_resume_after_it() {
    let (server, proxy, client) = through_proxy().await;
    blackhole(&proxy);
    for n in 0..MESSAGES {
        client.send(0, Mode::Ordered, numbered(n)).await.unwrap();
    }
    let mut flush = std::pin::pin!(client.flush());
    assert!(
        polled_once(flush.as_mut()).await.is_pending(),
        "no ack can come through a blackhole"
    );
    // The client's idle timeout finds the path dead; it resumes on a new connection, which the
    // proxy lets through, and resends what the server lacks.
    tokio::time::timeout(Duration::from_secs(20), flush)
        .await
        .expect("flushed within 20 s")
        .expect("the session lives");
    assert!(
        client.counters().resumes >= 1,
        "the flush outlived its connection"
    );
    let (got, _) = receive_in_batches(&server, MESSAGES).await;
    assert_eq!(got, (0..MESSAGES).map(numbered).collect::<Vec<_>>());
}
