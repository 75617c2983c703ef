//! # steadfast-tokio
//!
//! steadfast on tokio: sessions that survive network interruptions — nothing lost, nothing
//! duplicated, order kept, recovery automatic, and a loud [`SessionEvent::SessionLost`] where recovery
//! is impossible. This crate holds only I/O glue (tokio's sockets, timers and tasks); the protocol is
//! [`steadfast_core`]'s and the loop that drives it is [`steadfast_core::driver`]'s.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> std::io::Result<()> {
//! use steadfast_tokio::{ClientOptions, Mode, ServerEvent, ServerOptions, SessionEvent};
//! use bytes::Bytes;
//!
//! let server = steadfast_tokio::listen("127.0.0.1:0".parse().unwrap(), ServerOptions::new()).await?;
//! let client = steadfast_tokio::connect(ClientOptions::new(vec![server.local_addr()]))?;
//! client.send(0, Mode::Ordered, Bytes::from_static(b"hello")).await.unwrap();
//! // The server hears of the session, then gets the message exactly once.
//! loop {
//!     match server.next_event().await {
//!         Some(ServerEvent::Session { event: SessionEvent::Received(m), .. }) => {
//!             assert_eq!(m.payload, "hello");
//!             break;
//!         }
//!         Some(_) => continue,
//!         None => unreachable!("the server is running"),
//!     }
//! }
//! # Ok(()) }
//! ```
//!
//! Handles are `Send + Sync` and cheap to clone: replies and sends work from plain worker threads too
//! (`try_send`, `reply`), while the driver task keeps acknowledging and heartbeating however busy they
//! are. An application with several messages at hand sends them with `send_many` and takes events
//! with `next_events`: one lock of the session per batch instead of one per message, which at small
//! messages is a large part of what a send or an event costs.
//!
//! With the `tls` feature, `connect_tls` and `listen_tls` run the same sessions over TLS (rustls);
//! see the `tls` module. Without TLS, anyone on the path can read, inject and take over a session:
//! SECURITY.md at the repository's top level says what each transport protects.
#![forbid(unsafe_code)]

pub mod chaos;
#[cfg(feature = "redis")]
pub mod cluster;
mod runtime;
#[cfg(feature = "tls")]
pub mod tls;

use std::io;
use std::net::SocketAddr;

pub use runtime::{Listener, Stream, Tokio};
pub use steadfast_core as core;
pub use steadfast_core::client::ClientConfig;
pub use steadfast_core::driver::{
    ClientHandle, ClientOptions, FlushError, RequestError, ServerHandle, ServerOptions,
};
pub use steadfast_core::server::{ServerConfig, ServerEvent};
pub use steadfast_core::session::{LostReason, SessionEvent};
pub use steadfast_core::{Message, Mode, SendError, Sent};
#[cfg(feature = "tls")]
pub use tls::{connect_tls, connect_tls_with_store, listen_tls, serve_tls};

/// The operating system's generator: tokens, session ids and nonces must not be guessable.
fn os_entropy() -> Box<dyn steadfast_core::session::Entropy> {
    Box::new(rand_core::UnwrapErr(rand_core::OsRng))
}

fn invalid(e: steadfast_core::ConfigError) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, e)
}

/// Starts a client session on the current tokio runtime: its driver is spawned and connects at once.
/// Use [`ClientHandle::connected`] to wait for the first connection.
///
/// # Panics
/// Outside a tokio runtime.
pub fn connect(options: ClientOptions) -> io::Result<ClientHandle> {
    start_client(Tokio::current(), options, None)
}

/// Starts a client session made durable by `store`: given the store a previous process of this
/// client left, it resumes that session — nothing it sent is lost, nothing it received comes twice
/// (see [`steadfast_core::store`]). A store that fails is reported with
/// [`SessionEvent::DurabilityLost`] and the session carries on in memory.
pub fn connect_with_store(
    options: ClientOptions,
    store: Box<dyn steadfast_core::store::Store>,
) -> io::Result<ClientHandle> {
    start_client(Tokio::current(), options, Some(store))
}

/// Binds `addr` and serves sessions on the current tokio runtime.
pub async fn listen(addr: SocketAddr, options: ServerOptions) -> io::Result<ServerHandle> {
    let listener = Listener::new(tokio::net::TcpListener::bind(addr).await?);
    serve(listener, options)
}

/// Serves sessions on an already bound listener, on the current tokio runtime.
pub fn serve(listener: Listener, options: ServerOptions) -> io::Result<ServerHandle> {
    start_server(Tokio::current(), listener, options)
}

/// Spawns a client's driver on `rt` (plain TCP or, with `tls`, TLS over it).
fn start_client<R: steadfast_core::driver::Runtime>(
    rt: R,
    options: ClientOptions,
    store: Option<Box<dyn steadfast_core::store::Store>>,
) -> io::Result<ClientHandle> {
    let (handle, driver) = match store {
        Some(store) => {
            steadfast_core::driver::client::client_with_store(rt, options, os_entropy(), store)
        }
        None => steadfast_core::driver::client::client(rt, options, os_entropy()),
    }
    .map_err(invalid)?;
    tokio::spawn(driver);
    Ok(handle)
}

/// Spawns a server's driver on `rt`, accepting from `listener`.
fn start_server<R: steadfast_core::driver::Runtime>(
    rt: R,
    listener: R::Listener,
    options: ServerOptions,
) -> io::Result<ServerHandle> {
    let (handle, driver) =
        steadfast_core::driver::server::server(rt, listener, options, os_entropy())
            .map_err(invalid)?;
    tokio::spawn(driver);
    Ok(handle)
}
