//! A replicated store for tests: `n` members of real etcd or of our `kvstore serve`, started
//! together with etcd's own clustering flags, each on its own loopback ports with its own data
//! dir and log file, all SIGKILLed when the handle is dropped.
//!
//! Both backends get the same member flags (`--name`, `--data-dir`, `--listen-client-urls`,
//! `--advertise-client-urls`, `--listen-peer-urls`, `--initial-advertise-peer-urls`,
//! `--initial-cluster`, `--initial-cluster-state new`, `--initial-cluster-token`), so a test
//! written against etcd runs unchanged against ours; only etcd also gets the logging flags
//! [`crate::StoreProcess`] gives it, and ours is started as `<bin> serve ...`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use etcd_client::{Client, ConnectOptions};

use crate::Error;
use crate::faultproxy::FaultProxy;
use crate::process::{
    Attempt, Backend, PORT_ATTEMPTS, etcd_process_settings, free_ports, is_port_clash,
    kill_and_reap, log_tail, probe_status, send_signal, spawn_logged,
};

/// How long all members get to answer `Maintenance.Status` and elect a leader, and how long a
/// restarted member gets to answer again. Twice a single store's
/// [`crate::DEFAULT_STARTUP_TIMEOUT`]: members wait for each other and then hold an election,
/// on a machine shared with parallel tests and builds.
pub const CLUSTER_STARTUP_TIMEOUT: Duration = Duration::from_secs(30);

/// How long [`StoreCluster::leader`] waits for the members to agree. etcd's election timeout
/// is 1 s, but on a loaded machine elections can split or time out several times in a row.
const LEADER_TIMEOUT: Duration = Duration::from_secs(30);

/// A running cluster. Dropping it SIGKILLs every member (also when the test panics) and
/// removes the temp dir holding their data dirs and logs.
#[derive(Debug)]
pub struct StoreCluster {
    backend: Backend,
    /// Declared before `work`: fields drop in order, so every process is dead before its data
    /// dir is removed.
    members: Vec<Member>,
    /// `--initial-cluster-token`: unique per cluster, so that members of two clusters started
    /// by parallel tests can never join each other even if one reuses the other's ports.
    token: String,
    /// Holds each member's data dir (`m<i>`) and log (`m<i>.log`).
    work: tempfile::TempDir,
    /// More arguments for every member (e.g. `--snapshot-count 20`).
    extra_args: Vec<String>,
    /// With [`StoreCluster::start_proxied`]: one fault proxy in front of each member's peer
    /// port, through which every other member reaches it.
    proxies: Vec<FaultProxy>,
}

/// One member of a [`StoreCluster`]. Its ports, data dir and log stay the same across
/// [`StoreCluster::restart`].
#[derive(Debug)]
pub struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    /// The port the others reach it at, when a fault proxy stands in front of its peer port.
    advertised_peer_port: Option<u16>,
    data_dir: PathBuf,
    log_path: PathBuf,
    /// `None` after [`StoreCluster::kill`].
    child: Option<Child>,
    pid: u32,
}

impl Member {
    /// The member's name, `m<i>` (etcd's `--name`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The client URL, `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    /// The peer URL the other members reach it at (its proxy's, if it has one).
    pub fn peer_url(&self) -> String {
        format!(
            "http://127.0.0.1:{}",
            self.advertised_peer_port.unwrap_or(self.peer_port)
        )
    }

    /// The peer URL it listens on.
    fn listen_peer_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.peer_port)
    }

    /// The data dir (kept across restarts).
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The file that receives the member's stdout and stderr (appended across restarts).
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The PID of the current (or last) process.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    fn kill(&mut self) {
        kill_and_reap(&mut self.child);
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        self.kill();
    }
}

impl StoreCluster {
    /// Starts `n` members at once and waits, up to [`CLUSTER_STARTUP_TIMEOUT`], until every
    /// member answers `Maintenance.Status` and one of them reports a leader, so that the first
    /// KV request does not stall on an election.
    ///
    /// All ports are picked up front because every member's command line names every peer
    /// URL. If any member finds its port taken, the whole cluster is started again on new
    /// ports: a cluster whose `--initial-cluster` names a port someone else holds cannot form.
    pub async fn start(backend: Backend, n: usize) -> Result<Self, Error> {
        Self::start_with_args(backend, n, Vec::new()).await
    }

    /// Like [`StoreCluster::start_with_args`], with a fault proxy in front of each member's
    /// peer port ([`StoreCluster::peer_proxy`]): faulting one cuts, slows or breaks what the
    /// other members send to that member, which partitions it (it hears no leader, and its
    /// own campaigns get no answer).
    pub async fn start_proxied(
        backend: Backend,
        n: usize,
        extra_args: Vec<String>,
    ) -> Result<Self, Error> {
        Self::start_inner(backend, n, extra_args, true).await
    }

    /// Like [`StoreCluster::start`], with more arguments for every member (also on restart).
    pub async fn start_with_args(
        backend: Backend,
        n: usize,
        extra_args: Vec<String>,
    ) -> Result<Self, Error> {
        Self::start_inner(backend, n, extra_args, false).await
    }

    async fn start_inner(
        backend: Backend,
        n: usize,
        extra_args: Vec<String>,
        proxied: bool,
    ) -> Result<Self, Error> {
        assert!(n > 0, "a cluster needs at least one member");
        let work = tempfile::Builder::new()
            .prefix(&format!("testkit-cluster-{}-", backend.name()))
            .tempdir()
            .map_err(|e| Error::io("create cluster temp dir", e))?;
        // The temp dir's name is unique on this machine for as long as the cluster exists.
        let token = work
            .path()
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        let members = (0..n)
            .map(|i| Member {
                name: format!("m{i}"),
                client_port: 0,
                peer_port: 0,
                advertised_peer_port: None,
                data_dir: work.path().join(format!("m{i}")),
                log_path: work.path().join(format!("m{i}.log")),
                child: None,
                pid: 0,
            })
            .collect();
        let mut cluster = StoreCluster {
            backend,
            members,
            token,
            work,
            extra_args,
            proxies: Vec::new(),
        };
        let all: Vec<usize> = (0..n).collect();
        let mut last_tail = String::new();
        for _ in 0..PORT_ATTEMPTS {
            let ports = free_ports(2 * n)?;
            for (member, pair) in cluster.members.iter_mut().zip(ports.chunks(2)) {
                member.client_port = pair[0];
                member.peer_port = pair[1];
            }
            if proxied {
                for proxy in cluster.proxies.drain(..) {
                    proxy.stop().await;
                }
                for member in &mut cluster.members {
                    let upstream = std::net::SocketAddr::from(([127, 0, 0, 1], member.peer_port));
                    let (proxy, addr) = FaultProxy::start(upstream)
                        .await
                        .map_err(|e| Error::io("start a peer proxy", std::io::Error::other(e)))?;
                    member.advertised_peer_port = Some(addr.port());
                    cluster.proxies.push(proxy);
                }
            }
            for i in 0..n {
                cluster.spawn(i)?;
            }
            match cluster.wait_ready(&all, true).await {
                Ok(()) => return Ok(cluster),
                Err(Attempt::Failed(e)) => return Err(e),
                Err(Attempt::PortClash(tail)) => {
                    last_tail = tail;
                    for member in &mut cluster.members {
                        member.kill();
                        // A half-initialised data dir would pin the old peer URLs; start clean.
                        let _ = std::fs::remove_dir_all(&member.data_dir);
                    }
                }
            }
        }
        Err(Error::PortsUnavailable {
            attempts: PORT_ATTEMPTS,
            log_tail: last_tail,
        })
    }

    /// The fault proxy in front of member `i`'s peer port. Panics unless the cluster was
    /// started with [`StoreCluster::start_proxied`].
    pub fn peer_proxy(&self, i: usize) -> &FaultProxy {
        &self.proxies[i]
    }

    /// Every member's client URL, in member order (killed members included).
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(Member::endpoint).collect()
    }

    /// Member `i`.
    pub fn member(&self, i: usize) -> &Member {
        &self.members[i]
    }

    /// The temp dir holding every member's data dir and log.
    pub fn work_dir(&self) -> &Path {
        self.work.path()
    }

    /// A client that talks to member `i` only, so a test controls which member serves a
    /// request (a follower forwards writes and linearizable reads to the leader itself).
    /// Panics on failure, like [`crate::StoreProcess::client`]; connecting is lazy, so a
    /// killed member only fails the requests.
    pub async fn client(&self, i: usize) -> Client {
        connect(&[self.members[i].endpoint()]).await
    }

    /// A client balancing over every member's endpoint, as an application would use it.
    pub async fn client_all(&self) -> Client {
        connect(&self.endpoints()).await
    }

    /// The index of the member that the members answering `Maintenance.Status` agree is leader,
    /// waiting up to 30 s for them to agree.
    ///
    /// Agreement means: a majority of all members answers (fewer cannot commit anything, so
    /// their leader would be useless to the test), every answer names the same leader, and that
    /// leader is one of the answering members (its own status header carries its member id).
    /// Killed and frozen members do not answer, so right after the leader is killed this waits
    /// for the survivors to elect a new one instead of returning the one they still remember.
    pub async fn leader(&self) -> Result<usize, Error> {
        let deadline = Instant::now() + LEADER_TIMEOUT;
        loop {
            let mut answers = Vec::new();
            let mut seen = Vec::new();
            for (i, member) in self.members.iter().enumerate() {
                if member.child.is_none() {
                    seen.push(format!("{}: killed", member.name));
                    continue;
                }
                match probe_status(&member.endpoint(), member.client_port, connect_options()).await
                {
                    Ok(status) => {
                        let id = status.header().map_or(0, |h| h.member_id());
                        seen.push(format!(
                            "{}: id {id:x}, leader {:x}",
                            member.name,
                            status.leader()
                        ));
                        answers.push((i, id, status.leader()));
                    }
                    Err(e) => seen.push(format!("{}: {e}", member.name)),
                }
            }
            if let Some(leader) = agreed_leader(&answers, self.members.len()) {
                return Ok(leader);
            }
            if Instant::now() >= deadline {
                return Err(Error::NoLeader {
                    timeout: LEADER_TIMEOUT,
                    last_seen: seen.join("; "),
                    log_tail: self.log_tails(),
                });
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// SIGKILLs member `i` and reaps it. No-op if it is not running.
    pub fn kill(&mut self, i: usize) {
        self.members[i].kill();
    }

    /// Kills member `i` if it runs and starts it again with the same flags, data dir and ports,
    /// waiting until it answers `Maintenance.Status`.
    ///
    /// The flags still say `--initial-cluster-state new`: etcd ignores the `--initial-*` flags
    /// once the data dir holds a member, so the restarted member rejoins with its old identity.
    /// A port still held by the dying process is retried for a few seconds.
    pub async fn restart(&mut self, i: usize) -> Result<(), Error> {
        self.kill(i);
        let mut last_tail = String::new();
        for _ in 0..PORT_ATTEMPTS * 4 {
            self.spawn(i)?;
            match self.wait_ready(&[i], false).await {
                Ok(()) => return Ok(()),
                Err(Attempt::Failed(e)) => return Err(e),
                Err(Attempt::PortClash(tail)) => {
                    last_tail = tail;
                    self.kill(i);
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            }
        }
        Err(Error::PortsUnavailable {
            attempts: PORT_ATTEMPTS * 4,
            log_tail: last_tail,
        })
    }

    /// Freezes member `i` with SIGSTOP: its connections stay open and it answers nothing, as
    /// with a hung or partitioned member. [`StoreCluster::kill`] (and drop) still end it.
    pub fn freeze(&self, i: usize) {
        send_signal(self.running_pid(i), "STOP");
    }

    /// Resumes member `i` after [`StoreCluster::freeze`].
    pub fn thaw(&self, i: usize) {
        send_signal(self.running_pid(i), "CONT");
    }

    /// The last lines of member `i`'s log, for assertion messages.
    pub fn log_tail(&self, i: usize) -> String {
        log_tail(&self.members[i].log_path)
    }

    /// The PID of member `i`, which must be running: a killed member's PID is reaped and may
    /// already belong to an unrelated process.
    fn running_pid(&self, i: usize) -> u32 {
        let member = &self.members[i];
        assert!(
            member.child.is_some(),
            "{} is not running (killed); restart it first",
            member.name
        );
        member.pid
    }

    /// Every member's log tail under a header naming it: a cluster that fails to form usually
    /// needs all sides of the story.
    pub fn log_tails(&self) -> String {
        self.members
            .iter()
            .enumerate()
            .map(|(i, m)| {
                format!(
                    "--- {} ({}) ---\n{}",
                    m.name,
                    m.log_path.display(),
                    self.log_tail(i)
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The command line of member `i`: the same etcd clustering flags for both backends.
    fn command(&self, i: usize) -> Command {
        let member = &self.members[i];
        let initial_cluster = self
            .members
            .iter()
            .map(|m| format!("{}={}", m.name, m.peer_url()))
            .collect::<Vec<_>>()
            .join(",");
        let mut cmd = Command::new(self.backend.program());
        if let Backend::Embedded { .. } = self.backend {
            cmd.arg("serve");
        }
        cmd.arg("--name")
            .arg(&member.name)
            .arg("--data-dir")
            .arg(&member.data_dir)
            .arg("--listen-client-urls")
            .arg(member.endpoint())
            .arg("--advertise-client-urls")
            .arg(member.endpoint())
            .arg("--listen-peer-urls")
            .arg(member.listen_peer_url())
            .arg("--initial-advertise-peer-urls")
            .arg(member.peer_url())
            .arg("--initial-cluster")
            .arg(initial_cluster)
            .arg("--initial-cluster-state")
            .arg("new")
            .arg("--initial-cluster-token")
            .arg(&self.token);
        if self.backend == Backend::Etcd {
            etcd_process_settings(&mut cmd);
        }
        cmd.args(&self.extra_args);
        cmd
    }

    fn spawn(&mut self, i: usize) -> Result<(), Error> {
        let child = spawn_logged(self.command(i), &self.members[i].log_path)?;
        let member = &mut self.members[i];
        member.pid = child.id();
        member.child = Some(child);
        Ok(())
    }

    /// Waits until every member in `which` answers `Maintenance.Status` and, with
    /// `need_leader`, one of them reports a leader. A member that exits meanwhile fails the
    /// wait (as a port clash if its log says so, for the caller to retry).
    async fn wait_ready(&mut self, which: &[usize], need_leader: bool) -> Result<(), Attempt> {
        let deadline = Instant::now() + CLUSTER_STARTUP_TIMEOUT;
        loop {
            let mut waiting = Vec::new();
            let mut leader_seen = false;
            for &i in which {
                self.check_running(i)?;
                let member = &self.members[i];
                match probe_status(&member.endpoint(), member.client_port, connect_options()).await
                {
                    Ok(status) => leader_seen |= status.leader() != 0,
                    Err(e) => waiting.push(format!("{}: {e}", member.name)),
                }
            }
            if need_leader && waiting.is_empty() && !leader_seen {
                waiting.push("no member reports a leader yet".to_owned());
            }
            if waiting.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let tail = self.log_tails();
                if is_port_clash(&tail) {
                    return Err(Attempt::PortClash(tail));
                }
                return Err(Attempt::Failed(Error::NotReady {
                    program: self.backend.program(),
                    timeout: CLUSTER_STARTUP_TIMEOUT,
                    last_error: waiting.join("; "),
                    log_tail: tail,
                }));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Fails if member `i` has exited: with its log tail, as a port clash if that is why.
    fn check_running(&mut self, i: usize) -> Result<(), Attempt> {
        let member = &mut self.members[i];
        let Some(Ok(Some(status))) = member.child.as_mut().map(Child::try_wait) else {
            return Ok(());
        };
        member.child = None;
        let tail = self.log_tail(i);
        if is_port_clash(&tail) {
            return Err(Attempt::PortClash(tail));
        }
        Err(Attempt::Failed(Error::Exited {
            program: self.backend.program(),
            status: format!("{status} ({})", self.members[i].name),
            log_tail: tail,
        }))
    }
}

/// Plain text (the cluster has no TLS option) with the same connect timeout as
/// [`crate::StoreProcess::connect_options`].
fn connect_options() -> ConnectOptions {
    ConnectOptions::new().with_connect_timeout(Duration::from_secs(5))
}

async fn connect(endpoints: &[String]) -> Client {
    Client::connect(endpoints, Some(connect_options()))
        .await
        .unwrap_or_else(|e| panic!("client for {endpoints:?}: {e}"))
}

/// The leader that a majority of `members` agrees on, given each answering member's
/// `(index, own member id, leader id)`; see [`StoreCluster::leader`].
fn agreed_leader(answers: &[(usize, u64, u64)], members: usize) -> Option<usize> {
    let &(_, _, leader) = answers.first()?;
    if leader == 0 || answers.len() <= members / 2 || answers.iter().any(|a| a.2 != leader) {
        return None;
    }
    answers.iter().find(|a| a.1 == leader).map(|a| a.0)
}

#[cfg(test)]
mod tests {
    use super::agreed_leader;

    #[test]
    fn leader_needs_a_majority_that_agrees_and_answers_itself() {
        // Three members, ids 10, 20, 30.
        assert_eq!(
            agreed_leader(&[(0, 10, 20), (1, 20, 20), (2, 30, 20)], 3),
            Some(1)
        );
        assert_eq!(agreed_leader(&[(0, 10, 30), (2, 30, 30)], 3), Some(2));
        // The survivors still remember a leader that no longer answers.
        assert_eq!(agreed_leader(&[(0, 10, 20), (2, 30, 20)], 3), None);
        // Disagreement mid-election, no leader at all, and a minority.
        assert_eq!(agreed_leader(&[(0, 10, 10), (2, 30, 30)], 3), None);
        assert_eq!(agreed_leader(&[(0, 10, 0), (1, 20, 0)], 3), None);
        assert_eq!(agreed_leader(&[(0, 10, 10)], 3), None);
        assert_eq!(agreed_leader(&[], 3), None);
    }
}
