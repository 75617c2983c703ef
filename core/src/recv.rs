//! The receive side: de-duplication, reordering and the ack policy.
//!
//! De-duplication is the `min_recv` algorithm of seeds/003: a watermark below which every sequence
//! number has arrived, and a compacted sparse set ([`crate::config::RecvRanges`]) of arrivals above it.
//! When the watermark reaches the set's first range, the range is popped and the watermark jumps past it.
//!
//! # Bounds
//! Whatever the peer sends, this state never exceeds:
//! - de-duplication: one watermark and at most [`crate::config::RECV_RANGES`] ranges (16 bytes
//!   each on the heap, allocated at the first gap: 16·64 bytes at most), because an arrival that
//!   would open a further gap is dropped unacknowledged;
//! - reordering (ordered messages only): at most `recv_window` slots and `max_reorder_bytes` payload
//!   bytes, because anything at or beyond `watermark + recv_window`, or that would overflow the byte
//!   bound, is dropped unacknowledged. The sender retransmits what was dropped, so bounds cost
//!   throughput under pathological reordering, never correctness.

use alloc::collections::VecDeque;
use core::ops::Range;

use bytes::Bytes;

use crate::Seq;
use crate::config::{Config, RecvRanges};
use crate::frame::{AckFrame, AckRanges};
use crate::time::{Instant, Span, micros};

/// Where [`Receiver::on_data`] hands the messages due to the application: any
/// `FnMut(stream, seq, payload)`, or a type of the caller's whose method is inlined into the
/// receiver's fast path (a closure's call may not be, and then the payload is stored and loaded
/// back on every message).
pub trait Deliver {
    /// The message numbered `seq` on `stream` is due.
    fn deliver(&mut self, stream: u64, seq: Seq, payload: Bytes);
}

impl<F: FnMut(u64, Seq, Bytes)> Deliver for F {
    #[inline(always)]
    fn deliver(&mut self, stream: u64, seq: Seq, payload: Bytes) {
        self(stream, seq, payload);
    }
}

/// What became of one arriving data frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrival {
    /// Handed to the application (with any buffered successors, under ordered delivery).
    Delivered,
    /// Held in the reorder buffer until the gap before it fills.
    Buffered,
    /// Seen before: re-acknowledged, not delivered again.
    Duplicate,
    /// At or beyond `watermark + recv_window`: dropped unacknowledged.
    BeyondWindow,
    /// The de-duplication set or the reorder buffer is full: dropped unacknowledged.
    NoRoom,
}

/// The receiving half of a channel.
#[derive(Debug)]
pub struct Receiver {
    /// Every sequence number below this arrived (and, under ordered delivery, was delivered).
    watermark: Seq,
    /// Arrivals above the watermark. Never contains the watermark itself.
    above: RecvRanges,
    /// Ordered delivery: slot `i` holds the payload of `watermark + i` if it arrived.
    reorder: VecDeque<Option<(u64, Bytes)>>,
    reorder_bytes: usize,
    window: u64,
    max_reorder_bytes: usize,
    ack: AckPolicy,
    #[cfg(feature = "canary")]
    canary: Option<crate::canary::Canary>,
}

/// When to acknowledge: after `ack_every` data frames, after `max_ack_delay`, or at once when the peer
/// needs to hear about a gap or a duplicate.
#[derive(Debug)]
struct AckPolicy {
    every: u32,
    max_delay: Span,
    /// Data frames that arrived since the last ack was sent.
    unacked: u32,
    /// Something arrived that the peer has not been told about.
    pending: bool,
    /// Send the ack at the next opportunity rather than waiting.
    urgent: bool,
    deadline: Option<Instant>,
    last_arrival: Instant,
}

impl Receiver {
    #[cfg(test)]
    pub(crate) fn queue_room(&self) -> usize {
        self.reorder.capacity() - self.reorder.len()
    }

    /// Lets go of the reorder buffer's spare room.
    pub(crate) fn shrink_queues(&mut self) {
        self.reorder.shrink_to_fit();
    }

    /// A receiver expecting sequence number 0 first.
    pub fn new(config: &Config) -> Self {
        Receiver {
            watermark: 0,
            above: RecvRanges::new(),
            reorder: VecDeque::new(),
            reorder_bytes: 0,
            window: config.recv_window,
            max_reorder_bytes: config.max_reorder_bytes,
            #[cfg(feature = "canary")]
            canary: config.canary,
            ack: AckPolicy {
                every: config.ack_every,
                max_delay: Span::of(config.max_ack_delay),
                unacked: 0,
                pending: false,
                urgent: false,
                deadline: None,
                last_arrival: Instant::ZERO,
            },
        }
    }

    /// Takes one data frame; calls `deliver(stream, seq, payload)` for each message now due to the
    /// application, in the order they are due. An `unordered` message is due on arrival; an ordered
    /// one once every earlier sequence number has arrived.
    // Always: a healthy path's every arrival takes the first branch, and inlined it hands the
    // payload on in registers, where a call would store it and load it back.
    #[inline(always)]
    pub fn on_data(
        &mut self,
        now: Instant,
        stream: u64,
        seq: Seq,
        unordered: bool,
        payload: Bytes,
        deliver: &mut impl Deliver,
    ) -> Arrival {
        if seq == self.watermark && self.above.is_empty() && self.reorder.is_empty() {
            // The next one, with nothing above it: what `on_data_general` does for it, without
            // its lookups.
            deliver.deliver(stream, seq, payload);
            self.watermark += 1;
            self.ack.note(now, false);
            return Arrival::Delivered;
        }
        self.on_data_general(now, stream, seq, unordered, payload, deliver)
    }

    /// [`Receiver::on_data`] for any arrival.
    fn on_data_general(
        &mut self,
        now: Instant,
        stream: u64,
        seq: Seq,
        unordered: bool,
        payload: Bytes,
        deliver: &mut impl Deliver,
    ) -> Arrival {
        if seq < self.watermark || self.above.contains(seq) {
            // Our ack was lost or is late: tell the sender again, promptly, so it stops resending.
            self.ack.note(now, true);
            #[cfg(feature = "canary")]
            if self.canary == Some(crate::canary::Canary::SkipDedup) {
                deliver.deliver(stream, seq, payload);
            }
            return Arrival::Duplicate;
        }
        let offset = seq - self.watermark;
        if offset >= self.window {
            return Arrival::BeyondWindow;
        }
        // RFC 9000 §13.2.1: ack at once when an arrival fills a gap (it came after something later)
        // or opens one (something before it is missing); an arrival extending the top is routine.
        let top = self.above.end().unwrap_or(self.watermark);
        let urgent = seq != top;
        if offset == 0 {
            self.advance(stream, payload, deliver);
            self.ack.note(now, urgent);
            return Arrival::Delivered;
        }
        let ordered = !unordered;
        #[cfg(feature = "canary")]
        let ordered = ordered && self.canary != Some(crate::canary::Canary::DeliverOutOfOrder);
        if ordered && self.reorder_bytes.saturating_add(payload.len()) > self.max_reorder_bytes {
            return Arrival::NoRoom;
        }
        if self.above.insert(seq).is_err() {
            return Arrival::NoRoom;
        }
        self.ack.note(now, urgent);
        if ordered {
            // offset < window <= 2^32 (checked by Config::validate), so it indexes.
            let i = offset as usize;
            if self.reorder.len() <= i {
                self.reorder.resize(i + 1, None);
            }
            self.reorder_bytes += payload.len();
            self.reorder[i] = Some((stream, payload));
            Arrival::Buffered
        } else {
            deliver.deliver(stream, seq, payload);
            Arrival::Delivered
        }
    }

    /// Delivers the watermark's message, then everything contiguous after it.
    fn advance(&mut self, stream: u64, payload: Bytes, deliver: &mut impl Deliver) {
        deliver.deliver(stream, self.watermark, payload);
        self.step_watermark(deliver);
        while let Some(end) = self.above.pop_if_starts_at(self.watermark) {
            while self.watermark < end {
                self.step_watermark(deliver);
            }
        }
    }

    /// Moves the watermark up by one. The reorder buffer's front slot is the current watermark's, so
    /// it leaves with it, delivering its payload if one was buffered there.
    fn step_watermark(&mut self, deliver: &mut impl Deliver) {
        if let Some(Some((stream, payload))) = self.reorder.pop_front() {
            self.reorder_bytes -= payload.len();
            deliver.deliver(stream, self.watermark, payload);
        }
        self.watermark += 1;
    }

    /// Takes back, into a receiver that has received nothing, what a store kept from a previous
    /// process: the arrivals (so they are not delivered twice) and the ordered messages that were
    /// waiting above a gap. Fails if they do not fit this receiver's bounds.
    pub(crate) fn restore(
        &mut self,
        watermark: Seq,
        above: &[Range<Seq>],
        waiting: impl Iterator<Item = (Seq, u64, Bytes)>,
    ) -> Result<(), crate::store::StoreError> {
        let too_big = || {
            crate::store::StoreError::Corrupt(alloc::string::String::from(
                "stored arrivals exceed the receive window",
            ))
        };
        self.watermark = watermark;
        for r in above {
            if r.start <= watermark || r.end.saturating_sub(watermark) > self.window {
                return Err(too_big());
            }
            for seq in r.clone() {
                self.above.insert(seq).map_err(|_| too_big())?;
            }
        }
        for (seq, stream, payload) in waiting {
            let i = (seq - watermark) as usize;
            if self.reorder.len() <= i {
                self.reorder.resize(i + 1, None);
            }
            self.reorder_bytes += payload.len();
            self.reorder[i] = Some((stream, payload));
        }
        Ok(())
    }

    /// Every sequence number below this has arrived.
    pub fn watermark(&self) -> Seq {
        self.watermark
    }

    /// The out-of-order arrivals above the watermark.
    pub fn ranges(&self) -> &[Range<Seq>] {
        self.above.ranges()
    }

    /// Payload bytes waiting in the reorder buffer.
    pub fn reorder_bytes(&self) -> usize {
        self.reorder_bytes
    }

    /// Slots in the reorder buffer (at most `recv_window`).
    pub fn reorder_slots(&self) -> usize {
        self.reorder.len()
    }

    /// Whether an ack should be sent now.
    pub fn wants_ack(&self, now: Instant) -> bool {
        self.ack.pending && (self.ack.urgent || self.ack.deadline.is_some_and(|d| d <= now))
    }

    /// Whether the peer has not yet heard of some arrival.
    pub fn ack_pending(&self) -> bool {
        self.ack.pending
    }

    /// When the held-back ack is due, if one is.
    pub fn ack_deadline(&self) -> Option<Instant> {
        if self.ack.pending && !self.ack.urgent {
            self.ack.deadline
        } else {
            None
        }
    }

    /// The full ack (cumulative plus the lowest selective ranges); records it as sent.
    pub fn take_ack(&mut self, now: Instant) -> AckFrame {
        let mut ranges = AckRanges::new();
        for r in self.above.ranges() {
            if ranges.push(r.clone()).is_err() {
                // The lowest gaps matter most to the sender; the rest are reported once these fill.
                break;
            }
        }
        let delay_micros = micros(now - self.ack.last_arrival);
        self.ack.sent();
        AckFrame {
            cumulative: self.watermark,
            delay_micros,
            ranges,
        }
    }

    /// Makes the receive state go out at the next opportunity (after a resume, the peer must hear
    /// where this side stands before it can trust its own view).
    pub fn request_ack(&mut self, now: Instant) {
        self.ack.pending = true;
        self.ack.urgent = true;
        self.ack.last_arrival = now;
    }

    /// The cumulative ack to carry on an outgoing data frame, if one is pending and says everything
    /// (no gaps to report); records it as sent.
    pub fn take_piggyback(&mut self) -> Option<Seq> {
        if self.ack.pending && self.above.is_empty() {
            self.ack.sent();
            Some(self.watermark)
        } else {
            None
        }
    }
}

impl AckPolicy {
    fn note(&mut self, now: Instant, urgent: bool) {
        self.last_arrival = now;
        self.unacked = self.unacked.saturating_add(1);
        if !self.pending {
            self.pending = true;
            self.deadline = Some(now + self.max_delay.get());
        }
        if urgent || self.unacked >= self.every {
            self.urgent = true;
        }
    }

    fn sent(&mut self) {
        self.unacked = 0;
        self.pending = false;
        self.urgent = false;
        self.deadline = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Transport;
    use crate::time::Duration;
    use alloc::vec::Vec;

    fn receiver() -> Receiver {
        let mut c = Config::new(Transport::Stream);
        c.recv_window = 8;
        c.ack_every = 4;
        Receiver::new(&c)
    }

    /// Feeds ordered messages.
    fn feed(r: &mut Receiver, seqs: &[Seq]) -> (Vec<Seq>, Vec<Arrival>) {
        feed_as(r, seqs, false)
    }

    fn feed_as(r: &mut Receiver, seqs: &[Seq], unordered: bool) -> (Vec<Seq>, Vec<Arrival>) {
        let mut got = Vec::new();
        let mut arrivals = Vec::new();
        for &s in seqs {
            let x = Bytes::from_static(b"x");
            arrivals.push(
                r.on_data(Instant::ZERO, 0, s, unordered, x, &mut |_, seq, _| {
                    got.push(seq)
                }),
            );
        }
        (got, arrivals)
    }

    #[test]
    fn ordered_delivery_holds_arrivals_after_a_gap_until_it_fills() {
        let mut r = receiver();
        let (got, arr) = feed(&mut r, &[1, 2, 0]);
        assert_eq!(got, [0, 1, 2]);
        assert_eq!(
            arr,
            [Arrival::Buffered, Arrival::Buffered, Arrival::Delivered]
        );
        assert_eq!(r.watermark(), 3);
        assert!(r.ranges().is_empty());
        assert_eq!((r.reorder_slots(), r.reorder_bytes()), (0, 0));
    }

    #[test]
    fn unordered_delivery_hands_over_at_once_and_still_never_twice() {
        let mut r = receiver();
        let (got, arr) = feed_as(&mut r, &[2, 0, 2, 1, 0], true);
        assert_eq!(got, [2, 0, 1]);
        assert_eq!(arr[2], Arrival::Duplicate);
        assert_eq!(arr[4], Arrival::Duplicate);
        assert_eq!(r.watermark(), 3);
    }

    #[test]
    fn a_duplicate_below_the_watermark_is_reacknowledged_urgently() {
        let mut r = receiver();
        feed(&mut r, &[0]);
        r.take_ack(Instant::ZERO);
        assert!(!r.wants_ack(Instant::ZERO));
        let (got, _) = feed(&mut r, &[0]);
        assert!(got.is_empty());
        assert!(r.wants_ack(Instant::ZERO));
    }

    #[test]
    fn an_arrival_beyond_the_window_is_dropped_and_not_acknowledged() {
        let mut r = receiver();
        let (got, arr) = feed(&mut r, &[8]);
        assert!(got.is_empty());
        assert_eq!(arr, [Arrival::BeyondWindow]);
        assert!(!r.ack_pending());
    }

    #[test]
    fn the_reorder_buffer_refuses_payload_bytes_past_its_bound_but_never_the_next_expected() {
        let mut c = Config::new(Transport::Stream);
        c.max_reorder_bytes = 1;
        let mut r = Receiver::new(&c);
        let (_, arr) = feed(&mut r, &[1, 2, 0]);
        assert_eq!(
            arr,
            [Arrival::Buffered, Arrival::NoRoom, Arrival::Delivered]
        );
        assert_eq!(r.watermark(), 2);
    }

    #[test]
    fn in_order_arrivals_are_acknowledged_every_n_frames_or_after_the_delay() {
        let mut r = receiver();
        feed(&mut r, &[0, 1, 2]);
        assert!(!r.wants_ack(Instant::ZERO));
        assert_eq!(
            r.ack_deadline(),
            Some(Instant::ZERO + Duration::from_millis(5))
        );
        assert!(r.wants_ack(Instant::ZERO + Duration::from_millis(5)));
        feed(&mut r, &[3]);
        assert!(
            r.wants_ack(Instant::ZERO),
            "the fourth frame makes the ack due"
        );
    }

    #[test]
    fn a_gap_is_reported_at_once_with_its_selective_ranges() {
        let mut r = receiver();
        feed(&mut r, &[0, 2, 3, 5]);
        assert!(r.wants_ack(Instant::ZERO));
        assert_eq!(r.take_piggyback(), None, "gaps need a full ack");
        let ack = r.take_ack(Instant::ZERO);
        assert_eq!(ack.cumulative, 1);
        assert_eq!(&ack.ranges[..], &[2..4, 5..6]);
        assert!(!r.ack_pending());
    }

    #[test]
    fn the_ack_delay_reports_how_long_the_last_arrival_waited() {
        let mut r = receiver();
        r.on_data(
            Instant::from_nanos(1_000_000),
            0,
            0,
            false,
            Bytes::new(),
            &mut |_, _, _| {},
        );
        let ack = r.take_ack(Instant::from_nanos(3_000_000));
        assert_eq!(ack.delay_micros, 2_000);
    }
}
