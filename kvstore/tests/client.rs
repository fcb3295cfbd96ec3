//! Integration tests of the store client layer against a real store started by each test
//! (real etcd by default; set `KVSTORE_CLIENT_TEST_BACKEND=embedded` to run the same tests
//! against our `kvstore serve`).

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use futures::StreamExt;
use kvstore::client::{
    ClientConfig, Error, Expect, LeaseLost, Limits, Op, StoreClient, TlsFiles, WatchConfig,
    WatchEvent, WatchStream,
};
use serde::{Deserialize, Serialize};
use testkit::{Backend, StoreOptions, StoreProcess, TestPki};

/// Longest wait for one expected watch event or lease verdict.
const EVENT_WAIT: Duration = Duration::from_secs(10);

fn backend() -> Backend {
    match std::env::var("KVSTORE_CLIENT_TEST_BACKEND").as_deref() {
        Ok("embedded") => Backend::Embedded {
            bin: env!("CARGO_BIN_EXE_kvstore").into(),
        },
        _ => Backend::Etcd,
    }
}

async fn start_store(opts: StoreOptions) -> StoreProcess {
    StoreProcess::start(backend(), opts)
        .await
        .expect("start store")
}

fn config_for(store: &StoreProcess) -> ClientConfig {
    let mut config = ClientConfig::new([store.endpoint()]);
    config.connect_timeout = Duration::from_secs(2);
    config.request_timeout = Duration::from_secs(5);
    config
}

async fn store_and_client() -> (StoreProcess, StoreClient) {
    let store = start_store(StoreOptions::default()).await;
    let client = StoreClient::connect(&config_for(&store))
        .await
        .expect("connect");
    (store, client)
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Node {
    name: String,
    cluster_id: u32,
    ips: Vec<String>,
}

fn node(i: u32) -> Node {
    Node {
        name: format!("node-{i}"),
        cluster_id: 7,
        ips: vec![format!("10.0.{}.{}", i / 256, i % 256)],
    }
}

/// Next item of a watch, failing the test if none arrives in time.
async fn next_event<V: std::fmt::Debug>(watch: &mut WatchStream<V>) -> WatchEvent<V> {
    tokio::time::timeout(EVENT_WAIT, watch.next())
        .await
        .expect("watch event in time")
        .expect("watch stream still open")
}

/// Next change event (skipping progress notifications).
async fn next_change<V: std::fmt::Debug>(watch: &mut WatchStream<V>) -> WatchEvent<V> {
    loop {
        match next_event(watch).await {
            WatchEvent::Progress { .. } => continue,
            other => return other,
        }
    }
}

#[tokio::test]
async fn typed_round_trip() {
    let (_store, client) = store_and_client().await;
    let nodes = client.json::<Node>();

    assert!(
        nodes
            .get("cilium/state/nodes/v1/c1/a")
            .await
            .unwrap()
            .is_none()
    );
    let rev1 = nodes
        .put("cilium/state/nodes/v1/c1/a", &node(1), None)
        .await
        .unwrap();
    let entry = nodes
        .get("cilium/state/nodes/v1/c1/a")
        .await
        .unwrap()
        .expect("entry");
    assert_eq!(entry.key, "cilium/state/nodes/v1/c1/a");
    assert_eq!(entry.value, node(1));
    assert_eq!(entry.create_revision, rev1);
    assert_eq!(entry.mod_revision, rev1);
    assert_eq!(entry.version, 1);
    assert_eq!(entry.lease, None);

    let rev2 = nodes
        .put("cilium/state/nodes/v1/c1/a", &node(2), None)
        .await
        .unwrap();
    assert!(rev2 > rev1);
    let entry = nodes
        .get("cilium/state/nodes/v1/c1/a")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(entry.value, node(2));
    assert_eq!(
        (entry.create_revision, entry.mod_revision, entry.version),
        (rev1, rev2, 2)
    );

    // Raw and string views see the same bytes.
    let raw = client
        .raw()
        .get("cilium/state/nodes/v1/c1/a")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(raw.value, serde_json::to_vec(&node(2)).unwrap());

    // Prefix boundaries: a sibling that shares the prefix's text but not the separator is
    // outside.
    nodes
        .put("cilium/state/nodes/v1/c1/b", &node(3), None)
        .await
        .unwrap();
    nodes
        .put("cilium/state/nodes/v1/c10", &node(4), None)
        .await
        .unwrap();
    let listing = nodes
        .list_prefix("cilium/state/nodes/v1/c1/")
        .await
        .unwrap();
    let keys: Vec<_> = listing.entries.iter().map(|e| e.key.as_str()).collect();
    assert_eq!(
        keys,
        ["cilium/state/nodes/v1/c1/a", "cilium/state/nodes/v1/c1/b"]
    );

    assert!(nodes.delete("cilium/state/nodes/v1/c1/a").await.unwrap());
    assert!(!nodes.delete("cilium/state/nodes/v1/c1/a").await.unwrap());
    assert!(
        nodes
            .get("cilium/state/nodes/v1/c1/a")
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(
        nodes.delete_prefix("cilium/state/nodes/v1/").await.unwrap(),
        2
    );
    let listing = nodes.list_prefix("cilium/state/").await.unwrap();
    assert!(listing.entries.is_empty());
    assert!(listing.revision > rev2);
}

#[tokio::test]
async fn decode_error_names_the_key() {
    let (_store, client) = store_and_client().await;
    client
        .raw()
        .put("cilium/state/nodes/v1/c1/bad", &b"{not json".to_vec(), None)
        .await
        .unwrap();
    let nodes = client.json::<Node>();
    nodes
        .put("cilium/state/nodes/v1/c1/good", &node(1), None)
        .await
        .unwrap();

    let err = nodes.get("cilium/state/nodes/v1/c1/bad").await.unwrap_err();
    match &err {
        Error::Decode { key, source } => {
            assert_eq!(key, "cilium/state/nodes/v1/c1/bad");
            assert!(source.is::<serde_json::Error>(), "{source:?}");
        }
        other => panic!("expected a decode error, got {other:?}"),
    }
    assert!(
        err.to_string().contains("cilium/state/nodes/v1/c1/bad"),
        "{err}"
    );
    assert!(
        std::error::Error::source(&err).is_some(),
        "source chain kept"
    );

    // A strict listing fails naming the key; a lenient one keeps the good entry.
    let err = nodes.list_prefix("cilium/state/nodes/").await.unwrap_err();
    assert!(
        matches!(&err, Error::Decode { key, .. } if key == "cilium/state/nodes/v1/c1/bad"),
        "{err:?}"
    );
    let (listing, invalid) = nodes
        .list_prefix_lenient("cilium/state/nodes/")
        .await
        .unwrap();
    assert_eq!(listing.entries.len(), 1);
    assert_eq!(listing.entries[0].key, "cilium/state/nodes/v1/c1/good");
    assert_eq!(invalid.len(), 1);
    assert!(matches!(&invalid[0], Error::Decode { key, .. } if key.ends_with("/bad")));

    // A watch reports it as Invalid and keeps going.
    let mut watch = nodes
        .watch_prefix("cilium/state/nodes/", listing.revision - 1)
        .await
        .unwrap();
    let mut saw_invalid = false;
    let mut saw_good = false;
    while !(saw_invalid && saw_good) {
        match next_change(&mut watch).await {
            WatchEvent::Invalid { key, error, .. } => {
                assert_eq!(key, "cilium/state/nodes/v1/c1/bad");
                assert!(matches!(error, Error::Decode { .. }));
                saw_invalid = true;
            }
            WatchEvent::Put { key, value, .. } => {
                assert_eq!(key, "cilium/state/nodes/v1/c1/good");
                assert_eq!(value, node(1));
                saw_good = true;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[tokio::test]
async fn list_prefix_paginates_at_one_revision() {
    let store = start_store(StoreOptions::default()).await;
    let mut config = config_for(&store);
    config.limits.list_page_size = 10;
    let client = StoreClient::connect(&config).await.unwrap();
    let nodes = client.json::<Node>();
    let prefix = "cilium/state/nodes/v1/c1/";
    let outcome = nodes
        .put_many(
            (0..1050).map(|i| (format!("{prefix}{i:05}"), node(i))),
            None,
        )
        .await
        .unwrap();
    assert_eq!(outcome.ops, 1050);
    // Outside the prefix, on both sides.
    nodes
        .put("cilium/state/nodes/v1/c0", &node(0), None)
        .await
        .unwrap();
    nodes
        .put("cilium/state/nodes/v1/c10", &node(0), None)
        .await
        .unwrap();

    // A writer keeps changing and adding keys under the prefix while we list 105 pages.
    let writer_nodes = nodes.clone();
    let stop = tokio_util::sync::CancellationToken::new();
    let writer_stop = stop.clone();
    let written = Arc::new(AtomicU32::new(0));
    let writer_written = written.clone();
    let writer = tokio::spawn(async move {
        let mut i = 0u32;
        while !writer_stop.is_cancelled() {
            let key = format!("{prefix}{:05}", (i * 37) % 1050);
            writer_nodes.put(&key, &node(5000 + i), None).await.unwrap();
            writer_nodes
                .put(&format!("{prefix}new-{i:05}"), &node(i), None)
                .await
                .unwrap();
            i += 1;
            writer_written.store(i, Ordering::SeqCst);
        }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let before = written.load(Ordering::SeqCst);
    let listing = nodes.list_prefix(prefix).await.unwrap();
    let during = written.load(Ordering::SeqCst) - before;
    stop.cancel();
    writer.await.unwrap();
    assert!(during > 0, "the writer wrote while the pages were read");

    // Sorted, unique, and exactly what one unpaginated read at that revision returns.
    assert!(listing.entries.len() >= 1050);
    assert!(listing.entries.windows(2).all(|w| w[0].key < w[1].key));
    assert!(listing.entries.iter().all(|e| e.key.starts_with(prefix)));
    assert!(
        listing
            .entries
            .iter()
            .all(|e| e.mod_revision <= listing.revision)
    );
    let mut etcd = store.client().await;
    let reference = etcd
        .get(
            prefix,
            Some(
                etcd_client::GetOptions::new()
                    .with_prefix()
                    .with_revision(listing.revision),
            ),
        )
        .await
        .unwrap();
    let reference: Vec<(String, i64)> = reference
        .kvs()
        .iter()
        .map(|kv| (kv.key_str().unwrap().to_owned(), kv.mod_revision()))
        .collect();
    let listed: Vec<(String, i64)> = listing
        .entries
        .iter()
        .map(|e| (e.key.clone(), e.mod_revision))
        .collect();
    assert_eq!(listed, reference);
}

#[tokio::test]
async fn compare_and_swap_both_outcomes() {
    let (_store, client) = store_and_client().await;
    let nodes = client.json::<Node>();
    let key = "cilium/cluster-config/c1";

    let created = nodes
        .compare_and_swap(key, Expect::Absent, &node(1), None)
        .await
        .unwrap();
    assert!(created.succeeded);
    let current = created.current.expect("written entry");
    assert_eq!(current.value, node(1));
    let rev = current.mod_revision;

    // Must-be-absent fails now, and says what is there.
    let refused = nodes
        .compare_and_swap(key, Expect::Absent, &node(2), None)
        .await
        .unwrap();
    assert!(!refused.succeeded);
    assert_eq!(refused.current.as_ref().unwrap().value, node(1));
    assert_eq!(refused.current.as_ref().unwrap().mod_revision, rev);

    // Right revision wins, stale revision loses.
    let swapped = nodes
        .compare_and_swap(key, Expect::ModRevision(rev), &node(3), None)
        .await
        .unwrap();
    assert!(swapped.succeeded);
    let new_rev = swapped.current.as_ref().unwrap().mod_revision;
    assert!(new_rev > rev);
    let stale = nodes
        .compare_and_swap(key, Expect::ModRevision(rev), &node(4), None)
        .await
        .unwrap();
    assert!(!stale.succeeded);
    assert_eq!(stale.current.unwrap().value, node(3));

    // Expecting a revision of an absent key fails with no current entry.
    let absent = nodes
        .compare_and_swap(
            "cilium/cluster-config/none",
            Expect::ModRevision(5),
            &node(5),
            None,
        )
        .await
        .unwrap();
    assert!(!absent.succeeded && absent.current.is_none());

    assert!(!nodes.compare_and_delete(key, rev).await.unwrap());
    assert!(nodes.compare_and_delete(key, new_rev).await.unwrap());
    assert!(nodes.get(key).await.unwrap().is_none());
}

#[tokio::test]
async fn batched_apply_of_1000_ops() {
    let (_store, client) = store_and_client().await;
    let strings = client.typed(kvstore::client::StringCodec);
    let before = client.status().await.unwrap().revision;

    // 1000 ops over 400 keys: puts, overwrites of keys already in the batch, deletes.
    let mut ops = Vec::new();
    let mut model = std::collections::BTreeMap::new();
    for i in 0..1000u32 {
        let key = format!("batch/{:04}", (i * 7) % 400);
        if i % 5 == 4 {
            model.remove(&key);
            ops.push(Op::delete(key));
        } else {
            let value = format!("v{i}");
            model.insert(key.clone(), value.clone());
            ops.push(Op::put(key, value));
        }
    }
    let outcome = strings.apply_batch(ops).await.unwrap();
    assert_eq!(outcome.ops, 1000);
    assert!(outcome.txns >= 8, "at most 128 ops per txn: {outcome:?}");
    // One revision per transaction: every transaction wrote something.
    assert_eq!(outcome.revision, before + outcome.txns as i64);

    let listing = strings.list_prefix("batch/").await.unwrap();
    let stored: std::collections::BTreeMap<_, _> = listing
        .entries
        .into_iter()
        .map(|e| (e.key, e.value))
        .collect();
    assert_eq!(stored, model);

    // Without splitting, the store refuses a transaction over its op limit: the limit is real.
    let mut config = ClientConfig::new([client.endpoints().to_owned()]);
    config.limits = Limits {
        txn_max_ops: 1000,
        ..Limits::default()
    };
    let unsplit = StoreClient::connect(&config).await.unwrap();
    let err = unsplit
        .typed(kvstore::client::StringCodec)
        .put_many((0..200).map(|i| (format!("big/{i}"), "x".to_owned())), None)
        .await
        .unwrap_err();
    match &err {
        Error::BatchFailed {
            applied: 0,
            total: 200,
            source,
        } => assert!(matches!(**source, Error::Rejected { .. }), "{source:?}"),
        other => panic!("{other:?}"),
    }
    assert!(!err.is_retryable());
}

#[tokio::test]
async fn batch_splits_by_request_size() {
    let (_store, client) = store_and_client().await;
    // 100 values of 40 KiB: 4 MB in all, far over etcd's 1.5 MiB request limit.
    let value = vec![b'x'; 40 * 1024];
    let outcome = client
        .raw()
        .put_many(
            (0..100).map(|i| (format!("large/{i:03}"), value.clone())),
            None,
        )
        .await
        .unwrap();
    assert_eq!(outcome.ops, 100);
    assert!(outcome.txns >= 4, "{outcome:?}");
    let listing = client.raw().list_prefix("large/").await.unwrap();
    assert_eq!(listing.entries.len(), 100);
    assert!(listing.entries.iter().all(|e| e.value == value));
}

#[tokio::test]
async fn watch_replays_history_then_follows_live() {
    let (_store, client) = store_and_client().await;
    let nodes = client.json::<Node>();
    let prefix = "cilium/state/nodes/v1/";
    let first = nodes
        .put(&format!("{prefix}a"), &node(1), None)
        .await
        .unwrap();
    nodes
        .put(&format!("{prefix}b"), &node(2), None)
        .await
        .unwrap();
    nodes
        .put("cilium/state/services/v1/x", &node(9), None)
        .await
        .unwrap();
    nodes
        .put(&format!("{prefix}a"), &node(3), None)
        .await
        .unwrap();
    let deleted = {
        nodes.delete(&format!("{prefix}b")).await.unwrap();
        client.status().await.unwrap().revision
    };
    // A transaction with two events at one revision.
    let txn = nodes
        .put_many(
            [
                (format!("{prefix}c"), node(4)),
                (format!("{prefix}d"), node(5)),
            ],
            None,
        )
        .await
        .unwrap();

    let mut watch = nodes.watch_prefix(prefix, first).await.unwrap();
    assert_eq!(watch.resume_revision(), first);
    let mut history = Vec::new();
    while history.len() < 6 {
        history.push(next_change(&mut watch).await);
    }
    let summary: Vec<(String, i64, Option<u32>)> = history
        .iter()
        .map(|e| match e {
            WatchEvent::Put {
                key,
                value,
                mod_revision,
                ..
            } => (key.clone(), *mod_revision, Some(value_id(value))),
            WatchEvent::Delete { key, mod_revision } => (key.clone(), *mod_revision, None),
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            (format!("{prefix}a"), first, Some(1)),
            (format!("{prefix}b"), first + 1, Some(2)),
            (format!("{prefix}a"), first + 3, Some(3)),
            (format!("{prefix}b"), deleted, None),
            (format!("{prefix}c"), txn.revision, Some(4)),
            (format!("{prefix}d"), txn.revision, Some(5)),
        ]
    );
    assert_eq!(watch.resume_revision(), txn.revision + 1);

    // Live events follow, with create and mod revisions.
    let live = nodes
        .put(&format!("{prefix}e"), &node(6), None)
        .await
        .unwrap();
    match next_change(&mut watch).await {
        WatchEvent::Put {
            key,
            value,
            mod_revision,
            create_revision,
        } => {
            assert_eq!(key, format!("{prefix}e"));
            assert_eq!(value, node(6));
            assert_eq!((mod_revision, create_revision), (live, live));
        }
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(watch.resume_revision(), live + 1);

    // Watching "from now" skips history.
    let mut now = nodes.watch_prefix(prefix, 0).await.unwrap();
    let next = nodes
        .put(&format!("{prefix}f"), &node(7), None)
        .await
        .unwrap();
    match next_change(&mut now).await {
        WatchEvent::Put {
            key, mod_revision, ..
        } => {
            assert_eq!(key, format!("{prefix}f"));
            assert_eq!(mod_revision, next);
        }
        other => panic!("unexpected {other:?}"),
    }
}

fn value_id(node: &Node) -> u32 {
    node.name.trim_start_matches("node-").parse().unwrap()
}

#[tokio::test]
async fn list_then_watch_from_listed_revision_misses_nothing() {
    let (_store, client) = store_and_client().await;
    let nodes = client.json::<Node>();
    let prefix = "cilium/state/nodes/v1/";
    nodes
        .put_many((0..300).map(|i| (format!("{prefix}{i:03}"), node(i))), None)
        .await
        .unwrap();
    let listing = nodes.list_prefix(prefix).await.unwrap();
    // Changes after the listing, before the watch starts.
    let late = nodes
        .put(&format!("{prefix}late"), &node(1000), None)
        .await
        .unwrap();
    let mut watch = nodes
        .watch_prefix(prefix, listing.revision + 1)
        .await
        .unwrap();
    match next_change(&mut watch).await {
        WatchEvent::Put {
            key, mod_revision, ..
        } => {
            assert_eq!(key, format!("{prefix}late"));
            assert_eq!(mod_revision, late);
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test]
async fn watch_detects_compaction() {
    let (_store, client) = store_and_client().await;
    let raw = client.raw();
    let first = raw.put("c/a", &b"1".to_vec(), None).await.unwrap();
    raw.put("c/a", &b"2".to_vec(), None).await.unwrap();
    let last = raw.put("c/a", &b"3".to_vec(), None).await.unwrap();
    client.compact(last).await.unwrap();

    let mut watch = raw.watch_prefix("c/", first).await.unwrap();
    match next_event(&mut watch).await {
        WatchEvent::Compacted { compact_revision } => assert_eq!(compact_revision, last),
        other => panic!("expected compaction, got {other:?}"),
    }
    assert!(watch.next().await.is_none(), "compaction ends the stream");

    // Reads at a compacted revision say so too.
    let err = client
        .etcd()
        .kv_client()
        .get(
            "c/a",
            Some(etcd_client::GetOptions::new().with_revision(first)),
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("compacted"), "{err}");

    // The recovery path: relist, then watch from the listed revision + 1.
    let listing = raw.list_prefix("c/").await.unwrap();
    assert_eq!(listing.entries[0].value, b"3".to_vec());
    let mut watch = raw.watch_prefix("c/", listing.revision + 1).await.unwrap();
    let rev = raw.put("c/b", &b"4".to_vec(), None).await.unwrap();
    assert!(matches!(
        next_change(&mut watch).await,
        WatchEvent::Put { mod_revision, .. } if mod_revision == rev
    ));
}

#[tokio::test]
async fn watch_reports_progress_when_idle() {
    let (_store, client) = store_and_client().await;
    let raw = client.raw();
    let config = WatchConfig {
        progress_request_interval: Some(Duration::from_millis(200)),
        ..WatchConfig::default()
    };
    let mut watch = raw.watch_prefix_with("idle/", 0, &config).await.unwrap();
    // Writes elsewhere move the revision; the idle watcher learns it.
    let elsewhere = raw.put("other/x", &b"1".to_vec(), None).await.unwrap();
    let deadline = tokio::time::Instant::now() + EVENT_WAIT;
    loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no progress in time"
        );
        match next_event(&mut watch).await {
            WatchEvent::Progress { revision } if revision >= elsewhere => break,
            WatchEvent::Progress { .. } => continue,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(watch.resume_revision() > elsewhere);
}

#[tokio::test]
async fn broken_watch_resumes_after_store_restart() {
    let (mut store, client) = store_and_client().await;
    let raw = client.raw();
    let mut watch = raw.watch_prefix("r/", 0).await.unwrap();
    let rev = raw.put("r/a", &b"1".to_vec(), None).await.unwrap();
    assert!(matches!(
        next_change(&mut watch).await,
        WatchEvent::Put { .. }
    ));

    store.kill();
    let resume_from = match next_event(&mut watch).await {
        WatchEvent::Broken { resume_from, error } => {
            assert!(error.is_retryable(), "{error:?}");
            resume_from
        }
        other => panic!("expected a broken stream, got {other:?}"),
    };
    assert_eq!(resume_from, rev + 1);
    assert_eq!(watch.resume_revision(), rev + 1);
    assert!(watch.next().await.is_none());

    // While the store is down, requests fail as retryable.
    let err = raw.get("r/a").await.unwrap_err();
    assert!(err.is_retryable(), "{err:?}");

    store.restart().await.unwrap();
    // A write that happened while nobody watched is replayed on resume.
    let value = b"2".to_vec();
    let missed = retry(|| raw.put("r/b", &value, None)).await;
    let mut watch = retry(|| raw.watch_prefix("r/", resume_from)).await;
    match next_change(&mut watch).await {
        WatchEvent::Put {
            key, mod_revision, ..
        } => {
            assert_eq!(key, "r/b");
            assert_eq!(mod_revision, missed);
        }
        other => panic!("unexpected {other:?}"),
    }
}

/// Retries a request while the client reconnects after a store restart.
async fn retry<T, F, Fut>(mut request: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, Error>>,
{
    let deadline = tokio::time::Instant::now() + EVENT_WAIT;
    loop {
        match request().await {
            Ok(value) => return value,
            Err(err) if err.is_retryable() && tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(err) => panic!("request failed: {err:?}"),
        }
    }
}

#[tokio::test]
async fn lease_keepalive_keeps_keys_alive_past_the_ttl() {
    let (_store, client) = store_and_client().await;
    let lease = client.grant_lease(Duration::from_secs(2)).await.unwrap();
    assert!(lease.ttl() >= Duration::from_secs(2));
    let raw = client.raw();
    raw.put_many(
        (0..10).map(|i| (format!("leased/{i}"), b"v".to_vec())),
        Some(lease.id()),
    )
    .await
    .unwrap();
    let entry = raw.get("leased/0").await.unwrap().unwrap();
    assert_eq!(entry.lease, Some(lease.id()));

    tokio::time::sleep(lease.ttl() * 3).await;
    assert!(lease.is_alive(), "{:?}", lease.lost_reason());
    assert_eq!(raw.list_prefix("leased/").await.unwrap().entries.len(), 10);
    let remaining = client.lease_time_to_live(lease.id()).await.unwrap();
    assert!(
        remaining.is_some_and(|ttl| ttl > Duration::ZERO),
        "{remaining:?}"
    );
}

/// A grant answered only after its TTL (the store froze with the request in flight) is not
/// a lost lease: the store started the TTL when it answered, and a keepalive says so.
#[tokio::test]
async fn a_grant_answered_after_its_ttl_is_kept_alive() {
    let (store, client) = store_and_client().await;
    let ttl = Duration::from_secs(2);
    store.freeze();
    let grant = tokio::spawn({
        let client = client.clone();
        async move { client.grant_lease(ttl).await }
    });
    tokio::time::sleep(ttl + Duration::from_secs(1)).await;
    store.thaw();
    let lease = grant
        .await
        .unwrap()
        .expect("granted once the store answers");
    tokio::time::sleep(ttl * 2).await;
    assert!(lease.is_alive(), "{:?}", lease.lost_reason());
    let remaining = client.lease_time_to_live(lease.id()).await.unwrap();
    assert!(
        remaining.is_some_and(|left| left > Duration::ZERO),
        "{remaining:?}"
    );
}

/// A lease granted by another process (here: a handle whose keepalive stopped, as when
/// that process exits) is taken over and kept alive with its keys; a lease that is gone
/// cannot be.
#[tokio::test]
async fn an_adopted_lease_is_kept_alive() {
    let (_store, client) = store_and_client().await;
    let ttl = Duration::from_secs(2);
    let first = client.grant_lease(ttl).await.unwrap();
    let raw = client.raw();
    raw.put("adopted/key", &b"v".to_vec(), Some(first.id()))
        .await
        .unwrap();
    first.stop();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let adopted = client
        .adopt_lease(first.id(), &shutdown)
        .await
        .unwrap()
        .expect("the lease still lives");
    assert_eq!((adopted.id(), adopted.ttl()), (first.id(), ttl));
    tokio::time::sleep(ttl * 3).await;
    assert!(adopted.is_alive(), "{:?}", adopted.lost_reason());
    assert!(raw.get("adopted/key").await.unwrap().is_some());

    let gone = client.grant_lease(ttl).await.unwrap();
    let id = gone.id();
    gone.revoke().await.unwrap();
    assert!(client.adopt_lease(id, &shutdown).await.unwrap().is_none());
    shutdown.cancel();
    assert_eq!(adopted.lost().await, LeaseLost::Stopped);
}

#[tokio::test]
async fn lease_revoke_deletes_keys() {
    let (_store, client) = store_and_client().await;
    let lease = client.grant_lease(Duration::from_secs(10)).await.unwrap();
    let id = lease.id();
    let raw = client.raw();
    raw.put("revoked/a", &b"v".to_vec(), Some(id))
        .await
        .unwrap();
    let mut lost = lease.watch_lost();
    lease.revoke().await.unwrap();
    assert!(raw.get("revoked/a").await.unwrap().is_none());
    assert_eq!(client.lease_time_to_live(id).await.unwrap(), None);
    lost.wait_for(|l| *l == Some(LeaseLost::Revoked))
        .await
        .unwrap();

    // Writing with a lease that is gone fails as such.
    let err = raw
        .put("revoked/b", &b"v".to_vec(), Some(id))
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::LeaseNotFound { lease } if lease == id),
        "{err:?}"
    );
    // Revoking again is not an error.
    client.revoke_lease(id).await.unwrap();
}

#[tokio::test]
async fn lease_lost_when_revoked_elsewhere() {
    let (store, client) = store_and_client().await;
    let lease = client.grant_lease(Duration::from_secs(3)).await.unwrap();
    let raw = client.raw();
    raw.put("lost/a", &b"v".to_vec(), Some(lease.id()))
        .await
        .unwrap();

    // Another client revokes it: the next keepalive answers TTL 0.
    let mut other = store.client().await;
    other.lease_revoke(lease.id().0).await.unwrap();
    let reason = tokio::time::timeout(EVENT_WAIT, lease.lost())
        .await
        .unwrap();
    assert_eq!(reason, LeaseLost::Expired);
    assert!(!lease.is_alive());
    assert!(raw.get("lost/a").await.unwrap().is_none());
}

#[tokio::test]
async fn lease_lost_when_store_unreachable_longer_than_ttl() {
    let (mut store, client) = store_and_client().await;
    let lease = client.grant_lease(Duration::from_secs(2)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(lease.is_alive());
    let killed = tokio::time::Instant::now();
    store.kill();
    let reason = tokio::time::timeout(EVENT_WAIT, lease.lost())
        .await
        .unwrap();
    assert!(
        matches!(reason, LeaseLost::Unreachable { .. }),
        "{reason:?}"
    );
    let after = killed.elapsed();
    assert!(
        after <= lease.ttl() + Duration::from_secs(1),
        "lost only after {after:?}"
    );
}

#[tokio::test]
async fn lease_stops_on_shutdown_token() {
    let (_store, client) = store_and_client().await;
    let shutdown = tokio_util::sync::CancellationToken::new();
    let lease = client
        .grant_lease_with_shutdown(Duration::from_secs(2), &shutdown)
        .await
        .unwrap();
    shutdown.cancel();
    let reason = tokio::time::timeout(EVENT_WAIT, lease.lost())
        .await
        .unwrap();
    assert_eq!(reason, LeaseLost::Stopped);
    // Without keepalive the lease expires on its own.
    let deadline = tokio::time::Instant::now() + EVENT_WAIT;
    while client
        .lease_time_to_live(lease.id())
        .await
        .unwrap()
        .is_some()
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "lease never expired"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test]
async fn status_identifies_the_store() {
    let (_store, client) = store_and_client().await;
    let status = client.status().await.unwrap();
    assert_ne!(status.cluster_id, 0);
    assert_ne!(status.member_id, 0);
    let rev = client.raw().put("s/a", &b"1".to_vec(), None).await.unwrap();
    let later = client.status().await.unwrap();
    assert_eq!(later.revision, rev);
    assert_eq!(later.cluster_id, status.cluster_id);

    // A different store (a replacement) has another identity.
    let (_other_store, other) = store_and_client().await;
    assert_ne!(other.status().await.unwrap().cluster_id, status.cluster_id);
}

#[tokio::test]
async fn connect_to_a_dead_endpoint_fails_as_retryable() {
    // A port that was free a moment ago and has no listener.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut config = ClientConfig::new([format!("127.0.0.1:{port}")]);
    config.connect_timeout = Duration::from_millis(500);
    config.request_timeout = Duration::from_secs(1);
    let started = std::time::Instant::now();
    let err = StoreClient::connect(&config).await.unwrap_err();
    assert!(err.is_retryable(), "{err:?}");
    assert!(err.to_string().contains(&port.to_string()), "{err}");
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn mutual_tls_with_a_ca_bundle() {
    let pki = Arc::new(TestPki::generate());
    let store = start_store(StoreOptions {
        tls: Some(pki.clone()),
        ..StoreOptions::default()
    })
    .await;
    assert!(store.endpoint().starts_with("https://"));
    let client_files = pki.client("root");

    // A CA bundle with an unrelated CA first, then ours.
    let bundle = pki.dir().join("bundle.pem");
    let foreign = pki.foreign_client("x");
    let mut pem = std::fs::read(&foreign.ca).unwrap();
    pem.extend(std::fs::read(pki.ca_path()).unwrap());
    std::fs::write(&bundle, pem).unwrap();

    let tls = TlsFiles {
        ca: bundle,
        cert: Some(client_files.cert.clone()),
        key: Some(client_files.key.clone()),
    };
    let mut config = config_for(&store).with_tls(tls.clone());
    let client = StoreClient::connect(&config).await.unwrap();
    client
        .raw()
        .put("tls/a", &b"1".to_vec(), None)
        .await
        .unwrap();
    assert!(client.raw().get("tls/a").await.unwrap().is_some());

    // https without tls is a configuration error naming the endpoint.
    let plain = ClientConfig::new([store.endpoint()]);
    let err = StoreClient::connect(&plain).await.unwrap_err();
    assert!(matches!(err, Error::Config(_)), "{err:?}");
    assert!(
        std::error::Error::source(&err)
            .unwrap()
            .to_string()
            .contains(&store.endpoint()),
        "{err:?}"
    );

    // Without a client certificate the store refuses us.
    config.tls = Some(TlsFiles {
        cert: None,
        key: None,
        ..tls.clone()
    });
    assert!(StoreClient::connect(&config).await.is_err());

    // A missing key file is named before anything connects.
    config.tls = Some(TlsFiles {
        key: Some(pki.dir().join("missing-key.pem")),
        ..tls
    });
    let err = StoreClient::connect(&config).await.unwrap_err();
    let detail = std::error::Error::source(&err).unwrap().to_string();
    assert!(
        detail.contains("tls.key") && detail.contains("missing-key.pem"),
        "{detail}"
    );
}
