//! The real `clustermesh-apiserver` binary publishing a manifest directory (a temp copy of
//! `tests/fixtures/eu-1`) into a real store, checked by reading the store back and decoding
//! every entry with `model`, never from the publisher's memory.
//!
//! Every scenario runs twice: against a real etcd and against our store (`kvstore serve`),
//! each started by `testkit` on free loopback ports as an external store
//! (`--etcd-endpoints`). One more test lets the apiserver host the embedded store itself,
//! with mutual TLS and the per-cluster access rules.
//!
//! Our store's binary comes from `$KVSTORE_BIN`, or is built (or found up to date) with
//! `cargo build -p kvstore --bin kvstore` into this test's target dir on first use.
//!
//! Nothing here asserts on time: conditions are awaited with generous timeouts, and the
//! latencies measured on the way are printed (`cargo test -- --nocapture` shows them).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clustermesh_apiserver::published::PUBLISHED_KINDS;
use futures::StreamExt;
use kvstore::client::{ClientConfig, LeaseId, StoreClient, TlsFiles, WatchEvent};
use model::keys::{HEARTBEAT_KEY, Kind};
use model::{
    Capabilities, ClusterConfig, ClusterId, ClusterName, Entry, MaxConnectedClusters,
    validate_cluster_config, validate_entry,
};
use testkit::TestPki;

use common::*;

// ---------------------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------------------

const CLUSTER: &str = "eu-1";

/// One key as read back from the store.
#[derive(Debug, Clone)]
struct Stored {
    value: Vec<u8>,
    mod_revision: i64,
    lease: Option<LeaseId>,
}

/// Everything under `cilium/`, read at one revision.
async fn dump(client: &StoreClient) -> BTreeMap<String, Stored> {
    let listing = client
        .raw()
        .list_prefix("cilium/")
        .await
        .expect("list cilium/");
    listing
        .entries
        .into_iter()
        .map(|e| {
            (
                e.key,
                Stored {
                    value: e.value,
                    mod_revision: e.mod_revision,
                    lease: e.lease,
                },
            )
        })
        .collect()
}

fn key_set(dump: &BTreeMap<String, Stored>) -> BTreeSet<String> {
    dump.keys().cloned().collect()
}
fn cluster_config() -> ClusterConfig {
    ClusterConfig::new(
        ClusterName::new(CLUSTER).unwrap(),
        ClusterId::new(2, MaxConnectedClusters::Max255).unwrap(),
        MaxConnectedClusters::Max255,
        Capabilities {
            sync_canaries: true,
            cached: false,
            service_exports: false,
        },
    )
    .unwrap()
}

// ---------------------------------------------------------------------------------------
// What the eu-1 fixture publishes (tests/fixtures/eu-1/README.md)
// ---------------------------------------------------------------------------------------

const NODE_KEYS: [&str; 2] = [
    "cilium/state/nodes/v1/eu-1/node-a",
    "cilium/state/nodes/v1/eu-1/node-b",
];
const SERVICE_KEYS: [&str; 4] = [
    "cilium/state/services/v1/eu-1/default/legacy",
    "cilium/state/services/v1/eu-1/shop/cart",
    "cilium/state/services/v1/eu-1/shop/db",
    "cilium/state/services/v1/eu-1/shop/web",
];
/// (id, namespace, app): the label sets' home identities.
const IDENTITIES: [(u32, &str, &str); 4] = [
    (134_002, "shop", "cart"),
    (135_016, "shop", "web"),
    (145_790, "default", "legacy"),
    (168_302, "shop", "db"),
];
/// (ip, namespace, pod, app, host ip).
const IPS: [(&str, &str, &str, &str, &str); 6] = [
    ("10.2.1.17", "shop", "web-1", "web", "192.0.2.10"),
    ("10.2.1.30", "shop", "cart-1", "cart", "192.0.2.10"),
    ("10.2.1.50", "default", "legacy-1", "legacy", "192.0.2.10"),
    ("10.2.2.17", "shop", "web-2", "web", "192.0.2.11"),
    ("10.2.2.18", "shop", "web-3", "web", "192.0.2.11"),
    ("10.2.2.40", "shop", "db-0", "db", "192.0.2.11"),
];

fn identity_key(id: u32) -> String {
    format!("cilium/state/identities/v1/id/{id}")
}

fn ip_key(ip: &str) -> String {
    format!("cilium/state/ip/v1/default/{ip}")
}

fn canary(kind: Kind) -> String {
    kind.state_canary_key(&ClusterName::new(CLUSTER).unwrap())
}

/// Every state key the fixture publishes.
fn fixture_state_keys() -> BTreeSet<String> {
    NODE_KEYS
        .iter()
        .chain(SERVICE_KEYS.iter())
        .map(|k| k.to_string())
        .chain(IDENTITIES.iter().map(|(id, _, _)| identity_key(*id)))
        .chain(IPS.iter().map(|(ip, ..)| ip_key(ip)))
        .collect()
}

/// The state keys plus the cluster config, the canaries and the heartbeat.
fn with_bookkeeping(state: BTreeSet<String>) -> BTreeSet<String> {
    let mut all = state;
    all.insert(cluster_config().key());
    all.insert(HEARTBEAT_KEY.to_owned());
    all.extend(PUBLISHED_KINDS.map(canary));
    all
}

fn kind_of(key: &str) -> Option<Kind> {
    PUBLISHED_KINDS
        .into_iter()
        .find(|k| key.starts_with(k.state_prefix()))
}

fn decode(key: &str, value: &[u8]) -> Entry {
    let kind = kind_of(key).unwrap_or_else(|| panic!("{key} is no state key"));
    validate_entry(kind, key, value, &cluster_config())
        .unwrap_or_else(|e| panic!("{key} does not validate: {e}"))
}

fn labels_of(namespace: &str, app: &str) -> Vec<String> {
    vec![
        format!("k8s:app={app}"),
        format!("k8s:io.cilium.k8s.policy.cluster={CLUSTER}"),
        format!("k8s:io.kubernetes.pod.namespace={namespace}"),
    ]
}

/// Checks every value the fixture publishes, decoded as a peer decodes it.
fn check_fixture_values(dump: &BTreeMap<String, Stored>) {
    let config = validate_cluster_config(
        &cluster_config().key(),
        &dump[&cluster_config().key()].value,
        &cluster_config().name,
    )
    .expect("cluster config validates");
    assert_eq!(config, cluster_config());
    for kind in PUBLISHED_KINDS {
        assert!(!dump[&canary(kind)].value.is_empty(), "{kind} canary");
    }
    let heartbeat = String::from_utf8(dump[HEARTBEAT_KEY].value.clone()).unwrap();
    time::OffsetDateTime::parse(&heartbeat, &time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|e| panic!("heartbeat {heartbeat:?}: {e}"));

    for (key, stored) in dump.iter().filter(|(k, _)| kind_of(k).is_some()) {
        match decode(key, &stored.value) {
            Entry::Node(node) => {
                let (ip, cidr) = match node.name.as_str() {
                    "node-a" => ("192.0.2.10", "10.2.1.0/24"),
                    "node-b" => ("192.0.2.11", "10.2.2.0/24"),
                    other => panic!("unexpected node {other}"),
                };
                let addresses: Vec<String> =
                    node.addresses.iter().map(|a| a.ip.to_string()).collect();
                assert_eq!(addresses, [ip], "{key}");
                let cidrs: Vec<String> = node.pod_cidrs.iter().map(ToString::to_string).collect();
                assert_eq!(cidrs, [cidr], "{key}");
                assert_eq!(node.cluster_id.get(), 2);
            }
            Entry::Service(service) => {
                let frontends: Vec<String> =
                    service.frontends.keys().map(ToString::to_string).collect();
                let backends: Vec<(String, bool, bool, bool)> = service
                    .backends
                    .iter()
                    .map(|(ip, b)| (ip.to_string(), b.ready, b.serving, b.terminating))
                    .collect();
                let ready = |ip: &str| (ip.to_owned(), true, true, false);
                match (service.namespace.as_str(), service.name.as_str()) {
                    ("shop", "web") => {
                        assert!(service.shared);
                        assert_eq!(frontends, ["10.96.0.10"]);
                        let http = &service.frontends.values().next().unwrap()["http"];
                        assert_eq!(http.port, 80);
                        assert_eq!(
                            backends,
                            [
                                ready("10.2.1.17"),
                                ready("10.2.2.17"),
                                ("10.2.2.18".to_owned(), false, true, true),
                            ]
                        );
                    }
                    ("shop", "cart") => {
                        assert!(!service.shared, "shared: \"false\"");
                        assert_eq!(frontends, ["10.96.0.11"]);
                        assert!(
                            backends.is_empty(),
                            "a private service publishes no backends"
                        );
                    }
                    ("shop", "db") => {
                        assert!(frontends.is_empty(), "headless");
                        assert_eq!(backends, [ready("10.2.2.40")]);
                        let db0 = service.backends.values().next().unwrap();
                        assert_eq!(db0.hostname.as_ref().unwrap().as_str(), "db-0");
                    }
                    ("default", "legacy") => {
                        assert!(service.shared);
                        let port = &service.frontends.values().next().unwrap()[""];
                        assert_eq!(port.port, 8080);
                        assert_eq!(backends, [ready("10.2.1.50")]);
                    }
                    other => panic!("unexpected service {other:?}"),
                }
                assert!(service.include_external);
            }
            Entry::Identity(identity) => {
                let (_, ns, app) = IDENTITIES
                    .iter()
                    .find(|(id, ..)| *id == identity.id.get())
                    .unwrap_or_else(|| panic!("unexpected identity {}", identity.id));
                let labels: Vec<String> = identity.labels.iter().map(ToString::to_string).collect();
                assert_eq!(labels, labels_of(ns, app), "{key}");
            }
            Entry::Ip(ip) => {
                let (_, ns, pod, app, host) = IPS
                    .iter()
                    .find(|(addr, ..)| *addr == ip.ip.to_string())
                    .unwrap_or_else(|| panic!("unexpected ip {}", ip.ip));
                let (id, ..) = IDENTITIES
                    .iter()
                    .find(|(_, n, a)| n == ns && a == app)
                    .unwrap();
                assert_eq!(ip.identity.get(), *id, "{key}");
                assert_eq!(ip.namespace.as_ref().unwrap().as_str(), *ns);
                assert_eq!(ip.pod_name.as_ref().unwrap().as_str(), *pod);
                assert_eq!(ip.host_ip.unwrap().to_string(), *host);
                assert_eq!(ip.cluster.as_str(), CLUSTER);
            }
            Entry::ServiceExport(_) => panic!("{key}: no service exports are published"),
        }
    }
}

/// Checks that `/metrics` shows the entry counts of `state` and readiness.
async fn check_metrics(health: SocketAddr, state: &BTreeSet<String>) {
    let (code, metrics) = http_get(health, "/metrics").await.expect("GET /metrics");
    assert_eq!(code, 200);
    for kind in PUBLISHED_KINDS {
        let count = state
            .iter()
            .filter(|k| k.starts_with(kind.state_prefix()))
            .count();
        let line = format!(
            "clustermesh_apiserver_published_entries{{kind=\"{}\"}} {count}",
            kind.name()
        );
        assert!(metrics.lines().any(|l| l == line), "{line} in\n{metrics}");
    }
    assert!(
        metrics
            .lines()
            .any(|l| l == "clustermesh_apiserver_ready 1"),
        "{metrics}"
    );
}

// ---------------------------------------------------------------------------------------
// Scenarios
// ---------------------------------------------------------------------------------------

/// The fixture publishes exactly its expected keys and values, all under one lease;
/// `/readyz` turns 200 only once they are all in the store; `/metrics` counts them.
async fn publishes_exactly_the_fixture(which: Which) {
    let store = Store::start(which).await;
    let work = Workdir::new(&["eu-1"]);
    let started = Instant::now();
    let mut api = Apiserver::spawn(&args(&store, &work, "3s"), work.path(), "apiserver");
    let health = api.started().await;
    let not_ready = api.ready().await;
    let ready_after = started.elapsed();
    // Read right after the first 200: readiness must imply the full state is in.
    let dump = dump(&store.client).await;
    println!(
        "[{which:?}] /readyz 200 {ready_after:?} after spawn ({not_ready} × 503 before), {} keys",
        dump.len()
    );
    assert_eq!(key_set(&dump), with_bookkeeping(fixture_state_keys()));
    check_fixture_values(&dump);

    // Every key hangs on one lease, the --lease-ttl one.
    let leases: BTreeSet<Option<LeaseId>> = dump.values().map(|s| s.lease).collect();
    assert_eq!(leases.len(), 1, "{leases:?}");
    let lease = leases
        .into_iter()
        .next()
        .flatten()
        .expect("keys are leased");
    let ttl = store.client.lease_time_to_live(lease).await.unwrap();
    assert!(ttl.is_some_and(|t| t <= Duration::from_secs(3)), "{ttl:?}");

    let (code, body) = http_get(health, "/readyz").await.unwrap();
    assert_eq!(code, 200);
    assert!(
        body.contains(r#""entries":{"identities":4,"ip":6,"nodes":2,"services":4}"#),
        "{body}"
    );
    check_metrics(health, &fixture_state_keys()).await;
    let (code, _) = http_get(health, "/healthz").await.unwrap();
    assert_eq!(code, 200);
}

/// Editing, adding and deleting manifest files changes the store.
async fn manifest_changes_reach_the_store(which: Which) {
    let store = Store::start(which).await;
    let work = Workdir::new(&["eu-1"]);
    let mut api = Apiserver::spawn(&args(&store, &work, "3s"), work.path(), "apiserver");
    api.ready().await;
    let client = &store.client;

    // Edit: the one endpoint of shop/web that was neither ready nor serving becomes ready.
    let web = "cilium/state/services/v1/eu-1/shop/web";
    let slices = work.read("endpointslices.yaml");
    let old = "conditions: {ready: false, serving: false, terminating: false}";
    assert_eq!(slices.matches(old).count(), 1);
    let t = Instant::now();
    work.write(
        "endpointslices.yaml",
        &slices.replace(old, "conditions: {ready: true}"),
    );
    wait_for("10.2.1.19 among shop/web's backends", async || {
        let stored = client.raw().get(web).await.ok()??;
        match decode(web, &stored.value) {
            Entry::Service(s) => s
                .backends
                .iter()
                .any(|(ip, b)| ip.to_string() == "10.2.1.19" && b.ready)
                .then_some(()),
            _ => None,
        }
    })
    .await;
    println!("[{which:?}] edit → store: {:?}", t.elapsed());

    // Add: a file with a node, a global service with its slice, and a pod whose labels
    // need a new identity.
    let added = [
        "cilium/state/nodes/v1/eu-1/node-c",
        "cilium/state/services/v1/eu-1/shop/api",
        "cilium/state/ip/v1/default/10.2.3.17",
    ];
    let t = Instant::now();
    work.write("extra.yaml", EXTRA_MANIFEST);
    let (new_identity, added_dump) = wait_for("the added file's keys", async || {
        let dump = dump(client).await;
        if !added.iter().all(|k| dump.contains_key(*k)) {
            return None;
        }
        let new_ids: Vec<String> = dump
            .keys()
            .filter(|k| k.starts_with(Kind::Identities.state_prefix()))
            .filter(|k| !IDENTITIES.iter().any(|(id, ..)| **k == identity_key(*id)))
            .cloned()
            .collect();
        (new_ids.len() == 1).then(|| (new_ids[0].clone(), dump))
    })
    .await;
    println!("[{which:?}] add file → store: {:?}", t.elapsed());
    let Entry::Identity(identity) = decode(&new_identity, &added_dump[&new_identity].value) else {
        unreachable!()
    };
    let labels: Vec<String> = identity.labels.iter().map(ToString::to_string).collect();
    assert_eq!(labels, labels_of("shop", "api"));
    let ip_value = &added_dump["cilium/state/ip/v1/default/10.2.3.17"].value;
    let Entry::Ip(ip) = decode("cilium/state/ip/v1/default/10.2.3.17", ip_value) else {
        unreachable!()
    };
    assert_eq!(ip.identity, identity.id);
    let api_key = "cilium/state/services/v1/eu-1/shop/api";
    let Entry::Service(service) = decode(api_key, &added_dump[api_key].value) else {
        unreachable!()
    };
    assert_eq!(service.backends.len(), 1);

    // Delete: the file's objects, and the identity only its pod used, go away; the store is
    // the fixture again (with the edit).
    let t = Instant::now();
    work.remove("extra.yaml");
    let expected = with_bookkeeping(fixture_state_keys());
    let dump = wait_for("the deleted file's keys to go", async || {
        let dump = dump(client).await;
        (key_set(&dump) == expected).then_some(dump)
    })
    .await;
    println!("[{which:?}] delete file → store: {:?}", t.elapsed());
    let Entry::Service(web_value) = decode(web, &dump[web].value) else {
        unreachable!()
    };
    assert_eq!(web_value.backends.len(), 4, "the edit stays");
    check_metrics(api.health(), &fixture_state_keys()).await;
}

const EXTRA_MANIFEST: &str = r#"apiVersion: v1
kind: Node
metadata: {name: node-c}
spec: {podCIDR: 10.2.3.0/24, podCIDRs: [10.2.3.0/24]}
status: {addresses: [{type: InternalIP, address: 192.0.2.12}]}
---
apiVersion: v1
kind: Service
metadata:
  name: api
  namespace: shop
  annotations: {service.cilium.io/global: "true"}
spec:
  clusterIP: 10.96.0.20
  selector: {app: api}
  ports: [{name: http, port: 80}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: api-abc
  namespace: shop
  labels: {kubernetes.io/service-name: api}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints:
  - addresses: [10.2.3.17]
    conditions: {ready: true}
    nodeName: node-c
---
apiVersion: v1
kind: Pod
metadata: {name: api-1, namespace: shop, labels: {app: api}}
spec: {nodeName: node-c, containers: [{name: api, image: api}]}
status: {phase: Running, hostIP: 192.0.2.12, podIP: 10.2.3.17, podIPs: [{ip: 10.2.3.17}]}
"#;

/// After a SIGKILL nothing keeps the lease alive: every key the apiserver wrote (state,
/// canaries, cluster config, heartbeat) expires with it.
async fn sigkill_lets_every_key_expire(which: Which) {
    let store = Store::start(which).await;
    let work = Workdir::new(&["eu-1"]);
    let mut api = Apiserver::spawn(&args(&store, &work, "3s"), work.path(), "apiserver");
    api.ready().await;
    let before = dump(&store.client).await;
    assert_eq!(key_set(&before), with_bookkeeping(fixture_state_keys()));
    let lease = before[HEARTBEAT_KEY].lease.expect("leased");

    api.kill();
    let killed = Instant::now();
    wait_for("every key to expire", async || {
        dump(&store.client).await.is_empty().then_some(())
    })
    .await;
    println!(
        "[{which:?}] keys gone {:?} after SIGKILL (lease TTL 3s)",
        killed.elapsed()
    );
    assert_eq!(store.client.lease_time_to_live(lease).await.unwrap(), None);
}

/// A restarted apiserver, whose manifests lost a pod, a node and a service while it was
/// down, deletes the stale keys its predecessor left (still alive on the old lease) and
/// writes each kind's canary only after all of that kind's writes and deletions.
async fn restart_removes_stale_keys_before_canaries(which: Which) {
    let store = Store::start(which).await;
    let client = &store.client;
    let work = Workdir::new(&["eu-1"]);
    // The first life uses a long lease, so that its keys are certainly still there when the
    // second life starts (however slow the machine): the deletions seen below are then the
    // apiserver's, not the lease's.
    let mut first = Apiserver::spawn(&args(&store, &work, "120s"), work.path(), "first");
    first.ready().await;
    let old = dump(client).await;
    let old_lease = old[HEARTBEAT_KEY].lease.expect("leased");
    first.kill();

    work.remove_document("pods.yaml", "name: cart-1,");
    work.remove_document("nodes.yaml", "name: node-b\n");
    work.remove_document("services.yaml", "name: db\n  namespace: shop");
    let stale: BTreeSet<String> = [
        ip_key("10.2.1.30"),
        identity_key(134_002), // app=cart: its only pod is gone
        "cilium/state/nodes/v1/eu-1/node-b".to_owned(),
        "cilium/state/services/v1/eu-1/shop/db".to_owned(),
    ]
    .into();
    let mut expected_state = fixture_state_keys();
    expected_state.retain(|k| !stale.contains(k));

    // Watch everything from before the second life starts.
    let start_revision = client.status().await.unwrap().revision;
    let mut watch = client
        .raw()
        .watch_prefix("cilium/", start_revision + 1)
        .await
        .expect("watch cilium/");
    assert!(
        stale.iter().all(|k| old.contains_key(k)),
        "the stale keys are there before the restart"
    );

    let restarted = Instant::now();
    let mut second = Apiserver::spawn(&args(&store, &work, "3s"), work.path(), "second");
    second.ready().await;
    println!("[{which:?}] restart → ready: {:?}", restarted.elapsed());
    let dump = dump(client).await;
    assert_eq!(key_set(&dump), with_bookkeeping(expected_state.clone()));
    assert!(
        client
            .lease_time_to_live(old_lease)
            .await
            .unwrap()
            .is_some(),
        "the old lease is still alive, so the stale keys were deleted by the apiserver"
    );
    let new_lease = dump[HEARTBEAT_KEY].lease.expect("leased");
    assert_ne!(new_lease, old_lease);
    assert!(
        dump.values().all(|s| s.lease == Some(new_lease)),
        "every key moved to the new lease"
    );

    // In the store: each canary is newer than every key of its kind.
    for kind in PUBLISHED_KINDS {
        let canary_rev = dump[&canary(kind)].mod_revision;
        for (key, stored) in dump.iter().filter(|(k, _)| kind_of(k) == Some(kind)) {
            assert!(
                stored.mod_revision < canary_rev,
                "{key} (rev {}) after the {kind} canary (rev {canary_rev})",
                stored.mod_revision
            );
        }
    }

    // In the event history: every write and deletion of a kind precedes its canary.
    let until = dump.values().map(|s| s.mod_revision).max().expect("keys");
    let mut events: Vec<(i64, String, bool)> = Vec::new(); // (revision, key, is_put)
    let collect = async {
        while let Some(event) = watch.next().await {
            let (revision, key, put) = match event {
                WatchEvent::Put {
                    key, mod_revision, ..
                } => (mod_revision, key, true),
                WatchEvent::Delete { key, mod_revision } => (mod_revision, key, false),
                WatchEvent::Progress { .. } => continue,
                other => panic!("watch: {other:?}"),
            };
            events.push((revision, key, put));
            if revision >= until {
                break;
            }
        }
    };
    tokio::time::timeout(TIMEOUT, collect)
        .await
        .expect("watch events up to the ready state");
    let revision_of = |key: &str, put: bool| -> Vec<i64> {
        events
            .iter()
            .filter(|(_, k, p)| k == key && *p == put)
            .map(|(r, ..)| *r)
            .collect()
    };
    let config_put = revision_of(&cluster_config().key(), true);
    assert_eq!(config_put.len(), 1, "{events:?}");
    for kind in PUBLISHED_KINDS {
        let canary_puts = revision_of(&canary(kind), true);
        assert_eq!(canary_puts.len(), 1, "one {kind} canary write: {events:?}");
        let canary_rev = canary_puts[0];
        let of_kind: Vec<&(i64, String, bool)> = events
            .iter()
            .filter(|(_, k, _)| kind_of(k) == Some(kind))
            .collect();
        assert!(!of_kind.is_empty());
        for (revision, key, put) in &of_kind {
            assert!(
                *revision < canary_rev,
                "{} of {key} at rev {revision} after the {kind} canary at {canary_rev}",
                if *put { "PUT" } else { "DELETE" }
            );
            assert!(
                *revision > config_put[0],
                "{key} written before the cluster config"
            );
        }
        println!(
            "[{which:?}] {kind}: {} events in revs {}..={}, canary at {canary_rev}",
            of_kind.len(),
            of_kind.first().unwrap().0,
            of_kind.last().unwrap().0
        );
    }
    for key in &stale {
        assert_eq!(
            revision_of(key, false).len(),
            1,
            "{key} deleted: {events:?}"
        );
    }
    for key in &expected_state {
        assert_eq!(
            revision_of(key, true).len(),
            1,
            "{key} rewritten under the new lease"
        );
    }
}

/// The heartbeat is rewritten every --heartbeat-interval: its mod_revision grows.
async fn heartbeat_is_rewritten(which: Which) {
    let store = Store::start(which).await;
    let work = Workdir::new(&["eu-1"]);
    let mut args = args(&store, &work, "3s");
    args.extend(["--heartbeat-interval".to_owned(), "1s".to_owned()]);
    let mut api = Apiserver::spawn(&args, work.path(), "apiserver");
    api.ready().await;
    let heartbeat = async || {
        store
            .client
            .raw()
            .get(HEARTBEAT_KEY)
            .await
            .ok()
            .flatten()
            .map(|e| e.mod_revision)
    };
    let mut last = heartbeat().await.expect("heartbeat written");
    let mut at = Instant::now();
    let mut intervals = Vec::new();
    for _ in 0..3 {
        last = wait_for("the heartbeat to be rewritten", async || {
            heartbeat().await.filter(|r| *r > last)
        })
        .await;
        intervals.push(at.elapsed());
        at = Instant::now();
    }
    println!("[{which:?}] heartbeat rewrites observed after {intervals:?} (interval 1s)");
}

/// While the store does not answer, the lease (and with it every published key) is lost;
/// `/readyz` then says 503 until a new full pass has published everything again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_is_503_while_the_lease_is_lost() {
    let store = Store::start(Which::Etcd).await;
    let work = Workdir::new(&["eu-1"]);
    let mut api = Apiserver::spawn(&args(&store, &work, "3s"), work.path(), "apiserver");
    api.ready().await;
    store.process.freeze();
    let body = wait_for("the publisher to notice the lost lease", async || {
        let (_, body) = http_get(api.health(), "/readyz").await.ok()?;
        body.contains("lease").then_some(body)
    })
    .await;
    let (code, now) = http_get(api.health(), "/readyz").await.unwrap();
    store.process.thaw();
    assert_eq!(
        code, 503,
        "keys are gone with the lease, yet /readyz says {body} / {now}"
    );
    api.ready().await;
}

both_backends!(
    publishes_exactly_the_fixture,
    manifest_changes_reach_the_store,
    sigkill_lets_every_key_expire,
    restart_removes_stale_keys_before_canaries,
    heartbeat_is_rewritten,
);

// ---------------------------------------------------------------------------------------
// The embedded store, with mutual TLS and access rules
// ---------------------------------------------------------------------------------------

fn embedded_args(work: &Workdir, pki: &TestPki, publisher_cn: &str) -> Vec<String> {
    let server = pki.server();
    let publisher = pki.client(publisher_cn);
    let path = |p: &Path| p.display().to_string();
    vec![
        "--cluster-name".into(),
        CLUSTER.into(),
        "--cluster-id".into(),
        "2".into(),
        "--manifests".into(),
        path(&work.manifests()),
        "--store-listen".into(),
        "127.0.0.1:0".into(),
        "--data-dir".into(),
        path(&work.path().join("store.data")),
        "--store-cert".into(),
        path(&server.cert),
        "--store-key".into(),
        path(&server.key),
        "--store-cacert".into(),
        path(&pki.ca_path()),
        "--admin-cert".into(),
        path(&publisher.cert),
        "--admin-key".into(),
        path(&publisher.key),
        "--lease-ttl".into(),
        "3s".into(),
        "--health-listen".into(),
        "127.0.0.1:0".into(),
    ]
}

async fn client_as(pki: &TestPki, endpoint: &str, cn: &str) -> StoreClient {
    let files = pki.client(cn);
    connect(ClientConfig::new([endpoint]).with_tls(TlsFiles {
        ca: pki.ca_path(),
        cert: Some(files.cert),
        key: Some(files.key),
    }))
    .await
}

fn is_permission_denied(error: &kvstore::client::Error) -> bool {
    format!("{error:?}").contains("permission denied")
}

/// The apiserver hosts the store itself, over mutual TLS with access rules: its publisher
/// (admin-eu-1) writes everything, a peer (remote-b) reads the state but cannot write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_store_serves_peers_read_only() {
    let pki = Arc::new(TestPki::generate());
    let work = Workdir::new(&["eu-1"]);
    let args = embedded_args(&work, &pki, "admin-eu-1");
    let mut api = Apiserver::spawn(&args, work.path(), "apiserver");
    api.started().await;
    let endpoint = api.store.clone().expect("store endpoint in the log");
    assert!(endpoint.starts_with("https://127.0.0.1:"), "{endpoint}");
    api.ready().await;

    let admin = client_as(&pki, &endpoint, "admin-eu-1").await;
    let everything = dump(&admin).await;
    assert_eq!(key_set(&everything), with_bookkeeping(fixture_state_keys()));
    check_fixture_values(&everything);

    let remote = client_as(&pki, &endpoint, "remote-b").await;
    let state = remote
        .raw()
        .list_prefix("cilium/state/")
        .await
        .expect("remote-b reads cilium/state/");
    let keys: BTreeSet<String> = state.entries.into_iter().map(|e| e.key).collect();
    assert_eq!(keys, fixture_state_keys());
    for key in [
        cluster_config().key(),
        HEARTBEAT_KEY.to_owned(),
        canary(Kind::Nodes),
    ] {
        assert!(
            remote.raw().get(&key).await.expect("readable").is_some(),
            "{key}"
        );
    }

    // Writes of every sort are refused, and change nothing.
    let node = NODE_KEYS[0];
    let err = remote
        .raw()
        .put(node, &b"{}".to_vec(), None)
        .await
        .unwrap_err();
    assert!(is_permission_denied(&err), "put: {err:?}");
    let err = remote
        .raw()
        .put("cilium/state/nodes/v1/b/intruder", &b"{}".to_vec(), None)
        .await
        .unwrap_err();
    assert!(is_permission_denied(&err), "put: {err:?}");
    let err = remote.delete(node).await.unwrap_err();
    assert!(is_permission_denied(&err), "delete: {err:?}");
    let err = remote.delete_prefix("cilium/").await.unwrap_err();
    assert!(is_permission_denied(&err), "delete_prefix: {err:?}");
    let err = remote
        .grant_lease(Duration::from_secs(10))
        .await
        .unwrap_err();
    assert!(is_permission_denied(&err), "lease grant: {err:?}");
    // Another cluster's admin is nobody here: not even its status call (which
    // `StoreClient::connect` makes) is answered.
    let files = pki.client("admin-b");
    let stranger =
        StoreClient::connect_lazy(&ClientConfig::new([endpoint.as_str()]).with_tls(TlsFiles {
            ca: pki.ca_path(),
            cert: Some(files.cert),
            key: Some(files.key),
        }))
        .await
        .expect("client config");
    let err = stranger.status().await.unwrap_err();
    assert!(is_permission_denied(&err), "admin-b status: {err:?}");
    let err = stranger.raw().get(node).await.unwrap_err();
    assert!(is_permission_denied(&err), "admin-b reads: {err:?}");

    let after = dump(&admin).await;
    assert_eq!(key_set(&after), key_set(&everything));
    assert_eq!(after[node].value, everything[node].value);
}

/// A publisher that cannot write (it presents a read-only certificate) never turns ready:
/// `/readyz` stays 503 and says why, and nothing is published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_is_503_while_the_store_refuses_the_publisher() {
    let pki = Arc::new(TestPki::generate());
    let work = Workdir::new(&["eu-1"]);
    let args = embedded_args(&work, &pki, "remote-b");
    let mut api = Apiserver::spawn(&args, work.path(), "apiserver");
    let health = api.started().await;
    let endpoint = api.store.clone().expect("store endpoint in the log");
    let body = wait_for("/readyz to report the store error", async || {
        let (code, body) = http_get(health, "/readyz").await.ok()?;
        assert_eq!(code, 503, "{body}");
        // The store refuses the lease grant: the error names the refused call.
        body.contains("rejected lease_grant").then_some(body)
    })
    .await;
    println!("/readyz: {body}");
    wait_for("a second failed pass", async || {
        let (_, metrics) = http_get(health, "/metrics").await.ok()?;
        metrics
            .lines()
            .find_map(|l| l.strip_prefix("clustermesh_apiserver_store_errors_total "))
            .and_then(|n| n.parse::<u64>().ok())
            .filter(|n| *n >= 2)
    })
    .await;
    let (code, _) = http_get(health, "/readyz").await.unwrap();
    assert_eq!(code, 503);
    let (_, metrics) = http_get(health, "/metrics").await.unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l == "clustermesh_apiserver_ready 0"),
        "{metrics}"
    );
    let admin = client_as(&pki, &endpoint, "admin-eu-1").await;
    assert!(dump(&admin).await.is_empty(), "nothing was published");
}
