//! Where a cluster's own state comes from.
//!
//! The clustermesh-apiserver (and later every node agent) reads its cluster's Namespaces,
//! Nodes, Services, EndpointSlices, Pods, NetworkPolicies and CiliumNetworkPolicies through
//! one trait, [`ClusterSource`], with two implementations:
//!
//! - [`KubeApi`]: the Kubernetes API through `kube` watchers, for real clusters;
//! - [`ManifestDir`]: a directory of ordinary Kubernetes manifests (YAML or JSON), watched
//!   for changes, for our local clusters that have no API server (the e2e harness writes
//!   the manifests).
//!
//! # The contract
//!
//! A source publishes full, immutable snapshots ([`ClusterObjects`]) into a
//! [`tokio::sync::watch`] channel. Consumers hold the receiver, wait until a snapshot has
//! [`synced`](ClusterObjects::synced) set (see [`wait_synced`]), then reconcile by diffing
//! consecutive snapshots on every change; the channel coalesces bursts, so a slow consumer
//! only ever sees the latest state.
//!
//! - Before `synced`, a snapshot may be partial (or empty). Once a snapshot is `synced`,
//!   every later one is too, and none is ever partial: an object missing from a synced
//!   snapshot is really gone.
//! - Bad input loses nothing: when a file (or an API kind, or one API object) cannot be
//!   read, the objects it held keep their last good version and a [`Problem`] says what is
//!   wrong. The problem disappears as soon as the input is good again.
//! - A source publishes only when something changed (objects or problems).
//! - A source runs until its [`CancellationToken`] is cancelled, or until every receiver is
//!   gone; only a source that cannot start at all returns an error.

mod cilium;
mod kube_api;
mod manifest_dir;
mod objects;
mod parse;

use std::sync::Arc;

use futures::future::BoxFuture;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use cilium::{
    CLUSTER_LABEL, CiliumNetworkPolicy, EgressRule, IngressRule, PolicyRule, PortProtocol, PortRule,
};
pub use kube_api::KubeApi;
pub use manifest_dir::{ManifestDir, load_dir};
pub use model::L4Protocol;
pub use objects::{
    AnyObject, ClusterObjects, DEFAULT_NAMESPACE, NamespacedName, ObjectKind, ObjectRef, Problem,
};
pub use parse::{ManifestFormat, parse_manifests};

/// The sender a source publishes snapshots into.
pub type SnapshotSender = watch::Sender<Arc<ClusterObjects>>;

/// The receiver consumers read snapshots from.
pub type SnapshotReceiver = watch::Receiver<Arc<ClusterObjects>>;

/// A source of one cluster's own state. See the [crate docs](crate) for the contract.
///
/// The trait is object-safe so that a daemon can pick a source at run time
/// (`Box<dyn ClusterSource>`).
pub trait ClusterSource: Send + 'static {
    /// Runs the source: publishes snapshots into `out` until `cancel` is cancelled (then
    /// returns `Ok(())`) or every receiver of `out` is dropped (likewise).
    fn run(
        self: Box<Self>,
        out: SnapshotSender,
        cancel: CancellationToken,
    ) -> BoxFuture<'static, Result<(), SourceError>>;
}

/// Why a source stopped.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The manifest directory could not be opened when the source started.
    #[error("manifest directory {path}: {source}")]
    ManifestDir {
        /// The directory.
        path: String,
        /// What went wrong.
        #[source]
        source: std::io::Error,
    },
    /// Watching the manifest directory for changes could not be set up.
    #[error("cannot watch manifest directory {path}: {source}")]
    Watch {
        /// The directory.
        path: String,
        /// What went wrong.
        #[source]
        source: notify::Error,
    },
    /// A background task of the source panicked or was aborted.
    #[error("a task of the cluster source failed: {0}")]
    Task(#[source] tokio::task::JoinError),
}

/// Starts `source` on the current tokio runtime.
///
/// Returns the receiver of its snapshots (starting with an empty, unsynced one) and the
/// handle of the task running it.
pub fn spawn(
    source: Box<dyn ClusterSource>,
    cancel: CancellationToken,
) -> (SnapshotReceiver, JoinHandle<Result<(), SourceError>>) {
    let (tx, rx) = watch::channel(Arc::new(ClusterObjects::default()));
    let task = tokio::spawn(source.run(tx, cancel));
    (rx, task)
}

/// Waits until the receiver holds a synced snapshot and returns it, marking it seen.
///
/// Returns `None` if the source stopped before it synced.
pub async fn wait_synced(rx: &mut SnapshotReceiver) -> Option<Arc<ClusterObjects>> {
    rx.wait_for(|objects| objects.synced)
        .await
        .ok()
        .map(|objects| Arc::clone(&objects))
}
