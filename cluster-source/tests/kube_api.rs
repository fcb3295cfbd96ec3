//! The Kubernetes API source against a mocked API, as kube-rs tests itself: a `kube::Client`
//! over a hand-written `tower::Service` that answers list and watch requests with JSON.
//! No real API server runs here.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use cluster_source::{KubeApi, NamespacedName, SnapshotReceiver, SourceError, spawn};
use common::{init_tracing, wait_for};
use http::{Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const NAMESPACES: &str = "/api/v1/namespaces";
const NODES: &str = "/api/v1/nodes";
const SERVICES: &str = "/api/v1/services";
const SLICES: &str = "/apis/discovery.k8s.io/v1/endpointslices";
const PODS: &str = "/api/v1/pods";
const NETPOLS: &str = "/apis/networking.k8s.io/v1/networkpolicies";
const CNPS: &str = "/apis/cilium.io/v2/ciliumnetworkpolicies";

type Body = UnsyncBoxBody<Bytes, Infallible>;

/// One resource collection of the fake API server.
#[derive(Default)]
struct Collection {
    objects: BTreeMap<(String, String), Value>,
    /// Every change, with its resource version, replayed to watches that start behind.
    log: Vec<(u64, &'static str, Value)>,
    /// Answer every request with this status code instead.
    error: Option<u16>,
    /// Watches from an older resource version get `410 Gone`, as after etcd compaction.
    compacted: u64,
    watchers: Vec<mpsc::UnboundedSender<Bytes>>,
}

#[derive(Default)]
struct FakeState {
    resource_version: u64,
    collections: HashMap<&'static str, Collection>,
    requests: Vec<String>,
}

/// A fake Kubernetes API server: lists, and watches that stream events until dropped.
#[derive(Clone, Default)]
struct FakeApi {
    state: Arc<Mutex<FakeState>>,
}

fn key_of(object: &Value) -> (String, String) {
    let meta = &object["metadata"];
    (
        meta["namespace"].as_str().unwrap_or_default().to_owned(),
        meta["name"].as_str().expect("name").to_owned(),
    )
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Status", "status": "Failure",
        "message": message, "reason": reason, "code": code,
    })
}

impl FakeApi {
    fn lock(&self) -> std::sync::MutexGuard<'_, FakeState> {
        self.state.lock().expect("fake state")
    }

    /// Creates or replaces an object, notifying watches (ADDED or MODIFIED).
    fn apply(&self, path: &'static str, mut object: Value) {
        let mut state = self.lock();
        state.resource_version += 1;
        let rv = state.resource_version;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        let collection = state.collections.entry(path).or_default();
        let kind = match collection.objects.insert(key_of(&object), object.clone()) {
            Some(_) => "MODIFIED",
            None => "ADDED",
        };
        collection.log.push((rv, kind, object.clone()));
        notify(collection, kind, &object);
    }

    /// Deletes an object, notifying watches (DELETED).
    fn delete(&self, path: &'static str, namespace: &str, name: &str) {
        let mut state = self.lock();
        state.resource_version += 1;
        let rv = state.resource_version;
        let collection = state.collections.entry(path).or_default();
        let mut object = collection
            .objects
            .remove(&(namespace.to_owned(), name.to_owned()))
            .expect("object to delete");
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        collection.log.push((rv, "DELETED", object.clone()));
        notify(collection, "DELETED", &object);
    }

    /// Makes every request on `path` fail with `code` (or succeed again with `None`).
    fn fail(&self, path: &'static str, code: Option<u16>) {
        let mut state = self.lock();
        let collection = state.collections.entry(path).or_default();
        collection.error = code;
        if code.is_some() {
            collection.watchers.clear(); // ends open watches
        }
    }

    /// Forgets the change log: watches resuming from before now must list again.
    fn compact(&self, path: &'static str) {
        let mut state = self.lock();
        let rv = state.resource_version;
        let collection = state.collections.entry(path).or_default();
        collection.compacted = rv;
        collection.log.clear();
    }

    fn requests(&self) -> Vec<String> {
        self.lock().requests.clone()
    }

    fn client(&self) -> kube::Client {
        kube::Client::new(self.clone(), "default")
    }

    fn handle(&self, request: &Request<kube::client::Body>) -> Response<Body> {
        let uri = request.uri();
        let path = uri.path();
        let query: HashMap<String, String> = uri
            .query()
            .unwrap_or_default()
            .split('&')
            .filter_map(|pair| pair.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        let mut state = self.lock();
        state.requests.push(uri.to_string());
        let rv = state.resource_version;
        let Some((&name, collection)) = state.collections.iter_mut().find(|(p, _)| **p == path)
        else {
            return json_response(
                StatusCode::NOT_FOUND,
                &status(
                    404,
                    "NotFound",
                    "the server could not find the requested resource",
                ),
            );
        };
        if let Some(code) = collection.error {
            let (reason, message) = match code {
                403 => (
                    "Forbidden",
                    format!(
                        "{name} is forbidden: User \"system:serviceaccount:kube-system:clustermesh\" cannot list resource"
                    ),
                ),
                404 => (
                    "NotFound",
                    "the server could not find the requested resource".to_owned(),
                ),
                _ => ("InternalError", "boom".to_owned()),
            };
            let code = StatusCode::from_u16(code).expect("status code");
            return json_response(code, &status(code.as_u16(), reason, &message));
        }
        if query.get("watch").map(String::as_str) == Some("true") {
            let since: u64 = query
                .get("resourceVersion")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            let (tx, rx) = mpsc::unbounded_channel();
            if since < collection.compacted {
                let gone = status(410, "Expired", "too old resource version");
                let _ = tx.send(event_line("ERROR", &gone));
                drop(tx); // the server ends such a watch
                let stream = futures::stream::unfold(rx, |mut rx| async move {
                    rx.recv()
                        .await
                        .map(|line| (Ok::<_, Infallible>(Frame::data(line)), rx))
                });
                return Response::new(StreamBody::new(stream).boxed_unsync());
            }
            for (version, kind, object) in &collection.log {
                if *version > since {
                    let _ = tx.send(event_line(kind, object));
                }
            }
            collection.watchers.push(tx);
            let stream = futures::stream::unfold(rx, |mut rx| async move {
                rx.recv()
                    .await
                    .map(|line| (Ok::<_, Infallible>(Frame::data(line)), rx))
            });
            return Response::new(StreamBody::new(stream).boxed_unsync());
        }
        let list = json!({
            "apiVersion": "v1",
            "kind": "List",
            "metadata": {"resourceVersion": rv.to_string()},
            "items": collection.objects.values().cloned().collect::<Vec<_>>(),
        });
        json_response(StatusCode::OK, &list)
    }
}

fn notify(collection: &mut Collection, kind: &str, object: &Value) {
    let line = event_line(kind, object);
    collection
        .watchers
        .retain(|tx| tx.send(line.clone()).is_ok());
}

fn event_line(kind: &str, object: &Value) -> Bytes {
    let mut line = serde_json::to_vec(&json!({"type": kind, "object": object})).expect("json");
    line.push(b'\n');
    Bytes::from(line)
}

fn json_response(code: StatusCode, body: &Value) -> Response<Body> {
    let mut response = Response::new(
        Full::new(Bytes::from(serde_json::to_vec(body).expect("json"))).boxed_unsync(),
    );
    *response.status_mut() = code;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        "application/json".parse().expect("header"),
    );
    response
}

impl tower_service::Service<Request<kube::client::Body>> for FakeApi {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<kube::client::Body>) -> Self::Future {
        let response = self.handle(&request);
        Box::pin(async move { Ok(response) })
    }
}

fn namespace(name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
}

fn node(name: &str, cidr: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}, "spec": {"podCIDR": cidr}})
}

fn service(ns: &str, name: &str, version: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": ns, "labels": {"version": version},
                     "annotations": {"service.cilium.io/global": "true"}},
        "spec": {"clusterIP": "10.96.0.10", "ports": [{"port": 80, "protocol": "TCP"}]},
    })
}

fn slice(ns: &str, name: &str, ip: &str) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": ns, "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": [ip], "conditions": {"ready": true}}],
        "ports": [{"port": 8080, "protocol": "TCP"}],
    })
}

fn pod(ns: &str, name: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": {"app": "web"}},
        "spec": {"containers": [{"name": "web", "image": "web:1"}]},
        "status": {"podIP": "10.1.1.5"},
    })
}

fn netpol(ns: &str, name: &str) -> Value {
    json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"podSelector": {}, "policyTypes": ["Ingress"]},
    })
}

fn cnp(ns: &str, name: &str, port: Value) -> Value {
    json!({
        "apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "endpointSelector": {"matchLabels": {"app": "web"}},
            "ingress": [{
                "fromEndpoints": [{"matchLabels": {"io.cilium.k8s.policy.cluster": "cluster-2"}}],
                "toPorts": [{"ports": [{"port": port, "protocol": "TCP"}]}],
            }],
        },
    })
}

/// A fake API holding one object of every kind (and empty collections otherwise).
fn populated() -> FakeApi {
    let api = FakeApi::default();
    for path in [NAMESPACES, NODES, SERVICES, SLICES, PODS, NETPOLS, CNPS] {
        api.lock().collections.entry(path).or_default();
    }
    api.apply(NAMESPACES, namespace("shop"));
    api.apply(NAMESPACES, namespace("default"));
    api.apply(NODES, node("node-1", "10.1.1.0/24"));
    api.apply(SERVICES, service("shop", "web", "1"));
    api.apply(SLICES, slice("shop", "web-abc", "10.1.1.5"));
    api.apply(PODS, pod("shop", "web-0"));
    api.apply(NETPOLS, netpol("shop", "deny"));
    api.apply(CNPS, cnp("shop", "allow", json!("8080")));
    api
}

fn start(
    api: &FakeApi,
) -> (
    SnapshotReceiver,
    JoinHandle<Result<(), SourceError>>,
    CancellationToken,
) {
    init_tracing();
    let cancel = CancellationToken::new();
    let (rx, task) = spawn(Box::new(KubeApi::new(api.client())), cancel.clone());
    (rx, task, cancel)
}

async fn stop(task: JoinHandle<Result<(), SourceError>>, cancel: CancellationToken) {
    cancel.cancel();
    task.await.expect("join").expect("source result");
}

fn key(ns: &str, name: &str) -> NamespacedName {
    NamespacedName::new(ns, name)
}

fn version(s: &cluster_source::ClusterObjects, ns: &str, name: &str) -> Option<String> {
    s.services
        .get(&key(ns, name))?
        .metadata
        .labels
        .as_ref()?
        .get("version")
        .cloned()
}

#[tokio::test]
async fn lists_every_kind_then_follows_watch_events() {
    let api = populated();
    let (mut rx, task, cancel) = start(&api);
    let s = wait_for(&mut rx, "synced", |s| s.synced).await;
    assert!(s.problems.is_empty(), "{:#?}", s.problems);
    assert_eq!(s.namespaces.keys().collect::<Vec<_>>(), ["default", "shop"]);
    assert_eq!(
        s.nodes["node-1"]
            .spec
            .as_ref()
            .and_then(|spec| spec.pod_cidr.as_deref()),
        Some("10.1.1.0/24")
    );
    assert_eq!(version(&s, "shop", "web").as_deref(), Some("1"));
    assert_eq!(
        s.endpoint_slices[&key("shop", "web-abc")].endpoints[0].addresses,
        ["10.1.1.5"]
    );
    assert!(s.pods.contains_key(&key("shop", "web-0")));
    assert!(s.network_policies.contains_key(&key("shop", "deny")));
    let policy = &s.cilium_network_policies[&key("shop", "allow")];
    assert_eq!(
        policy.spec.as_ref().expect("spec").ingress[0].to_ports[0].ports[0].port,
        "8080"
    );
    assert_eq!(s.len(), 8);

    // ADDED
    api.apply(SERVICES, service("shop", "api", "1"));
    wait_for(&mut rx, "service added", |s| {
        s.services.contains_key(&key("shop", "api"))
    })
    .await;
    // MODIFIED
    api.apply(SERVICES, service("shop", "web", "2"));
    wait_for(&mut rx, "service modified", |s| {
        version(s, "shop", "web").as_deref() == Some("2")
    })
    .await;
    api.apply(SLICES, slice("shop", "web-abc", "10.1.1.6"));
    wait_for(&mut rx, "slice modified", |s| {
        s.endpoint_slices[&key("shop", "web-abc")].endpoints[0].addresses == ["10.1.1.6"]
    })
    .await;
    // DELETED
    api.delete(PODS, "shop", "web-0");
    wait_for(&mut rx, "pod deleted", |s| s.pods.is_empty()).await;
    api.delete(NODES, "", "node-1");
    api.apply(NODES, node("node-2", "10.1.2.0/24"));
    let s = wait_for(&mut rx, "node replaced", |s| s.nodes.contains_key("node-2")).await;
    assert!(!s.nodes.contains_key("node-1"));
    assert!(s.problems.is_empty(), "{:#?}", s.problems);

    // Both lists and watches went through the mock.
    let requests = api.requests();
    assert!(
        requests
            .iter()
            .any(|r| r.starts_with(CNPS) && !r.contains("watch=true")),
        "{requests:#?}"
    );
    assert!(
        requests
            .iter()
            .any(|r| r.starts_with(PODS) && r.contains("watch=true")),
        "{requests:#?}"
    );
    stop(task, cancel).await;
}

#[tokio::test]
async fn a_missing_crd_and_a_forbidden_kind_are_problems_not_failures() {
    let api = populated();
    api.fail(CNPS, Some(404));
    api.fail(PODS, Some(403));
    let (mut rx, task, cancel) = start(&api);
    let s = wait_for(&mut rx, "synced", |s| s.synced).await;
    assert_eq!(s.services.len(), 1);
    assert!(s.pods.is_empty() && s.cilium_network_policies.is_empty());
    assert_eq!(s.problems.len(), 2, "{:#?}", s.problems);
    let crd = s
        .problems
        .iter()
        .find(|p| p.source == "cilium.io/v2/CiliumNetworkPolicy")
        .expect("crd problem");
    assert!(crd.message.contains("CRD is not installed"), "{crd}");
    let rbac = s
        .problems
        .iter()
        .find(|p| p.source == "v1/Pod")
        .expect("rbac problem");
    assert!(rbac.message.contains("forbidden"), "{rbac}");

    // The source keeps trying: once allowed, pods arrive and the problem goes.
    api.fail(PODS, None);
    let s = wait_for(&mut rx, "pods listed", |s| {
        s.pods.len() == 1 && s.problems.len() == 1
    })
    .await;
    assert_eq!(s.problems[0].source, "cilium.io/v2/CiliumNetworkPolicy");
    stop(task, cancel).await;
}

#[tokio::test]
async fn a_bad_policy_is_a_problem_and_keeps_its_last_good_version() {
    let api = populated();
    let (mut rx, task, cancel) = start(&api);
    wait_for(&mut rx, "synced", |s| {
        s.synced && s.cilium_network_policies.len() == 1
    })
    .await;

    // A protocol the model does not know: the object is reported, its last version kept.
    let mut bad = cnp("shop", "allow", json!("9090"));
    bad["spec"]["ingress"][0]["toPorts"][0]["ports"][0]["protocol"] = json!("QUIC");
    api.apply(CNPS, bad);
    let s = wait_for(&mut rx, "a problem", |s| !s.problems.is_empty()).await;
    assert_eq!(
        s.problems[0].object.as_deref(),
        Some("CiliumNetworkPolicy shop/allow"),
        "{:#?}",
        s.problems
    );
    let port = &s.cilium_network_policies[&key("shop", "allow")]
        .spec
        .as_ref()
        .expect("spec")
        .ingress[0]
        .to_ports[0]
        .ports[0];
    assert_eq!(port.port, "8080");

    api.apply(CNPS, cnp("shop", "allow", json!(9090)));
    let s = wait_for(&mut rx, "fixed", |s| s.problems.is_empty()).await;
    let port = &s.cilium_network_policies[&key("shop", "allow")]
        .spec
        .as_ref()
        .expect("spec")
        .ingress[0]
        .to_ports[0]
        .ports[0];
    assert_eq!(port.port, "9090");
    stop(task, cancel).await;
}

#[tokio::test]
async fn a_broken_watch_resumes_without_losing_objects() {
    let api = populated();
    let (mut rx, task, cancel) = start(&api);
    wait_for(&mut rx, "synced", |s| s.synced).await;

    // The server ends every watch on services and fails for a while.
    api.fail(SERVICES, Some(500));
    // While failing, objects stay.
    let s = wait_for(&mut rx, "a problem", |s| !s.problems.is_empty()).await;
    assert_eq!(version(&s, "shop", "web").as_deref(), Some("1"));
    api.fail(SERVICES, None);
    // Changes made meanwhile are replayed from the resource version.
    api.apply(SERVICES, service("shop", "web", "3"));
    wait_for(&mut rx, "resumed", |s| {
        version(s, "shop", "web").as_deref() == Some("3")
    })
    .await;
    stop(task, cancel).await;
}

#[tokio::test]
async fn an_expired_watch_lists_again_and_swaps_in_the_new_list() {
    let api = populated();
    api.apply(SERVICES, service("shop", "api", "1"));
    let (mut rx, task, cancel) = start(&api);
    wait_for(&mut rx, "synced", |s| s.synced && s.services.len() == 2).await;

    // While the watch is down, one service is deleted, one added, one changed, and the
    // history is compacted: resuming the watch gets 410 Gone, so the watcher lists again.
    api.fail(SERVICES, Some(500));
    wait_for(&mut rx, "a problem", |s| !s.problems.is_empty()).await;
    api.delete(SERVICES, "shop", "api");
    api.apply(SERVICES, service("shop", "db", "1"));
    api.apply(SERVICES, service("shop", "web", "9"));
    api.compact(SERVICES);
    api.fail(SERVICES, None);

    let s = wait_for(&mut rx, "relisted", |s| {
        s.services.contains_key(&key("shop", "db")) && s.problems.is_empty()
    })
    .await;
    assert!(
        !s.services.contains_key(&key("shop", "api")),
        "deleted while not watching"
    );
    assert_eq!(version(&s, "shop", "web").as_deref(), Some("9"));
    assert_eq!(s.services.len(), 2);
    assert!(s.synced);
    stop(task, cancel).await;
}
