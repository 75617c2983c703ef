//! What one run simulates: the workload (chosen by the caller) and, drawn from the seed (swarm
//! testing), the network's latencies, the fault mix and its rates.

use std::fmt;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use steadfast_core::Transport;
use steadfast_core::time::Duration;

/// The workload of the field report (seeds/000): calls that fan out to the other clients, whose
/// replies come back, plus a steady stream of messages in every delivery mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    /// How many client nodes (one server node besides).
    pub clients: usize,
    /// How long the workload and the faults run; the heal phase follows.
    pub duration: Duration,
    /// Mean time between two calls (requests) of one client.
    pub call_interval: Duration,
    /// Mean time between two steady-stream messages of one client.
    pub stream_interval: Duration,
    /// Mean time between two steady-stream messages from the server to one session.
    pub server_stream_interval: Duration,
    /// The smallest payload, in bytes (at least the 16-byte tag).
    pub payload_min: usize,
    /// The largest payload, in bytes.
    pub payload_max: usize,
    /// The longest a receiver's saturated CPU takes before it replies to a fanned-out event.
    pub think_max: Duration,
    /// A call's deadline.
    pub request_timeout: Duration,
    /// The transport every run uses; `None`: the swarm draws it per seed.
    pub transport: Option<Transport>,
    /// Whether datagram paths may corrupt (flip a bit of) datagrams. On by default: the core
    /// verifies a CRC-32 on every datagram, so a corrupted one is a drop; were one delivered, the
    /// ledger would report it (the `corrupt-past-checksum` canary proves it).
    pub corrupt: bool,
    /// Client crashes forced on in every seed, up to this many per minute of workload (a
    /// crash-heavy sweep); `None`: the swarm turns them on for half the seeds.
    pub client_crashes: Option<u32>,
}

impl Default for Workload {
    /// Server + 8 clients for 60 s: a call every 5 s per client fanned out to the 7 others, and a
    /// message a second each way per client in a random delivery mode.
    fn default() -> Self {
        Workload {
            clients: 8,
            duration: Duration::from_secs(60),
            call_interval: Duration::from_secs(5),
            stream_interval: Duration::from_secs(1),
            server_stream_interval: Duration::from_secs(1),
            payload_min: 16,
            payload_max: 512,
            think_max: Duration::from_millis(300),
            request_timeout: Duration::from_secs(10),
            transport: None,
            corrupt: true,
            client_crashes: None,
        }
    }
}

/// A deliberate break of one guarantee, to prove that the checker notices: in the simulated
/// applications, in the network past the checksum, or (`Core*`) planted inside the core itself
/// through its `canary` feature, as a real protocol bug would be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Canary {
    /// A client application records one received message twice.
    DupDelivery,
    /// A client application loses one received message.
    DropDelivery,
    /// A client application swaps two consecutive messages of an ordered stream.
    ReorderDelivery,
    /// Both ends ignore the messages handed back by `SessionLost` and `Closed`.
    ForgetHandback,
    /// A client answers a fanned-out event under the wrong sequence number.
    MisrouteReply,
    /// The network flips a payload bit of datagrams and fixes up their checksum, as a corruption
    /// the checksum cannot see would (the run is forced onto datagrams).
    CorruptPastChecksum,
    /// The core's receivers deliver duplicates instead of discarding them (forces datagrams,
    /// where duplicates happen).
    CoreSkipDedup,
    /// The core resends nothing on resume: messages in flight when a connection died are lost.
    CoreSkipResume,
    /// The core delivers ordered messages on arrival (forces datagrams, which reorder).
    CoreOutOfOrder,
    /// A client restarted on its kept store actually starts from an empty one, as a process
    /// pointed at the wrong directory would (forces client crashes, every client durable, no
    /// wipes).
    RestartForgetsStore,
}

impl Canary {
    /// Every canary.
    pub const ALL: [Canary; 10] = [
        Canary::DupDelivery,
        Canary::DropDelivery,
        Canary::ReorderDelivery,
        Canary::ForgetHandback,
        Canary::MisrouteReply,
        Canary::CorruptPastChecksum,
        Canary::CoreSkipDedup,
        Canary::CoreSkipResume,
        Canary::CoreOutOfOrder,
        Canary::RestartForgetsStore,
    ];

    /// Its command-line name.
    pub fn name(self) -> &'static str {
        match self {
            Canary::DupDelivery => "dup-delivery",
            Canary::DropDelivery => "drop-delivery",
            Canary::ReorderDelivery => "reorder-delivery",
            Canary::ForgetHandback => "forget-handback",
            Canary::MisrouteReply => "misroute-reply",
            Canary::CorruptPastChecksum => "corrupt-past-checksum",
            Canary::CoreSkipDedup => "core-skip-dedup",
            Canary::CoreSkipResume => "core-skip-resume",
            Canary::CoreOutOfOrder => "core-out-of-order",
            Canary::RestartForgetsStore => "restart-forgets-store",
        }
    }

    /// The deliberate bug to plant in the core's endpoints, for the `Core*` canaries.
    pub fn in_core(self) -> Option<steadfast_core::canary::Canary> {
        use steadfast_core::canary::Canary as Core;
        match self {
            Canary::CoreSkipDedup => Some(Core::SkipDedup),
            Canary::CoreSkipResume => Some(Core::SkipResumeRetransmit),
            Canary::CoreOutOfOrder => Some(Core::DeliverOutOfOrder),
            _ => None,
        }
    }

    /// The canary called `name`.
    pub fn parse(name: &str) -> Option<Canary> {
        Canary::ALL.into_iter().find(|c| c.name() == name)
    }
}

/// How the server fans a call out to the other clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fanout {
    /// One `Server::broadcast` call.
    Broadcast,
    /// One `Server::send` per session.
    PerSession,
}

/// How many faults of each kind a run injects, at uniformly drawn times during the workload.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FaultMix {
    /// A client's connection resets; both ends are told.
    pub resets: u32,
    /// A client's connection goes silent both ways; nobody is told.
    pub blackholes: u32,
    /// A client's connection resets on the client's side only; the server is never told.
    pub half_opens: u32,
    /// A client's path to the server is cut for a while: bytes wait, new connects fail.
    pub partitions: u32,
    /// A node's process freezes for a while (the server's or a client's).
    pub pauses: u32,
    /// A client's VM is live-migrated: frozen, and its connection silently dead afterwards.
    pub migrations: u32,
    /// The server process restarts with nothing remembered.
    pub restarts: u32,
    /// One direction of a client's path drops (datagrams) or holds (streams) everything for a
    /// while; the other direction passes.
    pub one_way_partitions: u32,
    /// Swizzle-clogging: a random set of client paths is cut one by one, then restored one by one
    /// in another order.
    pub swizzles: u32,
    /// A client process dies and, after a while, starts again on its store (kept, or wiped; see
    /// [`Crashes`]).
    pub client_crashes: u32,
}

impl FaultMix {
    /// Every kind, with the count the swarm may draw up to, per minute of workload.
    pub fn total(&self) -> u32 {
        self.resets
            + self.blackholes
            + self.half_opens
            + self.partitions
            + self.pauses
            + self.migrations
            + self.restarts
            + self.one_way_partitions
            + self.swizzles
            + self.client_crashes
    }

    /// A mix drawn for one seed: each kind is on with probability 1/2, at its own rate. Client
    /// crashes are drawn apart, last of a seed's parameters (with [`Crashes`]), so adding them
    /// left every other draw of every seed as it was.
    pub fn draw(rng: &mut ChaCha8Rng, duration: Duration) -> FaultMix {
        let mut kind = |per_minute: f64| -> u32 {
            if rng.random_bool(0.5) {
                up_to(rng, per_minute, duration)
            } else {
                0
            }
        };
        FaultMix {
            resets: kind(6.0),
            blackholes: kind(4.0),
            half_opens: kind(4.0),
            partitions: kind(3.0),
            pauses: kind(4.0),
            migrations: kind(3.0),
            restarts: kind(1.5),
            one_way_partitions: kind(3.0),
            swizzles: kind(1.5),
            client_crashes: 0,
        }
    }
}

/// A count from 1 to `per_minute` per minute of `duration` (at least 1).
fn up_to(rng: &mut ChaCha8Rng, per_minute: f64, duration: Duration) -> u32 {
    let minutes = (duration.as_secs_f64() / 60.0).max(0.25);
    let max = (per_minute * minutes).ceil().max(1.0) as u32;
    rng.random_range(1..=max)
}

/// How client processes crash and what their stores keep, drawn per seed.
///
/// A crash is a **process** crash (killed: the kernel closes its connection, so the server hears a
/// FIN; every record the store was given survives) or, with probability `machine`, a **machine**
/// crash (power loss: nothing tells the server, and the store loses what was appended since its
/// last flush). Independently, with probability `wipe`, the store is deleted before the restart.
/// With probability `mid_step` the process dies between two events of one step: the application
/// has taken some of what the client handed out, and the rest dies with the process.
#[derive(Debug, Clone, PartialEq)]
pub struct Crashes {
    /// Per client, whether it runs with a store (a client without one restarts from nothing).
    pub durable: Vec<bool>,
    /// The chance a crash deletes the store.
    pub wipe: f64,
    /// The chance a crash is a machine crash.
    pub machine: f64,
    /// The chance the process dies between two events of one step.
    pub mid_step: f64,
    /// The longest a crashed client stays down.
    pub max_downtime: Duration,
}

impl Crashes {
    /// Draws the client crashes of a seed (how many, into `faults`) and how they go.
    fn draw(
        rng: &mut ChaCha8Rng,
        workload: &Workload,
        canary: Option<Canary>,
        faults: &mut FaultMix,
    ) -> Crashes {
        let d = workload.duration;
        faults.client_crashes = match workload.client_crashes {
            Some(per_minute) => up_to(rng, f64::from(per_minute.max(1)), d),
            None if rng.random_bool(0.5) => up_to(rng, 3.0, d),
            None => 0,
        };
        let all = rng.random_bool(0.7);
        let mut durable: Vec<bool> = (0..workload.clients)
            .map(|_| all || rng.random_bool(0.5))
            .collect();
        let mut wipe = if rng.random_bool(0.5) {
            0.0
        } else {
            rng.random_range(0.0..=0.4)
        };
        let machine = rng.random_range(0.0..=0.5);
        let mid_step = rng.random_range(0.0..=0.7);
        let max_downtime = Duration::from_millis(rng.random_range(0..=5_000));
        if canary == Some(Canary::RestartForgetsStore) {
            // Every restart is one that must resume.
            faults.client_crashes = faults.client_crashes.max(3);
            durable.iter_mut().for_each(|d| *d = true);
            wipe = 0.0;
        }
        Crashes {
            durable,
            wipe,
            machine,
            mid_step,
            max_downtime,
        }
    }
}

/// One client's path to the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkParams {
    /// One-way base latency.
    pub latency: Duration,
    /// Extra one-way delay, uniform in `0..=jitter`, per delivery (never reordering a connection).
    pub jitter: Duration,
}

/// Bursty loss (Gilbert–Elliott): a path is in a good or a bad state, each with its own loss rate;
/// every datagram may move it to the other state first.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GilbertElliott {
    /// Per datagram, the chance a good path turns bad.
    pub to_bad: f64,
    /// Per datagram, the chance a bad path turns good.
    pub to_good: f64,
    /// The loss rate in the good state.
    pub loss_good: f64,
    /// The loss rate in the bad state.
    pub loss_bad: f64,
}

/// The per-datagram faults of one direction of one datagram path. They stop when the network
/// heals (latency and jitter, hence reordering, do not).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PathFaults {
    /// Uniform loss rate.
    pub loss: f64,
    /// Bursty loss, on top of the uniform loss.
    pub burst: Option<GilbertElliott>,
    /// The chance a datagram arrives twice (each copy with its own delay).
    pub dup: f64,
    /// The chance a datagram has one random bit flipped.
    pub corrupt: f64,
    /// The chance a datagram is cut short.
    pub truncate: f64,
    /// The most datagrams in flight on this direction; the excess is dropped.
    pub capacity: u32,
}

impl PathFaults {
    fn draw(rng: &mut ChaCha8Rng, on: &[bool; 6]) -> PathFaults {
        let mut rate = |on: bool, max: f64| if on { rng.random_range(0.0..=max) } else { 0.0 };
        let loss = rate(on[0], 0.15);
        let dup = rate(on[2], 0.10);
        let corrupt = rate(on[3], 0.05);
        let truncate = rate(on[4], 0.05);
        let burst = on[1].then(|| GilbertElliott {
            to_bad: rng.random_range(0.001..=0.05),
            to_good: rng.random_range(0.05..=0.5),
            loss_good: rng.random_range(0.0..=0.02),
            loss_bad: rng.random_range(0.3..=1.0),
        });
        let capacity = if on[5] {
            rng.random_range(4..=256)
        } else {
            1024
        };
        PathFaults {
            loss,
            burst,
            dup,
            corrupt,
            truncate,
            capacity,
        }
    }
}

impl fmt::Display for PathFaults {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "loss={:.4} dup={:.4} corrupt={:.4} truncate={:.4} capacity={}",
            self.loss, self.dup, self.corrupt, self.truncate, self.capacity
        )?;
        match self.burst {
            Some(b) => write!(
                f,
                " burst(to_bad={:.4} to_good={:.4} loss_good={:.4} loss_bad={:.4})",
                b.to_bad, b.to_good, b.loss_good, b.loss_bad
            ),
            None => write!(f, " burst=off"),
        }
    }
}

/// Everything one run depends on besides the seed's own random stream.
#[derive(Debug, Clone, PartialEq)]
pub struct Params {
    /// The seed.
    pub seed: u64,
    /// The workload.
    pub workload: Workload,
    /// Per client, its path.
    pub links: Vec<LinkParams>,
    /// How calls fan out.
    pub fanout: Fanout,
    /// How long the server keeps a disconnected session.
    pub retention: Duration,
    /// How long a connect into a cut path takes to fail.
    pub connect_timeout: Duration,
    /// Whether a connect into a cut path is refused at once (else it times out).
    pub partition_refuses: bool,
    /// The longest a partition, pause or migration lasts.
    pub max_fault_len: Duration,
    /// The longest the server stays down when it restarts.
    pub max_downtime: Duration,
    /// Tight queue bounds (messages, per session and side) instead of the defaults, to reach
    /// backpressure; `None`: the core's defaults.
    pub max_queued: Option<usize>,
    /// A small in-flight limit (messages, per session and side) instead of the default, so that
    /// a queue holds messages unsent behind it, through disconnects and resumes; `None`: the
    /// core's default.
    pub max_in_flight: Option<u64>,
    /// Whether a full server queue closes the session (`Overflow::CloseSession`) instead of
    /// refusing the send.
    pub overflow_closes: bool,
    /// The faults.
    pub faults: FaultMix,
    /// What the sessions run over.
    pub transport: Transport,
    /// Datagram runs: per client, the per-datagram faults of its path, `[down, up]`.
    pub paths: Vec<[PathFaults; 2]>,
    /// How client processes crash and what their stores keep.
    pub crashes: Crashes,
    /// The deliberately broken guarantee, if any.
    pub canary: Option<Canary>,
}

impl Params {
    /// The parameters the swarm draws for `seed` over `workload`.
    pub fn draw(seed: u64, workload: Workload, canary: Option<Canary>) -> Params {
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5157_4152_4d00_0000);
        let wan = rng.random_bool(0.3);
        let links = (0..workload.clients)
            .map(|_| {
                let latency = if wan {
                    Duration::from_micros(rng.random_range(5_000..=80_000))
                } else {
                    Duration::from_micros(rng.random_range(50..=2_000))
                };
                let jitter =
                    Duration::from_nanos(rng.random_range(0..=latency.as_nanos() as u64 / 2 + 1));
                LinkParams { latency, jitter }
            })
            .collect();
        let fanout = if rng.random_bool(0.5) {
            Fanout::Broadcast
        } else {
            Fanout::PerSession
        };
        let retention = Duration::from_secs([5, 10, 30][rng.random_range(0..3)]);
        let connect_timeout = Duration::from_millis(rng.random_range(500..=3_000));
        let partition_refuses = rng.random_bool(0.5);
        let max_fault_len = Duration::from_millis(rng.random_range(500..=15_000));
        let max_downtime = Duration::from_millis(rng.random_range(0..=5_000));
        let mut faults = FaultMix::draw(&mut rng, workload.duration);
        let max_queued = rng
            .random_bool(0.25)
            .then(|| rng.random_range(16..=256usize));
        let overflow_closes = rng.random_bool(0.3);
        let datagram = rng.random_bool(0.5);
        let forced = matches!(
            canary,
            Some(Canary::CorruptPastChecksum | Canary::CoreSkipDedup | Canary::CoreOutOfOrder)
        )
        .then_some(Transport::Datagram);
        let transport = forced.or(workload.transport).unwrap_or(if datagram {
            Transport::Datagram
        } else {
            Transport::Stream
        });
        let paths = if transport == Transport::Datagram {
            // Swarm: each kind of per-datagram fault is on or off for the whole run.
            let mut on = [false; 6];
            for k in &mut on {
                *k = rng.random_bool(0.5);
            }
            on[3] &= workload.corrupt;
            (0..workload.clients)
                .map(|_| {
                    [
                        PathFaults::draw(&mut rng, &on),
                        PathFaults::draw(&mut rng, &on),
                    ]
                })
                .collect()
        } else {
            Vec::new()
        };
        let crashes = Crashes::draw(&mut rng, &workload, canary, &mut faults);
        // Drawn last, so that every other parameter of a seed stays as it was before it existed.
        let max_in_flight = rng.random_bool(0.25).then(|| rng.random_range(4..=64u64));
        Params {
            seed,
            workload,
            links,
            fanout,
            retention,
            connect_timeout,
            partition_refuses,
            max_fault_len,
            max_downtime,
            max_queued,
            max_in_flight,
            overflow_closes,
            faults,
            transport,
            paths,
            crashes,
            canary,
        }
    }

    /// The liveness bound: once the faults stop, every outstanding reliable message must be
    /// delivered or handed back within this much virtual time.
    ///
    /// A silently dead connection is found within the idle timeout plus the stall grace (3 s + 3 s),
    /// the reconnect backoff waits at most 10 s, a connect into a dead path takes `connect_timeout`;
    /// a session the server dropped is reported at the latest `retention` after its disconnect; 5 s
    /// of slack covers round trips and the reply think time.
    pub fn liveness_bound(&self) -> Duration {
        self.retention + Duration::from_secs(3 + 3 + 10 + 5) + self.connect_timeout
    }
}

fn ms(d: Duration) -> String {
    format!("{:.3}ms", d.as_secs_f64() * 1000.0)
}

/// A bound as the report shows it: its value, or "default" where the core's default holds.
fn or_default(bound: Option<impl fmt::Display>) -> String {
    bound.map_or("default".to_string(), |n| n.to_string())
}

impl fmt::Display for Params {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let w = &self.workload;
        writeln!(f, "seed {}", self.seed)?;
        writeln!(
            f,
            "  workload: clients={} duration={}s call_interval={} stream_interval={} server_stream_interval={} payload={}..={}B think_max={} request_timeout={}",
            w.clients,
            w.duration.as_secs_f64(),
            ms(w.call_interval),
            ms(w.stream_interval),
            ms(w.server_stream_interval),
            w.payload_min,
            w.payload_max,
            ms(w.think_max),
            ms(w.request_timeout),
        )?;
        writeln!(
            f,
            "  transport={:?} corrupt_allowed={}",
            self.transport, w.corrupt
        )?;
        write!(f, "  links (latency/jitter):")?;
        for (i, l) in self.links.iter().enumerate() {
            write!(f, " c{i}={}/{}", ms(l.latency), ms(l.jitter))?;
        }
        writeln!(f)?;
        for (i, [down, up]) in self.paths.iter().enumerate() {
            writeln!(f, "  c{i} up:   {up}")?;
            writeln!(f, "  c{i} down: {down}")?;
        }
        writeln!(
            f,
            "  fanout={:?} retention={}s connect_timeout={} partition_refuses={} max_fault_len={} max_downtime={}",
            self.fanout,
            self.retention.as_secs_f64(),
            ms(self.connect_timeout),
            self.partition_refuses,
            ms(self.max_fault_len),
            ms(self.max_downtime),
        )?;
        writeln!(
            f,
            "  max_queued={} max_in_flight={} overflow_closes={}",
            or_default(self.max_queued),
            or_default(self.max_in_flight),
            self.overflow_closes
        )?;
        let m = &self.faults;
        writeln!(
            f,
            "  faults: resets={} blackholes={} half_opens={} partitions={} one_way_partitions={} swizzles={} pauses={} migrations={} restarts={} client_crashes={}",
            m.resets,
            m.blackholes,
            m.half_opens,
            m.partitions,
            m.one_way_partitions,
            m.swizzles,
            m.pauses,
            m.migrations,
            m.restarts,
            m.client_crashes
        )?;
        let c = &self.crashes;
        let durable: String = c
            .durable
            .iter()
            .map(|d| if *d { 'D' } else { '-' })
            .collect();
        writeln!(
            f,
            "  client crashes: durable={durable} wipe={:.3} machine={:.3} mid_step={:.3} max_downtime={}",
            c.wipe,
            c.machine,
            c.mid_step,
            ms(c.max_downtime)
        )?;
        write!(
            f,
            "  liveness_bound={}s canary={}",
            self.liveness_bound().as_secs_f64(),
            self.canary.map_or("none", Canary::name)
        )
    }
}
