//! A dev environment: `up` builds every cluster of a topology on this machine, `apply` runs
//! workloads in it, `exec_command` enters a pod, `down` removes what the record names.
//!
//! Layout: one Linux bridge per environment is the underlay; the host holds the underlay's
//! first address on it. Per cluster, a `clustermesh-apiserver` hosting its embedded store
//! (mutual TLS with per-cluster users on the host's underlay address, certificates from the
//! caller's [`Certify`]) and a `kvstoremesh`, both in the host's network namespace. Per node,
//! a network namespace on the bridge (a veth pair) with its `clustermesh-agent`
//! (`--datapath bpf`, the node's own cgroup and bpffs root), and routes to
//! its cluster's other nodes' pod CIDRs (the agent routes the peers'). Pods are namespaces
//! attached by `clustermesh-cni` from their node's namespace, each running `mesh-echo serve`
//! in the node's cgroup.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::fs::File;
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use model::{AgentContext, ClusterContext};
use model::{DnsSubdomain, PeerFile};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::home::{HomeError, MeshHome};
use crate::manifests::{self, ManifestError, NodeView, Placement, PodPort, PodView, Protocol};
use crate::record::{Record, RecordError, Resource};
use crate::sys::{self, Started, SysError};
use crate::tls::{Certify, CertifyError, ClusterTls};
use crate::topology::{Topology, TopologyError};

/// Why a dev environment operation failed.
#[derive(Debug, thiserror::Error)]
pub enum DevError {
    /// The mesh home could not be found.
    #[error(transparent)]
    Home(#[from] HomeError),
    /// The topology file could not be read.
    #[error("topology file {path}: {source}")]
    TopologyFile {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The topology is refused.
    #[error(transparent)]
    Topology(#[from] TopologyError),
    /// The environment name is not a DNS subdomain.
    #[error("environment name {name:?}: {detail}")]
    BadName {
        /// The name.
        name: String,
        /// Why.
        detail: String,
    },
    /// `up` found the environment or its context already there.
    #[error("{what} already exists: run `clustermesh dev down --name {name}` first")]
    Exists {
        /// The environment's name.
        name: String,
        /// What exists.
        what: String,
    },
    /// No environment by that name.
    #[error("no dev environment {name} ({dir} does not exist)")]
    NoEnv {
        /// The name.
        name: String,
        /// Where its state would be.
        dir: PathBuf,
    },
    /// A resource the environment needs is taken by someone else.
    #[error("{0} (another environment, or something else on this machine, uses it)")]
    InUse(String),
    /// The operation needs the nodes' network namespaces and pods' processes, which an
    /// environment running the control plane alone does not have.
    #[error(
        "environment {env} runs the control plane alone (dev up --datapath none): {what} needs \
         the full environment (dev up as root, --datapath bpf)"
    )]
    ControlPlaneOnly {
        /// The environment.
        env: String,
        /// What was asked.
        what: String,
    },
    /// A prefix of the environment is not IPv4.
    #[error("{0}: environments are IPv4 only")]
    NotIpv4(model::IpPrefix),
    /// A workspace binary is missing.
    #[error("{0} not found (build the workspace: cargo build --workspace)")]
    MissingBinary(PathBuf),
    /// A host operation failed.
    #[error(transparent)]
    Sys(#[from] SysError),
    /// The record failed.
    #[error(transparent)]
    Record(#[from] RecordError),
    /// The applied manifests are refused.
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    /// A file of the environment could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The environment's state file does not parse.
    #[error("{path}: {source}")]
    State {
        /// The file.
        path: PathBuf,
        /// The parser's complaint.
        source: serde_json::Error,
    },
    /// Daemons did not become ready in time.
    #[error("not ready after {timeout:?}:\n{details}")]
    NotReady {
        /// How long `up` waited.
        timeout: Duration,
        /// Each daemon that is not ready, why, and the tail of its log.
        details: String,
    },
    /// No such cluster in the environment.
    #[error("no cluster {cluster} in environment {env} (clusters: {known})")]
    NoCluster {
        /// The environment.
        env: String,
        /// The cluster asked for.
        cluster: String,
        /// The clusters it has.
        known: String,
    },
    /// No such pod, or a name several namespaces hold.
    #[error("cluster {cluster}: {detail}")]
    Pod {
        /// The cluster.
        cluster: String,
        /// What is wrong.
        detail: String,
    },
    /// The CNI plugin refused to attach a pod.
    #[error("clustermesh-cni ADD for pod {pod}: {detail}")]
    Cni {
        /// The pod.
        pod: String,
        /// Its output.
        detail: String,
    },
    /// A service CIDR has no free address left.
    #[error("cluster {cluster}: service CIDR {cidr} is full")]
    ServiceCidrFull {
        /// The cluster.
        cluster: String,
        /// Its service CIDR.
        cidr: String,
    },
    /// `down` could not remove some resources.
    #[error("could not remove:\n{0}")]
    Teardown(String),
    /// A cluster's certificates could not be made.
    #[error("certificates of cluster {cluster}: {source}")]
    Certify {
        /// The cluster.
        cluster: String,
        /// Why.
        source: CertifyError,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> DevError + '_ {
    move |source| DevError::Io {
        path: path.to_owned(),
        source,
    }
}

/// The daemons and tools an environment runs.
#[derive(Clone, Debug)]
pub struct Binaries {
    /// `clustermesh-apiserver`.
    pub apiserver: PathBuf,
    /// `kvstoremesh`.
    pub kvstoremesh: PathBuf,
    /// `clustermesh-agent`.
    pub agent: PathBuf,
    /// `clustermesh-cni`.
    pub cni: PathBuf,
    /// `mesh-echo`.
    pub echo: PathBuf,
}

impl Binaries {
    /// The binaries in `dir` (where cargo builds them, beside `clustermesh`), each checked.
    pub fn in_dir(dir: &Path) -> Result<Binaries, DevError> {
        let find = |name: &str| {
            let path = dir.join(name);
            if path.is_file() {
                Ok(path)
            } else {
                Err(DevError::MissingBinary(path))
            }
        };
        Ok(Binaries {
            apiserver: find("clustermesh-apiserver")?,
            kvstoremesh: find("kvstoremesh")?,
            agent: find("clustermesh-agent")?,
            cni: find("clustermesh-cni")?,
            echo: find("mesh-echo")?,
        })
    }
}

/// Names of an environment's kernel objects, derived from its name so two environments never
/// share one (and a leak check knows what to look for).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Naming {
    tag: String,
    hash: String,
}

impl Naming {
    /// The names of environment `name`.
    pub fn new(name: &str) -> Naming {
        // FNV-1a: interface names have 15 bytes, so links carry a hash of the name.
        let hash = name.bytes().fold(0x811c_9dc5u32, |h, b| {
            (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
        });
        Naming {
            tag: name.replace('.', "-"),
            hash: format!("{:06x}", hash & 0xff_ffff),
        }
    }

    /// The prefix of every network namespace, cgroup and bpffs directory it makes.
    pub fn prefix(&self) -> String {
        format!("cmdev-{}-", self.tag)
    }

    /// The prefix of every host interface it makes (the bridge and the nodes' veths).
    pub fn link_prefix(&self) -> String {
        format!("cm{}", self.hash)
    }

    fn bridge(&self) -> String {
        format!("{}br", self.link_prefix())
    }

    pub(crate) fn node_link(&self, index: usize) -> String {
        format!("{}n{index}", self.link_prefix())
    }

    fn node(&self, node: &str) -> String {
        format!("{}{}", self.prefix(), node.replace('.', "-"))
    }

    pub(crate) fn daemons(&self) -> String {
        format!("{}daemons", self.prefix())
    }

    /// The cgroup (under the cgroup2 root) of `cluster`'s daemons: one per cluster, so a
    /// `cut` can tell the cluster's own sockets from everyone else's.
    pub(crate) fn cluster_daemons(&self, cluster: &str) -> String {
        format!("{}/{cluster}", self.daemons())
    }

    fn pod(&self, cluster: &str, namespace: &str, pod: &str) -> String {
        format!(
            "{}{cluster}-{namespace}-{}",
            self.prefix(),
            pod.replace('.', "-")
        )
    }
}

/// Where the BPF programs' maps and links are pinned.
const BPFFS: &str = "/sys/fs/bpf";
/// The port every agent's API listens on, at its node's underlay address.
pub const AGENT_PORT: u16 = 9890;

/// A node of the environment.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NodeState {
    /// Its name.
    pub name: String,
    /// Its underlay address.
    pub address: Ipv4Addr,
    /// Its pod CIDR.
    pub pod_cidr: model::IpPrefix,
    /// Its network namespace.
    pub netns: String,
    /// The cgroup of its pods (its agent's load balancer serves it).
    pub cgroup: PathBuf,
    /// Its agent's directory under bpffs.
    pub bpf_root: String,
    /// Its agent's API.
    pub agent_api: SocketAddr,
}

/// A running pod.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PodState {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// Its node.
    pub node: String,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// Its containers, as applied.
    pub containers: Value,
    /// The ports its echo server serves.
    pub ports: Vec<PodPort>,
    /// Its address, from the CNI plugin.
    pub ip: Ipv4Addr,
    /// Its network namespace.
    pub netns: String,
    /// The container id the CNI plugin knows it by.
    pub container_id: String,
    /// Its echo server.
    pub pid: i32,
    /// The echo server's start time.
    pub start_time: u64,
    /// Whether its server answered.
    pub ready: bool,
    /// The Deployment it belongs to.
    pub owner: Option<String>,
}

/// A cluster of the environment.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ClusterState {
    /// Its name.
    pub name: String,
    /// Its id.
    pub id: u16,
    /// Its service CIDR.
    pub service_cidr: model::IpPrefix,
    /// Its store, on the underlay.
    pub store: SocketAddr,
    /// The apiserver's health server.
    pub apiserver_health: SocketAddr,
    /// kvstoremesh's health server.
    pub kvstoremesh_health: SocketAddr,
    /// Its nodes.
    pub nodes: Vec<NodeState>,
    /// Its pods.
    pub pods: Vec<PodState>,
    /// Namespaces, Services and policies as applied.
    pub objects: Vec<Value>,
    /// Services' cluster IPs, by `namespace/name`.
    pub cluster_ips: BTreeMap<String, Ipv4Addr>,
}

impl ClusterState {
    /// The pod named `pod` (`namespace/name`, or a name only one namespace holds).
    pub fn pod(&self, pod: &str) -> Result<&PodState, DevError> {
        let found: Vec<&PodState> = match pod.split_once('/') {
            Some((ns, name)) => self
                .pods
                .iter()
                .filter(|p| p.namespace == ns && p.name == name)
                .collect(),
            None => self.pods.iter().filter(|p| p.name == pod).collect(),
        };
        match found.as_slice() {
            [one] => Ok(one),
            [] => Err(DevError::Pod {
                cluster: self.name.clone(),
                detail: format!("no pod {pod}"),
            }),
            _ => Err(DevError::Pod {
                cluster: self.name.clone(),
                detail: format!("pod {pod} exists in several namespaces: name it namespace/{pod}"),
            }),
        }
    }

    /// The node named `name`.
    pub fn node(&self, name: &str) -> Option<&NodeState> {
        self.nodes.iter().find(|n| n.name == name)
    }

    fn manifests_file(&self, env_dir: &Path) -> PathBuf {
        cluster_dir(env_dir, &self.name)
            .join("manifests")
            .join("cluster.yaml")
    }
}

/// What an environment is, as `up` and `apply` leave it (`env.json`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EnvState {
    /// Its name.
    pub name: String,
    /// The host's address on the underlay.
    pub host_address: Ipv4Addr,
    /// Its clusters.
    pub clusters: Vec<ClusterState>,
    /// The agents' `--grace` in milliseconds, when `up` was asked for one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_grace_ms: Option<u64>,
    /// What the nodes run.
    #[serde(default)]
    pub datapath: DevDatapath,
}

/// What an environment's nodes run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DevDatapath {
    /// The whole thing (root): nodes as network namespaces on a bridge, agents programming
    /// eBPF, pods as namespaces running echo servers.
    #[default]
    Bpf,
    /// The control plane alone, on loopback, for a machine without root or eBPF: the same
    /// apiservers, stores, kvstoremeshes and agents (`--datapath none`), pods as manifest
    /// entries with addresses from their node's pod CIDR but no process. The agents' tables
    /// show what would be programmed; nothing carries traffic.
    None,
}

impl std::str::FromStr for DevDatapath {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "bpf" => Ok(DevDatapath::Bpf),
            "none" => Ok(DevDatapath::None),
            other => Err(format!("{other:?}: expected bpf or none")),
        }
    }
}

impl fmt::Display for DevDatapath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DevDatapath::Bpf => "bpf",
            DevDatapath::None => "none",
        })
    }
}

fn cluster_dir(env_dir: &Path, cluster: &str) -> PathBuf {
    env_dir.join("clusters").join(cluster)
}

/// How to bring an environment up.
#[derive(Clone, Debug)]
pub struct UpOptions {
    /// The topology file.
    pub topology: PathBuf,
    /// The environment's name; the topology file's stem by default.
    pub name: Option<String>,
    /// How long every daemon may take to become ready.
    pub ready_timeout: Duration,
    /// The agents' withdrawal grace (`clustermesh-agent --grace`); theirs by default.
    pub agent_grace: Option<Duration>,
    /// What the nodes run.
    pub datapath: DevDatapath,
}

impl UpOptions {
    /// The environment's name: `name`, else the topology file's stem.
    pub fn env_name(&self) -> String {
        match &self.name {
            Some(name) => name.clone(),
            None => self
                .topology
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default(),
        }
    }
}

/// A dev environment.
#[derive(Debug)]
pub struct Env {
    home: MeshHome,
    pub(crate) dir: PathBuf,
    pub(crate) record: Record,
    pub(crate) state: EnvState,
}

fn free_port(ip: Ipv4Addr) -> Result<SocketAddr, DevError> {
    let listener = TcpListener::bind((ip, 0))
        .map_err(|e| DevError::InUse(format!("no free port on {ip}: {e}")))?;
    listener
        .local_addr()
        .map_err(|e| DevError::InUse(format!("no free port on {ip}: {e}")))
}

/// The IPv4 network of `prefix`: environments are IPv4 only (topologies are checked when
/// parsed; a hand-edited `env.json` is refused here).
fn v4(prefix: &model::IpPrefix) -> Result<Ipv4Addr, DevError> {
    match prefix.addr() {
        std::net::IpAddr::V4(a) => Ok(a),
        std::net::IpAddr::V6(_) => Err(DevError::NotIpv4(*prefix)),
    }
}

/// The host addresses overlapping `base/len`, as `interface address/len`.
fn addresses_within(base: Ipv4Addr, len: u8) -> Result<Vec<String>, DevError> {
    let out = sys::ip(["-j", "-4", "addr", "show"])?;
    let links: Vec<Value> = serde_json::from_str(&out).unwrap_or_default();
    let mask = |l: u8| {
        if l == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(l))
        }
    };
    let mut found = Vec::new();
    for link in &links {
        for addr in link["addr_info"].as_array().into_iter().flatten() {
            let (Some(local), Some(plen)) = (
                addr["local"]
                    .as_str()
                    .and_then(|a| a.parse::<Ipv4Addr>().ok()),
                addr["prefixlen"]
                    .as_u64()
                    .and_then(|l| u8::try_from(l).ok()),
            ) else {
                continue;
            };
            let m = mask(len.min(plen));
            if u32::from(local) & m == u32::from(base) & m {
                found.push(format!(
                    "{} {local}/{plen}",
                    link["ifname"].as_str().unwrap_or("?")
                ));
            }
        }
    }
    Ok(found)
}

impl Env {
    /// Brings up every cluster of the topology, its stores secured with the certificates
    /// `certify` makes, and waits until every daemon is ready. The clusters are not
    /// connected: that is `clustermesh connect`'s job. Everything made is recorded first; on
    /// failure the environment stays (logs included) for `down`.
    pub fn up(
        home: &MeshHome,
        bins: &Binaries,
        options: &UpOptions,
        certify: &dyn Certify,
    ) -> Result<Env, DevError> {
        let text = std::fs::read_to_string(&options.topology).map_err(|source| {
            DevError::TopologyFile {
                path: options.topology.clone(),
                source,
            }
        })?;
        let topology = Topology::parse(&text)?;
        let name = options.env_name();
        if let Err(e) = DnsSubdomain::new(&name) {
            return Err(DevError::BadName {
                name,
                detail: e.to_string(),
            });
        }
        let dir = home.env_dir(&name);
        let contexts = home.context_dir(&name);
        for (what, path) in [("environment", &dir), ("mesh context", &contexts)] {
            if path.exists() {
                return Err(DevError::Exists {
                    what: format!("{what} {name} ({})", path.display()),
                    name,
                });
            }
        }
        let naming = Naming::new(&name);
        let full = options.datapath == DevDatapath::Bpf;
        for (node_index, node) in topology
            .clusters
            .iter()
            .flat_map(|c| &c.nodes)
            .enumerate()
            .filter(|_| full)
        {
            let netns = naming.node(node.name.as_str());
            if sys::netns_exists(&netns) {
                return Err(DevError::InUse(format!("network namespace {netns} exists")));
            }
            let link = naming.node_link(node_index);
            if sys::link_exists(&link) {
                return Err(DevError::InUse(format!("interface {link} exists")));
            }
        }
        if full && sys::link_exists(&naming.bridge()) {
            return Err(DevError::InUse(format!(
                "interface {} exists",
                naming.bridge()
            )));
        }
        let underlay = v4(&topology.underlay)?;
        let taken = if full {
            addresses_within(underlay, topology.underlay.prefix_len())?
        } else {
            Vec::new()
        };
        if !taken.is_empty() {
            return Err(DevError::InUse(format!(
                "underlay {}: already in use by {}",
                topology.underlay,
                taken.join(", ")
            )));
        }

        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        let record = Record::at(dir.join("record.jsonl"));
        record.add(&Resource::Dir { path: dir.clone() })?;
        let host_address = if full {
            Ipv4Addr::from(u32::from(underlay) + 1)
        } else {
            Ipv4Addr::LOCALHOST
        };
        let mut env = Env {
            home: home.clone(),
            dir,
            record,
            state: EnvState {
                name: name.clone(),
                host_address,
                clusters: Vec::new(),
                agent_grace_ms: options
                    .agent_grace
                    .map(|g| u64::try_from(g.as_millis()).unwrap_or(u64::MAX)),
                datapath: options.datapath,
            },
        };
        env.build(bins, &topology, &naming, certify)?;
        env.wait_ready(options.ready_timeout)?;
        tracing::info!(env = %name, "ready");
        Ok(env)
    }

    fn mkdir(&self, path: &Path) -> Result<(), DevError> {
        std::fs::create_dir_all(path).map_err(io(path))
    }

    /// Records and makes a cgroup.
    fn make_cgroup(&self, path: &Path) -> Result<(), DevError> {
        self.record.add(&Resource::Cgroup {
            path: path.to_owned(),
        })?;
        std::fs::create_dir(path).map_err(io(path))
    }

    fn build(
        &mut self,
        bins: &Binaries,
        topology: &Topology,
        naming: &Naming,
        certify: &dyn Certify,
    ) -> Result<(), DevError> {
        let name = self.state.name.clone();
        let logs = self.dir.join("logs");
        self.mkdir(&logs)?;
        let contexts = self.home.context_dir(&name);
        self.record.add(&Resource::Dir {
            path: contexts.clone(),
        })?;
        self.mkdir(&contexts)?;

        let full = self.state.datapath == DevDatapath::Bpf;
        // The underlay: a bridge with the host's address.
        let bridge = naming.bridge();
        let len = topology.underlay.prefix_len();
        let cgroup_root = sys::cgroup2_root();
        if full {
            self.record.add(&Resource::Link {
                name: bridge.clone(),
            })?;
            sys::ip(["link", "add", "name", &bridge, "type", "bridge"])?;
            sys::ip([
                "addr",
                "add",
                &format!("{}/{len}", self.state.host_address),
                "dev",
                &bridge,
            ])?;
            sys::ip(["link", "set", &bridge, "up"])?;
            self.make_cgroup(&cgroup_root.join(naming.daemons()))?;
        }

        // Every cluster's addresses first.
        for cluster in &topology.clusters {
            let host = self.state.host_address;
            let loopback = Ipv4Addr::LOCALHOST;
            self.state.clusters.push(ClusterState {
                name: cluster.name.to_string(),
                id: cluster.id.get(),
                service_cidr: cluster.service_cidr,
                store: free_port(host)?,
                apiserver_health: free_port(loopback)?,
                kvstoremesh_health: free_port(loopback)?,
                nodes: Vec::new(),
                pods: Vec::new(),
                objects: Vec::new(),
                cluster_ips: BTreeMap::new(),
            });
        }
        let max = topology.max_connected_clusters.value().to_string();
        let mut node_index = 0;
        for (ci, spec) in topology.clusters.iter().enumerate() {
            let cdir = cluster_dir(&self.dir, spec.name.as_str());
            for sub in ["manifests", "peers", "data", "certs"] {
                self.mkdir(&cdir.join(sub))?;
            }
            for node in &spec.nodes {
                let node_name = node.name.to_string();
                let agent_api = if full {
                    SocketAddr::from((node.address, AGENT_PORT))
                } else {
                    free_port(Ipv4Addr::LOCALHOST)?
                };
                self.state.clusters[ci].nodes.push(NodeState {
                    netns: naming.node(&node_name),
                    cgroup: cgroup_root.join(naming.node(&node_name)),
                    bpf_root: naming.node(&node_name),
                    agent_api,
                    address: node.address,
                    pod_cidr: node.pod_cidr,
                    name: node_name,
                });
            }
            self.write_manifests(ci)?;
            let cluster = self.state.clusters[ci].clone();
            let daemons = if full {
                let path = cgroup_root.join(naming.cluster_daemons(&cluster.name));
                self.make_cgroup(&path)?;
                Some(path)
            } else {
                None
            };
            let tls = self.write_context(&cluster, topology, certify)?;
            let store_url = format!("https://{}", cluster.store);
            let id = cluster.id.to_string();
            let mut apiserver = sys::command_in(None, daemons.as_deref(), &bins.apiserver);
            apiserver
                .args(["--cluster-name", &cluster.name, "--cluster-id", &id])
                .args(["--max-connected-clusters", &max, "--manifests"])
                .arg(cdir.join("manifests"))
                .args(["--store-listen", &cluster.store.to_string(), "--data-dir"])
                .arg(cdir.join("data"))
                .args(["--health-listen", &cluster.apiserver_health.to_string()])
                .arg("--store-cert")
                .arg(&tls.server.cert)
                .arg("--store-key")
                .arg(&tls.server.key)
                .arg("--store-cacert")
                .arg(&tls.client_ca)
                .arg("--admin-cert")
                .arg(&tls.admin.cert)
                .arg("--admin-key")
                .arg(&tls.admin.key);
            self.start(
                format!("{}/apiserver", cluster.name),
                apiserver,
                &logs.join(format!("{}-apiserver.log", cluster.name)),
            )?;
            let mut kvstoremesh = sys::command_in(None, daemons.as_deref(), &bins.kvstoremesh);
            kvstoremesh
                .args(["--cluster-name", &cluster.name, "--cluster-id", &id])
                .args(["--max-connected-clusters", &max, "--peers-dir"])
                .arg(cdir.join("peers"))
                .args(["--store-endpoints", &store_url, "--store-cacert"])
                .arg(&tls.server_ca)
                .arg("--store-cert")
                .arg(&tls.admin.cert)
                .arg("--store-key")
                .arg(&tls.admin.key)
                .args(["--health-listen", &cluster.kvstoremesh_health.to_string()]);
            self.start(
                format!("{}/kvstoremesh", cluster.name),
                kvstoremesh,
                &logs.join(format!("{}-kvstoremesh.log", cluster.name)),
            )?;

            for node in &cluster.nodes {
                let link = naming.node_link(node_index);
                node_index += 1;
                let ndir = self.dir.join("nodes").join(&node.name);
                self.mkdir(&ndir)?;
                let netns = full.then_some(node.netns.as_str());
                let mut agent = sys::command_in(netns, daemons.as_deref(), &bins.agent);
                agent
                    .args(["--cluster-name", &cluster.name, "--cluster-id", &id])
                    .args(["--max-connected-clusters", &max, "--node-name", &node.name])
                    .arg("--manifests")
                    .arg(cdir.join("manifests"))
                    .args(["--store-endpoints", &store_url, "--store-cacert"])
                    .arg(&tls.server_ca)
                    .arg("--store-cert")
                    .arg(&tls.local.cert)
                    .arg("--store-key")
                    .arg(&tls.local.key)
                    .args(["--api-listen", &node.agent_api.to_string(), "--state-file"])
                    .arg(ndir.join("agent.state.json"))
                    .arg("--endpoints-file")
                    .arg(ndir.join("agent.endpoints.json"));
                if full {
                    self.node_network(node, &link, &bridge, len, &cluster)?;
                    self.make_cgroup(&node.cgroup)?;
                    self.record.add(&Resource::BpfRoot {
                        path: Path::new(BPFFS).join(&node.bpf_root),
                    })?;
                    agent
                        .args(["--datapath", "bpf", "--bpffs", BPFFS])
                        .args(["--bpf-root", &node.bpf_root, "--cgroup"])
                        .arg(&node.cgroup);
                } else {
                    agent.args(["--datapath", "none"]);
                }
                if let Some(ms) = self.state.agent_grace_ms {
                    agent.args(["--grace", &format!("{ms}ms")]);
                }
                self.start(
                    format!("{}/agent", node.name),
                    agent,
                    &logs.join(format!("{}-agent.log", node.name)),
                )?;
            }
        }
        self.save()?;
        let current = self.home.current_context_file();
        let content = format!("{name}\n");
        self.record.add(&Resource::File {
            path: current.clone(),
            content: content.clone(),
        })?;
        std::fs::write(&current, content).map_err(io(&current))
    }

    /// The node's namespace on the bridge, with routes to its cluster's other nodes' pods.
    fn node_network(
        &self,
        node: &NodeState,
        link: &str,
        bridge: &str,
        len: u8,
        cluster: &ClusterState,
    ) -> Result<(), DevError> {
        let ns = node.netns.as_str();
        self.record.add(&Resource::Netns {
            name: ns.to_owned(),
        })?;
        sys::ip(["netns", "add", ns])?;
        sys::ip(["-n", ns, "link", "set", "lo", "up"])?;
        self.record.add(&Resource::Link {
            name: link.to_owned(),
        })?;
        sys::ip([
            "link", "add", link, "type", "veth", "peer", "name", "eth0", "netns", ns,
        ])?;
        sys::ip(["link", "set", link, "master", bridge, "up"])?;
        sys::ip([
            "-n",
            ns,
            "addr",
            "add",
            &format!("{}/{len}", node.address),
            "dev",
            "eth0",
        ])?;
        sys::ip(["-n", ns, "link", "set", "eth0", "up"])?;
        for other in cluster.nodes.iter().filter(|n| n.name != node.name) {
            sys::ip([
                "-n",
                ns,
                "route",
                "add",
                &other.pod_cidr.to_string(),
                "via",
                &other.address.to_string(),
            ])?;
        }
        Ok(())
    }

    /// Writes the cluster's context, its store reached as `admin-<cluster>` with the
    /// certificates `certify` made for it (from the context, before any daemon starts).
    fn write_context(
        &self,
        cluster: &ClusterState,
        topology: &Topology,
        certify: &dyn Certify,
    ) -> Result<ClusterTls, DevError> {
        let spec = topology
            .cluster(&cluster.name)
            .expect("the state's clusters come from the topology");
        let cdir = cluster_dir(&self.dir, &cluster.name);
        let mut context = ClusterContext {
            name: spec.name.clone(),
            id: spec.id,
            max_connected_clusters: topology.max_connected_clusters,
            store: PeerFile {
                endpoints: vec![format!("https://{}", cluster.store)],
                ..PeerFile::default()
            },
            peer_endpoints: Vec::new(),
            apiserver: format!("http://{}", cluster.apiserver_health),
            kvstoremesh: Some(format!("http://{}", cluster.kvstoremesh_health)),
            peers_dir: cdir.join("peers"),
            certs_dir: cdir.join("certs"),
            agents: spec
                .nodes
                .iter()
                .zip(&cluster.nodes)
                .map(|(n, state)| AgentContext {
                    node: n.name.clone(),
                    api: format!("http://{}", state.agent_api),
                })
                .collect(),
            unknown_keys: Vec::new(),
        };
        let tls = certify
            .certify(&context)
            .map_err(|source| DevError::Certify {
                cluster: cluster.name.clone(),
                source,
            })?;
        context.store.trusted_ca_file = Some(tls.server_ca.clone());
        context.store.cert_file = Some(tls.admin.cert.clone());
        context.store.key_file = Some(tls.admin.key.clone());
        let path = self
            .home
            .context_dir(&self.state.name)
            .join(format!("{}.yaml", cluster.name));
        std::fs::write(&path, context.to_yaml()).map_err(io(&path))?;
        Ok(tls)
    }

    /// Starts a detached process and records it (its cgroup, recorded before, holds it from
    /// its first instruction, so a crash in between leaks nothing).
    pub(crate) fn start(
        &self,
        what: String,
        command: Command,
        log: &Path,
    ) -> Result<Started, DevError> {
        let started = sys::spawn_detached(command, log)?;
        self.record.add(&Resource::Process {
            what: what.clone(),
            pid: started.pid,
            start_time: started.start_time,
        })?;
        tracing::info!(%what, pid = started.pid, log = %log.display(), "started");
        Ok(started)
    }

    /// Waits until every daemon's `/readyz` answers 200.
    pub(crate) fn wait_ready(&self, timeout: Duration) -> Result<(), DevError> {
        let logs = self.dir.join("logs");
        let mut pending: Vec<(String, SocketAddr, PathBuf)> = Vec::new();
        for c in &self.state.clusters {
            pending.push((
                format!(
                    "cluster {}: clustermesh-apiserver (http://{}/readyz)",
                    c.name, c.apiserver_health
                ),
                c.apiserver_health,
                logs.join(format!("{}-apiserver.log", c.name)),
            ));
            pending.push((
                format!(
                    "cluster {}: kvstoremesh (http://{}/readyz)",
                    c.name, c.kvstoremesh_health
                ),
                c.kvstoremesh_health,
                logs.join(format!("{}-kvstoremesh.log", c.name)),
            ));
            for n in &c.nodes {
                pending.push((
                    format!(
                        "node {}: clustermesh-agent (http://{}/readyz)",
                        n.name, n.agent_api
                    ),
                    n.agent_api,
                    logs.join(format!("{}-agent.log", n.name)),
                ));
            }
        }
        let deadline = Instant::now() + timeout;
        let mut why: BTreeMap<String, String> = BTreeMap::new();
        while !pending.is_empty() {
            pending.retain(|(what, addr, _)| {
                match sys::http_get(*addr, "/readyz", Duration::from_secs(1)) {
                    Ok((200, _)) => {
                        tracing::info!(%what, "ready");
                        false
                    }
                    Ok((code, body)) => {
                        why.insert(what.clone(), format!("{code}: {}", body.trim()));
                        true
                    }
                    Err(e) => {
                        why.insert(what.clone(), e);
                        true
                    }
                }
            });
            if pending.is_empty() {
                break;
            }
            if Instant::now() >= deadline {
                let details = pending
                    .iter()
                    .map(|(what, _, log)| {
                        format!(
                            "- {what}: {}\n  {} ends with:\n{}",
                            why.get(what).map_or("no answer", String::as_str),
                            log.display(),
                            sys::log_tail(log, 5)
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n");
                return Err(DevError::NotReady { timeout, details });
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(())
    }

    /// Opens environment `name` as `up` and `apply` left it.
    pub fn open(home: &MeshHome, name: &str) -> Result<Env, DevError> {
        let dir = home.env_dir(name);
        let path = dir.join("env.json");
        if !dir.is_dir() {
            return Err(DevError::NoEnv {
                name: name.to_owned(),
                dir,
            });
        }
        let text = std::fs::read(&path).map_err(io(&path))?;
        let state = serde_json::from_slice(&text).map_err(|source| DevError::State {
            path: path.clone(),
            source,
        })?;
        Ok(Env {
            home: home.clone(),
            record: Record::at(dir.join("record.jsonl")),
            dir,
            state,
        })
    }

    /// Its state.
    pub fn state(&self) -> &EnvState {
        &self.state
    }

    /// Its state directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The cluster named `name`.
    pub fn cluster(&self, name: &str) -> Result<&ClusterState, DevError> {
        self.state
            .clusters
            .iter()
            .find(|c| c.name == name)
            .ok_or_else(|| DevError::NoCluster {
                env: self.state.name.clone(),
                cluster: name.to_owned(),
                known: self
                    .state
                    .clusters
                    .iter()
                    .map(|c| c.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }

    fn cluster_index(&self, name: &str) -> Result<usize, DevError> {
        self.cluster(name)?;
        Ok(self
            .state
            .clusters
            .iter()
            .position(|c| c.name == name)
            .expect("found above"))
    }

    pub(crate) fn save(&self) -> Result<(), DevError> {
        let path = self.dir.join("env.json");
        let tmp = self.dir.join(".env.json.tmp");
        let text = serde_json::to_vec_pretty(&self.state).expect("state always serializes");
        std::fs::write(&tmp, text).map_err(io(&tmp))?;
        std::fs::rename(&tmp, &path).map_err(io(&path))
    }

    /// Rewrites cluster `index`'s manifests, atomically.
    fn write_manifests(&self, index: usize) -> Result<(), DevError> {
        let cluster = &self.state.clusters[index];
        let nodes: Vec<NodeView<'_>> = cluster
            .nodes
            .iter()
            .map(|n| NodeView {
                name: &n.name,
                pod_cidr: n.pod_cidr.to_string(),
                address: n.address,
            })
            .collect();
        let pods: Vec<PodView<'_>> = cluster
            .pods
            .iter()
            .map(|p| PodView {
                namespace: &p.namespace,
                name: &p.name,
                labels: &p.labels,
                containers: &p.containers,
                ports: &p.ports,
                node: &p.node,
                host_ip: cluster
                    .node(&p.node)
                    .map_or(Ipv4Addr::UNSPECIFIED, |n| n.address),
                ip: p.ip,
                ready: p.ready,
            })
            .collect();
        let docs = manifests::render(&nodes, &pods, &cluster.objects, &cluster.cluster_ips);
        let mut text = String::new();
        for doc in &docs {
            text.push_str("---\n");
            text.push_str(&serde_yaml_ng::to_string(doc).expect("JSON values always serialize"));
        }
        let path = cluster.manifests_file(&self.dir);
        let tmp = path.with_file_name(".cluster.yaml.tmp");
        std::fs::write(&tmp, text).map_err(io(&tmp))?;
        std::fs::rename(&tmp, &path).map_err(io(&path))
    }

    /// Applies manifests to cluster `cluster`: objects are added or replaced, new pods are
    /// attached and started (their ports are fixed at creation; a pod that exists keeps
    /// running with its new labels), a Deployment's pods beyond its replicas go. The pods and
    /// objects it changed, as `Kind namespace/name` lines.
    pub fn apply(
        &mut self,
        bins: &Binaries,
        cluster: &str,
        text: &str,
    ) -> Result<Vec<String>, DevError> {
        let applied = manifests::parse_apply(text)?;
        let ci = self.cluster_index(cluster)?;
        let _lock = self.lock()?;
        let mut changed = Vec::new();
        for object in applied.objects {
            let key = manifests::object_key(&object);
            if key.0 == "Service" {
                self.assign_cluster_ip(ci, &object, &key)?;
            }
            changed.push(match key.1.as_str() {
                "" => format!("{} {}", key.0, key.2),
                namespace => format!("{} {namespace}/{}", key.0, key.2),
            });
            let objects = &mut self.state.clusters[ci].objects;
            match objects.iter_mut().find(|o| manifests::object_key(o) == key) {
                Some(old) => *old = object,
                None => objects.push(object),
            }
        }
        for ((namespace, deployment), keep) in &applied.deployments {
            let gone: Vec<PodState> = self.state.clusters[ci]
                .pods
                .iter()
                .filter(|p| {
                    &p.namespace == namespace
                        && p.owner.as_ref() == Some(deployment)
                        && !keep.contains(&p.name)
                })
                .cloned()
                .collect();
            for pod in gone {
                self.delete_pod(bins, ci, &pod)?;
                changed.push(format!("Pod {}/{} (deleted)", pod.namespace, pod.name));
            }
        }
        for template in applied.pods {
            changed.push(format!("Pod {}/{}", template.namespace, template.name));
            let pods = &mut self.state.clusters[ci].pods;
            if let Some(pod) = pods
                .iter_mut()
                .find(|p| p.namespace == template.namespace && p.name == template.name)
            {
                pod.labels = template.labels;
                pod.containers = template.containers;
                continue;
            }
            let node = self.place(ci, &template.placement)?;
            let pod = match self.state.datapath {
                DevDatapath::Bpf => self.create_pod(bins, ci, &node, template)?,
                DevDatapath::None => self.manifest_pod(ci, &node, template)?,
            };
            self.state.clusters[ci].pods.push(pod);
            self.save()?;
            self.write_manifests(ci)?;
        }
        self.save()?;
        self.write_manifests(ci)?;
        Ok(changed)
    }

    pub(crate) fn lock(&self) -> Result<File, DevError> {
        let path = self.dir.join("lock");
        let file = File::create(&path).map_err(io(&path))?;
        file.lock().map_err(io(&path))?;
        Ok(file)
    }

    fn assign_cluster_ip(
        &mut self,
        ci: usize,
        object: &Value,
        key: &(String, String, String),
    ) -> Result<(), DevError> {
        let cluster = &mut self.state.clusters[ci];
        let id = format!("{}/{}", key.1, key.2);
        let requested = object["spec"]["clusterIP"]
            .as_str()
            .and_then(|ip| ip.parse::<Ipv4Addr>().ok());
        let used: BTreeSet<Ipv4Addr> = cluster
            .cluster_ips
            .iter()
            .filter(|(k, _)| **k != id)
            .map(|(_, ip)| *ip)
            .collect();
        let ip = match requested.filter(|ip| !used.contains(ip)) {
            Some(ip) => ip,
            None => match cluster.cluster_ips.get(&id) {
                Some(ip) => *ip,
                None => {
                    let cidr = cluster.service_cidr;
                    manifests::allocate_ip(v4(&cidr)?, cidr.prefix_len(), &used).ok_or_else(
                        || DevError::ServiceCidrFull {
                            cluster: cluster.name.clone(),
                            cidr: cidr.to_string(),
                        },
                    )?
                }
            },
        };
        cluster.cluster_ips.insert(id, ip);
        Ok(())
    }

    fn place(&self, ci: usize, placement: &Placement) -> Result<NodeState, DevError> {
        let cluster = &self.state.clusters[ci];
        let node = match placement {
            Placement::Node(name) => cluster.node(name).ok_or_else(|| DevError::Pod {
                cluster: cluster.name.clone(),
                detail: format!("spec.nodeName {name}: no such node"),
            })?,
            Placement::Replica(i) => &cluster.nodes[i % cluster.nodes.len()],
            Placement::Any => cluster
                .nodes
                .iter()
                .min_by_key(|n| cluster.pods.iter().filter(|p| p.node == n.name).count())
                .expect("clusters have nodes"),
        };
        Ok(node.clone())
    }

    /// A pod of an environment without a datapath: an address from its node's pod CIDR (the
    /// lowest one no pod of the cluster holds), ready, and no process, netns or container.
    fn manifest_pod(
        &self,
        ci: usize,
        node: &NodeState,
        template: manifests::PodTemplate,
    ) -> Result<PodState, DevError> {
        let cluster = &self.state.clusters[ci];
        let used: BTreeSet<Ipv4Addr> = cluster.pods.iter().map(|p| p.ip).collect();
        let cidr = node.pod_cidr;
        let ip = manifests::allocate_ip(v4(&cidr)?, cidr.prefix_len(), &used).ok_or_else(|| {
            DevError::Pod {
                cluster: cluster.name.clone(),
                detail: format!(
                    "pod {}: node {}'s pod CIDR {} is full",
                    template.name, node.name, node.pod_cidr
                ),
            }
        })?;
        Ok(PodState {
            namespace: template.namespace,
            name: template.name,
            node: node.name.clone(),
            labels: template.labels,
            containers: template.containers,
            ports: template.ports,
            ip,
            netns: String::new(),
            container_id: String::new(),
            pid: 0,
            start_time: 0,
            ready: true,
            owner: template.owner,
        })
    }

    /// Refuses what needs the nodes' namespaces and the pods' processes.
    pub(crate) fn require_datapath(&self, what: &str) -> Result<(), DevError> {
        match self.state.datapath {
            DevDatapath::Bpf => Ok(()),
            DevDatapath::None => Err(DevError::ControlPlaneOnly {
                env: self.state.name.clone(),
                what: what.to_owned(),
            }),
        }
    }

    fn cni_config(&self, cluster: &str, node: &NodeState) -> String {
        serde_json::json!({"cniVersion": "1.0.0", "name": format!("mesh-{cluster}"),
            "type": "clustermesh-cni", "podCIDR": node.pod_cidr.to_string(),
            "agent": node.agent_api.to_string(),
            "dataDir": self.dir.join("nodes").join(&node.name).join("cni")})
        .to_string()
    }

    fn cni(
        &self,
        bins: &Binaries,
        command: &str,
        cluster: &str,
        node: &NodeState,
        pod: (&str, &str, &str, Option<&str>),
    ) -> Result<Value, DevError> {
        let (namespace, name, container, netns) = pod;
        let mut cni = sys::command_in(Some(&node.netns), None, &bins.cni);
        cni.env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", container)
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", "/nonexistent")
            .env(
                "CNI_ARGS",
                format!("K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={name}"),
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(netns) = netns {
            cni.env("CNI_NETNS", sys::netns_path(netns));
        }
        let failed = |detail: String| DevError::Cni {
            pod: format!("{namespace}/{name}"),
            detail,
        };
        let mut child = cni.spawn().map_err(|e| failed(e.to_string()))?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(self.cni_config(cluster, node).as_bytes())
                .map_err(|e| failed(e.to_string()))?;
        }
        let out = child
            .wait_with_output()
            .map_err(|e| failed(e.to_string()))?;
        if !out.status.success() {
            return Err(failed(format!(
                "{}: {} {}",
                out.status,
                String::from_utf8_lossy(&out.stdout).trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(serde_json::from_slice(&out.stdout).unwrap_or(Value::Null))
    }

    fn create_pod(
        &self,
        bins: &Binaries,
        ci: usize,
        node: &NodeState,
        template: manifests::PodTemplate,
    ) -> Result<PodState, DevError> {
        let cluster = &self.state.clusters[ci].name;
        let netns = Naming::new(&self.state.name).pod(cluster, &template.namespace, &template.name);
        if sys::netns_exists(&netns) {
            return Err(DevError::InUse(format!("network namespace {netns} exists")));
        }
        self.record.add(&Resource::Netns {
            name: netns.clone(),
        })?;
        sys::ip(["netns", "add", &netns])?;
        let container_id = format!("{cluster}-{}-{}", template.namespace, template.name);
        let (namespace, name) = (template.namespace.clone(), template.name.clone());
        let made = self.start_pod(bins, cluster, node, template, &netns, &container_id);
        if made.is_err() {
            // Leave nothing half made: the address goes back, the namespace and whatever
            // runs in it go.
            let _ = self.cni(
                bins,
                "DEL",
                cluster,
                node,
                (&namespace, &name, &container_id, None),
            );
            crate::record::teardown(&[Resource::Netns { name: netns }]);
        }
        made
    }

    /// Attaches pod namespace `netns` with the CNI plugin and starts its echo server.
    fn start_pod(
        &self,
        bins: &Binaries,
        cluster: &str,
        node: &NodeState,
        template: manifests::PodTemplate,
        netns: &str,
        container_id: &str,
    ) -> Result<PodState, DevError> {
        let result = self.cni(
            bins,
            "ADD",
            cluster,
            node,
            (
                &template.namespace,
                &template.name,
                container_id,
                Some(netns),
            ),
        )?;
        let ip = result["ips"][0]["address"]
            .as_str()
            .and_then(|a| a.split('/').next())
            .and_then(|a| a.parse::<Ipv4Addr>().ok())
            .ok_or_else(|| DevError::Cni {
                pod: format!("{}/{}", template.namespace, template.name),
                detail: format!("no address in its result: {result}"),
            })?;
        let mut serve = sys::command_in(Some(netns), Some(&node.cgroup), &bins.echo);
        serve.args([
            "serve",
            "--name",
            &format!("{cluster}/{}/{}", node.name, template.name),
        ]);
        for port in &template.ports {
            let flag = match port.protocol {
                Protocol::Tcp => "--tcp",
                Protocol::Udp => "--udp",
            };
            serve.args([flag, &format!("0.0.0.0:{}", port.port)]);
        }
        let logs = self.dir.join("logs").join("pods");
        self.mkdir(&logs)?;
        let started = self.start(
            format!("pod {cluster}/{}/{}", template.namespace, template.name),
            serve,
            &logs.join(format!("{container_id}.log")),
        )?;
        let ready = self.wait_pod_ready(bins, node, ip, &template.ports);
        if !ready {
            tracing::warn!(pod = %template.name, %ip, "not answering; its endpoints are not ready");
        }
        Ok(PodState {
            namespace: template.namespace,
            name: template.name,
            node: node.name.clone(),
            labels: template.labels,
            containers: template.containers,
            ports: template.ports,
            ip,
            netns: netns.to_owned(),
            container_id: container_id.to_owned(),
            pid: started.pid,
            start_time: started.start_time,
            ready,
            owner: template.owner,
        })
    }

    /// Whether the pod's first port answers a probe from its node within 10 s.
    fn wait_pod_ready(
        &self,
        bins: &Binaries,
        node: &NodeState,
        ip: Ipv4Addr,
        ports: &[PodPort],
    ) -> bool {
        let Some(port) = ports.first() else {
            return true;
        };
        let flag = match port.protocol {
            Protocol::Tcp => "--tcp",
            Protocol::Udp => "--udp",
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            let out = sys::command_in(Some(&node.netns), None, &bins.echo)
                .args([
                    "probe",
                    flag,
                    &format!("{ip}:{}", port.port),
                    "--timeout",
                    "200ms",
                ])
                .stderr(Stdio::null())
                .output();
            let answered = out
                .ok()
                .and_then(|o| serde_json::from_slice::<Value>(&o.stdout).ok());
            if answered.is_some_and(|v| v["failures"] == 0) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    fn delete_pod(&mut self, bins: &Binaries, ci: usize, pod: &PodState) -> Result<(), DevError> {
        let cluster = self.state.clusters[ci].name.clone();
        let full = self.state.datapath == DevDatapath::Bpf;
        if full {
            sys::stop_process(pod.pid, pod.start_time, Duration::from_secs(2));
        }
        if let Some(node) = self.state.clusters[ci]
            .node(&pod.node)
            .cloned()
            .filter(|_| full)
        {
            self.cni(
                bins,
                "DEL",
                &cluster,
                &node,
                (&pod.namespace, &pod.name, &pod.container_id, None),
            )?;
        }
        if full && sys::netns_exists(&pod.netns) {
            sys::ip(["netns", "del", &pod.netns])?;
        }
        self.state.clusters[ci]
            .pods
            .retain(|p| !(p.namespace == pod.namespace && p.name == pod.name));
        self.save()?;
        self.write_manifests(ci)
    }

    /// A command running `argv` in pod `pod` of `cluster`: in its network namespace and its
    /// node's cgroup (so services resolve as they do for the pod's own processes).
    pub fn exec_command(
        &self,
        cluster: &str,
        pod: &str,
        argv: &[String],
    ) -> Result<Command, DevError> {
        let c = self.cluster(cluster)?;
        self.require_datapath("dev exec")?;
        let pod = c.pod(pod)?;
        let node = c.node(&pod.node).ok_or_else(|| DevError::Pod {
            cluster: c.name.clone(),
            detail: format!("pod {} is on unknown node {}", pod.name, pod.node),
        })?;
        let (program, args) = argv.split_first().ok_or_else(|| DevError::Pod {
            cluster: c.name.clone(),
            detail: "no command to run".to_owned(),
        })?;
        let mut command = sys::command_in(Some(&pod.netns), Some(&node.cgroup), program);
        command.args(args);
        Ok(command)
    }
}

/// Removes everything environment `name`'s record names: processes, namespaces, links,
/// cgroups, bpffs pins, its context and state directories, and `current-context` if it still
/// names it. Idempotent; an environment that does not exist is nothing to do. Whether there
/// was anything to remove.
pub fn down(home: &MeshHome, name: &str) -> Result<bool, DevError> {
    let dir = home.env_dir(name);
    if !dir.exists() {
        return Ok(false);
    }
    let record = Record::at(dir.join("record.jsonl"));
    let mut resources = record.resources()?;
    if !resources.contains(&Resource::Dir { path: dir.clone() }) {
        resources.insert(0, Resource::Dir { path: dir.clone() });
    }
    let failures = crate::record::teardown(&resources);
    if failures.is_empty() {
        Ok(true)
    } else {
        Err(DevError::Teardown(failures.join("\n")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_the_kernel_and_differ_per_environment() {
        let a = Naming::new("two-clusters");
        let b = Naming::new("two.clusters");
        assert_ne!(a.link_prefix(), b.link_prefix());
        assert!(a.node_link(999).len() <= 15 && a.bridge().len() <= 15);
        assert!(!b.node("n.1").contains('.'), "bpffs refuses dots");
        assert!(a.pod("a", "shop", "web-0").starts_with(&a.prefix()));
    }

    #[test]
    fn up_names_what_is_wrong_before_making_anything() {
        let home = tempfile::tempdir().unwrap();
        let home = MeshHome::at(home.path());
        let bins = Binaries {
            apiserver: "/x".into(),
            kvstoremesh: "/x".into(),
            agent: "/x".into(),
            cni: "/x".into(),
            echo: "/x".into(),
        };
        let options = |topology: &str| UpOptions {
            topology: topology.into(),
            name: None,
            ready_timeout: Duration::from_secs(1),
            agent_grace: None,
            datapath: DevDatapath::Bpf,
        };
        /// Every refusal below comes before a certificate is asked for.
        struct Unreached;
        impl Certify for Unreached {
            fn certify(&self, context: &ClusterContext) -> Result<ClusterTls, CertifyError> {
                Err(format!("certify called for {}", context.name).into())
            }
        }
        let err = Env::up(&home, &bins, &options("/nonexistent.yaml"), &Unreached).unwrap_err();
        assert!(err.to_string().contains("/nonexistent.yaml"), "{err}");
        let dir = tempfile::tempdir().unwrap();
        let bad = dir.path().join("bad.yaml");
        std::fs::write(&bad, "name: x\nclusters: []\n").unwrap();
        let err = Env::up(&home, &bins, &options(bad.to_str().unwrap()), &Unreached).unwrap_err();
        assert!(err.to_string().contains("at least one cluster"), "{err}");
        let good = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../kind-configs/two-clusters.yaml"
        );
        std::fs::create_dir_all(home.env_dir("two-clusters")).unwrap();
        let err = Env::up(&home, &bins, &options(good), &Unreached).unwrap_err();
        assert!(
            err.to_string()
                .contains("clustermesh dev down --name two-clusters"),
            "{err}"
        );
        assert!(!home.context_dir("two-clusters").exists());
        let err = Binaries::in_dir(dir.path()).unwrap_err();
        assert!(
            err.to_string().contains("clustermesh-apiserver not found"),
            "{err}"
        );
    }
}
