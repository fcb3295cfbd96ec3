//! Shared by the agent's integration tests: clusters as real etcd processes with a
//! clustermesh-apiserver publishing a manifests directory, and the agent as a real process
//! whose API the tests read.

#![allow(dead_code)]

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use agent::api::{AgentStatus, PolicyView};
use agent::tables::{IpcacheEntry, RouteEntry, ServiceEntry};
use clustermesh_apiserver::publisher::PublisherConfig;
use clustermesh_apiserver::{ApiserverConfig, SourceConfig, StoreConfig};
use kvstore::client::ClientConfig;
use mesh_translate::TranslateConfig;
use model::{Capabilities, ClusterConfig, ClusterId, ClusterName, MaxConnectedClusters};
use serde_json::{Value, json};
use testkit::{Backend, StoreOptions, StoreProcess};
use tokio_util::sync::CancellationToken;

/// How long any condition may take before a test fails: generous, the machine is shared.
pub const TIMEOUT: Duration = Duration::from_secs(90);

pub fn cluster_config(name: &str, id: u16) -> ClusterConfig {
    ClusterConfig::new(
        ClusterName::new(name).unwrap(),
        ClusterId::new(id, MaxConnectedClusters::Max255).unwrap(),
        MaxConnectedClusters::Max255,
        Capabilities {
            sync_canaries: true,
            cached: false,
            service_exports: false,
        },
    )
    .unwrap()
}

/// One service of a cluster's manifests.
#[derive(Clone, Debug)]
pub struct Svc {
    pub namespace: &'static str,
    pub name: &'static str,
    pub annotations: Vec<(&'static str, &'static str)>,
    /// Last octets of the ready backends (pods).
    pub ready: Vec<u8>,
    /// Last octets of backends that are neither ready nor serving.
    pub not_ready: Vec<u8>,
}

impl Svc {
    pub fn new(namespace: &'static str, name: &'static str) -> Self {
        Svc {
            namespace,
            name,
            annotations: Vec::new(),
            ready: Vec::new(),
            not_ready: Vec::new(),
        }
    }

    pub fn global(mut self) -> Self {
        self.annotations.push(("service.cilium.io/global", "true"));
        self
    }

    pub fn annotate(mut self, key: &'static str, value: &'static str) -> Self {
        self.annotations.push((key, value));
        self
    }

    pub fn ready(mut self, octets: &[u8]) -> Self {
        self.ready = octets.to_vec();
        self
    }

    pub fn not_ready(mut self, octets: &[u8]) -> Self {
        self.not_ready = octets.to_vec();
        self
    }
}

/// The address of backend `octet` of service number `index` in cluster `id`.
pub fn backend_ip(id: u16, index: usize, octet: u8) -> String {
    format!("10.{id}.{}.{octet}", index + 1)
}

/// A cluster's manifests: a node with pod CIDR 10.<id>.0.0/16, the namespaces (cluster id 1,
/// the agent's own cluster in these tests, has a `private` namespace that is not global), and
/// per service its Service (cluster IP 10.96.<id>.<index+1>), EndpointSlice
/// and one pod per backend.
pub fn manifests(name: &str, id: u16, services: &[Svc]) -> Vec<Value> {
    let node = format!("node-{name}");
    let mut docs = vec![
        json!({"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": node},
            "spec": {"podCIDR": format!("10.{id}.0.0/16")},
            "status": {"addresses": [{"type": "InternalIP", "address": format!("192.0.2.{id}")}]}}),
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}}),
    ];
    if id == 1 {
        docs.push(
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "private",
            "annotations": {"clustermesh.cilium.io/global": "false"}}}),
        );
    }
    for (index, svc) in services.iter().enumerate() {
        let annotations: serde_json::Map<String, Value> = svc
            .annotations
            .iter()
            .map(|(k, v)| ((*k).to_owned(), json!(v)))
            .collect();
        docs.push(json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"namespace": svc.namespace, "name": svc.name, "annotations": annotations},
            "spec": {"clusterIP": format!("10.96.{id}.{}", index + 1),
                "ports": [{"name": "http", "port": 80, "protocol": "TCP"}],
                "selector": {"app": svc.name}}}));
        let mut endpoints = Vec::new();
        for (octets, ready) in [(&svc.ready, true), (&svc.not_ready, false)] {
            for octet in octets {
                let ip = backend_ip(id, index, *octet);
                endpoints.push(json!({"addresses": [ip], "nodeName": node,
                    "conditions": {"ready": ready, "serving": ready, "terminating": false}}));
                docs.push(json!({"apiVersion": "v1", "kind": "Pod",
                    "metadata": {"namespace": svc.namespace, "name": format!("{}-{octet}", svc.name),
                        "labels": {"app": svc.name}},
                    "spec": {"nodeName": node, "containers": [{"name": "c", "image": "x"}]},
                    "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
                        "hostIP": format!("192.0.2.{id}")}}));
            }
        }
        docs.push(
            json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"namespace": svc.namespace, "name": format!("{}-1", svc.name),
                "labels": {"kubernetes.io/service-name": svc.name}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": endpoints}),
        );
    }
    docs
}

/// Writes `docs` as the directory's one manifest file, atomically.
pub fn write_manifests(dir: &Path, docs: &[Value]) {
    let text: String = docs
        .iter()
        .map(|d| format!("---\n{}\n", serde_json::to_string(d).unwrap()))
        .collect();
    let tmp = dir.join(".cluster.yaml.tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, dir.join("cluster.yaml")).unwrap();
}

/// A peer cluster: an etcd process and an apiserver (in this process) publishing its
/// manifests into it.
pub struct Peer {
    pub config: ClusterConfig,
    pub manifests: tempfile::TempDir,
    pub store: StoreProcess,
    apiserver: Option<(CancellationToken, clustermesh_apiserver::Running)>,
}

impl Peer {
    pub async fn start(name: &str, id: u16, services: &[Svc]) -> Peer {
        let manifests_dir = tempfile::tempdir().unwrap();
        write_manifests(manifests_dir.path(), &manifests(name, id, services));
        let store = StoreProcess::start(Backend::Etcd, StoreOptions::default())
            .await
            .expect("start etcd");
        let mut peer = Peer {
            config: cluster_config(name, id),
            manifests: manifests_dir,
            store,
            apiserver: None,
        };
        peer.start_apiserver().await;
        peer
    }

    async fn start_apiserver(&mut self) {
        let cancel = CancellationToken::new();
        let config = ApiserverConfig {
            source: SourceConfig::Manifests(self.manifests.path().to_path_buf()),
            store: StoreConfig::External(ClientConfig::new([self.store.endpoint()])),
            publisher: PublisherConfig {
                translate: TranslateConfig::new(self.config.clone()),
                lease_ttl: Duration::from_secs(10),
                heartbeat_interval: Duration::from_millis(500),
                retry_backoff: Duration::from_millis(200),
                replica: None,
            },
            health_listen: None,
            shutdown_grace: Duration::from_secs(2),
        };
        let mut running = clustermesh_apiserver::start(config, cancel.clone())
            .await
            .expect("start apiserver");
        let ready = tokio::time::timeout(TIMEOUT, running.status.wait_for(|s| s.ready))
            .await
            .is_ok_and(|r| r.is_ok());
        assert!(ready, "apiserver {} not ready", self.config.name);
        self.apiserver = Some((cancel, running));
    }

    pub fn name(&self) -> &str {
        self.config.name.as_str()
    }

    pub fn set_services(&self, services: &[Svc]) {
        write_manifests(
            self.manifests.path(),
            &manifests(self.name(), self.config.id.get(), services),
        );
    }

    /// The peer file the agent reads in direct mode.
    pub fn peer_file(&self) -> String {
        format!("endpoints:\n- {}\n", self.store.endpoint())
    }

    /// Kills the store (SIGKILL) and then stops the apiserver, so nothing is cleaned up.
    pub async fn kill(&mut self) {
        self.store.kill();
        if let Some((cancel, running)) = self.apiserver.take() {
            cancel.cancel();
            let _ = running.wait().await;
        }
    }

    /// Restarts the store on its data and port, and an apiserver.
    pub async fn revive(&mut self) {
        self.store.restart().await.expect("restart etcd");
        self.start_apiserver().await;
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        if let Some((cancel, _)) = &self.apiserver {
            cancel.cancel();
        }
    }
}

/// The agent as a process.
pub struct Agent {
    child: Option<Child>,
    pub work: PathBuf,
    pub api: SocketAddr,
    pub log: PathBuf,
    args: Vec<String>,
    runs: u32,
}

impl Agent {
    /// Starts the agent for local cluster `local` (manifests in `local_dir`) with extra
    /// arguments, its state file and logs in `work`.
    pub async fn start(
        local: &ClusterConfig,
        local_dir: &Path,
        work: &Path,
        extra: &[String],
    ) -> Agent {
        let mut args: Vec<String> = [
            "--cluster-name",
            local.name.as_str(),
            "--cluster-id",
            &local.id.get().to_string(),
            "--manifests",
            local_dir.to_str().unwrap(),
            "--api-listen",
            "127.0.0.1:0",
            "--api-addr-file",
            work.join("api.addr").to_str().unwrap(),
            "--state-file",
            work.join("state.json").to_str().unwrap(),
            "--probe-interval",
            "200ms",
            "--peers-poll-interval",
            "200ms",
            "--backoff-base",
            "100ms",
            "--backoff-max",
            "500ms",
            "--request-timeout",
            "2s",
            "--watch-progress-interval",
            "100ms",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        // The control plane alone unless a test asks for the datapath: an eBPF datapath
        // attaches to a cgroup and pins under bpffs, which these tests must not share.
        if !extra.iter().any(|a| a == "--datapath") {
            args.extend(["--datapath".to_owned(), "none".to_owned()]);
        }
        args.extend([
            "--endpoints-file".to_owned(),
            work.join("endpoints.json").to_str().unwrap().to_owned(),
        ]);
        args.extend(extra.iter().cloned());
        let mut agent = Agent {
            child: None,
            work: work.to_path_buf(),
            api: "127.0.0.1:1".parse().unwrap(),
            log: work.join("agent.log"),
            args,
            runs: 0,
        };
        agent.spawn().await;
        agent
    }

    async fn spawn(&mut self) {
        let addr_file = self.work.join("api.addr");
        let _ = std::fs::remove_file(&addr_file);
        self.runs += 1;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_clustermesh-agent"))
            .args(&self.args)
            .env("RUST_LOG", "info,agent=debug")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn agent");
        self.child = Some(child);
        let api = wait_until("agent API address", || async {
            std::fs::read_to_string(&addr_file)
                .ok()
                .and_then(|s| s.trim().parse::<SocketAddr>().ok())
        })
        .await;
        self.api = api;
    }

    /// SIGTERM (the agent persists its state) and wait.
    pub fn terminate(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let _ = child.wait();
        }
    }

    pub async fn restart(&mut self) {
        self.terminate();
        self.spawn().await;
    }

    /// SIGKILL: nothing is persisted or cleaned up on the way out.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the agent again with the same arguments (after [`Agent::kill`]).
    pub async fn respawn(&mut self) {
        self.spawn().await;
    }

    /// The agent process's id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub async fn status(&self) -> Option<AgentStatus> {
        agent::api::get_json(self.api, "/v1/peers").await.ok()
    }

    pub async fn services(&self) -> Option<Vec<ServiceEntry>> {
        agent::api::get_json(self.api, "/v1/services").await.ok()
    }

    pub async fn ipcache(&self) -> Option<Vec<IpcacheEntry>> {
        agent::api::get_json(self.api, "/v1/ipcache").await.ok()
    }

    pub async fn routes(&self) -> Option<Vec<RouteEntry>> {
        agent::api::get_json(self.api, "/v1/routes").await.ok()
    }

    pub async fn policy(&self) -> Option<PolicyView> {
        agent::api::get_json(self.api, "/v1/policy").await.ok()
    }

    /// Waits until `check` holds for the agent's status, services and ipcache.
    pub async fn wait_for(&self, what: &str, check: impl Fn(&View) -> bool) -> View {
        let mut last = None;
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        loop {
            if let Some(view) = self.view().await {
                if check(&view) {
                    return view;
                }
                last = Some(view);
            }
            if tokio::time::Instant::now() > deadline {
                let log = self.log_text();
                let tail: String = log
                    .lines()
                    .rev()
                    .take(60)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect::<Vec<_>>()
                    .join("\n");
                panic!(
                    "timed out waiting for {what}; last view: {last:#?}\nagent log tail:\n{tail}"
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn view(&self) -> Option<View> {
        Some(View {
            status: self.status().await?,
            services: self.services().await?,
            ipcache: self.ipcache().await?,
        })
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// What the agent serves, at one moment.
#[derive(Debug, Clone)]
pub struct View {
    pub status: AgentStatus,
    pub services: Vec<ServiceEntry>,
    pub ipcache: Vec<IpcacheEntry>,
}

impl View {
    /// The backends of `namespace/name` (every frontend) as (cluster, ip, state).
    pub fn backends(&self, service: &str) -> BTreeSet<(String, String, String)> {
        self.services
            .iter()
            .filter(|s| s.service.to_string() == service)
            .flat_map(|s| s.backends.iter())
            .map(|b| (b.cluster.to_string(), b.ip.to_string(), b.state.to_string()))
            .collect()
    }

    /// The clusters of `service`'s backends.
    pub fn clusters(&self, service: &str) -> BTreeSet<String> {
        self.backends(service)
            .into_iter()
            .map(|(c, _, _)| c)
            .collect()
    }

    pub fn has_service(&self, service: &str) -> bool {
        self.services
            .iter()
            .any(|s| s.service.to_string() == service)
    }

    pub fn peer_synced(&self, peer: &str) -> bool {
        self.status
            .peers
            .get(peer)
            .is_some_and(|p| p.phase == agent::remote::Phase::Synced && !p.restored)
    }

    pub fn peer_health(&self, peer: &str) -> Option<agent::merge::ClusterHealth> {
        self.status.peers.get(peer).map(|p| p.health)
    }

    pub fn ipcache_has(&self, ip: &str, cluster: &str) -> bool {
        self.ipcache
            .iter()
            .any(|e| e.prefix.to_string() == ip && e.cluster.as_str() == cluster)
    }
}

/// Polls `f` until it gives a value, at most [`TIMEOUT`].
pub async fn wait_until<T, F, Fut>(what: &str, f: F) -> T
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A peers directory with a file per peer.
pub fn peers_dir(work: &Path, peers: &[&Peer]) -> PathBuf {
    let dir = work.join("peers");
    std::fs::create_dir_all(&dir).unwrap();
    for peer in peers {
        std::fs::write(dir.join(peer.name()), peer.peer_file()).unwrap();
    }
    dir
}

/// Counts log lines containing every one of `parts`.
pub fn count_lines(log: &str, parts: &[&str]) -> usize {
    log.lines()
        .filter(|l| parts.iter().all(|p| l.contains(p)))
        .count()
}
