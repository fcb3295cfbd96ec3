//! The store client layer: one code path, over `etcd-client`, for a real etcd cluster and
//! for our embedded server (both speak the etcd v3 API).
//!
//! - [`StoreClient`] holds the connection: status, leases, compaction, deletes.
//! - [`TypedClient`] adds a [`Codec`] for typed values: get, paginated prefix listing at one
//!   revision, put, compare-and-swap, batched writes in transactions, prefix watches.
//! - [`LeaseHandle`] keeps a lease alive in the background and says when it is lost.
//! - [`parse_peer_file`]: a peer's store as its peer file describes it.
//!
//! Every unary request is bounded by the configured request timeout; errors are sorted
//! into [`Error`] variants (unavailable, compacted, lease not found, decode, ...).

mod batch;
mod codec;
mod config;
mod error;
mod lease;
mod merged;
mod peer_file;
pub mod provision;
mod watch;

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use etcd_client::{
    CompactionOptions, Compare, CompareOp, DeleteOptions, GetOptions, KeyValue, PutOptions, Txn,
    TxnOp, TxnOpResponse,
};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;

pub use batch::{BatchOutcome, Op};
pub use codec::{Codec, JsonCodec, RawCodec, StringCodec};
pub use config::{ClientConfig, Limits, TlsFiles};
pub use error::{BoxError, ConfigError, Error, Result};
pub use lease::{LeaseHandle, LeaseId, LeaseLost};
pub use merged::{KeyChange, MergeError, MergedWatch, RevisionStream};
pub use peer_file::{PEER_LIST_PAGE_SIZE, PeerConfig, PeerFileError, parse_peer_file};
pub use watch::{WatchConfig, WatchEvent, WatchStream};

use error::classify;

/// The condition of a guarded batch ([`TypedClient::apply_batch_guarded`]): `key` still has
/// the mod revision its holder wrote it at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Guard {
    /// The key (a leader's election key).
    pub key: String,
    /// Its mod revision when the holder wrote it.
    pub mod_revision: i64,
}

/// Largest response the client accepts (a page of a listing, a watch response with a big
/// transaction). tonic's default of 4 MiB is too small for large values.
const MAX_DECODING_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// How many times a listing restarts when its pinned revision is compacted between pages.
const LIST_ATTEMPTS: usize = 3;

/// The end of the key range holding every key that starts with `prefix`: the prefix with
/// its last byte below 0xff incremented (and what follows dropped). `[0]` means "no upper
/// bound", for an empty prefix or one made only of 0xff bytes.
pub fn prefix_range_end(prefix: &[u8]) -> Vec<u8> {
    match prefix.iter().rposition(|&b| b < 0xff) {
        Some(i) => {
            let mut end = prefix[..=i].to_vec();
            end[i] += 1;
            end
        }
        None => vec![0],
    }
}

/// The first key of a prefix range (`[0]` for the empty prefix: every key).
fn range_start(prefix: &str) -> Vec<u8> {
    if prefix.is_empty() {
        vec![0]
    } else {
        prefix.as_bytes().to_vec()
    }
}

/// What identifies a store and how far it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreStatus {
    /// The cluster id: changes when the store is replaced by a new one.
    pub cluster_id: u64,
    /// The id of the member that answered.
    pub member_id: u64,
    /// The current revision.
    pub revision: i64,
    /// The raft term of the answering member.
    pub raft_term: u64,
    /// The member id of the leader (0 when there is none).
    pub leader: u64,
    /// The server version string.
    pub version: String,
    /// The database size in bytes.
    pub db_size: i64,
}

/// A stored key with its decoded value and metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry<V> {
    /// The key.
    pub key: String,
    /// The decoded value.
    pub value: V,
    /// The revision at which the key was (last) created.
    pub create_revision: i64,
    /// The revision of the last change to the key.
    pub mod_revision: i64,
    /// How many times the key was written since it was created (1 after creation).
    pub version: i64,
    /// The lease the key is attached to.
    pub lease: Option<LeaseId>,
}

/// All the entries under a prefix, read at one revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listing<V> {
    /// The revision the listing was read at: watch from `revision + 1` to follow it.
    pub revision: i64,
    /// The entries, sorted by key.
    pub entries: Vec<Entry<V>>,
}

/// What a compare-and-swap expects of the key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// The key must not exist.
    Absent,
    /// The key must have last been modified at this revision.
    ModRevision(i64),
}

/// The result of a compare-and-swap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CasOutcome<V> {
    /// Whether the expectation held and the value was written.
    pub succeeded: bool,
    /// The entry after the operation: the written one on success, the one that stood in
    /// the way (or `None` if the key is absent) on failure.
    pub current: Option<Entry<V>>,
}

/// One connection per endpoint, and the one in use. Like etcd's own client, this one pins an
/// endpoint: a request that finds its member gone (unreachable, leaderless, silent) moves the
/// pin to the next endpoint, so later requests, new watches and lease keepalives follow it.
pub(crate) struct Members {
    /// Replaced when the TLS files change, so new requests and streams use the new
    /// certificates; streams already open keep the connection they started on.
    clients: RwLock<Vec<etcd_client::Client>>,
    endpoints: Vec<String>,
    pinned: AtomicUsize,
}

impl Members {
    fn new(endpoints: Vec<String>, clients: Vec<etcd_client::Client>) -> Self {
        Members {
            clients: RwLock::new(clients),
            endpoints,
            pinned: AtomicUsize::new(0),
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.endpoints.len()
    }

    pub(crate) fn endpoint(&self, index: usize) -> &str {
        &self.endpoints[index]
    }

    /// The pinned endpoint's index and connection.
    pub(crate) fn pinned(&self) -> (usize, etcd_client::Client) {
        let clients = self.clients.read().unwrap_or_else(|e| e.into_inner());
        let index = self.pinned.load(Ordering::Relaxed) % clients.len();
        (index, clients[index].clone())
    }

    /// Moves the pin off `failed` to the next endpoint, unless another request already did.
    pub(crate) fn fail_over(&self, failed: usize, error: &dyn std::fmt::Display) {
        if self.len() < 2 {
            return;
        }
        let next = (failed + 1) % self.len();
        if self
            .pinned
            .compare_exchange(failed, next, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            tracing::info!(
                failed = %self.endpoints[failed],
                next = %self.endpoints[next],
                %error,
                "store endpoint failed; using the next one"
            );
        }
    }

    fn replace(&self, clients: Vec<etcd_client::Client>) {
        *self.clients.write().unwrap_or_else(|e| e.into_inner()) = clients;
    }
}

/// Whether a request may be sent again to another member after a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Retry {
    /// A read: asking again changes nothing, so any member that answers will do.
    Repeatable,
    /// A write: sent again only when the failure proves the first one was never applied
    /// (no connection was made, or the member had no leader), as etcd's client does.
    Mutable,
}

/// One `etcd_client` connection per endpoint, each on a lazy channel to that endpoint alone:
/// a request to a member that refuses connections fails at once, so it can move on.
async fn connect_each(
    prepared: &config::Prepared,
) -> std::result::Result<Vec<etcd_client::Client>, etcd_client::Error> {
    let mut clients = Vec::with_capacity(prepared.channels.len());
    for channel in &prepared.channels {
        let channel = etcd_client::Channel::Tonic(channel.connect_lazy());
        clients.push(
            etcd_client::Client::from_channel(channel, Some(prepared.options.clone())).await?,
        );
    }
    Ok(clients)
}

struct Inner {
    members: Arc<Members>,
    /// Stops the certificate reload task when the last clone of the client goes away.
    _reload: Option<tokio_util::sync::DropGuard>,
    endpoints: String,
    request_timeout: Duration,
    limits: Limits,
}

/// A connection to a store. Cheap to clone; clones share the connection.
#[derive(Clone)]
pub struct StoreClient {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for StoreClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreClient")
            .field("endpoints", &self.inner.endpoints)
            .field("request_timeout", &self.inner.request_timeout)
            .field("limits", &self.inner.limits)
            .finish()
    }
}

impl StoreClient {
    /// Validates the configuration, connects, and checks that the store answers (a status
    /// request within the request timeout).
    #[tracing::instrument(level = "info", skip_all, fields(endpoints = ?config.endpoints))]
    pub async fn connect(config: &ClientConfig) -> Result<Self> {
        let client = Self::connect_lazy(config).await?;
        let status = client.status().await?;
        tracing::debug!(
            cluster_id = status.cluster_id,
            member_id = status.member_id,
            revision = status.revision,
            "connected to store"
        );
        Ok(client)
    }

    /// Validates the configuration and sets the connection up without waiting for the
    /// store: the first request connects. For callers that retry on their own.
    pub async fn connect_lazy(config: &ClientConfig) -> Result<Self> {
        let prepared = config.prepare()?;
        let endpoints = prepared.endpoints.join(",");
        let clients = connect_each(&prepared)
            .await
            .map_err(|source| ConfigError::Client { source })?;
        let members = Arc::new(Members::new(prepared.endpoints, clients));
        let reload = config.tls.as_ref().map(|tls| {
            let stop = CancellationToken::new();
            tokio::spawn(reload_on_change(
                config.clone(),
                tls.clone(),
                members.clone(),
                stop.clone(),
            ));
            stop.drop_guard()
        });
        Ok(StoreClient {
            inner: Arc::new(Inner {
                members,
                _reload: reload,
                endpoints,
                request_timeout: config.request_timeout,
                limits: config.limits,
            }),
        })
    }

    /// The endpoints, comma separated, with their scheme.
    pub fn endpoints(&self) -> &str {
        &self.inner.endpoints
    }

    /// The per-request timeout.
    pub fn request_timeout(&self) -> Duration {
        self.inner.request_timeout
    }

    /// The request size limits.
    pub fn limits(&self) -> Limits {
        self.inner.limits
    }

    /// The underlying `etcd_client` client of the pinned endpoint (the current one, after
    /// any certificate reload), for what this layer does not cover.
    pub fn etcd(&self) -> etcd_client::Client {
        self.inner.members.pinned().1
    }

    /// The endpoints and which one is in use.
    pub(crate) fn members(&self) -> &Arc<Members> {
        &self.inner.members
    }

    /// A typed view of the store using `codec`.
    pub fn typed<C: Codec>(&self, codec: C) -> TypedClient<C> {
        TypedClient {
            client: self.clone(),
            codec,
        }
    }

    /// A view that stores and returns raw bytes.
    pub fn raw(&self) -> TypedClient<RawCodec> {
        self.typed(RawCodec)
    }

    /// A view that stores `T` as JSON.
    pub fn json<T>(&self) -> TypedClient<JsonCodec<T>>
    where
        T: Serialize + DeserializeOwned + Send + 'static,
    {
        self.typed(JsonCodec::new())
    }

    pub(crate) fn watch_client_of(client: &etcd_client::Client) -> etcd_client::WatchClient {
        client
            .watch_client()
            .max_decoding_message_size(MAX_DECODING_MESSAGE_BYTES)
    }

    /// Runs one request on the pinned endpoint with the request timeout, and sorts its
    /// error. A failure that is the member's (unreachable, leaderless, silent) moves the pin;
    /// the request is then sent to the next endpoint if `retry` allows, until every endpoint
    /// was tried once.
    pub(crate) async fn request<T, F, Fut>(
        &self,
        op: &'static str,
        revision: Option<i64>,
        lease: Option<LeaseId>,
        retry: Retry,
        mut make: F,
    ) -> Result<T>
    where
        F: FnMut(etcd_client::Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let members = &self.inner.members;
        let mut tries = members.len();
        loop {
            let (index, client) = members.pinned();
            let (error, never_applied) =
                match tokio::time::timeout(self.inner.request_timeout, make(client)).await {
                    Ok(Ok(value)) => return Ok(value),
                    Ok(Err(err)) => {
                        let never_applied = error::never_applied(&err);
                        (
                            classify(op, &members.endpoints[index], revision, lease, err),
                            never_applied,
                        )
                    }
                    Err(_) => (
                        Error::Timeout {
                            op,
                            endpoints: members.endpoints[index].clone(),
                            after: self.inner.request_timeout,
                        },
                        false,
                    ),
                };
            tracing::debug!(op, error = %error, "store request failed");
            if !error.is_retryable() {
                return Err(error);
            }
            members.fail_over(index, &error);
            tries -= 1;
            let again = match retry {
                Retry::Repeatable => true,
                Retry::Mutable => never_applied,
            };
            if !again || tries == 0 {
                return Err(error);
            }
        }
    }

    /// Runs one request with the request timeout and sorts its error.
    pub(crate) async fn call<T>(
        &self,
        op: &'static str,
        revision: Option<i64>,
        lease: Option<LeaseId>,
        request: impl Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T> {
        match tokio::time::timeout(self.inner.request_timeout, request).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(err)) => {
                let err = classify(op, &self.inner.endpoints, revision, lease, err);
                tracing::debug!(op, error = %err, "store request failed");
                Err(err)
            }
            Err(_) => Err(Error::Timeout {
                op,
                endpoints: self.inner.endpoints.clone(),
                after: self.inner.request_timeout,
            }),
        }
    }

    /// The store's identity (cluster and member id) and current revision. A changed
    /// `cluster_id`, or a revision that went backwards, means the store was replaced.
    #[tracing::instrument(level = "debug", skip_all, fields(endpoints = %self.endpoints()))]
    pub async fn status(&self) -> Result<StoreStatus> {
        let resp = self
            .request("status", None, None, Retry::Repeatable, |c| async move {
                c.maintenance_client().status().await
            })
            .await?;
        let header = resp.header().ok_or_else(|| Error::Protocol {
            op: "status",
            detail: "the status response has no header".to_owned(),
        })?;
        Ok(StoreStatus {
            cluster_id: header.cluster_id(),
            member_id: header.member_id(),
            revision: header.revision(),
            raft_term: header.raft_term(),
            leader: resp.leader(),
            version: resp.version().to_owned(),
            db_size: resp.db_size(),
        })
    }

    /// Deletes `key`; says whether it existed.
    #[tracing::instrument(level = "debug", skip_all, fields(endpoints = %self.endpoints(), key))]
    pub async fn delete(&self, key: &str) -> Result<bool> {
        let resp = self
            .request("delete", None, None, Retry::Mutable, |c| async move {
                c.kv_client().delete(key, None).await
            })
            .await?;
        Ok(resp.deleted() > 0)
    }

    /// Deletes every key under `prefix` (every key for an empty prefix) in one request;
    /// says how many were deleted.
    #[tracing::instrument(level = "debug", skip_all, fields(endpoints = %self.endpoints(), prefix))]
    pub async fn delete_prefix(&self, prefix: &str) -> Result<i64> {
        let options = DeleteOptions::new().with_range(prefix_range_end(prefix.as_bytes()));
        let resp = self
            .request("delete_prefix", None, None, Retry::Mutable, |c| {
                let options = options.clone();
                async move {
                    c.kv_client()
                        .delete(range_start(prefix), Some(options))
                        .await
                }
            })
            .await?;
        Ok(resp.deleted())
    }

    /// Compacts the store's history up to `revision` (physically, so that watches and
    /// reads at older revisions fail right after).
    #[tracing::instrument(level = "debug", skip_all, fields(endpoints = %self.endpoints(), revision))]
    pub async fn compact(&self, revision: i64) -> Result<()> {
        self.request(
            "compact",
            Some(revision),
            None,
            Retry::Mutable,
            |c| async move {
                c.kv_client()
                    .compact(revision, Some(CompactionOptions::new().with_physical()))
                    .await
            },
        )
        .await?;
        Ok(())
    }

    /// Grants a lease of (at least) `ttl`, rounded up to whole seconds, and keeps it alive
    /// in the background until the handle is revoked, stopped or dropped.
    #[tracing::instrument(level = "debug", skip_all, fields(endpoints = %self.endpoints(), ?ttl))]
    pub async fn grant_lease(&self, ttl: Duration) -> Result<LeaseHandle> {
        lease::grant(self, ttl, None).await
    }

    /// Like [`grant_lease`](Self::grant_lease), and the keepalive also stops when
    /// `shutdown` is canceled (the lease then expires after its TTL).
    #[tracing::instrument(level = "debug", skip_all, fields(endpoints = %self.endpoints(), ?ttl))]
    pub async fn grant_lease_with_shutdown(
        &self,
        ttl: Duration,
        shutdown: &CancellationToken,
    ) -> Result<LeaseHandle> {
        lease::grant(self, ttl, Some(shutdown)).await
    }

    /// Takes over lease `id`, granted by someone else (a previous run of this process, say),
    /// and keeps it alive like a granted one until the handle is stopped or dropped or
    /// `shutdown` is canceled; `None` if the store no longer has the lease.
    #[tracing::instrument(level = "debug", skip_all, fields(endpoints = %self.endpoints(), lease = %id))]
    pub async fn adopt_lease(
        &self,
        id: LeaseId,
        shutdown: &CancellationToken,
    ) -> Result<Option<LeaseHandle>> {
        lease::adopt(self, id, Some(shutdown)).await
    }

    /// Revokes a lease, deleting its keys. A lease that does not exist counts as revoked.
    #[tracing::instrument(level = "debug", skip_all, fields(endpoints = %self.endpoints(), lease = %id))]
    pub async fn revoke_lease(&self, id: LeaseId) -> Result<()> {
        // Revoking again finds the lease gone, which counts as revoked.
        match self
            .request(
                "lease_revoke",
                None,
                Some(id),
                Retry::Repeatable,
                |c| async move { c.lease_client().revoke(id.0).await },
            )
            .await
        {
            Ok(_) | Err(Error::LeaseNotFound { .. }) => Ok(()),
            Err(err) => Err(err),
        }
    }

    /// The remaining and the granted TTL of a lease, or `None` if it does not exist: whether
    /// its holder still refreshes it (a refreshed lease stays near its granted TTL).
    #[tracing::instrument(level = "debug", skip_all, fields(endpoints = %self.endpoints(), lease = %id))]
    pub async fn lease_ttls(&self, id: LeaseId) -> Result<Option<(Duration, Duration)>> {
        let resp = lease::time_to_live(self, id).await?;
        Ok(resp.filter(|resp| resp.ttl() >= 0).map(|resp| {
            (
                Duration::from_secs(resp.ttl() as u64),
                Duration::from_secs(resp.granted_ttl().max(0) as u64),
            )
        }))
    }

    /// The remaining TTL of a lease, or `None` if it does not exist (expired or revoked).
    #[tracing::instrument(level = "debug", skip_all, fields(endpoints = %self.endpoints(), lease = %id))]
    pub async fn lease_time_to_live(&self, id: LeaseId) -> Result<Option<Duration>> {
        let resp = lease::time_to_live(self, id).await?;
        Ok(resp
            .filter(|resp| resp.ttl() >= 0)
            .map(|resp| Duration::from_secs(resp.ttl() as u64)))
    }
}

/// A [`StoreClient`] with a [`Codec`]: reads and writes typed values.
#[derive(Debug, Clone)]
pub struct TypedClient<C> {
    client: StoreClient,
    codec: C,
}

impl<C: Codec> TypedClient<C> {
    /// The connection.
    pub fn store(&self) -> &StoreClient {
        &self.client
    }

    /// The codec.
    pub fn codec(&self) -> &C {
        &self.codec
    }

    fn encode(&self, key: &str, value: &C::Value) -> Result<Vec<u8>> {
        self.codec.encode(value).map_err(|err| Error::Encode {
            key: key.to_owned(),
            source: Box::new(err),
        })
    }

    fn decode_entry(&self, kv: KeyValue) -> Result<Entry<C::Value>> {
        let create_revision = kv.create_revision();
        let mod_revision = kv.mod_revision();
        let version = kv.version();
        let lease = (kv.lease() != 0).then_some(LeaseId(kv.lease()));
        let (key, value) = kv.into_key_value();
        let key = String::from_utf8(key).map_err(|err| {
            let lossy = String::from_utf8_lossy(err.as_bytes()).into_owned();
            Error::Decode {
                key: lossy,
                source: Box::new(err.utf8_error()),
            }
        })?;
        match self.codec.decode(value) {
            Ok(value) => Ok(Entry {
                key,
                value,
                create_revision,
                mod_revision,
                version,
                lease,
            }),
            Err(err) => Err(Error::Decode {
                key,
                source: Box::new(err),
            }),
        }
    }

    /// Reads one key.
    #[tracing::instrument(level = "debug", skip_all, fields(endpoints = %self.client.endpoints(), key))]
    pub async fn get(&self, key: &str) -> Result<Option<Entry<C::Value>>> {
        let mut resp = self
            .client
            .request("get", None, None, Retry::Repeatable, |c| async move {
                kv_of(&c).get(key, None).await
            })
            .await?;
        resp.take_kvs()
            .into_iter()
            .next()
            .map(|kv| self.decode_entry(kv))
            .transpose()
    }

    /// Lists every key under `prefix` (every key for an empty prefix) at one revision,
    /// page by page (`limits.list_page_size` keys per request). Fails on the first value
    /// that does not decode, naming its key. If the revision is compacted between pages,
    /// the listing starts over (a few times) at the new current revision.
    #[tracing::instrument(level = "debug", skip_all, fields(endpoints = %self.client.endpoints(), prefix))]
    pub async fn list_prefix(&self, prefix: &str) -> Result<Listing<C::Value>> {
        let (listing, _) = self.list(&[prefix], true).await?;
        Ok(listing)
    }

    /// Like [`list_prefix`](Self::list_prefix), but entries that do not decode are left
    /// out of the listing and returned as [`Error::Decode`] errors beside it.
    #[tracing::instrument(level = "debug", skip_all, fields(endpoints = %self.client.endpoints(), prefix))]
    pub async fn list_prefix_lenient(
        &self,
        prefix: &str,
    ) -> Result<(Listing<C::Value>, Vec<Error>)> {
        self.list(&[prefix], false).await
    }

    /// Every entry under any of `prefixes`, all read at one revision (the first page's), so
    /// the listing is one consistent snapshot to watch on from; entries that do not decode
    /// are returned as [`Error::Decode`] errors beside it. Entries are sorted by key within
    /// each prefix, prefixes in the order given.
    #[tracing::instrument(level = "debug", skip_all, fields(endpoints = %self.client.endpoints()))]
    pub async fn list_prefixes_lenient(
        &self,
        prefixes: &[&str],
    ) -> Result<(Listing<C::Value>, Vec<Error>)> {
        self.list(prefixes, false).await
    }

    async fn list(
        &self,
        prefixes: &[&str],
        strict: bool,
    ) -> Result<(Listing<C::Value>, Vec<Error>)> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut entries = Vec::new();
            let mut invalid = Vec::new();
            let mut at = None;
            let mut result = Ok(0);
            for prefix in prefixes {
                result = self
                    .list_pages(prefix, at, |kv| match self.decode_entry(kv) {
                        Ok(entry) => {
                            entries.push(entry);
                            Ok(())
                        }
                        Err(err) if !strict => {
                            invalid.push(err);
                            Ok(())
                        }
                        Err(err) => Err(err),
                    })
                    .await;
                match result {
                    Ok(revision) => at = Some(revision),
                    Err(_) => break,
                }
            }
            match result {
                Ok(_) => {
                    let revision = match at {
                        Some(revision) => revision,
                        None => self.client.status().await?.revision,
                    };
                    return Ok((Listing { revision, entries }, invalid));
                }
                Err(err @ Error::Compacted { .. }) if attempt < LIST_ATTEMPTS => {
                    tracing::debug!(error = %err, attempt, "listing revision compacted, listing again");
                }
                Err(err) => return Err(err),
            }
        }
    }

    /// Reads the prefix page by page at revision `at`, or else at the revision of the first
    /// page; returns the revision read at.
    async fn list_pages(
        &self,
        prefix: &str,
        at: Option<i64>,
        mut each: impl FnMut(KeyValue) -> Result<()>,
    ) -> Result<i64> {
        let end = prefix_range_end(prefix.as_bytes());
        let page = i64::from(self.client.limits().list_page_size);
        let mut start = range_start(prefix);
        let mut revision = at.unwrap_or(0);
        loop {
            let mut options = GetOptions::new().with_range(end.clone()).with_limit(page);
            if revision > 0 {
                options = options.with_revision(revision);
            }
            // Every member holds the same revisions, so a listing pinned to one may go on
            // through another.
            let mut resp = self
                .client
                .request(
                    "list_prefix",
                    (revision > 0).then_some(revision),
                    None,
                    Retry::Repeatable,
                    |c| {
                        let (start, options) = (start.clone(), options.clone());
                        async move { kv_of(&c).get(start, Some(options)).await }
                    },
                )
                .await?;
            if revision == 0 {
                revision = resp
                    .header()
                    .map(|h| h.revision())
                    .ok_or_else(|| Error::Protocol {
                        op: "list_prefix",
                        detail: "the range response has no header".to_owned(),
                    })?;
            }
            let more = resp.more();
            let kvs = resp.take_kvs();
            let Some(last) = kvs.last() else {
                return Ok(revision);
            };
            // Continue right after the last key of this page.
            start = last.key().to_vec();
            start.push(0);
            for kv in kvs {
                each(kv)?;
            }
            if !more {
                return Ok(revision);
            }
        }
    }

    /// Writes `value` under `key`, attached to `lease` if given; returns the revision of
    /// the write.
    #[tracing::instrument(level = "debug", skip_all, fields(endpoints = %self.client.endpoints(), key))]
    pub async fn put(&self, key: &str, value: &C::Value, lease: Option<LeaseId>) -> Result<i64> {
        let bytes = self.encode(key, value)?;
        let options = lease.map(|id| PutOptions::new().with_lease(id.0));
        let resp = self
            .client
            .request("put", None, lease, Retry::Mutable, |c| {
                let (bytes, options) = (bytes.clone(), options.clone());
                async move { c.kv_client().put(key, bytes, options).await }
            })
            .await?;
        Ok(resp.header().map(|h| h.revision()).unwrap_or_default())
    }

    /// Deletes `key`; says whether it existed.
    pub async fn delete(&self, key: &str) -> Result<bool> {
        self.client.delete(key).await
    }

    /// Deletes every key under `prefix`; says how many were deleted.
    pub async fn delete_prefix(&self, prefix: &str) -> Result<i64> {
        self.client.delete_prefix(prefix).await
    }

    /// Writes `value` under `key` only if the key is as expected (absent, or last modified
    /// at a given revision), in one transaction. Returns whether it was written and the
    /// entry now under the key.
    #[tracing::instrument(level = "debug", skip_all, fields(endpoints = %self.client.endpoints(), key, ?expect))]
    pub async fn compare_and_swap(
        &self,
        key: &str,
        expect: Expect,
        value: &C::Value,
        lease: Option<LeaseId>,
    ) -> Result<CasOutcome<C::Value>> {
        let bytes = self.encode(key, value)?;
        let expected = match expect {
            Expect::Absent => 0,
            Expect::ModRevision(revision) => revision,
        };
        let options = lease.map(|id| PutOptions::new().with_lease(id.0));
        let txn = Txn::new()
            .when([Compare::mod_revision(key, CompareOp::Equal, expected)])
            .and_then([TxnOp::put(key, bytes, options), TxnOp::get(key, None)])
            .or_else([TxnOp::get(key, None)]);
        let resp = self
            .client
            .request("compare_and_swap", None, lease, Retry::Mutable, |c| {
                let txn = txn.clone();
                async move { c.kv_client().txn(txn).await }
            })
            .await?;
        let succeeded = resp.succeeded();
        let mut current = None;
        for op in resp.op_responses() {
            if let TxnOpResponse::Get(mut get) = op {
                current = get.take_kvs().into_iter().next();
            }
        }
        let current = current.map(|kv| self.decode_entry(kv)).transpose()?;
        Ok(CasOutcome { succeeded, current })
    }

    /// Deletes `key` only if it was last modified at `mod_revision`; says whether it was
    /// deleted.
    #[tracing::instrument(level = "debug", skip_all, fields(endpoints = %self.client.endpoints(), key, mod_revision))]
    pub async fn compare_and_delete(&self, key: &str, mod_revision: i64) -> Result<bool> {
        let txn = Txn::new()
            .when([Compare::mod_revision(key, CompareOp::Equal, mod_revision)])
            .and_then([TxnOp::delete(key, None)]);
        let resp = self
            .client
            .request("compare_and_delete", None, None, Retry::Mutable, |c| {
                let txn = txn.clone();
                async move { c.kv_client().txn(txn).await }
            })
            .await?;
        Ok(resp.succeeded())
    }

    /// Writes many entries, all attached to `lease` if given, in as few transactions as
    /// the limits allow. See [`apply_batch`](Self::apply_batch).
    pub async fn put_many<I, K>(&self, entries: I, lease: Option<LeaseId>) -> Result<BatchOutcome>
    where
        I: IntoIterator<Item = (K, C::Value)>,
        K: Into<String>,
    {
        self.apply_batch(entries.into_iter().map(|(key, value)| Op::Put {
            key: key.into(),
            value,
            lease,
        }))
        .await
    }

    /// Applies puts and deletes in order, grouped into transactions of at most
    /// `limits.txn_max_ops` operations and about `limits.txn_max_bytes` bytes, never
    /// writing a key twice in one transaction. Each transaction is atomic; the batch as a
    /// whole is not: on failure, [`Error::BatchFailed`] says how many operations (from the
    /// start) were applied. Every value is encoded before anything is written.
    #[tracing::instrument(level = "debug", skip_all, fields(endpoints = %self.client.endpoints()))]
    pub async fn apply_batch(
        &self,
        ops: impl IntoIterator<Item = Op<C::Value>>,
    ) -> Result<BatchOutcome> {
        self.apply_batch_inner(None, ops).await
    }

    /// [`apply_batch`](Self::apply_batch) with every transaction applied only while
    /// `guard` holds: a writer that lost its claim (a deposed leader) writes nothing more,
    /// and learns it from [`Error::GuardFailed`].
    #[tracing::instrument(level = "debug", skip_all, fields(endpoints = %self.client.endpoints(), guard = %guard.key))]
    pub async fn apply_batch_guarded(
        &self,
        guard: &Guard,
        ops: impl IntoIterator<Item = Op<C::Value>>,
    ) -> Result<BatchOutcome> {
        self.apply_batch_inner(Some(guard), ops).await
    }

    async fn apply_batch_inner(
        &self,
        guard: Option<&Guard>,
        ops: impl IntoIterator<Item = Op<C::Value>>,
    ) -> Result<BatchOutcome> {
        let mut encoded: Vec<(String, Option<Vec<u8>>, Option<LeaseId>)> = Vec::new();
        for op in ops {
            match op {
                Op::Put { key, value, lease } => {
                    let bytes = self.encode(&key, &value)?;
                    encoded.push((key, Some(bytes), lease));
                }
                Op::Delete { key } => encoded.push((key, None, None)),
            }
        }
        let limits = self.client.limits();
        let ranges = batch::plan(
            encoded
                .iter()
                .map(|(key, value, _)| (key.as_str(), value.as_ref().map_or(0, Vec::len))),
            &limits,
        );
        let total = encoded.len();
        let mut outcome = BatchOutcome::default();
        let mut ops = encoded.into_iter();
        for range in ranges {
            let mut lease_used = None;
            let txn_ops: Vec<TxnOp> = ops
                .by_ref()
                .take(range.len())
                .map(|(key, value, lease)| match value {
                    Some(bytes) => {
                        lease_used = lease_used.or(lease);
                        let options = lease.map(|id| PutOptions::new().with_lease(id.0));
                        TxnOp::put(key, bytes, options)
                    }
                    None => TxnOp::delete(key, None),
                })
                .collect();
            let txn = match guard {
                Some(guard) => Txn::new().when([Compare::mod_revision(
                    guard.key.as_str(),
                    CompareOp::Equal,
                    guard.mod_revision,
                )]),
                None => Txn::new(),
            }
            .and_then(txn_ops);
            match self
                .client
                .request("apply_batch", None, lease_used, Retry::Mutable, |c| {
                    let txn = txn.clone();
                    async move { c.kv_client().txn(txn).await }
                })
                .await
            {
                Ok(resp) if guard.is_some() && !resp.succeeded() => {
                    let guard = guard.map(|g| g.key.clone()).unwrap_or_default();
                    return Err(Error::BatchFailed {
                        applied: outcome.ops,
                        total,
                        source: Box::new(Error::GuardFailed { key: guard }),
                    });
                }
                Ok(resp) => {
                    outcome.ops += range.len();
                    outcome.txns += 1;
                    outcome.revision = resp.header().map(|h| h.revision()).unwrap_or_default();
                }
                Err(err) => {
                    return Err(Error::BatchFailed {
                        applied: outcome.ops,
                        total,
                        source: Box::new(err),
                    });
                }
            }
        }
        tracing::debug!(ops = outcome.ops, txns = outcome.txns, "batch applied");
        Ok(outcome)
    }

    /// Watches every key under `prefix`, from `from_revision` (inclusive; 0 means "from
    /// now"), with the default [`WatchConfig`]. Returns once the store confirmed the watch.
    /// To follow a [`Listing`], watch from `listing.revision + 1`.
    pub async fn watch_prefix(
        &self,
        prefix: &str,
        from_revision: i64,
    ) -> Result<WatchStream<C::Value>> {
        self.watch_prefix_with(prefix, from_revision, &WatchConfig::default())
            .await
    }

    /// Like [`watch_prefix`](Self::watch_prefix) with an explicit configuration.
    #[tracing::instrument(level = "debug", skip_all, fields(endpoints = %self.client.endpoints(), prefix, from_revision))]
    pub async fn watch_prefix_with(
        &self,
        prefix: &str,
        from_revision: i64,
        config: &WatchConfig,
    ) -> Result<WatchStream<C::Value>> {
        watch::watch_prefix(
            &self.client,
            self.codec.clone(),
            prefix,
            from_revision,
            config,
        )
        .await
    }
}

/// How often a client's TLS files are checked for changes.
const TLS_RELOAD_INTERVAL: Duration = Duration::from_secs(1);

/// The files' bytes: a change is noticed whatever tool replaced them.
/// A KV client that takes responses as large as a listing page may be.
fn kv_of(client: &etcd_client::Client) -> etcd_client::KvClient {
    client
        .kv_client()
        .max_decoding_message_size(MAX_DECODING_MESSAGE_BYTES)
}

fn tls_snapshot(tls: &TlsFiles) -> [Option<Vec<u8>>; 3] {
    [Some(&tls.ca), tls.cert.as_ref(), tls.key.as_ref()]
        .map(|path| path.and_then(|p| std::fs::read(p).ok()))
}

/// Reconnects with the new certificates when the files change. A rotation caught half-way
/// (files that do not load together yet) is retried at the next tick with the old client
/// still in use.
async fn reload_on_change(
    config: ClientConfig,
    tls: TlsFiles,
    members: Arc<Members>,
    stop: CancellationToken,
) {
    let mut seen = tls_snapshot(&tls);
    let mut tick = tokio::time::interval(TLS_RELOAD_INTERVAL);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = tls_snapshot(&tls);
        if now == seen {
            continue;
        }
        let connected = match config.prepare() {
            Ok(prepared) => connect_each(&prepared).await.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        match connected {
            Ok(fresh) => {
                members.replace(fresh);
                seen = now;
                tracing::info!(ca = %tls.ca.display(), "reloaded client TLS certificates");
            }
            Err(error) => {
                tracing::warn!(%error, "changed TLS files do not load yet; keeping the previous ones");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_range_end_increments_the_last_byte() {
        assert_eq!(
            prefix_range_end(b"cilium/state/"),
            b"cilium/state0".to_vec()
        );
        assert_eq!(prefix_range_end(b"a"), b"b".to_vec());
        assert_eq!(prefix_range_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_range_end(b"a\xfe\xff\xff"), b"a\xff".to_vec());
        assert_eq!(prefix_range_end(b""), vec![0]);
        assert_eq!(prefix_range_end(b"\xff\xff"), vec![0]);
    }

    #[test]
    fn every_key_with_the_prefix_is_in_range() {
        for prefix in [&b"p/"[..], b"p\xff", b"\x00", b"z"] {
            let end = prefix_range_end(prefix);
            for suffix in [&b""[..], b"\x00", b"\xff\xff", b"x/y"] {
                let key = [prefix, suffix].concat();
                assert!(key.as_slice() >= prefix);
                assert!(end == [0] || key < end, "{key:?} not below {end:?}");
            }
            // The next key after the prefix range is outside it.
            if end != [0] {
                assert!(!end.starts_with(prefix));
            }
        }
    }

    #[test]
    fn empty_prefix_means_every_key() {
        assert_eq!(range_start(""), vec![0]);
        assert_eq!(range_start("a"), b"a".to_vec());
    }
}
