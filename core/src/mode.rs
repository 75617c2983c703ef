//! Delivery modes: what a message is promised, chosen per message (by convention, one per stream).
//!
//! | mode | guarantee | while disconnected |
//! |---|---|---|
//! | [`Mode::Ordered`] | exactly once, in order (at-least-once retransmission plus de-duplication) | queued, resent on resume |
//! | [`Mode::Unordered`] | exactly once, delivered on arrival: no head-of-line blocking | queued, resent on resume |
//! | [`Mode::Conflated`] | exactly once for each value sent; an unsent value is replaced by a newer one with the same key, in place | only the newest value per key is kept |
//! | [`Mode::Sequenced`] | at most once; never an older message after a newer one on its stream | only the newest per stream is kept |
//! | [`Mode::Unreliable`] | at most once, any order | dropped |

/// How one message is delivered; see the module table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Mode {
    /// Reliable, in sequence order.
    Ordered,
    /// Reliable, in arrival order.
    Unordered,
    /// Reliable, newest unsent value per `key` (per stream) kept.
    Conflated {
        /// What values replace each other: the same key on the same stream.
        key: u64,
    },
    /// At most once, newest wins per stream.
    Sequenced,
    /// At most once.
    Unreliable,
}

impl Mode {
    /// Whether the message is acknowledged and retransmitted until it arrives.
    pub fn is_reliable(self) -> bool {
        matches!(
            self,
            Mode::Ordered | Mode::Unordered | Mode::Conflated { .. }
        )
    }
}

/// What became of a message handed to `send`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Sent {
    /// Queued reliably under this sequence number; [`crate::Event::Acknowledged`] will cover it.
    Reliable(crate::Seq),
    /// A conflated value that replaced the unsent value of its key, under that value's sequence number.
    Replaced(crate::Seq),
    /// Queued for at-most-once delivery; no acknowledgement will follow.
    Unreliable,
}

impl Sent {
    /// The sequence number of a reliable message.
    pub fn seq(self) -> Option<crate::Seq> {
        match self {
            Sent::Reliable(s) | Sent::Replaced(s) => Some(s),
            Sent::Unreliable => None,
        }
    }
}
