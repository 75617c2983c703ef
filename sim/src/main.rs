//! The simulator's command line: `steadfast-sim --seeds N`, `--seed S`, `--canary NAME`.
#![forbid(unsafe_code)]

use std::process::ExitCode;
use std::time::Instant as WallClock;

use indicatif::{ProgressBar, ProgressStyle};
use steadfast_core::Transport;
use steadfast_core::time::Duration;
use steadfast_sim::params::{Canary, Workload};

const USAGE: &str = "\
steadfast-sim: deterministic simulation of steadfast sessions under faults

USAGE:
    steadfast-sim [--seed S | --seeds N [--first S]] [options]

OPTIONS:
    --seed S               run one seed and print its parameters, marks and trace hash
    --seeds N              run seeds first..first+N (default: 100 seeds from 0)
    --first S              the first seed of a sweep (default 0)
    --jobs N               threads a sweep runs its seeds on (default: one per core); the output is
                           the same for any N (`--seed` always runs on one)
    --canary NAME          break one guarantee: dup-delivery, drop-delivery, reorder-delivery,
                           forget-handback, misroute-reply, corrupt-past-checksum, core-skip-dedup,
                           core-skip-resume, core-out-of-order, restart-forgets-store
    --clients N            client nodes (default 8)
    --duration SECS        workload-and-faults phase, virtual seconds (default 60)
    --call-ms MS           mean time between a client's calls (default 5000)
    --stream-ms MS         mean time between a client's steady messages, and the server's per session (default 1000)
    --payload-max BYTES    largest payload (default 512)
    --transport KIND       stream or datagram for every seed (default: the swarm draws it per seed)
    --no-corrupt           datagram paths never flip bits (by default the swarm may draw corruption;
                           the core's CRC-32 turns it into a drop)
    --client-crashes N     every seed crashes client processes, up to N a minute (by default the
                           swarm turns client crashes on for half the seeds, up to 3 a minute)
    --verbose              print every seed's parameters
    --quiet                no progress bar
";

struct Args {
    seed: Option<u64>,
    seeds: u64,
    first: u64,
    jobs: usize,
    canary: Option<Canary>,
    workload: Workload,
    verbose: bool,
    quiet: bool,
}

fn parse() -> Result<Args, String> {
    let mut a = Args {
        seed: None,
        seeds: 100,
        first: 0,
        jobs: steadfast_sim::sweep::default_jobs(),
        canary: None,
        workload: Workload::default(),
        verbose: false,
        quiet: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = |name: &str| -> Result<u64, String> {
            let v = it.next().ok_or(format!("{name} needs a value"))?;
            v.parse::<u64>().map_err(|e| format!("{name} {v}: {e}"))
        };
        match flag.as_str() {
            "--seed" => a.seed = Some(value("--seed")?),
            "--seeds" => a.seeds = value("--seeds")?,
            "--first" => a.first = value("--first")?,
            "--jobs" | "-j" => {
                a.jobs = usize::try_from(value("--jobs")?)
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or("--jobs needs at least 1")?;
            }
            "--clients" => a.workload.clients = value("--clients")? as usize,
            "--duration" => a.workload.duration = Duration::from_secs(value("--duration")?),
            "--call-ms" => {
                a.workload.call_interval = Duration::from_millis(value("--call-ms")?.max(1))
            }
            "--stream-ms" => {
                let d = Duration::from_millis(value("--stream-ms")?.max(1));
                a.workload.stream_interval = d;
                a.workload.server_stream_interval = d;
            }
            "--payload-max" => a.workload.payload_max = value("--payload-max")? as usize,
            "--transport" => {
                let kind = it.next().ok_or("--transport needs stream or datagram")?;
                a.workload.transport = Some(match kind.as_str() {
                    "stream" => Transport::Stream,
                    "datagram" => Transport::Datagram,
                    other => return Err(format!("unknown transport {other}")),
                });
            }
            "--no-corrupt" => a.workload.corrupt = false,
            "--client-crashes" => {
                a.workload.client_crashes = Some(value("--client-crashes")? as u32);
            }
            "--canary" => {
                let name = it.next().ok_or("--canary needs a name")?;
                a.canary = Some(Canary::parse(&name).ok_or(format!("unknown canary {name}"))?);
            }
            "--verbose" | "-v" => a.verbose = true,
            "--quiet" | "-q" => a.quiet = true,
            "--help" | "-h" => return Err(String::new()),
            other => return Err(format!("unknown option {other}")),
        }
    }
    Ok(a)
}

/// The flags that reproduce this run's workload, for the replay line.
fn workload_flags(a: &Args) -> String {
    let d = Workload::default();
    let w = &a.workload;
    let mut s = String::new();
    if w.clients != d.clients {
        s += &format!(" --clients {}", w.clients);
    }
    if w.duration != d.duration {
        s += &format!(" --duration {}", w.duration.as_secs());
    }
    if w.call_interval != d.call_interval {
        s += &format!(" --call-ms {}", w.call_interval.as_millis());
    }
    if w.stream_interval != d.stream_interval {
        s += &format!(" --stream-ms {}", w.stream_interval.as_millis());
    }
    if w.payload_max != d.payload_max {
        s += &format!(" --payload-max {}", w.payload_max);
    }
    match w.transport {
        Some(Transport::Stream) => s += " --transport stream",
        Some(Transport::Datagram) => s += " --transport datagram",
        _ => {}
    }
    if !w.corrupt {
        s += " --no-corrupt";
    }
    if let Some(n) = w.client_crashes {
        s += &format!(" --client-crashes {n}");
    }
    if let Some(c) = a.canary {
        s += &format!(" --canary {}", c.name());
    }
    s
}

fn main() -> ExitCode {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("error: {e}\n");
            }
            eprint!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    let seeds: Vec<u64> = match args.seed {
        Some(s) => vec![s],
        None => (args.first..args.first.saturating_add(args.seeds)).collect(),
    };
    let single = args.seed.is_some();
    let bar = if single || args.quiet {
        ProgressBar::hidden()
    } else {
        let b = ProgressBar::new(seeds.len() as u64);
        b.set_style(
            ProgressStyle::with_template(
                "{elapsed_precise} [{bar:40}] {pos}/{len} seeds, {msg} ({eta} left)",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        b
    };
    let jobs = if single {
        1
    } else {
        args.jobs.min(seeds.len()).max(1)
    };
    let started = WallClock::now();
    let mut failing = 0usize;
    let summary = steadfast_sim::sweep(&seeds, &args.workload, args.canary, jobs, |out| {
        let seed = out.params.seed;
        if single || args.verbose {
            bar.suspend(|| println!("{}", out.params));
        }
        if !out.violations.is_empty() {
            failing += 1;
            bar.suspend(|| {
                println!("FAIL seed {seed}: {} violation(s)", out.violations.len());
                if !(single || args.verbose) {
                    println!("{}", out.params);
                }
                for v in out.violations.iter().take(10) {
                    println!("  {v}");
                }
                println!(
                    "  replay: cargo run --release -p steadfast-sim -- --seed {seed}{}",
                    workload_flags(&args)
                );
            });
        }
        if single {
            println!(
                "  events={} sim={:.3}s heal_at={:.1}s settled_after={} trace_hash={:016x}",
                out.events,
                out.sim_time.as_secs_f64(),
                out.heal_at.as_secs_f64(),
                out.settled_after
                    .map_or("never".to_string(), |d| format!("{:.3}s", d.as_secs_f64())),
                out.trace_hash
            );
        }
        bar.set_message(format!("{failing} failing"));
        bar.inc(1);
    });
    bar.finish_and_clear();
    let wall = started.elapsed().as_secs_f64();
    let failed = &summary.failed;
    let (events, sim_seconds, tally, marks) = (
        summary.events,
        summary.sim_seconds,
        summary.tally,
        &summary.marks,
    );
    let ratio = sim_seconds / wall.max(1e-9);
    let speed = if jobs == 1 {
        format!("{ratio:.0}x real time")
    } else {
        // Per thread: what each thread delivered over the whole wall time, idle tail included.
        format!(
            "{ratio:.0}x real time on {jobs} threads ({:.0}x per thread)",
            ratio / jobs as f64
        )
    };
    println!(
        "{} seed(s), {} failing, {} violation(s); {} events, {:.0} virtual s in {:.2} wall s = {speed}, {:.0} events/s",
        seeds.len(),
        failed.len(),
        summary.violations,
        events,
        sim_seconds,
        wall,
        events as f64 / wall.max(1e-9)
    );
    println!(
        "ledger: {} messages attempted ({} reliable), {} deliveries, {} handed back, {} conflated away, {} died with a crashed server, {} died with a crashed client whose store was wiped or absent, {} replies orphaned by a crashed caller, {} replies checked; slowest settle after heal {:.3}s",
        tally.attempted,
        tally.reliable,
        tally.delivered,
        tally.handed_back,
        tally.superseded,
        tally.crash_lost,
        tally.client_crash_lost,
        tally.orphaned_replies,
        tally.replies_checked,
        summary.settle_max.as_secs_f64()
    );
    println!(
        "coverage ({}/{} key marks reached): {marks}",
        marks.key_marks_reached(),
        steadfast_sim::marks::KEY_MARKS.len()
    );
    if !failed.is_empty() {
        println!("failing seeds: {failed:?}");
    }
    let trace = if single {
        format!("{:016x}", summary.trace_hash)
    } else {
        String::new()
    };
    println!(
        "SUMMARY {{\"seeds\":{},\"violations\":{},\"events\":{},\"sim_seconds\":{:.3},\"wall_seconds\":{:.3},\"trace_hash\":\"{}\",\"jobs\":{}}}",
        seeds.len(),
        summary.violations,
        events,
        sim_seconds,
        wall,
        trace,
        jobs
    );
    if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
