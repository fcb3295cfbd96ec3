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
//! Root only. Everything happens in a network namespace the bench creates (loopback only):
//! backends are addresses 10.244.0.1..=N on its `lo` with one listener, VIPs are 10.96.x.y.
//! Each run measures every mode at every size; the table shows the median over runs of each
//! run's p50/p99, with the spread (min–max) of the p50s.

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

fn backend(j: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, 0, (j + 1) as u8)
}

/// One connect, closed with RST (no TIME_WAIT piles up); its duration.
fn connect_once(to: SocketAddrV4) -> Duration {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    socket.set_linger(Some(Duration::ZERO)).unwrap();
    let started = Instant::now();
    socket
        .connect(&SocketAddr::V4(to).into())
        .unwrap_or_else(|e| panic!("connect {to}: {e}"));
    started.elapsed()
}

/// p50 and p99 of `samples` connects to random targets, in µs.
fn measure(targets: &[SocketAddrV4], samples: usize) -> (f64, f64) {
    for t in targets.iter().take(50) {
        connect_once(*t);
    }
    let mut times: Vec<Duration> = (0..samples)
        .map(|i| {
            // A cheap spread over every target.
            let t = targets[(i * 7919) % targets.len()];
            connect_once(t)
        })
        .collect();
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
            vip(i)
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
    run_ok(Command::new("ip").args(["-n", ns.name(), "route", "add", "10.96.0.0/16", "dev", "lo"]))
        .unwrap();
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

/// Runs `f` on a thread inside `ns`.
fn within<T: Send + 'static>(ns: &Netns, f: impl FnOnce() -> T + Send + 'static) -> T {
    ns.within(f).unwrap()
}

#[derive(Default)]
struct Row {
    /// mode → per-run (p50, p99)
    modes: BTreeMap<&'static str, Vec<(f64, f64)>>,
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
        // iptables, one namespace per backend and size (the process is in no mesh cgroup).
        if o.iptables {
            for tool in ["iptables-nft-restore", "iptables-legacy-restore"] {
                for &size in &o.sizes {
                    let ns = namespace(o.backends);
                    serve(&ns);
                    let rules = iptables_rules(size, o.backends);
                    let took = within(&ns, {
                        let tool = tool.to_owned();
                        move || restore(&tool, &rules)
                    });
                    restore_times
                        .entry((tool, size))
                        .or_default()
                        .push(took.as_secs_f64());
                    let targets: Vec<SocketAddrV4> =
                        (0..size).map(|i| SocketAddrV4::new(vip(i), PORT)).collect();
                    let samples = o.samples;
                    let result = within(&ns, move || measure(&targets, samples));
                    let mode = if tool.contains("nft") {
                        "iptables-nft"
                    } else {
                        "iptables-legacy"
                    };
                    rows.entry(size)
                        .or_default()
                        .modes
                        .entry(mode)
                        .or_default()
                        .push(result);
                    eprintln!(
                        "  {mode} {size}: p50 {:.1} µs p99 {:.1} µs",
                        result.0, result.1
                    );
                }
            }
        }

        // Our socket load balancer: this process joins the cgroup the programs attach to.
        let ns = namespace(o.backends);
        serve(&ns);
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
        for &size in &o.sizes {
            let mut desired = MapState::default();
            let backends: Vec<(Ipv4Addr, u16)> = (0..o.backends)
                .map(|j| (backend(j), BACKEND_PORT))
                .collect();
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
                // From empty: a fresh datapath programs every service.
                let mut fresh = Datapath::load(&DatapathConfig {
                    root: format!("{}f", root.name()),
                    ..config.clone()
                })
                .unwrap();
                let mut empty = MapState::default();
                let started = Instant::now();
                let errors = fresh.apply(&diff(&desired, &empty), &mut empty);
                program_full.push(started.elapsed().as_secs_f64());
                assert!(errors.is_empty(), "{errors:?}");
                drop(fresh);
                let _ = std::fs::remove_dir_all(root.bpffs().join(format!("{}f", root.name())));
                // One backend of one service changes: diff over the whole state + apply.
                let mut changed = desired.clone();
                let mut one = backends.clone();
                one[0] = (backend(o.backends - 1), BACKEND_PORT + 1);
                changed.set_frontend(
                    Frontend4 {
                        ip: vip(size / 2),
                        port: PORT,
                        proto: 6,
                    },
                    &one,
                );
                let started = Instant::now();
                let ops = diff(&changed, &actual);
                let errors = dp.apply(&ops, &mut actual);
                program_one.push(started.elapsed().as_secs_f64());
                assert!(errors.is_empty() && ops.len() == 1, "{ops:?} {errors:?}");
                // And back, for the measurement below.
                dp.apply(&diff(&desired, &actual), &mut actual);
            }
            let targets: Vec<SocketAddrV4> =
                (0..size).map(|i| SocketAddrV4::new(vip(i), PORT)).collect();
            let samples = o.samples;
            let lb = within(&ns, move || measure(&targets, samples));
            let direct_targets = backend_targets.clone();
            let direct = within(&ns, move || measure(&direct_targets, samples));
            let row = rows.entry(size).or_default();
            row.modes.entry("socket-lb").or_default().push(lb);
            row.modes.entry("direct").or_default().push(direct);
            eprintln!(
                "  socket-lb {size}: p50 {:.1} µs p99 {:.1} µs (direct p50 {:.1} µs)",
                lb.0, lb.1, direct.0
            );
        }
        std::fs::write(
            testkit::sandbox::cgroup2_root()
                .join(home.trim_start_matches('/'))
                .join("cgroup.procs"),
            std::process::id().to_string(),
        )
        .expect("leaving the bench cgroup");
        drop(dp);
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
        "\nconnect() latency, µs: median over {} runs of each run's p50 / p99 ({} connects each); [p50 spread]",
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
