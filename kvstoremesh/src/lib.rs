//! kvstoremesh: runs once per cluster, holds one connection per peer cluster, and mirrors
//! what each peer published (`cilium/state/...`) into the local store's cache
//! (`cilium/cache/<kind>/v1/<peer>/...`), so node agents read one local store instead of
//! connecting to every peer.
//!
//! - The peers directory's files (Cilium's etcd client-config YAML, [`model::peerfile`]),
//!   read with [`kvstore::client::parse_peer_file`].
//! - One owner task per peer (`mirror`): cluster-config check, canary-gated full sync with
//!   garbage collection, watch following, validation of every entry, reconnects with
//!   jittered backoff, resume or relist, replaced-store detection, status in the store.
//! - `status`: the keys kvstoremesh writes besides the cache, and the status value
//!   ([`model::PeerStatus`]).
//! - [`Metrics`] and the HTTP endpoints (`/healthz`, `/readyz`, `/metrics`).
//!
//! [`start`] wires it up; one [`CancellationToken`] stops everything. `docs/kvstoremesh.md`
//! describes the behaviour for operators.

mod board;
mod health;
mod local;
mod metrics;
mod mirror;
mod peers;
mod status;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use kvstore::client::{ClientConfig, StoreClient};
use model::ClusterConfig;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

pub use board::MeshStatus;
pub use local::LEASE_KEY;
pub use metrics::Metrics;
pub use mirror::MirrorError;

use crate::board::Board;
use crate::local::Local;
use crate::mirror::Shared;
use peer_follow::{Backoff, Claims};

/// Keys per page when listing a store (the client's default is 1000).
const LIST_PAGE_SIZE: u32 = 5000;

/// How often and how long things happen. Field names are the command's flag names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Timing {
    /// TTL of kvstoremesh's lease in the local store: how long the cache outlives a
    /// kvstoremesh that died.
    pub lease_ttl: Duration,
    /// How often the peers directory is read.
    pub peers_poll_interval: Duration,
    /// How long a removed peer's cache stays before it is drained.
    pub peer_removal_grace: Duration,
    /// How long readiness waits for a peer's first full sync.
    pub first_sync_timeout: Duration,
    /// How often each peer's store is checked (answers, same store, same config) and its
    /// heartbeat copied.
    pub probe_interval: Duration,
    /// How long one check may take: a peer cut off by a partition (nothing refused, nothing
    /// answered) is noticed within `probe_interval` + this.
    pub probe_timeout: Duration,
    /// Timeout of each request to a peer (listings, cache writes' reads).
    pub peer_request_timeout: Duration,
    /// First reconnect delay (jittered, doubling).
    pub backoff_base: Duration,
    /// Longest reconnect delay; refused peers are retried at this pace.
    pub backoff_max: Duration,
    /// How long shutdown waits for the tasks.
    pub shutdown_grace: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            lease_ttl: Duration::from_secs(15),
            peers_poll_interval: Duration::from_secs(1),
            peer_removal_grace: Duration::from_secs(30),
            first_sync_timeout: Duration::from_secs(60),
            probe_interval: Duration::from_secs(1),
            probe_timeout: Duration::from_secs(1),
            peer_request_timeout: Duration::from_secs(5),
            backoff_base: Duration::from_millis(250),
            backoff_max: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(5),
        }
    }
}

impl Timing {
    /// Checks every duration; the error names the field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (field, value) in [
            ("lease_ttl", self.lease_ttl),
            ("peers_poll_interval", self.peers_poll_interval),
            ("first_sync_timeout", self.first_sync_timeout),
            ("probe_interval", self.probe_interval),
            ("probe_timeout", self.probe_timeout),
            ("peer_request_timeout", self.peer_request_timeout),
            ("backoff_base", self.backoff_base),
            ("backoff_max", self.backoff_max),
        ] {
            if value.is_zero() {
                return Err(ConfigError::Zero { field });
            }
        }
        if self.lease_ttl < Duration::from_secs(2) {
            return Err(ConfigError::LeaseTooShort {
                ttl: self.lease_ttl,
            });
        }
        if self.backoff_base > self.backoff_max {
            return Err(ConfigError::BackoffOrder {
                base: self.backoff_base,
                max: self.backoff_max,
            });
        }
        Ok(())
    }
}

/// Everything kvstoremesh needs.
#[derive(Debug, Clone)]
pub struct MeshConfig {
    /// This cluster: its name, id and max-connected-clusters decide which peers are refused.
    pub local: ClusterConfig,
    /// The local store, written as `admin-<local>`.
    pub store: ClientConfig,
    /// The directory with one file per peer.
    pub peers_dir: PathBuf,
    /// Where `/healthz`, `/readyz` and `/metrics` are served (port 0 picks one); `None`
    /// serves nothing.
    pub health_listen: Option<SocketAddr>,
    /// Intervals and timeouts.
    pub timing: Timing,
}

impl MeshConfig {
    /// Checks the configuration without connecting; the error names the field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.timing.validate()?;
        match std::fs::metadata(&self.peers_dir) {
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => {
                return Err(ConfigError::NotADirectory {
                    path: self.peers_dir.clone(),
                });
            }
            Err(source) => {
                return Err(ConfigError::PeersDir {
                    path: self.peers_dir.clone(),
                    source,
                });
            }
        }
        self.store.validate().map_err(ConfigError::Store)
    }
}

/// A configuration kvstoremesh cannot run with; each variant names the field.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A duration that must be positive is zero.
    #[error("{field} must be greater than zero")]
    Zero {
        /// The field.
        field: &'static str,
    },
    /// The lease TTL is below the store's smallest lease.
    #[error("lease_ttl must be at least 2s (the store's smallest lease), not {ttl:?}")]
    LeaseTooShort {
        /// The TTL given.
        ttl: Duration,
    },
    /// The first reconnect delay is above the longest.
    #[error("backoff_base {base:?} is above backoff_max {max:?}")]
    BackoffOrder {
        /// The first delay.
        base: Duration,
        /// The longest delay.
        max: Duration,
    },
    /// The peers directory cannot be read.
    #[error("peers_dir {path}: {source}")]
    PeersDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The peers directory is a file.
    #[error("peers_dir {path} is not a directory")]
    NotADirectory {
        /// The path.
        path: PathBuf,
    },
    /// The local store's client configuration is refused.
    #[error("store: {0}")]
    Store(#[source] kvstore::client::ConfigError),
}

impl ConfigError {
    /// The field at fault (`lease_ttl`, `peers_dir`, `store`, ...).
    pub fn field(&self) -> &'static str {
        match self {
            ConfigError::Zero { field } => field,
            ConfigError::LeaseTooShort { .. } => "lease_ttl",
            ConfigError::BackoffOrder { .. } => "backoff_base",
            ConfigError::PeersDir { .. } | ConfigError::NotADirectory { .. } => "peers_dir",
            ConfigError::Store(_) => "store",
        }
    }
}

/// Why kvstoremesh could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration is refused; nothing was started.
    #[error("invalid configuration")]
    Config(#[from] ConfigError),
    /// The local store client could not be set up.
    #[error("local store client")]
    Store(#[source] kvstore::client::Error),
    /// The health endpoint could not be bound or failed.
    #[error("health endpoint {addr}")]
    Http {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A task panicked.
    #[error("a kvstoremesh task failed")]
    Task(#[source] tokio::task::JoinError),
    /// A task stopped before shutdown was asked for (a bug).
    #[error("the {task} task stopped before shutdown")]
    Stopped {
        /// Which task.
        task: &'static str,
    },
}

/// A running kvstoremesh.
#[derive(Debug)]
pub struct Running {
    health_addr: Option<SocketAddr>,
    board: Arc<Board>,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
    grace: Duration,
    tasks: Vec<(&'static str, JoinHandle<()>)>,
    http: Option<(SocketAddr, JoinHandle<std::io::Result<()>>)>,
}

/// Validates `config`, binds the health endpoint, and starts the lease keeper and the peers
/// directory watcher (which starts one task per peer). Returns once they run; the local store
/// need not be reachable yet (kvstoremesh waits for it, and is not ready meanwhile).
pub async fn start(config: MeshConfig, cancel: CancellationToken) -> Result<Running, Error> {
    config.validate()?;
    // A full sync lists the peer's cache in the local store; pages of 1000 keys make that
    // round-trip bound.
    let mut store_config = config.store.clone();
    store_config.limits.list_page_size = store_config.limits.list_page_size.max(LIST_PAGE_SIZE);
    let store = StoreClient::connect_lazy(&store_config)
        .await
        .map_err(Error::Store)?;
    let metrics = Arc::new(Metrics::default());
    let (lease_tx, lease_rx) = watch::channel(None);
    let board = Arc::new(Board::new(
        config.timing.first_sync_timeout,
        lease_rx.clone(),
    ));
    let http = match config.health_listen {
        Some(addr) => Some(
            daemon::health::serve(
                addr,
                Arc::new(health::MeshHealth {
                    board: board.clone(),
                    metrics: metrics.clone(),
                }),
                cancel.clone(),
            )
            .await
            .map_err(|source| Error::Http { addr, source })?,
        ),
        None => None,
    };
    let shared = Arc::new(Shared {
        local: Local::new(store.clone(), lease_rx, metrics.clone()),
        local_config: config.local.clone(),
        timing: config.timing.clone(),
        metrics: metrics.clone(),
        claims: Arc::new(Claims::default()),
        board: board.clone(),
    });
    let lease_task = tokio::spawn(
        local::run_lease(
            store,
            config.local.clone(),
            config.timing.lease_ttl,
            Backoff::new(config.timing.backoff_base, config.timing.backoff_max),
            lease_tx,
            metrics.clone(),
            cancel.clone(),
        )
        .instrument(tracing::info_span!("local_lease")),
    );
    let manager = tokio::spawn(
        peers::run_manager(shared, config.peers_dir.clone(), cancel.clone())
            .instrument(tracing::info_span!("peers_dir")),
    );
    tracing::info!(
        cluster = %config.local.name,
        id = config.local.id.get(),
        peers_dir = %config.peers_dir.display(),
        health = ?http.as_ref().map(|(addr, _)| *addr),
        "kvstoremesh started"
    );
    Ok(Running {
        health_addr: http.as_ref().map(|(addr, _)| *addr),
        board,
        metrics,
        cancel,
        grace: config.timing.shutdown_grace,
        tasks: vec![("local lease", lease_task), ("peers directory", manager)],
        http,
    })
}

impl Running {
    /// Where `/healthz`, `/readyz` and `/metrics` are served.
    pub fn health_addr(&self) -> Option<SocketAddr> {
        self.health_addr
    }

    /// Readiness and every peer's status now.
    pub fn status(&self) -> MeshStatus {
        self.board.snapshot()
    }

    /// The metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Runs until the cancellation token fires (or a task stops by itself, which is a bug),
    /// then waits up to the shutdown grace period for every task. The lease is not revoked:
    /// the cache outlives a restart by the lease TTL and the next kvstoremesh takes it over.
    pub async fn wait(self) -> Result<(), Error> {
        let mut aborts = Vec::new();
        let mut running: FuturesUnordered<_> = self
            .tasks
            .into_iter()
            .map(|(name, task)| {
                aborts.push(task.abort_handle());
                async move { (name, task.await.map_err(Error::Task)) }
            })
            .collect();
        let mut first_error = None;
        tokio::select! {
            biased;
            () = self.cancel.cancelled() => {}
            Some((task, result)) = running.next() => {
                // A task that saw the cancellation first is not early.
                if let Err(error) = result {
                    first_error = Some(error);
                } else if !self.cancel.is_cancelled() {
                    tracing::error!(task, "a task stopped before shutdown");
                    first_error = Some(Error::Stopped { task });
                }
                self.cancel.cancel();
            }
        }
        let rest = async {
            while let Some((_, result)) = running.next().await {
                if let Err(error) = result {
                    first_error.get_or_insert(error);
                }
            }
            if let Some((addr, task)) = self.http {
                match task.await {
                    Ok(Ok(())) => {}
                    Ok(Err(source)) => {
                        first_error.get_or_insert(Error::Http { addr, source });
                    }
                    Err(error) => {
                        first_error.get_or_insert(Error::Task(error));
                    }
                }
            }
        };
        if tokio::time::timeout(self.grace, rest).await.is_err() {
            tracing::warn!(grace = ?self.grace, "tasks did not stop within the grace period; aborting them");
            aborts.iter().for_each(tokio::task::AbortHandle::abort);
        }
        tracing::info!("kvstoremesh stopped");
        first_error.map_or(Ok(()), Err)
    }
}
