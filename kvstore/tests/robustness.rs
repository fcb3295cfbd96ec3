//! The store under faults, judged by checkers rather than by expected values: clients issue
//! random puts, gets and deletes over a few keys, and watchers follow prefixes, while the
//! store is SIGKILLed and restarted and the link to it (a fault proxy between every client and
//! the store) is partitioned, slowed by 75±50 ms and broken. Then:
//! - the recorded history must be linearizable (`testkit::history`): no stale read, no
//!   acknowledged write lost to a crash, revisions a real-time order;
//! - every watcher's stream, across its reconnects, must be ordered, unique, atomic per
//!   revision, gap-free and complete up to the last acknowledged write under its prefix.
//!
//! The same scenarios run against etcd, which validates the harness. The size is small by
//! default; `ROBUSTNESS_SECONDS` (default 6) lengthens each run and `ROBUSTNESS_ROUNDS`
//! (default 1) repeats it. Two scenarios: a single member (crashes, client link faults), and
//! three members with member faults: SIGKILL of the leader and of a follower, a member cut
//! off, slowed and made lossy by a fault proxy in front of its peer port, and a member down
//! while the others compact their log past it, so that it catches up by snapshot.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::embedded_backend;
use testkit::cluster::StoreCluster;
use testkit::faultproxy::{Fault, FaultProxy};
use testkit::history::{ClientId, History, Op, OpResult, Outcome, Recorder, check_watch_resume};
use testkit::traffic::{Watcher, Workload, last_write, run_client};
use testkit::{Backend, StoreOptions, StoreProcess};
use tokio::time::Instant;

const CLIENTS: ClientId = 4;
const KEYS: [&str; 6] = ["/r/a/0", "/r/a/1", "/r/a/2", "/r/b/0", "/r/b/1", "/r/b/2"];
/// How long a watcher may take to catch up once the traffic stopped.
const CATCH_UP: Duration = Duration::from_secs(20);

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).map_or(default, |v| {
        v.trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a number"))
    })
}

/// What happens to the store and its link, in turn, each for a slice of the run.
#[derive(Debug, Clone)]
enum Step {
    Link(Fault),
    /// SIGKILL, then a restart on the same data dir and port.
    Crash,
}

fn schedule() -> Vec<Step> {
    vec![
        Step::Link(Fault::Pass),
        Step::Link(Fault::Blackhole),
        Step::Link(Fault::Pass),
        Step::Crash,
        Step::Link(Fault::DEFAULT_DELAY),
        Step::Link(Fault::Drop { probability: 0.5 }),
        Step::Link(Fault::Pass),
        Step::Crash,
        Step::Link(Fault::Pass),
    ]
}

async fn round(backend: Backend, seconds: u64) {
    let name = backend.name();
    let mut store = StoreProcess::start(backend, StoreOptions::default())
        .await
        .unwrap_or_else(|e| panic!("start {name}: {e}"));
    let upstream = SocketAddr::from(([127, 0, 0, 1], store.port()));
    let (proxy, proxied) = FaultProxy::start(upstream).await.expect("fault proxy");
    let via_proxy = vec![format!("http://{proxied}")];
    let direct = vec![store.endpoint()];
    let options = store.connect_options();
    let start = store
        .client()
        .await
        .get("/r/", None)
        .await
        .expect("initial read")
        .header()
        .map_or(0, |h| h.revision())
        + 1;
    let watchers = [
        Watcher::start(via_proxy.clone(), options.clone(), "all", "/r/", start),
        Watcher::start(via_proxy.clone(), options.clone(), "a", "/r/a/", start),
        Watcher::start(direct.clone(), options.clone(), "b-direct", "/r/b/", start),
    ];

    let recorder = Recorder::new();
    let mut workload = Workload::new(&KEYS);
    workload.request_timeout = Duration::from_secs(1);
    let steps = schedule();
    let slice = Duration::from_secs(seconds).max(Duration::from_secs(1)) / steps.len() as u32;
    let until = Instant::now() + slice * steps.len() as u32;
    let mut clients = tokio::task::JoinSet::new();
    for id in 0..CLIENTS {
        clients.spawn(run_client(
            via_proxy.clone(),
            options.clone(),
            id,
            workload.clone(),
            recorder.clone(),
            until,
        ));
    }
    for step in steps {
        match &step {
            Step::Link(fault) => proxy.set(fault.clone()).expect("a valid fault"),
            Step::Crash => {
                proxy.set(Fault::Pass).expect("pass");
                store.kill();
                store
                    .restart()
                    .await
                    .unwrap_or_else(|e| panic!("{name} restart: {e}\n{}", store.log_tail()));
            }
        }
        tokio::time::sleep(slice).await;
    }
    proxy.set(Fault::Pass).expect("pass");
    while let Some(done) = clients.join_next().await {
        done.expect("client task");
    }

    // A last read of every key, after everything else: an acknowledged write lost to a crash
    // shows here if no other read happened to catch it.
    let mut reader = store.client().await;
    let mut end = 0;
    for key in KEYS {
        let pending = recorder.begin(CLIENTS, Op::get(key));
        let resp = reader.get(key, None).await.expect("final read");
        end = resp.header().map_or(0, |h| h.revision());
        pending.ok(OpResult::Get {
            value: resp.kvs().first().map(|kv| kv.value().to_vec()),
            revision: end,
        });
    }
    let recorded = recorder.history();

    // The watchers, to the end of the run (the whole-prefix one to the store's last
    // revision, since it settles the writes whose answers were lost).
    let mut reopened = 0;
    let mut records = Vec::new();
    for watcher in watchers {
        reopened += watcher.reopened();
        let until = match watcher.prefix() {
            "/r/" => end,
            prefix => last_write(&recorded, prefix),
        };
        let record = watcher.finish(until, CATCH_UP).await.unwrap_or_else(|r| {
            panic!(
                "{name}: watcher {} stopped at {:?}, the run ended at revision {until}",
                r.watcher,
                r.events.last()
            )
        });
        records.push(record);
    }
    assert!(reopened > 0, "{name}: the faults broke no watch");
    let history = recorded.settle_unknown_writes(&records[0]);
    report(name, &recorded, &history);
    for record in &records {
        history
            .check_watch(record)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    let summary = history
        .check_linearizable()
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    eprintln!("{name}: {summary:?}, proxy {:?}", proxy.stats());
    // A watch opened afterwards from the start sees what the first watcher saw.
    let replay = Watcher::start(direct, options, "all-replayed", "/r/", start)
        .finish(end, CATCH_UP)
        .await
        .unwrap_or_else(|_| panic!("{name}: the replaying watcher did not catch up"));
    check_watch_resume(&records[0], &replay).unwrap_or_else(|e| panic!("{name}: {e}"));
    proxy.stop().await;
}

/// What happens to the cluster, in turn, each for a slice of the run.
#[derive(Debug, Clone)]
enum MemberStep {
    Calm,
    /// SIGKILL the leader (or a follower), restart it a slice later.
    KillLeader,
    KillFollower,
    /// Fault what the others send to one follower.
    Peer(Fault),
    /// Restart whoever is down.
    Revive,
}

fn member_schedule() -> Vec<MemberStep> {
    vec![
        MemberStep::Calm,
        MemberStep::KillLeader,
        MemberStep::Revive,
        MemberStep::Peer(Fault::Blackhole),
        MemberStep::Peer(Fault::DEFAULT_DELAY),
        MemberStep::Peer(Fault::Drop { probability: 0.5 }),
        MemberStep::Calm,
        // Down long enough for the others to compact past it (snapshot count 50).
        MemberStep::KillFollower,
        MemberStep::Revive,
        MemberStep::Calm,
    ]
}

async fn cluster_round(backend: Backend, seconds: u64) {
    let name = backend.name();
    let mut cluster =
        StoreCluster::start_proxied(backend, 3, vec!["--snapshot-count".into(), "50".into()])
            .await
            .unwrap_or_else(|e| panic!("start a 3-member {name} cluster: {e}"));
    let endpoints = cluster.endpoints();
    let options = etcd_client::ConnectOptions::new().with_connect_timeout(Duration::from_secs(2));
    let start = cluster
        .client(0)
        .await
        .get("/r/", None)
        .await
        .expect("initial read")
        .header()
        .map_or(0, |h| h.revision())
        + 1;
    // Watchers reconnect through whichever member answers, so they resume across members.
    let watchers = [
        Watcher::start(endpoints.clone(), options.clone(), "all", "/r/", start),
        Watcher::start(endpoints.clone(), options.clone(), "a", "/r/a/", start),
        Watcher::start(
            vec![endpoints[2].clone()],
            options.clone(),
            "b-m2",
            "/r/b/",
            start,
        ),
    ];
    let recorder = Recorder::new();
    let mut workload = Workload::new(&KEYS);
    workload.request_timeout = Duration::from_secs(2);
    let steps = member_schedule();
    let slice = Duration::from_secs(seconds).max(Duration::from_secs(1)) / steps.len() as u32;
    let until = Instant::now() + slice * steps.len() as u32;
    let mut clients = tokio::task::JoinSet::new();
    for id in 0..CLIENTS {
        // Each client talks to one member: a fault on that member is that client's problem.
        let member = endpoints[id as usize % endpoints.len()].clone();
        clients.spawn(run_client(
            vec![member],
            options.clone(),
            id,
            workload.clone(),
            recorder.clone(),
            until,
        ));
    }
    let mut down: Option<usize> = None;
    let mut faulted: Option<usize> = None;
    for step in steps {
        if let Some(i) = faulted.take() {
            cluster.peer_proxy(i).set(Fault::Pass).expect("pass");
        }
        match &step {
            MemberStep::Calm => {}
            MemberStep::KillLeader | MemberStep::KillFollower => {
                let leader = cluster
                    .leader()
                    .await
                    .unwrap_or_else(|e| panic!("{name}: no leader before a kill: {e}"));
                let victim = match step {
                    MemberStep::KillLeader => leader,
                    _ => (leader + 1) % 3,
                };
                cluster.kill(victim);
                down = Some(victim);
            }
            MemberStep::Revive => {
                if let Some(i) = down.take() {
                    cluster.restart(i).await.unwrap_or_else(|e| {
                        panic!("{name}: restart m{i}: {e}\n{}", cluster.log_tail(i))
                    });
                }
            }
            MemberStep::Peer(fault) => {
                let leader = cluster
                    .leader()
                    .await
                    .unwrap_or_else(|e| panic!("{name}: no leader before a partition: {e}"));
                let victim = (leader + 2) % 3;
                cluster
                    .peer_proxy(victim)
                    .set(fault.clone())
                    .expect("a valid fault");
                faulted = Some(victim);
            }
        }
        tokio::time::sleep(slice).await;
    }
    if let Some(i) = faulted.take() {
        cluster.peer_proxy(i).set(Fault::Pass).expect("pass");
    }
    if let Some(i) = down.take() {
        cluster.restart(i).await.expect("restart");
    }
    while let Some(done) = clients.join_next().await {
        done.expect("client task");
    }
    cluster.leader().await.expect("a leader after the run");

    // A last linearizable read of every key, through each member in turn.
    let mut end = 0;
    for (n, key) in KEYS.iter().enumerate() {
        let mut reader = cluster.client(n % 3).await;
        let pending = recorder.begin(CLIENTS, Op::get(*key));
        let resp = reader.get(*key, None).await.unwrap_or_else(|e| {
            panic!(
                "{name}: final read of {key} through m{}: {e}\n{}",
                n % 3,
                cluster.log_tails()
            )
        });
        end = resp.header().map_or(0, |h| h.revision());
        pending.ok(OpResult::Get {
            value: resp.kvs().first().map(|kv| kv.value().to_vec()),
            revision: end,
        });
    }
    let recorded = recorder.history();
    let mut records = Vec::new();
    for watcher in watchers {
        let until = match watcher.prefix() {
            "/r/" => end,
            prefix => last_write(&recorded, prefix),
        };
        let record = watcher.finish(until, CATCH_UP).await.unwrap_or_else(|r| {
            panic!(
                "{name}: watcher {} stopped at {:?}, the run ended at revision {until}",
                r.watcher,
                r.events.last()
            )
        });
        records.push(record);
    }
    let history = recorded.settle_unknown_writes(&records[0]);
    report(name, &recorded, &history);
    for record in &records {
        history
            .check_watch(record)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    let summary = history
        .check_linearizable()
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    eprintln!("{name} (3 members): {summary:?}");
    // Every member holds the same history, and a watch from the start on each replays it.
    let mut hashes = Vec::new();
    for (i, endpoint) in endpoints.iter().enumerate() {
        let hash = cluster
            .client(i)
            .await
            .hash_kv(end)
            .await
            .unwrap_or_else(|e| panic!("{name}: hash on m{i}: {e}"))
            .hash();
        hashes.push(hash);
        let replay = Watcher::start(
            vec![endpoint.clone()],
            options.clone(),
            "replay",
            "/r/",
            start,
        )
        .finish(end, CATCH_UP)
        .await
        .unwrap_or_else(|_| panic!("{name}: the replaying watcher on m{i} did not catch up"));
        check_watch_resume(&records[0], &replay).unwrap_or_else(|e| panic!("{name}: m{i}: {e}"));
    }
    assert!(
        hashes.windows(2).all(|w| w[0] == w[1]),
        "{name}: {hashes:?}"
    );
}

/// How much the run proved: operations, acknowledged writes, unknown outcomes before and
/// after the watch settled the unknown puts.
fn report(name: &str, recorded: &History, settled: &History) {
    let unknown = |h: &History| {
        h.operations()
            .iter()
            .filter(|o| matches!(o.outcome, Outcome::Unknown))
            .count()
    };
    let writes = recorded
        .operations()
        .iter()
        .filter(|o| o.write_revision().is_some())
        .count();
    eprintln!(
        "{name}: {} operations, {writes} acknowledged writes, {} unknown outcomes ({} after \
         the watch settled the writes)",
        recorded.len(),
        unknown(recorded),
        unknown(settled)
    );
    assert!(
        writes > 10,
        "{name}: too few acknowledged writes to judge anything"
    );
}

async fn scenario(backend: Backend) {
    let seconds = env_u64("ROBUSTNESS_SECONDS", 6);
    for _ in 0..env_u64("ROBUSTNESS_ROUNDS", 1) {
        round(backend.clone(), seconds).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_under_crashes_and_link_faults() {
    scenario(Backend::Etcd).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_store_under_crashes_and_link_faults() {
    scenario(embedded_backend()).await;
}

async fn cluster_scenario(backend: Backend) {
    let seconds = env_u64("ROBUSTNESS_SECONDS", 6).max(10);
    for _ in 0..env_u64("ROBUSTNESS_ROUNDS", 1) {
        cluster_round(backend.clone(), seconds).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_members_under_member_faults() {
    cluster_scenario(Backend::Etcd).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_members_under_member_faults() {
    cluster_scenario(embedded_backend()).await;
}
