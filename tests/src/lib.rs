//! # steadfast-tests
//!
//! Cross-crate integration tests: real loopback sockets, every runtime, injected faults. The tests
//! live in `tests/tests/`; this library holds what they share.
#![forbid(unsafe_code)]
