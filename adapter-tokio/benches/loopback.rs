//! The loopback harness of issue 7: steadfast beside what users would otherwise use, in one process.
//!
//! ```sh
//! cargo bench -p steadfast-tokio --bench loopback
//! ```
//!
//! Sections, each printed as a table (about two and a half minutes in all on a 2-core machine):
//!
//! - **throughput**: one direction, client to server, for 64 B and 64 KiB messages: steadfast-tokio
//!   (ordered, acks on; once with a handle call per message and per event, once with the batch
//!   calls `send_many` and `next_events`, 64 at a time; and server to client with the batch
//!   calls, the fan-out direction), raw tokio `TcpStream` + `BufWriter` (one
//!   `write_all` of a pre-framed
//!   message: a 4-byte length and the payload),
//!   `FramedWrite<LengthDelimitedCodec>` with feed-then-flush, and rumqttc publishing QoS 1 through
//!   an in-process rumqttd broker to a QoS 1 subscriber. The sender sends for a fixed time, then a
//!   marked last message; the receiver counts every arrival, and the rate is all of them over the
//!   time from the first send to the last arrival. Each run is repeated; medians are printed with
//!   the range. Syscalls are counted for each run by `perf stat` attached to this process
//!   (in-kernel tracepoint counters, no ptrace slowdown), both ends together: I/O syscalls (read,
//!   write, readv, writev, recvfrom, sendto, recvmsg, sendmsg) and all syscalls. For steadfast the
//!   channel statistics give the share of frames that are standalone acks.
//! - **fanout**: the use this library is for: a server sending every 64 B event to each of
//!   `LOOPBACK_FANOUT_CLIENTS` (16) clients over their own connections, `BATCH` events per
//!   session per call (`send_many`), each client counting its arrivals with `next_events`;
//!   against the same events written to as many `FramedWrite<LengthDelimitedCodec>`s, fed a batch
//!   at a time, each read by a `FramedRead`. The rate is deliveries (events × clients) over the
//!   time from the first send to the last client's last arrival; CPU per delivery as above.
//!   The same again from a server split into `LOOPBACK_FANOUT_SHARDS` (8) parts
//!   (`ServerOptions::shards`), each behind its own lock. `LOOPBACK_FANOUT_SERVERS` (1) spreads
//!   the clients over that many servers instead, each with a lock of its own.
//! - **wire**: the same runs, shorter, through the chaos proxy, whose byte counters give the bytes
//!   on the wire (both directions, handshakes and acks included) per payload byte. For MQTT the
//!   proxy sits between the publisher and the broker, so it counts PUBLISH and PUBACK on that leg.
//!   rumqttd keeps each topic's messages in a bounded commitlog; a QoS 1 subscriber that falls
//!   further behind than that loses the oldest, which the throughput table reports as LOST.
//! - **latency**: round trips at fixed open-loop rates: a pacing thread sends each 64 B message at
//!   its scheduled time and stamps it with that time (not the time it actually went out), so a
//!   stall shows in the latency instead of silently delaying later sends (no coordinated
//!   omission). steadfast: the server `reply`s to each message; raw TCP: the server echoes the
//!   bytes. HdrHistogram, p50/p99/p99.9/max; the first 10% of each run is warm-up, not recorded.
//!   Tail latencies on a shared 2-core machine swing from run to run (the pacing thread competes
//!   with the runtime's two workers), so each figure is the median of several runs.
//!   `LOOPBACK_PACER=sleep` makes the pacer sleep to each send instead of spinning for the last
//!   200 µs: the runtime keeps both cores, and each send is a little late, which counts against it.
//! - **runtimes**: steadfast-smol and steadfast-async-std (per-message and batch calls) against raw
//!   TCP on their own runtime (`BufWriter`, the same framing), 64 B, one direction. smol runs on
//!   an executor of one thread per core, steadfast's tasks and raw TCP's receiver alike, as tokio
//!   has its workers and async-std its pool (smol's global executor has one thread).
//! - **recovery**: client to server through the chaos proxy with the default configuration, a
//!   message every 2 ms. (a) A blackhole on the connection: time to the client's `Disconnected`,
//!   then to the first message delivered after it (new connections work all along, so the path is
//!   "restored" at detection). (b) A partition (new connections blackholed too) kept for
//!   `LOOPBACK_PARTITION_SECS`, then healed: time from the heal to the first resumed delivery.
//!
//! Environment: `LOOPBACK_ONLY=throughput,fanout,wire,latency,runtimes,recovery` (a subset),
//! `LOOPBACK_FANOUT_CLIENTS` (16), `LOOPBACK_FANOUT_KINDS` (steadfast,split,framed),
//! `LOOPBACK_FANOUT_SHARDS` (8), `LOOPBACK_FANOUT_SERVERS` (1),
//! `LOOPBACK_SECS` (1.5, per throughput run), `LOOPBACK_REPS` (3), `LOOPBACK_WIRE_SECS` (0.5),
//! `LOOPBACK_LATENCY_SECS` (1.5, per run), `LOOPBACK_LATENCY_REPS` (5), `LOOPBACK_RATES`
//! (10000,100000), `LOOPBACK_LATENCY_IMPLS` (steadfast,raw,pacer: which of the three the latency
//! section runs, so that one can be counted alone under `perf stat`),
//! `LOOPBACK_KINDS` (steadfast,batched,down,raw,framed,mqtt) and `LOOPBACK_SIZES` (64,65536) for the
//! throughput section, `LOOPBACK_RECOVERY_REPS` (3), `LOOPBACK_PARTITION_SECS` (5), `LOOPBACK_PERF=0` (no syscall
//! counts; they need `perf` and permission to attach to this process), `LOOPBACK_PACER=sleep` (the
//! latency section's pacer sleeps instead of spinning), `LOOPBACK_WORKERS` (2, the tokio runtime's
//! worker threads; with 1, the spinning pacer and the runtime no longer share a core),
//! `LOOPBACK_SMOL_THREADS` (the core count: the smol executor's threads; 0 for smol's global
//! executor), `LOOPBACK_RUNTIMES` (smol,async-std: which the other-runtimes section runs).

use std::future::Future;
use std::io::Read;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_lite::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use futures_util::{SinkExt, StreamExt as _};
use hdrhistogram::Histogram;
use steadfast_core::Stats;
use steadfast_core::driver::{ClientHandle, ClientOptions, ServerHandle, ServerOptions};
use steadfast_smol::Smol;
use steadfast_tokio::chaos::{ChaosProxy, Fault, Target};
use steadfast_tokio::{Mode, SendError, ServerEvent, SessionEvent};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio_util::codec::{FramedRead, FramedWrite, LengthDelimitedCodec};

/// The two message sizes of the throughput section.
const SMALL: usize = 64;
const LARGE: usize = 64 << 10;
/// The first payload byte of the last message of a run.
const END: u8 = 0xff;
/// How often a sender looks at the clock.
const CHECK_EVERY: u64 = 16;
/// Messages per `send_many`, and events per `next_events`, where the handles' batch calls are used.
const BATCH: usize = 64;

// ---------------------------------------------------------------------------------------------
// Settings and results

struct Settings {
    sections: Vec<String>,
    kinds: Vec<String>,
    sizes: Vec<usize>,
    secs: Duration,
    reps: usize,
    wire_secs: Duration,
    latency_secs: Duration,
    latency_reps: usize,
    latency_impls: Vec<String>,
    rates: Vec<u64>,
    recovery_reps: usize,
    partition: Duration,
    perf: bool,
    /// Worker threads of the tokio runtime every tokio run uses.
    workers: usize,
    /// Clients of the fan-out section.
    fanout_clients: usize,
    /// Which of the fan-out section's rows run.
    fanout_kinds: Vec<String>,
    /// Servers the fan-out section's clients are spread over.
    fanout_servers: usize,
    /// The parts the fan-out section's split server has.
    fanout_shards: usize,
    /// Which runtimes the other-runtimes section runs.
    runtimes: Vec<String>,
}

fn env_f64(name: &str, default: f64) -> f64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

impl Settings {
    fn from_env() -> Self {
        let list = |name: &str, default: &str| -> Vec<String> {
            std::env::var(name)
                .unwrap_or_else(|_| default.to_string())
                .split(',')
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect()
        };
        Settings {
            sections: list(
                "LOOPBACK_ONLY",
                "throughput,fanout,wire,latency,runtimes,recovery",
            ),
            kinds: list("LOOPBACK_KINDS", "steadfast,batched,down,raw,framed,mqtt"),
            sizes: list("LOOPBACK_SIZES", "64,65536")
                .iter()
                .filter_map(|s| s.parse().ok())
                .collect(),
            secs: Duration::from_secs_f64(env_f64("LOOPBACK_SECS", 1.5)),
            reps: env_f64("LOOPBACK_REPS", 3.0).max(1.0) as usize,
            wire_secs: Duration::from_secs_f64(env_f64("LOOPBACK_WIRE_SECS", 0.5)),
            latency_secs: Duration::from_secs_f64(env_f64("LOOPBACK_LATENCY_SECS", 1.5)),
            latency_reps: env_f64("LOOPBACK_LATENCY_REPS", 5.0).max(1.0) as usize,
            latency_impls: list("LOOPBACK_LATENCY_IMPLS", "steadfast,raw,pacer"),
            rates: list("LOOPBACK_RATES", "10000,100000")
                .iter()
                .filter_map(|r| r.parse().ok())
                .collect(),
            recovery_reps: env_f64("LOOPBACK_RECOVERY_REPS", 3.0).max(1.0) as usize,
            partition: Duration::from_secs_f64(env_f64("LOOPBACK_PARTITION_SECS", 5.0)),
            perf: std::env::var("LOOPBACK_PERF").map_or(true, |v| v != "0"),
            workers: env_f64("LOOPBACK_WORKERS", 2.0).max(1.0) as usize,
            fanout_clients: env_f64("LOOPBACK_FANOUT_CLIENTS", 16.0).max(1.0) as usize,
            fanout_kinds: list("LOOPBACK_FANOUT_KINDS", "steadfast,split,framed"),
            fanout_servers: env_f64("LOOPBACK_FANOUT_SERVERS", 1.0).max(1.0) as usize,
            fanout_shards: env_f64("LOOPBACK_FANOUT_SHARDS", 8.0).max(1.0) as usize,
            runtimes: list("LOOPBACK_RUNTIMES", "smol,async-std"),
        }
    }

    fn wants(&self, section: &str) -> bool {
        self.sections.iter().any(|s| s == section)
    }
}

/// One throughput run.
#[derive(Debug, Clone, Default)]
struct Run {
    msgs: u64,
    elapsed: Duration,
    size: usize,
    syscalls: Option<Syscalls>,
    /// Bytes the chaos proxy forwarded (up, down), when the run went through it.
    wire: Option<(u64, u64)>,
    /// steadfast only: the client's and the server's channel statistics.
    stats: Option<(Stats, Stats)>,
    /// Messages sent that never arrived (only the MQTT peer loses any).
    lost: u64,
    /// CPU time the whole process spent on the run, all threads, both ends.
    cpu: Option<Duration>,
}

impl Run {
    fn rate(&self) -> f64 {
        self.msgs as f64 / self.elapsed.as_secs_f64()
    }

    fn mb_per_sec(&self) -> f64 {
        self.rate() * self.size as f64 / 1e6
    }
}

/// CPU time this process's threads have run so far, from the kernel's per-thread accounting
/// (nanoseconds, unlike `getrusage`'s ticks); `None` off Linux.
fn cpu_time() -> Option<Duration> {
    let mut total = 0u64;
    for task in std::fs::read_dir("/proc/self/task").ok()? {
        let path = task.ok()?.path().join("schedstat");
        let Ok(stat) = std::fs::read_to_string(path) else {
            // A thread that ended between the listing and the read.
            continue;
        };
        total += stat.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(Duration::from_nanos(total))
}

/// Runs `run`, recording the CPU time the process spent on it.
fn timed_cpu(run: impl FnOnce() -> Run) -> Run {
    let before = cpu_time();
    let mut r = run();
    r.cpu = cpu_time().zip(before).map(|(after, before)| after - before);
    r
}

#[derive(Debug, Clone, Copy, Default)]
struct Syscalls {
    io: u64,
    all: u64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn min_max(v: &[f64]) -> (f64, f64) {
    v.iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &x| {
            (lo.min(x), hi.max(x))
        })
}

/// Compact human figures: 12.3M, 456k, 7.89.
fn si(x: f64) -> String {
    if !x.is_finite() {
        "n/a".into()
    } else if x >= 1e6 {
        format!("{:.2}M", x / 1e6)
    } else if x >= 1e3 {
        format!("{:.1}k", x / 1e3)
    } else {
        format!("{x:.2}")
    }
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1e3)
}

// ---------------------------------------------------------------------------------------------
// Syscall counting: `perf stat` attached to this process for the length of one run

const IO_SYSCALLS: [&str; 8] = [
    "read", "write", "readv", "writev", "recvfrom", "sendto", "recvmsg", "sendmsg",
];

struct Perf(Option<Child>);

impl Perf {
    fn start(enabled: bool) -> Perf {
        if !enabled {
            return Perf(None);
        }
        let mut events = vec!["raw_syscalls:sys_enter".to_string()];
        events.extend(
            IO_SYSCALLS
                .iter()
                .map(|s| format!("syscalls:sys_enter_{s}")),
        );
        let child = Command::new("perf")
            .args(["stat", "-x", ",", "-e", &events.join(","), "-p"])
            .arg(std::process::id().to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .ok();
        // perf prints nothing once attached: give it time to open its counters.
        std::thread::sleep(Duration::from_millis(300));
        Perf(child)
    }

    fn stop(self) -> Option<Syscalls> {
        let mut child = self.0?;
        let _ = Command::new("kill")
            .args(["-INT", &child.id().to_string()])
            .status();
        let mut err = String::new();
        child.stderr.take()?.read_to_string(&mut err).ok()?;
        child.wait().ok()?;
        let mut out = Syscalls::default();
        let mut seen = false;
        for line in err.lines() {
            let fields: Vec<&str> = line.split(',').collect();
            let (Some(count), Some(event)) = (fields.first(), fields.get(2)) else {
                continue;
            };
            let Ok(count) = count.parse::<u64>() else {
                continue;
            };
            seen = true;
            if *event == "raw_syscalls:sys_enter" {
                out.all += count;
            } else if event.starts_with("syscalls:sys_enter_") {
                out.io += count;
            }
        }
        seen.then_some(out)
    }
}

// ---------------------------------------------------------------------------------------------
// Shared pieces

fn payloads(size: usize) -> (Bytes, Bytes) {
    let body = Bytes::from(vec![0u8; size]);
    let mut end = vec![0u8; size];
    end[0] = END;
    (body, end.into())
}

/// The raw TCP baseline's messages, framed once up front (a 4-byte big-endian length, then the
/// payload), so that each message is one `write_all` into the `BufWriter`.
fn raw_frames(size: usize) -> (Vec<u8>, Vec<u8>) {
    let (body, end) = payloads(size);
    let frame = |p: &[u8]| {
        let mut v = (size as u32).to_be_bytes().to_vec();
        v.extend_from_slice(p);
        v
    };
    (frame(&body), frame(&end))
}

async fn maybe_proxy(upstream: SocketAddr, on: bool) -> (SocketAddr, Option<ChaosProxy>) {
    if on {
        let proxy = ChaosProxy::start(upstream).await.expect("proxy");
        (proxy.local_addr(), Some(proxy))
    } else {
        (upstream, None)
    }
}

fn proxy_bytes(proxy: &Option<ChaosProxy>) -> Option<(u64, u64)> {
    proxy.as_ref().map(|p| {
        let s = p.stats();
        (s.bytes_up, s.bytes_down)
    })
}

/// Counts length-prefixed frames (4-byte big-endian length, then the body) in a byte stream cut
/// anywhere.
#[derive(Default)]
struct FrameCounter {
    header: [u8; 4],
    header_have: usize,
    body_left: usize,
    frames: u64,
}

impl FrameCounter {
    fn feed(&mut self, mut chunk: &[u8]) {
        while !chunk.is_empty() {
            if self.body_left > 0 {
                let take = self.body_left.min(chunk.len());
                chunk = &chunk[take..];
                self.body_left -= take;
                if self.body_left == 0 {
                    self.frames += 1;
                }
            } else {
                self.header[self.header_have] = chunk[0];
                self.header_have += 1;
                chunk = &chunk[1..];
                if self.header_have == 4 {
                    self.header_have = 0;
                    self.body_left = u32::from_be_bytes(self.header) as usize;
                    if self.body_left == 0 {
                        self.frames += 1;
                    }
                }
            }
        }
    }
}

type BoxFut<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// Counts the server's arrivals until the marked last one: (arrivals, when the last arrived, the
/// server handle back).
async fn count_server(server: ServerHandle, batched: bool) -> (u64, Instant, ServerHandle) {
    let mut n = 0;
    let mut events = Vec::with_capacity(BATCH);
    loop {
        if batched {
            assert!(
                server.next_events(&mut events, BATCH).await > 0,
                "the server stopped"
            );
        } else {
            events.push(server.next_event().await.expect("the server stopped"));
        }
        for event in events.drain(..) {
            if let ServerEvent::Session {
                event: SessionEvent::Received(m),
                ..
            } = event
            {
                n += 1;
                if m.payload[0] == END {
                    return (n, Instant::now(), server);
                }
            }
        }
    }
}

/// One steadfast run on any runtime: `spawn` runs the receiving side on the runtime's executor.
async fn steadfast_pump<J>(
    client: ClientHandle,
    server: ServerHandle,
    size: usize,
    secs: Duration,
    batched: bool,
    spawn: impl FnOnce(BoxFut<(u64, Instant, ServerHandle)>) -> J,
) -> Run
where
    J: Future<Output = (u64, Instant, ServerHandle)>,
{
    assert!(client.connected().await, "the client connected");
    let receiver = spawn(Box::pin(count_server(server, batched)));
    let (body, end) = payloads(size);
    let start = Instant::now();
    let mut sent = 0;
    let mut batch = std::collections::VecDeque::with_capacity(BATCH);
    while start.elapsed() < secs {
        if batched {
            batch.extend(std::iter::repeat_n(&body, BATCH).cloned());
            client
                .send_many(0, Mode::Ordered, &mut batch)
                .await
                .expect("send");
            sent += BATCH as u64;
            continue;
        }
        for _ in 0..CHECK_EVERY {
            client
                .send(0, Mode::Ordered, body.clone())
                .await
                .expect("send");
        }
        sent += CHECK_EVERY;
    }
    client.send(0, Mode::Ordered, end).await.expect("send");
    sent += 1;
    let (n, last, server) = receiver.await;
    assert_eq!(n, sent, "every message arrived once");
    finish(&client, &server, n, last - start, size)
}

/// A steadfast run's result, with both channels' statistics; shuts the server down.
fn finish(
    client: &ClientHandle,
    server: &ServerHandle,
    msgs: u64,
    elapsed: Duration,
    size: usize,
) -> Run {
    let session = client.session().expect("a session");
    let client_stats = ClientHandle::inspect(client, |c| c.channel().stats());
    let server_stats = server
        .inspect_session(session, |s| s.channel(session).map(|c| c.stats()))
        .expect("the session's channel");
    server.shutdown();
    Run {
        msgs,
        elapsed,
        size,
        stats: Some((client_stats, server_stats)),
        ..Run::default()
    }
}

/// Writes length-prefixed messages through a `BufWriter` for `secs`, then a marked last one, and
/// closes: the raw TCP baseline's sender on a futures-io runtime (smol, async-std).
async fn raw_send_futures_io<S: AsyncWrite + Unpin>(stream: S, size: usize, secs: Duration) -> u64 {
    let (body, end) = raw_frames(size);
    let mut w = futures_lite::io::BufWriter::new(stream);
    let start = Instant::now();
    let mut sent = 0;
    while start.elapsed() < secs {
        for _ in 0..CHECK_EVERY {
            w.write_all(&body).await.expect("write");
        }
        sent += CHECK_EVERY;
    }
    w.write_all(&end).await.expect("write");
    w.close().await.expect("close");
    sent + 1
}

async fn raw_count_futures_io<S: AsyncRead + Unpin>(mut stream: S) -> (u64, Instant) {
    let mut buf = vec![0u8; 256 << 10];
    let mut counter = FrameCounter::default();
    loop {
        let n = stream.read(&mut buf).await.expect("read");
        if n == 0 {
            return (counter.frames, Instant::now());
        }
        counter.feed(&buf[..n]);
    }
}

// ---------------------------------------------------------------------------------------------
// Throughput on tokio

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Steadfast,
    Batched,
    Down,
    Raw,
    Framed,
    Mqtt,
}

impl Kind {
    const ALL: [Kind; 6] = [
        Kind::Steadfast,
        Kind::Batched,
        Kind::Down,
        Kind::Raw,
        Kind::Framed,
        Kind::Mqtt,
    ];

    fn key(self) -> &'static str {
        match self {
            Kind::Steadfast => "steadfast",
            Kind::Batched => "batched",
            Kind::Down => "down",
            Kind::Raw => "raw",
            Kind::Framed => "framed",
            Kind::Mqtt => "mqtt",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Steadfast => "steadfast-tokio (acks on)",
            Kind::Batched => "steadfast-tokio, batch calls",
            Kind::Down => "steadfast-tokio server->client, batch",
            Kind::Raw => "raw TcpStream + BufWriter",
            Kind::Framed => "Framed<LengthDelimited> feed+flush",
            Kind::Mqtt => "rumqttc QoS 1 via rumqttd",
        }
    }
}

async fn tokio_steadfast(size: usize, secs: Duration, proxy: bool, batched: bool) -> Run {
    let server = steadfast_tokio::listen("127.0.0.1:0".parse().unwrap(), ServerOptions::new())
        .await
        .expect("listen");
    let (addr, proxy) = maybe_proxy(server.local_addr(), proxy).await;
    let client = steadfast_tokio::connect(ClientOptions::new(vec![addr])).expect("connect");
    let mut run = steadfast_pump(client, server, size, secs, batched, |f| {
        // Spawned now, not when first awaited: the receiver must run while the sender sends.
        let receiver = tokio::spawn(f);
        async move { receiver.await.expect("receiver") }
    })
    .await;
    run.wire = proxy_bytes(&proxy);
    run
}

/// The other direction, the fan-out direction: the server sends to the session with
/// `send_many`, the client counts with `next_events`.
async fn tokio_steadfast_down(size: usize, secs: Duration, proxy: bool) -> Run {
    let server = steadfast_tokio::listen("127.0.0.1:0".parse().unwrap(), ServerOptions::new())
        .await
        .expect("listen");
    let (addr, proxy) = maybe_proxy(server.local_addr(), proxy).await;
    let client = steadfast_tokio::connect(ClientOptions::new(vec![addr])).expect("connect");
    assert!(client.connected().await, "the client connected");
    let session = client.session().expect("a session");
    let receiver = tokio::spawn(count_client(client.clone()));
    let (start, sent) = publish(
        std::slice::from_ref(&server),
        &[(&server, session)],
        size,
        secs,
    )
    .await;
    let (n, last) = receiver.await.expect("receiver");
    assert_eq!(n, sent, "every message arrived once");
    Run {
        wire: proxy_bytes(&proxy),
        ..finish(&client, &server, n, last - start, size)
    }
}

async fn tokio_raw(size: usize, secs: Duration, proxy: bool) -> Run {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (addr, proxy) = maybe_proxy(listener.local_addr().unwrap(), proxy).await;
    let receiver = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.expect("accept");
        let mut buf = vec![0u8; 256 << 10];
        let mut counter = FrameCounter::default();
        loop {
            let n = s.read(&mut buf).await.expect("read");
            if n == 0 {
                return (counter.frames, Instant::now());
            }
            counter.feed(&buf[..n]);
        }
    });
    let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream.set_nodelay(true).unwrap();
    let (body, end) = raw_frames(size);
    let mut w = tokio::io::BufWriter::new(stream);
    let start = Instant::now();
    let mut sent = 0;
    while start.elapsed() < secs {
        for _ in 0..CHECK_EVERY {
            w.write_all(&body).await.expect("write");
        }
        sent += CHECK_EVERY;
    }
    w.write_all(&end).await.expect("write");
    w.shutdown().await.expect("shutdown");
    sent += 1;
    let (n, last) = receiver.await.expect("receiver");
    assert_eq!(n, sent, "every frame arrived");
    Run {
        msgs: n,
        elapsed: last - start,
        size,
        wire: proxy_bytes(&proxy),
        ..Run::default()
    }
}

/// Counts the length-delimited frames `stream` carries until it ends: how many, and when the
/// last arrived.
async fn count_frames(stream: tokio::net::TcpStream) -> (u64, Instant) {
    let mut frames = FramedRead::new(stream, LengthDelimitedCodec::new());
    let mut n = 0u64;
    while let Some(frame) = frames.next().await {
        frame.expect("frame");
        n += 1;
    }
    (n, Instant::now())
}

async fn tokio_framed(size: usize, secs: Duration, proxy: bool) -> Run {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (addr, proxy) = maybe_proxy(listener.local_addr().unwrap(), proxy).await;
    let receiver = tokio::spawn(async move {
        let (s, _) = listener.accept().await.expect("accept");
        count_frames(s).await
    });
    let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream.set_nodelay(true).unwrap();
    let (body, end) = payloads(size);
    let mut sink = FramedWrite::new(stream, LengthDelimitedCodec::new());
    let start = Instant::now();
    let mut sent = 0;
    while start.elapsed() < secs {
        for _ in 0..CHECK_EVERY {
            sink.feed(body.clone()).await.expect("feed");
        }
        sent += CHECK_EVERY;
    }
    sink.feed(end).await.expect("feed");
    SinkExt::<Bytes>::flush(&mut sink).await.expect("flush");
    SinkExt::<Bytes>::close(&mut sink).await.expect("close");
    sent += 1;
    let (n, last) = receiver.await.expect("receiver");
    assert_eq!(n, sent, "every frame arrived");
    Run {
        msgs: n,
        elapsed: last - start,
        size,
        wire: proxy_bytes(&proxy),
        ..Run::default()
    }
}

/// Starts an in-process rumqttd broker (its own threads) on a free loopback port.
fn start_broker() -> SocketAddr {
    use std::collections::HashMap;
    let port = StdListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let connections = rumqttd::ConnectionSettings {
        connection_timeout_ms: 60_000,
        max_payload_size: 1 << 20,
        max_inflight_count: 100,
        auth: None,
        external_auth: None,
        dynamic_filters: true,
    };
    let server = rumqttd::ServerSettings {
        name: "v4-bench".into(),
        listen: addr,
        tls: None,
        next_connection_delay_ms: 1,
        connections,
    };
    let config = rumqttd::Config {
        id: 0,
        router: rumqttd::RouterConfig {
            max_connections: 1000,
            max_outgoing_packet_count: 200,
            // rumqttd's own example configuration: 10 segments of 100 MiB per filter.
            max_segment_size: 100 << 20,
            max_segment_count: 10,
            ..Default::default()
        },
        v4: Some(HashMap::from([("1".to_string(), server)])),
        ..Default::default()
    };
    let mut broker = rumqttd::Broker::new(config);
    std::thread::spawn(move || {
        let _ = broker.start();
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "rumqttd did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    addr
}

fn mqtt_options(id: String, addr: SocketAddr) -> rumqttc::MqttOptions {
    let mut o = rumqttc::MqttOptions::new(id, addr.ip().to_string(), addr.port());
    o.set_max_packet_size(2 << 20, 2 << 20);
    o.set_keep_alive(Duration::from_secs(30));
    o
}

async fn tokio_mqtt(
    broker: SocketAddr,
    run_id: u64,
    size: usize,
    secs: Duration,
    proxy: bool,
) -> Run {
    use rumqttc::{AsyncClient, Event, Packet, QoS};
    let topic = format!("bench/{run_id}");
    let (sub, mut sub_loop) = AsyncClient::new(mqtt_options(format!("sub-{run_id}"), broker), 1024);
    sub.subscribe(&topic, QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    loop {
        if let Event::Incoming(Packet::SubAck(_)) = sub_loop.poll().await.expect("subscriber") {
            break;
        }
    }
    let receiver = tokio::spawn(async move {
        let mut n = 0u64;
        loop {
            if let Event::Incoming(Packet::Publish(p)) = sub_loop.poll().await.expect("subscriber")
            {
                n += 1;
                if p.payload[0] == END {
                    return (n, Instant::now());
                }
            }
        }
    });
    let (addr, proxy) = maybe_proxy(broker, proxy).await;
    let (publisher, mut pub_loop) =
        AsyncClient::new(mqtt_options(format!("pub-{run_id}"), addr), 1024);
    let pump = tokio::spawn(async move { while pub_loop.poll().await.is_ok() {} });
    let (body, end) = payloads(size);
    let start = Instant::now();
    let mut sent = 0;
    while start.elapsed() < secs {
        for _ in 0..CHECK_EVERY {
            publisher
                .publish_bytes(topic.as_str(), QoS::AtLeastOnce, false, body.clone())
                .await
                .expect("publish");
        }
        sent += CHECK_EVERY;
    }
    publisher
        .publish_bytes(topic.as_str(), QoS::AtLeastOnce, false, end)
        .await
        .expect("publish");
    sent += 1;
    let (n, last) = tokio::time::timeout(Duration::from_secs(60), receiver)
        .await
        .expect("the last publish arrives within a minute")
        .expect("receiver");
    // QoS 1 does not make rumqttd lossless: its router keeps each filter's messages in a bounded
    // commitlog (segments), and a subscriber that falls behind by more than that loses the oldest.
    assert!(n <= sent, "no publish arrived twice");
    // Let the last PUBACKs cross the proxy before its counters are read.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let wire = proxy_bytes(&proxy);
    let _ = publisher.disconnect().await;
    let _ = sub.disconnect().await;
    pump.abort();
    Run {
        msgs: n,
        elapsed: last - start,
        size,
        wire,
        lost: sent - n,
        ..Run::default()
    }
}

fn tokio_run(
    rt: &tokio::runtime::Runtime,
    broker: SocketAddr,
    run_id: u64,
    kind: Kind,
    size: usize,
    secs: Duration,
    proxy: bool,
) -> Run {
    rt.block_on(async {
        match kind {
            Kind::Steadfast => tokio_steadfast(size, secs, proxy, false).await,
            Kind::Batched => tokio_steadfast(size, secs, proxy, true).await,
            Kind::Down => tokio_steadfast_down(size, secs, proxy).await,
            Kind::Raw => tokio_raw(size, secs, proxy).await,
            Kind::Framed => tokio_framed(size, secs, proxy).await,
            Kind::Mqtt => tokio_mqtt(broker, run_id, size, secs, proxy).await,
        }
    })
}

// ---------------------------------------------------------------------------------------------
// Fan-out on tokio

/// Fan-out, steadfast: the server sends each 64 B event to every one of `clients` sessions with
/// `send_many`, `BATCH` events per session per call, for `secs`, then a marked last one; each
/// client counts its arrivals with `next_events`. A delivery is one event arriving at one client.
async fn fanout_steadfast(clients: usize, servers: usize, shards: usize, secs: Duration) -> Run {
    let mut options = ServerOptions::new();
    options.shards = shards;
    let mut listening = Vec::with_capacity(servers);
    for _ in 0..servers {
        listening.push(
            steadfast_tokio::listen("127.0.0.1:0".parse().unwrap(), options.clone())
                .await
                .expect("listen"),
        );
    }
    let mut handles = Vec::with_capacity(clients);
    for i in 0..clients {
        let server = &listening[i % servers];
        let client = steadfast_tokio::connect(ClientOptions::new(vec![server.local_addr()]))
            .expect("connect");
        assert!(client.connected().await, "the client connected");
        handles.push(client);
    }
    let sessions: Vec<_> = handles
        .iter()
        .enumerate()
        .map(|(i, c)| (&listening[i % servers], c.session().expect("a session")))
        .collect();
    let receivers: Vec<_> = handles
        .iter()
        .map(|client| tokio::spawn(count_client(client.clone())))
        .collect();
    let (start, sent) = publish(&listening, &sessions, SMALL, secs).await;
    let last = fanout_end(receivers, sent).await;
    for server in &listening {
        server.shutdown();
    }
    Run {
        msgs: sent * clients as u64,
        elapsed: last - start,
        size: SMALL,
        ..Run::default()
    }
}

/// The server's side of the fan-out direction: sends every message of `size` bytes to each of
/// `sessions` with `send_many`, `BATCH` per session per call, for `secs`, then a marked last one
/// to each; takes the server's events (the acks' `Acknowledged`) each round, as an application
/// would. When it started, and how many messages each session was sent.
async fn publish(
    servers: &[ServerHandle],
    sessions: &[(&ServerHandle, steadfast_core::identity::SessionId)],
    size: usize,
    secs: Duration,
) -> (Instant, u64) {
    let (body, end) = payloads(size);
    let start = Instant::now();
    let mut sent = 0u64;
    let mut batch = std::collections::VecDeque::with_capacity(BATCH);
    let mut acks = Vec::new();
    while start.elapsed() < secs {
        for &(server, session) in sessions {
            batch.extend(std::iter::repeat_n(&body, BATCH).cloned());
            server
                .send_many(session, 0, Mode::Ordered, &mut batch)
                .await
                .expect("send");
        }
        sent += BATCH as u64;
        for server in servers {
            server.try_events(&mut acks, usize::MAX);
            acks.clear();
        }
    }
    for &(server, session) in sessions {
        server
            .send(session, 0, Mode::Ordered, end.clone())
            .await
            .expect("send");
    }
    (start, sent + 1)
}

/// Counts a client's arrivals until the marked last one.
async fn count_client(client: ClientHandle) -> (u64, Instant) {
    let mut n = 0u64;
    let mut events = Vec::with_capacity(BATCH);
    loop {
        assert!(
            client.next_events(&mut events, BATCH).await > 0,
            "session over"
        );
        for event in events.drain(..) {
            if let SessionEvent::Received(m) = event {
                n += 1;
                if m.payload[0] == END {
                    return (n, Instant::now());
                }
            }
        }
    }
}

/// Waits for every receiver to count `sent` arrivals; when the last of them got its last one.
async fn fanout_end(receivers: Vec<tokio::task::JoinHandle<(u64, Instant)>>, sent: u64) -> Instant {
    let mut last = None;
    for receiver in receivers {
        let (n, at) = receiver.await.expect("receiver");
        assert_eq!(n, sent, "every event arrived once at every client");
        last = last.max(Some(at));
    }
    last.expect("a client")
}

/// Fan-out, the baseline: the same events to `clients` connections, each through its own
/// `FramedWrite<LengthDelimitedCodec>` fed `BATCH` at a time (flushed when its buffer fills, and
/// at the end); each client counts frames with a `FramedRead`.
async fn fanout_framed(clients: usize, secs: Duration) -> Run {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let receivers: Vec<_> = (0..clients)
        .map(|_| {
            tokio::spawn(async move {
                count_frames(tokio::net::TcpStream::connect(addr).await.expect("connect")).await
            })
        })
        .collect();
    let mut sinks = Vec::with_capacity(clients);
    for _ in 0..clients {
        let (stream, _) = listener.accept().await.expect("accept");
        stream.set_nodelay(true).unwrap();
        sinks.push(FramedWrite::new(stream, LengthDelimitedCodec::new()));
    }
    let (body, end) = payloads(SMALL);
    let start = Instant::now();
    let mut sent = 0u64;
    while start.elapsed() < secs {
        for sink in &mut sinks {
            for _ in 0..BATCH {
                sink.feed(body.clone()).await.expect("feed");
            }
        }
        sent += BATCH as u64;
    }
    for sink in &mut sinks {
        sink.feed(end.clone()).await.expect("feed");
        SinkExt::<Bytes>::close(sink).await.expect("close");
    }
    sent += 1;
    let last = fanout_end(receivers, sent).await;
    Run {
        msgs: sent * clients as u64,
        elapsed: last - start,
        size: SMALL,
        ..Run::default()
    }
}

// ---------------------------------------------------------------------------------------------
// smol and async-std

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OtherRt {
    Smol,
    AsyncStd,
}

/// The executor the smol runs use, for steadfast's tasks and raw TCP's receiver alike: one
/// thread per core (`LOOPBACK_SMOL_THREADS`, default the core count), as tokio has its workers
/// and async-std its pool, where smol's global executor would have one. 0: smol's global executor.
fn smol_executor() -> Option<&'static Arc<smol::Executor<'static>>> {
    static EXECUTOR: OnceLock<Option<Arc<smol::Executor<'static>>>> = OnceLock::new();
    EXECUTOR
        .get_or_init(|| {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            let threads = env_f64("LOOPBACK_SMOL_THREADS", cores as f64) as usize;
            (threads > 0).then(|| {
                let executor = Arc::new(smol::Executor::new());
                for i in 0..threads {
                    let executor = executor.clone();
                    std::thread::Builder::new()
                        .name(format!("smol-bench-{i}"))
                        .spawn(move || smol::block_on(executor.run(smol::future::pending::<()>())))
                        .expect("an executor thread");
                }
                executor
            })
        })
        .as_ref()
}

/// Spawns on the bench's smol executor (or smol's global one).
fn smol_spawn<T: Send + 'static>(
    future: impl Future<Output = T> + Send + 'static,
) -> smol::Task<T> {
    match smol_executor() {
        Some(executor) => executor.spawn(future),
        None => smol::spawn(future),
    }
}

fn other_steadfast(which: OtherRt, size: usize, secs: Duration, batched: bool) -> Run {
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    match which {
        OtherRt::Smol => smol::block_on(async {
            let smol = smol_executor().map_or_else(Smol::global, Smol::on);
            let server = smol
                .listen(any, ServerOptions::new())
                .await
                .expect("listen");
            let client = smol
                .connect(ClientOptions::new(vec![server.local_addr()]))
                .expect("connect");
            steadfast_pump(client, server, size, secs, batched, smol_spawn).await
        }),
        OtherRt::AsyncStd => async_std::task::block_on(async {
            let server = steadfast_async_std::listen(any, ServerOptions::new())
                .await
                .expect("listen");
            let client =
                steadfast_async_std::connect(ClientOptions::new(vec![server.local_addr()]))
                    .expect("connect");
            steadfast_pump(client, server, size, secs, batched, async_std::task::spawn).await
        }),
    }
}

fn other_raw(which: OtherRt, size: usize, secs: Duration) -> Run {
    let (sent, n, elapsed) = match which {
        OtherRt::Smol => smol::block_on(async {
            let listener = smol::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let receiver = smol_spawn(async move {
                let (s, _) = listener.accept().await.expect("accept");
                raw_count_futures_io(s).await
            });
            let stream = smol::net::TcpStream::connect(addr).await.expect("connect");
            stream.set_nodelay(true).unwrap();
            let start = Instant::now();
            let sent = raw_send_futures_io(stream, size, secs).await;
            let (n, last) = receiver.await;
            (sent, n, last - start)
        }),
        OtherRt::AsyncStd => async_std::task::block_on(async {
            let listener = async_std::net::TcpListener::bind("127.0.0.1:0")
                .await
                .unwrap();
            let addr = listener.local_addr().unwrap();
            let receiver = async_std::task::spawn(async move {
                let (s, _) = listener.accept().await.expect("accept");
                raw_count_futures_io(s).await
            });
            let stream = async_std::net::TcpStream::connect(addr)
                .await
                .expect("connect");
            stream.set_nodelay(true).unwrap();
            let start = Instant::now();
            let sent = raw_send_futures_io(stream, size, secs).await;
            let (n, last) = receiver.await;
            (sent, n, last - start)
        }),
    };
    assert_eq!(n, sent, "every frame arrived");
    Run {
        msgs: n,
        elapsed,
        size,
        ..Run::default()
    }
}

// ---------------------------------------------------------------------------------------------
// Latency at fixed open-loop rates

/// The pacing thread: message `i` is due at `epoch + i / rate`; it carries that due time (nanos
/// since `epoch`) and its index, whatever the moment it actually goes out.
fn pace(rate: u64, total: u64, epoch: Instant, mut send: impl FnMut([u8; SMALL])) {
    let period = 1e9 / rate as f64;
    // Spinning keeps the schedule to the microsecond but takes one of the machine's cores from the
    // runtime under test; sleeping leaves the cores to it and sends a little late (which counts).
    let sleeps = std::env::var("LOOPBACK_PACER").is_ok_and(|v| v == "sleep");
    for i in 0..total {
        let due = (i as f64 * period) as u64;
        loop {
            let now = epoch.elapsed().as_nanos() as u64;
            if now >= due {
                break;
            }
            if sleeps {
                std::thread::sleep(Duration::from_nanos(due - now));
            } else if due - now > 200_000 {
                std::thread::sleep(Duration::from_nanos(due - now - 100_000));
            } else {
                std::thread::yield_now();
            }
        }
        let mut m = [0u8; SMALL];
        m[..8].copy_from_slice(&due.to_le_bytes());
        m[8..16].copy_from_slice(&i.to_le_bytes());
        send(m);
    }
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1_000, 60_000_000_000, 3).expect("histogram bounds")
}

/// Records one round trip of a message stamped by [`pace`], unless it is warm-up.
fn record(h: &mut Histogram<u64>, m: &[u8], epoch: Instant, warmup: u64) {
    let due = u64::from_le_bytes(m[..8].try_into().unwrap());
    let index = u64::from_le_bytes(m[8..16].try_into().unwrap());
    if index >= warmup {
        let now = epoch.elapsed().as_nanos() as u64;
        h.saturating_record(now.saturating_sub(due).max(1_000));
    }
}

async fn latency_steadfast(rate: u64, secs: Duration) -> Histogram<u64> {
    let server = steadfast_tokio::listen("127.0.0.1:0".parse().unwrap(), ServerOptions::new())
        .await
        .expect("listen");
    let client =
        steadfast_tokio::connect(ClientOptions::new(vec![server.local_addr()])).expect("connect");
    assert!(client.connected().await);
    let echo = server.clone();
    let echo = tokio::spawn(async move {
        while let Some(event) = echo.next_event().await {
            if let ServerEvent::Session {
                session,
                event: SessionEvent::Received(m),
            } = event
            {
                let mut payload = m.payload;
                loop {
                    match echo.reply(session, m.seq, payload) {
                        Ok(_) => break,
                        Err(SendError::QueueFull(back)) => {
                            payload = back;
                            tokio::task::yield_now().await;
                        }
                        Err(e) => panic!("reply: {e}"),
                    }
                }
            }
        }
    });
    let total = (rate as f64 * secs.as_secs_f64()) as u64;
    let warmup = total / 10;
    let epoch = Instant::now();
    let sender = client.clone();
    let pacer = std::thread::spawn(move || {
        pace(rate, total, epoch, |m| {
            let mut p = Bytes::copy_from_slice(&m);
            loop {
                match sender.try_send(0, Mode::Ordered, p) {
                    Ok(_) => break,
                    Err(SendError::QueueFull(back)) => {
                        p = back;
                        std::thread::yield_now();
                    }
                    Err(e) => panic!("send: {e}"),
                }
            }
        })
    });
    let mut h = histogram();
    let mut got = 0;
    while got < total {
        match client.next_event().await {
            Some(SessionEvent::Reply { payload, .. }) => {
                record(&mut h, &payload, epoch, warmup);
                got += 1;
            }
            Some(_) => {}
            None => panic!("the session ended"),
        }
    }
    pacer.join().expect("pacer");
    server.shutdown();
    echo.abort();
    h
}

/// Raw TCP ping-pong. The pacer hands each message to a writer task, or with `pacer_writes`
/// writes it to the socket itself, as steadfast's sends do while the connection is idle.
async fn latency_raw(rate: u64, secs: Duration, pacer_writes: bool) -> Histogram<u64> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let echo = tokio::spawn(async move {
        let (s, _) = listener.accept().await.expect("accept");
        s.set_nodelay(true).unwrap();
        let (mut r, mut w) = s.into_split();
        let _ = tokio::io::copy(&mut r, &mut w).await;
    });
    let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream.set_nodelay(true).unwrap();
    let total = (rate as f64 * secs.as_secs_f64()) as u64;
    let warmup = total / 10;
    let epoch = Instant::now();
    let (r, writer, pacer) = if pacer_writes {
        let std = stream.into_std().expect("std stream");
        // A second handle on the socket for the pacer's thread; the socket stays non-blocking.
        let w = std.try_clone().expect("clone");
        let r = tokio::net::TcpStream::from_std(std).expect("tokio stream");
        let pacer = std::thread::spawn(move || {
            pace(rate, total, epoch, |m| {
                let mut at = 0;
                while at < m.len() {
                    match std::io::Write::write(&mut &w, &m[at..]) {
                        Ok(n) => at += n,
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            std::thread::yield_now()
                        }
                        Err(e) => panic!("write: {e}"),
                    }
                }
            });
        });
        (Box::new(r) as Reader, None, pacer)
    } else {
        let (r, mut w) = stream.into_split();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<[u8; SMALL]>();
        // The writer gathers whatever the pacer queued into one write, as steadfast's driver
        // does when its sends find it busy.
        let writer = tokio::spawn(async move {
            let mut buf = Vec::with_capacity(64 << 10);
            while let Some(m) = rx.recv().await {
                buf.extend_from_slice(&m);
                while let Ok(m) = rx.try_recv() {
                    buf.extend_from_slice(&m);
                }
                w.write_all(&buf).await.expect("write");
                buf.clear();
            }
        });
        let pacer = std::thread::spawn(move || {
            pace(rate, total, epoch, |m| tx.send(m).expect("writer"));
        });
        (Box::new(r) as Reader, Some(writer), pacer)
    };
    let mut h = histogram();
    let mut r = tokio::io::BufReader::new(r);
    let mut m = [0u8; SMALL];
    for _ in 0..total {
        r.read_exact(&mut m).await.expect("read");
        record(&mut h, &m, epoch, warmup);
    }
    pacer.join().expect("pacer");
    if let Some(writer) = writer {
        writer.await.expect("writer");
    }
    echo.abort();
    h
}

type Reader = Box<dyn tokio::io::AsyncRead + Unpin + Send>;

// ---------------------------------------------------------------------------------------------
// Recovery through the chaos proxy

#[derive(Debug, Clone, Copy)]
struct Recovery {
    /// From the fault to the client's `Disconnected`.
    detect: Duration,
    /// From the path's restoration to the client's resumed `Connected`.
    reconnect: Duration,
    /// From the path's restoration to the first message the server received after it.
    first_delivery: Duration,
}

/// The first arrival later than `t`.
async fn arrival_after(
    arrived: &mut tokio::sync::mpsc::UnboundedReceiver<Instant>,
    t: Instant,
    limit: Duration,
) -> Instant {
    loop {
        let at = tokio::time::timeout(limit, arrived.recv())
            .await
            .expect("a delivery in time")
            .expect("the server runs");
        if at > t {
            return at;
        }
    }
}

async fn recovery(partition: Option<Duration>) -> Recovery {
    use tokio::sync::mpsc::unbounded_channel;
    let server = steadfast_tokio::listen("127.0.0.1:0".parse().unwrap(), ServerOptions::new())
        .await
        .expect("listen");
    let proxy = ChaosProxy::start(server.local_addr()).await.expect("proxy");
    let client =
        steadfast_tokio::connect(ClientOptions::new(vec![proxy.local_addr()])).expect("connect");
    assert!(client.connected().await);
    let (arrived_tx, mut arrived) = unbounded_channel::<Instant>();
    let receiver = server.clone();
    let arrivals = tokio::spawn(async move {
        while let Some(event) = receiver.next_event().await {
            if let ServerEvent::Session {
                event: SessionEvent::Received(_),
                ..
            } = event
                && arrived_tx.send(Instant::now()).is_err()
            {
                return;
            }
        }
    });
    let (events_tx, mut events) = unbounded_channel::<(bool, Instant)>();
    let watcher = client.clone();
    let watch = tokio::spawn(async move {
        while let Some(event) = watcher.next_event().await {
            let up = match event {
                SessionEvent::Disconnected { .. } => false,
                SessionEvent::Connected { .. } => true,
                _ => continue,
            };
            if events_tx.send((up, Instant::now())).is_err() {
                return;
            }
        }
    });
    let sender = client.clone();
    let traffic = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(2));
        loop {
            tick.tick().await;
            let _ = sender.try_send(0, Mode::Ordered, Bytes::from_static(&[0u8; SMALL]));
        }
    });
    let limit = Duration::from_secs(30);
    // Traffic flows before the fault.
    let now = Instant::now();
    arrival_after(&mut arrived, now, limit).await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    let fault_at = Instant::now();
    let target = if partition.is_some() {
        Target::AllAndNew
    } else {
        Target::All
    };
    assert_eq!(
        proxy.apply(target, Fault::Blackhole),
        1,
        "the fault hit the session"
    );
    let detected = loop {
        let (up, at) = tokio::time::timeout(limit, events.recv())
            .await
            .expect("a disconnect in time")
            .expect("events");
        if !up {
            break at;
        }
    };
    let restored = match partition {
        Some(p) => {
            tokio::time::sleep_until((fault_at + p).into()).await;
            proxy.heal(Target::AllAndNew);
            Instant::now()
        }
        // New connections were never blocked: the path is back as soon as the client looks.
        None => detected,
    };
    let first = arrival_after(&mut arrived, restored, limit).await;
    let reconnected = loop {
        let (up, at) = tokio::time::timeout(limit, events.recv())
            .await
            .expect("a resume in time")
            .expect("events");
        if up && at > restored {
            break at;
        }
    };
    traffic.abort();
    watch.abort();
    arrivals.abort();
    server.shutdown();
    Recovery {
        detect: detected - fault_at,
        reconnect: reconnected - restored,
        first_delivery: first - restored,
    }
}

// ---------------------------------------------------------------------------------------------
// The run

/// The median over `runs` of the process's CPU time per message delivered (ns).
fn cpu_per_msg(runs: &[Run]) -> f64 {
    median(
        runs.iter()
            .filter_map(|r| r.cpu.map(|c| c.as_nanos() as f64 / r.msgs as f64))
            .collect(),
    )
}

fn throughput_row(label: &str, runs: &[Run]) -> String {
    let rates: Vec<f64> = runs.iter().map(Run::rate).collect();
    let mbs: Vec<f64> = runs.iter().map(Run::mb_per_sec).collect();
    let (lo, hi) = min_max(&rates);
    let per_msg = |f: fn(&Syscalls) -> u64| {
        median(
            runs.iter()
                .filter_map(|r| r.syscalls.map(|s| f(&s) as f64 / r.msgs as f64))
                .collect(),
        )
    };
    let io = per_msg(|s| s.io);
    let all = per_msg(|s| s.all);
    let cpu = cpu_per_msg(runs);
    let acks = median(
        runs.iter()
            .filter_map(|r| r.stats)
            .map(|(c, s)| {
                (c.acks_sent + s.acks_sent) as f64 / (c.frames_sent + s.frames_sent) as f64
            })
            .collect(),
    );
    let share = if acks.is_finite() {
        format!("{:.2}%", acks * 100.0)
    } else {
        "-".into()
    };
    let sys = |x: f64| {
        if x.is_finite() {
            format!("{x:.4}")
        } else {
            "n/a".into()
        }
    };
    let lost: u64 = runs.iter().map(|r| r.lost).sum();
    let sent: u64 = runs.iter().map(|r| r.msgs + r.lost).sum();
    let lost = if lost > 0 {
        format!("  LOST {lost} of {sent} sent")
    } else {
        String::new()
    };
    format!(
        "  {label:<36} {:>9} {:>19} {:>10.1} {:>11.0} {:>9} {:>9} {:>8}{lost}",
        si(median(rates)),
        format!("({}–{})", si(lo), si(hi)),
        median(mbs),
        cpu,
        sys(io),
        sys(all),
        share
    )
}

const THROUGHPUT_HEADER: &str = "  implementation                        msgs/s   (min–max of runs)       MB/s  cpu ns/msg  io sc/msg  all sc/msg  acks/frames";

fn main() {
    let settings = Settings::from_env();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(settings.workers)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let broker = start_broker();
    // Start the other runtimes' executor threads now, so perf attaches to them too.
    smol::block_on(smol_spawn(async {}));
    async_std::task::block_on(async_std::task::spawn(async {}));
    let perf = settings.perf && Perf::start(true).stop().is_some();
    println!(
        "loopback harness: {} cpus, {} tokio workers, throughput runs of {:?} x {}, syscall counts {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        settings.workers,
        settings.secs,
        settings.reps,
        if perf {
            "by perf stat"
        } else {
            "off (perf unavailable or LOOPBACK_PERF=0)"
        }
    );
    let mut run_id = 0u64;
    let mut medians: Vec<((Kind, usize), f64)> = Vec::new();

    if settings.wants("throughput") {
        println!(
            "\n== throughput, one direction, client -> server ({} runs each; median)",
            settings.reps
        );
        println!("{THROUGHPUT_HEADER}");
        for &size in &settings.sizes {
            println!("  -- {size} B messages");
            for kind in Kind::ALL
                .into_iter()
                .filter(|k| settings.kinds.iter().any(|n| n == k.key()))
            {
                // A short warm-up run first (connections, allocator, broker segments).
                run_id += 1;
                tokio_run(
                    &rt,
                    broker,
                    run_id,
                    kind,
                    size,
                    Duration::from_millis(200),
                    false,
                );
                let mut runs = Vec::new();
                for _ in 0..settings.reps {
                    run_id += 1;
                    let counter = Perf::start(perf);
                    let mut run = timed_cpu(|| {
                        tokio_run(&rt, broker, run_id, kind, size, settings.secs, false)
                    });
                    run.syscalls = counter.stop();
                    runs.push(run);
                }
                medians.push(((kind, size), median(runs.iter().map(Run::rate).collect())));
                println!("{}", throughput_row(kind.name(), &runs));
            }
        }
        let get = |k, s| {
            medians
                .iter()
                .find(|(key, _)| *key == (k, s))
                .map_or(f64::NAN, |(_, v)| *v)
        };
        println!("\n  ratios of medians (goal):");
        // (label, ours, theirs, size, decimals, goal): the output keeps each row's own format.
        #[rustfmt::skip]
        let ratios = [
            ("64 B   steadfast / Framed<LengthDelimited> ", Kind::Steadfast, Kind::Framed, SMALL, 2, "  (>= 1.0)"),
            ("64 B   batch calls / Framed<LengthDelimited>", Kind::Batched, Kind::Framed, SMALL, 2, "  (>= 1.0)"),
            ("64 B   server->client batch / Framed        ", Kind::Down, Kind::Framed, SMALL, 2, ""),
            ("64 B   steadfast / rumqttc QoS 1           ", Kind::Steadfast, Kind::Mqtt, SMALL, 1, "  (>= 10)"),
            ("64 B   steadfast / raw TCP + BufWriter     ", Kind::Steadfast, Kind::Raw, SMALL, 3, ""),
            ("64 KiB steadfast / raw TCP + BufWriter     ", Kind::Steadfast, Kind::Raw, LARGE, 2, "  (>= 0.9)"),
            ("64 KiB steadfast / Framed<LengthDelimited> ", Kind::Steadfast, Kind::Framed, LARGE, 2, ""),
        ];
        for (label, ours, theirs, size, decimals, goal) in ratios {
            let ratio = get(ours, size) / get(theirs, size);
            println!("    {label} {ratio:.decimals$}{goal}");
        }
    }

    if settings.wants("fanout") {
        let clients = settings.fanout_clients;
        println!(
            "\n== fan-out, server -> {clients} clients, 64 B events, {BATCH} per call per client ({} runs each; median)",
            settings.reps
        );
        println!(
            "  implementation                    deliveries/s   (min–max of runs)  cpu ns/delivery"
        );
        let shards = settings.fanout_shards;
        let split = format!("steadfast-tokio, {shards} shards");
        let mut rates = Vec::new();
        for (name, key) in [
            ("steadfast-tokio, send_many", "steadfast"),
            (split.as_str(), "split"),
            ("Framed<LengthDelimited> feed", "framed"),
        ] {
            if !settings.fanout_kinds.iter().any(|k| k == key) {
                rates.push(f64::NAN);
                continue;
            }
            let parts = if key == "split" { shards } else { 1 };
            let go = |secs| {
                rt.block_on(async {
                    match key {
                        "framed" => fanout_framed(clients, secs).await,
                        _ => fanout_steadfast(clients, settings.fanout_servers, parts, secs).await,
                    }
                })
            };
            go(Duration::from_millis(200));
            let runs: Vec<Run> = (0..settings.reps)
                .map(|_| timed_cpu(|| go(settings.secs)))
                .collect();
            let r: Vec<f64> = runs.iter().map(Run::rate).collect();
            let (lo, hi) = min_max(&r);
            let rate = median(r);
            rates.push(rate);
            println!(
                "  {name:<32} {:>12} {:>19} {:>16.0}",
                si(rate),
                format!("({}–{})", si(lo), si(hi)),
                cpu_per_msg(&runs),
            );
        }
        println!(
            "    fan-out steadfast / Framed<LengthDelimited>: {:.2}; with {shards} shards {:.2}",
            rates[0] / rates[2],
            rates[1] / rates[2]
        );
    }

    if settings.wants("wire") {
        println!(
            "\n== bytes on the wire per payload byte, through the chaos proxy ({:?} runs; both directions)",
            settings.wire_secs
        );
        println!(
            "  implementation                       64 B msgs   64 KiB msgs   (up / down bytes at 64 B)"
        );
        for kind in Kind::ALL {
            let mut cells = Vec::new();
            let mut detail = String::new();
            for size in [SMALL, LARGE] {
                run_id += 1;
                let run = tokio_run(&rt, broker, run_id, kind, size, settings.wire_secs, true);
                let (up, down) = run.wire.unwrap_or_default();
                let payload = run.msgs as f64 * size as f64;
                cells.push(format!("{:.4}", (up + down) as f64 / payload));
                if size == SMALL {
                    detail = format!("{} / {}", si(up as f64), si(down as f64));
                }
            }
            println!(
                "  {:<36} {:>9} {:>13}   ({detail})",
                kind.name(),
                cells[0],
                cells[1]
            );
        }
    }

    if settings.wants("latency") {
        println!(
            "\n== round-trip latency, 64 B, fixed open-loop rate ({:?} per run, first 10% warm-up; \
             median of {} runs, p99 range in brackets)",
            settings.latency_secs, settings.latency_reps
        );
        println!(
            "  implementation            rate/s      p50        p99      p99.9        max   samples/run  p99 of each run"
        );
        // Each with the name `LOOPBACK_LATENCY_IMPLS` picks it by.
        const IMPLS: [(&str, &str); 3] = [
            ("steadfast", "steadfast-tokio"),
            ("raw", "raw TCP ping-pong"),
            ("pacer", "raw TCP, pacer writes"),
        ];
        for &rate in &settings.rates {
            // Per implementation, per run: p50, p99, p99.9, max (µs), samples. They alternate
            // run by run, so that all meet the same spells of a noisy machine.
            let mut runs: [Vec<[f64; 5]>; 3] = [Vec::new(), Vec::new(), Vec::new()];
            for _ in 0..settings.latency_reps {
                for (i, (key, _)) in IMPLS.into_iter().enumerate() {
                    if !settings.latency_impls.iter().any(|k| k == key) {
                        continue;
                    }
                    let secs = settings.latency_secs;
                    let h = rt.block_on(async {
                        match i {
                            0 => latency_steadfast(rate, secs).await,
                            1 => latency_raw(rate, secs, false).await,
                            _ => latency_raw(rate, secs, true).await,
                        }
                    });
                    let us = |q: f64| h.value_at_quantile(q) as f64 / 1e3;
                    runs[i].push([
                        us(0.5),
                        us(0.99),
                        us(0.999),
                        h.max() as f64 / 1e3,
                        h.len() as f64,
                    ]);
                }
            }
            let mut p99s = Vec::new();
            for ((_, name), runs) in IMPLS.into_iter().zip(&runs) {
                let col = |i: usize| median(runs.iter().map(|r| r[i]).collect());
                p99s.push(col(1));
                if runs.is_empty() {
                    continue;
                }
                println!(
                    "  {name:<24} {:>7} {:>8.1}µs {:>8.1}µs {:>8.1}µs {:>8.1}µs {:>12}  [{}]",
                    si(rate as f64),
                    col(0),
                    col(1),
                    col(2),
                    col(3),
                    col(4),
                    runs.iter()
                        .map(|r| format!("{:.0}", r[1]))
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
            for (raw, what) in [(1, "raw TCP"), (2, "raw TCP, pacer writes")] {
                if runs[0].is_empty() || runs[raw].is_empty() {
                    continue;
                }
                let pairs: Vec<f64> = runs[0]
                    .iter()
                    .zip(&runs[raw])
                    .map(|(ours, raw)| ours[1] / raw[1])
                    .collect();
                let (lo, hi) = min_max(&pairs);
                println!(
                    "    p99 steadfast / {what} at {}/s: {:.2} (goal <= 1.2); run by run {:.2} (median), {lo:.2}–{hi:.2}",
                    si(rate as f64),
                    p99s[0] / p99s[raw],
                    median(pairs.clone()),
                );
            }
        }
    }

    if settings.wants("runtimes") {
        println!(
            "\n== other runtimes, one direction ({} runs each; median); smol on {}",
            settings.reps,
            if smol_executor().is_some() {
                "an executor of LOOPBACK_SMOL_THREADS (default: one per core) threads"
            } else {
                "its global executor"
            }
        );
        println!("{THROUGHPUT_HEADER}");
        for &size in &settings.sizes {
            println!("  -- {size} B messages");
            for (which, name) in [(OtherRt::Smol, "smol"), (OtherRt::AsyncStd, "async-std")] {
                if !settings.runtimes.iter().any(|r| r == name) {
                    continue;
                }
                let mut rates = Vec::new();
                // Per-message calls, batch calls, raw TCP.
                for variant in 0..3 {
                    let go = |secs| match variant {
                        0 => other_steadfast(which, size, secs, false),
                        1 => other_steadfast(which, size, secs, true),
                        _ => other_raw(which, size, secs),
                    };
                    go(Duration::from_millis(200));
                    let mut runs = Vec::new();
                    for _ in 0..settings.reps {
                        let counter = Perf::start(perf);
                        let mut run = timed_cpu(|| go(settings.secs));
                        run.syscalls = counter.stop();
                        runs.push(run);
                    }
                    rates.push(median(runs.iter().map(Run::rate).collect()));
                    let label = match variant {
                        0 => format!("steadfast-{name}"),
                        1 => format!("steadfast-{name}, batch calls"),
                        _ => format!("raw {name} TcpStream + BufWriter"),
                    };
                    println!("{}", throughput_row(&label, &runs));
                }
                println!(
                    "    {size} B steadfast-{name} / raw {name}: {:.3}; with batch calls {:.3} (goal >= 0.85)",
                    rates[0] / rates[2],
                    rates[1] / rates[2]
                );
            }
        }
    }

    if settings.wants("recovery") {
        println!("\n== recovery through the chaos proxy, default configuration");
        let mut blackholes = Vec::new();
        for _ in 0..settings.recovery_reps {
            blackholes.push(rt.block_on(recovery(None)));
        }
        let med = |f: fn(&Recovery) -> Duration, v: &[Recovery]| {
            let m = median(v.iter().map(|r| f(r).as_secs_f64()).collect());
            Duration::from_secs_f64(m)
        };
        println!(
            "  (a) blackhole on the connection, {} runs: detection (fault -> Disconnected) median {} [{}]; \
             detection -> resumed Connected median {}; detection -> first delivery median {} [{}]",
            blackholes.len(),
            ms(med(|r| r.detect, &blackholes)),
            blackholes
                .iter()
                .map(|r| ms(r.detect))
                .collect::<Vec<_>>()
                .join(", "),
            ms(med(|r| r.reconnect, &blackholes)),
            ms(med(|r| r.first_delivery, &blackholes)),
            blackholes
                .iter()
                .map(|r| ms(r.first_delivery))
                .collect::<Vec<_>>()
                .join(", "),
        );
        let p = rt.block_on(recovery(Some(settings.partition)));
        println!(
            "  (b) partition of {:?} (new connections blackholed too), then healed: detection {}; \
             heal -> resumed Connected {}; heal -> first delivery {}",
            settings.partition,
            ms(p.detect),
            ms(p.reconnect),
            ms(p.first_delivery)
        );
    }
}
