//! The session store on Redis: what each server session records (see
//! [`steadfast_core::store`]), kept where every server of the cluster can load it.
//!
//! Writes that gate an acknowledgement or a welcome (arrivals, claims) are made durable in the
//! core's `flush`, one round trip for everything recorded since the last one; writes that only
//! free memory (acknowledged messages, consumed arrivals) wait for the next such flush or for the
//! background writer, which sends them for every session in one pipeline every few milliseconds.
//! Outbound messages are not written here at all: they are sequenced in Redis by the publisher
//! ([`super::Cluster::send`]) before any server sees them.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use redis::Script;
use steadfast_core::Seq;
use steadfast_core::identity::{SessionId, Token};
use steadfast_core::store::{
    Identity, MemoryStore, Recovered, SessionStore, Store, StoreError, Stored,
};

use super::scripts;

/// How often the background writer sends what waits.
const WRITE_EVERY: Duration = Duration::from_millis(5);

/// One Redis connection for the synchronous writes, reopened after a failure.
pub(crate) struct Link {
    client: redis::Client,
    conn: Option<redis::Connection>,
}

impl Link {
    pub(crate) fn new(client: redis::Client) -> Self {
        Link { client, conn: None }
    }

    fn run<T>(
        &mut self,
        f: impl FnOnce(&mut redis::Connection) -> redis::RedisResult<T>,
    ) -> Result<T, StoreError> {
        if self.conn.is_none() {
            let c = self.client.get_connection().map_err(io)?;
            self.conn = Some(c);
        }
        let conn = self.conn.as_mut().expect("opened above");
        let r = f(conn);
        if r.is_err() {
            // A connection in an unknown state is not reused.
            self.conn = None;
        }
        r.map_err(io)
    }
}

fn io(e: redis::RedisError) -> StoreError {
    StoreError::Io(e.to_string())
}

/// The keys of one session.
pub(crate) struct Keys {
    pub(crate) m: String,
    pub(crate) o: String,
    pub(crate) i: String,
}

impl Keys {
    pub(crate) fn new(prefix: &str, id: SessionId) -> Self {
        let tag = format!("{prefix}:{{{:016x}}}", id.0);
        Keys {
            m: format!("{tag}:m"),
            o: format!("{tag}:o"),
            i: format!("{tag}:i"),
        }
    }
}

/// The name of a session in Redis.
pub(crate) fn sid(id: SessionId) -> String {
    format!("{:016x}", id.0)
}

pub(crate) fn parse_sid(s: &str) -> Option<SessionId> {
    u64::from_str_radix(s, 16).ok().map(SessionId)
}

/// What one session's store has recorded and not yet sent.
#[derive(Default)]
struct Pending {
    /// The epoch this server claimed, once it has.
    claimed: Option<u64>,
    /// Another server owns it (`Some(epoch)`), or its record is gone (`Some(0)` never: see `gone`).
    fenced: Option<u64>,
    gone: bool,
    cleared: bool,
    acknowledged: Option<Seq>,
    /// The inbound de-dup state, mirrored to write it whole.
    inbound: MemoryStore,
    inbound_dirty: bool,
    arrivals: Vec<(Seq, Vec<u8>)>,
    consumed: Vec<Seq>,
}

impl Pending {
    /// Work for the background writer: what frees memory, not what gates acks.
    fn has_work(&self) -> bool {
        self.acknowledged.is_some() || !self.consumed.is_empty()
    }

    /// The APPLY script's arguments for what waits, taken; the inbound state only with
    /// `inbound` (the flush that gates acks sends it, never the background writer, or the flush
    /// could find nothing to do while the writer's round trip is still under way).
    fn take_args(&mut self, owner: &str, inbound: bool) -> Option<Vec<Vec<u8>>> {
        let epoch = self.claimed?;
        let mut args: Vec<Vec<u8>> = vec![epoch.to_string().into(), owner.into()];
        args.push(
            self.acknowledged
                .take()
                .map(|b| b.to_string())
                .unwrap_or_default()
                .into(),
        );
        if inbound && std::mem::take(&mut self.inbound_dirty) {
            let r = self.inbound.snapshot();
            args.push(r.watermark.to_string().into());
            args.push(encode_ranges(&r.arrived_above).into());
        } else {
            args.push(Vec::new());
            args.push(Vec::new());
        }
        let arrivals = if inbound {
            std::mem::take(&mut self.arrivals)
        } else {
            Vec::new()
        };
        args.push(arrivals.len().to_string().into());
        for (seq, value) in arrivals {
            args.push(seq.to_string().into());
            args.push(value);
        }
        args.extend(self.consumed.drain(..).map(|s| s.to_string().into()));
        Some(args)
    }

    /// Takes in the answer of CLAIM, APPLY or CLEAR.
    fn answer(&mut self, reply: &[i64]) -> Result<(), StoreError> {
        match reply {
            [0] => Ok(()),
            [1, epoch] => {
                self.fenced = Some(*epoch as u64);
                Err(StoreError::Fenced {
                    epoch: *epoch as u64,
                })
            }
            _ => {
                self.gone = true;
                Err(gone())
            }
        }
    }

    fn check(&self) -> Result<(), StoreError> {
        if let Some(epoch) = self.fenced {
            return Err(StoreError::Fenced { epoch });
        }
        if self.gone {
            return Err(gone());
        }
        Ok(())
    }
}

fn gone() -> StoreError {
    StoreError::Io("the session's record expired in Redis".into())
}

fn encode_ranges(ranges: &[Range<Seq>]) -> String {
    let parts: Vec<String> = ranges
        .iter()
        .map(|r| format!("{}-{}", r.start, r.end))
        .collect();
    parts.join(",")
}

fn decode_ranges(s: &str) -> Option<Vec<Range<Seq>>> {
    if s.is_empty() {
        return Some(Vec::new());
    }
    s.split(',')
        .map(|p| {
            let (a, b) = p.split_once('-')?;
            Some(a.parse().ok()?..b.parse().ok()?)
        })
        .collect()
}

/// `stream|unordered|payload`, the value of an inbound message.
fn encode_inbound(m: &Stored) -> Vec<u8> {
    let mut v = format!("{}|{}|", m.stream, u8::from(m.unordered)).into_bytes();
    v.extend_from_slice(&m.payload);
    v
}

/// Splits `a|b|rest` (the payload may itself hold `|`).
fn split3(v: &[u8]) -> Option<(&[u8], &[u8], &[u8])> {
    let i = v.iter().position(|&b| b == b'|')?;
    let j = i + 1 + v[i + 1..].iter().position(|&b| b == b'|')?;
    Some((&v[..i], &v[i + 1..j], &v[j + 1..]))
}

fn num(v: &[u8]) -> Option<u64> {
    std::str::from_utf8(v).ok()?.parse().ok()
}

fn decode_inbound(seq: Seq, v: &[u8]) -> Option<Stored> {
    let (stream, unordered, payload) = split3(v)?;
    Some(Stored {
        seq,
        stream: num(stream)?,
        unordered: unordered == b"1",
        payload: Bytes::copy_from_slice(payload),
    })
}

/// `seq|stream|unordered|payload`, a member of the outbound queue.
pub(crate) fn decode_outbound(v: &[u8]) -> Option<Stored> {
    let i = v.iter().position(|&b| b == b'|')?;
    decode_inbound(num(&v[..i])?, &v[i + 1..])
}

struct Shared {
    link: Mutex<Link>,
    prefix: String,
    owner: String,
    ttl: Duration,
    /// Every session store this server holds, for the background writer and the keep-alive.
    live: Mutex<BTreeMap<SessionId, Arc<Mutex<Pending>>>>,
    /// Told of each session this server claims, so it fetches what was published meanwhile.
    claimed: tokio::sync::mpsc::UnboundedSender<SessionId>,
    scripts: Scripts,
}

struct Scripts {
    create: Script,
    claim: Script,
    apply: Script,
    clear: Script,
    keep: Script,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere with the lock held leaves plain data: carry on with it.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The sessions of one server, kept in Redis: the [`SessionStore`] a clustered server runs on.
#[derive(Clone)]
pub struct RedisSessions {
    shared: Arc<Shared>,
}

impl RedisSessions {
    pub(crate) fn new(
        client: redis::Client,
        prefix: String,
        owner: String,
        ttl: Duration,
        claimed: tokio::sync::mpsc::UnboundedSender<SessionId>,
    ) -> Self {
        let shared = Arc::new(Shared {
            link: Mutex::new(Link::new(client)),
            prefix,
            owner,
            ttl,
            live: Mutex::new(BTreeMap::new()),
            claimed,
            scripts: Scripts {
                create: Script::new(scripts::CREATE),
                claim: Script::new(scripts::CLAIM),
                apply: Script::new(scripts::APPLY),
                clear: Script::new(scripts::CLEAR),
                keep: Script::new(scripts::KEEP),
            },
        });
        let writer = Arc::downgrade(&shared);
        std::thread::Builder::new()
            .name("steadfast-redis-writer".into())
            .spawn(move || background(writer))
            .expect("spawn the Redis writer thread");
        RedisSessions { shared }
    }

    fn store(&self, id: SessionId, pending: Pending) -> Box<dyn Store> {
        let pending = Arc::new(Mutex::new(pending));
        lock(&self.shared.live).insert(id, pending.clone());
        Box::new(RedisStore {
            shared: self.shared.clone(),
            id,
            keys: Keys::new(&self.shared.prefix, id),
            pending,
        })
    }
}

impl SessionStore for RedisSessions {
    fn create(&mut self, identity: Identity) -> Result<Box<dyn Store>, StoreError> {
        let s = &self.shared;
        let keys = Keys::new(&s.prefix, identity.session);
        let ttl = s.ttl.as_millis() as u64;
        lock(&s.link).run(|c| {
            s.scripts
                .create
                .key(&keys.m)
                .key(&keys.o)
                .key(&keys.i)
                .key(format!("{}:sessions", s.prefix))
                .arg(&identity.token.as_bytes()[..])
                .arg(identity.epoch)
                .arg(&s.owner)
                .arg(ttl)
                .arg(sid(identity.session))
                .invoke::<i64>(c)
        })?;
        let pending = Pending {
            claimed: Some(identity.epoch),
            ..Pending::default()
        };
        Ok(self.store(identity.session, pending))
    }

    fn load(&mut self, id: SessionId) -> Result<Option<(Box<dyn Store>, Recovered)>, StoreError> {
        let keys = Keys::new(&self.shared.prefix, id);
        type Loaded = (
            BTreeMap<String, Vec<u8>>,
            Vec<Vec<u8>>,
            BTreeMap<String, Vec<u8>>,
        );
        let (meta, out, inbound): Loaded = lock(&self.shared.link).run(|c| {
            redis::pipe()
                .hgetall(&keys.m)
                .zrange(&keys.o, 0, -1)
                .hgetall(&keys.i)
                .query(c)
        })?;
        if meta.is_empty() {
            return Ok(None);
        }
        let corrupt = |what: &str| StoreError::Corrupt(format!("session {}: {what}", sid(id)));
        let field = |k: &str| meta.get(k).ok_or_else(|| corrupt(k));
        let number = |k: &str| field(k).and_then(|v| num(v).ok_or_else(|| corrupt(k)));
        let token: [u8; 16] = field("tok")?
            .as_slice()
            .try_into()
            .map_err(|_| corrupt("tok"))?;
        let rg = std::str::from_utf8(field("rg")?).map_err(|_| corrupt("rg"))?;
        let mut unconsumed = inbound
            .iter()
            .map(|(seq, v)| {
                let seq = seq.parse().map_err(|_| corrupt("i"))?;
                decode_inbound(seq, v).ok_or_else(|| corrupt("i"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        unconsumed.sort_by_key(|m| m.seq);
        let mut unacknowledged = out
            .iter()
            .map(|v| decode_outbound(v).ok_or_else(|| corrupt("o")))
            .collect::<Result<Vec<_>, _>>()?;
        unacknowledged.sort_by_key(|m| m.seq);
        let mut recovered = Recovered::default();
        recovered.identity = Some(Identity {
            session: id,
            token: Token::from_bytes(token),
            epoch: number("ep")?,
        });
        recovered.next_seq = number("nx")?;
        recovered.unacknowledged = unacknowledged;
        recovered.watermark = number("wm")?;
        recovered.arrived_above = decode_ranges(rg).ok_or_else(|| corrupt("rg"))?;
        recovered.unconsumed = unconsumed;
        // The mirror starts from what was kept, so the next write carries it forward.
        let mut inbound = MemoryStore::new();
        for r in std::iter::once(0..recovered.watermark).chain(recovered.arrived_above.clone()) {
            for seq in r {
                let kept = recovered.unconsumed.iter().find(|m| m.seq == seq).cloned();
                inbound.arrived(&kept.unwrap_or(Stored {
                    seq,
                    stream: 0,
                    unordered: false,
                    payload: Bytes::new(),
                }))?;
                if recovered.unconsumed.iter().all(|m| m.seq != seq) {
                    inbound.consumed(seq)?;
                }
            }
        }
        let store = self.store(
            id,
            Pending {
                inbound,
                ..Pending::default()
            },
        );
        Ok(Some((store, recovered)))
    }
}

/// One session's record in Redis, written by this server.
struct RedisStore {
    shared: Arc<Shared>,
    id: SessionId,
    keys: Keys,
    pending: Arc<Mutex<Pending>>,
}

impl RedisStore {
    fn pending(&self) -> MutexGuard<'_, Pending> {
        lock(&self.pending)
    }
}

impl Drop for RedisStore {
    fn drop(&mut self) {
        let mut live = lock(&self.shared.live);
        if live
            .get(&self.id)
            .is_some_and(|p| Arc::ptr_eq(p, &self.pending))
        {
            live.remove(&self.id);
        }
    }
}

impl Store for RedisStore {
    fn recover(&mut self) -> Result<Recovered, StoreError> {
        // A server's sessions are recovered through `SessionStore::load`, never this way.
        Ok(Recovered::default())
    }

    fn identity(&mut self, identity: Identity) -> Result<(), StoreError> {
        let s = &self.shared;
        let reply: Vec<i64> = lock(&s.link).run(|c| {
            s.scripts
                .claim
                .key(&self.keys.m)
                .key(&self.keys.o)
                .key(&self.keys.i)
                .arg(identity.epoch)
                .arg(&s.owner)
                .invoke(c)
        })?;
        let mut p = self.pending();
        p.answer(&reply)?;
        p.claimed = Some(identity.epoch);
        p.fenced = None;
        drop(p);
        let _ = s.claimed.send(self.id);
        Ok(())
    }

    fn sent(&mut self, _: &Stored) -> Result<(), StoreError> {
        // A message queued with `ServerHandle::send` was sequenced by this server alone: another
        // server could not resume it. Loud, so the mistake is found at once.
        Err(StoreError::Io(
            "a clustered session's messages go through Cluster::send, not ServerHandle::send"
                .into(),
        ))
    }

    fn acknowledged(&mut self, below: Seq) -> Result<(), StoreError> {
        let mut p = self.pending();
        p.check()?;
        p.acknowledged = Some(p.acknowledged.map_or(below, |b| b.max(below)));
        Ok(())
    }

    fn arrived(&mut self, message: &Stored) -> Result<(), StoreError> {
        let mut p = self.pending();
        p.check()?;
        p.inbound.arrived(message)?;
        p.inbound_dirty = true;
        p.arrivals.push((message.seq, encode_inbound(message)));
        Ok(())
    }

    fn consumed(&mut self, seq: Seq) -> Result<(), StoreError> {
        let mut p = self.pending();
        p.inbound.consumed(seq)?;
        p.consumed.push(seq);
        Ok(())
    }

    fn flush(&mut self) -> Result<(), StoreError> {
        let mut p = self.pending();
        if p.cleared {
            return Ok(());
        }
        p.check()?;
        // Only arrivals gate anything (the acks that follow); the rest rides with the writer.
        if !p.inbound_dirty {
            return Ok(());
        }
        let Some(args) = p.take_args(&self.shared.owner, true) else {
            return Ok(());
        };
        let reply = apply(&self.shared, &self.keys, &args)?;
        p.answer(&reply)
    }

    fn clear(&mut self) -> Result<(), StoreError> {
        let s = &self.shared;
        let Some(epoch) = self.pending().claimed else {
            return Ok(());
        };
        let reply: Vec<i64> = lock(&s.link).run(|c| {
            s.scripts
                .clear
                .key(&self.keys.m)
                .key(&self.keys.o)
                .key(&self.keys.i)
                .key(format!("{}:sessions", s.prefix))
                .arg(epoch)
                .arg(&s.owner)
                .arg(sid(self.id))
                .invoke(c)
        })?;
        let mut p = self.pending();
        match p.answer(&reply) {
            // Already expired: nothing left to clear.
            Ok(()) | Err(StoreError::Io(_)) => {
                p.cleared = true;
                Ok(())
            }
            Err(e) => Err(e),
        }
    }
}

fn apply(shared: &Shared, keys: &Keys, args: &[Vec<u8>]) -> Result<Vec<i64>, StoreError> {
    lock(&shared.link).run(|c| {
        let mut inv = shared.scripts.apply.key(&keys.m);
        inv.key(&keys.o).key(&keys.i);
        for a in args {
            inv.arg(a.as_slice());
        }
        inv.invoke(c)
    })
}

/// Sends what waits in every live session, in one pipeline, every few milliseconds; renews the
/// TTL of every session this server owns a few times per TTL. Ends with the last store.
fn background(shared: std::sync::Weak<Shared>) {
    let mut since_keep = Duration::ZERO;
    loop {
        std::thread::sleep(WRITE_EVERY);
        let Some(s) = shared.upgrade() else {
            return;
        };
        since_keep += WRITE_EVERY;
        let keep = since_keep >= s.ttl / 4;
        if keep {
            since_keep = Duration::ZERO;
        }
        let live: Vec<(SessionId, Arc<Mutex<Pending>>)> = lock(&s.live)
            .iter()
            .map(|(id, p)| (*id, p.clone()))
            .collect();
        let mut pipe = redis::pipe();
        let mut applied = Vec::new();
        for (id, pending) in &live {
            let keys = Keys::new(&s.prefix, *id);
            let mut p = lock(pending);
            if p.fenced.is_some() || p.gone || p.cleared {
                continue;
            }
            if keep && p.claimed.is_some() {
                pipe.invoke_script(
                    s.scripts
                        .keep
                        .key(&keys.m)
                        .key(&keys.o)
                        .key(&keys.i)
                        .arg(&s.owner),
                )
                .ignore();
            }
            if !p.has_work() {
                continue;
            }
            if let Some(args) = p.take_args(&s.owner, false) {
                let mut inv = s.scripts.apply.key(&keys.m);
                inv.key(&keys.o).key(&keys.i);
                for a in &args {
                    inv.arg(a.as_slice());
                }
                pipe.invoke_script(&inv);
                applied.push(pending.clone());
            }
        }
        if applied.is_empty() && !keep {
            continue;
        }
        let result: Result<Vec<Vec<i64>>, StoreError> = lock(&s.link).run(|c| {
            // Pipelined scripts run by hash; load them first (a no-op once Redis has them).
            s.scripts.apply.prepare_invoke().load(c)?;
            s.scripts.keep.prepare_invoke().load(c)?;
            pipe.query(c)
        });
        match result {
            Ok(replies) => {
                for (pending, reply) in applied.iter().zip(replies) {
                    let _ = lock(pending).answer(&reply);
                }
            }
            Err(e) => tracing::warn!(error = %e, "Redis background write failed"),
        }
    }
}
