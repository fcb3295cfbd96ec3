//! `kvstore`: runs the embedded etcd-compatible store.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use certs::ClusterName;
use clap::{Parser, Subcommand};
use kvstore::server::cluster::{
    ClusterConfig, ClusterConfigError, InitialState, parse_initial_cluster,
};
use kvstore::server::storage::restore_data_dir;
use kvstore::server::{DEFAULT_MAX_REQUEST_BYTES, Server, ServerConfig, TlsFiles};
use tokio_util::sync::CancellationToken;

/// jemalloc instead of glibc's malloc: measured in the side-by-side bench, about 10-18% less
/// resident memory per stored key (the index holds every key's latest value) and no more CPU.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser, Debug)]
#[command(
    name = "kvstore",
    version,
    about = "An embedded etcd-v3-compatible store"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve the etcd v3 API from a data directory.
    Serve(Box<ServeArgs>),
    /// Create a new data directory from a snapshot (`etcdctl snapshot save` of this store);
    /// restore every member of a new cluster from the same file, then start them with
    /// `serve --initial-cluster ...`.
    Restore(RestoreArgs),
}

#[derive(Parser, Debug)]
struct RestoreArgs {
    /// The snapshot file.
    snapshot: PathBuf,
    /// The data directory to create; it must not exist or be empty.
    #[arg(long)]
    data_dir: PathBuf,
}

/// What the binary was asked to do, checked.
enum Job {
    Serve(ServerConfig),
    Restore(RestoreArgs),
}

#[derive(Parser, Debug)]
struct ServeArgs {
    /// Address to serve clients on.
    #[arg(long, default_value = "127.0.0.1:2379")]
    listen: SocketAddr,
    /// The URL to serve clients on, as etcd's --listen-client-urls (one URL with an IP
    /// address); replaces --listen.
    #[arg(long, conflicts_with = "listen", value_parser = parse_socket_url)]
    listen_client_urls: Option<SocketAddr>,
    /// The members of a replicated store, `name=peer-url,...` (etcd's --initial-cluster);
    /// turns on replication (raft). Without it the store is a single member.
    #[arg(long)]
    initial_cluster: Option<String>,
    /// This member's peer URLs as --initial-cluster names them (comma-separated).
    #[arg(long, value_delimiter = ',', requires = "initial_cluster")]
    initial_advertise_peer_urls: Vec<String>,
    /// Where to accept other members (one URL with an IP address); default: this member's
    /// first peer URL in --initial-cluster.
    #[arg(long, requires = "initial_cluster", value_parser = parse_socket_url)]
    listen_peer_urls: Option<SocketAddr>,
    /// `new` founds the cluster; `existing` restarts a member that has its data directory
    /// (joining a running cluster is not supported).
    #[arg(long, default_value = "new", value_parser = ["new", "existing"])]
    initial_cluster_state: String,
    /// Tells clusters apart: members (and their ids) of clusters with other tokens never
    /// talk to each other.
    #[arg(long, default_value = kvstore::server::cluster::DEFAULT_CLUSTER_TOKEN)]
    initial_cluster_token: String,
    /// Applied entries beyond the start of raft's log before it is compacted (etcd's
    /// --snapshot-count); a member further behind is sent a snapshot of the store.
    #[arg(long, default_value_t = kvstore::server::cluster::DEFAULT_SNAPSHOT_COUNT, value_parser = clap::value_parser!(u64).range(1..))]
    snapshot_count: u64,
    /// How often the leader compares every member's hash of its history (etcd's corruption
    /// check; `--experimental-corrupt-check-time` is accepted too); a member that differs
    /// from the majority gets a CORRUPT alarm, which stops reads and writes until it is
    /// disarmed. `0s` turns the check off.
    #[arg(long, alias = "experimental-corrupt-check-time", default_value = "5m", value_parser = parse_duration)]
    corrupt_check_time: Duration,
    /// Certificate (PEM) this member presents to other members; peer URLs must be https.
    #[arg(long, requires_all = ["peer_key", "peer_cacert", "initial_cluster"])]
    peer_cert: Option<PathBuf>,
    /// Private key (PEM) of --peer-cert.
    #[arg(long, requires = "peer_cert")]
    peer_key: Option<PathBuf>,
    /// CA bundle (PEM) other members' certificates must chain to (mutual TLS).
    #[arg(long, requires = "peer_cert")]
    peer_cacert: Option<PathBuf>,
    /// Directory holding the store; created if missing.
    #[arg(long, default_value = "kvstore.data")]
    data_dir: PathBuf,
    /// Server certificate (PEM); serving TLS needs --key and --cacert too: clients must always
    /// present a certificate, there is no anonymous TLS.
    #[arg(long, requires_all = ["key", "cacert"])]
    cert: Option<PathBuf>,
    /// Server private key (PEM).
    #[arg(long, requires = "cert")]
    key: Option<PathBuf>,
    /// CA bundle (PEM) that client certificates must chain to; turns on mutual TLS.
    #[arg(long, requires = "cert")]
    cacert: Option<PathBuf>,
    /// This store's cluster: turns on per-user access rules decided by the client
    /// certificate's CN (`admin-<cluster>`, `remote-<peer>`, `local-<cluster>`; see
    /// docs/security.md). Needs --cert/--key/--cacert.
    #[arg(long, requires = "cacert", value_parser = parse_cluster_name)]
    cluster_name: Option<ClusterName>,
    /// Largest request accepted, in bytes (etcd's --max-request-bytes).
    #[arg(long, default_value_t = DEFAULT_MAX_REQUEST_BYTES as u64, value_parser = clap::value_parser!(u64).range(1..=(1u64 << 31)))]
    max_request_bytes: u64,
    /// Interval between watch progress notifications, e.g. 500ms, 10s, 10m.
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    watch_progress_notify_interval: Duration,
    /// How long shutdown waits for open streams.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    shutdown_grace: Duration,
    /// This member's name, as `etcdctl member list` shows it (etcd's --name).
    #[arg(long, default_value = "default")]
    name: String,
    /// Comma-separated URLs clients reach this member at, as `etcdctl member list` shows
    /// them (etcd's --advertise-client-urls); default: the listen address.
    #[arg(long, value_delimiter = ',', value_parser = parse_client_url)]
    advertise_client_urls: Vec<String>,
}

fn parse_client_url(text: &str) -> Result<String, String> {
    let rest = text
        .strip_prefix("http://")
        .or_else(|| text.strip_prefix("https://"))
        .ok_or_else(|| format!("{text:?} is not an http:// or https:// URL"))?;
    if rest.is_empty() || rest.contains(char::is_whitespace) {
        return Err(format!("{text:?} has no host"));
    }
    Ok(text.to_owned())
}

fn parse_socket_url(text: &str) -> Result<SocketAddr, String> {
    let rest = parse_client_url(text)?;
    let rest = rest.split_once("://").map_or(rest.as_str(), |(_, r)| r);
    rest.trim_end_matches('/').parse().map_err(|_| {
        format!("{text:?} must name an IP address and a port, e.g. http://127.0.0.1:2380")
    })
}

fn parse_cluster_name(text: &str) -> Result<ClusterName, String> {
    ClusterName::new(text).map_err(|e| e.to_string())
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("{text:?} has no unit (use ms, s, m or h)"))?;
    let (number, unit) = text.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} does not start with a whole number"))?;
    let duration = match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n * 60),
        "h" => Duration::from_secs(n * 3600),
        other => return Err(format!("unknown unit {other:?} (use ms, s, m or h)")),
    };
    if duration.is_zero() {
        return Err("must be greater than zero".into());
    }
    Ok(duration)
}

impl ServeArgs {
    fn config(self) -> anyhow::Result<ServerConfig> {
        for (flag, path) in [
            ("--cert", &self.cert),
            ("--key", &self.key),
            ("--cacert", &self.cacert),
            ("--peer-cert", &self.peer_cert),
            ("--peer-key", &self.peer_key),
            ("--peer-cacert", &self.peer_cacert),
        ] {
            if let Some(path) = path
                && !path.is_file()
            {
                bail!("{flag} {}: no such file", path.display());
            }
        }
        if self.data_dir.exists() && !self.data_dir.is_dir() {
            bail!(
                "--data-dir {}: exists and is not a directory",
                self.data_dir.display()
            );
        }
        let cluster = self.cluster()?;
        let mut config = ServerConfig::new(
            self.listen_client_urls.unwrap_or(self.listen),
            self.data_dir,
        );
        config.cluster = cluster;
        config.tls = match (self.cert, self.key) {
            (Some(cert), Some(key)) => Some(TlsFiles {
                cert,
                key,
                client_ca: self.cacert,
            }),
            _ => None,
        };
        config.max_request_bytes = usize::try_from(self.max_request_bytes)
            .context("--max-request-bytes does not fit this platform")?;
        config.progress_interval = self.watch_progress_notify_interval;
        config.shutdown_grace = self.shutdown_grace;
        config.access = self.cluster_name;
        if self.name.is_empty() || self.name.chars().any(char::is_control) {
            bail!("--name {:?}: must be non-empty printable text", self.name);
        }
        config.name = self.name;
        config.advertise_client_urls = self.advertise_client_urls;
        Ok(config)
    }
}

impl ServeArgs {
    /// The replication settings, checked as etcd checks them, or `None` for a single member.
    fn cluster(&self) -> anyhow::Result<Option<Arc<ClusterConfig>>> {
        let Some(text) = &self.initial_cluster else {
            return Ok(None);
        };
        let token = &self.initial_cluster_token;
        let members = parse_initial_cluster(text, token)?;
        let me = members
            .iter()
            .find(|m| m.name == self.name)
            .ok_or_else(|| ClusterConfigError::NotListed {
                name: self.name.clone(),
            })?;
        let listen_peer = match self.listen_peer_urls {
            Some(addr) => addr,
            None => parse_socket_url(&me.peer_urls[0]).map_err(|e| {
                anyhow::anyhow!(
                    "--listen-peer-urls is not given and this member's peer URL cannot be listened on: {e}"
                )
            })?,
        };
        let peer_tls = match (&self.peer_cert, &self.peer_key) {
            (Some(cert), Some(key)) => Some(TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: self.peer_cacert.clone(),
            }),
            _ => None,
        };
        let state = if self.initial_cluster_state == "existing" {
            InitialState::Existing
        } else {
            InitialState::New
        };
        let mut config = ClusterConfig::new(
            &self.name,
            members,
            &self.initial_advertise_peer_urls,
            token,
            state,
            listen_peer,
            peer_tls,
        )?;
        config.snapshot_count = self.snapshot_count;
        config.corrupt_check = self.corrupt_check_time;
        Ok(Some(Arc::new(config)))
    }
}

fn main() -> ExitCode {
    daemon::main(
        "kvstore",
        |cli: Cli| match cli.command {
            Command::Serve(args) => args.config().map(Job::Serve),
            Command::Restore(args) => {
                if !args.snapshot.is_file() {
                    bail!("{}: no such file", args.snapshot.display());
                }
                Ok(Job::Restore(args))
            }
        },
        run,
    )
}

async fn run(job: Job, cancel: CancellationToken) -> anyhow::Result<()> {
    match job {
        Job::Serve(config) => {
            Server::start(config, cancel).await?.wait().await?;
        }
        Job::Restore(args) => {
            let image = std::fs::read(&args.snapshot)
                .with_context(|| format!("reading {}", args.snapshot.display()))?;
            let dir = args.data_dir.clone();
            let restored = tokio::task::spawn_blocking(move || restore_data_dir(&image, &dir))
                .await?
                .with_context(|| format!("restoring {}", args.snapshot.display()))?;
            println!(
                "restored {} into {}: revision {}, {} records, {} leases",
                args.snapshot.display(),
                args.data_dir.display(),
                restored.revision,
                restored.records,
                restored.leases
            );
        }
    }
    Ok(())
}
