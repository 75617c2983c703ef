//! The field report's hub (seeds/000): clients call a server, each call fans events out to every
//! other client, and each receiver replies with a payload, from a plain worker thread, while its CPU
//! may be saturated and its network broken under it.
//!
//! ```text
//! hub server --listen ADDR [--seconds S]
//! hub client --connect ADDR[,ADDR...] --id NAME [--store DIR] [--burn-cpu] [--seconds S]
//! hub demo --clients N --seconds S [--chaos] [--seed S] [--burn-cpu] [--call-ms MS] [--payload BYTES] [--shards N]
//! ```
//!
//! Every run ends with one line `SUMMARY {json}`. `lost` and `duplicates_delivered` are the
//! application's own count, from message ids, never the library's counters: each event carries its
//! number in its destination session's sequence, each call its number in its caller's sequence. In
//! `demo` the server's and clients' ledgers are compared directly; a lone `server` or `client` can
//! only see gaps below the highest number it received. The exit status is non-zero if anything was
//! lost or duplicated.
#![forbid(unsafe_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use steadfast_tokio::chaos::{ChaosProxy, Direction, Fault, Schedule, Target};
use steadfast_tokio::core::Seq;
use steadfast_tokio::core::identity::SessionId;
use steadfast_tokio::{
    ClientHandle, ClientOptions, Mode, ServerEvent, ServerHandle, ServerOptions, SessionEvent,
};

const USAGE: &str = "\
hub: the field report's workload over steadfast

USAGE:
    hub server --listen ADDR [--seconds S] [--shards N]
    hub client --connect ADDR[,ADDR...] --id NAME [--store DIR] [--burn-cpu] [--seconds S]
    hub demo --clients N --seconds S [--chaos] [--seed S] [--burn-cpu] [--shards N]

OPTIONS:
    --call-ms MS      mean time between one client's calls (default 100)
    --payload BYTES   size of each event's and each reply's filler (default 64)
    --chaos           (demo) route clients through a chaos proxy breaking connections on a seeded schedule
    --seed S          (demo) the chaos schedule's seed (default 1)
    --burn-cpu        keep every core busy with application work while the clients run
    --shards N        (server, demo) split the server's state into N parts, each behind its own
                      lock (default 1; see ServerOptions::shards)
    --store DIR       (client) make the session durable in DIR, with the application's ledger of
                      delivered events beside it: a client killed and restarted on the same DIR
                      resumes its session, and lost/duplicates count across its restarts
";

/// The streams of the hub's protocol.
const CALLS: u64 = 0;
const EVENTS: u64 = 1;

#[derive(Debug, Clone)]
struct Args {
    cmd: String,
    listen: Option<SocketAddr>,
    connect: Vec<SocketAddr>,
    id: String,
    clients: usize,
    seconds: Option<u64>,
    chaos: bool,
    seed: u64,
    burn_cpu: bool,
    call_ms: u64,
    payload: usize,
    store: Option<std::path::PathBuf>,
    shards: usize,
}

fn parse() -> Result<Args, String> {
    let mut it = std::env::args().skip(1);
    let cmd = it.next().ok_or("a subcommand is needed")?;
    let mut a = Args {
        cmd,
        listen: None,
        connect: Vec::new(),
        id: format!("client-{}", std::process::id()),
        clients: 8,
        seconds: None,
        chaos: false,
        seed: 1,
        burn_cpu: false,
        call_ms: 100,
        payload: 64,
        store: None,
        shards: 1,
    };
    while let Some(flag) = it.next() {
        let mut value = |name: &str| it.next().ok_or(format!("{name} needs a value"));
        let num = |name: &str, v: String| v.parse::<u64>().map_err(|e| format!("{name} {v}: {e}"));
        match flag.as_str() {
            "--listen" => {
                let v = value("--listen")?;
                a.listen = Some(v.parse().map_err(|e| format!("--listen {v}: {e}"))?);
            }
            "--connect" => {
                for v in value("--connect")?.split(',') {
                    a.connect
                        .push(v.parse().map_err(|e| format!("--connect {v}: {e}"))?);
                }
            }
            "--id" => a.id = value("--id")?,
            "--store" => a.store = Some(value("--store")?.into()),
            "--clients" => a.clients = num("--clients", value("--clients")?)? as usize,
            "--seconds" => a.seconds = Some(num("--seconds", value("--seconds")?)?),
            "--seed" => a.seed = num("--seed", value("--seed")?)?,
            "--call-ms" => a.call_ms = num("--call-ms", value("--call-ms")?)?.max(1),
            "--payload" => a.payload = num("--payload", value("--payload")?)? as usize,
            "--shards" => a.shards = num("--shards", value("--shards")?)?.max(1) as usize,
            "--chaos" => a.chaos = true,
            "--burn-cpu" => a.burn_cpu = true,
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown option {other}")),
        }
    }
    Ok(a)
}

// ---------------------------------------------------------------------------------------------
// The messages: a kind byte, big-endian numbers, then filler.

fn call_msg(name: &str, call: u64) -> Bytes {
    let mut b = BytesMut::with_capacity(10 + name.len());
    b.put_u8(b'C');
    b.put_u64(call);
    b.put_slice(name.as_bytes());
    b.freeze()
}

fn numbered(kind: u8, n: u64, filler: usize) -> Bytes {
    let mut b = BytesMut::with_capacity(9 + filler);
    b.put_u8(kind);
    b.put_u64(n);
    b.put_bytes(0x5a, filler);
    b.freeze()
}

/// The kind and number of a hub message.
fn parse_msg(b: &[u8]) -> Option<(u8, u64, &[u8])> {
    let (&kind, rest) = b.split_first()?;
    let n = u64::from_be_bytes(rest.get(..8)?.try_into().ok()?);
    Some((kind, n, &rest[8..]))
}

// ---------------------------------------------------------------------------------------------
// The server.

#[derive(Debug, Default, Clone)]
struct ServerStats {
    calls: u64,
    call_dups: u64,
    events_sent: u64,
    backpressured: u64,
    replies: u64,
    reply_mismatches: u64,
    sessions: u64,
    sessions_lost: u64,
    handed_back: u64,
    /// Events sent to each session: its ledger's length.
    sent_to: BTreeMap<SessionId, u64>,
    /// Call numbers received, per caller name.
    calls_from: BTreeMap<String, BTreeSet<u64>>,
}

impl ServerStats {
    /// Calls missing below the highest number received from each caller.
    fn call_gaps(&self) -> u64 {
        self.calls_from
            .values()
            .map(|s| s.last().map_or(0, |m| m + 1) - s.len() as u64)
            .sum()
    }
}

#[derive(Default)]
struct SessionState {
    next_event: u64,
    /// Sent events awaiting a reply: sequence number to event number.
    awaiting: BTreeMap<Seq, u64>,
}

async fn run_server(server: ServerHandle, stats: Arc<Mutex<ServerStats>>, filler: usize) {
    let mut sessions: BTreeMap<SessionId, SessionState> = BTreeMap::new();
    while let Some(event) = server.next_event().await {
        let ServerEvent::Session { session, event } = event else {
            continue;
        };
        let mut st = stats.lock().unwrap();
        match event {
            SessionEvent::Connected { resumed: false, .. } => {
                st.sessions += 1;
                sessions.entry(session).or_default();
            }
            SessionEvent::Received(m) if m.stream == CALLS => {
                let Some((b'C', call, name)) = parse_msg(&m.payload) else {
                    continue;
                };
                st.calls += 1;
                let name = String::from_utf8_lossy(name).into_owned();
                if !st.calls_from.entry(name).or_default().insert(call) {
                    st.call_dups += 1;
                }
                // The call fans out to every other client.
                let mut fanned = 0;
                for (&to, s) in sessions.iter_mut().filter(|(id, _)| **id != session) {
                    let n = s.next_event;
                    match server.try_send(to, EVENTS, Mode::Ordered, numbered(b'E', n, filler)) {
                        Ok(sent) => {
                            s.next_event += 1;
                            s.awaiting.insert(sent.seq().unwrap_or_default(), n);
                            *st.sent_to.entry(to).or_default() += 1;
                            st.events_sent += 1;
                            fanned += 1;
                        }
                        Err(_) => st.backpressured += 1,
                    }
                }
                let _ = server.reply(session, m.seq, numbered(b'D', fanned, 0));
            }
            SessionEvent::Reply { to, payload } => {
                st.replies += 1;
                let expected = sessions
                    .get_mut(&session)
                    .and_then(|s| s.awaiting.remove(&to));
                let got = parse_msg(&payload).map(|(_, n, _)| n);
                if expected.is_none() || expected != got {
                    st.reply_mismatches += 1;
                }
            }
            SessionEvent::SessionLost { unacknowledged, .. } => {
                st.sessions_lost += 1;
                st.handed_back += unacknowledged.len() as u64;
                sessions.remove(&session);
            }
            SessionEvent::Closed { .. } => {
                sessions.remove(&session);
            }
            _ => {}
        }
    }
}

// ---------------------------------------------------------------------------------------------
// A client.

#[derive(Debug, Default, Clone)]
struct ClientStats {
    calls_sent: u64,
    call_replies: u64,
    call_failures: u64,
    /// Calls the library refused (never sent).
    calls_unsent: u64,
    delivered: u64,
    duplicates: u64,
    replies_sent: u64,
    reconnects: u64,
    resumes: u64,
    sessions_lost: u64,
    handed_back: u64,
    max_resume_ms: u64,
    /// Redelivered after a restart and recognised from the ledger: already handled, not duplicates.
    recognised: u64,
    /// Event numbers delivered, per session.
    seen: BTreeMap<SessionId, BTreeSet<u64>>,
}

impl ClientStats {
    fn gaps(&self) -> u64 {
        self.seen
            .values()
            .map(|s| s.last().map_or(0, |m| m + 1) - s.len() as u64)
            .sum()
    }
}

/// A reply for a worker thread to send: the application's processing happens off the runtime.
struct Job {
    handle: ClientHandle,
    to: Seq,
    n: u64,
    stats: Arc<Mutex<ClientStats>>,
}

/// Worker threads that send the replies, as the field report's application does from its own
/// threads: plain threads, not tasks.
fn reply_workers(threads: usize, filler: usize) -> mpsc::Sender<Job> {
    let (tx, rx) = mpsc::channel::<Job>();
    let rx = Arc::new(Mutex::new(rx));
    for _ in 0..threads {
        let rx = rx.clone();
        std::thread::spawn(move || {
            loop {
                let job = match rx.lock().unwrap().recv() {
                    Ok(job) => job,
                    Err(_) => return,
                };
                if job
                    .handle
                    .reply(job.to, numbered(b'R', job.n, filler))
                    .is_ok()
                {
                    job.stats.lock().unwrap().replies_sent += 1;
                }
            }
        });
    }
    tx
}

struct ClientRun {
    name: String,
    options: ClientOptions,
    call_every: Duration,
    stats: Arc<Mutex<ClientStats>>,
    stop: Arc<AtomicBool>,
    workers: mpsc::Sender<Job>,
    filler: usize,
    /// The current session's handle, for closing it at the end.
    current: Arc<Mutex<Option<ClientHandle>>>,
    durable: Option<Durable>,
}

/// A client whose session and ledger live in a directory and survive its process.
#[derive(Clone)]
struct Durable {
    dir: std::path::PathBuf,
    /// The application's ledger: one line per event handled, `session number`.
    ledger: Arc<Mutex<std::fs::File>>,
}

impl Durable {
    fn open(dir: &std::path::Path, stats: &mut ClientStats) -> std::io::Result<Durable> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join("ledger");
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        // A line cut short by a kill has no newline: it was never counted as handled.
        for line in text.split_inclusive('\n').filter(|l| l.ends_with('\n')) {
            let mut parts = line.split_whitespace();
            if let (Some(id), Some(n)) = (parts.next(), parts.next())
                && let (Ok(id), Ok(n)) = (u64::from_str_radix(id, 16), n.parse::<u64>())
            {
                stats.seen.entry(SessionId(id)).or_default().insert(n);
            }
        }
        let ledger = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)?;
        Ok(Durable {
            dir: dir.to_path_buf(),
            ledger: Arc::new(Mutex::new(ledger)),
        })
    }

    fn record(&self, session: SessionId, n: u64) {
        use std::io::Write;
        // One write per line, straight to the OS: a killed process loses nothing written.
        let _ = self
            .ledger
            .lock()
            .unwrap()
            .write_all(format!("{session} {n}\n").as_bytes());
    }

    fn session(&self, options: &ClientOptions) -> std::io::Result<ClientHandle> {
        use steadfast_tokio::core::store::file::{FileStore, SyncPolicy};
        let store = FileStore::open(self.dir.join("session"), SyncPolicy::None)?;
        let mut options = options.clone();
        options.manual_consume = true;
        steadfast_tokio::connect_with_store(options, Box::new(store))
    }
}

/// Runs one client until `stop`: a session, and a fresh one whenever a session is lost.
async fn run_client(run: ClientRun) {
    let mut call = 0u64;
    // Calls are numbered per process: a restarted one starts a new sequence under a new name.
    let caller = format!("{}/{}", run.name, std::process::id());
    while !run.stop.load(Ordering::Relaxed) {
        let started = match &run.durable {
            Some(d) => d.session(&run.options),
            None => steadfast_tokio::connect(run.options.clone()),
        };
        let handle = match started {
            Ok(h) => h,
            Err(e) => {
                tracing::error!(error = %e, "cannot start a session");
                return;
            }
        };
        *run.current.lock().unwrap() = Some(handle.clone());
        let mut ticker = tokio::time::interval(run.call_every);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut down_since: Option<Instant> = None;
        loop {
            tokio::select! {
                _ = ticker.tick(), if !run.stop.load(Ordering::Relaxed) => {
                    if !handle.is_connected() {
                        continue;
                    }
                    run.stats.lock().unwrap().calls_sent += 1;
                    let h = handle.clone();
                    let stats = run.stats.clone();
                    let msg = call_msg(&caller, call);
                    call += 1;
                    tokio::spawn(async move {
                        let r = h.request(CALLS, msg, Duration::from_secs(30)).await;
                        let mut st = stats.lock().unwrap();
                        match r {
                            Ok(_) => st.call_replies += 1,
                            Err(steadfast_tokio::RequestError::Send(_)) => st.calls_unsent += 1,
                            Err(_) => st.call_failures += 1,
                        }
                    });
                }
                event = handle.next_event() => {
                    let Some(event) = event else { break };
                    let redelivered = matches!(event, SessionEvent::Redelivered(_));
                    let mut st = run.stats.lock().unwrap();
                    match event {
                        SessionEvent::Received(m) | SessionEvent::Redelivered(m) if m.stream == EVENTS => {
                            let Some((b'E', n, _)) = parse_msg(&m.payload) else { continue };
                            let session = handle.session().unwrap_or(SessionId(0));
                            let fresh = st.seen.entry(session).or_default().insert(n);
                            if fresh {
                                st.delivered += 1;
                            } else if redelivered {
                                st.recognised += 1;
                            } else {
                                st.duplicates += 1;
                            }
                            match &run.durable {
                                // Reply, record, then say done: a kill between any two of them
                                // brings the event back flagged, and the ledger tells.
                                Some(d) => {
                                    if fresh {
                                        if handle.reply(m.seq, numbered(b'R', n, run.filler)).is_ok() {
                                            st.replies_sent += 1;
                                        }
                                        d.record(session, n);
                                    }
                                    handle.consumed(m.seq);
                                }
                                None if fresh => {
                                    let job = Job { handle: handle.clone(), to: m.seq, n, stats: run.stats.clone() };
                                    let _ = run.workers.send(job);
                                }
                                None => {}
                            }
                        }
                        SessionEvent::Disconnected { .. } => down_since = Some(Instant::now()),
                        SessionEvent::Connected { resumed, .. } => {
                            if let Some(t) = down_since.take() {
                                st.reconnects += 1;
                                if resumed {
                                    st.resumes += 1;
                                    st.max_resume_ms = st.max_resume_ms.max(t.elapsed().as_millis() as u64);
                                }
                            }
                        }
                        SessionEvent::SessionLost { unacknowledged, reason } => {
                            tracing::warn!(client = %run.name, ?reason, "session lost; starting a new one");
                            st.sessions_lost += 1;
                            st.handed_back += unacknowledged.len() as u64;
                        }
                        SessionEvent::Closed { unacknowledged, .. } => {
                            st.handed_back += unacknowledged.len() as u64;
                        }
                        _ => {}
                    }
                }
            }
        }
    }
}

/// Keeps every core busy until `stop`, the way the field report's clients' own processing does.
fn burn_cpu(stop: Arc<AtomicBool>) {
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    for _ in 0..cores {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut x = 0x9e37_79b9_7f4a_7c15u64;
            while !stop.load(Ordering::Relaxed) {
                for _ in 0..100_000 {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                }
                std::hint::black_box(x);
            }
        });
    }
}

// ---------------------------------------------------------------------------------------------
// The summary.

#[derive(Debug, Default)]
struct Summary {
    sent: u64,
    delivered: u64,
    replies: u64,
    duplicates_delivered: u64,
    lost: u64,
    reconnects: u64,
    resumes: u64,
    sessions_lost: u64,
    max_resume_ms: u64,
    extra: Vec<(&'static str, u64)>,
}

impl Summary {
    fn line(&self) -> String {
        let mut s = format!(
            "SUMMARY {{\"sent\":{},\"delivered\":{},\"replies\":{},\"duplicates_delivered\":{},\"lost\":{},\"reconnects\":{},\"resumes\":{},\"sessions_lost\":{},\"max_resume_ms\":{}",
            self.sent,
            self.delivered,
            self.replies,
            self.duplicates_delivered,
            self.lost,
            self.reconnects,
            self.resumes,
            self.sessions_lost,
            self.max_resume_ms
        );
        for (k, v) in &self.extra {
            s.push_str(&format!(",\"{k}\":{v}"));
        }
        s.push('}');
        s
    }

    fn ok(&self) -> bool {
        self.lost == 0 && self.duplicates_delivered == 0
    }
}

fn add_client(sum: &mut Summary, c: &ClientStats) {
    sum.reconnects += c.reconnects;
    sum.resumes += c.resumes;
    sum.sessions_lost += c.sessions_lost;
    sum.max_resume_ms = sum.max_resume_ms.max(c.max_resume_ms);
    sum.duplicates_delivered += c.duplicates;
}

/// Waits for SIGINT or SIGTERM, or for `seconds` if given.
async fn until_stopped(seconds: Option<u64>) {
    let timer = async {
        match seconds {
            Some(s) => tokio::time::sleep(Duration::from_secs(s)).await,
            None => std::future::pending().await,
        }
    };
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("a SIGTERM handler");
    tokio::select! {
        _ = timer => {}
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

// ---------------------------------------------------------------------------------------------
// The subcommands.

/// The server's options: the defaults, split as `--shards` says.
fn server_options(a: &Args) -> ServerOptions {
    let mut options = ServerOptions::new();
    options.shards = a.shards;
    options
}

async fn server_cmd(a: Args) -> std::io::Result<Summary> {
    let addr = a
        .listen
        .unwrap_or_else(|| "127.0.0.1:7700".parse().unwrap());
    let server = steadfast_tokio::listen(addr, server_options(&a)).await?;
    eprintln!("hub server listening on {}", server.local_addr());
    let stats = Arc::new(Mutex::new(ServerStats::default()));
    tokio::spawn(run_server(server.clone(), stats.clone(), a.payload));
    until_stopped(a.seconds).await;
    server.shutdown();
    let st = stats.lock().unwrap().clone();
    Ok(Summary {
        sent: st.events_sent,
        delivered: st.calls,
        replies: st.replies,
        duplicates_delivered: st.call_dups,
        lost: st.call_gaps(),
        sessions_lost: st.sessions_lost,
        extra: vec![
            ("reply_mismatches", st.reply_mismatches),
            ("handed_back", st.handed_back),
            ("backpressured", st.backpressured),
            ("sessions", st.sessions),
        ],
        ..Summary::default()
    })
}

fn client_options(servers: Vec<SocketAddr>, name: &str) -> ClientOptions {
    let mut o = ClientOptions::new(servers);
    o.config.credentials = Bytes::copy_from_slice(name.as_bytes());
    o
}

async fn client_cmd(a: Args) -> std::io::Result<Summary> {
    if a.connect.is_empty() {
        return Err(std::io::Error::other("client needs --connect ADDR"));
    }
    let stop = Arc::new(AtomicBool::new(false));
    if a.burn_cpu {
        burn_cpu(stop.clone());
    }
    let mut initial = ClientStats::default();
    let durable = match &a.store {
        Some(dir) => Some(Durable::open(dir, &mut initial)?),
        None => None,
    };
    let stats = Arc::new(Mutex::new(initial));
    let current = Arc::new(Mutex::new(None));
    let run = ClientRun {
        name: a.id.clone(),
        options: client_options(a.connect.clone(), &a.id),
        call_every: Duration::from_millis(a.call_ms),
        stats: stats.clone(),
        stop: stop.clone(),
        workers: reply_workers(2, a.payload),
        filler: a.payload,
        current: current.clone(),
        durable,
    };
    let task = tokio::spawn(run_client(run));
    until_stopped(a.seconds).await;
    stop.store(true, Ordering::Relaxed);
    close_current(&current).await;
    let _ = task.await;
    let st = stats.lock().unwrap().clone();
    // With a store the ledger spans every run on it, so delivered and lost do too.
    let mut sum = Summary {
        sent: st.calls_sent,
        delivered: st.seen.values().map(|s| s.len() as u64).sum(),
        replies: st.call_replies,
        lost: st.gaps(),
        ..Summary::default()
    };
    add_client(&mut sum, &st);
    sum.extra = vec![
        ("delivered_this_run", st.delivered),
        ("replies_sent", st.replies_sent),
        ("recognised_redeliveries", st.recognised),
        ("handed_back", st.handed_back),
    ];
    Ok(sum)
}

async fn close_current(current: &Mutex<Option<ClientHandle>>) {
    let handle = current.lock().unwrap().take();
    if let Some(h) = handle {
        h.close(0, Bytes::from_static(b"done"));
        let _ = tokio::time::timeout(Duration::from_secs(5), h.closed()).await;
    }
}

async fn demo_cmd(a: Args) -> std::io::Result<Summary> {
    let seconds = a.seconds.unwrap_or(20);
    let server =
        steadfast_tokio::listen("127.0.0.1:0".parse().unwrap(), server_options(&a)).await?;
    let server_stats = Arc::new(Mutex::new(ServerStats::default()));
    tokio::spawn(run_server(server.clone(), server_stats.clone(), a.payload));

    let proxy = if a.chaos {
        Some(ChaosProxy::start(server.local_addr()).await?)
    } else {
        None
    };
    let target = proxy
        .as_ref()
        .map_or(server.local_addr(), |p| p.local_addr());
    let stop = Arc::new(AtomicBool::new(false));
    let burn_stop = Arc::new(AtomicBool::new(false));
    if a.burn_cpu {
        burn_cpu(burn_stop.clone());
    }
    let workers = reply_workers(4, a.payload);
    let mut clients = Vec::new();
    for i in 0..a.clients {
        let name = format!("client-{i}");
        let stats = Arc::new(Mutex::new(ClientStats::default()));
        let current = Arc::new(Mutex::new(None));
        let run = ClientRun {
            options: client_options(vec![target], &name),
            name,
            call_every: Duration::from_millis(a.call_ms),
            stats: stats.clone(),
            stop: stop.clone(),
            workers: workers.clone(),
            filler: a.payload,
            current: current.clone(),
            durable: None,
        };
        clients.push((tokio::spawn(run_client(run)), stats, current));
    }

    // Connections break at random, each break lasting up to twice the idle timeout: blackholes
    // and half-open paths the liveness checks must find, resets and half-closes the transport
    // reports, delays and freezes that must be ridden out.
    let schedule = proxy.as_ref().map(|p| {
        let faults = [
            Fault::Blackhole,
            Fault::Blackhole,
            Fault::Reset,
            Fault::HalfOpen {
                direction: Direction::ClientToServer,
            },
            Fault::HalfOpen {
                direction: Direction::ServerToClient,
            },
            Fault::HalfClose {
                direction: Direction::ServerToClient,
            },
            Fault::Freeze,
            Fault::Delay(Duration::from_millis(200)),
        ];
        let plan = Schedule::new(faults)
            .every(Duration::from_secs(2))
            .lasting(Duration::from_millis(500)..=Duration::from_secs(6));
        p.run_schedule(a.seed, plan)
    });

    let start = Instant::now();
    let progress = indicatif::ProgressBar::new_spinner();
    progress
        .set_style(indicatif::ProgressStyle::with_template("{spinner} {elapsed} {msg}").unwrap());
    let line = |phase: &str| {
        let s = server_stats.lock().unwrap().clone();
        let (mut delivered, mut reconnects, mut resumes, mut lost) = (0, 0, 0, 0);
        for (_, c, _) in &clients {
            let c = c.lock().unwrap();
            delivered += c.delivered;
            reconnects += c.reconnects;
            resumes += c.resumes;
            lost += c.sessions_lost;
        }
        let faults = proxy.as_ref().map_or(0, |p| {
            let f = p.stats().applied;
            f.blackhole + f.freeze + f.delay + f.throttle + f.reset + f.half_open + f.half_close
        });
        format!(
            "{phase}: calls {} events sent {} delivered {delivered} replies {} reconnects {reconnects} resumes {resumes} sessions lost {lost} faults {faults}",
            s.calls, s.events_sent, s.replies
        )
    };
    while start.elapsed() < Duration::from_secs(seconds) {
        progress.set_message(line("running"));
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // Stop calling and heal the network; then everything sent must arrive.
    stop.store(true, Ordering::Relaxed);
    if let Some(s) = schedule {
        s.abort();
    }
    if let Some(p) = &proxy {
        p.heal(Target::All);
    }
    let drained = |sst: &ServerStats| {
        clients.iter().all(|(_, c, _)| {
            let c = c.lock().unwrap();
            c.seen
                .iter()
                .all(|(id, seen)| sst.sent_to.get(id).copied().unwrap_or(0) == seen.len() as u64)
        }) && sst.replies + sst.handed_back >= sst.events_sent
            && sst.calls
                >= clients
                    .iter()
                    .map(|(_, c, _)| {
                        let c = c.lock().unwrap();
                        c.calls_sent - c.calls_unsent
                    })
                    .sum()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline && !drained(&server_stats.lock().unwrap()) {
        progress.set_message(line("draining"));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    progress.finish_and_clear();
    burn_stop.store(true, Ordering::Relaxed);
    for (_, _, current) in &clients {
        close_current(current).await;
    }
    for (task, _, _) in &mut clients {
        let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
    }
    server.shutdown();

    let sst = server_stats.lock().unwrap().clone();
    let mut sum = Summary {
        sent: sst.events_sent,
        replies: sst.replies,
        ..Summary::default()
    };
    let mut seen_sessions = BTreeSet::new();
    for (_, c, _) in &clients {
        let c = c.lock().unwrap();
        add_client(&mut sum, &c);
        sum.delivered += c.delivered;
        for (id, seen) in &c.seen {
            seen_sessions.insert(*id);
            let sent = sst.sent_to.get(id).copied().unwrap_or(0);
            sum.lost += sent.saturating_sub(seen.len() as u64);
        }
    }
    // Events sent to a session no client ever heard from are lost too, unless handed back.
    let unheard: u64 = sst
        .sent_to
        .iter()
        .filter(|(id, _)| !seen_sessions.contains(*id))
        .map(|(_, n)| *n)
        .sum();
    sum.lost += unheard.saturating_sub(sst.handed_back);
    sum.lost += sst.call_gaps();
    // Replies the clients' worker threads handed to the library must all reach the server, and
    // calls must all reach it too (unless handed back by a lost session).
    let (replies_sent, calls_sent, client_handed_back) =
        clients.iter().fold((0, 0, 0), |acc, (_, c, _)| {
            let c = c.lock().unwrap();
            (
                acc.0 + c.replies_sent,
                acc.1 + c.calls_sent - c.calls_unsent,
                acc.2 + c.handed_back,
            )
        });
    sum.lost +=
        (replies_sent + calls_sent).saturating_sub(sst.replies + sst.calls + client_handed_back);
    sum.duplicates_delivered += sst.call_dups;
    let faults = proxy.as_ref().map_or(0, |p| {
        let f = p.stats().applied;
        f.blackhole + f.freeze + f.delay + f.throttle + f.reset + f.half_open + f.half_close
    });
    sum.extra = vec![
        ("clients", a.clients as u64),
        ("seconds", seconds),
        ("calls", sst.calls),
        ("reply_mismatches", sst.reply_mismatches),
        ("handed_back", sst.handed_back),
        ("backpressured", sst.backpressured),
        ("faults", faults),
        (
            "drain_ms",
            start.elapsed().as_millis() as u64 - seconds * 1000,
        ),
    ];
    Ok(sum)
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let a = match parse() {
        Ok(a) => a,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("hub: {e}\n");
            }
            eprint!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    let rt = tokio::runtime::Runtime::new().expect("a tokio runtime");
    let result = rt.block_on(async {
        match a.cmd.as_str() {
            "server" => server_cmd(a).await,
            "client" => client_cmd(a).await,
            "demo" => demo_cmd(a).await,
            other => Err(std::io::Error::other(format!("unknown subcommand {other}"))),
        }
    });
    match result {
        Ok(sum) => {
            println!("{}", sum.line());
            if sum.ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("hub: {e}");
            ExitCode::from(2)
        }
    }
}
