//! `clustermesh-cni`: the CNI plugin that attaches a pod's network namespace to its node.
//!
//! ADD gives the pod the lowest free address of the node's pod CIDR ([`ipam`]), a veth pair
//! whose host side carries the CIDR's first address as the pod's gateway ([`link`]), and
//! registers the endpoint with the node's agent ([`agent`]), undoing everything if a step
//! fails. DEL undoes ADD and is idempotent; CHECK verifies it. `docs/cni.md` documents the
//! config, the result and the error codes ([`error::Code`]).

pub mod agent;
pub mod config;
pub mod env;
pub mod error;
pub mod ipam;
pub mod link;
pub mod plugin;
pub mod result;

pub use error::{Code, Error, ErrorReply};
pub use plugin::run;
