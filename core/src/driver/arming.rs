//! When the server's timer task sleeps until, and when another task must wake it.
//!
//! The server keeps time in one task. A connection's task that reads a message makes the core owe
//! an ack by `max_ack_delay` from then, which is sooner than the heartbeat the timer task sleeps
//! until; the reply that follows carries the ack and the deadline goes. Waking the timer task for
//! each such deadline cost a task wake per message: at 10,000 round trips a second, 1.6 futex calls
//! and 1.4 context switches per message more than raw TCP. So while deadlines keep coming, the
//! timer task wakes every `tick` (the ack delay) instead, and a deadline no sooner than its next
//! tick needs no wake. The timer still never sleeps past a deadline: one sooner than it is set
//! for wakes it, as before.

use super::sooner;
use crate::time::{Duration, Instant};

/// The timer task's deadline, and whether deadlines are coming in faster than it is set.
#[derive(Debug)]
pub(crate) struct Arming {
    /// What the timer sleeps until.
    armed: Option<Instant>,
    /// The core's own next deadline when the timer was set; `armed` may be sooner (a tick).
    due: Option<Instant>,
    /// Whether a deadline sooner than `due` came in since the timer was set.
    busy: bool,
    tick: Duration,
}

impl Arming {
    /// Ticks every `tick` while busy; at least 1 ms, so that a zero ack delay cannot make it spin.
    pub(crate) fn new(tick: Duration) -> Self {
        Arming {
            armed: None,
            due: None,
            busy: false,
            tick: tick.max(Duration::from_millis(1)),
        }
    }

    /// After a core call made outside the timer task, with `next` the core's deadline now: whether
    /// the timer task must be woken to set its timer again.
    pub(crate) fn must_wake(&mut self, next: Option<Instant>) -> bool {
        if sooner(next, self.due) {
            self.busy = true;
        }
        sooner(next, self.armed)
    }

    /// The timer task sets its timer, at `now`, with `next` the core's deadline: until `next`, or
    /// one tick from now if deadlines came in since the last time.
    pub(crate) fn arm(&mut self, now: Instant, next: Option<Instant>) -> Option<Instant> {
        self.due = next;
        self.armed = if core::mem::take(&mut self.busy) {
            let tick = now + self.tick;
            Some(next.map_or(tick, |t| t.min(tick)))
        } else {
            next
        };
        self.armed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ACK: Duration = Duration::from_millis(5);

    fn at(ms: u64) -> Instant {
        Instant::from_nanos(ms * 1_000_000)
    }

    /// A timer asleep until the heartbeat at 1 s, woken by a deadline at `deadline` ms.
    fn woken_for(deadline: u64) -> Arming {
        let mut a = Arming::new(ACK);
        a.arm(at(0), Some(at(1000)));
        assert!(a.must_wake(Some(at(deadline))));
        a
    }

    #[test]
    fn an_idle_timer_sleeps_until_the_cores_deadline() {
        let mut a = Arming::new(ACK);
        assert_eq!(a.arm(at(0), Some(at(1000))), Some(at(1000)));
        assert_eq!(a.arm(at(1000), None), None);
    }

    #[test]
    fn the_first_sooner_deadline_wakes_the_timer_and_starts_it_ticking() {
        let mut a = woken_for(15);
        assert_eq!(a.arm(at(11), Some(at(1000))), Some(at(16)));
    }

    #[test]
    fn deadlines_the_next_tick_covers_need_no_wake() {
        let mut a = woken_for(15);
        a.arm(at(10), Some(at(1000)));
        // Messages read at 11, 12 and 14 ms owe acks 5 ms later: none is before the tick at 15.
        for read in [11, 12, 14] {
            assert!(!a.must_wake(Some(at(read + 5))));
        }
        // They kept it busy, so the tick at 15 sets the next one.
        assert_eq!(a.arm(at(15), Some(at(1000))), Some(at(20)));
    }

    #[test]
    fn a_tick_with_no_new_deadline_stops_the_ticking() {
        let mut a = woken_for(15);
        assert_eq!(a.arm(at(10), Some(at(1000))), Some(at(15)));
        assert_eq!(a.arm(at(15), Some(at(1000))), Some(at(1000)));
    }

    #[test]
    fn a_deadline_sooner_than_the_tick_still_wakes_the_timer() {
        let mut a = woken_for(5);
        a.arm(at(1), Some(at(1000)));
        assert!(a.must_wake(Some(at(3))));
    }

    #[test]
    fn the_timer_never_sleeps_past_the_cores_deadline() {
        let mut a = Arming::new(ACK);
        a.arm(at(0), None);
        assert!(a.must_wake(Some(at(50))));
        assert_eq!(a.arm(at(1), Some(at(3))), Some(at(3)));
    }

    #[test]
    fn a_zero_ack_delay_ticks_every_millisecond_not_continuously() {
        let mut a = Arming::new(Duration::ZERO);
        a.arm(at(0), None);
        assert!(a.must_wake(Some(at(50))));
        assert_eq!(a.arm(at(1), Some(at(50))), Some(at(2)));
    }
}
