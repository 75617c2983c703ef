//! Time as an input.
//!
//! The core never reads a clock: every entry point takes `now`, and every deadline it asks for comes back
//! as an [`Instant`]. That is what makes a run in the simulator a pure function of its seed, and what lets
//! a frozen process (a VM paused for migration) be told apart from a dead peer.

use core::num::NonZeroU64;
use core::ops::{Add, Sub};

pub use core::time::Duration;

/// A point on the caller's monotonic clock, in nanoseconds from an origin the caller chooses.
///
/// Only differences between instants mean anything. The adapters map their runtime's clock onto it
/// (nanoseconds since the endpoint started); the simulator maps virtual time onto it. Arithmetic
/// saturates rather than wrapping, at the last representable instant, 2^64 − 2 ns (584 years), so
/// saturation never changes a real outcome.
///
/// An `Option<Instant>` takes 8 bytes, not 16 (the nanoseconds are kept one up, so zero is free to
/// mean `None`): sessions keep several optional deadlines each.
///
/// ```
/// use steadfast_core::time::{Duration, Instant};
/// let start = Instant::from_nanos(1_000);
/// let later = start + Duration::from_millis(5);
/// assert_eq!(later - start, Duration::from_millis(5));
/// assert_eq!(start - later, Duration::ZERO); // never negative
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Instant(NonZeroU64);

impl Instant {
    /// The origin of the caller's clock.
    pub const ZERO: Instant = Instant(NonZeroU64::MIN);

    /// The last representable instant: where arithmetic saturates.
    const END: Instant = Instant(NonZeroU64::MAX);

    /// The instant `nanos` nanoseconds after the origin (saturating at the end of representable
    /// time).
    pub const fn from_nanos(nanos: u64) -> Self {
        match NonZeroU64::new(nanos.saturating_add(1)) {
            Some(n) => Instant(n),
            None => Instant::END,
        }
    }

    /// The instant `d` after the origin, saturating at the end of representable time.
    pub const fn from_duration(d: Duration) -> Self {
        let n = d.as_nanos();
        Instant::from_nanos(if n > u64::MAX as u128 {
            u64::MAX
        } else {
            n as u64
        })
    }

    /// Nanoseconds since the origin.
    pub const fn as_nanos(self) -> u64 {
        self.0.get() - 1
    }

    /// How long after `earlier` this instant is; zero if it is not after it.
    pub const fn saturating_duration_since(self, earlier: Instant) -> Duration {
        Duration::from_nanos(self.0.get().saturating_sub(earlier.0.get()))
    }

    /// This instant moved `d` later, or `None` past the end of representable time.
    pub fn checked_add(self, d: Duration) -> Option<Instant> {
        let n = u64::try_from(d.as_nanos()).ok()?;
        self.0.checked_add(n).map(Instant)
    }
}

impl Default for Instant {
    fn default() -> Self {
        Instant::ZERO
    }
}

impl Add<Duration> for Instant {
    type Output = Instant;
    fn add(self, d: Duration) -> Instant {
        self.checked_add(d).unwrap_or(Instant::END)
    }
}

impl Sub<Instant> for Instant {
    type Output = Duration;
    fn sub(self, earlier: Instant) -> Duration {
        self.saturating_duration_since(earlier)
    }
}

/// A [`Duration`] kept in 8 bytes instead of 16, for state held per session: whole nanoseconds,
/// saturating at 2^64 ns (584 years), which no timeout or round-trip time reaches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub(crate) struct Span(u64);

impl Span {
    pub(crate) fn of(d: Duration) -> Self {
        Span(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
    }

    pub(crate) fn get(self) -> Duration {
        Duration::from_nanos(self.0)
    }
}

/// The earlier of two optional deadlines; `None` only if both are.
pub(crate) fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Microseconds in `d`, saturating; the unit acks use on the wire.
pub(crate) fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adding_past_the_end_of_time_saturates_instead_of_wrapping() {
        let t = Instant::from_nanos(u64::MAX - 2);
        assert_eq!(t + Duration::from_secs(1), Instant::from_nanos(u64::MAX));
        assert_eq!(t.checked_add(Duration::from_secs(1)), None);
        assert_eq!(Instant::from_nanos(u64::MAX).as_nanos(), u64::MAX - 1);
    }

    #[test]
    fn an_optional_instant_takes_no_more_room_than_an_instant() {
        assert_eq!(core::mem::size_of::<Option<Instant>>(), 8);
        assert_eq!(Instant::ZERO.as_nanos(), 0);
        assert_eq!(Instant::default(), Instant::ZERO);
        assert!(Instant::from_nanos(1) > Instant::ZERO);
    }

    #[test]
    fn a_span_keeps_a_duration_to_the_nanosecond_and_saturates_past_584_years() {
        let d = Duration::new(3, 141_592_653);
        assert_eq!(Span::of(d).get(), d);
        assert_eq!(
            Span::of(Duration::MAX).get(),
            Duration::from_nanos(u64::MAX)
        );
    }

    #[test]
    fn the_difference_to_a_later_instant_is_zero_not_negative() {
        let a = Instant::from_nanos(10);
        let b = Instant::from_nanos(20);
        assert_eq!(a - b, Duration::ZERO);
        assert_eq!(b - a, Duration::from_nanos(10));
    }

    #[test]
    fn an_instant_built_from_a_duration_counts_from_the_origin() {
        assert_eq!(
            Instant::from_duration(Duration::from_millis(3)),
            Instant::ZERO + Duration::from_millis(3)
        );
        assert_eq!(
            Instant::from_duration(Duration::MAX),
            Instant::from_nanos(u64::MAX)
        );
    }
}
