//! A [`Store`] on disk: an append-only log with a checksum per record, which survives a restart of
//! the process (and, under [`SyncPolicy::EveryFlush`], a power loss).
//!
//! # Files
//!
//! [`FileStore::open`] keeps one file, [`LOG_FILE`], in its directory (plus [`TEMP_FILE`] for a
//! moment while it is compacted). One directory serves one store in one process at a time: two
//! stores appending to the same log interleave their records and corrupt it.
//!
//! # Format
//!
//! The log starts with the 8-byte [`MAGIC`] (its last byte is the format's version). Then records,
//! one per call of the trait, each framed as:
//!
//! | field  | size           | meaning                                                        |
//! |--------|----------------|----------------------------------------------------------------|
//! | `len`  | 4, LE          | bytes after the frame header: the type byte and the fields     |
//! | `crc`  | 4, LE          | CRC-32 (IEEE) of the `len` field, the type byte and the fields |
//! | `type` | 1              | what the record says (below)                                   |
//! | fields | `len - 1`      | integers as unsigned LEB128 (full `u64` range), payload last   |
//!
//! | type | record         | fields                                                           |
//! |------|----------------|------------------------------------------------------------------|
//! | 1    | identity       | session (8, LE), token (16), epoch (8, LE)                        |
//! | 2    | sent           | seq, stream, flags (1: bit 0 unordered), payload (rest)          |
//! | 3    | acknowledged   | below                                                            |
//! | 4    | arrived        | as sent                                                          |
//! | 5    | consumed       | seq                                                              |
//! | 6    | base           | next_seq, watermark, range count, then each range's start, end   |
//! | 7    | held           | as sent: an arrived message not yet consumed, from a snapshot    |
//!
//! Replaying the records through [`MemoryStore`]'s logic gives the state, so a file store recovers
//! exactly what a memory store given the same calls would hold. Types 6 and 7 appear only in a
//! snapshot written by compaction: a base record (left out if its counters are all zero) resets the
//! whole state to its values, then come the identity, a sent record per unacknowledged message and a
//! held record per unconsumed one.
//!
//! # Recovery
//!
//! [`FileStore::open`] reads the whole log and replays it. A write cut short by a crash can only
//! damage the end of the log, so an invalid record (short, or failing its checksum) that no valid
//! record follows is a torn tail: it is cut off, and the state is the one before it. An invalid
//! record that a valid one follows is not explained by a crash, and neither is a record whose
//! checksum holds but whose fields do not parse: [`Store::recover`] then reports
//! [`StoreError::Corrupt`], every write reports it too (nothing is appended after damage), and only
//! [`Store::clear`] makes the store usable again. (A payload that itself contains a well-formed
//! record can make a torn tail look like corruption: reported loudly, never lost silently.)
//!
//! # Compaction
//!
//! Acknowledged and consumed messages stay in the log until it is compacted: when the log is more
//! than 4 times the size of a snapshot of the live state and at least [`COMPACTION_FLOOR`] (1 MiB,
//! see [`FileStore::set_compaction_floor`]), the snapshot is written to [`TEMP_FILE`], synced, and
//! renamed over the log, and the directory is synced. A crash at any point leaves either the old
//! log or the new one. Under steady traffic the log so stays below about the floor or 4½ times the
//! live state, whichever is larger. Compaction syncs whatever the [`SyncPolicy`].
//!
//! # Durability
//!
//! Records go through a buffer; [`Store::flush`] always hands them to the operating system, so
//! what was flushed survives the process being killed (`SIGKILL`, a panic, an abort). Whether it
//! also survives the machine losing power or the kernel crashing is the [`SyncPolicy`].
//!
//! # Clocks
//!
//! The core reads no clock. [`SyncPolicy::Batched`] counts records, and bounds time only if the
//! caller injects a clock (the runtime's monotonic one, typically).

use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::ops::Range;
use core::time::Duration;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use bytes::Bytes;

use super::{Identity, MemoryStore, Recovered, Store, StoreError, Stored};
use crate::Seq;
use crate::identity::{SessionId, Token};

/// The log's name inside the store's directory.
pub const LOG_FILE: &str = "steadfast-store.log";
/// The name a compacted snapshot is written under before it is renamed over [`LOG_FILE`].
pub const TEMP_FILE: &str = "steadfast-store.log.tmp";
/// The first bytes of a log: a name and the format's version (the last byte).
pub const MAGIC: [u8; 8] = *b"sfstore\x01";
/// The smallest log compaction rewrites (1 MiB); see [`FileStore::set_compaction_floor`].
pub const COMPACTION_FLOOR: u64 = 1 << 20;

/// A log is compacted once it is this many times the size of its live state.
const COMPACTION_FACTOR: u64 = 4;
/// A frame header: `len` and `crc`.
const HEADER_LEN: usize = 8;
/// Writes are gathered up to this many bytes between flushes.
const BUFFER_LEN: usize = 64 * 1024;

const IDENTITY: u8 = 1;
const SENT: u8 = 2;
const ACKNOWLEDGED: u8 = 3;
const ARRIVED: u8 = 4;
const CONSUMED: u8 = 5;
const BASE: u8 = 6;
const HELD: u8 = 7;

/// The clock a [`SyncPolicy::Batched`] reads: the application's monotonic clock, or a test's own.
pub type Clock = fn() -> Instant;

/// When [`Store::flush`] also syncs the log to the disk (`fdatasync`), and so what survives what.
///
/// Under every policy, a flushed record has been written to the operating system and survives the
/// process being killed. A record lost to a power loss or kernel crash rolls the store back to an
/// older state, so a restarted client resumes from there: messages the application was told were
/// sent may never be republished (lost), and a message whose consumption was lost is handed out
/// again (flagged as redelivered); an identity whose epoch was lost may get the session refused
/// (reported as lost, loudly).
#[derive(Debug, Clone, Copy)]
pub enum SyncPolicy {
    /// Every [`Store::flush`] that follows a new record syncs it: once `flush` returns, the records
    /// survive a power loss too (given a disk that honours the sync). The slowest: a sync per
    /// flush, which the client calls per message sent and before each acknowledgement.
    EveryFlush,
    /// A flush syncs once `max_records` records, or records older than the delay, wait unsynced;
    /// other flushes only write to the operating system. A power loss loses at most the records
    /// since the last sync: fewer than `max_records`, and written less than the delay before the
    /// last flush (if a clock is given) — unless no flush came since, so a caller with a timer
    /// should call [`FileStore::sync`] when idle.
    Batched {
        /// Sync at the flush that finds this many records unsynced (0 or 1: at every flush).
        max_records: u32,
        /// Sync at the flush that finds a record unsynced for this long, by this clock; `None`
        /// counts records only.
        max_delay: Option<(Duration, Clock)>,
    },
    /// Never sync (except while compacting): survives the process being killed, not a power loss
    /// or kernel crash, which can lose whatever the operating system had not yet written back
    /// (on Linux, by default, up to about half a minute of records). The fastest.
    None,
}

/// A [`Store`] in an append-only log on disk. See the [module docs](self).
#[derive(Debug)]
pub struct FileStore {
    dir: PathBuf,
    policy: SyncPolicy,
    writer: BufWriter<File>,
    /// The state the log replays to, kept by the reference implementation itself.
    model: MemoryStore,
    /// Bytes in the log, counting those still in the buffer.
    len: u64,
    /// At this length, the next check whether to compact.
    check_at: u64,
    floor: u64,
    /// Records appended since the last sync.
    unsynced: u32,
    /// When the oldest of them was appended (only with a clock).
    unsynced_since: Option<Instant>,
    /// Whether the buffer may hold bytes not yet written to the operating system.
    buffered: bool,
    syncs: u64,
    /// Set when the log is corrupt or a write failed: every call reports it until `clear`.
    failed: Option<StoreError>,
    /// A record's type and fields, reused.
    scratch: Vec<u8>,
}

impl FileStore {
    /// Opens the store in `dir` (created if missing), replaying its log, or starts an empty one.
    ///
    /// A torn tail is cut off here. A corrupt log does not fail `open`: [`Store::recover`] reports
    /// it (so the session can carry on in memory and say so), as does every write until
    /// [`Store::clear`].
    pub fn open(dir: impl AsRef<Path>, policy: SyncPolicy) -> io::Result<FileStore> {
        let dir = dir.as_ref().to_path_buf();
        fs::create_dir_all(&dir)?;
        let path = dir.join(LOG_FILE);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        let replay = replay(&bytes);
        let mut len = bytes.len() as u64;
        drop(bytes);
        let failed = replay.corrupt.map(StoreError::Corrupt);
        if failed.is_none() && (replay.valid_len < len || len < MAGIC.len() as u64) {
            // A new log, or a torn tail (maybe inside the magic): cut it off, so that what is
            // appended next follows valid records. Synced, or a crash could bring the garbage back
            // under new records.
            if replay.valid_len < MAGIC.len() as u64 {
                file.set_len(0)?;
                file.seek(SeekFrom::Start(0))?;
                file.write_all(&MAGIC)?;
                len = MAGIC.len() as u64;
            } else {
                file.set_len(replay.valid_len)?;
                len = replay.valid_len;
            }
            file.sync_all()?;
            sync_dir(&dir)?;
        }
        file.seek(SeekFrom::End(0))?;
        let mut store = FileStore {
            dir,
            policy,
            writer: BufWriter::with_capacity(BUFFER_LEN, file),
            model: replay.model,
            len,
            check_at: 0,
            floor: COMPACTION_FLOOR,
            unsynced: 0,
            unsynced_since: None,
            buffered: false,
            syncs: 0,
            failed,
            scratch: Vec::new(),
        };
        store.schedule_check();
        Ok(store)
    }

    /// Sets the smallest log that compaction rewrites (default [`COMPACTION_FLOOR`]). A lower floor
    /// keeps the file smaller at the cost of more frequent rewrites (each one synced).
    pub fn set_compaction_floor(&mut self, bytes: u64) {
        self.floor = bytes;
        self.schedule_check();
    }

    /// Rewrites the log as a snapshot of the live state now, whatever its size.
    pub fn compact(&mut self) -> Result<(), StoreError> {
        self.usable()?;
        self.rewrite_live().map_err(|e| self.fail(e))
    }

    /// Writes and syncs every record so far, whatever the policy: for a caller with a timer, so a
    /// batch does not wait unsynced while no flush comes.
    pub fn sync(&mut self) -> Result<(), StoreError> {
        self.usable()?;
        self.push()
            .and_then(|()| self.sync_log())
            .map_err(|e| self.fail(e))
    }

    /// How many times the log has been synced since [`FileStore::open`] (compactions included).
    pub fn syncs(&self) -> u64 {
        self.syncs
    }

    /// The log's length in bytes, counting what is still buffered.
    pub fn log_len(&self) -> u64 {
        self.len
    }

    /// The directory the store lives in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn usable(&self) -> Result<(), StoreError> {
        match &self.failed {
            Some(e) => Err(e.clone()),
            None => Ok(()),
        }
    }

    /// A failed write may have left part of a record behind: nothing more is appended after it.
    fn fail(&mut self, e: io::Error) -> StoreError {
        let e = StoreError::Io(e.to_string());
        self.failed = Some(e.clone());
        e
    }

    /// Appends one record, then lets `apply` change the state (only once the record is written).
    fn append(
        &mut self,
        kind: u8,
        fields: impl FnOnce(&mut Vec<u8>),
        payload: &[u8],
        apply: impl FnOnce(&mut MemoryStore) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        self.usable()?;
        self.scratch.clear();
        fields(&mut self.scratch);
        let written = write_record(&mut self.writer, kind, &self.scratch, payload);
        let written = written.map_err(|e| self.fail(e))?;
        self.len += written;
        self.buffered = true;
        if self.unsynced == 0
            && let SyncPolicy::Batched {
                max_delay: Some((_, clock)),
                ..
            } = self.policy
        {
            self.unsynced_since = Some(clock());
        }
        self.unsynced = self.unsynced.saturating_add(1);
        apply(&mut self.model)?;
        if self.len >= self.check_at {
            self.maybe_compact().map_err(|e| self.fail(e))?;
        }
        Ok(())
    }

    fn append_message(&mut self, kind: u8, m: &Stored) -> Result<(), StoreError> {
        let apply = |s: &mut MemoryStore| {
            if kind == SENT {
                s.sent(m)
            } else {
                s.arrived(m)
            }
        };
        self.append(kind, |b| message_fields(b, m), &m.payload, apply)
    }

    /// Compacts if the log has outgrown the live state; otherwise decides when to look again.
    fn maybe_compact(&mut self) -> io::Result<()> {
        let live = snapshot_len(self.model.snapshot());
        if self.len >= self.floor && self.len > COMPACTION_FACTOR * live {
            self.rewrite_live()
        } else {
            self.schedule_check_with(live);
            Ok(())
        }
    }

    fn schedule_check(&mut self) {
        let live = snapshot_len(self.model.snapshot());
        self.schedule_check_with(live);
    }

    /// The next check comes once the log could have outgrown this live state, and no sooner than
    /// another eighth of growth, so that sizing the live state up stays amortised.
    fn schedule_check_with(&mut self, live: u64) {
        self.check_at = self
            .floor
            .max(COMPACTION_FACTOR * live + 1)
            .max(self.len + self.len / 8);
    }

    /// Replaces the log by the live state alone.
    fn rewrite_live(&mut self) -> io::Result<()> {
        // Taken out for the while, rather than cloned, so `rewrite` may borrow the store.
        let model = core::mem::take(&mut self.model);
        let result = self.rewrite(model.snapshot());
        self.model = model;
        result
    }

    /// Replaces the log by `state` alone: written aside, synced, renamed over, directory synced.
    fn rewrite(&mut self, state: &Recovered) -> io::Result<()> {
        let temp = self.dir.join(TEMP_FILE);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&temp)?;
        let mut writer = BufWriter::with_capacity(BUFFER_LEN, file);
        writer.write_all(&MAGIC)?;
        let len = MAGIC.len() as u64 + write_snapshot(&mut writer, state)?;
        writer.flush()?;
        writer.get_ref().sync_all()?;
        fs::rename(&temp, self.dir.join(LOG_FILE))?;
        // The old log's buffered records are in the snapshot: dropped, not written.
        let old = core::mem::replace(&mut self.writer, writer);
        drop(old.into_parts());
        self.len = len;
        self.buffered = false;
        self.unsynced = 0;
        self.unsynced_since = None;
        self.syncs += 1;
        self.schedule_check_with(len);
        sync_dir(&self.dir)
    }

    /// Hands buffered records to the operating system.
    fn push(&mut self) -> io::Result<()> {
        if self.buffered {
            self.writer.flush()?;
            self.buffered = false;
        }
        Ok(())
    }

    fn sync_log(&mut self) -> io::Result<()> {
        if self.unsynced > 0 {
            self.writer.get_ref().sync_data()?;
            self.unsynced = 0;
            self.unsynced_since = None;
            self.syncs += 1;
        }
        Ok(())
    }

    fn sync_due(&self) -> bool {
        match self.policy {
            SyncPolicy::EveryFlush => true,
            SyncPolicy::None => false,
            SyncPolicy::Batched {
                max_records,
                max_delay,
            } => {
                self.unsynced >= max_records
                    || max_delay.is_some_and(|(delay, clock)| {
                        self.unsynced_since
                            .is_some_and(|t| clock().saturating_duration_since(t) >= delay)
                    })
            }
        }
    }
}

impl Store for FileStore {
    fn recover(&mut self) -> Result<Recovered, StoreError> {
        self.usable()?;
        Ok(self.model.snapshot().clone())
    }

    fn identity(&mut self, identity: Identity) -> Result<(), StoreError> {
        self.append(
            IDENTITY,
            |b| identity_fields(b, &identity),
            &[],
            |s| s.identity(identity),
        )
    }

    fn sent(&mut self, message: &Stored) -> Result<(), StoreError> {
        self.append_message(SENT, message)
    }

    fn acknowledged(&mut self, below: Seq) -> Result<(), StoreError> {
        self.append(
            ACKNOWLEDGED,
            |b| put_uvar(b, below),
            &[],
            |s| s.acknowledged(below),
        )
    }

    fn arrived(&mut self, message: &Stored) -> Result<(), StoreError> {
        self.append_message(ARRIVED, message)
    }

    fn consumed(&mut self, seq: Seq) -> Result<(), StoreError> {
        self.append(CONSUMED, |b| put_uvar(b, seq), &[], |s| s.consumed(seq))
    }

    fn flush(&mut self) -> Result<(), StoreError> {
        self.usable()?;
        let due = self.unsynced > 0 && self.sync_due();
        self.push()
            .and_then(|()| if due { self.sync_log() } else { Ok(()) })
            .map_err(|e| self.fail(e))
    }

    fn clear(&mut self) -> Result<(), StoreError> {
        // Also the way out of a corrupt or failed log: replaced whole.
        self.rewrite(&Recovered::default())
            .map_err(|e| self.fail(e))?;
        self.model = MemoryStore::new();
        self.failed = None;
        Ok(())
    }
}

/// Syncs a directory, so that a file created or renamed in it stays so after a power loss.
fn sync_dir(dir: &Path) -> io::Result<()> {
    #[cfg(unix)]
    File::open(dir)?.sync_all()?;
    // Elsewhere a directory cannot be opened as a file; the rename is as durable as the platform
    // makes it.
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// Writes one framed record; returns its length.
fn write_record(w: &mut impl Write, kind: u8, fields: &[u8], payload: &[u8]) -> io::Result<u64> {
    let len = 1 + fields.len() + payload.len();
    let len = u32::try_from(len).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "a record above 4 GiB does not fit the store's format",
        )
    })?;
    let len_le = len.to_le_bytes();
    let mut crc = crc32fast::Hasher::new();
    crc.update(&len_le);
    crc.update(&[kind]);
    crc.update(fields);
    crc.update(payload);
    let mut head = [0; HEADER_LEN + 1];
    head[..4].copy_from_slice(&len_le);
    head[4..8].copy_from_slice(&crc.finalize().to_le_bytes());
    head[8] = kind;
    w.write_all(&head)?;
    w.write_all(fields)?;
    w.write_all(payload)?;
    Ok(HEADER_LEN as u64 + u64::from(len))
}

/// Writes `state` as records (base, identity, sent, held; each only if there is one); returns
/// their length.
fn write_snapshot(w: &mut impl Write, state: &Recovered) -> io::Result<u64> {
    let mut fields = Vec::new();
    let mut len = 0;
    if has_base(state) {
        base_fields(&mut fields, state);
        len += write_record(w, BASE, &fields, &[])?;
    }
    if let Some(identity) = &state.identity {
        fields.clear();
        identity_fields(&mut fields, identity);
        len += write_record(w, IDENTITY, &fields, &[])?;
    }
    let messages = (state.unacknowledged.iter().map(|m| (SENT, m)))
        .chain(state.unconsumed.iter().map(|m| (HELD, m)));
    for (kind, m) in messages {
        fields.clear();
        message_fields(&mut fields, m);
        len += write_record(w, kind, &fields, &m.payload)?;
    }
    Ok(len)
}

/// What [`write_snapshot`] would write for `state`, header included, without writing it.
fn snapshot_len(state: &Recovered) -> u64 {
    let record = |fields: usize| (HEADER_LEN + 1 + fields) as u64;
    let message = |m: &Stored| record(uvar_len(m.seq) + uvar_len(m.stream) + 1 + m.payload.len());
    let ranges: usize = (state.arrived_above.iter())
        .map(|r| uvar_len(r.start) + uvar_len(r.end))
        .sum();
    let base = uvar_len(state.next_seq)
        + uvar_len(state.watermark)
        + uvar_len(state.arrived_above.len() as u64)
        + ranges;
    MAGIC.len() as u64
        + if has_base(state) { record(base) } else { 0 }
        + state.identity.map_or(0, |_| record(32))
        + state.unacknowledged.iter().map(message).sum::<u64>()
        + state.unconsumed.iter().map(message).sum::<u64>()
}

/// Whether a snapshot needs a base record: not for counters at zero, where replay starts anyway
/// (so a cleared log is its magic alone).
fn has_base(state: &Recovered) -> bool {
    state.next_seq != 0 || state.watermark != 0 || !state.arrived_above.is_empty()
}

fn identity_fields(b: &mut Vec<u8>, identity: &Identity) {
    b.extend_from_slice(&identity.session.0.to_le_bytes());
    b.extend_from_slice(identity.token.as_bytes());
    b.extend_from_slice(&identity.epoch.to_le_bytes());
}

/// A message's fields before its payload.
fn message_fields(b: &mut Vec<u8>, m: &Stored) {
    put_uvar(b, m.seq);
    put_uvar(b, m.stream);
    b.push(u8::from(m.unordered));
}

fn base_fields(b: &mut Vec<u8>, state: &Recovered) {
    put_uvar(b, state.next_seq);
    put_uvar(b, state.watermark);
    put_uvar(b, state.arrived_above.len() as u64);
    for r in &state.arrived_above {
        put_uvar(b, r.start);
        put_uvar(b, r.end);
    }
}

/// Unsigned LEB128: seven bits a byte, low first, the high bit saying more follow.
fn put_uvar(b: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        b.push(v as u8 | 0x80);
        v >>= 7;
    }
    b.push(v as u8);
}

fn uvar_len(v: u64) -> usize {
    let bits = 64 - (v | 1).leading_zeros() as usize;
    bits.div_ceil(7)
}

/// The fields of one record, read front to back; `None` where they do not parse.
struct Fields<'a>(&'a [u8]);

impl Fields<'_> {
    fn uvar(&mut self) -> Option<u64> {
        let mut v = 0u64;
        for i in 0..10 {
            let b = *self.0.get(i)?;
            // The tenth byte carries the 64th bit only.
            if i == 9 && b > 1 {
                return None;
            }
            v |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                self.0 = &self.0[i + 1..];
                return Some(v);
            }
        }
        None
    }

    fn bytes<const N: usize>(&mut self) -> Option<[u8; N]> {
        let (head, rest) = self.0.split_first_chunk::<N>()?;
        self.0 = rest;
        Some(*head)
    }

    fn identity(&mut self) -> Option<Identity> {
        let session = SessionId(u64::from_le_bytes(self.bytes()?));
        let token = Token::from_bytes(self.bytes()?);
        let epoch = u64::from_le_bytes(self.bytes()?);
        Some(Identity {
            session,
            token,
            epoch,
        })
    }

    fn message(&mut self) -> Option<Stored> {
        let seq = self.uvar()?;
        let stream = self.uvar()?;
        let unordered = match self.bytes::<1>()? {
            [0] => false,
            [1] => true,
            _ => return None,
        };
        let payload = Bytes::copy_from_slice(core::mem::take(&mut self.0));
        Some(Stored {
            seq,
            stream,
            unordered,
            payload,
        })
    }

    fn base(&mut self, state: &mut Recovered) -> Option<()> {
        let next_seq = self.uvar()?;
        let watermark = self.uvar()?;
        let count = self.uvar()?;
        let mut ranges: Vec<Range<Seq>> = Vec::new();
        for _ in 0..count {
            let r = self.uvar()?..self.uvar()?;
            // Sorted, disjoint, not touching each other or the watermark: as the state keeps them.
            let after = ranges.last().map_or(watermark, |last| last.end);
            if r.start <= after || r.end <= r.start {
                return None;
            }
            ranges.push(r);
        }
        *state = Recovered {
            next_seq,
            watermark,
            arrived_above: ranges,
            ..Recovered::default()
        };
        Some(())
    }

    fn end(&self) -> Option<()> {
        self.0.is_empty().then_some(())
    }
}

/// What a log replays to.
struct Replay {
    model: MemoryStore,
    /// The length up to the end of the last valid record.
    valid_len: u64,
    corrupt: Option<String>,
}

fn replay(log: &[u8]) -> Replay {
    let mut model = MemoryStore::new();
    let corrupt = |what: String| Replay {
        model: MemoryStore::new(),
        valid_len: 0,
        corrupt: Some(what),
    };
    if log.len() < MAGIC.len() {
        if MAGIC.starts_with(log) {
            // New, or its creation was cut short.
            return Replay {
                model,
                valid_len: 0,
                corrupt: None,
            };
        }
        return corrupt("not a steadfast store log".to_string());
    }
    if log[..MAGIC.len()] != MAGIC {
        return corrupt("not a steadfast store log of this version".to_string());
    }
    let mut at = MAGIC.len();
    while at < log.len() {
        let Some((kind, fields)) = frame_at(log, at) else {
            // Cheap rejection first: this tries every offset.
            let valid = |q: usize| {
                log.get(q + HEADER_LEN)
                    .is_some_and(|k| (IDENTITY..=HELD).contains(k))
                    && frame_at(log, q).is_some()
            };
            if let Some(next) = (at + 1..log.len()).find(|&q| valid(q)) {
                return corrupt(format!(
                    "invalid record at byte {at}, followed by a valid one at byte {next}"
                ));
            }
            // Torn: the state is the one before it.
            break;
        };
        if apply(&mut model, kind, Fields(fields)).is_none() {
            return corrupt(format!(
                "record of type {kind} at byte {at} has a valid checksum but does not parse"
            ));
        }
        at += HEADER_LEN + 1 + fields.len();
    }
    Replay {
        model,
        valid_len: at as u64,
        corrupt: None,
    }
}

/// The record framed at `at`, if its frame is whole and its checksum right.
fn frame_at(log: &[u8], at: usize) -> Option<(u8, &[u8])> {
    let head = log.get(at..at + HEADER_LEN)?;
    let len_le: [u8; 4] = head[..4].try_into().ok()?;
    let crc = u32::from_le_bytes(head[4..].try_into().ok()?);
    let len = u32::from_le_bytes(len_le) as usize;
    let body = log.get(at + HEADER_LEN..(at + HEADER_LEN).checked_add(len)?)?;
    let (&kind, fields) = body.split_first()?;
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&len_le);
    hasher.update(body);
    (hasher.finalize() == crc).then_some((kind, fields))
}

/// Replays one record into the state; `None` if its fields do not parse.
fn apply(model: &mut MemoryStore, kind: u8, mut f: Fields<'_>) -> Option<()> {
    let result = match kind {
        IDENTITY => {
            let identity = f.identity()?;
            f.end()?;
            model.identity(identity)
        }
        SENT => model.sent(&f.message()?),
        ACKNOWLEDGED => {
            let below = f.uvar()?;
            f.end()?;
            model.acknowledged(below)
        }
        ARRIVED => model.arrived(&f.message()?),
        CONSUMED => {
            let seq = f.uvar()?;
            f.end()?;
            model.consumed(seq)
        }
        BASE => {
            f.base(&mut model.state)?;
            f.end()?;
            Ok(())
        }
        HELD => {
            // An arrival already counted in the base's ranges: only the message is kept.
            let m = f.message()?;
            let held = &mut model.state.unconsumed;
            if let Err(i) = held.binary_search_by_key(&m.seq, |h| h.seq) {
                held.insert(i, m);
            }
            Ok(())
        }
        _ => return None,
    };
    // The memory store never fails.
    result.ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leb128_round_trips_at_every_length() {
        for shift in 0..64 {
            for v in [1u64 << shift, (1u64 << shift) - 1, u64::MAX >> shift] {
                let mut b = Vec::new();
                put_uvar(&mut b, v);
                assert_eq!(b.len(), uvar_len(v), "length of {v}");
                let mut f = Fields(&b);
                assert_eq!(f.uvar(), Some(v));
                assert!(f.0.is_empty());
            }
        }
    }

    #[test]
    fn an_overlong_leb128_is_refused() {
        assert_eq!(Fields(&[0xff; 10]).uvar(), None);
        assert_eq!(Fields(&[0x80; 11]).uvar(), None);
    }

    #[test]
    fn the_snapshot_length_is_what_is_written() {
        let state = Recovered {
            identity: Some(Identity {
                session: SessionId(u64::MAX),
                token: Token::from_bytes([3; 16]),
                epoch: 9,
            }),
            next_seq: 300,
            unacknowledged: alloc::vec![Stored {
                seq: 299,
                stream: 1 << 40,
                unordered: true,
                payload: Bytes::from_static(b"hello"),
            }],
            watermark: 1000,
            arrived_above: alloc::vec![1001..1003, 70_000..70_001],
            unconsumed: alloc::vec![Stored {
                seq: 999,
                stream: 0,
                unordered: false,
                payload: Bytes::new(),
            }],
        };
        let identity_only = Recovered {
            identity: state.identity,
            ..Recovered::default()
        };
        for state in [state, identity_only, Recovered::default()] {
            let mut out = Vec::new();
            out.extend_from_slice(&MAGIC);
            let written = write_snapshot(&mut out, &state).unwrap();
            assert_eq!(MAGIC.len() as u64 + written, snapshot_len(&state));
            assert_eq!(out.len() as u64, snapshot_len(&state));
            let replayed = replay(&out);
            assert!(replayed.corrupt.is_none());
            assert_eq!(replayed.model.snapshot(), &state);
        }
    }
}
