//! The health endpoints every daemon serves: `/healthz` (200 while the process serves),
//! `/readyz` (200 when ready, 503 before, with a JSON body saying why) and `/metrics`
//! (Prometheus text). Daemons with a larger API merge [`router`] into theirs.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// What a daemon reports on its health endpoints.
pub trait Health: Send + Sync + 'static {
    /// Whether the daemon is ready, and a JSON object that says what it is waiting for.
    fn readiness(&self) -> (bool, serde_json::Value);
    /// Its metrics in the Prometheus (OpenMetrics) text format.
    fn metrics(&self) -> String;
}

/// The three health routes, for a daemon to serve alone ([`serve`]) or inside its own API.
pub fn router<S>(health: Arc<dyn Health>) -> Router<S> {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(health)
}

/// Binds `addr` now (so a bad address fails at startup) and serves `app` until `cancel`.
pub async fn serve_router(
    addr: SocketAddr,
    app: Router,
    cancel: CancellationToken,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<std::io::Result<()>>)> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let task = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(cancel.cancelled_owned())
            .await
    });
    Ok((local, task))
}

/// Serves only the health routes on `addr`; see [`serve_router`].
pub async fn serve(
    addr: SocketAddr,
    health: Arc<dyn Health>,
    cancel: CancellationToken,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<std::io::Result<()>>)> {
    serve_router(addr, router(health), cancel).await
}

async fn readyz(State(health): State<Arc<dyn Health>>) -> impl IntoResponse {
    let (ready, body) = health.readiness();
    let code = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string() + "\n",
    )
}

async fn metrics(State(health): State<Arc<dyn Health>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        health.metrics(),
    )
}
