//! What a small manifest directory publishes (`tests/fixtures/eu-1`, read with
//! `cluster_source::load_dir` as the manifest source reads it), checked key by key. The
//! fixture's README lists the same expectations for other tests that reuse it.

use std::collections::BTreeMap;
use std::path::PathBuf;

use clustermesh_apiserver::published::{Published, publish};
use mesh_translate::{IdentityAllocator, TranslateConfig};
use model::{
    Capabilities, ClusterConfig, ClusterId, ClusterName, ClusterService, Identity, IpIdentity,
    Kind, MaxConnectedClusters, Node, StoreValue,
};

fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/eu-1")
}

fn config() -> TranslateConfig {
    TranslateConfig::new(
        ClusterConfig::new(
            ClusterName::new("eu-1").unwrap(),
            ClusterId::try_from(2).unwrap(),
            MaxConnectedClusters::Max255,
            Capabilities::default(),
        )
        .unwrap(),
    )
}

fn published() -> Published {
    let objects = cluster_source::load_dir(fixture_dir()).unwrap();
    assert!(objects.synced);
    assert!(objects.problems.is_empty(), "{:#?}", objects.problems);
    let config = config();
    let mut allocator = IdentityAllocator::new(&config.cluster).unwrap();
    publish(&objects, &config, &mut allocator)
}

fn keys(published: &Published, kind: Kind) -> Vec<&str> {
    published.kind(kind).keys().map(String::as_str).collect()
}

fn value<V: StoreValue>(published: &Published, kind: Kind, key: &str) -> V {
    V::decode(&published.kind(kind)[key]).unwrap()
}

/// The identities the fixture's label sets get: their homes in cluster 2's range
/// (131328..=196607), since none collide. Pinned, because they must not change between
/// builds: a restart without the store relies on them.
const IDENTITIES: [(&str, &str, u32); 4] = [
    ("default", "legacy", 145_790),
    ("shop", "cart", 134_002),
    ("shop", "db", 168_302),
    ("shop", "web", 135_016),
];

#[test]
fn fixture_publishes_the_expected_keys() {
    let published = published();
    assert_eq!(
        keys(&published, Kind::Nodes),
        [
            "cilium/state/nodes/v1/eu-1/node-a",
            "cilium/state/nodes/v1/eu-1/node-b"
        ]
    );
    assert_eq!(
        keys(&published, Kind::Services),
        [
            "cilium/state/services/v1/eu-1/default/legacy",
            "cilium/state/services/v1/eu-1/shop/cart",
            "cilium/state/services/v1/eu-1/shop/db",
            "cilium/state/services/v1/eu-1/shop/web",
        ]
    );
    assert_eq!(
        keys(&published, Kind::Ip),
        [
            "cilium/state/ip/v1/default/10.2.1.17",
            "cilium/state/ip/v1/default/10.2.1.30",
            "cilium/state/ip/v1/default/10.2.1.50",
            "cilium/state/ip/v1/default/10.2.2.17",
            "cilium/state/ip/v1/default/10.2.2.18",
            "cilium/state/ip/v1/default/10.2.2.40",
        ]
    );
    let warnings: Vec<String> = published.warnings.iter().map(ToString::to_string).collect();
    assert_eq!(
        warnings,
        [
            "Service default/legacy: annotation service.cilium.io/affinity: value \"sideways\" is \
          not one of \"local\", \"remote\" or \"none\"; ignoring it"
        ]
    );
}

#[test]
fn fixture_identities() {
    let published = published();
    let mut by_labels = BTreeMap::new();
    for (key, bytes) in published.kind(Kind::Identities) {
        let identity = Identity::decode(bytes).unwrap();
        assert_eq!(
            *key,
            format!("cilium/state/identities/v1/id/{}", identity.id)
        );
        let labels: Vec<String> = identity.labels.iter().map(ToString::to_string).collect();
        by_labels.insert(labels, identity.id.get());
    }
    let expected: BTreeMap<Vec<String>, u32> = IDENTITIES
        .iter()
        .map(|(ns, app, id)| {
            (
                vec![
                    format!("k8s:app={app}"),
                    "k8s:io.cilium.k8s.policy.cluster=eu-1".to_owned(),
                    format!("k8s:io.kubernetes.pod.namespace={ns}"),
                ],
                *id,
            )
        })
        .collect();
    assert_eq!(by_labels, expected);

    let ip: IpIdentity = value(&published, Kind::Ip, "cilium/state/ip/v1/default/10.2.2.18");
    assert_eq!(ip.identity.get(), 135_016, "shop/web-3 has app=web");
    assert_eq!(ip.pod_name.unwrap().as_str(), "web-3");
    assert_eq!(ip.host_ip.unwrap().to_string(), "192.0.2.11");
}

#[test]
fn fixture_values() {
    let published = published();
    let node: Node = value(&published, Kind::Nodes, "cilium/state/nodes/v1/eu-1/node-a");
    assert_eq!(node.addresses.len(), 1);
    assert_eq!(node.addresses[0].ip.to_string(), "192.0.2.10");
    assert_eq!(node.pod_cidrs[0].to_string(), "10.2.1.0/24");

    let service = |name: &str| -> ClusterService {
        value(
            &published,
            Kind::Services,
            &format!("cilium/state/services/v1/eu-1/{name}"),
        )
    };
    let web = service("shop/web");
    assert!(web.shared);
    assert_eq!(
        web.frontends
            .keys()
            .map(ToString::to_string)
            .collect::<Vec<_>>(),
        ["10.96.0.10"]
    );
    let conditions: Vec<(String, bool, bool, bool)> = web
        .backends
        .iter()
        .map(|(ip, b)| (ip.to_string(), b.ready, b.serving, b.terminating))
        .collect();
    assert_eq!(
        conditions,
        [
            ("10.2.1.17".to_owned(), true, true, false),
            ("10.2.2.17".to_owned(), true, true, false),
            ("10.2.2.18".to_owned(), false, true, true),
        ]
    );

    let cart = service("shop/cart");
    assert!(!cart.shared);
    assert!(cart.backends.is_empty());
    assert_eq!(cart.frontends.len(), 1);

    let db = service("shop/db");
    assert!(db.frontends.is_empty(), "headless");
    let backend = db.backends.values().next().unwrap();
    assert_eq!(backend.hostname.as_ref().unwrap().as_str(), "db-0");

    let legacy = service("default/legacy");
    assert!(legacy.shared);
    let frontend = &legacy.frontends.values().next().unwrap()[""];
    assert_eq!(frontend.port, 8080);
    assert_eq!(legacy.backends.len(), 1);
}
