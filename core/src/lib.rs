//! # steadfast-core
//!
//! The sans-IO heart of steadfast: state machines that keep messages flowing exactly once, in order,
//! across lossy, duplicating and reordering transports, driven entirely by their inputs. No socket, no
//! clock, no randomness, no threads: an adapter (tokio, smol, async-std) or the simulator feeds bytes
//! and time in and carries bytes and events out. See [`Channel`] for the driving contract.
//!
//! | module | concept |
//! |---|---|
//! | [`time`] | time as an input: [`time::Instant`], [`time::Duration`] |
//! | [`varint`], [`frame`], [`framing`] | the versioned wire format and how it rides streams and datagrams |
//! | [`ranges`] | the bounded, compacted set of sequence numbers behind de-duplication and acks |
//! | [`recv`] | de-duplication, reordering, the ack policy |
//! | [`send`] | the bounded send queue, the in-flight window, loss detection, retransmission |
//! | [`rtt`] | RTT estimation and the retransmission timeout (RFC 6298) |
//! | [`channel`] | [`Channel`]: the above, behind the driving contract |
//!
//! `no_std` with `alloc`; the `std` feature (on by default) adds only conveniences.
#![no_std]
#![forbid(unsafe_code)]
#![deny(missing_docs)]
#![deny(
    clippy::std_instead_of_core,
    clippy::std_instead_of_alloc,
    clippy::alloc_instead_of_core
)]

extern crate alloc;
#[cfg(feature = "std")]
extern crate std;

#[cfg(feature = "canary")]
pub mod canary;
pub mod channel;
pub mod client;
pub mod config;
#[cfg(feature = "driver")]
pub mod driver;
pub mod event;
pub mod frame;
pub mod framing;
pub mod identity;
pub mod liveness;
pub mod mode;
mod queue;
pub mod ranges;
pub mod reconnect;
pub mod recv;
pub mod rtt;
pub mod send;
pub mod server;
pub mod session;
pub mod stats;
pub mod store;
pub mod tiebreak;
pub mod time;
pub mod unreliable;
pub mod varint;

pub use channel::Channel;
pub use config::{Config, ConfigError, Delivery, Transport};
pub use event::{CloseReason, Event, Message, ProtocolError};
pub use mode::{Mode, Sent};
pub use send::SendError;
pub use stats::Stats;

/// A message's sequence number in one direction of a channel. Starts at 0 and counts up by one per
/// message; at varint's 2^62 it would take 146 years at a billion messages a second to run out, so it
/// never wraps over a session's life.
pub type Seq = u64;

/// Close code: the application closed normally.
pub const CLOSE_NORMAL: u64 = 0;
/// Close code: the peer's bytes did not decode.
pub const CLOSE_DECODE_ERROR: u64 = 1;
/// Close code: the peer broke the protocol's rules (e.g. acknowledged what was never sent).
pub const CLOSE_PROTOCOL_VIOLATION: u64 = 2;
/// Close code: a bounded queue overflowed under a close-the-session policy.
pub const CLOSE_OVERFLOW: u64 = 3;

#[cfg(feature = "std")]
impl From<frame::DecodeError> for std::io::Error {
    fn from(e: frame::DecodeError) -> Self {
        std::io::Error::new(std::io::ErrorKind::InvalidData, e)
    }
}
