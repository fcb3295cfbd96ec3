//! The peers directory: one file per peer, named after it. Polled (content compared), so
//! files written in place, renamed over, or swapped through a Kubernetes secret volume's
//! `..data` symlink are all noticed. Names starting with `.` and names that are not cluster
//! names (a peer's `ca.crt`, say) are not peers.
//!
//! A new file starts a peer task; a changed file restarts it (the cache is kept and
//! reconciled); a removed file stops it and drains its cache after the grace period, unless
//! the file comes back first.

use std::collections::{BTreeMap, HashSet};
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

use crate::mirror::{self, Shared};
use crate::status::rfc3339;

/// A running peer task.
#[derive(Debug)]
struct Managed {
    bytes: Vec<u8>,
    cancel: CancellationToken,
    task: JoinHandle<()>,
}

/// What the directory holds: file name → content (`None`: present but unreadable now).
type Scan = BTreeMap<String, (PathBuf, Option<Vec<u8>>)>;

/// Watches the peers directory and runs one task per peer until `cancel`.
pub(crate) async fn run_manager(shared: Arc<Shared>, dir: PathBuf, cancel: CancellationToken) {
    let mut manager = Manager {
        shared,
        dir,
        running: BTreeMap::new(),
        drains: BTreeMap::new(),
        noted: HashSet::new(),
        scan_error: None,
        cancel: cancel.clone(),
    };
    let mut tick = tokio::time::interval(manager.shared.timing.peers_poll_interval);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = cancel.cancelled() => break,
            _ = tick.tick() => {}
        }
        match scan(&manager.dir).await {
            Ok(files) => {
                if manager.scan_error.take().is_some() {
                    tracing::info!(dir = %manager.dir.display(), "peers directory readable again");
                }
                manager.reconcile(files).await;
            }
            Err(error) => {
                let text = error.to_string();
                if manager.scan_error.as_deref() != Some(&text) {
                    tracing::warn!(
                        dir = %manager.dir.display(),
                        error = %text,
                        "cannot read the peers directory; keeping the peers as they are"
                    );
                    manager.scan_error = Some(text);
                }
            }
        }
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
    dir: PathBuf,
    running: BTreeMap<ClusterName, Managed>,
    /// Removed peers and when their cache is drained.
    drains: BTreeMap<ClusterName, Instant>,
    /// File names already reported as not being peers.
    noted: HashSet<String>,
    scan_error: Option<String>,
    cancel: CancellationToken,
}

impl Manager {
    async fn reconcile(&mut self, files: Scan) {
        let mut present = HashSet::new();
        for (name, (path, bytes)) in &files {
            let Ok(peer) = ClusterName::new(name.as_str()) else {
                let looks_like_peer = bytes
                    .as_ref()
                    .is_some_and(|b| String::from_utf8_lossy(b).contains("endpoints"));
                if looks_like_peer && self.noted.insert(name.clone()) {
                    tracing::warn!(
                        file = %path.display(),
                        "ignoring a peer file whose name is not a cluster name (lowercase \
                         letters, digits and '-', at most 32 characters)"
                    );
                }
                continue;
            };
            if peer == self.shared.local_config.name {
                if self.noted.insert(name.clone()) {
                    tracing::info!(file = %path.display(), "ignoring the peer file of this cluster itself");
                }
                continue;
            }
            present.insert(peer.clone());
            let Some(bytes) = bytes else {
                continue;
            };
            match self.running.get(&peer) {
                Some(managed) if managed.bytes == *bytes => continue,
                Some(_) => {
                    tracing::info!(%peer, "peer file changed: reconnecting with the new configuration");
                    self.stop(&peer).await;
                }
                None if self.drains.remove(&peer).is_some() => {
                    tracing::info!(%peer, "peer file is back before its cache was drained");
                }
                None => tracing::info!(%peer, file = %path.display(), "peer added"),
            }
            self.start(peer, path, bytes.clone());
        }
        let removed: Vec<ClusterName> = self
            .running
            .keys()
            .filter(|peer| !present.contains(*peer))
            .cloned()
            .collect();
        for peer in removed {
            self.stop(&peer).await;
            self.shared.claims.release(&peer);
            let grace = self.shared.timing.peer_removal_grace;
            self.drains.insert(peer.clone(), Instant::now() + grace);
            tracing::info!(%peer, ?grace, "peer file removed: its cache is drained after the grace period");
            self.write_removal_status(&peer, grace).await;
            self.shared.board.remove(&peer);
        }
    }

    fn start(&mut self, peer: ClusterName, path: &Path, bytes: Vec<u8>) {
        let config = parse_peer_file(
            &peer,
            path,
            &bytes,
            &self.dir,
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
        self.running.insert(
            peer,
            Managed {
                bytes,
                cancel,
                task,
            },
        );
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

/// Reads every candidate file of the directory.
async fn scan(dir: &Path) -> std::io::Result<Scan> {
    let mut files = Scan::new();
    let mut entries = tokio::fs::read_dir(dir).await?;
    while let Some(entry) = entries.next_entry().await? {
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        if name.starts_with('.') {
            continue;
        }
        let path = entry.path();
        // Follows symlinks; a dangling one is skipped like a missing file.
        match tokio::fs::metadata(&path).await {
            Ok(meta) if meta.is_file() => {}
            _ => continue,
        }
        let bytes = tokio::fs::read(&path).await.ok();
        files.insert(name, (path, bytes));
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn scan_skips_hidden_entries_and_directories() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("b"), "endpoints: [\"http://a:1\"]\n").unwrap();
        std::fs::write(dir.path().join(".hidden"), "x").unwrap();
        std::fs::create_dir(dir.path().join("..data")).unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("..data").join("c"), "endpoints: []\n").unwrap();
        std::os::unix::fs::symlink(dir.path().join("..data").join("c"), dir.path().join("c"))
            .unwrap();
        std::os::unix::fs::symlink(dir.path().join("nowhere"), dir.path().join("d")).unwrap();
        let files = scan(dir.path()).await.unwrap();
        assert_eq!(files.keys().collect::<Vec<_>>(), vec!["b", "c"]);
        assert_eq!(files["c"].1.as_deref(), Some(&b"endpoints: []\n"[..]));
    }
}
