//! A server and clients joined by connections in virtual time, with the faults of the field report:
//! resets, silent blackholes (a VM being migrated), half-open connections, frozen processes, and a
//! server restart.

use std::collections::{BTreeMap, VecDeque};

use bytes::{Bytes, BytesMut};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use steadfast_core::client::{Client, ClientConfig, Directive};
use steadfast_core::server::{ConnId, Server, ServerConfig, ServerEvent};
use steadfast_core::session::SessionEvent;
use steadfast_core::time::{Duration, Instant};

use super::Stuck;

/// One transport connection.
struct Wire {
    client: usize,
    to_server: VecDeque<(Instant, Bytes)>,
    to_client: VecDeque<(Instant, Bytes)>,
    /// Nothing passes either way and nobody is told (the VM migration).
    blackholed: bool,
    server_open: bool,
    client_open: bool,
}

#[derive(Debug, Clone, Copy)]
enum Side {
    Server,
    Client,
}

/// The server, its clients and the wires between them.
pub struct Net {
    pub server: Server,
    pub clients: Vec<Client>,
    pub now: Instant,
    pub latency: Duration,
    pub server_events: Vec<ServerEvent>,
    pub client_events: Vec<Vec<SessionEvent>>,
    /// Directives each client received, with when.
    pub directives: Vec<Vec<(Instant, Directive)>>,
    /// Connection attempts to these servers fail.
    pub refusing_servers: Vec<usize>,
    /// Clients whose connection attempts fail.
    pub unreachable: Vec<bool>,
    pub frozen_until: Vec<Option<Instant>>,
    pub steps: u64,
    pub max_steps: u64,
    /// `step` does not move time past this.
    horizon: Option<Instant>,
    wires: BTreeMap<ConnId, Wire>,
    client_conn: Vec<Option<ConnId>>,
    /// Transport close notices in flight: (when, to whom, which connection).
    notices: VecDeque<(Instant, Side, ConnId)>,
    next_conn: ConnId,
    server_config: ServerConfig,
    client_configs: Vec<ClientConfig>,
    seed: u64,
    restarts: u64,
}

pub fn entropy(seed: u64) -> Box<ChaCha8Rng> {
    Box::new(ChaCha8Rng::seed_from_u64(seed))
}

impl Net {
    pub fn new(server: ServerConfig, clients: Vec<ClientConfig>, seed: u64) -> Self {
        let now = Instant::ZERO;
        let n = clients.len();
        let client_configs = clients.clone();
        Net {
            server: Server::new(server.clone(), now, entropy(seed)).expect("server config"),
            clients: clients
                .into_iter()
                .enumerate()
                .map(|(i, c)| {
                    Client::new(c, now, entropy(seed ^ (i as u64 + 1) << 32))
                        .expect("client config")
                })
                .collect(),
            now,
            latency: Duration::from_millis(5),
            server_events: Vec::new(),
            client_events: vec![Vec::new(); n],
            directives: vec![Vec::new(); n],
            refusing_servers: Vec::new(),
            unreachable: vec![false; n],
            frozen_until: vec![None; n],
            steps: 0,
            max_steps: 1_000_000,
            horizon: None,
            wires: BTreeMap::new(),
            client_conn: vec![None; n],
            notices: VecDeque::new(),
            next_conn: 1,
            server_config: server,
            client_configs,
            seed,
            restarts: 0,
        }
    }

    fn frozen(&self, i: usize) -> bool {
        self.frozen_until[i].is_some_and(|t| t > self.now)
    }

    /// One step; `false` once nothing is left to happen.
    pub fn step(&mut self) -> Result<bool, Stuck> {
        Stuck::count(&mut self.steps, self.max_steps, self.now)?;
        let now = self.now;
        let mut buf = BytesMut::new();
        for i in 0..self.clients.len() {
            if self.frozen(i) {
                continue;
            }
            while let Some(d) = self.clients[i].poll_directive(now) {
                self.directives[i].push((now, d));
                match d {
                    Directive::Connect { server, .. } => {
                        if self.unreachable[i] || self.refusing_servers.contains(&server) {
                            self.clients[i].on_connect_failed(now);
                        } else {
                            let conn = self.next_conn;
                            self.next_conn += 1;
                            self.wires.insert(
                                conn,
                                Wire {
                                    client: i,
                                    to_server: VecDeque::new(),
                                    to_client: VecDeque::new(),
                                    blackholed: false,
                                    server_open: true,
                                    client_open: true,
                                },
                            );
                            self.client_conn[i] = Some(conn);
                            self.server.on_connection(now, conn);
                            self.clients[i].on_connected(now);
                        }
                    }
                    Directive::Disconnect => {
                        if let Some(conn) = self.client_conn[i].take() {
                            self.close_side(conn, Side::Client);
                        }
                    }
                    _ => {}
                }
            }
            while let Some(n) = self.clients[i].poll_transmit(now, &mut buf) {
                let bytes = buf.split_to(n).freeze();
                if let Some(w) = self.client_conn[i].and_then(|c| self.wires.get_mut(&c))
                    && !w.blackholed
                    && w.client_open
                {
                    w.to_server.push_back((now + self.latency, bytes));
                }
            }
        }
        while let Some(t) = self.server.poll_transmit(now, &mut buf) {
            let bytes = buf.split_to(t.len).freeze();
            if let Some(w) = self.wires.get_mut(&t.conn)
                && w.server_open
            {
                if !w.blackholed && !bytes.is_empty() {
                    w.to_client.push_back((now + self.latency, bytes));
                }
                if t.close {
                    self.close_side(t.conn, Side::Server);
                }
            }
        }
        // In bulk, a few at a time, as the driver's `next_events` takes them: every test's events
        // pass through the limit.
        while self.server.poll_events(&mut self.server_events, 2) > 0 {}
        for i in 0..self.clients.len() {
            let c = &mut self.clients[i];
            let events = &mut self.client_events[i];
            // The application takes each message and is done with it at once.
            loop {
                let start = events.len();
                if c.poll_events(events, 2) == 0 {
                    break;
                }
                for e in &events[start..] {
                    if let SessionEvent::Received(m) | SessionEvent::Redelivered(m) = e {
                        c.consumed(m.seq);
                    }
                }
            }
        }
        if self.deliver_one(now) {
            return Ok(true);
        }
        let next = match (self.next_time(), self.horizon) {
            (Some(t), Some(h)) if t > h => (self.now < h).then_some(h),
            (None, Some(h)) => (self.now < h).then_some(h),
            (t, _) => t,
        };
        match next {
            None => Ok(false),
            Some(t) => {
                self.now = self.now.max(t);
                let now = self.now;
                self.server.handle_timeout(now);
                for i in 0..self.clients.len() {
                    if !self.frozen(i) {
                        self.clients[i].handle_timeout(now);
                    }
                }
                Ok(true)
            }
        }
    }

    /// One side closes: it stops reading and writing; the other hears of it one latency later,
    /// unless the wire is blackholed.
    fn close_side(&mut self, conn: ConnId, side: Side) {
        let latency = self.latency;
        let now = self.now;
        let Some(w) = self.wires.get_mut(&conn) else {
            return;
        };
        match side {
            Side::Client => w.client_open = false,
            Side::Server => w.server_open = false,
        }
        if !w.blackholed {
            let other = match side {
                Side::Client => Side::Server,
                Side::Server => Side::Client,
            };
            self.notices.push_back((now + latency, other, conn));
        }
    }

    /// Delivers one due thing: bytes first (they were sent before any close that follows them),
    /// then transport close notices.
    fn deliver_one(&mut self, now: Instant) -> bool {
        let conns: Vec<ConnId> = self.wires.keys().copied().collect();
        for conn in conns {
            let frozen = self.wires.get(&conn).is_some_and(|w| self.frozen(w.client));
            let w = self.wires.get_mut(&conn).expect("listed");
            if w.to_server.front().is_some_and(|(t, _)| *t <= now) {
                let (_, bytes) = w.to_server.pop_front().expect("checked");
                if w.server_open {
                    self.server.handle_input(now, conn, bytes);
                }
                return true;
            }
            let i = w.client;
            if w.to_client.front().is_some_and(|(t, _)| *t <= now) && !frozen {
                let (_, bytes) = w.to_client.pop_front().expect("checked");
                if w.client_open && self.client_conn[i] == Some(conn) {
                    self.clients[i].handle_input(now, bytes);
                }
                return true;
            }
        }
        // A frozen process reads its socket's news when it wakes; others' news goes on meanwhile.
        let deliverable = self.notices.iter().position(|(t, side, conn)| {
            let frozen_client = matches!(side, Side::Client)
                && self.wires.get(conn).is_some_and(|w| self.frozen(w.client));
            *t <= now && !frozen_client
        });
        if let Some(pos) = deliverable {
            let (_, side, conn) = self.notices.remove(pos).expect("found");
            self.notify(side, conn);
            return true;
        }
        false
    }

    fn notify(&mut self, side: Side, conn: ConnId) {
        let Some(w) = self.wires.get_mut(&conn) else {
            return;
        };
        match side {
            Side::Server if w.server_open => {
                w.server_open = false;
                self.server.on_disconnected(self.now, conn);
            }
            Side::Client if w.client_open => {
                w.client_open = false;
                let i = w.client;
                if self.client_conn[i] == Some(conn) {
                    self.client_conn[i] = None;
                    self.clients[i].on_disconnected(self.now);
                }
            }
            _ => {}
        }
    }

    fn next_time(&self) -> Option<Instant> {
        let mut next: Option<Instant> = None;
        let mut consider = |t: Option<Instant>| {
            if let Some(t) = t {
                next = Some(next.map_or(t, |n: Instant| n.min(t)));
            }
        };
        consider(self.server.poll_timeout());
        for (i, c) in self.clients.iter().enumerate() {
            match self.frozen_until[i] {
                Some(t) if t > self.now => consider(Some(t)),
                _ => consider(c.poll_timeout()),
            }
        }
        for w in self.wires.values() {
            consider(w.to_server.front().map(|(t, _)| *t));
            if !self.frozen(w.client) {
                consider(w.to_client.front().map(|(t, _)| *t));
            }
        }
        for (t, side, conn) in &self.notices {
            // News for a frozen process waits until it wakes.
            let wakes = match (side, self.wires.get(conn)) {
                (Side::Client, Some(w)) if self.frozen(w.client) => self.frozen_until[w.client],
                _ => None,
            };
            consider(Some(wakes.map_or(*t, |w| w.max(*t))));
        }
        next.map(|t| t.max(self.now))
    }

    /// Steps until `done` holds; fails if nothing is left to happen first.
    pub fn run_until(&mut self, mut done: impl FnMut(&Net) -> bool) -> Result<bool, Stuck> {
        loop {
            if done(self) {
                return Ok(true);
            }
            if !self.step()? {
                return Ok(done(self));
            }
        }
    }

    /// Runs for `d` of virtual time: everything due before then happens, nothing after.
    pub fn run_for(&mut self, d: Duration) -> Result<(), Stuck> {
        self.horizon = Some(self.now + d);
        let result = (|| {
            while self.step()? {}
            Ok(())
        })();
        self.horizon = None;
        result
    }

    /// Both ends see the connection reset; what was in flight is lost.
    pub fn reset(&mut self, i: usize) {
        if let Some(conn) = self.client_conn[i]
            && let Some(w) = self.wires.get_mut(&conn)
        {
            w.to_client.clear();
            w.to_server.clear();
            self.notices.push_back((self.now, Side::Server, conn));
            self.notices.push_back((self.now, Side::Client, conn));
        }
    }

    /// Nothing passes on client `i`'s connection any more, and neither end is told.
    pub fn blackhole(&mut self, i: usize) {
        if let Some(conn) = self.client_conn[i]
            && let Some(w) = self.wires.get_mut(&conn)
        {
            w.blackholed = true;
            w.to_client.clear();
            w.to_server.clear();
        }
    }

    /// The client sees its connection reset; the server is never told (half-open).
    pub fn half_open(&mut self, i: usize) {
        if let Some(conn) = self.client_conn[i].take()
            && let Some(w) = self.wires.get_mut(&conn)
        {
            w.client_open = false;
            w.to_client.clear();
            self.clients[i].on_disconnected(self.now);
        }
    }

    /// Client `i`'s process stops for `d`: no timers, no reads, no writes.
    pub fn freeze(&mut self, i: usize, d: Duration) {
        self.frozen_until[i] = Some(self.now + d);
    }

    /// The server process restarts with nothing remembered: every connection resets.
    pub fn restart_server(&mut self) {
        self.drop_server_conns();
        self.server = Server::new(
            self.server_config.clone(),
            self.now,
            entropy(self.seed.wrapping_add(self.restarts)),
        )
        .expect("server config");
    }

    /// Every connection resets under the server.
    fn drop_server_conns(&mut self) {
        self.restarts += 1;
        let conns: Vec<ConnId> = self.wires.keys().copied().collect();
        for conn in conns {
            if let Some(w) = self.wires.get_mut(&conn)
                && w.server_open
            {
                w.server_open = false;
                w.to_server.clear();
                if !w.blackholed {
                    self.notices
                        .push_back((self.now + self.latency, Side::Client, conn));
                }
            }
        }
    }

    /// The server uses `sessions` as its shared session store from now on (a new process).
    #[allow(dead_code)]
    pub fn with_sessions(mut self, sessions: Box<dyn steadfast_core::store::SessionStore>) -> Self {
        self.server = Server::with_sessions(
            self.server_config.clone(),
            self.now,
            entropy(self.seed),
            sessions,
        )
        .expect("server config");
        self
    }

    /// The server dies and another takes its place on the same shared session store (failover):
    /// every connection resets. The old server is returned, as it was at that moment (a process
    /// frozen rather than killed, to show it is fenced).
    #[allow(dead_code)]
    pub fn fail_over(&mut self, sessions: Box<dyn steadfast_core::store::SessionStore>) -> Server {
        self.drop_server_conns();
        let next = Server::with_sessions(
            self.server_config.clone(),
            self.now,
            entropy(self.seed.wrapping_add(self.restarts) ^ 0xfa11),
            sessions,
        )
        .expect("server config");
        std::mem::replace(&mut self.server, next)
    }

    /// Client `i`'s process dies and starts again on `store`: its connection closes under the
    /// server, and whatever it did not make durable is gone.
    #[allow(dead_code)]
    pub fn restart_client(&mut self, i: usize, store: Box<dyn steadfast_core::store::Store>) {
        self.restarts += 1;
        if let Some(conn) = self.client_conn[i].take()
            && let Some(w) = self.wires.get_mut(&conn)
        {
            w.client_open = false;
            w.to_client.clear();
            self.notices
                .push_back((self.now + self.latency, Side::Server, conn));
        }
        self.frozen_until[i] = None;
        self.clients[i] = Client::with_store(
            self.client_configs[i].clone(),
            self.now,
            entropy(self.seed ^ self.restarts << 40),
            store,
        )
        .expect("client config");
    }

    /// Client `i`'s received payloads (reliable and unreliable), in order.
    pub fn client_received(&self, i: usize) -> Vec<Bytes> {
        self.client_events[i]
            .iter()
            .filter_map(|e| match e {
                SessionEvent::Received(m) => Some(m.payload.clone()),
                SessionEvent::ReceivedUnreliable { payload, .. } => Some(payload.clone()),
                _ => None,
            })
            .collect()
    }

    /// The server's received payloads from all sessions, in order.
    pub fn server_received(&self) -> Vec<Bytes> {
        self.server_events
            .iter()
            .filter_map(|e| match e {
                ServerEvent::Session {
                    event: SessionEvent::Received(m),
                    ..
                } => Some(m.payload.clone()),
                ServerEvent::Session {
                    event: SessionEvent::ReceivedUnreliable { payload, .. },
                    ..
                } => Some(payload.clone()),
                _ => None,
            })
            .collect()
    }
}
