//! Shared by kvstoremesh's integration tests: stores as real processes on loopback, a test
//! publisher that writes a peer's state directly (keys, config, canaries, heartbeat), and
//! helpers that compare the local cache with a peer's published state.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use kvstore::client::{ClientConfig, Op, StoreClient};
use kvstoremesh::{MeshConfig, Running, Timing};
use model::keys::{CACHE_ROOT, HEARTBEAT_KEY, STATE_ROOT};
use model::{
    Capabilities, ClusterConfig, ClusterId, ClusterName, Kind, MaxConnectedClusters, PeerStatus,
    StoreValue, parse_state_key, to_cache_key,
};
use testkit::{Backend, StoreOptions, StoreProcess};
use tokio_util::sync::CancellationToken;

/// How long any condition may take before a test fails: generous, the machine is shared.
pub const TIMEOUT: Duration = Duration::from_secs(60);

/// Key → value.
pub type State = BTreeMap<String, Vec<u8>>;

pub fn name(s: &str) -> ClusterName {
    ClusterName::new(s).unwrap()
}

pub fn cluster(name_: &str, id: u16) -> ClusterConfig {
    cluster_with(name_, id, MaxConnectedClusters::Max255)
}

pub fn cluster_with(name_: &str, id: u16, max: MaxConnectedClusters) -> ClusterConfig {
    ClusterConfig::new(
        name(name_),
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

/// Test settings: short intervals so failures are noticed quickly.
pub fn timing() -> Timing {
    Timing {
        lease_ttl: Duration::from_secs(10),
        peers_poll_interval: Duration::from_millis(200),
        peer_removal_grace: Duration::from_secs(1),
        first_sync_timeout: Duration::from_secs(30),
        probe_interval: Duration::from_millis(500),
        probe_timeout: Duration::from_secs(1),
        peer_request_timeout: Duration::from_secs(2),
        backoff_base: Duration::from_millis(100),
        backoff_max: Duration::from_secs(2),
        shutdown_grace: Duration::from_secs(5),
    }
}

/// A store process and a client of it.
pub struct Store {
    pub process: StoreProcess,
    pub client: StoreClient,
}

impl Store {
    pub async fn start(backend: Backend) -> Store {
        let process = StoreProcess::start(backend, StoreOptions::default())
            .await
            .expect("start store");
        let client = connect(&process.endpoint()).await;
        Store { process, client }
    }

    pub async fn etcd() -> Store {
        Store::start(Backend::Etcd).await
    }

    pub fn endpoint(&self) -> String {
        self.process.endpoint()
    }

    /// A fresh client (after a restart).
    pub async fn reconnect(&mut self) {
        self.client = connect(&self.process.endpoint()).await;
    }
}

pub async fn connect(endpoint: &str) -> StoreClient {
    let mut config = ClientConfig::new([endpoint]);
    config.request_timeout = Duration::from_secs(10);
    StoreClient::connect(&config).await.expect("connect")
}

/// A peer cluster whose store the test writes as its publisher would.
pub struct Peer {
    pub config: ClusterConfig,
    pub store: Store,
}

impl Peer {
    pub async fn start(name_: &str, id: u16) -> Peer {
        Peer::with_config(cluster(name_, id)).await
    }

    pub async fn with_config(config: ClusterConfig) -> Peer {
        Peer {
            config,
            store: Store::etcd().await,
        }
    }

    pub fn name(&self) -> &ClusterName {
        &self.config.name
    }

    pub fn client(&self) -> &StoreClient {
        &self.store.client
    }

    /// Config, every entry, a heartbeat, then every published kind's canary.
    pub async fn publish(&self, state: &State) {
        self.publish_config().await;
        self.put_all(state).await;
        self.heartbeat("2026-01-01T00:00:00Z").await;
        self.canaries().await;
    }

    pub async fn publish_config(&self) {
        self.put(&self.config.key(), self.config.encode()).await;
    }

    pub async fn canaries(&self) {
        for kind in Kind::CORE {
            self.put(
                &kind.state_canary_key(self.name()),
                b"2026-01-01T00:00:00Z".to_vec(),
            )
            .await;
        }
    }

    pub async fn heartbeat(&self, text: &str) {
        self.put(HEARTBEAT_KEY, text.as_bytes().to_vec()).await;
    }

    pub async fn put(&self, key: &str, value: Vec<u8>) -> i64 {
        self.client()
            .raw()
            .put(key, &value, None)
            .await
            .unwrap_or_else(|e| panic!("put {key}: {e:#}"))
    }

    pub async fn delete(&self, key: &str) {
        self.client().delete(key).await.expect("delete");
    }

    pub async fn put_all(&self, state: &State) {
        put_all(self.client(), state).await;
    }

    /// What the peer publishes now (`cilium/state/...`).
    pub async fn state(&self) -> State {
        list(self.client(), STATE_ROOT).await
    }
}

pub async fn put_all(client: &StoreClient, state: &State) {
    client
        .raw()
        .apply_batch(state.iter().map(|(k, v)| Op::put(k.clone(), v.clone())))
        .await
        .expect("put entries");
}

pub async fn list(client: &StoreClient, prefix: &str) -> State {
    client
        .raw()
        .list_prefix(prefix)
        .await
        .expect("list")
        .entries
        .into_iter()
        .map(|e| (e.key, e.value))
        .collect()
}

fn id(config: &ClusterConfig) -> u16 {
    config.id.get()
}

/// A cluster's identity `local` (≥ 256).
pub fn identity_of(config: &ClusterConfig, local: u32) -> u32 {
    (u32::from(id(config)) << config.max_connected_clusters.local_identity_bits()) | local
}

pub fn node(c: &ClusterConfig, n: u32) -> (String, Vec<u8>) {
    let name = format!("node-{n}");
    let value = serde_json::json!({
        "schema": 1,
        "name": name,
        "cluster": c.name.as_str(),
        "cluster_id": id(c),
        "addresses": [{"kind": "InternalIP", "ip": format!("192.0.{}.{}", id(c), n % 250 + 1)}],
        "pod_cidrs": [format!("10.{}.{}.0/24", id(c), n % 250)],
        "labels": {"zone": "z1"},
    });
    (
        format!("cilium/state/nodes/v1/{}/{name}", c.name),
        serde_json::to_vec(&value).unwrap(),
    )
}

pub fn service(c: &ClusterConfig, n: u32, port: u16) -> (String, Vec<u8>) {
    let value = serde_json::json!({
        "schema": 1,
        "cluster": c.name.as_str(),
        "cluster_id": id(c),
        "namespace": "shop",
        "name": format!("web-{n}"),
        "frontends": {"10.96.0.10": {"http": {"protocol": "TCP", "port": port}}},
        "backends": {},
        "shared": true,
        "include_external": true,
        "labels": {},
        "selector": {},
    });
    (
        format!("cilium/state/services/v1/{}/shop/web-{n}", c.name),
        serde_json::to_vec(&value).unwrap(),
    )
}

pub fn identity(c: &ClusterConfig, local: u32) -> (String, Vec<u8>) {
    identity_raw(identity_of(c, local), c.name.as_str(), "web")
}

/// An identity with any number and cluster label, for hostile entries.
pub fn identity_raw(numeric: u32, cluster_label: &str, app: &str) -> (String, Vec<u8>) {
    let value = serde_json::json!({
        "schema": 1,
        "id": numeric,
        "labels": [
            format!("k8s:app={app}"),
            format!("k8s:io.cilium.k8s.policy.cluster={cluster_label}"),
        ],
    });
    (
        format!("cilium/state/identities/v1/id/{numeric}"),
        serde_json::to_vec(&value).unwrap(),
    )
}

pub fn ip(c: &ClusterConfig, n: u32) -> (String, Vec<u8>) {
    ip_raw(
        &format!("10.{}.{}.{}", id(c), n / 250, n % 250 + 1),
        identity_of(c, 256 + n % 1000),
        c.name.as_str(),
    )
}

pub fn ip_raw(address: &str, numeric: u32, cluster_: &str) -> (String, Vec<u8>) {
    let value = serde_json::json!({
        "schema": 1,
        "ip": address,
        "identity": numeric,
        "cluster": cluster_,
    });
    (
        format!("cilium/state/ip/v1/default/{address}"),
        serde_json::to_vec(&value).unwrap(),
    )
}

/// `n` entries of each published kind, all valid for `c`.
pub fn sample_state(c: &ClusterConfig, n: u32) -> State {
    let mut state = State::new();
    for i in 0..n {
        state.extend([
            node(c, i),
            service(c, i, 80),
            identity(c, 256 + i),
            ip(c, i),
        ]);
    }
    for (key, value) in &state {
        let kind = parse_state_key(key).unwrap().kind();
        model::validate_entry(kind, key, value, c).unwrap_or_else(|e| panic!("{key}: {e}"));
    }
    state
}

/// Where kvstoremesh should have put `peer`'s state.
pub fn expected_cache(peer: &ClusterName, state: &State) -> State {
    state
        .iter()
        .map(|(key, value)| {
            let cache_key = to_cache_key(&parse_state_key(key).unwrap(), peer).unwrap();
            (cache_key, value.clone())
        })
        .collect()
}

/// Every cache entry of `peer` in the local store.
pub async fn cache_of(local: &StoreClient, peer: &ClusterName) -> State {
    let mut state = State::new();
    for kind in Kind::ALL {
        state.extend(list(local, &kind.cache_prefix(peer)).await);
    }
    state
}

/// Everything of `peer` in the local store: cache entries, canaries, status, config,
/// heartbeat.
pub async fn everything_of(local: &StoreClient, peer: &ClusterName) -> State {
    let mut state = cache_of(local, peer).await;
    state.extend(list(local, &format!("cilium/synced/{peer}/")).await);
    for key in [
        model::keys::cluster_config_key(peer),
        model::keys::heartbeat_cache_key(peer),
    ] {
        if let Some(entry) = local.raw().get(&key).await.unwrap() {
            state.insert(key, entry.value);
        }
    }
    state
}

/// The status kvstoremesh wrote for `peer`.
pub async fn status_of(local: &StoreClient, peer: &ClusterName) -> Option<PeerStatus> {
    let entry = local
        .raw()
        .get(&model::keys::peer_status_key(peer))
        .await
        .ok()??;
    Some(PeerStatus::decode_for(peer, &entry.value).expect("status decodes"))
}

/// Polls `check` until it returns `Some`, or fails the test after `timeout` saying `what`
/// and what `describe` says about the state then. Returns the value and how long it took.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> (T, Duration)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let started = Instant::now();
    loop {
        let last = match check().await {
            Ok(value) => return (value, started.elapsed()),
            Err(state) => state,
        };
        if started.elapsed() > timeout {
            panic!("timed out after {timeout:?} waiting for {what}; last: {last}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A short description of how two states differ.
pub fn diff(want: &State, have: &State) -> String {
    let missing: Vec<_> = want
        .keys()
        .filter(|k| !have.contains_key(*k))
        .take(5)
        .collect();
    let extra: Vec<_> = have
        .keys()
        .filter(|k| !want.contains_key(*k))
        .take(5)
        .collect();
    let changed: Vec<_> = want
        .iter()
        .filter(|(k, v)| have.get(*k).is_some_and(|h| h != *v))
        .map(|(k, _)| k)
        .take(5)
        .collect();
    format!(
        "want {} have {}; missing {missing:?}; extra {extra:?}; different {changed:?}",
        want.len(),
        have.len()
    )
}

/// Fails the test, saying how, unless the local cache of `peer` equals `want` now.
pub async fn assert_cache(local: &StoreClient, peer: &ClusterName, want: &State) {
    let have = cache_of(local, peer).await;
    assert!(have == *want, "the cache of {peer}: {}", diff(want, &have));
}

/// Waits until the local cache of `peer` equals `want`; returns how long it took.
pub async fn wait_cache(local: &StoreClient, peer: &ClusterName, want: &State) -> Duration {
    let (_, took) = wait_for(&format!("the cache of {peer}"), TIMEOUT, || async {
        let have = cache_of(local, peer).await;
        if have == *want {
            Ok(())
        } else {
            Err(diff(want, &have))
        }
    })
    .await;
    took
}

/// Waits until the status of `peer` satisfies `check`.
pub async fn wait_status(
    local: &StoreClient,
    peer: &ClusterName,
    what: &str,
    check: impl Fn(&PeerStatus) -> bool,
) -> (PeerStatus, Duration) {
    wait_for(&format!("{peer}: {what}"), TIMEOUT, || async {
        match status_of(local, peer).await {
            Some(status) if check(&status) => Ok(status),
            other => Err(format!("{other:?}")),
        }
    })
    .await
}

/// The peer file content for a plain endpoint.
pub fn peer_file(endpoint: &str) -> String {
    format!("endpoints:\n- {endpoint}\n")
}

/// Writes a file atomically (write, then rename over), as config management does.
pub fn write_atomic(path: &Path, content: &str) {
    let tmp = path.with_file_name(format!(
        ".{}.tmp",
        path.file_name().unwrap().to_string_lossy()
    ));
    std::fs::write(&tmp, content).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Logs of the code under test, with `RUST_LOG=kvstoremesh=debug` (nothing by default).
pub fn init_logging() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("off")),
        )
        .try_init();
}

/// kvstoremesh running in this process.
pub struct Mesh {
    pub dir: tempfile::TempDir,
    pub running: Option<Running>,
    pub cancel: CancellationToken,
    pub health: SocketAddr,
}

impl Mesh {
    /// Starts kvstoremesh for `local` with one peer file per peer.
    pub async fn start(
        local: &ClusterConfig,
        store: &str,
        peers: &[&Peer],
        timing: Timing,
    ) -> Mesh {
        let dir = tempfile::tempdir().unwrap();
        for peer in peers {
            write_atomic(
                &dir.path().join(peer.name().as_str()),
                &peer_file(&peer.store.endpoint()),
            );
        }
        Mesh::start_in(dir, local, ClientConfig::new([store]), timing).await
    }

    pub async fn start_in(
        dir: tempfile::TempDir,
        local: &ClusterConfig,
        store: ClientConfig,
        timing: Timing,
    ) -> Mesh {
        init_logging();
        let cancel = CancellationToken::new();
        let config = MeshConfig {
            local: local.clone(),
            store,
            peers_dir: dir.path().to_path_buf(),
            health_listen: Some("127.0.0.1:0".parse().unwrap()),
            timing,
        };
        let running = kvstoremesh::start(config, cancel.clone())
            .await
            .expect("start");
        let health = running.health_addr().unwrap();
        Mesh {
            dir,
            running: Some(running),
            cancel,
            health,
        }
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn running(&self) -> &Running {
        self.running.as_ref().unwrap()
    }

    pub async fn stop(&mut self) {
        self.cancel.cancel();
        if let Some(running) = self.running.take()
            && let Err(error) = running.wait().await
        {
            panic!("unclean shutdown: {error:?}");
        }
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// A plain HTTP/1.0 GET; returns the status code and body.
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect http");
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let code = response
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (code, body)
}

/// The value of a metric line (`name{labels} value`) in a Prometheus text exposition.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
}

/// Sends a signal (`STOP`, `CONT`) to a process.
pub fn signal(pid: u32, sig: &str) {
    let status = std::process::Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{sig} {pid}");
}

/// Every cache key prefix of `peer`, for assertions about emptiness.
pub fn cache_root() -> &'static str {
    CACHE_ROOT
}
