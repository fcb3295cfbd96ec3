//! What the apiserver reports on its health endpoints ([`daemon::health`]): ready once the
//! full state is published, with the entry counts and the last store error.

use std::sync::Arc;

use daemon::health::Health;
use tokio::sync::watch;

use crate::election::Role;
use crate::metrics::Metrics;
use crate::publisher::PublisherStatus;

pub(crate) struct ApiserverHealth {
    pub(crate) status: watch::Receiver<PublisherStatus>,
    pub(crate) metrics: Arc<Metrics>,
}

impl Health for ApiserverHealth {
    fn readiness(&self) -> (bool, serde_json::Value) {
        let status = self.status.borrow().clone();
        // A standby is ready too: the cluster's state is published, by the leader.
        let (ready, role, leader) = match &status.role {
            Role::Leader => (status.ready, "leader", None),
            Role::Standby { leader } => (true, "standby", Some(leader.clone())),
            Role::Campaigning => (false, "campaigning", None),
        };
        let body = serde_json::json!({
            "ready": ready,
            "role": role,
            "leader": leader,
            "entries": status.entries,
            "last_error": status.last_error,
        });
        (ready, body)
    }

    fn metrics(&self) -> String {
        self.metrics.encode()
    }
}
