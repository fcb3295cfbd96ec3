//! One mirror task per peer of the peers directory: [`peer_follow::fleet`] runs them, as it
//! does the agent's direct mode; this is what kvstoremesh adds on each change.
//!
//! A new file starts a peer task; a changed file restarts it (the cache is kept and
//! reconciled); a removed file stops it and drains its cache after the grace period, unless
//! the file comes back first.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use kvstore::client::parse_peer_file;
use model::keys::peer_status_key;
use model::{ClusterName, StoreValue};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::local;
use daemon::error_chain as chain;
use peer_follow::{FleetTiming, Roster, run_fleet};

use crate::mirror::{self, Shared};
use crate::status::rfc3339;

/// Follows the peers directory with one mirror task per peer until `cancel`.
pub(crate) async fn run_manager(shared: Arc<Shared>, dir: PathBuf, cancel: CancellationToken) {
    let timing = FleetTiming {
        poll_interval: shared.timing.peers_poll_interval,
        stop_grace: shared.timing.shutdown_grace,
    };
    let roster = Manager {
        shared: shared.clone(),
        drains: BTreeMap::new(),
    };
    run_fleet(
        dir,
        shared.local_config.name.clone(),
        shared.claims.clone(),
        timing,
        roster,
        cancel,
    )
    .await;
}

struct Manager {
    shared: Arc<Shared>,
    /// Removed peers and when their cache is drained.
    drains: BTreeMap<ClusterName, Instant>,
}

impl Roster for Manager {
    fn start(
        &mut self,
        peer: &ClusterName,
        path: &Path,
        bytes: &[u8],
        dir: &Path,
        cancel: CancellationToken,
    ) -> Option<JoinHandle<()>> {
        let config = parse_peer_file(
            peer,
            path,
            bytes,
            dir,
            self.shared.timing.peer_request_timeout,
        );
        match &config {
            Ok(config) if !config.unknown_keys.is_empty() => tracing::warn!(
                %peer,
                keys = ?config.unknown_keys,
                "peer file has keys this build does not know; they are ignored"
            ),
            Ok(_) => {}
            Err(error) => tracing::error!(%peer, error = %chain(error), "peer file unusable"),
        }
        self.shared.board.configure(peer);
        // A peer whose file is unusable still gets a task: it publishes the peer's status.
        Some(tokio::spawn(mirror::run_peer(
            self.shared.clone(),
            peer.clone(),
            config,
            cancel,
        )))
    }

    async fn added(&mut self, peer: &ClusterName) {
        if self.drains.remove(peer).is_some() {
            tracing::info!(%peer, "peer file is back before its cache was drained");
        }
    }

    async fn removed(&mut self, peer: &ClusterName) {
        let grace = self.shared.timing.peer_removal_grace;
        self.drains.insert(peer.clone(), Instant::now() + grace);
        tracing::info!(%peer, ?grace, "its cache is drained after the grace period");
        self.write_removal_status(peer, grace).await;
        self.shared.board.remove(peer);
    }

    async fn polled(&mut self, followed: usize) -> bool {
        self.run_due_drains().await;
        let snapshot = self.shared.board.snapshot();
        self.shared.metrics.ready.set(i64::from(snapshot.ready));
        self.shared.metrics.peers.set(followed as i64);
        true
    }
}

impl Manager {
    async fn write_removal_status(&self, peer: &ClusterName, grace: Duration) {
        let (Some(mut peer_status), Some(lease)) =
            (self.shared.board.status_of(peer), self.shared.local.lease())
        else {
            return;
        };
        peer_status.connected = false;
        peer_status.connected_since = None;
        peer_status
            .disconnected_since
            .get_or_insert_with(|| rfc3339(SystemTime::now()));
        peer_status.removal_drains_at = Some(rfc3339(SystemTime::now() + grace));
        if let Err(error) = self
            .shared
            .local
            .put(&peer_status_key(peer), peer_status.encode(), lease)
            .await
        {
            tracing::debug!(%peer, error = %chain(&error), "cannot write the removed peer's status");
        }
    }

    async fn run_due_drains(&mut self) {
        let now = Instant::now();
        let due: Vec<ClusterName> = self
            .drains
            .iter()
            .filter(|(_, at)| **at <= now)
            .map(|(peer, _)| peer.clone())
            .collect();
        for peer in due {
            match local::drain_peer(&self.shared.local, &peer, false).await {
                Ok(()) => {
                    self.drains.remove(&peer);
                    self.shared.metrics.remove_peer(&peer);
                    tracing::info!(%peer, "removed peer's cache drained");
                }
                Err(error) => {
                    tracing::warn!(%peer, error = %chain(&error), "cannot drain the removed peer's cache yet");
                }
            }
        }
    }
}
