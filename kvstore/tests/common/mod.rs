//! Helpers shared by kvstore's integration tests: starting a store of either backend, short
//! readable views of keys, key-values and watch events, and precise gRPC error assertions.
//!
//! Each integration test file compiles this module separately, so helpers one file does not
//! use would warn as dead code there.
#![allow(dead_code)]

use std::time::Duration;

use etcd_client::{Client, Event, EventType, KeyValue, ResponseHeader, WatchResponse, WatchStream};
use testkit::{Backend, StoreOptions, StoreProcess};

/// How long any single wait for a store response may take before the test fails. Generous,
/// because the machine is shared; a correct store answers in milliseconds.
pub const WAIT: Duration = Duration::from_secs(10);

/// Our server, built by cargo for this test run.
pub fn embedded_backend() -> Backend {
    Backend::Embedded {
        bin: env!("CARGO_BIN_EXE_kvstore").into(),
    }
}

/// Runs each named `async fn(Backend)` scenario as two tests, `<name>::etcd` against a real
/// etcd and `<name>::embedded` against our store. (Not every test file uses it.)
#[allow(unused_macros)]
macro_rules! both {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn etcd() {
                super::$name(testkit::Backend::Etcd).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn embedded() {
                super::$name($crate::common::embedded_backend()).await
            }
        }
    )*};
}
#[allow(unused_imports)]
pub(crate) use both;

/// Starts a store with default options and connects a client.
pub async fn start(backend: Backend) -> (StoreProcess, Client) {
    start_with(backend, StoreOptions::default()).await
}

/// Starts a store with `opts` and connects a client.
pub async fn start_with(backend: Backend, opts: StoreOptions) -> (StoreProcess, Client) {
    let name = backend.name();
    let store = StoreProcess::start(backend, opts)
        .await
        .unwrap_or_else(|e| panic!("start {name}: {e}"));
    let client = store.client().await;
    (store, client)
}

/// Escapes a byte string so binary keys read well in assertion diffs (`k\xff`, `a\x00b`).
pub fn esc(bytes: &[u8]) -> String {
    bytes
        .iter()
        .flat_map(|b| std::ascii::escape_default(*b))
        .map(char::from)
        .collect()
}

/// The revision in a response header; every etcd response carries one.
pub fn rev(header: Option<&ResponseHeader>) -> i64 {
    header.expect("response has a header").revision()
}

/// A key-value in one comparable, printable value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kv {
    pub key: String,
    pub value: String,
    pub create: i64,
    pub modr: i64,
    pub version: i64,
    pub lease: i64,
}

impl Kv {
    /// The expected view of a live key.
    pub fn new(key: &str, value: &str, create: i64, modr: i64, version: i64) -> Self {
        Kv {
            key: key.to_string(),
            value: value.to_string(),
            create,
            modr,
            version,
            lease: 0,
        }
    }

    /// The same, attached to `lease`.
    pub fn leased(mut self, lease: i64) -> Self {
        self.lease = lease;
        self
    }
}

pub fn kv(kv: &KeyValue) -> Kv {
    Kv {
        key: esc(kv.key()),
        value: esc(kv.value()),
        create: kv.create_revision(),
        modr: kv.mod_revision(),
        version: kv.version(),
        lease: kv.lease(),
    }
}

pub fn kvs(kvs: &[KeyValue]) -> Vec<Kv> {
    kvs.iter().map(kv).collect()
}

pub fn keys(kvs: &[KeyValue]) -> Vec<String> {
    kvs.iter().map(|k| esc(k.key())).collect()
}

/// A watch event as (type, key, value, mod_revision).
pub type Ev = (&'static str, String, String, i64);

pub fn ev(e: &Event) -> Ev {
    let kv = e.kv().expect("event has a kv");
    let ty = match e.event_type() {
        EventType::Put => "PUT",
        EventType::Delete => "DELETE",
    };
    (ty, esc(kv.key()), esc(kv.value()), kv.mod_revision())
}

pub fn put_ev(key: &str, value: &str, rev: i64) -> Ev {
    ("PUT", key.to_string(), value.to_string(), rev)
}

pub fn del_ev(key: &str, rev: i64) -> Ev {
    ("DELETE", key.to_string(), String::new(), rev)
}

/// The next response on a watch stream; fails the test on timeout, error or end of stream.
pub async fn next_msg(ws: &mut WatchStream) -> WatchResponse {
    tokio::time::timeout(WAIT, ws.message())
        .await
        .expect("timed out waiting for a watch response")
        .expect("watch stream error")
        .expect("watch stream ended")
}

/// Opens a watch stream and consumes the `created` response; returns the stream and watch id.
pub async fn watch_created(
    client: &mut Client,
    key: impl Into<Vec<u8>>,
    opts: etcd_client::WatchOptions,
) -> (WatchStream, i64) {
    let mut ws = client.watch(key, Some(opts)).await.expect("watch");
    let created = next_msg(&mut ws).await;
    assert!(
        created.created(),
        "first response is the created one: {created:?}"
    );
    assert!(created.events().is_empty(), "{created:?}");
    (ws, created.watch_id())
}

/// Reads responses until `n` events arrived in total; returns exactly what arrived (more than
/// `n` if the last response carried extra), so callers compare the whole list.
pub async fn events(ws: &mut WatchStream, n: usize) -> Vec<Ev> {
    let mut out = Vec::new();
    while out.len() < n {
        let resp = next_msg(ws).await;
        assert!(
            !resp.canceled(),
            "watch canceled while waiting for events: {resp:?}"
        );
        out.extend(resp.events().iter().map(ev));
    }
    out
}

/// Asserts that nothing at all arrives on the stream for `dur`.
pub async fn assert_quiet(ws: &mut WatchStream, dur: Duration) {
    if let Ok(msg) = tokio::time::timeout(dur, ws.message()).await {
        panic!("expected no watch response, got {msg:?}");
    }
}

/// Asserts that `res` is a gRPC error with exactly `code` and a message containing `msg`.
#[track_caller]
pub fn assert_grpc_err<T: std::fmt::Debug>(
    res: Result<T, etcd_client::Error>,
    code: tonic::Code,
    msg: &str,
) {
    match res {
        Err(etcd_client::Error::GRpcStatus(status)) => {
            assert_eq!(
                status.code(),
                code,
                "gRPC code (message: {:?})",
                status.message()
            );
            assert!(
                status.message().contains(msg),
                "gRPC message {:?} does not contain {msg:?}",
                status.message()
            );
        }
        other => panic!("expected gRPC error {code:?} {msg:?}, got {other:?}"),
    }
}

/// The store's current revision, read with a range on a key no test writes.
pub async fn current_rev(client: &mut Client) -> i64 {
    let resp = client
        .get("__current_rev_probe__", None)
        .await
        .expect("get");
    rev(resp.header())
}

/// Puts `key=value` and returns the revision of the write.
pub async fn put(client: &mut Client, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> i64 {
    let resp = client.put(key, value, None).await.expect("put");
    rev(resp.header())
}
