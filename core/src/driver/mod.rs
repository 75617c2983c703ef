//! The one async loop every runtime adapter runs (feature `driver`).
//!
//! The state machines in this crate are sans-IO; something must still read sockets, write what they
//! say, sleep until their deadlines and pass commands in and events out. That loop has the same shape
//! on tokio, smol and async-std, so it is written once here, generic over a small [`Runtime`] trait
//! (quinn's model), and each adapter crate supplies only the runtime's sockets, timers and spawner.
//! The loop still reads no clock and draws no randomness of its own: both come from the adapter.
//!
//! | module | concept |
//! |---|---|
//! | [`client`] | [`ClientHandle`] and the [`ClientDriver`] future that owns a client's connection |
//! | [`server`] | [`ServerHandle`], the accept-and-timer future and one task per connection |
//! | `arming` | when the server's timer task sleeps until, and when another task must wake it |
//! | `batch` | many sends per lock of the shared state |
//! | `direct` | a send's frames written by its own thread while the driver has nothing to write |
//! | `inbox` | events on their way to the application, behind a lock of their own |
//! | `read` | a connection's reads, cut where its frames end so that large frames arrive whole |
//! | `shared` | the state the application's threads and the driver share, behind one mutex |
//! | `sync` | the `std`/`loom` switch for that state's primitives |
//!
//! ## Why a driver task, not the application, acknowledges
//! Receipt acks and heartbeats are written by the driver as soon as bytes arrive, never by application
//! code: a client whose threads are all busy (the field report's saturated CPUs) keeps acknowledging as
//! long as the runtime's own threads get scheduled. Application threads — async or plain — only lock
//! the shared state for the duration of a core call, so a send or reply from a busy worker thread never
//! waits for the network. A send made while the connection's driver has nothing to write is written
//! by the sending thread itself, with a write that never blocks (`direct`): the hand-off to the
//! driver task is what held messages up at a steady rate on a busy machine.

use alloc::boxed::Box;
use core::future::Future;
use core::net::SocketAddr;
use core::pin::Pin;
use core::task::{Context, Poll};
use std::io;

mod arming;
mod batch;
pub mod client;
mod direct;
mod inbox;
mod read;
mod requests;
pub mod server;
mod shared;
mod sync;

pub use client::{ClientDriver, ClientHandle, ClientOptions};
#[cfg(unix)]
pub use direct::FdWriter;
pub use direct::TryWrite;
pub use server::{ServerDriver, ServerHandle, ServerOptions};

pub(crate) use read::{ReadBuf, poll_read_chunk};

use crate::time::{Duration, Instant};

/// A boxed, sendable future: what [`Runtime::spawn`] and [`Runtime::connect`] deal in.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// What the driver needs from an async runtime: time, timers, tasks and TCP.
///
/// Implemented once per adapter crate; applications never implement it.
pub trait Runtime: Clone + Send + Sync + Unpin + 'static {
    /// A connected byte stream.
    type Stream: Io;
    /// A bound listener.
    type Listener: Listen<Stream = Self::Stream>;

    /// The runtime's monotonic clock (tokio's, so that paused time in tests is honoured).
    fn now() -> std::time::Instant
    where
        Self: Sized;
    /// A timer that fires at `deadline` and can be moved.
    fn timer(&self, deadline: std::time::Instant) -> Pin<Box<dyn Timer>>;
    /// Runs `future` in the background to completion.
    fn spawn(&self, future: BoxFuture<()>);
    /// Opens a TCP connection (the driver bounds how long it may take).
    fn connect(&self, addr: SocketAddr) -> BoxFuture<io::Result<Self::Stream>>;
}

/// A resettable timer.
pub trait Timer: Send {
    /// Moves the deadline.
    fn reset(self: Pin<&mut Self>, deadline: std::time::Instant);
    /// Ready once the deadline has passed, and ready again on every poll until it is reset (async-io's
    /// timer fires once and must be wrapped to keep this promise).
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()>;
}

/// A connected byte stream, polled like `AsyncRead`/`AsyncWrite`.
pub trait Io: Send + Unpin + 'static {
    /// Reads into `buf`; `Ok(0)` is the end of the stream.
    fn poll_read(&mut self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>>;
    /// Writes some of `buf`.
    fn poll_write(&mut self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>>;
    /// Shuts the write side down.
    fn poll_shutdown(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
    /// A way for other threads to write to this stream without waiting while the driver owns it
    /// (see [`TryWrite`]); `None`, the default, keeps every write on the driver task. The writer
    /// must keep the socket open while it lives, and write to the same byte stream `poll_write`
    /// does, with nothing buffered in between.
    fn try_writer(&self) -> Option<alloc::sync::Arc<dyn TryWrite>> {
        None
    }
}

/// A bound listener.
pub trait Listen: Send + Unpin + 'static {
    /// The connections it accepts.
    type Stream: Io;
    /// The next connection, with its peer's address.
    fn poll_accept(&mut self, cx: &mut Context<'_>)
    -> Poll<io::Result<(Self::Stream, SocketAddr)>>;
    /// The address it is bound to.
    fn local_addr(&self) -> io::Result<SocketAddr>;
}

/// Why an awaited request ended without a reply.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum RequestError {
    /// The request could not be sent.
    Send(crate::SendError),
    /// Its deadline passed without a reply.
    TimedOut,
    /// The session ended (lost or closed) before the reply came.
    SessionEnded,
}

impl core::fmt::Display for RequestError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            RequestError::Send(e) => write!(f, "request not sent: {e}"),
            RequestError::TimedOut => f.write_str("request timed out"),
            RequestError::SessionEnded => f.write_str("session ended before the reply"),
        }
    }
}

impl core::error::Error for RequestError {}

/// Why [`ClientHandle::flush`] or [`ServerHandle::flush`] ended before the peer acknowledged every
/// message sent before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum FlushError {
    /// The session ended (lost or closed) first: its last event hands back the messages whose
    /// delivery is unknown.
    SessionEnded,
}

impl core::fmt::Display for FlushError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            FlushError::SessionEnded => f.write_str("session ended before the peer acknowledged"),
        }
    }
}

impl core::error::Error for FlushError {}

/// Maps the runtime's clock onto the core's [`Instant`]: nanoseconds since the endpoint started.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Clock {
    origin: std::time::Instant,
    now: fn() -> std::time::Instant,
}

impl Clock {
    pub(crate) fn new(now: fn() -> std::time::Instant) -> Self {
        Clock { origin: now(), now }
    }

    /// The core's idea of the runtime's present.
    pub(crate) fn now(&self) -> Instant {
        self.at((self.now)())
    }

    pub(crate) fn at(&self, t: std::time::Instant) -> Instant {
        Instant::from_duration(t.saturating_duration_since(self.origin))
    }

    pub(crate) fn to_std(self, t: Instant) -> std::time::Instant {
        self.origin + Duration::from_nanos(t.as_nanos())
    }
}

/// Writes as much of `out` as the stream takes now; `Ready(Ok)` once it is all written.
pub(crate) fn poll_write_all<S: Io>(
    io: &mut S,
    cx: &mut Context<'_>,
    out: &mut bytes::BytesMut,
) -> Poll<io::Result<()>> {
    use bytes::Buf;
    while !out.is_empty() {
        match io.poll_write(cx, out) {
            Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
            Poll::Ready(Ok(n)) => out.advance(n),
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => return Poll::Pending,
        }
    }
    Poll::Ready(Ok(()))
}

/// Whether `next`, the deadline the core wants now, comes before `armed`, the one a driver sleeps
/// until: if so, the driver must be woken to set its timer again.
pub(crate) fn sooner(
    next: Option<crate::time::Instant>,
    armed: Option<crate::time::Instant>,
) -> bool {
    match (next, armed) {
        (Some(t), Some(armed)) => t < armed,
        (t, _) => t.is_some(),
    }
}

/// Keeps one timer armed at a changing deadline, creating it on first use.
pub(crate) struct Alarm {
    timer: Option<(std::time::Instant, Pin<Box<dyn Timer>>)>,
}

impl Alarm {
    pub(crate) fn new() -> Self {
        Alarm { timer: None }
    }

    /// Ready when `deadline` has passed; otherwise registers for a wake-up at it.
    pub(crate) fn poll<R: Runtime>(
        &mut self,
        rt: &R,
        cx: &mut Context<'_>,
        deadline: std::time::Instant,
    ) -> Poll<()> {
        match &mut self.timer {
            Some((at, t)) => {
                if *at != deadline {
                    *at = deadline;
                    t.as_mut().reset(deadline);
                }
            }
            None => self.timer = Some((deadline, rt.timer(deadline))),
        }
        match &mut self.timer {
            Some((_, t)) => t.as_mut().poll(cx),
            None => Poll::Pending,
        }
    }
}
