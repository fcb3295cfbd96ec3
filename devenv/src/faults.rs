//! Faults for disaster-recovery scenarios, each with its undo:
//!
//! - [`Env::kill_cluster`]: every process of a cluster dies at once, as in a crash (SIGKILL):
//!   its apiserver with its store, its kvstoremesh, its agents and its pods' echo servers.
//!   Each one's command line, namespace, cgroup and log are saved first
//!   (`<env>/faults/<cluster>.killed.json`), so [`Env::revive_cluster`] starts the same
//!   processes again (same flags, ports, data and state files) and records them.
//! - [`Env::restart_daemon`]: one daemon (an apiserver with its store, a kvstoremesh, an
//!   agent) is stopped with SIGTERM and started again as it was, as in a rolling restart.
//! - [`Env::cut_cluster`]: the cluster's nodes lose the underlay (their veths' host ends go
//!   down) and its store stops answering the other clusters (an nftables table of the
//!   environment silently drops every packet between the store's port and a socket of
//!   another cluster's daemons, told apart by their cgroups, as a partition would); nothing
//!   is killed, and the cluster's own apiserver and kvstoremesh keep their store.
//!   [`Env::restore_cluster`] undoes both. The table is in the record, so `down` removes it.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::env::{DevDatapath, DevError, Env, Naming};
use crate::record::Resource;
use crate::sys::{self, SysError};

/// Why a fault could not be made or undone.
#[derive(Debug, thiserror::Error)]
pub enum FaultError {
    /// The environment could not be read or changed.
    #[error(transparent)]
    Dev(#[from] DevError),
    /// A host operation failed.
    #[error(transparent)]
    Sys(#[from] SysError),
    /// The cluster is already killed.
    #[error(
        "cluster {cluster} is already killed ({file} lists its processes): \
         `clustermesh dev revive -c {cluster}` first"
    )]
    AlreadyKilled {
        /// The cluster.
        cluster: String,
        /// The file saved by the kill.
        file: PathBuf,
    },
    /// The cluster was not killed (by [`Env::kill_cluster`]), so there is nothing to revive.
    #[error("cluster {cluster} was not killed (no {file}): nothing to revive")]
    NotKilled {
        /// The cluster.
        cluster: String,
        /// The file a kill would have saved.
        file: PathBuf,
    },
    /// A process of the cluster is not running, so it cannot be killed and revived.
    #[error("{what} (pid {pid}) is not running; see its log, or `dev down` and `dev up` again")]
    NotRunning {
        /// The process.
        what: String,
        /// Its recorded pid.
        pid: i32,
    },
    /// The record names no such process (the environment was made by another version).
    #[error("the record names no process {0}")]
    NotRecorded(String),
    /// A running process could not be inspected.
    #[error("{what} (pid {pid}): reading {path}: {source}")]
    Proc {
        /// The process.
        what: String,
        /// Its pid.
        pid: i32,
        /// What was read.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A file of the faults could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The kill's file does not parse.
    #[error("{path}: {source}")]
    Saved {
        /// The file.
        path: PathBuf,
        /// The parser's complaint.
        source: serde_json::Error,
    },
    /// A process's command line read empty (it was exiting).
    #[error("{0}: empty command line")]
    EmptyCommandLine(String),
    /// Processes still ran after SIGKILL.
    #[error("still running after SIGKILL: {0}")]
    Survivors(String),
    /// The cluster is already cut off.
    #[error("cluster {0} is already cut off: `clustermesh dev restore -c {0}` first")]
    AlreadyCut(String),
    /// The cluster is not cut off.
    #[error("cluster {0} is not cut off: nothing to restore")]
    NotCut(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> FaultError + '_ {
    move |source| FaultError::Io {
        path: path.to_owned(),
        source,
    }
}

/// A process of a cluster, and how to start it again.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Process {
    /// What it is, as recorded (`a/apiserver`, `a-node-1/agent`, `pod a/shop/web-0`).
    what: String,
    /// Its pid when it was killed.
    pid: i32,
    /// Its start time.
    start_time: u64,
    /// Its command line.
    argv: Vec<String>,
    /// Its network namespace (`None`: the host's).
    netns: Option<String>,
    /// Its cgroup.
    cgroup: PathBuf,
    /// Where its output goes.
    log: PathBuf,
    /// The pod it serves, as `namespace/name`.
    pod: Option<(String, String)>,
}

/// How long a SIGKILLed process may take to be gone.
const KILL_WAIT: Duration = Duration::from_secs(5);

impl Env {
    fn faults_dir(&self) -> PathBuf {
        self.dir.join("faults")
    }

    fn killed_file(&self, cluster: &str) -> PathBuf {
        self.faults_dir().join(format!("{cluster}.killed.json"))
    }

    /// The nftables table (family `inet`) that cuts `cluster`'s store off.
    fn cut_table(&self, cluster: &str) -> String {
        let naming = Naming::new(&self.state.name);
        format!("{}_cut_{cluster}", naming.link_prefix()).replace('-', "_")
    }

    /// The running processes of `cluster` (its daemons as last recorded, its pods' servers),
    /// each checked to be running.
    fn cluster_processes(&self, cluster: &str) -> Result<Vec<Process>, FaultError> {
        let c = self.cluster(cluster)?;
        let recorded = self.record.resources().map_err(DevError::from)?;
        // The names `up` records its daemons under; a revived daemon is recorded again, so
        // the last entry of a name is the current process.
        let mut wanted: Vec<(String, Option<String>)> = vec![
            (format!("{}/apiserver", c.name), None),
            (format!("{}/kvstoremesh", c.name), None),
        ];
        let full = self.state.datapath == DevDatapath::Bpf;
        for node in &c.nodes {
            wanted.push((
                format!("{}/agent", node.name),
                full.then(|| node.netns.clone()),
            ));
        }
        let mut out = Vec::new();
        for (what, netns) in wanted {
            let (pid, start_time) = last_process(&recorded, &what)?;
            out.push(inspect(what, pid, start_time, netns, None)?);
        }
        for pod in c.pods.iter().filter(|_| full) {
            out.push(inspect(
                format!("pod {}/{}/{}", c.name, pod.namespace, pod.name),
                pod.pid,
                pod.start_time,
                Some(pod.netns.clone()),
                Some((pod.namespace.clone(), pod.name.clone())),
            )?);
        }
        Ok(out)
    }

    /// Kills every process of `cluster` at once with SIGKILL (its apiserver and store, its
    /// kvstoremesh, its agents, its pods' servers), after saving how to start each again.
    /// Its namespaces, links, maps and files stay. What was killed, as `what (pid)` lines.
    pub fn kill_cluster(&self, cluster: &str) -> Result<Vec<String>, FaultError> {
        let _lock = self.lock()?;
        let file = self.killed_file(cluster);
        if file.exists() {
            return Err(FaultError::AlreadyKilled {
                cluster: cluster.to_owned(),
                file,
            });
        }
        let processes = self.cluster_processes(cluster)?;
        let dir = self.faults_dir();
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        let tmp = dir.join(format!(".{cluster}.killed.json.tmp"));
        let text = serde_json::to_vec_pretty(&processes).expect("processes always serialize");
        std::fs::write(&tmp, text).map_err(io(&tmp))?;
        std::fs::rename(&tmp, &file).map_err(io(&file))?;
        for p in &processes {
            if sys::start_time(p.pid) == Some(p.start_time) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(p.pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        let deadline = Instant::now() + KILL_WAIT;
        loop {
            let alive: Vec<String> = processes
                .iter()
                .filter(|p| sys::start_time(p.pid) == Some(p.start_time))
                .map(|p| format!("{} (pid {})", p.what, p.pid))
                .collect();
            if alive.is_empty() {
                break;
            }
            if Instant::now() >= deadline {
                return Err(FaultError::Survivors(alive.join(", ")));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        tracing::info!(%cluster, processes = processes.len(), "killed");
        Ok(processes
            .iter()
            .map(|p| format!("{} (pid {})", p.what, p.pid))
            .collect())
    }

    /// Starts again every process [`Env::kill_cluster`] killed in `cluster`, with the same
    /// command lines, namespaces, cgroups and logs, records them, and waits up to `timeout`
    /// until every daemon of the environment is ready. What was started, as `what (pid)`
    /// lines.
    pub fn revive_cluster(
        &mut self,
        cluster: &str,
        timeout: Duration,
    ) -> Result<Vec<String>, FaultError> {
        let ci = {
            self.cluster(cluster)?;
            self.state
                .clusters
                .iter()
                .position(|c| c.name == cluster)
                .expect("found above")
        };
        let _lock = self.lock()?;
        let file = self.killed_file(cluster);
        let text = match std::fs::read(&file) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(FaultError::NotKilled {
                    cluster: cluster.to_owned(),
                    file,
                });
            }
            Err(e) => return Err(io(&file)(e)),
        };
        let processes: Vec<Process> =
            serde_json::from_slice(&text).map_err(|source| FaultError::Saved {
                path: file.clone(),
                source,
            })?;
        let mut started = Vec::new();
        for p in &processes {
            let (program, args) = p.argv.split_first().ok_or_else(|| FaultError::Saved {
                path: file.clone(),
                source: serde::de::Error::custom(format!("{}: empty command line", p.what)),
            })?;
            let mut command = sys::command_in(p.netns.as_deref(), Some(&p.cgroup), program);
            command.args(args);
            let new = self.start(p.what.clone(), command, &p.log)?;
            if let Some((namespace, name)) = &p.pod
                && let Some(pod) = self.state.clusters[ci]
                    .pods
                    .iter_mut()
                    .find(|q| &q.namespace == namespace && &q.name == name)
            {
                pod.pid = new.pid;
                pod.start_time = new.start_time;
            }
            started.push(format!("{} (pid {})", p.what, new.pid));
        }
        self.save()?;
        std::fs::remove_file(&file).map_err(io(&file))?;
        self.wait_ready(timeout)?;
        tracing::info!(%cluster, processes = started.len(), "revived");
        Ok(started)
    }

    /// Restarts one daemon, as a rolling restart would: `what` as `up` records it
    /// (`a/apiserver` with its embedded store, `a/kvstoremesh`, `a-node-1/agent`). It is
    /// stopped with SIGTERM (SIGKILL after 5 s), started again with the same command line,
    /// namespace, cgroup and log, recorded, and waited for until every daemon of the
    /// environment is ready (up to `timeout`). The new process, as `what (pid)`.
    pub fn restart_daemon(&self, what: &str, timeout: Duration) -> Result<String, FaultError> {
        let _lock = self.lock()?;
        let netns = self
            .state
            .clusters
            .iter()
            .flat_map(|c| &c.nodes)
            .find(|n| format!("{}/agent", n.name) == what)
            .filter(|_| self.state.datapath == DevDatapath::Bpf)
            .map(|n| n.netns.clone());
        let recorded = self.record.resources().map_err(DevError::from)?;
        let (pid, start_time) = last_process(&recorded, what)?;
        let p = inspect(what.to_owned(), pid, start_time, netns, None)?;
        let target = nix::unistd::Pid::from_raw(p.pid);
        for signal in [
            nix::sys::signal::Signal::SIGTERM,
            nix::sys::signal::Signal::SIGKILL,
        ] {
            if sys::start_time(p.pid) == Some(p.start_time) {
                let _ = nix::sys::signal::kill(target, signal);
            }
            let deadline = Instant::now() + KILL_WAIT;
            while sys::start_time(p.pid) == Some(p.start_time) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        if sys::start_time(p.pid) == Some(p.start_time) {
            return Err(FaultError::Survivors(format!("{what} (pid {})", p.pid)));
        }
        let (program, args) = p
            .argv
            .split_first()
            .ok_or_else(|| FaultError::EmptyCommandLine(what.to_owned()))?;
        let mut command = sys::command_in(p.netns.as_deref(), Some(&p.cgroup), program);
        command.args(args);
        let new = self.start(p.what.clone(), command, &p.log)?;
        self.wait_ready(timeout)?;
        tracing::info!(%what, pid = new.pid, "restarted");
        Ok(format!("{what} (pid {})", new.pid))
    }

    /// The host ends of `cluster`'s nodes' veths (numbered over every node of the
    /// environment in order, as `up` made them).
    fn node_links(&self, cluster: &str) -> Vec<String> {
        let naming = Naming::new(&self.state.name);
        self.state
            .clusters
            .iter()
            .flat_map(|c| c.nodes.iter().map(move |_| c.name.as_str()))
            .enumerate()
            .filter(|(_, c)| *c == cluster)
            .map(|(index, _)| naming.node_link(index))
            .collect()
    }

    /// Cuts `cluster` off the underlay: its nodes' veths go down and every packet between its
    /// store's port and another cluster's daemons is dropped; its processes keep running.
    /// What was cut, as lines.
    pub fn cut_cluster(&self, cluster: &str) -> Result<Vec<String>, FaultError> {
        let c = self.cluster(cluster)?;
        self.require_datapath("dev cut")?;
        let _lock = self.lock()?;
        let table = self.cut_table(cluster);
        if nft_table_exists(&table) {
            return Err(FaultError::AlreadyCut(cluster.to_owned()));
        }
        self.record
            .add(&Resource::NftTable {
                name: table.clone(),
            })
            .map_err(DevError::from)?;
        let (ip, port) = (c.store.ip().to_string(), c.store.port().to_string());
        // Only sockets of other clusters' daemons lose the store: a packet's local socket
        // (the sender's on output, the receiver's on input) is matched by its cgroup, so the
        // cluster's own apiserver and kvstoremesh keep theirs, as a cluster's control plane
        // would in a partition between clusters.
        let naming = Naming::new(&self.state.name);
        let (all, own) = (naming.daemons(), naming.cluster_daemons(cluster));
        let others =
            format!("socket cgroupv2 level 1 \"{all}\" socket cgroupv2 level 2 != \"{own}\"");
        let script = format!(
            "table inet {table} {{\n\
             \tchain output {{ type filter hook output priority -10; \
             ip daddr {ip} tcp dport {port} {others} drop; }}\n\
             \tchain input {{ type filter hook input priority -10; \
             ip saddr {ip} tcp sport {port} {others} drop; }}\n\
             }}\n"
        );
        nft_script(&script)?;
        let mut cut = vec![format!("store {} (nftables table inet {table})", c.store)];
        for link in self.node_links(cluster) {
            sys::ip(["link", "set", &link, "down"])?;
            cut.push(format!("link {link}"));
        }
        tracing::info!(%cluster, "cut off the underlay");
        Ok(cut)
    }

    /// Undoes [`Env::cut_cluster`]: the nodes' veths come up and the store answers again.
    /// What was restored, as lines.
    pub fn restore_cluster(&self, cluster: &str) -> Result<Vec<String>, FaultError> {
        self.cluster(cluster)?;
        let _lock = self.lock()?;
        let table = self.cut_table(cluster);
        if !nft_table_exists(&table) {
            return Err(FaultError::NotCut(cluster.to_owned()));
        }
        let mut restored = Vec::new();
        for link in self.node_links(cluster) {
            sys::ip(["link", "set", &link, "up"])?;
            restored.push(format!("link {link}"));
        }
        sys::run(std::process::Command::new("nft").args(["delete", "table", "inet", &table]))?;
        restored.push(format!("store (nftables table inet {table} removed)"));
        tracing::info!(%cluster, "back on the underlay");
        Ok(restored)
    }
}

/// The pid and start time of the last process the record names `what` (a restarted or
/// revived daemon is recorded again).
fn last_process(recorded: &[Resource], what: &str) -> Result<(i32, u64), FaultError> {
    recorded
        .iter()
        .rev()
        .find_map(|r| match r {
            Resource::Process {
                what: w,
                pid,
                start_time,
            } if w == what => Some((*pid, *start_time)),
            _ => None,
        })
        .ok_or_else(|| FaultError::NotRecorded(what.to_owned()))
}

/// Reads how to start process `pid` again, after checking it is the one recorded.
fn inspect(
    what: String,
    pid: i32,
    start_time: u64,
    netns: Option<String>,
    pod: Option<(String, String)>,
) -> Result<Process, FaultError> {
    if sys::start_time(pid) != Some(start_time) {
        return Err(FaultError::NotRunning { what, pid });
    }
    let proc_err = |what: &str, path: PathBuf| {
        let what = what.to_owned();
        move |source| FaultError::Proc {
            what,
            pid,
            path,
            source,
        }
    };
    let cmdline = PathBuf::from(format!("/proc/{pid}/cmdline"));
    let raw = std::fs::read(&cmdline).map_err(proc_err(&what, cmdline.clone()))?;
    let argv: Vec<String> = raw
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let cgroups = PathBuf::from(format!("/proc/{pid}/cgroup"));
    let raw = std::fs::read_to_string(&cgroups).map_err(proc_err(&what, cgroups.clone()))?;
    // The cgroup2 line is `0::/path`; a process always has one on a kernel with cgroup2.
    let cgroup = raw
        .lines()
        .find_map(|line| line.strip_prefix("0::"))
        .map(|path| sys::cgroup2_root().join(path.trim_start_matches('/')))
        .ok_or_else(|| FaultError::Proc {
            what: what.clone(),
            pid,
            path: cgroups.clone(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, "no cgroup2 line"),
        })?;
    let stdout = PathBuf::from(format!("/proc/{pid}/fd/1"));
    let log = std::fs::read_link(&stdout).map_err(proc_err(&what, stdout.clone()))?;
    Ok(Process {
        what,
        pid,
        start_time,
        argv,
        netns,
        cgroup,
        log,
        pod,
    })
}

/// Whether nftables table `inet name` exists.
pub(crate) fn nft_table_exists(name: &str) -> bool {
    std::process::Command::new("nft")
        .args(["list", "table", "inet", name])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Runs an nftables script (`nft -f -`). nft resolves `socket cgroupv2` paths under
/// `/sys/fs/cgroup` only, which is not where every host mounts cgroup2 (hybrid hosts have it
/// at `/sys/fs/cgroup/unified`), so it runs in a mount namespace of its own with the cgroup2
/// hierarchy mounted there; the rules it loads hold cgroup ids, the same in every namespace.
fn nft_script(script: &str) -> Result<(), FaultError> {
    use std::io::Write;
    let mut child = std::process::Command::new("unshare")
        .args([
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            "mount -t cgroup2 cgroup2 /sys/fs/cgroup && exec nft -f -",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|source| SysError::Spawn {
            command: "nft -f -".to_owned(),
            source,
        })?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .map_err(|source| SysError::Spawn {
                command: "nft -f -".to_owned(),
                source,
            })?;
    }
    let out = child.wait_with_output().map_err(|source| SysError::Spawn {
        command: "nft -f -".to_owned(),
        source,
    })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(SysError::Failed {
            command: format!("nft -f - <<< {script:?}"),
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        }
        .into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dead_process_cannot_be_inspected_and_a_live_one_gives_its_command_line() {
        let err = inspect("x".into(), i32::MAX, 1, None, None).unwrap_err();
        assert!(
            err.to_string()
                .contains("x (pid 2147483647) is not running"),
            "{err}"
        );
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        let mut command = std::process::Command::new("sleep");
        command.arg("30");
        let started = sys::spawn_detached(command, &log).unwrap();
        // Until the child has exec'd, /proc shows no (or the parent's) command line.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let p = loop {
            let p = inspect(
                "sleeper".into(),
                started.pid,
                started.start_time,
                None,
                None,
            )
            .unwrap();
            if p.argv == ["sleep", "30"] || std::time::Instant::now() > deadline {
                break p;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        assert_eq!(p.argv, ["sleep", "30"]);
        assert_eq!(p.log, log);
        // Started in no cgroup of its own: it is in ours.
        let ours = std::fs::read_to_string("/proc/self/cgroup").unwrap();
        let ours = ours.lines().find_map(|l| l.strip_prefix("0::")).unwrap();
        assert_eq!(
            p.cgroup,
            sys::cgroup2_root().join(ours.trim_start_matches('/'))
        );
        assert!(sys::stop_process(
            started.pid,
            started.start_time,
            Duration::from_secs(2)
        ));
    }
}
