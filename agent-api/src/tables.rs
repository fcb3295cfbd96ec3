//! The desired-state tables as plain data, and the diff that turns (desired, actual) into the
//! changes a datapath applies.
//!
//! - [`Tables::services`]: frontend (VIP, port, protocol) → ordered backend list, each backend
//!   with its cluster and state.
//! - [`Tables::ipcache`]: IP or prefix → security identity and owning cluster.
//! - [`Tables::policy`]: (direction, local endpoint identity, peer identity, port, protocol) →
//!   allowed, with the policies that allow it; [`Tables::enforcement`] lists the local
//!   identities under default-deny per direction.
//! - [`Tables::routes`]: every remote node's pod CIDR → the node to send it to.
//!
//! [`diff`] compares two tables in one ordered pass; [`Tables::apply`] applies its result, so
//! `apply(actual, diff(desired, actual)) == desired` (see the property tests).

use std::collections::BTreeMap;
use std::collections::btree_map;
use std::fmt;
use std::net::IpAddr;

use model::{ClusterName, DnsLabel, DnsSubdomain, IpPrefix, L4Protocol, NumericIdentity, Protocol};
use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A value that carries its own key, so a table of them is a map that serializes as a list.
pub trait Keyed {
    /// The key: ordered, so tables and their diffs have one order.
    type Key: Ord + Clone + fmt::Debug;

    /// The value's key.
    fn key(&self) -> Self::Key;
}

/// A map of [`Keyed`] values by their key; serialized as the list of values in key order.
pub struct Table<E: Keyed> {
    entries: BTreeMap<E::Key, E>,
}

impl<E: Keyed> Table<E> {
    /// An empty table.
    pub fn new() -> Self {
        Table {
            entries: BTreeMap::new(),
        }
    }

    /// Inserts `entry` under its key; returns the entry it replaced.
    pub fn insert(&mut self, entry: E) -> Option<E> {
        self.entries.insert(entry.key(), entry)
    }

    /// Removes the entry under `key`.
    pub fn remove(&mut self, key: &E::Key) -> Option<E> {
        self.entries.remove(key)
    }

    /// The entry under `key`.
    pub fn get(&self, key: &E::Key) -> Option<&E> {
        self.entries.get(key)
    }

    /// Whether an entry is under `key`.
    pub fn contains_key(&self, key: &E::Key) -> bool {
        self.entries.contains_key(key)
    }

    /// Entries in key order.
    pub fn values(&self) -> btree_map::Values<'_, E::Key, E> {
        self.entries.values()
    }

    /// Keys and entries in key order.
    pub fn iter(&self) -> btree_map::Iter<'_, E::Key, E> {
        self.entries.iter()
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Keeps only the entries for which `keep` is true.
    pub fn retain(&mut self, mut keep: impl FnMut(&E) -> bool) {
        self.entries.retain(|_, e| keep(e));
    }
}

impl<E: Keyed> Default for Table<E> {
    fn default() -> Self {
        Table::new()
    }
}

impl<E: Keyed + Clone> Clone for Table<E> {
    fn clone(&self) -> Self {
        Table {
            entries: self.entries.clone(),
        }
    }
}

impl<E: Keyed + PartialEq> PartialEq for Table<E> {
    fn eq(&self, other: &Self) -> bool {
        self.entries == other.entries
    }
}

impl<E: Keyed + Eq> Eq for Table<E> {}

impl<E: Keyed + fmt::Debug> fmt::Debug for Table<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.entries.values()).finish()
    }
}

impl<E: Keyed> FromIterator<E> for Table<E> {
    fn from_iter<I: IntoIterator<Item = E>>(iter: I) -> Self {
        let mut table = Table::new();
        for entry in iter {
            table.insert(entry);
        }
        table
    }
}

impl<'a, E: Keyed> IntoIterator for &'a Table<E> {
    type Item = &'a E;
    type IntoIter = btree_map::Values<'a, E::Key, E>;

    fn into_iter(self) -> Self::IntoIter {
        self.entries.values()
    }
}

impl<E: Keyed + Serialize> Serialize for Table<E> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.entries.values())
    }
}

impl<'de, E: Keyed + Deserialize<'de>> Deserialize<'de> for Table<E> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let list = Vec::<E>::deserialize(deserializer)?;
        let mut table = Table::new();
        for entry in list {
            let key = entry.key();
            if table.insert(entry).is_some() {
                return Err(D::Error::custom(format_args!(
                    "two entries with the key {key:?}"
                )));
            }
        }
        Ok(table)
    }
}

/// A Kubernetes service's namespace and name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ServiceName {
    /// The namespace.
    pub namespace: DnsLabel,
    /// The name.
    pub name: DnsLabel,
}

impl fmt::Display for ServiceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Which backends a global service prefers; `none` is exactly the absent annotation.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum AffinityMode {
    /// Every backend alike.
    #[default]
    None,
    /// Local backends; healthy remote ones only when no local backend is active.
    Local,
    /// Remote backends; healthy local ones only when no remote backend is active.
    Remote,
}

impl From<model::Affinity> for AffinityMode {
    fn from(affinity: model::Affinity) -> Self {
        match affinity {
            model::Affinity::None => AffinityMode::None,
            model::Affinity::Local => AffinityMode::Local,
            model::Affinity::Remote => AffinityMode::Remote,
        }
    }
}

impl fmt::Display for AffinityMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AffinityMode::None => "none",
            AffinityMode::Local => "local",
            AffinityMode::Remote => "remote",
        })
    }
}

/// What clients connect to: a service VIP, port and protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Frontend {
    /// The VIP (a cluster IP).
    pub ip: IpAddr,
    /// The port.
    pub port: u16,
    /// The protocol.
    pub protocol: Protocol,
}

impl fmt::Display for Frontend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let protocol = protocol_name(self.protocol);
        match self.ip {
            IpAddr::V4(ip) => write!(f, "{ip}:{}/{protocol}", self.port),
            IpAddr::V6(ip) => write!(f, "[{ip}]:{}/{protocol}", self.port),
        }
    }
}

/// `TCP`, `UDP` or `SCTP`.
pub fn protocol_name(protocol: Protocol) -> &'static str {
    match protocol {
        Protocol::Tcp => "TCP",
        Protocol::Udp => "UDP",
        Protocol::Sctp => "SCTP",
    }
}

/// Why a backend is in a service's list.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendState {
    /// Ready, in a healthy cluster.
    Active,
    /// Terminating but still serving, in a healthy cluster: used only while no active
    /// backend is eligible.
    Terminating,
    /// In a cluster lost for longer than the grace period: used only while nothing healthier
    /// is eligible.
    Stale,
}

impl fmt::Display for BackendState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BackendState::Active => "active",
            BackendState::Terminating => "terminating",
            BackendState::Stale => "stale",
        })
    }
}

/// One backend of a frontend.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ServiceBackend {
    /// The backend's address.
    pub ip: IpAddr,
    /// The backend's port for this frontend.
    pub port: u16,
    /// The cluster the backend runs in.
    pub cluster: ClusterName,
    /// Why it is used.
    pub state: BackendState,
}

/// A frontend and the backends traffic to it is balanced over (all of them alike; the list is
/// ordered: local cluster first, then by cluster name, address and port).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ServiceEntry {
    /// The frontend.
    pub frontend: Frontend,
    /// The service it belongs to.
    pub service: ServiceName,
    /// The service port's name (`""` for an unnamed port).
    pub port_name: String,
    /// Whether the service is global in the local cluster (takes remote backends).
    pub global: bool,
    /// The local cluster's affinity for the service.
    pub affinity: AffinityMode,
    /// The backends, in order; empty when none is usable.
    pub backends: Vec<ServiceBackend>,
}

impl Keyed for ServiceEntry {
    type Key = Frontend;
    fn key(&self) -> Frontend {
        self.frontend
    }
}

// What the agent keeps of each cluster's published entries is tables too, keyed as the
// store keys them (the cluster aside).

impl Keyed for model::Node {
    type Key = DnsSubdomain;
    fn key(&self) -> DnsSubdomain {
        self.name.clone()
    }
}

impl Keyed for model::ClusterService {
    type Key = ServiceName;
    fn key(&self) -> ServiceName {
        ServiceName {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
        }
    }
}

impl Keyed for model::Identity {
    type Key = NumericIdentity;
    fn key(&self) -> NumericIdentity {
        self.id
    }
}

impl Keyed for model::IpIdentity {
    type Key = IpPrefix;
    fn key(&self) -> IpPrefix {
        self.ip
    }
}

/// An address (or prefix) and the identity its traffic carries.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct IpcacheEntry {
    /// The address or prefix.
    pub prefix: IpPrefix,
    /// The security identity.
    pub identity: NumericIdentity,
    /// The cluster that published it.
    pub cluster: ClusterName,
    /// The node hosting the address, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_ip: Option<IpAddr>,
}

impl Keyed for IpcacheEntry {
    type Key = IpPrefix;
    fn key(&self) -> IpPrefix {
        self.prefix
    }
}

/// Which way traffic flows, seen from the local endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// Into the local endpoint.
    Ingress,
    /// Out of the local endpoint.
    Egress,
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        })
    }
}

/// The peer identity that stands for every peer (a rule without peer selectors).
pub const ANY_IDENTITY: u32 = 0;

/// The port that stands for every port.
pub const ANY_PORT: u16 = 0;

/// What one allow entry matches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PolicyKey {
    /// Ingress or egress.
    pub direction: Direction,
    /// The local endpoint's identity.
    pub local_identity: NumericIdentity,
    /// The peer's identity; [`ANY_IDENTITY`] for any peer.
    pub peer_identity: NumericIdentity,
    /// The destination port; [`ANY_PORT`] for any port.
    pub port: u16,
    /// The protocol; `ANY` for any.
    pub protocol: L4Protocol,
}

/// An allowed (direction, local identity, peer identity, port, protocol).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PolicyEntry {
    /// What is allowed.
    #[serde(flatten)]
    pub key: PolicyKey,
    /// The policies allowing it (`NetworkPolicy shop/allow-web`), sorted.
    pub policies: Vec<String>,
}

impl Keyed for PolicyEntry {
    type Key = PolicyKey;
    fn key(&self) -> PolicyKey {
        self.key
    }
}

/// A local identity whose traffic in one direction is denied unless a policy entry allows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct EnforcementEntry {
    /// Ingress or egress.
    pub direction: Direction,
    /// The local endpoint's identity.
    pub local_identity: NumericIdentity,
}

impl Keyed for EnforcementEntry {
    type Key = EnforcementEntry;
    fn key(&self) -> EnforcementEntry {
        *self
    }
}

/// A remote node's pod CIDR and where to send it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RouteEntry {
    /// The pod CIDR.
    pub prefix: IpPrefix,
    /// The node's cluster.
    pub cluster: ClusterName,
    /// The node.
    pub node: DnsSubdomain,
    /// The node's first internal address (else its first address), the next hop.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub via: Option<IpAddr>,
}

impl Keyed for RouteEntry {
    type Key = IpPrefix;
    fn key(&self) -> IpPrefix {
        self.prefix
    }
}

/// Every desired-state table.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tables {
    /// Services: frontend → backends.
    #[serde(default)]
    pub services: Table<ServiceEntry>,
    /// IP → identity.
    #[serde(default)]
    pub ipcache: Table<IpcacheEntry>,
    /// Allowed traffic.
    #[serde(default)]
    pub policy: Table<PolicyEntry>,
    /// Local identities under default-deny.
    #[serde(default)]
    pub enforcement: Table<EnforcementEntry>,
    /// Routes to remote pod CIDRs.
    #[serde(default)]
    pub routes: Table<RouteEntry>,
}

/// How many entries each table holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableCounts {
    /// Frontends.
    pub services: usize,
    /// Backends over every frontend.
    pub backends: usize,
    /// IP entries.
    pub ipcache: usize,
    /// Allow entries.
    pub policy: usize,
    /// Enforced (identity, direction) pairs.
    pub enforcement: usize,
    /// Routes.
    pub routes: usize,
}

impl Tables {
    /// The size of every table.
    pub fn counts(&self) -> TableCounts {
        TableCounts {
            services: self.services.len(),
            backends: self.services.values().map(|s| s.backends.len()).sum(),
            ipcache: self.ipcache.len(),
            policy: self.policy.len(),
            enforcement: self.enforcement.len(),
            routes: self.routes.len(),
        }
    }

    /// Applies `changes` in order.
    pub fn apply(&mut self, changes: &[Change]) {
        for change in changes {
            match change {
                Change::UpsertService(e) => drop(self.services.insert(e.clone())),
                Change::DeleteService(k) => drop(self.services.remove(k)),
                Change::UpsertIpcache(e) => drop(self.ipcache.insert(e.clone())),
                Change::DeleteIpcache(k) => drop(self.ipcache.remove(k)),
                Change::UpsertPolicy(e) => drop(self.policy.insert(e.clone())),
                Change::DeletePolicy(k) => drop(self.policy.remove(k)),
                Change::UpsertEnforcement(e) => drop(self.enforcement.insert(*e)),
                Change::DeleteEnforcement(k) => drop(self.enforcement.remove(k)),
                Change::UpsertRoute(e) => drop(self.routes.insert(e.clone())),
                Change::DeleteRoute(k) => drop(self.routes.remove(k)),
            }
        }
    }
}

/// One change to one table entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Change {
    /// Add or replace a frontend.
    UpsertService(ServiceEntry),
    /// Remove a frontend.
    DeleteService(Frontend),
    /// Add or replace an ipcache entry.
    UpsertIpcache(IpcacheEntry),
    /// Remove an ipcache entry.
    DeleteIpcache(IpPrefix),
    /// Add or replace an allow entry.
    UpsertPolicy(PolicyEntry),
    /// Remove an allow entry.
    DeletePolicy(PolicyKey),
    /// Put a local identity under default-deny in one direction.
    UpsertEnforcement(EnforcementEntry),
    /// Lift default-deny for a local identity in one direction.
    DeleteEnforcement(EnforcementEntry),
    /// Add or replace a route.
    UpsertRoute(RouteEntry),
    /// Remove a route.
    DeleteRoute(IpPrefix),
}

impl Change {
    /// Whether the change adds or replaces an entry (rather than removing one).
    pub fn is_upsert(&self) -> bool {
        matches!(
            self,
            Change::UpsertService(_)
                | Change::UpsertIpcache(_)
                | Change::UpsertPolicy(_)
                | Change::UpsertEnforcement(_)
                | Change::UpsertRoute(_)
        )
    }
}

/// The changes that turn `actual` into `desired`: every entry of `desired` that `actual` lacks
/// or holds differently is upserted, every key of `actual` that `desired` lacks is deleted.
/// Empty when the tables are equal.
///
/// Order: for a datapath that applies changes one by one, routes and ipcache entries come
/// before the policy and services that may refer to them, and within each table upserts come
/// before deletes, so nothing is ever briefly missing.
pub fn diff(desired: &Tables, actual: &Tables) -> Vec<Change> {
    let mut upserts = Vec::new();
    let mut deletes = Vec::new();
    diff_table(
        &desired.routes,
        &actual.routes,
        &mut upserts,
        &mut deletes,
        Change::UpsertRoute,
        Change::DeleteRoute,
    );
    diff_table(
        &desired.ipcache,
        &actual.ipcache,
        &mut upserts,
        &mut deletes,
        Change::UpsertIpcache,
        Change::DeleteIpcache,
    );
    diff_table(
        &desired.policy,
        &actual.policy,
        &mut upserts,
        &mut deletes,
        Change::UpsertPolicy,
        Change::DeletePolicy,
    );
    diff_table(
        &desired.enforcement,
        &actual.enforcement,
        &mut upserts,
        &mut deletes,
        Change::UpsertEnforcement,
        Change::DeleteEnforcement,
    );
    diff_table(
        &desired.services,
        &actual.services,
        &mut upserts,
        &mut deletes,
        Change::UpsertService,
        Change::DeleteService,
    );
    upserts.extend(deletes);
    upserts
}

/// One ordered merge-join over both tables.
fn diff_table<E: Keyed + Clone + PartialEq>(
    desired: &Table<E>,
    actual: &Table<E>,
    upserts: &mut Vec<Change>,
    deletes: &mut Vec<Change>,
    upsert: fn(E) -> Change,
    delete: fn(E::Key) -> Change,
) {
    let mut want = desired.entries.iter().peekable();
    let mut have = actual.entries.iter().peekable();
    loop {
        match (want.peek(), have.peek()) {
            (None, None) => return,
            (Some((_, w)), None) => {
                upserts.push(upsert((*w).clone()));
                want.next();
            }
            (None, Some((k, _))) => {
                deletes.push(delete((*k).clone()));
                have.next();
            }
            (Some((wk, w)), Some((hk, h))) => match wk.cmp(hk) {
                std::cmp::Ordering::Less => {
                    upserts.push(upsert((*w).clone()));
                    want.next();
                }
                std::cmp::Ordering::Greater => {
                    deletes.push(delete((*hk).clone()));
                    have.next();
                }
                std::cmp::Ordering::Equal => {
                    if w != h {
                        upserts.push(upsert((*w).clone()));
                    }
                    want.next();
                    have.next();
                }
            },
        }
    }
}

/// Generators of small tables with overlapping keys, for property tests here and in the
/// crates that program them.
#[cfg(any(test, feature = "proptest"))]
pub mod strategies {
    use super::*;
    use proptest::collection::{btree_map, vec};
    use proptest::prelude::*;
    use std::net::Ipv4Addr;

    /// Cluster `c<i>`.
    pub fn cluster(i: u8) -> ClusterName {
        ClusterName::new(format!("c{i}")).unwrap()
    }

    /// Identity `v`; panics unless it is a valid identity.
    pub fn identity(v: u32) -> NumericIdentity {
        NumericIdentity::new(v).unwrap()
    }

    /// `10.0.0.<v>`.
    pub fn ip(v: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(10, 0, 0, v))
    }

    fn service_entry() -> impl Strategy<Value = ServiceEntry> {
        (
            0u8..6,
            1u16..4,
            vec((0u8..8, 1u16..3, 0u8..3, 0usize..3), 0..4),
            any::<bool>(),
        )
            .prop_map(|(vip, port, backends, global)| ServiceEntry {
                frontend: Frontend {
                    ip: IpAddr::V4(Ipv4Addr::new(10, 96, 0, vip)),
                    port,
                    protocol: Protocol::Tcp,
                },
                service: ServiceName {
                    namespace: DnsLabel::new("ns").unwrap(),
                    name: DnsLabel::new(format!("s{vip}")).unwrap(),
                },
                port_name: String::new(),
                global,
                affinity: AffinityMode::None,
                backends: backends
                    .into_iter()
                    .map(|(b, p, c, s)| ServiceBackend {
                        ip: ip(b),
                        port: p,
                        cluster: cluster(c),
                        state: [
                            BackendState::Active,
                            BackendState::Terminating,
                            BackendState::Stale,
                        ][s],
                    })
                    .collect(),
            })
    }

    fn ipcache_entry() -> impl Strategy<Value = IpcacheEntry> {
        (0u8..12, 256u32..260, 0u8..3).prop_map(|(a, id, c)| IpcacheEntry {
            prefix: IpPrefix::host(ip(a)),
            identity: identity(id),
            cluster: cluster(c),
            host_ip: None,
        })
    }

    fn policy_entry() -> impl Strategy<Value = PolicyEntry> {
        (
            any::<bool>(),
            256u32..259,
            0u32..3,
            0u16..3,
            vec("[ab]", 1..3),
        )
            .prop_map(|(ingress, local, peer, port, policies)| PolicyEntry {
                key: PolicyKey {
                    direction: if ingress {
                        Direction::Ingress
                    } else {
                        Direction::Egress
                    },
                    local_identity: identity(local),
                    peer_identity: identity(peer),
                    port,
                    protocol: L4Protocol::Tcp,
                },
                policies,
            })
    }

    fn route_entry() -> impl Strategy<Value = RouteEntry> {
        (0u8..8, 0u8..3, 0u8..3).prop_map(|(a, c, n)| RouteEntry {
            prefix: IpPrefix::new(IpAddr::V4(Ipv4Addr::new(10, a, 0, 0)), 16).unwrap(),
            cluster: cluster(c),
            node: DnsSubdomain::new(format!("node-{n}")).unwrap(),
            via: Some(ip(n)),
        })
    }

    /// Every table, a few entries each.
    pub fn tables() -> impl Strategy<Value = Tables> {
        (
            vec(service_entry(), 0..6),
            vec(ipcache_entry(), 0..8),
            vec(policy_entry(), 0..8),
            btree_map((any::<bool>(), 256u32..260), Just(()), 0..4),
            vec(route_entry(), 0..5),
        )
            .prop_map(|(s, i, p, e, r)| Tables {
                services: s.into_iter().collect(),
                ipcache: i.into_iter().collect(),
                policy: p.into_iter().collect(),
                enforcement: e
                    .into_keys()
                    .map(|(ingress, id)| EnforcementEntry {
                        direction: if ingress {
                            Direction::Ingress
                        } else {
                            Direction::Egress
                        },
                        local_identity: identity(id),
                    })
                    .collect(),
                routes: r.into_iter().collect(),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::strategies::*;
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Applying the diff to actual yields desired.
        #[test]
        fn diff_then_apply_yields_desired(desired in tables(), actual in tables()) {
            let changes = diff(&desired, &actual);
            let mut applied = actual.clone();
            applied.apply(&changes);
            prop_assert_eq!(&applied, &desired);
            // Minimal: one change per differing key, none for an equal entry.
            for change in &changes {
                let redundant = match change {
                    Change::UpsertService(e) => actual.services.get(&e.key()) == Some(e),
                    Change::UpsertIpcache(e) => actual.ipcache.get(&e.key()) == Some(e),
                    Change::UpsertPolicy(e) => actual.policy.get(&e.key()) == Some(e),
                    Change::UpsertEnforcement(e) => actual.enforcement.get(e).is_some(),
                    Change::UpsertRoute(e) => actual.routes.get(&e.key()) == Some(e),
                    Change::DeleteService(k) => desired.services.contains_key(k),
                    Change::DeleteIpcache(k) => desired.ipcache.contains_key(k),
                    Change::DeletePolicy(k) => desired.policy.contains_key(k),
                    Change::DeleteEnforcement(k) => desired.enforcement.contains_key(k),
                    Change::DeleteRoute(k) => desired.routes.contains_key(k),
                };
                prop_assert!(!redundant, "redundant change {:?}", change);
            }
            // Upserts before deletes.
            let first_delete = changes.iter().position(|c| !c.is_upsert()).unwrap_or(changes.len());
            prop_assert!(changes[first_delete..].iter().all(|c| !c.is_upsert()));
        }

        /// Equal tables give an empty diff.
        #[test]
        fn diff_of_equal_is_empty(tables in tables()) {
            prop_assert!(diff(&tables, &tables).is_empty());
            prop_assert!(diff(&tables, &tables.clone()).is_empty());
        }

        /// Tables survive JSON (the persisted state and the API use it).
        #[test]
        fn json_round_trip(tables in tables()) {
            let text = serde_json::to_string(&tables).unwrap();
            let back: Tables = serde_json::from_str(&text).unwrap();
            prop_assert_eq!(back, tables);
        }
    }

    #[test]
    fn duplicate_keys_are_refused() {
        let entry = IpcacheEntry {
            prefix: IpPrefix::host(ip(1)),
            identity: identity(256),
            cluster: cluster(1),
            host_ip: None,
        };
        let text = serde_json::to_string(&vec![entry.clone(), entry]).unwrap();
        let err = serde_json::from_str::<Table<IpcacheEntry>>(&text).unwrap_err();
        assert!(err.to_string().contains("two entries"), "{err}");
    }

    #[test]
    fn frontend_display() {
        let v4 = Frontend {
            ip: ip(1),
            port: 80,
            protocol: Protocol::Tcp,
        };
        assert_eq!(v4.to_string(), "10.0.0.1:80/TCP");
        let v6 = Frontend {
            ip: "fd00::1".parse().unwrap(),
            port: 53,
            protocol: Protocol::Udp,
        };
        assert_eq!(v6.to_string(), "[fd00::1]:53/UDP");
    }
}
