//! Concurrent traffic against a real store, recorded and checked: the history must be
//! linearizable and the watchers' streams complete. Against etcd this validates the recorder
//! and the checkers on the reference implementation (a failure here is a checker bug); our
//! kvstore runs the same traffic when `KVSTORE_BIN` names its binary (building it from this
//! test would rebuild the store crate under `cargo test -p testkit`).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::{Client, EventType, WatchOptions};
use rand::{Rng, SeedableRng};
use testkit::history::{
    ClientId, History, Op, OpResult, Recorder, WatchEvent, WatchRecord, check_watch_resume,
};
use testkit::{Backend, StoreOptions, StoreProcess};

const CLIENTS: ClientId = 4;
const OPS_PER_CLIENT: usize = 200;
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

async fn connect(store: &StoreProcess) -> Client {
    let opts = store.connect_options().with_timeout(REQUEST_TIMEOUT);
    Client::connect([store.endpoint()], Some(opts))
        .await
        .expect("connect")
}

/// One client's share of the traffic: random puts (unique values), gets and deletes.
async fn client_traffic(mut client: Client, id: ClientId, recorder: Recorder) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(u64::from(id));
    for i in 0..OPS_PER_CLIENT {
        let key = KEYS[rng.random_range(0..KEYS.len())];
        match rng.random_range(0..10) {
            0..4 => {
                let value = format!("c{id}-{i}");
                let pending = recorder.begin(id, Op::put(key, value.clone()));
                match client.put(key, value, None).await {
                    Ok(resp) => pending.ok(OpResult::Put {
                        revision: resp.header().map_or(0, |h| h.revision()),
                    }),
                    Err(_) => pending.unknown(),
                }
            }
            4..8 => {
                let pending = recorder.begin(id, Op::get(key));
                match client.get(key, None).await {
                    Ok(resp) => pending.ok(OpResult::Get {
                        value: resp.kvs().first().map(|kv| kv.value().to_vec()),
                        revision: resp.header().map_or(0, |h| h.revision()),
                    }),
                    Err(_) => pending.unknown(),
                }
            }
            _ => {
                let pending = recorder.begin(id, Op::delete(key));
                match client.delete(key, None).await {
                    Ok(resp) => pending.ok(OpResult::Delete {
                        deleted: resp.deleted(),
                        revision: resp.header().map_or(0, |h| h.revision()),
                    }),
                    Err(_) => pending.unknown(),
                }
            }
        }
    }
}

/// A watcher collecting into a shared list until aborted.
struct Watching {
    name: String,
    prefix: String,
    start: i64,
    events: Arc<Mutex<Vec<WatchEvent>>>,
    task: tokio::task::JoinHandle<()>,
}

async fn watch(client: &mut Client, name: &str, prefix: &str, start: i64) -> Watching {
    let opts = WatchOptions::new().with_prefix().with_start_revision(start);
    let mut stream = client.watch(prefix, Some(opts)).await.expect("watch");
    let events = Arc::new(Mutex::new(Vec::new()));
    let sink = events.clone();
    let task = tokio::spawn(async move {
        while let Ok(Some(resp)) = stream.message().await {
            let mut sink = sink.lock().expect("watch events");
            for event in resp.events() {
                let Some(kv) = event.kv() else { continue };
                sink.push(match event.event_type() {
                    EventType::Put => WatchEvent::put(kv.mod_revision(), kv.key(), kv.value()),
                    EventType::Delete => WatchEvent::delete(kv.mod_revision(), kv.key()),
                });
            }
        }
    });
    Watching {
        name: name.to_owned(),
        prefix: prefix.to_owned(),
        start,
        events,
        task,
    }
}

impl Watching {
    /// Waits until the watcher has received revision `until` (or anything later), then stops
    /// it and returns what it got.
    async fn finish(self, until: i64) -> WatchRecord {
        let deadline = tokio::time::Instant::now() + CATCH_UP;
        loop {
            let last = self
                .events
                .lock()
                .expect("watch events")
                .last()
                .map(|e| e.revision);
            if last.is_some_and(|r| r >= until) || until < self.start {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "watcher {} stuck at {last:?}, waiting for revision {until}",
                self.name
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.task.abort();
        let events = self.events.lock().expect("watch events").clone();
        WatchRecord {
            watcher: self.name,
            prefix: self.prefix.into_bytes(),
            start_revision: self.start,
            events,
        }
    }
}

/// The highest acknowledged write revision under `prefix`.
fn last_write(history: &History, prefix: &str) -> i64 {
    history
        .operations()
        .iter()
        .filter(|o| o.op.key().starts_with(prefix.as_bytes()))
        .filter_map(|o| o.write_revision())
        .max()
        .unwrap_or(0)
}

async fn run(backend: Backend) {
    let name = backend.name();
    let store = StoreProcess::start(backend, StoreOptions::default())
        .await
        .expect("start store");
    let mut admin = connect(&store).await;
    let start = admin
        .get("/hist/", None)
        .await
        .expect("initial get")
        .header()
        .map_or(0, |h| h.revision())
        + 1;
    let watchers = [
        watch(&mut admin, "all", "/hist/", start).await,
        watch(&mut admin, "a", "/hist/a/", start).await,
        watch(&mut admin, "b", "/hist/b/", start).await,
    ];

    let recorder = Recorder::new();
    let mut clients = tokio::task::JoinSet::new();
    for id in 0..CLIENTS {
        clients.spawn(client_traffic(connect(&store).await, id, recorder.clone()));
    }
    while let Some(done) = clients.join_next().await {
        done.expect("client task");
    }
    let history = recorder.history();
    assert_eq!(history.len(), CLIENTS as usize * OPS_PER_CLIENT);
    let summary = history
        .check_linearizable()
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    eprintln!("{name}: {summary:?}");

    let mut records = Vec::new();
    for w in watchers {
        let until = last_write(&history, &w.prefix);
        let record = w.finish(until).await;
        history
            .check_watch(&record)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        records.push(record);
    }
    // Resume the whole-prefix watch from the middle of the traffic.
    let end = last_write(&history, "/hist/");
    let middle = start + (end - start) / 2;
    let resumed = watch(&mut admin, "all-resumed", "/hist/", middle)
        .await
        .finish(end)
        .await;
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
