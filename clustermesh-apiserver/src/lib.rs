//! The clustermesh-apiserver: publishes one cluster's state into its store.
//!
//! [`run`] wires the pieces: the store (embedded by default, or an external etcd), a
//! [cluster source](cluster_source) (manifests or the Kubernetes API), the [`publisher`]
//! that keeps the store equal to what [`published`] says the cluster publishes, and the
//! HTTP endpoints for health, readiness and metrics. One cancellation token stops them all.
//! Several replicas may publish into one store: the [`election`] picks the one that does.

pub mod election;
mod health;
pub mod metrics;
pub mod published;
pub mod publisher;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use cluster_source::{ClusterSource, KubeApi, ManifestDir};
use kvstore::client::{ClientConfig, StoreClient, TlsFiles};
use kvstore::server::{Server, ServerConfig};
use thiserror::Error;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::metrics::Metrics;
use crate::publisher::{PublisherConfig, PublisherStatus};

/// Where the cluster's own state comes from.
#[derive(Debug, Clone)]
pub enum SourceConfig {
    /// A directory of Kubernetes manifests, watched for changes.
    Manifests(PathBuf),
    /// The Kubernetes API, through this kubeconfig (or the in-cluster/default one).
    Kubernetes { kubeconfig: Option<PathBuf> },
}

/// Which store the cluster publishes into.
#[derive(Debug, Clone)]
pub enum StoreConfig {
    /// Host the embedded store; the publisher talks to it through its own API, as any
    /// client would, presenting `admin_tls` when the store requires client certificates.
    Embedded {
        server: ServerConfig,
        admin_tls: Option<TlsFiles>,
    },
    /// Publish into an external etcd (or another of our stores).
    External(ClientConfig),
}

/// Everything the apiserver needs, validated before anything starts.
#[derive(Debug, Clone)]
pub struct ApiserverConfig {
    pub source: SourceConfig,
    pub store: StoreConfig,
    pub publisher: PublisherConfig,
    pub health_listen: Option<SocketAddr>,
    pub shutdown_grace: Duration,
}

/// Errors that stop the apiserver from starting.
#[derive(Debug, Error)]
pub enum ApiserverError {
    /// The embedded store did not start.
    #[error("embedded store: {0}")]
    Store(#[from] kvstore::server::ServerError),
    /// The store could not be reached or configured.
    #[error("store client: {0}")]
    Client(#[from] kvstore::client::Error),
    /// The Kubernetes client could not be configured.
    #[error("kubernetes client: {0}")]
    Kube(String),
    /// A part stopped for good while the apiserver ran (the cluster source failed), so the
    /// whole apiserver stopped rather than idle without publishing.
    #[error("{0}")]
    PartFailed(String),
    /// The health endpoint could not be bound.
    #[error("health endpoint {addr}: {source}")]
    Health {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// What a started apiserver exposes to its caller (tests use the addresses).
#[derive(Debug)]
pub struct Running {
    /// The client endpoint of the store we publish into.
    pub store_endpoint: String,
    /// Where health, readiness and metrics are served.
    pub health_addr: Option<SocketAddr>,
    /// Publisher status, for callers that want to wait for readiness.
    pub status: watch::Receiver<PublisherStatus>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// Why a part stopped on its own, if one did; it then cancelled everything else.
    failure: Arc<std::sync::Mutex<Option<String>>>,
    store: Option<Server>,
    grace: Duration,
}

/// Starts every part; returns once the store is serving (publishing goes on in background).
pub async fn start(
    config: ApiserverConfig,
    cancel: CancellationToken,
) -> Result<Running, ApiserverError> {
    let cluster = config.publisher.translate.cluster.name.clone();
    let span = tracing::info_span!("apiserver", %cluster);
    let (client, store, store_endpoint) = match config.store {
        StoreConfig::Embedded { server, admin_tls } => {
            let tls = server.tls.is_some();
            let store = Server::start(server, cancel.clone()).await?;
            let scheme = if tls { "https" } else { "http" };
            let endpoint = format!("{scheme}://{}", store.local_addr());
            let mut client_config = ClientConfig::new([endpoint.clone()]);
            client_config.tls = admin_tls;
            let client = StoreClient::connect(&client_config).await?;
            (client, Some(store), endpoint)
        }
        StoreConfig::External(client_config) => {
            let endpoint = client_config.endpoints.join(",");
            (StoreClient::connect(&client_config).await?, None, endpoint)
        }
    };
    let source: Box<dyn ClusterSource> = match config.source {
        SourceConfig::Manifests(dir) => Box::new(ManifestDir::new(dir)),
        SourceConfig::Kubernetes { kubeconfig } => {
            Box::new(KubeApi::new(kube_client(kubeconfig).await?))
        }
    };
    let (snapshots, source_task) = cluster_source::spawn(source, cancel.clone());
    let metrics = Arc::new(Metrics::default());
    let (status_tx, status) = watch::channel(PublisherStatus::default());
    let health_addr = match config.health_listen {
        Some(addr) => {
            let health = Arc::new(health::ApiserverHealth {
                status: status.clone(),
                metrics: metrics.clone(),
            });
            let (local, _task) = daemon::health::serve(addr, health, cancel.clone())
                .await
                .map_err(|source| ApiserverError::Health { addr, source })?;
            Some(local)
        }
        None => None,
    };
    let publisher = tokio::spawn(
        publisher::run(
            client,
            config.publisher,
            snapshots,
            status_tx,
            metrics,
            cancel.clone(),
        )
        .instrument(span.clone()),
    );
    let failure = Arc::new(std::sync::Mutex::new(None));
    let source = tokio::spawn(
        watch_source(source_task, Arc::clone(&failure), cancel.clone()).instrument(span),
    );
    Ok(Running {
        store_endpoint,
        health_addr,
        status,
        tasks: vec![publisher, source],
        failure,
        store,
        grace: config.shutdown_grace,
    })
}

/// Without its source the apiserver has nothing left to publish, and idling would leave
/// `/readyz` at 503 with nobody told why: a source that stops on its own (before `cancel`)
/// records why and stops every other part.
async fn watch_source(
    task: tokio::task::JoinHandle<Result<(), cluster_source::SourceError>>,
    failure: Arc<std::sync::Mutex<Option<String>>>,
    cancel: CancellationToken,
) {
    let reason = match task.await {
        Ok(Ok(())) if cancel.is_cancelled() => return,
        Ok(Ok(())) => "the cluster source stopped".to_owned(),
        Ok(Err(error)) => format!("cluster source: {}", daemon::error_chain(&error)),
        Err(error) => format!("cluster source task: {error}"),
    };
    tracing::error!(%reason, "stopping: nothing left to publish");
    if let Ok(mut slot) = failure.lock() {
        slot.get_or_insert(reason);
    }
    cancel.cancel();
}

impl Running {
    /// Waits for every part to stop after the cancellation token fired, at most the grace
    /// period; what is still running then is dropped. Fails if a part stopped on its own.
    pub async fn wait(self) -> Result<(), ApiserverError> {
        let grace = self.grace;
        let all = async {
            for task in self.tasks {
                let _ = task.await;
            }
            match self.store {
                Some(store) => store.wait().await.map_err(ApiserverError::from),
                None => Ok(()),
            }
        };
        let stopped = match tokio::time::timeout(grace, all).await {
            Ok(result) => result,
            Err(_) => {
                tracing::warn!(?grace, "shutdown took longer than the grace period");
                Ok(())
            }
        };
        let failure = self.failure.lock().ok().and_then(|mut slot| slot.take());
        match failure {
            Some(reason) => Err(ApiserverError::PartFailed(reason)),
            None => stopped,
        }
    }
}

async fn kube_client(kubeconfig: Option<PathBuf>) -> Result<kube::Client, ApiserverError> {
    let config = match kubeconfig {
        Some(path) => {
            let file = kube::config::Kubeconfig::read_from(&path)
                .map_err(|e| ApiserverError::Kube(format!("{}: {e}", path.display())))?;
            kube::Config::from_custom_kubeconfig(file, &Default::default())
                .await
                .map_err(|e| ApiserverError::Kube(format!("{}: {e}", path.display())))?
        }
        None => kube::Config::infer()
            .await
            .map_err(|e| ApiserverError::Kube(e.to_string()))?,
    };
    kube::Client::try_from(config).map_err(|e| ApiserverError::Kube(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_translate::TranslateConfig;
    use model::{Capabilities, ClusterConfig, ClusterId, ClusterName, MaxConnectedClusters};

    /// A source that fails after the checks of `main` (here: a manifest path that is a file)
    /// stops the whole apiserver with the reason, instead of leaving it idle.
    #[tokio::test]
    async fn a_failed_source_stops_the_apiserver_with_its_reason() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("nodes.yaml");
        std::fs::write(&file, "").unwrap();
        let name = ClusterName::new("eu-1").unwrap();
        let max = MaxConnectedClusters::Max255;
        let cluster = ClusterConfig::new(
            name,
            ClusterId::new(2, max).unwrap(),
            max,
            Capabilities::default(),
        )
        .unwrap();
        let config = ApiserverConfig {
            source: SourceConfig::Manifests(file),
            store: StoreConfig::Embedded {
                server: ServerConfig::new(([127, 0, 0, 1], 0).into(), dir.path().join("data")),
                admin_tls: None,
            },
            publisher: PublisherConfig {
                translate: TranslateConfig {
                    cluster,
                    default_global_namespace: true,
                },
                lease_ttl: Duration::from_secs(5),
                heartbeat_interval: Duration::from_secs(1),
                retry_backoff: Duration::from_millis(100),
                replica: None,
            },
            health_listen: None,
            shutdown_grace: Duration::from_secs(5),
        };
        let cancel = CancellationToken::new();
        let running = start(config, cancel.clone()).await.expect("started");
        tokio::time::timeout(Duration::from_secs(30), cancel.cancelled())
            .await
            .expect("the failed source cancels the apiserver");
        let error = running.wait().await.expect_err("wait reports the failure");
        let text = error.to_string();
        assert!(
            text.contains("nodes.yaml") && text.contains("not a directory"),
            "{text}"
        );
    }
}
