//! The shared driver (`steadfast_core::driver`) under faults a real socket produces only by chance:
//! smol's sockets wrapped in a runtime whose first accept fails, or whose first connection's writes
//! fail on demand. Two of them found bugs in the driver (a failed write that dropped the reconnect, a failed accept that stopped accepting) and now guard their fixes.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use steadfast_smol::core::driver::{BoxFuture, Io, Listen, Runtime, Timer};
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
}

struct FaultyStream {
    inner: Stream,
    break_writes: Option<Arc<AtomicBool>>,
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
}

/// A listener whose first accept fails (as with too many open files); it registers no wake-up, as
/// no runtime's listener does when it reports an error.
struct FaultyListener {
    inner: Listener,
    failed: bool,
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
        Smol.timer(deadline)
    }

    fn spawn(&self, future: BoxFuture<()>) {
        Smol.spawn(future)
    }

    fn connect(&self, addr: SocketAddr) -> BoxFuture<io::Result<FaultyStream>> {
        let first = !self.connected_once.swap(true, Ordering::SeqCst);
        let break_writes = first.then(|| self.break_writes.clone());
        let connecting = Smol.connect(addr);
        Box::pin(async move {
            let inner = connecting.await?;
            Ok(FaultyStream {
                inner,
                break_writes,
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
            Smol,
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
        let mut options = ClientOptions::new(vec![server.local_addr()]);
        // Every connection counts as stable, so the break is retried at once.
        options.config.reconnect.stable_after = Duration::ZERO;
        let (client, driver) =
            steadfast_smol::core::driver::client::client(rt.clone(), options, entropy()).unwrap();
        smol::spawn(driver).detach();
        assert!(client.connected().await);

        rt.break_writes.store(true, Ordering::SeqCst);
        client
            .send(0, Mode::Ordered, Bytes::from_static(b"after the break"))
            .await
            .unwrap();
        // Well inside the 3 s idle timeout, so only the write error can have set off the resume.
        let received = within(Duration::from_millis(1500), async {
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
        .await;
        assert_eq!(
            received.as_deref(),
            Some(&b"after the break"[..]),
            "delivered over a new connection within 1.5 s (client connected: {})",
            client.is_connected()
        );
    });
}
