//! Global services as published to peers: frontends to match and backends to send to.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::cluster::ClusterId;
use crate::keys::StateKey;
use crate::name::{ClusterName, DnsLabel, DnsSubdomain};
use crate::value::{PortPlace, SchemaVersion, StoreValue, ValueError};

/// A transport protocol, spelled as Kubernetes spells it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Protocol {
    /// TCP.
    #[serde(rename = "TCP")]
    Tcp,
    /// UDP.
    #[serde(rename = "UDP")]
    Udp,
    /// SCTP.
    #[serde(rename = "SCTP")]
    Sctp,
}

/// An L4 protocol as Cilium's network policies name it: a [`Protocol`] or `ANY`.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub enum L4Protocol {
    /// `TCP`.
    #[serde(rename = "TCP")]
    Tcp,
    /// `UDP`.
    #[serde(rename = "UDP")]
    Udp,
    /// `SCTP`.
    #[serde(rename = "SCTP")]
    Sctp,
    /// `ANY`: every protocol.
    #[default]
    #[serde(rename = "ANY")]
    Any,
}

impl fmt::Display for L4Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            L4Protocol::Tcp => "TCP",
            L4Protocol::Udp => "UDP",
            L4Protocol::Sctp => "SCTP",
            L4Protocol::Any => "ANY",
        })
    }
}

/// A protocol and port number.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct L4Port {
    /// The protocol.
    pub protocol: Protocol,
    /// The port number; never 0.
    pub port: u16,
}

/// Ports by name (`""` for the unnamed port of a single-port service).
pub type PortMap = BTreeMap<String, L4Port>;

/// One backend address of a service, with its EndpointSlice conditions.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Backend {
    /// The ports the backend serves, by service port name.
    pub ports: PortMap,
    /// Ready to receive new connections.
    pub ready: bool,
    /// Serving, even if terminating: a fallback when no backend is ready.
    pub serving: bool,
    /// Shutting down: new connections only when nothing else is serving.
    pub terminating: bool,
    /// The topology zone it runs in, for zone-aware routing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    /// The node it runs on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<DnsSubdomain>,
    /// Its hostname, for headless services.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<DnsLabel>,
}

/// `cilium/state/services/v1/<cluster>/<namespace>/<name>`: one cluster's part of a global
/// service.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ClusterService {
    /// Schema version (1).
    pub schema: SchemaVersion<1>,
    /// The publishing cluster; must match the key and the publisher.
    pub cluster: ClusterName,
    /// That cluster's id.
    pub cluster_id: ClusterId,
    /// The service's namespace.
    pub namespace: DnsLabel,
    /// The service's name.
    pub name: DnsLabel,
    /// Cluster IPs and other VIPs, each with its ports.
    pub frontends: BTreeMap<IpAddr, PortMap>,
    /// Backends by address; empty when the cluster does not share them.
    pub backends: BTreeMap<IpAddr, Backend>,
    /// Whether other clusters may use this cluster's backends.
    pub shared: bool,
    /// Whether this cluster wants other clusters' backends.
    pub include_external: bool,
    /// The service's labels.
    pub labels: BTreeMap<String, String>,
    /// The service's pod selector.
    pub selector: BTreeMap<String, String>,
}

impl ClusterService {
    /// The service's state key.
    pub fn key(&self) -> StateKey {
        StateKey::Service {
            cluster: self.cluster.clone(),
            namespace: self.namespace.clone(),
            name: self.name.clone(),
        }
    }
}

fn check_ports(place: impl Fn() -> PortPlace, ports: &PortMap) -> Result<(), ValueError> {
    match ports.iter().find(|(_, p)| p.port == 0) {
        Some((name, _)) => Err(ValueError::ZeroPort {
            place: place(),
            name: name.clone(),
        }),
        None => Ok(()),
    }
}

impl StoreValue for ClusterService {
    const SCHEMA: u32 = 1;
    const WHAT: &'static str = "service";

    fn validate(&self) -> Result<(), ValueError> {
        for (ip, ports) in &self.frontends {
            check_ports(|| PortPlace::Frontend(*ip), ports)?;
        }
        for (ip, backend) in &self.backends {
            check_ports(|| PortPlace::Backend(*ip), &backend.ports)?;
        }
        Ok(())
    }
}

/// How an exported service is reached, as the Multi-Cluster Services API names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ExportType {
    /// Through a virtual IP in each importing cluster.
    #[serde(rename = "ClusterSetIP")]
    ClusterSetIp,
    /// Directly at the backends' addresses.
    Headless,
}

/// `cilium/state/serviceexports/v1/<cluster>/<namespace>/<name>`: a service exported through
/// the Multi-Cluster Services API.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ServiceExport {
    /// Schema version (1).
    pub schema: SchemaVersion<1>,
    /// The exporting cluster; must match the key and the publisher.
    pub cluster: ClusterName,
    /// That cluster's id.
    pub cluster_id: ClusterId,
    /// The service's namespace.
    pub namespace: DnsLabel,
    /// The service's name.
    pub name: DnsLabel,
    /// How importers reach it.
    #[serde(rename = "type")]
    pub export_type: ExportType,
    /// The exported ports, by name.
    pub ports: PortMap,
    /// Labels to put on the imported service.
    pub labels: BTreeMap<String, String>,
    /// Annotations to put on the imported service.
    pub annotations: BTreeMap<String, String>,
}

impl ServiceExport {
    /// The export's state key.
    pub fn key(&self) -> StateKey {
        StateKey::ServiceExport {
            cluster: self.cluster.clone(),
            namespace: self.namespace.clone(),
            name: self.name.clone(),
        }
    }
}

impl StoreValue for ServiceExport {
    const SCHEMA: u32 = 1;
    const WHAT: &'static str = "service export";

    fn validate(&self) -> Result<(), ValueError> {
        check_ports(|| PortPlace::Export, &self.ports)
    }
}
