//! Every cluster's part (the local cluster's and each peer's) and the desired-state tables
//! kept up to date from them, incrementally.
//!
//! Each mutation ([`MeshState::set_local`], [`MeshState::replace_peer`],
//! [`MeshState::apply_peer_change`], [`MeshState::set_health`], [`MeshState::remove_peer`])
//! only notes which table keys it touched; [`MeshState::refresh`] recomputes those keys and
//! returns the table changes. A peer's update replaces only that peer's part, so only the
//! keys it touched are recomputed: a 300k-entry mesh is built once and then maintained at the
//! cost of what changed.
//!
//! Conflicts are settled by a fixed priority: the local cluster first, then peers by name. An
//! IP (or pod CIDR) claimed by several clusters belongs to the first claimant in that order.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use cluster_source::CiliumNetworkPolicy;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use model::{
    AddressKind, ClusterName, ClusterService, Entry, Identity, IpIdentity, IpPrefix, Label, Node,
    NumericIdentity, StateKey,
};
use serde::{Deserialize, Serialize};

use crate::merge::{ClusterHealth, ClusterPart, ServiceInput, merge_service};
use crate::policy::{PolicyInput, PolicyOptions, compile};
use crate::tables::{
    AffinityMode, Change, Frontend, IpcacheEntry, Keyed, RouteEntry, ServiceName, Table, Tables,
};

pub use peer_follow::EntryChange;

/// What one peer published, as far as the agent uses it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerPart {
    /// Nodes (for routes).
    #[serde(default)]
    pub nodes: Table<Node>,
    /// Global services.
    #[serde(default)]
    pub services: Table<ClusterService>,
    /// Identities (for policy).
    #[serde(default)]
    pub identities: Table<Identity>,
    /// IP → identity.
    #[serde(default)]
    pub ips: Table<IpIdentity>,
}

impl PeerPart {
    /// Entries of every kind together.
    pub fn len(&self) -> usize {
        self.nodes.len() + self.services.len() + self.identities.len() + self.ips.len()
    }

    /// Whether the part holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Adds or replaces `entry` (service exports are not used and ignored).
    pub fn upsert(&mut self, entry: Entry) {
        match entry {
            Entry::Node(v) => drop(self.nodes.insert(v)),
            Entry::Service(v) => drop(self.services.insert(v)),
            Entry::Identity(v) => drop(self.identities.insert(v)),
            Entry::Ip(v) => drop(self.ips.insert(v)),
            Entry::ServiceExport(_) => {}
        }
    }

    /// Removes the entry under `key`; says whether there was one.
    pub fn remove(&mut self, key: &StateKey) -> bool {
        match key {
            StateKey::Node { name, .. } => self.nodes.remove(name).is_some(),
            StateKey::Service {
                namespace, name, ..
            } => self
                .services
                .remove(&ServiceName {
                    namespace: namespace.clone(),
                    name: name.clone(),
                })
                .is_some(),
            StateKey::Identity { id } => self.identities.remove(id).is_some(),
            StateKey::Ip { ip } => self.ips.remove(ip).is_some(),
            StateKey::ServiceExport { .. } => false,
        }
    }
}

/// The tracker stages a peer's entries straight into the agent's tables.
impl peer_follow::Part for PeerPart {
    fn upsert(&mut self, entry: &Entry, _raw: &[u8]) {
        PeerPart::upsert(self, entry.clone());
    }

    fn remove(&mut self, key: &StateKey) -> bool {
        PeerPart::remove(self, key)
    }

    fn values(&self) -> Vec<(model::Kind, String, Vec<u8>)> {
        self.entries()
            .into_iter()
            .map(|e| (e.kind(), e.key().to_string(), e.encode()))
            .collect()
    }
}

impl PeerPart {
    /// Every entry held.
    pub fn entries(&self) -> Vec<Entry> {
        self.nodes
            .values()
            .cloned()
            .map(Entry::Node)
            .chain(self.services.values().cloned().map(Entry::Service))
            .chain(self.identities.values().cloned().map(Entry::Identity))
            .chain(self.ips.values().cloned().map(Entry::Ip))
            .collect()
    }
}

/// One of the local cluster's services, with how the local cluster treats it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalService {
    /// Frontends and every backend (shared or not: the local cluster always uses its own).
    pub service: ClusterService,
    /// Global here (the service and its namespace are): takes remote backends.
    pub global: bool,
    /// The local affinity annotation.
    pub affinity: AffinityMode,
}

impl Keyed for LocalService {
    type Key = ServiceName;
    fn key(&self) -> ServiceName {
        Keyed::key(&self.service)
    }
}

/// What the local cluster contributes, translated from its own objects.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LocalPart {
    /// Every service (global or not).
    #[serde(default)]
    pub services: Table<LocalService>,
    /// The local cluster's identities.
    #[serde(default)]
    pub identities: Table<Identity>,
    /// The local pods' IP → identity entries.
    #[serde(default)]
    pub ips: Table<IpIdentity>,
    /// Identities of the local endpoints policies apply to (the node's pods, or every local
    /// pod when the agent is not told its node).
    #[serde(default)]
    pub endpoints: BTreeSet<NumericIdentity>,
    /// Namespace labels by namespace.
    #[serde(default)]
    pub namespaces: BTreeMap<String, BTreeMap<String, String>>,
    /// Kubernetes network policies.
    #[serde(default)]
    pub network_policies: Vec<NetworkPolicy>,
    /// Cilium network policies.
    #[serde(default)]
    pub cilium_policies: Vec<CiliumNetworkPolicy>,
}

impl LocalPart {
    fn policy_inputs_equal(&self, other: &LocalPart) -> bool {
        self.identities == other.identities
            && self.endpoints == other.endpoints
            && self.namespaces == other.namespaces
            && self.network_policies == other.network_policies
            && self.cilium_policies == other.cilium_policies
    }
}

/// A peer's part and health.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerData {
    /// What the peer published.
    pub part: PeerPart,
    /// Whether its backends are trusted.
    pub health: ClusterHealth,
}

/// Who may own an IP or CIDR: the local cluster first, then peers by name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Owner {
    Local,
    Peer(ClusterName),
}

/// Keys to recompute: services by name, IPs and CIDRs by the owner whose claim on them
/// changed (a list per owner, so a peer's full replacement costs one entry per key).
#[derive(Debug, Default)]
struct Dirty {
    services: BTreeSet<ServiceName>,
    ips: BTreeMap<Owner, Vec<IpPrefix>>,
    routes: BTreeMap<ClusterName, Vec<IpPrefix>>,
    policy: bool,
}

impl Dirty {
    fn is_empty(&self) -> bool {
        self.services.is_empty() && self.ips.is_empty() && self.routes.is_empty() && !self.policy
    }
}

/// Every cluster's part and the tables derived from them. See the [module docs](self).
#[derive(Debug)]
pub struct MeshState {
    local_name: ClusterName,
    options: PolicyOptions,
    local: LocalPart,
    peers: BTreeMap<ClusterName, PeerData>,
    tables: Tables,
    frontends: BTreeMap<ServiceName, BTreeSet<Frontend>>,
    policy_warnings: Vec<String>,
    dirty: Dirty,
}

/// Keys whose entries differ between two tables (present in one only, or unequal).
fn changed_keys<E: Keyed + PartialEq>(old: &Table<E>, new: &Table<E>) -> Vec<E::Key> {
    let mut keys = Vec::new();
    let mut a = old.iter().peekable();
    let mut b = new.iter().peekable();
    loop {
        match (a.peek(), b.peek()) {
            (None, None) => return keys,
            (Some((k, _)), None) => {
                keys.push((*k).clone());
                a.next();
            }
            (None, Some((k, _))) => {
                keys.push((*k).clone());
                b.next();
            }
            (Some((ka, va)), Some((kb, vb))) => match ka.cmp(kb) {
                std::cmp::Ordering::Less => {
                    keys.push((*ka).clone());
                    a.next();
                }
                std::cmp::Ordering::Greater => {
                    keys.push((*kb).clone());
                    b.next();
                }
                std::cmp::Ordering::Equal => {
                    if va != vb {
                        keys.push((*ka).clone());
                    }
                    a.next();
                    b.next();
                }
            },
        }
    }
}

/// The node's first internal address, else its first address.
fn next_hop(node: &Node) -> Option<IpAddr> {
    node.addresses
        .iter()
        .find(|a| a.kind == AddressKind::InternalIp)
        .or_else(|| node.addresses.first())
        .map(|a| a.ip)
}

impl MeshState {
    /// An empty state for the local cluster `local_name`.
    pub fn new(local_name: ClusterName, options: PolicyOptions) -> Self {
        MeshState {
            local_name,
            options,
            local: LocalPart::default(),
            peers: BTreeMap::new(),
            tables: Tables::default(),
            frontends: BTreeMap::new(),
            policy_warnings: Vec::new(),
            dirty: Dirty::default(),
        }
    }

    /// The local cluster's name.
    pub fn local_name(&self) -> &ClusterName {
        &self.local_name
    }

    /// The local part.
    pub fn local(&self) -> &LocalPart {
        &self.local
    }

    /// A peer's part and health.
    pub fn peer(&self, name: &ClusterName) -> Option<&PeerData> {
        self.peers.get(name)
    }

    /// Every peer, by name.
    pub fn peers(&self) -> &BTreeMap<ClusterName, PeerData> {
        &self.peers
    }

    /// The tables as of the last [`refresh`](Self::refresh).
    pub fn tables(&self) -> &Tables {
        &self.tables
    }

    /// What the last policy compilation could not compile as written.
    pub fn policy_warnings(&self) -> &[String] {
        &self.policy_warnings
    }

    /// Replaces the local cluster's part.
    pub fn set_local(&mut self, new: LocalPart) {
        for name in changed_keys(&self.local.services, &new.services) {
            self.dirty.services.insert(name);
        }
        let changed = changed_keys(&self.local.ips, &new.ips);
        self.dirty
            .ips
            .entry(Owner::Local)
            .or_default()
            .extend(changed);
        if !self.local.policy_inputs_equal(&new) {
            self.dirty.policy = true;
        }
        self.local = new;
    }

    fn mark_node(dirty: &mut Dirty, peer: &ClusterName, node: Option<&Node>) {
        if let Some(node) = node {
            if let Some(list) = dirty.routes.get_mut(peer) {
                list.extend(node.pod_cidrs.iter().copied());
            } else {
                dirty.routes.insert(peer.clone(), node.pod_cidrs.clone());
            }
        }
    }

    /// Replaces a peer's whole part (after the peer's full resync); its health is kept, a
    /// new peer is healthy.
    pub fn replace_peer(&mut self, name: &ClusterName, part: PeerPart) {
        let data = self.peers.entry(name.clone()).or_default();
        let dirty = &mut self.dirty;
        for service in changed_keys(&data.part.services, &part.services) {
            dirty.services.insert(service);
        }
        let changed = changed_keys(&data.part.ips, &part.ips);
        dirty
            .ips
            .entry(Owner::Peer(name.clone()))
            .or_default()
            .extend(changed);
        for node in changed_keys(&data.part.nodes, &part.nodes) {
            Self::mark_node(dirty, name, data.part.nodes.get(&node));
            Self::mark_node(dirty, name, part.nodes.get(&node));
        }
        if data.part.identities != part.identities {
            dirty.policy = true;
        }
        data.part = part;
    }

    /// Applies one live change of a peer (creating the peer if needed).
    pub fn apply_peer_change(&mut self, name: &ClusterName, change: EntryChange) {
        let data = self.peers.entry(name.clone()).or_default();
        let dirty = &mut self.dirty;
        let owner = || Owner::Peer(name.clone());
        match change {
            EntryChange::Upsert {
                entry: Entry::Node(node),
                ..
            } => {
                Self::mark_node(dirty, name, Some(&node));
                let old = data.part.nodes.insert(node);
                Self::mark_node(dirty, name, old.as_ref());
            }
            EntryChange::Upsert {
                entry: Entry::Service(service),
                ..
            } => {
                dirty.services.insert(Keyed::key(&service));
                data.part.services.insert(service);
            }
            EntryChange::Upsert {
                entry: Entry::Identity(identity),
                ..
            } => {
                if data.part.identities.get(&identity.id) != Some(&identity) {
                    dirty.policy = true;
                    data.part.identities.insert(identity);
                }
            }
            EntryChange::Upsert {
                entry: Entry::Ip(ip),
                ..
            } => {
                dirty.ips.entry(owner()).or_default().push(ip.ip);
                data.part.ips.insert(ip);
            }
            EntryChange::Upsert {
                entry: Entry::ServiceExport(_),
                ..
            } => {}
            EntryChange::Delete(key) => {
                match &key {
                    StateKey::Node { name: node, .. } => {
                        Self::mark_node(dirty, name, data.part.nodes.get(node));
                    }
                    StateKey::Service {
                        namespace,
                        name: service,
                        ..
                    } => {
                        dirty.services.insert(ServiceName {
                            namespace: namespace.clone(),
                            name: service.clone(),
                        });
                    }
                    StateKey::Identity { id } => {
                        if data.part.identities.contains_key(id) {
                            dirty.policy = true;
                        }
                    }
                    StateKey::Ip { ip } => {
                        dirty.ips.entry(owner()).or_default().push(*ip);
                    }
                    StateKey::ServiceExport { .. } => {}
                }
                data.part.remove(&key);
            }
        }
    }

    /// Sets a peer's health; its services are recomputed when it changed.
    pub fn set_health(&mut self, name: &ClusterName, health: ClusterHealth) {
        let data = self.peers.entry(name.clone()).or_default();
        if data.health != health {
            data.health = health;
            for service in data.part.services.values() {
                self.dirty.services.insert(Keyed::key(service));
            }
        }
    }

    /// Forgets a peer and everything it published.
    pub fn remove_peer(&mut self, name: &ClusterName) {
        if self.peers.contains_key(name) {
            self.replace_peer(name, PeerPart::default());
            self.peers.remove(name);
        }
    }

    /// Recomputes every key touched since the last refresh; returns the table changes
    /// (upserts before deletes).
    pub fn refresh(&mut self) -> Vec<Change> {
        let dirty = std::mem::take(&mut self.dirty);
        if dirty.is_empty() {
            return Vec::new();
        }
        let mut upserts = Vec::new();
        let mut deletes = Vec::new();
        // Claims are settled one changed claimant at a time; each key's final entry is
        // reported once.
        let mut touched = BTreeSet::new();
        for (peer, prefixes) in &dirty.routes {
            for prefix in prefixes {
                if self.refresh_route(*prefix, peer) {
                    touched.insert(*prefix);
                }
            }
        }
        for prefix in touched {
            match self.tables.routes.get(&prefix) {
                Some(entry) => upserts.push(Change::UpsertRoute(entry.clone())),
                None => deletes.push(Change::DeleteRoute(prefix)),
            }
        }
        let mut touched = BTreeSet::new();
        for (owner, prefixes) in &dirty.ips {
            for prefix in prefixes {
                if self.refresh_ip(*prefix, owner) {
                    touched.insert(*prefix);
                }
            }
        }
        for prefix in touched {
            match self.tables.ipcache.get(&prefix) {
                Some(entry) => upserts.push(Change::UpsertIpcache(entry.clone())),
                None => deletes.push(Change::DeleteIpcache(prefix)),
            }
        }
        if dirty.policy {
            self.refresh_policy(&mut upserts, &mut deletes);
        }
        for service in &dirty.services {
            self.refresh_service(service, &mut upserts, &mut deletes);
        }
        upserts.extend(deletes);
        upserts
    }

    fn owner_of(&self, cluster: &ClusterName) -> Owner {
        if *cluster == self.local_name {
            Owner::Local
        } else {
            Owner::Peer(cluster.clone())
        }
    }

    fn ip_claim(&self, owner: &Owner, prefix: &IpPrefix) -> Option<&IpIdentity> {
        match owner {
            Owner::Local => self.local.ips.get(prefix),
            Owner::Peer(name) => self.peers.get(name)?.part.ips.get(prefix),
        }
    }

    /// Settles `prefix` after `changed`'s claim on it changed: the owner is the first
    /// claimant (local, then peers by name). Only the previous owner and the changed claimant
    /// can be it, unless the previous owner lost its claim; only then is every cluster
    /// scanned. Exact when each changed claim is settled in turn. Says whether the table
    /// changed.
    fn refresh_ip(&mut self, prefix: IpPrefix, changed: &Owner) -> bool {
        let current = self
            .tables
            .ipcache
            .get(&prefix)
            .map(|e| self.owner_of(&e.cluster));
        let claims = |o: &Owner| self.ip_claim(o, &prefix).is_some();
        let owner = match current {
            Some(c) if claims(&c) => Some(if claims(changed) && *changed < c {
                changed.clone()
            } else {
                c
            }),
            Some(_) => {
                if self.local.ips.contains_key(&prefix) {
                    Some(Owner::Local)
                } else {
                    self.peers
                        .iter()
                        .find(|(_, d)| d.part.ips.contains_key(&prefix))
                        .map(|(n, _)| Owner::Peer(n.clone()))
                }
            }
            None => claims(changed).then(|| changed.clone()),
        };
        let entry = owner.as_ref().and_then(|o| {
            self.ip_claim(o, &prefix).map(|v| IpcacheEntry {
                prefix,
                identity: v.identity,
                cluster: v.cluster.clone(),
                host_ip: v.host_ip,
            })
        });
        match entry {
            Some(entry) => {
                if self.tables.ipcache.get(&prefix) == Some(&entry) {
                    return false;
                }
                self.tables.ipcache.insert(entry);
                true
            }
            None => self.tables.ipcache.remove(&prefix).is_some(),
        }
    }

    fn route_claim(&self, peer: &ClusterName, prefix: &IpPrefix) -> Option<&Node> {
        self.peers
            .get(peer)?
            .part
            .nodes
            .values()
            .find(|n| n.pod_cidrs.contains(prefix))
    }

    /// Settles a route like [`refresh_ip`](Self::refresh_ip) settles an IP.
    fn refresh_route(&mut self, prefix: IpPrefix, changed: &ClusterName) -> bool {
        let current = self.tables.routes.get(&prefix).map(|e| e.cluster.clone());
        let claims = |p: &ClusterName| self.route_claim(p, &prefix).is_some();
        let owner = match current {
            Some(c) if claims(&c) => Some(if claims(changed) && *changed < c {
                changed.clone()
            } else {
                c
            }),
            Some(_) => self.peers.keys().find(|n| claims(n)).cloned(),
            None => claims(changed).then(|| changed.clone()),
        };
        let entry = owner.and_then(|peer| {
            self.route_claim(&peer, &prefix).map(|node| RouteEntry {
                prefix,
                cluster: peer.clone(),
                node: node.name.clone(),
                via: next_hop(node),
            })
        });
        match entry {
            Some(entry) => {
                if self.tables.routes.get(&prefix) == Some(&entry) {
                    return false;
                }
                self.tables.routes.insert(entry);
                true
            }
            None => self.tables.routes.remove(&prefix).is_some(),
        }
    }

    fn refresh_policy(&mut self, upserts: &mut Vec<Change>, deletes: &mut Vec<Change>) {
        let mut identities: BTreeMap<NumericIdentity, &[Label]> = BTreeMap::new();
        for data in self.peers.values() {
            for identity in data.part.identities.values() {
                identities.insert(identity.id, &identity.labels);
            }
        }
        for identity in self.local.identities.values() {
            identities.insert(identity.id, &identity.labels);
        }
        let compiled = compile(PolicyInput {
            local_cluster: &self.local_name,
            local_endpoints: &self.local.endpoints,
            identities: &identities,
            namespaces: &self.local.namespaces,
            network_policies: &self.local.network_policies,
            cilium_policies: &self.local.cilium_policies,
            options: self.options,
        });
        let desired = Tables {
            policy: compiled.allow,
            enforcement: compiled.enforcement,
            ..Tables::default()
        };
        let current = Tables {
            policy: std::mem::take(&mut self.tables.policy),
            enforcement: std::mem::take(&mut self.tables.enforcement),
            ..Tables::default()
        };
        for change in crate::tables::diff(&desired, &current) {
            if change.is_upsert() {
                upserts.push(change);
            } else {
                deletes.push(change);
            }
        }
        self.tables.policy = desired.policy;
        self.tables.enforcement = desired.enforcement;
        self.policy_warnings = compiled.warnings;
    }

    fn refresh_service(
        &mut self,
        name: &ServiceName,
        upserts: &mut Vec<Change>,
        deletes: &mut Vec<Change>,
    ) {
        let entries = match self.local.services.get(name) {
            None => Vec::new(),
            Some(local) => {
                let mut parts = vec![ClusterPart {
                    cluster: &self.local_name,
                    local: true,
                    health: ClusterHealth::Healthy,
                    service: &local.service,
                }];
                if local.global {
                    for (peer, data) in &self.peers {
                        if let Some(service) = data.part.services.get(name) {
                            parts.push(ClusterPart {
                                cluster: peer,
                                local: false,
                                health: data.health,
                                service,
                            });
                        }
                    }
                }
                merge_service(&ServiceInput {
                    name,
                    frontends: &local.service.frontends,
                    global: local.global,
                    affinity: local.affinity,
                    parts: &parts,
                })
            }
        };
        let new_frontends: BTreeSet<Frontend> = entries.iter().map(|e| e.frontend).collect();
        for frontend in self.frontends.remove(name).unwrap_or_default() {
            if !new_frontends.contains(&frontend)
                && self
                    .tables
                    .services
                    .get(&frontend)
                    .is_some_and(|e| &e.service == name)
            {
                self.tables.services.remove(&frontend);
                deletes.push(Change::DeleteService(frontend));
            }
        }
        for entry in entries {
            if self.tables.services.get(&entry.frontend) != Some(&entry) {
                upserts.push(Change::UpsertService(entry.clone()));
                self.tables.services.insert(entry);
            }
        }
        if !new_frontends.is_empty() {
            self.frontends.insert(name.clone(), new_frontends);
        }
    }

    /// The tables of a local part and peer parts, built from scratch (every peer healthy
    /// unless listed in `stale`).
    pub fn build(
        local_name: ClusterName,
        options: PolicyOptions,
        local: LocalPart,
        peers: impl IntoIterator<Item = (ClusterName, PeerPart)>,
    ) -> Tables {
        let mut state = MeshState::new(local_name, options);
        state.set_local(local);
        for (name, part) in peers {
            state.replace_peer(&name, part);
        }
        state.refresh();
        state.tables
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::merge::tests::{backend, service};
    use model::{ClusterId, DnsLabel, DnsSubdomain, NodeAddress, SchemaVersion};
    use proptest::collection::{btree_map, vec};
    use proptest::prelude::*;
    use std::net::Ipv4Addr;

    fn name(i: u8) -> ClusterName {
        ClusterName::new(format!("c{i}")).unwrap()
    }

    fn ip_entry(cluster: &ClusterName, id: u16, octet: u8, local_part: u32) -> IpIdentity {
        IpIdentity {
            schema: SchemaVersion,
            ip: IpPrefix::host(IpAddr::V4(Ipv4Addr::new(10, 9, 0, octet))),
            identity: NumericIdentity::new((u32::from(id) << 16) | local_part).unwrap(),
            host_ip: None,
            namespace: None,
            pod_name: None,
            cluster: cluster.clone(),
        }
    }

    fn node(cluster: &ClusterName, id: u16, n: u8, cidrs: &[u8]) -> Node {
        Node {
            schema: SchemaVersion,
            name: DnsSubdomain::new(format!("n{n}")).unwrap(),
            cluster: cluster.clone(),
            cluster_id: ClusterId::try_from(id).unwrap(),
            addresses: vec![NodeAddress {
                kind: AddressKind::InternalIp,
                ip: IpAddr::V4(Ipv4Addr::new(192, 0, 2, n)),
            }],
            pod_cidrs: cidrs
                .iter()
                .map(|c| IpPrefix::new(IpAddr::V4(Ipv4Addr::new(10, *c, 0, 0)), 16).unwrap())
                .collect(),
            labels: BTreeMap::new(),
        }
    }

    /// A generated peer part: ip octets (shared pool so clusters collide), nodes with CIDRs,
    /// and backends of one global service.
    #[derive(Clone, Debug)]
    struct GenPart {
        ips: BTreeMap<u8, u32>,
        nodes: BTreeMap<u8, Vec<u8>>,
        backends: Option<BTreeMap<u8, bool>>,
    }

    fn gen_part() -> impl Strategy<Value = GenPart> {
        (
            btree_map(0u8..10, 256u32..260, 0..5),
            btree_map(0u8..4, vec(0u8..8, 0..3), 0..3),
            proptest::option::of(btree_map(0u8..5, any::<bool>(), 0..3)),
        )
            .prop_map(|(ips, nodes, backends)| GenPart {
                ips,
                nodes,
                backends,
            })
    }

    fn to_part(i: u8, g: &GenPart) -> PeerPart {
        let cluster = name(i);
        let id = u16::from(i) + 1;
        let mut part = PeerPart::default();
        for (octet, local) in &g.ips {
            part.ips.insert(ip_entry(&cluster, id, *octet, *local));
        }
        for (n, cidrs) in &g.nodes {
            let mut cidrs = cidrs.clone();
            cidrs.sort();
            cidrs.dedup();
            part.nodes.insert(node(&cluster, id, *n, &cidrs));
        }
        if let Some(backends) = &g.backends {
            part.services.insert(service(
                &cluster,
                id,
                true,
                backends
                    .iter()
                    .map(|(o, ready)| {
                        (
                            IpAddr::V4(Ipv4Addr::new(10, i, 1, *o)),
                            backend(*ready, true, false),
                        )
                    })
                    .collect(),
            ));
        }
        part
    }

    fn local_part() -> LocalPart {
        let local = name(0);
        let svc = service(
            &local,
            1,
            true,
            BTreeMap::from([(
                IpAddr::V4(Ipv4Addr::new(10, 0, 1, 1)),
                backend(false, false, false),
            )]),
        );
        let mut part = LocalPart::default();
        part.services.insert(LocalService {
            service: svc,
            global: true,
            affinity: AffinityMode::None,
        });
        part.ips.insert(ip_entry(&local, 1, 3, 300));
        part
    }

    #[derive(Clone, Debug)]
    enum Op {
        Replace(u8, GenPart),
        Remove(u8),
        Health(u8, bool),
        Upsert(u8, GenPart),
        Delete(u8, u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (1u8..4, gen_part()).prop_map(|(i, g)| Op::Replace(i, g)),
            (1u8..4).prop_map(Op::Remove),
            (1u8..4, any::<bool>()).prop_map(|(i, s)| Op::Health(i, s)),
            (1u8..4, gen_part()).prop_map(|(i, g)| Op::Upsert(i, g)),
            (1u8..4, 0u8..10).prop_map(|(i, o)| Op::Delete(i, o)),
        ]
    }

    /// The owner of each IP by brute force: local first, then peers by name.
    fn reference_ipcache(
        local: &LocalPart,
        peers: &BTreeMap<ClusterName, PeerData>,
    ) -> Vec<(IpPrefix, ClusterName)> {
        let mut out: BTreeMap<IpPrefix, ClusterName> = BTreeMap::new();
        for v in local.ips.values() {
            out.insert(v.ip, v.cluster.clone());
        }
        for data in peers.values() {
            for v in data.part.ips.values() {
                out.entry(v.ip).or_insert_with(|| v.cluster.clone());
            }
        }
        out.into_iter().collect()
    }

    proptest! {
        /// Whatever sequence of updates, removals and health changes, the incrementally
        /// maintained tables equal the tables built from scratch from the final parts, the
        /// changes returned by each refresh turn the previous tables into the new ones, and
        /// ipcache ownership follows the priority rule.
        #[test]
        fn incremental_equals_full_build(ops in vec(op(), 1..12)) {
            let mut state = MeshState::new(name(0), PolicyOptions::default());
            state.set_local(local_part());
            state.refresh();
            for op in ops {
                let before = state.tables().clone();
                match op {
                    Op::Replace(i, g) => state.replace_peer(&name(i), to_part(i, &g)),
                    Op::Remove(i) => state.remove_peer(&name(i)),
                    Op::Health(i, stale) => state.set_health(
                        &name(i),
                        if stale { ClusterHealth::Stale } else { ClusterHealth::Healthy },
                    ),
                    Op::Upsert(i, g) => {
                        for entry in to_part(i, &g).entries() {
                            state.apply_peer_change(
                                &name(i),
                                EntryChange::Upsert { raw: entry.encode(), entry },
                            );
                        }
                    }
                    Op::Delete(i, octet) => state.apply_peer_change(
                        &name(i),
                        EntryChange::Delete(StateKey::Ip {
                            ip: IpPrefix::host(IpAddr::V4(Ipv4Addr::new(10, 9, 0, octet))),
                        }),
                    ),
                }
                let changes = state.refresh();
                let mut applied = before;
                applied.apply(&changes);
                prop_assert_eq!(&applied, state.tables());
                let mut fresh = MeshState::new(name(0), PolicyOptions::default());
                fresh.set_local(state.local().clone());
                for (peer, data) in state.peers() {
                    fresh.replace_peer(peer, data.part.clone());
                    fresh.set_health(peer, data.health);
                }
                fresh.refresh();
                prop_assert_eq!(fresh.tables(), state.tables());
                let owners: Vec<(IpPrefix, ClusterName)> = state
                    .tables()
                    .ipcache
                    .values()
                    .map(|e| (e.prefix, e.cluster.clone()))
                    .collect();
                prop_assert_eq!(owners, reference_ipcache(state.local(), state.peers()));
            }
        }
    }

    #[test]
    fn non_global_local_service_takes_no_remote_backends() {
        let mut local = local_part();
        let key = ServiceName {
            namespace: DnsLabel::new("shop").unwrap(),
            name: DnsLabel::new("web").unwrap(),
        };
        let mut svc = local.services.get(&key).unwrap().clone();
        svc.global = false;
        local.services.insert(svc);
        let g = GenPart {
            ips: BTreeMap::new(),
            nodes: BTreeMap::new(),
            backends: Some(BTreeMap::from([(1, true)])),
        };
        let tables = MeshState::build(
            name(0),
            PolicyOptions::default(),
            local,
            [(name(1), to_part(1, &g))],
        );
        let entry = tables.services.values().next().unwrap();
        assert!(entry.backends.is_empty(), "{entry:?}");
    }

    #[test]
    fn routes_and_removal() {
        let g = GenPart {
            ips: BTreeMap::new(),
            nodes: BTreeMap::from([(1, vec![5]), (2, vec![6])]),
            backends: None,
        };
        let mut state = MeshState::new(name(0), PolicyOptions::default());
        state.replace_peer(&name(1), to_part(1, &g));
        state.refresh();
        let routes: Vec<String> = state
            .tables()
            .routes
            .values()
            .map(|r| format!("{} {} {:?}", r.prefix, r.node, r.via))
            .collect();
        assert_eq!(
            routes,
            [
                "10.5.0.0/16 n1 Some(192.0.2.1)",
                "10.6.0.0/16 n2 Some(192.0.2.2)"
            ]
        );
        state.remove_peer(&name(1));
        let changes = state.refresh();
        assert_eq!(changes.len(), 2);
        assert!(state.tables().routes.is_empty());
    }
}
