//! A client session on a real runtime: a [`ClientHandle`] for the application, and the
//! [`ClientDriver`] future that owns the connection.

use alloc::collections::VecDeque;
use alloc::vec::Vec;
use core::future::Future;
use core::net::SocketAddr;
use core::pin::Pin;
use core::task::{Context, Poll, Waker};
use std::io;

use bytes::{Bytes, BytesMut};

use super::batch::Run;
use super::direct::Direct;
use super::inbox::Inbox;
use super::requests::{self, Awaited, Flushes};
use super::shared::{Recycler, Shared, Wakes, register, register_in};
use super::sync::Arc;
use super::{
    Alarm, BoxFuture, Clock, FlushError, Io, ReadBuf, RequestError, Runtime, poll_read_chunk,
    poll_write_all, sooner,
};
use crate::client::{Client, ClientConfig, Directive};
use crate::config::ConfigError;
use crate::identity::SessionId;
use crate::mode::{Mode, Sent};
use crate::send::SendError;
use crate::session::{Entropy, SessionCounters, SessionEvent};
use crate::store::Store;
use crate::time::Duration;
use crate::{CLOSE_NORMAL, Seq};

/// How a client connects.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ClientOptions {
    /// The session's configuration; its `servers` is set from [`ClientOptions::servers`].
    pub config: ClientConfig,
    /// The servers to try, in the order the reconnect policy picks them.
    pub servers: Vec<SocketAddr>,
    /// How long one connection attempt may take before it counts as failed.
    pub connect_timeout: Duration,
    /// With a durable store: the application says when it is done with each message
    /// ([`ClientHandle::consumed`]) instead of a message counting as consumed once it is taken.
    /// Taking counts for most applications; one that must not lose a message it took but had not
    /// finished with when its process died sets this and records its own effects first.
    pub manual_consume: bool,
}

/// The messages a client's send queue holds by default: four times a server session's
/// ([`crate::Config::new`]), still with no more than that in flight. A sending thread that finds
/// the queue full sleeps until an ack makes room, and a deeper queue keeps it sending while the
/// acks are on their way. A client has one session, where a server multiplies its bound by its
/// sessions. Payload bytes stay bounded by `max_queued_bytes` either way; the queue's own entries
/// (under 100 B each) can take up to about 6 MiB more.
const CLIENT_QUEUED_MESSAGES: usize = 65536;

impl ClientOptions {
    /// Defaults for a stream transport to `servers`, with a send queue of 65,536 messages (a
    /// server session's default holds 16,384), of which at most 16,384 are in flight.
    pub fn new(servers: Vec<SocketAddr>) -> Self {
        let mut channel = crate::Config::new(crate::Transport::Stream);
        channel.max_queued_messages = CLIENT_QUEUED_MESSAGES;
        let config = ClientConfig::new(channel, servers.len());
        ClientOptions {
            config,
            servers,
            connect_timeout: Duration::from_secs(5),
            manual_consume: false,
        }
    }
}

pub(crate) struct State {
    client: Client,
    clock: Clock,
    /// Where the events the driver has routed wait for the application.
    inbox: Arc<Inbox<SessionEvent>>,
    /// Senders waiting for room in the send queue.
    capacity: Vec<Waker>,
    requests: Awaited<Seq>,
    flushes: Flushes<()>,
    driver: Option<Waker>,
    /// The deadline the driver sleeps until: a send that makes the core want an earlier one must
    /// wake it, even when it wrote its frames itself.
    armed: Option<crate::time::Instant>,
    /// Sends made while the driver has nothing to write go out through this.
    direct: Direct,
    /// What a direct write left unwritten: the driver writes it before anything newer.
    pending: BytesMut,
    /// The session is over: no more events will come.
    over: bool,
    /// Live [`ClientHandle`]s; when the last goes, the session is closed.
    handles: usize,
    closed_waiters: Vec<Waker>,
    connected_waiters: Vec<Waker>,
}

impl State {
    /// Routes the core's new events where they stand in its queue: request replies to their
    /// futures, the rest on to the application. Returns whether it woke the application, waiting
    /// for events.
    fn drain_events(&mut self, wakes: &mut Wakes) -> bool {
        let mut i = 0;
        while i < self.client.events_mut().len() {
            let mut ended = false;
            match &self.client.events_mut()[i] {
                SessionEvent::Connected {
                    session,
                    resumed,
                    retransmitted,
                    ..
                } => {
                    tracing::info!(%session, resumed, retransmitted, "session connected");
                    wakes.wake_all(&mut self.connected_waiters);
                }
                SessionEvent::Disconnected { cause } => {
                    tracing::info!(?cause, "session disconnected; will resume");
                }
                SessionEvent::Acknowledged { below } => {
                    wakes.wake_all(&mut self.capacity);
                    self.flushes.acknowledged((), *below, wakes);
                }
                SessionEvent::Reply { to, .. } | SessionEvent::RequestTimedOut { seq: to }
                    if self.requests.awaits(to) =>
                {
                    let to = *to;
                    let result = match self.client.events_mut().remove(i) {
                        Some(SessionEvent::Reply { payload, .. }) => Ok(payload),
                        _ => Err(RequestError::TimedOut),
                    };
                    self.requests.answer(to, result, wakes);
                    continue;
                }
                SessionEvent::SessionLost {
                    reason,
                    unacknowledged,
                } => {
                    tracing::warn!(?reason, handed_back = unacknowledged.len(), "session lost");
                    ended = true;
                }
                SessionEvent::Closed { reason, .. } => {
                    tracing::info!(?reason, "session closed");
                    ended = true;
                }
                _ => {}
            }
            if ended {
                self.client.session_ended();
                self.end(wakes);
            }
            i += 1;
        }
        let woke = self.inbox.put(self.client.events_mut(), wakes);
        // After the last events, not before: the application may look in between.
        if self.over {
            self.inbox.close(wakes);
        }
        woke
    }

    /// The messages among events the application took count as consumed.
    fn consume(&mut self, taken: &[SessionEvent]) {
        for event in taken {
            if let SessionEvent::Received(m) | SessionEvent::Redelivered(m) = event {
                self.client.consumed(m.seq);
            }
        }
    }

    /// After a send: routes the events it made, and gets the frames it queued on their way,
    /// written from this thread if the direct path is open, else by the driver, woken for them.
    fn kick(&mut self, wakes: &mut Wakes) {
        self.drain_events(wakes);
        if self.direct.is_open() {
            // A send into a full in-flight window has nothing to write: the driver, idle, has
            // written all else, so the clock need not be read (a saturated sender meets this on
            // most sends).
            if self.client.channel().has_unsent() {
                let now = self.clock.now();
                while self.pending.len() < WRITE_BATCH
                    && self.client.poll_transmit(now, &mut self.pending).is_some()
                {}
                let sent = self.direct.write(&self.pending);
                bytes::Buf::advance(&mut self.pending, sent);
            }
            if self.pending.is_empty() && !sooner(self.client.poll_timeout(), self.armed) {
                return;
            }
        }
        wakes.wake(&mut self.driver);
    }

    fn end(&mut self, wakes: &mut Wakes) {
        self.over = true;
        self.requests.end(.., wakes);
        self.flushes.end_all(wakes);
        wakes.wake_all(&mut self.capacity);
        wakes.wake_all(&mut self.closed_waiters);
        wakes.wake_all(&mut self.connected_waiters);
    }
}

/// The application's side of a client session: cheap to clone, usable from any thread.
///
/// Every method locks the session for one core call and returns; none waits for the network except
/// the `async` ones, which wait only for what they name (room in the queue, a reply, an event).
/// Dropping the last handle closes the session.
///
/// Events wait for the application in a queue the driver never blocks on, so acks and heartbeats
/// keep flowing however slowly the application takes them; that queue is not bounded, and an
/// application that stops taking events grows it by one entry per message received.
pub struct ClientHandle {
    shared: Arc<Shared<State>>,
    inbox: Arc<Inbox<SessionEvent>>,
    /// Whether the messages the application takes count as consumed when taken (a durable store,
    /// without [`ClientOptions::manual_consume`]).
    consumes: bool,
}

impl core::fmt::Debug for ClientHandle {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("ClientHandle").finish_non_exhaustive()
    }
}

impl Clone for ClientHandle {
    fn clone(&self) -> Self {
        self.shared.with(|s, _| s.handles += 1);
        ClientHandle {
            shared: self.shared.clone(),
            inbox: self.inbox.clone(),
            consumes: self.consumes,
        }
    }
}

impl Drop for ClientHandle {
    fn drop(&mut self) {
        self.shared.with(|s, wakes| {
            s.handles -= 1;
            if s.handles == 0 && !s.over {
                s.client
                    .close(CLOSE_NORMAL, Bytes::from_static(b"handles dropped"));
                s.drain_events(wakes);
                wakes.wake(&mut s.driver);
            }
        });
    }
}

impl ClientHandle {
    /// Runs a command on the core and wakes the driver to act on it.
    fn command<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        self.shared.with(|s, wakes| {
            let r = f(s);
            s.drain_events(wakes);
            wakes.wake(&mut s.driver);
            r
        })
    }

    /// Runs a command that queues frames on the core, and gets them on their way.
    fn send_command<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        self.shared.with(|s, wakes| {
            let r = f(s);
            s.kick(wakes);
            r
        })
    }

    /// Sends `payload` on `stream` with delivery `mode`, or refuses it at once (a full queue is
    /// [`SendError::QueueFull`]). Callable from any thread.
    pub fn try_send(&self, stream: u64, mode: Mode, payload: Bytes) -> Result<Sent, SendError> {
        self.send_command(|s| s.client.send(stream, mode, payload))
    }

    /// Sends `payload`, waiting for room while the queue is full (backpressure).
    pub async fn send(&self, stream: u64, mode: Mode, payload: Bytes) -> Result<Sent, SendError> {
        let mut payload = Some(payload);
        core::future::poll_fn(|cx| {
            self.shared.with(|s, wakes| {
                let p = payload.take().unwrap_or_default();
                match s.client.send(stream, mode, p) {
                    Err(SendError::QueueFull(p)) if !s.over => {
                        payload = Some(p);
                        register_in(&mut s.capacity, cx.waker());
                        Poll::Pending
                    }
                    r => {
                        s.kick(wakes);
                        Poll::Ready(r)
                    }
                }
            })
        })
        .await
    }

    /// [`ClientHandle::send`] for a plain (non-async) thread: blocks it while the queue is full.
    /// Never call it from inside an async task, whose thread it would block.
    pub fn send_blocking(
        &self,
        stream: u64,
        mode: Mode,
        payload: Bytes,
    ) -> Result<Sent, SendError> {
        pollster::block_on(self.send(stream, mode, payload))
    }

    /// Sends `payloads` on `stream` in order, front first, waiting for room while the queue is
    /// full: [`ClientHandle::send`] for a batch. The session is locked, and its driver woken, once
    /// per run of sends that fit instead of once per message, which at small messages is most of
    /// what a send costs.
    ///
    /// Each payload sent is taken from `payloads`. On an error the refused payload comes back in
    /// it, and the ones after it stay in `payloads`, unsent.
    ///
    /// ```no_run
    /// # async fn run(client: steadfast_core::driver::ClientHandle) -> Result<(), steadfast_core::SendError> {
    /// use std::collections::VecDeque;
    /// use bytes::Bytes;
    /// use steadfast_core::Mode;
    ///
    /// let mut batch: VecDeque<Bytes> = (0..100u8).map(|i| Bytes::from(vec![i; 64])).collect();
    /// client.send_many(0, Mode::Ordered, &mut batch).await?;
    /// assert!(batch.is_empty());
    /// # Ok(()) }
    /// ```
    pub async fn send_many(
        &self,
        stream: u64,
        mode: Mode,
        payloads: &mut VecDeque<Bytes>,
    ) -> Result<(), SendError> {
        core::future::poll_fn(|cx| {
            self.shared.with(|s, wakes| {
                let (run, sent) = Run::send(payloads, |p| s.client.send(stream, mode, p));
                if sent {
                    s.kick(wakes);
                }
                run.poll(s.over, payloads, &mut s.capacity, cx.waker())
            })
        })
        .await
    }

    /// Replies to the server's message `to`: reliable, de-duplicated, and it survives reconnects.
    /// Callable from any thread.
    pub fn reply(&self, to: Seq, payload: Bytes) -> Result<Seq, SendError> {
        self.send_command(|s| s.client.reply(to, payload))
    }

    /// Sends a request on `stream` and waits for the server's reply, at most `timeout`.
    pub async fn request(
        &self,
        stream: u64,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<Bytes, RequestError> {
        let seq = self
            .send_command(|s| {
                let deadline = s.clock.now() + timeout;
                let r = s.client.request(stream, payload, deadline);
                if let Ok(seq) = r {
                    s.requests.expect(seq);
                }
                r
            })
            .map_err(RequestError::Send)?;
        requests::answer(&self.shared, seq, |s| (&mut s.requests, s.over)).await
    }

    /// The next event: messages, replies nobody awaits, connects, disconnects, and finally the
    /// session's end. `None` once the session is over and every event was taken.
    pub async fn next_event(&self) -> Option<SessionEvent> {
        core::future::poll_fn(|cx| self.poll_event(cx)).await
    }

    /// The next event, without waiting; `None` if none is ready.
    pub fn try_event(&self) -> Option<SessionEvent> {
        self.inbox.take_one(|e| self.taken(e))
    }

    /// Waits for an event, then moves up to `max` of those ready into `into` under one lock:
    /// [`ClientHandle::next_event`] for a batch. Returns how many it moved; 0 once the session is
    /// over and every event was taken (or if `max` is 0).
    pub async fn next_events(&self, into: &mut Vec<SessionEvent>, max: usize) -> usize {
        self.inbox.next(into, max, |e| self.taken(e)).await
    }

    /// Moves up to `max` of the events ready now into `into`, without waiting; returns how many.
    pub fn try_events(&self, into: &mut Vec<SessionEvent>, max: usize) -> usize {
        self.inbox.take(into, max, |e| self.taken(e))
    }

    /// Polls for the next event (for building a `Stream`).
    pub fn poll_event(&self, cx: &mut Context<'_>) -> Poll<Option<SessionEvent>> {
        self.inbox.poll_one(cx, |e| self.taken(e))
    }

    /// The messages among `events`, just taken by the application, count as consumed, unless it
    /// says when (or there is no store to record it in).
    fn taken(&self, events: &[SessionEvent]) {
        if self.consumes && !events.is_empty() {
            // A store that fails says so with an event: route it like any other.
            self.shared.with(|s, wakes| {
                s.consume(events);
                s.drain_events(wakes);
            });
        }
    }

    /// Waits until a connection carries the session (at once if one does); `false` if the session
    /// ended instead.
    pub async fn connected(&self) -> bool {
        core::future::poll_fn(|cx| {
            self.shared.with(|s, _| {
                if s.client.is_connected() {
                    Poll::Ready(true)
                } else if s.over {
                    Poll::Ready(false)
                } else {
                    register_in(&mut s.connected_waiters, cx.waker());
                    Poll::Pending
                }
            })
        })
        .await
    }

    /// With a durable store and [`ClientOptions::manual_consume`]: the application is done with
    /// message `seq`, which will not be handed out again after a restart.
    pub fn consumed(&self, seq: Seq) {
        self.shared.with(|s, wakes| {
            s.client.consumed(seq);
            s.drain_events(wakes);
        });
    }

    /// Waits until the server has acknowledged every reliable message sent on this session
    /// before the call (at-most-once ones, [`Mode::Sequenced`] and [`Mode::Unreliable`], are
    /// never acknowledged): each one is in the server's hands (received, not necessarily taken by
    /// its application), whatever reconnects it took. The way to end a session without loss: flush,
    /// then close or drop the last handle, since a close hands back what is still unacknowledged.
    ///
    /// Ends with [`FlushError::SessionEnded`] if the session ends first; its last event,
    /// [`SessionEvent::Closed`] or [`SessionEvent::SessionLost`], hands back the messages whose
    /// delivery is unknown. It does not time out of its own accord: wrap it in the runtime's
    /// timeout for a deadline.
    ///
    /// ```no_run
    /// # async fn run(client: steadfast_core::driver::ClientHandle) -> Result<(), Box<dyn std::error::Error>> {
    /// use bytes::Bytes;
    /// use steadfast_core::Mode;
    ///
    /// for n in 0u64..100 {
    ///     client.send(0, Mode::Ordered, Bytes::copy_from_slice(&n.to_be_bytes())).await?;
    /// }
    /// client.flush().await?; // all 100 are with the server
    /// client.close(0, Bytes::from_static(b"done"));
    /// # Ok(()) }
    /// ```
    pub async fn flush(&self) -> Result<(), FlushError> {
        let key = self
            .shared
            .with(|s, _| s.flushes.start((), s.client.channel(), s.over))?;
        requests::flushed(&self.shared, key, |s| (&mut s.flushes.awaited, s.over)).await
    }

    /// Closes the session: the server is told; [`SessionEvent::Closed`] follows.
    pub fn close(&self, code: u64, reason: Bytes) {
        self.command(|s| s.client.close(code, reason));
        // The close handed back what was unacknowledged: a flush waiting has its answer now,
        // though the session's last event waits for the server's reply.
        self.shared.with(|s, wakes| s.flushes.end((), wakes));
    }

    /// Waits until the session is over (closed or lost).
    pub async fn closed(&self) {
        core::future::poll_fn(|cx| {
            self.shared.with(|s, _| {
                if s.over {
                    Poll::Ready(())
                } else {
                    register_in(&mut s.closed_waiters, cx.waker());
                    Poll::Pending
                }
            })
        })
        .await
    }

    /// Whether a connection carries the session now.
    pub fn is_connected(&self) -> bool {
        self.shared.with(|s, _| s.client.is_connected())
    }

    /// The session's id, once a server named it.
    pub fn session(&self) -> Option<SessionId> {
        self.shared.with(|s, _| s.client.session())
    }

    /// The session's counters.
    pub fn counters(&self) -> SessionCounters {
        self.shared.with(|s, _| *s.client.counters())
    }

    /// Reads the core client directly (its channel's statistics, say), under the lock.
    pub fn inspect<T>(&self, f: impl FnOnce(&Client) -> T) -> T {
        self.shared.with(|s, _| f(&s.client))
    }
}

/// The session's events as a stream: the same as [`ClientHandle::next_event`] in a loop.
impl futures_core::Stream for ClientHandle {
    type Item = SessionEvent;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<SessionEvent>> {
        self.poll_event(cx)
    }
}

/// Output bytes gathered before writing: one write per batch of frames, not one per frame.
const WRITE_BATCH: usize = 256 * 1024;
/// Reads handled per poll before yielding, so one busy session cannot starve its runtime.
const READS_PER_POLL: usize = 32;

/// The future that runs a client session: connects, reads, writes, keeps time. Spawn it on the
/// runtime; it completes when the session is over.
pub struct ClientDriver<R: Runtime> {
    rt: R,
    shared: Arc<Shared<State>>,
    servers: Vec<SocketAddr>,
    connect_timeout: Duration,
    clock: Clock,
    io: Option<R::Stream>,
    connecting: Option<(std::time::Instant, BoxFuture<io::Result<R::Stream>>)>,
    read_buf: ReadBuf,
    out: BytesMut,
    alarm: Alarm,
    /// A write failed: the connection is gone, and the core is yet to hear.
    write_failed: bool,
    span: tracing::Span,
}

impl<R: Runtime> core::fmt::Debug for ClientDriver<R> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("ClientDriver")
            .field("servers", &self.servers)
            .field("connected", &self.io.is_some())
            .finish_non_exhaustive()
    }
}

/// A client session on runtime `rt`: the handle for the application and the driver to spawn.
pub fn client<R: Runtime>(
    rt: R,
    options: ClientOptions,
    entropy: alloc::boxed::Box<dyn Entropy>,
) -> Result<(ClientHandle, ClientDriver<R>), ConfigError> {
    start(rt, options, entropy, None)
}

/// A client session made durable by `store`: started on a store a previous process left, it resumes
/// that process's session (see [`crate::store`]).
pub fn client_with_store<R: Runtime>(
    rt: R,
    options: ClientOptions,
    entropy: alloc::boxed::Box<dyn Entropy>,
    store: alloc::boxed::Box<dyn Store>,
) -> Result<(ClientHandle, ClientDriver<R>), ConfigError> {
    start(rt, options, entropy, Some(store))
}

fn start<R: Runtime>(
    rt: R,
    options: ClientOptions,
    entropy: alloc::boxed::Box<dyn Entropy>,
    store: Option<alloc::boxed::Box<dyn Store>>,
) -> Result<(ClientHandle, ClientDriver<R>), ConfigError> {
    let ClientOptions {
        mut config,
        servers,
        connect_timeout,
        manual_consume,
    } = options;
    if servers.is_empty() {
        return Err(ConfigError::Zero("servers"));
    }
    config.servers = servers.len();
    let max_frame = config.channel.max_frame_size;
    let clock = Clock::new(R::now);
    let client = match store {
        Some(store) => Client::with_store(config, clock.now(), entropy, store)?,
        None => Client::new(config, clock.now(), entropy)?,
    };
    let consumes = client.is_durable() && !manual_consume;
    let inbox = Arc::new(Inbox::new());
    let shared = Shared::new(State {
        client,
        clock,
        inbox: inbox.clone(),
        capacity: Vec::new(),
        requests: Awaited::new(),
        flushes: Flushes::new(),
        driver: None,
        armed: None,
        direct: Direct::default(),
        pending: BytesMut::new(),
        over: false,
        handles: 1,
        closed_waiters: Vec::new(),
        connected_waiters: Vec::new(),
    });
    let driver = ClientDriver {
        rt,
        shared: shared.clone(),
        servers,
        connect_timeout,
        clock,
        io: None,
        connecting: None,
        read_buf: ReadBuf::new(max_frame, Recycler::new()),
        out: BytesMut::new(),
        alarm: Alarm::new(),
        write_failed: false,
        span: tracing::info_span!("steadfast_client"),
    };
    Ok((
        ClientHandle {
            shared,
            inbox,
            consumes,
        },
        driver,
    ))
}

/// A driver that ends, or is dropped with its runtime, lets its socket close: the direct path's
/// share of it would otherwise keep it open for as long as the application keeps a handle.
impl<R: Runtime> Drop for ClientDriver<R> {
    fn drop(&mut self) {
        self.shared.with(|s, _| s.direct.clear());
    }
}

/// What one locked step of the driver found.
struct Step {
    directives: Vec<Directive>,
    deadline: Option<crate::time::Instant>,
    over: bool,
    /// The application was woken for events this step routed.
    woke: bool,
}

impl<R: Runtime> ClientDriver<R> {
    /// Feeds the core what the transport did, and takes back what it must do. One lock.
    fn step(&mut self, input: Option<Bytes>, ended: bool, connected: Option<bool>) -> Step {
        let out = &mut self.out;
        let writing = self.io.is_some();
        let writer = match (connected, &self.io) {
            (Some(true), Some(io)) => io.try_writer(),
            _ => None,
        };
        self.shared.with(|s, wakes| {
            let now = s.clock.now();
            match connected {
                Some(true) => {
                    s.client.on_connected(now);
                    s.direct = Direct::new(writer);
                }
                Some(false) => s.client.on_connect_failed(now),
                None => {}
            }
            if let Some(data) = input {
                s.client.handle_input(now, data);
            }
            if ended {
                s.client.on_disconnected(now);
                s.direct.clear();
            }
            if s.client.poll_timeout().is_some_and(|t| t <= now) {
                s.client.handle_timeout(now);
            }
            let mut directives = Vec::new();
            while let Some(d) = s.client.poll_directive(now) {
                directives.push(d);
            }
            if !directives.is_empty() {
                // A connection made or dropped: the old socket takes nothing more.
                s.direct.clear();
            }
            if writing && !directives.contains(&Directive::Disconnect) {
                // What a direct write left goes first: it was made before anything the core
                // makes now.
                out.extend_from_slice(&s.pending);
                while out.len() < WRITE_BATCH && s.client.poll_transmit(now, out).is_some() {}
            }
            s.pending.clear();
            s.direct.driver_holds(!out.is_empty());
            let woke = s.drain_events(wakes);
            s.armed = s.client.poll_timeout();
            Step {
                directives,
                deadline: s.armed,
                over: s.over,
                woke,
            }
        })
    }
}

impl<R: Runtime> Future for ClientDriver<R> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        let span = this.span.clone();
        let _entered = span.enter();
        this.shared.with(|s, _| register(&mut s.driver, cx.waker()));
        for _ in 0..READS_PER_POLL {
            let mut progress = false;
            // The connection attempt's outcome, bounded by the connect timeout.
            let mut connected = None;
            if let Some((deadline, fut)) = &mut this.connecting {
                match fut.as_mut().poll(cx) {
                    Poll::Ready(Ok(io)) => {
                        tracing::debug!("connected");
                        this.io = Some(io);
                        this.read_buf.reset();
                        this.out.clear();
                        connected = Some(true);
                    }
                    Poll::Ready(Err(e)) => {
                        tracing::debug!(error = %e, "connect failed");
                        connected = Some(false);
                    }
                    Poll::Pending if R::now() >= *deadline => {
                        tracing::debug!("connect timed out");
                        connected = Some(false);
                    }
                    Poll::Pending => {}
                }
                if connected.is_some() {
                    this.connecting = None;
                    progress = true;
                }
            }
            let mut input = None;
            let mut ended = core::mem::take(&mut this.write_failed);
            if let Some(io) = &mut this.io {
                match poll_read_chunk(io, cx, &mut this.read_buf) {
                    // All of it held back to complete a large frame: read again.
                    Poll::Ready(Ok(Some(data))) if data.is_empty() => progress = true,
                    Poll::Ready(Ok(Some(data))) => input = Some(data),
                    Poll::Ready(Ok(None)) => ended = true,
                    Poll::Ready(Err(e)) => {
                        tracing::debug!(error = %e, "read failed");
                        ended = true;
                    }
                    Poll::Pending => {}
                }
            }
            if input.is_some() || ended {
                progress = true;
            }
            if ended {
                this.io = None;
            }
            let read = input.is_some();
            let step = this.step(input, ended, connected);
            for d in &step.directives {
                match *d {
                    Directive::Connect { server, attempt } => {
                        let addr = this.servers[server % this.servers.len()];
                        tracing::debug!(%addr, attempt, "connecting");
                        this.io = None;
                        this.connecting =
                            Some((R::now() + this.connect_timeout, this.rt.connect(addr)));
                        progress = true;
                    }
                    Directive::Disconnect => {
                        this.io = None;
                        this.out.clear();
                    }
                }
            }
            if let Some(io) = &mut this.io {
                let before = this.out.len();
                match poll_write_all(io, cx, &mut this.out) {
                    Poll::Ready(Ok(())) => progress |= before > 0,
                    Poll::Ready(Err(e)) => {
                        tracing::debug!(error = %e, "write failed");
                        this.io = None;
                        this.out.clear();
                        // The next pass reports it, and acts on the reconnect it brings.
                        this.write_failed = true;
                        progress = true;
                    }
                    Poll::Pending => progress |= this.out.len() < before,
                }
            }
            // Over: what the socket took is the last word; a peer that stopped reading is not
            // waited for.
            if step.over {
                if let Some(io) = &mut this.io {
                    let _ = io.poll_shutdown(cx);
                }
                return Poll::Ready(());
            }
            // The application was waiting for what this step read, and the link is busy: yield to
            // it (see the server's connection task).
            if progress && step.woke && read && this.read_buf.busy() {
                break;
            }
            if progress {
                continue;
            }
            let connect_deadline = this.connecting.as_ref().map(|(d, _)| *d);
            let core_deadline = step.deadline.map(|t| this.clock.to_std(t));
            let deadline = match (core_deadline, connect_deadline) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            match deadline {
                Some(d) => match this.alarm.poll(&this.rt, cx, d) {
                    Poll::Ready(()) => continue,
                    Poll::Pending => return Poll::Pending,
                },
                None => return Poll::Pending,
            }
        }
        // Busy: let the runtime run others, then come back.
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}
