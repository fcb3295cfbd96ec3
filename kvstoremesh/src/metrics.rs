//! Prometheus metrics, per peer where it matters. Events per second are
//! `rate(kvstoremesh_peer_events_total[1m])`.

use std::sync::atomic::AtomicU64;

use model::{ClusterName, Kind};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerLabel {
    peer: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerKindLabel {
    peer: String,
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerStageLabel {
    peer: String,
    stage: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerReasonLabel {
    peer: String,
    reason: String,
}

/// Where an error happened, the `stage` label of `kvstoremesh_peer_errors_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stage {
    /// Reaching or reading the peer's store.
    Peer,
    /// Writing the local store.
    Local,
    /// The peer's cluster config was missing, invalid or refused.
    Config,
}

impl Stage {
    fn name(self) -> &'static str {
        match self {
            Stage::Peer => "peer",
            Stage::Local => "local",
            Stage::Config => "config",
        }
    }
}

/// kvstoremesh's metrics and the registry that exposes them.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    connected: Family<PeerLabel, Gauge>,
    synced: Family<PeerLabel, Gauge>,
    refused: Family<PeerLabel, Gauge>,
    entries: Family<PeerKindLabel, Gauge>,
    events: Family<PeerLabel, Counter>,
    invalid: Family<PeerKindLabel, Counter>,
    errors: Family<PeerStageLabel, Counter>,
    relists: Family<PeerReasonLabel, Counter>,
    sync_seconds: Family<PeerLabel, Gauge<f64, AtomicU64>>,
    /// Peers configured in the peers directory (valid or not).
    pub peers: Gauge,
    /// 1 when every peer is synced or past its first-sync timeout.
    pub ready: Gauge,
    /// Keys written or deleted in the local store.
    pub local_writes: Counter,
    /// Times the local lease was granted (1 after startup; more after it was lost).
    pub lease_grants: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("kvstoremesh");
        let metrics = Metrics {
            connected: Family::default(),
            synced: Family::default(),
            refused: Family::default(),
            entries: Family::default(),
            events: Family::default(),
            invalid: Family::default(),
            errors: Family::default(),
            relists: Family::default(),
            sync_seconds: Family::default(),
            peers: Gauge::default(),
            ready: Gauge::default(),
            local_writes: Counter::default(),
            lease_grants: Counter::default(),
            registry: Registry::default(),
        };
        registry.register(
            "peer_connected",
            "1 while the peer's store is followed",
            metrics.connected.clone(),
        );
        registry.register(
            "peer_synced",
            "1 while the cache holds the peer's full state",
            metrics.synced.clone(),
        );
        registry.register(
            "peer_refused",
            "1 while the peer's cluster config is refused",
            metrics.refused.clone(),
        );
        registry.register(
            "peer_entries",
            "Cache entries of the peer, per kind",
            metrics.entries.clone(),
        );
        registry.register(
            "peer_events",
            "Watch events received from the peer",
            metrics.events.clone(),
        );
        registry.register(
            "peer_invalid_entries",
            "Entries of the peer refused by validation, per kind",
            metrics.invalid.clone(),
        );
        registry.register(
            "peer_errors",
            "Errors while mirroring the peer, per stage (peer, local, config)",
            metrics.errors.clone(),
        );
        registry.register(
            "peer_relists",
            "Full listings of a kind of the peer, per reason",
            metrics.relists.clone(),
        );
        registry.register(
            "peer_sync_duration_seconds",
            "How long the last full sync of every kind of the peer took",
            metrics.sync_seconds.clone(),
        );
        registry.register("peers", "Peers configured", metrics.peers.clone());
        registry.register(
            "ready",
            "1 when every peer is synced or past its first-sync timeout",
            metrics.ready.clone(),
        );
        registry.register(
            "local_writes",
            "Keys written or deleted in the local store",
            metrics.local_writes.clone(),
        );
        registry.register(
            "local_lease_grants",
            "Times the local lease was granted",
            metrics.lease_grants.clone(),
        );
        Metrics {
            registry,
            ..metrics
        }
    }
}

impl Metrics {
    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// The metrics of one peer.
    pub(crate) fn peer(&self, name: &ClusterName) -> PeerMetrics {
        let peer = name.to_string();
        let label = PeerLabel { peer: peer.clone() };
        PeerMetrics {
            connected: self.connected.get_or_create(&label).clone(),
            synced: self.synced.get_or_create(&label).clone(),
            refused: self.refused.get_or_create(&label).clone(),
            events: self.events.get_or_create(&label).clone(),
            sync_seconds: self.sync_seconds.get_or_create(&label).clone(),
            entries: Kind::ALL.map(|kind| {
                self.entries
                    .get_or_create(&PeerKindLabel {
                        peer: peer.clone(),
                        kind: kind.name().to_owned(),
                    })
                    .clone()
            }),
            invalid: Kind::ALL.map(|kind| {
                self.invalid
                    .get_or_create(&PeerKindLabel {
                        peer: peer.clone(),
                        kind: kind.name().to_owned(),
                    })
                    .clone()
            }),
            errors: [Stage::Peer, Stage::Local, Stage::Config].map(|stage| {
                self.errors
                    .get_or_create(&PeerStageLabel {
                        peer: peer.clone(),
                        stage: stage.name().to_owned(),
                    })
                    .clone()
            }),
            relists: self.relists.clone(),
            peer,
        }
    }

    /// Forgets a peer's series, once its cache is drained.
    pub(crate) fn remove_peer(&self, name: &ClusterName) {
        let peer = name.to_string();
        let label = PeerLabel { peer: peer.clone() };
        self.connected.remove(&label);
        self.synced.remove(&label);
        self.refused.remove(&label);
        self.events.remove(&label);
        self.sync_seconds.remove(&label);
        for kind in Kind::ALL {
            let label = PeerKindLabel {
                peer: peer.clone(),
                kind: kind.name().to_owned(),
            };
            self.entries.remove(&label);
            self.invalid.remove(&label);
        }
        for stage in [Stage::Peer, Stage::Local, Stage::Config] {
            self.errors.remove(&PeerStageLabel {
                peer: peer.clone(),
                stage: stage.name().to_owned(),
            });
        }
        for reason in RELIST_REASONS {
            self.relists.remove(&PeerReasonLabel {
                peer: peer.clone(),
                reason: (*reason).to_owned(),
            });
        }
    }
}

/// Every `reason` label of `kvstoremesh_peer_relists_total`.
pub(crate) const RELIST_REASONS: &[&str] = &[
    "initial",
    "compacted",
    "store-replaced",
    "config-changed",
    "lease-changed",
];

/// Handles on one peer's series.
#[derive(Debug, Clone)]
pub(crate) struct PeerMetrics {
    peer: String,
    pub connected: Gauge,
    pub synced: Gauge,
    pub refused: Gauge,
    pub events: Counter,
    pub sync_seconds: Gauge<f64, AtomicU64>,
    entries: [Gauge; 5],
    invalid: [Counter; 5],
    errors: [Counter; 3],
    relists: Family<PeerReasonLabel, Counter>,
}

fn kind_index(kind: Kind) -> usize {
    Kind::ALL.iter().position(|k| *k == kind).unwrap_or(0)
}

impl PeerMetrics {
    pub fn entries(&self, kind: Kind) -> &Gauge {
        &self.entries[kind_index(kind)]
    }

    pub fn invalid(&self, kind: Kind) -> &Counter {
        &self.invalid[kind_index(kind)]
    }

    pub fn error(&self, stage: Stage) {
        let index = match stage {
            Stage::Peer => 0,
            Stage::Local => 1,
            Stage::Config => 2,
        };
        self.errors[index].inc();
    }

    pub fn relist(&self, reason: &'static str) {
        self.relists
            .get_or_create(&PeerReasonLabel {
                peer: self.peer.clone(),
                reason: reason.to_owned(),
            })
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_peer_series_come_and_go() {
        let metrics = Metrics::default();
        let b = ClusterName::new("b").unwrap();
        let peer = metrics.peer(&b);
        peer.connected.set(1);
        peer.entries(Kind::Ip).set(7);
        peer.invalid(Kind::Nodes).inc();
        peer.error(Stage::Peer);
        peer.relist("initial");
        peer.events.inc_by(3);
        let text = metrics.encode();
        for line in [
            "kvstoremesh_peer_connected{peer=\"b\"} 1",
            "kvstoremesh_peer_entries{peer=\"b\",kind=\"ip\"} 7",
            "kvstoremesh_peer_invalid_entries_total{peer=\"b\",kind=\"nodes\"} 1",
            "kvstoremesh_peer_errors_total{peer=\"b\",stage=\"peer\"} 1",
            "kvstoremesh_peer_relists_total{peer=\"b\",reason=\"initial\"} 1",
            "kvstoremesh_peer_events_total{peer=\"b\"} 3",
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
        metrics.remove_peer(&b);
        assert!(!metrics.encode().contains("peer=\"b\""));
    }
}
