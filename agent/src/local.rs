//! The local cluster's part, from its own objects, through the mesh's translation.
//!
//! [`mesh_translate`] gives every Service with every backend and what the mesh makes of it
//! (global, shared, affinity), the same way the apiserver reads it before it publishes the
//! global part; and the identities and pod IPs, with an identity allocator seeded from the
//! agent's last state so numbers are stable across restarts (and, being the same deterministic
//! allocator, equal to the apiserver's when no label sets collide).

use std::collections::BTreeSet;
use std::sync::Arc;

use cluster_source::ClusterObjects;
use mesh_translate::{
    Facts, IdentityAllocator, TranslateCache, TranslateConfig, Warning, translate_cached,
};
use model::{ClusterConfig, Identity, NumericIdentity};

use crate::state::{LocalPart, LocalService};
use crate::tables::AffinityMode;

/// Turns the local cluster's snapshots into its part.
#[derive(Debug)]
pub struct LocalTranslator {
    config: TranslateConfig,
    allocator: IdentityAllocator,
    /// Per-pod and per-service results of the last translation, so a change costs what it
    /// touched.
    cache: TranslateCache,
    node_name: Option<String>,
}

/// Why the translator cannot start.
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    /// The local cluster's id does not fit its max-connected-clusters.
    #[error("local cluster config: {0}")]
    Config(#[from] model::IdentityError),
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
            node_name,
        })
    }

    /// Keeps the identities of a previous run (from the persisted state).
    pub fn seed(&mut self, identities: impl IntoIterator<Item = Identity>) {
        for warning in self.allocator.seed(identities) {
            tracing::debug!(%warning, "seeding local identities");
        }
    }

    /// Translates a synced snapshot.
    pub fn translate(&mut self, objects: &Arc<ClusterObjects>) -> (LocalPart, Vec<Warning>) {
        let facts = translate_cached(objects, &self.config, &mut self.allocator, &mut self.cache);
        let mut part = LocalPart::default();
        for fact in facts.services.values() {
            // A Service no mesh value can name has no frontend to program either.
            let Some(service) = &fact.value else {
                continue;
            };
            part.services.insert(LocalService {
                service: service.clone(),
                global: fact.global,
                affinity: AffinityMode::from(fact.affinity),
            });
        }
        for identity in &facts.identities {
            part.identities.insert(identity.clone());
        }
        for ip in &facts.ips {
            part.ips.insert(ip.entry.clone());
        }
        part.endpoints = self.endpoints(objects, &facts);
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
        (part, facts.warnings().cloned().collect())
    }

    /// The identities policies apply to: those of the node's pods, or every local identity.
    fn endpoints(&self, objects: &ClusterObjects, facts: &Facts) -> BTreeSet<NumericIdentity> {
        let Some(node) = &self.node_name else {
            return facts.identities.iter().map(|i| i.id).collect();
        };
        facts
            .ips
            .iter()
            // An entry that cannot name its pod names no endpoint.
            .filter(|ip| ip.entry.pod_name.is_some())
            .filter(|ip| {
                objects
                    .pods
                    .get(&ip.pod)
                    .and_then(|p| p.spec.as_ref())
                    .and_then(|s| s.node_name.as_deref())
                    == Some(node.as_str())
            })
            .map(|ip| ip.entry.identity)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::tables::Keyed;
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
        let (part, warnings) = t.translate(&objs);
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
        let warnings: Vec<String> = warnings.iter().map(ToString::to_string).collect();
        assert!(warnings.is_empty(), "{warnings:?}");
    }

    fn pod(name: &str, app: &str, ip: &str, node: &str) -> serde_json::Value {
        json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"namespace": "shop", "name": name, "labels": {"app": app}},
            "spec": {"containers": [{"name": "c"}], "nodeName": node},
            "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}})
    }

    /// Told its node, the agent applies policies to the identities of that node's pods only;
    /// otherwise to every local identity.
    #[test]
    fn endpoints_are_the_node_pods_identities() {
        let cluster = ClusterConfig::new(
            ClusterName::new("a").unwrap(),
            ClusterId::try_from(1).unwrap(),
            MaxConnectedClusters::Max255,
            Capabilities::default(),
        )
        .unwrap();
        let objs = objects(vec![
            pod("web-1", "web", "10.1.0.5", "node-a"),
            pod("db-1", "db", "10.1.0.6", "node-b"),
        ]);
        let mut everywhere = LocalTranslator::new(cluster.clone(), true, None).unwrap();
        let (all, _) = everywhere.translate(&objs);
        assert_eq!(all.identities.len(), 2);
        assert_eq!(
            all.endpoints,
            all.identities
                .values()
                .map(|i| i.id)
                .collect::<BTreeSet<_>>()
        );
        let mut on_a = LocalTranslator::new(cluster, true, Some("node-a".to_owned())).unwrap();
        let (part, _) = on_a.translate(&objs);
        let web = part.ips.values().find(|ip| ip.ip.to_string() == "10.1.0.5");
        assert_eq!(
            part.endpoints,
            BTreeSet::from([web.unwrap().identity]),
            "node-a runs web-1 only"
        );
    }
}
