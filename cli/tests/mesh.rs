//! The mesh verbs against daemons started by hand: contexts written into a temp mesh home,
//! `clustermesh-apiserver` (embedded store, mutual TLS with the certificates `enable`
//! made) and `kvstoremesh` per cluster, on free loopback ports. Every process is killed when
//! its handle drops, also when a test fails.

use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const CLUSTERMESH: &str = env!("CARGO_BIN_EXE_clustermesh");
/// How long a condition may take to appear: generous, the machine is shared.
const TIMEOUT: Duration = Duration::from_secs(120);

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// A daemon, SIGKILLed on drop; its log is kept for failure messages.
struct Daemon {
    child: Option<Child>,
    log: PathBuf,
}

impl Daemon {
    fn spawn(program: &Path, args: &[String], log: PathBuf) -> Daemon {
        let file = fs::File::create(&log).expect("log file");
        let child = Command::new(program)
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(file.try_clone().expect("log file"))
            .stderr(file)
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", program.display()));
        Daemon {
            child: Some(child),
            log,
        }
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The last lines of each log, for failure messages.
fn tails(logs: &[PathBuf]) -> String {
    let mut out = Vec::new();
    for log in logs {
        let text = fs::read_to_string(log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        out.push(format!(
            "--- {}\n{}",
            log.display(),
            lines[lines.len().saturating_sub(15)..].join("\n")
        ));
    }
    out.join("\n")
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One cluster: its context's ports and paths.
struct Cluster {
    name: &'static str,
    /// The id in the context.
    id: u16,
    /// The id the daemons run with (differs to provoke a clash the context does not show).
    daemon_id: u16,
    store_port: u16,
    api_port: u16,
    mesh_port: Option<u16>,
    /// The API port of the cluster's one agent (`--datapath none`), when it runs one.
    agent_port: Option<u16>,
}

impl Cluster {
    fn new(name: &'static str, id: u16, daemon_id: u16, kvstoremesh: bool) -> Cluster {
        Cluster {
            name,
            id,
            daemon_id,
            store_port: free_port(),
            api_port: free_port(),
            mesh_port: kvstoremesh.then(free_port),
            agent_port: None,
        }
    }

    fn with_agent(mut self) -> Cluster {
        self.agent_port = Some(free_port());
        self
    }

    fn context(&self) -> String {
        let n = self.name;
        let mut yaml = format!(
            "name: {n}\nid: {}\nstore:\n  endpoints: [https://127.0.0.1:{}]\n  trusted-ca-file: \
             {n}/certs/server/ca.crt\n  cert-file: {n}/certs/admin-{n}/tls.crt\n  key-file: \
             {n}/certs/admin-{n}/tls.key\napiserver: http://127.0.0.1:{}\npeers-dir: {n}/peers\n\
             certs-dir: {n}/certs\n",
            self.id, self.store_port, self.api_port
        );
        if let Some(port) = self.mesh_port {
            yaml.push_str(&format!("kvstoremesh: http://127.0.0.1:{port}\n"));
        }
        if let Some(port) = self.agent_port {
            yaml.push_str(&format!(
                "agents:\n- node: node-a\n  api: http://127.0.0.1:{port}\n"
            ));
        }
        yaml
    }
}

/// A mesh home with one context, `dev`, made current.
struct Home {
    dir: tempfile::TempDir,
}

impl Home {
    fn new(clusters: &[&Cluster]) -> Home {
        let dir = tempfile::tempdir().expect("temp home");
        let contexts = dir.path().join("contexts/dev");
        fs::create_dir_all(&contexts).unwrap();
        for c in clusters {
            fs::write(contexts.join(format!("{}.yaml", c.name)), c.context()).unwrap();
        }
        fs::write(dir.path().join("current-context"), "dev\n").unwrap();
        Home { dir }
    }

    fn context_dir(&self) -> PathBuf {
        self.dir.path().join("contexts/dev")
    }

    fn cluster_dir(&self, name: &str) -> PathBuf {
        self.context_dir().join(name)
    }

    fn run(&self, args: &[&str]) -> Output {
        Command::new(CLUSTERMESH)
            .args(args)
            .env("CLUSTERMESH_HOME", self.dir.path())
            .output()
            .expect("run clustermesh")
    }

    /// Runs and expects success; stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "clustermesh {args:?}: {}",
            describe(&out)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn status_json(&self) -> Value {
        let out = self.run(&["status", "-o", "json", "--timeout", "2s"]);
        assert!(out.status.success(), "status: {}", describe(&out));
        serde_json::from_slice(&out.stdout).expect("status JSON")
    }

    /// Starts the cluster's apiserver (hosting its store) and, if it has one, kvstoremesh.
    fn start(&self, c: &Cluster, manifests: &Path) -> Vec<Daemon> {
        let dir = self.cluster_dir(c.name);
        let certs = dir.join("certs");
        let p = |p: PathBuf| p.display().to_string();
        let admin = certs.join(format!("admin-{}", c.name));
        let apiserver = testkit::workspace_bin("clustermesh-apiserver", "clustermesh-apiserver")
            .expect("apiserver binary");
        let mut daemons = vec![Daemon::spawn(
            &apiserver,
            &[
                "--cluster-name".into(),
                c.name.into(),
                "--cluster-id".into(),
                c.daemon_id.to_string(),
                "--manifests".into(),
                p(manifests.to_owned()),
                "--store-listen".into(),
                format!("127.0.0.1:{}", c.store_port),
                "--data-dir".into(),
                p(dir.join("store.data")),
                "--store-cert".into(),
                p(certs.join("server/tls.crt")),
                "--store-key".into(),
                p(certs.join("server/tls.key")),
                "--store-cacert".into(),
                p(certs.join("trust-bundle.crt")),
                "--admin-cert".into(),
                p(admin.join("tls.crt")),
                "--admin-key".into(),
                p(admin.join("tls.key")),
                "--health-listen".into(),
                format!("127.0.0.1:{}", c.api_port),
                "--lease-ttl".into(),
                "3s".into(),
                "--heartbeat-interval".into(),
                "1s".into(),
            ],
            dir.join("apiserver.log"),
        )];
        if let Some(port) = c.mesh_port {
            let peers = dir.join("peers");
            fs::create_dir_all(&peers).unwrap();
            let kvstoremesh =
                testkit::workspace_bin("kvstoremesh", "kvstoremesh").expect("kvstoremesh binary");
            daemons.push(Daemon::spawn(
                &kvstoremesh,
                &[
                    "--cluster-name".into(),
                    c.name.into(),
                    "--cluster-id".into(),
                    c.daemon_id.to_string(),
                    "--peers-dir".into(),
                    p(peers),
                    "--store-endpoints".into(),
                    format!("https://127.0.0.1:{}", c.store_port),
                    "--store-cacert".into(),
                    p(certs.join("server/ca.crt")),
                    "--store-cert".into(),
                    p(admin.join("tls.crt")),
                    "--store-key".into(),
                    p(admin.join("tls.key")),
                    "--health-listen".into(),
                    format!("127.0.0.1:{port}"),
                    "--lease-ttl".into(),
                    "3s".into(),
                    "--probe-interval".into(),
                    "1s".into(),
                    "--peer-request-timeout".into(),
                    "2s".into(),
                    "--backoff-base".into(),
                    "100ms".into(),
                    "--backoff-max".into(),
                    "1s".into(),
                    "--first-sync-timeout".into(),
                    "5m".into(),
                ],
                dir.join("kvstoremesh.log"),
            ));
        }
        if let Some(port) = c.agent_port {
            let local = certs.join(format!("local-{}", c.name));
            let agent = testkit::workspace_bin("agent", "clustermesh-agent").expect("agent binary");
            daemons.push(Daemon::spawn(
                &agent,
                &[
                    "--cluster-name".into(),
                    c.name.into(),
                    "--cluster-id".into(),
                    c.daemon_id.to_string(),
                    "--node-name".into(),
                    "node-a".into(),
                    "--manifests".into(),
                    p(manifests.to_owned()),
                    "--store-endpoints".into(),
                    format!("https://127.0.0.1:{}", c.store_port),
                    "--store-cacert".into(),
                    p(certs.join("server/ca.crt")),
                    "--store-cert".into(),
                    p(local.join("tls.crt")),
                    "--store-key".into(),
                    p(local.join("tls.key")),
                    "--api-listen".into(),
                    format!("127.0.0.1:{port}"),
                    "--no-state".into(),
                    "--datapath".into(),
                    "none".into(),
                ],
                dir.join("agent.log"),
            ));
        }
        daemons
    }
}

fn describe(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn manifests() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../clustermesh-apiserver/tests/fixtures/eu-1")
}

fn cluster<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["clusters"]
        .as_array()
        .expect("clusters")
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("cluster {name} in {report:#}"))
}

/// The cause of the first problem of `cluster` whose component is `component`.
fn cause_of(report: &Value, cluster_name: &str, component: &str) -> Option<String> {
    cluster(report, cluster_name)["problems"]
        .as_array()?
        .iter()
        .find(|p| p["component"] == component)
        .and_then(|p| p["cause"].as_str().map(str::to_owned))
}

/// Polls `status -o json` until `cluster`'s `component` has problem cause `cause`.
fn await_cause(home: &Home, cluster_name: &str, component: &str, cause: &str, logs: &[PathBuf]) {
    let start = Instant::now();
    loop {
        let report = home.status_json();
        if cause_of(&report, cluster_name, component).as_deref() == Some(cause) {
            return;
        }
        if start.elapsed() > TIMEOUT {
            panic!(
                "{cluster_name}: {component} never had cause {cause}: {report:#}\n{}",
                tails(logs)
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Every file under `dir` (recursively) with its content.
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                out.extend(snapshot(&path));
            } else {
                out.push((path.clone(), fs::read(&path).unwrap()));
            }
        }
    }
    out.sort();
    out
}

/// enable, connect, status --wait (synced, entries, JSON without keys), troubleshoot; then
/// distinct causes in status: id clash (a daemon running with another id than its context),
/// TLS trust failure, unreachable peer; and disconnect with the other side dead.
#[test]
fn connect_status_troubleshoot_disconnect() {
    let a = Cluster::new("a", 1, 1, true).with_agent();
    let b = Cluster::new("b", 2, 2, true);
    let c = Cluster::new("c", 3, 1, false);
    let home = Home::new(&[&a, &b, &c]);

    let enabled = home.ok(&["enable"]);
    assert!(enabled.contains("cluster a: CA created"), "{enabled}");
    let again = home.ok(&["enable", "--cluster", "a"]);
    assert!(
        again.contains("CA reused") && again.contains("kept (valid)"),
        "{again}"
    );

    let manifests = manifests();
    let mut daemons_a = home.start(&a, &manifests);
    let mut daemons_b = home.start(&b, &manifests);
    let _daemons_c = home.start(&c, &manifests);

    let logs: Vec<PathBuf> = daemons_a
        .iter()
        .chain(&daemons_b)
        .map(|d| d.log.clone())
        .collect();
    // Every daemon up (no peers yet) before connecting, as an operator would check.
    let out = home.run(&["status", "--wait", "--wait-duration", "120s"]);
    if !out.status.success() {
        panic!("status --wait: {}\n{}", describe(&out), tails(&logs));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("peers:           none configured"), "{text}");

    let connected = home.ok(&["connect", "--source", "a", "--destination", "b"]);
    assert!(connected.contains("connected: a reads b"), "{connected}");
    assert!(connected.contains("connected: b reads a"), "{connected}");
    assert!(home.cluster_dir("a").join("peers/b").is_file());
    assert!(home.cluster_dir("b").join("certs/peer-cas/a.crt").is_file());

    let started = Instant::now();
    let out = home.run(&["status", "--wait", "--wait-duration", "120s", "-o", "json"]);
    if !out.status.success() {
        panic!("status --wait: {}\n{}", describe(&out), tails(&logs));
    }
    eprintln!("status --wait succeeded after {:?}", started.elapsed());
    let stdout = String::from_utf8(out.stdout).unwrap();
    let report: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(report["schema"], 1);
    assert_eq!(report["context"], "dev");
    assert_eq!(report["ready"], true);
    let ca = cluster(&report, "a");
    assert_eq!(ca["apiserver"]["ready"], true);
    assert_eq!(ca["store"]["reachable"], true);
    assert_eq!(ca["kvstoremesh"]["enabled"], true);
    assert_eq!(ca["kvstoremesh"]["ready"], true);
    let peer = &ca["peers"][0];
    assert_eq!(peer["name"], "b");
    assert_eq!(peer["configured"], true);
    assert_eq!(peer["connected"], true);
    assert_eq!(peer["synced"], true);
    assert!(peer["entries"].as_u64().unwrap() > 0, "{peer:#}");
    assert!(
        peer["kinds"]["services"]["entries"].as_u64().unwrap() > 0,
        "{peer:#}"
    );
    assert!(ca["global_services"].as_u64().unwrap() > 0, "{ca:#}");
    assert_eq!(ca["nodes"]["total"], 1, "{ca:#}");
    assert_eq!(ca["nodes"]["connected_to_all"], 1, "{ca:#}");
    assert_eq!(ca["nodes"]["peers_synced"]["max"], 1, "{ca:#}");
    assert_eq!(cluster(&report, "c")["kvstoremesh"]["enabled"], false);
    // No key material: neither a PEM key header nor the bytes of any key file.
    assert!(!stdout.contains("PRIVATE KEY"), "{stdout}");
    for (path, bytes) in snapshot(&home.context_dir()) {
        if path.extension().is_some_and(|e| e == "key") {
            let key = String::from_utf8(bytes).unwrap();
            let body: String = key.lines().filter(|l| !l.starts_with("-----")).collect();
            assert!(!stdout.contains(&body[..40]), "{} leaked", path.display());
        }
    }

    let text = home.ok(&["status", "--cluster", "a"]);
    eprintln!("{text}");
    assert!(text.contains("cluster a (id 1): ready"), "{text}");
    assert!(text.contains("b: configured, connected, synced"), "{text}");
    assert!(
        text.contains("kvstoremesh:     ready, 1/1 peers connected"),
        "{text}"
    );

    let checks = home.run(&["troubleshoot", "--cluster", "a"]);
    let checks_text = String::from_utf8_lossy(&checks.stdout);
    eprintln!("{checks_text}");
    assert!(checks.status.success(), "{}", describe(&checks));
    assert!(
        checks_text.contains("✓ certificate server"),
        "{checks_text}"
    );
    assert!(checks_text.contains("✓ peer b: store at"), "{checks_text}");
    assert!(checks_text.contains("✓ peer b id: id 2"), "{checks_text}");
    assert!(
        checks_text.contains("✓ peer b clock: heartbeat"),
        "{checks_text}"
    );

    // Id clash: c's context says 3, its apiserver runs as 1 (a's id).
    home.ok(&[
        "connect",
        "--source",
        "a",
        "--destination",
        "c",
        "--connection-mode",
        "unicast",
    ]);
    await_cause(&home, "a", "peer c", "id_clash", &logs);
    let waited = home.run(&["status", "--wait", "--wait-duration", "2s"]);
    assert_eq!(waited.status.code(), Some(1), "{}", describe(&waited));
    let stderr = String::from_utf8_lossy(&waited.stderr);
    assert!(stderr.contains("not ready after 2s"), "{stderr}");
    assert!(
        stderr.contains("a: peer c: refused by kvstoremesh"),
        "{stderr}"
    );
    let checks = home.run(&["troubleshoot", "--cluster", "a"]);
    let checks_text = String::from_utf8_lossy(&checks.stdout);
    assert_eq!(checks.status.code(), Some(1), "{}", describe(&checks));
    assert!(checks_text.contains("✗ peer c id"), "{checks_text}");
    home.ok(&[
        "disconnect",
        "--source",
        "a",
        "--destination",
        "c",
        "--connection-mode",
        "unicast",
    ]);

    // TLS trust failure: a's peer file for b names a CA that did not sign b's store.
    let peers_a = home.cluster_dir("a").join("peers");
    let good = fs::read(peers_a.join("b")).unwrap();
    fs::copy(
        home.cluster_dir("c").join("certs/server/ca.crt"),
        peers_a.join("b.wrong-ca.crt"),
    )
    .unwrap();
    let bad = String::from_utf8(good.clone())
        .unwrap()
        .replace("b.ca.crt", "b.wrong-ca.crt");
    fs::write(peers_a.join("b"), bad).unwrap();
    await_cause(&home, "a", "peer b", "tls", &logs);
    fs::write(peers_a.join("b"), &good).unwrap();
    fs::remove_file(peers_a.join("b.wrong-ca.crt")).unwrap();

    // Unreachable: b dies entirely.
    for d in &mut daemons_b {
        d.kill();
    }
    await_cause(&home, "a", "peer b", "connection_refused", &logs);
    eprintln!("{}", String::from_utf8_lossy(&home.run(&["status"]).stdout));
    let report = home.status_json();
    assert_eq!(
        cause_of(&report, "b", "apiserver").as_deref(),
        Some("connection_refused"),
        "{report:#}"
    );
    assert_eq!(
        cause_of(&report, "b", "store").as_deref(),
        Some("connection_refused")
    );

    // Disconnect with b dead: both sides' files go.
    let out = home.ok(&["disconnect", "--source", "a", "--destination", "b"]);
    assert!(out.contains("disconnected: a reads b"), "{out}");
    let left: Vec<String> = fs::read_dir(&peers_a)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(left.is_empty(), "{left:?}");
    assert!(!home.cluster_dir("b").join("certs/peer-cas/a.crt").exists());
    assert!(!home.cluster_dir("b").join("peers/a").exists());
    let report = home.status_json();
    let peers = cluster(&report, "a")["peers"].as_array().unwrap().clone();
    assert!(peers.iter().all(|p| p["configured"] == false), "{peers:#?}");
    for d in &mut daemons_a {
        d.kill();
    }
}

/// Refusals come before any write: every peers-dir and certs-dir is left as it was.
#[test]
fn refusals_leave_every_directory_untouched() {
    let a = Cluster::new("a", 1, 1, true);
    let b = Cluster::new("b", 2, 2, true);
    let twin = Cluster::new("twin", 1, 1, true);
    let home = Home::new(&[&a, &b, &twin]);
    home.ok(&["enable"]);
    let before = snapshot(&home.context_dir());

    let refused = |args: &[&str], expected: &str| {
        let out = home.run(args);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {}", describe(&out));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
        assert_eq!(
            snapshot(&home.context_dir()),
            before,
            "{args:?} wrote something"
        );
    };
    refused(
        &["connect", "--source", "a", "--destination", "b"],
        "cluster id 1 is used by a and twin",
    );
    refused(
        &["connect", "--source", "a", "--destination", "B_"],
        "--destination",
    );
    refused(
        &["connect", "--source", "a", "--destination", "a"],
        "itself",
    );
    refused(
        &["connect", "--source", "a", "--destination", "zz"],
        "cluster zz is not in context \"dev\"",
    );
    refused(
        &["status", "--context", "nope"],
        "context \"nope\" not found",
    );

    // Another directory: b with max-connected-clusters 511.
    let other = tempfile::tempdir().unwrap();
    fs::write(other.path().join("a.yaml"), a.context()).unwrap();
    fs::write(
        other.path().join("b.yaml"),
        b.context() + "max-connected-clusters: 511\n",
    )
    .unwrap();
    let dir = other.path().to_str().unwrap();
    let out = home.run(&["enable", "--context", dir]);
    assert!(out.status.success(), "{}", describe(&out));
    let before_other = snapshot(other.path());
    let out = home.run(&[
        "connect",
        "--context",
        dir,
        "--source",
        "a",
        "--destination",
        "b",
    ]);
    assert_eq!(out.status.code(), Some(64), "{}", describe(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("a has 255, b has 511"), "{stderr}");
    assert_eq!(snapshot(other.path()), before_other);
    assert_eq!(snapshot(&home.context_dir()), before);
}
