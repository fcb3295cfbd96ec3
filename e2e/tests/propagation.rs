//! Propagation latency, a measurement rather than a check (`#[ignore]`; run it with
//! `cargo test -p mesh-e2e --test propagation -- --ignored --nocapture` as root): 100 backend
//! changes in cluster b (`dev apply` scaling b's echo Deployment between 1 and 2 replicas),
//! each timed from the moment b's manifests file was written (its mtime) to the moment a's
//! node has the new number of b backends, seen two ways at once: in its agent's
//! `/v1/services`, and in the service map the load balancer reads (`mesh_svc4`, read from the
//! agent's pins). The path crossed: b's apiserver (manifest watch and its 25 ms debounce) →
//! b's store → a's kvstoremesh (TLS) → a's store → a's agent → the kernel map. Prints
//! p50 / p90 / p99 / max of both.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use bpf::{Frontend4, PinnedServices};
use mesh_devenv::sys::http_get;
use mesh_e2e::{DevEnv, app, wait_for};
use model::IpPrefix;
use testkit::sandbox::is_root;

const CHANGES: usize = 100;

/// How many of cluster b's backends the agent at `api` lists (one service, one port).
fn b_backends(api: SocketAddr) -> Result<usize, String> {
    let (code, body) = http_get(api, "/v1/services", Duration::from_secs(1))?;
    if code != 200 {
        return Err(format!("{code}: {body}"));
    }
    Ok(body.matches(r#""cluster":"b""#).count())
}

/// How many of cluster b's backends the map pinned under `pins` holds for `frontend`.
fn b_backends_in_map(
    pins: &Path,
    frontend: Frontend4,
    b_pods: &[IpPrefix],
) -> Result<usize, String> {
    let map = PinnedServices::open(pins).map_err(|e| e.to_string())?;
    let backends = map.backends(frontend).map_err(|e| e.to_string())?;
    Ok(backends
        .unwrap_or_default()
        .iter()
        .filter(|(ip, _)| b_pods.iter().any(|c| c.contains(IpAddr::V4(*ip))))
        .count())
}

/// Polls `count` every millisecond until it returns `want`, then says when.
fn seen(want: usize, count: impl Fn() -> Result<usize, String>) -> Result<SystemTime, String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match count() {
            Ok(n) if n == want => return Ok(SystemTime::now()),
            Ok(n) if Instant::now() >= deadline => {
                return Err(format!("{n} backends of b, not {want}"));
            }
            Err(e) if Instant::now() >= deadline => return Err(e),
            _ => std::thread::sleep(Duration::from_millis(1)),
        }
    }
}

fn report(what: &str, samples: &mut [Duration]) {
    samples.sort();
    eprintln!(
        "propagation over {CHANGES} changes (b's manifests written → {what}): \
         p50 {:?}, p90 {:?}, p99 {:?}, max {:?}, min {:?}",
        percentile(samples, 50),
        percentile(samples, 90),
        percentile(samples, 99),
        samples[samples.len() - 1],
        samples[0]
    );
}

fn percentile(sorted: &[Duration], p: usize) -> Duration {
    sorted[(sorted.len() * p / 100).min(sorted.len() - 1)]
}

#[test]
#[ignore = "a measurement: run with --ignored --nocapture (root)"]
fn backend_change_in_b_to_agent_of_a() {
    assert!(is_root(), "needs root (network namespaces, cgroups, eBPF)");
    let mut env =
        DevEnv::up_on_underlay("two-clusters.yaml", "10.245.0.0/16", &["--connect"]).unwrap();
    env.apply("a", &app::global_echo(1)).unwrap();
    env.apply("b", &app::global_echo(1)).unwrap();
    let state = env.state().unwrap();
    let node = &state.cluster("a").unwrap().nodes[0];
    let api = node.agent_api;
    let pins = Path::new("/sys/fs/bpf").join(&node.bpf_root);
    let frontend = Frontend4 {
        ip: state.cluster("a").unwrap().cluster_ips["shop/echo"],
        port: 80,
        proto: 6,
    };
    let b_pods: Vec<IpPrefix> = state
        .cluster("b")
        .unwrap()
        .nodes
        .iter()
        .map(|n| n.pod_cidr)
        .collect();
    let manifests = env
        .home()
        .env_dir(env.name())
        .join("clusters/b/manifests/cluster.yaml");
    wait_for(Duration::from_secs(60), || {
        match b_backends_in_map(&pins, frontend, &b_pods)? {
            1 => Ok(()),
            n => Err(format!("{n} backends of b in the map")),
        }
    })
    .unwrap();

    let mut to_api = Vec::with_capacity(CHANGES);
    let mut to_map = Vec::with_capacity(CHANGES);
    for i in 0..CHANGES {
        let replicas = if i % 2 == 0 { 2 } else { 1 };
        let (api_seen, map_seen) = std::thread::scope(|s| {
            let by_api = s.spawn(|| seen(replicas, || b_backends(api)));
            let by_map = s.spawn(|| seen(replicas, || b_backends_in_map(&pins, frontend, &b_pods)));
            env.apply("b", &app::global_echo(replicas)).unwrap();
            (by_api.join().unwrap(), by_map.join().unwrap())
        });
        let written = std::fs::metadata(&manifests).unwrap().modified().unwrap();
        for (seen, samples) in [(api_seen, &mut to_api), (map_seen, &mut to_map)] {
            let seen = seen.unwrap_or_else(|e| panic!("change {i}: {e}"));
            samples.push(seen.duration_since(written).unwrap_or_else(|_| {
                panic!("change {i}: seen before b's manifests were last written")
            }));
        }
    }
    report("a's agent API", &mut to_api);
    report("a's BPF service map", &mut to_map);
    env.down().unwrap();
}
