//! Health, readiness and metrics over HTTP.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::publisher::PublisherStatus;

#[derive(Clone)]
struct AppState {
    status: watch::Receiver<PublisherStatus>,
    metrics: Arc<Metrics>,
}

/// Binds `addr` now (so a bad address fails at startup) and serves until `cancel`.
pub async fn serve(
    addr: SocketAddr,
    status: watch::Receiver<PublisherStatus>,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<std::io::Result<()>>)> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .with_state(AppState { status, metrics });
    let task = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(cancel.cancelled_owned())
            .await
    });
    Ok((local, task))
}

async fn readyz(State(state): State<AppState>) -> (StatusCode, String) {
    let status = state.status.borrow().clone();
    let body = serde_json::json!({
        "ready": status.ready,
        "entries": status.entries,
        "last_error": status.last_error,
    })
    .to_string();
    let code = if status.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, body + "\n")
}

async fn metrics_text(State(state): State<AppState>) -> String {
    state.metrics.encode()
}
