//! smol's sockets, timers and spawner, as the driver's [`Runtime`].

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};
use std::time::Instant;

use smol::Async;
use smol::io::{AsyncRead, AsyncWrite};
use steadfast_core::driver::{BoxFuture, FdWriter, Io, Listen, Runtime, Timer, TryWrite};

/// smol as the driver's runtime: tasks go to an executor, smol's global one unless the
/// application gives its own ([`Smol::on`]); sockets and timers go to async-io's reactor.
///
/// smol's global executor runs on one thread unless `SMOL_THREADS` says otherwise, and every
/// session's driver shares it with whatever else the application spawns there. An application
/// that runs its own executor, on as many threads as it wants, hands it over instead. The
/// sessions' tasks then live and die with it: dropping the executor drops them, and their sockets
/// close.
///
/// ```
/// # fn main() -> std::io::Result<()> {
/// use std::sync::Arc;
/// use steadfast_smol::{ClientOptions, ServerOptions, Smol};
///
/// let executor = Arc::new(smol::Executor::new());
/// let smol = Smol::on(&executor);
/// smol::block_on(executor.run(async {
///     let server = smol.listen("127.0.0.1:0".parse().unwrap(), ServerOptions::new()).await?;
///     let client = smol.connect(ClientOptions::new(vec![server.local_addr()]))?;
///     assert!(client.connected().await);
///     Ok(())
/// }))
/// # }
/// ```
///
/// `connect` and `listen` here are the application's calls. The driver's own
/// [`Runtime::connect`] (a TCP connection) is reached through the trait, as
/// `Runtime::connect(&smol, addr)`.
#[derive(Debug, Clone, Default)]
pub struct Smol {
    /// `None`: smol's global executor. Weak, because the executor holds the tasks that hold
    /// this: a strong reference would keep the executor, and every task on it, alive for good.
    executor: Option<Weak<smol::Executor<'static>>>,
}

impl Smol {
    /// Tasks on smol's global executor (`smol::spawn`).
    pub fn global() -> Self {
        Smol::default()
    }

    /// Tasks on `executor`. The application runs it (`executor.run(..)` on threads of its own);
    /// sessions make no progress while nothing does, and end when it is dropped.
    pub fn on(executor: &Arc<smol::Executor<'static>>) -> Self {
        Smol {
            executor: Some(Arc::downgrade(executor)),
        }
    }
}

/// A smol TCP stream with Nagle off: the core batches writes itself.
#[derive(Debug)]
pub struct Stream(smol::net::TcpStream);

impl Stream {
    /// Wraps a connected stream.
    pub fn new(stream: smol::net::TcpStream) -> io::Result<Self> {
        stream.set_nodelay(true)?;
        Ok(Stream(stream))
    }
}

/// A smol TCP listener.
#[derive(Debug)]
pub struct Listener(Arc<Async<std::net::TcpListener>>);

impl Listener {
    /// Wraps a bound listener.
    pub fn new(listener: smol::net::TcpListener) -> Self {
        // The reactor handle underneath, so accept can be polled without boxing a future per call.
        Listener(listener.into())
    }
}

/// async-io's timer, made to stay ready once its deadline has passed (as the driver's [`Timer`]
/// promises): a fired async-io timer is otherwise pending forever until it is set again. Every
/// runtime on async-io's reactor can use it (the async-std adapter does).
#[derive(Debug)]
pub struct AsyncIoTimer {
    timer: smol::Timer,
    deadline: Instant,
}

impl AsyncIoTimer {
    /// A timer that fires at `deadline`.
    pub fn at(deadline: Instant) -> Self {
        AsyncIoTimer {
            timer: smol::Timer::at(deadline),
            deadline,
        }
    }
}

impl Timer for AsyncIoTimer {
    fn reset(mut self: Pin<&mut Self>, deadline: Instant) {
        self.deadline = deadline;
        self.timer.set_at(deadline);
    }

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if Instant::now() >= self.deadline {
            return Poll::Ready(());
        }
        Pin::new(&mut self.timer).poll(cx).map(|_| ())
    }
}

impl Runtime for Smol {
    type Stream = Stream;
    type Listener = Listener;

    fn now() -> Instant {
        Instant::now()
    }

    fn timer(&self, deadline: Instant) -> Pin<Box<dyn Timer>> {
        Box::pin(AsyncIoTimer::at(deadline))
    }

    fn spawn(&self, future: BoxFuture<()>) {
        match &self.executor {
            Some(executor) => {
                // An executor already dropped has dropped every task of these sessions: this
                // one goes with them.
                if let Some(executor) = executor.upgrade() {
                    executor.spawn(future).detach();
                }
            }
            None => smol::spawn(future).detach(),
        }
    }

    fn connect(&self, addr: SocketAddr) -> BoxFuture<io::Result<Stream>> {
        Box::pin(async move { Stream::new(smol::net::TcpStream::connect(addr).await?) })
    }
}

impl Io for Stream {
    fn poll_read(&mut self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }

    fn poll_write(&mut self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_shutdown(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // async-net's close shuts the write side down.
        Pin::new(&mut self.0).poll_close(cx)
    }

    fn try_writer(&self) -> Option<Arc<dyn TryWrite>> {
        // A clone shares the socket, which stays open while the writer lives.
        Some(Arc::new(FdWriter(self.0.clone())))
    }
}

impl Listen for Listener {
    type Stream = Stream;

    fn poll_accept(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<(Stream, SocketAddr)>> {
        loop {
            match self.0.get_ref().accept() {
                Ok((s, peer)) => {
                    let s = smol::net::TcpStream::from(Async::new(s)?);
                    return Poll::Ready(Stream::new(s).map(|s| (s, peer)));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // Ready means readiness came since the last try: accept again.
                    if let Err(e) = smol::ready!(self.0.poll_readable(cx)) {
                        return Poll::Ready(Err(e));
                    }
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.0.get_ref().local_addr()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_timer_past_its_deadline_stays_ready_until_moved() {
        let mut timer = Smol::global().timer(Instant::now() + Duration::from_millis(10));
        smol::block_on(std::future::poll_fn(|cx| timer.as_mut().poll(cx)));
        let mut cx = Context::from_waker(std::task::Waker::noop());
        // The driver may poll its alarm again at an unchanged deadline; it must not sleep forever.
        assert!(timer.as_mut().poll(&mut cx).is_ready());
        timer
            .as_mut()
            .reset(Instant::now() + Duration::from_secs(60));
        assert!(timer.as_mut().poll(&mut cx).is_pending());
        timer
            .as_mut()
            .reset(Instant::now() + Duration::from_millis(10));
        smol::block_on(std::future::poll_fn(|cx| timer.as_mut().poll(cx)));
    }
}
