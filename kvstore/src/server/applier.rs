//! The one task that writes: it serializes every write, commits them in groups with one fsync,
//! and only then makes them visible to readers and watchers.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use etcd_client::proto::PbEvent;
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

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
}

impl Shared {
    pub fn new(state: Mvcc, storage: Arc<dyn Storage>) -> Arc<Self> {
        let visible = AtomicI64::new(state.current_revision());
        let (feed, _) = broadcast::channel(FEED_CAPACITY);
        Arc::new(Self {
            state: RwLock::new(state),
            visible,
            feed,
            storage,
        })
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

struct Pending {
    request: WriteRequest,
    reply: oneshot::Sender<Result<WriteResponse, KvError>>,
}

/// How request handlers submit writes.
#[derive(Clone, Debug)]
pub struct Applier {
    tx: mpsc::Sender<Pending>,
}

impl std::fmt::Debug for Pending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.request.fmt(f)
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
        let task = tokio::spawn(run(shared.clone(), rx, cancel.clone()));
        tokio::spawn(expire_leases(shared, applier.clone(), cancel));
        (applier, task)
    }

    pub async fn submit(&self, request: WriteRequest) -> Result<WriteResponse, KvError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Pending { request, reply })
            .await
            .map_err(|_| KvError::Stopped)?;
        rx.await.map_err(|_| KvError::Stopped)?
    }
}

async fn run(shared: Arc<Shared>, mut rx: mpsc::Receiver<Pending>, cancel: CancellationToken) {
    // Applying and committing are pipelined: while one group is being fsynced, the next is
    // gathered and applied in memory (readers still see only durable revisions).
    let (staged_tx, staged_rx) = mpsc::channel(STAGED_DEPTH);
    let committer = tokio::spawn(commit_loop(shared.clone(), staged_rx, cancel.clone()));
    let mut group = Vec::with_capacity(MAX_GROUP);
    loop {
        let first = tokio::select! {
            biased;
            () = cancel.cancelled() => break,
            next = rx.recv() => match next {
                Some(p) => p,
                None => break,
            },
        };
        group.push(first);
        while group.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(p) => group.push(p),
                Err(_) => break,
            }
        }
        let staged = stage(&shared, std::mem::take(&mut group));
        if staged_tx.send(staged).await.is_err() {
            break;
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
    replies: Vec<(Pending, Result<WriteResponse, KvError>)>,
}

impl Staged {
    /// Takes in the group staged right after this one, to be committed together.
    fn absorb(&mut self, later: Staged) {
        self.batch.append(later.batch);
        self.events.extend(later.events);
        self.revision = later.revision;
        self.replies.extend(later.replies);
    }
}

fn stage(shared: &Shared, group: Vec<Pending>) -> Staged {
    let mut batch = Batch::default();
    let mut events = Vec::new();
    let mut state = shared.write();
    let replies = group
        .into_iter()
        .map(|pending| {
            let result = state.apply(&pending.request, &mut batch, &mut events);
            (pending, result)
        })
        .collect();
    batch.meta = Some(state.meta());
    Staged {
        batch,
        events,
        revision: state.current_revision(),
        replies,
    }
}

async fn commit_loop(
    shared: Arc<Shared>,
    mut staged: mpsc::Receiver<Staged>,
    cancel: CancellationToken,
) {
    while let Some(mut group) = staged.recv().await {
        while let Ok(later) = staged.try_recv() {
            group.absorb(later);
        }
        if let Err(error) = commit(&shared, group).await {
            // Memory is now ahead of disk; serving on would acknowledge writes a restart loses.
            tracing::error!(%error, "durable commit failed; the store stops accepting requests");
            cancel.cancel();
            staged.close();
            while let Some(group) = staged.recv().await {
                for (pending, _) in group.replies {
                    let _ = pending.reply.send(Err(KvError::Stopped));
                }
            }
            return;
        }
    }
}

async fn commit(shared: &Shared, group: Staged) -> Result<(), StorageError> {
    let Staged {
        batch,
        events,
        revision,
        replies,
    } = group;
    let storage = shared.storage.clone();
    let committed = tokio::task::spawn_blocking(move || storage.commit(batch))
        .await
        .map_err(|e| StorageError::Task(e.to_string()))
        .and_then(|r| r);
    match committed {
        Ok(()) => {
            shared.visible.store(revision, Ordering::Release);
            if !events.is_empty() {
                // No receivers is fine: nobody is watching.
                let _ = shared.feed.send(Arc::new(Committed { revision, events }));
            }
            for (pending, result) in replies {
                let _ = pending.reply.send(result);
            }
            Ok(())
        }
        Err(error) => {
            for (pending, _) in replies {
                let _ = pending.reply.send(Err(KvError::Stopped));
            }
            Err(error)
        }
    }
}

async fn expire_leases(shared: Arc<Shared>, applier: Applier, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(LEASE_CHECK);
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let expired = shared.write().take_expired(Instant::now());
        for id in expired {
            match applier.submit(WriteRequest::LeaseRevoke(id)).await {
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
