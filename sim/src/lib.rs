//! # steadfast-sim
//!
//! The deterministic simulator: drives the [`steadfast_core`] state machines directly in virtual time,
//! injecting drops, duplicates, reorders and partitions, and checks the delivery contract. Every run is
//! a pure function of its seed.
//!
//! Not built yet: this crate is a compiling placeholder so the workspace has its final shape.
#![forbid(unsafe_code)]

pub use steadfast_core as core;
