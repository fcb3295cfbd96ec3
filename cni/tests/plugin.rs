//! The real binary, run as a container runtime runs it, against real network namespaces: a
//! "node" namespace the plugin runs in, "pod" namespaces it attaches, and a stand-in agent.
//! Tests needing namespaces skip (saying so) unless run as root.

mod support;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc;
use std::time::Duration;

use model::endpoint::EndpointRegistration;
use serde_json::{Value, json};
use support::{Answer, Netns, Node, StubAgent, can_run, plugin};

/// The (only) JSON object in `ip -j` output.
fn first(value: Value) -> Value {
    value
        .as_array()
        .unwrap()
        .first()
        .cloned()
        .unwrap_or(Value::Null)
}

#[test]
fn add_attaches_the_pod_and_registers_it() {
    if !can_run() {
        return;
    }
    let node = Node::new("10.71.0.0/24");
    let agent = StubAgent::start(&node, Answer::Accept);
    let pod = Netns::new();

    let result = node
        .cni("ADD", "pod-a", Some(&pod), &node.config(agent.address))
        .ok()
        .json();

    // The result.
    let host_name = result["interfaces"][0]["name"].as_str().unwrap().to_owned();
    assert!(
        host_name.starts_with("cm") && host_name.len() == 15,
        "{result}"
    );
    let host = first(node.netns.ip_json(&["link", "show", "dev", &host_name]));
    let eth0 = first(pod.ip_json(&["addr", "show", "dev", "eth0"]));
    assert_eq!(
        result,
        json!({
            "cniVersion": "1.0.0",
            "interfaces": [
                {"name": host_name, "mac": host["address"]},
                {"name": "eth0", "mac": eth0["address"], "sandbox": pod.path},
            ],
            "ips": [{"address": "10.71.0.2/32", "gateway": "10.71.0.1", "interface": 1}],
            "routes": [{"dst": "0.0.0.0/0", "gw": "10.71.0.1"}],
            "dns": {},
        })
    );

    // The pod side: up, 10.71.0.2/32, a link route to the gateway and the default route.
    assert!(
        eth0["flags"].as_array().unwrap().contains(&json!("UP")),
        "{eth0}"
    );
    let addrs: Vec<_> = eth0["addr_info"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["family"] == "inet")
        .map(|a| format!("{}/{}", a["local"].as_str().unwrap(), a["prefixlen"]))
        .collect();
    assert_eq!(addrs, ["10.71.0.2/32"]);
    let lo = first(pod.ip_json(&["link", "show", "dev", "lo"]));
    assert!(
        lo["flags"].as_array().unwrap().contains(&json!("UP")),
        "{lo}"
    );
    let routes = pod.ip_json(&["route", "show"]);
    let routes = routes.as_array().unwrap();
    assert!(
        routes
            .iter()
            .any(|r| r["dst"] == "default" && r["gateway"] == "10.71.0.1" && r["dev"] == "eth0"),
        "{routes:?}"
    );
    assert!(
        routes
            .iter()
            .any(|r| r["dst"] == "10.71.0.1" && r["scope"] == "link" && r["dev"] == "eth0"),
        "{routes:?}"
    );

    // The host side: up, carrying the gateway, with the /32 route to the pod; forwarding on.
    assert!(
        host["flags"].as_array().unwrap().contains(&json!("UP")),
        "{host}"
    );
    let host_addr = first(node.netns.ip_json(&["addr", "show", "dev", &host_name]));
    assert_eq!(host_addr["addr_info"][0]["local"], "10.71.0.1");
    assert_eq!(host_addr["addr_info"][0]["prefixlen"], 32);
    let route = first(node.netns.ip_json(&["route", "show", "10.71.0.2/32"]));
    assert_eq!(route["dev"], host_name.as_str(), "{route}");
    let forward = node
        .netns
        .command("cat")
        .arg("/proc/sys/net/ipv4/ip_forward")
        .output()
        .unwrap();
    assert_eq!(String::from_utf8(forward.stdout).unwrap().trim(), "1");

    // The allocation and the registration.
    assert_eq!(node.allocations(), ["10.71.0.2"]);
    let received = agent.received();
    assert_eq!(received.len(), 1, "{received:?}");
    assert_eq!(received[0].method, "PUT");
    assert_eq!(received[0].path, "/v1/endpoints/pod-a");
    let registration: EndpointRegistration = serde_json::from_str(&received[0].body).unwrap();
    assert_eq!(registration.container_id, "pod-a");
    assert_eq!(registration.namespace, "default");
    assert_eq!(registration.pod, "web-0");
    assert_eq!(registration.ifname, "eth0");
    assert_eq!(registration.host_ifname, host_name);
    assert_eq!(u64::from(registration.host_ifindex), host["ifindex"]);
    assert_eq!(registration.ip, Ipv4Addr::new(10, 71, 0, 2));
    assert_eq!(registration.netns, pod.path.display().to_string());
}

#[test]
fn two_pods_get_different_addresses_and_talk_over_tcp() {
    if !can_run() {
        return;
    }
    let node = Node::new("10.72.0.0/24");
    let agent = StubAgent::start(&node, Answer::Accept);
    let (a, b) = (Netns::new(), Netns::new());
    let config = node.config(agent.address);
    let ip_a = node.cni("ADD", "pod-a", Some(&a), &config).ok().json()["ips"][0]["address"].clone();
    let ip_b = node.cni("ADD", "pod-b", Some(&b), &config).ok().json()["ips"][0]["address"].clone();
    assert_eq!((ip_a, ip_b), (json!("10.72.0.2/32"), json!("10.72.0.3/32")));
    assert_eq!(node.host_veths().len(), 2);

    let (port_tx, port_rx) = mpsc::channel();
    std::thread::scope(|scope| {
        let server = scope.spawn(|| {
            a.enter(|| {
                let listener = TcpListener::bind("10.72.0.2:0").unwrap();
                port_tx.send(listener.local_addr().unwrap().port()).unwrap();
                let (mut stream, peer) = listener.accept().unwrap();
                let mut buf = [0; 4];
                stream.read_exact(&mut buf).unwrap();
                stream.write_all(b"pong").unwrap();
                (peer.ip(), buf)
            })
        });
        let port = port_rx.recv_timeout(Duration::from_secs(5)).unwrap();
        let reply = b.enter(|| {
            let server = SocketAddr::from((Ipv4Addr::new(10, 72, 0, 2), port));
            let mut stream = TcpStream::connect_timeout(&server, Duration::from_secs(5)).unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            stream.write_all(b"ping").unwrap();
            let mut buf = [0; 4];
            stream.read_exact(&mut buf).unwrap();
            buf
        });
        assert_eq!(&reply, b"pong");
        let (peer, request) = server.join().unwrap();
        assert_eq!(peer, Ipv4Addr::new(10, 72, 0, 3));
        assert_eq!(&request, b"ping");
    });
}

#[test]
fn check_passes_then_names_what_is_broken() {
    if !can_run() {
        return;
    }
    let node = Node::new("10.73.0.0/24");
    let agent = StubAgent::start(&node, Answer::Accept);
    let pod = Netns::new();
    let mut config: Value = serde_json::from_str(&node.config(agent.address)).unwrap();
    let result = node
        .cni("ADD", "pod-a", Some(&pod), &config.to_string())
        .ok()
        .json();
    config["prevResult"] = result;
    let config = config.to_string();

    let check = node.cni("CHECK", "pod-a", Some(&pod), &config).ok();
    assert_eq!(check.stdout, "");

    let msg = node
        .cni("CHECK", "pod-unknown", Some(&pod), &config)
        .failed_with(3);
    assert!(msg.contains("pod-unknown"), "{msg}");

    pod.ip(&["addr", "del", "10.73.0.2/32", "dev", "eth0"]);
    let msg = node
        .cni("CHECK", "pod-a", Some(&pod), &config)
        .failed_with(102);
    assert!(msg.contains("does not carry 10.73.0.2/32"), "{msg}");

    // Deleting the pod's interface deletes its veth peer, the host side, too.
    pod.ip(&["link", "del", "eth0"]);
    let msg = node
        .cni("CHECK", "pod-a", Some(&pod), &config)
        .failed_with(102);
    assert!(
        msg.starts_with("interface cm") && msg.contains("does not exist"),
        "{msg}"
    );
}

#[test]
fn del_removes_everything_and_is_idempotent() {
    if !can_run() {
        return;
    }
    let node = Node::new("10.74.0.0/24");
    let agent = StubAgent::start(&node, Answer::Accept);
    let pod = Netns::new();
    let config = node.config(agent.address);
    node.cni("ADD", "pod-a", Some(&pod), &config).ok();
    assert_eq!(node.host_veths().len(), 1);

    let del = node.cni("DEL", "pod-a", Some(&pod), &config).ok();
    assert_eq!(del.stdout, "");
    assert_eq!(node.host_veths(), Vec::<String>::new());
    assert_eq!(pod.links(), ["lo"]);
    assert_eq!(node.allocations(), Vec::<String>::new());
    let received = agent.received();
    assert_eq!(received.len(), 2, "{received:?}");
    assert_eq!(
        (received[1].method.as_str(), received[1].path.as_str()),
        ("DELETE", "/v1/endpoints/pod-a")
    );

    // Again, then without the netns, then with the agent down: all fine.
    node.cni("DEL", "pod-a", Some(&pod), &config).ok();
    node.cni("DEL", "pod-a", None, &config).ok();
    let down = node.config(node.closed_port());
    let del = node.cni("DEL", "pod-a", None, &down).ok();
    assert!(del.stderr.contains("without the agent"), "{del:?}");

    // The freed address is handed out again.
    let again = node.cni("ADD", "pod-b", Some(&pod), &config).ok().json();
    assert_eq!(again["ips"][0]["address"], "10.74.0.2/32");
}

#[test]
fn exhausted_range_is_code_100_and_leaves_nothing() {
    if !can_run() {
        return;
    }
    let node = Node::new("10.75.0.0/30");
    let agent = StubAgent::start(&node, Answer::Accept);
    let (a, b) = (Netns::new(), Netns::new());
    let config = node.config(agent.address);
    node.cni("ADD", "pod-a", Some(&a), &config).ok();
    let msg = node.cni("ADD", "pod-b", Some(&b), &config).failed_with(100);
    assert!(msg.contains("10.75.0.0/30"), "{msg}");
    assert_eq!(node.host_veths().len(), 1);
    assert_eq!(b.links(), ["lo"]);
    assert_eq!(node.allocations(), ["10.75.0.2"]);
}

#[test]
fn agent_down_is_code_11_and_leaves_nothing() {
    if !can_run() {
        return;
    }
    let node = Node::new("10.76.0.0/24");
    let pod = Netns::new();
    let agent = node.closed_port();
    let msg = node
        .cni("ADD", "pod-a", Some(&pod), &node.config(agent))
        .failed_with(11);
    assert!(msg.contains(&agent.to_string()), "{msg}");
    assert_eq!(node.host_veths(), Vec::<String>::new());
    assert_eq!(pod.links(), ["lo"]);
    assert_eq!(node.allocations(), Vec::<String>::new());
}

#[test]
fn agent_refusal_is_code_11_with_its_reason_and_leaves_nothing() {
    if !can_run() {
        return;
    }
    let node = Node::new("10.77.0.0/24");
    let agent = StubAgent::start(
        &node,
        Answer::Refuse(409, "endpoint pod-a is registered already"),
    );
    let pod = Netns::new();
    let msg = node
        .cni("ADD", "pod-a", Some(&pod), &node.config(agent.address))
        .failed_with(11);
    assert!(
        msg.contains("409") && msg.contains("endpoint pod-a is registered already"),
        "{msg}"
    );
    assert_eq!(node.host_veths(), Vec::<String>::new());
    assert_eq!(pod.links(), ["lo"]);
    assert_eq!(node.allocations(), Vec::<String>::new());
}

#[test]
fn a_failure_inside_the_pod_undoes_the_veth_and_the_address() {
    if !can_run() {
        return;
    }
    let node = Node::new("10.79.0.0/24");
    let agent = StubAgent::start(&node, Answer::Accept);
    let pod = Netns::new();
    pod.ip(&[
        "link", "add", "eth0", "type", "veth", "peer", "name", "other",
    ]);
    let msg = node
        .cni("ADD", "pod-a", Some(&pod), &node.config(agent.address))
        .failed_with(101);
    assert!(msg.contains("to eth0"), "{msg}");
    assert_eq!(node.host_veths(), Vec::<String>::new());
    let mut links = pod.links();
    links.sort();
    assert_eq!(links, ["eth0", "lo", "other"]);
    assert_eq!(node.allocations(), Vec::<String>::new());
    assert!(agent.received().is_empty());
}

#[test]
fn a_repeated_add_fails_and_keeps_the_first_attachment() {
    if !can_run() {
        return;
    }
    let node = Node::new("10.80.0.0/24");
    let agent = StubAgent::start(&node, Answer::Accept);
    let pod = Netns::new();
    let config = node.config(agent.address);
    node.cni("ADD", "pod-a", Some(&pod), &config).ok();
    let msg = node
        .cni("ADD", "pod-a", Some(&pod), &config)
        .failed_with(101);
    assert!(msg.contains("already exists"), "{msg}");
    assert_eq!(node.host_veths().len(), 1);
    assert_eq!(node.allocations(), ["10.80.0.2"]);
    node.cni("CHECK", "pod-a", Some(&pod), &config).ok();
}

// The cases below fail before touching any namespace, so they need no root.

fn env<'a>(command: &'a str, netns: Option<&'a str>) -> Vec<(&'a str, &'a str)> {
    let mut env = vec![
        ("CNI_COMMAND", command),
        ("CNI_CONTAINERID", "pod-a"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_ARGS", "K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0"),
        ("CNI_PATH", "/opt/cni/bin"),
    ];
    env.extend(netns.map(|netns| ("CNI_NETNS", netns)));
    env
}

fn offline_config(dir: &tempfile::TempDir) -> Value {
    support::config("10.78.0.0/24", "127.0.0.1:1".parse().unwrap(), dir.path())
}

#[test]
fn missing_netns_variable_is_code_4() {
    let dir = tempfile::tempdir().unwrap();
    let out = plugin(None, &env("ADD", None), &offline_config(&dir).to_string());
    let msg = out.failed_with(4);
    assert!(msg.contains("CNI_NETNS"), "{msg}");
}

#[test]
fn nonexistent_netns_is_code_3() {
    let dir = tempfile::tempdir().unwrap();
    let out = plugin(
        None,
        &env("ADD", Some("/run/netns/cnit-does-not-exist")),
        &offline_config(&dir).to_string(),
    );
    let msg = out.failed_with(3);
    assert!(
        msg.contains("CNI_NETNS") && msg.contains("cnit-does-not-exist"),
        "{msg}"
    );
    assert!(!dir.path().join("mesh").exists(), "nothing allocated");
}

#[test]
fn bad_config_is_code_7_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = offline_config(&dir);
    config.as_object_mut().unwrap().remove("podCIDR");
    let out = plugin(
        None,
        &env("ADD", Some("/proc/self/ns/net")),
        &config.to_string(),
    );
    let msg = out.failed_with(7);
    assert!(msg.contains("podCIDR"), "{msg}");

    config["podCIDR"] = json!("10.78.0.0/33");
    config["cniVersion"] = json!("0.4.0");
    let out = plugin(None, &env("DEL", None), &config.to_string());
    assert!(out.failed_with(7).contains("podCIDR"));
    assert_eq!(
        out.json()["cniVersion"],
        "0.4.0",
        "answered in the config's version"
    );

    let out = plugin(None, &env("DEL", None), "not json");
    out.failed_with(6);
}

#[test]
fn version_reports_the_supported_versions() {
    let out = plugin(
        None,
        &[("CNI_COMMAND", "VERSION")],
        r#"{"cniVersion":"1.0.0"}"#,
    )
    .ok();
    assert_eq!(
        out.json(),
        json!({"cniVersion": "1.0.0", "supportedVersions": ["0.4.0", "1.0.0"]})
    );
}
