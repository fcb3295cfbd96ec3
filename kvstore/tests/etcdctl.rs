//! Interop with the real etcd client: Debian's `etcdctl` (API v3) over mTLS drives each backend.
//!
//! Every scenario is written once as `async fn scenario(backend)` and instantiated for both
//! backends by `both!`, giving tests named `scenario::etcd` and `scenario::embedded`. Real etcd
//! is the oracle: a scenario that fails on `embedded` but passes on `etcd` is a server bug.
//!
//! etcdctl's JSON output encodes keys and values as base64 and omits zero-valued fields
//! (`"type"` of a PUT event, `"succeeded": false`, `"count": 0`), which the helpers account for.

mod common;

use common::both;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use testkit::{Backend, CertFiles, StoreOptions, StoreProcess, TestPki};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

both!(
    put_get_del,
    txn_interactive,
    watch_from_revision,
    lease_lifecycle,
    endpoint_status_and_health,
    compaction,
    member_list_and_cluster_status,
    hashkv_follows_the_history,
);

/// A TLS store with client-certificate auth, and an etcdctl bound to it.
struct Fixture {
    store: StoreProcess,
    ctl: Ctl,
}

async fn fixture(backend: Backend) -> Fixture {
    let pki = Arc::new(TestPki::generate());
    let opts = StoreOptions {
        tls: Some(Arc::clone(&pki)),
        ..Default::default()
    };
    let name = backend.name();
    let store = StoreProcess::start(backend, opts)
        .await
        .unwrap_or_else(|e| panic!("start {name}: {e}"));
    let ctl = Ctl {
        endpoint: store.endpoint(),
        certs: pki.client("etcdctl"),
        _pki: pki,
    };
    Fixture { store, ctl }
}

/// Runs `etcdctl` against one endpoint with one client certificate.
struct Ctl {
    endpoint: String,
    certs: CertFiles,
    _pki: Arc<TestPki>,
}

#[derive(Debug)]
struct Out {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Ctl {
    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("etcdctl");
        cmd.env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", self.endpoint))
            .arg(format!("--cacert={}", self.certs.ca.display()))
            .arg(format!("--cert={}", self.certs.cert.display()))
            .arg(format!("--key={}", self.certs.key.display()))
            .arg("--dial-timeout=5s")
            .arg("--command-timeout=10s")
            .args(args)
            .kill_on_drop(true);
        cmd
    }

    async fn run(&self, args: &[&str], stdin: Option<&str>) -> Out {
        let mut cmd = self.command(args);
        cmd.stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .expect("spawn etcdctl (is etcd-client installed?)");
        if let Some(input) = stdin {
            use tokio::io::AsyncWriteExt;
            let mut pipe = child.stdin.take().expect("stdin piped");
            pipe.write_all(input.as_bytes())
                .await
                .expect("write etcdctl stdin");
            drop(pipe);
        }
        let output = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
            .await
            .unwrap_or_else(|_| panic!("etcdctl {args:?} did not finish within 30 s"))
            .expect("wait for etcdctl");
        Out {
            code: output.status.code(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }

    /// Runs and asserts exit status 0; returns stdout.
    async fn ok_with(&self, args: &[&str], stdin: Option<&str>) -> String {
        let out = self.run(args, stdin).await;
        assert_eq!(out.code, Some(0), "etcdctl {args:?} failed: {out:#?}");
        out.stdout
    }

    async fn ok(&self, args: &[&str]) -> String {
        self.ok_with(args, None).await
    }

    /// Runs with `-w json` and parses stdout.
    async fn json_with(&self, args: &[&str], stdin: Option<&str>) -> Value {
        let mut all = args.to_vec();
        all.extend(["-w", "json"]);
        let text = self.ok_with(&all, stdin).await;
        serde_json::from_str(text.trim())
            .unwrap_or_else(|e| panic!("etcdctl {all:?} printed invalid JSON ({e}): {text:?}"))
    }

    async fn json(&self, args: &[&str]) -> Value {
        self.json_with(args, None).await
    }

    /// Starts a long-running etcdctl (watch) with stdout piped.
    fn spawn(&self, args: &[&str]) -> Child {
        self.command(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn etcdctl")
    }
}

// ---------------------------------------------------------------------------------------------
// JSON helpers

fn b64_decode(s: &str) -> Vec<u8> {
    fn sextet(c: u8) -> u32 {
        match c {
            b'A'..=b'Z' => u32::from(c - b'A'),
            b'a'..=b'z' => u32::from(c - b'a') + 26,
            b'0'..=b'9' => u32::from(c - b'0') + 52,
            b'+' => 62,
            b'/' => 63,
            _ => panic!("invalid base64 byte {c:#x}"),
        }
    }
    let bytes: Vec<u8> = s.bytes().filter(|&c| c != b'=').collect();
    let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
    for chunk in bytes.chunks(4) {
        let mut acc = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            acc |= sextet(c) << (18 - 6 * i);
        }
        let n = chunk.len() * 6 / 8;
        for i in 0..n {
            out.push((acc >> (16 - 8 * i)) as u8);
        }
    }
    out
}

/// A base64 JSON string field decoded as UTF-8 text; a missing field is "" (etcdctl omits
/// empty byte strings).
fn text(v: &Value, field: &str) -> String {
    match v.get(field) {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => String::from_utf8(b64_decode(s)).expect("utf-8 key/value"),
        Some(other) => panic!("field {field} is not a string: {other}"),
    }
}

/// An integer field; missing means 0 (omitted zero value).
fn int(v: &Value, field: &str) -> i64 {
    match v.get(field) {
        None | Some(Value::Null) => 0,
        Some(n) => n
            .as_i64()
            .or_else(|| n.as_u64().map(|u| u as i64))
            .unwrap_or_else(|| panic!("field {field} is not an integer: {n}")),
    }
}

fn header_rev(v: &Value) -> i64 {
    int(
        v.get("header")
            .unwrap_or_else(|| panic!("no header in {v}")),
        "revision",
    )
}

fn kvs(v: &Value) -> Vec<Value> {
    match v.get("kvs") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) => a.clone(),
        Some(other) => panic!("kvs is not an array: {other}"),
    }
}

/// (key, value, create_revision, mod_revision, version) of one JSON kv.
fn kv_tuple(kv: &Value) -> (String, String, i64, i64, i64) {
    (
        text(kv, "key"),
        text(kv, "value"),
        int(kv, "create_revision"),
        int(kv, "mod_revision"),
        int(kv, "version"),
    )
}

async fn put_rev(ctl: &Ctl, key: &str, value: &str) -> i64 {
    header_rev(&ctl.json(&["put", key, value]).await)
}

// ---------------------------------------------------------------------------------------------
// Scenarios

async fn put_get_del(backend: Backend) {
    let f = fixture(backend).await;
    let ctl = &f.ctl;

    assert_eq!(ctl.ok(&["put", "foo/a", "1"]).await.trim(), "OK");
    let r1 = header_rev(&ctl.json(&["get", "foo/a"]).await);
    let r2 = put_rev(ctl, "foo/b", "2").await;
    let r3 = put_rev(ctl, "foo/a", "3").await;
    let r4 = put_rev(ctl, "fop", "outside").await;
    assert_eq!(
        (r2, r3, r4),
        (r1 + 1, r1 + 2, r1 + 3),
        "each put is one revision"
    );

    let got = ctl.json(&["get", "--prefix", "foo/"]).await;
    assert_eq!(
        header_rev(&got),
        r4,
        "header revision of a range is the store's: {got}"
    );
    assert_eq!(int(&got, "count"), 2, "{got}");
    let rows: Vec<_> = kvs(&got).iter().map(kv_tuple).collect();
    assert_eq!(
        rows,
        vec![
            ("foo/a".into(), "3".into(), r1, r3, 2),
            ("foo/b".into(), "2".into(), r2, r2, 1),
        ],
        "kvs of get --prefix foo/: {got}"
    );

    // Historical read, and the plain output format.
    let old = ctl.json(&["get", "foo/a", "--rev", &r1.to_string()]).await;
    let old_rows: Vec<_> = kvs(&old).iter().map(kv_tuple).collect();
    assert_eq!(
        old_rows,
        vec![("foo/a".into(), "1".into(), r1, r1, 1)],
        "{old}"
    );
    assert_eq!(ctl.ok(&["get", "foo/a"]).await, "foo/a\n3\n");
    assert_eq!(
        ctl.ok(&["get", "--prefix", "foo/", "--keys-only"]).await,
        "foo/a\n\nfoo/b\n\n"
    );
    let limited = ctl.json(&["get", "--prefix", "foo/", "--limit", "1"]).await;
    assert_eq!(kvs(&limited).len(), 1, "{limited}");
    assert_eq!(
        int(&limited, "count"),
        2,
        "count ignores the limit: {limited}"
    );
    assert_eq!(limited.get("more"), Some(&Value::Bool(true)), "{limited}");

    let del = ctl.json(&["del", "--prefix", "foo/"]).await;
    assert_eq!(int(&del, "deleted"), 2, "{del}");
    assert_eq!(
        header_rev(&del),
        r4 + 1,
        "one delete is one revision: {del}"
    );

    let empty = ctl.json(&["get", "--prefix", "foo/"]).await;
    assert!(kvs(&empty).is_empty(), "{empty}");
    assert_eq!(int(&empty, "count"), 0, "{empty}");
    assert_eq!(header_rev(&empty), r4 + 1);

    // Deleting nothing is not a write.
    assert_eq!(ctl.ok(&["del", "--prefix", "foo/"]).await.trim(), "0");
    let still = ctl.json(&["get", "fop"]).await;
    assert_eq!(
        header_rev(&still),
        r4 + 1,
        "an empty delete must not bump the revision"
    );
    assert_eq!(text(&kvs(&still)[0], "value"), "outside");
}

async fn txn_interactive(backend: Backend) {
    let f = fixture(backend).await;
    let ctl = &f.ctl;
    let r1 = put_rev(ctl, "t/k", "v1").await;

    // compares, blank line, success ops, blank line, failure ops, blank line.
    let input = format!(
        "value(\"t/k\") = \"v1\"\nmod(\"t/k\") = \"{r1}\"\nversion(\"t/absent\") = \"0\"\n\n\
         put t/k v2\nput t/new n\nget t/k\n\n\
         put t/fail x\n\n"
    );
    let ok = ctl.json_with(&["txn"], Some(&input)).await;
    assert_eq!(ok.get("succeeded"), Some(&Value::Bool(true)), "{ok}");
    assert_eq!(
        header_rev(&ok),
        r1 + 1,
        "a txn with writes is one revision: {ok}"
    );
    let responses = ok["responses"].as_array().expect("responses array");
    assert_eq!(responses.len(), 3, "{ok}");
    assert!(
        responses[0]["Response"].get("ResponsePut").is_some(),
        "{ok}"
    );
    assert!(
        responses[1]["Response"].get("ResponsePut").is_some(),
        "{ok}"
    );
    let range = &responses[2]["Response"]["ResponseRange"];
    let in_txn: Vec<_> = kvs(range).iter().map(kv_tuple).collect();
    assert_eq!(
        in_txn,
        vec![("t/k".into(), "v2".into(), r1, r1 + 1, 2)],
        "a get inside the txn sees its earlier puts: {ok}"
    );
    let new = ctl.json(&["get", "t/new"]).await;
    assert_eq!(int(&kvs(&new)[0], "mod_revision"), r1 + 1, "{new}");

    // The failure branch: value compare no longer holds.
    let input = "value(\"t/k\") = \"v1\"\n\nput t/k nope\n\nput t/fail x\ndel t/new\n\n";
    let failed = ctl.json_with(&["txn"], Some(input)).await;
    assert_ne!(
        failed.get("succeeded"),
        Some(&Value::Bool(true)),
        "{failed}"
    );
    assert_eq!(header_rev(&failed), r1 + 2, "{failed}");
    let responses = failed["responses"].as_array().expect("responses array");
    assert_eq!(responses.len(), 2, "{failed}");
    assert_eq!(
        int(&responses[1]["Response"]["ResponseDeleteRange"], "deleted"),
        1,
        "{failed}"
    );
    let state = ctl.json(&["get", "--prefix", "t/"]).await;
    let rows: Vec<_> = kvs(&state)
        .iter()
        .map(|kv| (text(kv, "key"), text(kv, "value")))
        .collect();
    assert_eq!(
        rows,
        vec![("t/fail".into(), "x".into()), ("t/k".into(), "v2".into())],
        "{state}"
    );

    // Simple output format, a read-only txn (no new revision), create-revision compare.
    let input = "create(\"t/k\") > \"0\"\n\nget t/k\n\n\n";
    let out = ctl.ok_with(&["txn"], Some(input)).await;
    assert!(out.starts_with("SUCCESS\n"), "txn output: {out:?}");
    assert!(out.contains("t/k\nv2\n"), "txn output: {out:?}");
    let after = ctl.json(&["get", "t/k"]).await;
    assert_eq!(
        header_rev(&after),
        r1 + 2,
        "a read-only txn must not bump the revision"
    );
}

/// One event as etcdctl prints it: (type, key, value, mod_revision).
type Ev = (&'static str, String, String, i64);

/// Reads `-w json` watch output lines until `n` events arrived (or 20 s passed).
async fn read_events(child: &mut Child, n: usize) -> Vec<Ev> {
    let stdout = child.stdout.take().expect("stdout piped");
    let mut lines = BufReader::new(stdout).lines();
    let mut events = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while events.len() < n {
        let line = match tokio::time::timeout_at(deadline, lines.next_line()).await {
            Err(_) => panic!(
                "watch: only {} of {n} events within 20 s: {events:?}",
                events.len()
            ),
            Ok(Ok(Some(line))) => line,
            Ok(Ok(None)) => {
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    use tokio::io::AsyncReadExt;
                    let _ = e.read_to_string(&mut err).await;
                }
                panic!("watch ended after {events:?}; stderr: {err}")
            }
            Ok(Err(e)) => panic!("reading watch output: {e}"),
        };
        if line.trim().is_empty() {
            continue;
        }
        let resp: Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("watch printed invalid JSON ({e}): {line}"));
        assert_ne!(
            resp.get("Canceled"),
            Some(&Value::Bool(true)),
            "watch canceled: {resp}"
        );
        for ev in resp
            .get("Events")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let kind = match int(ev, "type") {
                0 => "PUT",
                1 => "DELETE",
                other => panic!("unknown event type {other}: {ev}"),
            };
            let kv = &ev["kv"];
            events.push((
                kind,
                text(kv, "key"),
                text(kv, "value"),
                int(kv, "mod_revision"),
            ));
        }
    }
    events
}

async fn watch_from_revision(backend: Backend) {
    let f = fixture(backend).await;
    let ctl = &f.ctl;
    let r1 = put_rev(ctl, "w/a", "1").await;
    let r2 = put_rev(ctl, "w/b", "2").await;
    let _ = put_rev(ctl, "x/other", "ignored").await;
    let del = ctl.json(&["del", "w/a"]).await;
    let r4 = header_rev(&del);

    let from = r1.to_string();
    // A prefix watch and an explicit [key, range_end) watch, both replaying history from r1.
    let mut prefix = ctl.spawn(&["watch", "--prefix", "w/", "--rev", &from, "-w", "json"]);
    let mut range = ctl.spawn(&["watch", "w/b", "w/d", "--rev", &from, "-w", "json"]);

    // Writes after the watches started (or are starting): delivered either way.
    let r5 = put_rev(ctl, "w/c", "3").await;
    let _ = put_rev(ctl, "w/d", "outside the range").await;
    let r7 = put_rev(ctl, "w/b", "4").await;

    let got = read_events(&mut prefix, 6).await;
    let expected: Vec<Ev> = vec![
        ("PUT", "w/a".into(), "1".into(), r1),
        ("PUT", "w/b".into(), "2".into(), r2),
        ("DELETE", "w/a".into(), String::new(), r4),
        ("PUT", "w/c".into(), "3".into(), r5),
        ("PUT", "w/d".into(), "outside the range".into(), r5 + 1),
        ("PUT", "w/b".into(), "4".into(), r7),
    ];
    assert_eq!(got, expected, "prefix watch from revision {r1}");

    let got = read_events(&mut range, 3).await;
    let expected: Vec<Ev> = vec![
        ("PUT", "w/b".into(), "2".into(), r2),
        ("PUT", "w/c".into(), "3".into(), r5),
        ("PUT", "w/b".into(), "4".into(), r7),
    ];
    assert_eq!(got, expected, "range watch [w/b, w/d) from revision {r1}");

    for mut child in [prefix, range] {
        child.kill().await.expect("kill etcdctl watch");
    }
}

async fn lease_lifecycle(backend: Backend) {
    let f = fixture(backend).await;
    let ctl = &f.ctl;

    let grant = ctl.json(&["lease", "grant", "60"]).await;
    let id = int(&grant, "ID");
    assert!(id > 0, "lease id: {grant}");
    assert_eq!(int(&grant, "TTL"), 60, "{grant}");
    let hex = format!("{id:x}");

    let put = ctl
        .json(&["put", &format!("--lease={hex}"), "l/k", "v"])
        .await;
    let r = header_rev(&put);
    let got = ctl.json(&["get", "l/k"]).await;
    let kv = &kvs(&got)[0];
    assert_eq!(int(kv, "lease"), id, "key attached to the lease: {got}");
    assert_eq!(int(kv, "mod_revision"), r);

    let out = ctl.ok(&["lease", "keep-alive", "--once", &hex]).await;
    assert_eq!(
        out.trim(),
        format!("lease {id:016x} keepalived with TTL(60)"),
        "keep-alive --once output"
    );
    let ka = ctl.json(&["lease", "keep-alive", "--once", &hex]).await;
    assert_eq!((int(&ka, "ID"), int(&ka, "TTL")), (id, 60), "{ka}");

    let ttl = ctl.json(&["lease", "timetolive", "--keys", &hex]).await;
    assert_eq!(int(&ttl, "id"), id, "{ttl}");
    assert_eq!(int(&ttl, "granted-ttl"), 60, "{ttl}");
    let remaining = int(&ttl, "ttl");
    assert!(
        (1..=60).contains(&remaining),
        "remaining ttl {remaining}: {ttl}"
    );
    let keys: Vec<String> = ttl["keys"]
        .as_array()
        .unwrap_or_else(|| panic!("keys array: {ttl}"))
        .iter()
        .map(|k| String::from_utf8(b64_decode(k.as_str().expect("key string"))).unwrap())
        .collect();
    assert_eq!(keys, vec!["l/k".to_string()], "{ttl}");
    let simple = ctl.ok(&["lease", "timetolive", "--keys", &hex]).await;
    assert!(
        simple.contains("granted with TTL(60s)") && simple.contains("attached keys([l/k])"),
        "timetolive output: {simple:?}"
    );

    let list = ctl.json(&["lease", "list"]).await;
    let ids: Vec<i64> = list["leases"]
        .as_array()
        .unwrap_or_else(|| panic!("leases array: {list}"))
        .iter()
        .map(|l| int(l, "id"))
        .collect();
    assert_eq!(ids, vec![id], "{list}");

    let out = ctl.ok(&["lease", "revoke", &hex]).await;
    assert_eq!(out.trim(), format!("lease {id:016x} revoked"));
    let gone = ctl.json(&["get", "l/k"]).await;
    assert!(
        kvs(&gone).is_empty(),
        "revoking deletes attached keys: {gone}"
    );
    assert_eq!(
        header_rev(&gone),
        r + 1,
        "the revoke's delete is one revision: {gone}"
    );
    let ttl = ctl.json(&["lease", "timetolive", &hex]).await;
    assert_eq!(int(&ttl, "ttl"), -1, "revoked lease: {ttl}");
    let out = ctl.ok(&["lease", "timetolive", &hex]).await;
    assert_eq!(out.trim(), format!("lease {id:016x} already expired"));
}

async fn endpoint_status_and_health(backend: Backend) {
    let f = fixture(backend).await;
    let ctl = &f.ctl;
    let rev = put_rev(ctl, "s/k", "v").await;

    let status = ctl.json(&["endpoint", "status"]).await;
    let list = status
        .as_array()
        .unwrap_or_else(|| panic!("status array: {status}"));
    assert_eq!(list.len(), 1, "{status}");
    let entry = &list[0];
    assert_eq!(
        entry["Endpoint"],
        Value::String(f.store.endpoint()),
        "{status}"
    );
    let st = &entry["Status"];
    assert_eq!(header_rev(st), rev, "status header revision: {status}");
    let version = st["version"].as_str().unwrap_or_default();
    assert!(!version.is_empty(), "status has a version: {status}");
    assert!(int(st, "dbSize") > 0, "status has a db size: {status}");
    let member = int(&st["header"], "member_id");
    assert_ne!(member, 0, "status names its member: {status}");
    assert_eq!(
        int(st, "leader"),
        member,
        "a single member leads itself: {status}"
    );

    let simple = ctl.ok(&["endpoint", "status"]).await;
    assert!(simple.starts_with(&f.store.endpoint()), "{simple:?}");

    let out = ctl.run(&["endpoint", "health"], None).await;
    assert_eq!(out.code, Some(0), "endpoint health: {out:#?}");
    let all = format!("{}{}", out.stdout, out.stderr);
    assert!(
        all.contains("is healthy"),
        "endpoint health output: {out:#?}"
    );
}

async fn compaction(backend: Backend) {
    let f = fixture(backend).await;
    let ctl = &f.ctl;
    let r1 = put_rev(ctl, "c", "1").await;
    let r2 = put_rev(ctl, "c", "2").await;
    let r3 = put_rev(ctl, "c", "3").await;

    let out = ctl.ok(&["compaction", &r2.to_string()]).await;
    assert_eq!(out.trim(), format!("compacted revision {r2}"));

    let old = ctl.run(&["get", "c", "--rev", &r1.to_string()], None).await;
    assert_ne!(
        old.code,
        Some(0),
        "read below the compaction succeeded: {old:#?}"
    );
    assert!(
        old.stderr.contains("required revision has been compacted"),
        "read below the compaction: {old:#?}"
    );
    let at = ctl.json(&["get", "c", "--rev", &r2.to_string()]).await;
    let rows: Vec<_> = kvs(&at).iter().map(kv_tuple).collect();
    assert_eq!(rows, vec![("c".into(), "2".into(), r1, r2, 2)], "{at}");

    // A watch from a compacted revision is canceled by the server; etcdctl prints the
    // response (with the compact revision) and exits non-zero.
    let watch = ctl
        .run(
            &["watch", "c", "--rev", &r1.to_string(), "-w", "json"],
            None,
        )
        .await;
    assert_ne!(
        watch.code,
        Some(0),
        "watch from a compacted revision: {watch:#?}"
    );
    let resp: Value = serde_json::from_str(watch.stdout.lines().next().unwrap_or_default())
        .unwrap_or_else(|e| panic!("watch output ({e}): {watch:#?}"));
    assert_eq!(resp["Canceled"], Value::Bool(true), "{resp}");
    assert_eq!(int(&resp, "CompactRevision"), r2, "{resp}");
    assert!(
        watch
            .stderr
            .contains("required revision has been compacted"),
        "watch cancel reason: {watch:#?}"
    );

    let mut ok = ctl.spawn(&["watch", "c", "--rev", &r2.to_string(), "-w", "json"]);
    let got = read_events(&mut ok, 2).await;
    let expected: Vec<Ev> = vec![
        ("PUT", "c".into(), "2".into(), r2),
        ("PUT", "c".into(), "3".into(), r3),
    ];
    assert_eq!(got, expected, "watch from the compaction revision itself");
    ok.kill().await.expect("kill etcdctl watch");
}

/// One member until the store is replicated: `member list` names it with the URL clients
/// reach it at, and `endpoint status --cluster` (which asks the member list where to go)
/// works.
async fn member_list_and_cluster_status(backend: Backend) {
    let f = fixture(backend).await;
    let ctl = &f.ctl;
    let list = ctl.json(&["member", "list"]).await;
    let members = list["members"].as_array().cloned().unwrap_or_default();
    assert_eq!(members.len(), 1, "{list}");
    let urls: Vec<&str> = members[0]["clientURLs"]
        .as_array()
        .map(|u| u.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    assert_eq!(urls, [ctl.endpoint.as_str()], "{list}");
    let id = members[0]["ID"].as_u64().unwrap_or_default();
    assert_eq!(
        id,
        list["header"]["member_id"].as_u64().unwrap_or(1),
        "{list}"
    );

    let status = ctl.json(&["endpoint", "status", "--cluster"]).await;
    let rows = status.as_array().cloned().unwrap_or_default();
    assert_eq!(rows.len(), 1, "{status}");
    assert_eq!(
        rows[0]["Endpoint"].as_str(),
        Some(ctl.endpoint.as_str()),
        "{status}"
    );
    assert_eq!(rows[0]["Status"]["leader"].as_u64(), Some(id), "{status}");
}

/// `endpoint hashkv`: the hash of the history up to a revision changes with a write, stays
/// what it was for an earlier revision, survives a restart, and a future revision is refused.
async fn hashkv_follows_the_history(backend: Backend) {
    let mut f = fixture(backend).await;
    let hashkv = async |ctl: &Ctl, rev: Option<i64>| -> i64 {
        let rev = rev.map(|r| r.to_string());
        let mut args = vec!["endpoint", "hashkv"];
        if let Some(rev) = &rev {
            args.extend(["--rev", rev.as_str()]);
        }
        let out = ctl.json(&args).await;
        out[0]["HashKV"]["hash"]
            .as_i64()
            .unwrap_or_else(|| panic!("{out}"))
    };
    let r1 = put_rev(&f.ctl, "h/a", "1").await;
    let h1 = hashkv(&f.ctl, None).await;
    put_rev(&f.ctl, "h/b", "2").await;
    let h2 = hashkv(&f.ctl, None).await;
    assert_ne!(h1, h2, "a write changes the hash");
    assert_eq!(
        hashkv(&f.ctl, Some(r1)).await,
        h1,
        "the history up to r1 is unchanged"
    );
    f.store.restart().await.expect("restart");
    assert_eq!(
        hashkv(&f.ctl, None).await,
        h2,
        "the hash survives a restart"
    );
    let mut client = f.store.client().await;
    let whole = client.hash().await.expect("hash").hash();
    client.put("h/c", "3", None).await.expect("put");
    let after = client.hash().await.expect("hash").hash();
    assert_ne!(after, whole, "Hash follows writes too");
    let future = f
        .ctl
        .run(&["endpoint", "hashkv", "--rev", "1000000"], None)
        .await;
    assert!(
        future.code != Some(0),
        "a future revision is refused: {future:#?}"
    );
}

#[test]
fn base64_decoder() {
    assert_eq!(b64_decode("Zm9vL2E="), b"foo/a");
    assert_eq!(b64_decode("YmFy"), b"bar");
    assert_eq!(b64_decode("MQ=="), b"1");
    assert_eq!(b64_decode(""), b"");
}
