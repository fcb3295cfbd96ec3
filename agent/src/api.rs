//! The agent's local HTTP JSON API, and a minimal client for it.
//!
//! | path | body |
//! |---|---|
//! | `GET /v1/services` | list of [`ServiceEntry`](crate::tables::ServiceEntry) |
//! | `GET /v1/ipcache` | list of [`IpcacheEntry`](crate::tables::IpcacheEntry) |
//! | `GET /v1/policy` | [`PolicyView`]: allow entries and enforced identities |
//! | `GET /v1/routes` | list of [`RouteEntry`](crate::tables::RouteEntry) |
//! | `GET /v1/peers` | [`AgentStatus`] |
//! | `GET /v1/tables` | every table ([`Tables`]) |
//! | `GET /v1/datapath` | [`DatapathStatus`](crate::datapath::DatapathStatus) |
//! | `GET /v1/drops` | recent [`DropView`](crate::datapath::DropView)s, oldest first |
//! | `GET /v1/endpoints`, `PUT`/`DELETE /v1/endpoints/{container_id}` | the CNI plugin's contract: [`model::endpoint`] |
//! | `GET /healthz`, `/readyz`, `/metrics` | liveness, readiness (local cluster synced), Prometheus |
//!
//! It listens on loopback by default: it is for the node's operator and the `clustermesh`
//! command, not for the network.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};

use axum::Router;
use axum::extract::Path;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use daemon::health::Health;
use model::endpoint::{ApiError, EndpointRegistration};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::datapath::DatapathHandle;
use crate::health::LostReason;
use crate::merge::ClusterHealth;
use crate::metrics::Metrics;
use crate::remote::Phase;
use crate::state::MeshState;
use crate::tables::{EnforcementEntry, PolicyEntry, TableCounts, Tables};

/// One peer, as the API shows it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerView {
    /// The peer.
    pub name: String,
    /// Its cluster id, once its config was accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_id: Option<u16>,
    /// A peer file exists (direct) or kvstoremesh caches it (cache).
    pub configured: bool,
    /// Where its state machine is.
    pub phase: Phase,
    /// The connection (direct) or kvstoremesh's connection (cache) is up.
    pub connected: bool,
    /// `healthy`, or `stale` when lost for longer than the grace period.
    pub health: ClusterHealth,
    /// Why it is lost, while it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lost: Option<LostReason>,
    /// Its part is the one persisted by a previous run, not yet replaced by a resync.
    pub restored: bool,
    /// Entries of its part: nodes, services, identities, ips.
    pub entries: BTreeMap<String, usize>,
    /// Changes of health since the agent started.
    pub health_changes: u64,
    /// Entries refused since the agent started.
    pub invalid_entries: u64,
    /// The last error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// The agent's status.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentStatus {
    /// The local cluster.
    pub cluster: String,
    /// The local cluster's objects are synced (or were restored and not yet replaced).
    pub local_synced: bool,
    /// The local part is the one persisted by a previous run.
    pub local_restored: bool,
    /// Increases with every change of the tables.
    pub generation: u64,
    /// Table sizes.
    pub counts: TableCounts,
    /// Peers by name.
    pub peers: BTreeMap<String, PeerView>,
    /// Policies that could not be compiled as written.
    #[serde(default)]
    pub policy_warnings: Vec<String>,
}

/// The policy table with its enforcement set.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyView {
    /// Allowed traffic.
    pub allow: Vec<PolicyEntry>,
    /// Local identities under default-deny.
    pub enforcement: Vec<EnforcementEntry>,
}

/// What the API reads: the owner task writes it.
#[derive(Debug)]
pub struct Shared {
    /// Parts and tables.
    pub mesh: RwLock<MeshState>,
    /// Status.
    pub status: RwLock<AgentStatus>,
    /// Metrics.
    pub metrics: Metrics,
    /// The datapath's owner.
    pub datapath: DatapathHandle,
}

impl Shared {
    /// Reads the tables under the lock.
    pub fn with_tables<T>(&self, f: impl FnOnce(&Tables) -> T) -> T {
        let mesh = self.mesh.read().unwrap_or_else(|e| e.into_inner());
        f(mesh.tables())
    }

    /// A copy of the status.
    pub fn status(&self) -> AgentStatus {
        self.status
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

type App = Arc<Shared>;

fn json<T: Serialize>(value: &T) -> Response {
    match serde_json::to_vec(value) {
        Ok(body) => (
            StatusCode::OK,
            [(axum::http::header::CONTENT_TYPE, "application/json")],
            body,
        )
            .into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

async fn services(State(app): State<App>) -> Response {
    let list: Vec<_> = app.with_tables(|t| t.services.values().cloned().collect());
    json(&list)
}

async fn ipcache(State(app): State<App>) -> Response {
    let list: Vec<_> = app.with_tables(|t| t.ipcache.values().cloned().collect());
    json(&list)
}

async fn policy(State(app): State<App>) -> Response {
    let view = app.with_tables(|t| PolicyView {
        allow: t.policy.values().cloned().collect(),
        enforcement: t.enforcement.values().copied().collect(),
    });
    json(&view)
}

async fn routes(State(app): State<App>) -> Response {
    let list: Vec<_> = app.with_tables(|t| t.routes.values().cloned().collect());
    json(&list)
}

async fn tables(State(app): State<App>) -> Response {
    let tables = app.with_tables(Tables::clone);
    json(&tables)
}

async fn peers(State(app): State<App>) -> Response {
    json(&app.status())
}

async fn datapath_status(State(app): State<App>) -> Response {
    json(&app.datapath.status())
}

async fn drops(State(app): State<App>) -> Response {
    let list: Vec<_> = app
        .datapath
        .drops
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .cloned()
        .collect();
    json(&list)
}

async fn endpoints(State(app): State<App>) -> Response {
    let list: Vec<_> = app
        .datapath
        .endpoints
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .values()
        .cloned()
        .collect();
    json(&list)
}

fn api_error(status: StatusCode, error: String) -> Response {
    let body = serde_json::to_vec(&ApiError { error }).unwrap_or_default();
    (
        status,
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        body,
    )
        .into_response()
}

async fn put_endpoint(
    State(app): State<App>,
    Path(container_id): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    let endpoint: EndpointRegistration = match serde_json::from_slice(&body) {
        Ok(e) => e,
        Err(e) => return api_error(StatusCode::BAD_REQUEST, format!("endpoint JSON: {e}")),
    };
    if endpoint.container_id != container_id {
        return api_error(
            StatusCode::BAD_REQUEST,
            format!(
                "the path names container {container_id:?}, the body {:?}",
                endpoint.container_id
            ),
        );
    }
    if let Err(e) = endpoint.validate() {
        return api_error(StatusCode::BAD_REQUEST, e);
    }
    match app.datapath.register(endpoint).await {
        Ok(e) => json(&e),
        Err(e) => api_error(StatusCode::UNPROCESSABLE_ENTITY, e),
    }
}

async fn delete_endpoint(State(app): State<App>, Path(container_id): Path<String>) -> Response {
    match app.datapath.unregister(container_id).await {
        Ok(()) => json(&serde_json::json!({})),
        Err(e) => api_error(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

/// Ready once the local cluster is synced.
impl Health for Shared {
    fn readiness(&self) -> (bool, serde_json::Value) {
        let status = self.status();
        let body =
            serde_json::json!({"ready": status.local_synced, "generation": status.generation});
        (status.local_synced, body)
    }

    fn metrics(&self) -> String {
        self.metrics.encode()
    }
}

/// Binds `addr` now (so a bad address fails at startup) and serves until `cancel`.
pub async fn serve(
    addr: SocketAddr,
    shared: Arc<Shared>,
    cancel: CancellationToken,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<std::io::Result<()>>)> {
    let app = Router::new()
        .route("/v1/services", get(services))
        .route("/v1/ipcache", get(ipcache))
        .route("/v1/policy", get(policy))
        .route("/v1/routes", get(routes))
        .route("/v1/peers", get(peers))
        .route("/v1/tables", get(tables))
        .route("/v1/datapath", get(datapath_status))
        .route("/v1/drops", get(drops))
        .route("/v1/endpoints", get(endpoints))
        .route(
            "/v1/endpoints/{container_id}",
            put(put_endpoint).delete(delete_endpoint),
        )
        .with_state(shared.clone())
        .merge(daemon::health::router(shared));
    daemon::health::serve_router(addr, app, cancel).await
}

/// Why a request to the agent's API failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The agent could not be reached.
    #[error("cannot reach the agent at {addr}: {source}")]
    Connect {
        /// The API address.
        addr: SocketAddr,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The answer is not a well-formed HTTP response.
    #[error("the agent at {addr} sent a malformed response")]
    Malformed {
        /// The API address.
        addr: SocketAddr,
    },
    /// The agent answered with an error status.
    #[error("the agent at {addr} answered {status} to {path}: {body}")]
    Status {
        /// The API address.
        addr: SocketAddr,
        /// The path asked for.
        path: String,
        /// The HTTP status.
        status: u16,
        /// The body.
        body: String,
    },
    /// The body is not the JSON expected.
    #[error("the agent at {addr} sent unexpected JSON for {path}: {source}")]
    Json {
        /// The API address.
        addr: SocketAddr,
        /// The path asked for.
        path: String,
        /// The parser's complaint.
        source: serde_json::Error,
    },
}

/// `GET path` on the agent's API; the body as bytes. HTTP/1.0, so the agent closes the
/// connection after the body.
pub async fn get_raw(addr: SocketAddr, path: &str) -> Result<Vec<u8>, ClientError> {
    let connect = |source| ClientError::Connect { addr, source };
    let mut stream = TcpStream::connect(addr).await.map_err(connect)?;
    stream
        .write_all(
            format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\nAccept: application/json\r\n\r\n")
                .as_bytes(),
        )
        .await
        .map_err(connect)?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.map_err(connect)?;
    let split = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or(ClientError::Malformed { addr })?;
    let head =
        std::str::from_utf8(&response[..split]).map_err(|_| ClientError::Malformed { addr })?;
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or(ClientError::Malformed { addr })?;
    let body = response[split + 4..].to_vec();
    if status != 200 {
        return Err(ClientError::Status {
            addr,
            path: path.to_owned(),
            status,
            body: String::from_utf8_lossy(&body).into_owned(),
        });
    }
    Ok(body)
}

/// `GET path` on the agent's API, decoded as `T`.
pub async fn get_json<T: DeserializeOwned>(addr: SocketAddr, path: &str) -> Result<T, ClientError> {
    let body = get_raw(addr, path).await?;
    serde_json::from_slice(&body).map_err(|source| ClientError::Json {
        addr,
        path: path.to_owned(),
        source,
    })
}
