//! Prometheus metrics of the agent.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
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

/// One eBPF map.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MapLabels {
    /// The pinned map's name (`mesh_svc4`, …) or `routes`.
    pub map: String,
}

/// Why packets were forwarded or dropped, and which way they went.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    /// `forward-policy`, `drop-policy-denied`, …
    pub reason: String,
    /// `ingress` or `egress`, seen from the pod.
    pub direction: String,
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
    /// Entries programmed per datapath map.
    pub datapath_map_entries: Family<MapLabels, Gauge>,
    /// Capacity per datapath map.
    pub datapath_map_capacity: Family<MapLabels, Gauge>,
    /// Entries not written because their map was full.
    pub datapath_map_full: Family<MapLabels, Counter>,
    /// Packets seen by the policy program, by reason and direction.
    pub datapath_packets: Family<ReasonLabels, Counter>,
    /// Bytes seen by the policy program, by reason and direction.
    pub datapath_bytes: Family<ReasonLabels, Counter>,
    /// How long one reconcile of the datapath took.
    pub datapath_reconcile_seconds: Histogram,
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
            datapath_map_entries: Family::default(),
            datapath_map_capacity: Family::default(),
            datapath_map_full: Family::default(),
            datapath_packets: Family::default(),
            datapath_bytes: Family::default(),
            datapath_reconcile_seconds: Histogram::new(exponential_buckets(0.0001, 4.0, 10)),
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
        registry.register(
            "datapath_map_entries",
            "Entries programmed per datapath map",
            metrics.datapath_map_entries.clone(),
        );
        registry.register(
            "datapath_map_capacity",
            "Capacity per datapath map (its size flag)",
            metrics.datapath_map_capacity.clone(),
        );
        registry.register(
            "datapath_map_full",
            "Entries not written because their datapath map was full",
            metrics.datapath_map_full.clone(),
        );
        registry.register(
            "datapath_packets",
            "Packets seen by the policy program, by reason (forward-*, drop-*) and direction",
            metrics.datapath_packets.clone(),
        );
        registry.register(
            "datapath_bytes",
            "Bytes seen by the policy program, by reason and direction",
            metrics.datapath_bytes.clone(),
        );
        registry.register(
            "datapath_reconcile_seconds",
            "Duration of one datapath reconcile (maps and routes)",
            metrics.datapath_reconcile_seconds.clone(),
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
