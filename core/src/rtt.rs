//! Round-trip time estimation and the retransmission timeout (RFC 6298).
//!
//! Only datagram transports retransmit on a timer; stream transports leave that to TCP and retransmit
//! only when a session resumes over a new connection.

use crate::time::{Duration, Span};

/// Smoothed RTT, its variation, and the retransmission timeout derived from them.
///
/// ```
/// use steadfast_core::rtt::RttEstimator;
/// use steadfast_core::time::Duration;
/// let ms = Duration::from_millis;
/// let mut rtt = RttEstimator::new(ms(100), ms(5), ms(10), ms(2000));
/// rtt.on_sample(ms(20), Duration::ZERO);
/// assert_eq!(rtt.smoothed(), ms(20));
/// // RTO = SRTT + 4·RTTVAR + max_ack_delay = 20 + 4·10 + 5 ms.
/// assert_eq!(rtt.rto(), ms(65));
/// ```
#[derive(Debug, Clone)]
pub struct RttEstimator {
    // Spans, not Durations: a server holds one per session.
    smoothed: Span,
    variation: Span,
    latest: Span,
    has_sample: bool,
    /// The longest the peer deliberately holds an ack back: always part of the wait.
    max_ack_delay: Span,
    min_rto: Span,
    max_rto: Span,
}

impl RttEstimator {
    /// An estimator that assumes `initial` until the first sample, with the RTO clamped to
    /// `[min_rto, max_rto]` and including the peer's `max_ack_delay`. Durations are kept to the
    /// nanosecond, saturating at 2^64 ns (584 years).
    pub fn new(
        initial: Duration,
        max_ack_delay: Duration,
        min_rto: Duration,
        max_rto: Duration,
    ) -> Self {
        RttEstimator {
            smoothed: Span::of(initial),
            variation: Span::of(initial / 2),
            latest: Span::of(initial),
            has_sample: false,
            max_ack_delay: Span::of(max_ack_delay),
            min_rto: Span::of(min_rto),
            max_rto: Span::of(max_rto.max(min_rto)),
        }
    }

    /// Feeds one measurement: the time from sending a message to receiving its ack, of which
    /// `ack_delay` was spent by the peer deliberately holding the ack back.
    pub fn on_sample(&mut self, measured: Duration, ack_delay: Duration) {
        // The peer's hold time is not network delay, but it may not claim more than it promised
        // (RFC 9002 §5.3), nor more than the whole measurement.
        let ack_delay = ack_delay.min(self.max_ack_delay.get());
        let rtt = if measured > ack_delay {
            measured - ack_delay
        } else {
            measured
        };
        self.latest = Span::of(rtt);
        if !self.has_sample {
            self.has_sample = true;
            self.smoothed = Span::of(rtt);
            self.variation = Span::of(rtt / 2);
            return;
        }
        let smoothed = self.smoothed.get();
        let diff = smoothed.abs_diff(rtt);
        // RTTVAR = 3/4 RTTVAR + 1/4 |SRTT - R|; SRTT = 7/8 SRTT + 1/8 R.
        self.variation = Span::of((self.variation.get() * 3 + diff) / 4);
        self.smoothed = Span::of((smoothed * 7 + rtt) / 8);
    }

    /// The smoothed round-trip time.
    pub fn smoothed(&self) -> Duration {
        self.smoothed.get()
    }

    /// The most recent sample.
    pub fn latest(&self) -> Duration {
        self.latest.get()
    }

    /// The retransmission timeout before any backoff: SRTT + 4·RTTVAR (at least 1 ms) plus the
    /// peer's maximum ack delay (RFC 9002's PTO), clamped to `[min_rto, max_rto]`.
    pub fn rto(&self) -> Duration {
        let variation = (self.variation.get() * 4).max(Duration::from_millis(1));
        (self.smoothed.get() + variation + self.max_ack_delay.get())
            .clamp(self.min_rto.get(), self.max_rto.get())
    }

    /// The retransmission timeout after `backoff` consecutive expiries (doubling each time), clamped.
    pub fn rto_with_backoff(&self, backoff: u32) -> Duration {
        let max = self.max_rto.get();
        self.rto()
            .checked_mul(1u32 << backoff.min(16))
            .unwrap_or(max)
            .min(max)
    }

    /// How long after sending a message, with something sent later already acknowledged, it is
    /// declared lost: 9/8 of the larger of the smoothed and latest RTT (RFC 9002's time threshold).
    pub fn loss_delay(&self) -> Duration {
        (self.smoothed.max(self.latest).get() * 9 / 8).max(Duration::from_millis(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn the_first_sample_replaces_the_initial_guess() {
        let mut r = RttEstimator::new(ms(500), ms(5), ms(1), ms(10_000));
        r.on_sample(ms(40), Duration::ZERO);
        assert_eq!(r.smoothed(), ms(40));
        assert_eq!(r.rto(), ms(40 + 4 * 20 + 5));
    }

    #[test]
    fn later_samples_move_the_estimate_by_an_eighth() {
        let mut r = RttEstimator::new(ms(100), ms(5), ms(1), ms(10_000));
        r.on_sample(ms(80), Duration::ZERO);
        r.on_sample(ms(160), Duration::ZERO);
        assert_eq!(r.smoothed(), ms(90));
    }

    #[test]
    fn the_peers_ack_delay_is_not_counted_as_path_delay() {
        let mut r = RttEstimator::new(ms(100), ms(25), ms(1), ms(10_000));
        r.on_sample(ms(30), ms(10));
        assert_eq!(r.latest(), ms(20));
        r.on_sample(ms(5), ms(10));
        assert_eq!(r.latest(), ms(5), "an implausible ack delay is ignored");
    }

    #[test]
    fn a_peer_claiming_more_ack_delay_than_it_promised_is_held_to_its_promise() {
        let mut r = RttEstimator::new(ms(100), ms(5), ms(1), ms(10_000));
        r.on_sample(ms(100), ms(99));
        assert_eq!(r.latest(), ms(95));
    }

    #[test]
    fn a_steady_path_still_waits_out_the_peers_ack_delay_before_retransmitting() {
        let mut r = RttEstimator::new(ms(100), ms(25), ms(1), ms(10_000));
        for _ in 0..100 {
            r.on_sample(ms(20), Duration::ZERO);
        }
        assert!(
            r.rto() > ms(20 + 25),
            "rto {:?} would fire before the ack can arrive",
            r.rto()
        );
    }

    #[test]
    fn backoff_doubles_the_timeout_up_to_the_maximum() {
        let mut r = RttEstimator::new(ms(100), ms(5), ms(200), ms(1_000));
        r.on_sample(ms(40), Duration::ZERO);
        assert_eq!(r.rto(), ms(200), "clamped up to the minimum");
        assert_eq!(r.rto_with_backoff(1), ms(400));
        assert_eq!(r.rto_with_backoff(3), ms(1_000));
        assert_eq!(r.rto_with_backoff(u32::MAX), ms(1_000));
    }
}
