//! Arbitrary sequences of session inputs to a server, an honest client and hostile connections;
//! see `core/tests/fuzz_support/session_inputs.rs` for the invariants. Live heap bytes are
//! counted, so the memory bound is checked after every step.
#![no_main]

use std::alloc::System;

use libfuzzer_sys::fuzz_target;
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};

#[path = "../../tests/fuzz_support/mod.rs"]
mod fuzz_support;

use fuzz_support::session_inputs::{SessionInput, run};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

fuzz_target!(|input: SessionInput| {
    let region = Region::new(GLOBAL);
    let live = || {
        let s = region.change();
        s.bytes_allocated as isize - s.bytes_deallocated as isize
    };
    if let Err(v) = run(&input, Some(&live)) {
        panic!("{v}");
    }
});
