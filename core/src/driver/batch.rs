//! Batches: many sends per lock of the shared state.
//!
//! A handle's single-message calls lock the session once per message and may wake its driver once
//! per message. At small messages and high rates that lock and wake-up cost more than the core's
//! work; an application that has several messages at hand (a fan-out, a drained work queue) sends
//! them as one run, the way `Framed`'s feed-then-flush does. Both handles share the shape written
//! here.

use alloc::collections::VecDeque;
use alloc::vec::Vec;
use core::task::{Poll, Waker};

use bytes::Bytes;

use super::shared::register_in;
use crate::mode::Sent;
use crate::send::SendError;

/// How a run of sends under one lock ended.
pub(crate) enum Run {
    /// Every payload was sent.
    Done,
    /// The send queue filled up; the payload it refused is back at the front.
    Full,
    /// A payload was refused for good; the ones after it stay queued.
    Failed(SendError),
}

impl Run {
    /// Sends from the front of `payloads` until they are all sent, the queue is full, or one is
    /// refused. Returns how the run ended and whether anything was sent (the driver must hear).
    pub(crate) fn send(
        payloads: &mut VecDeque<Bytes>,
        mut send: impl FnMut(Bytes) -> Result<Sent, SendError>,
    ) -> (Run, bool) {
        Run::send_all(payloads, |q| {
            while let Some(p) = q.pop_front() {
                send(p)?;
            }
            Ok(())
        })
    }

    /// [`Run::send`] through a call that sends a whole run itself, taking each payload it sends
    /// from the front and handing a refused one back in its error.
    pub(crate) fn send_all(
        payloads: &mut VecDeque<Bytes>,
        send: impl FnOnce(&mut VecDeque<Bytes>) -> Result<(), SendError>,
    ) -> (Run, bool) {
        let before = payloads.len();
        match send(payloads) {
            Ok(()) => (Run::Done, before > 0),
            Err(SendError::QueueFull(p)) => {
                payloads.push_front(p);
                (Run::Full, payloads.len() < before)
            }
            Err(e) => (Run::Failed(e), payloads.len() + 1 < before),
        }
    }

    /// What a batch send's poll answers after this run: done, refused, or, for a full queue on a
    /// session still running, waiting for room (registered in `capacity`).
    pub(crate) fn poll(
        self,
        over: bool,
        payloads: &mut VecDeque<Bytes>,
        capacity: &mut Vec<Waker>,
        waker: &Waker,
    ) -> Poll<Result<(), SendError>> {
        match self {
            Run::Done => Poll::Ready(Ok(())),
            Run::Failed(e) => Poll::Ready(Err(e)),
            Run::Full if !over => {
                register_in(capacity, waker);
                Poll::Pending
            }
            Run::Full => Poll::Ready(Err(SendError::QueueFull(
                payloads.pop_front().unwrap_or_default(),
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Seq;

    fn payloads(n: u8) -> VecDeque<Bytes> {
        (0..n).map(|i| Bytes::from(alloc::vec![i])).collect()
    }

    #[test]
    fn a_run_stops_at_a_full_queue_and_keeps_the_refused_payload_first() {
        let mut q = payloads(5);
        let mut room = 3;
        let (run, sent) = Run::send(&mut q, |p| {
            if room == 0 {
                return Err(SendError::QueueFull(p));
            }
            room -= 1;
            Ok(Sent::Reliable(Seq::from(p[0])))
        });
        assert!(matches!(run, Run::Full));
        assert!(sent);
        assert_eq!(q, payloads(5).split_off(3), "3 and 4 wait, in order");
    }

    #[test]
    fn a_refused_payload_leaves_the_run_and_the_rest_stay_queued() {
        let mut q = payloads(4);
        let (run, sent) = Run::send(&mut q, |p| {
            if p[0] == 1 {
                Err(SendError::Closed(p))
            } else {
                Ok(Sent::Unreliable)
            }
        });
        match run {
            Run::Failed(SendError::Closed(p)) => assert_eq!(&p[..], [1]),
            _ => panic!("the second payload was refused"),
        }
        assert!(sent, "the first one went");
        assert_eq!(q, payloads(4).split_off(2));
    }
}
