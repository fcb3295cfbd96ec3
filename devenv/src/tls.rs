//! How an environment's stores are secured. `up` does not make certificates itself: the
//! caller hands it a [`Certify`] (the `clustermesh` CLI passes `clustermesh enable`'s), which
//! is given each cluster's context before its daemons start and answers with the files they
//! use. The stores then serve mutual TLS with per-cluster users (`admin-<c>` for the
//! apiserver and kvstoremesh, `local-<c>` for the agents), and `clustermesh connect` joins the
//! clusters by rewriting trust bundles the stores reload.

use std::path::PathBuf;

use model::ClusterContext;

/// A client identity: a certificate and its key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdentityFiles {
    /// The certificate (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
}

/// The TLS files of one cluster's daemons.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterTls {
    /// The store's own certificate and key.
    pub server: IdentityFiles,
    /// The CAs the store accepts clients from (rewritten by `connect`; the store reloads it).
    pub client_ca: PathBuf,
    /// The CA of the store's certificate: what its clients trust.
    pub server_ca: PathBuf,
    /// `admin-<cluster>`: the apiserver's and kvstoremesh's identity (and the context's).
    pub admin: IdentityFiles,
    /// `local-<cluster>`: the agents' identity (reads the cache).
    pub local: IdentityFiles,
}

/// The error a [`Certify`] reports.
pub type CertifyError = Box<dyn std::error::Error + Send + Sync>;

/// Makes a cluster's certificates from its context (its name, certs-dir and store endpoints)
/// and says where they are.
pub trait Certify {
    /// Makes (or reuses) the certificates of `context`'s cluster.
    fn certify(&self, context: &ClusterContext) -> Result<ClusterTls, CertifyError>;
}
