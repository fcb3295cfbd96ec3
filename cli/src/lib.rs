//! The work behind the `clustermesh` command's mesh verbs, so the binary only parses and
//! prints:
//!
//! - [`mesh`]: finding a mesh context (a directory of cluster contexts) and its clusters;
//! - [`enable`]: a cluster's certificates and trust bundle;
//! - [`connect`]: peer files, CAs and client identities exchanged between clusters, and
//!   taken back;
//! - [`status`]: what every daemon of every cluster reports, with causes and hints;
//! - [`troubleshoot`]: certificates, peer reachability, id conflicts, clock skew;
//! - [`probe`] and [`layout`]: reaching daemons and stores, and where files go.

pub mod connect;
pub mod enable;
pub mod layout;
pub mod mesh;
pub mod probe;
pub mod status;
pub mod troubleshoot;
