//! What a channel tells its owner.

use alloc::vec::Vec;
use core::fmt;

use bytes::Bytes;

use crate::Seq;
use crate::frame::DecodeError;
use crate::send::AckOfUnsent;

/// One message, as delivered or handed back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// The stream it travelled on.
    pub stream: u64,
    /// Its sequence number in its direction of the channel.
    pub seq: Seq,
    /// Its payload.
    pub payload: Bytes,
}

/// Something the application must hear about, drained with [`crate::Channel::poll_event`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// A message from the peer, delivered exactly once (and in order, under ordered delivery).
    Received(Message),
    /// An at-most-once message from the peer (see [`crate::Mode::Sequenced`] and
    /// [`crate::Mode::Unreliable`]).
    ReceivedUnreliable {
        /// Its stream.
        stream: u64,
        /// Its payload.
        payload: Bytes,
    },
    /// The peer has received every message this side sent with a sequence number below `below`.
    /// One event covers many messages; a queue that was full has room again.
    Acknowledged {
        /// The new cumulative acknowledgement point.
        below: Seq,
    },
    /// The channel ended. This is the last event.
    Closed {
        /// Why.
        reason: CloseReason,
        /// The messages sent but never acknowledged, oldest first: their delivery is unknown.
        unacknowledged: Vec<Message>,
    },
}

/// Why a channel ended.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum CloseReason {
    /// This side called [`crate::Channel::close`].
    Local {
        /// The application's code.
        code: u64,
    },
    /// The peer closed.
    Peer {
        /// The peer's code.
        code: u64,
        /// The peer's reason text (bounded by the decoder's limits).
        reason: Bytes,
    },
    /// The peer broke the protocol; a close frame saying so was sent.
    Violation(ProtocolError),
}

/// How the peer broke the protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ProtocolError {
    /// Its bytes did not decode.
    Decode(DecodeError),
    /// It acknowledged a message that was never sent.
    AckOfUnsent(AckOfUnsent),
}

impl ProtocolError {
    /// The close code sent to the peer.
    pub fn code(&self) -> u64 {
        match self {
            ProtocolError::Decode(_) => crate::CLOSE_DECODE_ERROR,
            ProtocolError::AckOfUnsent(_) => crate::CLOSE_PROTOCOL_VIOLATION,
        }
    }
}

impl fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProtocolError::Decode(e) => write!(f, "undecodable input: {e}"),
            ProtocolError::AckOfUnsent(a) => write!(
                f,
                "peer acknowledged up to {} but only {} were sent",
                a.acked_end, a.sent_end
            ),
        }
    }
}

impl core::error::Error for ProtocolError {}

impl From<DecodeError> for ProtocolError {
    fn from(e: DecodeError) -> Self {
        ProtocolError::Decode(e)
    }
}
