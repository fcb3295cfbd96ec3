//! The manifest-directory source against a real temporary directory and real inotify.

mod common;

use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cluster_source::{
    CLUSTER_LABEL, ClusterObjects, ClusterSource, L4Protocol, ManifestDir, NamespacedName,
    ObjectKind, ObjectRef, SnapshotReceiver, SourceError, load_dir, spawn, wait_synced,
};
use common::{init_tracing, wait_for};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const CLUSTER: &str = r#"# the cluster itself
apiVersion: v1
kind: Namespace
metadata:
  name: shop
---
apiVersion: v1
kind: Node
metadata:
  name: node-1
  labels:
    kubernetes.io/hostname: node-1
spec:
  podCIDR: 10.1.1.0/24
status:
  addresses:
  - type: InternalIP
    address: 192.0.2.11
---
apiVersion: v1
kind: Node
metadata:
  name: node-2
spec:
  podCIDR: 10.1.2.0/24
"#;

const SHOP: &str = r#"apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: shop
  annotations:
    service.cilium.io/global: "true"
spec:
  clusterIP: 10.96.0.10
  ports:
  - name: http
    port: 80
    protocol: TCP
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-abcde
  namespace: shop
  labels:
    kubernetes.io/service-name: web
addressType: IPv4
endpoints:
- addresses: ["10.1.1.5"]
  conditions:
    ready: true
  nodeName: node-1
ports:
- name: http
  port: 8080
  protocol: TCP
---
apiVersion: v1
kind: Pod
metadata:
  name: web-0
  namespace: shop
  labels:
    app: web
spec:
  nodeName: node-1
  containers:
  - name: web
    image: web:1
status:
  podIP: 10.1.1.5
---
# no namespace: goes to default
apiVersion: v1
kind: Service
metadata:
  name: plain
spec:
  ports:
  - port: 53
    protocol: UDP
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: ignored
spec: {}
"#;

const POLICIES: &str = r#"{
  "apiVersion": "v1",
  "kind": "List",
  "items": [
    {
      "apiVersion": "networking.k8s.io/v1",
      "kind": "NetworkPolicy",
      "metadata": {"name": "deny-all", "namespace": "shop"},
      "spec": {"podSelector": {}, "policyTypes": ["Ingress"]}
    },
    {
      "apiVersion": "cilium.io/v2",
      "kind": "CiliumNetworkPolicy",
      "metadata": {"name": "allow-frontend", "namespace": "shop"},
      "spec": {
        "endpointSelector": {"matchLabels": {"app": "web"}},
        "ingress": [{
          "fromEndpoints": [{
            "matchLabels": {"app": "frontend", "io.cilium.k8s.policy.cluster": "cluster-2"}
          }],
          "toPorts": [{"ports": [{"port": 8080, "protocol": "TCP"}]}]
        }],
        "egress": [{
          "toEndpoints": [{"matchExpressions": [{"key": "app", "operator": "In", "values": ["db"]}]}],
          "toPorts": [{"ports": [{"port": "5432"}]}]
        }],
        "ingressDeny": [{"fromCIDR": ["0.0.0.0/0"]}]
      }
    }
  ]
}
"#;

fn service(name: &str, namespace: &str, label: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: {namespace}\n  labels:\n    version: \"{label}\"\nspec:\n  ports:\n  - port: 80\n"
    )
}

fn write(path: &Path, text: &str) {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).expect("create dir");
    }
    std::fs::write(path, text).expect("write manifest");
}

/// Writes `text` to `path` as editors do: into a temporary file, then renamed over.
fn write_rename(path: &Path, text: &str) {
    let name = path.file_name().expect("file name").to_string_lossy();
    let tmp = path.with_file_name(format!(".{name}.swp"));
    std::fs::write(&tmp, text).expect("write temporary");
    std::fs::rename(&tmp, path).expect("rename over");
}

fn key(ns: &str, name: &str) -> NamespacedName {
    NamespacedName::new(ns, name)
}

fn label(objects: &ClusterObjects, ns: &str, name: &str) -> Option<String> {
    objects
        .services
        .get(&key(ns, name))?
        .metadata
        .labels
        .as_ref()?
        .get("version")
        .cloned()
}

fn start(
    source: ManifestDir,
) -> (
    SnapshotReceiver,
    JoinHandle<Result<(), SourceError>>,
    CancellationToken,
) {
    init_tracing();
    let cancel = CancellationToken::new();
    let (rx, task) = spawn(Box::new(source), cancel.clone());
    (rx, task, cancel)
}

async fn stop(task: JoinHandle<Result<(), SourceError>>, cancel: CancellationToken) {
    cancel.cancel();
    task.await.expect("source task").expect("source result");
}

#[tokio::test]
async fn reads_every_kind_from_multi_document_files_and_lists() {
    let dir = tempfile::tempdir().expect("tempdir");
    write(&dir.path().join("cluster.yaml"), CLUSTER);
    write(&dir.path().join("apps/shop.yml"), SHOP);
    write(&dir.path().join("apps/policies/all.json"), POLICIES);
    write(&dir.path().join("README.txt"), "not a manifest: {{{");
    write(&dir.path().join(".hidden.yaml"), "not: [valid");

    let (mut rx, task, cancel) = start(ManifestDir::new(dir.path()));
    let objects = tokio::time::timeout(common::TIMEOUT, wait_synced(&mut rx))
        .await
        .expect("synced in time")
        .expect("source running");

    assert!(objects.problems.is_empty(), "{:#?}", objects.problems);
    assert_eq!(objects.namespaces.keys().collect::<Vec<_>>(), ["shop"]);
    assert_eq!(
        objects.nodes.keys().collect::<Vec<_>>(),
        ["node-1", "node-2"]
    );
    assert_eq!(
        objects.nodes["node-1"]
            .spec
            .as_ref()
            .and_then(|s| s.pod_cidr.as_deref()),
        Some("10.1.1.0/24")
    );
    assert_eq!(
        objects.services.keys().cloned().collect::<Vec<_>>(),
        [key("default", "plain"), key("shop", "web")]
    );
    assert_eq!(
        objects.services[&key("default", "plain")]
            .metadata
            .namespace
            .as_deref(),
        Some("default"),
        "namespace defaulted in the object too"
    );
    let web = &objects.services[&key("shop", "web")];
    assert_eq!(
        web.metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get("service.cilium.io/global"))
            .map(String::as_str),
        Some("true")
    );
    let slice = &objects.endpoint_slices[&key("shop", "web-abcde")];
    assert_eq!(slice.endpoints[0].addresses, ["10.1.1.5"]);
    assert!(objects.pods.contains_key(&key("shop", "web-0")));
    assert!(
        objects
            .network_policies
            .contains_key(&key("shop", "deny-all"))
    );

    let cnp = &objects.cilium_network_policies[&key("shop", "allow-frontend")];
    let rule = cnp.spec.as_ref().expect("spec");
    let selects = rule
        .endpoint_selector
        .as_ref()
        .and_then(|s| s.match_labels.as_ref())
        .expect("labels");
    assert_eq!(selects.get("app").map(String::as_str), Some("web"));
    let from = &rule.ingress[0].from_endpoints[0];
    assert_eq!(
        from.match_labels
            .as_ref()
            .and_then(|l| l.get(CLUSTER_LABEL))
            .map(String::as_str),
        Some("cluster-2")
    );
    let port = &rule.ingress[0].to_ports[0].ports[0];
    assert_eq!(
        (port.port.as_str(), port.protocol),
        ("8080", L4Protocol::Tcp)
    );
    let egress_port = &rule.egress[0].to_ports[0].ports[0];
    assert_eq!(
        (egress_port.port.as_str(), egress_port.protocol),
        ("5432", L4Protocol::Any)
    );
    assert_eq!(
        rule.egress[0].to_endpoints[0]
            .match_expressions
            .as_ref()
            .map(Vec::len),
        Some(1)
    );
    assert_eq!(cnp.rules().count(), 1);
    assert_eq!(objects.len(), 9);
    assert!(objects.contains(&ObjectRef {
        kind: ObjectKind::Service,
        namespace: None,
        name: "plain".into()
    }));

    // The one-shot reader sees the same.
    let once = tokio::task::spawn_blocking({
        let path = dir.path().to_path_buf();
        move || load_dir(path)
    })
    .await
    .expect("join")
    .expect("load_dir");
    assert_eq!(&once, objects.as_ref());

    stop(task, cancel).await;
}

#[tokio::test]
async fn adding_editing_and_deleting_files_changes_snapshots() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = dir.path().join("a.yaml");
    write(&a, &service("a", "default", "1"));
    let (mut rx, task, cancel) = start(ManifestDir::new(dir.path()));
    let first = wait_for(&mut rx, "service a", |s| {
        s.synced && s.services.contains_key(&key("default", "a"))
    })
    .await;
    assert_eq!(first.len(), 1);

    // Add, in a directory created after start.
    let b = dir.path().join("later/nested/b.yaml");
    let t = Instant::now();
    write(&b, &service("b", "ns1", "1"));
    wait_for(&mut rx, "service b added", |s| {
        s.services.contains_key(&key("ns1", "b"))
    })
    .await;
    eprintln!("add in a new directory seen after {:?}", t.elapsed());

    // Edit in place.
    let t = Instant::now();
    write(&a, &service("a", "default", "2"));
    wait_for(&mut rx, "service a edited", |s| {
        label(s, "default", "a").as_deref() == Some("2")
    })
    .await;
    eprintln!("in-place edit seen after {:?}", t.elapsed());

    // Edit that moves the object: the old key goes away.
    write(&a, &service("a2", "default", "1"));
    let s = wait_for(&mut rx, "a renamed to a2", |s| {
        s.services.contains_key(&key("default", "a2"))
    })
    .await;
    assert!(
        !s.services.contains_key(&key("default", "a")),
        "{:#?}",
        s.services.keys()
    );

    // Delete.
    let t = Instant::now();
    std::fs::remove_file(&b).expect("remove b");
    wait_for(&mut rx, "service b deleted", |s| {
        !s.services.contains_key(&key("ns1", "b"))
    })
    .await;
    eprintln!("delete seen after {:?}", t.elapsed());

    // Delete a whole directory of manifests.
    write(
        &dir.path().join("gone/c.yaml"),
        &service("c", "default", "1"),
    );
    wait_for(&mut rx, "service c", |s| {
        s.services.contains_key(&key("default", "c"))
    })
    .await;
    std::fs::remove_dir_all(dir.path().join("gone")).expect("remove dir");
    let s = wait_for(&mut rx, "service c deleted", |s| {
        !s.services.contains_key(&key("default", "c"))
    })
    .await;
    assert!(s.problems.is_empty(), "{:#?}", s.problems);
    assert_eq!(
        s.services.keys().cloned().collect::<Vec<_>>(),
        [key("default", "a2")]
    );

    stop(task, cancel).await;
}

/// At 100k pods a snapshot must not cost a copy of every pod: an edit shares every object it
/// did not touch with the previous snapshot, and a rescan that finds nothing new publishes
/// nothing at all.
#[tokio::test]
async fn snapshots_share_unchanged_objects_and_idle_rescans_publish_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    write(&dir.path().join("a.yaml"), &service("a", "default", "1"));
    write(&dir.path().join("b.yaml"), &service("b", "default", "1"));
    let source = ManifestDir::new(dir.path()).rescan_interval(Duration::from_millis(50));
    let (mut rx, task, cancel) = start(source);
    let first = wait_for(&mut rx, "both services", |s| s.synced && s.len() == 2).await;

    // Twenty rescans with nothing changed: no new snapshot.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        !rx.has_changed().expect("source running"),
        "an idle rescan published"
    );
    assert!(Arc::ptr_eq(&first, &rx.borrow()));

    write_rename(&dir.path().join("a.yaml"), &service("a", "default", "2"));
    let second = wait_for(&mut rx, "service a edited", |s| {
        label(s, "default", "a").as_deref() == Some("2")
    })
    .await;
    let b = key("default", "b");
    assert!(Arc::ptr_eq(&first.services[&b], &second.services[&b]));
    assert_ne!(*first, *second);

    stop(task, cancel).await;
}

#[tokio::test]
async fn a_broken_file_is_reported_and_keeps_its_objects_until_fixed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let web = dir.path().join("web.yaml");
    let other = dir.path().join("other.yaml");
    write(
        &web,
        &format!(
            "{}---\n{}",
            service("web", "default", "1"),
            service("api", "default", "1")
        ),
    );
    write(&other, &service("other", "default", "1"));
    let (mut rx, task, cancel) = start(ManifestDir::new(dir.path()));
    wait_for(&mut rx, "initial", |s| s.synced && s.services.len() == 3).await;

    // Line 12 has a syntax error (an unclosed flow sequence).
    let broken = format!(
        "{}---\napiVersion: v1\nkind: Service\nmetadata:\n  name: api\n  labels: [oops\n",
        service("web", "default", "2")
    );
    let broken_line = broken
        .lines()
        .position(|l| l.contains("[oops"))
        .expect("line")
        + 1;
    write(&web, &broken);
    let s = wait_for(&mut rx, "a problem", |s| !s.problems.is_empty()).await;
    assert_eq!(s.problems.len(), 1, "{:#?}", s.problems);
    let problem = &s.problems[0];
    assert!(problem.source.ends_with("web.yaml"), "{problem}");
    let line = problem.line.expect("a line");
    assert!(
        (broken_line..=broken_line + 1).contains(&line),
        "problem at line {line}, error on line {broken_line}: {problem}"
    );
    // Nothing lost, nothing half-applied: web keeps version 1 although version 2 was
    // in the good part of the broken file.
    assert_eq!(label(&s, "default", "web").as_deref(), Some("1"));
    assert!(s.services.contains_key(&key("default", "api")));

    // Other files keep publishing meanwhile.
    write(&other, &service("other", "default", "2"));
    let s = wait_for(&mut rx, "other edited", |s| {
        label(s, "default", "other").as_deref() == Some("2")
    })
    .await;
    assert_eq!(s.problems.len(), 1);

    // A typed error (wrong field type) names the object and the line.
    let typed = format!(
        "{}---\napiVersion: v1\nkind: Service\nmetadata:\n  name: api\nspec:\n  ports:\n  - port: http\n",
        service("web", "default", "3")
    );
    let typed_line = typed
        .lines()
        .position(|l| l.contains("port: http"))
        .expect("line")
        + 1;
    write(&web, &typed);
    let s = wait_for(&mut rx, "a typed problem", |s| {
        s.problems.iter().any(|p| p.object.is_some())
    })
    .await;
    let problem = &s.problems[0];
    assert_eq!(
        problem.object.as_deref(),
        Some("Service default/api"),
        "{problem}"
    );
    assert_eq!(problem.line, Some(typed_line), "{problem}");
    assert!(problem.message.contains("spec.ports[0].port"), "{problem}");
    assert_eq!(label(&s, "default", "web").as_deref(), Some("1"));

    // Fixing the file clears the problem and applies the new version.
    write(&web, &service("web", "default", "4"));
    let s = wait_for(&mut rx, "fixed", |s| s.problems.is_empty()).await;
    assert_eq!(label(&s, "default", "web").as_deref(), Some("4"));
    assert!(!s.services.contains_key(&key("default", "api")));

    // A broken file that is then deleted: its objects and its problem go.
    write(&web, "kind: [");
    wait_for(&mut rx, "broken again", |s| !s.problems.is_empty()).await;
    std::fs::remove_file(&web).expect("remove");
    let s = wait_for(&mut rx, "deleted", |s| {
        s.problems.is_empty() && !s.services.contains_key(&key("default", "web"))
    })
    .await;
    assert_eq!(s.services.len(), 1);

    stop(task, cancel).await;
}

#[tokio::test]
async fn a_file_broken_from_the_start_is_reported_at_sync() {
    let dir = tempfile::tempdir().expect("tempdir");
    write(
        &dir.path().join("bad.yaml"),
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: [x\n",
    );
    write(&dir.path().join("ok.yaml"), &service("ok", "default", "1"));
    let (mut rx, task, cancel) = start(ManifestDir::new(dir.path()));
    let s = wait_for(&mut rx, "synced", |s| s.synced).await;
    assert_eq!(s.services.len(), 1);
    assert!(s.namespaces.is_empty());
    assert_eq!(s.problems.len(), 1, "{:#?}", s.problems);
    assert!(s.problems[0].source.ends_with("bad.yaml"));
    assert!(s.problems[0].line.is_some());
    stop(task, cancel).await;
}

#[tokio::test]
async fn rename_over_writes_are_seen_and_never_lose_the_object() {
    let dir = tempfile::tempdir().expect("tempdir");
    let web = dir.path().join("web.yaml");
    write(&web, &service("web", "default", "0"));
    let (mut rx, task, cancel) = start(ManifestDir::new(dir.path()));
    wait_for(&mut rx, "initial", |s| s.synced && s.services.len() == 1).await;

    // Watch every snapshot published while we write: web must be in each one.
    let mut watcher = rx.clone();
    let checker = tokio::spawn(async move {
        let mut seen = 0;
        while watcher.changed().await.is_ok() {
            let s = watcher.borrow_and_update().clone();
            assert!(
                s.services.contains_key(&key("default", "web")),
                "web vanished: {s:#?}"
            );
            assert!(s.problems.is_empty(), "{:#?}", s.problems);
            seen += 1;
            if label(&s, "default", "web").as_deref() == Some("20") {
                return seen;
            }
        }
        panic!("source stopped");
    });

    for version in 1..=20 {
        write_rename(&web, &service("web", "default", &version.to_string()));
        if version % 5 == 0 {
            tokio::time::sleep(Duration::from_millis(60)).await;
        }
    }
    let seen = tokio::time::timeout(common::TIMEOUT, checker)
        .await
        .expect("in time")
        .expect("checker");
    eprintln!("{seen} snapshots for 20 rename-over writes");

    // vim-style: the original renamed away to a backup, a new file written in its place.
    let t = Instant::now();
    std::fs::rename(&web, dir.path().join("web.yaml~")).expect("backup");
    write(&web, &service("web", "default", "vim"));
    std::fs::remove_file(dir.path().join("web.yaml~")).expect("drop backup");
    let s = wait_for(&mut rx, "vim write", |s| {
        label(s, "default", "web").as_deref() == Some("vim")
    })
    .await;
    eprintln!("backup-and-write seen after {:?}", t.elapsed());
    assert!(s.problems.is_empty(), "{:#?}", s.problems);

    stop(task, cancel).await;
}

#[tokio::test]
async fn partially_written_files_heal_without_stale_problems() {
    let dir = tempfile::tempdir().expect("tempdir");
    let web = dir.path().join("web.yaml");
    write(&web, &service("web", "default", "0"));
    // write_wait zero: a file still open for writing is read anyway, so the half-written
    // state is seen (the worst case).
    let (mut rx, task, cancel) = start(ManifestDir::new(dir.path()).write_wait(Duration::ZERO));
    wait_for(&mut rx, "initial", |s| s.synced && s.services.len() == 1).await;

    let full = format!(
        "{}---\n{}",
        service("web", "default", "1"),
        service("api", "default", "1")
    );
    // Cut inside a quoted string of the second document: the head alone does not parse.
    let cut = full.rfind("version: \"").expect("second label") + "version: \"".len();
    let (head, tail) = full.split_at(cut);
    assert!(
        cluster_source::parse_manifests("head", head, cluster_source::ManifestFormat::Yaml)
            .is_err()
    );
    let mut file = std::fs::File::create(&web).expect("truncate");
    file.write_all(head.as_bytes()).expect("write head");
    file.flush().expect("flush");
    tokio::time::sleep(Duration::from_millis(150)).await;
    // Whatever was published meanwhile, web was never lost.
    {
        let meanwhile = rx.borrow();
        assert!(meanwhile.services.contains_key(&key("default", "web")));
        eprintln!("while half written: {:?}", meanwhile.problems);
    }
    file.write_all(tail.as_bytes()).expect("write tail");
    drop(file);

    let s = wait_for(&mut rx, "complete file", |s| {
        s.problems.is_empty() && label(s, "default", "api").as_deref() == Some("1")
    })
    .await;
    assert_eq!(label(&s, "default", "web").as_deref(), Some("1"));

    // With the default write wait, a writer that pauses (without closing) is waited for.
    stop(task, cancel).await;
    let (mut rx, task, cancel) = start(ManifestDir::new(dir.path()));
    wait_for(&mut rx, "restart", |s| s.synced && s.services.len() == 2).await;
    let mut file = std::fs::File::create(&web).expect("truncate");
    file.write_all(&service("web", "default", "2").as_bytes()[..30])
        .expect("head");
    file.flush().expect("flush");
    tokio::time::sleep(Duration::from_millis(150)).await;
    file.write_all(&service("web", "default", "2").as_bytes()[30..])
        .expect("tail");
    drop(file);
    let s = wait_for(&mut rx, "second write", |s| {
        label(s, "default", "web").as_deref() == Some("2")
    })
    .await;
    assert!(s.problems.is_empty(), "{:#?}", s.problems);
    stop(task, cancel).await;
}

#[tokio::test]
async fn duplicates_name_both_files_and_the_first_wins() {
    let dir = tempfile::tempdir().expect("tempdir");
    let first = dir.path().join("a.yaml");
    let second = dir.path().join("b.yaml");
    write(&first, &service("web", "default", "a"));
    write(
        &second,
        &format!(
            "{}---\n{}",
            service("web", "default", "b"),
            service("only-b", "default", "b")
        ),
    );
    let (mut rx, task, cancel) = start(ManifestDir::new(dir.path()));
    let s = wait_for(&mut rx, "synced", |s| s.synced).await;
    assert_eq!(label(&s, "default", "web").as_deref(), Some("a"));
    assert!(s.services.contains_key(&key("default", "only-b")));
    assert_eq!(s.problems.len(), 1, "{:#?}", s.problems);
    let problem = &s.problems[0];
    assert!(problem.source.ends_with("b.yaml"), "{problem}");
    assert!(problem.message.contains("a.yaml"), "{problem}");
    assert_eq!(problem.object.as_deref(), Some("Service default/web"));

    std::fs::remove_file(&first).expect("remove");
    let s = wait_for(&mut rx, "b takes over", |s| {
        label(s, "default", "web").as_deref() == Some("b")
    })
    .await;
    assert!(s.problems.is_empty(), "{:#?}", s.problems);
    stop(task, cancel).await;
}

/// Within one file the first document wins, and an object without a namespace is the same
/// object as one in `default`.
#[tokio::test]
async fn duplicates_in_one_file_and_the_default_namespace() {
    let dir = tempfile::tempdir().expect("tempdir");
    let unnamespaced =
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\n  labels:\n    version: \"none\"\n";
    write(
        &dir.path().join("a.yaml"),
        &format!(
            "{}---\n{}---\n{}",
            service("web", "default", "1"),
            service("web", "default", "2"),
            unnamespaced
        ),
    );
    let (mut rx, task, cancel) = start(ManifestDir::new(dir.path()));
    let s = wait_for(&mut rx, "synced", |s| s.synced).await;
    assert_eq!(label(&s, "default", "web").as_deref(), Some("1"));
    assert_eq!(s.len(), 1);
    assert_eq!(s.problems.len(), 1, "{:#?}", s.problems);
    assert!(
        s.problems[0].message.contains("a.yaml"),
        "{}",
        s.problems[0]
    );
    stop(task, cancel).await;
}

#[tokio::test]
async fn a_vanished_directory_keeps_its_objects_and_is_watched_again() {
    let parent = tempfile::tempdir().expect("tempdir");
    let root = parent.path().join("manifests");
    write(&root.join("web.yaml"), &service("web", "default", "1"));
    let (mut rx, task, cancel) =
        start(ManifestDir::new(&root).rescan_interval(Duration::from_millis(100)));
    wait_for(&mut rx, "initial", |s| s.synced && s.services.len() == 1).await;

    std::fs::remove_dir_all(&root).expect("remove root");
    let s = wait_for(&mut rx, "a problem", |s| !s.problems.is_empty()).await;
    assert!(
        s.services.contains_key(&key("default", "web")),
        "objects kept"
    );

    write(&root.join("web.yaml"), &service("web", "default", "2"));
    let s = wait_for(&mut rx, "back", |s| {
        s.problems.is_empty() && label(s, "default", "web").as_deref() == Some("2")
    })
    .await;
    assert_eq!(s.services.len(), 1);
    // And it is watched again: a change is seen.
    write(&root.join("more.yaml"), &service("more", "default", "1"));
    wait_for(&mut rx, "more", |s| s.services.len() == 2).await;
    stop(task, cancel).await;
}

#[tokio::test]
async fn a_directory_replaced_at_once_is_watched_again() {
    let parent = tempfile::tempdir().expect("tempdir");
    let root = parent.path().join("manifests");
    write(&root.join("web.yaml"), &service("web", "default", "1"));
    // No periodic rescan to lean on: only notifications.
    let (mut rx, task, cancel) =
        start(ManifestDir::new(&root).rescan_interval(Duration::from_secs(3600)));
    wait_for(&mut rx, "initial", |s| s.synced && s.services.len() == 1).await;

    // Replaced as a whole, as a deploy tool might: built aside, then renamed into place.
    let staged = parent.path().join("staged");
    write(&staged.join("web.yaml"), &service("web", "default", "2"));
    std::fs::rename(&root, parent.path().join("old")).expect("move old away");
    std::fs::rename(&staged, &root).expect("move new in");
    wait_for(&mut rx, "new directory read", |s| {
        label(s, "default", "web").as_deref() == Some("2")
    })
    .await;
    write(&root.join("more.yaml"), &service("more", "default", "1"));
    wait_for(&mut rx, "new directory watched", |s| s.services.len() == 2).await;
    write(&root.join("more2.yaml"), &service("more2", "default", "1"));
    let s = wait_for(&mut rx, "still watched", |s| s.services.len() == 3).await;
    assert!(s.problems.is_empty(), "{:#?}", s.problems);
    stop(task, cancel).await;
}

#[tokio::test]
async fn a_missing_directory_is_an_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let source: Box<dyn ClusterSource> = Box::new(ManifestDir::new(dir.path().join("nope")));
    let (tx, _rx) = tokio::sync::watch::channel(Arc::new(ClusterObjects::default()));
    let err = source
        .run(tx, CancellationToken::new())
        .await
        .expect_err("must fail");
    assert!(matches!(err, SourceError::ManifestDir { .. }), "{err}");
    assert!(load_dir(dir.path().join("nope")).is_err());
}

#[tokio::test]
async fn the_source_stops_when_cancelled_or_unread() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (rx, task, _cancel) = start(ManifestDir::new(dir.path()));
    drop(rx);
    tokio::time::timeout(common::TIMEOUT, task)
        .await
        .expect("stops when no one reads")
        .expect("join")
        .expect("ok");
}
