//! A restarted agent, before its peers have synced, removes no backend and no ipcache entry it
//! had (the class of Cilium #26462, #45441): it starts from its persisted state and replaces
//! a peer's part only after that peer's full resync.

mod common;

use std::collections::BTreeSet;

use common::{Agent, Peer, Svc, manifests, peers_dir, write_manifests};

fn b_services(web: &[u8]) -> Vec<Svc> {
    vec![Svc::new("shop", "web").global().ready(web)]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_agent_keeps_every_entry_until_the_peer_resyncs() {
    let work = tempfile::tempdir().unwrap();
    let local = common::cluster_config("a", 1);
    let local_dir = work.path().join("a");
    std::fs::create_dir_all(&local_dir).unwrap();
    write_manifests(
        &local_dir,
        &manifests("a", 1, &[Svc::new("shop", "web").global().ready(&[1])]),
    );
    let mut b = Peer::start("b", 2, &b_services(&[1, 2, 3])).await;
    let peers = peers_dir(work.path(), &[&b]);
    // A long grace: this test is about restarts, not withdrawal.
    let mut agent = Agent::start(
        &local,
        &local_dir,
        work.path(),
        &[
            "--peers-dir".into(),
            peers.to_str().unwrap().into(),
            "--grace".into(),
            "10m".into(),
        ],
    )
    .await;
    let before = agent
        .wait_for("b synced", |v| {
            v.peer_synced("b") && v.backends("shop/web").len() == 4
        })
        .await;
    let b_ips: BTreeSet<String> = ["10.2.1.1", "10.2.1.2", "10.2.1.3"]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
    for ip in &b_ips {
        assert!(before.ipcache_has(ip, "b"), "{ip}");
    }

    // The agent stops; b dies and, while both are down, one of b's pods goes.
    agent.terminate();
    b.kill().await;
    b.set_services(&b_services(&[1, 2]));

    // The restarted agent serves exactly what it had, before b could sync.
    agent.restart().await;
    let restored = agent.view().await.expect("the API serves at once");
    assert!(
        restored.status.peers["b"].restored,
        "{:?}",
        restored.status.peers
    );
    assert_ne!(
        restored.status.peers["b"].phase,
        agent::remote::Phase::Synced
    );
    assert_eq!(restored.services, before.services, "no backend removed");
    assert_eq!(restored.ipcache, before.ipcache, "no ipcache entry removed");
    let routes = agent.routes().await.unwrap();
    assert!(
        routes.iter().any(|r| r.cluster.as_str() == "b"),
        "{routes:?}"
    );

    // The local cluster resyncs (its own part is replaced); b's part stays.
    let view = agent
        .wait_for("local synced", |v| {
            v.status.local_synced && !v.status.local_restored
        })
        .await;
    assert!(view.status.peers["b"].restored);
    assert_eq!(view.services, before.services);
    assert_eq!(view.ipcache, before.ipcache);

    // b comes back: once it has fully resynced, its part is replaced and only then is the
    // pod that went while everything was down collected.
    b.revive().await;
    let view = agent
        .wait_for("b resynced", |v| {
            v.peer_synced("b") && v.backends("shop/web").len() == 3
        })
        .await;
    assert!(!view.status.peers["b"].restored);
    assert!(!view.ipcache_has("10.2.1.3", "b"));
    assert!(view.ipcache_has("10.2.1.1", "b") && view.ipcache_has("10.2.1.2", "b"));
    assert!(
        view.backends("shop/web")
            .iter()
            .all(|(c, ip, _)| c == "a" || ip != "10.2.1.3")
    );
}

/// A command line that cannot work stops the agent before it starts anything: exit code 64
/// (sysexits' EX_USAGE) and a message naming the flag.
#[test]
fn bad_flags_exit_64_naming_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a-file");
    std::fs::write(&file, "").unwrap();
    let (dir, file) = (dir.path().display().to_string(), file.display().to_string());
    for (flag, value) in [
        ("--cluster-name", "Not_A_Name"),
        ("--cluster-id", "0"),
        ("--manifests", file.as_str()),
        ("--peers-dir", file.as_str()),
        ("--datapath", "xdp"),
        ("--api-listen", "not-an-address"),
    ] {
        let mut args = vec![
            ("--cluster-name", "a"),
            ("--cluster-id", "1"),
            ("--manifests", dir.as_str()),
        ];
        args.retain(|(f, _)| *f != flag);
        args.push((flag, value));
        let args: Vec<&str> = args.iter().flat_map(|(f, v)| [*f, *v]).collect();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_clustermesh-agent"))
            .args(&args)
            .env("NO_COLOR", "1")
            .output()
            .expect("run clustermesh-agent");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{args:?}:\n{stderr}");
        assert!(
            stderr.contains(flag),
            "{args:?}: {flag} not named in:\n{stderr}"
        );
    }
}
