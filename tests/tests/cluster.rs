//! Two real server processes sharing a real Redis on loopback (issue 9): clients attached to one
//! server, under fan-out traffic published through Redis, keep their sessions when that server is
//! killed with SIGKILL — they fail over to the other and resume, and the applications' ledgers show
//! every event delivered to every client exactly once in order, and every client message handed to
//! a server application exactly once. A server frozen (SIGSTOP) while its clients moved is fenced
//! when it wakes: it lets go of the sessions and ends none of them.
//!
//! Needs `redis-server` on the PATH (CI installs it). Without it these tests say so and pass,
//! unless `STEADFAST_REQUIRE_REDIS` is set, as CI sets it.
//!
//! The servers are this test binary run again as child processes (`cluster_server_child`, which
//! does nothing unless `STEADFAST_CLUSTER_REDIS` is set); each prints its ledger on stdout, one
//! line per event, so a line printed before a SIGKILL is kept.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use steadfast_core::identity::SessionId;
use steadfast_tests::redis::{Kid, redis};
use steadfast_tests::{assert_exactly_once_in_order, client_options, number, numbered};
use steadfast_tokio::cluster::{Cluster, ClusterOptions};
use steadfast_tokio::{ClientHandle, Mode, ServerEvent, SessionEvent};

const CHILD_REDIS: &str = "STEADFAST_CLUSTER_REDIS";
const CHILD_NAME: &str = "STEADFAST_CLUSTER_NAME";
const CLIENTS: usize = 6;
/// The stream clients send their own numbered messages on.
const UP: u64 = 1;

/// The child: one server of the cluster, printing its application's ledger.
#[test]
#[ignore = "run by the cluster tests as a child process"]
fn cluster_server_child() {
    let (Ok(redis), Ok(name)) = (std::env::var(CHILD_REDIS), std::env::var(CHILD_NAME)) else {
        return;
    };
    // The parent holds our stdin: when it goes (even by a panic), so do we.
    std::thread::spawn(|| {
        let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
        std::process::exit(0);
    });
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async move {
        let mut options = steadfast_tests::server_options();
        options.config.retention = Duration::from_secs(3);
        let (server, _cluster) = steadfast_tokio::cluster::listen(
            steadfast_tests::any_port(),
            options,
            ClusterOptions::new(redis, name),
        )
        .await
        .expect("cluster server starts");
        println!("addr {}", server.local_addr());
        while let Some(event) = server.next_event().await {
            let ServerEvent::Session { session, event } = event else {
                continue;
            };
            let s = session.0;
            match event {
                SessionEvent::Connected { epoch, .. } => println!("connected {s} {epoch}"),
                SessionEvent::Received(m) => {
                    println!("got {s} {}", number(&m.payload).expect("numbered"))
                }
                SessionEvent::Redelivered(m) => {
                    println!("again {s} {}", number(&m.payload).expect("numbered"))
                }
                SessionEvent::Fenced { epoch } => println!("fenced {s} {epoch}"),
                SessionEvent::SessionLost { reason, .. } => println!("lost {s} {reason:?}"),
                SessionEvent::DurabilityLost { error } => println!("durability-lost {s} {error}"),
                _ => {}
            }
        }
    });
}

/// A server process and the lines it printed.
struct Server {
    kid: Kid,
    addr: SocketAddr,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Server {
    fn start(redis: &str, name: &str) -> Server {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "cluster_server_child",
                "--exact",
                "--ignored",
                "--nocapture",
            ])
            .env(CHILD_REDIS, redis)
            .env(CHILD_NAME, name)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("server child starts");
        let stdout = child.stdout.take().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(addr) = line.strip_prefix("addr ") {
                    let _ = tx.send(addr.parse::<SocketAddr>().unwrap());
                } else if !line.is_empty() {
                    sink.lock().unwrap().push(line);
                }
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("the server child printed its address");
        Server {
            kid: Kid(child),
            addr,
            lines,
        }
    }

    fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// Lines starting with `word`, split into their fields.
    fn records(&self, word: &str) -> Vec<(u64, u64)> {
        self.lines()
            .iter()
            .filter_map(|l| {
                let mut f = l.split(' ');
                (f.next()? == word).then_some(())?;
                Some((f.next()?.parse().ok()?, f.next()?.parse().ok()?))
            })
            .collect()
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.kid.0.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {sig}");
    }
}

/// One client: what it received, in order, and how many of its own messages were accepted.
struct Tracked {
    handle: ClientHandle,
    received: Arc<Mutex<Vec<u64>>>,
    sent: Arc<Mutex<u64>>,
    session: Arc<Mutex<Option<SessionId>>>,
}

fn track(handle: ClientHandle) -> Tracked {
    let received = Arc::new(Mutex::new(Vec::new()));
    let sent = Arc::new(Mutex::new(0u64));
    let session = Arc::new(Mutex::new(None));
    let (h, r, s, id) = (
        handle.clone(),
        received.clone(),
        sent.clone(),
        session.clone(),
    );
    tokio::spawn(async move {
        while let Some(event) = h.next_event().await {
            match event {
                SessionEvent::Connected { session, .. } => *id.lock().unwrap() = Some(session),
                SessionEvent::Received(m) => {
                    r.lock()
                        .unwrap()
                        .push(number(&m.payload).expect("numbered"));
                    // Each event is answered with a numbered message of the client's own.
                    let mut n = s.lock().unwrap();
                    if h.try_send(UP, Mode::Ordered, numbered(*n)).is_ok() {
                        *n += 1;
                    }
                }
                SessionEvent::SessionLost { reason, .. } => panic!("session lost: {reason:?}"),
                _ => {}
            }
        }
    });
    Tracked {
        handle,
        received,
        sent,
        session,
    }
}

struct Cast {
    cluster: Cluster,
    sent: u64,
}

impl Cast {
    /// Fans one numbered event out to every session, through Redis.
    async fn once(&mut self) {
        let b = self
            .cluster
            .broadcast(0, Mode::Ordered, numbered(self.sent))
            .await
            .expect("broadcast");
        assert_eq!(
            b.queued, CLIENTS as u64,
            "every session took event {}",
            self.sent
        );
        self.sent += 1;
    }

    async fn for_a_while(&mut self, d: Duration) {
        let end = Instant::now() + d;
        while Instant::now() < end {
            self.once().await;
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
}

async fn wait_until(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let end = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < end, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits for every client to hold `total` events, then checks each got them exactly once, in order.
async fn every_event_reached_every_client(clients: &[Tracked], total: u64) {
    wait_until(
        "every event reached every client",
        Duration::from_secs(30),
        || {
            clients
                .iter()
                .all(|c| c.received.lock().unwrap().len() as u64 >= total)
        },
    )
    .await;
    for (i, c) in clients.iter().enumerate() {
        let received = c.received.lock().unwrap().clone();
        assert_exactly_once_in_order(&format!("client {i} down"), &received, total);
    }
}

/// Waits for the servers to have handed over as many client messages as were accepted, then
/// checks the ledger.
async fn every_client_message_reached_a_server(servers: &[&Server], clients: &[Tracked]) {
    wait_until(
        "every client message reached a server",
        Duration::from_secs(30),
        || {
            // A message the killed server took in but never handed over comes to the other one
            // only as a redelivery, so redeliveries count too, each message once.
            let mut handled: BTreeSet<(u64, u64)> = BTreeSet::new();
            for s in servers {
                handled.extend(s.records("got"));
                handled.extend(s.records("again"));
            }
            let sent: u64 = clients.iter().map(|c| *c.sent.lock().unwrap()).sum();
            handled.len() as u64 >= sent
        },
    )
    .await;
    assert_servers_ledger(servers, clients);
}

/// Every client message accepted reached a server application exactly once (counting a flagged
/// redelivery of one the first server's application never saw).
fn assert_servers_ledger(servers: &[&Server], clients: &[Tracked]) {
    let mut got: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    for s in servers {
        for (session, n) in s.records("got") {
            got.entry(session).or_default().push(n);
        }
    }
    let mut again: BTreeMap<u64, BTreeSet<u64>> = BTreeMap::new();
    for s in servers {
        for (session, n) in s.records("again") {
            again.entry(session).or_default().insert(n);
        }
    }
    for c in clients {
        let session = c.session.lock().unwrap().expect("connected").0;
        let mut handled = got.remove(&session).unwrap_or_default();
        let unique: BTreeSet<u64> = handled.iter().copied().collect();
        assert_eq!(
            unique.len(),
            handled.len(),
            "session {session}: a message received twice"
        );
        for n in again.remove(&session).unwrap_or_default() {
            if !unique.contains(&n) {
                handled.push(n);
            }
        }
        handled.sort_unstable();
        let sent = *c.sent.lock().unwrap();
        assert_exactly_once_in_order(&format!("session {session} up"), &handled, sent);
    }
}

/// Servers a and b on the Redis at `url`, every client attached to a (each tries a first), and a
/// publisher.
async fn clients_on_a(url: &str) -> (Server, Server, Vec<Tracked>, Cast) {
    let a = Server::start(url, "a");
    let b = Server::start(url, "b");
    let servers = vec![a.addr, b.addr];
    let clients: Vec<Tracked> = (0..CLIENTS)
        .map(|_| track(steadfast_tokio::connect(client_options(servers.clone())).unwrap()))
        .collect();
    wait_until(
        "every client is attached to a",
        Duration::from_secs(20),
        || a.records("connected").len() == CLIENTS,
    )
    .await;
    let cast = Cast {
        cluster: Cluster::publisher(&ClusterOptions::new(url, "test"))
            .await
            .unwrap(),
        sent: 0,
    };
    (a, b, clients, cast)
}

#[test]
fn clients_of_a_killed_server_resume_on_another_with_nothing_lost_or_duplicated() {
    let Some((_redis, url)) = redis() else {
        return;
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let (a, b, clients, mut cast) = clients_on_a(&url).await;
        cast.for_a_while(Duration::from_millis(800)).await;

        // SIGKILL: nothing in the process runs again; what it did not write to Redis is gone.
        let mut a = a;
        a.kid.0.kill().unwrap();
        a.kid.0.wait().unwrap();
        let at_kill = cast.sent;
        cast.for_a_while(Duration::from_millis(1500)).await;
        let total = cast.sent;

        wait_until("every client resumed on b", Duration::from_secs(20), || {
            b.records("connected").len() == CLIENTS
        })
        .await;
        every_event_reached_every_client(&clients, total).await;
        // Every client message accepted was handed to a server application.
        every_client_message_reached_a_server(&[&a, &b], &clients).await;
        for s in [&a, &b] {
            for line in s.lines() {
                assert!(
                    !line.starts_with("lost") && !line.starts_with("durability-lost"),
                    "{line}"
                );
            }
        }
        eprintln!(
            "{total} events to {CLIENTS} clients ({at_kill} before the kill); \
             client messages handled: a {}, b {}, b again {}",
            a.records("got").len(),
            b.records("got").len(),
            b.records("again").len()
        );
        for c in &clients {
            c.handle.close(0, Bytes::new());
        }
    });
}

#[test]
fn a_frozen_server_whose_clients_moved_is_fenced_when_it_wakes() {
    let Some((_redis, url)) = redis() else {
        return;
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let (a, b, clients, mut cast) = clients_on_a(&url).await;
        cast.for_a_while(Duration::from_millis(300)).await;

        // A VM paused, not dead: its clients give up on it and resume on b at a newer epoch.
        a.signal("-STOP");
        cast.for_a_while(Duration::from_millis(500)).await;
        wait_until("every client resumed on b", Duration::from_secs(20), || {
            b.records("connected").len() == CLIENTS
        })
        .await;
        a.signal("-CONT");
        // It wakes to dead connections and retained sessions; at its next write to each (the end of
        // its retention at the latest) it finds the newer epoch and lets go.
        wait_until("a let go of every session", Duration::from_secs(20), || {
            a.records("fenced").len() == CLIENTS
        })
        .await;
        cast.for_a_while(Duration::from_millis(300)).await;
        let total = cast.sent;
        every_event_reached_every_client(&clients, total).await;
        let sessions: BTreeSet<u64> = clients
            .iter()
            .map(|c| c.session.lock().unwrap().expect("connected").0)
            .collect();
        let fenced: BTreeSet<u64> = a.records("fenced").iter().map(|(s, _)| *s).collect();
        assert_eq!(
            fenced, sessions,
            "a let go of exactly the sessions that moved"
        );
        for (s, epoch) in a.records("fenced") {
            let on_b = b
                .records("connected")
                .iter()
                .find(|(t, _)| *t == s)
                .map(|(_, e)| *e);
            assert_eq!(Some(epoch), on_b, "fenced by b's claim of session {s}");
        }
        assert!(
            !a.lines().iter().any(|l| l.starts_with("lost")),
            "a fenced server ends no session: {:?}",
            a.lines()
        );
        every_client_message_reached_a_server(&[&a, &b], &clients).await;
    });
}
