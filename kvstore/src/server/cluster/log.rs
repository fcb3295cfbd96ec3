//! Raft's log made durable: entries, hard state and membership, one synced frame per raft
//! `Ready`, in front of raft-rs's in-memory storage that the raft state machine reads.
//!
//! The file is our write-ahead log format ([`Wal`]): a frame is CRC-checked, replay stops at
//! the first torn one. When the file has grown past twice what it held at its last rewrite,
//! the whole state is written to a new file that replaces it by rename, so a crash during the
//! rewrite leaves the old file whole.
//!
//! Payload: `flags: u8` (1: hard state, 2: conf state), then each present state as
//! `len: u32 | bytes`, then `count: u32` and each entry as `len: u32 | bytes` (raft's own
//! protobuf encoding).

use std::path::{Path, PathBuf};

use protobuf::Message as _;
use raft::eraftpb::{ConfState, Entry, HardState};
use raft::storage::MemStorage;

use crate::server::storage::StorageError;
use crate::server::wal::{WRAP_AT, Wal};

impl std::fmt::Debug for RaftLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RaftLog")
            .field("dir", &self.dir)
            .field("wal", &self.wal)
            .finish_non_exhaustive()
    }
}

const HARD_STATE: u8 = 1;
const CONF_STATE: u8 = 2;

/// The durable raft log and the in-memory view raft reads.
pub struct RaftLog {
    dir: PathBuf,
    wal: Wal,
    storage: MemStorage,
    /// Rewrite the file once it is past this size.
    rewrite_at: u64,
}

fn corrupt(detail: impl Into<String>) -> StorageError {
    StorageError::Corrupt {
        what: "raft log",
        detail: detail.into(),
    }
}

fn encode(entries: &[Entry], hs: Option<&HardState>, cs: Option<&ConfState>) -> Vec<u8> {
    fn put(out: &mut Vec<u8>, bytes: &[u8]) {
        out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
        out.extend_from_slice(bytes);
    }
    let flags =
        if hs.is_some() { HARD_STATE } else { 0 } | if cs.is_some() { CONF_STATE } else { 0 };
    let mut out = vec![flags];
    // Encoding a message raft built cannot fail (no required fields in proto3).
    if let Some(hs) = hs {
        put(&mut out, &hs.write_to_bytes().unwrap_or_default());
    }
    if let Some(cs) = cs {
        put(&mut out, &cs.write_to_bytes().unwrap_or_default());
    }
    out.extend_from_slice(&(entries.len() as u32).to_be_bytes());
    for entry in entries {
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

type Decoded = (Vec<Entry>, Option<HardState>, Option<ConfState>);

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
    let count = reader.u32()?;
    let mut entries = Vec::with_capacity(count.min(1 << 16));
    for _ in 0..count {
        entries.push(Entry::parse_from_bytes(reader.bytes()?).map_err(|e| parse("entry", e))?);
    }
    Ok((entries, hs, cs))
}

const LOG_FILE: &str = "raft.log";
const REWRITE_FILE: &str = "raft.log.new";

impl RaftLog {
    /// Opens (or creates) the log in `dir` and replays it into raft's in-memory storage.
    pub fn open(dir: &Path) -> Result<Self, StorageError> {
        let path = dir.join(LOG_FILE);
        let (wal, frames) = Wal::open(&path)?;
        let storage = MemStorage::new();
        {
            for frame in frames {
                let (entries, hs, cs) = decode(&frame.payload)?;
                let last = raft::Storage::last_index(&storage)
                    .map_err(|e| corrupt(format!("last index: {e}")))?;
                let mut core = storage.wl();
                if let Some(first) = entries.first() {
                    if first.index == 0 || first.index > last + 1 {
                        return Err(corrupt(format!(
                            "entry {} follows entry {last}: a gap in the log",
                            first.index
                        )));
                    }
                    core.append(&entries)
                        .map_err(|e| corrupt(format!("entries from {}: {e}", first.index)))?;
                }
                if let Some(cs) = cs {
                    core.set_conf_state(cs);
                }
                if let Some(hs) = hs {
                    core.set_hardstate(hs);
                }
            }
        }
        let rewrite_at = WRAP_AT.max(wal.end() * 2);
        Ok(Self {
            dir: dir.to_path_buf(),
            wal,
            storage,
            rewrite_at,
        })
    }

    /// What raft reads (shared with the `RawNode`).
    pub fn storage(&self) -> MemStorage {
        self.storage.clone()
    }

    /// Whether the log has a membership, i.e. the member was started before.
    pub fn initialized(&self) -> bool {
        raft::Storage::initial_state(&self.storage)
            .is_ok_and(|state| !state.conf_state.voters.is_empty())
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
        let payload = encode(entries, hs, cs);
        if self.wal.end() + payload.len() as u64 > self.rewrite_at {
            self.rewrite()?;
        }
        self.wal.append(&payload)?;
        let mut core = self.storage.wl();
        if !entries.is_empty() {
            core.append(entries)
                .map_err(|e| corrupt(format!("appending entries: {e}")))?;
        }
        if let Some(cs) = cs {
            core.set_conf_state(cs.clone());
        }
        if let Some(hs) = hs {
            core.set_hardstate(hs.clone());
        }
        Ok(())
    }

    /// Writes the whole state to a new file and puts it in place of the log.
    fn rewrite(&mut self) -> Result<(), StorageError> {
        let (entries, hs, cs) = {
            let read = |e: raft::Error| corrupt(format!("reading the log: {e}"));
            let first = raft::Storage::first_index(&self.storage).map_err(read)?;
            let last = raft::Storage::last_index(&self.storage).map_err(read)?;
            let state = raft::Storage::initial_state(&self.storage).map_err(read)?;
            let entries = if last >= first {
                raft::Storage::entries(
                    &self.storage,
                    first,
                    last + 1,
                    None,
                    raft::GetEntriesContext::empty(false),
                )
                .map_err(|e| corrupt(format!("reading entries {first}..={last}: {e}")))?
            } else {
                Vec::new()
            };
            (entries, state.hard_state, state.conf_state)
        };
        let new_path = self.dir.join(REWRITE_FILE);
        let _ = std::fs::remove_file(&new_path);
        let (mut wal, _) = Wal::open(&new_path)?;
        wal.append(&encode(&entries, Some(&hs), Some(&cs)))?;
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
        assert_eq!(raft::Storage::last_index(&log.storage).unwrap(), 2);
        let state = raft::Storage::initial_state(&log.storage).unwrap();
        assert_eq!(state.hard_state, hard_state(2, 2));
        assert_eq!(state.conf_state.voters, vec![1, 2, 3]);
        let read = raft::Storage::entries(
            &log.storage,
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
        assert_eq!(raft::Storage::last_index(&log.storage).unwrap(), 6);
        let state = raft::Storage::initial_state(&log.storage).unwrap();
        assert_eq!(state.hard_state.commit, 5);
    }
}
