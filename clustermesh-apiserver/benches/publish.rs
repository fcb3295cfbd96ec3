//! Publishing benchmark: the real `clustermesh-apiserver` binary, cold-started on a
//! generated manifest directory, publishing into our store (`kvstore serve`) and into real
//! etcd, side by side.
//!
//! ```text
//! cargo bench -p clustermesh-apiserver --bench publish                 # 100k endpoints
//! cargo bench -p clustermesh-apiserver --bench publish -- --quick      # a small smoke run
//! cargo bench -p clustermesh-apiserver --bench publish -- --json out.json
//! cargo bench -p clustermesh-apiserver --bench publish -- --generate DIR  # manifests only
//! cargo bench -p clustermesh-apiserver --bench publish -- --baseline OLD_BIN
//! ```
//!
//! With `--baseline`, both stores are ours and the two columns are an older
//! `clustermesh-apiserver` binary (built from another commit) and this one, run one after
//! the other on the same generated cluster: an A/B of a change on a noisy machine.
//!
//! The full run generates 1,000 global Services, each with an EndpointSlice of 100 ready
//! endpoints, the 100,000 Pods behind them (with IPs, across a handful of label sets) on 100
//! Nodes, and measures for each store:
//!
//! - cold start: from spawning the apiserver process to `/readyz` answering 200, and to the
//!   store holding every expected key (read back and counted per kind);
//! - edit latency: from renaming an edited EndpointSlice file into place to the watch on the
//!   store delivering the service's new value, over many edits (p50, p99, max);
//! - the apiserver's and the store's peak RSS and CPU time.
//!
//! Our store's binary comes from `$KVSTORE_BIN`, or is built with `cargo build --release -p
//! kvstore` into this bench's target dir. Every process is started on free loopback ports
//! and killed by its PID when done (also on failure).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clustermesh_apiserver::published::PUBLISHED_KINDS;
use futures::StreamExt;
use kvstore::client::{ClientConfig, StoreClient, WatchEvent};
use model::keys::Kind;
use model::{
    Capabilities, ClusterConfig, ClusterId, ClusterName, Entry, MaxConnectedClusters,
    validate_entry,
};
use testkit::{Backend, StoreOptions, StoreProcess};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const APISERVER: &str = env!("CARGO_BIN_EXE_clustermesh-apiserver");
const CLUSTER: &str = "bench";
const CLUSTER_ID: u16 = 7;
const NAMESPACE: &str = "bench";
/// How long any one phase may take before the bench gives up.
const TIMEOUT: Duration = Duration::from_secs(600);
/// How long one edit may take to reach the store.
const EDIT_TIMEOUT: Duration = Duration::from_secs(120);

type Error = Box<dyn std::error::Error + Send + Sync>;
type Result<T> = std::result::Result<T, Error>;

#[derive(Debug, Clone, Copy, serde::Serialize)]
struct Params {
    services: usize,
    endpoints_per_service: usize,
    nodes: usize,
    label_sets: usize,
    edits: usize,
}

impl Params {
    fn full() -> Params {
        Params {
            services: 1000,
            endpoints_per_service: 100,
            nodes: 100,
            label_sets: 5,
            edits: 50,
        }
    }

    fn quick() -> Params {
        Params {
            services: 20,
            endpoints_per_service: 10,
            nodes: 5,
            label_sets: 3,
            edits: 5,
        }
    }

    fn pods(&self) -> usize {
        self.services * self.endpoints_per_service
    }

    /// Expected published entries per kind.
    fn expected(&self) -> BTreeMap<Kind, usize> {
        BTreeMap::from([
            (Kind::Nodes, self.nodes),
            (Kind::Services, self.services),
            (Kind::Identities, self.label_sets.min(self.services)),
            (Kind::Ip, self.pods()),
        ])
    }
}

struct Args {
    quick: bool,
    json: Option<PathBuf>,
    /// Only write the manifests into this directory and exit (to run the apiserver by hand).
    generate: Option<PathBuf>,
    /// An older apiserver binary to compare this one with, both publishing into our store.
    baseline: Option<PathBuf>,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        quick: false,
        json: None,
        generate: None,
        baseline: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--quick" => args.quick = true,
            "--json" => args.json = Some(it.next().ok_or("--json needs a file")?.into()),
            "--baseline" => {
                args.baseline = Some(it.next().ok_or("--baseline needs a binary")?.into());
            }
            "--generate" => {
                args.generate = Some(it.next().ok_or("--generate needs a directory")?.into());
            }
            // `cargo bench` passes --bench; filters and other harness flags mean nothing here.
            _ => {}
        }
    }
    Ok(args)
}

// ---------------------------------------------------------------------------------------
// The generated cluster
// ---------------------------------------------------------------------------------------

/// Pod `p` backs service `p / endpoints_per_service` and runs on node `p % nodes`.
fn pod_node(params: &Params, p: usize) -> usize {
    p % params.nodes
}

/// Each node owns a /22 of 10.64.0.0/10; its pods take consecutive addresses in it.
fn node_cidr_base(node: usize) -> u32 {
    u32::from(Ipv4Addr::new(10, 64, 0, 0)) + (node as u32) * 1024
}

fn pod_ip(params: &Params, p: usize) -> Ipv4Addr {
    let node = pod_node(params, p);
    let slot = p / params.nodes;
    assert!(slot < 1022, "too many pods per node for a /22");
    Ipv4Addr::from(node_cidr_base(node) + 1 + slot as u32)
}

fn node_ip(node: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(172, 16, 0, 1)) + node as u32)
}

fn service_name(k: usize) -> String {
    format!("svc-{k:04}")
}

fn service_key(k: usize) -> String {
    format!(
        "cilium/state/services/v1/{CLUSTER}/{NAMESPACE}/{}",
        service_name(k)
    )
}

fn app_label(params: &Params, k: usize) -> String {
    format!("app-{}", k % params.label_sets)
}

/// The EndpointSlice of service `k`; endpoint `not_ready` (if any) is marked neither ready
/// nor serving, so the published service loses that backend.
fn slice_yaml(params: &Params, k: usize, not_ready: Option<usize>) -> String {
    let name = service_name(k);
    let mut out = format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-abc\n  \
         namespace: {NAMESPACE}\n  labels: {{kubernetes.io/service-name: {name}}}\n\
         addressType: IPv4\nports: [{{name: http, port: 8080, protocol: TCP}}]\nendpoints:\n"
    );
    for e in 0..params.endpoints_per_service {
        let p = k * params.endpoints_per_service + e;
        let ready = not_ready != Some(e);
        let _ = writeln!(
            out,
            "  - {{addresses: [{}], conditions: {{ready: {ready}, serving: {ready}}}, nodeName: \
             node-{:03}}}",
            pod_ip(params, p),
            pod_node(params, p)
        );
    }
    out
}

/// Writes the manifests; returns how many bytes.
fn generate(params: &Params, dir: &Path) -> Result<u64> {
    let mut bytes = 0u64;
    let mut write = |name: &str, text: &str| -> Result<()> {
        let path = dir.join(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&path, text)?;
        bytes += text.len() as u64;
        Ok(())
    };
    write(
        "namespaces.yaml",
        &format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: {NAMESPACE}}}\n"),
    )?;

    let mut nodes = String::new();
    for n in 0..params.nodes {
        let cidr = format!("{}/22", Ipv4Addr::from(node_cidr_base(n)));
        let _ = write!(
            nodes,
            "---\napiVersion: v1\nkind: Node\nmetadata:\n  name: node-{n:03}\n  labels: \
             {{topology.kubernetes.io/zone: zone-{}}}\nspec: {{podCIDR: {cidr}, podCIDRs: \
             [{cidr}]}}\nstatus: {{addresses: [{{type: InternalIP, address: {}}}]}}\n",
            n % 3,
            node_ip(n)
        );
    }
    write("nodes.yaml", &nodes)?;

    let mut services = String::new();
    for k in 0..params.services {
        let ip = Ipv4Addr::new(10, 96, (k / 250) as u8, (k % 250 + 1) as u8);
        let _ = write!(
            services,
            "---\napiVersion: v1\nkind: Service\nmetadata:\n  name: {}\n  namespace: \
             {NAMESPACE}\n  annotations: {{service.cilium.io/global: \"true\"}}\nspec:\n  \
             clusterIP: {ip}\n  selector: {{app: {}}}\n  ports: [{{name: http, port: 80, \
             protocol: TCP}}]\n",
            service_name(k),
            app_label(params, k)
        );
    }
    write("services.yaml", &services)?;

    for k in 0..params.services {
        write(
            &format!("endpointslices/{}.yaml", service_name(k)),
            &slice_yaml(params, k, None),
        )?;
    }

    // One pod file per node.
    let mut per_node = vec![String::new(); params.nodes];
    for p in 0..params.pods() {
        let k = p / params.endpoints_per_service;
        let n = pod_node(params, p);
        let ip = pod_ip(params, p);
        let _ = write!(
            per_node[n],
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {}-{}, namespace: {NAMESPACE}, \
             labels: {{app: {}}}}}\nspec: {{nodeName: node-{n:03}, containers: [{{name: app, \
             image: app}}]}}\nstatus: {{phase: Running, hostIP: {}, podIP: {ip}, podIPs: \
             [{{ip: {ip}}}]}}\n",
            service_name(k),
            p % params.endpoints_per_service,
            app_label(params, k),
            node_ip(n)
        );
    }
    for (n, text) in per_node.iter().enumerate() {
        write(&format!("pods/node-{n:03}.yaml"), text)?;
    }
    Ok(bytes)
}

// ---------------------------------------------------------------------------------------
// Processes
// ---------------------------------------------------------------------------------------

/// The apiserver process, SIGKILLed by its PID when dropped.
struct Apiserver {
    child: Option<Child>,
    pid: u32,
    log: PathBuf,
}

impl Apiserver {
    fn spawn(bin: &Path, args: &[String], log: PathBuf) -> Result<Apiserver> {
        let file = std::fs::File::create(&log)?;
        let child = Command::new(bin)
            .args(args)
            .env("NO_COLOR", "1")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()?;
        Ok(Apiserver {
            pid: child.id(),
            child: Some(child),
            log,
        })
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn check_running(&mut self) -> Result<()> {
        if let Some(status) = self
            .child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
        {
            return Err(format!("apiserver exited with {status}:\n{}", self.log()).into());
        }
        Ok(())
    }
}

impl Drop for Apiserver {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Peak RSS (MiB) and CPU seconds (user + system) of a live process, from /proc.
fn usage(pid: u32) -> (Option<f64>, Option<f64>) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map(|kib| kib / 1024.0);
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which is in parentheses and may hold spaces).
    let cpu = stat.rsplit_once(')').and_then(|(_, rest)| {
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks = |i: usize| fields.get(i)?.parse::<f64>().ok();
        // utime and stime are fields 14 and 15 of the whole line: 11 and 12 after ')'.
        Some((ticks(11)? + ticks(12)?) / 100.0)
    });
    (rss, cpu)
}

async fn http_status(addr: SocketAddr, path: &str) -> Option<u16> {
    let request = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
        let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(req.as_bytes()).await.ok()?;
        let mut buf = Vec::new();
        stream.read_to_end(&mut buf).await.ok()?;
        String::from_utf8_lossy(&buf)
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    };
    tokio::time::timeout(Duration::from_secs(10), request)
        .await
        .ok()
        .flatten()
}

// ---------------------------------------------------------------------------------------
// One store
// ---------------------------------------------------------------------------------------

#[derive(Debug, Default, Clone, serde::Serialize)]
struct Measured {
    generate_s: f64,
    manifest_mib: f64,
    to_health_s: f64,
    to_ready_s: f64,
    to_complete_s: f64,
    verify_s: f64,
    entries: BTreeMap<String, usize>,
    edit_ms: Vec<f64>,
    edit_p50_ms: f64,
    edit_p99_ms: f64,
    edit_max_ms: f64,
    apiserver_peak_rss_mib: Option<f64>,
    apiserver_cpu_s: Option<f64>,
    store_peak_rss_mib: Option<f64>,
    store_cpu_s: Option<f64>,
}

fn cluster() -> ClusterConfig {
    let max = MaxConnectedClusters::Max255;
    ClusterConfig::new(
        ClusterName::new(CLUSTER).expect("name"),
        ClusterId::new(CLUSTER_ID, max).expect("id"),
        max,
        Capabilities {
            sync_canaries: true,
            cached: false,
            service_exports: false,
        },
    )
    .expect("config")
}

/// Counts the store's entries per kind, decoding a sample of each as a peer would.
async fn count(client: &StoreClient) -> Result<BTreeMap<Kind, usize>> {
    let config = cluster();
    let mut counts = BTreeMap::new();
    for kind in PUBLISHED_KINDS {
        let listing = client.raw().list_prefix(kind.state_prefix()).await?;
        for entry in listing.entries.iter().step_by(997) {
            validate_entry(kind, &entry.key, &entry.value, &config)
                .map_err(|e| format!("{}: {e}", entry.key))?;
        }
        counts.insert(kind, listing.entries.len());
    }
    Ok(counts)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

async fn run_store(
    name: &str,
    backend: Backend,
    params: &Params,
    apiserver: &Path,
) -> Result<Measured> {
    let mut m = Measured::default();
    let work = tempfile::Builder::new()
        .prefix("apiserver-bench-")
        .tempdir()?;
    let manifests = work.path().join("manifests");
    let t = Instant::now();
    let bytes = generate(params, &manifests)?;
    m.generate_s = t.elapsed().as_secs_f64();
    m.manifest_mib = bytes as f64 / (1024.0 * 1024.0);
    eprintln!(
        "[bench] {name}: generated {:.1} MiB of manifests in {:.1} s",
        m.manifest_mib, m.generate_s
    );

    let store = StoreProcess::start(backend, StoreOptions::default()).await?;
    let mut config = ClientConfig::new([store.endpoint()]);
    config.request_timeout = Duration::from_secs(60);
    let client = StoreClient::connect(&config).await?;
    eprintln!(
        "[bench] {name}: store at {} (pid {})",
        store.endpoint(),
        store.pid()
    );

    let args: Vec<String> = [
        "--cluster-name",
        CLUSTER,
        "--cluster-id",
        &CLUSTER_ID.to_string(),
        "--manifests",
        &manifests.display().to_string(),
        "--etcd-endpoints",
        &store.endpoint(),
        "--health-listen",
        "127.0.0.1:0",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let start = Instant::now();
    let mut api = Apiserver::spawn(apiserver, &args, work.path().join("apiserver.log"))?;

    // Cold start: the health address from the log, then /readyz.
    let health: SocketAddr = loop {
        api.check_running()?;
        let log = api.log();
        if let Some(addr) = log
            .lines()
            .find(|l| l.contains("clustermesh-apiserver started"))
            .and_then(|l| l.split_once("health=Some("))
            .and_then(|(_, rest)| rest.split_once(')'))
            .and_then(|(addr, _)| addr.parse().ok())
        {
            break addr;
        }
        if start.elapsed() > TIMEOUT {
            return Err(format!("the apiserver did not start:\n{log}").into());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    m.to_health_s = start.elapsed().as_secs_f64();
    loop {
        api.check_running()?;
        if http_status(health, "/readyz").await == Some(200) {
            break;
        }
        if start.elapsed() > TIMEOUT {
            return Err(format!("not ready after {TIMEOUT:?}:\n{}", api.log()).into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    m.to_ready_s = start.elapsed().as_secs_f64();
    eprintln!("[bench] {name}: /readyz 200 after {:.2} s", m.to_ready_s);

    let expected = params.expected();
    let verify = Instant::now();
    loop {
        // The listing reads the store at one revision, taken when it starts.
        let attempt = start.elapsed().as_secs_f64();
        let counts = count(&client).await?;
        if counts == expected {
            m.to_complete_s = attempt;
            m.entries = counts
                .into_iter()
                .map(|(k, n)| (k.name().to_owned(), n))
                .collect();
            break;
        }
        if start.elapsed() > TIMEOUT {
            return Err(format!("store holds {counts:?}, expected {expected:?}").into());
        }
        eprintln!("[bench] {name}: store holds {counts:?} so far");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    m.verify_s = verify.elapsed().as_secs_f64();
    eprintln!(
        "[bench] {name}: store complete {:?} (counted in {:.2} s)",
        m.entries, m.verify_s
    );

    // Edits: one service's slice changes; time until the store has its new value.
    let from = client.status().await?.revision + 1;
    let mut watch = client
        .raw()
        .watch_prefix(Kind::Services.state_prefix(), from)
        .await?;
    let config = cluster();
    for i in 0..params.edits {
        // Distinct services while i < services (37 is prime to both sizes used), each edit
        // marking another endpoint.
        let k = (i * 37 + 11) % params.services;
        let e = i % params.endpoints_per_service;
        let file = manifests.join(format!("endpointslices/{}.yaml", service_name(k)));
        let tmp = manifests.join(format!("endpointslices/.{}.tmp", service_name(k)));
        std::fs::write(&tmp, slice_yaml(params, k, Some(e)))?;
        let t = Instant::now();
        std::fs::rename(&tmp, &file)?;
        let key = service_key(k);
        let wanted_ip = pod_ip(params, k * params.endpoints_per_service + e);
        let seen = tokio::time::timeout(EDIT_TIMEOUT, async {
            while let Some(event) = watch.next().await {
                match event {
                    WatchEvent::Put {
                        key: got, value, ..
                    } if got == key => {
                        let Ok(Entry::Service(service)) =
                            validate_entry(Kind::Services, &got, &value, &config)
                        else {
                            return Err(format!("{got}: invalid value"));
                        };
                        // Neither ready nor serving: the backend is left out.
                        let ip = std::net::IpAddr::V4(wanted_ip);
                        if !service.backends.contains_key(&ip) {
                            return Ok(t.elapsed());
                        }
                    }
                    event if event.is_terminal() => return Err(format!("watch: {event:?}")),
                    _ => {}
                }
            }
            Err("watch ended".to_owned())
        })
        .await
        .map_err(|_| format!("edit {i} of {key} not seen within {EDIT_TIMEOUT:?}"))??;
        m.edit_ms.push(seen.as_secs_f64() * 1000.0);
        eprintln!(
            "[bench] {name}: edit {i} ({key}) in the store after {:.0} ms",
            seen.as_secs_f64() * 1000.0
        );
        // Edits are not undone: each one targets another service (or another endpoint of
        // it), so every edit is a change, and the next one starts from a settled apiserver.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut sorted = m.edit_ms.clone();
    sorted.sort_by(f64::total_cmp);
    m.edit_p50_ms = percentile(&sorted, 50.0);
    m.edit_p99_ms = percentile(&sorted, 99.0);
    m.edit_max_ms = sorted.last().copied().unwrap_or(f64::NAN);
    eprintln!(
        "[bench] {name}: {} edits, p50 {:.0} ms, p99 {:.0} ms",
        sorted.len(),
        m.edit_p50_ms,
        m.edit_p99_ms
    );
    api.check_running()?;
    (m.apiserver_peak_rss_mib, m.apiserver_cpu_s) = usage(api.pid);
    (m.store_peak_rss_mib, m.store_cpu_s) = usage(store.pid());
    drop(api);
    drop(store);
    Ok(m)
}

// ---------------------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------------------

#[derive(Debug, serde::Serialize)]
struct Row {
    metric: &'static str,
    unit: &'static str,
    /// The reference column: etcd, or the baseline binary.
    base: Option<f64>,
    /// Our store, or this binary.
    this: Option<f64>,
    /// this / base.
    ratio: Option<f64>,
}

fn rows(base: &Measured, this: &Measured) -> Vec<Row> {
    type Metric = (&'static str, &'static str, fn(&Measured) -> Option<f64>);
    let metrics: [Metric; 9] = [
        ("cold start → /healthz up", "s", |m| Some(m.to_health_s)),
        ("cold start → /readyz 200", "s", |m| Some(m.to_ready_s)),
        ("cold start → store complete", "s", |m| {
            Some(m.to_complete_s)
        }),
        ("edit → store, p50", "ms", |m| Some(m.edit_p50_ms)),
        ("edit → store, p99", "ms", |m| Some(m.edit_p99_ms)),
        ("edit → store, max", "ms", |m| Some(m.edit_max_ms)),
        ("apiserver CPU (user+sys)", "s", |m| m.apiserver_cpu_s),
        ("apiserver peak RSS", "MiB", |m| m.apiserver_peak_rss_mib),
        ("store peak RSS", "MiB", |m| m.store_peak_rss_mib),
    ];
    metrics
        .into_iter()
        .map(|(metric, unit, get)| {
            let (b, t) = (get(base), get(this));
            Row {
                metric,
                unit,
                base: b,
                this: t,
                ratio: b.zip(t).map(|(b, t)| t / b),
            }
        })
        .collect()
}

fn table(rows: &[Row], base: &str, this: &str) -> String {
    let num = |v: Option<f64>, digits: usize| match v {
        Some(v) if v.is_finite() => format!("{v:.digits$}"),
        _ => "-".to_owned(),
    };
    let mut out = format!(
        "{:<30} {:>5} {:>10} {:>10} {:>10}\n",
        "metric",
        "unit",
        base,
        this,
        format!("{this}/{base}")
    );
    for row in rows {
        let digits = if row.unit == "s" { 2 } else { 0 };
        let _ = writeln!(
            out,
            "{:<30} {:>5} {:>10} {:>10} {:>10}",
            row.metric,
            row.unit,
            num(row.base, digits),
            num(row.this, digits),
            num(row.ratio, 2)
        );
    }
    out
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let args = parse_args()?;
    let params = if args.quick {
        Params::quick()
    } else {
        Params::full()
    };
    eprintln!(
        "[bench] {} services × {} endpoints = {} pods on {} nodes, {} label sets, {} edits",
        params.services,
        params.endpoints_per_service,
        params.pods(),
        params.nodes,
        params.label_sets,
        params.edits
    );
    if let Some(dir) = args.generate {
        let bytes = generate(&params, &dir)?;
        eprintln!(
            "[bench] wrote {bytes} bytes of manifests into {}",
            dir.display()
        );
        return Ok(());
    }
    let bin = testkit::kvstore_bin()?;
    let apiserver = Path::new(APISERVER);
    let (base_name, base, ours) = match &args.baseline {
        Some(old) => {
            let embedded = || Backend::Embedded { bin: bin.clone() };
            let base = run_store("baseline", embedded(), &params, old).await?;
            let ours = run_store("this", embedded(), &params, apiserver).await?;
            ("baseline", base, ours)
        }
        None => {
            let ours = run_store("ours", Backend::Embedded { bin }, &params, apiserver).await?;
            let etcd = run_store("etcd", Backend::Etcd, &params, apiserver).await?;
            ("etcd", etcd, ours)
        }
    };
    let this_name = if args.baseline.is_some() {
        "this"
    } else {
        "ours"
    };
    let rows = rows(&base, &ours);
    println!(
        "\nclustermesh-apiserver publish ({}: {} services × {} endpoints, {} pods, {} nodes)\n",
        if args.quick { "quick" } else { "full" },
        params.services,
        params.endpoints_per_service,
        params.pods(),
        params.nodes
    );
    print!("{}", table(&rows, base_name, this_name));
    println!(
        "\nentries published: {:?}; manifests {:.1} MiB",
        ours.entries, ours.manifest_mib
    );
    if let Some(path) = args.json {
        let report = serde_json::json!({
            "bench": "clustermesh-apiserver publish",
            "mode": if args.quick { "quick" } else { "full" },
            "params": params,
            "columns": [base_name, this_name],
            "rows": rows,
            base_name: base,
            this_name: ours,
        });
        std::fs::write(&path, serde_json::to_string_pretty(&report)?)?;
        eprintln!("[bench] wrote {}", path.display());
    }
    Ok(())
}
