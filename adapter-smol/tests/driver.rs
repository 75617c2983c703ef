//! The shared driver (`steadfast_core::driver`) under faults a real socket produces only by chance:
//! smol's sockets wrapped in a runtime whose first accept fails, or whose first connection's writes
//! fail on demand. The same wrapping counts the writes application threads make themselves
//! (`Io::try_writer`), to show that they happen and keep the stream whole. Two of them found bugs in the driver (a failed write that dropped the reconnect, a failed accept that stopped accepting) and now guard their fixes.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use steadfast_smol::core::driver::{BoxFuture, Io, Listen, Runtime, Timer, TryWrite};
use steadfast_smol::core::session::Entropy;
use steadfast_smol::{
    ClientOptions, Listener, Mode, ServerEvent, ServerOptions, SessionEvent, Smol, Stream,
};

/// Smol, with faults on demand.
#[derive(Clone, Default)]
struct Faulty {
    /// Set: the first connection's writes fail from now on.
    break_writes: Arc<AtomicBool>,
    /// The first connection was made (later ones are left alone).
    connected_once: Arc<AtomicBool>,
    /// Direct writes made through the client's connections.
    direct_writes: Arc<AtomicU64>,
    /// The client's direct writers still alive: each holds a share of its socket.
    live_writers: Arc<AtomicU64>,
}

struct FaultyStream {
    inner: Stream,
    break_writes: Option<Arc<AtomicBool>>,
    direct_writes: Arc<AtomicU64>,
    live_writers: Arc<AtomicU64>,
}

/// The stream's own direct writer, counted, and broken with its stream.
struct CountedWriter {
    inner: Arc<dyn TryWrite>,
    writes: Arc<AtomicU64>,
    broken: Option<Arc<AtomicBool>>,
    live: Arc<AtomicU64>,
}

impl Drop for CountedWriter {
    fn drop(&mut self) {
        self.live.fetch_sub(1, Ordering::SeqCst);
    }
}

impl TryWrite for CountedWriter {
    fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
        self.writes.fetch_add(1, Ordering::SeqCst);
        if self
            .broken
            .as_ref()
            .is_some_and(|b| b.load(Ordering::SeqCst))
        {
            return Err(io::ErrorKind::BrokenPipe.into());
        }
        self.inner.try_write(buf)
    }
}

impl Io for FaultyStream {
    fn poll_read(&mut self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        self.inner.poll_read(cx, buf)
    }

    fn poll_write(&mut self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if let Some(broken) = &self.break_writes
            && broken.load(Ordering::SeqCst)
        {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        self.inner.poll_write(cx, buf)
    }

    fn poll_shutdown(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.inner.poll_shutdown(cx)
    }

    fn try_writer(&self) -> Option<Arc<dyn TryWrite>> {
        let inner = self.inner.try_writer()?;
        self.live_writers.fetch_add(1, Ordering::SeqCst);
        Some(Arc::new(CountedWriter {
            inner,
            writes: self.direct_writes.clone(),
            broken: self.break_writes.clone(),
            live: self.live_writers.clone(),
        }))
    }
}

/// A listener whose first accept fails (as with too many open files); it registers no wake-up, as
/// no runtime's listener does when it reports an error.
struct FaultyListener {
    inner: Listener,
    failed: bool,
    /// Direct writes made through the accepted connections.
    direct_writes: Arc<AtomicU64>,
}

impl Listen for FaultyListener {
    type Stream = FaultyStream;

    fn poll_accept(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<(FaultyStream, SocketAddr)>> {
        if !self.failed {
            self.failed = true;
            return Poll::Ready(Err(io::Error::other("too many open files (simulated)")));
        }
        self.inner.poll_accept(cx).map_ok(|(inner, peer)| {
            let s = FaultyStream {
                inner,
                break_writes: None,
                direct_writes: self.direct_writes.clone(),
                live_writers: Arc::default(),
            };
            (s, peer)
        })
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

impl Runtime for Faulty {
    type Stream = FaultyStream;
    type Listener = FaultyListener;

    fn now() -> Instant {
        Instant::now()
    }

    fn timer(&self, deadline: Instant) -> Pin<Box<dyn Timer>> {
        Smol::global().timer(deadline)
    }

    fn spawn(&self, future: BoxFuture<()>) {
        Smol::global().spawn(future)
    }

    fn connect(&self, addr: SocketAddr) -> BoxFuture<io::Result<FaultyStream>> {
        let first = !self.connected_once.swap(true, Ordering::SeqCst);
        let break_writes = first.then(|| self.break_writes.clone());
        let direct_writes = self.direct_writes.clone();
        let live_writers = self.live_writers.clone();
        let connecting = Runtime::connect(&Smol::global(), addr);
        Box::pin(async move {
            let inner = connecting.await?;
            Ok(FaultyStream {
                inner,
                break_writes,
                direct_writes,
                live_writers,
            })
        })
    }
}

fn entropy() -> Box<dyn Entropy> {
    Box::new(rand_core::UnwrapErr(rand_core::OsRng))
}

/// `what`'s outcome, or `None` if it takes longer than `limit`.
async fn within<T>(limit: Duration, what: impl Future<Output = T>) -> Option<T> {
    smol::future::or(async { Some(what.await) }, async {
        smol::Timer::after(limit).await;
        None
    })
    .await
}

/// The payload of the first message `server` receives, if one comes within `limit`.
async fn first_received(server: &steadfast_smol::ServerHandle, limit: Duration) -> Option<Bytes> {
    within(limit, async {
        loop {
            if let Some(ServerEvent::Session {
                event: SessionEvent::Received(m),
                ..
            }) = server.next_event().await
            {
                break m.payload;
            }
        }
    })
    .await
}

/// Counts how often the runtime polls `inner`.
struct Counted<F> {
    inner: F,
    polls: Arc<AtomicU64>,
}

impl<F: Future + Unpin> Future for Counted<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        self.polls.fetch_add(1, Ordering::Relaxed);
        Pin::new(&mut self.inner).poll(cx)
    }
}

#[test]
fn an_idle_server_without_sessions_sleeps_instead_of_polling_itself() {
    smol::block_on(async {
        let listener = Listener::new(smol::net::TcpListener::bind("127.0.0.1:0").await.unwrap());
        let (server, driver) = steadfast_smol::core::driver::server::server(
            Smol::global(),
            listener,
            ServerOptions::new(),
            entropy(),
        )
        .unwrap();
        let polls = Arc::new(AtomicU64::new(0));
        smol::spawn(Counted {
            inner: driver,
            polls: polls.clone(),
        })
        .detach();
        smol::Timer::after(Duration::from_millis(500)).await;
        let n = polls.load(Ordering::Relaxed);
        // Nothing connects and nothing is scheduled: a handful of polls at most.
        assert!(
            n < 20,
            "an idle server driver was polled {n} times in 500 ms"
        );
        server.shutdown();
    });
}

#[test]
fn a_failed_accept_does_not_stop_the_server_accepting() {
    smol::block_on(async {
        let listener = FaultyListener {
            inner: Listener::new(smol::net::TcpListener::bind("127.0.0.1:0").await.unwrap()),
            failed: false,
            direct_writes: Arc::default(),
        };
        let (server, driver) = steadfast_smol::core::driver::server::server(
            Faulty::default(),
            listener,
            ServerOptions::new(),
            entropy(),
        )
        .unwrap();
        smol::spawn(driver).detach();
        let client =
            steadfast_smol::connect(ClientOptions::new(vec![server.local_addr()])).unwrap();
        let connected = within(Duration::from_secs(3), client.connected()).await;
        assert_eq!(
            connected,
            Some(true),
            "accepted within 3 s of a failed accept"
        );
    });
}

#[test]
fn a_failed_write_leads_to_a_resume_like_a_failed_read() {
    smol::block_on(async {
        let server = steadfast_smol::listen("127.0.0.1:0".parse().unwrap(), ServerOptions::new())
            .await
            .unwrap();
        let rt = Faulty::default();
        let client = client_of(&rt, &server).await;

        rt.break_writes.store(true, Ordering::SeqCst);
        client
            .send(0, Mode::Ordered, Bytes::from_static(b"after the break"))
            .await
            .unwrap();
        // Well inside the 3 s idle timeout, so only the write error can have set off the resume.
        let received = first_received(&server, Duration::from_millis(1500)).await;
        assert_eq!(
            received.as_deref(),
            Some(&b"after the break"[..]),
            "delivered over a new connection within 1.5 s (client connected: {})",
            client.is_connected()
        );
    });
}

/// A server on `rt` whose application replies to every message with its payload, and
/// the counter of its connections' direct writes.
async fn echo_server(rt: &Faulty) -> (steadfast_smol::ServerHandle, Arc<AtomicU64>) {
    let direct_writes = Arc::new(AtomicU64::new(0));
    let listener = FaultyListener {
        inner: Listener::new(smol::net::TcpListener::bind("127.0.0.1:0").await.unwrap()),
        // Accepts at once: this listener's faults are not under test here.
        failed: true,
        direct_writes: direct_writes.clone(),
    };
    let (server, driver) = steadfast_smol::core::driver::server::server(
        rt.clone(),
        listener,
        ServerOptions::new(),
        entropy(),
    )
    .unwrap();
    smol::spawn(driver).detach();
    let app = server.clone();
    smol::spawn(async move {
        while let Some(event) = app.next_event().await {
            if let ServerEvent::Session {
                session,
                event: SessionEvent::Received(m),
            } = event
            {
                let _ = app.reply(session, m.seq, m.payload);
            }
        }
    })
    .detach();
    (server, direct_writes)
}

/// A client of `server` on `rt`, with options as `configure` leaves them, and its driver, not yet
/// spawned.
fn client_parts(
    rt: &Faulty,
    server: &steadfast_smol::ServerHandle,
    configure: impl FnOnce(&mut ClientOptions),
) -> (
    steadfast_smol::ClientHandle,
    steadfast_smol::core::driver::ClientDriver<Faulty>,
) {
    let mut options = ClientOptions::new(vec![server.local_addr()]);
    // Every connection counts as stable, so a break is retried at once.
    options.config.reconnect.stable_after = Duration::ZERO;
    configure(&mut options);
    steadfast_smol::core::driver::client::client(rt.clone(), options, entropy()).unwrap()
}

/// A client of `server` on `rt`, connected.
async fn client_of(
    rt: &Faulty,
    server: &steadfast_smol::ServerHandle,
) -> steadfast_smol::ClientHandle {
    let (client, driver) = client_parts(rt, server, |_| {});
    smol::spawn(driver).detach();
    assert!(client.connected().await);
    client
}

#[test]
fn requests_and_replies_on_an_idle_connection_are_written_by_the_threads_that_make_them() {
    smol::block_on(async {
        let rt = Faulty::default();
        let (server, server_direct) = echo_server(&rt).await;
        let client = client_of(&rt, &server).await;
        for i in 0..20u32 {
            let payload = Bytes::from(i.to_be_bytes().to_vec());
            let reply = within(
                Duration::from_secs(3),
                client.request(0, payload.clone(), Duration::from_secs(3)),
            )
            .await;
            assert_eq!(reply, Some(Ok(payload)), "round {i}");
        }
        // Each side writes nothing between one round and the next, so its sends find the path
        // open: all but the odd round whose ack the driver was writing at that moment.
        let client_direct = rt.direct_writes.load(Ordering::SeqCst);
        let server_direct = server_direct.load(Ordering::SeqCst);
        eprintln!("direct writes: client {client_direct}, server {server_direct}");
        assert!(
            client_direct >= 10,
            "client requests written direct: {client_direct} of 20"
        );
        assert!(
            server_direct >= 10,
            "server replies written direct: {server_direct} of 20"
        );
    });
}

#[test]
fn a_failed_direct_write_leads_to_a_resume_like_a_failed_driver_write() {
    smol::block_on(async {
        let rt = Faulty::default();
        let (server, _) = echo_server(&rt).await;
        // Acks wait up to a second, so that no ack timer has the driver write between the round
        // trip below and the request after the break, however slowly this thread is scheduled.
        let (client, driver) = client_parts(&rt, &server, |o| {
            o.config.channel.max_ack_delay = Duration::from_secs(1);
        });
        smol::spawn(driver).detach();
        assert!(client.connected().await);
        // A round trip leaves the client's driver with nothing to write: the path is open.
        let warm = client
            .request(0, Bytes::from_static(b"warm"), Duration::from_secs(3))
            .await;
        assert_eq!(warm, Ok(Bytes::from_static(b"warm")));

        rt.break_writes.store(true, Ordering::SeqCst);
        let before = rt.direct_writes.load(Ordering::SeqCst);
        let reply = within(
            Duration::from_millis(1500),
            client.request(
                0,
                Bytes::from_static(b"after the break"),
                Duration::from_secs(3),
            ),
        )
        .await;
        assert!(
            rt.direct_writes.load(Ordering::SeqCst) > before,
            "the request after the break was tried direct first"
        );
        // Well inside the 3 s idle timeout, so only the write error can have set off the resume.
        assert_eq!(
            reply,
            Some(Ok(Bytes::from_static(b"after the break"))),
            "answered over a new connection within 1.5 s"
        );
    });
}

#[test]
fn sends_from_many_threads_arrive_whole_and_in_order_with_direct_writes_among_them() {
    const THREADS: u64 = 4;
    const EACH: u64 = 3_000;
    smol::block_on(async {
        let rt = Faulty::default();
        let (server, server_direct) = echo_server(&rt).await;
        let client = client_of(&rt, &server).await;
        let pause = Arc::new(std::sync::Barrier::new(THREADS as usize));
        let senders: Vec<_> = (0..THREADS)
            .map(|t| {
                let client = client.clone();
                let pause = pause.clone();
                std::thread::spawn(move || {
                    for i in 0..EACH {
                        let payload = Bytes::from([t.to_be_bytes(), i.to_be_bytes()].concat());
                        client.send_blocking(t, Mode::Ordered, payload).unwrap();
                        // Now and then every thread stops while one makes a round trip, after
                        // which the connection is idle: the next sends go direct, and direct
                        // writes mix with the driver's instead of only opening the run.
                        if i % 100 == 99 {
                            pause.wait();
                            if t == 0 {
                                let ping = Bytes::from_static(b"ping");
                                let pong = smol::block_on(client.request(
                                    0,
                                    ping.clone(),
                                    Duration::from_secs(3),
                                ));
                                assert_eq!(pong, Ok(ping));
                            }
                            pause.wait();
                        }
                    }
                })
            })
            .collect();
        // Every reply once; each thread's messages in the order it sent them (a reply carries
        // the message's payload, and replies come back in the order the server took messages).
        let mut next = [0u64; THREADS as usize];
        let mut replies = 0;
        while replies < THREADS * EACH {
            let event = within(Duration::from_secs(10), client.next_event()).await;
            match event {
                Some(Some(SessionEvent::Reply { payload, .. })) => {
                    let t = u64::from_be_bytes(payload[..8].try_into().unwrap());
                    let i = u64::from_be_bytes(payload[8..].try_into().unwrap());
                    assert_eq!(i, next[t as usize], "thread {t}'s messages in order");
                    next[t as usize] += 1;
                    replies += 1;
                }
                Some(Some(SessionEvent::Disconnected { cause })) => {
                    panic!("the connection broke: {cause:?}")
                }
                Some(Some(_)) => {}
                Some(None) => panic!("the session ended"),
                None => panic!("stalled after {replies} replies: {next:?}"),
            }
        }
        for s in senders {
            s.join().unwrap();
        }
        assert_eq!(next, [EACH; THREADS as usize]);
        let client_direct = rt.direct_writes.load(Ordering::SeqCst);
        let server_direct = server_direct.load(Ordering::SeqCst);
        // The server's replies come in bursts its connection's task mostly writes; the test of
        // requests above shows them written direct when the connection is idle.
        eprintln!("direct writes: client {client_direct}, server {server_direct}");
        assert!(client_direct > 0, "no send was written direct");
    });
}

#[test]
fn a_driver_dropped_with_its_runtime_lets_its_socket_go_while_the_application_keeps_its_handle() {
    smol::block_on(async {
        let rt = Faulty::default();
        let (server, _) = echo_server(&rt).await;
        let (client, driver) = client_parts(&rt, &server, |_| {});
        // The driver on an executor of its own, which goes away as a runtime shut down would.
        let executor = smol::Executor::new();
        let task = executor.spawn(driver);
        assert!(executor.run(client.connected()).await);
        assert_eq!(rt.live_writers.load(Ordering::SeqCst), 1);
        drop(task);
        drop(executor);
        // The direct writer, and the share of the socket it holds, went with the driver, though
        // `client` is still held.
        assert_eq!(rt.live_writers.load(Ordering::SeqCst), 0);
        drop(client);
    });
}

#[test]
fn sessions_given_an_executor_run_their_drivers_there_not_on_the_global_one() {
    let executor = Arc::new(smol::Executor::new());
    let smol = Smol::on(&executor);
    smol::block_on(executor.run(async {
        let server = smol
            .listen("127.0.0.1:0".parse().unwrap(), ServerOptions::new())
            .await
            .unwrap();
        // This block is not one of the executor's tasks: only the server's driver can be.
        assert!(
            !executor.is_empty(),
            "the server's driver runs on the executor given"
        );
        let client = smol
            .connect(ClientOptions::new(vec![server.local_addr()]))
            .unwrap();
        client
            .send(0, Mode::Ordered, Bytes::from_static(b"on my executor"))
            .await
            .unwrap();
        let received = first_received(&server, Duration::from_secs(10)).await;
        assert_eq!(received.as_deref(), Some(&b"on my executor"[..]));
        drop(client);
        server.shutdown();
    }));
    // Shut down and closed, the drivers end: nothing of theirs is left on the executor.
    let drained = smol::block_on(executor.run(within(Duration::from_secs(10), async {
        while !executor.is_empty() {
            smol::Timer::after(Duration::from_millis(1)).await;
        }
    })));
    assert!(
        drained.is_some(),
        "the drivers ended on the executor they ran on"
    );
}

#[test]
fn dropping_its_executor_ends_the_sessions_on_it_and_lets_their_sockets_go() {
    let executor = Arc::new(smol::Executor::new());
    let smol = Smol::on(&executor);
    let server = smol::block_on(
        executor.run(smol.listen("127.0.0.1:0".parse().unwrap(), ServerOptions::new())),
    )
    .unwrap();
    let addr = server.local_addr();
    let held = Arc::downgrade(&executor);
    drop(server);
    drop(executor);
    // The runtime holds the executor weakly: the server's driver, a task of the executor, does
    // not keep it alive, so dropping it drops the driver and closes the listener.
    assert!(held.upgrade().is_none(), "the executor is gone");
    std::net::TcpListener::bind(addr).expect("the listener's port is free again");
}

#[test]
fn an_overflow_that_closes_a_session_is_an_event_when_the_send_returns() {
    // One thread runs the executor and the application: between its awaits no driver runs, so
    // only the send itself can have routed the event.
    let executor = Arc::new(smol::Executor::new());
    let smol = Smol::on(&executor);
    smol::block_on(executor.run(async {
        let mut options = ServerOptions::new();
        options.config.overflow = steadfast_smol::core::server::Overflow::CloseSession;
        options.config.channel.max_queued_messages = 8;
        let server = smol
            .listen("127.0.0.1:0".parse().unwrap(), options)
            .await
            .unwrap();
        let client = smol
            .connect(ClientOptions::new(vec![server.local_addr()]))
            .unwrap();
        assert!(client.connected().await);
        let session = loop {
            if let Some(ServerEvent::Session {
                session,
                event: SessionEvent::Connected { .. },
            }) = server.next_event().await
            {
                break session;
            }
        };
        let mut sent = 0;
        while server
            .try_send(session, 0, Mode::Ordered, Bytes::from_static(b"x"))
            .is_ok()
        {
            sent += 1;
            assert!(sent <= 8, "a queue of 8 overflows by the ninth send");
        }
        let lost = std::iter::from_fn(|| server.try_event()).any(|e| {
            matches!(
                e,
                ServerEvent::Session {
                    event: SessionEvent::SessionLost { .. },
                    ..
                }
            )
        });
        assert!(lost, "SessionLost is ready when the refused send returns");
    }));
}
