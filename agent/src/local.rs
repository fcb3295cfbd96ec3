//! The local cluster's part, from its own objects, through the apiserver's translation.
//!
//! [`clustermesh_apiserver::translate`] publishes only global services, and a service that is
//! not shared without its backends. A node agent needs every service with every backend, so
//! the snapshot is translated with every Service marked global and shared (and every namespace
//! global), which yields each service's frontends and all its backends from its
//! EndpointSlices; the Service's real annotations and its namespace then decide, with
//! [`model::parse_service_annotations`], whether it is global here and its affinity.
//! Identities and pod IPs come from the same translation, with an identity allocator seeded
//! from the agent's last state so numbers are stable across restarts (and, being the same
//! deterministic allocator, equal to the apiserver's when no label sets collide).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use cluster_source::{ClusterObjects, NamespacedName};
use clustermesh_apiserver::identity::IdentityAllocator;
use clustermesh_apiserver::translate::{
    NAMESPACE_GLOBAL_ANNOTATION, TranslateCache, TranslateConfig, Warning, translate_cached,
};
use k8s_openapi::api::core::v1::Service;
use model::annotations::{GLOBAL, GLOBAL_ALIAS, SHARED, SHARED_ALIAS};
use model::{ClusterConfig, ClusterService, Entry, Identity, IpIdentity, Kind};

use crate::state::{LocalPart, LocalService};
use crate::tables::{AffinityMode, Keyed};

/// Turns the local cluster's snapshots into its part.
#[derive(Debug)]
pub struct LocalTranslator {
    config: TranslateConfig,
    allocator: IdentityAllocator,
    /// Per-pod and per-service results of the last translation, so a change costs what it
    /// touched.
    cache: TranslateCache,
    /// Each Service as last seen, with its global-and-shared copy: the same source object
    /// gets the same copy, so the translation cache recognises it.
    forced: BTreeMap<NamespacedName, (Arc<Service>, Arc<Service>)>,
    node_name: Option<String>,
}

/// Why the translator cannot start.
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    /// The local cluster's id does not fit its max-connected-clusters.
    #[error("local cluster config: {0}")]
    Config(#[from] model::IdentityError),
}

fn namespace_global(objects: &ClusterObjects, namespace: &str, default: bool) -> bool {
    objects
        .namespaces
        .get(namespace)
        .and_then(|ns| ns.metadata.annotations.as_ref())
        .and_then(|a| a.get(NAMESPACE_GLOBAL_ANNOTATION))
        .and_then(|v| {
            if v.eq_ignore_ascii_case("true") {
                Some(true)
            } else if v.eq_ignore_ascii_case("false") {
                Some(false)
            } else {
                None
            }
        })
        .unwrap_or(default)
}

/// A copy of `service` that is global and shared.
fn forced_global(service: &Service) -> Service {
    let mut service = service.clone();
    let annotations = service
        .metadata
        .annotations
        .get_or_insert_with(BTreeMap::new);
    for key in [GLOBAL_ALIAS, SHARED, SHARED_ALIAS] {
        annotations.remove(key);
    }
    annotations.insert(GLOBAL.to_owned(), "true".to_owned());
    service
}

impl LocalTranslator {
    /// A translator for the local cluster; `node_name` limits policy subjects to the pods of
    /// that node.
    pub fn new(
        cluster: ClusterConfig,
        default_global_namespace: bool,
        node_name: Option<String>,
    ) -> Result<Self, LocalError> {
        let allocator = IdentityAllocator::new(&cluster)?;
        let mut config = TranslateConfig::new(cluster);
        config.default_global_namespace = default_global_namespace;
        Ok(LocalTranslator {
            config,
            allocator,
            cache: TranslateCache::default(),
            forced: BTreeMap::new(),
            node_name,
        })
    }

    /// Keeps the identities of a previous run (from the persisted state).
    pub fn seed(&mut self, identities: impl IntoIterator<Item = Identity>) {
        for warning in self.allocator.seed(identities) {
            tracing::debug!(%warning, "seeding local identities");
        }
    }

    /// The snapshot with every Service global and shared and every namespace left to the
    /// default (global), so the translation yields every service with all its backends.
    fn all_services_global(&mut self, objects: &ClusterObjects) -> ClusterObjects {
        let mut forced = objects.clone();
        let mut copies = BTreeMap::new();
        for (key, service) in forced.services.iter_mut() {
            let copy = match self.forced.remove(key) {
                Some((source, copy)) if Arc::ptr_eq(&source, service) => copy,
                _ => Arc::new(forced_global(service)),
            };
            copies.insert(key.clone(), (Arc::clone(service), Arc::clone(&copy)));
            *service = copy;
        }
        self.forced = copies;
        for namespace in forced.namespaces.values_mut() {
            if namespace
                .metadata
                .annotations
                .as_ref()
                .is_some_and(|a| a.contains_key(NAMESPACE_GLOBAL_ANNOTATION))
                && let Some(annotations) = Arc::make_mut(namespace).metadata.annotations.as_mut()
            {
                annotations.remove(NAMESPACE_GLOBAL_ANNOTATION);
            }
        }
        forced
    }

    /// Translates a synced snapshot.
    pub fn translate(&mut self, objects: &Arc<ClusterObjects>) -> (LocalPart, Vec<Warning>) {
        let forced = self.all_services_global(objects);
        let forced_config = TranslateConfig {
            default_global_namespace: true,
            ..self.config.clone()
        };
        let published = translate_cached(
            &forced,
            &forced_config,
            &mut self.allocator,
            &mut self.cache,
        );
        let mut part = LocalPart::default();
        let mut warnings = published.warnings.clone();
        for bytes in published.kind(Kind::Services).values() {
            let Ok(Entry::Service(service)) = Entry::decode(Kind::Services, bytes) else {
                continue;
            };
            let service: ClusterService = service;
            let key = Keyed::key(&service);
            let original = objects
                .services
                .get(&cluster_source::NamespacedName::new(
                    key.namespace.as_str(),
                    key.name.as_str(),
                ))
                .and_then(|s| s.metadata.annotations.clone())
                .unwrap_or_default();
            let (options, annotation_warnings) = model::parse_service_annotations(&original);
            for w in annotation_warnings {
                warnings.push(Warning::new(format!("Service {key}"), w.to_string()));
            }
            let global = options.global
                && namespace_global(
                    objects,
                    key.namespace.as_str(),
                    self.config.default_global_namespace,
                );
            let mut service = service;
            service.shared = global && options.shared;
            service.include_external = global;
            part.services.insert(LocalService {
                service,
                global,
                affinity: if global {
                    AffinityMode::from(options.affinity)
                } else {
                    AffinityMode::None
                },
            });
        }
        for bytes in published.kind(Kind::Identities).values() {
            if let Ok(Entry::Identity(identity)) = Entry::decode(Kind::Identities, bytes) {
                part.identities.insert(identity);
            }
        }
        for bytes in published.kind(Kind::Ip).values() {
            if let Ok(Entry::Ip(ip)) = Entry::decode(Kind::Ip, bytes) {
                part.ips.insert(ip);
            }
        }
        part.endpoints = self.endpoints(objects, part.ips.values(), &part);
        part.namespaces = objects
            .namespaces
            .iter()
            .map(|(name, ns)| (name.clone(), ns.metadata.labels.clone().unwrap_or_default()))
            .collect();
        part.network_policies = objects
            .network_policies
            .values()
            .map(|p| (**p).clone())
            .collect();
        part.cilium_policies = objects
            .cilium_network_policies
            .values()
            .map(|p| (**p).clone())
            .collect();
        (part, warnings)
    }

    /// The identities policies apply to: those of the node's pods, or every local identity.
    fn endpoints<'a>(
        &self,
        objects: &ClusterObjects,
        ips: impl Iterator<Item = &'a IpIdentity>,
        part: &LocalPart,
    ) -> BTreeSet<model::NumericIdentity> {
        let Some(node) = &self.node_name else {
            return part.identities.values().map(|i| i.id).collect();
        };
        ips.filter(|ip| {
            let (Some(ns), Some(pod)) = (&ip.namespace, &ip.pod_name) else {
                return false;
            };
            objects
                .pods
                .get(&cluster_source::NamespacedName::new(
                    ns.as_str(),
                    pod.as_str(),
                ))
                .and_then(|p| p.spec.as_ref())
                .and_then(|s| s.node_name.as_deref())
                == Some(node.as_str())
        })
        .map(|ip| ip.identity)
        .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use model::{Capabilities, ClusterId, ClusterName, MaxConnectedClusters};
    use serde_json::json;

    fn objects(docs: Vec<serde_json::Value>) -> Arc<ClusterObjects> {
        let text: String = docs
            .iter()
            .map(|d| format!("---\n{}\n", serde_json::to_string(d).unwrap()))
            .collect();
        let objs =
            cluster_source::parse_manifests("test", &text, cluster_source::ManifestFormat::Yaml)
                .expect("valid manifests");
        let mut out = ClusterObjects {
            synced: true,
            ..ClusterObjects::default()
        };
        for o in objs {
            out.insert(o);
        }
        Arc::new(out)
    }

    fn service(
        ns: &str,
        name: &str,
        ip: &str,
        annotations: serde_json::Value,
    ) -> serde_json::Value {
        json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"namespace": ns, "name": name, "annotations": annotations},
            "spec": {"clusterIP": ip, "ports": [{"name": "http", "port": 80}], "selector": {"app": name}}})
    }

    fn slice(ns: &str, name: &str, ip: &str) -> serde_json::Value {
        json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"namespace": ns, "name": format!("{name}-1"),
                "labels": {"kubernetes.io/service-name": name}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [{"addresses": [ip], "conditions": {"ready": true}}]})
    }

    #[test]
    fn every_service_with_every_backend_and_its_real_options() {
        let cluster = ClusterConfig::new(
            ClusterName::new("a").unwrap(),
            ClusterId::try_from(1).unwrap(),
            MaxConnectedClusters::Max255,
            Capabilities::default(),
        )
        .unwrap();
        let mut t = LocalTranslator::new(cluster, true, None).unwrap();
        let objs = objects(vec![
            json!({"apiVersion": "v1", "kind": "Namespace",
                "metadata": {"name": "private", "annotations": {"clustermesh.cilium.io/global": "false"}}}),
            service(
                "shop",
                "web",
                "10.96.0.10",
                json!({"service.cilium.io/global": "true",
                "service.cilium.io/shared": "false", "service.cilium.io/affinity": "local"}),
            ),
            slice("shop", "web", "10.1.0.5"),
            service("shop", "db", "10.96.0.11", json!({})),
            slice("shop", "db", "10.1.0.6"),
            service(
                "private",
                "web",
                "10.96.0.12",
                json!({"service.cilium.io/global": "true"}),
            ),
            slice("private", "web", "10.1.0.7"),
        ]);
        let (part, _) = t.translate(&objs);
        let by_name: BTreeMap<String, &LocalService> = part
            .services
            .values()
            .map(|s| (Keyed::key(&s.service).to_string(), s))
            .collect();
        assert_eq!(by_name.len(), 3);
        let web = by_name["shop/web"];
        assert!(web.global && !web.service.shared);
        assert_eq!(web.affinity, AffinityMode::Local);
        assert_eq!(
            web.service.backends.len(),
            1,
            "not shared, but used locally"
        );
        let db = by_name["shop/db"];
        assert!(!db.global);
        assert_eq!(db.service.backends.len(), 1);
        let private = by_name["private/web"];
        assert!(!private.global, "the namespace is not global");
        assert_eq!(private.affinity, AffinityMode::None);

        // The same Service object gets the same global copy, so the translation cache can
        // recognise it; an edited Service gets a new one.
        let first = t.all_services_global(&objs);
        let again = t.all_services_global(&objs);
        let key = |ns: &str, name: &str| cluster_source::NamespacedName::new(ns, name);
        let web = key("shop", "web");
        assert!(Arc::ptr_eq(&first.services[&web], &again.services[&web]));
        let mut edited = (*objs).clone();
        let db = key("shop", "db");
        Arc::make_mut(edited.services.get_mut(&db).unwrap())
            .metadata
            .labels = Some(BTreeMap::from([("tier".to_owned(), "data".to_owned())]));
        let after = t.all_services_global(&edited);
        assert!(Arc::ptr_eq(&again.services[&web], &after.services[&web]));
        assert!(!Arc::ptr_eq(&again.services[&db], &after.services[&db]));
        assert_eq!(
            after.services[&db].metadata.labels,
            edited.services[&db].metadata.labels
        );
    }
}
