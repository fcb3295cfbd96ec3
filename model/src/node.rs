//! Nodes as published to peers: enough to route to their pods.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::cluster::ClusterId;
use crate::keys::StateKey;
use crate::name::{ClusterName, DnsSubdomain};
use crate::net::IpPrefix;
use crate::value::{SchemaVersion, StoreValue, ValueError};

/// Which network an address is reachable on, as Kubernetes names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum AddressKind {
    /// Reachable inside the cluster's network.
    #[serde(rename = "InternalIP")]
    InternalIp,
    /// Reachable from outside the cluster's network.
    #[serde(rename = "ExternalIP")]
    ExternalIp,
}

/// One address of a node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct NodeAddress {
    /// Which network it is on.
    pub kind: AddressKind,
    /// The address.
    pub ip: IpAddr,
}

/// `cilium/state/nodes/v1/<cluster>/<name>`.
///
/// Lists keep the publisher's order (the first internal address is the one to tunnel to), so
/// the publisher must produce them in a stable order for encodings to compare equal.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Node {
    /// Schema version (1).
    pub schema: SchemaVersion<1>,
    /// The node's name; the last key segment.
    pub name: DnsSubdomain,
    /// The cluster the node belongs to; must match the key and the publisher.
    pub cluster: ClusterName,
    /// That cluster's id.
    pub cluster_id: ClusterId,
    /// The node's addresses, no address twice.
    pub addresses: Vec<NodeAddress>,
    /// The pod CIDRs allocated to the node, none twice.
    pub pod_cidrs: Vec<IpPrefix>,
    /// The node's Kubernetes labels (e.g. its topology zone).
    pub labels: BTreeMap<String, String>,
}

impl Node {
    /// The node's state key.
    pub fn key(&self) -> StateKey {
        StateKey::Node {
            cluster: self.cluster.clone(),
            name: self.name.clone(),
        }
    }
}

impl StoreValue for Node {
    const SCHEMA: u32 = 1;
    const WHAT: &'static str = "node";

    fn validate(&self) -> Result<(), ValueError> {
        let mut ips = BTreeSet::new();
        if let Some(a) = self.addresses.iter().find(|a| !ips.insert(a.ip)) {
            return Err(ValueError::DuplicateAddress { ip: a.ip });
        }
        let mut cidrs = BTreeSet::new();
        if let Some(c) = self.pod_cidrs.iter().find(|c| !cidrs.insert(**c)) {
            return Err(ValueError::DuplicatePodCidr { cidr: *c });
        }
        Ok(())
    }
}
