//! Nodes: what peers need to route to this cluster's pods.

use std::collections::BTreeSet;
use std::net::IpAddr;

use cluster_source::{ClusterObjects, ObjectKind};
use k8s_openapi::api::core::v1::Node as KubeNode;
use model::{AddressKind, DnsSubdomain, IpPrefix, Node, NodeAddress};

use super::{Facts, TranslateConfig, Warning, object_name};

pub(super) fn translate(objects: &ClusterObjects, config: &TranslateConfig, facts: &mut Facts) {
    for (name, node) in &objects.nodes {
        let object = object_name(ObjectKind::Node, None, name);
        let mut warn = |message: String| facts.node_warnings.push(Warning::new(&object, message));
        if let Some(value) = node_value(name, node, config, &mut warn) {
            facts.nodes.push(value);
        }
    }
}

fn node_value(
    name: &str,
    node: &KubeNode,
    config: &TranslateConfig,
    warn: &mut impl FnMut(String),
) -> Option<Node> {
    let name = match DnsSubdomain::new(name) {
        Ok(name) => name,
        Err(error) => {
            warn(format!("not published: {error}"));
            return None;
        }
    };
    let cluster = &config.cluster;
    Some(Node {
        schema: Default::default(),
        name,
        cluster: cluster.name.clone(),
        cluster_id: cluster.id,
        addresses: addresses(node, warn),
        pod_cidrs: pod_cidrs(node, warn),
        labels: node.metadata.labels.clone().unwrap_or_default(),
    })
}

/// InternalIP addresses first, then ExternalIP ones, each in status order, so the first
/// address is the one to tunnel to; an address listed twice is kept once (first kind wins).
fn addresses(node: &KubeNode, warn: &mut impl FnMut(String)) -> Vec<NodeAddress> {
    let listed = node
        .status
        .as_ref()
        .and_then(|s| s.addresses.as_deref())
        .unwrap_or_default();
    let mut seen = BTreeSet::new();
    let mut addresses = Vec::new();
    for (kind, type_) in [
        (AddressKind::InternalIp, "InternalIP"),
        (AddressKind::ExternalIp, "ExternalIP"),
    ] {
        for address in listed.iter().filter(|a| a.type_ == type_) {
            match address.address.parse::<IpAddr>() {
                Ok(ip) if seen.insert(ip) => addresses.push(NodeAddress { kind, ip }),
                Ok(_) => {}
                Err(_) => warn(format!(
                    "{type_} address {:?} is not an IP address; left out",
                    address.address
                )),
            }
        }
    }
    addresses
}

/// `spec.podCIDRs`, or the older single `spec.podCIDR` when the list is empty.
fn pod_cidrs(node: &KubeNode, warn: &mut impl FnMut(String)) -> Vec<IpPrefix> {
    let Some(spec) = node.spec.as_ref() else {
        return Vec::new();
    };
    let listed: Vec<&String> = match spec.pod_cidrs.as_deref() {
        Some(list) if !list.is_empty() => list.iter().collect(),
        _ => spec.pod_cidr.iter().collect(),
    };
    let mut cidrs = Vec::new();
    for text in listed {
        match text.parse::<IpPrefix>() {
            Ok(cidr) if !cidrs.contains(&cidr) => cidrs.push(cidr),
            Ok(_) => {}
            Err(error) => warn(format!("pod CIDR left out: {error}")),
        }
    }
    cidrs
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::super::testutil::{config, objects, translate_all};

    #[test]
    fn nodes() {
        let objs = objects(vec![
            json!({"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": "node-a", "labels": {"topology.kubernetes.io/zone": "eu-1a"}},
            "spec": {"podCIDRs": ["10.2.1.0/24", "fd00:2:1::/64", "10.2.1.0/24"]},
            "status": {"addresses": [
                {"type": "Hostname", "address": "node-a"},
                {"type": "ExternalIP", "address": "203.0.113.10"},
                {"type": "InternalIP", "address": "192.0.2.10"},
                {"type": "ExternalIP", "address": "192.0.2.10"},
                {"type": "InternalIP", "address": "fd00::10"},
            ]}}),
            json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-b"},
                "spec": {"podCIDR": "10.2.2.0/24"},
                "status": {"addresses": [{"type": "InternalIP", "address": "not-an-ip"}]}}),
            json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-c"},
                "spec": {"podCIDRs": ["10.2.3.1/24"], "podCIDR": "10.9.9.0/24"}}),
            json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "Bad_Name"}}),
        ]);
        let facts = translate_all(&objs, &config());
        let nodes = &facts.nodes;
        assert_eq!(nodes.len(), 3);
        let a = &nodes[0];
        let json = serde_json::to_value(a).unwrap();
        assert_eq!(
            json,
            json!({"schema": 1, "name": "node-a", "cluster": "eu-1", "cluster_id": 2,
                "addresses": [
                    {"kind": "InternalIP", "ip": "192.0.2.10"},
                    {"kind": "InternalIP", "ip": "fd00::10"},
                    {"kind": "ExternalIP", "ip": "203.0.113.10"},
                ],
                "pod_cidrs": ["10.2.1.0/24", "fd00:2:1::/64"],
                "labels": {"topology.kubernetes.io/zone": "eu-1a"}})
        );
        assert_eq!(a.key().to_string(), "cilium/state/nodes/v1/eu-1/node-a");
        assert_eq!(nodes[1].pod_cidrs[0].to_string(), "10.2.2.0/24");
        assert!(nodes[1].addresses.is_empty());
        assert!(
            nodes[2].pod_cidrs.is_empty(),
            "host bits refused, podCIDR not used"
        );
        let warnings: Vec<String> = facts.warnings().map(ToString::to_string).collect();
        assert_eq!(warnings.len(), 3, "{warnings:#?}");
        assert!(
            warnings[0].starts_with("Node Bad_Name: not published: invalid name"),
            "{warnings:#?}"
        );
        assert!(
            warnings[1].starts_with("Node node-b: InternalIP address \"not-an-ip\""),
            "{warnings:#?}"
        );
        assert!(
            warnings[2].starts_with("Node node-c: pod CIDR left out"),
            "{warnings:#?}"
        );
    }
}
