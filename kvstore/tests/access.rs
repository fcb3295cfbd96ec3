//! Access rules by client certificate CN (`kvstore::server::access`), on both backends: real
//! etcd provisioned by `kvstore::client::provision`, and our store started with
//! `--cluster-name a`. Tests are named `scenario::etcd` and `scenario::embedded`.
//!
//! The store belongs to cluster `a`; `b` is its provisioned peer. Where etcd 3.4.23 does not
//! refuse what the embedded store refuses, each scenario asserts what each backend really does
//! and says why: nested transactions are not checked at all (a read-only peer writes through
//! one), from-key watches are checked on their start key only, leases, compaction, status and
//! alarms are open to every user, only provisioned peers exist, and `root` is a user.

mod common;

use std::sync::Arc;
use std::time::Duration;

use certs::ClusterName;
use common::{WAIT, both, embedded_backend, next_msg};
use etcd_client::{
    AlarmAction, AlarmType, Client, Compare, CompareOp, ConnectOptions, DeleteOptions, GetOptions,
    PutOptions, TlsOptions, Txn, TxnOp, WatchOptions, WatchStream,
};
use kvstore::client::provision::{self, ProvisionError};
use kvstore::client::{ClientConfig, StoreClient, TlsFiles};
use testkit::{Backend, CertFiles, StoreOptions, StoreProcess, TestPki};
use tonic::Code;

both!(
    remote_reads_what_peers_may_read,
    remote_writes_nothing,
    remote_reads_nothing_else,
    remote_leases_compaction_and_status,
    local_reads_only_its_prefixes,
    admin_does_everything,
    untrusted_certificates_are_refused,
    unknown_users_have_no_rights,
    txn_compares_are_checked,
    nested_txn_writes_are_checked,
    watch_ranges_are_checked,
);

const US: &str = "a";
const PEER: &str = "b";

const NODE: &str = "cilium/state/nodes/v1/a/n1";
const SERVICE: &str = "cilium/state/services/v1/a/default/s1";
const HEARTBEAT: &str = "cilium/.heartbeat";
const CONFIG_US: &str = "cilium/cluster-config/a";
const CONFIG_OTHER: &str = "cilium/cluster-config/c";
const SYNCED_US: &str = "cilium/synced/a/cilium/state/nodes/v1";
const SYNCED_OTHER: &str = "cilium/synced/c/cilium/state/nodes/v1";
const CACHE: &str = "cilium/cache/nodes/v1/c/n9";
const SECRET: &str = "secret/x";

/// What the store holds before each scenario, written by `admin-a`.
const SEED: &[(&str, &str)] = &[
    (NODE, "n1"),
    (SERVICE, "s1"),
    (HEARTBEAT, "hb"),
    (CONFIG_US, "cfg-a"),
    (CONFIG_OTHER, "cfg-c"),
    (SYNCED_US, "sync-a"),
    (SYNCED_OTHER, "sync-c"),
    (CACHE, "cached"),
    (SECRET, "s"),
];

fn is_etcd(backend: &Backend) -> bool {
    *backend == Backend::Etcd
}

fn cluster(name: &str) -> ClusterName {
    ClusterName::new(name).unwrap()
}

fn prefix_end(prefix: &str) -> Vec<u8> {
    kvstore::client::prefix_range_end(prefix.as_bytes())
}

/// A store of cluster `a` that enforces the rules, seeded with [`SEED`].
struct Secured {
    pki: Arc<TestPki>,
    store: StoreProcess,
    backend: Backend,
}

impl Secured {
    async fn start(backend: Backend) -> Self {
        Self::start_with_peers(backend, &[PEER]).await
    }

    async fn start_with_peers(backend: Backend, peers: &[&str]) -> Self {
        let pki = Arc::new(TestPki::generate());
        // Ours enforces the rules itself from `--cluster-name`; etcd gets them provisioned below.
        let (extra_args, client_cn) = match &backend {
            Backend::Embedded { .. } => (
                vec!["--cluster-name".to_owned(), US.to_owned()],
                Some(format!("admin-{US}")),
            ),
            Backend::Etcd => (Vec::new(), None),
        };
        let opts = StoreOptions {
            tls: Some(Arc::clone(&pki)),
            extra_args,
            client_cn,
            ..Default::default()
        };
        let store = StoreProcess::start(backend.clone(), opts)
            .await
            .unwrap_or_else(|e| panic!("start {}: {e}", backend.name()));
        let secured = Secured {
            pki,
            store,
            backend,
        };
        if is_etcd(&secured.backend) {
            let peers: Vec<ClusterName> = peers.iter().map(|p| cluster(p)).collect();
            let admin = secured.store_client(&format!("admin-{US}")).await;
            let report = provision::provision(&admin, &cluster(US), &peers)
                .await
                .unwrap_or_else(|e| panic!("provision etcd: {e:?}"));
            assert!(report.auth_enabled, "{report}");
        }
        let mut admin = secured.client(&format!("admin-{US}")).await;
        for (key, value) in SEED {
            admin
                .put(*key, *value, None)
                .await
                .unwrap_or_else(|e| panic!("seed {key} as admin-{US}: {e}"));
        }
        secured
    }

    fn files(&self, cn: &str) -> CertFiles {
        self.pki.client(cn)
    }

    /// Our client layer, presenting `cn`'s certificate.
    async fn store_client(&self, cn: &str) -> StoreClient {
        let files = self.files(cn);
        let config = ClientConfig::new([self.store.endpoint()]).with_tls(TlsFiles {
            ca: files.ca,
            cert: Some(files.cert),
            key: Some(files.key),
        });
        StoreClient::connect(&config)
            .await
            .unwrap_or_else(|e| panic!("connect as {cn}: {e:?}"))
    }

    /// An `etcd_client` presenting `cn`'s certificate. Connecting sends no request, so this
    /// succeeds for any certificate the TLS handshake accepts.
    async fn client(&self, cn: &str) -> Client {
        self.connect(self.files(cn).tls_options())
            .await
            .unwrap_or_else(|e| panic!("connect as {cn}: {e}"))
    }

    async fn connect(&self, tls: TlsOptions) -> Result<Client, etcd_client::Error> {
        Client::connect([self.store.endpoint()], Some(opts_with(tls))).await
    }

    /// The store still serves: a fresh `admin-a` connection writes and reads back a key.
    async fn assert_serving(&self, after: &str) {
        let check = async {
            let mut admin = self
                .connect(self.files(&format!("admin-{US}")).tls_options())
                .await
                .map_err(|e| e.to_string())?;
            let key = format!("health/{after}");
            admin
                .put(key.as_str(), "ok", None)
                .await
                .map_err(|e| e.to_string())?;
            let resp = admin
                .get(key.as_str(), None)
                .await
                .map_err(|e| e.to_string())?;
            match resp.kvs().first().map(|kv| kv.value()) {
                Some(b"ok") => Ok(()),
                other => Err(format!("read back {other:?}")),
            }
        };
        match tokio::time::timeout(WAIT, check).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!(
                "{}: the store stopped serving admin-{US} after {after}: {e}\nlog tail:\n{}",
                self.backend.name(),
                self.store.log_tail()
            ),
            Err(_) => panic!(
                "{}: no answer within {WAIT:?} after {after}\nlog tail:\n{}",
                self.backend.name(),
                self.store.log_tail()
            ),
        }
    }

    /// Every key and value, read by `admin-a`.
    async fn everything(&self) -> Vec<(String, String)> {
        let mut admin = self.client(&format!("admin-{US}")).await;
        let resp = admin
            .get("", Some(GetOptions::new().with_all_keys()))
            .await
            .expect("admin reads everything");
        resp.kvs()
            .iter()
            .filter(|kv| !kv.key().starts_with(b"health/"))
            .map(|kv| {
                (
                    String::from_utf8_lossy(kv.key()).into_owned(),
                    String::from_utf8_lossy(kv.value()).into_owned(),
                )
            })
            .collect()
    }

    /// Asserts that the store holds exactly [`SEED`] (refused writes left no trace).
    async fn assert_unchanged(&self, after: &str) {
        let mut want: Vec<(String, String)> = SEED
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        want.sort();
        assert_eq!(
            self.everything().await,
            want,
            "{}: the store changed after {after}",
            self.backend.name()
        );
    }
}

fn opts_with(tls: TlsOptions) -> ConnectOptions {
    ConnectOptions::new()
        .with_tls(tls)
        .with_connect_timeout(Duration::from_secs(5))
        .with_timeout(WAIT)
}

/// Runs one request with the test's patience.
async fn within<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, fut)
        .await
        .unwrap_or_else(|_| panic!("{what}: no answer within {WAIT:?}"))
}

/// Asserts etcd's refusal: `PermissionDenied`, "etcdserver: permission denied".
#[track_caller]
fn assert_denied<T: std::fmt::Debug>(res: Result<T, etcd_client::Error>, what: &str) {
    match res {
        Err(etcd_client::Error::GRpcStatus(status)) => {
            assert_eq!(
                status.code(),
                Code::PermissionDenied,
                "{what}: expected PermissionDenied, got {:?} {:?}",
                status.code(),
                status.message()
            );
            assert_eq!(
                status.message(),
                "etcdserver: permission denied",
                "{what}: the message should be etcd's"
            );
        }
        other => panic!("{what}: expected PermissionDenied, got {other:?}"),
    }
}

#[track_caller]
fn assert_allowed<T>(res: Result<T, etcd_client::Error>, what: &str) -> T {
    res.unwrap_or_else(|e| panic!("{what}: expected success, got {e:?}"))
}

/// The keys of a range response.
fn keys(resp: &etcd_client::GetResponse) -> Vec<String> {
    resp.kvs()
        .iter()
        .map(|kv| String::from_utf8_lossy(kv.key()).into_owned())
        .collect()
}

async fn get_keys(c: &mut Client, key: &str, opts: Option<GetOptions>, what: &str) -> Vec<String> {
    let resp = assert_allowed(within(what, c.get(key, opts)).await, what);
    keys(&resp)
}

async fn get_denied(c: &mut Client, key: &str, opts: Option<GetOptions>, what: &str) {
    assert_denied(within(what, c.get(key, opts)).await, what);
}

fn prefix() -> Option<GetOptions> {
    Some(GetOptions::new().with_prefix())
}

/// How a watch request ended up.
enum Watch {
    /// Created and open.
    Open(Box<WatchStream>),
    /// Created and canceled at once, with this reason.
    Refused(String),
}

async fn watch(c: &mut Client, key: &str, opts: WatchOptions, what: &str) -> Watch {
    let mut stream = assert_allowed(
        within(what, c.watch(key, Some(opts))).await,
        &format!("{what}: open the watch stream"),
    );
    let first = within(what, stream.message())
        .await
        .unwrap_or_else(|e| panic!("{what}: watch stream error {e:?}"))
        .unwrap_or_else(|| panic!("{what}: watch stream ended before any response"));
    assert!(
        first.created(),
        "{what}: the first response must say created: {first:?}"
    );
    if first.canceled() {
        Watch::Refused(first.cancel_reason().to_owned())
    } else {
        Watch::Open(Box::new(stream))
    }
}

async fn watch_open(c: &mut Client, key: &str, opts: WatchOptions, what: &str) -> WatchStream {
    match watch(c, key, opts, what).await {
        Watch::Open(stream) => *stream,
        Watch::Refused(reason) => panic!("{what}: watch refused: {reason:?}"),
    }
}

/// A denied watch is created and canceled at once, the reason saying permission denied.
async fn watch_refused(c: &mut Client, key: &str, opts: WatchOptions, what: &str) {
    match watch(c, key, opts, what).await {
        Watch::Open(_) => panic!("{what}: the watch was created, expected a refusal"),
        Watch::Refused(reason) => assert!(
            reason.contains("permission denied"),
            "{what}: cancel reason {reason:?} should say permission denied"
        ),
    }
}

/// The next event's key on an open watch.
async fn next_event_key(stream: &mut WatchStream) -> String {
    loop {
        let resp = next_msg(stream).await;
        assert!(!resp.canceled(), "watch canceled: {resp:?}");
        if let Some(ev) = resp.events().first() {
            let kv = ev.kv().expect("event with a kv");
            return String::from_utf8_lossy(kv.key()).into_owned();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// remote-<peer>

async fn remote_reads_what_peers_may_read(backend: Backend) {
    let s = Secured::start(backend).await;
    let mut remote = s.client(&format!("remote-{PEER}")).await;

    assert_eq!(
        get_keys(&mut remote, NODE, None, "remote gets a node").await,
        vec![NODE]
    );
    assert_eq!(
        get_keys(&mut remote, "cilium/state/", prefix(), "remote lists state").await,
        vec![NODE, SERVICE]
    );
    let services = "cilium/state/services/v1/";
    assert_eq!(
        get_keys(&mut remote, services, prefix(), "remote lists services").await,
        vec![SERVICE]
    );
    assert_eq!(
        get_keys(&mut remote, HEARTBEAT, None, "remote reads the heartbeat").await,
        vec![HEARTBEAT]
    );
    assert_eq!(
        get_keys(&mut remote, CONFIG_US, None, "remote reads our config").await,
        vec![CONFIG_US]
    );
    assert_eq!(
        get_keys(
            &mut remote,
            "cilium/synced/a/",
            prefix(),
            "remote lists our canaries"
        )
        .await,
        vec![SYNCED_US]
    );
    // Paginated, keys-only and counting reads are reads too.
    let page = GetOptions::new()
        .with_prefix()
        .with_limit(1)
        .with_keys_only();
    let resp = assert_allowed(
        remote.get("cilium/state/", Some(page)).await,
        "remote pages through state",
    );
    assert_eq!(keys(&resp), vec![NODE]);
    assert!(resp.more());
    let resp = assert_allowed(
        remote
            .get(
                "cilium/state/",
                Some(GetOptions::new().with_prefix().with_count_only()),
            )
            .await,
        "remote counts state",
    );
    assert_eq!(resp.count(), 2);
    // A transaction of reads and compares on readable keys.
    let txn = Txn::new()
        .when([Compare::value(NODE, CompareOp::Equal, "n1")])
        .and_then([TxnOp::get(SERVICE, None)])
        .or_else([TxnOp::get(HEARTBEAT, None)]);
    let resp = assert_allowed(remote.txn(txn).await, "remote runs a read-only txn");
    assert!(resp.succeeded());

    // Watches on what it may read.
    let mut state = watch_open(
        &mut remote,
        "cilium/state/",
        WatchOptions::new().with_prefix(),
        "remote watches state",
    )
    .await;
    let mut heartbeat = watch_open(
        &mut remote,
        HEARTBEAT,
        WatchOptions::new(),
        "remote watches the heartbeat",
    )
    .await;
    let mut admin = s.client(&format!("admin-{US}")).await;
    let node2 = "cilium/state/nodes/v1/a/n2";
    admin.put(node2, "n2", None).await.expect("admin put");
    admin.put(HEARTBEAT, "hb2", None).await.expect("admin put");
    assert_eq!(next_event_key(&mut state).await, node2);
    assert_eq!(next_event_key(&mut heartbeat).await, HEARTBEAT);
}

async fn remote_writes_nothing(backend: Backend) {
    let s = Secured::start(backend).await;
    let mut remote = s.client(&format!("remote-{PEER}")).await;

    let what = "remote puts into state it may read";
    assert_denied(within(what, remote.put(NODE, "evil", None)).await, what);
    let what = "remote puts a new state key";
    assert_denied(
        within(what, remote.put("cilium/state/nodes/v1/b/x", "evil", None)).await,
        what,
    );
    let what = "remote puts into the cache";
    assert_denied(within(what, remote.put(CACHE, "evil", None)).await, what);
    let what = "remote puts its own cluster config";
    assert_denied(
        within(what, remote.put("cilium/cluster-config/b", "evil", None)).await,
        what,
    );
    let what = "remote deletes a node";
    assert_denied(within(what, remote.delete(NODE, None)).await, what);
    let what = "remote deletes the state prefix";
    assert_denied(
        within(
            what,
            remote.delete("cilium/state/", Some(DeleteOptions::new().with_prefix())),
        )
        .await,
        what,
    );
    let what = "remote deletes everything";
    assert_denied(
        within(
            what,
            remote.delete("", Some(DeleteOptions::new().with_all_keys())),
        )
        .await,
        what,
    );
    let what = "remote txn that writes";
    let txn = Txn::new()
        .when([Compare::value(NODE, CompareOp::Equal, "n1")])
        .and_then([TxnOp::put(NODE, "evil", None)]);
    assert_denied(within(what, remote.txn(txn)).await, what);
    let what = "remote txn that deletes in the branch that would not run";
    let txn = Txn::new()
        .when([Compare::value(NODE, CompareOp::Equal, "n1")])
        .and_then([TxnOp::get(NODE, None)])
        .or_else([TxnOp::delete(
            "cilium/state/",
            Some(DeleteOptions::new().with_prefix()),
        )]);
    assert_denied(within(what, remote.txn(txn)).await, what);

    s.assert_unchanged("refused writes").await;
    s.assert_serving("refused writes").await;
}

async fn remote_reads_nothing_else(backend: Backend) {
    let s = Secured::start(backend).await;
    let mut remote = s.client(&format!("remote-{PEER}")).await;

    for (key, opts, what) in [
        ("cilium/cache/", prefix(), "the cache"),
        (CACHE, None, "a cached key"),
        ("cilium/synced/c/", prefix(), "another cluster's canaries"),
        (SYNCED_OTHER, None, "another cluster's canary"),
        ("cilium/synced/", prefix(), "every canary"),
        (CONFIG_OTHER, None, "another cluster's config"),
        ("cilium/cluster-config/", prefix(), "every cluster config"),
        (
            CONFIG_US,
            prefix(),
            "our config as a prefix (reaches past the key)",
        ),
        ("cilium/", prefix(), "all of cilium/"),
        (SECRET, None, "a key outside cilium/"),
        ("", Some(GetOptions::new().with_all_keys()), "every key"),
        (
            "cilium/state/",
            Some(GetOptions::new().with_from_key()),
            "from state on",
        ),
        (
            "cilium/state/",
            Some(GetOptions::new().with_range("cilium/synced/")),
            "a range from state into the canaries",
        ),
    ] {
        let what = format!("remote reads {what}");
        get_denied(&mut remote, key, opts, &what).await;
    }
    // Reads of forbidden keys inside a transaction.
    let what = "remote txn reading the cache";
    let txn = Txn::new().and_then([TxnOp::get(NODE, None), TxnOp::get(CACHE, None)]);
    assert_denied(within(what, remote.txn(txn)).await, what);

    watch_refused(
        &mut remote,
        "cilium/cache/",
        WatchOptions::new().with_prefix(),
        "remote watches the cache",
    )
    .await;
    watch_refused(
        &mut remote,
        "cilium/synced/c/",
        WatchOptions::new().with_prefix(),
        "remote watches another cluster's canaries",
    )
    .await;
    s.assert_serving("refused reads").await;
}

/// etcd 3.4 checks keys, never lease or maintenance calls: any authenticated user may grant
/// leases, keep them alive, read their TTL, revoke a lease no key is attached to, compact and
/// read the status. The embedded store gives leases and compaction to the admin only. Both
/// refuse to revoke a lease with keys the caller may not write (etcd checks those keys).
async fn remote_leases_compaction_and_status(backend: Backend) {
    let s = Secured::start(backend.clone()).await;
    let etcd = is_etcd(&backend);
    let mut remote = s.client(&format!("remote-{PEER}")).await;
    let mut admin = s.client(&format!("admin-{US}")).await;

    // Status: both let a known user read it.
    assert_allowed(remote.status().await, "remote reads the status");

    let what = "remote grants a lease";
    let granted = within(what, remote.lease_grant(30, None)).await;
    if etcd {
        let lease = assert_allowed(granted, what);
        eprintln!("etcd 3.4 lets remote-{PEER} grant lease {:x}", lease.id());
    } else {
        assert_denied(granted, what);
    }

    // A lease of the admin's, first without keys.
    let lease = admin
        .lease_grant(60, None)
        .await
        .expect("admin grants a lease")
        .id();
    let what = "remote reads a lease's TTL";
    let ttl = within(what, remote.lease_time_to_live(lease, None)).await;
    if etcd {
        assert!(assert_allowed(ttl, what).ttl() > 0);
    } else {
        assert_denied(ttl, what);
    }
    let what = "remote keeps a lease alive";
    let kept = within(what, remote.lease_keep_alive(lease))
        .await
        .map(|_| ());
    if etcd {
        assert_allowed(kept, what);
    } else {
        assert_denied(kept, what);
    }
    let what = "remote lists alarms";
    assert_allowed(
        within(what, remote.alarm(AlarmAction::Get, AlarmType::None, None)).await,
        what,
    );
    let what = "remote lists leases";
    let leases = within(what, remote.leases()).await;
    if etcd {
        assert_allowed(leases, what);
    } else {
        assert_denied(leases, what);
    }

    // With a key attached, a revoke would delete it: both refuse.
    let leased = "cilium/state/nodes/v1/a/leased";
    admin
        .put(leased, "x", Some(PutOptions::new().with_lease(lease)))
        .await
        .expect("admin puts with its lease");
    let what = "remote revokes a lease with a state key attached";
    assert_denied(within(what, remote.lease_revoke(lease)).await, what);
    let resp = admin.get(leased, None).await.expect("admin get");
    assert_eq!(keys(&resp), vec![leased], "the leased key must survive");

    // Without keys, etcd lets anyone revoke it.
    let empty = admin
        .lease_grant(60, None)
        .await
        .expect("admin grants a lease")
        .id();
    let what = "remote revokes a lease without keys";
    let revoked = within(what, remote.lease_revoke(empty)).await;
    if etcd {
        assert_allowed(revoked, what);
    } else {
        assert_denied(revoked, what);
    }

    let current = admin.get(NODE, None).await.expect("admin get");
    let revision = current.header().expect("header").revision();
    let what = "remote compacts";
    let compacted = within(what, remote.compact(revision, None)).await;
    if etcd {
        assert_allowed(compacted, what);
    } else {
        assert_denied(compacted, what);
    }
    s.assert_serving("remote lease and compaction calls").await;
}

// ---------------------------------------------------------------------------------------------
// local-<us>

async fn local_reads_only_its_prefixes(backend: Backend) {
    let s = Secured::start(backend).await;
    let mut local = s.client(&format!("local-{US}")).await;

    assert_eq!(
        get_keys(
            &mut local,
            "cilium/cache/",
            prefix(),
            "local lists the cache"
        )
        .await,
        vec![CACHE]
    );
    assert_eq!(
        get_keys(
            &mut local,
            "cilium/cluster-config/",
            prefix(),
            "local lists cluster configs"
        )
        .await,
        vec![CONFIG_US, CONFIG_OTHER]
    );
    assert_eq!(
        get_keys(
            &mut local,
            "cilium/synced/",
            prefix(),
            "local lists canaries"
        )
        .await,
        vec![SYNCED_US, SYNCED_OTHER]
    );
    assert_eq!(
        get_keys(&mut local, HEARTBEAT, None, "local reads the heartbeat").await,
        vec![HEARTBEAT]
    );
    let mut cache = watch_open(
        &mut local,
        "cilium/cache/",
        WatchOptions::new().with_prefix(),
        "local watches the cache",
    )
    .await;

    for (key, opts, what) in [
        ("cilium/state/", prefix(), "the state prefix"),
        (NODE, None, "a node"),
        (SECRET, None, "a key outside cilium/"),
        ("cilium/", prefix(), "all of cilium/"),
    ] {
        get_denied(&mut local, key, opts, &format!("local reads {what}")).await;
    }
    let what = "local puts into the cache";
    assert_denied(within(what, local.put(CACHE, "evil", None)).await, what);
    let what = "local deletes from the cache";
    assert_denied(within(what, local.delete(CACHE, None)).await, what);
    watch_refused(
        &mut local,
        "cilium/state/",
        WatchOptions::new().with_prefix(),
        "local watches state",
    )
    .await;

    let mut admin = s.client(&format!("admin-{US}")).await;
    let cached = "cilium/cache/nodes/v1/c/n10";
    admin.put(cached, "x", None).await.expect("admin put");
    assert_eq!(next_event_key(&mut cache).await, cached);
    admin.delete(cached, None).await.expect("admin delete");
    s.assert_unchanged("local's refused writes").await;
}

// ---------------------------------------------------------------------------------------------
// admin-<us>

async fn admin_does_everything(backend: Backend) {
    let s = Secured::start(backend).await;
    let mut admin = s.client(&format!("admin-{US}")).await;

    let mut all = watch_open(
        &mut admin,
        "\0",
        WatchOptions::new().with_from_key(),
        "admin watches every key",
    )
    .await;
    let lease = assert_allowed(admin.lease_grant(30, None).await, "admin grants a lease").id();
    assert_allowed(
        admin
            .put(SECRET, "s2", Some(PutOptions::new().with_lease(lease)))
            .await,
        "admin puts with a lease",
    );
    assert_eq!(next_event_key(&mut all).await, SECRET);
    let txn = Txn::new()
        .when([Compare::value(CACHE, CompareOp::Equal, "cached")])
        .and_then([
            TxnOp::put(NODE, "n1-2", None),
            TxnOp::delete(SYNCED_OTHER, None),
            TxnOp::txn(Txn::new().and_then([TxnOp::put(CONFIG_OTHER, "cfg-c2", None)])),
        ]);
    let resp = assert_allowed(admin.txn(txn).await, "admin txn with writes");
    assert!(resp.succeeded());
    let resp = assert_allowed(
        admin.get("", Some(GetOptions::new().with_all_keys())).await,
        "admin reads every key",
    );
    assert_eq!(resp.kvs().len(), SEED.len() - 1);
    let revision = resp.header().expect("header").revision();
    assert_allowed(
        admin.lease_time_to_live(lease, None).await,
        "admin reads a TTL",
    );
    assert_allowed(admin.lease_revoke(lease).await, "admin revokes a lease");
    assert_allowed(admin.compact(revision, None).await, "admin compacts");
    assert_allowed(
        admin
            .delete("", Some(DeleteOptions::new().with_all_keys()))
            .await,
        "admin deletes everything",
    );
    assert_allowed(admin.status().await, "admin reads the status");
    s.assert_serving("admin's writes").await;
}

// ---------------------------------------------------------------------------------------------
// Connections and certificates

/// Connects with `tls` and reads a key: must fail, within the test's patience.
async fn refused_connection(s: &Secured, tls: TlsOptions, what: &str) -> String {
    let attempt = async {
        let mut c = s.connect(tls).await?;
        c.get(NODE, None).await
    };
    match tokio::time::timeout(WAIT, attempt).await {
        Err(_) => panic!("{what}: neither refused nor served within {WAIT:?}"),
        Ok(Ok(resp)) => panic!("{what}: the store answered {resp:?}"),
        Ok(Err(e)) => e.to_string(),
    }
}

async fn untrusted_certificates_are_refused(backend: Backend) {
    let s = Secured::start(backend).await;
    let ca = etcd_client::Certificate::from_pem(std::fs::read(s.pki.ca_path()).unwrap());
    let err = refused_connection(
        &s,
        TlsOptions::new().ca_certificate(ca),
        "a client without a certificate",
    )
    .await;
    eprintln!("{}: no client certificate: {err}", s.backend.name());
    // An admin CN does not help a certificate the store does not trust.
    let foreign = s.pki.foreign_client(&format!("admin-{US}"));
    let err = refused_connection(
        &s,
        s.pki.tls_options_presenting(&foreign),
        "admin-a's CN from an unknown CA",
    )
    .await;
    eprintln!("{}: unknown CA: {err}", s.backend.name());
    let expired = s.pki.expired_client(&format!("admin-{US}"));
    let err = refused_connection(
        &s,
        s.pki.tls_options_presenting(&expired),
        "an expired admin-a certificate",
    )
    .await;
    eprintln!("{}: expired certificate: {err}", s.backend.name());
    s.assert_unchanged("untrusted clients").await;
    s.assert_serving("untrusted clients").await;
}

/// Valid certificates of the store's CA whose CN names nobody this store serves: each request
/// is refused as etcd refuses it. Also what the two backends disagree on:
/// - etcd's `root` user exists (etcd needs it before it enables auth), so a certificate with
///   CN `root` is all-powerful there; the embedded store knows no `root`.
/// - etcd knows only provisioned peers: `remote-c` (not provisioned) is nobody there, while
///   the embedded store has no peer list and lets any `remote-<x>` (`x != a`) its CA trusts
///   read what peers read.
/// - etcd 3.4 answers `Status` to any certificate it trusts; ours only to known users.
async fn unknown_users_have_no_rights(backend: Backend) {
    let s = Secured::start(backend.clone()).await;
    let etcd = is_etcd(&backend);
    for cn in [
        "mallory",
        "admin-b",
        "local-b",
        "remote-a",
        "a",
        "admin-a-b",
    ] {
        let mut c = s.client(cn).await;
        get_denied(&mut c, NODE, None, &format!("{cn} reads a node")).await;
        get_denied(&mut c, "", Some(GetOptions::new().with_all_keys()), cn).await;
        let what = format!("{cn} puts");
        assert_denied(within(&what, c.put(NODE, "evil", None)).await, &what);
        let what = format!("{cn} deletes");
        assert_denied(within(&what, c.delete(NODE, None)).await, &what);
        watch_refused(
            &mut c,
            "cilium/state/",
            WatchOptions::new().with_prefix(),
            &format!("{cn} watches state"),
        )
        .await;
        let what = format!("{cn} reads the status");
        let status = within(&what, c.status()).await;
        if etcd {
            assert_allowed(status, &what);
        } else {
            assert_denied(status, &what);
        }
        let what = format!("{cn} lists alarms");
        let alarms = within(&what, c.alarm(AlarmAction::Get, AlarmType::None, None)).await;
        if etcd {
            assert_allowed(alarms, &what);
        } else {
            assert_denied(alarms, &what);
        }
    }

    let mut unprovisioned = s.client("remote-c").await;
    let what = "remote-c (not a provisioned peer) reads a node";
    let read = within(what, unprovisioned.get(NODE, None)).await;
    if etcd {
        assert_denied(read, what);
    } else {
        assert_eq!(keys(&assert_allowed(read, what)), vec![NODE]);
    }
    let what = "remote-c puts";
    assert_denied(
        within(what, unprovisioned.put(NODE, "evil", None)).await,
        what,
    );

    let mut root = s.client("root").await;
    let what = "root puts";
    let put = within(what, root.put("root-was-here", "x", None)).await;
    if etcd {
        assert_allowed(put, what);
        root.delete("root-was-here", None)
            .await
            .expect("root deletes");
    } else {
        assert_denied(put, what);
    }
    s.assert_unchanged("unknown users").await;
    s.assert_serving("unknown users").await;
}

// ---------------------------------------------------------------------------------------------
// Transactions and watches: every key a request names is checked

async fn txn_compares_are_checked(backend: Backend) {
    let s = Secured::start(backend).await;
    let mut remote = s.client(&format!("remote-{PEER}")).await;

    let cases = [
        (
            "a compare on a cached key",
            Compare::value(CACHE, CompareOp::Equal, "cached"),
        ),
        (
            "a compare on another cluster's canary",
            Compare::version(SYNCED_OTHER, CompareOp::Greater, 0),
        ),
        (
            "a compare on a key outside cilium/",
            Compare::mod_revision(SECRET, CompareOp::Greater, 0),
        ),
        (
            "a range compare reaching past state",
            Compare::version("cilium/state/", CompareOp::Greater, 0).with_range("cilium/synced/"),
        ),
    ];
    for (what, compare) in cases {
        let what = format!("remote txn with {what} and only allowed reads");
        let txn = Txn::new()
            .when([Compare::value(NODE, CompareOp::Equal, "n1"), compare])
            .and_then([TxnOp::get(NODE, None)])
            .or_else([TxnOp::get(SERVICE, None)]);
        assert_denied(within(&what, remote.txn(txn)).await, &what);
    }
    // The same shape on allowed keys passes, and a compare that fails still reads.
    let txn = Txn::new()
        .when([
            Compare::value(NODE, CompareOp::Equal, "n1"),
            Compare::version("cilium/state/", CompareOp::Greater, 0)
                .with_range(prefix_end("cilium/state/")),
            Compare::value(CONFIG_US, CompareOp::Equal, "nope"),
        ])
        .and_then([TxnOp::get(NODE, None)])
        .or_else([TxnOp::get(
            "cilium/synced/a/",
            Some(GetOptions::new().with_prefix()),
        )]);
    let resp = assert_allowed(remote.txn(txn).await, "remote txn on allowed keys");
    assert!(!resp.succeeded());
    s.assert_serving("refused compares").await;
}

/// Every op of both branches of every nested transaction is checked by the embedded store.
///
/// etcd 3.4.23 checks only the top level of a transaction: a nested transaction's compares
/// and ops are not checked at all, so a read-only user writes anything through one
/// (GHSA-rfx7-8w68-q57q, fixed in later etcd patch releases). Against etcd this asserts the
/// hole, so the test says when an upgrade closes it.
async fn nested_txn_writes_are_checked(backend: Backend) {
    let s = Secured::start(backend.clone()).await;
    let etcd = is_etcd(&backend);
    let mut remote = s.client(&format!("remote-{PEER}")).await;
    let mut admin = s.client(&format!("admin-{US}")).await;
    let true_compare = || Compare::value(NODE, CompareOp::Equal, "n1");

    let write = || TxnOp::put(NODE, "evil", None);
    let cases = [
        (
            "a nested put in the branch that runs",
            Txn::new()
                .when([true_compare()])
                .and_then([TxnOp::txn(Txn::new().and_then([write()]))]),
        ),
        (
            "a nested put in the branch that does not run",
            Txn::new()
                .when([true_compare()])
                .and_then([TxnOp::get(NODE, None)])
                .or_else([TxnOp::txn(Txn::new().and_then([write()]))]),
        ),
        (
            "a nested delete in the inner else branch",
            Txn::new().when([true_compare()]).and_then([TxnOp::txn(
                Txn::new()
                    .when([true_compare()])
                    .and_then([TxnOp::get(NODE, None)])
                    .or_else([TxnOp::delete(NODE, None)]),
            )]),
        ),
        (
            "a write two levels down",
            Txn::new().and_then([TxnOp::txn(
                Txn::new().and_then([TxnOp::txn(Txn::new().or_else([write()]))]),
            )]),
        ),
        (
            "a nested compare on the cache",
            Txn::new().and_then([TxnOp::txn(
                Txn::new()
                    .when([Compare::value(CACHE, CompareOp::Equal, "cached")])
                    .and_then([TxnOp::get(NODE, None)]),
            )]),
        ),
        (
            "a nested read of the cache",
            Txn::new().and_then([TxnOp::txn(Txn::new().and_then([TxnOp::get(CACHE, None)]))]),
        ),
    ];
    for (what, txn) in cases {
        let what = format!("remote txn with {what}");
        let result = within(&what, remote.txn(txn)).await;
        if etcd {
            assert_allowed(
                result,
                &format!("{what} (etcd 3.4 does not check nested txns)"),
            );
            let node = admin.get(NODE, None).await.expect("admin get");
            let value = node.kvs().first().map(|kv| kv.value().to_vec());
            if value.as_deref() != Some(b"n1") {
                eprintln!(
                    "etcd: remote-{PEER} changed {NODE} to {:?} through {what}; restoring",
                    value.as_deref().map(String::from_utf8_lossy)
                );
                admin.put(NODE, "n1", None).await.expect("admin restores");
            }
        } else {
            assert_denied(result, &what);
        }
    }
    if etcd {
        // The hole in one assertion: a read-only peer wrote into our store.
        let txn = Txn::new().and_then([TxnOp::txn(Txn::new().and_then([write()]))]);
        assert_allowed(remote.txn(txn).await, "etcd: nested write");
        let node = admin.get(NODE, None).await.expect("admin get");
        assert_eq!(
            node.kvs()[0].value(),
            b"evil",
            "etcd 3.4.23 applied the write"
        );
        admin.put(NODE, "n1", None).await.expect("admin restores");
    }
    // Nested reads of readable keys only: allowed by both.
    let txn = Txn::new().when([true_compare()]).and_then([TxnOp::txn(
        Txn::new()
            .when([true_compare()])
            .and_then([TxnOp::get(NODE, None)])
            .or_else([TxnOp::get(HEARTBEAT, None)]),
    )]);
    let resp = assert_allowed(remote.txn(txn).await, "remote nested read-only txn");
    assert!(resp.succeeded());
    s.assert_unchanged("nested transactions").await;
    s.assert_serving("nested transactions").await;
}

/// A watch is checked on its whole range.
///
/// etcd 3.4.23 checks a from-key watch (range end `"\0"`) on its start key only, so a watch
/// from inside an allowed prefix streams every later key of the store
/// (GHSA-xg4h-6gfc-h4m8); against etcd this asserts that hole. Ranges with an explicit end
/// are checked by both.
async fn watch_ranges_are_checked(backend: Backend) {
    let s = Secured::start(backend.clone()).await;
    let etcd = is_etcd(&backend);
    let mut remote = s.client(&format!("remote-{PEER}")).await;

    // (start key, options, what, whether etcd 3.4.23 lets it through)
    let cases = [
        (
            "cilium/state/",
            WatchOptions::new().with_from_key(),
            "from state on (range end \\0)",
            true,
        ),
        (
            "cilium/state/nodes/",
            WatchOptions::new().with_from_key(),
            "from inside state on",
            true,
        ),
        (
            "cilium/state/",
            WatchOptions::new().with_range("cilium/state1"),
            "a range one past the state prefix",
            false,
        ),
        (
            "cilium/state/",
            WatchOptions::new().with_range("cilium/synced/"),
            "from state into the canaries",
            false,
        ),
        (
            "cilium/",
            WatchOptions::new().with_prefix(),
            "all of cilium/",
            false,
        ),
        ("", WatchOptions::new().with_all_keys(), "every key", false),
        (
            CONFIG_US,
            WatchOptions::new().with_prefix(),
            "its readable key as a prefix",
            false,
        ),
    ];
    let mut leaks = Vec::new();
    for (key, opts, what, etcd_allows) in cases {
        let what = format!("remote watches {what}");
        if etcd && etcd_allows {
            leaks.push((
                what.clone(),
                watch_open(&mut remote, key, opts, &what).await,
            ));
        } else {
            watch_refused(&mut remote, key, opts, &what).await;
        }
    }

    // The exact prefix, a range inside it, and a single key are fine; the refusals above
    // did not disturb the connection.
    let mut state = watch_open(
        &mut remote,
        "cilium/state/",
        WatchOptions::new().with_range(prefix_end("cilium/state/")),
        "remote watches exactly the state prefix",
    )
    .await;
    let mut nodes = watch_open(
        &mut remote,
        "cilium/state/nodes/",
        WatchOptions::new().with_range("cilium/state/nodes0"),
        "remote watches a range inside state",
    )
    .await;
    // On one stream: a refused create leaves the stream and its other watches working.
    let mut shared = watch_open(
        &mut remote,
        "cilium/state/",
        WatchOptions::new().with_prefix(),
        "remote watches state on a shared stream",
    )
    .await;
    shared
        .watch("cilium/cache/", Some(WatchOptions::new().with_prefix()))
        .await
        .expect("send a second create");
    let refused = next_msg(&mut shared).await;
    assert!(
        refused.created()
            && refused.canceled()
            && refused.cancel_reason().contains("permission denied"),
        "a refused create on a shared stream: {refused:?}"
    );
    shared
        .watch(HEARTBEAT, None)
        .await
        .expect("send a third create");
    let created = next_msg(&mut shared).await;
    assert!(
        created.created() && !created.canceled(),
        "an allowed create after a refused one: {created:?}"
    );
    let heartbeat_id = created.watch_id();

    let mut admin = s.client(&format!("admin-{US}")).await;
    admin.put(NODE, "n1-2", None).await.expect("admin put");
    admin.put(CACHE, "cached-2", None).await.expect("admin put");
    admin.put(HEARTBEAT, "hb-2", None).await.expect("admin put");
    assert_eq!(next_event_key(&mut state).await, NODE);
    assert_eq!(next_event_key(&mut nodes).await, NODE);
    let mut got = Vec::new();
    while got.len() < 2 {
        let resp = next_msg(&mut shared).await;
        assert!(!resp.canceled(), "{resp:?}");
        for ev in resp.events() {
            let key = String::from_utf8_lossy(ev.kv().expect("kv").key()).into_owned();
            got.push((resp.watch_id() == heartbeat_id, key));
        }
    }
    assert_eq!(
        got,
        vec![(false, NODE.to_owned()), (true, HEARTBEAT.to_owned())],
        "events on the shared stream: (from the heartbeat watch, key)"
    );

    // What the etcd holes leak: another cluster's canary and a key outside cilium/.
    admin
        .put(SYNCED_OTHER, "sync-c2", None)
        .await
        .expect("admin put");
    admin.put(SECRET, "s2", None).await.expect("admin put");
    for (what, mut stream) in leaks {
        let mut got = Vec::new();
        while got.len() < 3 {
            got.push(next_event_key(&mut stream).await);
        }
        assert_eq!(
            got,
            vec![NODE, SYNCED_OTHER, SECRET],
            "etcd: {what} streams keys past the prefix"
        );
        eprintln!("etcd: {what} leaked {:?}", &got[1..]);
    }
    s.assert_serving("refused watches").await;
}

// ---------------------------------------------------------------------------------------------
// Provisioning

/// Re-running the provisioner changes nothing; more peers add users; removed peers lose every
/// right at once, even on a connection opened before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_provisioning_is_idempotent_and_removes_peers() {
    let s = Secured::start(Backend::Etcd).await;
    let admin = s.store_client(&format!("admin-{US}")).await;

    let again = provision::provision(&admin, &cluster(US), &[cluster(PEER)])
        .await
        .expect("provision again");
    assert!(
        again.is_unchanged(),
        "nothing to do the second time: {again}"
    );

    let mut remote_c = s.client("remote-c").await;
    get_denied(&mut remote_c, NODE, None, "remote-c before it is a peer").await;
    let more = provision::provision(&admin, &cluster(US), &[cluster(PEER), cluster("c")])
        .await
        .expect("provision with another peer");
    assert_eq!(more.users_created, vec!["remote-c"], "{more}");
    assert_eq!(
        more.roles_granted,
        vec![("remote-c".to_owned(), provision::REMOTE_ROLE.to_owned())]
    );
    assert!(more.roles_created.is_empty() && more.permissions_granted.is_empty());
    assert_eq!(
        get_keys(&mut remote_c, NODE, None, "remote-c once a peer").await,
        vec![NODE]
    );

    assert!(
        provision::remove_peer(&admin, &cluster(US), &cluster("c"))
            .await
            .expect("remove peer c")
    );
    get_denied(&mut remote_c, NODE, None, "remote-c after its removal").await;
    assert!(
        !provision::remove_peer(&admin, &cluster(US), &cluster("c"))
            .await
            .expect("remove peer c again"),
        "removing twice finds nothing to remove"
    );
    let mut remote_b = s.client(&format!("remote-{PEER}")).await;
    assert_eq!(
        get_keys(&mut remote_b, NODE, None, "remote-b is still a peer").await,
        vec![NODE]
    );

    // A wrong grant on a mesh role, and a wrong role on a mesh user, are undone.
    let mut auth = admin.etcd().auth_client();
    auth.role_grant_permission(
        provision::REMOTE_ROLE,
        etcd_client::Permission::read_write("cilium/").with_prefix(),
    )
    .await
    .expect("grant too much");
    auth.user_grant_role(format!("remote-{PEER}"), "root")
        .await
        .expect("grant root to remote-b");
    let fixed = provision::provision(&admin, &cluster(US), &[cluster(PEER)])
        .await
        .expect("provision repairs");
    assert_eq!(fixed.permissions_revoked.len(), 1, "{fixed}");
    assert_eq!(
        fixed.roles_revoked,
        vec![(format!("remote-{PEER}"), "root".to_owned())]
    );
    let what = "remote-b after the repair";
    assert_denied(within(what, remote_b.put(NODE, "evil", None)).await, what);

    // Another cluster's admin may not manage users once auth is on.
    let other = s.store_client("admin-b").await;
    match provision::provision(&other, &cluster("b"), &[cluster(US)]).await {
        Err(ProvisionError::NotRoot { .. }) => {}
        other => panic!("admin-b provisioning a's etcd: expected NotRoot, got {other:?}"),
    }
    s.assert_serving("re-provisioning").await;
}

/// The embedded store needs no provisioning; asking for it says so instead of half-working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_provisioning_says_it_is_not_needed() {
    let s = Secured::start(embedded_backend()).await;
    let admin = s.store_client(&format!("admin-{US}")).await;
    match provision::provision(&admin, &cluster(US), &[cluster(PEER)]).await {
        Err(ProvisionError::NoAuthApi { .. }) => {}
        other => panic!("provisioning the embedded store: expected NoAuthApi, got {other:?}"),
    }
    s.assert_serving("a provisioning attempt").await;
}
