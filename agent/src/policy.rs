//! Network policies compiled into an allow table keyed by (direction, local endpoint
//! identity, peer identity, port, protocol). Pure.
//!
//! Two policy kinds are read:
//!
//! - Kubernetes `NetworkPolicy`: `podSelector` picks the local endpoints in the policy's
//!   namespace; `from`/`to` peers select pods by `podSelector` (in the policy's namespace
//!   unless a `namespaceSelector` is given) and namespaces by `namespaceSelector`; `ports`
//!   with `port`, `endPort` and `protocol`. An empty peer list allows every peer.
//! - `CiliumNetworkPolicy` (our model of it): `endpointSelector`, `fromEndpoints` /
//!   `toEndpoints`, `toPorts`. Selectors are restricted to the policy's namespace unless they
//!   name `io.kubernetes.pod.namespace` themselves; keys may carry a `k8s:` or `any:` source.
//!
//! Peers are identities: the local cluster's and every peer cluster's, selected by their
//! labels, including the cluster label `io.cilium.k8s.policy.cluster`. A peer selector that
//! matches no identity allows nothing, so a policy that selects nothing remote opens nothing
//! remote. A selector without the cluster label matches every cluster, as Cilium's classic
//! default; with [`PolicyOptions::default_local_cluster`] it matches the local cluster only.
//!
//! A local identity selected by a policy in a direction is under default-deny in that
//! direction ([`EnforcementEntry`]); only the allow entries let traffic through. A rule with
//! no peer selector and no ports (`ingress: [{}]` in a Cilium policy) only enables
//! default-deny. Address blocks (`ipBlock`, `fromCIDR`) and named ports are not compiled;
//! each gives a warning.

use std::collections::{BTreeMap, BTreeSet};

use cluster_source::{CiliumNetworkPolicy, L4Protocol, NamespacedName, PortProtocol};
use k8s_openapi::api::networking::v1::{NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use model::label::CLUSTER_LABEL_KEY;
use model::label::NAMESPACE_LABEL_KEY;
use model::{ClusterName, Label, NumericIdentity};

use crate::tables::{
    ANY_IDENTITY, ANY_PORT, Direction, EnforcementEntry, PolicyEntry, PolicyKey, Table,
};

/// The namespace label Kubernetes sets on every namespace.
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// Widest `endPort` range expanded into entries; wider ones are refused with a warning.
pub const MAX_PORT_RANGE: u32 = 1024;

/// How selectors without a cluster label behave.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyOptions {
    /// Peer selectors without `io.cilium.k8s.policy.cluster` match the local cluster only.
    pub default_local_cluster: bool,
}

/// Everything a compilation reads.
#[derive(Clone, Copy, Debug)]
pub struct PolicyInput<'a> {
    /// The local cluster.
    pub local_cluster: &'a ClusterName,
    /// The identities of the local endpoints policies apply to.
    pub local_endpoints: &'a BTreeSet<NumericIdentity>,
    /// Every known identity (local and remote) and its labels.
    pub identities: &'a BTreeMap<NumericIdentity, &'a [Label]>,
    /// Each local namespace's labels (for `namespaceSelector`).
    pub namespaces: &'a BTreeMap<String, BTreeMap<String, String>>,
    /// Kubernetes network policies.
    pub network_policies: &'a [NetworkPolicy],
    /// Cilium network policies.
    pub cilium_policies: &'a [CiliumNetworkPolicy],
    /// Selector behaviour.
    pub options: PolicyOptions,
}

/// The compiled policy.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CompiledPolicy {
    /// Allow entries.
    pub allow: Table<PolicyEntry>,
    /// Local identities under default-deny, per direction.
    pub enforcement: Table<EnforcementEntry>,
    /// What could not be compiled as written.
    pub warnings: Vec<String>,
}

/// One selector requirement, on a label key whatever its source.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Requirement {
    In(String, BTreeSet<String>),
    NotIn(String, BTreeSet<String>),
    Exists(String),
    DoesNotExist(String),
}

/// A conjunction of requirements on an identity's labels (namespace and cluster included).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Selector {
    requirements: Vec<Requirement>,
    /// For Kubernetes peers with a `namespaceSelector`: requirements on the namespace's labels.
    namespace: Option<Vec<Requirement>>,
}

/// `k8s:app` and `any:app` are `app`; other sources cannot match a pod identity label set.
fn strip_source(key: &str) -> Option<&str> {
    match key.split_once(':') {
        Some(("k8s" | "any", rest)) => Some(rest),
        Some((source, _)) if !source.contains('/') && !source.contains('.') => None,
        _ => Some(key),
    }
}

fn requirements(
    selector: &LabelSelector,
    what: &str,
    warnings: &mut Vec<String>,
) -> Option<Vec<Requirement>> {
    let mut out = Vec::new();
    for (key, value) in selector.match_labels.iter().flatten() {
        let Some(key) = strip_source(key) else {
            warnings.push(format!(
                "{what}: label source of {key:?} is not k8s or any; the selector matches nothing"
            ));
            return None;
        };
        out.push(Requirement::In(
            key.to_owned(),
            BTreeSet::from([value.clone()]),
        ));
    }
    for expr in selector.match_expressions.iter().flatten() {
        let Some(key) = strip_source(&expr.key) else {
            warnings.push(format!(
                "{what}: label source of {:?} is not k8s or any; the selector matches nothing",
                expr.key
            ));
            return None;
        };
        let key = key.to_owned();
        let values: BTreeSet<String> = expr.values.iter().flatten().cloned().collect();
        out.push(match expr.operator.as_str() {
            "In" => Requirement::In(key, values),
            "NotIn" => Requirement::NotIn(key, values),
            "Exists" => Requirement::Exists(key),
            "DoesNotExist" => Requirement::DoesNotExist(key),
            other => {
                warnings.push(format!(
                    "{what}: selector operator {other:?} is not In, NotIn, Exists or \
                     DoesNotExist; the selector matches nothing"
                ));
                return None;
            }
        });
    }
    Some(out)
}

fn holds(requirements: &[Requirement], labels: &BTreeMap<&str, &str>) -> bool {
    requirements.iter().all(|r| match r {
        Requirement::In(k, values) => labels.get(k.as_str()).is_some_and(|v| values.contains(*v)),
        Requirement::NotIn(k, values) => {
            labels.get(k.as_str()).is_none_or(|v| !values.contains(*v))
        }
        Requirement::Exists(k) => labels.contains_key(k.as_str()),
        Requirement::DoesNotExist(k) => !labels.contains_key(k.as_str()),
    })
}

fn mentions(requirements: &[Requirement], key: &str) -> bool {
    requirements.iter().any(|r| match r {
        Requirement::In(k, _)
        | Requirement::NotIn(k, _)
        | Requirement::Exists(k)
        | Requirement::DoesNotExist(k) => k == key,
    })
}

/// An identity's labels by key (the `k8s` source wins over others for the same key).
struct Known<'a> {
    id: NumericIdentity,
    labels: BTreeMap<&'a str, &'a str>,
}

/// One port (or every port) of one protocol (or every protocol).
type PortSpec = (u16, L4Protocol);

struct Compiler<'a> {
    input: PolicyInput<'a>,
    known: Vec<Known<'a>>,
    empty_namespace_labels: BTreeMap<String, String>,
    out: CompiledPolicy,
    allow: BTreeMap<PolicyKey, BTreeSet<String>>,
}

impl<'a> Compiler<'a> {
    fn namespace_labels<'s>(&'s self, namespace: &'s str) -> BTreeMap<&'s str, &'s str> {
        let mut labels: BTreeMap<&str, &str> = self
            .input
            .namespaces
            .get(namespace)
            .unwrap_or(&self.empty_namespace_labels)
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        labels.insert(NAMESPACE_NAME_LABEL, namespace);
        labels
    }

    /// Identities matched by `selector`; `None` in the result means "any peer".
    fn select(&self, selector: &Selector, local_only: bool) -> Vec<NumericIdentity> {
        let local = self.input.local_cluster.as_str();
        let mut matched = Vec::new();
        for known in &self.known {
            if local_only && known.labels.get(CLUSTER_LABEL_KEY) != Some(&local) {
                continue;
            }
            if !holds(&selector.requirements, &known.labels) {
                continue;
            }
            if let Some(namespace_requirements) = &selector.namespace {
                let Some(namespace) = known.labels.get(NAMESPACE_LABEL_KEY) else {
                    continue;
                };
                if !holds(namespace_requirements, &self.namespace_labels(namespace)) {
                    continue;
                }
            }
            matched.push(known.id);
        }
        matched
    }

    /// Selected local endpoints.
    fn subjects(&self, selector: &Selector) -> Vec<NumericIdentity> {
        self.select(selector, true)
            .into_iter()
            .filter(|id| self.input.local_endpoints.contains(id))
            .collect()
    }

    /// Identities a peer selector matches, honouring the default-local-cluster option.
    fn peers(&self, selector: &Selector) -> Vec<NumericIdentity> {
        let local_only = self.input.options.default_local_cluster
            && !mentions(&selector.requirements, CLUSTER_LABEL_KEY);
        self.select(selector, local_only)
    }

    fn allow(
        &mut self,
        policy: &str,
        direction: Direction,
        subjects: &[NumericIdentity],
        peers: &[NumericIdentity],
        ports: &[PortSpec],
    ) {
        for &local in subjects {
            for &peer in peers {
                for &(port, protocol) in ports {
                    self.allow
                        .entry(PolicyKey {
                            direction,
                            local_identity: local,
                            peer_identity: peer,
                            port,
                            protocol,
                        })
                        .or_default()
                        .insert(policy.to_owned());
                }
            }
        }
    }

    fn enforce(&mut self, direction: Direction, subjects: &[NumericIdentity]) {
        for &local_identity in subjects {
            self.out.enforcement.insert(EnforcementEntry {
                direction,
                local_identity,
            });
        }
    }

    fn warn(&mut self, message: String) {
        self.out.warnings.push(message);
    }

    fn namespaced(requirements: Vec<Requirement>, namespace: &str) -> Vec<Requirement> {
        let mut requirements = requirements;
        requirements.push(Requirement::In(
            NAMESPACE_LABEL_KEY.to_owned(),
            BTreeSet::from([namespace.to_owned()]),
        ));
        requirements
    }

    fn network_policy(&mut self, key: &NamespacedName, policy: &NetworkPolicy) {
        let what = format!("NetworkPolicy {key}");
        let Some(spec) = policy.spec.as_ref() else {
            return;
        };
        let mut warnings = Vec::new();
        let subject = spec
            .pod_selector
            .as_ref()
            .map_or(Some(Vec::new()), |s| requirements(s, &what, &mut warnings));
        self.out.warnings.append(&mut warnings);
        let Some(subject) = subject else {
            return;
        };
        let subjects = self.subjects(&Selector {
            requirements: Self::namespaced(subject, &key.namespace),
            namespace: None,
        });
        let types: Vec<&str> = spec
            .policy_types
            .iter()
            .flatten()
            .map(String::as_str)
            .collect();
        let ingress_on = types.contains(&"Ingress") || types.is_empty();
        let egress_on = types.contains(&"Egress") || (types.is_empty() && spec.egress.is_some());
        if ingress_on {
            self.enforce(Direction::Ingress, &subjects);
            for rule in spec.ingress.iter().flatten() {
                let peers = self.k8s_peers(&what, &key.namespace, rule.from.as_deref());
                let ports = self.k8s_ports(&what, rule.ports.as_deref());
                self.allow(&what, Direction::Ingress, &subjects, &peers, &ports);
            }
        }
        if egress_on {
            self.enforce(Direction::Egress, &subjects);
            for rule in spec.egress.iter().flatten() {
                let peers = self.k8s_peers(&what, &key.namespace, rule.to.as_deref());
                let ports = self.k8s_ports(&what, rule.ports.as_deref());
                self.allow(&what, Direction::Egress, &subjects, &peers, &ports);
            }
        }
    }

    fn k8s_peers(
        &mut self,
        what: &str,
        namespace: &str,
        peers: Option<&[NetworkPolicyPeer]>,
    ) -> Vec<NumericIdentity> {
        let peers = peers.unwrap_or_default();
        if peers.is_empty() {
            return vec![any_identity()];
        }
        let mut out = BTreeSet::new();
        for peer in peers {
            if peer.ip_block.is_some() {
                self.warn(format!("{what}: ipBlock peers are not compiled; ignored"));
                continue;
            }
            let mut warnings = Vec::new();
            let pods = peer
                .pod_selector
                .as_ref()
                .map_or(Some(Vec::new()), |s| requirements(s, what, &mut warnings));
            let namespaces = peer
                .namespace_selector
                .as_ref()
                .map(|s| requirements(s, what, &mut warnings));
            self.out.warnings.append(&mut warnings);
            let selector = match (pods, namespaces) {
                (Some(pods), None) => Selector {
                    requirements: Self::namespaced(pods, namespace),
                    namespace: None,
                },
                (Some(pods), Some(Some(namespaces))) => Selector {
                    requirements: pods,
                    namespace: Some(namespaces),
                },
                _ => continue,
            };
            out.extend(self.peers(&selector));
        }
        out.into_iter().collect()
    }

    fn k8s_ports(&mut self, what: &str, ports: Option<&[NetworkPolicyPort]>) -> Vec<PortSpec> {
        let ports = ports.unwrap_or_default();
        if ports.is_empty() {
            return vec![(ANY_PORT, L4Protocol::Any)];
        }
        let mut out = Vec::new();
        for port in ports {
            let protocol = match port.protocol.as_deref().unwrap_or("TCP") {
                "TCP" => L4Protocol::Tcp,
                "UDP" => L4Protocol::Udp,
                "SCTP" => L4Protocol::Sctp,
                other => {
                    self.warn(format!(
                        "{what}: protocol {other:?} is not TCP, UDP or SCTP; port ignored"
                    ));
                    continue;
                }
            };
            let first = match &port.port {
                None => {
                    out.push((ANY_PORT, protocol));
                    continue;
                }
                Some(IntOrString::Int(n)) => *n,
                Some(IntOrString::String(name)) => match name.parse::<i32>() {
                    Ok(n) => n,
                    Err(_) => {
                        self.warn(format!(
                            "{what}: named port {name:?} is not compiled; port ignored"
                        ));
                        continue;
                    }
                },
            };
            self.port_range(what, first, port.end_port, protocol, &mut out);
        }
        out
    }

    fn port_range(
        &mut self,
        what: &str,
        first: i32,
        end: Option<i32>,
        protocol: L4Protocol,
        out: &mut Vec<PortSpec>,
    ) {
        let last = end.unwrap_or(first);
        let valid = |p: i32| (1..=65535).contains(&p);
        if !valid(first) || !valid(last) || last < first {
            self.warn(format!(
                "{what}: port {first}{} is not a port or range of ports; ignored",
                end.map(|e| format!("-{e}")).unwrap_or_default()
            ));
            return;
        }
        if u32::try_from(last - first).unwrap_or(u32::MAX) >= MAX_PORT_RANGE {
            self.warn(format!(
                "{what}: port range {first}-{last} is wider than {MAX_PORT_RANGE} ports; ignored"
            ));
            return;
        }
        for port in first..=last {
            out.push((u16::try_from(port).unwrap_or(ANY_PORT), protocol));
        }
    }

    fn cilium_policy(&mut self, key: &NamespacedName, policy: &CiliumNetworkPolicy) {
        let what = format!("CiliumNetworkPolicy {key}");
        for rule in policy.rules() {
            let mut warnings = Vec::new();
            let subject = rule
                .endpoint_selector
                .as_ref()
                .map_or(Some(Vec::new()), |s| requirements(s, &what, &mut warnings));
            self.out.warnings.append(&mut warnings);
            let Some(subject) = subject else {
                continue;
            };
            let subjects = self.subjects(&Selector {
                requirements: Self::namespaced(subject, &key.namespace),
                namespace: None,
            });
            if !rule.ingress.is_empty() {
                self.enforce(Direction::Ingress, &subjects);
            }
            for ingress in &rule.ingress {
                let ports = self.cilium_ports(&what, &ingress.to_ports);
                let peers = self.cilium_peers(
                    &what,
                    &key.namespace,
                    &ingress.from_endpoints,
                    ports.is_some(),
                );
                let ports = ports.unwrap_or_else(|| vec![(ANY_PORT, L4Protocol::Any)]);
                self.allow(&what, Direction::Ingress, &subjects, &peers, &ports);
            }
            if !rule.egress.is_empty() {
                self.enforce(Direction::Egress, &subjects);
            }
            for egress in &rule.egress {
                let ports = self.cilium_ports(&what, &egress.to_ports);
                let peers =
                    self.cilium_peers(&what, &key.namespace, &egress.to_endpoints, ports.is_some());
                let ports = ports.unwrap_or_else(|| vec![(ANY_PORT, L4Protocol::Any)]);
                self.allow(&what, Direction::Egress, &subjects, &peers, &ports);
            }
        }
    }

    /// Peers of a Cilium rule. No selector: every peer if the rule lists ports, else none
    /// (the rule only enables default-deny).
    fn cilium_peers(
        &mut self,
        what: &str,
        namespace: &str,
        selectors: &[LabelSelector],
        has_ports: bool,
    ) -> Vec<NumericIdentity> {
        if selectors.is_empty() {
            return if has_ports {
                vec![any_identity()]
            } else {
                Vec::new()
            };
        }
        let mut out = BTreeSet::new();
        for selector in selectors {
            let mut warnings = Vec::new();
            let requirements = requirements(selector, what, &mut warnings);
            self.out.warnings.append(&mut warnings);
            let Some(requirements) = requirements else {
                continue;
            };
            let requirements = if mentions(&requirements, NAMESPACE_LABEL_KEY) {
                requirements
            } else {
                Self::namespaced(requirements, namespace)
            };
            out.extend(self.peers(&Selector {
                requirements,
                namespace: None,
            }));
        }
        out.into_iter().collect()
    }

    /// `None` when the rule lists no ports (every port).
    fn cilium_ports(
        &mut self,
        what: &str,
        rules: &[cluster_source::PortRule],
    ) -> Option<Vec<PortSpec>> {
        let ports: Vec<&PortProtocol> = rules.iter().flat_map(|r| r.ports.iter()).collect();
        if ports.is_empty() {
            return None;
        }
        let mut out = Vec::new();
        for port in ports {
            let text = port.port.trim();
            if text.is_empty() || text == "0" {
                out.push((ANY_PORT, port.protocol));
                continue;
            }
            match text.parse::<i32>() {
                Ok(first) => self.port_range(what, first, port.end_port, port.protocol, &mut out),
                Err(_) => self.warn(format!(
                    "{what}: named port {text:?} is not compiled; port ignored"
                )),
            }
        }
        Some(out)
    }
}

/// A policy's namespace (`default` when unset) and name.
pub fn object_key(meta: &ObjectMeta) -> NamespacedName {
    let namespace = meta
        .namespace
        .as_deref()
        .filter(|ns| !ns.is_empty())
        .unwrap_or(cluster_source::DEFAULT_NAMESPACE);
    NamespacedName::new(namespace, meta.name.clone().unwrap_or_default())
}

fn any_identity() -> NumericIdentity {
    NumericIdentity::new(ANY_IDENTITY).unwrap_or_else(|_| unreachable!("0 fits in 24 bits"))
}

/// Compiles every policy of `input`.
pub fn compile(input: PolicyInput) -> CompiledPolicy {
    let known = input
        .identities
        .iter()
        .map(|(id, labels)| {
            let mut map: BTreeMap<&str, &str> = BTreeMap::new();
            for label in labels.iter() {
                if label.source() == model::label::K8S_SOURCE {
                    map.insert(label.key(), label.value());
                } else {
                    map.entry(label.key()).or_insert(label.value());
                }
            }
            Known {
                id: *id,
                labels: map,
            }
        })
        .collect();
    let mut compiler = Compiler {
        input,
        known,
        empty_namespace_labels: BTreeMap::new(),
        out: CompiledPolicy::default(),
        allow: BTreeMap::new(),
    };
    for policy in input.network_policies {
        compiler.network_policy(&object_key(&policy.metadata), policy);
    }
    for policy in input.cilium_policies {
        compiler.cilium_policy(&object_key(&policy.metadata), policy);
    }
    let mut out = compiler.out;
    out.allow = compiler
        .allow
        .into_iter()
        .map(|(key, policies)| PolicyEntry {
            key,
            policies: policies.into_iter().collect(),
        })
        .collect();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn label(key: &str, value: &str) -> Label {
        Label::new("k8s", key, value).unwrap()
    }

    fn id(v: u32) -> NumericIdentity {
        NumericIdentity::new(v).unwrap()
    }

    struct World {
        local: ClusterName,
        endpoints: BTreeSet<NumericIdentity>,
        identities: BTreeMap<NumericIdentity, Vec<Label>>,
        namespaces: BTreeMap<String, BTreeMap<String, String>>,
        np: Vec<NetworkPolicy>,
        cnp: Vec<CiliumNetworkPolicy>,
    }

    /// Local cluster a (id 1): shop/web (65792) and shop/db (65793) local endpoints.
    /// Remote b: shop/web (131328), blog/web (131329). Remote c: shop/web (196864).
    fn world() -> World {
        let ident = |cluster: &str, ns: &str, app: &str| {
            vec![
                label("app", app),
                label(CLUSTER_LABEL_KEY, cluster),
                label(NAMESPACE_LABEL_KEY, ns),
            ]
        };
        World {
            local: ClusterName::new("a").unwrap(),
            endpoints: [id(65792), id(65793)].into(),
            identities: BTreeMap::from([
                (id(65792), ident("a", "shop", "web")),
                (id(65793), ident("a", "shop", "db")),
                (id(131328), ident("b", "shop", "web")),
                (id(131329), ident("b", "blog", "web")),
                (id(196864), ident("c", "shop", "web")),
            ]),
            namespaces: BTreeMap::from([(
                "blog".to_owned(),
                BTreeMap::from([("team".to_owned(), "blue".to_owned())]),
            )]),
            np: Vec::new(),
            cnp: Vec::new(),
        }
    }

    impl World {
        fn np(mut self, name: &str, spec: serde_json::Value) -> Self {
            let policy: NetworkPolicy = serde_json::from_value(json!({
                "metadata": {"namespace": "shop", "name": name}, "spec": spec
            }))
            .unwrap();
            self.np.push(policy);
            self
        }

        fn cnp(mut self, name: &str, spec: serde_json::Value) -> Self {
            let policy: CiliumNetworkPolicy = serde_json::from_value(json!({
                "metadata": {"namespace": "shop", "name": name}, "spec": spec
            }))
            .unwrap();
            self.cnp.push(policy);
            self
        }

        fn compile_with(&self, options: PolicyOptions) -> CompiledPolicy {
            let identities: BTreeMap<NumericIdentity, &[Label]> = self
                .identities
                .iter()
                .map(|(k, v)| (*k, v.as_slice()))
                .collect();
            compile(PolicyInput {
                local_cluster: &self.local,
                local_endpoints: &self.endpoints,
                identities: &identities,
                namespaces: &self.namespaces,
                network_policies: &self.np,
                cilium_policies: &self.cnp,
                options,
            })
        }

        fn compile(&self) -> CompiledPolicy {
            self.compile_with(PolicyOptions::default())
        }
    }

    fn allowed(policy: &CompiledPolicy) -> BTreeSet<(Direction, u32, u32, u16, L4Protocol)> {
        policy
            .allow
            .values()
            .map(|e| {
                (
                    e.key.direction,
                    e.key.local_identity.get(),
                    e.key.peer_identity.get(),
                    e.key.port,
                    e.key.protocol,
                )
            })
            .collect()
    }

    const IN: Direction = Direction::Ingress;

    #[test]
    fn network_policy_with_cluster_label() {
        let compiled = world()
            .np(
                "web-from-b",
                json!({
                    "podSelector": {"matchLabels": {"app": "web"}},
                    "ingress": [{
                        "from": [{"podSelector": {"matchLabels": {
                            "app": "web", "io.cilium.k8s.policy.cluster": "b"}}}],
                        "ports": [{"port": 8080}]
                    }]
                }),
            )
            .compile();
        assert_eq!(
            allowed(&compiled),
            BTreeSet::from([(IN, 65792, 131328, 8080, L4Protocol::Tcp)]),
            "only b's web pods in the policy's namespace"
        );
        assert_eq!(compiled.enforcement.len(), 1);
        assert!(compiled.warnings.is_empty(), "{:?}", compiled.warnings);
    }

    #[test]
    fn without_cluster_label_every_cluster_or_only_local() {
        let w = world().np(
            "web-from-web",
            json!({
                "podSelector": {},
                "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "web"}}}]}]
            }),
        );
        let peers = |c: &CompiledPolicy| -> BTreeSet<u32> {
            c.allow
                .values()
                .map(|e| e.key.peer_identity.get())
                .collect()
        };
        assert_eq!(peers(&w.compile()), BTreeSet::from([65792, 131328, 196864]));
        assert_eq!(
            peers(&w.compile_with(PolicyOptions {
                default_local_cluster: true
            })),
            BTreeSet::from([65792])
        );
        // Both local endpoints are subjects.
        assert_eq!(w.compile().enforcement.len(), 2);
    }

    #[test]
    fn selecting_nothing_remote_opens_nothing() {
        let compiled = world()
            .np(
                "from-unknown-cluster",
                json!({
                    "podSelector": {"matchLabels": {"app": "web"}},
                    "ingress": [{"from": [{"podSelector": {"matchLabels": {
                        "io.cilium.k8s.policy.cluster": "nowhere"}}}]}]
                }),
            )
            .cnp(
                "cnp-unknown",
                json!({
                    "endpointSelector": {"matchLabels": {"app": "db"}},
                    "ingress": [{"fromEndpoints": [{"matchLabels": {
                        "k8s:io.cilium.k8s.policy.cluster": "nowhere"}}],
                        "toPorts": [{"ports": [{"port": "5432", "protocol": "TCP"}]}]}]
                }),
            )
            .compile();
        assert!(compiled.allow.is_empty(), "{:?}", compiled.allow);
        assert_eq!(
            compiled.enforcement.len(),
            2,
            "but the subjects are under default-deny"
        );
    }

    #[test]
    fn namespace_selector_and_ports() {
        let compiled = world()
            .np(
                "from-blue",
                json!({
                    "podSelector": {"matchLabels": {"app": "db"}},
                    "policyTypes": ["Ingress", "Egress"],
                    "ingress": [{
                        "from": [{"namespaceSelector": {"matchLabels": {"team": "blue"}},
                                  "podSelector": {}},
                                 {"ipBlock": {"cidr": "10.0.0.0/8"}}],
                        "ports": [{"port": 53, "protocol": "UDP"},
                                  {"port": 9000, "endPort": 9001},
                                  {"port": "metrics"}]
                    }],
                    "egress": [{}]
                }),
            )
            .compile();
        assert_eq!(
            allowed(&compiled),
            BTreeSet::from([
                (IN, 65793, 131329, 53, L4Protocol::Udp),
                (IN, 65793, 131329, 9000, L4Protocol::Tcp),
                (IN, 65793, 131329, 9001, L4Protocol::Tcp),
                (Direction::Egress, 65793, 0, 0, L4Protocol::Any),
            ])
        );
        assert_eq!(compiled.warnings.len(), 2, "{:?}", compiled.warnings);
        assert_eq!(compiled.enforcement.len(), 2, "ingress and egress of db");
    }

    #[test]
    fn cilium_policy_rules() {
        let compiled = world()
            .cnp(
                "web",
                json!({
                    "endpointSelector": {"matchLabels": {"any:app": "web"}},
                    "ingress": [
                        {"fromEndpoints": [{"matchLabels": {"k8s:app": "web",
                            "k8s:io.kubernetes.pod.namespace": "blog"}}],
                         "toPorts": [{"ports": [{"port": "80", "protocol": "TCP"}]}]},
                        {"toPorts": [{"ports": [{"port": "443"}]}]}
                    ],
                    "egress": [{}]
                }),
            )
            .compile();
        assert_eq!(
            allowed(&compiled),
            BTreeSet::from([
                (IN, 65792, 131329, 80, L4Protocol::Tcp),
                (IN, 65792, 0, 443, L4Protocol::Any),
            ])
        );
        assert_eq!(compiled.enforcement.len(), 2, "ingress and (empty) egress");
    }

    #[test]
    fn expressions_and_unknown_sources() {
        let compiled = world()
            .np(
                "expr",
                json!({
                    "podSelector": {"matchExpressions": [
                        {"key": "app", "operator": "In", "values": ["web", "db"]}]},
                    "ingress": [{"from": [{"podSelector": {"matchExpressions": [
                        {"key": "io.cilium.k8s.policy.cluster", "operator": "NotIn", "values": ["a", "b"]},
                        {"key": "app", "operator": "Exists"}]}}]}]
                }),
            )
            .cnp(
                "reserved",
                json!({
                    "endpointSelector": {},
                    "ingress": [{"fromEndpoints": [{"matchLabels": {"reserved:host": ""}}]}]
                }),
            )
            .compile();
        assert_eq!(
            allowed(&compiled),
            BTreeSet::from([
                (IN, 65792, 196864, 0, L4Protocol::Any),
                (IN, 65793, 196864, 0, L4Protocol::Any),
            ])
        );
        assert_eq!(compiled.warnings.len(), 1, "{:?}", compiled.warnings);
    }

    proptest! {
        /// Whatever the policy, every allowed peer is either "any" or an identity its
        /// selector matches, and nothing is allowed for a non-subject.
        #[test]
        fn allow_entries_are_grounded(
            cluster in prop_oneof![Just("a"), Just("b"), Just("c"), Just("zz")],
            app in prop_oneof![Just("web"), Just("db"), Just("none")],
        ) {
            let w = world().np("p", json!({
                "podSelector": {"matchLabels": {"app": "web"}},
                "ingress": [{"from": [{"podSelector": {"matchLabels": {
                    "app": app, "io.cilium.k8s.policy.cluster": cluster}}}]}]
            }));
            let compiled = w.compile();
            for e in compiled.allow.values() {
                prop_assert_eq!(e.key.local_identity.get(), 65792);
                let labels = &w.identities[&e.key.peer_identity];
                prop_assert!(labels.contains(&label(CLUSTER_LABEL_KEY, cluster)));
                prop_assert!(labels.contains(&label("app", app)));
            }
            let expected = w.identities.values().filter(|l| {
                l.contains(&label(CLUSTER_LABEL_KEY, cluster))
                    && l.contains(&label("app", app))
                    && l.contains(&label(NAMESPACE_LABEL_KEY, "shop"))
            }).count();
            prop_assert_eq!(compiled.allow.len(), expected);
        }
    }
}
