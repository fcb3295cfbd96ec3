//! The agent's local HTTP JSON API: the server. The paths and the bodies they serve are
//! [`agent_api`]'s, which the `clustermesh` command reads with, and so is the client
//! (re-exported here).
//!
//! It listens on loopback by default: it is for the node's operator and the `clustermesh`
//! command, not for the network.

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
use serde::Serialize;
use tokio_util::sync::CancellationToken;

pub use agent_api::client::{ClientError, get_json, get_raw};
pub use agent_api::status::{AgentStatus, PeerView, PolicyView};

use crate::datapath::DatapathHandle;
use crate::metrics::Metrics;
use crate::state::MeshState;
use crate::tables::Tables;

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
