//! Test support: network namespaces that clean themselves up, the plugin run as a runtime
//! runs it (environment and stdin, inside the node's namespace via `nsenter`), and a stand-in
//! agent listening inside the node's namespace.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use nix::sched::{CloneFlags, setns};
use serde_json::{Value, json};

/// The plugin binary under test.
pub const PLUGIN: &str = env!("CARGO_BIN_EXE_clustermesh-cni");

/// Whether the namespace tests can run; says why not when they cannot.
pub fn can_run() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    eprintln!("skipped: needs root to create network namespaces (CI runs as root)");
    false
}

/// A named network namespace (`ip netns add`), deleted on drop even when the test fails.
#[derive(Debug)]
pub struct Netns {
    pub name: String,
    pub path: PathBuf,
}

impl Netns {
    pub fn new() -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "cnit-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        run_ok(Command::new("ip").args(["netns", "add", &name]));
        Netns {
            path: PathBuf::from("/run/netns").join(&name),
            name,
        }
    }

    /// Runs a command inside the namespace (`nsenter --net`, which leaves /sys alone).
    pub fn command(&self, program: &str) -> Command {
        let mut command = Command::new("nsenter");
        command
            .arg(format!("--net={}", self.path.display()))
            .arg(program);
        command
    }

    /// `ip -j ARGS` inside the namespace, parsed.
    pub fn ip_json(&self, args: &[&str]) -> Value {
        let out = run_ok(self.command("ip").arg("-j").args(args));
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("ip -j {args:?}: {e}: {out}"))
    }

    /// `ip ARGS` inside the namespace; panics on failure.
    pub fn ip(&self, args: &[&str]) {
        run_ok(self.command("ip").args(args));
    }

    /// The names of the namespace's interfaces.
    pub fn links(&self) -> Vec<String> {
        self.ip_json(&["link", "show"])
            .as_array()
            .unwrap()
            .iter()
            .map(|link| link["ifname"].as_str().unwrap().to_owned())
            .collect()
    }

    /// Runs `work` on a thread inside the namespace.
    pub fn enter<T: Send>(&self, work: impl FnOnce() -> T + Send) -> T {
        thread::scope(|scope| {
            scope
                .spawn(|| {
                    enter(&self.path);
                    work()
                })
                .join()
                .unwrap()
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stderr(Stdio::null())
            .status();
    }
}

fn enter(path: &Path) {
    let netns = File::open(path).unwrap();
    setns(&netns, CloneFlags::CLONE_NEWNET).unwrap();
}

fn run_ok(command: &mut Command) -> String {
    let out = command.output().unwrap();
    assert!(
        out.status.success(),
        "{command:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// One plugin invocation's outcome.
#[derive(Debug)]
pub struct Outcome {
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
}

impl Outcome {
    /// Stdout as JSON.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {self:?}"))
    }

    /// Asserts success.
    pub fn ok(self) -> Self {
        assert!(self.success, "plugin failed: {self:?}");
        self
    }

    /// Asserts failure with a well-formed error JSON of `code`; returns its `msg`.
    pub fn failed_with(&self, code: u64) -> String {
        assert!(!self.success, "plugin succeeded: {self:?}");
        let reply = self.json();
        assert_eq!(reply["code"], code, "{self:?}");
        assert!(reply["cniVersion"].is_string(), "{self:?}");
        reply["msg"].as_str().unwrap().to_owned()
    }
}

/// Runs the plugin with exactly `env` (as a runtime does: nothing inherited) and `stdin`,
/// inside `node`'s namespace when given.
pub fn plugin(node: Option<&Netns>, env: &[(&str, &str)], stdin: &str) -> Outcome {
    let mut command = match node {
        Some(node) => node.command(PLUGIN),
        None => Command::new(PLUGIN),
    };
    command
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command.spawn().unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    Outcome {
        success: out.status.success(),
        stdout: String::from_utf8(out.stdout).unwrap(),
        stderr: String::from_utf8(out.stderr).unwrap(),
    }
}

/// A network config for `cidr`, the agent at `agent`, allocations under `data_dir`.
pub fn config(cidr: &str, agent: SocketAddr, data_dir: &Path) -> Value {
    json!({
        "cniVersion": "1.0.0",
        "name": "mesh",
        "type": "clustermesh-cni",
        "podCIDR": cidr,
        "agent": agent.to_string(),
        "dataDir": data_dir,
    })
}

/// A node: its namespace (loopback up), an allocation directory, and a pod CIDR.
#[derive(Debug)]
pub struct Node {
    pub netns: Netns,
    pub data_dir: tempfile::TempDir,
    pub cidr: &'static str,
}

impl Node {
    pub fn new(cidr: &'static str) -> Self {
        let netns = Netns::new();
        netns.ip(&["link", "set", "lo", "up"]);
        Node {
            netns,
            data_dir: tempfile::tempdir().unwrap(),
            cidr,
        }
    }

    /// The config pointing at `agent`.
    pub fn config(&self, agent: SocketAddr) -> String {
        config(self.cidr, agent, self.data_dir.path()).to_string()
    }

    /// An address in the node's namespace where nothing listens.
    pub fn closed_port(&self) -> SocketAddr {
        self.netns.enter(|| {
            TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
        })
    }

    /// Runs `command` for container `id`'s `eth0` in `pod`.
    pub fn cni(&self, command: &str, id: &str, pod: Option<&Netns>, stdin: &str) -> Outcome {
        let netns = pod.map(|pod| pod.path.display().to_string());
        let mut env = vec![
            ("CNI_COMMAND", command),
            ("CNI_CONTAINERID", id),
            ("CNI_IFNAME", "eth0"),
            (
                "CNI_ARGS",
                "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0",
            ),
            ("CNI_PATH", "/opt/cni/bin"),
        ];
        if let Some(netns) = &netns {
            env.push(("CNI_NETNS", netns));
        }
        plugin(Some(&self.netns), &env, stdin)
    }

    /// The addresses with an allocation record.
    pub fn allocations(&self) -> Vec<String> {
        let dir = self.data_dir.path().join("mesh");
        let Ok(entries) = std::fs::read_dir(dir) else {
            return Vec::new();
        };
        let mut names: Vec<String> = entries
            .map(|entry| entry.unwrap().file_name().into_string().unwrap())
            .filter(|name| name.parse::<std::net::Ipv4Addr>().is_ok())
            .collect();
        names.sort();
        names
    }

    /// The host-side veths on the node.
    pub fn host_veths(&self) -> Vec<String> {
        self.netns
            .links()
            .into_iter()
            .filter(|name| name.starts_with("cm"))
            .collect()
    }
}

/// A request the stand-in agent received.
#[derive(Clone, Debug)]
pub struct Received {
    pub method: String,
    pub path: String,
    pub body: String,
}

/// How the stand-in agent answers.
#[derive(Clone, Copy, Debug)]
pub enum Answer {
    /// 200, echoing the body.
    Accept,
    /// This status with an `ApiError` carrying this text.
    Refuse(u16, &'static str),
}

/// A tiny HTTP server standing in for the agent's API, listening on 127.0.0.1 inside the
/// node's namespace (where the plugin runs), recording what it receives.
#[derive(Debug)]
pub struct StubAgent {
    pub address: SocketAddr,
    received: Arc<Mutex<Vec<Received>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl StubAgent {
    pub fn start(node: &Node, answer: Answer) -> Self {
        let received = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel();
        let path = node.netns.path.clone();
        let thread = thread::spawn({
            let received = received.clone();
            let stop = stop.clone();
            move || {
                enter(&path);
                let listener = TcpListener::bind("127.0.0.1:0").unwrap();
                listener.set_nonblocking(true).unwrap();
                tx.send(listener.local_addr().unwrap()).unwrap();
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((stream, _)) => serve(stream, answer, &received),
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            thread::sleep(Duration::from_millis(10))
                        }
                        Err(e) => panic!("stub agent: {e}"),
                    }
                }
            }
        });
        StubAgent {
            address: rx.recv().unwrap(),
            received,
            stop,
            thread: Some(thread),
        }
    }

    pub fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }
}

impl Drop for StubAgent {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn serve(stream: TcpStream, answer: Answer, received: &Mutex<Vec<Received>>) {
    stream.set_nonblocking(false).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut reader = BufReader::new(&stream);
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or_default().to_owned();
    let path = parts.next().unwrap_or_default().to_owned();
    let mut length = 0;
    loop {
        let mut header = String::new();
        reader.read_line(&mut header).unwrap();
        let header = header.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':')
            && name.eq_ignore_ascii_case("content-length")
        {
            length = value.trim().parse().unwrap();
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).unwrap();
    let body = String::from_utf8(body).unwrap();
    let (status, reply) = match answer {
        Answer::Accept if body.is_empty() => (200, "{}".to_owned()),
        Answer::Accept => (200, body.clone()),
        Answer::Refuse(status, text) => (status, json!({ "error": text }).to_string()),
    };
    received
        .lock()
        .unwrap()
        .push(Received { method, path, body });
    let mut stream = &stream;
    write!(
        stream,
        "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{reply}",
        reply.len()
    )
    .unwrap();
}
