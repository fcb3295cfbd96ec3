//! The socket load balancer in the real kernel: clients in a cgroup and a network namespace
//! the test made, servers in the same namespace (so nothing leaves it, even if balancing
//! failed), services programmed through the loader.

use std::net::Ipv4Addr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use bpf::{
    Datapath, DatapathConfig, DatapathError, Frontend4, MapSizes, MapState, PinnedServices, diff,
};
use serde_json::Value;
use testkit::sandbox::{BpfRoot, Cgroup, Netns, is_root};

const TCP: u8 = 6;
const UDP: u8 = 17;

struct Env {
    ns: Netns,
    cgroup: Cgroup,
    root: BpfRoot,
    servers: Vec<Child>,
}

impl Env {
    fn new() -> Option<Env> {
        if !is_root() {
            eprintln!("skipped: needs root (CI runs it as root)");
            return None;
        }
        Some(Env {
            ns: Netns::new("lbt").unwrap(),
            cgroup: Cgroup::new("lbt").unwrap(),
            root: BpfRoot::new("lbt"),
            servers: Vec::new(),
        })
    }

    fn config(&self, sizes: MapSizes) -> DatapathConfig {
        DatapathConfig {
            bpffs: self.root.bpffs().to_owned(),
            root: self.root.name().to_owned(),
            sizes,
        }
    }

    fn load(&self) -> Datapath {
        let mut dp = Datapath::load(&self.config(MapSizes::default())).unwrap();
        dp.attach_cgroup(self.cgroup.path()).unwrap();
        dp
    }

    /// An echo server named `name` on `addr` (TCP and UDP), inside the namespace.
    fn serve(&mut self, name: &str, addr: &str) {
        let child = self
            .ns
            .command(echo())
            .args(["serve", "--name", name, "--tcp", addr, "--udp", addr])
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.servers.push(child);
        // Ready when it answers directly.
        for _ in 0..100 {
            let out = self
                .ns
                .command(echo())
                .args(["probe", "--tcp", addr])
                .output()
                .unwrap();
            if out.status.success() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("echo server {name} on {addr} did not start");
    }

    /// Runs the probe from inside the cgroup and the namespace; its JSON summary.
    fn probe(&self, args: &[&str]) -> Value {
        let out = self
            .ns
            .command_in(&self.cgroup, echo())
            .arg("probe")
            .args(args)
            .output()
            .unwrap();
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "probe {args:?}: {e}: {} {}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        })
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        for child in &mut self.servers {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn echo() -> std::path::PathBuf {
    testkit::workspace_bin("mesh-echo", "mesh-echo").unwrap()
}

fn vip(last: u8, port: u16, proto: u8) -> Frontend4 {
    Frontend4 {
        ip: Ipv4Addr::new(10, 96, 0, last),
        port,
        proto,
    }
}

fn program(dp: &mut Datapath, actual: &mut MapState, desired: &MapState) {
    let errors = dp.apply(&diff(desired, actual), actual);
    assert!(errors.is_empty(), "{errors:?}");
}

fn count(v: &Value, field: &str, key: &str) -> u64 {
    v[field][key].as_u64().unwrap_or(0)
}

#[test]
fn tcp_to_a_vip_reaches_every_backend_and_getpeername_shows_the_vip() {
    let Some(mut env) = Env::new() else { return };
    env.serve("b1", "127.0.0.1:9001");
    env.serve("b2", "127.0.0.2:9002");
    let mut dp = env.load();
    let mut actual = dp.read_state().unwrap();
    assert_eq!(actual, MapState::default(), "a fresh root starts empty");
    let mut desired = MapState::default();
    desired.set_frontend(
        vip(10, 80, TCP),
        &[
            (Ipv4Addr::new(127, 0, 0, 1), 9001),
            (Ipv4Addr::new(127, 0, 0, 2), 9002),
        ],
    );
    program(&mut dp, &mut actual, &desired);
    let v = env.probe(&["--tcp", "10.96.0.10:80", "--count", "60"]);
    assert_eq!(v["failures"], 0, "{v}");
    assert!(count(&v, "answers", "b1") > 5, "{v}");
    assert!(count(&v, "answers", "b2") > 5, "{v}");
    assert_eq!(count(&v, "peers", "10.96.0.10:80"), 60, "{v}");

    // A backend removed from the map gets no new connection.
    desired.set_frontend(vip(10, 80, TCP), &[(Ipv4Addr::new(127, 0, 0, 2), 9002)]);
    program(&mut dp, &mut actual, &desired);
    let v = env.probe(&["--tcp", "10.96.0.10:80", "--count", "20"]);
    assert_eq!(count(&v, "answers", "b2"), 20, "{v}");
    assert_eq!(dp.read_state().unwrap(), desired);

    // The pins alone show the same, without loading anything.
    let pinned = PinnedServices::open(dp.dir()).unwrap();
    assert_eq!(
        pinned.backends(vip(10, 80, TCP)).unwrap(),
        Some(vec![(Ipv4Addr::new(127, 0, 0, 2), 9002)])
    );
    assert_eq!(pinned.backends(vip(11, 80, TCP)).unwrap(), None);
}

#[test]
fn udp_through_the_vip_answers_from_the_vip() {
    let Some(mut env) = Env::new() else { return };
    env.serve("u1", "127.0.0.1:9101");
    env.serve("u2", "127.0.0.3:9102");
    let mut dp = env.load();
    let mut actual = MapState::default();
    let mut desired = MapState::default();
    desired.set_frontend(
        vip(53, 53, UDP),
        &[
            (Ipv4Addr::new(127, 0, 0, 1), 9101),
            (Ipv4Addr::new(127, 0, 0, 3), 9102),
        ],
    );
    program(&mut dp, &mut actual, &desired);
    let v = env.probe(&["--udp", "10.96.0.53:53", "--count", "30"]);
    assert_eq!(v["failures"], 0, "{v}");
    // recvmsg4 shows the frontend as the source of every answer.
    assert_eq!(count(&v, "sources", "10.96.0.53:53"), 30, "{v}");
    // One unconnected socket keeps the backend it was first given.
    let answers = v["answers"].as_object().unwrap();
    assert_eq!(answers.len(), 1, "{v}");
}

#[test]
fn a_frontend_without_backends_refuses_at_once() {
    let Some(env) = Env::new() else { return };
    let mut dp = env.load();
    let mut actual = MapState::default();
    let mut desired = MapState::default();
    desired.set_frontend(vip(20, 80, TCP), &[]);
    program(&mut dp, &mut actual, &desired);
    let started = std::time::Instant::now();
    let v = env.probe(&["--tcp", "10.96.0.20:80", "--timeout", "5s"]);
    assert_eq!(v["failures"], 1, "{v}");
    let error = v["errors"][0].as_str().unwrap();
    assert!(error.contains("refused"), "{error}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "refused at once, not after the timeout"
    );
}

#[test]
fn a_second_load_reuses_the_maps_and_replaces_the_links() {
    let Some(mut env) = Env::new() else { return };
    env.serve("r1", "127.0.0.1:9201");
    let mut first = env.load();
    let mut actual = MapState::default();
    let mut desired = MapState::default();
    desired.set_frontend(vip(30, 80, TCP), &[(Ipv4Addr::new(127, 0, 0, 1), 9201)]);
    program(&mut first, &mut actual, &desired);
    drop(first);
    // The pinned maps and links outlive the loader.
    let v = env.probe(&["--tcp", "10.96.0.30:80", "--count", "5"]);
    assert_eq!(count(&v, "answers", "r1"), 5, "{v}");

    let mut second = env.load();
    assert_eq!(second.read_state().unwrap(), desired);
    assert!(diff(&desired, &second.read_state().unwrap()).is_empty());
    let v = env.probe(&["--tcp", "10.96.0.30:80", "--count", "5"]);
    assert_eq!(count(&v, "answers", "r1"), 5, "{v}");
    // Four socket programs attached, not eight: the old links were let go.
    let shown = testkit::sandbox::run_ok(
        Command::new("bpftool")
            .args(["cgroup", "show"])
            .arg(env.cgroup.path()),
    )
    .unwrap();
    let attached = shown.lines().filter(|l| l.contains("mesh_")).count();
    assert_eq!(attached, 4, "{shown}");
}

#[test]
fn a_full_map_is_a_named_error_and_what_fits_stays() {
    let Some(env) = Env::new() else { return };
    let sizes = MapSizes {
        services: 4,
        ..MapSizes::default()
    };
    let mut dp = Datapath::load(&env.config(sizes)).unwrap();
    let mut actual = MapState::default();
    let mut desired = MapState::default();
    desired.set_frontend(vip(40, 80, TCP), &[(Ipv4Addr::new(127, 0, 0, 1), 1)]);
    desired.set_frontend(
        vip(41, 80, TCP),
        &[
            (Ipv4Addr::new(127, 0, 0, 1), 2),
            (Ipv4Addr::new(127, 0, 0, 1), 3),
            (Ipv4Addr::new(127, 0, 0, 1), 4),
        ],
    );
    let errors = dp.apply(&diff(&desired, &actual), &mut actual);
    assert!(!errors.is_empty());
    for e in &errors {
        assert!(
            matches!(
                e,
                DatapathError::MapFull {
                    map: "mesh_svc4",
                    capacity: 4
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("mesh_svc4 is full"), "{e}");
    }
    assert_eq!(actual.services.len(), 4);
    assert_eq!(dp.read_state().unwrap(), actual);
}

#[test]
fn a_pinned_map_of_another_size_is_refused_by_name() {
    let Some(env) = Env::new() else { return };
    drop(Datapath::load(&env.config(MapSizes::default())).unwrap());
    let sizes = MapSizes {
        policy: 128,
        ..MapSizes::default()
    };
    let error = Datapath::load(&env.config(sizes)).unwrap_err();
    assert!(
        matches!(error, DatapathError::PinnedMapMismatch { .. }),
        "{error}"
    );
    assert!(error.to_string().contains("mesh_policy"), "{error}");
}
