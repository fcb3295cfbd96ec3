//! Keeps the store equal to what the cluster should publish.
//!
//! One task owns the store side: it holds the lease every published key is attached to, and
//! reconciles by diff — the desired entries (from [`crate::published`]) against what it knows
//! the store holds. The first pass after start (or after the lease was lost) is a full one:
//! it lists what the store holds under our prefixes, rewrites every desired key under the new
//! lease, deletes what should no longer be there, and only then writes each prefix's sync
//! canary, so a reader that waits for the canary never sees a partial state.
//!
//! Of several replicas only the [leader](crate::election) publishes, and each of its writes
//! is guarded by its leadership. A replica that took over from a leader that stopped finds
//! the published state in place under the lease it kept alive: its first pass writes only
//! what differs, and keeps the canaries that vouch for it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cluster_source::{ClusterObjects, SnapshotReceiver};
use kvstore::client::{Guard, LeaseId, Op, StoreClient};
use mesh_translate::{IdentityAllocator, TranslateConfig};
use model::StoreValue;
use model::keys::{HEARTBEAT_KEY, Kind};
use thiserror::Error;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::election::{self, Leadership, Role};
use crate::metrics::Metrics;
use crate::published::{PUBLISHED_KINDS, PublishCache, Published, publish_cached};

/// How the publisher behaves.
#[derive(Debug, Clone)]
pub struct PublisherConfig {
    pub translate: TranslateConfig,
    /// TTL of the lease holding every published key: how long keys outlive a crashed
    /// publisher.
    pub lease_ttl: Duration,
    /// How often `cilium/.heartbeat` is rewritten, so peers can tell a live cluster from a
    /// dead one.
    pub heartbeat_interval: Duration,
    /// Pause before retrying after the store failed.
    pub retry_backoff: Duration,
    /// This replica's name in the leader key, when several replicas publish into one store
    /// (one leads, the others stand by); `None`: the only publisher, no election.
    pub replica: Option<String>,
}

/// What the publisher reports to health checks and logs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PublisherStatus {
    /// The full initial state (and every canary) is in the store.
    pub ready: bool,
    /// Entries currently published, per kind name.
    pub entries: BTreeMap<&'static str, usize>,
    /// The last store error, cleared by the next success.
    pub last_error: Option<String>,
    /// Leading, standing by, or campaigning.
    pub role: Role,
}

/// Errors that stop a publishing pass; the publisher retries after them.
#[derive(Debug, Error)]
pub enum PublishError {
    /// The store refused or failed a request.
    #[error("store: {0}")]
    Store(kvstore::client::Error),
    /// The lease was lost (expired, revoked, or the store was unreachable too long).
    #[error("the lease holding our keys was lost: {0:?}")]
    LeaseLost(kvstore::client::LeaseLost),
    /// Our own cluster configuration cannot allocate identities.
    #[error("cluster configuration: {0}")]
    Config(#[source] model::IdentityError),
    /// The source stopped before it delivered a complete state.
    #[error("the cluster source stopped")]
    SourceStopped,
    /// Another replica took the leadership over (this one had stopped refreshing it).
    #[error("another replica leads now")]
    Deposed,
}

impl From<kvstore::client::Error> for PublishError {
    /// A guarded write refused: the leadership moved on.
    fn from(error: kvstore::client::Error) -> Self {
        if error.is_guard_failed() {
            PublishError::Deposed
        } else {
            PublishError::Store(error)
        }
    }
}

/// What the store is known to hold for us, per kind.
type Known = BTreeMap<Kind, BTreeMap<String, Vec<u8>>>;

/// Runs until `cancel`; publishes every change of `snapshots`.
pub async fn run(
    client: StoreClient,
    config: PublisherConfig,
    mut snapshots: SnapshotReceiver,
    status: watch::Sender<PublisherStatus>,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
) {
    let cluster = config.translate.cluster.name.clone();
    // Health checks say whether this replica stands by, and for whom.
    let report_role = |role: Role| status.send_modify(|s| s.role = role);
    loop {
        let leadership = match &config.replica {
            Some(replica) => {
                election::lead(&client, replica, config.lease_ttl, &report_role, &cancel).await
            }
            None => client
                .grant_lease_with_shutdown(config.lease_ttl, &cancel)
                .await
                .map(|lease| {
                    report_role(Role::Leader);
                    Some(Leadership {
                        lease,
                        guard: None,
                        took_over: false,
                    })
                }),
        };
        let leadership = match leadership {
            Ok(Some(leadership)) => leadership,
            Ok(None) => return,
            Err(error) => {
                let error = daemon::error_chain(&error);
                tracing::warn!(%cluster, %error, "no lease to publish under; retrying");
                if !failed(error, &status, &metrics, config.retry_backoff, &cancel).await {
                    return;
                }
                continue;
            }
        };
        let pass = publish_until_failure(
            &client,
            &config,
            leadership,
            &mut snapshots,
            &status,
            &metrics,
            &cancel,
        );
        match pass.await {
            Ok(()) => return,
            Err(PublishError::Deposed) => {
                tracing::warn!(%cluster, "another replica took the leadership over; standing by");
                metrics.ready.set(0);
                status.send_modify(|s| {
                    s.ready = false;
                    s.role = Role::Campaigning;
                });
                continue;
            }
            // The apiserver watches the source itself and reports a source that stops on
            // its own; on shutdown the source stops too.
            Err(PublishError::SourceStopped) => {
                tracing::debug!(%cluster, "the cluster source stopped; nothing more to publish");
                return;
            }
            Err(error) => {
                let error = daemon::error_chain(&error);
                tracing::warn!(%cluster, %error, "publishing failed; starting over with a full pass");
                // Whatever failed, the next pass starts from a new lease: until it has
                // published everything again, readers may find keys missing.
                if !failed(error, &status, &metrics, config.retry_backoff, &cancel).await {
                    return;
                }
            }
        }
    }
}

/// Reports a failed attempt (not ready, the error) and waits `backoff`; says whether to go
/// on (not cancelled meanwhile).
async fn failed(
    error: String,
    status: &watch::Sender<PublisherStatus>,
    metrics: &Metrics,
    backoff: Duration,
    cancel: &CancellationToken,
) -> bool {
    metrics.store_errors.inc();
    metrics.ready.set(0);
    status.send_modify(|s| {
        s.ready = false;
        s.last_error = Some(error);
    });
    tokio::select! {
        () = cancel.cancelled() => false,
        () = tokio::time::sleep(backoff) => true,
    }
}

/// One leadership: a full pass, then incremental ones until something fails.
async fn publish_until_failure(
    client: &StoreClient,
    config: &PublisherConfig,
    leadership: Leadership,
    snapshots: &mut SnapshotReceiver,
    status: &watch::Sender<PublisherStatus>,
    metrics: &Metrics,
    cancel: &CancellationToken,
) -> Result<(), PublishError> {
    let cluster = &config.translate.cluster;
    let Leadership {
        lease,
        guard,
        took_over,
    } = leadership;
    let lease_id = lease.id();
    let write = Writer {
        client,
        guard: guard.as_ref(),
        metrics,
    };
    let mut known = list_existing(client).await?;
    let mut allocator = IdentityAllocator::new(cluster).map_err(PublishError::Config)?;
    // Reuse the ids the store already holds, so identities survive our restart; entries
    // that are corrupt, foreign or duplicated are reported rather than silently dropped.
    let seeded = allocator.seed_from_store(known.get(&Kind::Identities).into_iter().flatten());
    for warning in seeded {
        tracing::warn!(object = %warning.object, "{}", warning.message);
    }
    let Some(objects) = wait_synced(snapshots, cancel).await else {
        return if cancel.is_cancelled() {
            Ok(())
        } else {
            Err(PublishError::SourceStopped)
        };
    };
    let mut cache = PublishCache::default();
    let mut desired = translate_and_report(
        &objects,
        &config.translate,
        &mut allocator,
        &mut cache,
        metrics,
    );

    if took_over {
        // The state the previous leader published is in place under this lease, its
        // canaries vouching for it: write only what differs. If anything does, the canaries
        // go first and come back after, so no reader trusts a state changing under them.
        let config_key = cluster.key();
        let stored = client.raw().get(&config_key).await?;
        if stored.map(|e| e.value) != Some(cluster.encode()) {
            write.put(&config_key, cluster.encode(), lease_id).await?;
        }
        let mut ops = Vec::new();
        for kind in PUBLISHED_KINDS {
            let want = desired.entries.remove(&kind).unwrap_or_default();
            let have = known.remove(&kind).unwrap_or_default();
            ops.extend(diff_ops(&want, &have, lease_id));
            known.insert(kind, want);
        }
        let writes = ops.len();
        if writes > 0 {
            let canaries = PUBLISHED_KINDS.map(|kind| Op::Delete {
                key: kind.state_canary_key(&cluster.name),
            });
            write.apply(canaries.into()).await?;
            write.apply(ops).await?;
        }
        for kind in PUBLISHED_KINDS {
            let canary = kind.state_canary_key(&cluster.name);
            if client.raw().get(&canary).await?.is_none() {
                write.put(&canary, now_text(), lease_id).await?;
            }
        }
        tracing::info!(writes, entries = ?entry_counts(&known), "took over the published state");
    } else {
        // Canaries a previous life left (a crash leaves them until its lease expires) would
        // vouch for a state this pass is about to change kind by kind: they go first, so a
        // reader sees the peer unsynced until each kind is whole again.
        let stale_canaries = PUBLISHED_KINDS.map(|kind| Op::Delete {
            key: kind.state_canary_key(&cluster.name),
        });
        write.apply(stale_canaries.into()).await?;
        // The full pass: cluster config first (readers check it before anything else), then
        // every kind in full, each followed by its canary.
        write
            .put(&cluster.key(), cluster.encode(), lease_id)
            .await?;
        for kind in PUBLISHED_KINDS {
            let want = desired.entries.remove(&kind).unwrap_or_default();
            let have = known.remove(&kind).unwrap_or_default();
            write.apply(full_sync_ops(&want, &have, lease_id)).await?;
            write
                .put(&kind.state_canary_key(&cluster.name), now_text(), lease_id)
                .await?;
            known.insert(kind, want);
        }
        tracing::info!(entries = ?entry_counts(&known), "initial state published");
    }
    write.put(HEARTBEAT_KEY, now_text(), lease_id).await?;
    report(status, &known, metrics, true);

    let mut heartbeat = tokio::time::interval(config.heartbeat_interval);
    heartbeat.tick().await;
    loop {
        tokio::select! {
            () = cancel.cancelled() => return Ok(()),
            lost = lease.lost() => return Err(PublishError::LeaseLost(lost)),
            _ = heartbeat.tick() => write.put(HEARTBEAT_KEY, now_text(), lease_id).await?,
            changed = snapshots.changed() => {
                if changed.is_err() {
                    return Err(PublishError::SourceStopped);
                }
                let objects = Arc::clone(&snapshots.borrow_and_update());
                let started = Instant::now();
                let mut next = translate_and_report(
                    &objects,
                    &config.translate,
                    &mut allocator,
                    &mut cache,
                    metrics,
                );
                let translated = started.elapsed();
                // Every kind's changes in one batch: one transaction (within the store's
                // limits), so a change that touches several kinds (a pod's IP entry and its
                // service's backends) is seen at one revision, for one write's latency.
                let mut ops = Vec::new();
                let mut changed = Vec::new();
                for kind in PUBLISHED_KINDS {
                    let want = next.entries.remove(&kind).unwrap_or_default();
                    let have = known.entry(kind).or_default();
                    let kind_ops = diff_ops(&want, have, lease_id);
                    if !kind_ops.is_empty() {
                        ops.extend(kind_ops);
                        changed.push((kind, want));
                    }
                }
                let writes = ops.len();
                if writes > 0 {
                    write.apply(ops).await?;
                    known.extend(changed);
                }
                report(status, &known, metrics, true);
                tracing::debug!(?translated, total = ?started.elapsed(), writes, "change published");
            }
        }
    }
}

async fn wait_synced(
    snapshots: &mut SnapshotReceiver,
    cancel: &CancellationToken,
) -> Option<Arc<ClusterObjects>> {
    tokio::select! {
        () = cancel.cancelled() => None,
        synced = cluster_source::wait_synced(snapshots) => synced,
    }
}

fn translate_and_report(
    objects: &ClusterObjects,
    config: &TranslateConfig,
    allocator: &mut IdentityAllocator,
    cache: &mut PublishCache,
    metrics: &Metrics,
) -> Published {
    let published = publish_cached(objects, config, allocator, cache);
    for warning in &published.warnings {
        tracing::warn!(object = %warning.object, "{}", warning.message);
    }
    for problem in &objects.problems {
        tracing::warn!(%problem, "cluster source problem");
    }
    metrics
        .warnings
        .set((published.warnings.len() + objects.problems.len()) as i64);
    published
}

/// Everything the store holds under our prefixes.
async fn list_existing(client: &StoreClient) -> Result<Known, PublishError> {
    let mut known = Known::new();
    for kind in PUBLISHED_KINDS {
        let listing = client.raw().list_prefix(kind.state_prefix()).await?;
        known.insert(
            kind,
            listing
                .entries
                .into_iter()
                .map(|e| (e.key, e.value))
                .collect(),
        );
    }
    Ok(known)
}

/// A full pass rewrites every desired key (to attach it to the current lease) and deletes
/// the rest.
pub fn full_sync_ops(
    want: &BTreeMap<String, Vec<u8>>,
    have: &BTreeMap<String, Vec<u8>>,
    lease: LeaseId,
) -> Vec<Op<Vec<u8>>> {
    let deletes = have
        .keys()
        .filter(|k| !want.contains_key(*k))
        .map(|key| Op::Delete { key: key.clone() });
    let puts = want.iter().map(|(key, value)| Op::Put {
        key: key.clone(),
        value: value.clone(),
        lease: Some(lease),
    });
    puts.chain(deletes).collect()
}

/// An incremental pass writes only what changed. Both maps are sorted, so one merge walk
/// finds the changes without a lookup per key (100k keys per change at scale).
pub fn diff_ops(
    want: &BTreeMap<String, Vec<u8>>,
    have: &BTreeMap<String, Vec<u8>>,
    lease: LeaseId,
) -> Vec<Op<Vec<u8>>> {
    let put = |key: &String, value: &Vec<u8>| Op::Put {
        key: key.clone(),
        value: value.clone(),
        lease: Some(lease),
    };
    let mut puts = Vec::new();
    let mut deletes = Vec::new();
    let (mut want, mut have) = (want.iter().peekable(), have.iter().peekable());
    loop {
        match (want.peek(), have.peek()) {
            (Some((wk, wv)), Some((hk, hv))) => match wk.cmp(hk) {
                std::cmp::Ordering::Less => {
                    puts.push(put(wk, wv));
                    want.next();
                }
                std::cmp::Ordering::Greater => {
                    deletes.push(Op::Delete { key: (*hk).clone() });
                    have.next();
                }
                std::cmp::Ordering::Equal => {
                    if wv != hv {
                        puts.push(put(wk, wv));
                    }
                    want.next();
                    have.next();
                }
            },
            (Some((wk, wv)), None) => {
                puts.push(put(wk, wv));
                want.next();
            }
            (None, Some((hk, _))) => {
                deletes.push(Op::Delete { key: (*hk).clone() });
                have.next();
            }
            (None, None) => break,
        }
    }
    puts.extend(deletes);
    puts
}

/// The publisher's writes, each guarded by its leadership when there is an election.
struct Writer<'a> {
    client: &'a StoreClient,
    guard: Option<&'a Guard>,
    metrics: &'a Metrics,
}

impl Writer<'_> {
    async fn apply(&self, ops: Vec<Op<Vec<u8>>>) -> Result<(), PublishError> {
        if ops.is_empty() {
            return Ok(());
        }
        let count = ops.len() as u64;
        self.batch(ops).await?;
        self.metrics.writes.inc_by(count);
        Ok(())
    }

    async fn batch(&self, ops: Vec<Op<Vec<u8>>>) -> Result<(), PublishError> {
        let raw = self.client.raw();
        match self.guard {
            Some(guard) => raw.apply_batch_guarded(guard, ops).await?,
            None => raw.apply_batch(ops).await?,
        };
        Ok(())
    }

    async fn put(&self, key: &str, value: Vec<u8>, lease: LeaseId) -> Result<(), PublishError> {
        let op = Op::Put {
            key: key.to_owned(),
            value,
            lease: Some(lease),
        };
        self.batch(vec![op]).await
    }
}

fn entry_counts(known: &Known) -> BTreeMap<&'static str, usize> {
    known
        .iter()
        .map(|(kind, entries)| (kind.name(), entries.len()))
        .collect()
}

fn report(status: &watch::Sender<PublisherStatus>, known: &Known, metrics: &Metrics, ready: bool) {
    let entries = entry_counts(known);
    for (kind, count) in &entries {
        metrics.entries(kind).set(*count as i64);
    }
    metrics.ready.set(i64::from(ready));
    status.send_modify(|s| {
        s.ready = ready;
        s.entries = entries;
        s.last_error = None;
    });
}

/// The time as RFC 3339 text, the value of canaries and the heartbeat.
fn now_text() -> Vec<u8> {
    time::OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
        .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn canary_values_are_rfc3339() {
        let text = String::from_utf8(now_text()).unwrap();
        assert!(
            time::OffsetDateTime::parse(&text, &time::format_description::well_known::Rfc3339)
                .is_ok(),
            "{text}"
        );
    }

    fn apply_ops(
        mut store: BTreeMap<String, Vec<u8>>,
        ops: &[Op<Vec<u8>>],
    ) -> BTreeMap<String, Vec<u8>> {
        for op in ops {
            match op {
                Op::Put { key, value, .. } => {
                    store.insert(key.clone(), value.clone());
                }
                Op::Delete { key } => {
                    store.remove(key);
                }
            }
        }
        store
    }

    fn entries() -> impl Strategy<Value = BTreeMap<String, Vec<u8>>> {
        proptest::collection::btree_map("[a-e]{1,2}", proptest::collection::vec(0u8..3, 0..2), 0..8)
    }

    proptest! {
        #[test]
        fn applying_the_diff_yields_the_desired_state(want in entries(), have in entries()) {
            let lease = LeaseId(7);
            prop_assert_eq!(&apply_ops(have.clone(), &diff_ops(&want, &have, lease)), &want);
            prop_assert_eq!(&apply_ops(have.clone(), &full_sync_ops(&want, &have, lease)), &want);
        }

        #[test]
        fn the_diff_writes_only_what_changed(want in entries(), have in entries()) {
            let ops = diff_ops(&want, &have, LeaseId(1));
            let changed = want.iter().filter(|(k, v)| have.get(*k) != Some(*v)).count();
            let removed = have.keys().filter(|k| !want.contains_key(*k)).count();
            let puts = ops.iter().filter(|op| matches!(op, Op::Put { .. })).count();
            prop_assert_eq!((puts, ops.len() - puts), (changed, removed));
        }

        #[test]
        fn equal_states_need_no_incremental_writes(state in entries()) {
            prop_assert!(diff_ops(&state, &state, LeaseId(1)).is_empty());
        }

        #[test]
        fn a_full_pass_rewrites_every_desired_key(want in entries(), have in entries()) {
            let ops = full_sync_ops(&want, &have, LeaseId(3));
            let puts = ops.iter().filter(|op| matches!(op, Op::Put { lease: Some(LeaseId(3)), .. })).count();
            prop_assert_eq!(puts, want.len());
        }
    }
}
