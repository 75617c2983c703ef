//! What the application awaits from the peer: a request its reply, a flush the acknowledgement
//! of what was sent before it. Each waits for its answer or the end of its session, settled in
//! the order the session's events come, and is forgotten if its future is dropped first. Shared
//! by the client and the server.

use alloc::collections::BTreeMap;
use core::ops::RangeBounds;
use core::task::{Context, Poll, Waker};

use bytes::Bytes;

use super::shared::{Shared, Wakes, register};
use super::{FlushError, RequestError};
use crate::{Channel, Seq};

/// An answer the application awaits, and the one it gets if its session ends first.
pub(crate) trait Answer {
    fn ended() -> Self;
    /// Whether a dropped future's entry stays until its answer comes, to be discarded then: a
    /// request's reply must not reach the application's events as if nobody had asked.
    const DISCARDS_LATE: bool;
}

impl Answer for Result<Bytes, RequestError> {
    fn ended() -> Self {
        Err(RequestError::SessionEnded)
    }
    const DISCARDS_LATE: bool = true;
}

impl Answer for Result<(), FlushError> {
    fn ended() -> Self {
        Err(FlushError::SessionEnded)
    }
    const DISCARDS_LATE: bool = false;
}

/// Where an awaited answer stands.
enum Pending<T> {
    Waiting(Option<Waker>),
    Done(T),
    /// Its future was dropped: the answer, if it comes, is discarded.
    Abandoned,
}

/// The awaited answers, by key.
pub(crate) struct Awaited<K, T = Result<Bytes, RequestError>>(BTreeMap<K, Pending<T>>);

impl<K: Ord + Copy, T: Answer + Clone> Awaited<K, T> {
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
    pub(crate) fn answer(&mut self, key: K, result: T, wakes: &mut Wakes) {
        if let Some(Pending::Waiting(mut w)) = self.0.remove(&key) {
            self.0.insert(key, Pending::Done(result));
            wakes.wake(&mut w);
        }
    }

    /// Hands every key in `range` still awaited `result`.
    pub(crate) fn settle(&mut self, range: impl RangeBounds<K>, result: T, wakes: &mut Wakes) {
        for (_, p) in self.0.range_mut(range) {
            if let Pending::Waiting(w) = p {
                let mut w = w.take();
                *p = Pending::Done(result.clone());
                wakes.wake(&mut w);
            }
        }
    }

    /// Ends everything awaited in `range`, whose session ended.
    pub(crate) fn end(&mut self, range: impl RangeBounds<K>, wakes: &mut Wakes) {
        self.settle(range, T::ended(), wakes);
    }
}

/// Flushes the application awaits, each settled in the order of its session's events: by the ack
/// that reaches the point it waits for, or by the session's end. `P` names the session where a
/// state holds several (a server's part), `()` where it holds one (a client's).
pub(crate) struct Flushes<P> {
    pub(crate) awaited: AwaitedFlushes<P>,
    started: u64,
}

/// An awaited flush: its session, the sequence number all below which it waits to see
/// acknowledged, and a number of its own (flushes of one session may wait for the same point).
pub(crate) type FlushKey<P> = (P, Seq, u64);

pub(crate) type AwaitedFlushes<P> = Awaited<FlushKey<P>, Result<(), FlushError>>;

impl<P: Ord + Copy> Flushes<P> {
    pub(crate) fn new() -> Self {
        Flushes {
            awaited: Awaited::new(),
            started: 0,
        }
    }

    /// Starts a flush of `session`, whose channel is `channel`: `Ok(None)` if the peer has
    /// acknowledged all it was sent already, `SessionEnded` if the channel (or the state, `over`)
    /// has ended short of that, else the key to await with [`flushed`].
    pub(crate) fn start(
        &mut self,
        session: P,
        channel: &Channel,
        over: bool,
    ) -> Result<Option<FlushKey<P>>, FlushError> {
        let end = channel.sender().end();
        if channel.acknowledged_below() >= end {
            return Ok(None);
        }
        if over || channel.is_closed() {
            return Err(FlushError::SessionEnded);
        }
        self.started += 1;
        let key = (session, end, self.started);
        self.awaited.expect(key);
        Ok(Some(key))
    }

    /// The peer acknowledged every message of `session` below `below`.
    pub(crate) fn acknowledged(&mut self, session: P, below: Seq, wakes: &mut Wakes) {
        let reached = (session, 0, 0)..=(session, below, u64::MAX);
        self.awaited.settle(reached, Ok(()), wakes);
    }

    /// `session`'s channel ended, handing back what was unacknowledged: its flushes still
    /// waiting never will be.
    pub(crate) fn end(&mut self, session: P, wakes: &mut Wakes) {
        let all = (session, 0, 0)..=(session, Seq::MAX, u64::MAX);
        self.awaited.end(all, wakes);
    }

    /// Every session ended.
    pub(crate) fn end_all(&mut self, wakes: &mut Wakes) {
        self.awaited.end(.., wakes);
    }
}

/// Awaits the flush that [`Flushes::start`] began (none: already done), in the state `S` whose
/// [`Flushes`] and "is over" flag `part` finds.
pub(crate) async fn flushed<S, P: Ord + Copy>(
    shared: &Shared<S>,
    key: Option<FlushKey<P>>,
    part: fn(&mut S) -> (&mut AwaitedFlushes<P>, bool),
) -> Result<(), FlushError> {
    match key {
        Some(key) => answer(shared, key, part).await,
        None => Ok(()),
    }
}

/// Awaits the answer to `key` in the state `S`, whose [`Awaited`] and "is over" flag `part` finds.
pub(crate) async fn answer<S, K: Ord + Copy, T: Answer + Clone>(
    shared: &Shared<S>,
    key: K,
    part: fn(&mut S) -> (&mut Awaited<K, T>, bool),
) -> T {
    let mut guard = Guard {
        shared,
        key,
        part,
        done: false,
    };
    core::future::poll_fn(|cx| guard.poll(cx)).await
}

/// Forgets an awaited answer whose future is dropped.
struct Guard<'a, S, K: Ord + Copy, T: Answer> {
    shared: &'a Shared<S>,
    key: K,
    part: fn(&mut S) -> (&mut Awaited<K, T>, bool),
    done: bool,
}

impl<S, K: Ord + Copy, T: Answer + Clone> Guard<'_, S, K, T> {
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<T> {
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
                _ => Poll::Ready(T::ended()),
            }
        });
        self.done = r.is_ready();
        r
    }
}

impl<S, K: Ord + Copy, T: Answer> Drop for Guard<'_, S, K, T> {
    fn drop(&mut self) {
        if !self.done {
            let (key, part) = (self.key, self.part);
            self.shared.with(|s, _| {
                let awaited = &mut part(s).0.0;
                match awaited.get_mut(&key) {
                    Some(p @ Pending::Waiting(_)) if T::DISCARDS_LATE => *p = Pending::Abandoned,
                    Some(Pending::Abandoned) | None => {}
                    Some(_) => {
                        awaited.remove(&key);
                    }
                }
            });
        }
    }
}
