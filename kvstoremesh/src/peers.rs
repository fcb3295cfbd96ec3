//! One mirror task per peer of the peers directory ([`peer_follow::directory`] says which
//! peers it holds, the same way it does for the agent's direct mode).
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
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::local;
use daemon::error_chain as chain;
use peer_follow::{DirChange, PeerDirectory};

use crate::mirror::{self, Shared};
use crate::status::rfc3339;

/// A running peer task.
#[derive(Debug)]
struct Managed {
    cancel: CancellationToken,
    task: JoinHandle<()>,
}

/// Watches the peers directory and runs one task per peer until `cancel`.
pub(crate) async fn run_manager(shared: Arc<Shared>, dir: PathBuf, cancel: CancellationToken) {
    let mut manager = Manager {
        directory: PeerDirectory::new(dir, shared.local_config.name.clone()),
        shared,
        running: BTreeMap::new(),
        drains: BTreeMap::new(),
        cancel: cancel.clone(),
    };
    let mut tick = tokio::time::interval(manager.shared.timing.peers_poll_interval);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = cancel.cancelled() => break,
            _ = tick.tick() => {}
        }
        let changes = manager.directory.poll().await;
        manager.reconcile(changes).await;
        manager.run_due_drains().await;
        let snapshot = manager.shared.board.snapshot();
        manager.shared.metrics.ready.set(i64::from(snapshot.ready));
        manager
            .shared
            .metrics
            .peers
            .set(manager.running.len() as i64);
    }
    let grace = manager.shared.timing.shutdown_grace;
    let tasks: Vec<_> = manager.running.into_values().map(|m| m.task).collect();
    let aborts: Vec<_> = tasks.iter().map(JoinHandle::abort_handle).collect();
    if tokio::time::timeout(grace, futures::future::join_all(tasks))
        .await
        .is_err()
    {
        tracing::warn!(
            ?grace,
            "peer tasks did not stop within the grace period; aborting them"
        );
        aborts.iter().for_each(tokio::task::AbortHandle::abort);
    }
}

struct Manager {
    shared: Arc<Shared>,
    directory: PeerDirectory,
    running: BTreeMap<ClusterName, Managed>,
    /// Removed peers and when their cache is drained.
    drains: BTreeMap<ClusterName, Instant>,
    cancel: CancellationToken,
}

impl Manager {
    async fn reconcile(&mut self, changes: Vec<DirChange>) {
        for change in changes {
            match change {
                DirChange::Added { peer, path, bytes } => {
                    if self.drains.remove(&peer).is_some() {
                        tracing::info!(%peer, "peer file is back before its cache was drained");
                    } else {
                        tracing::info!(%peer, file = %path.display(), "peer added");
                    }
                    self.start(peer, &path, bytes);
                }
                DirChange::Changed { peer, path, bytes } => {
                    tracing::info!(%peer, "peer file changed: reconnecting with the new configuration");
                    self.stop(&peer).await;
                    self.start(peer, &path, bytes);
                }
                DirChange::Removed { peer } => {
                    self.stop(&peer).await;
                    self.shared.claims.release(&peer);
                    let grace = self.shared.timing.peer_removal_grace;
                    self.drains.insert(peer.clone(), Instant::now() + grace);
                    tracing::info!(%peer, ?grace, "peer file removed: its cache is drained after the grace period");
                    self.write_removal_status(&peer, grace).await;
                    self.shared.board.remove(&peer);
                }
            }
        }
    }

    fn start(&mut self, peer: ClusterName, path: &Path, bytes: Vec<u8>) {
        let config = parse_peer_file(
            &peer,
            path,
            &bytes,
            self.directory.dir(),
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
        self.shared.board.configure(&peer);
        let cancel = self.cancel.child_token();
        let span = tracing::info_span!("peer", peer = %peer);
        let task = tokio::spawn(
            mirror::run_peer(self.shared.clone(), peer.clone(), config, cancel.clone())
                .instrument(span),
        );
        self.running.insert(peer, Managed { cancel, task });
    }

    async fn stop(&mut self, peer: &ClusterName) {
        if let Some(managed) = self.running.remove(peer) {
            managed.cancel.cancel();
            let abort = managed.task.abort_handle();
            if tokio::time::timeout(self.shared.timing.shutdown_grace, managed.task)
                .await
                .is_err()
            {
                abort.abort();
            }
        }
    }

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
