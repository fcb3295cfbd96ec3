//! Our own store with mutual TLS and per-cluster users (docs/security.md): kvstoremesh reads
//! the peer as `remote-a` (read-only), writes the local store as `admin-a`, and a node agent
//! (`local-a`) can read everything kvstoremesh wrote for it, the status included.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use kvstore::client::{ClientConfig, StoreClient, TlsFiles};
use kvstore::server::{Server, ServerConfig, TlsFiles as ServerTls};
use model::StoreValue;
use testkit::TestPki;
use tokio_util::sync::CancellationToken;

struct Embedded {
    server: Option<Server>,
    cancel: CancellationToken,
    _data: tempfile::TempDir,
}

impl Embedded {
    async fn start(pki: &TestPki, cluster: &str) -> Embedded {
        let data = tempfile::tempdir().unwrap();
        let mut config = ServerConfig::new("127.0.0.1:0".parse().unwrap(), data.path().into());
        let server_cert = pki.server();
        config.tls = Some(ServerTls {
            cert: server_cert.cert,
            key: server_cert.key,
            client_ca: Some(pki.ca_path()),
        });
        config.access = Some(name(cluster));
        config.shutdown_grace = Duration::from_secs(1);
        let cancel = CancellationToken::new();
        let server = Server::start(config, cancel.clone())
            .await
            .expect("start store");
        Embedded {
            server: Some(server),
            cancel,
            _data: data,
        }
    }

    fn endpoint(&self) -> String {
        format!("https://{}", self.server.as_ref().unwrap().local_addr())
    }

    fn client_config(&self, pki: &TestPki, cn: &str) -> ClientConfig {
        let files = pki.client(cn);
        ClientConfig::new([self.endpoint()]).with_tls(TlsFiles {
            ca: pki.ca_path(),
            cert: Some(files.cert),
            key: Some(files.key),
        })
    }

    async fn client(&self, pki: &TestPki, cn: &str) -> StoreClient {
        StoreClient::connect(&self.client_config(pki, cn))
            .await
            .expect("connect")
    }
}

impl Drop for Embedded {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirrors_through_mutual_tls_with_least_privilege_users() {
    init_logging();
    let pki = Arc::new(TestPki::generate());
    let local = Embedded::start(&pki, "a").await;
    let peer = Embedded::start(&pki, "b").await;
    let b = cluster("b", 2);

    // b's publisher, as admin-b.
    let publisher = peer.client(&pki, "admin-b").await;
    let state = sample_state(&b, 10);
    publisher
        .raw()
        .put(&b.key(), &b.encode(), None)
        .await
        .unwrap();
    put_all(&publisher, &state).await;
    publisher
        .raw()
        .put(
            model::keys::HEARTBEAT_KEY,
            &b"2026-01-01T00:00:00Z".to_vec(),
            None,
        )
        .await
        .unwrap();
    for kind in [
        model::Kind::Nodes,
        model::Kind::Services,
        model::Kind::Identities,
        model::Kind::Ip,
    ] {
        publisher
            .raw()
            .put(
                &kind.state_canary_key(&b.name),
                &b"2026-01-01T00:00:00Z".to_vec(),
                None,
            )
            .await
            .unwrap();
    }

    // The peer file, in Cilium's etcd config format, with paths relative to the directory.
    let dir = tempfile::tempdir().unwrap();
    let remote = pki.client("remote-a");
    std::fs::copy(pki.ca_path(), dir.path().join("b.ca.crt")).unwrap();
    std::fs::copy(&remote.cert, dir.path().join("b.tls.crt")).unwrap();
    std::fs::copy(&remote.key, dir.path().join("b.tls.key")).unwrap();
    std::fs::write(
        dir.path().join("b"),
        format!(
            "endpoints:\n- {}\ntrusted-ca-file: b.ca.crt\ncert-file: b.tls.crt\nkey-file: b.tls.key\n",
            peer.endpoint()
        ),
    )
    .unwrap();
    let _mesh = Mesh::start_in(
        dir,
        &cluster("a", 1),
        local.client_config(&pki, "admin-a"),
        timing(),
    )
    .await;

    // A node agent of cluster a reads the cache, the canaries, the status, the peer's config
    // and heartbeat: all inside local-a's rules.
    let agent = local.client(&pki, "local-a").await;
    let took = wait_cache(&agent, &b.name, &expected_cache(&b.name, &state)).await;
    println!("synced over mutual TLS after {took:?}");
    let (status, _) = wait_status(&agent, &b.name, "synced", |s| s.synced && s.connected).await;
    assert_eq!(status.entries, state.len() as u64);
    for kind in model::Kind::ALL {
        assert!(
            agent
                .raw()
                .get(&kind.cache_canary_key(&b.name))
                .await
                .unwrap()
                .is_some()
        );
    }
    let config = agent
        .raw()
        .get(&model::keys::cluster_config_key(&b.name))
        .await
        .unwrap();
    assert_eq!(config.unwrap().value, b.encode());
    let heartbeat = agent
        .raw()
        .get(&model::keys::heartbeat_cache_key(&b.name))
        .await
        .unwrap();
    assert!(heartbeat.is_some());
    // And remote-a may not write the peer's store: kvstoremesh never needs to.
    let reader = peer.client(&pki, "remote-a").await;
    let refused = reader
        .raw()
        .put("cilium/state/nodes/v1/b/x", &b"{}".to_vec(), None)
        .await;
    assert!(refused.is_err(), "remote-a wrote into b's store");

    // Changes flow.
    let (key, value) = node(&b, 42);
    publisher.raw().put(&key, &value, None).await.unwrap();
    let mut expected = state.clone();
    expected.insert(key, value);
    wait_cache(&agent, &b.name, &expected_cache(&b.name, &expected)).await;
}
