//! Requests the application awaits: each waits for its reply, its deadline, or the end of its
//! session, and is forgotten if its future is dropped first. Shared by the client and the server.

use alloc::collections::BTreeMap;
use core::ops::RangeBounds;
use core::task::{Context, Poll, Waker};

use bytes::Bytes;

use super::RequestError;
use super::shared::{Shared, Wakes, register};

/// Where an awaited request stands.
enum Pending {
    Waiting(Option<Waker>),
    Done(Result<Bytes, RequestError>),
    /// Its future was dropped: the reply, if it comes, is discarded.
    Abandoned,
}

/// The awaited requests, by key.
pub(crate) struct Awaited<K>(BTreeMap<K, Pending>);

impl<K: Ord + Copy> Awaited<K> {
    pub(crate) fn new() -> Self {
        Awaited(BTreeMap::new())
    }

    /// Starts awaiting the answer to `key`.
    pub(crate) fn expect(&mut self, key: K) {
        self.0.insert(key, Pending::Waiting(None));
    }

    /// Whether `key`'s answer goes to an awaiting future (or is discarded for a dropped one).
    pub(crate) fn awaits(&self, key: &K) -> bool {
        self.0.contains_key(key)
    }

    /// Hands `key` its answer, waking its future; a dropped future's answer is discarded.
    pub(crate) fn answer(
        &mut self,
        key: K,
        result: Result<Bytes, RequestError>,
        wakes: &mut Wakes,
    ) {
        if let Some(Pending::Waiting(mut w)) = self.0.remove(&key) {
            self.0.insert(key, Pending::Done(result));
            wakes.wake(&mut w);
        }
    }

    /// Ends every request in `range` whose session ended.
    pub(crate) fn end(&mut self, range: impl RangeBounds<K>, wakes: &mut Wakes) {
        for (_, p) in self.0.range_mut(range) {
            if let Pending::Waiting(w) = p {
                let mut w = w.take();
                *p = Pending::Done(Err(RequestError::SessionEnded));
                wakes.wake(&mut w);
            }
        }
    }
}

/// Awaits the answer to `key` in the state `S`, whose [`Awaited`] and "is over" flag `part` finds.
pub(crate) async fn answer<S, K: Ord + Copy>(
    shared: &Shared<S>,
    key: K,
    part: fn(&mut S) -> (&mut Awaited<K>, bool),
) -> Result<Bytes, RequestError> {
    let mut guard = Guard {
        shared,
        key,
        part,
        done: false,
    };
    core::future::poll_fn(|cx| guard.poll(cx)).await
}

/// Forgets an awaited request whose future is dropped.
struct Guard<'a, S, K: Ord + Copy> {
    shared: &'a Shared<S>,
    key: K,
    part: fn(&mut S) -> (&mut Awaited<K>, bool),
    done: bool,
}

impl<S, K: Ord + Copy> Guard<'_, S, K> {
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Result<Bytes, RequestError>> {
        let (key, part) = (self.key, self.part);
        let r = self.shared.with(|s, _| {
            let (awaited, over) = part(s);
            match awaited.0.remove(&key) {
                Some(Pending::Done(r)) => Poll::Ready(r),
                Some(Pending::Waiting(mut w)) if !over => {
                    register(&mut w, cx.waker());
                    awaited.0.insert(key, Pending::Waiting(w));
                    Poll::Pending
                }
                _ => Poll::Ready(Err(RequestError::SessionEnded)),
            }
        });
        self.done = r.is_ready();
        r
    }
}

impl<S, K: Ord + Copy> Drop for Guard<'_, S, K> {
    fn drop(&mut self) {
        if !self.done {
            let (key, part) = (self.key, self.part);
            self.shared.with(|s, _| {
                if let Some(p) = part(s).0.0.get_mut(&key) {
                    *p = Pending::Abandoned;
                }
            });
        }
    }
}
