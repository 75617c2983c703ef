//! Counters a channel keeps about itself: what operators graph and what tests assert.

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
