//! What kvstoremesh tells agents and the CLI about each peer, in the local store and over
//! HTTP, and the keys it writes besides the cache entries. The keys and the status record are
//! [`model`]'s, which agents read with.
//!
//! | key | value |
//! |---|---|
//! | `cilium/synced/<peer>/kvstoremesh/status` ([`peer_status_key`](model::keys::peer_status_key)) | [`PeerStatus`] as JSON |
//! | `cilium/cache/heartbeat/<peer>` ([`heartbeat_cache_key`](model::keys::heartbeat_cache_key)) | the peer's `cilium/.heartbeat`, unchanged |
//! | `cilium/cluster-config/<peer>` | the peer's cluster config, unchanged |
//!
//! All of them live under the local users' read rules (`cilium/synced/`, `cilium/cache/`,
//! `cilium/cluster-config/`) and are attached to kvstoremesh's lease.

use std::time::SystemTime;

use model::{ClusterName, PeerStatus};

/// The time as RFC 3339 text (UTC, seconds).
pub(crate) fn rfc3339(time: SystemTime) -> String {
    humantime::format_rfc3339_seconds(time).to_string()
}

/// The status of a peer that was just configured: not connected since now.
pub(crate) fn configured(peer: &ClusterName) -> PeerStatus {
    PeerStatus::new(peer.clone(), rfc3339(SystemTime::now()))
}
