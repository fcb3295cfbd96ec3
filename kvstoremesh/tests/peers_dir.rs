//! The peers directory is followed while running, and a peer's cache outlives its
//! unreachability and kvstoremesh's own restarts.

mod common;

use std::time::Duration;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_files_added_changed_and_removed_while_running() {
    let local = Store::etcd().await;
    let b = Peer::start("b", 2).await;
    let b_state = sample_state(&b.config, 10);
    b.publish(&b_state).await;
    // b's store moves: another store with (partly) other state.
    let moved = Peer::start("b", 2).await;
    let mut moved_state = sample_state(&moved.config, 6);
    moved_state.extend([node(&moved.config, 40)]);
    moved.publish(&moved_state).await;

    let a = cluster("a", 1);
    let mut mesh = Mesh::start(&a, &local.endpoint(), &[], timing()).await;
    let (_, took) = wait_for("ready without peers", TIMEOUT, || async {
        match http_get(mesh.health, "/readyz").await {
            (200, _) => Ok(()),
            (code, body) => Err(format!("{code} {body}")),
        }
    })
    .await;
    println!("no peers: ready after {took:?} (the local lease granted)");

    // Not peers: hidden files, files named like certificates, our own cluster's file.
    std::fs::write(mesh.dir().join(".b.swp"), peer_file(&b.store.endpoint())).unwrap();
    std::fs::write(mesh.dir().join("b.ca.crt"), "-----BEGIN CERTIFICATE-----\n").unwrap();
    std::fs::write(mesh.dir().join("a"), peer_file(&local.endpoint())).unwrap();

    // Added.
    write_atomic(&mesh.dir().join("b"), &peer_file(&b.store.endpoint()));
    let took = wait_cache(&local.client, b.name(), &expected_cache(b.name(), &b_state)).await;
    println!("peer file added: cache synced after {took:?}");

    // Changed: the cache is reconciled with the new store, no stale key left.
    write_atomic(&mesh.dir().join("b"), &peer_file(&moved.store.endpoint()));
    let took = wait_cache(
        &local.client,
        b.name(),
        &expected_cache(b.name(), &moved_state),
    )
    .await;
    println!("peer file changed: cache equal to the new store after {took:?}");
    assert!(
        everything_of(&local.client, &name("a")).await.is_empty(),
        "own file ignored"
    );
    assert_eq!(
        mesh.running().status().peers.len(),
        1,
        "{:?}",
        mesh.running().status()
    );

    // Removed: kept through the grace period (status says when it goes), then drained.
    std::fs::remove_file(mesh.dir().join("b")).unwrap();
    let (status, _) = wait_status(&local.client, b.name(), "removal announced", |s| {
        s.removal_drains_at.is_some()
    })
    .await;
    println!(
        "peer file removed: drains at {:?}",
        status.removal_drains_at
    );
    let (_, took) = wait_for("the drain", TIMEOUT, || async {
        let left = everything_of(&local.client, b.name()).await;
        if left.is_empty() {
            Ok(())
        } else {
            Err(format!("{:?}", left.keys().collect::<Vec<_>>()))
        }
    })
    .await;
    println!(
        "drained {took:?} after the removal was noticed (grace {:?})",
        timing().peer_removal_grace
    );
    let (_, metrics) = http_get(mesh.health, "/metrics").await;
    assert!(
        !metrics.contains("peer=\"b\""),
        "series of a drained peer are gone"
    );

    // A file with a bad config: the peer is reported, nothing else breaks.
    std::fs::write(mesh.dir().join("c"), "endpoints: [\"ftp://nowhere:1\"]\n").unwrap();
    let (status, _) = wait_status(&local.client, &name("c"), "config error", |s| {
        s.last_error.is_some()
    })
    .await;
    println!("bad peer file: {:?}", status.last_error);
    assert!(status.last_error.unwrap().contains("ftp://nowhere:1"));
    mesh.stop().await;
}

/// The cache keys of `peer` with their mod revision and lease.
async fn cache_meta(
    local: &kvstore::client::StoreClient,
    peer: &model::ClusterName,
) -> Vec<(String, i64, Option<kvstore::client::LeaseId>)> {
    let mut meta = Vec::new();
    for kind in model::Kind::ALL {
        for entry in local
            .raw()
            .list_prefix(&kind.cache_prefix(peer))
            .await
            .unwrap()
            .entries
        {
            meta.push((entry.key, entry.mod_revision, entry.lease));
        }
    }
    meta
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cache_survives_kvstoremesh_restarts() {
    let local = Store::etcd().await;
    let mut b = Peer::start("b", 2).await;
    let state = sample_state(&b.config, 10);
    b.publish(&state).await;
    let mut timing = timing();
    timing.lease_ttl = Duration::from_secs(3);
    let a = cluster("a", 1);
    let mut mesh = Mesh::start(&a, &local.endpoint(), &[&b], timing.clone()).await;
    wait_cache(&local.client, b.name(), &expected_cache(b.name(), &state)).await;
    wait_status(&local.client, b.name(), "synced", |s| s.synced).await;
    let before = cache_meta(&local.client, b.name()).await;
    let restart = |mesh: &mut Mesh| {
        let dir = std::mem::replace(&mut mesh.dir, tempfile::tempdir().unwrap());
        let config = kvstore::client::ClientConfig::new([local.endpoint()]);
        let a = a.clone();
        let timing = timing.clone();
        async move { Mesh::start_in(dir, &a, config, timing).await }
    };

    // Restarted with the peer up: the new kvstoremesh takes the lease over, so the resync
    // writes nothing.
    mesh.stop().await;
    let mut mesh = restart(&mut mesh).await;
    let (_, took) = wait_for("synced after the restart", TIMEOUT, || async {
        match mesh.running().status().peers.get("b") {
            Some(s) if s.synced && s.connected => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    println!("restart with the peer up: synced again after {took:?}");
    assert_eq!(
        cache_meta(&local.client, b.name()).await,
        before,
        "not a single cache write"
    );

    // Restarted with the peer down and without the lease note (an older kvstoremesh, say):
    // a new lease, and the cache is attached to it rather than left to expire.
    mesh.stop().await;
    local.client.delete(kvstoremesh::LEASE_KEY).await.unwrap();
    b.store.process.kill();
    let _mesh = restart(&mut mesh).await;
    let (status, _) = wait_status(&local.client, b.name(), "a failed attempt", |s| {
        s.failures > 0
    })
    .await;
    assert!(!status.connected);
    // Well past the old lease's TTL.
    tokio::time::sleep(timing.lease_ttl * 2).await;
    let everything = everything_of(&local.client, b.name()).await;
    assert_cache(&local.client, b.name(), &expected_cache(b.name(), &state)).await;
    for kind in model::Kind::ALL {
        assert!(
            everything.contains_key(&kind.cache_canary_key(b.name())),
            "{kind} canary kept"
        );
    }
    assert!(everything.contains_key(&model::keys::cluster_config_key(b.name())));
    let leases: std::collections::HashSet<_> = cache_meta(&local.client, b.name())
        .await
        .into_iter()
        .map(|(_, _, l)| l)
        .collect();
    assert_eq!(leases.len(), 1);
    assert_ne!(
        leases.into_iter().next().unwrap(),
        before[0].2,
        "attached to the new lease"
    );
    let (status, _) = wait_status(&local.client, b.name(), "stale but complete", |s| {
        s.synced && !s.connected
    })
    .await;
    println!(
        "restart with the peer down: unreachable since {:?}, cache kept: {} entries",
        status.disconnected_since, status.entries
    );

    // The peer comes back: reconciled, following again.
    b.store.process.restart().await.unwrap();
    b.store.reconnect().await;
    let (key, value) = node(&b.config, 99);
    b.put(&key, value).await;
    wait_cache(
        &local.client,
        b.name(),
        &expected_cache(b.name(), &b.state().await),
    )
    .await;
    wait_status(&local.client, b.name(), "connected", |s| {
        s.connected && s.synced
    })
    .await;
}

/// kvstoremesh's lease is revoked under it (the local store lost it, an operator revoked
/// it): every cache key goes with it. The peer is idle, so no change of its will bring them
/// back: kvstoremesh rewrites the peer's full state from what it holds under its new lease,
/// without reading the peer again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_lease_rewrites_an_idle_peers_cache() {
    let local = Store::etcd().await;
    let b = Peer::start("b", 2).await;
    let state = sample_state(&b.config, 20);
    b.publish(&state).await;
    let mut mesh = Mesh::start(&cluster("a", 1), &local.endpoint(), &[&b], timing()).await;
    wait_cache(&local.client, b.name(), &expected_cache(b.name(), &state)).await;
    let old = cache_meta(&local.client, b.name()).await[0]
        .2
        .expect("the cache is leased");
    let (_, before) = http_get(mesh.health, "/metrics").await;

    local.client.revoke_lease(old).await.expect("revoke");
    assert!(cache_of(&local.client, b.name()).await.is_empty());
    let took = wait_cache(&local.client, b.name(), &expected_cache(b.name(), &state)).await;
    println!("cache rewritten {took:?} after its lease was revoked");
    let leases: std::collections::HashSet<_> = cache_meta(&local.client, b.name())
        .await
        .into_iter()
        .map(|(_, _, lease)| lease)
        .collect();
    assert_eq!(leases.len(), 1);
    assert_ne!(leases.into_iter().next().unwrap(), Some(old));
    let config = local
        .client
        .raw()
        .get(&model::keys::cluster_config_key(b.name()))
        .await
        .unwrap();
    assert!(config.is_some(), "the peer's config is mirrored again");
    let (_, after) = http_get(mesh.health, "/metrics").await;
    let initial = "kvstoremesh_peer_relists_total{peer=\"b\",reason=\"initial\"}";
    assert_eq!(
        metric(&before, initial),
        metric(&after, initial),
        "rewritten from memory, not listed again"
    );
    mesh.stop().await;
}

/// The same while the peer keeps writing: a change delivered right after the new lease was
/// granted may be the first to see it, and the cache must still be rewritten whole. (Before
/// the delivery path asked for the full state too, it took the new lease over silently; this
/// test did not catch that in 3 runs, since the idle path usually sees the lease first.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_lease_rewrites_a_busy_peers_cache() {
    let local = Store::etcd().await;
    let b = Peer::start("b", 2).await;
    let state = sample_state(&b.config, 20);
    b.publish(&state).await;
    let mut mesh = Mesh::start(&cluster("a", 1), &local.endpoint(), &[&b], timing()).await;
    wait_cache(&local.client, b.name(), &expected_cache(b.name(), &state)).await;
    let old = cache_meta(&local.client, b.name()).await[0]
        .2
        .expect("the cache is leased");

    local.client.revoke_lease(old).await.expect("revoke");
    for n in 1000..1100 {
        let (key, value) = node(&b.config, n);
        b.put(&key, value).await;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let took = wait_cache(
        &local.client,
        b.name(),
        &expected_cache(b.name(), &b.state().await),
    )
    .await;
    println!("cache rewritten {took:?} after the writes stopped");
    let leases: std::collections::HashSet<_> = cache_meta(&local.client, b.name())
        .await
        .into_iter()
        .map(|(_, _, lease)| lease)
        .collect();
    assert_eq!(leases.len(), 1);
    assert_ne!(leases.into_iter().next().unwrap(), Some(old));
    mesh.stop().await;
}
