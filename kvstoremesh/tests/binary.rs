//! The `kvstoremesh` binary: flag validation, and one connection per peer however many agents
//! read the local store.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use futures::StreamExt;
use kvstore::client::WatchEvent;

const BIN: &str = env!("CARGO_BIN_EXE_kvstoremesh");

fn run(args: &[&str]) -> (i32, String) {
    let output = Command::new(BIN)
        .args(args)
        .output()
        .expect("run kvstoremesh");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn bad_flags_exit_64_naming_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let peers = dir.path().to_str().unwrap();
    let file = dir.path().join("file");
    std::fs::write(&file, "x").unwrap();
    let base = [
        "--cluster-name",
        "a",
        "--cluster-id",
        "1",
        "--peers-dir",
        peers,
    ];
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["--cluster-id", "1", "--peers-dir", peers],
            "--cluster-name",
        ),
        (
            vec![
                "--cluster-name",
                "A",
                "--cluster-id",
                "1",
                "--peers-dir",
                peers,
            ],
            "--cluster-name",
        ),
        (
            vec![
                "--cluster-name",
                "a",
                "--cluster-id",
                "0",
                "--peers-dir",
                peers,
            ],
            "--cluster-id",
        ),
        (
            vec![
                "--cluster-name",
                "a",
                "--cluster-id",
                "300",
                "--peers-dir",
                peers,
            ],
            "--cluster-id",
        ),
        (
            vec![
                "--cluster-name",
                "a",
                "--cluster-id",
                "1",
                "--peers-dir",
                "/nonexistent/peers",
            ],
            "--peers-dir",
        ),
        (
            vec![
                "--cluster-name",
                "a",
                "--cluster-id",
                "1",
                "--peers-dir",
                file.to_str().unwrap(),
            ],
            "--peers-dir",
        ),
        (
            [&base[..], &["--max-connected-clusters", "300"]].concat(),
            "--max-connected-clusters",
        ),
        ([&base[..], &["--lease-ttl", "1s"]].concat(), "--lease-ttl"),
        (
            [&base[..], &["--probe-interval", "0s"]].concat(),
            "--probe-interval",
        ),
        (
            [&base[..], &["--backoff-base", "1m", "--backoff-max", "1s"]].concat(),
            "--backoff-base",
        ),
        (
            [&base[..], &["--store-endpoints", "ftp://x:1"]].concat(),
            "--store-endpoints",
        ),
        (
            [&base[..], &["--store-cacert", "/nonexistent/ca"]].concat(),
            "--store-cacert",
        ),
        ([&base[..], &["--store-cert", "/x"]].concat(), "--store-key"),
        (
            [&base[..], &["--health-listen", "nowhere"]].concat(),
            "--health-listen",
        ),
    ];
    for (args, flag) in cases {
        let (code, stderr) = run(&args);
        assert_eq!(code, 64, "{args:?}: {stderr}");
        assert!(
            stderr.contains(flag),
            "{args:?} should name {flag}: {stderr}"
        );
    }
}

/// Ports of established TCP connections: (local port, remote port, socket inode).
fn established() -> Vec<(u16, u16, u64)> {
    let mut out = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 10 || fields[3] != "01" {
                continue;
            }
            let port = |addr: &str| {
                addr.rsplit(':')
                    .next()
                    .and_then(|p| u16::from_str_radix(p, 16).ok())
                    .unwrap_or(0)
            };
            out.push((
                port(fields[1]),
                port(fields[2]),
                fields[9].parse().unwrap_or(0),
            ));
        }
    }
    out
}

/// The socket inodes a process holds.
fn sockets_of(pid: u32) -> HashSet<u64> {
    let mut inodes = HashSet::new();
    if let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
        for fd in fds.flatten() {
            if let Ok(target) = std::fs::read_link(fd.path()) {
                let target = target.to_string_lossy().into_owned();
                if let Some(inode) = target
                    .strip_prefix("socket:[")
                    .and_then(|s| s.strip_suffix(']'))
                {
                    inodes.extend(inode.parse::<u64>().ok());
                }
            }
        }
    }
    inodes
}

/// How many established connections to `port` each process holds the client side of.
fn clients_of(port: u16) -> BTreeMap<u32, usize> {
    let clients: Vec<u64> = established()
        .iter()
        .filter(|(_, r, _)| *r == port)
        .map(|(_, _, inode)| *inode)
        .collect();
    let mut by_pid = BTreeMap::new();
    for proc_dir in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = proc_dir.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let held = sockets_of(pid);
        let count = clients.iter().filter(|inode| held.contains(inode)).count();
        if count > 0 {
            by_pid.insert(pid, count);
        }
    }
    by_pid
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_connection_per_peer_whatever_the_number_of_agents() {
    const AGENTS: usize = 8;
    let local = Store::etcd().await;
    let b = Peer::start("b", 2).await;
    let c = Peer::start("c", 3).await;
    let b_state = sample_state(&b.config, 20);
    let c_state = sample_state(&c.config, 5);
    b.publish(&b_state).await;
    c.publish(&c_state).await;
    let (b_port, c_port, local_port) = (
        b.store.process.port(),
        c.store.process.port(),
        local.process.port(),
    );
    // The test's own clients of the peers close: only kvstoremesh's may remain.
    let Peer {
        config: b_config,
        store: Store {
            process: b_process,
            client,
        },
    } = b;
    drop(client);
    let Peer {
        config: c_config,
        store: Store {
            process: c_process,
            client,
        },
    } = c;
    drop(client);

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("b"), peer_file(&b_process.endpoint())).unwrap();
    std::fs::write(dir.path().join("c"), peer_file(&c_process.endpoint())).unwrap();
    let health = format!("127.0.0.1:{}", free_port());
    let log_path = dir.path().join(".kvstoremesh.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let child = Command::new(BIN)
        .args([
            "--cluster-name",
            "a",
            "--cluster-id",
            "1",
            "--peers-dir",
            dir.path().to_str().unwrap(),
            "--store-endpoints",
            &local.endpoint(),
            "--health-listen",
            &health,
            "--probe-interval",
            "500ms",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(log))
        .spawn()
        .expect("start kvstoremesh");
    let mut mesh = KillOnDrop(child);
    let pid = mesh.0.id();
    let health = health.parse().unwrap();
    wait_for("readiness", TIMEOUT, || async {
        match tokio::net::TcpStream::connect(health).await {
            Ok(_) => match http_get(health, "/readyz").await {
                (200, _) => Ok(()),
                (code, body) => Err(format!("{code} {body}")),
            },
            Err(error) => Err(error.to_string()),
        }
    })
    .await;

    // N agents, each with its own connection to the local store, listing and watching the cache.
    let mut agents = Vec::new();
    for _ in 0..AGENTS {
        let agent = connect(&local.endpoint()).await;
        let prefix = model::Kind::Nodes.cache_prefix(&b_config.name);
        let listing = agent.raw().list_prefix(&prefix).await.unwrap();
        assert_eq!(listing.entries.len(), 20);
        let watch = agent
            .raw()
            .watch_prefix(&prefix, listing.revision + 1)
            .await
            .unwrap();
        agents.push((agent, watch));
    }
    assert_eq!(
        cache_of(&agents[0].0, &b_config.name).await,
        expected_cache(&b_config.name, &b_state)
    );
    assert_eq!(
        cache_of(&agents[0].0, &c_config.name).await,
        expected_cache(&c_config.name, &c_state)
    );

    // Count established connections to each peer's port by the process holding the client
    // side (etcd 3.4's gRPC gateway connects to its own port: the store's own pid is not a
    // client), and sample a few times while the agents are connected.
    let (b_pid, c_pid, local_pid) = (b_process.pid(), c_process.pid(), local.process.pid());
    let mut samples = Vec::new();
    for _ in 0..5 {
        let (sample, _) = wait_for("one connection per peer", TIMEOUT, || async {
            let mut b_clients = clients_of(b_port);
            let mut c_clients = clients_of(c_port);
            let mut local_clients = clients_of(local_port);
            b_clients.remove(&b_pid);
            c_clients.remove(&c_pid);
            local_clients.remove(&local_pid);
            let only_mesh = BTreeMap::from([(pid, 1)]);
            if b_clients == only_mesh && c_clients == only_mesh {
                Ok((
                    local_clients.get(&pid).copied(),
                    local_clients.values().sum::<usize>(),
                ))
            } else {
                Err(format!(
                    "clients by pid: b {b_clients:?}, c {c_clients:?} (kvstoremesh is {pid})"
                ))
            }
        })
        .await;
        samples.push(sample);
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    println!(
        "each peer's store: exactly 1 client connection, kvstoremesh's ({} samples); local \
         store [kvstoremesh's, everyone's] with {AGENTS} agents: {samples:?}",
        samples.len()
    );
    for (from_mesh, total) in &samples {
        assert_eq!(
            *from_mesh,
            Some(1),
            "kvstoremesh holds one connection to the local store"
        );
        assert!(
            *total > AGENTS,
            "the agents' connections go to the local store"
        );
    }

    // The agents see changes of the peer through their one local connection.
    let publisher = connect(&b_process.endpoint()).await;
    let (key, value) = node(&b_config, 77);
    publisher.raw().put(&key, &value, None).await.unwrap();
    for (_, watch) in &mut agents {
        let event = tokio::time::timeout(TIMEOUT, watch.next())
            .await
            .expect("event");
        assert!(matches!(event, Some(WatchEvent::Put { .. })), "{event:?}");
    }

    // Metrics per peer on the binary's endpoint.
    let (_, metrics) = http_get(health, "/metrics").await;
    assert_eq!(
        metric(&metrics, "kvstoremesh_peer_connected{peer=\"b\"}"),
        Some(1.0)
    );
    assert_eq!(
        metric(&metrics, "kvstoremesh_peer_entries{peer=\"c\",kind=\"ip\"}"),
        Some(5.0)
    );

    // SIGTERM: a clean exit.
    signal(pid, "TERM");
    let status = tokio::task::spawn_blocking(move || mesh.0.wait())
        .await
        .unwrap();
    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
    assert!(status.as_ref().unwrap().success(), "{status:?}\n{log}");
    assert!(log.contains("kvstoremesh stopped"), "{log}");
    drop(c_process);
}
