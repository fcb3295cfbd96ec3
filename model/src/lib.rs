//! The mesh's data model: what each cluster publishes into its store, under which keys, and
//! how a reader checks what a peer published. No I/O: the apiserver, kvstoremesh and agents
//! share these types so they cannot disagree on a key or a value.
//!
//! - [`name`], [`cluster`], [`identity`], [`net`], [`label`]: validated building blocks.
//! - [`ClusterConfig`], [`Node`], [`ClusterService`], [`ServiceExport`], [`Identity`],
//!   [`IpIdentity`]: the published values, encoded as versioned, canonical JSON through
//!   [`StoreValue`].
//! - [`keys`]: the Cilium-compatible key layout, builders and parsers.
//! - [`validate_entry`]: the gate every entry read from a peer passes.
//! - [`annotations`]: the Service annotations that make a service global.
//! - [`endpoint`]: a pod's interface, as the CNI plugin registers it with the node's agent.
//! - [`PeerStatus`]: kvstoremesh's status of a peer; [`PeerFile`]: the peers directory's
//!   files, both read by kvstoremesh and by agents that connect to peers themselves.
//! - [`error_chain`]: an error and its sources as one line.
//!
//! `docs/values.md` documents every key and value.

pub mod annotations;
pub mod cluster;
pub mod config;
pub mod context;
pub mod endpoint;
pub mod entry;
pub mod errors;
pub mod identity;
pub mod ipcache;
pub mod keys;
pub mod label;
pub mod name;
pub mod net;
pub mod node;
pub mod peerfile;
pub mod service;
pub mod status;
pub mod value;

#[cfg(test)]
mod doc_examples;
#[cfg(test)]
mod testutil;

pub use annotations::{Affinity, AnnotationWarning, ServiceMeshOptions, parse_service_annotations};
pub use cluster::{ClusterId, IdError, MaxConnectedClusters};
pub use config::{Capabilities, ClusterConfig, PeerError};
pub use context::{AgentContext, ClusterContext, ContextError};
pub use entry::{Entry, EntryError, validate_cluster_config, validate_entry, validate_key};
pub use errors::error_chain;
pub use identity::{Identity, IdentityError, IdentityRange, NumericIdentity, cluster_of};
pub use ipcache::IpIdentity;
pub use keys::{
    CacheKey, KeyError, Kind, StateKey, parse_cache_key, parse_state_key, to_cache_key,
};
pub use label::{Label, LabelError};
pub use name::{ClusterName, DnsLabel, DnsSubdomain, NameError};
pub use net::{IpPrefix, PrefixError};
pub use node::{AddressKind, Node, NodeAddress};
pub use peerfile::{PeerFile, PeerFileError};
pub use service::{
    Backend, ClusterService, ExportType, L4Port, L4Protocol, PortMap, Protocol, ServiceExport,
};
pub use status::{KindStatus, PeerStatus, Phase, StatusError};
pub use value::{DecodeError, SchemaVersion, StoreValue, ValueError};
