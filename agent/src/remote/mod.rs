//! Peers' state: one watcher abstraction over two sources.
//!
//! - [`PeerSource::Cache`] (the default): kvstoremesh's cache in the local store
//!   (`cilium/cache/<kind>/v1/<peer>/...`, its canaries, its status of each peer and the
//!   mirrored heartbeat). One connection for every peer.
//! - [`PeerSource::Direct`]: each peer's own store, from a peers directory in kvstoremesh's
//!   format (one YAML file per peer named after it: `endpoints`, `trusted-ca-file`,
//!   `cert-file`, `key-file`). One connection per peer.
//!
//! Either way a session lists every prefix it reads at one store revision, then watches them
//! from the next revision with [`MergedWatch`], which hands out changes one revision at a time
//! in revision order across the prefixes. Every key goes through [`tracker::signal_of`] and
//! one [`PeerTracker`] per peer, which validates, gates on the sync canaries and decides what
//! reaches the agent ([`PeerUpdate`]). A broken session resumes from the revision it reached,
//! so a peer that comes back costs no relist; only a compacted revision or a replaced store
//! does.

pub mod tracker;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use kvstore::client::{ClientConfig, MergeError, MergedWatch, StoreClient, WatchStream};
use model::keys::{CACHE_ROOT, CLUSTER_CONFIG_ROOT, STATE_ROOT, SYNCED_ROOT};
use model::{ClusterConfig, ClusterName};
use peer_follow::{Backoff, Claims, DirChange, Heartbeat, PeerDirectory, StoreWitness};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

pub use tracker::{KeyClass, Layout, PeerTracker, PeerUpdate, Phase, Signal};

/// Where peers' state is read from.
#[derive(Clone, Debug)]
pub enum PeerSource {
    /// kvstoremesh's cache in the local store.
    Cache(ClientConfig),
    /// Each peer's store, from a peers directory.
    Direct {
        /// One file per peer, named after it.
        peers_dir: PathBuf,
    },
}

/// How often and how long things happen.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WatchTiming {
    /// Idle watches ask the store for progress this often, so changes under one prefix are
    /// handed out once every other prefix is known to have nothing earlier.
    pub progress_interval: Duration,
    /// Direct reads: how often a peer's heartbeat and cluster config are read.
    pub probe_interval: Duration,
    /// Direct reads: how long one such read may take (a partitioned peer is noticed within
    /// the interval plus this).
    pub probe_timeout: Duration,
    /// Direct reads: how often the peers directory is read.
    pub peers_poll_interval: Duration,
    /// Timeout of one request to a peer's store (direct reads).
    pub request_timeout: Duration,
    /// First reconnect delay; doubles up to `backoff_max`, with jitter.
    pub backoff_base: Duration,
    /// Longest reconnect delay.
    pub backoff_max: Duration,
    /// Keys per page when listing (at least; a store client configured larger keeps its).
    pub list_page_size: u32,
}

impl Default for WatchTiming {
    fn default() -> Self {
        WatchTiming {
            progress_interval: Duration::from_millis(200),
            probe_interval: Duration::from_secs(1),
            probe_timeout: Duration::from_secs(1),
            peers_poll_interval: Duration::from_secs(2),
            request_timeout: Duration::from_secs(5),
            backoff_base: Duration::from_millis(200),
            backoff_max: Duration::from_secs(10),
            list_page_size: 2000,
        }
    }
}

/// Why a session ended.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    /// The store client refused or failed a request.
    #[error("store: {0}")]
    Store(#[from] kvstore::client::Error),
    /// A watch stream failed; resume from the revision reached.
    #[error("watch broken: {0}")]
    Broken(String),
    /// The revision the watch needed is compacted: list again.
    #[error("watch revision compacted; listing again")]
    Compacted,
    /// The store is not the one the resume point belongs to: list again.
    #[error("the store was replaced ({0}); listing again")]
    Replaced(String),
    /// The peer has published no usable cluster config (yet).
    #[error("{0}")]
    NotReady(String),
    /// The agent stopped listening.
    #[error("the agent stopped")]
    Closed,
}

/// One change of a key (the store client's type: changes are handed out per revision).
pub use kvstore::client::KeyChange as KeyEvent;

/// Every key under `prefixes` at one revision (the store client's paged listing).
pub async fn list_at(
    client: &StoreClient,
    prefixes: &[String],
) -> Result<(i64, Vec<KeyEvent>), RemoteError> {
    let prefixes: Vec<&str> = prefixes.iter().map(String::as_str).collect();
    let (listing, invalid) = client
        .raw()
        .list_prefixes_lenient(&prefixes)
        .await
        .map_err(relist_or_store)?;
    for error in invalid {
        tracing::warn!(%error, "ignoring a key that cannot be read");
    }
    let entries = listing
        .entries
        .into_iter()
        .map(|e| KeyEvent {
            key: e.key,
            value: Some(e.value),
        })
        .collect();
    Ok((listing.revision, entries))
}

/// A compacted revision, or a store behind what was seen (replaced), means listing again.
fn relist_or_store(error: kvstore::client::Error) -> RemoteError {
    match error {
        kvstore::client::Error::Compacted { .. }
        | kvstore::client::Error::FutureRevision { .. } => RemoteError::Compacted,
        error => RemoteError::Store(error),
    }
}

impl From<MergeError> for RemoteError {
    fn from(error: MergeError) -> Self {
        match error {
            MergeError::Relist(_) => RemoteError::Compacted,
            MergeError::Broken(error) => RemoteError::Broken(error.to_string()),
            MergeError::Ended => RemoteError::Broken(error.to_string()),
        }
    }
}

/// Several prefix watches as one stream of whole revisions ([`kvstore::client::MergedWatch`]);
/// what `layout` says is a canary waits for the revision order, the rest may go early.
async fn merged_watch(
    client: &StoreClient,
    prefixes: &[String],
    from: i64,
    timing: &WatchTiming,
    layout: Layout,
) -> Result<MergedWatch<WatchStream<Vec<u8>>>, RemoteError> {
    /// Writes that may overtake other watches: anything but a canary.
    fn early(layout: Layout, key: &str) -> bool {
        !matches!(tracker::classify(layout, key), Some(KeyClass::Canary(..)))
    }
    let early: fn(&str) -> bool = match layout {
        Layout::Cache => |key| early(Layout::Cache, key),
        Layout::Direct => |key| early(Layout::Direct, key),
    };
    let progress = timing.progress_interval;
    Ok(MergedWatch::open(&client.raw(), prefixes, from, progress, early).await?)
}

/// Reconnect delays from the agent's flags (the same rule as kvstoremesh's).
fn backoff(timing: &WatchTiming) -> Backoff {
    Backoff::new(timing.backoff_base, timing.backoff_max)
}

/// Sends updates to the agent; `Closed` when it stopped.
async fn flush(
    tx: &mpsc::Sender<Vec<PeerUpdate>>,
    out: &mut Vec<PeerUpdate>,
) -> Result<(), RemoteError> {
    if out.is_empty() {
        return Ok(());
    }
    tx.send(std::mem::take(out))
        .await
        .map_err(|_| RemoteError::Closed)
}

/// Sleeps for `delay` unless cancelled first; says whether to go on.
async fn pause(delay: Duration, cancel: &CancellationToken) -> bool {
    tokio::select! {
        () = cancel.cancelled() => false,
        () = tokio::time::sleep(delay) => true,
    }
}

/// Starts reading peers from `source`; updates go to `tx` until `cancel`.
pub fn spawn(
    source: PeerSource,
    local: ClusterConfig,
    timing: WatchTiming,
    tx: mpsc::Sender<Vec<PeerUpdate>>,
    cancel: CancellationToken,
) -> JoinHandle<()> {
    match source {
        PeerSource::Cache(config) => tokio::spawn(
            run_cache(config, local, timing, tx, cancel)
                .instrument(tracing::info_span!("peers", source = "cache")),
        ),
        PeerSource::Direct { peers_dir } => tokio::spawn(
            run_direct(peers_dir, local, timing, tx, cancel)
                .instrument(tracing::info_span!("peers", source = "direct")),
        ),
    }
}

/// Checks that the store is the one `resume` (the next revision to watch) belongs to: the
/// same identity, not behind what was seen. Otherwise the resume point is dropped (list
/// again).
async fn check_store(
    client: &StoreClient,
    witness: &mut StoreWitness,
    resume: &mut Option<i64>,
) -> Result<(), RemoteError> {
    let status = client.status().await?;
    if let Some(next) = *resume {
        witness.note_revision(next - 1);
    }
    if let Some(reason) = witness.check_status(&status) {
        tracing::info!(reason, "the store was replaced; listing again");
        *resume = None;
    }
    Ok(())
}

/// The signals of `first` (the watch's next revision) and of the revisions already
/// buffered behind it, so bursts go out in few messages; `resume` follows what was taken.
/// An error ends the batch but keeps what came before it: those revisions are past the
/// resume point and must still reach the agent.
fn take_revisions(
    watch: &mut MergedWatch<WatchStream<Vec<u8>>>,
    first: Result<(i64, Vec<KeyEvent>), MergeError>,
    layout: Layout,
    resume: &mut Option<i64>,
) -> (Vec<(Option<ClusterName>, Signal)>, Option<RemoteError>) {
    let mut signals = Vec::new();
    let mut next = Some(first);
    while let Some(result) = next.take() {
        match result {
            Ok((_, events)) => {
                *resume = Some(watch.resume_point());
                signals.extend(order_batch(layout, events));
            }
            Err(error) => {
                *resume = Some(watch.resume_point());
                return (signals, Some(error.into()));
            }
        }
        if signals.len() < 4096 {
            next = watch.next().now_or_never();
        }
    }
    (signals, None)
}

/// Applies one revision's changes through `route`, completeness signals first.
fn order_batch(layout: Layout, events: Vec<KeyEvent>) -> Vec<(Option<ClusterName>, Signal)> {
    let mut signals: Vec<(Option<ClusterName>, Signal)> = events
        .into_iter()
        .filter_map(|e| tracker::signal_of(layout, e.key, e.value))
        .collect();
    signals.sort_by_key(|(_, s)| s.order());
    signals
}

// ---- cache mode ---------------------------------------------------------------------------

/// The prefixes read from the local store in cache mode (all readable by `local-<cluster>`).
pub fn cache_prefixes() -> Vec<String> {
    vec![
        CACHE_ROOT.to_owned(),
        CLUSTER_CONFIG_ROOT.to_owned(),
        SYNCED_ROOT.to_owned(),
    ]
}

struct CacheReader {
    local: ClusterConfig,
    trackers: BTreeMap<ClusterName, PeerTracker>,
    configured: BTreeSet<ClusterName>,
    listing: bool,
}

impl CacheReader {
    fn route(&mut self, peer: Option<ClusterName>, signal: Signal, out: &mut Vec<PeerUpdate>) {
        let Some(peer) = peer else {
            return;
        };
        if peer == self.local.name {
            return;
        }
        if let Signal::Config(value) = &signal {
            let configured = value.is_some();
            let changed = if configured {
                self.configured.insert(peer.clone())
            } else {
                self.configured.remove(&peer)
            };
            if changed {
                out.push(PeerUpdate::Configured {
                    peer: peer.clone(),
                    configured,
                });
            }
        }
        let local = self.local.clone();
        let listing = self.listing;
        let tracker = self.trackers.entry(peer.clone()).or_insert_with(|| {
            let mut t = PeerTracker::new(peer, Layout::Cache, local);
            if listing {
                t.begin_listing(&mut Vec::new());
            }
            t
        });
        tracker.handle(signal, out);
    }
}

async fn run_cache(
    config: ClientConfig,
    local: ClusterConfig,
    timing: WatchTiming,
    tx: mpsc::Sender<Vec<PeerUpdate>>,
    cancel: CancellationToken,
) {
    let mut config = config;
    config.limits.list_page_size = config.limits.list_page_size.max(timing.list_page_size);
    let client = match StoreClient::connect_lazy(&config).await {
        Ok(client) => client,
        Err(error) => {
            tracing::error!(%error, "cannot set up the local store client; no peer will be read");
            return;
        }
    };
    let mut reader = CacheReader {
        local,
        trackers: BTreeMap::new(),
        configured: BTreeSet::new(),
        listing: false,
    };
    let mut resume = None;
    let mut witness = StoreWitness::new(config.endpoints.len());
    let mut backoff = backoff(&timing);
    let mut connected = false;
    loop {
        let session = cache_session(
            &client,
            &mut reader,
            &mut resume,
            &mut witness,
            &timing,
            &tx,
            &mut connected,
            &mut backoff,
        );
        let result = tokio::select! {
            () = cancel.cancelled() => return,
            result = session => result,
        };
        match result {
            Err(RemoteError::Closed) => return,
            Err(RemoteError::Compacted) => {
                tracing::info!("local store revision compacted or store replaced; listing again");
                resume = None;
            }
            Err(error) => tracing::warn!(%error, "reading the local store failed; reconnecting"),
            Ok(()) => {}
        }
        if connected {
            connected = false;
            let mut out = vec![PeerUpdate::SourceLink { connected: false }];
            if flush(&tx, &mut out).await.is_err() {
                return;
            }
        }
        if !pause(backoff.next_delay(), &cancel).await {
            return;
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn cache_session(
    client: &StoreClient,
    reader: &mut CacheReader,
    resume: &mut Option<i64>,
    witness: &mut StoreWitness,
    timing: &WatchTiming,
    tx: &mpsc::Sender<Vec<PeerUpdate>>,
    connected: &mut bool,
    backoff: &mut Backoff,
) -> Result<(), RemoteError> {
    check_store(client, witness, resume).await?;
    let prefixes = cache_prefixes();
    let mut out = Vec::new();
    let from = match *resume {
        Some(from) => from,
        None => {
            let (revision, entries) = list_at(client, &prefixes).await?;
            tracing::info!(
                revision,
                keys = entries.len(),
                "listed the local store's cache"
            );
            reader.listing = true;
            for tracker in reader.trackers.values_mut() {
                tracker.begin_listing(&mut out);
            }
            let listed: BTreeSet<ClusterName> = entries
                .iter()
                .filter_map(|e| match tracker::classify(Layout::Cache, &e.key) {
                    Some(KeyClass::Config(peer)) => Some(peer),
                    _ => None,
                })
                .collect();
            for (peer, signal) in order_batch(Layout::Cache, entries) {
                reader.route(peer, signal, &mut out);
            }
            // Peers whose config is gone since the last listing.
            for gone in reader.configured.clone().difference(&listed) {
                reader.route(Some(gone.clone()), Signal::Config(None), &mut out);
            }
            reader.listing = false;
            for tracker in reader.trackers.values_mut() {
                tracker.end_listing(&mut out);
            }
            flush(tx, &mut out).await?;
            revision + 1
        }
    };
    let mut watch = merged_watch(client, &prefixes, from, timing, Layout::Cache).await?;
    *resume = Some(from);
    *connected = true;
    backoff.reset();
    out.push(PeerUpdate::SourceLink { connected: true });
    flush(tx, &mut out).await?;
    loop {
        let first = watch.next().await;
        let (signals, error) = take_revisions(&mut watch, first, Layout::Cache, resume);
        for (peer, signal) in signals {
            reader.route(peer, signal, &mut out);
        }
        flush(tx, &mut out).await?;
        if let Some(error) = error {
            return Err(error);
        }
    }
}

// ---- direct mode --------------------------------------------------------------------------

/// The prefixes read from a peer's store in direct mode (all readable by `remote-<cluster>`).
pub fn direct_prefixes(peer: &ClusterName) -> Vec<String> {
    vec![STATE_ROOT.to_owned(), format!("{SYNCED_ROOT}{peer}/")]
}

struct RunningPeer {
    cancel: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl RunningPeer {
    /// Stops the peer's task and waits for it, so its claim on a cluster id is gone before
    /// a successor claims.
    async fn stop(self) {
        self.cancel.cancel();
        if let Some(task) = self.task {
            let _ = task.await;
        }
    }
}

async fn run_direct(
    dir: PathBuf,
    local: ClusterConfig,
    timing: WatchTiming,
    tx: mpsc::Sender<Vec<PeerUpdate>>,
    cancel: CancellationToken,
) {
    let mut directory = PeerDirectory::new(dir, local.name.clone());
    let claims = Arc::new(Claims::default());
    let mut running: BTreeMap<ClusterName, RunningPeer> = BTreeMap::new();
    let mut tick = tokio::time::interval(timing.peers_poll_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = cancel.cancelled() => break,
            _ = tick.tick() => {}
        }
        let mut out = Vec::new();
        for change in directory.poll().await {
            let (peer, path, bytes) = match change {
                DirChange::Removed { peer } => {
                    if let Some(old) = running.remove(&peer) {
                        old.stop().await;
                    }
                    tracing::info!(%peer, "peer file removed");
                    out.push(PeerUpdate::Configured {
                        peer: peer.clone(),
                        configured: false,
                    });
                    out.push(PeerUpdate::Link {
                        peer,
                        connected: false,
                        error: Some("the peer file was removed".into()),
                    });
                    continue;
                }
                DirChange::Changed { peer, path, bytes } => {
                    tracing::info!(%peer, "peer file changed; reconnecting");
                    if let Some(old) = running.remove(&peer) {
                        old.stop().await;
                    }
                    (peer, path, bytes)
                }
                DirChange::Added { peer, path, bytes } => {
                    out.push(PeerUpdate::Configured {
                        peer: peer.clone(),
                        configured: true,
                    });
                    (peer, path, bytes)
                }
            };
            let child = cancel.child_token();
            let task = match kvstore::client::parse_peer_file(
                &peer,
                &path,
                &bytes,
                directory.dir(),
                timing.request_timeout,
            ) {
                Ok(config) => {
                    for key in &config.unknown_keys {
                        tracing::warn!(%peer, key, "unknown key in peer file; ignored");
                    }
                    let span = tracing::info_span!("peer", peer = %peer);
                    let tracker = PeerTracker::new(peer.clone(), Layout::Direct, local.clone())
                        .with_claims(claims.clone());
                    Some(tokio::spawn(
                        run_direct_peer(
                            config.client,
                            tracker,
                            claims.clone(),
                            timing.clone(),
                            tx.clone(),
                            child.clone(),
                        )
                        .instrument(span),
                    ))
                }
                Err(error) => {
                    tracing::warn!(%peer, %error, "peer file unusable");
                    out.push(PeerUpdate::Link {
                        peer: peer.clone(),
                        connected: false,
                        error: Some(error.to_string()),
                    });
                    None
                }
            };
            running.insert(
                peer,
                RunningPeer {
                    cancel: child,
                    task,
                },
            );
        }
        if flush(&tx, &mut out).await.is_err() {
            break;
        }
    }
    for (_, peer) in running {
        peer.stop().await;
    }
}

/// Follows one peer's store until `cancel`; its cluster-id claim ends with it.
async fn run_direct_peer(
    config: ClientConfig,
    tracker: PeerTracker,
    claims: Arc<Claims>,
    timing: WatchTiming,
    tx: mpsc::Sender<Vec<PeerUpdate>>,
    cancel: CancellationToken,
) {
    let peer = tracker.peer().clone();
    follow_direct_peer(config, tracker, timing, tx, cancel).await;
    claims.release(&peer);
}

async fn follow_direct_peer(
    config: ClientConfig,
    tracker: PeerTracker,
    timing: WatchTiming,
    tx: mpsc::Sender<Vec<PeerUpdate>>,
    cancel: CancellationToken,
) {
    let peer = tracker.peer().clone();
    let mut config = config;
    config.limits.list_page_size = config.limits.list_page_size.max(timing.list_page_size);
    let client = match StoreClient::connect_lazy(&config).await {
        Ok(client) => client,
        Err(error) => {
            tracing::warn!(%error, "cannot set up the peer's store client");
            let mut out = vec![PeerUpdate::Link {
                peer,
                connected: false,
                error: Some(error.to_string()),
            }];
            let _ = flush(&tx, &mut out).await;
            return;
        }
    };
    let mut session = DirectSession {
        peer: peer.clone(),
        tracker,
        resume: None,
        witness: StoreWitness::new(config.endpoints.len()),
        heartbeat: None,
        config: None,
        connected: false,
    };
    let mut backoff = backoff(&timing);
    loop {
        let result = tokio::select! {
            () = cancel.cancelled() => return,
            result = session.run(&client, &timing, &tx, &mut backoff) => result,
        };
        let error = match result {
            Err(RemoteError::Closed) => return,
            Err(error @ (RemoteError::Compacted | RemoteError::Replaced(_))) => {
                tracing::info!(%error, "listing the peer's store again");
                session.resume = None;
                error.to_string()
            }
            Err(error) => error.to_string(),
            Ok(()) => String::new(),
        };
        if session.connected {
            session.connected = false;
            tracing::warn!(%error, "lost the peer's store");
            let mut out = vec![PeerUpdate::Link {
                peer: peer.clone(),
                connected: false,
                error: Some(error),
            }];
            if flush(&tx, &mut out).await.is_err() {
                return;
            }
        } else {
            tracing::debug!(%error, "peer not reachable or not ready");
        }
        if !pause(backoff.next_delay(), &cancel).await {
            return;
        }
    }
}

struct DirectSession {
    peer: ClusterName,
    tracker: PeerTracker,
    resume: Option<i64>,
    witness: StoreWitness,
    heartbeat: Option<Vec<u8>>,
    config: Option<Vec<u8>>,
    connected: bool,
}

impl DirectSession {
    /// Looks at the peer's store ([`peer_follow::probe`]) and signals what changed in its
    /// config and heartbeat; says why the store was replaced, if it was. A refused config is
    /// signalled again, so a refusal that another peer caused (an id clash) ends when that
    /// peer gives the id up.
    async fn probe(
        &mut self,
        client: &StoreClient,
        timeout: Duration,
        out: &mut Vec<PeerUpdate>,
    ) -> Result<Option<String>, RemoteError> {
        if let Some(next) = self.resume {
            self.witness.note_revision(next - 1);
        }
        let found = peer_follow::probe(client, &self.peer, &mut self.witness, timeout).await?;
        if found.config != self.config || self.tracker.phase() == Phase::Refused {
            self.config = found.config.clone();
            if found.config.is_some() {
                self.tracker.handle(Signal::Config(found.config), out);
            }
        }
        let heartbeat = match found.heartbeat {
            Heartbeat::Valid(bytes) => Some(bytes),
            Heartbeat::Absent | Heartbeat::Refused { .. } => None,
        };
        if heartbeat.is_some() && heartbeat != self.heartbeat {
            self.tracker.handle(Signal::Heartbeat, out);
        }
        self.heartbeat = heartbeat;
        Ok(found.replaced)
    }

    fn route(&mut self, signals: Vec<(Option<ClusterName>, Signal)>, out: &mut Vec<PeerUpdate>) {
        for (peer, signal) in signals {
            if peer.as_ref().is_none_or(|p| *p == self.peer) {
                self.tracker.handle(signal, out);
            }
        }
    }

    async fn run(
        &mut self,
        client: &StoreClient,
        timing: &WatchTiming,
        tx: &mpsc::Sender<Vec<PeerUpdate>>,
        backoff: &mut Backoff,
    ) -> Result<(), RemoteError> {
        let mut out = Vec::new();
        if let Some(reason) = self.probe(client, timing.probe_timeout, &mut out).await? {
            tracing::info!(reason, "the peer's store was replaced; listing again");
            self.resume = None;
        }
        flush(tx, &mut out).await?;
        // A peer without a usable config counts as not connected: it cannot be used.
        if matches!(self.tracker.phase(), Phase::Waiting | Phase::Refused) {
            return Err(RemoteError::NotReady(format!(
                "peer {} has no usable cluster config",
                self.peer
            )));
        }
        if !self.connected {
            self.connected = true;
            out.push(PeerUpdate::Link {
                peer: self.peer.clone(),
                connected: true,
                error: None,
            });
        }
        let prefixes = direct_prefixes(&self.peer);
        let from = match self.resume {
            Some(from) => from,
            None => {
                let (revision, entries) = list_at(client, &prefixes).await?;
                tracing::info!(revision, keys = entries.len(), "listed the peer's store");
                self.tracker.begin_listing(&mut out);
                let signals = order_batch(Layout::Direct, entries);
                self.route(signals, &mut out);
                self.tracker.end_listing(&mut out);
                flush(tx, &mut out).await?;
                revision + 1
            }
        };
        let mut watch = merged_watch(client, &prefixes, from, timing, Layout::Direct).await?;
        self.resume = Some(from);
        backoff.reset();
        let mut probe = tokio::time::interval(timing.probe_interval);
        probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                first = watch.next() => {
                    let (signals, error) =
                        take_revisions(&mut watch, first, Layout::Direct, &mut self.resume);
                    self.route(signals, &mut out);
                    if let Some(error) = error {
                        flush(tx, &mut out).await?;
                        return Err(error);
                    }
                }
                _ = probe.tick() => {
                    if let Some(reason) = self.probe(client, timing.probe_timeout, &mut out).await? {
                        return Err(RemoteError::Replaced(reason));
                    }
                }
            }
            flush(tx, &mut out).await?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The agent's jitter used to reach 1.5× `--backoff-max`; the flag is a ceiling now, as
    /// it is for kvstoremesh.
    #[test]
    fn reconnect_delays_stay_within_backoff_max() {
        let timing = WatchTiming {
            backoff_base: Duration::from_millis(100),
            backoff_max: Duration::from_secs(1),
            ..WatchTiming::default()
        };
        let mut backoff = backoff(&timing);
        let delays: Vec<Duration> = (0..200).map(|_| backoff.next_delay()).collect();
        assert!(
            delays.iter().all(|d| *d <= timing.backoff_max),
            "{delays:?}"
        );
        assert!(delays[0] >= timing.backoff_base / 2 && delays[0] <= timing.backoff_base);
        // At the ceiling the delays still spread, so peers do not reconnect in lockstep.
        let at_max: BTreeSet<u128> = delays[10..].iter().map(Duration::as_micros).collect();
        assert!(at_max.len() > 1);
    }
}
