//! A local mesh's topology: the file `clustermesh dev up -f FILE` reads.
//!
//! ```yaml
//! name: two-clusters
//! underlay: 10.254.0.0/16      # node addresses (network namespaces only)
//! clusters:
//!   - name: a
//!     id: 1
//!     podCIDR: 10.1.0.0/16     # split into one /24 per node
//!     serviceCIDR: 10.96.1.0/24
//!     nodes: [a-node-1, a-node-2]
//! ```
//!
//! [`Topology::parse`] checks the whole mesh before anything is made: cluster names and ids
//! unique (and ids within `maxConnectedClusters`), node names unique, pod CIDRs and service
//! CIDRs IPv4 and pairwise disjoint (also with the underlay), a pod CIDR wide enough for one
//! /24 per node. Each error names the cluster and field.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr};

use model::{ClusterId, ClusterName, DnsSubdomain, IpPrefix, MaxConnectedClusters};
use serde::Deserialize;

/// Why a topology is refused.
#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    /// The YAML does not parse into a topology.
    #[error("topology: {0}")]
    Yaml(#[from] serde_yaml_ng::Error),
    /// A field is wrong; the message names it.
    #[error("topology {topology}: {detail}")]
    Invalid {
        /// The topology's name.
        topology: String,
        /// What is wrong, naming the cluster and field.
        detail: String,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawTopology {
    name: DnsSubdomain,
    #[serde(default = "default_underlay")]
    underlay: IpPrefix,
    #[serde(default)]
    max_connected_clusters: MaxConnectedClusters,
    clusters: Vec<RawCluster>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCluster {
    name: ClusterName,
    id: u16,
    #[serde(rename = "podCIDR")]
    pod_cidr: IpPrefix,
    #[serde(rename = "serviceCIDR")]
    service_cidr: IpPrefix,
    nodes: Vec<DnsSubdomain>,
}

fn default_underlay() -> IpPrefix {
    IpPrefix::new(IpAddr::V4(Ipv4Addr::new(10, 254, 0, 0)), 16).expect("a valid prefix")
}

/// A node of a local cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeSpec {
    /// The node's name (also its network namespace's suffix).
    pub name: DnsSubdomain,
    /// Its pod CIDR: the `index`-th /24 of the cluster's.
    pub pod_cidr: IpPrefix,
    /// Its address on the shared underlay.
    pub address: Ipv4Addr,
}

/// A local cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterSpec {
    /// The cluster's name.
    pub name: ClusterName,
    /// Its id.
    pub id: ClusterId,
    /// Its pod CIDR.
    pub pod_cidr: IpPrefix,
    /// Where its services' cluster IPs come from.
    pub service_cidr: IpPrefix,
    /// Its nodes.
    pub nodes: Vec<NodeSpec>,
}

/// A validated topology.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Topology {
    /// Its name.
    pub name: DnsSubdomain,
    /// The underlay every node sits on.
    pub underlay: IpPrefix,
    /// The mesh-wide cluster limit.
    pub max_connected_clusters: MaxConnectedClusters,
    /// The clusters, in file order.
    pub clusters: Vec<ClusterSpec>,
}

fn v4(prefix: &IpPrefix) -> Option<(u32, u8)> {
    match prefix.addr() {
        IpAddr::V4(a) => Some((u32::from(a), prefix.prefix_len())),
        IpAddr::V6(_) => None,
    }
}

fn overlaps(a: (u32, u8), b: (u32, u8)) -> bool {
    let len = a.1.min(b.1);
    let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
    a.0 & mask == b.0 & mask
}

impl Topology {
    /// Parses and validates a topology file's text.
    pub fn parse(text: &str) -> Result<Topology, TopologyError> {
        let raw: RawTopology = serde_yaml_ng::from_str(text)?;
        let invalid = |detail: String| TopologyError::Invalid {
            topology: raw.name.to_string(),
            detail,
        };
        if raw.clusters.is_empty() {
            return Err(invalid("clusters: at least one cluster".to_owned()));
        }
        let underlay = v4(&raw.underlay)
            .filter(|(_, len)| *len <= 24)
            .ok_or_else(|| {
                invalid(format!(
                    "underlay {}: an IPv4 prefix of /24 or wider",
                    raw.underlay
                ))
            })?;
        let max = raw.max_connected_clusters;
        let mut names = BTreeSet::new();
        let mut ids = BTreeSet::new();
        let mut node_names = BTreeSet::new();
        let mut ranges: Vec<(String, (u32, u8))> = vec![("underlay".to_owned(), underlay)];
        let mut clusters = Vec::new();
        for c in &raw.clusters {
            let at = |field: &str| format!("cluster {}: {field}", c.name);
            if !names.insert(c.name.clone()) {
                return Err(invalid(format!("{} appears twice", at("name"))));
            }
            let id =
                ClusterId::new(c.id, max).map_err(|e| invalid(format!("{}: {e}", at("id"))))?;
            if !ids.insert(c.id) {
                return Err(invalid(format!(
                    "{} {} is used by another cluster",
                    at("id"),
                    c.id
                )));
            }
            if c.nodes.is_empty() {
                return Err(invalid(format!("{}: at least one node", at("nodes"))));
            }
            let pod = v4(&c.pod_cidr)
                .ok_or_else(|| invalid(format!("{} {}: IPv4 only", at("podCIDR"), c.pod_cidr)))?;
            let service = v4(&c.service_cidr).ok_or_else(|| {
                invalid(format!(
                    "{} {}: IPv4 only",
                    at("serviceCIDR"),
                    c.service_cidr
                ))
            })?;
            if pod.1 > 24 || (1u64 << (24 - pod.1)) < c.nodes.len() as u64 {
                return Err(invalid(format!(
                    "{} {} holds fewer /24s than the {} nodes",
                    at("podCIDR"),
                    c.pod_cidr,
                    c.nodes.len()
                )));
            }
            for (field, range) in [("podCIDR", pod), ("serviceCIDR", service)] {
                if let Some((other, _)) = ranges.iter().find(|(_, r)| overlaps(*r, range)) {
                    return Err(invalid(format!("{} overlaps {other}", at(field))));
                }
                ranges.push((at(field), range));
            }
            let mut nodes = Vec::new();
            for (index, node) in c.nodes.iter().enumerate() {
                if !node_names.insert(node.clone()) {
                    return Err(invalid(format!("{} {node} appears twice", at("nodes"))));
                }
                let pod_cidr = IpPrefix::new(
                    IpAddr::V4(Ipv4Addr::from(pod.0 + ((index as u32) << 8))),
                    24,
                )
                .map_err(|e| invalid(format!("{}: {e}", at("podCIDR"))))?;
                let host = (u32::from(c.id) << 8) + index as u32 + 1;
                let room = 1u64 << (32 - underlay.1);
                if u64::from(host) + 1 >= room {
                    return Err(invalid(format!(
                        "underlay {}: too small for node {index} of cluster {} (id {})",
                        raw.underlay, c.name, c.id
                    )));
                }
                nodes.push(NodeSpec {
                    name: node.clone(),
                    pod_cidr,
                    address: Ipv4Addr::from(underlay.0 + host),
                });
            }
            clusters.push(ClusterSpec {
                name: c.name.clone(),
                id,
                pod_cidr: c.pod_cidr,
                service_cidr: c.service_cidr,
                nodes,
            });
        }
        Ok(Topology {
            name: raw.name,
            underlay: raw.underlay,
            max_connected_clusters: max,
            clusters,
        })
    }

    /// The cluster named `name`.
    pub fn cluster(&self, name: &str) -> Option<&ClusterSpec> {
        self.clusters.iter().find(|c| c.name.as_str() == name)
    }
}

impl ClusterSpec {
    /// The same cluster as a real `kind` config (one control-plane node, the rest workers),
    /// with its pod and service subnets, for users with Docker.
    pub fn kind_config(&self) -> String {
        let mut out = format!(
            "# The {} cluster of this topology as a kind cluster (generated from the topology;\n\
             # `cargo test -p mesh-devenv` checks it is current). Install Cilium with\n\
             # cluster.name={} cluster.id={} and the same subnets.\n\
             kind: Cluster\napiVersion: kind.x-k8s.io/v1alpha4\nname: {}\nnetworking:\n  \
             disableDefaultCNI: true\n  podSubnet: {}\n  serviceSubnet: {}\nnodes:\n",
            self.name,
            self.name,
            self.id.get(),
            self.name,
            self.pod_cidr,
            self.service_cidr
        );
        for (i, _) in self.nodes.iter().enumerate() {
            let role = if i == 0 { "control-plane" } else { "worker" };
            let _ = writeln!(out, "  - role: {role}");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TWO: &str = "
name: two
clusters:
  - name: a
    id: 1
    podCIDR: 10.1.0.0/16
    serviceCIDR: 10.96.1.0/24
    nodes: [a-1, a-2]
  - name: b
    id: 2
    podCIDR: 10.2.0.0/16
    serviceCIDR: 10.96.2.0/24
    nodes: [b-1]
";

    #[test]
    fn nodes_get_a_slice_of_the_pod_cidr_and_an_underlay_address() {
        let t = Topology::parse(TWO).unwrap();
        let a = t.cluster("a").unwrap();
        assert_eq!(a.nodes[1].pod_cidr.to_string(), "10.1.1.0/24");
        assert_eq!(a.nodes[1].address, Ipv4Addr::new(10, 254, 1, 2));
        assert_eq!(
            t.cluster("b").unwrap().nodes[0].address,
            Ipv4Addr::new(10, 254, 2, 1)
        );
    }

    fn refused(text: &str, needle: &str) {
        let err = Topology::parse(text).unwrap_err().to_string();
        assert!(err.contains(needle), "{needle:?} not in {err:?}");
    }

    #[test]
    fn each_mistake_is_named() {
        refused(
            &TWO.replace("id: 2", "id: 1"),
            "cluster b: id 1 is used by another cluster",
        );
        refused(
            &TWO.replace("name: b", "name: a"),
            "cluster a: name appears twice",
        );
        refused(
            &TWO.replace("10.2.0.0/16", "10.1.128.0/17"),
            "cluster b: podCIDR overlaps cluster a: podCIDR",
        );
        refused(
            &TWO.replace("10.96.2.0/24", "10.1.0.0/24"),
            "cluster b: serviceCIDR overlaps cluster a: podCIDR",
        );
        refused(
            &TWO.replace("10.2.0.0/16", "10.254.9.0/24"),
            "overlaps underlay",
        );
        refused(
            &TWO.replace("10.1.0.0/16", "10.1.0.0/24"),
            "fewer /24s than the 2 nodes",
        );
        refused(&TWO.replace("id: 2", "id: 300"), "cluster b: id");
        refused(&TWO.replace("[b-1]", "[a-1]"), "a-1 appears twice");
        refused(&TWO.replace("[b-1]", "[]"), "at least one node");
        refused(&TWO.replace("10.2.0.0/16", "fd00::/64"), "IPv4 only");
        refused(&format!("{TWO}extra: 1\n"), "unknown field");
        refused("name: x\nclusters: []\n", "at least one cluster");
    }

    #[test]
    fn the_underlay_must_hold_every_node() {
        let text = format!(
            "maxConnectedClusters: 511\n{}",
            TWO.replace("id: 2", "id: 300")
        );
        refused(
            &text,
            "underlay 10.254.0.0/16: too small for node 0 of cluster b (id 300)",
        );
    }

    #[test]
    fn max_connected_clusters_allows_ids_up_to_511() {
        let text = TWO.replace("id: 2", "id: 300");
        let with = format!("maxConnectedClusters: 511\nunderlay: 100.64.0.0/10\n{text}");
        assert_eq!(Topology::parse(&with).unwrap().clusters[1].id.get(), 300);
    }

    #[test]
    fn the_committed_topologies_parse_and_their_kind_configs_are_current() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../kind-configs");
        let mut seen = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_none_or(|e| e != "yaml") {
                continue;
            }
            seen += 1;
            let text = std::fs::read_to_string(&path).unwrap();
            let t = Topology::parse(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            for c in &t.clusters {
                let kind = format!("{dir}/kind/{}-{}.yaml", t.name, c.name);
                let committed = std::fs::read_to_string(&kind).unwrap_or_else(|e| {
                    panic!("{kind}: {e} (write it from ClusterSpec::kind_config)")
                });
                assert_eq!(committed, c.kind_config(), "{kind} is stale");
            }
        }
        assert!(
            seen >= 2,
            "kind-configs/ holds the two- and three-cluster topologies"
        );
    }
}
