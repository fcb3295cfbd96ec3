//! One peer's owner task: connects to the peer's store, checks its cluster config, copies
//! each kind of its state into the local cache once the peer's canary says it is complete,
//! then follows the peer's watch; reconnects, resumes and relists on failures.
//!
//! Everything about one peer (its cache keys, revisions, status) is owned by this task and
//! nothing else, so there is no locking on the data path.

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use futures::FutureExt;
use kvstore::client::{
    Error as StoreError, LeaseId, Listing, Op, PeerConfig, PeerFileError, RawCodec, StoreClient,
    TypedClient, WatchEvent, WatchStream,
};
use model::keys::{
    HEARTBEAT_KEY, cache_canary_prefix, cluster_config_key, heartbeat_cache_key, peer_status_key,
    state_canary_prefix,
};
use model::{
    ClusterConfig, ClusterName, EntryError, Kind, PeerStatus, StoreValue, to_cache_key,
    validate_entry, validate_key,
};
use tokio::time::MissedTickBehavior;
use tokio_stream::{StreamExt, StreamMap};
use tokio_util::sync::CancellationToken;

use daemon::error_chain as chain;
use peer_follow::{Backoff, Claims, ConfigGate, ConfigRefusal, Heartbeat, StoreWitness, Verdict};

use crate::Timing;
use crate::board::Board;
use crate::local::{self, Lease, Local, digest};
use crate::metrics::{Metrics, PeerMetrics, Stage};
use crate::status::{self, rfc3339};

/// Watch events applied to the local store in one batch, at most.
const MAX_EVENT_BATCH: usize = 4096;
/// Warnings about refused entries per peer per window, before they are only counted.
const WARNINGS_PER_WINDOW: u32 = 10;
const WARNING_WINDOW: Duration = Duration::from_secs(10);

/// What every peer task shares.
#[derive(Debug)]
pub(crate) struct Shared {
    pub local: Local,
    pub local_config: ClusterConfig,
    pub timing: Timing,
    pub metrics: Arc<Metrics>,
    pub claims: Arc<Claims>,
    pub board: Arc<Board>,
}

/// Why a peer is not (or no longer) mirrored; its text becomes the status's `last_error`.
#[derive(Debug, thiserror::Error)]
pub enum MirrorError {
    /// The peer file cannot be used.
    #[error(transparent)]
    PeerFile(PeerFileError),
    /// The peer's store cannot be reached or read.
    #[error("reading the peer's store")]
    Peer(#[source] StoreError),
    /// The local store cannot be written.
    #[error("writing the local store")]
    Local(#[source] StoreError),
    /// The peer has not published its cluster config (yet).
    #[error("peer {peer} has not published {key}")]
    ConfigMissing {
        /// The peer.
        peer: ClusterName,
        /// The key read.
        key: String,
    },
    /// The peer's cluster config is refused.
    #[error(transparent)]
    Config(ConfigRefusal),
}

impl MirrorError {
    /// A refusal: nothing of the peer may stay in the cache, and retrying soon is pointless.
    fn is_refusal(&self) -> bool {
        matches!(self, MirrorError::Config(_))
    }

    fn stage(&self) -> Stage {
        match self {
            MirrorError::Peer(_) => Stage::Peer,
            MirrorError::Local(_) => Stage::Local,
            _ => Stage::Config,
        }
    }
}

/// How a session ended.
#[derive(Debug)]
enum End {
    /// Failed: back off, then try again; `fresh_client` drops the connection first.
    Failed {
        error: MirrorError,
        fresh_client: bool,
    },
    /// Start a new session right away (the store was replaced, the config or lease changed).
    Restart(&'static str),
}

fn peer_error(error: StoreError) -> End {
    let fresh_client = error.is_retryable();
    End::Failed {
        error: MirrorError::Peer(error),
        fresh_client,
    }
}

fn local_error(error: StoreError) -> End {
    End::Failed {
        error: MirrorError::Local(error),
        fresh_client: false,
    }
}

fn config_error(error: MirrorError) -> End {
    End::Failed {
        error,
        fresh_client: false,
    }
}

/// One kind of the peer's state.
#[derive(Debug, Default)]
struct KindState {
    /// The cache was reconciled with a full listing of the current store, under the current
    /// lease and config: following the watch from `next` keeps it equal to the peer.
    listed: bool,
    /// The revision to resume the watch from.
    next: Option<i64>,
    /// The cache holds the peer's full state of this kind (maybe stale, while disconnected)
    /// and its cache canary is written.
    complete: bool,
    /// Why the next full listing happens, for the metric.
    relist_reason: Option<&'static str>,
    /// The cache keys of this kind.
    keys: HashSet<String>,
}

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

/// The owner of one peer's mirror.
struct Mirror {
    shared: Arc<Shared>,
    peer: ClusterName,
    metrics: PeerMetrics,
    status: PeerStatus,
    /// The status bytes last written, and under which lease.
    status_written: Option<(Vec<u8>, LeaseId)>,
    status_written_at: Option<Instant>,
    /// The peer's accepted cluster config.
    gate: ConfigGate,
    /// What the peer's store has shown of itself, to notice it being replaced.
    witness: StoreWitness,
    kinds: HashMap<Kind, KindState>,
    /// The lease the cache is written under.
    lease: Option<Lease>,
    /// Digest of the mirrored cluster config and the lease generation it was written under.
    mirrored_config: Option<(u64, u64)>,
    /// Digest of the mirrored heartbeat (`None`: absent) and the lease generation.
    mirrored_heartbeat: Option<(Option<u64>, u64)>,
    /// The lease generation under which the cache of a previous connection was adopted.
    adopted: Option<u64>,
    refusal_drained: bool,
    /// Set when an entry suggests the peer's config changed: probe right away.
    probe_soon: bool,
    connected_at: Option<Instant>,
    /// When the peer last answered a probe or sent events: a lost connection is reported
    /// with the silence since then (`PeerStatus::silent_ms`).
    last_heard: Option<Instant>,
    /// When the current full sync of every kind started.
    sync_started: Option<Instant>,
    log_limit: LogLimiter,
}

/// Runs one peer until `cancel`.
pub(crate) async fn run_peer(
    shared: Arc<Shared>,
    peer: ClusterName,
    config: Result<PeerConfig, PeerFileError>,
    cancel: CancellationToken,
) {
    let mut mirror = Mirror::new(shared, peer);
    let config = match config {
        Ok(config) => config,
        Err(error) => {
            mirror.failed(&MirrorError::PeerFile(error));
            tokio::select! {
                () = cancel.cancelled() => {}
                () = mirror.publish_status_when_leased() => cancel.cancelled().await,
            }
            return;
        }
    };
    mirror.witness = StoreWitness::new(config.client.endpoints.len());
    let timing = mirror.shared.timing.clone();
    let mut backoff = Backoff::new(timing.backoff_base, timing.backoff_max);
    let mut client: Option<StoreClient> = None;
    let mut last_restart: Option<Instant> = None;
    loop {
        let connection = match &client {
            Some(connection) => connection.clone(),
            None => match StoreClient::connect_lazy(&config.client).await {
                Ok(connection) => {
                    client = Some(connection.clone());
                    connection
                }
                Err(error) => {
                    // The file was validated, so this is the etcd client refusing it.
                    mirror.failed(&MirrorError::Peer(error));
                    mirror.publish_status(true).await;
                    tokio::select! {
                        () = cancel.cancelled() => break,
                        () = tokio::time::sleep(backoff.max_delay()) => continue,
                    }
                }
            },
        };
        let end = tokio::select! {
            () = cancel.cancelled() => break,
            end = mirror.session(&connection) => end,
        };
        let connected_for = mirror.connected_at.map(|at| at.elapsed());
        mirror.set_disconnected();
        let delay = match end {
            End::Restart(reason) => {
                tracing::info!(reason, "starting a new session");
                let hot = last_restart.is_some_and(|at| at.elapsed() < Duration::from_secs(1));
                last_restart = Some(Instant::now());
                if hot {
                    backoff.next_delay()
                } else {
                    Duration::ZERO
                }
            }
            End::Failed {
                error,
                fresh_client,
            } => {
                if fresh_client {
                    client = None;
                }
                backoff.session_ended(connected_for);
                mirror.failed(&error);
                if error.is_refusal() {
                    mirror.drain_refused().await;
                    backoff.max_delay()
                } else {
                    mirror.adopt().await;
                    backoff.next_delay()
                }
            }
        };
        mirror.publish_status(true).await;
        tokio::select! {
            () = cancel.cancelled() => break,
            () = tokio::time::sleep(delay) => {}
        }
    }
    mirror.shared.claims.release(&mirror.peer);
}

impl Mirror {
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
        Mirror {
            metrics,
            status,
            status_written: None,
            status_written_at: None,
            gate: ConfigGate::new(
                peer.clone(),
                shared.local_config.clone(),
                Some(shared.claims.clone()),
            ),
            witness: StoreWitness::new(1),
            kinds: Kind::ALL
                .into_iter()
                .map(|k| (k, KindState::default()))
                .collect(),
            lease: None,
            mirrored_config: None,
            mirrored_heartbeat: None,
            adopted: None,
            refusal_drained: false,
            probe_soon: false,
            connected_at: None,
            last_heard: None,
            sync_started: None,
            log_limit: LogLimiter::new(),
            shared,
            peer,
        }
    }

    fn kind(&mut self, kind: Kind) -> &mut KindState {
        self.kinds.entry(kind).or_default()
    }

    fn config(&self) -> Option<&ClusterConfig> {
        self.gate.accepted()
    }

    /// One connection to the peer, from checking its store and config to following its
    /// watches; returns why it ended. Dropping the future (on shutdown) is safe: every write
    /// is idempotent and redone by the next session.
    async fn session(&mut self, client: &StoreClient) -> End {
        match self.run_session(client).await {
            Ok(never) => match never {},
            Err(end) => end,
        }
    }

    async fn run_session(&mut self, client: &StoreClient) -> Result<Infallible, End> {
        let Some(lease) = self.shared.local.wait_lease().await else {
            return Err(End::Restart("no local lease"));
        };
        if self.lease.map(|l| l.generation) != Some(lease.generation) {
            if self.lease.is_some() {
                tracing::info!(lease = %lease.id, "new local lease: rewriting the peer's cache under it");
                self.reset_kinds("lease-changed");
            }
            self.lease = Some(lease);
            self.mirrored_config = None;
            self.mirrored_heartbeat = None;
            self.status_written = None;
        }
        let raw = client.raw();

        // The store first (a replaced store invalidates every revision we hold), then who
        // the peer is, before anything of it is read.
        let found = peer_follow::probe(
            client,
            &self.peer,
            &mut self.witness,
            self.shared.timing.probe_timeout,
        )
        .await
        .map_err(peer_error)?;
        self.last_heard = Some(Instant::now());
        if let Some(reason) = &found.replaced {
            self.store_replaced(reason);
        }
        self.accept_config(found.config).await?;
        self.mirror_heartbeat(found.heartbeat).await?;
        self.set_connected();
        self.publish_status(true).await;

        // Which kinds the peer says are complete, and news of the others.
        let Some(config) = self.config().cloned() else {
            return Err(End::Restart("no accepted config"));
        };
        let canary_prefix = state_canary_prefix(&self.peer);
        let (canaries, _) = raw
            .list_prefix_lenient(&canary_prefix)
            .await
            .map_err(peer_error)?;
        self.note_revision(canaries.revision);
        let mut canaried: HashSet<Kind> = canaries
            .entries
            .iter()
            .filter_map(|e| canary_kind(&canary_prefix, &e.key))
            .collect();
        if !config.capabilities.sync_canaries {
            canaried.extend(Kind::ALL);
        }
        if !config.capabilities.service_exports {
            // Nothing to wait for: the peer publishes no service exports.
            canaried.insert(Kind::ServiceExports);
        }
        let mut canary_watch = raw
            .watch_prefix(&canary_prefix, canaries.revision + 1)
            .await
            .map_err(peer_error)?;

        // Resume what is listed; list what is complete at the peer.
        let mut streams: StreamMap<Kind, WatchStream<Vec<u8>>> = StreamMap::new();
        for kind in Kind::ALL {
            let state = self.kind(kind);
            let (true, Some(next)) = (state.listed, state.next) else {
                continue;
            };
            match raw.watch_prefix(kind.state_prefix(), next).await {
                Ok(stream) => {
                    tracing::debug!(%kind, from_revision = next, "resumed the watch");
                    streams.insert(kind, stream);
                }
                Err(error) if error.is_compacted() => {
                    tracing::info!(%kind, from_revision = next, "resume revision compacted: listing again");
                    let state = self.kind(kind);
                    state.listed = false;
                    state.relist_reason = Some("compacted");
                }
                Err(StoreError::FutureRevision { .. }) => {
                    self.store_replaced(&format!(
                        "resume revision {next} is in the future of the store"
                    ));
                    return Err(End::Restart("store-replaced"));
                }
                Err(error) => return Err(peer_error(error)),
            }
        }
        for kind in Kind::ALL {
            if !streams.contains_key(&kind) && canaried.contains(&kind) {
                self.full_sync(&raw, kind, &mut streams).await?;
            }
        }
        self.publish_status(true).await;

        let interval = self.shared.timing.probe_interval;
        let mut probe = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        probe.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut lease_changes = self.shared.local.lease_changes();
        lease_changes.mark_unchanged();
        loop {
            if std::mem::take(&mut self.probe_soon) {
                probe.reset_immediately();
            }
            tokio::select! {
                changed = lease_changes.changed() => {
                    if changed.is_err() {
                        return Err(End::Restart("local lease task stopped"));
                    }
                    let now = lease_changes.borrow_and_update().map(|l| l.generation);
                    if now != self.lease.map(|l| l.generation) {
                        return Err(End::Restart("lease-changed"));
                    }
                }
                Some(event) = canary_watch.next() => match event {
                    WatchEvent::Put { key, .. } => {
                        if let Some(kind) = canary_kind(&canary_prefix, &key)
                            && !streams.contains_key(&kind)
                        {
                            tracing::debug!(%kind, "the peer's canary appeared");
                            self.full_sync(&raw, kind, &mut streams).await?;
                            self.publish_status(true).await;
                        }
                    }
                    WatchEvent::Delete { .. } | WatchEvent::Invalid { .. } | WatchEvent::Progress { .. } => {}
                    WatchEvent::Compacted { .. } => return Err(End::Restart("canary watch compacted")),
                    WatchEvent::Broken { error, .. } => return Err(peer_error(error)),
                },
                Some(first) = streams.next() => {
                    self.on_events(first, &raw, &mut streams).await?;
                }
                _ = probe.tick() => {
                    self.probe(client).await?;
                    self.publish_status(false).await;
                }
            }
        }
    }

    fn note_revision(&mut self, revision: i64) {
        self.witness.note_revision(revision);
    }

    /// Every kind must be listed again; the cache is kept (and garbage-collected only
    /// after that listing).
    fn reset_kinds(&mut self, reason: &'static str) {
        for state in self.kinds.values_mut() {
            state.listed = false;
            state.next = None;
            state.complete = false;
            state.relist_reason = Some(reason);
        }
        self.sync_started = None;
    }

    fn store_replaced(&mut self, reason: &str) {
        tracing::warn!(
            reason,
            "the peer's store was replaced: listing it again once its canaries are back (the \
             cache is kept until then)"
        );
        self.reset_kinds("store-replaced");
    }

    /// Validates and mirrors the peer's cluster config (`None`: not published); says whether
    /// a new config was accepted.
    async fn accept_config(&mut self, config: Option<Vec<u8>>) -> Result<bool, End> {
        let Some(value) = config else {
            return Err(config_error(MirrorError::ConfigMissing {
                peer: self.peer.clone(),
                key: cluster_config_key(&self.peer),
            }));
        };
        let mut changed = false;
        let layout_changed = match self.gate.offer(&value) {
            Ok(Verdict::Unchanged) => None,
            Ok(Verdict::Accepted { layout_changed }) => Some(layout_changed),
            Err(refusal) => return Err(config_error(MirrorError::Config(refusal))),
        };
        if let (Some(layout_changed), Some(config)) = (layout_changed, self.gate.accepted()) {
            let config = config.clone();
            // Entries checked against a config refused since (and not drained yet) are as
            // suspect as after a change of layout.
            if layout_changed || (self.status.refused && !self.refusal_drained) {
                tracing::warn!(
                    id = config.id.get(),
                    "the peer's cluster id or max-connected-clusters changed: checking every \
                     entry again"
                );
                self.reset_kinds("config-changed");
            }
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
            changed = true;
        }
        self.mirror_config().await?;
        Ok(changed)
    }

    /// Writes the accepted config to `cilium/cluster-config/<peer>` if it is not there
    /// under the current lease.
    async fn mirror_config(&mut self) -> Result<(), End> {
        let (Some(lease), Some(accepted)) = (self.lease, self.gate.accepted_bytes()) else {
            return Ok(());
        };
        let state = (digest(accepted), lease.generation);
        if self.mirrored_config == Some(state) {
            return Ok(());
        }
        self.shared
            .local
            .put(&cluster_config_key(&self.peer), accepted.to_vec(), lease)
            .await
            .map_err(local_error)?;
        self.mirrored_config = Some(state);
        Ok(())
    }

    /// Copies the peer's `cilium/.heartbeat` to `cilium/cache/heartbeat/<peer>`.
    async fn mirror_heartbeat(&mut self, heartbeat: Heartbeat) -> Result<(), End> {
        let Some(lease) = self.lease else {
            return Ok(());
        };
        let value = match heartbeat {
            Heartbeat::Absent => None,
            Heartbeat::Valid(bytes) => Some(bytes),
            Heartbeat::Refused { bytes } => {
                if self.log_limit.allow().is_some() {
                    tracing::warn!(
                        peer = %self.peer,
                        key = HEARTBEAT_KEY,
                        bytes,
                        "refused the peer's heartbeat: not short UTF-8 text"
                    );
                }
                return Ok(());
            }
        };
        let state = (value.as_deref().map(digest), lease.generation);
        if self.mirrored_heartbeat == Some(state) {
            return Ok(());
        }
        let key = heartbeat_cache_key(&self.peer);
        match value {
            Some(bytes) => self.shared.local.put(&key, bytes, lease).await,
            None => self.shared.local.delete(&key).await,
        }
        .map_err(local_error)?;
        self.mirrored_heartbeat = Some(state);
        Ok(())
    }

    /// The periodic check: the peer answers, is the same store, has the same config; and
    /// the heartbeat is copied.
    async fn probe(&mut self, client: &StoreClient) -> Result<(), End> {
        let found = peer_follow::probe(
            client,
            &self.peer,
            &mut self.witness,
            self.shared.timing.probe_timeout,
        )
        .await
        .map_err(peer_error)?;
        self.last_heard = Some(Instant::now());
        if let Some(reason) = found.replaced {
            self.store_replaced(&reason);
            return Err(End::Restart("store-replaced"));
        }
        if self.accept_config(found.config).await? {
            return Err(End::Restart("config-changed"));
        }
        self.mirror_heartbeat(found.heartbeat).await
    }

    /// Lists one kind of the peer, makes the cache equal to it (writing only what differs,
    /// deleting what the peer no longer has), writes the cache canary and starts following
    /// the watch from the listed revision.
    async fn full_sync(
        &mut self,
        raw: &TypedClient<RawCodec>,
        kind: Kind,
        streams: &mut StreamMap<Kind, WatchStream<Vec<u8>>>,
    ) -> Result<(), End> {
        let Some(lease) = self.lease else {
            return Err(End::Restart("no local lease"));
        };
        let Some(config) = self.config().cloned() else {
            return Err(End::Restart("no accepted config"));
        };
        let started = Instant::now();
        if self.sync_started.is_none() {
            self.sync_started = Some(started);
        }
        let reason = self.kind(kind).relist_reason.take().unwrap_or("initial");
        self.metrics.relist(reason);
        let local = self.shared.local.clone();
        let cache_prefix = kind.cache_prefix(&self.peer);
        // What the cache holds is read while the peer is listed.
        let (peer_side, have) = tokio::join!(
            Self::list_and_follow(raw, kind),
            local.digests(&cache_prefix)
        );
        let (listing, undecodable, stream) = peer_side?;
        let have = have.map_err(local_error)?;
        for error in undecodable {
            let key = match &error {
                StoreError::Decode { key, .. } => key.clone(),
                _ => String::new(),
            };
            self.refused(kind, &key, &error);
        }
        let list_ms = started.elapsed().as_millis() as u64;
        let listed = listing.entries.len();
        let mut wanted: Vec<(String, Vec<u8>)> = Vec::with_capacity(listed);
        for entry in listing.entries {
            match validate_entry(kind, &entry.key, &entry.value, &config) {
                Ok(valid) => match to_cache_key(&valid.key(), &self.peer) {
                    Ok(cache_key) => wanted.push((cache_key, entry.value)),
                    Err(error) => self.refused(kind, &entry.key, &error),
                },
                Err(error) => self.refused(kind, &entry.key, &error),
            }
        }
        let validate_ms = started.elapsed().as_millis() as u64 - list_ms;
        let mut keys = HashSet::with_capacity(wanted.len());
        let mut ops = Vec::new();
        let mut unchanged = 0usize;
        for (cache_key, value) in wanted {
            let same = have
                .get(&cache_key)
                .is_some_and(|(d, l)| *l == Some(lease.id) && *d == digest(&value));
            if same {
                unchanged += 1;
                keys.insert(cache_key);
            } else {
                keys.insert(cache_key.clone());
                ops.push(Op::put_leased(cache_key, value, lease.id));
            }
        }
        let puts = ops.len();
        ops.extend(
            have.into_keys()
                .filter(|k| !keys.contains(k))
                .map(Op::delete),
        );
        let deletes = ops.len() - puts;
        let writing = Instant::now();
        self.shared
            .local
            .apply_unordered(ops)
            .await
            .map_err(local_error)?;
        self.shared
            .local
            .put(
                &kind.cache_canary_key(&self.peer),
                rfc3339(SystemTime::now()).into_bytes(),
                lease,
            )
            .await
            .map_err(local_error)?;
        self.note_revision(listing.revision);
        streams.insert(kind, stream);
        let entries = keys.len();
        let state = self.kind(kind);
        state.keys = keys;
        state.listed = true;
        state.complete = true;
        state.next = Some(listing.revision + 1);
        self.metrics.entries(kind).set(entries as i64);
        tracing::info!(
            %kind,
            reason,
            revision = listing.revision,
            listed,
            entries,
            puts,
            deletes,
            unchanged,
            list_ms,
            validate_ms,
            write_ms = writing.elapsed().as_millis() as u64,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "kind synced"
        );
        if self.kinds.values().all(|s| s.listed) {
            let took = self
                .sync_started
                .take()
                .map(|t| t.elapsed())
                .unwrap_or_default();
            self.metrics.sync_seconds.set(took.as_secs_f64());
            self.status.last_sync_time = Some(rfc3339(SystemTime::now()));
            tracing::info!(
                entries = self.kinds.values().map(|s| s.keys.len()).sum::<usize>(),
                elapsed_ms = took.as_millis() as u64,
                "the cache holds the peer's full state"
            );
        }
        Ok(())
    }

    /// Lists one kind of the peer at one revision and opens its watch from the next, so a
    /// compaction in between is noticed before anything is written.
    async fn list_and_follow(
        raw: &TypedClient<RawCodec>,
        kind: Kind,
    ) -> Result<(Listing<Vec<u8>>, Vec<StoreError>, WatchStream<Vec<u8>>), End> {
        let mut attempts = 0;
        loop {
            attempts += 1;
            let (listing, undecodable) = raw
                .list_prefix_lenient(kind.state_prefix())
                .await
                .map_err(peer_error)?;
            match raw
                .watch_prefix(kind.state_prefix(), listing.revision + 1)
                .await
            {
                Ok(stream) => return Ok((listing, undecodable, stream)),
                Err(error) if error.is_compacted() && attempts < 3 => {
                    tracing::debug!(%kind, "listed revision compacted at once; listing again");
                }
                Err(error) => return Err(peer_error(error)),
            }
        }
    }

    /// Applies a batch of watch events: the first, and whatever else is ready.
    async fn on_events(
        &mut self,
        first: (Kind, WatchEvent<Vec<u8>>),
        raw: &TypedClient<RawCodec>,
        streams: &mut StreamMap<Kind, WatchStream<Vec<u8>>>,
    ) -> Result<(), End> {
        let Some(lease) = self.lease else {
            return Err(End::Restart("no local lease"));
        };
        self.last_heard = Some(Instant::now());
        let mut events = vec![first];
        while events.len() < MAX_EVENT_BATCH {
            match streams.next().now_or_never() {
                Some(Some(event)) => events.push(event),
                _ => break,
            }
        }
        let mut ops = Vec::new();
        let mut terminal = Vec::new();
        let mut changes = 0u64;
        for (kind, event) in events {
            match event {
                WatchEvent::Put {
                    key,
                    value,
                    mod_revision,
                    ..
                } => {
                    changes += 1;
                    self.note_revision(mod_revision);
                    ops.extend(self.on_put(kind, key, value, lease.id));
                }
                WatchEvent::Delete { key, mod_revision } => {
                    changes += 1;
                    self.note_revision(mod_revision);
                    ops.extend(self.on_delete(kind, &key));
                }
                WatchEvent::Invalid {
                    key,
                    mod_revision,
                    error,
                } => {
                    changes += 1;
                    self.note_revision(mod_revision);
                    self.refused(kind, &key, &error);
                    ops.extend(self.on_delete(kind, &key));
                }
                WatchEvent::Progress { revision } => self.note_revision(revision),
                event @ (WatchEvent::Compacted { .. } | WatchEvent::Broken { .. }) => {
                    terminal.push((kind, event));
                }
            }
        }
        self.metrics.events.inc_by(changes);
        // Writes to distinct keys commute, so a large batch goes in concurrent chunks.
        let mut seen = HashSet::with_capacity(ops.len());
        let distinct = ops.iter().all(|op| seen.insert(op.key()));
        drop(seen);
        let applied = if distinct {
            self.shared.local.apply_unordered(ops).await
        } else {
            self.shared.local.apply(ops).await
        };
        applied.map_err(local_error)?;
        // Applied: resuming may now skip these events.
        let resume: Vec<(Kind, i64)> = streams
            .iter()
            .map(|(kind, stream)| (*kind, stream.resume_revision()))
            .collect();
        for (kind, next) in resume {
            self.kind(kind).next = Some(next);
        }
        for kind in Kind::ALL {
            let entries = self.kinds.get(&kind).map_or(0, |s| s.keys.len());
            self.metrics.entries(kind).set(entries as i64);
        }
        for (kind, event) in terminal {
            match event {
                WatchEvent::Compacted { compact_revision } => {
                    tracing::info!(%kind, compact_revision, "watch compacted: listing again");
                    streams.remove(&kind);
                    let state = self.kind(kind);
                    state.listed = false;
                    state.relist_reason = Some("compacted");
                    self.full_sync(raw, kind, streams).await?;
                }
                WatchEvent::Broken { resume_from, error } => {
                    self.kind(kind).next = Some(resume_from);
                    return Err(peer_error(error));
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// The cache operation for a put of the peer's, if any.
    fn on_put(
        &mut self,
        kind: Kind,
        key: String,
        value: Vec<u8>,
        lease: LeaseId,
    ) -> Option<Op<Vec<u8>>> {
        let config = self.config()?;
        let refusal: Box<dyn std::error::Error> = match validate_entry(kind, &key, &value, config) {
            Ok(entry) => match to_cache_key(&entry.key(), &self.peer) {
                Ok(cache_key) => {
                    self.kind(kind).keys.insert(cache_key.clone());
                    return Some(Op::put_leased(cache_key, value, lease));
                }
                Err(error) => Box::new(error),
            },
            Err(error) => {
                if matches!(
                    error,
                    EntryError::ForeignClusterId { .. } | EntryError::IdentityOutOfRange { .. }
                ) {
                    // Maybe the peer's config changed under us: check it now.
                    self.probe_soon = true;
                }
                Box::new(error)
            }
        };
        self.refused(kind, &key, refusal.as_ref());
        // A refused new version must not leave the old one cached.
        self.on_delete(kind, &key)
    }

    /// The cache deletion for a key of the peer's, if it is cached.
    fn on_delete(&mut self, kind: Kind, key: &str) -> Option<Op<Vec<u8>>> {
        let config = self.config()?;
        let state_key = validate_key(kind, key, config).ok()?;
        let cache_key = to_cache_key(&state_key, &self.peer).ok()?;
        self.kind(kind)
            .keys
            .remove(&cache_key)
            .then(|| Op::delete(cache_key))
    }

    /// Counts and (rate-limited) logs a refused entry of the peer.
    fn refused(&mut self, kind: Kind, key: &str, error: &(dyn std::error::Error + 'static)) {
        self.metrics.invalid(kind).inc();
        self.status.invalid_entries += 1;
        if let Some(suppressed) = self.log_limit.allow() {
            tracing::warn!(
                peer = %self.peer,
                %kind,
                key,
                error = %chain(error),
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
            self.connected_at = Some(Instant::now());
        }
    }

    fn set_disconnected(&mut self) {
        if self.status.connected {
            self.status.connected = false;
            self.status.disconnected_since = Some(rfc3339(SystemTime::now()));
            self.status.silent_ms = self
                .last_heard
                .map(|t| u64::try_from(t.elapsed().as_millis()).unwrap_or(u64::MAX));
            self.status.connected_since = None;
            self.metrics.connected.set(0);
        }
        self.connected_at = None;
    }

    fn failed(&mut self, error: &MirrorError) {
        let text = chain(error);
        self.status.failures += 1;
        self.status.last_error = Some(text.clone());
        self.status.last_error_time = Some(rfc3339(SystemTime::now()));
        self.metrics.error(error.stage());
        if error.is_refusal() {
            self.status.refused = true;
            self.metrics.refused.set(1);
            tracing::error!(error = %text, "peer refused: nothing of it is mirrored");
        } else {
            tracing::warn!(error = %text, "peer not mirrored; retrying");
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
                self.gate.forget();
                self.mirrored_config = None;
                self.mirrored_heartbeat = None;
                for state in self.kinds.values_mut() {
                    *state = KindState::default();
                }
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
        let written = self.lease == Some(lease) && self.kinds.values().all(|s| s.listed);
        if self.adopted == Some(lease.generation) || written {
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
        for kind in Kind::ALL {
            let entries = local.list(&kind.cache_prefix(&self.peer)).await?;
            let keys: HashSet<String> = entries.iter().map(|e| e.key.clone()).collect();
            entries.into_iter().for_each(&mut take);
            let complete = canaried.contains(&kind.cache_canary_key(&self.peer));
            let state = self.kinds.entry(kind).or_default();
            // Only a kind this task knows nothing about yet takes the cache's word; after a
            // listing or a reset (a replaced store) the task's own view stands.
            if !state.listed && state.relist_reason.is_none() {
                state.keys = keys;
                state.complete = complete;
            }
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
        Ok(adopted)
    }

    /// Recomputes the status from the kinds and tells the board.
    fn refresh_status(&mut self) {
        let mut total = 0u64;
        for kind in Kind::ALL {
            let state = self.kinds.entry(kind).or_default();
            let entries = state.keys.len() as u64;
            total += entries;
            let kind_status = self.status.kinds.entry(kind.name().to_owned()).or_default();
            kind_status.entries = entries;
            kind_status.synced = state.complete;
        }
        self.status.entries = total;
        self.status.synced = self.kinds.values().all(|s| s.complete);
        self.metrics.synced.set(i64::from(self.status.synced));
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

/// The kind whose canary `key` is, under the peer's canary prefix.
fn canary_kind(prefix: &str, key: &str) -> Option<Kind> {
    let rest = key.strip_prefix(prefix)?;
    let (name, version) = rest.split_once('/')?;
    (version == model::keys::LAYOUT_VERSION)
        .then(|| Kind::from_name(name))
        .flatten()
}

impl fmt::Debug for Mirror {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Mirror")
            .field("peer", &self.peer)
            .field("last_seen", &self.witness.last_seen())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use model::PeerError;

    #[test]
    fn canary_keys_name_their_kind() {
        let peer = ClusterName::new("b").unwrap();
        let prefix = state_canary_prefix(&peer);
        for kind in Kind::ALL {
            assert_eq!(
                canary_kind(&prefix, &kind.state_canary_key(&peer)),
                Some(kind)
            );
        }
        assert_eq!(
            canary_kind(&prefix, "cilium/synced/b/cilium/state/nodes/v2"),
            None
        );
        assert_eq!(
            canary_kind(&prefix, "cilium/synced/b/cilium/state/pods/v1"),
            None
        );
        assert_eq!(
            canary_kind(&prefix, "cilium/synced/c/cilium/state/nodes/v1"),
            None
        );
    }

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

    #[test]
    fn chain_joins_sources_once() {
        let error = MirrorError::Config(ConfigRefusal::Refused(PeerError::SameName {
            name: ClusterName::new("a").unwrap(),
        }));
        assert_eq!(
            chain(&error),
            "peer refused: peer a has this cluster's own name"
        );
    }
}
