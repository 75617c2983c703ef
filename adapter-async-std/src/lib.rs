//! # steadfast-async-std
//!
//! steadfast on async-std: sessions that survive network interruptions — nothing lost, nothing
//! duplicated, order kept, recovery automatic, and a loud [`SessionEvent::SessionLost`] where recovery
//! is impossible. This crate holds only I/O glue (async-std's sockets and tasks, async-io's timers);
//! the protocol is [`steadfast_core`]'s and the loop that drives it is [`steadfast_core::driver`]'s.
//!
//! **async-std is discontinued upstream** (RUSTSEC-2025-0052): its maintainers point to smol, which it
//! is built on. This adapter is kept deliberately thin for existing async-std applications; new code
//! should use `steadfast-smol`, whose API is the same.
//!
//! ```
//! # fn main() -> std::io::Result<()> {
//! # async_std::task::block_on(async {
//! use steadfast_async_std::{ClientOptions, Mode, ServerEvent, ServerOptions, SessionEvent};
//! use bytes::Bytes;
//!
//! let server =
//!     steadfast_async_std::listen("127.0.0.1:0".parse().unwrap(), ServerOptions::new()).await?;
//! let client = steadfast_async_std::connect(ClientOptions::new(vec![server.local_addr()]))?;
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
//! # Ok(()) })
//! # }
//! ```
//!
//! The drivers run on async-std's global executor (`async_std::task::spawn`). Handles are
//! `Send + Sync` and cheap to clone: replies and sends work from plain worker threads too
//! (`try_send`, `reply`), while the driver task keeps acknowledging and heartbeating however busy they
//! are.
#![forbid(unsafe_code)]

mod runtime;

use std::io;
use std::net::SocketAddr;

pub use runtime::{AsyncStd, Listener, Stream};
pub use steadfast_core as core;
pub use steadfast_core::client::ClientConfig;
pub use steadfast_core::driver::{
    ClientHandle, ClientOptions, FlushError, RequestError, ServerHandle, ServerOptions,
};
pub use steadfast_core::server::{ServerConfig, ServerEvent};
pub use steadfast_core::session::{LostReason, SessionEvent};
pub use steadfast_core::{Message, Mode, SendError, Sent};

/// The operating system's generator: tokens, session ids and nonces must not be guessable.
fn os_entropy() -> Box<dyn steadfast_core::session::Entropy> {
    Box::new(rand_core::UnwrapErr(rand_core::OsRng))
}

fn invalid(e: steadfast_core::ConfigError) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, e)
}

/// Starts a client session: its driver is spawned on async-std's executor and connects at once.
/// Use [`ClientHandle::connected`] to wait for the first connection.
pub fn connect(options: ClientOptions) -> io::Result<ClientHandle> {
    let (handle, driver) =
        steadfast_core::driver::client::client(AsyncStd, options, os_entropy()).map_err(invalid)?;
    async_std::task::spawn(driver);
    Ok(handle)
}

/// Starts a client session made durable by `store`: given the store a previous process of this
/// client left, it resumes that session — nothing it sent is lost, nothing it received comes twice
/// (see [`steadfast_core::store`]). A store that fails is reported with
/// [`SessionEvent::DurabilityLost`] and the session carries on in memory.
pub fn connect_with_store(
    options: ClientOptions,
    store: Box<dyn steadfast_core::store::Store>,
) -> io::Result<ClientHandle> {
    let (handle, driver) =
        steadfast_core::driver::client::client_with_store(AsyncStd, options, os_entropy(), store)
            .map_err(invalid)?;
    async_std::task::spawn(driver);
    Ok(handle)
}

/// Binds `addr` and serves sessions on async-std's executor.
pub async fn listen(addr: SocketAddr, options: ServerOptions) -> io::Result<ServerHandle> {
    let listener = Listener::new(async_std::net::TcpListener::bind(addr).await?);
    serve(listener, options)
}

/// Serves sessions on an already bound listener, on async-std's executor.
pub fn serve(listener: Listener, options: ServerOptions) -> io::Result<ServerHandle> {
    let (handle, driver) =
        steadfast_core::driver::server::server(AsyncStd, listener, options, os_entropy())
            .map_err(invalid)?;
    async_std::task::spawn(driver);
    Ok(handle)
}
