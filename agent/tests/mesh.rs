//! Multi-process tests on real stores: peers are etcd processes with a clustermesh-apiserver
//! publishing their manifests, the agent is the `clustermesh-agent` binary reading them
//! directly (`--peers-dir`), and the tests read its API.

mod common;

use std::collections::BTreeSet;

use agent::merge::ClusterHealth;
use common::{Agent, Peer, Svc, count_lines, manifests, peers_dir, write_manifests};

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
}

/// The local cluster a's services, by index (which decides their addresses).
fn local_services() -> Vec<Svc> {
    vec![
        Svc::new("shop", "web").global().ready(&[1, 2]),
        Svc::new("shop", "web-local")
            .global()
            .annotate("service.cilium.io/affinity", "local")
            .ready(&[1]),
        Svc::new("shop", "web-remote")
            .global()
            .annotate("service.cilium.io/affinity", "remote")
            .ready(&[1]),
        Svc::new("shop", "solo").global().ready(&[1]),
        Svc::new("private", "db").global().ready(&[1]),
        Svc::new("shop", "plain").ready(&[1]),
        Svc::new("shop", "only-b").global(),
        Svc::new("shop", "none-aff")
            .global()
            .annotate("service.cilium.io/affinity", "none")
            .ready(&[1]),
    ]
}

fn peer_b_services(web_ready: &[u8]) -> Vec<Svc> {
    vec![
        Svc::new("shop", "web").global().ready(web_ready),
        Svc::new("shop", "web-local").global().ready(&[1]),
        Svc::new("shop", "web-remote").global().ready(&[1]),
        Svc::new("shop", "solo")
            .global()
            .annotate("service.cilium.io/shared", "false")
            .ready(&[1]),
        Svc::new("private", "db").global().ready(&[1]),
        Svc::new("shop", "plain").global().ready(&[1]),
        Svc::new("shop", "only-b").global().ready(&[1]),
        Svc::new("shop", "none-aff").global().ready(&[1]),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_clusters_affinity_sharing_pods_and_dead_cluster_withdrawal() {
    let work = tempfile::tempdir().unwrap();
    let local = common::cluster_config("a", 1);
    let local_dir = work.path().join("a");
    std::fs::create_dir_all(&local_dir).unwrap();
    write_manifests(&local_dir, &manifests("a", 1, &local_services()));
    let mut b = Peer::start("b", 2, &peer_b_services(&[1, 2])).await;
    let peers = peers_dir(work.path(), &[&b]);
    let agent = Agent::start(
        &local,
        &local_dir,
        work.path(),
        &[
            "--peers-dir".into(),
            peers.to_str().unwrap().into(),
            "--grace".into(),
            "1s".into(),
            "--heartbeat-timeout".into(),
            "5s".into(),
        ],
    )
    .await;

    // Synced: the merge follows the annotations.
    let view = agent
        .wait_for("b synced", |v| {
            v.peer_synced("b") && v.status.local_synced && v.clusters("shop/web").len() == 2
        })
        .await;
    assert_eq!(
        view.backends("shop/web").len(),
        4,
        "{:?}",
        view.backends("shop/web")
    );
    assert_eq!(
        view.clusters("shop/web-local"),
        set(&["a"]),
        "local affinity: local backends"
    );
    assert_eq!(
        view.clusters("shop/web-remote"),
        set(&["b"]),
        "remote affinity: remote backends"
    );
    assert_eq!(
        view.clusters("shop/solo"),
        set(&["a"]),
        "b does not share its backends"
    );
    assert_eq!(
        view.clusters("private/db"),
        set(&["a"]),
        "a's namespace is not global"
    );
    assert_eq!(view.clusters("shop/plain"), set(&["a"]), "not global in a");
    assert_eq!(view.clusters("shop/only-b"), set(&["b"]));
    assert_eq!(
        view.clusters("shop/none-aff"),
        set(&["a", "b"]),
        "none is like no affinity"
    );
    for s in &view.services {
        assert!(
            s.backends
                .iter()
                .all(|b| b.state == agent::tables::BackendState::Active)
        );
    }
    assert!(
        view.ipcache_has("10.2.1.1", "b"),
        "b's pods are in the ipcache"
    );
    assert!(view.ipcache_has("10.1.1.1", "a"), "and the local ones");
    let routes = agent.routes().await.unwrap();
    assert!(
        routes.iter().any(|r| r.prefix.to_string() == "10.2.0.0/16"
            && r.cluster.as_str() == "b"
            && r.via.map(|v| v.to_string()) == Some("192.0.2.2".into())),
        "{routes:?}"
    );
    assert!(
        !routes.iter().any(|r| r.cluster.as_str() == "a"),
        "no route to the local cluster"
    );

    // b's apiserver and store die: after the grace, b's backends are demoted.
    b.kill().await;
    let view = agent
        .wait_for("b stale", |v| {
            v.peer_health("b") == Some(ClusterHealth::Stale)
        })
        .await;
    assert_eq!(
        view.clusters("shop/web"),
        set(&["a"]),
        "healthier local backends win"
    );
    assert_eq!(
        view.clusters("shop/web-remote"),
        set(&["a"]),
        "remote affinity falls back to healthy local"
    );
    assert_eq!(
        view.backends("shop/only-b"),
        BTreeSet::from([("b".into(), "10.2.7.1".into(), "stale".into())]),
        "with nothing healthier, the stale backend is still used"
    );
    assert!(
        view.ipcache_has("10.2.1.1", "b"),
        "a disconnect removes nothing"
    );
    assert_eq!(view.status.peers["b"].health_changes, 1);
    let log = agent.log_text();
    assert_eq!(
        count_lines(&log, &["backends are demoted", "peer=b"]),
        1,
        "logged once"
    );

    // b comes back: restored without a relist.
    b.revive().await;
    let view = agent
        .wait_for("b healthy", |v| {
            v.peer_health("b") == Some(ClusterHealth::Healthy) && v.clusters("shop/web").len() == 2
        })
        .await;
    assert_eq!(view.clusters("shop/web-remote"), set(&["b"]));
    assert_eq!(
        view.backends("shop/only-b"),
        BTreeSet::from([("b".into(), "10.2.7.1".into(), "active".into())])
    );
    assert_eq!(view.status.peers["b"].health_changes, 2);
    let log = agent.log_text();
    assert_eq!(count_lines(&log, &["backends are restored", "peer=b"]), 1);
    assert_eq!(
        count_lines(&log, &["listed the peer's store", "peer=b"]),
        1,
        "the watch resumed: no relist when the peer came back"
    );
    let metrics = agent::api::get_raw(agent.api, "/metrics").await.unwrap();
    let metrics = String::from_utf8(metrics).unwrap();
    assert!(
        metrics
            .contains("clustermesh_agent_peer_health_changes_total{peer=\"b\",health=\"stale\"} 1"),
        "{metrics}"
    );

    // b's web pods go: their backends and ipcache entries leave the tables.
    b.set_services(&peer_b_services(&[]));
    let view = agent
        .wait_for("b's web pods gone", |v| {
            v.clusters("shop/web") == set(&["a"]) && !v.ipcache_has("10.2.1.1", "b")
        })
        .await;
    assert_eq!(
        view.clusters("shop/only-b"),
        set(&["b"]),
        "other services untouched"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_clusters_merge_failover_and_withdrawal() {
    let work = tempfile::tempdir().unwrap();
    let local = common::cluster_config("a", 1);
    let local_dir = work.path().join("a");
    std::fs::create_dir_all(&local_dir).unwrap();
    let a_services = vec![
        Svc::new("shop", "web").global().ready(&[1]),
        // No local backend is active: local affinity falls back to both remotes.
        Svc::new("shop", "web-local")
            .global()
            .annotate("service.cilium.io/affinity", "local")
            .not_ready(&[1]),
        Svc::new("shop", "web-remote")
            .global()
            .annotate("service.cilium.io/affinity", "remote")
            .ready(&[1]),
    ];
    write_manifests(&local_dir, &manifests("a", 1, &a_services));
    let peer_services = |shared: &'static str| {
        vec![
            Svc::new("shop", "web")
                .global()
                .annotate("service.cilium.io/shared", shared)
                .ready(&[1]),
            Svc::new("shop", "web-local").global().ready(&[1]),
            Svc::new("shop", "web-remote").global().ready(&[1]),
        ]
    };
    let b = Peer::start("b", 2, &peer_services("true")).await;
    let mut c = Peer::start("c", 3, &peer_services("false")).await;
    let peers = peers_dir(work.path(), &[&b, &c]);
    let agent = Agent::start(
        &local,
        &local_dir,
        work.path(),
        &[
            "--peers-dir".into(),
            peers.to_str().unwrap().into(),
            "--grace".into(),
            "1s".into(),
        ],
    )
    .await;
    let view = agent
        .wait_for("b and c synced", |v| {
            v.peer_synced("b") && v.peer_synced("c") && v.clusters("shop/web-local").len() == 2
        })
        .await;
    assert_eq!(
        view.clusters("shop/web"),
        set(&["a", "b"]),
        "c keeps its web backends private"
    );
    assert_eq!(
        view.clusters("shop/web-local"),
        set(&["b", "c"]),
        "no active local backend: both remotes"
    );
    assert_eq!(view.clusters("shop/web-remote"), set(&["b", "c"]));
    assert_eq!(view.status.peers.len(), 2);

    // c dies: only c is withdrawn.
    c.kill().await;
    let view = agent
        .wait_for("c stale", |v| {
            v.peer_health("c") == Some(ClusterHealth::Stale)
                && v.clusters("shop/web-local") == set(&["b"])
        })
        .await;
    assert_eq!(view.peer_health("b"), Some(ClusterHealth::Healthy));
    assert_eq!(view.clusters("shop/web-remote"), set(&["b"]));
    c.revive().await;
    agent
        .wait_for("c back", |v| {
            v.peer_health("c") == Some(ClusterHealth::Healthy)
                && v.clusters("shop/web-local") == set(&["b", "c"])
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_with_the_local_cluster_id_is_refused() {
    let work = tempfile::tempdir().unwrap();
    let local = common::cluster_config("a", 1);
    let local_dir = work.path().join("a");
    std::fs::create_dir_all(&local_dir).unwrap();
    write_manifests(
        &local_dir,
        &manifests("a", 1, &[Svc::new("shop", "web").global().ready(&[1])]),
    );
    // d claims id 1, a's own.
    let d = Peer::start("d", 1, &[Svc::new("shop", "web").global().ready(&[1])]).await;
    let peers = peers_dir(work.path(), &[&d]);
    let agent = Agent::start(
        &local,
        &local_dir,
        work.path(),
        &["--peers-dir".into(), peers.to_str().unwrap().into()],
    )
    .await;
    let view = agent
        .wait_for("d refused", |v| {
            v.status.local_synced
                && v.status
                    .peers
                    .get("d")
                    .is_some_and(|p| p.phase == agent::remote::Phase::Refused)
        })
        .await;
    let error = view.status.peers["d"]
        .last_error
        .clone()
        .unwrap_or_default();
    assert!(error.contains("id 1"), "the error names the clash: {error}");
    assert_eq!(
        view.clusters("shop/web"),
        set(&["a"]),
        "nothing of d is used"
    );
    assert!(view.ipcache.iter().all(|e| e.cluster.as_str() == "a"));
}

/// Two peer files whose clusters claim one id: one is followed, the other refused with the
/// clash named (direct reads used to follow both); when the first goes, the second is taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_peers_with_one_cluster_id_are_not_both_used() {
    let work = tempfile::tempdir().unwrap();
    let local = common::cluster_config("a", 1);
    let local_dir = work.path().join("a");
    std::fs::create_dir_all(&local_dir).unwrap();
    let web = [Svc::new("shop", "web").global().ready(&[1])];
    write_manifests(&local_dir, &manifests("a", 1, &web));
    let b = Peer::start("b", 2, &web).await;
    let c = Peer::start("c", 2, &web).await;
    let peers = peers_dir(work.path(), &[&b, &c]);
    let agent = Agent::start(
        &local,
        &local_dir,
        work.path(),
        &["--peers-dir".into(), peers.to_str().unwrap().into()],
    )
    .await;
    let refused = |v: &common::View, peer: &str| {
        v.status
            .peers
            .get(peer)
            .is_some_and(|p| p.phase == agent::remote::Phase::Refused)
    };
    let view = agent
        .wait_for("one of b and c synced, the other refused", |v| {
            (v.peer_synced("b") && refused(v, "c")) || (v.peer_synced("c") && refused(v, "b"))
        })
        .await;
    let (kept, clashing) = if view.peer_synced("b") {
        ("b", "c")
    } else {
        ("c", "b")
    };
    let error = view.status.peers[clashing]
        .last_error
        .clone()
        .unwrap_or_default();
    assert!(
        error.contains(&format!("which peer {kept} already uses")),
        "the refusal names the clash: {error}"
    );
    assert_eq!(view.clusters("shop/web"), set(&["a", kept]));

    std::fs::remove_file(peers.join(kept)).unwrap();
    agent
        .wait_for("the other peer taken once the id is free", |v| {
            v.peer_synced(clashing) && v.clusters("shop/web") == set(&["a", clashing])
        })
        .await;
}
