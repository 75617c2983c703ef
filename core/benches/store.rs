//! Criterion benches for the file-backed store (issue 6): what durability costs per message.
//!
//! - `file_store/sent_flush/{every_flush,batched_64,none}`: per message, one `sent` record with a
//!   64-byte payload and the `flush` the client calls before `send` returns `Ok`, under each sync
//!   policy. Every 64 messages an `acknowledged` record releases them, as acks would under steady
//!   traffic, so the live state stays small and compaction (a synced rewrite per MiB of log) runs
//!   as it would: its cost is included.
//! - `memory_store/sent_flush`: the same calls on the memory store, the floor.
//!
//! The log lives in a fresh directory under the system's temporary one (`/tmp`), or under
//! `STEADFAST_BENCH_DIR` if set: put that on the disk whose sync cost matters (a tmpfs syncs for
//! free). Run: `cargo bench -p steadfast-core --features file-store --bench store`.

use std::hint::black_box;
use std::path::PathBuf;

use bytes::Bytes;
use criterion::{Criterion, Throughput};
use steadfast_core::store::file::{FileStore, SyncPolicy};
use steadfast_core::store::{MemoryStore, Store, Stored};

/// Messages between acknowledgements.
const ACK_EVERY: u64 = 64;

/// Sends one message through `store` as the client does: record, then flush.
fn sent_flush(store: &mut dyn Store, seq: &mut u64, payload: &Bytes) {
    let message = Stored {
        seq: *seq,
        stream: 0,
        unordered: false,
        payload: payload.clone(),
    };
    store.sent(black_box(&message)).unwrap();
    store.flush().unwrap();
    *seq += 1;
    if *seq % ACK_EVERY == 0 {
        store.acknowledged(*seq).unwrap();
    }
}

fn bench_dir(name: &str) -> PathBuf {
    let base =
        std::env::var_os("STEADFAST_BENCH_DIR").map_or_else(std::env::temp_dir, PathBuf::from);
    let dir = base.join(format!(
        "steadfast-store-bench-{}-{name}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn sent_and_flushed(c: &mut Criterion) {
    let payload = Bytes::from(vec![0x42; 64]);
    let policies = [
        ("every_flush", SyncPolicy::EveryFlush),
        (
            "batched_64",
            SyncPolicy::Batched {
                max_records: 64,
                max_delay: None,
            },
        ),
        ("none", SyncPolicy::None),
    ];

    let mut group = c.benchmark_group("file_store/sent_flush");
    group.throughput(Throughput::Elements(1));
    for (name, policy) in policies {
        let dir = bench_dir(name);
        let mut store = FileStore::open(&dir, policy).unwrap();
        let mut seq = 0;
        group.bench_function(name, |b| {
            b.iter(|| sent_flush(&mut store, &mut seq, &payload))
        });
        drop(store);
        let _ = std::fs::remove_dir_all(&dir);
    }
    group.finish();

    let mut group = c.benchmark_group("memory_store");
    group.throughput(Throughput::Elements(1));
    let mut store = MemoryStore::new();
    let mut seq = 0;
    group.bench_function("sent_flush", |b| {
        b.iter(|| sent_flush(&mut store, &mut seq, &payload))
    });
    group.finish();
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    sent_and_flushed(&mut c);
    c.final_summary();
}
