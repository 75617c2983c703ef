//! # steadfast-sim
//!
//! The deterministic simulator: drives the [`steadfast_core`] client and server state machines
//! directly in virtual time, injects the faults of the field report, runs its workload, and checks
//! the delivery contract with a Jepsen-style ledger. Every run is a pure function of its seed.
//!
//! | module | what |
//! |---|---|
//! | [`params`] | the workload, and what the swarm draws per seed: latencies, fault mix, rates |
//! | [`world`] | the event queue, the nodes, the connections, the faults, the workload |
//! | [`checker`] | the ledger and its safety and liveness rules |
//! | [`store`] | a client's durable store, which outlives its process, and what a crash keeps of it |
//! | [`marks`] | coverage marks: which fault and recovery paths a run exercised |
//! | [`trace`] | the determinism self-check (an FNV-1a fold over every event) |
//! | [`sweep`](mod@sweep) | many seeds on one thread or several, summed up in seed order |
//!
//! Command line (the last line is machine-readable `SUMMARY {...}`; a failing seed prints its
//! violations, its parameters and a one-line replay, and the exit status is non-zero):
//!
//! ```text
//! cargo run --release -p steadfast-sim -- --seeds 1000          # a sweep, with a progress bar
//! cargo run --release -p steadfast-sim -- --seeds 1000 --jobs 1 # the same sweep on one thread
//! cargo run --release -p steadfast-sim -- --seed 42             # one seed: parameters, marks, trace hash
//! cargo run --release -p steadfast-sim -- --seeds 20 --canary dup-delivery   # must fail
//! cargo run --release -p steadfast-sim -- --seeds 300 --transport datagram     # datagrams only
//! STEADFAST_SIM_DUMP=1 cargo run --release -p steadfast-sim -- --seed 1       # end state of a hang
//! STEADFAST_SIM_LOG=1 cargo run --release -p steadfast-sim -- --seed 1        # every app event
//! cargo run --release -p steadfast-sim -- --seeds 2000 --client-crashes 6   # crash-heavy
//! ```
//!
//! Client processes crash too (half the seeds, or every seed with `--client-crashes`): the
//! `Client` is dropped with everything in memory and restarts after a while on its durable
//! [`store`] — kept (then its session resumes with nothing lost and nothing delivered twice),
//! kept minus its unflushed tail (a power loss), or wiped (then its new process starts a new
//! session and the server must end the old one loudly). The simulated application records each
//! delivery in its ledger and consumes the message in the same step, and recognises a
//! `Redelivered` message its ledger already holds.
//!
//! Each seed draws its transport. Over streams the faults are resets, blackholes, half-open
//! connections and partitions that hold bytes back; over datagrams every packet of each path
//! direction goes through its own drawn faults (latency with jitter that reorders, uniform and
//! Gilbert–Elliott bursty loss, duplication, bit flips, truncation, a capacity in packets in
//! flight), which stop when the network heals. Both get one-way partitions and swizzle-clogging.
//!
//! ```
//! use steadfast_sim::params::{Params, Workload};
//! use steadfast_core::{Transport, time::Duration};
//! let mut w = Workload::default();
//! w.clients = 3;
//! w.duration = Duration::from_secs(5);
//! w.transport = Some(Transport::Stream); // the swarm draws it per seed when `None`
//! let a = steadfast_sim::run(Params::draw(7, w.clone(), None));
//! let b = steadfast_sim::run(Params::draw(7, w, None));
//! assert_eq!(a.trace_hash, b.trace_hash);
//! assert!(a.violations.is_empty(), "{:?}", a.violations);
//! ```
#![forbid(unsafe_code)]

pub mod checker;
pub mod marks;
pub mod params;
pub mod store;
pub mod sweep;
pub mod trace;
pub mod world;

pub use steadfast_core as core;
pub use sweep::{Summary, sweep};
pub use world::{Outcome, run};
