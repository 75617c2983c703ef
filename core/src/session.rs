//! What client and server sessions share: their events, the reasons a session ends, the handshake's
//! refusal codes, replies and requests, and the state of one connection.
//!
//! A **session** outlives **connections**. The client opens each connection with a hello (new, or a
//! resume carrying the session id, its secret token, an attach epoch one above any used before, and
//! its receive watermark); the server answers with a welcome (its own watermark) or a refusal. Each
//! side then releases what the other holds and resends the rest first, in order, so messages flow in
//! the first round trip of the new connection.

use alloc::boxed::Box;
use alloc::collections::{BTreeMap, VecDeque};
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::fmt;

use bytes::{Bytes, BytesMut};

use crate::Seq;
use crate::channel::{Channel, Events, Sink};
use crate::config::Transport;
use crate::event::{CloseReason, Event, Message};
use crate::frame::DataFrame;
use crate::frame::{DecodeError, DecodeLimits, Frame};
use crate::framing::{self, StreamDecoder};
use crate::identity::SessionId;
use crate::liveness::{Liveness, LivenessConfig, PongBacklog, Verdict};
use crate::reconnect::GaveUp;
use crate::tiebreak::{Arbiter, Role};
use crate::time::{Duration, Instant, earliest};

/// Stream ids at and above this carry replies: the stream field holds `REPLY_STREAM + seq` of the
/// message answered, so a reply costs no extra allocation or field. Applications use streams below it.
pub const REPLY_STREAM: u64 = 1 << 61;

/// Randomness for tokens, session ids and nonces: an input, like time. Adapters pass the operating
/// system's generator, the simulator a seeded one.
pub trait Entropy: rand_core::RngCore + rand_core::CryptoRng + Send {}
impl<T: rand_core::RngCore + rand_core::CryptoRng + Send> Entropy for T {}

/// What a session tells its application.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SessionEvent {
    /// A connection carries the session: a new one, or a resume.
    Connected {
        /// The session.
        session: SessionId,
        /// Whether an existing session was resumed.
        resumed: bool,
        /// The attach epoch now current.
        epoch: u64,
        /// Messages this side resends because the peer lacked them.
        retransmitted: u64,
    },
    /// The connection is gone; the session lives on and will resume (client) or wait for its
    /// client within the retention time (server).
    Disconnected {
        /// Why.
        cause: DisconnectCause,
    },
    /// A message from the peer, exactly once.
    Received(Message),
    /// An at-most-once message from the peer.
    ReceivedUnreliable {
        /// Its stream.
        stream: u64,
        /// Its payload.
        payload: Bytes,
    },
    /// The peer has received every message with a sequence number below `below` (receipts).
    Acknowledged {
        /// The cumulative acknowledgement point.
        below: Seq,
    },
    /// The peer replied to message `to`.
    Reply {
        /// The sequence number of the message answered.
        to: Seq,
        /// The reply.
        payload: Bytes,
    },
    /// A request's deadline passed without a reply.
    RequestTimedOut {
        /// The request's sequence number.
        seq: Seq,
    },
    /// The session ended without either application asking: it cannot be resumed. The last event.
    SessionLost {
        /// Why.
        reason: LostReason,
        /// Messages sent but never acknowledged: their delivery is unknown.
        unacknowledged: Vec<Message>,
    },
    /// A message received before this process restarted that the application had not consumed,
    /// handed out again from the durable store: it may have been seen, so an application with
    /// its own ledger checks the id (see [`crate::store`]).
    Redelivered(Message),
    /// The durable store failed: the session carries on, but only in memory, so a restart of this
    /// process now loses it (Softnet's CPL-2 to CPL-1).
    DurabilityLost {
        /// What failed.
        error: crate::store::StoreError,
    },
    /// Another server of the cluster took the session over with a newer attach epoch (its client
    /// resumed there): this server no longer serves it. Not the session's end, which is the new
    /// owner's to report. The last event on this server. Server side, with a shared
    /// [`crate::store::SessionStore`] only.
    Fenced {
        /// The attach epoch that won.
        epoch: u64,
    },
    /// The session was closed by an application (this side's or the peer's). The last event.
    Closed {
        /// Who closed, with the code.
        reason: CloseReason,
        /// Messages sent but never acknowledged: their delivery is unknown.
        unacknowledged: Vec<Message>,
    },
}

impl SessionEvent {
    /// Whether this is the session's last event: [`SessionEvent::SessionLost`] or
    /// [`SessionEvent::Closed`].
    pub fn ends_session(&self) -> bool {
        matches!(
            self,
            SessionEvent::SessionLost { .. } | SessionEvent::Closed { .. }
        )
    }
}

/// Why a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum DisconnectCause {
    /// Nothing arrived within the idle timeout (a silently dead path).
    IdleTimeout {
        /// How long the peer had been silent.
        silent_for: Duration,
    },
    /// The transport reported the connection closed or reset.
    TransportClosed,
    /// A newer attach of the same session took over (server side).
    Superseded,
    /// The peer's bytes did not decode.
    Decode(DecodeError),
    /// The server no longer knew this connection (it restarted, or dropped a datagram binding);
    /// the session resumes on a new one if the server still holds it.
    NotAttached,
}

/// Why a session was lost.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum LostReason {
    /// The server no longer holds the session: its retention time ran out, or it restarted.
    Expired,
    /// The server holds the session under a newer attach epoch: this client is a stale copy (a VM
    /// restored from a snapshot, a clone).
    StaleEpoch {
        /// The epoch this side claimed.
        claimed: u64,
        /// The server's current epoch.
        current: u64,
    },
    /// The server refused the handshake (e.g. authentication).
    Refused {
        /// The refusal.
        code: RefuseCode,
        /// The server's reason text.
        reason: Bytes,
    },
    /// The reconnect policy gave up.
    GaveUp(GaveUp),
    /// Server side: the client did not come back within the retention time.
    RetentionExpired,
    /// A bounded queue overflowed under a close-the-session policy.
    Overflow,
    /// The peer broke the protocol.
    Violation(crate::ProtocolError),
}

/// Why a server refuses a hello.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RefuseCode {
    /// No such session (expired, never existed, or the server restarted).
    UnknownSession,
    /// The token does not match.
    BadToken,
    /// The attach epoch is not newer than the session's current one.
    StaleEpoch,
    /// The authentication hook refused the credentials.
    AuthenticationFailed,
    /// The server holds as many sessions as it is configured for.
    ServerFull,
    /// This connection carries no session on the server (it never said hello, or the server
    /// forgot it: restarted, or dropped a datagram binding). Not the end of the session: say hello
    /// again on a new connection. The counterpart of QUIC's stateless reset.
    NotAttached,
    /// The hello broke the protocol: a resume claiming to have received messages never sent.
    Violation,
    /// A code this version does not know.
    Other(u64),
}

impl RefuseCode {
    /// The wire value.
    pub fn to_wire(self) -> u64 {
        match self {
            RefuseCode::UnknownSession => 1,
            RefuseCode::BadToken => 2,
            RefuseCode::StaleEpoch => 3,
            RefuseCode::AuthenticationFailed => 4,
            RefuseCode::ServerFull => 5,
            RefuseCode::NotAttached => 6,
            RefuseCode::Violation => 7,
            RefuseCode::Other(c) => c,
        }
    }

    /// From the wire value.
    pub fn from_wire(code: u64) -> Self {
        match code {
            1 => RefuseCode::UnknownSession,
            2 => RefuseCode::BadToken,
            3 => RefuseCode::StaleEpoch,
            4 => RefuseCode::AuthenticationFailed,
            5 => RefuseCode::ServerFull,
            6 => RefuseCode::NotAttached,
            7 => RefuseCode::Violation,
            c => RefuseCode::Other(c),
        }
    }
}

impl fmt::Display for RefuseCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RefuseCode::UnknownSession => f.write_str("unknown session"),
            RefuseCode::BadToken => f.write_str("bad token"),
            RefuseCode::StaleEpoch => f.write_str("stale attach epoch"),
            RefuseCode::AuthenticationFailed => f.write_str("authentication failed"),
            RefuseCode::ServerFull => f.write_str("server full"),
            RefuseCode::NotAttached => f.write_str("connection not attached to a session"),
            RefuseCode::Violation => f.write_str("protocol violation"),
            RefuseCode::Other(c) => write!(f, "refused ({c})"),
        }
    }
}

/// Per-session counters, on top of the channel's [`crate::Stats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SessionCounters {
    /// Connections established (first attach included).
    pub connects: u64,
    /// Resumes of the session over a new connection.
    pub resumes: u64,
    /// Connections lost.
    pub disconnects: u64,
    /// Of those, declared dead by the idle timeout.
    pub idle_timeouts: u64,
    /// Messages resent because a resumed peer lacked them.
    pub resent_on_resume: u64,
    /// Local stalls detected (this process frozen past its deadlines).
    pub stalls: u64,
    /// Requests that timed out.
    pub request_timeouts: u64,
    /// Datagrams dropped because they did not decode (corrupted, truncated, foreign).
    pub malformed_datagrams: u64,
}

/// How long a local close waits for the peer to close too (or its transport to end) before the
/// session reports itself closed anyway.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// A local close waiting to learn whether the peer closed at the same moment.
#[derive(Debug)]
pub(crate) struct HeldClose {
    code: u64,
    unacknowledged: Vec<Message>,
    pub(crate) deadline: Instant,
}

impl HeldClose {
    /// Holds the channel's `Closed` event of a local close; other events pass through.
    pub(crate) fn hold(event: Event, now: Instant) -> Result<HeldClose, Event> {
        match event {
            Event::Closed {
                reason: CloseReason::Local { code },
                unacknowledged,
            } => Ok(HeldClose {
                code,
                unacknowledged,
                deadline: now + CLOSE_TIMEOUT,
            }),
            other => Err(other),
        }
    }

    /// The peer's close frame crossed ours: both ends name the same close. Equal codes are one
    /// close; different codes are settled by the arbiter, so each end reports the favourite's.
    pub(crate) fn crossed(
        self,
        peer_code: u64,
        peer_reason: Bytes,
        arbiter: Option<Arbiter>,
    ) -> SessionEvent {
        let ours = peer_code == self.code || arbiter.is_none_or(|a| a.local_wins());
        SessionEvent::Closed {
            reason: if ours {
                CloseReason::Local { code: self.code }
            } else {
                CloseReason::Peer {
                    code: peer_code,
                    reason: peer_reason,
                }
            },
            unacknowledged: self.unacknowledged,
        }
    }

    /// No close came back (the transport ended or the wait ran out): ours stands.
    pub(crate) fn settle(self) -> SessionEvent {
        SessionEvent::Closed {
            reason: CloseReason::Local { code: self.code },
            unacknowledged: self.unacknowledged,
        }
    }
}

/// Pending requests, indexed both ways: by sequence number for replies, by deadline so the next
/// one due is found without a scan (the server asks on every timer update). Made at the first
/// request and let go when none is left: most sessions never make one, and a server holds a
/// `Requests` per session.
#[derive(Debug, Default)]
pub(crate) struct Requests(Option<Box<Pending>>);

#[derive(Debug, Default)]
struct Pending {
    by_seq: BTreeMap<Seq, Instant>,
    by_deadline: alloc::collections::BTreeSet<(Instant, Seq)>,
}

impl Requests {
    pub(crate) fn insert(&mut self, seq: Seq, deadline: Instant) {
        let p = self.0.get_or_insert_with(Box::default);
        if let Some(old) = p.by_seq.insert(seq, deadline) {
            p.by_deadline.remove(&(old, seq));
        }
        p.by_deadline.insert((deadline, seq));
    }

    pub(crate) fn len(&self) -> usize {
        self.0.as_ref().map_or(0, |p| p.by_seq.len())
    }

    pub(crate) fn answered(&mut self, seq: Seq) {
        if let Some(p) = &mut self.0
            && let Some(deadline) = p.by_seq.remove(&seq)
        {
            p.by_deadline.remove(&(deadline, seq));
            self.let_go_if_empty();
        }
    }

    pub(crate) fn deadline(&self) -> Option<Instant> {
        self.0.as_ref()?.by_deadline.first().map(|(d, _)| *d)
    }

    /// Removes and returns the requests due at `now`.
    pub(crate) fn expire(&mut self, now: Instant) -> Vec<Seq> {
        let mut due = Vec::new();
        let Some(p) = &mut self.0 else {
            return due;
        };
        while let Some(&(deadline, seq)) = p.by_deadline.first() {
            if deadline > now {
                break;
            }
            p.by_deadline.pop_first();
            p.by_seq.remove(&seq);
            due.push(seq);
        }
        self.let_go_if_empty();
        due
    }

    fn let_go_if_empty(&mut self) {
        if self.0.as_ref().is_some_and(|p| p.by_seq.is_empty()) {
            self.0 = None;
        }
    }
}

/// Where a session's events go: the client's queue, or the server's (with the session's id).
pub(crate) trait SessionQueue {
    /// Appends `event`.
    fn push(&mut self, event: SessionEvent);
}

impl SessionQueue for &mut VecDeque<SessionEvent> {
    #[inline(always)]
    fn push(&mut self, event: SessionEvent) {
        self.push_back(event);
    }
}

/// A channel's data-path events made straight into a session queue, without a stop in the
/// channel's own queue (see [`Channel::handle_data_into`]).
pub(crate) struct SessionSink<'a, Q> {
    queue: Q,
    requests: &'a mut Requests,
    /// The newest cumulative ack point it heard of.
    pub(crate) acknowledged: Option<Seq>,
}

impl<'a, Q: SessionQueue> SessionSink<'a, Q> {
    pub(crate) fn new(queue: Q, requests: &'a mut Requests) -> Self {
        SessionSink {
            queue,
            requests,
            acknowledged: None,
        }
    }
}

impl<Q: SessionQueue> Sink for SessionSink<'_, Q> {
    #[inline(always)]
    fn received(&mut self, _: &mut Events, stream: u64, seq: Seq, payload: Bytes) {
        let message = Message {
            stream,
            seq,
            payload,
        };
        self.queue.push(received_event(message, self.requests));
    }

    fn acknowledged(&mut self, _: &mut Events, below: Seq) {
        self.acknowledged = Some(below);
        self.queue.push(SessionEvent::Acknowledged { below });
    }
}

/// A message the channel delivered, as the application sees it: a reply to one of this end's
/// requests, or a message.
#[inline(always)]
fn received_event(m: Message, requests: &mut Requests) -> SessionEvent {
    if m.stream < REPLY_STREAM {
        return SessionEvent::Received(m);
    }
    let to = m.stream - REPLY_STREAM;
    requests.answered(to);
    SessionEvent::Reply {
        to,
        payload: m.payload,
    }
}

/// Turns a channel event into the session event the application sees.
pub(crate) fn session_event(event: Event, requests: &mut Requests) -> SessionEvent {
    match event {
        Event::Received(m) => received_event(m, requests),
        Event::ReceivedUnreliable { stream, payload } => {
            SessionEvent::ReceivedUnreliable { stream, payload }
        }
        Event::Acknowledged { below } => SessionEvent::Acknowledged { below },
        Event::Closed {
            reason: CloseReason::Violation(e),
            unacknowledged,
        } => SessionEvent::SessionLost {
            reason: LostReason::Violation(e),
            unacknowledged,
        },
        Event::Closed {
            reason: CloseReason::Peer { code, .. },
            unacknowledged,
        } if code == crate::CLOSE_OVERFLOW => SessionEvent::SessionLost {
            reason: LostReason::Overflow,
            unacknowledged,
        },
        Event::Closed {
            reason,
            unacknowledged,
        } => SessionEvent::Closed {
            reason,
            unacknowledged,
        },
    }
}

/// One connection's state: its framing, its liveness, and where its handshake stands.
#[derive(Debug)]
pub(crate) struct Link {
    framing: Framing,
    preface_sent: bool,
    pub(crate) liveness: Liveness,
    /// Handshake frames to write before anything else.
    pub(crate) outbox: Outbox,
    /// Pongs owed to the peer's pings.
    /// Made when a ping arrives and let go once its pongs are written: an idle connection owes
    /// none between heartbeats.
    pongs: Option<Box<PongBacklog>>,
    pub(crate) established: bool,
    role: Role,
    pub(crate) local_nonce: u64,
    /// The peer's nonce from the handshake, once established: with `role` and `local_nonce`, the
    /// arbiter (kept as its parts, as the link holds two of them anyway).
    peer_nonce: u64,
}

/// How a link cuts what arrives into frames.
#[derive(Debug)]
enum Framing {
    /// A byte stream, with its decoder (which holds the limits).
    Stream(StreamDecoder),
    /// One frame per datagram.
    Datagram {
        limits: DecodeLimits,
        /// Datagrams that did not decode (corrupted, truncated, foreign): kept here, in room the
        /// stream decoder takes anyway.
        malformed: u64,
    },
}

/// A link's handshake frames waiting to go out, the newest two at most. Made when the first is
/// queued and let go once the last is written: an established connection seldom has any, and two
/// inline frames would make every idle connection 300 bytes larger.
#[derive(Debug, Default)]
pub(crate) struct Outbox(Option<Box<heapless::Deque<Frame, 2>>>);

impl Outbox {
    fn push(&mut self, frame: Frame) {
        let queue = self.0.get_or_insert_with(Box::default);
        if queue.is_full() {
            queue.pop_front();
        }
        let _ = queue.push_back(frame);
    }

    fn pop_front(&mut self) -> Option<Frame> {
        let queue = self.0.as_mut()?;
        let frame = queue.pop_front();
        if queue.is_empty() {
            self.0 = None;
        }
        frame
    }

    /// Never holds an empty queue, so this is a field check.
    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_none()
    }

    pub(crate) fn clear(&mut self) {
        self.0 = None;
    }
}

/// What a link made of incoming bytes.
#[allow(
    clippy::large_enum_variant,
    reason = "lives briefly on the stack between decoding and handling, like Frame itself"
)]
pub(crate) enum Incoming {
    /// A data frame, for the channel: apart from [`Incoming::Frame`] because it is decoded without
    /// a [`Frame`] built around it (see [`StreamDecoder::next_delimited`]).
    Data(DataFrame),
    /// Any other frame, for the session layer or the channel.
    Frame(Frame),
    /// The bytes did not decode: the connection is unusable.
    Broken(DecodeError),
}

impl Link {
    pub(crate) fn new(
        role: Role,
        transport: Transport,
        liveness: Arc<LivenessConfig>,
        limits: DecodeLimits,
        local_nonce: u64,
        now: Instant,
    ) -> Self {
        Link {
            framing: match transport {
                Transport::Stream => Framing::Stream(StreamDecoder::new(limits)),
                Transport::Datagram => Framing::Datagram {
                    limits,
                    malformed: 0,
                },
            },
            preface_sent: false,
            liveness: Liveness::with_shared_config(liveness, now),
            outbox: Outbox::default(),
            pongs: None,
            established: false,
            role,
            local_nonce,
            peer_nonce: 0,
        }
    }

    /// The handshake completed with the peer's `peer_nonce`: the link carries the channel now.
    pub(crate) fn establish(&mut self, peer_nonce: u64) {
        self.established = true;
        self.peer_nonce = peer_nonce;
    }

    /// Datagrams that did not decode (corrupted, truncated, foreign).
    pub(crate) fn malformed(&self) -> u64 {
        match self.framing {
            Framing::Datagram { malformed, .. } => malformed,
            Framing::Stream(_) => 0,
        }
    }

    /// The peer's nonce, once established.
    pub(crate) fn peer_nonce(&self) -> Option<u64> {
        self.established.then_some(self.peer_nonce)
    }

    /// The arbiter both ends agreed on in the handshake, once established.
    pub(crate) fn arbiter(&self) -> Option<Arbiter> {
        self.peer_nonce()
            .map(|peer| Arbiter::new(self.role, self.local_nonce, peer))
    }

    /// Decodes what arrived; calls `on` for each frame (or the decode failure, after which it stops).
    pub(crate) fn input(
        &mut self,
        now: Instant,
        data: Bytes,
        mut on: impl FnMut(&mut Self, Incoming),
    ) {
        match &mut self.framing {
            Framing::Stream(decoder) => {
                decoder.feed_bytes(data);
                let mut heard = false;
                loop {
                    let Framing::Stream(d) = &mut self.framing else {
                        return;
                    };
                    let next = match d.next_delimited() {
                        Ok(Some(frame)) if framing::is_data(&frame) => {
                            d.decode_data(frame).map(Incoming::Data)
                        }
                        Ok(Some(frame)) => d.decode(frame).map(Incoming::Frame),
                        Ok(None) => return,
                        Err(e) => Err(e),
                    };
                    match next {
                        Ok(incoming) => {
                            // Every frame of one read arrived at the same `now`: once is enough.
                            if !heard {
                                self.liveness.on_receive(now);
                                heard = true;
                            }
                            match incoming {
                                Incoming::Frame(
                                    frame @ (Frame::Ping { .. } | Frame::Pong { .. }),
                                ) => {
                                    if let Some(frame) = self.intercept(now, frame) {
                                        on(self, Incoming::Frame(frame));
                                    }
                                }
                                other => on(self, other),
                            }
                        }
                        Err(e) => {
                            on(self, Incoming::Broken(e));
                            return;
                        }
                    }
                }
            }
            // A mangled datagram is dropped like a lost one, and proves nothing about the peer.
            Framing::Datagram { limits, malformed } => match framing::decode_datagram(data, limits)
            {
                Ok(frame) => {
                    self.liveness.on_receive(now);
                    if let Some(frame) = self.intercept(now, frame) {
                        on(self, Incoming::Frame(frame));
                    }
                }
                Err(_) => *malformed += 1,
            },
        }
    }

    /// Liveness probes are the link's own business.
    fn intercept(&mut self, now: Instant, frame: Frame) -> Option<Frame> {
        match frame {
            // Before a handshake there is nothing to vouch for: answering would keep alive a peer
            // that believes in a session this end does not hold (a server that forgot a datagram
            // binding). The session layer answers with a refusal instead.
            Frame::Ping { .. } if !self.established => Some(frame),
            Frame::Pong { .. } if !self.established => None,
            Frame::Ping { id } => {
                self.pongs.get_or_insert_with(Box::default).answer(id);
                None
            }
            Frame::Pong { id } => {
                self.liveness.on_pong(now, id);
                None
            }
            other => Some(other),
        }
    }

    /// The next pong owed, letting the backlog go once it is empty.
    fn next_pong(&mut self) -> Option<u64> {
        let id = self.pongs.as_deref_mut()?.next();
        if id.is_none() {
            self.pongs = None;
        }
        id
    }

    /// Writes the link's own frames (preface, handshake, pings, pongs) and then, once established,
    /// the channel's. Returns the bytes written.
    pub(crate) fn transmit(
        &mut self,
        now: Instant,
        channel: Option<&mut Channel>,
        buf: &mut BytesMut,
        budget: usize,
    ) -> usize {
        let start = buf.len();
        let stream = matches!(self.framing, Framing::Stream(_));
        if stream && !self.preface_sent {
            framing::encode_preface(buf);
            self.preface_sent = true;
        }
        let one = |buf: &BytesMut| !stream && buf.len() > start;
        let mut channel = channel;
        while !one(buf) {
            let frame = match self.outbox.pop_front() {
                Some(f) => f,
                None => match self.next_pong() {
                    Some(id) => Frame::Pong { id },
                    None => match self.liveness.poll_ping(now).filter(|_| self.established) {
                        Some(id) => {
                            // A heartbeat: nothing went out for a while. The channel lets go of
                            // the room its queues grew while busy (once per idle interval).
                            if let Some(ch) = channel.as_deref_mut() {
                                ch.shrink_queues();
                            }
                            Frame::Ping { id }
                        }
                        None => break,
                    },
                },
            };
            if stream {
                framing::encode_stream_frame(&frame, buf);
            } else {
                framing::encode_datagram(&frame, buf);
            }
        }
        if self.established
            && !one(buf)
            && let Some(ch) = channel
        {
            let used = buf.len() - start;
            ch.write_frames(now, buf, budget.saturating_sub(used).max(1));
        }
        let n = buf.len() - start;
        if n > 0 {
            self.liveness.on_send(now);
        }
        n
    }

    /// Whether the link has something of its own to write.
    pub(crate) fn wants_transmit(&self) -> bool {
        (matches!(self.framing, Framing::Stream(_)) && !self.preface_sent)
            || !self.outbox.is_empty()
            || self.pongs.as_ref().is_some_and(|p| !p.is_empty())
    }

    pub(crate) fn queue(&mut self, frame: Frame) {
        self.outbox.push(frame);
    }

    /// Fires the liveness timers.
    pub(crate) fn on_timeout(&mut self, now: Instant) -> Verdict {
        self.liveness.on_timeout(now)
    }

    pub(crate) fn deadline(&self) -> Option<Instant> {
        self.liveness.deadline()
    }

    /// When the owner must next wake for this connection: its liveness timers and, once the
    /// handshake is done, the channel's (before that the channel cannot act, so its deadlines would
    /// only stay in the past).
    pub(crate) fn next_wake(&self, channel: Option<&Channel>) -> Option<Instant> {
        let channel = channel.filter(|_| self.established);
        earliest(self.deadline(), channel.and_then(Channel::poll_timeout))
    }
}
