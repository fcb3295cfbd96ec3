//! What a source yields: a full, immutable snapshot of the cluster's own objects.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::cilium::CiliumNetworkPolicy;

/// The namespace given to namespaced objects that do not name one, as `kubectl` does.
pub const DEFAULT_NAMESPACE: &str = "default";

/// The key of a namespaced object: `(namespace, name)`, ordered by namespace then name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NamespacedName {
    /// The object's namespace (never empty in a snapshot: defaulted to `default`).
    pub namespace: String,
    /// The object's name.
    pub name: String,
}

impl NamespacedName {
    /// Builds a key from a namespace and a name.
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for NamespacedName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// The kinds of object a source yields.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ObjectKind {
    /// `v1` `Namespace` (cluster-scoped).
    Namespace,
    /// `v1` `Node` (cluster-scoped).
    Node,
    /// `v1` `Service`.
    Service,
    /// `discovery.k8s.io/v1` `EndpointSlice`.
    EndpointSlice,
    /// `v1` `Pod`.
    Pod,
    /// `networking.k8s.io/v1` `NetworkPolicy`.
    NetworkPolicy,
    /// `cilium.io/v2` `CiliumNetworkPolicy`.
    CiliumNetworkPolicy,
}

impl ObjectKind {
    /// Every kind, in snapshot order.
    pub const ALL: [ObjectKind; 7] = [
        ObjectKind::Namespace,
        ObjectKind::Node,
        ObjectKind::Service,
        ObjectKind::EndpointSlice,
        ObjectKind::Pod,
        ObjectKind::NetworkPolicy,
        ObjectKind::CiliumNetworkPolicy,
    ];

    /// The `apiVersion` this crate reads the kind at.
    pub fn api_version(self) -> &'static str {
        match self {
            ObjectKind::Namespace | ObjectKind::Node | ObjectKind::Service | ObjectKind::Pod => {
                "v1"
            }
            ObjectKind::EndpointSlice => "discovery.k8s.io/v1",
            ObjectKind::NetworkPolicy => "networking.k8s.io/v1",
            ObjectKind::CiliumNetworkPolicy => "cilium.io/v2",
        }
    }

    /// The `kind` string.
    pub fn kind(self) -> &'static str {
        match self {
            ObjectKind::Namespace => "Namespace",
            ObjectKind::Node => "Node",
            ObjectKind::Service => "Service",
            ObjectKind::EndpointSlice => "EndpointSlice",
            ObjectKind::Pod => "Pod",
            ObjectKind::NetworkPolicy => "NetworkPolicy",
            ObjectKind::CiliumNetworkPolicy => "CiliumNetworkPolicy",
        }
    }

    /// Whether objects of this kind live in a namespace.
    pub fn namespaced(self) -> bool {
        !matches!(self, ObjectKind::Namespace | ObjectKind::Node)
    }

    /// The kind for an `apiVersion`/`kind` pair, if it is one this crate reads.
    pub fn from_type(api_version: &str, kind: &str) -> Option<ObjectKind> {
        ObjectKind::ALL
            .into_iter()
            .find(|k| k.api_version() == api_version && k.kind() == kind)
    }
}

impl fmt::Display for ObjectKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.kind())
    }
}

/// Names one object: its kind, namespace (for namespaced kinds) and name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectRef {
    /// The object's kind.
    pub kind: ObjectKind,
    /// The namespace, `None` for cluster-scoped kinds.
    pub namespace: Option<String>,
    /// The name.
    pub name: String,
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.namespace {
            Some(ns) => write!(f, "{} {}/{}", self.kind, ns, self.name),
            None => write!(f, "{} {}", self.kind, self.name),
        }
    }
}

/// One object of any kind a source yields.
///
/// Objects are shared (`Arc`): a snapshot holds the same allocation as the source's own state
/// and as the previous snapshot for every object that did not change, so publishing a
/// snapshot of 100k pods copies pointers, not pods, and an unchanged object can be recognised
/// by its address ([`ClusterObjects`] equality does).
#[derive(Debug, Clone, PartialEq)]
pub enum AnyObject {
    /// A `Namespace`.
    Namespace(Arc<Namespace>),
    /// A `Node`.
    Node(Arc<Node>),
    /// A `Service`.
    Service(Arc<Service>),
    /// An `EndpointSlice`.
    EndpointSlice(Arc<EndpointSlice>),
    /// A `Pod`.
    Pod(Arc<Pod>),
    /// A `NetworkPolicy`.
    NetworkPolicy(Arc<NetworkPolicy>),
    /// A `CiliumNetworkPolicy`.
    CiliumNetworkPolicy(Arc<CiliumNetworkPolicy>),
}

impl AnyObject {
    /// The object's kind.
    pub fn kind(&self) -> ObjectKind {
        match self {
            AnyObject::Namespace(_) => ObjectKind::Namespace,
            AnyObject::Node(_) => ObjectKind::Node,
            AnyObject::Service(_) => ObjectKind::Service,
            AnyObject::EndpointSlice(_) => ObjectKind::EndpointSlice,
            AnyObject::Pod(_) => ObjectKind::Pod,
            AnyObject::NetworkPolicy(_) => ObjectKind::NetworkPolicy,
            AnyObject::CiliumNetworkPolicy(_) => ObjectKind::CiliumNetworkPolicy,
        }
    }

    /// The object's metadata.
    pub fn metadata(&self) -> &ObjectMeta {
        match self {
            AnyObject::Namespace(o) => &o.metadata,
            AnyObject::Node(o) => &o.metadata,
            AnyObject::Service(o) => &o.metadata,
            AnyObject::EndpointSlice(o) => &o.metadata,
            AnyObject::Pod(o) => &o.metadata,
            AnyObject::NetworkPolicy(o) => &o.metadata,
            AnyObject::CiliumNetworkPolicy(o) => &o.metadata,
        }
    }

    /// The object's metadata, mutably (copying the object first if it is shared).
    pub fn metadata_mut(&mut self) -> &mut ObjectMeta {
        match self {
            AnyObject::Namespace(o) => &mut Arc::make_mut(o).metadata,
            AnyObject::Node(o) => &mut Arc::make_mut(o).metadata,
            AnyObject::Service(o) => &mut Arc::make_mut(o).metadata,
            AnyObject::EndpointSlice(o) => &mut Arc::make_mut(o).metadata,
            AnyObject::Pod(o) => &mut Arc::make_mut(o).metadata,
            AnyObject::NetworkPolicy(o) => &mut Arc::make_mut(o).metadata,
            AnyObject::CiliumNetworkPolicy(o) => &mut Arc::make_mut(o).metadata,
        }
    }

    /// The object's key in a snapshot: `(namespace, name)` for namespaced kinds, with a
    /// missing namespace defaulted to `default` in the object too (as `kubectl` does), and
    /// `("", name)` for cluster-scoped ones.
    pub fn key(&mut self) -> NamespacedName {
        let kind = self.kind();
        let name = self.metadata().name.clone().unwrap_or_default();
        if !kind.namespaced() {
            return NamespacedName::new(String::new(), name);
        }
        let namespace = match self.metadata().namespace.as_deref() {
            Some(ns) if !ns.is_empty() => ns.to_owned(),
            _ => {
                self.metadata_mut().namespace = Some(DEFAULT_NAMESPACE.to_owned());
                DEFAULT_NAMESPACE.to_owned()
            }
        };
        NamespacedName::new(namespace, name)
    }

    /// Which object this is. The namespace is reported as stored (`None` when absent,
    /// always `None` for cluster-scoped kinds).
    pub fn object_ref(&self) -> ObjectRef {
        let meta = self.metadata();
        let kind = self.kind();
        ObjectRef {
            kind,
            namespace: if kind.namespaced() {
                meta.namespace.clone()
            } else {
                None
            },
            name: meta.name.clone().unwrap_or_default(),
        }
    }
}

/// Something wrong with the input that did not stop the source.
///
/// Problems are part of every snapshot and disappear from the next snapshot once the input
/// is fixed; they are never sticky.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Problem {
    /// Where it comes from: a file path (manifest directory) or an API kind such as
    /// `v1/Pod` (Kubernetes API).
    pub source: String,
    /// The 1-based line in `source`, where known.
    pub line: Option<usize>,
    /// The object concerned (`Service default/web`), where known.
    pub object: Option<String>,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if let Some(object) = &self.object {
            write!(f, ": {object}")?;
        }
        write!(f, ": {}", self.message)
    }
}

/// A full, immutable snapshot of one cluster's own state, as one source sees it.
///
/// Sources publish a new `Arc<ClusterObjects>` on every change; consumers diff consecutive
/// snapshots. Cluster-scoped kinds are keyed by name, namespaced kinds by
/// [`NamespacedName`]; every namespaced object has `metadata.namespace` set.
///
/// Two snapshots are equal when they hold equal objects; an object shared by both (the same
/// `Arc`) is equal without being compared field by field.
#[derive(Debug, Clone, Default)]
pub struct ClusterObjects {
    /// True once the initial state is complete. Before that, the maps may be partial; after
    /// it they never are.
    pub synced: bool,
    /// Namespaces by name.
    pub namespaces: BTreeMap<String, Arc<Namespace>>,
    /// Nodes by name.
    pub nodes: BTreeMap<String, Arc<Node>>,
    /// Services by namespace and name.
    pub services: BTreeMap<NamespacedName, Arc<Service>>,
    /// EndpointSlices (`discovery.k8s.io/v1`) by namespace and name.
    pub endpoint_slices: BTreeMap<NamespacedName, Arc<EndpointSlice>>,
    /// Pods by namespace and name.
    pub pods: BTreeMap<NamespacedName, Arc<Pod>>,
    /// NetworkPolicies (`networking.k8s.io/v1`) by namespace and name.
    pub network_policies: BTreeMap<NamespacedName, Arc<NetworkPolicy>>,
    /// CiliumNetworkPolicies (`cilium.io/v2`) by namespace and name.
    pub cilium_network_policies: BTreeMap<NamespacedName, Arc<CiliumNetworkPolicy>>,
    /// What is currently wrong with the input, sorted.
    pub problems: Vec<Problem>,
}

impl ClusterObjects {
    /// Inserts an object under its key, replacing and returning any object of the same kind
    /// and key. A namespaced object without a namespace is stored in `default`, and its
    /// `metadata.namespace` set accordingly.
    pub fn insert(&mut self, mut object: AnyObject) -> Option<AnyObject> {
        let key = object.key();
        self.insert_keyed(key, object)
    }

    /// A snapshot of objects given with their [`AnyObject::key`]s, in (kind, key) order:
    /// each map is built in one pass instead of one search per object.
    pub(crate) fn from_sorted(
        objects: impl IntoIterator<Item = (NamespacedName, AnyObject)>,
    ) -> Self {
        let mut namespaces = Vec::new();
        let mut nodes = Vec::new();
        let mut services = Vec::new();
        let mut endpoint_slices = Vec::new();
        let mut pods = Vec::new();
        let mut network_policies = Vec::new();
        let mut cilium_network_policies = Vec::new();
        for (key, object) in objects {
            match object {
                AnyObject::Namespace(o) => namespaces.push((key.name, o)),
                AnyObject::Node(o) => nodes.push((key.name, o)),
                AnyObject::Service(o) => services.push((key, o)),
                AnyObject::EndpointSlice(o) => endpoint_slices.push((key, o)),
                AnyObject::Pod(o) => pods.push((key, o)),
                AnyObject::NetworkPolicy(o) => network_policies.push((key, o)),
                AnyObject::CiliumNetworkPolicy(o) => cilium_network_policies.push((key, o)),
            }
        }
        ClusterObjects {
            synced: false,
            namespaces: namespaces.into_iter().collect(),
            nodes: nodes.into_iter().collect(),
            services: services.into_iter().collect(),
            endpoint_slices: endpoint_slices.into_iter().collect(),
            pods: pods.into_iter().collect(),
            network_policies: network_policies.into_iter().collect(),
            cilium_network_policies: cilium_network_policies.into_iter().collect(),
            problems: Vec::new(),
        }
    }

    fn insert_keyed(&mut self, key: NamespacedName, object: AnyObject) -> Option<AnyObject> {
        match object {
            AnyObject::Namespace(o) => self
                .namespaces
                .insert(key.name, o)
                .map(AnyObject::Namespace),
            AnyObject::Node(o) => self.nodes.insert(key.name, o).map(AnyObject::Node),
            AnyObject::Service(o) => self.services.insert(key, o).map(AnyObject::Service),
            AnyObject::EndpointSlice(o) => self
                .endpoint_slices
                .insert(key, o)
                .map(AnyObject::EndpointSlice),
            AnyObject::Pod(o) => self.pods.insert(key, o).map(AnyObject::Pod),
            AnyObject::NetworkPolicy(o) => self
                .network_policies
                .insert(key, o)
                .map(AnyObject::NetworkPolicy),
            AnyObject::CiliumNetworkPolicy(o) => self
                .cilium_network_policies
                .insert(key, o)
                .map(AnyObject::CiliumNetworkPolicy),
        }
    }

    /// Whether an object of this kind and key is present (`namespace` is ignored for
    /// cluster-scoped kinds and defaults to `default` for namespaced ones).
    pub fn contains(&self, object: &ObjectRef) -> bool {
        let key = || {
            NamespacedName::new(
                object.namespace.as_deref().unwrap_or(DEFAULT_NAMESPACE),
                object.name.clone(),
            )
        };
        match object.kind {
            ObjectKind::Namespace => self.namespaces.contains_key(&object.name),
            ObjectKind::Node => self.nodes.contains_key(&object.name),
            ObjectKind::Service => self.services.contains_key(&key()),
            ObjectKind::EndpointSlice => self.endpoint_slices.contains_key(&key()),
            ObjectKind::Pod => self.pods.contains_key(&key()),
            ObjectKind::NetworkPolicy => self.network_policies.contains_key(&key()),
            ObjectKind::CiliumNetworkPolicy => self.cilium_network_policies.contains_key(&key()),
        }
    }

    /// The number of objects of one kind.
    pub fn count(&self, kind: ObjectKind) -> usize {
        match kind {
            ObjectKind::Namespace => self.namespaces.len(),
            ObjectKind::Node => self.nodes.len(),
            ObjectKind::Service => self.services.len(),
            ObjectKind::EndpointSlice => self.endpoint_slices.len(),
            ObjectKind::Pod => self.pods.len(),
            ObjectKind::NetworkPolicy => self.network_policies.len(),
            ObjectKind::CiliumNetworkPolicy => self.cilium_network_policies.len(),
        }
    }

    /// The number of objects of every kind together.
    pub fn len(&self) -> usize {
        ObjectKind::ALL.into_iter().map(|k| self.count(k)).sum()
    }

    /// Whether the snapshot holds no object (problems aside).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl PartialEq for ClusterObjects {
    fn eq(&self, other: &Self) -> bool {
        self.synced == other.synced
            && self.problems == other.problems
            && same_objects(&self.namespaces, &other.namespaces)
            && same_objects(&self.nodes, &other.nodes)
            && same_objects(&self.services, &other.services)
            && same_objects(&self.endpoint_slices, &other.endpoint_slices)
            && same_objects(&self.pods, &other.pods)
            && same_objects(&self.network_policies, &other.network_policies)
            && same_objects(
                &self.cilium_network_policies,
                &other.cilium_network_policies,
            )
    }
}

/// Map equality that skips comparing objects both maps share.
fn same_objects<K: Eq, T: PartialEq>(a: &BTreeMap<K, Arc<T>>, b: &BTreeMap<K, Arc<T>>) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|((ka, va), (kb, vb))| ka == kb && (Arc::ptr_eq(va, vb) || va == vb))
}
