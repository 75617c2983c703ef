//! The fuzz drivers, shared by the cargo-fuzz targets in `core/fuzz` (which include this directory
//! with `#[path]`) and the proptest smoke runs in `tests/fuzz_smoke.rs`: one copy of the inputs and
//! the invariants, so the smoke runs check exactly what the fuzzer checks.
//!
//! Why `#[path]` and not a feature-gated module in the library: the drivers need `arbitrary` and
//! `rand_chacha`, which the library must not depend on, and they are test code, not API.
#![allow(dead_code)] // each including crate uses a different part

pub mod frame_decode;
pub mod session_inputs;

use std::fmt::Debug;

/// A broken invariant: what, and where in the input.
#[derive(Debug)]
pub struct Violation(pub String);

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Fails with a message when `cond` does not hold.
pub fn ensure(cond: bool, what: impl FnOnce() -> String) -> Result<(), Violation> {
    if cond { Ok(()) } else { Err(Violation(what())) }
}

/// Fails when `a != b`.
pub fn ensure_eq<T: PartialEq + Debug>(a: &T, b: &T, what: &str) -> Result<(), Violation> {
    ensure(a == b, || format!("{what}: {a:?} != {b:?}"))
}
