//! Arbitrary bytes through the bare, datagram and stream decoders; see
//! `core/tests/fuzz_support/frame_decode.rs` for the invariants.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../tests/fuzz_support/mod.rs"]
mod fuzz_support;

use fuzz_support::frame_decode::{FrameInput, check};

fuzz_target!(|input: FrameInput| {
    if let Err(v) = check(&input) {
        panic!("{v}");
    }
});
