//! Health, readiness and metrics over HTTP.
//!
//! - `/healthz`: 200 while the process serves.
//! - `/readyz`: 200 when every configured peer is synced or past its first-sync timeout
//!   (503 before), with the [`MeshStatus`](crate::MeshStatus) as JSON.
//! - `/metrics`: Prometheus text format.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::board::Board;
use crate::metrics::Metrics;

#[derive(Clone)]
struct AppState {
    board: Arc<Board>,
    metrics: Arc<Metrics>,
}

/// Binds `addr` now (so a bad address fails at startup) and serves until `cancel`.
pub(crate) async fn serve(
    addr: SocketAddr,
    board: Arc<Board>,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<std::io::Result<()>>)> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .with_state(AppState { board, metrics });
    let task = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(cancel.cancelled_owned())
            .await
    });
    Ok((local, task))
}

async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    let status = state.board.snapshot();
    state.metrics.ready.set(i64::from(status.ready));
    let code = if status.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = serde_json::to_string_pretty(&status).unwrap_or_default() + "\n";
    (code, [(header::CONTENT_TYPE, "application/json")], body)
}

async fn metrics_text(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.encode(),
    )
}
