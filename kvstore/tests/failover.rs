//! The client layer over a 3-member cluster, etcd's and ours alike: when the member it is
//! using dies (killed: connections refused) or freezes (SIGSTOP: a machine gone silent),
//! requests, watches and lease keepalives carry on through the others.

mod common;

use std::time::Duration;

use common::embedded_backend;
use futures::StreamExt;
use kvstore::client::{ClientConfig, StoreClient, WatchEvent, WatchStream};
use testkit::Backend;
use testkit::cluster::StoreCluster;

/// Long enough to outlive an election: a new leader extends every lease before it expires any,
/// but the holder's handle gives up when no keepalive was answered for a whole TTL.
const LEASE_TTL: Duration = Duration::from_secs(5);

/// A 3-member cluster and a client whose endpoints list the two followers first, so the
/// member it starts on is a follower and the leader is the last it would try.
async fn start(backend: Backend) -> (StoreCluster, StoreClient, [usize; 3]) {
    let name = backend.name();
    let cluster = StoreCluster::start(backend, 3)
        .await
        .unwrap_or_else(|e| panic!("start a 3-member {name} cluster: {e}"));
    let leader = cluster.leader().await.expect("a leader");
    let order = [(leader + 1) % 3, (leader + 2) % 3, leader];
    let all = cluster.endpoints();
    let mut config = ClientConfig::new(order.iter().map(|&i| all[i].clone()));
    config.connect_timeout = Duration::from_secs(1);
    // Long enough for a write to wait out an election when the leader is the member lost.
    config.request_timeout = Duration::from_secs(5);
    let client = StoreClient::connect(&config).await.expect("connect");
    (cluster, client, order)
}

/// Every event the watch delivers until it has seen `last`, reopening it (from where it
/// broke) whenever it breaks, as a follower of the store does.
async fn watch_until(
    client: &StoreClient,
    mut watch: WatchStream<Vec<u8>>,
    last: i64,
) -> (Vec<i64>, u32) {
    let mut revisions = Vec::new();
    let mut reopened = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while revisions.last().is_none_or(|r| *r < last) {
        let event = tokio::time::timeout_at(deadline, watch.next())
            .await
            .unwrap_or_else(|_| panic!("the watch stalled after {revisions:?}"));
        match event {
            Some(WatchEvent::Put { mod_revision, .. }) => revisions.push(mod_revision),
            Some(WatchEvent::Broken { resume_from, .. }) => {
                reopened += 1;
                watch = loop {
                    match client.raw().watch_prefix("/f/", resume_from).await {
                        Ok(watch) => break watch,
                        Err(e) if e.is_retryable() => {
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                        Err(e) => panic!("reopening the watch: {e}"),
                    }
                };
            }
            None => panic!("the watch ended without saying why after {revisions:?}"),
            Some(other) => panic!("unexpected watch event {other:?}"),
        }
    }
    (revisions, reopened)
}

/// The watch delivered revisions in order, once each, and every acknowledged write among
/// them (a write whose answer was lost in an election may be there too).
fn assert_every_write_seen(seen: &[i64], written: &[i64]) {
    assert!(
        seen.windows(2).all(|w| w[0] < w[1]),
        "out of order: {seen:?}"
    );
    let missing: Vec<&i64> = written.iter().filter(|r| !seen.contains(r)).collect();
    assert!(
        missing.is_empty(),
        "writes {missing:?} never delivered; saw {seen:?}"
    );
}

/// Writes `n` keys and reads each back through the one client; returns the revisions
/// written. With `patient`, a write whose outcome is unknown (an election swallowed it) is
/// sent again, as the daemons do; without, every call must succeed at once.
async fn write_and_read(client: &StoreClient, from: usize, n: usize, patient: bool) -> Vec<i64> {
    let raw = client.raw();
    let mut revisions = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    for i in from..from + n {
        let key = format!("/f/{i}");
        let revision = loop {
            match raw.put(&key, &i.to_string().into_bytes(), None).await {
                Ok(revision) => break revision,
                Err(e) if patient && e.is_retryable() && tokio::time::Instant::now() < deadline => {
                    eprintln!("put {key} failed, sent again: {e}");
                }
                Err(e) => panic!("put {key}: {e:?}"),
            }
        };
        let got = raw
            .get(&key)
            .await
            .unwrap_or_else(|e| panic!("get {key}: {e:?}"))
            .expect("the key just written");
        assert_eq!(got.mod_revision, revision, "{key}");
        revisions.push(revision);
    }
    revisions
}

async fn a_killed_member_is_left_behind(backend: Backend) {
    let (mut cluster, client, [first_follower, _, leader]) = start(backend).await;
    let start = write_and_read(&client, 0, 1, false).await[0];
    let watch = client.raw().watch_prefix("/f/", start + 1).await.unwrap();
    let lease = client.grant_lease(LEASE_TTL).await.expect("grant");

    // The member in use dies, the leader stays: the client moves on. A write in flight on
    // the dying connection may end with an unknown outcome (hyper reports it cancelled) and
    // is sent again, as the daemons do.
    let mut written = Vec::new();
    cluster.kill(first_follower);
    written.extend(write_and_read(&client, 1, 20, true).await);
    cluster
        .restart(first_follower)
        .await
        .expect("restart the follower");
    // The leader dies: writes wait for the next one (those caught in the election end with
    // an unknown outcome and are sent again), then go on.
    cluster.kill(leader);
    written.extend(write_and_read(&client, 21, 20, true).await);

    let (seen, reopened) = watch_until(&client, watch, *written.last().unwrap()).await;
    assert_every_write_seen(&seen, &written);
    assert!(reopened >= 1, "the watch was on a killed member");

    // Two TTLs later the lease still stands: its keepalives moved to live members.
    tokio::time::sleep(LEASE_TTL * 2).await;
    assert!(lease.is_alive(), "{:?}", lease.lost_reason());
    let ttls = client.lease_ttls(lease.id()).await.expect("ttl");
    assert!(ttls.is_some(), "the lease expired");
}

async fn a_frozen_member_is_left_behind(backend: Backend) {
    let (cluster, client, [first_follower, ..]) = start(backend).await;
    let start = write_and_read(&client, 0, 1, false).await[0];
    let lease = client.grant_lease(LEASE_TTL).await.expect("grant");
    // A frozen member accepts connections and answers nothing, like a machine gone dark:
    // a request waits out the request timeout there, then goes elsewhere.
    cluster.freeze(first_follower);
    let raw = client.raw();
    let got = raw
        .get("/f/0")
        .await
        .expect("a read moves on to a live member");
    assert_eq!(got.map(|e| e.mod_revision), Some(start));
    let written = write_and_read(&client, 1, 10, false).await;
    let watch = raw.watch_prefix("/f/", start + 1).await.expect("watch");
    let (seen, _) = watch_until(&client, watch, *written.last().unwrap()).await;
    assert_every_write_seen(&seen, &written);
    tokio::time::sleep(LEASE_TTL * 2).await;
    assert!(lease.is_alive(), "{:?}", lease.lost_reason());
    cluster.thaw(first_follower);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_a_killed_member_is_left_behind() {
    a_killed_member_is_left_behind(Backend::Etcd).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ours_a_killed_member_is_left_behind() {
    a_killed_member_is_left_behind(embedded_backend()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_a_frozen_member_is_left_behind() {
    a_frozen_member_is_left_behind(Backend::Etcd).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ours_a_frozen_member_is_left_behind() {
    a_frozen_member_is_left_behind(embedded_backend()).await;
}
