//! Sweeps: many seeds, on one thread or several, folded into one [`Summary`] in seed order.
//!
//! Each seed runs alone (a run shares nothing with another), so the threads only decide *when* a
//! seed runs, never what it does; the outcomes are folded, and handed to the caller, in the order
//! of the seeds. A sweep's summary, and everything printed from it, is the same for any number of
//! threads.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;

use steadfast_core::time::Duration;

use crate::checker::Tally;
use crate::marks::Marks;
use crate::params::{Canary, Params, Workload};
use crate::world::{Outcome, run};

/// A sweep's totals.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Summary {
    /// Seeds run.
    pub seeds: usize,
    /// The seeds with a violation, in order.
    pub failed: Vec<u64>,
    /// Violations over all seeds.
    pub violations: usize,
    /// Events processed over all seeds.
    pub events: u64,
    /// Virtual seconds simulated over all seeds (summed in seed order).
    pub sim_seconds: f64,
    /// The slowest settle after the heal.
    pub settle_max: Duration,
    /// Ledger totals.
    pub tally: Tally,
    /// Coverage marks over all seeds.
    pub marks: Marks,
    /// The last seed's trace hash.
    pub trace_hash: u64,
}

impl Summary {
    /// Folds one seed's outcome in (outcomes must come in seed order for a reproducible sum).
    pub fn add(&mut self, out: &Outcome) {
        self.seeds += 1;
        self.events += out.events;
        self.sim_seconds += out.sim_time.as_secs_f64();
        self.marks.merge(&out.marks);
        self.trace_hash = out.trace_hash;
        self.settle_max = self
            .settle_max
            .max(out.settled_after.unwrap_or(Duration::ZERO));
        let (t, s) = (out.tally, &mut self.tally);
        s.attempted += t.attempted;
        s.reliable += t.reliable;
        s.delivered += t.delivered;
        s.handed_back += t.handed_back;
        s.superseded += t.superseded;
        s.crash_lost += t.crash_lost;
        s.client_crash_lost += t.client_crash_lost;
        s.orphaned_replies += t.orphaned_replies;
        s.replies_checked += t.replies_checked;
        if !out.violations.is_empty() {
            self.violations += out.violations.len();
            self.failed.push(out.params.seed);
        }
    }
}

/// How many threads a sweep uses by default: one per available core.
pub fn default_jobs() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Runs `seeds` under `workload` (and `canary`) on up to `jobs` threads, and returns their summary.
/// `each` sees every outcome on the calling thread, in the order of `seeds`, right after it is
/// folded into the summary (to print a failure, or move a progress bar).
pub fn sweep(
    seeds: &[u64],
    workload: &Workload,
    canary: Option<Canary>,
    jobs: usize,
    mut each: impl FnMut(&Outcome),
) -> Summary {
    let mut summary = Summary::default();
    let run_seed = |seed: u64| run(Params::draw(seed, workload.clone(), canary));
    let jobs = jobs.clamp(1, seeds.len().max(1));
    if jobs == 1 {
        for &seed in seeds {
            let out = run_seed(seed);
            summary.add(&out);
            each(&out);
        }
        return summary;
    }
    let next = AtomicUsize::new(0);
    std::thread::scope(|scope| {
        let (tx, rx) = mpsc::channel::<(usize, Outcome)>();
        for _ in 0..jobs {
            let tx = tx.clone();
            let (next, run_seed) = (&next, &run_seed);
            scope.spawn(move || {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(&seed) = seeds.get(i) else {
                        break;
                    };
                    if tx.send((i, run_seed(seed))).is_err() {
                        break;
                    }
                }
            });
        }
        drop(tx);
        // Outcomes arrive in the order they finish; they wait here until every earlier seed's has.
        let mut waiting: BTreeMap<usize, Outcome> = BTreeMap::new();
        let mut folded = 0;
        for (i, out) in rx {
            waiting.insert(i, out);
            while let Some(out) = waiting.remove(&folded) {
                summary.add(&out);
                each(&out);
                folded += 1;
            }
        }
    });
    summary
}
