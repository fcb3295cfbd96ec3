//! The identity policy program in the real kernel: a "pod" namespace behind a veth whose
//! host side (in a "node" namespace) carries the program, clients in the node namespace on
//! addresses the ipcache maps to identities of two other clusters.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use bpf::maps::{
    DIR_EGRESS, DIR_INGRESS, EnforcementKey, Ipcache4Key, IpcacheValue, PolicyKey, PolicyValue,
    Reason, addr, port,
};
use bpf::{Datapath, DatapathConfig, MapSizes, MapState, diff};
use serde_json::Value;
use testkit::sandbox::{BpfRoot, Netns, is_root, run_ok};

const POD: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 2);
const CLIENT_B: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 1);
const CLIENT_C: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 3);
const SERVER_ID: u32 = (1 << 16) | 1000;
const CLIENT_B_ID: u32 = (2 << 16) | 2000;
const CLIENT_C_ID: u32 = (3 << 16) | 2000;

struct Env {
    node: Netns,
    pod: Netns,
    _root: BpfRoot,
    dp: Datapath,
    ifindex: u32,
    server: Child,
}

impl Drop for Env {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
    }
}

fn echo() -> std::path::PathBuf {
    testkit::workspace_bin("mesh-echo", "mesh-echo").unwrap()
}

fn setup() -> Option<Env> {
    if !is_root() {
        eprintln!("skipped: needs root (CI runs it as root)");
        return None;
    }
    let node = Netns::new("pnode").unwrap();
    let pod = Netns::new("ppod").unwrap();
    let host_if = testkit::sandbox::unique_name("ph");
    run_ok(Command::new("ip").args([
        "-n",
        node.name(),
        "link",
        "add",
        &host_if,
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        pod.name(),
    ]))
    .unwrap();
    for (ns, dev, addrs) in [
        (
            &node,
            host_if.as_str(),
            vec!["10.201.0.1/24", "10.201.0.3/24"],
        ),
        (&pod, "eth0", vec!["10.201.0.2/24"]),
    ] {
        for a in addrs {
            run_ok(Command::new("ip").args(["-n", ns.name(), "addr", "add", a, "dev", dev]))
                .unwrap();
        }
        run_ok(Command::new("ip").args(["-n", ns.name(), "link", "set", dev, "up"])).unwrap();
    }
    let root = BpfRoot::new("pol");
    let config = DatapathConfig {
        bpffs: root.bpffs().to_owned(),
        root: root.name().to_owned(),
        sizes: MapSizes::default(),
    };
    let name = host_if.clone();
    let (dp, ifindex) = node
        .within(move || {
            let mut dp = Datapath::load(&config).unwrap();
            let ifindex = nix::net::if_::if_nametoindex(name.as_str()).unwrap();
            dp.attach_interface(ifindex, &name).unwrap();
            (dp, ifindex)
        })
        .unwrap();
    let server = pod
        .command(echo())
        .args(["serve", "--name", "server", "--tcp", "0.0.0.0:8080"])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut env = Env {
        node,
        pod,
        _root: root,
        dp,
        ifindex,
        server,
    };
    // Identities: the pod, a client of cluster 2 and one of cluster 3.
    let mut desired = MapState::default();
    for (ip, identity, cluster) in [
        (POD, SERVER_ID, 1),
        (CLIENT_B, CLIENT_B_ID, 2),
        (CLIENT_C, CLIENT_C_ID, 3),
    ] {
        desired.ipcache.insert(
            Ipcache4Key {
                prefixlen: 32,
                address: addr(ip),
            },
            IpcacheValue {
                identity,
                cluster_id: cluster,
                ..IpcacheValue::default()
            },
        );
    }
    env.program(&desired);
    for _ in 0..100 {
        if env.probe(CLIENT_B)["failures"] == 0 {
            return Some(env);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("the pod's server never answered");
}

impl Env {
    fn program(&mut self, desired: &MapState) {
        let mut actual = self.dp.read_state().unwrap();
        let errors = self.dp.apply(&diff(desired, &actual), &mut actual);
        assert!(errors.is_empty(), "{errors:?}");
    }

    fn probe(&self, source: Ipv4Addr) -> Value {
        let out = self
            .node
            .command(echo())
            .args([
                "probe",
                "--tcp",
                "10.201.0.2:8080",
                "--timeout",
                "300ms",
                "--source",
            ])
            .arg(source.to_string())
            .output()
            .unwrap();
        serde_json::from_slice(&out.stdout).unwrap()
    }

    fn counters(&mut self) -> BTreeMap<(Reason, u8), u64> {
        self.dp
            .counters()
            .unwrap()
            .into_iter()
            .map(|c| ((c.reason, c.direction), c.packets))
            .collect()
    }
}

fn enforce(desired: &mut MapState, direction: u8) {
    desired.enforcement.insert(EnforcementKey {
        identity: SERVER_ID,
        direction,
        pad: [0; 3],
    });
}

#[test]
fn only_the_allowed_remote_identity_gets_in_and_the_drop_is_reported() {
    let Some(mut env) = setup() else { return };
    let mut reader = env.dp.take_drops().unwrap();
    let mut desired = env.dp.read_state().unwrap();
    desired.policy.insert(
        PolicyKey {
            local_identity: SERVER_ID,
            peer_identity: CLIENT_B_ID,
            port: port(8080),
            proto: 6,
            direction: DIR_INGRESS,
        },
        PolicyValue::default(),
    );
    enforce(&mut desired, DIR_INGRESS);
    env.program(&desired);

    let b = env.probe(CLIENT_B);
    assert_eq!(b["failures"], 0, "cluster 2's client is allowed: {b}");
    let c = env.probe(CLIENT_C);
    assert_eq!(c["failures"], 1, "cluster 3's client is dropped: {c}");

    let drops = reader.drain();
    let drop = drops
        .iter()
        .find(|d| d.src == CLIENT_C)
        .unwrap_or_else(|| panic!("no drop event for {CLIENT_C}: {drops:?}"));
    assert_eq!(drop.dst, POD);
    assert_eq!(drop.dport, 8080);
    assert_eq!(drop.src_identity, CLIENT_C_ID);
    assert_eq!(drop.src_cluster, 3);
    assert_eq!(drop.dst_identity, SERVER_ID);
    assert_eq!(drop.direction, DIR_INGRESS);
    assert_eq!(drop.reason, Some(Reason::DropPolicy));
    assert_eq!(drop.ifindex, env.ifindex);
    assert!(drops.iter().all(|d| d.src != CLIENT_B), "{drops:?}");

    let counters = env.counters();
    assert!(
        counters[&(Reason::DropPolicy, DIR_INGRESS)] >= 1,
        "{counters:?}"
    );
    assert!(
        counters[&(Reason::ForwardPolicy, DIR_INGRESS)] >= 1,
        "{counters:?}"
    );
    // The server's answers went out as replies of the allowed flow.
    assert!(
        counters[&(Reason::ForwardReply, DIR_EGRESS)] >= 1,
        "{counters:?}"
    );
}

#[test]
fn replies_pass_an_enforced_direction_and_lifting_enforcement_opens_it() {
    let Some(mut env) = setup() else { return };
    // The pod may send nothing of its own, but answers what it is asked.
    let mut desired = env.dp.read_state().unwrap();
    enforce(&mut desired, DIR_EGRESS);
    env.program(&desired);
    assert_eq!(env.probe(CLIENT_B)["failures"], 0);
    let out = env
        .pod
        .command(echo())
        .args(["probe", "--tcp", "10.201.0.1:9", "--timeout", "300ms"])
        .output()
        .unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let error = v["errors"][0].as_str().unwrap_or_default().to_owned();
    assert!(
        error.contains("timed out"),
        "the pod's own connect is dropped: {v}"
    );

    // Ingress enforced with nothing allowed: clients are dropped; lifted: they get in.
    enforce(&mut desired, DIR_INGRESS);
    env.program(&desired);
    assert_eq!(env.probe(CLIENT_B)["failures"], 1);
    desired.enforcement.clear();
    env.program(&desired);
    assert_eq!(env.probe(CLIENT_B)["failures"], 0);
    assert_eq!(env.probe(CLIENT_C)["failures"], 0);
    // Detaching leaves the interface to itself.
    env.dp.detach_interface(env.ifindex).unwrap();
    assert!(env.dp.attached_interfaces().unwrap().is_empty());
}
