//! Memory per idle session on the server, and the de-duplication state at its worst (issue 7, part 3).
//!
//! ```sh
//! cargo run --release -p steadfast-core --example memory            # 100,000 sessions
//! cargo run --release -p steadfast-core --example memory -- 10000    # fewer
//! ```
//!
//! A counting global allocator (`stats_alloc`) measures the heap bytes that stay allocated. The
//! [`Server`] is driven directly, with in-memory handshakes and no sockets: each connection sends
//! the stream preface and a hello, and the server's welcome is read and thrown away. Figures:
//!
//! 1. a connected session right after its handshake;
//! 2. the same after one 64-byte message each way, each acknowledged (queues that grew keep their
//!    room while the session is busy);
//! 3. the same after a heartbeat interval of silence, when each connection's heartbeat goes out
//!    and its channel lets go of that room: what a session that has done something costs idle;
//! 4. the session alone once its connection is gone (retained for its client to resume; a
//!    detached channel lets go of its queues' room too).
//!
//! Only the core's state is counted: the adapter's socket, its read and write buffers and the
//! task of each connection come on top. The bytes are what was asked of the allocator; the
//! allocator adds its own few bytes per allocation (glibc: 8–16), hence the allocation counts.
//!
//! Then a [`Receiver`] with the default window (1024) gets the worst reordering it can hold: the
//! de-dup set at its capacity of ranges and the reorder buffer at the full window.

use std::alloc::System;

use bytes::{Bytes, BytesMut};
use rand::SeedableRng;
use stats_alloc::{INSTRUMENTED_SYSTEM, StatsAlloc};
use steadfast_core::config::RECV_RANGES;
use steadfast_core::frame::{AckFrame, DataFrame, Frame, HelloFrame};
use steadfast_core::framing;
use steadfast_core::identity::SessionId;
use steadfast_core::recv::Receiver;
use steadfast_core::server::{Server, ServerConfig, ServerEvent};
use steadfast_core::session::SessionEvent;
use steadfast_core::time::Instant;
use steadfast_core::{Channel, Config, Mode, Transport};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// Heap bytes and allocations live now, as the counting allocator sees them.
fn live() -> (i64, i64) {
    let s = INSTRUMENTED_SYSTEM.stats();
    (
        s.bytes_allocated as i64 - s.bytes_deallocated as i64,
        s.allocations as i64 - s.deallocations as i64,
    )
}

/// Drains what the server wants to write (thrown away: nobody reads it) and its events, noting
/// each new session's id.
fn drain(server: &mut Server, now: Instant, out: &mut BytesMut, ids: &mut Vec<SessionId>) {
    while server.poll_transmit(now, out).is_some() {
        out.clear();
    }
    while let Some(event) = server.poll_event() {
        if let ServerEvent::Session {
            session,
            event: SessionEvent::Connected { .. },
        } = event
        {
            ids.push(session);
        }
    }
}

fn stream_bytes(frames: &[Frame], preface: bool) -> Bytes {
    let mut wire = BytesMut::new();
    if preface {
        framing::encode_preface(&mut wire);
    }
    for f in frames {
        framing::encode_stream_frame(f, &mut wire);
    }
    wire.freeze()
}

fn report(what: &str, before: (i64, i64), after: (i64, i64), n: u64) {
    let bytes = (after.0 - before.0) as f64 / n as f64;
    let allocs = (after.1 - before.1) as f64 / n as f64;
    println!("  {what:<52} {bytes:>8.0} B/session  {allocs:>5.1} allocations/session");
}

fn main() {
    let n: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(100_000);
    let now = Instant::ZERO;
    let mut config = ServerConfig::new(Config::new(Transport::Stream));
    config.max_sessions = config.max_sessions.max(n as usize);
    let entropy = Box::new(rand_chacha::ChaCha8Rng::seed_from_u64(7));
    let mut server = Server::new(config, now, entropy).expect("valid config");
    let mut out = BytesMut::with_capacity(64 << 10);
    // Room for every id made before counting starts: the example's own bookkeeping is not the
    // server's memory.
    let mut ids = Vec::with_capacity(n as usize);
    // Warm the server's own reusable buffers so that they are not charged to the sessions.
    drain(&mut server, now, &mut out, &mut ids);

    println!(
        "steadfast-core memory, {n} sessions on one Server (default ServerConfig, stream transport)"
    );
    println!(
        "  size_of: Channel {} B (Sender {} B, Receiver {} B; its Config of {} B is shared by a server's \
         sessions), Frame {} B, StreamDecoder {} B, Liveness {} B; the de-dup set of up to {} ranges is on the heap, \
         from the first gap",
        size_of::<Channel>(),
        size_of::<steadfast_core::send::Sender>(),
        size_of::<Receiver>(),
        size_of::<Config>(),
        size_of::<Frame>(),
        size_of::<framing::StreamDecoder>(),
        size_of::<steadfast_core::liveness::Liveness>(),
        RECV_RANGES,
    );
    let start = live();
    for conn in 0..n {
        let hello = Frame::Hello(HelloFrame {
            nonce: conn,
            recv_window: 1024,
            resume: None,
            credentials: Bytes::new(),
        });
        server.on_connection(now, conn);
        server.handle_input(now, conn, stream_bytes(&[hello], true));
        drain(&mut server, now, &mut out, &mut ids);
    }
    let handshaken = live();
    assert_eq!(
        server.session_count() as u64,
        n,
        "every hello made a session"
    );
    assert_eq!(ids.len() as u64, n);
    report("connected, idle after the handshake", start, handshaken, n);

    let payload = Bytes::from(vec![7u8; 64]);
    for conn in 0..n {
        let id = ids[conn as usize];
        let data = Frame::Data(DataFrame {
            stream: 0,
            seq: 0,
            ack: None,
            unordered: false,
            payload: payload.clone(),
        });
        server.handle_input(now, conn, stream_bytes(&[data], false));
        server
            .send(id, 0, Mode::Ordered, payload.clone())
            .expect("room for one");
        drain(&mut server, now, &mut out, &mut ids);
        let ack = Frame::Ack(AckFrame {
            cumulative: 1,
            delay_micros: 0,
            ranges: Default::default(),
        });
        server.handle_input(now, conn, stream_bytes(&[ack], false));
        drain(&mut server, now, &mut out, &mut ids);
    }
    let exchanged = live();
    for id in &ids {
        let ch = server.channel(*id).expect("session");
        assert_eq!(
            ch.sender().queued_messages(),
            0,
            "the server's message was released"
        );
        assert_eq!(ch.receiver().watermark(), 1, "the client's message arrived");
    }
    report(
        "connected, idle after one message each way",
        start,
        exchanged,
        n,
    );

    // A heartbeat interval of silence: each connection's heartbeat goes out, and with it the
    // channel lets go of the room its queues grew.
    let now = now + steadfast_core::liveness::LivenessConfig::default().heartbeat_interval;
    server.handle_timeout(now);
    drain(&mut server, now, &mut out, &mut ids);
    let quiet = live();
    report(
        "  the same after a heartbeat interval of silence",
        start,
        quiet,
        n,
    );

    for conn in 0..n {
        server.on_disconnected(now, conn);
    }
    drain(&mut server, now, &mut out, &mut ids);
    let detached = live();
    assert_eq!(server.session_count() as u64, n, "sessions are retained");
    assert_eq!(server.connection_count(), 0);
    report("disconnected, retained for resumption", start, detached, n);
    drop(server);

    println!("\nde-duplication state under worst-case reordering (default recv_window 1024)");
    let config = Config::new(Transport::Stream);
    let before = live();
    let mut r = Receiver::new(&config);
    let fresh = live();
    // Every other sequence number missing from 2: RECV_RANGES - 1 ranges, then the last slot of
    // the window for the last range, so both the set and the reorder buffer are at their bounds.
    let mut deliver = |_: u64, _: u64, _: Bytes| panic!("nothing is deliverable: 0 is missing");
    for i in 1..RECV_RANGES as u64 {
        r.on_data(now, 0, 2 * i, false, Bytes::new(), &mut deliver);
    }
    r.on_data(
        now,
        0,
        config.recv_window - 1,
        false,
        Bytes::new(),
        &mut deliver,
    );
    let full = live();
    let refused = r.on_data(now, 0, 500, false, Bytes::new(), &mut deliver);
    println!(
        "  ranges {} (capacity {RECV_RANGES}), reorder slots {} (window {}); one more gap: {refused:?}",
        r.ranges().len(),
        r.reorder_slots(),
        config.recv_window
    );
    println!(
        "  inline {} B + heap {} B ({} B fresh) = {} B, payload bytes not counted (bounded by max_reorder_bytes = {} B)",
        size_of::<Receiver>(),
        full.0 - before.0,
        fresh.0 - before.0,
        size_of::<Receiver>() as i64 + full.0 - before.0,
        config.max_reorder_bytes
    );
}
