//! One peer's mirror: [`peer_follow::follow_peer`] reads the peer's store (the probe of its
//! identity, config and heartbeat; a listing at one revision; the merged watch; resume,
//! relist, backoff), the same driver the agent's direct mode uses, and hands what it read to
//! a [`CacheSink`], which writes it into the local store's cache under kvstoremesh's lease
//! and keeps the peer's status.
//!
//! Everything about one peer (its cache keys, status) is owned by its task and nothing else,
//! so there is no locking on the data path.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use kvstore::client::{Error as StoreError, Op, PeerConfig, PeerFileError};
use model::keys::{cache_canary_prefix, cluster_config_key, heartbeat_cache_key, peer_status_key};
use model::{ClusterName, Entry, Kind, PeerStatus, StateKey, StoreValue, to_cache_key};
use peer_follow::session::{self, SinkClosed};
use peer_follow::{Claims, EntryChange, LinkError, Part, Sink};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use daemon::error_chain as chain;

use crate::Timing;
use crate::board::Board;
use crate::local::{self, Digests, Lease, Local, digest};
use crate::metrics::{Metrics, PeerMetrics, Stage};
use crate::status::{self, rfc3339};

/// Warnings about refused entries per peer per window, before they are only counted.
const WARNINGS_PER_WINDOW: u32 = 10;
const WARNING_WINDOW: Duration = Duration::from_secs(10);
/// Idle watches of a peer ask for progress this often, so a canary written under one prefix
/// is handed out once every other prefix is known to have nothing earlier.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(200);
/// Keys per page when listing a peer (the client's default is 1000).
const LIST_PAGE_SIZE: u32 = 5000;
/// After a failed write to the local store, the peer's full state is written again this
/// much later.
const LOCAL_RETRY: Duration = Duration::from_secs(1);

/// What every peer task shares.
#[derive(Debug)]
pub(crate) struct Shared {
    pub local: Local,
    pub local_config: model::ClusterConfig,
    pub timing: Timing,
    pub metrics: Arc<Metrics>,
    pub claims: Arc<Claims>,
    pub board: Arc<Board>,
}

/// Why a peer is not (or no longer) mirrored, besides what the driver reports of the peer's
/// store; its text becomes the status's `last_error`.
#[derive(Debug, thiserror::Error)]
pub enum MirrorError {
    /// The peer file cannot be used.
    #[error(transparent)]
    PeerFile(PeerFileError),
    /// The local store cannot be written.
    #[error("writing the local store")]
    Local(#[source] StoreError),
}

/// A peer's validated entries with the bytes the peer wrote: what the cache must hold.
/// Values are shared, so handing the part out whole costs no copy of them.
#[derive(Clone, Debug, Default)]
pub(crate) struct CachePart {
    entries: BTreeMap<StateKey, (Kind, Arc<[u8]>)>,
}

impl Part for CachePart {
    fn upsert(&mut self, entry: &Entry, raw: &[u8]) {
        self.entries
            .insert(entry.key(), (entry.kind(), Arc::from(raw)));
    }

    fn remove(&mut self, key: &StateKey) -> bool {
        self.entries.remove(key).is_some()
    }

    fn values(&self) -> Vec<(Kind, String, Vec<u8>)> {
        self.entries
            .iter()
            .map(|(key, (kind, value))| (*kind, key.to_string(), value.to_vec()))
            .collect()
    }
}

type PeerUpdate = peer_follow::PeerUpdate<CachePart>;

/// Rate-limits warnings about refused entries, so a hostile peer cannot flood the log.
#[derive(Debug)]
struct LogLimiter {
    window_start: Instant,
    in_window: u32,
    suppressed: u64,
}

impl LogLimiter {
    fn new() -> Self {
        LogLimiter {
            window_start: Instant::now(),
            in_window: 0,
            suppressed: 0,
        }
    }

    /// Whether to log now, and how many were suppressed before.
    fn allow(&mut self) -> Option<u64> {
        if self.window_start.elapsed() >= WARNING_WINDOW {
            self.window_start = Instant::now();
            self.in_window = 0;
        }
        if self.in_window < WARNINGS_PER_WINDOW {
            self.in_window += 1;
            Some(std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed += 1;
            None
        }
    }
}

/// Runs one peer until `cancel`.
pub(crate) async fn run_peer(
    shared: Arc<Shared>,
    peer: ClusterName,
    config: Result<PeerConfig, PeerFileError>,
    cancel: CancellationToken,
) {
    let mut sink = CacheSink::new(shared.clone(), peer.clone());
    let config = match config {
        Ok(config) => config,
        Err(error) => {
            sink.failed(Stage::Config, &chain(&MirrorError::PeerFile(error)));
            tokio::select! {
                () = cancel.cancelled() => {}
                () = sink.publish_status_when_leased() => cancel.cancelled().await,
            }
            return;
        }
    };
    let timing = &shared.timing;
    let session = session::Timing {
        progress_interval: PROGRESS_INTERVAL,
        probe_interval: timing.probe_interval,
        probe_timeout: timing.probe_timeout,
        backoff_base: timing.backoff_base,
        backoff_max: timing.backoff_max,
        list_page_size: LIST_PAGE_SIZE,
    };
    peer_follow::follow_peer(
        peer,
        shared.local_config.clone(),
        &Kind::ALL,
        shared.claims.clone(),
        config.client,
        session,
        sink,
        cancel,
    )
    .await;
}

/// Writes what the driver read of one peer into the local store's cache, under
/// kvstoremesh's lease, and keeps the peer's status.
pub(crate) struct CacheSink {
    shared: Arc<Shared>,
    peer: ClusterName,
    metrics: PeerMetrics,
    status: PeerStatus,
    /// The status bytes last written, and under which lease.
    status_written: Option<(Vec<u8>, kvstore::client::LeaseId)>,
    status_written_at: Option<Instant>,
    /// The lease the cache is written under.
    lease: Option<Lease>,
    lease_changes: watch::Receiver<Option<Lease>>,
    /// The cache keys of each kind, as written.
    keys: HashMap<Kind, HashSet<String>>,
    /// The cache holds the peer's full state as of now (false while the peer resyncs).
    synced: bool,
    /// The cache holds a full state of the peer (from this task, or adopted from an earlier
    /// kvstoremesh), maybe stale while the peer is unreachable.
    complete: bool,
    /// A full state was written by this task.
    replaced_once: bool,
    /// The accepted config's bytes, and the digest and lease generation last mirrored.
    config: Option<Vec<u8>>,
    mirrored_config: Option<(u64, u64)>,
    /// The peer's heartbeat (`None`: absent), and the digest and lease generation mirrored.
    heartbeat: Option<Vec<u8>>,
    mirrored_heartbeat: Option<(Option<u64>, u64)>,
    /// When to ask the driver for the peer's full state again: the cache may lack what was
    /// handed over (a failed local write: a little later) or hold it under a lease that is
    /// gone (a new lease: at once).
    lost: Option<Instant>,
    /// The lease generation under which the cache of a previous connection was adopted.
    adopted: Option<u64>,
    refusal_drained: bool,
    /// When the current full sync started.
    sync_started: Option<Instant>,
    /// The cache's digests, read beside the peer's listing (see [`Sink::listing_soon`]);
    /// dropped as soon as anything else touches the cache, so a full write compares with
    /// what the cache holds.
    prefetched: Option<tokio::task::JoinHandle<kvstore::client::Result<Vec<Digests>>>>,
    log_limit: LogLimiter,
}

impl Sink<CachePart> for CacheSink {
    async fn deliver(&mut self, updates: Vec<PeerUpdate>) -> Result<(), SinkClosed> {
        let lease = self.current_lease().await?;
        let mut ops = Vec::new();
        let mut changes = 0u64;
        let mut force = false;
        for update in updates {
            match update {
                PeerUpdate::Change { change, .. } => {
                    self.forget_prefetched();
                    changes += 1;
                    ops.extend(self.change_op(change, lease));
                }
                update => {
                    self.write_changes(std::mem::take(&mut ops)).await;
                    force = true;
                    self.handle(update, lease).await;
                }
            }
        }
        self.write_changes(ops).await;
        self.metrics.events.inc_by(changes);
        self.publish_status(force).await;
        Ok(())
    }

    async fn lost_state(&mut self) {
        loop {
            if let Some(at) = self.lost {
                tokio::time::sleep_until(at.into()).await;
                self.lost = None;
                return;
            }
            let now = *self.lease_changes.borrow_and_update();
            if let (Some(written), Some(now)) = (self.lease, now)
                && written.generation != now.generation
            {
                self.new_lease(now);
                continue;
            }
            if self.lease_changes.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    fn listing_soon(&mut self) {
        self.forget_prefetched();
        self.prefetched = Some(tokio::spawn(cache_digests(
            self.shared.local.clone(),
            self.peer.clone(),
        )));
    }
}

/// The digests of everything the cache holds of `peer`, one map per kind in [`Kind::ALL`]
/// order.
async fn cache_digests(local: Local, peer: ClusterName) -> kvstore::client::Result<Vec<Digests>> {
    let prefixes = Kind::ALL.map(|kind| kind.cache_prefix(&peer));
    futures::future::try_join_all(prefixes.iter().map(|p| local.digests(p))).await
}

impl Drop for CacheSink {
    fn drop(&mut self) {
        self.forget_prefetched();
    }
}

impl CacheSink {
    fn new(shared: Arc<Shared>, peer: ClusterName) -> Self {
        let metrics = shared.metrics.peer(&peer);
        // A restarted task (the peer file changed) carries the counters and errors on, but
        // is not connected yet.
        let mut status = shared
            .board
            .status_of(&peer)
            .unwrap_or_else(|| status::configured(&peer));
        if status.connected {
            status.connected = false;
            status.connected_since = None;
            status.disconnected_since = Some(rfc3339(SystemTime::now()));
        }
        CacheSink {
            metrics,
            status,
            status_written: None,
            status_written_at: None,
            lease: None,
            lease_changes: shared.local.lease_changes(),
            keys: HashMap::new(),
            synced: false,
            complete: false,
            replaced_once: false,
            config: None,
            mirrored_config: None,
            heartbeat: None,
            mirrored_heartbeat: None,
            lost: None,
            adopted: None,
            refusal_drained: false,
            sync_started: None,
            prefetched: None,
            log_limit: LogLimiter::new(),
            shared,
            peer,
        }
    }

    /// The lease to write under, waiting for one; a new lease means everything written
    /// under the old one must be written again.
    async fn current_lease(&mut self) -> Result<Lease, SinkClosed> {
        let lease = self.shared.local.wait_lease().await.ok_or(SinkClosed)?;
        match self.lease {
            Some(written) if written.generation != lease.generation => self.new_lease(lease),
            Some(_) => {}
            None => self.lease = Some(lease),
        }
        Ok(lease)
    }

    fn new_lease(&mut self, lease: Lease) {
        tracing::info!(lease = %lease.id, "new local lease: rewriting the peer's cache under it");
        self.lease = Some(lease);
        self.mirrored_config = None;
        self.mirrored_heartbeat = None;
        self.status_written = None;
        self.synced = false;
        // Whoever noticed the new lease (a delivery or the idle watch), what was written
        // under the old one is rewritten whole.
        self.lost = Some(Instant::now());
    }

    async fn handle(&mut self, update: PeerUpdate, lease: Lease) {
        // What writes the peer's cache (a refusal drains it, a lost link adopts it) makes
        // digests read before it stale.
        if matches!(
            update,
            PeerUpdate::Config { config: Err(_), .. }
                | PeerUpdate::Link {
                    connected: false,
                    ..
                }
        ) {
            self.forget_prefetched();
        }
        match update {
            PeerUpdate::Config {
                config: Ok(config),
                raw,
                ..
            } => {
                tracing::info!(
                    id = config.id.get(),
                    max_connected_clusters = %config.max_connected_clusters,
                    capabilities = ?config.capabilities,
                    "accepted the peer's cluster config"
                );
                self.status.cluster_id = Some(config.id.get());
                self.status.refused = false;
                self.metrics.refused.set(0);
                self.refusal_drained = false;
                self.config = Some(raw);
                self.mirror_config(lease).await;
                self.mirror_heartbeat(lease).await;
            }
            PeerUpdate::Config {
                config: Err(error), ..
            } => {
                self.status.refused = true;
                self.metrics.refused.set(1);
                self.config = None;
                self.synced = false;
                tracing::error!(%error, "peer refused: nothing of it is mirrored");
                // The status says why at once; the failed attempt is counted when the
                // session ends with this refusal.
                self.status.last_error = Some(error);
                self.status.last_error_time = Some(rfc3339(SystemTime::now()));
                self.drain_refused().await;
            }
            PeerUpdate::Listing { reason, .. } => {
                self.metrics.relist(reason.as_str());
                self.sync_started = Some(Instant::now());
            }
            PeerUpdate::Phase { phase, .. } => {
                self.synced = phase == model::Phase::Synced;
            }
            PeerUpdate::Replace { part, .. } => self.replace(part, lease).await,
            PeerUpdate::Link {
                connected: true, ..
            } => self.set_connected(),
            PeerUpdate::Link {
                connected: false,
                error,
                silent,
                ..
            } => {
                self.set_disconnected(silent);
                if let Some(error) = error {
                    let stage = match &error {
                        LinkError::Store(_) => Stage::Peer,
                        LinkError::Config(_) | LinkError::File(_) => Stage::Config,
                    };
                    self.failed(stage, error.text());
                }
                self.adopt().await;
            }
            PeerUpdate::Heartbeat { value, .. } => {
                self.heartbeat = value;
                self.mirror_heartbeat(lease).await;
            }
            PeerUpdate::Invalid { kind, error, .. } => self.refused(kind, &error),
            PeerUpdate::Change { .. }
            | PeerUpdate::Configured { .. }
            | PeerUpdate::SourceLink { .. } => {}
        }
    }

    /// The cache operation for one change of the peer's, if any.
    fn change_op(&mut self, change: EntryChange, lease: Lease) -> Option<Op<Vec<u8>>> {
        match change {
            EntryChange::Upsert { entry, raw } => {
                let kind = entry.kind();
                match to_cache_key(&entry.key(), &self.peer) {
                    Ok(key) => {
                        self.keys.entry(kind).or_default().insert(key.clone());
                        Some(Op::put_leased(key, raw, lease.id))
                    }
                    Err(error) => {
                        self.refused(kind, &chain(&error));
                        None
                    }
                }
            }
            EntryChange::Delete(key) => {
                let kind = key.kind();
                let key = to_cache_key(&key, &self.peer).ok()?;
                self.keys
                    .get_mut(&kind)
                    .is_some_and(|keys| keys.remove(&key))
                    .then(|| Op::delete(key))
            }
        }
    }

    /// Applies one batch of changes (writes to distinct keys commute, so a large batch goes
    /// in concurrent chunks).
    async fn write_changes(&mut self, ops: Vec<Op<Vec<u8>>>) {
        if ops.is_empty() {
            return;
        }
        let mut seen = HashSet::with_capacity(ops.len());
        let distinct = ops.iter().all(|op| seen.insert(op.key()));
        drop(seen);
        self.write(ops, distinct).await;
        self.count_entries();
    }

    /// Writes `ops` to the local store; says whether they were written. A failure marks the
    /// cache as lost: the driver hands the peer's full state out again a little later
    /// ([`Sink::lost_state`]) and it is written whole, so nothing handed over is lost.
    async fn write(&mut self, ops: Vec<Op<Vec<u8>>>, unordered: bool) -> bool {
        let result = if unordered {
            self.shared.local.apply_unordered(ops).await
        } else {
            self.shared.local.apply(ops).await
        };
        match result {
            Ok(()) => true,
            Err(error) => {
                self.failed(Stage::Local, &chain(&MirrorError::Local(error)));
                self.lost = Some(Instant::now() + LOCAL_RETRY);
                self.synced = false;
                false
            }
        }
    }

    /// Makes the cache equal to the peer's full state: writes only what differs (or is
    /// under another lease), deletes what the peer no longer has, then writes the canaries.
    async fn replace(&mut self, part: CachePart, lease: Lease) {
        // A full write is what a lost cache waits for: unless this one fails too.
        self.lost = None;
        let started = Instant::now();
        let prefetched = match self.prefetched.take() {
            Some(reading) => reading.await.ok(),
            None => None,
        };
        let listings = match prefetched {
            Some(listings) => listings,
            None => cache_digests(self.shared.local.clone(), self.peer.clone()).await,
        };
        let have = match listings {
            Ok(listings) => listings,
            Err(error) => {
                self.failed(Stage::Local, &chain(&MirrorError::Local(error)));
                self.lost = Some(Instant::now() + LOCAL_RETRY);
                return;
            }
        };
        let read_ms = started.elapsed().as_millis() as u64;
        let mut wanted: HashMap<Kind, HashSet<String>> = HashMap::new();
        let mut ops = Vec::new();
        let mut unchanged = 0usize;
        for (state_key, (kind, value)) in part.entries {
            let key = match to_cache_key(&state_key, &self.peer) {
                Ok(key) => key,
                Err(error) => {
                    self.refused(kind, &chain(&error));
                    continue;
                }
            };
            let same = have[kind_index(kind)]
                .get(&key)
                .is_some_and(|(d, l)| *l == Some(lease.id) && *d == digest(&value));
            if same {
                unchanged += 1;
            } else {
                ops.push(Op::put_leased(key.clone(), value.to_vec(), lease.id));
            }
            wanted.entry(kind).or_default().insert(key);
        }
        let puts = ops.len();
        for (kind, have) in Kind::ALL.into_iter().zip(have) {
            let keep = wanted.get(&kind);
            ops.extend(
                have.into_keys()
                    .filter(|key| !keep.is_some_and(|k| k.contains(key)))
                    .map(Op::delete),
            );
        }
        let deletes = ops.len() - puts;
        self.keys = wanted;
        if !self.write(ops, true).await {
            return;
        }
        let now = rfc3339(SystemTime::now()).into_bytes();
        let canaries = Kind::ALL
            .into_iter()
            .map(|kind| Op::put_leased(kind.cache_canary_key(&self.peer), now.clone(), lease.id))
            .collect();
        if !self.write(canaries, true).await {
            return;
        }
        self.synced = true;
        self.complete = true;
        self.replaced_once = true;
        self.mirror_config(lease).await;
        self.mirror_heartbeat(lease).await;
        self.count_entries();
        let took = self
            .sync_started
            .take()
            .map_or(started.elapsed(), |t| t.elapsed());
        self.metrics.sync_seconds.set(took.as_secs_f64());
        self.status.last_sync_time = Some(rfc3339(SystemTime::now()));
        tracing::info!(
            entries = self.keys.values().map(HashSet::len).sum::<usize>(),
            puts,
            deletes,
            unchanged,
            read_cache_ms = read_ms,
            write_ms = started.elapsed().as_millis() as u64 - read_ms,
            elapsed_ms = took.as_millis() as u64,
            "the cache holds the peer's full state"
        );
    }

    fn forget_prefetched(&mut self) {
        if let Some(reading) = self.prefetched.take() {
            reading.abort();
        }
    }

    fn count_entries(&self) {
        for kind in Kind::ALL {
            let entries = self.keys.get(&kind).map_or(0, HashSet::len);
            self.metrics.entries(kind).set(entries as i64);
        }
    }

    /// Writes the accepted config to `cilium/cluster-config/<peer>` if it is not there
    /// under the current lease.
    async fn mirror_config(&mut self, lease: Lease) {
        let Some(config) = &self.config else {
            return;
        };
        let state = (digest(config), lease.generation);
        if self.mirrored_config == Some(state) {
            return;
        }
        let op = Op::put_leased(cluster_config_key(&self.peer), config.clone(), lease.id);
        if self.write(vec![op], false).await {
            self.mirrored_config = Some(state);
        }
    }

    /// Copies the peer's `cilium/.heartbeat` to `cilium/cache/heartbeat/<peer>`, once its
    /// config is accepted (nothing of a refused peer is mirrored).
    async fn mirror_heartbeat(&mut self, lease: Lease) {
        if self.config.is_none() {
            return;
        }
        let state = (self.heartbeat.as_deref().map(digest), lease.generation);
        if self.mirrored_heartbeat == Some(state) {
            return;
        }
        let key = heartbeat_cache_key(&self.peer);
        let op = match &self.heartbeat {
            Some(bytes) => Op::put_leased(key, bytes.clone(), lease.id),
            None => Op::delete(key),
        };
        if self.write(vec![op], false).await {
            self.mirrored_heartbeat = Some(state);
        }
    }

    /// Counts and (rate-limited) logs a refused entry of the peer.
    fn refused(&mut self, kind: Kind, error: &str) {
        self.metrics.invalid(kind).inc();
        self.status.invalid_entries += 1;
        if let Some(suppressed) = self.log_limit.allow() {
            tracing::warn!(
                peer = %self.peer,
                %kind,
                error,
                suppressed,
                "refused an entry of the peer; it is not cached"
            );
        }
    }

    fn set_connected(&mut self) {
        if !self.status.connected {
            tracing::info!("connected to the peer's store");
            self.status.connected = true;
            self.status.connected_since = Some(rfc3339(SystemTime::now()));
            self.status.disconnected_since = None;
            self.status.silent_ms = None;
            self.metrics.connected.set(1);
        }
    }

    fn set_disconnected(&mut self, silent: Duration) {
        if self.status.connected {
            self.status.connected = false;
            self.status.disconnected_since = Some(rfc3339(SystemTime::now()));
            self.status.silent_ms = Some(u64::try_from(silent.as_millis()).unwrap_or(u64::MAX));
            self.status.connected_since = None;
            self.metrics.connected.set(0);
        }
    }

    fn failed(&mut self, stage: Stage, text: &str) {
        let repeated = self.status.last_error.as_deref() == Some(text);
        self.status.failures += 1;
        self.status.last_error = Some(text.to_owned());
        self.status.last_error_time = Some(rfc3339(SystemTime::now()));
        self.metrics.error(stage);
        if repeated {
            tracing::debug!(error = text, "peer not mirrored; retrying");
        } else {
            tracing::warn!(error = text, "peer not mirrored; retrying");
        }
    }

    /// Deletes whatever the cache holds of a refused peer (once per refusal).
    async fn drain_refused(&mut self) {
        if self.refusal_drained {
            return;
        }
        match local::drain_peer(&self.shared.local, &self.peer, true).await {
            Ok(()) => {
                self.refusal_drained = true;
                self.mirrored_config = None;
                self.mirrored_heartbeat = None;
                self.keys.clear();
                self.complete = false;
                self.count_entries();
                tracing::info!("removed every cached entry of the refused peer");
            }
            Err(error) => {
                tracing::warn!(error = %chain(&error), "cannot remove the refused peer's cache yet");
            }
        }
    }

    /// While the peer is unreachable, keeps its cache (from this or an earlier kvstoremesh)
    /// alive by attaching it to the current lease.
    async fn adopt(&mut self) {
        let Some(lease) = self.shared.local.lease() else {
            return;
        };
        // What this task wrote under the current lease needs nothing.
        let written = self.lease == Some(lease) && self.replaced_once;
        if self.adopted == Some(lease.generation) || written || self.status.refused {
            return;
        }
        match self.adopt_under(lease).await {
            Ok(adopted) => {
                self.adopted = Some(lease.generation);
                if adopted > 0 {
                    tracing::info!(
                        adopted,
                        lease = %lease.id,
                        "kept the unreachable peer's cache under the current lease"
                    );
                }
            }
            Err(error) => {
                tracing::debug!(error = %chain(&error), "cannot adopt the peer's cache yet")
            }
        }
    }

    async fn adopt_under(&mut self, lease: Lease) -> kvstore::client::Result<usize> {
        let local = self.shared.local.clone();
        let mut ops = Vec::new();
        let canaries = local.list(&cache_canary_prefix(&self.peer)).await?;
        let canaried: HashSet<String> = canaries.iter().map(|e| e.key.clone()).collect();
        let mut take = |entry: kvstore::client::Entry<Vec<u8>>| {
            if entry.lease != Some(lease.id) {
                ops.push(Op::put_leased(entry.key, entry.value, lease.id));
            }
        };
        canaries.into_iter().for_each(&mut take);
        let mut keys = HashMap::new();
        for kind in Kind::ALL {
            let entries = local.list(&kind.cache_prefix(&self.peer)).await?;
            keys.insert(kind, entries.iter().map(|e| e.key.clone()).collect());
            entries.into_iter().for_each(&mut take);
        }
        for key in [
            cluster_config_key(&self.peer),
            heartbeat_cache_key(&self.peer),
        ] {
            if let Some(entry) = local.get(&key).await? {
                take(entry);
            }
        }
        let adopted = ops.len();
        local.apply_unordered(ops).await?;
        // Only a task that wrote nothing itself takes the cache's word for what it holds.
        if !self.replaced_once {
            self.keys = keys;
            self.complete = Kind::ALL
                .iter()
                .all(|kind| canaried.contains(&kind.cache_canary_key(&self.peer)));
            self.count_entries();
        }
        Ok(adopted)
    }

    /// Recomputes the status and tells the board.
    fn refresh_status(&mut self) {
        let synced = self.synced || (!self.replaced_once && self.complete);
        let mut total = 0u64;
        for kind in Kind::ALL {
            let entries = self.keys.get(&kind).map_or(0, HashSet::len) as u64;
            total += entries;
            let kind_status = self.status.kinds.entry(kind.name().to_owned()).or_default();
            kind_status.entries = entries;
            kind_status.synced = synced;
        }
        self.status.entries = total;
        self.status.synced = synced;
        self.metrics.synced.set(i64::from(synced));
        self.shared.board.report(&self.peer, &self.status);
    }

    /// Writes the status to the local store if it changed: at once when `force`, otherwise
    /// at most once per probe interval. Failures are left to the next write.
    async fn publish_status(&mut self, force: bool) {
        self.refresh_status();
        let Some(lease) = self.shared.local.lease() else {
            return;
        };
        let bytes = self.status.encode();
        if self
            .status_written
            .as_ref()
            .is_some_and(|(b, l)| *b == bytes && *l == lease.id)
        {
            return;
        }
        if !force
            && self
                .status_written_at
                .is_some_and(|at| at.elapsed() < self.shared.timing.probe_interval)
        {
            return;
        }
        match self
            .shared
            .local
            .put(&peer_status_key(&self.peer), bytes.clone(), lease)
            .await
        {
            Ok(()) => {
                self.status_written = Some((bytes, lease.id));
                self.status_written_at = Some(Instant::now());
            }
            Err(error) => {
                tracing::debug!(error = %chain(&error), "cannot write the peer's status yet")
            }
        }
    }

    /// For a peer that cannot even be configured: writes its status once a lease exists.
    async fn publish_status_when_leased(&mut self) {
        let _ = self.shared.local.wait_lease().await;
        self.publish_status(true).await;
    }
}

/// The position of `kind` in [`Kind::ALL`].
fn kind_index(kind: Kind) -> usize {
    Kind::ALL.iter().position(|k| *k == kind).unwrap_or(0)
}

impl fmt::Debug for CacheSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CacheSink")
            .field("peer", &self.peer)
            .field("lease", &self.lease)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_limiter_counts_what_it_suppresses() {
        let mut limiter = LogLimiter::new();
        for _ in 0..WARNINGS_PER_WINDOW {
            assert_eq!(limiter.allow(), Some(0));
        }
        assert_eq!(limiter.allow(), None);
        assert_eq!(limiter.allow(), None);
        limiter.window_start -= WARNING_WINDOW;
        assert_eq!(limiter.allow(), Some(2));
    }
}
