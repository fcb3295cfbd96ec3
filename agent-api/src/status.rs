//! The agent's status (`GET /v1/peers`) and its policy view (`GET /v1/policy`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::tables::{EnforcementEntry, PolicyEntry, TableCounts};

pub use model::Phase;

/// Whether a cluster's backends can be trusted to receive traffic.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClusterHealth {
    /// Connected with a live heartbeat, or lost for less than the grace period.
    #[default]
    Healthy,
    /// Lost (connection or heartbeat) for longer than the grace period.
    Stale,
}

/// Why a peer is lost.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LostReason {
    /// Its store (or, through kvstoremesh, its connection) is down.
    Disconnected,
    /// Its heartbeat stopped changing.
    HeartbeatTimeout,
}

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

#[cfg(test)]
mod tests {
    use super::*;

    /// The spelling the CLI and scripts read; a rename here breaks them.
    #[test]
    fn json_spelling() {
        let peer = PeerView {
            name: "b".into(),
            cluster_id: Some(2),
            configured: true,
            phase: Phase::Synced,
            connected: false,
            health: ClusterHealth::Stale,
            lost: Some(LostReason::HeartbeatTimeout),
            restored: false,
            entries: BTreeMap::from([("nodes".to_owned(), 3)]),
            health_changes: 1,
            invalid_entries: 0,
            last_error: None,
        };
        assert_eq!(
            serde_json::to_string(&peer).unwrap(),
            "{\"name\":\"b\",\"cluster_id\":2,\"configured\":true,\"phase\":\"synced\",\
             \"connected\":false,\"health\":\"stale\",\"lost\":\"heartbeat_timeout\",\
             \"restored\":false,\"entries\":{\"nodes\":3},\"health_changes\":1,\
             \"invalid_entries\":0}"
        );
        let status = AgentStatus {
            cluster: "a".into(),
            peers: BTreeMap::from([("b".to_owned(), peer)]),
            ..AgentStatus::default()
        };
        let text = serde_json::to_string(&status).unwrap();
        assert_eq!(serde_json::from_str::<AgentStatus>(&text).unwrap(), status);
    }
}
