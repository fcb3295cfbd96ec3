//! Replication: several members holding the same store, kept equal by raft (raft-rs).
//!
//! Every write becomes a raft log entry; each member applies committed entries in log order
//! through the same [`super::applier`] a single member uses, so revisions, leases and events
//! are identical everywhere. [`node`] owns the raft state machine, [`log`] makes raft's log
//! durable, [`transport`] carries raft messages between members over our own gRPC service
//! (`proto/peer.proto`).
//!
//! Members are named and addressed as etcd's: `--name`, `--initial-cluster name=url,...`,
//! `--initial-advertise-peer-urls`, `--listen-peer-urls`, `--initial-cluster-token`.

pub mod corrupt;
pub mod log;
pub mod node;
pub mod transport;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

use thiserror::Error;

pub use self::node::{NodeStatus, RaftHandle};

use super::tls::TlsFiles;

/// etcd 3.4's default `--snapshot-count`: applied entries between two compactions of raft's
/// log.
pub const DEFAULT_SNAPSHOT_COUNT: u64 = 100_000;

/// etcd's default `--initial-cluster-token`.
pub const DEFAULT_CLUSTER_TOKEN: &str = "etcd-cluster";

/// Whether this member founds a new cluster or joins a running one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InitialState {
    New,
    Existing,
}

/// One member as `--initial-cluster` names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberSpec {
    pub id: u64,
    pub name: String,
    pub peer_urls: Vec<String>,
}

/// What this member needs to take part in a cluster, validated.
#[derive(Clone, Debug)]
pub struct ClusterConfig {
    /// This member's id (derived from its peer URLs and the token, as every member derives it).
    pub id: u64,
    pub cluster_id: u64,
    /// Every member, ordered by id.
    pub members: Vec<MemberSpec>,
    pub initial_state: InitialState,
    /// Where this member accepts other members' connections.
    pub listen_peer: SocketAddr,
    /// Mutual TLS between members (`--peer-cert/--peer-key/--peer-cacert`).
    pub peer_tls: Option<TlsFiles>,
    /// Entries applied beyond the log's start before it is compacted (`--snapshot-count`).
    pub snapshot_count: u64,
    /// How often the leader compares members' history hashes (`--corrupt-check-time`);
    /// zero turns the check off.
    pub corrupt_check: std::time::Duration,
}

/// A cluster description that cannot work.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ClusterConfigError {
    /// An `--initial-cluster` item is not `name=url`.
    #[error("--initial-cluster: {item:?} is not name=url")]
    Item { item: String },
    /// A peer URL that is not `http(s)://host:port`.
    #[error("peer URL {url:?}: {reason}")]
    Url { url: String, reason: String },
    /// This member's `--name` is not in `--initial-cluster`.
    #[error("--initial-cluster has no member named {name:?} (this member's --name)")]
    NotListed { name: String },
    /// This member's advertised peer URLs differ from what `--initial-cluster` says of it.
    #[error(
        "--initial-cluster lists {listed:?} for {name:?} but --initial-advertise-peer-urls says {advertised:?}"
    )]
    Advertised {
        name: String,
        listed: Vec<String>,
        advertised: Vec<String>,
    },
    /// Two members share a peer URL.
    #[error("--initial-cluster: peer URL {url} is given to both {first:?} and {second:?}")]
    SharedUrl {
        url: String,
        first: String,
        second: String,
    },
    /// Joining a running cluster needs a member added to it first, which is not supported.
    #[error(
        "--initial-cluster-state existing with an empty data directory: joining a running cluster needs MemberAdd, which this store does not support; start every member with --initial-cluster-state new"
    )]
    JoinUnsupported,
    /// Peer URLs say https but no peer certificate was given, or the other way round.
    #[error("peer URLs use {scheme} but {detail}")]
    Scheme {
        scheme: &'static str,
        detail: String,
    },
}

/// A stable 64-bit hash (FNV-1a): member and cluster ids must come out equal on every member
/// and across versions, which `std`'s hasher does not promise.
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for byte in part.iter().chain(&[0u8]) {
            hash ^= u64::from(*byte);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    // Raft reserves 0 for "nobody".
    hash.max(1)
}

/// A member's id: its sorted peer URLs and the cluster token, as etcd derives it (so the same
/// URLs in another cluster give another id).
pub fn member_id(peer_urls: &[String], token: &str) -> u64 {
    let mut urls: Vec<&str> = peer_urls.iter().map(String::as_str).collect();
    urls.sort_unstable();
    let mut parts: Vec<&[u8]> = urls.iter().map(|u| u.as_bytes()).collect();
    parts.push(token.as_bytes());
    fnv1a(&parts)
}

fn check_url(url: &str) -> Result<&'static str, ClusterConfigError> {
    let bad = |reason: &str| ClusterConfigError::Url {
        url: url.to_owned(),
        reason: reason.to_owned(),
    };
    let (scheme, rest) = if let Some(rest) = url.strip_prefix("http://") {
        ("http", rest)
    } else if let Some(rest) = url.strip_prefix("https://") {
        ("https", rest)
    } else {
        return Err(bad("not an http:// or https:// URL"));
    };
    let (host, port) = rest
        .trim_end_matches('/')
        .rsplit_once(':')
        .ok_or_else(|| bad("has no port"))?;
    if host.is_empty() || port.parse::<u16>().is_err() {
        return Err(bad("needs host:port"));
    }
    Ok(scheme)
}

/// Parses `--initial-cluster` (`name=url` items; a name may repeat to give several URLs).
pub fn parse_initial_cluster(
    text: &str,
    token: &str,
) -> Result<Vec<MemberSpec>, ClusterConfigError> {
    let mut by_name: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut owners: BTreeMap<String, String> = BTreeMap::new();
    for item in text.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let (name, url) = item
            .split_once('=')
            .filter(|(n, u)| !n.is_empty() && !u.is_empty())
            .ok_or_else(|| ClusterConfigError::Item {
                item: item.to_owned(),
            })?;
        check_url(url)?;
        let url = url.trim_end_matches('/').to_owned();
        if let Some(first) = owners.insert(url.clone(), name.to_owned())
            && first != name
        {
            return Err(ClusterConfigError::SharedUrl {
                url,
                first,
                second: name.to_owned(),
            });
        }
        by_name.entry(name.to_owned()).or_default().push(url);
    }
    let mut members: Vec<MemberSpec> = by_name
        .into_iter()
        .map(|(name, peer_urls)| MemberSpec {
            id: member_id(&peer_urls, token),
            name,
            peer_urls,
        })
        .collect();
    members.sort_by_key(|m| m.id);
    Ok(members)
}

impl ClusterConfig {
    /// Checks this member's view of the cluster, as etcd does before it touches anything.
    pub fn new(
        name: &str,
        members: Vec<MemberSpec>,
        advertised: &[String],
        token: &str,
        initial_state: InitialState,
        listen_peer: SocketAddr,
        peer_tls: Option<TlsFiles>,
    ) -> Result<Self, ClusterConfigError> {
        let me = members.iter().find(|m| m.name == name).ok_or_else(|| {
            ClusterConfigError::NotListed {
                name: name.to_owned(),
            }
        })?;
        let listed: BTreeSet<&str> = me.peer_urls.iter().map(String::as_str).collect();
        let said: BTreeSet<&str> = advertised.iter().map(|u| u.trim_end_matches('/')).collect();
        if !advertised.is_empty() && listed != said {
            return Err(ClusterConfigError::Advertised {
                name: name.to_owned(),
                listed: me.peer_urls.clone(),
                advertised: advertised.to_vec(),
            });
        }
        let https = members
            .iter()
            .flat_map(|m| &m.peer_urls)
            .any(|u| u.starts_with("https://"));
        match (https, &peer_tls) {
            (true, None) => {
                return Err(ClusterConfigError::Scheme {
                    scheme: "https",
                    detail: "no --peer-cert/--peer-key/--peer-cacert was given".into(),
                });
            }
            (false, Some(_)) => {
                return Err(ClusterConfigError::Scheme {
                    scheme: "http",
                    detail: "--peer-cert was given (use https:// peer URLs)".into(),
                });
            }
            _ => {}
        }
        let ids: Vec<String> = members.iter().map(|m| m.id.to_string()).collect();
        let mut parts: Vec<&[u8]> = ids.iter().map(|i| i.as_bytes()).collect();
        parts.push(token.as_bytes());
        Ok(Self {
            id: me.id,
            cluster_id: fnv1a(&parts),
            members,
            initial_state,
            listen_peer,
            peer_tls,
            snapshot_count: DEFAULT_SNAPSHOT_COUNT,
            corrupt_check: corrupt::DEFAULT_CORRUPT_CHECK,
        })
    }

    /// The member with this id.
    pub fn member(&self, id: u64) -> Option<&MemberSpec> {
        self.members.iter().find(|m| m.id == id)
    }

    /// The other members.
    pub fn peers(&self) -> impl Iterator<Item = &MemberSpec> {
        self.members.iter().filter(|m| m.id != self.id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr() -> SocketAddr {
        "127.0.0.1:2380".parse().unwrap()
    }

    #[test]
    fn every_member_derives_the_same_ids() {
        let text = "a=http://10.0.0.1:2380,b=http://10.0.0.2:2380,c=http://10.0.0.3:2380";
        let members = parse_initial_cluster(text, "t").unwrap();
        let views: Vec<ClusterConfig> = ["a", "b", "c"]
            .iter()
            .map(|n| {
                ClusterConfig::new(
                    n,
                    members.clone(),
                    &[],
                    "t",
                    InitialState::New,
                    addr(),
                    None,
                )
                .unwrap()
            })
            .collect();
        assert!(views.windows(2).all(|w| w[0].cluster_id == w[1].cluster_id));
        let ids: BTreeSet<u64> = views.iter().map(|v| v.id).collect();
        assert_eq!(ids.len(), 3);
        // Another token: another cluster, other member ids.
        let other = parse_initial_cluster(text, "u").unwrap();
        let other = ClusterConfig::new("a", other, &[], "u", InitialState::New, addr(), None);
        assert_ne!(other.unwrap().cluster_id, views[0].cluster_id);
    }

    #[test]
    fn inconsistent_descriptions_are_refused_naming_the_problem() {
        assert!(matches!(
            parse_initial_cluster("a=http://h:1,b", "t"),
            Err(ClusterConfigError::Item { .. })
        ));
        assert!(matches!(
            parse_initial_cluster("a=ftp://h:1", "t"),
            Err(ClusterConfigError::Url { .. })
        ));
        assert!(matches!(
            parse_initial_cluster("a=http://h:1,b=http://h:1", "t"),
            Err(ClusterConfigError::SharedUrl { .. })
        ));
        let members = parse_initial_cluster("a=http://h:1,b=http://h:2", "t").unwrap();
        let new = |name: &str, advertised: &[String]| {
            ClusterConfig::new(
                name,
                members.clone(),
                advertised,
                "t",
                InitialState::New,
                addr(),
                None,
            )
        };
        assert!(matches!(
            new("c", &[]),
            Err(ClusterConfigError::NotListed { .. })
        ));
        assert!(matches!(
            new("a", &["http://h:2".to_owned()]),
            Err(ClusterConfigError::Advertised { .. })
        ));
        assert!(new("a", &["http://h:1/".to_owned()]).is_ok());
        let tls = parse_initial_cluster("a=https://h:1", "t").unwrap();
        assert!(matches!(
            ClusterConfig::new("a", tls, &[], "t", InitialState::New, addr(), None),
            Err(ClusterConfigError::Scheme { .. })
        ));
    }
}
