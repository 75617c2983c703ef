//! Every bound and timer of a channel, with defaults and validation.
//!
//! Each queue, window and table in the core is sized from here, so the worst-case memory of a channel is
//! known before the first byte arrives; [`Config::validate`] refuses settings that would make a bound
//! meaningless (a zero window) or a frame unrepresentable.

use core::fmt;

use crate::ranges::RangeSet;
use crate::time::Duration;

/// How many out-of-order ranges the receiver's de-duplication set holds.
///
/// With a receive window of `W` messages the worst case (every other message missing) needs `W / 2`
/// ranges; beyond this many, an arrival that would open a new gap is dropped unacknowledged and
/// retransmitted later. Acks report the lowest [`crate::frame::MAX_ACK_RANGES`] of them.
pub const RECV_RANGES: usize = 64;

/// The receiver's sparse set of out-of-order arrivals.
pub type RecvRanges = RangeSet<RECV_RANGES>;

/// The longest data frame header: a type byte and three 8-byte varints (stream, sequence, ack).
pub const MAX_DATA_HEADER_LEN: usize = 1 + 3 * 8;

/// The smallest `max_frame_size` accepted: room for the largest ack frame (6 ranges, under 128 bytes) and
/// the largest close frame (a 256-byte reason).
pub const MIN_FRAME_SIZE: usize = 1024;

/// What the channel runs over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Transport {
    /// An ordered, reliable byte stream (TCP, TLS): frames are length-delimited after a preface, and
    /// nothing is retransmitted on a timer (only on resume over a new connection).
    Stream,
    /// Unordered, lossy datagrams (UDP, the simulator's packets): one frame per datagram, losses
    /// detected from acks and an RTT-estimated timeout, and retransmitted.
    Datagram,
}

/// The mode [`crate::Channel::send`] uses (other modes: [`crate::Channel::send_on`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Delivery {
    /// Exactly once, in sequence order: an arrival after a gap waits in the reorder buffer.
    Ordered,
    /// Exactly once, as soon as it arrives: no head-of-line blocking.
    Unordered,
}

/// The configuration of a [`crate::Channel`].
///
/// ```
/// use steadfast_core::{Config, Transport};
/// let mut config = Config::new(Transport::Datagram);
/// config.recv_window = 256;
/// config.max_in_flight = 256;
/// assert!(config.validate().is_ok());
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Config {
    /// What the channel runs over.
    pub transport: Transport,
    /// The mode of [`crate::Channel::send`].
    pub delivery: Delivery,
    /// The most messages the sender holds (unsent plus unacknowledged); `send` beyond it is refused
    /// with [`crate::SendError::QueueFull`].
    pub max_queued_messages: usize,
    /// The most payload bytes the sender holds (unsent plus unacknowledged).
    pub max_queued_bytes: usize,
    /// The most messages sent but not yet acknowledged.
    pub max_in_flight: u64,
    /// The most at-most-once messages waiting to be sent; past it the oldest is dropped.
    pub max_unreliable_queued: usize,
    /// The most at-most-once payload bytes waiting to be sent; past it the oldest is dropped.
    pub max_unreliable_bytes: usize,
    /// How far above its watermark the receiver accepts a sequence number; anything beyond is dropped
    /// unacknowledged. Both ends must agree on it (the session handshake will exchange it).
    pub recv_window: u64,
    /// The most payload bytes held in the reorder buffer waiting for a gap to fill (ordered delivery).
    pub max_reorder_bytes: usize,
    /// The largest frame accepted or sent, header included.
    pub max_frame_size: usize,
    /// Acknowledge at the latest after this many unacknowledged data frames.
    pub ack_every: u32,
    /// Acknowledge at the latest this long after the first unacknowledged data frame arrived.
    pub max_ack_delay: Duration,
    /// The RTT assumed before the first measurement (datagram transports).
    pub initial_rtt: Duration,
    /// The smallest retransmission timeout (datagram transports).
    pub min_rto: Duration,
    /// The largest retransmission timeout, after backoff (datagram transports).
    pub max_rto: Duration,
    /// The most bytes one [`crate::Channel::poll_transmit`] call writes for a stream transport, so one
    /// write syscall carries many frames without an unbounded buffer.
    pub max_batch_bytes: usize,
    /// A deliberate bug to plant (simulator canaries only).
    #[cfg(feature = "canary")]
    pub canary: Option<crate::canary::Canary>,
}

impl Config {
    /// The defaults for `transport`.
    ///
    /// A datagram transport sends at most 256 messages ahead: a burst any larger arrives so
    /// scrambled by per-packet jitter that the de-duplication bound turns reordering into loss.
    /// A stream may have its whole queue in flight: a receiver that takes a 64 KiB read's worth
    /// of small frames at once would otherwise leave the sender idle until its ack came back.
    ///
    /// The queue holds 16,384 messages: a window of messages in flight caps a session at one
    /// window per round trip, and at 4,096 a 50 ms path allowed 82,000 messages a second (on
    /// loopback, the sender's waits for acks cost 5–10% of its 64 B rate).
    /// Memory stays bounded by `max_queued_bytes`, and queues grow only as they are used.
    pub fn new(transport: Transport) -> Self {
        let max_in_flight = match transport {
            Transport::Stream => 16384,
            Transport::Datagram => 256,
        };
        Config {
            transport,
            delivery: Delivery::Ordered,
            max_queued_messages: 16384,
            max_queued_bytes: 16 << 20,
            max_in_flight,
            max_unreliable_queued: 1024,
            max_unreliable_bytes: 1 << 20,
            recv_window: 1024,
            max_reorder_bytes: 4 << 20,
            max_frame_size: (1 << 20) + 64,
            ack_every: 32,
            max_ack_delay: Duration::from_millis(5),
            initial_rtt: Duration::from_millis(100),
            min_rto: Duration::from_millis(100),
            max_rto: Duration::from_secs(2),
            max_batch_bytes: 64 << 10,
            #[cfg(feature = "canary")]
            canary: None,
        }
    }

    /// The largest payload a frame of [`Config::max_frame_size`] can carry whatever its header.
    pub fn max_payload(&self) -> usize {
        self.max_frame_size.saturating_sub(MAX_DATA_HEADER_LEN)
    }

    /// The most messages the sender can have in flight to a peer whose receive window is
    /// `peer_window`: its own limit and, over datagrams, never more than that window (the peer
    /// would drop the excess unacknowledged). A stream delivers in order, so each frame arrives at
    /// the peer's watermark, where the window never binds.
    pub fn in_flight_limit(&self, peer_window: u64) -> u64 {
        match self.transport {
            Transport::Stream => self.max_in_flight,
            Transport::Datagram => self.max_in_flight.min(peer_window.max(1)),
        }
    }

    /// Checks that every bound is usable.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let positive = [
            ("max_queued_messages", self.max_queued_messages as u64),
            ("max_queued_bytes", self.max_queued_bytes as u64),
            ("max_in_flight", self.max_in_flight),
            ("recv_window", self.recv_window),
            ("ack_every", u64::from(self.ack_every)),
            ("max_batch_bytes", self.max_batch_bytes as u64),
        ];
        if let Some((name, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(ConfigError::Zero(name));
        }
        if self.recv_window > 1 << 32 {
            return Err(ConfigError::WindowTooLarge(self.recv_window));
        }
        if self.max_frame_size < MIN_FRAME_SIZE {
            return Err(ConfigError::FrameTooSmall(self.max_frame_size));
        }
        if self.min_rto.is_zero() || self.min_rto > self.max_rto {
            return Err(ConfigError::RtoRange);
        }
        Ok(())
    }
}

impl Default for Config {
    fn default() -> Self {
        Config::new(Transport::Stream)
    }
}

/// A [`Config`] that [`Config::validate`] refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConfigError {
    /// This bound is zero, so nothing could ever be sent or received.
    Zero(&'static str),
    /// The receive window is larger than 2^32 messages, past what the reorder buffer may index.
    WindowTooLarge(u64),
    /// The frame size is below [`MIN_FRAME_SIZE`].
    FrameTooSmall(usize),
    /// `min_rto` is zero or above `max_rto`.
    RtoRange,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::Zero(name) => write!(f, "config: {name} must be at least 1"),
            ConfigError::WindowTooLarge(w) => write!(f, "config: recv_window {w} exceeds 2^32"),
            ConfigError::FrameTooSmall(n) => {
                write!(
                    f,
                    "config: max_frame_size {n} is below the minimum {MIN_FRAME_SIZE}"
                )
            }
            ConfigError::RtoRange => write!(f, "config: need 0 < min_rto <= max_rto"),
        }
    }
}

impl core::error::Error for ConfigError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_largest_data_header_fits_the_stated_maximum() {
        let max = crate::varint::MAX;
        assert_eq!(
            crate::frame::DataFrame::header_len(max, max, Some(max)),
            MAX_DATA_HEADER_LEN
        );
    }

    #[test]
    fn a_frame_size_too_small_for_a_full_ack_is_refused() {
        let full_ack = crate::frame::Frame::Ack(crate::frame::AckFrame {
            cumulative: crate::varint::MAX - 1000,
            delay_micros: crate::varint::MAX,
            ranges: (0..crate::frame::MAX_ACK_RANGES as u64)
                .map(|i| crate::varint::MAX - 999 + 3 * i..crate::varint::MAX - 998 + 3 * i)
                .collect(),
        });
        assert!(full_ack.encoded_len() <= MIN_FRAME_SIZE);
        let mut c = Config::new(Transport::Stream);
        c.max_frame_size = MIN_FRAME_SIZE - 1;
        assert_eq!(
            c.validate(),
            Err(ConfigError::FrameTooSmall(MIN_FRAME_SIZE - 1))
        );
    }

    #[test]
    fn the_defaults_are_valid_for_both_transports() {
        assert_eq!(Config::new(Transport::Stream).validate(), Ok(()));
        assert_eq!(Config::new(Transport::Datagram).validate(), Ok(()));
    }

    #[test]
    fn a_zero_window_is_refused_by_name() {
        let mut c = Config::new(Transport::Stream);
        c.recv_window = 0;
        assert_eq!(c.validate(), Err(ConfigError::Zero("recv_window")));
    }

    #[test]
    fn over_datagrams_the_in_flight_limit_never_exceeds_the_peers_window() {
        let mut c = Config::new(Transport::Datagram);
        c.max_in_flight = 5000;
        assert_eq!(c.in_flight_limit(100), 100);
        assert_eq!(
            c.in_flight_limit(0),
            1,
            "a zero window still lets one through"
        );
    }

    #[test]
    fn over_a_stream_the_in_flight_limit_is_the_senders_own() {
        let mut c = Config::new(Transport::Stream);
        c.max_in_flight = 5000;
        assert_eq!(c.in_flight_limit(100), 5000);
    }
}
