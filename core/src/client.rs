//! The client end of a session: connects through its reconnect policy, opens or resumes the session
//! on each connection, and keeps it alive.

use alloc::collections::VecDeque;
use alloc::sync::Arc;
use alloc::vec::Vec;

use bytes::{Bytes, BytesMut};

use crate::Seq;
use crate::channel::Channel;
use crate::config::{Config, ConfigError};
use crate::event::Event;
use crate::frame::{DecodeLimits, Frame, HelloFrame, WelcomeFrame};
use crate::identity::{Resume, SessionId, Token};
use crate::liveness::{LivenessConfig, Verdict};
use crate::mode::{Mode, Sent};
use crate::reconnect::{GaveUp, ReconnectPolicy, Reconnector};
use crate::send::SendError;
use crate::session::{
    DisconnectCause, Entropy, HeldClose, Incoming, Link, LostReason, REPLY_STREAM, RefuseCode,
    Requests, SessionCounters, SessionEvent, SessionSink, session_event,
};
use crate::store::{Identity, Store, StoreError, Stored};
use crate::tiebreak::{Arbiter, Role};
use crate::time::{Duration, Instant, earliest};

/// A client's configuration.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ClientConfig {
    /// The reliable channel's bounds and timers.
    pub channel: Config,
    /// Heartbeats, idle timeout, stall handling.
    pub liveness: LivenessConfig,
    /// Backoff and giving up.
    pub reconnect: ReconnectPolicy,
    /// How many servers the adapter can connect to (indices `0..servers`).
    pub servers: usize,
    /// Sent in every hello for the server's authentication hook.
    pub credentials: Bytes,
    /// The most requests awaiting a reply at once.
    pub max_pending_requests: usize,
    /// On datagram transports, how often an unanswered hello is sent again.
    pub hello_retry: Duration,
}

impl ClientConfig {
    /// Defaults over `channel`, for `servers` servers.
    pub fn new(channel: Config, servers: usize) -> Self {
        ClientConfig {
            channel,
            liveness: LivenessConfig::default(),
            reconnect: ReconnectPolicy::default(),
            servers,
            credentials: Bytes::new(),
            max_pending_requests: 4096,
            hello_retry: Duration::from_millis(250),
        }
    }
}

/// What the adapter must do with its transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Directive {
    /// Open a connection to server `server` now, then report [`Client::on_connected`] or
    /// [`Client::on_connect_failed`].
    Connect {
        /// Index into the adapter's server list.
        server: usize,
        /// Attempts since the last success, this one included.
        attempt: u32,
    },
    /// Close the current connection (it was declared dead); then report nothing more for it.
    Disconnect,
}

#[derive(Debug)]
enum Phase {
    /// Waiting for the reconnect policy's next attempt.
    Waiting,
    /// A connect directive is out; waiting for its outcome.
    Connecting,
    /// Connected; the hello is out, the welcome not yet in (or established once it is).
    Linked { link: Link, hello_at: Instant },
    /// Closed by this application: the close frame goes out on this link, and the close is held
    /// until the peer's close crosses it, the transport ends, or the wait runs out.
    Closing { link: Link, held: HeldClose },
    /// The session is over (lost or closed). Terminal.
    Over,
}

/// The client end of a session.
///
/// Same driving contract as [`Channel`], plus the transport's lifecycle: act on
/// [`Client::poll_directive`] (connect, disconnect) and report [`Client::on_connected`],
/// [`Client::on_connect_failed`] and [`Client::on_disconnected`]. Everything else — the handshake,
/// resume, heartbeats, idle detection, backoff — happens inside.
pub struct Client {
    config: ClientConfig,
    entropy: alloc::boxed::Box<dyn Entropy>,
    channel: Channel,
    session: Option<(SessionId, Token)>,
    /// The highest attach epoch this client ever claimed.
    epoch: u64,
    phase: Phase,
    reconnect: Reconnector,
    issued_attempt: Option<u32>,
    disconnect_due: bool,
    requests: Requests,
    /// Reused by `handle_input` for the frames of one read.
    scratch: Vec<Incoming>,
    events: VecDeque<SessionEvent>,
    counters: SessionCounters,
    limits: DecodeLimits,
    now: Instant,
    /// Where the session is made durable, if anywhere; dropped (with an event) when it fails.
    store: Option<alloc::boxed::Box<dyn Store>>,
}

impl core::fmt::Debug for Client {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Client")
            .field("session", &self.session.map(|(id, _)| id))
            .field("epoch", &self.epoch)
            .field("phase", &self.phase)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// A client that will connect at `now`.
    pub fn new(
        config: ClientConfig,
        now: Instant,
        entropy: alloc::boxed::Box<dyn Entropy>,
    ) -> Result<Self, ConfigError> {
        let channel = Channel::new(config.channel.clone(), now)?;
        let mut reconnect = Reconnector::new(config.reconnect.clone(), config.servers)
            .map_err(|_| ConfigError::Zero("servers or reconnect policy"))?;
        config
            .liveness
            .validate()
            .map_err(|_| ConfigError::Zero("liveness heartbeat below idle timeout"))?;
        reconnect.start(now);
        let limits = DecodeLimits {
            max_frame_size: config.channel.max_frame_size,
            ..DecodeLimits::default()
        };
        Ok(Client {
            channel,
            session: None,
            epoch: 0,
            phase: Phase::Waiting,
            reconnect,
            issued_attempt: None,
            disconnect_due: false,
            requests: Requests::default(),
            scratch: Vec::new(),
            events: VecDeque::new(),
            counters: SessionCounters::default(),
            limits,
            now,
            entropy,
            config,
            store: None,
        })
    }

    /// A client whose session survives a restart of its process through `store`: what a previous
    /// run left there is taken back (the session resumes with its identity, unacknowledged messages
    /// and de-duplication state, and unconsumed messages come out again as
    /// [`SessionEvent::Redelivered`]), and from then on everything that must survive is recorded.
    pub fn with_store(
        config: ClientConfig,
        now: Instant,
        entropy: alloc::boxed::Box<dyn Entropy>,
        mut store: alloc::boxed::Box<dyn Store>,
    ) -> Result<Self, ConfigError> {
        let mut client = Client::new(config, now, entropy)?;
        let recovered = store.recover().and_then(|r| {
            let redelivered = client.channel.restore(&r)?;
            Ok((r.identity, redelivered))
        });
        match recovered {
            Ok((identity, redelivered)) => {
                if let Some(id) = identity {
                    client.session = Some((id.session, id.token));
                    client.epoch = id.epoch;
                }
                client
                    .events
                    .extend(redelivered.into_iter().map(SessionEvent::Redelivered));
                client.channel.record_arrivals();
                client.store = Some(store);
            }
            Err(error) => {
                // A store that cannot be read is not trusted with more: carry on in memory, loudly.
                client = Client::new(client.config, now, client.entropy)?;
                client
                    .events
                    .push_back(SessionEvent::DurabilityLost { error });
            }
        }
        Ok(client)
    }

    /// Records through the store and makes it durable, falling back to memory (with an event) if
    /// it fails.
    fn durable(&mut self, f: impl FnOnce(&mut dyn Store) -> Result<(), StoreError>) {
        self.record(true, f);
    }

    fn record(&mut self, flush: bool, f: impl FnOnce(&mut dyn Store) -> Result<(), StoreError>) {
        let Some(store) = self.store.as_mut() else {
            return;
        };
        let result = f(store.as_mut()).and_then(|()| if flush { store.flush() } else { Ok(()) });
        if let Err(error) = result {
            self.store = None;
            self.events
                .push_back(SessionEvent::DurabilityLost { error });
        }
    }

    /// Records a reliable message the channel accepted.
    fn journal(
        &mut self,
        sent: &Result<Sent, SendError>,
        stream: u64,
        unordered: bool,
        payload: Option<Bytes>,
    ) {
        if let (Ok(sent), Some(payload)) = (sent, payload)
            && let Some(seq) = sent.seq()
        {
            let m = Stored {
                seq,
                stream,
                unordered,
                payload,
            };
            self.durable(|s| s.sent(&m));
        }
    }

    /// The application is done with message `seq` (a [`SessionEvent::Received`] or
    /// [`SessionEvent::Redelivered`]): with a store, it will not be handed out again after a
    /// restart. Without one this does nothing.
    pub fn consumed(&mut self, seq: Seq) {
        // Not flushed on its own: losing it in a crash means one flagged redelivery, not a loss,
        // and the next durability point flushes it anyway.
        if self.store.is_some() {
            self.record(false, |s| s.consumed(seq));
        }
    }

    /// Whether the session is being made durable (a store was given and has not failed).
    pub fn is_durable(&self) -> bool {
        self.store.is_some()
    }

    /// What the adapter must do with its transport now, if anything.
    pub fn poll_directive(&mut self, now: Instant) -> Option<Directive> {
        if core::mem::take(&mut self.disconnect_due) {
            return Some(Directive::Disconnect);
        }
        if !matches!(self.phase, Phase::Waiting) {
            return None;
        }
        let attempt = self.reconnect.next_attempt()?;
        if attempt.at > now || self.issued_attempt == Some(attempt.attempt) {
            return None;
        }
        self.issued_attempt = Some(attempt.attempt);
        self.phase = Phase::Connecting;
        Some(Directive::Connect {
            server: attempt.server,
            attempt: attempt.attempt,
        })
    }

    /// The transport connected: the hello goes out.
    pub fn on_connected(&mut self, now: Instant) {
        let now = self.observe(now);
        if !matches!(self.phase, Phase::Connecting) {
            return;
        }
        self.channel.reset_connection();
        let nonce = self.entropy.next_u64();
        let mut link = Link::new(
            Role::Client,
            self.config.channel.transport,
            Arc::new(self.config.liveness),
            self.limits,
            nonce,
            now,
        );
        // Every attach claims a newer epoch, so a stale copy of this client is refused; a restarted
        // process must not claim the same one again, so it is recorded before the hello goes.
        self.epoch += 1;
        if let Some((session, token)) = self.session {
            let identity = Identity {
                session,
                token,
                epoch: self.epoch,
            };
            self.durable(|s| s.identity(identity));
        }
        link.queue(self.hello(nonce));
        self.phase = Phase::Linked {
            link,
            hello_at: now,
        };
    }

    /// The hello for the current attach (a datagram retry repeats it unchanged).
    fn hello(&self, nonce: u64) -> Frame {
        Frame::Hello(HelloFrame {
            nonce,
            recv_window: self.config.channel.recv_window,
            resume: self.session.map(|(session, token)| Resume {
                session,
                token,
                epoch: self.epoch,
                received: self.channel.receiver().watermark(),
            }),
            credentials: self.config.credentials.clone(),
        })
    }

    /// The connection attempt failed.
    pub fn on_connect_failed(&mut self, now: Instant) {
        let now = self.observe(now);
        if !matches!(self.phase, Phase::Connecting) {
            return;
        }
        self.phase = Phase::Waiting;
        let entropy = self.entropy.next_u64();
        if let Some(g) = self.reconnect.on_connect_failed(now, entropy) {
            self.give_up(g);
        }
    }

    /// The transport closed or reset under the session.
    pub fn on_disconnected(&mut self, now: Instant) {
        self.connection_lost(now, DisconnectCause::TransportClosed);
    }

    fn connection_lost(&mut self, now: Instant, cause: DisconnectCause) {
        let now = self.observe(now);
        if matches!(self.phase, Phase::Closing { .. }) {
            return self.settle_close();
        }
        let was_established = match &self.phase {
            Phase::Linked { link, .. } => link.established,
            Phase::Connecting => false,
            _ => return,
        };
        self.phase = Phase::Waiting;
        self.counters.disconnects += 1;
        if matches!(cause, DisconnectCause::IdleTimeout { .. }) {
            self.counters.idle_timeouts += 1;
        }
        if was_established {
            self.events.push_back(SessionEvent::Disconnected { cause });
        }
        let entropy = self.entropy.next_u64();
        let gave_up = if was_established {
            self.reconnect.on_disconnected(now, entropy)
        } else {
            self.reconnect.on_connect_failed(now, entropy)
        };
        if let Some(g) = gave_up {
            self.give_up(g);
        }
    }

    /// Takes bytes from the transport.
    pub fn handle_input(&mut self, now: Instant, data: Bytes) {
        let now = self.observe(now);
        if let Phase::Closing { link, .. } = &mut self.phase {
            let mut crossed = None;
            link.input(now, data, |_, inc| {
                if let Incoming::Frame(Frame::Close(c)) = inc {
                    crossed = Some(c);
                }
            });
            if let Some(c) = crossed
                && let Phase::Closing { link, held } =
                    core::mem::replace(&mut self.phase, Phase::Over)
            {
                self.events
                    .push_back(held.crossed(c.code, c.reason, link.arbiter()));
                self.disconnect_due = true;
            }
            return;
        }
        let Phase::Linked { link, .. } = &mut self.phase else {
            return;
        };
        // Decoded frames wait here while the link is borrowed; the buffer is kept between calls so
        // the input path does not allocate.
        let mut frames = core::mem::take(&mut self.scratch);
        let malformed = link.malformed();
        // Data frames go straight to the channel, and their events straight into the session's
        // queue, while nothing waits in `frames` before them. Only without a store: with one, an
        // ack is made durable before the application hears of it (`drain_channel`).
        let fast = self.store.is_none();
        let (channel, events, requests) = (&mut self.channel, &mut self.events, &mut self.requests);
        link.input(now, data, |link, inc| match inc {
            Incoming::Data(d) if fast && link.established && frames.is_empty() => {
                channel.handle_data_into(now, d, &mut SessionSink::new(&mut *events, requests));
            }
            other => frames.push(other),
        });
        self.counters.malformed_datagrams += link.malformed() - malformed;
        for inc in frames.drain(..) {
            match inc {
                Incoming::Data(d) => self.on_frame(now, Frame::Data(d)),
                Incoming::Frame(frame) => self.on_frame(now, frame),
                Incoming::Broken(e) => {
                    self.disconnect_due = true;
                    self.connection_lost(now, DisconnectCause::Decode(e));
                }
            }
            if !matches!(self.phase, Phase::Linked { .. }) {
                break;
            }
        }
        self.scratch = frames;
        self.record_arrivals();
        self.drain_channel();
    }

    /// Records what arrived before any ack of it can leave (acks are written by `poll_transmit`).
    fn record_arrivals(&mut self) {
        if self.store.is_none() {
            return;
        }
        let arrivals = self.channel.take_arrivals();
        if arrivals.is_empty() {
            return;
        }
        self.durable(|s| {
            for m in &arrivals {
                s.arrived(m)?;
                // A reply goes to its request, which does not outlive the process: nothing to
                // hand out again.
                if m.stream >= REPLY_STREAM {
                    s.consumed(m.seq)?;
                }
            }
            Ok(())
        });
    }

    fn on_frame(&mut self, now: Instant, frame: Frame) {
        let Phase::Linked { link, .. } = &mut self.phase else {
            return;
        };
        match frame {
            Frame::Refuse(r) if RefuseCode::from_wire(r.code) == RefuseCode::NotAttached => {
                // The server forgot this connection, not necessarily the session: resume anew.
                self.disconnect_due = true;
                self.connection_lost(now, DisconnectCause::NotAttached);
            }
            Frame::Welcome(w) if !link.established => self.on_welcome(now, w),
            Frame::Refuse(r) if !link.established => {
                let code = RefuseCode::from_wire(r.code);
                let reason = match code {
                    RefuseCode::UnknownSession => LostReason::Expired,
                    RefuseCode::StaleEpoch => LostReason::StaleEpoch {
                        claimed: self.epoch,
                        current: r.epoch,
                    },
                    _ => LostReason::Refused {
                        code,
                        reason: r.reason,
                    },
                };
                self.disconnect_due = true;
                self.lose(reason);
            }
            Frame::Hello(_) | Frame::Welcome(_) | Frame::Refuse(_) => {}
            // Data before the welcome (a reordered datagram) would be judged against a stale view.
            other if link.established => self.channel.handle_frame(now, other),
            _ => {}
        }
    }

    fn on_welcome(&mut self, now: Instant, w: WelcomeFrame) {
        let Phase::Linked { link, .. } = &mut self.phase else {
            return;
        };
        if let Some((id, _)) = self.session
            && (id != w.session || !w.resumed)
        {
            // The server answered a resume with a different or fresh session: ours is gone.
            self.disconnect_due = true;
            self.lose(LostReason::Expired);
            return;
        }
        link.establish(w.nonce);
        self.session = Some((w.session, w.token));
        self.epoch = self.epoch.max(w.epoch);
        let identity = Identity {
            session: w.session,
            token: w.token,
            epoch: self.epoch,
        };
        self.durable(|s| s.identity(identity));
        self.channel
            .sender_mut()
            .set_in_flight_limit(self.config.channel.in_flight_limit(w.recv_window));
        self.reconnect.on_connected(now);
        self.issued_attempt = None;
        match self.channel.resume(now, w.received) {
            Ok(retransmitted) => {
                self.counters.connects += 1;
                if w.resumed {
                    self.counters.resumes += 1;
                }
                self.counters.resent_on_resume += retransmitted;
                self.events.push_back(SessionEvent::Connected {
                    session: w.session,
                    resumed: w.resumed,
                    epoch: w.epoch,
                    retransmitted,
                });
            }
            Err(e) => {
                self.disconnect_due = true;
                self.lose(LostReason::Violation(crate::ProtocolError::AckOfUnsent(e)));
            }
        }
    }

    /// Lets time pass.
    pub fn handle_timeout(&mut self, now: Instant) {
        let now = self.observe(now);
        match &self.phase {
            Phase::Over => return,
            Phase::Closing { held, .. } if now >= held.deadline => return self.settle_close(),
            Phase::Closing { .. } => return,
            _ => {}
        }
        for seq in self.requests.expire(now) {
            self.counters.request_timeouts += 1;
            self.events.push_back(SessionEvent::RequestTimedOut { seq });
        }
        if let Phase::Linked { link, hello_at } = &mut self.phase {
            let stalls = link.liveness.stalls();
            let verdict = link.on_timeout(now);
            self.counters.stalls += link.liveness.stalls() - stalls;
            if let Verdict::Dead { silent_for } = verdict {
                self.disconnect_due = true;
                self.connection_lost(now, DisconnectCause::IdleTimeout { silent_for });
                return;
            }
            // A lost hello on a datagram transport is sent again.
            if !link.established
                && self.config.channel.transport == crate::Transport::Datagram
                && now - *hello_at >= self.config.hello_retry
            {
                *hello_at = now;
                let nonce = link.local_nonce;
                let hello = self.hello(nonce);
                if let Phase::Linked { link, .. } = &mut self.phase {
                    link.queue(hello);
                }
            }
        }
        self.channel.handle_timeout(now);
        self.drain_channel();
    }

    /// Writes the next transmission into `buf`; `None` when there is nothing to send.
    pub fn poll_transmit(&mut self, now: Instant, buf: &mut BytesMut) -> Option<usize> {
        let now = self.observe(now);
        let budget = self.config.channel.max_batch_bytes;
        let n = match &mut self.phase {
            Phase::Linked { link, .. } => link.transmit(now, Some(&mut self.channel), buf, budget),
            Phase::Closing { link, .. } => link.transmit(now, Some(&mut self.channel), buf, budget),
            _ => 0,
        };
        (n > 0).then_some(n)
    }

    /// Moves every queued event to the back of `into`, oldest first: [`Client::poll_event`] for
    /// all of them, in one bulk move where no store must hear of the session's end.
    pub fn take_events(&mut self, into: &mut VecDeque<SessionEvent>) {
        if self.store.is_none() {
            return crate::queue::move_all(&mut self.events, into);
        }
        while let Some(e) = self.poll_event() {
            into.push_back(e);
        }
    }

    /// Moves up to `max` of the oldest events to the back of `into`: [`Client::poll_event`] for
    /// each, in one bulk move. Returns how many it moved.
    pub fn poll_events(&mut self, into: &mut Vec<SessionEvent>, max: usize) -> usize {
        let start = into.len();
        let n = crate::queue::drain_front(&mut self.events, into, max);
        if self.store.is_some() && into[start..].iter().any(SessionEvent::ends_session) {
            self.clear_store();
        }
        n
    }

    /// The queue itself, for the driver: it acts on new events where they stand (answers awaited
    /// requests), and the application takes the rest straight from here, so that an event is not
    /// moved from queue to queue on its way.
    #[cfg(feature = "driver")]
    pub(crate) fn events_mut(&mut self) -> &mut VecDeque<SessionEvent> {
        &mut self.events
    }

    /// The driver saw the session's last event queued: the store is cleared now, not once the
    /// application takes that event (which it may never do).
    #[cfg(feature = "driver")]
    pub(crate) fn session_ended(&mut self) {
        self.clear_store();
    }

    /// The next event for the application.
    // Inlined, the event is read from the queue where the caller wants it (see
    // `Channel::poll_event`).
    #[inline]
    pub fn poll_event(&mut self) -> Option<SessionEvent> {
        let event = self.events.pop_front()?;
        if self.store.is_some() && event.ends_session() {
            self.clear_store();
        }
        Some(event)
    }

    /// The session is over: nothing in its store will be needed again; a failure here costs
    /// nothing the event lacks.
    #[cold]
    fn clear_store(&mut self) {
        if let Some(mut store) = self.store.take() {
            let _ = store.clear().and_then(|()| store.flush());
        }
    }

    /// When [`Client::handle_timeout`] or [`Client::poll_directive`] next has work to do.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let link = match &self.phase {
            Phase::Over => return None,
            Phase::Closing { held, link } => return earliest(Some(held.deadline), link.deadline()),
            Phase::Waiting => self.reconnect.deadline(),
            Phase::Connecting => None,
            Phase::Linked { link, hello_at } => {
                let retry = (!link.established
                    && self.config.channel.transport == crate::Transport::Datagram)
                    .then(|| *hello_at + self.config.hello_retry);
                earliest(retry, link.next_wake(Some(&self.channel)))
            }
        };
        earliest(link, self.requests.deadline())
    }

    /// Sends `payload` on `stream` (below [`REPLY_STREAM`]) with delivery `mode`. Reliable messages
    /// are queued while disconnected and resent on resume; unreliable ones are dropped then.
    pub fn send(&mut self, stream: u64, mode: Mode, payload: Bytes) -> Result<Sent, SendError> {
        if stream >= REPLY_STREAM {
            return Err(SendError::InvalidStream(payload));
        }
        if matches!(self.phase, Phase::Over) {
            return Err(SendError::Closed(payload));
        }
        if mode == Mode::Unreliable && !self.is_connected() {
            return Ok(Sent::Unreliable);
        }
        if self.store.is_none() {
            return self.channel.send_on(stream, mode, payload);
        }
        let kept = payload.clone();
        let sent = self.channel.send_on(stream, mode, payload);
        self.journal(&sent, stream, mode == Mode::Unordered, Some(kept));
        sent
    }

    /// Sends a reliable ordered request; a [`SessionEvent::Reply`] or, after `deadline`, a
    /// [`SessionEvent::RequestTimedOut`] follows.
    pub fn request(
        &mut self,
        stream: u64,
        payload: Bytes,
        deadline: Instant,
    ) -> Result<Seq, SendError> {
        if self.requests.len() >= self.config.max_pending_requests {
            return Err(SendError::QueueFull(payload));
        }
        let seq = self
            .send(stream, Mode::Ordered, payload)?
            .seq()
            .unwrap_or_default();
        self.requests.insert(seq, deadline);
        Ok(seq)
    }

    /// Replies to the peer's message `to`: reliable, ordered, de-duplicated, and it survives
    /// reconnects like any message.
    pub fn reply(&mut self, to: Seq, payload: Bytes) -> Result<Seq, SendError> {
        if matches!(self.phase, Phase::Over) {
            return Err(SendError::Closed(payload));
        }
        let stream = REPLY_STREAM.saturating_add(to);
        let kept = self.store.is_some().then(|| payload.clone());
        let sent = self.channel.send_on(stream, Mode::Ordered, payload);
        self.journal(&sent, stream, false, kept);
        sent.map(|s| s.seq().unwrap_or_default())
    }

    /// Closes the session: the server is told, [`SessionEvent::Closed`] follows with the
    /// unacknowledged messages.
    pub fn close(&mut self, code: u64, reason: Bytes) {
        if matches!(self.phase, Phase::Over) {
            return;
        }
        self.channel.close(code, reason);
        self.drain_channel();
    }

    /// Whether a connection currently carries the session.
    pub fn is_connected(&self) -> bool {
        matches!(&self.phase, Phase::Linked { link, .. } if link.established)
    }

    /// The session, once the server has named it.
    pub fn session(&self) -> Option<SessionId> {
        self.session.map(|(id, _)| id)
    }

    /// The highest attach epoch claimed.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The session's identity (id, resume token, highest epoch claimed), for a durable store.
    pub fn identity(&self) -> Option<(SessionId, Token, u64)> {
        self.session.map(|(id, token)| (id, token, self.epoch))
    }

    /// The arbiter agreed on the current connection.
    pub fn arbiter(&self) -> Option<Arbiter> {
        match &self.phase {
            Phase::Linked { link, .. } => link.arbiter(),
            _ => None,
        }
    }

    /// The session's counters.
    pub fn counters(&self) -> &SessionCounters {
        &self.counters
    }

    /// The reliable channel, for inspection.
    pub fn channel(&self) -> &Channel {
        &self.channel
    }

    /// The reconnect state, for inspection.
    pub fn reconnector(&self) -> &Reconnector {
        &self.reconnect
    }

    /// Hands the channel's events to the application; when the channel ends, so does the session
    /// (keeping the link long enough for a close frame to go out).
    fn drain_channel(&mut self) {
        while let Some(e) = self.channel.poll_event() {
            if let Event::Acknowledged { below } = e {
                // Durable before the application hears of it: a store that forgot the ack in a
                // power loss would hand these back in a later SessionLost as if never delivered.
                self.durable(|s| s.acknowledged(below));
            }
            if !matches!(e, Event::Closed { .. }) {
                let ev = session_event(e, &mut self.requests);
                self.events.push_back(ev);
                continue;
            }
            self.phase = match core::mem::replace(&mut self.phase, Phase::Over) {
                // A local close on a live connection waits to see whether the peer closed too.
                Phase::Linked { link, .. } if link.established => {
                    match HeldClose::hold(e, self.now) {
                        Ok(held) => Phase::Closing { link, held },
                        Err(e) => {
                            let ev = session_event(e, &mut self.requests);
                            self.events.push_back(ev);
                            self.disconnect_due = true;
                            Phase::Over
                        }
                    }
                }
                Phase::Linked { .. } => {
                    let ev = session_event(e, &mut self.requests);
                    self.events.push_back(ev);
                    self.disconnect_due = true;
                    Phase::Over
                }
                _ => {
                    let ev = session_event(e, &mut self.requests);
                    self.events.push_back(ev);
                    Phase::Over
                }
            };
        }
    }

    fn lose(&mut self, reason: LostReason) {
        // Whatever the channel already delivered reaches the application first.
        self.drain_channel();
        if matches!(self.phase, Phase::Over | Phase::Closing { .. }) {
            return;
        }
        let unacknowledged = self.channel.abandon();
        self.events.push_back(SessionEvent::SessionLost {
            reason,
            unacknowledged,
        });
        self.phase = Phase::Over;
    }

    fn settle_close(&mut self) {
        if let Phase::Closing { held, .. } = core::mem::replace(&mut self.phase, Phase::Over) {
            self.events.push_back(held.settle());
            self.disconnect_due = true;
        }
    }

    fn give_up(&mut self, g: GaveUp) {
        self.lose(LostReason::GaveUp(g));
    }

    fn observe(&mut self, now: Instant) -> Instant {
        self.now = self.now.max(now);
        self.now
    }
}
