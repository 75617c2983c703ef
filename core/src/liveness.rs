//! Liveness: is this connection still alive?
//!
//! One [`Liveness`] per connection (not per session: a session outlives its connections). It answers
//! two questions from the times it is fed: *should we send a ping now?* (a heartbeat when we have been
//! quiet, so the peer's idle timer is fed even when the application is silent) and *is the peer
//! dead?* (nothing received for [`LivenessConfig::idle_timeout`]).
//!
//! # The frozen-process rule (seeds/000: VM live migration silently stalls TCP)
//!
//! A process that was itself frozen — a VM paused for live migration, a driver starved of CPU — sees
//! its timer fire far later than it asked. Every second of that freeze looks like a second of silence
//! from the peer, yet the peer may have been talking the whole time: its frames sit unread in our
//! socket buffer. Declaring the peer dead on that evidence turns a 30 s migration into a torn-down
//! connection on a perfectly healthy path, which is exactly the field report.
//!
//! So every entry point compares `now` with the time this connection last asked to be woken at (the
//! value [`Liveness::deadline`] returned after the previous call or, if that was a ping already due,
//! the next timer still in the future). If the call comes more than
//! [`LivenessConfig::stall_threshold`] late, *we* were frozen: the silence is treated as unknown, a
//! probe ping is due at once ([`Liveness::poll_ping`]), and the peer is given
//! [`LivenessConfig::stall_grace`] from now for any frame to arrive before it can be declared dead.
//!
//! # What is guaranteed
//!
//! Let `R` be the last receipt (the connection's start, [`Liveness::on_receive`] or
//! [`Liveness::on_pong`]) and `S` the last local stall detected after `R`, if any.
//!
//! - **Exact verdict.** [`Liveness::on_timeout`]`(now)` returns [`Verdict::Dead`] if and only if
//!   `now >= R + idle_timeout` and, if there was a stall, `now >= S + stall_grace`. Dead is final.
//! - **Never early.** So the peer is never declared dead while its last frame is less than
//!   `idle_timeout` old, nor within `stall_grace` of a stall we detected.
//! - **Detection bound without stalls.** [`Liveness::deadline`] is never later than
//!   `R + idle_timeout`; an owner that calls `on_timeout` no more than `stall_threshold` after every
//!   deadline (anything later *is* a stall) sees Dead at some `now` in
//!   `[R + idle_timeout, R + idle_timeout + stall_threshold]` — exactly at `R + idle_timeout` with an
//!   exact timer. The heartbeat interval does not enter this bound: our heartbeats feed the peer's
//!   timer, not ours. Measured from the moment the path died, `R` is at most one one-way delay later
//!   (frames already in flight), so a silently dead path is declared dead within
//!   `idle_timeout + one-way delay` (+ the timer's lateness) — design rule 4.
//! - **With stalls.** Each stall postpones the verdict to at least `S + stall_grace`. A process that
//!   stalls again within every grace never declares its peer dead on silence alone: it cannot trust
//!   its own sense of time. [`Liveness::stalls`] counts stalls so the owner can see it happening.
//!
//! A live peer running the same logic sends something at least every `heartbeat_interval`, so
//! `idle_timeout` must exceed the peer's heartbeat interval plus the path's delay variation: with the
//! defaults (1 s, 3 s) two consecutive heartbeats can be lost before a live peer is declared dead.

use alloc::sync::Arc;
use core::fmt;

use crate::time::{Duration, Instant};

/// How many recent pings [`Liveness::on_pong`] can still match to measure an RTT; a pong for an older
/// ping is stale and yields no sample (it still counts as a receipt). Four heartbeat intervals (4 s by
/// default) outlast the default idle timeout; every connection carries a slot each.
pub const PING_SLOTS: usize = 4;
// `ping_open` is a byte of flags, one per slot.
const _: () = assert!(PING_SLOTS <= 8);

/// The timers of [`Liveness`], with defaults.
///
/// ```
/// use steadfast_core::liveness::LivenessConfig;
/// use steadfast_core::time::Duration;
/// let mut config = LivenessConfig::default();
/// config.idle_timeout = Duration::from_secs(10);
/// config.stall_grace = config.idle_timeout; // the default grace follows the default idle timeout only
/// assert!(config.validate().is_ok());
/// config.heartbeat_interval = Duration::from_secs(10);
/// assert!(config.validate().is_err(), "a heartbeat no faster than the idle timeout cannot keep it fed");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct LivenessConfig {
    /// Send a ping when nothing was sent for this long, so the peer's idle timer is fed even when the
    /// application is silent. Default 1 s.
    pub heartbeat_interval: Duration,
    /// Nothing received for this long means the connection is dead. Default 3 s: design rule 4 asks
    /// for a silently dead path to be detected within a few seconds.
    pub idle_timeout: Duration,
    /// A call this much later than the deadline we asked for means *we* were frozen (a VM pause), not
    /// that the peer went quiet. Default 500 ms: far above timer jitter, far below a migration.
    pub stall_threshold: Duration,
    /// After a local stall, how long to wait for any frame (the probe's pong or anything else) before
    /// declaring the peer dead. Default: the default `idle_timeout` (3 s), i.e. a full idle period of
    /// listening that we can trust.
    pub stall_grace: Duration,
}

impl Default for LivenessConfig {
    fn default() -> Self {
        let idle_timeout = Duration::from_secs(3);
        LivenessConfig {
            heartbeat_interval: Duration::from_secs(1),
            idle_timeout,
            stall_threshold: Duration::from_millis(500),
            stall_grace: idle_timeout,
        }
    }
}

impl LivenessConfig {
    /// Checks that every timer is non-zero and that heartbeats come faster than the idle timeout.
    ///
    /// A zero timer would make the connection die (or ping, or count a stall) at the first call; a
    /// heartbeat no faster than the idle timeout lets the peer's timer expire between two of our pings.
    pub fn validate(&self) -> Result<(), LivenessError> {
        for (name, d) in [
            ("heartbeat_interval", self.heartbeat_interval),
            ("idle_timeout", self.idle_timeout),
            ("stall_threshold", self.stall_threshold),
            ("stall_grace", self.stall_grace),
        ] {
            if d.is_zero() {
                return Err(LivenessError::Zero(name));
            }
        }
        if self.heartbeat_interval >= self.idle_timeout {
            return Err(LivenessError::HeartbeatNotBelowIdle {
                heartbeat_interval: self.heartbeat_interval,
                idle_timeout: self.idle_timeout,
            });
        }
        Ok(())
    }
}

/// Why a [`LivenessConfig`] was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum LivenessError {
    /// This timer is zero.
    Zero(&'static str),
    /// The heartbeat interval is not shorter than the idle timeout, so the peer's idle timer (if it
    /// uses the same settings) could expire between two of our heartbeats.
    HeartbeatNotBelowIdle {
        /// The configured heartbeat interval.
        heartbeat_interval: Duration,
        /// The configured idle timeout.
        idle_timeout: Duration,
    },
}

impl fmt::Display for LivenessError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LivenessError::Zero(name) => write!(f, "liveness config: {name} must be non-zero"),
            LivenessError::HeartbeatNotBelowIdle {
                heartbeat_interval,
                idle_timeout,
            } => write!(
                f,
                "liveness config: heartbeat_interval {heartbeat_interval:?} must be shorter than \
                 idle_timeout {idle_timeout:?}"
            ),
        }
    }
}

impl core::error::Error for LivenessError {}

/// What [`Liveness::on_timeout`] concluded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Verdict {
    /// The peer was heard recently enough, or our own freeze makes its silence inconclusive.
    Alive,
    /// Nothing was received for the idle timeout (and any post-stall grace ran out): the owner
    /// should drop this connection. The session, which outlives connections, may reconnect.
    Dead {
        /// How long the peer had been silent when the verdict was reached.
        silent_for: Duration,
    },
}

impl Verdict {
    /// Whether this is [`Verdict::Dead`].
    pub fn is_dead(self) -> bool {
        matches!(self, Verdict::Dead { .. })
    }
}

/// Heartbeats, the idle timeout and local-stall detection for one connection, in virtual time.
///
/// Driving it: feed [`on_receive`](Self::on_receive) for every frame from the peer and
/// [`on_send`](Self::on_send) for everything written to it; after every call, drain
/// [`poll_ping`](Self::poll_ping) (send each ping it returns, carrying its id), then sleep until
/// [`deadline`](Self::deadline) and call [`on_timeout`](Self::on_timeout). A pong carrying a ping's id
/// goes to [`on_pong`](Self::on_pong). Time that goes backwards is treated as the latest time seen.
///
/// ```
/// use steadfast_core::liveness::{Liveness, LivenessConfig, Verdict};
/// use steadfast_core::time::{Duration, Instant};
/// let s = Duration::from_secs;
/// let start = Instant::ZERO;
/// let mut live = Liveness::new(LivenessConfig::default(), start);
///
/// // Quiet for a heartbeat interval: a ping is due (it feeds the peer's idle timer).
/// assert_eq!(live.deadline(), Some(start + s(1)));
/// assert_eq!(live.on_timeout(start + s(1)), Verdict::Alive);
/// let ping = live.poll_ping(start + s(1)).expect("heartbeat due");
/// assert_eq!(live.on_pong(start + s(1) + Duration::from_millis(20), ping), Some(Duration::from_millis(20)));
///
/// // The VM is paused for 30 s: the timer asked for at 2 s fires at 32 s. That silence is ours,
/// // not the peer's: probe instead of declaring it dead.
/// assert_eq!(live.deadline(), Some(start + s(2)));
/// let woke = start + s(32);
/// assert_eq!(live.on_timeout(woke), Verdict::Alive);
/// assert!(live.poll_ping(woke).is_some(), "a probe goes out at once");
/// assert_eq!(live.stalls(), 1);
///
/// // The owner keeps servicing its timers; nothing at all comes back within the grace (3 s by
/// // default), so the peer is declared dead then.
/// let (when, verdict) = loop {
///     let now = live.deadline().expect("alive until the verdict");
///     let verdict = live.on_timeout(now);
///     while live.poll_ping(now).is_some() {}
///     if verdict.is_dead() {
///         break (now, verdict);
///     }
/// };
/// assert_eq!(when, woke + s(3));
/// assert_eq!(verdict, Verdict::Dead { silent_for: s(34) - Duration::from_millis(20) });
/// ```
#[derive(Debug, Clone)]
pub struct Liveness {
    /// Shared: a server holds one copy for all its connections, not one each.
    config: Arc<LivenessConfig>,
    /// The latest `now` seen; an earlier `now` is replaced by it.
    latest: Instant,
    last_receive: Instant,
    last_send: Instant,
    /// After a stall: no Dead verdict before this instant. Cleared by any receipt.
    grace_until: Option<Instant>,
    /// A stall asked for a probe and it has not been handed out yet.
    probe_wanted: bool,
    /// A probe is outstanding: at most one; cleared by any receipt.
    probe_out: bool,
    next_ping: u64,
    /// When each of the last [`PING_SLOTS`] pings went out, slot `id % PING_SLOTS`, for RTT
    /// matching; the id is implied by `next_ping` (one slot per id still in range), which halves
    /// this part of every connection.
    ping_sent: [Instant; PING_SLOTS],
    /// Bit `slot` set: that slot's ping is unanswered.
    ping_open: u8,
    /// Saturating: at least half a second of freeze each, it would take 68 years to get there.
    stalls: u32,
    /// Set once Dead: when. `last_receive` stays as it was then, so the silence is their difference
    /// (8 bytes, where the silence itself would take 16).
    dead_at: Option<Instant>,
}

impl Liveness {
    /// A connection just established at `now`: it counts as having both received and sent at `now`.
    ///
    /// The config is taken as given; check it with [`LivenessConfig::validate`] first. (Even a zero
    /// heartbeat interval hands out at most one ping per instant.)
    pub fn new(config: LivenessConfig, now: Instant) -> Self {
        Self::with_shared_config(Arc::new(config), now)
    }

    /// As [`Liveness::new`], with a configuration it shares with others.
    pub(crate) fn with_shared_config(config: Arc<LivenessConfig>, now: Instant) -> Self {
        Liveness {
            config,
            latest: now,
            last_receive: now,
            last_send: now,
            grace_until: None,
            probe_wanted: false,
            probe_out: false,
            next_ping: 0,
            ping_sent: [now; PING_SLOTS],
            ping_open: 0,
            stalls: 0,
            dead_at: None,
        }
    }

    /// The configuration in use.
    pub fn config(&self) -> LivenessConfig {
        *self.config
    }

    /// Something (a frame, any bytes) arrived from the peer: it is alive now, the idle timer restarts
    /// and any post-stall doubt is resolved. Ignored once Dead: a verdict is final.
    pub fn on_receive(&mut self, now: Instant) {
        let now = self.enter(now);
        self.heard(now);
    }

    /// Something was written to the peer: the heartbeat timer restarts (the peer's idle timer was fed).
    pub fn on_send(&mut self, now: Instant) {
        let now = self.enter(now);
        if self.dead_at.is_none() {
            self.last_send = now;
        }
    }

    /// A ping to send now, if one is due: a probe right after a local stall, or a heartbeat because
    /// nothing was sent for `heartbeat_interval`. Returns the ping's id, which the peer's pong must
    /// carry back to [`on_pong`](Self::on_pong). Handing out a ping counts as sending it.
    ///
    /// At most one probe is outstanding at a time (a further stall before any receipt extends the
    /// grace but does not ask for a second probe), and at most one ping is handed out per instant.
    pub fn poll_ping(&mut self, now: Instant) -> Option<u64> {
        let now = self.enter(now);
        if self.dead_at.is_some() {
            None
        } else if self.probe_wanted {
            self.probe_wanted = false;
            self.probe_out = true;
            Some(self.issue(now))
        } else if self.heartbeat_due(now) {
            Some(self.issue(now))
        } else {
            None
        }
    }

    /// A pong carrying `id` arrived. It counts as a receipt (calling [`on_receive`](Self::on_receive)
    /// as well is harmless). Returns the round trip of the matching ping — which includes any local
    /// stall in between — or `None` for an id never handed out, already answered, or older than the
    /// last [`PING_SLOTS`] pings.
    pub fn on_pong(&mut self, now: Instant, id: u64) -> Option<Duration> {
        let now = self.enter(now);
        self.heard(now);
        // Only the last PING_SLOTS ids handed out still own their slot.
        let recent = self.next_ping.wrapping_sub(id).wrapping_sub(1) < PING_SLOTS as u64;
        let bit = 1u8 << Self::slot(id);
        if recent && self.ping_open & bit != 0 {
            self.ping_open &= !bit;
            Some(now - self.ping_sent[Self::slot(id)])
        } else {
            None
        }
    }

    /// Fires the timers and gives the verdict for `now`. Idempotent: calling it again with the same
    /// `now` changes nothing and returns the same verdict. Dead is final.
    ///
    /// A call more than `stall_threshold` after the deadline last returned is a local stall: the
    /// verdict is Alive, a probe becomes due, and the peer gets `stall_grace` from `now`.
    pub fn on_timeout(&mut self, now: Instant) -> Verdict {
        let now = self.enter(now);
        if self.dead_at.is_none() && now >= self.expiry() {
            self.dead_at = Some(now);
        }
        match self.dead_at {
            Some(at) => Verdict::Dead {
                silent_for: at - self.last_receive,
            },
            None => Verdict::Alive,
        }
    }

    /// When to call [`on_timeout`](Self::on_timeout) (or [`poll_ping`](Self::poll_ping)) next: the
    /// earlier of the next ping (now, if a probe is wanted) and the idle (or post-stall grace) expiry.
    /// `None` once Dead. A deadline at or before the latest `now` means "call now".
    pub fn deadline(&self) -> Option<Instant> {
        if self.dead_at.is_some() {
            return None;
        }
        let ping_at = if self.probe_wanted {
            self.latest
        } else {
            // At least 1 ns after the last send, so a zero interval cannot ping twice per instant.
            self.last_send + self.config.heartbeat_interval.max(Duration::from_nanos(1))
        };
        Some(ping_at.min(self.expiry()))
    }

    /// How many local stalls (calls more than `stall_threshold` past the deadline) were detected.
    pub fn stalls(&self) -> u64 {
        u64::from(self.stalls)
    }

    /// When the peer was last heard from (the connection's start if never).
    pub fn last_receive(&self) -> Instant {
        self.last_receive
    }

    /// Whether a Dead verdict has been given.
    pub fn is_dead(&self) -> bool {
        self.dead_at.is_some()
    }

    /// Common entry: clamps `now` to the latest seen and detects a local stall.
    fn enter(&mut self, now: Instant) -> Instant {
        let now = now.max(self.latest);
        if self.dead_at.is_none() && now - self.expected() > self.config.stall_threshold {
            self.stalls = self.stalls.saturating_add(1);
            self.grace_until = Some(now + self.config.stall_grace);
            if !self.probe_out {
                self.probe_wanted = true;
            }
        }
        self.latest = now;
        now
    }

    /// When the owner was told to call back at the latest, as of the end of the previous call (the
    /// state has not changed since): at its next timer still in the future. A ping already due is
    /// left out: an owner that has not drained it yet would otherwise look frozen at its next call.
    /// A call later than this by more than the threshold is a stall.
    fn expected(&self) -> Instant {
        let next = match self.deadline() {
            Some(d) if d > self.latest => d,
            _ => self.expiry(),
        };
        next.max(self.latest)
    }

    fn heard(&mut self, now: Instant) {
        if self.dead_at.is_some() {
            return;
        }
        self.last_receive = now;
        self.grace_until = None;
        self.probe_wanted = false;
        self.probe_out = false;
    }

    /// No Dead verdict before this: the idle expiry, pushed back to the post-stall grace if later.
    fn expiry(&self) -> Instant {
        let idle = self.last_receive + self.config.idle_timeout;
        self.grace_until.map_or(idle, |grace| grace.max(idle))
    }

    fn heartbeat_due(&self, now: Instant) -> bool {
        now > self.last_send && now - self.last_send >= self.config.heartbeat_interval
    }

    fn issue(&mut self, now: Instant) -> u64 {
        let id = self.next_ping;
        self.next_ping = self.next_ping.wrapping_add(1);
        self.ping_sent[Self::slot(id)] = now;
        self.ping_open |= 1 << Self::slot(id);
        self.last_send = now;
        id
    }

    fn slot(id: u64) -> usize {
        (id % PING_SLOTS as u64) as usize
    }
}

/// Pings answered but not yet sent. A flood beyond [`PONG_BACKLOG`] drops the oldest answers:
/// pings are probes, and the newest is the one that matters.
#[derive(Debug, Default)]
pub(crate) struct PongBacklog {
    /// A ring: the oldest unanswered id at `start`, `len` of them (a byte each is enough for
    /// [`PONG_BACKLOG`], and every connection carries one).
    ids: [u64; PONG_BACKLOG],
    start: u8,
    len: u8,
}

/// How many unsent ping answers are kept.
pub const PONG_BACKLOG: usize = 4;

impl PongBacklog {
    pub(crate) fn answer(&mut self, id: u64) {
        if usize::from(self.len) == PONG_BACKLOG {
            self.next();
        }
        self.ids[(usize::from(self.start) + usize::from(self.len)) % PONG_BACKLOG] = id;
        self.len += 1;
    }

    pub(crate) fn next(&mut self) -> Option<u64> {
        if self.len == 0 {
            return None;
        }
        let id = self.ids[usize::from(self.start)];
        self.start = ((usize::from(self.start) + 1) % PONG_BACKLOG) as u8;
        self.len -= 1;
        Some(id)
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn at(millis: u64) -> Instant {
        Instant::ZERO + ms(millis)
    }

    fn dead(millis: u64) -> Verdict {
        Verdict::Dead {
            silent_for: ms(millis),
        }
    }

    /// 1 s heartbeat, 3 s idle, 500 ms stall threshold, 3 s grace.
    fn live() -> Liveness {
        Liveness::new(LivenessConfig::default(), Instant::ZERO)
    }

    /// A prompt owner: fires every deadline up to `until` and sends every ping due, returning the
    /// verdict at the last timeout fired (Alive if none fired).
    fn run_until(l: &mut Liveness, until: Instant) -> Verdict {
        let mut verdict = Verdict::Alive;
        while let Some(d) = l.deadline() {
            if d > until {
                break;
            }
            verdict = l.on_timeout(d);
            while l.poll_ping(d).is_some() {}
        }
        verdict
    }

    #[test]
    fn the_default_config_is_valid() {
        assert_eq!(LivenessConfig::default().validate(), Ok(()));
    }

    #[test]
    fn a_zero_timer_or_a_heartbeat_slower_than_the_idle_timeout_is_refused() {
        let c = LivenessConfig {
            stall_threshold: Duration::ZERO,
            ..LivenessConfig::default()
        };
        assert_eq!(c.validate(), Err(LivenessError::Zero("stall_threshold")));
        let mut c = LivenessConfig::default();
        c.heartbeat_interval = c.idle_timeout;
        assert!(matches!(
            c.validate(),
            Err(LivenessError::HeartbeatNotBelowIdle { .. })
        ));
    }

    #[test]
    fn the_idle_timeout_declares_dead_exactly_when_due_and_not_a_nanosecond_before() {
        let mut l = live();
        assert_eq!(run_until(&mut l, at(2_999)), Verdict::Alive);
        assert_eq!(l.deadline(), Some(at(3_000)));
        let just_before = Instant::from_nanos(at(3_000).as_nanos() - 1);
        assert_eq!(l.on_timeout(just_before), Verdict::Alive);
        assert_eq!(l.on_timeout(at(3_000)), dead(3_000));
        assert_eq!(l.deadline(), None, "nothing left to time once dead");
        assert_eq!(l.stalls(), 0);
    }

    #[test]
    fn any_receipt_restarts_the_idle_timer() {
        let mut l = live();
        run_until(&mut l, at(2_500));
        l.on_receive(at(2_500));
        assert_eq!(run_until(&mut l, at(5_499)), Verdict::Alive);
        assert_eq!(l.on_timeout(at(5_499)), Verdict::Alive);
        assert_eq!(l.deadline(), Some(at(5_500)));
        assert_eq!(l.on_timeout(at(5_500)), dead(3_000));
    }

    #[test]
    fn a_quiet_connection_sends_a_heartbeat_every_interval() {
        let mut l = live();
        assert_eq!(l.poll_ping(at(999)), None);
        assert_eq!(l.deadline(), Some(at(1_000)));
        assert_eq!(l.poll_ping(at(1_000)), Some(0));
        assert_eq!(l.poll_ping(at(1_000)), None, "one ping per interval");
        assert_eq!(l.deadline(), Some(at(2_000)));
        l.on_receive(at(1_500));
        assert_eq!(l.poll_ping(at(2_000)), Some(1));
    }

    #[test]
    fn no_heartbeat_is_sent_while_data_flows() {
        let mut l = live();
        for t in (300..10_000).step_by(300) {
            l.on_send(at(t));
            l.on_receive(at(t));
            assert_eq!(l.poll_ping(at(t)), None, "data sent at {t} ms fed the peer");
            assert_eq!(l.on_timeout(at(t)), Verdict::Alive);
        }
    }

    #[test]
    fn a_thirty_second_freeze_yields_a_probe_and_alive_then_dead_if_nothing_arrives_in_the_grace() {
        let mut l = live();
        l.on_receive(at(500));
        assert_eq!(l.deadline(), Some(at(1_000)));
        // Frozen: the timer asked for at 1 s fires at 31 s.
        assert_eq!(l.on_timeout(at(31_000)), Verdict::Alive);
        assert_eq!(l.stalls(), 1);
        assert_eq!(l.deadline(), Some(at(31_000)), "a probe is due now");
        let probe = l.poll_ping(at(31_000));
        assert!(probe.is_some());
        assert_eq!(l.poll_ping(at(31_000)), None, "one probe, not one per poll");
        assert_eq!(run_until(&mut l, at(33_999)), Verdict::Alive);
        assert_eq!(l.on_timeout(at(33_999)), Verdict::Alive);
        assert_eq!(l.on_timeout(at(34_000)), dead(33_500));
        assert_eq!(
            l.stalls(),
            1,
            "prompt timers after the freeze are not stalls"
        );
    }

    #[test]
    fn a_pong_after_a_freeze_keeps_the_connection_alive() {
        let mut l = live();
        assert_eq!(l.on_timeout(at(31_000)), Verdict::Alive);
        let probe = l.poll_ping(at(31_000)).unwrap();
        assert_eq!(l.on_pong(at(31_040), probe), Some(ms(40)));
        assert_eq!(l.deadline(), Some(at(32_000)), "back to the heartbeat");
        assert_eq!(run_until(&mut l, at(34_039)), Verdict::Alive);
        assert_eq!(
            l.on_timeout(at(34_040)),
            dead(3_000),
            "the normal idle timeout again"
        );
    }

    #[test]
    fn any_receipt_after_a_freeze_resolves_the_doubt() {
        let mut l = live();
        assert_eq!(l.on_timeout(at(31_000)), Verdict::Alive);
        // Buffered data read right after waking, before the probe even went out.
        l.on_receive(at(31_001));
        assert_eq!(l.poll_ping(at(31_001)), Some(0), "the heartbeat is overdue");
        assert_eq!(run_until(&mut l, at(34_000)), Verdict::Alive);
        assert_eq!(l.on_timeout(at(34_001)), dead(3_000));
    }

    #[test]
    fn a_stall_first_seen_by_a_receipt_is_counted_and_needs_no_probe() {
        let mut l = live();
        l.on_receive(at(30_000));
        assert_eq!(l.stalls(), 1);
        assert_eq!(
            l.poll_ping(at(30_000)),
            Some(0),
            "only the overdue heartbeat"
        );
        assert_eq!(l.poll_ping(at(30_000)), None);
        assert_eq!(run_until(&mut l, at(32_999)), Verdict::Alive);
        assert_eq!(l.on_timeout(at(33_000)), dead(3_000));
        assert_eq!(l.stalls(), 1);
    }

    #[test]
    fn repeated_freezes_each_restart_the_grace_with_a_single_outstanding_probe() {
        let mut l = live();
        assert_eq!(l.on_timeout(at(30_000)), Verdict::Alive);
        let probe = l.poll_ping(at(30_000)).unwrap();
        // Frozen again before anything could be read: the deadline was the 1 s heartbeat.
        assert_eq!(l.deadline(), Some(at(31_000)));
        assert_eq!(l.on_timeout(at(60_000)), Verdict::Alive);
        assert_eq!(l.stalls(), 2);
        assert!(l.deadline() <= Some(at(60_000)), "the heartbeat is overdue");
        let ping = l.poll_ping(at(60_000)).unwrap();
        assert_ne!(ping, probe);
        // Another freeze, then the first probe's pong is finally read.
        assert_eq!(l.on_timeout(at(90_000)), Verdict::Alive);
        assert_eq!(l.stalls(), 3);
        assert_eq!(l.on_pong(at(90_001), probe), Some(ms(60_001)));
        assert_eq!(run_until(&mut l, at(93_000)), Verdict::Alive);
        assert_eq!(l.on_timeout(at(93_001)), dead(3_000));
    }

    #[test]
    fn repeated_freezes_without_any_receipt_end_dead_one_grace_after_the_last() {
        let mut l = live();
        let mut t = 0;
        for _ in 0..5 {
            let late = l.deadline().unwrap() + Duration::from_secs(20);
            t = late.as_nanos() / 1_000_000;
            assert_eq!(l.on_timeout(late), Verdict::Alive);
            while l.poll_ping(late).is_some() {}
        }
        assert_eq!(l.stalls(), 5);
        assert_eq!(run_until(&mut l, at(t + 2_999)), Verdict::Alive);
        assert_eq!(l.on_timeout(at(t + 3_000)), dead(t + 3_000));
    }

    #[test]
    fn a_timer_late_by_no_more_than_the_threshold_is_not_a_stall() {
        let mut l = live();
        assert_eq!(l.on_timeout(at(1_500)), Verdict::Alive);
        assert_eq!(l.stalls(), 0);
        assert_eq!(l.poll_ping(at(1_500)), Some(0));
        assert_eq!(l.on_timeout(at(3_000)), dead(3_000));
    }

    #[test]
    fn a_pong_matches_its_ping_once_and_stale_or_unknown_ids_are_ignored() {
        let mut l = live();
        let first = l.poll_ping(at(1_000)).unwrap();
        let second = l.poll_ping(at(2_000)).unwrap();
        assert_eq!(l.on_pong(at(2_050), second), Some(ms(50)));
        assert_eq!(l.on_pong(at(2_060), second), None, "already answered");
        assert_eq!(l.on_pong(at(2_070), first), Some(ms(1_070)));
        assert_eq!(l.on_pong(at(2_080), 99), None, "never handed out");
        // A pong too old to match still proves the peer alive.
        let mut t = 2_080;
        let oldest = l.poll_ping(at(t + 1_000)).unwrap();
        for _ in 0..PING_SLOTS {
            t += 1_000;
            l.on_receive(at(t));
            assert!(l.poll_ping(at(t + 1_000)).is_some());
        }
        assert_eq!(l.on_pong(at(t + 2_000), oldest), None, "overwritten");
        assert_eq!(l.last_receive(), at(t + 2_000));
    }

    #[test]
    fn a_ping_flood_keeps_the_newest_answers_in_order() {
        let mut pongs = PongBacklog::default();
        assert_eq!(pongs.next(), None);
        for id in 0..6 {
            pongs.answer(id);
        }
        let answered: alloc::vec::Vec<u64> = core::iter::from_fn(|| pongs.next()).collect();
        assert_eq!(answered, [2, 3, 4, 5]);
        assert!(pongs.is_empty());
    }

    #[test]
    fn on_timeout_is_idempotent_for_the_same_now() {
        let mut l = live();
        // After a stall...
        assert_eq!(l.on_timeout(at(40_000)), Verdict::Alive);
        let snapshot = (l.deadline(), l.stalls());
        assert_eq!(l.on_timeout(at(40_000)), Verdict::Alive);
        assert_eq!((l.deadline(), l.stalls()), snapshot);
        // ...and at the verdict (the probe was never drained: that is not mistaken for a stall).
        assert_eq!(l.on_timeout(at(43_000)), dead(43_000));
        assert_eq!(l.stalls(), 1);
        assert_eq!(l.on_timeout(at(43_000)), dead(43_000));
    }

    #[test]
    fn time_going_backwards_is_treated_as_the_latest_time_seen() {
        let mut l = live();
        l.on_receive(at(900));
        l.on_receive(at(500));
        assert_eq!(l.last_receive(), at(900));
        assert_eq!(l.on_timeout(at(0)), Verdict::Alive, "read as 0.9 s");
        assert_eq!(
            l.poll_ping(at(10)),
            None,
            "read as 0.9 s: no heartbeat due yet"
        );
        let ping = l.poll_ping(at(1_000)).unwrap();
        assert_eq!(
            l.on_pong(at(400), ping),
            Some(Duration::ZERO),
            "read as 1 s"
        );
        assert_eq!(run_until(&mut l, at(3_999)), Verdict::Alive);
        assert_eq!(
            l.on_timeout(at(2_000)),
            Verdict::Alive,
            "read as the latest time seen"
        );
        assert_eq!(l.on_timeout(at(4_000)), dead(3_000));
        assert_eq!(l.stalls(), 0);
    }

    #[test]
    fn dead_is_final_and_a_late_frame_does_not_revive_the_connection() {
        let mut l = live();
        assert_eq!(run_until(&mut l, at(3_000)), dead(3_000));
        l.on_receive(at(3_001));
        assert_eq!(l.poll_ping(at(10_000)), None);
        assert_eq!(l.on_timeout(at(10_000)), dead(3_000));
        assert!(l.is_dead());
    }

    #[test]
    fn a_connections_liveness_fits_in_96_bytes() {
        assert!(size_of::<Liveness>() <= 96, "{}", size_of::<Liveness>());
    }

    #[test]
    fn a_zero_heartbeat_interval_still_pings_at_most_once_per_instant() {
        let c = LivenessConfig {
            heartbeat_interval: Duration::ZERO,
            ..LivenessConfig::default()
        };
        let mut l = Liveness::new(c, Instant::ZERO);
        assert_eq!(l.poll_ping(Instant::ZERO), None);
        assert_eq!(l.poll_ping(at(1)), Some(0));
        assert_eq!(l.poll_ping(at(1)), None);
    }
}
