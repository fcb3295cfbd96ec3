//! The store under faults, judged by checkers rather than by expected values: clients issue
//! random puts, gets and deletes over a few keys, and watchers follow prefixes, while the
//! store is SIGKILLed and restarted and the link to it (a fault proxy between every client and
//! the store) is partitioned, slowed by 75±50 ms and broken. Then:
//! - the recorded history must be linearizable (`testkit::history`): no stale read, no
//!   acknowledged write lost to a crash, revisions a real-time order;
//! - every watcher's stream, across its reconnects, must be ordered, unique, atomic per
//!   revision, gap-free and complete up to the last acknowledged write under its prefix.
//!
//! The same scenario runs against etcd, which validates the harness. The size is small by
//! default; `ROBUSTNESS_SECONDS` (default 6) lengthens each run and `ROBUSTNESS_ROUNDS`
//! (default 1) repeats it. A single member for now: member faults (a killed leader or
//! follower, a partitioned member, one that must catch up by snapshot) come with replication.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::embedded_backend;
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
