//! The embedded etcd-compatible server.
//!
//! Layout: [`storage`] makes batches durable; [`mvcc`] is the state machine; [`applier`] is the
//! single task that applies writes and publishes them; [`watch`] serves watch streams;
//! [`service`] maps gRPC calls onto all of that. With several members, [`cluster`] sits between
//! the services and the applier: writes go through raft's log, and each member's applier
//! takes the committed entries as its ordered stream.

pub mod access;
pub mod applier;
pub mod cluster;
pub mod mvcc;
pub mod service;
pub mod storage;
pub mod tls;
pub mod wal;
pub mod watch;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use certs::ClusterName;
use etcd_client::proto::{
    PbClusterServer, PbKvServer, PbLeaseServer, PbMaintenanceServer, PbWatchServer,
};
use thiserror::Error;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use self::applier::{Applier, Shared, Writer};
use self::mvcc::Mvcc;
use self::service::Services;
use self::storage::{SledStorage, Storage, StorageError};
pub use self::tls::{TlsError, TlsFiles};

/// etcd's default `--max-request-bytes`.
pub const DEFAULT_MAX_REQUEST_BYTES: usize = 1536 * 1024;
/// etcd's allowance for gRPC framing on top of the request limit.
const GRPC_OVERHEAD_BYTES: usize = 512 * 1024;
/// etcd's default interval between watch progress notifications.
pub const DEFAULT_PROGRESS_INTERVAL: Duration = Duration::from_secs(600);
/// The etcd API version we answer to in `Status`; clients gate features on it.
pub const API_VERSION: &str = "3.4.0";

/// Everything the server needs, validated before anything starts.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub tls: Option<TlsFiles>,
    pub max_request_bytes: usize,
    pub progress_interval: Duration,
    /// How long shutdown waits for open streams before it drops them.
    pub shutdown_grace: Duration,
    /// The cluster this store belongs to: turns on the per-user access rules of
    /// [`access`], which need client certificates.
    pub access: Option<ClusterName>,
    /// This member's name in `MemberList` (etcd's `--name`).
    pub name: String,
    /// The URLs clients reach this member at, in `MemberList` (etcd's
    /// `--advertise-client-urls`); empty: the listen address, with the scheme TLS implies.
    pub advertise_client_urls: Vec<String>,
    /// Replication: this member's place in a cluster (`--initial-cluster` etc.); `None` runs
    /// a single member without raft.
    pub cluster: Option<Arc<cluster::ClusterConfig>>,
}

impl ServerConfig {
    pub fn new(listen: SocketAddr, data_dir: PathBuf) -> Self {
        Self {
            listen,
            data_dir,
            tls: None,
            max_request_bytes: DEFAULT_MAX_REQUEST_BYTES,
            progress_interval: DEFAULT_PROGRESS_INTERVAL,
            shutdown_grace: Duration::from_secs(5),
            access: None,
            name: "default".to_owned(),
            advertise_client_urls: Vec::new(),
            cluster: None,
        }
    }
}

/// Errors starting or running the server.
#[derive(Debug, Error)]
pub enum ServerError {
    /// The data directory could not be created or opened.
    #[error("data directory {path}: {source}")]
    DataDir {
        path: PathBuf,
        #[source]
        source: StorageError,
    },
    /// The listen address could not be bound.
    #[error("listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// The TLS material is unusable.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// Access rules decide by client certificate, so they need mutual TLS.
    #[error("access rules (a cluster name) need TLS with a client CA bundle")]
    AccessWithoutClientCerts,
    /// The gRPC server failed.
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// This member's cluster description cannot work.
    #[error(transparent)]
    Cluster(#[from] cluster::ClusterConfigError),
    /// Raft could not start.
    #[error(transparent)]
    Raft(#[from] cluster::node::NodeError),
    /// The transport between members could not start.
    #[error(transparent)]
    Peers(#[from] cluster::transport::TransportError),
    /// A server task panicked or was aborted.
    #[error("server task: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// A running server; dropping it does not stop it, cancelling its token does.
#[derive(Debug)]
pub struct Server {
    local_addr: SocketAddr,
    cancel: CancellationToken,
    task: JoinHandle<Result<(), ServerError>>,
}

impl Server {
    /// Opens the store, binds the port and starts serving; returns once clients can connect.
    pub async fn start(
        config: ServerConfig,
        cancel: CancellationToken,
    ) -> Result<Self, ServerError> {
        if config.access.is_some() && config.tls.as_ref().is_none_or(|t| t.client_ca.is_none()) {
            return Err(ServerError::AccessWithoutClientCerts);
        }
        let tls = config
            .tls
            .as_ref()
            .map(TlsFiles::server_config)
            .transpose()?;
        let tls_files = config.tls.clone();
        let dir = config.data_dir.clone();
        let replicated = config.cluster.is_some();
        let opened = tokio::task::spawn_blocking(move || -> Result<_, StorageError> {
            std::fs::create_dir_all(&dir).map_err(|source| StorageError::Io {
                path: dir.clone(),
                source,
            })?;
            let storage: Arc<dyn Storage> = Arc::new(SledStorage::open(&dir)?);
            let mut loaded = storage.load()?;
            let log = replicated
                .then(|| cluster::log::RaftLog::open(&dir))
                .transpose()?;
            // A snapshot recorded in the log but not yet (wholly) in the store: install it
            // again from the file it was kept in.
            if let Some(log) = &log {
                let applied = loaded.meta.as_ref().map_or(0, |m| m.applied_index);
                if applied < log.base() {
                    let path = dir.join(cluster::node::SNAPSHOT_FILE);
                    let image =
                        std::fs::read(&path).map_err(|source| StorageError::Io { path, source })?;
                    loaded = storage.restore(&image)?;
                    tracing::info!(
                        index = log.base(),
                        "restored the store from the installed snapshot"
                    );
                }
            }
            Ok((storage, loaded, log))
        })
        .await?;
        let (storage, loaded, log) = opened.map_err(|source| ServerError::DataDir {
            path: config.data_dir.clone(),
            source,
        })?;
        let records = loaded.records.len();
        let mut state = Mvcc::open(storage.clone(), loaded);
        if let Some(cluster) = &config.cluster {
            state.set_identity(cluster.cluster_id, cluster.id);
        }
        tracing::info!(
            data_dir = %config.data_dir.display(),
            records,
            revision = state.current_revision(),
            "store opened"
        );
        let shared = Shared::new(state, storage);
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| ServerError::Bind {
                    addr: config.listen,
                    source,
                })?;
        let local_addr = listener.local_addr().map_err(|source| ServerError::Bind {
            addr: config.listen,
            source,
        })?;
        let (applier, applier_task) = Applier::spawn(shared.clone(), cancel.clone());
        let client_urls = if config.advertise_client_urls.is_empty() {
            let scheme = if tls.is_some() { "https" } else { "http" };
            vec![format!("{scheme}://{local_addr}")]
        } else {
            config.advertise_client_urls.clone()
        };
        let dumper = applier.clone();
        let (writer, raft_thread) = match (&config.cluster, log) {
            (Some(cluster), Some(log)) => {
                let (raft, thread) = start_raft(
                    cluster.clone(),
                    log,
                    &config,
                    &client_urls,
                    shared.clone(),
                    applier,
                    &cancel,
                )
                .await?;
                (Writer::Replicated(raft), Some(thread))
            }
            _ => (Writer::Local(applier), None),
        };
        tokio::spawn(applier::expire_leases(
            shared.clone(),
            writer.clone(),
            cancel.clone(),
        ));
        let services = Services {
            name: config.name.clone(),
            client_urls,
            shared,
            writer,
            applier: dumper,
            max_request_bytes: config.max_request_bytes,
            progress_interval: config.progress_interval,
            cancel: cancel.clone(),
            version: API_VERSION,
            access: config.access.clone(),
        };
        let decode_limit = config.max_request_bytes + GRPC_OVERHEAD_BYTES;
        let router = tonic::transport::Server::builder()
            .layer(tower::util::MapResponseLayer::new(
                oversized_is_resource_exhausted as fn(_) -> _,
            ))
            .add_service(
                PbKvServer::new(services.clone())
                    .max_decoding_message_size(decode_limit)
                    .max_encoding_message_size(usize::MAX),
            )
            .add_service(
                PbWatchServer::new(services.clone())
                    .max_decoding_message_size(decode_limit)
                    .max_encoding_message_size(usize::MAX),
            )
            .add_service(
                PbLeaseServer::new(services.clone()).max_decoding_message_size(decode_limit),
            )
            .add_service(PbClusterServer::new(services.clone()))
            .add_service(
                PbMaintenanceServer::new(services).max_decoding_message_size(decode_limit),
            );
        let grace = config.shutdown_grace;
        let serve_cancel = cancel.clone();
        let task = tokio::spawn(async move {
            let shutdown = serve_cancel.clone().cancelled_owned();
            let serving = async {
                match tls.zip(tls_files) {
                    Some((tls, tls_files)) => {
                        let incoming =
                            tls::accept_loop(listener, tls_files, tls, serve_cancel.clone());
                        router
                            .serve_with_incoming_shutdown(ReceiverStream::new(incoming), shutdown)
                            .await
                    }
                    None => {
                        let incoming = plain_accept_loop(listener, serve_cancel.clone());
                        router
                            .serve_with_incoming_shutdown(ReceiverStream::new(incoming), shutdown)
                            .await
                    }
                }
            };
            tokio::pin!(serving);
            let result = tokio::select! {
                result = &mut serving => result.map_err(ServerError::from),
                () = async {
                    serve_cancel.cancelled().await;
                    tokio::time::sleep(grace).await;
                } => {
                    tracing::warn!(?grace, "connections still open after the grace period; closing them");
                    Ok(())
                }
            };
            serve_cancel.cancel();
            if let Some(thread) = raft_thread {
                // The raft thread sees the token within one tick.
                let _ = tokio::task::spawn_blocking(move || thread.join()).await;
            }
            applier_task.await?;
            result
        });
        tracing::info!(%local_addr, tls = config.tls.is_some(), "serving the etcd v3 API");
        Ok(Self {
            local_addr,
            cancel,
            task,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops accepting work and waits (up to the grace period) for the server to wind down.
    pub async fn shutdown(self) -> Result<(), ServerError> {
        self.cancel.cancel();
        self.wait().await
    }

    /// Waits until the server stops, e.g. after its cancellation token fired.
    pub async fn wait(self) -> Result<(), ServerError> {
        self.task.await?
    }
}

/// Opens raft's log, starts the peer transport and service and raft's thread.
async fn start_raft(
    cluster: Arc<cluster::ClusterConfig>,
    log: cluster::log::RaftLog,
    config: &ServerConfig,
    client_urls: &[String],
    shared: Arc<Shared>,
    applier: Applier,
    cancel: &CancellationToken,
) -> Result<(Arc<cluster::RaftHandle>, std::thread::JoinHandle<()>), ServerError> {
    if cluster.initial_state == cluster::InitialState::Existing && !log.initialized() {
        return Err(cluster::ClusterConfigError::JoinUnsupported.into());
    }
    let (tx, rx) = cluster::node::channel();
    let outbox = cluster::transport::Outbox::start(&cluster, tx.clone(), cancel)?;
    cluster::transport::serve(
        cluster.clone(),
        tx.clone(),
        shared.clone(),
        config.name.clone(),
        client_urls.to_vec(),
        cancel.clone(),
    )
    .await?;
    tracing::info!(
        member = format_args!("{:x}", cluster.id),
        cluster = format_args!("{:x}", cluster.cluster_id),
        members = cluster.members.len(),
        peers = %cluster.listen_peer,
        "starting raft"
    );
    let parts = cluster::node::Parts {
        config: cluster.clone(),
        log,
        shared: shared.clone(),
        applier,
        outbox: outbox.clone(),
        channel: (tx, rx),
        data_dir: config.data_dir.clone(),
    };
    let (raft, thread) = cluster::node::start(parts, cancel.clone())?;
    tokio::spawn(cluster::corrupt::run(
        cluster,
        outbox,
        shared,
        raft.clone(),
        cancel.clone(),
    ));
    Ok((raft, thread))
}

/// gRPC (and so etcd) reports a request above the receive limit as `RESOURCE_EXHAUSTED`;
/// tonic says `OUT_OF_RANGE`, which clients would read as a revision error.
fn oversized_is_resource_exhausted(
    mut response: tonic::codegen::http::Response<tonic::body::Body>,
) -> tonic::codegen::http::Response<tonic::body::Body> {
    let headers = response.headers_mut();
    let out_of_range = headers
        .get("grpc-status")
        .is_some_and(|v| v.as_bytes() == b"11");
    let oversized = headers.get("grpc-message").is_some_and(|v| {
        String::from_utf8_lossy(v.as_bytes()).contains("message%20length%20too%20large")
    });
    if out_of_range && oversized {
        headers.insert(
            "grpc-status",
            tonic::codegen::http::HeaderValue::from_static("8"),
        );
    }
    response
}

pub(crate) fn plain_accept_loop(
    listener: TcpListener,
    cancel: CancellationToken,
) -> mpsc::Receiver<Result<TcpStream, std::io::Error>> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                () = cancel.cancelled() => return,
                accepted = listener.accept() => accepted,
            };
            match accepted {
                Ok((socket, _)) => {
                    let _ = socket.set_nodelay(true);
                    if tx.send(Ok(socket)).await.is_err() {
                        return;
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    });
    rx
}
