//! Two channels over a seeded lossy, duplicating, reordering datagram link, in virtual time.
//!
//! ```sh
//! cargo run --release -p steadfast-core --example lossy_link -- --messages 100000 --drop 0.1 --seed 7
//! ```
//!
//! Prints what crossed the link and what the receiving application saw, then checks the contract:
//! every message delivered exactly once, in order. Exits non-zero (with the command that replays the
//! run) if it was broken. The same arguments always give the same run.

#[path = "../tests/util/mod.rs"]
mod util;

use std::process::ExitCode;
use std::time::Instant as WallClock;

use steadfast_core::time::Duration;
use steadfast_core::{Config, Transport};
use util::{Faults, Pair, payloads, received};

struct Args {
    messages: usize,
    size: usize,
    drop: f64,
    duplicate: f64,
    jitter_ms: u64,
    latency_ms: u64,
    seed: u64,
}

fn parse() -> Result<Args, String> {
    let mut a = Args {
        messages: 100_000,
        size: 64,
        drop: 0.05,
        duplicate: 0.05,
        jitter_ms: 20,
        latency_ms: 10,
        seed: 1,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let bad = |e: &dyn std::fmt::Display| format!("{flag} {value}: {e}");
        match flag.as_str() {
            "--messages" => a.messages = value.parse().map_err(|e| bad(&e))?,
            "--size" => a.size = value.parse().map_err(|e| bad(&e))?,
            "--drop" => a.drop = value.parse().map_err(|e| bad(&e))?,
            "--duplicate" => a.duplicate = value.parse().map_err(|e| bad(&e))?,
            "--jitter-ms" => a.jitter_ms = value.parse().map_err(|e| bad(&e))?,
            "--latency-ms" => a.latency_ms = value.parse().map_err(|e| bad(&e))?,
            "--seed" => a.seed = value.parse().map_err(|e| bad(&e))?,
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    if !(0.0..1.0).contains(&a.drop) || !(0.0..=1.0).contains(&a.duplicate) {
        return Err("--drop must be in [0, 1) and --duplicate in [0, 1]".into());
    }
    Ok(a)
}

fn main() -> ExitCode {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("lossy_link: {e}");
            return ExitCode::from(2);
        }
    };
    let replay = format!(
        "cargo run --release -p steadfast-core --example lossy_link -- --messages {} --size {} --drop {} --duplicate {} --jitter-ms {} --latency-ms {} --seed {}",
        args.messages,
        args.size,
        args.drop,
        args.duplicate,
        args.jitter_ms,
        args.latency_ms,
        args.seed
    );
    let faults = Faults {
        latency: Duration::from_millis(args.latency_ms),
        jitter: Duration::from_millis(args.jitter_ms),
        drop: args.drop,
        duplicate: args.duplicate,
        max_chunk: 0,
    };
    println!(
        "link: latency {} ms, jitter {} ms, drop {:.1}%, duplicate {:.1}%; {} messages of {} B; seed {}",
        args.latency_ms,
        args.jitter_ms,
        args.drop * 100.0,
        args.duplicate * 100.0,
        args.messages,
        args.size,
        args.seed
    );
    // The example reports its own speed; the library under test still never reads a clock.
    #[expect(clippy::disallowed_methods, reason = "wall time of the example itself")]
    let started = WallClock::now();
    let mut pair = Pair::new(Config::new(Transport::Datagram), faults, args.seed);
    pair.max_steps = 100 * args.messages as u64 + 100_000;
    let sent = payloads(args.messages, args.size);
    let outcome = pair.send_all_from_a(&sent).and_then(|_| pair.drive());
    let wall = started.elapsed();

    let got = received(&pair.b_events);
    let (a, b) = (pair.a.stats(), pair.b.stats());
    println!(
        "link a->b: {} datagrams, {} dropped, {} duplicated; b->a: {} datagrams, {} dropped",
        pair.ab.packets, pair.ab.dropped, pair.ab.duplicated, pair.ba.packets, pair.ba.dropped
    );
    println!(
        "sender:   {} data frames ({} retransmissions, {} declared lost, {} timeouts), srtt {:?}",
        a.data_sent,
        a.retransmitted,
        a.declared_lost,
        a.rto_expiries,
        pair.a.sender().rtt().smoothed()
    );
    println!(
        "receiver: {} delivered, {} duplicates discarded, {} dropped beyond window, {} dropped for lack of room, {} ack frames ({:.1}% of frames)",
        got.len(),
        b.duplicates_received,
        b.dropped_beyond_window,
        b.dropped_no_room,
        b.acks_sent,
        100.0 * b.acks_sent as f64 / (b.acks_sent + a.data_sent).max(1) as f64
    );
    let sim = pair.now.as_nanos() as f64 / 1e9;
    println!(
        "time:     {sim:.1} s simulated in {:.2} s of wall time ({:.0}x real time)",
        wall.as_secs_f64(),
        sim / wall.as_secs_f64().max(1e-9)
    );
    let verdict = match outcome {
        Err(stuck) => Err(format!(
            "stuck after {} steps at {:?}",
            stuck.steps, stuck.now
        )),
        Ok(()) if got != sent => {
            let first_bad = got.iter().zip(&sent).position(|(g, s)| g != s);
            Err(format!(
                "delivered {} of {} messages; first mismatch at index {:?}",
                got.len(),
                sent.len(),
                first_bad
            ))
        }
        Ok(()) => Ok(()),
    };
    match verdict {
        Ok(()) => {
            println!(
                "contract: all {} messages delivered exactly once, in order",
                sent.len()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("contract VIOLATED: {e}");
            println!("replay: {replay}");
            ExitCode::FAILURE
        }
    }
}
