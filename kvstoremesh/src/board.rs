//! The in-memory picture of every configured peer, for readiness and the HTTP status.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use model::ClusterName;
use serde::Serialize;
use tokio::sync::watch;

use crate::local::Lease;
use model::PeerStatus;

use crate::status;

/// What kvstoremesh knows about itself and each peer.
#[derive(Debug, Clone, Serialize)]
pub struct MeshStatus {
    /// Every configured peer is synced, or has had its first-sync timeout pass; and the local
    /// store granted a lease.
    pub ready: bool,
    /// The local store holds kvstoremesh's lease now.
    pub local_lease: bool,
    /// Peers readiness still waits for.
    pub waiting_for: Vec<String>,
    /// Each configured peer's status.
    pub peers: BTreeMap<String, PeerStatus>,
}

#[derive(Debug)]
struct Entry {
    status: PeerStatus,
    configured_at: Instant,
    synced_once: bool,
}

/// Shared between the peer tasks (which report) and the HTTP server (which asks).
#[derive(Debug)]
pub(crate) struct Board {
    peers: Mutex<BTreeMap<ClusterName, Entry>>,
    first_sync_timeout: Duration,
    lease: watch::Receiver<Option<Lease>>,
}

impl Board {
    pub(crate) fn new(first_sync_timeout: Duration, lease: watch::Receiver<Option<Lease>>) -> Self {
        Board {
            peers: Mutex::default(),
            first_sync_timeout,
            lease,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<ClusterName, Entry>> {
        self.peers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A peer was configured: its first-sync timeout starts now (unless it was already).
    pub(crate) fn configure(&self, peer: &ClusterName) {
        self.lock().entry(peer.clone()).or_insert_with(|| Entry {
            status: status::configured(peer),
            configured_at: Instant::now(),
            synced_once: false,
        });
    }

    /// The peer's latest status.
    pub(crate) fn report(&self, peer: &ClusterName, status: &PeerStatus) {
        if let Some(entry) = self.lock().get_mut(peer) {
            entry.synced_once |= status.synced;
            entry.status = status.clone();
        }
    }

    /// The peer's latest status, if it is configured.
    pub(crate) fn status_of(&self, peer: &ClusterName) -> Option<PeerStatus> {
        self.lock().get(peer).map(|e| e.status.clone())
    }

    /// The peer is no longer configured; readiness stops waiting for it.
    pub(crate) fn remove(&self, peer: &ClusterName) {
        self.lock().remove(peer);
    }

    pub(crate) fn snapshot(&self) -> MeshStatus {
        let local_lease = self.lease.borrow().is_some();
        let peers = self.lock();
        let waiting_for: Vec<String> = peers
            .iter()
            .filter(|(_, e)| !e.synced_once && e.configured_at.elapsed() < self.first_sync_timeout)
            .map(|(name, _)| name.to_string())
            .collect();
        MeshStatus {
            ready: local_lease && waiting_for.is_empty(),
            local_lease,
            waiting_for,
            peers: peers
                .iter()
                .map(|(name, e)| (name.to_string(), e.status.clone()))
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvstore::client::LeaseId;

    #[test]
    fn ready_when_every_peer_synced_or_timed_out() {
        let (lease_tx, lease_rx) = watch::channel(None);
        let board = Board::new(Duration::from_millis(50), lease_rx);
        assert!(!board.snapshot().ready, "no lease yet");
        lease_tx.send_replace(Some(Lease {
            id: LeaseId(1),
            generation: 1,
        }));
        assert!(board.snapshot().ready, "no peers");
        let b = ClusterName::new("b").unwrap();
        let c = ClusterName::new("c").unwrap();
        board.configure(&b);
        board.configure(&c);
        let snap = board.snapshot();
        assert!(!snap.ready);
        assert_eq!(snap.waiting_for, vec!["b", "c"]);
        let mut synced = status::configured(&b);
        synced.synced = true;
        board.report(&b, &synced);
        // A peer that synced once does not make readiness flap when it disconnects.
        board.report(&b, &status::configured(&b));
        assert_eq!(board.snapshot().waiting_for, vec!["c"]);
        std::thread::sleep(Duration::from_millis(60));
        assert!(board.snapshot().ready, "c's first-sync timeout passed");
        board.remove(&c);
        assert_eq!(board.snapshot().peers.len(), 1);
    }
}
