//! connect() latency to a service VIP through our socket load balancer, against a direct
//! connect to the backend and against the same services as kube-proxy-style iptables DNAT
//! rules (nft and legacy backends), at several service counts; and the time to program 10k
//! services into the maps.
//!
//! ```sh
//! cargo bench -p bpf --bench connect -- [--runs 3] [--samples 2000] [--sizes 10,1000,10000] \
//!     [--backends 10] [--skip-iptables] [--json FILE]
//! ```
//!
//! Root only. Everything happens in network namespaces the bench creates (loopback only):
//! backends are addresses 10.244.0.1..=N on each namespace's `lo` with one listener; our VIPs
//! are 10.96.x.y, the iptables VIPs 10.97.x.y (the bench process sits in the cgroup our
//! programs attach to, so its iptables connects also pay our programs' one failed lookup).
//! The modes are measured interleaved, connect by connect (sockets are made in each mode's
//! namespace beforehand), so machine noise falls on all of them alike. Each run measures every
//! size; the table shows the median over runs of each run's p50/p99, with the spread
//! (min–max) of the p50s.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bpf::{Datapath, DatapathConfig, Frontend4, MapSizes, MapState, diff};
use socket2::{Domain, Socket, Type};
use testkit::sandbox::{BpfRoot, Cgroup, Netns, is_root, run_ok};

const PORT: u16 = 80;
const BACKEND_PORT: u16 = 8080;

struct Options {
    runs: usize,
    samples: usize,
    sizes: Vec<usize>,
    backends: usize,
    iptables: bool,
    json: Option<String>,
}

fn options() -> Options {
    let mut o = Options {
        runs: 3,
        samples: 2000,
        sizes: vec![10, 1000, 10_000],
        backends: 10,
        iptables: true,
        json: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().unwrap_or_else(|| panic!("{arg} needs a value"));
        match arg.as_str() {
            "--runs" => o.runs = value().parse().expect("--runs: a number"),
            "--samples" => o.samples = value().parse().expect("--samples: a number"),
            "--backends" => o.backends = value().parse().expect("--backends: a number"),
            "--sizes" => {
                o.sizes = value()
                    .split(',')
                    .map(|s| s.parse().expect("--sizes: numbers"))
                    .collect()
            }
            "--skip-iptables" => o.iptables = false,
            "--json" => o.json = Some(value()),
            "--bench" => {}
            other => panic!("unknown argument {other}"),
        }
    }
    o
}

fn vip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 96, (i / 250) as u8, (i % 250 + 1) as u8)
}

fn iptables_vip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 97, (i / 250) as u8, (i % 250 + 1) as u8)
}

fn backend(j: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, 0, (j + 1) as u8)
}

/// A socket that closes with RST (no TIME_WAIT piles up), made in the calling thread's
/// namespace.
fn socket() -> Socket {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    socket.set_linger(Some(Duration::ZERO)).unwrap();
    socket
}

/// One connect on a prepared socket; its duration.
fn connect(socket: &Socket, to: SocketAddrV4) -> Duration {
    let started = Instant::now();
    socket
        .connect(&SocketAddr::V4(to).into())
        .unwrap_or_else(|e| panic!("connect {to}: {e}"));
    started.elapsed()
}

/// One mode: where its sockets are made and what it connects to.
struct Mode<'a> {
    name: &'static str,
    ns: &'a Netns,
    targets: Vec<SocketAddrV4>,
    times: Vec<Duration>,
}

/// `samples` connects per mode, interleaved: the k-th connect of every mode back to back (in
/// rotating order),
/// on sockets made beforehand in batches, each to a target spread over the mode's list.
fn measure(modes: &mut [Mode<'_>], samples: usize) {
    const BATCH: usize = 100;
    let mut done = 0;
    while done < samples {
        let n = BATCH.min(samples - done);
        let mut batches: Vec<std::vec::IntoIter<Socket>> = modes
            .iter()
            .map(|m| {
                let sockets: Vec<Socket> =
                    m.ns.within(move || (0..n).map(|_| socket()).collect())
                        .unwrap();
                sockets.into_iter()
            })
            .collect();
        let count = modes.len();
        for k in 0..n {
            // Each connect takes every position in turn, so none pays for the one before.
            for i in 0..count {
                let m = (i + k) % count;
                let mode = &mut modes[m];
                let target = mode.targets[((done + k) * 7919) % mode.targets.len()];
                let socket = batches[m].next().expect("one socket per connect");
                let took = connect(&socket, target);
                // The first batch warms caches and conntrack up.
                if done > 0 || samples <= BATCH {
                    mode.times.push(took);
                }
            }
        }
        done += n;
    }
}

/// p50 and p99 in µs.
fn percentiles(times: &mut [Duration]) -> (f64, f64) {
    times.sort();
    let at = |q: f64| times[((times.len() as f64 * q) as usize).min(times.len() - 1)];
    (
        at(0.50).as_nanos() as f64 / 1000.0,
        at(0.99).as_nanos() as f64 / 1000.0,
    )
}

/// kube-proxy's iptables shape: KUBE-SERVICES → per-service chain choosing an endpoint with
/// `statistic --mode random` → per-endpoint DNAT chain.
fn iptables_rules(services: usize, backends: usize) -> String {
    let mut chains = String::from("*nat\n:OUTPUT ACCEPT [0:0]\n:KUBE-SERVICES - [0:0]\n");
    let mut rules = String::from("-A OUTPUT -j KUBE-SERVICES\n");
    for i in 0..services {
        chains.push_str(&format!(":KUBE-SVC-{i} - [0:0]\n"));
        rules.push_str(&format!(
            "-A KUBE-SERVICES -d {}/32 -p tcp -m tcp --dport {PORT} -j KUBE-SVC-{i}\n",
            iptables_vip(i)
        ));
        for j in 0..backends {
            chains.push_str(&format!(":KUBE-SEP-{i}-{j} - [0:0]\n"));
            let left = backends - j;
            if left > 1 {
                rules.push_str(&format!(
                    "-A KUBE-SVC-{i} -m statistic --mode random --probability {:.10} -j KUBE-SEP-{i}-{j}\n",
                    1.0 / left as f64
                ));
            } else {
                rules.push_str(&format!("-A KUBE-SVC-{i} -j KUBE-SEP-{i}-{j}\n"));
            }
            rules.push_str(&format!(
                "-A KUBE-SEP-{i}-{j} -p tcp -m tcp -j DNAT --to-destination {}:{BACKEND_PORT}\n",
                backend(j)
            ));
        }
    }
    chains + &rules + "COMMIT\n"
}

fn restore(tool: &str, rules: &str) -> Duration {
    use std::io::Write;
    let started = Instant::now();
    let mut child = Command::new(tool)
        .stdin(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{tool}: {e}"));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(rules.as_bytes())
        .unwrap();
    assert!(child.wait().unwrap().success(), "{tool} failed");
    started.elapsed()
}

/// A namespace with the backends on `lo`, a route for the VIPs, and a listener.
fn namespace(backends: usize) -> Netns {
    let ns = Netns::new("bcn").unwrap();
    for j in 0..backends {
        run_ok(Command::new("ip").args([
            "-n",
            ns.name(),
            "addr",
            "add",
            &format!("{}/32", backend(j)),
            "dev",
            "lo",
        ]))
        .unwrap();
    }
    for vips in ["10.96.0.0/16", "10.97.0.0/16"] {
        run_ok(Command::new("ip").args(["-n", ns.name(), "route", "add", vips, "dev", "lo"]))
            .unwrap();
    }
    ns
}

/// A listener in the namespace that accepts and drops connections.
fn serve(ns: &Netns) {
    let listener = ns
        .within(|| {
            let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
            socket.set_reuse_address(true).unwrap();
            socket
                .bind(&SocketAddr::from(([0, 0, 0, 0], BACKEND_PORT)).into())
                .unwrap();
            socket.listen(4096).unwrap();
            TcpListener::from(socket)
        })
        .unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            drop(stream);
        }
    });
}

#[derive(Default)]
struct Row {
    /// mode → per-run (p50, p99)
    modes: BTreeMap<&'static str, Vec<(f64, f64)>>,
}

/// Seconds to program `desired` into a fresh, empty datapath, and to apply a change of one
/// backend of one service (diff over the whole state + apply) to `dp`.
fn program_times(
    config: &DatapathConfig,
    dp: &mut Datapath,
    actual: &mut MapState,
    desired: &MapState,
    backends: &[(Ipv4Addr, u16)],
    size: usize,
) -> (f64, f64) {
    let fresh_root = format!("{}f", config.root);
    let mut fresh = Datapath::load(&DatapathConfig {
        root: fresh_root.clone(),
        ..config.clone()
    })
    .unwrap();
    let mut empty = MapState::default();
    let started = Instant::now();
    let errors = fresh.apply(&diff(desired, &empty), &mut empty);
    let full = started.elapsed().as_secs_f64();
    assert!(errors.is_empty(), "{errors:?}");
    drop(fresh);
    let _ = std::fs::remove_dir_all(config.bpffs.join(fresh_root));

    let mut changed = desired.clone();
    let mut one = backends.to_vec();
    one[0] = (backend(backends.len() - 1), BACKEND_PORT + 1);
    changed.set_frontend(
        Frontend4 {
            ip: vip(size / 2),
            port: PORT,
            proto: 6,
        },
        &one,
    );
    let started = Instant::now();
    let ops = diff(&changed, actual);
    let errors = dp.apply(&ops, actual);
    let one_change = started.elapsed().as_secs_f64();
    assert!(errors.is_empty() && ops.len() == 1, "{ops:?} {errors:?}");
    // Back, for the measurement.
    dp.apply(&diff(desired, actual), actual);
    (full, one_change)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let o = options();
    if !is_root() {
        eprintln!("the connect bench needs root (network namespaces, eBPF)");
        return;
    }
    let mut rows: BTreeMap<usize, Row> = BTreeMap::new();
    let mut restore_times: BTreeMap<(&str, usize), Vec<f64>> = BTreeMap::new();
    let mut program_full = Vec::new();
    let mut program_one = Vec::new();
    let max = *o.sizes.iter().max().unwrap();
    let backend_targets: Vec<SocketAddrV4> = (0..o.backends)
        .map(|j| SocketAddrV4::new(backend(j), BACKEND_PORT))
        .collect();

    for run in 0..o.runs {
        eprintln!("run {}/{}", run + 1, o.runs);
        let lb_ns = namespace(o.backends);
        serve(&lb_ns);
        let cgroup = Cgroup::new("bcg").unwrap();
        let root = BpfRoot::new("bcb");
        let config = DatapathConfig {
            bpffs: root.bpffs().to_owned(),
            root: root.name().to_owned(),
            sizes: MapSizes {
                services: ((max * (o.backends + 1)) as u32 * 2).max(1024),
                ..MapSizes::default()
            },
        };
        let mut dp = Datapath::load(&config).unwrap();
        dp.attach_cgroup(cgroup.path()).unwrap();
        let home = std::fs::read_to_string("/proc/self/cgroup").unwrap();
        let home = home
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .unwrap_or("/")
            .to_owned();
        std::fs::write(
            cgroup.path().join("cgroup.procs"),
            std::process::id().to_string(),
        )
        .unwrap();
        let mut actual = MapState::default();
        let backends: Vec<(Ipv4Addr, u16)> = (0..o.backends)
            .map(|j| (backend(j), BACKEND_PORT))
            .collect();
        for &size in &o.sizes {
            let mut desired = MapState::default();
            for i in 0..size {
                desired.set_frontend(
                    Frontend4 {
                        ip: vip(i),
                        port: PORT,
                        proto: 6,
                    },
                    &backends,
                );
            }
            let errors = dp.apply(&diff(&desired, &actual), &mut actual);
            assert!(errors.is_empty(), "{errors:?}");
            if size == max {
                let (full, one) =
                    program_times(&config, &mut dp, &mut actual, &desired, &backends, size);
                program_full.push(full);
                program_one.push(one);
            }
            // The same services as iptables rules, one namespace per backend.
            let mut iptables = Vec::new();
            if o.iptables {
                for (tool, mode) in [
                    ("iptables-nft-restore", "iptables-nft"),
                    ("iptables-legacy-restore", "iptables-legacy"),
                ] {
                    let ns = namespace(o.backends);
                    serve(&ns);
                    let rules = iptables_rules(size, o.backends);
                    let took = ns.within(move || restore(tool, &rules)).unwrap();
                    restore_times
                        .entry((tool, size))
                        .or_default()
                        .push(took.as_secs_f64());
                    iptables.push((mode, ns));
                }
            }
            let services: Vec<SocketAddrV4> =
                (0..size).map(|i| SocketAddrV4::new(vip(i), PORT)).collect();
            let iptables_services: Vec<SocketAddrV4> = (0..size)
                .map(|i| SocketAddrV4::new(iptables_vip(i), PORT))
                .collect();
            let mut modes = vec![
                Mode {
                    name: "direct",
                    ns: &lb_ns,
                    targets: backend_targets.clone(),
                    times: Vec::new(),
                },
                Mode {
                    name: "socket-lb",
                    ns: &lb_ns,
                    targets: services,
                    times: Vec::new(),
                },
            ];
            for (mode, ns) in &iptables {
                modes.push(Mode {
                    name: mode,
                    ns,
                    targets: iptables_services.clone(),
                    times: Vec::new(),
                });
            }
            measure(&mut modes, o.samples);
            let row = rows.entry(size).or_default();
            for mode in &mut modes {
                let result = percentiles(&mut mode.times);
                eprintln!(
                    "  {size} {}: p50 {:.1} µs p99 {:.1} µs",
                    mode.name, result.0, result.1
                );
                row.modes.entry(mode.name).or_default().push(result);
            }
        }
        std::fs::write(
            testkit::sandbox::cgroup2_root()
                .join(home.trim_start_matches('/'))
                .join("cgroup.procs"),
            std::process::id().to_string(),
        )
        .expect("leaving the bench cgroup");
    }

    report(&o, &rows, &restore_times, &program_full, &program_one);
}

fn report(
    o: &Options,
    rows: &BTreeMap<usize, Row>,
    restore_times: &BTreeMap<(&str, usize), Vec<f64>>,
    program_full: &[f64],
    program_one: &[f64],
) {
    let stat = |runs: &[(f64, f64)]| {
        let p50s: Vec<f64> = runs.iter().map(|r| r.0).collect();
        let lo = p50s.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = p50s.iter().copied().fold(0.0, f64::max);
        (
            median(p50s),
            median(runs.iter().map(|r| r.1).collect()),
            lo,
            hi,
        )
    };
    println!(
        "\nconnect() latency, µs: median over {} runs of each run's p50 / p99 ({} connects per mode, interleaved); [p50 spread]",
        o.runs, o.samples
    );
    println!(
        "{:>8}  {:>26}  {:>26}  {:>14}  {:>26}  {:>26}  {:>9}",
        "services",
        "direct",
        "socket-lb",
        "lb - direct",
        "iptables-nft",
        "iptables-legacy",
        "nft/lb"
    );
    let mut json_rows = Vec::new();
    for (size, row) in rows {
        let cell = |mode: &str| {
            row.modes
                .get(mode)
                .map(|r| stat(r))
                .map_or("-".to_owned(), |(p50, p99, lo, hi)| {
                    format!("{p50:.1} / {p99:.1} [{lo:.1}–{hi:.1}]")
                })
        };
        let p50 = |mode: &str| row.modes.get(mode).map(|r| stat(r).0);
        let added = match (p50("socket-lb"), p50("direct")) {
            (Some(lb), Some(d)) => format!("{:.1}", lb - d),
            _ => "-".to_owned(),
        };
        let ratio = match (p50("iptables-nft"), p50("socket-lb")) {
            (Some(n), Some(lb)) => format!("{:.1}x", n / lb),
            _ => "-".to_owned(),
        };
        println!(
            "{size:>8}  {:>26}  {:>26}  {added:>14}  {:>26}  {:>26}  {ratio:>9}",
            cell("direct"),
            cell("socket-lb"),
            cell("iptables-nft"),
            cell("iptables-legacy")
        );
        let modes: BTreeMap<&str, serde_json::Value> = row
            .modes
            .iter()
            .map(|(m, r)| {
                let (p50, p99, lo, hi) = stat(r);
                (*m, serde_json::json!({"p50_us": p50, "p99_us": p99, "p50_min_us": lo, "p50_max_us": hi, "runs": r}))
            })
            .collect();
        json_rows.push(serde_json::json!({"services": size, "modes": modes}));
    }
    let secs = |v: &[f64]| {
        if v.is_empty() {
            return "-".to_owned();
        }
        let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = v.iter().copied().fold(0.0, f64::max);
        let ms = |s: f64| s * 1000.0;
        format!(
            "{:.3} ms [{:.3}–{:.3}]",
            ms(median(v.to_vec())),
            ms(lo),
            ms(hi)
        )
    };
    let max = o.sizes.iter().max().copied().unwrap_or(0);
    println!(
        "\nprogramming {max} services × {} backends from empty: {}",
        o.backends,
        secs(program_full)
    );
    println!(
        "one backend of one service changed at that size (diff + apply): {}",
        secs(program_one)
    );
    for ((tool, size), v) in restore_times {
        println!(
            "{tool} of {size} services × {} endpoints: {}",
            o.backends,
            secs(v)
        );
    }
    if let Some(path) = &o.json {
        let json = serde_json::json!({
            "runs": o.runs, "samples": o.samples, "backends": o.backends,
            "connect": json_rows,
            "program_full_s": program_full, "program_one_s": program_one,
            "iptables_restore_s": restore_times.iter().map(|((t, s), v)| serde_json::json!({"tool": t, "services": s, "seconds": v})).collect::<Vec<_>>(),
        });
        std::fs::write(path, serde_json::to_string_pretty(&json).unwrap()).unwrap();
    }
}
