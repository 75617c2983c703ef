//! tokio's sockets, timers and spawner, as the driver's [`Runtime`].

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use steadfast_core::driver::{BoxFuture, FdWriter, Io, Listen, Runtime, Timer, TryWrite};
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};

/// The tokio runtime the driver runs on: the one current where the session was created.
#[derive(Debug, Clone)]
pub struct Tokio(tokio::runtime::Handle);

impl Tokio {
    /// The runtime this is called from.
    ///
    /// # Panics
    /// Outside a tokio runtime.
    pub fn current() -> Self {
        Tokio(tokio::runtime::Handle::current())
    }
}

/// A tokio TCP stream with Nagle off: the core batches writes itself.
///
/// Shared, so that an application thread can write a send's frames itself while the connection's
/// task has nothing to write ([`Io::try_writer`]); reads and the task's writes go through tokio's
/// readiness as `TcpStream`'s own `AsyncRead` and `AsyncWrite` do.
#[derive(Debug)]
pub struct Stream(Arc<tokio::net::TcpStream>);

impl Stream {
    /// Wraps a connected stream.
    pub fn new(stream: tokio::net::TcpStream) -> io::Result<Self> {
        stream.set_nodelay(true)?;
        Ok(Stream(Arc::new(stream)))
    }

    /// One read or write through tokio's readiness, as `TcpStream`'s own are made: one that moves
    /// less than `len` bytes clears the readiness (the socket is drained, or full), so the next
    /// poll registers for a wake-up instead of making a system call that would only block.
    fn poll_io(
        &self,
        cx: &mut Context<'_>,
        interest: Interest,
        len: usize,
        mut op: impl FnMut(&socket2::Socket) -> io::Result<usize>,
    ) -> Poll<io::Result<usize>> {
        loop {
            if interest.is_readable() {
                ready!(self.0.poll_read_ready(cx))?;
            } else {
                ready!(self.0.poll_write_ready(cx))?;
            }
            let mut short = None;
            let done = self.0.try_io(interest, || {
                let n = op(&socket2::SockRef::from(&*self.0))?;
                if 0 < n && n < len {
                    // Reported as would-block only so that tokio clears the readiness it saw.
                    short = Some(n);
                    return Err(io::ErrorKind::WouldBlock.into());
                }
                Ok(n)
            });
            match (done, short) {
                (_, Some(n)) => return Poll::Ready(Ok(n)),
                (Err(e), None) if e.kind() == io::ErrorKind::WouldBlock => {}
                (done, None) => return Poll::Ready(done),
            }
        }
    }

    fn poll_read_from(&self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        let len = buf.len();
        self.poll_io(cx, Interest::READABLE, len, |s| {
            std::io::Read::read(&mut &*s, buf)
        })
    }

    fn poll_write_from(&self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.poll_io(cx, Interest::WRITABLE, buf.len(), |s| {
            std::io::Write::write(&mut &*s, buf)
        })
    }

    fn shutdown_write(&self) -> Poll<io::Result<()>> {
        Poll::Ready(socket2::SockRef::from(&*self.0).shutdown(std::net::Shutdown::Write))
    }
}

/// A tokio TCP listener.
#[derive(Debug)]
pub struct Listener(tokio::net::TcpListener);

impl Listener {
    /// Wraps a bound listener.
    pub fn new(listener: tokio::net::TcpListener) -> Self {
        Listener(listener)
    }
}

struct Sleep(Pin<Box<tokio::time::Sleep>>);

impl Timer for Sleep {
    fn reset(mut self: Pin<&mut Self>, deadline: std::time::Instant) {
        self.0.as_mut().reset(deadline.into());
    }

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        self.0.as_mut().poll(cx)
    }
}

impl Runtime for Tokio {
    type Stream = Stream;
    type Listener = Listener;

    fn now() -> std::time::Instant {
        tokio::time::Instant::now().into_std()
    }

    fn timer(&self, deadline: std::time::Instant) -> Pin<Box<dyn Timer>> {
        Box::pin(Sleep(Box::pin(tokio::time::sleep_until(deadline.into()))))
    }

    fn spawn(&self, future: BoxFuture<()>) {
        self.0.spawn(future);
    }

    fn connect(&self, addr: SocketAddr) -> BoxFuture<io::Result<Stream>> {
        Box::pin(async move { Stream::new(tokio::net::TcpStream::connect(addr).await?) })
    }
}

/// [`Io::poll_read`] for a tokio reader (the TLS stream).
#[cfg(feature = "tls")]
pub(crate) fn poll_read_slice<T: AsyncRead + Unpin>(
    io: &mut T,
    cx: &mut Context<'_>,
    buf: &mut [u8],
) -> Poll<io::Result<usize>> {
    let mut rb = ReadBuf::new(buf);
    match Pin::new(io).poll_read(cx, &mut rb) {
        Poll::Ready(Ok(())) => Poll::Ready(Ok(rb.filled().len())),
        Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
        Poll::Pending => Poll::Pending,
    }
}

impl Io for Stream {
    fn poll_read(&mut self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        self.poll_read_from(cx, buf)
    }

    fn poll_write(&mut self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.poll_write_from(cx, buf)
    }

    fn poll_shutdown(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.shutdown_write()
    }

    fn try_writer(&self) -> Option<Arc<dyn TryWrite>> {
        Some(Arc::new(FdWriter(self.0.clone())))
    }
}

/// The stream as a tokio reader and writer, so that layers such as TLS can wrap it.
impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let n = ready!(self.poll_read_from(cx, buf.initialize_unfilled()))?;
        buf.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_from(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Nothing is buffered here.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.shutdown_write()
    }
}

impl Listen for Listener {
    type Stream = Stream;

    fn poll_accept(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<(Stream, SocketAddr)>> {
        match self.0.poll_accept(cx) {
            Poll::Ready(Ok((s, peer))) => Poll::Ready(Stream::new(s).map(|s| (s, peer))),
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.0.local_addr()
    }
}
