//! Our own serde model of Cilium's `CiliumNetworkPolicy` (`cilium.io/v2`).
//!
//! Only the part of the policy language this project enforces is modelled: an endpoint
//! selector and ingress/egress rules by peer endpoint labels and L4 ports. Every other field
//! (`fromCIDR`, `toFQDNs`, L7 rules, ...) is ignored when reading, so a policy written for
//! Cilium parses here; it is simply not enforced beyond what is modelled.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use model::L4Protocol;
use serde::{Deserialize, Deserializer, Serialize};

/// The label by which a selector names the cluster an endpoint runs in.
pub const CLUSTER_LABEL: &str = "io.cilium.k8s.policy.cluster";

/// A `CiliumNetworkPolicy`: namespaced, holding one rule in `spec` and/or several in `specs`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CiliumNetworkPolicy {
    /// Standard object metadata.
    #[serde(default)]
    pub metadata: ObjectMeta,
    /// The policy rule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spec: Option<PolicyRule>,
    /// Further policy rules, all applying together with `spec`.
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "null_as_default"
    )]
    pub specs: Vec<PolicyRule>,
}

impl CiliumNetworkPolicy {
    /// Every rule of the policy: `spec` first, then `specs`.
    pub fn rules(&self) -> impl Iterator<Item = &PolicyRule> {
        self.spec.iter().chain(self.specs.iter())
    }
}

impl k8s_openapi::Resource for CiliumNetworkPolicy {
    const API_VERSION: &'static str = "cilium.io/v2";
    const GROUP: &'static str = "cilium.io";
    const KIND: &'static str = "CiliumNetworkPolicy";
    const VERSION: &'static str = "v2";
    const URL_PATH_SEGMENT: &'static str = "ciliumnetworkpolicies";
    type Scope = k8s_openapi::NamespaceResourceScope;
}

impl k8s_openapi::ListableResource for CiliumNetworkPolicy {
    const LIST_KIND: &'static str = "CiliumNetworkPolicyList";
}

impl k8s_openapi::Metadata for CiliumNetworkPolicy {
    type Ty = ObjectMeta;

    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn metadata_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// One policy rule: which endpoints it applies to and what they may receive and send.
///
/// Cilium's semantics: an endpoint selected by any rule with ingress (egress) rules is in
/// default-deny for that direction; each listed rule allows some traffic.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyRule {
    /// The endpoints (pods) the rule applies to. An empty selector selects every endpoint
    /// of the policy's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint_selector: Option<LabelSelector>,
    /// Traffic the selected endpoints may receive.
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "null_as_default"
    )]
    pub ingress: Vec<IngressRule>,
    /// Traffic the selected endpoints may send.
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "null_as_default"
    )]
    pub egress: Vec<EgressRule>,
    /// Free text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// Allows traffic into the selected endpoints.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IngressRule {
    /// Peers allowed to connect, by endpoint labels (may name the peer's cluster with
    /// [`CLUSTER_LABEL`]). Empty: any peer the other fields allow.
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "null_as_default"
    )]
    pub from_endpoints: Vec<LabelSelector>,
    /// Destination ports allowed. Empty: every port.
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "null_as_default"
    )]
    pub to_ports: Vec<PortRule>,
}

/// Allows traffic out of the selected endpoints.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EgressRule {
    /// Peers that may be reached, by endpoint labels (may name the peer's cluster with
    /// [`CLUSTER_LABEL`]). Empty: any peer the other fields allow.
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "null_as_default"
    )]
    pub to_endpoints: Vec<LabelSelector>,
    /// Destination ports allowed. Empty: every port.
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "null_as_default"
    )]
    pub to_ports: Vec<PortRule>,
}

/// A set of L4 ports.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PortRule {
    /// The ports; any one matching allows the traffic.
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "null_as_default"
    )]
    pub ports: Vec<PortProtocol>,
}

/// One L4 port (or range) and protocol.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PortProtocol {
    /// The port number (Cilium writes it as a string; a YAML number is accepted too). `"0"`
    /// or empty means every port. Named ports are kept as written.
    #[serde(default, deserialize_with = "port_string")]
    pub port: String,
    /// The last port of a range starting at `port`, if a range.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_port: Option<i32>,
    /// The protocol; `ANY` when absent.
    #[serde(default)]
    pub protocol: L4Protocol,
}

/// Reads `null` as the type's default (JSON from the API server may carry explicit nulls).
fn null_as_default<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
}

/// Reads a port given as a string or as a non-negative number.
fn port_string<'de, D: Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Port {
        Number(u64),
        Text(String),
    }
    match Option::<Port>::deserialize(deserializer)? {
        None => Ok(String::new()),
        Some(Port::Number(n)) => Ok(n.to_string()),
        Some(Port::Text(s)) => Ok(s),
    }
}
