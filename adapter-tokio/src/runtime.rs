//! tokio's sockets, timers and spawner, as the driver's [`Runtime`].

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use steadfast_core::driver::{BoxFuture, Io, Listen, Runtime, Timer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

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
#[derive(Debug)]
pub struct Stream(tokio::net::TcpStream);

impl Stream {
    /// Wraps a connected stream.
    pub fn new(stream: tokio::net::TcpStream) -> io::Result<Self> {
        stream.set_nodelay(true)?;
        Ok(Stream(stream))
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

/// [`Io::poll_read`] for any tokio reader (the plain stream and, with `tls`, the TLS one).
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
        poll_read_slice(&mut self.0, cx, buf)
    }

    fn poll_write(&mut self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_shutdown(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// The stream as a tokio reader and writer, so that layers such as TLS can wrap it.
impl AsyncRead for Stream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
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
