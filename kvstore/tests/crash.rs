//! Crash safety of the embedded store (`kvstore serve`): SIGKILL under concurrent writes, restart
//! on the same data dir, and check that nothing acknowledged was lost or changed.
//!
//! Each round: several tasks (one connection each) issue puts, leased puts, deletes, two-key
//! txns and lease grants, journaling every attempt before sending it and every acknowledgement
//! with the revision the server returned. At a random moment the server is SIGKILLed and
//! restarted. Then:
//! - it opens cleanly (ready again, no panic in its log);
//! - every acknowledged write is present with exactly its acknowledged mod_revision, or was
//!   superseded by a later write of the same key (acknowledged, or in flight at the crash);
//!   every value present was actually written; a txn's two keys are never half-applied;
//! - acknowledged revisions are unique and increase per connection; the current revision is at
//!   least the highest acknowledged one;
//! - historical reads at acknowledged revisions return the acknowledged values;
//! - acknowledged leases still exist; a completed compaction stays in force;
//! - the state of every earlier round is unchanged by later crashes;
//! - the store keeps accepting writes, with increasing revisions.
//!
//! `CRASH_ROUNDS` (default 20) sets the number of rounds, `CRASH_SEED` replays a run; the seed
//! is printed at the start.

mod common;

use common::embedded_backend;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use etcd_client::{Client, Compare, CompareOp, GetOptions, PutOptions, Txn, TxnOp};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use testkit::{Backend, StoreOptions, StoreProcess};

const WRITERS: usize = 4;
const KEYS_PER_ROUND: usize = 12;
const LEASE_TTL: i64 = 3600;
const OP_TIMEOUT: Duration = Duration::from_secs(3);
/// At most this many acknowledged writes per round are re-read at their revision.
const HISTORY_SAMPLE: usize = 300;

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().map(|v| {
        v.trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a number"))
    })
}

/// A value as written or read back. Values are mostly short but some are hundreds of KiB (to
/// push real volume through the store), so `Debug` shows only their head.
#[derive(Clone, PartialEq, Eq)]
struct Val(String);

impl std::fmt::Debug for Val {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        const HEAD: usize = 40;
        if self.0.len() <= HEAD + 8 {
            write!(f, "{:?}", self.0)
        } else {
            let head: String = self.0.chars().take(HEAD).collect();
            write!(f, "{head:?}..(+{} bytes)", self.0.len() - head.len())
        }
    }
}

/// A unique tag, padded: usually to a few bytes, one time in ten to 16..256 KiB.
fn padded(tag: String, rng: &mut StdRng) -> Val {
    let pad = if rng.random_bool(0.1) {
        rng.random_range(16 * 1024..256 * 1024)
    } else {
        rng.random_range(0..64)
    };
    let fill = char::from(b'a' + rng.random_range(0..26u8));
    let mut v = tag;
    v.push('|');
    v.extend(std::iter::repeat_n(fill, pad));
    Val(v)
}

/// What one journaled operation wrote.
#[derive(Debug, Clone, PartialEq)]
enum Write {
    Put { value: Val, lease: i64 },
    Delete,
}

/// One write attempt: journaled before it is sent, `acked` filled in from the response.
#[derive(Debug, Clone)]
struct Op {
    task: usize,
    /// One key, or the two keys of a txn (both written at the same revision).
    keys: Vec<String>,
    write: Write,
    /// The revision the server acknowledged.
    acked: Option<i64>,
    /// An acknowledged delete that deleted nothing (not a write, no new revision).
    noop: bool,
}

#[derive(Debug, Default)]
struct Journal {
    ops: Vec<Op>,
    /// Acknowledged lease grants (id, ttl).
    leases: Vec<(i64, i64)>,
    /// Failures while the server was supposed to be up: always a bug.
    errors_before_kill: Vec<String>,
}

/// A kv as read back: (value, create_revision, mod_revision, version, lease).
type Row = (Val, i64, i64, i64, i64);

fn row(kv: &etcd_client::KeyValue) -> (String, Row) {
    (
        String::from_utf8_lossy(kv.key()).into_owned(),
        (
            Val(String::from_utf8_lossy(kv.value()).into_owned()),
            kv.create_revision(),
            kv.mod_revision(),
            kv.version(),
            kv.lease(),
        ),
    )
}

async fn read_prefix(c: &mut Client, prefix: &str) -> (i64, BTreeMap<String, Row>) {
    let resp = c
        .get(prefix, Some(GetOptions::new().with_prefix()))
        .await
        .unwrap_or_else(|e| panic!("range {prefix}: {e}"));
    let rev = resp.header().expect("range header").revision();
    (rev, resp.kvs().iter().map(row).collect())
}

/// One writer task: random operations until an error (the crash) or `stop`.
async fn writer(
    task: usize,
    mut client: Client,
    mut rng: StdRng,
    prefix: String,
    journal: Arc<Mutex<Journal>>,
    killed: Arc<AtomicBool>,
) {
    let mut lease: Option<i64> = None;
    let mut seq = 0u64;
    loop {
        seq += 1;
        let key = |rng: &mut StdRng| format!("{prefix}k{:02}", rng.random_range(0..KEYS_PER_ROUND));
        let value = padded(format!("t{task}-s{seq}"), &mut rng);
        let dice = rng.random_range(0..100);

        if dice < 5 || (lease.is_none() && dice < 15) {
            // Lease grant: no revision, journaled only when acknowledged.
            let why =
                match tokio::time::timeout(OP_TIMEOUT, client.lease_grant(LEASE_TTL, None)).await {
                    Ok(Ok(resp)) => {
                        lease = Some(resp.id());
                        journal.lock().unwrap().leases.push((resp.id(), LEASE_TTL));
                        continue;
                    }
                    Ok(Err(e)) => e.to_string(),
                    Err(_) => "timed out".to_string(),
                };
            if !killed.load(Ordering::SeqCst) {
                journal
                    .lock()
                    .unwrap()
                    .errors_before_kill
                    .push(format!("task {task}: lease grant: {why}"));
            }
            return;
        }

        let (keys, write, kind) = if dice < 60 {
            let k = key(&mut rng);
            (vec![k], Write::Put { value, lease: 0 }, 0)
        } else if dice < 72 {
            let k = key(&mut rng);
            match lease {
                Some(id) => (vec![k], Write::Put { value, lease: id }, 0),
                None => (vec![k], Write::Put { value, lease: 0 }, 0),
            }
        } else if dice < 85 {
            let k = key(&mut rng);
            (vec![k], Write::Delete, 1)
        } else {
            let a = key(&mut rng);
            let mut b = key(&mut rng);
            while b == a {
                b = key(&mut rng);
            }
            let value = Val(format!("txn-{}", value.0));
            (vec![a, b], Write::Put { value, lease: 0 }, 2)
        };

        let index = {
            let mut j = journal.lock().unwrap();
            j.ops.push(Op {
                task,
                keys: keys.clone(),
                write: write.clone(),
                acked: None,
                noop: false,
            });
            j.ops.len() - 1
        };

        let result: Result<(i64, bool), String> = match (&write, kind) {
            (Write::Put { value, lease }, 0) => {
                let opts = (*lease != 0).then(|| PutOptions::new().with_lease(*lease));
                match tokio::time::timeout(
                    OP_TIMEOUT,
                    client.put(keys[0].as_str(), value.0.as_str(), opts),
                )
                .await
                {
                    Ok(Ok(resp)) => Ok((resp.header().expect("put header").revision(), false)),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => Err("timed out".into()),
                }
            }
            (Write::Delete, _) => {
                match tokio::time::timeout(OP_TIMEOUT, client.delete(keys[0].as_str(), None)).await
                {
                    Ok(Ok(resp)) => Ok((
                        resp.header().expect("delete header").revision(),
                        resp.deleted() == 0,
                    )),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => Err("timed out".into()),
                }
            }
            (Write::Put { value, .. }, _) => {
                let txn = Txn::new()
                    .when([Compare::version(keys[0].as_str(), CompareOp::Greater, -1)])
                    .and_then([
                        TxnOp::put(keys[0].as_str(), value.0.as_str(), None),
                        TxnOp::put(keys[1].as_str(), value.0.as_str(), None),
                    ]);
                match tokio::time::timeout(OP_TIMEOUT, client.txn(txn)).await {
                    Ok(Ok(resp)) if resp.succeeded() => {
                        Ok((resp.header().expect("txn header").revision(), false))
                    }
                    Ok(Ok(resp)) => Err(format!("always-true txn did not succeed: {resp:?}")),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => Err("timed out".into()),
                }
            }
        };
        match result {
            Ok((rev, noop)) => {
                let mut j = journal.lock().unwrap();
                j.ops[index].acked = Some(rev);
                j.ops[index].noop = noop;
            }
            Err(e) => {
                if !killed.load(Ordering::SeqCst) {
                    journal
                        .lock()
                        .unwrap()
                        .errors_before_kill
                        .push(format!("task {task}: {:?} {keys:?}: {e}", write));
                }
                return;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_sigkill() {
    crash_rounds(embedded_backend()).await
}

/// The same run against real etcd, which is crash safe: validates the checker itself.
/// `cargo test -p kvstore --test crash -- --ignored`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "validates the checker against etcd; run with --ignored"]
async fn checker_passes_on_etcd() {
    crash_rounds(Backend::Etcd).await
}

async fn crash_rounds(backend: Backend) {
    let rounds = env_u64("CRASH_ROUNDS").unwrap_or(20);
    let seed = env_u64("CRASH_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
    });
    eprintln!("crash test: {rounds} rounds, seed {seed} (replay with CRASH_SEED={seed})");
    let started = Instant::now();

    let name = backend.name();
    let mut store = StoreProcess::start(backend, StoreOptions::default())
        .await
        .unwrap_or_else(|e| panic!("start {name}: {e}"));

    let mut snapshots: BTreeMap<u64, BTreeMap<String, Row>> = BTreeMap::new();
    let mut all_leases: Vec<(i64, i64)> = Vec::new();
    let mut compacted: Option<i64> = None;

    for round in 0..rounds {
        let mut rng = StdRng::seed_from_u64(seed.wrapping_add(round.wrapping_mul(0x9e37_79b9)));
        let prefix = format!("crash/r{round:03}/");

        // Every fifth round starts with a (physical) compaction at the current revision.
        if round % 5 == 4 {
            let mut c = store.client().await;
            let rev = c
                .get(
                    "crash/",
                    Some(GetOptions::new().with_prefix().with_count_only()),
                )
                .await
                .unwrap_or_else(|e| panic!("round {round}: count before compaction: {e}"))
                .header()
                .expect("range header")
                .revision();
            c.compact(
                rev,
                Some(etcd_client::CompactionOptions::new().with_physical()),
            )
            .await
            .unwrap_or_else(|e| panic!("round {round}: compact at {rev}: {e}"));
            compacted = Some(rev);
        }

        let journal = Arc::new(Mutex::new(Journal::default()));
        let killed = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        for task in 0..WRITERS {
            let client = store.client().await;
            let task_rng = StdRng::seed_from_u64(rng.random());
            tasks.push(tokio::spawn(writer(
                task,
                client,
                task_rng,
                prefix.clone(),
                Arc::clone(&journal),
                Arc::clone(&killed),
            )));
        }
        let delay = Duration::from_millis(rng.random_range(30..400));
        tokio::time::sleep(delay).await;
        killed.store(true, Ordering::SeqCst);
        store.kill();
        for t in tasks {
            tokio::time::timeout(OP_TIMEOUT * 3, t)
                .await
                .expect("writer stops after the kill")
                .expect("writer task panicked");
        }

        let restart = Instant::now();
        store.restart().await.unwrap_or_else(|e| {
            panic!("round {round} (seed {seed}): restart after SIGKILL failed: {e}")
        });
        let restart_time = restart.elapsed();

        let journal = std::mem::take(&mut *journal.lock().unwrap());
        assert!(
            journal.errors_before_kill.is_empty(),
            "round {round} (seed {seed}): writes failed while the server was up: {:?}",
            journal.errors_before_kill
        );
        all_leases.extend(journal.leases.iter().copied());

        let mut c = store.client().await;
        let ctx = format!("round {round} (seed {seed}, killed after {delay:?})");
        let (cur_rev, state) = read_prefix(&mut c, &prefix).await;
        verify_round(&ctx, &journal, cur_rev, &state);
        verify_history(&ctx, &mut c, &journal, &state, &mut rng).await;
        verify_leases(&ctx, &mut c, &all_leases, &state).await;
        if let Some(rev) = compacted.filter(|&r| r > 1) {
            let err = c
                .get(
                    "crash/",
                    Some(
                        GetOptions::new()
                            .with_prefix()
                            .with_keys_only()
                            .with_revision(rev - 1),
                    ),
                )
                .await
                .err()
                .unwrap_or_else(|| {
                    panic!(
                        "{ctx}: read at {} succeeded after compaction at {rev}",
                        rev - 1
                    )
                });
            assert!(
                err.to_string().contains("compacted"),
                "{ctx}: read below the compaction revision {rev}: expected 'required revision \
                 has been compacted', got {err}"
            );
        }
        for (old_round, snap) in &snapshots {
            let (_, now) = read_prefix(&mut c, &format!("crash/r{old_round:03}/")).await;
            assert_eq!(
                &now, snap,
                "{ctx}: state of round {old_round} changed by a later crash"
            );
        }

        // The store keeps accepting writes, with increasing revisions.
        let mut last = cur_rev;
        for i in 0..5 {
            let resp = c
                .put(format!("{prefix}after/{i}"), "after", None)
                .await
                .unwrap_or_else(|e| panic!("{ctx}: put after restart: {e}"));
            let rev = resp.header().expect("put header").revision();
            assert!(
                rev > last,
                "{ctx}: revision {rev} after restart is not above {last}"
            );
            last = rev;
        }
        let (_, snap) = read_prefix(&mut c, &prefix).await;
        snapshots.insert(round, snap);

        let acked = journal.ops.iter().filter(|o| o.acked.is_some()).count();
        eprintln!(
            "round {round}: killed after {delay:?}, {acked}/{} writes acked, {} leases, \
             revision {cur_rev}, restart {restart_time:?}",
            journal.ops.len(),
            journal.leases.len()
        );
    }

    let log = std::fs::read_to_string(store.log_path()).unwrap_or_default();
    assert!(
        !log.contains("panicked at"),
        "the server panicked during the crash test:\n{}",
        store.log_tail()
    );
    eprintln!("crash test: {rounds} rounds in {:?}", started.elapsed());
}

/// Checks the state of one round's keys against its journal.
fn verify_round(ctx: &str, journal: &Journal, cur_rev: i64, state: &BTreeMap<String, Row>) {
    let writes: Vec<&Op> = journal
        .ops
        .iter()
        .filter(|o| o.acked.is_some() && !o.noop)
        .collect();

    // Revisions: unique per write (a txn's keys share one), increasing per connection.
    let mut revs: Vec<i64> = writes.iter().filter_map(|o| o.acked).collect();
    revs.sort_unstable();
    if let Some(w) = revs.windows(2).find(|w| w[0] == w[1]) {
        panic!(
            "{ctx}: two acknowledged writes got the same revision {}",
            w[0]
        );
    }
    if let Some(&max) = revs.last() {
        assert!(
            cur_rev >= max,
            "{ctx}: current revision {cur_rev} is below the acknowledged revision {max}"
        );
    }
    for task in 0..WRITERS {
        let mut last = 0;
        for op in writes.iter().filter(|o| o.task == task) {
            let rev = op.acked.unwrap();
            assert!(
                rev > last,
                "{ctx}: task {task} got revision {rev} after {last}"
            );
            last = rev;
        }
    }

    // Every key ever written this round (plus any unexpected key present).
    let mut keys: Vec<&String> = journal.ops.iter().flat_map(|o| o.keys.iter()).collect();
    keys.extend(state.keys().filter(|k| !k.contains("/after/")));
    keys.sort();
    keys.dedup();

    for key in keys {
        let ops: Vec<&Op> = journal
            .ops
            .iter()
            .filter(|o| o.keys.contains(key) && !o.noop)
            .collect();
        let last_acked = ops
            .iter()
            .filter(|o| o.acked.is_some())
            .max_by_key(|o| o.acked);
        match state.get(key) {
            Some((value, _create, m, _version, lease)) => {
                let m = *m;
                if let Some(la) = last_acked {
                    let r = la.acked.unwrap();
                    assert!(
                        m >= r,
                        "{ctx}: {key} has mod_revision {m}, but a write at {r} was acknowledged \
                         ({:?})",
                        la.write
                    );
                }
                // The op that wrote the present value.
                let writer = ops
                    .iter()
                    .find(|o| matches!(&o.write, Write::Put { value: v, .. } if v == value));
                let Some(writer) = writer else {
                    panic!("{ctx}: {key} = {value:?} at {m} was never written")
                };
                match writer.acked {
                    Some(r) => assert_eq!(
                        r, m,
                        "{ctx}: {key} = {value:?} was acknowledged at revision {r}, but reads \
                         back with mod_revision {m}"
                    ),
                    None => assert!(
                        last_acked.is_none_or(|la| la.acked.unwrap() < m),
                        "{ctx}: {key} = {value:?} (in flight at the crash) hides a later \
                         acknowledged write"
                    ),
                }
                if let Write::Put { lease: l, .. } = writer.write {
                    assert_eq!(*lease, l, "{ctx}: {key} = {value:?} has the wrong lease");
                }
                assert!(
                    m <= cur_rev,
                    "{ctx}: {key} mod_revision {m} > current {cur_rev}"
                );
            }
            None => {
                if let Some(la) = last_acked
                    && matches!(la.write, Write::Put { .. })
                {
                    let r = la.acked.unwrap();
                    let deleted_in_flight = ops
                        .iter()
                        .any(|o| o.acked.is_none() && o.write == Write::Delete);
                    assert!(
                        deleted_in_flight,
                        "{ctx}: acknowledged write {key} = {:?} at revision {r} is lost",
                        la.write
                    );
                }
            }
        }
    }
}

/// Historical reads at acknowledged revisions, and txn atomicity of present values.
async fn verify_history(
    ctx: &str,
    c: &mut Client,
    journal: &Journal,
    state: &BTreeMap<String, Row>,
    rng: &mut StdRng,
) {
    let mut checks: Vec<(String, Option<Val>, i64)> = Vec::new();
    for op in journal.ops.iter().filter(|o| o.acked.is_some() && !o.noop) {
        let rev = op.acked.unwrap();
        for key in &op.keys {
            let expect = match &op.write {
                Write::Put { value, .. } => Some(value.clone()),
                Write::Delete => None,
            };
            checks.push((key.clone(), expect, rev));
        }
    }
    while checks.len() > HISTORY_SAMPLE {
        let i = rng.random_range(0..checks.len());
        checks.swap_remove(i);
    }
    for (key, expect, rev) in checks {
        let resp = c
            .get(key.as_str(), Some(GetOptions::new().with_revision(rev)))
            .await
            .unwrap_or_else(|e| panic!("{ctx}: read {key} at acknowledged revision {rev}: {e}"));
        let got = resp.kvs().first().map(row);
        match (&expect, &got) {
            (None, None) => {}
            (Some(v), Some((_, (gv, _, m, _, _)))) if v == gv && *m == rev => {}
            _ => panic!(
                "{ctx}: {key} at revision {rev}: expected {expect:?} (mod_revision {rev}), \
                 got {got:?}"
            ),
        }
    }

    // A txn writes both its keys or neither: the partner of a present txn value must hold the
    // same value at that revision.
    for (key, (value, _, m, _, _)) in state {
        if !value.0.starts_with("txn-") {
            continue;
        }
        let op = journal
            .ops
            .iter()
            .find(|o| matches!(&o.write, Write::Put { value: v, .. } if v == value))
            .unwrap_or_else(|| panic!("{ctx}: {key} = {value:?} was never written"));
        for partner in op.keys.iter().filter(|k| *k != key) {
            let resp = c
                .get(partner.as_str(), Some(GetOptions::new().with_revision(*m)))
                .await
                .unwrap_or_else(|e| panic!("{ctx}: read {partner} at {m}: {e}"));
            let got = resp.kvs().first().map(row);
            assert!(
                matches!(&got, Some((_, (v, _, pm, _, _))) if v == value && pm == m),
                "{ctx}: txn {value:?} at {m} is half-applied: {key} has it, {partner} at {m} \
                 is {got:?}"
            );
        }
    }
}

/// Every acknowledged lease still exists; every leased key names a live lease.
async fn verify_leases(
    ctx: &str,
    c: &mut Client,
    leases: &[(i64, i64)],
    state: &BTreeMap<String, Row>,
) {
    let mut granted: HashMap<i64, i64> = HashMap::new();
    for &(id, ttl) in leases {
        let resp = c
            .lease_time_to_live(id, None)
            .await
            .unwrap_or_else(|e| panic!("{ctx}: time-to-live of acknowledged lease {id:x}: {e}"));
        assert!(
            resp.ttl() > 0 && resp.granted_ttl() == ttl,
            "{ctx}: acknowledged lease {id:x} (ttl {ttl}) after restart: ttl {}, granted {}",
            resp.ttl(),
            resp.granted_ttl()
        );
        granted.insert(id, ttl);
    }
    for (key, (_, _, _, _, lease)) in state {
        assert!(
            *lease == 0 || granted.contains_key(lease),
            "{ctx}: {key} is attached to lease {lease:x}, which was never acknowledged"
        );
    }
}
