//! Raft's log made durable: entries, hard state, membership and where the log starts (after
//! a compaction or an installed snapshot), one synced frame per change, in front of the
//! in-memory view the raft state machine reads through [`raft::Storage`].
//!
//! The file is our write-ahead log format ([`Wal`]): a frame is CRC-checked, replay stops at
//! the first torn one. When the file has grown past twice what it held at its last rewrite,
//! the whole state is written to a new file that replaces it by rename, so a crash during the
//! rewrite leaves the old file whole.
//!
//! Payload: `flags: u8`, then each present part as `len: u32 | bytes` in this order: hard
//! state (1), conf state (2), snapshot metadata (4: the log was compacted through it, later
//! entries stay; 8: a snapshot was installed, the whole log goes), then `count: u32` and each
//! entry as `len: u32 | bytes` (raft's own protobuf encoding).

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use protobuf::Message as _;
use raft::eraftpb::{ConfState, Entry, HardState, Snapshot, SnapshotMetadata};
use raft::{GetEntriesContext, RaftState};

use crate::server::storage::StorageError;
use crate::server::wal::{WRAP_AT, Wal};

const HARD_STATE: u8 = 1;
const CONF_STATE: u8 = 2;
const COMPACTED: u8 = 4;
const INSTALLED: u8 = 8;

fn corrupt(detail: impl Into<String>) -> StorageError {
    StorageError::Corrupt {
        what: "raft log",
        detail: detail.into(),
    }
}

/// What raft sees: the retained entries and the states, shared between the raft thread (which
/// changes them through [`RaftLog`]) and raft-rs (which reads them).
#[derive(Default)]
struct Core {
    hard: HardState,
    conf: ConfState,
    /// The last entry no longer held (compacted or inside an installed snapshot): index, term.
    base: (u64, u64),
    /// `entries[0].index == base.0 + 1`.
    entries: Vec<Entry>,
    /// The newest image built for members that fell behind `base`.
    snapshot: Option<Snapshot>,
    /// raft asked for a snapshot newer than `snapshot`.
    wanted: bool,
}

impl Core {
    fn last_index(&self) -> u64 {
        self.entries.last().map_or(self.base.0, |e| e.index)
    }

    fn append(&mut self, entries: &[Entry]) -> Result<(), StorageError> {
        let entries: Vec<&Entry> = entries.iter().filter(|e| e.index > self.base.0).collect();
        let Some(first) = entries.first() else {
            return Ok(());
        };
        if first.index > self.last_index() + 1 {
            return Err(corrupt(format!(
                "entry {} follows entry {}: a gap in the log",
                first.index,
                self.last_index()
            )));
        }
        // A new leader's entries replace the conflicting suffix.
        let keep = (first.index - self.base.0 - 1) as usize;
        self.entries.truncate(keep);
        self.entries.extend(entries.into_iter().cloned());
        Ok(())
    }

    /// The log now starts after `index`; with `all`, nothing after it is kept either.
    fn rebase(&mut self, index: u64, term: u64, all: bool) {
        if all {
            self.entries.clear();
        } else {
            let drop = index.saturating_sub(self.base.0) as usize;
            self.entries.drain(..drop.min(self.entries.len()));
        }
        self.base = (index, term);
        if self
            .snapshot
            .as_ref()
            .is_some_and(|s| s.get_metadata().index < index)
        {
            self.snapshot = None;
        }
    }
}

/// The view of the log raft-rs reads; cheap to clone.
#[derive(Clone, Default)]
pub struct LogStore(Arc<RwLock<Core>>);

impl std::fmt::Debug for LogStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let core = self.read();
        f.debug_struct("LogStore")
            .field("base", &core.base)
            .field("last", &core.last_index())
            .finish_non_exhaustive()
    }
}

impl LogStore {
    fn read(&self) -> RwLockReadGuard<'_, Core> {
        self.0.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Core> {
        self.0.write().unwrap_or_else(|e| e.into_inner())
    }
}

fn unavailable(error: raft::StorageError) -> raft::Error {
    raft::Error::Store(error)
}

impl raft::Storage for LogStore {
    fn initial_state(&self) -> raft::Result<RaftState> {
        let core = self.read();
        Ok(RaftState::new(core.hard.clone(), core.conf.clone()))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        let core = self.read();
        if low <= core.base.0 {
            return Err(unavailable(raft::StorageError::Compacted));
        }
        if high > core.last_index() + 1 || low > high {
            return Err(unavailable(raft::StorageError::Unavailable));
        }
        let from = (low - core.base.0 - 1) as usize;
        let to = (high - core.base.0 - 1) as usize;
        let mut entries = core.entries[from..to].to_vec();
        raft::util::limit_size(&mut entries, max_size.into());
        Ok(entries)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        let core = self.read();
        if idx == core.base.0 {
            return Ok(core.base.1);
        }
        if idx < core.base.0 {
            return Err(unavailable(raft::StorageError::Compacted));
        }
        if idx > core.last_index() {
            return Err(unavailable(raft::StorageError::Unavailable));
        }
        Ok(core.entries[(idx - core.base.0 - 1) as usize].term)
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.read().base.0 + 1)
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.read().last_index())
    }

    /// The image built last, if it still joins the log; otherwise one is asked for (the raft
    /// thread builds it) and raft tries again later.
    fn snapshot(&self, request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        let mut core = self.write();
        let floor = request_index.max(core.base.0);
        match &core.snapshot {
            Some(snapshot) if snapshot.get_metadata().index >= floor => Ok(snapshot.clone()),
            _ => {
                core.wanted = true;
                Err(unavailable(
                    raft::StorageError::SnapshotTemporarilyUnavailable,
                ))
            }
        }
    }
}

/// The durable raft log.
pub struct RaftLog {
    dir: PathBuf,
    wal: Wal,
    store: LogStore,
    /// Rewrite the file once it is past this size.
    rewrite_at: u64,
}

impl std::fmt::Debug for RaftLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RaftLog")
            .field("dir", &self.dir)
            .field("store", &self.store)
            .finish_non_exhaustive()
    }
}

/// One change to the log, as one frame.
#[derive(Default)]
struct Change<'a> {
    entries: &'a [Entry],
    hs: Option<&'a HardState>,
    cs: Option<&'a ConfState>,
    /// With [`COMPACTED`] or [`INSTALLED`].
    base: Option<(u8, &'a SnapshotMetadata)>,
}

fn encode(change: &Change<'_>) -> Vec<u8> {
    fn put(out: &mut Vec<u8>, bytes: &[u8]) {
        out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
        out.extend_from_slice(bytes);
    }
    let mut flags = 0;
    if change.hs.is_some() {
        flags |= HARD_STATE;
    }
    if change.cs.is_some() {
        flags |= CONF_STATE;
    }
    if let Some((kind, _)) = change.base {
        flags |= kind;
    }
    let mut out = vec![flags];
    // Encoding a message raft built cannot fail (no required fields in proto3).
    if let Some(hs) = change.hs {
        put(&mut out, &hs.write_to_bytes().unwrap_or_default());
    }
    if let Some(cs) = change.cs {
        put(&mut out, &cs.write_to_bytes().unwrap_or_default());
    }
    if let Some((_, meta)) = change.base {
        put(&mut out, &meta.write_to_bytes().unwrap_or_default());
    }
    out.extend_from_slice(&(change.entries.len() as u32).to_be_bytes());
    for entry in change.entries {
        put(&mut out, &entry.write_to_bytes().unwrap_or_default());
    }
    out
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn u32(&mut self) -> Result<usize, StorageError> {
        let (head, rest) = self
            .0
            .split_first_chunk::<4>()
            .ok_or_else(|| corrupt("frame ends inside a length"))?;
        self.0 = rest;
        Ok(u32::from_be_bytes(*head) as usize)
    }

    fn bytes(&mut self) -> Result<&'a [u8], StorageError> {
        let len = self.u32()?;
        if self.0.len() < len {
            return Err(corrupt("frame ends inside a record"));
        }
        let (head, rest) = self.0.split_at(len);
        self.0 = rest;
        Ok(head)
    }
}

/// A decoded frame.
struct Decoded {
    entries: Vec<Entry>,
    hs: Option<HardState>,
    cs: Option<ConfState>,
    base: Option<(u8, SnapshotMetadata)>,
}

fn decode(payload: &[u8]) -> Result<Decoded, StorageError> {
    let (&flags, rest) = payload
        .split_first()
        .ok_or_else(|| corrupt("empty frame"))?;
    let mut reader = Reader(rest);
    let parse = |what: &str, e: protobuf::ProtobufError| corrupt(format!("{what}: {e}"));
    let hs = (flags & HARD_STATE != 0)
        .then(|| HardState::parse_from_bytes(reader.bytes()?).map_err(|e| parse("hard state", e)))
        .transpose()?;
    let cs = (flags & CONF_STATE != 0)
        .then(|| ConfState::parse_from_bytes(reader.bytes()?).map_err(|e| parse("conf state", e)))
        .transpose()?;
    let kind = flags & (COMPACTED | INSTALLED);
    let base = (kind != 0)
        .then(|| {
            SnapshotMetadata::parse_from_bytes(reader.bytes()?)
                .map(|meta| (kind, meta))
                .map_err(|e| parse("log start", e))
        })
        .transpose()?;
    let count = reader.u32()?;
    let mut entries = Vec::with_capacity(count.min(1 << 16));
    for _ in 0..count {
        entries.push(Entry::parse_from_bytes(reader.bytes()?).map_err(|e| parse("entry", e))?);
    }
    Ok(Decoded {
        entries,
        hs,
        cs,
        base,
    })
}

/// Applies one frame's change to the in-memory view.
fn apply(core: &mut Core, change: Decoded) -> Result<(), StorageError> {
    if let Some((kind, meta)) = change.base {
        core.rebase(meta.index, meta.term, kind == INSTALLED);
        if kind == INSTALLED {
            core.conf = meta.get_conf_state().clone();
            core.hard.commit = core.hard.commit.max(meta.index);
            core.hard.term = core.hard.term.max(meta.term);
        }
    }
    core.append(&change.entries)?;
    if let Some(cs) = change.cs {
        core.conf = cs;
    }
    if let Some(hs) = change.hs {
        core.hard = hs;
    }
    Ok(())
}

const LOG_FILE: &str = "raft.log";
const REWRITE_FILE: &str = "raft.log.new";

impl RaftLog {
    /// Opens (or creates) the log in `dir` and replays it.
    pub fn open(dir: &Path) -> Result<Self, StorageError> {
        let path = dir.join(LOG_FILE);
        let (wal, frames) = Wal::open(&path)?;
        let store = LogStore::default();
        {
            let mut core = store.write();
            for frame in frames {
                apply(&mut core, decode(&frame.payload)?)?;
            }
        }
        let rewrite_at = WRAP_AT.max(wal.end() * 2);
        Ok(Self {
            dir: dir.to_path_buf(),
            wal,
            store,
            rewrite_at,
        })
    }

    /// What raft reads (shared with the `RawNode`).
    pub fn store(&self) -> LogStore {
        self.store.clone()
    }

    /// Whether the log has a membership, i.e. the member was started before.
    pub fn initialized(&self) -> bool {
        !self.store.read().conf.voters.is_empty()
    }

    /// The last index the log no longer holds: the state machine must be at least there.
    pub fn base(&self) -> u64 {
        self.store.read().base.0
    }

    /// How many entries the log holds.
    pub fn len(&self) -> u64 {
        self.store.read().entries.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn term(&self, index: u64) -> Option<u64> {
        raft::Storage::term(&self.store, index).ok()
    }

    /// Whether raft asked for a snapshot the log does not have.
    pub fn snapshot_wanted(&self) -> bool {
        self.store.read().wanted
    }

    /// Keeps a built image for raft to send.
    pub fn set_snapshot(&self, snapshot: Snapshot) {
        let mut core = self.store.write();
        core.snapshot = Some(snapshot);
        core.wanted = false;
    }

    pub fn conf_state(&self) -> ConfState {
        self.store.read().conf.clone()
    }

    fn write(&mut self, change: &Change<'_>) -> Result<(), StorageError> {
        let payload = encode(change);
        if self.wal.end() + payload.len() as u64 > self.rewrite_at {
            self.rewrite()?;
        }
        self.wal.append(&payload).map(drop)
    }

    /// Makes raft's new entries and states durable (one sync), then shows them to raft.
    pub fn persist(
        &mut self,
        entries: &[Entry],
        hs: Option<&HardState>,
        cs: Option<&ConfState>,
    ) -> Result<(), StorageError> {
        if entries.is_empty() && hs.is_none() && cs.is_none() {
            return Ok(());
        }
        self.write(&Change {
            entries,
            hs,
            cs,
            base: None,
        })?;
        let mut core = self.store.write();
        core.append(entries)?;
        if let Some(cs) = cs {
            core.conf = cs.clone();
        }
        if let Some(hs) = hs {
            core.hard = hs.clone();
        }
        Ok(())
    }

    /// Drops the entries up to `index` (the state machine holds them durably).
    pub fn compact(&mut self, index: u64) -> Result<(), StorageError> {
        let Some(term) = self.term(index).filter(|_| index > self.base()) else {
            return Ok(());
        };
        let meta = SnapshotMetadata {
            index,
            term,
            ..Default::default()
        };
        self.write(&Change {
            base: Some((COMPACTED, &meta)),
            ..Change::default()
        })?;
        self.store.write().rebase(index, term, false);
        Ok(())
    }

    /// Records an installed snapshot: the log starts after it, with its membership.
    pub fn install(&mut self, meta: &SnapshotMetadata) -> Result<(), StorageError> {
        self.write(&Change {
            base: Some((INSTALLED, meta)),
            ..Change::default()
        })?;
        let mut core = self.store.write();
        core.rebase(meta.index, meta.term, true);
        core.conf = meta.get_conf_state().clone();
        core.hard.commit = core.hard.commit.max(meta.index);
        core.hard.term = core.hard.term.max(meta.term);
        Ok(())
    }

    /// Writes the whole state to a new file and puts it in place of the log.
    fn rewrite(&mut self) -> Result<(), StorageError> {
        let (entries, hs, cs, base) = {
            let core = self.store.read();
            let base = SnapshotMetadata {
                index: core.base.0,
                term: core.base.1,
                ..Default::default()
            };
            (
                core.entries.clone(),
                core.hard.clone(),
                core.conf.clone(),
                base,
            )
        };
        let new_path = self.dir.join(REWRITE_FILE);
        let _ = std::fs::remove_file(&new_path);
        let (mut wal, _) = Wal::open(&new_path)?;
        wal.append(&encode(&Change {
            entries: &entries,
            hs: Some(&hs),
            cs: Some(&cs),
            base: Some((COMPACTED, &base)),
        }))?;
        let io = |source| StorageError::Io {
            path: new_path.clone(),
            source,
        };
        std::fs::rename(&new_path, self.dir.join(LOG_FILE)).map_err(io)?;
        std::fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io)?;
        self.rewrite_at = WRAP_AT.max(wal.end() * 2);
        self.wal = wal;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(index: u64, term: u64, data: &[u8]) -> Entry {
        Entry {
            index,
            term,
            data: data.to_vec().into(),
            ..Default::default()
        }
    }

    fn hard_state(term: u64, commit: u64) -> HardState {
        HardState {
            term,
            commit,
            ..Default::default()
        }
    }

    #[test]
    fn entries_states_and_overwritten_suffixes_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut log = RaftLog::open(dir.path()).unwrap();
            assert!(!log.initialized());
            let cs = ConfState {
                voters: vec![1, 2, 3],
                ..Default::default()
            };
            log.persist(&[], None, Some(&cs)).unwrap();
            let entries = [entry(1, 1, b"a"), entry(2, 1, b"b"), entry(3, 1, b"c")];
            log.persist(&entries, Some(&hard_state(1, 1)), None)
                .unwrap();
            // A new leader overwrites the uncommitted suffix.
            log.persist(&[entry(2, 2, b"B")], Some(&hard_state(2, 2)), None)
                .unwrap();
        }
        let log = RaftLog::open(dir.path()).unwrap();
        assert!(log.initialized());
        assert_eq!(raft::Storage::last_index(&log.store).unwrap(), 2);
        let state = raft::Storage::initial_state(&log.store).unwrap();
        assert_eq!(state.hard_state, hard_state(2, 2));
        assert_eq!(state.conf_state.voters, vec![1, 2, 3]);
        let read = raft::Storage::entries(
            &log.store,
            1,
            3,
            None,
            raft::GetEntriesContext::empty(false),
        )
        .unwrap();
        assert_eq!(read[1].data.as_ref(), b"B");
    }

    #[test]
    fn a_rewrite_keeps_everything_and_the_log_goes_on_after_it() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut log = RaftLog::open(dir.path()).unwrap();
            for i in 1..=5 {
                log.persist(&[entry(i, 1, &[i as u8; 8])], Some(&hard_state(1, i)), None)
                    .unwrap();
            }
            log.rewrite().unwrap();
            log.persist(&[entry(6, 1, b"after")], None, None).unwrap();
        }
        let log = RaftLog::open(dir.path()).unwrap();
        assert_eq!(raft::Storage::last_index(&log.store).unwrap(), 6);
        let state = raft::Storage::initial_state(&log.store).unwrap();
        assert_eq!(state.hard_state.commit, 5);
    }

    #[test]
    fn compaction_and_installed_snapshots_move_the_start_durably() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut log = RaftLog::open(dir.path()).unwrap();
            let entries: Vec<Entry> = (1..=10).map(|i| entry(i, 1, b"x")).collect();
            log.persist(&entries, Some(&hard_state(1, 10)), None)
                .unwrap();
            log.compact(6).unwrap();
            assert_eq!(log.base(), 6);
            assert_eq!(log.len(), 4);
            let store = log.store();
            assert!(
                raft::Storage::entries(&store, 5, 7, None, GetEntriesContext::empty(false))
                    .is_err()
            );
            assert_eq!(raft::Storage::term(&store, 6).unwrap(), 1);
            // Raft asks for a snapshot: none yet, one is wanted.
            assert!(raft::Storage::snapshot(&store, 0, 2).is_err());
            assert!(log.snapshot_wanted());
        }
        {
            let log = RaftLog::open(dir.path()).unwrap();
            assert_eq!((log.base(), log.len()), (6, 4));
        }
        {
            let mut log = RaftLog::open(dir.path()).unwrap();
            let meta = SnapshotMetadata {
                index: 20,
                term: 3,
                conf_state: Some(ConfState {
                    voters: vec![1, 2, 3],
                    ..Default::default()
                })
                .into(),
                ..Default::default()
            };
            log.install(&meta).unwrap();
            log.persist(&[entry(21, 3, b"after")], None, None).unwrap();
        }
        let log = RaftLog::open(dir.path()).unwrap();
        assert_eq!((log.base(), log.len()), (20, 1));
        assert_eq!(log.conf_state().voters, vec![1, 2, 3]);
        let state = raft::Storage::initial_state(&log.store).unwrap();
        assert_eq!(state.hard_state.commit, 20);
    }
}
