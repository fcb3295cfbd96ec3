//! The control plane alone (`clustermesh dev up --datapath none`), as a machine without root
//! or eBPF runs it: `kind-configs/two-clusters.yaml` on loopback, connected, agents with
//! `--datapath none` and `--grace 1s`, pods as manifest entries without a process. Needs
//! neither root nor network namespaces, so it runs everywhere.
//!
//! - `clustermesh status` is healthy and a's agent merges the global service's backends of
//!   both clusters (with b's pod address from b's node's pod CIDR);
//! - what needs the datapath (`dev exec`, `dev cut`) is refused, naming why;
//! - `dev kill -c b`: a's agent drops b's backend after the grace; `dev revive -c b`: it is
//!   back;
//! - nothing kernel-level is ever made, and `dev down` leaves nothing behind.

use std::time::Duration;

use mesh_devenv::sys::http_get;
use mesh_e2e::{DevEnv, app, topology, wait_for};
use serde_json::Value;

/// How long the mesh may take to sync after `up` or `revive`, or to withdraw a killed
/// cluster on a loaded machine.
const CONVERGE: Duration = Duration::from_secs(60);

/// The backends (`cluster ip`) of `shop/echo` in the agent's table at `api`.
fn echo_backends(api: std::net::SocketAddr) -> Result<Vec<String>, String> {
    let (code, body) = http_get(api, "/v1/services", Duration::from_secs(1))?;
    if code != 200 {
        return Err(format!("{code}: {body}"));
    }
    let services: Value = serde_json::from_str(&body).map_err(|e| e.to_string())?;
    let entry = services
        .as_array()
        .into_iter()
        .flatten()
        .find(|s| s["service"]["namespace"] == "shop" && s["service"]["name"] == "echo")
        .ok_or("no shop/echo in the table")?;
    Ok(entry["backends"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|b| format!("{} {}", b["cluster"].as_str().unwrap_or("?"), b["ip"]))
        .collect())
}

#[test]
fn the_control_plane_alone_merges_and_withdraws_without_root() {
    let started = std::time::Instant::now();
    let mut env = DevEnv::up(
        &topology("two-clusters.yaml"),
        &["--connect", "--datapath", "none", "--agent-grace", "1s"],
    )
    .unwrap();
    assert_eq!(
        env.leftovers(),
        Vec::<String>::new(),
        "a control-plane environment makes no namespace, interface, cgroup or bpffs pin"
    );
    let status = env
        .cli_ok(&["status", "--wait", "--wait-duration", "60s"])
        .unwrap();
    eprintln!(
        "{:?}: up and connected\n$ clustermesh status --wait\n{status}",
        started.elapsed()
    );
    for cluster in ["a", "b"] {
        env.apply(cluster, &app::global_echo(1)).unwrap();
    }
    let state = env.state().unwrap();
    let api = state.cluster("a").unwrap().nodes[0].agent_api;
    let b = state.cluster("b").unwrap();
    let b_pod = &b.pods[0];
    let b_node = b.node(&b_pod.node).unwrap();
    assert!(
        b_node.pod_cidr.contains(b_pod.ip.into()),
        "b's pod address {} comes from its node's pod CIDR {}",
        b_pod.ip,
        b_node.pod_cidr
    );
    let b_backend = format!("b \"{}\"", b_pod.ip);

    let both = wait_for(CONVERGE, || {
        let backends = echo_backends(api)?;
        let clusters: Vec<&str> = backends.iter().map(|b| &b[..1]).collect();
        if clusters.contains(&"a") && backends.contains(&b_backend) {
            Ok(backends)
        } else {
            Err(format!("a's agent has {backends:?}"))
        }
    })
    .unwrap();
    eprintln!(
        "{:?}: a's agent merges shop/echo from both clusters: {both:?}",
        started.elapsed()
    );

    for refused in [
        vec!["dev", "exec", "-c", "a", "shop/echo-0", "--", "true"],
        vec!["dev", "cut", "-c", "b"],
    ] {
        let mut args = refused.clone();
        args.extend(["--name", env.name()]);
        let out = env.cli(&args).unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{refused:?} succeeded");
        assert!(
            err.contains("runs the control plane alone"),
            "{refused:?}: {err}"
        );
    }

    env.cli_ok(&["dev", "kill", "-c", "b", "--name", env.name()])
        .unwrap();
    let after_kill = wait_for(CONVERGE, || {
        let backends = echo_backends(api)?;
        if backends.iter().all(|b| b.starts_with("a ")) && !backends.is_empty() {
            Ok(backends)
        } else {
            Err(format!("a's agent still has {backends:?}"))
        }
    })
    .unwrap();
    eprintln!(
        "{:?}: b killed, a's agent keeps {after_kill:?}",
        started.elapsed()
    );

    env.cli_ok(&["dev", "revive", "-c", "b", "--name", env.name()])
        .unwrap();
    wait_for(CONVERGE, || {
        let backends = echo_backends(api)?;
        if backends.contains(&b_backend) {
            Ok(())
        } else {
            Err(format!("a's agent has {backends:?}"))
        }
    })
    .unwrap();
    eprintln!("{:?}: b revived, back in a's table", started.elapsed());

    env.down().unwrap();
    assert_eq!(env.leftovers(), Vec::<String>::new());
    assert!(!env.home().env_dir(env.name()).exists());
}
