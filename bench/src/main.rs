//! Side-by-side benchmark of real etcd and our embedded `kvstore`.
//!
//! Starts each store on loopback with a fresh data dir, runs the same workloads against both in
//! one run and prints one table (rows: workload; columns: etcd, ours, ours/etcd).
//!
//! ```text
//! cargo build --release -p kvstore
//! cargo run --release -p bench -- [--json FILE] [--quick] [--kvstore-bin PATH] [--only etcd|ours]
//!     [--members 1..3]
//! ```
//!
//! With `--members 3` each store runs as three members on loopback (ours over raft) and the
//! clients are spread over the members.

mod stats;
mod workloads;

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::{Parser, ValueEnum};
use testkit::cluster::StoreCluster;
use testkit::{Backend, StoreOptions, StoreProcess};

use crate::workloads::{Metric, Params, Target};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Which {
    Etcd,
    Ours,
}

#[derive(Debug, Parser)]
#[command(about = "Benchmark our kvstore side by side with real etcd")]
struct Args {
    /// Also write the results as JSON to this file.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// A small run for smoke testing (well under 20 s).
    #[arg(long)]
    quick: bool,
    /// Our server binary. A relative path that does not exist from the current directory is
    /// also tried from the workspace root.
    #[arg(long, value_name = "PATH", default_value = "target/release/kvstore")]
    kvstore_bin: PathBuf,
    /// Run only one of the two stores.
    #[arg(long, value_enum)]
    only: Option<Which>,
    /// Members per store (up to 3; more than one is a raft cluster on loopback).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=3))]
    members: u8,
}

/// The results of one store.
#[derive(Debug, serde::Serialize)]
struct StoreResult {
    store: &'static str,
    metrics: Vec<Metric>,
}

/// One line of the table, also the JSON row.
#[derive(Debug, serde::Serialize)]
struct Row {
    id: String,
    workload: String,
    unit: &'static str,
    higher_is_better: bool,
    etcd: Option<f64>,
    ours: Option<f64>,
    /// ours / etcd.
    ratio: Option<f64>,
}

#[derive(Debug, serde::Serialize)]
struct Report {
    mode: &'static str,
    members: usize,
    params: String,
    rows: Vec<Row>,
}

fn resolve_bin(path: &Path) -> PathBuf {
    if path.is_relative() && !path.exists() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let candidate = root.join(path);
        if candidate.exists() {
            return candidate;
        }
    }
    path.to_path_buf()
}

async fn bench_store(
    name: &'static str,
    backend: Backend,
    members: usize,
    params: &Params,
) -> Result<StoreResult> {
    let t = Instant::now();
    eprintln!("[bench] starting {name} ({members} member(s))");
    // Whichever runs, it stays up until the workloads are done.
    let (target, _single, _cluster) = if members == 1 {
        let store = StoreProcess::start(backend, StoreOptions::default())
            .await
            .with_context(|| format!("starting {name}"))?;
        let target = Target {
            endpoints: vec![store.endpoint()],
            pids: vec![store.pid()],
        };
        (target, Some(store), None)
    } else {
        let cluster = StoreCluster::start(backend, members)
            .await
            .with_context(|| format!("starting {members} {name} members"))?;
        cluster
            .leader()
            .await
            .with_context(|| format!("{name}: no leader"))?;
        let target = Target {
            endpoints: cluster.endpoints(),
            pids: (0..members).map(|i| cluster.member(i).pid()).collect(),
        };
        (target, None, Some(cluster))
    };
    eprintln!(
        "[bench] {name} ready at {} (pids {:?})",
        target.endpoints.join(","),
        target.pids
    );
    let metrics = workloads::run_all(&target, params)
        .await
        .with_context(|| format!("benchmarking {name}"))?;
    eprintln!("[bench] {name} done in {:.1} s", t.elapsed().as_secs_f64());
    Ok(StoreResult {
        store: name,
        metrics,
    })
}

fn rows(results: &[StoreResult]) -> Vec<Row> {
    let find = |store: &str| results.iter().find(|r| r.store == store);
    let (etcd, ours) = (find("etcd"), find("ours"));
    let template = etcd.or(ours).map(|r| r.metrics.as_slice()).unwrap_or(&[]);
    template
        .iter()
        .map(|m| {
            let value_of = |r: Option<&StoreResult>| {
                r.and_then(|r| r.metrics.iter().find(|x| x.id == m.id))
                    .map(|x| x.value)
            };
            let (e, o) = (value_of(etcd), value_of(ours));
            let ratio = match (e, o) {
                (Some(e), Some(o)) if e > 0.0 => Some(o / e),
                _ => None,
            };
            Row {
                id: m.id.clone(),
                workload: m.label.clone(),
                unit: m.unit,
                higher_is_better: m.higher_is_better,
                etcd: e,
                ours: o,
                ratio,
            }
        })
        .collect()
}

fn cell(v: Option<f64>, unit: &str) -> String {
    match v {
        None => "-".to_owned(),
        Some(v) if unit == "ops/s" => format!("{v:.0}"),
        Some(v) if unit == "ms" || unit == "s" => format!("{v:.3}"),
        Some(v) => format!("{v:.1}"),
    }
}

fn print_table(rows: &[Row]) {
    let label = |r: &Row| format!("{} [{}]", r.workload, r.unit);
    let w = rows
        .iter()
        .map(|r| label(r).len())
        .max()
        .unwrap_or(8)
        .max(8);
    println!(
        "{:<w$}  {:>12}  {:>12}  {:>10}",
        "workload", "etcd", "ours", "ours/etcd"
    );
    println!("{}", "-".repeat(w + 40));
    for r in rows {
        let ratio = r.ratio.map_or("-".to_owned(), |x| format!("{x:.2}"));
        println!(
            "{:<w$}  {:>12}  {:>12}  {:>10}",
            label(r),
            cell(r.etcd, r.unit),
            cell(r.ours, r.unit),
            ratio
        );
    }
    println!("(put/s: higher is better; latency, CPU and RSS: lower is better)");
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let params = if args.quick {
        Params::quick()
    } else {
        Params::full()
    };
    let bin = resolve_bin(&args.kvstore_bin);
    let run_etcd = args.only != Some(Which::Ours);
    let run_ours = args.only != Some(Which::Etcd);
    if run_ours && !bin.exists() {
        bail!(
            "kvstore binary {} not found: build it with `cargo build --release -p kvstore`, \
             pass --kvstore-bin, or use --only etcd",
            bin.display()
        );
    }

    let started = Instant::now();
    let mut results = Vec::new();
    if run_etcd {
        results.push(bench_store("etcd", Backend::Etcd, usize::from(args.members), &params).await?);
    }
    if run_ours {
        let backend = Backend::Embedded { bin: bin.clone() };
        results.push(bench_store("ours", backend, usize::from(args.members), &params).await?);
    }

    let rows = rows(&results);
    print_table(&rows);
    eprintln!("[bench] total {:.1} s", started.elapsed().as_secs_f64());

    if let Some(path) = &args.json {
        let report = Report {
            mode: if args.quick { "quick" } else { "full" },
            members: usize::from(args.members),
            params: format!("{params:?}"),
            rows,
        };
        let text = serde_json::to_string_pretty(&report)?;
        std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))?;
        eprintln!("[bench] wrote {}", path.display());
    }
    Ok(())
}
