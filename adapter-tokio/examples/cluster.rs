//! Two or more servers sharing sessions through Redis (feature `redis`): kill the server a client
//! is attached to and the client resumes on another, with nothing lost or delivered twice.
//!
//! ```text
//! cluster server  --redis URL --listen ADDR --name NAME
//! cluster publish --redis URL [--rate PER_SEC] [--seconds S]
//! cluster client  --connect ADDR[,ADDR...] [--seconds S]
//! ```
//!
//! The publisher fans numbered events out to every session of the cluster through Redis; each
//! client checks the numbers it receives (a gap or a repeat is reported and makes it exit
//! non-zero) and prints a line per second. The README has the walk-through.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use bytes::Bytes;
use steadfast_tokio::cluster::{Cluster, ClusterOptions};
use steadfast_tokio::{ClientOptions, Mode, ServerEvent, ServerOptions, SessionEvent};

const USAGE: &str = "\
USAGE:
    cluster server  --redis URL --listen ADDR --name NAME
    cluster publish --redis URL [--rate PER_SEC] [--seconds S]
    cluster client  --connect ADDR[,ADDR...] [--seconds S]
";

fn flag(args: &[String], name: &str) -> Option<String> {
    let i = args.iter().position(|a| a == name)?;
    args.get(i + 1).cloned()
}

#[tokio::main]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let seconds = flag(&args, "--seconds").and_then(|s| s.parse::<u64>().ok());
    let result = match args.first().map(String::as_str) {
        Some("server") => match (
            flag(&args, "--redis"),
            flag(&args, "--listen").and_then(|a| a.parse().ok()),
            flag(&args, "--name"),
        ) {
            (Some(redis), Some(listen), Some(name)) => server(redis, listen, name).await,
            _ => Err(USAGE.into()),
        },
        Some("publish") => match flag(&args, "--redis") {
            Some(redis) => {
                let rate = flag(&args, "--rate")
                    .and_then(|r| r.parse().ok())
                    .unwrap_or(100);
                publish(redis, rate, seconds).await
            }
            None => Err(USAGE.into()),
        },
        Some("client") => match flag(&args, "--connect") {
            Some(list) => {
                let servers: Result<Vec<SocketAddr>, _> = list.split(',').map(str::parse).collect();
                match servers {
                    Ok(servers) => client(servers, seconds).await,
                    Err(e) => Err(format!("--connect: {e}")),
                }
            }
            None => Err(USAGE.into()),
        },
        _ => Err(USAGE.into()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}

async fn server(redis: String, listen: SocketAddr, name: String) -> Result<(), String> {
    let options = ClusterOptions::new(redis, name.clone());
    let (server, _cluster) =
        steadfast_tokio::cluster::listen(listen, ServerOptions::new(), options)
            .await
            .map_err(|e| e.to_string())?;
    println!("server {name} on {}", server.local_addr());
    while let Some(event) = server.next_event().await {
        if let ServerEvent::Session { session, event } = event {
            match event {
                SessionEvent::Connected { resumed, epoch, .. } => {
                    println!(
                        "session {:016x} attached here (resumed {resumed}, epoch {epoch})",
                        session.0
                    )
                }
                SessionEvent::Fenced { epoch } => {
                    println!(
                        "session {:016x} moved to another server (epoch {epoch})",
                        session.0
                    )
                }
                SessionEvent::SessionLost { reason, .. } => {
                    println!("session {:016x} lost: {reason:?}", session.0)
                }
                _ => {}
            }
        }
    }
    Ok(())
}

async fn publish(redis: String, rate: u64, seconds: Option<u64>) -> Result<(), String> {
    let cluster = Cluster::publisher(&ClusterOptions::new(redis, "publisher"))
        .await
        .map_err(|e| e.to_string())?;
    let start = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / rate.max(1)));
    let mut n = 0u64;
    let mut last = Instant::now();
    while seconds.is_none_or(|s| start.elapsed() < Duration::from_secs(s)) {
        tick.tick().await;
        let b = cluster
            .broadcast(0, Mode::Ordered, Bytes::copy_from_slice(&n.to_be_bytes()))
            .await
            .map_err(|e| e.to_string())?;
        n += 1;
        if last.elapsed() >= Duration::from_secs(1) {
            println!(
                "published {n} events; the last reached {} sessions",
                b.queued
            );
            last = Instant::now();
        }
    }
    Ok(())
}

async fn client(servers: Vec<SocketAddr>, seconds: Option<u64>) -> Result<(), String> {
    let client =
        steadfast_tokio::connect(ClientOptions::new(servers)).map_err(|e| e.to_string())?;
    let start = Instant::now();
    let (mut expected, mut received, mut wrong, mut resumes) = (None::<u64>, 0u64, 0u64, 0u64);
    let mut report = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            event = client.next_event() => match event {
                Some(SessionEvent::Received(m)) => {
                    let n = u64::from_be_bytes(m.payload[..8].try_into().map_err(|_| "bad event")?);
                    // Events published before this session existed never reach it: start where it joined.
                    if expected.is_some_and(|e| e != n) {
                        eprintln!("expected event {}, got {n}", expected.unwrap_or_default());
                        wrong += 1;
                    }
                    expected = Some(n + 1);
                    received += 1;
                }
                Some(SessionEvent::Connected { resumed: true, .. }) => resumes += 1,
                Some(SessionEvent::SessionLost { reason, .. }) => return Err(format!("session lost: {reason:?}")),
                Some(_) => {}
                None => break,
            },
            _ = report.tick() => {
                println!("received {received}, out of order or repeated {wrong}, resumes {resumes}");
                if seconds.is_some_and(|s| start.elapsed() >= Duration::from_secs(s)) {
                    break;
                }
            }
        }
    }
    if wrong > 0 {
        return Err(format!("{wrong} events out of order or repeated"));
    }
    Ok(())
}
