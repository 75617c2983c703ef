//! The reliable-delivery engine: one [`Channel`] carries messages both ways between two endpoints.

use alloc::boxed::Box;
use alloc::sync::Arc;
use alloc::vec::Vec;

use bytes::{Bytes, BytesMut};

use crate::Seq;
use crate::config::{Config, ConfigError, Delivery, Transport};
use crate::event::{CloseReason, Event, Message, ProtocolError};
use crate::frame::{AckFrame, CloseFrame, DataFrame, DecodeLimits, Frame, UnreliableFrame};
use crate::framing::{self, StreamDataHead, StreamDecoder, WrittenSeqs};
use crate::liveness::PongBacklog;
use crate::mode::{Mode, Sent};
use crate::queue::Ring;
use crate::recv::{Arrival, Receiver};
use crate::send::{AckOfUnsent, Outgoing, Pushed, SendError, Sender};
use crate::stats::{Counters, Rare, Stats};
use crate::time::{Duration, Instant, earliest};
use crate::unreliable::{UnreliableReceiver, UnreliableSender};

/// One end of a reliable, de-duplicated, ordered message channel, as a sans-IO state machine.
///
/// A `Channel` owns no socket, no clock and no task. It turns bytes from the peer and the passage of
/// time into messages for the application, and messages from the application into bytes for the peer.
/// Every message reaches the peer's application exactly once (in order under
/// [`crate::Delivery::Ordered`]) however the datagrams between them are dropped, duplicated or
/// reordered, as long as the channel lives; when it ends, [`Event::Closed`] hands back every message
/// whose delivery is unknown.
///
/// # The driving contract
///
/// Exactly one owner calls a channel. After **any** of
/// - [`handle_input`](Channel::handle_input)`(now, bytes)`: bytes read from the transport (for a
///   stream transport any chunking, for a datagram transport one datagram),
/// - [`handle_timeout`](Channel::handle_timeout)`(now)`: the deadline from `poll_timeout` passed,
/// - an application command: [`send`](Channel::send), [`close`](Channel::close),
///
/// the owner drains, in this order, until each returns `None`:
/// 1. [`poll_transmit`](Channel::poll_transmit) and writes what it produced to the transport,
/// 2. [`poll_event`](Channel::poll_event) and hands each event to the application,
///
/// then reads [`poll_timeout`](Channel::poll_timeout) and sleeps until that instant or the next input,
/// whichever comes first. `now` comes from a monotonic clock; an earlier `now` than a previous call's
/// is treated as the previous one and counted in [`Stats::clock_regressions`]. `handle_timeout` is
/// idempotent: calling it early, late or twice does no harm.
///
/// A real adapter's loop has this shape:
///
/// ```text
/// loop {
///     select! {
///         bytes = socket.read()                     => channel.handle_input(clock.now(), bytes),
///         _     = sleep_until(channel.poll_timeout()) => channel.handle_timeout(clock.now()),
///         msg   = from_app.recv()                   => { channel.send(msg)?; }
///     }
///     while let Some(n) = channel.poll_transmit(clock.now(), &mut buf) { socket.write_all(&buf.split_to(n)) }
///     while let Some(event) = channel.poll_event() { to_app.send(event) }
/// }
/// ```
///
/// and here it is with two channels wired back to back, runnable:
///
/// ```
/// use bytes::{Bytes, BytesMut};
/// use steadfast_core::{Channel, Config, Event, Transport};
/// use steadfast_core::time::Instant;
///
/// let now = Instant::ZERO;
/// let mut client = Channel::new(Config::new(Transport::Stream), now)?;
/// let mut server = Channel::new(Config::new(Transport::Stream), now)?;
/// let seq = client.send(Bytes::from_static(b"hello"))?;
///
/// let mut buf = BytesMut::new();
/// loop {
///     let mut moved = false;
///     while let Some(n) = client.poll_transmit(now, &mut buf) {
///         server.handle_input(now, buf.split_to(n).freeze());
///         moved = true;
///     }
///     while let Some(n) = server.poll_transmit(now, &mut buf) {
///         client.handle_input(now, buf.split_to(n).freeze());
///         moved = true;
///     }
///     if !moved {
///         // Nothing left to send: jump to the earliest deadline, as a real loop would sleep.
///         match [client.poll_timeout(), server.poll_timeout()].into_iter().flatten().min() {
///             Some(t) if client.sender().queued_messages() > 0 => {
///                 client.handle_timeout(t);
///                 server.handle_timeout(t);
///             }
///             _ => break,
///         }
///     }
/// }
/// match server.poll_event() {
///     Some(Event::Received(m)) => assert_eq!((m.seq, &m.payload[..]), (seq, &b"hello"[..])),
///     other => panic!("expected the message, got {other:?}"),
/// }
/// assert_eq!(client.poll_event(), Some(Event::Acknowledged { below: seq + 1 }));
/// # Ok::<(), Box<dyn core::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct Channel {
    /// Shared: a server holds one copy for all its sessions, not one each.
    config: Arc<Config>,
    send: Sender,
    recv: Receiver,
    /// At-most-once traffic, made at its first message: most channels never carry any.
    unreliable: Option<Box<Unreliable>>,
    /// Made at the first stream input: a channel inside a session never uses its own (the link
    /// decodes), and an idle session should not carry one.
    decoder: Option<Box<StreamDecoder>>,
    preface_sent: bool,
    /// The data frames written on this connection (stream transports): which may go out with a
    /// short sequence number.
    written: WrittenSeqs,
    events: Events,
    /// Pongs owed on this channel's own connection, made at the first ping: a channel inside a
    /// session never has any (its link answers pings).
    pongs: Option<Box<PongBacklog>>,
    state: State,
    now: Instant,
    stats: Counters,
    /// With a durable store, the messages that arrived since the owner last took them (boxed:
    /// most servers have no store, and keep a channel per session).
    #[allow(clippy::box_collection)]
    arrivals: Option<Box<Vec<crate::store::Stored>>>,
}

/// The events waiting for the owner, boxed at the first and let go by [`Channel::shrink_queues`]
/// once drained: a server drains each session's at once, and keeps a channel per session.
// The box is the point: 8 B inline while empty, where a ring takes 40.
#[derive(Debug, Default)]
pub(crate) struct Events(Option<Box<Ring<Event>>>);

impl Events {
    #[inline(always)]
    fn push_back(&mut self, event: Event) {
        self.push_back_with(|| event);
    }

    /// Appends what `make` makes, made in its slot (see [`crate::queue`]).
    #[inline(always)]
    fn push_back_with(&mut self, make: impl FnOnce() -> Event) {
        self.0.get_or_insert_with(Box::default).push_back_with(make);
    }

    #[inline]
    fn pop_front(&mut self) -> Option<Event> {
        self.0.as_mut()?.pop_front()
    }

    fn is_empty(&self) -> bool {
        self.0.as_ref().is_none_or(|q| q.is_empty())
    }

    /// Lets go of the spare room, and of the box if nothing waits.
    fn shrink_to_fit(&mut self) {
        match &mut self.0 {
            Some(q) if q.is_empty() => self.0 = None,
            Some(q) => q.shrink_to_fit(),
            None => {}
        }
    }

    #[cfg(test)]
    fn room(&self) -> usize {
        self.0.as_ref().map_or(0, |q| q.room())
    }
}

/// Writes `out` as a stream data frame carrying `ack`, unless it would take the bytes written
/// since `start` past `budget` (the first frame always goes); notes it in `written`. Returns whether
/// it was written.
// Always: both callers are per-message loops, and a call here costs a tenth of the frame.
#[inline(always)]
fn put_stream_data(
    written: &mut WrittenSeqs,
    out: &Outgoing<'_>,
    ack: Option<Seq>,
    acked_below: Seq,
    buf: &mut BytesMut,
    start: usize,
    budget: usize,
) -> bool {
    let so_far = buf.len() - start;
    let short = written.may_shorten(out.seq, acked_below);
    let head = StreamDataHead::new(
        short,
        out.stream,
        out.seq,
        ack,
        out.unordered,
        out.payload.len(),
    );
    if so_far > 0 && so_far + head.len() > budget {
        return false;
    }
    written.record(out.seq);
    head.write_in_place(out.payload, buf);
    true
}

/// Where the data path's events go: the channel's own queue, or straight to its owner.
pub(crate) trait Sink {
    /// Whether this is the channel's own queue, where order holds whatever waits there already.
    fn is_queue(&self) -> bool {
        false
    }
    /// A message for the application (its fields apart, so the event is made in its slot).
    fn received(&mut self, queue: &mut Events, stream: u64, seq: Seq, payload: Bytes);
    /// The cumulative ack point moved to `below`.
    fn acknowledged(&mut self, queue: &mut Events, below: Seq);
}

/// A receiver's deliveries, as [`Sink::received`] events.
struct ToSink<'a, S> {
    sink: &'a mut S,
    events: &'a mut Events,
}

impl<S: Sink> crate::recv::Deliver for ToSink<'_, S> {
    #[inline(always)]
    fn deliver(&mut self, stream: u64, seq: Seq, payload: Bytes) {
        self.sink.received(self.events, stream, seq, payload);
    }
}

/// The channel's own queue.
struct Queue;

impl Sink for Queue {
    fn is_queue(&self) -> bool {
        true
    }

    #[inline(always)]
    fn received(&mut self, queue: &mut Events, stream: u64, seq: Seq, payload: Bytes) {
        queue.push_back_with(|| {
            Event::Received(Message {
                stream,
                seq,
                payload,
            })
        });
    }

    fn acknowledged(&mut self, queue: &mut Events, below: Seq) {
        queue.push_back(Event::Acknowledged { below });
    }
}

/// Both directions of at-most-once traffic.
#[derive(Debug)]
struct Unreliable {
    out: UnreliableSender,
    inbound: UnreliableReceiver,
}

#[derive(Debug)]
enum State {
    Open,
    /// Closed for the application; the close frame still has to go out.
    Closing(Box<CloseFrame>),
    Closed,
}

impl Channel {
    /// A channel whose clock reads `now`.
    pub fn new(config: Config, now: Instant) -> Result<Self, ConfigError> {
        Self::with_shared_config(Arc::new(config), now)
    }

    /// A channel with a configuration it shares with others (a server's sessions all share one).
    pub(crate) fn with_shared_config(
        config: Arc<Config>,
        now: Instant,
    ) -> Result<Self, ConfigError> {
        config.validate()?;
        Ok(Channel {
            send: Sender::new(&config),
            recv: Receiver::new(&config),
            unreliable: None,
            decoder: None,
            preface_sent: false,
            written: WrittenSeqs::new(0),
            events: Events::default(),
            pongs: None,
            state: State::Open,
            now,
            stats: Counters::default(),
            arrivals: None,
            config,
        })
    }

    /// Lets go of the spare room of its queues (events, unacknowledged messages, the reorder
    /// buffer), keeping their contents: for a channel that is idle for a while, such as a server
    /// session retained while its client is away.
    pub(crate) fn shrink_queues(&mut self) {
        self.events.shrink_to_fit();
        self.send.shrink_queues();
        self.recv.shrink_queues();
    }

    /// The spare room of its queues, in elements: what [`Channel::shrink_queues`] gives back.
    #[cfg(test)]
    pub(crate) fn queue_room(&self) -> usize {
        self.events.room() + self.send.queue_room() + self.recv.queue_room()
    }

    /// What the decoders accept, from the configuration.
    fn limits(&self) -> DecodeLimits {
        DecodeLimits {
            max_frame_size: self.config.max_frame_size,
            ..DecodeLimits::default()
        }
    }

    /// Keeps every arriving message for [`Channel::take_arrivals`], for a durable store.
    pub(crate) fn record_arrivals(&mut self) {
        self.arrivals.get_or_insert_with(Box::default);
    }

    /// The messages that arrived (delivered or held for reordering) since the last call.
    pub(crate) fn take_arrivals(&mut self) -> Vec<crate::store::Stored> {
        self.arrivals
            .as_mut()
            .map(|a| core::mem::take(&mut **a))
            .unwrap_or_default()
    }

    /// Takes back what a store kept from a previous process into a channel that has done nothing
    /// yet; returns the messages the application had received but not consumed, to hand out again.
    pub(crate) fn restore(
        &mut self,
        r: &crate::store::Recovered,
    ) -> Result<Vec<Message>, crate::store::StoreError> {
        self.send.restore(r.next_seq, &r.unacknowledged)?;
        let waiting = |m: &&crate::store::Stored| m.seq >= r.watermark && !m.unordered;
        self.recv.restore(
            r.watermark,
            &r.arrived_above,
            r.unconsumed
                .iter()
                .filter(waiting)
                .map(|m| (m.seq, m.stream, m.payload.clone())),
        )?;
        Ok(r.unconsumed
            .iter()
            .filter(|m| !waiting(m))
            .map(|m| Message {
                stream: m.stream,
                seq: m.seq,
                payload: m.payload.clone(),
            })
            .collect())
    }

    /// Queues `payload` on stream 0 in the configured [`Config::delivery`] and returns its sequence
    /// number.
    pub fn send(&mut self, payload: Bytes) -> Result<Seq, SendError> {
        let mode = match self.config.delivery {
            Delivery::Ordered => Mode::Ordered,
            Delivery::Unordered => Mode::Unordered,
        };
        self.send_on(0, mode, payload)
            .map(|s| s.seq().unwrap_or_default())
    }

    /// Queues `payload` on `stream` with the delivery `mode` (see [`crate::mode`]).
    ///
    /// A reliable message past the queue bound is refused with [`SendError::QueueFull`]
    /// (backpressure), handing the payload back; an at-most-once one instead pushes out the oldest
    /// queued at-most-once message.
    pub fn send_on(&mut self, stream: u64, mode: Mode, payload: Bytes) -> Result<Sent, SendError> {
        if !matches!(self.state, State::Open) {
            return Err(SendError::Closed(payload));
        }
        let key = match mode {
            Mode::Conflated { key } => Some(key),
            Mode::Sequenced | Mode::Unreliable => {
                if payload.len() > self.config.max_payload() {
                    return Err(SendError::TooLarge(payload));
                }
                self.unreliable_mut()
                    .out
                    .push(stream, mode == Mode::Sequenced, payload);
                return Ok(Sent::Unreliable);
            }
            _ => None,
        };
        Ok(
            match self
                .send
                .push(stream, payload, mode == Mode::Unordered, key)?
            {
                Pushed::Queued(seq) => Sent::Reliable(seq),
                Pushed::Replaced(seq) => Sent::Replaced(seq),
            },
        )
    }

    /// Takes bytes from the transport.
    pub fn handle_input(&mut self, now: Instant, data: Bytes) {
        let now = self.observe(now);
        if !matches!(self.state, State::Open) {
            return;
        }
        self.stats.bytes_received += data.len() as u64;
        match self.config.transport {
            Transport::Stream => {
                let limits = self.limits();
                self.decoder
                    .get_or_insert_with(|| Box::new(StreamDecoder::new(limits)))
                    .feed_bytes(data);
                while let Some(decoder) = self.decoder.as_mut() {
                    let frame = match decoder.next_delimited() {
                        Ok(Some(frame)) => frame,
                        Ok(None) => break,
                        Err(e) => {
                            self.violation(e.into());
                            break;
                        }
                    };
                    // A data frame goes from the decoder to the receiver field by field: built
                    // into a `Frame` it would be copied twice more on the way.
                    let decoded = if framing::is_data(&frame) {
                        decoder
                            .decode_data(frame)
                            .map(|d| self.handle_data_into(now, d, &mut Queue))
                    } else {
                        decoder.decode(frame).map(|f| self.handle_frame(now, f))
                    };
                    if let Err(e) = decoded {
                        self.violation(e.into());
                        break;
                    }
                    if !matches!(self.state, State::Open) {
                        break;
                    }
                }
            }
            // Datagrams carry no integrity check of ours; a mangled one is dropped like a lost one.
            Transport::Datagram => match framing::decode_datagram(data, &self.limits()) {
                Ok(frame) => self.handle_frame(now, frame),
                Err(_) => self.stats.add(Rare::MalformedDatagrams, 1),
            },
        }
    }

    /// Lets time pass: fires whichever timers are due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        let now = self.observe(now);
        if !matches!(self.state, State::Open) {
            return;
        }
        let out = self.send.on_timeout(now);
        self.stats.add(Rare::DeclaredLost, out.declared_lost);
        self.stats
            .add(Rare::RtoExpiries, u64::from(out.rto_expired));
    }

    /// Writes the next transmission into `buf` (appending) and returns its length, or `None` when
    /// there is nothing to send now.
    ///
    /// For a stream transport one call writes as many frames as fit in
    /// [`Config::max_batch_bytes`], so one write carries many messages and their acks; for a
    /// datagram transport one call writes exactly one datagram.
    pub fn poll_transmit(&mut self, now: Instant, buf: &mut BytesMut) -> Option<usize> {
        let start = buf.len();
        if self.config.transport == Transport::Stream
            && !self.preface_sent
            && !matches!(self.state, State::Closed)
        {
            framing::encode_preface(buf);
            self.preface_sent = true;
        }
        let preface = buf.len() - start;
        let n = preface + self.write_frames(now, buf, self.config.max_batch_bytes);
        self.stats.bytes_sent += preface as u64;
        (n > 0).then_some(n)
    }

    /// Appends frames, without any stream preface, up to `budget` bytes for a stream transport (at
    /// least one frame if any is due) or exactly one datagram; returns the bytes written. This is
    /// how a session writes the channel's frames after its own on a connection it manages.
    pub fn write_frames(&mut self, now: Instant, buf: &mut BytesMut, budget: usize) -> usize {
        let now = self.observe(now);
        let start = buf.len();
        let stream = self.config.transport == Transport::Stream;
        match core::mem::replace(&mut self.state, State::Closed) {
            State::Closing(close) => {
                self.write_frame(&Frame::Close(*close), buf);
                let n = buf.len() - start;
                self.stats.bytes_sent += n as u64;
                return n;
            }
            State::Closed => return 0,
            State::Open => self.state = State::Open,
        }
        loop {
            let written = buf.len() - start;
            if !stream && written > 0 {
                break;
            }
            // A data frame about to go can carry a plain ack; only then is the send queue asked.
            if self.recv.wants_ack(now)
                && !(self.recv.ranges().is_empty() && self.send.has_sendable())
            {
                let ack = self.recv.take_ack(now);
                self.write_frame(&Frame::Ack(ack), buf);
                self.stats.acks_sent += 1;
                continue;
            }
            if let Some(id) = self.pongs.as_deref_mut().and_then(PongBacklog::next) {
                self.write_frame(&Frame::Pong { id }, buf);
                continue;
            }
            if let Some(u) = self.unreliable.as_deref_mut()
                && let Some(q) = u.out.peek()
            {
                let header = UnreliableFrame::header_len(q.stream, u64::MAX >> 2);
                if stream && written > 0 && written + header + q.payload.len() + 8 > budget {
                    break;
                }
                if let Some((seq, q)) = u.out.pop() {
                    let frame = Frame::Unreliable(UnreliableFrame {
                        stream: q.stream,
                        seq,
                        sequenced: q.sequenced,
                        payload: q.payload,
                    });
                    self.write_frame(&frame, buf);
                }
                continue;
            }
            let ack = self.recv.ack_pending().then(|| self.recv.watermark());
            let ack = ack.filter(|_| self.recv.ranges().is_empty());
            let acked_below = self.send.base();
            if stream && self.write_fresh(now, buf, start, budget, ack, acked_below) > 0 {
                continue;
            }
            let Some(out) = self.send.peek() else { break };
            if stream {
                if !put_stream_data(
                    &mut self.written,
                    &out,
                    ack,
                    acked_below,
                    buf,
                    start,
                    budget,
                ) {
                    break;
                }
            } else {
                framing::encode_datagram_data_frame(
                    out.stream,
                    out.seq,
                    ack,
                    out.unordered,
                    out.payload,
                    buf,
                );
            }
            if out.retransmission {
                self.stats.add(Rare::Retransmitted, 1);
            }
            if ack.is_some() {
                self.recv.take_piggyback();
                self.stats.acks_piggybacked += 1;
            }
            self.send.on_sent(now);
            self.stats.data_sent += 1;
            self.stats.frames_sent += 1;
        }
        let n = buf.len() - start;
        self.stats.bytes_sent += n as u64;
        n
    }

    /// Whether events wait for [`Channel::poll_event`].
    pub(crate) fn has_events(&self) -> bool {
        !self.events.is_empty()
    }

    /// Writes a run of never-sent data frames on a stream, the first carrying `ack` if any, until
    /// the budget, the in-flight window or the queue runs out; returns how many were written.
    /// What `write_frames` does for each message, without asking the queue for each one.
    fn write_fresh(
        &mut self,
        now: Instant,
        buf: &mut BytesMut,
        start: usize,
        budget: usize,
        mut ack: Option<Seq>,
        acked_below: Seq,
    ) -> u64 {
        let (written_seqs, recv) = (&mut self.written, &mut self.recv);
        let mut piggybacked = 0;
        let sent = self.send.send_fresh(now, |out| {
            if !put_stream_data(written_seqs, out, ack, acked_below, buf, start, budget) {
                return false;
            }
            if ack.take().is_some() {
                recv.take_piggyback();
                piggybacked += 1;
            }
            true
        });
        self.stats.acks_piggybacked += piggybacked;
        self.stats.data_sent += sent;
        self.stats.frames_sent += sent;
        sent
    }

    /// The next event for the application.
    // Inlined into the caller, the event is read from the queue where the caller wants it; a
    // call would copy it out through memory on every message.
    #[inline]
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When [`Channel::handle_timeout`] next has work to do; `None` if no timer is armed.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if !matches!(self.state, State::Open) {
            return None;
        }
        earliest(self.recv.ack_deadline(), self.send.deadline())
    }

    /// Ends the channel: a close frame goes to the peer with `code`, and [`Event::Closed`] hands back
    /// the unacknowledged messages at once.
    pub fn close(&mut self, code: u64, reason: Bytes) {
        if !matches!(self.state, State::Open) {
            return;
        }
        self.state = State::Closing(Box::new(CloseFrame { code, reason }));
        self.finish(CloseReason::Local { code });
    }

    /// Ends the channel without a word to the peer (there is no connection to say it on) and
    /// returns what was never acknowledged, oldest first. The owner reports the end in its own
    /// terms (a session's `SessionLost`), so no [`Event::Closed`] is queued.
    pub fn abandon(&mut self) -> Vec<Message> {
        if !matches!(self.state, State::Open) {
            return Vec::new();
        }
        self.state = State::Closed;
        self.take_unacknowledged()
    }

    /// The peer has acknowledged every message below this sequence number; once the channel has
    /// ended, the point it had reached then (the messages from there on were handed back).
    pub fn acknowledged_below(&self) -> Seq {
        if self.is_closed() {
            self.send.drained_base()
        } else {
            self.send.base()
        }
    }

    /// Whether the channel has ended (the close frame may still be waiting in `poll_transmit`).
    pub fn is_closed(&self) -> bool {
        !matches!(self.state, State::Open)
    }

    /// Whether the channel has something to write now.
    pub fn wants_transmit(&self, now: Instant) -> bool {
        self.has_unsent() || (matches!(self.state, State::Open) && self.recv.wants_ack(now))
    }

    /// Whether the channel holds something to write whatever the time: a close frame, pongs owed,
    /// at-most-once messages, or reliable ones the in-flight window lets go. What a timer decides
    /// (an ack owed once its delay ends, a retransmission) is left out.
    pub fn has_unsent(&self) -> bool {
        match self.state {
            State::Closing(_) => true,
            State::Closed => false,
            State::Open => {
                self.pongs.as_ref().is_some_and(|p| !p.is_empty())
                    || self.unreliable.as_ref().is_some_and(|u| !u.out.is_empty())
                    || self.send.has_sendable()
            }
        }
    }

    /// Starts over on a new connection: a fresh decoder and preface, and no pongs owed on the old
    /// connection. Sequencing and queues carry on: they belong to the session, not the connection.
    pub fn reset_connection(&mut self) {
        self.decoder = None;
        self.preface_sent = false;
        self.written = WrittenSeqs::new(self.send.end());
        self.pongs = None;
    }

    /// Resumes over a new connection once the peer has said it received every message below
    /// `peer_received`: those are released, and everything else sent before goes out again first,
    /// in order. This side's own receive state goes out at once too. Returns how many messages will
    /// be resent, or the peer's claim if it covers messages never sent.
    pub fn resume(&mut self, now: Instant, peer_received: Seq) -> Result<u64, AckOfUnsent> {
        let now = self.observe(now);
        let out = self.send.on_ack(now, peer_received, &[], Duration::ZERO)?;
        if out.base_advanced {
            self.events.push_back(Event::Acknowledged {
                below: self.send.base(),
            });
        }
        self.recv.request_ack(now);
        Ok(self.send.rewind())
    }

    /// The counters.
    pub fn stats(&self) -> Stats {
        self.stats.get()
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The send side, for inspection.
    pub fn sender(&self) -> &Sender {
        &self.send
    }

    /// The send side, for a session adjusting its bounds.
    pub fn sender_mut(&mut self) -> &mut Sender {
        &mut self.send
    }

    /// The receive side, for inspection.
    pub fn receiver(&self) -> &Receiver {
        &self.recv
    }

    /// At-most-once messages dropped before sending (queue bound, or replaced by a newer sequenced one).
    pub fn unreliable_dropped(&self) -> u64 {
        self.unreliable.as_ref().map_or(0, |u| u.out.dropped())
    }

    /// Takes one decoded frame from the peer. Handshake frames are the session's business and are
    /// ignored here.
    pub fn handle_frame(&mut self, now: Instant, frame: Frame) {
        match frame {
            Frame::Data(d) => self.handle_data_into(now, d, &mut Queue),
            other => self.handle_control(now, other),
        }
    }

    /// Every frame but data.
    fn handle_control(&mut self, now: Instant, frame: Frame) {
        let now = self.observe(now);
        if !matches!(self.state, State::Open) {
            return;
        }
        self.stats.frames_received += 1;
        match frame {
            Frame::Ack(AckFrame {
                cumulative,
                delay_micros,
                ranges,
            }) => {
                let acked = self.on_ack(
                    now,
                    cumulative,
                    &ranges,
                    Duration::from_micros(delay_micros),
                );
                if let Some(below) = acked {
                    self.events.push_back(Event::Acknowledged { below });
                }
            }
            Frame::Unreliable(u) => {
                if self
                    .unreliable_mut()
                    .inbound
                    .accept(u.stream, u.seq, u.sequenced)
                {
                    self.events.push_back(Event::ReceivedUnreliable {
                        stream: u.stream,
                        payload: u.payload,
                    });
                } else {
                    self.stats.add(Rare::DuplicatesReceived, 1);
                }
            }
            Frame::Ping { id } => self.pongs.get_or_insert_with(Box::default).answer(id),
            Frame::Close(CloseFrame { code, reason }) => {
                self.state = State::Closed;
                self.finish(CloseReason::Peer { code, reason });
            }
            Frame::Data(_)
            | Frame::Pong { .. }
            | Frame::Hello(_)
            | Frame::Welcome(_)
            | Frame::Refuse(_) => {}
        }
    }

    /// As [`Channel::handle_frame`] with a data frame, whose events (its piggybacked ack's
    /// `Acknowledged`, the messages it delivers) go to `sink`: a server moves them straight into
    /// its own queue. While events wait in the channel's queue they go there too, after them.
    ///
    /// Apart from `handle_frame` so that the decoder's fields reach the receiver without a
    /// [`Frame`] built around them.
    #[inline(always)]
    pub(crate) fn handle_data_into(&mut self, now: Instant, d: DataFrame, sink: &mut impl Sink) {
        if !sink.is_queue() && !self.events.is_empty() {
            return self.handle_data_into(now, d, &mut Queue);
        }
        let now = self.observe(now);
        if !matches!(self.state, State::Open) {
            return;
        }
        self.stats.frames_received += 1;
        self.on_data_frame(now, d, sink);
    }

    /// A data frame: its ack, then its message. A violation closes the channel, queuing
    /// [`Event::Closed`] in `self.events`; nothing after it reaches `sink`.
    // Always: its one caller hands it the frame's fields in registers.
    #[inline(always)]
    fn on_data_frame(&mut self, now: Instant, d: DataFrame, sink: &mut impl Sink) {
        if let Some(cumulative) = d.ack {
            if let Some(below) = self.on_ack(now, cumulative, &[], Duration::ZERO) {
                sink.acknowledged(&mut self.events, below);
            }
            if !matches!(self.state, State::Open) {
                // Its ack was a violation: nothing it carries may reach the application.
                return;
            }
        }
        let kept = self.arrivals.is_some().then(|| crate::store::Stored {
            seq: d.seq,
            stream: d.stream,
            unordered: d.unordered,
            payload: d.payload.clone(),
        });
        let events = &mut self.events;
        let arrival = self.recv.on_data(
            now,
            d.stream,
            d.seq,
            d.unordered,
            d.payload,
            &mut ToSink { sink, events },
        );
        match arrival {
            Arrival::Duplicate => self.stats.add(Rare::DuplicatesReceived, 1),
            Arrival::BeyondWindow => self.stats.add(Rare::DroppedBeyondWindow, 1),
            Arrival::NoRoom => self.stats.add(Rare::DroppedNoRoom, 1),
            Arrival::Delivered | Arrival::Buffered => {
                if let (Some(list), Some(m)) = (&mut self.arrivals, kept) {
                    list.push(m);
                }
            }
        }
    }

    /// Takes an ack; returns its new cumulative point if it moved (an `Acknowledged` event).
    fn on_ack(
        &mut self,
        now: Instant,
        cumulative: Seq,
        ranges: &[core::ops::Range<Seq>],
        delay: Duration,
    ) -> Option<Seq> {
        match self.send.on_ack(now, cumulative, ranges, delay) {
            Ok(out) => {
                self.stats.add(Rare::DeclaredLost, out.declared_lost);
                out.base_advanced.then(|| self.send.base())
            }
            Err(e) => {
                self.violation(ProtocolError::AckOfUnsent(e));
                None
            }
        }
    }

    fn violation(&mut self, error: ProtocolError) {
        self.state = State::Closing(Box::new(CloseFrame {
            code: error.code(),
            reason: Bytes::new(),
        }));
        self.finish(CloseReason::Violation(error));
    }

    fn take_unacknowledged(&mut self) -> Vec<Message> {
        self.send
            .drain_unacknowledged()
            .map(|(stream, seq, payload)| Message {
                stream,
                seq,
                payload,
            })
            .collect()
    }

    fn finish(&mut self, reason: CloseReason) {
        let unacknowledged = self.take_unacknowledged();
        self.events.push_back(Event::Closed {
            reason,
            unacknowledged,
        });
    }

    fn write_frame(&mut self, frame: &Frame, buf: &mut BytesMut) {
        match self.config.transport {
            Transport::Stream => framing::encode_stream_frame(frame, buf),
            Transport::Datagram => framing::encode_datagram(frame, buf),
        }
        self.stats.frames_sent += 1;
    }

    fn unreliable_mut(&mut self) -> &mut Unreliable {
        let config = &self.config;
        self.unreliable.get_or_insert_with(|| {
            Box::new(Unreliable {
                out: UnreliableSender::new(
                    config.max_unreliable_queued,
                    config.max_unreliable_bytes,
                ),
                inbound: UnreliableReceiver::new(),
            })
        })
    }

    fn observe(&mut self, now: Instant) -> Instant {
        if now < self.now {
            self.stats.add(Rare::ClockRegressions, 1);
        } else {
            self.now = now;
        }
        self.now
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(transport: Transport) -> (Channel, Channel) {
        let a = Channel::new(Config::new(transport), Instant::ZERO).unwrap();
        let b = Channel::new(Config::new(transport), Instant::ZERO).unwrap();
        (a, b)
    }

    fn datagram(frame: Frame) -> Bytes {
        let mut buf = BytesMut::new();
        framing::encode_datagram(&frame, &mut buf);
        buf.freeze()
    }

    fn events(ch: &mut Channel) -> Vec<Event> {
        core::iter::from_fn(|| ch.poll_event()).collect()
    }

    #[test]
    fn an_invalid_configuration_is_refused_up_front() {
        let mut c = Config::new(Transport::Stream);
        c.ack_every = 0;
        assert_eq!(
            Channel::new(c, Instant::ZERO).unwrap_err(),
            ConfigError::Zero("ack_every")
        );
    }

    #[test]
    fn the_acknowledged_point_stays_where_acks_left_it_when_a_close_hands_the_rest_back() {
        let (mut a, _) = pair(Transport::Datagram);
        for m in [&b"one"[..], b"two", b"three"] {
            a.send(Bytes::from_static(m)).unwrap();
        }
        let ack = AckFrame {
            cumulative: 1,
            delay_micros: 0,
            ranges: Default::default(),
        };
        let mut buf = BytesMut::new();
        while a.poll_transmit(Instant::ZERO, &mut buf).is_some() {}
        a.handle_input(Instant::ZERO, datagram(Frame::Ack(ack)));
        assert_eq!(a.acknowledged_below(), 1);
        a.close(0, Bytes::new());
        assert_eq!(a.acknowledged_below(), 1, "not past the two handed back");
        assert!(events(&mut a).iter().any(|e| matches!(
            e,
            Event::Closed { unacknowledged, .. } if unacknowledged.len() == 2
        )));
    }

    #[test]
    fn an_ack_of_what_was_never_sent_closes_the_channel_as_a_violation() {
        let (mut a, _) = pair(Transport::Datagram);
        a.send(Bytes::from_static(b"kept")).unwrap();
        let ack = AckFrame {
            cumulative: 5,
            delay_micros: 0,
            ranges: Default::default(),
        };
        a.handle_input(Instant::ZERO, datagram(Frame::Ack(ack)));
        match events(&mut a).as_slice() {
            [
                Event::Closed {
                    reason: CloseReason::Violation(ProtocolError::AckOfUnsent(_)),
                    unacknowledged,
                },
            ] => {
                assert_eq!(unacknowledged.len(), 1, "the unsent message is handed back");
            }
            other => panic!("expected a violation, got {other:?}"),
        }
        let mut buf = BytesMut::new();
        assert!(
            a.poll_transmit(Instant::ZERO, &mut buf).is_some(),
            "the close frame goes out"
        );
        assert!(matches!(
            framing::decode_datagram(buf.freeze(), &DecodeLimits::default()),
            Ok(Frame::Close(CloseFrame {
                code: crate::CLOSE_PROTOCOL_VIOLATION,
                ..
            }))
        ));
        assert_eq!(
            a.poll_transmit(Instant::ZERO, &mut BytesMut::new()),
            None,
            "then nothing"
        );
    }

    #[test]
    fn a_message_whose_piggybacked_ack_is_a_violation_is_never_delivered() {
        let (mut a, _) = pair(Transport::Datagram);
        let evil = Frame::Data(DataFrame {
            stream: 0,
            seq: 0,
            ack: Some(5),
            unordered: false,
            payload: Bytes::from_static(b"evil"),
        });
        a.handle_input(Instant::ZERO, datagram(evil));
        let ev = events(&mut a);
        assert!(
            matches!(ev.as_slice(), [Event::Closed { .. }]),
            "got {ev:?}"
        );
    }

    #[test]
    fn garbage_on_a_stream_closes_the_channel_with_a_decode_error() {
        let (mut a, _) = pair(Transport::Stream);
        a.handle_input(Instant::ZERO, Bytes::from_static(b"GET / HTTP/1.1\r\n"));
        assert!(matches!(
            events(&mut a).as_slice(),
            [Event::Closed {
                reason: CloseReason::Violation(ProtocolError::Decode(_)),
                ..
            }]
        ));
        assert!(a.is_closed());
    }

    #[test]
    fn a_garbled_datagram_is_discarded_like_a_lost_one() {
        let (mut a, _) = pair(Transport::Datagram);
        a.handle_input(Instant::ZERO, Bytes::from_static(&[0xff, 0xff, 0xff]));
        assert!(!a.is_closed());
        assert_eq!(a.stats().malformed_datagrams, 1);
    }

    #[test]
    fn closing_hands_back_the_unacknowledged_and_refuses_further_sends() {
        let (mut a, _) = pair(Transport::Stream);
        let seq = a.send(Bytes::from_static(b"in doubt")).unwrap();
        a.close(crate::CLOSE_NORMAL, Bytes::from_static(b"bye"));
        match events(&mut a).as_slice() {
            [
                Event::Closed {
                    reason: CloseReason::Local { code: 0 },
                    unacknowledged,
                },
            ] => {
                assert_eq!(unacknowledged[0].seq, seq);
            }
            other => panic!("expected Closed, got {other:?}"),
        }
        assert!(matches!(a.send(Bytes::new()), Err(SendError::Closed(_))));
    }

    #[test]
    fn the_peers_close_reaches_the_application_with_its_code_and_reason() {
        let (mut a, mut b) = pair(Transport::Stream);
        a.close(42, Bytes::from_static(b"maintenance"));
        let mut buf = BytesMut::new();
        let n = a.poll_transmit(Instant::ZERO, &mut buf).unwrap();
        b.handle_input(Instant::ZERO, buf.split_to(n).freeze());
        match events(&mut b).as_slice() {
            [
                Event::Closed {
                    reason: CloseReason::Peer { code: 42, reason },
                    ..
                },
            ] => {
                assert_eq!(&reason[..], b"maintenance");
            }
            other => panic!("expected the peer's close, got {other:?}"),
        }
    }

    #[test]
    fn a_ping_is_answered_with_a_pong_carrying_its_id() {
        let (mut a, _) = pair(Transport::Datagram);
        a.handle_input(Instant::ZERO, datagram(Frame::Ping { id: 77 }));
        let mut buf = BytesMut::new();
        a.poll_transmit(Instant::ZERO, &mut buf).unwrap();
        assert_eq!(
            framing::decode_datagram(buf.freeze(), &DecodeLimits::default()),
            Ok(Frame::Pong { id: 77 })
        );
    }

    #[test]
    fn a_ping_flood_keeps_only_the_newest_answers() {
        let (mut a, _) = pair(Transport::Datagram);
        for id in 0..1000 {
            a.handle_input(Instant::ZERO, datagram(Frame::Ping { id }));
        }
        let mut pongs = Vec::new();
        let mut buf = BytesMut::new();
        while let Some(n) = a.poll_transmit(Instant::ZERO, &mut buf) {
            pongs.push(framing::decode_datagram(
                buf.split_to(n).freeze(),
                &DecodeLimits::default(),
            ));
        }
        assert_eq!(pongs.len(), crate::liveness::PONG_BACKLOG);
        assert_eq!(pongs.last(), Some(&Ok(Frame::Pong { id: 999 })));
    }

    #[test]
    fn a_clock_that_steps_backwards_is_held_at_its_latest_reading_and_counted() {
        let (mut a, _) = pair(Transport::Datagram);
        a.handle_timeout(Instant::from_nanos(1_000));
        a.handle_timeout(Instant::from_nanos(500));
        assert_eq!(a.stats().clock_regressions, 1);
        assert_eq!(a.now, Instant::from_nanos(1_000));
    }

    #[test]
    fn an_ack_rides_on_outgoing_data_instead_of_a_frame_of_its_own() {
        let (mut a, _) = pair(Transport::Datagram);
        let data = Frame::Data(DataFrame {
            stream: 0,
            seq: 0,
            ack: None,
            unordered: false,
            payload: Bytes::from_static(b"hi"),
        });
        a.handle_input(Instant::ZERO, datagram(data));
        a.send(Bytes::from_static(b"reply")).unwrap();
        let mut buf = BytesMut::new();
        a.poll_transmit(Instant::ZERO, &mut buf).unwrap();
        match framing::decode_datagram(buf.freeze(), &DecodeLimits::default()) {
            Ok(Frame::Data(d)) => assert_eq!(d.ack, Some(1)),
            other => panic!("expected data with an ack, got {other:?}"),
        }
        assert_eq!(a.stats().acks_piggybacked, 1);
        assert_eq!(
            a.poll_timeout(),
            a.sender().deadline(),
            "no ack left to send"
        );
    }
}
