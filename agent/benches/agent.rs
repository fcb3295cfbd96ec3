//! Agent benchmarks.
//!
//! ```sh
//! cargo bench -p agent --bench agent -- [--clusters 250] [--nodes 100] [--identities 100] \
//!     [--endpoints 1000] [--services 10] [--samples 50] [--skip-e2e] [--json out.json]
//! ```
//!
//! Rows:
//! 1. in process: build every table from the peers' parts (default 250 clusters with 100
//!    nodes, 100 identities and 1000 endpoints each: 300k remote entries, plus 10 global
//!    services per cluster), the resident memory it takes, and the time of one incremental
//!    update;
//! 2. end to end: the `clustermesh-agent` binary reading the same 300k entries from
//!    kvstoremesh's cache in a real etcd (written as kvstoremesh writes them): time to all
//!    peers synced and every table built, the agent's resident memory, and a restart that
//!    serves the persisted tables;
//! 3. latency from a backend change in a peer's manifests (through its clustermesh-apiserver
//!    and etcd, read directly by the agent) to the agent's table, p50 and p99.

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use agent::policy::PolicyOptions;
use agent::state::{EntryChange, LocalPart, LocalService, MeshState, PeerPart};
use agent::tables::AffinityMode;
use common::{Agent, Peer, Svc, manifests, write_manifests};
use kvstore::client::{ClientConfig, Op, StoreClient};
use model::keys::cluster_config_key;
use model::{
    AddressKind, Backend, ClusterConfig, ClusterService, DnsLabel, DnsSubdomain, Entry, Identity,
    IpIdentity, IpPrefix, Kind, L4Port, Label, Node, NodeAddress, NumericIdentity, PortMap,
    Protocol, SchemaVersion, StoreValue, to_cache_key,
};
use testkit::{Backend as StoreBackend, StoreOptions, StoreProcess};

#[derive(Debug, Clone)]
struct Options {
    clusters: u16,
    nodes: u32,
    identities: u32,
    endpoints: u32,
    services: u32,
    samples: usize,
    skip_e2e: bool,
    json: Option<PathBuf>,
}

fn options() -> Options {
    let mut o = Options {
        clusters: 250,
        nodes: 100,
        identities: 100,
        endpoints: 1000,
        services: 10,
        samples: 50,
        skip_e2e: false,
        json: None,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < args.len() {
        let value = || args.get(i + 1).cloned().unwrap_or_default();
        match args[i].as_str() {
            "--clusters" => o.clusters = value().parse().expect("--clusters"),
            "--nodes" => o.nodes = value().parse().expect("--nodes"),
            "--identities" => o.identities = value().parse().expect("--identities"),
            "--endpoints" => o.endpoints = value().parse().expect("--endpoints"),
            "--services" => o.services = value().parse().expect("--services"),
            "--samples" => o.samples = value().parse().expect("--samples"),
            "--json" => o.json = Some(value().into()),
            "--skip-e2e" => {
                o.skip_e2e = true;
                i += 1;
                continue;
            }
            _ => {
                i += 1;
                continue;
            }
        }
        i += 2;
    }
    assert!(
        o.clusters <= 250,
        "at most 250 peer clusters (ids 1..=250; the local one is 251)"
    );
    assert!(o.nodes <= 250 && o.endpoints <= 250 * 250 && o.identities <= 65_000);
    o
}

/// One result line.
struct Row {
    name: String,
    value: f64,
    unit: &'static str,
    note: String,
}

fn row(rows: &mut Vec<Row>, name: &str, value: f64, unit: &'static str, note: String) {
    println!("{name:<48} {value:>12.1} {unit:<4} {note}");
    rows.push(Row {
        name: name.to_owned(),
        value,
        unit,
        note,
    });
}

/// VmRSS and VmHWM of a process, in MiB.
fn memory(pid: &str) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
            / 1024.0
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn http() -> PortMap {
    PortMap::from([(
        "http".to_owned(),
        L4Port {
            protocol: Protocol::Tcp,
            port: 8080,
        },
    )])
}

fn frontends(cluster: u16, s: u32) -> BTreeMap<IpAddr, PortMap> {
    BTreeMap::from([(
        IpAddr::V4(Ipv4Addr::new(10, 96, cluster as u8, s as u8)),
        PortMap::from([(
            "http".to_owned(),
            L4Port {
                protocol: Protocol::Tcp,
                port: 80,
            },
        )]),
    )])
}

fn pod_ip(cluster: u16, e: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(
        10,
        cluster as u8,
        (e / 250) as u8,
        (e % 250 + 1) as u8,
    ))
}

fn ready() -> Backend {
    Backend {
        ports: http(),
        ready: true,
        serving: true,
        terminating: false,
        zone: None,
        node_name: None,
        hostname: None,
    }
}

/// A peer's whole published state.
fn peer_entries(o: &Options, c: u16) -> (ClusterConfig, Vec<Entry>) {
    let config = common::cluster_config(&format!("c{c:03}"), c);
    let name = &config.name;
    let mut out = Vec::new();
    for n in 0..o.nodes {
        out.push(Entry::Node(Node {
            schema: SchemaVersion,
            name: DnsSubdomain::new(format!("node-{n}")).unwrap(),
            cluster: name.clone(),
            cluster_id: config.id,
            addresses: vec![NodeAddress {
                kind: AddressKind::InternalIp,
                ip: IpAddr::V4(Ipv4Addr::new(198, 18, c as u8, n as u8)),
            }],
            pod_cidrs: vec![
                IpPrefix::new(IpAddr::V4(Ipv4Addr::new(10, c as u8, n as u8, 0)), 24).unwrap(),
            ],
            labels: BTreeMap::new(),
        }));
    }
    let id = |i: u32| NumericIdentity::new((u32::from(c) << 16) | (256 + i)).unwrap();
    for i in 0..o.identities {
        out.push(Entry::Identity(Identity::new(
            id(i),
            [
                Label::new("k8s", "app", format!("app-{i}")).unwrap(),
                Label::new("k8s", "io.kubernetes.pod.namespace", "shop").unwrap(),
                Label::cluster(name),
            ],
        )));
    }
    for e in 0..o.endpoints {
        out.push(Entry::Ip(IpIdentity {
            schema: SchemaVersion,
            ip: IpPrefix::host(pod_ip(c, e)),
            identity: id(e % o.identities.max(1)),
            host_ip: Some(IpAddr::V4(Ipv4Addr::new(
                198,
                18,
                c as u8,
                (e % o.nodes.max(1)) as u8,
            ))),
            namespace: Some(DnsLabel::new("shop").unwrap()),
            pod_name: None,
            cluster: name.clone(),
        }));
    }
    for s in 0..o.services {
        out.push(Entry::Service(service(
            &config,
            s,
            &[s * 4, s * 4 + 1, s * 4 + 2, s * 4 + 3],
        )));
    }
    (config, out)
}

fn service(config: &ClusterConfig, s: u32, pods: &[u32]) -> ClusterService {
    ClusterService {
        schema: SchemaVersion,
        cluster: config.name.clone(),
        cluster_id: config.id,
        namespace: DnsLabel::new("shop").unwrap(),
        name: DnsLabel::new(format!("svc-{s}")).unwrap(),
        frontends: frontends(config.id.get(), s),
        backends: pods
            .iter()
            .map(|e| (pod_ip(config.id.get(), *e), ready()))
            .collect(),
        shared: true,
        include_external: true,
        labels: BTreeMap::new(),
        selector: BTreeMap::new(),
    }
}

fn local_config() -> ClusterConfig {
    common::cluster_config("local", 251)
}

/// The local cluster runs the same global services, two backends each.
fn local_part(o: &Options) -> LocalPart {
    let config = local_config();
    let mut part = LocalPart::default();
    for s in 0..o.services {
        part.services.insert(LocalService {
            service: service(&config, s, &[s * 2, s * 2 + 1]),
            global: true,
            affinity: AffinityMode::None,
        });
    }
    part
}

fn in_process(o: &Options, rows: &mut Vec<Row>) {
    let (rss0, _) = memory("self");
    let mut peers = Vec::new();
    let mut total = 0usize;
    for c in 1..=o.clusters {
        let (config, entries) = peer_entries(o, c);
        total += entries.len();
        let mut part = PeerPart::default();
        for e in entries {
            part.upsert(e);
        }
        peers.push((config.name, part));
    }
    let (rss1, _) = memory("self");
    let start = Instant::now();
    let mut state = MeshState::new(local_config().name, PolicyOptions::default());
    state.set_local(local_part(o));
    for (name, part) in peers {
        state.replace_peer(&name, part);
    }
    let changes = state.refresh().len();
    let build = start.elapsed();
    let (rss2, _) = memory("self");
    let counts = state.tables().counts();
    row(
        rows,
        "in-process: build tables",
        ms(build),
        "ms",
        format!(
            "{total} remote entries ({} clusters × ({} nodes + {} identities + {} endpoints + {} services)); {} changes; tables: {} frontends/{} backends, {} ipcache, {} routes",
            o.clusters,
            o.nodes,
            o.identities,
            o.endpoints,
            o.services,
            changes,
            counts.services,
            counts.backends,
            counts.ipcache,
            counts.routes
        ),
    );
    row(
        rows,
        "in-process: resident memory, parts",
        rss1 - rss0,
        "MiB",
        "decoded peer parts".into(),
    );
    row(
        rows,
        "in-process: resident memory, + tables",
        rss2 - rss1,
        "MiB",
        "indexes and tables built from them".into(),
    );
    // One backend change of one peer's service, applied and refreshed.
    let mut samples = Vec::new();
    for k in 0..200u32 {
        let c = (k % u32::from(o.clusters)) as u16 + 1;
        let config = common::cluster_config(&format!("c{c:03}"), c);
        let svc = service(&config, k % o.services.max(1), &[k % 7, 100 + k % 5]);
        let start = Instant::now();
        state.apply_peer_change(
            &config.name,
            EntryChange::Upsert {
                raw: svc.encode(),
                entry: Entry::Service(svc),
            },
        );
        let changes = state.refresh();
        samples.push(start.elapsed());
        assert!(!changes.is_empty());
    }
    samples.sort();
    row(
        rows,
        "in-process: one backend change, p50",
        percentile(&samples, 0.5).as_secs_f64() * 1e6,
        "µs",
        "apply + refresh of one peer's service update".into(),
    );
    row(
        rows,
        "in-process: one backend change, p99",
        percentile(&samples, 0.99).as_secs_f64() * 1e6,
        "µs",
        String::new(),
    );
}

async fn e2e_cache(o: &Options, rows: &mut Vec<Row>) {
    let work = tempfile::tempdir().unwrap();
    let store = StoreProcess::start(StoreBackend::Etcd, StoreOptions::default())
        .await
        .expect("start etcd");
    let mut client_config = ClientConfig::new([store.endpoint()]);
    client_config.request_timeout = Duration::from_secs(60);
    let client = StoreClient::connect(&client_config).await.unwrap();
    let raw = client.raw();
    // Write what kvstoremesh would: config, entries, canaries, status, heartbeat.
    let start = Instant::now();
    let mut total = 0usize;
    for c in 1..=o.clusters {
        let (config, entries) = peer_entries(o, c);
        total += entries.len();
        let mut ops: Vec<Op<Vec<u8>>> =
            vec![Op::put(cluster_config_key(&config.name), config.encode())];
        for e in &entries {
            ops.push(Op::put(
                to_cache_key(&e.key(), &config.name).unwrap(),
                e.encode(),
            ));
        }
        for kind in Kind::CORE {
            ops.push(Op::put(
                kind.cache_canary_key(&config.name),
                b"2026-01-01T00:00:00Z".to_vec(),
            ));
        }
        ops.push(Op::put(
            model::keys::peer_status_key(&config.name),
            serde_json::to_vec(&serde_json::json!({"schema": 1, "peer": config.name.as_str(), "connected": true, "synced": true})).unwrap(),
        ));
        ops.push(Op::put(
            model::keys::heartbeat_cache_key(&config.name),
            b"1".to_vec(),
        ));
        raw.apply_batch(ops).await.expect("write the cache");
    }
    let load = start.elapsed();
    println!(
        "(loaded {total} entries of {} peers into etcd in {:.1} s)",
        o.clusters,
        load.as_secs_f64()
    );
    let local_dir = work.path().join("local");
    std::fs::create_dir_all(&local_dir).unwrap();
    // The local cluster runs the same global services.
    let local_services: Vec<Svc> = (0..o.services)
        .map(|s| {
            let name: &'static str = Box::leak(format!("svc-{s}").into_boxed_str());
            Svc::new("shop", name).global().ready(&[1, 2])
        })
        .collect();
    write_manifests(&local_dir, &manifests("local", 251, &local_services));
    let expected_ips = o.clusters as usize * o.endpoints as usize;
    let args = [
        "--store-endpoints".to_owned(),
        store.endpoint(),
        "--heartbeat-timeout".into(),
        "10m".into(),
    ];
    let start = Instant::now();
    let mut agent = Agent::start(&local_config(), &local_dir, work.path(), &args).await;
    let synced = |s: &agent::api::AgentStatus| {
        s.peers.len() == o.clusters as usize
            && s.peers
                .values()
                .all(|p| p.phase == agent::remote::Phase::Synced && !p.restored)
            && s.counts.ipcache >= expected_ips
    };
    let status = common::wait_until("every peer synced", || async {
        agent.status().await.filter(synced)
    })
    .await;
    let sync = start.elapsed();
    let pid = agent.pid().unwrap().to_string();
    let (rss, hwm) = memory(&pid);
    row(
        rows,
        "agent binary: start to all peers synced",
        ms(sync),
        "ms",
        format!(
            "{total} entries from kvstoremesh's cache in etcd; {} ipcache, {} routes, {} backends",
            status.counts.ipcache, status.counts.routes, status.counts.backends
        ),
    );
    row(
        rows,
        "agent binary: resident memory (VmRSS)",
        rss,
        "MiB",
        "after sync".into(),
    );
    row(
        rows,
        "agent binary: peak resident memory (VmHWM)",
        hwm,
        "MiB",
        String::new(),
    );
    // Restart: the persisted tables are served before anything is read.
    let before = agent.status().await.unwrap().counts;
    let start = Instant::now();
    agent.restart().await;
    let restored = common::wait_until("restored tables", || async {
        agent
            .status()
            .await
            .filter(|s| s.counts.ipcache >= expected_ips)
    })
    .await;
    let serve = start.elapsed();
    assert_eq!(restored.counts.routes, before.routes);
    common::wait_until("every peer resynced", || async {
        agent.status().await.filter(synced)
    })
    .await;
    let resync = start.elapsed();
    let size = std::fs::metadata(work.path().join("state.json"))
        .map(|m| m.len())
        .unwrap_or(0);
    row(
        rows,
        "agent binary: restart to restored tables served",
        ms(serve),
        "ms",
        format!(
            "from a {:.1} MiB state file, before any peer resynced",
            size as f64 / 1048576.0
        ),
    );
    row(
        rows,
        "agent binary: restart to all peers resynced",
        ms(resync),
        "ms",
        String::new(),
    );
    drop(agent);
}

async fn latency(o: &Options, rows: &mut Vec<Row>) {
    let work = tempfile::tempdir().unwrap();
    let web = |extra: Option<u8>| {
        let mut ready = vec![1, 2, 3];
        ready.extend(extra);
        vec![Svc::new("shop", "web").global().ready(&ready)]
    };
    let b = Peer::start("b", 2, &web(None)).await;
    let local_dir = work.path().join("a");
    std::fs::create_dir_all(&local_dir).unwrap();
    write_manifests(
        &local_dir,
        &manifests("a", 1, &[Svc::new("shop", "web").global().ready(&[1])]),
    );
    let peers = common::peers_dir(work.path(), &[&b]);
    let agent = Agent::start(
        &common::cluster_config("a", 1),
        &local_dir,
        work.path(),
        &["--peers-dir".into(), peers.to_str().unwrap().into()],
    )
    .await;
    agent
        .wait_for("b synced", |v| {
            v.peer_synced("b") && v.backends("shop/web").len() == 4
        })
        .await;
    let mut samples = Vec::new();
    for k in 0..o.samples {
        let octet = 10 + (k % 200) as u8;
        let ip = common::backend_ip(2, 0, octet);
        let start = Instant::now();
        b.set_services(&web(Some(octet)));
        loop {
            let found = agent.services().await.is_some_and(|list| {
                list.iter()
                    .flat_map(|s| s.backends.iter())
                    .any(|b| b.ip.to_string() == ip)
            });
            if found {
                break;
            }
            assert!(
                start.elapsed() < common::TIMEOUT,
                "backend {ip} never arrived"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        samples.push(start.elapsed());
    }
    samples.sort();
    let note = format!(
        "{} samples: manifest write → apiserver → etcd → agent (direct) → table; max {:.1} ms",
        samples.len(),
        ms(*samples.last().unwrap_or(&Duration::ZERO))
    );
    row(
        rows,
        "latency: peer backend change to table, p50",
        ms(percentile(&samples, 0.5)),
        "ms",
        note,
    );
    row(
        rows,
        "latency: peer backend change to table, p99",
        ms(percentile(&samples, 0.99)),
        "ms",
        String::new(),
    );
}

fn main() {
    let o = options();
    let mut rows = Vec::new();
    println!("{:<48} {:>12} {:<4} note", "row", "value", "unit");
    in_process(&o, &mut rows);
    if !o.skip_e2e {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            e2e_cache(&o, &mut rows).await;
            latency(&o, &mut rows).await;
        });
    }
    if let Some(path) = &o.json {
        let json: Vec<serde_json::Value> = rows
            .iter()
            .map(|r| serde_json::json!({"name": r.name, "value": r.value, "unit": r.unit, "note": r.note}))
            .collect();
        std::fs::write(path, serde_json::to_vec_pretty(&json).unwrap()).unwrap();
    }
}
