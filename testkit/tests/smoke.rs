//! Starts real etcd through the testkit, plain and with mTLS, and does a put/get on each, so a
//! broken testkit shows up here rather than as mysterious failures in every suite that uses it.

use std::sync::Arc;

use testkit::{Backend, StoreOptions, StoreProcess, TestPki};

async fn put_get(store: &StoreProcess) {
    let mut client = store.client().await;
    let put = client.put("smoke", "value", None).await.expect("put");
    let rev = put.header().expect("header").revision();
    let got = client.get("smoke", None).await.expect("get");
    assert_eq!(got.kvs().len(), 1);
    assert_eq!(got.kvs()[0].value(), b"value");
    assert_eq!(got.kvs()[0].mod_revision(), rev);
}

#[tokio::test]
async fn etcd_plain_put_get_and_restart() {
    let mut store = StoreProcess::start(Backend::Etcd, StoreOptions::default())
        .await
        .expect("start etcd");
    assert!(store.endpoint().starts_with("http://127.0.0.1:"));
    assert!(store.pid() > 0);
    put_get(&store).await;

    let port = store.port();
    let old_pid = store.pid();
    store.restart().await.expect("restart etcd");
    assert_eq!(store.port(), port);
    assert_ne!(store.pid(), old_pid);
    let mut client = store.client().await;
    let got = client.get("smoke", None).await.expect("get after restart");
    assert_eq!(got.kvs()[0].value(), b"value", "data survives a restart");

    store.kill();
    assert!(!store.is_running());
}

#[tokio::test]
async fn etcd_tls_put_get_and_client_cert_required() {
    let pki = Arc::new(TestPki::generate());
    let store = StoreProcess::start(
        Backend::Etcd,
        StoreOptions {
            tls: Some(pki.clone()),
            ..Default::default()
        },
    )
    .await
    .expect("start etcd with TLS");
    assert!(store.endpoint().starts_with("https://127.0.0.1:"));
    put_get(&store).await;

    // A certificate from a CA the server does not trust must be refused.
    let opts = etcd_client::ConnectOptions::new()
        .with_tls(pki.foreign_client_tls_options("root"))
        .with_timeout(std::time::Duration::from_secs(5));
    let refused = async {
        let mut c = etcd_client::Client::connect([store.endpoint()], Some(opts)).await?;
        c.get("smoke", None).await
    }
    .await;
    assert!(
        refused.is_err(),
        "foreign client cert accepted: {refused:?}"
    );

    let expired = pki.tls_options_presenting(&pki.expired_client("root"));
    let opts = etcd_client::ConnectOptions::new()
        .with_tls(expired)
        .with_timeout(std::time::Duration::from_secs(5));
    let refused = async {
        let mut c = etcd_client::Client::connect([store.endpoint()], Some(opts)).await?;
        c.get("smoke", None).await
    }
    .await;
    assert!(
        refused.is_err(),
        "expired client cert accepted: {refused:?}"
    );
}

#[test]
fn key_files_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let pki = TestPki::generate();
    for files in [pki.server(), pki.client("alice"), pki.expired_client("bob")] {
        let mode = std::fs::metadata(&files.key).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{}", files.key.display());
    }
    assert_eq!(pki.client("alice"), pki.client("alice"), "cached by CN");
}

#[tokio::test]
async fn startup_failure_reports_log_tail() {
    let err = StoreProcess::start(
        Backend::Embedded {
            bin: "/bin/false".into(),
        },
        StoreOptions::default(),
    )
    .await
    .expect_err("/bin/false cannot become ready");
    assert!(matches!(err, testkit::Error::Exited { .. }), "{err}");
}
