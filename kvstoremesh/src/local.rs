//! The local store: one connection (as `admin-<us>`), one lease that every key kvstoremesh
//! writes is attached to, and the writes themselves.
//!
//! The lease is kept alive by [`run_lease`]; when it is lost (the store was unreachable for
//! longer than its TTL, or replaced) a new one is granted and its generation bumped, so peer
//! tasks rewrite what they mirrored under the new lease.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use kvstore::client::{Codec, LeaseHandle, LeaseId, Op, StoreClient};
use model::{ClusterConfig, ClusterName, StoreValue};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use peer_follow::Backoff;

/// Operations per concurrent chunk of a large write (a full sync).
const CHUNK_OPS: usize = 1024;
/// Chunks of a large write in flight at once. The keys of one full sync are distinct, so
/// chunks commute; concurrent transactions let the store group its disk syncs.
const CHUNKS_IN_FLIGHT: usize = 8;

/// The lease kvstoremesh's keys are attached to, and how many leases came before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Lease {
    /// The lease id.
    pub id: LeaseId,
    /// 1 for the first lease, +1 for each replacement.
    pub generation: u64,
}

/// A cheap, per-process digest of a value, to tell whether the cache already holds the bytes
/// a peer has without keeping both copies in memory. Keyed randomly per process, so a peer
/// cannot craft a collision.
pub(crate) fn digest(bytes: &[u8]) -> u64 {
    static STATE: OnceLock<RandomState> = OnceLock::new();
    STATE.get_or_init(RandomState::new).hash_one(bytes)
}

/// Reads values as their [`digest`]; never writes.
#[derive(Debug, Clone, Copy)]
struct DigestCodec;

/// [`DigestCodec`] cannot encode.
#[derive(Debug, thiserror::Error)]
#[error("the digest codec only reads")]
struct ReadOnly;

impl Codec for DigestCodec {
    type Value = u64;
    type Error = ReadOnly;

    fn encode(&self, _: &u64) -> Result<Vec<u8>, ReadOnly> {
        Err(ReadOnly)
    }

    fn decode(&self, bytes: Vec<u8>) -> Result<u64, ReadOnly> {
        Ok(digest(&bytes))
    }
}

/// What the local store holds under a prefix: key → (digest of the value, lease).
pub(crate) type Digests = HashMap<String, (u64, Option<LeaseId>)>;

/// The local store as the peer tasks use it.
#[derive(Debug, Clone)]
pub(crate) struct Local {
    store: StoreClient,
    lease: watch::Receiver<Option<Lease>>,
    metrics: Arc<Metrics>,
}

impl Local {
    pub(crate) fn new(
        store: StoreClient,
        lease: watch::Receiver<Option<Lease>>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Local {
            store,
            lease,
            metrics,
        }
    }

    /// The current lease, if one is granted.
    pub(crate) fn lease(&self) -> Option<Lease> {
        *self.lease.borrow()
    }

    /// Waits for a granted lease; `None` once kvstoremesh stops.
    pub(crate) async fn wait_lease(&self) -> Option<Lease> {
        let mut lease = self.lease.clone();
        lease.wait_for(Option::is_some).await.ok().and_then(|l| *l)
    }

    /// A receiver that changes whenever the lease does.
    pub(crate) fn lease_changes(&self) -> watch::Receiver<Option<Lease>> {
        self.lease.clone()
    }

    /// Lists `prefix` as digests.
    pub(crate) async fn digests(&self, prefix: &str) -> kvstore::client::Result<Digests> {
        let (listing, _non_utf8_keys) = self
            .store
            .typed(DigestCodec)
            .list_prefix_lenient(prefix)
            .await?;
        Ok(listing
            .entries
            .into_iter()
            .map(|e| (e.key, (e.value, e.lease)))
            .collect())
    }

    /// Lists `prefix` with values.
    pub(crate) async fn list(
        &self,
        prefix: &str,
    ) -> kvstore::client::Result<Vec<kvstore::client::Entry<Vec<u8>>>> {
        let (listing, _) = self.store.raw().list_prefix_lenient(prefix).await?;
        Ok(listing.entries)
    }

    /// Reads one key.
    pub(crate) async fn get(
        &self,
        key: &str,
    ) -> kvstore::client::Result<Option<kvstore::client::Entry<Vec<u8>>>> {
        self.store.raw().get(key).await
    }

    /// Applies operations in order.
    pub(crate) async fn apply(&self, ops: Vec<Op<Vec<u8>>>) -> kvstore::client::Result<()> {
        if ops.is_empty() {
            return Ok(());
        }
        let count = ops.len() as u64;
        self.store.raw().apply_batch(ops).await?;
        self.metrics.local_writes.inc_by(count);
        Ok(())
    }

    /// Applies operations on distinct keys, in concurrent chunks (their order does not
    /// matter).
    pub(crate) async fn apply_unordered(
        &self,
        ops: Vec<Op<Vec<u8>>>,
    ) -> kvstore::client::Result<()> {
        if ops.len() <= CHUNK_OPS {
            return self.apply(ops).await;
        }
        // Chunks are taken off one iterator: splitting the vector off its tail, chunk by
        // chunk, moved the whole rest each time (quadratic: most of a 300k-entry sync).
        let mut ops = ops.into_iter();
        let chunks = std::iter::from_fn(move || {
            let chunk: Vec<_> = ops.by_ref().take(CHUNK_OPS).collect();
            (!chunk.is_empty()).then_some(chunk)
        });
        futures::stream::iter(chunks.map(|chunk| self.apply(chunk)))
            .buffer_unordered(CHUNKS_IN_FLIGHT)
            .try_collect::<Vec<()>>()
            .await?;
        Ok(())
    }

    /// Writes one key attached to `lease`.
    pub(crate) async fn put(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: Lease,
    ) -> kvstore::client::Result<()> {
        self.store.raw().put(key, &value, Some(lease.id)).await?;
        self.metrics.local_writes.inc();
        Ok(())
    }

    /// Deletes one key.
    pub(crate) async fn delete(&self, key: &str) -> kvstore::client::Result<()> {
        if self.store.delete(key).await? {
            self.metrics.local_writes.inc();
        }
        Ok(())
    }

    /// Deletes every key under `prefix`.
    pub(crate) async fn delete_prefix(&self, prefix: &str) -> kvstore::client::Result<()> {
        let deleted = self.store.delete_prefix(prefix).await?;
        self.metrics.local_writes.inc_by(deleted.max(0) as u64);
        Ok(())
    }
}

/// Where kvstoremesh notes its lease in the local store, attached to that lease: a restarted
/// kvstoremesh takes the lease over while it lives, so the cache need not be rewritten.
pub const LEASE_KEY: &str = "cilium/.kvstoremesh/lease";

/// Grants the lease (or takes over the previous kvstoremesh's, see [`LEASE_KEY`]), keeps it
/// alive, and grants a new one when it is lost, until `cancel`. On shutdown the lease is not
/// revoked: the cache outlives a restart by the lease's TTL, and the next kvstoremesh takes
/// it over.
pub(crate) async fn run_lease(
    store: StoreClient,
    local: ClusterConfig,
    ttl: Duration,
    mut backoff: Backoff,
    publish: watch::Sender<Option<Lease>>,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
) {
    let mut generation = 0u64;
    let mut checked_config = false;
    let mut first = true;
    loop {
        let adopted = if std::mem::take(&mut first) {
            tokio::select! {
                () = cancel.cancelled() => return,
                adopted = adopt_previous(&store, &cancel) => adopted,
            }
        } else {
            None
        };
        let handle = match adopted {
            Some(handle) => {
                tracing::info!(lease = %handle.id(), ttl = ?handle.ttl(), "took over the previous kvstoremesh's lease");
                handle
            }
            None => {
                let granted = tokio::select! {
                    () = cancel.cancelled() => return,
                    granted = store.grant_lease_with_shutdown(ttl, &cancel) => granted,
                };
                match granted {
                    Ok(handle) => {
                        tracing::info!(lease = %handle.id(), ttl = ?handle.ttl(), "local lease granted");
                        handle
                    }
                    Err(error) => {
                        let delay = backoff.next_delay();
                        tracing::warn!(error = %error, retry_in = ?delay, "cannot grant a lease in the local store");
                        tokio::select! {
                            () = cancel.cancelled() => return,
                            () = tokio::time::sleep(delay) => continue,
                        }
                    }
                }
            }
        };
        backoff.reset();
        generation += 1;
        metrics.lease_grants.inc();
        let lease = Lease {
            id: handle.id(),
            generation,
        };
        publish.send_replace(Some(lease));
        if let Err(error) = store
            .raw()
            .put(
                LEASE_KEY,
                &lease.id.to_string().into_bytes(),
                Some(lease.id),
            )
            .await
        {
            tracing::debug!(%error, "cannot note the lease in the local store");
        }
        if !checked_config {
            checked_config = check_local_config(&store, &local).await;
        }
        let lost = tokio::select! {
            biased;
            () = cancel.cancelled() => None,
            lost = handle.lost() => Some(lost),
        };
        // The keepalive also stops on the shutdown token: that is no loss.
        let Some(lost) = lost.filter(|_| !cancel.is_cancelled()) else {
            handle.stop();
            return;
        };
        publish.send_replace(None);
        tracing::warn!(reason = %lost, "local lease lost; granting a new one and rewriting the cache");
    }
}

/// The lease noted under [`LEASE_KEY`], taken over, if it still lives.
async fn adopt_previous(store: &StoreClient, cancel: &CancellationToken) -> Option<LeaseHandle> {
    let id = store.raw().get(LEASE_KEY).await.ok()??.lease?;
    match store.adopt_lease(id, cancel).await {
        Ok(handle) => handle,
        Err(error) => {
            tracing::debug!(%error, lease = %id, "cannot take the previous lease over");
            None
        }
    }
}

/// Warns when the local apiserver published another id or limit than kvstoremesh was given;
/// says whether the check could be made.
async fn check_local_config(store: &StoreClient, local: &ClusterConfig) -> bool {
    let entry = match store.raw().get(&local.key()).await {
        Ok(entry) => entry,
        Err(error) => {
            tracing::debug!(%error, "cannot read the local cluster config");
            return false;
        }
    };
    let Some(entry) = entry else {
        tracing::info!(
            key = %local.key(),
            "the local cluster config is not published (yet); peers are checked against the flags"
        );
        return true;
    };
    match ClusterConfig::decode(&entry.value) {
        Ok(published)
            if published.id != local.id
                || published.max_connected_clusters != local.max_connected_clusters =>
        {
            tracing::error!(
                key = %local.key(),
                published_id = published.id.get(),
                published_max = %published.max_connected_clusters,
                flag_id = local.id.get(),
                flag_max = %local.max_connected_clusters,
                "--cluster-id/--max-connected-clusters disagree with the local cluster config; \
                 peers are checked against the flags"
            );
        }
        Ok(_) => {}
        Err(error) => {
            tracing::warn!(key = %local.key(), %error, "the local cluster config does not decode");
        }
    }
    true
}

/// Ops that delete everything kvstoremesh wrote about `peer`, canaries first so agents
/// never see a canary over a partial cache.
pub(crate) async fn drain_peer(
    local: &Local,
    peer: &ClusterName,
    keep_status: bool,
) -> kvstore::client::Result<()> {
    local
        .delete_prefix(&model::keys::cache_canary_prefix(peer))
        .await?;
    for kind in model::Kind::ALL {
        local.delete_prefix(&kind.cache_prefix(peer)).await?;
    }
    local
        .delete(&model::keys::heartbeat_cache_key(peer))
        .await?;
    local.delete(&model::keys::cluster_config_key(peer)).await?;
    if !keep_status {
        local.delete(&model::keys::peer_status_key(peer)).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_tells_values_apart() {
        assert_eq!(digest(b"abc"), digest(b"abc"));
        assert_ne!(digest(b"abc"), digest(b"abd"));
        assert_eq!(DigestCodec.decode(b"x".to_vec()).unwrap(), digest(b"x"));
        assert!(DigestCodec.encode(&1).is_err());
    }
}
