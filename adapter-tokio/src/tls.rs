//! Sessions over TLS (feature `tls`): rustls, with its `ring` provider, between steadfast and TCP.
//!
//! The driver and the protocol are the plain adapter's; only the byte stream changes. A client
//! handshakes on every connection (the first and each reconnect) inside the driver's connect
//! timeout, so a handshake that fails or stalls is a failed connection attempt, and the session's
//! reconnect policy decides what follows — exactly as for a refused TCP connect. The session's
//! resume token then travels inside TLS.
//!
//! ```no_run
//! # async fn run(
//! #     client_tls: std::sync::Arc<steadfast_tokio::tls::rustls::ClientConfig>,
//! #     server_tls: std::sync::Arc<steadfast_tokio::tls::rustls::ServerConfig>,
//! # ) -> std::io::Result<()> {
//! use steadfast_tokio::tls::{TlsClientOptions, TlsServerOptions};
//! use steadfast_tokio::{ClientOptions, ServerOptions};
//!
//! let server = steadfast_tokio::listen_tls(
//!     "0.0.0.0:4433".parse().unwrap(),
//!     ServerOptions::new(),
//!     TlsServerOptions::new(server_tls),
//! )
//! .await?;
//! let name = "example.com".try_into().expect("a DNS name");
//! let client = steadfast_tokio::connect_tls(
//!     ClientOptions::new(vec!["192.0.2.1:4433".parse().unwrap()]),
//!     TlsClientOptions::new(client_tls, name),
//! )?;
//! # Ok(()) }
//! ```
//!
//! ## A rejected certificate
//! It is retried like any failed connect, not made fatal: a captive portal or an on-path attacker
//! presenting its own certificate is as passing as any other outage this crate rides out, and a
//! server whose certificate was renewed under a new authority is reached again once the client
//! trusts it. Making it fatal would hand whoever can inject one handshake a way to end sessions at
//! once. It is still loud: every TLS-level refusal is logged at `warn` and handed, typed, to
//! [`TlsClientOptions::on_rejected`], where an application that prefers to stop can close the
//! session; and a reconnect policy with a limit ends it with
//! [`LostReason::GaveUp`](crate::LostReason::GaveUp).
//!
//! ## The server's handshakes
//! Each runs in its own task under a deadline ([`TlsServerOptions::handshake_timeout`]), so a
//! client that connects and then stalls holds up no one; at most
//! [`TlsServerOptions::max_handshakes`] run at once, beyond which new TCP connections wait in the
//! listen backlog instead of costing memory.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use steadfast_core::driver::{BoxFuture, Io, Listen, Runtime, Timer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::task::JoinSet;
pub use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::runtime::poll_read_slice;
use crate::{ClientHandle, ClientOptions, Listener, ServerHandle, ServerOptions, Stream, Tokio};

/// A TLS handshake refused by rustls: this side rejected the server's certificate, or the server
/// sent an alert (it rejected this client's certificate, or shares no protocol version or cipher
/// suite with it).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct HandshakeRejected {
    /// The server the attempt went to.
    pub server: SocketAddr,
    /// Why, as rustls says; `rustls::Error::InvalidCertificate` is a certificate this side refused.
    pub error: rustls::Error,
}

impl std::fmt::Display for HandshakeRejected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "TLS handshake with {} rejected: {}",
            self.server, self.error
        )
    }
}

impl std::error::Error for HandshakeRejected {}

/// Hears of each [`HandshakeRejected`]; runs on the session's driver, so keep it quick.
pub type RejectionHook = Arc<dyn Fn(&HandshakeRejected) + Send + Sync>;

/// How a client speaks TLS.
#[derive(Clone)]
#[non_exhaustive]
pub struct TlsClientOptions {
    /// rustls's client configuration: the roots it trusts, its own certificate if any.
    pub config: Arc<rustls::ClientConfig>,
    /// The name the server's certificate must carry (every server of [`ClientOptions::servers`]
    /// is checked against this one name).
    pub server_name: ServerName<'static>,
    /// Told of every refused handshake (see the [module documentation](self)).
    pub on_rejected: Option<RejectionHook>,
}

impl std::fmt::Debug for TlsClientOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsClientOptions")
            .field("server_name", &self.server_name)
            .field("on_rejected", &self.on_rejected.is_some())
            .finish_non_exhaustive()
    }
}

impl TlsClientOptions {
    /// TLS with `config`, checking certificates against `server_name`.
    pub fn new(config: Arc<rustls::ClientConfig>, server_name: ServerName<'static>) -> Self {
        TlsClientOptions {
            config,
            server_name,
            on_rejected: None,
        }
    }

    /// Calls `hook` on every refused handshake.
    pub fn on_rejected(
        mut self,
        hook: impl Fn(&HandshakeRejected) + Send + Sync + 'static,
    ) -> Self {
        self.on_rejected = Some(Arc::new(hook));
        self
    }
}

/// How a server speaks TLS.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct TlsServerOptions {
    /// rustls's server configuration: the certificate chain and key, client authentication if any.
    pub config: Arc<rustls::ServerConfig>,
    /// How long a client has from its TCP connect to a finished handshake before it is dropped.
    pub handshake_timeout: Duration,
    /// Handshakes in progress at once; further TCP connections wait in the listen backlog.
    pub max_handshakes: usize,
}

impl TlsServerOptions {
    /// TLS with `config`: 10 s to handshake, at most 1024 handshakes at once.
    pub fn new(config: Arc<rustls::ServerConfig>) -> Self {
        TlsServerOptions {
            config,
            handshake_timeout: Duration::from_secs(10),
            max_handshakes: 1024,
        }
    }
}

/// Starts a client session over TLS on the current tokio runtime; otherwise as [`crate::connect`].
///
/// # Panics
/// Outside a tokio runtime.
pub fn connect_tls(options: ClientOptions, tls: TlsClientOptions) -> io::Result<ClientHandle> {
    crate::start_client(TlsTokio::client(tls), options, None)
}

/// A durable client session over TLS; otherwise as [`crate::connect_with_store`].
///
/// # Panics
/// Outside a tokio runtime.
pub fn connect_tls_with_store(
    options: ClientOptions,
    tls: TlsClientOptions,
    store: Box<dyn steadfast_core::store::Store>,
) -> io::Result<ClientHandle> {
    crate::start_client(TlsTokio::client(tls), options, Some(store))
}

/// Binds `addr` and serves sessions over TLS on the current tokio runtime.
pub async fn listen_tls(
    addr: SocketAddr,
    options: ServerOptions,
    tls: TlsServerOptions,
) -> io::Result<ServerHandle> {
    let listener = Listener::new(tokio::net::TcpListener::bind(addr).await?);
    serve_tls(listener, options, tls)
}

/// Serves sessions over TLS on an already bound listener, on the current tokio runtime.
///
/// # Panics
/// Outside a tokio runtime.
pub fn serve_tls(
    listener: Listener,
    options: ServerOptions,
    tls: TlsServerOptions,
) -> io::Result<ServerHandle> {
    let listener = TlsListener::new(listener, tls)?;
    crate::start_server(TlsTokio::server(), listener, options)
}

/// tokio with TLS streams: the plain [`Tokio`] runtime, plus a handshake on each connection.
#[derive(Clone)]
pub struct TlsTokio {
    tokio: Tokio,
    /// `None` on a server, which never connects.
    client: Option<Arc<ClientSide>>,
}

impl std::fmt::Debug for TlsTokio {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsTokio")
            .field("client", &self.client.is_some())
            .finish_non_exhaustive()
    }
}

struct ClientSide {
    connector: TlsConnector,
    server_name: ServerName<'static>,
    on_rejected: Option<RejectionHook>,
}

impl TlsTokio {
    fn client(tls: TlsClientOptions) -> Self {
        TlsTokio {
            tokio: Tokio::current(),
            client: Some(Arc::new(ClientSide {
                connector: TlsConnector::from(tls.config),
                server_name: tls.server_name,
                on_rejected: tls.on_rejected,
            })),
        }
    }

    fn server() -> Self {
        TlsTokio {
            tokio: Tokio::current(),
            client: None,
        }
    }
}

impl Runtime for TlsTokio {
    type Stream = TlsStream;
    type Listener = TlsListener;

    fn now() -> std::time::Instant {
        <Tokio as Runtime>::now()
    }

    fn timer(&self, deadline: std::time::Instant) -> Pin<Box<dyn Timer>> {
        self.tokio.timer(deadline)
    }

    fn spawn(&self, future: BoxFuture<()>) {
        self.tokio.spawn(future);
    }

    fn connect(&self, addr: SocketAddr) -> BoxFuture<io::Result<TlsStream>> {
        let Some(client) = self.client.clone() else {
            return Box::pin(async {
                Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    "a TLS server's runtime does not connect",
                ))
            });
        };
        let tcp = self.tokio.connect(addr);
        Box::pin(async move {
            let tcp = tcp.await?;
            match client
                .connector
                .connect(client.server_name.clone(), tcp)
                .await
            {
                Ok(tls) => Ok(TlsStream(tls.into())),
                Err(e) => {
                    if let Some(error) = e.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>())
                    {
                        let rejected = HandshakeRejected {
                            server: addr,
                            error: error.clone(),
                        };
                        tracing::warn!(%rejected, "TLS handshake rejected; the reconnect policy decides what follows");
                        if let Some(hook) = &client.on_rejected {
                            hook(&rejected);
                        }
                    }
                    Err(e)
                }
            }
        })
    }
}

/// A connection after its TLS handshake.
///
/// rustls may keep bytes of a write when the socket is full and still report the write done, and
/// the driver, having nothing more to write, would not write again to push them out; so every
/// read first flushes what rustls holds. The driver reads on every wake-up, and rustls's flush
/// registers for the socket becoming writable, so held bytes leave as soon as the socket allows.
pub struct TlsStream<S = Stream>(tokio_rustls::TlsStream<S>);

impl<S> std::fmt::Debug for TlsStream<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsStream").finish_non_exhaustive()
    }
}

impl<S: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for TlsStream<S> {
    fn poll_read(&mut self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        if let Poll::Ready(Err(e)) = Pin::new(&mut self.0).poll_flush(cx) {
            return Poll::Ready(Err(e));
        }
        poll_read_slice(&mut self.0, cx, buf)
    }

    fn poll_write(&mut self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_shutdown(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// A TCP listener that hands the server only connections whose TLS handshake finished.
pub struct TlsListener {
    tcp: Listener,
    acceptor: TlsAcceptor,
    handshake_timeout: Duration,
    max_handshakes: usize,
    /// Handshakes in progress, each a task of its own: one slow client stalls nobody else.
    handshakes: JoinSet<Option<(TlsStream, SocketAddr)>>,
    runtime: tokio::runtime::Handle,
}

impl std::fmt::Debug for TlsListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsListener")
            .field("handshakes", &self.handshakes.len())
            .finish_non_exhaustive()
    }
}

impl TlsListener {
    /// Wraps a bound listener; refuses a zero handshake timeout or limit.
    ///
    /// # Panics
    /// Outside a tokio runtime.
    pub fn new(tcp: Listener, tls: TlsServerOptions) -> io::Result<Self> {
        if tls.handshake_timeout.is_zero() || tls.max_handshakes == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "TLS handshake_timeout and max_handshakes must be above zero",
            ));
        }
        Ok(TlsListener {
            tcp,
            acceptor: TlsAcceptor::from(tls.config),
            handshake_timeout: tls.handshake_timeout,
            max_handshakes: tls.max_handshakes,
            handshakes: JoinSet::new(),
            runtime: tokio::runtime::Handle::current(),
        })
    }

    fn handshake(&mut self, tcp: Stream, peer: SocketAddr) {
        let accept = self.acceptor.accept(tcp);
        let deadline = self.handshake_timeout;
        let handshake = async move {
            match tokio::time::timeout(deadline, accept).await {
                Ok(Ok(tls)) => Some((TlsStream(tls.into()), peer)),
                // A hostile or broken client: not the server's problem, so not above debug.
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    None
                }
                Err(_) => {
                    tracing::debug!(%peer, ?deadline, "TLS handshake timed out");
                    None
                }
            }
        };
        self.handshakes.spawn_on(handshake, &self.runtime);
    }
}

impl Listen for TlsListener {
    type Stream = TlsStream;

    fn poll_accept(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<(TlsStream, SocketAddr)>> {
        loop {
            while let Poll::Ready(Some(done)) = self.handshakes.poll_join_next(cx) {
                if let Ok(Some(accepted)) = done {
                    return Poll::Ready(Ok(accepted));
                }
            }
            // Full: the finish of a handshake in progress wakes this task again.
            if self.handshakes.len() >= self.max_handshakes {
                return Poll::Pending;
            }
            match self.tcp.poll_accept(cx) {
                Poll::Ready(Ok((tcp, peer))) => self.handshake(tcp, peer),
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.tcp.local_addr()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    fn configs() -> (Arc<rustls::ServerConfig>, Arc<rustls::ClientConfig>) {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let key = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        let cert = key.cert.der().clone();
        let der = rustls::pki_types::PrivatePkcs8KeyDer::from(key.signing_key.serialize_der());
        let server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.clone()], der.into())
            .unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert).unwrap();
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        (Arc::new(server), Arc::new(client))
    }

    /// The driver's pattern: write until every byte is taken, then only read. Bytes rustls held
    /// back when the pipe was full must still reach the peer.
    #[tokio::test]
    async fn bytes_rustls_held_back_leave_while_the_driver_only_reads() {
        const LEN: usize = 256 * 1024;
        let (server_config, client_config) = configs();
        // A pipe far smaller than the write, so rustls must hold most of it.
        let (near, far) = tokio::io::duplex(1024);
        let name = ServerName::try_from("localhost").unwrap();
        let (server, client) = tokio::join!(
            TlsAcceptor::from(server_config).accept(near),
            TlsConnector::from(client_config).connect(name, far),
        );
        let mut server = TlsStream(server.unwrap().into());
        let mut client = client.unwrap();

        let reader = tokio::spawn(async move {
            let mut got = vec![0u8; LEN];
            // The stream comes back too: dropped here, its end would reach the driver's read.
            client.read_exact(&mut got).await.map(|_| (got, client))
        });
        let data = vec![0x5a; LEN];
        let mut written = 0;
        let mut scratch = [0u8; 64];
        let drive = std::future::poll_fn(|cx| {
            while written < LEN {
                match server.poll_write(cx, &data[written..]) {
                    Poll::Ready(Ok(n)) => written += n,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => return Poll::Pending,
                }
            }
            // Everything is "written"; the peer sends nothing, so this read only ever pends.
            match server.poll_read(cx, &mut scratch) {
                Poll::Ready(r) => Poll::Ready(r.map(|_| ())),
                Poll::Pending => Poll::Pending,
            }
        });
        tokio::select! {
            got = reader => assert!(got.unwrap().unwrap().0 == data, "the bytes, in order"),
            ended = drive => panic!("the peer sent nothing, yet the read ended: {ended:?}"),
            _ = tokio::time::sleep(Duration::from_secs(10)) => {
                panic!("the peer got only part of the bytes: rustls still holds the rest")
            }
        }
    }
}
