//! kvstoremesh against real stores: two or three etcd processes (the local cluster's and the
//! peers'), kvstoremesh in this process. Every check reads both stores.

mod common;

use std::time::{Duration, Instant};

use common::*;
use futures::StreamExt;
use kvstore::client::WatchEvent;
use model::keys::cluster_config_key;
use model::{Kind, MaxConnectedClusters, StoreValue, parse_state_key, to_cache_key};

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index]
}

fn report(what: &str, mut samples: Vec<Duration>) {
    samples.sort();
    println!(
        "{what}: n={} p50={:?} p90={:?} max={:?}",
        samples.len(),
        percentile(&samples, 0.5),
        percentile(&samples, 0.9),
        samples[samples.len() - 1]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirrors_two_peers_and_follows_their_changes() {
    let local = Store::etcd().await;
    let b = Peer::start("b", 2).await;
    let c = Peer::start("c", 3).await;
    let b_state = sample_state(&b.config, 20);
    let c_state = sample_state(&c.config, 10);
    b.publish(&b_state).await;
    c.publish(&c_state).await;

    let started = Instant::now();
    let mesh = Mesh::start(&cluster("a", 1), &local.endpoint(), &[&b, &c], timing()).await;
    for peer in [&b, &c] {
        // Read both stores: the cache holds exactly what the peer publishes.
        let published = peer.state().await;
        wait_cache(
            &local.client,
            peer.name(),
            &expected_cache(peer.name(), &published),
        )
        .await;
    }
    println!(
        "first sync of two peers (80 + 40 entries): {:?}",
        started.elapsed()
    );
    for peer in [&b, &c] {
        let (status, _) = wait_status(&local.client, peer.name(), "synced", |s| {
            s.synced && s.connected
        })
        .await;
        assert_eq!(status.cluster_id, Some(peer.config.id.get()));
        assert_eq!(status.entries, peer.state().await.len() as u64);
        assert_eq!(status.invalid_entries, 0);
        assert!(
            !status.refused && status.last_sync_time.is_some(),
            "{status:?}"
        );
        // The peer's config and heartbeat are mirrored, its bytes unchanged.
        let config = local
            .client
            .raw()
            .get(&cluster_config_key(peer.name()))
            .await
            .unwrap();
        assert_eq!(config.unwrap().value, peer.config.encode());
        let heartbeat = local
            .client
            .raw()
            .get(&model::keys::heartbeat_cache_key(peer.name()))
            .await
            .unwrap();
        assert_eq!(heartbeat.unwrap().value, b"2026-01-01T00:00:00Z");
        // Every published kind has its cache canary; service exports too (the peer does
        // not publish them, so there is nothing to wait for).
        for kind in Kind::ALL {
            let canary = kind.cache_canary_key(peer.name());
            assert!(
                local.client.raw().get(&canary).await.unwrap().is_some(),
                "{canary}"
            );
        }
    }

    // Changes: each is timed from the write into the peer to the event in the local cache.
    let mut events = local
        .client
        .raw()
        .watch_prefix("cilium/cache/", 0)
        .await
        .unwrap();
    let mut latencies = Vec::new();
    for i in 0..30u32 {
        let (key, value, delete) = match i % 3 {
            0 => {
                let (k, v) = node(&b.config, 100 + i);
                (k, v, false)
            }
            1 => {
                let (k, v) = service(&b.config, i % 20, 8000 + i as u16);
                (k, v, false)
            }
            _ => (identity(&b.config, 256 + i % 20).0, Vec::new(), true),
        };
        let cache_key = to_cache_key(&parse_state_key(&key).unwrap(), b.name()).unwrap();
        let written = Instant::now();
        if delete {
            b.delete(&key).await;
        } else {
            b.put(&key, value.clone()).await;
        }
        let seen = tokio::time::timeout(TIMEOUT, async {
            while let Some(event) = events.next().await {
                match event {
                    WatchEvent::Put { key, value: v, .. } if key == cache_key && !delete => {
                        assert_eq!(v, value, "the peer's bytes, unchanged");
                        return;
                    }
                    WatchEvent::Delete { key, .. } if key == cache_key && delete => return,
                    _ => {}
                }
            }
            panic!("local watch ended");
        })
        .await;
        assert!(
            seen.is_ok(),
            "change {i} ({cache_key}) never reached the cache"
        );
        latencies.push(written.elapsed());
    }
    report("peer write -> local cache event latency", latencies);
    wait_cache(
        &local.client,
        b.name(),
        &expected_cache(b.name(), &b.state().await),
    )
    .await;
    wait_cache(&local.client, c.name(), &expected_cache(c.name(), &c_state)).await;

    // The heartbeat is copied at every probe.
    b.heartbeat("2026-01-01T00:00:05Z").await;
    let (_, took) = wait_for("the heartbeat mirror", TIMEOUT, || async {
        let value = local
            .client
            .raw()
            .get(&model::keys::heartbeat_cache_key(b.name()))
            .await
            .unwrap()
            .map(|e| e.value);
        if value.as_deref() == Some(&b"2026-01-01T00:00:05Z"[..]) {
            Ok(())
        } else {
            Err(format!("{value:?}"))
        }
    })
    .await;
    println!(
        "heartbeat mirrored after {took:?} (probe interval {:?})",
        timing().probe_interval
    );

    // Ready, and the metrics per peer.
    let (code, body) = http_get(mesh.health, "/readyz").await;
    assert_eq!(code, 200, "{body}");
    assert!(mesh.running().status().ready);
    let (_, metrics) = http_get(mesh.health, "/metrics").await;
    for peer in ["b", "c"] {
        assert_eq!(
            metric(
                &metrics,
                &format!("kvstoremesh_peer_connected{{peer=\"{peer}\"}}")
            ),
            Some(1.0)
        );
        assert_eq!(
            metric(
                &metrics,
                &format!("kvstoremesh_peer_synced{{peer=\"{peer}\"}}")
            ),
            Some(1.0)
        );
    }
    assert_eq!(
        metric(
            &metrics,
            "kvstoremesh_peer_entries{peer=\"c\",kind=\"nodes\"}"
        ),
        Some(10.0)
    );
    assert!(metric(&metrics, "kvstoremesh_peer_events_total{peer=\"b\"}").unwrap() >= 30.0);
}

/// kill -9 and restart on the same data resumes the watch (no relist); kill -9 and restart
/// with a wiped data dir (a replaced store) relists and leaves no stale key.
async fn killed_peer_recovers(backend: testkit::Backend) {
    let local = Store::etcd().await;
    let mut b = Peer {
        config: cluster("b", 2),
        store: Store::start(backend.clone()).await,
    };
    let first = sample_state(&b.config, 30);
    b.publish(&first).await;
    let mut mesh = Mesh::start(&cluster("a", 1), &local.endpoint(), &[&b], timing()).await;
    wait_cache(&local.client, b.name(), &expected_cache(b.name(), &first)).await;
    wait_status(&local.client, b.name(), "synced", |s| s.synced).await;
    let relists = |text: &str, reason: &str| {
        metric(
            text,
            &format!("kvstoremesh_peer_relists_total{{peer=\"b\",reason=\"{reason}\"}}"),
        )
        .unwrap_or(0.0)
    };
    let (_, before) = http_get(mesh.health, "/metrics").await;

    // kill -9, restart on the same data, change something: the watch resumes.
    b.store.process.kill();
    let killed = Instant::now();
    let (_, detected) =
        wait_status(&local.client, b.name(), "disconnected", |s| !s.connected).await;
    println!("[{}] kill -9 noticed after {detected:?}", backend.name());
    assert_cache(&local.client, b.name(), &expected_cache(b.name(), &first)).await;
    b.store.process.restart().await.unwrap();
    b.store.reconnect().await;
    let (key, value) = node(&b.config, 500);
    b.put(&key, value).await;
    let took = wait_cache(
        &local.client,
        b.name(),
        &expected_cache(b.name(), &b.state().await),
    )
    .await;
    println!(
        "[{}] restarted peer caught up {took:?} after the change ({:?} after the kill)",
        backend.name(),
        killed.elapsed()
    );
    let (_, after) = http_get(mesh.health, "/metrics").await;
    for reason in ["initial", "store-replaced", "compacted"] {
        assert_eq!(
            relists(&before, reason),
            relists(&after, reason),
            "{reason}: resumed, not relisted"
        );
    }

    // kill -9, wipe the data dir, restart, publish another state: a replaced store.
    b.store.process.kill();
    wait_status(&local.client, b.name(), "disconnected", |s| !s.connected).await;
    std::fs::remove_dir_all(b.store.process.data_dir()).unwrap();
    b.store.process.restart().await.unwrap();
    b.store.reconnect().await;
    // Some entries gone, some changed, some new.
    let mut second: State = first
        .iter()
        .filter(|(k, _)| !k.contains("node-1"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    second.extend([
        service(&b.config, 3, 9999),
        node(&b.config, 700),
        identity(&b.config, 9000),
    ]);
    b.publish(&second).await;
    let took = wait_cache(
        &local.client,
        b.name(),
        &expected_cache(b.name(), &b.state().await),
    )
    .await;
    println!(
        "[{}] wiped peer relisted {took:?} after it was republished",
        backend.name()
    );
    assert_eq!(b.state().await, second);
    let (status, _) = wait_status(&local.client, b.name(), "synced again", |s| {
        s.synced && s.connected
    })
    .await;
    assert_eq!(status.entries, second.len() as u64);
    let (_, after) = http_get(mesh.health, "/metrics").await;
    assert!(relists(&after, "store-replaced") >= 1.0, "{after}");
    mesh.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_and_wiped_etcd_peer_recovers_without_stale_keys() {
    killed_peer_recovers(testkit::Backend::Etcd).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_and_wiped_embedded_peer_recovers_without_stale_keys() {
    let bin = testkit::kvstore_bin().expect("our store's binary");
    killed_peer_recovers(testkit::Backend::Embedded { bin }).await;
}

/// A peer that deletes a sync canary (with entries, in one revision: a lease that expired,
/// an apiserver starting over) is incomplete: the cache keeps its last full state, unchanged,
/// until the peer's canaries are back, then becomes the peer's state at once. kvstoremesh used
/// to pass such deletions into the cache, where agents then lost them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_canary_freezes_the_cache_until_the_peer_is_complete_again() {
    let local = Store::etcd().await;
    let b = Peer::start("b", 2).await;
    let state = sample_state(&b.config, 20);
    b.publish(&state).await;
    let mut mesh = Mesh::start(&cluster("a", 1), &local.endpoint(), &[&b], timing()).await;
    wait_cache(&local.client, b.name(), &expected_cache(b.name(), &state)).await;
    wait_status(&local.client, b.name(), "synced", |s| s.synced).await;

    let gone = node(&b.config, 1).0;
    assert!(state.contains_key(&gone));
    b.client()
        .raw()
        .apply_batch(vec![
            kvstore::client::Op::delete(Kind::Nodes.state_canary_key(b.name())),
            kvstore::client::Op::delete(gone.clone()),
        ])
        .await
        .expect("one transaction");
    let (key, value) = node(&b.config, 900);
    b.put(&key, value).await;
    wait_status(&local.client, b.name(), "not synced", |s| !s.synced).await;
    // Let a wrong mirror catch up before looking.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_cache(&local.client, b.name(), &expected_cache(b.name(), &state)).await;

    b.canaries().await;
    wait_cache(
        &local.client,
        b.name(),
        &expected_cache(b.name(), &b.state().await),
    )
    .await;
    let (status, _) = wait_status(&local.client, b.name(), "synced again", |s| s.synced).await;
    assert_eq!(status.entries, b.state().await.len() as u64);
    mesh.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_peer_is_noticed_and_resumed() {
    let local = Store::etcd().await;
    let b = Peer::start("b", 2).await;
    let state = sample_state(&b.config, 20);
    b.publish(&state).await;
    let mesh = Mesh::start(&cluster("a", 1), &local.endpoint(), &[&b], timing()).await;
    wait_cache(&local.client, b.name(), &expected_cache(b.name(), &state)).await;
    wait_status(&local.client, b.name(), "synced", |s| {
        s.synced && s.connected
    })
    .await;
    let (_, before) = http_get(mesh.health, "/metrics").await;

    b.store.process.freeze();
    let (status, noticed) =
        wait_status(&local.client, b.name(), "disconnected", |s| !s.connected).await;
    println!(
        "SIGSTOP noticed after {noticed:?} (peer request timeout {:?}): {:?}",
        timing().peer_request_timeout,
        status.last_error
    );
    assert!(
        status.synced,
        "the cache stays complete while the peer is frozen"
    );
    assert!(status.disconnected_since.is_some());
    assert_cache(&local.client, b.name(), &expected_cache(b.name(), &state)).await;

    b.store.process.thaw();
    let (_, back) = wait_status(&local.client, b.name(), "connected again", |s| s.connected).await;
    println!("SIGCONT: following again after {back:?}");
    let (key, value) = node(&b.config, 900);
    b.put(&key, value).await;
    b.delete(&identity(&b.config, 256).0).await;
    wait_cache(
        &local.client,
        b.name(),
        &expected_cache(b.name(), &b.state().await),
    )
    .await;
    let (_, after) = http_get(mesh.health, "/metrics").await;
    let initial = "kvstoremesh_peer_relists_total{peer=\"b\",reason=\"initial\"}";
    assert_eq!(
        metric(&before, initial),
        metric(&after, initial),
        "resumed, not relisted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clashing_peers_are_refused_and_nothing_of_them_is_mirrored() {
    let local = Store::etcd().await;
    let b = Peer::start("b", 1).await; // our own id
    let c = Peer::start("c", 3).await;
    let d = Peer::start("d", 3).await; // c's id
    let e = Peer::with_config(cluster_with("e", 5, MaxConnectedClusters::Max511)).await;
    let f = Peer::start("f", 6).await; // publishes a config naming another cluster
    for peer in [&b, &c, &d, &e] {
        peer.publish(&sample_state(&peer.config, 3)).await;
    }
    f.publish(&sample_state(&f.config, 3)).await;
    f.put(&cluster_config_key(f.name()), cluster("g", 6).encode())
        .await;

    let a = cluster("a", 1);
    let mesh = Mesh::start(&a, &local.endpoint(), &[&b, &c, &e, &f], timing()).await;
    wait_cache(
        &local.client,
        c.name(),
        &expected_cache(c.name(), &c.state().await),
    )
    .await;
    // d comes after c, which holds id 3.
    write_atomic(&mesh.dir().join("d"), &peer_file(&d.store.endpoint()));
    for (peer, message) in [
        (&b, "peer b uses cluster id 1, which is already a's own"),
        (&d, "peer d uses cluster id 3, which peer c already uses"),
        (
            &e,
            "peer e has max-connected-clusters 511 but this cluster has 255",
        ),
        (
            &f,
            "value's name names cluster g, but it was read from peer f",
        ),
    ] {
        let (status, _) = wait_status(&local.client, peer.name(), "refused", |s| s.refused).await;
        let error = status.last_error.unwrap_or_default();
        assert!(error.contains(message), "{error}");
        println!("{}: {error}", peer.name());
        assert!(!status.connected && !status.synced);
        // Nothing of it: no entry, no canary, no config, no heartbeat; only the status.
        let everything = everything_of(&local.client, peer.name()).await;
        assert_eq!(
            everything.keys().collect::<Vec<_>>(),
            vec![&model::keys::peer_status_key(peer.name())],
            "{}",
            peer.name()
        );
    }
    let (_, metrics) = http_get(mesh.health, "/metrics").await;
    assert_eq!(
        metric(&metrics, "kvstoremesh_peer_refused{peer=\"d\"}"),
        Some(1.0)
    );

    // b fixes its id: accepted at the next retry.
    let fixed = cluster("b", 2);
    b.put(&fixed.key(), fixed.encode()).await;
    let mut b_state = State::new();
    b_state.extend([node(&fixed, 1), identity(&fixed, 300)]);
    b.put_all(&b_state).await;
    let published: State = b
        .state()
        .await
        .into_iter()
        .filter(|(k, v)| {
            let kind = parse_state_key(k).unwrap().kind();
            model::validate_entry(kind, k, v, &fixed).is_ok()
        })
        .collect();
    assert_eq!(
        published.len(),
        2,
        "the entries of id 1 are now invalid: {published:?}"
    );
    let (status, took) = wait_status(&local.client, b.name(), "accepted", |s| {
        s.synced && !s.refused
    })
    .await;
    println!("b accepted {took:?} after fixing its config");
    assert_eq!(status.cluster_id, Some(2));
    wait_cache(
        &local.client,
        b.name(),
        &expected_cache(b.name(), &published),
    )
    .await;
    // d stays refused while c holds id 3.
    assert!(status_of(&local.client, d.name()).await.unwrap().refused);
}
