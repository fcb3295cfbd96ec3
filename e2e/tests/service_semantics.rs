//! Service semantics across two clusters, on one `clustermesh dev up --connect` of
//! `kind-configs/two-clusters.yaml` (on an underlay of its own): affinity `local`, `remote`,
//! `none` and absent; `service.cilium.io/shared: "false"` on one side; a global service in a
//! namespace that is not global; a service that is not global; and `local` falling back to
//! the remote cluster when the local one has no backend. Every assertion counts who answered
//! over many TCP requests from a client pod (`mesh-echo probe` through the service's cluster
//! IP, the agents' eBPF socket load balancer). The rules are `agent::merge`'s and
//! `model::annotations`'. Root only.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use mesh_e2e::{DevEnv, answers_per_cluster, wait_for};
use testkit::sandbox::is_root;

/// One echo backend per cluster in namespace `shop` behind several services that differ only
/// in their annotations, a client pod, and a namespace `quiet` that is not global.
fn app(cluster: &str) -> String {
    // b keeps its backends of `private` to itself; only b runs backends of `fallback`.
    let private = if cluster == "b" {
        "{service.cilium.io/global: 'true', service.cilium.io/shared: 'false'}"
    } else {
        "{service.cilium.io/global: 'true'}"
    };
    let lonely = if cluster == "b" {
        "
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: lonely, namespace: shop}
spec:
  replicas: 1
  template:
    metadata: {labels: {app: lonely}}
    spec: {containers: [{name: echo, ports: [{name: http, containerPort: 8080}]}]}"
    } else {
        ""
    };
    let mut yaml = format!(
        "
apiVersion: v1
kind: Namespace
metadata:
  name: quiet
  annotations: {{clustermesh.cilium.io/global: 'false'}}
---
apiVersion: apps/v1
kind: Deployment
metadata: {{name: echo, namespace: shop}}
spec:
  replicas: 1
  template:
    metadata: {{labels: {{app: echo}}}}
    spec: {{containers: [{{name: echo, ports: [{{name: http, containerPort: 8080}}]}}]}}
---
apiVersion: apps/v1
kind: Deployment
metadata: {{name: echo, namespace: quiet}}
spec:
  replicas: 1
  template:
    metadata: {{labels: {{app: echo}}}}
    spec: {{containers: [{{name: echo, ports: [{{name: http, containerPort: 8080}}]}}]}}
---
apiVersion: v1
kind: Pod
metadata: {{name: client, namespace: shop, labels: {{app: client}}}}
spec: {{containers: [{{name: client}}]}}{lonely}
"
    );
    let services = [
        (
            "shop",
            "absent",
            "{service.cilium.io/global: 'true'}",
            "echo",
        ),
        (
            "shop",
            "none",
            "{service.cilium.io/global: 'true', service.cilium.io/affinity: none}",
            "echo",
        ),
        (
            "shop",
            "local",
            "{service.cilium.io/global: 'true', service.cilium.io/affinity: local}",
            "echo",
        ),
        (
            "shop",
            "remote",
            "{service.cilium.io/global: 'true', service.cilium.io/affinity: remote}",
            "echo",
        ),
        ("shop", "private", private, "echo"),
        ("shop", "plain", "{}", "echo"),
        (
            "quiet",
            "echo",
            "{service.cilium.io/global: 'true'}",
            "echo",
        ),
        (
            "shop",
            "fallback",
            "{service.cilium.io/global: 'true', service.cilium.io/affinity: local}",
            "lonely",
        ),
    ];
    for (namespace, name, annotations, app) in services {
        yaml.push_str(&format!(
            "---
apiVersion: v1
kind: Service
metadata:
  name: {name}
  namespace: {namespace}
  annotations: {annotations}
spec:
  selector: {{app: {app}}}
  ports: [{{name: http, port: 80, targetPort: http}}]
"
        ));
    }
    yaml
}

const CONVERGE: Duration = Duration::from_secs(60);
const REQUESTS: u64 = 200;

/// Answers per cluster over `REQUESTS` TCP requests from `cluster`'s client to `service`
/// (`namespace/name`) through `cluster`'s cluster IP of it.
fn count(env: &DevEnv, cluster: &str, service: &str) -> Result<BTreeMap<String, u64>, String> {
    let state = env.state().map_err(|e| e.to_string())?;
    let vip = state
        .cluster(cluster)
        .map_err(|e| e.to_string())?
        .cluster_ips
        .get(service)
        .ok_or_else(|| format!("no cluster IP for {service} in {cluster}"))?
        .to_string();
    let v = env
        .probe(
            cluster,
            "client",
            &[
                "--tcp",
                &format!("{vip}:80"),
                "--count",
                &REQUESTS.to_string(),
                "--timeout",
                "500ms",
            ],
        )
        .map_err(|e| e.to_string())?;
    let per = answers_per_cluster(&v);
    if v["failures"] != 0 || per.values().sum::<u64>() != REQUESTS {
        return Err(format!("{cluster} → {service}: {v}"));
    }
    Ok(per)
}

/// Whether `per` is answered by exactly `expected` clusters, each with at least a tenth of
/// the requests when several.
fn matches(per: &BTreeMap<String, u64>, expected: &[&str]) -> bool {
    let clusters: Vec<&str> = per.keys().map(String::as_str).collect();
    clusters == expected && (expected.len() == 1 || per.values().all(|n| *n >= REQUESTS / 10))
}

/// Waits until `cluster`'s client sees `service` answered as [`matches`] asks.
fn converge(env: &DevEnv, cluster: &str, service: &str, expected: &[&str]) {
    let per = wait_for(CONVERGE, || {
        let per = count(env, cluster, service)?;
        if matches(&per, expected) {
            Ok(per)
        } else {
            Err(format!("answered by {per:?}, expected {expected:?}"))
        }
    })
    .unwrap_or_else(|e| panic!("{cluster}/client → {service}: {e}"));
    eprintln!("{cluster}/client → {service}: {per:?}");
}

/// `cluster`'s client sees `service` answered as [`matches`] asks, now: for what must hold
/// once the clusters have synced (a wait would let a wrong answer pass later).
fn holds(env: &DevEnv, cluster: &str, service: &str, expected: &[&str]) {
    let per = count(env, cluster, service).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        matches(&per, expected),
        "{cluster}/client → {service}: answered by {per:?}, expected {expected:?}"
    );
    eprintln!("{cluster}/client → {service}: {per:?}");
}

#[test]
fn affinity_sharing_and_global_scope_across_two_clusters() {
    if !is_root() {
        eprintln!("skipped: needs root (network namespaces, cgroups, eBPF); CI runs it as root");
        return;
    }
    let started = Instant::now();
    let mut env =
        DevEnv::up_on_underlay("two-clusters.yaml", "10.253.0.0/16", &["--connect"]).unwrap();
    for cluster in ["a", "b"] {
        env.apply(cluster, &app(cluster)).unwrap();
    }
    eprintln!("up and applied: {:?}", started.elapsed());

    // What can only pass once b's services reached a's agent (and a's reached b's) first:
    // afterwards, an answer missing from a cluster is the rules', not a slow sync's.
    converge(&env, "a", "shop/remote", &["b"]);
    converge(&env, "b", "shop/remote", &["a"]);
    converge(&env, "a", "shop/fallback", &["b"]);
    converge(&env, "b", "shop/private", &["a", "b"]);

    // Affinity: absent and `none` spread over both clusters alike; `local` stays local while
    // local backends exist, `remote` the mirror image.
    for cluster in ["a", "b"] {
        converge(&env, cluster, "shop/absent", &["a", "b"]);
        converge(&env, cluster, "shop/none", &["a", "b"]);
        holds(&env, cluster, "shop/local", &[cluster]);
    }
    // `local` with no local backend falls back to the remote cluster's (checked above from
    // a); b, which has one, keeps to it.
    holds(&env, "b", "shop/fallback", &["b"]);

    // `shared: "false"` in b: b's backends stay in b, while a's (shared) reach b.
    holds(&env, "a", "shop/private", &["a"]);

    // A service that is not global, and a global one in a namespace that is not: never any
    // remote backend, in either cluster.
    for cluster in ["a", "b"] {
        holds(&env, cluster, "shop/plain", &[cluster]);
        holds(&env, cluster, "quiet/echo", &[cluster]);
    }

    env.down().unwrap();
    assert_eq!(env.leftovers(), Vec::<String>::new(), "dev down left these");
    eprintln!("total: {:?}", started.elapsed());
}
