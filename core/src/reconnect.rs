//! Reconnect policy as pure state: which server to connect to next, and when.
//!
//! The adapter only carries out "connect to server `i` at time `T`" ([`ConnectTo`]) and reports how it
//! went; every decision lives in [`Reconnector`], so the simulator can drive exactly the same policy the
//! real client runs, and one seed gives one schedule. This is AMPS's `ServerChooser` and
//! `DelayStrategy` folded into one state machine, without their sharp edges: no clock, no hidden
//! randomness, delays that cannot overflow, a failover list that does not wait a full backoff per
//! server, and a server that accepts connections only to drop them at once is backed off instead of
//! hammered.
//!
//! # The rules
//!
//! **Server choice.** [`Reconnector::start`] connects to server 0, the preferred one. After a failed
//! attempt, the next attempt goes to the server with the fewest *consecutive* failures
//! ([`Reconnector::failures`]); ties go to the first such server in list order *after* the one that
//! just failed, wrapping around (the failed server itself comes last). With equal counts this is
//! plain rotation through the list; a server that keeps failing is skipped until the others have
//! failed as often. A successful connection resets that server's count. After a stable
//! connection breaks, the first attempt goes back to the same server, which was healthy a moment ago.
//!
//! **Backoff growth.** The delay depends on the number `f` of consecutive failed attempts across
//! the whole list since the last success (the *streak*), counted per *pass* through the list:
//! after the `f`-th failure with `n` servers, the wait is [`Backoff::delay`]`((f - 1) / n)`. So the
//! first pass through a 3-server list waits the base delay before each server (a healthy third server
//! is reached after two base delays, not after a doubling backoff), the second pass waits
//! `initial × factor`, and so on, up to `max`. The arithmetic saturates: `factor^pass` is never
//! computed past `max`.
//!
//! **Jitter.** [`Jitter::apply`] maps the caller's `u64` of entropy onto the allowed range
//! deterministically, by scaling rather than by remainder: a span of `s` nanoseconds becomes
//! `(entropy × (s + 1)) >> 64` nanoseconds. Entropy 0 gives the shortest wait, `u64::MAX` the longest,
//! the high bits of the entropy matter most, and the same entropy always gives the same delay. Jitter
//! only ever shortens a delay, so no wait exceeds [`ReconnectPolicy::max_delay`].
//!
//! **Flapping.** A connection that breaks less than [`ReconnectPolicy::stable_after`] after it was
//! established was not a success: [`Reconnector::on_disconnected`] counts it as a failed attempt on
//! that server, continues the streak and the total-time budget where they were, and backs off as for
//! any failure (no immediate retry). Without this, a server that accepts and drops would be retried in
//! a tight loop forever, the reconnect livelock users complain about in other clients.
//!
//! **Giving up.** After a failure, [`ReconnectPolicy::max_attempts`] is checked first (the streak has
//! reached it), then [`ReconnectPolicy::max_total`] (the time since the outage began, at
//! [`Reconnector::start`] or at the break of a stable connection, has reached it). No attempt is
//! scheduled later than the outage's start plus `max_total`: the last wait is shortened so that the
//! budget is used to its end, and the failure of that last attempt gives up.

use alloc::vec;
use alloc::vec::Vec;
use core::fmt;

use crate::time::{Duration, Instant};

/// How long to wait between attempts.
///
/// Exponential backoff keeps a fleet of clients from hammering a server that is down; the cap keeps a
/// client from sleeping through the server's return.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Backoff {
    /// The same wait before every retry.
    Fixed {
        /// The wait; must not be zero (a zero wait retries in a tight loop).
        delay: Duration,
    },
    /// `initial` for the first pass through the server list, multiplied by `factor` for each further
    /// pass, never more than `max`.
    Exponential {
        /// The wait during the first pass; must not be zero.
        initial: Duration,
        /// The growth per pass; at least 1 (1 makes it a fixed delay).
        factor: u32,
        /// The longest wait; at least `initial`.
        max: Duration,
    },
}

impl Backoff {
    /// The wait before an attempt in pass `pass` (0-based) through the server list, before jitter.
    ///
    /// Saturating: the product `initial × factor^pass` is capped at `max` as soon as it reaches it, so
    /// neither a huge factor nor a huge pass number can overflow or loop long.
    ///
    /// ```
    /// use steadfast_core::reconnect::Backoff;
    /// use steadfast_core::time::Duration;
    /// let b = Backoff::Exponential {
    ///     initial: Duration::from_millis(100),
    ///     factor: 2,
    ///     max: Duration::from_secs(1),
    /// };
    /// assert_eq!(b.delay(0), Duration::from_millis(100));
    /// assert_eq!(b.delay(3), Duration::from_millis(800));
    /// assert_eq!(b.delay(u32::MAX), Duration::from_secs(1));
    /// ```
    pub fn delay(&self, pass: u32) -> Duration {
        match *self {
            Backoff::Fixed { delay } => delay,
            Backoff::Exponential {
                initial,
                factor,
                max,
            } => {
                let max_ns = max.as_nanos();
                let mut d = initial.as_nanos();
                // With d >= 1 and factor >= 2, d at least doubles per step, and `max` is below 2^95 ns:
                // the loop ends after at most ~95 steps whatever `pass` is.
                if factor >= 2 && d > 0 {
                    for _ in 0..pass {
                        if d >= max_ns {
                            break;
                        }
                        d = d.saturating_mul(u128::from(factor));
                    }
                }
                duration_from_nanos(d.min(max_ns))
            }
        }
    }

    /// The longest wait this backoff ever asks for.
    pub fn max_delay(&self) -> Duration {
        match *self {
            Backoff::Fixed { delay } => delay,
            Backoff::Exponential { max, .. } => max,
        }
    }
}

/// How the delay is randomised, so that many clients cut off together do not reconnect together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Jitter {
    /// The exact backoff delay: reproducible, but a fleet cut off at once returns at once.
    None,
    /// Uniform in `[0, d]`: spreads a fleet the most, at the price of sometimes retrying at once.
    Full,
    /// `d/2` plus uniform in `[0, d/2]` (exactly: `[d - ⌊d/2⌋, d]`): spread, yet never less than half
    /// the backoff.
    Equal,
}

impl Jitter {
    /// The delay to wait instead of `delay`, drawn from `entropy`.
    ///
    /// The mapping is deterministic: a span of `s` nanoseconds is covered by
    /// `(entropy × (s + 1)) >> 64`, so entropy 0 gives the bottom of the range and `u64::MAX` the top.
    /// Delays beyond 2^64 − 1 ns (584 years, past what an [`Instant`] can reach anyway) are first
    /// capped there. The result never exceeds `delay`.
    ///
    /// ```
    /// use steadfast_core::reconnect::Jitter;
    /// use steadfast_core::time::Duration;
    /// let d = Duration::from_millis(800);
    /// assert_eq!(Jitter::Full.apply(d, 0), Duration::ZERO);
    /// assert_eq!(Jitter::Full.apply(d, u64::MAX), d);
    /// assert_eq!(Jitter::Equal.apply(d, 0), Duration::from_millis(400));
    /// assert_eq!(Jitter::None.apply(d, 12345), d);
    /// ```
    pub fn apply(self, delay: Duration, entropy: u64) -> Duration {
        let d = u64::try_from(delay.as_nanos()).unwrap_or(u64::MAX);
        match self {
            Jitter::None => delay,
            Jitter::Full => Duration::from_nanos(scale(entropy, d)),
            Jitter::Equal => {
                let half = d / 2;
                Duration::from_nanos(d - half + scale(entropy, half))
            }
        }
    }
}

/// `entropy` mapped onto `[0, span]`: `(entropy × (span + 1)) >> 64`, which cannot overflow a `u128`.
fn scale(entropy: u64, span: u64) -> u64 {
    let scaled = (u128::from(entropy) * (u128::from(span) + 1)) >> 64;
    // entropy < 2^64, so scaled <= span.
    u64::try_from(scaled).unwrap_or(span)
}

/// A `Duration` of `n` nanoseconds; `n` always comes from an existing `Duration`, so it fits.
fn duration_from_nanos(n: u128) -> Duration {
    const NANOS_PER_SEC: u128 = 1_000_000_000;
    let secs = u64::try_from(n / NANOS_PER_SEC).unwrap_or(u64::MAX);
    let nanos = u32::try_from(n % NANOS_PER_SEC).unwrap_or(0);
    Duration::new(secs, nanos)
}

/// When and how long to retry, and when to give up. [`ReconnectPolicy::default`] suits most clients.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ReconnectPolicy {
    /// The wait between attempts, growing per pass through the server list.
    pub backoff: Backoff,
    /// How the wait is randomised.
    pub jitter: Jitter,
    /// Give up after trying this long without success (`None`: never). Measured from the start of the
    /// outage; no attempt is scheduled past it.
    pub max_total: Option<Duration>,
    /// Give up after this many consecutive failed attempts across the list (`None`: never).
    pub max_attempts: Option<u32>,
    /// After a stable connection breaks, try the same server once at once before backing off: most
    /// breaks (a VM migration, a NAT rebinding) heal on the first retry.
    pub first_attempt_immediate: bool,
    /// A connection must stay up this long to count as a success. One that breaks sooner counts as a
    /// failed attempt on its server, so a server that accepts and drops at once is backed off rather
    /// than retried in a tight loop. Zero trusts every connection.
    pub stable_after: Duration,
}

impl Default for ReconnectPolicy {
    /// Exponential backoff from 100 ms doubling to 10 s with equal jitter, never giving up, one
    /// immediate retry after a break, and connections stable after 1 s.
    fn default() -> Self {
        ReconnectPolicy {
            backoff: Backoff::Exponential {
                initial: Duration::from_millis(100),
                factor: 2,
                max: Duration::from_secs(10),
            },
            jitter: Jitter::Equal,
            max_total: None,
            max_attempts: None,
            first_attempt_immediate: true,
            stable_after: Duration::from_secs(1),
        }
    }
}

impl ReconnectPolicy {
    /// Checks that the policy can be followed: no zero delays (a hot retry loop), a factor of at least
    /// 1, `max >= initial`, and limits that allow at least one attempt.
    pub fn validate(&self) -> Result<(), PolicyError> {
        match self.backoff {
            Backoff::Fixed { delay } => {
                if delay.is_zero() {
                    return Err(PolicyError::ZeroDelay("backoff.delay"));
                }
            }
            Backoff::Exponential {
                initial,
                factor,
                max,
            } => {
                if factor == 0 {
                    return Err(PolicyError::ZeroFactor);
                }
                if initial.is_zero() {
                    return Err(PolicyError::ZeroDelay("backoff.initial"));
                }
                if max < initial {
                    return Err(PolicyError::MaxBelowInitial);
                }
            }
        }
        if self.max_total == Some(Duration::ZERO) {
            return Err(PolicyError::ZeroLimit("max_total"));
        }
        if self.max_attempts == Some(0) {
            return Err(PolicyError::ZeroLimit("max_attempts"));
        }
        Ok(())
    }

    /// The longest wait between a report and the attempt it schedules, jitter included.
    pub fn max_delay(&self) -> Duration {
        self.backoff.max_delay()
    }
}

/// A [`ReconnectPolicy`] (or server count) that cannot be followed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum PolicyError {
    /// The exponential factor is 0, which would collapse every delay after the first pass to zero.
    ZeroFactor,
    /// This delay is zero, so failures would be retried in a tight loop.
    ZeroDelay(&'static str),
    /// The exponential `max` is below `initial`.
    MaxBelowInitial,
    /// This limit is zero, so not even one attempt would be allowed; `None` means "no limit".
    ZeroLimit(&'static str),
    /// The server list is empty.
    NoServers,
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PolicyError::ZeroFactor => write!(f, "reconnect policy: backoff factor must be >= 1"),
            PolicyError::ZeroDelay(name) => write!(f, "reconnect policy: {name} must not be zero"),
            PolicyError::MaxBelowInitial => {
                write!(f, "reconnect policy: backoff max must be >= initial")
            }
            PolicyError::ZeroLimit(name) => {
                write!(f, "reconnect policy: {name} must be None or above zero")
            }
            PolicyError::NoServers => write!(f, "reconnect policy: the server list is empty"),
        }
    }
}

impl core::error::Error for PolicyError {}

/// A connect the adapter should make: to `server` (an index into its list), not before `at`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectTo {
    /// Index into the adapter's server list; always below the count given to [`Reconnector::new`].
    pub server: usize,
    /// When to connect; the adapter sleeps until then ([`Reconnector::deadline`]).
    pub at: Instant,
    /// 1-based number of this attempt since [`Reconnector::start`] or the last stable connection.
    pub attempt: u32,
}

/// Why the [`Reconnector`] stopped trying. Terminal until [`Reconnector::start`] is called again.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum GaveUp {
    /// [`ReconnectPolicy::max_total`] ran out.
    MaxTotal {
        /// From the start of the outage to the last failure.
        tried_for: Duration,
        /// Consecutive failed attempts in the outage.
        attempts: u32,
    },
    /// [`ReconnectPolicy::max_attempts`] consecutive attempts failed.
    MaxAttempts {
        /// Consecutive failed attempts in the outage.
        attempts: u32,
    },
}

/// Failure counts of one server.
#[derive(Debug, Clone, Copy, Default)]
struct Health {
    consecutive: u32,
    total: u64,
}

/// What the outage looked like before a connection came up, so that a connection that breaks before
/// it is stable can continue it instead of starting afresh.
#[derive(Debug, Clone, Copy)]
struct Before {
    streak: u32,
    consecutive: u32,
    outage_start: Instant,
}

#[derive(Debug, Clone)]
enum State {
    /// Not started.
    Idle,
    /// An attempt is scheduled and its outcome not yet reported.
    Pending(ConnectTo),
    /// Connected to `current` since `since`.
    Connected { since: Instant, before: Before },
    /// Stopped trying.
    GaveUp(GaveUp),
}

/// Reconnect policy as pure state: decides which server to connect to next and when; the adapter
/// carries the decision out and reports the outcome. See the [module documentation](self) for the
/// rules.
///
/// The adapter's loop: call [`start`](Self::start); whenever [`next_attempt`](Self::next_attempt)
/// is `Some`, sleep until its `at` ([`deadline`](Self::deadline)), connect, and report
/// [`on_connected`](Self::on_connected) or [`on_connect_failed`](Self::on_connect_failed); when an
/// established connection breaks, report [`on_disconnected`](Self::on_disconnected). A report that
/// does not fit the state (a failure when no attempt is pending, a disconnect when not connected, any
/// report before `start` or after giving up) is ignored. Time must not go backwards; if it does,
/// durations saturate at zero.
///
/// ```
/// use steadfast_core::reconnect::{ConnectTo, GaveUp, Jitter, ReconnectPolicy, Reconnector};
/// use steadfast_core::time::{Duration, Instant};
///
/// let mut policy = ReconnectPolicy::default();
/// policy.jitter = Jitter::None; // exact times for the example; keep jitter in production
/// policy.max_attempts = Some(5);
/// let mut rc = Reconnector::new(policy, 2)?;
///
/// let mut now = Instant::ZERO;
/// rc.start(now);
/// let mut log = Vec::new();
/// // Both servers are down: the adapter's loop, with time jumping to each deadline.
/// let gave_up = loop {
///     let Some(ConnectTo { server, at, .. }) = rc.next_attempt() else { unreachable!() };
///     now = at; // sleep until rc.deadline()
///     log.push((server, (at - Instant::ZERO).as_millis()));
///     let entropy = 0; // from the adapter's RNG; unused with Jitter::None
///     if let Some(g) = rc.on_connect_failed(now, entropy) {
///         break g;
///     }
/// };
/// // First pass at the base delay, then doubling per pass through the list.
/// assert_eq!(log, [(0, 0), (1, 100), (0, 200), (1, 400), (0, 600)]);
/// assert_eq!(gave_up, GaveUp::MaxAttempts { attempts: 5 });
/// assert_eq!(rc.next_attempt(), None);
///
/// // Start again; this time server 0 answers and stays up.
/// rc.start(now);
/// rc.on_connected(now);
/// assert_eq!(rc.next_attempt(), None);
/// assert_eq!(rc.failures(0), 0);
/// assert_eq!(rc.total_failures(0), 3);
/// # Ok::<(), steadfast_core::reconnect::PolicyError>(())
/// ```
#[derive(Debug, Clone)]
pub struct Reconnector {
    policy: ReconnectPolicy,
    servers: Vec<Health>,
    /// The server of the pending attempt or of the connection.
    current: usize,
    /// Consecutive failed attempts across the list since the last stable success.
    streak: u32,
    /// When the current outage began (start, or the break of a stable connection).
    outage_start: Instant,
    state: State,
}

impl Reconnector {
    /// A reconnector over `servers` servers (indices `0..servers`, 0 preferred) following `policy`.
    /// Refuses a policy [`ReconnectPolicy::validate`] refuses, and an empty list.
    pub fn new(policy: ReconnectPolicy, servers: usize) -> Result<Self, PolicyError> {
        policy.validate()?;
        if servers == 0 {
            return Err(PolicyError::NoServers);
        }
        Ok(Reconnector {
            policy,
            servers: vec![Health::default(); servers],
            current: 0,
            streak: 0,
            outage_start: Instant::ZERO,
            state: State::Idle,
        })
    }

    /// Schedules the very first connect: server 0, at `now`.
    ///
    /// Calling it again starts a fresh run from any state (after giving up, say): the streak, the
    /// time budget and the consecutive failure counts are cleared; total failure counts are kept.
    pub fn start(&mut self, now: Instant) {
        for s in &mut self.servers {
            s.consecutive = 0;
        }
        self.current = 0;
        self.streak = 0;
        self.outage_start = now;
        self.state = State::Pending(ConnectTo {
            server: 0,
            at: now,
            attempt: 1,
        });
    }

    /// The attempt the adapter should make: the same value until its outcome is reported, so asking
    /// twice never makes two connects. `None` before [`start`](Self::start), while connected, and
    /// after giving up.
    pub fn next_attempt(&self) -> Option<ConnectTo> {
        match self.state {
            State::Pending(c) => Some(c),
            _ => None,
        }
    }

    /// When the adapter should next wake up for this reconnector (the scheduled attempt's `at`), to be
    /// folded into its `poll_timeout`.
    pub fn deadline(&self) -> Option<Instant> {
        self.next_attempt().map(|c| c.at)
    }

    /// The pending attempt succeeded. Resets the streak (and with it the backoff) and the server's
    /// consecutive failures; the connection counts as a success for good once it has stayed up
    /// [`ReconnectPolicy::stable_after`]. Ignored unless an attempt is pending.
    pub fn on_connected(&mut self, now: Instant) {
        if !matches!(self.state, State::Pending(_)) {
            return;
        }
        let health = &mut self.servers[self.current];
        let before = Before {
            streak: self.streak,
            consecutive: health.consecutive,
            outage_start: self.outage_start,
        };
        health.consecutive = 0;
        self.streak = 0;
        self.state = State::Connected { since: now, before };
    }

    /// The pending attempt failed. Counts the failure against its server, then either gives up
    /// (returning why, also kept in [`gave_up`](Self::gave_up)) or schedules the next attempt on the
    /// chosen server after the backoff delay, jittered by `entropy`. Ignored (returning `None`) unless
    /// an attempt is pending.
    pub fn on_connect_failed(&mut self, now: Instant, entropy: u64) -> Option<GaveUp> {
        if !matches!(self.state, State::Pending(_)) {
            return None;
        }
        self.fail(now, entropy)
    }

    /// The established connection broke. If it had been up at least
    /// [`ReconnectPolicy::stable_after`], a new outage begins: one attempt at once on the same server
    /// if [`ReconnectPolicy::first_attempt_immediate`], otherwise one after the base delay. If it broke
    /// sooner, it counts as a failed attempt, exactly as [`on_connect_failed`](Self::on_connect_failed),
    /// and may give up. Ignored (returning `None`) unless connected.
    pub fn on_disconnected(&mut self, now: Instant, entropy: u64) -> Option<GaveUp> {
        let State::Connected { since, before } = self.state else {
            return None;
        };
        if now - since < self.policy.stable_after {
            // Not a success after all: continue the outage it interrupted.
            self.streak = before.streak;
            self.servers[self.current].consecutive = before.consecutive;
            self.outage_start = before.outage_start;
            return self.fail(now, entropy);
        }
        self.streak = 0;
        self.outage_start = now;
        let at = if self.policy.first_attempt_immediate {
            now
        } else {
            self.schedule_time(now, 0, entropy)
        };
        self.state = State::Pending(ConnectTo {
            server: self.current,
            at,
            attempt: 1,
        });
        None
    }

    /// Consecutive failures of `server` (0 for an index outside the list): reset when it connects,
    /// and the key to which server is tried next.
    pub fn failures(&self, server: usize) -> u32 {
        self.servers.get(server).map_or(0, |s| s.consecutive)
    }

    /// All failures of `server` since this reconnector was made (0 for an index outside the list).
    pub fn total_failures(&self, server: usize) -> u64 {
        self.servers.get(server).map_or(0, |s| s.total)
    }

    /// Why the reconnector stopped trying, once it has.
    pub fn gave_up(&self) -> Option<&GaveUp> {
        match &self.state {
            State::GaveUp(g) => Some(g),
            _ => None,
        }
    }

    /// Whether an established connection is up (as far as the reports say).
    pub fn is_connected(&self) -> bool {
        matches!(self.state, State::Connected { .. })
    }

    /// The number of servers in the list.
    pub fn servers(&self) -> usize {
        self.servers.len()
    }

    /// The policy being followed.
    pub fn policy(&self) -> &ReconnectPolicy {
        &self.policy
    }

    /// Counts a failed attempt on the current server, then gives up or schedules the next attempt.
    fn fail(&mut self, now: Instant, entropy: u64) -> Option<GaveUp> {
        let health = &mut self.servers[self.current];
        health.consecutive = health.consecutive.saturating_add(1);
        health.total = health.total.saturating_add(1);
        self.streak = self.streak.saturating_add(1);

        let attempts = self.streak;
        let tried_for = now - self.outage_start;
        let gave_up = if self.policy.max_attempts.is_some_and(|m| attempts >= m) {
            Some(GaveUp::MaxAttempts { attempts })
        } else if self.policy.max_total.is_some_and(|t| tried_for >= t) {
            Some(GaveUp::MaxTotal {
                tried_for,
                attempts,
            })
        } else {
            None
        };
        if let Some(g) = gave_up {
            self.state = State::GaveUp(g.clone());
            return Some(g);
        }

        self.current = self.choose_next();
        let servers = u32::try_from(self.servers.len()).unwrap_or(u32::MAX);
        let pass = (attempts - 1) / servers;
        let at = self.schedule_time(now, pass, entropy);
        self.state = State::Pending(ConnectTo {
            server: self.current,
            at,
            attempt: attempts.saturating_add(1),
        });
        None
    }

    /// The server with the fewest consecutive failures; ties to the first in list order after the
    /// current one, wrapping, the current one last.
    fn choose_next(&self) -> usize {
        let n = self.servers.len();
        let mut best = self.current;
        let mut fewest = u32::MAX;
        for k in 1..=n {
            let i = (self.current + k) % n;
            let c = self.servers[i].consecutive;
            if c < fewest {
                fewest = c;
                best = i;
            }
        }
        best
    }

    /// `now` plus the jittered backoff for `pass`, but never past the end of the time budget.
    fn schedule_time(&self, now: Instant, pass: u32, entropy: u64) -> Instant {
        let delay = self
            .policy
            .jitter
            .apply(self.policy.backoff.delay(pass), entropy);
        let at = now + delay;
        match self.policy.max_total {
            // The budget's end is after `now` here (else `fail` gave up), so `at` stays >= now.
            Some(t) => at.min(self.outage_start + t).max(now),
            None => at,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn t(n: u64) -> Instant {
        Instant::ZERO + ms(n)
    }

    fn policy(backoff: Backoff) -> ReconnectPolicy {
        ReconnectPolicy {
            backoff,
            jitter: Jitter::None,
            ..ReconnectPolicy::default()
        }
    }

    fn exponential(initial: u64, factor: u32, max: u64) -> Backoff {
        Backoff::Exponential {
            initial: ms(initial),
            factor,
            max: ms(max),
        }
    }

    /// Fails every attempt exactly at its scheduled time; returns (server, at in ms) of each attempt
    /// made, the first included.
    fn fail_at_each_deadline(rc: &mut Reconnector, attempts: usize) -> Vec<(usize, u64)> {
        let mut log = Vec::new();
        for _ in 0..attempts {
            let c = rc.next_attempt().expect("an attempt is scheduled");
            log.push((
                c.server,
                u64::try_from((c.at - Instant::ZERO).as_millis()).unwrap(),
            ));
            rc.on_connect_failed(c.at, 0);
        }
        log
    }

    #[test]
    fn fixed_backoff_waits_the_same_delay_after_every_failure() {
        let mut rc = Reconnector::new(policy(Backoff::Fixed { delay: ms(250) }), 1).unwrap();
        rc.start(t(1000));
        let log = fail_at_each_deadline(&mut rc, 5);
        assert_eq!(log, [(0, 1000), (0, 1250), (0, 1500), (0, 1750), (0, 2000)]);
    }

    #[test]
    fn exponential_backoff_doubles_up_to_the_maximum() {
        let mut rc = Reconnector::new(policy(exponential(100, 2, 1000)), 1).unwrap();
        rc.start(t(0));
        let times: Vec<u64> = fail_at_each_deadline(&mut rc, 8)
            .into_iter()
            .map(|(_, at)| at)
            .collect();
        // Waits 100, 200, 400, 800, then 1000 (capped), 1000, 1000.
        assert_eq!(times, [0, 100, 300, 700, 1500, 2500, 3500, 4500]);
    }

    #[test]
    fn the_first_pass_through_the_list_waits_only_the_base_delay() {
        let mut rc = Reconnector::new(policy(exponential(100, 2, 10_000)), 3).unwrap();
        rc.start(t(0));
        let log = fail_at_each_deadline(&mut rc, 8);
        // Pass 0 (failures 1-3) waits 100 before each server, pass 1 waits 200, pass 2 waits 400.
        assert_eq!(
            log,
            [
                (0, 0),
                (1, 100),
                (2, 200),
                (0, 300),
                (1, 500),
                (2, 700),
                (0, 900),
                (1, 1300)
            ]
        );
    }

    #[test]
    fn the_backoff_saturates_instead_of_overflowing() {
        let b = Backoff::Exponential {
            initial: Duration::from_nanos(1),
            factor: u32::MAX,
            max: Duration::MAX,
        };
        assert_eq!(b.delay(0), Duration::from_nanos(1));
        assert_eq!(b.delay(u32::MAX), Duration::MAX);
        let mut p = policy(b);
        p.jitter = Jitter::Full;
        let mut rc = Reconnector::new(p, 1).unwrap();
        rc.start(Instant::from_nanos(u64::MAX - 5));
        for _ in 0..200 {
            rc.on_connect_failed(Instant::from_nanos(u64::MAX - 5), u64::MAX);
        }
        assert_eq!(rc.deadline(), Some(Instant::from_nanos(u64::MAX)));
        // An invalid zero initial (only reachable by calling `delay` directly) must not loop long.
        let zero = Backoff::Exponential {
            initial: Duration::ZERO,
            factor: 2,
            max: Duration::MAX,
        };
        assert_eq!(zero.delay(u32::MAX), Duration::ZERO);
    }

    #[test]
    fn full_jitter_stays_between_zero_and_the_delay_for_extreme_entropy() {
        for d in [
            Duration::ZERO,
            Duration::from_nanos(1),
            ms(800),
            Duration::from_nanos(u64::MAX),
            Duration::MAX,
        ] {
            let cap = Duration::from_nanos(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
            assert_eq!(Jitter::Full.apply(d, 0), Duration::ZERO);
            assert_eq!(Jitter::Full.apply(d, u64::MAX), cap);
            let mid = Jitter::Full.apply(d, 1 << 63);
            assert!(mid <= d);
        }
        assert_eq!(Jitter::Full.apply(ms(800), 1 << 63), ms(400));
    }

    #[test]
    fn equal_jitter_stays_between_half_and_the_whole_delay_for_extreme_entropy() {
        assert_eq!(Jitter::Equal.apply(ms(800), 0), ms(400));
        assert_eq!(Jitter::Equal.apply(ms(800), u64::MAX), ms(800));
        // Odd spans: [d - floor(d/2), d].
        assert_eq!(
            Jitter::Equal.apply(Duration::from_nanos(3), 0),
            Duration::from_nanos(2)
        );
        assert_eq!(
            Jitter::Equal.apply(Duration::from_nanos(3), u64::MAX),
            Duration::from_nanos(3)
        );
        let top = Duration::from_nanos(u64::MAX);
        assert_eq!(
            Jitter::Equal.apply(Duration::MAX, 0),
            Duration::from_nanos(u64::MAX - u64::MAX / 2)
        );
        assert_eq!(Jitter::Equal.apply(Duration::MAX, u64::MAX), top);
    }

    #[test]
    fn jittered_attempts_are_scheduled_within_the_jitter_range() {
        let mut p = policy(Backoff::Fixed { delay: ms(1000) });
        for (jitter, entropy, expected) in [
            (Jitter::Full, 0, 0),
            (Jitter::Full, u64::MAX, 1000),
            (Jitter::Equal, 0, 500),
            (Jitter::Equal, u64::MAX, 1000),
        ] {
            p.jitter = jitter;
            let mut rc = Reconnector::new(p.clone(), 1).unwrap();
            rc.start(t(0));
            rc.on_connect_failed(t(10), entropy);
            assert_eq!(
                rc.deadline(),
                Some(t(10 + expected)),
                "{jitter:?} {entropy}"
            );
        }
    }

    #[test]
    fn failures_rotate_through_three_servers_in_list_order_and_are_counted() {
        let mut rc = Reconnector::new(policy(Backoff::Fixed { delay: ms(10) }), 3).unwrap();
        rc.start(t(0));
        let mut order = Vec::new();
        let mut counts = Vec::new();
        for _ in 0..6 {
            let c = rc.next_attempt().unwrap();
            order.push(c.server);
            rc.on_connect_failed(c.at, 0);
            counts.push([rc.failures(0), rc.failures(1), rc.failures(2)]);
        }
        assert_eq!(order, [0, 1, 2, 0, 1, 2]);
        assert_eq!(
            counts,
            [
                [1, 0, 0],
                [1, 1, 0],
                [1, 1, 1],
                [2, 1, 1],
                [2, 2, 1],
                [2, 2, 2]
            ]
        );
        assert_eq!(
            [
                rc.total_failures(0),
                rc.total_failures(1),
                rc.total_failures(2)
            ],
            [2, 2, 2]
        );
        assert_eq!(rc.failures(3), 0);
        assert_eq!(rc.total_failures(3), 0);
    }

    #[test]
    fn rotation_prefers_the_server_with_the_fewest_consecutive_failures() {
        let mut rc = Reconnector::new(policy(Backoff::Fixed { delay: ms(10) }), 3).unwrap();
        rc.start(t(0));
        // Server 1 has failed often in the past; 0 and 2 once.
        rc.servers[1].consecutive = 4;
        rc.servers[2].consecutive = 1;
        rc.on_connect_failed(t(0), 0);
        // Counts (1, 4, 1): 2 comes before 0 in the order after 0, and 1 is skipped.
        assert_eq!(rc.next_attempt().unwrap().server, 2);
        rc.on_connect_failed(t(10), 0);
        // (1, 4, 2): server 0 alone has the fewest.
        assert_eq!(rc.next_attempt().unwrap().server, 0);
    }

    #[test]
    fn the_last_server_that_worked_is_retried_while_it_has_failed_least() {
        let mut rc = Reconnector::new(policy(Backoff::Fixed { delay: ms(10) }), 3).unwrap();
        rc.start(t(0));
        for _ in 0..5 {
            let c = rc.next_attempt().unwrap();
            rc.on_connect_failed(c.at, 0);
        }
        // Servers 0 and 1 failed twice, 2 once, and 2 is next and answers.
        let c = rc.next_attempt().unwrap();
        assert_eq!(c.server, 2);
        rc.on_connected(c.at);
        rc.on_disconnected(c.at + Duration::from_secs(60), 0);
        let c = rc.next_attempt().unwrap();
        assert_eq!((c.server, c.attempt), (2, 1));
        rc.on_connect_failed(c.at, 0);
        // (2, 2, 1): server 2 is tried again rather than rotating to 0.
        assert_eq!(rc.next_attempt().unwrap().server, 2);
        rc.on_connect_failed(c.at, 0);
        // (2, 2, 2): a tie again, so rotation resumes after 2.
        assert_eq!(rc.next_attempt().unwrap().server, 0);
    }

    #[test]
    fn a_successful_connect_resets_the_backoff_and_the_servers_failures() {
        let mut rc = Reconnector::new(policy(exponential(100, 2, 10_000)), 1).unwrap();
        rc.start(t(0));
        fail_at_each_deadline(&mut rc, 4);
        let c = rc.next_attempt().unwrap();
        assert_eq!((c.at, c.attempt), (t(1500), 5));
        assert_eq!(rc.failures(0), 4);
        rc.on_connected(t(1500));
        assert!(rc.is_connected());
        assert_eq!(rc.next_attempt(), None);
        assert_eq!(rc.deadline(), None);
        assert_eq!(rc.failures(0), 0);
        assert_eq!(rc.total_failures(0), 4);
        // A stable connection breaks: one immediate attempt, then the base delay again.
        rc.on_disconnected(t(5000), 0);
        assert_eq!(
            rc.next_attempt(),
            Some(ConnectTo {
                server: 0,
                at: t(5000),
                attempt: 1
            })
        );
        rc.on_connect_failed(t(5000), 0);
        assert_eq!(
            rc.next_attempt(),
            Some(ConnectTo {
                server: 0,
                at: t(5100),
                attempt: 2
            })
        );
    }

    #[test]
    fn without_an_immediate_first_attempt_a_break_waits_the_base_delay() {
        let mut p = policy(exponential(100, 2, 10_000));
        p.first_attempt_immediate = false;
        let mut rc = Reconnector::new(p, 2).unwrap();
        rc.start(t(0));
        rc.on_connect_failed(t(0), 0);
        rc.on_connected(t(100));
        assert_eq!(rc.on_disconnected(t(9000), 0), None);
        assert_eq!(
            rc.next_attempt(),
            Some(ConnectTo {
                server: 1,
                at: t(9100),
                attempt: 1
            })
        );
    }

    #[test]
    fn a_connection_that_breaks_before_it_is_stable_counts_as_a_failed_attempt() {
        let mut p = policy(exponential(100, 2, 10_000));
        p.stable_after = Duration::from_secs(1);
        p.max_attempts = Some(4);
        let mut rc = Reconnector::new(p, 1).unwrap();
        rc.start(t(0));
        rc.on_connect_failed(t(0), 0); // streak 1
        rc.on_connected(t(100));
        // Accepted, then dropped after 50 ms: streak 2, no immediate retry, backoff continues.
        assert_eq!(rc.on_disconnected(t(150), 0), None);
        assert_eq!(rc.failures(0), 2);
        assert_eq!(
            rc.next_attempt(),
            Some(ConnectTo {
                server: 0,
                at: t(350),
                attempt: 3
            })
        );
        rc.on_connect_failed(t(350), 0); // streak 3
        rc.on_connected(t(750));
        // The flap that makes four gives up, as any fourth failure would.
        assert_eq!(
            rc.on_disconnected(t(760), 0),
            Some(GaveUp::MaxAttempts { attempts: 4 })
        );
        assert_eq!(rc.next_attempt(), None);
    }

    #[test]
    fn max_attempts_gives_up_after_that_many_consecutive_failures() {
        let mut p = policy(Backoff::Fixed { delay: ms(10) });
        p.max_attempts = Some(3);
        let mut rc = Reconnector::new(p, 2).unwrap();
        rc.start(t(0));
        assert_eq!(rc.on_connect_failed(t(0), 0), None);
        assert_eq!(rc.on_connect_failed(t(10), 0), None);
        assert_eq!(rc.next_attempt().unwrap().attempt, 3);
        let g = rc.on_connect_failed(t(20), 0);
        assert_eq!(g, Some(GaveUp::MaxAttempts { attempts: 3 }));
        assert_eq!(rc.gave_up(), g.as_ref());
        assert_eq!(rc.next_attempt(), None);
        assert_eq!(rc.deadline(), None);
        assert_eq!([rc.total_failures(0), rc.total_failures(1)], [2, 1]);
    }

    #[test]
    fn max_total_gives_up_when_the_time_budget_is_spent() {
        let mut p = policy(Backoff::Fixed { delay: ms(1000) });
        p.max_total = Some(ms(2500));
        let mut rc = Reconnector::new(p, 1).unwrap();
        rc.start(t(0));
        assert_eq!(rc.on_connect_failed(t(0), 0), None);
        assert_eq!(rc.deadline(), Some(t(1000)));
        assert_eq!(rc.on_connect_failed(t(1000), 0), None);
        assert_eq!(rc.deadline(), Some(t(2000)));
        assert_eq!(rc.on_connect_failed(t(2000), 0), None);
        // The next wait would end at 3000, past the budget: the last attempt is at its end instead.
        assert_eq!(rc.deadline(), Some(t(2500)));
        assert_eq!(
            rc.on_connect_failed(t(2500), 0),
            Some(GaveUp::MaxTotal {
                tried_for: ms(2500),
                attempts: 4
            })
        );
        assert_eq!(rc.next_attempt(), None);
    }

    #[test]
    fn the_time_budget_counts_from_the_break_of_a_stable_connection() {
        let mut p = policy(Backoff::Fixed { delay: ms(1000) });
        p.max_total = Some(ms(1500));
        let mut rc = Reconnector::new(p, 1).unwrap();
        rc.start(t(0));
        rc.on_connected(t(0));
        rc.on_disconnected(t(10_000), 0);
        assert_eq!(rc.on_connect_failed(t(10_000), 0), None);
        assert_eq!(rc.on_connect_failed(t(11_000), 0), None);
        assert_eq!(rc.deadline(), Some(t(11_500)));
        assert_eq!(
            rc.on_connect_failed(t(11_500), 0),
            Some(GaveUp::MaxTotal {
                tried_for: ms(1500),
                attempts: 3
            })
        );
    }

    #[test]
    fn next_attempt_is_idempotent_until_the_outcome_is_reported() {
        let mut p = policy(Backoff::Fixed { delay: ms(10) });
        p.jitter = Jitter::Full;
        let mut rc = Reconnector::new(p, 2).unwrap();
        assert_eq!(rc.next_attempt(), None);
        rc.start(t(5));
        let first = rc.next_attempt();
        assert_eq!(rc.next_attempt(), first);
        assert_eq!(rc.deadline(), Some(t(5)));
        rc.on_connect_failed(t(5), 1 << 63);
        let second = rc.next_attempt().unwrap();
        for _ in 0..3 {
            assert_eq!(rc.next_attempt(), Some(second));
            assert_eq!(rc.deadline(), Some(second.at));
        }
        assert_eq!(
            second,
            ConnectTo {
                server: 1,
                at: t(10),
                attempt: 2
            }
        );
    }

    #[test]
    fn reports_that_do_not_fit_the_state_are_ignored() {
        let mut rc = Reconnector::new(policy(Backoff::Fixed { delay: ms(10) }), 2).unwrap();
        // Before start.
        assert_eq!(rc.on_connect_failed(t(0), 0), None);
        rc.on_connected(t(0));
        assert_eq!(rc.on_disconnected(t(0), 0), None);
        assert_eq!(rc.next_attempt(), None);
        assert_eq!(rc.total_failures(0), 0);
        // A disconnect while an attempt is pending.
        rc.start(t(0));
        let pending = rc.next_attempt();
        assert_eq!(rc.on_disconnected(t(1), 0), None);
        assert_eq!(rc.next_attempt(), pending);
        // A failure while connected.
        rc.on_connected(t(1));
        assert_eq!(rc.on_connect_failed(t(2), 0), None);
        assert!(rc.is_connected());
        assert_eq!(rc.total_failures(0), 0);
    }

    #[test]
    fn once_given_up_nothing_is_scheduled_until_started_again() {
        let mut p = policy(Backoff::Fixed { delay: ms(10) });
        p.max_attempts = Some(1);
        let mut rc = Reconnector::new(p, 2).unwrap();
        rc.start(t(0));
        let g = rc.on_connect_failed(t(0), 0);
        assert_eq!(g, Some(GaveUp::MaxAttempts { attempts: 1 }));
        rc.on_connected(t(1));
        assert_eq!(rc.on_connect_failed(t(2), 0), None);
        assert_eq!(rc.on_disconnected(t(3), 0), None);
        assert_eq!(rc.next_attempt(), None);
        assert_eq!(rc.gave_up(), g.as_ref());
        rc.start(t(100));
        assert_eq!(rc.gave_up(), None);
        assert_eq!(rc.failures(0), 0);
        assert_eq!(rc.total_failures(0), 1);
        assert_eq!(
            rc.next_attempt(),
            Some(ConnectTo {
                server: 0,
                at: t(100),
                attempt: 1
            })
        );
    }

    #[test]
    fn a_policy_with_factor_zero_is_refused() {
        let p = policy(exponential(100, 0, 1000));
        assert_eq!(p.validate(), Err(PolicyError::ZeroFactor));
        assert_eq!(
            Reconnector::new(p, 1).map(|_| ()),
            Err(PolicyError::ZeroFactor)
        );
    }

    #[test]
    fn unusable_policies_and_an_empty_server_list_are_refused() {
        assert_eq!(ReconnectPolicy::default().validate(), Ok(()));
        let refused = |p: ReconnectPolicy| p.validate().unwrap_err();
        assert_eq!(
            refused(policy(Backoff::Fixed {
                delay: Duration::ZERO
            })),
            PolicyError::ZeroDelay("backoff.delay")
        );
        assert_eq!(
            refused(policy(exponential(0, 2, 1000))),
            PolicyError::ZeroDelay("backoff.initial")
        );
        assert_eq!(
            refused(policy(exponential(100, 2, 99))),
            PolicyError::MaxBelowInitial
        );
        let p = ReconnectPolicy {
            max_total: Some(Duration::ZERO),
            ..ReconnectPolicy::default()
        };
        assert_eq!(refused(p), PolicyError::ZeroLimit("max_total"));
        let p = ReconnectPolicy {
            max_attempts: Some(0),
            ..ReconnectPolicy::default()
        };
        assert_eq!(refused(p), PolicyError::ZeroLimit("max_attempts"));
        assert_eq!(
            Reconnector::new(ReconnectPolicy::default(), 0).map(|_| ()),
            Err(PolicyError::NoServers)
        );
        // Factor 1 is a fixed delay, and allowed.
        assert_eq!(policy(exponential(100, 1, 100)).validate(), Ok(()));
    }
}
