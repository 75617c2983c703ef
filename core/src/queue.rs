//! The queues on the data path: a ring whose push builds the value in its slot, and the moves
//! between the session layer's queues.
//!
//! Why a ring of our own: a value pushed onto a `VecDeque` that might grow is built on the stack
//! first (it has to survive the growth call), field by field, then copied into its slot whole, and
//! that copy waits for the stores it reads (a failed store forward) on every message. Here the
//! growth is checked before the value is made, and the value is stored straight into its slot.

use alloc::collections::VecDeque;
use alloc::vec::Vec;

/// A first-in, first-out queue of `T`.
#[derive(Debug)]
pub(crate) struct Ring<T> {
    /// `len` values from `head` on, wrapping around; `None` elsewhere.
    slots: Vec<Option<T>>,
    head: usize,
    len: usize,
}

impl<T> Default for Ring<T> {
    fn default() -> Self {
        Ring {
            slots: Vec::new(),
            head: 0,
            len: 0,
        }
    }
}

impl<T> Ring<T> {
    /// Appends what `make` makes, made where it is stored.
    #[inline(always)]
    pub(crate) fn push_back_with(&mut self, make: impl FnOnce() -> T) {
        if self.len == self.slots.len() {
            self.grow();
        }
        let mut i = self.head + self.len;
        if i >= self.slots.len() {
            i -= self.slots.len();
        }
        if let Some(slot) = self.slots.get_mut(i) {
            // The slot is empty: what `replace` hands back is `None`, dropped after the store.
            let _ = slot.replace(make());
            self.len += 1;
        }
    }

    /// Takes the oldest value.
    #[inline]
    pub(crate) fn pop_front(&mut self) -> Option<T> {
        if self.len == 0 {
            return None;
        }
        let value = self.slots.get_mut(self.head)?.take();
        self.head += 1;
        if self.head == self.slots.len() {
            self.head = 0;
        }
        self.len -= 1;
        value
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Room for more before the ring grows.
    #[cfg(test)]
    pub(crate) fn room(&self) -> usize {
        self.slots.len() - self.len
    }

    /// Lets go of the spare room.
    pub(crate) fn shrink_to_fit(&mut self) {
        self.resize(self.len);
    }

    #[cold]
    #[inline(never)]
    fn grow(&mut self) {
        self.resize((2 * self.slots.len()).max(4));
    }

    /// The same values in order, in `cap` slots from the first.
    fn resize(&mut self, cap: usize) {
        let mut slots = Vec::with_capacity(cap);
        let (back, front) = self.slots.split_at_mut(self.head);
        slots.extend(
            front
                .iter_mut()
                .chain(back)
                .map(Option::take)
                .filter(Option::is_some),
        );
        slots.resize_with(cap, || None);
        self.slots = slots;
        self.head = 0;
    }
}

/// Moves everything in `from` to the back of `into`, in order, copying whichever queue is shorter:
/// when `into` holds fewer, they go to the front of `from` and the two queues trade (with `into`
/// empty, the usual case, nothing is copied at all).
pub(crate) fn move_all<T>(from: &mut VecDeque<T>, into: &mut VecDeque<T>) {
    if into.len() < from.len() {
        while let Some(value) = into.pop_back() {
            from.push_front(value);
        }
        core::mem::swap(into, from);
    } else {
        into.append(from);
    }
}

/// Moves up to `max` values from the front of `from` to the back of `into`; returns how many.
pub(crate) fn drain_front<T>(from: &mut VecDeque<T>, into: &mut Vec<T>, max: usize) -> usize {
    let n = max.min(from.len());
    into.extend(from.drain(..n));
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ring_keeps_the_order_across_wraps_and_growth() {
        let mut ring = Ring::default();
        let mut want = VecDeque::new();
        let mut next = 0u32;
        // Pushes and pops in uneven runs, so the values wrap around and the ring grows mid-wrap.
        for round in 0..50u32 {
            for _ in 0..(round % 7) + 1 {
                ring.push_back_with(|| next);
                want.push_back(next);
                next += 1;
            }
            for _ in 0..(round % 5) {
                assert_eq!(ring.pop_front(), want.pop_front());
            }
        }
        while let Some(v) = want.pop_front() {
            assert_eq!(ring.pop_front(), Some(v));
        }
        assert_eq!(ring.pop_front(), None);
        assert!(ring.is_empty());
    }

    #[test]
    fn shrinking_a_ring_keeps_its_values_and_leaves_no_room() {
        let mut ring = Ring::default();
        for i in 0..20 {
            ring.push_back_with(|| i);
        }
        for i in 0..15 {
            assert_eq!(ring.pop_front(), Some(i));
        }
        ring.shrink_to_fit();
        assert_eq!(ring.room(), 0);
        ring.push_back_with(|| 20);
        assert!((15..=20).all(|i| ring.pop_front() == Some(i)));
    }

    #[test]
    fn moving_all_keeps_the_order_whichever_queue_is_shorter() {
        let mut from: VecDeque<u32> = (0..3).collect();
        let mut into = VecDeque::new();
        move_all(&mut from, &mut into);
        assert!(from.is_empty());
        // Fewer to move than `into` holds: appended.
        let mut fewer: VecDeque<u32> = (3..5).collect();
        move_all(&mut fewer, &mut into);
        assert!(into.iter().copied().eq(0..5));
        assert!(fewer.is_empty());
        // More to move than `into` holds: `into`'s go to their front, and the queues trade.
        let mut more: VecDeque<u32> = (5..20).collect();
        move_all(&mut more, &mut into);
        assert!(into.iter().copied().eq(0..20));
        assert!(more.is_empty());
    }
}
