//! Loads the committed object with aya, pins its maps and links under one bpffs directory,
//! attaches the socket load balancer to a cgroup and the policy program to pod interfaces,
//! and reads and writes the reconciled maps.
//!
//! Everything the kernel needs to keep carrying traffic is pinned (maps and links), so the
//! agent can exit, crash or be upgraded without interrupting connections. A new agent reuses
//! the pinned maps, replaces the programs behind the pinned links (atomically for tc, by
//! attaching the new cgroup links before unpinning the old ones for the socket programs),
//! and reconciles the maps by diff.

use std::collections::BTreeSet;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use aya::maps::lpm_trie::{Key as LpmKey, LpmTrie};
use aya::maps::{HashMap, MapData, MapError, MapInfo, PerCpuArray, RingBuf};
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::tc::{SchedClassifierLink, TcAttachOptions};
use aya::programs::{
    CgroupAttachMode, CgroupSockAddr, LinkOrder, ProgramError, SchedClassifier, TcAttachType,
};
use aya::{Ebpf, EbpfLoader};

use crate::maps::{
    Ct4Key, CtValue, DropEventRaw, EnforcementKey, Ipcache4Key, IpcacheValue, Lb4Key, Lb4Slot,
    MetricsValue, PolicyKey, PolicyValue, Reason, SockLb4,
};
use crate::state::{MapOp, MapState};

/// The compiled programs (`c/mesh.bpf.o`, rebuilt by `bpf/build.sh`).
static OBJECT: &[u8] = aya::include_bytes_aligned!("../c/mesh.bpf.o");

/// The socket programs and where each attaches.
const SOCKET_PROGRAMS: [&str; 4] = [
    "mesh_connect4",
    "mesh_sendmsg4",
    "mesh_recvmsg4",
    "mesh_getpeername4",
];
const FROM_POD: &str = "mesh_from_pod";
const TO_POD: &str = "mesh_to_pod";

/// The maps the agent reconciles or reads, by their pinned name.
pub mod names {
    /// Services.
    pub const SERVICES: &str = "mesh_svc4";
    /// Socket → backend.
    pub const SOCKETS: &str = "mesh_sock4";
    /// ipcache.
    pub const IPCACHE: &str = "mesh_ipc4";
    /// Allow entries.
    pub const POLICY: &str = "mesh_policy";
    /// Default-deny identities.
    pub const ENFORCEMENT: &str = "mesh_enforce";
    /// Connection tracking.
    pub const CONNTRACK: &str = "mesh_ct4";
    /// Per-reason counters.
    pub const METRICS: &str = "mesh_metrics";
    /// Drop events.
    pub const DROPS: &str = "mesh_drops";
}

/// The capacity of each map, in entries (the ring buffer in bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapSizes {
    /// Service slots: frontends + their backends.
    pub services: u32,
    /// Sockets remembered by the load balancer.
    pub sockets: u32,
    /// ipcache prefixes.
    pub ipcache: u32,
    /// Allow entries.
    pub policy: u32,
    /// Default-deny (identity, direction) pairs.
    pub enforcement: u32,
    /// Tracked connections.
    pub conntrack: u32,
    /// Drop event ring buffer, bytes (a power of two, a multiple of the page size).
    pub drops: u32,
}

impl Default for MapSizes {
    fn default() -> Self {
        MapSizes {
            services: 262_144,
            sockets: 65_536,
            ipcache: 524_288,
            policy: 65_536,
            enforcement: 16_384,
            conntrack: 262_144,
            drops: 256 * 1024,
        }
    }
}

impl MapSizes {
    /// (name, max_entries, key size, value size) of every pinned map.
    fn geometry(&self) -> [(&'static str, u32, usize, usize); 8] {
        [
            (names::SERVICES, self.services, Lb4Key::SIZE, Lb4Slot::SIZE),
            (names::SOCKETS, self.sockets, 8, SockLb4::SIZE),
            (
                names::IPCACHE,
                self.ipcache,
                Ipcache4Key::SIZE,
                IpcacheValue::SIZE,
            ),
            (
                names::POLICY,
                self.policy,
                PolicyKey::SIZE,
                PolicyValue::SIZE,
            ),
            (
                names::ENFORCEMENT,
                self.enforcement,
                EnforcementKey::SIZE,
                4,
            ),
            (
                names::CONNTRACK,
                self.conntrack,
                Ct4Key::SIZE,
                CtValue::SIZE,
            ),
            (
                names::METRICS,
                Reason::ALL.len() as u32 * 2,
                4,
                MetricsValue::SIZE,
            ),
            (names::DROPS, self.drops, 0, 0),
        ]
    }

    /// Checks the sizes before anything is created.
    pub fn validate(&self) -> Result<(), DatapathError> {
        for (name, entries, _, _) in self.geometry() {
            if entries == 0 {
                return Err(DatapathError::Size {
                    map: name,
                    reason: "must be at least 1".to_owned(),
                });
            }
        }
        if !self.drops.is_power_of_two() || self.drops < 4096 {
            return Err(DatapathError::Size {
                map: names::DROPS,
                reason: format!(
                    "{} bytes: must be a power of two of at least 4096",
                    self.drops
                ),
            });
        }
        Ok(())
    }
}

/// Where the datapath lives and how big its maps are.
#[derive(Clone, Debug)]
pub struct DatapathConfig {
    /// The bpffs mount (mounted when missing).
    pub bpffs: PathBuf,
    /// The directory under it for this agent's maps and links.
    pub root: String,
    /// Map capacities.
    pub sizes: MapSizes,
}

impl DatapathConfig {
    /// The pin directory.
    pub fn dir(&self) -> PathBuf {
        self.bpffs.join(&self.root)
    }
}

/// Why the datapath cannot do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    /// A map size is unusable.
    #[error("map {map}: size {reason}")]
    Size {
        /// The map.
        map: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// bpffs is not mounted and cannot be.
    #[error("bpffs at {path}: {reason}")]
    Bpffs {
        /// The mount point.
        path: PathBuf,
        /// What failed.
        reason: String,
    },
    /// A file or directory operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// A pinned map from an earlier run has another shape than this run asks for.
    #[error(
        "pinned map {path} holds {pinned} but this agent needs {wanted}; \
         restart with the old size, or remove the pin (its entries are lost) and restart"
    )]
    PinnedMapMismatch {
        /// The pinned map.
        path: PathBuf,
        /// What it holds.
        pinned: String,
        /// What is wanted.
        wanted: String,
    },
    /// The object or a program cannot be loaded (not root, no BPF, verifier refusal).
    #[error("loading the eBPF object: {0}")]
    Load(#[source] Box<aya::EbpfError>),
    /// A program cannot be loaded or attached.
    #[error("program {program}: {source}")]
    Program {
        /// The program.
        program: &'static str,
        /// The loader's error.
        source: Box<ProgramError>,
    },
    /// A link cannot be pinned or replaced.
    #[error("link {path}: {reason}")]
    Link {
        /// The pin path.
        path: PathBuf,
        /// What failed.
        reason: String,
    },
    /// A map is missing from the object or has the wrong type.
    #[error("map {map}: {source}")]
    Map {
        /// The map.
        map: &'static str,
        /// The loader's error.
        source: Box<MapError>,
    },
    /// A map is full: the entry was not written (the entries that fit stay programmed).
    #[error("map {map} is full ({capacity} entries): an entry was not written")]
    MapFull {
        /// The map.
        map: &'static str,
        /// Its capacity.
        capacity: u32,
    },
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> DatapathError + '_ {
    move |source| DatapathError::Io {
        path: path.to_owned(),
        source,
    }
}

fn map_error(map: &'static str) -> impl FnOnce(MapError) -> DatapathError {
    move |source| DatapathError::Map {
        map,
        source: Box::new(source),
    }
}

fn program_error(program: &'static str) -> impl FnOnce(ProgramError) -> DatapathError {
    move |source| DatapathError::Program {
        program,
        source: Box::new(source),
    }
}

/// Packets and bytes for one reason and direction, over every CPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Counter {
    /// Why.
    pub reason: Reason,
    /// `DIR_INGRESS` or `DIR_EGRESS`.
    pub direction: u8,
    /// Packets.
    pub packets: u64,
    /// Bytes.
    pub bytes: u64,
}

/// The loaded datapath.
#[derive(Debug)]
pub struct Datapath {
    ebpf: Ebpf,
    dir: PathBuf,
    sizes: MapSizes,
}

/// Mounts bpffs at `path` unless it is mounted there already.
pub fn ensure_bpffs(path: &Path) -> Result<(), DatapathError> {
    let mounts = std::fs::read_to_string("/proc/self/mounts")
        .map_err(io_error(Path::new("/proc/self/mounts")))?;
    let mounted = mounts.lines().any(|line| {
        let mut fields = line.split_whitespace();
        let (_, target, fstype) = (fields.next(), fields.next(), fields.next());
        target == path.to_str() && fstype == Some("bpf")
    });
    if mounted {
        return Ok(());
    }
    std::fs::create_dir_all(path).map_err(io_error(path))?;
    nix::mount::mount(
        Some("bpf"),
        path,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|errno| DatapathError::Bpffs {
        path: path.to_owned(),
        reason: format!("not mounted, and mounting it failed: {errno}"),
    })
}

impl Datapath {
    /// Loads the programs, reusing the maps pinned by an earlier run (refusing any whose
    /// shape differs), and pins new maps.
    pub fn load(config: &DatapathConfig) -> Result<Datapath, DatapathError> {
        config.sizes.validate()?;
        ensure_bpffs(&config.bpffs)?;
        let dir = config.dir();
        std::fs::create_dir_all(dir.join("links")).map_err(io_error(&dir))?;
        for (name, entries, key, value) in config.sizes.geometry() {
            let path = dir.join(name);
            if !path.exists() {
                continue;
            }
            let info = MapInfo::from_pin(&path).map_err(map_error(name))?;
            let pinned = (info.max_entries(), info.key_size(), info.value_size());
            let wanted = if key == 0 {
                (entries, 0, 0)
            } else {
                (entries, key as u32, value as u32)
            };
            if pinned != wanted {
                return Err(DatapathError::PinnedMapMismatch {
                    path,
                    pinned: format!("{} entries of {}+{} bytes", pinned.0, pinned.1, pinned.2),
                    wanted: format!("{} entries of {}+{} bytes", wanted.0, wanted.1, wanted.2),
                });
            }
        }
        let sizes = config.sizes;
        let mut loader = EbpfLoader::new();
        loader
            .default_map_pin_directory(&dir)
            .map_max_entries(names::SERVICES, sizes.services)
            .map_max_entries(names::SOCKETS, sizes.sockets)
            .map_max_entries(names::IPCACHE, sizes.ipcache)
            .map_max_entries(names::POLICY, sizes.policy)
            .map_max_entries(names::ENFORCEMENT, sizes.enforcement)
            .map_max_entries(names::CONNTRACK, sizes.conntrack)
            .map_max_entries(names::DROPS, sizes.drops);
        let mut ebpf = loader
            .load(OBJECT)
            .map_err(|e| DatapathError::Load(Box::new(e)))?;
        for name in SOCKET_PROGRAMS {
            let program: &mut CgroupSockAddr = program(&mut ebpf, name)?;
            program.load().map_err(program_error(name))?;
        }
        for name in [FROM_POD, TO_POD] {
            let program: &mut SchedClassifier = program(&mut ebpf, name)?;
            program.load().map_err(program_error(name))?;
        }
        Ok(Datapath { ebpf, dir, sizes })
    }

    /// The pin directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The map capacities.
    pub fn sizes(&self) -> MapSizes {
        self.sizes
    }

    /// Attaches the socket load balancer to a cgroup v2 directory; links pinned by an
    /// earlier run are replaced only once the new ones are attached, so no connect goes
    /// unbalanced in between.
    pub fn attach_cgroup(&mut self, cgroup: &Path) -> Result<(), DatapathError> {
        let file = File::open(cgroup).map_err(io_error(cgroup))?;
        for name in SOCKET_PROGRAMS {
            let program: &mut CgroupSockAddr = program(&mut self.ebpf, name)?;
            // Through bpf_link (kernel ≥ 5.7) cgroup attachments always stack and the kernel
            // refuses the multi flag, so aya's default mode is the one that stacks.
            let id = program
                .attach(&file, CgroupAttachMode::default())
                .map_err(program_error(name))?;
            let link: FdLink = program
                .take_link(id)
                .map_err(program_error(name))?
                .try_into()
                .map_err(|e| link_error(&self.dir, name, chain(&e)))?;
            // bpffs can neither rename nor hold dots in names: each run pins under the next
            // generation number, then unpins the older ones (which detaches them).
            let links = self.dir.join("links");
            let older = generations(&links, name)?;
            let next = older.iter().map(|(g, _)| g + 1).max().unwrap_or(0);
            let path = links.join(format!("{name}-{next}"));
            link.pin(&path)
                .map_err(|e| link_error(&self.dir, name, format!("pin: {}", chain(&e))))?;
            for (_, old) in older {
                remove_if_present(&old)?;
            }
        }
        Ok(())
    }

    /// Attaches the policy program to both directions of a pod's host-side interface;
    /// a link pinned for the same interface by an earlier run is updated in place.
    pub fn attach_interface(&mut self, ifindex: u32, ifname: &str) -> Result<(), DatapathError> {
        for (name, attach, suffix) in [
            (FROM_POD, TcAttachType::Ingress, "from-pod"),
            (TO_POD, TcAttachType::Egress, "to-pod"),
        ] {
            let path = self.interface_pin(ifindex, suffix);
            let program: &mut SchedClassifier = program(&mut self.ebpf, name)?;
            let replaced = match PinnedLink::from_pin(&path) {
                Ok(pinned) => SchedClassifierLink::try_from(FdLink::from(pinned))
                    .ok()
                    .and_then(|link| program.attach_to_link(link).ok()),
                Err(_) => None,
            };
            if let Some(id) = replaced {
                // The pin keeps the updated link; this handle only closes its descriptor.
                drop(program.take_link(id).map_err(program_error(name))?);
                continue;
            }
            // No link, or one whose interface is gone: start afresh.
            remove_if_present(&path)?;
            let id = program
                .attach_with_options(
                    ifname,
                    attach,
                    TcAttachOptions::TcxOrder(LinkOrder::default()),
                )
                .map_err(program_error(name))?;
            let link: FdLink = program
                .take_link(id)
                .map_err(program_error(name))?
                .try_into()
                .map_err(|e| link_error(&self.dir, name, chain(&e)))?;
            link.pin(&path).map_err(|e| DatapathError::Link {
                path: path.clone(),
                reason: format!("pin: {}", chain(&e)),
            })?;
        }
        Ok(())
    }

    /// Detaches the policy program from an interface (nothing happens when it is not
    /// attached; a removed interface has detached itself already).
    pub fn detach_interface(&mut self, ifindex: u32) -> Result<(), DatapathError> {
        for suffix in ["from-pod", "to-pod"] {
            remove_if_present(&self.interface_pin(ifindex, suffix))?;
        }
        Ok(())
    }

    /// The interfaces with a pinned policy link.
    pub fn attached_interfaces(&self) -> Result<BTreeSet<u32>, DatapathError> {
        let links = self.dir.join("links");
        let mut out = BTreeSet::new();
        for entry in std::fs::read_dir(&links).map_err(io_error(&links))? {
            let entry = entry.map_err(io_error(&links))?;
            let name = entry.file_name();
            let Some(rest) = name.to_str().and_then(|n| n.strip_prefix("tc-")) else {
                continue;
            };
            if let Some(ifindex) = rest.split('-').next().and_then(|i| i.parse().ok()) {
                out.insert(ifindex);
            }
        }
        Ok(out)
    }

    fn interface_pin(&self, ifindex: u32, suffix: &str) -> PathBuf {
        self.dir
            .join("links")
            .join(format!("tc-{ifindex}-{suffix}"))
    }

    /// What the reconciled maps hold now (the *actual* state a restarted agent diffs
    /// against).
    pub fn read_state(&mut self) -> Result<MapState, DatapathError> {
        let mut state = MapState::default();
        for (k, v) in self.entries::<12, 8>(names::SERVICES)? {
            state
                .services
                .insert(Lb4Key::decode(&k), Lb4Slot::decode(&v));
        }
        for (k, v) in self.entries::<12, 4>(names::POLICY)? {
            state
                .policy
                .insert(PolicyKey::decode(&k), PolicyValue::decode(&v));
        }
        for (k, _) in self.entries::<8, 4>(names::ENFORCEMENT)? {
            state.enforcement.insert(EnforcementKey::decode(&k));
        }
        let map = self.ipcache()?;
        for item in map.iter() {
            let (k, v) = item.map_err(map_error(names::IPCACHE))?;
            let key = Ipcache4Key {
                prefixlen: k.prefix_len(),
                address: u32::from_ne_bytes(k.data()),
            };
            state.ipcache.insert(key, IpcacheValue::decode(&v));
        }
        Ok(state)
    }

    /// Applies `ops` in order, recording each one that succeeded in `actual`. A failed
    /// operation (a full map, above all) is returned and the rest still applied, so every
    /// entry that fits stays programmed.
    pub fn apply(&mut self, ops: &[MapOp], actual: &mut MapState) -> Vec<DatapathError> {
        let mut errors = Vec::new();
        for op in ops {
            match self.apply_one(op) {
                Ok(()) => actual.apply_one(op),
                Err(e) => errors.push(e),
            }
        }
        errors
    }

    fn apply_one(&mut self, op: &MapOp) -> Result<(), DatapathError> {
        let sizes = self.sizes;
        match op {
            MapOp::PutService(k, v) => {
                let mut map = self.hash::<12, 8>(names::SERVICES)?;
                let r = map.insert(k.encode(), v.encode(), 0);
                insert_result(r, names::SERVICES, sizes.services)
            }
            MapOp::DeleteService(k) => {
                let mut map = self.hash::<12, 8>(names::SERVICES)?;
                remove_result(map.remove(&k.encode()), names::SERVICES)
            }
            MapOp::PutPolicy(k, v) => {
                let mut map = self.hash::<12, 4>(names::POLICY)?;
                insert_result(
                    map.insert(k.encode(), v.encode(), 0),
                    names::POLICY,
                    sizes.policy,
                )
            }
            MapOp::DeletePolicy(k) => {
                let mut map = self.hash::<12, 4>(names::POLICY)?;
                remove_result(map.remove(&k.encode()), names::POLICY)
            }
            MapOp::PutEnforcement(k) => {
                let mut map = self.hash::<8, 4>(names::ENFORCEMENT)?;
                let r = map.insert(k.encode(), [1, 0, 0, 0], 0);
                insert_result(r, names::ENFORCEMENT, sizes.enforcement)
            }
            MapOp::DeleteEnforcement(k) => {
                let mut map = self.hash::<8, 4>(names::ENFORCEMENT)?;
                remove_result(map.remove(&k.encode()), names::ENFORCEMENT)
            }
            MapOp::PutIpcache(k, v) => {
                let mut map = self.ipcache()?;
                let key = LpmKey::new(k.prefixlen, k.address.to_ne_bytes());
                insert_result(
                    map.insert(&key, v.encode(), 0),
                    names::IPCACHE,
                    sizes.ipcache,
                )
            }
            MapOp::DeleteIpcache(k) => {
                let mut map = self.ipcache()?;
                let key = LpmKey::new(k.prefixlen, k.address.to_ne_bytes());
                remove_result(map.remove(&key), names::IPCACHE)
            }
        }
    }

    /// Every entry of a hash map, as raw bytes.
    fn entries<const K: usize, const V: usize>(
        &mut self,
        name: &'static str,
    ) -> Result<Vec<RawEntry<K, V>>, DatapathError> {
        let map = self.hash::<K, V>(name)?;
        map.iter()
            .map(|item| item.map_err(map_error(name)))
            .collect()
    }

    fn map(&mut self, name: &'static str) -> Result<&mut aya::maps::Map, DatapathError> {
        self.ebpf.map_mut(name).ok_or_else(|| missing_map(name))
    }

    fn hash<const K: usize, const V: usize>(
        &mut self,
        name: &'static str,
    ) -> Result<HashMap<&mut MapData, [u8; K], [u8; V]>, DatapathError> {
        HashMap::try_from(self.map(name)?).map_err(map_error(name))
    }

    fn ipcache(&mut self) -> Result<LpmTrie<&mut MapData, [u8; 4], [u8; 12]>, DatapathError> {
        LpmTrie::try_from(self.map(names::IPCACHE)?).map_err(map_error(names::IPCACHE))
    }

    /// Packets and bytes per reason and direction, summed over CPUs.
    pub fn counters(&mut self) -> Result<Vec<Counter>, DatapathError> {
        let name = names::METRICS;
        let array: PerCpuArray<&mut MapData, [u8; 16]> =
            PerCpuArray::try_from(self.map(name)?).map_err(map_error(name))?;
        let mut out = Vec::new();
        for reason in Reason::ALL {
            for direction in [crate::maps::DIR_INGRESS, crate::maps::DIR_EGRESS] {
                let index = u32::from(reason.code()) * 2 + u32::from(direction);
                let values = array.get(&index, 0).map_err(map_error(name))?;
                let (mut packets, mut bytes) = (0, 0);
                for raw in values.iter() {
                    let v = MetricsValue::decode(raw);
                    packets += v.packets;
                    bytes += v.bytes;
                }
                out.push(Counter {
                    reason,
                    direction,
                    packets,
                    bytes,
                });
            }
        }
        Ok(out)
    }

    /// The drop events' ring buffer (taken once; the reader owns it).
    pub fn take_drops(&mut self) -> Result<DropReader, DatapathError> {
        let name = names::DROPS;
        let map = self.ebpf.take_map(name).ok_or_else(|| missing_map(name))?;
        let ring = RingBuf::try_from(map).map_err(map_error(name))?;
        Ok(DropReader { ring })
    }
}

/// The pinned generations of a socket program's link: (generation, path).
fn generations(links: &Path, program: &str) -> Result<Vec<(u64, PathBuf)>, DatapathError> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(links).map_err(io_error(links))? {
        let entry = entry.map_err(io_error(links))?;
        let name = entry.file_name();
        let generation = name
            .to_str()
            .and_then(|n| n.strip_prefix(program))
            .and_then(|n| n.strip_prefix('-'))
            .and_then(|g| g.parse().ok());
        if let Some(generation) = generation {
            out.push((generation, entry.path()));
        }
    }
    Ok(out)
}

/// An error and its sources, for errors whose message leaves the cause out.
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}

/// The program `name` of the object, as the type its section says it is.
fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, DatapathError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or_else(|| missing_program(name))?
        .try_into()
        .map_err(program_error(name))
}

/// A map entry's key and value bytes.
type RawEntry<const K: usize, const V: usize> = ([u8; K], [u8; V]);

fn missing_map(name: &'static str) -> DatapathError {
    map_error(name)(MapError::InvalidName {
        name: name.to_owned(),
    })
}

fn missing_program(name: &'static str) -> DatapathError {
    DatapathError::Program {
        program: name,
        source: Box::new(ProgramError::UnexpectedProgramType),
    }
}

fn link_error(dir: &Path, name: &str, reason: String) -> DatapathError {
    DatapathError::Link {
        path: dir.join("links").join(name),
        reason,
    }
}

fn remove_if_present(path: &Path) -> Result<(), DatapathError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_error(path)(e)),
    }
}

/// A full map is its own error: the kernel answers E2BIG (hash, LPM trie) or ENOSPC.
fn insert_result(
    result: Result<(), MapError>,
    map: &'static str,
    capacity: u32,
) -> Result<(), DatapathError> {
    match result {
        Ok(()) => Ok(()),
        Err(MapError::SyscallError(e))
            if matches!(
                e.io_error.raw_os_error(),
                Some(nix::libc::E2BIG | nix::libc::ENOSPC)
            ) =>
        {
            Err(DatapathError::MapFull { map, capacity })
        }
        Err(e) => Err(map_error(map)(e)),
    }
}

/// Deleting what is already gone is success: the goal state holds.
fn remove_result(result: Result<(), MapError>, map: &'static str) -> Result<(), DatapathError> {
    match result {
        Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(nix::libc::ENOENT) => {
            Ok(())
        }
        Err(e) => Err(map_error(map)(e)),
    }
}

/// A dropped packet, decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DropEvent {
    /// CLOCK_MONOTONIC ns at the drop.
    pub timestamp_ns: u64,
    /// Source address.
    pub src: std::net::Ipv4Addr,
    /// Destination address.
    pub dst: std::net::Ipv4Addr,
    /// Source port (0 without ports).
    pub sport: u16,
    /// Destination port.
    pub dport: u16,
    /// IP protocol number.
    pub proto: u8,
    /// The source's identity.
    pub src_identity: u32,
    /// The destination's identity.
    pub dst_identity: u32,
    /// The source's cluster id (0 when unknown).
    pub src_cluster: u16,
    /// The destination's cluster id (0 when unknown).
    pub dst_cluster: u16,
    /// The endpoint's host-side interface.
    pub ifindex: u32,
    /// `DIR_INGRESS` or `DIR_EGRESS`.
    pub direction: u8,
    /// Why (`None` for a code this agent does not know).
    pub reason: Option<Reason>,
}

impl DropEvent {
    /// Decodes the program's record; `None` when it has the wrong size.
    pub fn decode(bytes: &[u8]) -> Option<DropEvent> {
        let raw: &[u8; 40] = bytes.try_into().ok()?;
        let e = DropEventRaw::decode(raw);
        Some(DropEvent {
            timestamp_ns: e.timestamp_ns,
            src: crate::maps::ip(e.saddr),
            dst: crate::maps::ip(e.daddr),
            sport: crate::maps::host_port(e.sport),
            dport: crate::maps::host_port(e.dport),
            proto: e.proto,
            src_identity: e.src_identity,
            dst_identity: e.dst_identity,
            src_cluster: e.src_cluster,
            dst_cluster: e.dst_cluster,
            ifindex: e.ifindex,
            direction: e.direction,
            reason: Reason::from_code(e.reason),
        })
    }
}

/// Reads drop events from the ring buffer; its descriptor becomes readable when events wait.
pub struct DropReader {
    ring: RingBuf<MapData>,
}

impl std::fmt::Debug for DropReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DropReader").finish_non_exhaustive()
    }
}

impl DropReader {
    /// Every event waiting now.
    pub fn drain(&mut self) -> Vec<DropEvent> {
        let mut out = Vec::new();
        while let Some(item) = self.ring.next() {
            if let Some(event) = DropEvent::decode(&item) {
                out.push(event);
            }
        }
        out
    }
}

impl std::os::fd::AsFd for DropReader {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.ring.as_fd()
    }
}
