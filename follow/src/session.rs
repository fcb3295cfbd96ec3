//! The driver of one peer's [`PeerTracker`] against a store: probe (identity, config,
//! heartbeat) at every session start and tick, list every prefix at one revision, follow
//! them with a [`MergedWatch`] one revision at a time, resume from the revision reached after
//! a broken session, list again after a compaction or a replaced store, back off between
//! sessions, stop on cancellation. What becomes of the tracker's [`PeerUpdate`]s is the
//! follower's [`Sink`].
//!
//! [`follow_peer`] drives one peer's own store (the agent's direct mode). The helpers it is
//! made of ([`list_at`], [`merged_watch`], [`take_revisions`], [`check_store`]) also serve a
//! reader of many peers over one connection (the agent's cache mode).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use kvstore::client::{ClientConfig, KeyChange, MergeError, MergedWatch, StoreClient, WatchStream};
use model::keys::{CACHE_ROOT, HEARTBEAT_CACHE_ROOT, STATE_ROOT, SYNCED_ROOT, cluster_config_key};
use model::{ClusterConfig, ClusterName, Kind, Phase, error_chain};
use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::tracker::{
    KeyClass, Layout, LinkError, ListReason, Part, PeerTracker, PeerUpdate, Signal, classify,
};
use crate::{Backoff, Claims, Heartbeat, StoreWitness};

/// Revisions' signals handed to the tracker in one go, at most (more are taken next time).
const MAX_SIGNAL_BATCH: usize = 4096;

/// How often and how long things happen in a session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Timing {
    /// Idle watches ask the store for progress this often, so changes under one prefix are
    /// handed out once every other prefix is known to have nothing earlier.
    pub progress_interval: Duration,
    /// How often a peer's identity, cluster config and heartbeat are read.
    pub probe_interval: Duration,
    /// How long one such read may take ([`crate::probe`]).
    pub probe_timeout: Duration,
    /// First reconnect delay; doubles up to `backoff_max`, with jitter.
    pub backoff_base: Duration,
    /// Longest reconnect delay.
    pub backoff_max: Duration,
    /// Keys per page when listing (at least; a store client configured larger keeps its).
    pub list_page_size: u32,
}

/// Why a session ended.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The store client refused or failed a request.
    #[error("store: {0}")]
    Store(#[from] kvstore::client::Error),
    /// A watch stream failed; resume from the revision reached.
    #[error(transparent)]
    Broken(MergeError),
    /// The revision the watch needed is compacted: list again.
    #[error("watch revision compacted; listing again")]
    Compacted,
    /// The store is not the one the resume point belongs to: list again.
    #[error("the store was replaced ({0}); listing again")]
    Replaced(String),
    /// The peer has published no usable cluster config (yet).
    #[error("{0}")]
    NotReady(String),
    /// The follower stopped listening.
    #[error(transparent)]
    Closed(#[from] SinkClosed),
}

impl SessionError {
    /// What the follower is told about a session that ended with this error.
    fn link_error(&self) -> LinkError {
        match self {
            SessionError::NotReady(text) => LinkError::Config(text.clone()),
            error => LinkError::Store(format!("reading the peer's store: {}", error_chain(error))),
        }
    }
}

/// The follower behind a [`Sink`] is gone.
#[derive(Debug, thiserror::Error)]
#[error("the follower stopped listening")]
pub struct SinkClosed;

/// Where a driver hands the tracker's updates: the follower's own state.
pub trait Sink<P>: Send {
    /// Takes one batch of updates, in order.
    fn deliver(
        &mut self,
        updates: Vec<PeerUpdate<P>>,
    ) -> impl Future<Output = Result<(), SinkClosed>> + Send;

    /// Resolves when the follower lost what it made of the peer's state (kvstoremesh: the
    /// lease its cache was written under changed): the driver hands the tracker's state out
    /// whole again ([`PeerTracker::republish`]), without reading the peer again. Never, by
    /// default.
    fn lost_state(&mut self) -> impl Future<Output = ()> + Send {
        std::future::pending()
    }

    /// A full listing of the peer is about to be read (it may yet fail): a follower that
    /// compares the listing with what it holds can start reading that now, beside the
    /// listing, instead of after it. Nothing, by default.
    fn listing_soon(&mut self) {}
}

/// A follower that owns its state in another task, fed through a channel.
impl<P: Send> Sink<P> for mpsc::Sender<Vec<PeerUpdate<P>>> {
    async fn deliver(&mut self, updates: Vec<PeerUpdate<P>>) -> Result<(), SinkClosed> {
        self.send(updates).await.map_err(|_| SinkClosed)
    }
}

/// Hands `out` to `sink` (if there is anything) and empties it.
pub async fn flush<P, S: Sink<P>>(
    sink: &mut S,
    out: &mut Vec<PeerUpdate<P>>,
) -> Result<(), SinkClosed> {
    if out.is_empty() {
        return Ok(());
    }
    sink.deliver(std::mem::take(out)).await
}

/// Every key under `prefixes` that [`classify`] reads, at one revision (the store client's
/// paged listing); keys that cannot be read are logged and skipped.
pub async fn list_at(
    client: &StoreClient,
    prefixes: &[String],
) -> Result<(i64, Vec<KeyChange>), SessionError> {
    let prefixes: Vec<String> = prefixes.iter().flat_map(|p| listing_prefixes(p)).collect();
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
        .map(|e| KeyChange {
            key: e.key,
            value: Some(e.value),
        })
        .collect();
    Ok((listing.revision, entries))
}

/// The prefixes a listing of `prefix` reads: a root of kinds is read kind by kind, because
/// etcd 3.4 scans the rest of a range for every page it returns, so paging through one large
/// range is quadratic in its size (300k entries: 4.2 s at once, 2.5 s kind by kind). What the
/// kinds' prefixes leave out of a root is nothing [`classify`] reads.
fn listing_prefixes(prefix: &str) -> Vec<String> {
    let kinds = |root: &str| Kind::ALL.map(|kind| format!("{root}{}/", kind.name()));
    if prefix == STATE_ROOT {
        kinds(STATE_ROOT).to_vec()
    } else if prefix == CACHE_ROOT {
        let mut out = kinds(CACHE_ROOT).to_vec();
        out.push(HEARTBEAT_CACHE_ROOT.to_owned());
        out
    } else {
        vec![prefix.to_owned()]
    }
}

/// A compacted revision, or a store behind what was seen (replaced), means listing again.
fn relist_or_store(error: kvstore::client::Error) -> SessionError {
    match error {
        kvstore::client::Error::Compacted { .. }
        | kvstore::client::Error::FutureRevision { .. } => SessionError::Compacted,
        error => SessionError::Store(error),
    }
}

impl From<MergeError> for SessionError {
    fn from(error: MergeError) -> Self {
        match error {
            MergeError::Relist(_) => SessionError::Compacted,
            error => SessionError::Broken(error),
        }
    }
}

/// Several prefix watches as one stream of whole revisions; what `layout` says is a canary
/// waits for the revision order, the rest may go early.
pub async fn merged_watch(
    client: &StoreClient,
    prefixes: &[String],
    from: i64,
    progress_interval: Duration,
    layout: Layout,
) -> Result<MergedWatch<WatchStream<Vec<u8>>>, SessionError> {
    /// Writes that may overtake other watches: anything but a canary.
    fn early(layout: Layout, key: &str) -> bool {
        !matches!(classify(layout, key), Some(KeyClass::Canary(..)))
    }
    let early: fn(&str) -> bool = match layout {
        Layout::Cache => |key| early(Layout::Cache, key),
        Layout::Direct => |key| early(Layout::Direct, key),
    };
    Ok(MergedWatch::open(&client.raw(), prefixes, from, progress_interval, early).await?)
}

/// Checks that the store is the one `resume` (the next revision to watch) belongs to: the
/// same identity, not behind what was seen. Otherwise the resume point is dropped (list
/// again).
pub async fn check_store(
    client: &StoreClient,
    witness: &mut StoreWitness,
    resume: &mut Option<i64>,
) -> Result<(), SessionError> {
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
/// buffered behind it, so bursts go out in few batches; `resume` follows what was taken.
/// An error ends the batch but keeps what came before it: those revisions are past the
/// resume point and must still reach the follower.
pub fn take_revisions(
    watch: &mut MergedWatch<WatchStream<Vec<u8>>>,
    first: Result<(i64, Vec<KeyChange>), MergeError>,
    layout: Layout,
    resume: &mut Option<i64>,
) -> (Vec<(Option<ClusterName>, Signal)>, Option<SessionError>) {
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
        if signals.len() < MAX_SIGNAL_BATCH {
            next = watch.next().now_or_never();
        }
    }
    (signals, None)
}

/// One revision's (or one listing's) changes as signals, completeness signals first.
pub fn order_batch(layout: Layout, events: Vec<KeyChange>) -> Vec<(Option<ClusterName>, Signal)> {
    let mut signals: Vec<(Option<ClusterName>, Signal)> = events
        .into_iter()
        .filter_map(|e| crate::tracker::signal_of(layout, e.key, e.value))
        .collect();
    signals.sort_by_key(|(_, s)| s.order());
    signals
}

/// The prefixes read from a peer's own store (all readable by `remote-<cluster>`).
pub fn direct_prefixes(peer: &ClusterName) -> Vec<String> {
    vec![STATE_ROOT.to_owned(), format!("{SYNCED_ROOT}{peer}/")]
}

/// Sleeps for `delay` unless cancelled first; says whether to go on.
pub async fn pause(delay: Duration, cancel: &CancellationToken) -> bool {
    tokio::select! {
        () = cancel.cancelled() => false,
        () = tokio::time::sleep(delay) => true,
    }
}

/// Follows `peer`'s own store (reached with `client`) until `cancel`, checked against the
/// `local` cluster's config and, for its cluster id, against every peer in `claims`; its
/// claim ends with it. Follows `kinds` (see [`PeerTracker::with_kinds`]). Updates go to
/// `sink`; the task stops early if the sink is gone.
#[allow(clippy::too_many_arguments)]
pub async fn follow_peer<P, S>(
    peer: ClusterName,
    local: ClusterConfig,
    kinds: &'static [model::Kind],
    claims: Arc<Claims>,
    client: ClientConfig,
    timing: Timing,
    sink: S,
    cancel: CancellationToken,
) where
    P: Part + Send + Sync,
    S: Sink<P>,
{
    let span = tracing::info_span!("peer", peer = %peer);
    let tracker = PeerTracker::new(peer.clone(), Layout::Direct, local)
        .with_claims(claims.clone())
        .with_kinds(kinds);
    run(tracker, client, timing, sink, cancel)
        .instrument(span)
        .await;
    claims.release(&peer);
}

async fn run<P, S>(
    tracker: PeerTracker<P>,
    mut config: ClientConfig,
    timing: Timing,
    mut sink: S,
    cancel: CancellationToken,
) where
    P: Part + Send + Sync,
    S: Sink<P>,
{
    let peer = tracker.peer().clone();
    config.limits.list_page_size = config.limits.list_page_size.max(timing.list_page_size);
    let client = match StoreClient::connect_lazy(&config).await {
        Ok(client) => client,
        Err(error) => {
            tracing::warn!(%error, "cannot set up the peer's store client");
            let mut out = vec![PeerUpdate::Link {
                peer,
                connected: false,
                error: Some(LinkError::Store(error_chain(&error))),
                silent: Duration::ZERO,
            }];
            let _ = flush(&mut sink, &mut out).await;
            return;
        }
    };
    let mut session = Session {
        peer: peer.clone(),
        tracker,
        resume: None,
        list_reason: ListReason::Initial,
        witness: StoreWitness::new(config.endpoints.len()),
        heartbeat: None,
        heartbeat_refused: false,
        config: None,
        connected_at: None,
        last_heard: None,
    };
    let mut backoff = Backoff::new(timing.backoff_base, timing.backoff_max);
    loop {
        let result = tokio::select! {
            () = cancel.cancelled() => return,
            result = session.run(&client, &timing, &mut sink) => result,
        };
        let error = match result {
            Err(SessionError::Closed(_)) => return,
            Err(error) => error,
            Ok(never) => match never {},
        };
        let reason = match &error {
            SessionError::Compacted => Some(ListReason::Compacted),
            SessionError::Replaced(_) => Some(ListReason::StoreReplaced),
            _ => None,
        };
        if let Some(reason) = reason {
            tracing::info!(%error, "listing the peer's store again");
            session.resume = None;
            session.list_reason = reason;
        }
        let connected_for = session.connected_at.take().map(|at| at.elapsed());
        backoff.session_ended(connected_for);
        let link = error.link_error();
        if connected_for.is_some() {
            tracing::warn!(error = %link, "lost the peer's store");
        } else {
            tracing::debug!(error = %link, "peer not reachable or not ready");
        }
        // Told after every failed attempt, so a follower's status names the latest cause.
        let silent = session.last_heard.map_or(Duration::ZERO, |at| at.elapsed());
        let mut out = vec![PeerUpdate::Link {
            peer: peer.clone(),
            connected: false,
            error: Some(link),
            silent,
        }];
        if flush(&mut sink, &mut out).await.is_err() {
            return;
        }
        if !pause(backoff.next_delay(), &cancel).await {
            return;
        }
    }
}

/// What one peer's driver keeps across sessions.
struct Session<P> {
    peer: ClusterName,
    tracker: PeerTracker<P>,
    /// The next revision to watch from; `None`: list first.
    resume: Option<i64>,
    /// Why the next listing happens.
    list_reason: ListReason,
    witness: StoreWitness,
    /// The peer's heartbeat as last signalled (`None`: not probed yet).
    heartbeat: Option<Option<Vec<u8>>>,
    /// The heartbeat the peer writes is refused (warned once until it changes).
    heartbeat_refused: bool,
    config: Option<Vec<u8>>,
    /// When the current session connected (the follower was told the link is up).
    connected_at: Option<Instant>,
    /// When the peer last answered a probe or sent a change: a lost peer is reported with
    /// the silence since then.
    last_heard: Option<Instant>,
}

/// A step of a session's watch loop.
enum Step {
    Watch(Result<(i64, Vec<KeyChange>), MergeError>),
    Probe,
    LostState,
}

impl<P: Part + Send + Sync> Session<P> {
    /// Looks at the peer's store ([`crate::probe`]) and signals what changed in its config and
    /// heartbeat; says why the store was replaced, if it was. A refused config is signalled
    /// again, so a refusal that another peer caused (an id clash) ends when that peer gives
    /// the id up.
    async fn probe(
        &mut self,
        client: &StoreClient,
        timeout: Duration,
        out: &mut Vec<PeerUpdate<P>>,
    ) -> Result<Option<String>, SessionError> {
        if let Some(next) = self.resume {
            self.witness.note_revision(next - 1);
        }
        let found = crate::probe(client, &self.peer, &mut self.witness, timeout).await?;
        self.last_heard = Some(Instant::now());
        if found.config != self.config || self.tracker.phase() == Phase::Refused {
            self.config = found.config.clone();
            if found.config.is_some() {
                self.tracker.handle(Signal::Config(found.config), out);
            }
        }
        let heartbeat = match found.heartbeat {
            Heartbeat::Valid(bytes) => Some(Some(bytes)),
            Heartbeat::Absent => Some(None),
            Heartbeat::Refused { bytes } => {
                if !self.heartbeat_refused {
                    tracing::warn!(
                        bytes,
                        "refused the peer's heartbeat: not short UTF-8 text; the last one stands"
                    );
                }
                None
            }
        };
        self.heartbeat_refused = heartbeat.is_none();
        if let Some(heartbeat) = heartbeat
            && self.heartbeat.as_ref() != Some(&heartbeat)
        {
            self.tracker
                .handle(Signal::Heartbeat(heartbeat.clone()), out);
            self.heartbeat = Some(heartbeat);
        }
        Ok(found.replaced)
    }

    fn route(&mut self, signals: Vec<(Option<ClusterName>, Signal)>, out: &mut Vec<PeerUpdate<P>>) {
        for (peer, signal) in signals {
            if peer.as_ref().is_none_or(|p| *p == self.peer) {
                self.tracker.handle(signal, out);
            }
        }
    }

    /// Why the peer cannot be used yet, if it cannot.
    fn not_ready(&self) -> Option<String> {
        match self.tracker.phase() {
            Phase::Refused => Some(
                self.tracker
                    .refusal()
                    .unwrap_or("the peer's cluster config is refused")
                    .to_owned(),
            ),
            Phase::Waiting if self.config.is_none() => Some(format!(
                "peer {} has not published {}",
                self.peer,
                cluster_config_key(&self.peer)
            )),
            Phase::Waiting => Some(format!("peer {} has no usable cluster config", self.peer)),
            Phase::Listing | Phase::Synced => None,
        }
    }

    async fn run<S: Sink<P>>(
        &mut self,
        client: &StoreClient,
        timing: &Timing,
        sink: &mut S,
    ) -> Result<std::convert::Infallible, SessionError> {
        let mut out = Vec::new();
        if let Some(reason) = self.probe(client, timing.probe_timeout, &mut out).await? {
            tracing::info!(reason, "the peer's store was replaced; listing again");
            self.resume = None;
            self.list_reason = ListReason::StoreReplaced;
        }
        flush(sink, &mut out).await?;
        // A peer without a usable config counts as not connected: it cannot be used.
        if let Some(why) = self.not_ready() {
            return Err(SessionError::NotReady(why));
        }
        if self.connected_at.is_none() {
            self.connected_at = Some(Instant::now());
            out.push(PeerUpdate::Link {
                peer: self.peer.clone(),
                connected: true,
                error: None,
                silent: Duration::ZERO,
            });
        }
        let prefixes = direct_prefixes(&self.peer);
        let from = match self.resume {
            Some(from) => from,
            None => {
                sink.listing_soon();
                let (revision, entries) = list_at(client, &prefixes).await?;
                self.last_heard = Some(Instant::now());
                tracing::info!(
                    revision,
                    keys = entries.len(),
                    reason = self.list_reason.as_str(),
                    "listed the peer's store"
                );
                self.tracker.begin_listing(self.list_reason, &mut out);
                let signals = order_batch(Layout::Direct, entries);
                self.route(signals, &mut out);
                self.tracker.end_listing(&mut out);
                flush(sink, &mut out).await?;
                self.list_reason = ListReason::Initial;
                revision + 1
            }
        };
        // The listing is handed over: a watch that fails to open resumes from after it.
        self.resume = Some(from);
        let mut watch = merged_watch(
            client,
            &prefixes,
            from,
            timing.progress_interval,
            Layout::Direct,
        )
        .await?;
        let mut probe = tokio::time::interval(timing.probe_interval);
        probe.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            if self.tracker.take_probe_soon() {
                probe.reset_immediately();
            }
            let step = tokio::select! {
                first = watch.next() => Step::Watch(first),
                _ = probe.tick() => Step::Probe,
                () = sink.lost_state() => Step::LostState,
            };
            match step {
                Step::Watch(first) => {
                    self.last_heard = Some(Instant::now());
                    let (signals, error) =
                        take_revisions(&mut watch, first, Layout::Direct, &mut self.resume);
                    self.route(signals, &mut out);
                    if let Some(error) = error {
                        flush(sink, &mut out).await?;
                        return Err(error);
                    }
                }
                Step::Probe => {
                    if let Some(reason) = self.probe(client, timing.probe_timeout, &mut out).await?
                    {
                        return Err(SessionError::Replaced(reason));
                    }
                }
                Step::LostState => self.tracker.republish(&mut out),
            }
            flush(sink, &mut out).await?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use model::keys::heartbeat_cache_key;

    /// Listing kind by kind must not lose a key the trackers read under a root.
    #[test]
    fn the_kinds_prefixes_hold_every_key_a_root_listing_would_have_given() {
        let peer = ClusterName::new("b").unwrap();
        let mut keys = vec![heartbeat_cache_key(&peer)];
        for kind in Kind::ALL {
            keys.push(format!("{}x", kind.state_prefix()));
            keys.push(format!("{STATE_ROOT}{}/v2/x", kind.name()));
            keys.push(format!("{}x", kind.cache_prefix(&peer)));
        }
        for (layout, root) in [(Layout::Direct, STATE_ROOT), (Layout::Cache, CACHE_ROOT)] {
            let listed = listing_prefixes(root);
            for key in keys.iter().filter(|k| k.starts_with(root)) {
                if classify(layout, key).is_some() {
                    assert!(
                        listed.iter().any(|p| key.starts_with(p.as_str())),
                        "{key} is read under {root} but not listed by {listed:?}"
                    );
                }
            }
        }
        assert_eq!(listing_prefixes(SYNCED_ROOT), vec![SYNCED_ROOT.to_owned()]);
    }
}
