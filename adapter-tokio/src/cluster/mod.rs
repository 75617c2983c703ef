//! Sessions that resume on any server of a cluster, kept in Redis (feature `redis`).
//!
//! Run several servers with [`listen`] on the same Redis and give clients all of their addresses
//! ([`ClientOptions::servers`](crate::ClientOptions)). Then:
//!
//! - **Failover.** Every session's record lives in Redis ([`RedisSessions`], the server side of
//!   [`steadfast_core::store`]): its identity and attach epoch, the messages not yet acknowledged
//!   by the client, and the de-duplication state of what the client sent. A client whose server
//!   died reconnects to another by its reconnect policy and resumes there: nothing lost, nothing
//!   twice, order kept. Arrivals are written (one round trip per read, for all of its messages)
//!   before the acknowledgement that lets the client forget them.
//! - **Fencing.** A resume claims the session in Redis at its attach epoch; the newer epoch wins, and
//!   every later write by the older owner is refused, so it stops serving the session
//!   ([`SessionEvent::Fenced`](crate::SessionEvent)) and never ends it. Two servers never both
//!   serve one session.
//! - **Cross-server delivery.** [`Cluster::send`] and [`Cluster::broadcast`], from any server or
//!   from a process with no server ([`Cluster::publisher`]), append to the session's queue in Redis
//!   under its next sequence number in one atomic script, then ring the owning server's doorbell
//!   (Redis pub/sub). The owner fetches what it lacks and sends it. The guarantee: a message whose
//!   `send` returned `Ok` reaches the client exactly once and in order, unless the session ends
//!   (reported as ever). Pub/sub loses doorbells when a subscriber reconnects; that costs latency
//!   only, because each owner also fetches on claiming a session and sweeps its sessions twice a
//!   second.
//! - **Expiry** is Redis's own: every key of a session has a TTL a little above the retention
//!   time, renewed by its owner; a session nobody owns any more simply expires.
//!
//! With a cluster, send to sessions through [`Cluster`], not [`ServerHandle::send`]: a message
//! sequenced by one server alone could not be resumed by another. The store refuses such a send's
//! record loudly ([`SessionEvent::DurabilityLost`](crate::SessionEvent)).
//!
//! The scripts address a session's keys by name, so the store needs a single Redis (with replicas
//! if wanted), not Redis Cluster's sharding.

mod scripts;
mod store;

use std::collections::BTreeSet;
use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use redis::Script;
use redis::aio::MultiplexedConnection;
use steadfast_core::Seq;
use steadfast_core::identity::SessionId;
use steadfast_core::send::SendError;
use steadfast_core::server::Sequenced;
use steadfast_core::session::REPLY_STREAM;
use tokio::sync::{mpsc, oneshot};

pub use store::RedisSessions;

use crate::{Listener, Mode, ServerHandle, ServerOptions, Tokio};

/// Where the cluster's state lives and who this server is.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ClusterOptions {
    /// The Redis URL, e.g. `redis://127.0.0.1:6379/`.
    pub redis: String,
    /// Prefix of every key and channel (several clusters can share one Redis).
    pub prefix: String,
    /// This server's name, unique in the cluster (its address will do).
    pub server: String,
    /// The most messages queued in Redis for one session; more are refused with
    /// [`ClusterError::QueueFull`].
    pub max_queued: usize,
}

impl ClusterOptions {
    /// Defaults: prefix `steadfast`, up to 65,536 queued messages per session.
    pub fn new(redis: impl Into<String>, server: impl Into<String>) -> Self {
        ClusterOptions {
            redis: redis.into(),
            prefix: "steadfast".into(),
            server: server.into(),
            max_queued: 65_536,
        }
    }
}

/// Why a cluster operation failed.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ClusterError {
    /// No server of the cluster keeps this session (never existed, ended, or expired).
    UnknownSession,
    /// The session's queue holds [`ClusterOptions::max_queued`] messages: retry later.
    QueueFull,
    /// Only reliable modes ([`Mode::Ordered`], [`Mode::Unordered`]) cross servers.
    Unsupported(Mode),
    /// Redis failed or could not be reached.
    Redis(String),
    /// The server could not start.
    Io(String),
}

impl fmt::Display for ClusterError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClusterError::UnknownSession => f.write_str("no server keeps this session"),
            ClusterError::QueueFull => f.write_str("the session's queue is full"),
            ClusterError::Unsupported(m) => write!(f, "mode {m:?} does not cross servers"),
            ClusterError::Redis(e) => write!(f, "redis: {e}"),
            ClusterError::Io(e) => write!(f, "server: {e}"),
        }
    }
}

impl std::error::Error for ClusterError {}

impl From<redis::RedisError> for ClusterError {
    fn from(e: redis::RedisError) -> Self {
        ClusterError::Redis(e.to_string())
    }
}

/// What a [`Cluster::broadcast`] reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Broadcast {
    /// Sessions whose queue took the message.
    pub queued: u64,
    /// Sessions whose queue was full.
    pub full: u64,
}

/// Sends to sessions wherever they are attached. Cheap to clone; concurrent calls share one
/// pipelined connection. Calls awaited one after another keep their order; calls in flight together
/// are ordered as Redis receives them, and each session gets them in that one order.
#[derive(Clone)]
pub struct Cluster {
    conn: MultiplexedConnection,
    prefix: String,
    max_queued: usize,
    publish: Script,
    /// Broadcasts for the one task that sends them, in call order, as one script per batch.
    broadcasts: mpsc::UnboundedSender<Queued>,
}

/// One broadcast waiting to be sent: its event and who is told the outcome.
type Queued = (
    u64,
    u8,
    Bytes,
    oneshot::Sender<Result<Broadcast, ClusterError>>,
);

impl fmt::Debug for Cluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cluster")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl Cluster {
    /// A publisher with no server of its own.
    pub async fn publisher(options: &ClusterOptions) -> Result<Cluster, ClusterError> {
        let client = redis::Client::open(options.redis.as_str())?;
        Cluster::connect(&client, options).await
    }

    async fn connect(
        client: &redis::Client,
        options: &ClusterOptions,
    ) -> Result<Cluster, ClusterError> {
        let mut conn = client.get_multiplexed_async_connection().await?;
        let publish = Script::new(&scripts::publish());
        let broadcast = Script::new(scripts::BROADCAST);
        // Loaded before the first call: a call that found its script missing would be retried
        // after later ones, out of the order the publisher made them in.
        publish.load_async(&mut conn).await?;
        broadcast.load_async(&mut conn).await?;
        let (broadcasts, queue) = mpsc::unbounded_channel();
        tokio::spawn(send_broadcasts(
            queue,
            conn.clone(),
            broadcast,
            options.prefix.clone(),
            options.max_queued,
        ));
        Ok(Cluster {
            conn,
            prefix: options.prefix.clone(),
            max_queued: options.max_queued,
            publish,
            broadcasts,
        })
    }

    /// Sends `payload` to `session` on `stream` (below [`REPLY_STREAM`]): `Ok` once Redis holds it
    /// under its sequence number, which is returned.
    pub async fn send(
        &self,
        session: SessionId,
        stream: u64,
        mode: Mode,
        payload: Bytes,
    ) -> Result<Seq, ClusterError> {
        if stream >= REPLY_STREAM {
            return Err(ClusterError::Unsupported(mode));
        }
        self.append(session, stream, mode, payload).await
    }

    /// Replies to the client's message `to` on `session`.
    pub async fn reply(
        &self,
        session: SessionId,
        to: Seq,
        payload: Bytes,
    ) -> Result<Seq, ClusterError> {
        let stream = REPLY_STREAM.saturating_add(to);
        self.append(session, stream, Mode::Ordered, payload).await
    }

    async fn append(
        &self,
        session: SessionId,
        stream: u64,
        mode: Mode,
        payload: Bytes,
    ) -> Result<Seq, ClusterError> {
        let unordered = unordered(mode)?;
        let seq: i64 = self
            .publish
            .arg(&self.prefix)
            .arg(store::sid(session))
            .arg(self.max_queued)
            .arg(stream)
            .arg(unordered)
            .arg(&payload[..])
            .invoke_async(&mut self.conn.clone())
            .await?;
        match seq {
            -1 => Err(ClusterError::UnknownSession),
            -2 => Err(ClusterError::QueueFull),
            seq => Ok(seq as Seq),
        }
    }

    /// Sends `payload` to every session of the cluster (the field report's fan-out), in one atomic
    /// step in Redis.
    pub async fn broadcast(
        &self,
        stream: u64,
        mode: Mode,
        payload: Bytes,
    ) -> Result<Broadcast, ClusterError> {
        if stream >= REPLY_STREAM {
            return Err(ClusterError::Unsupported(mode));
        }
        let (tx, rx) = oneshot::channel();
        let gone = || ClusterError::Redis("the broadcast task ended".into());
        self.broadcasts
            .send((stream, unordered(mode)?, payload, tx))
            .map_err(|_| gone())?;
        rx.await.unwrap_or_else(|_| Err(gone()))
    }
}

/// The most broadcasts sent to Redis as one script.
const BROADCAST_BATCH: usize = 1024;

/// Sends the broadcasts of every clone of one [`Cluster`]: whatever queued while the previous
/// script ran goes as the next one, so their order is the order of the calls, a busy publisher pays
/// one script per batch rather than per event, an idle one waits for no timer, and a caller that
/// gives up waiting cannot stall the calls behind its own. Ends when the last clone is dropped.
async fn send_broadcasts(
    mut queue: mpsc::UnboundedReceiver<Queued>,
    mut conn: MultiplexedConnection,
    script: Script,
    prefix: String,
    max_queued: usize,
) {
    let mut queued = Vec::new();
    while let Some(first) = queue.recv().await {
        queued.push(first);
        while queued.len() < BROADCAST_BATCH {
            match queue.try_recv() {
                Ok(next) => queued.push(next),
                Err(_) => break,
            }
        }
        {
            let queued = std::mem::take(&mut queued);
            let mut invocation = script.arg(&prefix);
            invocation.arg(max_queued);
            for (stream, unordered, payload, _) in &queued {
                invocation.arg(*stream).arg(*unordered).arg(&payload[..]);
            }
            let reply: Result<Vec<u64>, redis::RedisError> =
                invocation.invoke_async(&mut conn).await;
            match reply {
                Ok(counts) if counts.len() == 2 * queued.len() => {
                    for ((.., tx), pair) in queued.into_iter().zip(counts.chunks(2)) {
                        let _ = tx.send(Ok(Broadcast {
                            queued: pair[0],
                            full: pair[1],
                        }));
                    }
                }
                Ok(_) => {
                    for (.., tx) in queued {
                        let _ = tx.send(Err(ClusterError::Redis(
                            "unexpected broadcast reply".into(),
                        )));
                    }
                }
                Err(e) => {
                    let e = ClusterError::from(e);
                    for (.., tx) in queued {
                        let _ = tx.send(Err(e.clone()));
                    }
                }
            }
        }
    }
}

fn unordered(mode: Mode) -> Result<u8, ClusterError> {
    match mode {
        Mode::Ordered => Ok(0),
        Mode::Unordered => Ok(1),
        other => Err(ClusterError::Unsupported(other)),
    }
}

/// Binds `addr` and serves sessions kept in Redis, as one server of a cluster, on the current
/// tokio runtime. The server runs until [`ServerHandle::shutdown`] (its cluster tasks hold a
/// handle, so dropping the application's handles does not stop it).
pub async fn listen(
    addr: SocketAddr,
    options: ServerOptions,
    cluster: ClusterOptions,
) -> Result<(ServerHandle, Cluster), ClusterError> {
    let client = redis::Client::open(cluster.redis.as_str())?;
    let retention = options.config.retention;
    // A little above the retention time, so a detached session outlives its owner's retention
    // even if the owner died just before a keep-alive.
    let ttl = retention + retention / 3 + Duration::from_secs(1);
    let (claimed, claims) = tokio::sync::mpsc::unbounded_channel();
    let sessions = RedisSessions::new(
        client.clone(),
        cluster.prefix.clone(),
        cluster.server.clone(),
        ttl,
        claimed,
    );
    let io = |e: std::io::Error| ClusterError::Io(e.to_string());
    let listener = Listener::new(tokio::net::TcpListener::bind(addr).await.map_err(io)?);
    let (handle, driver) = steadfast_core::driver::server::server_with_sessions(
        Tokio::current(),
        listener,
        options,
        crate::os_entropy(),
        Box::new(sessions),
    )
    .map_err(|e| ClusterError::Io(e.to_string()))?;
    tokio::spawn(driver);
    let publisher = Cluster::connect(&client, &cluster).await?;
    let feeder = Feeder {
        handle: handle.clone(),
        conn: client.get_multiplexed_async_connection().await?,
        prefix: cluster.prefix.clone(),
        dirty: BTreeSet::new(),
        blocked: BTreeSet::new(),
    };
    let door = format!("{}:door:{}", cluster.prefix, cluster.server);
    tokio::spawn(feeder.run(client, door, claims));
    Ok((handle, publisher))
}

/// How often sessions held back by a full queue are retried.
const RETRY_EVERY: Duration = Duration::from_millis(10);
/// How often every session is checked for messages whose doorbell was lost.
const SWEEP_EVERY: Duration = Duration::from_millis(500);
/// The most messages fetched for one session at a time.
const FETCH_MAX: isize = 1024;

/// Moves what Redis holds for this server's sessions into them.
struct Feeder {
    handle: ServerHandle,
    conn: MultiplexedConnection,
    prefix: String,
    /// Sessions to fetch for.
    dirty: BTreeSet<SessionId>,
    /// Sessions whose queue here was full: retried on the next tick.
    blocked: BTreeSet<SessionId>,
}

impl Feeder {
    async fn run(
        mut self,
        client: redis::Client,
        door: String,
        mut claims: tokio::sync::mpsc::UnboundedReceiver<SessionId>,
    ) {
        let mut retry = tokio::time::interval(RETRY_EVERY);
        let mut sweep = tokio::time::interval(SWEEP_EVERY);
        'subscribe: loop {
            let mut doorbells = match subscribe(&client, &door).await {
                Ok(d) => d,
                Err(e) => {
                    tracing::warn!(error = %e, "doorbell subscription failed; retrying");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    if self.handle.is_shut_down() {
                        return;
                    }
                    continue;
                }
            };
            loop {
                tokio::select! {
                    msg = doorbells.next() => {
                        let Some(msg) = msg else { continue 'subscribe };
                        self.ring(&msg);
                        // Take every doorbell already here before one fetch for all of them.
                        while let Some(Some(msg)) = futures_util::FutureExt::now_or_never(doorbells.next()) {
                            self.ring(&msg);
                        }
                    }
                    Some(id) = claims.recv() => { self.dirty.insert(id); }
                    _ = retry.tick() => {
                        if self.handle.is_shut_down() {
                            return;
                        }
                        self.dirty.append(&mut self.blocked);
                    }
                    _ = sweep.tick() => {
                        let all: Vec<SessionId> = ServerHandle::inspect(&self.handle, |s| s.sessions().collect());
                        self.dirty.extend(all);
                    }
                }
                if !self.dirty.is_empty() {
                    self.fetch().await;
                }
            }
        }
    }

    fn ring(&mut self, msg: &redis::Msg) {
        let payload: Vec<u8> = msg.get_payload_bytes().to_vec();
        let text = String::from_utf8_lossy(&payload);
        self.dirty
            .extend(text.split(',').filter_map(store::parse_sid));
    }

    async fn fetch(&mut self) {
        let ids = std::mem::take(&mut self.dirty);
        let ends: Vec<(SessionId, Seq)> = ServerHandle::inspect(&self.handle, |s| {
            ids.iter()
                .filter_map(|&id| Some((id, s.channel(id)?.sender().end())))
                .collect()
        });
        if ends.is_empty() {
            return;
        }
        let mut pipe = redis::pipe();
        for (id, end) in &ends {
            let keys = store::Keys::new(&self.prefix, *id);
            pipe.zrangebyscore_limit(keys.o, *end, "+inf", 0, FETCH_MAX);
        }
        let lists: Vec<Vec<Vec<u8>>> = match pipe.query_async(&mut self.conn).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "fetching queued messages failed");
                self.blocked.extend(ends.iter().map(|(id, _)| *id));
                return;
            }
        };
        for ((id, _), list) in ends.iter().zip(lists) {
            if list.len() == FETCH_MAX as usize {
                self.dirty.insert(*id);
            }
            for v in list {
                let Some(m) = store::decode_outbound(&v) else {
                    tracing::error!(session = id.0, "undecodable message in Redis");
                    break;
                };
                match self.handle.send_sequenced(*id, m) {
                    Ok(Sequenced::Gap { .. }) => {
                        self.dirty.insert(*id);
                        break;
                    }
                    Ok(_) => {}
                    Err(SendError::QueueFull(_)) => {
                        self.blocked.insert(*id);
                        break;
                    }
                    Err(_) => break,
                }
            }
        }
    }
}

async fn subscribe(
    client: &redis::Client,
    door: &str,
) -> redis::RedisResult<impl futures_util::Stream<Item = redis::Msg> + Unpin> {
    let mut pubsub = client.get_async_pubsub().await?;
    pubsub.subscribe(door).await?;
    Ok(pubsub.into_on_message())
}
