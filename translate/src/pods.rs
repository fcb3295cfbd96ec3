//! Identities and ip→identity entries from the cluster's pods.
//!
//! A pod is *live* unless it runs in the host's network namespace (its IP is the node's,
//! whose identity is a reserved one no cluster publishes) or has finished (`Succeeded`,
//! `Failed`). Every live pod's label set gets an identity, even before the pod has an IP, so
//! peers can know it before traffic arrives; live pods with IPs get ip→identity entries.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;

use cluster_source::{ClusterObjects, NamespacedName, ObjectKind};
use k8s_openapi::api::core::v1::Pod;
use model::label::K8S_SOURCE;
use model::label::NAMESPACE_LABEL_KEY;
use model::{DnsLabel, DnsSubdomain, Identity, IpIdentity, IpPrefix, Label, NumericIdentity};

use super::{Facts, TranslateConfig, Warning, object_name};
use crate::identity::{AllocError, IdentityAllocator, LabelSet};

/// Keys under this prefix (the cluster label, service account, namespace labels) are set by
/// the mesh, never by a pod: a pod setting them could pose as another cluster's workload.
const RESERVED_KEY_PREFIX: &str = "io.cilium.k8s.";

/// Label keys that say nothing about what a pod is, only about how it was rolled out:
/// Cilium's default identity-relevant label filter, which leaves out every key that
/// contains one of these. Keeping them would mint a new identity per rollout
/// (`pod-template-hash`) or per pod (`statefulset.kubernetes.io/pod-name`), and peers would
/// learn identities their policies never select. (Cilium's `kubernetes.io` entry also
/// covers `app.kubernetes.io/*`, the `beta.kubernetes.io`, `statefulset.kubernetes.io`,
/// `apps.kubernetes.io` and `batch.kubernetes.io` ones.)
const IRRELEVANT_KEY_PARTS: [&str; 8] = [
    "io.kubernetes",
    "kubernetes.io",
    "k8s.io",
    "pod-template-generation",
    "pod-template-hash",
    "controller-revision-hash",
    "controller-uid",
    "etcd_node",
];

/// Whether a pod label key is left out of identities (see [`IRRELEVANT_KEY_PARTS`]; keys
/// starting with `annotation` are Cilium's annotation labels, also left out).
fn identity_irrelevant(key: &str) -> bool {
    key.starts_with("annotation") || IRRELEVANT_KEY_PARTS.iter().any(|part| key.contains(part))
}

/// One live pod's IP and the identity its labels have.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IpFact {
    /// The pod, as the snapshot names it.
    pub pod: NamespacedName,
    /// The ip→identity entry.
    pub entry: IpIdentity,
}

/// What one pod contributes whatever the other pods are, kept from one translation to the
/// next: with 100k pods, an edit then reads only the pods it replaced (sources share
/// unchanged objects, so "unchanged" is "the same `Arc`").
#[derive(Debug)]
pub(super) struct PodFacts {
    /// The pod these facts were read from.
    pod: Arc<Pod>,
    /// How warnings name the pod.
    object: String,
    /// Its security labels; `None` when it is not live or its labels cannot be used.
    labels: Option<LabelSet>,
    /// Warnings about its labels.
    label_warnings: Vec<String>,
    host_ip: Option<IpAddr>,
    namespace: Option<DnsLabel>,
    pod_name: Option<DnsSubdomain>,
    ips: Vec<IpAddr>,
    /// Warnings about its addresses, reported only when it has an identity.
    ip_warnings: Vec<String>,
    /// The facts of `ips`, for the identity they were made with.
    ip_facts: Option<(NumericIdentity, Vec<Arc<IpFact>>)>,
}

impl PodFacts {
    fn read(key: &NamespacedName, pod: &Arc<Pod>, config: &TranslateConfig) -> PodFacts {
        let object = object_name(ObjectKind::Pod, Some(&key.namespace), &key.name);
        let mut facts = PodFacts {
            pod: Arc::clone(pod),
            object,
            labels: None,
            label_warnings: Vec::new(),
            host_ip: None,
            namespace: None,
            pod_name: None,
            ips: Vec::new(),
            ip_warnings: Vec::new(),
            ip_facts: None,
        };
        if host_network(pod) || finished(pod) {
            return facts;
        }
        facts.labels = security_labels(key, pod, config, &mut facts.label_warnings);
        let status = pod.status.as_ref();
        facts.host_ip = status.and_then(|s| s.host_ip.as_deref()).and_then(|ip| {
            ip.parse::<IpAddr>()
                .map_err(|_| {
                    facts
                        .ip_warnings
                        .push(format!("hostIP {ip:?} is not an IP address; left out"));
                })
                .ok()
        });
        (facts.namespace, facts.pod_name) = match DnsLabel::new(key.namespace.as_str()) {
            Ok(ns) => (Some(ns), DnsSubdomain::new(key.name.as_str()).ok()),
            Err(_) => (None, None),
        };
        facts.ips = pod_ips(pod, &mut facts.ip_warnings);
        facts
    }

    /// Makes the pod's ip facts for `identity`, unless they already are.
    fn make_ip_facts(
        &mut self,
        key: &NamespacedName,
        identity: NumericIdentity,
        config: &TranslateConfig,
    ) {
        if self.ip_facts.as_ref().is_none_or(|(id, _)| *id != identity) {
            let facts = self
                .ips
                .iter()
                .map(|ip| {
                    Arc::new(IpFact {
                        pod: key.clone(),
                        entry: IpIdentity {
                            schema: Default::default(),
                            ip: IpPrefix::host(*ip),
                            identity,
                            host_ip: self.host_ip,
                            namespace: self.namespace.clone(),
                            pod_name: self.pod_name.clone(),
                            cluster: config.cluster.name.clone(),
                        },
                    })
                })
                .collect();
            self.ip_facts = Some((identity, facts));
        }
    }
}

/// The cached facts of every pod, in the snapshot's (key) order.
pub(super) type PodCache = Vec<(NamespacedName, PodFacts)>;

pub(super) fn translate(
    objects: &ClusterObjects,
    config: &TranslateConfig,
    identities: &mut IdentityAllocator,
    cache: &mut PodCache,
    facts: &mut Facts,
) {
    refresh(cache, objects, config);
    let warnings = &mut facts.pod_warnings;
    let mut in_use: BTreeSet<&LabelSet> = BTreeSet::new();
    for (_, pod) in cache.iter() {
        for warning in &pod.label_warnings {
            warnings.push(Warning::new(&pod.object, warning.clone()));
        }
        in_use.extend(pod.labels.as_ref());
    }
    let failed = allocate(identities, &in_use);
    facts.identities = identities
        .iter()
        .map(|(id, labels)| Identity::new(id, labels.iter().cloned()))
        .collect();

    let mut owners: BTreeMap<IpAddr, &Arc<IpFact>> = BTreeMap::new();
    for (key, pod) in cache.iter_mut() {
        let Some(labels) = pod.labels.as_ref() else {
            continue;
        };
        let Some(identity) = identities.get(labels) else {
            let reason = failed
                .get(labels)
                .map_or_else(|| "no identity".to_owned(), ToString::to_string);
            warnings.push(Warning::new(
                &pod.object,
                format!("not given an identity ({reason}); its IPs are not published"),
            ));
            continue;
        };
        pod.make_ip_facts(key, identity, config);
        let pod: &PodFacts = pod;
        for warning in &pod.ip_warnings {
            warnings.push(Warning::new(&pod.object, warning.clone()));
        }
        let ip_facts = pod.ip_facts.as_ref().map_or(&[][..], |(_, f)| f);
        for (ip, fact) in pod.ips.iter().zip(ip_facts) {
            if let Some(owner) = owners.get(ip) {
                let owner =
                    object_name(ObjectKind::Pod, Some(&owner.pod.namespace), &owner.pod.name);
                warnings.push(Warning::new(
                    &pod.object,
                    format!("IP {ip} is also {owner}'s; published for that pod only"),
                ));
                continue;
            }
            owners.insert(*ip, fact);
        }
    }
    facts.ips = owners.into_values().cloned().collect();
}

/// Brings the cache to the snapshot's pods: both are sorted by key, so one merge walk keeps
/// the facts of every pod that is still the same object and reads the others, without a
/// lookup per pod.
fn refresh(cache: &mut PodCache, objects: &ClusterObjects, config: &TranslateConfig) {
    let mut old = std::mem::take(cache).into_iter().peekable();
    cache.reserve(objects.pods.len());
    for (key, pod) in &objects.pods {
        while old.next_if(|(cached, _)| cached < key).is_some() {}
        let kept = old.next_if(|(cached, facts)| cached == key && Arc::ptr_eq(&facts.pod, pod));
        cache.push(kept.unwrap_or_else(|| (key.clone(), PodFacts::read(key, pod, config))));
    }
}

/// Allocates every label set in use and releases the rest. New label sets go in sorted
/// order (so collisions resolve the same way every time) and before anything is released
/// (so an identity is not handed to other labels in the pass that frees it), unless the range
/// is full: then those that failed are retried after the release.
fn allocate(
    identities: &mut IdentityAllocator,
    in_use: &BTreeSet<&LabelSet>,
) -> BTreeMap<LabelSet, AllocError> {
    let failed: Vec<&LabelSet> = in_use
        .iter()
        .copied()
        .filter(|labels| identities.allocate(labels).is_err())
        .collect();
    identities.release_unused(in_use);
    failed
        .into_iter()
        .filter_map(|labels| {
            identities
                .allocate(labels)
                .err()
                .map(|error| (labels.clone(), error))
        })
        .collect()
}

fn host_network(pod: &Pod) -> bool {
    pod.spec
        .as_ref()
        .and_then(|s| s.host_network)
        .unwrap_or(false)
}

fn finished(pod: &Pod) -> bool {
    matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    )
}

/// `k8s:<key>=<value>` per identity-relevant pod label, the namespace label and the cluster
/// label; `None` (with
/// a warning) when a label cannot be written as a security label, because an identity
/// without it would stand for other pods.
fn security_labels(
    key: &NamespacedName,
    pod: &Pod,
    config: &TranslateConfig,
    warnings: &mut Vec<String>,
) -> Option<LabelSet> {
    let mut labels = LabelSet::new();
    for (k, v) in pod.metadata.labels.iter().flatten() {
        if k == NAMESPACE_LABEL_KEY || k.starts_with(RESERVED_KEY_PREFIX) {
            warnings.push(format!(
                "label {k} is set by the mesh, not by pods; left out of its identity"
            ));
            continue;
        }
        if identity_irrelevant(k) {
            continue;
        }
        match Label::new(K8S_SOURCE, k, v) {
            Ok(label) => {
                labels.insert(label);
            }
            Err(error) => {
                warnings.push(format!("not given an identity: {error}"));
                return None;
            }
        }
    }
    match Label::new(K8S_SOURCE, NAMESPACE_LABEL_KEY, key.namespace.as_str()) {
        Ok(label) => labels.insert(label),
        Err(error) => {
            warnings.push(format!("not given an identity: {error}"));
            return None;
        }
    };
    labels.insert(Label::cluster(&config.cluster.name));
    Some(labels)
}

/// `status.podIPs`, or the older `status.podIP`, each once.
fn pod_ips(pod: &Pod, warnings: &mut Vec<String>) -> Vec<IpAddr> {
    let Some(status) = pod.status.as_ref() else {
        return Vec::new();
    };
    let listed: Vec<&str> = match status.pod_ips.as_deref() {
        Some(list) if !list.is_empty() => list.iter().map(|p| p.ip.as_str()).collect(),
        _ => status.pod_ip.iter().map(String::as_str).collect(),
    };
    let mut ips = Vec::new();
    for text in listed.into_iter().filter(|t| !t.is_empty()) {
        match text.parse::<IpAddr>() {
            Ok(ip) if !ips.contains(&ip) => ips.push(ip),
            Ok(_) => {}
            Err(_) => warnings.push(format!("pod IP {text:?} is not an IP address; left out")),
        }
    }
    ips
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use proptest::prelude::*;
    use serde_json::{Value, json};

    use super::super::testutil::{config, objects, translate_all};
    use super::super::{Facts, TranslateConfig, translate};
    use crate::identity::IdentityAllocator;
    use model::{Identity, IpIdentity, NumericIdentity};

    fn pod(ns: &str, name: &str, labels: Value, ip: Option<&str>, phase: &str) -> Value {
        let mut status = json!({"phase": phase, "hostIP": "192.0.2.10"});
        if let Some(ip) = ip {
            status["podIP"] = json!(ip);
            status["podIPs"] = json!([{"ip": ip}]);
        }
        json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"namespace": ns, "name": name, "labels": labels},
            "spec": {"containers": [{"name": "c"}], "nodeName": "node-a"},
            "status": status})
    }

    fn labels_of(identity: &Identity) -> Vec<String> {
        identity.labels.iter().map(ToString::to_string).collect()
    }

    /// Two rollouts of one Deployment and the pods of a StatefulSet share one identity each:
    /// the labels Kubernetes adds per rollout or per pod are not identity-relevant.
    #[test]
    fn rollout_labels_do_not_mint_identities() {
        let docs = vec![
            pod(
                "shop",
                "web-7d4f9-a",
                json!({"app": "web", "pod-template-hash": "7d4f9"}),
                Some("10.2.1.1"),
                "Running",
            ),
            pod(
                "shop",
                "web-5c8b1-b",
                json!({"app": "web", "pod-template-hash": "5c8b1",
                       "app.kubernetes.io/name": "web"}),
                Some("10.2.1.2"),
                "Running",
            ),
            pod(
                "shop",
                "db-0",
                json!({"app": "db", "controller-revision-hash": "db-6f",
                       "statefulset.kubernetes.io/pod-name": "db-0"}),
                Some("10.2.1.3"),
                "Running",
            ),
            pod(
                "shop",
                "db-1",
                json!({"app": "db", "controller-revision-hash": "db-6f",
                       "statefulset.kubernetes.io/pod-name": "db-1"}),
                Some("10.2.1.4"),
                "Running",
            ),
        ];
        let facts = translate_all(&objects(docs), &config());
        let warnings: Vec<_> = facts.warnings().collect();
        assert!(warnings.is_empty(), "{warnings:?}");
        let identities = &facts.identities;
        let labels: BTreeSet<Vec<String>> = identities.iter().map(labels_of).collect();
        let expected = |app: &str| {
            vec![
                format!("k8s:app={app}"),
                "k8s:io.cilium.k8s.policy.cluster=eu-1".to_owned(),
                "k8s:io.kubernetes.pod.namespace=shop".to_owned(),
            ]
        };
        assert_eq!(labels, BTreeSet::from([expected("db"), expected("web")]));
        let ips = ip_entries(&facts);
        assert_eq!(ips.len(), 4);
        assert_eq!(ips[0].identity, ips[1].identity);
        assert_eq!(ips[2].identity, ips[3].identity);
    }

    #[test]
    fn identities_and_ips() {
        let mut host = pod(
            "kube-system",
            "agent",
            json!({"app": "agent"}),
            Some("192.0.2.10"),
            "Running",
        );
        host["spec"]["hostNetwork"] = json!(true);
        let mut dual = pod("shop", "web-2", json!({"app": "web"}), None, "Running");
        dual["status"]["podIPs"] = json!([{"ip": "10.2.1.19"}, {"ip": "fd00:2:1::19"}]);
        let docs = vec![
            pod(
                "shop",
                "web-1",
                json!({"app": "web"}),
                Some("10.2.1.17"),
                "Running",
            ),
            dual,
            pod("shop", "web-3", json!({"app": "web"}), None, "Pending"),
            pod(
                "shop",
                "db-1",
                json!({"app": "db"}),
                Some("10.2.1.20"),
                "Running",
            ),
            pod(
                "blog",
                "web-1",
                json!({"app": "web"}),
                Some("10.2.1.21"),
                "Running",
            ),
            pod(
                "shop",
                "done",
                json!({"app": "job"}),
                Some("10.2.1.22"),
                "Succeeded",
            ),
            pod(
                "shop",
                "crashed",
                json!({"app": "job2"}),
                Some("10.2.1.23"),
                "Failed",
            ),
            pod(
                "shop",
                "sneaky",
                json!({"app": "web",
                "io.cilium.k8s.policy.cluster": "other", "io.kubernetes.pod.namespace": "blog"}),
                Some("10.2.1.24"),
                "Running",
            ),
            pod(
                "shop",
                "clash",
                json!({"app": "db"}),
                Some("10.2.1.17"),
                "Running",
            ),
            host,
        ];
        let facts = translate_all(&objects(docs), &config());
        let identities = &facts.identities;
        let sets: BTreeSet<Vec<String>> = identities.iter().map(labels_of).collect();
        let set = |ns: &str, app: &str| {
            vec![
                format!("k8s:app={app}"),
                "k8s:io.cilium.k8s.policy.cluster=eu-1".to_owned(),
                format!("k8s:io.kubernetes.pod.namespace={ns}"),
            ]
        };
        assert_eq!(
            sets,
            BTreeSet::from([set("blog", "web"), set("shop", "db"), set("shop", "web")]),
            "same labels share one identity, the namespace matters, no host or finished pods"
        );
        let range = config().cluster.identity_range().unwrap();
        let id_of: BTreeMap<Vec<String>, NumericIdentity> = identities
            .iter()
            .map(|i| {
                assert!(range.contains(i.id));
                (labels_of(i), i.id)
            })
            .collect();
        assert!(
            identities.windows(2).all(|w| w[0].id < w[1].id),
            "in identity order"
        );

        let ips = ip_entries(&facts);
        assert!(
            ips.windows(2).all(|w| w[0].ip < w[1].ip),
            "in address order"
        );
        for fact in &facts.ips {
            let pod = fact.entry.pod_name.as_ref().unwrap();
            assert_eq!(fact.pod.name, pod.as_str(), "the fact names its pod");
        }
        let by_ip: BTreeMap<String, &IpIdentity> =
            ips.iter().map(|e| (e.ip.to_string(), e)).collect();
        assert_eq!(
            by_ip.keys().map(String::as_str).collect::<Vec<_>>(),
            [
                "10.2.1.17",
                "10.2.1.19",
                "10.2.1.20",
                "10.2.1.21",
                "10.2.1.24",
                "fd00:2:1::19"
            ]
        );
        let web = id_of[&set("shop", "web")];
        for ip in ["10.2.1.19", "fd00:2:1::19", "10.2.1.24"] {
            assert_eq!(by_ip[ip].identity, web);
        }
        assert_eq!(by_ip["10.2.1.20"].identity, id_of[&set("shop", "db")]);
        assert_eq!(by_ip["10.2.1.21"].identity, id_of[&set("blog", "web")]);
        // 10.2.1.17 is claimed by shop/clash first (pods go in name order).
        assert_eq!(
            by_ip["10.2.1.17"].pod_name.as_ref().unwrap().as_str(),
            "clash"
        );
        let entry = serde_json::to_value(by_ip["10.2.1.20"]).unwrap();
        assert_eq!(
            entry,
            json!({"schema": 1, "ip": "10.2.1.20", "identity": id_of[&set("shop", "db")].get(),
                "host_ip": "192.0.2.10", "namespace": "shop", "pod_name": "db-1",
                "cluster": "eu-1"})
        );
        assert_eq!(
            by_ip["fd00:2:1::19"].key().to_string(),
            "cilium/state/ip/v1/default/fd00:2:1::19"
        );

        let text: Vec<String> = facts.warnings().map(ToString::to_string).collect();
        let expect = [
            "Pod shop/sneaky: label io.cilium.k8s.policy.cluster is set by the mesh",
            "Pod shop/sneaky: label io.kubernetes.pod.namespace is set by the mesh",
            "Pod shop/web-1: IP 10.2.1.17 is also Pod shop/clash's",
        ];
        assert_eq!(text.len(), expect.len(), "{text:#?}");
        for (got, want) in text.iter().zip(expect) {
            assert!(got.starts_with(want), "{got:?} should start with {want:?}");
        }
    }

    #[test]
    fn bad_pod_labels_and_ips() {
        let mut bad_ip = pod(
            "shop",
            "b",
            json!({"app": "b"}),
            Some("10.2.1.500"),
            "Running",
        );
        bad_ip["status"]["hostIP"] = json!("nowhere");
        let docs = vec![
            pod(
                "shop",
                "a",
                json!({"app": "tab\there"}),
                Some("10.2.1.1"),
                "Running",
            ),
            bad_ip,
        ];
        let facts = translate_all(&objects(docs), &config());
        let text: Vec<String> = facts.warnings().map(ToString::to_string).collect();
        assert_eq!(text.len(), 3, "{text:#?}");
        assert!(
            text[0].starts_with("Pod shop/a: not given an identity: label"),
            "{text:#?}"
        );
        assert!(
            text[1].starts_with("Pod shop/b: hostIP \"nowhere\""),
            "{text:#?}"
        );
        assert!(
            text[2].starts_with("Pod shop/b: pod IP \"10.2.1.500\""),
            "{text:#?}"
        );
        assert_eq!(facts.identities.len(), 1, "only shop/b's");
        assert!(facts.ips.is_empty());
    }

    #[test]
    fn exhausted_range_warns_per_pod() {
        let cfg = config();
        let mut allocator = IdentityAllocator::with_slots(&cfg.cluster, 2);
        let docs: Vec<Value> = (0..4)
            .map(|i| {
                pod(
                    "shop",
                    &format!("p{i}"),
                    json!({"app": format!("a{}", i % 3)}),
                    Some(&format!("10.2.1.{}", i + 1)),
                    "Running",
                )
            })
            .collect();
        let facts = translate(&objects(docs), &cfg, &mut allocator);
        assert_eq!(facts.identities.len(), 2);
        // Label sets go in sorted order: a0 and a1 get the two identities, a2 (p2) none.
        let text: Vec<String> = facts.warnings().map(ToString::to_string).collect();
        assert_eq!(text.len(), 1, "{text:#?}");
        assert!(
            text[0].starts_with("Pod shop/p2: not given an identity (identity range"),
            "{text:#?}"
        );
        assert!(text[0].contains("is exhausted"), "{text:#?}");
        assert_eq!(facts.ips.len(), 3);

        // Once a0's pods are gone, a2 gets the freed identity in the same pass.
        let docs: Vec<Value> = [1, 2]
            .into_iter()
            .map(|i| {
                pod(
                    "shop",
                    &format!("p{i}"),
                    json!({"app": format!("a{i}")}),
                    Some(&format!("10.2.1.{}", i + 1)),
                    "Running",
                )
            })
            .collect();
        let facts = translate(&objects(docs), &cfg, &mut allocator);
        assert_eq!(facts.warnings().count(), 0);
        assert_eq!(facts.identities.len(), 2);
        assert_eq!(facts.ips.len(), 2);
    }

    #[test]
    fn unused_identities_are_released() {
        let cfg = config();
        let mut allocator = IdentityAllocator::new(&cfg.cluster).unwrap();
        let first = translate(
            &objects(vec![
                pod(
                    "shop",
                    "a",
                    json!({"app": "a"}),
                    Some("10.2.1.1"),
                    "Running",
                ),
                pod(
                    "shop",
                    "b",
                    json!({"app": "b"}),
                    Some("10.2.1.2"),
                    "Running",
                ),
            ]),
            &cfg,
            &mut allocator,
        );
        let second = translate(
            &objects(vec![pod(
                "shop",
                "a",
                json!({"app": "a"}),
                Some("10.2.1.1"),
                "Running",
            )]),
            &cfg,
            &mut allocator,
        );
        assert_eq!(first.identities.len(), 2);
        assert_eq!(second.identities.len(), 1);
        assert_eq!(allocator.len(), 1);
        assert!(
            first.identities.contains(&second.identities[0]),
            "kept as it was"
        );
    }

    fn pod_set() -> impl Strategy<Value = Vec<(u8, u8, u8)>> {
        // (namespace, app, tier) per pod; a few values so label sets repeat and come and go.
        prop::collection::vec((0u8..2, 0u8..4, 0u8..3), 0..10)
    }

    fn pods_objects(pods: &[(u8, u8, u8)]) -> cluster_source::ClusterObjects {
        let docs = pods
            .iter()
            .enumerate()
            .map(|(i, (ns, app, tier))| {
                let mut labels = json!({"app": format!("app{app}")});
                if *tier > 0 {
                    labels["tier"] = json!(format!("t{tier}"));
                }
                pod(
                    &format!("ns{ns}"),
                    &format!("p{i}"),
                    labels,
                    Some(&format!("10.2.{}.{}", i / 250, i % 250 + 1)),
                    "Running",
                )
            })
            .collect();
        objects(docs)
    }

    fn ids(facts: &Facts) -> BTreeMap<Vec<String>, NumericIdentity> {
        facts
            .identities
            .iter()
            .map(|identity| (labels_of(identity), identity.id))
            .collect()
    }

    fn ip_entries(facts: &Facts) -> Vec<IpIdentity> {
        facts.ips.iter().map(|fact| fact.entry.clone()).collect()
    }

    fn restart(cfg: &TranslateConfig, previous: &Facts, slots: Option<u32>) -> IdentityAllocator {
        let mut allocator = match slots {
            Some(slots) => IdentityAllocator::with_slots(&cfg.cluster, slots),
            None => IdentityAllocator::new(&cfg.cluster).unwrap(),
        };
        let warnings = allocator.seed(previous.identities.clone());
        assert!(warnings.is_empty(), "{warnings:?}");
        allocator
    }

    /// Pods as (namespace, app, address) with addresses that clash (1) or do not parse (2),
    /// so the cached path also has warnings to repeat.
    fn messy_pod_set() -> impl Strategy<Value = Vec<(u8, u8, u8)>> {
        prop::collection::vec((0u8..2, 0u8..4, 0u8..3), 0..10)
    }

    fn messy_objects(
        pods: &[(u8, u8, u8)],
        previous: &cluster_source::ClusterObjects,
    ) -> cluster_source::ClusterObjects {
        let docs = pods
            .iter()
            .enumerate()
            .map(|(i, (ns, app, address))| {
                let ip = match address {
                    0 => format!("10.2.0.{}", i + 1),
                    1 => "10.9.9.9".to_owned(),
                    _ => "not-an-ip".to_owned(),
                };
                pod(
                    &format!("ns{ns}"),
                    &format!("p{i}"),
                    json!({"app": format!("app{app}")}),
                    Some(&ip),
                    "Running",
                )
            })
            .collect();
        let mut next = objects(docs);
        // A source hands over the same object for a pod that did not change.
        for (key, pod) in next.pods.iter_mut() {
            if let Some(old) = previous.pods.get(key).filter(|old| *old == pod) {
                *pod = old.clone();
            }
        }
        next
    }

    proptest! {
        /// Translating with the cache of the previous translations gives exactly what a
        /// translation from scratch gives (entries and warnings, in order), step after step,
        /// also when identities run out.
        #[test]
        fn the_cache_changes_nothing_but_the_cost(
            base in messy_pod_set(),
            edits in prop::collection::vec(
                prop::collection::vec((0usize..10, (0u8..2, 0u8..4, 0u8..3)), 0..3),
                1..6,
            ),
            crowded in any::<bool>(),
        ) {
            // Each step edits a few pods of the previous one, as a manifest edit does.
            let mut steps = vec![base];
            for edit in edits {
                let mut pods = steps.last().cloned().unwrap_or_default();
                for (at, pod) in edit {
                    match pods.len() {
                        0 => pods.push(pod),
                        n => pods[at % n] = pod,
                    }
                }
                steps.push(pods);
            }
            let cfg = config();
            let fresh = || match crowded {
                true => IdentityAllocator::with_slots(&cfg.cluster, 3),
                false => IdentityAllocator::new(&cfg.cluster).unwrap(),
            };
            let (mut cached_ids, mut plain_ids) = (fresh(), fresh());
            let mut cache = super::super::TranslateCache::default();
            let mut previous = cluster_source::ClusterObjects::default();
            for pods in &steps {
                let snapshot = messy_objects(pods, &previous);
                let cached = super::super::translate_cached(&snapshot, &cfg, &mut cached_ids, &mut cache);
                let plain = translate(&snapshot, &cfg, &mut plain_ids);
                prop_assert_eq!(&cached, &plain);
                previous = snapshot;
            }
        }

        /// A restart seeded from the previous run's published identities gives every label
        /// set still in use the id it had, whatever the sequence of pod sets, also when the
        /// range is crowded enough for homes to collide.
        #[test]
        fn ids_survive_restarts(
            steps in prop::collection::vec(pod_set(), 1..6),
            crowded in any::<bool>(),
        ) {
            let cfg = config();
            let slots = crowded.then_some(30);
            let range = cfg.cluster.identity_range().unwrap();
            let mut previous = Facts::default();
            let mut before = BTreeMap::new();
            for pods in &steps {
                let mut allocator = restart(&cfg, &previous, slots);
                let facts = translate(&pods_objects(pods), &cfg, &mut allocator);
                prop_assert_eq!(facts.warnings().count(), 0);
                let now = ids(&facts);
                for (labels, id) in &now {
                    prop_assert!(range.contains(*id));
                    if let Some(old) = before.get(labels) {
                        prop_assert_eq!(old, id, "{:?} changed id", labels);
                    }
                }
                let distinct: BTreeSet<_> = now.values().collect();
                prop_assert_eq!(distinct.len(), now.len());
                before = now;
                previous = facts;
            }
        }

        /// Without a store, two allocators agree for the same pods in any order, as long as
        /// no two label sets share a home.
        #[test]
        fn fresh_allocators_agree(pods in pod_set(), rotate in 0usize..10) {
            let cfg = config();
            let probe = IdentityAllocator::new(&cfg.cluster).unwrap();
            let one = translate_all(&pods_objects(&pods), &cfg);
            let first_ids = ids(&one);
            let homes: BTreeSet<_> = one
                .identities
                .iter()
                .map(|identity| probe.home(&identity.labels.iter().cloned().collect()))
                .collect();
            prop_assume!(homes.len() == first_ids.len());
            // The same pods in another order (and other names) — allocation order changes.
            let mut other = pods.clone();
            if !other.is_empty() {
                let by = rotate % other.len();
                other.rotate_left(by);
            }
            other.reverse();
            let two = translate_all(&pods_objects(&other), &cfg);
            prop_assert_eq!(&first_ids, &ids(&two));
            // A single allocator that saw other pods first agrees too.
            let mut allocator = IdentityAllocator::new(&cfg.cluster).unwrap();
            let mut warm = other.clone();
            warm.truncate(other.len() / 2);
            translate(&pods_objects(&warm), &cfg, &mut allocator);
            let three = translate(&pods_objects(&pods), &cfg, &mut allocator);
            prop_assert_eq!(&first_ids, &ids(&three));
        }
    }
}
