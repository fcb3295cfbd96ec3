//! The node agent's local HTTP JSON API as data, shared by the agent (which serves it) and the
//! `clustermesh` command (which reads it), so the command does not link the agent.
//!
//! | path | body |
//! |---|---|
//! | `GET /v1/services` | list of [`ServiceEntry`] |
//! | `GET /v1/ipcache` | list of [`IpcacheEntry`] |
//! | `GET /v1/policy` | [`PolicyView`]: allow entries and enforced identities |
//! | `GET /v1/routes` | list of [`RouteEntry`] |
//! | `GET /v1/peers` | [`AgentStatus`] |
//! | `GET /v1/tables` | every table ([`Tables`]) |
//! | `GET /v1/datapath` | [`DatapathStatus`] |
//! | `GET /v1/drops` | recent [`DropView`]s, oldest first |
//! | `GET /v1/endpoints`, `PUT`/`DELETE /v1/endpoints/{container_id}` | the CNI plugin's contract: [`model::endpoint`] |
//! | `GET /healthz`, `/readyz`, `/metrics` | liveness, readiness (local cluster synced), Prometheus |
//!
//! - [`tables`]: the agent's desired-state tables as plain data, and their diff.
//! - [`status`]: the agent's and its peers' status.
//! - [`datapath`]: the eBPF datapath's status and drops.
//! - [`client`]: `GET` on the API.

pub mod client;
pub mod datapath;
pub mod status;
pub mod tables;

pub use client::{ClientError, get_json, get_raw};
pub use datapath::{CounterView, DatapathStatus, DropView, MapUsage};
pub use status::{AgentStatus, ClusterHealth, LostReason, PeerView, Phase, PolicyView};
pub use tables::{
    ANY_IDENTITY, ANY_PORT, AffinityMode, BackendState, Change, Direction, EnforcementEntry,
    Frontend, IpcacheEntry, Keyed, PolicyEntry, PolicyKey, RouteEntry, ServiceBackend,
    ServiceEntry, ServiceName, Table, TableCounts, Tables, diff,
};
