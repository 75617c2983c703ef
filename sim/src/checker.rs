//! The Jepsen-style ledger: every message attempted, acknowledged, delivered and handed back, and the
//! safety and liveness rules over them.
//!
//! Each payload starts with an 8-byte tag naming its ledger entry (a broadcast shares one tag between
//! its receivers, so an entry is named by the tag and its destination session). Safety is checked as
//! events happen; liveness once the faults have stopped (see [`Checker::finish`]).

use std::collections::BTreeMap;
use std::fmt;

use bytes::Bytes;
use steadfast_core::time::Instant;

/// A sender context: one client incarnation, or one server session in one server incarnation.
pub type Ctx = u32;

/// The destination part of an entry's name: `0` for client-to-server messages, the session id for
/// server-to-client ones.
pub type Dest = u64;

/// How a message was sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MsgMode {
    /// Reliable, ordered.
    Ordered,
    /// Reliable, unordered.
    Unordered,
    /// Reliable, conflated by key.
    Conflated,
    /// At most once, never older after newer.
    Sequenced,
    /// At most once.
    Unreliable,
}

impl MsgMode {
    /// Whether the message must arrive (or be handed back).
    pub fn is_reliable(self) -> bool {
        matches!(
            self,
            MsgMode::Ordered | MsgMode::Unordered | MsgMode::Conflated
        )
    }
}

/// What part a message plays in the workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// A steady-stream message.
    Steady,
    /// A client's call.
    Call,
    /// The server's answer to a call.
    CallReply,
    /// A call fanned out to another client.
    Event,
    /// A client's reply to a fanned-out event.
    EventReply,
}

/// A broken guarantee.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// When it was seen (virtual time).
    pub at: Instant,
    /// Which rule.
    pub rule: &'static str,
    /// What happened.
    pub detail: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "[t={:.6}s] {}: {}",
            self.at.as_nanos() as f64 / 1e9,
            self.rule,
            self.detail
        )
    }
}

#[derive(Debug)]
struct Entry {
    tag: u64,
    dest: Dest,
    sender: Ctx,
    stream: u64,
    mode: MsgMode,
    role: Role,
    /// Position among the sender's ordered/sequenced messages on this stream.
    index: u64,
    seq: Option<u64>,
    len: usize,
    answers: Option<usize>,
    sent_at: Instant,
    delivered: u32,
    delivered_to: Option<Ctx>,
    delivered_seq: Option<u64>,
    acked: bool,
    handed_back: bool,
    superseded: bool,
    crash_lost: bool,
    /// Acknowledged, but the record of it was lost with its sender's store in a machine crash:
    /// the restarted sender may hand it back.
    ack_forgotten: bool,
    /// Sent by a client process that died with its store wiped, and not (yet) delivered.
    client_lost: bool,
    /// A reply to a call whose client process died: nothing awaits it, and the core may drop it.
    orphaned: bool,
    /// How many times the sender's process had crashed when this was sent.
    life: u32,
    resolved: bool,
    /// The entry sent before this one under the same tag (a broadcast's other receivers).
    same_tag: Option<usize>,
}

#[derive(Debug, Default)]
struct CtxState {
    /// Server contexts: the incarnation of the server they belong to.
    server_epoch: Option<u32>,
    /// Reliable messages not yet acknowledged, by sequence number.
    unacked: BTreeMap<u64, usize>,
    /// Next index to hand out, per stream.
    next_index: BTreeMap<u64, u64>,
    /// Receiver's view: next index expected on each ordered stream.
    expect: BTreeMap<u64, u64>,
    /// Receiver's view: highest index seen on each sequenced stream.
    newest: BTreeMap<u64, u64>,
    /// Conflated: the unacknowledged entry per key, by (stream, key).
    conflated: BTreeMap<(u64, u64), usize>,
    /// Client contexts: how many times the process has crashed (a context survives a restart on
    /// a kept store).
    crashes: u32,
}

/// Totals for the summary.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tally {
    /// Messages accepted by `send`/`request`/`reply`/`broadcast` (one per receiver).
    pub attempted: u64,
    /// Of those, reliable.
    pub reliable: u64,
    /// Deliveries to an application.
    pub delivered: u64,
    /// Messages handed back by `SessionLost`/`Closed`.
    pub handed_back: u64,
    /// Conflated values replaced before they were sent.
    pub superseded: u64,
    /// Messages that died with a crashed server process (no durable store).
    pub crash_lost: u64,
    /// Messages a client sent that died with its process, whose store was wiped (or which had
    /// none): the server never got them.
    pub client_crash_lost: u64,
    /// Replies to calls whose client process died, never delivered (nothing awaited them).
    pub orphaned_replies: u64,
    /// Replies checked against the message they answer.
    pub replies_checked: u64,
}

/// The ledger's index of entries by name (tag and destination).
///
/// Tags are handed out in sequence, so the newest entry of each tag is found by indexing a vector
/// with the tag and the others by following [`Entry::same_tag`] back; a tag far beyond any seen so
/// far (never, in the simulator) goes to an ordered map instead.
#[derive(Debug, Default)]
struct Names {
    /// By tag: the newest entry sent under it.
    by_tag: Vec<Option<usize>>,
    /// Entries under tags too far out for `by_tag`.
    sparse: BTreeMap<(u64, Dest), usize>,
}

/// How far past the highest tag seen `Names::by_tag` grows to take a new one.
const DENSE_SLACK: u64 = 1 << 16;

impl Names {
    fn insert(&mut self, entries: &mut [Entry], tag: u64, dest: Dest, idx: usize) {
        let len = self.by_tag.len() as u64;
        if tag < len.saturating_add(DENSE_SLACK) {
            if tag >= len {
                self.by_tag.resize(tag as usize + 1, None);
            }
            entries[idx].same_tag = self.by_tag[tag as usize].replace(idx);
        } else {
            self.sparse.insert((tag, dest), idx);
        }
    }

    /// The newest entry named `(tag, dest)`.
    fn get(&self, entries: &[Entry], tag: u64, dest: Dest) -> Option<usize> {
        let mut dense = usize::try_from(tag)
            .ok()
            .and_then(|t| self.by_tag.get(t).copied().flatten());
        while let Some(idx) = dense {
            if entries[idx].dest == dest {
                break;
            }
            dense = entries[idx].same_tag;
        }
        if self.sparse.is_empty() {
            return dense;
        }
        // A name can be in both if `by_tag` grew past its tag after it went to `sparse`.
        dense.max(self.sparse.get(&(tag, dest)).copied())
    }
}

/// The ledger.
#[derive(Debug, Default)]
pub struct Checker {
    entries: Vec<Entry>,
    names: Names,
    ctxs: Vec<CtxState>,
    outstanding: u64,
    violations: Vec<Violation>,
    tally: Tally,
}

/// The most violations kept per run (the first one matters most).
const MAX_VIOLATIONS: usize = 32;

impl Checker {
    /// A new sender context (a client incarnation, or a server session in server incarnation
    /// `server_epoch`).
    pub fn new_ctx(&mut self, server_epoch: Option<u32>) -> Ctx {
        self.ctxs.push(CtxState {
            server_epoch,
            ..CtxState::default()
        });
        (self.ctxs.len() - 1) as Ctx
    }

    /// Records a violation found outside the ledger (e.g. a livelocked node).
    pub fn report(&mut self, at: Instant, rule: &'static str, detail: String) {
        if self.violations.len() < MAX_VIOLATIONS {
            self.violations.push(Violation { at, rule, detail });
        }
    }

    /// The violations seen so far.
    pub fn violations(&self) -> &[Violation] {
        &self.violations
    }

    /// Reliable messages neither delivered, handed back, replaced, lost with a crashed sender nor
    /// replies orphaned by a crashed caller.
    pub fn outstanding(&self) -> u64 {
        self.outstanding
    }

    /// Totals.
    pub fn tally(&self) -> Tally {
        self.tally
    }

    fn resolve(&mut self, idx: usize) {
        let e = &mut self.entries[idx];
        if !e.resolved {
            e.resolved = true;
            if e.mode.is_reliable() {
                self.outstanding -= 1;
            }
        }
    }

    /// A send was accepted. `replaced`: a conflated value took over the unsent value under `seq`.
    #[allow(clippy::too_many_arguments)]
    pub fn sent(
        &mut self,
        now: Instant,
        sender: Ctx,
        dest: Dest,
        tag: u64,
        stream: u64,
        mode: MsgMode,
        role: Role,
        seq: Option<u64>,
        replaced: bool,
        conflation_key: u64,
        len: usize,
        answers: Option<usize>,
    ) -> usize {
        let idx = self.entries.len();
        let c = &mut self.ctxs[sender as usize];
        let index = match mode {
            MsgMode::Ordered | MsgMode::Sequenced => {
                let n = c.next_index.entry(stream).or_insert(0);
                *n += 1;
                *n - 1
            }
            _ => 0,
        };
        let life = c.crashes;
        let mut superseded = None;
        if let Some(seq) = seq {
            if replaced {
                superseded = c.unacked.insert(seq, idx);
            } else {
                c.unacked.insert(seq, idx);
            }
        }
        if mode == MsgMode::Conflated {
            let prev = c.conflated.insert((stream, conflation_key), idx);
            if replaced && prev != superseded {
                let detail = format!(
                    "conflated send on stream {stream} key {conflation_key} replaced seq {seq:?}, which held another key's value"
                );
                self.report(now, "conflation", detail);
            }
        }
        self.entries.push(Entry {
            tag,
            dest,
            sender,
            stream,
            mode,
            role,
            index,
            seq,
            len,
            answers,
            sent_at: now,
            delivered: 0,
            delivered_to: None,
            delivered_seq: None,
            acked: false,
            handed_back: false,
            superseded: false,
            crash_lost: false,
            ack_forgotten: false,
            client_lost: false,
            orphaned: false,
            life,
            resolved: false,
            same_tag: None,
        });
        self.names.insert(&mut self.entries, tag, dest, idx);
        self.tally.attempted += 1;
        if mode.is_reliable() {
            self.tally.reliable += 1;
            self.outstanding += 1;
            // The server answered a call its client's dead process made.
            if role == Role::CallReply
                && let Some(call) = answers.map(|x| &self.entries[x])
                && call.life < self.ctxs[call.sender as usize].crashes
            {
                self.orphan(idx);
            }
        }
        if let Some(old) = superseded {
            self.entries[old].superseded = true;
            self.tally.superseded += 1;
            if self.entries[old].delivered > 0 {
                let detail = format!(
                    "conflated value tag {} was replaced as unsent after it had been delivered",
                    self.entries[old].tag
                );
                self.report(now, "conflation", detail);
            }
            self.resolve(old);
        }
        idx
    }

    /// The entry a received payload names, or a violation if it names nothing that was sent.
    fn lookup(&mut self, now: Instant, payload: &Bytes, dest: Dest, what: &str) -> Option<usize> {
        let Some(tag) = tag_of(payload) else {
            self.report(
                now,
                "unexpected",
                format!("{what}: a {}-byte payload without a tag", payload.len()),
            );
            return None;
        };
        match self.names.get(&self.entries, tag, dest) {
            Some(idx) => Some(idx),
            None => {
                self.report(
                    now,
                    "unexpected",
                    format!("{what}: tag {tag} for destination {dest:#x} was never sent"),
                );
                None
            }
        }
    }

    /// A message reached the application of context `receiver`. `dest` is the receiving session for
    /// server-to-client messages, 0 for client-to-server ones; `expected_sender` is, for the
    /// latter, the client incarnation that owns the receiving server session.
    #[allow(clippy::too_many_arguments)]
    pub fn delivered(
        &mut self,
        now: Instant,
        receiver: Ctx,
        expected_sender: Option<Ctx>,
        dest: Dest,
        stream: u64,
        seq: Option<u64>,
        payload: &Bytes,
    ) -> Option<usize> {
        let idx = self.lookup(now, payload, dest, "delivery")?;
        self.tally.delivered += 1;
        let e = &self.entries[idx];
        let (tag, sender, mode, index) = (e.tag, e.sender, e.mode, e.index);
        let mut problems: Vec<(&'static str, String)> = Vec::new();
        if e.delivered > 0 {
            let rule = if mode.is_reliable() {
                "duplicate"
            } else {
                "at-most-once"
            };
            problems.push((
                rule,
                format!(
                    "tag {tag} ({:?} {:?} stream {}) delivered {} times",
                    e.role,
                    mode,
                    e.stream,
                    e.delivered + 1
                ),
            ));
        }
        if let Some(exp) = expected_sender
            && exp != sender
        {
            problems.push((
                "misdelivery",
                format!(
                    "tag {tag} from context {sender} delivered on the session of context {exp}"
                ),
            ));
        }
        if e.stream != stream {
            problems.push((
                "misdelivery",
                format!(
                    "tag {tag} sent on stream {} delivered on stream {stream}",
                    e.stream
                ),
            ));
        }
        let fill = [fill_byte(tag); 64];
        // Compared a block at a time (memcmp), not byte by byte: this runs for every delivery.
        let padding_intact = payload[8..].chunks(64).all(|c| c == &fill[..c.len()]);
        if e.len != payload.len() || !padding_intact {
            problems.push((
                "corruption",
                format!(
                    "tag {tag}: {} bytes delivered, {} sent, or the padding differs",
                    payload.len(),
                    e.len
                ),
            ));
        }
        if let (Some(sent), Some(got)) = (e.seq, seq)
            && sent != got
        {
            problems.push((
                "misdelivery",
                format!("tag {tag} sent as seq {sent} delivered as seq {got}"),
            ));
        }
        if e.superseded {
            problems.push((
                "conflation",
                format!("tag {tag} was replaced before sending, yet delivered"),
            ));
        }
        let first = e.delivered == 0;
        let c = &mut self.ctxs[sender as usize];
        if first {
            match mode {
                MsgMode::Ordered => {
                    let expect = c.expect.entry(stream).or_insert(0);
                    if index != *expect {
                        problems.push((
                            "order",
                            format!(
                                "ordered stream {stream} of context {sender}: got message #{index} (tag {tag}) when #{} was next",
                                *expect
                            ),
                        ));
                    }
                    *expect = (*expect).max(index + 1);
                }
                MsgMode::Sequenced => {
                    if let Some(&newest) = c.newest.get(&stream)
                        && index <= newest
                    {
                        problems.push((
                            "order",
                            format!(
                                "sequenced stream {stream} of context {sender}: #{index} after #{newest}"
                            ),
                        ));
                    }
                    c.newest.insert(stream, index);
                }
                _ => {}
            }
        }
        for (rule, detail) in problems {
            self.report(now, rule, detail);
        }
        let e = &mut self.entries[idx];
        // What was written off with a crashed client arrived after all.
        if std::mem::take(&mut e.client_lost) {
            self.tally.client_crash_lost -= 1;
        }
        if std::mem::take(&mut e.orphaned) {
            self.tally.orphaned_replies -= 1;
        }
        e.delivered += 1;
        e.delivered_to.get_or_insert(receiver);
        if e.delivered_seq.is_none() {
            e.delivered_seq = seq;
        }
        self.resolve(idx);
        Some(idx)
    }

    /// A reply arrived: it is a delivery of its own, and it must answer, under the sequence number
    /// `to`, a message that was delivered to the replier.
    #[allow(clippy::too_many_arguments)]
    pub fn reply_received(
        &mut self,
        now: Instant,
        receiver: Ctx,
        expected_sender: Option<Ctx>,
        dest: Dest,
        to: u64,
        payload: &Bytes,
        reply_stream: u64,
    ) {
        let Some(idx) = self.delivered(
            now,
            receiver,
            expected_sender,
            dest,
            reply_stream,
            None,
            payload,
        ) else {
            return;
        };
        self.tally.replies_checked += 1;
        let r = &self.entries[idx];
        let tag = r.tag;
        let Some(x) = r.answers else {
            let detail = format!("tag {tag} arrived as a reply but was not sent as one");
            return self.report(now, "reply", detail);
        };
        let (replier, sent_to) = (r.sender, r.answers);
        let q = &self.entries[x];
        let ok = match r.role {
            // The server answers a call: the call was the receiver's own, under seq `to`.
            Role::CallReply => q.sender == receiver && q.seq == Some(to),
            // A client answers an event: it was delivered to that client under seq `to`.
            _ => q.delivered_to == Some(replier) && q.delivered_seq == Some(to),
        };
        if !ok {
            let detail = format!(
                "reply tag {tag} names seq {to}, but the message it answers (tag {}, entry {sent_to:?}) was sent as {:?} and delivered as {:?} to {:?}",
                q.tag, q.seq, q.delivered_seq, q.delivered_to
            );
            self.report(now, "reply", detail);
        }
    }

    /// Context `sender`'s peer acknowledged everything below `below`.
    pub fn acknowledged(&mut self, now: Instant, sender: Ctx, below: u64) {
        while let Some(entry) = self.ctxs[sender as usize].unacked.first_entry() {
            if *entry.key() >= below {
                break;
            }
            let idx = entry.remove();
            let e = &mut self.entries[idx];
            e.acked = true;
            if e.mode == MsgMode::Conflated {
                let key = self.ctxs[sender as usize]
                    .conflated
                    .iter()
                    .find(|(_, v)| **v == idx)
                    .map(|(k, _)| *k);
                if let Some(k) = key {
                    self.ctxs[sender as usize].conflated.remove(&k);
                }
            }
            let e = &self.entries[idx];
            // A reply whose caller died may be received and dropped: nothing awaited it.
            if e.delivered == 0 && !e.orphaned {
                let detail = format!(
                    "tag {} ({:?} {:?} stream {} seq {:?}) acknowledged but never delivered",
                    e.tag, e.role, e.mode, e.stream, e.seq
                );
                self.report(now, "acked-then-lost", detail);
            }
        }
    }

    /// A session of context `sender` ended and handed these payloads back. Returns how many of
    /// them had been acknowledged before a machine crash made their sender forget it.
    pub fn handed_back(
        &mut self,
        now: Instant,
        sender: Ctx,
        dest: Dest,
        payloads: &[Bytes],
    ) -> u64 {
        let mut forgotten = 0;
        for p in payloads {
            let Some(idx) = self.lookup(now, p, dest, "hand-back") else {
                continue;
            };
            self.tally.handed_back += 1;
            let e = &mut self.entries[idx];
            if e.sender != sender {
                let detail = format!(
                    "context {sender} handed back tag {}, which context {} sent",
                    e.tag, e.sender
                );
                self.report(now, "hand-back", detail);
            }
            let e = &mut self.entries[idx];
            if e.acked && !e.ack_forgotten {
                let detail = format!("tag {} handed back after it was acknowledged", e.tag);
                self.report(now, "hand-back", detail);
            }
            let e = &self.entries[idx];
            forgotten += u64::from(e.acked && e.ack_forgotten);
            if std::mem::take(&mut self.entries[idx].orphaned) {
                self.tally.orphaned_replies -= 1;
            }
            self.entries[idx].handed_back = true;
            self.resolve(idx);
        }
        self.ctxs[sender as usize].unacked.clear();
        forgotten
    }

    /// The server process of incarnation `epoch` crashed: what its sessions had not yet delivered
    /// died with it (there is no durable store).
    pub fn server_crashed(&mut self, epoch: u32) {
        for idx in 0..self.entries.len() {
            let e = &self.entries[idx];
            if e.resolved
                || !e.mode.is_reliable()
                || self.ctxs[e.sender as usize].server_epoch != Some(epoch)
            {
                continue;
            }
            self.entries[idx].crash_lost = true;
            self.tally.crash_lost += 1;
            self.resolve(idx);
        }
    }

    /// Client context `ctx`'s process crashed. Replies to the calls it made have nothing left to
    /// resolve: the core may drop them (a reply is consumed on arrival and does not outlive its
    /// request), so they are written off unless they still arrive. With `lost` (its store was
    /// wiped, or it had none) the session dies with the process: what it sent and the server has
    /// not received is written off too, as with a crashed server, unless it still arrives.
    pub fn client_crashed(&mut self, ctx: Ctx, lost: bool) {
        self.ctxs[ctx as usize].crashes += 1;
        for idx in 0..self.entries.len() {
            let e = &self.entries[idx];
            if e.resolved || !e.mode.is_reliable() {
                continue;
            }
            if lost && e.sender == ctx {
                self.entries[idx].client_lost = true;
                self.tally.client_crash_lost += 1;
                self.resolve(idx);
            } else if e.role == Role::CallReply
                && e.answers.is_some_and(|x| self.entries[x].sender == ctx)
            {
                self.orphan(idx);
            }
        }
    }

    /// Client context `ctx`'s store lost the record of acknowledgements in a machine crash: of its
    /// messages the peer acknowledged, those from `below` on are unacknowledged again as far as
    /// its next process knows. Returns how many.
    pub fn acks_forgotten(&mut self, ctx: Ctx, below: u64) -> u64 {
        let mut n = 0;
        for e in &mut self.entries {
            if e.sender == ctx && e.acked && e.seq.is_some_and(|s| s >= below) {
                e.ack_forgotten = true;
                n += 1;
            }
        }
        n
    }

    fn orphan(&mut self, idx: usize) {
        self.entries[idx].orphaned = true;
        self.tally.orphaned_replies += 1;
        self.resolve(idx);
    }

    /// Whether the application at destination `dest` has already taken the message `payload`
    /// names: the client application's own ledger, which survives its process.
    pub fn taken(&self, payload: &Bytes, dest: Dest) -> bool {
        tag_of(payload)
            .and_then(|tag| self.names.get(&self.entries, tag, dest))
            .is_some_and(|idx| self.entries[idx].delivered > 0)
    }

    /// The liveness check, once the faults have stopped and the bound has passed: every reliable
    /// message was delivered, handed back, replaced while unsent, died with a crashed server or a
    /// crashed client whose store was wiped, or answers a call of a crashed client process.
    pub fn finish(&mut self, now: Instant, heal_at: Instant) {
        let lost: Vec<usize> = (0..self.entries.len())
            .filter(|&i| !self.entries[i].resolved && self.entries[i].mode.is_reliable())
            .collect();
        let n = lost.len();
        for idx in lost.into_iter().take(8) {
            let e = &self.entries[idx];
            let detail = format!(
                "tag {} to {:#x} ({:?} {:?} stream {} seq {:?}, sent at {:.3}s by context {}, acked={}) neither delivered nor handed back {:.3}s after the faults stopped ({n} such)",
                e.tag,
                e.dest,
                e.role,
                e.mode,
                e.stream,
                e.seq,
                e.sent_at.as_nanos() as f64 / 1e9,
                e.sender,
                e.acked,
                (now - heal_at).as_secs_f64(),
            );
            self.report(now, "liveness", detail);
        }
    }
}

/// The tag a payload carries, if it has one.
pub fn tag_of(payload: &Bytes) -> Option<u64> {
    let head: [u8; 8] = payload.get(..8)?.try_into().ok()?;
    Some(u64::from_le_bytes(head))
}

/// The padding byte of a tag's payload.
pub fn fill_byte(tag: u64) -> u8 {
    (tag % 251) as u8 ^ 0xa5
}

/// A payload of `len` bytes (at least 9) carrying `tag`.
pub fn payload(tag: u64, len: usize) -> Bytes {
    let mut v = Vec::with_capacity(len.max(9));
    v.extend_from_slice(&tag.to_le_bytes());
    v.resize(len.max(9), fill_byte(tag));
    Bytes::from(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn send(c: &mut Checker, tag: u64, dest: Dest) -> usize {
        c.sent(
            Instant::ZERO,
            0,
            dest,
            tag,
            1,
            MsgMode::Unordered,
            Role::Steady,
            None,
            false,
            0,
            16,
            None,
        )
    }

    /// A reliable ordered message from `sender` with sequence number `seq`.
    fn call(c: &mut Checker, sender: Ctx, tag: u64, seq: u64) -> usize {
        c.sent(
            Instant::ZERO,
            sender,
            0,
            tag,
            1,
            MsgMode::Ordered,
            Role::Call,
            Some(seq),
            false,
            0,
            16,
            None,
        )
    }

    /// The server's reply (tag `tag`, sequence number `seq`) to the call entry `to`.
    fn reply(c: &mut Checker, server: Ctx, tag: u64, seq: u64, to: usize) -> usize {
        c.sent(
            Instant::ZERO,
            server,
            7,
            tag,
            1 << 61,
            MsgMode::Ordered,
            Role::CallReply,
            Some(seq),
            false,
            0,
            16,
            Some(to),
        )
    }

    #[test]
    fn what_a_client_with_a_wiped_store_never_sent_is_written_off_until_it_arrives_after_all() {
        let mut c = Checker::default();
        let client = c.new_ctx(None);
        call(&mut c, client, 1, 0);
        call(&mut c, client, 2, 1);
        c.client_crashed(client, true);
        assert_eq!((c.outstanding(), c.tally().client_crash_lost), (0, 2));
        // The first was on the wire when the process died.
        c.delivered(Instant::ZERO, 9, None, 0, 1, Some(0), &payload(1, 16));
        assert_eq!(c.tally().client_crash_lost, 1);
        assert!(c.violations().is_empty(), "{:?}", c.violations());
    }

    #[test]
    fn a_client_restarted_on_its_kept_store_still_owes_everything_it_sent() {
        let mut c = Checker::default();
        let client = c.new_ctx(None);
        call(&mut c, client, 1, 0);
        c.client_crashed(client, false);
        assert_eq!(c.outstanding(), 1);
        c.finish(Instant::ZERO, Instant::ZERO);
        assert_eq!(c.violations()[0].rule, "liveness");
    }

    #[test]
    fn replies_to_calls_of_a_dead_process_are_written_off_and_the_new_process_is_owed_its_own() {
        let mut c = Checker::default();
        let (client, server) = (c.new_ctx(None), c.new_ctx(Some(0)));
        let old = call(&mut c, client, 1, 0);
        reply(&mut c, server, 2, 0, old);
        c.client_crashed(client, false);
        // The restarted process resent the old call; the server answers it only now.
        reply(&mut c, server, 3, 1, old);
        let new = call(&mut c, client, 4, 1);
        reply(&mut c, server, 5, 2, new);
        assert_eq!(c.tally().orphaned_replies, 2);
        // Still owed: both calls, and the reply to the new one.
        assert_eq!(c.outstanding(), 3);
        // A written-off reply received and dropped by the core is no acked-then-lost.
        c.acknowledged(Instant::ZERO, server, 2);
        assert!(c.violations().is_empty(), "{:?}", c.violations());
    }

    #[test]
    fn a_hand_back_may_include_what_was_acknowledged_only_if_a_power_loss_made_the_sender_forget() {
        for forgot in [false, true] {
            let mut c = Checker::default();
            let client = c.new_ctx(None);
            call(&mut c, client, 1, 0);
            c.delivered(Instant::ZERO, 9, None, 0, 1, Some(0), &payload(1, 16));
            c.acknowledged(Instant::ZERO, client, 1);
            if forgot {
                assert_eq!(c.acks_forgotten(client, 0), 1);
            }
            let n = c.handed_back(Instant::ZERO, client, 0, &[payload(1, 16)]);
            assert_eq!(n, u64::from(forgot));
            assert_eq!(c.violations().is_empty(), forgot, "{:?}", c.violations());
        }
    }

    /// Every name finds its newest entry, for a broadcast's shared tag, a tag far out of sequence,
    /// and a name sent twice.
    #[test]
    fn names_find_the_newest_entry_of_a_tag_and_destination() {
        let mut c = Checker::default();
        c.new_ctx(None);
        let a = send(&mut c, 1, 7);
        let b = send(&mut c, 1, 8);
        let far = send(&mut c, u64::MAX - 3, 7);
        let d = send(&mut c, 2, 0);
        let late = send(&mut c, 70_000, 7); // past the slack: sparse
        let grown = send(&mut c, 60_000, 7); // dense, which grows the index past 70_000
        let again = send(&mut c, 70_000, 7); // now dense, and newer than the sparse one
        let n = &c.names;
        assert_eq!(n.get(&c.entries, 1, 7), Some(a));
        assert_eq!(n.get(&c.entries, 1, 8), Some(b));
        assert_eq!(n.get(&c.entries, 1, 9), None);
        assert_eq!(n.get(&c.entries, u64::MAX - 3, 7), Some(far));
        assert_eq!(n.get(&c.entries, u64::MAX, 7), None);
        assert_eq!(n.get(&c.entries, 2, 0), Some(d));
        assert_eq!(n.get(&c.entries, 60_000, 7), Some(grown));
        assert_eq!(n.get(&c.entries, 70_000, 7), Some(again));
        assert_ne!(late, again);
        let b2 = send(&mut c, 1, 8);
        assert_eq!(c.names.get(&c.entries, 1, 8), Some(b2));
        assert_eq!(c.names.get(&c.entries, 1, 7), Some(a));
    }
}
