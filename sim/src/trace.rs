//! The determinism self-check: a 64-bit FNV-1a fold over every event of a run.
//!
//! Hand-written rather than `std::hash` so the value is stable across Rust versions and platforms:
//! the same seed gives the same hash on every machine, today and after a toolchain upgrade.

const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const PRIME: u64 = 0x0000_0100_0000_01b3;

/// A running FNV-1a hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Trace(u64);

impl Default for Trace {
    fn default() -> Self {
        Trace(OFFSET)
    }
}

impl Trace {
    /// Folds one word in, byte by byte (little-endian).
    #[inline]
    pub fn word(&mut self, w: u64) {
        let mut h = self.0;
        for b in w.to_le_bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(PRIME);
        }
        self.0 = h;
    }

    /// Folds several words in.
    #[inline]
    pub fn words(&mut self, ws: &[u64]) {
        for &w in ws {
            self.word(w);
        }
    }

    /// The hash so far.
    pub fn value(&self) -> u64 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fold_is_fnv1a_over_little_endian_bytes() {
        // FNV-1a of the 8 bytes 01 00 00 00 00 00 00 00, computed by hand from the definition.
        let mut expect = OFFSET;
        for b in 1u64.to_le_bytes() {
            expect ^= u64::from(b);
            expect = expect.wrapping_mul(PRIME);
        }
        let mut t = Trace::default();
        t.word(1);
        assert_eq!(t.value(), expect);
        let mut u = Trace::default();
        u.word(2);
        assert_ne!(t.value(), u.value());
    }
}
