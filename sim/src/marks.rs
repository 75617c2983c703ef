//! Coverage marks: which fault and recovery paths a run actually exercised, counted from the core's
//! counters and events.

use std::collections::BTreeMap;
use std::fmt;

/// The marks every summary lists, reached or not, so a path never exercised shows as a zero.
pub const KEY_MARKS: [&str; 31] = [
    "resume",
    "resent_on_resume",
    "idle_timeout",
    "supersede",
    "stall",
    "session_lost",
    "dedup_hit",
    "handback",
    "conflated_replace",
    "request_timeout",
    "connect_failed",
    "backpressure",
    "server_restart",
    "retention_expired",
    "pause",
    "blackhole",
    "retransmitted",
    "one_way_partition",
    "swizzle_clog",
    "datagram_binding",
    "packet_lost",
    "packet_burst_lost",
    "packet_dup",
    "packet_truncated",
    "packet_reordered",
    "malformed_datagram",
    "client_crash",
    "client_restart_kept_store",
    "client_restart_wiped_store",
    "redelivered",
    "recovered_resume",
];

/// Named counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Marks(BTreeMap<&'static str, u64>);

impl Marks {
    /// Adds `n` to mark `name`.
    pub fn add(&mut self, name: &'static str, n: u64) {
        if n > 0 {
            *self.0.entry(name).or_insert(0) += n;
        }
    }

    /// The count of `name`.
    pub fn get(&self, name: &str) -> u64 {
        self.0.get(name).copied().unwrap_or(0)
    }

    /// Adds every count of `other`.
    pub fn merge(&mut self, other: &Marks) {
        for (k, v) in &other.0 {
            self.add(k, *v);
        }
    }

    /// Every mark with its count.
    pub fn iter(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        self.0.iter().map(|(k, v)| (*k, *v))
    }

    /// How many of [`KEY_MARKS`] were reached.
    pub fn key_marks_reached(&self) -> usize {
        KEY_MARKS.iter().filter(|m| self.get(m) > 0).count()
    }
}

impl fmt::Display for Marks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for k in KEY_MARKS {
            if !first {
                write!(f, " ")?;
            }
            first = false;
            write!(f, "{k}={}", self.get(k))?;
        }
        for (k, v) in &self.0 {
            if !KEY_MARKS.contains(k) {
                write!(f, " {k}={v}")?;
            }
        }
        Ok(())
    }
}
