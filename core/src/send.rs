//! The send side: the bounded queue, the in-flight window, ack processing and retransmission.
//!
//! Every message gets the next sequence number when it is queued, and stays in one table from then
//! until the peer acknowledges it. The table is a ring indexed by `seq - base` (no per-message
//! allocation once it has grown), bounded by `max_queued_messages` and `max_queued_bytes`; a `send`
//! past either bound is refused with [`SendError::QueueFull`], handing the payload back.
//!
//! On datagram transports a message is declared lost when something sent after it was acknowledged and
//! either three later sequence numbers were acknowledged or 9/8 of an RTT has passed (RFC 9002's
//! thresholds, by send time because a retransmission reuses its sequence number), or when the
//! retransmission timeout (RFC 6298, with backoff) expires. On stream transports nothing is
//! retransmitted within a connection.

use alloc::boxed::Box;
use alloc::collections::{BTreeMap, VecDeque};
use core::fmt;

use bytes::Bytes;

use crate::Seq;
use crate::config::{Config, Transport};
use crate::rtt::RttEstimator;
use crate::time::{Duration, Instant, earliest};

/// Later transmissions acknowledged before a gap counts as a loss, to begin with (RFC 9002).
const INITIAL_REORDER_THRESHOLD: u64 = 3;

/// The widest the reordering threshold grows on a path that reorders.
const MAX_REORDER_THRESHOLD: u64 = 256;

/// Why [`crate::Channel::send`] refused a message. Each variant hands the payload back.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SendError {
    /// Backpressure: the queue holds `max_queued_messages` messages or `max_queued_bytes` bytes.
    /// Retry after an [`crate::Event::Acknowledged`] frees room.
    QueueFull(Bytes),
    /// The payload is larger than a frame can carry ([`Config::max_payload`]).
    TooLarge(Bytes),
    /// The channel is closed.
    Closed(Bytes),
    /// The stream id is reserved (replies use the ids from [`crate::session::REPLY_STREAM`] up).
    InvalidStream(Bytes),
}

impl SendError {
    /// The refused payload.
    pub fn into_payload(self) -> Bytes {
        match self {
            SendError::QueueFull(b)
            | SendError::TooLarge(b)
            | SendError::Closed(b)
            | SendError::InvalidStream(b) => b,
        }
    }
}

impl fmt::Display for SendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SendError::QueueFull(_) => f.write_str("send queue full (backpressure)"),
            SendError::TooLarge(b) => {
                write!(f, "payload of {} bytes exceeds the frame size", b.len())
            }
            SendError::Closed(_) => f.write_str("channel closed"),
            SendError::InvalidStream(_) => f.write_str("stream id reserved for replies"),
        }
    }
}

impl core::error::Error for SendError {}

/// The peer acknowledged a sequence number that was never sent: a broken or hostile peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AckOfUnsent {
    /// One past the highest sequence number the peer claims.
    pub acked_end: Seq,
    /// One past the highest sequence number ever sent.
    pub sent_end: Seq,
}

/// One queued message: a cache line each, since a deep queue's slots outgrow the caches and are
/// met three times each (queued, sent, acknowledged).
#[derive(Debug)]
#[repr(align(64))]
struct Slot {
    stream: u64,
    payload: Bytes,
    /// Delivered on arrival: a selective ack of it means delivered.
    unordered: bool,
    /// Unsent under a conflation key, which [`Conflation`] holds, and may still be replaced by a
    /// newer value.
    keyed: bool,
    /// When it was last put on the wire; `None` while waiting for its first transmission.
    sent_at: Option<Instant>,
    /// The send-order number of its last transmission (sequence numbers are reused on retransmission,
    /// so loss thresholds count in this order instead, as QUIC's packet numbers do).
    sent_order: u64,
    transmissions: u32,
    acked: bool,
    /// In the retransmit queue (so it is queued at most once).
    lost: bool,
}

impl Slot {
    /// It, message `seq`, went on the wire at `now`, as transmission `order` in send order.
    #[inline]
    fn on_wire(&mut self, seq: Seq, now: Instant, order: u64, conflation: &mut Conflation) {
        // Once on the wire a value can no longer be replaced.
        if self.keyed {
            self.keyed = false;
            conflation.sent(self.stream, seq);
        }
        self.sent_at = Some(now);
        self.sent_order = order;
        self.transmissions = self.transmissions.saturating_add(1);
        self.lost = false;
    }
}

/// What one ack changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AckOutcome {
    /// Messages acknowledged for the first time (cumulatively or selectively).
    pub newly_acked: u64,
    /// The cumulative point moved: every message below the new [`Sender::base`] is acknowledged.
    pub base_advanced: bool,
    /// Messages newly declared lost and queued for retransmission.
    pub declared_lost: u64,
}

/// What a timeout did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TimeoutOutcome {
    /// Messages newly declared lost and queued for retransmission.
    pub declared_lost: u64,
    /// The retransmission timer expired (and backed off).
    pub rto_expired: bool,
}

/// A message ready for the wire, borrowed from the sender's table.
#[derive(Debug)]
pub struct Outgoing<'a> {
    /// Its stream.
    pub stream: u64,
    /// Its sequence number.
    pub seq: Seq,
    /// Its payload.
    pub payload: &'a [u8],
    /// Whether it was sent before.
    pub retransmission: bool,
    /// Whether the peer may deliver it before earlier messages.
    pub unordered: bool,
}

/// What [`Sender::push`] did with a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    /// Queued under a new sequence number.
    Queued(Seq),
    /// It replaced the unsent value of the same conflation key, which keeps its sequence number.
    Replaced(Seq),
}

impl Pushed {
    /// The sequence number the message travels under.
    pub fn seq(self) -> Seq {
        match self {
            Pushed::Queued(s) | Pushed::Replaced(s) => s,
        }
    }
}

/// The retransmit queue, made at its first entry: most channels never lose a message (on streams
/// only a resume fills it), and an empty `VecDeque` inline costs 32 B per channel, a box 8.
// The box is the point: 8 B inline while empty, paid for by one allocation at first use.
#[allow(clippy::box_collection)]
#[derive(Debug, Default)]
struct Retransmit(Option<Box<VecDeque<Seq>>>);

impl Retransmit {
    fn front(&self) -> Option<&Seq> {
        self.0.as_ref()?.front()
    }

    fn pop_front(&mut self) -> Option<Seq> {
        self.0.as_mut()?.pop_front()
    }

    fn push_back(&mut self, seq: Seq) {
        self.0.get_or_insert_with(Box::default).push_back(seq);
    }

    /// Empties the queue but keeps its room, as `VecDeque::clear` does.
    fn clear(&mut self) {
        if let Some(q) = self.0.as_mut() {
            q.clear();
        }
    }

    fn iter(&self) -> impl Iterator<Item = &Seq> {
        self.0.iter().flat_map(|q| q.iter())
    }

    fn is_empty(&self) -> bool {
        self.0.as_ref().is_none_or(|q| q.is_empty())
    }

    fn len(&self) -> usize {
        self.0.as_ref().map_or(0, |q| q.len())
    }
}

/// Unsent conflatable messages by (stream, key), and each one's key by its sequence number (kept
/// here, not in its slot, which it would take past a cache line). Made at the first keyed
/// message: most channels never send one, and two empty `BTreeMap`s inline cost 48 B per channel,
/// a box 8.
#[derive(Debug, Default)]
struct Conflation(Option<Box<Keys>>);

#[derive(Debug, Default)]
struct Keys {
    by_key: BTreeMap<(u64, u64), Seq>,
    by_seq: BTreeMap<Seq, u64>,
}

impl Conflation {
    fn get(&self, key: &(u64, u64)) -> Option<&Seq> {
        self.0.as_ref()?.by_key.get(key)
    }

    fn insert(&mut self, key: (u64, u64), seq: Seq) {
        let keys = self.0.get_or_insert_with(Box::default);
        keys.by_key.insert(key, seq);
        keys.by_seq.insert(seq, key.1);
    }

    /// Message `seq` on `stream` went on the wire: its key no longer names an unsent value.
    fn sent(&mut self, stream: u64, seq: Seq) {
        if let Some(keys) = self.0.as_mut()
            && let Some(k) = keys.by_seq.remove(&seq)
        {
            keys.by_key.remove(&(stream, k));
        }
    }

    fn clear(&mut self) {
        if let Some(keys) = self.0.as_mut() {
            keys.by_key.clear();
            keys.by_seq.clear();
        }
    }
}

/// The sending half of a channel.
#[derive(Debug)]
pub struct Sender {
    /// The lowest unacknowledged sequence number; `slots[0]` holds it.
    base: Seq,
    slots: VecDeque<Slot>,
    /// The lowest sequence number never sent.
    next_unsent: Seq,
    /// One past the highest sequence number ever sent; acks beyond it are a protocol violation.
    sent_end: Seq,
    retransmit: Retransmit,
    queued_bytes: usize,
    rtt: RttEstimator,
    rto_backoff: u32,
    rto_at: Option<Instant>,
    loss_at: Option<Instant>,
    /// Send-order number of the next transmission.
    next_order: u64,
    /// How many later transmissions must be acknowledged before a gap counts as a loss: 3, as in
    /// TCP and QUIC, widened when the path proves to reorder.
    reorder_threshold: u64,
    /// One past the newest acknowledged transmission's send-order number (0: none yet): anything
    /// sent before that one may be lost. A count, not an `Option`, to keep a session's memory
    /// within its bound.
    acked_order_end: u64,
    /// The cumulative acknowledgement point when the queue was drained at the channel's end,
    /// after which `base` stands past the messages handed back.
    drained_base: Seq,
    transport: Transport,
    /// Unsent conflatable messages by (stream, key).
    conflation: Conflation,
    #[cfg(feature = "canary")]
    canary: Option<crate::canary::Canary>,
    max_messages: usize,
    max_bytes: usize,
    max_payload: usize,
    in_flight_limit: u64,
}

impl Sender {
    /// Lets go of the unacknowledged queue's spare room.
    pub(crate) fn shrink_queues(&mut self) {
        self.slots.shrink_to_fit();
    }

    #[cfg(test)]
    pub(crate) fn queue_room(&self) -> usize {
        self.slots.capacity() - self.slots.len()
    }

    /// An empty sender whose first message gets sequence number 0.
    pub fn new(config: &Config) -> Self {
        Sender {
            base: 0,
            slots: VecDeque::new(),
            next_unsent: 0,
            sent_end: 0,
            retransmit: Retransmit::default(),
            queued_bytes: 0,
            rtt: RttEstimator::new(
                config.initial_rtt,
                config.max_ack_delay,
                config.min_rto,
                config.max_rto,
            ),
            rto_backoff: 0,
            rto_at: None,
            loss_at: None,
            next_order: 0,
            reorder_threshold: INITIAL_REORDER_THRESHOLD,
            acked_order_end: 0,
            drained_base: 0,
            transport: config.transport,
            conflation: Conflation::default(),
            #[cfg(feature = "canary")]
            canary: config.canary,
            max_messages: config.max_queued_messages,
            max_bytes: config.max_queued_bytes,
            max_payload: config.max_payload(),
            in_flight_limit: config.in_flight_limit(config.recv_window),
        }
    }

    /// Queues a message and returns its sequence number.
    ///
    /// With a conflation `key`, a message still unsent under the same stream and key is replaced in
    /// place (keeping its sequence number and position) instead of queueing another: only the newest
    /// unsent value per key is kept, so a conflated stream needs no room for a key it already holds.
    pub fn push(
        &mut self,
        stream: u64,
        payload: Bytes,
        unordered: bool,
        key: Option<u64>,
    ) -> Result<Pushed, SendError> {
        if payload.len() > self.max_payload {
            return Err(SendError::TooLarge(payload));
        }
        if let Some(k) = key
            && let Some(&seq) = self.conflation.get(&(stream, k))
        {
            let base = self.base;
            if let Some(slot) = self.slots.get_mut((seq - base) as usize)
                && slot.sent_at.is_none()
            {
                let bytes = self.queued_bytes - slot.payload.len() + payload.len();
                if bytes > self.max_bytes {
                    return Err(SendError::QueueFull(payload));
                }
                self.queued_bytes = bytes;
                slot.payload = payload;
                slot.unordered = unordered;
                return Ok(Pushed::Replaced(seq));
            }
        }
        if self.slots.len() >= self.max_messages
            || self.queued_bytes.saturating_add(payload.len()) > self.max_bytes
        {
            return Err(SendError::QueueFull(payload));
        }
        let seq = self.end();
        self.queued_bytes += payload.len();
        if let Some(k) = key {
            self.conflation.insert((stream, k), seq);
        }
        self.slots.push_back(Slot {
            stream,
            payload,
            unordered,
            keyed: key.is_some(),
            sent_at: None,
            sent_order: 0,
            transmissions: 0,
            acked: false,
            lost: false,
        });
        Ok(Pushed::Queued(seq))
    }

    /// The next message to put on the wire, if any may go now: lost messages first, then new ones
    /// within the in-flight limit. Call [`Sender::on_sent`] once it is written.
    pub fn peek(&mut self) -> Option<Outgoing<'_>> {
        // Drop retransmit entries that an ack overtook.
        while let Some(&seq) = self.retransmit.front() {
            match self.slot(seq) {
                Some(s) if !s.acked => break,
                _ => {
                    self.retransmit.pop_front();
                }
            }
        }
        let (seq, retransmission) = match self.retransmit.front() {
            Some(&seq) => (seq, true),
            None if self.may_send_new() => (self.next_unsent, false),
            None => return None,
        };
        let s = self.slot(seq)?;
        Some(Outgoing {
            stream: s.stream,
            seq,
            payload: &s.payload,
            retransmission,
            unordered: s.unordered,
        })
    }

    /// Records that the message [`Sender::peek`] returned went on the wire at `now`.
    pub fn on_sent(&mut self, now: Instant) {
        let seq = match self.retransmit.pop_front() {
            Some(seq) => seq,
            None => {
                let seq = self.next_unsent;
                self.next_unsent += 1;
                self.sent_end = self.sent_end.max(self.next_unsent);
                seq
            }
        };
        let base = self.base;
        if let Some(s) = self.slots.get_mut((seq - base) as usize) {
            s.on_wire(seq, now, self.next_order, &mut self.conflation);
        }
        self.next_order += 1;
        self.start_rto(now);
    }

    /// RFC 6298 (5.1): start the timer when data goes out and it is not running.
    #[inline]
    fn start_rto(&mut self, now: Instant) {
        if self.transport == Transport::Datagram && self.rto_at.is_none() {
            self.rto_at = Some(now + self.rtt.rto_with_backoff(self.rto_backoff));
        }
    }

    /// Puts never-sent messages on the wire in order, as [`Sender::peek`] and [`Sender::on_sent`]
    /// would one at a time, while nothing waits for retransmission and the in-flight window has
    /// room: `write` gets each one and says whether it went out (`false`: no room, stop there).
    /// Returns how many went out.
    pub(crate) fn send_fresh(
        &mut self,
        now: Instant,
        mut write: impl FnMut(&Outgoing<'_>) -> bool,
    ) -> u64 {
        if !self.retransmit.is_empty() {
            return 0;
        }
        let end = self
            .end()
            .min(self.base.saturating_add(self.in_flight_limit));
        let first = self.next_unsent;
        let mut seq = first;
        // From the first unsent slot on, in order: one walk instead of a lookup per message.
        let skip = usize::try_from(first - self.base).unwrap_or(usize::MAX);
        for s in self.slots.range_mut(skip.min(self.slots.len())..) {
            if seq >= end {
                break;
            }
            let out = Outgoing {
                stream: s.stream,
                seq,
                payload: &s.payload,
                retransmission: false,
                unordered: s.unordered,
            };
            if !write(&out) {
                break;
            }
            s.on_wire(seq, now, self.next_order, &mut self.conflation);
            self.next_order += 1;
            seq += 1;
        }
        let sent = seq - first;
        if sent > 0 {
            self.next_unsent = seq;
            self.sent_end = self.sent_end.max(seq);
            self.start_rto(now);
        }
        sent
    }

    /// Takes an ack: every sequence number below `cumulative` and in `ranges` has arrived;
    /// `ack_delay` is how long the peer held the ack back.
    pub fn on_ack(
        &mut self,
        now: Instant,
        cumulative: Seq,
        ranges: &[core::ops::Range<Seq>],
        ack_delay: Duration,
    ) -> Result<AckOutcome, AckOfUnsent> {
        let acked_end = ranges.last().map_or(cumulative, |r| r.end.max(cumulative));
        if acked_end > self.sent_end {
            return Err(AckOfUnsent {
                acked_end,
                sent_end: self.sent_end,
            });
        }
        let mut out = AckOutcome::default();
        // The newest first transmission this ack covers: the RTT sample and the loss reference. An ack of
        // a retransmitted message is ambiguous (which copy arrived?), so, as in Karn's rule, it is neither.
        let mut newest: Option<(u64, Instant)> = None;
        let mut any_sent = false;
        let mut spurious = false;
        // An ack this soon after a resend cannot be for the resend: the first copy was only late.
        let too_soon = self.rtt.smoothed() / 2;
        let base = self.base;
        let mut mark = |slot: &mut Slot, out: &mut AckOutcome| {
            if slot.acked {
                return;
            }
            slot.acked = true;
            out.newly_acked += 1;
            any_sent |= slot.sent_at.is_some();
            spurious |=
                slot.transmissions > 1 && slot.sent_at.is_some_and(|at| now - at < too_soon);
            if let Some(at) = slot.sent_at
                && slot.transmissions == 1
                && newest.is_none_or(|(order, _)| slot.sent_order > order)
            {
                newest = Some((slot.sent_order, at));
            }
        };
        // The cumulative part, walked in order rather than looked up one number at a time.
        let below = usize::try_from(cumulative.saturating_sub(base))
            .unwrap_or(usize::MAX)
            .min(self.slots.len());
        for slot in self.slots.range_mut(..below) {
            mark(slot, &mut out);
        }
        for r in ranges {
            for seq in r.start.max(base)..r.end {
                if let Some(slot) = self.slots.get_mut((seq - base) as usize) {
                    mark(slot, &mut out);
                }
            }
        }
        let released = self.slots.iter().take_while(|s| s.acked).count();
        for s in self.slots.drain(..released) {
            self.queued_bytes -= s.payload.len();
        }
        self.base += released as u64;
        out.base_advanced = self.base > base;
        // A stream connection re-sends from `base` after a rewind; never below what is acknowledged.
        self.next_unsent = self.next_unsent.max(self.base);

        if any_sent {
            self.rto_backoff = 0;
        }
        if spurious {
            // RACK's answer to reordering (RFC 8985): a path that reorders gets a wider window
            // before a gap counts as a loss.
            self.reorder_threshold = (self.reorder_threshold * 2).min(MAX_REORDER_THRESHOLD);
        }
        if let Some((order, sent_at)) = newest {
            self.rtt.on_sample(now - sent_at, ack_delay);
            self.acked_order_end = self.acked_order_end.max(order + 1);
            if self.transport == Transport::Datagram {
                out.declared_lost = self.detect_losses(now);
            }
        }
        if out.newly_acked > 0 && self.transport == Transport::Datagram {
            // RFC 6298 (5.2, 5.3): stop the timer when nothing is outstanding, else restart it.
            self.rto_at = self
                .has_outstanding()
                .then(|| now + self.rtt.rto_with_backoff(self.rto_backoff));
        }
        Ok(out)
    }

    /// Declares lost every outstanding transmission older than the newest acknowledged one by three
    /// transmissions or by the loss delay; arms the loss timer for the rest.
    fn detect_losses(&mut self, now: Instant) -> u64 {
        self.loss_at = None;
        let Some(largest) = self.acked_order_end.checked_sub(1) else {
            return 0;
        };
        let loss_delay = self.rtt.loss_delay();
        let mut lost = 0;
        let base = self.base;
        for (i, s) in self.slots.iter_mut().enumerate() {
            let Some(sent_at) = s.sent_at else {
                // Slots after the first never-sent one were never sent either.
                break;
            };
            if s.acked || s.lost || s.sent_order >= largest {
                continue;
            }
            if s.sent_order + self.reorder_threshold <= largest || now - sent_at >= loss_delay {
                s.lost = true;
                self.retransmit.push_back(base + i as u64);
                lost += 1;
            } else {
                self.loss_at = earliest(self.loss_at, Some(sent_at + loss_delay));
            }
        }
        lost
    }

    /// Fires the loss and retransmission timers that are due. Idempotent for a given `now`.
    pub fn on_timeout(&mut self, now: Instant) -> TimeoutOutcome {
        let mut lost = 0;
        if self.loss_at.is_some_and(|t| t <= now) {
            lost += self.detect_losses(now);
        }
        let rto_expired = self.rto_at.is_some_and(|t| t <= now);
        if rto_expired {
            // RFC 6298 (5.4-5.6) with selective acks: resend everything outstanding for a full timeout
            // (a tail lost in a burst is recovered in one round, not one message per timeout), back off,
            // restart the timer.
            let rto = self.rtt.rto_with_backoff(self.rto_backoff);
            let base = self.base;
            let mut youngest_wait: Option<Instant> = None;
            for (i, s) in self.slots.iter_mut().enumerate() {
                let Some(sent_at) = s.sent_at else { break };
                if s.acked || s.lost {
                    continue;
                }
                if now - sent_at >= rto {
                    s.lost = true;
                    self.retransmit.push_back(base + i as u64);
                    lost += 1;
                } else {
                    youngest_wait = earliest(youngest_wait, Some(sent_at + rto));
                }
            }
            if lost > 0 {
                self.rto_backoff = self.rto_backoff.saturating_add(1);
                self.rto_at = Some(now + self.rtt.rto_with_backoff(self.rto_backoff));
            } else {
                // Loss detection already resent what was old (the timer raced it): nothing timed out,
                // so wait out the oldest outstanding send without backing off.
                self.rto_at = youngest_wait.filter(|_| self.has_outstanding());
            }
        }
        TimeoutOutcome {
            declared_lost: lost,
            rto_expired: rto_expired && lost > 0,
        }
    }

    /// Prepares to resend over a new connection: everything sent but not acknowledged goes out again
    /// first, oldest first, then what was never sent. Returns how many will be resent.
    ///
    /// Called after the peer's resume state has been applied with [`Sender::on_ack`], so what it
    /// already holds is not resent.
    pub fn rewind(&mut self) -> u64 {
        self.retransmit.clear();
        #[cfg(feature = "canary")]
        if self.canary == Some(crate::canary::Canary::SkipResumeRetransmit) {
            return 0;
        }
        let base = self.base;
        let mut n = 0;
        for (i, s) in self.slots.iter_mut().enumerate() {
            if s.sent_at.is_none() {
                break;
            }
            s.lost = !s.acked;
            if s.lost {
                self.retransmit.push_back(base + i as u64);
                n += 1;
            }
        }
        self.rto_at = None;
        self.loss_at = None;
        self.rto_backoff = 0;
        n
    }

    /// Changes the queue bounds (a server allows more while its client is disconnected). Messages
    /// already queued stay; `push` refuses until the queue is back under the new bound.
    pub fn set_limits(&mut self, max_messages: usize, max_bytes: usize) {
        self.max_messages = max_messages;
        self.max_bytes = max_bytes;
    }

    /// Changes the in-flight limit (to the peer's receive window, learnt in the handshake).
    pub fn set_in_flight_limit(&mut self, limit: u64) {
        self.in_flight_limit = limit.max(1);
    }

    /// The earliest time [`Sender::on_timeout`] has work to do.
    pub fn deadline(&self) -> Option<Instant> {
        earliest(self.loss_at, self.rto_at)
    }

    /// Whether [`Sender::peek`] would return a message: a retransmission is due, or a new message
    /// fits the in-flight window.
    pub fn has_sendable(&self) -> bool {
        self.retransmit
            .iter()
            .any(|&seq| self.slot(seq).is_some_and(|s| !s.acked))
            || self.may_send_new()
    }

    /// Whether a never-sent message waits and fits the in-flight window.
    fn may_send_new(&self) -> bool {
        self.next_unsent < self.end() && self.next_unsent - self.base < self.in_flight_limit
    }

    fn has_outstanding(&self) -> bool {
        self.next_unsent > self.base || !self.retransmit.is_empty()
    }

    fn slot(&self, seq: Seq) -> Option<&Slot> {
        self.slots
            .get(usize::try_from(seq.checked_sub(self.base)?).ok()?)
    }

    /// [`Sender::base`] when the queue was last drained (0 if it never was).
    pub(crate) fn drained_base(&self) -> Seq {
        self.drained_base
    }

    /// Takes back, into a sender that has sent nothing, the unacknowledged messages a store kept
    /// from a previous process (in sequence order, contiguous, ending just below `next_seq`). They
    /// go out again as if never sent; the peer's de-duplication drops what it already had.
    pub(crate) fn restore(
        &mut self,
        next_seq: Seq,
        messages: &[crate::store::Stored],
    ) -> Result<(), crate::store::StoreError> {
        let base = messages.first().map_or(next_seq, |m| m.seq);
        let contiguous = messages
            .iter()
            .enumerate()
            .all(|(i, m)| m.seq == base + i as u64)
            && base + messages.len() as u64 == next_seq;
        if !contiguous || self.end() != 0 {
            return Err(crate::store::StoreError::Corrupt(
                alloc::string::String::from(
                    "unacknowledged messages are not contiguous up to the next sequence number",
                ),
            ));
        }
        self.base = base;
        self.next_unsent = base;
        self.sent_end = next_seq;
        for m in messages {
            self.queued_bytes += m.payload.len();
            self.slots.push_back(Slot {
                stream: m.stream,
                payload: m.payload.clone(),
                unordered: m.unordered,
                keyed: false,
                sent_at: None,
                sent_order: 0,
                transmissions: 0,
                acked: false,
                lost: false,
            });
        }
        Ok(())
    }

    /// One past the last queued sequence number: the next one `push` assigns.
    pub fn end(&self) -> Seq {
        self.base + self.slots.len() as u64
    }

    /// The lowest unacknowledged sequence number.
    pub fn base(&self) -> Seq {
        self.base
    }

    /// Messages held: unsent plus unacknowledged.
    pub fn queued_messages(&self) -> usize {
        self.slots.len()
    }

    /// Payload bytes held: unsent plus unacknowledged.
    pub fn queued_bytes(&self) -> usize {
        self.queued_bytes
    }

    /// Entries waiting in the retransmit queue.
    pub fn retransmit_len(&self) -> usize {
        self.retransmit.len()
    }

    /// The RTT estimator.
    pub fn rtt(&self) -> &RttEstimator {
        &self.rtt
    }

    /// Removes and returns every message whose delivery is unknown, oldest first: those not
    /// acknowledged, and ordered ones only selectively acknowledged (they wait in the peer's reorder
    /// buffer behind a gap, and a closing peer discards them).
    pub(crate) fn drain_unacknowledged(&mut self) -> impl Iterator<Item = (u64, Seq, Bytes)> + '_ {
        let base = self.base;
        self.drained_base = base;
        self.base = self.end();
        self.next_unsent = self.base;
        self.queued_bytes = 0;
        self.retransmit.clear();
        self.rto_at = None;
        self.loss_at = None;
        self.conflation.clear();
        self.slots
            .drain(..)
            .enumerate()
            .filter(|(_, s)| !s.acked || !s.unordered)
            .map(move |(i, s)| (s.stream, base + i as u64, s.payload))
    }
}

#[cfg(test)]
// One-range acks are what these tests mean, not a mistaken `vec![x; n]`.
#[allow(clippy::single_range_in_vec_init)]
mod tests {
    use super::*;
    use alloc::vec::Vec;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn at(n: u64) -> Instant {
        Instant::ZERO + ms(n)
    }

    fn sender(transport: Transport) -> Sender {
        let mut c = Config::new(transport);
        c.max_queued_messages = 8;
        c.max_queued_bytes = 64;
        c.max_in_flight = 4;
        Sender::new(&c)
    }

    impl Sender {
        fn push_plain(&mut self, stream: u64, payload: Bytes) -> Result<Seq, SendError> {
            self.push(stream, payload, false, None).map(Pushed::seq)
        }
    }

    /// A sender holding `n` queued, unsent messages.
    fn queued(transport: Transport, n: u8) -> Sender {
        let mut s = sender(transport);
        for i in 0..n {
            s.push_plain(0, msg(i)).unwrap();
        }
        s
    }

    /// Puts every message that may go now on the wire; returns their sequence numbers.
    fn flush(s: &mut Sender, now: Instant) -> Vec<Seq> {
        let mut sent = Vec::new();
        while let Some(o) = s.peek() {
            sent.push(o.seq);
            s.on_sent(now);
        }
        sent
    }

    fn msg(n: u8) -> Bytes {
        Bytes::from(alloc::vec![n; 4])
    }

    #[test]
    fn a_conflated_value_replaces_the_unsent_one_of_its_key_in_place() {
        let mut s = sender(Transport::Stream);
        assert_eq!(s.push(1, msg(1), false, Some(9)), Ok(Pushed::Queued(0)));
        assert_eq!(s.push(1, msg(2), false, Some(8)), Ok(Pushed::Queued(1)));
        assert_eq!(s.push(1, msg(3), false, Some(9)), Ok(Pushed::Replaced(0)));
        assert_eq!(s.peek().map(|o| o.payload.to_vec()), Some(msg(3).to_vec()));
        flush(&mut s, at(0));
        assert_eq!(
            s.push(1, msg(4), false, Some(9)),
            Ok(Pushed::Queued(2)),
            "once sent, a value is no longer replaceable"
        );
    }

    #[test]
    fn a_keyed_value_sent_in_a_run_lets_go_of_its_key_and_the_same_key_on_another_stream_stays() {
        let mut s = sender(Transport::Stream);
        assert_eq!(s.push(1, msg(1), false, Some(9)), Ok(Pushed::Queued(0)));
        assert_eq!(s.push(2, msg(2), false, Some(9)), Ok(Pushed::Queued(1)));
        s.set_in_flight_limit(1);
        assert_eq!(s.send_fresh(at(0), |_| true), 1);
        assert_eq!(s.push(1, msg(3), false, Some(9)), Ok(Pushed::Queued(2)));
        assert_eq!(s.push(2, msg(4), false, Some(9)), Ok(Pushed::Replaced(1)));
        let keys = s
            .conflation
            .0
            .as_ref()
            .expect("keys made at the first keyed message");
        assert_eq!(keys.by_key.len(), 2, "the two unsent values");
        assert_eq!(keys.by_seq.len(), 2);
    }

    #[test]
    fn a_queued_message_takes_one_cache_line() {
        assert_eq!(core::mem::size_of::<Slot>(), 64);
    }

    #[test]
    fn rewinding_resends_everything_unacknowledged_oldest_first_then_the_unsent() {
        let mut s = queued(Transport::Stream, 5);
        s.set_in_flight_limit(3);
        assert_eq!(flush(&mut s, at(0)), [0, 1, 2]);
        s.on_ack(at(1), 1, &[2..3], Duration::ZERO).unwrap();
        assert_eq!(s.rewind(), 1);
        s.set_in_flight_limit(10);
        assert_eq!(flush(&mut s, at(2)), [1, 3, 4]);
    }

    #[test]
    fn messages_are_numbered_from_zero_in_the_order_they_are_queued() {
        let mut s = sender(Transport::Stream);
        assert_eq!(s.push_plain(0, msg(1)), Ok(0));
        assert_eq!(s.push_plain(7, msg(2)), Ok(1));
        assert_eq!(s.end(), 2);
    }

    #[test]
    fn the_queue_refuses_past_its_message_bound_and_hands_the_payload_back() {
        let mut s = queued(Transport::Stream, 8);
        assert_eq!(s.push_plain(0, msg(9)), Err(SendError::QueueFull(msg(9))));
    }

    #[test]
    fn the_queue_refuses_past_its_byte_bound() {
        let mut s = sender(Transport::Stream);
        s.push_plain(0, Bytes::from(alloc::vec![0; 61])).unwrap();
        assert!(matches!(
            s.push_plain(0, msg(1)),
            Err(SendError::QueueFull(_))
        ));
        assert_eq!(s.queued_bytes(), 61);
    }

    #[test]
    fn no_more_than_the_in_flight_limit_is_outstanding_at_once() {
        let mut s = queued(Transport::Stream, 6);
        assert_eq!(flush(&mut s, at(0)), [0, 1, 2, 3]);
        s.on_ack(at(1), 2, &[], Duration::ZERO).unwrap();
        assert_eq!(flush(&mut s, at(1)), [4, 5]);
    }

    /// Puts fresh messages on the wire as a run, `room` of them at most; returns their numbers.
    fn flush_fresh(s: &mut Sender, now: Instant, room: usize) -> Vec<Seq> {
        let mut sent = Vec::new();
        s.send_fresh(now, |o| {
            if sent.len() == room {
                return false;
            }
            sent.push(o.seq);
            true
        });
        sent
    }

    #[test]
    fn a_fresh_run_stops_where_the_writer_has_no_room_and_the_next_goes_on_from_there() {
        let mut s = queued(Transport::Stream, 6);
        assert_eq!(flush_fresh(&mut s, at(0), 3), [0, 1, 2]);
        assert_eq!(
            flush_fresh(&mut s, at(0), 3),
            [3],
            "the in-flight limit of 4"
        );
        s.on_ack(at(1), 4, &[], Duration::ZERO).unwrap();
        assert_eq!(flush_fresh(&mut s, at(1), 8), [4, 5]);
        assert_eq!(s.peek().map(|o| o.seq), None, "all of them sent");
        s.on_ack(at(2), 6, &[], Duration::ZERO).unwrap();
        assert_eq!(s.queued_messages(), 0);
    }

    #[test]
    fn a_fresh_run_waits_while_a_retransmission_is_due() {
        let mut s = sender(Transport::Datagram);
        s.push_plain(0, msg(0)).unwrap();
        flush(&mut s, at(0));
        s.push_plain(0, msg(1)).unwrap();
        let t = s.deadline().unwrap();
        assert_eq!(s.on_timeout(t).declared_lost, 1);
        assert_eq!(flush_fresh(&mut s, t, 8), [], "the lost one goes first");
        assert_eq!(flush(&mut s, t), [0, 1]);
    }

    #[test]
    fn a_fresh_run_sends_what_peek_and_on_sent_would() {
        let (mut a, mut b) = (
            queued(Transport::Datagram, 4),
            queued(Transport::Datagram, 4),
        );
        assert_eq!(flush(&mut a, at(3)), flush_fresh(&mut b, at(3), 8));
        assert_eq!(a.deadline(), b.deadline(), "the same retransmission timer");
        let acked = |s: &mut Sender| s.on_ack(at(9), 2, &[3..4], Duration::from_millis(1));
        assert_eq!(acked(&mut a), acked(&mut b));
        assert_eq!(
            a.rtt().smoothed(),
            b.rtt().smoothed(),
            "the same RTT sample"
        );
    }

    #[test]
    fn a_cumulative_ack_releases_everything_below_it() {
        let mut s = queued(Transport::Stream, 3);
        flush(&mut s, at(0));
        let out = s.on_ack(at(1), 2, &[], Duration::ZERO).unwrap();
        assert_eq!((out.newly_acked, out.base_advanced), (2, true));
        assert_eq!((s.base(), s.queued_messages(), s.queued_bytes()), (2, 1, 4));
    }

    #[test]
    fn a_selective_ack_holds_its_messages_until_the_gap_below_is_acknowledged() {
        let mut s = queued(Transport::Stream, 3);
        flush(&mut s, at(0));
        let out = s.on_ack(at(1), 0, &[1..3], Duration::ZERO).unwrap();
        assert_eq!((out.newly_acked, out.base_advanced), (2, false));
        assert_eq!(s.queued_messages(), 3);
        s.on_ack(at(2), 1, &[], Duration::ZERO).unwrap();
        assert_eq!(
            s.queued_messages(),
            0,
            "the gap filled, so all three go at once"
        );
    }

    #[test]
    fn an_ack_of_a_message_never_sent_is_refused() {
        let mut s = sender(Transport::Stream);
        s.push_plain(0, msg(0)).unwrap();
        s.push_plain(0, msg(1)).unwrap();
        s.peek();
        s.on_sent(at(0));
        let err = s.on_ack(at(1), 2, &[], Duration::ZERO).unwrap_err();
        assert_eq!(
            err,
            AckOfUnsent {
                acked_end: 2,
                sent_end: 1
            }
        );
        assert_eq!(s.queued_messages(), 2, "nothing was released");
    }

    #[test]
    fn a_stale_cumulative_ack_changes_nothing() {
        let mut s = queued(Transport::Datagram, 3);
        flush(&mut s, at(0));
        s.on_ack(at(1), 2, &[], Duration::ZERO).unwrap();
        let out = s.on_ack(at(2), 1, &[], Duration::ZERO).unwrap();
        assert_eq!(out, AckOutcome::default());
        assert_eq!(s.base(), 2);
    }

    #[test]
    fn three_later_acknowledged_sends_declare_a_datagram_lost_and_it_is_resent_first() {
        let mut s = queued(Transport::Datagram, 5);
        flush(&mut s, at(0));
        let out = s.on_ack(at(10), 0, &[1..4], Duration::ZERO).unwrap();
        assert_eq!(out.declared_lost, 1);
        let o = s.peek().unwrap();
        assert_eq!((o.seq, o.retransmission), (0, true));
    }

    #[test]
    fn a_datagram_is_declared_lost_after_the_time_threshold_even_without_three_later_acks() {
        let mut s = sender(Transport::Datagram);
        s.push_plain(0, msg(0)).unwrap();
        s.peek();
        s.on_sent(at(0));
        s.push_plain(0, msg(1)).unwrap();
        s.peek();
        s.on_sent(at(1));
        let out = s.on_ack(at(20), 0, &[1..2], Duration::ZERO).unwrap();
        assert_eq!(out.declared_lost, 0, "too soon after it was sent");
        let deadline = s.deadline().unwrap();
        assert!(deadline > at(20));
        assert_eq!(s.on_timeout(deadline).declared_lost, 1);
        assert_eq!(s.peek().map(|o| o.seq), Some(0));
    }

    #[test]
    fn the_retransmission_timeout_resends_what_is_outstanding_and_backs_off() {
        let mut s = sender(Transport::Datagram);
        s.push_plain(0, msg(0)).unwrap();
        flush(&mut s, at(0));
        let first = s.deadline().unwrap();
        let out = s.on_timeout(first);
        assert!(out.rto_expired);
        assert_eq!(out.declared_lost, 1);
        flush(&mut s, first);
        let second = s.deadline().unwrap();
        assert!(second - first > first - at(0), "the second wait is longer");
    }

    #[test]
    fn handling_the_same_timeout_twice_does_nothing_the_second_time() {
        let mut s = sender(Transport::Datagram);
        s.push_plain(0, msg(0)).unwrap();
        flush(&mut s, at(0));
        let t = s.deadline().unwrap();
        assert_eq!(s.on_timeout(t).declared_lost, 1);
        assert_eq!(s.on_timeout(t), TimeoutOutcome::default());
    }

    #[test]
    fn a_path_that_reorders_widens_the_gap_needed_to_declare_a_loss() {
        let mut s = queued(Transport::Datagram, 8);
        s.set_in_flight_limit(8);
        // Prime the RTT so "too soon after a resend" means something: 100 ms.
        s.rtt.on_sample(ms(100), Duration::ZERO);
        flush(&mut s, at(0));
        // 1..4 acknowledged, 0 not: declared lost at the initial threshold of 3 and resent.
        assert_eq!(
            s.on_ack(at(10), 0, &[1..4], Duration::ZERO)
                .unwrap()
                .declared_lost,
            1
        );
        flush(&mut s, at(10));
        // The first copy of 0 turns up 1 ms after the resend: it was only late.
        s.on_ack(at(11), 4, &[], Duration::ZERO).unwrap();
        assert_eq!(s.reorder_threshold, 2 * INITIAL_REORDER_THRESHOLD);
        // Now three later acknowledged sends no longer declare a gap lost.
        let out = s.on_ack(at(12), 4, &[5..8], Duration::ZERO).unwrap();
        assert_eq!(out.declared_lost, 0);
    }

    #[test]
    fn a_stream_transport_never_arms_a_retransmission_timer() {
        let mut s = sender(Transport::Stream);
        s.push_plain(0, msg(0)).unwrap();
        flush(&mut s, at(0));
        assert_eq!(s.deadline(), None);
    }

    #[test]
    fn an_ack_of_a_retransmitted_message_gives_no_rtt_sample() {
        let mut s = sender(Transport::Datagram);
        s.push_plain(0, msg(0)).unwrap();
        flush(&mut s, at(0));
        let t = s.deadline().unwrap();
        s.on_timeout(t);
        flush(&mut s, t);
        let before = s.rtt().smoothed();
        s.on_ack(t + ms(1), 1, &[], Duration::ZERO).unwrap();
        assert_eq!(
            s.rtt().smoothed(),
            before,
            "Karn: which copy was acknowledged is unknown"
        );
        assert_eq!(s.deadline(), None, "nothing outstanding, no timer");
    }

    #[test]
    fn draining_hands_back_unordered_messages_only_if_unacknowledged_oldest_first() {
        let mut s = sender(Transport::Stream);
        for i in 0..4 {
            s.push(i.into(), msg(i), true, None).unwrap();
        }
        flush(&mut s, at(0));
        s.on_ack(at(1), 1, &[2..3], Duration::ZERO).unwrap();
        let back: Vec<_> = s
            .drain_unacknowledged()
            .map(|(st, seq, _)| (st, seq))
            .collect();
        assert_eq!(back, [(1, 1), (3, 3)]);
        assert_eq!((s.queued_messages(), s.queued_bytes()), (0, 0));
    }
}
