//! The shared look at a peer's store, against real etcd: what it reads, and that it tells a
//! replaced store (another etcd on the same address, as after a restore) from the same one.

use std::time::{Duration, Instant};

use kvstore::client::{ClientConfig, Error as StoreError, StoreClient};
use model::keys::{HEARTBEAT_KEY, cluster_config_key};
use model::{
    Capabilities, ClusterConfig, ClusterId, ClusterName, MaxConnectedClusters, StoreValue,
};
use peer_follow::{Heartbeat, StoreWitness, probe};
use testkit::{Backend, StoreOptions, StoreProcess};

/// The probe deadline of these tests.
const LOOK: Duration = Duration::from_secs(1);

async fn client(store: &StoreProcess) -> StoreClient {
    StoreClient::connect(&ClientConfig::new([store.endpoint()]))
        .await
        .expect("connect")
}

fn config() -> ClusterConfig {
    ClusterConfig::new(
        ClusterName::new("b").unwrap(),
        ClusterId::try_from(2).unwrap(),
        MaxConnectedClusters::Max255,
        Capabilities::default(),
    )
    .unwrap()
}

#[tokio::test]
async fn reads_config_and_heartbeat_and_notices_a_replaced_store() {
    let peer = ClusterName::new("b").unwrap();
    let store = StoreProcess::start(Backend::Etcd, StoreOptions::default())
        .await
        .expect("start etcd");
    let c = client(&store).await;
    let raw = c.raw();
    let mut witness = StoreWitness::new(1);

    let found = probe(&c, &peer, &mut witness, LOOK).await.unwrap();
    assert_eq!(
        (found.replaced, found.config, found.heartbeat),
        (None, None, Heartbeat::Absent)
    );

    raw.put(&cluster_config_key(&peer), &config().encode(), None)
        .await
        .unwrap();
    raw.put(HEARTBEAT_KEY, &b"2026-12-03T14:00:00Z".to_vec(), None)
        .await
        .unwrap();
    let found = probe(&c, &peer, &mut witness, LOOK).await.unwrap();
    assert_eq!(found.replaced, None);
    assert_eq!(found.config, Some(config().encode()));
    assert_eq!(
        found.heartbeat,
        Heartbeat::Valid(b"2026-12-03T14:00:00Z".to_vec())
    );

    // A hostile heartbeat is not handed on.
    raw.put(HEARTBEAT_KEY, &vec![b'x'; 300], None)
        .await
        .unwrap();
    let found = probe(&c, &peer, &mut witness, LOOK).await.unwrap();
    assert_eq!(found.heartbeat, Heartbeat::Refused { bytes: 300 });

    // Another store behind the same kind of endpoint: another cluster id.
    let other = StoreProcess::start(Backend::Etcd, StoreOptions::default())
        .await
        .expect("start etcd");
    let found = probe(&client(&other).await, &peer, &mut witness, LOOK)
        .await
        .unwrap();
    let reason = found.replaced.expect("a replaced store");
    assert!(reason.contains("cluster id changed"), "{reason}");
}

/// A frozen store (connections open, nothing answered, as in a partition) is a timeout of the
/// probe's own deadline, not of the client's much longer request timeout.
#[tokio::test]
async fn a_silent_store_is_noticed_within_the_probe_deadline() {
    let peer = ClusterName::new("b").unwrap();
    let store = StoreProcess::start(Backend::Etcd, StoreOptions::default())
        .await
        .expect("start etcd");
    let c = client(&store).await;
    let mut witness = StoreWitness::new(1);
    probe(&c, &peer, &mut witness, LOOK).await.unwrap();

    store.freeze();
    let started = Instant::now();
    let err = probe(&c, &peer, &mut witness, LOOK).await.unwrap_err();
    let took = started.elapsed();
    store.thaw();
    assert!(
        matches!(err, StoreError::Timeout { op: "probe", after, .. } if after == LOOK),
        "{err}"
    );
    // The client's own request timeout is 15 s: the probe did not wait for it.
    assert!(took < Duration::from_secs(10), "{took:?}");
    probe(&c, &peer, &mut witness, LOOK).await.unwrap();
}
