//! The store's key layout, compatible with Cilium's so operators' habits carry over.
//!
//! | what | key |
//! |---|---|
//! | node | `cilium/state/nodes/v1/<cluster>/<node>` |
//! | service | `cilium/state/services/v1/<cluster>/<namespace>/<name>` |
//! | identity | `cilium/state/identities/v1/id/<id>` |
//! | ip→identity | `cilium/state/ip/v1/default/<ip or prefix>` |
//! | service export | `cilium/state/serviceexports/v1/<cluster>/<namespace>/<name>` |
//! | cluster config | `cilium/cluster-config/<cluster>` |
//! | sync canary | `cilium/synced/<cluster>/cilium/state/<kind>/v1` |
//! | heartbeat | `cilium/.heartbeat` |
//! | cached node | `cilium/cache/nodes/v1/<peer>/<node>` |
//! | cached service | `cilium/cache/services/v1/<peer>/<namespace>/<name>` |
//! | cached identity | `cilium/cache/identities/v1/<peer>/id/<id>` |
//! | cached ip→identity | `cilium/cache/ip/v1/<peer>/<ip or prefix>` |
//! | cached service export | `cilium/cache/serviceexports/v1/<peer>/<namespace>/<name>` |
//! | cache canary | `cilium/synced/<peer>/cilium/cache/<kind>/v1` |
//! | kvstoremesh's status of a peer | `cilium/synced/<peer>/kvstoremesh/status` |
//! | cached heartbeat | `cilium/cache/heartbeat/<peer>` |
//!
//! Parsers accept only the spelling the builders produce (no leading zeros in ids, IPs as
//! [`IpPrefix`] prints them), so one entry never has two keys a reader could confuse.

use std::fmt;

use crate::identity::{IdentityError, NumericIdentity};
use crate::name::{ClusterName, DnsLabel, DnsSubdomain, NameError};
use crate::net::{IpPrefix, PrefixError};

/// Root of what clusters publish about themselves.
pub const STATE_ROOT: &str = "cilium/state/";
/// Root of kvstoremesh's copies of peers' state.
pub const CACHE_ROOT: &str = "cilium/cache/";
/// Root of sync canaries.
pub const SYNCED_ROOT: &str = "cilium/synced/";
/// Root of cluster configurations.
pub const CLUSTER_CONFIG_ROOT: &str = "cilium/cluster-config/";
/// Written periodically by the publisher, so readers can tell a live store from a dead one.
pub const HEARTBEAT_KEY: &str = "cilium/.heartbeat";
/// The only address space of ip→identity state keys.
pub const IP_ADDRESS_SPACE: &str = "default";
/// The layout version in every state and cache key.
pub const LAYOUT_VERSION: &str = "v1";

/// The kinds of published state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// Nodes.
    Nodes,
    /// Global services.
    Services,
    /// Security identities.
    Identities,
    /// ip→identity mappings.
    Ip,
    /// Multi-Cluster Services exports.
    ServiceExports,
}

impl Kind {
    /// Every kind, in publishing order.
    pub const ALL: [Kind; 5] = [
        Kind::Nodes,
        Kind::Services,
        Kind::Identities,
        Kind::Ip,
        Kind::ServiceExports,
    ];

    /// The kinds every cluster publishes and every agent reads; service exports are
    /// published only by clusters with that capability, for MCS-API consumers.
    pub const CORE: [Kind; 4] = [Kind::Nodes, Kind::Services, Kind::Identities, Kind::Ip];

    /// The kind's key segment: `nodes`, `services`, `identities`, `ip`, `serviceexports`.
    pub const fn name(self) -> &'static str {
        match self {
            Kind::Nodes => "nodes",
            Kind::Services => "services",
            Kind::Identities => "identities",
            Kind::Ip => "ip",
            Kind::ServiceExports => "serviceexports",
        }
    }

    /// The kind named by a key segment.
    pub fn from_name(name: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.name() == name)
    }

    /// Where the kind is published, with a trailing `/`: `cilium/state/nodes/v1/`.
    pub const fn state_prefix(self) -> &'static str {
        match self {
            Kind::Nodes => "cilium/state/nodes/v1/",
            Kind::Services => "cilium/state/services/v1/",
            Kind::Identities => "cilium/state/identities/v1/",
            Kind::Ip => "cilium/state/ip/v1/",
            Kind::ServiceExports => "cilium/state/serviceexports/v1/",
        }
    }

    /// Where kvstoremesh copies `peer`'s entries, with a trailing `/`:
    /// `cilium/cache/nodes/v1/<peer>/`.
    pub fn cache_prefix(self, peer: &ClusterName) -> String {
        format!("{CACHE_ROOT}{}/{LAYOUT_VERSION}/{peer}/", self.name())
    }

    /// Written by `cluster`'s publisher once its full initial state of this kind is in its
    /// store: `cilium/synced/<cluster>/cilium/state/<kind>/v1`.
    pub fn state_canary_key(self, cluster: &ClusterName) -> String {
        format!(
            "{SYNCED_ROOT}{cluster}/{STATE_ROOT}{}/{LAYOUT_VERSION}",
            self.name()
        )
    }

    /// Written by kvstoremesh once `peer`'s full state of this kind is in the cache:
    /// `cilium/synced/<peer>/cilium/cache/<kind>/v1`.
    pub fn cache_canary_key(self, peer: &ClusterName) -> String {
        format!(
            "{SYNCED_ROOT}{peer}/{CACHE_ROOT}{}/{LAYOUT_VERSION}",
            self.name()
        )
    }

    /// The state key's form, for messages.
    pub const fn state_layout(self) -> &'static str {
        match self {
            Kind::Nodes => "cilium/state/nodes/v1/<cluster>/<node>",
            Kind::Services => "cilium/state/services/v1/<cluster>/<namespace>/<name>",
            Kind::Identities => "cilium/state/identities/v1/id/<id>",
            Kind::Ip => "cilium/state/ip/v1/default/<ip>",
            Kind::ServiceExports => "cilium/state/serviceexports/v1/<cluster>/<namespace>/<name>",
        }
    }

    /// The cache key's form, for messages.
    pub const fn cache_layout(self) -> &'static str {
        match self {
            Kind::Nodes => "cilium/cache/nodes/v1/<peer>/<node>",
            Kind::Services => "cilium/cache/services/v1/<peer>/<namespace>/<name>",
            Kind::Identities => "cilium/cache/identities/v1/<peer>/id/<id>",
            Kind::Ip => "cilium/cache/ip/v1/<peer>/<ip>",
            Kind::ServiceExports => "cilium/cache/serviceexports/v1/<peer>/<namespace>/<name>",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// `cilium/cluster-config/<cluster>`.
pub fn cluster_config_key(cluster: &ClusterName) -> String {
    format!("{CLUSTER_CONFIG_ROOT}{cluster}")
}

/// The cluster named by a `cilium/cluster-config/<cluster>` key.
pub fn parse_cluster_config_key(key: &str) -> Result<ClusterName, KeyError> {
    let rest = key
        .strip_prefix(CLUSTER_CONFIG_ROOT)
        .ok_or_else(|| KeyError::UnknownPrefix {
            key: key.into(),
            expected: CLUSTER_CONFIG_ROOT,
        })?;
    name(key, "cluster", rest, ClusterName::new)
}

/// Where kvstoremesh mirrors each peer's heartbeat: beside the kinds under the cache root.
pub const HEARTBEAT_CACHE_ROOT: &str = "cilium/cache/heartbeat/";
/// What follows the peer in kvstoremesh's status key.
const PEER_STATUS_SUFFIX: &str = "/kvstoremesh/status";
/// The peer status key's form, for messages.
const PEER_STATUS_LAYOUT: &str = "cilium/synced/<peer>/kvstoremesh/status";

/// Where kvstoremesh writes its status of `peer` ([`PeerStatus`](crate::PeerStatus)) in the
/// local store: `cilium/synced/<peer>/kvstoremesh/status`. Never a kind's canary key, so
/// readers of canaries do not mistake it for one.
pub fn peer_status_key(peer: &ClusterName) -> String {
    format!("{SYNCED_ROOT}{peer}{PEER_STATUS_SUFFIX}")
}

/// The peer named by a `cilium/synced/<peer>/kvstoremesh/status` key.
pub fn parse_peer_status_key(key: &str) -> Result<ClusterName, KeyError> {
    let rest = key
        .strip_prefix(SYNCED_ROOT)
        .ok_or_else(|| KeyError::UnknownPrefix {
            key: key.into(),
            expected: SYNCED_ROOT,
        })?;
    let peer = rest
        .strip_suffix(PEER_STATUS_SUFFIX)
        .ok_or_else(|| KeyError::Shape {
            key: key.into(),
            expected: PEER_STATUS_LAYOUT,
        })?;
    name(key, "peer cluster", peer, ClusterName::new)
}

/// Where kvstoremesh mirrors `peer`'s `cilium/.heartbeat`, unchanged:
/// `cilium/cache/heartbeat/<peer>`. `heartbeat` is no kind, so no cache entry prefix holds it.
pub fn heartbeat_cache_key(peer: &ClusterName) -> String {
    format!("{HEARTBEAT_CACHE_ROOT}{peer}")
}

/// The peer named by a `cilium/cache/heartbeat/<peer>` key.
pub fn parse_heartbeat_cache_key(key: &str) -> Result<ClusterName, KeyError> {
    let peer = key
        .strip_prefix(HEARTBEAT_CACHE_ROOT)
        .ok_or_else(|| KeyError::UnknownPrefix {
            key: key.into(),
            expected: HEARTBEAT_CACHE_ROOT,
        })?;
    name(key, "peer cluster", peer, ClusterName::new)
}

/// The prefix of `cluster`'s sync canaries in its own store: `cilium/synced/<cluster>/cilium/state/`.
pub fn state_canary_prefix(cluster: &ClusterName) -> String {
    format!("{SYNCED_ROOT}{cluster}/{STATE_ROOT}")
}

/// The prefix of kvstoremesh's cache canaries for `peer` in the local store:
/// `cilium/synced/<peer>/cilium/cache/`.
pub fn cache_canary_prefix(peer: &ClusterName) -> String {
    format!("{SYNCED_ROOT}{peer}/{CACHE_ROOT}")
}

/// A key that does not follow the layout; each names the key and what is wrong with it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// Not under the root the parser reads.
    #[error("key {key:?} is not under {expected}")]
    UnknownPrefix {
        /// The refused key.
        key: String,
        /// The root expected.
        expected: &'static str,
    },
    /// A kind segment that names no kind.
    #[error(
        "key {key:?} has unknown kind {kind:?} (expected nodes, services, identities, ip or \
         serviceexports)"
    )]
    UnknownKind {
        /// The refused key.
        key: String,
        /// The kind segment.
        kind: String,
    },
    /// A layout version other than v1.
    #[error("key {key:?} has layout version {version:?}; only v1 is known")]
    UnsupportedVersion {
        /// The refused key.
        key: String,
        /// The version segment.
        version: String,
    },
    /// Too few or too many segments for its kind.
    #[error("key {key:?} does not have the form {expected}")]
    Shape {
        /// The refused key.
        key: String,
        /// The form its kind's keys have.
        expected: &'static str,
    },
    /// A name segment that is not a valid name.
    #[error("key {key:?} has a bad {segment}: {source}")]
    Name {
        /// The refused key.
        key: String,
        /// Which segment: `cluster`, `namespace`, ...
        segment: &'static str,
        /// Why the name is refused.
        source: NameError,
    },
    /// An identity segment that is not a 24-bit number.
    #[error("key {key:?} has a bad identity: {source}")]
    Identity {
        /// The refused key.
        key: String,
        /// Why the identity is refused.
        source: IdentityError,
    },
    /// An IP segment that is not an address or prefix.
    #[error("key {key:?} has a bad IP: {source}")]
    Ip {
        /// The refused key.
        key: String,
        /// Why the IP is refused.
        source: PrefixError,
    },
    /// A parseable segment in a spelling the builders never produce (`007`, `10.0.0.1/32`).
    #[error("key {key:?} spells its {segment} {found:?}; the canonical spelling is {canonical:?}")]
    NotCanonical {
        /// The refused key.
        key: String,
        /// Which segment.
        segment: &'static str,
        /// The spelling found.
        found: String,
        /// The only spelling accepted.
        canonical: String,
    },
    /// An ip→identity key in an address space other than `default`.
    #[error("key {key:?} is in address space {space:?}; only \"default\" is used")]
    AddressSpace {
        /// The refused key.
        key: String,
        /// The address space segment.
        space: String,
    },
    /// A state key of one cluster to be cached as another's.
    #[error("key {key:?} belongs to cluster {cluster}, not to peer {peer}")]
    ForeignCluster {
        /// The refused key.
        key: String,
        /// The cluster the key names.
        cluster: ClusterName,
        /// The peer it was to be cached under.
        peer: ClusterName,
    },
}

/// A parsed `cilium/state/...` key: its kind and the parts that identify the entry.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum StateKey {
    /// `cilium/state/nodes/v1/<cluster>/<name>`.
    Node {
        /// The node's cluster.
        cluster: ClusterName,
        /// The node's name.
        name: DnsSubdomain,
    },
    /// `cilium/state/services/v1/<cluster>/<namespace>/<name>`.
    Service {
        /// The service's cluster.
        cluster: ClusterName,
        /// The service's namespace.
        namespace: DnsLabel,
        /// The service's name.
        name: DnsLabel,
    },
    /// `cilium/state/identities/v1/id/<id>`.
    Identity {
        /// The numeric identity.
        id: NumericIdentity,
    },
    /// `cilium/state/ip/v1/default/<ip>`.
    Ip {
        /// The address or prefix.
        ip: IpPrefix,
    },
    /// `cilium/state/serviceexports/v1/<cluster>/<namespace>/<name>`.
    ServiceExport {
        /// The exporting cluster.
        cluster: ClusterName,
        /// The service's namespace.
        namespace: DnsLabel,
        /// The service's name.
        name: DnsLabel,
    },
}

impl StateKey {
    /// The kind of entry the key holds.
    pub fn kind(&self) -> Kind {
        match self {
            StateKey::Node { .. } => Kind::Nodes,
            StateKey::Service { .. } => Kind::Services,
            StateKey::Identity { .. } => Kind::Identities,
            StateKey::Ip { .. } => Kind::Ip,
            StateKey::ServiceExport { .. } => Kind::ServiceExports,
        }
    }

    /// The cluster the key names; identity and ip keys name none.
    pub fn cluster(&self) -> Option<&ClusterName> {
        match self {
            StateKey::Node { cluster, .. }
            | StateKey::Service { cluster, .. }
            | StateKey::ServiceExport { cluster, .. } => Some(cluster),
            StateKey::Identity { .. } | StateKey::Ip { .. } => None,
        }
    }

    /// The key after the cluster part, shared by state and cache keys: `<node>`,
    /// `<namespace>/<name>`, `id/<id>`, `<ip>`.
    fn write_tail(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StateKey::Node { name, .. } => write!(f, "{name}"),
            StateKey::Service {
                namespace, name, ..
            }
            | StateKey::ServiceExport {
                namespace, name, ..
            } => write!(f, "{namespace}/{name}"),
            StateKey::Identity { id } => write!(f, "id/{id}"),
            StateKey::Ip { ip } => write!(f, "{ip}"),
        }
    }
}

impl fmt::Display for StateKey {
    /// The state key.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.kind().state_prefix())?;
        match self {
            StateKey::Node { cluster, .. }
            | StateKey::Service { cluster, .. }
            | StateKey::ServiceExport { cluster, .. } => write!(f, "{cluster}/")?,
            StateKey::Identity { .. } => {}
            StateKey::Ip { .. } => write!(f, "{IP_ADDRESS_SPACE}/")?,
        }
        self.write_tail(f)
    }
}

/// A parsed `cilium/cache/...` key: the peer it was copied from and the entry's state key.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CacheKey {
    peer: ClusterName,
    entry: StateKey,
}

impl CacheKey {
    /// The cache key of `peer`'s entry `entry`; refuses an entry naming another cluster.
    pub fn new(peer: ClusterName, entry: StateKey) -> Result<Self, KeyError> {
        match entry.cluster() {
            Some(cluster) if *cluster != peer => Err(KeyError::ForeignCluster {
                key: entry.to_string(),
                cluster: cluster.clone(),
                peer,
            }),
            _ => Ok(CacheKey { peer, entry }),
        }
    }

    /// The peer the entry was copied from.
    pub fn peer(&self) -> &ClusterName {
        &self.peer
    }

    /// The entry's key in the peer's own store.
    pub fn entry(&self) -> &StateKey {
        &self.entry
    }

    /// The entry's state key, dropping the peer.
    pub fn into_entry(self) -> StateKey {
        self.entry
    }
}

impl fmt::Display for CacheKey {
    /// The cache key.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.entry.kind().cache_prefix(&self.peer))?;
        self.entry.write_tail(f)
    }
}

/// Where kvstoremesh stores `peer`'s entry `key`; refuses a key naming another cluster.
pub fn to_cache_key(key: &StateKey, peer: &ClusterName) -> Result<String, KeyError> {
    CacheKey::new(peer.clone(), key.clone()).map(|k| k.to_string())
}

fn name<T>(
    key: &str,
    segment: &'static str,
    value: &str,
    parse: fn(String) -> Result<T, NameError>,
) -> Result<T, KeyError> {
    parse(value.into()).map_err(|source| KeyError::Name {
        key: key.into(),
        segment,
        source,
    })
}

fn identity(key: &str, value: &str) -> Result<NumericIdentity, KeyError> {
    let id: NumericIdentity = value.parse().map_err(|source| KeyError::Identity {
        key: key.into(),
        source,
    })?;
    canonical(key, "identity", value, id)
}

fn ip(key: &str, value: &str) -> Result<IpPrefix, KeyError> {
    let ip: IpPrefix = value.parse().map_err(|source| KeyError::Ip {
        key: key.into(),
        source,
    })?;
    canonical(key, "IP", value, ip)
}

fn canonical<T: fmt::Display>(
    key: &str,
    segment: &'static str,
    found: &str,
    value: T,
) -> Result<T, KeyError> {
    let canonical = value.to_string();
    if canonical != found {
        return Err(KeyError::NotCanonical {
            key: key.into(),
            segment,
            found: found.into(),
            canonical,
        });
    }
    Ok(value)
}

/// Splits `<root><kind>/v1/<rest>` into the kind and `rest`.
fn split_root<'k>(
    key: &'k str,
    root: &'static str,
    layout: fn(Kind) -> &'static str,
) -> Result<(Kind, &'k str), KeyError> {
    let rest = key
        .strip_prefix(root)
        .ok_or_else(|| KeyError::UnknownPrefix {
            key: key.into(),
            expected: root,
        })?;
    let (kind_name, rest) = rest.split_once('/').unwrap_or((rest, ""));
    let kind = Kind::from_name(kind_name).ok_or_else(|| KeyError::UnknownKind {
        key: key.into(),
        kind: kind_name.into(),
    })?;
    let shape = || KeyError::Shape {
        key: key.into(),
        expected: layout(kind),
    };
    let (version, rest) = rest.split_once('/').ok_or_else(shape)?;
    if version != LAYOUT_VERSION {
        return Err(KeyError::UnsupportedVersion {
            key: key.into(),
            version: version.into(),
        });
    }
    Ok((kind, rest))
}

/// Exactly `N` `/`-separated segments of `rest`.
fn segments<'k, const N: usize>(
    key: &str,
    rest: &'k str,
    expected: &'static str,
) -> Result<[&'k str; N], KeyError> {
    let parts: Vec<&str> = rest.splitn(N + 1, '/').collect();
    <[&str; N]>::try_from(parts).map_err(|_| KeyError::Shape {
        key: key.into(),
        expected,
    })
}

/// Parses the part of a key after `<kind>/v1/<cluster>/` (cache) or `<kind>/v1/` (state,
/// where `cluster` is the first segment of `rest` for per-cluster kinds).
fn parse_entry(
    key: &str,
    kind: Kind,
    cluster: Option<&ClusterName>,
    rest: &str,
    expected: &'static str,
) -> Result<StateKey, KeyError> {
    let shape = || KeyError::Shape {
        key: key.into(),
        expected,
    };
    let cluster_and = |rest: &'_ str| -> Result<(ClusterName, String), KeyError> {
        match cluster {
            Some(c) => Ok((c.clone(), rest.to_owned())),
            None => {
                let (c, rest) = rest.split_once('/').ok_or_else(shape)?;
                Ok((name(key, "cluster", c, ClusterName::new)?, rest.to_owned()))
            }
        }
    };
    Ok(match kind {
        Kind::Nodes => {
            let (cluster, rest) = cluster_and(rest)?;
            let [node] = segments::<1>(key, &rest, expected)?;
            StateKey::Node {
                cluster,
                name: name(key, "node name", node, DnsSubdomain::new)?,
            }
        }
        Kind::Services | Kind::ServiceExports => {
            let (cluster, rest) = cluster_and(rest)?;
            let [ns, svc] = segments::<2>(key, &rest, expected)?;
            let namespace = name(key, "namespace", ns, DnsLabel::new)?;
            let name = name(key, "service name", svc, DnsLabel::new)?;
            if kind == Kind::Services {
                StateKey::Service {
                    cluster,
                    namespace,
                    name,
                }
            } else {
                StateKey::ServiceExport {
                    cluster,
                    namespace,
                    name,
                }
            }
        }
        Kind::Identities => {
            let id = rest.strip_prefix("id/").ok_or_else(shape)?;
            let [id] = segments::<1>(key, id, expected)?;
            StateKey::Identity {
                id: identity(key, id)?,
            }
        }
        Kind::Ip => {
            let value = if cluster.is_some() {
                rest
            } else {
                let (space, value) = rest.split_once('/').ok_or_else(shape)?;
                if space != IP_ADDRESS_SPACE {
                    return Err(KeyError::AddressSpace {
                        key: key.into(),
                        space: space.into(),
                    });
                }
                value
            };
            StateKey::Ip {
                ip: ip(key, value)?,
            }
        }
    })
}

/// Parses a `cilium/state/...` key.
pub fn parse_state_key(key: &str) -> Result<StateKey, KeyError> {
    let (kind, rest) = split_root(key, STATE_ROOT, Kind::state_layout)?;
    parse_entry(key, kind, None, rest, kind.state_layout())
}

/// Parses a `cilium/cache/...` key.
pub fn parse_cache_key(key: &str) -> Result<CacheKey, KeyError> {
    let (kind, rest) = split_root(key, CACHE_ROOT, Kind::cache_layout)?;
    let (peer, rest) = rest.split_once('/').ok_or_else(|| KeyError::Shape {
        key: key.into(),
        expected: kind.cache_layout(),
    })?;
    let peer = name(key, "peer cluster", peer, ClusterName::new)?;
    let entry = parse_entry(key, kind, Some(&peer), rest, kind.cache_layout())?;
    Ok(CacheKey { peer, entry })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil;
    use proptest::prelude::*;

    fn c(s: &str) -> ClusterName {
        ClusterName::new(s).unwrap()
    }

    fn examples() -> Vec<(StateKey, &'static str, &'static str)> {
        let l = |s: &str| DnsLabel::new(s).unwrap();
        vec![
            (
                StateKey::Node {
                    cluster: c("eu-1"),
                    name: DnsSubdomain::new("node-a.example").unwrap(),
                },
                "cilium/state/nodes/v1/eu-1/node-a.example",
                "cilium/cache/nodes/v1/eu-1/node-a.example",
            ),
            (
                StateKey::Service {
                    cluster: c("eu-1"),
                    namespace: l("shop"),
                    name: l("web"),
                },
                "cilium/state/services/v1/eu-1/shop/web",
                "cilium/cache/services/v1/eu-1/shop/web",
            ),
            (
                StateKey::Identity {
                    id: NumericIdentity::new(65792).unwrap(),
                },
                "cilium/state/identities/v1/id/65792",
                "cilium/cache/identities/v1/eu-1/id/65792",
            ),
            (
                StateKey::Ip {
                    ip: "10.1.0.7".parse().unwrap(),
                },
                "cilium/state/ip/v1/default/10.1.0.7",
                "cilium/cache/ip/v1/eu-1/10.1.0.7",
            ),
            (
                StateKey::Ip {
                    ip: "fd00:10::/64".parse().unwrap(),
                },
                "cilium/state/ip/v1/default/fd00:10::/64",
                "cilium/cache/ip/v1/eu-1/fd00:10::/64",
            ),
            (
                StateKey::ServiceExport {
                    cluster: c("eu-1"),
                    namespace: l("shop"),
                    name: l("web"),
                },
                "cilium/state/serviceexports/v1/eu-1/shop/web",
                "cilium/cache/serviceexports/v1/eu-1/shop/web",
            ),
        ]
    }

    #[test]
    fn layout() {
        let peer = c("eu-1");
        for (key, state, cache) in examples() {
            assert_eq!(key.to_string(), state);
            assert_eq!(parse_state_key(state).unwrap(), key);
            assert_eq!(to_cache_key(&key, &peer).unwrap(), cache);
            let parsed = parse_cache_key(cache).unwrap();
            assert_eq!((parsed.peer(), parsed.entry()), (&peer, &key));
            assert_eq!(parsed.to_string(), cache);
            assert!(state.starts_with(key.kind().state_prefix()));
            assert!(cache.starts_with(&key.kind().cache_prefix(&peer)));
        }
        assert_eq!(cluster_config_key(&peer), "cilium/cluster-config/eu-1");
        assert_eq!(
            parse_cluster_config_key("cilium/cluster-config/eu-1").unwrap(),
            peer
        );
        assert_eq!(HEARTBEAT_KEY, "cilium/.heartbeat");
        let canaries: Vec<_> = Kind::ALL
            .iter()
            .map(|k| k.state_canary_key(&peer))
            .collect();
        assert_eq!(
            canaries,
            [
                "cilium/synced/eu-1/cilium/state/nodes/v1",
                "cilium/synced/eu-1/cilium/state/services/v1",
                "cilium/synced/eu-1/cilium/state/identities/v1",
                "cilium/synced/eu-1/cilium/state/ip/v1",
                "cilium/synced/eu-1/cilium/state/serviceexports/v1",
            ]
        );
        assert_eq!(
            Kind::Ip.cache_canary_key(&peer),
            "cilium/synced/eu-1/cilium/cache/ip/v1"
        );
        assert_eq!(
            Kind::Nodes.cache_prefix(&peer),
            "cilium/cache/nodes/v1/eu-1/"
        );
        // Every canary sits outside every prefix a reader watches for entries.
        for kind in Kind::ALL {
            for other in Kind::ALL {
                assert!(
                    !kind
                        .state_canary_key(&peer)
                        .starts_with(other.state_prefix())
                );
            }
        }
    }

    #[test]
    fn foreign_cache_key_refused() {
        let (key, _, _) = examples().remove(0);
        let err = to_cache_key(&key, &c("us-1")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "key \"cilium/state/nodes/v1/eu-1/node-a.example\" belongs to cluster eu-1, not to \
             peer us-1"
        );
        // Identity and ip keys name no cluster: any peer may carry them.
        let (key, _, _) = examples().remove(2);
        assert!(to_cache_key(&key, &c("us-1")).is_ok());
    }

    #[test]
    fn state_key_refusals() {
        let cases: &[(&str, &str)] = &[
            ("", "UnknownPrefix"),
            ("cilium/cache/nodes/v1/a/n", "UnknownPrefix"),
            ("cilium/statex/nodes/v1/a/n", "UnknownPrefix"),
            ("cilium/state/pods/v1/a/n", "UnknownKind"),
            ("cilium/state/", "UnknownKind"),
            ("cilium/state/nodes", "Shape"),
            ("cilium/state/nodes/v1", "Shape"),
            ("cilium/state/nodes/v2/a/n", "UnsupportedVersion"),
            ("cilium/state/nodes/v1/", "Shape"),
            ("cilium/state/nodes/v1/a", "Shape"),
            ("cilium/state/nodes/v1/a/", "Name"),
            ("cilium/state/nodes/v1/a/n/x", "Shape"),
            ("cilium/state/nodes/v1/A/n", "Name"),
            ("cilium/state/nodes/v1/a/N", "Name"),
            ("cilium/state/nodes/v1/a/../b", "Shape"),
            ("cilium/state/services/v1/a/ns", "Shape"),
            ("cilium/state/services/v1/a/ns/web/x", "Shape"),
            ("cilium/state/services/v1/a/n.s/web", "Name"),
            ("cilium/state/services/v1/a/ns/", "Name"),
            ("cilium/state/identities/v1/65792", "Shape"),
            ("cilium/state/identities/v1/id/", "Identity"),
            ("cilium/state/identities/v1/id/x", "Identity"),
            ("cilium/state/identities/v1/id/-1", "Identity"),
            ("cilium/state/identities/v1/id/16777216", "Identity"),
            ("cilium/state/identities/v1/id/065792", "NotCanonical"),
            ("cilium/state/identities/v1/id/1/2", "Shape"),
            ("cilium/state/identities/v1/value/k8s:app=web", "Shape"),
            ("cilium/state/ip/v1/10.0.0.1", "Shape"),
            ("cilium/state/ip/v1/other/10.0.0.1", "AddressSpace"),
            ("cilium/state/ip/v1/default/", "Ip"),
            ("cilium/state/ip/v1/default/10.0.0.256", "Ip"),
            ("cilium/state/ip/v1/default/10.0.0.1/24", "Ip"),
            ("cilium/state/ip/v1/default/10.0.0.1/32", "NotCanonical"),
            ("cilium/state/ip/v1/default/fd00:0::1", "NotCanonical"),
            ("cilium/state/ip/v1/default/10.0.0.0/8/x", "Ip"),
            ("cilium/state/serviceexports/v1/a/ns", "Shape"),
        ];
        for (key, variant) in cases {
            let err = parse_state_key(key).unwrap_err();
            assert!(format!("{err:?}").starts_with(variant), "{key:?}: {err:?}");
            assert!(err.to_string().contains(&format!("{key:?}")), "{err}");
        }
    }

    #[test]
    fn cache_key_refusals() {
        let cases: &[(&str, &str)] = &[
            ("cilium/state/nodes/v1/a/n", "UnknownPrefix"),
            ("cilium/cache/nodes/v1/a", "Shape"),
            ("cilium/cache/nodes/v1/A/n", "Name"),
            ("cilium/cache/nodes/v1/a/n/m", "Shape"),
            ("cilium/cache/services/v1/a/ns", "Shape"),
            ("cilium/cache/identities/v1/a/65792", "Shape"),
            ("cilium/cache/identities/v1/id/65792", "Shape"),
            ("cilium/cache/identities/v1/a/id/0x1", "Identity"),
            ("cilium/cache/ip/v1/a/default/10.0.0.1", "Ip"),
            ("cilium/cache/ip/v1/a/10.0.0.1/32", "NotCanonical"),
            ("cilium/cache/ip/v2/a/10.0.0.1", "UnsupportedVersion"),
        ];
        for (key, variant) in cases {
            let err = parse_cache_key(key).unwrap_err();
            assert!(format!("{err:?}").starts_with(variant), "{key:?}: {err:?}");
            assert!(err.to_string().contains(&format!("{key:?}")), "{err}");
        }
        assert!(parse_cluster_config_key("cilium/cluster-config/a/b").is_err());
        assert!(parse_cluster_config_key("cilium/cluster-config/").is_err());
        assert!(parse_cluster_config_key("cilium/cluster-configs/a").is_err());
    }

    fn state_key() -> impl Strategy<Value = StateKey> {
        prop_oneof![
            (testutil::cluster_name(), testutil::dns_subdomain())
                .prop_map(|(cluster, name)| StateKey::Node { cluster, name }),
            (
                testutil::cluster_name(),
                testutil::dns_label(),
                testutil::dns_label()
            )
                .prop_map(|(cluster, namespace, name)| StateKey::Service {
                    cluster,
                    namespace,
                    name
                }),
            (0..=NumericIdentity::MAX).prop_map(|id| StateKey::Identity {
                id: NumericIdentity::new(id).unwrap()
            }),
            testutil::prefix().prop_map(|ip| StateKey::Ip { ip }),
            (
                testutil::cluster_name(),
                testutil::dns_label(),
                testutil::dns_label()
            )
                .prop_map(|(cluster, namespace, name)| StateKey::ServiceExport {
                    cluster,
                    namespace,
                    name
                }),
        ]
    }

    #[test]
    fn kvstoremesh_keys() {
        let peer = c("eu-2");
        assert_eq!(
            peer_status_key(&peer),
            "cilium/synced/eu-2/kvstoremesh/status"
        );
        assert_eq!(heartbeat_cache_key(&peer), "cilium/cache/heartbeat/eu-2");
        assert_eq!(
            state_canary_prefix(&peer),
            "cilium/synced/eu-2/cilium/state/"
        );
        assert_eq!(
            cache_canary_prefix(&peer),
            "cilium/synced/eu-2/cilium/cache/"
        );
        // The status is no kind's canary, and no kind's cache prefix holds the heartbeat.
        for kind in Kind::ALL {
            assert!(!peer_status_key(&peer).starts_with(&cache_canary_prefix(&peer)));
            assert!(!peer_status_key(&peer).starts_with(&kind.cache_canary_key(&peer)));
            assert!(!heartbeat_cache_key(&peer).starts_with(&kind.cache_prefix(&peer)));
            assert!(
                kind.state_canary_key(&peer)
                    .starts_with(&state_canary_prefix(&peer))
            );
            assert!(
                kind.cache_canary_key(&peer)
                    .starts_with(&cache_canary_prefix(&peer))
            );
        }
        assert!(matches!(
            parse_cache_key(&heartbeat_cache_key(&peer)),
            Err(KeyError::UnknownKind { .. })
        ));
    }

    #[test]
    fn kvstoremesh_key_refusals() {
        let status: &[(&str, &str)] = &[
            ("cilium/cache/eu-2/kvstoremesh/status", "UnknownPrefix"),
            ("cilium/synced/eu-2/kvstoremesh", "Shape"),
            ("cilium/synced/eu-2/kvstoremesh/status/", "Shape"),
            ("cilium/synced/eu-2/cilium/cache/nodes/v1", "Shape"),
            ("cilium/synced//kvstoremesh/status", "Name"),
            ("cilium/synced/EU/kvstoremesh/status", "Name"),
            ("cilium/synced/a/b/kvstoremesh/status", "Name"),
        ];
        for (key, variant) in status {
            let err = parse_peer_status_key(key).unwrap_err();
            assert!(format!("{err:?}").starts_with(variant), "{key}: {err:?}");
            assert!(err.to_string().contains(key), "{err}");
        }
        let heartbeat: &[(&str, &str)] = &[
            ("cilium/.heartbeat", "UnknownPrefix"),
            ("cilium/cache/heartbeats/eu-2", "UnknownPrefix"),
            ("cilium/cache/heartbeat/", "Name"),
            ("cilium/cache/heartbeat/eu-2/x", "Name"),
            ("cilium/cache/heartbeat/Eu-2", "Name"),
        ];
        for (key, variant) in heartbeat {
            let err = parse_heartbeat_cache_key(key).unwrap_err();
            assert!(format!("{err:?}").starts_with(variant), "{key}: {err:?}");
        }
    }

    proptest! {
        #[test]
        fn round_trip(key in state_key(), other in testutil::cluster_name()) {
            let text = key.to_string();
            prop_assert_eq!(parse_state_key(&text).unwrap(), key.clone());
            let peer = key.cluster().cloned().unwrap_or(other);
            let cache = to_cache_key(&key, &peer).unwrap();
            let parsed = parse_cache_key(&cache).unwrap();
            prop_assert_eq!(parsed.peer(), &peer);
            prop_assert_eq!(parsed.entry(), &key);
            prop_assert!(parse_state_key(&cache).is_err());
            prop_assert!(parse_cache_key(&text).is_err());
        }

        /// Whatever parses prints back to exactly the input: one entry, one key.
        #[test]
        fn parse_is_canonical(
            root in "cilium/(state|cache)/(nodes|services|identities|ip|serviceexports)/v1/",
            rest in "[a-z0-9./:-]{0,30}",
        ) {
            let key = format!("{root}{rest}");
            if let Ok(k) = parse_state_key(&key) { prop_assert_eq!(k.to_string(), key.clone()); }
            if let Ok(k) = parse_cache_key(&key) { prop_assert_eq!(k.to_string(), key); }
        }

        #[test]
        fn parse_never_panics(key in "\\PC{0,60}") {
            let _ = parse_state_key(&key);
            let _ = parse_cache_key(&key);
            let _ = parse_cluster_config_key(&key);
            let _ = parse_peer_status_key(&key);
            let _ = parse_heartbeat_cache_key(&key);
        }

        #[test]
        fn kvstoremesh_keys_round_trip(peer in testutil::cluster_name()) {
            prop_assert_eq!(parse_peer_status_key(&peer_status_key(&peer)).unwrap(), peer.clone());
            prop_assert_eq!(parse_heartbeat_cache_key(&heartbeat_cache_key(&peer)).unwrap(), peer);
        }
    }
}
