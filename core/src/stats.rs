//! Counters a channel keeps about itself: what operators graph and what tests assert.

use alloc::boxed::Box;

/// Per-channel counters. All only ever grow.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// Frames written (all kinds).
    pub frames_sent: u64,
    /// Frames read (all kinds).
    pub frames_received: u64,
    /// Data frames written, first transmissions and retransmissions.
    pub data_sent: u64,
    /// Of those, retransmissions.
    pub retransmitted: u64,
    /// Standalone ack frames written.
    pub acks_sent: u64,
    /// Acks carried on outgoing data frames instead of a frame of their own.
    pub acks_piggybacked: u64,
    /// Bytes written, framing included.
    pub bytes_sent: u64,
    /// Bytes read, framing included.
    pub bytes_received: u64,
    /// Data frames that arrived twice (re-acked, not delivered).
    pub duplicates_received: u64,
    /// Data frames dropped unacknowledged because they lay beyond the receive window.
    pub dropped_beyond_window: u64,
    /// Data frames dropped unacknowledged because the de-dup set or reorder buffer was full.
    pub dropped_no_room: u64,
    /// Datagrams that did not decode and were discarded (datagram transports only).
    pub malformed_datagrams: u64,
    /// Messages declared lost by ack evidence or timeout.
    pub declared_lost: u64,
    /// Retransmission timer expiries.
    pub rto_expiries: u64,
    /// Calls whose `now` was earlier than a previous call's (treated as the previous `now`).
    pub clock_regressions: u64,
}

/// A channel's [`Stats`] as it keeps them: the counters every busy channel moves inline, the rest
/// (losses, duplicates, drops, clock trouble) behind a box made at the first of them. Most channels
/// never need it, and a server keeps a channel per session.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) frames_sent: u64,
    pub(crate) frames_received: u64,
    pub(crate) data_sent: u64,
    pub(crate) acks_sent: u64,
    pub(crate) acks_piggybacked: u64,
    pub(crate) bytes_sent: u64,
    pub(crate) bytes_received: u64,
    rare: Option<Box<[u64; RARE]>>,
}

/// The counters of [`Stats`] that [`Counters`] keeps boxed.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Rare {
    Retransmitted,
    DuplicatesReceived,
    DroppedBeyondWindow,
    DroppedNoRoom,
    MalformedDatagrams,
    DeclaredLost,
    RtoExpiries,
    ClockRegressions,
}

const RARE: usize = Rare::ClockRegressions as usize + 1;

impl Counters {
    /// Adds `n` to a rare counter; adding nothing makes no box.
    pub(crate) fn add(&mut self, counter: Rare, n: u64) {
        if n > 0 {
            self.rare.get_or_insert_with(Box::default)[counter as usize] += n;
        }
    }

    /// All of them.
    pub(crate) fn get(&self) -> Stats {
        let rare = |c: Rare| self.rare.as_ref().map_or(0, |r| r[c as usize]);
        Stats {
            frames_sent: self.frames_sent,
            frames_received: self.frames_received,
            data_sent: self.data_sent,
            retransmitted: rare(Rare::Retransmitted),
            acks_sent: self.acks_sent,
            acks_piggybacked: self.acks_piggybacked,
            bytes_sent: self.bytes_sent,
            bytes_received: self.bytes_received,
            duplicates_received: rare(Rare::DuplicatesReceived),
            dropped_beyond_window: rare(Rare::DroppedBeyondWindow),
            dropped_no_room: rare(Rare::DroppedNoRoom),
            malformed_datagrams: rare(Rare::MalformedDatagrams),
            declared_lost: rare(Rare::DeclaredLost),
            rto_expiries: rare(Rare::RtoExpiries),
            clock_regressions: rare(Rare::ClockRegressions),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_rare_counter_lands_in_its_own_stats_field_and_nothing_added_makes_no_box() {
        let mut c = Counters::default();
        c.add(Rare::DeclaredLost, 0);
        assert!(c.rare.is_none());
        assert_eq!(c.get(), Stats::default());
        let all = [
            Rare::Retransmitted,
            Rare::DuplicatesReceived,
            Rare::DroppedBeyondWindow,
            Rare::DroppedNoRoom,
            Rare::MalformedDatagrams,
            Rare::DeclaredLost,
            Rare::RtoExpiries,
            Rare::ClockRegressions,
        ];
        for (i, r) in all.into_iter().enumerate() {
            c.add(r, 1 << i);
        }
        c.frames_sent = 1 << 10;
        let s = c.get();
        assert_eq!(
            [
                s.retransmitted,
                s.duplicates_received,
                s.dropped_beyond_window,
                s.dropped_no_room,
                s.malformed_datagrams,
                s.declared_lost,
                s.rto_expiries,
                s.clock_regressions,
                s.frames_sent,
            ],
            [1, 2, 4, 8, 16, 32, 64, 128, 1 << 10]
        );
    }

    #[test]
    fn the_counters_a_server_keeps_per_session_take_64_bytes_not_120() {
        assert!(size_of::<Counters>() <= 64);
    }
}
