//! The mesh's store layer.
//!
//! Every component reads and writes stores through the etcd v3 API. This crate holds both
//! sides of that protocol: the embedded etcd-compatible `server` (feature `server`, on by
//! default), and (in `client`) the typed client layer the mesh components use against it or
//! against a real etcd cluster; [`access`] holds the access rules both enforce. Crates that
//! only talk to a store turn the feature off, so they do not link the server's storage and
//! TLS acceptor.

pub mod access;
pub mod client;
#[cfg(feature = "server")]
pub mod server;
