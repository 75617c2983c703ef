//! Smoke versions of the cargo-fuzz targets in `core/fuzz`: the same drivers and invariants
//! (`fuzz_support/`), fed by proptest instead of libFuzzer, for a few seconds in every `cargo test`.
//! The bytes proptest draws become structured input through `arbitrary`, as the fuzzer's do.
//!
//! Live heap bytes are counted process-wide, so the two tests take turns (one lock) while they
//! measure.

mod fuzz_support;

use std::alloc::System;
use std::cell::Cell;
use std::sync::Mutex;

use arbitrary::{Arbitrary, Unstructured};
use bytes::BytesMut;
use fuzz_support::frame_decode::{self, FrameInput};
use fuzz_support::session_inputs::{self, FrameSpec, SessionInput};
use proptest::prelude::*;
use proptest::test_runner::{Config as RunnerConfig, TestRunner};
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};
use steadfast_core::framing;

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn runner(cases: u32) -> TestRunner {
    TestRunner::new(RunnerConfig {
        cases,
        failure_persistence: None,
        ..RunnerConfig::default()
    })
}

/// Mostly well-formed frames, so that decoding gets past the first byte: frames drawn with
/// `arbitrary` as the session fuzzer draws them, encoded bare or as a stream, then possibly damaged.
/// (The fuzzer finds such structure by itself, from coverage.)
fn frame_input() -> impl Strategy<Value = FrameInput> {
    (
        (any::<u16>(), any::<bool>(), any::<bool>(), any::<bool>()),
        prop::collection::vec(any::<u8>(), 0..8),
        prop::collection::vec(any::<u8>(), 0..400),
        prop_oneof![
            2 => Just(Damage::None),
            1 => (any::<usize>(), 1..=255u8).prop_map(|(i, x)| Damage::Flip(i, x)),
            1 => any::<usize>().prop_map(Damage::Truncate),
            1 => prop::collection::vec(any::<u8>(), 1..16).prop_map(Damage::Append),
        ],
    )
        .prop_map(|((limit, preface, seal, stream), cuts, seed, damage)| {
            let specs =
                Vec::<FrameSpec>::arbitrary_take_rest(Unstructured::new(&seed)).unwrap_or_default();
            let mut bytes = BytesMut::new();
            for spec in &specs {
                let f = session_inputs::frame_of(spec, None);
                if stream {
                    framing::encode_stream_frame(&f, &mut bytes);
                } else {
                    f.encode(&mut bytes);
                    break;
                }
            }
            let mut bytes = bytes.to_vec();
            match damage {
                Damage::None => {}
                Damage::Flip(i, x) if !bytes.is_empty() => {
                    let n = bytes.len();
                    bytes[i % n] ^= x;
                }
                Damage::Truncate(i) if !bytes.is_empty() => bytes.truncate(i % bytes.len()),
                Damage::Append(tail) => bytes.extend_from_slice(&tail),
                _ => {}
            }
            // Mostly a limit the frames fit in, sometimes one they may not.
            let limit = if limit % 4 == 0 { limit % 512 } else { 4095 };
            FrameInput {
                limit,
                preface: preface || stream,
                seal,
                cuts,
                bytes,
            }
        })
}

#[derive(Debug, Clone)]
enum Damage {
    None,
    Flip(usize, u8),
    Truncate(usize),
    Append(Vec<u8>),
}

#[test]
fn arbitrary_bytes_decode_without_panic_and_every_decoded_frame_round_trips() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let frames = Cell::new(0);
    let errors = Cell::new(0);
    runner(4000)
        .run(&frame_input(), |input| {
            let out = frame_decode::check(&input).map_err(|v| TestCaseError::fail(v.0))?;
            frames.set(frames.get() + out.frames);
            errors.set(errors.get() + out.errors);
            Ok(())
        })
        .unwrap();
    // Random bytes must reach both outcomes, or the test checks nothing.
    let (frames, errors) = (frames.get(), errors.get());
    println!("{frames} frames decoded and round-tripped, {errors} decode errors");
    assert!(
        frames > 1000 && errors > 1000,
        "frames {frames}, errors {errors}"
    );
}

#[test]
fn arbitrary_session_inputs_keep_every_invariant_and_the_honest_client_is_served() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let (server, _) = session_inputs::configs(false);
    let connected = Cell::new(0);
    let round_trips = Cell::new(0);
    let delivered = Cell::new(0);
    let peak = Cell::new(0);
    runner(300)
        .run(&prop::collection::vec(any::<u8>(), 0..2000), |bytes| {
            let Ok(input) = SessionInput::arbitrary_take_rest(Unstructured::new(&bytes)) else {
                return Ok(());
            };
            let region = Region::new(GLOBAL);
            let live = || {
                let s = region.change();
                s.bytes_allocated as isize - s.bytes_deallocated as isize
            };
            let out =
                session_inputs::run(&input, Some(&live)).map_err(|v| TestCaseError::fail(v.0))?;
            connected.set(connected.get() + usize::from(out.connected));
            round_trips.set(round_trips.get() + usize::from(out.round_trip));
            delivered.set(delivered.get() + out.delivered);
            peak.set(peak.get().max(out.peak_live));
            Ok(())
        })
        .unwrap();
    let (connected, round_trips, delivered, peak) = (
        connected.get(),
        round_trips.get(),
        delivered.get(),
        peak.get(),
    );
    println!(
        "connected in {connected} cases, round trips in {round_trips}, {delivered} messages, \
         peak live {peak} bytes (bound {})",
        session_inputs::memory_bound(&server, 4096)
    );
    assert!(connected > 100 && round_trips > 50 && delivered > 100);
}

/// Found by the `session_inputs` fuzz target (45,452 executions in): a blackhole on a stream
/// connection, lifted, then a send. The harness delivered the bytes after the hole as if TCP could
/// skip lost bytes; modelled as TCP behaves (the holed connection stays dead), the client's idle
/// timeout moves it to a new connection and the final round trip completes.
#[test]
fn a_stream_connection_that_lost_bytes_in_a_blackhole_is_replaced_and_the_session_carries_on() {
    use fuzz_support::session_inputs::Step;
    let input = SessionInput {
        datagram: false,
        steps: vec![
            Step::Blackhole(true),
            Step::Reachable(true),
            Step::ClientSend(79),
        ],
    };
    let out = session_inputs::run(&input, None).unwrap_or_else(|v| panic!("{}", v.0));
    assert!(out.round_trip, "a message each way after the blackhole");
}
