//! Store processes for tests: real etcd or our `kvstore serve`, each on its own free loopback
//! ports with its own data dir, killed when the handle is dropped.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::{Client, ConnectOptions, StatusResponse};

use crate::{Error, TestPki};

/// How long a store gets to answer `Maintenance.Status` after spawning. Generous because the
/// machine is shared with parallel tests and builds.
pub const DEFAULT_STARTUP_TIMEOUT: Duration = Duration::from_secs(15);

/// How many times a start is retried when the picked ports turn out to be taken.
pub(crate) const PORT_ATTEMPTS: u32 = 5;

/// Which store implementation to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    /// Real etcd (`etcd` on `PATH`, or `$ETCD_BIN`), the reference implementation.
    Etcd,
    /// Our server, `<bin> serve ...`. In kvstore's tests, `bin` is
    /// `env!("CARGO_BIN_EXE_kvstore")`.
    Embedded {
        /// Path of the `kvstore` binary.
        bin: PathBuf,
    },
}

impl Backend {
    /// A short name for test output: `etcd` or `embedded`.
    pub fn name(&self) -> &'static str {
        match self {
            Backend::Etcd => "etcd",
            Backend::Embedded { .. } => "embedded",
        }
    }

    pub(crate) fn program(&self) -> PathBuf {
        match self {
            Backend::Etcd => std::env::var_os("ETCD_BIN")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("etcd")),
            Backend::Embedded { bin } => bin.clone(),
        }
    }
}

/// Both backends, etcd first. The embedded binary's path comes from the caller because only
/// the kvstore crate's own tests know it (`env!("CARGO_BIN_EXE_kvstore")`).
pub fn backends(embedded_bin: impl Into<PathBuf>) -> Vec<Backend> {
    vec![
        Backend::Etcd,
        Backend::Embedded {
            bin: embedded_bin.into(),
        },
    ]
}

/// How to start a store. `Default` is a plain-text store with the server's own defaults.
#[derive(Debug, Default, Clone)]
pub struct StoreOptions {
    /// Serve TLS with `pki.server()` and require client certificates from `pki`'s CA;
    /// [`StoreProcess::client`] then presents `pki.client("root")`.
    pub tls: Option<Arc<TestPki>>,
    /// `--max-request-bytes`.
    pub max_request_bytes: Option<usize>,
    /// Watch progress notification interval (etcd:
    /// `--experimental-watch-progress-notify-interval`, ours: `--watch-progress-notify-interval`).
    pub progress_notify_interval: Option<Duration>,
    /// Use this data dir instead of a fresh temp dir. It is not removed on drop, so a test can
    /// start a second process on the same data.
    pub data_dir: Option<PathBuf>,
    /// Overrides [`DEFAULT_STARTUP_TIMEOUT`].
    pub startup_timeout: Option<Duration>,
    /// More command-line arguments for the store, after the ones derived from the fields above
    /// (e.g. `--cluster-name a` for ours).
    pub extra_args: Vec<String>,
    /// The CN that [`StoreProcess::client`] and the readiness probe present under TLS
    /// (default `root`); a store with access rules needs one of its users, e.g. `admin-a`.
    pub client_cn: Option<String>,
}

/// A running store. Dropping it SIGKILLs the process (also when the test panics) and removes
/// its temp dir.
pub struct StoreProcess {
    backend: Backend,
    opts: StoreOptions,
    child: Option<Child>,
    pid: u32,
    /// Holds the log and, unless `opts.data_dir` is set, the data dir.
    work: tempfile::TempDir,
    data_dir: PathBuf,
    client_port: u16,
    peer_port: u16,
    log_path: PathBuf,
}

impl fmt::Debug for StoreProcess {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoreProcess")
            .field("backend", &self.backend)
            .field("pid", &self.pid)
            .field("endpoint", &self.endpoint())
            .field("data_dir", &self.data_dir)
            .field("log", &self.log_path)
            .finish_non_exhaustive()
    }
}

/// Why one start attempt failed: a port clash is retried with new ports, anything else is final.
pub(crate) enum Attempt {
    PortClash(String),
    Failed(Error),
}

impl StoreProcess {
    /// Starts the store on free loopback ports and waits until it answers `Maintenance.Status`
    /// (for etcd: and has elected itself leader, so the first KV request does not stall).
    pub async fn start(backend: Backend, opts: StoreOptions) -> Result<Self, Error> {
        let work = tempfile::Builder::new()
            .prefix(&format!("testkit-{}-", backend.name()))
            .tempdir()
            .map_err(|e| Error::io("create store temp dir", e))?;
        let (data_dir, owned_data) = match &opts.data_dir {
            Some(d) => (d.clone(), false),
            None => (work.path().join("data"), true),
        };
        let log_path = work.path().join("store.log");
        let mut store = StoreProcess {
            backend,
            opts,
            child: None,
            pid: 0,
            work,
            data_dir,
            client_port: 0,
            peer_port: 0,
            log_path,
        };
        let mut last_tail = String::new();
        for _ in 0..PORT_ATTEMPTS {
            let ports = free_ports(2)?;
            store.client_port = ports[0];
            store.peer_port = ports[1];
            match store.spawn_and_wait().await {
                Ok(()) => return Ok(store),
                Err(Attempt::Failed(e)) => return Err(e),
                Err(Attempt::PortClash(tail)) => {
                    last_tail = tail;
                    store.kill();
                    // A half-initialised data dir would pin the old peer URL; start clean.
                    if owned_data {
                        let _ = std::fs::remove_dir_all(&store.data_dir);
                    }
                }
            }
        }
        Err(Error::PortsUnavailable {
            attempts: PORT_ATTEMPTS,
            log_tail: last_tail,
        })
    }

    /// `http://127.0.0.1:PORT`, or `https://...` with TLS.
    pub fn endpoint(&self) -> String {
        let scheme = if self.opts.tls.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://127.0.0.1:{}", self.client_port)
    }

    /// The client port.
    pub fn port(&self) -> u16 {
        self.client_port
    }

    /// The PID of the current (or last) process.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Which implementation this is.
    pub fn backend(&self) -> &Backend {
        &self.backend
    }

    /// The options it was started with.
    pub fn options(&self) -> &StoreOptions {
        &self.opts
    }

    /// The data dir (kept across [`StoreProcess::restart`]).
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The temp dir holding the log (and the data dir unless one was given).
    pub fn work_dir(&self) -> &Path {
        self.work.path()
    }

    /// The file that receives the process's stdout and stderr (appended across restarts).
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The last lines of the log, for assertion messages.
    pub fn log_tail(&self) -> String {
        log_tail(&self.log_path)
    }

    /// Whether the process is still running (false after [`StoreProcess::kill`] or a crash).
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(Child::try_wait), Some(Ok(None)))
    }

    /// Freezes the process with SIGSTOP: connections stay open and nothing answers, as with
    /// a hung or partitioned store. [`StoreProcess::kill`] (and drop) still end it.
    pub fn freeze(&self) {
        send_signal(self.pid, "STOP");
    }

    /// Resumes a process frozen by [`StoreProcess::freeze`].
    pub fn thaw(&self) {
        send_signal(self.pid, "CONT");
    }

    /// SIGKILLs the process and reaps it. No-op if it is not running.
    pub fn kill(&mut self) {
        kill_and_reap(&mut self.child);
    }

    /// Kills the process if it runs and starts it again on the same data dir and port, waiting
    /// until ready. A port still held by the dying process is retried for a few seconds.
    pub async fn restart(&mut self) -> Result<(), Error> {
        self.kill();
        let mut last_tail = String::new();
        for _ in 0..PORT_ATTEMPTS * 4 {
            match self.spawn_and_wait().await {
                Ok(()) => return Ok(()),
                Err(Attempt::Failed(e)) => return Err(e),
                Err(Attempt::PortClash(tail)) => {
                    last_tail = tail;
                    self.kill();
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            }
        }
        Err(Error::PortsUnavailable {
            attempts: PORT_ATTEMPTS * 4,
            log_tail: last_tail,
        })
    }

    /// Connect options for this store: with TLS, trusting the test CA and presenting the
    /// `root` client certificate.
    pub fn connect_options(&self) -> ConnectOptions {
        let opts = ConnectOptions::new().with_connect_timeout(Duration::from_secs(5));
        match &self.opts.tls {
            Some(pki) => {
                let cn = self.opts.client_cn.as_deref().unwrap_or("root");
                opts.with_tls(pki.client(cn).tls_options())
            }
            None => opts,
        }
    }

    /// A connected client (with the `root` certificate under TLS). Panics on failure, which
    /// only happens with broken TLS material; see [`StoreProcess::try_client`].
    pub async fn client(&self) -> Client {
        self.try_client()
            .await
            .unwrap_or_else(|e| panic!("client for {}: {e}", self.endpoint()))
    }

    /// Like [`StoreProcess::client`], returning the error.
    pub async fn try_client(&self) -> Result<Client, Error> {
        Ok(Client::connect([self.endpoint()], Some(self.connect_options())).await?)
    }

    /// The command line for the current ports and options.
    fn command(&self) -> Command {
        let mut cmd = Command::new(self.backend.program());
        let client_url = self.endpoint();
        match &self.backend {
            Backend::Etcd => {
                let peer_url = format!("http://127.0.0.1:{}", self.peer_port);
                cmd.arg("--name")
                    .arg("testkit")
                    .arg("--data-dir")
                    .arg(&self.data_dir)
                    .arg("--listen-client-urls")
                    .arg(&client_url)
                    .arg("--advertise-client-urls")
                    .arg(&client_url)
                    .arg("--listen-peer-urls")
                    .arg(&peer_url)
                    .arg("--initial-advertise-peer-urls")
                    .arg(&peer_url)
                    .arg("--initial-cluster")
                    .arg(format!("testkit={peer_url}"))
                    .arg("--initial-cluster-state")
                    .arg("new");
                etcd_process_settings(&mut cmd);
                if let Some(n) = self.opts.max_request_bytes {
                    cmd.arg("--max-request-bytes").arg(n.to_string());
                }
                if let Some(d) = self.opts.progress_notify_interval {
                    cmd.arg("--experimental-watch-progress-notify-interval")
                        .arg(format_duration(d));
                }
                if let Some(pki) = &self.opts.tls {
                    let server = pki.server();
                    cmd.arg("--cert-file")
                        .arg(&server.cert)
                        .arg("--key-file")
                        .arg(&server.key)
                        .arg("--trusted-ca-file")
                        .arg(pki.ca_path())
                        .arg("--client-cert-auth");
                }
            }
            Backend::Embedded { .. } => {
                cmd.arg("serve")
                    .arg("--listen")
                    .arg(format!("127.0.0.1:{}", self.client_port))
                    .arg("--data-dir")
                    .arg(&self.data_dir);
                if let Some(n) = self.opts.max_request_bytes {
                    cmd.arg("--max-request-bytes").arg(n.to_string());
                }
                if let Some(d) = self.opts.progress_notify_interval {
                    cmd.arg("--watch-progress-notify-interval")
                        .arg(format_duration(d));
                }
                if let Some(pki) = &self.opts.tls {
                    let server = pki.server();
                    cmd.arg("--cert")
                        .arg(&server.cert)
                        .arg("--key")
                        .arg(&server.key)
                        .arg("--cacert")
                        .arg(pki.ca_path());
                }
            }
        }
        cmd.args(&self.opts.extra_args);
        cmd
    }

    async fn spawn_and_wait(&mut self) -> Result<(), Attempt> {
        let child = spawn_logged(self.command(), &self.log_path).map_err(Attempt::Failed)?;
        self.pid = child.id();
        self.child = Some(child);
        self.wait_ready().await
    }

    async fn wait_ready(&mut self) -> Result<(), Attempt> {
        let timeout = self.opts.startup_timeout.unwrap_or(DEFAULT_STARTUP_TIMEOUT);
        let deadline = Instant::now() + timeout;
        let mut last_error;
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                self.child = None;
                let tail = self.log_tail();
                if is_port_clash(&tail) {
                    return Err(Attempt::PortClash(tail));
                }
                return Err(Attempt::Failed(Error::Exited {
                    program: self.backend.program(),
                    status: status.to_string(),
                    log_tail: tail,
                }));
            }
            match self.probe().await {
                Ok(()) => return Ok(()),
                Err(e) => last_error = e,
            }
            if Instant::now() >= deadline {
                let tail = self.log_tail();
                if is_port_clash(&tail) {
                    return Err(Attempt::PortClash(tail));
                }
                return Err(Attempt::Failed(Error::NotReady {
                    program: self.backend.program(),
                    timeout,
                    last_error,
                    log_tail: tail,
                }));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn probe(&self) -> Result<(), String> {
        let status =
            probe_status(&self.endpoint(), self.client_port, self.connect_options()).await?;
        if self.backend == Backend::Etcd && status.leader() == 0 {
            return Err("etcd has no leader yet".to_string());
        }
        Ok(())
    }
}

impl Drop for StoreProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `n` distinct free loopback ports. The listeners are closed before the store binds, so
/// another process may grab a port in between; callers retry on a clash.
pub fn free_ports(n: usize) -> Result<Vec<u16>, Error> {
    // Hold all listeners at once so the kernel cannot hand out the same port twice.
    let listeners = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").map_err(|e| Error::io("bind 127.0.0.1:0", e)))
        .collect::<Result<Vec<_>, _>>()?;
    listeners
        .iter()
        .map(|l| {
            l.local_addr()
                .map(|a| a.port())
                .map_err(|e| Error::io("local_addr", e))
        })
        .collect()
}

/// Flags and environment every etcd we start gets, single member or cluster member.
pub(crate) fn etcd_process_settings(cmd: &mut Command) {
    cmd.arg("--logger")
        .arg("zap")
        .arg("--log-outputs")
        .arg("stderr");
    // Settings from the developer's shell must not change the store under test.
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("ETCD_") {
            cmd.env_remove(k);
        }
    }
}

/// Spawns `cmd` with stdin closed and stdout and stderr appended to `log_path` (appended, so
/// a restart's log follows the crash it recovers from).
pub(crate) fn spawn_logged(mut cmd: Command, log_path: &Path) -> Result<Child, Error> {
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path)
        .map_err(|e| Error::io(format!("open {}", log_path.display()), e))?;
    let log2 = log
        .try_clone()
        .map_err(|e| Error::io(format!("dup {}", log_path.display()), e))?;
    cmd.stdin(Stdio::null())
        .stdout(Stdio::from(log2))
        .stderr(Stdio::from(log));
    cmd.spawn().map_err(|e| Error::Spawn {
        program: PathBuf::from(cmd.get_program()),
        source: e,
    })
}

/// SIGKILLs the child and reaps it. No-op if there is none.
pub(crate) fn kill_and_reap(child: &mut Option<Child>) {
    if let Some(mut child) = child.take() {
        // Errors mean it already exited; `wait` reaps it either way.
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// Sends `signal` (`STOP`, `CONT`) to `pid` with kill(1); panics if that fails, since a test
/// that meant to freeze a store and did not would pass for the wrong reason.
pub(crate) fn send_signal(pid: u32, signal: &str) {
    let status = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{signal} {pid}");
}

/// One `Maintenance.Status` call to the store at `endpoint` (client port `port`), bounded so
/// that a hung or frozen store costs seconds, not forever.
pub(crate) async fn probe_status(
    endpoint: &str,
    port: u16,
    opts: ConnectOptions,
) -> Result<StatusResponse, String> {
    // A cheap TCP probe first: a gRPC call against a closed port waits out its whole
    // timeout, which would add seconds to every start.
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        return Err(format!("connect {addr}: refused"));
    }
    let opts = opts.with_connect_timeout(Duration::from_secs(1));
    let call = async {
        let mut client = Client::connect([endpoint], Some(opts))
            .await
            .map_err(|e| e.to_string())?;
        client.status().await.map_err(|e| e.to_string())
    };
    tokio::time::timeout(Duration::from_secs(3), call)
        .await
        .map_err(|_| "Maintenance.Status timed out".to_string())?
}

pub(crate) fn is_port_clash(log: &str) -> bool {
    log.to_ascii_lowercase().contains("address already in use")
}

/// Go and humantime both accept `500ms`; milliseconds keep every test interval exact.
fn format_duration(d: Duration) -> String {
    format!("{}ms", d.as_millis())
}

/// The last 40 lines (at most 8 KiB) of a log file, or a note why there is none.
pub(crate) fn log_tail(path: &Path) -> String {
    const MAX_BYTES: usize = 8 * 1024;
    const MAX_LINES: usize = 40;
    let bytes = match File::open(path).and_then(|mut f| {
        let mut v = Vec::new();
        std::io::Read::read_to_end(&mut f, &mut v).map(|_| v)
    }) {
        Ok(b) => b,
        Err(e) => return format!("<cannot read {}: {e}>", path.display()),
    };
    let start = bytes.len().saturating_sub(MAX_BYTES);
    let text = String::from_utf8_lossy(&bytes[start..]);
    let lines: Vec<&str> = text.lines().collect();
    let from = lines.len().saturating_sub(MAX_LINES);
    if lines.is_empty() {
        return "<empty log>".to_string();
    }
    lines[from..].join("\n")
}
