//! One peer's state machine, fed with what a watcher read (from the peer's own store or from
//! kvstoremesh's cache of it), and the one gate between a peer's store and what a follower
//! does with it. It does no I/O: [`session`](crate::session) drives it against a store, and
//! its tests drive it with signals.
//!
//! ```text
//!   Waiting ──config accepted──▶ Listing ──full listing + every canary──▶ Synced
//!      ▲                            ▲                                       │
//!      │                            └──canary deleted / relist──────────────┘
//!   Refused ◀──config refused (from any phase)
//! ```
//!
//! Entries are validated with [`model::validate_entry`] against the peer's accepted config
//! and collected in a staging part. Nothing of a peer is used before it is synced: the first
//! [`PeerUpdate::Replace`] carries its full state. While synced, each change goes out as a
//! [`PeerUpdate::Change`]. A relist (or a deleted canary) takes the peer back to Listing: the
//! follower keeps using the last published part, unchanged, and replaces it with the new
//! staging part only once the resync is complete. What a part holds is the follower's
//! business ([`Part`]): the agent keeps its tables. So stale entries are garbage-collected only after a
//! full resync, never on a disconnect.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use model::keys::{parse_heartbeat_cache_key, parse_peer_status_key};
use model::{
    ClusterConfig, ClusterName, Entry, EntryError, Kind, PeerStatus, Phase, StateKey, error_chain,
    validate_entry, validate_key,
};

use crate::{Claims, ConfigGate, Verdict};

/// One change to one entry of a peer, as a watcher saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EntryChange {
    /// The entry was written (validated).
    Upsert {
        /// The entry.
        entry: Entry,
        /// Its value as the peer wrote it (kvstoremesh mirrors these bytes, not a re-encoding
        /// that would drop fields a newer peer added).
        raw: Vec<u8>,
    },
    /// The entry was deleted.
    Delete(StateKey),
}

/// Where a follower keeps a peer's validated entries: the staging part while (re)listing,
/// published whole once the peer is synced.
pub trait Part: Clone + Default + std::fmt::Debug {
    /// Adds or replaces `entry`, whose value the peer wrote as `raw`.
    fn upsert(&mut self, entry: &Entry, raw: &[u8]);
    /// Removes the entry under `key`; says whether there was one.
    fn remove(&mut self, key: &StateKey) -> bool;
    /// Every entry held as (kind, store key, value), to validate them again against a
    /// changed config.
    fn values(&self) -> Vec<(Kind, String, Vec<u8>)>;
}

/// Why a peer's store is listed (again).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ListReason {
    /// The first listing of this follower.
    Initial,
    /// The revision to resume from is compacted.
    Compacted,
    /// The store is not the one the resume point belongs to.
    StoreReplaced,
}

impl ListReason {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            ListReason::Initial => "initial",
            ListReason::Compacted => "compacted",
            ListReason::StoreReplaced => "store-replaced",
        }
    }
}

/// Where a peer's state is read from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// The peer's own store: `cilium/state/...`, canaries `cilium/synced/<peer>/cilium/state/...`.
    Direct,
    /// kvstoremesh's cache in the local store: `cilium/cache/<kind>/v1/<peer>/...`, canaries
    /// `cilium/synced/<peer>/cilium/cache/...`, its status of the peer and the mirrored
    /// heartbeat.
    Cache,
}

/// What a watcher saw about one peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Signal {
    /// The peer's cluster config was written (`Some`) or deleted (`None`).
    Config(Option<Vec<u8>>),
    /// A sync canary of `kind` appeared or disappeared.
    Canary {
        /// The kind.
        kind: Kind,
        /// Whether the canary exists now.
        present: bool,
    },
    /// An entry of `kind` under `key` was written (`Some`) or deleted (`None`).
    Entry {
        /// The kind, from the prefix.
        kind: Kind,
        /// The store key.
        key: String,
        /// The value.
        value: Option<Vec<u8>>,
    },
    /// The peer's heartbeat was written (`Some`, checked short UTF-8 text for direct reads)
    /// or deleted.
    Heartbeat(Option<Vec<u8>>),
    /// kvstoremesh's status of the peer was written (`Some`) or deleted (`None`).
    MeshStatus(Option<Vec<u8>>),
}

impl Signal {
    /// Signals about the peer's completeness are applied before the entries of the same
    /// revision: a canary deleted together with the entries (a lease that expired) freezes the
    /// peer before the deletions could reach the agent's state.
    pub fn order(&self) -> u8 {
        match self {
            Signal::Config(_) | Signal::Canary { .. } | Signal::MeshStatus(_) => 0,
            Signal::Entry { .. } | Signal::Heartbeat(_) => 1,
        }
    }
}

/// What a watcher tells its follower.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerUpdate<P> {
    /// The peer is (or no longer is) configured: a peer file exists, or kvstoremesh caches it.
    Configured {
        /// The peer.
        peer: ClusterName,
        /// Whether it is configured.
        configured: bool,
    },
    /// The peer's cluster config was accepted, or refused with the reason.
    Config {
        /// The peer.
        peer: ClusterName,
        /// The accepted config, or why it is refused.
        config: Result<ClusterConfig, String>,
        /// The config's value as the peer wrote it.
        raw: Vec<u8>,
    },
    /// A full listing of the peer starts (nothing changes for the follower until the
    /// listing's [`PeerUpdate::Replace`]).
    Listing {
        /// The peer.
        peer: ClusterName,
        /// Why.
        reason: ListReason,
    },
    /// The peer's phase changed.
    Phase {
        /// The peer.
        peer: ClusterName,
        /// The new phase.
        phase: Phase,
    },
    /// The peer's full state after a complete (re)sync: replaces its part.
    Replace {
        /// The peer.
        peer: ClusterName,
        /// Its full state.
        part: P,
    },
    /// One change while synced.
    Change {
        /// The peer.
        peer: ClusterName,
        /// The change.
        change: EntryChange,
    },
    /// The connection to the peer (direct) or kvstoremesh's connection to it (cache) went up
    /// or down.
    Link {
        /// The peer.
        peer: ClusterName,
        /// Whether it is up.
        connected: bool,
        /// Why it went down.
        error: Option<LinkError>,
        /// How long the peer had been silent when it was found down (zero: just now).
        silent: Duration,
    },
    /// The peer's heartbeat was written (`Some`) or deleted.
    Heartbeat {
        /// The peer.
        peer: ClusterName,
        /// Its value.
        value: Option<Vec<u8>>,
    },
    /// An entry of the peer was refused.
    Invalid {
        /// The peer.
        peer: ClusterName,
        /// The entry's kind.
        kind: Kind,
        /// Why (names the key).
        error: String,
    },
    /// Whether the follower can see its peers at all (cache mode: the local store connection).
    SourceLink {
        /// Whether it can.
        connected: bool,
    },
}

/// Why a link to a peer is down.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LinkError {
    /// The peer's store cannot be reached or read.
    Store(String),
    /// The peer's store answers, but the peer has no usable cluster config: none published,
    /// or a refused one.
    Config(String),
    /// The peer file cannot be used.
    File(String),
}

impl LinkError {
    /// The error's text.
    pub fn text(&self) -> &str {
        match self {
            LinkError::Store(t) | LinkError::Config(t) | LinkError::File(t) => t,
        }
    }

    /// The error's text, owned.
    pub fn into_text(self) -> String {
        match self {
            LinkError::Store(t) | LinkError::Config(t) | LinkError::File(t) => t,
        }
    }
}

impl std::fmt::Display for LinkError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.text())
    }
}

/// One peer's state machine; see the [module docs](self).
#[derive(Debug)]
pub struct PeerTracker<P> {
    peer: ClusterName,
    layout: Layout,
    /// The peer's accepted config (claiming its id among direct peers; kvstoremesh has
    /// already done that for its cache).
    gate: ConfigGate,
    /// Why the peer's config is refused (`None`: it is not).
    refusal: Option<String>,
    /// The kinds followed: the agent uses the core kinds, kvstoremesh mirrors every kind.
    kinds: &'static [Kind],
    canaries: BTreeSet<Kind>,
    staging: P,
    /// Entries read while no config was accepted: key → (kind, value).
    unvalidated: BTreeMap<String, (Kind, Vec<u8>)>,
    listing: bool,
    synced: bool,
    mesh_status_seen: bool,
    /// An entry was refused in a way a changed config would explain: look at the config now.
    probe_soon: bool,
}

impl<P: Part> PeerTracker<P> {
    /// A tracker for `peer`, read with `layout`, checked against the local cluster's config.
    pub fn new(peer: ClusterName, layout: Layout, local: ClusterConfig) -> Self {
        PeerTracker {
            gate: ConfigGate::new(peer.clone(), local, None),
            peer,
            layout,
            refusal: None,
            kinds: &Kind::CORE,
            canaries: BTreeSet::new(),
            staging: P::default(),
            unvalidated: BTreeMap::new(),
            listing: false,
            synced: false,
            mesh_status_seen: false,
            probe_soon: false,
        }
    }

    /// The same tracker, refusing a peer whose cluster id another peer in `claims` holds.
    pub fn with_claims(self, claims: Arc<Claims>) -> Self {
        PeerTracker {
            gate: self.gate.with_claims(claims),
            ..self
        }
    }

    /// The same tracker, following `kinds` (the core kinds by default). Service exports are
    /// waited for only from a peer whose config says it publishes them.
    pub fn with_kinds(self, kinds: &'static [Kind]) -> Self {
        PeerTracker { kinds, ..self }
    }

    /// The peer.
    pub fn peer(&self) -> &ClusterName {
        &self.peer
    }

    /// The current phase.
    pub fn phase(&self) -> Phase {
        if self.refusal.is_some() {
            Phase::Refused
        } else if self.gate.accepted().is_none() {
            Phase::Waiting
        } else if self.synced {
            Phase::Synced
        } else {
            Phase::Listing
        }
    }

    /// Why the peer's config is refused, if it is.
    pub fn refusal(&self) -> Option<&str> {
        self.refusal.as_deref()
    }

    /// The accepted config.
    pub fn config(&self) -> Option<&ClusterConfig> {
        self.gate.accepted()
    }

    /// The entries collected so far (complete once synced).
    pub fn staging(&self) -> &P {
        &self.staging
    }

    /// Whether an entry was refused since the last call for a reason a changed cluster config
    /// would explain (a foreign cluster id, an identity out of range): the driver then reads
    /// the config at once instead of at the next probe tick.
    pub fn take_probe_soon(&mut self) -> bool {
        std::mem::take(&mut self.probe_soon)
    }

    fn phase_changed(&self, before: Phase, out: &mut Vec<PeerUpdate<P>>) {
        let phase = self.phase();
        if phase != before {
            out.push(PeerUpdate::Phase {
                peer: self.peer.clone(),
                phase,
            });
        }
    }

    /// A full listing of everything the peer holds follows; every entry and canary is
    /// signalled again. Until [`end_listing`](Self::end_listing), nothing is published.
    pub fn begin_listing(&mut self, reason: ListReason, out: &mut Vec<PeerUpdate<P>>) {
        let before = self.phase();
        out.push(PeerUpdate::Listing {
            peer: self.peer.clone(),
            reason,
        });
        self.listing = true;
        self.synced = false;
        self.canaries.clear();
        self.staging = P::default();
        self.unvalidated.clear();
        self.phase_changed(before, out);
    }

    /// Hands the published part out whole again, if the peer is synced: the follower lost
    /// what it made of it.
    pub fn republish(&mut self, out: &mut Vec<PeerUpdate<P>>) {
        if self.synced {
            out.push(PeerUpdate::Replace {
                peer: self.peer.clone(),
                part: self.staging.clone(),
            });
        }
    }

    /// The listing is complete; publishes the peer if every canary is there.
    pub fn end_listing(&mut self, out: &mut Vec<PeerUpdate<P>>) {
        self.listing = false;
        self.try_publish(out);
    }

    fn required_canaries(&self) -> bool {
        let Some(config) = self.gate.accepted() else {
            return false;
        };
        if self.layout == Layout::Direct && !config.capabilities.sync_canaries {
            return true;
        }
        self.kinds
            .iter()
            .filter(|k| **k != Kind::ServiceExports || config.capabilities.service_exports)
            .all(|k| self.canaries.contains(k))
    }

    fn try_publish(&mut self, out: &mut Vec<PeerUpdate<P>>) {
        if self.synced || self.listing || self.refusal.is_some() || self.gate.accepted().is_none() {
            return;
        }
        if !self.required_canaries() {
            return;
        }
        let before = self.phase();
        self.synced = true;
        out.push(PeerUpdate::Replace {
            peer: self.peer.clone(),
            part: self.staging.clone(),
        });
        self.phase_changed(before, out);
    }

    /// Applies one signal.
    pub fn handle(&mut self, signal: Signal, out: &mut Vec<PeerUpdate<P>>) {
        match signal {
            Signal::Config(Some(value)) => self.config_written(&value, out),
            Signal::Config(None) => {
                // kvstoremesh deletes it when it stops caching the peer; entries stay valid
                // against the last config, and what happens to them is for their own
                // deletions and the canaries to say.
                tracing::debug!(peer = %self.peer, "the peer's cluster config was deleted");
            }
            Signal::Canary { kind, present } => {
                if present {
                    self.canaries.insert(kind);
                    self.try_publish(out);
                } else if self.canaries.remove(&kind) && self.synced {
                    let before = self.phase();
                    self.synced = false;
                    tracing::info!(peer = %self.peer, %kind, "sync canary deleted; keeping the last state until the peer resyncs");
                    self.phase_changed(before, out);
                }
            }
            Signal::Entry { kind, key, value } => self.entry(kind, key, value, out),
            Signal::Heartbeat(value) => out.push(PeerUpdate::Heartbeat {
                peer: self.peer.clone(),
                value,
            }),
            Signal::MeshStatus(value) => {
                self.mesh_status_seen = true;
                let status = value.map(|v| PeerStatus::decode_for(&self.peer, &v));
                let (connected, error, silent) = match status {
                    Some(Ok(s)) => (
                        s.connected,
                        s.last_error,
                        Duration::from_millis(s.silent_ms.unwrap_or(0)),
                    ),
                    Some(Err(e)) => (
                        false,
                        Some(format!("kvstoremesh's status of the peer is unusable: {e}")),
                        Duration::ZERO,
                    ),
                    None => (
                        false,
                        Some("kvstoremesh has no status for the peer".to_owned()),
                        Duration::ZERO,
                    ),
                };
                out.push(PeerUpdate::Link {
                    peer: self.peer.clone(),
                    connected,
                    error: if connected {
                        None
                    } else {
                        error.map(LinkError::Store)
                    },
                    silent: if connected { Duration::ZERO } else { silent },
                });
            }
        }
    }

    fn config_written(&mut self, value: &[u8], out: &mut Vec<PeerUpdate<P>>) {
        let before = self.phase();
        match self.gate.offer(value) {
            Ok(Verdict::Unchanged) => return,
            Ok(Verdict::Accepted { .. }) => {
                let Some(config) = self.gate.accepted().cloned() else {
                    return;
                };
                let was_synced = self.synced;
                self.refusal = None;
                self.revalidate(out);
                out.push(PeerUpdate::Config {
                    peer: self.peer.clone(),
                    config: Ok(config),
                    raw: value.to_vec(),
                });
                if self.layout == Layout::Cache && !self.mesh_status_seen {
                    // No kvstoremesh status (yet): judge the peer by its heartbeat alone.
                    out.push(PeerUpdate::Link {
                        peer: self.peer.clone(),
                        connected: true,
                        error: None,
                        silent: Duration::ZERO,
                    });
                }
                if was_synced {
                    out.push(PeerUpdate::Replace {
                        peer: self.peer.clone(),
                        part: self.staging.clone(),
                    });
                } else {
                    self.try_publish(out);
                }
            }
            Err(refusal) => {
                let error = error_chain(&refusal);
                tracing::warn!(peer = %self.peer, %error, "peer refused; nothing of it is used");
                // Keep the entries (unvalidated) in case the config is fixed.
                let staged = std::mem::take(&mut self.staging);
                for (kind, key, value) in staged.values() {
                    self.unvalidated.insert(key, (kind, value));
                }
                self.refusal = Some(error.clone());
                self.synced = false;
                out.push(PeerUpdate::Config {
                    peer: self.peer.clone(),
                    config: Err(error),
                    raw: value.to_vec(),
                });
            }
        }
        self.phase_changed(before, out);
    }

    /// Checks every held entry against the (new) config.
    fn revalidate(&mut self, out: &mut Vec<PeerUpdate<P>>) {
        let staged = std::mem::take(&mut self.staging);
        let mut pending = std::mem::take(&mut self.unvalidated);
        for (kind, key, value) in staged.values() {
            pending.insert(key, (kind, value));
        }
        for (key, (kind, value)) in pending {
            self.accept(kind, &key, value, out);
        }
    }

    /// Validates and stages one written entry; a refused one counts as a deletion of what was
    /// known for the key.
    fn accept(
        &mut self,
        kind: Kind,
        key: &str,
        value: Vec<u8>,
        out: &mut Vec<PeerUpdate<P>>,
    ) -> Option<EntryChange> {
        let config = self.gate.accepted()?;
        match validate_entry(kind, key, &value, config) {
            Ok(entry) => {
                self.staging.upsert(&entry, &value);
                Some(EntryChange::Upsert { entry, raw: value })
            }
            Err(error) => {
                if matches!(
                    error,
                    EntryError::ForeignClusterId { .. } | EntryError::IdentityOutOfRange { .. }
                ) {
                    self.probe_soon = true;
                }
                out.push(PeerUpdate::Invalid {
                    peer: self.peer.clone(),
                    kind,
                    error: error.to_string(),
                });
                let state = validate_key(kind, key, config).ok()?;
                self.staging
                    .remove(&state)
                    .then_some(EntryChange::Delete(state))
            }
        }
    }

    fn entry(
        &mut self,
        kind: Kind,
        key: String,
        value: Option<Vec<u8>>,
        out: &mut Vec<PeerUpdate<P>>,
    ) {
        if !self.kinds.contains(&kind) {
            return;
        }
        let usable = self.gate.accepted().is_some() && self.refusal.is_none();
        let change = match (value, usable) {
            (Some(value), false) => {
                self.unvalidated.insert(key, (kind, value));
                None
            }
            (None, false) => {
                self.unvalidated.remove(&key);
                None
            }
            (Some(value), true) => self.accept(kind, &key, value, out),
            (None, true) => {
                let state = self
                    .gate
                    .accepted()
                    .and_then(|config| validate_key(kind, &key, config).ok());
                state.and_then(|state| {
                    self.staging
                        .remove(&state)
                        .then_some(EntryChange::Delete(state))
                })
            }
        };
        if let Some(change) = change
            && self.synced
            && !self.listing
        {
            out.push(PeerUpdate::Change {
                peer: self.peer.clone(),
                change,
            });
        }
    }
}

/// What a key in a store being read is, for one of the layouts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeyClass {
    /// `cilium/cluster-config/<peer>`.
    Config(ClusterName),
    /// A sync canary of `peer`.
    Canary(ClusterName, Kind),
    /// An entry of `kind` (the peer is in the key for cache keys; direct keys are read from
    /// one peer's store).
    Entry(Option<ClusterName>, Kind),
    /// The heartbeat (of the store's cluster for direct reads, of `peer` in the cache).
    Heartbeat(Option<ClusterName>),
    /// kvstoremesh's status of `peer`.
    MeshStatus(ClusterName),
}

fn cluster(segment: &str) -> Option<ClusterName> {
    ClusterName::new(segment).ok()
}

/// Classifies a key read with `layout`; `None` for keys the agent does not use.
pub fn classify(layout: Layout, key: &str) -> Option<KeyClass> {
    use model::keys::{CACHE_ROOT, CLUSTER_CONFIG_ROOT, HEARTBEAT_KEY, STATE_ROOT, SYNCED_ROOT};
    if let Some(name) = key.strip_prefix(CLUSTER_CONFIG_ROOT) {
        return cluster(name).map(KeyClass::Config);
    }
    if let Some(rest) = key.strip_prefix(SYNCED_ROOT) {
        if layout == Layout::Cache
            && let Ok(peer) = parse_peer_status_key(key)
        {
            return Some(KeyClass::MeshStatus(peer));
        }
        let (peer, rest) = rest.split_once('/')?;
        let peer = cluster(peer)?;
        let root = match layout {
            Layout::Direct => STATE_ROOT,
            Layout::Cache => CACHE_ROOT,
        };
        let kind = rest.strip_prefix(root)?.strip_suffix("/v1")?;
        return Kind::from_name(kind).map(|k| KeyClass::Canary(peer, k));
    }
    match layout {
        Layout::Direct => {
            if key == HEARTBEAT_KEY {
                return Some(KeyClass::Heartbeat(None));
            }
            let rest = key.strip_prefix(STATE_ROOT)?;
            let (kind, _) = rest.split_once('/')?;
            Kind::from_name(kind).map(|k| KeyClass::Entry(None, k))
        }
        Layout::Cache => {
            let rest = key.strip_prefix(CACHE_ROOT)?;
            if let Ok(peer) = parse_heartbeat_cache_key(key) {
                return Some(KeyClass::Heartbeat(Some(peer)));
            }
            let (kind, rest) = rest.split_once('/')?;
            let kind = Kind::from_name(kind)?;
            let rest = rest.strip_prefix("v1/")?;
            let (peer, _) = rest.split_once('/')?;
            cluster(peer).map(|p| KeyClass::Entry(Some(p), kind))
        }
    }
}

/// The signal a key's change gives, with the peer it concerns (`None`: the store's own
/// cluster, for direct reads).
pub fn signal_of(
    layout: Layout,
    key: String,
    value: Option<Vec<u8>>,
) -> Option<(Option<ClusterName>, Signal)> {
    Some(match classify(layout, &key)? {
        KeyClass::Config(peer) => (Some(peer), Signal::Config(value)),
        KeyClass::Canary(peer, kind) => (
            Some(peer),
            Signal::Canary {
                kind,
                present: value.is_some(),
            },
        ),
        KeyClass::Entry(peer, kind) => (peer, Signal::Entry { kind, key, value }),
        KeyClass::Heartbeat(peer) => (peer, Signal::Heartbeat(value)),
        KeyClass::MeshStatus(peer) => (Some(peer), Signal::MeshStatus(value)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use model::StoreValue;
    use model::keys::{HEARTBEAT_KEY, heartbeat_cache_key, peer_status_key};
    use model::{Capabilities, ClusterId, DnsSubdomain, MaxConnectedClusters, Node, SchemaVersion};

    /// Entries by key, as a follower might keep them.
    #[derive(Clone, Debug, Default, PartialEq, Eq)]
    struct Entries(BTreeMap<StateKey, Entry>);

    impl Part for Entries {
        fn upsert(&mut self, entry: &Entry, _raw: &[u8]) {
            self.0.insert(entry.key(), entry.clone());
        }
        fn remove(&mut self, key: &StateKey) -> bool {
            self.0.remove(key).is_some()
        }
        fn values(&self) -> Vec<(Kind, String, Vec<u8>)> {
            self.0
                .values()
                .map(|e| (e.kind(), e.key().to_string(), e.encode()))
                .collect()
        }
    }

    type PeerTracker = super::PeerTracker<Entries>;
    type PeerUpdate = super::PeerUpdate<Entries>;

    fn name(s: &str) -> ClusterName {
        ClusterName::new(s).unwrap()
    }

    fn config(n: &str, id: u16) -> ClusterConfig {
        ClusterConfig::new(
            name(n),
            ClusterId::try_from(id).unwrap(),
            MaxConnectedClusters::Max255,
            Capabilities {
                sync_canaries: true,
                cached: false,
                service_exports: false,
            },
        )
        .unwrap()
    }

    fn node(peer: &str, id: u16, n: &str) -> Node {
        Node {
            schema: SchemaVersion,
            name: DnsSubdomain::new(n).unwrap(),
            cluster: name(peer),
            cluster_id: ClusterId::try_from(id).unwrap(),
            addresses: vec![],
            pod_cidrs: vec![],
            labels: BTreeMap::new(),
        }
    }

    fn node_signal(layout: Layout, node: &Node, present: bool) -> Signal {
        let key = match layout {
            Layout::Direct => node.key().to_string(),
            Layout::Cache => model::to_cache_key(&node.key(), &node.cluster).unwrap(),
        };
        Signal::Entry {
            kind: Kind::Nodes,
            key,
            value: present.then(|| node.encode()),
        }
    }

    fn canaries(tracker: &mut PeerTracker, out: &mut Vec<PeerUpdate>) {
        for kind in Kind::CORE {
            tracker.handle(
                Signal::Canary {
                    kind,
                    present: true,
                },
                out,
            );
        }
    }

    fn replaces(out: &[PeerUpdate]) -> Vec<usize> {
        out.iter()
            .filter_map(|u| match u {
                PeerUpdate::Replace { part, .. } => Some(part.0.len()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn nothing_before_config_and_canaries() {
        for layout in [Layout::Direct, Layout::Cache] {
            let mut t = PeerTracker::new(name("b"), layout, config("a", 1));
            let mut out = Vec::new();
            t.begin_listing(ListReason::Initial, &mut out);
            t.handle(node_signal(layout, &node("b", 2, "n1"), true), &mut out);
            t.end_listing(&mut out);
            assert_eq!(t.phase(), Phase::Waiting);
            t.handle(Signal::Config(Some(config("b", 2).encode())), &mut out);
            assert_eq!(t.phase(), Phase::Listing);
            assert!(replaces(&out).is_empty(), "no canaries yet");
            canaries(&mut t, &mut out);
            assert_eq!(t.phase(), Phase::Synced);
            assert_eq!(
                replaces(&out),
                vec![1],
                "the entry read before the config counts"
            );
            // Live changes now.
            out.clear();
            t.handle(node_signal(layout, &node("b", 2, "n2"), true), &mut out);
            t.handle(node_signal(layout, &node("b", 2, "n1"), false), &mut out);
            let changes: Vec<_> = out
                .iter()
                .filter(|u| matches!(u, PeerUpdate::Change { .. }))
                .collect();
            assert_eq!(changes.len(), 2, "{out:?}");
        }
    }

    /// Direct reads used to accept two peers with one cluster id (kvstoremesh refused the
    /// second); now the second is refused until the first gives the id up.
    #[test]
    fn direct_peers_cannot_share_a_cluster_id() {
        let claims = Arc::new(Claims::default());
        let tracker = |peer: &str| {
            PeerTracker::new(name(peer), Layout::Direct, config("a", 1)).with_claims(claims.clone())
        };
        let (mut b, mut c) = (tracker("b"), tracker("c"));
        let mut out = Vec::new();
        b.handle(Signal::Config(Some(config("b", 2).encode())), &mut out);
        assert_eq!(b.phase(), Phase::Listing);
        out.clear();
        c.handle(Signal::Config(Some(config("c", 2).encode())), &mut out);
        assert_eq!(c.phase(), Phase::Refused);
        let refusal = out.iter().find_map(|u| match u {
            PeerUpdate::Config { config: Err(e), .. } => Some(e.clone()),
            _ => None,
        });
        assert_eq!(
            refusal.as_deref(),
            Some("peer c uses cluster id 2, which peer b already uses; refused")
        );
        // b moves to id 3: c's next read of its config is accepted.
        b.handle(Signal::Config(Some(config("b", 3).encode())), &mut out);
        c.handle(Signal::Config(Some(config("c", 2).encode())), &mut out);
        assert_eq!(c.phase(), Phase::Listing);
        // A refused peer gives its id up: b refused (its name is ours), c keeps 2, and d may
        // take 3.
        b.handle(Signal::Config(Some(config("a", 3).encode())), &mut out);
        assert_eq!(b.phase(), Phase::Refused);
        let mut d = tracker("d");
        d.handle(Signal::Config(Some(config("d", 3).encode())), &mut out);
        assert_eq!(d.phase(), Phase::Listing);
    }

    #[test]
    fn relist_freezes_until_complete_then_collects_garbage() {
        let mut t = PeerTracker::new(name("b"), Layout::Direct, config("a", 1));
        let mut out = Vec::new();
        t.handle(Signal::Config(Some(config("b", 2).encode())), &mut out);
        t.begin_listing(ListReason::Initial, &mut out);
        for n in ["n1", "n2"] {
            t.handle(
                node_signal(Layout::Direct, &node("b", 2, n), true),
                &mut out,
            );
        }
        canaries(&mut t, &mut out);
        t.end_listing(&mut out);
        assert_eq!(replaces(&out), vec![2]);
        out.clear();
        // Relist: n2 is gone, the canaries come late.
        t.begin_listing(ListReason::Initial, &mut out);
        t.handle(
            node_signal(Layout::Direct, &node("b", 2, "n1"), true),
            &mut out,
        );
        t.end_listing(&mut out);
        assert!(
            replaces(&out).is_empty()
                && !out.iter().any(|u| matches!(u, PeerUpdate::Change { .. })),
            "nothing changes before the resync is complete: {out:?}"
        );
        canaries(&mut t, &mut out);
        assert_eq!(
            replaces(&out),
            vec![1],
            "the resync replaces the part, dropping n2"
        );
    }

    #[test]
    fn canary_deleted_with_entries_freezes_the_peer() {
        let mut t = PeerTracker::new(name("b"), Layout::Cache, config("a", 1));
        let mut out = Vec::new();
        t.handle(Signal::Config(Some(config("b", 2).encode())), &mut out);
        t.handle(
            node_signal(Layout::Cache, &node("b", 2, "n1"), true),
            &mut out,
        );
        canaries(&mut t, &mut out);
        out.clear();
        // One revision: the canary and the entry deleted (a lease expired); canaries first.
        let mut batch = vec![
            node_signal(Layout::Cache, &node("b", 2, "n1"), false),
            Signal::Canary {
                kind: Kind::Nodes,
                present: false,
            },
        ];
        batch.sort_by_key(Signal::order);
        for s in batch {
            t.handle(s, &mut out);
        }
        assert!(
            !out.iter().any(|u| matches!(u, PeerUpdate::Change { .. })),
            "{out:?}"
        );
        assert_eq!(t.phase(), Phase::Listing);
    }

    #[test]
    fn invalid_and_refused() {
        let mut t = PeerTracker::new(name("b"), Layout::Direct, config("a", 1));
        let mut out = Vec::new();
        t.handle(Signal::Config(Some(config("b", 2).encode())), &mut out);
        canaries(&mut t, &mut out);
        out.clear();
        // Another cluster's node under b's key: refused.
        let foreign = node("c", 3, "n1");
        t.handle(
            Signal::Entry {
                kind: Kind::Nodes,
                key: StateKey::Node {
                    cluster: name("b"),
                    name: DnsSubdomain::new("n1").unwrap(),
                }
                .to_string(),
                value: Some(foreign.encode()),
            },
            &mut out,
        );
        assert!(matches!(out[0], PeerUpdate::Invalid { .. }), "{out:?}");
        // A config with the local cluster's id: refused, nothing used.
        out.clear();
        t.handle(Signal::Config(Some(config("b", 1).encode())), &mut out);
        assert_eq!(t.phase(), Phase::Refused);
        assert!(
            matches!(&out[0], PeerUpdate::Config { config: Err(e), .. } if e.contains("id")),
            "{out:?}"
        );
    }

    /// kvstoremesh looked at a peer's config at once when an entry carried a foreign cluster
    /// id (the config may have changed under it); the agent's direct mode waited for the next
    /// probe tick. Now the tracker asks for it, once per such refusal.
    #[test]
    fn a_foreign_cluster_id_asks_for_a_probe_at_once() {
        let mut t = PeerTracker::new(name("b"), Layout::Direct, config("a", 1));
        let mut out = Vec::new();
        t.handle(Signal::Config(Some(config("b", 2).encode())), &mut out);
        t.handle(
            node_signal(Layout::Direct, &node("b", 2, "n1"), true),
            &mut out,
        );
        assert!(!t.take_probe_soon(), "a valid entry asks for nothing");
        t.handle(
            node_signal(Layout::Direct, &node("b", 3, "n2"), true),
            &mut out,
        );
        assert!(
            out.iter().any(|u| matches!(u, PeerUpdate::Invalid { .. })),
            "{out:?}"
        );
        assert!(t.take_probe_soon());
        assert!(!t.take_probe_soon(), "asked once");
    }

    proptest::proptest! {
        /// Whatever identity a peer publishes (as an identity or an IP's identity), the agent
        /// uses it exactly when it lies in the peer's identity range; anything else is refused
        /// and counted.
        #[test]
        fn identity_range_gate(
            peer_id in 2u16..=255,
            max511 in proptest::bool::ANY,
            value in 0u32..(1 << 24),
            near in proptest::bool::ANY,
            local_part in 0u32..(1 << 16),
        ) {
            use model::{IdentityRange, IpIdentity, IpPrefix, Label, NumericIdentity};
            let max = if max511 { MaxConnectedClusters::Max511 } else { MaxConnectedClusters::Max255 };
            let cfg = |n: &str, id: u16| ClusterConfig::new(
                name(n),
                ClusterId::new(id, max).unwrap(),
                max,
                Capabilities { sync_canaries: true, cached: false, service_exports: false },
            ).unwrap();
            let range = IdentityRange::for_cluster(ClusterId::new(peer_id, max).unwrap(), max).unwrap();
            // Half the cases near the range, where the edges are.
            let value = if near {
                (u32::from(peer_id) << max.local_identity_bits()) | (local_part & ((1 << max.local_identity_bits()) - 1))
            } else {
                value
            };
            let id = NumericIdentity::new(value).unwrap();
            let mut t = PeerTracker::new(name("b"), Layout::Cache, cfg("a", 1));
            let mut out = Vec::new();
            t.handle(Signal::Config(Some(cfg("b", peer_id).encode())), &mut out);
            canaries(&mut t, &mut out);
            out.clear();
            let identity = model::Identity::new(id, [Label::cluster(&name("b"))]);
            let ip = IpIdentity {
                schema: SchemaVersion,
                ip: IpPrefix::host("10.2.0.1".parse().unwrap()),
                identity: id,
                host_ip: None,
                namespace: None,
                pod_name: None,
                cluster: name("b"),
            };
            for (kind, key, value) in [
                (Kind::Identities, model::to_cache_key(&identity.key(), &name("b")).unwrap(), identity.encode()),
                (Kind::Ip, model::to_cache_key(&ip.key(), &name("b")).unwrap(), ip.encode()),
            ] {
                t.handle(Signal::Entry { kind, key, value: Some(value) }, &mut out);
            }
            let accepted = out.iter().filter(|u| matches!(u, PeerUpdate::Change { .. })).count();
            let refused = out.iter().filter(|u| matches!(u, PeerUpdate::Invalid { .. })).count();
            if range.contains(id) {
                proptest::prop_assert_eq!((accepted, refused), (2, 0), "{:?}", out);
                proptest::prop_assert_eq!(t.staging().0.len(), 2);
            } else {
                proptest::prop_assert_eq!((accepted, refused), (0, 2), "{:?}", out);
                proptest::prop_assert!(t.staging().0.is_empty());
            }
        }
    }

    /// The keys kvstoremesh writes (built with `model`, as kvstoremesh builds them) classify
    /// as the agent expects.
    #[test]
    fn kvstoremesh_keys() {
        let b = name("b");
        assert_eq!(
            classify(Layout::Cache, &peer_status_key(&b)),
            Some(KeyClass::MeshStatus(b.clone()))
        );
        assert_eq!(classify(Layout::Direct, &peer_status_key(&b)), None);
        assert_eq!(
            classify(Layout::Cache, &heartbeat_cache_key(&b)),
            Some(KeyClass::Heartbeat(Some(b.clone())))
        );
        for kind in Kind::CORE {
            assert_eq!(
                classify(Layout::Cache, &kind.cache_canary_key(&b)),
                Some(KeyClass::Canary(b.clone(), kind))
            );
            assert_eq!(
                classify(Layout::Direct, &kind.state_canary_key(&b)),
                Some(KeyClass::Canary(b.clone(), kind))
            );
        }
        // The status kvstoremesh writes parses as a link state.
        let mut status = PeerStatus::new(b.clone(), "2026-01-01T00:00:00Z".into());
        status.connected = true;
        let mut t = PeerTracker::new(b.clone(), Layout::Cache, config("a", 1));
        let mut out = Vec::new();
        t.handle(Signal::MeshStatus(Some(status.encode())), &mut out);
        assert!(
            matches!(
                &out[..],
                [PeerUpdate::Link {
                    connected: true,
                    ..
                }]
            ),
            "{out:?}"
        );
    }

    /// A lost peer's status carries how long it had been silent (a partition is found only
    /// when a probe times out): the link update passes it on, so the grace counts from there.
    #[test]
    fn a_lost_peer_s_silence_reaches_the_link_update() {
        let b = name("b");
        let mut status = PeerStatus::new(b.clone(), "2026-01-01T00:00:00Z".into());
        status.silent_ms = Some(1500);
        let mut t = PeerTracker::new(b.clone(), Layout::Cache, config("a", 1));
        let mut out = Vec::new();
        t.handle(Signal::MeshStatus(Some(status.encode())), &mut out);
        assert!(
            matches!(
                &out[..],
                [PeerUpdate::Link { connected: false, silent, .. }]
                    if *silent == Duration::from_millis(1500)
            ),
            "{out:?}"
        );
        // Connected again: no silence, whatever the field says.
        status.connected = true;
        let mut out = Vec::new();
        t.handle(Signal::MeshStatus(Some(status.encode())), &mut out);
        assert!(
            matches!(&out[..], [PeerUpdate::Link { connected: true, silent, .. }] if silent.is_zero()),
            "{out:?}"
        );
    }

    /// A status the agent cannot trust (not a status, or another peer's) says the link is
    /// down and why, like a missing one; it never reads as connected.
    #[test]
    fn an_unusable_mesh_status_is_a_down_link() {
        let b = name("b");
        let mut other = PeerStatus::new(name("c"), "2026-01-01T00:00:00Z".into());
        other.connected = true;
        let cases: [(Option<Vec<u8>>, &str); 4] = [
            (None, "has no status"),
            (Some(b"{\"connected\":true}".to_vec()), "no \"schema\""),
            (
                Some(b"{\"schema\":2,\"peer\":\"b\",\"connected\":true}".to_vec()),
                "schema version 2",
            ),
            (
                Some(other.encode()),
                "kvstoremesh status of c under the key of b",
            ),
        ];
        for (value, expected) in cases {
            let mut t = PeerTracker::new(b.clone(), Layout::Cache, config("a", 1));
            let mut out = Vec::new();
            t.handle(Signal::MeshStatus(value), &mut out);
            match &out[..] {
                [
                    PeerUpdate::Link {
                        connected: false,
                        error: Some(error),
                        ..
                    },
                ] => assert!(error.text().contains(expected), "{error}"),
                other => panic!("{expected}: {other:?}"),
            }
        }
    }

    #[test]
    fn key_classes() {
        use KeyClass::*;
        let b = name("b");
        let cases: &[(Layout, &str, Option<KeyClass>)] = &[
            (
                Layout::Direct,
                "cilium/cluster-config/b",
                Some(Config(b.clone())),
            ),
            (
                Layout::Direct,
                "cilium/synced/b/cilium/state/nodes/v1",
                Some(Canary(b.clone(), Kind::Nodes)),
            ),
            (
                Layout::Direct,
                "cilium/synced/b/cilium/cache/nodes/v1",
                None,
            ),
            (
                Layout::Direct,
                "cilium/state/ip/v1/default/10.0.0.1",
                Some(Entry(None, Kind::Ip)),
            ),
            (Layout::Direct, HEARTBEAT_KEY, Some(Heartbeat(None))),
            (
                Layout::Cache,
                "cilium/synced/b/cilium/cache/services/v1",
                Some(Canary(b.clone(), Kind::Services)),
            ),
            (
                Layout::Cache,
                "cilium/cache/identities/v1/b/id/131328",
                Some(Entry(Some(b.clone()), Kind::Identities)),
            ),
            (
                Layout::Cache,
                "cilium/cache/ip/v1/b/10.0.0.1",
                Some(Entry(Some(b.clone()), Kind::Ip)),
            ),
            (Layout::Cache, "cilium/state/ip/v1/default/10.0.0.1", None),
            (Layout::Cache, "cilium/cache/ip/v1/B/10.0.0.1", None),
        ];
        for (layout, key, expected) in cases {
            assert_eq!(&classify(*layout, key), expected, "{layout:?} {key}");
        }
    }
}
