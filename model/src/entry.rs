//! Checking what a peer's store holds before anything of it is applied.
//!
//! kvstoremesh (reading a peer's store) and agents (reading the local cache of it) pass every
//! key and value through [`validate_entry`] (or [`validate_key`] for deletions): a peer may
//! only publish entries about itself, with its own name, id and identities. Key checks run
//! before the value is decoded, so a hostile key costs no parsing.

use crate::cluster::{ClusterId, MaxConnectedClusters};
use crate::config::ClusterConfig;
use crate::identity::{Identity, IdentityRange, NumericIdentity};
use crate::ipcache::IpIdentity;
use crate::keys::{self, CACHE_ROOT, KeyError, Kind, StateKey};
use crate::name::ClusterName;
use crate::node::Node;
use crate::service::{ClusterService, ServiceExport};
use crate::value::{DecodeError, StoreValue};

/// A decoded, validated entry of one kind.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Entry {
    /// A node.
    Node(Node),
    /// A service.
    Service(ClusterService),
    /// A security identity.
    Identity(Identity),
    /// An ip→identity mapping.
    Ip(IpIdentity),
    /// A service export.
    ServiceExport(ServiceExport),
}

impl Entry {
    /// The entry's kind.
    pub fn kind(&self) -> Kind {
        match self {
            Entry::Node(_) => Kind::Nodes,
            Entry::Service(_) => Kind::Services,
            Entry::Identity(_) => Kind::Identities,
            Entry::Ip(_) => Kind::Ip,
            Entry::ServiceExport(_) => Kind::ServiceExports,
        }
    }

    /// The entry's key in its publisher's store.
    pub fn key(&self) -> StateKey {
        match self {
            Entry::Node(v) => v.key(),
            Entry::Service(v) => v.key(),
            Entry::Identity(v) => v.key(),
            Entry::Ip(v) => v.key(),
            Entry::ServiceExport(v) => v.key(),
        }
    }

    /// The entry's canonical encoding.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Entry::Node(v) => v.encode(),
            Entry::Service(v) => v.encode(),
            Entry::Identity(v) => v.encode(),
            Entry::Ip(v) => v.encode(),
            Entry::ServiceExport(v) => v.encode(),
        }
    }

    /// Decodes and validates `bytes` as a value of `kind`, without checking it against a key
    /// or a peer.
    pub fn decode(kind: Kind, bytes: &[u8]) -> Result<Self, DecodeError> {
        Ok(match kind {
            Kind::Nodes => Entry::Node(Node::decode(bytes)?),
            Kind::Services => Entry::Service(ClusterService::decode(bytes)?),
            Kind::Identities => Entry::Identity(Identity::decode(bytes)?),
            Kind::Ip => Entry::Ip(IpIdentity::decode(bytes)?),
            Kind::ServiceExports => Entry::ServiceExport(ServiceExport::decode(bytes)?),
        })
    }
}

/// Why a peer's key or value was refused; every variant names the key.
#[derive(Debug, thiserror::Error)]
pub enum EntryError {
    /// The key does not follow the layout.
    #[error("{error}")]
    Key {
        /// The refused key.
        key: String,
        /// What is wrong with it (its message names the key).
        error: KeyError,
    },
    /// A key of another kind than the prefix being read.
    #[error("key {key:?} holds {found}, but {expected} were being read")]
    WrongKind {
        /// The refused key.
        key: String,
        /// The kind being read.
        expected: Kind,
        /// The kind the key holds.
        found: Kind,
    },
    /// The key (or the cache key's peer segment) names a cluster other than the peer.
    #[error("key {key:?} names cluster {cluster}, but it was read from peer {peer}")]
    ForeignKey {
        /// The refused key.
        key: String,
        /// The cluster the key names.
        cluster: ClusterName,
        /// The peer it was read from.
        peer: ClusterName,
    },
    /// The value does not decode: bad JSON, truncated, unknown schema, broken invariant.
    #[error("key {key:?}: {error}")]
    Decode {
        /// The refused key.
        key: String,
        /// Why the value does not decode.
        error: DecodeError,
    },
    /// The value names another entry than its key: a write under a borrowed key.
    #[error("key {key:?} names {field} {in_key:?}, but its value names {in_value:?}")]
    KeyMismatch {
        /// The refused key.
        key: String,
        /// Which field disagrees.
        field: &'static str,
        /// The field as the key has it.
        in_key: String,
        /// The field as the value has it.
        in_value: String,
    },
    /// The value claims to belong to a cluster other than the peer.
    #[error("key {key:?}: value's {field} names cluster {found}, but it was read from peer {peer}")]
    ForeignCluster {
        /// The refused key.
        key: String,
        /// Which field names the cluster.
        field: &'static str,
        /// The cluster the value names.
        found: ClusterName,
        /// The peer it was read from.
        peer: ClusterName,
    },
    /// The value carries another cluster id than the peer's configuration.
    #[error("key {key:?}: value has cluster id {found}, but peer {peer} has id {expected}")]
    ForeignClusterId {
        /// The refused key.
        key: String,
        /// The id the value carries.
        found: ClusterId,
        /// The peer it was read from.
        peer: ClusterName,
        /// The peer's configured id.
        expected: ClusterId,
    },
    /// An identity the peer may not allocate: it would impersonate another cluster's (or a
    /// reserved) identity.
    #[error("key {key:?}: identity {identity} is outside peer {peer}'s identity range {range}")]
    IdentityOutOfRange {
        /// The refused key.
        key: String,
        /// The identity.
        identity: NumericIdentity,
        /// The peer it was read from.
        peer: ClusterName,
        /// The identities the peer may allocate.
        range: IdentityRange,
    },
    /// The peer's configured id exceeds its max-connected-clusters, so it has no identity
    /// range and none of its entries can be checked.
    #[error(
        "key {key:?}: peer {peer}'s configuration is invalid: cluster id {id} exceeds \
         max-connected-clusters {max}"
    )]
    PeerConfig {
        /// The key being checked.
        key: String,
        /// The peer.
        peer: ClusterName,
        /// The peer's id.
        id: ClusterId,
        /// The peer's limit.
        max: MaxConnectedClusters,
    },
}

impl EntryError {
    /// The refused key.
    pub fn key(&self) -> &str {
        match self {
            EntryError::Key { key, .. }
            | EntryError::WrongKind { key, .. }
            | EntryError::ForeignKey { key, .. }
            | EntryError::Decode { key, .. }
            | EntryError::KeyMismatch { key, .. }
            | EntryError::ForeignCluster { key, .. }
            | EntryError::ForeignClusterId { key, .. }
            | EntryError::IdentityOutOfRange { key, .. }
            | EntryError::PeerConfig { key, .. } => key,
        }
    }
}

/// Checks a key read from `peer`'s store (`cilium/state/...`) or from the local cache of it
/// (`cilium/cache/...`): it must be of `kind` and name no other cluster. For deletions, which
/// carry no value.
pub fn validate_key(kind: Kind, key: &str, peer: &ClusterConfig) -> Result<StateKey, EntryError> {
    let key_error = |error| EntryError::Key {
        key: key.into(),
        error,
    };
    let foreign = |cluster: &ClusterName| EntryError::ForeignKey {
        key: key.into(),
        cluster: cluster.clone(),
        peer: peer.name.clone(),
    };
    let state = if key.starts_with(CACHE_ROOT) {
        let cached = keys::parse_cache_key(key).map_err(key_error)?;
        if *cached.peer() != peer.name {
            return Err(foreign(cached.peer()));
        }
        cached.into_entry()
    } else {
        keys::parse_state_key(key).map_err(key_error)?
    };
    if state.kind() != kind {
        return Err(EntryError::WrongKind {
            key: key.into(),
            expected: kind,
            found: state.kind(),
        });
    }
    match state.cluster() {
        Some(cluster) if *cluster != peer.name => Err(foreign(cluster)),
        _ => Ok(state),
    }
}

/// Checks a key and value read from `peer`'s store (or the local cache of it) and decodes the
/// value. Refuses anything the peer may not publish: a key of another kind or cluster, bytes
/// that do not decode, a value that disagrees with its key, another cluster's name or id, an
/// identity outside the peer's range.
pub fn validate_entry(
    kind: Kind,
    key: &str,
    value: &[u8],
    peer: &ClusterConfig,
) -> Result<Entry, EntryError> {
    let state = validate_key(kind, key, peer)?;
    let range = peer.identity_range().map_err(|_| EntryError::PeerConfig {
        key: key.into(),
        peer: peer.name.clone(),
        id: peer.id,
        max: peer.max_connected_clusters,
    })?;
    let entry = Entry::decode(kind, value).map_err(|error| EntryError::Decode {
        key: key.into(),
        error,
    })?;
    let check = Checker { key, peer, range };
    match &entry {
        Entry::Node(v) => {
            check.cluster("cluster", &v.cluster)?;
            check.cluster_id(v.cluster_id)?;
        }
        Entry::Service(v) => {
            check.cluster("cluster", &v.cluster)?;
            check.cluster_id(v.cluster_id)?;
        }
        Entry::ServiceExport(v) => {
            check.cluster("cluster", &v.cluster)?;
            check.cluster_id(v.cluster_id)?;
        }
        Entry::Identity(v) => {
            // Decoding validated the labels, so the cluster label is there and well-formed.
            let labeled = v.cluster().map_err(|e| EntryError::Decode {
                key: key.into(),
                error: DecodeError::Invalid {
                    what: Identity::WHAT,
                    source: e,
                },
            })?;
            check.cluster("cluster label", &labeled)?;
            check.identity(v.id)?;
        }
        Entry::Ip(v) => {
            check.cluster("cluster", &v.cluster)?;
            check.identity(v.identity)?;
        }
    }
    // Clusters agree by now (key and value both name the peer), so this finds a value filed
    // under another entry's key.
    check.key_matches(&state, &entry.key())?;
    Ok(entry)
}

/// Reads `peer`'s `cilium/cluster-config/<peer>`: the key and the value must both name it.
pub fn validate_cluster_config(
    key: &str,
    value: &[u8],
    peer: &ClusterName,
) -> Result<ClusterConfig, EntryError> {
    let named = keys::parse_cluster_config_key(key).map_err(|error| EntryError::Key {
        key: key.into(),
        error,
    })?;
    if named != *peer {
        return Err(EntryError::ForeignKey {
            key: key.into(),
            cluster: named,
            peer: peer.clone(),
        });
    }
    let config = ClusterConfig::decode(value).map_err(|error| EntryError::Decode {
        key: key.into(),
        error,
    })?;
    if config.name != *peer {
        return Err(EntryError::ForeignCluster {
            key: key.into(),
            field: "name",
            found: config.name,
            peer: peer.clone(),
        });
    }
    Ok(config)
}

/// The checks of one entry against its key and peer.
struct Checker<'a> {
    key: &'a str,
    peer: &'a ClusterConfig,
    range: IdentityRange,
}

impl Checker<'_> {
    fn key_matches(&self, in_key: &StateKey, in_value: &StateKey) -> Result<(), EntryError> {
        if in_key == in_value {
            return Ok(());
        }
        let mismatch = |field, a: &dyn ToString, b: &dyn ToString| EntryError::KeyMismatch {
            key: self.key.into(),
            field,
            in_key: a.to_string(),
            in_value: b.to_string(),
        };
        Err(match (in_key, in_value) {
            (StateKey::Node { name: a, .. }, StateKey::Node { name: b, .. }) if a != b => {
                mismatch("node name", a, b)
            }
            (
                StateKey::Service {
                    namespace: a,
                    name: n,
                    ..
                },
                StateKey::Service {
                    namespace: b,
                    name: m,
                    ..
                },
            )
            | (
                StateKey::ServiceExport {
                    namespace: a,
                    name: n,
                    ..
                },
                StateKey::ServiceExport {
                    namespace: b,
                    name: m,
                    ..
                },
            ) => {
                if a != b {
                    mismatch("namespace", a, b)
                } else if n != m {
                    mismatch("name", n, m)
                } else {
                    // Same kind, namespace and name: only the cluster differs.
                    mismatch("cluster", &cluster_of(in_key), &cluster_of(in_value))
                }
            }
            (StateKey::Identity { id: a }, StateKey::Identity { id: b }) => {
                mismatch("identity", a, b)
            }
            (StateKey::Ip { ip: a }, StateKey::Ip { ip: b }) => mismatch("IP", a, b),
            _ => mismatch("cluster", &cluster_of(in_key), &cluster_of(in_value)),
        })
    }

    fn cluster(&self, field: &'static str, found: &ClusterName) -> Result<(), EntryError> {
        if *found != self.peer.name {
            return Err(EntryError::ForeignCluster {
                key: self.key.into(),
                field,
                found: found.clone(),
                peer: self.peer.name.clone(),
            });
        }
        Ok(())
    }

    fn cluster_id(&self, found: ClusterId) -> Result<(), EntryError> {
        if found != self.peer.id {
            return Err(EntryError::ForeignClusterId {
                key: self.key.into(),
                found,
                peer: self.peer.name.clone(),
                expected: self.peer.id,
            });
        }
        Ok(())
    }

    fn identity(&self, identity: NumericIdentity) -> Result<(), EntryError> {
        if !self.range.contains(identity) {
            return Err(EntryError::IdentityOutOfRange {
                key: self.key.into(),
                identity,
                peer: self.peer.name.clone(),
                range: self.range,
            });
        }
        Ok(())
    }
}

fn cluster_of(key: &StateKey) -> String {
    key.cluster().map(ToString::to_string).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::testutil;
    use crate::{
        AddressKind, Capabilities, ClusterName, IpPrefix, Label, MaxConnectedClusters, NodeAddress,
        SchemaVersion, to_cache_key,
    };
    use proptest::prelude::*;

    fn name(s: &str) -> ClusterName {
        ClusterName::new(s).unwrap()
    }

    /// Peer `a` with id 2 in a 255-cluster mesh: identities 131328..=196607.
    fn peer() -> ClusterConfig {
        ClusterConfig::new(
            name("a"),
            ClusterId::try_from(2).unwrap(),
            MaxConnectedClusters::Max255,
            Capabilities::default(),
        )
        .unwrap()
    }

    fn node() -> Node {
        Node {
            schema: SchemaVersion,
            name: "n1".parse().unwrap(),
            cluster: name("a"),
            cluster_id: ClusterId::try_from(2).unwrap(),
            addresses: vec![NodeAddress {
                kind: AddressKind::InternalIp,
                ip: "192.0.2.1".parse().unwrap(),
            }],
            pod_cidrs: vec!["10.2.0.0/24".parse().unwrap()],
            labels: BTreeMap::new(),
        }
    }

    fn service() -> ClusterService {
        ClusterService {
            schema: SchemaVersion,
            cluster: name("a"),
            cluster_id: ClusterId::try_from(2).unwrap(),
            namespace: "shop".parse().unwrap(),
            name: "web".parse().unwrap(),
            frontends: BTreeMap::new(),
            backends: BTreeMap::new(),
            shared: true,
            include_external: true,
            labels: BTreeMap::new(),
            selector: BTreeMap::new(),
        }
    }

    fn identity(id: u32, cluster: &str) -> Identity {
        Identity::new(
            NumericIdentity::new(id).unwrap(),
            [
                "k8s:app=web".parse().unwrap(),
                Label::cluster(&name(cluster)),
            ],
        )
    }

    fn ip(identity: u32, cluster: &str) -> IpIdentity {
        IpIdentity {
            schema: SchemaVersion,
            ip: "10.2.0.7".parse().unwrap(),
            identity: NumericIdentity::new(identity).unwrap(),
            host_ip: Some("192.0.2.1".parse().unwrap()),
            namespace: Some("shop".parse().unwrap()),
            pod_name: Some("web-0".parse().unwrap()),
            cluster: name(cluster),
        }
    }

    fn check(kind: Kind, key: &str, value: &[u8]) -> Result<Entry, EntryError> {
        validate_entry(kind, key, value, &peer())
    }

    #[test]
    fn accepts_the_peers_own_entries() {
        let p = peer();
        let values: Vec<Entry> = vec![
            Entry::Node(node()),
            Entry::Service(service()),
            Entry::Identity(identity(131328, "a")),
            Entry::Identity(identity(196607, "a")),
            Entry::Ip(ip(131328, "a")),
        ];
        for entry in values {
            let state = entry.key().to_string();
            assert_eq!(check(entry.kind(), &state, &entry.encode()).unwrap(), entry);
            let cache = to_cache_key(&entry.key(), &p.name).unwrap();
            assert_eq!(check(entry.kind(), &cache, &entry.encode()).unwrap(), entry);
            assert_eq!(validate_key(entry.kind(), &cache, &p).unwrap(), entry.key());
        }
    }

    /// Every refusal, by the variant it must produce.
    #[test]
    fn refusals() {
        let node = node().encode();
        let mut other_node = self::node();
        other_node.name = "n2".parse().unwrap();
        let mut foreign_node = self::node();
        foreign_node.cluster = name("b");
        let mut wrong_id = self::node();
        wrong_id.cluster_id = ClusterId::try_from(3).unwrap();
        let mut other_ns = service();
        other_ns.namespace = "other".parse().unwrap();
        let mut other_ip = ip(131328, "a");
        other_ip.ip = "10.2.0.8".parse().unwrap();
        let schema2 = String::from_utf8(node.clone())
            .unwrap()
            .replace("\"schema\":1", "\"schema\":2");
        let no_schema = String::from_utf8(node.clone())
            .unwrap()
            .replace("\"schema\":1,", "");

        let n1 = "cilium/state/nodes/v1/a/n1";
        let svc = "cilium/state/services/v1/a/shop/web";
        let id = |i: u32| format!("cilium/state/identities/v1/id/{i}");
        let ip_key = "cilium/state/ip/v1/default/10.2.0.7";
        let cases: Vec<(&str, Kind, String, Vec<u8>, &str)> = vec![
            (
                "other cluster's name in key",
                Kind::Nodes,
                "cilium/state/nodes/v1/b/n1".into(),
                node.clone(),
                "ForeignKey",
            ),
            (
                "other cluster in service key",
                Kind::Services,
                "cilium/state/services/v1/b/shop/web".into(),
                service().encode(),
                "ForeignKey",
            ),
            (
                "cache key of another peer",
                Kind::Nodes,
                "cilium/cache/nodes/v1/b/n1".into(),
                node.clone(),
                "ForeignKey",
            ),
            (
                "cached identity of another peer",
                Kind::Identities,
                "cilium/cache/identities/v1/b/id/131328".into(),
                identity(131328, "a").encode(),
                "ForeignKey",
            ),
            (
                "unparsable key",
                Kind::Nodes,
                "cilium/state/nodes/v1/a".into(),
                node.clone(),
                "Key",
            ),
            (
                "key of another kind",
                Kind::Services,
                n1.into(),
                node.clone(),
                "WrongKind",
            ),
            (
                "value names another cluster",
                Kind::Nodes,
                n1.into(),
                foreign_node.encode(),
                "ForeignCluster",
            ),
            (
                "mismatched cluster id",
                Kind::Nodes,
                n1.into(),
                wrong_id.encode(),
                "ForeignClusterId",
            ),
            (
                "node filed under another name",
                Kind::Nodes,
                n1.into(),
                other_node.encode(),
                "KeyMismatch",
            ),
            (
                "service filed under another namespace",
                Kind::Services,
                svc.into(),
                other_ns.encode(),
                "KeyMismatch",
            ),
            (
                "identity filed under another id",
                Kind::Identities,
                id(131329),
                identity(131328, "a").encode(),
                "KeyMismatch",
            ),
            (
                "ip filed under another ip",
                Kind::Ip,
                ip_key.into(),
                other_ip.encode(),
                "KeyMismatch",
            ),
            (
                "identity of another cluster's range",
                Kind::Identities,
                id(65792),
                identity(65792, "a").encode(),
                "IdentityOutOfRange",
            ),
            (
                "reserved identity",
                Kind::Identities,
                id(2),
                identity(2, "a").encode(),
                "IdentityOutOfRange",
            ),
            (
                "reserved local part",
                Kind::Identities,
                id(131072 + 255),
                identity(131072 + 255, "a").encode(),
                "IdentityOutOfRange",
            ),
            (
                "identity labeled with another cluster",
                Kind::Identities,
                id(131328),
                identity(131328, "b").encode(),
                "ForeignCluster",
            ),
            (
                "ip mapped to another cluster's identity",
                Kind::Ip,
                ip_key.into(),
                ip(65792, "a").encode(),
                "IdentityOutOfRange",
            ),
            (
                "ip mapped to a reserved identity",
                Kind::Ip,
                ip_key.into(),
                ip(6, "a").encode(),
                "IdentityOutOfRange",
            ),
            (
                "ip claimed by another cluster",
                Kind::Ip,
                ip_key.into(),
                ip(131328, "b").encode(),
                "ForeignCluster",
            ),
            (
                "bad JSON",
                Kind::Nodes,
                n1.into(),
                b"{\"schema\":1,\"name\":".to_vec(),
                "Decode",
            ),
            (
                "not JSON",
                Kind::Nodes,
                n1.into(),
                b"\x00\x01garbage".to_vec(),
                "Decode",
            ),
            ("empty value", Kind::Nodes, n1.into(), Vec::new(), "Decode"),
            (
                "wrong schema",
                Kind::Nodes,
                n1.into(),
                schema2.into_bytes(),
                "Decode",
            ),
            (
                "missing schema",
                Kind::Nodes,
                n1.into(),
                no_schema.into_bytes(),
                "Decode",
            ),
            (
                "truncated bytes",
                Kind::Nodes,
                n1.into(),
                node[..node.len() - 1].to_vec(),
                "Decode",
            ),
            (
                "value of another kind",
                Kind::Nodes,
                n1.into(),
                service().encode(),
                "Decode",
            ),
        ];
        for (what, kind, key, value, variant) in cases {
            let err = check(kind, &key, &value).unwrap_err();
            assert!(format!("{err:?}").starts_with(variant), "{what}: {err:?}");
            assert_eq!(err.key(), key, "{what}");
            assert!(
                err.to_string().contains(&format!("{key:?}")),
                "{what}: {err}"
            );
        }
    }

    #[test]
    fn messages_say_what_was_wrong() {
        let mut n = node();
        n.cluster_id = ClusterId::try_from(3).unwrap();
        let err = check(Kind::Nodes, "cilium/state/nodes/v1/a/n1", &n.encode()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "key \"cilium/state/nodes/v1/a/n1\": value has cluster id 3, but peer a has id 2"
        );
        let key = "cilium/state/identities/v1/id/65792";
        let err = check(Kind::Identities, key, &identity(65792, "a").encode()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "key \"cilium/state/identities/v1/id/65792\": identity 65792 is outside peer a's \
             identity range 131328..=196607"
        );
        let err = check(Kind::Nodes, "cilium/state/nodes/v1/b/n1", &node().encode()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "key \"cilium/state/nodes/v1/b/n1\" names cluster b, but it was read from peer a"
        );
        let err = check(Kind::Nodes, "cilium/state/nodes/v1/a/n1", b"{\"schema\":7}").unwrap_err();
        assert_eq!(
            err.to_string(),
            "key \"cilium/state/nodes/v1/a/n1\": node value has schema version 7; this build \
             reads only version 1"
        );
    }

    #[test]
    fn inconsistent_peer_config_refuses_everything() {
        let mut p = peer();
        p.id = ClusterId::try_from(300).unwrap();
        let err = validate_entry(
            Kind::Nodes,
            "cilium/state/nodes/v1/a/n1",
            &node().encode(),
            &p,
        )
        .unwrap_err();
        assert!(matches!(err, EntryError::PeerConfig { .. }), "{err}");
    }

    #[test]
    fn cluster_config_of_a_peer() {
        let p = peer();
        let key = "cilium/cluster-config/a";
        assert_eq!(
            validate_cluster_config(key, &p.encode(), &p.name).unwrap(),
            p
        );
        let err =
            validate_cluster_config("cilium/cluster-config/b", &p.encode(), &p.name).unwrap_err();
        assert!(matches!(err, EntryError::ForeignKey { .. }), "{err}");
        let mut other = p.clone();
        other.name = name("b");
        let err = validate_cluster_config(key, &other.encode(), &p.name).unwrap_err();
        assert!(matches!(err, EntryError::ForeignCluster { .. }), "{err}");
        let err =
            validate_cluster_config("cilium/cluster-config/", &p.encode(), &p.name).unwrap_err();
        assert!(matches!(err, EntryError::Key { .. }), "{err}");
        let err = validate_cluster_config(key, b"{\"schema\":1}", &p.name).unwrap_err();
        assert!(matches!(err, EntryError::Decode { .. }), "{err}");
    }

    #[test]
    fn deletions_are_checked_by_key() {
        let p = peer();
        assert!(validate_key(Kind::Nodes, "cilium/state/nodes/v1/a/n1", &p).is_ok());
        assert!(validate_key(Kind::Nodes, "cilium/state/nodes/v1/b/n1", &p).is_err());
        assert!(validate_key(Kind::Ip, "cilium/cache/ip/v1/a/10.0.0.0/8", &p).is_ok());
        assert!(validate_key(Kind::Ip, "cilium/cache/ip/v1/b/10.0.0.0/8", &p).is_err());
        assert!(validate_key(Kind::Ip, "cilium/cache/ip/v1/a/10.0.0.1/8", &p).is_err());
    }

    /// A config for a peer other than `peer`: another name, possibly the same id.
    fn other_peer(peer: &ClusterConfig) -> impl Strategy<Value = ClusterConfig> + use<> {
        let p = peer.clone();
        testutil::cluster_config().prop_filter("another name", move |o| o.name != p.name)
    }

    proptest! {
        #[test]
        fn round_trip((peer, entry) in testutil::peer_and_entry()) {
            let bytes = entry.encode();
            let state = entry.key().to_string();
            prop_assert_eq!(&validate_entry(entry.kind(), &state, &bytes, &peer).unwrap(), &entry);
            let cache = to_cache_key(&entry.key(), &peer.name).unwrap();
            prop_assert_eq!(&validate_entry(entry.kind(), &cache, &bytes, &peer).unwrap(), &entry);
        }

        /// Nothing one cluster publishes passes as another cluster's.
        #[test]
        fn never_accepted_from_another_peer(
            (peer, entry, other) in testutil::peer_and_entry()
                .prop_flat_map(|(p, e)| { let o = other_peer(&p); (Just(p), Just(e), o) })
        ) {
            let bytes = entry.encode();
            let state = entry.key().to_string();
            prop_assert!(validate_entry(entry.kind(), &state, &bytes, &other).is_err());
            let cache = to_cache_key(&entry.key(), &peer.name).unwrap();
            prop_assert!(validate_entry(entry.kind(), &cache, &bytes, &other).is_err());
        }

        /// The same name with another id (same layout): entries carrying an id or an identity
        /// are refused.
        #[test]
        fn never_accepted_under_another_id((peer, entry) in testutil::peer_and_entry(), id in 1u16..=511) {
            let max = peer.max_connected_clusters;
            let id = 1 + (id - 1) % max.value();
            prop_assume!(id != peer.id.get());
            let mut moved = peer.clone();
            moved.id = ClusterId::new(id, max).unwrap();
            let result = validate_entry(entry.kind(), &entry.key().to_string(), &entry.encode(), &moved);
            prop_assert!(result.is_err());
        }

        #[test]
        fn truncation_refused((peer, entry) in testutil::peer_and_entry(), cut in any::<prop::sample::Index>()) {
            let bytes = entry.encode();
            let cut = cut.index(bytes.len());
            let err = validate_entry(entry.kind(), &entry.key().to_string(), &bytes[..cut], &peer).unwrap_err();
            let is_decode = matches!(err, EntryError::Decode { .. });
            prop_assert!(is_decode, "{}", err);
        }

        #[test]
        fn garbage_never_panics(
            peer in testutil::cluster_config(),
            key in "cilium/(state|cache)/(nodes|ip|identities)/v1/[a-z0-9/.:]{0,20}",
            value in prop::collection::vec(any::<u8>(), 0..80),
        ) {
            for kind in Kind::ALL {
                let _ = validate_entry(kind, &key, &value, &peer);
            }
        }

        #[test]
        fn ip_prefixes_of_any_length((peer, prefix, offset) in (testutil::cluster_config(), testutil::prefix(), any::<u32>())) {
            let entry = IpIdentity {
                schema: SchemaVersion,
                ip: prefix,
                identity: testutil::identity_in(&peer, offset),
                host_ip: None,
                namespace: None,
                pod_name: None,
                cluster: peer.name.clone(),
            };
            let key = entry.key().to_string();
            prop_assert_eq!(IpPrefix::host(prefix.addr()) == prefix, !key.ends_with(&format!("/{}", prefix.prefix_len())));
            prop_assert!(validate_entry(Kind::Ip, &key, &entry.encode(), &peer).is_ok());
        }
    }
}
