//! `clustermesh enable`: a cluster's certificates in its certs-dir (CA made or reused) and
//! its trust bundle, so `connect` can hand peers its endpoints and CA.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use certs::{CERT_MODE, ClusterCertsParams, Identity, Issued, TrustBundle, User, WriteMode};
use model::ClusterContext;

use crate::layout::{self, CertsLayout, FileError};

/// Why a cluster could not be enabled.
#[derive(Debug, thiserror::Error)]
pub enum EnableError {
    /// Making, loading or checking certificates failed.
    #[error("certificates of cluster {cluster}")]
    Certs {
        /// The cluster.
        cluster: String,
        /// What failed.
        #[source]
        source: certs::Error,
    },
    /// An identity in the certs-dir belongs to someone else.
    #[error("{}: holds the certificate of {found}, not of {expected}", dir.display())]
    WrongIdentity {
        /// The identity directory.
        dir: PathBuf,
        /// Who it should be.
        expected: String,
        /// Who it is.
        found: String,
    },
    /// Writing the trust bundle failed.
    #[error(transparent)]
    File(#[from] FileError),
}

impl EnableError {
    /// Whether the error is in what the user pointed at (exit status 64).
    pub fn is_usage(&self) -> bool {
        match self {
            EnableError::Certs { source, .. } => source.is_usage(),
            EnableError::WrongIdentity { .. } => true,
            EnableError::File(_) => false,
        }
    }
}

/// How to enable a cluster.
#[derive(Debug, Clone, Default)]
pub struct EnableOptions {
    /// A CA directory shared by several clusters; the certs-dir's `ca/` when unset.
    pub ca_dir: Option<PathBuf>,
    /// Reissue the server and user certificates even when valid ones exist.
    pub force: bool,
}

/// What `enable` did, and what `connect` will hand to peers.
#[derive(Debug, Clone)]
pub struct Enabled {
    /// The CA directory used.
    pub ca_dir: PathBuf,
    /// The CA was created now.
    pub ca_created: bool,
    /// Certificates were issued now (false: valid ones were kept).
    pub issued: bool,
    /// Files written.
    pub files: Vec<PathBuf>,
    /// The store's client trust bundle (give it to the store as its client CA).
    pub trust_bundle: PathBuf,
    /// The endpoints peers will be given.
    pub endpoints: Vec<String>,
    /// The CA peers must trust to reach the store.
    pub server_ca: PathBuf,
}

/// The host part of an endpoint URL (`https://h:p`, `h:p`, `[v6]:p`).
pub fn endpoint_host(endpoint: &str) -> Option<&str> {
    let rest = endpoint
        .split_once("://")
        .map_or(endpoint, |(_, rest)| rest);
    let authority = rest.split('/').next().unwrap_or(rest);
    if let Some(v6) = authority.strip_prefix('[') {
        return v6.split_once(']').map(|(host, _)| host);
    }
    let host = authority.rsplit_once(':').map_or(authority, |(h, _)| h);
    (!host.is_empty()).then_some(host)
}

/// The DNS names and IPs the server certificate needs for every endpoint of the context.
fn subject_alt_names(context: &ClusterContext) -> (Vec<String>, Vec<IpAddr>) {
    let mut names = BTreeSet::new();
    let mut ips = BTreeSet::new();
    let all = context
        .store
        .endpoints
        .iter()
        .chain(&context.peer_endpoints);
    for host in all.filter_map(|e| endpoint_host(e)) {
        match host.parse::<IpAddr>() {
            Ok(ip) => {
                ips.insert(ip);
            }
            Err(_) => {
                if certs::validate_dns_name(host).is_ok() {
                    names.insert(host.to_owned());
                }
            }
        }
    }
    (names.into_iter().collect(), ips.into_iter().collect())
}

/// Whether every identity is present, loads (key matches), and names the right user.
fn existing_identities(layout: &CertsLayout) -> Result<bool, EnableError> {
    let identities = layout.identities();
    let present = identities
        .iter()
        .filter(|(_, dir)| {
            certs::Issued::paths(dir)
                .iter()
                .all(|p| p.symlink_metadata().is_ok())
        })
        .count();
    if present < identities.len() {
        return Ok(false);
    }
    for (user, dir) in identities {
        let identity = Identity::load(&dir).map_err(|source| EnableError::Certs {
            cluster: layout.cluster.to_string(),
            source,
        })?;
        if let Some(user) = user {
            match identity.user() {
                Ok(found) if found == user => {}
                Ok(found) => {
                    return Err(EnableError::WrongIdentity {
                        dir,
                        expected: user.cn(),
                        found: found.cn(),
                    });
                }
                Err(e) => {
                    return Err(EnableError::WrongIdentity {
                        dir,
                        expected: user.cn(),
                        found: e.to_string(),
                    });
                }
            }
        }
    }
    Ok(true)
}

/// Writes the store's client trust bundle: our CA and every peer CA kept in `peer-cas/`.
pub fn rebuild_trust_bundle(layout: &CertsLayout) -> Result<PathBuf, EnableError> {
    let certs_err = |source| EnableError::Certs {
        cluster: layout.cluster.to_string(),
        source,
    };
    let mut bundle = TrustBundle::load(&layout.client_ca()).map_err(certs_err)?;
    bundle.merge(&TrustBundle::load(&layout.server_ca()).map_err(certs_err)?);
    let admin = layout.user(&User::Admin(layout.cluster.clone()));
    bundle.merge(&TrustBundle::load(&admin).map_err(certs_err)?);
    for path in layout.peer_cas()? {
        bundle.merge(&TrustBundle::load(&path).map_err(certs_err)?);
    }
    let path = layout.trust_bundle();
    layout::write_atomic(&path, bundle.to_pem().as_bytes(), CERT_MODE)?;
    Ok(path)
}

/// Makes (or keeps) the cluster's certificates and writes its trust bundle.
pub fn enable(context: &ClusterContext, options: &EnableOptions) -> Result<Enabled, EnableError> {
    let layout = CertsLayout::new(context.name.clone(), &context.certs_dir);
    let keep = !options.force && existing_identities(&layout)?;
    let (names, ips) = subject_alt_names(context);
    let params = ClusterCertsParams {
        ca_dir: options.ca_dir.clone(),
        dns_names: names,
        ips,
        mode: WriteMode::Replace,
        ..ClusterCertsParams::new(context.name.clone(), &context.certs_dir)
    };
    let (ca_dir, ca_created, mut files) = if keep {
        (params.ca_dir(), false, Vec::new())
    } else {
        let done = certs::generate_cluster_certs(&params).map_err(|source| EnableError::Certs {
            cluster: context.name.to_string(),
            source,
        })?;
        (done.ca_dir, done.ca_created, done.files)
    };
    let trust_bundle = rebuild_trust_bundle(&layout)?;
    files.push(trust_bundle.clone());
    Ok(Enabled {
        ca_dir,
        ca_created,
        issued: !keep,
        files,
        trust_bundle,
        endpoints: context.endpoints_for_peers().to_vec(),
        server_ca: layout.server_ca(),
    })
}

/// `enable` as `clustermesh dev up` uses it: each cluster of the environment gets its own
/// CA (so `connect` joins them by bundle), and its daemons the files `enable` made: the
/// server identity and trust bundle for the store, `admin-<c>` for the apiserver and
/// kvstoremesh, `local-<c>` for the agents.
#[derive(Debug, Clone, Copy, Default)]
pub struct DevCertify;

impl mesh_devenv::Certify for DevCertify {
    fn certify(
        &self,
        context: &ClusterContext,
    ) -> Result<mesh_devenv::ClusterTls, mesh_devenv::CertifyError> {
        let enabled = enable(context, &EnableOptions::default())?;
        let layout = CertsLayout::new(context.name.clone(), &context.certs_dir);
        let identity = |dir: PathBuf| mesh_devenv::IdentityFiles {
            cert: dir.join(Issued::CERT_FILE),
            key: dir.join(Issued::KEY_FILE),
        };
        Ok(mesh_devenv::ClusterTls {
            server: identity(layout.server()),
            client_ca: enabled.trust_bundle,
            server_ca: enabled.server_ca,
            admin: identity(layout.user(&User::Admin(context.name.clone()))),
            local: identity(layout.user(&User::Local(context.name.clone()))),
        })
    }
}

/// Whether `enable` ran for the cluster: every identity file is there.
pub fn is_enabled(certs_dir: &Path, cluster: &certs::ClusterName) -> Result<(), PathBuf> {
    let layout = CertsLayout::new(cluster.clone(), certs_dir);
    for (_, dir) in layout.identities() {
        for path in certs::Issued::paths(&dir) {
            if path.symlink_metadata().is_err() {
                return Err(path);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_of_endpoints() {
        assert_eq!(endpoint_host("https://127.0.0.1:2379"), Some("127.0.0.1"));
        assert_eq!(endpoint_host("a.example:2379"), Some("a.example"));
        assert_eq!(endpoint_host("https://[::1]:2379/"), Some("::1"));
        assert_eq!(endpoint_host("https://:1"), None);
    }

    #[test]
    fn enable_makes_then_keeps() {
        let dir = tempfile::tempdir().unwrap();
        let yaml = crate::mesh::tests::context_yaml(
            "a",
            1,
            "peer-endpoints: [https://a.example:2379, https://10.1.2.3:2379]\n",
        );
        let context = ClusterContext::parse(yaml.as_bytes())
            .unwrap()
            .resolve(dir.path());
        let first = enable(&context, &EnableOptions::default()).unwrap();
        assert!(first.ca_created && first.issued);
        let (names, ips) = subject_alt_names(&context);
        assert_eq!(names, ["a.example"]);
        assert_eq!(ips.len(), 2);
        let before = std::fs::read(context.certs_dir.join("server/tls.crt")).unwrap();
        let second = enable(&context, &EnableOptions::default()).unwrap();
        assert!(!second.ca_created && !second.issued);
        assert_eq!(
            std::fs::read(context.certs_dir.join("server/tls.crt")).unwrap(),
            before
        );
        let forced = enable(
            &context,
            &EnableOptions {
                force: true,
                ..EnableOptions::default()
            },
        )
        .unwrap();
        assert!(!forced.ca_created && forced.issued);
        assert!(is_enabled(&context.certs_dir, &context.name).is_ok());
        let bundle = TrustBundle::load(&first.trust_bundle).unwrap();
        assert_eq!(bundle.len(), 1);
    }
}
