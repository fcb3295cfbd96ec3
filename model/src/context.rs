//! Cluster contexts: how the `clustermesh` CLI finds one cluster's daemons and reaches them,
//! the way a kubeconfig context tells `kubectl` where a cluster is. A context is a YAML file
//! named after its cluster; a directory of them is one mesh (what `clustermesh dev up`
//! writes, or what a user writes for daemons started by hand):
//!
//! ```yaml
//! name: eu-1
//! id: 1
//! max-connected-clusters: 255        # optional, 255 by default
//! store:                             # how the CLI, as the store's admin, reaches it
//!   endpoints: [https://127.0.0.1:2379]
//!   trusted-ca-file: certs/ca.crt
//!   cert-file: certs/admin.crt
//!   key-file: certs/admin.key
//! peer-endpoints: [https://10.254.1.1:2379]  # optional: how peers reach the store
//! apiserver: http://127.0.0.1:9880   # the apiserver's health server (/readyz, /metrics)
//! kvstoremesh: http://127.0.0.1:9881 # optional: absent when agents follow peers directly
//! peers-dir: peers                   # where `connect` writes this cluster's peer files
//! certs-dir: certs                   # where `enable` keeps this cluster's certificates
//! agents:                            # optional: one per node, for "N/N nodes connected"
//! - node: eu-1-node-1
//!   api: http://10.254.1.2:9890
//! ```
//!
//! Relative paths are relative to the context's directory ([`ClusterContext::resolve`]).
//! Only the format lives here; finding the directory and reaching the URLs is the CLI's.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::cluster::{ClusterId, MaxConnectedClusters};
use crate::name::{ClusterName, DnsSubdomain};
use crate::peerfile::{PeerFile, PeerFileError, PeerFileOut, RawPeerFile};

/// Content that is not a usable cluster context; messages name the YAML key.
#[derive(Debug, thiserror::Error)]
pub enum ContextError {
    /// Not YAML of the expected shape (a missing `name`, `id`, … is reported here too).
    #[error("not a valid cluster context: {source}")]
    Yaml {
        /// The parser's complaint, with its position.
        source: serde_yaml_ng::Error,
    },
    /// The `store:` section is not a usable etcd client config.
    #[error("store: {source}")]
    Store {
        /// What is wrong with it.
        source: PeerFileError,
    },
    /// A daemon address that is not an `http://` or `https://` URL.
    #[error("{key}: {value:?} is not an http:// or https:// URL")]
    BadUrl {
        /// The key it was found under.
        key: String,
        /// The value found.
        value: String,
    },
    /// An id the cluster's own `max-connected-clusters` has no room for.
    #[error("id: {id} is above max-connected-clusters ({max})")]
    IdOutOfRange {
        /// The id.
        id: ClusterId,
        /// The setting.
        max: MaxConnectedClusters,
    },
    /// Two agents for one node.
    #[error("agents: node {0} is listed twice")]
    DuplicateNode(DnsSubdomain),
}

/// One node's agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentContext {
    /// The node the agent runs on.
    pub node: DnsSubdomain,
    /// The agent's API base URL.
    pub api: String,
}

/// One cluster's context.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterContext {
    /// The cluster's name; the file is `<name>.yaml`.
    pub name: ClusterName,
    /// The cluster's id, unique in the mesh.
    pub id: ClusterId,
    /// How many clusters this cluster's identities leave room for.
    pub max_connected_clusters: MaxConnectedClusters,
    /// How the CLI reaches the cluster's store, with an identity allowed to read everything.
    pub store: PeerFile,
    /// How peers reach the store; the CLI's endpoints when not set.
    pub peer_endpoints: Vec<String>,
    /// The apiserver's health server.
    pub apiserver: String,
    /// kvstoremesh's health server, when the cluster runs one.
    pub kvstoremesh: Option<String>,
    /// Where `connect` writes the peer files this cluster reads.
    pub peers_dir: PathBuf,
    /// Where `enable` keeps this cluster's CA and certificates.
    pub certs_dir: PathBuf,
    /// The cluster's agents, sorted by node.
    pub agents: Vec<AgentContext>,
    /// Keys this build does not know, ignored; sorted.
    pub unknown_keys: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct RawContext {
    name: ClusterName,
    id: ClusterId,
    max_connected_clusters: Option<MaxConnectedClusters>,
    store: RawPeerFile,
    #[serde(default)]
    peer_endpoints: Vec<String>,
    apiserver: String,
    kvstoremesh: Option<String>,
    peers_dir: PathBuf,
    certs_dir: PathBuf,
    #[serde(default)]
    agents: Vec<AgentContext>,
    #[serde(flatten)]
    other: BTreeMap<String, serde_yaml_ng::Value>,
}

#[derive(Serialize)]
#[serde(rename_all = "kebab-case")]
struct ContextOut<'a> {
    name: &'a ClusterName,
    id: ClusterId,
    max_connected_clusters: MaxConnectedClusters,
    store: PeerFileOut<'a>,
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    peer_endpoints: &'a [String],
    apiserver: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    kvstoremesh: Option<&'a str>,
    peers_dir: Cow<'a, str>,
    certs_dir: Cow<'a, str>,
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    agents: &'a [AgentContext],
}

fn check_url(key: &str, value: &str) -> Result<(), ContextError> {
    let rest = value
        .strip_prefix("http://")
        .or_else(|| value.strip_prefix("https://"));
    match rest {
        Some(host) if !host.is_empty() && !host.contains(char::is_whitespace) => Ok(()),
        _ => Err(ContextError::BadUrl {
            key: key.to_owned(),
            value: value.to_owned(),
        }),
    }
}

impl ClusterContext {
    /// Parses a context, refusing one the CLI could not use: a missing key, an unusable
    /// `store:`, a daemon address that is not a URL, a node listed twice.
    pub fn parse(bytes: &[u8]) -> Result<ClusterContext, ContextError> {
        let raw: RawContext =
            serde_yaml_ng::from_slice(bytes).map_err(|source| ContextError::Yaml { source })?;
        let store =
            PeerFile::from_raw(raw.store).map_err(|source| ContextError::Store { source })?;
        let max = raw.max_connected_clusters.unwrap_or_default();
        if raw.id.get() > max.value() {
            return Err(ContextError::IdOutOfRange { id: raw.id, max });
        }
        check_url("apiserver", &raw.apiserver)?;
        if let Some(url) = &raw.kvstoremesh {
            check_url("kvstoremesh", url)?;
        }
        let mut agents = raw.agents;
        agents.sort_by(|a, b| a.node.cmp(&b.node));
        let mut seen = BTreeSet::new();
        for agent in &agents {
            check_url(&format!("agents[{}].api", agent.node), &agent.api)?;
            if !seen.insert(&agent.node) {
                return Err(ContextError::DuplicateNode(agent.node.clone()));
            }
        }
        let peer_endpoints = raw
            .peer_endpoints
            .iter()
            .map(|e| e.trim().to_owned())
            .filter(|e| !e.is_empty())
            .collect();
        Ok(ClusterContext {
            name: raw.name,
            id: raw.id,
            max_connected_clusters: max,
            store,
            peer_endpoints,
            apiserver: raw.apiserver,
            kvstoremesh: raw.kvstoremesh,
            peers_dir: raw.peers_dir,
            certs_dir: raw.certs_dir,
            agents,
            unknown_keys: raw.other.into_keys().collect(),
        })
    }

    /// The endpoints peers should use to reach this cluster's store.
    pub fn endpoints_for_peers(&self) -> &[String] {
        if self.peer_endpoints.is_empty() {
            &self.store.endpoints
        } else {
            &self.peer_endpoints
        }
    }

    /// The same context with relative paths resolved against `dir` (the context's directory).
    pub fn resolve(self, dir: &Path) -> ClusterContext {
        let resolve = |p: PathBuf| if p.is_relative() { dir.join(p) } else { p };
        ClusterContext {
            store: self.store.resolve(dir),
            peers_dir: resolve(self.peers_dir),
            certs_dir: resolve(self.certs_dir),
            ..self
        }
    }

    /// The context's YAML, known keys only; what [`ClusterContext::parse`] reads back.
    pub fn to_yaml(&self) -> String {
        let out = ContextOut {
            name: &self.name,
            id: self.id,
            max_connected_clusters: self.max_connected_clusters,
            store: self.store.out(),
            peer_endpoints: &self.peer_endpoints,
            apiserver: &self.apiserver,
            kvstoremesh: self.kvstoremesh.as_deref(),
            peers_dir: self.peers_dir.to_string_lossy(),
            certs_dir: self.certs_dir.to_string_lossy(),
            agents: &self.agents,
        };
        // Strings and numbers only: serializing cannot fail.
        serde_yaml_ng::to_string(&out).expect("cluster contexts always serialize")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FULL: &str = "name: eu-1\nid: 1\nmax-connected-clusters: 511\nstore:\n  endpoints: \
        [https://127.0.0.1:2379]\n  trusted-ca-file: certs/ca.crt\n  cert-file: certs/admin.crt\n  \
        key-file: /abs/admin.key\npeer-endpoints: [' https://10.254.1.1:2379 ']\napiserver: \
        http://127.0.0.1:9880\nkvstoremesh: http://127.0.0.1:9881\npeers-dir: peers\ncerts-dir: \
        certs\nagents:\n- node: n2\n  api: http://10.254.1.3:9890\n- node: n1\n  api: \
        http://10.254.1.2:9890\nextra: 1\n";

    #[test]
    fn a_full_context() {
        let context = ClusterContext::parse(FULL.as_bytes())
            .unwrap()
            .resolve(Path::new("/mesh"));
        assert_eq!(context.name.as_str(), "eu-1");
        assert_eq!(context.id.get(), 1);
        assert_eq!(context.max_connected_clusters.value(), 511);
        assert_eq!(
            context.store.trusted_ca_file.as_deref(),
            Some(Path::new("/mesh/certs/ca.crt"))
        );
        assert_eq!(
            context.store.key_file.as_deref(),
            Some(Path::new("/abs/admin.key"))
        );
        assert_eq!(context.endpoints_for_peers(), ["https://10.254.1.1:2379"]);
        assert_eq!(context.peers_dir, Path::new("/mesh/peers"));
        let nodes: Vec<_> = context.agents.iter().map(|a| a.node.as_str()).collect();
        assert_eq!(nodes, ["n1", "n2"]);
        assert_eq!(context.unknown_keys, ["extra"]);
    }

    #[test]
    fn the_builder_writes_what_the_parser_reads() {
        let mut context = ClusterContext::parse(FULL.as_bytes()).unwrap();
        context.unknown_keys.clear();
        let yaml = context.to_yaml();
        assert_eq!(
            ClusterContext::parse(yaml.as_bytes()).unwrap(),
            context,
            "{yaml}"
        );
        context.kvstoremesh = None;
        context.agents.clear();
        context.peer_endpoints.clear();
        let yaml = context.to_yaml();
        assert_eq!(
            ClusterContext::parse(yaml.as_bytes()).unwrap(),
            context,
            "{yaml}"
        );
        assert_eq!(context.endpoints_for_peers(), ["https://127.0.0.1:2379"]);
    }

    #[test]
    fn refusals_name_the_key() {
        let minimal = "name: a\nid: 2\nstore: {endpoints: [http://127.0.0.1:2379]}\napiserver: \
                       http://127.0.0.1:1\npeers-dir: p\ncerts-dir: c\n";
        assert!(ClusterContext::parse(minimal.as_bytes()).is_ok());
        let cases = [
            (minimal.replace("id: 2", "id: 0"), "cluster id"),
            (minimal.replace("name: a\n", ""), "missing field `name`"),
            (
                minimal.replace("id: 2", "id: 300"),
                "id: 300 is above max-connected-clusters (255)",
            ),
            (
                minimal.replace("name: a", "name: A_"),
                "not a valid cluster context",
            ),
            (
                minimal.replace("{endpoints: [http://127.0.0.1:2379]}", "{endpoints: []}"),
                "store: endpoints: at least one",
            ),
            (
                minimal.replace("apiserver: http://127.0.0.1:1", "apiserver: 127.0.0.1:1"),
                "apiserver: \"127.0.0.1:1\" is not an http",
            ),
            (
                format!("{minimal}kvstoremesh: 'http:// x'\n"),
                "kvstoremesh: \"http:// x\"",
            ),
            (
                format!(
                    "{minimal}agents:\n- {{node: n, api: 'http://a:1'}}\n- {{node: n, api: 'http://b:1'}}\n"
                ),
                "agents: node n is listed twice",
            ),
            (
                format!("{minimal}agents:\n- {{node: n, api: 'ftp://a'}}\n"),
                "agents[n].api",
            ),
        ];
        for (text, expected) in cases {
            let err = ClusterContext::parse(text.as_bytes())
                .unwrap_err()
                .to_string();
            assert!(err.contains(expected), "{text:?}: {err}");
        }
    }
}
