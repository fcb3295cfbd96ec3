//! Certificate rotation without a restart (embedded store only: etcd 3.4 re-reads its files
//! per handshake too, but this is about our file watcher).
//!
//! The store starts with CA A. While a watch is open and puts keep flowing, its certificate
//! and CA bundle are replaced on disk by a server certificate of a new CA B and a bundle of
//! A and B: the watch must deliver every event across the rotation, in order, with no gap or
//! duplicate; new connections get the new certificate and clients of either CA are served.
//! Then the bundle drops A: new A clients are refused, while the established connections
//! (the watch and the writer) keep working.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use certs::{Ca, CaParams, ClusterName, Issued, ServerParams, TrustBundle, User, WriteMode};
use common::{WAIT, embedded_backend};
use etcd_client::{
    Certificate, Client, ConnectOptions, EventType, Identity, TlsOptions, WatchOptions, WatchStream,
};
use testkit::{StoreOptions, StoreProcess, TestPki};
use tokio::task::JoinHandle;

/// How long the store may take to notice changed files (it polls about once a second).
const RELOAD_WITHIN: Duration = Duration::from_secs(15);

/// Files of a client identity written with the `certs` crate.
struct ClientFiles {
    cert: PathBuf,
    key: PathBuf,
    /// What the client trusts for the server.
    ca: PathBuf,
}

impl ClientFiles {
    fn write(dir: &Path, name: &str, issued: &Issued, trust: &TrustBundle) -> Self {
        let files = ClientFiles {
            cert: dir.join(format!("{name}.crt")),
            key: dir.join(format!("{name}.key")),
            ca: dir.join(format!("{name}-ca.crt")),
        };
        std::fs::write(&files.cert, issued.cert_pem()).unwrap();
        std::fs::write(&files.key, issued.key_pem()).unwrap();
        trust.write(&files.ca, WriteMode::Replace).unwrap();
        files
    }

    fn tls(&self) -> TlsOptions {
        let read = |p: &Path| std::fs::read(p).unwrap();
        TlsOptions::new()
            .ca_certificate(Certificate::from_pem(read(&self.ca)))
            .identity(Identity::from_pem(read(&self.cert), read(&self.key)))
    }
}

fn opts(tls: TlsOptions) -> ConnectOptions {
    ConnectOptions::new()
        .with_tls(tls)
        .with_connect_timeout(Duration::from_secs(3))
        .with_timeout(Duration::from_secs(5))
}

/// Connects with `tls`, writes `key` and reads it back.
async fn round_trip(endpoint: &str, tls: TlsOptions, key: &str) -> Result<(), String> {
    let attempt = async {
        let mut c = Client::connect([endpoint], Some(opts(tls)))
            .await
            .map_err(|e| e.to_string())?;
        c.put(key, "ok", None).await.map_err(|e| e.to_string())?;
        let resp = c.get(key, None).await.map_err(|e| e.to_string())?;
        match resp.kvs().first().map(|kv| kv.value()) {
            Some(b"ok") => Ok(()),
            other => Err(format!("read back {other:?}")),
        }
    };
    tokio::time::timeout(WAIT, attempt)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {WAIT:?}")))
}

/// Retries until `tls` can round-trip (`want_ok`) or is refused (`!want_ok`); panics with the
/// last outcome after [`RELOAD_WITHIN`].
async fn eventually(store: &StoreProcess, tls: impl Fn() -> TlsOptions, want_ok: bool, what: &str) {
    let start = Instant::now();
    let mut n = 0;
    loop {
        n += 1;
        let outcome = round_trip(&store.endpoint(), tls(), &format!("check/{n}")).await;
        match (&outcome, want_ok) {
            (Ok(()), true) | (Err(_), false) => {
                eprintln!("{what}: after {:?}: {outcome:?}", start.elapsed());
                return;
            }
            _ => {}
        }
        if start.elapsed() > RELOAD_WITHIN {
            panic!(
                "{what}: still {outcome:?} after {RELOAD_WITHIN:?}\nlog tail:\n{}",
                store.log_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Writes `rot/<n>` in order on one connection until told to stop; returns the revision of
/// every write.
fn spawn_writer(mut client: Client, stop: Arc<AtomicBool>) -> JoinHandle<Vec<(String, i64)>> {
    tokio::spawn(async move {
        let mut written = Vec::new();
        let mut n = 0u32;
        while !stop.load(Ordering::Relaxed) {
            let key = format!("rot/{n:06}");
            let resp = tokio::time::timeout(WAIT, client.put(key.as_str(), "v", None))
                .await
                .unwrap_or_else(|_| panic!("put {key}: no answer within {WAIT:?}"))
                .unwrap_or_else(|e| panic!("put {key} on the established connection: {e}"));
            written.push((key, resp.header().expect("header").revision()));
            n += 1;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        written
    })
}

/// Reads the watch until it has delivered the event of revision `last`.
async fn collect_until(stream: &mut WatchStream, last: i64, seen: &mut Vec<(String, i64)>) {
    while seen.last().is_none_or(|(_, rev)| *rev < last) {
        let resp = tokio::time::timeout(WAIT, stream.message())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "the watch stalled: waiting for revision {last}, last seen {:?}",
                    seen.last()
                )
            })
            .expect("the watch stream failed")
            .expect("the watch stream ended");
        assert!(!resp.canceled(), "the watch was canceled: {resp:?}");
        for ev in resp.events() {
            assert_eq!(ev.event_type(), EventType::Put, "{ev:?}");
            let kv = ev.kv().expect("event with a kv");
            seen.push((
                String::from_utf8_lossy(kv.key()).into_owned(),
                kv.mod_revision(),
            ));
        }
    }
}

/// Replaces a file atomically, as a rotation tool (or a Kubernetes secret update) does.
fn replace(path: &Path, contents: &str) {
    let tmp = path.with_extension("rotating");
    std::fs::write(&tmp, contents).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_certificate_and_ca_rotate_under_an_open_watch() {
    // CA A: the test PKI the store starts with (no access rules: any certificate of a trusted
    // CA has full rights, which keeps this test about TLS material only).
    let pki = Arc::new(TestPki::generate());
    let store = StoreProcess::start(
        embedded_backend(),
        StoreOptions {
            tls: Some(Arc::clone(&pki)),
            ..Default::default()
        },
    )
    .await
    .expect("start the embedded store");
    let server = pki.server();
    let endpoint = store.endpoint();
    let a_admin = pki.client("admin-a");
    let connect_a = || async {
        Client::connect([endpoint.as_str()], Some(opts(a_admin.tls_options())))
            .await
            .expect("connect with CA A")
    };

    // The watch and the writer: one connection each, opened before the rotation.
    let mut watcher = connect_a().await;
    let mut stream = watcher
        .watch("rot/", Some(WatchOptions::new().with_prefix()))
        .await
        .expect("watch");
    let created = tokio::time::timeout(WAIT, stream.message())
        .await
        .expect("watch created in time")
        .expect("watch stream")
        .expect("a created response");
    assert!(created.created() && !created.canceled(), "{created:?}");
    let stop = Arc::new(AtomicBool::new(false));
    let writer = spawn_writer(connect_a().await, Arc::clone(&stop));
    tokio::time::sleep(Duration::from_millis(300)).await;

    // CA B, a server certificate from it, and clients of both CAs.
    let dir = tempfile::tempdir().unwrap();
    let ca_a = TrustBundle::load(&pki.ca_path()).expect("load CA A");
    let ca_b = Ca::generate(&CaParams::new("rotation test CA B")).expect("CA B");
    let both = TrustBundle::merged([&ca_a, &ca_b.trust_bundle()]);
    assert_eq!(both.len(), 2);
    let server_b = ca_b
        .issue_server(&ServerParams::new(ClusterName::new("a").unwrap()))
        .expect("server certificate from B");
    let b_admin = ca_b
        .issue_client(&User::admin("a").unwrap())
        .expect("client certificate from B");
    // Trusts only B for the server: it can connect only once the store serves B's cert.
    let b_client = ClientFiles::write(dir.path(), "b-admin", &b_admin, &ca_b.trust_bundle());
    // A's client certificate, trusting both (what A clients get shipped during a rotation).
    let a_client_both = ClientFiles {
        cert: a_admin.cert.clone(),
        key: a_admin.key.clone(),
        ca: dir.path().join("both.crt"),
    };
    both.write(&a_client_both.ca, WriteMode::Replace).unwrap();

    // Before the rotation a client that trusts only B cannot verify the store.
    let before = round_trip(&endpoint, b_client.tls(), "check/before").await;
    assert!(
        before.is_err(),
        "a B-only client was served before the rotation"
    );

    // Rotate: bundle first (so B clients are trusted by the time B's cert is served), then
    // the key and the certificate.
    replace(&pki.ca_path(), &both.to_pem());
    replace(&server.key, &server_b.key_pem());
    replace(&server.cert, &server_b.cert_pem());

    eventually(
        &store,
        || b_client.tls(),
        true,
        "a CA B client (trusting only B) after the rotation",
    )
    .await;
    eventually(
        &store,
        || a_client_both.tls(),
        true,
        "a new CA A client after the rotation",
    )
    .await;
    // Let puts flow a little longer over the rotated store.
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Drop A from the bundle: new A clients are refused; established connections live on.
    replace(&pki.ca_path(), &ca_b.trust_bundle().to_pem());
    eventually(
        &store,
        || a_client_both.tls(),
        false,
        "a new CA A client once the bundle holds only B",
    )
    .await;
    eventually(
        &store,
        || b_client.tls(),
        true,
        "a CA B client once the bundle holds only B",
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    stop.store(true, Ordering::Relaxed);
    let written = writer.await.expect("the writer (established A connection)");
    assert!(written.len() > 20, "too few writes: {}", written.len());
    eprintln!(
        "{} writes on one connection across both rotations, revisions {}..={}",
        written.len(),
        written[0].1,
        written[written.len() - 1].1
    );
    let last = written.last().expect("writes").1;
    let mut seen = Vec::new();
    collect_until(&mut stream, last, &mut seen).await;
    if seen != written {
        let first_diff = seen
            .iter()
            .zip(&written)
            .position(|(s, w)| s != w)
            .unwrap_or(seen.len().min(written.len()));
        panic!(
            "the watch did not deliver exactly the writes: {} seen, {} written, first \
             difference at #{first_diff}: seen {:?}, written {:?}",
            seen.len(),
            written.len(),
            seen.get(first_diff),
            written.get(first_diff)
        );
    }
    // The watch still flows on its old connection after everything.
    let mut b = Client::connect([endpoint.as_str()], Some(opts(b_client.tls())))
        .await
        .expect("connect with CA B");
    let after = b.put("rot/after", "v", None).await.expect("put with B");
    let rev = after.header().expect("header").revision();
    collect_until(&mut stream, rev, &mut seen).await;
    assert_eq!(seen.last(), Some(&("rot/after".to_owned(), rev)));
    drop(watcher);
}

/// The client half of rotation: a `StoreClient` re-reads its certificate files when they
/// change and new requests go out with the new certificate, without restarting the client.
/// The store runs with access rules, so which certificate a request carried is visible: the
/// client starts as `local-a` (may not write) and is rotated to `admin-a` from a new CA.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_client_picks_up_rotated_client_certificates() {
    use kvstore::client::{ClientConfig, StoreClient, TlsFiles};

    let pki = Arc::new(TestPki::generate());
    let dir = tempfile::tempdir().unwrap();
    let ca_a = TrustBundle::load(&pki.ca_path()).expect("load CA A");
    let ca_b = Ca::generate(&CaParams::new("client rotation CA B")).expect("CA B");
    // The store trusts both CAs from the start; only the client's certificate changes.
    replace(
        &pki.ca_path(),
        &TrustBundle::merged([&ca_a, &ca_b.trust_bundle()]).to_pem(),
    );
    let store = StoreProcess::start(
        embedded_backend(),
        StoreOptions {
            tls: Some(Arc::clone(&pki)),
            extra_args: vec!["--cluster-name".into(), "a".into()],
            client_cn: Some("admin-a".into()),
            ..Default::default()
        },
    )
    .await
    .expect("start the embedded store");

    let local_a = pki.client("local-a");
    let files = ClientFiles {
        cert: dir.path().join("client.crt"),
        key: dir.path().join("client.key"),
        ca: pki.ca_path(),
    };
    replace(
        &files.cert,
        &std::fs::read_to_string(&local_a.cert).unwrap(),
    );
    replace(&files.key, &std::fs::read_to_string(&local_a.key).unwrap());
    let config = ClientConfig::new([store.endpoint()]).with_tls(TlsFiles {
        ca: files.ca.clone(),
        cert: Some(files.cert.clone()),
        key: Some(files.key.clone()),
    });
    let client = StoreClient::connect(&config)
        .await
        .expect("connect as local-a");
    let kv = client.raw();
    let refused = kv.put("cilium/cache/x", &b"1".to_vec(), None).await;
    assert!(refused.is_err(), "local-a may not write: {refused:?}");

    let b_admin = ca_b
        .issue_client(&User::admin("a").unwrap())
        .expect("admin-a from CA B");
    replace(&files.key, &b_admin.key_pem());
    replace(&files.cert, &b_admin.cert_pem());

    let deadline = Instant::now() + RELOAD_WITHIN;
    loop {
        match kv.put("cilium/cache/x", &b"2".to_vec(), None).await {
            Ok(_) => break,
            Err(e) if Instant::now() < deadline => {
                assert_eq!(
                    e.grpc_code(),
                    Some(tonic::Code::PermissionDenied),
                    "only the old certificate's refusal is expected meanwhile: {e:?}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("the client kept its old certificate: {e}"),
        }
    }
    let entry = kv
        .get("cilium/cache/x")
        .await
        .expect("get")
        .expect("present");
    assert_eq!(entry.value, b"2");
}
