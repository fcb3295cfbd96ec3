//! What the cluster publishes: the global part of its [facts](mesh_translate), as store keys
//! and canonical bytes.
//!
//! - Nodes, identities and ip→identity entries: all of them.
//! - Services: global ones only; a service that is not shared is published without its
//!   backends (peers learn that it exists here, not where its backends are), and what was
//!   wrong with those backends is not reported.
//!
//! Every value is checked with [`model::validate_entry`] against this cluster's own config,
//! exactly as a peer will check it: a value a peer would refuse becomes a [`Warning`] instead.
//! Like the translation, this does no I/O, so the publisher can diff its result against the
//! store, and tests can check it without one.

use std::collections::BTreeMap;
use std::sync::Arc;

use cluster_source::{ClusterObjects, NamespacedName, ObjectKind};
use mesh_translate::identity::identity_object;
use mesh_translate::{
    Facts, IdentityAllocator, IpFact, ServiceFact, TranslateCache, TranslateConfig, Warning,
    object_name, translate_cached,
};
use model::keys::Kind;
use model::{ClusterConfig, ClusterService, StateKey, StoreValue, validate_entry};

/// The kinds the cluster publishes, in the order the publisher writes them.
pub const PUBLISHED_KINDS: [Kind; 4] = [Kind::Identities, Kind::Ip, Kind::Nodes, Kind::Services];

/// Everything the cluster publishes, as store keys and canonical bytes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Published {
    /// Per kind (every one of [`PUBLISHED_KINDS`], possibly empty): full state key →
    /// canonical encoded value. Equal values give equal bytes, so unchanged entries can be
    /// skipped by comparing bytes.
    pub entries: BTreeMap<Kind, BTreeMap<String, Vec<u8>>>,
    /// What could not be used as written, in a stable order.
    pub warnings: Vec<Warning>,
}

impl Published {
    /// The entries of `kind`, empty for a kind not published.
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

/// A value encoded and checked as a peer will check it: its key and bytes, or why it is not
/// published.
type Encoded = Result<(String, Vec<u8>), String>;

/// What one publication keeps for the next, so that the next costs what changed: the
/// translation's own cache, and the encodings of the service and ip facts the translation
/// handed over again (the same `Arc`s, which this cache holds, so no other value can take
/// their address). Facts made with another config are new `Arc`s, so nothing encoded under
/// the old one is reused.
#[derive(Debug, Default)]
pub struct PublishCache {
    translate: TranslateCache,
    /// Per published service: the fact it was encoded from, and its encoding.
    services: BTreeMap<NamespacedName, (Arc<ServiceFact>, Encoded)>,
    /// Per published address, in address order: the fact it was encoded from, and its
    /// encoding.
    ips: Vec<(Arc<IpFact>, Encoded)>,
}

/// Translates a snapshot and returns what the cluster publishes; see
/// [`mesh_translate::translate`] for how `identities` carries identities over.
pub fn publish(
    objects: &ClusterObjects,
    config: &TranslateConfig,
    identities: &mut IdentityAllocator,
) -> Published {
    publish_cached(objects, config, identities, &mut PublishCache::default())
}

/// [`publish`], reusing (and refreshing) `cache`; the result is the same as without it.
pub fn publish_cached(
    objects: &ClusterObjects,
    config: &TranslateConfig,
    identities: &mut IdentityAllocator,
    cache: &mut PublishCache,
) -> Published {
    let facts = translate_cached(objects, config, identities, &mut cache.translate);
    let cluster = &config.cluster;
    let mut published = Published {
        entries: PUBLISHED_KINDS
            .into_iter()
            .map(|kind| (kind, BTreeMap::new()))
            .collect(),
        warnings: Vec::new(),
    };
    let Facts {
        nodes,
        node_warnings,
        services,
        service_warnings,
        identities,
        ips,
        pod_warnings,
    } = facts;
    let mut refused = Vec::new();
    published.warnings.extend(node_warnings);
    for node in &nodes {
        let encoded = encode(cluster, Kind::Nodes, node.key(), node.encode());
        let object = || object_name(ObjectKind::Node, None, node.name.as_str());
        insert(&mut published, Kind::Nodes, object, encoded, &mut refused);
    }
    published.warnings.extend(service_warnings);
    let mut old = std::mem::take(&mut cache.services);
    for (key, fact) in &services {
        if !fact.global {
            continue;
        }
        published.warnings.extend(fact.warnings.iter().cloned());
        if fact.shared {
            published
                .warnings
                .extend(fact.backend_warnings.iter().cloned());
        }
        let Some(value) = &fact.value else {
            continue;
        };
        let encoded = match old.remove(key) {
            Some((cached, encoded)) if Arc::ptr_eq(&cached, fact) => encoded,
            _ => encode_service(cluster, fact, value),
        };
        let object = || object_name(ObjectKind::Service, Some(&key.namespace), &key.name);
        insert(
            &mut published,
            Kind::Services,
            object,
            encoded.clone(),
            &mut refused,
        );
        cache
            .services
            .insert(key.clone(), (Arc::clone(fact), encoded));
    }
    published.warnings.extend(pod_warnings);
    for identity in &identities {
        let encoded = encode(cluster, Kind::Identities, identity.key(), identity.encode());
        let object = || identity_object(identity.id);
        insert(
            &mut published,
            Kind::Identities,
            object,
            encoded,
            &mut refused,
        );
    }
    let ip_entries = encode_ips(cluster, &ips, &mut cache.ips, &mut refused);
    published.entries.insert(Kind::Ip, ip_entries);
    published.warnings.extend(refused);
    published
}

/// Checks `bytes`, the encoding of the value under `key`, with [`validate_entry`] against this
/// cluster's own config.
fn encode(cluster: &ClusterConfig, kind: Kind, key: StateKey, bytes: Vec<u8>) -> Encoded {
    let key = key.to_string();
    match validate_entry(kind, &key, &bytes, cluster) {
        Ok(_) => Ok((key, bytes)),
        Err(error) => Err(format!("not published: {error}")),
    }
}

/// A global service as published: without its backends unless it is shared.
fn encode_service(cluster: &ClusterConfig, fact: &ServiceFact, value: &ClusterService) -> Encoded {
    let bytes = if fact.shared {
        value.encode()
    } else {
        ClusterService {
            backends: BTreeMap::new(),
            ..value.clone()
        }
        .encode()
    };
    encode(cluster, Kind::Services, value.key(), bytes)
}

/// Adds an encoded entry, or notes why the `object` it came from is not published.
fn insert(
    published: &mut Published,
    kind: Kind,
    object: impl FnOnce() -> String,
    encoded: Encoded,
    refused: &mut Vec<Warning>,
) {
    match encoded {
        Ok((key, bytes)) => {
            published
                .entries
                .entry(kind)
                .or_default()
                .insert(key, bytes);
        }
        Err(message) => refused.push(Warning::new(object(), message)),
    }
}

/// The ip→identity entries: the facts handed over again keep their encodings (both lists
/// are in address order, so one merge walk finds them), the others are encoded. At 100k
/// pods an edit then encodes the few entries it changed.
fn encode_ips(
    cluster: &ClusterConfig,
    facts: &[Arc<IpFact>],
    cache: &mut Vec<(Arc<IpFact>, Encoded)>,
    refused: &mut Vec<Warning>,
) -> BTreeMap<String, Vec<u8>> {
    let mut old = std::mem::take(cache).into_iter().peekable();
    cache.reserve(facts.len());
    for fact in facts {
        let ip = fact.entry.ip;
        while old.next_if(|(cached, _)| cached.entry.ip < ip).is_some() {}
        let encoded = match old.next_if(|(cached, _)| Arc::ptr_eq(cached, fact)) {
            Some((_, encoded)) => encoded,
            None => encode(cluster, Kind::Ip, fact.entry.key(), fact.entry.encode()),
        };
        cache.push((Arc::clone(fact), encoded));
    }
    let mut entries: Vec<(&String, &Vec<u8>)> = Vec::with_capacity(cache.len());
    for (fact, encoded) in cache.iter() {
        match encoded {
            Ok((key, bytes)) => entries.push((key, bytes)),
            Err(message) => {
                let pod = &fact.pod;
                let object = object_name(ObjectKind::Pod, Some(&pod.namespace), &pod.name);
                refused.push(Warning::new(object, message.clone()));
            }
        }
    }
    // Each key names one address and the translation gave every address to one pod, so the
    // keys are distinct: the map is built in one sorted pass instead of 100k lookups.
    entries.sort_unstable_by_key(|(key, _)| *key);
    entries
        .into_iter()
        .map(|(key, bytes)| (key.clone(), bytes.clone()))
        .collect()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use cluster_source::{ClusterObjects, ManifestFormat, parse_manifests};
    use model::{
        Capabilities, ClusterConfig, ClusterId, ClusterName, ClusterService, MaxConnectedClusters,
    };
    use proptest::prelude::*;
    use serde_json::{Value, json};

    use super::*;

    fn cluster(name: &str, id: u16) -> ClusterConfig {
        ClusterConfig::new(
            ClusterName::new(name).unwrap(),
            ClusterId::try_from(id).unwrap(),
            MaxConnectedClusters::Max255,
            Capabilities::default(),
        )
        .unwrap()
    }

    /// Cluster `eu-1`, id 2, every namespace global by default.
    fn config() -> TranslateConfig {
        TranslateConfig::new(cluster("eu-1", 2))
    }

    /// A synced snapshot of `docs`, each a k8s object with `kind` set.
    fn objects(docs: &[Value]) -> ClusterObjects {
        let text: String = docs.iter().map(|d| format!("---\n{d}\n")).collect();
        let mut objects = ClusterObjects {
            synced: true,
            ..ClusterObjects::default()
        };
        for object in parse_manifests("test", &text, ManifestFormat::Yaml).unwrap() {
            assert!(objects.insert(object).is_none(), "object given twice");
        }
        objects
    }

    fn publish_all(docs: &[Value], config: &TranslateConfig) -> Published {
        let mut allocator = IdentityAllocator::new(&config.cluster).unwrap();
        publish(&objects(docs), config, &mut allocator)
    }

    fn services(published: &Published) -> Vec<ClusterService> {
        published
            .kind(Kind::Services)
            .values()
            .map(|bytes| ClusterService::decode(bytes).unwrap())
            .collect()
    }

    fn names(services: &[ClusterService]) -> Vec<String> {
        services
            .iter()
            .map(|s| format!("{}/{}", s.namespace, s.name))
            .collect()
    }

    fn text(published: &Published) -> Vec<String> {
        published.warnings.iter().map(ToString::to_string).collect()
    }

    fn svc(ns: &str, name: &str, annotations: Value, ports: Value) -> Value {
        json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"namespace": ns, "name": name, "annotations": annotations},
            "spec": {"clusterIP": "10.96.0.10", "ports": ports}})
    }

    fn http() -> Value {
        json!([{"name": "http", "port": 80}])
    }

    /// A slice of `service` with one good endpoint and one bad address.
    fn slice(ns: &str, service: &str) -> Value {
        json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"namespace": ns, "name": format!("{service}-a"),
                "labels": {"kubernetes.io/service-name": service}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080}],
            "endpoints": [{"addresses": ["10.2.1.5"]}, {"addresses": ["10.2.1.500"]}]})
    }

    fn namespace(name: &str, global: &str) -> Value {
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name,
            "annotations": {"clustermesh.cilium.io/global": global}}})
    }

    /// Global services in global namespaces are published, the others not; one that is not
    /// shared is published without its backends.
    #[test]
    fn which_services_are_published() {
        let global = || json!({"service.cilium.io/global": "true"});
        let docs = [
            svc("shop", "web", global(), http()),
            svc(
                "shop",
                "old",
                json!({"io.cilium/global-service": "TRUE"}),
                http(),
            ),
            svc("shop", "local", json!({}), http()),
            svc(
                "shop",
                "off",
                json!({"service.cilium.io/global": "false"}),
                http(),
            ),
            svc(
                "shop",
                "private",
                json!({"service.cilium.io/global": "true",
                "service.cilium.io/shared": "false"}),
                http(),
            ),
            svc(
                "shop",
                "private-old",
                json!({"io.cilium/global-service": "true",
                "io.cilium/shared-service": "false"}),
                http(),
            ),
            svc("closed", "web", global(), http()),
            svc("open", "web", global(), http()),
            svc("nons", "web", global(), http()),
            namespace("closed", "false"),
            namespace("open", "true"),
            namespace("shop", "TRUE"),
            slice("shop", "web"),
            slice("shop", "private"),
            slice("shop", "private-old"),
            slice("shop", "local"),
        ];
        let published = publish_all(&docs, &config());
        let services = services(&published);
        assert_eq!(
            names(&services),
            [
                "nons/web",
                "open/web",
                "shop/old",
                "shop/private",
                "shop/private-old",
                "shop/web"
            ]
        );
        for private in &services[3..5] {
            assert!(!private.shared);
            assert!(
                private.backends.is_empty(),
                "private backends never leave the cluster"
            );
            assert_eq!(private.frontends.len(), 1);
        }
        assert_eq!(services[5].backends.len(), 1);
        assert!(services.iter().all(|s| s.include_external));
        // Only the published, shared service's slice is warned about.
        assert_eq!(
            text(&published),
            [
                "EndpointSlice shop/web-a: endpoint address \"10.2.1.500\" is not an IP address; \
              left out"
            ]
        );

        // Without the default, only namespaces annotated true publish.
        let mut cfg = config();
        cfg.default_global_namespace = false;
        assert_eq!(
            names(&self::services(&publish_all(&docs, &cfg))),
            [
                "open/web",
                "shop/old",
                "shop/private",
                "shop/private-old",
                "shop/web"
            ]
        );
    }

    /// What is wrong with a Service that is not published is not reported, except its
    /// annotations (they may be why it is not published).
    #[test]
    fn only_what_is_published_is_warned_about() {
        let bad_ports = json!([{"name": "a", "port": 80, "protocol": "ICMP"}]);
        let docs = [
            svc(
                "shop",
                "local",
                json!({"service.cilium.io/affinity": "local"}),
                bad_ports.clone(),
            ),
            svc("Shop_1", "web", json!({}), http()),
            svc(
                "shop",
                "web",
                json!({"service.cilium.io/global": "true"}),
                bad_ports,
            ),
        ];
        assert_eq!(
            text(&publish_all(&docs, &config())),
            [
                "Service shop/local: annotation service.cilium.io/affinity has no effect: the \
                 service is not global",
                "Service shop/web: port \"a\": protocol \"ICMP\" is not TCP, UDP or SCTP; left \
                 out",
            ]
        );
    }

    fn pod(name: &str, app: &str, ip: &str) -> Value {
        json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"namespace": "shop", "name": name, "labels": {"app": app}},
            "spec": {"containers": [{"name": "c"}], "nodeName": "node-a"},
            "status": {"phase": "Running", "hostIP": "192.0.2.10", "podIP": ip,
                "podIPs": [{"ip": ip}]}})
    }

    /// A value a peer would refuse is warned about and left out: here the allocator belongs
    /// to another cluster, so its identities lie outside this cluster's range.
    #[test]
    fn validation_failures_become_warnings() {
        let cfg = config();
        let mut foreign = IdentityAllocator::new(&cluster("us-1", 3)).unwrap();
        let published = publish(&objects(&[pod("a", "a", "10.2.1.1")]), &cfg, &mut foreign);
        assert!(published.kind(Kind::Identities).is_empty());
        assert!(published.kind(Kind::Ip).is_empty());
        let text = text(&published);
        assert_eq!(text.len(), 2, "{text:#?}");
        let foreign_range = cluster("us-1", 3).identity_range().unwrap();
        let id: u32 = text[0]["Identity ".len()..text[0].find(':').unwrap()]
            .parse()
            .unwrap();
        assert!(
            foreign_range.contains(model::NumericIdentity::new(id).unwrap()),
            "{text:#?}"
        );
        assert!(
            text[0].contains("not published") && text[0].contains("outside"),
            "{text:#?}"
        );
        assert!(
            text[1].starts_with("Pod shop/a: not published"),
            "{text:#?}"
        );
    }

    #[test]
    fn every_kind_is_there_even_when_empty() {
        let published = publish_all(&[], &config());
        assert!(published.is_empty());
        assert_eq!(
            published.entries.keys().copied().collect::<Vec<_>>(),
            Kind::CORE
        );
    }

    /// One step of the cache property: three services (global, shared, a good or bad port)
    /// and up to six pods (app, and an address that is their own, shared or bad).
    type Step = (Vec<(bool, bool, bool)>, Vec<(u8, u8)>);

    fn step() -> impl Strategy<Value = Step> {
        (
            prop::collection::vec((any::<bool>(), any::<bool>(), any::<bool>()), 3),
            prop::collection::vec((0u8..3, 0u8..3), 0..6),
        )
    }

    fn step_docs((services, pods): &Step) -> Vec<Value> {
        let mut docs = Vec::new();
        for (name, (global, shared, good_port)) in ["a", "b", "c"].into_iter().zip(services) {
            let mut annotations = json!({});
            if *global {
                annotations["service.cilium.io/global"] = json!("true");
            }
            if !shared {
                annotations["service.cilium.io/shared"] = json!("false");
            }
            let ports = match good_port {
                true => http(),
                false => json!([{"name": "http", "port": 0}]),
            };
            docs.push(svc("shop", name, annotations, ports));
            docs.push(slice("shop", name));
        }
        for (i, (app, address)) in pods.iter().enumerate() {
            let ip = match address {
                0 => format!("10.2.0.{}", i + 1),
                1 => "10.9.9.9".to_owned(),
                _ => "not-an-ip".to_owned(),
            };
            docs.push(pod(&format!("p{i}"), &format!("app{app}"), &ip));
        }
        docs
    }

    proptest! {
        /// Publishing with the cache of the previous publications gives exactly what a
        /// publication from scratch gives, step after step, also when values are refused
        /// (identities from another cluster's allocator).
        #[test]
        fn the_cache_changes_nothing_but_the_cost(
            steps in prop::collection::vec(step(), 1..6),
            foreign in any::<bool>(),
        ) {
            let cfg = config();
            let allocator = || match foreign {
                true => IdentityAllocator::new(&cluster("us-1", 3)).unwrap(),
                false => IdentityAllocator::new(&cfg.cluster).unwrap(),
            };
            let (mut cached_ids, mut plain_ids) = (allocator(), allocator());
            let mut cache = PublishCache::default();
            let mut previous = ClusterObjects::default();
            for step in &steps {
                let mut snapshot = objects(&step_docs(step));
                // A source hands over the same object for what did not change.
                for (key, pod) in snapshot.pods.iter_mut() {
                    if let Some(old) = previous.pods.get(key).filter(|old| *old == pod) {
                        *pod = Arc::clone(old);
                    }
                }
                for (key, service) in snapshot.services.iter_mut() {
                    if let Some(old) = previous.services.get(key).filter(|old| *old == service) {
                        *service = Arc::clone(old);
                    }
                }
                for (key, slice) in snapshot.endpoint_slices.iter_mut() {
                    if let Some(old) = previous.endpoint_slices.get(key).filter(|old| *old == slice) {
                        *slice = Arc::clone(old);
                    }
                }
                let cached = publish_cached(&snapshot, &cfg, &mut cached_ids, &mut cache);
                let plain = publish(&snapshot, &cfg, &mut plain_ids);
                prop_assert_eq!(&cached, &plain);
                previous = snapshot;
            }
        }
    }
}
