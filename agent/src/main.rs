//! `clustermesh-agent`: the node agent: desired-state tables and the eBPF datapath that
//! carries them.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use agent::daemon::{AgentConfig, LocalSource};
use agent::datapath::{DatapathOptions, Mode};
use agent::health::HealthConfig;
use agent::policy::PolicyOptions;
use agent::remote::{PeerSource, WatchTiming};
use anyhow::{Context, bail};
use bpf::{DatapathConfig, DatapathError, MapSizes};
use clap::Parser;
use kvstore::client::{ClientConfig, TlsFiles};
use model::Capabilities;
use tokio_util::sync::CancellationToken;

#[derive(Parser, Debug)]
#[command(
    name = "clustermesh-agent",
    version,
    about = "Per node: turns the local cluster's and every peer's state into desired-state tables \
             (services, ipcache, policy, routes) served on a local API",
    after_help = "Peers are read from kvstoremesh's cache in the local store (--store-endpoints, \
                  the default deployment) or directly from each peer's store (--peers-dir). \
                  With --datapath bpf|auto the tables are programmed into an eBPF datapath pinned \
                  under --bpffs/--bpf-root (inspect it with `bpftool map dump pinned ...`); \
                  `clustermesh agent services|ipcache|policy|drops` shows the tables and drops."
)]
struct Args {
    #[command(flatten)]
    cluster: daemon::cluster::ClusterArgs,
    /// The node this agent runs on: policies apply to its pods (all local pods when unset).
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,
    /// Read the local cluster from this directory of Kubernetes manifests (watched).
    #[arg(
        long,
        conflicts_with = "kubeconfig",
        required_unless_present = "kubeconfig"
    )]
    manifests: Option<PathBuf>,
    /// Read the local cluster from the Kubernetes API with this kubeconfig.
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// Read peers directly from their stores: one etcd client-config YAML file per peer,
    /// named after it (kvstoremesh's format).
    #[arg(
        long,
        conflicts_with = "store_endpoints",
        required_unless_present = "store_endpoints"
    )]
    peers_dir: Option<PathBuf>,
    /// Read peers from kvstoremesh's cache in the local store at these endpoints.
    #[arg(long, value_delimiter = ',')]
    store_endpoints: Vec<String>,
    /// CA bundle of the local store's server certificate.
    #[arg(long, requires = "store_endpoints")]
    store_cacert: Option<PathBuf>,
    /// Client certificate for the local store (local-<cluster>).
    #[arg(long, requires_all = ["store_key", "store_cacert"])]
    store_cert: Option<PathBuf>,
    /// Client key for the local store.
    #[arg(long, requires = "store_cert")]
    store_key: Option<PathBuf>,
    /// Where the API listens (loopback: it is for the node's operator).
    #[arg(long, default_value = "127.0.0.1:9890")]
    api_listen: SocketAddr,
    /// Write the API's bound address to this file once it listens (with port 0).
    #[arg(long)]
    api_addr_file: Option<PathBuf>,
    /// Persist every cluster's last part here, so a restarted agent keeps its tables until
    /// each cluster has resynced.
    #[arg(long, default_value = "clustermesh-agent.state.json")]
    state_file: PathBuf,
    /// Persist nothing.
    #[arg(long)]
    no_state: bool,
    /// At most one state write per this interval.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    persist_interval: Duration,
    /// How long a peer may be lost (connection or heartbeat) before its backends are demoted.
    /// Short: demoted backends are still used when nothing healthier exists, so a lost peer
    /// costs failed connections until then, and a blip only moves traffic for a moment.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    grace: Duration,
    /// How long a peer's heartbeat may stay unchanged before it counts as lost.
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    heartbeat_timeout: Duration,
    /// Idle watches ask for progress this often (bounds how long a change waits for the
    /// other watched prefixes).
    #[arg(long, default_value = "200ms", value_parser = humantime::parse_duration)]
    watch_progress_interval: Duration,
    /// Direct reads: how often each peer's heartbeat and config are read.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    probe_interval: Duration,
    /// Direct reads: how long one such read may take (a partitioned peer is noticed within
    /// the interval plus this).
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    probe_timeout: Duration,
    /// Direct reads: how often the peers directory is read.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    peers_poll_interval: Duration,
    /// Timeout of one store request.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    request_timeout: Duration,
    /// First reconnect delay (doubles, with jitter).
    #[arg(long, default_value = "200ms", value_parser = humantime::parse_duration)]
    backoff_base: Duration,
    /// Longest reconnect delay.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    backoff_max: Duration,
    /// A peer no longer configured is forgotten after this long.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    forget_after: Duration,
    /// Whether namespaces without the clustermesh.cilium.io/global annotation are global.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    default_global_namespace: bool,
    /// Policy peer selectors without io.cilium.k8s.policy.cluster select the local cluster
    /// only (default: every cluster, as Cilium's classic behaviour).
    #[arg(long, default_value_t = false, action = clap::ArgAction::Set)]
    policy_default_local_cluster: bool,
    /// The datapath to program: `bpf` (eBPF; failing to load it is fatal), `none` (the
    /// control plane alone), or `auto`: eBPF when it loads, else none, saying why.
    #[arg(long, default_value = "auto")]
    datapath: agent::datapath::Mode,
    /// Where bpffs is mounted (mounted there when missing).
    #[arg(long, default_value = "/sys/fs/bpf")]
    bpffs: PathBuf,
    /// The directory under bpffs for this agent's pinned maps and links.
    #[arg(long, default_value = "clustermesh")]
    bpf_root: String,
    /// The cgroup v2 directory whose sockets the load balancer serves (default: the cgroup
    /// v2 root).
    #[arg(long)]
    cgroup: Option<PathBuf>,
    /// Service map capacity: frontends plus their backends.
    #[arg(long, default_value_t = MapSizes::default().services)]
    map_size_services: u32,
    /// Sockets the load balancer remembers (for getpeername, recvmsg and UDP).
    #[arg(long, default_value_t = MapSizes::default().sockets)]
    map_size_sockets: u32,
    /// ipcache capacity (prefixes).
    #[arg(long, default_value_t = MapSizes::default().ipcache)]
    map_size_ipcache: u32,
    /// Policy allow entries.
    #[arg(long, default_value_t = MapSizes::default().policy)]
    map_size_policy: u32,
    /// Default-deny (identity, direction) pairs.
    #[arg(long, default_value_t = MapSizes::default().enforcement)]
    map_size_enforcement: u32,
    /// Tracked connections.
    #[arg(long, default_value_t = MapSizes::default().conntrack)]
    map_size_conntrack: u32,
    /// Drop event ring buffer, bytes (a power of two ≥ 4096).
    #[arg(long, default_value_t = MapSizes::default().drops)]
    drop_ring_bytes: u32,
    /// Where endpoints registered by clustermesh-cni persist.
    #[arg(long, default_value = "clustermesh-agent.endpoints.json")]
    endpoints_file: PathBuf,
    /// How long shutdown waits for the parts to stop.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    shutdown_grace: Duration,
}

impl Args {
    fn config(self) -> anyhow::Result<AgentConfig> {
        let cluster = self.cluster.config(Capabilities::default())?;
        let sizes = MapSizes {
            services: self.map_size_services,
            sockets: self.map_size_sockets,
            ipcache: self.map_size_ipcache,
            policy: self.map_size_policy,
            enforcement: self.map_size_enforcement,
            conntrack: self.map_size_conntrack,
            drops: self.drop_ring_bytes,
        };
        if let Err(error) = sizes.validate() {
            let flag = match &error {
                DatapathError::Size { map, .. } => match *map {
                    "mesh_svc4" => "--map-size-services",
                    "mesh_sock4" => "--map-size-sockets",
                    "mesh_ipc4" => "--map-size-ipcache",
                    "mesh_policy" => "--map-size-policy",
                    "mesh_enforce" => "--map-size-enforcement",
                    "mesh_ct4" => "--map-size-conntrack",
                    _ => "--drop-ring-bytes",
                },
                _ => "--map-size-*",
            };
            bail!("{flag}: {error}");
        }
        if self.bpf_root.is_empty() || self.bpf_root.contains(['/', '.']) {
            bail!(
                "--bpf-root {:?}: one directory name without '/' or '.' (bpffs refuses dots)",
                self.bpf_root
            );
        }
        let cgroup = self.cgroup.unwrap_or_else(agent::datapath::default_cgroup);
        if self.datapath != Mode::None && !cgroup.join("cgroup.procs").exists() {
            bail!("--cgroup {}: not a cgroup v2 directory", cgroup.display());
        }
        let datapath = DatapathOptions {
            mode: self.datapath,
            bpf: DatapathConfig {
                bpffs: self.bpffs,
                root: self.bpf_root,
                sizes,
            },
            cgroup,
            endpoints_file: (!self.no_state).then_some(self.endpoints_file),
            max: cluster.max_connected_clusters,
        };
        let source = match (self.manifests, self.kubeconfig) {
            (Some(dir), _) => {
                if !dir.is_dir() {
                    bail!("--manifests {}: not a directory", dir.display());
                }
                LocalSource::Manifests(dir)
            }
            (None, kubeconfig) => LocalSource::Kubernetes { kubeconfig },
        };
        let peers = match self.peers_dir {
            Some(dir) => {
                if !dir.is_dir() {
                    bail!("--peers-dir {}: not a directory", dir.display());
                }
                PeerSource::Direct { peers_dir: dir }
            }
            None => {
                let mut client = ClientConfig::new(self.store_endpoints);
                client.request_timeout = self.request_timeout;
                if let Some(ca) = self.store_cacert {
                    client.tls = Some(TlsFiles {
                        ca,
                        cert: self.store_cert,
                        key: self.store_key,
                    });
                }
                client.validate().context("--store-endpoints")?;
                PeerSource::Cache(client)
            }
        };
        Ok(AgentConfig {
            cluster,
            node_name: self.node_name,
            source,
            peers,
            api_listen: self.api_listen,
            state_file: (!self.no_state).then_some(self.state_file),
            persist_interval: self.persist_interval,
            health: HealthConfig {
                grace: self.grace,
                heartbeat_timeout: self.heartbeat_timeout,
            },
            watch: WatchTiming {
                progress_interval: self.watch_progress_interval,
                probe_interval: self.probe_interval,
                probe_timeout: self.probe_timeout,
                peers_poll_interval: self.peers_poll_interval,
                request_timeout: self.request_timeout,
                backoff_base: self.backoff_base,
                backoff_max: self.backoff_max,
                ..WatchTiming::default()
            },
            default_global_namespace: self.default_global_namespace,
            policy: PolicyOptions {
                default_local_cluster: self.policy_default_local_cluster,
            },
            forget_after: self.forget_after,
            shutdown_grace: self.shutdown_grace,
            datapath,
        })
    }
}

/// What `main` runs: the agent, and where to write its API address once it listens.
#[derive(Debug)]
struct Launch {
    config: AgentConfig,
    api_addr_file: Option<PathBuf>,
}

fn launch(args: Args) -> anyhow::Result<Launch> {
    let api_addr_file = args.api_addr_file.clone();
    Ok(Launch {
        config: args.config()?,
        api_addr_file,
    })
}

fn main() -> ExitCode {
    daemon::main("clustermesh-agent", launch, run)
}

async fn run(launch: Launch, cancel: CancellationToken) -> anyhow::Result<()> {
    let running = agent::daemon::start(launch.config, cancel.clone()).await?;
    if let Some(path) = launch.api_addr_file
        && let Err(error) = std::fs::write(&path, running.api_addr.to_string())
    {
        cancel.cancel();
        running.wait().await;
        bail!("--api-addr-file {}: {error}", path.display());
    }
    cancel.cancelled().await;
    running.wait().await;
    Ok(())
}
