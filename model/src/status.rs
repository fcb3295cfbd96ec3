//! What kvstoremesh tells agents and the CLI about each peer: [`PeerStatus`], written as JSON
//! to [`peer_status_key`](crate::keys::peer_status_key) in the local store (and served over
//! kvstoremesh's HTTP API).
//!
//! Readers need only `schema` and `peer`; every other field a reader does not find reads as
//! "not connected, nothing cached", so a status is never mistaken for a healthier one.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::keys::Kind;
use crate::name::ClusterName;
use crate::value::{DecodeError, SchemaVersion, StoreValue, ValueError};

/// How far a reader has followed a peer (the agent's API shows it per peer).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// No accepted cluster config yet.
    #[default]
    Waiting,
    /// Config accepted; waiting for the full listing and every sync canary.
    Listing,
    /// The agent uses the peer's state and follows its changes.
    Synced,
    /// The peer's config was refused: nothing of it is used.
    Refused,
}

/// One kind's part of a peer's cache.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KindStatus {
    /// The cache holds the peer's full state of this kind (and its cache canary is written).
    #[serde(default)]
    pub synced: bool,
    /// Cache entries of this kind.
    #[serde(default)]
    pub entries: u64,
}

/// kvstoremesh's view of one peer.
///
/// `synced` stays true while the peer is unreachable: the cache still holds the peer's full
/// state as of `disconnected_since`. Agents decide what to do with a stale peer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerStatus {
    /// Schema version (1).
    pub schema: SchemaVersion<1>,
    /// The peer.
    pub peer: ClusterName,
    /// kvstoremesh currently follows the peer's store.
    #[serde(default)]
    pub connected: bool,
    /// Every kind of the peer's state is in the cache (see the type's note).
    #[serde(default)]
    pub synced: bool,
    /// The peer's cluster config was refused (clashing id, other max-connected-clusters,
    /// wrong name): nothing of it is mirrored; `last_error` says why.
    #[serde(default)]
    pub refused: bool,
    /// The peer's cluster id, once its config was accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_id: Option<u16>,
    /// Per kind (`nodes`, `services`, ...).
    #[serde(default)]
    pub kinds: BTreeMap<String, KindStatus>,
    /// Cache entries of every kind.
    #[serde(default)]
    pub entries: u64,
    /// Entries of the peer refused by validation since kvstoremesh started following it.
    #[serde(default)]
    pub invalid_entries: u64,
    /// Connection attempts that failed since kvstoremesh started following the peer.
    #[serde(default)]
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
    /// While disconnected: how long the peer had not been heard from (no answer to a probe,
    /// no event) when the connection was found lost, in milliseconds. A partition is found
    /// only when a probe times out; readers count their grace from the silence's start, not
    /// from the finding. Measured on kvstoremesh's own clock, so no clock skew enters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub silent_ms: Option<u64>,
    /// The peer file was removed: the cache is drained at this time (RFC 3339) unless the
    /// file comes back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub removal_drains_at: Option<String>,
}

impl StoreValue for PeerStatus {
    const SCHEMA: u32 = 1;
    const WHAT: &'static str = "kvstoremesh status";

    fn validate(&self) -> Result<(), ValueError> {
        Ok(())
    }
}

/// A status that cannot be used as the status of the peer its key names.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    /// The value does not decode.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// The value is about another peer than its key.
    #[error("kvstoremesh status of {found} under the key of {peer}")]
    OtherPeer {
        /// The peer the key names.
        peer: ClusterName,
        /// The peer the value names.
        found: ClusterName,
    },
}

impl PeerStatus {
    /// A peer that was just configured: nothing cached, not connected since `since`
    /// (RFC 3339).
    pub fn new(peer: ClusterName, since: String) -> Self {
        PeerStatus {
            schema: SchemaVersion,
            peer,
            connected: false,
            synced: false,
            refused: false,
            cluster_id: None,
            kinds: Kind::ALL
                .iter()
                .map(|k| (k.name().to_owned(), KindStatus::default()))
                .collect(),
            entries: 0,
            invalid_entries: 0,
            failures: 0,
            last_error: None,
            last_error_time: None,
            last_sync_time: None,
            connected_since: None,
            disconnected_since: Some(since),
            silent_ms: None,
            removal_drains_at: None,
        }
    }

    /// Decodes the value read at `peer`'s status key, refusing one about another peer.
    pub fn decode_for(peer: &ClusterName, bytes: &[u8]) -> Result<PeerStatus, StatusError> {
        let status = PeerStatus::decode(bytes)?;
        if &status.peer != peer {
            return Err(StatusError::OtherPeer {
                peer: peer.clone(),
                found: status.peer,
            });
        }
        Ok(status)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b() -> ClusterName {
        ClusterName::new("b").unwrap()
    }

    #[test]
    fn round_trips_in_the_published_spelling() {
        let mut status = PeerStatus::new(b(), "2026-01-01T00:00:00Z".into());
        status.last_error = Some("boom".into());
        let decoded = PeerStatus::decode_for(&b(), &status.encode()).unwrap();
        assert_eq!(decoded, status);
        assert_eq!(decoded.kinds.len(), 5);
        let text = String::from_utf8(status.encode()).unwrap();
        assert_eq!(
            text,
            "{\"schema\":1,\"peer\":\"b\",\"connected\":false,\"synced\":false,\
             \"refused\":false,\"kinds\":{\"identities\":{\"synced\":false,\"entries\":0},\
             \"ip\":{\"synced\":false,\"entries\":0},\"nodes\":{\"synced\":false,\"entries\":0},\
             \"serviceexports\":{\"synced\":false,\"entries\":0},\
             \"services\":{\"synced\":false,\"entries\":0}},\"entries\":0,\
             \"invalid_entries\":0,\"failures\":0,\"last_error\":\"boom\",\
             \"disconnected_since\":\"2026-01-01T00:00:00Z\"}"
        );
    }

    #[test]
    fn a_partial_status_reads_as_the_least_it_says() {
        let status =
            PeerStatus::decode_for(&b(), br#"{"schema":1,"peer":"b","connected":true}"#).unwrap();
        assert!(status.connected);
        assert!(!status.synced && status.kinds.is_empty() && status.last_error.is_none());
    }

    #[test]
    fn refusals() {
        let cases: &[(&[u8], &str)] = &[
            (b"", "not valid JSON"),
            (b"[1]", "not a JSON object"),
            (br#"{"peer":"b","connected":true}"#, "no \"schema\""),
            (br#"{"schema":2,"peer":"b"}"#, "schema version 2"),
            (br#"{"schema":1,"connected":true}"#, "missing field `peer`"),
            (br#"{"schema":1,"peer":"B"}"#, "does not match schema"),
            (
                br#"{"schema":1,"peer":"b","connected":"yes"}"#,
                "does not match",
            ),
            (
                br#"{"schema":1,"peer":"c"}"#,
                "kvstoremesh status of c under the key of b",
            ),
        ];
        for (bytes, expected) in cases {
            let err = PeerStatus::decode_for(&b(), bytes).unwrap_err().to_string();
            assert!(
                err.contains(expected),
                "{}: {err}",
                String::from_utf8_lossy(bytes)
            );
        }
    }
}
