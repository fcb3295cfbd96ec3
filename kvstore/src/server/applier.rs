//! The one task that writes: it serializes every write, commits them in groups with one fsync,
//! and only then makes them visible to readers and watchers.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use etcd_client::proto::PbEvent;
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use super::cluster::RaftHandle;
use super::mvcc::{KvError, Mvcc, WriteRequest, WriteResponse};
use super::storage::{Batch, Storage, StorageError};

/// Writes are gathered while the previous group is being fsynced; this bounds one group.
const MAX_GROUP: usize = 1024;
/// Groups applied in memory and waiting for the committer, which takes all of them in one
/// fsync: staging stays eager, so a group that arrives mid-fsync is not committed alone.
const STAGED_DEPTH: usize = 16;
/// Watch feed depth; a stream that falls further behind catches up from storage.
const FEED_CAPACITY: usize = 4096;
/// How often leases are checked for expiry (etcd checks every 500 ms too).
const LEASE_CHECK: Duration = Duration::from_millis(500);

/// Events of consecutive revisions made durable together.
#[derive(Debug)]
pub struct Committed {
    /// The first revision this commit carries: a stream that has not delivered everything
    /// before it reads the rest from storage first (after a restored image, everything up to
    /// `revision` is there).
    pub from: i64,
    /// The newest revision in this commit.
    pub revision: i64,
    pub events: Vec<PbEvent>,
}

/// State shared by the applier (the only writer), readers and watch streams.
#[derive(Debug)]
pub struct Shared {
    state: RwLock<Mvcc>,
    /// The newest durable revision: what readers see.
    visible: AtomicI64,
    feed: broadcast::Sender<Arc<Committed>>,
    storage: Arc<dyn Storage>,
    /// The last raft entry whose changes are durable and visible (linearizable reads wait
    /// for it to reach their read index).
    applied: watch::Sender<u64>,
    member_id: u64,
    /// The member raft says leads (0: none known); a single member always leads itself.
    leader: AtomicU64,
    /// The raft term and last log index, for `Status`.
    term: AtomicU64,
    raft_index: AtomicU64,
}

impl Shared {
    pub fn new(state: Mvcc, storage: Arc<dyn Storage>) -> Arc<Self> {
        let visible = AtomicI64::new(state.current_revision());
        let (feed, _) = broadcast::channel(FEED_CAPACITY);
        let meta = state.meta();
        Arc::new(Self {
            state: RwLock::new(state),
            visible,
            feed,
            storage,
            applied: watch::Sender::new(meta.applied_index),
            member_id: meta.member_id,
            leader: AtomicU64::new(meta.member_id),
            term: AtomicU64::new(1),
            raft_index: AtomicU64::new(meta.applied_index),
        })
    }

    pub fn member_id(&self) -> u64 {
        self.member_id
    }

    pub fn leader(&self) -> u64 {
        self.leader.load(Ordering::Acquire)
    }

    pub fn is_leader(&self) -> bool {
        self.leader() == self.member_id
    }

    pub fn term(&self) -> u64 {
        self.term.load(Ordering::Acquire)
    }

    pub fn raft_index(&self) -> u64 {
        self.raft_index.load(Ordering::Acquire)
    }

    /// What raft says now: who leads, in which term, how far the log goes.
    pub fn set_raft(&self, leader: u64, term: u64, index: u64) {
        self.leader.store(leader, Ordering::Release);
        self.term.store(term, Ordering::Release);
        self.raft_index.store(index, Ordering::Release);
    }

    /// The last applied raft entry.
    pub fn applied(&self) -> u64 {
        *self.applied.borrow()
    }

    /// Waits until the raft entry at `index` is applied and visible.
    pub async fn wait_applied(&self, index: u64) {
        let mut rx = self.applied.subscribe();
        // The sender lives as long as `self`.
        let _ = rx.wait_for(|applied| *applied >= index).await;
    }

    pub fn read(&self) -> RwLockReadGuard<'_, Mvcc> {
        // A poisoned lock means a reader panicked; the data itself is still consistent.
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    pub fn write(&self) -> RwLockWriteGuard<'_, Mvcc> {
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }

    pub fn visible(&self) -> i64 {
        self.visible.load(Ordering::Acquire)
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Committed>> {
        self.feed.subscribe()
    }

    pub fn storage(&self) -> &Arc<dyn Storage> {
        &self.storage
    }
}

/// Where the answer to one write goes.
pub type Reply = oneshot::Sender<Result<WriteResponse, KvError>>;

/// What the applier takes, in order.
enum Work {
    Write(Pending),
    /// An image of the store once everything before is durable.
    Dump(oneshot::Sender<Result<Vec<u8>, StorageError>>),
    /// Replace the store with an image once everything before is durable; nothing after it
    /// is applied until it is done.
    Restore {
        image: Arc<Vec<u8>>,
        reply: oneshot::Sender<Result<(), StorageError>>,
    },
}

/// Work done between two commits.
enum Between {
    Dump(oneshot::Sender<Result<Vec<u8>, StorageError>>),
    Restore {
        image: Arc<Vec<u8>>,
        reply: oneshot::Sender<Result<(), StorageError>>,
        done: oneshot::Sender<()>,
    },
}

struct Pending {
    /// `None`: a raft entry that changes no key (a leader's first entry, a membership
    /// change), applied only to advance the applied index in order.
    request: Option<WriteRequest>,
    /// The raft index of the entry (0 without raft).
    index: u64,
    reply: Option<Reply>,
}

/// Where writes go: straight to the applier, or through the raft log to every member's.
#[derive(Clone, Debug)]
pub enum Writer {
    Local(Applier),
    Replicated(Arc<RaftHandle>),
}

impl Writer {
    pub async fn submit(&self, request: WriteRequest) -> Result<WriteResponse, KvError> {
        match self {
            Writer::Local(applier) => applier.submit(request).await,
            Writer::Replicated(raft) => raft.submit(request).await,
        }
    }
}

/// How request handlers submit writes.
#[derive(Clone, Debug)]
pub struct Applier {
    tx: mpsc::Sender<Work>,
}

impl std::fmt::Debug for Work {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Work::Write(pending) => pending.request.fmt(f),
            Work::Dump(_) => f.write_str("Dump"),
            Work::Restore { image, .. } => write!(f, "Restore({} bytes)", image.len()),
        }
    }
}

impl Applier {
    /// Starts the applier and the lease expiry tasks; both stop with `cancel`.
    pub fn spawn(
        shared: Arc<Shared>,
        cancel: CancellationToken,
    ) -> (Self, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(MAX_GROUP * 4);
        let applier = Self { tx };
        let task = tokio::spawn(run(shared, rx, cancel));
        (applier, task)
    }

    pub async fn submit(&self, request: WriteRequest) -> Result<WriteResponse, KvError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Work::Write(Pending {
                request: Some(request),
                index: 0,
                reply: Some(reply),
            }))
            .await
            .map_err(|_| KvError::Stopped)?;
        rx.await.map_err(|_| KvError::Stopped)?
    }

    /// Hands over a committed raft entry, in log order, from the raft thread (not async: it
    /// waits when the applier is full, which holds raft back rather than dropping entries).
    pub fn apply_committed(
        &self,
        index: u64,
        request: Option<WriteRequest>,
        reply: Option<Reply>,
    ) -> Result<(), KvError> {
        self.tx
            .blocking_send(Work::Write(Pending {
                request,
                index,
                reply,
            }))
            .map_err(|_| KvError::Stopped)
    }

    /// An image of the store as of every write submitted before (`Maintenance.Snapshot`).
    pub async fn dump(&self) -> Result<Vec<u8>, StorageError> {
        let stopped = || StorageError::Task("the applier stopped".into());
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Work::Dump(reply))
            .await
            .map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
    }

    /// Asks for an image of the store as of everything handed over so far (from the raft
    /// thread, which polls the answer rather than wait for it).
    pub fn request_dump(
        &self,
    ) -> Result<oneshot::Receiver<Result<Vec<u8>, StorageError>>, KvError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .blocking_send(Work::Dump(reply))
            .map_err(|_| KvError::Stopped)?;
        Ok(rx)
    }

    /// Replaces the store with an image after everything handed over so far, and waits for
    /// it (from the raft thread: nothing after a snapshot may apply before it).
    pub fn restore_blocking(&self, image: Arc<Vec<u8>>) -> Result<(), StorageError> {
        let stopped = || StorageError::Task("the applier stopped".into());
        let (reply, rx) = oneshot::channel();
        self.tx
            .blocking_send(Work::Restore { image, reply })
            .map_err(|_| stopped())?;
        rx.blocking_recv().map_err(|_| stopped())?
    }
}

async fn run(shared: Arc<Shared>, mut rx: mpsc::Receiver<Work>, cancel: CancellationToken) {
    // Applying and committing are pipelined: while one group is being fsynced, the next is
    // gathered and applied in memory (readers still see only durable revisions).
    let (staged_tx, staged_rx) = mpsc::channel(STAGED_DEPTH);
    let committer = tokio::spawn(commit_loop(shared.clone(), staged_rx, cancel.clone()));
    let mut group = Vec::with_capacity(MAX_GROUP);
    let mut held: Option<Work> = None;
    'work: loop {
        let first = match held.take() {
            Some(work) => work,
            None => tokio::select! {
                biased;
                () = cancel.cancelled() => break,
                next = rx.recv() => match next {
                    Some(work) => work,
                    None => break,
                },
            },
        };
        let between = match first {
            Work::Write(pending) => {
                group.push(pending);
                while group.len() < MAX_GROUP {
                    match rx.try_recv() {
                        Ok(Work::Write(pending)) => group.push(pending),
                        Ok(other) => {
                            held = Some(other);
                            break;
                        }
                        Err(_) => break,
                    }
                }
                let staged = stage(&shared, std::mem::take(&mut group));
                if staged_tx.send(Ok(staged)).await.is_err() {
                    break;
                }
                continue 'work;
            }
            Work::Dump(reply) => (Between::Dump(reply), None),
            Work::Restore { image, reply } => {
                let (done, finished) = oneshot::channel();
                (Between::Restore { image, reply, done }, Some(finished))
            }
        };
        if staged_tx.send(Err(between.0)).await.is_err() {
            break;
        }
        // Nothing after an image is staged on the state it replaces.
        if let Some(finished) = between.1 {
            let _ = finished.await;
        }
    }
    rx.close();
    drop(staged_tx);
    let _ = committer.await;
    tracing::debug!("applier stopped");
}

/// A group applied in memory, waiting to become durable.
struct Staged {
    batch: Batch,
    events: Vec<PbEvent>,
    revision: i64,
    applied: u64,
    replies: Vec<(Reply, Result<WriteResponse, KvError>)>,
}

impl Staged {
    /// Takes in the group staged right after this one, to be committed together.
    fn absorb(&mut self, later: Staged) {
        self.batch.append(later.batch);
        self.events.extend(later.events);
        self.revision = later.revision;
        self.applied = later.applied;
        self.replies.extend(later.replies);
    }
}

fn stage(shared: &Shared, group: Vec<Pending>) -> Staged {
    let mut batch = Batch::default();
    let mut events = Vec::new();
    let mut state = shared.write();
    let mut replies = Vec::with_capacity(group.len());
    for pending in group {
        let result = pending
            .request
            .as_ref()
            .map(|request| state.apply(request, &mut batch, &mut events));
        if pending.index > 0 {
            state.set_applied(pending.index);
        }
        if let (Some(reply), Some(result)) = (pending.reply, result) {
            replies.push((reply, result));
        }
    }
    batch.meta = Some(state.meta());
    Staged {
        batch,
        events,
        revision: state.current_revision(),
        applied: state.meta().applied_index,
        replies,
    }
}

/// What the committer takes: a staged group, or work to do between two commits.
type Step = Result<Staged, Between>;

async fn commit_loop(
    shared: Arc<Shared>,
    mut staged: mpsc::Receiver<Step>,
    cancel: CancellationToken,
) {
    let mut carried: Option<Step> = None;
    loop {
        let step = match carried.take() {
            Some(step) => step,
            None => match staged.recv().await {
                Some(step) => step,
                None => break,
            },
        };
        let mut group = match step {
            Ok(group) => group,
            Err(between) => {
                if let Err(error) = between_commits(&shared, between).await {
                    tracing::error!(%error, "restoring an image failed; the store stops accepting requests");
                    cancel.cancel();
                }
                continue;
            }
        };
        while let Ok(later) = staged.try_recv() {
            match later {
                Ok(later) => group.absorb(later),
                Err(between) => {
                    carried = Some(Err(between));
                    break;
                }
            }
        }
        if let Err(error) = commit(&shared, group).await {
            // Memory is now ahead of disk; serving on would acknowledge writes a restart loses.
            tracing::error!(%error, "durable commit failed; the store stops accepting requests");
            cancel.cancel();
            staged.close();
            while let Some(step) = staged.recv().await {
                if let Ok(group) = step {
                    for (reply, _) in group.replies {
                        let _ = reply.send(Err(KvError::Stopped));
                    }
                }
            }
            return;
        }
    }
}

/// A dump or a restore, with every earlier group durable and none later committed. A failed
/// restore leaves memory and disk disagreeing, so it is an error that stops the store.
async fn between_commits(shared: &Shared, between: Between) -> Result<(), StorageError> {
    let storage = shared.storage.clone();
    match between {
        Between::Dump(reply) => {
            let image = tokio::task::spawn_blocking(move || storage.dump())
                .await
                .map_err(|e| StorageError::Task(e.to_string()))
                .and_then(|r| r);
            let _ = reply.send(image);
            Ok(())
        }
        Between::Restore { image, reply, done } => {
            let restored = tokio::task::spawn_blocking(move || storage.restore(&image))
                .await
                .map_err(|e| StorageError::Task(e.to_string()))
                .and_then(|r| r);
            let result = restored.map(|loaded| {
                let (meta, term) = {
                    let state = shared.read();
                    (state.meta(), state.raft_term())
                };
                let mut state = Mvcc::open(shared.storage.clone(), loaded);
                state.set_identity(meta.cluster_id, meta.member_id);
                state.set_raft_term(term);
                let revision = state.current_revision();
                let applied = state.meta().applied_index;
                *shared.write() = state;
                shared.visible.store(revision, Ordering::Release);
                shared.applied.send_if_modified(|current| {
                    let advanced = applied > *current;
                    *current = (*current).max(applied);
                    advanced
                });
                // Streams check they hold everything up to the image's revision.
                let _ = shared.feed.send(Arc::new(Committed {
                    from: revision + 1,
                    revision,
                    events: Vec::new(),
                }));
                tracing::info!(revision, applied, "store replaced by an image");
            });
            let failed = result.as_ref().err().map(ToString::to_string);
            let _ = reply.send(result);
            let _ = done.send(());
            match failed {
                Some(error) => Err(StorageError::Task(error)),
                None => Ok(()),
            }
        }
    }
}

async fn commit(shared: &Shared, group: Staged) -> Result<(), StorageError> {
    let Staged {
        batch,
        events,
        revision,
        applied,
        replies,
    } = group;
    let storage = shared.storage.clone();
    let from = shared.visible() + 1;
    let committed = tokio::task::spawn_blocking(move || storage.commit(batch))
        .await
        .map_err(|e| StorageError::Task(e.to_string()))
        .and_then(|r| r);
    match committed {
        Ok(()) => {
            shared.visible.store(revision, Ordering::Release);
            shared.applied.send_if_modified(|current| {
                let advanced = applied > *current;
                *current = (*current).max(applied);
                advanced
            });
            if !events.is_empty() {
                // No receivers is fine: nobody is watching.
                let _ = shared.feed.send(Arc::new(Committed {
                    from,
                    revision,
                    events,
                }));
            }
            for (reply, result) in replies {
                let _ = reply.send(result);
            }
            Ok(())
        }
        Err(error) => {
            for (reply, _) in replies {
                let _ = reply.send(Err(KvError::Stopped));
            }
            Err(error)
        }
    }
}

/// Revokes expired leases through `writer` (the log, with raft). Only the leader expires
/// leases: keepalives reach only it, so only its clocks are right.
pub async fn expire_leases(shared: Arc<Shared>, writer: Writer, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(LEASE_CHECK);
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        if !shared.is_leader() {
            continue;
        }
        let expired = shared.write().take_expired(Instant::now());
        for id in expired {
            match writer.submit(WriteRequest::LeaseRevoke(id)).await {
                Ok(_) => tracing::debug!(lease = id, "lease expired and was revoked"),
                Err(KvError::LeaseNotFound) => {}
                Err(error) => {
                    tracing::warn!(lease = id, %error, "revoking an expired lease failed");
                    shared.write().release_expiring(id);
                }
            }
        }
    }
}
