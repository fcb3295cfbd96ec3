//! `clustermesh-apiserver`: publishes one cluster's state into its store.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;
use clustermesh_apiserver::publisher::PublisherConfig;
use clustermesh_apiserver::{ApiserverConfig, SourceConfig, StoreConfig};
use kvstore::client::{ClientConfig, TlsFiles as ClientTls};
use kvstore::server::{ServerConfig, TlsFiles as ServerTls};
use mesh_translate::TranslateConfig;
use model::Capabilities;
use tokio_util::sync::CancellationToken;

#[derive(Parser, Debug)]
#[command(
    name = "clustermesh-apiserver",
    version,
    about = "Publishes a cluster's nodes, global services, identities and endpoints into its store",
    after_help = "By default the store is embedded (--store-listen, --data-dir). Health is served \
                  at /healthz, readiness (initial state published) at /readyz and Prometheus \
                  metrics at /metrics on --health-listen."
)]
struct Args {
    #[command(flatten)]
    cluster: daemon::cluster::ClusterArgs,
    /// Read the cluster from this directory of Kubernetes manifests (watched for changes).
    #[arg(
        long,
        conflicts_with = "kubeconfig",
        required_unless_present = "kubeconfig"
    )]
    manifests: Option<PathBuf>,
    /// Read the cluster from the Kubernetes API with this kubeconfig.
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// Publish into these etcd endpoints instead of hosting the embedded store.
    #[arg(long, value_delimiter = ',')]
    etcd_endpoints: Vec<String>,
    /// CA bundle that signs the etcd servers' certificates.
    #[arg(long, requires = "etcd_endpoints")]
    etcd_cacert: Option<PathBuf>,
    /// Client certificate for etcd (admin-<cluster>).
    #[arg(long, requires_all = ["etcd_key", "etcd_cacert"])]
    etcd_cert: Option<PathBuf>,
    /// Client key for etcd.
    #[arg(long, requires = "etcd_cert")]
    etcd_key: Option<PathBuf>,
    /// Where the embedded store serves clients.
    #[arg(
        long,
        default_value = "127.0.0.1:2379",
        conflicts_with = "etcd_endpoints"
    )]
    store_listen: SocketAddr,
    /// The embedded store's data directory.
    #[arg(
        long,
        default_value = "clustermesh.data",
        conflicts_with = "etcd_endpoints"
    )]
    data_dir: PathBuf,
    /// The embedded store's server certificate; with --store-key and --store-cacert it
    /// serves mutual TLS and enforces per-cluster users (see docs/security.md).
    #[arg(long, requires_all = ["store_key", "store_cacert", "admin_cert"])]
    store_cert: Option<PathBuf>,
    /// The embedded store's server key.
    #[arg(long, requires = "store_cert")]
    store_key: Option<PathBuf>,
    /// CA bundle client certificates of the embedded store must chain to.
    #[arg(long, requires = "store_cert")]
    store_cacert: Option<PathBuf>,
    /// admin-<cluster> certificate the publisher presents to the embedded store.
    #[arg(long, requires_all = ["admin_key", "store_cert"])]
    admin_cert: Option<PathBuf>,
    /// Key of the admin certificate.
    #[arg(long, requires = "admin_cert")]
    admin_key: Option<PathBuf>,
    /// Health, readiness and metrics endpoint.
    #[arg(long, default_value = "127.0.0.1:9880")]
    health_listen: SocketAddr,
    /// TTL of the lease holding every published key.
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    lease_ttl: Duration,
    /// How often cilium/.heartbeat is rewritten.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    heartbeat_interval: Duration,
    /// Whether namespaces without the clustermesh.cilium.io/global annotation are global.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    default_global_namespace: bool,
    /// How long shutdown waits for the parts to stop.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    shutdown_grace: Duration,
    /// Run as one of several replicas publishing into one store, under this name (unique
    /// per replica, stable across its restarts: a pod's name): one leads, the others stand by
    /// and take over within --lease-ttl when it stops. Without it, the only publisher.
    #[arg(long)]
    replica_name: Option<String>,
}

fn existing(flag: &str, path: &Option<PathBuf>) -> anyhow::Result<()> {
    if let Some(path) = path
        && !path.exists()
    {
        bail!("{flag} {}: no such file or directory", path.display());
    }
    Ok(())
}

impl Args {
    fn config(self) -> anyhow::Result<ApiserverConfig> {
        // We write sync canaries; the store holds our own state, not a kvstoremesh cache.
        let capabilities = Capabilities {
            sync_canaries: true,
            cached: false,
            service_exports: false,
        };
        let cluster = self.cluster.config(capabilities)?;
        let name = cluster.name.clone();
        if let Some(dir) = &self.manifests
            && dir.exists()
            && !dir.is_dir()
        {
            bail!("--manifests {}: not a directory", dir.display());
        }
        for (flag, path) in [
            ("--manifests", &self.manifests),
            ("--kubeconfig", &self.kubeconfig),
            ("--etcd-cacert", &self.etcd_cacert),
            ("--etcd-cert", &self.etcd_cert),
            ("--etcd-key", &self.etcd_key),
            ("--store-cert", &self.store_cert),
            ("--store-key", &self.store_key),
            ("--store-cacert", &self.store_cacert),
            ("--admin-cert", &self.admin_cert),
            ("--admin-key", &self.admin_key),
        ] {
            existing(flag, path)?;
        }
        if self.lease_ttl < Duration::from_secs(2) {
            bail!("--lease-ttl must be at least 2s (the store's smallest lease)");
        }
        if self.heartbeat_interval.is_zero() {
            bail!("--heartbeat-interval must be greater than zero");
        }
        if let Some(name) = &self.replica_name {
            if name.is_empty() || name.len() > 253 {
                bail!("--replica-name must be 1 to 253 characters");
            }
            if name.chars().any(char::is_control) {
                bail!("--replica-name {name:?} holds control characters");
            }
        }
        let source = match (self.manifests, self.kubeconfig) {
            (Some(dir), _) => SourceConfig::Manifests(dir),
            (None, kubeconfig) => SourceConfig::Kubernetes { kubeconfig },
        };
        let store = if self.etcd_endpoints.is_empty() {
            let mut server = ServerConfig::new(self.store_listen, self.data_dir);
            if let (Some(cert), Some(key)) = (self.store_cert, self.store_key) {
                server.tls = Some(ServerTls {
                    cert,
                    key,
                    client_ca: self.store_cacert.clone(),
                });
                server.access = Some(name);
            }
            let admin_tls = match (self.store_cacert, self.admin_cert, self.admin_key) {
                (Some(ca), Some(cert), Some(key)) => Some(ClientTls {
                    ca,
                    cert: Some(cert),
                    key: Some(key),
                }),
                _ => None,
            };
            StoreConfig::Embedded { server, admin_tls }
        } else {
            let mut client = ClientConfig::new(self.etcd_endpoints);
            client.tls = self.etcd_cacert.map(|ca| ClientTls {
                ca,
                cert: self.etcd_cert,
                key: self.etcd_key,
            });
            client.validate().context("etcd client configuration")?;
            StoreConfig::External(client)
        };
        Ok(ApiserverConfig {
            source,
            store,
            publisher: PublisherConfig {
                translate: TranslateConfig {
                    cluster,
                    default_global_namespace: self.default_global_namespace,
                },
                lease_ttl: self.lease_ttl,
                heartbeat_interval: self.heartbeat_interval,
                retry_backoff: Duration::from_secs(1),
                replica: self.replica_name,
            },
            health_listen: Some(self.health_listen),
            shutdown_grace: self.shutdown_grace,
        })
    }
}

fn main() -> ExitCode {
    daemon::main("clustermesh-apiserver", Args::config, run)
}

async fn run(config: ApiserverConfig, cancel: CancellationToken) -> anyhow::Result<()> {
    let running = clustermesh_apiserver::start(config, cancel.clone()).await?;
    tracing::info!(store = %running.store_endpoint, health = ?running.health_addr, "clustermesh-apiserver started");
    cancel.cancelled().await;
    running.wait().await?;
    Ok(())
}
