//! Proptest strategies for the model's types, shared by the crate's tests.

use std::collections::BTreeMap;
use std::net::IpAddr;

use proptest::collection::{btree_map, vec};
use proptest::prelude::*;

use crate::label::CLUSTER_LABEL_KEY;
use crate::*;

pub fn cluster_name() -> impl Strategy<Value = ClusterName> {
    "[a-z0-9]([-a-z0-9]{0,30}[a-z0-9])?".prop_map(|s| ClusterName::new(s).unwrap())
}

pub fn max() -> impl Strategy<Value = MaxConnectedClusters> {
    prop_oneof![
        Just(MaxConnectedClusters::Max255),
        Just(MaxConnectedClusters::Max511)
    ]
}

pub fn capabilities() -> impl Strategy<Value = Capabilities> {
    (any::<bool>(), any::<bool>(), any::<bool>()).prop_map(|(s, c, e)| Capabilities {
        sync_canaries: s,
        cached: c,
        service_exports: e,
    })
}

pub fn cluster_config() -> impl Strategy<Value = ClusterConfig> {
    (cluster_name(), max(), capabilities()).prop_flat_map(|(name, max, caps)| {
        (1..=max.value()).prop_map(move |id| {
            ClusterConfig::new(name.clone(), ClusterId::new(id, max).unwrap(), max, caps).unwrap()
        })
    })
}

pub fn dns_label() -> impl Strategy<Value = DnsLabel> {
    "[a-z0-9]([-a-z0-9]{0,10}[a-z0-9])?".prop_map(|s| DnsLabel::new(s).unwrap())
}

pub fn dns_subdomain() -> impl Strategy<Value = DnsSubdomain> {
    vec("[a-z0-9]([-a-z0-9]{0,6}[a-z0-9])?", 1..4)
        .prop_map(|parts| DnsSubdomain::new(parts.join(".")).unwrap())
}

pub fn ip() -> impl Strategy<Value = IpAddr> {
    prop_oneof![
        any::<u32>().prop_map(|a| IpAddr::V4(a.into())),
        any::<u128>().prop_map(|a| IpAddr::V6(a.into())),
    ]
}

pub fn prefix() -> impl Strategy<Value = IpPrefix> {
    prop_oneof![
        (any::<u32>(), 0u8..=32).prop_map(|(a, l)| (IpAddr::V4(a.into()), l)),
        (any::<u128>(), 0u8..=128).prop_map(|(a, l)| (IpAddr::V6(a.into()), l)),
    ]
    .prop_map(|(addr, len)| IpPrefix::new(IpPrefix::truncate(addr, len), len).unwrap())
}

pub fn strings() -> impl Strategy<Value = BTreeMap<String, String>> {
    btree_map("[a-z./-]{1,12}", "[a-zA-Z0-9 \"\\\\é]{0,8}", 0..3)
}

pub fn label() -> impl Strategy<Value = Label> {
    ("[a-z0-9]{1,6}", "[a-z.]{1,12}", "[-a-z0-9=:/]{0,8}")
        .prop_map(|(s, k, v)| Label::new(s, k, v).unwrap())
}

pub fn ports() -> impl Strategy<Value = PortMap> {
    let protocol = prop_oneof![
        Just(Protocol::Tcp),
        Just(Protocol::Udp),
        Just(Protocol::Sctp)
    ];
    btree_map(
        "[a-z]{0,5}",
        (protocol, 1..=u16::MAX).prop_map(|(protocol, port)| L4Port { protocol, port }),
        0..3,
    )
}

pub fn backend() -> impl Strategy<Value = Backend> {
    (
        ports(),
        any::<(bool, bool, bool)>(),
        proptest::option::of("[a-z0-9-]{1,8}"),
        proptest::option::of(dns_subdomain()),
        proptest::option::of(dns_label()),
    )
        .prop_map(
            |(ports, (ready, serving, terminating), zone, node_name, hostname)| Backend {
                ports,
                ready,
                serving,
                terminating,
                zone,
                node_name,
                hostname,
            },
        )
}

pub fn node_for(peer: &ClusterConfig) -> impl Strategy<Value = Node> + use<> {
    let (cluster, cluster_id) = (peer.name.clone(), peer.id);
    let kind = prop_oneof![Just(AddressKind::InternalIp), Just(AddressKind::ExternalIp)];
    (
        dns_subdomain(),
        btree_map(ip(), kind, 0..3),
        proptest::collection::btree_set(prefix(), 0..3),
        strings(),
    )
        .prop_map(move |(name, addresses, pod_cidrs, labels)| Node {
            schema: SchemaVersion,
            name,
            cluster: cluster.clone(),
            cluster_id,
            addresses: addresses
                .into_iter()
                .map(|(ip, kind)| NodeAddress { kind, ip })
                .collect(),
            pod_cidrs: pod_cidrs.into_iter().collect(),
            labels,
        })
}

pub fn service_for(peer: &ClusterConfig) -> impl Strategy<Value = ClusterService> + use<> {
    let (cluster, cluster_id) = (peer.name.clone(), peer.id);
    (
        (dns_label(), dns_label()),
        btree_map(ip(), ports(), 0..3),
        btree_map(ip(), backend(), 0..3),
        any::<(bool, bool)>(),
        strings(),
        strings(),
    )
        .prop_map(
            move |(
                (namespace, name),
                frontends,
                backends,
                (shared, include_external),
                labels,
                selector,
            )| {
                ClusterService {
                    schema: SchemaVersion,
                    cluster: cluster.clone(),
                    cluster_id,
                    namespace,
                    name,
                    frontends,
                    backends,
                    shared,
                    include_external,
                    labels,
                    selector,
                }
            },
        )
}

pub fn export_for(peer: &ClusterConfig) -> impl Strategy<Value = ServiceExport> + use<> {
    let (cluster, cluster_id) = (peer.name.clone(), peer.id);
    let export_type = prop_oneof![Just(ExportType::ClusterSetIp), Just(ExportType::Headless)];
    (
        dns_label(),
        dns_label(),
        export_type,
        ports(),
        strings(),
        strings(),
    )
        .prop_map(
            move |(namespace, name, export_type, ports, labels, annotations)| ServiceExport {
                schema: SchemaVersion,
                cluster: cluster.clone(),
                cluster_id,
                namespace,
                name,
                export_type,
                ports,
                labels,
                annotations,
            },
        )
}

/// An identity in `peer`'s range, whatever `offset` is.
pub fn identity_in(peer: &ClusterConfig, offset: u32) -> NumericIdentity {
    let range = peer.identity_range().unwrap();
    NumericIdentity::new(range.first().get() + offset % range.len()).unwrap()
}

pub fn identity_for(peer: &ClusterConfig) -> impl Strategy<Value = Identity> + use<> {
    let peer = peer.clone();
    (any::<u32>(), vec(label(), 0..4)).prop_map(move |(offset, labels)| {
        let labels = labels
            .into_iter()
            .filter(|l| l.key() != CLUSTER_LABEL_KEY)
            .chain([Label::cluster(&peer.name)]);
        Identity::new(identity_in(&peer, offset), labels)
    })
}

pub fn ip_identity_for(peer: &ClusterConfig) -> impl Strategy<Value = IpIdentity> + use<> {
    let peer = peer.clone();
    (
        prefix(),
        any::<u32>(),
        proptest::option::of(ip()),
        proptest::option::of((dns_label(), proptest::option::of(dns_subdomain()))),
    )
        .prop_map(move |(ip, offset, host_ip, pod)| {
            let (namespace, pod_name) = match pod {
                Some((ns, pod)) => (Some(ns), pod),
                None => (None, None),
            };
            IpIdentity {
                schema: SchemaVersion,
                ip,
                identity: identity_in(&peer, offset),
                host_ip,
                namespace,
                pod_name,
                cluster: peer.name.clone(),
            }
        })
}

pub fn entry_for(peer: &ClusterConfig) -> impl Strategy<Value = Entry> + use<> {
    prop_oneof![
        node_for(peer).prop_map(Entry::Node),
        service_for(peer).prop_map(Entry::Service),
        identity_for(peer).prop_map(Entry::Identity),
        ip_identity_for(peer).prop_map(Entry::Ip),
        export_for(peer).prop_map(Entry::ServiceExport),
    ]
}

/// A peer and one entry it may publish.
pub fn peer_and_entry() -> impl Strategy<Value = (ClusterConfig, Entry)> {
    cluster_config().prop_flat_map(|peer| (Just(peer.clone()), entry_for(&peer)))
}
