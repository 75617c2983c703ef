//! A server on a real runtime: a [`ServerHandle`] for the application, the [`ServerDriver`] future
//! that accepts connections and keeps time, and one task per connection that reads and writes it.

use alloc::boxed::Box;
use alloc::collections::{BTreeMap, VecDeque};
use alloc::vec::Vec;
use core::future::Future;
use core::net::SocketAddr;
use core::pin::Pin;
use core::task::{Context, Poll, Waker};

use bytes::{Bytes, BytesMut};

use super::arming::Arming;
use super::batch::Run;
use super::direct::Direct;
use super::inbox::Inbox;
use super::requests::{self, Awaited, Flushes};
use super::shared::{Recycler, Shared, Wakes, register, register_in};
use super::sync::Arc;
use super::{
    Alarm, Clock, FlushError, Io, Listen, ReadBuf, RequestError, Runtime, poll_read_chunk,
    poll_write_all,
};
use crate::Seq;
use crate::config::ConfigError;
use crate::identity::SessionId;
use crate::mode::{Mode, Sent};
use crate::send::SendError;
use crate::server::{ConnId, Opening, Sequenced, Server, ServerConfig, ServerEvent, Shard};
use crate::session::{Entropy, SessionEvent};
use crate::store::{SessionStore, Stored};
use crate::time::Duration;

/// Decides whether a new session's credentials are accepted; runs on the driver, so keep it quick.
pub type Authenticator = alloc::sync::Arc<dyn Fn(&[u8]) -> bool + Send + Sync>;

/// How a server runs.
#[derive(Clone)]
#[non_exhaustive]
pub struct ServerOptions {
    /// The sessions' configuration.
    pub config: ServerConfig,
    /// Checks each new session's credentials inline. Without it, and with
    /// [`ServerConfig::authenticate`] set, the application answers [`ServerEvent::Authenticate`]
    /// with [`ServerHandle::authenticate`].
    pub authenticator: Option<Authenticator>,
    /// How many parts the server's state is split into, each behind a lock of its own, with the
    /// sessions spread over them (rounded up to a power of two, at most 256). With one, the
    /// default, every session shares one lock: an application sending to one session waits while
    /// a connection of another reads or writes. A server fanning out to many clients gains from
    /// several: 8 parts carried 1.2–1.3× the deliveries of one to 16 clients (BENCHMARKS.md). A
    /// server on a shared session store runs as one.
    ///
    /// Each part applies [`ServerConfig`]'s limits on its own (`max_sessions`,
    /// `max_pending_handshakes`); connections whose hello has not yet arrived are bounded by
    /// `max_pending_handshakes` for the whole server, and on a split server the handshake timeout
    /// runs once until the hello and again from there. A split server's
    /// [`ServerHandle::inspect`] reads only the first part: use
    /// [`ServerHandle::inspect_session`]. [`ServerHandle::broadcast`] returns its refusals part
    /// by part.
    pub shards: usize,
}

impl core::fmt::Debug for ServerOptions {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("ServerOptions")
            .field("config", &self.config)
            .field("authenticator", &self.authenticator.is_some())
            .field("shards", &self.shards)
            .finish()
    }
}

impl ServerOptions {
    /// Defaults for a stream transport.
    pub fn new() -> Self {
        ServerOptions {
            config: ServerConfig::new(crate::Config::new(crate::Transport::Stream)),
            authenticator: None,
            shards: 1,
        }
    }

    /// Checks each new session's credentials with `check`.
    pub fn authenticate_with(
        mut self,
        check: impl Fn(&[u8]) -> bool + Send + Sync + 'static,
    ) -> Self {
        self.config.authenticate = true;
        self.authenticator = Some(alloc::sync::Arc::new(check));
        self
    }
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self::new()
    }
}

/// What routing did with an event.
enum Routed {
    /// Left in the queue for the application.
    Kept,
    /// Taken out of the queue: it answered an awaited request.
    Taken,
    /// Taken out of the queue and answered inline, which gives the core more to write.
    Answered,
}

/// The most parts a server is split into ([`ServerOptions::shards`]).
const MAX_SHARDS: usize = 256;

/// The largest write buffer a flush keeps for the next frames.
const KEPT_BUFFER: usize = 256 * 1024;

/// One connection's bytes waiting for its task to write them.
struct Slot {
    out: BytesMut,
    /// Close once `out` is written.
    close: bool,
    waker: Option<Waker>,
    /// The application's sends go out through this while the task has nothing to write.
    direct: Direct,
}

pub(crate) struct State {
    server: Server,
    clock: Clock,
    slots: BTreeMap<ConnId, Slot>,
    /// The id the next connection gets: ids step by the shard count from the shard's index, so
    /// that an id names its shard.
    next_conn: ConnId,
    conn_step: ConnId,
    scratch: BytesMut,
    /// Where the events the driver has routed wait for the application.
    inbox: Arc<Inbox<ServerEvent>>,
    capacity: Vec<Waker>,
    requests: Awaited<(SessionId, Seq)>,
    flushes: Flushes<SessionId>,
    /// The accept-and-timer task, and when its timer is set for.
    driver: Option<Waker>,
    arming: Arming,
    authenticator: Option<Authenticator>,
    shutdown: bool,
    handles: usize,
    /// A split server's connections on their way to their part (counted in the first part), and
    /// their wakers, for a shutdown to close them.
    opening: usize,
    openers: Vec<Waker>,
}

impl State {
    /// Moves what the core wants written to the connections' slots and its events to the
    /// application, waking whoever must act. With `direct` (an application's send), a connection
    /// whose task has nothing to write is written to from here instead, so its task need not wake.
    /// Returns whether it woke the application, waiting for events.
    fn flush(&mut self, wakes: &mut Wakes, direct: bool) -> bool {
        let now = self.clock.now();
        let mut woke = false;
        loop {
            loop {
                self.scratch.clear();
                let Some(t) = self.server.poll_transmit(now, &mut self.scratch) else {
                    break;
                };
                let Some(slot) = self.slots.get_mut(&t.conn) else {
                    continue;
                };
                if direct && !t.close && !slot.close {
                    let sent = slot.direct.write(&self.scratch);
                    if sent == self.scratch.len() {
                        continue;
                    }
                    bytes::Buf::advance(&mut self.scratch, sent);
                }
                // The task holds these now: nothing may be written direct ahead of them.
                slot.direct.driver_holds(true);
                if slot.out.is_empty() {
                    // Trade buffers: the one the task last wrote from comes back for the next
                    // frames, so none is allocated anew and grown from nothing, page by page.
                    core::mem::swap(&mut slot.out, &mut self.scratch);
                    // Not one a backlog grew large: it would go round every connection.
                    if self.scratch.capacity() > KEPT_BUFFER {
                        self.scratch = BytesMut::new();
                    }
                } else {
                    slot.out.extend_from_slice(&self.scratch);
                }
                slot.close |= t.close;
                wakes.wake(&mut slot.waker);
            }
            let mut answered = false;
            let mut i = 0;
            while i < self.server.events_mut().len() {
                match self.route(now, i, wakes) {
                    Routed::Kept => i += 1,
                    Routed::Taken => {}
                    Routed::Answered => answered = true,
                }
            }
            woke |= self.inbox.put(self.server.events_mut(), wakes);
            // An inline authentication verdict makes more to write.
            if !answered {
                break;
            }
        }
        if self.arming.must_wake(self.server.poll_timeout()) {
            wakes.wake(&mut self.driver);
        }
        woke
    }

    /// Takes a new connection on: its id, a slot for its bytes, and the core's.
    fn join(
        &mut self,
        now: crate::time::Instant,
        writer: Option<alloc::sync::Arc<dyn super::TryWrite>>,
    ) -> ConnId {
        let id = self.next_conn;
        self.next_conn += self.conn_step;
        self.slots.insert(
            id,
            Slot {
                out: BytesMut::new(),
                close: false,
                waker: None,
                direct: Direct::new(writer),
            },
        );
        self.server.on_connection(now, id);
        id
    }

    /// Routes the event at `i` of the server's queue where it stands: the driver acts on what it
    /// must (wakes senders, answers awaited requests, authenticates inline) and leaves the rest
    /// for the application, which takes them from that queue.
    fn route(&mut self, now: crate::time::Instant, i: usize, wakes: &mut Wakes) -> Routed {
        let (session, event) = match &self.server.events_mut()[i] {
            ServerEvent::Authenticate { conn, credentials } => {
                let Some(check) = &self.authenticator else {
                    return Routed::Kept;
                };
                let (conn, accept) = (*conn, check(credentials));
                self.server.events_mut().remove(i);
                tracing::debug!(conn, accept, "authenticated");
                self.server.authenticate(now, conn, accept);
                return Routed::Answered;
            }
            ServerEvent::Session { session, event } => (*session, event),
        };
        let mut ended = false;
        match event {
            SessionEvent::Connected {
                resumed,
                retransmitted,
                epoch,
                ..
            } => tracing::debug!(%session, resumed, retransmitted, epoch, "session attached"),
            SessionEvent::Disconnected { cause } => {
                tracing::debug!(%session, ?cause, "session detached")
            }
            SessionEvent::Acknowledged { below } => {
                wakes.wake_all(&mut self.capacity);
                self.flushes.acknowledged(session, *below, wakes);
            }
            SessionEvent::Reply { to, .. } | SessionEvent::RequestTimedOut { seq: to }
                if self.requests.awaits(&(session, *to)) =>
            {
                let key = (session, *to);
                let result = match self.server.events_mut().remove(i) {
                    Some(ServerEvent::Session {
                        event: SessionEvent::Reply { payload, .. },
                        ..
                    }) => Ok(payload),
                    _ => Err(RequestError::TimedOut),
                };
                self.requests.answer(key, result, wakes);
                return Routed::Taken;
            }
            SessionEvent::SessionLost {
                reason,
                unacknowledged,
            } => {
                tracing::info!(%session, ?reason, handed_back = unacknowledged.len(), "session lost");
                ended = true;
            }
            SessionEvent::Closed { reason, .. } => {
                tracing::debug!(%session, ?reason, "session closed");
                ended = true;
            }
            // Another server took the session over: its last event here.
            SessionEvent::Fenced { epoch } => {
                tracing::info!(%session, epoch, "session fenced");
                ended = true;
            }
            _ => {}
        }
        if ended {
            self.end_requests(session, wakes);
        }
        Routed::Kept
    }

    fn end_requests(&mut self, session: SessionId, wakes: &mut Wakes) {
        self.requests.end((session, 0)..=(session, Seq::MAX), wakes);
        self.flushes.end(session, wakes);
        wakes.wake_all(&mut self.capacity);
    }

    /// After the application queued frames for `session`: writes them out from here if its
    /// connection's task is idle (see [`Direct`]), else leaves them to that task. A busy task is
    /// writing: it encodes whatever gathered meanwhile at its next step, for one large write,
    /// where encoding here would hand it a run of small ones, each with a wake-up, and keep the
    /// application's thread busy encoding.
    fn sent_to(&mut self, session: SessionId, wakes: &mut Wakes) {
        let busy = self
            .server
            .connection_of(session)
            .and_then(|conn| self.slots.get_mut(&conn))
            .filter(|slot| !slot.direct.is_open() && !slot.close);
        let Some(slot) = busy else {
            self.flush(wakes, true);
            return;
        };
        wakes.wake(&mut slot.waker);
        self.route_events(wakes);
    }

    /// Routes what the core made during the application's call (a store that failed, as a
    /// message was sent or taken; a session closed for overflowing its queue): ready when the call
    /// returns, its waiters woken, not left for a connection's next step.
    fn route_events(&mut self, wakes: &mut Wakes) {
        if !self.server.events_mut().is_empty() {
            self.flush(wakes, false);
        }
    }

    fn stop(&mut self, wakes: &mut Wakes) {
        self.shutdown = true;
        for slot in self.slots.values_mut() {
            slot.close = true;
            wakes.wake(&mut slot.waker);
        }
        wakes.wake(&mut self.driver);
        wakes.wake_all(&mut self.openers);
        wakes.wake_all(&mut self.capacity);
        self.requests.end(.., wakes);
        self.flushes.end_all(wakes);
    }
}

/// The application's side of a server: cheap to clone, usable from any thread. Dropping the last
/// handle shuts the server down.
pub struct ServerHandle {
    shards: Shards,
    inbox: Arc<Inbox<ServerEvent>>,
    /// Whether the messages the application takes must be recorded as consumed (shared stores).
    records_consumed: bool,
    local_addr: SocketAddr,
}

impl core::fmt::Debug for ServerHandle {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("ServerHandle")
            .field("local_addr", &self.local_addr)
            .finish_non_exhaustive()
    }
}

impl Clone for ServerHandle {
    fn clone(&self) -> Self {
        self.first().with(|s, _| s.handles += 1);
        ServerHandle {
            shards: self.shards.clone(),
            inbox: self.inbox.clone(),
            records_consumed: self.records_consumed,
            local_addr: self.local_addr,
        }
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        let last = self.first().with(|s, _| {
            s.handles -= 1;
            s.handles == 0
        });
        if last {
            self.shutdown();
        }
    }
}

/// The server's state, in one part or several (see [`ServerOptions::shards`]).
type Shards = alloc::sync::Arc<[Arc<Shared<State>>]>;

/// Which of `count` parts `key` falls in: the low bits of a session's or a connection's id
/// name its shard.
fn part(count: usize, key: u64) -> usize {
    (key & (count as u64 - 1)) as usize
}

fn shard_of(shards: &Shards, key: u64) -> &Arc<Shared<State>> {
    &shards[part(shards.len(), key)]
}

impl ServerHandle {
    /// The first part of the state: the only one unless the server is split.
    fn first(&self) -> &Arc<Shared<State>> {
        &self.shards[0]
    }

    /// The part of the state that holds `session`.
    fn holding(&self, session: SessionId) -> &Arc<Shared<State>> {
        shard_of(&self.shards, session.0)
    }

    /// Runs a command that queues frames for `session`, and gets them on their way.
    fn send_command<T>(&self, session: SessionId, f: impl FnOnce(&mut Server) -> T) -> T {
        self.holding(session).with(|s, wakes| {
            let r = f(&mut s.server);
            s.sent_to(session, wakes);
            r
        })
    }

    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Sends `payload` to `session` on `stream`, or refuses it at once. Callable from any thread.
    pub fn try_send(
        &self,
        session: SessionId,
        stream: u64,
        mode: Mode,
        payload: Bytes,
    ) -> Result<Sent, SendError> {
        self.send_command(session, |s| s.send(session, stream, mode, payload))
    }

    /// Waits until `session`'s client has acknowledged every reliable message sent to it before
    /// the call: each one is in the client's hands, whatever reconnects it took.
    /// [`ClientHandle::flush`](super::ClientHandle::flush) from this side.
    ///
    /// Ends with [`FlushError::SessionEnded`] if the session ends first (or is unknown here, or
    /// the server shuts down); the session's last event hands back what was not acknowledged.
    /// It does not time out of its own accord: a client that stays away waits out the retention
    /// time.
    pub async fn flush(&self, session: SessionId) -> Result<(), FlushError> {
        let part = self.holding(session);
        let key = part.with(|s, _| {
            let channel = s.server.channel(session).ok_or(FlushError::SessionEnded)?;
            s.flushes.start(session, channel, s.shutdown)
        })?;
        requests::flushed(part, key, |s| (&mut s.flushes.awaited, s.shutdown)).await
    }

    /// Sends `payload` to `session`, waiting for room while its queue is full (backpressure).
    pub async fn send(
        &self,
        session: SessionId,
        stream: u64,
        mode: Mode,
        payload: Bytes,
    ) -> Result<Sent, SendError> {
        let mut payload = Some(payload);
        core::future::poll_fn(|cx| {
            self.holding(session).with(|s, wakes| {
                let p = payload.take().unwrap_or_default();
                match s.server.send(session, stream, mode, p) {
                    Err(SendError::QueueFull(p)) if !s.shutdown => {
                        payload = Some(p);
                        register_in(&mut s.capacity, cx.waker());
                        // Registered first: an overflow that closes the session wakes it.
                        s.route_events(wakes);
                        Poll::Pending
                    }
                    r => {
                        s.sent_to(session, wakes);
                        Poll::Ready(r)
                    }
                }
            })
        })
        .await
    }

    /// [`ServerHandle::send`] for a plain (non-async) thread: blocks it while the queue is full.
    /// Never call it from inside an async task, whose thread it would block.
    pub fn send_blocking(
        &self,
        session: SessionId,
        stream: u64,
        mode: Mode,
        payload: Bytes,
    ) -> Result<Sent, SendError> {
        pollster::block_on(self.send(session, stream, mode, payload))
    }

    /// Sends `payloads` to `session` on `stream` in order, front first, waiting for room while its
    /// queue is full: [`ServerHandle::send`] for a batch, with one lock and one write-out per run
    /// of sends that fit instead of one per message.
    ///
    /// Each payload sent is taken from `payloads`. On an error the refused payload comes back in
    /// it, and the ones after it stay in `payloads`, unsent.
    pub async fn send_many(
        &self,
        session: SessionId,
        stream: u64,
        mode: Mode,
        payloads: &mut VecDeque<Bytes>,
    ) -> Result<(), SendError> {
        core::future::poll_fn(|cx| {
            self.holding(session).with(|s, wakes| {
                let (run, sent) =
                    Run::send_all(payloads, |q| s.server.send_many(session, stream, mode, q));
                // Polled (and so registered for room) first: an overflow that closes the session
                // wakes it.
                let polled = run.poll(s.shutdown, payloads, &mut s.capacity, cx.waker());
                if sent {
                    s.sent_to(session, wakes);
                } else {
                    s.route_events(wakes);
                }
                polled
            })
        })
        .await
    }

    /// Sends one payload to many sessions (fan-out); returns the sends that were refused.
    pub fn broadcast(
        &self,
        sessions: impl IntoIterator<Item = SessionId>,
        stream: u64,
        mode: Mode,
        payload: &Bytes,
    ) -> Vec<(SessionId, SendError)> {
        // Each connection's own task writes: one write per session under the server's lock
        // would hold every other connection up for a fan-out's length.
        let send = |shard: &Shared<State>, sessions: &mut dyn Iterator<Item = SessionId>| {
            shard.with(|s, wakes| {
                let refused = s.server.broadcast(sessions, stream, mode, payload);
                s.flush(wakes, false);
                refused
            })
        };
        if self.shards.len() == 1 {
            return send(self.first(), &mut sessions.into_iter());
        }
        let mut parts = alloc::vec![Vec::new(); self.shards.len()];
        for session in sessions {
            parts[part(self.shards.len(), session.0)].push(session);
        }
        let mut refused = Vec::new();
        for (shard, part) in self.shards.iter().zip(parts) {
            if !part.is_empty() {
                refused.append(&mut send(shard, &mut part.into_iter()));
            }
        }
        refused
    }

    /// Replies to `session`'s message `to`. Callable from any thread.
    pub fn reply(&self, session: SessionId, to: Seq, payload: Bytes) -> Result<Seq, SendError> {
        self.send_command(session, |s| s.reply(session, to, payload))
    }

    /// Sends a request to `session` and waits for its reply, at most `timeout`.
    pub async fn request(
        &self,
        session: SessionId,
        stream: u64,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<Bytes, RequestError> {
        let seq = self
            .holding(session)
            .with(|s, wakes| {
                let deadline = s.clock.now() + timeout;
                let r = s.server.request(session, stream, payload, deadline);
                if let Ok(seq) = r {
                    s.requests.expect((session, seq));
                }
                s.sent_to(session, wakes);
                r
            })
            .map_err(RequestError::Send)?;
        requests::answer(self.holding(session), (session, seq), |s| {
            (&mut s.requests, s.shutdown)
        })
        .await
    }

    /// Answers a [`ServerEvent::Authenticate`].
    pub fn authenticate(&self, conn: ConnId, accept: bool) {
        shard_of(&self.shards, conn).with(|s, wakes| {
            let now = s.clock.now();
            s.server.authenticate(now, conn, accept);
            s.flush(wakes, false);
        });
    }

    /// Closes a session: the client is told; both sides see [`SessionEvent::Closed`].
    pub fn close_session(&self, session: SessionId, code: u64, reason: Bytes) {
        self.holding(session).with(|s, wakes| {
            s.server.close_session(session, code, reason);
            // The close handed back what was unacknowledged: no flush waiting can succeed now,
            // though the session's last event waits for the client's reply.
            s.flushes.end(session, wakes);
            s.flush(wakes, true);
        });
    }

    /// The next event; `None` once the server has shut down and every event was taken.
    pub async fn next_event(&self) -> Option<ServerEvent> {
        core::future::poll_fn(|cx| self.poll_event(cx)).await
    }

    /// The next event, without waiting.
    pub fn try_event(&self) -> Option<ServerEvent> {
        self.inbox.take_one(|e| self.taken(e))
    }

    /// Waits for an event, then moves up to `max` of those ready into `into` under one lock:
    /// [`ServerHandle::next_event`] for a batch. Returns how many it moved; 0 once the server has
    /// shut down and every event was taken (or if `max` is 0).
    pub async fn next_events(&self, into: &mut Vec<ServerEvent>, max: usize) -> usize {
        self.inbox.next(into, max, |e| self.taken(e)).await
    }

    /// Moves up to `max` of the events ready now into `into`, without waiting; returns how many.
    pub fn try_events(&self, into: &mut Vec<ServerEvent>, max: usize) -> usize {
        self.inbox.take(into, max, |e| self.taken(e))
    }

    /// Polls for the next event (for building a `Stream`).
    pub fn poll_event(&self, cx: &mut Context<'_>) -> Poll<Option<ServerEvent>> {
        self.inbox.poll_one(cx, |e| self.taken(e))
    }

    /// With shared stores, records the messages among `events`, just taken by the application,
    /// as consumed.
    fn taken(&self, events: &[ServerEvent]) {
        if self.records_consumed && !events.is_empty() {
            // A store that fails says so with an event: route it like any other. (A server on
            // shared stores is never split.)
            self.first().with(|s, wakes| {
                s.server.record_consumed(events);
                s.route_events(wakes);
            });
        }
    }

    /// Stops accepting, closes every connection, ends every awaited request. Sessions are not
    /// closed: their clients find them gone when they try to resume, and say so loudly.
    ///
    /// Events made before the shutdown are still taken, and then the events end (`None`). Every
    /// message acknowledged to a client is among them: input a connection read but had not yet
    /// handed on when the shutdown came is dropped unacknowledged, so its client gets those
    /// messages back as unacknowledged when it learns the session is gone.
    pub fn shutdown(&self) {
        // Every part stopped before the events end: a part still running until then puts its
        // events, whose messages it acknowledged, before the end, not after it.
        let last = self.shards.len() - 1;
        for (i, shard) in self.shards.iter().enumerate() {
            shard.with(|s, wakes| {
                s.stop(wakes);
                if i == last {
                    s.inbox.close(wakes);
                }
            });
        }
    }

    /// Queues a message the shared session store already sequenced and holds (see
    /// [`Server::send_sequenced`]). Callable from any thread.
    pub fn send_sequenced(
        &self,
        session: SessionId,
        message: Stored,
    ) -> Result<Sequenced, SendError> {
        self.send_command(session, |s| s.send_sequenced(session, message))
    }

    /// Whether the server has shut down ([`ServerHandle::shutdown`], or its last handle dropped).
    pub fn is_shut_down(&self) -> bool {
        self.first().with(|s, _| s.shutdown)
    }

    /// Reads the core server (sessions, counters), under the lock. A server split into
    /// [`ServerOptions::shards`] has a core per part, and this reads the first: see
    /// [`ServerHandle::inspect_session`].
    pub fn inspect<T>(&self, f: impl FnOnce(&Server) -> T) -> T {
        self.first().with(|s, _| f(&s.server))
    }

    /// Reads the core server that holds `session`, under its lock.
    pub fn inspect_session<T>(&self, session: SessionId, f: impl FnOnce(&Server) -> T) -> T {
        self.holding(session).with(|s, _| f(&s.server))
    }
}

/// The server's events as a stream: the same as [`ServerHandle::next_event`] in a loop.
impl futures_core::Stream for ServerHandle {
    type Item = ServerEvent;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<ServerEvent>> {
        self.poll_event(cx)
    }
}

/// How long to wait after a failed accept before trying again.
const ACCEPT_RETRY: Duration = Duration::from_millis(50);

/// Connections accepted per poll before yielding.
const ACCEPTS_PER_POLL: usize = 64;

/// The future that accepts connections and runs the server's timers; spawn it on the runtime. It
/// completes when the server shuts down.
pub struct ServerDriver<R: Runtime> {
    rt: R,
    shards: Shards,
    listener: Option<R::Listener>,
    clock: Clock,
    alarm: Alarm,
    /// After a failed accept, when to try again.
    accept_retry: Option<std::time::Instant>,
    /// The decoder's frame limit, which bounds what a connection's reader may buffer.
    max_frame: usize,
    /// How long a connection of a split server may take to say which session it is for.
    handshake: core::time::Duration,
    /// How many of a split server's connections may be on their way to their part at once.
    max_opening: usize,
    /// Where the connections' large read buffers come home to.
    recycler: Arc<Recycler>,
    span: tracing::Span,
}

impl<R: Runtime> core::fmt::Debug for ServerDriver<R> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("ServerDriver").finish_non_exhaustive()
    }
}

/// A server on runtime `rt` accepting from `listener`: the handle for the application and the
/// driver to spawn.
pub fn server<R: Runtime>(
    rt: R,
    listener: R::Listener,
    options: ServerOptions,
    entropy: alloc::boxed::Box<dyn Entropy>,
) -> Result<(ServerHandle, ServerDriver<R>), ConfigError> {
    serve(rt, listener, options, entropy, None)
}

/// As [`server`], with the sessions kept in `sessions`, shared with the other servers of a
/// cluster (see [`Server::with_sessions`]).
pub fn server_with_sessions<R: Runtime>(
    rt: R,
    listener: R::Listener,
    options: ServerOptions,
    entropy: alloc::boxed::Box<dyn Entropy>,
    sessions: alloc::boxed::Box<dyn SessionStore>,
) -> Result<(ServerHandle, ServerDriver<R>), ConfigError> {
    serve(rt, listener, options, entropy, Some(sessions))
}

fn serve<R: Runtime>(
    rt: R,
    listener: R::Listener,
    options: ServerOptions,
    entropy: alloc::boxed::Box<dyn Entropy>,
    sessions: Option<alloc::boxed::Box<dyn SessionStore>>,
) -> Result<(ServerHandle, ServerDriver<R>), ConfigError> {
    let local_addr = listener
        .local_addr()
        .map_err(|_| ConfigError::Zero("listener address"))?;
    let clock = Clock::new(R::now);
    let max_frame = options.config.channel.max_frame_size;
    let handshake = options.config.handshake_timeout;
    let records_consumed = sessions.is_some();
    let inbox = Arc::new(Inbox::new());
    // A session store is one per server, and the sessions it loads may be any: one part.
    let count = match sessions {
        Some(_) => 1,
        None => options.shards.clamp(1, MAX_SHARDS).next_power_of_two(),
    };
    let state = |server: Server, index: usize| State {
        server,
        clock,
        slots: BTreeMap::new(),
        next_conn: index as ConnId,
        conn_step: count as ConnId,
        scratch: BytesMut::new(),
        inbox: inbox.clone(),
        capacity: Vec::new(),
        requests: Awaited::new(),
        flushes: Flushes::new(),
        driver: None,
        arming: Arming::new(options.config.channel.max_ack_delay),
        authenticator: options.authenticator.clone(),
        shutdown: false,
        handles: 1,
        opening: 0,
        openers: Vec::new(),
    };
    let shards: Vec<_> = match sessions {
        Some(sessions) => {
            let server =
                Server::with_sessions(options.config.clone(), clock.now(), entropy, sessions)?;
            alloc::vec![Shared::new(state(server, 0))]
        }
        None if count == 1 => {
            let server = Server::new(options.config.clone(), clock.now(), entropy)?;
            alloc::vec![Shared::new(state(server, 0))]
        }
        None => {
            let entropy = SharedEntropy(Arc::new(super::sync::Mutex::new(entropy)));
            let mut shards = Vec::with_capacity(count);
            for index in 0..count {
                let mut server = Server::new(
                    options.config.clone(),
                    clock.now(),
                    Box::new(entropy.clone()),
                )?;
                server.set_shard(Shard::new(index, count));
                shards.push(Shared::new(state(server, index)));
            }
            shards
        }
    };
    let shards: Shards = shards.into();
    let driver = ServerDriver {
        rt,
        shards: shards.clone(),
        listener: Some(listener),
        clock,
        alarm: Alarm::new(),
        accept_retry: None,
        max_frame,
        handshake,
        max_opening: options.config.max_pending_handshakes,
        recycler: Recycler::new(),
        span: tracing::info_span!("steadfast_server", %local_addr),
    };
    Ok((
        ServerHandle {
            shards,
            inbox,
            records_consumed,
            local_addr,
        },
        driver,
    ))
}

/// One source of entropy drawn from by every part of a split server.
#[derive(Clone)]
struct SharedEntropy(Arc<super::sync::Mutex<Box<dyn Entropy>>>);

impl rand_core::RngCore for SharedEntropy {
    fn next_u32(&mut self) -> u32 {
        super::sync::lock(&self.0).next_u32()
    }

    fn next_u64(&mut self) -> u64 {
        super::sync::lock(&self.0).next_u64()
    }

    fn fill_bytes(&mut self, dst: &mut [u8]) {
        super::sync::lock(&self.0).fill_bytes(dst);
    }
}

impl rand_core::CryptoRng for SharedEntropy {}

impl<R: Runtime> ServerDriver<R> {
    /// Runs every part's due timers and writes what they made; an unsplit server's new connection
    /// `accepted` joins its one part here. Returns when the parts next want the timer task, whether
    /// the server has shut down, and the new connection's id.
    fn tick(
        &self,
        cx: &mut Context<'_>,
        accepted: Option<&(R::Stream, SocketAddr)>,
    ) -> (Option<crate::time::Instant>, bool, Option<ConnId>) {
        let mut deadline = None;
        let mut conn = None;
        for shard in self.shards.iter() {
            let armed = shard.with(|s, wakes| {
                register(&mut s.driver, cx.waker());
                let now = s.clock.now();
                if !s.shutdown
                    && let Some((io, peer)) = accepted
                {
                    let id = s.join(now, io.try_writer());
                    tracing::debug!(conn = id, %peer, "accepted");
                    conn = Some(id);
                }
                if s.server.poll_timeout().is_some_and(|t| t <= now) {
                    s.server.handle_timeout(now);
                }
                s.flush(wakes, false);
                s.arming.arm(now, s.server.poll_timeout())
            });
            deadline = crate::time::earliest(deadline, armed);
        }
        // Every part stops under its own lock, the first one first.
        let stop = self.shards[0].with(|s, _| s.shutdown);
        (deadline, stop, conn)
    }

    /// Starts a split server's new connection on its way to the part its hello names, unless
    /// `max_pending_handshakes` connections are on their way already (or the server is down).
    fn open(&self, io: R::Stream, peer: SocketAddr) {
        let admitted = self.shards[0].with(|s, _| {
            let admitted = !s.shutdown && s.opening < self.max_opening;
            s.opening += usize::from(admitted);
            admitted
        });
        if !admitted {
            tracing::debug!(%peer, "refused: too many connections before their hello");
            return;
        }
        tracing::debug!(%peer, "accepted");
        // A deadline past the clock's range is none.
        let timer = R::now()
            .checked_add(self.handshake)
            .map(|until| self.rt.timer(until));
        self.rt.spawn(Box::pin(ConnTask {
            span: tracing::info_span!(parent: &self.span, "steadfast_conn", conn = tracing::field::Empty, %peer),
            shared: self.shards[0].clone(),
            id: 0,
            io,
            read_buf: ReadBuf::new(self.max_frame, self.recycler.clone()),
            out: BytesMut::new(),
            closing: false,
            opener: Some(Box::new(Opener {
                shards: self.shards.clone(),
                held: Vec::new(),
                reader: crate::server::OpeningReader::new(self.max_frame),
                timer,
                waker: None,
            })),
        }));
    }
}

impl<R: Runtime> Future for ServerDriver<R> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        let span = this.span.clone();
        let _entered = span.enter();
        let mut first = true;
        for _ in 0..ACCEPTS_PER_POLL {
            let Some(listener) = &mut this.listener else {
                return Poll::Ready(());
            };
            let resting = this.accept_retry.is_some_and(|t| R::now() < t);
            let accepted = match (resting, listener.poll_accept(cx)) {
                (true, _) => None,
                (false, Poll::Ready(Ok((io, peer)))) => Some((io, peer)),
                (false, Poll::Ready(Err(e))) => {
                    // Out of descriptors, or a connection reset before it was accepted: the
                    // listener lives on, but a listener in error registers no wake-up, and out of
                    // descriptors does not clear at once; try again shortly.
                    tracing::warn!(error = %e, "accept failed");
                    this.accept_retry = Some(R::now() + ACCEPT_RETRY);
                    None
                }
                (false, Poll::Pending) => {
                    this.accept_retry = None;
                    None
                }
            };
            // A split server's connection finds its part from its hello, in its own task
            // (`Opener`); the parts' timers run on the first pass of each poll, and on every pass
            // that accepted nothing, so that a flood of connections cannot hold them up.
            let accepted = match accepted {
                Some((io, peer)) if this.shards.len() > 1 => {
                    this.open(io, peer);
                    if first {
                        first = false;
                        if this.tick(cx, None).1 {
                            this.listener = None;
                            return Poll::Ready(());
                        }
                    }
                    continue;
                }
                accepted => accepted,
            };
            first = false;
            let (deadline, stop, conn) = this.tick(cx, accepted.as_ref());
            if stop {
                this.listener = None;
                return Poll::Ready(());
            }
            if let (Some(id), Some((io, peer))) = (conn, accepted) {
                this.rt.spawn(Box::pin(ConnTask {
                    span: tracing::info_span!(parent: &this.span, "steadfast_conn", conn = id, %peer),
                    shared: this.shards[0].clone(),
                    id,
                    io,
                    read_buf: ReadBuf::new(this.max_frame, this.recycler.clone()),
                    out: BytesMut::new(),
                    closing: false,
                    opener: None,
                }));
                continue;
            }
            let deadline = match (deadline.map(|d| this.clock.to_std(d)), this.accept_retry) {
                (Some(a), Some(b)) => a.min(b),
                (a, b) => match a.or(b) {
                    Some(d) => d,
                    None => return Poll::Pending,
                },
            };
            match this.alarm.poll(&this.rt, cx, deadline) {
                Poll::Ready(()) => continue,
                Poll::Pending => return Poll::Pending,
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

/// Reads per poll before yielding.
const READS_PER_POLL: usize = 32;

/// One connection: reads into the core, writes what the core queued for it.
struct ConnTask<S> {
    shared: Arc<Shared<State>>,
    id: ConnId,
    io: S,
    read_buf: ReadBuf,
    out: BytesMut,
    closing: bool,
    span: tracing::Span,
    /// A split server's connection before it joined the part its hello names: until then,
    /// `shared` and `id` mean nothing.
    opener: Option<Box<Opener>>,
}

/// A connection to a split server, reading until its hello names the part that takes it: the part
/// holding the session it resumes, or, for a new session, the one its client's random nonce falls
/// in. Nothing reaches a core before then, so the connection starts in the right one.
struct Opener {
    shards: Shards,
    /// What arrived so far, for the core once the part is known.
    held: Vec<Bytes>,
    /// Bounded by the decoder's frame limit: a hello announced larger is refused at its prefix.
    reader: crate::server::OpeningReader,
    /// The handshake's deadline: a connection that says nothing is closed.
    timer: Option<Pin<Box<dyn super::Timer>>>,
    /// Its waker, as the first part keeps it for a shutdown to wake.
    waker: Option<Waker>,
}

/// Counted out of the first part whichever way the opening ended.
impl Drop for Opener {
    fn drop(&mut self) {
        let waker = self.waker.take();
        self.shards[0].with(|s, _| {
            s.opening -= 1;
            if let Some(w) = waker {
                s.openers.retain(|o| !o.will_wake(&w));
            }
        });
    }
}

/// A task dropped with its runtime lets its socket close: the direct path's share of it would
/// otherwise keep it open for as long as the application keeps a handle.
impl<S> Drop for ConnTask<S> {
    fn drop(&mut self) {
        if self.opener.is_some() {
            return;
        }
        let id = self.id;
        self.shared.with(|s, _| {
            if let Some(slot) = s.slots.get_mut(&id) {
                slot.direct.clear();
            }
        });
    }
}

impl<S: Io> ConnTask<S> {
    /// Reads a split server's connection until it knows which part takes it, and joins it there;
    /// `Ready(false)`: the connection ended (or the server did) first.
    // Out of line: once per connection, kept out of the read loop's way.
    #[cold]
    #[inline(never)]
    fn poll_opening(&mut self, cx: &mut Context<'_>) -> Poll<bool> {
        let Some(opener) = self.opener.as_mut() else {
            return Poll::Ready(true);
        };
        // A shutdown closes the connections still on their way too: the first part wakes them.
        let (shards, waker) = (&opener.shards, &mut opener.waker);
        let stopped = shards[0].with(|s, _| {
            if !waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                if let Some(old) = waker.replace(cx.waker().clone()) {
                    s.openers.retain(|o| !o.will_wake(&old));
                }
                s.openers.push(cx.waker().clone());
            }
            s.shutdown
        });
        if stopped {
            return Poll::Ready(false);
        }
        let count = opener.shards.len();
        let index = loop {
            match poll_read_chunk(&mut self.io, cx, &mut self.read_buf) {
                // All of it held back to complete a large frame: read again.
                Poll::Ready(Ok(Some(data))) if data.is_empty() => {}
                Poll::Ready(Ok(Some(data))) => {
                    let verdict = opener.reader.feed(data.clone());
                    opener.held.push(data);
                    match verdict {
                        Opening::More => {}
                        Opening::Resume(session) => break part(count, session.0),
                        Opening::New(nonce) => break part(count, nonce),
                        // Its core refuses it.
                        Opening::Other => break 0,
                    }
                }
                Poll::Ready(Ok(None)) | Poll::Ready(Err(_)) => return Poll::Ready(false),
                Poll::Pending => {
                    let expired = opener
                        .timer
                        .as_mut()
                        .is_some_and(|t| t.as_mut().poll(cx).is_ready());
                    return if expired {
                        Poll::Ready(false)
                    } else {
                        Poll::Pending
                    };
                }
            }
        };
        let shard = opener.shards[index].clone();
        let held = core::mem::take(&mut opener.held);
        let writer = self.io.try_writer();
        let id = shard.with(|s, wakes| {
            if s.shutdown {
                return None;
            }
            let now = s.clock.now();
            let id = s.join(now, writer);
            for data in held {
                s.server.handle_input(now, id, data);
            }
            s.flush(wakes, false);
            Some(id)
        });
        // Refused at a shutdown, it stays unjoined. Either way it is counted out of the first part
        // as the opener goes, with no part's lock held.
        let Some(id) = id else {
            return Poll::Ready(false);
        };
        self.opener = None;
        self.span.record("conn", id);
        self.shared = shard;
        self.id = id;
        Poll::Ready(true)
    }

    /// Tells the core the connection ended and forgets it.
    fn ended(&mut self) {
        let id = self.id;
        self.shared.with(|s, wakes| {
            let now = s.clock.now();
            s.slots.remove(&id);
            s.server.on_disconnected(now, id);
            s.flush(wakes, false);
        });
    }
}

impl<S: Io> Future for ConnTask<S> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        let span = this.span.clone();
        let _entered = span.enter();
        if this.opener.is_some() {
            match this.poll_opening(cx) {
                Poll::Ready(true) => {}
                Poll::Ready(false) => return Poll::Ready(()),
                Poll::Pending => return Poll::Pending,
            }
        }
        for _ in 0..READS_PER_POLL {
            let mut input = None;
            let mut held = false;
            if !this.closing {
                match poll_read_chunk(&mut this.io, cx, &mut this.read_buf) {
                    // All of it held back to complete a large frame: read again.
                    Poll::Ready(Ok(Some(data))) if data.is_empty() => held = true,
                    Poll::Ready(Ok(Some(data))) => input = Some(data),
                    Poll::Ready(Ok(None)) => {
                        this.ended();
                        return Poll::Ready(());
                    }
                    Poll::Ready(Err(e)) => {
                        tracing::debug!(conn = this.id, error = %e, "read failed");
                        this.ended();
                        return Poll::Ready(());
                    }
                    Poll::Pending => {}
                }
            }
            let read = input.is_some() || held;
            let id = this.id;
            let out = &mut this.out;
            let mut woke = false;
            let gone = this.shared.with(|s, wakes| {
                // Read before a shutdown, its turn after: dropped unread. Its messages would be
                // acknowledged to the client, but their events would come after the application
                // was told there are no more.
                let input = input.filter(|_| !s.shutdown);
                let decoded = input.is_some();
                if let Some(data) = input {
                    let now = s.clock.now();
                    s.server.handle_input(now, id, data);
                }
                // Also what the application queued while this task was busy: encoded here, in
                // one go (see `State::sent_to`). A step that decoded nothing and finds nothing to
                // encode has nothing to flush.
                if decoded || s.server.has_transmit() {
                    woke = s.flush(wakes, false) && decoded;
                }
                let Some(slot) = s.slots.get_mut(&id) else {
                    return true;
                };
                register(&mut slot.waker, cx.waker());
                if out.is_empty() {
                    core::mem::swap(out, &mut slot.out);
                } else {
                    out.extend_from_slice(&slot.out);
                    slot.out.clear();
                }
                slot.direct.driver_holds(!out.is_empty());
                slot.close
            });
            this.closing |= gone;
            let before = this.out.len();
            match poll_write_all(&mut this.io, cx, &mut this.out) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => {
                    tracing::debug!(conn = id, error = %e, "write failed");
                    this.ended();
                    return Poll::Ready(());
                }
                Poll::Pending => {}
            }
            // A connection closed for being dead may never drain: what it did not take now is lost
            // with it either way.
            if this.closing {
                let _ = this.io.poll_shutdown(cx);
                this.shared.with(|s, _| s.slots.remove(&id));
                return Poll::Ready(());
            }
            if !read && this.out.len() == before {
                return Poll::Pending;
            }
            // The application was waiting for what this read brought, and the link is busy: yield
            // to it. A runtime that keeps a woken task on the worker that woke it (tokio does) runs
            // it next, here, while the events are in this core's cache, and this task goes to the
            // back of the queue, where an idle worker may take it and read on at the same time.
            // (On a quiet link the next read finds nothing: no need, and waking an idle worker for
            // this task would cost each message a system call.)
            if woke && this.read_buf.busy() {
                break;
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}
