//! The primitives behind the shared state: `std`'s normally, loom's under `--cfg loom` so the models
//! in `shared`, `direct` and `inbox` explore every interleaving of the real code.

#[cfg(not(loom))]
pub(crate) use alloc::sync::Arc;
#[cfg(loom)]
pub(crate) use loom::sync::{Arc, Mutex, MutexGuard};
#[cfg(not(loom))]
pub(crate) use std::sync::{Mutex, MutexGuard};

/// Locks `m`, ignoring poisoning: the core's calls do not panic on any input, so a panic on an
/// application thread cannot have left the state half-changed, and the driver must keep running.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
