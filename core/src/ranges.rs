//! A bounded set of sequence numbers kept as merged ranges.
//!
//! This is the sparse half of the receiver's de-duplication state (the `min_recv` algorithm of
//! seeds/003: a watermark below which everything arrived, plus the arrivals above it). Arrivals that
//! touch an existing range extend it; two ranges that meet are merged, so in-order traffic keeps the set
//! empty and reordering costs one range per gap. The capacity `N` is fixed at compile time: a set that
//! would need an `N+1`th range refuses the insert, and the caller drops that arrival unacknowledged
//! (the sender retransmits it later), so a hostile or broken peer cannot grow this state.
//!
//! The ranges live on the heap, allocated at the first gap and grown as gaps open up to `N`: every
//! session holds one of these, most never see a gap, and an idle session must stay small.

use alloc::boxed::Box;
use alloc::vec::Vec;
use core::fmt;
use core::ops::Range;

use crate::Seq;

/// What [`RangeSet::insert`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inserted {
    /// The value was not in the set and now is.
    New,
    /// The value was already in the set.
    Duplicate,
}

/// The insert would have needed more than `N` ranges; the set is unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Full;

/// A set of `u64` values stored as at most `N` sorted, disjoint, non-adjacent half-open ranges.
///
/// ```
/// use steadfast_core::ranges::{Inserted, RangeSet};
/// let mut set = RangeSet::<4>::new();
/// assert_eq!(set.insert(5), Ok(Inserted::New));
/// assert_eq!(set.insert(7), Ok(Inserted::New));
/// assert_eq!(set.insert(6), Ok(Inserted::New)); // fills the gap: one range again
/// assert_eq!(set.insert(6), Ok(Inserted::Duplicate));
/// assert_eq!(set.ranges(), &[5..8]);
/// ```
#[derive(Clone, Default)]
pub struct RangeSet<const N: usize> {
    /// At most `N` ranges; nothing until the first insert, then boxed: a set that never held a value
    /// takes 8 bytes, not 24.
    #[allow(clippy::box_collection)]
    ranges: Option<Box<Vec<Range<Seq>>>>,
}

impl<const N: usize> PartialEq for RangeSet<N> {
    fn eq(&self, other: &Self) -> bool {
        self.ranges() == other.ranges()
    }
}

impl<const N: usize> Eq for RangeSet<N> {}

impl<const N: usize> fmt::Debug for RangeSet<N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RangeSet")
            .field("ranges", &self.ranges())
            .finish()
    }
}

impl<const N: usize> RangeSet<N> {
    /// An empty set.
    pub const fn new() -> Self {
        RangeSet { ranges: None }
    }

    /// The ranges, ascending.
    pub fn ranges(&self) -> &[Range<Seq>] {
        self.ranges.as_deref().map_or(&[], Vec::as_slice)
    }

    /// Whether the set holds no value.
    pub fn is_empty(&self) -> bool {
        self.ranges().is_empty()
    }

    /// How many ranges the set holds (at most `N`).
    pub fn range_count(&self) -> usize {
        self.ranges().len()
    }

    /// How many values the set holds.
    pub fn value_count(&self) -> u64 {
        self.ranges().iter().map(|r| r.end - r.start).sum()
    }

    /// The smallest value in the set.
    pub fn min(&self) -> Option<Seq> {
        self.ranges().first().map(|r| r.start)
    }

    /// One past the largest value in the set.
    pub fn end(&self) -> Option<Seq> {
        self.ranges().last().map(|r| r.end)
    }

    /// Whether `value` is in the set.
    pub fn contains(&self, value: Seq) -> bool {
        self.find(value).is_ok()
    }

    /// Adds `value`, merging with neighbouring ranges.
    ///
    /// `u64::MAX` itself cannot be stored (ranges are half-open); sequence numbers stop at 2^62.
    pub fn insert(&mut self, value: Seq) -> Result<Inserted, Full> {
        let end = value.checked_add(1).ok_or(Full)?;
        let i = match self.find(value) {
            Ok(_) => return Ok(Inserted::Duplicate),
            Err(i) => i,
        };
        let ranges = self.ranges.get_or_insert_with(Box::default);
        // `i` is the first range starting after `value`; the one before it (if any) ends at or before it.
        let joins_prev = i > 0 && ranges[i - 1].end == value;
        let joins_next = i < ranges.len() && ranges[i].start == end;
        match (joins_prev, joins_next) {
            (true, true) => {
                let next_end = ranges.remove(i).end;
                ranges[i - 1].end = next_end;
            }
            (true, false) => ranges[i - 1].end = end,
            (false, true) => ranges[i].start = value,
            (false, false) => {
                if ranges.len() >= N {
                    return Err(Full);
                }
                if ranges.len() == ranges.capacity() {
                    // Grow by doubling, never past `N`.
                    let want = (2 * ranges.len()).max(4).min(N);
                    ranges.reserve_exact(want - ranges.len());
                }
                ranges.insert(i, value..end);
            }
        }
        Ok(Inserted::New)
    }

    /// Removes the first range if it starts exactly at `value` and returns its end.
    ///
    /// This is the compaction step: when the watermark reaches the first stored range, the watermark
    /// jumps to that range's end and the range is forgotten.
    pub fn pop_if_starts_at(&mut self, value: Seq) -> Option<Seq> {
        let ranges = self.ranges.as_mut()?;
        if ranges.first()?.start == value {
            Some(ranges.remove(0).end)
        } else {
            None
        }
    }

    /// `Ok(i)` if range `i` holds `value`, else `Err(i)` with `i` the index of the first range after it.
    fn find(&self, value: Seq) -> Result<usize, usize> {
        let ranges = self.ranges();
        let i = ranges.partition_point(|r| r.end <= value);
        match ranges.get(i) {
            Some(r) if r.start <= value => Ok(i),
            _ => Err(i),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs<const N: usize>(s: &RangeSet<N>) -> alloc::vec::Vec<(Seq, Seq)> {
        s.ranges().iter().map(|r| (r.start, r.end)).collect()
    }

    #[test]
    fn in_order_values_grow_a_single_range() {
        let mut s = RangeSet::<2>::new();
        for v in 10..20 {
            assert_eq!(s.insert(v), Ok(Inserted::New));
        }
        assert_eq!(pairs(&s), [(10, 20)]);
    }

    #[test]
    fn a_value_filling_a_gap_merges_the_ranges_on_both_sides() {
        let mut s = RangeSet::<4>::new();
        s.insert(1).unwrap();
        s.insert(3).unwrap();
        assert_eq!(s.range_count(), 2);
        s.insert(2).unwrap();
        assert_eq!(pairs(&s), [(1, 4)]);
    }

    #[test]
    fn a_value_already_held_is_reported_as_a_duplicate() {
        let mut s = RangeSet::<4>::new();
        s.insert(7).unwrap();
        assert_eq!(s.insert(7), Ok(Inserted::Duplicate));
        assert_eq!(s.value_count(), 1);
    }

    #[test]
    fn a_full_set_refuses_a_new_range_but_still_extends_existing_ones() {
        let mut s = RangeSet::<2>::new();
        s.insert(1).unwrap();
        s.insert(5).unwrap();
        assert_eq!(s.insert(9), Err(Full));
        assert_eq!(s.ranges(), &[1..2, 5..6]);
        assert_eq!(s.insert(6), Ok(Inserted::New));
        assert_eq!(s.insert(0), Ok(Inserted::New));
        assert_eq!(s.ranges(), &[0..2, 5..7]);
    }

    #[test]
    fn compaction_pops_only_a_range_starting_at_the_watermark() {
        let mut s = RangeSet::<4>::new();
        s.insert(4).unwrap();
        s.insert(5).unwrap();
        s.insert(9).unwrap();
        assert_eq!(s.pop_if_starts_at(3), None);
        assert_eq!(s.pop_if_starts_at(4), Some(6));
        assert_eq!(pairs(&s), [(9, 10)]);
    }

    #[test]
    fn an_empty_set_holds_no_memory_and_a_full_one_no_more_than_its_capacity() {
        let mut s = RangeSet::<6>::new();
        assert!(s.ranges.is_none());
        assert_eq!(size_of::<RangeSet<6>>(), 8);
        for v in 0..6 {
            s.insert(2 * v).unwrap();
        }
        assert_eq!(s.insert(20), Err(Full));
        assert_eq!(s.ranges.as_ref().map(|r| r.capacity()), Some(6));
    }

    #[test]
    fn the_largest_value_cannot_be_stored_and_is_refused() {
        let mut s = RangeSet::<4>::new();
        assert_eq!(s.insert(u64::MAX), Err(Full));
    }
}
