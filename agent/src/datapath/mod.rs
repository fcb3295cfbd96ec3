//! The datapath owner: one thread that holds the loaded eBPF datapath and does every map,
//! link and route write, in the order the diff gives.
//!
//! The owner task sends it the agent's tables once they are worth programming (the local
//! cluster synced, or its previous state restored) and every change after that; until then
//! the pinned maps keep what an earlier agent left in them. Each batch updates the desired
//! map contents incrementally ([`convert::Desired`]) and applies `bpf::diff(desired,
//! actual)`, where *actual* was read back from the pinned maps at start: never a flush.
//!
//! Pods' interfaces are registered by `clustermesh-cni` through the API; the owner attaches
//! the policy program to their host side, persists the registry, and forgets endpoints
//! whose interface disappeared.
//!
//! With `--datapath none` (or `auto` without root or eBPF) the thread still keeps the
//! endpoint registry but programs nothing, and says once why.

pub mod convert;
pub mod routes;

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bpf::maps::{DIR_EGRESS, Reason};
use bpf::{Datapath, DatapathConfig, DatapathError, DropReader, MapState};
use model::MaxConnectedClusters;
use model::endpoint::EndpointRegistration;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use tokio::sync::oneshot;

use crate::metrics::{MapLabels, Metrics, ReasonLabels};
use crate::persist::write_durably;
use crate::tables::{Change, Tables};
use convert::{Desired, Routes};
use routes::RouteSync;

/// Which datapath the agent programs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// None: the control plane alone.
    None,
    /// eBPF; failing to load it is fatal.
    Bpf,
    /// eBPF when it can be loaded, else none (and the log says why).
    Auto,
}

impl FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Mode, String> {
        match s {
            "none" => Ok(Mode::None),
            "bpf" => Ok(Mode::Bpf),
            "auto" => Ok(Mode::Auto),
            other => Err(format!("{other:?}: must be none, bpf or auto")),
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::None => "none",
            Mode::Bpf => "bpf",
            Mode::Auto => "auto",
        })
    }
}

/// How the datapath is set up.
#[derive(Clone, Debug)]
pub struct DatapathOptions {
    /// Which datapath.
    pub mode: Mode,
    /// Pin directory and map sizes.
    pub bpf: DatapathConfig,
    /// The cgroup v2 directory whose sockets are balanced.
    pub cgroup: PathBuf,
    /// Where registered endpoints persist; `None`: nowhere.
    pub endpoints_file: Option<PathBuf>,
    /// How identities carry cluster ids.
    pub max: MaxConnectedClusters,
}

/// The default cgroup v2 directory: the unified hierarchy of a hybrid layout, else the root.
pub fn default_cgroup() -> PathBuf {
    let unified = Path::new("/sys/fs/cgroup/unified");
    if unified.join("cgroup.procs").exists() {
        unified.to_owned()
    } else {
        PathBuf::from("/sys/fs/cgroup")
    }
}

/// Why the datapath could not start (only with `--datapath bpf`; `auto` falls back).
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// eBPF cannot be loaded or attached here (not root, no BPF, a pinned map of another
    /// shape, a bad cgroup, …).
    #[error("--datapath bpf: {0}")]
    Unavailable(String),
    /// The thread could not be started.
    #[error("datapath thread: {0}")]
    Thread(#[source] std::io::Error),
}

pub use agent_api::datapath::{CounterView, DatapathStatus, DropView, MapUsage};

/// Drop events kept for the API.
const DROPS_KEPT: usize = 1024;
/// Errors kept for the status.
const ERRORS_KEPT: usize = 20;

enum Msg {
    Tables(Box<Tables>),
    Changes(Vec<Change>),
    Register(
        EndpointRegistration,
        oneshot::Sender<Result<EndpointRegistration, String>>,
    ),
    Unregister(String, oneshot::Sender<Result<(), String>>),
}

/// What the API and the owner task hold of the datapath.
#[derive(Debug)]
pub struct DatapathHandle {
    tx: Mutex<mpsc::Sender<Msg>>,
    /// The status.
    pub status: Arc<RwLock<DatapathStatus>>,
    /// Recent drops, oldest first.
    pub drops: Arc<Mutex<VecDeque<DropView>>>,
    /// Registered endpoints by container id.
    pub endpoints: Arc<RwLock<BTreeMap<String, EndpointRegistration>>>,
}

impl DatapathHandle {
    fn send(&self, msg: Msg) {
        let tx = self.tx.lock().unwrap_or_else(|e| e.into_inner());
        // A stopped thread means shutdown: nothing left to program.
        let _ = tx.send(msg);
    }

    /// Programs these tables (the first time they are worth it).
    pub fn tables(&self, tables: Tables) {
        self.send(Msg::Tables(Box::new(tables)));
    }

    /// Programs these changes of the tables.
    pub fn changes(&self, changes: Vec<Change>) {
        self.send(Msg::Changes(changes));
    }

    /// Registers a pod's interface (and attaches the policy program to it).
    pub async fn register(
        &self,
        endpoint: EndpointRegistration,
    ) -> Result<EndpointRegistration, String> {
        let (tx, rx) = oneshot::channel();
        self.send(Msg::Register(endpoint, tx));
        rx.await
            .unwrap_or_else(|_| Err("the datapath is stopping".to_owned()))
    }

    /// Forgets a pod's interface.
    pub async fn unregister(&self, container_id: String) -> Result<(), String> {
        let (tx, rx) = oneshot::channel();
        self.send(Msg::Unregister(container_id, tx));
        rx.await
            .unwrap_or_else(|_| Err("the datapath is stopping".to_owned()))
    }

    /// A copy of the status.
    pub fn status(&self) -> DatapathStatus {
        self.status
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// The datapath metrics the owner updates (clones of the agent registry's families).
#[derive(Clone, Debug)]
struct DpMetrics {
    entries: Family<MapLabels, Gauge>,
    capacity: Family<MapLabels, Gauge>,
    full: Family<MapLabels, Counter>,
    packets: Family<ReasonLabels, Counter>,
    bytes: Family<ReasonLabels, Counter>,
    reconcile: Histogram,
}

impl DpMetrics {
    fn of(metrics: &Metrics) -> DpMetrics {
        DpMetrics {
            entries: metrics.datapath_map_entries.clone(),
            capacity: metrics.datapath_map_capacity.clone(),
            full: metrics.datapath_map_full.clone(),
            packets: metrics.datapath_packets.clone(),
            bytes: metrics.datapath_bytes.clone(),
            reconcile: metrics.datapath_reconcile_seconds.clone(),
        }
    }
}

/// Starts the owner thread (which loads the datapath: netlink and map I/O stay off the
/// async runtime); with `--datapath bpf` fails when eBPF cannot be loaded.
pub async fn start(
    options: DatapathOptions,
    metrics: &Metrics,
) -> Result<DatapathHandle, StartError> {
    let status = Arc::new(RwLock::new(DatapathStatus {
        mode: "none".to_owned(),
        ..DatapathStatus::default()
    }));
    let drops = Arc::new(Mutex::new(VecDeque::new()));
    let endpoints = Arc::new(RwLock::new(load_endpoints(
        options.endpoints_file.as_deref(),
    )));
    let (tx, rx) = mpsc::channel();
    let (started_tx, started) = oneshot::channel();
    let mut owner = Owner {
        options,
        dp: None,
        drops_reader: None,
        routes: None,
        actual: MapState::default(),
        actual_routes: Routes::new(),
        desired: Desired::default(),
        ready: false,
        dirty: false,
        status: status.clone(),
        drops: drops.clone(),
        endpoints: endpoints.clone(),
        metrics: DpMetrics::of(metrics),
        last_counters: BTreeMap::new(),
        monotonic_offset_ns: monotonic_offset_ns(),
    };
    // The thread logs in the span it was started from (the agent's, naming the cluster).
    let span = tracing::Span::current();
    std::thread::Builder::new()
        .name("datapath".to_owned())
        .spawn(move || {
            let _span = span.entered();
            let mode = owner.options.mode;
            let loaded = match mode {
                Mode::None => Err("--datapath none".to_owned()),
                Mode::Bpf | Mode::Auto => load(&owner.options),
            };
            match (loaded, mode) {
                (Ok(loaded), _) => owner.adopt(loaded),
                (Err(reason), Mode::Bpf) => {
                    let _ = started_tx.send(Err(StartError::Unavailable(reason)));
                    return;
                }
                (Err(reason), _) => {
                    tracing::warn!(
                        %reason,
                        "the eBPF datapath is off: running the control plane alone (tables are computed and served, no packet is carried)"
                    );
                    owner
                        .status
                        .write()
                        .unwrap_or_else(|e| e.into_inner())
                        .off_reason = Some(reason);
                }
            }
            let _ = started_tx.send(Ok(()));
            owner.run(rx);
        })
        .map_err(StartError::Thread)?;
    started.await.unwrap_or_else(|_| {
        Err(StartError::Unavailable(
            "the datapath thread died".to_owned(),
        ))
    })?;
    Ok(DatapathHandle {
        tx: Mutex::new(tx),
        status,
        drops,
        endpoints,
    })
}

struct Loaded {
    dp: Datapath,
    actual: MapState,
    routes: RouteSync,
    actual_routes: Routes,
}

/// Loads, attaches and reads back; the reason as text when it cannot.
fn load(options: &DatapathOptions) -> Result<Loaded, String> {
    if !nix::unistd::Uid::effective().is_root() {
        return Err(format!(
            "not running as root (uid {}): loading eBPF programs needs root",
            nix::unistd::Uid::effective()
        ));
    }
    let chain = |e: DatapathError| daemon::error_chain(&e);
    let mut dp = Datapath::load(&options.bpf).map_err(chain)?;
    dp.attach_cgroup(&options.cgroup).map_err(chain)?;
    let actual = dp.read_state().map_err(chain)?;
    let routes = RouteSync::new().map_err(|e| format!("netlink: {e}"))?;
    let actual_routes = routes.actual()?;
    Ok(Loaded {
        dp,
        actual,
        routes,
        actual_routes,
    })
}

/// CLOCK_MONOTONIC's offset from the Unix epoch, to date drop events.
fn monotonic_offset_ns() -> i128 {
    let wall = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos() as i128;
    let mono = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as i128 * 1_000_000_000 + t.tv_nsec() as i128)
        .unwrap_or(0);
    wall - mono
}

fn load_endpoints(path: Option<&Path>) -> BTreeMap<String, EndpointRegistration> {
    let Some(path) = path else {
        return BTreeMap::new();
    };
    match std::fs::read(path) {
        Ok(bytes) => match serde_json::from_slice::<Vec<EndpointRegistration>>(&bytes) {
            Ok(list) => list
                .into_iter()
                .map(|e| (e.container_id.clone(), e))
                .collect(),
            Err(error) => {
                tracing::warn!(path = %path.display(), %error, "endpoints file unreadable; starting with none");
                BTreeMap::new()
            }
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
        Err(error) => {
            tracing::warn!(path = %path.display(), %error, "cannot read the endpoints file; starting with none");
            BTreeMap::new()
        }
    }
}

struct Owner {
    options: DatapathOptions,
    dp: Option<Datapath>,
    drops_reader: Option<DropReader>,
    routes: Option<RouteSync>,
    actual: MapState,
    actual_routes: Routes,
    desired: Desired,
    ready: bool,
    dirty: bool,
    status: Arc<RwLock<DatapathStatus>>,
    drops: Arc<Mutex<VecDeque<DropView>>>,
    endpoints: Arc<RwLock<BTreeMap<String, EndpointRegistration>>>,
    metrics: DpMetrics,
    last_counters: BTreeMap<(Reason, u8), (u64, u64)>,
    monotonic_offset_ns: i128,
}

impl Owner {
    fn adopt(&mut self, mut loaded: Loaded) {
        tracing::info!(
            pin_dir = %loaded.dp.dir().display(),
            cgroup = %self.options.cgroup.display(),
            services = loaded.actual.frontends().count(),
            ipcache = loaded.actual.ipcache.len(),
            policy = loaded.actual.policy.len(),
            routes = loaded.actual_routes.len(),
            "eBPF datapath loaded; pinned maps reused as they are until the tables are ready"
        );
        match loaded.dp.take_drops() {
            Ok(reader) => self.drops_reader = Some(reader),
            Err(error) => tracing::warn!(%error, "drop events unavailable"),
        }
        {
            let mut status = self.status.write().unwrap_or_else(|e| e.into_inner());
            status.mode = "bpf".to_owned();
            status.pin_dir = Some(loaded.dp.dir().display().to_string());
            status.cgroup = Some(self.options.cgroup.display().to_string());
        }
        self.actual = loaded.actual;
        self.actual_routes = loaded.actual_routes;
        self.routes = Some(loaded.routes);
        self.dp = Some(loaded.dp);
        self.reattach_endpoints();
    }

    fn run(mut self, rx: mpsc::Receiver<Msg>) {
        let mut last_housekeeping = Instant::now();
        loop {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(msg) => {
                    self.handle(msg);
                    while let Ok(msg) = rx.try_recv() {
                        self.handle(msg);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            if self.dirty && self.ready {
                self.reconcile();
            }
            self.read_drops();
            if last_housekeeping.elapsed() >= Duration::from_secs(1) {
                last_housekeeping = Instant::now();
                self.forget_vanished_endpoints();
                self.read_counters();
            }
        }
        // Maps and links stay pinned: traffic goes on while no agent runs.
        tracing::debug!("datapath owner stopped; the pinned datapath keeps carrying traffic");
    }

    fn handle(&mut self, msg: Msg) {
        let max = self.options.max;
        match msg {
            Msg::Tables(tables) => {
                self.desired = Desired::from_tables(&tables, max);
                self.ready = true;
                self.dirty = true;
            }
            Msg::Changes(changes) => {
                for change in &changes {
                    self.desired.apply(change, max);
                }
                self.dirty = true;
            }
            Msg::Register(endpoint, reply) => {
                let _ = reply.send(self.register(endpoint));
            }
            Msg::Unregister(id, reply) => {
                let _ = reply.send(self.unregister(&id));
            }
        }
    }

    fn error(&self, error: String) {
        let mut status = self.status.write().unwrap_or_else(|e| e.into_inner());
        status.errors.push(error);
        let excess = status.errors.len().saturating_sub(ERRORS_KEPT);
        status.errors.drain(..excess);
    }

    fn reconcile(&mut self) {
        self.dirty = false;
        let started = Instant::now();
        if let Some(dp) = self.dp.as_mut() {
            let ops = bpf::diff(&self.desired.maps, &self.actual);
            let errors = dp.apply(&ops, &mut self.actual);
            let mut full: BTreeMap<&'static str, (u32, u64)> = BTreeMap::new();
            let mut other = Vec::new();
            for error in errors {
                match error {
                    DatapathError::MapFull { map, capacity } => {
                        full.entry(map).or_insert((capacity, 0)).1 += 1;
                    }
                    error => other.push(daemon::error_chain(&error)),
                }
            }
            for (map, (capacity, missing)) in full {
                let text = format!(
                    "map {map} is full ({capacity} entries): {missing} entries not written; \
                     raise its size flag"
                );
                tracing::error!(map, capacity, missing, "{text}");
                self.metrics
                    .full
                    .get_or_create(&MapLabels {
                        map: map.to_owned(),
                    })
                    .inc_by(missing);
                self.error(text);
            }
            for text in other {
                tracing::warn!(error = %text, "datapath write failed");
                self.error(text);
            }
            if let Some(routes) = &self.routes {
                for text in routes.apply(&self.desired.routes, &mut self.actual_routes) {
                    tracing::warn!(error = %text, "route not programmed");
                    self.error(text);
                }
            }
            let elapsed = started.elapsed();
            self.metrics.reconcile.observe(elapsed.as_secs_f64());
            tracing::debug!(ops = ops.len(), ?elapsed, "datapath reconciled");
        }
        self.publish_usage();
    }

    fn publish_usage(&self) {
        let sizes = self.options.bpf.sizes;
        let maps = [
            (
                bpf::loader::names::SERVICES,
                self.actual.services.len(),
                sizes.services,
            ),
            (
                bpf::loader::names::IPCACHE,
                self.actual.ipcache.len(),
                sizes.ipcache,
            ),
            (
                bpf::loader::names::POLICY,
                self.actual.policy.len(),
                sizes.policy,
            ),
            (
                bpf::loader::names::ENFORCEMENT,
                self.actual.enforcement.len(),
                sizes.enforcement,
            ),
            ("routes", self.actual_routes.len(), 0),
        ];
        let mut status = self.status.write().unwrap_or_else(|e| e.into_inner());
        status.programmed = true;
        status.reconciles += 1;
        status.skipped = self
            .desired
            .skipped
            .iter()
            .map(|(k, v)| ((*k).to_owned(), *v))
            .collect();
        if self.dp.is_none() {
            return;
        }
        status.maps = maps
            .iter()
            .map(|(map, entries, capacity)| {
                let labels = MapLabels {
                    map: (*map).to_owned(),
                };
                self.metrics
                    .entries
                    .get_or_create(&labels)
                    .set(i64::try_from(*entries).unwrap_or(i64::MAX));
                if *capacity > 0 {
                    self.metrics
                        .capacity
                        .get_or_create(&labels)
                        .set(i64::from(*capacity));
                }
                MapUsage {
                    map: (*map).to_owned(),
                    entries: *entries as u64,
                    capacity: u64::from(*capacity),
                }
            })
            .collect();
    }

    fn read_counters(&mut self) {
        let Some(dp) = self.dp.as_mut() else { return };
        let counters = match dp.counters() {
            Ok(c) => c,
            Err(error) => {
                tracing::debug!(%error, "datapath counters unreadable");
                return;
            }
        };
        let mut views = Vec::new();
        for c in counters {
            let direction = direction_name(c.direction);
            let labels = ReasonLabels {
                reason: c.reason.name().to_owned(),
                direction: direction.to_owned(),
            };
            let (packets, bytes) = self
                .last_counters
                .insert((c.reason, c.direction), (c.packets, c.bytes))
                .unwrap_or((0, 0));
            self.metrics
                .packets
                .get_or_create(&labels)
                .inc_by(c.packets.saturating_sub(packets));
            self.metrics
                .bytes
                .get_or_create(&labels)
                .inc_by(c.bytes.saturating_sub(bytes));
            views.push(CounterView {
                reason: labels.reason,
                direction: labels.direction,
                packets: c.packets,
                bytes: c.bytes,
            });
        }
        self.status
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .counters = views;
    }

    fn read_drops(&mut self) {
        let Some(reader) = self.drops_reader.as_mut() else {
            return;
        };
        let events = reader.drain();
        if events.is_empty() {
            return;
        }
        let by_ifindex: BTreeMap<u32, String> = self
            .endpoints
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .map(|e| (e.host_ifindex, format!("{}/{}", e.namespace, e.pod)))
            .collect();
        let mut drops = self.drops.lock().unwrap_or_else(|e| e.into_inner());
        for e in events {
            let time_ns = self.monotonic_offset_ns + e.timestamp_ns as i128;
            let view = DropView {
                time_ms: u64::try_from(time_ns / 1_000_000).unwrap_or(0),
                direction: direction_name(e.direction).to_owned(),
                reason: e.reason.map_or("unknown", Reason::name).to_owned(),
                src: format!("{}:{}", e.src, e.sport),
                dst: format!("{}:{}", e.dst, e.dport),
                protocol: match e.proto {
                    1 => "ICMP".to_owned(),
                    6 => "TCP".to_owned(),
                    17 => "UDP".to_owned(),
                    132 => "SCTP".to_owned(),
                    n => n.to_string(),
                },
                src_identity: e.src_identity,
                dst_identity: e.dst_identity,
                src_cluster: e.src_cluster,
                dst_cluster: e.dst_cluster,
                endpoint: by_ifindex.get(&e.ifindex).cloned(),
            };
            tracing::debug!(?view, "packet dropped");
            drops.push_back(view);
            if drops.len() > DROPS_KEPT {
                drops.pop_front();
            }
        }
    }

    fn persist_endpoints(&self) {
        let Some(path) = &self.options.endpoints_file else {
            return;
        };
        let list: Vec<EndpointRegistration> = self
            .endpoints
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        let result = serde_json::to_vec_pretty(&list)
            .map_err(std::io::Error::other)
            .and_then(|bytes| write_durably(path, &bytes));
        if let Err(error) = result {
            tracing::warn!(path = %path.display(), %error, "cannot write the endpoints file");
        }
    }

    fn register(&mut self, endpoint: EndpointRegistration) -> Result<EndpointRegistration, String> {
        endpoint.validate()?;
        match nix::net::if_::if_nametoindex(endpoint.host_ifname.as_str()) {
            Ok(index) if index == endpoint.host_ifindex => {}
            Ok(index) => {
                return Err(format!(
                    "interface {} has index {index}, not {}",
                    endpoint.host_ifname, endpoint.host_ifindex
                ));
            }
            Err(e) => {
                return Err(format!(
                    "interface {} not found in the agent's network namespace: {e}",
                    endpoint.host_ifname
                ));
            }
        }
        if let Some(dp) = self.dp.as_mut() {
            dp.attach_interface(endpoint.host_ifindex, &endpoint.host_ifname)
                .map_err(|e| daemon::error_chain(&e))?;
        }
        tracing::info!(
            pod = %format!("{}/{}", endpoint.namespace, endpoint.pod),
            ip = %endpoint.ip,
            interface = %endpoint.host_ifname,
            "endpoint registered"
        );
        self.endpoints
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(endpoint.container_id.clone(), endpoint.clone());
        self.persist_endpoints();
        Ok(endpoint)
    }

    fn unregister(&mut self, container_id: &str) -> Result<(), String> {
        let removed = self
            .endpoints
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(container_id);
        if let Some(endpoint) = removed {
            if let Some(dp) = self.dp.as_mut() {
                dp.detach_interface(endpoint.host_ifindex)
                    .map_err(|e| daemon::error_chain(&e))?;
            }
            tracing::info!(pod = %format!("{}/{}", endpoint.namespace, endpoint.pod), "endpoint removed");
            self.persist_endpoints();
        }
        Ok(())
    }

    /// After a restart: the new program behind every live endpoint's links; links of
    /// interfaces nobody registered are let go.
    fn reattach_endpoints(&mut self) {
        self.forget_vanished_endpoints();
        let endpoints: Vec<EndpointRegistration> = self
            .endpoints
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        let Some(dp) = self.dp.as_mut() else { return };
        let mut errors = Vec::new();
        for e in &endpoints {
            if let Err(error) = dp.attach_interface(e.host_ifindex, &e.host_ifname) {
                errors.push(format!(
                    "{}: {}",
                    e.host_ifname,
                    daemon::error_chain(&error)
                ));
            }
        }
        let known: std::collections::BTreeSet<u32> =
            endpoints.iter().map(|e| e.host_ifindex).collect();
        if let Ok(attached) = dp.attached_interfaces() {
            for ifindex in attached.difference(&known) {
                if let Err(error) = dp.detach_interface(*ifindex) {
                    errors.push(daemon::error_chain(&error));
                }
            }
        }
        for error in errors {
            tracing::warn!(%error, "endpoint not re-attached");
            self.error(error);
        }
    }

    /// Endpoints whose interface is gone (the pod was deleted without a CNI DEL reaching
    /// us) are forgotten.
    fn forget_vanished_endpoints(&mut self) {
        let vanished: Vec<EndpointRegistration> = self
            .endpoints
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .filter(|e| {
                nix::net::if_::if_nametoindex(e.host_ifname.as_str()).ok() != Some(e.host_ifindex)
            })
            .cloned()
            .collect();
        if vanished.is_empty() {
            return;
        }
        for e in &vanished {
            tracing::info!(pod = %format!("{}/{}", e.namespace, e.pod), interface = %e.host_ifname, "endpoint's interface is gone; forgetting it");
            if let Some(dp) = self.dp.as_mut() {
                let _ = dp.detach_interface(e.host_ifindex);
            }
        }
        {
            let mut endpoints = self.endpoints.write().unwrap_or_else(|e| e.into_inner());
            for e in &vanished {
                endpoints.remove(&e.container_id);
            }
        }
        self.persist_endpoints();
    }
}

fn direction_name(direction: u8) -> &'static str {
    if direction == DIR_EGRESS {
        "egress"
    } else {
        "ingress"
    }
}
