//! A peer whose store holds what it may not publish: entries of another cluster, identities
//! outside its range, malformed values. None of it reaches the cache; the rest does.

mod common;

use common::*;
use model::{ClusterConfig, Kind, parse_state_key};

/// Entries peer `b` (id 2) may not publish, each with why.
fn hostile(b: &ClusterConfig) -> Vec<(&'static str, String, Vec<u8>)> {
    let other = cluster("x", 9);
    let (node_key, node_value) = node(b, 50);
    let mut wrong_id: serde_json::Value = serde_json::from_slice(&node_value).unwrap();
    wrong_id["cluster_id"] = 9.into();
    let mut borrowed: serde_json::Value = serde_json::from_slice(&node(b, 51).1).unwrap();
    borrowed["name"] = "node-52".into();
    let (_, foreign_value) = node(&other, 53);
    vec![
        // Another cluster's entries, under its own key and under b's.
        ("other cluster's key", node(&other, 1).0, node(&other, 1).1),
        (
            "other cluster's value under b's key",
            "cilium/state/nodes/v1/b/node-53".into(),
            foreign_value,
        ),
        (
            "other cluster's service",
            service(&other, 1, 80).0,
            service(&other, 1, 80).1,
        ),
        (
            "wrong cluster id",
            node_key.replace("node-50", "node-54"),
            serde_json::to_vec(&{
                let mut v = wrong_id.clone();
                v["name"] = "node-54".into();
                v
            })
            .unwrap(),
        ),
        (
            "value names another node",
            node(b, 51).0,
            serde_json::to_vec(&borrowed).unwrap(),
        ),
        // Identities outside b's range: another cluster's, a reserved one.
        (
            "identity of cluster 9",
            identity(&other, 300).0,
            identity(&other, 300).1,
        ),
        {
            let (k, v) = identity_raw(identity_of(&other, 301), "b", "web");
            ("cluster 9's number, b's label", k, v)
        },
        {
            let (k, v) = identity_raw(5, "b", "web");
            ("reserved identity", k, v)
        },
        {
            let (k, v) = identity_raw(identity_of(b, 302), "x", "web");
            ("b's number, another cluster's label", k, v)
        },
        {
            let (k, v) = ip_raw("10.2.200.1", identity_of(&other, 400), "b");
            ("ip with another cluster's identity", k, v)
        },
        {
            let (k, v) = ip_raw("10.2.200.2", identity_of(b, 400), "x");
            ("ip of another cluster", k, v)
        },
        // Values that do not decode.
        (
            "truncated JSON",
            "cilium/state/nodes/v1/b/node-60".into(),
            br#"{"schema":1,"name":"node-60","cluster":"b""#.to_vec(),
        ),
        (
            "not JSON",
            "cilium/state/services/v1/b/shop/junk".into(),
            b"\xff\xfe binary".to_vec(),
        ),
        (
            "unknown schema",
            "cilium/state/nodes/v1/b/node-61".into(),
            br#"{"schema":7,"name":"node-61"}"#.to_vec(),
        ),
        (
            "an array",
            "cilium/state/ip/v1/default/10.2.200.3".into(),
            b"[1,2,3]".to_vec(),
        ),
        // Keys that are not spelled canonically or not in the layout.
        (
            "leading zero",
            format!("cilium/state/identities/v1/id/0{}", identity_of(b, 303)),
            identity(b, 303).1,
        ),
        (
            "unknown layout",
            "cilium/state/nodes/v1/b/node-62/extra".into(),
            node(b, 62).1,
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_entries_never_reach_the_cache() {
    let local = Store::etcd().await;
    let b = Peer::start("b", 2).await;
    let valid = sample_state(&b.config, 10);
    let bad = hostile(&b.config);
    let mut published = valid.clone();
    for (why, key, value) in &bad {
        assert!(
            !valid.contains_key(key),
            "{why}: {key} must not overwrite a valid entry"
        );
        published.insert(key.clone(), value.clone());
    }
    b.publish(&published).await;

    let mesh = Mesh::start(&cluster("a", 1), &local.endpoint(), &[&b], timing()).await;
    wait_cache(&local.client, b.name(), &expected_cache(b.name(), &valid)).await;
    let (status, _) = wait_status(&local.client, b.name(), "synced", |s| s.synced).await;
    assert_eq!(status.invalid_entries, bad.len() as u64, "{status:?}");
    assert_eq!(status.entries, valid.len() as u64);
    // The whole cache root: nothing of another cluster anywhere.
    let everything = list(&local.client, "cilium/cache/").await;
    assert!(
        everything
            .keys()
            .all(|k| k.contains("/b/") || k.ends_with("/b")),
        "{:?}",
        everything.keys().collect::<Vec<_>>()
    );
    println!(
        "initial listing: {} valid entries cached, {} hostile refused",
        valid.len(),
        bad.len()
    );

    // The same through the watch: hostile writes are refused, and a valid entry overwritten
    // with a hostile value leaves the cache (never a stale good copy, never the bad one).
    let (node_key, _) = node(&b.config, 3);
    let mut expected = valid.clone();
    for (_, key, value) in hostile(&b.config) {
        b.put(
            &key.replace("node-5", "node-7")
                .replace("10.2.200.", "10.2.201."),
            value,
        )
        .await;
    }
    b.put(&node_key, node(&cluster("x", 9), 3).1).await;
    expected.remove(&node_key);
    let (k, v) = node(&b.config, 77);
    b.put(&k, v.clone()).await;
    expected.insert(k, v);
    wait_cache(
        &local.client,
        b.name(),
        &expected_cache(b.name(), &expected),
    )
    .await;
    let refusals = 2 * bad.len() as u64 + 1;
    let (status, _) = wait_status(&local.client, b.name(), "watch refusals counted", |s| {
        s.invalid_entries == refusals
    })
    .await;
    println!("after the watch: {} refused in all", status.invalid_entries);

    let (_, metrics) = http_get(mesh.health, "/metrics").await;
    let invalid: f64 = Kind::ALL
        .iter()
        .filter_map(|kind| {
            metric(
                &metrics,
                &format!("kvstoremesh_peer_invalid_entries_total{{peer=\"b\",kind=\"{kind}\"}}"),
            )
        })
        .sum();
    assert_eq!(invalid, status.invalid_entries as f64, "{metrics}");
    for (key, value) in &expected {
        // Sanity: the test's own expectation is all valid.
        let kind = parse_state_key(key).unwrap().kind();
        assert!(model::validate_entry(kind, key, value, &b.config).is_ok());
    }
}
