//! The eBPF datapath as the API shows it (`GET /v1/datapath`, `GET /v1/drops`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A map's fill.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MapUsage {
    /// The pinned map's name.
    pub map: String,
    /// Entries programmed.
    pub entries: u64,
    /// Capacity.
    pub capacity: u64,
}

/// Packets and bytes of one reason and direction.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CounterView {
    /// Why forwarded or dropped.
    pub reason: String,
    /// `ingress` or `egress` (seen from the pod).
    pub direction: String,
    /// Packets.
    pub packets: u64,
    /// Bytes.
    pub bytes: u64,
}

/// The datapath as the API shows it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatapathStatus {
    /// `bpf` or `none`.
    pub mode: String,
    /// Why the datapath is off, when it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub off_reason: Option<String>,
    /// Where maps and links are pinned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pin_dir: Option<String>,
    /// The cgroup the socket programs are attached to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<String>,
    /// Whether the tables have been programmed at least once.
    pub programmed: bool,
    /// Reconciles done.
    pub reconciles: u64,
    /// Map fills.
    pub maps: Vec<MapUsage>,
    /// Forwarded and dropped packets by reason.
    pub counters: Vec<CounterView>,
    /// Entries the IPv4 datapath cannot hold, by table.
    pub skipped: BTreeMap<String, u64>,
    /// Recent errors (full maps, failed attaches or routes), newest last.
    pub errors: Vec<String>,
}

/// A dropped packet, as the API shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DropView {
    /// When (Unix milliseconds).
    pub time_ms: u64,
    /// `ingress` or `egress`, seen from the pod.
    pub direction: String,
    /// Why.
    pub reason: String,
    /// Source address and port.
    pub src: String,
    /// Destination address and port.
    pub dst: String,
    /// `TCP`, `UDP`, `ICMP` or the protocol number.
    pub protocol: String,
    /// The source's identity.
    pub src_identity: u32,
    /// The destination's identity.
    pub dst_identity: u32,
    /// The source's cluster id (0: unknown, world).
    pub src_cluster: u16,
    /// The destination's cluster id.
    pub dst_cluster: u16,
    /// The pod the interface belongs to (`namespace/name`), when registered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
}
