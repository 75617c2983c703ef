//! The event queues' two hot operations, kept apart so every queue on the data path does them the
//! same way.

use alloc::collections::VecDeque;

/// Appends `value` to `q`. Inlined, a value is built where it is stored. The growth is a call
/// apart because a value that might have to wait out a call is first built on the stack, field
/// by field, then copied into the queue whole: a stalled load on every message.
#[inline(always)]
pub(crate) fn push_back<T>(q: &mut VecDeque<T>, value: T) {
    if q.len() < q.capacity() {
        q.push_back(value);
    } else {
        grow_and_push(q, value);
    }
}

#[cold]
#[inline(never)]
fn grow_and_push<T>(q: &mut VecDeque<T>, value: T) {
    q.push_back(value);
}

/// Moves everything in `from` to the back of `into`, in order: the two queues traded rather than
/// copied when `into` is empty (the usual case, the application keeping up).
pub(crate) fn move_all<T>(from: &mut VecDeque<T>, into: &mut VecDeque<T>) {
    if into.is_empty() {
        core::mem::swap(into, from);
    } else {
        into.append(from);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_push_past_capacity_grows_the_queue_and_keeps_the_order() {
        let mut q = VecDeque::with_capacity(1);
        for i in 0..100 {
            push_back(&mut q, i);
        }
        assert!(q.iter().copied().eq(0..100));
    }

    #[test]
    fn moving_all_keeps_the_order_whether_or_not_the_destination_is_empty() {
        let mut from: VecDeque<u32> = (0..3).collect();
        let mut into = VecDeque::new();
        move_all(&mut from, &mut into);
        assert!(from.is_empty());
        let mut more: VecDeque<u32> = (3..5).collect();
        move_all(&mut more, &mut into);
        assert!(into.iter().copied().eq(0..5));
    }
}
