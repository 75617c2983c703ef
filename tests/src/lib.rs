//! # steadfast-tests
//!
//! Cross-crate integration tests: real loopback sockets, every runtime, injected faults. The tests
//! live in `tests/tests/`; this library holds what they share:
//!
//! - [`Rt`]: the three runtimes behind one trait ([`Tokio`], [`Smol`], [`AsyncStd`]), so each
//!   scenario is written once as a generic `async fn` and run on all of them;
//! - [`Chaos`]: the tokio-based [`ChaosProxy`] hosted on its own background tokio runtime, so a smol
//!   or async-std client can be put behind it as easily as a tokio one;
//! - [`Pair`]: a server and one client session through the proxy, with every event both sides see
//!   recorded in a [`Log`], and [`Traffic`] streaming numbered messages both ways;
//! - bounded waits ([`within`], [`wait_for`]) that fail a test with a message instead of hanging it,
//!   and the ledger check [`assert_exactly_once_in_order`].
//!
//! Messages carry their number (big-endian `u64`) as payload; the ledgers are the test's own count,
//! never the library's counters. Set `RUST_LOG` (e.g. `RUST_LOG=info`) and pass `--nocapture` to
//! see the driver's and the proxy's logs.
#![forbid(unsafe_code)]

use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::ops::Deref;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_lite::future;
use steadfast_core::driver::{ClientHandle, ClientOptions, ServerHandle, ServerOptions};
use steadfast_core::identity::SessionId;
use steadfast_core::liveness::LivenessConfig;
use steadfast_core::reconnect::{Backoff, Jitter, ReconnectPolicy};
use steadfast_core::server::ServerEvent;
use steadfast_core::session::{DisconnectCause, LostReason, SessionEvent};
use steadfast_core::{Message, Mode, Seq};
pub use steadfast_tokio::chaos::{ChaosProxy, Direction, Fault, Target};

// ---------------------------------------------------------------------------------------------
// Settings: short timers, so a fault is detected and healed in about a second.

/// How often an idle side pings.
pub const HEARTBEAT: Duration = Duration::from_millis(250);
/// Silence for this long declares a connection dead. Four heartbeats: a loaded 2-core machine may
/// delay one or two, but not four.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(1);
/// How long the server keeps a disconnected session: far longer than any outage the tests make,
/// except a restart, which forgets everything anyway.
pub const RETENTION: Duration = Duration::from_secs(20);
/// The stream the numbered messages travel on.
pub const DATA: u64 = 0;

/// The liveness timers both ends use.
pub fn liveness() -> LivenessConfig {
    let mut l = LivenessConfig::default();
    l.heartbeat_interval = HEARTBEAT;
    l.idle_timeout = IDLE_TIMEOUT;
    // The default grace follows the default idle timeout (3 s); keep it on the same scale.
    l.stall_grace = IDLE_TIMEOUT;
    l
}

/// A client for `servers` with the short timers and a quick reconnect.
pub fn client_options(servers: Vec<SocketAddr>) -> ClientOptions {
    let mut o = ClientOptions::new(servers);
    o.config.liveness = liveness();
    let mut policy = ReconnectPolicy::default();
    policy.backoff = Backoff::Exponential {
        initial: Duration::from_millis(50),
        factor: 2,
        max: Duration::from_millis(200),
    };
    policy.jitter = Jitter::Equal;
    o.config.reconnect = policy;
    o.connect_timeout = Duration::from_secs(1);
    o
}

/// A server with the short timers, split into `STEADFAST_TEST_SHARDS` parts if that is set (CI
/// runs these suites both ways).
pub fn server_options() -> ServerOptions {
    let mut o = ServerOptions::new();
    o.config.liveness = liveness();
    o.config.retention = RETENTION;
    if let Some(shards) = std::env::var("STEADFAST_TEST_SHARDS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        o.shards = shards;
    }
    o
}

/// The loopback address on a port the OS picks.
pub fn any_port() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

// ---------------------------------------------------------------------------------------------
// The runtimes.

/// A spawned task's outcome, awaitable from any runtime.
pub struct Task<T>(Pin<Box<dyn Future<Output = T> + Send>>);

impl<T> fmt::Debug for Task<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Task")
    }
}

impl<T> Future for Task<T> {
    type Output = T;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        self.0.as_mut().poll(cx)
    }
}

/// One async runtime and its steadfast adapter: what a scenario needs to run on it.
pub trait Rt: 'static {
    /// The runtime's name, for messages.
    const NAME: &'static str;
    /// Runs `future` to completion on the current thread, with the runtime available to it.
    fn block_on<F: Future>(future: F) -> F::Output;
    /// The adapter's `connect`.
    fn connect(options: ClientOptions) -> io::Result<ClientHandle>;
    /// The adapter's `listen`.
    fn listen(
        addr: SocketAddr,
        options: ServerOptions,
    ) -> impl Future<Output = io::Result<ServerHandle>>;
    /// Runs `future` in the background on the runtime.
    fn spawn<T: Send + 'static>(future: impl Future<Output = T> + Send + 'static) -> Task<T>;
}

/// tokio, with a multi-threaded runtime of two workers per test, and `steadfast-tokio`.
#[derive(Debug)]
pub enum Tokio {}

impl Rt for Tokio {
    const NAME: &'static str = "tokio";

    fn block_on<F: Future>(future: F) -> F::Output {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a tokio runtime")
            .block_on(future)
    }

    fn connect(options: ClientOptions) -> io::Result<ClientHandle> {
        steadfast_tokio::connect(options)
    }

    fn listen(
        addr: SocketAddr,
        options: ServerOptions,
    ) -> impl Future<Output = io::Result<ServerHandle>> {
        steadfast_tokio::listen(addr, options)
    }

    fn spawn<T: Send + 'static>(future: impl Future<Output = T> + Send + 'static) -> Task<T> {
        let handle = tokio::spawn(future);
        Task(Box::pin(async move {
            match handle.await {
                Ok(v) => v,
                Err(e) => std::panic::resume_unwind(e.into_panic()),
            }
        }))
    }
}

/// smol's global executor and `steadfast-smol`.
#[derive(Debug)]
pub enum Smol {}

impl Rt for Smol {
    const NAME: &'static str = "smol";

    fn block_on<F: Future>(future: F) -> F::Output {
        smol::block_on(future)
    }

    fn connect(options: ClientOptions) -> io::Result<ClientHandle> {
        steadfast_smol::connect(options)
    }

    fn listen(
        addr: SocketAddr,
        options: ServerOptions,
    ) -> impl Future<Output = io::Result<ServerHandle>> {
        steadfast_smol::listen(addr, options)
    }

    fn spawn<T: Send + 'static>(future: impl Future<Output = T> + Send + 'static) -> Task<T> {
        Task(Box::pin(smol::spawn(future)))
    }
}

/// async-std's global executor and `steadfast-async-std`.
#[derive(Debug)]
pub enum AsyncStd {}

impl Rt for AsyncStd {
    const NAME: &'static str = "async-std";

    fn block_on<F: Future>(future: F) -> F::Output {
        async_std::task::block_on(future)
    }

    fn connect(options: ClientOptions) -> io::Result<ClientHandle> {
        steadfast_async_std::connect(options)
    }

    fn listen(
        addr: SocketAddr,
        options: ServerOptions,
    ) -> impl Future<Output = io::Result<ServerHandle>> {
        steadfast_async_std::listen(addr, options)
    }

    fn spawn<T: Send + 'static>(future: impl Future<Output = T> + Send + 'static) -> Task<T> {
        Task(Box::pin(async_std::task::spawn(future)))
    }
}

/// Writes one test per runtime for each scenario: modules `tokio`, `smol` and `async_std`, each
/// with a `#[test] fn name()` that calls `runner::<Runtime, _>(scenario::<Runtime>(args…))`.
///
/// `runner` is a plain generic function that runs the scenario's future (typically through
/// [`run`] with a time limit); `scenario` a generic `async fn` over [`Rt`].
///
/// ```text
/// on_every_runtime! {
///     runner: in_time;
///     a_blackhole_is_survived => blackhole();
///     a_half_open_path_is_survived => half_open(Direction::ClientToServer);
/// }
/// ```
#[macro_export]
macro_rules! on_every_runtime {
    (runner: $runner:ident; $($test:ident => $scenario:ident($($arg:expr),*);)*) => {
        $crate::on_every_runtime!(@runtime tokio, Tokio, $runner; $($test => $scenario($($arg),*);)*);
        $crate::on_every_runtime!(@runtime smol, Smol, $runner; $($test => $scenario($($arg),*);)*);
        $crate::on_every_runtime!(
            @runtime async_std, AsyncStd, $runner; $($test => $scenario($($arg),*);)*
        );
    };
    (@runtime $module:ident, $rt:ident, $runner:ident;
     $($test:ident => $scenario:ident($($arg:expr),*);)*) => {
        mod $module {
            #[allow(unused_imports)]
            use super::*;
            $(
                #[test]
                fn $test() {
                    super::$runner::<$crate::$rt, _>(super::$scenario::<$crate::$rt>($($arg),*));
                }
            )*
        }
    };
}

/// Runs `scenario` on runtime `R`, failing (not hanging) if it takes longer than `limit`.
pub fn run<R: Rt, T>(limit: Duration, scenario: impl Future<Output = T>) -> T {
    init_logging();
    R::block_on(within(
        limit,
        format_args!("the whole scenario on {}", R::NAME),
        scenario,
    ))
}

/// Logs to the test's output when `RUST_LOG` is set; silent otherwise.
fn init_logging() {
    if let Ok(filter) = tracing_subscriber::EnvFilter::try_from_default_env() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
    }
}

// ---------------------------------------------------------------------------------------------
// Bounded waits.

/// `what`'s outcome; panics naming `description` if it takes longer than `limit`.
pub async fn within<T>(
    limit: Duration,
    description: impl fmt::Display,
    what: impl Future<Output = T>,
) -> T {
    let outcome = future::or(async { Some(what.await) }, async {
        async_io::Timer::after(limit).await;
        None
    })
    .await;
    outcome.unwrap_or_else(|| panic!("timed out after {limit:?} waiting for {description}"))
}

/// How often [`wait_for`] looks again.
const POLL: Duration = Duration::from_millis(10);

/// Waits until `ready()` holds, looking every 10 ms; after `limit`, panics with `description` and
/// the state `state()` reports (read at the moment of failure).
pub async fn wait_for(
    limit: Duration,
    description: impl fmt::Display,
    mut ready: impl FnMut() -> bool,
    state: impl FnOnce() -> String,
) {
    let deadline = Instant::now() + limit;
    while !ready() {
        if Instant::now() >= deadline {
            panic!(
                "timed out after {limit:?} waiting for {description}; state: {}",
                state()
            );
        }
        async_io::Timer::after(POLL).await;
    }
}

// ---------------------------------------------------------------------------------------------
// The chaos proxy, on a tokio runtime of its own.

/// The runtime every test's proxy runs on: one worker, started on first use, never stopped.
fn chaos_runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("chaos-proxy")
            .enable_all()
            .build()
            .expect("a tokio runtime for the chaos proxy")
    })
}

/// A [`ChaosProxy`] hosted on a background tokio runtime, usable from any runtime's tasks; derefs
/// to the proxy for `apply`, `heal`, `set_upstream`, `stats` and the rest.
#[derive(Debug)]
pub struct Chaos {
    proxy: ChaosProxy,
}

impl Chaos {
    /// A proxy forwarding to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Chaos {
        let proxy = chaos_runtime()
            .spawn(ChaosProxy::start(upstream))
            .await
            .expect("the proxy's start task")
            .expect("the proxy binds a loopback port");
        Chaos { proxy }
    }

    /// Waits until the proxy has accepted `total` connections since it started, at most `limit`.
    pub async fn accepted(&self, total: u64, limit: Duration) {
        within(
            limit,
            format_args!(
                "the proxy to accept {total} connections (stats: {:?})",
                self.proxy.stats()
            ),
            self.proxy.wait_for_accepted(total),
        )
        .await;
    }
}

impl Deref for Chaos {
    type Target = ChaosProxy;

    fn deref(&self) -> &ChaosProxy {
        &self.proxy
    }
}

// ---------------------------------------------------------------------------------------------
// Messages and ledgers.

/// The payload of message number `n`.
pub fn numbered(n: u64) -> Bytes {
    Bytes::copy_from_slice(&n.to_be_bytes())
}

/// Message `n`, every fourth one padded to between 16 KiB and 80 KiB with bytes that depend on `n`:
/// what [`Traffic`] sends, so that faults also cut through frames the drivers read whole.
pub fn numbered_padded(n: u64) -> Bytes {
    let len = padding(n);
    let mut payload = Vec::with_capacity(8 + len);
    payload.extend_from_slice(&n.to_be_bytes());
    payload.extend((0..len).map(|i| pad_byte(n, i)));
    payload.into()
}

fn padding(n: u64) -> usize {
    if n % 4 == 3 {
        16 * 1024 + (n.wrapping_mul(7919) % (64 * 1024)) as usize
    } else {
        0
    }
}

fn pad_byte(n: u64, i: usize) -> u8 {
    (n as u8).wrapping_mul(31).wrapping_add(i as u8)
}

/// The number a payload made by [`numbered`] or [`numbered_padded`] carries; `None` for anything
/// else, including a padded one whose length or bytes are not exactly what was sent.
pub fn number(payload: &[u8]) -> Option<u64> {
    let n = u64::from_be_bytes(payload.get(..8)?.try_into().ok()?);
    let rest = &payload[8..];
    let intact = rest.is_empty()
        || (rest.len() == padding(n) && rest.iter().enumerate().all(|(i, &b)| b == pad_byte(n, i)));
    intact.then_some(n)
}

/// Panics unless `received` is exactly `0..sent`: every message once, in order, nothing else. The
/// message names what went wrong first (a gap, a duplicate, a reordering, an extra) and where.
pub fn assert_exactly_once_in_order(what: &str, received: &[u64], sent: u64) {
    if received.iter().copied().eq(0..sent) {
        return;
    }
    let mut seen = std::collections::BTreeSet::new();
    let duplicates: Vec<u64> = received
        .iter()
        .copied()
        .filter(|n| !seen.insert(*n))
        .collect();
    let missing: Vec<u64> = (0..sent).filter(|n| !seen.contains(n)).collect();
    let unexpected: Vec<u64> = seen.iter().copied().filter(|&n| n >= sent).collect();
    let first_wrong = received
        .iter()
        .enumerate()
        .find(|&(i, &n)| n != i as u64)
        .map(|(i, &n)| (i, n));
    panic!(
        "{what}: {sent} sent, {} received; duplicates {}, missing {}, never sent {}, \
         first out of place (index, number) {first_wrong:?}",
        received.len(),
        head(&duplicates),
        head(&missing),
        head(&unexpected),
    );
}

/// The first few of a long list, for a readable message.
fn head(v: &[u64]) -> String {
    if v.len() <= 10 {
        format!("{v:?}")
    } else {
        format!("{:?}… ({} in all)", &v[..10], v.len())
    }
}

// ---------------------------------------------------------------------------------------------
// What each side saw.

/// Everything one side of a session told its application, in order.
#[derive(Default, Clone)]
pub struct Log {
    /// The numbers of the messages received on [`DATA`], in arrival order.
    pub received: Vec<u64>,
    /// Replies received: the message answered and the number in the reply.
    pub replies: Vec<(Seq, u64)>,
    /// Each `Connected` event's `resumed`.
    pub connected: Vec<bool>,
    /// Each `Disconnected` event's cause.
    pub disconnected: Vec<DisconnectCause>,
    /// The `SessionLost` event, if one came: its reason and the messages handed back.
    pub lost: Option<(LostReason, Vec<Message>)>,
    /// Whether a `Closed` event came.
    pub closed: bool,
    /// Server side: the sessions it saw start, in order.
    pub sessions: Vec<SessionId>,
    /// Events nothing here expects (a message on another stream, a payload that is not a number).
    pub unexpected: Vec<String>,
}

impl Log {
    /// How many `Connected { resumed: true }` events came.
    pub fn resumes(&self) -> usize {
        self.connected.iter().filter(|r| **r).count()
    }

    /// How many connections were declared dead by the idle timeout.
    pub fn idle_timeouts(&self) -> usize {
        self.disconnected
            .iter()
            .filter(|c| matches!(c, DisconnectCause::IdleTimeout { .. }))
            .count()
    }

    fn record(&mut self, event: SessionEvent) {
        match event {
            SessionEvent::Received(m) if m.stream == DATA => match number(&m.payload) {
                Some(n) => self.received.push(n),
                None => self.unexpected.push(format!("{m:?}")),
            },
            SessionEvent::Reply { to, payload } => match number(&payload) {
                Some(n) => self.replies.push((to, n)),
                None => self.unexpected.push(format!("reply to {to}: {payload:?}")),
            },
            SessionEvent::Connected { resumed, .. } => self.connected.push(resumed),
            SessionEvent::Disconnected { cause } => self.disconnected.push(cause),
            SessionEvent::SessionLost {
                reason,
                unacknowledged,
            } => self.lost = Some((reason, unacknowledged)),
            SessionEvent::Closed { .. } => self.closed = true,
            SessionEvent::Acknowledged { .. } => {}
            other => self.unexpected.push(format!("{other:?}")),
        }
    }
}

/// A summary: the message lists in full would drown a failure message.
impl fmt::Debug for Log {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let in_order = self
            .received
            .iter()
            .copied()
            .eq(0..self.received.len() as u64);
        let lost = self
            .lost
            .as_ref()
            .map(|(reason, back)| format!("{reason:?}, {} handed back", back.len()));
        f.debug_struct("Log")
            .field(
                "received",
                &format_args!(
                    "{} (last {:?}, {})",
                    self.received.len(),
                    self.received.last(),
                    if in_order {
                        "0.. in order"
                    } else {
                        "NOT 0.. in order"
                    }
                ),
            )
            .field("replies", &self.replies.len())
            .field("connected", &self.connected)
            .field("disconnected", &self.disconnected)
            .field("lost", &lost)
            .field("closed", &self.closed)
            .field("sessions", &self.sessions)
            .field("unexpected", &self.unexpected)
            .finish()
    }
}

/// A [`Log`] shared between the task that fills it and the test that reads it.
pub type SharedLog = Arc<Mutex<Log>>;

/// Locks a log; a panicking recorder cannot leave it half-written.
pub fn lock(log: &SharedLog) -> MutexGuard<'_, Log> {
    log.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Called with each message the client receives, before it is logged.
pub type Hook = Box<dyn FnMut(&Message) + Send>;

/// Records every event of `client` until its session is over; `hook` sees each message first.
pub fn watch_client<R: Rt>(client: &ClientHandle, mut hook: Option<Hook>) -> (SharedLog, Task<()>) {
    let log = SharedLog::default();
    let (client, l) = (client.clone(), log.clone());
    let task = R::spawn(async move {
        while let Some(event) = client.next_event().await {
            if let (SessionEvent::Received(m), Some(hook)) = (&event, &mut hook) {
                hook(m);
            }
            lock(&l).record(event);
        }
    });
    (log, task)
}

/// Records every event of `server` until it shuts down.
pub fn watch_server<R: Rt>(server: &ServerHandle) -> (SharedLog, Task<()>) {
    let log = SharedLog::default();
    let (server, l) = (server.clone(), log.clone());
    let task = R::spawn(async move {
        while let Some(event) = server.next_event().await {
            let mut log = lock(&l);
            match event {
                ServerEvent::Session { session, event } => {
                    if matches!(event, SessionEvent::Connected { resumed: false, .. }) {
                        log.sessions.push(session);
                    }
                    log.record(event);
                }
                other => log.unexpected.push(format!("{other:?}")),
            }
        }
    });
    (log, task)
}

// ---------------------------------------------------------------------------------------------
// A session through the proxy, and traffic over it.

/// How a [`Pair`] is set up.
pub struct Setup {
    /// The server's options.
    pub server: ServerOptions,
    /// The client's options; its server list is replaced by the proxy's address.
    pub client: ClientOptions,
    /// Sees each message the client receives.
    pub client_hook: Option<Hook>,
}

impl fmt::Debug for Setup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Setup")
            .field("server", &self.server)
            .field("client", &self.client)
            .field("client_hook", &self.client_hook.is_some())
            .finish()
    }
}

impl Default for Setup {
    fn default() -> Self {
        Setup {
            server: server_options(),
            client: client_options(vec![any_port()]),
            client_hook: None,
        }
    }
}

/// A server and one client session connected through a [`Chaos`] proxy, both sides' events logged.
///
/// Dropping it (a failed assertion included) shuts the server down and closes the session, so
/// nothing keeps running on a shared executor after the test.
#[derive(Debug)]
pub struct Pair {
    /// The server.
    pub server: ServerHandle,
    /// The client session.
    pub client: ClientHandle,
    /// The proxy between them.
    pub chaos: Chaos,
    /// The session, as the server named it.
    pub session: SessionId,
    /// What the client saw.
    pub client_log: SharedLog,
    /// What the server saw.
    pub server_log: SharedLog,
    server_watch: Option<Task<()>>,
    client_watch: Option<Task<()>>,
}

/// How long a connection may take to come up on a loaded machine.
pub const CONNECT_LIMIT: Duration = Duration::from_secs(5);

impl Pair {
    /// Starts a server, a proxy in front of it and a client through the proxy on runtime `R`, and
    /// waits until the session is up on both sides.
    pub async fn start<R: Rt>(setup: Setup) -> Pair {
        let server = R::listen(any_port(), setup.server)
            .await
            .expect("the server binds a loopback port");
        let (server_log, server_watch) = watch_server::<R>(&server);
        let chaos = Chaos::start(server.local_addr()).await;
        let mut options = setup.client;
        options.servers = vec![chaos.local_addr()];
        let client = R::connect(options).expect("the client starts");
        let (client_log, client_watch) = watch_client::<R>(&client, setup.client_hook);
        let up = within(CONNECT_LIMIT, "the first connection", client.connected()).await;
        assert!(up, "the session ended before its first connection");
        wait_for(
            CONNECT_LIMIT,
            "the server to see the session",
            || !lock(&server_log).sessions.is_empty(),
            || format!("{:?}", lock(&server_log)),
        )
        .await;
        let session = lock(&server_log).sessions[0];
        assert_eq!(
            client.session(),
            Some(session),
            "both ends name one session"
        );
        Pair {
            server,
            client,
            chaos,
            session,
            client_log,
            server_log,
            server_watch: Some(server_watch),
            client_watch: Some(client_watch),
        }
    }

    /// How many data messages each side has received: (server, client).
    pub fn received(&self) -> (usize, usize) {
        (
            lock(&self.server_log).received.len(),
            lock(&self.client_log).received.len(),
        )
    }

    /// Both logs, for a failure message.
    pub fn state(&self) -> String {
        format!(
            "client {:?}; client counters {:?}; server {:?}; proxy {:?}",
            lock(&self.client_log),
            self.client.counters(),
            lock(&self.server_log),
            self.chaos.stats()
        )
    }

    /// Waits until each side has received `n` more data messages than it had when called.
    pub async fn progress(&self, n: usize, limit: Duration, why: &str) {
        let (s0, c0) = self.received();
        wait_for(
            limit,
            format_args!("{n} more messages each way ({why})"),
            || {
                let (s, c) = self.received();
                s >= s0 + n && c >= c0 + n
            },
            || self.state(),
        )
        .await;
    }

    /// Waits until the client is connected and the server has seen `resumes` resumes.
    pub async fn resumed(&self, resumes: usize, limit: Duration) {
        wait_for(
            limit,
            format_args!("the session to resume ({resumes} resumes on the server)"),
            || self.client.is_connected() && lock(&self.server_log).resumes() >= resumes,
            || self.state(),
        )
        .await;
    }

    /// Starts streaming numbered messages both ways, one each way every `pace`.
    pub fn traffic<R: Rt>(&self, pace: Duration) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let up = Arc::new(AtomicU64::new(0));
        let down = Arc::new(AtomicU64::new(0));
        let client = self.client.clone();
        let up_task = R::spawn(stream(stop.clone(), up.clone(), pace, move |payload| {
            let client = client.clone();
            async move { client.send(DATA, Mode::Ordered, payload).await.map(drop) }
        }));
        let (server, session) = (self.server.clone(), self.session);
        let down_task = R::spawn(stream(stop.clone(), down.clone(), pace, move |payload| {
            let server = server.clone();
            async move {
                server
                    .send(session, DATA, Mode::Ordered, payload)
                    .await
                    .map(drop)
            }
        }));
        Traffic {
            stop,
            up,
            down,
            tasks: Some((up_task, down_task)),
        }
    }

    /// Waits until each side has received everything the other sent, then checks both ledgers.
    pub async fn settle(&self, sent: Sent, limit: Duration) {
        wait_for(
            limit,
            format_args!("delivery of everything sent ({sent:?})"),
            || {
                let (s, c) = self.received();
                s as u64 >= sent.up && c as u64 >= sent.down
            },
            || self.state(),
        )
        .await;
        assert_exactly_once_in_order(
            "client to server",
            &lock(&self.server_log).received,
            sent.up,
        );
        assert_exactly_once_in_order(
            "server to client",
            &lock(&self.client_log).received,
            sent.down,
        );
    }

    /// Asserts that the session never ended and nothing unexpected came, on either side.
    pub fn assert_session_intact(&self) {
        for (side, log) in [("client", &self.client_log), ("server", &self.server_log)] {
            let log = lock(log);
            assert!(log.lost.is_none(), "{side}: session lost: {:?}", log.lost);
            assert!(!log.closed, "{side}: session closed");
            assert!(log.unexpected.is_empty(), "{side}: {:?}", log.unexpected);
        }
        assert_eq!(
            lock(&self.server_log).sessions.len(),
            1,
            "one session on the server, resumed rather than replaced"
        );
    }

    /// Closes the session, shuts the server down and waits for both watchers to finish.
    pub async fn finish(mut self, limit: Duration) {
        self.client.close(0, Bytes::from_static(b"test over"));
        if let Some(w) = self.client_watch.take() {
            within(limit, "the client's session to end after close", w).await;
        }
        self.server.shutdown();
        if let Some(w) = self.server_watch.take() {
            within(limit, "the server's events to end after shutdown", w).await;
        }
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        self.server.shutdown();
        self.client.close(0, Bytes::from_static(b"test over"));
    }
}

/// How many numbered messages went each way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sent {
    /// Client to server.
    pub up: u64,
    /// Server to client.
    pub down: u64,
}

/// A sender task: `Err` says which send was refused.
type Sender = Task<Result<(), String>>;

/// Numbered messages streaming both ways; see [`Pair::traffic`].
#[derive(Debug)]
pub struct Traffic {
    stop: Arc<AtomicBool>,
    up: Arc<AtomicU64>,
    down: Arc<AtomicU64>,
    /// The two senders (up, down); each ends with why it stopped early, if it did.
    tasks: Option<(Sender, Sender)>,
}

impl Traffic {
    /// Messages accepted for sending so far.
    pub fn sent(&self) -> Sent {
        Sent {
            up: self.up.load(Ordering::SeqCst),
            down: self.down.load(Ordering::SeqCst),
        }
    }

    /// Stops sending and returns how many were sent each way; a refused send fails the test.
    pub async fn stop(mut self, limit: Duration) -> Sent {
        self.stop.store(true, Ordering::SeqCst);
        if let Some((up, down)) = self.tasks.take() {
            let (up, down) = within(limit, "the senders to stop", future::zip(up, down)).await;
            up.expect("client to server sending");
            down.expect("server to client sending");
        }
        self.sent()
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Sends message 0, 1, 2, … with `send`, one every `pace`, until `stop`; counts what was accepted.
async fn stream<F, Fut>(
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    pace: Duration,
    send: F,
) -> Result<(), String>
where
    F: Fn(Bytes) -> Fut,
    Fut: Future<Output = Result<(), steadfast_core::SendError>>,
{
    while !stop.load(Ordering::SeqCst) {
        let n = sent.load(Ordering::SeqCst);
        send(numbered_padded(n))
            .await
            .map_err(|e| format!("message {n} refused: {e:?}"))?;
        sent.store(n + 1, Ordering::SeqCst);
        async_io::Timer::after(pace).await;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{assert_exactly_once_in_order, number, numbered, numbered_padded};

    #[test]
    fn a_padded_message_carries_its_number_only_while_intact() {
        let padded = numbered_padded(7);
        assert!(padded.len() > 16 * 1024);
        assert_eq!(number(&padded), Some(7));
        assert_eq!(number(&numbered(7)), Some(7));
        assert_eq!(number(&numbered_padded(6)), Some(6));
        let mut bent = padded.to_vec();
        bent[9000] ^= 1;
        assert_eq!(number(&bent), None);
        assert_eq!(number(&padded[..padded.len() - 1]), None);
    }

    #[test]
    fn a_complete_ordered_ledger_passes() {
        assert_exactly_once_in_order("ledger", &[0, 1, 2, 3], 4);
        assert_exactly_once_in_order("ledger", &[], 0);
    }

    #[test]
    #[should_panic(expected = "duplicates [2]")]
    fn a_duplicate_fails_the_ledger() {
        assert_exactly_once_in_order("ledger", &[0, 1, 2, 2, 3], 4);
    }

    #[test]
    #[should_panic(expected = "missing [2]")]
    fn a_gap_fails_the_ledger() {
        assert_exactly_once_in_order("ledger", &[0, 1, 3], 4);
    }

    #[test]
    #[should_panic(expected = "first out of place (index, number) Some((1, 2))")]
    fn a_reordering_fails_the_ledger() {
        assert_exactly_once_in_order("ledger", &[0, 2, 1, 3], 4);
    }

    #[test]
    #[should_panic(expected = "never sent [4]")]
    fn a_message_never_sent_fails_the_ledger() {
        assert_exactly_once_in_order("ledger", &[0, 1, 2, 3, 4], 4);
    }
}

// ---------------------------------------------------------------------------------------------
// A real Redis for the cluster tests and bench.

/// A throwaway `redis-server` on a free loopback port.
pub mod redis {
    use std::process::{Child, Command, Stdio};
    use std::time::{Duration, Instant};

    /// A child process, killed if the test ends before it is done with it.
    pub struct Kid(pub Child);

    impl Drop for Kid {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    /// Whether a Redis answers `PING` on `port` of loopback.
    fn pong(port: u16) -> bool {
        use std::io::{Read, Write};
        let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
        let mut answer = [0u8; 7];
        s.write_all(b"PING\r\n").is_ok()
            && s.read_exact(&mut answer).is_ok()
            && &answer == b"+PONG\r\n"
    }

    /// A Redis on a free loopback port, with no persistence: what it holds is the cluster's state.
    pub fn redis() -> Option<(Kid, String)> {
        let found = Command::new("redis-server")
            .arg("--version")
            .output()
            .is_ok();
        if !found {
            assert!(
                std::env::var_os("STEADFAST_REQUIRE_REDIS").is_none(),
                "redis-server is not installed and STEADFAST_REQUIRE_REDIS is set"
            );
            eprintln!("skipped: redis-server is not installed");
            return None;
        }
        // A free port can be taken by another test between our check and redis binding it: then
        // redis exits, or something else answers there. Only a PONG on the port means ours is up.
        let deadline = Instant::now() + Duration::from_secs(10);
        let (kid, port) = 'start: loop {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let child = Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no"])
                .stdout(Stdio::null())
                .spawn()
                .expect("redis-server starts");
            let mut kid = Kid(child);
            loop {
                assert!(Instant::now() < deadline, "redis-server did not listen");
                if kid.0.try_wait().ok().flatten().is_some() {
                    continue 'start;
                }
                if pong(port) {
                    break 'start (kid, port);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        };
        Some((kid, format!("redis://127.0.0.1:{port}/")))
    }
}
