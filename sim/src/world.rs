//! The simulated world: one server node, N client nodes, the connections between them, the faults,
//! the workload, all driven by one event queue in virtual time.
//!
//! Time jumps from event to event. Every node keeps one timer event queued no later than its
//! `poll_timeout` (an earlier deadline supersedes it by generation; a later one lets it fire early
//! and re-arm); every connection direction is a FIFO whose head is an event, so jitter shifts whole
//! deliveries but never reorders a byte stream. A frozen node's inputs wait in its backlog and its
//! timers fire late, when it wakes; a restarted server loses every session and connection.
//!
//! A crashed client process loses its `Client` and everything in it (queued events, requests,
//! think timers) and restarts on its durable store. On a kept store its session goes on under the
//! same ledger context, so everything it sent or was sent is still owed exactly once; on a wiped
//! store (or none) the new process starts a new session under a new context, what the dead one
//! sent and the server never got is written off, and the server must end the old session loudly
//! (the core does so when its retention expires: `SessionLost { RetentionExpired }`, handing back
//! what the client never acknowledged; nothing supersedes it, since the new process does not know
//! it). Either way, replies to the dead process's calls are owed to nobody.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use bytes::{Bytes, BytesMut};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use steadfast_core::client::{Client, ClientConfig, Directive};
use steadfast_core::identity::SessionId;
use steadfast_core::server::{Overflow, Server, ServerConfig, ServerEvent};
use steadfast_core::session::{DisconnectCause, LostReason, REPLY_STREAM, SessionEvent};
use steadfast_core::time::{Duration, Instant};
use steadfast_core::{Config, Mode, SendError, Sent, Transport};

use crate::checker::{self, Checker, Ctx, MsgMode, Role, Violation};
use crate::marks::Marks;
use crate::params::{Canary, Fanout, Params};
use crate::store::Kept;
use crate::trace::Trace;

/// The stream calls travel on.
pub const CALL_STREAM: u64 = 1;
/// The stream fanned-out events travel on.
pub const EVENT_STREAM: u64 = 2;
/// Steady-stream messages use `STEADY_STREAM + mode index` (one mode per stream).
pub const STEADY_STREAM: u64 = 10;
/// Conflated values use keys `0..CONFLATION_KEYS`.
pub const CONFLATION_KEYS: u64 = 4;

/// How many client deliveries happen before a delivery canary strikes.
const CANARY_AFTER: u64 = 25;
/// A node firing this many timers at one instant is livelocked.
const LIVELOCK_FIRES: u32 = 10_000;

/// What a finished run reports.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The parameters it ran with.
    pub params: Params,
    /// Broken guarantees, first first.
    pub violations: Vec<Violation>,
    /// Events processed.
    pub events: u64,
    /// Virtual time at the end.
    pub sim_time: Duration,
    /// When the faults stopped.
    pub heal_at: Duration,
    /// How long after the faults stopped everything outstanding was settled (`None`: never).
    pub settled_after: Option<Duration>,
    /// The determinism self-check.
    pub trace_hash: u64,
    /// Which fault and recovery paths the run exercised.
    pub marks: Marks,
    /// Ledger totals.
    pub tally: checker::Tally,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    Reset,
    Blackhole,
    HalfOpen,
    Partition(Duration),
    Pause(Duration),
    Migrate(Duration),
    Restart(Duration),
    OneWay(Duration),
    Swizzle(Duration),
    /// A client process dies and restarts after this long.
    ClientCrash(Duration),
}

/// How one client process dies (see [`crate::params::Crashes`]).
#[derive(Debug, Clone, Copy)]
struct Crash {
    /// The store is deleted before the restart.
    wipe: bool,
    /// Power loss: the server is not told, and the store loses its unflushed tail.
    machine: bool,
    /// How long the client stays down.
    downtime: Duration,
    /// A mid-step crash: how many more events the application takes before the process dies
    /// with the next one in hand.
    take: Option<u32>,
}

/// How long an armed mid-step crash waits for events before the process dies anyway.
const MID_STEP_WAIT: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, Copy)]
enum Ev {
    Timer {
        node: usize,
        generation: u64,
    },
    Deliver {
        conn: usize,
        up: bool,
    },
    ConnectFailed {
        client: usize,
        conn: usize,
    },
    Wake {
        node: usize,
    },
    ClientTick {
        client: usize,
        call: bool,
    },
    ServerTick,
    Think {
        client: usize,
        inc: u32,
        to: u64,
        event: usize,
    },
    Respawn {
        client: usize,
    },
    /// An armed mid-step crash of incarnation `inc` strikes, if no step has triggered it yet.
    CrashNow {
        client: usize,
        inc: u32,
    },
    /// A crashed client (down since incarnation `inc` died) starts again.
    ClientUp {
        client: usize,
        inc: u32,
    },
    Fault(Fault),
    ServerUp,
    Heal,
    Check,
    /// Cuts the directions of `mask` (1: down, 2: up) of a client's path until `until`.
    Cut {
        client: usize,
        mask: u8,
        until: Instant,
    },
    /// One datagram arrives.
    Packet {
        conn: usize,
        up: bool,
        slot: u32,
    },
}

impl Ev {
    fn code(&self) -> [u64; 3] {
        match *self {
            Ev::Timer { node, generation } => [1, node as u64, generation],
            Ev::Deliver { conn, up } => [2, conn as u64, u64::from(up)],
            Ev::ConnectFailed { client, conn } => [3, client as u64, conn as u64],
            Ev::Wake { node } => [4, node as u64, 0],
            Ev::ClientTick { client, call } => [5, client as u64, u64::from(call)],
            Ev::ServerTick => [6, 0, 0],
            Ev::Think { client, to, .. } => [7, client as u64, to],
            Ev::Respawn { client } => [8, client as u64, 0],
            Ev::Fault(_) => [9, 0, 0],
            Ev::ServerUp => [10, 0, 0],
            Ev::Heal => [11, 0, 0],
            Ev::Check => [12, 0, 0],
            Ev::Cut { client, mask, .. } => [13, client as u64, u64::from(mask)],
            Ev::Packet { conn, up, .. } => [14, conn as u64, u64::from(up)],
            Ev::CrashNow { client, inc } => [15, client as u64, u64::from(inc)],
            Ev::ClientUp { client, inc } => [16, client as u64, u64::from(inc)],
        }
    }
}

/// The event queue: a binary min-heap of 16-byte keys, `(time, sequence number, slot)` packed in
/// one `u128` (the time in the high half, so keys order by time, then by scheduling order), over a
/// slab that holds each queued event in its slot. Sifting moves only keys; a key's slot is free
/// again once it is popped. Same order as a heap of `(time, sequence number)` pairs.
#[derive(Default)]
struct Queue {
    heap: Vec<u128>,
    slab: Vec<Ev>,
    free: Vec<u32>,
    next_seq: u64,
}

/// Bits of a key's low half that hold the event's slot; the rest hold its sequence number.
const SLOT_BITS: u32 = 24;

impl Queue {
    fn push(&mut self, at: Instant, ev: Ev) {
        let seq = self.next_seq;
        self.next_seq += 1;
        assert!(
            seq < 1 << (64 - SLOT_BITS),
            "more events than a run can number"
        );
        let slot = match self.free.pop() {
            Some(slot) => {
                self.slab[slot as usize] = ev;
                slot
            }
            None => {
                let slot = self.slab.len() as u32;
                assert!(
                    slot < 1 << SLOT_BITS,
                    "more events queued at once than slots"
                );
                self.slab.push(ev);
                slot
            }
        };
        let key =
            (u128::from(at.as_nanos()) << 64) | u128::from(seq << SLOT_BITS | u64::from(slot));
        let heap = &mut self.heap;
        let mut hole = heap.len();
        heap.push(key);
        while hole > 0 {
            let parent = (hole - 1) / 2;
            if heap[parent] <= key {
                break;
            }
            heap[hole] = heap[parent];
            hole = parent;
        }
        heap[hole] = key;
    }

    /// The earliest event (the first scheduled among equals) and its time.
    fn pop(&mut self) -> Option<(Instant, Ev)> {
        let heap = &mut self.heap;
        let last = heap.pop()?;
        let Some(&top) = heap.first() else {
            return Some(self.take(last));
        };
        // The hole left at the root sinks along the smaller children to the bottom, then the last
        // key rises into it from there (it usually belongs near the bottom).
        let n = heap.len();
        let mut hole = 0;
        let mut child = 1;
        while child + 1 < n {
            let c = child + usize::from(heap[child + 1] < heap[child]);
            heap[hole] = heap[c];
            hole = c;
            child = 2 * hole + 1;
        }
        if child + 1 == n {
            heap[hole] = heap[child];
            hole = child;
        }
        while hole > 0 {
            let parent = (hole - 1) / 2;
            if heap[parent] <= last {
                break;
            }
            heap[hole] = heap[parent];
            hole = parent;
        }
        heap[hole] = last;
        Some(self.take(top))
    }

    /// Frees a popped key's slot and returns its time and event.
    fn take(&mut self, key: u128) -> (Instant, Ev) {
        let slot = (key as u64 & ((1 << SLOT_BITS) - 1)) as u32;
        self.free.push(slot);
        (
            Instant::from_nanos((key >> 64) as u64),
            self.slab[slot as usize],
        )
    }
}

/// What travels in one direction of a connection.
#[derive(Debug, Clone)]
enum Wire {
    /// Server side: the connection is accepted. Client side: the connect completed.
    Open,
    Bytes(Bytes),
    /// The other end closed or reset.
    Close,
}

#[derive(Debug, Default)]
struct Pipe {
    q: VecDeque<(Instant, Wire)>,
    last: Instant,
    scheduled: bool,
}

#[derive(Debug)]
struct Conn {
    client: usize,
    server_epoch: u32,
    /// Datagram transports: how many times the server bound this client socket as a connection
    /// (a restarted or forgetful server binds it afresh when a datagram from it arrives).
    binding: u32,
    client_open: bool,
    server_open: bool,
    blackholed: bool,
    up: Pipe,
    down: Pipe,
}

#[derive(Debug, Default)]
struct Timer {
    armed: Option<Instant>,
    generation: u64,
    fired_at: Instant,
    fires: u32,
}

struct ClientNode {
    client: Client,
    inc: u32,
    ctx: Ctx,
    conn: Option<usize>,
    connecting: bool,
    session: Option<SessionId>,
    frozen_until: Option<Instant>,
    backlog: VecDeque<(usize, Wire)>,
    failed_backlog: VecDeque<usize>,
    timer: Timer,
    over: bool,
    /// Its durable store, if it runs with one: it outlives the `Client`, as a directory outlives a
    /// process.
    store: Option<Kept>,
    /// The process is dead (crashed, not yet restarted); `client` is an inert stand-in.
    down: bool,
    /// A mid-step crash waiting for the application's next step.
    armed: Option<Crash>,
    /// Restarted on its kept store while it held this session: the next outcome must be its
    /// resume (or a loud `SessionLost`), never a fresh session.
    expect_resume: Option<SessionId>,
    /// Messages the application took whose consumption the last restart's store lost with its
    /// unflushed tail (a machine crash): these, and only these, may come out again as
    /// `Redelivered` although the application's ledger has them.
    unconsumed_again: Vec<u64>,
    /// While down: the mark its restart counts under.
    restart: Option<&'static str>,
}

struct ServerNode {
    server: Server,
    epoch: u32,
    down: bool,
    frozen_until: Option<Instant>,
    backlog: VecDeque<(usize, Wire)>,
    timer: Timer,
    /// Live sessions, with their sender context (this incarnation).
    sessions: BTreeMap<SessionId, Ctx>,
}

/// A datagram on its way.
#[derive(Debug)]
struct Packet {
    bytes: Bytes,
    /// Its position among the datagrams sent on its path direction (to count reorderings).
    n: u64,
}

/// What the datagram network did to the packets, for the coverage marks.
#[derive(Debug, Default)]
struct NetCounters {
    sent: u64,
    lost: u64,
    burst_lost: u64,
    dup: u64,
    corrupt: u64,
    truncated: u64,
    overflow: u64,
    cut: u64,
    reordered: u64,
}

/// Per client path and direction (`[down, up]`), the datagram network's state.
#[derive(Debug, Default, Clone, Copy)]
struct PathState {
    in_flight: u32,
    bad: bool,
    sent: u64,
    /// One past the highest position that has arrived.
    arrived: u64,
}

/// The server's connection id for a connection and its binding.
fn conn_id(conn: usize, binding: u32) -> u64 {
    conn as u64 | (u64::from(binding) << 32)
}

/// Canary state.
#[derive(Debug, Default)]
struct CanaryState {
    deliveries: u64,
    struck: bool,
    held: Option<(usize, u64, Bytes, u64)>,
    replies: u64,
}

/// One simulated run.
pub struct Sim {
    params: Params,
    now: Instant,
    end: Instant,
    heal_at: Instant,
    settled_at: Option<Instant>,
    stop: bool,
    queue: Queue,
    rng: ChaCha8Rng,
    server: ServerNode,
    clients: Vec<ClientNode>,
    conns: Vec<Conn>,
    /// Per client, until when each direction (`[down, up]`) of its path is cut.
    cut_until: Vec<[Instant; 2]>,
    datagram: bool,
    packets: Vec<Option<Packet>>,
    free_slots: Vec<u32>,
    paths: Vec<[PathState; 2]>,
    net: NetCounters,
    /// Which client incarnation owns each session (as the client learnt it from its welcome).
    owner: BTreeMap<SessionId, Ctx>,
    next_tag: u64,
    checker: Checker,
    trace: Trace,
    marks: Marks,
    events: u64,
    buf: BytesMut,
    canary: CanaryState,
    server_config: ServerConfig,
    client_config: ClientConfig,
    /// `STEADFAST_SIM_LOG`: every application event and node fault goes to stderr.
    log: bool,
}

fn instant(d: Duration) -> Instant {
    Instant::from_duration(d)
}

/// A client process starting at `now`: on `store` if it has one, taking back what an earlier
/// process left there.
fn start_client(
    config: &ClientConfig,
    now: Instant,
    entropy: Box<ChaCha8Rng>,
    store: Option<&Kept>,
) -> Client {
    match store {
        Some(s) => Client::with_store(config.clone(), now, entropy, Box::new(s.clone())),
        None => Client::new(config.clone(), now, entropy),
    }
    .expect("client config is valid")
}

fn mode_of(i: u64) -> (Mode, MsgMode) {
    match i {
        0 => (Mode::Ordered, MsgMode::Ordered),
        1 => (Mode::Unordered, MsgMode::Unordered),
        2 => (Mode::Conflated { key: 0 }, MsgMode::Conflated),
        3 => (Mode::Sequenced, MsgMode::Sequenced),
        _ => (Mode::Unreliable, MsgMode::Unreliable),
    }
}

fn msg_mode_of_stream(stream: u64) -> MsgMode {
    if stream >= STEADY_STREAM {
        mode_of(stream - STEADY_STREAM).1
    } else {
        MsgMode::Ordered
    }
}

impl Sim {
    /// A world for `params`, at virtual time zero, with its workload and fault plan scheduled.
    pub fn new(params: Params) -> Sim {
        let mut rng = ChaCha8Rng::seed_from_u64(params.seed);
        let mut channel = Config::new(params.transport);
        if let Some(n) = params.max_queued {
            channel.max_queued_messages = n;
        }
        if let Some(n) = params.max_in_flight {
            channel.max_in_flight = n;
        }
        channel.canary = params.canary.and_then(Canary::in_core);
        let mut server_config = ServerConfig::new(channel.clone());
        server_config.retention = params.retention;
        if params.overflow_closes {
            server_config.overflow = Overflow::CloseSession;
        }
        let client_config = ClientConfig::new(channel, 1);
        let now = Instant::ZERO;
        let heal_at = instant(params.workload.duration);
        let end = heal_at + params.liveness_bound();
        let server = Server::new(
            server_config.clone(),
            now,
            Box::new(ChaCha8Rng::seed_from_u64(rng.random())),
        )
        .expect("server config is valid");
        let mut checker = Checker::default();
        let n = params.workload.clients;
        let clients = (0..n)
            .map(|i| {
                let durable = params.crashes.durable.get(i).copied().unwrap_or(false);
                let store = durable.then(Kept::new);
                let entropy = Box::new(ChaCha8Rng::seed_from_u64(rng.random()));
                ClientNode {
                    client: start_client(&client_config, now, entropy, store.as_ref()),
                    store,
                    down: false,
                    armed: None,
                    expect_resume: None,
                    unconsumed_again: Vec::new(),
                    restart: None,
                    inc: 0,
                    ctx: checker.new_ctx(None),
                    conn: None,
                    connecting: false,
                    session: None,
                    frozen_until: None,
                    backlog: VecDeque::new(),
                    failed_backlog: VecDeque::new(),
                    timer: Timer::default(),
                    over: false,
                }
            })
            .collect();
        let mut sim = Sim {
            now,
            end,
            heal_at,
            settled_at: None,
            stop: false,
            queue: Queue::default(),
            rng,
            server: ServerNode {
                server,
                epoch: 0,
                down: false,
                frozen_until: None,
                backlog: VecDeque::new(),
                timer: Timer::default(),
                sessions: BTreeMap::new(),
            },
            clients,
            conns: Vec::new(),
            cut_until: vec![[Instant::ZERO; 2]; n],
            datagram: params.transport == Transport::Datagram,
            packets: Vec::new(),
            free_slots: Vec::new(),
            paths: vec![[PathState::default(); 2]; n],
            net: NetCounters::default(),
            owner: BTreeMap::new(),
            next_tag: 1,
            checker,
            trace: Trace::default(),
            marks: Marks::default(),
            events: 0,
            buf: BytesMut::with_capacity(64 << 10),
            canary: CanaryState::default(),
            server_config,
            client_config,
            log: std::env::var_os("STEADFAST_SIM_LOG").is_some(),
            params,
        };
        sim.plan();
        sim
    }

    fn schedule(&mut self, at: Instant, ev: Ev) {
        self.queue.push(at.max(self.now), ev);
    }

    fn exp(&mut self, mean: Duration) -> Duration {
        let u: f64 = self.rng.random_range(f64::EPSILON..1.0);
        Duration::from_secs_f64((-u.ln() * mean.as_secs_f64()).min(3600.0))
    }

    fn uniform(&mut self, max: Duration) -> Duration {
        let n = max.as_nanos() as u64;
        Duration::from_nanos(if n == 0 {
            0
        } else {
            self.rng.random_range(0..=n)
        })
    }

    /// Schedules the workload, the faults, the heal phase.
    fn plan(&mut self) {
        let n = self.clients.len();
        for i in 0..n {
            self.flush_client(i);
            let w = &self.params.workload;
            let (call, stream) = (w.call_interval, w.stream_interval);
            let a = self.exp(call);
            self.schedule(
                instant(a),
                Ev::ClientTick {
                    client: i,
                    call: true,
                },
            );
            let b = self.exp(stream);
            self.schedule(
                instant(b),
                Ev::ClientTick {
                    client: i,
                    call: false,
                },
            );
        }
        if n > 0 {
            let mean = self.params.workload.server_stream_interval / n as u32;
            let a = self.exp(mean);
            self.schedule(instant(a), Ev::ServerTick);
        }
        let f = self.params.faults;
        let len = self.params.max_fault_len;
        let down = self.params.max_downtime;
        let mut faults = Vec::new();
        for _ in 0..f.resets {
            faults.push(Fault::Reset);
        }
        for _ in 0..f.blackholes {
            faults.push(Fault::Blackhole);
        }
        for _ in 0..f.half_opens {
            faults.push(Fault::HalfOpen);
        }
        // Faults that last a while: how many, which, and the longest each may last (drawn in
        // this order, so a seed's run never changes).
        type Timed = (u32, fn(Duration) -> Fault, Duration);
        let timed: [Timed; 7] = [
            (f.partitions, Fault::Partition, len),
            (f.pauses, Fault::Pause, len),
            (f.migrations, Fault::Migrate, len),
            (f.restarts, Fault::Restart, down),
            (f.one_way_partitions, Fault::OneWay, len),
            (f.swizzles, Fault::Swizzle, len),
            (
                f.client_crashes,
                Fault::ClientCrash,
                self.params.crashes.max_downtime,
            ),
        ];
        for (count, fault, longest) in timed {
            for _ in 0..count {
                let d = self.uniform(longest);
                faults.push(fault(d));
            }
        }
        let span = self.params.workload.duration;
        for fault in faults {
            // Faults start after the first second, so sessions exist to break.
            let at =
                Duration::from_secs(1) + self.uniform(span.saturating_sub(Duration::from_secs(1)));
            self.schedule(instant(at), Ev::Fault(fault));
        }
        self.schedule(self.heal_at, Ev::Heal);
    }

    /// Runs to the end and reports.
    pub fn run(mut self) -> Outcome {
        while let Some((at, ev)) = self.queue.pop() {
            if at > self.end {
                break;
            }
            self.now = at;
            self.events += 1;
            let code = ev.code();
            self.trace
                .words(&[at.as_nanos(), code[0], code[1], code[2]]);
            self.dispatch(ev);
            if self.stop {
                break;
            }
        }
        if self.settled_at.is_none() {
            self.now = self.now.max(self.end);
            self.checker.finish(self.now, self.heal_at);
            self.check_sessions_reported();
            if std::env::var_os("STEADFAST_SIM_DUMP").is_some() {
                self.dump();
            }
        }
        self.collect_marks();
        let tally = self.checker.tally();
        self.trace
            .words(&[tally.delivered, tally.handed_back, self.events]);
        Outcome {
            violations: self.checker.violations().to_vec(),
            events: self.events,
            sim_time: self.now - Instant::ZERO,
            heal_at: self.heal_at - Instant::ZERO,
            settled_after: self.settled_at.map(|t| t - self.heal_at),
            trace_hash: self.trace.value(),
            marks: self.marks,
            tally,
            params: self.params,
        }
    }

    fn dispatch(&mut self, ev: Ev) {
        match ev {
            Ev::Timer { node, generation } => self.on_timer(node, generation),
            Ev::Deliver { conn, up } => self.on_deliver(conn, up),
            Ev::ConnectFailed { client, conn } => {
                if self.frozen(client + 1) {
                    self.clients[client].failed_backlog.push_back(conn);
                } else {
                    self.connect_failed(client, conn);
                }
            }
            Ev::Wake { node } => self.on_wake(node),
            Ev::ClientTick { client, call } => self.on_client_tick(client, call),
            Ev::ServerTick => self.on_server_tick(),
            Ev::Think {
                client,
                inc,
                to,
                event,
            } => self.on_think(client, inc, to, event),
            Ev::Respawn { client } => self.respawn(client),
            Ev::CrashNow { client, inc } => {
                let node = &mut self.clients[client];
                // Faults stop when the network heals.
                if node.inc == inc
                    && !node.down
                    && let Some(crash) = node.armed.take()
                    && self.now < self.heal_at
                {
                    self.crash_client(client, crash);
                }
            }
            Ev::ClientUp { client, inc } => self.client_up(client, inc),
            Ev::Fault(f) => self.on_fault(f),
            Ev::ServerUp => self.server_up(),
            Ev::Heal => {
                self.marks.add("heal", 1);
                self.schedule(self.now, Ev::Check);
            }
            Ev::Check => {
                if self.checker.outstanding() == 0 && self.unowned_sessions().is_empty() {
                    self.settled_at = Some(self.now);
                    self.stop = true;
                } else {
                    self.schedule(self.now + Duration::from_millis(250), Ev::Check);
                }
            }
            Ev::Cut {
                client,
                mask,
                until,
            } => self.cut(client, mask, until),
            Ev::Packet { conn, up, slot } => self.on_packet(conn, up, slot),
        }
    }

    // ---------------------------------------------------------------- nodes and timers

    /// Node 0 is the server, node `i + 1` client `i`.
    fn frozen(&self, node: usize) -> bool {
        let until = if node == 0 {
            self.server.frozen_until
        } else {
            self.clients[node - 1].frozen_until
        };
        until.is_some_and(|t| t > self.now)
    }

    /// Makes sure a timer event is queued no later than the node's next deadline. One event per
    /// node stays pending at a time: a later deadline leaves it in place (it fires early, finds
    /// nothing due and re-arms), an earlier one supersedes it by generation.
    fn rearm(&mut self, node: usize) {
        if self.frozen(node) {
            return;
        }
        let (deadline, timer) = if node == 0 {
            if self.server.down {
                return;
            }
            (self.server.server.poll_timeout(), &mut self.server.timer)
        } else {
            let c = &mut self.clients[node - 1];
            if c.down {
                return;
            }
            (c.client.poll_timeout(), &mut c.timer)
        };
        let Some(at) = deadline else {
            return;
        };
        if timer.armed.is_some_and(|p| p <= at) {
            return;
        }
        timer.armed = Some(at);
        timer.generation += 1;
        let generation = timer.generation;
        self.schedule(at, Ev::Timer { node, generation });
    }

    fn on_timer(&mut self, node: usize, generation: u64) {
        let now = self.now;
        let timer = if node == 0 {
            &mut self.server.timer
        } else {
            &mut self.clients[node - 1].timer
        };
        if timer.generation != generation {
            return;
        }
        timer.armed = None;
        if timer.fired_at == now {
            timer.fires += 1;
            if timer.fires == LIVELOCK_FIRES {
                self.violation(
                    "livelock",
                    format!(
                        "node {node} asked for its timer {LIVELOCK_FIRES} times at one instant"
                    ),
                );
                self.stop = true;
                return;
            }
        } else {
            timer.fired_at = now;
            timer.fires = 0;
        }
        if self.frozen(node) {
            return;
        }
        let due = if node == 0 {
            if self.server.down {
                return;
            }
            self.server.server.poll_timeout()
        } else {
            if self.clients[node - 1].down {
                return;
            }
            self.clients[node - 1].client.poll_timeout()
        };
        if due.is_none_or(|d| d > now) {
            // Woken early for a deadline that moved later.
            return self.rearm(node);
        }
        if node == 0 {
            if !self.server.down {
                self.server.server.handle_timeout(now);
                self.flush_server();
            }
        } else {
            self.clients[node - 1].client.handle_timeout(now);
            self.flush_client(node - 1);
        }
    }

    /// Prints the end state of every endpoint (`STEADFAST_SIM_DUMP=1`), to diagnose a seed that
    /// never settled.
    fn dump(&self) {
        for (i, c) in self.clients.iter().enumerate() {
            let ch = c.client.channel();
            eprintln!(
                "client {i}: ctx={} conn={:?} connecting={} connected={} session={:?} over={} down={} durable={} timeout={:?} stats={:?} counters={:?}",
                c.ctx,
                c.conn,
                c.connecting,
                c.client.is_connected(),
                c.client.session(),
                c.over,
                c.down,
                c.client.is_durable(),
                c.client.poll_timeout(),
                ch.stats(),
                c.client.counters()
            );
        }
        for (id, ctx) in &self.server.sessions {
            eprintln!(
                "server session {id:?} ctx={ctx}: connected={} stats={:?}",
                self.server.server.is_connected(*id),
                self.server.server.channel(*id).map(|c| c.stats())
            );
        }
        eprintln!(
            "server: down={} epoch={} sessions={} connections={} timeout={:?}",
            self.server.down,
            self.server.epoch,
            self.server.server.session_count(),
            self.server.server.connection_count(),
            self.server.server.poll_timeout()
        );
    }

    /// One line of the `STEADFAST_SIM_LOG` log, payloads shown by their tag.
    fn log_event(&self, who: &str, e: &dyn std::fmt::Debug) {
        let text = format!("{e:?}");
        // A payload prints as its bytes; its tag is what names it in the ledger.
        let text = shorten_payloads(&text);
        eprintln!("[{:.6}] {who}: {text}", self.now.as_nanos() as f64 / 1e9);
    }

    fn violation(&mut self, rule: &'static str, detail: String) {
        self.checker.report(self.now, rule, detail);
    }

    /// Sessions the server holds that no live client owns. A client that lost its session (its
    /// process died with its store, or the session ended on its side) leaves the server's copy to
    /// end loudly, by its retention time at the latest; a run has not settled until it has.
    fn unowned_sessions(&self) -> Vec<SessionId> {
        if self.server.down {
            return Vec::new();
        }
        let owned = |s: &SessionId| {
            self.clients
                .iter()
                .any(|c| !c.down && !c.over && c.session == Some(*s))
        };
        self.server
            .sessions
            .keys()
            .filter(|s| !owned(s))
            .copied()
            .collect()
    }

    /// At the end of a run that never settled: the server's sessions nobody owns were never
    /// reported lost.
    fn check_sessions_reported(&mut self) {
        let after = (self.now - self.heal_at).as_secs_f64();
        for s in self.unowned_sessions().into_iter().take(4) {
            let detail = format!(
                "the server still holds session {s:?} {after:.3}s after the faults stopped, though no live client owns it: its end was never reported"
            );
            self.violation("session-not-reported", detail);
        }
    }
}

// -------------------------------------------------------------------- the network
impl Sim {
    fn delay(&mut self, client: usize) -> Duration {
        let l = self.params.links[client];
        l.latency + self.uniform(l.jitter)
    }

    /// Puts `wire` on one direction of `conn`, to arrive no earlier than `at` and never before
    /// what was put there earlier.
    fn push_at(&mut self, conn: usize, up: bool, wire: Wire, at: Instant) {
        let c = &mut self.conns[conn];
        if c.blackholed {
            return;
        }
        let pipe = if up { &mut c.up } else { &mut c.down };
        let at = at.max(pipe.last);
        pipe.last = at;
        pipe.q.push_back((at, wire));
        if !pipe.scheduled {
            pipe.scheduled = true;
            self.schedule(at, Ev::Deliver { conn, up });
        }
    }

    fn push(&mut self, conn: usize, up: bool, wire: Wire) {
        let d = self.delay(self.conns[conn].client);
        let at = self.now + d;
        self.push_at(conn, up, wire, at);
    }

    fn on_deliver(&mut self, conn: usize, up: bool) {
        let now = self.now;
        let client = self.conns[conn].client;
        // Datagram runs use these pipes only for the local news of a socket (open, error).
        let cut = if self.datagram {
            Instant::ZERO
        } else {
            self.cut_until[client][usize::from(up)]
        };
        let c = &mut self.conns[conn];
        let pipe = if up { &mut c.up } else { &mut c.down };
        let Some(&(at, _)) = pipe.q.front() else {
            pipe.scheduled = false;
            return;
        };
        // A cut path holds bytes back (TCP retransmits them once it heals); order is kept.
        let hold = if at > now {
            Some(at)
        } else if cut > now {
            Some(cut)
        } else {
            None
        };
        if let Some(t) = hold {
            self.schedule(t, Ev::Deliver { conn, up });
            return;
        }
        let (_, wire) = pipe.q.pop_front().expect("checked");
        let next = pipe.q.front().map(|(t, _)| (*t).max(now));
        pipe.scheduled = next.is_some();
        if let Some(t) = next {
            self.schedule(t, Ev::Deliver { conn, up });
        }
        if up {
            self.server_input(conn, wire);
        } else {
            self.client_input(client, conn, wire);
        }
    }

    fn server_input(&mut self, conn: usize, wire: Wire) {
        // A datagram from a socket an earlier server process knew is news to this one.
        if self.server.down
            || (!self.datagram && self.conns[conn].server_epoch != self.server.epoch)
        {
            return;
        }
        if self.frozen(0) {
            self.server.backlog.push_back((conn, wire));
            return;
        }
        self.apply_server(conn, wire);
        self.flush_server();
    }

    fn apply_server(&mut self, conn: usize, wire: Wire) {
        let now = self.now;
        let c = &mut self.conns[conn];
        if self.datagram
            && matches!(wire, Wire::Bytes(_))
            && (!c.server_open || c.server_epoch != self.server.epoch)
        {
            // The first datagram from a socket the server does not know binds it (UDP's accept).
            c.server_epoch = self.server.epoch;
            c.server_open = true;
            c.binding += 1;
            self.marks.add("datagram_binding", 1);
            self.server
                .server
                .on_connection(now, conn_id(conn, c.binding));
        }
        if !c.server_open || c.server_epoch != self.server.epoch {
            return;
        }
        let id = conn_id(conn, c.binding);
        if let Wire::Bytes(b) = &wire {
            self.trace.word(b.len() as u64);
        }
        let s = &mut self.server.server;
        match wire {
            Wire::Open => s.on_connection(now, id),
            Wire::Bytes(b) => s.handle_input(now, id, b),
            Wire::Close => {
                c.server_open = false;
                s.on_disconnected(now, id);
            }
        }
    }

    fn client_input(&mut self, i: usize, conn: usize, wire: Wire) {
        if self.clients[i].down {
            return;
        }
        if self.frozen(i + 1) {
            self.clients[i].backlog.push_back((conn, wire));
            return;
        }
        self.apply_client(i, conn, wire);
        self.flush_client(i);
    }

    fn apply_client(&mut self, i: usize, conn: usize, wire: Wire) {
        let now = self.now;
        let node = &mut self.clients[i];
        if node.conn != Some(conn) {
            return;
        }
        let c = &mut self.conns[conn];
        if let Wire::Bytes(b) = &wire {
            self.trace.word(b.len() as u64);
        }
        match wire {
            Wire::Open => {
                if node.connecting && c.client_open {
                    node.connecting = false;
                    node.client.on_connected(now);
                }
            }
            Wire::Bytes(b) => {
                if c.client_open && !node.connecting {
                    node.client.handle_input(now, b);
                }
            }
            Wire::Close => {
                c.client_open = false;
                node.conn = None;
                if std::mem::take(&mut node.connecting) {
                    self.marks.add("connect_failed", 1);
                    node.client.on_connect_failed(now);
                } else {
                    node.client.on_disconnected(now);
                }
            }
        }
    }

    fn connect_failed(&mut self, i: usize, conn: usize) {
        let now = self.now;
        let node = &mut self.clients[i];
        if node.conn == Some(conn) && node.connecting && !node.down {
            node.conn = None;
            node.connecting = false;
            self.marks.add("connect_failed", 1);
            node.client.on_connect_failed(now);
            self.flush_client(i);
        }
    }

    /// Client `i` opens a connection (its `Directive::Connect`).
    fn connect(&mut self, i: usize) {
        let now = self.now;
        let id = self.conns.len();
        let epoch = self.server.epoch;
        self.conns.push(Conn {
            client: i,
            server_epoch: epoch,
            binding: 0,
            client_open: true,
            server_open: !self.datagram,
            blackholed: false,
            up: Pipe::default(),
            down: Pipe::default(),
        });
        self.clients[i].conn = Some(id);
        self.clients[i].connecting = true;
        if self.datagram {
            // A UDP socket opens locally and at once; the server learns of it from its first
            // datagram.
            self.push_at(id, false, Wire::Open, now);
            return;
        }
        let latency = self.params.links[i].latency;
        let fail_at = if self.server.down {
            // Nothing listens: refused after a round trip.
            Some(now + latency * 2)
        } else if self.cut_until[i].iter().any(|t| *t > now) {
            Some(if self.params.partition_refuses {
                now + latency * 2
            } else {
                now + self.params.connect_timeout
            })
        } else {
            None
        };
        if let Some(at) = fail_at {
            let c = &mut self.conns[id];
            c.client_open = false;
            c.server_open = false;
            self.schedule(
                at,
                Ev::ConnectFailed {
                    client: i,
                    conn: id,
                },
            );
            return;
        }
        let accept_at = now + self.delay(i);
        self.push_at(id, true, Wire::Open, accept_at);
        let open_at = accept_at + self.delay(i);
        self.push_at(id, false, Wire::Open, open_at);
    }

    /// The client closes its end (a `Directive::Disconnect`): the server hears a FIN.
    fn close_client_side(&mut self, conn: usize) {
        let c = &mut self.conns[conn];
        if c.client_open {
            c.client_open = false;
            // Closing a UDP socket tells nobody.
            if !self.datagram {
                self.push(conn, true, Wire::Close);
            }
        }
    }

    fn clear_pipes(&mut self, conn: usize) {
        let c = &mut self.conns[conn];
        c.up.q.clear();
        c.down.q.clear();
    }
}

// -------------------------------------------------------------------- the datagram network
impl Sim {
    /// Sends one datagram on a direction of `conn`'s path, through its per-datagram faults (which
    /// stop when the network heals); each copy gets its own delay, so jitter reorders.
    fn send_packet(&mut self, conn: usize, up: bool, bytes: Bytes) {
        let now = self.now;
        let c = &self.conns[conn];
        let client = c.client;
        let d = usize::from(up);
        self.net.sent += 1;
        if c.blackholed || self.cut_until[client][d] > now {
            self.net.cut += 1;
            return;
        }
        let f = self.params.paths[client][d];
        let faulty = now < self.heal_at;
        if faulty {
            if let Some(ge) = f.burst {
                let path = &mut self.paths[client][d];
                let flip = self
                    .rng
                    .random_bool(if path.bad { ge.to_good } else { ge.to_bad });
                path.bad ^= flip;
                let loss = if path.bad { ge.loss_bad } else { ge.loss_good };
                if self.rng.random_bool(loss) {
                    self.net.burst_lost += 1;
                    return;
                }
            }
            if f.loss > 0.0 && self.rng.random_bool(f.loss) {
                self.net.lost += 1;
                return;
            }
        }
        let copies = if faulty && f.dup > 0.0 && self.rng.random_bool(f.dup) {
            self.net.dup += 1;
            2
        } else {
            1
        };
        for _ in 0..copies {
            if self.paths[client][d].in_flight >= f.capacity {
                self.net.overflow += 1;
                continue;
            }
            let mut b = bytes.clone();
            if faulty && !b.is_empty() {
                if f.corrupt > 0.0 && self.rng.random_bool(f.corrupt) {
                    self.net.corrupt += 1;
                    let bit = self.rng.random_range(0..b.len() * 8);
                    let mut v = b.to_vec();
                    v[bit / 8] ^= 1 << (bit % 8);
                    b = Bytes::from(v);
                }
                if f.truncate > 0.0 && self.rng.random_bool(f.truncate) {
                    self.net.truncated += 1;
                    let keep = self.rng.random_range(0..b.len());
                    b.truncate(keep);
                }
            }
            if self.params.canary == Some(Canary::CorruptPastChecksum) {
                b = self.corrupt_past_checksum(b);
            }
            let at = now + self.delay(client);
            let path = &mut self.paths[client][d];
            path.in_flight += 1;
            let n = path.sent;
            path.sent += 1;
            let packet = Packet { bytes: b, n };
            let slot = match self.free_slots.pop() {
                Some(s) => {
                    self.packets[s as usize] = Some(packet);
                    s
                }
                None => {
                    self.packets.push(Some(packet));
                    (self.packets.len() - 1) as u32
                }
            };
            self.schedule(at, Ev::Packet { conn, up, slot });
        }
    }

    /// The `corrupt-past-checksum` canary: once the run is under way, flips the last byte (payload
    /// padding, for a data datagram) of every 64-byte-or-longer datagram and recomputes the CRC-32
    /// the core checks (version byte, big-endian CRC of the rest, frame).
    fn corrupt_past_checksum(&mut self, b: Bytes) -> Bytes {
        if self.net.sent < 200 || b.len() < 64 {
            return b;
        }
        let mut v = b.to_vec();
        let last = v.len() - 1;
        v[last] ^= 0x01;
        let crc = crc32fast::hash(&v[5..]);
        v[1..5].copy_from_slice(&crc.to_be_bytes());
        Bytes::from(v)
    }

    fn on_packet(&mut self, conn: usize, up: bool, slot: u32) {
        let Packet { bytes, n } = self.packets[slot as usize].take().expect("in flight");
        self.free_slots.push(slot);
        let client = self.conns[conn].client;
        let d = usize::from(up);
        let path = &mut self.paths[client][d];
        path.in_flight -= 1;
        if self.conns[conn].blackholed || self.cut_until[client][d] > self.now {
            self.net.cut += 1;
            return;
        }
        if n < path.arrived {
            self.net.reordered += 1;
        } else {
            path.arrived = n + 1;
        }
        if up {
            self.server_input(conn, Wire::Bytes(bytes));
        } else {
            self.client_input(client, conn, Wire::Bytes(bytes));
        }
    }
}

// -------------------------------------------------------------------- driving the endpoints
impl Sim {
    fn flush_client(&mut self, i: usize) {
        let now = self.now;
        if self.clients[i].down {
            return;
        }
        while let Some(e) = self.clients[i].client.poll_event() {
            if let Some(crash) = self.clients[i].armed
                && crash.take == Some(0)
                && now < self.heal_at
                // Polling the session's last event already cleared its store: the process dies
                // after the application has seen it, not before.
                && !matches!(
                    e,
                    SessionEvent::SessionLost { .. } | SessionEvent::Closed { .. }
                )
            {
                // The process dies with this event (and any after it) in hand.
                self.clients[i].armed = None;
                self.marks.add("client_crash_mid_step", 1);
                return self.crash_client(i, crash);
            }
            if let Some(Crash { take: Some(n), .. }) = &mut self.clients[i].armed {
                *n = n.saturating_sub(1);
            }
            self.client_event(i, e);
        }
        self.transmit_client(i);
        while let Some(d) = self.clients[i].client.poll_directive(now) {
            self.trace.word(match d {
                Directive::Connect { attempt, .. } => u64::from(attempt),
                _ => u64::MAX,
            });
            match d {
                Directive::Connect { .. } => self.connect(i),
                Directive::Disconnect => {
                    self.clients[i].connecting = false;
                    if let Some(conn) = self.clients[i].conn.take() {
                        self.close_client_side(conn);
                    }
                }
                _ => {}
            }
        }
        self.rearm(i + 1);
    }

    fn transmit_client(&mut self, i: usize) {
        let now = self.now;
        loop {
            let node = &mut self.clients[i];
            let Some(n) = node.client.poll_transmit(now, &mut self.buf) else {
                break;
            };
            let bytes = self.buf.split_to(n).freeze();
            if let Some(conn) = node.conn
                && !node.connecting
                && self.conns[conn].client_open
            {
                if self.datagram {
                    self.send_packet(conn, true, bytes);
                } else {
                    self.push(conn, true, Wire::Bytes(bytes));
                }
            }
        }
    }

    fn flush_server(&mut self) {
        if self.server.down {
            return;
        }
        let now = self.now;
        while let Some(e) = self.server.server.poll_event() {
            self.server_event(e);
        }
        let epoch = self.server.epoch;
        while let Some(t) = self.server.server.poll_transmit(now, &mut self.buf) {
            let bytes = self.buf.split_to(t.len).freeze();
            let conn = (t.conn & u64::from(u32::MAX)) as usize;
            let c = &mut self.conns[conn];
            if c.server_epoch != epoch || !c.server_open || t.conn != conn_id(conn, c.binding) {
                continue;
            }
            if t.close {
                c.server_open = false;
            }
            if self.datagram {
                // A server forgetting a UDP peer tells it nothing.
                if t.len > 0 {
                    self.send_packet(conn, false, bytes);
                }
                continue;
            }
            if t.len > 0 {
                self.push(conn, false, Wire::Bytes(bytes));
            }
            if t.close {
                self.push(conn, false, Wire::Close);
            }
        }
        self.rearm(0);
    }

    fn next_tag(&mut self) -> u64 {
        let t = self.next_tag;
        self.next_tag += 1;
        t
    }

    fn payload_len(&mut self) -> usize {
        let w = &self.params.workload;
        let (lo, hi) = (
            w.payload_min.max(9),
            w.payload_max.max(w.payload_min.max(9)),
        );
        self.rng.random_range(lo..=hi)
    }

    fn session_ctx(&mut self, session: SessionId) -> Ctx {
        if let Some(&c) = self.server.sessions.get(&session) {
            return c;
        }
        let c = self.checker.new_ctx(Some(self.server.epoch));
        self.server.sessions.insert(session, c);
        c
    }

    fn server_event(&mut self, e: ServerEvent) {
        let now = self.now;
        if self.log {
            self.log_event("server", &e);
        }
        let ServerEvent::Session { session, event } = e else {
            return;
        };
        let ctx = self.session_ctx(session);
        let owner = self.owner.get(&session).copied();
        match event {
            SessionEvent::Connected { resumed, .. } => {
                self.marks.add("server_resume", u64::from(resumed));
            }
            SessionEvent::Disconnected { cause } => match cause {
                DisconnectCause::Superseded => self.marks.add("supersede", 1),
                DisconnectCause::IdleTimeout { .. } => self.marks.add("server_idle_timeout", 1),
                _ => self.marks.add("server_disconnect", 1),
            },
            SessionEvent::Received(m) => {
                self.trace.word(checker::tag_of(&m.payload).unwrap_or(0));
                let idx =
                    self.checker
                        .delivered(now, ctx, owner, 0, m.stream, Some(m.seq), &m.payload);
                if m.stream == CALL_STREAM
                    && now < self.heal_at
                    && let Some(idx) = idx
                {
                    self.fan_out(session, ctx, m.seq, idx);
                }
            }
            SessionEvent::ReceivedUnreliable { stream, payload } => {
                self.trace.word(checker::tag_of(&payload).unwrap_or(0));
                self.checker
                    .delivered(now, ctx, owner, 0, stream, None, &payload);
            }
            SessionEvent::Acknowledged { below } => self.checker.acknowledged(now, ctx, below),
            SessionEvent::Reply { to, payload } => {
                self.trace.word(checker::tag_of(&payload).unwrap_or(0));
                self.checker.reply_received(
                    now,
                    ctx,
                    owner,
                    0,
                    to,
                    &payload,
                    REPLY_STREAM.saturating_add(to),
                );
            }
            SessionEvent::RequestTimedOut { .. } => self.marks.add("request_timeout", 1),
            SessionEvent::SessionLost {
                reason,
                unacknowledged,
            } => {
                self.marks.add("session_lost", 1);
                match reason {
                    LostReason::RetentionExpired => self.marks.add("retention_expired", 1),
                    LostReason::Overflow => self.marks.add("overflow_close", 1),
                    _ => {}
                }
                self.server_session_over(session, ctx, unacknowledged);
            }
            SessionEvent::Closed { unacknowledged, .. } => {
                self.marks.add("closed", 1);
                self.server_session_over(session, ctx, unacknowledged);
            }
            _ => {}
        }
    }

    fn server_session_over(
        &mut self,
        session: SessionId,
        ctx: Ctx,
        unacknowledged: Vec<steadfast_core::Message>,
    ) {
        self.marks
            .add("handback", u64::from(!unacknowledged.is_empty()));
        if self.params.canary != Some(Canary::ForgetHandback) {
            let payloads: Vec<Bytes> = unacknowledged.into_iter().map(|m| m.payload).collect();
            self.checker
                .handed_back(self.now, ctx, session.0, &payloads);
        }
        self.server.sessions.remove(&session);
    }

    /// A call arrived: the event goes to every other session, and the caller gets its answer.
    fn fan_out(&mut self, from: SessionId, from_ctx: Ctx, call_seq: u64, call: usize) {
        let now = self.now;
        let targets: Vec<(SessionId, Ctx)> = self
            .server
            .sessions
            .iter()
            .filter(|(s, _)| **s != from)
            .map(|(s, c)| (*s, *c))
            .collect();
        let tag = self.next_tag();
        let len = self.payload_len();
        let p = checker::payload(tag, len);
        let mut sent: Vec<(SessionId, Ctx, Option<u64>)> = Vec::new();
        match self.params.fanout {
            Fanout::Broadcast => {
                let next: Vec<Option<u64>> = targets
                    .iter()
                    .map(|(s, _)| self.server.server.channel(*s).map(|c| c.sender().end()))
                    .collect();
                let refused = self.server.server.broadcast(
                    targets.iter().map(|(s, _)| *s),
                    EVENT_STREAM,
                    Mode::Ordered,
                    &p,
                );
                for ((s, c), seq) in targets.iter().zip(next) {
                    match refused.iter().find(|(r, _)| r == s) {
                        None => sent.push((*s, *c, seq)),
                        Some((_, SendError::QueueFull(_))) => self.marks.add("backpressure", 1),
                        Some(_) => {}
                    }
                }
            }
            Fanout::PerSession => {
                for (s, c) in &targets {
                    match self
                        .server
                        .server
                        .send(*s, EVENT_STREAM, Mode::Ordered, p.clone())
                    {
                        Ok(r) => sent.push((*s, *c, r.seq())),
                        Err(SendError::QueueFull(_)) => self.marks.add("backpressure", 1),
                        Err(_) => {}
                    }
                }
            }
        }
        for (s, c, seq) in sent {
            self.checker.sent(
                now,
                c,
                s.0,
                tag,
                EVENT_STREAM,
                MsgMode::Ordered,
                Role::Event,
                seq,
                false,
                0,
                len,
                None,
            );
        }
        let tag = self.next_tag();
        let len = self.payload_len();
        let stream = REPLY_STREAM.saturating_add(call_seq);
        match self
            .server
            .server
            .reply(from, call_seq, checker::payload(tag, len))
        {
            Ok(seq) => {
                self.checker.sent(
                    now,
                    from_ctx,
                    from.0,
                    tag,
                    stream,
                    MsgMode::Ordered,
                    Role::CallReply,
                    Some(seq),
                    false,
                    0,
                    len,
                    Some(call),
                );
            }
            Err(SendError::QueueFull(_)) => self.marks.add("backpressure", 1),
            Err(_) => {}
        }
    }

    fn client_event(&mut self, i: usize, e: SessionEvent) {
        let now = self.now;
        if self.log {
            let who = format!("client {i} ctx {}", self.clients[i].ctx);
            self.log_event(&who, &e);
        }
        let ctx = self.clients[i].ctx;
        let dest = self.clients[i].session.map_or(0, |s| s.0);
        match e {
            SessionEvent::Connected {
                session,
                resumed,
                retransmitted,
                ..
            } => {
                if let Some(expected) = self.clients[i].expect_resume.take() {
                    if resumed && session == expected {
                        self.marks.add("recovered_resume", 1);
                    } else {
                        let detail = format!(
                            "client {i} restarted on its kept store holding session {expected:?}, then connected to {session:?} (resumed={resumed}) instead of resuming it or losing it loudly"
                        );
                        self.violation("resume-expected", detail);
                    }
                }
                self.clients[i].session = Some(session);
                self.owner.insert(session, ctx);
                self.marks.add("resume", u64::from(resumed));
                self.marks
                    .add("resent_on_resume", u64::from(retransmitted > 0));
            }
            SessionEvent::Disconnected {
                cause: DisconnectCause::IdleTimeout { .. },
            } => self.marks.add("idle_timeout", 1),
            SessionEvent::Received(m) => {
                // The application records the delivery in its ledger and consumes the message
                // in one step (its ledger and the commit are one write).
                self.client_received(i, m.stream, m.seq, m.payload);
                self.clients[i].client.consumed(m.seq);
            }
            SessionEvent::Redelivered(m) => {
                self.marks.add("redelivered", 1);
                if self.checker.taken(&m.payload, dest) {
                    // The application's ledger recognises it: not a second delivery.
                    self.marks.add("redelivered_recognised", 1);
                    if !self.clients[i].unconsumed_again.contains(&m.seq) {
                        let detail = format!(
                            "client {i} was handed seq {} (tag {:?}) again after a restart although it consumed it and its store lost nothing",
                            m.seq,
                            checker::tag_of(&m.payload)
                        );
                        self.violation("redelivered-consumed", detail);
                    }
                } else {
                    self.client_received(i, m.stream, m.seq, m.payload);
                }
                self.clients[i].client.consumed(m.seq);
            }
            SessionEvent::DurabilityLost { error } => {
                // The simulated store never fails: the core judged its own records unusable.
                let detail = format!("client {i}: {error}");
                self.violation("durability-lost", detail);
            }
            SessionEvent::ReceivedUnreliable { stream, payload } => {
                self.trace.word(checker::tag_of(&payload).unwrap_or(0));
                self.checker
                    .delivered(now, ctx, None, dest, stream, None, &payload);
            }
            SessionEvent::Acknowledged { below } => self.checker.acknowledged(now, ctx, below),
            SessionEvent::Reply { to, payload } => {
                self.trace.word(checker::tag_of(&payload).unwrap_or(0));
                self.checker.reply_received(
                    now,
                    ctx,
                    None,
                    dest,
                    to,
                    &payload,
                    REPLY_STREAM.saturating_add(to),
                );
            }
            SessionEvent::RequestTimedOut { .. } => self.marks.add("request_timeout", 1),
            SessionEvent::SessionLost {
                reason,
                unacknowledged,
            } => {
                if self.clients[i].expect_resume.take().is_some() {
                    // The server no longer held it: a loud end, as the contract requires.
                    self.marks.add("recovered_lost", 1);
                }
                self.marks.add("session_lost", 1);
                self.marks.add(
                    match reason {
                        LostReason::Expired => "lost_expired",
                        LostReason::StaleEpoch { .. } => "lost_stale_epoch",
                        LostReason::GaveUp(_) => "lost_gave_up",
                        LostReason::Overflow => "overflow_close",
                        _ => "lost_other",
                    },
                    1,
                );
                self.client_session_over(i, unacknowledged);
            }
            SessionEvent::Closed { unacknowledged, .. } => {
                self.marks.add("closed", 1);
                self.client_session_over(i, unacknowledged);
            }
            _ => {}
        }
    }

    fn client_session_over(&mut self, i: usize, unacknowledged: Vec<steadfast_core::Message>) {
        self.marks
            .add("handback", u64::from(!unacknowledged.is_empty()));
        let ctx = self.clients[i].ctx;
        if self.params.canary != Some(Canary::ForgetHandback) {
            let payloads: Vec<Bytes> = unacknowledged.into_iter().map(|m| m.payload).collect();
            // After a power loss the store may have forgotten acknowledgements (they are not a
            // durability point), so what it hands back may include messages the application was
            // told were acknowledged: allowed, and counted.
            let n = self.checker.handed_back(self.now, ctx, 0, &payloads);
            self.marks.add("handback_acked_before_crash", n);
        }
        self.clients[i].over = true;
        self.schedule(
            self.now + Duration::from_millis(200),
            Ev::Respawn { client: i },
        );
    }

    /// The client application takes a message (where the delivery canaries strike).
    fn client_received(&mut self, i: usize, stream: u64, seq: u64, payload: Bytes) {
        let ordered = msg_mode_of_stream(stream) == MsgMode::Ordered;
        let canary = self.params.canary;
        if ordered && !self.canary.struck {
            self.canary.deliveries += 1;
            if self.canary.deliveries >= CANARY_AFTER {
                match canary {
                    Some(Canary::DupDelivery) => {
                        self.canary.struck = true;
                        self.record_client_delivery(i, stream, seq, payload.clone());
                    }
                    Some(Canary::DropDelivery) => {
                        self.canary.struck = true;
                        return;
                    }
                    Some(Canary::ReorderDelivery) => {
                        self.canary.struck = true;
                        self.canary.held = Some((i, stream, payload, seq));
                        return;
                    }
                    _ => {}
                }
            }
        }
        self.record_client_delivery(i, stream, seq, payload);
        if let Some((c, s, _, _)) = &self.canary.held
            && *c == i
            && *s == stream
            && let Some((_, _, p, q)) = self.canary.held.take()
        {
            self.record_client_delivery(i, stream, q, p);
        }
    }

    fn record_client_delivery(&mut self, i: usize, stream: u64, seq: u64, payload: Bytes) {
        let now = self.now;
        let ctx = self.clients[i].ctx;
        let dest = self.clients[i].session.map_or(0, |s| s.0);
        self.trace.word(checker::tag_of(&payload).unwrap_or(0));
        let idx = self
            .checker
            .delivered(now, ctx, None, dest, stream, Some(seq), &payload);
        if stream == EVENT_STREAM
            && now < self.heal_at
            && let Some(event) = idx
        {
            let think = self.uniform(self.params.workload.think_max);
            let inc = self.clients[i].inc;
            self.schedule(
                now + think,
                Ev::Think {
                    client: i,
                    inc,
                    to: seq,
                    event,
                },
            );
        }
    }
}

// -------------------------------------------------------------------- the workload
impl Sim {
    fn on_client_tick(&mut self, i: usize, call: bool) {
        let now = self.now;
        if now >= self.heal_at {
            return;
        }
        if let Some(t) = self.clients[i].frozen_until.filter(|t| *t > now) {
            // A frozen process does nothing; its application catches up when it wakes.
            self.schedule(t, Ev::ClientTick { client: i, call });
            return;
        }
        let w = &self.params.workload;
        let mean = if call {
            w.call_interval
        } else {
            w.stream_interval
        };
        let next = now + self.exp(mean);
        self.schedule(next, Ev::ClientTick { client: i, call });
        if self.clients[i].over || self.clients[i].down {
            return;
        }
        let tag = self.next_tag();
        let len = self.payload_len();
        let p = checker::payload(tag, len);
        let ctx = self.clients[i].ctx;
        if call {
            let deadline = now + self.params.workload.request_timeout;
            match self.clients[i].client.request(CALL_STREAM, p, deadline) {
                Ok(seq) => {
                    self.checker.sent(
                        now,
                        ctx,
                        0,
                        tag,
                        CALL_STREAM,
                        MsgMode::Ordered,
                        Role::Call,
                        Some(seq),
                        false,
                        0,
                        len,
                        None,
                    );
                }
                Err(SendError::QueueFull(_)) => self.marks.add("backpressure", 1),
                Err(_) => {}
            }
        } else {
            let m = self.rng.random_range(0..5u64);
            let (mut mode, mm) = mode_of(m);
            let mut key = 0;
            if mm == MsgMode::Conflated {
                key = self.rng.random_range(0..CONFLATION_KEYS);
                mode = Mode::Conflated { key };
            }
            let stream = STEADY_STREAM + m;
            let r = self.clients[i].client.send(stream, mode, p);
            self.record_send(ctx, 0, tag, stream, mm, key, len, r);
        }
        self.flush_client(i);
    }

    #[allow(clippy::too_many_arguments)]
    fn record_send(
        &mut self,
        ctx: Ctx,
        dest: u64,
        tag: u64,
        stream: u64,
        mm: MsgMode,
        key: u64,
        len: usize,
        r: Result<Sent, SendError>,
    ) {
        let (seq, replaced) = match r {
            Ok(Sent::Reliable(s)) => (Some(s), false),
            Ok(Sent::Replaced(s)) => {
                self.marks.add("conflated_replace", 1);
                (Some(s), true)
            }
            Ok(_) => (None, false),
            Err(SendError::QueueFull(_)) => {
                self.marks.add("backpressure", 1);
                return;
            }
            Err(_) => return,
        };
        self.checker.sent(
            self.now,
            ctx,
            dest,
            tag,
            stream,
            mm,
            Role::Steady,
            seq,
            replaced,
            key,
            len,
            None,
        );
    }

    fn on_server_tick(&mut self) {
        let now = self.now;
        if now >= self.heal_at {
            return;
        }
        let n = self.clients.len().max(1) as u32;
        let mean = self.params.workload.server_stream_interval / n;
        let next = now + self.exp(mean);
        self.schedule(next, Ev::ServerTick);
        if self.server.down || self.frozen(0) || self.server.sessions.is_empty() {
            return;
        }
        let k = self.rng.random_range(0..self.server.sessions.len());
        let (session, ctx) = self
            .server
            .sessions
            .iter()
            .nth(k)
            .map(|(s, c)| (*s, *c))
            .expect("in range");
        let tag = self.next_tag();
        let len = self.payload_len();
        let m = self.rng.random_range(0..5u64);
        let (mut mode, mm) = mode_of(m);
        let mut key = 0;
        if mm == MsgMode::Conflated {
            key = self.rng.random_range(0..CONFLATION_KEYS);
            mode = Mode::Conflated { key };
        }
        let stream = STEADY_STREAM + m;
        let r = self
            .server
            .server
            .send(session, stream, mode, checker::payload(tag, len));
        self.record_send(ctx, session.0, tag, stream, mm, key, len, r);
        self.flush_server();
    }

    fn on_think(&mut self, i: usize, inc: u32, to: u64, event: usize) {
        let now = self.now;
        if self.clients[i].inc != inc || self.clients[i].over || now >= self.heal_at {
            return;
        }
        if let Some(t) = self.clients[i].frozen_until.filter(|t| *t > now) {
            self.schedule(
                t,
                Ev::Think {
                    client: i,
                    inc,
                    to,
                    event,
                },
            );
            return;
        }
        self.canary.replies += 1;
        let to = if self.params.canary == Some(Canary::MisrouteReply) && self.canary.replies == 3 {
            to + 1
        } else {
            to
        };
        let tag = self.next_tag();
        let len = self.payload_len();
        let ctx = self.clients[i].ctx;
        match self.clients[i].client.reply(to, checker::payload(tag, len)) {
            Ok(seq) => {
                self.checker.sent(
                    now,
                    ctx,
                    0,
                    tag,
                    REPLY_STREAM.saturating_add(to),
                    MsgMode::Ordered,
                    Role::EventReply,
                    Some(seq),
                    false,
                    0,
                    len,
                    Some(event),
                );
            }
            Err(SendError::QueueFull(_)) => self.marks.add("backpressure", 1),
            Err(_) => {}
        }
        self.flush_client(i);
    }

    fn respawn(&mut self, i: usize) {
        let now = self.now;
        // A crash in the meantime restarts the process anew instead.
        if !self.clients[i].over || self.clients[i].down {
            return;
        }
        if let Some(t) = self.clients[i].frozen_until.filter(|t| *t > now) {
            self.schedule(t, Ev::Respawn { client: i });
            return;
        }
        self.collect_client_marks(i);
        let entropy = Box::new(ChaCha8Rng::seed_from_u64(self.rng.random()));
        // The session is over and its store cleared: the application starts a new one on it.
        let client = start_client(
            &self.client_config,
            now,
            entropy,
            self.clients[i].store.as_ref(),
        );
        let ctx = self.checker.new_ctx(None);
        if let Some(conn) = self.clients[i].conn.take() {
            self.close_client_side(conn);
        }
        let node = &mut self.clients[i];
        node.client = client;
        node.inc += 1;
        node.ctx = ctx;
        node.connecting = false;
        node.session = None;
        node.over = false;
        node.backlog.clear();
        node.failed_backlog.clear();
        node.timer.generation += 1;
        node.timer.armed = None;
        self.marks.add("respawn", 1);
        self.flush_client(i);
    }
}

// -------------------------------------------------------------------- faults
impl Sim {
    fn on_fault(&mut self, f: Fault) {
        let n = self.clients.len();
        if n == 0 || self.now >= self.heal_at {
            return;
        }
        let i = self.rng.random_range(0..n);
        self.trace.word(i as u64);
        let now = self.now;
        let live = self.clients[i].conn.filter(|_| !self.clients[i].connecting);
        match f {
            Fault::Reset | Fault::HalfOpen if self.datagram => {
                // A UDP socket has no peer to reset: its owner gets an error (an ICMP
                // unreachable, a rebinding NAT), the server is never told.
                if let Some(conn) = live {
                    self.marks.add("socket_error", 1);
                    self.push_at(conn, false, Wire::Close, now);
                }
            }
            Fault::Reset => {
                if let Some(conn) = live {
                    self.marks.add("reset", 1);
                    self.clear_pipes(conn);
                    self.push(conn, true, Wire::Close);
                    self.push(conn, false, Wire::Close);
                }
            }
            Fault::Blackhole => {
                if let Some(conn) = live {
                    self.marks.add("blackhole", 1);
                    self.clear_pipes(conn);
                    self.conns[conn].blackholed = true;
                }
            }
            Fault::HalfOpen => {
                if let Some(conn) = live {
                    self.marks.add("half_open", 1);
                    self.conns[conn].down.q.clear();
                    self.push(conn, false, Wire::Close);
                }
            }
            Fault::Partition(d) => {
                self.marks.add("partition", 1);
                self.cut(i, 3, now + d);
            }
            Fault::OneWay(d) => {
                self.marks.add("one_way_partition", 1);
                let mask = if self.rng.random_bool(0.5) { 1 } else { 2 };
                self.trace.word(mask);
                self.cut(i, mask as u8, now + d);
            }
            Fault::Swizzle(hold) => self.swizzle(hold),
            Fault::Pause(d) => {
                let node = self.rng.random_range(0..=n);
                self.pause(node, d);
            }
            Fault::Migrate(d) => {
                self.marks.add("migration", 1);
                self.pause(i + 1, d);
                if let Some(conn) = live {
                    self.marks.add("blackhole", 1);
                    self.clear_pipes(conn);
                    self.conns[conn].blackholed = true;
                }
            }
            Fault::Restart(d) => self.restart(d),
            Fault::ClientCrash(downtime) => {
                let c = self.params.crashes.clone();
                let wipe = self.rng.random_bool(c.wipe);
                let machine = self.rng.random_bool(c.machine);
                let mid_step = self.rng.random_bool(c.mid_step);
                let take = mid_step.then(|| self.rng.random_range(0..4u32));
                self.trace
                    .words(&[u64::from(wipe), u64::from(machine), u64::from(mid_step)]);
                let node = &mut self.clients[i];
                if node.down || node.armed.is_some() {
                    self.marks.add("client_crash_skipped", 1);
                    return;
                }
                let crash = Crash {
                    wipe,
                    machine,
                    downtime,
                    take,
                };
                if take.is_some() {
                    // Dies during one of its next steps, or anyway once a quiet spell has passed.
                    node.armed = Some(crash);
                    let inc = node.inc;
                    self.schedule(now + MID_STEP_WAIT, Ev::CrashNow { client: i, inc });
                } else {
                    self.crash_client(i, crash);
                }
            }
        }
    }

    /// Client `i`'s process dies: the `Client` is dropped with everything it held in memory (its
    /// event queue, its requests, whatever it had not recorded), its connection closes under the
    /// server (a process crash: the kernel sends a FIN after what was already written; a machine
    /// crash: nothing), and it restarts after the drawn downtime on its store (kept, or wiped).
    fn crash_client(&mut self, i: usize, crash: Crash) {
        let now = self.now;
        if self.log {
            let who = format!("client {i} ctx {}", self.clients[i].ctx);
            self.log_event(&who, &crash);
        }
        self.marks.add("client_crash", 1);
        self.marks
            .add("client_crash_machine", u64::from(crash.machine));
        self.collect_client_marks(i);
        if let Some(conn) = self.clients[i].conn.take() {
            let c = &mut self.conns[conn];
            if c.client_open {
                c.client_open = false;
                if !self.datagram && !crash.machine {
                    self.push(conn, true, Wire::Close);
                }
            }
        }
        let ctx = self.clients[i].ctx;
        let node = &mut self.clients[i];
        let kept = match &node.store {
            Some(store) => {
                let lost = store.crash(crash.machine);
                self.marks
                    .add("store_tail_lost", u64::from(lost.records > 0));
                if lost.records > 0 {
                    // Acknowledgements are recorded without a flush: the store may now hold
                    // messages the application was told were acknowledged, and hand them back.
                    let r = store.snapshot();
                    let below = r.unacknowledged.first().map_or(r.next_seq, |m| m.seq);
                    let n = self.checker.acks_forgotten(ctx, below);
                    self.marks.add("ack_forgotten", n);
                }
                if crash.wipe {
                    store.wipe();
                }
                node.unconsumed_again = lost.consumed;
                !crash.wipe
            }
            None => false,
        };
        // On a kept store the session lives on (the same ledger context); else it died here,
        // unless the application had already seen it end.
        let resumes = kept && !node.over;
        let held = node.session.filter(|_| !node.over);
        node.expect_resume = if resumes { held } else { None };
        // The dead process does nothing more; an inert stand-in takes its place until it restarts.
        node.client = Client::new(
            self.client_config.clone(),
            now,
            Box::new(ChaCha8Rng::seed_from_u64(0)),
        )
        .expect("client config is valid");
        node.down = true;
        node.inc += 1;
        node.connecting = false;
        node.armed = None;
        node.frozen_until = None;
        node.backlog.clear();
        node.failed_backlog.clear();
        node.timer.generation += 1;
        node.timer.armed = None;
        let inc = node.inc;
        node.restart = Some(match (&node.store, crash.wipe) {
            (Some(_), false) => "client_restart_kept_store",
            (Some(_), true) => "client_restart_wiped_store",
            (None, _) => "client_restart_no_store",
        });
        self.checker.client_crashed(ctx, !resumes);
        if !resumes {
            // The next process starts a new session: a new ledger context.
            self.marks
                .add("orphaned_session", u64::from(held.is_some()));
            let fresh = self.checker.new_ctx(None);
            let node = &mut self.clients[i];
            node.ctx = fresh;
            node.session = None;
            node.over = false;
        }
        self.trace.words(&[i as u64, u64::from(resumes)]);
        let up = (now + crash.downtime).min(self.heal_at.max(now));
        self.schedule(up, Ev::ClientUp { client: i, inc });
    }

    /// A crashed client starts again: on its kept store, resuming its session (the same ledger
    /// context), or from nothing, with a new session.
    fn client_up(&mut self, i: usize, inc: u32) {
        let now = self.now;
        if !self.clients[i].down || self.clients[i].inc != inc {
            return;
        }
        if self.params.canary == Some(Canary::RestartForgetsStore)
            && let Some(store) = &self.clients[i].store
        {
            store.wipe();
        }
        let entropy = Box::new(ChaCha8Rng::seed_from_u64(self.rng.random()));
        let node = &mut self.clients[i];
        node.client = start_client(&self.client_config, now, entropy, node.store.as_ref());
        node.down = false;
        if self.log {
            let (who, what) = (format!("client {i} ctx {}", node.ctx), node.restart);
            self.log_event(&who, &what);
        }
        let node = &mut self.clients[i];
        if let Some(mark) = node.restart.take() {
            self.marks.add(mark, 1);
        }
        self.flush_client(i);
    }

    /// Cuts the directions of `mask` (1: down, 2: up) of client `i`'s path until `until` (at the
    /// latest until the network heals). A cut stream path holds its bytes back; a cut datagram
    /// path drops its datagrams, those in flight included.
    fn cut(&mut self, i: usize, mask: u8, until: Instant) {
        if self.now >= self.heal_at {
            return;
        }
        let until = until.min(self.heal_at);
        for (d, t) in self.cut_until[i].iter_mut().enumerate() {
            if mask & (1 << d) != 0 {
                *t = (*t).max(until);
            }
        }
    }

    /// Swizzle-clogging: cut a random set of client paths one by one, hold them all cut for
    /// `hold`, then restore them one by one in another order.
    fn swizzle(&mut self, hold: Duration) {
        use rand::seq::SliceRandom;
        let now = self.now;
        let n = self.clients.len();
        let mut set: Vec<usize> = (0..n).collect();
        set.shuffle(&mut self.rng);
        let k = self.rng.random_range(1..=n);
        set.truncate(k);
        let step = Duration::from_millis(self.rng.random_range(50..=1_000));
        let mut restore = set.clone();
        restore.shuffle(&mut self.rng);
        if k > 1 && restore == set {
            restore.reverse();
        }
        self.marks.add("swizzle_clog", 1);
        self.marks.add("swizzle_cut", k as u64);
        let all_cut = now + step * (k as u32 - 1);
        for (j, &client) in set.iter().enumerate() {
            let r = restore.iter().position(|c| *c == client).expect("same set");
            let until = all_cut + hold + step * r as u32;
            self.trace.words(&[client as u64, until.as_nanos()]);
            self.schedule(
                now + step * j as u32,
                Ev::Cut {
                    client,
                    mask: 3,
                    until,
                },
            );
        }
    }

    fn pause(&mut self, node: usize, d: Duration) {
        let now = self.now;
        if (node == 0 && self.server.down) || (node > 0 && self.clients[node - 1].down) {
            return;
        }
        let until = (now + d).min(self.heal_at);
        if until <= now {
            return;
        }
        self.marks.add("pause", 1);
        let slot = if node == 0 {
            &mut self.server.frozen_until
        } else {
            &mut self.clients[node - 1].frozen_until
        };
        let until = slot.map_or(until, |t| t.max(until));
        *slot = Some(until);
        self.schedule(until, Ev::Wake { node });
    }

    fn on_wake(&mut self, node: usize) {
        let now = self.now;
        if self.frozen(node) {
            return;
        }
        if node == 0 {
            if self.server.frozen_until.take().is_none() || self.server.down {
                return;
            }
            // The late timer first: the process must not take its own freeze for a dead peer.
            self.server.server.handle_timeout(now);
            self.flush_server();
            while let Some((conn, wire)) = self.server.backlog.pop_front() {
                self.apply_server(conn, wire);
                self.flush_server();
            }
            self.server.timer.armed = None;
            self.rearm(0);
        } else {
            let i = node - 1;
            if self.clients[i].frozen_until.take().is_none() {
                return;
            }
            self.clients[i].client.handle_timeout(now);
            self.flush_client(i);
            while let Some((conn, wire)) = self.clients[i].backlog.pop_front() {
                self.apply_client(i, conn, wire);
                self.flush_client(i);
            }
            while let Some(conn) = self.clients[i].failed_backlog.pop_front() {
                self.connect_failed(i, conn);
            }
            self.clients[i].timer.armed = None;
            self.rearm(node);
        }
    }

    fn restart(&mut self, downtime: Duration) {
        if self.server.down {
            return;
        }
        self.marks.add("server_restart", 1);
        self.collect_server_marks();
        let old = self.server.epoch;
        self.checker.server_crashed(old);
        self.server.epoch += 1;
        self.server.down = true;
        self.server.sessions.clear();
        self.server.backlog.clear();
        self.server.frozen_until = None;
        self.server.timer.generation += 1;
        self.server.timer.armed = None;
        for conn in 0..self.conns.len() {
            let c = &mut self.conns[conn];
            if c.server_epoch == old && c.server_open {
                c.server_open = false;
                c.up.q.clear();
                // The kernel resets the dead process's connections (UDP sockets have none).
                if !self.datagram {
                    self.push(conn, false, Wire::Close);
                }
            }
        }
        let up = (self.now + downtime).min(self.heal_at);
        self.schedule(up, Ev::ServerUp);
    }

    fn server_up(&mut self) {
        let entropy = Box::new(ChaCha8Rng::seed_from_u64(self.rng.random()));
        self.server.server = Server::new(self.server_config.clone(), self.now, entropy)
            .expect("server config is valid");
        self.server.down = false;
        self.flush_server();
    }

    fn collect_client_marks(&mut self, i: usize) {
        let c = &self.clients[i].client;
        let k = *c.counters();
        let s = c.channel().stats();
        self.marks.add("stall", k.stalls);
        self.marks.add("client_disconnects", k.disconnects);
        self.marks.add("retransmitted", s.retransmitted);
        self.marks.add("dedup_hit", s.duplicates_received);
        self.marks.add("malformed_datagram", k.malformed_datagrams);
        self.marks.add("declared_lost", s.declared_lost);
        self.marks.add("rto_expiry", s.rto_expiries);
    }

    fn collect_server_marks(&mut self) {
        if self.server.down {
            return;
        }
        let sessions: Vec<SessionId> = self.server.sessions.keys().copied().collect();
        for id in sessions {
            if let Some(k) = self.server.server.counters(id) {
                self.marks.add("stall", k.stalls);
                self.marks.add("malformed_datagram", k.malformed_datagrams);
            }
            if let Some(ch) = self.server.server.channel(id) {
                let s = ch.stats();
                self.marks.add("retransmitted", s.retransmitted);
                self.marks.add("dedup_hit", s.duplicates_received);
                self.marks.add("declared_lost", s.declared_lost);
                self.marks.add("rto_expiry", s.rto_expiries);
            }
        }
    }

    fn collect_marks(&mut self) {
        for i in 0..self.clients.len() {
            self.collect_client_marks(i);
        }
        self.collect_server_marks();
        let n = &self.net;
        for (name, v) in [
            ("datagrams", n.sent),
            ("packet_lost", n.lost),
            ("packet_burst_lost", n.burst_lost),
            ("packet_dup", n.dup),
            ("packet_corrupt", n.corrupt),
            ("packet_truncated", n.truncated),
            ("packet_overflow", n.overflow),
            ("packet_cut", n.cut),
            ("packet_reordered", n.reordered),
        ] {
            self.marks.add(name, v);
        }
    }
}

/// Replaces each `b"..."` payload in a debug print by the tag its first 8 bytes carry.
fn shorten_payloads(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("b\"") {
        out.push_str(&rest[..start]);
        let body = &rest[start + 2..];
        // The closing quote is the first one not escaped.
        let mut escaped = false;
        let end = body
            .char_indices()
            .find(|&(_, c)| {
                let close = c == '"' && !escaped;
                escaped = c == '\\' && !escaped;
                close
            })
            .map_or(body.len(), |(k, _)| k);
        let bytes = unescape(&body[..end]);
        match bytes.get(..8).and_then(|b| <[u8; 8]>::try_from(b).ok()) {
            Some(head) => out.push_str(&format!("tag:{}", u64::from_le_bytes(head))),
            None => out.push_str("b?"),
        }
        rest = body.get(end + 1..).unwrap_or("");
    }
    out.push_str(rest);
    out
}

/// The bytes of a `Bytes` debug print (`\xNN`, `\\`, `\"`, `\n`, `\r`, `\t`, `\0` escapes).
fn unescape(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut v = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 1 < b.len() {
            match b[i + 1] {
                b'x' if i + 3 < b.len() => {
                    v.push(u8::from_str_radix(&s[i + 2..i + 4], 16).unwrap_or(0));
                    i += 4;
                    continue;
                }
                b'n' => v.push(b'\n'),
                b'r' => v.push(b'\r'),
                b't' => v.push(b'\t'),
                b'0' => v.push(0),
                c => v.push(c),
            }
            i += 2;
        } else {
            v.push(b[i]);
            i += 1;
        }
    }
    v
}

/// Runs one seed.
pub fn run(params: Params) -> Outcome {
    Sim::new(params).run()
}

#[allow(dead_code)]
fn _assert_send() {
    fn is_send<T: Send>() {}
    is_send::<Outcome>();
    let _ = BTreeSet::<u8>::new();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The queue pops by time, and events at one time in the order they were scheduled, whatever
    /// the interleaving of pushes and pops.
    #[test]
    fn the_queue_pops_by_time_then_by_scheduling_order() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let mut q = Queue::default();
        let mut model: Vec<(Instant, u64)> = Vec::new();
        let mut n = 0u64;
        let mut now = Instant::ZERO;
        for round in 0..20_000 {
            if rng.random_bool(0.55) || model.is_empty() {
                let at = now + Duration::from_nanos(rng.random_range(0..50));
                q.push(at, Ev::Wake { node: n as usize });
                model.push((at, n));
                n += 1;
            } else {
                let i = (0..model.len())
                    .min_by_key(|&i| model[i])
                    .expect("not empty");
                let (at, id) = model.swap_remove(i);
                let (got_at, ev) = q.pop().expect("as many as the model");
                assert!(
                    matches!(ev, Ev::Wake { node } if node as u64 == id) && got_at == at,
                    "round {round}: expected {id} at {at:?}, got {ev:?} at {got_at:?}"
                );
                now = at;
            }
        }
        assert_eq!(q.heap.len(), model.len());
    }
}
