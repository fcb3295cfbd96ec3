//! What the real `clustermesh-apiserver` binary does with bad input: command lines it
//! refuses (exit code 64, naming the flag), and input it publishes around with a warning
//! (duplicate identities already in the store, bad Service annotations, broken manifest
//! files), checked in the store and in its log.
//!
//! Scenarios with a store run against a real etcd and against our store (`kvstore serve`,
//! from `$KVSTORE_BIN` or built into this target dir on first use). Nothing here asserts on
//! time.

mod common;

use std::collections::BTreeSet;

use model::keys::Kind;
use model::{
    Capabilities, ClusterConfig, ClusterId, ClusterName, Entry, Identity, Label,
    MaxConnectedClusters, NumericIdentity, StoreValue, validate_cluster_config, validate_entry,
};

use common::*;

// ---------------------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------------------

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

fn cluster(id: u16, max: MaxConnectedClusters) -> ClusterConfig {
    ClusterConfig::new(
        ClusterName::new("eu-1").unwrap(),
        ClusterId::new(id, max).unwrap(),
        max,
        Capabilities {
            sync_canaries: true,
            cached: false,
            service_exports: false,
        },
    )
    .unwrap()
}

fn args(store: &Store, work: &Workdir, extra: &[&str]) -> Vec<String> {
    let mut args = strings(&[
        "--cluster-name",
        "eu-1",
        "--manifests",
        &work.manifests().display().to_string(),
        "--etcd-endpoints",
        &store.process.endpoint(),
        "--lease-ttl",
        "3s",
        "--health-listen",
        "127.0.0.1:0",
    ]);
    if !extra.contains(&"--cluster-id") {
        args.extend(strings(&["--cluster-id", "2"]));
    }
    args.extend(strings(extra));
    args
}

/// The state keys of the eu-1 fixture (tests/fixtures/eu-1/README.md).
fn eu1_state_keys() -> BTreeSet<String> {
    [
        "cilium/state/nodes/v1/eu-1/node-a",
        "cilium/state/nodes/v1/eu-1/node-b",
        "cilium/state/services/v1/eu-1/default/legacy",
        "cilium/state/services/v1/eu-1/shop/cart",
        "cilium/state/services/v1/eu-1/shop/db",
        "cilium/state/services/v1/eu-1/shop/web",
        "cilium/state/identities/v1/id/134002",
        "cilium/state/identities/v1/id/135016",
        "cilium/state/identities/v1/id/145790",
        "cilium/state/identities/v1/id/168302",
        "cilium/state/ip/v1/default/10.2.1.17",
        "cilium/state/ip/v1/default/10.2.1.30",
        "cilium/state/ip/v1/default/10.2.1.50",
        "cilium/state/ip/v1/default/10.2.2.17",
        "cilium/state/ip/v1/default/10.2.2.18",
        "cilium/state/ip/v1/default/10.2.2.40",
    ]
    .iter()
    .map(|k| k.to_string())
    .collect()
}

fn kind_of(key: &str) -> Kind {
    Kind::ALL
        .into_iter()
        .find(|k| key.starts_with(k.state_prefix()))
        .unwrap_or_else(|| panic!("{key} is no state key"))
}

both_backends!(
    cluster_id_300_is_valid_with_511_clusters,
    duplicate_stored_identities_resolve_to_one,
    bad_annotations_are_warned_about_and_the_rest_published,
    broken_manifest_is_reported_and_the_rest_keeps_publishing,
);

// ---------------------------------------------------------------------------------------
// Command lines refused
// ---------------------------------------------------------------------------------------

/// Every bad flag value makes the apiserver exit with 64 before it does anything, naming the
/// flag on stderr.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_flags_exit_64_naming_the_flag() {
    let work = Workdir::new(&["eu-1"]);
    let manifests = work.manifests().display().to_string();
    let missing = work.path().join("no-such-dir").display().to_string();
    let long_name = "a".repeat(33);
    // (flag expected in the message, arguments replacing the defaults).
    let cases: Vec<(&str, Vec<&str>)> = vec![
        ("--cluster-name", vec!["--cluster-name", "EU-1"]),
        ("--cluster-name", vec!["--cluster-name", "eu_1"]),
        ("--cluster-name", vec!["--cluster-name", ""]),
        ("--cluster-name", vec!["--cluster-name", &long_name]),
        ("--cluster-name", vec!["--cluster-name=-eu-1"]),
        ("--cluster-id", vec!["--cluster-id", "0"]),
        ("--cluster-id", vec!["--cluster-id", "256"]),
        (
            "--cluster-id",
            vec!["--cluster-id", "256", "--max-connected-clusters", "255"],
        ),
        (
            "--cluster-id",
            vec!["--cluster-id", "512", "--max-connected-clusters", "511"],
        ),
        ("--cluster-id", vec!["--cluster-id", "70000"]),
        ("--cluster-id", vec!["--cluster-id=-1"]),
        ("--cluster-id", vec!["--cluster-id", "two"]),
        (
            "--max-connected-clusters",
            vec!["--max-connected-clusters", "300"],
        ),
        (
            "--max-connected-clusters",
            vec!["--max-connected-clusters", "0"],
        ),
        ("--manifests", vec!["--manifests", &missing]),
        ("--lease-ttl", vec!["--lease-ttl", "1s"]),
        ("--heartbeat-interval", vec!["--heartbeat-interval", "0s"]),
    ];
    for (flag, replace) in cases {
        let mut args: Vec<&str> = vec!["--cluster-name", "eu-1", "--cluster-id", "2"];
        // Drop defaults the case sets itself.
        for name in ["--cluster-name", "--cluster-id"] {
            if replace.iter().any(|a| a.starts_with(name)) {
                let i = args.iter().position(|a| *a == name).unwrap();
                args.drain(i..i + 2);
            }
        }
        if !replace.contains(&"--manifests") {
            args.extend(["--manifests", &manifests]);
        }
        args.extend(&replace);
        // Should validation ever pass, the apiserver must fail fast instead of publishing
        // somewhere: nothing listens on port 9, and the health port is free.
        args.extend([
            "--etcd-endpoints",
            "http://127.0.0.1:9",
            "--health-listen",
            "127.0.0.1:0",
        ]);
        let mut api = Apiserver::spawn(&strings(&args), work.path(), "apiserver");
        let status = api.exit().await;
        let log = api.log();
        assert_eq!(status.code(), Some(EXIT_USAGE), "{args:?}:\n{log}");
        assert!(log.contains(flag), "{args:?}: {flag} not named in:\n{log}");
        println!(
            "{replace:?} → exit 64: {}",
            log.trim().lines().next().unwrap_or("")
        );
    }

    // Missing required flags are refused the same way.
    for (flag, args) in [
        (
            "--cluster-name",
            vec!["--cluster-id", "2", "--manifests", &manifests],
        ),
        (
            "--cluster-id",
            vec!["--cluster-name", "eu-1", "--manifests", &manifests],
        ),
    ] {
        let mut api = Apiserver::spawn(&strings(&args), work.path(), "apiserver");
        let status = api.exit().await;
        let log = api.log();
        assert_eq!(status.code(), Some(EXIT_USAGE), "{args:?}:\n{log}");
        assert!(log.contains(flag), "{args:?}: {flag} not named in:\n{log}");
    }
}

/// `--manifests` naming a file, not a directory, is refused like a missing one (before, it
/// passed validation and the daemon idled without publishing anything).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manifests_must_be_a_directory() {
    let work = Workdir::new(&["eu-1"]);
    let file = work.manifests().join("nodes.yaml").display().to_string();
    let args = strings(&[
        "--cluster-name",
        "eu-1",
        "--cluster-id",
        "2",
        "--manifests",
        &file,
        "--etcd-endpoints",
        "http://127.0.0.1:9",
        "--health-listen",
        "127.0.0.1:0",
    ]);
    let mut api = Apiserver::spawn(&args, work.path(), "apiserver");
    let status = api.exit().await;
    let log = api.log();
    assert_eq!(status.code(), Some(EXIT_USAGE), "{log}");
    assert!(log.contains("--manifests"), "{log}");
}

// ---------------------------------------------------------------------------------------
// Input published around, with warnings
// ---------------------------------------------------------------------------------------

/// Cluster id 300 is out of range for 255 clusters but valid with 511: the cluster config
/// says so, and identities come from cluster 300's (15-bit) range.
async fn cluster_id_300_is_valid_with_511_clusters(which: Which) {
    let store = Store::start(which).await;
    let work = Workdir::new(&["eu-1"]);
    let extra = ["--cluster-id", "300", "--max-connected-clusters", "511"];
    let mut api = Apiserver::spawn(&args(&store, &work, &extra), work.path(), "apiserver");
    api.ready().await;
    let config = cluster(300, MaxConnectedClusters::Max511);
    let stored = store.read(&config.key()).await;
    let read = validate_cluster_config(&config.key(), &stored[&config.key()], &config.name)
        .expect("cluster config validates");
    assert_eq!(read, config);
    let range = config.identity_range().unwrap();
    assert_eq!(range.first().get(), (300 << 15) | 256);
    let identities = store.read(Kind::Identities.state_prefix()).await;
    assert_eq!(identities.len(), 4);
    for (key, value) in store.read("cilium/state/").await {
        let entry = validate_entry(kind_of(&key), &key, &value, &config)
            .unwrap_or_else(|e| panic!("{key}: {e}"));
        if let Entry::Identity(identity) = entry {
            assert!(range.contains(identity.id), "{key} outside {range}");
        }
    }
}

/// Two identities for one label set already in the store (left by an older publisher):
/// the apiserver keeps one (the lowest), deletes the other, warns naming it, and maps the
/// label set's pods to the one kept.
async fn duplicate_stored_identities_resolve_to_one(which: Which) {
    let store = Store::start(which).await;
    let config = cluster(2, MaxConnectedClusters::Max255);
    let first = config.identity_range().unwrap().first().get();
    let (kept, dropped) = (first + 1000, first + 2000);
    let web: Vec<Label> = [
        "k8s:app=web",
        "k8s:io.cilium.k8s.policy.cluster=eu-1",
        "k8s:io.kubernetes.pod.namespace=shop",
    ]
    .iter()
    .map(|l| l.parse().unwrap())
    .collect();
    // The higher one first, so that store order is not what decides.
    for id in [dropped, kept] {
        let identity = Identity::new(NumericIdentity::new(id).unwrap(), web.clone());
        store
            .client
            .raw()
            .put(&identity.key().to_string(), &identity.encode(), None)
            .await
            .expect("seed identity");
    }

    let work = Workdir::new(&["eu-1"]);
    let mut api = Apiserver::spawn(&args(&store, &work, &[]), work.path(), "apiserver");
    api.ready().await;
    let line = api
        .logged(&[
            &format!("Identity {dropped}"),
            &format!("duplicates identity {kept}"),
        ])
        .await;
    assert!(line.contains("WARN"), "{line}");
    println!("[{which:?}] {line}");

    let identities = store.read(Kind::Identities.state_prefix()).await;
    let ids: BTreeSet<String> = identities.keys().cloned().collect();
    let expected: BTreeSet<String> = [kept, 134_002, 145_790, 168_302]
        .iter()
        .map(|id| format!("cilium/state/identities/v1/id/{id}"))
        .collect();
    assert_eq!(ids, expected, "the duplicate is deleted, web keeps {kept}");
    for ip in ["10.2.1.17", "10.2.2.17", "10.2.2.18"] {
        let key = format!("cilium/state/ip/v1/default/{ip}");
        let value = &store.read(&key).await[&key];
        let Entry::Ip(entry) = validate_entry(Kind::Ip, &key, value, &config).unwrap() else {
            unreachable!()
        };
        assert_eq!(entry.identity.get(), kept, "{key}");
    }
}

/// A Service with `global: "yes"` and `affinity: sideways` is warned about by name and not
/// published; one with a valid `global` and a bad affinity is warned about and published;
/// everything else is published as usual.
async fn bad_annotations_are_warned_about_and_the_rest_published(which: Which) {
    let store = Store::start(which).await;
    let work = Workdir::new(&["eu-1", "odd-annotations"]);
    let mut api = Apiserver::spawn(&args(&store, &work, &[]), work.path(), "apiserver");
    api.ready().await;
    for needles in [
        &[
            "object=Service shop/odd",
            "service.cilium.io/global",
            "\"yes\"",
        ][..],
        &[
            "object=Service shop/odd",
            "service.cilium.io/affinity",
            "\"sideways\"",
        ],
        &["object=Service shop/odd-global", "\"sideways\""],
    ] {
        let line = api.logged(needles).await;
        assert!(line.contains("WARN"), "{line}");
        println!("[{which:?}] {line}");
    }
    let mut expected = eu1_state_keys();
    expected.insert("cilium/state/services/v1/eu-1/shop/odd-global".to_owned());
    let state = store.read("cilium/state/").await;
    assert_eq!(state.keys().cloned().collect::<BTreeSet<_>>(), expected);
    let key = "cilium/state/services/v1/eu-1/shop/odd-global";
    let config = cluster(2, MaxConnectedClusters::Max255);
    let Entry::Service(service) =
        validate_entry(Kind::Services, key, &state[key], &config).unwrap()
    else {
        unreachable!()
    };
    assert_eq!(service.frontends.len(), 1);
    let (_, metrics) = http_get(api.health(), "/metrics").await.unwrap();
    // eu-1's default/legacy, shop/odd's two, shop/odd-global's one.
    assert!(
        metrics
            .lines()
            .any(|l| l == "clustermesh_apiserver_warnings 4"),
        "{metrics}"
    );
}

/// A manifest file with a syntax error is reported with its name and line; the rest is
/// published, and publishing goes on: fixing the file publishes its objects, breaking it
/// again keeps them, and other files' changes keep coming through.
async fn broken_manifest_is_reported_and_the_rest_keeps_publishing(which: Which) {
    let store = Store::start(which).await;
    let work = Workdir::new(&["eu-1", "broken"]);
    let mut api = Apiserver::spawn(&args(&store, &work, &[]), work.path(), "apiserver");
    api.ready().await;
    let line = api
        .logged(&["broken.yaml:10", "cluster source problem"])
        .await;
    assert!(line.contains("WARN"), "{line}");
    println!("[{which:?}] {line}");
    let keys = async || {
        store
            .read("cilium/state/")
            .await
            .into_keys()
            .collect::<BTreeSet<_>>()
    };
    assert_eq!(keys().await, eu1_state_keys(), "nothing of broken.yaml");

    // Fixed: both of its nodes are published.
    let broken = work.read("broken.yaml");
    let fixed = broken.replace("[unclosed}", "eu-1c}");
    assert_ne!(fixed, broken);
    work.write("broken.yaml", &fixed);
    let node = |n: &str| format!("cilium/state/nodes/v1/eu-1/{n}");
    let mut with_nodes = eu1_state_keys();
    with_nodes.extend([node("node-x"), node("node-y")]);
    wait_for("the fixed file's nodes", async || {
        (keys().await == with_nodes).then_some(())
    })
    .await;

    // Broken again, on another line: reported again; its last good objects stay.
    work.write("broken.yaml", &format!("{fixed}---\nkind: [\n"));
    let line = api
        .logged(&["broken.yaml:14", "cluster source problem"])
        .await;
    println!("[{which:?}] {line}");
    // Another file still publishes.
    work.write(
        "late.yaml",
        "apiVersion: v1\nkind: Node\nmetadata: {name: node-z}\n",
    );
    with_nodes.insert(node("node-z"));
    wait_for("the other file's node", async || {
        (keys().await == with_nodes).then_some(())
    })
    .await;
}
