//! Deliberate bugs, for proving that the simulator's checker catches broken endpoints.
//!
//! Compiled only with the `canary` feature, which nothing but the simulator enables: a production
//! build cannot contain them. Each breaks one guarantee of the contract inside the core itself, the
//! way a real bug would, so a checker that stays green with one enabled is not checking anything.

/// One deliberate bug.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Canary {
    /// The receiver delivers duplicates instead of discarding them.
    SkipDedup,
    /// On resume, messages sent on the old connection but never acknowledged are not resent.
    SkipResumeRetransmit,
    /// Ordered messages are delivered on arrival, like unordered ones.
    DeliverOutOfOrder,
}
