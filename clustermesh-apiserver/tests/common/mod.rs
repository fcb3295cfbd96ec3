//! Shared by the apiserver's integration tests: the real `clustermesh-apiserver` binary as a
//! child process (SIGKILLed when dropped, its log printed when a test fails), stores started
//! by `testkit`, temp copies of the fixture manifests, and a plain HTTP client for the health
//! endpoints. Nothing here asserts on time: conditions are awaited with generous timeouts.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use kvstore::client::{ClientConfig, StoreClient};
use testkit::{Backend, StoreOptions, StoreProcess};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How long any awaited condition may take: generous, the machine is shared.
pub const TIMEOUT: Duration = Duration::from_secs(90);
/// How often a condition is polled.
pub const POLL: Duration = Duration::from_millis(10);
pub const APISERVER: &str = env!("CARGO_BIN_EXE_clustermesh-apiserver");
/// sysexits' EX_USAGE: the apiserver's exit code for a command line that cannot work.
pub const EXIT_USAGE: i32 = 64;

/// Which store a scenario publishes into: a real etcd, or our `kvstore serve`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Which {
    Etcd,
    Ours,
}

/// Runs each named `async fn(Which)` scenario twice: `etcd::<name>` against a real etcd and
/// `ours::<name>` against our store.
#[macro_export]
macro_rules! both_backends {
    ($($scenario:ident),* $(,)?) => {
        mod etcd {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() {
                    super::$scenario($crate::common::Which::Etcd).await;
                }
            )*
        }
        mod ours {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() {
                    super::$scenario($crate::common::Which::Ours).await;
                }
            )*
        }
    };
}

/// A store process and a client of it.
pub struct Store {
    pub process: StoreProcess,
    pub client: StoreClient,
}

impl Store {
    pub async fn start(which: Which) -> Store {
        let backend = match which {
            Which::Etcd => Backend::Etcd,
            Which::Ours => Backend::Embedded {
                bin: testkit::kvstore_bin().expect("our store's binary"),
            },
        };
        let process = StoreProcess::start(backend, StoreOptions::default())
            .await
            .unwrap_or_else(|e| panic!("start {which:?} store: {e}"));
        let client = connect(ClientConfig::new([process.endpoint()])).await;
        Store { process, client }
    }

    /// Key → value under `prefix`.
    pub async fn read(&self, prefix: &str) -> BTreeMap<String, Vec<u8>> {
        let listing = self.client.raw().list_prefix(prefix).await.expect("list");
        listing
            .entries
            .into_iter()
            .map(|e| (e.key, e.value))
            .collect()
    }
}

pub async fn connect(mut config: ClientConfig) -> StoreClient {
    config.request_timeout = Duration::from_secs(15);
    StoreClient::connect(&config).await.expect("connect store")
}

/// Polls `check` until it returns `Some`, failing after [`TIMEOUT`].
pub async fn wait_for<T>(what: &str, mut check: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(POLL).await;
    }
}

/// The command line publishing `work`'s manifests (of cluster eu-1, id 2) into `store`.
pub fn args(store: &Store, work: &Workdir, lease_ttl: &str) -> Vec<String> {
    [
        "--cluster-name",
        "eu-1",
        "--cluster-id",
        "2",
        "--manifests",
        &work.manifests().display().to_string(),
        "--etcd-endpoints",
        &store.process.endpoint(),
        "--lease-ttl",
        lease_ttl,
        "--health-listen",
        "127.0.0.1:0",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// A running `clustermesh-apiserver`, SIGKILLed (by its own PID) when dropped.
pub struct Apiserver {
    child: Option<Child>,
    log: PathBuf,
    health: Option<SocketAddr>,
    /// The store endpoint the apiserver logged at start.
    pub store: Option<String>,
}

impl Apiserver {
    pub fn spawn(args: &[String], log_dir: &Path, name: &str) -> Apiserver {
        let log = log_dir.join(format!("{name}.log"));
        let file = std::fs::File::create(&log).expect("create apiserver log");
        let child = Command::new(APISERVER)
            .args(args)
            .env("NO_COLOR", "1")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("dup log"))
            .stderr(file)
            .spawn()
            .expect("spawn clustermesh-apiserver");
        Apiserver {
            child: Some(child),
            log,
            health: None,
            store: None,
        }
    }

    /// The log so far, without terminal colours.
    pub fn log(&self) -> String {
        strip_ansi(&std::fs::read_to_string(&self.log).unwrap_or_default())
    }

    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Waits for the "started" line and reads the health and store addresses from it.
    pub async fn started(&mut self) -> SocketAddr {
        let line = wait_for("the apiserver to start", async || {
            if let Some(status) = self.exited() {
                panic!("apiserver exited with {status}:\n{}", self.log());
            }
            self.log()
                .lines()
                .find(|l| l.contains("clustermesh-apiserver started"))
                .map(str::to_owned)
        })
        .await;
        let health = between(&line, "health=Some(", ")")
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no health address in {line:?}"));
        self.store = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("store="))
            .map(str::to_owned);
        self.health = Some(health);
        health
    }

    /// Polls `/readyz` until 200; returns how many 503s were seen before.
    pub async fn ready(&mut self) -> usize {
        let health = match self.health {
            Some(h) => h,
            None => self.started().await,
        };
        let mut not_ready = 0;
        wait_for("/readyz 200", async || {
            if let Some(status) = self.exited() {
                panic!("apiserver exited with {status}:\n{}", self.log());
            }
            let (code, body) = http_get(health, "/readyz").await.ok()?;
            match code {
                200 => Some(()),
                503 => {
                    assert!(body.contains("\"ready\":false"), "{body}");
                    not_ready += 1;
                    None
                }
                other => panic!("/readyz answered {other}: {body}"),
            }
        })
        .await;
        not_ready
    }

    /// Waits for the process to exit on its own (killing it after [`TIMEOUT`]).
    pub async fn exit(&mut self) -> ExitStatus {
        let status = wait_for("the apiserver to exit", async || self.exited()).await;
        self.child = None;
        status
    }

    /// Waits until the log holds a line with every one of `needles`; returns it.
    pub async fn logged(&self, needles: &[&str]) -> String {
        wait_for(&format!("a log line with {needles:?}"), async || {
            self.log()
                .lines()
                .find(|l| needles.iter().all(|n| l.contains(n)))
                .map(str::to_owned)
        })
        .await
    }

    pub fn health(&self) -> SocketAddr {
        self.health.expect("started")
    }

    /// Sends `signal` (`STOP`, `CONT`) to the process.
    pub fn signal(&self, signal: &str) {
        let child = self.child.as_ref().expect("running");
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(child.id().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{signal}");
    }

    /// SIGKILL, by the child's own PID, and reap it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Apiserver {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!(
                "--- apiserver log {} ---\n{}",
                self.log.display(),
                self.log()
            );
        }
    }
}

pub fn between<'a>(text: &'a str, start: &str, end: &str) -> Option<&'a str> {
    let rest = &text[text.find(start)? + start.len()..];
    Some(&rest[..rest.find(end)?])
}

pub fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// A plain HTTP/1.1 GET: the status code and the body.
pub async fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let request = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        stream
            .write_all(
                format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .await?;
        let mut buf = Vec::new();
        stream.read_to_end(&mut buf).await?;
        Ok::<_, std::io::Error>(String::from_utf8_lossy(&buf).into_owned())
    };
    let text = tokio::time::timeout(Duration::from_secs(10), request)
        .await
        .map_err(|_| std::io::Error::other("HTTP request timed out"))??;
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP response: {text:?}")))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((code, body))
}

/// A temp dir with `manifests/` holding a copy of the fixtures named, plus room for logs.
pub struct Workdir {
    dir: tempfile::TempDir,
}

impl Workdir {
    pub fn new(fixtures: &[&str]) -> Workdir {
        let dir = tempfile::Builder::new()
            .prefix("apiserver-test-")
            .tempdir()
            .expect("temp dir");
        let work = Workdir { dir };
        std::fs::create_dir(work.manifests()).expect("manifest dir");
        for fixture in fixtures {
            let src = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures")
                .join(fixture);
            for entry in std::fs::read_dir(&src).expect("fixture dir") {
                let path = entry.expect("fixture entry").path();
                if path.extension().is_some_and(|e| e == "yaml") {
                    let target = work.manifests().join(path.file_name().expect("name"));
                    assert!(!target.exists(), "{} twice", target.display());
                    std::fs::copy(&path, target).expect("copy fixture");
                }
            }
        }
        work
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn manifests(&self) -> PathBuf {
        self.dir.path().join("manifests")
    }

    /// Replaces a manifest file atomically (a dot-file renamed into place), so the source
    /// never reads half of it.
    pub fn write(&self, name: &str, contents: &str) {
        let tmp = self.manifests().join(format!(".{name}.tmp"));
        std::fs::write(&tmp, contents).expect("write manifest");
        std::fs::rename(&tmp, self.manifests().join(name)).expect("rename manifest");
    }

    pub fn read(&self, name: &str) -> String {
        std::fs::read_to_string(self.manifests().join(name)).expect("read manifest")
    }

    pub fn remove(&self, name: &str) {
        std::fs::remove_file(self.manifests().join(name)).expect("remove manifest");
    }

    /// Drops the one `---`-separated document of `file` that contains `needle`.
    pub fn remove_document(&self, file: &str, needle: &str) {
        let text = self.read(file);
        let docs: Vec<&str> = text.split("\n---\n").collect();
        let kept: Vec<&str> = docs
            .iter()
            .copied()
            .filter(|d| !d.contains(needle))
            .collect();
        assert_eq!(kept.len() + 1, docs.len(), "{needle:?} in {file}");
        self.write(file, &kept.join("\n---\n"));
    }
}

pub fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}
