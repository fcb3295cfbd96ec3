//! Local multi-cluster environments without Kubernetes (`clustermesh dev up|apply|exec|down`).
//!
//! - [`topology`]: the `kind-configs/<name>.yaml` format: which clusters, their ids, pod and
//!   service CIDRs and nodes; validated as a whole, with every node's pod CIDR and underlay
//!   address derived from it, and the same topology as real `kind` cluster configs.
//! - [`env`](mod@env): an environment built from a topology: per cluster an apiserver hosting
//!   its store and a kvstoremesh, per node a network namespace on a shared bridge with its
//!   agent and eBPF datapath, pods attached by `clustermesh-cni` running `mesh-echo` (or, with
//!   `--datapath none`, the control plane alone on loopback); `apply`, `exec` and `down`.
//! - [`manifests`]: a cluster's objects written as Kubernetes holds them (pods with their
//!   addresses, services with cluster IPs, EndpointSlices from selectors and readiness).
//! - [`faults`]: disaster-recovery faults and their undo: kill every process of a cluster and
//!   start them again, cut a cluster off the underlay and restore it.
//! - [`record`]: what an environment made, recorded before it is made, and its teardown.
//! - [`home`]: the mesh home, its contexts and the current context (the CLI's contract).
//! - [`sys`]: host operations: commands, namespaces, cgroups, detached processes.
//! - [`tls`]: what `up` asks of whoever makes the stores' certificates (`clustermesh
//!   enable`), and the files it gets back.

pub mod env;
pub mod faults;
pub mod home;
pub mod manifests;
pub mod record;
pub mod sys;
pub mod tls;
pub mod topology;

pub use env::{Binaries, DevDatapath, DevError, Env, EnvState, Naming, UpOptions, down};
pub use faults::FaultError;
pub use home::MeshHome;
pub use tls::{Certify, CertifyError, ClusterTls, IdentityFiles};
