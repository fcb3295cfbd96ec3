//! The pure translation from one cluster's objects to the entries it publishes.
//!
//! [`translate`] takes a full snapshot and returns every key and canonical value the cluster
//! should have in its store, plus warnings about objects it could not use as written. It does
//! no I/O, so the publisher can diff its result against the store, and tests can check it
//! without one.
//!
//! - Nodes: every Node, with its addresses and pod CIDRs.
//! - Services: global Services (see [`model::parse_service_annotations`]) in global
//!   namespaces ([`NAMESPACE_GLOBAL_ANNOTATION`]), with backends from their EndpointSlices
//!   unless the service is not shared.
//! - Identities and IPs: one identity per distinct security label set of the live pods (not
//!   host-network, not finished), allocated by [`IdentityAllocator`], and each pod IP mapped
//!   to its pod's identity.
//!
//! Every value is checked with [`model::validate_entry`] against this cluster's own config,
//! exactly as a peer will check it: a value a peer would refuse becomes a [`Warning`] instead.
//! Bad input never panics; it is warned about and left out.

mod nodes;
mod pods;
mod services;
#[cfg(test)]
mod testutil;

use std::collections::BTreeMap;
use std::fmt;

use cluster_source::{ClusterObjects, ObjectKind, ObjectRef};
use model::keys::Kind;
use model::{ClusterConfig, Entry, validate_entry};

use crate::identity::IdentityAllocator;

pub use pods::NAMESPACE_LABEL_KEY;
pub use services::NAMESPACE_GLOBAL_ANNOTATION;

/// What shapes the translation besides the objects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TranslateConfig {
    /// This cluster: its name and id go into every value.
    pub cluster: ClusterConfig,
    /// Whether a namespace without a `clustermesh.cilium.io/global` annotation (or without a
    /// Namespace object) may publish global services; Cilium's
    /// `clustermesh-default-global-namespace`, true by default.
    pub default_global_namespace: bool,
}

impl TranslateConfig {
    /// The defaults for `cluster`: every namespace is global unless annotated otherwise.
    pub fn new(cluster: ClusterConfig) -> Self {
        TranslateConfig {
            cluster,
            default_global_namespace: true,
        }
    }
}

/// The kinds [`translate`] produces; [`Published::entries`] always holds all of them.
pub const TRANSLATED_KINDS: [Kind; 4] = [Kind::Nodes, Kind::Services, Kind::Identities, Kind::Ip];

/// Everything the cluster publishes, as store keys and canonical bytes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Published {
    /// Per kind (every one of [`TRANSLATED_KINDS`], possibly empty): full state key →
    /// canonical encoded value. Equal values give equal bytes, so unchanged entries can be
    /// skipped by comparing bytes.
    pub entries: BTreeMap<Kind, BTreeMap<String, Vec<u8>>>,
    /// What could not be used as written, in a stable order.
    pub warnings: Vec<Warning>,
}

impl Published {
    /// The entries of `kind`, empty for a kind not translated.
    pub fn kind(&self, kind: Kind) -> &BTreeMap<String, Vec<u8>> {
        static EMPTY: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        self.entries.get(&kind).unwrap_or(&EMPTY)
    }

    /// How many entries there are of every kind together.
    pub fn len(&self) -> usize {
        self.entries.values().map(BTreeMap::len).sum()
    }

    /// Whether there is no entry at all.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// An object (or part of one) that was not used as written.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Warning {
    /// The object: `Service shop/web`, `Node node-a`, `Identity 131400`, or a store key.
    pub object: String,
    /// What was wrong and what was done instead.
    pub message: String,
}

impl Warning {
    /// A warning about `object`.
    pub fn new(object: impl Into<String>, message: impl Into<String>) -> Self {
        Warning {
            object: object.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.object, self.message)
    }
}

/// Translates a snapshot of the cluster's objects into what it publishes.
///
/// `identities` carries identity numbers from one translation to the next (and across
/// restarts, when seeded from the store): label sets keep their identities while in use,
/// and identities no live pod uses any more are released, so they are not in the result.
/// Hence give it synced snapshots only: a partial one would release the identities of the
/// pods it misses.
pub fn translate(
    objects: &ClusterObjects,
    config: &TranslateConfig,
    identities: &mut IdentityAllocator,
) -> Published {
    translate_cached(objects, config, identities, &mut TranslateCache::default())
}

/// What one translation keeps for the next, so that translating the next snapshot costs what
/// changed in it rather than the size of the cluster: per pod, its labels, addresses and
/// encoded entries, reused while the snapshot holds the same pod object (`Arc`); per global
/// service, its entry, while the Service and its EndpointSlices are the same objects.
#[derive(Debug, Default)]
pub struct TranslateCache {
    /// The configuration the cached values were made with.
    config: Option<TranslateConfig>,
    services: services::ServiceCache,
    pods: pods::PodCache,
}

/// [`translate`], reusing (and refreshing) `cache`; the result is the same as without it.
pub fn translate_cached(
    objects: &ClusterObjects,
    config: &TranslateConfig,
    identities: &mut IdentityAllocator,
    cache: &mut TranslateCache,
) -> Published {
    if cache.config.as_ref() != Some(config) {
        cache.services.clear();
        cache.pods.clear();
        cache.config = Some(config.clone());
    }
    let mut out = Out::new(config);
    nodes::translate(objects, &mut out);
    services::translate(objects, &mut cache.services, &mut out);
    pods::translate(objects, identities, &mut cache.pods, &mut out);
    out.published
}

/// An entry encoded and checked as a peer will check it: its kind, key and bytes, or why it
/// is not published.
type Encoded = Result<(Kind, String, Vec<u8>), String>;

/// Encodes `entry` and checks it with [`validate_entry`] against this cluster's own config.
fn encode(config: &TranslateConfig, entry: Entry) -> Encoded {
    let kind = entry.kind();
    let key = entry.key().to_string();
    let bytes = entry.encode();
    match validate_entry(kind, &key, &bytes, &config.cluster) {
        Ok(_) => Ok((kind, key, bytes)),
        Err(error) => Err(format!("not published: {error}")),
    }
}

/// The result being built, and the one gate every value passes.
struct Out<'a> {
    config: &'a TranslateConfig,
    published: Published,
}

impl<'a> Out<'a> {
    fn new(config: &'a TranslateConfig) -> Self {
        let entries = TRANSLATED_KINDS
            .into_iter()
            .map(|kind| (kind, BTreeMap::new()))
            .collect();
        Out {
            config,
            published: Published {
                entries,
                warnings: Vec::new(),
            },
        }
    }

    fn warn(&mut self, object: &str, message: impl Into<String>) {
        self.published.warnings.push(Warning::new(object, message));
    }

    /// Adds `entry` if a peer would accept it from this cluster; otherwise warns about
    /// `object`. The first entry for a key wins (callers resolve expected clashes first).
    fn emit(&mut self, object: &str, entry: Entry) {
        let encoded = encode(self.config, entry);
        self.insert(object, &encoded);
    }

    /// Adds an entry [`encode`]d before (or warns why it is not published).
    fn insert(&mut self, object: &str, encoded: &Encoded) {
        let (kind, key, bytes) = match encoded {
            Ok(entry) => entry,
            Err(message) => return self.warn(object, message.clone()),
        };
        let entries = self.published.entries.entry(*kind).or_default();
        if entries.contains_key(key) {
            self.warn(object, format!("not published: {key} is already published"));
            return;
        }
        entries.insert(key.clone(), bytes.clone());
    }
}

/// How warnings name an object: `Service shop/web`, `Node node-a`.
fn object_name(kind: ObjectKind, namespace: Option<&str>, name: &str) -> String {
    ObjectRef {
        kind,
        namespace: namespace.map(str::to_owned),
        name: name.to_owned(),
    }
    .to_string()
}
