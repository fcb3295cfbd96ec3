//! The MVCC state machine: etcd's key space, revisions, transactions and leases.
//!
//! It does no I/O of its own beyond reading historical records from [`Storage`]: the applier
//! task owns it, applies one request at a time, and collects the durable [`Batch`] and the watch
//! events each request produced. Readers share it behind a lock and read at the last *durable*
//! revision, so nobody observes a write that a crash could still take back.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::Bound;
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::proto::{
    PbAlarmMember, PbAlarmRequest, PbAlarmResponse, PbCompactionResponse, PbCompare,
    PbDeleteRequest, PbDeleteResponse, PbEvent, PbKeyValue, PbLeaseGrantResponse,
    PbLeaseRevokeResponse, PbPutRequest, PbPutResponse, PbRangeRequest, PbRangeResponse,
    PbResponseHeader, PbResponseOp, PbTargetUnion, PbTxnOpRequest, PbTxnOpResponse, PbTxnRequest,
    PbTxnRequestOp, PbTxnResponse,
};
use thiserror::Error;

use super::storage::{Alarm, Batch, Loaded, Meta, Record, Revision, Storage, StorageError};

/// etcd's default limit on the ops of one txn branch (`--max-txn-ops`).
pub const MAX_TXN_OPS: usize = 128;
/// etcd's largest lease TTL in seconds.
pub const MAX_LEASE_TTL: i64 = 9_000_000_000;
/// etcd's smallest granted TTL with default election settings (1.5 election timeouts, rounded up).
pub const MIN_LEASE_TTL: i64 = 2;

/// etcd's `AlarmType.CORRUPT`: members' histories diverged.
pub const ALARM_CORRUPT: i32 = 2;
const ALARM_ACTIVATE: i32 = 1;
const ALARM_DEACTIVATE: i32 = 2;

pub const EVENT_PUT: i32 = 0;
pub const EVENT_DELETE: i32 = 1;

const SORT_NONE: i32 = 0;
const SORT_ASCEND: i32 = 1;
const SORT_DESCEND: i32 = 2;
const TARGET_KEY: i32 = 0;
const TARGET_VERSION: i32 = 1;
const TARGET_CREATE: i32 = 2;
const TARGET_MOD: i32 = 3;
const TARGET_VALUE: i32 = 4;

const CMP_EQUAL: i32 = 0;
const CMP_GREATER: i32 = 1;
const CMP_LESS: i32 = 2;
const CMP_NOT_EQUAL: i32 = 3;

/// Request errors, each mapped to the status etcd returns for it (see `status.rs`).
#[derive(Debug, Error)]
pub enum KvError {
    /// A key was empty where etcd requires one.
    #[error("etcdserver: key is not provided")]
    EmptyKey,
    /// `ignore_value`/`ignore_lease` on a key that does not exist.
    #[error("etcdserver: key not found")]
    KeyNotFound,
    /// `ignore_value` together with a value.
    #[error("etcdserver: value is provided")]
    ValueProvided,
    /// `ignore_lease` together with a lease.
    #[error("etcdserver: lease is provided")]
    LeaseProvided,
    /// A txn branch with more ops than [`MAX_TXN_OPS`].
    #[error("etcdserver: too many operations in txn request")]
    TooManyOps,
    /// A txn that writes one key twice, or puts a key it also deletes.
    #[error("etcdserver: duplicate key given in txn request")]
    DuplicateKey,
    /// A revision older than the last compaction.
    #[error("etcdserver: mvcc: required revision has been compacted")]
    Compacted,
    /// A revision newer than the store's.
    #[error("etcdserver: mvcc: required revision is a future revision")]
    FutureRevision,
    /// A lease id that is not granted.
    #[error("etcdserver: requested lease not found")]
    LeaseNotFound,
    /// A grant with an id already in use.
    #[error("etcdserver: lease already exists")]
    LeaseExists,
    /// A TTL above [`MAX_LEASE_TTL`].
    #[error("etcdserver: too large lease TTL")]
    LeaseTtlTooLarge,
    /// A request larger than the configured limit.
    #[error("etcdserver: request is too large")]
    RequestTooLarge,
    /// A CORRUPT alarm stands: members' histories diverged, so nothing is read or written
    /// until an operator has repaired the member and disarmed it (etcd's applier does alike).
    #[error("etcdserver: corrupt cluster")]
    Corrupt,
    /// No raft leader is known, so the request cannot be ordered (yet).
    #[error("etcdserver: no leader")]
    NoLeader,
    /// The request was not committed (or the read not confirmed) in time; a write may
    /// still be applied later.
    #[error("etcdserver: request timed out")]
    Timeout,
    /// A replicated entry that does not decode (every member refuses it alike).
    #[error("etcdserver: malformed replicated request: {0}")]
    Malformed(String),
    /// The server is shutting down and no longer applies writes.
    #[error("etcdserver: server stopped")]
    Stopped,
    /// Durable storage failed; the request may not have been applied.
    #[error("etcdserver: storage failure: {0}")]
    Storage(#[from] StorageError),
}

/// A write the applier serializes.
#[derive(Debug, Clone)]
pub enum WriteRequest {
    Put(PbPutRequest),
    Delete(PbDeleteRequest),
    Txn(PbTxnRequest),
    Compact(i64),
    LeaseGrant {
        id: i64,
        ttl: i64,
    },
    LeaseRevoke(i64),
    /// Raises or clears an alarm (etcd's `Maintenance.Alarm` with ACTIVATE or DEACTIVATE).
    Alarm(PbAlarmRequest),
}

/// The answer to a [`WriteRequest`], header included.
#[derive(Debug, Clone)]
pub enum WriteResponse {
    Put(PbPutResponse),
    Delete(PbDeleteResponse),
    Txn(PbTxnResponse),
    Compact(PbCompactionResponse),
    LeaseGrant(PbLeaseGrantResponse),
    LeaseRevoke(PbLeaseRevokeResponse),
    Alarm(PbAlarmResponse),
}

/// The key interval a request names, with etcd's conventions for `range_end`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyRange {
    /// An empty `range_end`: exactly one key.
    Single(Vec<u8>),
    /// `[start, end)`; `end: None` (a `range_end` of `"\0"`) means every key from `start` on.
    Interval {
        start: Vec<u8>,
        end: Option<Vec<u8>>,
    },
}

impl KeyRange {
    pub fn new(key: &[u8], range_end: &[u8]) -> Self {
        match range_end {
            [] => Self::Single(key.to_vec()),
            [0] => Self::Interval {
                start: key.to_vec(),
                end: None,
            },
            end => Self::Interval {
                start: key.to_vec(),
                end: Some(end.to_vec()),
            },
        }
    }

    pub fn contains(&self, key: &[u8]) -> bool {
        match self {
            Self::Single(k) => k.as_slice() == key,
            Self::Interval { start, end } => {
                key >= start.as_slice() && end.as_ref().is_none_or(|e| key < e.as_slice())
            }
        }
    }

    fn overlaps(&self, other: &Self) -> bool {
        let (a_start, a_end) = self.bounds();
        let (b_start, b_end) = other.bounds();
        let a_before_b_ends = b_end.as_ref().is_none_or(|e| a_start < e.as_slice());
        let b_before_a_ends = a_end.as_ref().is_none_or(|e| b_start < e.as_slice());
        a_before_b_ends && b_before_a_ends
    }

    /// Inclusive start and exclusive end (a single key `k` is `[k, k\0)`).
    fn bounds(&self) -> (&[u8], Option<Vec<u8>>) {
        match self {
            Self::Single(k) => {
                let mut end = k.clone();
                end.push(0);
                (k, Some(end))
            }
            Self::Interval { start, end } => (start, end.clone()),
        }
    }

    /// `None` when the interval is inverted or empty, which etcd answers with no keys.
    fn btree_bounds(&self) -> Option<IndexBounds<'_>> {
        match self {
            Self::Single(k) => Some((Bound::Included(k), Bound::Included(k))),
            Self::Interval { start, end: None } => Some((Bound::Included(start), Bound::Unbounded)),
            Self::Interval {
                start,
                end: Some(end),
            } => (start < end).then_some((Bound::Included(start), Bound::Excluded(end))),
        }
    }
}

/// Bounds of a key interval in the index's own terms.
type IndexBounds<'a> = (Bound<&'a [u8]>, Bound<&'a [u8]>);

#[derive(Debug, Clone, Copy)]
struct RevMeta {
    rev: Revision,
    tombstone: bool,
}

/// One key's revisions since the last compaction, and its live value if any.
#[derive(Debug, Default)]
struct KeyIndex {
    revs: Vec<RevMeta>,
    latest: Option<PbKeyValue>,
}

impl KeyIndex {
    /// Index into `revs` of the change visible at `rev`, unless the key is absent there.
    fn visible_at(&self, rev: i64) -> Option<usize> {
        let pos = self.revs.partition_point(|m| m.rev.main <= rev);
        (pos > 0 && !self.revs[pos - 1].tombstone).then(|| pos - 1)
    }
}

#[derive(Debug)]
struct Lease {
    ttl: i64,
    deadline: Instant,
    keys: BTreeSet<Vec<u8>>,
    /// Set once its expiry has been handed to the applier, so it is revoked once.
    expiring: bool,
}

/// What a lease's time-to-live query returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseTtl {
    pub remaining: i64,
    pub granted: i64,
    pub keys: Vec<Vec<u8>>,
}

/// Changes one write makes, gathered while it is applied.
#[derive(Debug)]
struct WriteCtx<'a> {
    main: i64,
    sub: i64,
    batch: &'a mut Batch,
    events: &'a mut Vec<PbEvent>,
}

impl WriteCtx<'_> {
    fn next_revision(&mut self) -> Revision {
        let rev = Revision::new(self.main, self.sub);
        self.sub += 1;
        rev
    }

    fn changed(&self) -> bool {
        self.sub > 0
    }
}

/// The store's state; see the module docs for who may touch it.
#[derive(Debug)]
pub struct Mvcc {
    storage: Arc<dyn Storage>,
    index: BTreeMap<Vec<u8>, KeyIndex>,
    meta: Meta,
    leases: HashMap<i64, Lease>,
    /// The raft term stamped on response headers (1 for a single member).
    raft_term: u64,
}

impl Mvcc {
    /// Rebuilds the state from what storage holds; a new store starts at revision 1, as etcd's.
    pub fn open(storage: Arc<dyn Storage>, loaded: Loaded) -> Self {
        let meta = loaded.meta.unwrap_or_else(|| Meta {
            cluster_id: rand::random::<u64>() | 1,
            member_id: rand::random::<u64>() | 1,
            current_revision: 1,
            compact_revision: 0,
            applied_index: 0,
            alarms: Vec::new(),
        });
        let now = Instant::now();
        let mut leases: HashMap<i64, Lease> = loaded
            .leases
            .into_iter()
            .map(|(id, ttl)| {
                let lease = Lease {
                    ttl,
                    deadline: now + Duration::from_secs(ttl as u64),
                    keys: BTreeSet::new(),
                    expiring: false,
                };
                (id, lease)
            })
            .collect();
        let mut index: BTreeMap<Vec<u8>, KeyIndex> = BTreeMap::new();
        for (rev, record) in loaded.records {
            let entry = index.entry(record.key.clone()).or_default();
            entry.revs.push(RevMeta {
                rev,
                tombstone: record.tombstone,
            });
            entry.latest = (!record.tombstone).then(|| to_kv(rev, record));
        }
        for (key, entry) in &index {
            if let Some(kv) = entry.latest.as_ref().filter(|kv| kv.lease != 0) {
                match leases.get_mut(&kv.lease) {
                    Some(lease) => {
                        lease.keys.insert(key.clone());
                    }
                    None => tracing::warn!(
                        key = %String::from_utf8_lossy(key),
                        lease = kv.lease,
                        "key is attached to a lease that no longer exists"
                    ),
                }
            }
        }
        Self {
            storage,
            index,
            meta,
            leases,
            raft_term: 1,
        }
    }

    /// A member of a replicated store answers with the ids its cluster derived, not random ones.
    pub fn set_identity(&mut self, cluster_id: u64, member_id: u64) {
        self.meta.cluster_id = cluster_id;
        self.meta.member_id = member_id;
    }

    /// Records that the raft entry at `index` has been applied (stored with its changes).
    pub fn set_applied(&mut self, index: u64) {
        self.meta.applied_index = index;
    }

    pub fn raft_term(&self) -> u64 {
        self.raft_term
    }

    pub fn set_raft_term(&mut self, term: u64) {
        self.raft_term = term;
    }

    /// A new leader restarts every lease's clock before it expires any: it cannot know when
    /// the old leader last saw a keepalive.
    pub fn refresh_leases(&mut self, now: Instant) {
        for lease in self.leases.values_mut() {
            lease.deadline = now + Duration::from_secs(lease.ttl as u64);
            lease.expiring = false;
        }
    }

    pub fn meta(&self) -> Meta {
        self.meta.clone()
    }

    /// Every raised alarm, as etcd lists them.
    pub fn alarms(&self) -> Vec<PbAlarmMember> {
        self.meta
            .alarms
            .iter()
            .map(|a| PbAlarmMember {
                member_id: a.member,
                alarm: a.kind,
            })
            .collect()
    }

    /// Refuses every request while a CORRUPT alarm stands.
    pub fn check_healthy(&self) -> Result<(), KvError> {
        if self.meta.alarms.iter().any(|a| a.kind == ALARM_CORRUPT) {
            return Err(KvError::Corrupt);
        }
        Ok(())
    }

    pub fn current_revision(&self) -> i64 {
        self.meta.current_revision
    }

    pub fn compact_revision(&self) -> i64 {
        self.meta.compact_revision
    }

    pub fn header(&self, revision: i64) -> PbResponseHeader {
        PbResponseHeader {
            cluster_id: self.meta.cluster_id,
            member_id: self.meta.member_id,
            revision,
            raft_term: self.raft_term,
        }
    }

    pub fn key_count(&self) -> usize {
        self.index.values().filter(|k| k.latest.is_some()).count()
    }

    fn kv_at(&self, entry: &KeyIndex, rev: i64) -> Result<Option<PbKeyValue>, KvError> {
        let Some(pos) = entry.visible_at(rev) else {
            return Ok(None);
        };
        if pos + 1 == entry.revs.len() {
            return Ok(entry.latest.clone());
        }
        let meta = entry.revs[pos];
        let record = self
            .storage
            .record(meta.rev)?
            .ok_or_else(|| StorageError::Corrupt {
                what: "history",
                detail: format!("revision {:?} is indexed but not stored", meta.rev),
            })?;
        Ok(Some(to_kv(meta.rev, record)))
    }

    fn keys_in<'a>(
        &'a self,
        range: &'a KeyRange,
    ) -> impl Iterator<Item = (&'a [u8], &'a KeyIndex)> {
        range
            .btree_bounds()
            .into_iter()
            .flat_map(move |bounds| self.index.range::<[u8], _>(bounds))
            .map(|(k, v)| (k.as_slice(), v))
    }

    /// A Range at `visible` unless the request names an older revision.
    pub fn range(&self, req: &PbRangeRequest, visible: i64) -> Result<PbRangeResponse, KvError> {
        if req.key.is_empty() {
            return Err(KvError::EmptyKey);
        }
        let rev = if req.revision > 0 {
            req.revision
        } else {
            visible
        };
        if rev > visible {
            return Err(KvError::FutureRevision);
        }
        if rev < self.meta.compact_revision {
            return Err(KvError::Compacted);
        }
        let range = KeyRange::new(&req.key, &req.range_end);
        let matching: Vec<&KeyIndex> = self
            .keys_in(&range)
            .filter(|(_, e)| e.visible_at(rev).is_some())
            .map(|(_, e)| e)
            .collect();
        let count = matching.len() as i64;
        let mut resp = PbRangeResponse {
            header: Some(self.header(visible)),
            count,
            ..PbRangeResponse::default()
        };
        if req.count_only {
            return Ok(resp);
        }
        let sort_order = match (req.sort_order, req.sort_target) {
            (SORT_NONE, TARGET_KEY) | (SORT_ASCEND, TARGET_KEY) => SORT_NONE,
            (SORT_NONE, _) => SORT_ASCEND,
            (order, _) => order,
        };
        let filtered = req.min_mod_revision != 0
            || req.max_mod_revision != 0
            || req.min_create_revision != 0
            || req.max_create_revision != 0;
        let limit = usize::try_from(req.limit).unwrap_or(0);
        let take = if sort_order == SORT_NONE && !filtered && limit > 0 {
            limit
        } else {
            usize::MAX
        };
        let mut kvs = Vec::with_capacity(matching.len().min(take));
        for entry in matching.into_iter().take(take) {
            if let Some(kv) = self.kv_at(entry, rev)? {
                kvs.push(kv);
            }
        }
        if filtered {
            kvs.retain(|kv| {
                (req.min_mod_revision == 0 || kv.mod_revision >= req.min_mod_revision)
                    && (req.max_mod_revision == 0 || kv.mod_revision <= req.max_mod_revision)
                    && (req.min_create_revision == 0
                        || kv.create_revision >= req.min_create_revision)
                    && (req.max_create_revision == 0
                        || kv.create_revision <= req.max_create_revision)
            });
        }
        if sort_order != SORT_NONE {
            sort_kvs(&mut kvs, req.sort_target, sort_order == SORT_DESCEND);
        }
        if limit > 0 && (kvs.len() > limit || (take == limit && count > limit as i64)) {
            kvs.truncate(limit);
            resp.more = true;
        }
        if req.keys_only {
            for kv in &mut kvs {
                kv.value.clear();
            }
        }
        resp.kvs = kvs;
        Ok(resp)
    }

    /// Answers a txn that writes nothing without going through the applier.
    pub fn read_txn(&self, req: &PbTxnRequest, visible: i64) -> Result<PbTxnResponse, KvError> {
        let succeeded = self.compare_all(&req.compare, visible)?;
        let ops = if succeeded {
            &req.success
        } else {
            &req.failure
        };
        let mut responses = Vec::with_capacity(ops.len());
        for op in ops {
            let response = match &op.request {
                Some(PbTxnOpRequest::RequestRange(r)) => {
                    PbTxnOpResponse::ResponseRange(self.range(r, visible)?)
                }
                Some(PbTxnOpRequest::RequestTxn(t)) => {
                    PbTxnOpResponse::ResponseTxn(self.read_txn(t, visible)?)
                }
                Some(PbTxnOpRequest::RequestPut(_) | PbTxnOpRequest::RequestDeleteRange(_))
                | None => continue,
            };
            responses.push(PbResponseOp {
                response: Some(response),
            });
        }
        Ok(PbTxnResponse {
            header: Some(self.header(visible)),
            succeeded,
            responses,
        })
    }

    fn compare_all(&self, compares: &[PbCompare], rev: i64) -> Result<bool, KvError> {
        for cmp in compares {
            if !self.compare(cmp, rev)? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    fn compare(&self, cmp: &PbCompare, rev: i64) -> Result<bool, KvError> {
        let range = KeyRange::new(&cmp.key, &cmp.range_end);
        let mut kvs = Vec::new();
        for (_, entry) in self.keys_in(&range) {
            if let Some(kv) = self.kv_at(entry, rev)? {
                kvs.push(kv);
            }
        }
        if kvs.is_empty() {
            // A missing key has version, revisions and lease 0, but no value to compare.
            if matches!(cmp.target_union, Some(PbTargetUnion::Value(_))) {
                return Ok(false);
            }
            return Ok(compare_kv(cmp, &PbKeyValue::default()));
        }
        Ok(kvs.iter().all(|kv| compare_kv(cmp, kv)))
    }

    /// The previous version of `key` before revision `rev`, for a watcher's `prev_kv`.
    pub fn prev_kv(&self, key: &[u8], rev: Revision) -> Result<Option<PbKeyValue>, KvError> {
        let Some(entry) = self.index.get(key) else {
            return Ok(None);
        };
        let pos = entry.revs.partition_point(|m| m.rev < rev);
        if pos == 0 || entry.revs[pos - 1].tombstone {
            return Ok(None);
        }
        let meta = entry.revs[pos - 1];
        Ok(self.storage.record(meta.rev)?.map(|r| to_kv(meta.rev, r)))
    }

    /// Applies one write; on error nothing of it is applied.
    pub fn apply(
        &mut self,
        req: &WriteRequest,
        batch: &mut Batch,
        events: &mut Vec<PbEvent>,
    ) -> Result<WriteResponse, KvError> {
        let mut ctx = WriteCtx {
            main: self.meta.current_revision + 1,
            sub: 0,
            batch,
            events,
        };
        if !matches!(req, WriteRequest::Alarm(_)) {
            self.check_healthy()?;
        }
        let resp = match req {
            WriteRequest::Put(put) => {
                check_put(put)?;
                self.check_put_state(put)?;
                WriteResponse::Put(self.put(&mut ctx, put))
            }
            WriteRequest::Delete(del) => {
                if del.key.is_empty() {
                    return Err(KvError::EmptyKey);
                }
                WriteResponse::Delete(self.delete(&mut ctx, del))
            }
            WriteRequest::Txn(txn) => {
                check_txn(txn)?;
                let mut path = Vec::new();
                self.txn_path(txn, &mut path)?;
                self.check_txn_state(txn, &mut path.iter().copied())?;
                let resp = self.txn(&mut ctx, txn, &mut path.into_iter())?;
                WriteResponse::Txn(resp)
            }
            WriteRequest::Compact(rev) => {
                self.compact(*rev, ctx.batch)?;
                WriteResponse::Compact(PbCompactionResponse { header: None })
            }
            WriteRequest::LeaseGrant { id, ttl } => {
                let (id, ttl) = self.lease_grant(*id, *ttl, ctx.batch)?;
                WriteResponse::LeaseGrant(PbLeaseGrantResponse {
                    header: None,
                    id,
                    ttl,
                    error: String::new(),
                })
            }
            WriteRequest::LeaseRevoke(id) => {
                self.lease_revoke(&mut ctx, *id)?;
                WriteResponse::LeaseRevoke(PbLeaseRevokeResponse { header: None })
            }
            WriteRequest::Alarm(alarm) => {
                // The applier stores the metadata, alarms included, with every batch.
                let alarms = self.alarm(alarm);
                WriteResponse::Alarm(PbAlarmResponse {
                    header: None,
                    alarms,
                })
            }
        };
        if ctx.changed() {
            self.meta.current_revision = ctx.main;
        }
        let stamp = self.header(self.meta.current_revision);
        let header = Some(stamp);
        Ok(match resp {
            WriteResponse::Put(r) => WriteResponse::Put(PbPutResponse { header, ..r }),
            WriteResponse::Delete(r) => WriteResponse::Delete(PbDeleteResponse { header, ..r }),
            WriteResponse::Txn(mut r) => {
                // etcd stamps every nested response with the txn's final revision.
                set_headers(&mut r, stamp);
                WriteResponse::Txn(r)
            }
            WriteResponse::Compact(_) => WriteResponse::Compact(PbCompactionResponse { header }),
            WriteResponse::LeaseGrant(r) => {
                WriteResponse::LeaseGrant(PbLeaseGrantResponse { header, ..r })
            }
            WriteResponse::LeaseRevoke(_) => {
                WriteResponse::LeaseRevoke(PbLeaseRevokeResponse { header })
            }
            WriteResponse::Alarm(r) => WriteResponse::Alarm(PbAlarmResponse { header, ..r }),
        })
    }

    /// Raises or clears one alarm and answers with it, as etcd does; other actions change
    /// nothing and answer with every alarm.
    fn alarm(&mut self, request: &PbAlarmRequest) -> Vec<PbAlarmMember> {
        let alarm = Alarm {
            member: request.member_id,
            kind: request.alarm,
        };
        let this = vec![PbAlarmMember {
            member_id: alarm.member,
            alarm: alarm.kind,
        }];
        match request.action {
            ALARM_ACTIVATE if alarm.kind != 0 => {
                if let Err(at) = self.meta.alarms.binary_search(&alarm) {
                    tracing::error!(
                        member = format_args!("{:x}", alarm.member),
                        kind = alarm.kind,
                        "alarm raised"
                    );
                    self.meta.alarms.insert(at, alarm);
                }
                this
            }
            ALARM_DEACTIVATE => match self.meta.alarms.binary_search(&alarm) {
                Ok(at) => {
                    tracing::warn!(
                        member = format_args!("{:x}", alarm.member),
                        kind = alarm.kind,
                        "alarm cleared"
                    );
                    self.meta.alarms.remove(at);
                    this
                }
                Err(_) => Vec::new(),
            },
            _ => self.alarms(),
        }
    }

    fn check_put_state(&self, put: &PbPutRequest) -> Result<(), KvError> {
        if put.lease != 0 && !self.leases.contains_key(&put.lease) {
            return Err(KvError::LeaseNotFound);
        }
        if (put.ignore_value || put.ignore_lease)
            && self
                .index
                .get(&put.key)
                .is_none_or(|entry| entry.latest.is_none())
        {
            return Err(KvError::KeyNotFound);
        }
        Ok(())
    }

    fn put(&mut self, ctx: &mut WriteCtx<'_>, put: &PbPutRequest) -> PbPutResponse {
        let rev = ctx.next_revision();
        let entry = self.index.entry(put.key.clone()).or_default();
        let prev = entry.latest.take();
        let value = match (&prev, put.ignore_value) {
            (Some(prev), true) => prev.value.clone(),
            _ => put.value.clone(),
        };
        let lease = match (&prev, put.ignore_lease) {
            (Some(prev), true) => prev.lease,
            _ => put.lease,
        };
        let kv = PbKeyValue {
            key: put.key.clone(),
            create_revision: prev.as_ref().map_or(rev.main, |p| p.create_revision),
            mod_revision: rev.main,
            version: prev.as_ref().map_or(1, |p| p.version + 1),
            value,
            lease,
        };
        entry.revs.push(RevMeta {
            rev,
            tombstone: false,
        });
        entry.latest = Some(kv.clone());
        let old_lease = prev.as_ref().map_or(0, |p| p.lease);
        if old_lease != lease {
            self.detach(old_lease, &put.key);
        }
        if lease != 0
            && let Some(l) = self.leases.get_mut(&lease)
        {
            l.keys.insert(put.key.clone());
        }
        ctx.batch.records.push((rev, to_record(&kv)));
        ctx.events.push(PbEvent {
            r#type: EVENT_PUT,
            kv: Some(kv),
            prev_kv: prev.clone(),
        });
        PbPutResponse {
            header: None,
            prev_kv: prev.filter(|_| put.prev_kv),
        }
    }

    fn detach(&mut self, lease: i64, key: &[u8]) {
        if lease != 0
            && let Some(l) = self.leases.get_mut(&lease)
        {
            l.keys.remove(key);
        }
    }

    fn delete(&mut self, ctx: &mut WriteCtx<'_>, del: &PbDeleteRequest) -> PbDeleteResponse {
        let range = KeyRange::new(&del.key, &del.range_end);
        let live: Vec<Vec<u8>> = self
            .keys_in(&range)
            .filter(|(_, e)| e.latest.is_some())
            .map(|(k, _)| k.to_vec())
            .collect();
        let mut prev_kvs = Vec::new();
        for key in &live {
            if let Some(prev) = self.delete_key(ctx, key)
                && del.prev_kv
            {
                prev_kvs.push(prev);
            }
        }
        PbDeleteResponse {
            header: None,
            deleted: live.len() as i64,
            prev_kvs,
        }
    }

    fn delete_key(&mut self, ctx: &mut WriteCtx<'_>, key: &[u8]) -> Option<PbKeyValue> {
        let entry = self.index.get_mut(key)?;
        let prev = entry.latest.take()?;
        let rev = ctx.next_revision();
        entry.revs.push(RevMeta {
            rev,
            tombstone: true,
        });
        self.detach(prev.lease, key);
        ctx.batch.records.push((
            rev,
            Record {
                key: key.to_vec(),
                value: Vec::new(),
                create_revision: 0,
                version: 0,
                lease: 0,
                tombstone: true,
            },
        ));
        ctx.events.push(PbEvent {
            r#type: EVENT_DELETE,
            kv: Some(PbKeyValue {
                key: key.to_vec(),
                mod_revision: rev.main,
                ..PbKeyValue::default()
            }),
            prev_kv: Some(prev.clone()),
        });
        Some(prev)
    }

    /// Decides every branch of a (nested) txn against the state before it, as etcd does.
    fn txn_path(&self, txn: &PbTxnRequest, path: &mut Vec<bool>) -> Result<(), KvError> {
        let succeeded = self.compare_all(&txn.compare, self.meta.current_revision)?;
        path.push(succeeded);
        for op in branch(txn, succeeded) {
            if let Some(PbTxnOpRequest::RequestTxn(nested)) = &op.request {
                self.txn_path(nested, path)?;
            }
        }
        Ok(())
    }

    fn check_txn_state(
        &self,
        txn: &PbTxnRequest,
        path: &mut impl Iterator<Item = bool>,
    ) -> Result<(), KvError> {
        let succeeded = path.next().unwrap_or(false);
        for op in branch(txn, succeeded) {
            match &op.request {
                Some(PbTxnOpRequest::RequestPut(put)) => self.check_put_state(put)?,
                Some(PbTxnOpRequest::RequestRange(r)) => {
                    if r.revision > self.meta.current_revision {
                        return Err(KvError::FutureRevision);
                    }
                    if r.revision > 0 && r.revision < self.meta.compact_revision {
                        return Err(KvError::Compacted);
                    }
                }
                Some(PbTxnOpRequest::RequestTxn(nested)) => self.check_txn_state(nested, path)?,
                Some(PbTxnOpRequest::RequestDeleteRange(_)) | None => {}
            }
        }
        Ok(())
    }

    fn txn(
        &mut self,
        ctx: &mut WriteCtx<'_>,
        txn: &PbTxnRequest,
        path: &mut impl Iterator<Item = bool>,
    ) -> Result<PbTxnResponse, KvError> {
        let succeeded = path.next().unwrap_or(false);
        let mut responses = Vec::new();
        for op in branch(txn, succeeded) {
            let response = match &op.request {
                Some(PbTxnOpRequest::RequestRange(r)) => {
                    // Reads inside a writing txn see its earlier writes.
                    let at = if ctx.changed() {
                        ctx.main
                    } else {
                        self.meta.current_revision
                    };
                    PbTxnOpResponse::ResponseRange(self.range(r, at)?)
                }
                Some(PbTxnOpRequest::RequestPut(put)) => {
                    PbTxnOpResponse::ResponsePut(self.put(ctx, put))
                }
                Some(PbTxnOpRequest::RequestDeleteRange(del)) => {
                    PbTxnOpResponse::ResponseDeleteRange(self.delete(ctx, del))
                }
                Some(PbTxnOpRequest::RequestTxn(nested)) => {
                    PbTxnOpResponse::ResponseTxn(self.txn(ctx, nested, path)?)
                }
                None => continue,
            };
            responses.push(PbResponseOp {
                response: Some(response),
            });
        }
        Ok(PbTxnResponse {
            header: None,
            succeeded,
            responses,
        })
    }

    fn compact(&mut self, rev: i64, batch: &mut Batch) -> Result<(), KvError> {
        if rev <= self.meta.compact_revision {
            return Err(KvError::Compacted);
        }
        if rev > self.meta.current_revision {
            return Err(KvError::FutureRevision);
        }
        self.index.retain(|_, entry| {
            let pos = entry.revs.partition_point(|m| m.rev.main <= rev);
            if pos == 0 {
                return true;
            }
            // Keep the newest change at or before `rev` unless it is a deletion.
            let keep_from = if entry.revs[pos - 1].tombstone {
                pos
            } else {
                pos - 1
            };
            batch
                .removed
                .extend(entry.revs.drain(..keep_from).map(|m| m.rev));
            !entry.revs.is_empty()
        });
        self.meta.compact_revision = rev;
        Ok(())
    }

    fn lease_grant(&mut self, id: i64, ttl: i64, batch: &mut Batch) -> Result<(i64, i64), KvError> {
        if ttl > MAX_LEASE_TTL {
            return Err(KvError::LeaseTtlTooLarge);
        }
        let ttl = ttl.max(MIN_LEASE_TTL);
        let id = if id == 0 {
            loop {
                let candidate = (rand::random::<u64>() >> 1) as i64;
                if candidate != 0 && !self.leases.contains_key(&candidate) {
                    break candidate;
                }
            }
        } else {
            id
        };
        if self.leases.contains_key(&id) {
            return Err(KvError::LeaseExists);
        }
        self.leases.insert(
            id,
            Lease {
                ttl,
                deadline: Instant::now() + Duration::from_secs(ttl as u64),
                keys: BTreeSet::new(),
                expiring: false,
            },
        );
        batch.grant_lease(id, ttl);
        Ok((id, ttl))
    }

    fn lease_revoke(&mut self, ctx: &mut WriteCtx<'_>, id: i64) -> Result<(), KvError> {
        let lease = self.leases.remove(&id).ok_or(KvError::LeaseNotFound)?;
        for key in &lease.keys {
            self.delete_key(ctx, key);
        }
        ctx.batch.revoke_lease(id);
        Ok(())
    }

    /// Renews a lease; its TTL, or `None` if it does not exist.
    pub fn lease_keep_alive(&mut self, id: i64) -> Option<i64> {
        let lease = self.leases.get_mut(&id)?;
        lease.deadline = Instant::now() + Duration::from_secs(lease.ttl as u64);
        Some(lease.ttl)
    }

    pub fn lease_ttl(&self, id: i64, with_keys: bool) -> Option<LeaseTtl> {
        let lease = self.leases.get(&id)?;
        let remaining = lease.deadline.saturating_duration_since(Instant::now());
        Some(LeaseTtl {
            remaining: remaining.as_secs() as i64,
            granted: lease.ttl,
            keys: if with_keys {
                lease.keys.iter().cloned().collect()
            } else {
                Vec::new()
            },
        })
    }

    pub fn lease_ids(&self) -> Vec<i64> {
        let mut ids: Vec<i64> = self.leases.keys().copied().collect();
        ids.sort_unstable();
        ids
    }

    /// Leases past their deadline that have not been handed out for revocation yet.
    pub fn take_expired(&mut self, now: Instant) -> Vec<i64> {
        let mut expired = Vec::new();
        for (id, lease) in &mut self.leases {
            if !lease.expiring && lease.deadline <= now {
                lease.expiring = true;
                expired.push(*id);
            }
        }
        expired
    }

    /// Lets a lease whose revocation failed be retried.
    pub fn release_expiring(&mut self, id: i64) {
        if let Some(lease) = self.leases.get_mut(&id) {
            lease.expiring = false;
        }
    }
}

fn set_headers(txn: &mut PbTxnResponse, header: PbResponseHeader) {
    txn.header = Some(header);
    for op in &mut txn.responses {
        match &mut op.response {
            Some(PbTxnOpResponse::ResponseRange(r)) => r.header = Some(header),
            Some(PbTxnOpResponse::ResponsePut(r)) => r.header = Some(header),
            Some(PbTxnOpResponse::ResponseDeleteRange(r)) => r.header = Some(header),
            Some(PbTxnOpResponse::ResponseTxn(r)) => set_headers(r, header),
            None => {}
        }
    }
}

fn branch(txn: &PbTxnRequest, succeeded: bool) -> &[PbTxnRequestOp] {
    if succeeded {
        &txn.success
    } else {
        &txn.failure
    }
}

fn to_kv(rev: Revision, record: Record) -> PbKeyValue {
    PbKeyValue {
        key: record.key,
        create_revision: record.create_revision,
        mod_revision: rev.main,
        version: record.version,
        value: record.value,
        lease: record.lease,
    }
}

fn to_record(kv: &PbKeyValue) -> Record {
    Record {
        key: kv.key.clone(),
        value: kv.value.clone(),
        create_revision: kv.create_revision,
        version: kv.version,
        lease: kv.lease,
        tombstone: false,
    }
}

fn compare_kv(cmp: &PbCompare, kv: &PbKeyValue) -> bool {
    use std::cmp::Ordering;
    let ordering = match &cmp.target_union {
        Some(PbTargetUnion::Version(v)) => kv.version.cmp(v),
        Some(PbTargetUnion::CreateRevision(v)) => kv.create_revision.cmp(v),
        Some(PbTargetUnion::ModRevision(v)) => kv.mod_revision.cmp(v),
        Some(PbTargetUnion::Value(v)) => kv.value.as_slice().cmp(v.as_slice()),
        Some(PbTargetUnion::Lease(v)) => kv.lease.cmp(v),
        None => return false,
    };
    match cmp.result {
        CMP_EQUAL => ordering == Ordering::Equal,
        CMP_GREATER => ordering == Ordering::Greater,
        CMP_LESS => ordering == Ordering::Less,
        CMP_NOT_EQUAL => ordering != Ordering::Equal,
        _ => false,
    }
}

fn sort_kvs(kvs: &mut [PbKeyValue], target: i32, descending: bool) {
    kvs.sort_by(|a, b| {
        let ord = match target {
            TARGET_VERSION => a.version.cmp(&b.version),
            TARGET_CREATE => a.create_revision.cmp(&b.create_revision),
            TARGET_MOD => a.mod_revision.cmp(&b.mod_revision),
            TARGET_VALUE => a.value.cmp(&b.value),
            _ => a.key.cmp(&b.key),
        };
        if descending { ord.reverse() } else { ord }
    });
}

/// Checks a put that needs no state: etcd rejects these before they reach the store.
fn check_put(put: &PbPutRequest) -> Result<(), KvError> {
    if put.key.is_empty() {
        return Err(KvError::EmptyKey);
    }
    if put.ignore_value && !put.value.is_empty() {
        return Err(KvError::ValueProvided);
    }
    if put.ignore_lease && put.lease != 0 {
        return Err(KvError::LeaseProvided);
    }
    Ok(())
}

/// Whether a txn writes anything in any branch; read-only ones skip the applier.
pub fn txn_writes(txn: &PbTxnRequest) -> bool {
    txn.success
        .iter()
        .chain(&txn.failure)
        .any(|op| match &op.request {
            Some(PbTxnOpRequest::RequestPut(_) | PbTxnOpRequest::RequestDeleteRange(_)) => true,
            Some(PbTxnOpRequest::RequestTxn(nested)) => txn_writes(nested),
            Some(PbTxnOpRequest::RequestRange(_)) | None => false,
        })
}

/// Static txn checks: sizes, keys, and etcd's rule that a txn never writes one key twice.
pub fn check_txn(txn: &PbTxnRequest) -> Result<(), KvError> {
    if txn.compare.len() > MAX_TXN_OPS
        || txn.success.len() > MAX_TXN_OPS
        || txn.failure.len() > MAX_TXN_OPS
    {
        return Err(KvError::TooManyOps);
    }
    for op in txn.success.iter().chain(&txn.failure) {
        match &op.request {
            Some(PbTxnOpRequest::RequestPut(put)) => check_put(put)?,
            Some(PbTxnOpRequest::RequestRange(r)) if r.key.is_empty() => {
                return Err(KvError::EmptyKey);
            }
            Some(PbTxnOpRequest::RequestDeleteRange(d)) if d.key.is_empty() => {
                return Err(KvError::EmptyKey);
            }
            Some(PbTxnOpRequest::RequestTxn(nested)) => check_txn(nested)?,
            _ => {}
        }
    }
    branch_writes(&txn.success)?;
    branch_writes(&txn.failure)?;
    Ok(())
}

/// The keys one branch puts and the ranges it deletes, failing on overlaps.
fn branch_writes(ops: &[PbTxnRequestOp]) -> Result<(BTreeSet<Vec<u8>>, Vec<KeyRange>), KvError> {
    let mut dels: Vec<KeyRange> = ops
        .iter()
        .filter_map(|op| match &op.request {
            Some(PbTxnOpRequest::RequestDeleteRange(d)) => {
                Some(KeyRange::new(&d.key, &d.range_end))
            }
            _ => None,
        })
        .collect();
    let mut puts: BTreeSet<Vec<u8>> = BTreeSet::new();
    for op in ops {
        let Some(PbTxnOpRequest::RequestTxn(nested)) = &op.request else {
            continue;
        };
        let (puts_then, dels_then) = branch_writes(&nested.success)?;
        let (puts_else, dels_else) = branch_writes(&nested.failure)?;
        for key in &puts_then {
            if puts.contains(key) || touches(&dels, key) {
                return Err(KvError::DuplicateKey);
            }
        }
        puts.extend(puts_then.iter().cloned());
        for key in puts_else {
            // Only one of a nested txn's branches runs, so they may write the same key.
            if (puts.contains(&key) && !puts_then.contains(&key)) || touches(&dels, &key) {
                return Err(KvError::DuplicateKey);
            }
            puts.insert(key);
        }
        dels.extend(dels_then);
        dels.extend(dels_else);
    }
    for op in ops {
        let Some(PbTxnOpRequest::RequestPut(put)) = &op.request else {
            continue;
        };
        if puts.contains(&put.key) || touches(&dels, &put.key) {
            return Err(KvError::DuplicateKey);
        }
        puts.insert(put.key.clone());
    }
    Ok((puts, dels))
}

fn touches(dels: &[KeyRange], key: &[u8]) -> bool {
    let point = KeyRange::Single(key.to_vec());
    dels.iter().any(|d| d.overlaps(&point))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::storage::SledStorage;
    use proptest::prelude::*;

    fn open() -> (tempfile::TempDir, Mvcc) {
        let dir = tempfile::tempdir().unwrap();
        let storage: Arc<dyn Storage> = Arc::new(SledStorage::open(dir.path()).unwrap());
        let loaded = storage.load().unwrap();
        (dir, Mvcc::open(storage, loaded))
    }

    fn put(m: &mut Mvcc, key: &str, value: &str) -> i64 {
        let mut batch = Batch::default();
        let mut events = Vec::new();
        let req = WriteRequest::Put(PbPutRequest {
            key: key.into(),
            value: value.into(),
            ..Default::default()
        });
        let resp = m.apply(&req, &mut batch, &mut events).unwrap();
        m.storage.commit(batch).unwrap();
        match resp {
            WriteResponse::Put(r) => r.header.unwrap().revision,
            other => panic!("{other:?}"),
        }
    }

    fn get(m: &Mvcc, key: &str, rev: i64) -> Option<PbKeyValue> {
        let req = PbRangeRequest {
            key: key.into(),
            revision: rev,
            ..Default::default()
        };
        m.range(&req, m.current_revision()).unwrap().kvs.pop()
    }

    #[test]
    fn history_is_read_from_storage_and_latest_from_memory() {
        let (_dir, mut m) = open();
        let r1 = put(&mut m, "a", "1");
        let r2 = put(&mut m, "a", "2");
        assert_eq!(get(&m, "a", r1).unwrap().value, b"1");
        assert_eq!(get(&m, "a", r2).unwrap().value, b"2");
        assert_eq!(get(&m, "a", 0).unwrap().version, 2);
        assert_eq!(get(&m, "a", 1), None);
    }

    #[test]
    fn compaction_keeps_the_latest_live_version() {
        let (_dir, mut m) = open();
        put(&mut m, "a", "1");
        let r = put(&mut m, "a", "2");
        put(&mut m, "b", "x");
        let mut batch = Batch::default();
        m.apply(&WriteRequest::Compact(r + 1), &mut batch, &mut Vec::new())
            .unwrap();
        assert_eq!(batch.removed.len(), 1);
        assert_eq!(get(&m, "a", r + 1).unwrap().value, b"2");
    }

    #[test]
    fn duplicate_keys_are_refused_but_exclusive_branches_may_share() {
        let put_op = |k: &str| PbTxnRequestOp {
            request: Some(PbTxnOpRequest::RequestPut(PbPutRequest {
                key: k.into(),
                ..Default::default()
            })),
        };
        let txn = |success: Vec<PbTxnRequestOp>, failure: Vec<PbTxnRequestOp>| PbTxnRequest {
            compare: vec![],
            success,
            failure,
        };
        assert!(check_txn(&txn(vec![put_op("a"), put_op("a")], vec![])).is_err());
        assert!(check_txn(&txn(vec![put_op("a")], vec![put_op("a")])).is_ok());
        let nested = PbTxnRequestOp {
            request: Some(PbTxnOpRequest::RequestTxn(txn(
                vec![put_op("b")],
                vec![put_op("b")],
            ))),
        };
        assert!(check_txn(&txn(vec![nested.clone()], vec![])).is_ok());
        assert!(check_txn(&txn(vec![nested, put_op("b")], vec![])).is_err());
    }

    proptest! {
        #[test]
        fn key_range_contains_agrees_with_its_btree_bounds(
            key in proptest::collection::vec(any::<u8>(), 0..3),
            start in proptest::collection::vec(any::<u8>(), 1..3),
            end in proptest::collection::vec(any::<u8>(), 0..3),
        ) {
            let range = KeyRange::new(&start, &end);
            let k = key.as_slice();
            let in_bounds = range.btree_bounds().is_some_and(|(lo, hi)| {
                let above = match lo {
                    Bound::Included(lo) => k >= lo,
                    Bound::Excluded(lo) => k > lo,
                    Bound::Unbounded => true,
                };
                let below = match hi {
                    Bound::Included(hi) => k <= hi,
                    Bound::Excluded(hi) => k < hi,
                    Bound::Unbounded => true,
                };
                above && below
            });
            prop_assert_eq!(range.contains(&key), in_bounds);
        }
    }
}
