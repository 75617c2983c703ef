//! async-std's sockets and spawner, and async-io's timer, as the driver's [`Runtime`].

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use futures_io::{AsyncRead, AsyncWrite};
use steadfast_core::driver::{BoxFuture, FdWriter, Io, Listen, Runtime, Timer, TryWrite};

/// async-std as the driver's runtime: tasks go to its global executor, sockets and timers to the
/// async-io reactor underneath it.
#[derive(Debug, Clone, Copy, Default)]
pub struct AsyncStd;

/// An async-std TCP stream with Nagle off: the core batches writes itself.
#[derive(Debug)]
pub struct Stream(async_std::net::TcpStream);

impl Stream {
    /// Wraps a connected stream.
    pub fn new(stream: async_std::net::TcpStream) -> io::Result<Self> {
        stream.set_nodelay(true)?;
        Ok(Stream(stream))
    }
}

type Accepted = io::Result<(async_std::net::TcpStream, SocketAddr)>;

/// An async-std TCP listener.
pub struct Listener {
    listener: Arc<async_std::net::TcpListener>,
    /// async-std offers no `poll_accept`: the accept in progress, kept across polls so no connection
    /// it took is dropped.
    accepting: Option<BoxFuture<Accepted>>,
}

impl std::fmt::Debug for Listener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Listener")
            .field("listener", &self.listener)
            .finish_non_exhaustive()
    }
}

impl Listener {
    /// Wraps a bound listener.
    pub fn new(listener: async_std::net::TcpListener) -> Self {
        Listener {
            listener: Arc::new(listener),
            accepting: None,
        }
    }
}

impl Runtime for AsyncStd {
    type Stream = Stream;
    type Listener = Listener;

    fn now() -> Instant {
        Instant::now()
    }

    fn timer(&self, deadline: Instant) -> Pin<Box<dyn Timer>> {
        // The same reactor as smol's: its adapter's timer serves as is.
        Box::pin(steadfast_smol::AsyncIoTimer::at(deadline))
    }

    fn spawn(&self, future: BoxFuture<()>) {
        // Dropping the join handle detaches the task.
        async_std::task::spawn(future);
    }

    fn connect(&self, addr: SocketAddr) -> BoxFuture<io::Result<Stream>> {
        Box::pin(async move { Stream::new(async_std::net::TcpStream::connect(addr).await?) })
    }
}

impl Io for Stream {
    fn poll_read(&mut self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }

    fn poll_write(&mut self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_shutdown(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // async-std's close only flushes (a no-op on TCP); the peer must see the end of the stream.
        Poll::Ready(self.0.shutdown(std::net::Shutdown::Write))
    }

    fn try_writer(&self) -> Option<Arc<dyn TryWrite>> {
        // A clone shares the socket, which stays open while the writer lives.
        Some(Arc::new(FdWriter(self.0.clone())))
    }
}

impl Listen for Listener {
    type Stream = Stream;

    fn poll_accept(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<(Stream, SocketAddr)>> {
        let accepting = self.accepting.get_or_insert_with(|| {
            let listener = self.listener.clone();
            Box::pin(async move { listener.accept().await })
        });
        let accepted = match accepting.as_mut().poll(cx) {
            Poll::Ready(r) => r,
            Poll::Pending => return Poll::Pending,
        };
        self.accepting = None;
        Poll::Ready(accepted.and_then(|(s, peer)| Ok((Stream::new(s)?, peer))))
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }
}
