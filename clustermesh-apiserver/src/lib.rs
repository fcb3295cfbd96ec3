//! The clustermesh-apiserver: publishes one cluster's state into its store.
//!
//! [`run`] wires the pieces: the store (embedded by default, or an external etcd), a
//! [cluster source](cluster_source) (manifests or the Kubernetes API), the [`publisher`]
//! that keeps the store equal to what [`translate`] says the cluster publishes, and the
//! HTTP endpoints for health, readiness and metrics. One cancellation token stops them all.

pub mod http;
pub mod identity;
pub mod metrics;
pub mod publisher;
pub mod translate;

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
            let (local, _task) = http::serve(addr, status.clone(), metrics.clone(), cancel.clone())
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
    let source = tokio::spawn(
        async move {
            match source_task.await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => tracing::error!(%error, "cluster source stopped"),
                Err(error) => tracing::error!(%error, "cluster source task failed"),
            }
        }
        .instrument(span),
    );
    Ok(Running {
        store_endpoint,
        health_addr,
        status,
        tasks: vec![publisher, source],
        store,
        grace: config.shutdown_grace,
    })
}

impl Running {
    /// Waits for every part to stop after the cancellation token fired, at most the grace
    /// period; what is still running then is dropped.
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
        match tokio::time::timeout(grace, all).await {
            Ok(result) => result,
            Err(_) => {
                tracing::warn!(?grace, "shutdown took longer than the grace period");
                Ok(())
            }
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
