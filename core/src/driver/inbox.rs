//! Events on their way to the application, behind a lock of their own.
//!
//! A connection's task decodes a read under the session's lock, and a busy link's read holds
//! thousands of frames. Were the application to take its events from the core's queue under that
//! same lock, it could take none while a read is decoded: decoding and taking would run by turns,
//! never at once, on a machine with a core free for each. So the driver moves the events it has
//! routed here, still under the session's lock, which keeps them in the order the core made them;
//! the application takes them from here and never touches the session's lock to do so.
//!
//! Lock order: the session's lock, then this one; never the other way round. The application holds
//! only this one while it takes.

use alloc::collections::VecDeque;
use alloc::vec::Vec;
use core::task::{Context, Poll, Waker};

use super::shared::{Wakes, register};
use super::sync::{Mutex, lock};
use crate::queue::{drain_front, move_all};

/// Events ready for the application, and whether more may come.
pub(crate) struct Inbox<T> {
    inner: Mutex<Ready<T>>,
}

struct Ready<T> {
    events: VecDeque<T>,
    /// The application, waiting for an event.
    waiter: Option<Waker>,
    /// No more events will be put: once `events` is empty, the application has had them all.
    closed: bool,
}

impl<T> Inbox<T> {
    pub(crate) fn new() -> Self {
        Inbox {
            inner: Mutex::new(Ready {
                events: VecDeque::new(),
                waiter: None,
                closed: false,
            }),
        }
    }

    /// Moves every event in `from` to the back, in order, and wakes the application if it waits.
    /// With the inbox empty, the usual case, the two queues trade and no event is copied. Once the
    /// inbox is closed, the events are dropped instead: the application was told there are no
    /// more, and a stream that ended stays ended.
    pub(crate) fn put(&self, from: &mut VecDeque<T>, wakes: &mut Wakes) -> bool {
        if from.is_empty() {
            return false;
        }
        let mut ready = lock(&self.inner);
        if ready.closed {
            from.clear();
            return false;
        }
        move_all(from, &mut ready.events);
        let woke = ready.waiter.is_some();
        wakes.wake(&mut ready.waiter);
        woke
    }

    /// No more events will come (those already put are still taken first). Put the last events
    /// before closing: the application may look in between.
    pub(crate) fn close(&self, wakes: &mut Wakes) {
        let mut ready = lock(&self.inner);
        ready.closed = true;
        wakes.wake(&mut ready.waiter);
    }

    // The application's calls. Each hands what it took to `taken` (once the inbox's lock is
    // released), for a session with a store to record the messages among them as consumed.

    /// Moves up to `max` events into `into`, without waiting; returns how many.
    pub(crate) fn take(&self, into: &mut Vec<T>, max: usize, taken: impl FnOnce(&[T])) -> usize {
        let start = into.len();
        let n = drain_front(&mut lock(&self.inner).events, into, max);
        taken(&into[start..]);
        n
    }

    /// Waits for events, then moves up to `max` of them into `into`; returns how many: 0 once the
    /// inbox is closed and empty (or if `max` is 0).
    pub(crate) async fn next(
        &self,
        into: &mut Vec<T>,
        max: usize,
        taken: impl FnOnce(&[T]),
    ) -> usize {
        let start = into.len();
        let n = core::future::poll_fn(|cx| self.poll_take(cx, into, max)).await;
        taken(&into[start..]);
        n
    }

    fn poll_take(&self, cx: &mut Context<'_>, into: &mut Vec<T>, max: usize) -> Poll<usize> {
        let mut ready = lock(&self.inner);
        let n = drain_front(&mut ready.events, into, max);
        if n == 0 && max > 0 && !ready.closed {
            register(&mut ready.waiter, cx.waker());
            return Poll::Pending;
        }
        Poll::Ready(n)
    }

    /// The next event, without waiting.
    pub(crate) fn take_one(&self, taken: impl FnOnce(&[T])) -> Option<T> {
        let event = lock(&self.inner).events.pop_front();
        taken(event.as_slice());
        event
    }

    /// The next event once there is one: `Ready(None)` once the inbox is closed and empty.
    pub(crate) fn poll_one(
        &self,
        cx: &mut Context<'_>,
        taken: impl FnOnce(&[T]),
    ) -> Poll<Option<T>> {
        let polled = {
            let mut ready = lock(&self.inner);
            match ready.events.pop_front() {
                Some(event) => Poll::Ready(Some(event)),
                None if ready.closed => Poll::Ready(None),
                None => {
                    register(&mut ready.waiter, cx.waker());
                    Poll::Pending
                }
            }
        };
        if let Poll::Ready(Some(event)) = &polled {
            taken(core::slice::from_ref(event));
        }
        polled
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn noop() -> Context<'static> {
        Context::from_waker(Waker::noop())
    }

    #[test]
    fn events_put_in_two_moves_come_out_in_order_however_they_are_taken() {
        let inbox = Inbox::new();
        let mut wakes = Wakes::default();
        inbox.put(&mut (0..3).collect(), &mut wakes);
        let mut taken = Vec::new();
        let mut seen = Vec::new();
        assert_eq!(inbox.take(&mut taken, 2, |t| seen.extend_from_slice(t)), 2);
        inbox.put(&mut (3..10).collect(), &mut wakes);
        assert_eq!(inbox.take_one(|t| seen.extend_from_slice(t)), Some(2));
        assert_eq!(
            inbox.poll_take(&mut noop(), &mut taken, 100),
            Poll::Ready(7)
        );
        assert_eq!(taken, [0, 1, 3, 4, 5, 6, 7, 8, 9]);
        assert_eq!(seen, [0, 1, 2], "each call hands on exactly what it took");
    }

    #[test]
    fn a_closed_inbox_hands_out_what_it_holds_before_it_says_it_is_over() {
        let inbox = Inbox::new();
        let mut wakes = Wakes::default();
        let mut cx = noop();
        assert_eq!(
            inbox.poll_one(&mut cx, |_| {}),
            Poll::Pending,
            "open and empty: wait"
        );
        inbox.put(&mut VecDeque::from([1, 2]), &mut wakes);
        inbox.close(&mut wakes);
        assert_eq!(inbox.poll_one(&mut cx, |_| {}), Poll::Ready(Some(1)));
        let mut taken = Vec::new();
        assert_eq!(inbox.poll_take(&mut cx, &mut taken, 8), Poll::Ready(1));
        assert_eq!(inbox.poll_take(&mut cx, &mut taken, 8), Poll::Ready(0));
        assert_eq!(inbox.poll_one(&mut cx, |_| {}), Poll::Ready(None));
    }

    #[test]
    fn events_put_after_the_close_never_come_out_once_the_end_was_seen() {
        let inbox = Inbox::new();
        let mut wakes = Wakes::default();
        let mut cx = noop();
        inbox.close(&mut wakes);
        assert_eq!(inbox.poll_one(&mut cx, |_| {}), Poll::Ready(None));
        let mut late = VecDeque::from([1, 2]);
        assert!(
            !inbox.put(&mut late, &mut wakes),
            "nobody is woken for them"
        );
        assert!(late.is_empty(), "dropped, not left to be put again");
        assert_eq!(inbox.poll_one(&mut cx, |_| {}), Poll::Ready(None));
        assert_eq!(inbox.take_one(|_| {}), None);
    }
}

#[cfg(all(test, loom))]
mod loom_models {
    //! `RUSTFLAGS="--cfg loom" cargo test -p steadfast-core --features driver --release --lib loom`
    use super::*;
    use crate::driver::shared::Shared;
    use loom::thread;

    /// The driver's side: makes events under the session's lock and moves them to the inbox there.
    fn produce(session: &Shared<VecDeque<u32>>, inbox: &Inbox<u32>, events: &[u32], last: bool) {
        session.with(|queue, wakes| {
            queue.extend(events);
            inbox.put(queue, wakes);
            if last {
                inbox.close(wakes);
            }
        });
    }

    /// The application's side: takes until the inbox says it is over, parking between polls.
    fn consume(inbox: &Inbox<u32>) -> Vec<u32> {
        let mut got = Vec::new();
        loom::future::block_on(core::future::poll_fn(|cx| {
            loop {
                match inbox.poll_take(cx, &mut got, 2) {
                    Poll::Ready(0) => return Poll::Ready(()),
                    Poll::Ready(_) => continue,
                    Poll::Pending => return Poll::Pending,
                }
            }
        }));
        got
    }

    #[test]
    fn loom_events_put_while_the_application_takes_all_arrive_in_order_before_the_end() {
        loom::model(|| {
            let session = Shared::new(VecDeque::new());
            let inbox = super::super::sync::Arc::new(Inbox::new());
            let driver = {
                let (session, inbox) = (session.clone(), inbox.clone());
                thread::spawn(move || {
                    produce(&session, &inbox, &[1, 2, 3], false);
                    produce(&session, &inbox, &[4], true);
                })
            };
            let got = consume(&inbox);
            driver.join().unwrap();
            assert_eq!(
                got,
                [1, 2, 3, 4],
                "every event, in order, and only then the end"
            );
        });
    }
}
