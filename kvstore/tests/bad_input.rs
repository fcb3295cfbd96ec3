//! Bad input: each case must get a clear error (never a hang or a crash), and the server must
//! keep serving afterwards, which every scenario checks with a fresh client's put and get.
//!
//! Every scenario runs against real etcd (the oracle for which error is expected) and our
//! embedded server: tests are named `scenario::etcd` and `scenario::embedded`.

mod common;

use common::both;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, DeleteOptions, GetOptions, PutOptions, TlsOptions,
    Txn, TxnOp, WatchOptions,
};
use rand::{RngCore, SeedableRng, rngs::StdRng};
use testkit::{Backend, StoreOptions, StoreProcess, TestPki};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tonic::Code;

both!(
    oversized_put_default_limit,
    oversized_put_custom_limit,
    unknown_lease,
    inverted_ranges,
    compares_on_absent_keys,
    client_without_certificate,
    client_certificate_from_other_ca,
    garbage_bytes_plain,
    garbage_bytes_tls,
    http1_request_plain,
    http1_request_tls,
);

const TIMEOUT: Duration = Duration::from_secs(10);

async fn start(backend: Backend, opts: StoreOptions) -> StoreProcess {
    let name = backend.name();
    StoreProcess::start(backend, opts)
        .await
        .unwrap_or_else(|e| panic!("start {name}: {e}"))
}

fn tls_opts(pki: &Arc<TestPki>) -> StoreOptions {
    StoreOptions {
        tls: Some(Arc::clone(pki)),
        ..Default::default()
    }
}

/// The store still serves: a fresh client (fresh connection) can put and read back a key.
async fn assert_healthy(store: &StoreProcess, after: &str) {
    let check = async {
        let mut client = store.try_client().await.map_err(|e| e.to_string())?;
        let key = format!("health/{after}");
        client
            .put(key.as_str(), "ok", None)
            .await
            .map_err(|e| e.to_string())?;
        let resp = client
            .get(key.as_str(), None)
            .await
            .map_err(|e| e.to_string())?;
        match resp.kvs().first().map(|kv| kv.value()) {
            Some(b"ok") => Ok(()),
            other => Err(format!("read back {other:?}")),
        }
    };
    match tokio::time::timeout(TIMEOUT, check).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => panic!(
            "server stopped serving after {after}: {e}\nlog tail:\n{}",
            store.log_tail()
        ),
        Err(_) => panic!(
            "server did not answer within {TIMEOUT:?} after {after}\nlog tail:\n{}",
            store.log_tail()
        ),
    }
}

/// The gRPC status inside a client error, or a panic naming what came instead.
fn status(err: &etcd_client::Error, what: &str) -> tonic::Status {
    match err {
        etcd_client::Error::GRpcStatus(s) => s.clone(),
        other => panic!("{what}: expected a gRPC status, got {other:?}"),
    }
}

/// etcd refuses a request over `--max-request-bytes` with "etcdserver: request is too large"
/// (InvalidArgument), or, past the gRPC receive limit (limit + 512 KiB), ResourceExhausted.
fn assert_too_large(result: Result<impl std::fmt::Debug, etcd_client::Error>, what: &str) {
    let err = match result {
        Ok(resp) => panic!("{what}: expected 'request is too large', got success {resp:?}"),
        Err(e) => e,
    };
    let st = status(&err, what);
    eprintln!("{what}: {:?} {:?}", st.code(), st.message());
    let too_large = st.message().contains("request is too large");
    assert!(
        (st.code() == Code::InvalidArgument && too_large) || st.code() == Code::ResourceExhausted,
        "{what}: expected InvalidArgument 'etcdserver: request is too large' or \
         ResourceExhausted, got {:?} {:?}",
        st.code(),
        st.message()
    );
}

fn assert_lease_not_found(err: etcd_client::Error, what: &str) {
    let st = status(&err, what);
    assert!(
        st.code() == Code::NotFound && st.message().contains("requested lease not found"),
        "{what}: expected NotFound 'etcdserver: requested lease not found', got {:?} {:?}",
        st.code(),
        st.message()
    );
}

// ---------------------------------------------------------------------------------------------
// Request size

async fn oversized_put_default_limit(backend: Backend) {
    let store = start(backend, StoreOptions::default()).await;
    let mut c = store.client().await;

    let one_mib = vec![b'x'; 1024 * 1024];
    c.put("size/ok", one_mib, None)
        .await
        .expect("a 1 MiB put is under the 1.5 MiB default limit");

    // Over the 1.5 MiB limit but within the gRPC message limit: the server's own check.
    let over = vec![b'y'; 1536 * 1024 + 100 * 1024];
    assert_too_large(c.put("size/over", over, None).await, "1.6 MiB put");
    // Far over: refused at the gRPC layer.
    let huge = vec![b'z'; 3 * 1024 * 1024];
    assert_too_large(c.put("size/huge", huge, None).await, "3 MiB put");

    let resp = c
        .get(
            "size/",
            Some(GetOptions::new().with_prefix().with_keys_only()),
        )
        .await
        .expect("get after refused puts");
    let keys: Vec<&[u8]> = resp.kvs().iter().map(|kv| kv.key()).collect();
    assert_eq!(
        keys,
        vec![b"size/ok".as_slice()],
        "refused puts must leave nothing behind"
    );
    assert_healthy(&store, "oversized puts").await;
}

async fn oversized_put_custom_limit(backend: Backend) {
    let opts = StoreOptions {
        max_request_bytes: Some(64 * 1024),
        ..Default::default()
    };
    let store = start(backend, opts).await;
    let mut c = store.client().await;

    c.put("lim/small", vec![b's'; 32 * 1024], None)
        .await
        .expect("a 32 KiB put is under a 64 KiB limit");
    assert_too_large(
        c.put("lim/big", vec![b'b'; 100 * 1024], None).await,
        "100 KiB put with a 64 KiB limit",
    );
    // The limit is on the whole request: ten 10 KiB puts in one txn exceed it too.
    let ops: Vec<TxnOp> = (0..10)
        .map(|i| TxnOp::put(format!("lim/txn/{i}"), vec![b't'; 10 * 1024], None))
        .collect();
    assert_too_large(
        c.txn(Txn::new().and_then(ops)).await,
        "txn of 100 KiB with a 64 KiB limit",
    );
    let resp = c
        .get(
            "lim/",
            Some(GetOptions::new().with_prefix().with_count_only()),
        )
        .await
        .expect("count after refused writes");
    assert_eq!(resp.count(), 1, "refused writes must leave nothing behind");
    assert_healthy(&store, "requests over --max-request-bytes").await;
}

// ---------------------------------------------------------------------------------------------
// Leases

async fn unknown_lease(backend: Backend) {
    let store = start(backend, StoreOptions::default()).await;
    let mut c = store.client().await;
    const BOGUS: i64 = 0x1234_5678_9abc;

    let err = c
        .put("lease/k", "v", Some(PutOptions::new().with_lease(BOGUS)))
        .await
        .expect_err("put with an unknown lease must fail");
    assert_lease_not_found(err, "put with an unknown lease");
    let err = c
        .txn(Txn::new().and_then([TxnOp::put(
            "lease/t",
            "v",
            Some(PutOptions::new().with_lease(BOGUS)),
        )]))
        .await
        .expect_err("txn put with an unknown lease must fail");
    assert_lease_not_found(err, "txn put with an unknown lease");
    let resp = c
        .get("lease/", Some(GetOptions::new().with_prefix()))
        .await
        .unwrap();
    assert!(
        resp.kvs().is_empty(),
        "nothing written with an unknown lease"
    );

    let err = c
        .lease_revoke(BOGUS)
        .await
        .expect_err("revoking an unknown lease must fail");
    assert_lease_not_found(err, "revoke of an unknown lease");

    // etcd answers keepalive for an unknown lease with TTL 0 on the stream (no stream error);
    // etcd-client turns that first TTL-0 answer into `LeaseKeepAliveError("lease not found")`.
    let ka = tokio::time::timeout(TIMEOUT, c.lease_keep_alive(BOGUS))
        .await
        .expect("keepalive answer within 10 s");
    match ka {
        Err(etcd_client::Error::LeaseKeepAliveError(msg)) => {
            assert!(msg.contains("lease not found"), "keepalive error: {msg}")
        }
        Err(other) => panic!(
            "keepalive of an unknown lease: expected a TTL-0 response (as etcd sends), got error \
             {other:?}"
        ),
        Ok(_) => panic!("keepalive of an unknown lease: expected a TTL-0 response, got TTL > 0"),
    }

    // ... and time-to-live with TTL -1 (no error).
    let ttl = c
        .lease_time_to_live(BOGUS, None)
        .await
        .expect("time-to-live of an unknown lease is not an error in etcd");
    assert_eq!(
        (ttl.id(), ttl.ttl()),
        (BOGUS, -1),
        "time-to-live of an unknown lease"
    );
    assert_healthy(&store, "unknown lease ids").await;
}

// ---------------------------------------------------------------------------------------------
// Ranges and compares

async fn inverted_ranges(backend: Backend) {
    let store = start(backend, StoreOptions::default()).await;
    let mut c = store.client().await;
    for k in ["inv/a", "inv/b", "inv/c"] {
        c.put(k, "v", None).await.unwrap();
    }
    let rev = c
        .get("inv/a", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();

    let got = c
        .get("inv/c", Some(GetOptions::new().with_range("inv/a")))
        .await
        .expect("an inverted range is not an error in etcd");
    assert!(
        got.kvs().is_empty(),
        "inverted range returns nothing: {got:?}"
    );
    assert_eq!(got.count(), 0);

    let del = c
        .delete("inv/c", Some(DeleteOptions::new().with_range("inv/a")))
        .await
        .expect("an inverted delete range is not an error in etcd");
    assert_eq!(del.deleted(), 0, "inverted delete range deletes nothing");
    assert_eq!(
        del.header().unwrap().revision(),
        rev,
        "deleting nothing must not bump the revision"
    );

    // A compare over an inverted range matches no key: like an absent key, a value compare is
    // false and a version compare is against 0.
    for (cmp, expected) in [
        (
            Compare::value("inv/c", CompareOp::NotEqual, "x").with_range("inv/a"),
            false,
        ),
        (
            Compare::version("inv/c", CompareOp::Equal, 0).with_range("inv/a"),
            true,
        ),
    ] {
        let what = format!("{cmp:?}");
        let txn = c
            .txn(Txn::new().when([cmp]).and_then([TxnOp::get("inv/b", None)]))
            .await
            .unwrap_or_else(|e| panic!("txn with an inverted compare range {what}: {e}"));
        assert_eq!(txn.succeeded(), expected, "inverted compare range {what}");
    }

    // A watch on an inverted range: etcd creates and immediately cancels it.
    let mut stream = c
        .watch("inv/c", Some(WatchOptions::new().with_range("inv/a")))
        .await
        .expect("watch request on an inverted range");
    let first = tokio::time::timeout(TIMEOUT, stream.message())
        .await
        .expect("an answer to an inverted watch within 10 s");
    match first {
        Ok(Some(resp)) => assert!(
            resp.canceled() || resp.events().is_empty(),
            "inverted watch delivered events: {resp:?}"
        ),
        Ok(None) => {}
        Err(e) => {
            let st = status(&e, "inverted watch");
            assert_ne!(st.code(), Code::Internal, "inverted watch: {st:?}");
        }
    }
    c.put("inv/b", "v2", None).await.unwrap();
    if let Ok(Ok(Some(resp))) =
        tokio::time::timeout(Duration::from_millis(300), stream.message()).await
    {
        assert!(
            resp.events().is_empty(),
            "inverted-range watch must not deliver events: {resp:?}"
        );
    }
    assert_healthy(&store, "inverted ranges").await;
}

async fn compares_on_absent_keys(backend: Backend) {
    let store = start(backend, StoreOptions::default()).await;
    let mut c = store.client().await;
    c.put("cmp/present", "v", None).await.unwrap();

    // etcd compares version/create/mod/lease of an absent key against 0, and a value compare on
    // an absent key is false whatever the operator.
    let cases: Vec<(&str, Compare, bool)> = vec![
        (
            "version = 0",
            Compare::version("cmp/absent", CompareOp::Equal, 0),
            true,
        ),
        (
            "version > 0",
            Compare::version("cmp/absent", CompareOp::Greater, 0),
            false,
        ),
        (
            "create_revision = 0",
            Compare::create_revision("cmp/absent", CompareOp::Equal, 0),
            true,
        ),
        (
            "mod_revision < 1000",
            Compare::mod_revision("cmp/absent", CompareOp::Less, 1000),
            true,
        ),
        (
            "lease = 0",
            Compare::lease("cmp/absent", CompareOp::Equal, 0),
            true,
        ),
        (
            "value = ''",
            Compare::value("cmp/absent", CompareOp::Equal, ""),
            false,
        ),
        (
            "value != 'x'",
            Compare::value("cmp/absent", CompareOp::NotEqual, "x"),
            false,
        ),
        (
            "value > ''",
            Compare::value("cmp/absent", CompareOp::Greater, ""),
            false,
        ),
    ];
    for (what, cmp, expected) in cases {
        let resp = c
            .txn(
                Txn::new()
                    .when([cmp])
                    .and_then([TxnOp::put("cmp/then", what, None)])
                    .or_else([TxnOp::put("cmp/else", what, None)]),
            )
            .await
            .unwrap_or_else(|e| panic!("txn compare {what} on an absent key: {e}"));
        assert_eq!(
            resp.succeeded(),
            expected,
            "compare {what} on an absent key"
        );
    }
    let absent = c.get("cmp/absent", None).await.unwrap();
    assert!(absent.kvs().is_empty(), "compares must not create the key");
    assert_healthy(&store, "compares on absent keys").await;
}

// ---------------------------------------------------------------------------------------------
// mTLS

/// Connects with `opts` and tries one request; returns the error, failing the test if the
/// request succeeds or nothing happens within 10 s.
async fn refused(store: &StoreProcess, opts: ConnectOptions, what: &str) -> String {
    let attempt = async {
        let mut c = Client::connect([store.endpoint()], Some(opts)).await?;
        c.get("anything", None).await
    };
    match tokio::time::timeout(TIMEOUT, attempt).await {
        Err(_) => panic!("{what}: neither refused nor served within {TIMEOUT:?}"),
        Ok(Ok(resp)) => panic!("{what}: the server answered {resp:?}"),
        Ok(Err(e)) => e.to_string(),
    }
}

fn opts_with(tls: TlsOptions) -> ConnectOptions {
    ConnectOptions::new()
        .with_tls(tls)
        .with_connect_timeout(Duration::from_secs(5))
        .with_timeout(Duration::from_secs(5))
}

async fn client_without_certificate(backend: Backend) {
    let pki = Arc::new(TestPki::generate());
    let store = start(backend, tls_opts(&pki)).await;

    let ca = etcd_client::Certificate::from_pem(std::fs::read(pki.ca_path()).unwrap());
    let err = refused(
        &store,
        opts_with(TlsOptions::new().ca_certificate(ca)),
        "TLS client without a certificate",
    )
    .await;
    eprintln!("no client certificate: {err}");

    // Plain text to the TLS port.
    let plain = async {
        let ep = store.endpoint().replace("https://", "http://");
        let mut c = Client::connect([ep], Some(ConnectOptions::new())).await?;
        c.get("anything", None).await
    };
    match tokio::time::timeout(TIMEOUT, plain).await {
        Err(_) => panic!("plain-text client to the TLS port: no answer within {TIMEOUT:?}"),
        Ok(Ok(resp)) => panic!("plain-text client to the TLS port was served: {resp:?}"),
        Ok(Err(e)) => eprintln!("plain text to the TLS port: {e}"),
    }
    assert_healthy(&store, "clients without certificates").await;
}

async fn client_certificate_from_other_ca(backend: Backend) {
    let pki = Arc::new(TestPki::generate());
    let store = start(backend, tls_opts(&pki)).await;

    let err = refused(
        &store,
        opts_with(pki.foreign_client_tls_options("intruder")),
        "client certificate from another CA",
    )
    .await;
    eprintln!("foreign CA: {err}");
    let expired = pki.expired_client("late");
    let err = refused(
        &store,
        opts_with(pki.tls_options_presenting(&expired)),
        "expired client certificate",
    )
    .await;
    eprintln!("expired client certificate: {err}");
    assert_healthy(&store, "clients with untrusted certificates").await;
}

// ---------------------------------------------------------------------------------------------
// Raw bytes on the wire

/// What the server did with a connection after we wrote to it.
#[derive(Debug)]
enum Outcome {
    /// It closed the connection (EOF or reset), after sending these bytes.
    Closed(Vec<u8>),
    /// It kept the connection open this long without closing it, after sending these bytes.
    StillOpen(Vec<u8>),
}

/// Reads until EOF/reset or `wait` passes.
async fn drain<S: AsyncReadExt + Unpin>(stream: &mut S, wait: Duration) -> Outcome {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return Outcome::StillOpen(got),
            Ok(Ok(0)) | Ok(Err(_)) => return Outcome::Closed(got),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

fn port_of(store: &StoreProcess) -> u16 {
    store.port()
}

fn garbage(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut bytes = vec![0u8; len];
    rng.fill_bytes(&mut bytes);
    bytes
}

/// Writes `payload` on a fresh TCP connection and reports what the server did. Write errors
/// (the server closed while we were still writing) count as a close.
async fn raw_exchange(port: u16, payload: &[u8], wait: Duration) -> Outcome {
    let mut sock = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("TCP connect to the store port");
    if sock.write_all(payload).await.is_err() {
        return Outcome::Closed(Vec::new());
    }
    drain(&mut sock, wait).await
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Garbage, garbage after an HTTP/2 preface, and idle connections, against one port.
/// A server must never crash or stop accepting; it should close garbage connections.
async fn garbage_against(store: &StoreProcess) {
    let port = port_of(store);

    // Idle connections that never send a byte must not block anyone else.
    let mut idle = Vec::new();
    for _ in 0..20 {
        idle.push(TcpStream::connect(("127.0.0.1", port)).await.unwrap());
    }

    // Fewer bytes than an HTTP/2 preface (24) or a TLS record header: a server may wait for
    // more (etcd does), so only log what happens.
    for (i, len) in [1usize, 17].into_iter().enumerate() {
        let outcome = raw_exchange(port, &garbage(i as u64, len), Duration::from_secs(1)).await;
        eprintln!("{len} garbage bytes: {}", describe(&outcome));
    }
    // Enough bytes to know it is garbage: the connection must be closed.
    for (i, len) in [4096usize, 256 * 1024].into_iter().enumerate() {
        let outcome = raw_exchange(port, &garbage(10 + i as u64, len), TIMEOUT).await;
        eprintln!("{len} garbage bytes: {}", describe(&outcome));
        assert!(
            matches!(outcome, Outcome::Closed(_)),
            "{len} garbage bytes: the server kept the connection open for {TIMEOUT:?} \
             instead of rejecting it: {}",
            describe(&outcome)
        );
    }

    // Concurrent garbage connections.
    let tasks: Vec<_> = (0..16)
        .map(|i| {
            let payload = garbage(100 + i, 2048);
            tokio::spawn(async move { raw_exchange(port, &payload, TIMEOUT).await })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }

    assert_healthy(store, "garbage with idle connections open").await;
    drop(idle);
}

/// An HTTP/2 preface followed by garbage frames: past the protocol sniffing, into the h2 layer.
async fn h2_garbage_against(port: u16) -> Outcome {
    let mut payload = H2_PREFACE.to_vec();
    payload.extend_from_slice(&garbage(7, 4096));
    raw_exchange(port, &payload, TIMEOUT).await
}

fn describe(outcome: &Outcome) -> String {
    let (what, bytes) = match outcome {
        Outcome::Closed(b) => ("closed", b),
        Outcome::StillOpen(b) => ("still open", b),
    };
    let head: String = String::from_utf8_lossy(&bytes[..bytes.len().min(120)])
        .chars()
        .map(|c| if c.is_control() && c != '\n' { '.' } else { c })
        .collect();
    format!("{what} after {} bytes back: {head:?}", bytes.len())
}

async fn garbage_bytes_plain(backend: Backend) {
    let store = start(backend, StoreOptions::default()).await;
    garbage_against(&store).await;
    let outcome = h2_garbage_against(store.port()).await;
    eprintln!("h2 preface + garbage: {}", describe(&outcome));
    assert!(
        matches!(outcome, Outcome::Closed(_)),
        "h2 preface + garbage: connection not closed: {}",
        describe(&outcome)
    );
    assert_healthy(&store, "garbage on the plain port").await;
}

async fn garbage_bytes_tls(backend: Backend) {
    let pki = Arc::new(TestPki::generate());
    let store = start(backend, tls_opts(&pki)).await;
    // Garbage where a TLS ClientHello should be.
    garbage_against(&store).await;

    // A valid mTLS handshake, then garbage inside the TLS session.
    let mut tls = tls_connect(&pki, store.port(), &[b"h2"])
        .await
        .expect("mTLS handshake with a valid client certificate");
    let mut payload = H2_PREFACE.to_vec();
    payload.extend_from_slice(&garbage(9, 4096));
    let outcome = match tls.write_all(&payload).await {
        Err(_) => Outcome::Closed(Vec::new()),
        Ok(()) => drain(&mut tls, TIMEOUT).await,
    };
    eprintln!("garbage inside TLS: {}", describe(&outcome));
    assert!(
        matches!(outcome, Outcome::Closed(_)),
        "garbage inside an mTLS session: connection not closed: {}",
        describe(&outcome)
    );
    assert_healthy(&store, "garbage on the TLS port").await;
}

// ---------------------------------------------------------------------------------------------
// HTTP/1.1 on the gRPC port

fn http1_requests(port: u16) -> Vec<(&'static str, Vec<u8>)> {
    vec![
        (
            "GET /version",
            format!("GET /version HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n")
                .into_bytes(),
        ),
        (
            "POST to a gRPC method",
            format!(
                "POST /etcdserverpb.KV/Range HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\
                 Content-Type: application/grpc\r\nContent-Length: 5\r\n\
                 Connection: close\r\n\r\n\0\0\0\0\0"
            )
            .into_bytes(),
        ),
    ]
}

/// Acceptable: an HTTP/1.x response, or the connection closed. Not acceptable: silence with the
/// connection held open, or a dead server.
fn assert_http1_handled(what: &str, outcome: &Outcome) {
    eprintln!("HTTP/1.1 {what}: {}", describe(outcome));
    match outcome {
        Outcome::Closed(_) => {}
        Outcome::StillOpen(bytes) => assert!(
            bytes.starts_with(b"HTTP/1."),
            "HTTP/1.1 {what}: no HTTP/1 response and the connection held open: {}",
            describe(outcome)
        ),
    }
}

async fn http1_request_plain(backend: Backend) {
    let store = start(backend, StoreOptions::default()).await;
    for (what, req) in http1_requests(store.port()) {
        let outcome = raw_exchange(store.port(), &req, TIMEOUT).await;
        assert_http1_handled(what, &outcome);
    }
    assert_healthy(&store, "HTTP/1.1 requests").await;
}

async fn http1_request_tls(backend: Backend) {
    let pki = Arc::new(TestPki::generate());
    let store = start(backend, tls_opts(&pki)).await;
    for (what, req) in http1_requests(store.port()) {
        // Offer only http/1.1 by ALPN: a server may refuse the handshake, which is fine.
        match tls_connect(&pki, store.port(), &[b"http/1.1"]).await {
            Err(e) => eprintln!("HTTP/1.1 over TLS {what}: handshake refused: {e}"),
            Ok(mut tls) => {
                let outcome = match tls.write_all(&req).await {
                    Err(_) => Outcome::Closed(Vec::new()),
                    Ok(()) => drain(&mut tls, TIMEOUT).await,
                };
                assert_http1_handled(what, &outcome);
            }
        }
    }
    assert_healthy(&store, "HTTP/1.1 requests over TLS").await;
}

/// A raw mTLS connection with the `root` client certificate, offering `alpn`.
async fn tls_connect(
    pki: &TestPki,
    port: u16,
    alpn: &[&[u8]],
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};

    let client = pki.client("root");
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(pki.ca_path()).expect("read CA PEM") {
        roots.add(cert.expect("CA PEM")).expect("add CA root");
    }
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&client.cert)
        .expect("read client cert PEM")
        .collect::<Result<_, _>>()
        .expect("client cert PEM");
    let key = PrivateKeyDer::from_pem_file(&client.key).expect("client key PEM");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .expect("client auth cert");
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let sock = TcpStream::connect(("127.0.0.1", port)).await?;
    let name = ServerName::try_from("127.0.0.1").expect("server name");
    tokio::time::timeout(TIMEOUT, connector.connect(name, sock))
        .await
        .map_err(|_| std::io::Error::other("TLS handshake timed out"))?
}
