//! `clustermesh enable | connect | disconnect | status | troubleshoot`: flags and printing
//! around the `cli` library.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, ValueEnum};
use cli::connect::{self, ConnectError, ConnectionMode};
use cli::enable::{self, EnableError, EnableOptions};
use cli::mesh::{Mesh, MeshError};
use cli::{status, troubleshoot};
use model::ClusterName;

const CONTEXT_HELP: &str = "The mesh context: a name under $CLUSTERMESH_HOME/contexts (default \
                            home ~/.clustermesh), or a directory when the value contains '/'. \
                            Default: the name in $CLUSTERMESH_HOME/current-context.";

#[derive(Debug, Args)]
pub struct ContextArg {
    #[arg(long, value_name = "NAME|DIR", help = CONTEXT_HELP)]
    context: Option<String>,
}

impl ContextArg {
    fn load(&self) -> Result<Mesh, MeshError> {
        Mesh::load(self.context.as_deref())
    }
}

fn parse_cluster(s: &str) -> Result<ClusterName, model::NameError> {
    ClusterName::new(s)
}

#[derive(Debug, Args)]
pub struct EnableArgs {
    #[command(flatten)]
    context: ContextArg,
    /// The cluster to enable; every cluster of the context when not given.
    #[arg(long, value_name = "NAME", value_parser = parse_cluster)]
    cluster: Option<ClusterName>,
    /// A CA directory (ca.crt, ca.key) shared by several clusters; made if absent
    /// [default: <certs-dir>/ca].
    #[arg(long, value_name = "DIR")]
    ca_dir: Option<PathBuf>,
    /// Reissue the server and user certificates even if valid ones exist (the CA is kept).
    #[arg(long)]
    force: bool,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum ModeArg {
    Bidirectional,
    Unicast,
    Mesh,
}

impl From<ModeArg> for ConnectionMode {
    fn from(m: ModeArg) -> Self {
        match m {
            ModeArg::Bidirectional => ConnectionMode::Bidirectional,
            ModeArg::Unicast => ConnectionMode::Unicast,
            ModeArg::Mesh => ConnectionMode::Mesh,
        }
    }
}

#[derive(Debug, Args)]
pub struct ConnectArgs {
    #[command(flatten)]
    context: ContextArg,
    /// The cluster that connects.
    #[arg(long, value_name = "NAME", value_parser = parse_cluster)]
    source: ClusterName,
    /// The cluster(s) to connect it with (repeatable).
    #[arg(long = "destination", value_name = "NAME", value_parser = parse_cluster, required = true)]
    destinations: Vec<ClusterName>,
    /// bidirectional: each reads the other; unicast: the source reads the destinations;
    /// mesh: every cluster named reads every other.
    #[arg(long, value_enum, default_value_t = ModeArg::Bidirectional)]
    connection_mode: ModeArg,
}

#[derive(Clone, Copy, Debug, Default, ValueEnum)]
enum OutputArg {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    context: ContextArg,
    /// Only this cluster.
    #[arg(long, value_name = "NAME", value_parser = parse_cluster)]
    cluster: Option<ClusterName>,
    /// Poll until everything is ready; exit 1 naming what is missing when --wait-duration
    /// passes.
    #[arg(long)]
    wait: bool,
    /// How long --wait waits.
    #[arg(long, value_name = "DURATION", default_value = "5m", value_parser = humantime::parse_duration)]
    wait_duration: Duration,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = OutputArg::Text)]
    output: OutputArg,
    /// How long each request to a daemon or store may take.
    #[arg(long, value_name = "DURATION", default_value = "3s", value_parser = humantime::parse_duration)]
    timeout: Duration,
}

#[derive(Debug, Args)]
pub struct TroubleshootArgs {
    #[command(flatten)]
    context: ContextArg,
    /// Only this cluster.
    #[arg(long, value_name = "NAME", value_parser = parse_cluster)]
    cluster: Option<ClusterName>,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = OutputArg::Text)]
    output: OutputArg,
    /// How long each request to a store may take.
    #[arg(long, value_name = "DURATION", default_value = "3s", value_parser = humantime::parse_duration)]
    timeout: Duration,
}

/// Whether `err` is a usage or configuration error (exit status 64).
pub fn is_usage(err: &anyhow::Error) -> bool {
    err.chain().any(|cause| {
        cause.is::<MeshError>()
            || cause
                .downcast_ref::<ConnectError>()
                .is_some_and(ConnectError::is_usage)
            || cause
                .downcast_ref::<EnableError>()
                .is_some_and(EnableError::is_usage)
            || cause.is::<model::NameError>()
    })
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

pub fn enable(args: EnableArgs) -> anyhow::Result<()> {
    let mesh = args.context.load()?;
    let options = EnableOptions {
        ca_dir: args.ca_dir,
        force: args.force,
    };
    for context in mesh.select(args.cluster.as_ref())? {
        let done = enable::enable(context, &options)?;
        let ca = if done.ca_created { "created" } else { "reused" };
        let certs = if done.issued {
            "issued"
        } else {
            "kept (valid)"
        };
        println!(
            "cluster {}: CA {ca} in {}; certificates {certs} in {}",
            context.name,
            done.ca_dir.display(),
            context.certs_dir.display()
        );
        println!(
            "  store trust bundle (--store-cacert): {}",
            done.trust_bundle.display()
        );
        println!(
            "  peers will reach the store at: {}",
            done.endpoints.join(", ")
        );
        println!("  peers will trust: {}", done.server_ca.display());
    }
    Ok(())
}

/// The mesh the arguments' context names and the links they ask for, checked before anything
/// is written.
fn mesh_and_links(args: &ConnectArgs) -> anyhow::Result<(Mesh, Vec<connect::Link>)> {
    let mesh = args.context.load()?;
    let links = connect::links(
        &args.source,
        &args.destinations,
        args.connection_mode.into(),
    )?;
    Ok((mesh, links))
}

pub fn connect(args: ConnectArgs) -> anyhow::Result<()> {
    let (mesh, links) = mesh_and_links(&args)?;
    let done = connect::connect(&mesh, &links)?;
    for link in &done.links {
        println!("connected: {link}");
    }
    println!(
        "{} file(s) written; kvstoremesh picks peer files up without a restart",
        done.files.len()
    );
    Ok(())
}

pub fn disconnect(args: ConnectArgs) -> anyhow::Result<()> {
    let (mesh, links) = mesh_and_links(&args)?;
    let done = connect::disconnect(&mesh, &links)?;
    for link in &links {
        println!("disconnected: {link}");
    }
    println!("{} file(s) removed", done.removed.len());
    for warning in &done.warnings {
        eprintln!("clustermesh: warning: {warning}");
    }
    Ok(())
}

pub fn status(args: StatusArgs) -> anyhow::Result<()> {
    let mesh = args.context.load()?;
    if let Some(cluster) = &args.cluster {
        mesh.cluster(cluster)?;
    }
    let report = runtime()?.block_on(async {
        if args.wait {
            let terminal = std::io::stderr().is_terminal();
            let report = status::wait_ready(
                &mesh,
                args.cluster.as_ref(),
                args.timeout,
                args.wait_duration,
                Duration::from_secs(1),
                |report, elapsed| {
                    if terminal {
                        let missing = report.missing();
                        let first = missing.first().map_or("", String::as_str);
                        eprint!(
                            "\r\x1b[2K⌛ {:>3}s waiting for {} item(s): {first}",
                            elapsed.as_secs(),
                            missing.len()
                        );
                        let _ = std::io::stderr().flush();
                    }
                },
            )
            .await;
            if terminal {
                eprint!("\r\x1b[2K");
            }
            report
        } else {
            status::mesh_status(&mesh, args.cluster.as_ref(), args.timeout).await
        }
    });
    match args.output {
        OutputArg::Text => print!("{}", status::render(&report)),
        OutputArg::Json => println!("{}", report.to_json()),
    }
    if args.wait && !report.ready {
        anyhow::bail!(
            "not ready after {}; still missing:\n  {}",
            humantime::format_duration(args.wait_duration),
            report.missing().join("\n  ")
        );
    }
    Ok(())
}

pub fn troubleshoot(args: TroubleshootArgs) -> anyhow::Result<()> {
    let mesh = args.context.load()?;
    let findings = runtime()?.block_on(troubleshoot::troubleshoot(
        &mesh,
        args.cluster.as_ref(),
        args.timeout,
    ))?;
    match args.output {
        OutputArg::Text => print!("{}", troubleshoot::render(&findings)),
        OutputArg::Json => println!(
            "{}",
            serde_json::to_string_pretty(&findings).context("encoding the findings")?
        ),
    }
    let failed = findings.iter().filter(|f| !f.ok).count();
    if failed > 0 {
        anyhow::bail!("{failed} problem(s) found");
    }
    Ok(())
}
