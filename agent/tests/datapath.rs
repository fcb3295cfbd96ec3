//! The agent with its eBPF datapath, end to end on one node: the node is a network namespace
//! (this test's thread and everything it starts live in it), pods are namespaces attached by
//! the real `clustermesh-cni`, their processes are `mesh-echo` servers and probes, peers b and
//! c are stores with an apiserver publishing their manifests, and the agent of cluster a runs
//! with `--datapath bpf` on a cgroup of the test's own. Root only; everything is removed on
//! drop.

mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Agent, Peer, TIMEOUT, peers_dir, write_manifests};
use serde_json::{Value, json};
use testkit::sandbox::{BpfRoot, Cgroup, Netns, is_root, run_ok};

fn echo() -> PathBuf {
    testkit::workspace_bin("mesh-echo", "mesh-echo").unwrap()
}

fn cni() -> PathBuf {
    testkit::workspace_bin("clustermesh-cni", "clustermesh-cni").unwrap()
}

/// A pod: its namespace, address and server process.
struct Pod {
    ns: Netns,
    name: String,
    ip: Ipv4Addr,
    labels: Value,
    container: String,
    server: Option<Child>,
}

impl Drop for Pod {
    fn drop(&mut self) {
        if let Some(mut child) = self.server.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A cluster's CNI network on this node.
struct Network {
    cluster: &'static str,
    pod_cidr: &'static str,
    data_dir: PathBuf,
}

impl Network {
    fn config(&self, agent: &str) -> String {
        json!({"cniVersion": "1.0.0", "name": format!("mesh-{}", self.cluster),
            "type": "clustermesh-cni", "podCIDR": self.pod_cidr, "agent": agent,
            "dataDir": self.data_dir})
        .to_string()
    }

    /// Runs the plugin as a runtime would; its stdout as JSON.
    fn cni(&self, agent: &str, command: &str, pod: &Netns, container: &str, name: &str) -> Value {
        let mut child = Command::new(cni())
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", container)
            .env("CNI_NETNS", pod.path())
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", "/nonexistent")
            .env(
                "CNI_ARGS",
                format!("K8S_POD_NAMESPACE=shop;K8S_POD_NAME={name}"),
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(self.config(agent).as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "CNI {command} {name}: {} {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
    }

    /// A pod attached with the plugin, serving TCP 8080 and UDP 5353 when `serve`.
    fn pod(&self, agent: &str, cgroup: &Cgroup, name: &str, app: &str, serve: bool) -> Pod {
        let ns = Netns::new("dpp").unwrap();
        let container = format!("c-{}-{name}", self.cluster);
        let result = self.cni(agent, "ADD", &ns, &container, name);
        let address = result["ips"][0]["address"].as_str().unwrap();
        let ip: Ipv4Addr = address.split('/').next().unwrap().parse().unwrap();
        let server = serve.then(|| {
            ns.command_in(cgroup, echo())
                .args([
                    "serve",
                    "--name",
                    &format!("{}/{name}", self.cluster),
                    "--tcp",
                    "0.0.0.0:8080",
                    "--udp",
                    "0.0.0.0:5353",
                ])
                .stderr(Stdio::null())
                .spawn()
                .unwrap()
        });
        Pod {
            ns,
            name: name.to_owned(),
            ip,
            labels: json!({"app": app}),
            container,
            server,
        }
    }
}

/// A cluster's manifests: its node (pod CIDR, an underlay address), the `shop` namespace,
/// the pods, a global `web` Service (TCP 80 → 8080, UDP 53 → 5353) with an EndpointSlice of
/// the ready `app=web` pods, and `extra` documents.
fn manifests(
    cluster: &str,
    id: u8,
    cidr: &str,
    pods: &[&Pod],
    web_annotations: Value,
    extra: &[Value],
) -> Vec<Value> {
    let node = format!("node-{cluster}");
    let mut docs = vec![
        json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": node},
            "spec": {"podCIDR": cidr},
            "status": {"addresses": [{"type": "InternalIP", "address": format!("192.0.2.{id}")}]}}),
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}}),
    ];
    let mut annotations = json!({"service.cilium.io/global": "true"});
    for (k, v) in web_annotations.as_object().unwrap() {
        annotations[k] = v.clone();
    }
    docs.push(json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"namespace": "shop", "name": "web", "annotations": annotations},
        "spec": {"clusterIP": "10.96.0.10", "selector": {"app": "web"},
            "ports": [{"name": "http", "port": 80, "protocol": "TCP"},
                      {"name": "dns", "port": 53, "protocol": "UDP"}]}}));
    let mut endpoints = Vec::new();
    for pod in pods {
        docs.push(json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"namespace": "shop", "name": pod.name, "labels": pod.labels},
            "spec": {"nodeName": node, "containers": [{"name": "c", "image": "mesh-echo"}]},
            "status": {"phase": "Running", "podIP": pod.ip.to_string(),
                "podIPs": [{"ip": pod.ip.to_string()}], "hostIP": format!("192.0.2.{id}")}}));
        if pod.labels["app"] == "web" {
            endpoints.push(json!({"addresses": [pod.ip.to_string()], "nodeName": node,
                "conditions": {"ready": true, "serving": true, "terminating": false}}));
        }
    }
    docs.push(
        json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"namespace": "shop", "name": "web-1",
            "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"},
                  {"name": "dns", "port": 5353, "protocol": "UDP"}],
        "endpoints": endpoints}),
    );
    docs.extend(extra.iter().cloned());
    docs
}

/// Only `app=client` pods of clusters a and b may reach cluster a's `app=web` (TCP 8080,
/// UDP 5353); the same labels in cluster c do not.
fn policy_only_b_clients() -> Value {
    json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"namespace": "shop", "name": "web-from-clients"},
        "spec": {"podSelector": {"matchLabels": {"app": "web"}},
            "policyTypes": ["Ingress"],
            "ingress": [{"from": [
                    {"podSelector": {"matchLabels": {
                        "app": "client", "io.cilium.k8s.policy.cluster": "a"}}},
                    {"podSelector": {"matchLabels": {
                        "app": "client", "io.cilium.k8s.policy.cluster": "b"}}}],
                "ports": [{"port": 8080, "protocol": "TCP"}, {"port": 5353, "protocol": "UDP"}]}]}})
}

fn probe(pod: &Pod, cgroup: &Cgroup, args: &[&str]) -> Value {
    let out = pod
        .ns
        .command_in(cgroup, echo())
        .arg("probe")
        .args(args)
        .output()
        .unwrap();
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "probe from {} {args:?}: {e}: {} {}",
            pod.name,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn answers(v: &Value) -> BTreeMap<String, u64> {
    v["answers"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, n)| (k.clone(), n.as_u64().unwrap_or(0)))
                .collect()
        })
        .unwrap_or_default()
}

/// Polls `f` until it gives `Ok`; on timeout fails with the last `Err` it gave.
async fn wait_for<T>(what: &str, mut f: impl FnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        match f() {
            Ok(v) => return v,
            Err(last) => assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; last: {last}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The node's underlay (in the current thread's namespace): remote pod CIDRs are routed via
/// 192.0.2.<cluster id>.
fn underlay() {
    // No dummy driver on our kernels: a veth pair whose both ends stay in the node.
    run_ok(Command::new("ip").args([
        "link",
        "add",
        "underlay",
        "type",
        "veth",
        "peer",
        "name",
        "underlay-peer",
    ]))
    .unwrap();
    run_ok(Command::new("ip").args(["link", "set", "underlay-peer", "up"])).unwrap();
    run_ok(Command::new("ip").args(["addr", "add", "192.0.2.100/24", "dev", "underlay"])).unwrap();
    run_ok(Command::new("ip").args(["link", "set", "underlay", "up"])).unwrap();
}

/// One test's node: a work directory, the cgroup and bpffs root of its agent, cluster a's
/// manifests directory (no pods yet) and the peers directory.
struct Node {
    work: tempfile::TempDir,
    cgroup: Cgroup,
    root: BpfRoot,
    local_dir: PathBuf,
    peers: PathBuf,
}

impl Node {
    fn new(peers: &[&Peer]) -> Node {
        let work = tempfile::tempdir().unwrap();
        let local_dir = work.path().join("a");
        std::fs::create_dir_all(&local_dir).unwrap();
        write_manifests(
            &local_dir,
            &manifests("a", 1, "10.1.1.0/24", &[], json!({}), &[]),
        );
        let peers = peers_dir(work.path(), peers);
        Node {
            cgroup: Cgroup::new("dpc").unwrap(),
            root: BpfRoot::new("dpr"),
            work,
            local_dir,
            peers,
        }
    }

    /// A cluster's CNI network on this node.
    fn network(&self, cluster: &'static str, pod_cidr: &'static str) -> Network {
        Network {
            cluster,
            pod_cidr,
            data_dir: self.work.path().join(format!("ipam-{cluster}")),
        }
    }

    /// The arguments every agent of this node gets, then `extra`.
    fn args(&self, extra: &[&str]) -> Vec<String> {
        let base = [
            "--peers-dir",
            self.peers.to_str().unwrap(),
            "--bpf-root",
            self.root.name(),
            "--cgroup",
            self.cgroup.path().to_str().unwrap(),
        ];
        base.iter().chain(extra).map(|s| (*s).to_owned()).collect()
    }

    /// Cluster a's agent on this node.
    async fn agent(&self, extra: &[&str]) -> Agent {
        let local = common::cluster_config("a", 1);
        Agent::start(&local, &self.local_dir, self.work.path(), &self.args(extra)).await
    }
}

#[test]
fn global_service_affinity_udp_policy_and_drops_through_the_ebpf_datapath() {
    on_a_node(scenario);
}

async fn scenario() {
    let b = Peer::start("b", 2, &[]).await;
    let c = Peer::start("c", 3, &[]).await;
    let node = Node::new(&[&b, &c]);
    let (cgroup, local_dir) = (&node.cgroup, &node.local_dir);
    let net_a = node.network("a", "10.1.1.0/24");
    let net_b = node.network("b", "10.2.1.0/24");
    let net_c = node.network("c", "10.3.1.0/24");
    let agent = node.agent(&["--datapath", "bpf"]).await;
    let api = agent.api.to_string();

    // Pods: a's web server and client, b's web server and client, c's client.
    let web_a = net_a.pod(&api, cgroup, "web-a", "web", true);
    let client_a = net_a.pod(&api, cgroup, "client-a", "client", false);
    let web_b = net_b.pod(&api, cgroup, "web-b", "web", true);
    let client_b = net_b.pod(&api, cgroup, "client-b", "client", false);
    let client_c = net_c.pod(&api, cgroup, "client-c", "client", false);
    let registered: Vec<Value> = agent::api::get_json(agent.api, "/v1/endpoints")
        .await
        .unwrap();
    assert_eq!(registered.len(), 5, "{registered:?}");

    write_manifests(
        local_dir,
        &manifests(
            "a",
            1,
            "10.1.1.0/24",
            &[&web_a, &client_a],
            json!({"service.cilium.io/affinity": "local"}),
            &[policy_only_b_clients()],
        ),
    );
    b.set_services(&[]);
    write_manifests(
        b.manifests.path(),
        &manifests("b", 2, "10.2.1.0/24", &[&web_b, &client_b], json!({}), &[]),
    );
    write_manifests(
        c.manifests.path(),
        &manifests("c", 3, "10.3.1.0/24", &[&client_c], json!({}), &[]),
    );

    // Synced: both peers' pods in the ipcache; the web service on a's backend alone
    // (affinity local: remote backends only when no local one is left).
    agent
        .wait_for("peers' pods in the ipcache, web on a's backend", |v| {
            v.ipcache_has(&web_b.ip.to_string(), "b")
                && v.ipcache_has(&client_c.ip.to_string(), "c")
                && v.clusters("shop/web") == ["a".to_owned()].into()
        })
        .await;

    // TCP through the VIP from a's client: affinity local keeps it on a; getpeername shows
    // the VIP.
    let v = wait_for("a's web answering through the VIP", || {
        let v = probe(
            &client_a,
            cgroup,
            &["--tcp", "10.96.0.10:80", "--count", "20"],
        );
        if answers(&v).get("a/web-a") == Some(&20) {
            Ok(v)
        } else {
            Err(v.to_string())
        }
    })
    .await;
    assert_eq!(v["peers"]["10.96.0.10:80"], 20, "{v}");

    // UDP through the VIP: answered from the VIP.
    let v = probe(
        &client_a,
        cgroup,
        &["--udp", "10.96.0.10:53", "--count", "10"],
    );
    assert_eq!(v["failures"], 0, "{v}");
    assert_eq!(v["sources"]["10.96.0.10:53"], 10, "{v}");

    // Policy: b's client gets into a's web, c's client (same labels) is dropped, counted and
    // reported.
    let target = format!("{}:8080", web_a.ip);
    let v = wait_for("b's client allowed into a's web", || {
        let v = probe(&client_b, cgroup, &["--tcp", &target, "--timeout", "500ms"]);
        if v["failures"] == 0 {
            Ok(v)
        } else {
            Err(v.to_string())
        }
    })
    .await;
    assert_eq!(answers(&v).get("a/web-a"), Some(&1));
    let v = probe(&client_c, cgroup, &["--tcp", &target, "--timeout", "500ms"]);
    assert_eq!(v["failures"], 1, "c's client must be dropped: {v}");
    let deadline = Instant::now() + TIMEOUT;
    let drops = loop {
        let drops: Vec<agent::datapath::DropView> =
            agent::api::get_json(agent.api, "/v1/drops").await.unwrap();
        if drops
            .iter()
            .any(|d| d.src.starts_with(&format!("{}:", client_c.ip)))
        {
            break drops;
        }
        assert!(Instant::now() < deadline, "no drop reported: {drops:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let drop = drops
        .iter()
        .find(|d| d.src.starts_with(&format!("{}:", client_c.ip)))
        .unwrap();
    assert_eq!(drop.dst, target);
    assert_eq!(drop.src_cluster, 3);
    assert_eq!(drop.dst_cluster, 1);
    assert_eq!(drop.direction, "ingress");
    assert_eq!(drop.reason, "drop-policy-denied");
    assert_eq!(drop.endpoint.as_deref(), Some("shop/web-a"));
    assert!(
        !drops
            .iter()
            .any(|d| d.src.starts_with(&format!("{}:", client_b.ip))),
        "{drops:?}"
    );
    // The counters are read from the kernel once a second.
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let metrics =
            String::from_utf8(agent::api::get_raw(agent.api, "/metrics").await.unwrap()).unwrap();
        if metrics.contains("clustermesh_agent_datapath_packets_total{reason=\"drop-policy-denied\",direction=\"ingress\"}") {
            break;
        }
        assert!(Instant::now() < deadline, "no drop counted: {metrics}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Routes to the peers' pod CIDRs via their nodes, marked as ours.
    let routes = run_ok(Command::new("ip").args(["route", "show", "proto", "196"])).unwrap();
    assert!(routes.contains("10.2.1.0/24 via 192.0.2.2"), "{routes}");
    assert!(routes.contains("10.3.1.0/24 via 192.0.2.3"), "{routes}");

    // The local backend goes: b's takes over within a second of the manifest change.
    write_manifests(
        local_dir,
        &manifests(
            "a",
            1,
            "10.1.1.0/24",
            &[&client_a],
            json!({"service.cilium.io/affinity": "local"}),
            &[policy_only_b_clients()],
        ),
    );
    let changed = Instant::now();
    wait_for("b's web answering after a's left", || {
        let v = probe(
            &client_a,
            cgroup,
            &["--tcp", "10.96.0.10:80", "--timeout", "200ms"],
        );
        if answers(&v).get("b/web-b") == Some(&1) {
            Ok(())
        } else {
            Err(v.to_string())
        }
    })
    .await;
    let failover = changed.elapsed();
    eprintln!("local pod removed → remote backend serving: {failover:?}");
    assert!(failover < Duration::from_secs(1), "took {failover:?}");

    // The inspection path the README documents.
    let pinned = node.root.path().join("mesh_svc4");
    let dump = run_ok(
        Command::new("bpftool")
            .args(["map", "dump", "pinned"])
            .arg(&pinned),
    )
    .unwrap();
    // With the object's BTF, bpftool prints entries field by field.
    assert!(
        dump.contains("\"slot\"") && dump.contains("\"count\""),
        "{dump}"
    );

    // DEL unregisters and detaches.
    net_c.cni(
        &api,
        "DEL",
        &client_c.ns,
        &client_c.container,
        &client_c.name,
    );
    let registered: Vec<Value> = agent::api::get_json(agent.api, "/v1/endpoints")
        .await
        .unwrap();
    assert_eq!(registered.len(), 4, "{registered:?}");
}

/// Runs the scenario on a fresh node namespace entered by this test's thread.
fn on_a_node<F: std::future::Future<Output = ()>>(scenario: impl FnOnce() -> F) {
    if !is_root() {
        eprintln!("skipped: needs root (CI runs it as root)");
        return;
    }
    let node = Netns::new("dpn").unwrap();
    node.enter_current_thread().unwrap();
    underlay();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(scenario());
}

#[test]
fn connections_survive_an_agent_sigkill_and_no_stale_backend_remains() {
    on_a_node(restart_scenario);
}

async fn restart_scenario() {
    let b = Peer::start("b", 2, &[]).await;
    let node = Node::new(&[&b]);
    let (cgroup, local_dir) = (&node.cgroup, &node.local_dir);
    let net_a = node.network("a", "10.1.1.0/24");
    let net_b = node.network("b", "10.2.1.0/24");
    let mut agent = node.agent(&["--datapath", "bpf"]).await;
    let api = agent.api.to_string();
    let web_a1 = net_a.pod(&api, cgroup, "web-a1", "web", true);
    let web_a2 = net_a.pod(&api, cgroup, "web-a2", "web", true);
    let client = net_a.pod(&api, cgroup, "client", "client", false);
    let web_b = net_b.pod(&api, cgroup, "web-b", "web", true);
    write_manifests(
        local_dir,
        &manifests(
            "a",
            1,
            "10.1.1.0/24",
            &[&web_a1, &web_a2, &client],
            json!({}),
            &[],
        ),
    );
    write_manifests(
        b.manifests.path(),
        &manifests("b", 2, "10.2.1.0/24", &[&web_b], json!({}), &[]),
    );
    agent
        .wait_for("web on a1, a2 and b", |v| v.backends("shop/web").len() == 3)
        .await;
    wait_for("every web backend answering through the VIP", || {
        let v = probe(
            &client,
            cgroup,
            &["--tcp", "10.96.0.10:80", "--count", "30"],
        );
        if answers(&v).len() == 3 && v["failures"] == 0 {
            Ok(())
        } else {
            Err(v.to_string())
        }
    })
    .await;

    // Traffic: one long-lived stream and a loop of new connections, ~8 s each.
    let spawn = |args: &[&str]| {
        client
            .ns
            .command_in(cgroup, echo())
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    let stream = spawn(&[
        "stream",
        "--tcp",
        "10.96.0.10:80",
        "--duration",
        "8s",
        "--interval",
        "20ms",
    ]);
    let loop_ = spawn(&[
        "probe",
        "--tcp",
        "10.96.0.10:80",
        "--count",
        "300",
        "--interval",
        "20ms",
    ]);
    tokio::time::sleep(Duration::from_secs(1)).await;

    // SIGKILL the agent; while it is down, a2 leaves the manifests (its server keeps
    // answering, so only a stale map entry could still send it traffic).
    agent.kill();
    write_manifests(
        local_dir,
        &manifests("a", 1, "10.1.1.0/24", &[&web_a1, &client], json!({}), &[]),
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    agent.respawn().await;

    let finished = |child: Child| -> Value {
        let out = child.wait_with_output().unwrap();
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let (stream, loop_) = tokio::task::spawn_blocking(move || (finished(stream), finished(loop_)))
        .await
        .unwrap();
    assert_eq!(stream["failures"], 0, "the stream broke: {stream}");
    assert!(answers(&stream).values().sum::<u64>() > 100, "{stream}");
    assert_eq!(loop_["failures"], 0, "new connections failed: {loop_}");
    assert_eq!(answers(&loop_).values().sum::<u64>(), 300, "{loop_}");

    // Resynced: a2 is gone from the datapath.
    agent
        .wait_for("a2 gone from the tables", |v| {
            v.backends("shop/web").len() == 2
        })
        .await;
    let v = probe(
        &client,
        cgroup,
        &["--tcp", "10.96.0.10:80", "--count", "40"],
    );
    assert_eq!(v["failures"], 0, "{v}");
    assert!(
        !answers(&v).contains_key("a/web-a2"),
        "a stale backend still serves: {v}"
    );
    assert!(answers(&v).contains_key("a/web-a1"), "{v}");
    let log = agent.log_text();
    assert!(log.contains("pinned maps reused"), "{log}");
    drop(web_a2);
}

#[test]
fn a_full_map_and_an_unloadable_datapath_are_reported_by_name() {
    on_a_node(limits_scenario);
}

async fn limits_scenario() {
    let node = Node::new(&[]);
    let (cgroup, local_dir) = (&node.cgroup, &node.local_dir);
    let net_a = node.network("a", "10.1.1.0/24");

    // Room for 5 service slots: web's two frontends with two backends each need 6.
    let mut agent = node
        .agent(&["--datapath", "bpf", "--map-size-services", "5"])
        .await;
    let api = agent.api.to_string();
    let web1 = net_a.pod(&api, cgroup, "web-1", "web", false);
    let web2 = net_a.pod(&api, cgroup, "web-2", "web", false);
    write_manifests(
        local_dir,
        &manifests("a", 1, "10.1.1.0/24", &[&web1, &web2], json!({}), &[]),
    );
    let deadline = Instant::now() + TIMEOUT;
    let status = loop {
        let status: agent::datapath::DatapathStatus =
            agent::api::get_json(agent.api, "/v1/datapath")
                .await
                .unwrap();
        if status
            .errors
            .iter()
            .any(|e| e.contains("mesh_svc4 is full"))
        {
            break status;
        }
        assert!(Instant::now() < deadline, "no full-map error: {status:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let services = status.maps.iter().find(|m| m.map == "mesh_svc4").unwrap();
    assert_eq!((services.entries, services.capacity), (5, 5), "{status:?}");
    let metrics =
        String::from_utf8(agent::api::get_raw(agent.api, "/metrics").await.unwrap()).unwrap();
    assert!(
        metrics.contains("clustermesh_agent_datapath_map_full_total{map=\"mesh_svc4\"}"),
        "{metrics}"
    );
    assert!(agent.log_text().contains("map mesh_svc4 is full"));
    agent.kill();

    // The pinned service map now has 5 entries of room; a default-sized agent cannot reuse it:
    // `auto` runs the control plane alone and says why, `bpf` refuses to start.
    let mut auto = node.agent(&["--datapath", "auto"]).await;
    let status: agent::datapath::DatapathStatus = agent::api::get_json(auto.api, "/v1/datapath")
        .await
        .unwrap();
    assert_eq!(status.mode, "none", "{status:?}");
    let reason = status.off_reason.unwrap();
    assert!(
        reason.contains("mesh_svc4") && reason.contains("remove the pin"),
        "{reason}"
    );
    assert!(auto.log_text().contains("the eBPF datapath is off"));
    auto.kill();
    let out = Command::new(env!("CARGO_BIN_EXE_clustermesh-agent"))
        .args(["--cluster-name", "a", "--cluster-id", "1", "--manifests"])
        .arg(local_dir)
        .args([
            "--no-state",
            "--api-listen",
            "127.0.0.1:0",
            "--datapath",
            "bpf",
        ])
        .args(node.args(&[]))
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("--datapath bpf") && stderr.contains("mesh_svc4"),
        "{stderr}"
    );
}
