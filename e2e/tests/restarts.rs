//! No interrupted connections (`kind-configs/two-clusters.yaml` on an underlay of its own,
//! `dev up --connect`): from a client pod in `a`, through a global service with a backend in
//! each cluster, one long-lived TCP stream (`mesh-echo stream`, a line every 50 ms) and a
//! loop of new connections (`mesh-echo probe`, 10 at a time) run while, in turn, `a`'s agent,
//! `a`'s kvstoremesh and `b`'s apiserver with its embedded store are restarted (SIGTERM, then
//! started again as they were, as a rolling restart would). The stream must not break and
//! not one new connection may fail; afterwards both clusters still answer. Root only; `dev
//! down` must leave nothing behind.

use std::collections::BTreeMap;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use mesh_e2e::{DevEnv, answers_per_cluster, app, wait_for};
use testkit::sandbox::is_root;

/// The daemons restarted, in turn.
const RESTARTED: [&str; 3] = ["a-node-1/agent", "a/kvstoremesh", "b/apiserver"];
/// Traffic alone before the first restart, between restarts and after the last.
const PAUSE: Duration = Duration::from_secs(2);
/// How long the stream lasts; every restart must be over before it ends.
const STREAM: Duration = Duration::from_secs(20);
/// How long the mesh may take to sync after `up` and after the restarts.
const CONVERGE: Duration = Duration::from_secs(60);

/// Waits until `a`'s client is answered by both clusters, every request succeeding.
fn both_answer(env: &DevEnv, echo: &str) -> BTreeMap<String, u64> {
    wait_for(CONVERGE, || {
        let v = env
            .probe("a", "client", &["--tcp", echo, "--count", "40"])
            .map_err(|e| e.to_string())?;
        let per = answers_per_cluster(&v);
        if v["failures"] == 0 && per.keys().eq(["a", "b"]) {
            Ok(per)
        } else {
            Err(v.to_string())
        }
    })
    .unwrap_or_else(|e| panic!("a/client → {echo}: never answered by a and b: {e}"))
}

/// What the loop of new connections saw.
#[derive(Debug, Default)]
struct Loop {
    requests: u64,
    failures: u64,
    per_cluster: BTreeMap<String, u64>,
    /// The summaries of probes with a failure (or the error of a probe that printed none).
    failed: Vec<String>,
}

#[test]
fn restarting_an_agent_a_kvstoremesh_and_an_apiserver_interrupts_no_connection() {
    if !is_root() {
        eprintln!("skipped: needs root (network namespaces, cgroups, eBPF); CI runs it as root");
        return;
    }
    let started = Instant::now();
    let mut env =
        DevEnv::up_on_underlay("two-clusters.yaml", "10.243.0.0/16", &["--connect"]).unwrap();
    for cluster in ["a", "b"] {
        env.apply(
            cluster,
            &app::documents(&[app::global_echo(1), app::client("client")]),
        )
        .unwrap();
    }
    let state = env.state().unwrap();
    let echo = format!(
        "{}:80",
        state.cluster("a").unwrap().cluster_ips["shop/echo"]
    );
    eprintln!("before: {:?}", both_answer(&env, &echo));

    let stream_started = Instant::now();
    let stream = env
        .echo_command(
            "a",
            "client",
            &[
                "stream",
                "--tcp",
                &echo,
                "--duration",
                &format!("{}s", STREAM.as_secs()),
                "--interval",
                "50ms",
            ],
        )
        .unwrap()
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stop = AtomicBool::new(false);
    let (seen, restarts) = std::thread::scope(|s| {
        let looper = s.spawn(|| {
            let mut seen = Loop::default();
            while !stop.load(Ordering::Relaxed) {
                seen.requests += 10;
                match env.probe(
                    "a",
                    "client",
                    &["--tcp", &echo, "--count", "10", "--timeout", "1s"],
                ) {
                    Ok(v) => {
                        for (cluster, n) in answers_per_cluster(&v) {
                            *seen.per_cluster.entry(cluster).or_default() += n;
                        }
                        let failures = v["failures"].as_u64().unwrap_or(10);
                        seen.failures += failures;
                        if failures > 0 {
                            seen.failed.push(v.to_string());
                        }
                    }
                    Err(e) => {
                        seen.failures += 10;
                        seen.failed.push(e.to_string());
                    }
                }
            }
            seen
        });
        let mut restarts = Vec::new();
        for what in RESTARTED {
            std::thread::sleep(PAUSE);
            let t = Instant::now();
            let result = env.restart(what);
            let failed = result.is_err();
            restarts.push((what, t.elapsed(), result));
            if failed {
                break;
            }
        }
        std::thread::sleep(PAUSE);
        stop.store(true, Ordering::Relaxed);
        let seen = looper.join().expect("the loop of new connections panicked");
        (seen, restarts)
    });
    let restarts_over = stream_started.elapsed();
    let stream = stream.wait_with_output().unwrap();
    for (what, took, result) in &restarts {
        eprintln!(
            "restart {what}: {:?} in {:.3} s (until every daemon is ready)",
            result.as_ref().map_err(ToString::to_string),
            took.as_secs_f64()
        );
    }
    for (what, _, result) in restarts {
        if let Err(e) = result {
            panic!("restarting {what}: {e}");
        }
    }
    assert!(
        restarts_over < STREAM,
        "the restarts took {restarts_over:?}, longer than the stream ({STREAM:?})"
    );
    let summary: serde_json::Value = serde_json::from_slice(&stream.stdout)
        .unwrap_or_else(|e| panic!("stream printed no summary ({e}): {stream:?}"));
    eprintln!("stream over {STREAM:?}: {summary}");
    eprintln!(
        "new connections: {} requests, {} failed, answers {:?}",
        seen.requests, seen.failures, seen.per_cluster
    );
    let lines: u64 = summary["answers"]
        .as_object()
        .into_iter()
        .flatten()
        .filter_map(|(_, n)| n.as_u64())
        .sum();
    assert!(
        stream.status.success() && summary["failures"] == 0 && lines >= 100,
        "the stream broke ({}, {lines} answers): {summary}",
        stream.status
    );
    assert_eq!(
        seen.failures, 0,
        "new connections failed during the restarts: {:?}",
        seen.failed
    );
    assert!(
        seen.per_cluster.keys().eq(["a", "b"]),
        "new connections: {seen:?}"
    );
    eprintln!("after: {:?}", both_answer(&env, &echo));

    env.down().unwrap();
    assert_eq!(env.leftovers(), Vec::<String>::new(), "dev down left these");
    eprintln!("total: {:?}", started.elapsed());
}
