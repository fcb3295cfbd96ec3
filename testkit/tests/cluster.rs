//! A three-member etcd cluster through [`StoreCluster`]: replication, leader loss and a member
//! restart, so a broken cluster helper shows up here rather than as mysterious failures in the
//! suites that use it. Runs against real etcd only; `kvstore/tests/replication.rs` runs the
//! same helper on our store.

use std::process::Command;

use testkit::Backend;
use testkit::cluster::StoreCluster;

/// Starts the cluster, or `None` (after saying so) when there is no etcd to run.
async fn start_etcd(n: usize) -> Option<StoreCluster> {
    match StoreCluster::start(Backend::Etcd, n).await {
        Ok(cluster) => Some(cluster),
        Err(testkit::Error::Spawn { program, source })
            if source.kind() == std::io::ErrorKind::NotFound =>
        {
            eprintln!(
                "skipped: {} not found (install etcd or set ETCD_BIN)",
                program.display()
            );
            None
        }
        Err(e) => panic!("start etcd cluster: {e}"),
    }
}

#[tokio::test]
async fn etcd_cluster_replicates_survives_leader_loss_and_restarts_a_member() {
    let Some(mut cluster) = start_etcd(3).await else {
        return;
    };
    assert_eq!(cluster.endpoints().len(), 3);

    // A write on one member is visible, at the same revision, to a linearizable read on another.
    let mut c0 = cluster.client(0).await;
    let put = c0.put("cluster/a", "1", None).await.expect("put on m0");
    let rev = put.header().expect("header").revision();
    let mut c2 = cluster.client(2).await;
    let got = c2.get("cluster/a", None).await.expect("get on m2");
    assert_eq!(got.kvs().len(), 1, "m2 sees the put on m0");
    assert_eq!(got.kvs()[0].value(), b"1");
    assert_eq!(got.kvs()[0].mod_revision(), rev);

    let mut all = cluster.client_all().await;
    let got = all
        .get("cluster/a", None)
        .await
        .expect("get via all endpoints");
    assert_eq!(got.kvs()[0].mod_revision(), rev);

    check_member_list(&cluster);

    let leader = cluster.leader().await.expect("initial leader");
    assert!(leader < 3);
    cluster.kill(leader);
    let new_leader = cluster
        .leader()
        .await
        .expect("a new leader after killing the old one");
    assert_ne!(new_leader, leader, "the killed member cannot lead");

    let mut later = 0;
    for i in (0..3).filter(|&i| i != leader) {
        let mut client = cluster.client(i).await;
        let put = client
            .put("cluster/b", format!("from-m{i}"), None)
            .await
            .unwrap_or_else(|e| panic!("put on surviving m{i}: {e}\n{}", cluster.log_tail(i)));
        later = put.header().expect("header").revision();
    }
    assert!(later > rev);

    let old_pid = cluster.member(leader).pid();
    cluster
        .restart(leader)
        .await
        .expect("restart the old leader");
    assert_ne!(cluster.member(leader).pid(), old_pid);
    let mut back = cluster.client(leader).await;
    let got = back.get("cluster/b", None).await.unwrap_or_else(|e| {
        panic!(
            "get on restarted m{leader}: {e}\n{}",
            cluster.log_tail(leader)
        )
    });
    assert_eq!(got.kvs().len(), 1, "the restarted member caught up");
    assert_eq!(got.kvs()[0].mod_revision(), later);
    cluster
        .leader()
        .await
        .expect("a leader once all three are back");
}

/// `etcdctl member list` over all endpoints lists each member by name and client URL; skipped
/// when there is no etcdctl.
fn check_member_list(cluster: &StoreCluster) {
    let output = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={}", cluster.endpoints().join(",")))
        .args(["--dial-timeout=5s", "--command-timeout=20s"])
        .args(["member", "list", "-w", "json"])
        .output();
    let output = match output {
        Ok(output) => output,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            eprintln!("skipped the member list check: etcdctl not found");
            return;
        }
        Err(e) => panic!("run etcdctl: {e}"),
    };
    assert!(
        output.status.success(),
        "etcdctl member list: {}: {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let list: serde_json::Value = serde_json::from_slice(&output.stdout).expect("member list JSON");
    let members = list["members"].as_array().expect("members array");
    assert_eq!(members.len(), 3, "{list}");
    for i in 0..3 {
        let member = cluster.member(i);
        let listed = members
            .iter()
            .find(|m| m["name"] == member.name())
            .unwrap_or_else(|| panic!("{} missing from {list}", member.name()));
        assert_eq!(
            listed["clientURLs"][0],
            member.endpoint().as_str(),
            "{list}"
        );
        assert_eq!(listed["peerURLs"][0], member.peer_url().as_str(), "{list}");
    }
}
