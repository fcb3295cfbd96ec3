//! Services: every Service with its frontends and backends, and whether it is global, shared
//! and affine.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use cluster_source::{ClusterObjects, NamespacedName, ObjectKind};
use k8s_openapi::api::core::v1::{Namespace, Service};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointSlice};
use model::annotations::parse_bool;
use model::{
    Affinity, Backend, ClusterService, DnsLabel, DnsSubdomain, L4Port, PortMap, Protocol,
    ServiceMeshOptions, parse_service_annotations,
};

use super::{Facts, TranslateConfig, Warning, object_name};

/// Namespace annotation: `"true"` lets the namespace's services be global, `"false"` keeps
/// them local whatever their own annotations say; absent means
/// [`TranslateConfig::default_global_namespace`](super::TranslateConfig).
pub const NAMESPACE_GLOBAL_ANNOTATION: &str = "clustermesh.cilium.io/global";

/// The label tying an EndpointSlice to its Service.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Marks a Service without a cluster IP.
const HEADLESS: &str = "None";

type Slices<'a> = BTreeMap<(&'a str, &'a str), Vec<(&'a NamespacedName, &'a Arc<EndpointSlice>)>>;

/// One Service, and what the mesh makes of it in this cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceFact {
    /// Its annotations make it global and its namespace lets them: it takes other clusters'
    /// backends, and other clusters learn of it.
    pub global: bool,
    /// Global, and not kept private (`service.cilium.io/shared: "false"`): other clusters may
    /// use its backends.
    pub shared: bool,
    /// Which backends it prefers; always `None` when it is not global.
    pub affinity: Affinity,
    /// Its frontends (cluster IPs) and every ready or serving backend (shared or not: the
    /// cluster always uses its own), with `shared` as above and `include_external` = `global`;
    /// `None` when its namespace or name is not a DNS label, which no mesh value can hold.
    pub value: Option<ClusterService>,
    /// What was wrong with its name, ports or cluster IPs.
    pub warnings: Vec<Warning>,
    /// What was wrong with its EndpointSlices, apart, for consumers that leave the backends
    /// out.
    pub backend_warnings: Vec<Warning>,
}

/// A Service's fact, kept while its Service, its EndpointSlices and its namespace's say are
/// the same: 1,000 services of 100 endpoints cost ~0.2 s to translate, and an edit changes
/// one of them.
#[derive(Debug)]
pub(super) struct CachedService {
    /// The Service (its annotations decide `shared` and `affinity`).
    service: Arc<Service>,
    slices: Vec<Arc<EndpointSlice>>,
    fact: Arc<ServiceFact>,
}

impl CachedService {
    fn still_valid(
        &self,
        service: &Arc<Service>,
        slices: &[(&NamespacedName, &Arc<EndpointSlice>)],
        global: bool,
    ) -> bool {
        Arc::ptr_eq(&self.service, service)
            && self.fact.global == global
            && self.slices.len() == slices.len()
            && self
                .slices
                .iter()
                .zip(slices)
                .all(|(a, (_, b))| Arc::ptr_eq(a, b))
    }
}

/// The cached fact of every Service, by key.
pub(super) type ServiceCache = BTreeMap<NamespacedName, CachedService>;

pub(super) fn translate(
    objects: &ClusterObjects,
    config: &TranslateConfig,
    cache: &mut ServiceCache,
    facts: &mut Facts,
) {
    let global_namespaces = namespace_globals(objects, &mut facts.service_warnings);
    let namespace_is_global = |ns: &str| {
        global_namespaces
            .get(ns)
            .copied()
            .flatten()
            .unwrap_or(config.default_global_namespace)
    };
    let mut slices: Slices = BTreeMap::new();
    for (key, slice) in &objects.endpoint_slices {
        if let Some(service) = slice
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_NAME_LABEL))
        {
            slices
                .entry((key.namespace.as_str(), service.as_str()))
                .or_default()
                .push((key, slice));
        }
    }
    let mut old = std::mem::take(cache);
    for (key, service) in &objects.services {
        let object = object_name(ObjectKind::Service, Some(&key.namespace), &key.name);
        let no_annotations = BTreeMap::new();
        let annotations = service
            .metadata
            .annotations
            .as_ref()
            .unwrap_or(&no_annotations);
        let (options, warnings) = parse_service_annotations(annotations);
        for warning in warnings {
            facts
                .service_warnings
                .push(Warning::new(&object, warning.to_string()));
        }
        let global = options.global && namespace_is_global(&key.namespace);
        let own_slices = slices
            .get(&(key.namespace.as_str(), key.name.as_str()))
            .map(Vec::as_slice)
            .unwrap_or_default();
        let cached = match old.remove(key) {
            Some(cached) if cached.still_valid(service, own_slices, global) => cached,
            _ => CachedService {
                service: Arc::clone(service),
                slices: own_slices.iter().map(|(_, s)| Arc::clone(s)).collect(),
                fact: Arc::new(ServiceFact::read(
                    key, service, options, global, own_slices, &object, config,
                )),
            },
        };
        facts.services.insert(key.clone(), Arc::clone(&cached.fact));
        cache.insert(key.clone(), cached);
    }
}

/// Each Namespace's own say (`None`: no valid annotation), warning about bad values.
fn namespace_globals<'a>(
    objects: &'a ClusterObjects,
    warnings: &mut Vec<Warning>,
) -> BTreeMap<&'a str, Option<bool>> {
    let annotation = |ns: &'a Namespace| {
        ns.metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(NAMESPACE_GLOBAL_ANNOTATION))
    };
    let mut globals = BTreeMap::new();
    for (name, namespace) in &objects.namespaces {
        let value = annotation(namespace).and_then(|value| {
            let parsed = parse_bool(value);
            if parsed.is_none() {
                warnings.push(Warning::new(
                    object_name(ObjectKind::Namespace, None, name),
                    format!(
                        "annotation {NAMESPACE_GLOBAL_ANNOTATION}: value {value:?} is not \
                         \"true\" or \"false\"; ignoring it"
                    ),
                ));
            }
            parsed
        });
        globals.insert(name.as_str(), value);
    }
    globals
}

impl ServiceFact {
    /// What the mesh makes of `service`, given what its annotations ask (`options`) and
    /// whether that makes it global in its namespace.
    fn read(
        key: &NamespacedName,
        service: &Service,
        options: ServiceMeshOptions,
        global: bool,
        slices: &[(&NamespacedName, &Arc<EndpointSlice>)],
        object: &str,
        config: &TranslateConfig,
    ) -> Self {
        let mut fact = ServiceFact {
            global,
            shared: global && options.shared,
            affinity: if global {
                options.affinity
            } else {
                Affinity::None
            },
            value: None,
            warnings: Vec::new(),
            backend_warnings: Vec::new(),
        };
        let mut warn = |message: String| fact.warnings.push(Warning::new(object, message));
        let names = DnsLabel::new(key.namespace.as_str()).and_then(|ns| {
            let name = DnsLabel::new(key.name.as_str())?;
            Ok((ns, name))
        });
        let (namespace, name) = match names {
            Ok(names) => names,
            Err(error) => {
                warn(format!("not published: {error}"));
                return fact;
            }
        };
        let spec = service.spec.as_ref();
        let ports = service_ports(service, &mut warn);
        let mut frontends = BTreeMap::new();
        for ip in cluster_ips(service) {
            match ip.parse::<IpAddr>() {
                Ok(ip) => {
                    frontends.insert(ip, ports.clone());
                }
                Err(_) => warn(format!("cluster IP {ip:?} is not an IP address; left out")),
            }
        }
        let backends = backends(slices, &mut fact.backend_warnings);
        let cluster = &config.cluster;
        fact.value = Some(ClusterService {
            schema: Default::default(),
            cluster: cluster.name.clone(),
            cluster_id: cluster.id,
            namespace,
            name,
            frontends,
            backends,
            shared: fact.shared,
            // A global service takes remote backends.
            include_external: fact.global,
            labels: service.metadata.labels.clone().unwrap_or_default(),
            selector: spec.and_then(|s| s.selector.clone()).unwrap_or_default(),
        });
        fact
    }
}

/// `spec.clusterIPs`, or the older `spec.clusterIP`; none for a headless service.
fn cluster_ips(service: &Service) -> Vec<&str> {
    let Some(spec) = service.spec.as_ref() else {
        return Vec::new();
    };
    let ips: Vec<&str> = match spec.cluster_ips.as_deref() {
        Some(list) if !list.is_empty() => list.iter().map(String::as_str).collect(),
        _ => spec.cluster_ip.iter().map(String::as_str).collect(),
    };
    ips.into_iter()
        .filter(|ip| !ip.is_empty() && *ip != HEADLESS)
        .collect()
}

fn service_ports(service: &Service, warn: &mut impl FnMut(String)) -> PortMap {
    let listed = service
        .spec
        .as_ref()
        .and_then(|s| s.ports.as_deref())
        .unwrap_or_default();
    let mut ports = PortMap::new();
    for port in listed {
        let name = port.name.clone().unwrap_or_default();
        add_port(&mut ports, name, port.protocol.as_deref(), port.port, warn);
    }
    ports
}

/// Adds one port, warning about (and leaving out) a bad protocol, number or repeated name.
fn add_port(
    ports: &mut PortMap,
    name: String,
    protocol: Option<&str>,
    number: i32,
    warn: &mut impl FnMut(String),
) {
    let protocol = match protocol.unwrap_or("TCP") {
        "TCP" => Protocol::Tcp,
        "UDP" => Protocol::Udp,
        "SCTP" => Protocol::Sctp,
        other => {
            warn(format!(
                "port {name:?}: protocol {other:?} is not TCP, UDP or SCTP; left out"
            ));
            return;
        }
    };
    let port = match u16::try_from(number) {
        Ok(port) if port != 0 => port,
        _ => {
            warn(format!(
                "port {name:?}: {number} is not a port number (1..=65535); left out"
            ));
            return;
        }
    };
    if ports.contains_key(&name) {
        warn(format!(
            "port name {name:?} is used twice; the first one is kept"
        ));
        return;
    }
    ports.insert(name, L4Port { protocol, port });
}

/// Backends from every slice of the service, by address. An address in several slices (as
/// while a controller moves endpoints between slices) is merged: its ports are joined, and
/// it is ready or serving if any slice says so, terminating only if all do.
fn backends(
    slices: &[(&NamespacedName, &Arc<EndpointSlice>)],
    warnings: &mut Vec<Warning>,
) -> BTreeMap<IpAddr, Backend> {
    let mut backends: BTreeMap<IpAddr, Backend> = BTreeMap::new();
    for (key, slice) in slices {
        // FQDN slices name hosts, not addresses: nothing a datapath can send to.
        if slice.address_type == "FQDN" {
            continue;
        }
        let object = object_name(ObjectKind::EndpointSlice, Some(&key.namespace), &key.name);
        let mut warn = |message: String| warnings.push(Warning::new(&object, message));
        let mut ports = PortMap::new();
        for port in slice.ports.as_deref().unwrap_or_default() {
            let name = port.name.clone().unwrap_or_default();
            match port.port {
                Some(number) => {
                    add_port(
                        &mut ports,
                        name,
                        port.protocol.as_deref(),
                        number,
                        &mut warn,
                    );
                }
                None => warn(format!("port {name:?} has no number (all ports); left out")),
            }
        }
        for endpoint in &slice.endpoints {
            let Some(template) = backend(endpoint, &ports, &mut warn) else {
                continue;
            };
            for address in &endpoint.addresses {
                let Ok(ip) = address.parse::<IpAddr>() else {
                    warn(format!(
                        "endpoint address {address:?} is not an IP address; left out"
                    ));
                    continue;
                };
                match backends.get_mut(&ip) {
                    Some(existing) => merge(existing, &template),
                    None => {
                        backends.insert(ip, template.clone());
                    }
                }
            }
        }
    }
    backends
}

/// The backend an endpoint stands for, or `None` when it is neither ready nor serving.
///
/// Conditions follow the EndpointSlice API: `ready` and `serving` count as true when unset
/// (`serving` falls back to `ready`, for controllers older than the field), `terminating`
/// as false. A terminating endpoint is never ready, only serving.
fn backend(endpoint: &Endpoint, ports: &PortMap, warn: &mut impl FnMut(String)) -> Option<Backend> {
    let conditions = endpoint.conditions.clone().unwrap_or_default();
    let terminating = conditions.terminating.unwrap_or(false);
    let declared_ready = conditions.ready.unwrap_or(true);
    let ready = declared_ready && !terminating;
    let serving = conditions.serving.unwrap_or(declared_ready);
    if !ready && !serving {
        return None;
    }
    let node_name = endpoint.node_name.as_deref().and_then(|n| {
        DnsSubdomain::new(n)
            .map_err(|e| warn(format!("endpoint nodeName left out: {e}")))
            .ok()
    });
    let hostname = endpoint.hostname.as_deref().and_then(|h| {
        DnsLabel::new(h)
            .map_err(|e| warn(format!("endpoint hostname left out: {e}")))
            .ok()
    });
    Some(Backend {
        ports: ports.clone(),
        ready,
        serving,
        terminating,
        zone: endpoint.zone.clone().filter(|z| !z.is_empty()),
        node_name,
        hostname,
    })
}

fn merge(existing: &mut Backend, other: &Backend) {
    for (name, port) in &other.ports {
        existing.ports.entry(name.clone()).or_insert(*port);
    }
    existing.ready |= other.ready;
    existing.serving |= other.serving;
    existing.terminating &= other.terminating;
    if existing.zone.is_none() {
        existing.zone.clone_from(&other.zone);
    }
    if existing.node_name.is_none() {
        existing.node_name.clone_from(&other.node_name);
    }
    if existing.hostname.is_none() {
        existing.hostname.clone_from(&other.hostname);
    }
}

#[cfg(test)]
mod tests {
    use cluster_source::ClusterObjects;
    use proptest::prelude::*;
    use serde_json::{Value, json};

    use super::super::testutil::{config, objects, translate_all};
    use super::super::{Facts, TranslateCache, TranslateConfig, translate, translate_cached};
    use super::ServiceFact;
    use crate::identity::IdentityAllocator;
    use model::Affinity;

    fn svc(ns: &str, name: &str, annotations: Value, cluster_ip: &str) -> Value {
        json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"namespace": ns, "name": name, "annotations": annotations,
                "labels": {"app": name}},
            "spec": {"clusterIP": cluster_ip, "selector": {"app": name},
                "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}})
    }

    fn slice(ns: &str, name: &str, service: &str, endpoints: Value) -> Value {
        json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"namespace": ns, "name": name,
                "labels": {"kubernetes.io/service-name": service}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": endpoints})
    }

    fn ep(ip: &str, conditions: Value) -> Value {
        json!({"addresses": [ip], "conditions": conditions, "nodeName": "node-a", "zone": "eu-1a"})
    }

    fn global() -> Value {
        json!({"service.cilium.io/global": "true"})
    }

    fn namespace(name: &str, global: &str) -> Value {
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name,
            "annotations": {"clustermesh.cilium.io/global": global}}})
    }

    fn of(docs: Vec<Value>, config: &TranslateConfig) -> Facts {
        translate_all(&objects(docs), config)
    }

    fn fact<'a>(facts: &'a Facts, ns: &str, name: &str) -> &'a ServiceFact {
        &facts.services[&cluster_source::NamespacedName::new(ns, name)]
    }

    /// (namespace/name, global, shared, affinity, backends) of every service, in key order.
    fn flags(facts: &Facts) -> Vec<(String, bool, bool, Affinity, usize)> {
        facts
            .services
            .iter()
            .map(|(key, fact)| {
                let value = fact.value.as_ref().expect("valid names");
                assert_eq!(
                    (value.shared, value.include_external),
                    (fact.shared, fact.global),
                    "the value says what the fact says"
                );
                (
                    format!("{}/{}", key.namespace, key.name),
                    fact.global,
                    fact.shared,
                    fact.affinity,
                    value.backends.len(),
                )
            })
            .collect()
    }

    /// Every Service is a fact, with all its backends; its annotations and its namespace's
    /// decide whether it is global, shared and affine.
    #[test]
    fn what_the_mesh_makes_of_each_service() {
        let docs = vec![
            svc("shop", "web", global(), "10.96.0.10"),
            svc(
                "shop",
                "old",
                json!({"io.cilium/global-service": "TRUE",
                "io.cilium/service-affinity": "remote"}),
                "10.96.0.11",
            ),
            svc(
                "shop",
                "local",
                json!({"service.cilium.io/affinity": "local"}),
                "10.96.0.12",
            ),
            svc(
                "shop",
                "off",
                json!({"service.cilium.io/global": "false"}),
                "10.96.0.13",
            ),
            svc(
                "shop",
                "private",
                json!({"service.cilium.io/global": "true",
                "service.cilium.io/shared": "false",
                "service.cilium.io/affinity": "local"}),
                "10.96.0.14",
            ),
            svc(
                "shop",
                "private-old",
                json!({"io.cilium/global-service": "true",
                "io.cilium/shared-service": "false"}),
                "10.96.0.15",
            ),
            svc(
                "closed",
                "web",
                json!({"service.cilium.io/global": "true",
                "service.cilium.io/affinity": "local"}),
                "10.96.1.10",
            ),
            svc("open", "web", global(), "10.96.2.10"),
            svc("nons", "web", global(), "10.96.3.10"),
            namespace("closed", "false"),
            namespace("open", "true"),
            namespace("shop", "TRUE"),
            slice(
                "shop",
                "private-abc",
                "private",
                json!([ep("10.2.1.5", json!({}))]),
            ),
            slice(
                "shop",
                "local-abc",
                "local",
                json!([ep("10.2.1.6", json!({}))]),
            ),
            slice(
                "closed",
                "web-abc",
                "web",
                json!([ep("10.2.1.7", json!({}))]),
            ),
        ];
        let facts = of(docs.clone(), &config());
        let warnings: Vec<String> = facts.warnings().map(ToString::to_string).collect();
        assert_eq!(
            warnings,
            [
                "Service shop/local: annotation service.cilium.io/affinity has no effect: the \
              service is not global"
            ]
        );
        let row = |name: &str, global, shared, affinity, backends| {
            (name.to_owned(), global, shared, affinity, backends)
        };
        assert_eq!(
            flags(&facts),
            [
                row("closed/web", false, false, Affinity::None, 1),
                row("nons/web", true, true, Affinity::None, 0),
                row("open/web", true, true, Affinity::None, 0),
                row("shop/local", false, false, Affinity::None, 1),
                row("shop/off", false, false, Affinity::None, 0),
                row("shop/old", true, true, Affinity::Remote, 0),
                row("shop/private", true, false, Affinity::Local, 1),
                row("shop/private-old", true, false, Affinity::None, 0),
                row("shop/web", true, true, Affinity::None, 0),
            ]
        );

        // Without the default, only namespaces annotated true have global services.
        let mut cfg = config();
        cfg.default_global_namespace = false;
        let globals: Vec<String> = facts_globals(&of(docs, &cfg));
        assert_eq!(
            globals,
            [
                "open/web",
                "shop/old",
                "shop/private",
                "shop/private-old",
                "shop/web"
            ]
        );
    }

    fn facts_globals(facts: &Facts) -> Vec<String> {
        facts
            .services
            .iter()
            .filter(|(_, fact)| fact.global)
            .map(|(key, _)| format!("{}/{}", key.namespace, key.name))
            .collect()
    }

    #[test]
    fn service_value_and_backends() {
        let docs = vec![
            json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"namespace": "shop", "name": "web",
                "annotations": {"service.cilium.io/global": "true",
                    "service.cilium.io/affinity": "local"},
                "labels": {"app": "web"}},
            "spec": {"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10", "fd00:96::10"],
                "selector": {"app": "web"},
                "ports": [
                    {"name": "http", "port": 80},
                    {"name": "dns", "port": 53, "protocol": "UDP"},
                ]}}),
            // Two slices; 10.2.1.20 moves between them.
            json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"namespace": "shop", "name": "web-a",
                "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080}],
            "endpoints": [
                {"addresses": ["10.2.1.17"], "conditions": {"ready": true, "serving": true,
                    "terminating": false}, "nodeName": "node-a", "zone": "eu-1a",
                    "hostname": "web-0"},
                {"addresses": ["10.2.1.18"], "conditions": {"ready": false, "serving": true,
                    "terminating": true}, "nodeName": "node-a"},
                {"addresses": ["10.2.1.19"], "conditions": {"ready": false, "serving": false,
                    "terminating": true}},
                {"addresses": ["10.2.1.20"], "conditions": {"ready": false, "serving": true,
                        "terminating": true}},
                    {"addresses": ["10.2.1.21"], "conditions": {"ready": false}},
            ]}),
            json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"namespace": "shop", "name": "web-b",
                "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "ports": [{"name": "dns", "port": 5353, "protocol": "UDP"}],
            "endpoints": [
                {"addresses": ["10.2.2.30"]},
                {"addresses": ["10.2.1.20"], "conditions": {"ready": true}},
            ]}),
            // Another service's slice and a slice in another namespace are not used.
            slice("shop", "db-a", "db", json!([ep("10.2.9.9", json!({}))])),
            slice("other", "web-x", "web", json!([ep("10.2.8.8", json!({}))])),
        ];
        let facts = of(docs, &config());
        let warnings: Vec<_> = facts.warnings().collect();
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(facts.services.len(), 1);
        let web = fact(&facts, "shop", "web");
        assert_eq!(
            (web.global, web.shared, web.affinity),
            (true, true, Affinity::Local)
        );
        let json = serde_json::to_value(web.value.as_ref().unwrap()).unwrap();
        let tcp = |port: u16| json!({"protocol": "TCP", "port": port});
        let udp = |port: u16| json!({"protocol": "UDP", "port": port});
        assert_eq!(
            json,
            json!({
                "schema": 1, "cluster": "eu-1", "cluster_id": 2, "namespace": "shop",
                "name": "web",
                "frontends": {
                    "10.96.0.10": {"dns": udp(53), "http": tcp(80)},
                    "fd00:96::10": {"dns": udp(53), "http": tcp(80)},
                },
                "backends": {
                    "10.2.1.17": {"ports": {"http": tcp(8080)}, "ready": true, "serving": true,
                        "terminating": false, "zone": "eu-1a", "node_name": "node-a",
                        "hostname": "web-0"},
                    "10.2.1.18": {"ports": {"http": tcp(8080)}, "ready": false, "serving": true,
                        "terminating": true, "node_name": "node-a"},
                    "10.2.1.20": {"ports": {"dns": udp(5353), "http": tcp(8080)}, "ready": true,
                        "serving": true, "terminating": false},
                    "10.2.2.30": {"ports": {"dns": udp(5353)}, "ready": true, "serving": true,
                        "terminating": false},
                },
                "shared": true, "include_external": true,
                "labels": {"app": "web"}, "selector": {"app": "web"},
            })
        );
    }

    #[test]
    fn headless_service_has_no_frontend() {
        let docs = vec![
            svc("shop", "db", global(), "None"),
            slice(
                "shop",
                "db-a",
                "db",
                json!([ep("10.2.1.40", json!({"ready": true}))]),
            ),
        ];
        let facts = of(docs, &config());
        let warnings: Vec<_> = facts.warnings().collect();
        assert!(warnings.is_empty(), "{warnings:?}");
        let db = fact(&facts, "shop", "db").value.as_ref().unwrap();
        assert!(db.frontends.is_empty());
        assert_eq!(db.backends.len(), 1);
    }

    #[test]
    fn bad_annotations_and_fields_are_warned() {
        let docs = vec![
            svc(
                "shop",
                "web",
                json!({"service.cilium.io/global": "true",
                "service.cilium.io/affinity": "sideways"}),
                "10.96.0.10",
            ),
            svc(
                "shop",
                "maybe",
                json!({"service.cilium.io/global": "yes"}),
                "10.96.0.11",
            ),
            svc(
                "shop",
                "lonely",
                json!({"service.cilium.io/shared": "false"}),
                "10.96.0.12",
            ),
            json!({"apiVersion": "v1", "kind": "Service",
                "metadata": {"namespace": "shop", "name": "odd",
                    "annotations": {"service.cilium.io/global": "true"}},
                "spec": {"clusterIP": "10.96.0.999",
                    "ports": [{"name": "a", "port": 80, "protocol": "ICMP"},
                              {"name": "b", "port": 70000},
                              {"name": "c", "port": 81},
                              {"name": "c", "port": 82}]}}),
            namespace("weird", "maybe"),
            json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {"namespace": "shop", "name": "web-a",
                    "labels": {"kubernetes.io/service-name": "web"}},
                "addressType": "IPv4",
                "ports": [{"name": "http"}],
                "endpoints": [{"addresses": ["10.2.1.300", "10.2.1.3"], "nodeName": "Node_A"}]}),
        ];
        let facts = of(docs, &config());
        assert_eq!(
            facts_globals(&facts),
            ["shop/odd", "shop/web"],
            "global: \"yes\" is not global"
        );
        // The bad affinity counts as absent: the service is global as usual.
        let web = fact(&facts, "shop", "web");
        assert_eq!(web.affinity, Affinity::None);
        let web = web.value.as_ref().unwrap();
        assert_eq!(web.frontends.len(), 1);
        let ip3: std::net::IpAddr = "10.2.1.3".parse().unwrap();
        assert_eq!(web.backends[&ip3].node_name, None);
        assert!(web.backends[&ip3].ports.is_empty());
        let odd = fact(&facts, "shop", "odd");
        assert!(odd.value.as_ref().unwrap().frontends.is_empty());
        assert_eq!(odd.warnings.len(), 4);
        assert!(odd.backend_warnings.is_empty());
        assert_eq!(fact(&facts, "shop", "web").backend_warnings.len(), 3);
        let text: Vec<String> = facts.warnings().map(ToString::to_string).collect();
        let expect = [
            "Namespace weird: annotation clustermesh.cilium.io/global: value \"maybe\"",
            "Service shop/lonely: annotation service.cilium.io/shared has no effect",
            "Service shop/maybe: annotation service.cilium.io/global: value \"yes\"",
            "Service shop/web: annotation service.cilium.io/affinity: value \"sideways\"",
            "Service shop/odd: port \"a\": protocol \"ICMP\"",
            "Service shop/odd: port \"b\": 70000 is not a port number",
            "Service shop/odd: port name \"c\" is used twice",
            "Service shop/odd: cluster IP \"10.96.0.999\" is not an IP address",
            "EndpointSlice shop/web-a: port \"http\" has no number",
            "EndpointSlice shop/web-a: endpoint nodeName left out",
            "EndpointSlice shop/web-a: endpoint address \"10.2.1.300\"",
        ];
        assert_eq!(text.len(), expect.len(), "{text:#?}");
        for (got, want) in text.iter().zip(expect) {
            assert!(
                got.starts_with(want),
                "{got:?} should start with {want:?}\n{text:#?}"
            );
        }
    }

    /// A Service whose name no mesh value can hold is still a fact, with its flags, a warning
    /// and no value.
    #[test]
    fn a_service_without_a_dns_name_has_no_value() {
        let facts = of(
            vec![svc("shop", "Web_1", global(), "10.96.0.10")],
            &config(),
        );
        let web = fact(&facts, "shop", "Web_1");
        assert!(web.global && web.shared);
        assert_eq!(web.value, None);
        let text: Vec<String> = facts.warnings().map(ToString::to_string).collect();
        assert_eq!(text.len(), 1, "{text:#?}");
        assert!(
            text[0].starts_with("Service shop/Web_1: not published: "),
            "{text:#?}"
        );
    }

    /// One service's manifests, from a few knobs: global, shared, a good or bad cluster IP,
    /// and how many (ready or not) endpoints its one or two slices hold.
    fn service_docs(name: &str, knobs: (bool, bool, bool, u8, bool)) -> Vec<Value> {
        let (is_global, shared, good_ip, endpoints, two_slices) = knobs;
        let mut annotations = json!({});
        if is_global {
            annotations["service.cilium.io/global"] = json!("true");
        }
        if !shared {
            annotations["service.cilium.io/shared"] = json!("false");
        }
        let ip = if good_ip { "10.96.0.10" } else { "10.96.0.999" };
        let eps: Vec<Value> = (0..endpoints)
            .map(|i| ep(&format!("10.2.1.{}", i + 1), json!({"ready": i % 2 == 0})))
            .collect();
        let mut docs = vec![
            svc("shop", name, annotations, ip),
            slice("shop", &format!("{name}-a"), name, json!(eps)),
        ];
        if two_slices {
            docs.push(slice(
                "shop",
                &format!("{name}-b"),
                name,
                json!([ep("10.2.9.9", json!({"ready": true}))]),
            ));
        }
        docs
    }

    type Knobs = (bool, bool, bool, u8, bool);

    fn knobs() -> impl Strategy<Value = Knobs> {
        (
            any::<bool>(),
            any::<bool>(),
            any::<bool>(),
            0u8..3,
            any::<bool>(),
        )
    }

    /// The namespace of the services: absent, or annotated true, false or something else.
    fn namespace_doc(say: u8) -> Option<Value> {
        match say {
            0 => None,
            1 => Some(namespace("shop", "true")),
            2 => Some(namespace("shop", "false")),
            _ => Some(namespace("shop", "maybe")),
        }
    }

    proptest! {
        /// Translating services with the cache of the previous translations gives exactly
        /// what a translation from scratch gives, while services, slices and their namespace
        /// are edited.
        #[test]
        fn the_cache_changes_nothing_but_the_cost(
            steps in prop::collection::vec((prop::collection::vec(knobs(), 3), 0u8..4), 1..6),
        ) {
            let cfg = config();
            let mut cached_ids = IdentityAllocator::new(&cfg.cluster).unwrap();
            let mut plain_ids = IdentityAllocator::new(&cfg.cluster).unwrap();
            let mut cache = TranslateCache::default();
            let mut previous = ClusterObjects::default();
            for (services, say) in &steps {
                let docs = ["a", "b", "c"]
                    .iter()
                    .zip(services)
                    .flat_map(|(name, knobs)| service_docs(name, *knobs))
                    .chain(namespace_doc(*say))
                    .collect();
                let mut snapshot = objects(docs);
                // A source hands over the same object for what did not change.
                for (key, service) in snapshot.services.iter_mut() {
                    if let Some(old) = previous.services.get(key).filter(|old| *old == service) {
                        *service = old.clone();
                    }
                }
                for (key, slice) in snapshot.endpoint_slices.iter_mut() {
                    if let Some(old) = previous.endpoint_slices.get(key).filter(|old| *old == slice) {
                        *slice = old.clone();
                    }
                }
                let cached = translate_cached(&snapshot, &cfg, &mut cached_ids, &mut cache);
                let plain = translate(&snapshot, &cfg, &mut plain_ids);
                prop_assert_eq!(&cached, &plain);
                previous = snapshot;
            }
        }
    }
}
