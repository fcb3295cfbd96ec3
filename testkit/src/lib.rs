//! Test and bench support shared by the workspace.
//!
//! Conformance, security and crash tests need the same three things: a real etcd to compare
//! against, our own `kvstore serve` started the same way, and certificates for mTLS. Each
//! [`StoreProcess`] owns one child process on free loopback ports with its own temp data dir,
//! so tests run in parallel without sharing state, and the child is SIGKILLed on drop so a
//! failing test does not leak servers.
//!
//! For robustness tests of a replicated store, [`history`] records what concurrent clients
//! saw and checks it (linearizability, revisions, watch streams), and [`faultproxy`] puts a
//! link that can be partitioned, slowed or broken between a client and a store, and
//! [`traffic`] is the recorded workload (clients and resuming watchers) they judge.
//! [`cluster`] starts several members of one store as a replicated cluster, for tests of
//! leader loss and member restarts.

mod bin;
pub mod cluster;
mod error;
pub mod faultproxy;
pub mod history;
mod pki;
mod process;
pub mod sandbox;
pub mod traffic;

pub use bin::{kvstore_bin, workspace_bin};
pub use error::Error;
pub use pki::{CertFiles, TestPki};
pub use process::{
    Backend, DEFAULT_STARTUP_TIMEOUT, StoreOptions, StoreProcess, backends, free_ports,
};
