//! `clustermesh dev`: local multi-cluster environments without Kubernetes (the work is in
//! the `mesh-devenv` crate).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Subcommand;
use cli::connect;
use cli::enable::DevCertify;
use cli::mesh::Mesh;
use mesh_devenv::{Binaries, Env, MeshHome, UpOptions};

#[derive(Debug, Subcommand)]
pub enum DevCommand {
    /// Bring up every cluster of a topology on this machine (root): per cluster an apiserver
    /// with its store and a kvstoremesh, per node a network namespace with its agent and eBPF
    /// datapath; every store serves mutual TLS with certificates from `clustermesh enable`.
    /// Returns once every daemon is ready; sets the current context.
    Up {
        /// The topology file (kind-configs/two-clusters.yaml, ...).
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        /// The environment's (and mesh context's) name; the file's stem by default.
        #[arg(long)]
        name: Option<String>,
        /// Then run `clustermesh connect` for a full mesh (every cluster reads every other).
        #[arg(long)]
        connect: bool,
        /// How long the daemons may take to become ready.
        #[arg(long, default_value = "90s", value_parser = humantime::parse_duration)]
        timeout: Duration,
        /// The agents' withdrawal grace (`clustermesh-agent --grace`): how long a lost peer
        /// keeps its backends' rank. The agent's default (5s) when not given.
        #[arg(long, value_parser = humantime::parse_duration)]
        agent_grace: Option<Duration>,
        /// What the nodes run: `bpf` (root: network namespaces, eBPF agents, pods running
        /// echo servers) or `none` (no root needed: the control plane alone on loopback, the
        /// agents with `--datapath none`, pods as manifest entries without a process).
        #[arg(long, default_value = "bpf")]
        datapath: mesh_devenv::DevDatapath,
    },
    /// Kill every process of a cluster at once (SIGKILL, as a crash): its apiserver and
    /// store, kvstoremesh, agents and pods' servers. `revive` starts them again.
    Kill {
        /// The cluster.
        #[arg(short = 'c', long)]
        cluster: String,
        /// The environment; the current context by default.
        #[arg(long)]
        name: Option<String>,
    },
    /// Start again what `kill` killed in a cluster (same flags, ports, data and logs) and
    /// wait until every daemon is ready.
    Revive {
        /// The cluster.
        #[arg(short = 'c', long)]
        cluster: String,
        /// The environment; the current context by default.
        #[arg(long)]
        name: Option<String>,
        /// How long the daemons may take to become ready.
        #[arg(long, default_value = "90s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// Cut a cluster off the underlay, as a partition: its nodes' links go down and its
    /// store's packets are dropped; its processes keep running. `restore` undoes it.
    Cut {
        /// The cluster.
        #[arg(short = 'c', long)]
        cluster: String,
        /// The environment; the current context by default.
        #[arg(long)]
        name: Option<String>,
    },
    /// Put a cluster that `cut` cut off back on the underlay.
    Restore {
        /// The cluster.
        #[arg(short = 'c', long)]
        cluster: String,
        /// The environment; the current context by default.
        #[arg(long)]
        name: Option<String>,
    },
    /// Run workloads in a cluster: Pods, Deployments (replicas spread over the nodes),
    /// Services, Namespaces, NetworkPolicy and CiliumNetworkPolicy objects.
    Apply {
        /// The cluster.
        #[arg(short = 'c', long)]
        cluster: String,
        /// The manifests (YAML, several documents).
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        /// The environment; the current context by default.
        #[arg(long)]
        name: Option<String>,
    },
    /// Run a command in a pod (its network namespace and its node's cgroup); its exit status
    /// is passed through.
    Exec {
        /// The cluster.
        #[arg(short = 'c', long)]
        cluster: String,
        /// The pod: `name`, or `namespace/name`.
        pod: String,
        /// The environment; the current context by default.
        #[arg(long)]
        name: Option<String>,
        /// The command and its arguments (after `--`).
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Remove everything an environment made (also after a crash or a failed `up`).
    Down {
        /// The environment; the current context by default.
        #[arg(long)]
        name: Option<String>,
    },
}

/// The daemons beside this executable, or in `$CLUSTERMESH_BIN_DIR`.
fn binaries() -> anyhow::Result<Binaries> {
    let dir = match std::env::var_os("CLUSTERMESH_BIN_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => std::env::current_exe()
            .context("locating the clustermesh executable")?
            .parent()
            .map(Path::to_owned)
            .context("the clustermesh executable has no directory")?,
    };
    Ok(Binaries::in_dir(&dir)?)
}

fn env_name(home: &MeshHome, name: Option<String>) -> anyhow::Result<String> {
    match name {
        Some(name) => Ok(name),
        None => Ok(home.current_context()?),
    }
}

pub fn run(command: DevCommand) -> anyhow::Result<ExitCode> {
    let home = MeshHome::from_env()?;
    match command {
        DevCommand::Up {
            file,
            name,
            connect,
            timeout,
            agent_grace,
            datapath,
        } => {
            let options = UpOptions {
                topology: file,
                name,
                ready_timeout: timeout,
                agent_grace,
                datapath,
            };
            let name = options.env_name();
            let env = Env::up(&home, &binaries()?, &options, &DevCertify).map_err(|err| {
                let made = matches!(err, mesh_devenv::DevError::NotReady { .. })
                    || (home.env_dir(&name).exists()
                        && !matches!(err, mesh_devenv::DevError::Exists { .. }));
                let err = anyhow::Error::from(err);
                if made {
                    err.context(format!(
                        "dev up {name} failed; what it made stays for inspection (logs in {}): \
                         `clustermesh dev down --name {name}` removes it",
                        home.env_dir(&name).join("logs").display()
                    ))
                } else {
                    err
                }
            })?;
            let state = env.state();
            println!(
                "environment {} is up (state and logs in {})",
                state.name,
                env.dir().display()
            );
            for c in &state.clusters {
                println!(
                    "cluster {} (id {}): store https://{}, {} node(s)",
                    c.name,
                    c.id,
                    c.store,
                    c.nodes.len()
                );
            }
            println!(
                "current context: {} ({})",
                state.name,
                home.context_dir(&state.name).display()
            );
            if connect {
                let mesh = Mesh::load_dir(&state.name, &home.context_dir(&state.name))?;
                let done = connect::connect(&mesh, &connect::full_mesh(&mesh)?)?;
                for link in &done.links {
                    println!("connected: {link}");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        DevCommand::Apply {
            cluster,
            file,
            name,
        } => {
            let name = env_name(&home, name)?;
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            let mut env = Env::open(&home, &name)?;
            for line in env.apply(&binaries()?, &cluster, &text)? {
                println!("{line}");
            }
            Ok(ExitCode::SUCCESS)
        }
        DevCommand::Exec {
            cluster,
            pod,
            name,
            command,
        } => {
            let name = env_name(&home, name)?;
            let env = Env::open(&home, &name)?;
            let status = env
                .exec_command(&cluster, &pod, &command)?
                .status()
                .with_context(|| format!("running {command:?} in pod {pod}"))?;
            Ok(match status.code() {
                Some(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
                None => ExitCode::from(1),
            })
        }
        DevCommand::Kill { cluster, name } => {
            let env = Env::open(&home, &env_name(&home, name)?)?;
            for line in env.kill_cluster(&cluster)? {
                println!("killed {line}");
            }
            Ok(ExitCode::SUCCESS)
        }
        DevCommand::Revive {
            cluster,
            name,
            timeout,
        } => {
            let mut env = Env::open(&home, &env_name(&home, name)?)?;
            for line in env.revive_cluster(&cluster, timeout)? {
                println!("started {line}");
            }
            Ok(ExitCode::SUCCESS)
        }
        DevCommand::Cut { cluster, name } => {
            let env = Env::open(&home, &env_name(&home, name)?)?;
            for line in env.cut_cluster(&cluster)? {
                println!("cut {line}");
            }
            Ok(ExitCode::SUCCESS)
        }
        DevCommand::Restore { cluster, name } => {
            let env = Env::open(&home, &env_name(&home, name)?)?;
            for line in env.restore_cluster(&cluster)? {
                println!("restored {line}");
            }
            Ok(ExitCode::SUCCESS)
        }
        DevCommand::Down { name } => {
            let name = env_name(&home, name)?;
            if mesh_devenv::down(&home, &name)? {
                println!("environment {name} removed");
            } else {
                println!("no environment {name}: nothing to remove");
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
