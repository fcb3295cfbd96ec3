//! A local cluster's objects, and its manifests written the way Kubernetes holds them: Nodes
//! with their pod CIDR and underlay address, Namespaces, Pods with their CNI-given address,
//! node and readiness, Services with cluster IPs from the service CIDR, EndpointSlices derived
//! from each Service's selector and its pods' readiness, and network policies as applied.
//!
//! What `dev apply` accepts ([`parse_apply`]): `Namespace`, `Pod`, `Deployment` (expanded into
//! pods `<name>-<i>`, spread over the nodes in turn), `Service`, `NetworkPolicy` and
//! `CiliumNetworkPolicy`.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// A manifest `dev apply` cannot use; messages name the object and field.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// Not YAML.
    #[error("document {index}: {source}")]
    Yaml {
        /// The 1-based document number.
        index: usize,
        /// The parser's complaint.
        source: serde_yaml_ng::Error,
    },
    /// A kind `dev apply` does not handle.
    #[error(
        "document {index}: kind {kind:?} is not supported (Namespace, Pod, Deployment, Service, \
         NetworkPolicy, CiliumNetworkPolicy)"
    )]
    Kind {
        /// The 1-based document number.
        index: usize,
        /// The kind found.
        kind: String,
    },
    /// A field is missing or wrong.
    #[error("{object}: {detail}")]
    Invalid {
        /// `Kind namespace/name` (or the document number).
        object: String,
        /// What is wrong.
        detail: String,
    },
}

/// A transport protocol a pod serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Protocol {
    /// TCP.
    #[serde(rename = "TCP")]
    Tcp,
    /// UDP.
    #[serde(rename = "UDP")]
    Udp,
}

/// A port a pod's echo server listens on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodPort {
    /// The container port's name, if any.
    pub name: Option<String>,
    /// The port.
    pub port: u16,
    /// The protocol.
    pub protocol: Protocol,
}

/// The ports of a pod whose containers declare none: TCP and UDP 8080.
pub fn default_ports() -> Vec<PodPort> {
    [Protocol::Tcp, Protocol::Udp]
        .into_iter()
        .map(|protocol| PodPort {
            name: None,
            port: 8080,
            protocol,
        })
        .collect()
}

/// Where a pod should run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Placement {
    /// On the node its spec names.
    Node(String),
    /// On the nodes in turn: replica `i` on node `i % nodes`.
    Replica(usize),
    /// On the node with the fewest pods.
    Any,
}

/// A pod to run, from a `Pod` or a `Deployment`'s template.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodTemplate {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// Its containers, as written (for the manifest).
    pub containers: Value,
    /// The ports its echo server serves.
    pub ports: Vec<PodPort>,
    /// Where it runs.
    pub placement: Placement,
    /// The Deployment it belongs to.
    pub owner: Option<String>,
}

/// What one `dev apply` asks for.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Applied {
    /// Pods to run.
    pub pods: Vec<PodTemplate>,
    /// For each Deployment (namespace, name), its pods' names: others it owns go.
    pub deployments: BTreeMap<(String, String), BTreeSet<String>>,
    /// Namespaces, Services and policies, as written (a Service's cluster IP is allocated
    /// when it has none).
    pub objects: Vec<Value>,
}

fn str_at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    path.iter().try_fold(v, |v, k| v.get(k))?.as_str()
}

fn labels_of(v: Option<&Value>, object: &str) -> Result<BTreeMap<String, String>, ManifestError> {
    let Some(v) = v.filter(|v| !v.is_null()) else {
        return Ok(BTreeMap::new());
    };
    let map = v.as_object().ok_or_else(|| ManifestError::Invalid {
        object: object.to_owned(),
        detail: "labels: a map of strings".to_owned(),
    })?;
    map.iter()
        .map(|(k, v)| match v.as_str() {
            Some(s) => Ok((k.clone(), s.to_owned())),
            None => Err(ManifestError::Invalid {
                object: object.to_owned(),
                detail: format!("labels.{k}: a string"),
            }),
        })
        .collect()
}

fn ports_of(containers: &Value, object: &str) -> Result<Vec<PodPort>, ManifestError> {
    let invalid = |detail: String| ManifestError::Invalid {
        object: object.to_owned(),
        detail,
    };
    let list = containers
        .as_array()
        .filter(|l| !l.is_empty())
        .ok_or_else(|| invalid("containers: at least one container".to_owned()))?;
    let mut ports = Vec::new();
    for (i, container) in list.iter().enumerate() {
        for (j, port) in container
            .get("ports")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .enumerate()
        {
            let at = format!("containers[{i}].ports[{j}]");
            let number = port
                .get("containerPort")
                .and_then(Value::as_u64)
                .and_then(|p| u16::try_from(p).ok())
                .filter(|p| *p > 0)
                .ok_or_else(|| invalid(format!("{at}.containerPort: a port 1..=65535")))?;
            let protocol = match port.get("protocol").and_then(Value::as_str) {
                None | Some("TCP") => Protocol::Tcp,
                Some("UDP") => Protocol::Udp,
                Some(other) => {
                    return Err(invalid(format!(
                        "{at}.protocol: {other:?} (TCP or UDP; mesh-echo serves no SCTP)"
                    )));
                }
            };
            ports.push(PodPort {
                name: port.get("name").and_then(Value::as_str).map(str::to_owned),
                port: number,
                protocol,
            });
        }
    }
    Ok(if ports.is_empty() {
        default_ports()
    } else {
        ports
    })
}

fn name_and_namespace(
    doc: &Value,
    kind: &str,
    index: usize,
) -> Result<(String, String), ManifestError> {
    let name = str_at(doc, &["metadata", "name"])
        .filter(|n| !n.is_empty())
        .ok_or_else(|| ManifestError::Invalid {
            object: format!("document {index} ({kind})"),
            detail: "metadata.name is missing".to_owned(),
        })?;
    let namespace = str_at(doc, &["metadata", "namespace"]).unwrap_or("default");
    Ok((namespace.to_owned(), name.to_owned()))
}

/// Parses `dev apply`'s YAML (one or more documents).
pub fn parse_apply(text: &str) -> Result<Applied, ManifestError> {
    let mut applied = Applied::default();
    for (i, document) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let index = i + 1;
        let doc =
            Value::deserialize(document).map_err(|source| ManifestError::Yaml { index, source })?;
        if doc.is_null() {
            continue;
        }
        let kind = str_at(&doc, &["kind"]).unwrap_or_default().to_owned();
        let (namespace, name) = name_and_namespace(&doc, &kind, index)?;
        let object = format!("{kind} {namespace}/{name}");
        let invalid = |detail: &str| ManifestError::Invalid {
            object: object.clone(),
            detail: detail.to_owned(),
        };
        match kind.as_str() {
            "Pod" => {
                let containers = doc["spec"]["containers"].clone();
                applied.pods.push(PodTemplate {
                    labels: labels_of(doc["metadata"].get("labels"), &object)?,
                    ports: ports_of(&containers, &object)?,
                    containers,
                    placement: match str_at(&doc, &["spec", "nodeName"]) {
                        Some(node) => Placement::Node(node.to_owned()),
                        None => Placement::Any,
                    },
                    owner: None,
                    namespace,
                    name,
                });
            }
            "Deployment" => {
                let replicas = match doc["spec"].get("replicas") {
                    None | Some(Value::Null) => 1,
                    Some(v) => v
                        .as_u64()
                        .and_then(|r| usize::try_from(r).ok())
                        .filter(|r| *r <= 100)
                        .ok_or_else(|| invalid("spec.replicas: a number 0..=100"))?,
                };
                let template = &doc["spec"]["template"];
                let labels = labels_of(template["metadata"].get("labels"), &object)?;
                if labels.is_empty() {
                    return Err(invalid("spec.template.metadata.labels: at least one label"));
                }
                let containers = template["spec"]["containers"].clone();
                let ports = ports_of(&containers, &object)?;
                let mut names = BTreeSet::new();
                for replica in 0..replicas {
                    let pod = format!("{name}-{replica}");
                    names.insert(pod.clone());
                    applied.pods.push(PodTemplate {
                        namespace: namespace.clone(),
                        name: pod,
                        labels: labels.clone(),
                        containers: containers.clone(),
                        ports: ports.clone(),
                        placement: Placement::Replica(replica),
                        owner: Some(name.clone()),
                    });
                }
                applied.deployments.insert((namespace, name), names);
            }
            "Service" => {
                if doc["spec"]["ports"].as_array().is_none_or(Vec::is_empty) {
                    return Err(invalid("spec.ports: at least one port"));
                }
                applied.objects.push(doc);
            }
            "Namespace" | "NetworkPolicy" | "CiliumNetworkPolicy" => applied.objects.push(doc),
            _ => return Err(ManifestError::Kind { index, kind }),
        }
    }
    Ok(applied)
}

/// The key an applied object replaces: kind, namespace and name.
pub fn object_key(doc: &Value) -> (String, String, String) {
    let kind = str_at(doc, &["kind"]).unwrap_or_default().to_owned();
    let namespace = if kind == "Namespace" {
        String::new()
    } else {
        str_at(doc, &["metadata", "namespace"])
            .unwrap_or("default")
            .to_owned()
    };
    let name = str_at(doc, &["metadata", "name"])
        .unwrap_or_default()
        .to_owned();
    (kind, namespace, name)
}

/// The lowest address of `base/len` that is neither the network address, its first host
/// (Kubernetes gives it to the `kubernetes` Service), the broadcast address nor `used`.
pub fn allocate_ip(base: Ipv4Addr, len: u8, used: &BTreeSet<Ipv4Addr>) -> Option<Ipv4Addr> {
    let base = u32::from(base);
    let size = 1u64 << (32 - u32::from(len));
    (2..size.saturating_sub(1))
        .map(|offset| Ipv4Addr::from(base + offset as u32))
        .find(|ip| !used.contains(ip))
}

/// A node as the manifests show it.
#[derive(Clone, Debug)]
pub struct NodeView<'a> {
    /// Its name.
    pub name: &'a str,
    /// Its pod CIDR.
    pub pod_cidr: String,
    /// Its underlay address.
    pub address: Ipv4Addr,
}

/// A running pod as the manifests show it.
#[derive(Clone, Debug)]
pub struct PodView<'a> {
    /// Its namespace.
    pub namespace: &'a str,
    /// Its name.
    pub name: &'a str,
    /// Its labels.
    pub labels: &'a BTreeMap<String, String>,
    /// Its containers, as applied.
    pub containers: &'a Value,
    /// Its ports.
    pub ports: &'a [PodPort],
    /// Its node.
    pub node: &'a str,
    /// Its node's address.
    pub host_ip: Ipv4Addr,
    /// Its address.
    pub ip: Ipv4Addr,
    /// Whether its server answers.
    pub ready: bool,
}

fn selects(selector: &serde_json::Map<String, Value>, labels: &BTreeMap<String, String>) -> bool {
    selector.iter().all(|(k, v)| {
        v.as_str()
            .is_some_and(|v| labels.get(k).is_some_and(|l| l == v))
    })
}

/// The cluster's manifests: Nodes, Namespaces (`default`, `kube-system` and every namespace
/// used, unless applied), Pods, the applied objects (Services with `cluster_ips`), and one
/// EndpointSlice per Service with a selector.
pub fn render(
    nodes: &[NodeView<'_>],
    pods: &[PodView<'_>],
    objects: &[Value],
    cluster_ips: &BTreeMap<String, Ipv4Addr>,
) -> Vec<Value> {
    let mut docs = Vec::new();
    for node in nodes {
        docs.push(json!({"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": node.name, "labels": {"kubernetes.io/hostname": node.name}},
            "spec": {"podCIDR": node.pod_cidr, "podCIDRs": [node.pod_cidr]},
            "status": {
                "addresses": [{"type": "InternalIP", "address": node.address.to_string()},
                              {"type": "Hostname", "address": node.name}],
                "conditions": [{"type": "Ready", "status": "True"}]}}));
    }
    let explicit: BTreeSet<String> = objects
        .iter()
        .filter(|o| o["kind"] == "Namespace")
        .map(|o| object_key(o).2)
        .collect();
    let mut namespaces: BTreeSet<String> = ["default", "kube-system"].map(str::to_owned).into();
    namespaces.extend(pods.iter().map(|p| p.namespace.to_owned()));
    namespaces.extend(
        objects
            .iter()
            .filter(|o| o["kind"] != "Namespace")
            .map(|o| object_key(o).1),
    );
    for ns in namespaces.difference(&explicit) {
        docs.push(json!({"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": ns, "labels": {"kubernetes.io/metadata.name": ns}}}));
    }
    for pod in pods {
        let ready = if pod.ready { "True" } else { "False" };
        docs.push(json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"namespace": pod.namespace, "name": pod.name, "labels": pod.labels},
            "spec": {"nodeName": pod.node, "containers": pod.containers},
            "status": {"phase": "Running", "podIP": pod.ip.to_string(),
                "podIPs": [{"ip": pod.ip.to_string()}], "hostIP": pod.host_ip.to_string(),
                "conditions": [{"type": "Ready", "status": ready}]}}));
    }
    for object in objects {
        let mut object = object.clone();
        let (kind, namespace, name) = object_key(&object);
        if kind == "Service" {
            object["metadata"]["namespace"] = json!(namespace);
            if let Some(ip) = cluster_ips.get(&format!("{namespace}/{name}")) {
                object["spec"]["clusterIP"] = json!(ip.to_string());
                object["spec"]["clusterIPs"] = json!([ip.to_string()]);
            }
            if let Some(slice) = endpoint_slice(&object, &namespace, &name, pods) {
                docs.push(object);
                docs.push(slice);
                continue;
            }
        }
        docs.push(object);
    }
    docs
}

/// The EndpointSlice of a Service with a selector: its ports resolved against the pods'
/// named container ports, one endpoint per selected pod of its namespace.
fn endpoint_slice(
    service: &Value,
    namespace: &str,
    name: &str,
    pods: &[PodView<'_>],
) -> Option<Value> {
    let selector = service["spec"]["selector"].as_object()?;
    let selected: Vec<&PodView<'_>> = pods
        .iter()
        .filter(|p| p.namespace == namespace && selects(selector, p.labels))
        .collect();
    let ports: Vec<Value> = service["spec"]["ports"]
        .as_array()?
        .iter()
        .map(|port| {
            let protocol = port["protocol"].as_str().unwrap_or("TCP");
            let target = match &port["targetPort"] {
                Value::Number(n) => n.as_u64(),
                Value::String(named) => selected.iter().find_map(|p| {
                    p.ports
                        .iter()
                        .find(|pp| pp.name.as_deref() == Some(named.as_str()))
                        .map(|pp| u64::from(pp.port))
                }),
                _ => port["port"].as_u64(),
            };
            let mut out = json!({"protocol": protocol, "port": target});
            if let Some(port_name) = port["name"].as_str() {
                out["name"] = json!(port_name);
            }
            out
        })
        .collect();
    let endpoints: Vec<Value> = selected
        .iter()
        .map(|p| {
            json!({"addresses": [p.ip.to_string()], "nodeName": p.node,
                "targetRef": {"kind": "Pod", "namespace": p.namespace, "name": p.name},
                "conditions": {"ready": p.ready, "serving": p.ready, "terminating": false}})
        })
        .collect();
    Some(
        json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"namespace": namespace, "name": format!("{name}-dev"),
            "labels": {"kubernetes.io/service-name": name,
                "endpointslice.kubernetes.io/managed-by": "clustermesh-dev"}},
        "addressType": "IPv4", "ports": ports, "endpoints": endpoints}),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const APP: &str = "
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: shop}
spec:
  replicas: 3
  template:
    metadata: {labels: {app: web}}
    spec:
      containers:
      - name: echo
        ports: [{name: http, containerPort: 8080}, {containerPort: 5353, protocol: UDP}]
---
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: shop
  annotations: {service.cilium.io/global: 'true'}
spec:
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: http}, {name: dns, port: 53, protocol: UDP, targetPort: 5353}]
---
apiVersion: v1
kind: Pod
metadata: {name: client}
spec: {containers: [{name: c}]}
";

    #[test]
    fn deployments_expand_into_spread_replicas() {
        let applied = parse_apply(APP).unwrap();
        let names: Vec<_> = applied.pods.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["web-0", "web-1", "web-2", "client"]);
        assert_eq!(applied.pods[2].placement, Placement::Replica(2));
        assert_eq!(applied.pods[0].ports[1].protocol, Protocol::Udp);
        assert_eq!(applied.pods[3].namespace, "default");
        assert_eq!(applied.pods[3].ports, default_ports());
        assert_eq!(applied.pods[3].placement, Placement::Any);
        assert_eq!(applied.objects.len(), 1);
        assert_eq!(
            applied.deployments[&("shop".to_owned(), "web".to_owned())].len(),
            3
        );
    }

    #[test]
    fn mistakes_are_named() {
        let err = |text: &str| parse_apply(text).unwrap_err().to_string();
        assert!(
            err("kind: ConfigMap\nmetadata: {name: x}\n")
                .contains("\"ConfigMap\" is not supported")
        );
        assert!(err("kind: Pod\nmetadata: {}\n").contains("metadata.name is missing"));
        assert!(
            err("kind: Pod\nmetadata: {name: p}\nspec: {containers: []}\n")
                .contains("Pod default/p: containers: at least one")
        );
        assert!(err("kind: Service\nmetadata: {name: s}\nspec: {}\n").contains("spec.ports"));
        assert!(
            err(&APP.replace("protocol: UDP}]", "protocol: SCTP}]"))
                .contains("containers[0].ports[1].protocol")
        );
    }

    #[test]
    fn cluster_ips_skip_the_network_the_first_host_and_used_ones() {
        let base = Ipv4Addr::new(10, 96, 1, 0);
        let used = [Ipv4Addr::new(10, 96, 1, 2)].into();
        assert_eq!(
            allocate_ip(base, 24, &used),
            Some(Ipv4Addr::new(10, 96, 1, 3))
        );
        assert_eq!(allocate_ip(base, 30, &used), None);
    }

    #[test]
    fn endpoint_slices_follow_selectors_and_readiness() {
        let applied = parse_apply(APP).unwrap();
        let labels = applied.pods[0].labels.clone();
        let other = BTreeMap::from([("app".to_owned(), "client".to_owned())]);
        let pod = |name: &'static str, labels, ip: u8, ready| PodView {
            namespace: "shop",
            name,
            labels,
            containers: &applied.pods[0].containers,
            ports: &applied.pods[0].ports,
            node: "n1",
            host_ip: Ipv4Addr::new(10, 254, 1, 1),
            ip: Ipv4Addr::new(10, 1, 0, ip),
            ready,
        };
        let pods = [
            pod("web-0", &labels, 2, true),
            pod("web-1", &labels, 3, false),
            pod("client", &other, 4, true),
        ];
        let ips = BTreeMap::from([("shop/web".to_owned(), Ipv4Addr::new(10, 96, 1, 2))]);
        let node = NodeView {
            name: "n1",
            pod_cidr: "10.1.0.0/24".to_owned(),
            address: Ipv4Addr::new(10, 254, 1, 1),
        };
        let docs = render(&[node], &pods, &applied.objects, &ips);
        let kinds: Vec<_> = docs.iter().map(|d| d["kind"].as_str().unwrap()).collect();
        assert_eq!(
            kinds,
            [
                "Node",
                "Namespace",
                "Namespace",
                "Namespace",
                "Pod",
                "Pod",
                "Pod",
                "Service",
                "EndpointSlice"
            ]
        );
        assert_eq!(docs[7]["spec"]["clusterIP"], "10.96.1.2");
        let slice = &docs[8];
        assert_eq!(
            slice["metadata"]["labels"]["kubernetes.io/service-name"],
            "web"
        );
        assert_eq!(
            slice["ports"][0],
            json!({"name": "http", "port": 8080, "protocol": "TCP"})
        );
        assert_eq!(slice["ports"][1]["port"], 5353);
        let endpoints = slice["endpoints"].as_array().unwrap();
        assert_eq!(endpoints.len(), 2);
        assert_eq!(endpoints[0]["conditions"]["ready"], true);
        assert_eq!(endpoints[1]["conditions"]["ready"], false);
    }
}
