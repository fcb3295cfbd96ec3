//! Prometheus metrics of the agent.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// A peer and the health it changed to.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HealthLabels {
    /// The peer.
    pub peer: String,
    /// `healthy` or `stale`.
    pub health: String,
}

/// One table.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TableLabels {
    /// `services`, `backends`, `ipcache`, `policy`, `enforcement`, `routes`.
    pub table: String,
}

/// One peer.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerLabels {
    /// The peer.
    pub peer: String,
}

/// The agent's metrics and the registry that exposes them.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Changes of a peer's health, by peer and new health.
    pub health_changes: Family<HealthLabels, Counter>,
    /// Entries per table.
    pub table_entries: Family<TableLabels, Gauge>,
    /// Table changes computed.
    pub table_changes: Counter,
    /// Entries refused per peer.
    pub invalid_entries: Family<PeerLabels, Counter>,
    /// Peers known.
    pub peers: Gauge,
    /// Peers synced.
    pub peers_synced: Gauge,
    /// Peers whose backends are demoted.
    pub peers_stale: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("clustermesh_agent");
        let metrics = Metrics {
            health_changes: Family::default(),
            table_entries: Family::default(),
            table_changes: Counter::default(),
            invalid_entries: Family::default(),
            peers: Gauge::default(),
            peers_synced: Gauge::default(),
            peers_stale: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register(
            "peer_health_changes",
            "Changes of a peer's health (healthy: its backends are used; stale: lost for longer than the grace period)",
            metrics.health_changes.clone(),
        );
        registry.register(
            "table_entries",
            "Entries per desired-state table",
            metrics.table_entries.clone(),
        );
        registry.register(
            "table_changes",
            "Changes computed for the desired-state tables",
            metrics.table_changes.clone(),
        );
        registry.register(
            "invalid_entries",
            "Entries of a peer refused by validation",
            metrics.invalid_entries.clone(),
        );
        registry.register("peers", "Peers known", metrics.peers.clone());
        registry.register("peers_synced", "Peers synced", metrics.peers_synced.clone());
        registry.register(
            "peers_stale",
            "Peers whose backends are demoted",
            metrics.peers_stale.clone(),
        );
        Metrics {
            registry,
            ..metrics
        }
    }
}

impl Metrics {
    /// The metrics in Prometheus' text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// Sets a table's size.
    pub fn set_table(&self, table: &str, entries: usize) {
        self.table_entries
            .get_or_create(&TableLabels {
                table: table.to_owned(),
            })
            .set(i64::try_from(entries).unwrap_or(i64::MAX));
    }
}
