//! Three members over raft, ours beside three etcd members with the same flags: replication,
//! identical revisions and hashes, watches on any member, leases kept by the leader, leader
//! loss and a member's restart. Then what only our store needs proving: bad cluster
//! descriptions and a member of another cluster are refused with a clear error while the
//! running members keep serving.

mod common;

use std::process::Command;
use std::time::Duration;

use common::embedded_backend;
use etcd_client::{Client, GetOptions, LeaseGrantOptions, PutOptions, WatchOptions};
use testkit::Backend;
use testkit::cluster::StoreCluster;

async fn start(backend: Backend) -> StoreCluster {
    let name = backend.name();
    StoreCluster::start(backend, 3)
        .await
        .unwrap_or_else(|e| panic!("start a 3-member {name} cluster: {e}"))
}

/// Who each live member says leads, and the member ids, over `Maintenance.Status`.
async fn statuses(cluster: &StoreCluster, members: &[usize]) -> Vec<(u64, u64, u64)> {
    let mut out = Vec::new();
    for &i in members {
        let status = cluster.client(i).await.status().await.expect("status");
        let header = status.header().expect("header");
        out.push((header.member_id(), status.leader(), status.raft_term()));
    }
    out
}

async fn hash_kv(client: &mut Client, revision: i64) -> u32 {
    client.hash_kv(revision).await.expect("hash_kv").hash()
}

async fn replicates_and_survives_leader_loss(backend: Backend) {
    let mut cluster = start(backend).await;

    // A write on each member; every member reads all of them at the same revisions.
    let mut revisions = Vec::new();
    for i in 0..3 {
        let mut client = cluster.client(i).await;
        let put = client
            .put(format!("r/{i}"), format!("from m{i}"), None)
            .await
            .unwrap_or_else(|e| panic!("put on m{i}: {e}\n{}", cluster.log_tail(i)));
        revisions.push(put.header().expect("header").revision());
    }
    assert!(
        revisions.windows(2).all(|w| w[1] == w[0] + 1),
        "{revisions:?}"
    );
    let last = revisions[2];
    for i in 0..3 {
        let got = cluster
            .client(i)
            .await
            .get("r/", Some(GetOptions::new().with_prefix()))
            .await
            .expect("linearizable get");
        assert_eq!(got.header().expect("header").revision(), last, "m{i}");
        let mods: Vec<i64> = got.kvs().iter().map(|kv| kv.mod_revision()).collect();
        assert_eq!(mods, revisions, "m{i} holds every write at its revision");
    }

    // Same history, same hash, on every member (what a corruption check compares).
    let mut hashes = Vec::new();
    for i in 0..3 {
        hashes.push(hash_kv(&mut cluster.client(i).await, last).await);
    }
    assert!(hashes.windows(2).all(|w| w[0] == w[1]), "{hashes:?}");

    // Every member names the same leader, one of them, and headers carry the raft term.
    let seen = statuses(&cluster, &[0, 1, 2]).await;
    let ids: Vec<u64> = seen.iter().map(|s| s.0).collect();
    assert!(
        seen.iter().all(|s| s.1 == seen[0].1 && ids.contains(&s.1)),
        "{seen:?}"
    );
    assert!(seen.iter().all(|s| s.2 >= 1), "{seen:?}");
    let listed = cluster
        .client(1)
        .await
        .member_list()
        .await
        .expect("member list");
    let mut listed: Vec<(u64, String)> = listed
        .members()
        .iter()
        .map(|m| (m.id(), m.name().to_owned()))
        .collect();
    listed.sort();
    let mut expected: Vec<(u64, String)> = ids
        .iter()
        .zip(0..3)
        .map(|(id, i)| (*id, format!("m{i}")))
        .collect();
    expected.sort();
    assert_eq!(listed, expected);

    // A watch on one member sees writes made through another, in order.
    let leader = cluster.leader().await.expect("leader");
    let follower = (leader + 1) % 3;
    let other = (leader + 2) % 3;
    let mut watch_client = cluster.client(follower).await;
    let (mut stream, _) =
        common::watch_created(&mut watch_client, "w/", WatchOptions::new().with_prefix()).await;
    let mut writer = cluster.client(other).await;
    for n in 0..5 {
        writer.put(format!("w/{n}"), "x", None).await.expect("put");
    }
    let seen_keys: Vec<String> = common::events(&mut stream, 5)
        .await
        .into_iter()
        .map(|event| event.1)
        .collect();
    let expected: Vec<String> = (0..5).map(|n| format!("w/{n}")).collect();
    assert_eq!(seen_keys, expected);

    // The leader dies: the others elect one of themselves and go on taking writes.
    cluster.kill(leader);
    let new_leader = cluster.leader().await.expect("a new leader");
    assert_ne!(new_leader, leader);
    let mut after = 0;
    for i in (0..3).filter(|&i| i != leader) {
        let put = cluster
            .client(i)
            .await
            .put("r/after", format!("m{i}"), None)
            .await
            .unwrap_or_else(|e| panic!("put on surviving m{i}: {e}\n{}", cluster.log_tail(i)));
        after = put.header().expect("header").revision();
    }
    // The old leader comes back and catches up.
    cluster.restart(leader).await.expect("restart");
    let got = cluster
        .client(leader)
        .await
        .get("r/after", None)
        .await
        .unwrap_or_else(|e| {
            panic!(
                "get on the restarted m{leader}: {e}\n{}",
                cluster.log_tail(leader)
            )
        });
    assert_eq!(got.kvs().first().map(|kv| kv.mod_revision()), Some(after));
    let mut hashes = Vec::new();
    for i in 0..3 {
        hashes.push(hash_kv(&mut cluster.client(i).await, after).await);
    }
    assert!(
        hashes.windows(2).all(|w| w[0] == w[1]),
        "after the restart: {hashes:?}"
    );
}

async fn leases_are_kept_by_the_leader(backend: Backend) {
    let cluster = start(backend).await;
    let leader = cluster.leader().await.expect("leader");
    let follower = (leader + 1) % 3;
    let mut client = cluster.client(follower).await;
    // Granted, attached and kept alive through a follower: keepalives must reach the leader,
    // which alone expires leases.
    let kept = client.lease_grant(2, None).await.expect("grant").id();
    let dropped = client
        .lease_grant(2, Some(LeaseGrantOptions::new()))
        .await
        .expect("grant")
        .id();
    let with_lease = |id| Some(PutOptions::new().with_lease(id));
    client
        .put("l/kept", "1", with_lease(kept))
        .await
        .expect("put");
    client
        .put("l/dropped", "1", with_lease(dropped))
        .await
        .expect("put");
    let (mut keeper, mut responses) = client.lease_keep_alive(kept).await.expect("keepalive");
    for _ in 0..10 {
        keeper.keep_alive().await.expect("send keepalive");
        let answer = responses.message().await.expect("keepalive answer");
        assert_eq!(answer.map(|a| a.ttl()), Some(2));
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // 5 s later: the kept lease lives, the other expired on the leader and its key is gone
    // on every member.
    for i in 0..3 {
        let mut c = cluster.client(i).await;
        let got = c
            .get("l/", Some(GetOptions::new().with_prefix()))
            .await
            .expect("get");
        let keys: Vec<&[u8]> = got.kvs().iter().map(|kv| kv.key()).collect();
        assert_eq!(keys, [b"l/kept".as_slice()], "m{i}");
        let ttl = c.lease_time_to_live(kept, None).await.expect("ttl");
        assert!((1..=2).contains(&ttl.ttl()), "m{i}: {}", ttl.ttl());
    }
}

#[tokio::test]
async fn etcd_replicates_and_survives_leader_loss() {
    replicates_and_survives_leader_loss(Backend::Etcd).await;
}

#[tokio::test]
async fn embedded_replicates_and_survives_leader_loss() {
    replicates_and_survives_leader_loss(embedded_backend()).await;
}

#[tokio::test]
async fn etcd_leases_are_kept_by_the_leader() {
    leases_are_kept_by_the_leader(Backend::Etcd).await;
}

#[tokio::test]
async fn embedded_leases_are_kept_by_the_leader() {
    leases_are_kept_by_the_leader(embedded_backend()).await;
}

/// Runs `kvstore serve` with `args` and returns its exit status and stderr; it must exit
/// on its own (a refused configuration), not serve.
fn serve_refused(args: &[&str]) -> String {
    let dir = tempfile::tempdir().expect("temp dir");
    let output = Command::new(env!("CARGO_BIN_EXE_kvstore"))
        .arg("serve")
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .args(["--listen-client-urls", "http://127.0.0.1:0"])
        .args(args)
        .output()
        .expect("run kvstore");
    assert!(!output.status.success(), "{args:?} was accepted");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn inconsistent_cluster_descriptions_are_refused_naming_the_problem() {
    let two = "a=http://127.0.0.1:1,b=http://127.0.0.1:2";
    for (args, expected) in [
        (
            vec!["--name", "c", "--initial-cluster", two],
            "no member named \"c\"",
        ),
        (
            vec![
                "--name",
                "a",
                "--initial-cluster",
                two,
                "--initial-advertise-peer-urls",
                "http://127.0.0.1:9",
            ],
            "--initial-advertise-peer-urls says",
        ),
        (
            vec!["--name", "a", "--initial-cluster", "a=http://127.0.0.1:1,b"],
            "is not name=url",
        ),
        (
            vec![
                "--name",
                "a",
                "--initial-cluster",
                "a=http://127.0.0.1:1,b=http://127.0.0.1:1",
            ],
            "is given to both",
        ),
        (
            vec![
                "--name",
                "a",
                "--initial-cluster",
                two,
                "--initial-cluster-state",
                "existing",
            ],
            "joining a running cluster needs MemberAdd",
        ),
    ] {
        let stderr = serve_refused(&args);
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
}

/// A member whose cluster token differs (another cluster that names one of our peer URLs)
/// talks to our member: every message is refused, saying why, and our cluster goes on.
#[tokio::test]
async fn a_member_of_another_cluster_is_refused_and_the_cluster_keeps_serving() {
    let cluster = start(embedded_backend()).await;
    let work = tempfile::tempdir().expect("temp dir");
    let ports = testkit::free_ports(2).expect("ports");
    let own = format!("http://127.0.0.1:{}", ports[1]);
    let initial = format!("x={own},y={}", cluster.member(0).peer_url());
    let log = std::fs::File::create(work.path().join("x.log")).expect("log");
    let mut foreign = Command::new(env!("CARGO_BIN_EXE_kvstore"))
        .arg("serve")
        .arg("--data-dir")
        .arg(work.path().join("x"))
        .args(["--name", "x", "--initial-cluster-token", "elsewhere"])
        .arg("--initial-cluster")
        .arg(&initial)
        .arg("--listen-client-urls")
        .arg(format!("http://127.0.0.1:{}", ports[0]))
        .env("RUST_LOG", "info")
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("start the foreign member");
    // Its pre-votes go to our m0 for a few election timeouts.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let refused = loop {
        let ours = std::fs::read_to_string(cluster.member(0).log_path()).unwrap_or_default();
        let theirs = std::fs::read_to_string(work.path().join("x.log")).unwrap_or_default();
        if ours.contains("cluster ID mismatch") && theirs.contains("cluster ID mismatch") {
            break true;
        }
        if std::time::Instant::now() > deadline {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let _ = foreign.kill();
    let _ = foreign.wait();
    assert!(
        refused,
        "both sides should say why: ours:\n{}\ntheirs:\n{}",
        cluster.log_tail(0),
        std::fs::read_to_string(work.path().join("x.log")).unwrap_or_default()
    );
    let mut client = cluster.client(0).await;
    client.put("still", "serving", None).await.expect("put");
    let leader = cluster
        .leader()
        .await
        .expect("our cluster still has its leader");
    let seen = statuses(&cluster, &[0, 1, 2]).await;
    assert!(seen.iter().all(|s| s.1 == seen[leader].0), "{seen:?}");
}

/// Writes `n` keys under `prefix` through `client`, deleting every fifth, and returns the
/// revision of the last write.
async fn churn(client: &mut Client, prefix: &str, n: usize) -> i64 {
    let mut last = 0;
    for k in 0..n {
        let put = client
            .put(format!("{prefix}{k}"), format!("v{k}"), None)
            .await
            .expect("put");
        last = put.header().expect("header").revision();
        if k % 5 == 4 {
            let del = client
                .delete(format!("{prefix}{}", k - 2), None)
                .await
                .expect("delete");
            last = del.header().expect("header").revision();
        }
    }
    last
}

/// A member that missed more than the log keeps is sent a snapshot of the store: frozen with
/// a watch open, it comes back with the same state and hash as the others, and its watch
/// delivers every revision it missed, in order, once; after a restart, a watch from before
/// the snapshot replays the history the snapshot carried.
#[tokio::test]
async fn a_member_behind_the_log_catches_up_by_snapshot_and_its_watches_miss_nothing() {
    let cluster = StoreCluster::start_with_args(
        embedded_backend(),
        3,
        vec!["--snapshot-count".into(), "20".into()],
    )
    .await
    .expect("start");
    let leader = cluster.leader().await.expect("leader");
    let behind = (leader + 1) % 3;
    let mut writer = cluster.client(leader).await;
    let start = churn(&mut writer, "s/", 5).await;
    let mut lagging = cluster.client(behind).await;
    let (mut stream, _) = common::watch_created(
        &mut lagging,
        "s/",
        WatchOptions::new()
            .with_prefix()
            .with_start_revision(start + 1),
    )
    .await;

    // Frozen long enough for the leader to give up on what it had sent and probe again, while
    // its log moves on past what the member holds.
    cluster.freeze(behind);
    churn(&mut writer, "s/", 20).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let last = churn(&mut writer, "s/", 150).await;
    cluster.thaw(behind);

    // Every revision after `start`, once and in order, across the snapshot's install.
    let events = common::events(&mut stream, (last - start) as usize).await;
    let revisions: Vec<i64> = events.iter().map(|e| e.3).collect();
    let expected: Vec<i64> = (start + 1..=last).collect();
    assert_eq!(revisions, expected, "{}", cluster.log_tail(behind));
    let log = std::fs::read_to_string(cluster.member(behind).log_path()).unwrap_or_default();
    assert!(
        log.contains("installing a snapshot from the leader"),
        "the member should have caught up by snapshot:\n{}",
        cluster.log_tail(behind)
    );

    let mut hashes = Vec::new();
    for i in 0..3 {
        hashes.push(hash_kv(&mut cluster.client(i).await, last).await);
    }
    assert!(hashes.windows(2).all(|w| w[0] == w[1]), "{hashes:?}");

    // It goes on following the log, and a restart keeps what the snapshot brought.
    let after = churn(&mut writer, "t/", 5).await;
    let mut cluster = cluster;
    cluster.restart(behind).await.expect("restart");
    let mut back = cluster.client(behind).await;
    let got = back
        .get("t/", Some(GetOptions::new().with_prefix()))
        .await
        .expect("get");
    assert_eq!(got.header().expect("header").revision(), after);
    let (mut replay, _) = common::watch_created(
        &mut back,
        "s/",
        WatchOptions::new()
            .with_prefix()
            .with_start_revision(start + 1),
    )
    .await;
    let replayed: Vec<i64> = common::events(&mut replay, (last - start) as usize)
        .await
        .iter()
        .map(|e| e.3)
        .collect();
    assert_eq!(replayed, expected);
}

/// `etcdctl snapshot save` backs up a member of ours; `kvstore restore` makes every member of
/// a new cluster from that file; the new cluster holds the data and history as they were and
/// takes writes after them.
#[tokio::test]
async fn a_snapshot_saved_with_etcdctl_restores_a_new_cluster() {
    let mut cluster = start(embedded_backend()).await;
    let mut client = cluster.client(0).await;
    let first = churn(&mut client, "b/", 10).await;
    let last = churn(&mut client, "b/", 10).await;
    let before = client
        .get("b/", Some(GetOptions::new().with_prefix()))
        .await
        .expect("get");
    let hash = hash_kv(&mut client, last).await;

    let work = tempfile::tempdir().expect("temp dir");
    let file = work.path().join("backup.db");
    let endpoint = cluster.member(1).endpoint();
    let saved = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg(format!(
            "--endpoints={}",
            endpoint.trim_start_matches("http://")
        ))
        .args(["snapshot", "save"])
        .arg(&file)
        .output()
        .expect("run etcdctl");
    assert!(
        saved.status.success(),
        "etcdctl snapshot save: {}",
        String::from_utf8_lossy(&saved.stderr)
    );

    for i in 0..3 {
        cluster.kill(i);
    }
    for i in 0..3 {
        let dir = cluster.member(i).data_dir().to_path_buf();
        std::fs::remove_dir_all(&dir).expect("remove the old data dir");
        let restored = Command::new(env!("CARGO_BIN_EXE_kvstore"))
            .arg("restore")
            .arg(&file)
            .arg("--data-dir")
            .arg(&dir)
            .output()
            .expect("run kvstore restore");
        assert!(
            restored.status.success(),
            "kvstore restore: {}",
            String::from_utf8_lossy(&restored.stderr)
        );
    }
    // A restore never overwrites a store.
    let again = Command::new(env!("CARGO_BIN_EXE_kvstore"))
        .arg("restore")
        .arg(&file)
        .arg("--data-dir")
        .arg(cluster.member(0).data_dir())
        .output()
        .expect("run kvstore restore");
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("not empty"));

    for i in 0..3 {
        cluster.restart(i).await.expect("start the restored member");
    }
    cluster
        .leader()
        .await
        .expect("the restored cluster elects a leader");
    for i in 0..3 {
        let mut c = cluster.client(i).await;
        let got = c
            .get("b/", Some(GetOptions::new().with_prefix()))
            .await
            .expect("get");
        assert_eq!(common::kvs(got.kvs()), common::kvs(before.kvs()), "m{i}");
        assert_eq!(got.header().expect("header").revision(), last, "m{i}");
        assert_eq!(hash_kv(&mut c, last).await, hash, "m{i}: same history");
        let old = c
            .get("b/0", Some(GetOptions::new().with_revision(first)))
            .await
            .expect("historical get");
        assert_eq!(old.kvs().len(), 1, "history came along");
    }
    let put = cluster
        .client(2)
        .await
        .put("b/new", "1", None)
        .await
        .expect("put");
    assert_eq!(put.header().expect("header").revision(), last + 1);
}

/// A follower's store is changed behind raft's back (a record rewritten in place, as a bad
/// disk or a hand edit would): the leader's corruption check finds that its history hash
/// differs from the majority's, raises a CORRUPT alarm naming it through the log, and every
/// member then refuses reads and writes, as etcd does, until the alarm is disarmed.
#[tokio::test]
async fn a_member_whose_history_diverged_gets_a_corrupt_alarm() {
    use etcd_client::{AlarmAction, AlarmOptions, AlarmType};
    use kvstore::server::storage::{Batch, SledStorage, Storage};

    let mut cluster = StoreCluster::start_with_args(
        embedded_backend(),
        3,
        vec!["--corrupt-check-time".into(), "1s".into()],
    )
    .await
    .expect("start a 3-member cluster");
    let mut client = cluster.client_all().await;
    let last = churn(&mut client, "/k/", 20).await;
    let leader = cluster.leader().await.expect("leader");
    let victim = (leader + 1) % 3;
    let victim_id = statuses(&cluster, &[victim]).await[0].0;
    // The victim holds the whole history before it is stopped.
    let mut on_victim = cluster.client(victim).await;
    let caught_up = async {
        loop {
            let got = on_victim
                .get("/k/", Some(GetOptions::new().with_serializable()))
                .await;
            if got.is_ok_and(|r| r.header().is_some_and(|h| h.revision() >= last)) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(20), caught_up)
        .await
        .expect("the victim catches up");
    cluster.kill(victim);
    {
        let storage = SledStorage::open(cluster.member(victim).data_dir()).expect("open store");
        let mut loaded = storage.load().expect("load");
        let (rev, mut record) = loaded
            .records
            .pop()
            .filter(|(_, r)| !r.tombstone)
            .or_else(|| loaded.records.into_iter().find(|(_, r)| !r.tombstone))
            .expect("a record to damage");
        record.value = b"not what was written".to_vec();
        storage
            .commit(Batch {
                records: vec![(rev, record)],
                ..Batch::default()
            })
            .expect("rewrite a record in place");
    }
    cluster.restart(victim).await.expect("restart the victim");

    let alarms = async {
        loop {
            if let Ok(r) = client.alarm(AlarmAction::Get, AlarmType::None, None).await
                && !r.alarms().is_empty()
            {
                return r
                    .alarms()
                    .iter()
                    .map(|a| (a.member_id(), a.alarm()))
                    .collect::<Vec<_>>();
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    let raised = tokio::time::timeout(Duration::from_secs(30), alarms)
        .await
        .unwrap_or_else(|_| {
            panic!(
                "no alarm was raised; leader's log:\n{}",
                cluster.log_tail(leader)
            )
        });
    assert_eq!(raised, vec![(victim_id, AlarmType::Corrupt)]);
    assert!(
        cluster
            .log_tail(leader)
            .contains("a member's history differs from the others'"),
        "{}",
        cluster.log_tail(leader)
    );
    // Every member refuses reads and writes while the alarm stands.
    for i in 0..3 {
        let mut c = cluster.client(i).await;
        let put = c.put("/after", "x", None).await.expect_err("put refused");
        assert!(put.to_string().contains("corrupt cluster"), "m{i}: {put}");
        let get = c.get("/k/", None).await.expect_err("get refused");
        assert!(get.to_string().contains("corrupt cluster"), "m{i}: {get}");
    }
    // Disarming (what `etcdctl alarm disarm` sends) clears it everywhere. The damaged member
    // is stopped first: while it runs, the next check (every second here) raises it again.
    cluster.kill(victim);
    let mut client = cluster.client(leader).await;
    let mut options = AlarmOptions::new();
    options.with_member(victim_id);
    client
        .alarm(AlarmAction::Deactivate, AlarmType::Corrupt, Some(options))
        .await
        .expect("disarm");
    let listed = client
        .alarm(AlarmAction::Get, AlarmType::None, None)
        .await
        .expect("list");
    assert_eq!(listed.alarms().len(), 0, "alarms are left after disarming");
    client
        .put("/after", "x", None)
        .await
        .expect("writes are accepted again");
}
