//! The raft owner: one thread drives the `RawNode` (tick, step, propose, read index, ready,
//! advance) in the order raft-rs requires, and a handle the gRPC services use to propose
//! writes and confirm reads.
//!
//! A thread rather than a task: persisting a `Ready` is a blocking `fdatasync`, and nothing
//! else must run on raft's state between two steps. Entries and hard state are durable before
//! the messages that announce them (`persisted_messages`) leave; committed entries go to the
//! applier in log order, which stores each entry's index with the changes it made.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant};

use etcd_client::proto::{PbAlarmRequest, PbDeleteRequest, PbPutRequest, PbTxnRequest};
use prost::Message as _;
use protobuf::Message as _;
use raft::eraftpb::{ConfChange, ConfChangeV2, EntryType, Message, Snapshot, SnapshotMetadata};
use raft::{RawNode, StateRole};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use super::ClusterConfig;
use super::log::{LogStore, RaftLog};
use super::transport::Outbox;
use crate::server::applier::{Applier, Reply, Shared};
use crate::server::mvcc::{KvError, WriteRequest, WriteResponse};
use crate::server::storage::{self, StorageError};

/// etcd's default heartbeat interval; an election takes 10 of them without a leader.
pub const TICK: Duration = Duration::from_millis(100);
const ELECTION_TICKS: usize = 10;
/// How long a write waits to be committed, or a read to be confirmed, before the client is
/// told "request timed out" (etcd's default for a 100 ms heartbeat is 5 s + 2 s).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(7);
/// A read index request not answered by then is asked again (the leader may have changed).
const READ_RETRY: Duration = Duration::from_millis(500);
/// Commands taken per loop turn before raft's `Ready` is handled.
const BATCH: usize = 512;
/// Entries kept behind the compaction point for members just behind (etcd keeps 5000).
const CATCH_UP_ENTRIES: u64 = 5000;

/// Writes a file so that it is whole after a crash: a temporary file, synced, renamed over
/// the old one, and the directory synced.
fn write_durably(path: &std::path::Path, bytes: &[u8]) -> Result<(), StorageError> {
    let io = |source| StorageError::Io {
        path: path.to_path_buf(),
        source,
    };
    let tmp = path.with_extension("tmp");
    {
        use std::io::Write;
        let mut file = std::fs::File::create(&tmp).map_err(io)?;
        file.write_all(bytes).map_err(io)?;
        file.sync_all().map_err(io)?;
    }
    std::fs::rename(&tmp, path).map_err(io)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io)?;
    }
    Ok(())
}

/// Encodes a write for the log. A lease grant must carry its id already: applying a log entry
/// must come out the same on every member.
pub fn encode_request(request: &WriteRequest) -> Vec<u8> {
    let mut out = Vec::new();
    match request {
        WriteRequest::Put(put) => {
            out.push(1);
            put.encode(&mut out).unwrap_or_default();
        }
        WriteRequest::Delete(del) => {
            out.push(2);
            del.encode(&mut out).unwrap_or_default();
        }
        WriteRequest::Txn(txn) => {
            out.push(3);
            txn.encode(&mut out).unwrap_or_default();
        }
        WriteRequest::Compact(revision) => {
            out.push(4);
            out.extend_from_slice(&revision.to_be_bytes());
        }
        WriteRequest::LeaseGrant { id, ttl } => {
            out.push(5);
            out.extend_from_slice(&id.to_be_bytes());
            out.extend_from_slice(&ttl.to_be_bytes());
        }
        WriteRequest::LeaseRevoke(id) => {
            out.push(6);
            out.extend_from_slice(&id.to_be_bytes());
        }
        WriteRequest::Alarm(alarm) => {
            out.push(7);
            alarm.encode(&mut out).unwrap_or_default();
        }
    }
    out
}

/// Decodes a log entry's write; what another member (or a damaged log) wrote is checked.
pub fn decode_request(data: &[u8]) -> Result<WriteRequest, String> {
    let (&tag, body) = data.split_first().ok_or("an empty request")?;
    let int = |at: usize| -> Result<i64, String> {
        body.get(at..at + 8)
            .and_then(|b| b.try_into().ok())
            .map(i64::from_be_bytes)
            .ok_or_else(|| format!("request kind {tag} is {} bytes long", body.len()))
    };
    let prost = |e: prost::DecodeError| e.to_string();
    Ok(match tag {
        1 => WriteRequest::Put(PbPutRequest::decode(body).map_err(prost)?),
        2 => WriteRequest::Delete(PbDeleteRequest::decode(body).map_err(prost)?),
        3 => WriteRequest::Txn(PbTxnRequest::decode(body).map_err(prost)?),
        4 => WriteRequest::Compact(int(0)?),
        5 => WriteRequest::LeaseGrant {
            id: int(0)?,
            ttl: int(8)?,
        },
        6 => WriteRequest::LeaseRevoke(int(0)?),
        7 => WriteRequest::Alarm(PbAlarmRequest::decode(body).map_err(prost)?),
        other => return Err(format!("unknown request kind {other}")),
    })
}

/// A proposal's context: the proposing member and its sequence number, so the member that
/// waits for the answer recognises its entry when it is applied.
fn context(member: u64, seq: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(16);
    out.extend_from_slice(&member.to_be_bytes());
    out.extend_from_slice(&seq.to_be_bytes());
    out
}

fn parse_context(bytes: &[u8]) -> Option<(u64, u64)> {
    let member = u64::from_be_bytes(bytes.get(..8)?.try_into().ok()?);
    let seq = u64::from_be_bytes(bytes.get(8..16)?.try_into().ok()?);
    Some((member, seq))
}

/// What the raft thread is asked to do.
pub enum Command {
    Propose {
        seq: u64,
        data: Vec<u8>,
        reply: Reply,
    },
    ReadIndex {
        seq: u64,
        reply: oneshot::Sender<u64>,
    },
    /// A message from another member.
    Step(Box<Message>),
    /// Sending to this member failed: raft slows down replication to it.
    Unreachable(u64),
    /// Whether a snapshot sent to this member arrived.
    SnapshotSent { to: u64, ok: bool },
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Command::Propose { seq, .. } => write!(f, "Propose({seq})"),
            Command::ReadIndex { seq, .. } => write!(f, "ReadIndex({seq})"),
            Command::Step(m) => write!(f, "Step({:?} from {})", m.get_msg_type(), m.from),
            Command::Unreachable(id) => write!(f, "Unreachable({id})"),
            Command::SnapshotSent { to, ok } => write!(f, "SnapshotSent({to}, {ok})"),
        }
    }
}

/// Raft as `Maintenance.Status` reports it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeStatus {
    pub leader: u64,
    pub term: u64,
    pub index: u64,
}

/// How the services reach raft.
#[derive(Debug)]
pub struct RaftHandle {
    tx: std_mpsc::Sender<Command>,
    shared: Arc<Shared>,
    config: Arc<ClusterConfig>,
    seq: AtomicU64,
    outbox: Outbox,
}

impl RaftHandle {
    pub fn config(&self) -> &ClusterConfig {
        &self.config
    }

    /// Proposes a write and waits for it to be applied here; with no leader known it is
    /// proposed again until one is or the request times out.
    pub async fn submit(&self, request: WriteRequest) -> Result<WriteResponse, KvError> {
        let request = match request {
            WriteRequest::LeaseGrant { id: 0, ttl } => WriteRequest::LeaseGrant {
                id: (rand::random::<u64>() >> 1).max(1) as i64,
                ttl,
            },
            other => other,
        };
        let data = encode_request(&request);
        let deadline = tokio::time::Instant::now() + REQUEST_TIMEOUT;
        loop {
            let (reply, rx) = oneshot::channel();
            let seq = self.seq.fetch_add(1, Ordering::Relaxed);
            self.tx
                .send(Command::Propose {
                    seq,
                    data: data.clone(),
                    reply,
                })
                .map_err(|_| KvError::Stopped)?;
            match tokio::time::timeout_at(deadline, rx).await {
                Err(_) => return Err(KvError::Timeout),
                Ok(Err(_)) => return Err(KvError::Stopped),
                Ok(Ok(Err(KvError::NoLeader))) => {
                    let retry = tokio::time::Instant::now() + TICK;
                    if retry >= deadline {
                        return Err(KvError::NoLeader);
                    }
                    tokio::time::sleep_until(retry).await;
                }
                Ok(Ok(result)) => return result,
            }
        }
    }

    /// Waits until this member has applied everything committed when the call was made
    /// (raft's ReadIndex, confirmed by a quorum of heartbeats), so a read after it is
    /// linearizable.
    pub async fn read_barrier(&self) -> Result<(), KvError> {
        let deadline = tokio::time::Instant::now() + REQUEST_TIMEOUT;
        loop {
            let (reply, rx) = oneshot::channel();
            let seq = self.seq.fetch_add(1, Ordering::Relaxed);
            self.tx
                .send(Command::ReadIndex { seq, reply })
                .map_err(|_| KvError::Stopped)?;
            let attempt = (tokio::time::Instant::now() + READ_RETRY).min(deadline);
            match tokio::time::timeout_at(attempt, rx).await {
                Ok(Ok(index)) => {
                    return tokio::time::timeout_at(deadline, self.shared.wait_applied(index))
                        .await
                        .map_err(|_| KvError::Timeout);
                }
                _ if tokio::time::Instant::now() >= deadline => {
                    return Err(if self.shared.leader() == 0 {
                        KvError::NoLeader
                    } else {
                        KvError::Timeout
                    });
                }
                // Dropped (no leader) or not answered: ask again (a stopped raft thread
                // refuses the next send).
                _ => {}
            }
        }
    }

    /// Hands a message from another member to raft.
    pub fn step(&self, message: Message) -> Result<(), KvError> {
        self.tx
            .send(Command::Step(Box::new(message)))
            .map_err(|_| KvError::Stopped)
    }

    /// The transport to the other members (lease calls go to the leader through it).
    pub fn outbox(&self) -> &Outbox {
        &self.outbox
    }

    pub fn status(&self) -> NodeStatus {
        NodeStatus {
            leader: self.shared.leader(),
            term: self.shared.term(),
            index: self.shared.raft_index(),
        }
    }
}

/// Errors starting raft.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// raft-rs refused the configuration or the stored state.
    #[error("raft: {0}")]
    Raft(#[from] raft::Error),
    /// The raft log could not be read or written.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// The raft thread could not be started.
    #[error("starting the raft thread: {0}")]
    Thread(#[source] std::io::Error),
}

/// The channel to the raft thread: the transport needs its sender before raft starts.
pub fn channel() -> (std_mpsc::Sender<Command>, std_mpsc::Receiver<Command>) {
    std_mpsc::channel()
}

/// Everything raft's thread works with.
#[derive(Debug)]
pub struct Parts {
    pub config: Arc<ClusterConfig>,
    pub log: RaftLog,
    pub shared: Arc<Shared>,
    pub applier: Applier,
    pub outbox: Outbox,
    pub channel: (std_mpsc::Sender<Command>, std_mpsc::Receiver<Command>),
    /// Where a received snapshot is kept until the store holds it.
    pub data_dir: PathBuf,
}

/// Starts raft on the log (bootstrapping the membership of a new cluster) and its thread.
pub fn start(
    parts: Parts,
    cancel: CancellationToken,
) -> Result<(Arc<RaftHandle>, std::thread::JoinHandle<()>), NodeError> {
    let Parts {
        config,
        mut log,
        shared,
        applier,
        outbox,
        channel: (tx, rx),
        data_dir,
    } = parts;
    if !log.initialized() {
        let cs = raft::eraftpb::ConfState {
            voters: config.members.iter().map(|m| m.id).collect(),
            ..Default::default()
        };
        log.persist(&[], None, Some(&cs))?;
    }
    let raft_config = raft::Config {
        id: config.id,
        election_tick: ELECTION_TICKS,
        heartbeat_tick: 1,
        applied: shared.applied(),
        max_size_per_msg: 1 << 20,
        max_inflight_msgs: 256,
        check_quorum: true,
        pre_vote: true,
        ..raft::Config::default()
    };
    raft_config.validate()?;
    let logger = slog::Logger::root(slog::Discard, slog::o!());
    let node = RawNode::new(&raft_config, log.store(), &logger)?;
    shared.set_raft(0, node.raft.term, node.raft.raft_log.last_index());
    let handle = Arc::new(RaftHandle {
        tx,
        shared: shared.clone(),
        config: config.clone(),
        seq: AtomicU64::new(1),
        outbox: outbox.clone(),
    });
    let mut owner = Owner {
        node,
        log,
        shared,
        applier,
        outbox,
        id: config.id,
        waiting: HashMap::new(),
        reads: HashMap::new(),
        leader: 0,
        snapshot_count: config.snapshot_count.max(1),
        dump: None,
        data_dir,
    };
    let thread = std::thread::Builder::new()
        .name("raft".into())
        .spawn(move || owner.run(&rx, &cancel))
        .map_err(NodeError::Thread)?;
    Ok((handle, thread))
}

struct Owner {
    node: RawNode<LogStore>,
    log: RaftLog,
    shared: Arc<Shared>,
    applier: Applier,
    outbox: Outbox,
    id: u64,
    /// Proposals of this member waiting for their entry to be applied.
    waiting: HashMap<u64, (Instant, Reply)>,
    /// Read index requests waiting for raft's answer.
    reads: HashMap<u64, (Instant, oneshot::Sender<u64>)>,
    leader: u64,
    snapshot_count: u64,
    /// An image of the store being made for a member that fell behind the log.
    dump: Option<oneshot::Receiver<Result<Vec<u8>, StorageError>>>,
    data_dir: PathBuf,
}

/// Where a received snapshot waits until the store holds it (the log already says the
/// member is there, so a restart restores from this file).
pub const SNAPSHOT_FILE: &str = "raft.snap";

impl Owner {
    fn run(&mut self, rx: &std_mpsc::Receiver<Command>, cancel: &CancellationToken) {
        let span = tracing::info_span!("raft", member = format_args!("{:x}", self.id));
        let _entered = span.enter();
        let mut last_tick = Instant::now();
        while !cancel.is_cancelled() {
            let wait = TICK.saturating_sub(last_tick.elapsed());
            match rx.recv_timeout(wait) {
                Ok(command) => {
                    self.handle(command);
                    for command in rx.try_iter().take(BATCH) {
                        self.handle(command);
                    }
                }
                Err(std_mpsc::RecvTimeoutError::Timeout) => {}
                Err(std_mpsc::RecvTimeoutError::Disconnected) => break,
            }
            if last_tick.elapsed() >= TICK {
                last_tick = Instant::now();
                self.node.tick();
                self.forget_stale();
            }
            if let Err(error) = self.on_ready().and_then(|()| self.maintain_log()) {
                // Raft's log can no longer be trusted to be durable: stop rather than
                // acknowledge what a restart would lose.
                tracing::error!(%error, "raft log write failed; the member stops");
                cancel.cancel();
                break;
            }
        }
        tracing::debug!("raft stopped");
    }

    fn handle(&mut self, command: Command) {
        match command {
            Command::Propose { seq, data, reply } => {
                match self.node.propose(context(self.id, seq), data) {
                    Ok(()) => {
                        self.waiting.insert(seq, (Instant::now(), reply));
                    }
                    Err(_) => {
                        let _ = reply.send(Err(KvError::NoLeader));
                    }
                }
            }
            Command::ReadIndex { seq, reply } => {
                self.node.read_index(seq.to_be_bytes().to_vec());
                self.reads.insert(seq, (Instant::now(), reply));
            }
            Command::Step(message) => {
                if let Err(error) = self.node.step(*message) {
                    tracing::debug!(%error, "raft message ignored");
                }
            }
            Command::Unreachable(id) => self.node.report_unreachable(id),
            Command::SnapshotSent { to, ok } => {
                let status = if ok {
                    raft::SnapshotStatus::Finish
                } else {
                    raft::SnapshotStatus::Failure
                };
                self.node.report_snapshot(to, status);
            }
        }
    }

    /// Drops waiters whose clients have given up (their entries may still apply later).
    fn forget_stale(&mut self) {
        let limit = REQUEST_TIMEOUT * 2;
        self.waiting.retain(|_, (at, _)| at.elapsed() < limit);
        self.reads.retain(|_, (at, _)| at.elapsed() < limit);
    }

    /// Compacts the log once `snapshot_count` entries are applied beyond its start (keeping
    /// some for members just behind), and builds the image raft asked for.
    fn maintain_log(&mut self) -> Result<(), StorageError> {
        let applied = self.shared.applied();
        if applied.saturating_sub(self.log.base()) > self.snapshot_count {
            let keep = (self.snapshot_count / 2).min(CATCH_UP_ENTRIES);
            self.log.compact(applied - keep)?;
            tracing::debug!(through = applied - keep, "raft log compacted");
        }
        if let Some(dump) = &mut self.dump {
            match dump.try_recv() {
                Err(oneshot::error::TryRecvError::Empty) => return Ok(()),
                Err(oneshot::error::TryRecvError::Closed) => self.dump = None,
                Ok(image) => {
                    self.dump = None;
                    match image {
                        Ok(image) => self.offer_snapshot(image)?,
                        Err(error) => tracing::warn!(%error, "building a snapshot failed"),
                    }
                }
            }
        }
        if self.dump.is_none() && self.log.snapshot_wanted() {
            match self.applier.request_dump() {
                Ok(rx) => self.dump = Some(rx),
                Err(error) => tracing::debug!(%error, "no snapshot: the applier stopped"),
            }
        }
        Ok(())
    }

    /// Keeps a built image for raft, with the log position it stands for.
    fn offer_snapshot(&mut self, image: Vec<u8>) -> Result<(), StorageError> {
        let index = storage::image_meta(&image)?.applied_index;
        let Some(term) = self.log.term(index) else {
            // Compacted past it while it was built: raft asks again.
            return Ok(());
        };
        let mut snapshot = Snapshot {
            data: image.into(),
            ..Default::default()
        };
        snapshot.set_metadata(SnapshotMetadata {
            index,
            term,
            conf_state: Some(self.log.conf_state()).into(),
            ..Default::default()
        });
        tracing::info!(index, bytes = snapshot.data.len(), "snapshot ready to send");
        self.log.set_snapshot(snapshot);
        Ok(())
    }

    /// A leader's snapshot: kept in a file, recorded in the log, then the store is replaced
    /// by it, before any entry after it is applied.
    fn install(&mut self, snapshot: &Snapshot) -> Result<(), StorageError> {
        let meta = snapshot.get_metadata();
        tracing::info!(
            index = meta.index,
            term = meta.term,
            bytes = snapshot.data.len(),
            "installing a snapshot from the leader"
        );
        write_durably(&self.data_dir.join(SNAPSHOT_FILE), &snapshot.data)?;
        self.log.install(meta)?;
        self.applier
            .restore_blocking(Arc::new(snapshot.data.to_vec()))?;
        // Waiters for entries inside the snapshot are never answered here.
        self.waiting.clear();
        Ok(())
    }

    fn send(&mut self, messages: Vec<Message>) {
        for to in self.outbox.send(messages) {
            self.node.report_snapshot(to, raft::SnapshotStatus::Failure);
        }
    }

    fn on_ready(&mut self) -> Result<(), StorageError> {
        if !self.node.has_ready() {
            return Ok(());
        }
        let mut ready = self.node.ready();
        self.send(ready.take_messages());
        if !ready.snapshot().is_empty() {
            let snapshot = ready.snapshot().clone();
            self.install(&snapshot)?;
        }
        self.apply(ready.take_committed_entries());
        self.log.persist(ready.entries(), ready.hs(), None)?;
        if let Some(ss) = ready.ss() {
            self.role_changed(ss.leader_id, ss.raft_state);
        }
        self.send(ready.take_persisted_messages());
        for state in ready.take_read_states() {
            let seq = state
                .request_ctx
                .get(..8)
                .and_then(|b| b.try_into().ok())
                .map(u64::from_be_bytes);
            if let Some((_, reply)) = seq.and_then(|seq| self.reads.remove(&seq)) {
                let _ = reply.send(state.index);
            }
        }
        let mut light = self.node.advance(ready);
        if let Some(commit) = light.commit_index() {
            let mut hs = self.node.raft.hard_state();
            hs.commit = commit;
            self.log.persist(&[], Some(&hs), None)?;
        }
        self.send(light.take_messages());
        self.apply(light.take_committed_entries());
        self.node.advance_apply();
        self.publish_status();
        Ok(())
    }

    fn role_changed(&mut self, leader: u64, role: StateRole) {
        if leader != self.leader {
            tracing::info!(
                leader = format_args!("{leader:x}"),
                term = self.node.raft.term,
                ?role,
                "raft leader changed"
            );
            if leader == self.id {
                self.shared.write().refresh_leases(Instant::now());
            }
            self.leader = leader;
        }
        self.publish_status();
    }

    fn publish_status(&self) {
        let term = self.node.raft.term;
        if self.shared.term() != term {
            self.shared.write().set_raft_term(term);
        }
        self.shared
            .set_raft(self.leader, term, self.node.raft.raft_log.last_index());
    }

    fn apply(&mut self, entries: Vec<raft::eraftpb::Entry>) {
        for entry in entries {
            let reply = parse_context(&entry.context)
                .filter(|(member, _)| *member == self.id)
                .and_then(|(_, seq)| self.waiting.remove(&seq))
                .map(|(_, reply)| reply);
            let request = match entry.get_entry_type() {
                EntryType::EntryNormal if entry.data.is_empty() => None,
                EntryType::EntryNormal => match decode_request(&entry.data) {
                    Ok(request) => Some(request),
                    Err(error) => {
                        tracing::error!(index = entry.index, %error, "a committed entry does not decode; skipped");
                        if let Some(reply) = reply {
                            let _ = reply.send(Err(KvError::Malformed(error)));
                        }
                        self.send_applied(entry.index, None, None);
                        continue;
                    }
                },
                EntryType::EntryConfChange | EntryType::EntryConfChangeV2 => {
                    self.conf_change(&entry);
                    None
                }
            };
            self.send_applied(entry.index, request, reply);
        }
    }

    fn send_applied(&self, index: u64, request: Option<WriteRequest>, reply: Option<Reply>) {
        if self.applier.apply_committed(index, request, reply).is_err() {
            tracing::debug!(index, "the applier stopped; entry not applied");
        }
    }

    fn conf_change(&mut self, entry: &raft::eraftpb::Entry) {
        let applied = if entry.get_entry_type() == EntryType::EntryConfChange {
            ConfChange::parse_from_bytes(&entry.data)
                .map_err(|e| e.to_string())
                .and_then(|cc| self.node.apply_conf_change(&cc).map_err(|e| e.to_string()))
        } else {
            ConfChangeV2::parse_from_bytes(&entry.data)
                .map_err(|e| e.to_string())
                .and_then(|cc| self.node.apply_conf_change(&cc).map_err(|e| e.to_string()))
        };
        match applied.map(|cs| self.log.persist(&[], None, Some(&cs))) {
            Ok(Ok(())) => tracing::info!(index = entry.index, "membership changed"),
            Ok(Err(error)) => tracing::error!(%error, "persisting a membership change failed"),
            Err(error) => tracing::error!(%error, "a membership change was refused"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use etcd_client::proto::{PbCompare, PbTxnRequestOp};

    #[test]
    fn every_write_survives_the_log_encoding() {
        let requests = [
            WriteRequest::Put(PbPutRequest {
                key: b"k".to_vec(),
                value: vec![0, 1, 2],
                lease: 7,
                prev_kv: true,
                ..PbPutRequest::default()
            }),
            WriteRequest::Delete(PbDeleteRequest {
                key: b"a".to_vec(),
                range_end: b"b".to_vec(),
                prev_kv: true,
            }),
            WriteRequest::Txn(PbTxnRequest {
                compare: vec![PbCompare {
                    key: b"k".to_vec(),
                    ..PbCompare::default()
                }],
                success: vec![PbTxnRequestOp::default()],
                failure: Vec::new(),
            }),
            WriteRequest::Compact(42),
            WriteRequest::LeaseGrant { id: 9, ttl: 30 },
            WriteRequest::LeaseRevoke(9),
            WriteRequest::Alarm(PbAlarmRequest {
                action: 1,
                member_id: 0xabc,
                alarm: 2,
            }),
        ];
        for request in requests {
            let back = decode_request(&encode_request(&request)).unwrap();
            assert_eq!(format!("{back:?}"), format!("{request:?}"));
        }
        assert!(decode_request(&[]).is_err());
        assert!(decode_request(&[5, 0, 0]).is_err());
        assert!(decode_request(&[99]).is_err());
        assert_eq!(parse_context(&context(3, 4)), Some((3, 4)));
        assert_eq!(parse_context(b"short"), None);
    }
}
