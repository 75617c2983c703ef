//! The server end: many sessions, each outliving its connections.
//!
//! The adapter feeds `(connection id, bytes)` and writes back `(connection id, bytes)`; the server
//! routes each connection's hello to a new session or to the session it resumes, supersedes a
//! half-open older connection of that session, refuses stale epochs, wrong tokens and unknown
//! sessions, keeps a disconnected session for its retention time (queueing for it up to a larger
//! bound), and ends it loudly when the time runs out.

use alloc::boxed::Box;
use alloc::collections::{BTreeMap, BTreeSet, VecDeque};
use alloc::sync::Arc;
use alloc::vec::Vec;

use bytes::{Bytes, BytesMut};

use crate::Seq;
use crate::channel::Channel;
use crate::config::{Config, ConfigError};
use crate::event::{Event, Message};
use crate::frame::{DecodeLimits, Frame, HelloFrame, RefuseFrame, WelcomeFrame};
use crate::identity::{SessionId, Token};
use crate::liveness::{LivenessConfig, Verdict};
use crate::mode::{Mode, Sent};
use crate::send::SendError;
use crate::session::{
    DisconnectCause, Entropy, HeldClose, Incoming, Link, LostReason, REPLY_STREAM, RefuseCode,
    Requests, SessionCounters, SessionEvent, SessionQueue, SessionSink, session_event,
};
use crate::store::{Identity, SessionStore, Store, StoreError, Stored};
use crate::tiebreak::{Arbiter, Role};
use crate::time::{Duration, Instant, earliest};

/// The adapter's name for one transport connection.
pub type ConnId = u64;

/// What happens when a reliable send finds the session's queue full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Overflow {
    /// Refuse the send with [`SendError::QueueFull`]; the caller decides.
    Backpressure,
    /// End the session: [`LostReason::Overflow`] on both sides, unacknowledged messages handed back.
    CloseSession,
}

/// A server's configuration.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ServerConfig {
    /// Each session's channel bounds and timers (queue bounds while connected).
    pub channel: Config,
    /// Heartbeats, idle timeout, stall handling, per connection.
    pub liveness: LivenessConfig,
    /// How long a disconnected session is kept for its client to resume it.
    pub retention: Duration,
    /// The queue bound, in messages, while a session is disconnected (Diffusion's larger bound).
    pub disconnected_max_queued_messages: usize,
    /// The queue bound, in bytes, while a session is disconnected.
    pub disconnected_max_queued_bytes: usize,
    /// What a full queue does to a send, unless the stream has its own policy.
    pub overflow: Overflow,
    /// Per-stream overflow policies.
    pub stream_overflow: BTreeMap<u64, Overflow>,
    /// The most sessions held at once; more hellos are refused. (A driver's server split into
    /// parts, `ServerOptions::shards`, applies it to each part.)
    pub max_sessions: usize,
    /// The most connections that have not completed their handshake; more are closed at once.
    /// (Per part of a split server, which also holds as many before their hello.)
    pub max_pending_handshakes: usize,
    /// How long a connection may take to complete its handshake. (On a split server: to send
    /// its hello, then again from there.)
    pub handshake_timeout: Duration,
    /// New sessions wait for the application's [`Server::authenticate`] verdict on their credentials.
    pub authenticate: bool,
    /// The most requests awaiting a reply, per session.
    pub max_pending_requests: usize,
}

impl ServerConfig {
    /// Defaults over `channel`.
    pub fn new(channel: Config) -> Self {
        ServerConfig {
            disconnected_max_queued_messages: channel.max_queued_messages.saturating_mul(4),
            disconnected_max_queued_bytes: channel.max_queued_bytes.saturating_mul(4),
            channel,
            liveness: LivenessConfig::default(),
            retention: Duration::from_secs(30),
            overflow: Overflow::Backpressure,
            stream_overflow: BTreeMap::new(),
            max_sessions: 100_000,
            max_pending_handshakes: 1024,
            handshake_timeout: Duration::from_secs(10),
            authenticate: false,
            max_pending_requests: 4096,
        }
    }
}

/// What the server tells its application.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ServerEvent {
    /// Something happened to a session.
    Session {
        /// Which.
        session: SessionId,
        /// What.
        event: SessionEvent,
    },
    /// A new session's credentials await [`Server::authenticate`].
    Authenticate {
        /// The connection asking.
        conn: ConnId,
        /// What it presented.
        credentials: Bytes,
    },
}

/// What [`Server::send_sequenced`] did with a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Sequenced {
    /// Queued under its sequence number.
    Queued,
    /// The session already holds it (or held it, and it was acknowledged).
    AlreadyHeld,
    /// It is not the session's next message: the ones from `next` must come first.
    Gap {
        /// The sequence number the session expects.
        next: Seq,
    },
}

/// Bytes for one connection, from [`Server::poll_transmit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transmit {
    /// The connection to write to.
    pub conn: ConnId,
    /// How many bytes at the end of the buffer are for it (possibly 0).
    pub len: usize,
    /// Close the connection once they are written: it was refused, superseded, or found dead.
    pub close: bool,
}

struct Session {
    token: Token,
    epoch: u64,
    /// The client's nonce in the hello that claimed `epoch`: the same hello arriving again on a
    /// new binding (its welcome was lost and the server dropped the old one) is that attach, not a
    /// stale one.
    attach_nonce: u64,
    channel: Channel,
    /// Its connection's id while `attached`, else the instant (in nanoseconds) it lost its last
    /// one: see [`Session::conn`] and [`Session::disconnected_at`]. One word and a flag that sits in
    /// padding, for two `Option`s of 24 bytes.
    whereabouts: u64,
    attached: bool,
    requests: Requests,
    counters: Counters,
    /// This side closed the session; waiting to see whether the client closed at the same moment.
    held: Option<Box<HeldClose>>,
    /// Its deadline in the timer set, if armed.
    armed: Option<Instant>,
    /// Its slot in the timer set.
    timer: TimerSlot,
    /// Where it is kept for other servers, with a [`SessionStore`]: boxed once more, so that a
    /// server without shared stores spends 8 bytes per session on it, not 16.
    store: Option<Box<Box<dyn Store>>>,
}

impl Session {
    /// The connection carrying it, if any.
    fn conn(&self) -> Option<ConnId> {
        self.attached.then_some(self.whereabouts)
    }

    /// When it lost its last connection, while it has none.
    fn disconnected_at(&self) -> Option<Instant> {
        (!self.attached).then(|| Instant::from_nanos(self.whereabouts))
    }

    /// Now carried by `conn`; returns the connection that carried it before, if any.
    fn attach(&mut self, conn: ConnId) -> Option<ConnId> {
        let old = self.conn();
        self.whereabouts = conn;
        self.attached = true;
        old
    }

    /// Its connection is gone as of `now`.
    fn detach(&mut self, now: Instant) {
        self.whereabouts = now.as_nanos();
        self.attached = false;
    }
}

struct Conn {
    link: Link,
    session: Option<SessionId>,
    created: Instant,
    /// Close once the outbox is written.
    closing: bool,
    /// Its deadline in the timer set, if armed.
    armed: Option<Instant>,
    /// Its slot in the timer set.
    timer: TimerSlot,
    /// Its id waits in the ready queue.
    queued: bool,
    /// Whether the hello it was welcomed for (the link keeps its nonce) resumed a session, to
    /// answer a retry of it.
    resumed: bool,
}

/// A session's [`SessionCounters`] as the server keeps them: connects and disconnects inline (every
/// session connects, and every retained one has disconnected), the rest boxed at the first of them
/// (most sessions never resume, stall nor time out).
#[derive(Default)]
struct Counters {
    /// Inline up to `u32::MAX`, then carried into `rest` in steps of 2^32: exact, in 8 bytes for
    /// the pair.
    connects: u32,
    disconnects: u32,
    rest: Option<Box<SessionCounters>>,
}

/// Counts one more in an inline `u32`; `true` when it wrapped to 0, and the 2^32 it held must be
/// carried into the boxed counter.
fn wrapped(n: &mut u32) -> bool {
    match n.checked_add(1) {
        Some(more) => {
            *n = more;
            false
        }
        None => {
            *n = 0;
            true
        }
    }
}

impl Counters {
    /// Adds `n` to the counter `counter` picks; adding nothing makes no box.
    fn add(&mut self, n: u64, counter: impl FnOnce(&mut SessionCounters) -> &mut u64) {
        if n > 0 {
            *counter(self.rest.get_or_insert_with(Box::default)) += n;
        }
    }

    fn connected(&mut self) {
        if wrapped(&mut self.connects) {
            self.add(1 << 32, |c| &mut c.connects);
        }
    }

    fn disconnected(&mut self) {
        if wrapped(&mut self.disconnects) {
            self.add(1 << 32, |c| &mut c.disconnects);
        }
    }

    fn get(&self) -> SessionCounters {
        let rest = self.rest.as_deref().copied().unwrap_or_default();
        SessionCounters {
            connects: rest.connects + u64::from(self.connects),
            disconnects: rest.disconnects + u64::from(self.disconnects),
            ..rest
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Key {
    Conn(ConnId),
    Session(SessionId),
}

/// How many timers' room [`Server::handle_timeout`] keeps between calls.
const DUE_KEPT: usize = 256;

/// The server end of many sessions.
///
/// Driving contract as for [`Channel`], per connection: report [`Server::on_connection`],
/// [`Server::handle_input`] and [`Server::on_disconnected`] for each transport connection, drain
/// [`Server::poll_transmit`] (writing each [`Transmit`] to its connection, closing it if asked) and
/// [`Server::poll_event`], then sleep until [`Server::poll_timeout`].
pub struct Server {
    config: ServerConfig,
    /// `config.channel`, shared by every session's channel.
    channel_config: Arc<Config>,
    /// `config.liveness`, shared by every connection.
    liveness_config: Arc<LivenessConfig>,
    entropy: Box<dyn Entropy>,
    /// Boxed, so a B-tree node's spare room costs a pointer per slot, not a whole session.
    sessions: BTreeMap<SessionId, Box<Session>>,
    conns: BTreeMap<ConnId, Box<Conn>>,
    /// Connections that have not completed a handshake (bounded by `max_pending_handshakes`).
    pending: BTreeSet<ConnId>,
    /// The hellos of connections awaiting [`Server::authenticate`]: a few at a time, so not a field
    /// of every connection.
    awaiting_auth: BTreeMap<ConnId, Box<HelloFrame>>,
    /// Reused by `handle_input` for the frames of one read.
    scratch: Vec<Incoming>,
    /// Reused by `handle_timeout` for the timers due at once.
    due: Vec<Key>,
    events: VecDeque<ServerEvent>,
    ready: VecDeque<ConnId>,
    /// Ids waiting in `ready` whose connection is gone (a connection waiting there says so itself,
    /// in `Conn::queued`): each id waits there once at most.
    orphans: BTreeSet<ConnId>,
    timers: Timers,
    limits: DecodeLimits,
    refused_tokens: u64,
    now: Instant,
    /// Where sessions are kept beyond this server, if anywhere.
    stores: Option<Box<dyn SessionStore>>,
    /// The low bits every new session's id carries: which of a driver's shards this server is.
    shard: Shard,
}

/// One server among `mask + 1` that share a listener: the ids of the sessions it makes end in
/// `index`, so that a connection resuming one finds this server by its id alone.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Shard {
    pub(crate) mask: u64,
    pub(crate) index: u64,
}

impl Shard {
    /// Shard `index` of `count`, a power of two.
    #[cfg(feature = "driver")]
    pub(crate) fn new(index: usize, count: usize) -> Self {
        debug_assert!(count.is_power_of_two() && index < count);
        Shard {
            mask: count as u64 - 1,
            index: index as u64,
        }
    }
}

/// What a connection's first bytes say about the server that should take it.
#[cfg(feature = "driver")]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Opening {
    /// The hello is not all there yet.
    More,
    /// A hello resuming this session.
    Resume(SessionId),
    /// A hello for a new session, with the client's random nonce.
    New(u64),
    /// Anything else: whichever server takes it refuses it.
    Other,
}

/// Reads a connection's opening bytes (the preface, then the hello), each chunk once, to say
/// which server should take the connection; the bytes themselves go to that server after.
#[cfg(feature = "driver")]
pub(crate) struct OpeningReader {
    decoder: crate::framing::StreamDecoder,
    verdict: Opening,
}

#[cfg(feature = "driver")]
impl OpeningReader {
    pub(crate) fn new(max_frame_size: usize) -> Self {
        OpeningReader {
            decoder: crate::framing::StreamDecoder::new(DecodeLimits {
                max_frame_size,
                ..DecodeLimits::default()
            }),
            verdict: Opening::More,
        }
    }

    /// Reads the stream's next bytes (no copy: the decoder keeps a reference); once the verdict
    /// is in, it stays.
    pub(crate) fn feed(&mut self, data: Bytes) -> Opening {
        if self.verdict != Opening::More {
            return self.verdict;
        }
        self.decoder.feed_bytes(data);
        self.verdict = match self.decoder.next_delimited() {
            Ok(None) => Opening::More,
            Ok(Some(frame)) => match self.decoder.decode(frame) {
                Ok(Frame::Hello(hello)) => match hello.resume {
                    Some(resume) => Opening::Resume(resume.session),
                    None => Opening::New(hello.nonce),
                },
                _ => Opening::Other,
            },
            Err(_) => Opening::Other,
        };
        self.verdict
    }
}

impl core::fmt::Debug for Server {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Server")
            .field("sessions", &self.sessions.len())
            .field("connections", &self.conns.len())
            .finish_non_exhaustive()
    }
}

impl Server {
    /// A server with no sessions.
    pub fn new(
        config: ServerConfig,
        now: Instant,
        entropy: Box<dyn Entropy>,
    ) -> Result<Self, ConfigError> {
        config.channel.validate()?;
        config
            .liveness
            .validate()
            .map_err(|_| ConfigError::Zero("liveness heartbeat below idle timeout"))?;
        let limits = DecodeLimits {
            max_frame_size: config.channel.max_frame_size,
            ..DecodeLimits::default()
        };
        Ok(Server {
            channel_config: Arc::new(config.channel.clone()),
            liveness_config: Arc::new(config.liveness),
            config,
            entropy,
            sessions: BTreeMap::new(),
            conns: BTreeMap::new(),
            pending: BTreeSet::new(),
            awaiting_auth: BTreeMap::new(),
            scratch: Vec::new(),
            due: Vec::new(),
            events: VecDeque::new(),
            ready: VecDeque::new(),
            orphans: BTreeSet::new(),
            timers: Timers::default(),
            limits,
            refused_tokens: 0,
            now,
            stores: None,
            shard: Shard::default(),
        })
    }

    /// Makes this server shard `shard` of a driver's: the sessions it makes carry its index.
    #[cfg(feature = "driver")]
    pub(crate) fn set_shard(&mut self, shard: Shard) {
        self.shard = shard;
    }

    /// A server whose sessions outlive it in `stores`, shared with the other servers of a cluster:
    /// each session records there what a durable client records (its identity and attach epoch,
    /// messages sent until acknowledged, arrivals until consumed), and a resume for a session this
    /// server does not hold is served from there. Ownership follows the attach epoch: a server
    /// whose session another server claimed stops serving it at its next write and says so with
    /// [`SessionEvent::Fenced`].
    ///
    /// A store that fails otherwise is dropped for that session, which carries on in memory with
    /// [`SessionEvent::DurabilityLost`].
    pub fn with_sessions(
        config: ServerConfig,
        now: Instant,
        entropy: Box<dyn Entropy>,
        stores: Box<dyn SessionStore>,
    ) -> Result<Self, ConfigError> {
        let mut server = Server::new(config, now, entropy)?;
        server.stores = Some(stores);
        Ok(server)
    }

    /// A transport connection was accepted.
    pub fn on_connection(&mut self, now: Instant, conn: ConnId) {
        let now = self.observe(now);
        let nonce = self.entropy.next_u64();
        let pending = self.pending.len();
        let mut c = Box::new(Conn {
            link: Link::new(
                Role::Server,
                self.config.channel.transport,
                self.liveness_config.clone(),
                self.limits,
                nonce,
                now,
            ),
            session: None,
            created: now,
            closing: false,
            armed: None,
            timer: self.timers.new_slot(Key::Conn(conn)),
            // An id still waiting in the ready queue from a connection gone before is this one's.
            queued: self.orphans.remove(&conn),
            resumed: false,
        });
        // Past the bound, a connection gets no handshake at all: it is closed unread.
        c.closing = pending >= self.config.max_pending_handshakes;
        if let Some(old) = self.conns.insert(conn, c) {
            // The adapter reused the id of a connection it never reported closed.
            self.timers.free_slot(old.timer);
            self.awaiting_auth.remove(&conn);
            if let Some(c) = self.conns.get_mut(&conn) {
                c.queued = old.queued;
            }
        }
        self.pending.insert(conn);
        self.mark_ready(conn);
        self.retime(Key::Conn(conn));
    }

    /// Bytes arrived on `conn`.
    pub fn handle_input(&mut self, now: Instant, conn: ConnId, data: Bytes) {
        let now = self.observe(now);
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        if c.closing {
            return;
        }
        // Decoded frames wait here while the link is borrowed; the buffer is kept between calls so
        // the input path does not allocate.
        let mut incoming = core::mem::take(&mut self.scratch);
        let events_before = self.events.len();
        let malformed = c.link.malformed();
        // The session's own frames go straight to its channel, looked up once per read, and its
        // events straight into the server's queue. The first frame that is the server's business
        // (a handshake, a close) and every frame after it wait in `incoming`, in order.
        let id = c.session;
        let mut session = id.and_then(|id| Some((id, self.sessions.get_mut(&id)?)));
        let events = &mut self.events;
        let mut drained = (false, None);
        c.link.input(now, data, |_, i| {
            let fast = incoming.is_empty() && !drained.0;
            let (ended, acknowledged) = match (i, &mut session) {
                (Incoming::Data(d), Some((id, s))) if fast => {
                    deliver(*id, s, now, events, |c, sink| {
                        c.handle_data_into(now, d, sink)
                    })
                }
                (Incoming::Frame(f), Some((id, s))) if fast && !is_handshake_or_close(&f) => {
                    deliver(*id, s, now, events, |c, _| c.handle_frame(now, f))
                }
                (i, _) => return incoming.push(i),
            };
            drained = (ended, acknowledged.or(drained.1));
        });
        if let Some(id) = id
            && drained != (false, None)
        {
            self.after_drain(id, drained);
        }
        let Some(c) = self.conns.get_mut(&conn) else {
            self.scratch = incoming;
            return;
        };
        let malformed = c.link.malformed() - malformed;
        if malformed > 0
            && let Some(s) = c.session.and_then(|id| self.sessions.get_mut(&id))
        {
            s.counters.add(malformed, |c| &mut c.malformed_datagrams);
        }
        for i in incoming.drain(..) {
            match i {
                Incoming::Data(d) => self.on_frame(now, conn, Frame::Data(d)),
                Incoming::Frame(f) => self.on_frame(now, conn, f),
                Incoming::Broken(e) => {
                    self.drop_conn(now, conn, DisconnectCause::Decode(e));
                    break;
                }
            }
        }
        self.scratch = incoming;
        if let Some(id) = self.conns.get(&conn).and_then(|c| c.session) {
            self.record_arrivals(id, events_before);
        }
        self.touch_conn(conn);
    }

    /// Makes what arrived for `id` durable before any ack of it can leave (acks are written by
    /// `poll_transmit`); if another server owns the session, what arrived here is not delivered:
    /// the events queued since `events_before` are withdrawn and the client resends to the owner.
    fn record_arrivals(&mut self, id: SessionId, events_before: usize) {
        let Some(s) = self.sessions.get_mut(&id) else {
            return;
        };
        if s.store.is_none() {
            return;
        }
        let arrivals = s.channel.take_arrivals();
        if arrivals.is_empty() {
            return;
        }
        let fenced = self.record(id, true, |s| {
            for m in &arrivals {
                s.arrived(m)?;
                // A reply goes to its request, which does not outlive this server.
                if m.stream >= REPLY_STREAM {
                    s.consumed(m.seq)?;
                }
            }
            Ok(())
        });
        if let Err(epoch) = fenced {
            let mut i = 0;
            self.events.retain(|e| {
                i += 1;
                i <= events_before
                    || !matches!(e, ServerEvent::Session { session, .. } if *session == id)
            });
            self.evict(id, epoch);
        }
    }

    /// Records through a session's store (and flushes it if `flush`). A store failure drops the
    /// store, loudly; `Err(epoch)` means another server claimed the session at `epoch`.
    fn record(
        &mut self,
        id: SessionId,
        flush: bool,
        f: impl FnOnce(&mut dyn Store) -> Result<(), StoreError>,
    ) -> Result<(), u64> {
        // Sessions have stores only on a server with shared ones: no lookup per message otherwise.
        if self.stores.is_none() {
            return Ok(());
        }
        let Some(s) = self.sessions.get_mut(&id) else {
            return Ok(());
        };
        let Some(store) = s.store.as_deref_mut() else {
            return Ok(());
        };
        match f(store.as_mut()).and_then(|()| if flush { store.flush() } else { Ok(()) }) {
            Ok(()) => Ok(()),
            Err(StoreError::Fenced { epoch }) => Err(epoch),
            Err(error) => {
                s.store = None;
                self.events.push_back(ServerEvent::Session {
                    session: id,
                    event: SessionEvent::DurabilityLost { error },
                });
                Ok(())
            }
        }
    }

    /// Another server owns the session now: let go of it without ending it, and close its
    /// connection so the client, if still here, attaches where it is served.
    fn evict(&mut self, id: SessionId, epoch: u64) {
        let Some(s) = self.forget(id) else {
            return;
        };
        if let Some(conn) = s.conn()
            && let Some(c) = self.conns.get_mut(&conn)
        {
            c.session = None;
            c.closing = true;
            c.link.outbox.clear();
            self.mark_ready(conn);
        }
        self.events.push_back(ServerEvent::Session {
            session: id,
            event: SessionEvent::Fenced { epoch },
        });
    }

    /// The transport connection closed or reset.
    pub fn on_disconnected(&mut self, now: Instant, conn: ConnId) {
        let now = self.observe(now);
        if let Some(c) = self.remove_conn(conn) {
            if let Some(id) = c.session {
                self.detach(now, id, conn, DisconnectCause::TransportClosed);
            }
        }
    }

    fn on_frame(&mut self, now: Instant, conn: ConnId, frame: Frame) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        match (frame, c.session) {
            (Frame::Hello(h), None) if !self.awaiting_auth.contains_key(&conn) => {
                self.on_hello(now, conn, h)
            }
            (Frame::Hello(h), Some(id)) => {
                // A repeated hello (datagram retry): answer it again if it is the current attach.
                let (nonce, resumed) = (c.link.local_nonce, c.resumed);
                if c.link.peer_nonce() == Some(h.nonce)
                    && let Some(s) = self.sessions.get(&id)
                    && s.conn() == Some(conn)
                    && h.resume.map_or(!resumed, |r| resumed && r.epoch == s.epoch)
                {
                    let w = self.welcome(id, nonce, resumed);
                    if let Some(c) = self.conns.get_mut(&conn) {
                        c.link.queue(w);
                    }
                }
            }
            (Frame::Welcome(_) | Frame::Refuse(_), _) => {}
            (Frame::Close(close), Some(id))
                if self.sessions.get(&id).is_some_and(|s| s.held.is_some()) =>
            {
                // Our close and the client's crossed: both ends name the same one.
                let arbiter = c.link.arbiter();
                c.closing = true;
                if let Some(held) = self.sessions.get_mut(&id).and_then(|s| s.held.take()) {
                    let event = (*held).crossed(close.code, close.reason, arbiter);
                    self.events
                        .push_back(ServerEvent::Session { session: id, event });
                }
                self.mark_ready(conn);
            }
            (frame, Some(id)) => {
                if let Some(s) = self.sessions.get_mut(&id) {
                    let drained = deliver(id, s, now, &mut self.events, |c, _| {
                        c.handle_frame(now, frame)
                    });
                    self.after_drain(id, drained);
                }
            }
            // Anything but a hello on a connection with no session: the peer believes in an attach
            // this server does not hold (it restarted, or forgot a datagram binding). Tell it, or
            // it would wait on a connection that can never carry its session.
            (_, None) if !self.awaiting_auth.contains_key(&conn) && !c.closing => {
                self.refuse(conn, RefuseCode::NotAttached, 0);
            }
            (_, None) => {}
        }
    }

    fn on_hello(&mut self, now: Instant, conn: ConnId, hello: HelloFrame) {
        let Some(resume) = hello.resume else {
            if self.sessions.len() >= self.config.max_sessions {
                return self.refuse(conn, RefuseCode::ServerFull, 0);
            }
            if self.config.authenticate {
                let credentials = hello.credentials.clone();
                if self.conns.contains_key(&conn) {
                    self.awaiting_auth.insert(conn, Box::new(hello));
                }
                self.events
                    .push_back(ServerEvent::Authenticate { conn, credentials });
                return;
            }
            return self.create(now, conn, &hello);
        };
        // Messages the previous owner delivered but its application had not consumed, for a
        // session loaded from the shared store: handed out once this server owns it.
        let mut loaded = None;
        if !self.sessions.contains_key(&resume.session) && self.stores.is_some() {
            match self.load(now, resume.session) {
                Ok(Some(redelivered)) => loaded = Some(redelivered),
                Ok(None) => return self.refuse(conn, RefuseCode::UnknownSession, 0),
                // Not the session's end: the client says hello again after its backoff.
                Err(_) => return self.refuse(conn, RefuseCode::NotAttached, 0),
            }
        }
        // A session already ended (its close frame may still be on its way out) cannot be resumed.
        let Some(s) = self
            .sessions
            .get_mut(&resume.session)
            .filter(|s| !s.channel.is_closed())
        else {
            return self.refuse(conn, RefuseCode::UnknownSession, 0);
        };
        let id = resume.session;
        if !s.token.matches(&resume.token) {
            self.refused_tokens += 1;
            self.unload(id, loaded.is_some());
            return self.refuse(conn, RefuseCode::BadToken, 0);
        }
        let same_attach = resume.epoch == s.epoch && hello.nonce == s.attach_nonce;
        if resume.epoch <= s.epoch && !same_attach {
            let current = s.epoch;
            self.unload(id, loaded.is_some());
            return self.refuse(conn, RefuseCode::StaleEpoch, current);
        }
        let claim = Identity {
            session: id,
            token: s.token,
            epoch: resume.epoch,
        };
        // Claimed in the shared store before the welcome: a newer claim elsewhere wins.
        if let Err(current) = self.record(id, true, |s| s.identity(claim)) {
            self.refuse(conn, RefuseCode::StaleEpoch, current);
            if loaded.is_some() {
                return self.unload(id, true);
            }
            return self.evict(id, current);
        }
        self.events
            .extend(loaded.into_iter().flatten().map(|m| ServerEvent::Session {
                session: id,
                event: SessionEvent::Redelivered(m),
            }));
        let Some(s) = self.sessions.get_mut(&id) else {
            return self.refuse(conn, RefuseCode::UnknownSession, 0);
        };
        // The newest attach wins: a half-open older connection is superseded.
        s.epoch = resume.epoch;
        s.attach_nonce = hello.nonce;
        let old = s.attach(conn);
        s.channel.reset_connection();
        s.channel.sender_mut().set_limits(
            self.config.channel.max_queued_messages,
            self.config.channel.max_queued_bytes,
        );
        s.channel
            .sender_mut()
            .set_in_flight_limit(self.config.channel.in_flight_limit(hello.recv_window));
        let resumed = s.channel.resume(now, resume.received);
        if let Some(old) = old
            && let Some(oc) = self.conns.get_mut(&old)
        {
            oc.session = None;
            oc.closing = true;
            self.mark_ready(old);
            if let Some(s) = self.sessions.get_mut(&id) {
                s.counters.disconnected();
            }
            self.events.push_back(ServerEvent::Session {
                session: id,
                event: SessionEvent::Disconnected {
                    cause: DisconnectCause::Superseded,
                },
            });
        }
        match resumed {
            Ok(retransmitted) => self.bind(conn, id, hello.nonce, true, retransmitted),
            Err(e) => {
                // It claims to hold messages never sent: a broken or forged client. No welcome.
                self.refuse(conn, RefuseCode::Violation, 0);
                if let Some(s) = self.sessions.get_mut(&id) {
                    s.detach(now);
                }
                self.lose(
                    id,
                    LostReason::Violation(crate::ProtocolError::AckOfUnsent(e)),
                );
            }
        }
    }

    /// The application's verdict on a connection's credentials ([`ServerEvent::Authenticate`]).
    pub fn authenticate(&mut self, now: Instant, conn: ConnId, accept: bool) {
        let now = self.observe(now);
        let Some(hello) = self.awaiting_auth.remove(&conn) else {
            return;
        };
        if accept && self.sessions.len() >= self.config.max_sessions {
            self.refuse(conn, RefuseCode::ServerFull, 0);
        } else if accept {
            self.create(now, conn, &hello);
        } else {
            self.refuse(conn, RefuseCode::AuthenticationFailed, 0);
        }
        self.touch_conn(conn);
    }

    /// Takes a session this server does not hold from the shared store, with the messages to hand
    /// out again: `Ok(None)` if no server kept it. It starts detached and unclaimed; the resume that
    /// asked for it claims and attaches it.
    fn load(&mut self, now: Instant, id: SessionId) -> Result<Option<Vec<Message>>, StoreError> {
        let Some(stores) = self.stores.as_mut() else {
            return Ok(None);
        };
        let Some((store, recovered)) = stores.load(id)? else {
            return Ok(None);
        };
        let Some(identity) = recovered.identity.filter(|i| i.session == id) else {
            return Err(StoreError::Corrupt(
                "a stored session without its identity".into(),
            ));
        };
        let mut channel = Channel::with_shared_config(self.channel_config.clone(), now)
            .map_err(|_| StoreError::Corrupt("channel configuration".into()))?;
        let redelivered = channel.restore(&recovered)?;
        channel.record_arrivals();
        channel.sender_mut().set_limits(
            self.config.disconnected_max_queued_messages,
            self.config.disconnected_max_queued_bytes,
        );
        self.sessions.insert(
            id,
            Box::new(Session {
                token: identity.token,
                epoch: identity.epoch,
                attach_nonce: 0,
                channel,
                whereabouts: now.as_nanos(),
                attached: false,
                requests: Requests::default(),
                counters: Counters::default(),
                held: None,
                armed: None,
                timer: self.timers.new_slot(Key::Session(id)),
                store: Some(Box::new(store)),
            }),
        );
        Ok(Some(redelivered))
    }

    /// Forgets a session loaded for a resume that was refused: it is still whoever owns it's.
    fn unload(&mut self, id: SessionId, loaded: bool) {
        if loaded {
            self.forget(id);
        }
    }

    fn create(&mut self, now: Instant, conn: ConnId, hello: &HelloFrame) {
        let shard = self.shard;
        let mut draw = || SessionId((self.entropy.next_u64() & !shard.mask) | shard.index);
        let mut id = draw();
        while self.sessions.contains_key(&id) {
            id = draw();
        }
        let mut token = [0u8; 16];
        self.entropy.fill_bytes(&mut token);
        let Ok(mut channel) = Channel::with_shared_config(self.channel_config.clone(), now) else {
            return;
        };
        let token = Token::from_bytes(token);
        let mut store = None;
        if let Some(stores) = self.stores.as_mut() {
            let identity = Identity {
                session: id,
                token,
                epoch: 1,
            };
            match stores
                .create(identity)
                .and_then(|mut s| s.flush().map(|()| s))
            {
                Ok(s) => store = Some(Box::new(s)),
                // The client retries; a session nobody else could resume is not offered.
                Err(_) => return self.refuse(conn, RefuseCode::NotAttached, 0),
            }
            channel.record_arrivals();
        }
        channel
            .sender_mut()
            .set_in_flight_limit(self.config.channel.in_flight_limit(hello.recv_window));
        self.sessions.insert(
            id,
            Box::new(Session {
                token,
                // The client's first hello claimed epoch 1.
                epoch: 1,
                attach_nonce: hello.nonce,
                channel,
                whereabouts: conn,
                attached: true,
                requests: Requests::default(),
                counters: Counters::default(),
                held: None,
                armed: None,
                timer: self.timers.new_slot(Key::Session(id)),
                store,
            }),
        );
        self.bind(conn, id, hello.nonce, false, 0);
    }

    fn bind(
        &mut self,
        conn: ConnId,
        id: SessionId,
        peer_nonce: u64,
        resumed: bool,
        retransmitted: u64,
    ) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        c.session = Some(id);
        self.pending.remove(&conn);
        c.resumed = resumed;
        c.link.establish(peer_nonce);
        let nonce = c.link.local_nonce;
        let welcome = self.welcome(id, nonce, resumed);
        if let Some(c) = self.conns.get_mut(&conn) {
            c.link.queue(welcome);
        }
        if let Some(s) = self.sessions.get_mut(&id) {
            s.counters.connected();
            s.counters.add(u64::from(resumed), |c| &mut c.resumes);
            s.counters.add(retransmitted, |c| &mut c.resent_on_resume);
            let epoch = s.epoch;
            self.events.push_back(ServerEvent::Session {
                session: id,
                event: SessionEvent::Connected {
                    session: id,
                    resumed,
                    epoch,
                    retransmitted,
                },
            });
        }
        self.drain_session(id);
        self.mark_ready(conn);
        self.retime(Key::Session(id));
    }

    fn welcome(&self, id: SessionId, nonce: u64, resumed: bool) -> Frame {
        let s = &self.sessions[&id];
        Frame::Welcome(WelcomeFrame {
            nonce,
            session: id,
            token: s.token,
            epoch: s.epoch,
            resumed,
            received: s.channel.receiver().watermark(),
            recv_window: self.config.channel.recv_window,
            retention_millis: u64::try_from(self.config.retention.as_millis()).unwrap_or(u64::MAX),
        })
    }

    fn refuse(&mut self, conn: ConnId, code: RefuseCode, epoch: u64) {
        if let Some(c) = self.conns.get_mut(&conn) {
            c.link.queue(Frame::Refuse(RefuseFrame {
                code: code.to_wire(),
                epoch,
                reason: Bytes::new(),
            }));
            c.closing = true;
            self.mark_ready(conn);
        }
    }

    /// A connection is unusable: close it, and detach its session.
    fn drop_conn(&mut self, now: Instant, conn: ConnId, cause: DisconnectCause) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        c.closing = true;
        c.link.outbox.clear();
        let session = c.session.take();
        self.mark_ready(conn);
        if let Some(id) = session {
            self.detach(now, id, conn, cause);
        }
    }

    /// The session lost its connection: keep it for the retention time, with the larger bound.
    fn detach(&mut self, now: Instant, id: SessionId, conn: ConnId, cause: DisconnectCause) {
        let Some(s) = self.sessions.get_mut(&id) else {
            return;
        };
        if s.conn() != Some(conn) {
            return;
        }
        if let Some(held) = s.held.take() {
            // Closing, and the transport ended: our close stands, and the session is over.
            self.events.push_back(ServerEvent::Session {
                session: id,
                event: (*held).settle(),
            });
            self.remove_session(id);
            return;
        }
        if s.channel.is_closed() {
            // Already ended (its terminal event is out): nothing to retain.
            self.remove_session(id);
            return;
        }
        s.detach(now);
        s.counters.disconnected();
        if matches!(cause, DisconnectCause::IdleTimeout { .. }) {
            s.counters.add(1, |c| &mut c.idle_timeouts);
        }
        s.channel.sender_mut().set_limits(
            self.config.disconnected_max_queued_messages,
            self.config.disconnected_max_queued_bytes,
        );
        // Retained for a resume that may never come: it keeps what it holds, not the room its
        // queues grew while it was busy.
        s.channel.shrink_queues();
        self.events.push_back(ServerEvent::Session {
            session: id,
            event: SessionEvent::Disconnected { cause },
        });
        self.retime(Key::Session(id));
    }

    /// Lets time pass.
    pub fn handle_timeout(&mut self, now: Instant) {
        let now = self.observe(now);
        // Take what is due once: a timer still due after its handler (a heartbeat waits for the
        // transmit drain to take its ping) is the next call's business, not a loop's.
        let mut due = core::mem::take(&mut self.due);
        while let Some(key) = self.timers.pop_due(now) {
            if let Some(armed) = self.armed_mut(key) {
                *armed = None;
            }
            due.push(key);
        }
        for &key in &due {
            match key {
                Key::Conn(conn) => self.conn_timeout(now, conn),
                Key::Session(id) => self.session_timeout(now, id),
            }
        }
        due.clear();
        // The room a burst took (every connection's heartbeat due at once) is let go, or it would
        // stay for good.
        due.shrink_to(DUE_KEPT);
        self.due = due;
    }

    fn conn_timeout(&mut self, now: Instant, conn: ConnId) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        if c.session.is_none() && !c.closing && now - c.created >= self.config.handshake_timeout {
            c.closing = true;
            self.mark_ready(conn);
            return;
        }
        let stalls = c.link.liveness.stalls();
        let verdict = c.link.on_timeout(now);
        let stalled = c.link.liveness.stalls() - stalls;
        if let Some(id) = c.session
            && let Some(s) = self.sessions.get_mut(&id)
        {
            s.counters.add(stalled, |c| &mut c.stalls);
        }
        if let Verdict::Dead { silent_for } = verdict {
            self.drop_conn(now, conn, DisconnectCause::IdleTimeout { silent_for });
        }
        self.touch_conn(conn);
    }

    fn session_timeout(&mut self, now: Instant, id: SessionId) {
        let Some(s) = self.sessions.get_mut(&id) else {
            return;
        };
        if s.held.as_ref().is_some_and(|h| now >= h.deadline) {
            if let Some(held) = s.held.take() {
                self.events.push_back(ServerEvent::Session {
                    session: id,
                    event: (*held).settle(),
                });
            }
            if let Some(conn) = s.conn() {
                if let Some(c) = self.conns.get_mut(&conn) {
                    c.closing = true;
                }
                self.mark_ready(conn);
            }
            return;
        }
        if s.disconnected_at()
            .is_some_and(|t| now - t >= self.config.retention)
        {
            // With a shared store the session may live on elsewhere: only its owner ends it.
            if let Err(epoch) = self.record(id, true, |s| s.clear()) {
                return self.evict(id, epoch);
            }
            if let Some(s) = self.sessions.get_mut(&id) {
                s.store = None;
            }
            return self.lose(id, LostReason::RetentionExpired);
        }
        for seq in s.requests.expire(now) {
            s.counters.add(1, |c| &mut c.request_timeouts);
            self.events.push_back(ServerEvent::Session {
                session: id,
                event: SessionEvent::RequestTimedOut { seq },
            });
        }
        if let Some(s) = self.sessions.get_mut(&id) {
            s.channel.handle_timeout(now);
        }
        self.drain_session(id);
        self.touch_session(id);
    }

    /// The next bytes to write to some connection, appended to `buf`.
    pub fn poll_transmit(&mut self, now: Instant, buf: &mut BytesMut) -> Option<Transmit> {
        let now = self.observe(now);
        while let Some(conn) = self.ready.pop_front() {
            let Some(c) = self.conns.get_mut(&conn) else {
                self.orphans.remove(&conn);
                continue;
            };
            c.queued = false;
            let mut session = c.session.and_then(|id| self.sessions.get_mut(&id));
            let budget = self.config.channel.max_batch_bytes;
            // A closing connection without a session writes only its handshake reply, if any.
            let silent = c.closing && c.session.is_none() && c.link.outbox.is_empty();
            let len = if silent {
                0
            } else {
                let channel = session.as_mut().map(|s| &mut s.channel);
                c.link.transmit(now, channel, buf, budget)
            };
            let more = (!silent && c.link.wants_transmit())
                || session
                    .as_ref()
                    .is_some_and(|s| s.channel.wants_transmit(now));
            if c.closing && !more {
                let session = c.session;
                self.remove_conn(conn);
                if let Some(id) = session {
                    // The session was closed on this connection: it is over.
                    self.remove_session(id);
                }
                return Some(Transmit {
                    conn,
                    len,
                    close: true,
                });
            }
            if more {
                queue(&mut self.ready, conn, c);
            }
            let timers = &mut self.timers;
            let deadline = conn_deadline(c, self.config.handshake_timeout);
            rearm(timers, c.timer, &mut c.armed, deadline);
            // Writing may arm the session's timers (a datagram retransmission timeout).
            if let Some(s) = session {
                let deadline = session_deadline(s, self.config.retention);
                rearm(timers, s.timer, &mut s.armed, deadline);
            }
            if len > 0 {
                return Some(Transmit {
                    conn,
                    len,
                    close: false,
                });
            }
        }
        None
    }

    /// Moves every queued event to the back of `into`, oldest first: [`Server::poll_event`] for all
    /// of them, in one bulk move where no session store must hear of them one by one.
    pub fn take_events(&mut self, into: &mut VecDeque<ServerEvent>) {
        if self.stores.is_none() {
            return crate::queue::move_all(&mut self.events, into);
        }
        while let Some(e) = self.poll_event() {
            into.push_back(e);
        }
    }

    /// Moves up to `max` of the oldest events to the back of `into`: [`Server::poll_event`] for
    /// each, in one bulk move. Returns how many it moved.
    pub fn poll_events(&mut self, into: &mut Vec<ServerEvent>, max: usize) -> usize {
        let start = into.len();
        let n = crate::queue::drain_front(&mut self.events, into, max);
        self.record_consumed(&into[start..]);
        n
    }

    /// The queue itself, for the driver: it acts on new events where they stand (answers awaited
    /// requests, authenticates), then moves the rest on to the application, which records them
    /// with [`Server::record_consumed`] once it takes them.
    #[cfg(feature = "driver")]
    pub(crate) fn events_mut(&mut self) -> &mut VecDeque<ServerEvent> {
        &mut self.events
    }

    /// With shared stores, records the messages among `events`, handed to the application, as
    /// consumed (see [`Server::poll_event`]).
    pub(crate) fn record_consumed(&mut self, events: &[ServerEvent]) {
        if self.stores.is_some() {
            for event in events {
                self.consumed(event);
            }
        }
    }

    /// The next event for the application.
    // Inlined, the event is read from the queue where the caller wants it (see
    // `Channel::poll_event`).
    #[inline]
    pub fn poll_event(&mut self) -> Option<ServerEvent> {
        let event = self.events.pop_front()?;
        if self.stores.is_some() {
            self.consumed(&event);
        }
        Some(event)
    }

    /// With shared stores, a message handed to the application is recorded as consumed: another
    /// server taking the session over does not hand it out again. Not flushed on its own: losing
    /// it in a crash costs one flagged redelivery, and the next durability point flushes it
    /// anyway. A fenced store says so at that next point.
    fn consumed(&mut self, event: &ServerEvent) {
        if let ServerEvent::Session {
            session,
            event: SessionEvent::Received(m) | SessionEvent::Redelivered(m),
        } = event
        {
            let (id, seq) = (*session, m.seq);
            let _ = self.record(id, false, |s| s.consumed(seq));
        }
    }

    /// Whether some connection has bytes for [`Server::poll_transmit`] to make: without it, a
    /// call finds nothing.
    pub fn has_transmit(&self) -> bool {
        !self.ready.is_empty()
    }

    /// When [`Server::handle_timeout`] next has work to do.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.timers.first()
    }

    /// Sends `payload` to a session on `stream` (below [`REPLY_STREAM`]) with delivery `mode`. While
    /// the session is disconnected reliable messages queue up to the disconnected bound.
    pub fn send(
        &mut self,
        session: SessionId,
        stream: u64,
        mode: Mode,
        payload: Bytes,
    ) -> Result<Sent, SendError> {
        if stream >= REPLY_STREAM {
            return Err(SendError::InvalidStream(payload));
        }
        self.send_raw(session, stream, mode, payload, true)
    }

    /// Queues a message that the shared session store sequenced and holds already (the servers of
    /// a cluster publish through the store, so that any of them can send to any session): it goes
    /// to the client under `message.seq`, which must be the session's next sequence number, and is
    /// not recorded again.
    pub fn send_sequenced(
        &mut self,
        session: SessionId,
        message: Stored,
    ) -> Result<Sequenced, SendError> {
        let Some(s) = self.sessions.get(&session) else {
            return Err(SendError::Closed(message.payload));
        };
        let next = s.channel.sender().end();
        if message.seq < next {
            return Ok(Sequenced::AlreadyHeld);
        }
        if message.seq > next {
            return Ok(Sequenced::Gap { next });
        }
        let mode = if message.unordered {
            Mode::Unordered
        } else {
            Mode::Ordered
        };
        self.send_raw(session, message.stream, mode, message.payload, false)
            .map(|_| Sequenced::Queued)
    }

    /// The sessions held, attached or not.
    pub fn sessions(&self) -> impl Iterator<Item = SessionId> + '_ {
        self.sessions.keys().copied()
    }

    fn send_raw(
        &mut self,
        id: SessionId,
        stream: u64,
        mode: Mode,
        payload: Bytes,
        journal: bool,
    ) -> Result<Sent, SendError> {
        let Some(s) = self.sessions.get_mut(&id) else {
            return Err(SendError::Closed(payload));
        };
        let kept = (journal && s.store.is_some() && mode.is_reliable()).then(|| payload.clone());
        let result = queue_on(s, stream, mode, payload);
        if let (Ok(sent), Some(payload)) = (&result, kept)
            && let Some(seq) = sent.seq()
        {
            let m = Stored {
                seq,
                stream,
                unordered: mode == Mode::Unordered,
                payload,
            };
            // Kept for the other servers before the application hears it was accepted.
            if let Err(epoch) = self.record(id, true, |s| s.sent(&m)) {
                self.evict(id, epoch);
                return Err(SendError::Closed(m.payload));
            }
        }
        self.after_send(id, stream, matches!(result, Err(SendError::QueueFull(_))));
        result
    }

    /// After a send to session `id`: a full queue closes it if its stream's policy says so, and
    /// its connection and timers learn what was queued.
    fn after_send(&mut self, id: SessionId, stream: u64, queue_full: bool) {
        if queue_full && self.overflow_policy(stream) == Overflow::CloseSession {
            self.overflow(id);
            return;
        }
        self.touch_session(id);
    }

    fn overflow_policy(&self, stream: u64) -> Overflow {
        self.config
            .stream_overflow
            .get(&stream)
            .copied()
            .unwrap_or(self.config.overflow)
    }

    /// Sends `payloads` to a session on `stream`, in order, front first, until they are all sent
    /// or one is refused: [`Server::send`] for a run of messages, with the session looked up and
    /// its timers brought up to date once per run instead of once per message. Each payload sent
    /// is taken from `payloads`; a refused one comes back in the error, the ones after it stay.
    ///
    /// ```
    /// # use std::collections::VecDeque;
    /// # use bytes::Bytes;
    /// # use rand_core::SeedableRng;
    /// # use steadfast_core::server::{Server, ServerConfig};
    /// # use steadfast_core::{Config, Mode, SendError, Transport, identity::SessionId, time::Instant};
    /// # let entropy = Box::new(rand_chacha::ChaCha8Rng::seed_from_u64(1));
    /// # let config = ServerConfig::new(Config::new(Transport::Stream));
    /// # let mut server = Server::new(config, Instant::ZERO, entropy).unwrap();
    /// let mut batch: VecDeque<Bytes> = (0..3u8).map(|i| Bytes::from(vec![i])).collect();
    /// // No such session: the first payload comes back, the rest stay queued.
    /// let refused = server.send_many(SessionId(7), 0, Mode::Ordered, &mut batch);
    /// assert!(matches!(refused, Err(SendError::Closed(p)) if p[..] == [0]));
    /// assert_eq!(batch.len(), 2);
    /// ```
    pub fn send_many(
        &mut self,
        session: SessionId,
        stream: u64,
        mode: Mode,
        payloads: &mut VecDeque<Bytes>,
    ) -> Result<(), SendError> {
        let Some(s) = self
            .sessions
            .get_mut(&session)
            .filter(|s| stream < REPLY_STREAM && s.store.is_none())
        else {
            // Refused whole, or checked and recorded message by message: `send` says which.
            while let Some(p) = payloads.pop_front() {
                self.send(session, stream, mode, p)?;
            }
            return Ok(());
        };
        let mut result = Ok(());
        while let Some(p) = payloads.pop_front() {
            if let Err(e) = queue_on(s, stream, mode, p) {
                result = Err(e);
                break;
            }
        }
        let queue_full = matches!(result, Err(SendError::QueueFull(_)));
        self.after_send(session, stream, queue_full);
        result
    }

    /// Sends the same payload to many sessions (the field report's fan-out); returns the sends that
    /// were refused.
    pub fn broadcast(
        &mut self,
        sessions: impl IntoIterator<Item = SessionId>,
        stream: u64,
        mode: Mode,
        payload: &Bytes,
    ) -> Vec<(SessionId, SendError)> {
        sessions
            .into_iter()
            .filter_map(|id| {
                self.send(id, stream, mode, payload.clone())
                    .err()
                    .map(|e| (id, e))
            })
            .collect()
    }

    /// Sends a reliable ordered request; a reply or a timeout event follows.
    pub fn request(
        &mut self,
        session: SessionId,
        stream: u64,
        payload: Bytes,
        deadline: Instant,
    ) -> Result<Seq, SendError> {
        let full = self
            .sessions
            .get(&session)
            .is_some_and(|s| s.requests.len() >= self.config.max_pending_requests);
        if full {
            return Err(SendError::QueueFull(payload));
        }
        let seq = self
            .send(session, stream, Mode::Ordered, payload)?
            .seq()
            .unwrap_or_default();
        if let Some(s) = self.sessions.get_mut(&session) {
            s.requests.insert(seq, deadline);
        }
        self.retime(Key::Session(session));
        Ok(seq)
    }

    /// Replies to the client's message `to` on `session`.
    pub fn reply(&mut self, session: SessionId, to: Seq, payload: Bytes) -> Result<Seq, SendError> {
        self.send_raw(
            session,
            REPLY_STREAM.saturating_add(to),
            Mode::Ordered,
            payload,
            true,
        )
        .map(|s| s.seq().unwrap_or_default())
    }

    /// Closes a session: the client is told, both sides get [`SessionEvent::Closed`].
    pub fn close_session(&mut self, session: SessionId, code: u64, reason: Bytes) {
        let Some(s) = self.sessions.get_mut(&session) else {
            return;
        };
        s.channel.close(code, reason);
        let conn = s.conn();
        // With a connection the close frame goes out and the close is held (see drain_session);
        // without one the session ends here.
        self.drain_session(session);
        match conn {
            Some(conn) => {
                self.mark_ready(conn);
                self.retime(Key::Session(session));
            }
            None => {
                self.remove_session(session);
            }
        }
    }

    /// How many sessions are held.
    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    /// How many connections are open.
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Whether `session` is held and currently attached to a connection.
    pub fn is_connected(&self, session: SessionId) -> bool {
        self.connection_of(session).is_some()
    }

    /// The connection that carries `session` now, if it is held and attached.
    pub fn connection_of(&self, session: SessionId) -> Option<ConnId> {
        self.sessions.get(&session).and_then(|s| s.conn())
    }

    /// A session's counters.
    pub fn counters(&self, session: SessionId) -> Option<SessionCounters> {
        self.sessions.get(&session).map(|s| s.counters.get())
    }

    /// A session's channel, for inspection.
    pub fn channel(&self, session: SessionId) -> Option<&Channel> {
        self.sessions.get(&session).map(|s| &s.channel)
    }

    /// A session's current attach epoch.
    pub fn epoch(&self, session: SessionId) -> Option<u64> {
        self.sessions.get(&session).map(|s| s.epoch)
    }

    /// Resume attempts refused for a wrong token.
    pub fn refused_tokens(&self) -> u64 {
        self.refused_tokens
    }

    /// The arbiter agreed on a session's current connection.
    pub fn arbiter(&self, session: SessionId) -> Option<Arbiter> {
        let conn = self.sessions.get(&session)?.conn()?;
        self.conns.get(&conn)?.link.arbiter()
    }

    /// A queue overflowed under the close policy: the client is told with a close frame carrying
    /// [`crate::CLOSE_OVERFLOW`], and both sides report [`LostReason::Overflow`].
    fn overflow(&mut self, id: SessionId) {
        let Some(s) = self.sessions.get_mut(&id) else {
            return;
        };
        s.channel
            .close(crate::CLOSE_OVERFLOW, Bytes::from_static(b"queue overflow"));
        while let Some(e) = s.channel.poll_event() {
            let event = match e {
                Event::Closed { unacknowledged, .. } => SessionEvent::SessionLost {
                    reason: LostReason::Overflow,
                    unacknowledged,
                },
                e => session_event(e, &mut s.requests),
            };
            self.events
                .push_back(ServerEvent::Session { session: id, event });
        }
        match s.conn() {
            Some(conn) => {
                if let Some(c) = self.conns.get_mut(&conn) {
                    c.closing = true;
                }
                self.mark_ready(conn);
            }
            None => {
                self.remove_session(id);
            }
        }
    }

    fn lose(&mut self, id: SessionId, reason: LostReason) {
        self.drain_session(id);
        let Some(mut s) = self.remove_session(id) else {
            return;
        };
        let unacknowledged = s.channel.abandon();
        self.events.push_back(ServerEvent::Session {
            session: id,
            event: SessionEvent::SessionLost {
                reason,
                unacknowledged,
            },
        });
        if let Some(conn) = s.conn()
            && let Some(c) = self.conns.get_mut(&conn)
        {
            c.session = None;
            c.closing = true;
            self.mark_ready(conn);
        }
    }

    fn drain_session(&mut self, id: SessionId) {
        let Some(s) = self.sessions.get_mut(&id) else {
            return;
        };
        let drained = drain_events(id, s, self.now, &mut self.events);
        self.after_drain(id, drained);
    }

    /// What follows a session's events: its acknowledgement recorded, its end carried out.
    fn after_drain(&mut self, id: SessionId, (ended, acknowledged): (bool, Option<Seq>)) {
        if let Some(below) = acknowledged {
            // Not flushed: a server that takes the session over after a crash that lost this
            // learns the same from the client's hello.
            let _ = self.record(id, false, |s| s.acknowledged(below));
        }
        if !ended {
            return;
        }
        let Some(s) = self.sessions.get_mut(&id) else {
            return;
        };
        match s.conn().and_then(|c| self.conns.get_mut(&c)) {
            // Let the close frame go out; the session goes with its connection.
            Some(c) => c.closing = true,
            None => {
                self.remove_session(id);
            }
        }
    }

    fn touch_conn(&mut self, conn: ConnId) {
        let Some(c) = self.conns.get_mut(&conn) else {
            self.mark_ready(conn);
            return;
        };
        queue(&mut self.ready, conn, c);
        let deadline = conn_deadline(c, self.config.handshake_timeout);
        rearm(&mut self.timers, c.timer, &mut c.armed, deadline);
        if let Some(id) = c.session
            && let Some(s) = self.sessions.get_mut(&id)
        {
            let deadline = session_deadline(s, self.config.retention);
            rearm(&mut self.timers, s.timer, &mut s.armed, deadline);
        }
    }

    fn touch_session(&mut self, id: SessionId) {
        let Some(s) = self.sessions.get_mut(&id) else {
            return;
        };
        if let Some(conn) = s.conn() {
            let Some(c) = self.conns.get_mut(&conn) else {
                self.mark_ready(conn);
                return self.retime(Key::Session(id));
            };
            queue(&mut self.ready, conn, c);
            let deadline = conn_deadline(c, self.config.handshake_timeout);
            rearm(&mut self.timers, c.timer, &mut c.armed, deadline);
        }
        let deadline = session_deadline(s, self.config.retention);
        rearm(&mut self.timers, s.timer, &mut s.armed, deadline);
    }

    /// Queues `conn` for [`Server::poll_transmit`], unless it waits there already.
    fn mark_ready(&mut self, conn: ConnId) {
        match self.conns.get_mut(&conn) {
            Some(c) => queue(&mut self.ready, conn, c),
            None => {
                if self.orphans.insert(conn) {
                    self.ready.push_back(conn);
                }
            }
        }
    }

    /// Where `key`'s armed deadline is kept: on the entity itself, so keeping the timer set up to
    /// date costs no lookup beyond the entity's own.
    fn armed_mut(&mut self, key: Key) -> Option<&mut Option<Instant>> {
        match key {
            Key::Conn(conn) => self.conns.get_mut(&conn).map(|c| &mut c.armed),
            Key::Session(id) => self.sessions.get_mut(&id).map(|s| &mut s.armed),
        }
    }

    /// Brings `key`'s entry in the timer set up to date (one lookup of its entity).
    fn retime(&mut self, key: Key) {
        match key {
            Key::Conn(conn) => {
                if let Some(c) = self.conns.get_mut(&conn) {
                    let deadline = conn_deadline(c, self.config.handshake_timeout);
                    rearm(&mut self.timers, c.timer, &mut c.armed, deadline);
                }
            }
            Key::Session(id) => {
                if let Some(s) = self.sessions.get_mut(&id) {
                    let deadline = session_deadline(s, self.config.retention);
                    rearm(&mut self.timers, s.timer, &mut s.armed, deadline);
                }
            }
        }
    }

    /// Removes a session that has ended, and what its store kept: nothing will resume it.
    fn remove_session(&mut self, id: SessionId) -> Option<Box<Session>> {
        let mut s = self.forget(id)?;
        if let Some(mut store) = s.store.take() {
            // A failure leaves the record to the store's own expiry; the session is over anyway.
            let _ = store.clear().and_then(|()| store.flush());
        }
        Some(s)
    }

    /// Removes a session and its timer, leaving its store's record as it is.
    fn forget(&mut self, id: SessionId) -> Option<Box<Session>> {
        let s = self.sessions.remove(&id)?;
        self.timers.free_slot(s.timer);
        Some(s)
    }

    /// Removes a connection, its timer, its place among pending handshakes and any hello of its
    /// awaiting authentication.
    fn remove_conn(&mut self, conn: ConnId) -> Option<Box<Conn>> {
        let c = self.conns.remove(&conn)?;
        self.pending.remove(&conn);
        self.awaiting_auth.remove(&conn);
        self.timers.free_slot(c.timer);
        if c.queued {
            self.orphans.insert(conn);
        }
        Some(c)
    }

    fn observe(&mut self, now: Instant) -> Instant {
        self.now = self.now.max(now);
        self.now
    }
}

/// When a connection's timer is next due: its handshake deadline until it has a session, and its
/// liveness timers.
fn conn_deadline(c: &Conn, handshake_timeout: Duration) -> Option<Instant> {
    let handshake = c.session.is_none().then(|| c.created + handshake_timeout);
    earliest(handshake, c.link.deadline())
}

/// When a session's timer is next due: retention while disconnected, its requests, its channel's
/// timers while connected, a held close.
fn session_deadline(s: &Session, retention: Duration) -> Option<Instant> {
    let retention = s.disconnected_at().map(|t| t + retention);
    // Without a connection the channel cannot act on its timers (an ack to send, a resend): they
    // would only stay in the past. Resume resends what is needed.
    let channel = s.conn().and_then(|_| s.channel.poll_timeout());
    let held = s.held.as_ref().map(|h| h.deadline);
    earliest(
        earliest(retention, s.requests.deadline()),
        earliest(channel, held),
    )
}

/// A frame that is the server's business rather than the session channel's: `on_frame` decides
/// what becomes of it.
fn is_handshake_or_close(frame: &Frame) -> bool {
    matches!(
        frame,
        Frame::Hello(_) | Frame::Welcome(_) | Frame::Refuse(_) | Frame::Close(_)
    )
}

/// Hands one frame to a session's channel (`hand` gives it to the channel, with a sink for a data
/// frame's events); the events it makes go into the server's queue, the data path's without a stop
/// in the channel's own queue. Returns what [`drain_events`] returns.
#[inline(always)]
fn deliver(
    id: SessionId,
    s: &mut Session,
    now: Instant,
    events: &mut VecDeque<ServerEvent>,
    hand: impl FnOnce(&mut Channel, &mut SessionSink<'_, ToServer<'_>>),
) -> (bool, Option<Seq>) {
    let Session {
        channel, requests, ..
    } = s;
    let mut sink = SessionSink::new(ToServer { id, events }, requests);
    hand(channel, &mut sink);
    let acknowledged = sink.acknowledged;
    let (ended, later) = drain_events(id, s, now, events);
    (ended, later.or(acknowledged))
}

/// A session's events, as the server's: wrapped with the session's id.
struct ToServer<'a> {
    id: SessionId,
    events: &'a mut VecDeque<ServerEvent>,
}

impl SessionQueue for ToServer<'_> {
    #[inline(always)]
    fn push(&mut self, event: SessionEvent) {
        self.events.push_back(ServerEvent::Session {
            session: self.id,
            event,
        });
    }
}

/// Moves a session's channel events to the server's queue as session events; returns whether the
/// session ended and the acknowledgement point they moved to, if it moved.
// Always: asked after every frame, where it mostly finds nothing.
#[inline(always)]
fn drain_events(
    id: SessionId,
    s: &mut Session,
    now: Instant,
    events: &mut VecDeque<ServerEvent>,
) -> (bool, Option<Seq>) {
    // Asked after every frame, and the data path's events no longer wait in the channel.
    if !s.channel.has_events() {
        return (false, None);
    }
    let mut ended = false;
    let mut acknowledged = None;
    while let Some(e) = s.channel.poll_event() {
        if let Event::Acknowledged { below } = e {
            acknowledged = Some(below);
        }
        let e = match (s.conn(), matches!(e, Event::Closed { .. })) {
            // A local close on a live connection waits to see whether the client closed too.
            (Some(_), true) => match HeldClose::hold(e, now) {
                Ok(held) => {
                    s.held = Some(Box::new(held));
                    continue;
                }
                Err(e) => e,
            },
            _ => e,
        };
        ended |= matches!(e, Event::Closed { .. });
        let event = session_event(e, &mut s.requests);
        events.push_back(ServerEvent::Session { session: id, event });
    }
    (ended, acknowledged)
}

/// Queues `payload` on session `s`'s channel; an unreliable one with no connection to go out on
/// is dropped at once.
fn queue_on(s: &mut Session, stream: u64, mode: Mode, payload: Bytes) -> Result<Sent, SendError> {
    if mode == Mode::Unreliable && s.conn().is_none() {
        return Ok(Sent::Unreliable);
    }
    s.channel.send_on(stream, mode, payload)
}

/// Queues `conn` (that is, `c`) for [`Server::poll_transmit`], unless it waits there already.
fn queue(ready: &mut VecDeque<ConnId>, conn: ConnId, c: &mut Conn) {
    if !c.queued {
        c.queued = true;
        ready.push_back(conn);
    }
}

/// Moves the entry of `slot` (whose key it holds for life) in the timer set from its armed
/// deadline (kept on its entity) to `new`.
fn rearm(timers: &mut Timers, slot: TimerSlot, armed: &mut Option<Instant>, new: Option<Instant>) {
    if *armed == new {
        return;
    }
    *armed = new;
    timers.set(slot, new);
}

/// A session's or connection's place in [`Timers`], for as long as it lives: [`SESSION_SLOT`] set
/// for a session's, and the rest its index among the slots of its kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct TimerSlot(u32);

/// The bit of a [`TimerSlot`] that makes it a session's.
const SESSION_SLOT: u32 = 1 << 31;

impl TimerSlot {
    fn index(self) -> usize {
        (self.0 & !SESSION_SLOT) as usize
    }
}

/// One armed timer: its deadline and its slot (16 bytes, so sifting moves little).
#[derive(Debug, Clone, Copy)]
struct TimerEntry {
    at: Instant,
    slot: TimerSlot,
}

/// The timers of every session and connection: a binary min-heap by `(deadline, key)`, where each
/// slot knows its entry's position, so an entity moves or drops its own timer in `O(log n)` without
/// a search. Fires in the order a set of `(deadline, key)` pairs iterates.
#[derive(Debug, Default)]
struct Timers {
    heap: Vec<TimerEntry>,
    conns: SlotTable,
    sessions: SlotTable,
}

/// The slots of one kind of key. Kept apart, a slot's id takes 8 bytes where a [`Key`] takes 16.
#[derive(Debug, Default)]
struct SlotTable {
    /// Per slot, its entry's index in `heap` ([`UNARMED`] if none).
    pos: Vec<u32>,
    /// Per slot, the id of its session or connection (which orders equal deadlines).
    ids: Vec<u64>,
    /// Slots of entities that are gone, for new ones.
    free: Vec<u32>,
}

/// A slot with no entry in the heap.
const UNARMED: u32 = u32::MAX;

impl Timers {
    /// A slot, unarmed, for a new session or connection, `key`.
    fn new_slot(&mut self, key: Key) -> TimerSlot {
        let (table, kind, id) = match key {
            Key::Conn(conn) => (&mut self.conns, 0, conn),
            Key::Session(id) => (&mut self.sessions, SESSION_SLOT, id.0),
        };
        let index = table.free.pop().unwrap_or_else(|| {
            table.pos.push(UNARMED);
            table.ids.push(0);
            u32::try_from(table.pos.len() - 1)
                .ok()
                .filter(|i| i & SESSION_SLOT == 0)
                .expect("fewer than 2^31 timers of a kind")
        });
        table.ids[index as usize] = id;
        TimerSlot(kind | index)
    }

    /// Drops a slot's timer, if armed, and takes the slot back.
    fn free_slot(&mut self, slot: TimerSlot) {
        self.set(slot, None);
        self.table_mut(slot).free.push(slot.index() as u32);
    }

    fn table(&self, slot: TimerSlot) -> &SlotTable {
        if slot.0 & SESSION_SLOT == 0 {
            &self.conns
        } else {
            &self.sessions
        }
    }

    fn table_mut(&mut self, slot: TimerSlot) -> &mut SlotTable {
        if slot.0 & SESSION_SLOT == 0 {
            &mut self.conns
        } else {
            &mut self.sessions
        }
    }

    fn pos_mut(&mut self, slot: TimerSlot) -> &mut u32 {
        &mut self.table_mut(slot).pos[slot.index()]
    }

    /// The key of the session or connection that holds `slot`.
    fn key(&self, slot: TimerSlot) -> Key {
        let id = self.table(slot).ids[slot.index()];
        if slot.0 & SESSION_SLOT == 0 {
            Key::Conn(id)
        } else {
            Key::Session(SessionId(id))
        }
    }

    /// Arms `slot` at `at`, moves it there, or disarms it (`None`).
    fn set(&mut self, slot: TimerSlot, at: Option<Instant>) {
        let i = self.table(slot).pos[slot.index()];
        match (i, at) {
            (UNARMED, None) => {}
            (UNARMED, Some(at)) => {
                self.heap.push(TimerEntry { at, slot });
                self.sift_up(self.heap.len() - 1);
            }
            (i, Some(at)) => {
                let i = i as usize;
                let before = self.heap[i].at;
                self.heap[i].at = at;
                if at < before {
                    self.sift_up(i);
                } else {
                    self.sift_down(i);
                }
            }
            (i, None) => {
                *self.pos_mut(slot) = UNARMED;
                let last = self.heap.pop().expect("an armed slot has an entry");
                let i = i as usize;
                if i < self.heap.len() {
                    // The last entry takes the removed one's place, then finds its own.
                    self.heap[i] = last;
                    self.sift_up(i);
                    let i = self.table(last.slot).pos[last.slot.index()] as usize;
                    self.sift_down(i);
                }
            }
        }
    }

    /// The earliest deadline.
    fn first(&self) -> Option<Instant> {
        self.heap.first().map(|e| e.at)
    }

    /// Disarms and returns the earliest timer if it is due at `now`.
    fn pop_due(&mut self, now: Instant) -> Option<Key> {
        let first = *self.heap.first().filter(|e| e.at <= now)?;
        self.set(first.slot, None);
        Some(self.key(first.slot))
    }

    /// Whether `a` fires before `b`: by deadline, then by key (connections before sessions, then
    /// by id).
    fn before(&self, a: TimerEntry, b: TimerEntry) -> bool {
        a.at < b.at || (a.at == b.at && self.key(a.slot) < self.key(b.slot))
    }

    fn place(&mut self, i: usize, e: TimerEntry) {
        self.heap[i] = e;
        *self.pos_mut(e.slot) = i as u32;
    }

    fn sift_up(&mut self, mut i: usize) {
        let e = self.heap[i];
        while i > 0 {
            let parent = (i - 1) / 2;
            let p = self.heap[parent];
            if !self.before(e, p) {
                break;
            }
            self.place(i, p);
            i = parent;
        }
        self.place(i, e);
    }

    fn sift_down(&mut self, mut i: usize) {
        let e = self.heap[i];
        let n = self.heap.len();
        loop {
            let mut child = 2 * i + 1;
            if child >= n {
                break;
            }
            if child + 1 < n && self.before(self.heap[child + 1], self.heap[child]) {
                child += 1;
            }
            let c = self.heap[child];
            if !self.before(c, e) {
                break;
            }
            self.place(i, c);
            i = child;
        }
        self.place(i, e);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn server() -> Server {
        let entropy =
            Box::new(<rand_chacha::ChaCha8Rng as rand_core::SeedableRng>::seed_from_u64(1));
        Server::new(
            ServerConfig::new(Config::new(crate::Transport::Stream)),
            Instant::ZERO,
            entropy,
        )
        .expect("valid config")
    }

    /// A connection's opening bytes: the preface, then a hello resuming `resume` (or not).
    #[cfg(feature = "driver")]
    fn opening_bytes(resume: Option<SessionId>) -> Vec<u8> {
        let hello = Frame::Hello(HelloFrame {
            nonce: 0x5eed,
            recv_window: 64,
            resume: resume.map(|session| crate::identity::Resume {
                session,
                token: Token::from_bytes([7; 16]),
                epoch: 1,
                received: 0,
            }),
            credentials: Bytes::from_static(b"open"),
        });
        let mut bytes = BytesMut::from(&crate::framing::PREFACE[..]);
        crate::framing::encode_stream_frame(&hello, &mut bytes);
        bytes.to_vec()
    }

    #[cfg(feature = "driver")]
    #[test]
    fn a_connections_opening_names_its_session_once_its_hello_is_all_there() {
        let read = |chunks: &[&[u8]]| {
            let mut reader = OpeningReader::new(1 << 20);
            let verdicts: Vec<Opening> = chunks
                .iter()
                .map(|c| reader.feed(Bytes::copy_from_slice(c)))
                .collect();
            verdicts
        };
        let resume = opening_bytes(Some(SessionId(42)));
        assert_eq!(read(&[&resume]), [Opening::Resume(SessionId(42))]);
        assert_eq!(read(&[&opening_bytes(None)]), [Opening::New(0x5eed)]);
        // Cut anywhere, it waits for the rest, then says the same; more bytes change nothing.
        for cut in 0..resume.len() {
            let (a, b) = resume.split_at(cut);
            let verdicts = read(&[a, b, b"later frames"]);
            assert_eq!(verdicts[0], Opening::More, "{cut} bytes");
            assert_eq!(
                verdicts[1..],
                [Opening::Resume(SessionId(42)); 2],
                "{cut} bytes"
            );
        }
        assert_eq!(read(&[b"GET / HTTP/1.1"]), [Opening::Other]);
        // A first frame that is not a hello.
        let mut ping = BytesMut::from(&crate::framing::PREFACE[..]);
        crate::framing::encode_stream_frame(&Frame::Ping { id: 1 }, &mut ping);
        assert_eq!(read(&[&ping]), [Opening::Other]);
    }

    #[cfg(feature = "driver")]
    #[test]
    fn a_shards_sessions_carry_its_index_in_their_ids() {
        let mut s = server();
        s.set_shard(Shard::new(5, 8));
        let t = Instant::ZERO;
        for conn in 0..20 {
            s.on_connection(t, conn);
            s.handle_input(t, conn, Bytes::from(opening_bytes(None)));
        }
        assert_eq!(s.sessions.len(), 20);
        assert!(
            s.sessions.keys().all(|id| id.0 % 8 == 5),
            "{:?}",
            s.sessions.keys()
        );
    }

    /// A connection id waits in the ready queue once at most: also when its connection is gone
    /// before the queue is drained, and when a new connection takes the id meanwhile.
    #[test]
    fn a_connection_id_waits_in_the_ready_queue_once() {
        let mut s = server();
        let t = Instant::ZERO;
        s.on_connection(t, 1);
        s.on_connection(t, 2);
        s.on_disconnected(t, 1);
        assert_eq!(s.ready.iter().copied().collect::<Vec<_>>(), [1, 2]);
        assert!(s.orphans.contains(&1));
        s.mark_ready(1);
        s.mark_ready(2);
        assert_eq!(s.ready.len(), 2);
        s.on_connection(t, 1);
        assert!(s.orphans.is_empty() && s.conns[&1].queued);
        assert_eq!(s.ready.len(), 2);
        s.on_disconnected(t, 2);
        let mut buf = BytesMut::new();
        while s.poll_transmit(t, &mut buf).is_some() {}
        assert!(s.ready.is_empty() && s.orphans.is_empty());
        assert!(s.conns.values().all(|c| !c.queued));
        s.mark_ready(2);
        assert_eq!(s.ready.len(), 1);
        assert!(s.poll_transmit(t, &mut buf).is_none());
        assert!(s.orphans.is_empty());
    }

    /// Drains what the server wants written (thrown away) and its events; returns the sessions
    /// that connected.
    fn drain(s: &mut Server, t: Instant) -> Vec<SessionId> {
        let mut buf = BytesMut::new();
        while s.poll_transmit(t, &mut buf).is_some() {
            buf.clear();
        }
        let mut connected = Vec::new();
        while let Some(e) = s.poll_event() {
            if let ServerEvent::Session {
                session,
                event: SessionEvent::Connected { .. },
            } = e
            {
                connected.push(session);
            }
        }
        connected
    }

    fn stream(frames: &[Frame], preface: bool) -> Bytes {
        let mut wire = BytesMut::new();
        if preface {
            crate::framing::encode_preface(&mut wire);
        }
        for f in frames {
            crate::framing::encode_stream_frame(f, &mut wire);
        }
        wire.freeze()
    }

    /// A client's hello on connection 1: the session it opened.
    fn open_session(s: &mut Server, t: Instant) -> SessionId {
        s.on_connection(t, 1);
        let hello = Frame::Hello(HelloFrame {
            nonce: 1,
            recv_window: 1024,
            resume: None,
            credentials: Bytes::new(),
        });
        s.handle_input(t, 1, stream(&[hello], true));
        let [id] = drain(s, t)[..] else {
            panic!("one session");
        };
        id
    }

    /// Everything the server writes now.
    fn written(s: &mut Server, t: Instant) -> BytesMut {
        let mut wire = BytesMut::new();
        while s.poll_transmit(t, &mut wire).is_some() {}
        wire
    }

    fn payloads(n: u8) -> VecDeque<Bytes> {
        (0..n).map(|i| Bytes::from(alloc::vec![i; 3])).collect()
    }

    #[test]
    fn a_run_of_sends_puts_on_the_wire_what_one_send_each_does() {
        let t = Instant::ZERO;
        let (mut each, mut run) = (server(), server());
        let (a, b) = (open_session(&mut each, t), open_session(&mut run, t));
        for p in payloads(40) {
            each.send(a, 3, Mode::Ordered, p).expect("room");
        }
        let mut batch = payloads(40);
        run.send_many(b, 3, Mode::Ordered, &mut batch)
            .expect("room");
        assert!(batch.is_empty());
        assert_eq!(written(&mut each, t), written(&mut run, t));
        assert_eq!(
            each.poll_timeout(),
            run.poll_timeout(),
            "the same timers armed"
        );
    }

    #[test]
    fn a_run_stops_at_a_full_queue_and_hands_the_refused_payload_back() {
        let mut s = server();
        let t = Instant::ZERO;
        let id = open_session(&mut s, t);
        let room = s.sessions[&id].channel.config().max_queued_messages;
        let mut batch: VecDeque<Bytes> = (0..room + 5).map(|_| Bytes::from_static(b"x")).collect();
        match s.send_many(id, 0, Mode::Ordered, &mut batch) {
            Err(SendError::QueueFull(p)) => assert_eq!(&p[..], b"x"),
            other => panic!("the queue filled: {other:?}"),
        }
        assert_eq!(batch.len(), 4, "the ones after the refused one stay");
        assert!(
            s.sessions.contains_key(&id),
            "the default policy waits for room"
        );
    }

    #[test]
    fn a_run_that_overflows_a_stream_that_closes_on_overflow_closes_the_session() {
        let entropy =
            Box::new(<rand_chacha::ChaCha8Rng as rand_core::SeedableRng>::seed_from_u64(1));
        let mut config = ServerConfig::new(Config::new(crate::Transport::Stream));
        config.stream_overflow.insert(9, Overflow::CloseSession);
        let room = config.channel.max_queued_messages;
        let mut s = Server::new(config, Instant::ZERO, entropy).expect("valid config");
        let t = Instant::ZERO;
        let id = open_session(&mut s, t);
        let mut batch: VecDeque<Bytes> = (0..room + 1).map(|_| Bytes::from_static(b"x")).collect();
        assert!(matches!(
            s.send_many(id, 9, Mode::Ordered, &mut batch),
            Err(SendError::QueueFull(_))
        ));
        let lost = core::iter::from_fn(|| s.poll_event()).any(|e| {
            matches!(
                e,
                ServerEvent::Session {
                    event: SessionEvent::SessionLost {
                        reason: LostReason::Overflow,
                        ..
                    },
                    ..
                }
            )
        });
        assert!(lost, "the application hears why the session went");
    }

    #[test]
    fn a_quiet_session_gives_back_the_room_its_queues_grew() {
        let mut s = server();
        let t = Instant::ZERO;
        let id = open_session(&mut s, t);
        let burst = |s: &mut Server, n: usize| {
            for _ in 0..n {
                s.send(id, 0, Mode::Ordered, Bytes::from_static(b"x"))
                    .expect("room");
            }
        };
        let room = |s: &Server| s.sessions[&id].channel.queue_room();
        burst(&mut s, 100);
        drain(&mut s, t);
        let ack = Frame::Ack(crate::frame::AckFrame {
            cumulative: 100,
            delay_micros: 0,
            ranges: Default::default(),
        });
        s.handle_input(t, 1, stream(&[ack], false));
        drain(&mut s, t);
        assert!(room(&s) >= 100, "busy, its queues keep their room");

        // Nothing sent for a heartbeat interval: the heartbeat goes out, the room comes back.
        let t = t + crate::liveness::LivenessConfig::default().heartbeat_interval;
        s.handle_timeout(t);
        drain(&mut s, t);
        assert_eq!(room(&s), 0);

        // Busy again, then the client goes away: what is unacknowledged stays, the room goes.
        burst(&mut s, 100);
        drain(&mut s, t);
        s.on_disconnected(t, 1);
        drain(&mut s, t);
        assert_eq!(room(&s), 0);
        assert_eq!(s.sessions[&id].channel.sender().queued_messages(), 100);
    }

    // The canary feature (the simulator's) adds fields of its own.
    #[cfg(not(feature = "canary"))]
    #[test]
    fn a_session_and_its_connection_take_at_most_600_and_264_bytes_inline() {
        // With the maps' entries and the timer set's slots, about 1 KiB per idle connected session
        // (the memory example): a server holds 100,000 of them.
        assert!(size_of::<Session>() <= 600, "{}", size_of::<Session>());
        assert!(size_of::<Conn>() <= 264, "{}", size_of::<Conn>());
    }

    #[test]
    fn the_room_a_burst_of_due_timers_took_is_let_go() {
        let mut s = server();
        let t = Instant::ZERO;
        for conn in 0..2 * DUE_KEPT as u64 {
            s.on_connection(t, conn);
            let hello = Frame::Hello(HelloFrame {
                nonce: conn,
                recv_window: 1024,
                resume: None,
                credentials: Bytes::new(),
            });
            s.handle_input(t, conn, stream(&[hello], true));
        }
        assert_eq!(drain(&mut s, t).len(), 2 * DUE_KEPT);
        // Every connection's heartbeat is due at once.
        let t = t + crate::liveness::LivenessConfig::default().heartbeat_interval;
        s.handle_timeout(t);
        assert!(s.due.capacity() <= DUE_KEPT, "{}", s.due.capacity());
        let mut buf = BytesMut::new();
        let mut pinged = 0;
        while let Some(tx) = s.poll_transmit(t, &mut buf) {
            pinged += usize::from(tx.len > 0);
        }
        assert_eq!(pinged, 2 * DUE_KEPT, "every heartbeat was handled");
    }

    #[test]
    fn a_hello_awaiting_authentication_goes_with_its_connection() {
        let entropy =
            Box::new(<rand_chacha::ChaCha8Rng as rand_core::SeedableRng>::seed_from_u64(1));
        let mut config = ServerConfig::new(Config::new(crate::Transport::Stream));
        config.authenticate = true;
        let mut s = Server::new(config, Instant::ZERO, entropy).expect("valid config");
        let t = Instant::ZERO;
        let hello = Frame::Hello(HelloFrame {
            nonce: 1,
            recv_window: 1024,
            resume: None,
            credentials: Bytes::from_static(b"secret"),
        });
        for conn in [1, 2] {
            s.on_connection(t, conn);
            s.handle_input(t, conn, stream(core::slice::from_ref(&hello), true));
        }
        assert_eq!(s.awaiting_auth.len(), 2);
        s.on_disconnected(t, 1);
        // The adapter reuses an id it never reported closed: the old connection's hello goes too.
        s.on_connection(t, 2);
        assert!(s.awaiting_auth.is_empty());
        s.authenticate(t, 1, true);
        s.authenticate(t, 2, true);
        assert_eq!(s.session_count(), 0, "no hello was left to accept");
    }

    #[test]
    fn a_sessions_counters_box_only_what_moved_and_read_back_whole() {
        let mut c = Counters::default();
        c.connected();
        c.add(0, |c| &mut c.stalls);
        assert!(c.rest.is_none(), "adding nothing makes no box");
        let mut want = SessionCounters {
            connects: 1,
            ..SessionCounters::default()
        };
        assert_eq!(c.get(), want);
        c.add(2, |c| &mut c.stalls);
        c.add(1, |c| &mut c.resumes);
        want.stalls = 2;
        want.resumes = 1;
        assert_eq!(c.get(), want);
        // Past what the inline count holds, the count carries on exactly.
        c.connects = u32::MAX;
        c.disconnects = u32::MAX - 1;
        c.connected();
        c.disconnected();
        c.disconnected();
        c.disconnected();
        want.connects = 1 << 32;
        want.disconnects = (1 << 32) + 1;
        assert_eq!(c.get(), want);
        assert!(size_of::<Counters>() <= 16);
    }

    proptest! {
        /// The timer heap agrees with a set of `(deadline, key)` pairs, whatever is armed, moved,
        /// disarmed, freed and fired, in whatever order.
        #[test]
        fn timers_fire_in_the_order_of_a_set_of_deadline_key_pairs(
            ops in proptest::collection::vec((0u8..4, 0usize..12, 0u64..40), 1..400)
        ) {
            let mut timers = Timers::default();
            let mut model: BTreeSet<(Instant, Key)> = BTreeSet::new();
            // Per live entity: its key, slot and armed deadline.
            let mut live: Vec<(Key, TimerSlot, Option<Instant>)> = Vec::new();
            let mut next_id = 0u64;
            for (op, pick, t) in ops {
                let at = Instant::from_nanos(t);
                match op {
                    0 => {
                        next_id += 1;
                        let key = if next_id % 2 == 0 {
                            Key::Conn(next_id % 7)
                        } else {
                            Key::Session(SessionId(next_id % 5))
                        };
                        // Keys are unique among live entities.
                        if live.iter().all(|(k, _, _)| *k != key) {
                            live.push((key, timers.new_slot(key), None));
                        }
                    }
                    1 | 2 if !live.is_empty() => {
                        let i = pick % live.len();
                        let (key, slot, armed) = &mut live[i];
                        let new = (op == 1).then_some(at);
                        if let Some(old) = *armed {
                            model.remove(&(old, *key));
                        }
                        if let Some(new) = new {
                            model.insert((new, *key));
                        }
                        rearm(&mut timers, *slot, armed, new);
                    }
                    3 if !live.is_empty() => {
                        let (key, slot, armed) = live.swap_remove(pick % live.len());
                        if let Some(old) = armed {
                            model.remove(&(old, key));
                        }
                        timers.free_slot(slot);
                    }
                    _ => {
                        // Fire what is due at `at`, as handle_timeout does.
                        while let Some(key) = timers.pop_due(at) {
                            let first = model.pop_first();
                            prop_assert_eq!(first.map(|(_, k)| k), Some(key));
                            prop_assert!(first.is_some_and(|(d, _)| d <= at));
                            if let Some(e) = live.iter_mut().find(|(k, _, _)| *k == key) {
                                e.2 = None;
                            }
                        }
                        prop_assert!(model.first().is_none_or(|(d, _)| *d > at));
                    }
                }
                prop_assert_eq!(timers.first(), model.first().map(|(d, _)| *d));
                prop_assert_eq!(timers.heap.len(), model.len());
            }
        }
    }
}
