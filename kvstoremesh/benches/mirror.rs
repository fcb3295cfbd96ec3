//! kvstoremesh benchmark: a peer store and a local store as real processes (etcd by default,
//! or our `kvstore serve`), kvstoremesh in this process.
//!
//! ```sh
//! cargo bench -p kvstoremesh --bench mirror -- [--entries 300000] [--events 50000] \
//!     [--backend etcd|embedded] [--kvstore-bin target/release/kvstore] [--json out.json]
//! ```
//!
//! Measures the time to the first full sync of a peer with `--entries` entries, the time to
//! resync after a kvstoremesh restart (cache already in place), how many events per second
//! are mirrored from one peer, and the latency of single changes.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use futures::{StreamExt, TryStreamExt};
use kvstore::client::{ClientConfig, Op, StoreClient, WatchEvent};
use kvstoremesh::{MeshConfig, Timing};
use model::{
    Capabilities, ClusterConfig, ClusterId, ClusterName, Kind, MaxConnectedClusters, StoreValue,
};
use serde::Serialize;
use testkit::{Backend, StoreOptions, StoreProcess};
use tokio_util::sync::CancellationToken;

#[derive(Parser, Debug)]
#[command(name = "mirror", about = "kvstoremesh benchmark")]
struct Args {
    /// Entries the peer publishes before kvstoremesh starts.
    #[arg(long, default_value_t = 300_000)]
    entries: usize,
    /// Changes written to the peer for the events/s measurement.
    #[arg(long, default_value_t = 50_000)]
    events: usize,
    /// Single changes timed one by one.
    #[arg(long, default_value_t = 200)]
    latency_samples: usize,
    /// Which store runs the peer and the local cluster.
    #[arg(long, value_enum, default_value = "etcd")]
    backend: Which,
    /// The kvstore binary for `--backend embedded`.
    #[arg(long, default_value = "target/release/kvstore")]
    kvstore_bin: PathBuf,
    /// Also write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Which {
    Etcd,
    Embedded,
}

#[derive(Debug, Serialize)]
struct Results {
    backend: &'static str,
    entries: usize,
    first_sync_seconds: f64,
    first_sync_entries_per_second: f64,
    resync_after_restart_seconds: f64,
    events: usize,
    peer_write_seconds: f64,
    mirrored_events_per_second: f64,
    mirror_lag_after_last_write_ms: f64,
    latency_samples: usize,
    latency_p50_ms: f64,
    latency_p90_ms: f64,
    latency_p99_ms: f64,
    latency_max_ms: f64,
}

fn cluster(name: &str, id: u16) -> ClusterConfig {
    let max = MaxConnectedClusters::Max255;
    ClusterConfig::new(
        ClusterName::new(name).unwrap(),
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

/// A realistic mix: mostly ip→identity entries, then services, identities and nodes.
fn entries(n: usize) -> Vec<(String, Vec<u8>)> {
    let identities = (n / 6).min(65_000);
    let nodes = (n / 30).max(1);
    let services = n * 2 / 15;
    let ips = n.saturating_sub(identities + nodes + services);
    let mut out = Vec::with_capacity(n);
    for i in 0..identities {
        let id = (2u32 << 16) | (256 + i as u32);
        out.push((
            format!("cilium/state/identities/v1/id/{id}"),
            serde_json::to_vec(&serde_json::json!({
                "schema": 1, "id": id,
                "labels": [format!("k8s:app=app-{i}"), "k8s:io.cilium.k8s.policy.cluster=b", "k8s:io.kubernetes.pod.namespace=bench"],
            }))
            .unwrap(),
        ));
    }
    for i in 0..nodes {
        out.push((
            format!("cilium/state/nodes/v1/b/node-{i}"),
            serde_json::to_vec(&serde_json::json!({
                "schema": 1, "name": format!("node-{i}"), "cluster": "b", "cluster_id": 2,
                "addresses": [{"kind": "InternalIP", "ip": format!("192.168.{}.{}", i / 250, i % 250 + 1)}],
                "pod_cidrs": [format!("10.{}.{}.0/24", 100 + i / 250, i % 250)],
                "labels": {"topology.kubernetes.io/zone": "z1"},
            }))
            .unwrap(),
        ));
    }
    for i in 0..services {
        out.push(service(i, 80));
    }
    for i in 0..ips {
        out.push(ip(i, 0));
    }
    out
}

fn service(i: usize, port: u16) -> (String, Vec<u8>) {
    (
        format!("cilium/state/services/v1/b/ns-{}/svc-{i}", i % 100),
        serde_json::to_vec(&serde_json::json!({
            "schema": 1, "cluster": "b", "cluster_id": 2, "namespace": format!("ns-{}", i % 100),
            "name": format!("svc-{i}"),
            "frontends": {format!("10.96.{}.{}", i / 250 % 250, i % 250 + 1): {"http": {"protocol": "TCP", "port": port}}},
            "backends": {"10.2.0.1": {"ports": {"http": {"protocol": "TCP", "port": 8080}}, "ready": true, "serving": true, "terminating": false}},
            "shared": true, "include_external": true, "labels": {}, "selector": {"app": "x"},
        }))
        .unwrap(),
    )
}

fn ip(i: usize, generation: u32) -> (String, Vec<u8>) {
    let address = format!("10.{}.{}.{}", 2 + i / 62_500, i / 250 % 250, i % 250 + 1);
    (
        format!("cilium/state/ip/v1/default/{address}"),
        serde_json::to_vec(&serde_json::json!({
            "schema": 1, "ip": address, "identity": (2u32 << 16) | (256 + (i as u32 + generation) % 60_000),
            "host_ip": "192.168.0.1", "namespace": "bench", "pod_name": format!("pod-{i}"), "cluster": "b",
        }))
        .unwrap(),
    )
}

async fn connect(endpoint: &str) -> anyhow::Result<StoreClient> {
    let mut config = ClientConfig::new([endpoint]);
    config.request_timeout = Duration::from_secs(30);
    Ok(StoreClient::connect(&config).await?)
}

/// Writes entries in concurrent batches.
async fn write_all(client: &StoreClient, entries: Vec<(String, Vec<u8>)>) -> anyhow::Result<()> {
    let chunks: Vec<Vec<Op<Vec<u8>>>> = entries
        .chunks(1024)
        .map(|c| {
            c.iter()
                .map(|(k, v)| Op::put(k.clone(), v.clone()))
                .collect()
        })
        .collect();
    futures::stream::iter(chunks.into_iter().map(|ops| {
        let client = client.clone();
        async move { client.raw().apply_batch(ops).await }
    }))
    .buffer_unordered(8)
    .try_collect::<Vec<_>>()
    .await?;
    Ok(())
}

fn timing() -> Timing {
    Timing {
        first_sync_timeout: Duration::from_secs(600),
        peer_request_timeout: Duration::from_secs(30),
        ..Timing::default()
    }
}

async fn start_mesh(
    dir: &std::path::Path,
    local: &str,
    cancel: &CancellationToken,
) -> anyhow::Result<kvstoremesh::Running> {
    let config = MeshConfig {
        local: cluster("a", 1),
        store: ClientConfig::new([local]),
        peers_dir: dir.to_path_buf(),
        health_listen: None,
        timing: timing(),
    };
    Ok(kvstoremesh::start(config, cancel.clone()).await?)
}

async fn wait_synced(running: &kvstoremesh::Running) -> anyhow::Result<Duration> {
    let started = Instant::now();
    loop {
        let status = running.status();
        if let Some(peer) = status.peers.get("b") {
            if peer.synced && peer.connected {
                return Ok(started.elapsed());
            }
            if peer.refused {
                bail!("peer refused: {:?}", peer.last_error);
            }
        }
        if started.elapsed() > Duration::from_secs(900) {
            bail!("no sync after 15 minutes: {status:?}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init();
    }
    let backend = match args.backend {
        Which::Etcd => Backend::Etcd,
        Which::Embedded => {
            let mut bin = args.kvstore_bin.clone();
            if bin.is_relative() && !bin.exists() {
                bin = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                    .join("..")
                    .join(&bin);
            }
            if !bin.exists() {
                bail!(
                    "{} not found: cargo build --release -p kvstore",
                    bin.display()
                );
            }
            Backend::Embedded { bin }
        }
    };
    eprintln!(
        "[bench] starting the local and the peer store ({})",
        backend.name()
    );
    let local = StoreProcess::start(backend.clone(), StoreOptions::default()).await?;
    let peer = StoreProcess::start(backend.clone(), StoreOptions::default()).await?;
    let peer_client = connect(&peer.endpoint()).await?;
    let local_client = connect(&local.endpoint()).await?;

    let b = cluster("b", 2);
    let published = entries(args.entries);
    eprintln!(
        "[bench] publishing {} entries into the peer",
        published.len()
    );
    let t = Instant::now();
    peer_client.raw().put(&b.key(), &b.encode(), None).await?;
    write_all(&peer_client, published).await?;
    for kind in Kind::CORE {
        peer_client
            .raw()
            .put(&kind.state_canary_key(&b.name), &b"now".to_vec(), None)
            .await?;
    }
    eprintln!("[bench] published in {:?}", t.elapsed());

    let dir = tempfile::tempdir()?;
    std::fs::write(
        dir.path().join("b"),
        format!("endpoints: [\"{}\"]\n", peer.endpoint()),
    )?;
    let cancel = CancellationToken::new();
    let running = start_mesh(dir.path(), &local.endpoint(), &cancel).await?;
    let first_sync = wait_synced(&running).await?;
    eprintln!("[bench] first sync: {first_sync:?}");
    let mut cached = 0usize;
    for kind in Kind::ALL {
        cached += local_client
            .raw()
            .list_prefix(&kind.cache_prefix(&b.name))
            .await?
            .entries
            .len();
    }
    if cached != args.entries {
        bail!(
            "the cache holds {cached} entries, the peer {}",
            args.entries
        );
    }

    // Restart: the cache is in place, so the resync writes nothing but the canaries.
    cancel.cancel();
    running.wait().await?;
    let cancel = CancellationToken::new();
    let running = start_mesh(dir.path(), &local.endpoint(), &cancel).await?;
    let resync = wait_synced(&running).await?;
    eprintln!("[bench] resync after restart: {resync:?}");

    // Events per second: rewrite `events` ip entries as fast as the peer takes them and
    // count the cache's events until the last one arrived.
    let ip_kind_prefix = Kind::Ip.cache_prefix(&b.name);
    let mut watch = local_client.raw().watch_prefix(&ip_kind_prefix, 0).await?;
    let ips = args.entries.saturating_sub(
        (args.entries / 6).min(65_000) + (args.entries / 30).max(1) + args.entries * 2 / 15,
    );
    // Each key once: concurrent batches do not order writes to one key.
    let events = args.events.min(ips);
    let changes: Vec<_> = (0..events).map(|i| ip(i, 1)).collect();
    let target: BTreeMap<String, Vec<u8>> = changes.iter().cloned().collect();
    eprintln!("[bench] writing {} changes into the peer", changes.len());
    let started = Instant::now();
    let writer = {
        let client = peer_client.clone();
        tokio::spawn(async move {
            write_all(&client, changes).await?;
            anyhow::Ok(Instant::now())
        })
    };
    let mut seen = 0usize;
    let mut matched = 0usize;
    while matched < target.len() {
        let event = tokio::time::timeout(Duration::from_secs(300), watch.next())
            .await
            .context("no cache event for 5 minutes")?;
        match event {
            Some(WatchEvent::Put { key, value, .. }) => {
                seen += 1;
                let key = key.replace(&ip_kind_prefix, "cilium/state/ip/v1/default/");
                if target.get(&key) == Some(&value) {
                    matched += 1;
                }
            }
            Some(_) => {}
            None => bail!("the local watch ended"),
        }
    }
    let mirrored = started.elapsed();
    let written = writer.await??.duration_since(started);
    let events_per_second = events as f64 / mirrored.as_secs_f64();
    eprintln!("[bench] {seen} cache events in {mirrored:?} (writes took {written:?})");

    // Latency of single changes.
    let mut latencies = Vec::with_capacity(args.latency_samples);
    for i in 0..args.latency_samples {
        let (key, value) = service(i, 10_000 + i as u16);
        let cache_key = key.replace(
            "cilium/state/services/v1/b/",
            &Kind::Services.cache_prefix(&b.name),
        );
        let mut events = local_client.raw().watch_prefix(&cache_key, 0).await?;
        let t = Instant::now();
        peer_client.raw().put(&key, &value, None).await?;
        loop {
            match tokio::time::timeout(Duration::from_secs(60), events.next()).await? {
                Some(WatchEvent::Put { key, .. }) if key == cache_key => break,
                Some(_) => {}
                None => bail!("latency watch ended"),
            }
        }
        latencies.push(t.elapsed());
    }
    latencies.sort();
    let pct = |p: f64| ms(latencies[((latencies.len() as f64 - 1.0) * p).round() as usize]);
    cancel.cancel();
    running.wait().await?;

    let results = Results {
        backend: backend.name(),
        entries: args.entries,
        first_sync_seconds: first_sync.as_secs_f64(),
        first_sync_entries_per_second: args.entries as f64 / first_sync.as_secs_f64(),
        resync_after_restart_seconds: resync.as_secs_f64(),
        events,
        peer_write_seconds: written.as_secs_f64(),
        mirrored_events_per_second: events_per_second,
        mirror_lag_after_last_write_ms: ms(mirrored.saturating_sub(written)),
        latency_samples: latencies.len(),
        latency_p50_ms: pct(0.5),
        latency_p90_ms: pct(0.9),
        latency_p99_ms: pct(0.99),
        latency_max_ms: pct(1.0),
    };
    println!("kvstoremesh mirror benchmark ({} stores)", results.backend);
    println!("{:<44} {:>14}", "measure", "value");
    let rows = [
        (
            format!("first sync of {} entries", results.entries),
            format!("{:.2} s", results.first_sync_seconds),
        ),
        (
            "  entries/s".to_owned(),
            format!("{:.0}", results.first_sync_entries_per_second),
        ),
        (
            "resync after restart (cache in place)".to_owned(),
            format!("{:.2} s", results.resync_after_restart_seconds),
        ),
        (
            format!("{} changes written into the peer", results.events),
            format!("{:.2} s", results.peer_write_seconds),
        ),
        (
            "mirrored events/s (one peer)".to_owned(),
            format!("{:.0}", results.mirrored_events_per_second),
        ),
        (
            "cache lag after the last write".to_owned(),
            format!("{:.1} ms", results.mirror_lag_after_last_write_ms),
        ),
        (
            format!("single change latency p50 (n={})", results.latency_samples),
            format!("{:.2} ms", results.latency_p50_ms),
        ),
        (
            "single change latency p90".to_owned(),
            format!("{:.2} ms", results.latency_p90_ms),
        ),
        (
            "single change latency p99".to_owned(),
            format!("{:.2} ms", results.latency_p99_ms),
        ),
        (
            "single change latency max".to_owned(),
            format!("{:.2} ms", results.latency_max_ms),
        ),
    ];
    for (what, value) in rows {
        println!("{what:<44} {value:>14}");
    }
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&results)? + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("[bench] results written to {}", path.display());
    }
    Ok(())
}
