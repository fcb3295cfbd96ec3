//! A cross-cluster policy on `kind-configs/two-clusters.yaml` (an underlay of its own): a
//! `CiliumNetworkPolicy` in `a` lets only pods labelled `app: good` **of cluster `b`** (the
//! cluster label `io.cilium.k8s.policy.cluster`) reach `a`'s echo pod. `b`'s good client gets
//! through; `b`'s other client, and `a`'s own pod with the same `app: good` label, are
//! dropped by the eBPF policy program, and `clustermesh agent drops` on `a`'s node shows
//! both drops with their source's cluster. Root only.

use std::time::{Duration, Instant};

use mesh_e2e::{DevEnv, answers_per_cluster, wait_for};
use testkit::sandbox::is_root;

const SERVER: &str = "
apiVersion: v1
kind: Pod
metadata: {name: echo, namespace: shop, labels: {app: echo}}
spec: {containers: [{name: echo, ports: [{name: http, containerPort: 8080}]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: good, namespace: shop, labels: {app: good}}
spec: {containers: [{name: client}]}
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: echo-from-b, namespace: shop}
spec:
  endpointSelector: {matchLabels: {app: echo}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: good, io.cilium.k8s.policy.cluster: b}}]
    toPorts: [{ports: [{port: '8080', protocol: TCP}]}]
";

const CLIENTS: &str = "
apiVersion: v1
kind: Pod
metadata: {name: good, namespace: shop, labels: {app: good}}
spec: {containers: [{name: client}]}
---
apiVersion: v1
kind: Pod
metadata: {name: bad, namespace: shop, labels: {app: bad}}
spec: {containers: [{name: client}]}
";

const CONVERGE: Duration = Duration::from_secs(60);

#[test]
fn a_policy_on_the_cluster_label_admits_one_remote_client_and_drops_the_others() {
    if !is_root() {
        eprintln!("skipped: needs root (network namespaces, cgroups, eBPF); CI runs it as root");
        return;
    }
    let started = Instant::now();
    let mut env =
        DevEnv::up_on_underlay("two-clusters.yaml", "10.248.0.0/16", &["--connect"]).unwrap();
    env.apply("a", SERVER).unwrap();
    env.apply("b", CLIENTS).unwrap();
    let state = env.state().unwrap();
    let a = state.cluster("a").unwrap();
    let b = state.cluster("b").unwrap();
    let target = format!("{}:8080", a.pod("echo").unwrap().ip);
    let ip = |c: &mesh_devenv::env::ClusterState, pod: &str| c.pod(pod).unwrap().ip.to_string();
    let (b_good, b_bad, a_good) = (ip(b, "good"), ip(b, "bad"), ip(a, "good"));
    let agent = a.nodes[0].agent_api.to_string();
    eprintln!("up and applied: {:?}", started.elapsed());
    // The echo pod is under default-deny before anything is asked, so an answer below is
    // the allow rule's.
    wait_for(CONVERGE, || {
        let out = env
            .cli_ok(&["agent", "policy", "--api", &agent, "-o", "json"])
            .map_err(|e| e.to_string())?;
        let policy: serde_json::Value = serde_json::from_str(&out).map_err(|e| e.to_string())?;
        if policy["enforcement"]
            .as_array()
            .is_some_and(|e| !e.is_empty())
        {
            Ok(())
        } else {
            Err(out)
        }
    })
    .unwrap_or_else(|e| {
        panic!(
            "a's agent never enforced the policy: {e}\n{}",
            env.diagnostics()
        )
    });

    // b's good client gets through once b's identities reached a's agent.
    wait_for(CONVERGE, || {
        let v = env
            .probe("b", "good", &["--tcp", &target, "--timeout", "500ms"])
            .map_err(|e| e.to_string())?;
        if v["failures"] == 0 && answers_per_cluster(&v).get("a") == Some(&1) {
            Ok(())
        } else {
            Err(v.to_string())
        }
    })
    .unwrap_or_else(|e| panic!("b/good → a/echo {target}: {e}\n{}", env.diagnostics()));
    eprintln!("b/good → a/echo allowed: {:?}", started.elapsed());
    // b/good's attempts before b's identities reached a's agent were dropped, rightly; from
    // now on none may be.
    let b_good_drops = |env: &DevEnv| -> usize {
        let out = env
            .cli_ok(&["agent", "drops", "--api", &agent, "-o", "json"])
            .unwrap();
        let drops: serde_json::Value = serde_json::from_str(&out).unwrap();
        drops
            .as_array()
            .into_iter()
            .flatten()
            .filter(|d| {
                d["src"]
                    .as_str()
                    .is_some_and(|s| s.starts_with(&format!("{b_good}:")))
            })
            .count()
    };
    let dropped_before = b_good_drops(&env);
    let v = env
        .probe("b", "good", &["--tcp", &target, "--count", "20"])
        .unwrap();
    assert_eq!(v["failures"], 0, "b/good → a/echo: {v}");

    // Another label in b, and the right label in the wrong cluster: dropped.
    for (cluster, pod) in [("b", "bad"), ("a", "good")] {
        let v = env
            .probe(
                cluster,
                pod,
                &["--tcp", &target, "--count", "3", "--timeout", "300ms"],
            )
            .unwrap();
        assert_eq!(
            (v["failures"].as_u64(), answers_per_cluster(&v).len()),
            (Some(3), 0),
            "{cluster}/{pod} → a/echo must be dropped: {v}"
        );
    }

    // `clustermesh agent drops` on a's node names both, with their source cluster.
    let drops: serde_json::Value = wait_for(Duration::from_secs(10), || {
        let out = env
            .cli_ok(&["agent", "drops", "--api", &agent, "-o", "json"])
            .map_err(|e| e.to_string())?;
        let drops: serde_json::Value = serde_json::from_str(&out).map_err(|e| e.to_string())?;
        let from = |ip: &str, cluster: u64| {
            drops.as_array().into_iter().flatten().any(|d| {
                d["src"]
                    .as_str()
                    .is_some_and(|s| s.starts_with(&format!("{ip}:")))
                    && d["src_cluster"] == cluster
                    && d["direction"] == "ingress"
                    && d["endpoint"] == "shop/echo"
            })
        };
        if from(&b_bad, 2) && from(&a_good, 1) {
            Ok(drops)
        } else {
            Err(format!(
                "no drop from {b_bad} (b) and {a_good} (a) yet: {drops}"
            ))
        }
    })
    .unwrap();
    assert_eq!(
        b_good_drops(&env),
        dropped_before,
        "b/good was dropped once allowed: {drops}"
    );
    let table = env.cli_ok(&["agent", "drops", "--api", &agent]).unwrap();
    eprintln!("clustermesh agent drops (a-node-1):\n{table}");
    assert!(table.contains(&format!("{b_bad}:")), "{table}");

    env.down().unwrap();
    assert_eq!(env.leftovers(), Vec::<String>::new(), "dev down left these");
    eprintln!("total: {:?}", started.elapsed());
}
