//! Local multi-cluster environments.
//!
//! - [`topology`]: the `kind-configs/<name>.yaml` format: which clusters, their ids, pod and
//!   service CIDRs and nodes; validated as a whole (unique names and ids, disjoint ranges),
//!   with every node's pod CIDR and underlay address derived from it, and the same topology
//!   as real `kind` cluster configs for users with Docker.

pub mod topology;
