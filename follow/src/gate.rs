//! Accepting a peer's cluster config: the one gate before anything of a peer is used. The
//! config must be the peer's own (its key, name and encoding), fit a mesh with this cluster
//! (another name and id, the same `max-connected-clusters`), and claim an id no other peer
//! followed here holds.

use std::sync::Arc;

use model::keys::cluster_config_key;
use model::{
    ClusterConfig, ClusterId, ClusterName, EntryError, PeerError, validate_cluster_config,
};

use crate::claims::Claims;

/// Why a peer's config is refused; nothing of the peer may be used while it is.
#[derive(Debug, thiserror::Error)]
pub enum ConfigRefusal {
    /// The value is not a valid cluster config for the peer (another name, undecodable).
    #[error("peer {peer}'s cluster config is refused")]
    Invalid {
        /// The peer.
        peer: ClusterName,
        /// Why (boxed: entry errors are large, refusals rare).
        #[source]
        source: Box<EntryError>,
    },
    /// The peer cannot join a mesh with this cluster (this cluster's name or id, another
    /// max-connected-clusters).
    #[error("peer refused")]
    Refused(#[source] PeerError),
    /// Another peer followed here already uses the peer's cluster id.
    #[error("peer {peer} uses cluster id {id}, which peer {other} already uses; refused")]
    IdClash {
        /// The refused peer.
        peer: ClusterName,
        /// The id both use.
        id: ClusterId,
        /// The peer that holds the id.
        other: ClusterName,
    },
}

/// What an accepted offer changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The same bytes as the config already accepted.
    Unchanged,
    /// A new config is accepted.
    Accepted {
        /// The id or `max-connected-clusters` differ from the config accepted before, so
        /// every entry checked against that one must be checked again.
        layout_changed: bool,
    },
}

/// One peer's accepted config.
#[derive(Debug)]
pub struct ConfigGate {
    peer: ClusterName,
    local: ClusterConfig,
    claims: Option<Arc<Claims>>,
    accepted: Option<(ClusterConfig, Vec<u8>)>,
}

impl ConfigGate {
    /// A gate for `peer`'s config, checked against the `local` cluster's; with `claims`,
    /// also unique among the peers sharing them.
    pub fn new(peer: ClusterName, local: ClusterConfig, claims: Option<Arc<Claims>>) -> Self {
        ConfigGate {
            peer,
            local,
            claims,
            accepted: None,
        }
    }

    /// The same gate, claiming ids in `claims` from now on.
    pub fn with_claims(self, claims: Arc<Claims>) -> Self {
        ConfigGate {
            claims: Some(claims),
            ..self
        }
    }

    /// The peer.
    pub fn peer(&self) -> &ClusterName {
        &self.peer
    }

    /// The accepted config, if any.
    pub fn accepted(&self) -> Option<&ClusterConfig> {
        self.accepted.as_ref().map(|(config, _)| config)
    }

    /// The accepted config's bytes as the peer wrote them.
    pub fn accepted_bytes(&self) -> Option<&[u8]> {
        self.accepted.as_ref().map(|(_, bytes)| bytes.as_slice())
    }

    /// Offers the value of the peer's cluster-config key. A refusal forgets the accepted
    /// config and gives the peer's id claim up.
    pub fn offer(&mut self, bytes: &[u8]) -> Result<Verdict, ConfigRefusal> {
        if self.accepted_bytes() == Some(bytes) {
            return Ok(Verdict::Unchanged);
        }
        match self.check(bytes) {
            Ok(config) => {
                let layout_changed = self.accepted().is_some_and(|was| {
                    was.id != config.id
                        || was.max_connected_clusters != config.max_connected_clusters
                });
                self.accepted = Some((config, bytes.to_vec()));
                Ok(Verdict::Accepted { layout_changed })
            }
            Err(refusal) => {
                self.forget();
                Err(refusal)
            }
        }
    }

    /// Forgets the accepted config and gives the id claim up (the peer is refused, removed
    /// or drained).
    pub fn forget(&mut self) {
        self.accepted = None;
        if let Some(claims) = &self.claims {
            claims.release(&self.peer);
        }
    }

    fn check(&self, bytes: &[u8]) -> Result<ClusterConfig, ConfigRefusal> {
        let key = cluster_config_key(&self.peer);
        let config = validate_cluster_config(&key, bytes, &self.peer).map_err(|source| {
            ConfigRefusal::Invalid {
                peer: self.peer.clone(),
                source: Box::new(source),
            }
        })?;
        self.local
            .check_peer(&config)
            .map_err(ConfigRefusal::Refused)?;
        if let Some(claims) = &self.claims {
            claims
                .claim(&self.peer, config.id)
                .map_err(|other| ConfigRefusal::IdClash {
                    peer: self.peer.clone(),
                    id: config.id,
                    other,
                })?;
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use model::{Capabilities, MaxConnectedClusters, StoreValue, error_chain};

    use super::*;

    fn name(n: &str) -> ClusterName {
        ClusterName::new(n).unwrap()
    }

    fn config(n: &str, id: u16, max: MaxConnectedClusters) -> ClusterConfig {
        ClusterConfig::new(
            name(n),
            ClusterId::try_from(id).unwrap(),
            max,
            Capabilities::default(),
        )
        .unwrap()
    }

    fn bytes(n: &str, id: u16) -> Vec<u8> {
        config(n, id, MaxConnectedClusters::Max255).encode()
    }

    #[test]
    fn accepts_changes_and_refuses() {
        let local = config("a", 1, MaxConnectedClusters::Max255);
        let mut gate = ConfigGate::new(name("b"), local, None);
        assert_eq!(
            gate.offer(&bytes("b", 2)).unwrap(),
            Verdict::Accepted {
                layout_changed: false
            }
        );
        assert_eq!(gate.offer(&bytes("b", 2)).unwrap(), Verdict::Unchanged);
        assert_eq!(
            gate.offer(&bytes("b", 3)).unwrap(),
            Verdict::Accepted {
                layout_changed: true
            }
        );
        let refusals = [
            (bytes("c", 3), "peer b's cluster config is refused: "),
            (bytes("b", 1), "peer refused: "),
            (
                config("b", 3, MaxConnectedClusters::Max511).encode(),
                "peer refused: ",
            ),
            (b"{".to_vec(), "peer b's cluster config is refused: "),
        ];
        for (value, expected) in refusals {
            let error = error_chain(&gate.offer(&value).unwrap_err());
            assert!(error.starts_with(expected), "{error}");
            assert!(gate.accepted().is_none(), "a refusal forgets the config");
        }
        // After a refusal the old config is new again.
        assert_eq!(
            gate.offer(&bytes("b", 3)).unwrap(),
            Verdict::Accepted {
                layout_changed: false
            }
        );
    }

    #[test]
    fn ids_are_claimed_and_given_up() {
        let local = config("a", 1, MaxConnectedClusters::Max255);
        let claims = Arc::new(Claims::default());
        let mut b = ConfigGate::new(name("b"), local.clone(), Some(claims.clone()));
        let mut c = ConfigGate::new(name("c"), local, Some(claims));
        b.offer(&bytes("b", 2)).unwrap();
        let error = c.offer(&bytes("c", 2)).unwrap_err();
        assert_eq!(
            error.to_string(),
            "peer c uses cluster id 2, which peer b already uses; refused"
        );
        b.forget();
        c.offer(&bytes("c", 2)).unwrap();
        // b's refusal (wrong name) does not take c's claim away.
        assert!(b.offer(&bytes("x", 2)).is_err());
        assert!(matches!(
            b.offer(&bytes("b", 2)),
            Err(ConfigRefusal::IdClash { .. })
        ));
    }
}
