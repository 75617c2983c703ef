//! The state a session's driver shares with the application's threads.
//!
//! Everything crosses here: sends and replies from any thread, events going out (on to an
//! [`Inbox`](super::inbox::Inbox) of their own), wake-ups both ways.
//! One mutex guards it all, held only for the length of a core call, and wake-ups are collected under
//! the lock but delivered after it is released, so a woken task never finds the lock still held by
//! its waker. A waiter registers its waker under the same lock as it inspects the state, so a change
//! made after its look always finds the waker to wake: no wake-up is lost.
//!
//! The other thing shared: read buffers lent out as payload memory come home, from whichever thread
//! drops the last payload cut from them, to a [`Recycler`] the connections read into again.

use alloc::vec::Vec;
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
    // Inlined into each caller, so that what `f` returns (an event, a send's result) is built
    // where the caller wants it instead of copied out of this frame.
    #[inline(always)]
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

/// Bytes kept for reuse, at most: what stays allocated when traffic stops. A busy endpoint's
/// connections share them, and a receiver whose application drains events in bursts holds a
/// burst's worth of frames at a time (the server's connection task reads up to 32 per turn).
const RECYCLED_BYTES: usize = 4 << 20;

/// The largest buffer kept for reuse.
const RECYCLED_SIZE: usize = 256 * 1024;

/// Large read buffers come home here once the last payload cut from them is dropped, so that a busy
/// connection reads into memory it already has, not into fresh pages the kernel must fault in and
/// zero for every large frame. Buffers stay initialized, so they are not zero-filled again either.
#[derive(Default)]
pub(crate) struct Recycler {
    home: Mutex<Home>,
}

#[derive(Default)]
struct Home {
    free: Vec<Vec<u8>>,
    /// The bytes of `free`.
    bytes: usize,
    /// Buffers made because none large enough was home.
    made: u64,
}

impl Recycler {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Recycler::default())
    }

    /// A buffer of at least `size` initialized bytes: one that came home if it is large enough.
    pub(crate) fn take(&self, size: usize) -> Vec<u8> {
        let mut home = lock(&self.home);
        let buf = home.free.pop();
        home.bytes -= buf.as_ref().map_or(0, Vec::len);
        match buf {
            Some(buf) if buf.len() >= size => buf,
            _ => {
                home.made += 1;
                drop(home);
                // Rounded up: frames of one payload size differ by a few header bytes.
                alloc::vec![0; size.next_multiple_of(4096)]
            }
        }
    }

    /// How many buffers are home now, and how many were ever made.
    #[cfg(test)]
    pub(crate) fn counts(&self) -> (usize, u64) {
        let home = lock(&self.home);
        (home.free.len(), home.made)
    }

    fn give_back(&self, buf: Vec<u8>) {
        if buf.len() <= RECYCLED_SIZE {
            let mut home = lock(&self.home);
            if home.bytes + buf.len() <= RECYCLED_BYTES {
                home.bytes += buf.len();
                home.free.push(buf);
            }
        }
    }

    /// Lends `buf` out as the memory of the returned bytes (its first `len`); it comes home to
    /// `recycler` when the last of them is dropped.
    pub(crate) fn lend(recycler: &Arc<Self>, buf: Vec<u8>, len: usize) -> bytes::Bytes {
        let mut bytes = bytes::Bytes::from_owner(Loan {
            buf,
            home: recycler.clone(),
        });
        bytes.truncate(len);
        bytes
    }
}

/// A buffer on loan as payload memory.
struct Loan {
    buf: Vec<u8>,
    home: Arc<Recycler>,
}

impl AsRef<[u8]> for Loan {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for Loan {
    fn drop(&mut self) {
        self.home.give_back(core::mem::take(&mut self.buf));
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

    #[test]
    fn loom_a_buffer_dropped_on_another_thread_comes_home_once() {
        loom::model(|| {
            let recycler = Recycler::new();
            let bytes = Recycler::lend(&recycler, alloc::vec![7; 8], 4);
            let payload = bytes.slice(1..3);
            let app = thread::spawn(move || {
                assert_eq!(&payload[..], [7, 7]);
                drop(payload);
            });
            drop(bytes);
            let taken = recycler.take(8);
            app.join().unwrap();
            // Taken before the last payload was dropped, the buffer was still on loan: a new one.
            // Either way, no buffer is in two places, and the one on loan is home by now.
            let (home, made) = recycler.counts();
            assert!(taken.len() >= 8);
            assert!(home <= 1);
            if taken == [7; 8] {
                // The lent buffer, home in time and taken again.
                assert_eq!((home, made), (0, 0));
            } else {
                // A new, zeroed one; the lent buffer came home after.
                assert!(taken.iter().all(|&b| b == 0));
                assert_eq!((home, made), (1, 1), "the lent buffer came home");
            }
        });
    }
}
