//! `clustermesh store ...`: operations on a cluster's store, thin over `kvstore`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use certs::rustls_pki_types::CertificateDer;
use certs::rustls_pki_types::pem::PemObject;
use certs::{ClusterName, User};
use clap::{Args, Subcommand};
use kvstore::client::provision::{self, ProvisionError};
use kvstore::client::{ClientConfig, StoreClient, TlsFiles};

#[derive(Debug, Subcommand)]
pub enum StoreCommand {
    /// Make a real etcd cluster enforce the mesh's access rules (users, roles, auth).
    #[command(long_about = PROVISION_ABOUT)]
    ProvisionAuth(ProvisionArgs),
}

const PROVISION_ABOUT: &str = "\
Make a real etcd cluster enforce the mesh's access rules, as the embedded store does with
--cluster-name: create the roles mesh-remote (read-only on what peers may read) and
mesh-local (read-only on the cache), the password-less users root and admin-<cluster>
(role root), local-<cluster> (mesh-local) and remote-<peer> for every --peer (mesh-remote),
then enable auth. etcd must run with --client-cert-auth: it then takes the client
certificate's CN as the user name.

Connect with the certificate of admin-<cluster>: once auth is on, only a root user may
change users and roles. Running it again is safe; add peers by running it with more
--peer, remove them with --remove-peer (their remote-<peer> user is deleted).

Limits of etcd 3.4.23's own checks (see kvstore::client::provision): transactions nested
inside a transaction are not checked at all, so a peer could write through one; a from-key
watch is checked on its start key only; leases, compaction and status are open to every
user. Use an etcd release with the fixes (GHSA-rfx7-8w68-q57q, GHSA-xg4h-6gfc-h4m8), or the
embedded store, which checks all of these.

Exit status: 0 on success, 64 for usage or configuration errors, 1 otherwise.";

#[derive(Debug, Args)]
pub struct ProvisionArgs {
    /// The store's client URLs (https://host:port), comma separated or repeated.
    #[arg(long, value_name = "URL", value_delimiter = ',', required = true)]
    endpoints: Vec<String>,

    /// The CA bundle that signs the store's server certificate.
    #[arg(long, value_name = "FILE")]
    cacert: PathBuf,

    /// The client certificate of admin-<cluster>.
    #[arg(long, value_name = "FILE")]
    cert: PathBuf,

    /// Its private key.
    #[arg(long, value_name = "FILE")]
    key: PathBuf,

    /// The cluster whose store this is.
    #[arg(long, value_name = "NAME", value_parser = parse_cluster)]
    cluster: ClusterName,

    /// A peer that may read the store as remote-<peer> (repeatable).
    #[arg(long = "peer", value_name = "NAME", value_parser = parse_cluster)]
    peers: Vec<ClusterName>,

    /// A peer whose remote-<peer> user is deleted (repeatable).
    #[arg(long = "remove-peer", value_name = "NAME", value_parser = parse_cluster)]
    remove_peers: Vec<ClusterName>,

    /// How long to wait for each answer of the store, in seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = 15)]
    timeout: u64,
}

/// A mistake in what was asked for, as opposed to a failure while doing it.
#[derive(Debug)]
struct Usage(String);

impl std::fmt::Display for Usage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Usage {}

/// Whether `err` is a usage or configuration error (exit status 64).
pub fn is_usage(err: &anyhow::Error) -> bool {
    err.chain().any(|cause| {
        cause.is::<Usage>()
            || cause.is::<kvstore::client::ConfigError>()
            || cause
                .downcast_ref::<ProvisionError>()
                .is_some_and(ProvisionError::is_usage)
            || cause
                .downcast_ref::<certs::Error>()
                .is_some_and(certs::Error::is_usage)
    })
}

fn parse_cluster(s: &str) -> Result<ClusterName, certs::Error> {
    Ok(ClusterName::new(s)?)
}

pub fn run(cmd: StoreCommand) -> anyhow::Result<()> {
    match cmd {
        StoreCommand::ProvisionAuth(args) => provision_auth(args),
    }
}

fn provision_auth(args: ProvisionArgs) -> anyhow::Result<()> {
    if args.timeout == 0 {
        return Err(Usage("--timeout must be at least 1 second".to_owned()).into());
    }
    provision::check_peer_changes(&args.cluster, &args.peers, &args.remove_peers)?;
    check_admin_certificate(&args.cert, &args.cluster)?;
    let config = ClientConfig {
        request_timeout: Duration::from_secs(args.timeout),
        ..ClientConfig::new(args.endpoints.iter().cloned()).with_tls(TlsFiles {
            ca: args.cacert.clone(),
            cert: Some(args.cert.clone()),
            key: Some(args.key.clone()),
        })
    };
    config.validate()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        let client = StoreClient::connect(&config)
            .await
            .with_context(|| format!("cannot reach the store at {}", args.endpoints.join(",")))?;
        let mut report = provision::provision(&client, &args.cluster, &args.peers).await?;
        if !args.remove_peers.is_empty() {
            let removed =
                provision::remove_peers(&client, &args.cluster, &args.remove_peers).await?;
            report.users_deleted = removed.users_deleted;
        }
        print!("{report}");
        let version = client.status().await?.version;
        if version.starts_with("3.4.") {
            eprintln!(
                "clustermesh: warning: etcd {version} does not check transactions nested in a \
                 transaction nor the range of from-key watches, so peers are not fully \
                 confined; see GHSA-rfx7-8w68-q57q and GHSA-xg4h-6gfc-h4m8 for fixed releases"
            );
        }
        let mut peers: Vec<String> = args.peers.iter().map(ToString::to_string).collect();
        peers.sort();
        peers.dedup();
        let peers = if peers.is_empty() {
            "none".to_owned()
        } else {
            peers.join(", ")
        };
        println!(
            "store of cluster {} at {} provisioned; peers: {peers}",
            args.cluster,
            client.endpoints()
        );
        Ok(())
    })
}

/// Refuses a certificate that would lose the right to manage users once auth is on: its CN
/// must be admin-<cluster>.
fn check_admin_certificate(path: &Path, cluster: &ClusterName) -> anyhow::Result<()> {
    let cert = CertificateDer::from_pem_file(path).map_err(|e| {
        Usage(format!(
            "--cert: {} holds no usable PEM certificate: {e}",
            path.display()
        ))
    })?;
    let want = User::Admin(cluster.clone());
    match User::from_certificate(&cert) {
        Ok(user) if user == want => Ok(()),
        Ok(user) => Err(Usage(format!(
            "--cert: {} is the certificate of {user}; provisioning needs the certificate of \
             {want}, the user that keeps the right to manage users once auth is on",
            path.display()
        ))
        .into()),
        Err(e) => Err(Usage(format!(
            "--cert: {} names no mesh user ({e}); provisioning needs the certificate of {want}",
            path.display()
        ))
        .into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use certs::{Ca, CaParams};

    fn cert_file(dir: &Path, cn: &User) -> PathBuf {
        let ca = Ca::generate(&CaParams::default()).unwrap();
        let issued = ca.issue_client(cn).unwrap();
        let path = dir.join(format!("{cn}.crt"));
        std::fs::write(&path, issued.cert_pem()).unwrap();
        path
    }

    #[test]
    fn only_our_admin_certificate_may_provision() {
        let dir = tempfile::tempdir().unwrap();
        let a = ClusterName::new("a").unwrap();
        let admin = cert_file(dir.path(), &User::admin("a").unwrap());
        check_admin_certificate(&admin, &a).unwrap();
        for other in [User::admin("b").unwrap(), User::remote("a").unwrap()] {
            let path = cert_file(dir.path(), &other);
            let err = check_admin_certificate(&path, &a).unwrap_err();
            assert!(is_usage(&err), "{err:#}");
            let text = format!("{err:#}");
            assert!(
                text.contains(&other.cn()) && text.contains("admin-a"),
                "{text}"
            );
        }
        let missing = check_admin_certificate(&dir.path().join("none.crt"), &a).unwrap_err();
        assert!(is_usage(&missing), "{missing:#}");
    }

    #[test]
    fn usage_errors_are_told_apart() {
        let a = ClusterName::new("a").unwrap();
        let err = anyhow::Error::new(
            provision::check_peer_changes(&a, std::slice::from_ref(&a), &[]).unwrap_err(),
        );
        assert!(is_usage(&err));
        let config = ClientConfig::new(Vec::<String>::new());
        let err = anyhow::Error::new(config.validate().unwrap_err()).context("validating");
        assert!(is_usage(&err));
        assert!(!is_usage(&anyhow::anyhow!("the store went away")));
    }
}
