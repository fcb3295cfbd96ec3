//! The mesh's PKI: a CA, server certificates for each cluster's store, client certificates
//! whose common name says who the client is, and trust bundles that may hold several CAs.
//!
//! Every connection in the mesh is mutual TLS. A store learns who a peer is from the CN of
//! its verified client certificate, parsed by [`User::parse`]:
//!
//! | CN | presented by | rights on the store it connects to |
//! |---|---|---|
//! | `admin-<cluster>` | the cluster's own apiserver and kvstoremesh | read-write on `<cluster>`'s store |
//! | `remote-<cluster>` | `<cluster>`'s kvstoremesh reading a peer's store | read-only on what the peer exports |
//! | `local-<cluster>` | `<cluster>`'s node agents | read-only on `<cluster>`'s cache |
//!
//! A store of cluster `c` should accept `admin-c` and `local-c` only for itself, and
//! `remote-p` only for a configured peer `p != c`, so a peer can never write into it.
//!
//! Files are PEM, laid out like Kubernetes TLS secrets: one directory per identity with
//! `tls.crt`, `tls.key` (mode 0600) and `ca.crt` (the trust bundle); a CA directory holds
//! `ca.crt` and `ca.key`.
//!
//! ```
//! use certs::{Ca, CaParams, ClusterName, ServerParams, User};
//! # fn main() -> Result<(), certs::Error> {
//! let ca = Ca::generate(&CaParams::default())?;
//! let server = ca.issue_server(&ServerParams::new(ClusterName::new("a")?))?;
//! let admin = ca.issue_client(&User::admin("a")?)?;
//! let now = rustls_pki_types::UnixTime::now();
//! ca.trust_bundle().verify_server(&[server.cert_der().clone()], "a.mesh.local", now)?;
//! let user = ca.trust_bundle().verify_client(&[admin.cert_der().clone()], now)?;
//! assert_eq!(user, User::admin("a")?);
//! # Ok(())
//! # }
//! ```

mod bundle;
mod ca;
mod cluster;
mod error;
mod files;
mod identity;
mod name;
mod params;
mod x509;

pub use bundle::{CA_FILE, TrustBundle};
pub use ca::{Ca, CaParams, ClientParams, Issued, MESH_DOMAIN, ServerParams, validate_dns_name};
pub use cluster::{
    CA_DIR, ClusterCerts, ClusterCertsParams, SERVER_DIR, bundle_files, generate_cluster_certs,
};
pub use error::{Error, rfc3339};
pub use files::{CERT_MODE, KEY_MODE, WriteMode};
pub use identity::Identity;
pub use name::{ClusterName, User};
pub use params::{
    BACKDATE, DEFAULT_CA_LIFETIME, DEFAULT_LEAF_LIFETIME, KeyType, MAX_LIFETIME, Validity,
    parse_lifetime,
};

/// Re-exported so callers name validity times and lifetimes with the same crate version.
pub use time;

/// Re-exported so callers name certificates, keys and times with the same crate version.
pub use rustls_pki_types;

#[cfg(test)]
mod tests;
