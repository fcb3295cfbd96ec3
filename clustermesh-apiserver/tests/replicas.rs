//! Three `clustermesh-apiserver` replicas (`--replica-name`) publishing one cluster into one
//! store: one leads and publishes, the others stand by (and say so on `/readyz`). When the
//! leader is SIGKILLed, a standby takes over within the lease TTL, and nothing published is
//! deleted or rewritten on the way (the keys keep their revisions and their lease). A leader
//! that was only paused past its takeover is deposed: it writes nothing more and stands by.
//! Against a real etcd and against our store.

mod common;

use std::collections::BTreeMap;
use std::time::Instant;

use clustermesh_apiserver::election::LEADER_KEY;
use futures::StreamExt;
use kvstore::client::{LeaseId, StoreClient};
use model::keys::HEARTBEAT_KEY;

use common::*;

/// The lease TTL the replicas run with.
const TTL: &str = "3s";

/// Key → (mod revision, lease) of everything published, without the heartbeat and the
/// leader key (which change with every beat and every leader).
async fn published(client: &StoreClient) -> BTreeMap<String, (i64, Option<LeaseId>)> {
    let listing = client.raw().list_prefix("cilium/").await.expect("list");
    listing
        .entries
        .into_iter()
        .filter(|e| e.key != HEARTBEAT_KEY && e.key != LEADER_KEY)
        .map(|e| (e.key, (e.mod_revision, e.lease)))
        .collect()
}

async fn leader(client: &StoreClient) -> Option<String> {
    client
        .raw()
        .get(LEADER_KEY)
        .await
        .expect("read the leader key")
        .map(|e| String::from_utf8_lossy(&e.value).into_owned())
}

async fn readyz(api: &Apiserver) -> String {
    http_get(api.health(), "/readyz")
        .await
        .map(|(_, body)| body)
        .unwrap_or_default()
}

async fn one_leads_and_another_takes_over(which: Which) {
    let store = Store::start(which).await;
    let work = Workdir::new(&["eu-1"]);
    let mut replicas: BTreeMap<String, Apiserver> = BTreeMap::new();
    for name in ["r1", "r2", "r3"] {
        let mut args = args(&store, &work, TTL);
        args.extend(strings(&["--replica-name", name]));
        let mut api = Apiserver::spawn(&args, work.path(), name);
        api.started().await;
        replicas.insert(name.to_owned(), api);
    }
    for api in replicas.values_mut() {
        api.ready().await;
    }
    let first = wait_for("a leader", async || leader(&store.client).await).await;
    assert!(replicas.contains_key(&first), "{first}");
    let mut standbys = 0;
    for (name, api) in &replicas {
        let body = readyz(api).await;
        if *name == first {
            assert!(body.contains(r#""role":"leader""#), "{body}");
        } else {
            assert!(body.contains(r#""role":"standby""#), "{body}");
            assert!(body.contains(&format!(r#""leader":"{first}""#)), "{body}");
            standbys += 1;
        }
    }
    assert_eq!(standbys, 2);
    let before = published(&store.client).await;
    assert!(before.len() > 10, "the fixture is published: {before:?}");
    let lease = before
        .values()
        .next()
        .and_then(|(_, l)| *l)
        .expect("leased");

    // Watch from now: no published key may be deleted during the takeover.
    let from = store.client.status().await.expect("status").revision + 1;
    let mut watch = store
        .client
        .raw()
        .watch_prefix("cilium/", from)
        .await
        .expect("watch");

    let killed = Instant::now();
    replicas.get_mut(&first).expect("leader").kill();
    let second = wait_for("another leader", async || {
        leader(&store.client).await.filter(|l| *l != first)
    })
    .await;
    let took = killed.elapsed();
    let beat = store
        .client
        .raw()
        .get(HEARTBEAT_KEY)
        .await
        .expect("heartbeat")
        .expect("a heartbeat")
        .mod_revision;
    wait_for("the new leader's heartbeat", async || {
        let now = store.client.raw().get(HEARTBEAT_KEY).await.ok()??;
        (now.mod_revision > beat).then_some(())
    })
    .await;
    println!("[{which:?}] {first} killed: {second} leads {took:?} later (lease TTL {TTL})");
    let after = published(&store.client).await;
    assert_eq!(after, before, "nothing published was rewritten or deleted");
    assert!(
        store
            .client
            .lease_time_to_live(lease)
            .await
            .expect("ttl")
            .is_some(),
        "the published keys stay on the lease the new leader keeps alive"
    );
    let until = store.client.status().await.expect("status").revision;
    let mut events = Vec::new();
    while let Ok(Some(event)) =
        tokio::time::timeout(std::time::Duration::from_millis(500), watch.next()).await
    {
        events.push(event);
    }
    for event in &events {
        if let kvstore::client::WatchEvent::Delete { key, mod_revision } = event {
            assert!(*mod_revision > until, "{key} deleted during the takeover");
        }
    }

    // The new leader publishes changes.
    work.remove("services.yaml");
    wait_for("the services to go", async || {
        let services = store.read("cilium/state/services/").await;
        services.is_empty().then_some(())
    })
    .await;

    // Pause the new leader past its takeover: it is deposed and writes nothing once resumed.
    let paused = replicas.get(&second).expect("second leader");
    paused.signal("STOP");
    let third = wait_for("a third leader", async || {
        leader(&store.client).await.filter(|l| *l != second)
    })
    .await;
    let before = published(&store.client).await;
    let paused = replicas.get(&second).expect("second leader");
    paused.signal("CONT");
    let body = wait_for("the resumed leader to stand by", async || {
        let body = readyz(paused).await;
        body.contains(r#""role":"standby""#).then_some(body)
    })
    .await;
    assert!(body.contains(&format!(r#""leader":"{third}""#)), "{body}");
    assert_eq!(leader(&store.client).await.as_deref(), Some(third.as_str()));
    assert_eq!(published(&store.client).await, before);
    println!("[{which:?}] {second} paused: {third} took over; {second} stands by once resumed");
}

both_backends!(one_leads_and_another_takes_over);
