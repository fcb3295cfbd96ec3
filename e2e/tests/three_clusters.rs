//! Three clusters with kvstoremesh (`kind-configs/three-clusters.yaml` on an underlay of its
//! own, `dev up --connect` for a full mesh, agents with `--grace 1s`): a global service with
//! one backend in each of `a`, `b` and `c`, asked from a client pod in `a`.
//!
//! - Every cluster answers (answers counted per cluster over 300 requests, each one new
//!   connection).
//! - `clustermesh dev kill -c c` kills every process of `c`: within the grace plus a margin
//!   for a loaded machine, `a`'s client is answered by `a` and `b` only again, every request
//!   succeeding and none answered by `c`.
//! - `clustermesh dev revive -c c`: `c` answers again.
//!
//! `dev down` must leave nothing behind. Root only.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use mesh_e2e::{DevEnv, answers_per_cluster, app, wait_for};
use testkit::sandbox::is_root;

/// The agents' withdrawal grace in the scenario.
const GRACE: Duration = Duration::from_secs(1);
/// What a loaded 2-core machine may add to the grace before `c` is withdrawn.
const MARGIN: Duration = Duration::from_secs(10);
/// How long the mesh may take to sync after `up` or `revive`.
const CONVERGE: Duration = Duration::from_secs(60);
/// Requests of each counted probe.
const REQUESTS: u64 = 300;

/// 300 requests from `a`'s client to `echo`: answers per cluster, and the summary when any
/// request failed.
fn count(env: &DevEnv, echo: &str) -> Result<BTreeMap<String, u64>, String> {
    let v = env
        .probe(
            "a",
            "client",
            &["--tcp", echo, "--count", &REQUESTS.to_string()],
        )
        .map_err(|e| e.to_string())?;
    if v["failures"] == 0 {
        Ok(answers_per_cluster(&v))
    } else {
        Err(v.to_string())
    }
}

/// Waits until every request of a probe succeeds and exactly `clusters` answer, each at least
/// a tenth of the requests; the answers per cluster.
fn answered_by(env: &DevEnv, echo: &str, clusters: &[&str]) -> BTreeMap<String, u64> {
    wait_for(CONVERGE, || {
        let per = count(env, echo)?;
        if per.keys().eq(clusters) && per.values().all(|&n| n >= REQUESTS / 10) {
            Ok(per)
        } else {
            Err(format!("{per:?}"))
        }
    })
    .unwrap_or_else(|e| panic!("a/client → {echo}: never answered by {clusters:?}: {e}"))
}

#[test]
fn three_clusters_answer_and_a_killed_one_is_withdrawn_and_comes_back() {
    if !is_root() {
        eprintln!("skipped: needs root (network namespaces, cgroups, eBPF); CI runs it as root");
        return;
    }
    let started = Instant::now();
    let mut env = DevEnv::up_on_underlay(
        "three-clusters.yaml",
        "10.244.0.0/16",
        &["--connect", "--agent-grace", "1s"],
    )
    .unwrap();
    eprintln!("dev up --connect: {:?}", started.elapsed());
    for cluster in ["a", "b", "c"] {
        env.apply(cluster, &app::global_echo(1)).unwrap();
    }
    env.apply("a", &app::client("client")).unwrap();
    let state = env.state().unwrap();
    let echo = format!(
        "{}:80",
        state.cluster("a").unwrap().cluster_ips["shop/echo"]
    );

    let per = answered_by(&env, &echo, &["a", "b", "c"]);
    eprintln!("a/client → {echo}, {REQUESTS} requests: {per:?}");

    // Kill c: its backend refuses connections at once, and is withdrawn after the grace.
    let killed = Instant::now();
    env.cli_ok(&["dev", "kill", "-c", "c", "--name", env.name()])
        .unwrap();
    let kill_took = killed.elapsed();
    let recovered = wait_for(GRACE + MARGIN, || {
        let v = env
            .probe(
                "a",
                "client",
                &["--tcp", &echo, "--count", "30", "--timeout", "300ms"],
            )
            .map_err(|e| e.to_string())?;
        if v["failures"] == 0 && answers_per_cluster(&v).keys().eq(["a", "b"]) {
            Ok(killed.elapsed())
        } else {
            Err(v.to_string())
        }
    })
    .unwrap_or_else(|e| panic!("dev kill -c c: a/client → {echo} not back to a and b: {e}"));
    eprintln!(
        "dev kill -c c: a and b only, every request answered, {:.3} s after the kill \
         ({:.3} s of it killing)",
        recovered.as_secs_f64(),
        kill_took.as_secs_f64()
    );
    let per = count(&env, &echo).unwrap();
    assert!(
        per.keys().eq(["a", "b"]) && per.values().all(|&n| n >= REQUESTS / 10),
        "a/client → {echo} with c dead, {REQUESTS} requests: {per:?}"
    );
    eprintln!("a/client → {echo} with c dead, {REQUESTS} requests: {per:?}");

    let revived = Instant::now();
    env.cli_ok(&["dev", "revive", "-c", "c", "--name", env.name()])
        .unwrap();
    let per = answered_by(&env, &echo, &["a", "b", "c"]);
    eprintln!(
        "dev revive -c c: c answers again after {:?}; {REQUESTS} requests: {per:?}",
        revived.elapsed()
    );

    env.down().unwrap();
    assert_eq!(env.leftovers(), Vec::<String>::new(), "dev down left these");
    eprintln!("total: {:?}", started.elapsed());
}
