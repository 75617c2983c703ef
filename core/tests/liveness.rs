//! Liveness under random schedules in virtual time, against the guarantees stated in
//! `steadfast_core::liveness`:
//!
//! - the verdict is exact: Dead iff `now >= R + idle_timeout` and `now >= S + stall_grace` (R the last
//!   receipt, S the last stall since it), so never Dead while the last receipt is within the idle
//!   timeout nor within the grace after a stall;
//! - a stall is detected exactly when the owner calls more than `stall_threshold` late, and the first
//!   one since a receipt hands out a probe at once;
//! - once receipts stop and no stall occurs, an owner calling within `stall_threshold` of every
//!   deadline sees Dead in `[max(R + idle, S + grace), that + stall_threshold]`.

use proptest::prelude::*;
use steadfast_core::liveness::{Liveness, LivenessConfig, Verdict};
use steadfast_core::time::{Duration, Instant};

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn config() -> impl Strategy<Value = LivenessConfig> {
    (50u64..2_000, 1u64..5_000, 10u64..1_000, 1u64..6_000).prop_map(
        |(heartbeat, extra_idle, threshold, grace)| {
            let mut c = LivenessConfig::default();
            c.heartbeat_interval = ms(heartbeat);
            c.idle_timeout = ms(heartbeat + extra_idle);
            c.stall_threshold = ms(threshold);
            c.stall_grace = ms(grace);
            c.validate().expect("generated config is valid");
            c
        },
    )
}

/// What the peer or the application does, `gap` after the previous step (timers due in between fire
/// first, each a little late but within the stall threshold).
#[derive(Debug, Clone)]
enum Op {
    Receive,
    Send,
    /// A pong for one of the pings handed out so far (picked by index), or any receipt if none.
    Pong(usize),
    Nothing,
    /// The process freezes for longer than the stall threshold by `extra`; the first call after it is
    /// the timer (`then == 0`), a receipt (1) or a send (2).
    Freeze {
        extra: Duration,
        then: u8,
    },
}

fn op(freezes: bool) -> BoxedStrategy<Op> {
    let plain = prop_oneof![
        3 => Just(Op::Receive),
        2 => Just(Op::Send),
        1 => any::<usize>().prop_map(Op::Pong),
        2 => Just(Op::Nothing),
    ];
    if freezes {
        prop_oneof![
            8 => plain,
            1 => (0u64..60_000, 0u8..3).prop_map(|(extra, then)| Op::Freeze { extra: ms(extra) + Duration::from_nanos(1), then }),
        ]
        .boxed()
    } else {
        plain.boxed()
    }
}

fn schedule(freezes: bool) -> impl Strategy<Value = Vec<(u64, Op)>> {
    // Gaps up to 8 s: longer than some idle timeouts, so Dead verdicts happen mid-schedule too.
    prop::collection::vec((0u64..8_000, op(freezes)), 0..120)
}

/// A prompt owner driving one `Liveness`, with the model of what it must conclude.
struct Driver {
    cfg: LivenessConfig,
    live: Liveness,
    now: Instant,
    /// The model's last receipt and last stall since it.
    receipt: Instant,
    stall: Option<Instant>,
    /// A probe went out since the last receipt.
    probed: bool,
    pings: Vec<u64>,
    stalls: u64,
    /// Timer lateness, as fractions (per mille) of the stall threshold, cycled through.
    jitter: Vec<u16>,
    next_jitter: usize,
    dead_at: Option<Instant>,
}

impl Driver {
    fn new(cfg: LivenessConfig, jitter: Vec<u16>) -> Self {
        Driver {
            cfg,
            live: Liveness::new(cfg, Instant::ZERO),
            now: Instant::ZERO,
            receipt: Instant::ZERO,
            stall: None,
            probed: false,
            pings: Vec::new(),
            stalls: 0,
            jitter,
            next_jitter: 0,
            dead_at: None,
        }
    }

    fn lateness(&mut self) -> Duration {
        let per_mille = self.jitter[self.next_jitter % self.jitter.len()];
        self.next_jitter += 1;
        self.cfg.stall_threshold * u32::from(per_mille) / 1_000
    }

    /// When the model says Dead may first be declared.
    fn due(&self) -> Instant {
        let idle = self.receipt + self.cfg.idle_timeout;
        self.stall
            .map_or(idle, |s| idle.max(s + self.cfg.stall_grace))
    }

    fn drain_pings(&mut self) {
        while let Some(id) = self.live.poll_ping(self.now) {
            self.pings.push(id);
        }
    }

    /// Calls `on_timeout` at `self.now` and checks the verdict against the model.
    fn timeout(&mut self) -> Result<(), TestCaseError> {
        let verdict = self.live.on_timeout(self.now);
        if let Some(at) = self.dead_at {
            prop_assert_eq!(
                verdict,
                Verdict::Dead {
                    silent_for: at - self.receipt
                },
                "Dead is final"
            );
            return Ok(());
        }
        let want_dead = self.now >= self.due();
        prop_assert_eq!(
            verdict.is_dead(),
            want_dead,
            "at {:?}: receipt {:?}, stall {:?}, config {:?}",
            self.now,
            self.receipt,
            self.stall,
            self.cfg
        );
        if let Verdict::Dead { silent_for } = verdict {
            prop_assert!(
                self.now - self.receipt >= self.cfg.idle_timeout,
                "dead while the last receipt is recent"
            );
            prop_assert_eq!(silent_for, self.now - self.receipt);
            self.dead_at = Some(self.now);
            prop_assert_eq!(self.live.deadline(), None);
        } else {
            prop_assert!(
                self.live.deadline().unwrap() <= self.due().max(self.now),
                "deadline past the verdict"
            );
        }
        self.drain_pings();
        Ok(())
    }

    /// Fires every timer that comes due before `target`, each late by at most the threshold.
    fn timers_until(&mut self, target: Instant) -> Result<(), TestCaseError> {
        while self.dead_at.is_none() {
            // Within the threshold of the deadline itself, not merely of the last call.
            let deadline = self.live.deadline().expect("alive");
            let when = (deadline + self.lateness()).max(self.now);
            if when >= target {
                break;
            }
            self.now = when;
            self.timeout()?;
        }
        Ok(())
    }

    fn heard(&mut self) {
        if self.dead_at.is_none() {
            self.receipt = self.now;
            self.stall = None;
            self.probed = false;
        }
    }

    fn apply(&mut self, op: &Op) -> Result<(), TestCaseError> {
        match *op {
            Op::Receive => {
                self.live.on_receive(self.now);
                self.heard();
            }
            Op::Send => self.live.on_send(self.now),
            Op::Pong(i) => {
                match self.pings.get(i % self.pings.len().max(1)) {
                    Some(&id) => {
                        self.live.on_pong(self.now, id);
                    }
                    None => self.live.on_receive(self.now),
                }
                self.heard();
            }
            Op::Nothing => {}
            Op::Freeze { extra, then } => {
                let deadline = self.live.deadline().unwrap_or(self.now);
                self.now = deadline.max(self.now) + self.cfg.stall_threshold + extra;
                let first_since_receipt = !self.probed;
                let alive = self.dead_at.is_none();
                if alive {
                    self.stalls += 1;
                    self.stall = Some(self.now);
                }
                let before = self.pings.len();
                match then {
                    0 => self.timeout()?,
                    1 => {
                        self.live.on_receive(self.now);
                        self.heard();
                    }
                    _ => {
                        self.live.on_send(self.now);
                        prop_assert!(
                            !alive
                                || !first_since_receipt
                                || self.live.deadline().unwrap() <= self.now,
                            "a probe is due at once"
                        );
                    }
                }
                if alive && then != 1 {
                    prop_assert!(!self.live.is_dead(), "dead right after our own freeze");
                    self.drain_pings();
                    if first_since_receipt {
                        prop_assert!(self.pings.len() > before, "no probe after a stall");
                    }
                    self.probed = true;
                }
            }
        }
        self.drain_pings();
        prop_assert_eq!(
            self.live.stalls(),
            self.stalls,
            "stall count at {:?}",
            self.now
        );
        Ok(())
    }

    fn run(&mut self, schedule: &[(u64, Op)]) -> Result<(), TestCaseError> {
        for (gap, op) in schedule {
            if self.dead_at.is_some() {
                break;
            }
            if matches!(op, Op::Freeze { .. }) {
                self.apply(op)?;
                continue;
            }
            let target = self.now + ms(*gap);
            self.timers_until(target)?;
            if self.dead_at.is_some() {
                break;
            }
            self.now = target;
            self.apply(op)?;
        }
        Ok(())
    }

    /// Receipts stop; the owner keeps servicing its timers promptly. Returns when Dead was declared.
    fn run_to_verdict(&mut self) -> Result<Instant, TestCaseError> {
        let due = self.due();
        let mut fired = 0;
        while self.dead_at.is_none() {
            fired += 1;
            prop_assert!(fired < 100_000, "no verdict");
            let deadline = self.live.deadline().expect("alive");
            self.now = (deadline + self.lateness()).max(self.now);
            self.timeout()?;
        }
        let at = self.dead_at.unwrap();
        prop_assert!(
            at >= due && at <= due + self.cfg.stall_threshold,
            "dead at {:?}, due {:?}",
            at,
            due
        );
        prop_assert_eq!(
            self.live.stalls(),
            self.stalls,
            "a prompt owner is never stalled"
        );
        Ok(at)
    }
}

fn jitter() -> impl Strategy<Value = Vec<u16>> {
    prop::collection::vec(prop_oneof![Just(0u16), Just(1_000u16), 0u16..=1_000], 1..16)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]

    #[test]
    fn without_stalls_the_verdict_is_exact_and_a_dead_path_is_declared_within_the_bound(
        cfg in config(),
        schedule in schedule(false),
        jitter in jitter(),
    ) {
        let mut d = Driver::new(cfg, jitter);
        d.run(&schedule)?;
        prop_assert_eq!(d.live.stalls(), 0);
        if d.dead_at.is_none() {
            let at = d.run_to_verdict()?;
            // With no stall the bound is the idle timeout alone, plus the owner's lateness.
            prop_assert!(at - d.receipt <= cfg.idle_timeout + cfg.stall_threshold);
        }
    }

    #[test]
    fn with_freezes_the_peer_is_never_declared_dead_on_our_own_silence(
        cfg in config(),
        schedule in schedule(true),
        jitter in jitter(),
    ) {
        let mut d = Driver::new(cfg, jitter);
        d.run(&schedule)?;
        if d.dead_at.is_none() {
            d.run_to_verdict()?;
        }
    }
}
