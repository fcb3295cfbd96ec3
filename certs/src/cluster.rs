//! Everything one cluster needs, in one call: what `clustermesh certs generate` does.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use time::{Duration, OffsetDateTime};

use crate::files::{self, WriteMode};
use crate::params::{DEFAULT_CA_LIFETIME, DEFAULT_LEAF_LIFETIME};
use crate::{
    Ca, CaParams, ClientParams, ClusterName, Error, Issued, KeyType, ServerParams, User, Validity,
};

/// Directory name of the store's server identity inside the output directory.
pub const SERVER_DIR: &str = "server";
/// Directory name of the CA inside the output directory, unless a CA directory is given.
pub const CA_DIR: &str = "ca";

/// Inputs of [`generate_cluster_certs`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterCertsParams {
    /// The cluster the certificates are for.
    pub cluster: ClusterName,
    /// Output directory; identities go into subdirectories.
    pub out: PathBuf,
    /// Where the CA lives; `out/ca` if unset. Reused when present, created when absent.
    pub ca_dir: Option<PathBuf>,
    /// Extra DNS names for the server certificate.
    pub dns_names: Vec<String>,
    /// Extra IP addresses for the server certificate.
    pub ips: Vec<IpAddr>,
    /// Key type of new keys (including a new CA's).
    pub key_type: KeyType,
    /// Lifetime of server and client certificates.
    pub lifetime: Duration,
    /// Lifetime of a newly created CA.
    pub ca_lifetime: Duration,
    /// Whether existing identity files are replaced. An existing CA is always reused, never
    /// replaced: regenerating it would silently break every cluster that trusts it.
    pub mode: WriteMode,
}

impl ClusterCertsParams {
    /// Defaults for `cluster` writing into `out`.
    pub fn new(cluster: ClusterName, out: impl Into<PathBuf>) -> Self {
        ClusterCertsParams {
            cluster,
            out: out.into(),
            ca_dir: None,
            dns_names: Vec::new(),
            ips: Vec::new(),
            key_type: KeyType::default(),
            lifetime: DEFAULT_LEAF_LIFETIME,
            ca_lifetime: DEFAULT_CA_LIFETIME,
            mode: WriteMode::CreateNew,
        }
    }

    /// The CA directory in effect.
    pub fn ca_dir(&self) -> PathBuf {
        self.ca_dir.clone().unwrap_or_else(|| self.out.join(CA_DIR))
    }

    /// Each identity with its directory: the server, then admin, remote and local users.
    pub fn identity_dirs(&self) -> Vec<(String, PathBuf)> {
        let mut dirs = vec![(SERVER_DIR.to_owned(), self.out.join(SERVER_DIR))];
        for user in User::all(&self.cluster) {
            dirs.push((user.cn(), self.out.join(user.cn())));
        }
        dirs
    }
}

/// What [`generate_cluster_certs`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterCerts {
    /// The CA directory used.
    pub ca_dir: PathBuf,
    /// Whether the CA was created (false: an existing one was reused).
    pub ca_created: bool,
    /// Every file written, in order.
    pub files: Vec<PathBuf>,
    /// When the server and client certificates expire.
    pub not_after: OffsetDateTime,
}

/// Issues a cluster's server certificate and its three users' client certificates, reusing
/// the CA in the CA directory or creating one there.
///
/// Everything is checked and generated before the first file is written, so bad input or an
/// existing file (without [`WriteMode::Replace`]) leaves the disk untouched.
pub fn generate_cluster_certs(params: &ClusterCertsParams) -> Result<ClusterCerts, Error> {
    let ca_dir = params.ca_dir();
    let leaf_validity = Validity::starting_now(params.lifetime)?;
    let ca_exists = Ca::exists_in(&ca_dir)?;

    let dirs = params.identity_dirs();
    if params.mode == WriteMode::CreateNew {
        let mut planned: Vec<PathBuf> = dirs
            .iter()
            .flat_map(|(_, dir)| Issued::paths(dir))
            .collect();
        if !ca_exists {
            let (cert, key) = Ca::paths(&ca_dir);
            planned.extend([cert, key]);
        }
        files::ensure_absent(planned.iter().map(PathBuf::as_path))?;
    }

    let ca = if ca_exists {
        Ca::load(&ca_dir)?
    } else {
        Ca::generate(&CaParams {
            common_name: format!("clustermesh CA ({})", params.cluster),
            key_type: params.key_type,
            validity: Validity::starting_now(params.ca_lifetime)?,
        })?
    };

    let mut server = ServerParams::new(params.cluster.clone());
    server.dns_names = params.dns_names.clone();
    server.ips = params.ips.clone();
    server.key_type = params.key_type;
    server.validity = leaf_validity;
    let mut issued = vec![ca.issue_server(&server)?];
    for user in User::all(&params.cluster) {
        issued.push(ca.issue_client_with(&ClientParams {
            user,
            key_type: params.key_type,
            validity: leaf_validity,
        })?);
    }

    let mut written = Vec::new();
    if !ca_exists {
        written.extend(ca.write(&ca_dir, WriteMode::CreateNew)?);
    }
    for ((_, dir), cert) in dirs.iter().zip(&issued) {
        written.extend(cert.write(dir, params.mode)?);
    }
    Ok(ClusterCerts {
        ca_dir,
        ca_created: !ca_exists,
        files: written,
        not_after: leaf_validity.not_after(),
    })
}

/// Loads every bundle in `inputs` (files, or CA/identity directories holding `ca.crt`),
/// merges them without duplicates and writes the result to `out`; returns the CA count.
///
/// All inputs are read before `out` is written, so `out` may be one of them.
pub fn bundle_files(inputs: &[PathBuf], out: &Path, mode: WriteMode) -> Result<usize, Error> {
    let mut all = crate::TrustBundle::new();
    for input in inputs {
        all.merge(&crate::TrustBundle::load(input)?);
    }
    all.write(out, mode)?;
    Ok(all.len())
}
