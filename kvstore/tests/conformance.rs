//! One conformance suite, two backends.
//!
//! Every case is an `async fn(Backend)` written once; [`conformance!`] at the bottom expands it
//! into `etcd::<case>` (real etcd 3.4, the oracle) and `embedded::<case>` (our `kvstore serve`).
//! The assertions encode what etcd 3.4 actually does, including its quirks (e.g. `count` ignores
//! the revision filters, a read-only txn does not move the revision), because the whole point
//! of the embedded server is that etcd clients cannot tell the difference.
//!
//! Each case starts its own store process, so cases are independent and run in parallel.
//! `cargo test -p kvstore --test conformance etcd::` checks the suite itself against etcd.

mod common;

use std::time::Duration;

use common::*;
use etcd_client::{
    Client, CompactionOptions, Compare, CompareOp, DeleteOptions, GetOptions, LeaseGrantOptions,
    LeaseTimeToLiveOptions, PutOptions, SortOrder, SortTarget, Txn, TxnOp, TxnOpResponse,
    WatchFilterType, WatchOptions,
};
use testkit::{Backend, StoreOptions};
use tonic::Code;

const COMPACTED: &str = "etcdserver: mvcc: required revision has been compacted";
const FUTURE_REV: &str = "etcdserver: mvcc: required revision is a future revision";
const KEY_NOT_FOUND: &str = "etcdserver: key not found";
const LEASE_NOT_FOUND: &str = "etcdserver: requested lease not found";

/// Puts each `(key, value)` in order and returns their revisions.
async fn put_all(c: &mut Client, pairs: &[(&str, &str)]) -> Vec<i64> {
    let mut revs = Vec::new();
    for (k, v) in pairs {
        revs.push(put(c, *k, *v).await);
    }
    revs
}

fn txn_responses(resp: &etcd_client::TxnResponse) -> Vec<TxnOpResponse> {
    resp.op_responses()
}

fn get_resp(op: &TxnOpResponse) -> &etcd_client::GetResponse {
    match op {
        TxnOpResponse::Get(g) => g,
        other => panic!("expected a range response, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// KV: Put and revisions
// ---------------------------------------------------------------------------------------------

async fn status_reports_revision_and_version(b: Backend) {
    let (_s, mut c) = start(b).await;
    let status = c.status().await.expect("status");
    // A fresh store is at revision 1: etcd's first write gets revision 2.
    assert_eq!(rev(status.header()), 1);
    let v = status.version();
    let parts: Vec<&str> = v.split('.').collect();
    assert!(
        parts.len() >= 3 && parts.iter().take(3).all(|p| p.parse::<u32>().is_ok()),
        "version {v:?} is not a semver-like string"
    );
    let r = put(&mut c, "a", "1").await;
    assert_eq!(r, 2);
    let status = c.status().await.expect("status");
    assert_eq!(rev(status.header()), r);
}

async fn revisions_are_global_and_strictly_increasing(b: Backend) {
    let (_s, mut c) = start(b).await;
    let r1 = put(&mut c, "a", "1").await;
    let r2 = put(&mut c, "b", "1").await;
    let r3 = put(&mut c, "a", "2").await;
    let r4 = put(&mut c, "c", "1").await;
    assert_eq!(
        [r2, r3, r4],
        [r1 + 1, r1 + 2, r1 + 3],
        "one global revision"
    );
    let got = c
        .get("a", Some(GetOptions::new().with_range("d")))
        .await
        .unwrap();
    assert_eq!(rev(got.header()), r4, "reads report the current revision");
    assert_eq!(
        kvs(got.kvs()),
        vec![
            Kv::new("a", "2", r1, r3, 2),
            Kv::new("b", "1", r2, r2, 1),
            Kv::new("c", "1", r4, r4, 1),
        ]
    );
}

async fn version_resets_after_delete(b: Backend) {
    let (_s, mut c) = start(b).await;
    let r1 = put(&mut c, "k", "1").await;
    put(&mut c, "k", "2").await;
    let r3 = put(&mut c, "k", "3").await;
    let got = c.get("k", None).await.unwrap();
    assert_eq!(kvs(got.kvs()), vec![Kv::new("k", "3", r1, r3, 3)]);
    let del = c.delete("k", None).await.unwrap();
    assert_eq!(del.deleted(), 1);
    assert_eq!(rev(del.header()), r3 + 1);
    let got = c.get("k", None).await.unwrap();
    assert!(got.kvs().is_empty());
    assert_eq!(got.count(), 0);
    let r5 = put(&mut c, "k", "again").await;
    assert_eq!(r5, r3 + 2);
    let got = c.get("k", None).await.unwrap();
    assert_eq!(kvs(got.kvs()), vec![Kv::new("k", "again", r5, r5, 1)]);
}

async fn put_prev_kv(b: Backend) {
    let (_s, mut c) = start(b).await;
    let first = c
        .put("k", "v1", Some(PutOptions::new().with_prev_key()))
        .await
        .unwrap();
    assert!(first.prev_key().is_none(), "no prev_kv for a new key");
    let r1 = rev(first.header());
    let second = c
        .put("k", "v2", Some(PutOptions::new().with_prev_key()))
        .await
        .unwrap();
    let r2 = rev(second.header());
    assert_eq!(r2, r1 + 1);
    assert_eq!(
        second.prev_key().map(kv),
        Some(Kv::new("k", "v1", r1, r1, 1))
    );
    let third = c.put("k", "v3", None).await.unwrap();
    assert!(third.prev_key().is_none(), "prev_kv only when asked");
    c.delete("k", None).await.unwrap();
    let again = c
        .put("k", "v4", Some(PutOptions::new().with_prev_key()))
        .await
        .unwrap();
    assert!(again.prev_key().is_none(), "no prev_kv after a delete");
}

async fn put_ignore_value(b: Backend) {
    let (_s, mut c) = start(b).await;
    let r1 = put(&mut c, "k", "keep").await;
    let resp = c
        .put("k", "", Some(PutOptions::new().with_ignore_value()))
        .await
        .unwrap();
    let r2 = rev(resp.header());
    assert_eq!(r2, r1 + 1, "ignore_value still writes a new revision");
    let got = c.get("k", None).await.unwrap();
    assert_eq!(kvs(got.kvs()), vec![Kv::new("k", "keep", r1, r2, 2)]);

    assert_grpc_err(
        c.put("k", "x", Some(PutOptions::new().with_ignore_value()))
            .await,
        Code::InvalidArgument,
        "etcdserver: value is provided",
    );
    assert_grpc_err(
        c.put("missing", "", Some(PutOptions::new().with_ignore_value()))
            .await,
        Code::InvalidArgument,
        KEY_NOT_FOUND,
    );
    assert_eq!(current_rev(&mut c).await, r2, "failed puts write nothing");
}

async fn put_ignore_lease(b: Backend) {
    let (_s, mut c) = start(b).await;
    let lease = c.lease_grant(60, None).await.unwrap().id();
    let r1 = c
        .put("k", "v1", Some(PutOptions::new().with_lease(lease)))
        .await
        .unwrap();
    let r1 = rev(r1.header());
    let resp = c
        .put("k", "v2", Some(PutOptions::new().with_ignore_lease()))
        .await
        .unwrap();
    let r2 = rev(resp.header());
    let got = c.get("k", None).await.unwrap();
    assert_eq!(
        kvs(got.kvs()),
        vec![Kv::new("k", "v2", r1, r2, 2).leased(lease)],
        "ignore_lease keeps the attached lease"
    );
    assert_grpc_err(
        c.put(
            "k",
            "v3",
            Some(PutOptions::new().with_ignore_lease().with_lease(lease)),
        )
        .await,
        Code::InvalidArgument,
        "etcdserver: lease is provided",
    );
    assert_grpc_err(
        c.put("missing", "v", Some(PutOptions::new().with_ignore_lease()))
            .await,
        Code::InvalidArgument,
        KEY_NOT_FOUND,
    );
    // A plain put detaches the key from its lease.
    let r3 = put(&mut c, "k", "v3").await;
    let got = c.get("k", None).await.unwrap();
    assert_eq!(kvs(got.kvs()), vec![Kv::new("k", "v3", r1, r3, 3)]);
    let ttl = c
        .lease_time_to_live(lease, Some(LeaseTimeToLiveOptions::new().with_keys()))
        .await
        .unwrap();
    assert!(ttl.keys().is_empty(), "{:?}", ttl.keys());
}

async fn empty_key_is_rejected(b: Backend) {
    let (_s, mut c) = start(b).await;
    put(&mut c, "a", "1").await;
    let msg = "etcdserver: key is not provided";
    assert_grpc_err(c.get("", None).await, Code::InvalidArgument, msg);
    assert_grpc_err(c.put("", "v", None).await, Code::InvalidArgument, msg);
    assert_grpc_err(c.delete("", None).await, Code::InvalidArgument, msg);
    assert_grpc_err(
        c.txn(Txn::new().and_then([TxnOp::put("", "v", None)]))
            .await,
        Code::InvalidArgument,
        msg,
    );
}

// ---------------------------------------------------------------------------------------------
// KV: Range
// ---------------------------------------------------------------------------------------------

async fn range_single_and_missing_key(b: Backend) {
    let (_s, mut c) = start(b).await;
    let revs = put_all(&mut c, &[("a", "1"), ("ab", "2")]).await;
    let got = c.get("a", None).await.unwrap();
    assert_eq!(kvs(got.kvs()), vec![Kv::new("a", "1", revs[0], revs[0], 1)]);
    assert_eq!(got.count(), 1);
    assert!(!got.more());
    let missing = c.get("nope", None).await.unwrap();
    assert!(missing.kvs().is_empty());
    assert_eq!(missing.count(), 0);
    assert_eq!(rev(missing.header()), revs[1]);
}

async fn range_prefix(b: Backend) {
    let (_s, mut c) = start(b).await;
    put_all(
        &mut c,
        &[
            ("b", "x"),
            ("a/2", "x"),
            ("a", "x"),
            ("a/1", "x"),
            ("ab", "x"),
            ("`", "x"),
        ],
    )
    .await;
    let got = c
        .get("a", Some(GetOptions::new().with_prefix()))
        .await
        .unwrap();
    assert_eq!(keys(got.kvs()), ["a", "a/1", "a/2", "ab"], "sorted by key");
    assert_eq!(got.count(), 4);
    let got = c
        .get("a/", Some(GetOptions::new().with_prefix()))
        .await
        .unwrap();
    assert_eq!(keys(got.kvs()), ["a/1", "a/2"]);
}

async fn range_explicit_end_is_half_open(b: Backend) {
    let (_s, mut c) = start(b).await;
    put_all(&mut c, &[("a", "x"), ("b", "x"), ("c", "x"), ("d", "x")]).await;
    let got = c
        .get("b", Some(GetOptions::new().with_range("d")))
        .await
        .unwrap();
    assert_eq!(keys(got.kvs()), ["b", "c"]);
    let got = c
        .get("a", Some(GetOptions::new().with_range("a\0")))
        .await
        .unwrap();
    assert_eq!(keys(got.kvs()), ["a"]);
}

async fn range_from_key_with_nul_end(b: Backend) {
    let (_s, mut c) = start(b).await;
    put_all(
        &mut c,
        &[("a", "x"), ("b", "x"), ("c", "x"), ("\u{7f}z", "x")],
    )
    .await;
    let got = c
        .get("b", Some(GetOptions::new().with_range(vec![0u8])))
        .await
        .unwrap();
    assert_eq!(keys(got.kvs()), ["b", "c", "\\x7fz"]);
    assert_eq!(got.count(), 3);
    let got = c
        .get("b", Some(GetOptions::new().with_from_key()))
        .await
        .unwrap();
    assert_eq!(keys(got.kvs()), ["b", "c", "\\x7fz"]);
}

async fn range_all_keys(b: Backend) {
    let (_s, mut c) = start(b).await;
    put(&mut c, "b", "x").await;
    put(&mut c, b"\0".to_vec(), "x").await;
    put(&mut c, b"\0\0".to_vec(), "x").await;
    put(&mut c, "a", "x").await;
    put(&mut c, b"\xff".to_vec(), "x").await;
    let got = c
        .get(vec![0u8], Some(GetOptions::new().with_range(vec![0u8])))
        .await
        .unwrap();
    assert_eq!(
        keys(got.kvs()),
        ["\\x00", "\\x00\\x00", "a", "b", "\\xff"],
        "key \\0 with range_end \\0 is every key"
    );
    let got = c
        .get("", Some(GetOptions::new().with_all_keys()))
        .await
        .unwrap();
    assert_eq!(got.count(), 5);
}

async fn range_inverted_returns_nothing(b: Backend) {
    let (_s, mut c) = start(b).await;
    let revs = put_all(&mut c, &[("a", "x"), ("b", "x"), ("c", "x")]).await;
    let got = c
        .get("c", Some(GetOptions::new().with_range("a")))
        .await
        .unwrap();
    assert!(got.kvs().is_empty(), "{:?}", keys(got.kvs()));
    assert_eq!(got.count(), 0);
    // range_end == key is an empty interval too.
    let got = c
        .get("b", Some(GetOptions::new().with_range("b")))
        .await
        .unwrap();
    assert!(got.kvs().is_empty(), "{:?}", keys(got.kvs()));
    let del = c
        .delete("c", Some(DeleteOptions::new().with_range("a")))
        .await
        .unwrap();
    assert_eq!(del.deleted(), 0);
    assert_eq!(rev(del.header()), revs[2]);
    let all = c
        .get("", Some(GetOptions::new().with_all_keys()))
        .await
        .unwrap();
    assert_eq!(all.count(), 3);
}

async fn keys_with_nul_and_ff_bytes(b: Backend) {
    let (_s, mut c) = start(b).await;
    let entries: [&[u8]; 7] = [
        b"k\xff\xff",
        b"k\0a",
        b"k",
        b"k\xff",
        b"k\0",
        b"k\x01",
        b"j\xff",
    ];
    for k in entries {
        let mut v = b"v\0".to_vec();
        v.extend_from_slice(k);
        put(&mut c, k.to_vec(), v).await;
    }
    let got = c
        .get("k", Some(GetOptions::new().with_prefix()))
        .await
        .unwrap();
    assert_eq!(
        keys(got.kvs()),
        ["k", "k\\x00", "k\\x00a", "k\\x01", "k\\xff", "k\\xff\\xff"],
        "binary keys in byte order"
    );
    let one = c.get(b"k\0".to_vec(), None).await.unwrap();
    assert_eq!(keys(one.kvs()), ["k\\x00"]);
    assert_eq!(one.kvs()[0].value(), b"v\0k\0", "binary values round-trip");
    let one = c.get(b"k\xff".to_vec(), None).await.unwrap();
    assert_eq!(keys(one.kvs()), ["k\\xff"]);
}

async fn prefix_of_ff_bytes(b: Backend) {
    let (_s, mut c) = start(b).await;
    for k in [
        &b"\xfe"[..],
        b"\xff",
        b"\xff\x00",
        b"\xff\xff",
        b"a\xff",
        b"a\xff\x01",
        b"b",
    ] {
        put(&mut c, k.to_vec(), "x").await;
    }
    // The prefix end of "\xff" does not exist; etcd clients send range_end "\0" (from-key).
    let got = c
        .get(b"\xff".to_vec(), Some(GetOptions::new().with_prefix()))
        .await
        .unwrap();
    assert_eq!(keys(got.kvs()), ["\\xff", "\\xff\\x00", "\\xff\\xff"]);
    let got = c
        .get(b"\xff\xff".to_vec(), Some(GetOptions::new().with_prefix()))
        .await
        .unwrap();
    assert_eq!(keys(got.kvs()), ["\\xff\\xff"]);
    // "a\xff" -> range_end "b": the trailing 0xff is dropped and the byte before incremented.
    let got = c
        .get(b"a\xff".to_vec(), Some(GetOptions::new().with_prefix()))
        .await
        .unwrap();
    assert_eq!(keys(got.kvs()), ["a\\xff", "a\\xff\\x01"]);
}

async fn range_limit_more_count(b: Backend) {
    let (_s, mut c) = start(b).await;
    put_all(
        &mut c,
        &[
            ("p/1", "x"),
            ("p/2", "x"),
            ("p/3", "x"),
            ("p/4", "x"),
            ("p/5", "x"),
        ],
    )
    .await;
    let prefix = || GetOptions::new().with_prefix();
    let got = c.get("p/", Some(prefix().with_limit(2))).await.unwrap();
    assert_eq!(keys(got.kvs()), ["p/1", "p/2"]);
    assert!(got.more());
    assert_eq!(got.count(), 5, "count is the whole range, not the page");
    let got = c.get("p/", Some(prefix().with_limit(5))).await.unwrap();
    assert_eq!(got.kvs().len(), 5);
    assert!(!got.more());
    let got = c.get("p/", Some(prefix().with_limit(50))).await.unwrap();
    assert_eq!(got.kvs().len(), 5);
    assert!(!got.more());
    assert_eq!(got.count(), 5);
    let got = c.get("p/3", Some(prefix().with_limit(1))).await.unwrap();
    assert_eq!(keys(got.kvs()), ["p/3"]);
    assert!(!got.more());
}

async fn range_count_only_and_keys_only(b: Backend) {
    let (_s, mut c) = start(b).await;
    let revs = put_all(&mut c, &[("p/1", "one"), ("p/2", "two"), ("p/3", "three")]).await;
    let got = c
        .get(
            "p/",
            Some(GetOptions::new().with_prefix().with_count_only()),
        )
        .await
        .unwrap();
    assert!(got.kvs().is_empty());
    assert_eq!(got.count(), 3);
    assert!(!got.more());
    let got = c
        .get(
            "p/",
            Some(
                GetOptions::new()
                    .with_prefix()
                    .with_count_only()
                    .with_limit(1),
            ),
        )
        .await
        .unwrap();
    assert!(got.kvs().is_empty());
    assert_eq!(got.count(), 3);
    assert!(!got.more());

    let got = c
        .get("p/", Some(GetOptions::new().with_prefix().with_keys_only()))
        .await
        .unwrap();
    assert_eq!(
        kvs(got.kvs()),
        vec![
            Kv::new("p/1", "", revs[0], revs[0], 1),
            Kv::new("p/2", "", revs[1], revs[1], 1),
            Kv::new("p/3", "", revs[2], revs[2], 1),
        ],
        "keys_only drops only the value"
    );
}

async fn range_historical_revisions(b: Backend) {
    let (_s, mut c) = start(b).await;
    let r1 = put(&mut c, "k", "v1").await;
    let r2 = put(&mut c, "k", "v2").await;
    let r3 = rev(c.delete("k", None).await.unwrap().header());
    let r4 = put(&mut c, "other", "x").await;
    let r5 = put(&mut c, "k", "v3").await;
    let at = |r: i64| Some(GetOptions::new().with_revision(r));

    let got = c.get("k", at(r1)).await.unwrap();
    assert_eq!(kvs(got.kvs()), vec![Kv::new("k", "v1", r1, r1, 1)]);
    assert_eq!(rev(got.header()), r5, "header carries the current revision");
    let got = c.get("k", at(r2)).await.unwrap();
    assert_eq!(kvs(got.kvs()), vec![Kv::new("k", "v2", r1, r2, 2)]);
    let got = c.get("k", at(r3)).await.unwrap();
    assert!(got.kvs().is_empty(), "deleted at r3");
    let got = c.get("k", at(r4)).await.unwrap();
    assert!(got.kvs().is_empty());
    let got = c.get("k", at(r5)).await.unwrap();
    assert_eq!(kvs(got.kvs()), vec![Kv::new("k", "v3", r5, r5, 1)]);
    let got = c
        .get(
            "",
            Some(GetOptions::new().with_all_keys().with_revision(r2)),
        )
        .await
        .unwrap();
    assert_eq!(keys(got.kvs()), ["k"]);
    let got = c
        .get(
            "",
            Some(GetOptions::new().with_all_keys().with_revision(r4)),
        )
        .await
        .unwrap();
    assert_eq!(keys(got.kvs()), ["other"]);
    assert_eq!(got.count(), 1, "count is taken at the requested revision");
    // Revision 1 is the empty initial state.
    let got = c
        .get("", Some(GetOptions::new().with_all_keys().with_revision(1)))
        .await
        .unwrap();
    assert!(got.kvs().is_empty());
}

async fn range_future_revision_errors(b: Backend) {
    let (_s, mut c) = start(b).await;
    let r = put(&mut c, "k", "v").await;
    assert_grpc_err(
        c.get("k", Some(GetOptions::new().with_revision(r + 1)))
            .await,
        Code::OutOfRange,
        FUTURE_REV,
    );
    // Current revision is fine.
    let got = c
        .get("k", Some(GetOptions::new().with_revision(r)))
        .await
        .unwrap();
    assert_eq!(got.kvs().len(), 1);
}

async fn range_compacted_revision_errors(b: Backend) {
    let (_s, mut c) = start(b).await;
    let r1 = put(&mut c, "k", "v1").await;
    let r2 = put(&mut c, "k", "v2").await;
    let r3 = put(&mut c, "k", "v3").await;
    c.compact(r2, None).await.unwrap();
    assert_grpc_err(
        c.get("k", Some(GetOptions::new().with_revision(r1))).await,
        Code::OutOfRange,
        COMPACTED,
    );
    let got = c
        .get("k", Some(GetOptions::new().with_revision(r2)))
        .await
        .unwrap();
    assert_eq!(
        kvs(got.kvs()),
        vec![Kv::new("k", "v2", r1, r2, 2)],
        "the compaction revision itself stays readable"
    );
    let got = c.get("k", None).await.unwrap();
    assert_eq!(kvs(got.kvs()), vec![Kv::new("k", "v3", r1, r3, 3)]);
}

/// Keys whose every sort target orders differently: k1 is oldest, k3 has most versions, k2 the
/// largest value, k4 the newest mod revision.
async fn sort_fixture(c: &mut Client) {
    put(c, "s/k1", "b").await; // k1 created first
    put(c, "s/k3", "a").await;
    put(c, "s/k2", "d").await;
    put(c, "s/k3", "a").await;
    put(c, "s/k3", "c").await; // k3: version 3
    put(c, "s/k4", "0").await;
    put(c, "s/k2", "d").await; // k2: version 2
    put(c, "s/k1", "e").await; // k1: mod after k4's create
}
// create order: k1, k3, k2, k4      mod order: k3, k4, k2, k1
// version: k1=2, k2=2, k3=3, k4=1   value: k4="0" < k3="c" < k2="d" < k1="e"

async fn sorted(c: &mut Client, target: SortTarget, order: SortOrder) -> Vec<String> {
    let got = c
        .get(
            "s/",
            Some(GetOptions::new().with_prefix().with_sort(target, order)),
        )
        .await
        .unwrap();
    assert_eq!(got.count(), 4);
    keys(got.kvs())
}

async fn range_sort_by_key(b: Backend) {
    let (_s, mut c) = start(b).await;
    sort_fixture(&mut c).await;
    let t = SortTarget::Key;
    assert_eq!(
        sorted(&mut c, t, SortOrder::Ascend).await,
        ["s/k1", "s/k2", "s/k3", "s/k4"]
    );
    assert_eq!(
        sorted(&mut c, t, SortOrder::Descend).await,
        ["s/k4", "s/k3", "s/k2", "s/k1"]
    );
}

async fn range_sort_by_create_and_mod_revision(b: Backend) {
    let (_s, mut c) = start(b).await;
    sort_fixture(&mut c).await;
    assert_eq!(
        sorted(&mut c, SortTarget::Create, SortOrder::Ascend).await,
        ["s/k1", "s/k3", "s/k2", "s/k4"]
    );
    assert_eq!(
        sorted(&mut c, SortTarget::Create, SortOrder::Descend).await,
        ["s/k4", "s/k2", "s/k3", "s/k1"]
    );
    assert_eq!(
        sorted(&mut c, SortTarget::Mod, SortOrder::Ascend).await,
        ["s/k3", "s/k4", "s/k2", "s/k1"]
    );
    assert_eq!(
        sorted(&mut c, SortTarget::Mod, SortOrder::Descend).await,
        ["s/k1", "s/k2", "s/k4", "s/k3"]
    );
    // sort_order NONE with a non-key target means ascending.
    assert_eq!(
        sorted(&mut c, SortTarget::Mod, SortOrder::None).await,
        ["s/k3", "s/k4", "s/k2", "s/k1"]
    );
}

async fn range_sort_by_version(b: Backend) {
    let (_s, mut c) = start(b).await;
    sort_fixture(&mut c).await;
    // Make the versions distinct: k4=1, k2=2, k1=3, k3=4.
    put(&mut c, "s/k1", "e").await;
    put(&mut c, "s/k3", "c").await;
    assert_eq!(
        sorted(&mut c, SortTarget::Version, SortOrder::Ascend).await,
        ["s/k4", "s/k2", "s/k1", "s/k3"]
    );
    assert_eq!(
        sorted(&mut c, SortTarget::Version, SortOrder::Descend).await,
        ["s/k3", "s/k1", "s/k2", "s/k4"]
    );
}

async fn range_sort_by_value(b: Backend) {
    let (_s, mut c) = start(b).await;
    sort_fixture(&mut c).await;
    assert_eq!(
        sorted(&mut c, SortTarget::Value, SortOrder::Ascend).await,
        ["s/k4", "s/k3", "s/k2", "s/k1"]
    );
    assert_eq!(
        sorted(&mut c, SortTarget::Value, SortOrder::Descend).await,
        ["s/k1", "s/k2", "s/k3", "s/k4"]
    );
    assert_eq!(
        sorted(&mut c, SortTarget::Value, SortOrder::None).await,
        ["s/k4", "s/k3", "s/k2", "s/k1"]
    );
}

async fn range_sort_applies_before_limit(b: Backend) {
    let (_s, mut c) = start(b).await;
    sort_fixture(&mut c).await;
    let got = c
        .get(
            "s/",
            Some(
                GetOptions::new()
                    .with_prefix()
                    .with_sort(SortTarget::Value, SortOrder::Descend)
                    .with_limit(2),
            ),
        )
        .await
        .unwrap();
    assert_eq!(keys(got.kvs()), ["s/k1", "s/k2"], "top two by value");
    assert!(got.more());
    assert_eq!(got.count(), 4);
    let got = c
        .get(
            "s/",
            Some(
                GetOptions::new()
                    .with_prefix()
                    .with_sort(SortTarget::Key, SortOrder::Descend)
                    .with_limit(1),
            ),
        )
        .await
        .unwrap();
    assert_eq!(keys(got.kvs()), ["s/k4"], "last key, not the first");
    assert!(got.more());
}

async fn range_min_max_revision_filters(b: Backend) {
    let (_s, mut c) = start(b).await;
    let r1 = put(&mut c, "f/a", "1").await;
    let r2 = put(&mut c, "f/b", "1").await;
    let r3 = put(&mut c, "f/c", "1").await;
    let r4 = put(&mut c, "f/a", "2").await; // a: create r1, mod r4
    let r5 = put(&mut c, "f/d", "1").await;
    let q = |o: GetOptions| Some(o.with_prefix());

    let got = c
        .get("f/", q(GetOptions::new().with_min_mod_revision(r3)))
        .await
        .unwrap();
    assert_eq!(keys(got.kvs()), ["f/a", "f/c", "f/d"]);
    assert_eq!(got.count(), 4, "count is taken before the filters");
    let got = c
        .get("f/", q(GetOptions::new().with_max_mod_revision(r3)))
        .await
        .unwrap();
    assert_eq!(keys(got.kvs()), ["f/b", "f/c"]);
    let got = c
        .get("f/", q(GetOptions::new().with_min_create_revision(r2)))
        .await
        .unwrap();
    assert_eq!(keys(got.kvs()), ["f/b", "f/c", "f/d"]);
    let got = c
        .get("f/", q(GetOptions::new().with_max_create_revision(r2)))
        .await
        .unwrap();
    assert_eq!(keys(got.kvs()), ["f/a", "f/b"]);
    let got = c
        .get(
            "f/",
            q(GetOptions::new()
                .with_min_create_revision(r2)
                .with_max_mod_revision(r4)),
        )
        .await
        .unwrap();
    assert_eq!(keys(got.kvs()), ["f/b", "f/c"]);
    let got = c
        .get(
            "f/",
            q(GetOptions::new().with_min_mod_revision(r1).with_limit(2)),
        )
        .await
        .unwrap();
    assert_eq!(keys(got.kvs()), ["f/a", "f/b"]);
    assert!(got.more());
    let got = c
        .get("f/", q(GetOptions::new().with_min_mod_revision(r5 + 1)))
        .await
        .unwrap();
    assert!(got.kvs().is_empty());
    assert_eq!(got.count(), 4);
}

// ---------------------------------------------------------------------------------------------
// KV: DeleteRange
// ---------------------------------------------------------------------------------------------

async fn delete_single_key(b: Backend) {
    let (_s, mut c) = start(b).await;
    let revs = put_all(&mut c, &[("a", "1"), ("ab", "2")]).await;
    let del = c.delete("a", None).await.unwrap();
    assert_eq!(del.deleted(), 1);
    assert!(del.prev_kvs().is_empty(), "prev_kvs only when asked");
    assert_eq!(rev(del.header()), revs[1] + 1);
    let all = c
        .get("", Some(GetOptions::new().with_all_keys()))
        .await
        .unwrap();
    assert_eq!(keys(all.kvs()), ["ab"]);
}

async fn delete_prefix_with_prev_kv(b: Backend) {
    let (_s, mut c) = start(b).await;
    let revs = put_all(
        &mut c,
        &[("p/b", "2"), ("p/a", "1"), ("q", "3"), ("p/a", "1b")],
    )
    .await;
    let del = c
        .delete(
            "p/",
            Some(DeleteOptions::new().with_prefix().with_prev_key()),
        )
        .await
        .unwrap();
    assert_eq!(del.deleted(), 2);
    let dr = rev(del.header());
    assert_eq!(dr, revs[3] + 1, "one revision for the whole range");
    assert_eq!(
        kvs(del.prev_kvs()),
        vec![
            Kv::new("p/a", "1b", revs[1], revs[3], 2),
            Kv::new("p/b", "2", revs[0], revs[0], 1),
        ]
    );
    let before = c
        .get(
            "p/",
            Some(GetOptions::new().with_prefix().with_revision(dr - 1)),
        )
        .await
        .unwrap();
    assert_eq!(before.count(), 2);
    let after = c
        .get(
            "p/",
            Some(GetOptions::new().with_prefix().with_revision(dr)),
        )
        .await
        .unwrap();
    assert_eq!(after.count(), 0);
    assert_eq!(put(&mut c, "z", "z").await, dr + 1);
}

async fn delete_from_key(b: Backend) {
    let (_s, mut c) = start(b).await;
    put_all(&mut c, &[("a", "x"), ("b", "x"), ("c", "x"), ("bb", "x")]).await;
    let del = c
        .delete("b", Some(DeleteOptions::new().with_from_key()))
        .await
        .unwrap();
    assert_eq!(del.deleted(), 3);
    let all = c
        .get("", Some(GetOptions::new().with_all_keys()))
        .await
        .unwrap();
    assert_eq!(keys(all.kvs()), ["a"]);
}

async fn delete_nothing_keeps_revision(b: Backend) {
    let (_s, mut c) = start(b).await;
    let r = put(&mut c, "a", "x").await;
    let del = c
        .delete("missing", Some(DeleteOptions::new().with_prev_key()))
        .await
        .unwrap();
    assert_eq!(del.deleted(), 0);
    assert!(del.prev_kvs().is_empty());
    assert_eq!(rev(del.header()), r);
    let del = c
        .delete("zz/", Some(DeleteOptions::new().with_prefix()))
        .await
        .unwrap();
    assert_eq!(del.deleted(), 0);
    assert_eq!(rev(del.header()), r);
    assert_eq!(current_rev(&mut c).await, r);
    assert_eq!(
        put(&mut c, "b", "x").await,
        r + 1,
        "no revision was skipped"
    );
}

// ---------------------------------------------------------------------------------------------
// Txn
// ---------------------------------------------------------------------------------------------

/// Runs a txn with one compare and empty branches; returns whether it succeeded.
async fn holds(c: &mut Client, cmp: Compare) -> bool {
    c.txn(Txn::new().when([cmp]))
        .await
        .expect("txn")
        .succeeded()
}

async fn txn_compare_value(b: Backend) {
    let (_s, mut c) = start(b).await;
    put(&mut c, "k", "m").await;
    use CompareOp::*;
    assert!(holds(&mut c, Compare::value("k", Equal, "m")).await);
    assert!(!holds(&mut c, Compare::value("k", Equal, "n")).await);
    assert!(holds(&mut c, Compare::value("k", NotEqual, "n")).await);
    assert!(!holds(&mut c, Compare::value("k", NotEqual, "m")).await);
    assert!(holds(&mut c, Compare::value("k", Greater, "l")).await);
    assert!(holds(&mut c, Compare::value("k", Greater, "")).await);
    assert!(!holds(&mut c, Compare::value("k", Greater, "m")).await);
    assert!(!holds(&mut c, Compare::value("k", Greater, "ma")).await);
    assert!(holds(&mut c, Compare::value("k", Less, "ma")).await);
    assert!(holds(&mut c, Compare::value("k", Less, "n")).await);
    assert!(!holds(&mut c, Compare::value("k", Less, "m")).await);
    // Bytes compare unsigned.
    put(&mut c, "bin", b"\x80".to_vec()).await;
    assert!(holds(&mut c, Compare::value("bin", Greater, "\x7f")).await);
}

async fn txn_compare_version(b: Backend) {
    let (_s, mut c) = start(b).await;
    put(&mut c, "k", "1").await;
    put(&mut c, "k", "2").await;
    use CompareOp::*;
    assert!(holds(&mut c, Compare::version("k", Equal, 2)).await);
    assert!(!holds(&mut c, Compare::version("k", Equal, 1)).await);
    assert!(holds(&mut c, Compare::version("k", NotEqual, 1)).await);
    assert!(holds(&mut c, Compare::version("k", Greater, 1)).await);
    assert!(!holds(&mut c, Compare::version("k", Greater, 2)).await);
    assert!(holds(&mut c, Compare::version("k", Less, 3)).await);
    assert!(!holds(&mut c, Compare::version("k", Less, 2)).await);
}

async fn txn_compare_create_and_mod_revision(b: Backend) {
    let (_s, mut c) = start(b).await;
    let r1 = put(&mut c, "k", "1").await;
    let r2 = put(&mut c, "k", "2").await;
    use CompareOp::*;
    assert!(holds(&mut c, Compare::create_revision("k", Equal, r1)).await);
    assert!(!holds(&mut c, Compare::create_revision("k", Equal, r2)).await);
    assert!(holds(&mut c, Compare::create_revision("k", Less, r2)).await);
    assert!(holds(&mut c, Compare::create_revision("k", Greater, r1 - 1)).await);
    assert!(holds(&mut c, Compare::create_revision("k", NotEqual, r2)).await);
    assert!(holds(&mut c, Compare::mod_revision("k", Equal, r2)).await);
    assert!(!holds(&mut c, Compare::mod_revision("k", Equal, r1)).await);
    assert!(holds(&mut c, Compare::mod_revision("k", Greater, r1)).await);
    assert!(!holds(&mut c, Compare::mod_revision("k", Greater, r2)).await);
    assert!(holds(&mut c, Compare::mod_revision("k", Less, r2 + 1)).await);
    assert!(!holds(&mut c, Compare::mod_revision("k", NotEqual, r2)).await);
}

async fn txn_compare_lease(b: Backend) {
    let (_s, mut c) = start(b).await;
    let lease = c
        .lease_grant(60, Some(LeaseGrantOptions::new().with_id(1000)))
        .await
        .unwrap()
        .id();
    assert_eq!(lease, 1000);
    c.put("leased", "x", Some(PutOptions::new().with_lease(lease)))
        .await
        .unwrap();
    put(&mut c, "plain", "x").await;
    use CompareOp::*;
    assert!(holds(&mut c, Compare::lease("leased", Equal, 1000)).await);
    assert!(!holds(&mut c, Compare::lease("leased", Equal, 0)).await);
    assert!(holds(&mut c, Compare::lease("leased", Greater, 999)).await);
    assert!(holds(&mut c, Compare::lease("leased", Less, 1001)).await);
    assert!(holds(&mut c, Compare::lease("leased", NotEqual, 1)).await);
    assert!(holds(&mut c, Compare::lease("plain", Equal, 0)).await);
    assert!(!holds(&mut c, Compare::lease("plain", Greater, 0)).await);
}

async fn txn_compare_missing_key(b: Backend) {
    let (_s, mut c) = start(b).await;
    put(&mut c, "present", "x").await;
    use CompareOp::*;
    // A missing key compares as a zero KeyValue...
    assert!(holds(&mut c, Compare::version("missing", Equal, 0)).await);
    assert!(holds(&mut c, Compare::create_revision("missing", Equal, 0)).await);
    assert!(holds(&mut c, Compare::mod_revision("missing", Equal, 0)).await);
    assert!(holds(&mut c, Compare::lease("missing", Equal, 0)).await);
    assert!(!holds(&mut c, Compare::version("missing", Greater, 0)).await);
    assert!(holds(&mut c, Compare::version("missing", Less, 1)).await);
    // ...except for value compares, which are always false on a missing key.
    assert!(!holds(&mut c, Compare::value("missing", Equal, "")).await);
    assert!(!holds(&mut c, Compare::value("missing", NotEqual, "x")).await);
    assert!(!holds(&mut c, Compare::value("missing", Less, "z")).await);
    // The classic create-if-absent.
    let resp = c
        .txn(
            Txn::new()
                .when([Compare::create_revision("new", Equal, 0)])
                .and_then([TxnOp::put("new", "1", None)]),
        )
        .await
        .unwrap();
    assert!(resp.succeeded());
    assert!(!holds(&mut c, Compare::create_revision("new", Equal, 0)).await);
}

async fn txn_compare_with_range(b: Backend) {
    let (_s, mut c) = start(b).await;
    put_all(&mut c, &[("r/a", "1"), ("r/b", "1"), ("s", "9")]).await;
    use CompareOp::*;
    let every = |cmp: Compare| cmp.with_prefix();
    assert!(holds(&mut c, every(Compare::version("r/", Equal, 1))).await);
    assert!(holds(&mut c, every(Compare::value("r/", Equal, "1"))).await);
    put(&mut c, "r/b", "2").await;
    assert!(
        !holds(&mut c, every(Compare::version("r/", Equal, 1))).await,
        "every key in the range must satisfy the compare"
    );
    assert!(holds(&mut c, every(Compare::version("r/", Greater, 0))).await);
    assert!(!holds(&mut c, every(Compare::value("r/", Equal, "1"))).await);
    assert!(
        holds(&mut c, Compare::value("r/a", Equal, "1").with_range("r/b")).await,
        "range_end is exclusive"
    );
    // An empty range behaves like a missing key.
    assert!(holds(&mut c, every(Compare::version("none/", Equal, 0))).await);
    assert!(!holds(&mut c, every(Compare::value("none/", Equal, ""))).await);
}

async fn txn_success_and_failure_branches(b: Backend) {
    let (_s, mut c) = start(b).await;
    let r1 = put(&mut c, "k", "v").await;
    let txn = |expect: &str| {
        Txn::new()
            .when([Compare::value("k", CompareOp::Equal, expect)])
            .and_then([TxnOp::put("then", "1", None), TxnOp::get("k", None)])
            .or_else([TxnOp::put("else", "1", None)])
    };
    let ok = c.txn(txn("v")).await.unwrap();
    assert!(ok.succeeded());
    assert_eq!(rev(ok.header()), r1 + 1);
    let ops = txn_responses(&ok);
    assert_eq!(ops.len(), 2);
    assert!(matches!(ops[0], TxnOpResponse::Put(_)), "{:?}", ops[0]);
    assert_eq!(keys(get_resp(&ops[1]).kvs()), ["k"]);

    let failed = c.txn(txn("other")).await.unwrap();
    assert!(!failed.succeeded());
    assert_eq!(rev(failed.header()), r1 + 2);
    let ops = txn_responses(&failed);
    assert_eq!(ops.len(), 1);
    assert!(matches!(ops[0], TxnOpResponse::Put(_)), "{:?}", ops[0]);

    let all = c
        .get("", Some(GetOptions::new().with_all_keys()))
        .await
        .unwrap();
    assert_eq!(keys(all.kvs()), ["else", "k", "then"]);
    assert_eq!(kvs(all.kvs())[0], Kv::new("else", "1", r1 + 2, r1 + 2, 1));
}

async fn txn_multiple_compares_are_anded(b: Backend) {
    let (_s, mut c) = start(b).await;
    put_all(&mut c, &[("a", "1"), ("b", "2")]).await;
    use CompareOp::*;
    let resp = c
        .txn(Txn::new().when([
            Compare::value("a", Equal, "1"),
            Compare::value("b", Equal, "2"),
        ]))
        .await
        .unwrap();
    assert!(resp.succeeded());
    let resp = c
        .txn(Txn::new().when([
            Compare::value("a", Equal, "1"),
            Compare::value("b", Equal, "3"),
        ]))
        .await
        .unwrap();
    assert!(!resp.succeeded());
}

async fn txn_nested(b: Backend) {
    let (_s, mut c) = start(b).await;
    let r1 = put(&mut c, "flag", "on").await;
    let inner = Txn::new()
        .when([Compare::value("flag", CompareOp::Equal, "off")])
        .and_then([TxnOp::put("inner-then", "x", None)])
        .or_else([
            TxnOp::put("inner-else", "x", None),
            TxnOp::get("flag", None),
        ]);
    let outer = Txn::new()
        .when([Compare::value("flag", CompareOp::Equal, "on")])
        .and_then([TxnOp::put("outer", "x", None), TxnOp::txn(inner)]);
    let resp = c.txn(outer).await.unwrap();
    assert!(resp.succeeded());
    let r = rev(resp.header());
    assert_eq!(r, r1 + 1, "nested writes share the outer revision");
    let ops = txn_responses(&resp);
    assert_eq!(ops.len(), 2);
    let TxnOpResponse::Txn(inner_resp) = &ops[1] else {
        panic!("expected a txn response, got {:?}", ops[1]);
    };
    assert!(!inner_resp.succeeded());
    let inner_ops = txn_responses(inner_resp);
    assert_eq!(inner_ops.len(), 2);
    assert_eq!(keys(get_resp(&inner_ops[1]).kvs()), ["flag"]);
    let all = c
        .get("", Some(GetOptions::new().with_all_keys()))
        .await
        .unwrap();
    assert_eq!(
        kvs(all.kvs()),
        vec![
            Kv::new("flag", "on", r1, r1, 1),
            Kv::new("inner-else", "x", r, r, 1),
            Kv::new("outer", "x", r, r, 1),
        ]
    );
}

async fn txn_ops_share_one_revision(b: Backend) {
    let (_s, mut c) = start(b).await;
    let revs = put_all(&mut c, &[("c", "old"), ("d", "old")]).await;
    let resp = c
        .txn(Txn::new().and_then([
            TxnOp::put("a", "1", None),
            TxnOp::put("b", "1", None),
            TxnOp::delete("c", None),
            TxnOp::put("d", "new", None),
        ]))
        .await
        .unwrap();
    let r = rev(resp.header());
    assert_eq!(r, revs[1] + 1, "one revision per txn");
    let all = c
        .get("", Some(GetOptions::new().with_all_keys()))
        .await
        .unwrap();
    assert_eq!(
        kvs(all.kvs()),
        vec![
            Kv::new("a", "1", r, r, 1),
            Kv::new("b", "1", r, r, 1),
            Kv::new("d", "new", revs[1], r, 2),
        ]
    );
    assert_eq!(put(&mut c, "e", "1").await, r + 1);
}

fn op_header_rev(op: &TxnOpResponse) -> i64 {
    match op {
        TxnOpResponse::Put(p) => rev(p.header()),
        TxnOpResponse::Get(g) => rev(g.header()),
        TxnOpResponse::Delete(d) => rev(d.header()),
        TxnOpResponse::Txn(t) => rev(t.header()),
    }
}

/// Go clients can read `OpResponse.Get().Header.Revision`; etcd fills it with the txn revision.
/// (A nested txn's own header says revision 0 in etcd 3.4; that quirk is not asserted.)
async fn txn_inner_response_headers(b: Backend) {
    let (_s, mut c) = start(b).await;
    let r0 = put(&mut c, "c", "old").await;
    let resp = c
        .txn(Txn::new().and_then([
            TxnOp::put("a", "1", None),
            TxnOp::get("a", None),
            TxnOp::delete("c", None),
        ]))
        .await
        .unwrap();
    let r = rev(resp.header());
    assert_eq!(r, r0 + 1);
    let revs: Vec<i64> = txn_responses(&resp).iter().map(op_header_rev).collect();
    assert_eq!(revs, [r, r, r]);
    let ro = c
        .txn(Txn::new().and_then([TxnOp::get("a", None)]))
        .await
        .unwrap();
    assert_eq!(rev(ro.header()), r);
    let revs: Vec<i64> = txn_responses(&ro).iter().map(op_header_rev).collect();
    assert_eq!(revs, [r]);
}

async fn txn_duplicate_key_is_rejected(b: Backend) {
    let (_s, mut c) = start(b).await;
    let r = put(&mut c, "a", "x").await;
    let msg = "etcdserver: duplicate key given in txn request";
    assert_grpc_err(
        c.txn(Txn::new().and_then([TxnOp::put("a", "1", None), TxnOp::put("a", "2", None)]))
            .await,
        Code::InvalidArgument,
        msg,
    );
    assert_grpc_err(
        c.txn(Txn::new().and_then([
            TxnOp::put("a/1", "1", None),
            TxnOp::delete("a/", Some(DeleteOptions::new().with_prefix())),
        ]))
        .await,
        Code::InvalidArgument,
        msg,
    );
    assert_grpc_err(
        c.txn(Txn::new().or_else([TxnOp::put("b", "1", None), TxnOp::put("b", "2", None)]))
            .await,
        Code::InvalidArgument,
        msg,
    );
    assert_eq!(
        current_rev(&mut c).await,
        r,
        "a rejected txn writes nothing"
    );
    // Reading a key that is also written is fine, and so are the same puts in different
    // branches.
    let resp = c
        .txn(
            Txn::new()
                .and_then([TxnOp::put("a", "1", None), TxnOp::get("a", None)])
                .or_else([TxnOp::put("a", "2", None)]),
        )
        .await
        .unwrap();
    assert!(resp.succeeded());
}

async fn txn_duplicate_keys_in_nested_txns(b: Backend) {
    let (_s, mut c) = start(b).await;
    put(&mut c, "flag", "x").await;
    let msg = "etcdserver: duplicate key given in txn request";
    let nested_put = |k: &str| TxnOp::txn(Txn::new().and_then([TxnOp::put(k, "n", None)]));
    assert_grpc_err(
        c.txn(Txn::new().and_then([TxnOp::put("a", "1", None), nested_put("a")]))
            .await,
        Code::InvalidArgument,
        msg,
    );
    assert_grpc_err(
        c.txn(Txn::new().and_then([
            TxnOp::delete("a", Some(DeleteOptions::new().with_prefix())),
            nested_put("ab"),
        ]))
        .await,
        Code::InvalidArgument,
        msg,
    );
    assert_grpc_err(
        c.txn(Txn::new().and_then([nested_put("a"), nested_put("a")]))
            .await,
        Code::InvalidArgument,
        msg,
    );
    // The two branches of one nested txn are exclusive, so they may write the same key.
    let resp = c
        .txn(
            Txn::new().and_then([TxnOp::txn(
                Txn::new()
                    .when([Compare::value("flag", CompareOp::Equal, "x")])
                    .and_then([TxnOp::put("same", "then", None)])
                    .or_else([TxnOp::put("same", "else", None)]),
            )]),
        )
        .await
        .unwrap();
    assert!(resp.succeeded());
    let got = c.get("same", None).await.unwrap();
    assert_eq!(got.kvs()[0].value(), b"then");
    // Overlapping deletes are not duplicates.
    let resp = c
        .txn(Txn::new().and_then([
            TxnOp::delete("s", Some(DeleteOptions::new().with_prefix())),
            TxnOp::delete("same", None),
        ]))
        .await
        .unwrap();
    match &resp.op_responses()[0] {
        TxnOpResponse::Delete(d) => assert_eq!(d.deleted(), 1),
        other => panic!("expected delete response, got {other:?}"),
    }
}

async fn txn_too_many_ops(b: Backend) {
    let (_s, mut c) = start(b).await;
    // etcd's default --max-txn-ops is 128.
    let ops = |n: usize| -> Vec<TxnOp> {
        (0..n)
            .map(|i| TxnOp::put(format!("op/{i:03}"), "x", None))
            .collect()
    };
    let r = current_rev(&mut c).await;
    assert_grpc_err(
        c.txn(Txn::new().and_then(ops(129))).await,
        Code::InvalidArgument,
        "etcdserver: too many operations in txn request",
    );
    assert_eq!(current_rev(&mut c).await, r);
    let resp = c.txn(Txn::new().and_then(ops(128))).await.unwrap();
    assert_eq!(rev(resp.header()), r + 1);
    let got = c
        .get(
            "op/",
            Some(GetOptions::new().with_prefix().with_count_only()),
        )
        .await
        .unwrap();
    assert_eq!(got.count(), 128);
}

async fn txn_range_revision_errors(b: Backend) {
    let (_s, mut c) = start(b).await;
    let revs = put_all(&mut c, &[("k", "1"), ("k", "2"), ("k", "3")]).await;
    c.compact(revs[1], None).await.unwrap();
    let at = |r: i64| TxnOp::get("k", Some(GetOptions::new().with_revision(r)));
    assert_grpc_err(
        c.txn(Txn::new().and_then([TxnOp::put("w", "1", None), at(revs[0])]))
            .await,
        Code::OutOfRange,
        COMPACTED,
    );
    assert_grpc_err(
        c.txn(Txn::new().and_then([at(revs[2] + 1)])).await,
        Code::OutOfRange,
        FUTURE_REV,
    );
    assert_eq!(current_rev(&mut c).await, revs[2], "nothing was written");
    let resp = c.txn(Txn::new().and_then([at(revs[1])])).await.unwrap();
    assert_eq!(
        kvs(get_resp(&resp.op_responses()[0]).kvs()),
        vec![Kv::new("k", "2", revs[0], revs[1], 2)]
    );
}

async fn txn_read_only_keeps_revision(b: Backend) {
    let (_s, mut c) = start(b).await;
    let r = put(&mut c, "a", "x").await;
    let resp = c
        .txn(Txn::new().and_then([
            TxnOp::get("a", None),
            TxnOp::get("", Some(GetOptions::new().with_all_keys())),
        ]))
        .await
        .unwrap();
    assert_eq!(rev(resp.header()), r);
    let resp = c
        .txn(Txn::new().when([Compare::value("a", CompareOp::Equal, "nope")]))
        .await
        .unwrap();
    assert!(!resp.succeeded());
    assert_eq!(
        rev(resp.header()),
        r,
        "a failed compare with no ops writes nothing"
    );
    let resp = c
        .txn(Txn::new().and_then([TxnOp::delete("missing", None)]))
        .await
        .unwrap();
    assert_eq!(rev(resp.header()), r, "deleting nothing writes nothing");
    assert_eq!(put(&mut c, "b", "x").await, r + 1);
}

async fn txn_reads_see_earlier_writes(b: Backend) {
    let (_s, mut c) = start(b).await;
    let revs = put_all(&mut c, &[("a", "old"), ("b", "old")]).await;
    let resp = c
        .txn(Txn::new().and_then([
            TxnOp::get("a", None),
            TxnOp::put("a", "new", None),
            TxnOp::get("a", None),
            TxnOp::delete("b", None),
            TxnOp::get("b", None),
            TxnOp::put("c", "new", None),
            TxnOp::get("", Some(GetOptions::new().with_all_keys())),
        ]))
        .await
        .unwrap();
    let r = rev(resp.header());
    let ops = txn_responses(&resp);
    assert_eq!(
        kvs(get_resp(&ops[0]).kvs()),
        vec![Kv::new("a", "old", revs[0], revs[0], 1)]
    );
    assert_eq!(
        kvs(get_resp(&ops[2]).kvs()),
        vec![Kv::new("a", "new", revs[0], r, 2)]
    );
    match &ops[3] {
        TxnOpResponse::Delete(d) => assert_eq!(d.deleted(), 1),
        other => panic!("expected delete response, got {other:?}"),
    }
    assert!(get_resp(&ops[4]).kvs().is_empty());
    assert_eq!(keys(get_resp(&ops[6]).kvs()), ["a", "c"]);
}

async fn txn_put_with_unknown_lease_fails(b: Backend) {
    let (_s, mut c) = start(b).await;
    let r = put(&mut c, "a", "x").await;
    assert_grpc_err(
        c.txn(Txn::new().and_then([
            TxnOp::put("a", "y", None),
            TxnOp::put("b", "y", Some(PutOptions::new().with_lease(4242))),
        ]))
        .await,
        Code::NotFound,
        LEASE_NOT_FOUND,
    );
    assert_eq!(current_rev(&mut c).await, r, "the whole txn is rejected");
    let got = c.get("a", None).await.unwrap();
    assert_eq!(got.kvs()[0].value(), b"x");
}

// ---------------------------------------------------------------------------------------------
// Compact
// ---------------------------------------------------------------------------------------------

async fn compact_basic(b: Backend) {
    let (_s, mut c) = start(b).await;
    let revs = put_all(&mut c, &[("k", "1"), ("k", "2"), ("k", "3"), ("j", "1")]).await;
    let resp = c.compact(revs[2], None).await.unwrap();
    assert_eq!(rev(resp.header()), revs[3], "compaction writes no revision");
    for r in [1, revs[0], revs[1]] {
        assert_grpc_err(
            c.get("k", Some(GetOptions::new().with_revision(r))).await,
            Code::OutOfRange,
            COMPACTED,
        );
    }
    let got = c
        .get("k", Some(GetOptions::new().with_revision(revs[2])))
        .await
        .unwrap();
    assert_eq!(got.kvs()[0].value(), b"3");
    assert_eq!(got.kvs()[0].version(), 3, "compaction keeps versions");
    // Compacting at the current revision is allowed.
    c.compact(revs[3], Some(CompactionOptions::new().with_physical()))
        .await
        .unwrap();
    let all = c
        .get("", Some(GetOptions::new().with_all_keys()))
        .await
        .unwrap();
    assert_eq!(keys(all.kvs()), ["j", "k"]);
}

async fn compact_future_revision_errors(b: Backend) {
    let (_s, mut c) = start(b).await;
    let r = put(&mut c, "k", "1").await;
    assert_grpc_err(c.compact(r + 1, None).await, Code::OutOfRange, FUTURE_REV);
    assert_grpc_err(c.compact(r + 100, None).await, Code::OutOfRange, FUTURE_REV);
}

async fn compact_twice_errors(b: Backend) {
    let (_s, mut c) = start(b).await;
    let revs = put_all(&mut c, &[("k", "1"), ("k", "2"), ("k", "3")]).await;
    c.compact(revs[1], None).await.unwrap();
    assert_grpc_err(c.compact(revs[1], None).await, Code::OutOfRange, COMPACTED);
    assert_grpc_err(c.compact(revs[0], None).await, Code::OutOfRange, COMPACTED);
    c.compact(revs[2], None).await.unwrap();
}

async fn compacted_deleted_key_stays_gone(b: Backend) {
    let (_s, mut c) = start(b).await;
    let r1 = put(&mut c, "gone", "x").await;
    let r2 = rev(c.delete("gone", None).await.unwrap().header());
    let r3 = put(&mut c, "kept", "x").await;
    c.compact(r3, None).await.unwrap();
    let got = c
        .get("", Some(GetOptions::new().with_all_keys()))
        .await
        .unwrap();
    assert_eq!(keys(got.kvs()), ["kept"]);
    assert_grpc_err(
        c.get("gone", Some(GetOptions::new().with_revision(r1)))
            .await,
        Code::OutOfRange,
        COMPACTED,
    );
    let at_r2 = c
        .get("gone", Some(GetOptions::new().with_revision(r2)))
        .await;
    assert_grpc_err(at_r2, Code::OutOfRange, COMPACTED);
    let r4 = put(&mut c, "gone", "again").await;
    let got = c.get("gone", None).await.unwrap();
    assert_eq!(kvs(got.kvs()), vec![Kv::new("gone", "again", r4, r4, 1)]);
}

// ---------------------------------------------------------------------------------------------
// Watch
// ---------------------------------------------------------------------------------------------

async fn watch_single_key(b: Backend) {
    let (_s, mut c) = start(b).await;
    let (mut ws, id) = watch_created(&mut c, "k", WatchOptions::new()).await;
    let r1 = put(&mut c, "k", "1").await;
    put(&mut c, "k2", "x").await;
    put(&mut c, "j", "x").await;
    let r4 = put(&mut c, "k", "2").await;
    let r5 = rev(c.delete("k", None).await.unwrap().header());
    let resp = next_msg(&mut ws).await;
    assert_eq!(resp.watch_id(), id);
    assert_eq!(
        rev(resp.header()),
        r1,
        "header revision is the event revision"
    );
    let first = resp.events()[0].kv().map(kv).unwrap();
    assert_eq!(first, Kv::new("k", "1", r1, r1, 1));
    let mut got: Vec<Ev> = resp.events().iter().map(ev).collect();
    got.extend(events(&mut ws, 3 - got.len()).await);
    assert_eq!(
        got,
        vec![put_ev("k", "1", r1), put_ev("k", "2", r4), del_ev("k", r5)]
    );
    assert_quiet(&mut ws, Duration::from_millis(300)).await;
}

async fn watch_delete_event_is_a_tombstone(b: Backend) {
    let (_s, mut c) = start(b).await;
    let r1 = put(&mut c, "k", "v").await;
    let (mut ws, _) = watch_created(&mut c, "k", WatchOptions::new()).await;
    let r2 = rev(c.delete("k", None).await.unwrap().header());
    let resp = next_msg(&mut ws).await;
    assert_eq!(resp.events().len(), 1);
    let e = &resp.events()[0];
    assert_eq!(e.event_type(), etcd_client::EventType::Delete);
    assert_eq!(
        e.kv().map(kv),
        Some(Kv::new("k", "", 0, r2, 0)),
        "a delete event carries only the key and the delete revision"
    );
    assert!(e.prev_kv().is_none(), "prev_kv only when asked");
    assert_eq!(r2, r1 + 1);
}

async fn watch_prefix_and_range(b: Backend) {
    let (_s, mut c) = start(b).await;
    let (mut prefix, _) = watch_created(&mut c, "p/", WatchOptions::new().with_prefix()).await;
    let (mut range, _) = watch_created(&mut c, "b", WatchOptions::new().with_range("d")).await;
    let (mut from, _) = watch_created(&mut c, "p/", WatchOptions::new().with_from_key()).await;
    let revs = put_all(
        &mut c,
        &[
            ("p/1", "x"),
            ("a", "x"),
            ("b", "x"),
            ("p/2", "x"),
            ("d", "x"),
            ("q", "x"),
        ],
    )
    .await;
    assert_eq!(
        events(&mut prefix, 2).await,
        vec![put_ev("p/1", "x", revs[0]), put_ev("p/2", "x", revs[3])]
    );
    assert_eq!(events(&mut range, 1).await, vec![put_ev("b", "x", revs[2])]);
    assert_eq!(
        events(&mut from, 3).await,
        vec![
            put_ev("p/1", "x", revs[0]),
            put_ev("p/2", "x", revs[3]),
            put_ev("q", "x", revs[5])
        ]
    );
    assert_quiet(&mut prefix, Duration::from_millis(200)).await;
    assert_quiet(&mut range, Duration::from_millis(100)).await;
}

async fn watch_replays_history_from_past_revision(b: Backend) {
    let (_s, mut c) = start(b).await;
    let mut expected = Vec::new();
    for i in 0..30 {
        let k = format!("h/{}", i % 7);
        if i % 5 == 4 {
            let del = c.delete(k.as_str(), None).await.unwrap();
            // Deleting a key that is already gone writes nothing and makes no event.
            if del.deleted() == 1 {
                expected.push(del_ev(&k, rev(del.header())));
            }
        } else {
            let r = put(&mut c, k.as_str(), format!("v{i}")).await;
            expected.push(put_ev(&k, &format!("v{i}"), r));
        }
        put(&mut c, "unrelated", "x").await;
    }
    let start_rev = expected[3].3;
    let (mut ws, _) = watch_created(
        &mut c,
        "h/",
        WatchOptions::new()
            .with_prefix()
            .with_start_revision(start_rev),
    )
    .await;
    let want: Vec<Ev> = expected[3..].to_vec();
    let now = current_rev(&mut c).await;
    let mut got = Vec::new();
    while got.len() < want.len() {
        let resp = next_msg(&mut ws).await;
        assert_eq!(
            rev(resp.header()),
            now,
            "replayed responses carry the current revision, not the events'"
        );
        got.extend(resp.events().iter().map(ev));
    }
    assert_eq!(got, want, "exact history, in order, no gaps or duplicates");
    // Then the watch continues live, and live responses carry the event revision.
    put(&mut c, "unrelated", "x").await;
    let r = put(&mut c, "h/live", "x").await;
    let resp = next_msg(&mut ws).await;
    assert_eq!(rev(resp.header()), r);
    assert_eq!(
        resp.events().iter().map(ev).collect::<Vec<_>>(),
        vec![put_ev("h/live", "x", r)]
    );
}

async fn watch_resume_after_break(b: Backend) {
    let (_s, mut c) = start(b).await;
    let (mut ws, _) = watch_created(&mut c, "r/", WatchOptions::new().with_prefix()).await;
    let mut all = Vec::new();
    for i in 0..5 {
        let r = put(&mut c, format!("r/{i}"), "a").await;
        all.push(put_ev(&format!("r/{i}"), "a", r));
    }
    let seen = events(&mut ws, 3).await;
    // Take only the first three even if more arrived in the same response.
    let seen = seen[..3].to_vec();
    assert_eq!(seen, all[..3]);
    drop(ws); // the connection breaks
    for i in 5..8 {
        let r = put(&mut c, format!("r/{i}"), "b").await;
        all.push(put_ev(&format!("r/{i}"), "b", r));
    }
    let r = rev(c.delete("r/0", None).await.unwrap().header());
    all.push(del_ev("r/0", r));
    let resume = seen.last().unwrap().3 + 1;
    let (mut ws, _) = watch_created(
        &mut c,
        "r/",
        WatchOptions::new()
            .with_prefix()
            .with_start_revision(resume),
    )
    .await;
    let rest = all[3..].to_vec();
    assert_eq!(events(&mut ws, rest.len()).await, rest);
    assert_quiet(&mut ws, Duration::from_millis(300)).await;
}

async fn watch_from_compacted_revision(b: Backend) {
    let (_s, mut c) = start(b).await;
    let revs = put_all(&mut c, &[("k", "1"), ("k", "2"), ("k", "3"), ("k", "4")]).await;
    c.compact(revs[2], None).await.unwrap();
    let mut ws = c
        .watch("k", Some(WatchOptions::new().with_start_revision(revs[0])))
        .await
        .unwrap();
    // etcd first confirms the watch, then cancels it with the compaction revision. (etcd 3.4
    // sends that second response with header revision 0; that quirk is not asserted.)
    let created = next_msg(&mut ws).await;
    assert!(created.created(), "{created:?}");
    assert_eq!(created.compact_revision(), 0, "{created:?}");
    let id = created.watch_id();
    let resp = next_msg(&mut ws).await;
    assert_eq!(resp.watch_id(), id);
    assert_eq!(resp.compact_revision(), revs[2]);
    assert!(
        resp.canceled(),
        "etcd cancels a watch that starts compacted: {resp:?}"
    );
    assert!(resp.events().is_empty());

    // Watching from the compaction revision itself works.
    let (mut ws, _) = watch_created(
        &mut c,
        "k",
        WatchOptions::new().with_start_revision(revs[2]),
    )
    .await;
    assert_eq!(
        events(&mut ws, 2).await,
        vec![put_ev("k", "3", revs[2]), put_ev("k", "4", revs[3])]
    );
}

async fn watch_prev_kv(b: Backend) {
    let (_s, mut c) = start(b).await;
    let (mut ws, _) = watch_created(&mut c, "k", WatchOptions::new().with_prev_key()).await;
    let r1 = put(&mut c, "k", "1").await;
    let r2 = put(&mut c, "k", "2").await;
    let r3 = rev(c.delete("k", None).await.unwrap().header());
    let mut got = Vec::new();
    while got.len() < 3 {
        let resp = next_msg(&mut ws).await;
        got.extend(resp.events().iter().map(|e| (ev(e), e.prev_kv().map(kv))));
    }
    assert_eq!(
        got,
        vec![
            (put_ev("k", "1", r1), None),
            (put_ev("k", "2", r2), Some(Kv::new("k", "1", r1, r1, 1))),
            (del_ev("k", r3), Some(Kv::new("k", "2", r1, r2, 2))),
        ]
    );
    // Replayed history carries prev_kv too.
    let (mut ws, _) = watch_created(
        &mut c,
        "k",
        WatchOptions::new().with_prev_key().with_start_revision(r2),
    )
    .await;
    let mut got = Vec::new();
    while got.len() < 2 {
        let resp = next_msg(&mut ws).await;
        got.extend(resp.events().iter().map(|e| (ev(e), e.prev_kv().map(kv))));
    }
    assert_eq!(
        got,
        vec![
            (put_ev("k", "2", r2), Some(Kv::new("k", "1", r1, r1, 1))),
            (del_ev("k", r3), Some(Kv::new("k", "2", r1, r2, 2))),
        ]
    );
}

async fn watch_filters(b: Backend) {
    let (_s, mut c) = start(b).await;
    let (mut noput, _) = watch_created(
        &mut c,
        "k",
        WatchOptions::new().with_filters([WatchFilterType::NoPut]),
    )
    .await;
    let (mut nodel, _) = watch_created(
        &mut c,
        "k",
        WatchOptions::new().with_filters([WatchFilterType::NoDelete]),
    )
    .await;
    let r1 = put(&mut c, "k", "1").await;
    let r2 = rev(c.delete("k", None).await.unwrap().header());
    let r3 = put(&mut c, "k", "2").await;
    assert_eq!(events(&mut noput, 1).await, vec![del_ev("k", r2)]);
    assert_eq!(
        events(&mut nodel, 2).await,
        vec![put_ev("k", "1", r1), put_ev("k", "2", r3)]
    );
    assert_quiet(&mut noput, Duration::from_millis(300)).await;
    assert_quiet(&mut nodel, Duration::from_millis(100)).await;
}

async fn watch_cancel(b: Backend) {
    let (_s, mut c) = start(b).await;
    let (mut ws, id) = watch_created(&mut c, "k", WatchOptions::new()).await;
    let r1 = put(&mut c, "k", "1").await;
    assert_eq!(events(&mut ws, 1).await, vec![put_ev("k", "1", r1)]);
    ws.cancel(id).await.unwrap();
    let resp = next_msg(&mut ws).await;
    assert!(resp.canceled(), "{resp:?}");
    assert_eq!(resp.watch_id(), id);
    assert!(resp.events().is_empty());
    put(&mut c, "k", "2").await;
    assert_quiet(&mut ws, Duration::from_millis(300)).await;
}

async fn watch_several_on_one_stream(b: Backend) {
    let (_s, mut c) = start(b).await;
    let (mut ws, id_a) = watch_created(&mut c, "a", WatchOptions::new()).await;
    ws.watch("b", Some(WatchOptions::new().with_prev_key()))
        .await
        .unwrap();
    let created = next_msg(&mut ws).await;
    assert!(created.created());
    let id_b = created.watch_id();
    assert_eq!(
        (id_a, id_b),
        (0, 1),
        "etcd numbers watches per stream from 0"
    );
    ws.watch("", Some(WatchOptions::new().with_all_keys()))
        .await
        .unwrap();
    let created = next_msg(&mut ws).await;
    assert!(created.created());
    let id_all = created.watch_id();
    assert_eq!(id_all, 2);

    let ra = put(&mut c, "a", "1").await;
    let rb = put(&mut c, "b", "1").await;
    let mut by_id: std::collections::BTreeMap<i64, Vec<Ev>> = Default::default();
    while by_id.values().map(Vec::len).sum::<usize>() < 4 {
        let resp = next_msg(&mut ws).await;
        by_id
            .entry(resp.watch_id())
            .or_default()
            .extend(resp.events().iter().map(ev));
    }
    assert_eq!(by_id[&id_a], vec![put_ev("a", "1", ra)]);
    assert_eq!(by_id[&id_b], vec![put_ev("b", "1", rb)]);
    assert_eq!(
        by_id[&id_all],
        vec![put_ev("a", "1", ra), put_ev("b", "1", rb)]
    );
    // Cancelling one leaves the others running.
    ws.cancel(id_all).await.unwrap();
    let resp = next_msg(&mut ws).await;
    assert!(resp.canceled());
    assert_eq!(resp.watch_id(), id_all);
    let ra2 = put(&mut c, "a", "2").await;
    let resp = next_msg(&mut ws).await;
    assert_eq!(resp.watch_id(), id_a);
    assert_eq!(
        resp.events().iter().map(ev).collect::<Vec<_>>(),
        vec![put_ev("a", "2", ra2)]
    );
    assert_quiet(&mut ws, Duration::from_millis(300)).await;
}

async fn watch_events_of_one_txn_in_one_response(b: Backend) {
    let (_s, mut c) = start(b).await;
    put(&mut c, "t/c", "old").await;
    let (mut ws, _) = watch_created(&mut c, "t/", WatchOptions::new().with_prefix()).await;
    let resp = c
        .txn(Txn::new().and_then([
            TxnOp::put("t/b", "1", None),
            TxnOp::put("t/a", "1", None),
            TxnOp::delete("t/c", None),
            TxnOp::put("elsewhere", "1", None),
        ]))
        .await
        .unwrap();
    let r = rev(resp.header());
    let msg = next_msg(&mut ws).await;
    assert_eq!(rev(msg.header()), r);
    assert_eq!(
        msg.events().iter().map(ev).collect::<Vec<_>>(),
        vec![
            put_ev("t/b", "1", r),
            put_ev("t/a", "1", r),
            del_ev("t/c", r)
        ],
        "all events of a txn in one response, in op order"
    );
}

async fn watch_progress_notify(b: Backend) {
    let (_s, mut c) = start_with(
        b,
        StoreOptions {
            progress_notify_interval: Some(Duration::from_millis(500)),
            ..Default::default()
        },
    )
    .await;
    let r1 = put(&mut c, "other", "x").await;
    let (mut ws, id) = watch_created(&mut c, "k", WatchOptions::new().with_progress_notify()).await;
    let (mut silent, _) = watch_created(&mut c, "k", WatchOptions::new()).await;
    let started = std::time::Instant::now();
    let resp = next_msg(&mut ws).await;
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "progress notification took {:?}",
        started.elapsed()
    );
    assert_eq!(resp.watch_id(), id);
    assert!(resp.events().is_empty(), "{resp:?}");
    assert!(!resp.created() && !resp.canceled());
    assert_eq!(rev(resp.header()), r1);

    // A write to an unwatched key moves the revision that the next notification reports.
    let r2 = put(&mut c, "other", "y").await;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let resp = next_msg(&mut ws).await;
        assert!(resp.events().is_empty());
        if rev(resp.header()) == r2 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no progress to {r2}");
    }
    assert_quiet(&mut silent, Duration::from_millis(100)).await;
}

async fn watch_progress_request(b: Backend) {
    let (_s, mut c) = start(b).await;
    let (mut ws, _) = watch_created(&mut c, "k", WatchOptions::new()).await;
    let r1 = put(&mut c, "k", "1").await;
    assert_eq!(events(&mut ws, 1).await, vec![put_ev("k", "1", r1)]);
    let r2 = put(&mut c, "other", "x").await;
    ws.request_progress().await.unwrap();
    let resp = next_msg(&mut ws).await;
    assert!(resp.events().is_empty(), "{resp:?}");
    assert!(!resp.created() && !resp.canceled());
    assert_eq!(rev(resp.header()), r2);
    assert_eq!(
        resp.watch_id(),
        -1,
        "a stream-wide response has no watch id"
    );
}

async fn watch_start_revision_in_future_waits(b: Backend) {
    let (_s, mut c) = start(b).await;
    let r = put(&mut c, "k", "0").await;
    let (mut ws, _) =
        watch_created(&mut c, "k", WatchOptions::new().with_start_revision(r + 2)).await;
    put(&mut c, "k", "1").await;
    let r3 = put(&mut c, "k", "2").await;
    assert_eq!(events(&mut ws, 1).await, vec![put_ev("k", "2", r3)]);
}

async fn watch_explicit_ids_and_refused_watches(b: Backend) {
    let (_s, mut c) = start(b).await;
    let (mut ws, id) = watch_created(&mut c, "k", WatchOptions::new().with_watch_id(7)).await;
    assert_eq!(id, 7, "a client-chosen watch id is used");
    // A duplicate id is refused with a created+canceled response for watch id -1.
    ws.watch("j", Some(WatchOptions::new().with_watch_id(7)))
        .await
        .unwrap();
    let dup = next_msg(&mut ws).await;
    assert_eq!(
        (dup.watch_id(), dup.created(), dup.canceled()),
        (-1, true, true),
        "{dup:?}"
    );
    assert_eq!(
        dup.cancel_reason(),
        "mvcc: duplicate watch ID provided on the WatchStream"
    );
    // Automatic ids still start at 0.
    ws.watch("j", None).await.unwrap();
    let auto = next_msg(&mut ws).await;
    assert_eq!((auto.watch_id(), auto.created()), (0, true), "{auto:?}");
    // An inverted range is refused the same way.
    ws.watch("z", Some(WatchOptions::new().with_range("a")))
        .await
        .unwrap();
    let inverted = next_msg(&mut ws).await;
    assert_eq!(
        (inverted.watch_id(), inverted.created(), inverted.canceled()),
        (-1, true, true),
        "{inverted:?}"
    );
    assert_eq!(inverted.cancel_reason(), "mvcc: watcher range is empty");
    // Cancelling an unknown id gets no answer at all, and the stream keeps working.
    ws.cancel(99).await.unwrap();
    assert_quiet(&mut ws, Duration::from_millis(300)).await;
    let r = put(&mut c, "k", "1").await;
    let resp = next_msg(&mut ws).await;
    assert_eq!(resp.watch_id(), 7);
    assert_eq!(
        resp.events().iter().map(ev).collect::<Vec<_>>(),
        vec![put_ev("k", "1", r)]
    );
}

async fn watch_survives_compaction(b: Backend) {
    let (_s, mut c) = start(b).await;
    let (mut ws, _) = watch_created(&mut c, "k", WatchOptions::new()).await;
    let r1 = put(&mut c, "k", "1").await;
    assert_eq!(events(&mut ws, 1).await, vec![put_ev("k", "1", r1)]);
    let r2 = put(&mut c, "other", "x").await;
    c.compact(r2, None).await.unwrap();
    let r3 = put(&mut c, "k", "2").await;
    assert_eq!(
        events(&mut ws, 1).await,
        vec![put_ev("k", "2", r3)],
        "a synced watch is not affected by compaction"
    );
}

async fn watch_delete_range_and_lease_events(b: Backend) {
    let (_s, mut c) = start(b).await;
    let lease = c.lease_grant(60, None).await.unwrap().id();
    let (mut ws, _) = watch_created(&mut c, "d/", WatchOptions::new().with_prefix()).await;
    let r1 = rev(c
        .put("d/2", "x", Some(PutOptions::new().with_lease(lease)))
        .await
        .unwrap()
        .header());
    let resp = next_msg(&mut ws).await;
    assert_eq!(
        resp.events()[0].kv().map(kv),
        Some(Kv::new("d/2", "x", r1, r1, 1).leased(lease)),
        "put events carry the lease"
    );
    put(&mut c, "d/1", "x").await;
    put(&mut c, "d/3", "x").await;
    events(&mut ws, 2).await;
    let del = c
        .delete("d/", Some(DeleteOptions::new().with_prefix()))
        .await
        .unwrap();
    let r = rev(del.header());
    let resp = next_msg(&mut ws).await;
    assert_eq!(
        resp.events().iter().map(ev).collect::<Vec<_>>(),
        vec![del_ev("d/1", r), del_ev("d/2", r), del_ev("d/3", r)],
        "a range delete is one response, in key order"
    );
}

// ---------------------------------------------------------------------------------------------
// Lease
// ---------------------------------------------------------------------------------------------

async fn lease_grant_and_list(b: Backend) {
    let (_s, mut c) = start(b).await;
    let r = current_rev(&mut c).await;
    let auto = c.lease_grant(60, None).await.unwrap();
    assert_ne!(auto.id(), 0);
    assert_eq!(auto.ttl(), 60);
    assert_eq!(auto.error(), "");
    let explicit = c
        .lease_grant(30, Some(LeaseGrantOptions::new().with_id(0x1234)))
        .await
        .unwrap();
    assert_eq!(explicit.id(), 0x1234);
    assert_eq!(explicit.ttl(), 30);
    assert_eq!(current_rev(&mut c).await, r, "granting writes no revision");
    let mut ids: Vec<i64> = c
        .leases()
        .await
        .unwrap()
        .leases()
        .iter()
        .map(|l| l.id())
        .collect();
    ids.sort();
    let mut want = vec![auto.id(), 0x1234];
    want.sort();
    assert_eq!(ids, want);
    assert_grpc_err(
        c.lease_grant(30, Some(LeaseGrantOptions::new().with_id(0x1234)))
            .await,
        Code::FailedPrecondition,
        "etcdserver: lease already exists",
    );
    // etcd's maximum TTL is 9_000_000_000 s.
    assert_grpc_err(
        c.lease_grant(9_000_000_001, None).await,
        Code::OutOfRange,
        "etcdserver: too large lease TTL",
    );
}

async fn lease_grant_minimum_ttl(b: Backend) {
    let (_s, mut c) = start(b).await;
    // etcd raises TTLs below its minimum (1.5 election timeouts, rounded up: 2 s by default).
    let resp = c.lease_grant(1, None).await.unwrap();
    assert_eq!(resp.ttl(), 2);
    let ttl = c.lease_time_to_live(resp.id(), None).await.unwrap();
    assert_eq!(ttl.granted_ttl(), 2);
}

async fn lease_put_and_time_to_live(b: Backend) {
    let (_s, mut c) = start(b).await;
    let id = c.lease_grant(60, None).await.unwrap().id();
    let r1 = rev(c
        .put("l/b", "1", Some(PutOptions::new().with_lease(id)))
        .await
        .unwrap()
        .header());
    let r2 = rev(c
        .put("l/a", "1", Some(PutOptions::new().with_lease(id)))
        .await
        .unwrap()
        .header());
    put(&mut c, "l/c", "1").await;
    let got = c
        .get("l/", Some(GetOptions::new().with_prefix()))
        .await
        .unwrap();
    assert_eq!(
        kvs(got.kvs()),
        vec![
            Kv::new("l/a", "1", r2, r2, 1).leased(id),
            Kv::new("l/b", "1", r1, r1, 1).leased(id),
            Kv::new("l/c", "1", r2 + 1, r2 + 1, 1),
        ]
    );
    let ttl = c
        .lease_time_to_live(id, Some(LeaseTimeToLiveOptions::new().with_keys()))
        .await
        .unwrap();
    assert_eq!(ttl.id(), id);
    assert_eq!(ttl.granted_ttl(), 60);
    assert!((55..=60).contains(&ttl.ttl()), "ttl {}", ttl.ttl());
    let mut lease_keys: Vec<String> = ttl.keys().iter().map(|k| esc(k)).collect();
    lease_keys.sort();
    assert_eq!(lease_keys, ["l/a", "l/b"]);
    let ttl = c.lease_time_to_live(id, None).await.unwrap();
    assert!(ttl.keys().is_empty(), "keys only when asked");
    // An unknown lease is not an error for TimeToLive: TTL -1.
    let unknown = c.lease_time_to_live(777, None).await.unwrap();
    assert_eq!(unknown.id(), 777);
    assert_eq!(unknown.ttl(), -1);
}

async fn lease_keep_alive(b: Backend) {
    let (_s, mut c) = start(b).await;
    let id = c.lease_grant(10, None).await.unwrap().id();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let before = c.lease_time_to_live(id, None).await.unwrap().ttl();
    assert!(before < 10, "ttl counts down: {before}");
    let (mut keeper, mut stream) = c.lease_keep_alive(id).await.unwrap();
    assert_eq!(keeper.id(), id);
    keeper.keep_alive().await.unwrap();
    let resp = tokio::time::timeout(WAIT, stream.message())
        .await
        .expect("keepalive response")
        .unwrap()
        .unwrap();
    assert_eq!(resp.id(), id);
    assert_eq!(resp.ttl(), 10, "keepalive resets to the granted TTL");
    let after = c.lease_time_to_live(id, None).await.unwrap();
    assert!(after.ttl() >= 9, "ttl after keepalive: {}", after.ttl());
    assert_eq!(after.granted_ttl(), 10);
    // Keeping an unknown lease alive answers TTL 0, which the client reports as an error.
    let err = c.lease_keep_alive(9999).await.expect_err("unknown lease");
    assert!(
        matches!(err, etcd_client::Error::LeaseKeepAliveError(_)),
        "{err:?}"
    );
}

async fn lease_revoke_deletes_keys_in_one_revision(b: Backend) {
    let (_s, mut c) = start(b).await;
    let id = c.lease_grant(60, None).await.unwrap().id();
    for k in ["v/b", "v/a", "v/c"] {
        c.put(k, "x", Some(PutOptions::new().with_lease(id)))
            .await
            .unwrap();
    }
    let keep = put(&mut c, "v/keep", "x").await;
    let (mut ws, _) = watch_created(&mut c, "v/", WatchOptions::new().with_prefix()).await;
    let resp = c.lease_revoke(id).await.unwrap();
    let r = keep + 1;
    assert_eq!(current_rev(&mut c).await, r, "revoke is one revision");
    assert_eq!(
        rev(resp.header()),
        r,
        "the revoke response carries the delete revision"
    );
    let msg = next_msg(&mut ws).await;
    assert_eq!(rev(msg.header()), r);
    assert_eq!(
        msg.events().iter().map(ev).collect::<Vec<_>>(),
        vec![del_ev("v/a", r), del_ev("v/b", r), del_ev("v/c", r)],
        "one response, key order, one revision"
    );
    let got = c
        .get("v/", Some(GetOptions::new().with_prefix()))
        .await
        .unwrap();
    assert_eq!(keys(got.kvs()), ["v/keep"]);
    assert!(c.leases().await.unwrap().leases().is_empty());
    assert_eq!(c.lease_time_to_live(id, None).await.unwrap().ttl(), -1);
    assert_grpc_err(c.lease_revoke(id).await, Code::NotFound, LEASE_NOT_FOUND);
}

async fn lease_revoke_without_keys_keeps_revision(b: Backend) {
    let (_s, mut c) = start(b).await;
    let r = put(&mut c, "a", "x").await;
    let id = c.lease_grant(60, None).await.unwrap().id();
    let resp = c.lease_revoke(id).await.unwrap();
    assert_eq!(rev(resp.header()), r);
    assert_eq!(current_rev(&mut c).await, r);
}

async fn lease_unknown_errors(b: Backend) {
    let (_s, mut c) = start(b).await;
    let r = put(&mut c, "a", "x").await;
    assert_grpc_err(
        c.put("k", "v", Some(PutOptions::new().with_lease(0x5151)))
            .await,
        Code::NotFound,
        LEASE_NOT_FOUND,
    );
    assert_grpc_err(
        c.lease_revoke(0x5151).await,
        Code::NotFound,
        LEASE_NOT_FOUND,
    );
    assert_eq!(current_rev(&mut c).await, r);
    assert!(c.get("k", None).await.unwrap().kvs().is_empty());
}

async fn lease_expiry_deletes_keys_in_one_revision(b: Backend) {
    let (_s, mut c) = start(b).await;
    let id = c.lease_grant(2, None).await.unwrap().id();
    let granted = std::time::Instant::now();
    for k in ["e/2", "e/1"] {
        c.put(k, "x", Some(PutOptions::new().with_lease(id)))
            .await
            .unwrap();
    }
    let keep = put(&mut c, "e/keep", "x").await;
    let (mut ws, _) = watch_created(&mut c, "e/", WatchOptions::new().with_prefix()).await;
    let msg = tokio::time::timeout(Duration::from_secs(10), ws.message())
        .await
        .expect("lease did not expire within 10 s")
        .unwrap()
        .unwrap();
    let elapsed = granted.elapsed();
    assert!(
        elapsed >= Duration::from_millis(1500),
        "expired too early: {elapsed:?}"
    );
    let r = keep + 1;
    assert_eq!(
        msg.events().iter().map(ev).collect::<Vec<_>>(),
        vec![del_ev("e/1", r), del_ev("e/2", r)]
    );
    assert_eq!(current_rev(&mut c).await, r);
    let got = c
        .get("e/", Some(GetOptions::new().with_prefix()))
        .await
        .unwrap();
    assert_eq!(keys(got.kvs()), ["e/keep"]);
    assert_eq!(c.lease_time_to_live(id, None).await.unwrap().ttl(), -1);
    assert_grpc_err(
        c.put("e/3", "x", Some(PutOptions::new().with_lease(id)))
            .await,
        Code::NotFound,
        LEASE_NOT_FOUND,
    );
}

async fn lease_kept_alive_does_not_expire(b: Backend) {
    let (_s, mut c) = start(b).await;
    let id = c.lease_grant(3, None).await.unwrap().id();
    c.put("ka", "x", Some(PutOptions::new().with_lease(id)))
        .await
        .unwrap();
    let (mut keeper, mut stream) = c.lease_keep_alive(id).await.unwrap();
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        keeper.keep_alive().await.unwrap();
        let resp = tokio::time::timeout(WAIT, stream.message())
            .await
            .expect("keepalive response")
            .unwrap()
            .unwrap();
        assert_eq!(resp.ttl(), 3);
    }
    let got = c.get("ka", None).await.unwrap();
    assert_eq!(got.kvs().len(), 1, "a kept-alive lease outlives its TTL");
}

async fn lease_keys_follow_reattachment(b: Backend) {
    let (_s, mut c) = start(b).await;
    let a = c.lease_grant(60, None).await.unwrap().id();
    let bl = c.lease_grant(60, None).await.unwrap().id();
    for k in ["m/1", "m/2", "m/3"] {
        c.put(k, "a", Some(PutOptions::new().with_lease(a)))
            .await
            .unwrap();
    }
    // Re-putting with another lease moves the key; deleting it detaches it.
    c.put("m/1", "b", Some(PutOptions::new().with_lease(bl)))
        .await
        .unwrap();
    c.delete("m/2", None).await.unwrap();
    let lease_keys = |resp: etcd_client::LeaseTimeToLiveResponse| {
        let mut k: Vec<String> = resp.keys().iter().map(|k| esc(k)).collect();
        k.sort();
        k
    };
    let with_keys = || Some(LeaseTimeToLiveOptions::new().with_keys());
    assert_eq!(
        lease_keys(c.lease_time_to_live(a, with_keys()).await.unwrap()),
        ["m/3"]
    );
    assert_eq!(
        lease_keys(c.lease_time_to_live(bl, with_keys()).await.unwrap()),
        ["m/1"]
    );
    let (mut ws, _) = watch_created(&mut c, "m/", WatchOptions::new().with_prefix()).await;
    let resp = c.lease_revoke(a).await.unwrap();
    let r = rev(resp.header());
    assert_eq!(events(&mut ws, 1).await, vec![del_ev("m/3", r)]);
    let got = c
        .get("m/", Some(GetOptions::new().with_prefix()))
        .await
        .unwrap();
    assert_eq!(keys(got.kvs()), ["m/1"]);
    assert_eq!(got.kvs()[0].lease(), bl);
    assert_quiet(&mut ws, Duration::from_millis(200)).await;
}

// ---------------------------------------------------------------------------------------------
// Limits, concurrency, restart
// ---------------------------------------------------------------------------------------------

async fn put_empty_value(b: Backend) {
    let (_s, mut c) = start(b).await;
    let r = put(&mut c, "k", "").await;
    let got = c.get("k", None).await.unwrap();
    assert_eq!(kvs(got.kvs()), vec![Kv::new("k", "", r, r, 1)]);
    assert_eq!(got.count(), 1, "an empty value is still a key");
}

async fn max_request_bytes_is_enforced(b: Backend) {
    let (_s, mut c) = start_with(
        b,
        StoreOptions {
            max_request_bytes: Some(64 * 1024),
            ..Default::default()
        },
    )
    .await;
    let r = put(&mut c, "fits", vec![b'x'; 60 * 1024]).await;
    assert_grpc_err(
        c.put("big", vec![b'x'; 100 * 1024], None).await,
        Code::InvalidArgument,
        "etcdserver: request is too large",
    );
    assert_grpc_err(
        c.txn(Txn::new().and_then([
            TxnOp::put("t1", vec![b'x'; 40 * 1024], None),
            TxnOp::put("t2", vec![b'x'; 40 * 1024], None),
        ]))
        .await,
        Code::InvalidArgument,
        "etcdserver: request is too large",
    );
    // Past max-request-bytes + 512 KiB the gRPC layer itself refuses the message. Only the code
    // is compared: the text comes from the gRPC library ("grpc: received message larger than
    // max (1048585 vs. 589824)" in etcd).
    match c.put("huge", vec![b'x'; 1024 * 1024], None).await {
        Err(etcd_client::Error::GRpcStatus(st)) => {
            assert_eq!(st.code(), Code::ResourceExhausted, "{st:?}")
        }
        other => panic!("expected ResourceExhausted, got {other:?}"),
    }
    assert_eq!(
        current_rev(&mut c).await,
        r,
        "refused requests write nothing"
    );
}

async fn default_max_request_bytes_is_1_5_mib(b: Backend) {
    let (_s, mut c) = start(b).await;
    put(&mut c, "fits", vec![b'x'; 1400 * 1024]).await;
    assert_grpc_err(
        c.put("big", vec![b'x'; 1600 * 1024], None).await,
        Code::InvalidArgument,
        "etcdserver: request is too large",
    );
}

async fn concurrent_writers_get_unique_contiguous_revisions(b: Backend) {
    let (s, mut c) = start(b).await;
    let start_rev = current_rev(&mut c).await;
    let (mut ws, _) = watch_created(&mut c, "cw/", WatchOptions::new().with_prefix()).await;
    let mut tasks = Vec::new();
    for w in 0..4 {
        let mut client = s.client().await;
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            for i in 0..25 {
                let key = format!("cw/{w}/{i}");
                let r = put(&mut client, key.as_str(), "x").await;
                out.push((r, key));
            }
            out
        }));
    }
    let mut written = Vec::new();
    for t in tasks {
        let revs = t.await.unwrap();
        assert!(
            revs.windows(2).all(|w| w[0].0 < w[1].0),
            "one writer sees increasing revisions"
        );
        written.extend(revs);
    }
    written.sort();
    let revs: Vec<i64> = written.iter().map(|(r, _)| *r).collect();
    let want: Vec<i64> = (start_rev + 1..=start_rev + 100).collect();
    assert_eq!(revs, want, "unique and contiguous");
    let got = events(&mut ws, 100).await;
    let want: Vec<Ev> = written.iter().map(|(r, k)| put_ev(k, "x", *r)).collect();
    assert_eq!(
        got, want,
        "the watch sees every write once, in revision order"
    );
}

/// A watcher that does not read while many writes happen must still get every event exactly
/// once and in order when it finally reads (the server buffers or catches up from history).
async fn watch_slow_reader_misses_nothing(b: Backend) {
    const WRITERS: usize = 4;
    const PUTS: usize = 300;
    let (s, mut c) = start(b).await;
    let start_rev = current_rev(&mut c).await;
    let (mut ws, _) = watch_created(
        &mut c,
        "slow/",
        WatchOptions::new().with_prefix().with_prev_key(),
    )
    .await;
    let value = "v".repeat(512);
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let mut client = s.client().await;
        let value = value.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..PUTS {
                put(&mut client, format!("slow/{w}/{}", i % 50), value.as_str()).await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let end_rev = current_rev(&mut c).await;
    assert_eq!(end_rev, start_rev + (WRITERS * PUTS) as i64);
    let got = events(&mut ws, WRITERS * PUTS).await;
    let revs: Vec<i64> = got.iter().map(|e| e.3).collect();
    let want: Vec<i64> = (start_rev + 1..=end_rev).collect();
    assert!(
        revs == want,
        "events are not exactly revisions {}..={end_rev}",
        start_rev + 1
    );
    assert_quiet(&mut ws, Duration::from_millis(200)).await;
}

async fn mtls_requires_a_trusted_client_cert(b: Backend) {
    let pki = std::sync::Arc::new(testkit::TestPki::generate());
    let (s, mut c) = start_with(
        b,
        StoreOptions {
            tls: Some(pki.clone()),
            ..Default::default()
        },
    )
    .await;
    assert!(s.endpoint().starts_with("https://"));
    let r = put(&mut c, "k", "v").await;
    assert_eq!(c.get("k", None).await.unwrap().kvs()[0].mod_revision(), r);

    let ca = etcd_client::Certificate::from_pem(std::fs::read(pki.ca_path()).unwrap());
    let refused = [
        (
            "no client cert",
            etcd_client::TlsOptions::new().ca_certificate(ca),
        ),
        ("foreign CA", pki.foreign_client_tls_options("root")),
        (
            "expired",
            pki.tls_options_presenting(&pki.expired_client("root")),
        ),
    ];
    for (what, tls) in refused {
        let opts = etcd_client::ConnectOptions::new()
            .with_tls(tls)
            .with_timeout(Duration::from_secs(5));
        let res = async {
            let mut c = Client::connect([s.endpoint()], Some(opts)).await?;
            c.get("k", None).await
        }
        .await;
        assert!(res.is_err(), "{what}: request succeeded: {res:?}");
    }
    // Plain text on a TLS port fails too.
    let plain = s.endpoint().replace("https://", "http://");
    let res = async {
        let opts = etcd_client::ConnectOptions::new().with_timeout(Duration::from_secs(5));
        let mut c = Client::connect([plain], Some(opts)).await?;
        c.get("k", None).await
    }
    .await;
    assert!(res.is_err(), "plain text accepted: {res:?}");
}

async fn restart_preserves_state(b: Backend) {
    let (mut s, mut c) = start(b).await;
    let r1 = put(&mut c, "a", "1").await;
    let r2 = put(&mut c, "a", "2").await;
    let r3 = put(&mut c, "b", "1").await;
    let r4 = rev(c.delete("b", None).await.unwrap().header());
    let lease = c.lease_grant(20, None).await.unwrap().id();
    let r5 = rev(c
        .put("c", "1", Some(PutOptions::new().with_lease(lease)))
        .await
        .unwrap()
        .header());
    c.compact(r2, None).await.unwrap();
    drop(c);
    tokio::time::sleep(Duration::from_secs(3)).await;
    s.restart().await.expect("restart");
    let mut c = s.client().await;
    // Leases survive, with their keys, and a restart renews them to their full TTL rather
    // than letting the downtime count against them.
    let ttl = c
        .lease_time_to_live(lease, Some(LeaseTimeToLiveOptions::new().with_keys()))
        .await
        .unwrap();
    assert_eq!(ttl.granted_ttl(), 20);
    assert!(ttl.ttl() >= 18, "ttl after restart: {}", ttl.ttl());
    assert_eq!(ttl.keys(), [b"c".to_vec()]);

    assert_eq!(current_rev(&mut c).await, r5);
    let all = c
        .get("", Some(GetOptions::new().with_all_keys()))
        .await
        .unwrap();
    assert_eq!(
        kvs(all.kvs()),
        vec![
            Kv::new("a", "2", r1, r2, 2),
            Kv::new("c", "1", r5, r5, 1).leased(lease),
        ]
    );
    let at_r3 = c
        .get(
            "",
            Some(GetOptions::new().with_all_keys().with_revision(r3)),
        )
        .await
        .unwrap();
    assert_eq!(keys(at_r3.kvs()), ["a", "b"], "history survives");
    assert_grpc_err(
        c.get("a", Some(GetOptions::new().with_revision(r1))).await,
        Code::OutOfRange,
        COMPACTED,
    );
    assert_grpc_err(c.compact(r2, None).await, Code::OutOfRange, COMPACTED);
    let (mut ws, _) = watch_created(
        &mut c,
        "",
        WatchOptions::new().with_all_keys().with_start_revision(r2),
    )
    .await;
    assert_eq!(
        events(&mut ws, 4).await,
        vec![
            put_ev("a", "2", r2),
            put_ev("b", "1", r3),
            del_ev("b", r4),
            put_ev("c", "1", r5),
        ]
    );
    assert_eq!(put(&mut c, "d", "1").await, r5 + 1);
}

// ---------------------------------------------------------------------------------------------

/// Expands each case into `etcd::<case>` and `embedded::<case>` tests.
macro_rules! conformance {
    ($($case:ident),* $(,)?) => {
        mod etcd {
            $(
                #[tokio::test]
                async fn $case() {
                    super::$case(testkit::Backend::Etcd).await;
                }
            )*
        }
        mod embedded {
            $(
                #[tokio::test]
                async fn $case() {
                    super::$case(super::common::embedded_backend()).await;
                }
            )*
        }
    };
}

conformance! {
    status_reports_revision_and_version,
    revisions_are_global_and_strictly_increasing,
    version_resets_after_delete,
    put_prev_kv,
    put_ignore_value,
    put_ignore_lease,
    empty_key_is_rejected,
    range_single_and_missing_key,
    range_prefix,
    range_explicit_end_is_half_open,
    range_from_key_with_nul_end,
    range_all_keys,
    range_inverted_returns_nothing,
    keys_with_nul_and_ff_bytes,
    prefix_of_ff_bytes,
    range_limit_more_count,
    range_count_only_and_keys_only,
    range_historical_revisions,
    range_future_revision_errors,
    range_compacted_revision_errors,
    range_sort_by_key,
    range_sort_by_create_and_mod_revision,
    range_sort_by_version,
    range_sort_by_value,
    range_sort_applies_before_limit,
    range_min_max_revision_filters,
    delete_single_key,
    delete_prefix_with_prev_kv,
    delete_from_key,
    delete_nothing_keeps_revision,
    txn_compare_value,
    txn_compare_version,
    txn_compare_create_and_mod_revision,
    txn_compare_lease,
    txn_compare_missing_key,
    txn_compare_with_range,
    txn_success_and_failure_branches,
    txn_multiple_compares_are_anded,
    txn_nested,
    txn_ops_share_one_revision,
    txn_inner_response_headers,
    txn_duplicate_key_is_rejected,
    txn_read_only_keeps_revision,
    txn_duplicate_keys_in_nested_txns,
    txn_too_many_ops,
    txn_range_revision_errors,
    txn_reads_see_earlier_writes,
    txn_put_with_unknown_lease_fails,
    compact_basic,
    compact_future_revision_errors,
    compact_twice_errors,
    compacted_deleted_key_stays_gone,
    watch_single_key,
    watch_delete_event_is_a_tombstone,
    watch_prefix_and_range,
    watch_replays_history_from_past_revision,
    watch_resume_after_break,
    watch_from_compacted_revision,
    watch_prev_kv,
    watch_filters,
    watch_cancel,
    watch_several_on_one_stream,
    watch_events_of_one_txn_in_one_response,
    watch_progress_notify,
    watch_progress_request,
    watch_start_revision_in_future_waits,
    watch_explicit_ids_and_refused_watches,
    watch_survives_compaction,
    watch_delete_range_and_lease_events,
    lease_grant_minimum_ttl,
    lease_grant_and_list,
    lease_put_and_time_to_live,
    lease_keep_alive,
    lease_revoke_deletes_keys_in_one_revision,
    lease_revoke_without_keys_keeps_revision,
    lease_unknown_errors,
    lease_expiry_deletes_keys_in_one_revision,
    lease_kept_alive_does_not_expire,
    lease_keys_follow_reattachment,
    put_empty_value,
    max_request_bytes_is_enforced,
    default_max_request_bytes_is_1_5_mib,
    concurrent_writers_get_unique_contiguous_revisions,
    restart_preserves_state,
    watch_slow_reader_misses_nothing,
    mtls_requires_a_trusted_client_cert,
}
