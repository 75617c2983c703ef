//! The state a session's driver shares with the application's threads.
//!
//! Everything crosses here: sends and replies from any thread, events going out, wake-ups both ways.
//! One mutex guards it all, held only for the length of a core call, and wake-ups are collected under
//! the lock but delivered after it is released, so a woken task never finds the lock still held by
//! its waker. A waiter registers its waker under the same lock as it inspects the state, so a change
//! made after its look always finds the waker to wake: no wake-up is lost.

use core::task::Waker;

use super::sync::{Arc, Mutex, lock};

/// State of type `S` behind one lock, with wake-ups deferred past the lock.
pub(crate) struct Shared<S> {
    inner: Mutex<S>,
}

/// Wake-ups to deliver once the lock is released.
#[derive(Default)]
pub(crate) struct Wakes(alloc::vec::Vec<Waker>);

impl Wakes {
    /// Wakes whoever waits in `slot` (once the lock is released).
    pub(crate) fn wake(&mut self, slot: &mut Option<Waker>) {
        if let Some(w) = slot.take() {
            self.0.push(w);
        }
    }

    /// Wakes every waiter in `list`.
    pub(crate) fn wake_all(&mut self, list: &mut alloc::vec::Vec<Waker>) {
        self.0.append(list);
    }
}

/// Registers `waker` in `slot`, keeping the one already there if it wakes the same task.
pub(crate) fn register(slot: &mut Option<Waker>, waker: &Waker) {
    match slot {
        Some(w) if w.will_wake(waker) => {}
        _ => *slot = Some(waker.clone()),
    }
}

/// Adds `waker` to `list` unless the same task is already in it.
pub(crate) fn register_in(list: &mut alloc::vec::Vec<Waker>, waker: &Waker) {
    if !list.iter().any(|w| w.will_wake(waker)) {
        list.push(waker.clone());
    }
}

impl<S> Shared<S> {
    pub(crate) fn new(state: S) -> Arc<Self> {
        Arc::new(Shared {
            inner: Mutex::new(state),
        })
    }

    /// Runs `f` under the lock, then delivers the wake-ups it asked for.
    pub(crate) fn with<R>(&self, f: impl FnOnce(&mut S, &mut Wakes) -> R) -> R {
        let mut wakes = Wakes::default();
        let r = {
            let mut state = lock(&self.inner);
            f(&mut state, &mut wakes)
        };
        for w in wakes.0 {
            w.wake();
        }
        r
    }
}

#[cfg(all(test, loom))]
mod loom_models {
    //! `RUSTFLAGS="--cfg loom" cargo test -p steadfast-core --features driver --release --lib loom`
    use super::*;
    use core::task::{Context, Poll};
    use loom::thread;

    /// A driver that drains a queue of commands, and the producers that fill it.
    #[derive(Default)]
    struct Queue {
        items: alloc::vec::Vec<u32>,
        driver: Option<Waker>,
        closed: bool,
    }

    fn produce(shared: &Shared<Queue>, item: u32) -> bool {
        shared.with(|q, wakes| {
            if q.closed {
                return false;
            }
            q.items.push(item);
            wakes.wake(&mut q.driver);
            true
        })
    }

    /// Drains until `want` items arrived (or the queue closed), parking between polls.
    fn drain(shared: &Shared<Queue>, want: usize) -> alloc::vec::Vec<u32> {
        let mut got = alloc::vec::Vec::new();
        let fut = core::future::poll_fn(|cx: &mut Context<'_>| {
            shared.with(|q, _| {
                got.append(&mut q.items);
                if got.len() >= want || q.closed {
                    Poll::Ready(())
                } else {
                    register(&mut q.driver, cx.waker());
                    Poll::Pending
                }
            })
        });
        loom::future::block_on(fut);
        got
    }

    #[test]
    fn loom_sends_from_two_threads_all_reach_the_driver_and_no_wakeup_is_lost() {
        loom::model(|| {
            let shared = Shared::new(Queue::default());
            let a = {
                let s = shared.clone();
                thread::spawn(move || produce(&s, 1))
            };
            let b = {
                let s = shared.clone();
                thread::spawn(move || produce(&s, 2))
            };
            let mut got = drain(&shared, 2);
            a.join().unwrap();
            b.join().unwrap();
            got.sort_unstable();
            assert_eq!(got, [1, 2]);
        });
    }

    #[test]
    fn loom_close_racing_a_send_either_delivers_it_or_refuses_it() {
        loom::model(|| {
            let shared = Shared::new(Queue::default());
            let sender = {
                let s = shared.clone();
                thread::spawn(move || produce(&s, 7))
            };
            shared.with(|q, wakes| {
                q.closed = true;
                wakes.wake(&mut q.driver);
            });
            let accepted = sender.join().unwrap();
            let left = shared.with(|q, _| core::mem::take(&mut q.items));
            // Accepted means it is in the queue for the driver; refused means it never entered.
            assert_eq!(accepted, left == [7]);
        });
    }
}
