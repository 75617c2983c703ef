//! Criterion benches for the core, no I/O (issue 7, part 1).
//!
//! - `full_path/steadfast/{64,1024}`: per message, the whole reliable path between two [`Channel`]s
//!   wired back to back: `send` → encode (`poll_transmit`) → decode (`handle_input` on the peer) →
//!   de-dup → deliver (`poll_event`) → ack (the peer's `poll_transmit`, the sender's
//!   `handle_input`) → release (`Acknowledged`). 1024 messages per iteration, so batching and acks
//!   happen as they would on a busy connection.
//! - `full_path/length_delimited/{64,1024}`: tokio-util's `LengthDelimitedCodec` encoding the same
//!   1024 payloads and decoding them again, and nothing else: the floor a framing layer costs.
//! - `session_path/steadfast/{64,1024}`: the same, between a [`Client`] and a [`Server`] joined in
//!   memory: what an adapter's connection tasks run per message (the link's decoding and
//!   liveness, the session lookup, the server's event queue) on top of the channels.
//! - `dedup/*`: the receiver's de-duplication and reordering (`Receiver::on_data`) with in-order,
//!   swapped, worst-case (every other one missing, the de-dup set at its capacity) and duplicate
//!   arrivals, and `RangeSet` lookups in a full set.
//!
//! For instruction counts, `CORE_BENCH_BATCHES=<n>` skips criterion and runs `n` full-path batches
//! of each size (and as many codec batches), so `valgrind --tool=callgrind` sees a fixed amount of
//! work (`CORE_BENCH_SIZE=64` for one size; `CORE_BENCH_PATH=session` for the session path, `codec` for the codec's batches): `CORE_BENCH_BATCHES=200 valgrind --tool=callgrind target/release/deps/core-<hash> --bench`.
//!
//! Run: `cargo bench -p steadfast-core --bench core`. After criterion's own report, the bench prints
//! the ratio of steadfast's full-path throughput to `LengthDelimitedCodec`'s, from the medians
//! criterion saved (issue 7's goal: at least 0.8).

use std::hint::black_box;
use std::path::{Path, PathBuf};

use bytes::{Bytes, BytesMut};
use criterion::{BenchmarkId, Criterion, Throughput};
use steadfast_core::client::{Client, ClientConfig, Directive};
use steadfast_core::config::RECV_RANGES;
use steadfast_core::ranges::RangeSet;
use steadfast_core::recv::{Arrival, Receiver};
use steadfast_core::server::{Server, ServerConfig, ServerEvent};
use steadfast_core::session::SessionEvent;
use steadfast_core::time::{Duration, Instant};
use steadfast_core::{Channel, Config, Event, Mode, Transport};
use tokio_util::codec::{Decoder, Encoder, LengthDelimitedCodec};

/// Messages per iteration.
const BATCH: u64 = 1024;
/// Write-buffer room reserved before each `poll_transmit`: the default `max_batch_bytes` and one
/// frame more.
const BATCH_ROOM: usize = (64 << 10) + 2048;
/// Payload sizes of the full-path benches.
const SIZES: [usize; 2] = [64, 1024];

/// Two ends driven against each other, a batch of messages at a time.
trait Driven {
    fn new() -> Self;
    /// Sends `BATCH` copies of `payload` one way and drives both ends until every one is
    /// delivered and acknowledged.
    fn batch(&mut self, payload: &Bytes);
    /// Messages delivered so far.
    fn delivered(&self) -> u64;
}

/// Two ends joined in memory, the sender waiting for its acks.
trait Joined {
    /// Moves bytes both ways and takes both ends' events; whether any bytes moved.
    fn shuttle(&mut self) -> bool;
    /// Whether everything sent is acknowledged.
    fn settled(&self) -> bool;
    /// Moves the clock on to the delayed-ack timer and fires both ends' timers.
    fn jump_to_ack_timer(&mut self);
}

/// Past the default delayed-ack timer.
const ACK_TIMER: Duration = Duration::from_millis(6);

/// Drives `pair` until everything sent is acknowledged. The last few arrivals wait for the
/// delayed-ack timer: when nothing moved, the clock jumps to it.
fn settle(pair: &mut impl Joined) {
    loop {
        let moved = pair.shuttle();
        if pair.settled() {
            break;
        }
        if !moved {
            pair.jump_to_ack_timer();
        }
    }
}

/// Two channels wired back to back, the way an adapter drives each end, with clocks that advance
/// only when an ack timer has to fire.
struct Pair {
    a: Channel,
    b: Channel,
    now: Instant,
    buf: BytesMut,
    delivered: u64,
}

impl Driven for Pair {
    fn new() -> Self {
        let now = Instant::ZERO;
        Pair {
            a: Channel::new(Config::new(Transport::Stream), now).expect("default config"),
            b: Channel::new(Config::new(Transport::Stream), now).expect("default config"),
            now,
            buf: BytesMut::with_capacity(128 << 10),
            delivered: 0,
        }
    }

    fn delivered(&self) -> u64 {
        self.delivered
    }

    /// From `a` to `b`; acknowledged means released from `a`'s send queue.
    fn batch(&mut self, payload: &Bytes) {
        for _ in 0..BATCH {
            self.a.send(payload.clone()).expect("room for a batch");
        }
        settle(self);
    }
}

impl Joined for Pair {
    fn shuttle(&mut self) -> bool {
        let mut moved = false;
        // Room for a whole batch before writing, as an adapter's write buffer would have: a batch
        // that outgrows the buffer midway is copied to a new one.
        self.buf.reserve(BATCH_ROOM);
        while let Some(n) = self.a.poll_transmit(self.now, &mut self.buf) {
            self.b.handle_input(self.now, self.buf.split_to(n).freeze());
            moved = true;
        }
        while let Some(event) = self.b.poll_event() {
            if let Event::Received(m) = event {
                black_box(&m.payload);
                self.delivered += 1;
            }
        }
        self.buf.reserve(BATCH_ROOM);
        while let Some(n) = self.b.poll_transmit(self.now, &mut self.buf) {
            self.a.handle_input(self.now, self.buf.split_to(n).freeze());
            moved = true;
        }
        while let Some(event) = self.a.poll_event() {
            black_box(event);
        }
        moved
    }

    fn settled(&self) -> bool {
        self.a.sender().queued_messages() == 0
    }

    fn jump_to_ack_timer(&mut self) {
        self.now = self.now + ACK_TIMER;
        self.a.handle_timeout(self.now);
        self.b.handle_timeout(self.now);
    }
}

/// The baseline: tokio-util's `LengthDelimitedCodec` encoding a batch and decoding it again.
struct Codec {
    codec: LengthDelimitedCodec,
    wire: BytesMut,
    delivered: u64,
}

impl Driven for Codec {
    fn new() -> Self {
        Codec {
            codec: LengthDelimitedCodec::new(),
            wire: BytesMut::with_capacity(128 << 10),
            delivered: 0,
        }
    }

    fn delivered(&self) -> u64 {
        self.delivered
    }

    fn batch(&mut self, payload: &Bytes) {
        for _ in 0..BATCH {
            self.codec
                .encode(payload.clone(), &mut self.wire)
                .expect("encodes");
        }
        let mut n = 0;
        while let Some(frame) = self.codec.decode(&mut self.wire).expect("decodes") {
            black_box(&frame);
            n += 1;
        }
        assert_eq!(n, BATCH);
        self.delivered += n;
    }
}

/// A client and a server joined in memory, one connection, driven the way the adapters drive
/// them; the clock moves only when an ack timer has to fire.
struct SessionPair {
    client: Client,
    server: Server,
    now: Instant,
    buf: BytesMut,
    delivered: u64,
}

impl Driven for SessionPair {
    fn new() -> Self {
        let now = Instant::ZERO;
        let seeded =
            |seed| Box::new(<rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(seed));
        let mut client = Client::new(
            ClientConfig::new(Config::new(Transport::Stream), 1),
            now,
            seeded(1),
        )
        .expect("default config");
        let server = Server::new(
            ServerConfig::new(Config::new(Transport::Stream)),
            now,
            seeded(2),
        )
        .expect("default config");
        assert!(matches!(
            client.poll_directive(now),
            Some(Directive::Connect { .. })
        ));
        let mut pair = SessionPair {
            client,
            server,
            now,
            buf: BytesMut::with_capacity(128 << 10),
            delivered: 0,
        };
        pair.server.on_connection(now, 0);
        pair.client.on_connected(now);
        pair.move_bytes();
        let mut connected = false;
        while let Some(e) = pair.client.poll_event() {
            connected |= matches!(e, SessionEvent::Connected { .. });
        }
        assert!(connected, "the handshake completed");
        pair
    }

    fn delivered(&self) -> u64 {
        self.delivered
    }

    fn batch(&mut self, payload: &Bytes) {
        for _ in 0..BATCH {
            self.client
                .send(0, Mode::Ordered, payload.clone())
                .expect("room for a batch");
        }
        settle(self);
    }
}

impl Joined for SessionPair {
    fn shuttle(&mut self) -> bool {
        let moved = self.move_bytes();
        while let Some(event) = self.client.poll_event() {
            black_box(event);
        }
        moved
    }

    fn settled(&self) -> bool {
        self.client.channel().sender().queued_messages() == 0
    }

    fn jump_to_ack_timer(&mut self) {
        self.now = self.now + ACK_TIMER;
        self.client.handle_timeout(self.now);
        self.server.handle_timeout(self.now);
    }
}

impl SessionPair {
    /// Moves bytes both ways until neither end has any to write; true if any moved.
    fn move_bytes(&mut self) -> bool {
        let mut moved = false;
        loop {
            let mut again = false;
            self.buf.reserve(BATCH_ROOM);
            while let Some(n) = self.client.poll_transmit(self.now, &mut self.buf) {
                self.server
                    .handle_input(self.now, 0, self.buf.split_to(n).freeze());
                again = true;
            }
            while let Some(event) = self.server.poll_event() {
                if let ServerEvent::Session {
                    event: SessionEvent::Received(m),
                    ..
                } = event
                {
                    black_box(&m.payload);
                    self.delivered += 1;
                }
            }
            self.buf.reserve(BATCH_ROOM);
            while let Some(t) = self.server.poll_transmit(self.now, &mut self.buf) {
                let bytes = self.buf.split_to(self.buf.len()).freeze();
                self.client
                    .handle_input(self.now, bytes.slice(bytes.len() - t.len..));
                again = true;
            }
            if !again {
                return moved;
            }
            moved = true;
        }
    }
}

/// The steadfast bench of one driven pair, in `group`.
fn bench_steadfast<P: Driven>(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    size: usize,
    payload: &Bytes,
) {
    group.bench_with_input(BenchmarkId::new("steadfast", size), payload, |b, p| {
        let mut pair = P::new();
        b.iter(|| pair.batch(p));
        assert!(pair.delivered() > 0);
    });
}

fn session_path(c: &mut Criterion) {
    let mut group = c.benchmark_group("session_path");
    group.throughput(Throughput::Elements(BATCH));
    for size in SIZES {
        let payload = Bytes::from(vec![0xa5; size]);
        bench_steadfast::<SessionPair>(&mut group, size, &payload);
    }
    group.finish();
}

fn full_path(c: &mut Criterion) {
    let mut group = c.benchmark_group("full_path");
    group.throughput(Throughput::Elements(BATCH));
    for size in SIZES {
        let payload = Bytes::from(vec![0xa5; size]);
        bench_steadfast::<Pair>(&mut group, size, &payload);
        group.bench_with_input(
            BenchmarkId::new("length_delimited", size),
            &payload,
            |b, p| {
                let mut codec = Codec::new();
                b.iter(|| codec.batch(p));
            },
        );
    }
    group.finish();
}

/// A receiver fed sequence numbers block by block: `order` gives the offsets within each block of
/// `BATCH`, so every block ends with everything delivered and the next starts clean.
fn feed(r: &mut Receiver, base: &mut u64, order: &[u64], payload: &Bytes) -> u64 {
    let now = Instant::ZERO;
    let mut delivered = 0u64;
    let mut count = |_: u64, _: u64, p: Bytes| {
        black_box(p);
        delivered += 1;
    };
    for &off in order {
        let arrival = r.on_data(now, 0, *base + off, false, payload.clone(), &mut count);
        debug_assert!(!matches!(arrival, Arrival::NoRoom | Arrival::BeyondWindow));
        black_box(arrival);
    }
    *base += BATCH;
    delivered
}

fn dedup(c: &mut Criterion) {
    let mut group = c.benchmark_group("dedup");
    group.throughput(Throughput::Elements(BATCH));
    let payload = Bytes::from(vec![0u8; 64]);
    let in_order: Vec<u64> = (0..BATCH).collect();
    // Neighbours swapped: 1, 0, 3, 2, …: one range opens and closes per pair.
    let swapped: Vec<u64> = (0..BATCH).map(|i| i ^ 1).collect();
    // The worst case for the de-dup set: in each run of 2 × RECV_RANGES, the odd ones first (every
    // other one missing: RECV_RANGES ranges, the set's capacity), then the even ones fill the gaps.
    let span = 2 * RECV_RANGES as u64;
    let every_other: Vec<u64> = (0..BATCH / span)
        .flat_map(|k| {
            let odd = (0..span).filter(|i| i % 2 == 1);
            let even = (0..span).filter(|i| i % 2 == 0);
            odd.chain(even).map(move |i| k * span + i)
        })
        .collect();
    for (name, order) in [
        ("in_order", &in_order),
        ("swapped_pairs", &swapped),
        ("every_other_missing", &every_other),
    ] {
        group.bench_function(name, |b| {
            let mut r = Receiver::new(&Config::new(Transport::Stream));
            let mut base = 0;
            b.iter(|| assert_eq!(feed(&mut r, &mut base, order, &payload), BATCH));
            assert!(r.ranges().is_empty());
        });
    }
    group.bench_function("duplicates", |b| {
        // Every arrival was seen before (below the watermark): what a resend after a resume costs.
        let mut r = Receiver::new(&Config::new(Transport::Stream));
        let mut base = 0;
        feed(&mut r, &mut base, &in_order, &payload);
        b.iter(|| assert_eq!(feed(&mut r, &mut 0, &in_order, &payload), 0));
    });
    group.bench_function("range_lookup_full_set", |b| {
        // `contains` in a set holding its maximum of ranges (every other value present).
        let mut set = RangeSet::<RECV_RANGES>::new();
        for i in 0..RECV_RANGES as u64 {
            set.insert(2 * i + 1).expect("fits");
        }
        b.iter(|| {
            let mut hits = 0u32;
            for v in 0..BATCH {
                hits += u32::from(set.contains(black_box(v % span)));
            }
            assert_eq!(hits as u64, BATCH / 2);
        });
    });
    group.throughput(Throughput::Elements(span));
    group.bench_function("range_insert_fill_and_drain", |b| {
        // Fill the set to capacity with singletons, then merge them all into one range.
        b.iter(|| {
            let mut set = RangeSet::<RECV_RANGES>::new();
            for v in every_other.iter().take(span as usize) {
                set.insert(black_box(*v)).expect("fits");
            }
            assert_eq!(set.range_count(), 1);
            black_box(set);
        });
    });
    group.finish();
}

/// The median, in nanoseconds per iteration, that criterion saved for `group/function/param`.
fn median_ns(root: &Path, id: &str) -> Option<f64> {
    let text = std::fs::read_to_string(root.join(id).join("new/estimates.json")).ok()?;
    let at = text.find("\"median\"")?;
    let rest = &text[at..];
    let at = rest.find("\"point_estimate\":")? + "\"point_estimate\":".len();
    let rest = &rest[at..];
    let end = rest.find([',', '}'])?;
    rest[..end].trim().parse().ok()
}

/// Where criterion keeps its results: `<target>/criterion`, the target directory being the one
/// this bench binary was built into (`<target>/release/deps/core-…`).
fn criterion_root() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    exe.ancestors()
        .nth(3)
        .map(|t| t.join("criterion"))
        .unwrap_or_else(|| PathBuf::from("target/criterion"))
}

fn run_batches<P: Driven>(batches: u64, payload: &Bytes) {
    let mut pair = P::new();
    for _ in 0..batches {
        pair.batch(payload);
    }
    assert_eq!(pair.delivered(), batches * BATCH);
}

/// A fixed number of batches and nothing else, for instruction counting.
/// `CORE_BENCH_SIZE` picks one payload size.
fn fixed_count(batches: u64) {
    let only: Option<usize> = std::env::var("CORE_BENCH_SIZE")
        .ok()
        .and_then(|v| v.parse().ok());
    let path = std::env::var("CORE_BENCH_PATH");
    for size in SIZES.into_iter().filter(|s| only.is_none_or(|o| o == *s)) {
        let payload = Bytes::from(vec![0xa5; size]);
        match path.as_deref() {
            Ok("session") => run_batches::<SessionPair>(batches, &payload),
            Ok("codec") => run_batches::<Codec>(batches, &payload),
            _ => run_batches::<Pair>(batches, &payload),
        }
    }
}

fn main() {
    if let Some(n) = std::env::var("CORE_BENCH_BATCHES")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        fixed_count(n);
        return;
    }
    let root = criterion_root();
    let mut c = Criterion::default()
        .output_directory(&root)
        .configure_from_args();
    full_path(&mut c);
    session_path(&mut c);
    dedup(&mut c);
    c.final_summary();
    println!("\nsteadfast full path / LengthDelimitedCodec encode+decode (throughput, medians):");
    for size in SIZES {
        let ours = median_ns(&root, &format!("full_path/steadfast/{size}"));
        let theirs = median_ns(&root, &format!("full_path/length_delimited/{size}"));
        match (ours, theirs) {
            (Some(ours), Some(theirs)) => println!(
                "  {size:>5} B: steadfast {:>6.1} ns/msg, codec {:>6.1} ns/msg, ratio {:.2} (goal >= 0.80)",
                ours / BATCH as f64,
                theirs / BATCH as f64,
                theirs / ours
            ),
            _ => println!("  {size:>5} B: no saved estimate (filtered out, or --test)"),
        }
    }
}
