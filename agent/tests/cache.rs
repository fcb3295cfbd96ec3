//! The default source: kvstoremesh's cache in the local store. The test writes the local store
//! as kvstoremesh does (the peer's cluster config, cache entries, cache canaries, its status
//! of the peer and the mirrored heartbeat) and reads the agent's API.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use agent::merge::ClusterHealth;
use agent::remote::Phase;
use common::{Agent, Svc, manifests, write_manifests};
use kvstore::client::{ClientConfig, Op, StoreClient};
use model::keys::{StateKey, cluster_config_key};
use model::{
    Backend, ClusterConfig, ClusterService, DnsLabel, Identity, IpIdentity, IpPrefix, Kind, L4Port,
    Label, NumericIdentity, PortMap, Protocol, SchemaVersion, StoreValue, to_cache_key,
};
use testkit::{Backend as StoreBackend, StoreOptions, StoreProcess};

const STATUS: &str = "cilium/synced/b/kvstoremesh/status";
const HEARTBEAT: &str = "cilium/cache/heartbeat/b";

fn http() -> PortMap {
    PortMap::from([(
        "http".to_owned(),
        L4Port {
            protocol: Protocol::Tcp,
            port: 8080,
        },
    )])
}

/// b's part of shop/web with backends 10.2.1.<octet>.
fn service(b: &ClusterConfig, octets: &[u8]) -> ClusterService {
    ClusterService {
        schema: SchemaVersion,
        cluster: b.name.clone(),
        cluster_id: b.id,
        namespace: DnsLabel::new("shop").unwrap(),
        name: DnsLabel::new("web").unwrap(),
        frontends: BTreeMap::from([(
            "10.96.2.1".parse().unwrap(),
            PortMap::from([(
                "http".to_owned(),
                L4Port {
                    protocol: Protocol::Tcp,
                    port: 80,
                },
            )]),
        )]),
        backends: octets
            .iter()
            .map(|o| {
                (
                    format!("10.2.1.{o}").parse::<IpAddr>().unwrap(),
                    Backend {
                        ports: http(),
                        ready: true,
                        serving: true,
                        terminating: false,
                        zone: None,
                        node_name: None,
                        hostname: None,
                    },
                )
            })
            .collect(),
        shared: true,
        include_external: true,
        labels: BTreeMap::new(),
        selector: BTreeMap::new(),
    }
}

fn identity(b: &ClusterConfig) -> Identity {
    Identity::new(
        NumericIdentity::new((2 << 16) | 300).unwrap(),
        [
            Label::new("k8s", "app", "web").unwrap(),
            Label::new("k8s", "io.kubernetes.pod.namespace", "shop").unwrap(),
            Label::cluster(&b.name),
        ],
    )
}

fn ip(b: &ClusterConfig, octet: u8) -> IpIdentity {
    IpIdentity {
        schema: SchemaVersion,
        ip: IpPrefix::host(format!("10.2.1.{octet}").parse().unwrap()),
        identity: identity(b).id,
        host_ip: None,
        namespace: None,
        pod_name: None,
        cluster: b.name.clone(),
    }
}

fn cache_key(key: &StateKey, b: &ClusterConfig) -> String {
    to_cache_key(key, &b.name).unwrap()
}

/// kvstoremesh's writes for b's state with web backends `octets`.
fn entries(b: &ClusterConfig, octets: &[u8]) -> Vec<Op<Vec<u8>>> {
    let svc = service(b, octets);
    let id = identity(b);
    let mut ops = vec![
        Op::put(cache_key(&svc.key(), b), svc.encode()),
        Op::put(cache_key(&id.key(), b), id.encode()),
    ];
    for o in octets {
        let v = ip(b, *o);
        ops.push(Op::put(cache_key(&v.key(), b), v.encode()));
    }
    ops
}

fn canaries(b: &ClusterConfig, present: bool) -> Vec<Op<Vec<u8>>> {
    Kind::CORE
        .iter()
        .map(|k| {
            let key = k.cache_canary_key(&b.name);
            if present {
                Op::put(key, b"2026-01-01T00:00:00Z".to_vec())
            } else {
                Op::delete(key)
            }
        })
        .collect()
}

fn status(connected: bool) -> Op<Vec<u8>> {
    Op::put(
        STATUS,
        serde_json::to_vec(
            &serde_json::json!({"schema": 1, "peer": "b", "connected": connected, "synced": true}),
        )
        .unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_source_gates_follows_and_survives_a_lost_cache() {
    let work = tempfile::tempdir().unwrap();
    let store = StoreProcess::start(StoreBackend::Etcd, StoreOptions::default())
        .await
        .expect("start etcd");
    let client = StoreClient::connect(&ClientConfig::new([store.endpoint()]))
        .await
        .unwrap();
    let raw = client.raw();
    let b = common::cluster_config("b", 2);
    let local = common::cluster_config("a", 1);
    let local_dir = work.path().join("a");
    std::fs::create_dir_all(&local_dir).unwrap();
    write_manifests(
        &local_dir,
        &manifests("a", 1, &[Svc::new("shop", "web").global().ready(&[1])]),
    );

    // Everything but the canaries: nothing of b may be used yet.
    let mut ops = vec![
        Op::put(cluster_config_key(&b.name), b.encode()),
        status(true),
        Op::put(HEARTBEAT, b"1".to_vec()),
    ];
    ops.extend(entries(&b, &[1, 2]));
    raw.apply_batch(ops).await.unwrap();
    let mut agent = Agent::start(
        &local,
        &local_dir,
        work.path(),
        &[
            "--store-endpoints".into(),
            store.endpoint(),
            "--grace".into(),
            "1s".into(),
            "--heartbeat-timeout".into(),
            "10m".into(),
        ],
    )
    .await;
    let view = agent
        .wait_for("b listed, not synced", |v| {
            v.status.local_synced
                && v.status
                    .peers
                    .get("b")
                    .is_some_and(|p| p.phase == Phase::Listing)
        })
        .await;
    assert_eq!(view.clusters("shop/web"), BTreeSet::from(["a".to_owned()]));
    assert!(!view.ipcache_has("10.2.1.1", "b"));

    // The canaries: b is synced.
    raw.apply_batch(canaries(&b, true)).await.unwrap();
    agent
        .wait_for("b synced", |v| {
            v.peer_synced("b")
                && v.backends("shop/web").len() == 3
                && v.ipcache_has("10.2.1.2", "b")
        })
        .await;

    // Live changes.
    raw.apply_batch(entries(&b, &[1, 2, 3])).await.unwrap();
    agent
        .wait_for("a third backend", |v| v.backends("shop/web").len() == 4)
        .await;

    // kvstoremesh lost b: demoted after the grace, restored when it is back.
    raw.apply_batch([status(false)]).await.unwrap();
    let view = agent
        .wait_for("b stale", |v| {
            v.peer_health("b") == Some(ClusterHealth::Stale)
        })
        .await;
    assert_eq!(view.clusters("shop/web"), BTreeSet::from(["a".to_owned()]));
    raw.apply_batch([status(true), Op::put(HEARTBEAT, b"2".to_vec())])
        .await
        .unwrap();
    agent
        .wait_for("b healthy", |v| {
            v.peer_health("b") == Some(ClusterHealth::Healthy) && v.backends("shop/web").len() == 4
        })
        .await;

    // kvstoremesh's lease expires: its canaries and b's entries go in one revision. The agent
    // keeps b's last state until b is complete again.
    let mut lost: Vec<Op<Vec<u8>>> = canaries(&b, false);
    for op in entries(&b, &[1, 2, 3]) {
        lost.push(Op::delete(op.key()));
    }
    raw.apply_batch(lost).await.unwrap();
    let view = agent
        .wait_for("b resyncing", |v| {
            v.status.peers["b"].phase == Phase::Listing
        })
        .await;
    assert_eq!(
        view.backends("shop/web").len(),
        4,
        "nothing removed: {:?}",
        view.backends("shop/web")
    );
    assert!(view.ipcache_has("10.2.1.3", "b"));

    // And across a restart of the agent, still before b is complete again.
    agent.restart().await;
    let view = agent
        .wait_for("restarted, local synced", |v| {
            v.status.local_synced
                && !v.status.local_restored
                && v.status
                    .peers
                    .get("b")
                    .is_some_and(|p| p.phase == Phase::Listing)
        })
        .await;
    assert!(view.status.peers["b"].restored);
    assert_eq!(view.backends("shop/web").len(), 4);
    assert!(view.ipcache_has("10.2.1.3", "b"));

    // kvstoremesh is back with b's current state (backend 3 gone): replaced, 3 collected.
    raw.apply_batch(entries(&b, &[1, 2])).await.unwrap();
    raw.apply_batch(canaries(&b, true)).await.unwrap();
    let view = agent
        .wait_for("b resynced", |v| {
            v.peer_synced("b") && v.backends("shop/web").len() == 3
        })
        .await;
    assert!(!view.ipcache_has("10.2.1.3", "b"));
    assert!(view.ipcache_has("10.2.1.1", "b"));
}
