//! # steadfast-async-std
//!
//! The async-std adapter for steadfast: real sockets, timers and tasks driving the sans-IO state machines of
//! [`steadfast_core`]. It holds only I/O glue; the protocol lives in the core.
//!
//! Not built yet: this crate is a compiling placeholder so the workspace has its final shape.
#![forbid(unsafe_code)]

pub use steadfast_core as core;
