//! A write-ahead log: what makes an acknowledged write durable with one `fdatasync`.
//!
//! Each committed batch is appended as one frame and synced before it is acknowledged; the
//! engine behind it (sled) is then updated without waiting for its own flush. The file is
//! preallocated with zeros in chunks, so a sync persists data only, not a changed file size.
//! When the file is full, the engine is flushed and synced (a checkpoint) and writing starts
//! again at offset 0: frames carry consecutive sequence numbers and a CRC, so replay stops at
//! the first torn frame or at the first leftover of the previous pass.
//!
//! Frame: `len: u32 | crc32(seq ‖ payload): u32 | seq: u64 | payload[len]`, big-endian.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::storage::StorageError;

const FRAME_HEADER: usize = 4 + 4 + 8;
/// Zeros are written this far ahead of the write offset.
const PREALLOCATE_CHUNK: u64 = 4 << 20;
/// Past this size the log wraps around after a checkpoint.
pub const WRAP_AT: u64 = 64 << 20;

/// An open log, positioned after its last valid frame.
#[derive(Debug)]
pub struct Wal {
    path: PathBuf,
    file: File,
    offset: u64,
    allocated: u64,
    next_seq: u64,
}

/// A frame found at open.
#[derive(Debug)]
pub struct Frame {
    pub seq: u64,
    pub payload: Vec<u8>,
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> StorageError + '_ {
    move |source| StorageError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl Wal {
    /// Opens (or creates) the log and returns every valid frame in order.
    pub fn open(path: &Path) -> Result<(Self, Vec<Frame>), StorageError> {
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(io(path))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).map_err(io(path))?;
        let mut frames = Vec::new();
        let mut at = 0usize;
        while let Some((frame, len)) = decode_frame(&bytes[at..]) {
            if frames
                .last()
                .is_some_and(|prev: &Frame| frame.seq != prev.seq + 1)
            {
                break;
            }
            frames.push(frame);
            at += len;
        }
        let allocated = bytes.len() as u64;
        let next_seq = frames.last().map_or(1, |f| f.seq + 1);
        file.seek(SeekFrom::Start(at as u64)).map_err(io(path))?;
        let wal = Self {
            path: path.to_path_buf(),
            file,
            offset: at as u64,
            allocated,
            next_seq,
        };
        Ok((wal, frames))
    }

    /// The sequence number the next frame gets.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Where the next frame goes: the bytes of frames written since the last wrap.
    pub fn end(&self) -> u64 {
        self.offset
    }

    /// Whether appending `payload_len` bytes needs a checkpoint and a wrap first.
    pub fn must_wrap(&self, payload_len: usize) -> bool {
        self.offset > 0 && self.offset + (FRAME_HEADER + payload_len) as u64 > WRAP_AT
    }

    /// Starts writing from the beginning again; only after the engine is durable up to here.
    pub fn wrap(&mut self) {
        self.offset = 0;
    }

    /// Appends one frame and syncs it; returns its sequence number.
    pub fn append(&mut self, payload: &[u8]) -> Result<u64, StorageError> {
        let seq = self.next_seq;
        let mut frame = Vec::with_capacity(FRAME_HEADER + payload.len());
        let len = u32::try_from(payload.len()).map_err(|_| StorageError::Corrupt {
            what: "log frame",
            detail: format!("{} bytes do not fit one frame", payload.len()),
        })?;
        let mut crc = crc32fast::Hasher::new();
        crc.update(&seq.to_be_bytes());
        crc.update(payload);
        frame.extend_from_slice(&len.to_be_bytes());
        frame.extend_from_slice(&crc.finalize().to_be_bytes());
        frame.extend_from_slice(&seq.to_be_bytes());
        frame.extend_from_slice(payload);
        let end = self.offset + frame.len() as u64;
        if end > self.allocated {
            self.preallocate(end)?;
        }
        self.file
            .write_all_at(&frame, self.offset)
            .map_err(io(&self.path))?;
        self.file.sync_data().map_err(io(&self.path))?;
        self.offset = end;
        self.next_seq += 1;
        Ok(seq)
    }

    fn preallocate(&mut self, end: u64) -> Result<(), StorageError> {
        let target = (end + PREALLOCATE_CHUNK).max(self.allocated);
        let zeros = vec![0u8; 1 << 20];
        let mut at = self.allocated;
        while at < target {
            let n = (target - at).min(zeros.len() as u64) as usize;
            self.file
                .write_all_at(&zeros[..n], at)
                .map_err(io(&self.path))?;
            at += n as u64;
        }
        self.file.flush().map_err(io(&self.path))?;
        self.allocated = target;
        Ok(())
    }
}

/// A frame and its encoded length, or `None` at zeros, a torn write or a bad checksum.
fn decode_frame(bytes: &[u8]) -> Option<(Frame, usize)> {
    let header = bytes.get(..FRAME_HEADER)?;
    let len = u32::from_be_bytes(header[..4].try_into().ok()?) as usize;
    let crc = u32::from_be_bytes(header[4..8].try_into().ok()?);
    let seq_bytes = &header[8..16];
    if len == 0 && crc == 0 {
        return None;
    }
    let payload = bytes.get(FRAME_HEADER..FRAME_HEADER + len)?;
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(seq_bytes);
    hasher.update(payload);
    if hasher.finalize() != crc {
        return None;
    }
    let seq = u64::from_be_bytes(seq_bytes.try_into().ok()?);
    Some((
        Frame {
            seq,
            payload: payload.to_vec(),
        },
        FRAME_HEADER + len,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_survive_reopen_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wal");
        {
            let (mut wal, frames) = Wal::open(&path).unwrap();
            assert!(frames.is_empty());
            assert_eq!(wal.append(b"one").unwrap(), 1);
            assert_eq!(wal.append(b"").unwrap(), 2);
            assert_eq!(wal.append(b"three").unwrap(), 3);
        }
        let (wal, frames) = Wal::open(&path).unwrap();
        let payloads: Vec<&[u8]> = frames.iter().map(|f| f.payload.as_slice()).collect();
        assert_eq!(payloads, [&b"one"[..], b"", b"three"]);
        assert_eq!(wal.next_seq(), 4);
    }

    #[test]
    fn a_torn_tail_ends_replay_and_is_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wal");
        let (mut wal, _) = Wal::open(&path).unwrap();
        wal.append(b"kept").unwrap();
        let torn_at = wal.offset;
        wal.append(b"torn frame").unwrap();
        drop(wal);
        // Damage the second frame's payload, as a crash mid-write would.
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        file.write_all_at(b"X", torn_at + FRAME_HEADER as u64 + 2)
            .unwrap();
        let (mut wal, frames) = Wal::open(&path).unwrap();
        assert_eq!(frames.len(), 1);
        assert_eq!(wal.append(b"next").unwrap(), 2);
        let (_, frames) = Wal::open(&path).unwrap();
        assert_eq!(frames.len(), 2);
        assert_eq!(frames[1].payload, b"next");
    }

    #[test]
    fn after_a_wrap_leftovers_of_the_previous_pass_are_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wal");
        let (mut wal, _) = Wal::open(&path).unwrap();
        for i in 0..5u8 {
            wal.append(&[i; 10]).unwrap();
        }
        wal.wrap();
        wal.append(b"new").unwrap();
        drop(wal);
        let (wal, frames) = Wal::open(&path).unwrap();
        assert_eq!(frames.len(), 1);
        assert_eq!(frames[0].seq, 6);
        assert_eq!(wal.next_seq(), 7);
    }
}
