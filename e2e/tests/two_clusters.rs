//! Two clusters from `kind-configs/two-clusters.yaml` (on an underlay of its own), brought up
//! with `clustermesh dev up --connect`: pod-to-pod traffic across the clusters over TCP and
//! UDP, and a global service with a backend in each cluster answering from both. Root only; `dev down` runs even when
//! the scenario fails and must leave nothing behind.

use std::time::{Duration, Instant};

use mesh_e2e::{DevEnv, answers_per_cluster, wait_for};
use testkit::sandbox::is_root;

/// Each cluster runs one echo backend (TCP 8080, UDP 5353) behind the global `echo` service
/// (TCP 80, UDP 53), and a client pod.
const APP: &str = "
apiVersion: apps/v1
kind: Deployment
metadata: {name: echo, namespace: shop}
spec:
  replicas: 1
  template:
    metadata: {labels: {app: echo}}
    spec:
      containers:
      - name: echo
        ports: [{name: http, containerPort: 8080}, {name: dns, containerPort: 5353, protocol: UDP}]
---
apiVersion: v1
kind: Service
metadata:
  name: echo
  namespace: shop
  annotations: {service.cilium.io/global: 'true'}
spec:
  selector: {app: echo}
  ports:
  - {name: http, port: 80, targetPort: http}
  - {name: dns, port: 53, protocol: UDP, targetPort: dns}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: shop, labels: {app: client}}
spec: {containers: [{name: client}]}
";

const CONVERGE: Duration = Duration::from_secs(60);

#[test]
fn pod_to_pod_and_a_global_service_across_two_clusters() {
    if !is_root() {
        eprintln!("skipped: needs root (network namespaces, cgroups, eBPF); CI runs it as root");
        return;
    }
    let started = Instant::now();
    // An underlay of its own: the README's demo (10.254.0.0/16) may be up on this machine.
    let mut env =
        DevEnv::up_on_underlay("two-clusters.yaml", "10.247.0.0/16", &["--connect"]).unwrap();
    eprintln!("dev up: {:?}", started.elapsed());
    for cluster in ["a", "b"] {
        env.apply(cluster, APP).unwrap();
    }
    let state = env.state().unwrap();
    let pod_ip = |cluster: &str, pod: &str| {
        state
            .cluster(cluster)
            .unwrap()
            .pod(pod)
            .unwrap()
            .ip
            .to_string()
    };
    let vip = state.cluster("a").unwrap().cluster_ips["shop/echo"].to_string();
    eprintln!("applied: {:?}", started.elapsed());

    // Pod to pod, both ways, TCP and UDP: the agents route the peer's pod CIDR via its node.
    for (from, to) in [("a", "b"), ("b", "a")] {
        let target = pod_ip(to, "echo-0");
        for (flag, port) in [("--tcp", 8080), ("--udp", 5353)] {
            let addr = format!("{target}:{port}");
            let what = format!("{from}/client → {to}/echo-0 {flag} {addr}");
            wait_for(CONVERGE, || {
                let v = env
                    .probe(from, "client", &[flag, &addr, "--timeout", "500ms"])
                    .map_err(|e| e.to_string())?;
                let per = answers_per_cluster(&v);
                if v["failures"] == 0 && per.get(to) == Some(&1) {
                    Ok(())
                } else {
                    Err(v.to_string())
                }
            })
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        }
    }
    eprintln!("pod to pod: {:?}", started.elapsed());

    // The global service, from a's client through a's cluster IP: both clusters answer.
    let counted = wait_for(CONVERGE, || {
        let v = env
            .probe(
                "a",
                "client",
                &["--tcp", &format!("{vip}:80"), "--count", "200"],
            )
            .map_err(|e| e.to_string())?;
        let per = answers_per_cluster(&v);
        let both = per.get("a").is_some_and(|n| *n > 0) && per.get("b").is_some_and(|n| *n > 0);
        if v["failures"] == 0 && both && per.values().sum::<u64>() == 200 {
            Ok(per)
        } else {
            Err(v.to_string())
        }
    })
    .unwrap();
    eprintln!("global service over TCP, 200 requests: {counted:?}");
    // UDP: a probe's datagrams share one socket, which the load balancer pins to one
    // backend; separate probes (sockets) spread.
    let mut per = std::collections::BTreeMap::<String, u64>::new();
    for _ in 0..20 {
        let v = env
            .probe("a", "client", &["--udp", &format!("{vip}:53")])
            .unwrap();
        assert_eq!(v["failures"], 0, "UDP through the global service: {v}");
        for (cluster, n) in answers_per_cluster(&v) {
            *per.entry(cluster).or_default() += n;
        }
    }
    assert!(
        per.get("a").is_some_and(|n| *n > 0) && per.get("b").is_some_and(|n| *n > 0),
        "UDP through the global service answered from {per:?}"
    );
    eprintln!("global service over UDP, 20 sockets: {per:?}");

    // `dev exec` passes the command's exit status through.
    let out = env
        .cli(&[
            "dev",
            "exec",
            "-c",
            "b",
            "client",
            "--name",
            env.name(),
            "--",
            "sh",
            "-c",
            "exit 7",
        ])
        .unwrap();
    assert_eq!(out.status.code(), Some(7));

    env.down().unwrap();
    assert_eq!(
        env.leftovers(),
        Vec::<String>::new(),
        "dev down left these behind"
    );
    assert!(!env.home().env_dir(env.name()).exists());
    assert!(!env.home().context_dir(env.name()).exists());
    assert!(!env.home().current_context_file().exists());
    eprintln!("total: {:?}", started.elapsed());
}
