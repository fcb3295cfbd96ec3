//! `kvstoremesh`: mirrors every peer cluster's published state into the local store's cache.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::bail;
use clap::Parser;
use kvstore::client::{ClientConfig, TlsFiles};
use kvstoremesh::{MeshConfig, Timing};
use model::Capabilities;
use tokio_util::sync::CancellationToken;

#[derive(Parser, Debug)]
#[command(
    name = "kvstoremesh",
    version,
    about = "Mirrors every peer cluster's published state into the local store's cache",
    after_help = "Each file of --peers-dir configures one peer: its name is the peer's cluster \
                  name, its content an etcd client config (endpoints, trusted-ca-file, \
                  cert-file, key-file). Files are re-read while running. Health is served at \
                  /healthz, readiness at /readyz and Prometheus metrics at /metrics on \
                  --health-listen. See docs/kvstoremesh.md."
)]
struct Args {
    #[command(flatten)]
    cluster: daemon::cluster::ClusterArgs,
    /// Directory with one etcd client-config file per peer, named after the peer.
    #[arg(long)]
    peers_dir: PathBuf,
    /// The local store's endpoints, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "http://127.0.0.1:2379")]
    store_endpoints: Vec<String>,
    /// CA bundle that signs the local store's server certificate.
    #[arg(long)]
    store_cacert: Option<PathBuf>,
    /// Client certificate for the local store (admin-<cluster>).
    #[arg(long, requires_all = ["store_key", "store_cacert"])]
    store_cert: Option<PathBuf>,
    /// Client key for the local store.
    #[arg(long, requires = "store_cert")]
    store_key: Option<PathBuf>,
    /// Health, readiness and metrics endpoint.
    #[arg(long, default_value = "127.0.0.1:9881")]
    health_listen: SocketAddr,
    /// TTL of the lease holding every key kvstoremesh writes.
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    lease_ttl: Duration,
    /// How often the peers directory is read.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    peers_poll_interval: Duration,
    /// How long a removed peer's cache stays before it is drained.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    peer_removal_grace: Duration,
    /// How long readiness waits for each peer's first full sync.
    #[arg(long, default_value = "1m", value_parser = humantime::parse_duration)]
    first_sync_timeout: Duration,
    /// How often each peer's store identity, config and heartbeat are checked.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    probe_interval: Duration,
    /// How long one check may take: a partitioned peer is noticed within the probe interval
    /// plus this.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    probe_timeout: Duration,
    /// Timeout of each request to a peer.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    peer_request_timeout: Duration,
    /// First reconnect delay (jittered, doubling).
    #[arg(long, default_value = "250ms", value_parser = humantime::parse_duration)]
    backoff_base: Duration,
    /// Longest reconnect delay.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    backoff_max: Duration,
    /// How long shutdown waits for the tasks.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    shutdown_grace: Duration,
}

impl Args {
    fn config(self) -> anyhow::Result<MeshConfig> {
        let local = self.cluster.config(Capabilities::default())?;
        for (flag, path) in [
            ("--store-cacert", &self.store_cacert),
            ("--store-cert", &self.store_cert),
            ("--store-key", &self.store_key),
        ] {
            if let Some(path) = path
                && !path.is_file()
            {
                bail!("{flag} {}: no such file", path.display());
            }
        }
        let mut store = ClientConfig::new(self.store_endpoints);
        store.tls = self.store_cacert.map(|ca| TlsFiles {
            ca,
            cert: self.store_cert,
            key: self.store_key,
        });
        let config = MeshConfig {
            local,
            store,
            peers_dir: self.peers_dir,
            health_listen: Some(self.health_listen),
            timing: Timing {
                lease_ttl: self.lease_ttl,
                peers_poll_interval: self.peers_poll_interval,
                peer_removal_grace: self.peer_removal_grace,
                first_sync_timeout: self.first_sync_timeout,
                probe_interval: self.probe_interval,
                probe_timeout: self.probe_timeout,
                peer_request_timeout: self.peer_request_timeout,
                backoff_base: self.backoff_base,
                backoff_max: self.backoff_max,
                shutdown_grace: self.shutdown_grace,
            },
        };
        if let Err(error) = config.validate() {
            let flag = match error.field() {
                "store" => "--store-endpoints/--store-cacert/--store-cert/--store-key".to_owned(),
                field => format!("--{}", field.replace('_', "-")),
            };
            return Err(anyhow::Error::new(error).context(flag));
        }
        Ok(config)
    }
}

fn main() -> ExitCode {
    daemon::main("kvstoremesh", Args::config, run)
}

async fn run(config: MeshConfig, cancel: CancellationToken) -> anyhow::Result<()> {
    let running = kvstoremesh::start(config, cancel).await?;
    running.wait().await?;
    Ok(())
}
