//! What kvstoremesh reports on its health endpoints ([`daemon::health`]): ready when every
//! configured peer is synced or past its first-sync timeout, with the
//! [`MeshStatus`](crate::MeshStatus) as the body.

use std::sync::Arc;

use daemon::health::Health;

use crate::board::Board;
use crate::metrics::Metrics;

pub(crate) struct MeshHealth {
    pub(crate) board: Arc<Board>,
    pub(crate) metrics: Arc<Metrics>,
}

impl Health for MeshHealth {
    fn readiness(&self) -> (bool, serde_json::Value) {
        let status = self.board.snapshot();
        self.metrics.ready.set(i64::from(status.ready));
        (
            status.ready,
            serde_json::to_value(&status).unwrap_or_default(),
        )
    }

    fn metrics(&self) -> String {
        self.metrics.encode()
    }
}
