//! The Lua scripts that keep a session's record in Redis consistent: each runs atomically, and
//! each write by a server checks first that the server still owns the session at the epoch it
//! claimed (the fence).
//!
//! Per session `S` under the prefix `P` (hash-tagged, so one session's keys share a slot):
//! - `P:{S}:m`, a hash: `tok` (the resume token), `ep` (attach epoch), `own` (owning server),
//!   `nx` (next outbound sequence number), `ttl` (ms), `wm` and `rg` (the inbound de-dup watermark
//!   and the ranges above it, `start-end,…`);
//! - `P:{S}:o`, a sorted set: the outbound messages not yet known acknowledged, scored by sequence
//!   number, each `seq|stream|unordered|payload`;
//! - `P:{S}:i`, a hash: inbound messages not yet consumed, `seq` → `stream|unordered|payload`;
//! - `P:sessions`, a set of every session id, for fan-out; entries whose session expired are
//!   dropped by the fan-out that finds them gone.
//!
//! Every key of a session expires by Redis's own TTL (`PEXPIRE`), renewed by its owner's writes
//! and keep-alives, never by a publisher.

/// KEYS: m o i sessions. ARGV: token, epoch, owner, ttl ms, session id.
pub(crate) const CREATE: &str = r#"
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
redis.call('HSET', KEYS[1], 'tok', ARGV[1], 'ep', ARGV[2], 'own', ARGV[3], 'nx', 0, 'ttl', ARGV[4], 'wm', 0, 'rg', '')
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('SADD', KEYS[4], ARGV[5])
return 0
"#;

/// KEYS: m o i. ARGV: epoch, owner. Returns `{0}` claimed, `{1, current}` fenced, `{-1}` gone.
pub(crate) const CLAIM: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 0 then return {-1} end
local ep = tonumber(redis.call('HGET', KEYS[1], 'ep'))
local own = redis.call('HGET', KEYS[1], 'own')
local want = tonumber(ARGV[1])
if want > ep or (want == ep and own == ARGV[2]) then
  redis.call('HSET', KEYS[1], 'ep', ARGV[1], 'own', ARGV[2])
  local ttl = redis.call('HGET', KEYS[1], 'ttl')
  for i = 1, 3 do redis.call('PEXPIRE', KEYS[i], ttl) end
  return {0}
end
return {1, ep}
"#;

/// KEYS: m o i. ARGV: epoch, owner, acknowledged-below or '', watermark or '', ranges,
/// arrivals count, then (seq, value) pairs, then consumed seqs.
/// Returns `{0}` applied, `{1, current}` fenced, `{-1}` gone.
pub(crate) const APPLY: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 0 then return {-1} end
local ep = redis.call('HGET', KEYS[1], 'ep')
if ep ~= ARGV[1] or redis.call('HGET', KEYS[1], 'own') ~= ARGV[2] then
  return {1, tonumber(ep)}
end
if ARGV[3] ~= '' then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', '(' .. ARGV[3])
end
if ARGV[4] ~= '' and tonumber(ARGV[4]) >= tonumber(redis.call('HGET', KEYS[1], 'wm')) then
  redis.call('HSET', KEYS[1], 'wm', ARGV[4], 'rg', ARGV[5])
end
local n = tonumber(ARGV[6])
local at = 7
for _ = 1, n do
  redis.call('HSET', KEYS[3], ARGV[at], ARGV[at + 1])
  at = at + 2
end
while at <= #ARGV do
  redis.call('HDEL', KEYS[3], ARGV[at])
  at = at + 1
end
local ttl = redis.call('HGET', KEYS[1], 'ttl')
for i = 1, 3 do redis.call('PEXPIRE', KEYS[i], ttl) end
return {0}
"#;

/// KEYS: m o i sessions. ARGV: epoch, owner, session id. Returns as [`APPLY`].
pub(crate) const CLEAR: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 0 then return {-1} end
local ep = redis.call('HGET', KEYS[1], 'ep')
if ep ~= ARGV[1] or redis.call('HGET', KEYS[1], 'own') ~= ARGV[2] then
  return {1, tonumber(ep)}
end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
redis.call('SREM', KEYS[4], ARGV[3])
return {0}
"#;

/// KEYS: m o i. ARGV: owner. Renews the TTL of a session this server still owns.
pub(crate) const KEEP: &str = r#"
if redis.call('HGET', KEYS[1], 'own') ~= ARGV[1] then return 0 end
local ttl = redis.call('HGET', KEYS[1], 'ttl')
for i = 1, 3 do redis.call('PEXPIRE', KEYS[i], ttl) end
return 1
"#;

/// Appends one message to a session's outbound queue under the next sequence number and rings
/// its owner's doorbell (used by [`publish`]); returns the sequence number,
/// -1 if the session is gone, -2 if its queue is full.
const APPEND: &str = r#"
local function append(prefix, sid, max, stream, unordered, payload)
  local m = prefix .. ':{' .. sid .. '}:m'
  local o = prefix .. ':{' .. sid .. '}:o'
  if redis.call('EXISTS', m) == 0 then return -1, nil end
  if redis.call('ZCARD', o) >= max then return -2, nil end
  local seq = redis.call('HINCRBY', m, 'nx', 1) - 1
  local fresh = redis.call('EXISTS', o) == 0
  redis.call('ZADD', o, seq, seq .. '|' .. stream .. '|' .. unordered .. '|' .. payload)
  -- A queue created here expires with its session, not later.
  if fresh then redis.call('PEXPIRE', o, redis.call('PTTL', m)) end
  return seq, redis.call('HGET', m, 'own')
end
"#;

/// KEYS: none (the session's keys are built from ARGV, so a single Redis, not Redis Cluster).
/// ARGV: prefix, session id, max queued, stream, unordered, payload.
/// Returns the sequence number, -1 gone, -2 full.
pub(crate) fn publish() -> String {
    format!(
        "{APPEND}\n{}",
        r#"
local seq, own = append(ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4], ARGV[5], ARGV[6])
if own then redis.call('PUBLISH', ARGV[1] .. ':door:' .. own, ARGV[2]) end
return seq
"#
    )
}

/// ARGV: prefix, max queued, then (stream, unordered, payload) per event. Appends the events, in
/// order, to every session: per session one check, one `HINCRBY` for all their numbers and one
/// `ZADD`, so a batch costs a few commands per session rather than several per event; each owner
/// is rung once with the ids of its sessions. A session whose queue fills takes the events that
/// fit and counts the rest full, as one append at a time would. Returns `{appended, full}` per
/// event.
pub(crate) const BROADCAST: &str = r#"
local prefix = ARGV[1]
local max = tonumber(ARGV[2])
local sessions = prefix .. ':sessions'
local n = math.floor((#ARGV - 2) / 3)
local appended, full = {}, {}
for e = 1, n do appended[e] = 0; full[e] = 0 end
local rings = {}
for _, sid in ipairs(redis.call('SMEMBERS', sessions)) do
  local m = prefix .. ':{' .. sid .. '}:m'
  local o = prefix .. ':{' .. sid .. '}:o'
  if redis.call('EXISTS', m) == 0 then
    redis.call('SREM', sessions, sid)
  else
    local k = math.min(n, math.max(0, max - redis.call('ZCARD', o)))
    if k > 0 then
      local first = redis.call('HINCRBY', m, 'nx', k) - k
      local fresh = redis.call('EXISTS', o) == 0
      -- In chunks, to stay within Lua's stack for `unpack`.
      local at = 1
      while at <= k do
        local args = {}
        for e = at, math.min(k, at + 499) do
          local seq = first + e - 1
          local a = 3 + (e - 1) * 3
          args[#args + 1] = seq
          args[#args + 1] = seq .. '|' .. ARGV[a] .. '|' .. ARGV[a + 1] .. '|' .. ARGV[a + 2]
        end
        redis.call('ZADD', o, unpack(args))
        at = at + 500
      end
      -- A queue created here expires with its session, not later.
      if fresh then redis.call('PEXPIRE', o, redis.call('PTTL', m)) end
      local own = redis.call('HGET', m, 'own')
      if rings[own] then table.insert(rings[own], sid) else rings[own] = {sid} end
    end
    for e = 1, n do
      if e <= k then appended[e] = appended[e] + 1 else full[e] = full[e] + 1 end
    end
  end
end
for own, sids in pairs(rings) do
  redis.call('PUBLISH', prefix .. ':door:' .. own, table.concat(sids, ','))
end
local out = {}
for e = 1, n do out[#out + 1] = appended[e]; out[#out + 1] = full[e] end
return out
"#;
