//! A cluster's configuration as published to its peers, and the checks between peers.

use serde::{Deserialize, Serialize};

use crate::cluster::{ClusterId, MaxConnectedClusters};
use crate::identity::{IdentityError, IdentityRange};
use crate::keys;
use crate::name::ClusterName;
use crate::value::{SchemaVersion, StoreValue, ValueError};

/// What a cluster's store offers; readers adapt to it instead of assuming.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Capabilities {
    /// The publisher writes sync canaries, so readers can wait for a complete initial state.
    pub sync_canaries: bool,
    /// The store holds kvstoremesh's cache of its peers (`cilium/cache/...`).
    pub cached: bool,
    /// The publisher writes service exports (`cilium/state/serviceexports/v1/...`).
    pub service_exports: bool,
}

/// `cilium/cluster-config/<name>`: who the cluster is and how its identities are laid out.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ClusterConfig {
    /// Schema version (1).
    pub schema: SchemaVersion<1>,
    /// The cluster's name.
    pub name: ClusterName,
    /// The cluster's id; at most `max_connected_clusters`.
    pub id: ClusterId,
    /// The mesh-wide limit; every cluster of a mesh must agree on it.
    pub max_connected_clusters: MaxConnectedClusters,
    /// What the cluster's store offers.
    pub capabilities: Capabilities,
}

impl ClusterConfig {
    /// A configuration; refuses an id above `max`.
    pub fn new(
        name: ClusterName,
        id: ClusterId,
        max_connected_clusters: MaxConnectedClusters,
        capabilities: Capabilities,
    ) -> Result<Self, ValueError> {
        let config = ClusterConfig {
            schema: SchemaVersion,
            name,
            id,
            max_connected_clusters,
            capabilities,
        };
        config.validate()?;
        Ok(config)
    }

    /// The store key: `cilium/cluster-config/<name>`.
    pub fn key(&self) -> String {
        keys::cluster_config_key(&self.name)
    }

    /// The identities this cluster allocates.
    pub fn identity_range(&self) -> Result<IdentityRange, IdentityError> {
        IdentityRange::for_cluster(self.id, self.max_connected_clusters)
    }

    /// Whether `peer` can join a mesh with this cluster: a distinct name and id and the same
    /// identity layout; otherwise their identities (or keys) would collide.
    pub fn check_peer(&self, peer: &ClusterConfig) -> Result<(), PeerError> {
        peer.validate().map_err(|error| PeerError::Invalid {
            peer: peer.name.clone(),
            error,
        })?;
        if peer.name == self.name {
            return Err(PeerError::SameName {
                name: peer.name.clone(),
            });
        }
        if peer.id == self.id {
            return Err(PeerError::SameId {
                peer: peer.name.clone(),
                local: self.name.clone(),
                id: peer.id,
            });
        }
        if peer.max_connected_clusters != self.max_connected_clusters {
            return Err(PeerError::MaxMismatch {
                peer: peer.name.clone(),
                peer_max: peer.max_connected_clusters,
                local_max: self.max_connected_clusters,
            });
        }
        Ok(())
    }
}

impl StoreValue for ClusterConfig {
    const SCHEMA: u32 = 1;
    const WHAT: &'static str = "cluster config";

    fn validate(&self) -> Result<(), ValueError> {
        if !self.id.fits(self.max_connected_clusters) {
            return Err(ValueError::ClusterIdExceedsMax {
                id: self.id,
                max: self.max_connected_clusters,
            });
        }
        Ok(())
    }
}

/// A peer that cannot join the mesh with this cluster; nothing of it may be applied.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PeerError {
    /// The peer's own configuration is inconsistent.
    #[error("peer {peer}'s configuration is invalid: {error}")]
    Invalid {
        /// The peer.
        peer: ClusterName,
        /// What is wrong with it.
        error: ValueError,
    },
    /// The peer claims this cluster's name.
    #[error("peer {name} has this cluster's own name")]
    SameName {
        /// The shared name.
        name: ClusterName,
    },
    /// The peer uses this cluster's id, so their identities would collide.
    #[error("peer {peer} uses cluster id {id}, which is already {local}'s own")]
    SameId {
        /// The peer.
        peer: ClusterName,
        /// This cluster.
        local: ClusterName,
        /// The shared id.
        id: ClusterId,
    },
    /// The peer splits identity bits differently, so identity ranges would overlap.
    #[error(
        "peer {peer} has max-connected-clusters {peer_max} but this cluster has {local_max}; \
         every cluster of a mesh must use the same value"
    )]
    MaxMismatch {
        /// The peer.
        peer: ClusterName,
        /// The peer's limit.
        peer_max: MaxConnectedClusters,
        /// This cluster's limit.
        local_max: MaxConnectedClusters,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(name: &str, id: u16, max: MaxConnectedClusters) -> ClusterConfig {
        ClusterConfig {
            schema: SchemaVersion,
            name: ClusterName::new(name).unwrap(),
            id: ClusterId::try_from(id).unwrap(),
            max_connected_clusters: max,
            capabilities: Capabilities::default(),
        }
    }

    #[test]
    fn peers() {
        use MaxConnectedClusters::*;
        let local = config("a", 1, Max255);
        local.check_peer(&config("b", 2, Max255)).unwrap();
        let cases = [
            (config("a", 2, Max255), "has this cluster's own name"),
            (
                config("b", 1, Max255),
                "uses cluster id 1, which is already a's own",
            ),
            (
                config("b", 2, Max511),
                "max-connected-clusters 511 but this cluster has 255",
            ),
            (
                config("b", 300, Max255),
                "exceeds max-connected-clusters 255",
            ),
        ];
        for (peer, message) in cases {
            let err = local.check_peer(&peer).unwrap_err();
            assert!(err.to_string().contains(message), "{err}");
        }
        assert!(
            ClusterConfig::new(
                ClusterName::new("a").unwrap(),
                ClusterId::try_from(256).unwrap(),
                Max255,
                Capabilities::default()
            )
            .is_err()
        );
        assert_eq!(local.key(), "cilium/cluster-config/a");
        assert_eq!(local.identity_range().unwrap().first().get(), 65536 + 256);
    }
}
