//! What a user does after `clustermesh dev up`: the stores serve mutual TLS with the
//! certificates `clustermesh enable` made, nothing is connected yet; the real
//! `clustermesh connect` joins the clusters, `status --wait -o json` reports both ready
//! (peers synced, every node connected, global services counted), a global service answers
//! from both clusters; `disconnect` takes the peers away, status shows them gone and the
//! service answers from the local cluster only; `dev down` leaves nothing. Root only.

use std::time::{Duration, Instant};

use mesh_e2e::{DevEnv, answers_per_cluster, app, wait_for};
use serde_json::Value;
use testkit::sandbox::is_root;

/// After `disconnect`, the agents demote the peer's backends once it has been lost for their
/// `--grace` (5 s); kvstoremesh drains its cache after `--peer-removal-grace` (30 s).
const CONVERGE: Duration = Duration::from_secs(90);

fn status_json(env: &DevEnv, args: &[&str]) -> Value {
    let mut argv = vec!["status", "-o", "json"];
    argv.extend(args);
    let out = env.cli(&argv).unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("PRIVATE KEY"), "status JSON holds a key");
    serde_json::from_str(&text).unwrap_or_else(|e| {
        panic!(
            "status -o json: {e}: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn cluster<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["clusters"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["name"] == name))
        .unwrap_or_else(|| panic!("no cluster {name} in {report}"))
}

#[test]
fn connect_status_disconnect_over_tls() {
    if !is_root() {
        eprintln!("skipped: needs root (network namespaces, cgroups, eBPF); CI runs it as root");
        return;
    }
    let started = Instant::now();
    // An underlay of its own, like every scenario: the README demo may be up on 10.254.
    let mut env = DevEnv::up_on_underlay("two-clusters.yaml", "10.246.0.0/16", &[]).unwrap();
    eprintln!("dev up: {:?}", started.elapsed());

    // The stores serve TLS as their admin identity, from enable's certificates.
    let home = env.home();
    for c in ["a", "b"] {
        let context =
            std::fs::read_to_string(home.context_dir(env.name()).join(format!("{c}.yaml")))
                .unwrap();
        assert!(context.contains("https://"), "{context}");
        assert!(context.contains(&format!("admin-{c}/tls.crt")), "{context}");
        assert!(context.contains("certs-dir:"), "{context}");
    }
    let alone = status_json(&env, &[]);
    for c in ["a", "b"] {
        let report = cluster(&alone, c);
        assert_eq!(report["store"]["reachable"], true, "{report}");
        assert_eq!(report["peers"], Value::Array(Vec::new()), "{report}");
    }

    for c in ["a", "b"] {
        env.apply(
            c,
            &app::documents(&[app::global_echo(1), app::client("client")]),
        )
        .unwrap();
    }
    let vip = env.state().unwrap().cluster("a").unwrap().cluster_ips["shop/echo"].to_string();

    let out = env
        .cli_ok(&["connect", "--source", "a", "--destination", "b"])
        .unwrap();
    assert!(
        out.contains("connected: a reads b") && out.contains("connected: b reads a"),
        "{out}"
    );
    let connected = Instant::now();

    let report = status_json(&env, &["--wait", "--wait-duration", "90s"]);
    eprintln!("connect → status --wait ready: {:?}", connected.elapsed());
    assert_eq!(report["ready"], true, "{report}");
    for (c, peer) in [("a", "b"), ("b", "a")] {
        let r = cluster(&report, c);
        assert_eq!(r["ready"], true, "{r}");
        assert_eq!(r["problems"], Value::Array(Vec::new()), "{r}");
        assert_eq!(r["apiserver"]["ready"], true, "{r}");
        assert_eq!(r["kvstoremesh"]["ready"], true, "{r}");
        assert_eq!(r["nodes"]["total"], 1, "{r}");
        assert_eq!(r["nodes"]["connected_to_all"], 1, "{r}");
        assert_eq!(r["global_services"], 1, "{r}");
        let peers = r["peers"].as_array().unwrap();
        assert_eq!(peers.len(), 1, "{r}");
        assert_eq!(peers[0]["name"], peer, "{r}");
        for flag in ["configured", "connected", "synced"] {
            assert_eq!(peers[0][flag], true, "{flag}: {r}");
        }
        assert!(peers[0]["entries"].as_u64().unwrap() > 0, "{r}");
    }
    let text = env.cli_ok(&["status"]).unwrap();
    assert!(text.contains("1/1 nodes connected"), "{text}");

    // Both clusters answer through a's cluster IP.
    let per = wait_for(CONVERGE, || {
        let v = env
            .probe(
                "a",
                "client",
                &["--tcp", &format!("{vip}:80"), "--count", "100"],
            )
            .map_err(|e| e.to_string())?;
        let per = answers_per_cluster(&v);
        if v["failures"] == 0 && per.get("a") > Some(&0) && per.get("b") > Some(&0) {
            Ok(per)
        } else {
            Err(v.to_string())
        }
    })
    .unwrap();
    eprintln!(
        "connected, 100 requests from a: {per:?} ({:?})",
        started.elapsed()
    );

    let out = env
        .cli_ok(&["disconnect", "--source", "a", "--destination", "b"])
        .unwrap();
    assert!(out.contains("disconnected: a reads b"), "{out}");
    let disconnected = Instant::now();

    // The peer is gone from status (also from kvstoremesh once its cache is drained) ...
    wait_for(CONVERGE, || {
        let report = status_json(&env, &[]);
        for c in ["a", "b"] {
            let r = cluster(&report, c);
            if r["peers"] != Value::Array(Vec::new()) {
                return Err(r.to_string());
            }
        }
        Ok(())
    })
    .unwrap();
    eprintln!(
        "disconnect → no peer in status: {:?}",
        disconnected.elapsed()
    );
    // ... and a's clients reach a's backends only.
    let per = wait_for(CONVERGE, || {
        let v = env
            .probe(
                "a",
                "client",
                &["--tcp", &format!("{vip}:80"), "--count", "100"],
            )
            .map_err(|e| e.to_string())?;
        let per = answers_per_cluster(&v);
        if v["failures"] == 0 && per.get("a") == Some(&100) {
            Ok(per)
        } else {
            Err(v.to_string())
        }
    })
    .unwrap();
    eprintln!(
        "disconnected, 100 requests from a: {per:?} (withdrawn after {:?})",
        disconnected.elapsed()
    );

    env.down().unwrap();
    assert_eq!(
        env.leftovers(),
        Vec::<String>::new(),
        "dev down left these behind"
    );
    assert!(!env.home().env_dir(env.name()).exists());
    assert!(!env.home().context_dir(env.name()).exists());
    eprintln!("total: {:?}", started.elapsed());
}
