//! Fan-out throughput of a server whose sessions are kept in Redis (`steadfast_tokio::cluster`)
//! against the same server with its sessions in memory, side by side in one run (issue 9's goal:
//! Redis >= 0.5x memory).
//!
//! ```text
//! cargo bench -p steadfast-tests --bench cluster
//! #   knobs: CLUSTER_CLIENTS=8  CLUSTER_SECS=2  CLUSTER_REPS=3  CLUSTER_PAYLOAD=64
//! ```
//!
//! One server, `CLUSTER_CLIENTS` clients over loopback, one publisher fanning numbered events out
//! to every session for `CLUSTER_SECS`, never more than `WINDOW` events ahead of the slowest client.
//! Memory: `ServerHandle::send` to each session (waiting for room). Redis: `Cluster::broadcast`, one
//! atomic script per event, `BATCH` in flight on the pipelined connection. Every client checks that
//! its events arrive exactly once in its session's order, and that it got as many as were sent. Rate = deliveries / (first publish -> last delivery).
//! Needs `redis-server` on the PATH.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use steadfast_core::identity::SessionId;
use steadfast_tests::{any_port, client_options, server_options};
use steadfast_tokio::cluster::ClusterOptions;
use steadfast_tokio::{ClientHandle, Mode, ServerEvent, ServerHandle, SessionEvent};

/// How far the publisher may run ahead of the slowest client.
const WINDOW: u64 = 4096;
/// Broadcasts in flight at once on the Redis connection (it pipelines them in order).
const BATCH: usize = 64;

fn knob(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Memory,
    Redis,
}

/// A client counting its events and checking their order.
fn count(client: &ClientHandle) -> Arc<AtomicU64> {
    let got = Arc::new(AtomicU64::new(0));
    let (c, g) = (client.clone(), got.clone());
    tokio::spawn(async move {
        while let Some(e) = c.next_event().await {
            if let SessionEvent::Received(m) = e {
                // Broadcasts in flight together are ordered as Redis takes them, not by their
                // numbers: the session's own sequence says whether one was missed or repeated.
                assert_eq!(
                    m.seq,
                    g.load(Ordering::Relaxed),
                    "events in order, exactly once"
                );
                g.fetch_add(1, Ordering::Relaxed);
            }
        }
    });
    got
}

fn event(n: u64, size: usize) -> Bytes {
    let mut v = n.to_be_bytes().to_vec();
    v.resize(size.max(8), 0xab);
    Bytes::from(v)
}

async fn sessions(server: &ServerHandle, n: usize) -> Vec<SessionId> {
    let mut ids = Vec::new();
    while ids.len() < n {
        if let Some(ServerEvent::Session {
            session,
            event: SessionEvent::Connected { .. },
        }) = server.next_event().await
        {
            ids.push(session);
        }
    }
    // Keep draining events so the queue to the application does not grow.
    let s = server.clone();
    tokio::spawn(async move { while s.next_event().await.is_some() {} });
    ids
}

/// Deliveries per second for one run.
async fn run(kind: Kind, redis: &str, run: u64) -> f64 {
    eprintln!(
        "run {run}: {}",
        if kind == Kind::Memory {
            "memory"
        } else {
            "redis"
        }
    );
    let clients_n = knob("CLUSTER_CLIENTS", 8) as usize;
    let secs = knob("CLUSTER_SECS", 2);
    let size = knob("CLUSTER_PAYLOAD", 64) as usize;
    let (server, cluster) = match kind {
        Kind::Memory => (
            steadfast_tokio::listen(any_port(), server_options())
                .await
                .unwrap(),
            None,
        ),
        Kind::Redis => {
            let mut o = ClusterOptions::new(redis, format!("bench-{run}"));
            o.prefix = format!("bench{run}");
            let (s, c) = steadfast_tokio::cluster::listen(any_port(), server_options(), o)
                .await
                .unwrap();
            (s, Some(c))
        }
    };
    let clients: Vec<ClientHandle> = (0..clients_n)
        .map(|_| steadfast_tokio::connect(client_options(vec![server.local_addr()])).unwrap())
        .collect();
    let got: Vec<Arc<AtomicU64>> = clients.iter().map(count).collect();
    let ids = sessions(&server, clients_n).await;
    let slowest = || got.iter().map(|g| g.load(Ordering::Relaxed)).min().unwrap();

    let start = Instant::now();
    let mut sent = 0u64;
    while start.elapsed() < Duration::from_secs(secs) {
        while sent >= slowest() + WINDOW {
            tokio::task::yield_now().await;
        }
        match &cluster {
            None => {
                for _ in 0..BATCH {
                    for &id in &ids {
                        server
                            .send(id, 0, Mode::Ordered, event(sent, size))
                            .await
                            .unwrap();
                    }
                    sent += 1;
                }
            }
            Some(c) => {
                let batch =
                    (0..BATCH as u64).map(|k| c.broadcast(0, Mode::Ordered, event(sent + k, size)));
                for b in futures_util::future::join_all(batch).await {
                    assert_eq!(b.unwrap().queued, clients_n as u64);
                }
                sent += BATCH as u64;
            }
        }
    }
    while slowest() < sent {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let elapsed = start.elapsed().as_secs_f64();
    for c in &clients {
        c.close(0, Bytes::new());
    }
    server.shutdown();
    (sent * clients_n as u64) as f64 / elapsed
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` would run this too: do nothing then.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let Some((_redis, url)) = steadfast_tests::redis::redis() else {
        eprintln!("redis-server is needed");
        std::process::exit(1);
    };
    let reps = knob("CLUSTER_REPS", 3);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (mut memory, mut redis) = (Vec::new(), Vec::new());
    rt.block_on(async {
        // A warm-up of each, then the runs interleaved so drift hits both alike.
        run(Kind::Memory, &url, 100).await;
        run(Kind::Redis, &url, 101).await;
        for r in 0..reps {
            memory.push(run(Kind::Memory, &url, r).await);
            redis.push(run(Kind::Redis, &url, r).await);
        }
    });
    let fmt = |v: &[f64]| {
        v.iter()
            .map(|x| format!("{:.0}", x))
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!(
        "deliveries/s, {} clients, {} B events",
        knob("CLUSTER_CLIENTS", 8),
        knob("CLUSTER_PAYLOAD", 64)
    );
    println!("  memory store: runs [{}]", fmt(&memory));
    println!("  redis store:  runs [{}]", fmt(&redis));
    let (m, r) = (median(&mut memory), median(&mut redis));
    println!(
        "  medians: memory {m:.0}, redis {r:.0}; redis / memory = {:.2} (goal >= 0.5)",
        r / m
    );
}
