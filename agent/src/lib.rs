//! The node agent's control plane: turns what the local cluster holds and what every peer
//! cluster published into the tables the datapath needs (services, ipcache, policy, routes).
//!
//! Built bottom-up:
//!
//! - [`tables`]: the desired-state tables as plain data, [`tables::diff`] and
//!   [`tables::Tables::apply`] (from [`agent_api`], which the CLI reads them with).
//! - [`merge`]: one service's per-cluster parts, affinity and health → ordered backends.
//! - [`policy`]: network policies → allow table keyed by identities, port and protocol.
//! - [`state`]: every cluster's part and the tables, maintained incrementally.
//! - [`health`]: when a lost peer's backends are demoted (the grace period).
//! - [`local`]: the local cluster's part from its own objects ([`mesh_translate`]).
//! - [`remote`]: peers' state from kvstoremesh's cache or from their own stores, one watcher
//!   abstraction and one state machine per peer.
//! - [`datapath`]: the eBPF datapath's owner thread: maps by diff, routes, endpoints, drops.
//! - [`daemon`]: the owner task, persisted state, wiring; [`api`]: the local HTTP JSON API.
//! - [`persist`]: durable writes of the files kept across restarts, off the owner tasks.
//!
//! `docs/agent.md` describes the behaviour for operators.

pub mod api;
pub mod daemon;
pub mod datapath;
pub mod health;
pub mod local;
pub mod merge;
pub mod metrics;
pub mod persist;
pub mod policy;
pub mod remote;
pub mod state;

/// The desired-state tables live with the API that serves them.
pub use agent_api::tables;
