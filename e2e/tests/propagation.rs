//! Propagation latency, a measurement rather than a check (`#[ignore]`; run it with
//! `cargo test -p mesh-e2e --test propagation -- --ignored --nocapture` as root): 100 backend
//! changes in cluster b (`dev apply` scaling b's echo Deployment between 1 and 2 replicas),
//! each timed from the moment b's manifests file was written (its mtime) to the moment the
//! agent of a's node lists the new number of b backends in its `/v1/services`. The path
//! crossed: b's apiserver (manifest watch and debounce) → b's store → a's kvstoremesh (TLS) →
//! a's store → a's agent. Prints p50 / p90 / p99 / max.

use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime};

use mesh_devenv::sys::http_get;
use mesh_e2e::{DevEnv, wait_for};
use testkit::sandbox::is_root;

const CHANGES: usize = 100;

fn app(replicas: usize) -> String {
    format!(
        "
apiVersion: apps/v1
kind: Deployment
metadata: {{name: echo, namespace: shop}}
spec:
  replicas: {replicas}
  template:
    metadata: {{labels: {{app: echo}}}}
    spec:
      containers:
      - name: echo
        ports: [{{name: http, containerPort: 8080}}]
---
apiVersion: v1
kind: Service
metadata:
  name: echo
  namespace: shop
  annotations: {{service.cilium.io/global: 'true'}}
spec:
  selector: {{app: echo}}
  ports:
  - {{name: http, port: 80, targetPort: http}}
"
    )
}

/// How many of cluster b's backends the agent at `api` lists (one service, one port).
fn b_backends(api: SocketAddr) -> Result<usize, String> {
    let (code, body) = http_get(api, "/v1/services", Duration::from_secs(1))?;
    if code != 200 {
        return Err(format!("{code}: {body}"));
    }
    Ok(body.matches(r#""cluster":"b""#).count())
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
    env.apply("a", &app(1)).unwrap();
    env.apply("b", &app(1)).unwrap();
    let state = env.state().unwrap();
    let api = state.cluster("a").unwrap().nodes[0].agent_api;
    let manifests = env
        .home()
        .env_dir(env.name())
        .join("clusters/b/manifests/cluster.yaml");
    wait_for(Duration::from_secs(60), || match b_backends(api)? {
        1 => Ok(()),
        n => Err(format!("{n} backends of b")),
    })
    .unwrap();

    let mut samples = Vec::with_capacity(CHANGES);
    for i in 0..CHANGES {
        let replicas = if i % 2 == 0 { 2 } else { 1 };
        let seen = std::thread::scope(|s| {
            // Polled every 2 ms (wait_for's 200 ms would be the resolution of the figures).
            let watcher = s.spawn(|| {
                let deadline = Instant::now() + Duration::from_secs(30);
                loop {
                    match b_backends(api) {
                        Ok(n) if n == replicas => return Ok(SystemTime::now()),
                        Ok(n) if Instant::now() >= deadline => {
                            return Err(format!("change {i}: {n} backends of b, not {replicas}"));
                        }
                        Err(e) if Instant::now() >= deadline => return Err(e),
                        _ => std::thread::sleep(Duration::from_millis(2)),
                    }
                }
            });
            env.apply("b", &app(replicas)).unwrap();
            watcher.join().unwrap()
        })
        .unwrap();
        let written = std::fs::metadata(&manifests).unwrap().modified().unwrap();
        let latency = seen
            .duration_since(written)
            .unwrap_or_else(|_| panic!("change {i}: seen before b's manifests were last written"));
        samples.push(latency);
    }
    samples.sort();
    eprintln!(
        "propagation over {CHANGES} changes (b's manifests written → a's agent API): \
         p50 {:?}, p90 {:?}, p99 {:?}, max {:?}, min {:?}",
        percentile(&samples, 50),
        percentile(&samples, 90),
        percentile(&samples, 99),
        samples[samples.len() - 1],
        samples[0]
    );
    env.down().unwrap();
}
