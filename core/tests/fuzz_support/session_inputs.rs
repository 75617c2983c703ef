//! `session_inputs`: one server, one honest client wired to it, and hostile connections, driven by
//! an arbitrary sequence of steps — bytes to the client, bytes to the server on hostile connection
//! k, time passing, connections opening, closing and resetting, sends and closes.
//!
//! After every step: nothing panicked; every `poll_*` loop ended; no deadline is left in the past;
//! the server holds at most `max_sessions` sessions and `max_pending_handshakes` connections
//! beyond one per session; every channel is within its configured queue, window and reorder
//! bounds; no message is delivered twice; live heap bytes (when the host counts them) stay under
//! [`memory_bound`]. At the end the network heals: the honest client must either be serving its
//! session again (a round trip each way), or have been told the session ended.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use arbitrary::Arbitrary;
use bytes::{Bytes, BytesMut};
use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::SeedableRng;
use steadfast_core::client::{Client, ClientConfig, Directive};
use steadfast_core::config::RECV_RANGES;
use steadfast_core::frame::{
    AckFrame, AckRanges, CloseFrame, DataFrame, Frame, HelloFrame, RefuseFrame, UnreliableFrame,
    WelcomeFrame,
};
use steadfast_core::framing;
use steadfast_core::identity::{Resume, SessionId, Token};
use steadfast_core::server::{ConnId, Server, ServerConfig, ServerEvent};
use steadfast_core::session::SessionEvent;
use steadfast_core::time::{Duration, Instant};
use steadfast_core::{Channel, Config, Mode, Transport, varint};

use super::{Violation, ensure};

/// One fuzz case.
#[derive(Debug, Clone, Arbitrary)]
pub struct SessionInput {
    /// Datagram transport (else stream).
    pub datagram: bool,
    /// What happens, in order.
    pub steps: Vec<Step>,
}

/// One thing that happens.
#[derive(Debug, Clone, Arbitrary)]
pub enum Step {
    /// Bytes arrive at the honest client as if from its server (a spoofing or broken server).
    ToClient(Payload),
    /// Bytes arrive at the server on hostile connection `k % 8`, opened first if need be.
    ToServer(u8, Payload),
    /// Hostile connection `k % 8` opens.
    Open(u8),
    /// Hostile connection `k % 8` closes.
    Close(u8),
    /// Time passes (milliseconds); the honest wire delivers as it goes.
    Wait(u16),
    /// Everything in flight on the honest wire arrives.
    Deliver,
    /// The honest connection resets; both ends are told.
    Reset,
    /// Whether the honest client's connection attempts succeed.
    Reachable(bool),
    /// The honest wire silently drops everything (both ways).
    Blackhole(bool),
    /// The client sends a message of `n % 64` bytes.
    ClientSend(u8),
    /// The server sends a message of `n % 64` bytes to the honest session.
    ServerSend(u8),
    /// The client application closes the session.
    ClientClose,
    /// The server application closes the honest session.
    ServerClose,
}

/// Bytes a peer sends.
#[derive(Debug, Clone, Arbitrary)]
pub enum Payload {
    /// Anything.
    Raw(Vec<u8>),
    /// Well-formed frames (each its own datagram, or length-prefixed after an optional preface).
    Frames {
        /// Start with the stream preface.
        preface: bool,
        /// The frames.
        frames: Vec<FrameSpec>,
    },
}

/// A frame, with fields drawn where they matter: near the honest session's numbers.
#[derive(Debug, Clone, Arbitrary)]
pub enum FrameSpec {
    /// A hello, new or resuming.
    Hello {
        /// Its nonce.
        nonce: u64,
        /// The window it advertises (any size, up to the varint maximum).
        recv_window: u64,
        /// A resume, if any.
        resume: Option<ResumeSpec>,
        /// Credentials.
        credentials: Vec<u8>,
    },
    /// A welcome (only a client should get one).
    Welcome {
        /// Its nonce.
        nonce: u64,
        /// The honest session or another.
        session: Pick,
        /// The honest token, one byte off it, or another.
        token: TokenPick,
        /// Epoch.
        epoch: u8,
        /// Resumed flag.
        resumed: bool,
        /// What it claims to have received.
        received: u16,
        /// The window it advertises.
        recv_window: u64,
    },
    /// A refusal.
    Refuse {
        /// Code.
        code: u8,
        /// Epoch.
        epoch: u8,
    },
    /// Data.
    Data {
        /// Stream.
        stream: u8,
        /// Sequence number: small, or anywhere.
        seq: Num,
        /// Piggy-backed ack.
        ack: Option<Num>,
        /// Unordered flag.
        unordered: bool,
        /// Payload length.
        len: u8,
    },
    /// An ack, possibly of what was never sent.
    Ack {
        /// Cumulative point.
        cumulative: Num,
        /// (gap, length) pairs above it.
        ranges: Vec<(u8, u8)>,
    },
    /// A ping.
    Ping(u64),
    /// A pong.
    Pong(u64),
    /// A close.
    Close(u8),
    /// An unreliable message.
    Unreliable {
        /// Stream.
        stream: u8,
        /// Its number.
        seq: Num,
        /// Sequenced flag.
        sequenced: bool,
        /// Payload length.
        len: u8,
    },
}

/// A resume's fields.
#[derive(Debug, Clone, Arbitrary)]
pub struct ResumeSpec {
    /// Which session.
    pub session: Pick,
    /// Which token.
    pub token: TokenPick,
    /// The epoch claimed.
    pub epoch: u8,
    /// What it claims to have received.
    pub received: Num,
}

/// A session id: the honest client's (as far as it knows it) or any.
#[derive(Debug, Clone, Copy, Arbitrary)]
pub enum Pick {
    /// The honest session.
    Honest,
    /// Another id.
    Other(u64),
}

/// A token: the honest one, the honest one with byte `i % 16` flipped, or any.
#[derive(Debug, Clone, Copy, Arbitrary)]
pub enum TokenPick {
    /// The honest session's token (a peer that stole it).
    Honest,
    /// One byte off the honest token.
    Flip(u8),
    /// Any bytes.
    Other([u8; 16]),
}

/// A sequence number: near the start, where sessions are, or anywhere in the varint range.
#[derive(Debug, Clone, Copy, Arbitrary)]
pub enum Num {
    /// `0..=255`.
    Small(u8),
    /// Anything (masked to the varint range).
    Any(u64),
}

impl Num {
    fn get(self) -> u64 {
        match self {
            Num::Small(n) => u64::from(n),
            Num::Any(n) => n & varint::MAX,
        }
    }
}

/// Hostile connection slots.
const HOSTILE: usize = 8;

/// Caps that turn a spinning loop into a failure instead of a hung fuzzer.
const MAX_POLLS: usize = 10_000;
const MAX_ITERATIONS: usize = 200_000;

/// The configuration under test: small bounds, so that inputs reach them.
pub fn configs(datagram: bool) -> (ServerConfig, ClientConfig) {
    let transport = if datagram {
        Transport::Datagram
    } else {
        Transport::Stream
    };
    let mut c = Config::new(transport);
    c.max_queued_messages = 16;
    c.max_queued_bytes = 2048;
    c.max_in_flight = 16;
    c.recv_window = 32;
    c.max_reorder_bytes = 1024;
    c.max_frame_size = 2048;
    c.max_unreliable_queued = 8;
    c.max_unreliable_bytes = 512;
    c.max_batch_bytes = 4096;
    let mut s = ServerConfig::new(c.clone());
    s.max_sessions = 4;
    s.max_pending_handshakes = 3;
    s.handshake_timeout = Duration::from_secs(2);
    s.retention = Duration::from_secs(5);
    s.max_pending_requests = 8;
    (s, ClientConfig::new(c, 1))
}

/// Live heap bytes the whole case may hold: the server's and client's state at their configured
/// bounds, plus the harness's own.
///
/// Per connection: a stream decoder's bound (see `decode_alloc_bound.rs`: 4 × (frame + prefix) +
/// 2 × one read, a read here being at most `max_input` bytes) and 4 KiB of fixed state. Per
/// session: twice its largest queue bound in bytes (payloads plus per-message overhead), its
/// reorder bound, and 16 KiB of fixed state. Connections: `max_pending_handshakes` + one per
/// session + the honest client's + hostile ones closing; sessions: `max_sessions` + the client.
pub fn memory_bound(server: &ServerConfig, max_input: usize) -> usize {
    let c = &server.channel;
    let per_conn = 4 * (c.max_frame_size + 8) + 2 * max_input + 4096;
    let queued = c.max_queued_bytes.max(server.disconnected_max_queued_bytes);
    let per_session = 2 * queued + c.max_reorder_bytes + c.max_unreliable_bytes + 16 * 1024;
    let conns = server.max_pending_handshakes + server.max_sessions + 1 + HOSTILE;
    let sessions = server.max_sessions + 1;
    let harness = 64 * 1024 + 4 * max_input;
    conns * per_conn + sessions * per_session + harness
}

/// What a case did, so smoke runs can show they reached the interesting places.
#[derive(Debug, Default, Clone, Copy)]
pub struct SessionOutcome {
    /// The honest client was connected at some point.
    pub connected: bool,
    /// Messages delivered (both ends).
    pub delivered: usize,
    /// Wrong-token resumes the server refused.
    pub refused_tokens: u64,
    /// The final round trip ran (the session was still up and nobody spoofed the client's server).
    pub round_trip: bool,
    /// Peak live heap bytes, if counted.
    pub peak_live: isize,
}

enum Msg {
    Bytes(Bytes),
    Close,
}

struct World<'a> {
    server: Server,
    client: Client,
    server_config: ServerConfig,
    now: Instant,
    datagram: bool,
    honest: Option<ConnId>,
    to_server: VecDeque<(ConnId, Msg)>,
    to_client: VecDeque<(ConnId, Msg)>,
    hostile: [Option<ConnId>; HOSTILE],
    next_conn: ConnId,
    server_open: BTreeSet<ConnId>,
    reachable: bool,
    blackholed: bool,
    /// Stream connections that lost bytes in a blackhole: TCP never delivers a stream with a hole
    /// in it, so nothing more passes on them once the blackhole lifts (only a new connection
    /// recovers), as the chaos proxy's faults behave.
    holed: BTreeSet<ConnId>,
    /// Bytes were injected into the client's stream: its server's word can no longer be trusted.
    injected: bool,
    client_over: bool,
    client_seen: BTreeSet<u64>,
    server_seen: BTreeMap<SessionId, BTreeSet<u64>>,
    server_ended: BTreeSet<SessionId>,
    /// Payloads received at each end (for the final round trip).
    client_got: Vec<Bytes>,
    server_got: Vec<Bytes>,
    buf: BytesMut,
    live: Option<&'a dyn Fn() -> isize>,
    bound: usize,
    out: SessionOutcome,
}

/// Runs one case; `live` reports live heap bytes since the case started, if the host counts them.
pub fn run(
    input: &SessionInput,
    live: Option<&dyn Fn() -> isize>,
) -> Result<SessionOutcome, Violation> {
    let (server_config, client_config) = configs(input.datagram);
    let now = Instant::ZERO;
    let max_input = input_bytes(input).max(4096);
    let mut w = World {
        server: Server::new(
            server_config.clone(),
            now,
            Box::new(ChaCha8Rng::seed_from_u64(1)),
        )
        .expect("valid server config"),
        client: Client::new(client_config, now, Box::new(ChaCha8Rng::seed_from_u64(2)))
            .expect("valid client config"),
        bound: memory_bound(&server_config, max_input),
        server_config,
        now,
        datagram: input.datagram,
        honest: None,
        to_server: VecDeque::new(),
        to_client: VecDeque::new(),
        hostile: [None; HOSTILE],
        next_conn: 1,
        server_open: BTreeSet::new(),
        reachable: true,
        blackholed: false,
        holed: BTreeSet::new(),
        injected: false,
        client_over: false,
        client_seen: BTreeSet::new(),
        server_seen: BTreeMap::new(),
        server_ended: BTreeSet::new(),
        client_got: Vec::new(),
        server_got: Vec::new(),
        buf: BytesMut::new(),
        live,
        out: SessionOutcome::default(),
    };
    w.settle()?;
    for (i, step) in input.steps.iter().enumerate() {
        w.step(step)
            .and_then(|()| w.settle())
            .and_then(|()| w.check())
            .map_err(|v| Violation(format!("step {i} ({step:?}): {v}")))?;
    }
    w.finish().map_err(|v| Violation(format!("end: {v}")))?;
    w.out.refused_tokens = w.server.refused_tokens();
    Ok(w.out)
}

/// The most bytes any one step hands over at once.
fn input_bytes(input: &SessionInput) -> usize {
    input
        .steps
        .iter()
        .map(|s| match s {
            Step::ToClient(p) | Step::ToServer(_, p) => match p {
                Payload::Raw(b) => b.len(),
                Payload::Frames { frames, .. } => frames.len() * (64 + 255 + 8 * 16),
            },
            _ => 0,
        })
        .max()
        .unwrap_or(0)
}

impl World<'_> {
    fn step(&mut self, step: &Step) -> Result<(), Violation> {
        let now = self.now;
        match step {
            Step::ToClient(p) => {
                self.injected = true;
                for chunk in self.encode(p) {
                    self.client.handle_input(now, chunk);
                }
            }
            Step::ToServer(k, p) => {
                let conn = self.open(usize::from(*k) % HOSTILE);
                for chunk in self.encode(p) {
                    self.server.handle_input(now, conn, chunk);
                }
            }
            Step::Open(k) => {
                self.open(usize::from(*k) % HOSTILE);
            }
            Step::Close(k) => {
                if let Some(conn) = self.hostile[usize::from(*k) % HOSTILE].take() {
                    self.server_open.remove(&conn);
                    self.server.on_disconnected(now, conn);
                }
            }
            Step::Wait(ms) => self.advance(now + Duration::from_millis(u64::from(*ms)))?,
            Step::Deliver => {
                self.deliver()?;
            }
            Step::Reset => {
                if let Some(conn) = self.honest.take() {
                    self.to_server.retain(|(c, _)| *c != conn);
                    self.to_client.retain(|(c, _)| *c != conn);
                    if self.server_open.remove(&conn) {
                        self.server.on_disconnected(now, conn);
                    }
                    self.client.on_disconnected(now);
                }
            }
            Step::Reachable(r) => self.reachable = *r,
            Step::Blackhole(b) => self.blackholed = *b,
            Step::ClientSend(n) => {
                let mode = [Mode::Ordered, Mode::Unordered, Mode::Unreliable][usize::from(*n) % 3];
                let _ = self.client.send(0, mode, payload(*n));
            }
            Step::ServerSend(n) => {
                if let Some(id) = self.client.session() {
                    let _ = self.server.send(id, 0, Mode::Ordered, payload(*n));
                }
            }
            Step::ClientClose => self.client.close(0, Bytes::from_static(b"bye")),
            Step::ServerClose => {
                if let Some(id) = self.client.session() {
                    self.server.close_session(id, 0, Bytes::from_static(b"bye"));
                }
            }
        }
        self.pump()
    }

    /// Hostile connection `k`, opened if it is not.
    fn open(&mut self, k: usize) -> ConnId {
        if let Some(conn) = self.hostile[k] {
            return conn;
        }
        let conn = self.new_conn();
        self.hostile[k] = Some(conn);
        self.server.on_connection(self.now, conn);
        conn
    }

    fn new_conn(&mut self) -> ConnId {
        let conn = self.next_conn;
        self.next_conn += 1;
        self.server_open.insert(conn);
        conn
    }

    fn is_hostile(&self, conn: ConnId) -> bool {
        self.hostile.contains(&Some(conn))
    }

    /// The chunks `p` arrives as.
    fn encode(&self, p: &Payload) -> Vec<Bytes> {
        match p {
            Payload::Raw(b) => vec![Bytes::copy_from_slice(b)],
            Payload::Frames { preface, frames } => {
                let mut chunks = Vec::new();
                let mut wire = BytesMut::new();
                if *preface && !self.datagram {
                    framing::encode_preface(&mut wire);
                }
                for spec in frames {
                    let f = self.frame(spec);
                    if self.datagram {
                        let mut d = BytesMut::new();
                        framing::encode_datagram(&f, &mut d);
                        chunks.push(d.freeze());
                    } else {
                        framing::encode_stream_frame(&f, &mut wire);
                    }
                }
                if !self.datagram {
                    chunks.push(wire.freeze());
                }
                chunks
            }
        }
    }

    fn frame(&self, spec: &FrameSpec) -> Frame {
        frame_of(
            spec,
            self.client.identity().map(|(id, token, _)| (id, token)),
        )
    }

    /// Drains every endpoint output until nothing moves: directives, transmits, events.
    fn pump(&mut self) -> Result<(), Violation> {
        for _ in 0..MAX_POLLS {
            let mut moved = false;
            let now = self.now;
            let mut polls = 0;
            while let Some(d) = self.client.poll_directive(now) {
                polls += 1;
                ensure(polls < MAX_POLLS, || "poll_directive does not end".into())?;
                moved = true;
                match d {
                    Directive::Connect { .. } if self.reachable => {
                        let conn = self.new_conn();
                        self.honest = Some(conn);
                        self.server.on_connection(now, conn);
                        self.client.on_connected(now);
                    }
                    Directive::Connect { .. } => self.client.on_connect_failed(now),
                    Directive::Disconnect => {
                        if let Some(conn) = self.honest.take() {
                            self.to_server.push_back((conn, Msg::Close));
                        }
                    }
                    _ => {}
                }
            }
            polls = 0;
            while let Some(n) = self.client.poll_transmit(now, &mut self.buf) {
                polls += 1;
                ensure(polls < MAX_POLLS, || {
                    "client poll_transmit does not end".into()
                })?;
                moved = true;
                let bytes = self.buf.split_to(n).freeze();
                if let Some(conn) = self.honest {
                    if self.blackholed && !self.datagram {
                        self.holed.insert(conn);
                    }
                    if !self.blackholed && !self.holed.contains(&conn) {
                        self.to_server.push_back((conn, Msg::Bytes(bytes)));
                    }
                }
            }
            polls = 0;
            while let Some(t) = self.server.poll_transmit(now, &mut self.buf) {
                polls += 1;
                ensure(polls < MAX_POLLS, || {
                    "server poll_transmit does not end".into()
                })?;
                moved = true;
                let bytes = self.buf.split_to(t.len).freeze();
                ensure(self.server_open.contains(&t.conn), || {
                    format!(
                        "server wrote to connection {} it was told is closed",
                        t.conn
                    )
                })?;
                let hostile = self.is_hostile(t.conn);
                if !hostile && self.blackholed && !self.datagram && !bytes.is_empty() {
                    self.holed.insert(t.conn);
                }
                if !hostile
                    && !self.blackholed
                    && !self.holed.contains(&t.conn)
                    && !bytes.is_empty()
                {
                    self.to_client.push_back((t.conn, Msg::Bytes(bytes)));
                }
                if t.close {
                    self.server_open.remove(&t.conn);
                    if hostile {
                        for h in &mut self.hostile {
                            if *h == Some(t.conn) {
                                *h = None;
                            }
                        }
                    } else {
                        self.to_client.push_back((t.conn, Msg::Close));
                    }
                }
            }
            polls = 0;
            while let Some(e) = self.server.poll_event() {
                polls += 1;
                ensure(polls < MAX_POLLS, || {
                    "server poll_event does not end".into()
                })?;
                moved = true;
                self.on_server_event(e)?;
            }
            polls = 0;
            while let Some(e) = self.client.poll_event() {
                polls += 1;
                ensure(polls < MAX_POLLS, || {
                    "client poll_event does not end".into()
                })?;
                moved = true;
                self.on_client_event(e)?;
            }
            if !moved {
                return Ok(());
            }
        }
        Err(Violation(
            "the endpoints never stop producing output".into(),
        ))
    }

    fn on_server_event(&mut self, e: ServerEvent) -> Result<(), Violation> {
        let ServerEvent::Session { session, event } = e else {
            return Ok(());
        };
        ensure(!self.server_ended.contains(&session), || {
            format!("event {event:?} for session {session} after its end")
        })?;
        match event {
            SessionEvent::Received(m) => {
                self.out.delivered += 1;
                let fresh = self.server_seen.entry(session).or_default().insert(m.seq);
                ensure(fresh, || {
                    format!("server got seq {} twice on {session}", m.seq)
                })?;
                self.server_got.push(m.payload);
            }
            SessionEvent::SessionLost { .. } | SessionEvent::Closed { .. } => {
                self.server_ended.insert(session);
            }
            _ => {}
        }
        Ok(())
    }

    fn on_client_event(&mut self, e: SessionEvent) -> Result<(), Violation> {
        ensure(!self.client_over, || {
            format!("client event {e:?} after its end")
        })?;
        match e {
            SessionEvent::Received(m) => {
                self.out.delivered += 1;
                self.client.consumed(m.seq);
                let fresh = self.client_seen.insert(m.seq);
                ensure(fresh, || format!("client got seq {} twice", m.seq))?;
                self.client_got.push(m.payload);
            }
            SessionEvent::Connected { .. } => self.out.connected = true,
            SessionEvent::SessionLost { .. } | SessionEvent::Closed { .. } => {
                self.client_over = true;
            }
            _ => {}
        }
        Ok(())
    }

    /// Delivers everything in flight on the honest wire (and what that provokes); returns how
    /// much it delivered.
    fn deliver(&mut self) -> Result<usize, Violation> {
        let mut n = 0;
        loop {
            let now = self.now;
            let next = match self.to_server.pop_front() {
                Some((conn, m)) => {
                    if self.server_open.contains(&conn) {
                        match m {
                            Msg::Bytes(b) => self.server.handle_input(now, conn, b),
                            Msg::Close => {
                                self.server_open.remove(&conn);
                                self.server.on_disconnected(now, conn);
                            }
                        }
                    }
                    true
                }
                None => match self.to_client.pop_front() {
                    Some((conn, m)) => {
                        if self.honest == Some(conn) {
                            match m {
                                Msg::Bytes(b) => self.client.handle_input(now, b),
                                Msg::Close => {
                                    self.honest = None;
                                    self.client.on_disconnected(now);
                                }
                            }
                        }
                        true
                    }
                    None => false,
                },
            };
            if !next {
                return Ok(n);
            }
            n += 1;
            ensure(n < MAX_ITERATIONS, || {
                "the honest wire never goes quiet".into()
            })?;
            self.pump()?;
        }
    }

    /// Lets time pass until `target`, firing every timer due on the way in order.
    fn advance(&mut self, target: Instant) -> Result<(), Violation> {
        let mut same_instant = 0;
        for _ in 0..MAX_ITERATIONS {
            if self.deliver()? > 0 {
                continue;
            }
            let next = [self.server.poll_timeout(), self.client.poll_timeout()]
                .into_iter()
                .flatten()
                .min();
            match next {
                Some(t) if t <= target => {
                    if t <= self.now {
                        same_instant += 1;
                        ensure(same_instant < 64, || {
                            format!("a deadline stays at {t:?}, not after now {:?}", self.now)
                        })?;
                    } else {
                        same_instant = 0;
                    }
                    self.now = self.now.max(t);
                    let now = self.now;
                    self.server.handle_timeout(now);
                    self.client.handle_timeout(now);
                    self.pump()?;
                }
                _ => {
                    self.now = self.now.max(target);
                    return Ok(());
                }
            }
        }
        Err(Violation("time never reaches its target (livelock)".into()))
    }

    /// Handles whatever is due now; afterwards no deadline may be in the past.
    fn settle(&mut self) -> Result<(), Violation> {
        self.advance(self.now)?;
        let now = self.now;
        ensure(self.server.poll_timeout().is_none_or(|t| t > now), || {
            "server deadline stuck in the past".into()
        })?;
        ensure(self.client.poll_timeout().is_none_or(|t| t > now), || {
            "client deadline stuck in the past".into()
        })
    }

    fn check(&mut self) -> Result<(), Violation> {
        let s = &self.server_config;
        ensure(self.server.session_count() <= s.max_sessions, || {
            format!("{} sessions held", self.server.session_count())
        })?;
        ensure(
            self.server.connection_count()
                <= s.max_pending_handshakes + self.server.session_count(),
            || {
                format!(
                    "{} connections for {} sessions",
                    self.server.connection_count(),
                    self.server.session_count()
                )
            },
        )?;
        ensure(
            self.server.connection_count() <= self.server_open.len(),
            || "the server holds a connection it was told is closed".into(),
        )?;
        let queued_messages = s
            .channel
            .max_queued_messages
            .max(s.disconnected_max_queued_messages);
        let queued_bytes = s
            .channel
            .max_queued_bytes
            .max(s.disconnected_max_queued_bytes);
        let ids: Vec<SessionId> = self
            .server_seen
            .keys()
            .copied()
            .chain(self.client.session())
            .collect();
        for id in ids {
            if let Some(ch) = self.server.channel(id) {
                channel_bounds(ch, queued_messages, queued_bytes)
                    .map_err(|v| Violation(format!("server session {id}: {v}")))?;
            }
        }
        let c = &s.channel;
        channel_bounds(
            self.client.channel(),
            c.max_queued_messages,
            c.max_queued_bytes,
        )
        .map_err(|v| Violation(format!("client: {v}")))?;
        if let Some(live) = self.live {
            let bytes = live();
            self.out.peak_live = self.out.peak_live.max(bytes);
            ensure(bytes <= self.bound as isize, || {
                format!("{bytes} live heap bytes, bound {}", self.bound)
            })?;
        }
        Ok(())
    }

    /// The network heals; the honest client must get its session back and carry a message each
    /// way, or have been told the session is over.
    fn finish(&mut self) -> Result<(), Violation> {
        self.reachable = true;
        self.blackholed = false;
        for h in 0..HOSTILE {
            if let Some(conn) = self.hostile[h].take() {
                self.server_open.remove(&conn);
                self.server.on_disconnected(self.now, conn);
            }
        }
        self.pump()?;
        // Retention, handshake timeouts and the longest backoff all run out well within this.
        for _ in 0..120 {
            if self.client_over || (self.client.is_connected() && self.settled_session()) {
                break;
            }
            self.advance(self.now + Duration::from_secs(1))?;
            self.check()?;
        }
        if self.client_over {
            return Ok(());
        }
        ensure(self.client.is_connected(), || {
            "the honest client is neither connected nor told its session ended".into()
        })?;
        if self.injected {
            // Spoofed server bytes may have been taken for the server's: nothing more is owed.
            return Ok(());
        }
        let id = self.client.session().expect("connected");
        let up = Bytes::from_static(b"final round trip: up");
        let down = Bytes::from_static(b"final round trip: down");
        let up_sent = self.client.send(0, Mode::Ordered, up.clone()).is_ok();
        let down_sent = self.server.send(id, 0, Mode::Ordered, down.clone()).is_ok();
        self.pump()?;
        for _ in 0..30 {
            self.advance(self.now + Duration::from_secs(1))?;
            self.check()?;
            let done = (!up_sent || self.server_got.contains(&up))
                && (!down_sent || self.client_got.contains(&down));
            if done || self.client_over {
                break;
            }
        }
        if self.client_over {
            return Ok(());
        }
        ensure(!up_sent || self.server_got.contains(&up), || {
            "the server never got the client's message".into()
        })?;
        ensure(!down_sent || self.client_got.contains(&down), || {
            "the client never got the server's message".into()
        })?;
        self.out.round_trip = up_sent && down_sent;
        Ok(())
    }

    /// The server holds the client's session on the client's current connection.
    fn settled_session(&self) -> bool {
        self.client
            .session()
            .is_some_and(|id| self.server.is_connected(id))
    }
}

/// The frame `spec` describes, aimed at the `honest` session where it says so.
pub fn frame_of(spec: &FrameSpec, honest: Option<(SessionId, Token)>) -> Frame {
    let identity = honest;
    let session = |p: Pick| match p {
        Pick::Honest => identity.map_or(SessionId(0), |(id, _)| id),
        Pick::Other(id) => SessionId(id),
    };
    let token = |t: TokenPick| {
        let honest = identity.map_or([0; 16], |(_, t)| *t.as_bytes());
        Token::from_bytes(match t {
            TokenPick::Honest => honest,
            TokenPick::Flip(i) => {
                let mut b = honest;
                b[usize::from(i) % 16] ^= 1 << (i / 16 % 8);
                b
            }
            TokenPick::Other(b) => b,
        })
    };
    let bytes = |len: u8| Bytes::from(vec![0xa5; usize::from(len)]);
    match *spec {
        FrameSpec::Hello {
            nonce,
            recv_window,
            ref resume,
            ref credentials,
        } => Frame::Hello(HelloFrame {
            nonce,
            recv_window: recv_window & varint::MAX,
            resume: resume.as_ref().map(|r| Resume {
                session: session(r.session),
                token: token(r.token),
                epoch: u64::from(r.epoch),
                received: r.received.get(),
            }),
            credentials: Bytes::copy_from_slice(credentials),
        }),
        FrameSpec::Welcome {
            nonce,
            session: s,
            token: t,
            epoch,
            resumed,
            received,
            recv_window,
        } => Frame::Welcome(WelcomeFrame {
            nonce,
            session: session(s),
            token: token(t),
            epoch: u64::from(epoch),
            resumed,
            received: u64::from(received),
            recv_window: recv_window & varint::MAX,
            retention_millis: 5000,
        }),
        FrameSpec::Refuse { code, epoch } => Frame::Refuse(RefuseFrame {
            code: u64::from(code % 8),
            epoch: u64::from(epoch),
            reason: Bytes::new(),
        }),
        FrameSpec::Data {
            stream,
            seq,
            ack,
            unordered,
            len,
        } => Frame::Data(DataFrame {
            stream: u64::from(stream % 4),
            seq: seq.get(),
            ack: ack.map(Num::get),
            unordered,
            payload: bytes(len),
        }),
        FrameSpec::Ack {
            cumulative,
            ref ranges,
        } => {
            let cumulative = cumulative.get().min(varint::MAX - 4096);
            let mut r = AckRanges::new();
            let mut at = cumulative;
            for &(gap, len) in ranges {
                let start = at + 1 + u64::from(gap);
                let end = start + 1 + u64::from(len);
                if r.push(start..end).is_err() {
                    break;
                }
                at = end;
            }
            Frame::Ack(AckFrame {
                cumulative,
                delay_micros: 0,
                ranges: r,
            })
        }
        FrameSpec::Ping(id) => Frame::Ping {
            id: id & varint::MAX,
        },
        FrameSpec::Pong(id) => Frame::Pong {
            id: id & varint::MAX,
        },
        FrameSpec::Close(code) => Frame::Close(CloseFrame {
            code: u64::from(code % 5),
            reason: Bytes::new(),
        }),
        FrameSpec::Unreliable {
            stream,
            seq,
            sequenced,
            len,
        } => Frame::Unreliable(UnreliableFrame {
            stream: u64::from(stream % 4),
            seq: seq.get(),
            sequenced,
            payload: bytes(len),
        }),
    }
}

fn payload(n: u8) -> Bytes {
    Bytes::from(vec![n; usize::from(n % 64)])
}

fn channel_bounds(ch: &Channel, max_messages: usize, max_bytes: usize) -> Result<(), Violation> {
    let c = ch.config();
    let r = ch.receiver();
    ensure(r.ranges().len() <= RECV_RANGES, || {
        format!("{} receive ranges", r.ranges().len())
    })?;
    ensure(r.reorder_slots() as u64 <= c.recv_window, || {
        format!("{} reorder slots", r.reorder_slots())
    })?;
    ensure(r.reorder_bytes() <= c.max_reorder_bytes, || {
        format!("{} reorder bytes", r.reorder_bytes())
    })?;
    let s = ch.sender();
    ensure(s.queued_messages() <= max_messages, || {
        format!("{} queued messages", s.queued_messages())
    })?;
    ensure(s.queued_bytes() <= max_bytes, || {
        format!("{} queued bytes", s.queued_bytes())
    })
}
