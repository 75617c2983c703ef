//! # steadfast-smol
//!
//! steadfast on smol: sessions that survive network interruptions — nothing lost, nothing
//! duplicated, order kept, recovery automatic, and a loud [`SessionEvent::SessionLost`] where recovery
//! is impossible. This crate holds only I/O glue (async-net's sockets, async-io's timers, and an
//! executor: smol's global one, or the application's, see [`Smol`]); the protocol is
//! [`steadfast_core`]'s and the loop that drives it is [`steadfast_core::driver`]'s.
//!
//! ```
//! # fn main() -> std::io::Result<()> {
//! # smol::block_on(async {
//! use steadfast_smol::{ClientOptions, Mode, ServerEvent, ServerOptions, SessionEvent};
//! use bytes::Bytes;
//!
//! let server = steadfast_smol::listen("127.0.0.1:0".parse().unwrap(), ServerOptions::new()).await?;
//! let client = steadfast_smol::connect(ClientOptions::new(vec![server.local_addr()]))?;
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
//! The drivers run on smol's global executor (`smol::spawn`), or on the application's own
//! ([`Smol::on`]); any executor, `smol::block_on` included, can hold the handles. Handles are
//! `Send + Sync` and cheap to clone: replies and sends work from plain worker threads too
//! (`try_send`, `reply`), while the driver task keeps acknowledging and heartbeating however busy
//! they are.
#![forbid(unsafe_code)]

mod runtime;

use std::future::Future;
use std::io;
use std::net::SocketAddr;

use steadfast_core::driver::Runtime;

pub use runtime::{AsyncIoTimer, Listener, Smol, Stream};
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

impl Smol {
    /// Starts a client session: its driver is spawned on this runtime's executor and connects at
    /// once. Use [`ClientHandle::connected`] to wait for the first connection.
    pub fn connect(&self, options: ClientOptions) -> io::Result<ClientHandle> {
        self.start(steadfast_core::driver::client::client(
            self.clone(),
            options,
            os_entropy(),
        ))
    }

    /// Starts a client session made durable by `store`: given the store a previous process of
    /// this client left, it resumes that session — nothing it sent is lost, nothing it received
    /// comes twice (see [`steadfast_core::store`]). A store that fails is reported with
    /// [`SessionEvent::DurabilityLost`] and the session carries on in memory.
    pub fn connect_with_store(
        &self,
        options: ClientOptions,
        store: Box<dyn steadfast_core::store::Store>,
    ) -> io::Result<ClientHandle> {
        self.start(steadfast_core::driver::client::client_with_store(
            self.clone(),
            options,
            os_entropy(),
            store,
        ))
    }

    /// Binds `addr` and serves sessions on this runtime's executor.
    pub async fn listen(
        &self,
        addr: SocketAddr,
        options: ServerOptions,
    ) -> io::Result<ServerHandle> {
        let listener = Listener::new(smol::net::TcpListener::bind(addr).await?);
        self.serve(listener, options)
    }

    /// Serves sessions on an already bound listener, on this runtime's executor.
    pub fn serve(&self, listener: Listener, options: ServerOptions) -> io::Result<ServerHandle> {
        self.start(steadfast_core::driver::server::server(
            self.clone(),
            listener,
            options,
            os_entropy(),
        ))
    }

    /// Spawns the driver just made on this runtime's executor and hands back its handle.
    fn start<H>(
        &self,
        made: Result<(H, impl Future<Output = ()> + Send + 'static), steadfast_core::ConfigError>,
    ) -> io::Result<H> {
        let (handle, driver) = made.map_err(invalid)?;
        self.spawn(Box::pin(driver));
        Ok(handle)
    }
}

/// Starts a client session: its driver is spawned on smol's global executor and connects at once.
/// Use [`ClientHandle::connected`] to wait for the first connection.
pub fn connect(options: ClientOptions) -> io::Result<ClientHandle> {
    Smol::global().connect(options)
}

/// Starts a client session made durable by `store`, on smol's global executor: see
/// [`Smol::connect_with_store`].
pub fn connect_with_store(
    options: ClientOptions,
    store: Box<dyn steadfast_core::store::Store>,
) -> io::Result<ClientHandle> {
    Smol::global().connect_with_store(options, store)
}

/// Binds `addr` and serves sessions on smol's global executor.
pub async fn listen(addr: SocketAddr, options: ServerOptions) -> io::Result<ServerHandle> {
    Smol::global().listen(addr, options).await
}

/// Serves sessions on an already bound listener, on smol's global executor.
pub fn serve(listener: Listener, options: ServerOptions) -> io::Result<ServerHandle> {
    Smol::global().serve(listener, options)
}
