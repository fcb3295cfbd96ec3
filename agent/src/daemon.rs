//! Wiring: the local cluster source, the peer watchers, one owner task that holds every part
//! and the tables, the API, and the persisted state.
//!
//! The owner task is the only writer of the agent's state. It applies the local cluster's
//! synced snapshots and the peers' updates, runs the health timers, refreshes the tables
//! (only the keys that changed) and serializes the parts for a writer task, which puts them
//! on disk without holding the owner up.
//!
//! # Restarts
//!
//! Every part (the local cluster's and each peer's) is persisted as JSON in the state file,
//! atomically and durably ([`write_durably`](crate::persist::write_durably)), at most once
//! per persist interval and at shutdown (which waits for that last write). A restarted agent builds
//! its tables from that file before it reads anything, so it serves (and the datapath keeps)
//! every backend, ipcache entry and route it had. A part is replaced only by that cluster's
//! next complete sync: the local part by the first synced snapshot, a peer's by its first
//! full resync. A restored peer that cannot be reached is demoted after the grace period like
//! any lost peer; one that is no longer configured is forgotten after `forget_after`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use cluster_source::{ClusterSource, KubeApi, ManifestDir, SnapshotReceiver};
use model::{ClusterConfig, ClusterName};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::api::{self, AgentStatus, PeerView, Shared};
use crate::datapath::{self, DatapathOptions};
use crate::health::{HealthConfig, PeerHealth};
use crate::local::{LocalError, LocalTranslator};
use crate::merge::ClusterHealth;
use crate::metrics::{HealthLabels, Metrics, PeerLabels};
use crate::persist::FileWriter;
use crate::policy::PolicyOptions;
use crate::remote::{self, PeerSource, PeerUpdate, Phase, WatchTiming};
use crate::state::{LocalPart, MeshState, PeerPart};

/// Where the local cluster's own state comes from.
#[derive(Clone, Debug)]
pub enum LocalSource {
    /// A directory of Kubernetes manifests, watched for changes.
    Manifests(PathBuf),
    /// The Kubernetes API, through this kubeconfig (or the in-cluster/default one).
    Kubernetes {
        /// The kubeconfig file.
        kubeconfig: Option<PathBuf>,
    },
}

/// Everything the agent needs.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// The local cluster.
    pub cluster: ClusterConfig,
    /// The node the agent runs on: policies apply to its pods (all local pods when unset).
    pub node_name: Option<String>,
    /// The local cluster's objects.
    pub source: LocalSource,
    /// The peers' state.
    pub peers: PeerSource,
    /// Where the API listens.
    pub api_listen: SocketAddr,
    /// Where the parts are persisted; `None`: nothing survives a restart.
    pub state_file: Option<PathBuf>,
    /// At most one state write per this interval.
    pub persist_interval: Duration,
    /// Grace period and heartbeat timeout.
    pub health: HealthConfig,
    /// Watch timing.
    pub watch: WatchTiming,
    /// Namespaces without `clustermesh.cilium.io/global` are global.
    pub default_global_namespace: bool,
    /// Policy selector behaviour.
    pub policy: PolicyOptions,
    /// A peer no longer configured is forgotten after this long.
    pub forget_after: Duration,
    /// How long shutdown waits for the parts to stop.
    pub shutdown_grace: Duration,
    /// The datapath to program.
    pub datapath: DatapathOptions,
}

/// Why the agent cannot start.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The API address cannot be bound.
    #[error("API {addr}: {source}")]
    Api {
        /// The address.
        addr: SocketAddr,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The local cluster's configuration is unusable.
    #[error(transparent)]
    Local(#[from] LocalError),
    /// The Kubernetes client cannot be configured.
    #[error("kubernetes client: {0}")]
    Kube(String),
    /// The eBPF datapath was asked for and cannot be loaded.
    #[error(transparent)]
    Datapath(#[from] datapath::StartError),
}

/// The persisted state: every part, by cluster.
#[derive(Debug, Deserialize)]
struct Persisted {
    schema: u32,
    cluster: ClusterName,
    #[serde(default)]
    local: Option<LocalPart>,
    #[serde(default)]
    peers: BTreeMap<ClusterName, PeerPart>,
}

#[derive(Serialize)]
struct PersistedRef<'a> {
    schema: u32,
    cluster: &'a ClusterName,
    #[serde(skip_serializing_if = "Option::is_none")]
    local: Option<&'a LocalPart>,
    peers: BTreeMap<&'a ClusterName, &'a PeerPart>,
}

const STATE_SCHEMA: u32 = 1;

/// The longest silence a lost peer's grace is counted back over.
const MAX_SILENCE: Duration = Duration::from_secs(3600);

fn load_state(path: &Path, cluster: &ClusterName) -> Option<Persisted> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(error) => {
            tracing::warn!(path = %path.display(), %error, "cannot read the state file; starting empty");
            return None;
        }
    };
    match serde_json::from_slice::<Persisted>(&bytes) {
        Ok(state) if state.schema != STATE_SCHEMA => {
            tracing::warn!(path = %path.display(), schema = state.schema, "state file of another schema; starting empty");
            None
        }
        Ok(state) if &state.cluster != cluster => {
            tracing::warn!(path = %path.display(), found = %state.cluster, "state file of another cluster; starting empty");
            None
        }
        Ok(state) => Some(state),
        Err(error) => {
            tracing::warn!(path = %path.display(), %error, "state file unreadable; starting empty");
            None
        }
    }
}

/// What the owner knows about a peer besides its part.
#[derive(Debug)]
struct PeerInfo {
    cluster_id: Option<u16>,
    configured: bool,
    unconfigured_since: Option<Instant>,
    phase: Phase,
    health: PeerHealth,
    restored: bool,
    health_changes: u64,
    invalid_entries: u64,
    last_error: Option<String>,
}

impl PeerInfo {
    fn new(config: HealthConfig, now: Instant, suspended: bool) -> Self {
        let mut health = PeerHealth::new(config, now);
        health.set_suspended(suspended, now);
        PeerInfo {
            cluster_id: None,
            configured: false,
            unconfigured_since: None,
            phase: Phase::Waiting,
            health,
            restored: false,
            health_changes: 0,
            invalid_entries: 0,
            last_error: None,
        }
    }
}

struct Owner {
    config: AgentConfig,
    shared: Arc<Shared>,
    translator: LocalTranslator,
    peers: BTreeMap<ClusterName, PeerInfo>,
    source_connected: bool,
    local_synced: bool,
    local_restored: bool,
    generation: u64,
    persist_dirty: bool,
    last_persist: Instant,
    /// Writes the state file, when there is one.
    state_writer: Option<FileWriter>,
    /// The datapath has been handed the whole tables (then only changes).
    datapath_fed: bool,
}

/// A started agent.
#[derive(Debug)]
pub struct Running {
    /// Where the API listens.
    pub api_addr: SocketAddr,
    /// The state the API reads.
    pub shared: Arc<Shared>,
    tasks: Vec<JoinHandle<()>>,
    grace: Duration,
}

impl Running {
    /// Waits for every part to stop after the cancellation token fired, at most the grace
    /// period.
    pub async fn wait(self) {
        let grace = self.grace;
        let all = async {
            for task in self.tasks {
                let _ = task.await;
            }
        };
        if tokio::time::timeout(grace, all).await.is_err() {
            tracing::warn!(?grace, "shutdown took longer than the grace period");
        }
    }
}

async fn kube_client(kubeconfig: Option<PathBuf>) -> Result<kube::Client, AgentError> {
    let config = match kubeconfig {
        Some(path) => {
            let file = kube::config::Kubeconfig::read_from(&path)
                .map_err(|e| AgentError::Kube(format!("{}: {e}", path.display())))?;
            kube::Config::from_custom_kubeconfig(file, &Default::default())
                .await
                .map_err(|e| AgentError::Kube(format!("{}: {e}", path.display())))?
        }
        None => kube::Config::infer()
            .await
            .map_err(|e| AgentError::Kube(e.to_string()))?,
    };
    kube::Client::try_from(config).map_err(|e| AgentError::Kube(e.to_string()))
}

/// Starts every part; returns once the API serves (the restored tables, if any).
pub async fn start(config: AgentConfig, cancel: CancellationToken) -> Result<Running, AgentError> {
    let cluster = config.cluster.name.clone();
    let span = tracing::info_span!("agent", %cluster);
    let mut translator = LocalTranslator::new(
        config.cluster.clone(),
        config.default_global_namespace,
        config.node_name.clone(),
    )?;
    let mut mesh = MeshState::new(cluster.clone(), config.policy);
    let now = Instant::now();
    let mut peers = BTreeMap::new();
    let mut local_restored = false;
    if let Some(state) = config
        .state_file
        .as_deref()
        .and_then(|p| load_state(p, &cluster))
    {
        if let Some(local) = state.local {
            translator.seed(local.identities.values().cloned());
            mesh.set_local(local);
            local_restored = true;
        }
        for (peer, part) in state.peers {
            tracing::info!(%peer, entries = part.len(), "restored the peer's last state; kept until it resyncs");
            mesh.replace_peer(&peer, part);
            let mut info = PeerInfo::new(config.health, now, false);
            info.restored = true;
            info.unconfigured_since = Some(now);
            peers.insert(peer, info);
        }
        let changes = mesh.refresh();
        tracing::info!(
            changes = changes.len(),
            "tables restored from the state file"
        );
    }
    let metrics = Metrics::default();
    let datapath = datapath::start(config.datapath.clone(), &metrics)
        .instrument(span.clone())
        .await?;
    let shared = Arc::new(Shared {
        mesh: RwLock::new(mesh),
        status: RwLock::new(AgentStatus::default()),
        metrics,
        datapath,
    });
    let (api_addr, api_task) = api::serve(config.api_listen, shared.clone(), cancel.clone())
        .await
        .map_err(|source| AgentError::Api {
            addr: config.api_listen,
            source,
        })?;
    tracing::info!(%api_addr, "API listening");
    let source: Box<dyn ClusterSource> = match &config.source {
        LocalSource::Manifests(dir) => Box::new(ManifestDir::new(dir.clone())),
        LocalSource::Kubernetes { kubeconfig } => {
            Box::new(KubeApi::new(kube_client(kubeconfig.clone()).await?))
        }
    };
    let (snapshots, source_task) = cluster_source::spawn(source, cancel.clone());
    let (tx, rx) = mpsc::channel(256);
    let peers_task = remote::spawn(
        config.peers.clone(),
        config.cluster.clone(),
        config.watch.clone(),
        tx,
        cancel.clone(),
    );
    let grace = config.shutdown_grace;
    let state_writer = config
        .state_file
        .clone()
        .map(|path| FileWriter::spawn(path, "state file"));
    let owner = Owner {
        config,
        shared: shared.clone(),
        translator,
        peers,
        source_connected: true,
        local_synced: false,
        local_restored,
        generation: 0,
        persist_dirty: false,
        last_persist: now,
        state_writer,
        datapath_fed: false,
    };
    owner.publish_status();
    let owner_task = tokio::spawn(
        owner
            .run(snapshots, rx, cancel.clone())
            .instrument(span.clone()),
    );
    let source_task = tokio::spawn(
        async move {
            match source_task.await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => tracing::error!(%error, "local cluster source stopped"),
                Err(error) => tracing::error!(%error, "local cluster source task failed"),
            }
        }
        .instrument(span.clone()),
    );
    let api_task = tokio::spawn(
        async move {
            if let Ok(Err(error)) = api_task.await {
                tracing::error!(%error, "API stopped");
            }
        }
        .instrument(span),
    );
    Ok(Running {
        api_addr,
        shared,
        tasks: vec![owner_task, peers_task, source_task, api_task],
        grace,
    })
}

impl Owner {
    fn mesh(&self) -> std::sync::RwLockWriteGuard<'_, MeshState> {
        self.shared.mesh.write().unwrap_or_else(|e| e.into_inner())
    }

    fn info(&mut self, peer: &ClusterName, now: Instant) -> &mut PeerInfo {
        let (config, suspended) = (self.config.health, !self.source_connected);
        self.peers
            .entry(peer.clone())
            .or_insert_with(|| PeerInfo::new(config, now, suspended))
    }

    async fn run(
        mut self,
        mut snapshots: SnapshotReceiver,
        mut rx: mpsc::Receiver<Vec<PeerUpdate>>,
        cancel: CancellationToken,
    ) {
        let mut local_open = true;
        let mut peers_open = true;
        loop {
            let deadline = self.next_deadline();
            tokio::select! {
                () = cancel.cancelled() => break,
                batch = rx.recv(), if peers_open => match batch {
                    Some(batch) => {
                        let now = Instant::now();
                        for update in batch {
                            self.handle(update, now);
                        }
                        // Whatever else is queued, before the tables are refreshed.
                        for _ in 0..64 {
                            let Ok(batch) = rx.try_recv() else { break };
                            for update in batch {
                                self.handle(update, now);
                            }
                        }
                    }
                    None => peers_open = false,
                },
                changed = snapshots.changed(), if local_open => match changed {
                    Ok(()) => {
                        let snapshot = snapshots.borrow_and_update().clone();
                        if snapshot.synced {
                            self.local_snapshot(&snapshot);
                        }
                    }
                    Err(_) => {
                        tracing::error!("the local cluster source stopped; keeping the last local state");
                        local_open = false;
                    }
                },
                () = tokio::time::sleep_until(deadline) => {}
            }
            let now = Instant::now();
            self.evaluate_health(now);
            self.forget_unconfigured(now);
            self.refresh();
            self.publish_status();
            if self.persist_dirty && now >= self.last_persist + self.config.persist_interval {
                self.persist(now);
            }
        }
        if self.persist_dirty {
            self.persist(Instant::now());
        }
        if let Some(writer) = self.state_writer.take() {
            writer.close().await;
        }
    }

    fn next_deadline(&self) -> Instant {
        let mut next = Instant::now() + Duration::from_secs(3600);
        for info in self.peers.values() {
            if let Some(d) = info.health.deadline() {
                next = next.min(d);
            }
            if let Some(since) = info.unconfigured_since {
                next = next.min(since + self.config.forget_after);
            }
        }
        if self.persist_dirty {
            next = next.min(self.last_persist + self.config.persist_interval);
        }
        next
    }

    fn local_snapshot(&mut self, snapshot: &Arc<cluster_source::ClusterObjects>) {
        let (part, warnings) = self.translator.translate(snapshot);
        for warning in &warnings {
            tracing::debug!(%warning, "local object");
        }
        if !self.local_synced {
            tracing::info!(
                services = part.services.len(),
                identities = part.identities.len(),
                warnings = warnings.len(),
                "local cluster synced"
            );
        }
        self.mesh().set_local(part);
        self.local_synced = true;
        self.local_restored = false;
    }

    fn handle(&mut self, update: PeerUpdate, now: Instant) {
        match update {
            PeerUpdate::Configured { peer, configured } => {
                let info = self.info(&peer, now);
                info.configured = configured;
                if configured {
                    info.unconfigured_since = None;
                } else {
                    info.unconfigured_since = Some(now);
                    info.health.set_connected(false, now);
                }
            }
            PeerUpdate::Config { peer, config, .. } => match config {
                Ok(config) => {
                    let info = self.info(&peer, now);
                    info.cluster_id = Some(config.id.get());
                    info.last_error = None;
                }
                Err(error) => {
                    let info = self.info(&peer, now);
                    info.last_error = Some(error);
                    info.phase = Phase::Refused;
                    info.restored = false;
                    self.mesh().remove_peer(&peer);
                }
            },
            PeerUpdate::Phase { peer, phase } => {
                tracing::debug!(%peer, ?phase, "peer phase");
                self.info(&peer, now).phase = phase;
            }
            PeerUpdate::Replace { peer, part } => {
                let entries = part.len();
                let info = self.info(&peer, now);
                let restored = std::mem::replace(&mut info.restored, false);
                info.phase = Phase::Synced;
                tracing::info!(%peer, entries, replaced_restored = restored, "peer synced; its part replaced");
                self.mesh().replace_peer(&peer, part);
            }
            PeerUpdate::Change { peer, change } => {
                self.mesh().apply_peer_change(&peer, change);
            }
            PeerUpdate::Link {
                peer,
                connected,
                error,
                silent,
            } => {
                let info = self.info(&peer, now);
                if info.health.connected() != connected {
                    if connected {
                        tracing::info!(%peer, "peer connected");
                    } else {
                        tracing::warn!(%peer, error = error.as_ref().map_or("", |e| e.text()), "peer disconnected");
                    }
                }
                // The grace runs from the start of the silence that ended in the loss (a
                // partition is found only when a probe times out), at most an hour back.
                let since = now.checked_sub(silent.min(MAX_SILENCE)).unwrap_or(now);
                info.health
                    .set_connected(connected, if connected { now } else { since });
                if let Some(error) = error {
                    info.last_error = Some(error.into_text());
                }
            }
            // A deleted heartbeat is no sign of life.
            PeerUpdate::Heartbeat { peer, value } => {
                if value.is_some() {
                    self.info(&peer, now).health.heartbeat(now);
                }
            }
            PeerUpdate::Listing { peer, reason } => {
                tracing::debug!(%peer, reason = reason.as_str(), "listing the peer");
            }
            PeerUpdate::Invalid { peer, error, .. } => {
                self.shared
                    .metrics
                    .invalid_entries
                    .get_or_create(&PeerLabels {
                        peer: peer.to_string(),
                    })
                    .inc();
                let info = self.info(&peer, now);
                info.invalid_entries += 1;
                if info.invalid_entries <= 10 || info.invalid_entries.is_multiple_of(1000) {
                    tracing::warn!(%peer, %error, refused = info.invalid_entries, "entry refused");
                }
                info.last_error = Some(error);
            }
            PeerUpdate::SourceLink { connected } => {
                if connected != self.source_connected {
                    if connected {
                        tracing::info!("local store reachable again; judging peers again");
                    } else {
                        tracing::warn!(
                            "local store unreachable; peers are not judged until it is back"
                        );
                    }
                }
                self.source_connected = connected;
                for info in self.peers.values_mut() {
                    info.health.set_suspended(!connected, now);
                }
            }
        }
    }

    fn evaluate_health(&mut self, now: Instant) {
        let mut changes = Vec::new();
        for (peer, info) in &mut self.peers {
            if let Some(t) = info.health.evaluate(now) {
                info.health_changes += 1;
                changes.push((peer.clone(), t));
            }
        }
        for (peer, t) in changes {
            let health = match t.health {
                ClusterHealth::Healthy => "healthy",
                ClusterHealth::Stale => "stale",
            };
            self.shared
                .metrics
                .health_changes
                .get_or_create(&HealthLabels {
                    peer: peer.to_string(),
                    health: health.to_owned(),
                })
                .inc();
            match t.health {
                ClusterHealth::Stale => tracing::warn!(
                    %peer,
                    reason = ?t.reason,
                    lost_for = ?t.lost_for,
                    "peer lost for longer than the grace period; its backends are demoted"
                ),
                ClusterHealth::Healthy => {
                    tracing::info!(%peer, "peer healthy again; its backends are restored")
                }
            }
            self.mesh().set_health(&peer, t.health);
        }
    }

    fn forget_unconfigured(&mut self, now: Instant) {
        let forget_after = self.config.forget_after;
        let gone: Vec<ClusterName> = self
            .peers
            .iter()
            .filter(|(_, i)| {
                i.unconfigured_since
                    .is_some_and(|s| now >= s + forget_after)
            })
            .map(|(p, _)| p.clone())
            .collect();
        for peer in gone {
            tracing::info!(%peer, ?forget_after, "peer not configured any more; forgetting it");
            self.peers.remove(&peer);
            self.mesh().remove_peer(&peer);
        }
    }

    fn refresh(&mut self) {
        let (changes, counts) = {
            let mut mesh = self.shared.mesh.write().unwrap_or_else(|e| e.into_inner());
            let changes = mesh.refresh();
            // The datapath gets the tables once they are the cluster's (synced or restored,
            // never the empty tables of a fresh start over maps an earlier agent filled),
            // then every change.
            if !self.datapath_fed && (self.local_synced || self.local_restored) {
                self.datapath_fed = true;
                self.shared.datapath.tables(mesh.tables().clone());
            } else if self.datapath_fed && !changes.is_empty() {
                self.shared.datapath.changes(changes.clone());
            }
            (changes, mesh.tables().counts())
        };
        if changes.is_empty() {
            return;
        }
        self.generation += 1;
        self.persist_dirty = true;
        let metrics = &self.shared.metrics;
        metrics.table_changes.inc_by(changes.len() as u64);
        metrics.set_table("services", counts.services);
        metrics.set_table("backends", counts.backends);
        metrics.set_table("ipcache", counts.ipcache);
        metrics.set_table("policy", counts.policy);
        metrics.set_table("enforcement", counts.enforcement);
        metrics.set_table("routes", counts.routes);
        tracing::debug!(
            changes = changes.len(),
            generation = self.generation,
            "tables changed"
        );
    }

    fn publish_status(&self) {
        let now = Instant::now();
        let status = {
            let mesh = self.shared.mesh.read().unwrap_or_else(|e| e.into_inner());
            let mut peers = BTreeMap::new();
            for (name, info) in &self.peers {
                let part = mesh.peer(name).map(|d| &d.part);
                let count = |f: fn(&PeerPart) -> usize| part.map_or(0, f);
                peers.insert(
                    name.to_string(),
                    PeerView {
                        name: name.to_string(),
                        cluster_id: info.cluster_id,
                        configured: info.configured,
                        phase: info.phase,
                        connected: info.health.connected(),
                        health: info.health.health(),
                        lost: info.health.lost(now).map(|(_, r)| r),
                        restored: info.restored,
                        entries: BTreeMap::from([
                            ("nodes".to_owned(), count(|p| p.nodes.len())),
                            ("services".to_owned(), count(|p| p.services.len())),
                            ("identities".to_owned(), count(|p| p.identities.len())),
                            ("ips".to_owned(), count(|p| p.ips.len())),
                        ]),
                        health_changes: info.health_changes,
                        invalid_entries: info.invalid_entries,
                        last_error: info.last_error.clone(),
                    },
                );
            }
            AgentStatus {
                cluster: self.config.cluster.name.to_string(),
                local_synced: self.local_synced || self.local_restored,
                local_restored: self.local_restored,
                generation: self.generation,
                counts: mesh.tables().counts(),
                peers,
                policy_warnings: mesh.policy_warnings().to_vec(),
            }
        };
        let metrics = &self.shared.metrics;
        let count = |f: &dyn Fn(&PeerView) -> bool| {
            i64::try_from(status.peers.values().filter(|p| f(p)).count()).unwrap_or(i64::MAX)
        };
        metrics.peers.set(count(&|_| true));
        metrics
            .peers_synced
            .set(count(&|p| p.phase == Phase::Synced));
        metrics
            .peers_stale
            .set(count(&|p| p.health == ClusterHealth::Stale));
        *self
            .shared
            .status
            .write()
            .unwrap_or_else(|e| e.into_inner()) = status;
    }

    fn persist(&mut self, now: Instant) {
        self.last_persist = now;
        self.persist_dirty = false;
        let Some(writer) = &self.state_writer else {
            return;
        };
        let bytes = {
            let mesh = self.shared.mesh.read().unwrap_or_else(|e| e.into_inner());
            let state = PersistedRef {
                schema: STATE_SCHEMA,
                cluster: &self.config.cluster.name,
                local: (self.local_synced || self.local_restored).then(|| mesh.local()),
                peers: mesh.peers().iter().map(|(n, d)| (n, &d.part)).collect(),
            };
            serde_json::to_vec(&state)
        };
        match bytes {
            Ok(bytes) => writer.write(bytes),
            Err(error) => tracing::warn!(%error, "cannot serialize the state"),
        }
    }
}
