//! The file-backed store: it recovers what the memory store would hold for the same calls (also
//! after reopening, a kill and compaction), cuts a torn tail away, reports damage before valid
//! records as corruption, stays bounded under steady traffic, and syncs as its policy says.
#![cfg(feature = "file-store")]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;
use std::{fs, process};

use bytes::Bytes;
use proptest::prelude::*;
use steadfast_core::Seq;
use steadfast_core::identity::{SessionId, Token};
use steadfast_core::store::file::{COMPACTION_FLOOR, FileStore, LOG_FILE, MAGIC, SyncPolicy};
use steadfast_core::store::{Identity, MemoryStore, Recovered, Store, StoreError, Stored};

/// A directory of its own under the system's temporary one, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("steadfast-file-store-{}-{n}", process::id()));
        let _ = fs::remove_dir_all(&dir);
        TempDir(dir)
    }

    fn log(&self) -> PathBuf {
        self.0.join(LOG_FILE)
    }

    /// A new directory whose log holds `bytes`.
    fn with_log(bytes: &[u8]) -> TempDir {
        let dir = TempDir::new();
        fs::create_dir_all(&dir.0).unwrap();
        fs::write(dir.log(), bytes).unwrap();
        dir
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn open(dir: &Path) -> FileStore {
    FileStore::open(dir, SyncPolicy::None).expect("opens")
}

fn recovered(dir: &Path) -> Result<Recovered, StoreError> {
    open(dir).recover()
}

fn message(seq: Seq, payload: &[u8]) -> Stored {
    Stored {
        seq,
        stream: seq % 3,
        unordered: seq % 2 == 1,
        payload: Bytes::copy_from_slice(payload),
    }
}

fn identity(epoch: u64) -> Identity {
    Identity {
        session: SessionId(0xdead_beef_0000_0001),
        token: Token::from_bytes([0xa5; 16]),
        epoch,
    }
}

#[derive(Debug, Clone)]
enum Op {
    Identity(u64, u8, u64),
    Sent(Stored),
    Acknowledged(Seq),
    Arrived(Stored),
    Consumed(Seq),
    Flush,
    /// Only the file store: rewrite its log now.
    Compact,
    /// Drop the store (a clean exit) and open it again.
    Reopen,
    /// The process dies: only what the operating system has of the log is left.
    Kill,
    Clear,
}

fn stored() -> impl Strategy<Value = Stored> {
    let stream = prop_oneof![4 => 0u64..3, 1 => Just(u64::MAX)];
    (
        0u64..40,
        stream,
        any::<bool>(),
        // Now and then one larger than the store's buffer, which reaches the OS before a flush.
        prop_oneof![
            40 => proptest::collection::vec(any::<u8>(), 0..24),
            1 => Just(vec![0x33; 70_000]),
        ],
    )
        .prop_map(|(seq, stream, unordered, payload)| Stored {
            seq,
            stream,
            unordered,
            payload: payload.into(),
        })
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        2 => (any::<u64>(), any::<u8>(), any::<u64>()).prop_map(|(s, t, e)| Op::Identity(s, t, e)),
        8 => stored().prop_map(Op::Sent),
        4 => (0u64..42).prop_map(Op::Acknowledged),
        8 => stored().prop_map(Op::Arrived),
        4 => (0u64..42).prop_map(Op::Consumed),
        3 => Just(Op::Flush),
        1 => Just(Op::Compact),
        1 => Just(Op::Reopen),
        1 => Just(Op::Kill),
        1 => Just(Op::Clear),
    ]
}

/// Applies a trait call to any store; `false` for the ones that are not trait calls.
fn call(store: &mut dyn Store, op: &Op) -> bool {
    let result = match op {
        Op::Identity(session, token, epoch) => store.identity(Identity {
            session: SessionId(*session),
            token: Token::from_bytes([*token; 16]),
            epoch: *epoch,
        }),
        Op::Sent(m) => store.sent(m),
        Op::Acknowledged(below) => store.acknowledged(*below),
        Op::Arrived(m) => store.arrived(m),
        Op::Consumed(seq) => store.consumed(*seq),
        Op::Flush => store.flush(),
        Op::Clear => store.clear(),
        Op::Compact | Op::Reopen | Op::Kill => return false,
    };
    result.expect("the call succeeds");
    true
}

/// A file store opened with a low compaction floor, so compactions happen within short runs.
fn open_small(dir: &Path, floor: u64) -> FileStore {
    let mut store = open(dir);
    store.set_compaction_floor(floor);
    store
}

fn file_store_matches_memory_store(ops: Vec<Op>, floor: u64) -> Result<(), TestCaseError> {
    let mut dir = TempDir::new();
    let mut file = open_small(&dir.0, floor);
    let mut memory = MemoryStore::new();
    // What the memory store held at the last flush, and the calls since: a kill may recover any
    // state in between (a full buffer reaches the operating system without a flush).
    let mut flushed = memory.clone();
    let mut since_flush: Vec<Op> = Vec::new();
    for op in &ops {
        match op {
            Op::Compact => {
                file.compact().unwrap();
                flushed = memory.clone();
                since_flush.clear();
            }
            Op::Reopen => {
                drop(file);
                file = open_small(&dir.0, floor);
            }
            Op::Kill => {
                let on_disk = fs::read(dir.log()).unwrap();
                drop(file);
                dir = TempDir::with_log(&on_disk);
                file = open_small(&dir.0, floor);
                let got = file.recover().unwrap();
                let mut candidate = flushed.clone();
                let mut matched = (candidate.snapshot() == &got).then(|| candidate.clone());
                for op in &since_flush {
                    call(&mut candidate, op);
                    if candidate.snapshot() == &got {
                        matched = Some(candidate.clone());
                    }
                }
                memory = matched.ok_or_else(|| {
                    TestCaseError::fail(format!("a kill recovered a state never held: {got:?}"))
                })?;
                flushed = memory.clone();
                since_flush.clear();
            }
            _ => {
                call(&mut memory, op);
                call(&mut file, op);
                if matches!(op, Op::Flush | Op::Clear) {
                    flushed = memory.clone();
                    since_flush.clear();
                } else {
                    since_flush.push(op.clone());
                }
            }
        }
        prop_assert_eq!(file.recover().unwrap(), memory.recover().unwrap());
    }
    drop(file);
    prop_assert_eq!(recovered(&dir.0).unwrap(), memory.recover().unwrap());
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn any_sequence_of_calls_recovers_what_the_memory_store_holds_also_after_reopening(
        ops in proptest::collection::vec(op(), 0..80),
        floor in prop_oneof![Just(0u64), 64u64..2048, Just(COMPACTION_FLOOR)],
    ) {
        file_store_matches_memory_store(ops, floor)?;
    }
}

/// Writes `ops` to a fresh log and flushes; returns the directory.
fn written(ops: &[Op]) -> TempDir {
    let dir = TempDir::new();
    let mut store = open(&dir.0);
    for op in ops {
        call(&mut store, op);
    }
    store.flush().unwrap();
    dir
}

fn some_calls() -> Vec<Op> {
    vec![
        Op::Identity(7, 1, 1),
        Op::Sent(message(0, b"first")),
        Op::Sent(message(1, b"second")),
        Op::Arrived(message(0, b"in")),
        Op::Acknowledged(1),
        Op::Arrived(message(2, b"held")),
        Op::Consumed(0),
        Op::Identity(7, 1, 2),
        Op::Sent(message(2, b"third")),
    ]
}

fn memory_after(ops: &[Op]) -> Recovered {
    let mut memory = MemoryStore::new();
    for op in ops {
        call(&mut memory, op);
    }
    memory.recover().unwrap()
}

#[test]
fn a_torn_last_record_recovers_to_the_state_before_it_and_is_cut_away() {
    let before = some_calls();
    let mut after = before.clone();
    after.push(Op::Arrived(message(1, &[0x5a; 40])));
    let short = fs::read(written(&before).log()).unwrap();
    let full = fs::read(written(&after).log()).unwrap();
    assert!(full.starts_with(&short));

    for cut in 1..=(full.len() - short.len()) {
        let dir = TempDir::with_log(&full[..full.len() - cut]);
        let mut store = open(&dir.0);
        assert_eq!(store.recover().unwrap(), memory_after(&before), "cut {cut}");
        // New records follow the valid ones, not the torn bytes.
        store.consumed(2).unwrap();
        drop(store);
        let mut expected = before.clone();
        expected.push(Op::Consumed(2));
        assert_eq!(
            recovered(&dir.0).unwrap(),
            memory_after(&expected),
            "cut {cut}"
        );
    }
}

#[test]
fn a_last_record_failing_its_checksum_or_trailing_zeros_are_a_torn_tail() {
    let before = some_calls();
    let mut after = before.clone();
    after.push(Op::Sent(message(3, b"last")));
    let short_len = fs::read(written(&before).log()).unwrap().len();
    let full = fs::read(written(&after).log()).unwrap();

    for at in short_len..full.len() {
        let mut damaged = full.clone();
        damaged[at] ^= 0x01;
        let dir = TempDir::with_log(&damaged);
        assert_eq!(
            recovered(&dir.0).unwrap(),
            memory_after(&before),
            "byte {at}"
        );
    }
    // A size extended before its data was written (a power loss on some file systems).
    let mut zeros = full.clone();
    zeros.extend_from_slice(&[0; 100]);
    let dir = TempDir::with_log(&zeros);
    assert_eq!(recovered(&dir.0).unwrap(), memory_after(&after));
    assert_eq!(fs::metadata(dir.log()).unwrap().len(), full.len() as u64);
}

#[test]
fn a_log_cut_inside_its_magic_is_a_new_store() {
    for len in 0..MAGIC.len() {
        let dir = TempDir::with_log(&MAGIC[..len]);
        let mut store = open(&dir.0);
        assert_eq!(store.recover().unwrap(), Recovered::default());
        store.sent(&message(0, b"x")).unwrap();
        drop(store);
        assert_eq!(
            recovered(&dir.0).unwrap().unacknowledged,
            [message(0, b"x")]
        );
    }
}

#[test]
fn a_flipped_byte_before_the_last_record_is_reported_corrupt() {
    let ops = some_calls();
    let mut without_last = ops.clone();
    without_last.pop();
    let last_starts = fs::read(written(&without_last).log()).unwrap().len();
    let log = fs::read(written(&ops).log()).unwrap();

    for at in 0..last_starts {
        for flip in [0x01, 0x80, 0xff] {
            let mut damaged = log.clone();
            damaged[at] ^= flip;
            let dir = TempDir::with_log(&damaged);
            let mut store = open(&dir.0);
            assert!(
                matches!(store.recover(), Err(StoreError::Corrupt(_))),
                "byte {at} ^ {flip:#x}"
            );
            // Nothing is appended after damage; the file is left as found.
            assert!(matches!(
                store.sent(&message(9, b"no")),
                Err(StoreError::Corrupt(_))
            ));
            assert!(matches!(store.flush(), Err(StoreError::Corrupt(_))));
            drop(store);
            assert_eq!(fs::read(dir.log()).unwrap(), damaged);
        }
    }
}

#[test]
fn a_corrupt_store_is_usable_again_once_cleared() {
    let mut log = fs::read(written(&some_calls()).log()).unwrap();
    log[MAGIC.len() + 10] ^= 0xff;
    let dir = TempDir::with_log(&log);
    let mut store = open(&dir.0);
    assert!(matches!(store.recover(), Err(StoreError::Corrupt(_))));
    store.clear().unwrap();
    store.sent(&message(0, b"again")).unwrap();
    drop(store);
    assert_eq!(
        recovered(&dir.0).unwrap().unacknowledged,
        [message(0, b"again")]
    );
}

#[test]
fn a_record_with_a_valid_checksum_that_does_not_parse_is_corrupt_even_last() {
    let mut log = fs::read(written(&some_calls()).log()).unwrap();
    // Type 99, unknown, correctly framed.
    let body = [99u8, 1, 2, 3];
    let len = (body.len() as u32).to_le_bytes();
    let mut crc = crc32fast::Hasher::new();
    crc.update(&len);
    crc.update(&body);
    log.extend_from_slice(&len);
    log.extend_from_slice(&crc.finalize().to_le_bytes());
    log.extend_from_slice(&body);
    let dir = TempDir::with_log(&log);
    assert!(matches!(recovered(&dir.0), Err(StoreError::Corrupt(_))));
}

#[test]
fn a_log_of_another_format_is_corrupt() {
    let dir = TempDir::with_log(b"something else entirely");
    assert!(matches!(recovered(&dir.0), Err(StoreError::Corrupt(_))));
}

#[test]
fn compaction_keeps_the_log_bounded_under_a_hundred_thousand_sent_and_acknowledged_pairs() {
    let dir = TempDir::new();
    let mut file = open(&dir.0);
    let mut memory = MemoryStore::new();
    let payload = [0x42; 64];
    let mut largest = 0;
    for seq in 0..100_000u64 {
        let m = message(seq, &payload);
        let calls = [Op::Sent(m.clone()), Op::Arrived(m), Op::Flush];
        // Some stay unacknowledged or unconsumed for a while, so snapshots carry them.
        let late = [
            Op::Acknowledged(seq - seq % 7),
            Op::Consumed(seq.saturating_sub(3)),
            Op::Flush,
        ];
        for op in calls.iter().chain(&late) {
            call(&mut memory, op);
            call(&mut file, op);
        }
        if seq % 1000 == 0 {
            largest = largest.max(fs::metadata(dir.log()).unwrap().len());
        }
    }
    // The live state is a few messages: the log stays under the floor plus a record or two.
    assert!(
        largest > COMPACTION_FLOOR / 2,
        "the log did grow: {largest}"
    );
    assert!(largest <= COMPACTION_FLOOR + 1024, "bounded: {largest}");
    assert!(file.syncs() >= 10, "compacted {} times", file.syncs());
    assert_eq!(file.recover().unwrap(), memory.recover().unwrap());
    drop(file);
    assert_eq!(recovered(&dir.0).unwrap(), memory.recover().unwrap());
}

#[test]
fn a_log_that_outgrows_a_large_live_state_is_compacted_to_a_few_times_its_size() {
    let dir = TempDir::new();
    let mut file = open(&dir.0);
    file.set_compaction_floor(0);
    let mut memory = MemoryStore::new();
    // A thousand arrivals the application never consumes, then traffic beside them.
    for seq in 0..1000 {
        let op = Op::Arrived(message(seq, &[0x17; 100]));
        call(&mut memory, &op);
        call(&mut file, &op);
    }
    file.compact().unwrap();
    let live = file.log_len();
    let mut largest = 0;
    for seq in 0..20_000 {
        for op in [
            Op::Sent(message(seq, &[0x18; 64])),
            Op::Acknowledged(seq + 1),
            Op::Flush,
        ] {
            call(&mut memory, &op);
            call(&mut file, &op);
        }
        largest = largest.max(file.log_len());
    }
    assert!(
        largest > 3 * live,
        "the log did grow: {largest} over {live}"
    );
    assert!(largest <= 5 * live, "bounded: {largest} over {live}");
    assert_eq!(file.recover().unwrap(), memory.recover().unwrap());
    drop(file);
    assert_eq!(recovered(&dir.0).unwrap(), memory.recover().unwrap());
}

#[test]
fn reopening_after_clear_gives_an_empty_state() {
    let dir = written(&some_calls());
    let mut store = open(&dir.0);
    assert_ne!(store.recover().unwrap(), Recovered::default());
    store.clear().unwrap();
    assert_eq!(store.recover().unwrap(), Recovered::default());
    drop(store);
    assert_eq!(recovered(&dir.0).unwrap(), Recovered::default());
    assert_eq!(fs::read(dir.log()).unwrap(), MAGIC);
}

#[test]
fn a_new_directory_is_created_and_starts_empty() {
    let dir = TempDir::new();
    let nested = dir.0.join("a/b");
    let mut store = FileStore::open(&nested, SyncPolicy::EveryFlush).unwrap();
    assert_eq!(store.recover().unwrap(), Recovered::default());
    assert_eq!(store.dir(), nested);
    store.identity(identity(3)).unwrap();
    store.flush().unwrap();
    drop(store);
    assert_eq!(recovered(&nested).unwrap().identity, Some(identity(3)));
}

#[test]
fn what_was_flushed_survives_a_kill_under_every_policy() {
    for policy in [
        SyncPolicy::EveryFlush,
        SyncPolicy::Batched {
            max_records: 1000,
            max_delay: None,
        },
        SyncPolicy::None,
    ] {
        let dir = TempDir::new();
        let mut store = FileStore::open(&dir.0, policy).unwrap();
        store.sent(&message(0, b"kept")).unwrap();
        store.flush().unwrap();
        store.sent(&message(1, b"not flushed")).unwrap();
        // What the operating system has, while the store still holds its buffer.
        let on_disk = TempDir::with_log(&fs::read(dir.log()).unwrap());
        assert_eq!(
            recovered(&on_disk.0).unwrap().unacknowledged,
            [message(0, b"kept")],
            "{policy:?}"
        );
    }
}

fn sent_and_flushed(store: &mut FileStore, seq: Seq) {
    store.sent(&message(seq, b"x")).unwrap();
    store.flush().unwrap();
}

#[test]
fn every_flush_syncs_each_flush_that_follows_a_record() {
    let dir = TempDir::new();
    let mut store = FileStore::open(&dir.0, SyncPolicy::EveryFlush).unwrap();
    for seq in 0..5 {
        sent_and_flushed(&mut store, seq);
    }
    store.flush().unwrap();
    assert_eq!(store.syncs(), 5);
}

#[test]
fn a_batched_policy_syncs_once_per_batch_of_records() {
    let dir = TempDir::new();
    let policy = SyncPolicy::Batched {
        max_records: 4,
        max_delay: None,
    };
    let mut store = FileStore::open(&dir.0, policy).unwrap();
    for seq in 0..11 {
        sent_and_flushed(&mut store, seq);
    }
    assert_eq!(store.syncs(), 2);
    store.sync().unwrap();
    assert_eq!(store.syncs(), 3);
}

/// A clock the test moves by hand.
static NOW_MS: AtomicU64 = AtomicU64::new(0);

fn test_clock() -> Instant {
    static START: OnceLock<Instant> = OnceLock::new();
    // The test's clock has to start somewhere; the store itself only ever calls this function.
    #[allow(clippy::disallowed_methods)]
    let start = *START.get_or_init(Instant::now);
    start + std::time::Duration::from_millis(NOW_MS.load(Ordering::Relaxed))
}

#[test]
fn a_batched_policy_with_a_clock_syncs_records_older_than_the_delay() {
    let dir = TempDir::new();
    let policy = SyncPolicy::Batched {
        max_records: u32::MAX,
        max_delay: Some((core::time::Duration::from_millis(10), test_clock)),
    };
    let mut store = FileStore::open(&dir.0, policy).unwrap();
    sent_and_flushed(&mut store, 0);
    NOW_MS.fetch_add(5, Ordering::Relaxed);
    sent_and_flushed(&mut store, 1);
    assert_eq!(store.syncs(), 0, "the oldest record is 5 ms old");
    NOW_MS.fetch_add(5, Ordering::Relaxed);
    sent_and_flushed(&mut store, 2);
    assert_eq!(store.syncs(), 1, "the oldest record is 10 ms old");
    // A long idle time does not count against the next record: its age does.
    NOW_MS.fetch_add(1000, Ordering::Relaxed);
    sent_and_flushed(&mut store, 3);
    assert_eq!(store.syncs(), 1);
}

#[test]
fn no_sync_policy_never_syncs_outside_compaction() {
    let dir = TempDir::new();
    let mut store = FileStore::open(&dir.0, SyncPolicy::None).unwrap();
    for seq in 0..100 {
        sent_and_flushed(&mut store, seq);
    }
    assert_eq!(store.syncs(), 0);
}
