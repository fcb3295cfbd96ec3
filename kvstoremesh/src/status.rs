//! What kvstoremesh tells agents and the CLI about each peer, in the local store and over
//! HTTP, and the keys it writes besides the cache entries.
//!
//! | key | value |
//! |---|---|
//! | `cilium/synced/<peer>/kvstoremesh/status` | [`PeerStatus`] as JSON |
//! | `cilium/cache/heartbeat/<peer>` | the peer's `cilium/.heartbeat`, unchanged |
//! | `cilium/cluster-config/<peer>` | the peer's cluster config, unchanged |
//!
//! All of them live under the local users' read rules (`cilium/synced/`, `cilium/cache/`,
//! `cilium/cluster-config/`) and are attached to kvstoremesh's lease.

use std::collections::BTreeMap;
use std::time::SystemTime;

use model::ClusterName;
use model::keys::{CACHE_ROOT, SYNCED_ROOT};
use serde::{Deserialize, Serialize};

/// Where kvstoremesh writes its status of `peer` in the local store:
/// `cilium/synced/<peer>/kvstoremesh/status`.
pub fn status_key(peer: &ClusterName) -> String {
    format!("{SYNCED_ROOT}{peer}/kvstoremesh/status")
}

/// Where kvstoremesh mirrors `peer`'s `cilium/.heartbeat`: `cilium/cache/heartbeat/<peer>`.
pub fn heartbeat_cache_key(peer: &ClusterName) -> String {
    format!("{CACHE_ROOT}heartbeat/{peer}")
}

/// The prefix of `peer`'s sync canaries in its own store:
/// `cilium/synced/<peer>/cilium/state/`.
pub(crate) fn state_canary_prefix(peer: &ClusterName) -> String {
    format!("{SYNCED_ROOT}{peer}/{}", model::keys::STATE_ROOT)
}

/// The prefix of kvstoremesh's cache canaries for `peer` in the local store:
/// `cilium/synced/<peer>/cilium/cache/`.
pub(crate) fn cache_canary_prefix(peer: &ClusterName) -> String {
    format!("{SYNCED_ROOT}{peer}/{CACHE_ROOT}")
}

/// The time as RFC 3339 text (UTC, seconds).
pub(crate) fn rfc3339(time: SystemTime) -> String {
    humantime::format_rfc3339_seconds(time).to_string()
}

/// One kind's part of a peer's cache.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KindStatus {
    /// The cache holds the peer's full state of this kind (and its cache canary is written).
    pub synced: bool,
    /// Cache entries of this kind.
    pub entries: u64,
}

/// kvstoremesh's view of one peer, written as JSON to [`status_key`].
///
/// `synced` stays true while the peer is unreachable: the cache still holds the peer's full
/// state as of `disconnected_since`. Agents decide what to do with a stale peer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerStatus {
    /// Schema version (1).
    pub schema: u32,
    /// The peer.
    pub peer: String,
    /// kvstoremesh currently follows the peer's store.
    pub connected: bool,
    /// Every kind of the peer's state is in the cache (see the type's note).
    pub synced: bool,
    /// The peer's cluster config was refused (clashing id, other max-connected-clusters,
    /// wrong name): nothing of it is mirrored; `last_error` says why.
    pub refused: bool,
    /// The peer's cluster id, once its config was accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_id: Option<u16>,
    /// Per kind (`nodes`, `services`, ...).
    pub kinds: BTreeMap<String, KindStatus>,
    /// Cache entries of every kind.
    pub entries: u64,
    /// Entries of the peer refused by validation since kvstoremesh started following it.
    pub invalid_entries: u64,
    /// Connection attempts that failed since kvstoremesh started following the peer.
    pub failures: u64,
    /// The last error (connecting, reading the peer, writing the cache, refusal).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// When `last_error` happened (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error_time: Option<String>,
    /// When the cache last became complete after a full listing (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_sync_time: Option<String>,
    /// Since when the peer is followed (RFC 3339), while connected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connected_since: Option<String>,
    /// Since when the peer is not followed (RFC 3339), while disconnected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disconnected_since: Option<String>,
    /// The peer file was removed: the cache is drained at this time (RFC 3339) unless the
    /// file comes back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub removal_drains_at: Option<String>,
}

impl PeerStatus {
    /// A peer that was just configured: not connected since now.
    pub(crate) fn new(peer: &ClusterName) -> Self {
        PeerStatus {
            schema: 1,
            peer: peer.to_string(),
            disconnected_since: Some(rfc3339(SystemTime::now())),
            kinds: model::Kind::ALL
                .iter()
                .map(|k| (k.name().to_owned(), KindStatus::default()))
                .collect(),
            ..PeerStatus::default()
        }
    }

    /// The JSON written to the store.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys() {
        let peer = ClusterName::new("eu-2").unwrap();
        assert_eq!(status_key(&peer), "cilium/synced/eu-2/kvstoremesh/status");
        assert_eq!(heartbeat_cache_key(&peer), "cilium/cache/heartbeat/eu-2");
        assert_eq!(
            state_canary_prefix(&peer),
            "cilium/synced/eu-2/cilium/state/"
        );
        assert_eq!(
            cache_canary_prefix(&peer),
            "cilium/synced/eu-2/cilium/cache/"
        );
        // The status never looks like a canary of a kind, and no cache entry prefix holds
        // the heartbeat mirror.
        for kind in model::Kind::ALL {
            assert!(!status_key(&peer).starts_with(&kind.cache_canary_key(&peer)));
            assert!(!heartbeat_cache_key(&peer).starts_with(&kind.cache_prefix(&peer)));
        }
    }

    #[test]
    fn status_round_trips() {
        let mut status = PeerStatus::new(&ClusterName::new("b").unwrap());
        status.last_error = Some("boom".into());
        let decoded: PeerStatus = serde_json::from_slice(&status.encode()).unwrap();
        assert_eq!(decoded, status);
        assert_eq!(decoded.kinds.len(), 5);
        let text = String::from_utf8(status.encode()).unwrap();
        assert!(text.starts_with("{\"schema\":1,\"peer\":\"b\""), "{text}");
        assert!(!text.contains("last_sync_time"), "{text}");
    }
}
