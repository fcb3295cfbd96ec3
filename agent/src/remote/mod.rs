//! Peers' state: one watcher abstraction over two sources.
//!
//! - [`PeerSource::Cache`] (the default): kvstoremesh's cache in the local store
//!   (`cilium/cache/<kind>/v1/<peer>/...`, its canaries, its status of each peer and the
//!   mirrored heartbeat). One connection for every peer.
//! - [`PeerSource::Direct`]: each peer's own store, from a peers directory in kvstoremesh's
//!   format (one YAML file per peer named after it: `endpoints`, `trusted-ca-file`,
//!   `cert-file`, `key-file`). One connection per peer.
//!
//! Either way the peer-follow crate does the following: a session lists every prefix it reads
//! at one store revision, then watches them from the next revision with a merged watch, which
//! hands out changes one revision at a time in revision order across the prefixes. Every key
//! goes through one [`PeerTracker`] per peer, which validates, gates on the sync canaries and
//! decides what reaches the agent ([`PeerUpdate`]). A broken session resumes from the revision
//! it reached, so a peer that comes back costs no relist; only a compacted revision or a
//! replaced store does. Direct mode is [`peer_follow::follow_peer`] with the agent's channel as
//! its sink; cache mode reads many peers over one connection with the same pieces.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use kvstore::client::{ClientConfig, StoreClient};
use model::keys::{CACHE_ROOT, CLUSTER_CONFIG_ROOT, SYNCED_ROOT};
use model::{ClusterConfig, ClusterName};
use peer_follow::session::{
    self, SessionError, check_store, flush, list_at, merged_watch, order_batch, pause,
    take_revisions,
};
use peer_follow::tracker::{KeyClass, classify};
use peer_follow::{
    Backoff, Claims, FleetTiming, LinkError, ListReason, Roster, StoreWitness, follow_peer,
    run_fleet,
};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::state::PeerPart;

pub use model::Phase;
pub use peer_follow::{Layout, Signal};

/// One peer's state machine, staging into the agent's tables.
pub type PeerTracker = peer_follow::PeerTracker<PeerPart>;
/// What a watcher tells the agent.
pub type PeerUpdate = peer_follow::PeerUpdate<PeerPart>;

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

impl WatchTiming {
    /// What a session needs of these.
    fn session(&self) -> session::Timing {
        session::Timing {
            progress_interval: self.progress_interval,
            probe_interval: self.probe_interval,
            probe_timeout: self.probe_timeout,
            backoff_base: self.backoff_base,
            backoff_max: self.backoff_max,
            list_page_size: self.list_page_size,
        }
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
                t.begin_listing(ListReason::Initial, &mut Vec::new());
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
    mut tx: mpsc::Sender<Vec<PeerUpdate>>,
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
    let mut backoff = Backoff::new(timing.backoff_base, timing.backoff_max);
    let mut connected = false;
    loop {
        let session = cache_session(
            &client,
            &mut reader,
            &mut resume,
            &mut witness,
            &timing,
            &mut tx,
            &mut connected,
            &mut backoff,
        );
        let result = tokio::select! {
            () = cancel.cancelled() => return,
            result = session => result,
        };
        match result {
            Err(SessionError::Closed(_)) => return,
            Err(SessionError::Compacted) => {
                tracing::info!("local store revision compacted or store replaced; listing again");
                resume = None;
            }
            Err(error) => tracing::warn!(%error, "reading the local store failed; reconnecting"),
            Ok(()) => {}
        }
        if connected {
            connected = false;
            let mut out = vec![PeerUpdate::SourceLink { connected: false }];
            if flush(&mut tx, &mut out).await.is_err() {
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
    tx: &mut mpsc::Sender<Vec<PeerUpdate>>,
    connected: &mut bool,
    backoff: &mut Backoff,
) -> Result<(), SessionError> {
    check_store(client, witness, resume).await?;
    let prefixes = cache_prefixes();
    let mut out = Vec::new();
    let from = match *resume {
        Some(from) => from,
        None => {
            let (revision, entries) = list_at(client, &prefixes).await?;
            // The agent logs the reason only; a relist of the cache follows a compaction or
            // a replaced local store, which the agent does not tell apart.
            let reason = if reader.trackers.is_empty() {
                ListReason::Initial
            } else {
                ListReason::Compacted
            };
            tracing::info!(
                revision,
                keys = entries.len(),
                "listed the local store's cache"
            );
            reader.listing = true;
            for tracker in reader.trackers.values_mut() {
                tracker.begin_listing(reason, &mut out);
            }
            let listed: BTreeSet<ClusterName> = entries
                .iter()
                .filter_map(|e| match classify(Layout::Cache, &e.key) {
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
    // The listing is handed over: a watch that fails to open resumes from after it.
    *resume = Some(from);
    let mut watch = merged_watch(
        client,
        &prefixes,
        from,
        timing.progress_interval,
        Layout::Cache,
    )
    .await?;
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

/// The agent's side of the peers directory: a [`follow_peer`] task per peer, whose updates
/// go to the agent's channel, and the peer's presence told to the agent.
struct DirectRoster {
    local: ClusterConfig,
    claims: Arc<Claims>,
    timing: WatchTiming,
    tx: mpsc::Sender<Vec<PeerUpdate>>,
    out: Vec<PeerUpdate>,
}

impl Roster for DirectRoster {
    fn start(
        &mut self,
        peer: &ClusterName,
        path: &Path,
        bytes: &[u8],
        dir: &Path,
        cancel: CancellationToken,
    ) -> Option<JoinHandle<()>> {
        match kvstore::client::parse_peer_file(peer, path, bytes, dir, self.timing.request_timeout)
        {
            Ok(config) => {
                for key in &config.unknown_keys {
                    tracing::warn!(%peer, key, "unknown key in peer file; ignored");
                }
                Some(tokio::spawn(follow_peer(
                    peer.clone(),
                    self.local.clone(),
                    &model::Kind::CORE,
                    self.claims.clone(),
                    config.client,
                    self.timing.session(),
                    self.tx.clone(),
                    cancel,
                )))
            }
            Err(error) => {
                tracing::warn!(%peer, %error, "peer file unusable");
                self.out.push(PeerUpdate::Link {
                    peer: peer.clone(),
                    connected: false,
                    error: Some(LinkError::File(model::error_chain(&error))),
                    silent: Duration::ZERO,
                });
                None
            }
        }
    }

    async fn added(&mut self, peer: &ClusterName) {
        self.out.push(PeerUpdate::Configured {
            peer: peer.clone(),
            configured: true,
        });
    }

    async fn removed(&mut self, peer: &ClusterName) {
        self.out.push(PeerUpdate::Configured {
            peer: peer.clone(),
            configured: false,
        });
        self.out.push(PeerUpdate::Link {
            peer: peer.clone(),
            connected: false,
            error: Some(LinkError::File("the peer file was removed".into())),
            silent: Duration::ZERO,
        });
    }

    async fn polled(&mut self, _followed: usize) -> bool {
        flush(&mut self.tx, &mut self.out).await.is_ok()
    }
}

async fn run_direct(
    dir: PathBuf,
    local: ClusterConfig,
    timing: WatchTiming,
    tx: mpsc::Sender<Vec<PeerUpdate>>,
    cancel: CancellationToken,
) {
    let claims = Arc::new(Claims::default());
    let fleet = FleetTiming {
        poll_interval: timing.peers_poll_interval,
        // A follower stops at its next await; a store request is the longest of them.
        stop_grace: timing.request_timeout,
    };
    let name = local.name.clone();
    let roster = DirectRoster {
        local,
        claims: claims.clone(),
        timing,
        tx,
        out: Vec::new(),
    };
    run_fleet(dir, name, claims, fleet, roster, cancel).await;
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
        let mut backoff = Backoff::new(timing.backoff_base, timing.backoff_max);
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
