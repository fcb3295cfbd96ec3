//! The mesh's store layer.
//!
//! Every component reads and writes stores through the etcd v3 API. This crate holds both
//! sides of that protocol: the embedded etcd-compatible [`server`], and (in `client`) the typed
//! client layer the mesh components use against it or against a real etcd cluster.

pub mod client;
pub mod server;
