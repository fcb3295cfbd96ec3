//! Durable storage for the embedded store.
//!
//! The MVCC layer above keeps its key index in memory and asks storage only for what memory does
//! not hold: historical records, the replay of a revision range for watchers, and the durable
//! commit of each applied batch. That narrow surface is the seam where a replicated log (raft)
//! slots in later: the applier hands it a batch, and the batch is durable when `commit` returns.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, RwLock, RwLockReadGuard};

use thiserror::Error;

use super::wal::Wal;

/// A revision as etcd defines it: `main` is the store-wide revision a write produced, `sub`
/// orders the changes inside one write (the ops of one txn share `main`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Revision {
    pub main: i64,
    pub sub: i64,
}

impl Revision {
    pub fn new(main: i64, sub: i64) -> Self {
        Self { main, sub }
    }

    fn to_bytes(self) -> [u8; 16] {
        let mut out = [0u8; 16];
        out[..8].copy_from_slice(&(self.main as u64).to_be_bytes());
        out[8..].copy_from_slice(&(self.sub as u64).to_be_bytes());
        out
    }

    fn from_bytes(bytes: &[u8]) -> Result<Self, StorageError> {
        let raw: [u8; 16] = bytes.try_into().map_err(|_| StorageError::Corrupt {
            what: "revision key",
            detail: format!("expected 16 bytes, found {}", bytes.len()),
        })?;
        let main = u64::from_be_bytes(raw[..8].try_into().expect("8 bytes")) as i64;
        let sub = u64::from_be_bytes(raw[8..].try_into().expect("8 bytes")) as i64;
        Ok(Self { main, sub })
    }
}

/// One change to one key, as stored under its revision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub key: Vec<u8>,
    pub value: Vec<u8>,
    pub create_revision: i64,
    pub version: i64,
    pub lease: i64,
    /// A deletion: etcd's tombstone, which ends the key's current generation.
    pub tombstone: bool,
}

const RECORD_FORMAT: u8 = 1;
const FLAG_TOMBSTONE: u8 = 1;
const RECORD_HEADER: usize = 1 + 1 + 8 + 8 + 8 + 4;

impl Record {
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(RECORD_HEADER + self.key.len() + self.value.len());
        out.push(RECORD_FORMAT);
        out.push(if self.tombstone { FLAG_TOMBSTONE } else { 0 });
        out.extend_from_slice(&self.create_revision.to_be_bytes());
        out.extend_from_slice(&self.version.to_be_bytes());
        out.extend_from_slice(&self.lease.to_be_bytes());
        out.extend_from_slice(&(self.key.len() as u32).to_be_bytes());
        out.extend_from_slice(&self.key);
        out.extend_from_slice(&self.value);
        out
    }

    fn decode(bytes: &[u8]) -> Result<Self, StorageError> {
        let corrupt = |detail: String| StorageError::Corrupt {
            what: "record",
            detail,
        };
        if bytes.len() < RECORD_HEADER {
            return Err(corrupt(format!(
                "{} bytes is shorter than a header",
                bytes.len()
            )));
        }
        if bytes[0] != RECORD_FORMAT {
            return Err(corrupt(format!("unknown record format {}", bytes[0])));
        }
        let int = |at: usize| i64::from_be_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
        let key_len = u32::from_be_bytes(bytes[26..30].try_into().expect("4 bytes")) as usize;
        let rest = &bytes[RECORD_HEADER..];
        if rest.len() < key_len {
            return Err(corrupt(format!(
                "key length {key_len} exceeds the {} bytes left",
                rest.len()
            )));
        }
        Ok(Self {
            tombstone: bytes[1] & FLAG_TOMBSTONE != 0,
            create_revision: int(2),
            version: int(10),
            lease: int(18),
            key: rest[..key_len].to_vec(),
            value: rest[key_len..].to_vec(),
        })
    }
}

/// Store-wide facts kept beside the records.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Meta {
    pub cluster_id: u64,
    pub member_id: u64,
    /// The newest revision; kept explicitly because compaction may remove its record.
    pub current_revision: i64,
    pub compact_revision: i64,
    /// The last raft log entry applied (0 for a single member without raft): stored with the
    /// changes it made, so a restart replays exactly the entries after it.
    pub applied_index: u64,
    /// Raised alarms, sorted: replicated through the log like any write, so every member
    /// refuses the same requests while one stands.
    pub alarms: Vec<Alarm>,
}

/// An alarm against a member, as etcd's `AlarmMember` (`kind` is etcd's `AlarmType`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Alarm {
    pub member: u64,
    pub kind: i32,
}

/// Everything one applied batch changes, made durable at once.
#[derive(Debug, Default)]
pub struct Batch {
    pub records: Vec<(Revision, Record)>,
    pub removed: Vec<Revision>,
    pub leases_granted: Vec<(i64, i64)>,
    pub leases_revoked: Vec<i64>,
    pub meta: Option<Meta>,
}

impl Batch {
    /// Records a grant; a revocation of the same id earlier in this batch is superseded, since
    /// storage applies grants before revocations.
    pub fn grant_lease(&mut self, id: i64, ttl: i64) {
        self.leases_revoked.retain(|&r| r != id);
        self.leases_granted.push((id, ttl));
    }

    /// Records a revocation; a grant of the same id earlier in this batch is dropped.
    pub fn revoke_lease(&mut self, id: i64) {
        self.leases_granted.retain(|&(g, _)| g != id);
        self.leases_revoked.push(id);
    }

    /// Appends the changes of a batch applied after this one, so both commit as one.
    pub fn append(&mut self, later: Batch) {
        self.records.extend(later.records);
        self.removed.extend(later.removed);
        for (id, ttl) in later.leases_granted {
            self.grant_lease(id, ttl);
        }
        for id in later.leases_revoked {
            self.revoke_lease(id);
        }
        if later.meta.is_some() {
            self.meta = later.meta;
        }
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
            && self.removed.is_empty()
            && self.leases_granted.is_empty()
            && self.leases_revoked.is_empty()
            && self.meta.is_none()
    }
}

/// What a store holds when it opens.
#[derive(Debug)]
pub struct Loaded {
    /// `None` for a brand-new store.
    pub meta: Option<Meta>,
    /// Every record in revision order.
    pub records: Vec<(Revision, Record)>,
    /// Lease id and granted TTL in seconds.
    pub leases: Vec<(i64, i64)>,
}

/// Errors of the durable layer.
#[derive(Debug, Error)]
pub enum StorageError {
    /// The storage engine failed (I/O, a full disk, a lock held by another process).
    #[error("storage engine: {0}")]
    Engine(#[from] sled::Error),
    /// Bytes on disk do not decode: the data directory is damaged or from another program.
    #[error("corrupt {what} on disk: {detail}")]
    Corrupt { what: &'static str, detail: String },
    /// A file of the store could not be opened or synced.
    #[error("{path}: {source}")]
    Io {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The blocking task that ran a storage call did not finish.
    #[error("storage task failed: {0}")]
    Task(String),
}

/// The durable layer the MVCC store runs on.
pub trait Storage: Send + Sync + std::fmt::Debug + 'static {
    /// Reads the whole store at startup.
    fn load(&self) -> Result<Loaded, StorageError>;
    /// One historical record.
    fn record(&self, rev: Revision) -> Result<Option<Record>, StorageError>;
    /// Records with `from <= revision` and `revision.main <= through`, in revision order, at
    /// most `limit` of them (the caller continues from the last revision it saw).
    fn scan(
        &self,
        from: Revision,
        through: i64,
        limit: usize,
    ) -> Result<Vec<(Revision, Record)>, StorageError>;
    /// Applies a batch atomically; it is durable (fsynced) when this returns.
    fn commit(&self, batch: Batch) -> Result<(), StorageError>;
    /// Bytes the store occupies on disk.
    fn size_on_disk(&self) -> u64;
    /// Everything the store holds (metadata, leases, every record), as one self-checking
    /// image: what a member that fell behind the raft log is sent. Consistent only when no
    /// commit runs beside it (the applier calls it between commits).
    fn dump(&self) -> Result<Vec<u8>, StorageError>;
    /// Replaces everything with an image from [`Storage::dump`], durably, and returns what
    /// the store now holds. The image is checked whole before anything is removed.
    fn restore(&self, image: &[u8]) -> Result<Loaded, StorageError>;
}

/// Records hashed per storage read.
const HASH_PAGE: usize = 10_000;

/// A hash of every stored record with `revision.main <= through`: its revision and every
/// field, so two stores agree only if their histories do (HashKV, and members' comparison).
pub fn hash_history(storage: &dyn Storage, through: i64) -> Result<u32, StorageError> {
    let mut hasher = crc32fast::Hasher::new();
    let mut from = Revision::new(0, 0);
    loop {
        let page = storage.scan(from, through, HASH_PAGE)?;
        let Some((last, _)) = page.last() else {
            return Ok(hasher.finalize());
        };
        from = Revision::new(last.main, last.sub + 1);
        for (revision, record) in &page {
            hasher.update(&revision.main.to_be_bytes());
            hasher.update(&revision.sub.to_be_bytes());
            for field in [&record.key, &record.value] {
                hasher.update(&(field.len() as u64).to_be_bytes());
                hasher.update(field);
            }
            hasher.update(&record.create_revision.to_be_bytes());
            hasher.update(&record.version.to_be_bytes());
            hasher.update(&record.lease.to_be_bytes());
            hasher.update(&[u8::from(record.tombstone)]);
        }
    }
}

/// The first bytes of a store image.
const IMAGE_MAGIC: &[u8; 8] = b"KVIMAGE1";
/// `magic | payload length: u64`.
const IMAGE_HEADER: usize = 16;
/// What `etcdctl snapshot save` expects after the data: a SHA-256 of everything before it,
/// the data padded with zeros to a multiple of 512 bytes (etcd's database pages are).
const SHA256_LEN: usize = 32;
const PADDED_TO: usize = 512;

fn image_corrupt(detail: impl Into<String>) -> StorageError {
    StorageError::Corrupt {
        what: "store image",
        detail: detail.into(),
    }
}

/// An image as a snapshot file: zero padding and the SHA-256 etcd's tools look for.
pub fn image_with_checksum(mut image: Vec<u8>) -> Vec<u8> {
    use sha2::Digest as _;
    image.resize(image.len().div_ceil(PADDED_TO) * PADDED_TO, 0);
    let digest = sha2::Sha256::digest(&image);
    image.extend_from_slice(&digest);
    image
}

/// The payload of an image, its length and CRC checked; a trailing padding + SHA-256 (a
/// snapshot file) is checked too.
fn image_payload(image: &[u8]) -> Result<&[u8], StorageError> {
    if image.get(..8) != Some(IMAGE_MAGIC.as_slice()) {
        return Err(image_corrupt("not a store image (bad magic)"));
    }
    let len = image
        .get(8..IMAGE_HEADER)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_be_bytes)
        .and_then(|len| usize::try_from(len).ok())
        .ok_or_else(|| image_corrupt("ends inside its header"))?;
    let end = IMAGE_HEADER
        .checked_add(len)
        .filter(|end| end.checked_add(4).is_some_and(|e| e <= image.len()))
        .ok_or_else(|| image_corrupt("shorter than its length says (truncated)"))?;
    let payload = &image[IMAGE_HEADER..end];
    if crc32fast::hash(payload).to_be_bytes() != image[end..end + 4] {
        return Err(image_corrupt("checksum mismatch (damaged)"));
    }
    let rest = &image[end + 4..];
    if !rest.is_empty() {
        use sha2::Digest as _;
        let (padding, digest) = rest
            .len()
            .checked_sub(SHA256_LEN)
            .map(|at| rest.split_at(at))
            .ok_or_else(|| image_corrupt("unexpected bytes after the data"))?;
        if padding.iter().any(|b| *b != 0) {
            return Err(image_corrupt("unexpected bytes after the data"));
        }
        let hashed = &image[..image.len() - SHA256_LEN];
        if sha2::Sha256::digest(hashed).as_slice() != digest {
            return Err(image_corrupt("SHA-256 mismatch (damaged snapshot file)"));
        }
    }
    Ok(payload)
}

/// The metadata an image starts with (where it stands in the raft log), without reading the
/// records.
pub fn image_meta(image: &[u8]) -> Result<Meta, StorageError> {
    if image.get(..8) != Some(IMAGE_MAGIC.as_slice()) {
        return Err(image_corrupt("not a store image (bad magic)"));
    }
    let rest = &image[IMAGE_HEADER.min(image.len())..];
    decode_meta(
        rest.get(..meta_len(rest)?)
            .ok_or_else(|| image_corrupt("ends inside its metadata"))?,
    )
}

/// Reads an image: every length and the checksums are checked, so a damaged or foreign file
/// is an error, never a panic or a partial store.
pub fn decode_image(image: &[u8]) -> Result<Loaded, StorageError> {
    let mut r = Reader {
        bytes: image_payload(image)?,
    };
    let meta = decode_meta(r.take(meta_len(r.bytes)?)?)?;
    let mut leases = Vec::new();
    for _ in 0..r.i64()? {
        let id = r.i64()?;
        leases.push((id, r.i64()?));
    }
    let mut records = Vec::new();
    for _ in 0..r.i64()? {
        let rev = Revision::from_bytes(r.take(16)?)?;
        let len = r.u32()?;
        records.push((rev, Record::decode(r.take(len)?)?));
    }
    if !r.bytes.is_empty() {
        return Err(image_corrupt(format!(
            "{} bytes after the records",
            r.bytes.len()
        )));
    }
    Ok(Loaded {
        meta: Some(meta),
        records,
        leases,
    })
}

const RECORD_PREFIX: u8 = b'r';
const LEASE_PREFIX: u8 = b'l';
const META_KEY: &[u8] = b"m/meta";
const WAL_FILE: &str = "wal";
const SLED_LOG_FILE: &str = "db";

/// [`Storage`] on sled behind a write-ahead log ([`Wal`]).
///
/// A commit is durable once its log frame is synced; sled then takes the batch's writes one by
/// one and flushes in the background. Not sled's `apply_batch`: it writes out sled's IO buffer
/// twice per call (two `pwrite` + `sync_file_range` per commit, measured), and the log already
/// makes a batch atomic: every frame since the last checkpoint is replayed at open, and since a
/// frame only sets or removes keys to fixed values, replaying it over any part of itself (or of
/// later frames) that sled kept ends in the same state. sled's own `flush` ends in `sync_file_range` on Linux, which
/// neither flushes the device cache nor persists a grown file size, so it is never what an
/// acknowledgement relies on: checkpoints follow it with an `fdatasync` of sled's file
/// (fsync acts on the inode, whichever descriptor asks) before the log may be overwritten.
#[derive(Debug)]
pub struct SledStorage {
    db: sled::Db,
    sled_log: std::fs::File,
    sled_log_path: PathBuf,
    wal: Mutex<Wal>,
    /// Held for writing while a restore swaps the store's contents (clear, then fill), so a
    /// reader, such as a watch catching up beside the applier, never sees it half done.
    swap: RwLock<()>,
}

impl SledStorage {
    /// Opens the store, replaying the log frames written since the last checkpoint.
    pub fn open(dir: &Path) -> Result<Self, StorageError> {
        let db = open_sled(dir)?;
        let sled_log_path = dir.join(SLED_LOG_FILE);
        let sled_log = std::fs::File::open(&sled_log_path).map_err(|source| StorageError::Io {
            path: sled_log_path.clone(),
            source,
        })?;
        // The log restarts at offset 0 after every checkpoint, so its frames are exactly those
        // written since (or, if none was, the previous pass, which replays onto itself).
        let (wal, frames) = Wal::open(&dir.join(WAL_FILE))?;
        for frame in &frames {
            apply(&db, decode_batch(&frame.payload)?)?;
        }
        if !frames.is_empty() {
            tracing::info!(frames = frames.len(), "replayed the write-ahead log");
        }
        let storage = Self {
            db,
            sled_log,
            sled_log_path,
            wal: Mutex::new(wal),
            swap: RwLock::new(()),
        };
        // Start the log afresh after a checkpoint, so numbering and replay stay contiguous.
        storage.checkpoint()?;
        storage.wal.lock().unwrap_or_else(|e| e.into_inner()).wrap();
        Ok(storage)
    }

    /// Shared access to the contents: no restore runs while it is held.
    fn reading(&self) -> RwLockReadGuard<'_, ()> {
        self.swap.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes everything applied to sled durable, so the log behind it may be reused.
    fn checkpoint(&self) -> Result<(), StorageError> {
        self.db.flush()?;
        self.sled_log
            .sync_data()
            .map_err(|source| StorageError::Io {
                path: self.sled_log_path.clone(),
                source,
            })
    }

    fn record_key(rev: Revision) -> [u8; 17] {
        let mut key = [0u8; 17];
        key[0] = RECORD_PREFIX;
        key[1..].copy_from_slice(&rev.to_bytes());
        key
    }

    fn lease_key(id: i64) -> [u8; 9] {
        let mut key = [0u8; 9];
        key[0] = LEASE_PREFIX;
        key[1..].copy_from_slice(&(id as u64).to_be_bytes());
        key
    }
}

/// sled's page cache. Small: the latest value of every key is in the MVCC index, so sled is
/// read only for history (old revisions, `prev_kv`, watch catch-up), and the OS page cache
/// still holds its file.
const SLED_CACHE_BYTES: u64 = 16 << 20;
/// How often sled's flusher writes its buffers out, `fsync`s its file and cleans segments.
/// Durability comes from the log, so this is only a bound on the work a checkpoint does; each
/// flush's `fsync` delays the log's `fdatasync` that runs beside it.
const SLED_FLUSH_MS: u64 = 1000;

/// Opens sled, waiting up to two seconds for its file lock: a `Db` dropped a moment ago in
/// this process releases the lock only when sled's background flusher thread has stopped.
fn open_sled(dir: &Path) -> Result<sled::Db, StorageError> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    loop {
        let opened = sled::Config::new()
            .path(dir)
            .cache_capacity(SLED_CACHE_BYTES)
            .flush_every_ms(Some(SLED_FLUSH_MS))
            .open();
        match opened {
            Err(sled::Error::Io(e))
                if e.to_string().contains("could not acquire lock")
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            other => return Ok(other?),
        }
    }
}

/// Writes a batch into sled; atomic only together with its log frame (see [`SledStorage`]).
fn apply(db: &sled::Db, batch: Batch) -> Result<(), StorageError> {
    for (rev, record) in &batch.records {
        db.insert(&SledStorage::record_key(*rev)[..], record.encode())?;
    }
    for rev in &batch.removed {
        db.remove(&SledStorage::record_key(*rev)[..])?;
    }
    for (id, ttl) in &batch.leases_granted {
        db.insert(&SledStorage::lease_key(*id)[..], &ttl.to_be_bytes()[..])?;
    }
    for id in &batch.leases_revoked {
        db.remove(&SledStorage::lease_key(*id)[..])?;
    }
    if let Some(meta) = &batch.meta {
        db.insert(META_KEY, encode_meta(meta))?;
    }
    Ok(())
}

fn encode_meta(meta: &Meta) -> Vec<u8> {
    let mut out = Vec::with_capacity(45 + 12 * meta.alarms.len());
    out.push(3);
    out.extend_from_slice(&meta.cluster_id.to_be_bytes());
    out.extend_from_slice(&meta.member_id.to_be_bytes());
    out.extend_from_slice(&meta.current_revision.to_be_bytes());
    out.extend_from_slice(&meta.compact_revision.to_be_bytes());
    out.extend_from_slice(&meta.applied_index.to_be_bytes());
    out.extend_from_slice(&(meta.alarms.len() as u32).to_be_bytes());
    for alarm in &meta.alarms {
        out.extend_from_slice(&alarm.member.to_be_bytes());
        out.extend_from_slice(&alarm.kind.to_be_bytes());
    }
    out
}

/// How long the metadata at the start of `bytes` is, from its format byte (and alarm count).
fn meta_len(bytes: &[u8]) -> Result<usize, StorageError> {
    match bytes.first() {
        Some(1) => Ok(33),
        Some(2) => Ok(41),
        Some(3) => {
            let count = bytes
                .get(41..45)
                .map(|b| u32::from_be_bytes(b.try_into().expect("4 bytes")) as usize)
                .ok_or_else(|| image_corrupt("ends inside its metadata"))?;
            Ok(45 + 12 * count)
        }
        other => Err(StorageError::Corrupt {
            what: "store metadata",
            detail: format!("unknown format {other:?}"),
        }),
    }
}

fn decode_meta(bytes: &[u8]) -> Result<Meta, StorageError> {
    // Format 1 predates replication (no applied index), format 2 alarms.
    let alarm_count = match (bytes.first(), bytes.len()) {
        (Some(1), 33) | (Some(2), 41) => Some(0),
        (Some(3), len) if len >= 45 => {
            let count = u32::from_be_bytes(bytes[41..45].try_into().expect("4 bytes")) as usize;
            (len == 45 + 12 * count).then_some(count)
        }
        _ => None,
    };
    let Some(alarm_count) = alarm_count else {
        return Err(StorageError::Corrupt {
            what: "store metadata",
            detail: format!("{} bytes, format {:?}", bytes.len(), bytes.first()),
        });
    };
    let word = |at: usize| u64::from_be_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
    let alarms = (0..alarm_count)
        .map(|i| {
            let at = 45 + 12 * i;
            Alarm {
                member: word(at),
                kind: i32::from_be_bytes(bytes[at + 8..at + 12].try_into().expect("4 bytes")),
            }
        })
        .collect();
    Ok(Meta {
        cluster_id: word(1),
        member_id: word(9),
        current_revision: word(17) as i64,
        compact_revision: word(25) as i64,
        applied_index: if bytes.len() >= 41 { word(33) } else { 0 },
        alarms,
    })
}

/// A batch as one log frame's payload.
fn encode_batch(batch: &Batch) -> Vec<u8> {
    let mut out = Vec::new();
    let count = |out: &mut Vec<u8>, n: usize| out.extend_from_slice(&(n as u32).to_be_bytes());
    count(&mut out, batch.records.len());
    for (rev, record) in &batch.records {
        let encoded = record.encode();
        out.extend_from_slice(&rev.to_bytes());
        count(&mut out, encoded.len());
        out.extend_from_slice(&encoded);
    }
    count(&mut out, batch.removed.len());
    for rev in &batch.removed {
        out.extend_from_slice(&rev.to_bytes());
    }
    count(&mut out, batch.leases_granted.len());
    for (id, ttl) in &batch.leases_granted {
        out.extend_from_slice(&id.to_be_bytes());
        out.extend_from_slice(&ttl.to_be_bytes());
    }
    count(&mut out, batch.leases_revoked.len());
    for id in &batch.leases_revoked {
        out.extend_from_slice(&id.to_be_bytes());
    }
    match &batch.meta {
        Some(meta) => out.extend_from_slice(&encode_meta(meta)),
        None => out.push(0),
    }
    out
}

/// Reads a log payload; every length is checked, so damage is an error, never a panic.
struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], StorageError> {
        if self.bytes.len() < n {
            return Err(StorageError::Corrupt {
                what: "log frame",
                detail: format!("needs {n} more bytes, {} left", self.bytes.len()),
            });
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }

    fn u32(&mut self) -> Result<usize, StorageError> {
        Ok(u32::from_be_bytes(self.take(4)?.try_into().expect("4 bytes")) as usize)
    }

    fn i64(&mut self) -> Result<i64, StorageError> {
        Ok(i64::from_be_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
}

fn decode_batch(bytes: &[u8]) -> Result<Batch, StorageError> {
    let mut r = Reader { bytes };
    let mut batch = Batch::default();
    for _ in 0..r.u32()? {
        let rev = Revision::from_bytes(r.take(16)?)?;
        let len = r.u32()?;
        batch.records.push((rev, Record::decode(r.take(len)?)?));
    }
    for _ in 0..r.u32()? {
        batch.removed.push(Revision::from_bytes(r.take(16)?)?);
    }
    for _ in 0..r.u32()? {
        let id = r.i64()?;
        batch.leases_granted.push((id, r.i64()?));
    }
    for _ in 0..r.u32()? {
        batch.leases_revoked.push(r.i64()?);
    }
    // The metadata ends the payload; its own length checks cover every format.
    batch.meta = match r.bytes.first() {
        Some(0) | None => None,
        Some(_) => Some(decode_meta(r.bytes)?),
    };
    Ok(batch)
}

impl Storage for SledStorage {
    fn load(&self) -> Result<Loaded, StorageError> {
        let _reading = self.reading();
        let meta = self
            .db
            .get(META_KEY)?
            .map(|raw| decode_meta(&raw))
            .transpose()?;
        let mut records = Vec::new();
        for item in self.db.scan_prefix([RECORD_PREFIX]) {
            let (key, value) = item?;
            records.push((Revision::from_bytes(&key[1..])?, Record::decode(&value)?));
        }
        let mut leases = Vec::new();
        for item in self.db.scan_prefix([LEASE_PREFIX]) {
            let (key, value) = item?;
            let id = key
                .get(1..9)
                .and_then(|b| b.try_into().ok())
                .map(|b: [u8; 8]| u64::from_be_bytes(b) as i64);
            let ttl = value
                .get(..8)
                .and_then(|b| b.try_into().ok())
                .map(|b: [u8; 8]| i64::from_be_bytes(b));
            match (id, ttl) {
                (Some(id), Some(ttl)) => leases.push((id, ttl)),
                _ => {
                    return Err(StorageError::Corrupt {
                        what: "lease",
                        detail: format!("key {key:?}"),
                    });
                }
            }
        }
        Ok(Loaded {
            meta,
            records,
            leases,
        })
    }

    fn record(&self, rev: Revision) -> Result<Option<Record>, StorageError> {
        let _reading = self.reading();
        self.db
            .get(Self::record_key(rev))?
            .map(|raw| Record::decode(&raw))
            .transpose()
    }

    fn scan(
        &self,
        from: Revision,
        through: i64,
        limit: usize,
    ) -> Result<Vec<(Revision, Record)>, StorageError> {
        let start = Self::record_key(from);
        let end = Self::record_key(Revision::new(through.saturating_add(1), 0));
        let _reading = self.reading();
        let mut out = Vec::new();
        for item in self.db.range(start..end).take(limit) {
            let (key, value) = item?;
            out.push((Revision::from_bytes(&key[1..])?, Record::decode(&value)?));
        }
        Ok(out)
    }

    fn commit(&self, batch: Batch) -> Result<(), StorageError> {
        if batch.is_empty() {
            return Ok(());
        }
        let payload = encode_batch(&batch);
        let mut wal = self.wal.lock().unwrap_or_else(|e| e.into_inner());
        if wal.must_wrap(payload.len()) {
            self.checkpoint()?;
            wal.wrap();
        }
        wal.append(&payload)?;
        apply(&self.db, batch)
    }

    fn size_on_disk(&self) -> u64 {
        self.db.size_on_disk().unwrap_or(0)
    }

    fn dump(&self) -> Result<Vec<u8>, StorageError> {
        let loaded = self.load()?;
        let meta = loaded
            .meta
            .ok_or_else(|| image_corrupt("the store has no metadata yet"))?;
        let mut payload = encode_meta(&meta);
        payload.extend_from_slice(&(loaded.leases.len() as i64).to_be_bytes());
        for (id, ttl) in &loaded.leases {
            payload.extend_from_slice(&id.to_be_bytes());
            payload.extend_from_slice(&ttl.to_be_bytes());
        }
        payload.extend_from_slice(&(loaded.records.len() as i64).to_be_bytes());
        for (rev, record) in &loaded.records {
            payload.extend_from_slice(&rev.to_bytes());
            let encoded = record.encode();
            payload.extend_from_slice(&(encoded.len() as u32).to_be_bytes());
            payload.extend_from_slice(&encoded);
        }
        let mut out = Vec::with_capacity(IMAGE_HEADER + payload.len() + 4);
        out.extend_from_slice(IMAGE_MAGIC);
        out.extend_from_slice(&(payload.len() as u64).to_be_bytes());
        out.extend_from_slice(&payload);
        out.extend_from_slice(&crc32fast::hash(&payload).to_be_bytes());
        Ok(out)
    }

    fn restore(&self, image: &[u8]) -> Result<Loaded, StorageError> {
        self.restore_loaded(decode_image(image)?)
    }
}

impl SledStorage {
    /// Replaces everything with what an image held (see [`Storage::restore`]).
    pub fn restore_loaded(&self, loaded: Loaded) -> Result<Loaded, StorageError> {
        let mut wal = self.wal.lock().unwrap_or_else(|e| e.into_inner());
        let _swapping = self.swap.write().unwrap_or_else(|e| e.into_inner());
        self.db.clear()?;
        let batch = Batch {
            records: loaded.records.clone(),
            removed: Vec::new(),
            leases_granted: loaded.leases.clone(),
            leases_revoked: Vec::new(),
            meta: loaded.meta.clone(),
        };
        apply(&self.db, batch)?;
        self.checkpoint()?;
        // Frames from before the image must never be replayed over it: the log starts again
        // with a frame of the image's metadata, so replay stops at the first old frame.
        wal.wrap();
        let marker = Batch {
            meta: loaded.meta.clone(),
            ..Batch::default()
        };
        wal.append(&encode_batch(&marker))?;
        Ok(loaded)
    }
}

/// What [`restore_data_dir`] made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Restored {
    pub revision: i64,
    pub records: usize,
    pub leases: usize,
}

/// Creates a new data directory from an image (`etcdctl snapshot save` of our store): the
/// data and history as they were, as the start of a new store or cluster. Every member of a
/// new cluster is restored from the same image, so they start equal; the raft position of
/// the old cluster is dropped (the new one starts its own log).
pub fn restore_data_dir(image: &[u8], dir: &Path) -> Result<Restored, StorageError> {
    let mut loaded = decode_image(image)?;
    let not_empty = std::fs::read_dir(dir).is_ok_and(|mut entries| entries.next().is_some());
    if not_empty {
        return Err(StorageError::Io {
            path: dir.to_path_buf(),
            source: std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "the data directory is not empty; a restore creates a new one",
            ),
        });
    }
    std::fs::create_dir_all(dir).map_err(|source| StorageError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    if let Some(meta) = &mut loaded.meta {
        meta.applied_index = 0;
    }
    let storage = SledStorage::open(dir)?;
    let loaded = storage.restore_loaded(loaded)?;
    Ok(Restored {
        revision: loaded.meta.map_or(1, |m| m.current_revision),
        records: loaded.records.len(),
        leases: loaded.leases.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(key: &[u8], value: &[u8]) -> Record {
        Record {
            key: key.to_vec(),
            value: value.to_vec(),
            create_revision: 2,
            version: 1,
            lease: 7,
            tombstone: false,
        }
    }

    #[test]
    fn record_round_trips_including_empty_and_binary_parts() {
        for (k, v) in [(&b"a"[..], &b""[..]), (b"\0\xff", b"\xff\0value")] {
            let r = record(k, v);
            assert_eq!(Record::decode(&r.encode()).unwrap(), r);
        }
    }

    #[test]
    fn truncated_record_is_an_error_not_a_panic() {
        let bytes = record(b"key", b"value").encode();
        for cut in 0..RECORD_HEADER + 2 {
            assert!(Record::decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn batch_round_trips_through_a_log_frame_and_truncation_is_an_error() {
        let batch = Batch {
            records: vec![(Revision::new(4, 1), record(b"k", b"v"))],
            removed: vec![Revision::new(2, 0)],
            leases_granted: vec![(9, 30)],
            leases_revoked: vec![8],
            meta: Some(Meta {
                cluster_id: 1,
                member_id: 2,
                current_revision: 4,
                compact_revision: 2,
                applied_index: 7,
                alarms: vec![Alarm { member: 2, kind: 2 }],
            }),
        };
        let bytes = encode_batch(&batch);
        let back = decode_batch(&bytes).unwrap();
        assert_eq!(back.records, batch.records);
        assert_eq!(back.removed, batch.removed);
        assert_eq!(back.leases_granted, batch.leases_granted);
        assert_eq!(back.leases_revoked, batch.leases_revoked);
        assert_eq!(back.meta, batch.meta);
        for cut in 0..bytes.len() - 57 {
            assert!(decode_batch(&bytes[..cut]).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn an_image_restores_everything_and_damage_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let storage = SledStorage::open(dir.path()).unwrap();
        storage
            .commit(Batch {
                records: vec![
                    (Revision::new(2, 0), record(b"a", b"1")),
                    (Revision::new(3, 0), record(b"a", b"2")),
                ],
                leases_granted: vec![(5, 10)],
                meta: Some(Meta {
                    cluster_id: 1,
                    member_id: 2,
                    current_revision: 3,
                    compact_revision: 0,
                    applied_index: 9,
                    alarms: Vec::new(),
                }),
                ..Batch::default()
            })
            .unwrap();
        let image = storage.dump().unwrap();
        assert_eq!(image_meta(&image).unwrap().applied_index, 9);
        let file = image_with_checksum(image.clone());
        assert_eq!(file.len() % 512, 32, "what etcdctl snapshot save checks");
        for bytes in [&image, &file] {
            let loaded = decode_image(bytes).unwrap();
            assert_eq!(loaded.records.len(), 2);
            assert_eq!(loaded.leases, vec![(5, 10)]);
        }
        let mut damaged = file.clone();
        damaged[30] ^= 1;
        assert!(decode_image(&damaged).is_err());
        assert!(decode_image(&file[..file.len() - 40]).is_err());
        assert!(decode_image(b"not an image at all").is_err());

        let target = tempfile::tempdir().unwrap();
        let restored = restore_data_dir(&file, &target.path().join("new")).unwrap();
        assert_eq!((restored.revision, restored.records), (3, 2));
        let reopened = SledStorage::open(&target.path().join("new")).unwrap();
        let loaded = reopened.load().unwrap();
        assert_eq!(
            loaded.meta.unwrap().applied_index,
            0,
            "a new cluster's log starts over"
        );
        assert!(restore_data_dir(&file, &target.path().join("new")).is_err());
    }

    #[test]
    fn a_reader_beside_a_restore_sees_the_old_store_or_the_new_one_never_a_half() {
        const RECORDS: i64 = 300;
        let history = |through: i64| Batch {
            records: (2..=through)
                .map(|rev| (Revision::new(rev, 0), record(b"k", b"v")))
                .collect(),
            meta: Some(Meta {
                cluster_id: 1,
                member_id: 2,
                current_revision: through,
                compact_revision: 0,
                applied_index: through as u64,
                alarms: Vec::new(),
            }),
            ..Batch::default()
        };
        // The image holds the same history and more, as a leader's image does.
        let source = tempfile::tempdir().unwrap();
        let leader = SledStorage::open(source.path()).unwrap();
        leader.commit(history(RECORDS + 50)).unwrap();
        let image = leader.dump().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let storage = std::sync::Arc::new(SledStorage::open(dir.path()).unwrap());
        storage.commit(history(RECORDS)).unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let reader = {
            let (storage, stop) = (storage.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut scans = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let seen = storage
                        .scan(Revision::new(2, 0), RECORDS, usize::MAX)
                        .unwrap()
                        .len();
                    assert_eq!(
                        seen,
                        RECORDS as usize - 1,
                        "a scan saw a store half restored"
                    );
                    scans += 1;
                }
                scans
            })
        };
        for _ in 0..20 {
            storage.restore(&image).unwrap();
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        assert!(reader.join().expect("no scan saw a half store") > 0);
    }

    #[test]
    fn frames_logged_but_not_in_sled_are_replayed() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (mut wal, _) = Wal::open(&dir.path().join(WAL_FILE)).unwrap();
            let batch = Batch {
                records: vec![(Revision::new(2, 0), record(b"a", b"1"))],
                ..Batch::default()
            };
            wal.append(&encode_batch(&batch)).unwrap();
        }
        let s = SledStorage::open(dir.path()).unwrap();
        assert_eq!(s.load().unwrap().records.len(), 1);
        drop(s);
        let s = SledStorage::open(dir.path()).unwrap();
        assert_eq!(s.load().unwrap().records.len(), 1);
    }

    #[test]
    fn replaying_frames_sled_already_holds_ends_in_the_same_state() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = SledStorage::open(dir.path()).unwrap();
            let mut first = Batch {
                records: vec![(Revision::new(2, 0), record(b"a", b"1"))],
                ..Batch::default()
            };
            first.grant_lease(5, 10);
            s.commit(first).unwrap();
            // Compacts the first record away; the lease is revoked and granted again.
            let mut later = Batch {
                records: vec![(Revision::new(3, 0), record(b"a", b"2"))],
                removed: vec![Revision::new(2, 0)],
                ..Batch::default()
            };
            later.revoke_lease(5);
            later.grant_lease(5, 20);
            s.commit(later).unwrap();
        }
        // Both reopens replay both frames over a sled that already holds them.
        for _ in 0..2 {
            let s = SledStorage::open(dir.path()).unwrap();
            let loaded = s.load().unwrap();
            let revs: Vec<Revision> = loaded.records.iter().map(|(r, _)| *r).collect();
            assert_eq!(revs, [Revision::new(3, 0)]);
            assert_eq!(loaded.leases, [(5, 20)]);
        }
    }

    #[test]
    fn appended_batches_keep_the_last_word_on_each_lease() {
        let mut batch = Batch::default();
        batch.grant_lease(1, 10);
        batch.revoke_lease(2);
        let mut later = Batch::default();
        later.revoke_lease(1);
        later.grant_lease(2, 30);
        batch.append(later);
        assert_eq!(batch.leases_granted, [(2, 30)]);
        assert_eq!(batch.leases_revoked, [1]);
    }

    #[test]
    fn revision_keys_sort_like_revisions() {
        let a = Revision::new(2, 9);
        let b = Revision::new(3, 0);
        assert!(a.to_bytes() < b.to_bytes());
        assert_eq!(Revision::from_bytes(&a.to_bytes()).unwrap(), a);
    }

    #[test]
    fn commit_then_reopen_sees_everything() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = SledStorage::open(dir.path()).unwrap();
            s.commit(Batch {
                records: vec![
                    (Revision::new(2, 0), record(b"a", b"1")),
                    (Revision::new(3, 0), record(b"b", b"2")),
                ],
                leases_granted: vec![(5, 10)],
                meta: Some(Meta {
                    cluster_id: 1,
                    member_id: 2,
                    current_revision: 3,
                    compact_revision: 0,
                    applied_index: 0,
                    alarms: Vec::new(),
                }),
                ..Batch::default()
            })
            .unwrap();
        }
        let s = SledStorage::open(dir.path()).unwrap();
        let loaded = s.load().unwrap();
        assert_eq!(loaded.records.len(), 2);
        assert_eq!(loaded.leases, vec![(5, 10)]);
        assert_eq!(loaded.meta.unwrap().current_revision, 3);
        let scanned = s.scan(Revision::new(3, 0), 3, 10).unwrap();
        assert_eq!(scanned.len(), 1);
        assert_eq!(scanned[0].1.key, b"b");
    }
}
