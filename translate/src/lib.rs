//! A cluster's own objects, turned into the facts the mesh is made of.
//!
//! [`translate`] takes a full snapshot of the cluster's objects and returns typed [`Facts`],
//! plus warnings about objects it could not use as written. It does no I/O and decides nothing
//! about who sees what: the clustermesh-apiserver publishes the global part of the facts, the
//! node agent uses all of them, and both read a Service the same way because both read it here.
//!
//! - Nodes: every Node, with its addresses and pod CIDRs.
//! - Services: every Service, with its frontends (cluster IPs), every ready or serving backend
//!   from its EndpointSlices, and what the mesh makes of it: whether it is global (its
//!   annotations, see [`model::parse_service_annotations`], in a namespace that lets them, see
//!   [`NAMESPACE_GLOBAL_ANNOTATION`]), shared, and its affinity.
//! - Identities and IPs: one identity per distinct security label set of the live pods (not
//!   host-network, not finished), allocated by [`IdentityAllocator`], and each pod IP mapped
//!   to its pod's identity.
//!
//! Bad input never panics; it is warned about and left out.

pub mod identity;
mod nodes;
mod pods;
mod services;
#[cfg(test)]
mod testutil;

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use cluster_source::{ClusterObjects, NamespacedName, ObjectKind, ObjectRef};
use model::{ClusterConfig, Identity, Node};

pub use identity::{AllocError, IdentityAllocator, LabelSet};
pub use pods::IpFact;
pub use services::{NAMESPACE_GLOBAL_ANNOTATION, ServiceFact};

/// What shapes the translation besides the objects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TranslateConfig {
    /// This cluster: its name and id go into every value.
    pub cluster: ClusterConfig,
    /// Whether a namespace without a `clustermesh.cilium.io/global` annotation (or without a
    /// Namespace object) may have global services; Cilium's
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

/// Everything one snapshot says about the cluster, as mesh values.
///
/// Service and ip facts that stay the same from one translation to the next (while their
/// objects are the same) are the same `Arc`s, so a consumer can keep what it derived from them
/// (the apiserver keeps their encodings).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Facts {
    /// Every Node with a valid name, in name order.
    pub nodes: Vec<Node>,
    /// What was wrong with Nodes.
    pub node_warnings: Vec<Warning>,
    /// Every Service, global or not, by namespace and name.
    pub services: BTreeMap<NamespacedName, Arc<ServiceFact>>,
    /// Namespace and Service annotations not used as written, about every Service (what
    /// translating one Service's value warned about is in its fact).
    pub service_warnings: Vec<Warning>,
    /// The identities of the live pods' label sets, in identity order.
    pub identities: Vec<Identity>,
    /// Every live pod IP with its pod's identity, in address order; an address two pods
    /// claim is the first pod's (in namespace and name order).
    pub ips: Vec<Arc<IpFact>>,
    /// What was wrong with pods and their identities.
    pub pod_warnings: Vec<Warning>,
}

impl Facts {
    /// Every warning, in a stable order: nodes, annotations, each Service's own (backends
    /// included), pods.
    pub fn warnings(&self) -> impl Iterator<Item = &Warning> {
        let services = self
            .services
            .values()
            .flat_map(|fact| fact.warnings.iter().chain(&fact.backend_warnings));
        self.node_warnings
            .iter()
            .chain(&self.service_warnings)
            .chain(services)
            .chain(&self.pod_warnings)
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

/// Translates a snapshot of the cluster's objects into facts.
///
/// `identities` carries identity numbers from one translation to the next (and across
/// restarts, when seeded): label sets keep their identities while in use, and identities no
/// live pod uses any more are released, so they are not in the result. Hence give it synced
/// snapshots only: a partial one would release the identities of the pods it misses.
pub fn translate(
    objects: &ClusterObjects,
    config: &TranslateConfig,
    identities: &mut IdentityAllocator,
) -> Facts {
    translate_cached(objects, config, identities, &mut TranslateCache::default())
}

/// What one translation keeps for the next, so that translating the next snapshot costs what
/// changed in it rather than the size of the cluster: per pod, its labels, addresses and ip
/// facts, reused while the snapshot holds the same pod object (`Arc`); per Service, its fact,
/// while the Service, its EndpointSlices and its namespace's say are the same.
#[derive(Debug, Default)]
pub struct TranslateCache {
    /// The configuration the cached facts were made with.
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
) -> Facts {
    if cache.config.as_ref() != Some(config) {
        cache.services.clear();
        cache.pods.clear();
        cache.config = Some(config.clone());
    }
    let mut facts = Facts::default();
    nodes::translate(objects, config, &mut facts);
    services::translate(objects, config, &mut cache.services, &mut facts);
    pods::translate(objects, config, identities, &mut cache.pods, &mut facts);
    facts
}

/// How warnings name an object: `Service shop/web`, `Node node-a`.
pub fn object_name(kind: ObjectKind, namespace: Option<&str>, name: &str) -> String {
    ObjectRef {
        kind,
        namespace: namespace.map(str::to_owned),
        name: name.to_owned(),
    }
    .to_string()
}
