//! `clustermesh certs ...`: argument parsing and reporting around the `certs` crate.

use std::net::IpAddr;
use std::path::PathBuf;

use certs::time::Duration;
use certs::{ClusterCertsParams, ClusterName, KeyType, WriteMode};
use clap::{Args, Subcommand, ValueEnum};

#[derive(Debug, Subcommand)]
pub enum CertsCommand {
    /// Create a cluster's server and client certificates (and the CA if there is none).
    #[command(long_about = GENERATE_ABOUT, after_help = GENERATE_FILES)]
    Generate(GenerateArgs),
    /// Merge CA certificates into one trust bundle, without duplicates.
    #[command(long_about = BUNDLE_ABOUT)]
    Bundle(BundleArgs),
}

const GENERATE_ABOUT: &str = "\
Create a cluster's server and client certificates, signed by the mesh CA.

The CA in --ca-dir (default OUT/ca) is reused when it is there and created otherwise, so
clusters that should trust each other can share one CA by pointing at the same --ca-dir.
Clusters with their own CAs are joined with `clustermesh certs bundle`.

Nothing is written if any output file already exists, unless --force is given; --force
replaces the server and client certificates but never an existing CA.";

const GENERATE_FILES: &str = "\
Files written (PEM; each identity directory is laid out like a Kubernetes TLS secret:
tls.crt is the certificate, tls.key its private key (mode 0600), ca.crt the CAs to trust):

  CA_DIR/ca.crt       The mesh CA certificate. Give it to every peer that must trust this
                      cluster; merge several with `clustermesh certs bundle`.
  CA_DIR/ca.key       The CA's private key (mode 0600). Only needed to issue certificates:
                      keep it off the cluster if you can.
  OUT/server/         The cluster's store (served by clustermesh-apiserver). Valid for
                      <cluster>.mesh.local, localhost, 127.0.0.1, ::1 and every --dns-name
                      and --ip; add the address peers reach the store by.
  OUT/admin-<cluster>/
                      The cluster's own clustermesh-apiserver and kvstoremesh: read-write
                      on this cluster's store.
  OUT/remote-<cluster>/
                      Presented by this cluster's kvstoremesh when it reads a peer's store;
                      the peer grants it read-only access to what it exports. Stays in this
                      cluster: peers only need this cluster's ca.crt.
  OUT/local-<cluster>/
                      This cluster's node agents: read-only on the store's cache of peers.

Exit status: 0 on success, 64 for usage or configuration errors (bad cluster name,
unreadable CA, files that already exist), 1 otherwise.";

const BUNDLE_ABOUT: &str = "\
Merge CA certificates into one trust bundle, without duplicates.

Each input is a PEM file of one or more CA certificates, or a directory holding ca.crt
(a CA directory or an identity directory). A bundle lets a store trust the clients of two
meshes being joined, or of an old and a new CA while a CA is rotated. The output may be one
of the inputs when --force is given; it is replaced atomically.

Exit status: 0 on success, 64 for usage or configuration errors, 1 otherwise.";

#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// The cluster's name: lowercase letters, digits and inner '-', at most 32 characters.
    #[arg(long, value_name = "NAME", value_parser = parse_cluster)]
    cluster: ClusterName,

    /// Directory to write the identities into.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,

    /// The CA directory (ca.crt, ca.key): reused if present, created if not [default: OUT/ca].
    #[arg(long, value_name = "DIR")]
    ca_dir: Option<PathBuf>,

    /// Extra DNS name for the server certificate (repeatable).
    #[arg(long = "dns-name", value_name = "NAME", value_parser = parse_dns_name)]
    dns_names: Vec<String>,

    /// Extra IP address for the server certificate (repeatable).
    #[arg(long = "ip", value_name = "IP")]
    ips: Vec<IpAddr>,

    /// Key type of new keys, the CA's included when it is created.
    #[arg(long, value_enum, default_value_t = KeyTypeArg::EcdsaP256)]
    key_type: KeyTypeArg,

    /// Lifetime of the server and client certificates: a number with h, d or y (365 days).
    #[arg(long, value_name = "DURATION", default_value = "365d", value_parser = parse_lifetime)]
    validity: Duration,

    /// Lifetime of a newly created CA.
    #[arg(long, value_name = "DURATION", default_value = "3650d", value_parser = parse_lifetime)]
    ca_validity: Duration,

    /// Replace existing server and client files (an existing CA is always kept).
    #[arg(long)]
    force: bool,
}

#[derive(Debug, Args)]
pub struct BundleArgs {
    /// The bundle file to write.
    #[arg(long, value_name = "FILE")]
    out: PathBuf,

    /// Replace --out if it exists.
    #[arg(long)]
    force: bool,

    /// CA certificate files or directories holding ca.crt.
    #[arg(value_name = "CA", required = true)]
    inputs: Vec<PathBuf>,
}

/// Mirrors [`KeyType`] so clap can list the choices in `--help`.
#[derive(Clone, Copy, Debug, ValueEnum)]
enum KeyTypeArg {
    EcdsaP256,
    EcdsaP384,
    Ed25519,
}

impl From<KeyTypeArg> for KeyType {
    fn from(k: KeyTypeArg) -> Self {
        match k {
            KeyTypeArg::EcdsaP256 => KeyType::EcdsaP256,
            KeyTypeArg::EcdsaP384 => KeyType::EcdsaP384,
            KeyTypeArg::Ed25519 => KeyType::Ed25519,
        }
    }
}

fn parse_cluster(s: &str) -> Result<ClusterName, certs::Error> {
    Ok(ClusterName::new(s)?)
}

fn parse_dns_name(s: &str) -> Result<String, certs::Error> {
    certs::validate_dns_name(s)
}

fn parse_lifetime(s: &str) -> Result<Duration, certs::Error> {
    certs::parse_lifetime(s)
}

fn mode(force: bool) -> WriteMode {
    if force {
        WriteMode::Replace
    } else {
        WriteMode::CreateNew
    }
}

pub fn run(cmd: CertsCommand) -> anyhow::Result<()> {
    match cmd {
        CertsCommand::Generate(args) => generate(args),
        CertsCommand::Bundle(args) => bundle(args),
    }
}

fn generate(args: GenerateArgs) -> anyhow::Result<()> {
    let params = ClusterCertsParams {
        ca_dir: args.ca_dir,
        dns_names: args.dns_names,
        ips: args.ips,
        key_type: args.key_type.into(),
        lifetime: args.validity,
        ca_lifetime: args.ca_validity,
        mode: mode(args.force),
        ..ClusterCertsParams::new(args.cluster.clone(), args.out)
    };
    let done = certs::generate_cluster_certs(&params).map_err(|e| hint_force(e, "generate"))?;
    let ca = if done.ca_created { "created" } else { "reused" };
    println!(
        "{ca} CA in {}; certificates for cluster {}:",
        done.ca_dir.display(),
        args.cluster
    );
    for file in &done.files {
        println!("  {}", file.display());
    }
    println!("valid until {}", certs::rfc3339(&done.not_after));
    Ok(())
}

fn bundle(args: BundleArgs) -> anyhow::Result<()> {
    let count = certs::bundle_files(&args.inputs, &args.out, mode(args.force))
        .map_err(|e| hint_force(e, "bundle"))?;
    println!("wrote {count} CA certificate(s) to {}", args.out.display());
    Ok(())
}

/// Points at `--force` when the only problem is an existing file.
fn hint_force(err: certs::Error, what: &str) -> anyhow::Error {
    let exists = matches!(err, certs::Error::Exists { .. });
    let err = anyhow::Error::new(err);
    if exists {
        err.context(format!(
            "refusing to overwrite (pass --force to `certs {what}` to replace)"
        ))
    } else {
        err
    }
}
