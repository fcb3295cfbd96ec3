//! Concurrent traffic against a real store, recorded and checked: the history must be
//! linearizable and the watchers' streams complete. Against etcd this validates the recorder
//! and the checkers on the reference implementation (a failure here is a checker bug); our
//! kvstore runs the same traffic when `KVSTORE_BIN` names its binary (building it from this
//! test would rebuild the store crate under `cargo test -p testkit`).

use std::time::Duration;

use testkit::history::{ClientId, Recorder, check_watch_resume};
use testkit::traffic::{Watcher, Workload, last_write, run_client};
use testkit::{Backend, StoreOptions, StoreProcess};

const CLIENTS: ClientId = 4;
/// How long the clients run.
const TRAFFIC: Duration = Duration::from_secs(2);
/// Five keys under two prefixes, so that the prefix watchers see part of the traffic.
const KEYS: [&str; 5] = [
    "/hist/a/0",
    "/hist/a/1",
    "/hist/a/2",
    "/hist/b/0",
    "/hist/b/1",
];
/// Generous: a timeout turns an operation into an unknown outcome, which the checker accepts
/// but which proves less.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a watcher may lag behind the last write before the test gives up on it.
const CATCH_UP: Duration = Duration::from_secs(20);

fn backends() -> Vec<Backend> {
    let mut backends = vec![Backend::Etcd];
    match std::env::var_os("KVSTORE_BIN") {
        Some(bin) => backends.push(Backend::Embedded { bin: bin.into() }),
        None => eprintln!("KVSTORE_BIN not set: checking etcd only"),
    }
    backends
}

async fn run(backend: Backend) {
    let name = backend.name();
    let store = StoreProcess::start(backend, StoreOptions::default())
        .await
        .expect("start store");
    let endpoints = vec![store.endpoint()];
    let options = store.connect_options();
    let mut admin = store.client().await;
    let start = admin
        .get("/hist/", None)
        .await
        .expect("initial get")
        .header()
        .map_or(0, |h| h.revision())
        + 1;
    let watcher = |name: &str, prefix: &str, from: i64| {
        Watcher::start(endpoints.clone(), options.clone(), name, prefix, from)
    };
    let watchers = [
        watcher("all", "/hist/", start),
        watcher("a", "/hist/a/", start),
        watcher("b", "/hist/b/", start),
    ];

    let recorder = Recorder::new();
    let mut workload = Workload::new(&KEYS);
    workload.request_timeout = REQUEST_TIMEOUT;
    let until = tokio::time::Instant::now() + TRAFFIC;
    let mut clients = tokio::task::JoinSet::new();
    for id in 0..CLIENTS {
        clients.spawn(run_client(
            endpoints.clone(),
            options.clone(),
            id,
            workload.clone(),
            recorder.clone(),
            until,
        ));
    }
    while let Some(done) = clients.join_next().await {
        done.expect("client task");
    }
    let history = recorder.history();
    assert!(history.len() > 100, "{name}: {} operations", history.len());
    let summary = history
        .check_linearizable()
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    eprintln!("{name}: {summary:?}");

    let mut records = Vec::new();
    for w in watchers {
        let until = last_write(&history, w.prefix());
        let record = w.finish(until, CATCH_UP).await.unwrap_or_else(|r| {
            panic!(
                "{name}: watcher {} stuck at {:?}",
                r.watcher,
                r.events.last()
            )
        });
        history
            .check_watch(&record)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        records.push(record);
    }
    // Resume the whole-prefix watch from the middle of the traffic.
    let end = last_write(&history, "/hist/");
    let middle = start + (end - start) / 2;
    let resumed = watcher("all-resumed", "/hist/", middle)
        .finish(end, CATCH_UP)
        .await
        .unwrap_or_else(|_| panic!("{name}: the resumed watcher did not catch up"));
    history
        .check_watch(&resumed)
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    check_watch_resume(&records[0], &resumed).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert!(
        records[0].events.len() > resumed.events.len() && !resumed.events.is_empty(),
        "{name}: the resumed watch covers part of the traffic"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_traffic_is_linearizable_and_watches_are_complete() {
    for backend in backends() {
        run(backend).await;
    }
}
