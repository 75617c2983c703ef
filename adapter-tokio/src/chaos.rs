//! A fault-injecting TCP proxy for testing code that must survive a bad network.
//!
//! steadfast promises that a session survives dead paths, resets and server restarts (DESIGN.md §2).
//! The simulator proves that against the core with virtual time; this proxy lets the same faults hit
//! real sockets, so the adapters, and applications built on them, can be tested end to end. Put a
//! [`ChaosProxy`] between a client and a server on loopback, point the client at
//! [`ChaosProxy::local_addr`], and break the path on command ([`ChaosProxy::apply`]) or on a seeded
//! schedule ([`ChaosProxy::run_schedule`]).
//!
//! ```
//! use std::time::Duration;
//! use steadfast_tokio::chaos::{ChaosProxy, Fault, Target};
//! use tokio::io::{AsyncReadExt, AsyncWriteExt};
//! use tokio::net::{TcpListener, TcpStream};
//! use tokio::time::timeout;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> std::io::Result<()> {
//! let server = TcpListener::bind("127.0.0.1:0").await?;
//! let proxy = ChaosProxy::start(server.local_addr()?).await?;
//! let mut client = TcpStream::connect(proxy.local_addr()).await?;
//! let (mut upstream, _) = server.accept().await?;
//!
//! client.write_all(b"ping").await?;
//! let mut buf = [0; 4];
//! upstream.read_exact(&mut buf).await?;
//! assert_eq!(&buf, b"ping");
//!
//! // A silently dead path: both sockets stay open, nothing arrives and nothing fails.
//! proxy.apply(Target::All, Fault::Blackhole);
//! client.write_all(b"lost").await?;
//! assert!(timeout(Duration::from_millis(100), upstream.read(&mut buf)).await.is_err());
//!
//! // The path comes back, but not for this connection: TCP never delivers a stream with a hole,
//! // so a connection that lost bytes stays dead until an end gives up on it. New ones work.
//! proxy.heal(Target::All);
//! client.write_all(b"more").await?;
//! assert!(timeout(Duration::from_millis(100), upstream.read(&mut buf)).await.is_err());
//! let mut again = TcpStream::connect(proxy.local_addr()).await?;
//! let (mut upstream, _) = server.accept().await?;
//! again.write_all(b"back").await?;
//! upstream.read_exact(&mut buf).await?;
//! assert_eq!(&buf, b"back");
//! # Ok(())
//! # }
//! ```
//!
//! # What each fault means
//!
//! The proxy terminates TCP on both sides, so it cannot lose a packet: the kernel has already
//! acknowledged every byte it reads. Each fault is therefore a choice about what the two peers see,
//! modelled on a real failure:
//!
//! | fault | models | bytes in that time |
//! |---|---|---|
//! | [`Fault::Blackhole`] | a VM live migration, a silently dead route | dropped, both directions; connections stay open, and one that lost bytes stays dead after heal |
//! | [`Fault::Freeze`] | a paused path that TCP will eventually get through | held (the proxy stops reading, so TCP flow control stalls the sender) and delivered on heal |
//! | [`Fault::Delay`] | latency | delayed per chunk, order kept |
//! | [`Fault::Throttle`] | a thin pipe | paced to a rate per direction |
//! | [`Fault::Reset`] | a middlebox or a peer crash | both peers get an RST at once |
//! | [`Fault::HalfOpen`] | a path dead in one direction | dropped in that direction only, which stays dead after heal if it lost bytes; nothing closes |
//! | [`Fault::HalfClose`] | a peer that shut down its write side | the peer on the far end reads end-of-file; later bytes that way are dropped |
//!
//! A blackhole drops rather than buffers because the bytes that crossed a silent path are what a
//! session protocol must recover: the sender believes they were sent (TCP accepted them) and only
//! the session layer's acknowledgements can tell otherwise. A blackhole does hold back an
//! end-of-file or a connection error until it heals, as a real dead path would hold back the FIN
//! or RST that TCP keeps retransmitting; otherwise the peers would learn of the closure through a
//! path that is meant to be silent. A direction that lost bytes never carries another one, even
//! after heal: a real TCP connection cannot skip a hole in its stream, so it either gets the lost
//! bytes through (that is [`Fault::Freeze`]) or dies, and the peers must notice and reconnect.
//! Use [`Fault::Freeze`] when the path should come back with nothing lost.
//!
//! Faults accumulate on a connection until [`ChaosProxy::heal`]: a delay and a throttle can be in
//! force together, and a second fault of the same kind replaces the first. Healing cannot undo a
//! [`Fault::HalfClose`], because the end-of-file has already been sent.
//!
//! # Determinism
//!
//! [`Schedule::plan`] is a pure function of the seed: the same seed gives the same faults, gaps and
//! durations on every platform and run (it uses PCG and its own integer range reduction, so it does
//! not change with `rand`'s distribution code either). Carrying the plan out runs on the wall clock,
//! so what a fault catches in flight depends on timing; only the sequence is reproducible.
//!
//! Events (connections, faults, heals, resets) are logged with `tracing`.

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::net::{Shutdown, SocketAddr};
use std::ops::RangeInclusive;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use rand::{RngCore, SeedableRng};
use rand_pcg::Pcg64;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio::task::{AbortHandle, JoinHandle, JoinSet};
use tokio::time::{Instant, sleep, sleep_until};
use tracing::{debug, info, trace, warn};

/// Bytes read from a socket at a time; a chunk is the unit that [`Fault::Delay`] delays.
const CHUNK: usize = 16 * 1024;

/// Bytes one direction may hold between reading and writing (while delayed or throttled), so a fast
/// sender meets TCP back-pressure instead of growing the proxy's memory without bound.
const IN_FLIGHT: usize = 1024 * 1024;

/// A throttled direction writes in slices this fraction of a second long, so the rate holds over
/// short spans and not only on average.
const THROTTLE_SLICES_PER_SEC: u64 = 20;

/// One proxied connection, numbered from 0 in the order the proxy accepted them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ConnId(u64);

impl ConnId {
    /// The number, for logs and for matching against [`ConnInfo::id`].
    pub fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for ConnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "conn#{}", self.0)
    }
}

/// One direction of a proxied connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Direction {
    /// From the client that connected to the proxy towards the upstream server.
    ClientToServer,
    /// From the upstream server back to the client.
    ServerToClient,
}

impl Direction {
    const BOTH: [Direction; 2] = [Direction::ClientToServer, Direction::ServerToClient];

    fn index(self) -> usize {
        match self {
            Direction::ClientToServer => 0,
            Direction::ServerToClient => 1,
        }
    }
}

/// Which connections a command reaches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Target {
    /// Every connection open now; later connections are untouched.
    All,
    /// One connection; a command for one that has closed does nothing.
    Conn(ConnId),
    /// Every connection open now and every one accepted until healed with this same target: a
    /// partition, where reconnecting does not help.
    AllAndNew,
}

/// A way to break a connection. See the [module documentation](self) for what each one models.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Fault {
    /// Drop every byte in both directions while keeping both connections open.
    Blackhole,
    /// Stop reading from both peers and release everything, in order, on heal.
    Freeze,
    /// Hold each chunk this long after the proxy read it, in both directions.
    Delay(Duration),
    /// Pace each direction to this many bytes per second (0 counts as 1).
    Throttle {
        /// The rate each direction is held to.
        bytes_per_sec: u64,
    },
    /// Abort the connection: both peers get an RST, and it leaves the proxy's table.
    Reset,
    /// Drop every byte in one direction, silently and without closing anything.
    HalfOpen {
        /// The direction that goes dead.
        direction: Direction,
    },
    /// Send end-of-file to the peer that this direction writes to, then drop that direction's bytes.
    HalfClose {
        /// The direction that is shut down.
        direction: Direction,
    },
}

/// A connection as [`ChaosProxy::connections`] saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConnInfo {
    /// What [`Target::Conn`] takes.
    pub id: ConnId,
    /// The client's address, as the proxy's listener saw it.
    pub client: SocketAddr,
    /// The server this connection was forwarded to (the upstream when it was accepted).
    pub upstream: SocketAddr,
    /// Bytes forwarded from the client to the server.
    pub bytes_up: u64,
    /// Bytes forwarded from the server to the client.
    pub bytes_down: u64,
    /// Bytes read from either peer and thrown away by a fault.
    pub bytes_dropped: u64,
    /// The faults in force, in a fixed order (not the order applied).
    pub faults: Vec<Fault>,
}

/// How often each kind of fault was applied to a connection; one [`ChaosProxy::apply`] to three
/// connections counts three times.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct FaultCounts {
    /// [`Fault::Blackhole`]s applied.
    pub blackhole: u64,
    /// [`Fault::Freeze`]s applied.
    pub freeze: u64,
    /// [`Fault::Delay`]s applied.
    pub delay: u64,
    /// [`Fault::Throttle`]s applied.
    pub throttle: u64,
    /// [`Fault::Reset`]s applied, counting connections reset on arrival under [`Target::AllAndNew`].
    pub reset: u64,
    /// [`Fault::HalfOpen`]s applied.
    pub half_open: u64,
    /// [`Fault::HalfClose`]s applied.
    pub half_close: u64,
}

impl FaultCounts {
    /// The count for `fault`'s kind, whatever its parameters.
    pub fn of(&self, fault: &Fault) -> u64 {
        match fault {
            Fault::Blackhole => self.blackhole,
            Fault::Freeze => self.freeze,
            Fault::Delay(_) => self.delay,
            Fault::Throttle { .. } => self.throttle,
            Fault::Reset => self.reset,
            Fault::HalfOpen { .. } => self.half_open,
            Fault::HalfClose { .. } => self.half_close,
        }
    }

    fn bump(&mut self, fault: &Fault) {
        let slot = match fault {
            Fault::Blackhole => &mut self.blackhole,
            Fault::Freeze => &mut self.freeze,
            Fault::Delay(_) => &mut self.delay,
            Fault::Throttle { .. } => &mut self.throttle,
            Fault::Reset => &mut self.reset,
            Fault::HalfOpen { .. } => &mut self.half_open,
            Fault::HalfClose { .. } => &mut self.half_close,
        };
        *slot += 1;
    }
}

/// What the proxy has done since it started, for asserting that a test exercised what it meant to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ChaosStats {
    /// Connections accepted and forwarded (not counting refused ones).
    pub accepted: u64,
    /// Connections reset on arrival because of [`ChaosProxy::refuse_new`].
    pub refused: u64,
    /// Faults applied, by kind.
    pub applied: FaultCounts,
    /// Connections healed.
    pub heals: u64,
    /// Bytes forwarded from clients to servers.
    pub bytes_up: u64,
    /// Bytes forwarded from servers to clients.
    pub bytes_down: u64,
    /// Bytes read and thrown away by faults.
    pub bytes_dropped: u64,
}

/// A running proxy. Clones share it; dropping the last clone closes the listener and every
/// connection (gracefully, not with an RST), and stops its schedules.
#[derive(Clone)]
pub struct ChaosProxy {
    shared: Arc<Shared>,
    _alive: Arc<Alive>,
}

impl fmt::Debug for ChaosProxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChaosProxy")
            .field("local_addr", &self.shared.local_addr)
            .finish_non_exhaustive()
    }
}

impl ChaosProxy {
    /// Listens on an ephemeral port of 127.0.0.1 and forwards each connection to `upstream`.
    ///
    /// The connection to `upstream` is made when a client arrives, so the server need not be up
    /// yet; if it cannot be reached, the client's connection is reset.
    pub async fn start(upstream: SocketAddr) -> io::Result<ChaosProxy> {
        let listener = TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0)).await?;
        let local_addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            local_addr,
            table: Mutex::new(Table {
                upstream,
                refuse_new: false,
                for_new: Faults::default(),
                reset_new: false,
                next_id: 0,
                conns: BTreeMap::new(),
                applied: FaultCounts::default(),
                heals: 0,
                refused: 0,
                tasks: Vec::new(),
            }),
            bytes: Counters::default(),
            accepted: watch::Sender::new(0),
        });
        let accept = tokio::spawn(accept_loop(shared.clone(), listener));
        shared.lock().tasks.push(accept.abort_handle());
        info!(%local_addr, %upstream, "chaos proxy listening");
        Ok(ChaosProxy {
            _alive: Arc::new(Alive {
                shared: shared.clone(),
            }),
            shared,
        })
    }

    /// The address clients should connect to instead of the server's.
    pub fn local_addr(&self) -> SocketAddr {
        self.shared.local_addr
    }

    /// The connections open now, in the order they were accepted.
    pub fn connections(&self) -> Vec<ConnInfo> {
        let table = self.shared.lock();
        table
            .conns
            .iter()
            .map(|(&id, conn)| ConnInfo {
                id,
                client: conn.client_addr,
                upstream: conn.upstream,
                bytes_up: conn.bytes.up.load(Ordering::Relaxed),
                bytes_down: conn.bytes.down.load(Ordering::Relaxed),
                bytes_dropped: conn.bytes.dropped.load(Ordering::Relaxed),
                faults: conn.faults.borrow().list(),
            })
            .collect()
    }

    /// Breaks the targeted connections, and returns how many open connections it reached.
    ///
    /// The fault is in force when this returns, even for a pump that is blocked in a read, so a test
    /// can apply a fault and then send, knowing that what it sends meets the fault.
    pub fn apply(&self, target: Target, fault: Fault) -> usize {
        self.shared.apply(target, fault)
    }

    /// Restores normal forwarding on the targeted connections, and returns how many it reached.
    ///
    /// [`Target::All`] heals the open connections but leaves a partition made with
    /// [`Target::AllAndNew`] in force for the next arrivals; heal with `AllAndNew` to end it.
    pub fn heal(&self, target: Target) -> usize {
        self.shared.heal(target)
    }

    /// Forwards connections accepted from now on to `upstream`; open ones keep their server. This
    /// models a server restarting on a new address.
    pub fn set_upstream(&self, upstream: SocketAddr) {
        info!(%upstream, "chaos: new upstream");
        self.shared.lock().upstream = upstream;
    }

    /// While `true`, resets each new connection as soon as it arrives, as if the server were down.
    ///
    /// The proxy keeps its port (so nothing else can take it and clients keep a valid address), so
    /// the kernel still completes each handshake: a client sees a connection reset, reported by its
    /// connect or by its first read or write, rather than a refused connect.
    pub fn refuse_new(&self, refuse: bool) {
        info!(refuse, "chaos: refuse new connections");
        self.shared.lock().refuse_new = refuse;
    }

    /// Waits until the proxy has accepted `total` connections since it started (refused ones do not
    /// count), so a test can apply a fault to a connection it knows the proxy has seen: a client's
    /// connect returns as soon as the kernel completes the handshake, before the proxy accepts.
    pub async fn wait_for_accepted(&self, total: u64) {
        let mut accepted = self.shared.accepted.subscribe();
        // The sender lives in `shared`, which this handle keeps alive, so this cannot fail.
        let _ = accepted.wait_for(|&n| n >= total).await;
    }

    /// Carries out `schedule` with `seed` on a task: wait, apply a fault, wait, heal, and again.
    ///
    /// The steps are [`Schedule::plan`]`(seed, ..)`; each ends by healing the schedule's target, so
    /// the schedule owns that target's faults while it runs. Aborting the returned handle (or
    /// dropping the proxy) stops the schedule and heals whatever fault it had in force.
    pub fn run_schedule(&self, seed: u64, schedule: Schedule) -> JoinHandle<()> {
        let shared = self.shared.clone();
        let task = tokio::spawn(async move {
            let target = schedule.target;
            let mut in_force = HealOnDrop {
                shared,
                target,
                armed: false,
            };
            for (index, step) in schedule.steps(seed).enumerate() {
                sleep(step.after).await;
                info!(seed, index, fault = ?step.fault, lasts = ?step.lasts, "chaos schedule step");
                in_force.shared.apply(target, step.fault);
                in_force.armed = true;
                sleep(step.lasts).await;
                in_force.shared.heal(target);
                in_force.armed = false;
            }
        });
        let mut table = self.shared.lock();
        table.tasks.retain(|task| !task.is_finished());
        table.tasks.push(task.abort_handle());
        task
    }

    /// Counts of what the proxy has done since it started.
    pub fn stats(&self) -> ChaosStats {
        let table = self.shared.lock();
        ChaosStats {
            accepted: *self.shared.accepted.borrow(),
            refused: table.refused,
            applied: table.applied,
            heals: table.heals,
            bytes_up: self.shared.bytes.up.load(Ordering::Relaxed),
            bytes_down: self.shared.bytes.down.load(Ordering::Relaxed),
            bytes_dropped: self.shared.bytes.dropped.load(Ordering::Relaxed),
        }
    }
}

/// A seeded plan of faults for [`ChaosProxy::run_schedule`].
///
/// Each step waits a gap drawn uniformly from zero to twice the mean, applies a fault drawn
/// uniformly from the list (list one several times to weight it), keeps it for a duration drawn
/// uniformly from the range, then heals.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schedule {
    faults: Vec<Fault>,
    mean_gap: Duration,
    lasting: RangeInclusive<Duration>,
    target: Target,
    limit: Option<usize>,
}

/// One step of a [`Schedule`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct Step {
    /// Healthy time before the fault.
    pub after: Duration,
    /// The fault.
    pub fault: Fault,
    /// How long the fault stays before the heal.
    pub lasts: Duration,
}

impl Schedule {
    /// Draws from `faults`, about once a second, each lasting 100 ms to 1 s, on [`Target::All`],
    /// with no end; an empty list makes a schedule that does nothing.
    pub fn new(faults: impl IntoIterator<Item = Fault>) -> Schedule {
        Schedule {
            faults: faults.into_iter().collect(),
            mean_gap: Duration::from_secs(1),
            lasting: Duration::from_millis(100)..=Duration::from_secs(1),
            target: Target::All,
            limit: None,
        }
    }

    /// Sets the mean healthy gap before each fault.
    pub fn every(mut self, mean_gap: Duration) -> Schedule {
        self.mean_gap = mean_gap;
        self
    }

    /// Sets the range a fault's duration is drawn from; a reversed range is read the right way round.
    pub fn lasting(mut self, range: RangeInclusive<Duration>) -> Schedule {
        let (a, b) = range.into_inner();
        self.lasting = a.min(b)..=a.max(b);
        self
    }

    /// Sets the connections the faults hit; [`Target::AllAndNew`] makes each fault a partition.
    pub fn on(mut self, target: Target) -> Schedule {
        self.target = target;
        self
    }

    /// Ends the schedule after `steps` steps, so a test can wait for it to finish.
    pub fn limit(mut self, steps: usize) -> Schedule {
        self.limit = Some(steps);
        self
    }

    /// The first `n` steps (fewer if the schedule has a smaller limit) that
    /// [`ChaosProxy::run_schedule`] carries out for `seed`. A pure function of its arguments.
    pub fn plan(&self, seed: u64, n: usize) -> Vec<Step> {
        self.steps(seed).take(n).collect()
    }

    fn steps(&self, seed: u64) -> impl Iterator<Item = Step> + Send + 'static {
        let mut rng = Pcg64::seed_from_u64(seed);
        let faults = self.faults.clone();
        let max_gap = nanos(self.mean_gap).saturating_mul(2);
        let (shortest, longest) = (nanos(*self.lasting.start()), nanos(*self.lasting.end()));
        std::iter::from_fn(move || {
            if faults.is_empty() {
                return None;
            }
            let after = Duration::from_nanos(draw(&mut rng, 0, max_gap));
            let which = draw(&mut rng, 0, faults.len() as u64 - 1) as usize;
            let lasts = Duration::from_nanos(draw(&mut rng, shortest, longest));
            Some(Step {
                after,
                fault: faults[which],
                lasts,
            })
        })
        .take(self.limit.unwrap_or(usize::MAX))
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// A number in `low..=high`, by widening multiplication rather than `rand`'s distributions, so a
/// seed's plan depends only on PCG's output, which `rand_pcg` keeps stable.
fn draw(rng: &mut Pcg64, low: u64, high: u64) -> u64 {
    let span = u128::from(high - low) + 1;
    low + ((u128::from(rng.next_u64()) * span) >> 64) as u64
}

/// Heals the schedule's target if the schedule is stopped while a fault is in force, so aborting a
/// schedule never strands a connection in a blackhole.
struct HealOnDrop {
    shared: Arc<Shared>,
    target: Target,
    armed: bool,
}

impl Drop for HealOnDrop {
    fn drop(&mut self) {
        if self.armed {
            self.shared.heal(self.target);
        }
    }
}

/// Stops the proxy when the last [`ChaosProxy`] handle goes. Tasks hold [`Shared`] but not this, so
/// they cannot keep a forgotten proxy running.
struct Alive {
    shared: Arc<Shared>,
}

impl Drop for Alive {
    fn drop(&mut self) {
        let mut table = self.shared.lock();
        for task in table.tasks.drain(..) {
            task.abort();
        }
        for (_, conn) in std::mem::take(&mut table.conns) {
            conn.task.abort();
        }
        debug!(local_addr = %self.shared.local_addr, "chaos proxy stopped");
    }
}

struct Shared {
    local_addr: SocketAddr,
    table: Mutex<Table>,
    bytes: Counters,
    /// Connections accepted so far, watched by [`ChaosProxy::wait_for_accepted`].
    accepted: watch::Sender<u64>,
}

struct Table {
    upstream: SocketAddr,
    refuse_new: bool,
    /// Faults that [`Target::AllAndNew`] put on arrivals.
    for_new: Faults,
    reset_new: bool,
    next_id: u64,
    conns: BTreeMap<ConnId, Conn>,
    applied: FaultCounts,
    heals: u64,
    refused: u64,
    /// The accept loop and the schedules, stopped with the proxy.
    tasks: Vec<AbortHandle>,
}

impl Table {
    fn ids(&self, target: Target) -> Vec<ConnId> {
        match target {
            Target::Conn(id) => self
                .conns
                .contains_key(&id)
                .then_some(id)
                .into_iter()
                .collect(),
            Target::All | Target::AllAndNew => self.conns.keys().copied().collect(),
        }
    }
}

struct Conn {
    client_addr: SocketAddr,
    upstream: SocketAddr,
    faults: watch::Sender<Faults>,
    client: Arc<TcpStream>,
    /// A second handle on the upstream socket, made before it connects, so that a reset can give
    /// it a zero linger even while the connect is under way (the upstream may have accepted it
    /// already); the handle only sets options, and is dropped with the entry.
    server: Option<socket2::Socket>,
    bytes: Arc<Counters>,
    task: AbortHandle,
}

#[derive(Default)]
struct Counters {
    up: AtomicU64,
    down: AtomicU64,
    dropped: AtomicU64,
}

impl Counters {
    fn forwarded(&self, direction: Direction, n: usize) {
        let counter = match direction {
            Direction::ClientToServer => &self.up,
            Direction::ServerToClient => &self.down,
        };
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// Counts a direction's bytes in its connection's counters and the proxy's totals, and remembers
/// whether the direction has lost any.
struct Meter {
    conn: Arc<Counters>,
    shared: Arc<Shared>,
    /// Set once a byte this way was dropped: TCP never delivers a stream with a hole in it, so from
    /// then on the direction is dead for good, whatever heals.
    severed: Arc<AtomicBool>,
}

impl Meter {
    fn forwarded(&self, direction: Direction, n: usize) {
        self.conn.forwarded(direction, n);
        self.shared.bytes.forwarded(direction, n);
    }

    fn severed(&self) -> bool {
        self.severed.load(Ordering::Relaxed)
    }

    fn dropped(&self, n: usize) {
        self.severed.store(true, Ordering::Relaxed);
        self.conn.dropped.fetch_add(n as u64, Ordering::Relaxed);
        self.shared
            .bytes
            .dropped
            .fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// The faults in force on one connection, published through a watch channel so each pump sees a
/// change at once, even while it waits on a socket.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Faults {
    blackhole: bool,
    freeze: bool,
    delay: Duration,
    throttle: Option<u64>,
    half_open: [bool; 2],
    half_closed: [bool; 2],
}

impl Faults {
    /// Adds a fault; [`Fault::Reset`] is not a state and is handled by the caller.
    fn add(&mut self, fault: Fault) {
        match fault {
            Fault::Blackhole => self.blackhole = true,
            Fault::Freeze => self.freeze = true,
            Fault::Delay(delay) => self.delay = delay,
            Fault::Throttle { bytes_per_sec } => self.throttle = Some(bytes_per_sec.max(1)),
            Fault::Reset => {}
            Fault::HalfOpen { direction } => self.half_open[direction.index()] = true,
            Fault::HalfClose { direction } => self.half_closed[direction.index()] = true,
        }
    }

    /// Normal forwarding, except that a sent end-of-file cannot be taken back.
    fn healed(&self) -> Faults {
        Faults {
            half_closed: self.half_closed,
            ..Faults::default()
        }
    }

    /// Whether bytes read in `direction` are thrown away.
    fn drops(&self, direction: Direction) -> bool {
        let i = direction.index();
        self.blackhole || self.half_open[i] || self.half_closed[i]
    }

    /// Whether an end-of-file or error in `direction` must wait: a silent path carries no news.
    fn holds_closure(&self, direction: Direction) -> bool {
        self.blackhole || self.freeze || self.half_open[direction.index()]
    }

    fn list(&self) -> Vec<Fault> {
        let mut list = Vec::new();
        if self.blackhole {
            list.push(Fault::Blackhole);
        }
        if self.freeze {
            list.push(Fault::Freeze);
        }
        if !self.delay.is_zero() {
            list.push(Fault::Delay(self.delay));
        }
        if let Some(bytes_per_sec) = self.throttle {
            list.push(Fault::Throttle { bytes_per_sec });
        }
        for direction in Direction::BOTH {
            if self.half_open[direction.index()] {
                list.push(Fault::HalfOpen { direction });
            }
        }
        for direction in Direction::BOTH {
            if self.half_closed[direction.index()] {
                list.push(Fault::HalfClose { direction });
            }
        }
        list
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Table> {
        // Nothing under this lock can be left half-done by a panic, so a poisoned table is fine.
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn apply(&self, target: Target, fault: Fault) -> usize {
        let mut table = self.lock();
        if target == Target::AllAndNew {
            match fault {
                Fault::Reset => table.reset_new = true,
                _ => table.for_new.add(fault),
            }
        }
        let ids = table.ids(target);
        for &id in &ids {
            table.applied.bump(&fault);
            if fault == Fault::Reset {
                reset(&mut table, id, "reset fault");
            } else if let Some(conn) = table.conns.get(&id) {
                conn.faults.send_modify(|faults| faults.add(fault));
            }
        }
        info!(
            ?target,
            ?fault,
            connections = ids.len(),
            "chaos: fault applied"
        );
        ids.len()
    }

    fn heal(&self, target: Target) -> usize {
        let mut table = self.lock();
        if target == Target::AllAndNew {
            table.for_new = Faults::default();
            table.reset_new = false;
        }
        let ids = table.ids(target);
        for id in &ids {
            if let Some(conn) = table.conns.get(id) {
                conn.faults.send_modify(|faults| *faults = faults.healed());
            }
        }
        table.heals += ids.len() as u64;
        info!(?target, connections = ids.len(), "chaos: healed");
        ids.len()
    }

    /// Takes a freshly accepted client into the table (or turns it away) and starts its pumps.
    fn admit(self: &Arc<Self>, client: TcpStream, client_addr: SocketAddr) {
        let mut table = self.lock();
        if table.refuse_new || table.reset_new {
            if table.refuse_new {
                table.refused += 1;
            } else {
                table.applied.bump(&Fault::Reset);
            }
            zero_linger(&client);
            info!(%client_addr, "chaos: new connection reset on arrival");
            return;
        }
        let _ = client.set_nodelay(true);
        let id = ConnId(table.next_id);
        table.next_id += 1;
        let faults = table.for_new.clone();
        for fault in faults.list() {
            table.applied.bump(&fault);
        }
        let upstream = table.upstream;
        let client = Arc::new(client);
        let bytes = Arc::new(Counters::default());
        let (faults, faults_rx) = watch::channel(faults);
        // Counted before the pumps start, so whatever they make a peer see, the count already shows.
        self.accepted.send_modify(|n| *n += 1);
        let task = tokio::spawn(run_conn(
            self.clone(),
            id,
            client.clone(),
            upstream,
            faults_rx,
            bytes.clone(),
        ));
        table.conns.insert(
            id,
            Conn {
                client_addr,
                upstream,
                faults,
                client,
                server: None,
                bytes,
                task: task.abort_handle(),
            },
        );
        drop(table);
        info!(%id, %client_addr, %upstream, "chaos: connection accepted");
    }

    fn reset(&self, id: ConnId, why: &str) {
        reset(&mut self.lock(), id, why);
    }

    /// Forgets a connection that closed of its own accord.
    fn forget(&self, id: ConnId) {
        if self.lock().conns.remove(&id).is_some() {
            info!(%id, "chaos: connection closed");
        }
    }
}

/// Aborts a connection so that both peers see an RST: a zero linger makes the close that follows
/// (when the aborted pumps drop their handles to the sockets) send RST instead of FIN.
fn reset(table: &mut Table, id: ConnId, why: &str) {
    let Some(conn) = table.conns.remove(&id) else {
        return;
    };
    zero_linger(&conn.client);
    if let Some(server) = &conn.server {
        zero_linger(server);
    }
    conn.task.abort();
    info!(%id, why, "chaos: connection reset");
}

async fn accept_loop(shared: Arc<Shared>, listener: TcpListener) {
    loop {
        match listener.accept().await {
            Ok((client, client_addr)) => shared.admit(client, client_addr),
            Err(error) => {
                // Out of descriptors and the like: back off rather than spin on the same error.
                warn!(%error, "chaos: accept failed");
                sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Connects upstream, runs the four pumps (a reader and a writer per direction, so a delayed
/// chunk does not stop the next one being read), and cleans up when they end.
async fn run_conn(
    shared: Arc<Shared>,
    id: ConnId,
    client: Arc<TcpStream>,
    upstream: SocketAddr,
    faults: watch::Receiver<Faults>,
    bytes: Arc<Counters>,
) {
    let server = match connect_upstream(&shared, id, upstream).await {
        Ok(Some(server)) => Arc::new(server),
        // Reset before the socket was made: there is nobody upstream to tell.
        Ok(None) => return,
        Err(error) => {
            debug!(%id, %upstream, %error, "chaos: upstream connect failed");
            shared.reset(id, "upstream unreachable");
            return;
        }
    };
    let _ = server.set_nodelay(true);
    let mut pumps = JoinSet::new();
    for direction in Direction::BOTH {
        let (src, dst) = match direction {
            Direction::ClientToServer => (client.clone(), server.clone()),
            Direction::ServerToClient => (server.clone(), client.clone()),
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let severed = Arc::new(AtomicBool::new(false));
        let meter = || Meter {
            conn: bytes.clone(),
            shared: shared.clone(),
            severed: severed.clone(),
        };
        pumps.spawn(read_pump(direction, src, tx, faults.clone(), meter()));
        pumps.spawn(
            Writer {
                direction,
                dst,
                faults: faults.clone(),
                meter: meter(),
                shut: false,
                next_slice: None,
            }
            .run(rx),
        );
    }
    drop((client, server));
    while let Some(joined) = pumps.join_next().await {
        let error = match joined {
            Ok(Ok(())) => continue,
            Ok(Err(error)) => error.to_string(),
            Err(join_error) => join_error.to_string(),
        };
        debug!(%id, %error, "chaos: passing a connection failure on to both peers");
        shared.reset(id, "peer failed");
        return;
    }
    shared.forget(id);
}

/// What the reader hands the writer of the same direction.
enum Item {
    Data {
        read_at: Instant,
        bytes: Vec<u8>,
        /// Returns the bytes to the direction's in-flight budget once written or dropped.
        _budget: OwnedSemaphorePermit,
    },
    Eof {
        read_at: Instant,
    },
    Failed {
        read_at: Instant,
        error: io::Error,
    },
}

async fn read_pump(
    direction: Direction,
    src: Arc<TcpStream>,
    tx: mpsc::UnboundedSender<Item>,
    mut faults: watch::Receiver<Faults>,
    meter: Meter,
) -> io::Result<()> {
    let budget = Arc::new(Semaphore::new(IN_FLIGHT));
    let mut buf = vec![0; CHUNK];
    loop {
        if faults.borrow_and_update().freeze {
            // Leave the bytes in the kernel: TCP flow control then stalls the sender, as a paused
            // path would, and nothing is lost.
            if faults.changed().await.is_err() {
                return Ok(());
            }
            continue;
        }
        let read = tokio::select! {
            read = read_some(&src, &mut buf) => read,
            changed = faults.changed() => {
                if changed.is_err() {
                    return Ok(());
                }
                continue;
            }
        };
        let read_at = Instant::now();
        let item = match read {
            Ok(0) => Item::Eof { read_at },
            Ok(n) => {
                if faults.borrow().drops(direction) || meter.severed() {
                    trace!(?direction, n, "chaos: dropped on arrival");
                    meter.dropped(n);
                    continue;
                }
                // A read is at most one chunk, far below `u32::MAX`.
                let Ok(budget) = budget.clone().acquire_many_owned(n as u32).await else {
                    unreachable!("the budget is never closed");
                };
                Item::Data {
                    read_at,
                    bytes: buf[..n].to_vec(),
                    _budget: budget,
                }
            }
            Err(error) => Item::Failed { read_at, error },
        };
        let last = !matches!(item, Item::Data { .. });
        if tx.send(item).is_err() || last {
            return Ok(());
        }
    }
}

/// The writing half of one direction: holds each item until the faults let it through.
struct Writer {
    direction: Direction,
    dst: Arc<TcpStream>,
    faults: watch::Receiver<Faults>,
    meter: Meter,
    /// Whether this direction's write side is shut down (by a half-close or an end-of-file).
    shut: bool,
    /// When a throttled direction may write its next slice.
    next_slice: Option<Instant>,
}

impl Writer {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Item>) -> io::Result<()> {
        loop {
            let Some(_) = self.current()? else {
                return Ok(());
            };
            let item = tokio::select! {
                item = rx.recv() => item,
                changed = self.faults.changed() => {
                    if changed.is_err() {
                        return Ok(());
                    }
                    continue;
                }
            };
            match item {
                None => return Ok(()),
                Some(Item::Data { read_at, bytes, .. }) => {
                    if !self.write(read_at, &bytes).await? {
                        return Ok(());
                    }
                }
                Some(Item::Eof { read_at }) => {
                    if self.hold_closure(read_at).await? {
                        shutdown_write(&self.dst)?;
                        self.shut = true;
                    }
                    return Ok(());
                }
                Some(Item::Failed { read_at, error }) => {
                    if self.hold_closure(read_at).await? {
                        return Err(error);
                    }
                    return Ok(());
                }
            }
        }
    }

    /// The faults in force, after carrying out a half-close they ask for; `None` once the
    /// connection is gone.
    fn current(&mut self) -> io::Result<Option<Faults>> {
        if self.faults.has_changed().is_err() {
            return Ok(None);
        }
        let faults = self.faults.borrow_and_update().clone();
        if faults.half_closed[self.direction.index()] && !self.shut {
            shutdown_write(&self.dst)?;
            self.shut = true;
            debug!(direction = ?self.direction, "chaos: half-closed");
        }
        Ok(Some(faults))
    }

    /// Sleeps until `until` (or for ever) or until the faults change; `false` once the connection
    /// is gone.
    async fn wait(&mut self, until: Option<Instant>) -> bool {
        let deadline = async {
            match until {
                Some(until) => sleep_until(until).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            changed = self.faults.changed() => changed.is_ok(),
            () = deadline => true,
        }
    }

    /// Waits until an end-of-file or error may pass; `false` if it must not pass at all (the
    /// connection is gone, or this direction was half-closed and has nothing left to say).
    async fn hold_closure(&mut self, read_at: Instant) -> io::Result<bool> {
        loop {
            let Some(faults) = self.current()? else {
                return Ok(false);
            };
            if self.shut {
                return Ok(false);
            }
            let until = if faults.holds_closure(self.direction) || self.meter.severed() {
                None
            } else {
                let due = read_at + faults.delay;
                if Instant::now() >= due {
                    return Ok(true);
                }
                Some(due)
            };
            if !self.wait(until).await {
                return Ok(false);
            }
        }
    }

    /// Writes a chunk once its delay has passed, paced by any throttle, dropping whatever a
    /// blackhole or half-open catches; `false` once the connection is gone.
    async fn write(&mut self, read_at: Instant, mut bytes: &[u8]) -> io::Result<bool> {
        while !bytes.is_empty() {
            let Some(faults) = self.current()? else {
                return Ok(false);
            };
            if self.shut || faults.drops(self.direction) || self.meter.severed() {
                trace!(direction = ?self.direction, n = bytes.len(), "chaos: dropped in flight");
                self.meter.dropped(bytes.len());
                return Ok(true);
            }
            let now = Instant::now();
            let due = read_at + faults.delay;
            let wait = if faults.freeze {
                Some(None)
            } else if now < due {
                Some(Some(due))
            } else {
                match (faults.throttle, self.next_slice) {
                    (Some(_), Some(next)) if now < next => Some(Some(next)),
                    _ => None,
                }
            };
            if let Some(until) = wait {
                if !self.wait(until).await {
                    return Ok(false);
                }
                continue;
            }
            let n = match faults.throttle {
                None => bytes.len(),
                Some(rate) => {
                    let n = (rate / THROTTLE_SLICES_PER_SEC).clamp(1, bytes.len() as u64);
                    let spacing = Duration::from_nanos(
                        u64::try_from(u128::from(n) * 1_000_000_000 / u128::from(rate))
                            .unwrap_or(u64::MAX),
                    );
                    let start = self.next_slice.map_or(now, |next| next.max(now));
                    self.next_slice = Some(start + spacing);
                    n as usize
                }
            };
            // Counted before the write, so a peer that has the bytes never sees stale statistics.
            self.meter.forwarded(self.direction, n);
            write_all(&self.dst, &bytes[..n]).await?;
            bytes = &bytes[n..];
        }
        Ok(true)
    }
}

/// Reads what is available; cancel-safe, because the only await is readiness.
async fn read_some(src: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        src.readable().await?;
        match src.try_read(buf) {
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => continue,
            result => return result,
        }
    }
}

/// Writes through a shared `&TcpStream`, since the socket is shared with the reader of the other
/// direction and with the reset path.
async fn write_all(dst: &TcpStream, mut bytes: &[u8]) -> io::Result<()> {
    while !bytes.is_empty() {
        dst.writable().await?;
        match dst.try_write(bytes) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => bytes = &bytes[n..],
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => continue,
            Err(error) => return Err(error),
        }
    }
    Ok(())
}

/// Connects connection `id` upstream, with a second handle on the socket in the table from before
/// the connect starts: a reset that aborts this task mid-connect, after the upstream accepted,
/// still closes the socket with an RST, and dropping the proxy still closes it with a FIN.
async fn connect_upstream(
    shared: &Shared,
    id: ConnId,
    upstream: SocketAddr,
) -> io::Result<Option<TcpStream>> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(upstream),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_nonblocking(true)?;
    match shared.lock().conns.get_mut(&id) {
        Some(conn) => conn.server = Some(socket.try_clone()?),
        None => return Ok(None),
    }
    let socket = TcpSocket::from_std_stream(socket.into());
    socket.connect(upstream).await.map(Some)
}

/// Makes the socket's close send an RST: a tokio stream, or the table's second handle on one still
/// connecting. Through socket2 rather than tokio's `set_zero_linger`, which only recent tokio
/// versions have.
fn zero_linger<'s>(socket: impl Into<socket2::SockRef<'s>>) {
    let _ = socket.into().set_linger(Some(Duration::ZERO));
}

fn shutdown_write(dst: &TcpStream) -> io::Result<()> {
    match socket2::SockRef::from(dst).shutdown(Shutdown::Write) {
        // The peer has gone already; there is nobody left to tell.
        Err(error) if error.kind() == io::ErrorKind::NotConnected => Ok(()),
        result => result,
    }
}
