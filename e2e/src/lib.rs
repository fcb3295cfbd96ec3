//! The end-to-end harness: a `clustermesh dev` environment driven through the real
//! `clustermesh` binary, in a mesh home of its own, torn down on drop (also when a scenario
//! fails), and probes run from its pods with `clustermesh dev exec ... mesh-echo probe`.
//! [`DevEnv::restart`] restarts one daemon. [`DevEnv::recovery`] times a fault (`dev kill`,
//! `dev cut`) to the first answer from the cluster that should take over, counting the
//! failed requests in between.
//! The scenarios are in `tests/`; they need root and skip with a message without it.

pub mod app;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use mesh_devenv::{Env, MeshHome, Naming};
use serde_json::Value;

/// A harness step that failed.
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    /// A workspace binary could not be built.
    #[error("building {0}: {1}")]
    Build(&'static str, testkit::Error),
    /// The temporary mesh home could not be made.
    #[error("temporary mesh home: {0}")]
    Home(std::io::Error),
    /// A `clustermesh` command could not run or failed.
    #[error("clustermesh {args}: {detail}")]
    Cli {
        /// Its arguments.
        args: String,
        /// Its status and output.
        detail: String,
    },
    /// The environment's state could not be read.
    #[error(transparent)]
    Env(#[from] mesh_devenv::DevError),
    /// A daemon could not be restarted.
    #[error(transparent)]
    Fault(#[from] mesh_devenv::FaultError),
    /// A probe printed no JSON summary.
    #[error("probe from {pod}: {detail}")]
    Probe {
        /// The pod.
        pod: String,
        /// What it printed.
        detail: String,
    },
}

/// The workspace's `clustermesh` binary, with every daemon built beside it.
fn clustermesh_bin() -> Result<PathBuf, HarnessError> {
    for (package, bin) in [
        ("clustermesh-apiserver", "clustermesh-apiserver"),
        ("kvstoremesh", "kvstoremesh"),
        ("agent", "clustermesh-agent"),
        ("clustermesh-cni", "clustermesh-cni"),
        ("mesh-echo", "mesh-echo"),
    ] {
        testkit::workspace_bin(package, bin).map_err(|e| HarnessError::Build(bin, e))?;
    }
    testkit::workspace_bin("cli", "clustermesh").map_err(|e| HarnessError::Build("clustermesh", e))
}

/// The repository's `kind-configs/<file>`.
pub fn topology(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../kind-configs")
        .join(file)
}

/// Log lines per daemon in [`DevEnv::diagnostics`].
const DIAGNOSTIC_LINES: usize = 40;

/// A dev environment for one scenario; `down` runs on drop if the scenario did not.
#[derive(Debug)]
pub struct DevEnv {
    cli: PathBuf,
    home: tempfile::TempDir,
    name: String,
    up: bool,
}

impl DevEnv {
    /// `clustermesh dev up -f TOPOLOGY --name <unique> EXTRA...` in a new mesh home.
    pub fn up(topology: &Path, extra: &[&str]) -> Result<DevEnv, HarnessError> {
        let cli = clustermesh_bin()?;
        let home = tempfile::tempdir().map_err(HarnessError::Home)?;
        let env = DevEnv {
            cli,
            home,
            name: testkit::sandbox::unique_name("e2e"),
            up: true,
        };
        let name = env.name.clone();
        let mut args = vec!["dev", "up", "-f", topology.to_str().unwrap_or_default()];
        args.extend(["--name", &name]);
        args.extend(extra);
        env.cli_ok(&args)?;
        Ok(env)
    }

    /// `clustermesh dev up` of `kind-configs/<file>` with its underlay replaced by `underlay`
    /// (so scenarios, and other environments on the machine, never claim the same one).
    pub fn up_on_underlay(
        file: &str,
        underlay: &str,
        extra: &[&str],
    ) -> Result<DevEnv, HarnessError> {
        let text = std::fs::read_to_string(topology(file)).map_err(HarnessError::Home)?;
        let text: String = text
            .lines()
            .map(|line| {
                if line.starts_with("underlay:") {
                    format!("underlay: {underlay}\n")
                } else {
                    format!("{line}\n")
                }
            })
            .collect();
        let dir = tempfile::tempdir().map_err(HarnessError::Home)?;
        let path = dir.path().join(file);
        std::fs::write(&path, text).map_err(HarnessError::Home)?;
        DevEnv::up(&path, extra)
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its mesh home.
    pub fn home(&self) -> MeshHome {
        MeshHome::at(self.home.path())
    }

    /// `clustermesh ARGS` in this environment's mesh home.
    pub fn cli(&self, args: &[&str]) -> Result<Output, HarnessError> {
        Command::new(&self.cli)
            .args(args)
            .env("CLUSTERMESH_HOME", self.home.path())
            .output()
            .map_err(|e| HarnessError::Cli {
                args: args.join(" "),
                detail: e.to_string(),
            })
    }

    /// `clustermesh ARGS`, which must succeed; its stdout.
    pub fn cli_ok(&self, args: &[&str]) -> Result<String, HarnessError> {
        let out = self.cli(args)?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(HarnessError::Cli {
                args: args.join(" "),
                detail: format!(
                    "{}: {}{}",
                    out.status,
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                ),
            })
        }
    }

    /// `clustermesh dev apply -c CLUSTER -f <yaml in a file>`.
    pub fn apply(&self, cluster: &str, yaml: &str) -> Result<String, HarnessError> {
        let file = self.home.path().join(format!("apply-{cluster}.yaml"));
        std::fs::write(&file, yaml).map_err(HarnessError::Home)?;
        self.cli_ok(&[
            "dev",
            "apply",
            "-c",
            cluster,
            "-f",
            file.to_str().unwrap_or_default(),
            "--name",
            &self.name,
        ])
    }

    /// The environment's state, as `up` and `apply` left it.
    pub fn state(&self) -> Result<Env, HarnessError> {
        Ok(Env::open(&self.home(), &self.name)?)
    }

    /// `mesh-echo probe ARGS` run in pod `pod` of `cluster` through `clustermesh dev exec`:
    /// its JSON summary.
    pub fn probe(&self, cluster: &str, pod: &str, args: &[&str]) -> Result<Value, HarnessError> {
        let echo = self.cli.with_file_name("mesh-echo");
        let mut argv = vec![
            "dev", "exec", "-c", cluster, pod, "--name", &self.name, "--",
        ];
        let echo = echo.to_str().unwrap_or_default().to_owned();
        argv.push(&echo);
        argv.push("probe");
        argv.extend(args);
        let out = self.cli(&argv)?;
        serde_json::from_slice(&out.stdout).map_err(|e| HarnessError::Probe {
            pod: format!("{cluster}/{pod}"),
            detail: format!(
                "{e}: {} {}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        })
    }

    /// `mesh-echo ARGS` to run directly in pod `pod` of `cluster` (in its network namespace
    /// and its node's cgroup, no `clustermesh` process in between).
    pub fn echo_command(
        &self,
        cluster: &str,
        pod: &str,
        args: &[&str],
    ) -> Result<Command, HarnessError> {
        let echo = self.cli.with_file_name("mesh-echo");
        let argv: Vec<String> = std::iter::once(echo.to_str().unwrap_or_default())
            .chain(args.iter().copied())
            .map(str::to_owned)
            .collect();
        Ok(self.state()?.exec_command(cluster, pod, &argv)?)
    }

    /// One TCP request from pod `pod` of `cluster` to `addr`, run directly in the pod (no
    /// `clustermesh` process in between, so requests follow each other closely): the
    /// cluster that answered, or `None` when the request failed.
    pub fn ask(
        &self,
        cluster: &str,
        pod: &str,
        addr: &str,
        timeout: &str,
    ) -> Result<Option<String>, HarnessError> {
        let out = self
            .echo_command(
                cluster,
                pod,
                &["probe", "--tcp", addr, "--timeout", timeout],
            )?
            .stderr(std::process::Stdio::null())
            .output()
            .map_err(|e| HarnessError::Probe {
                pod: format!("{cluster}/{pod}"),
                detail: e.to_string(),
            })?;
        let summary: Value =
            serde_json::from_slice(&out.stdout).map_err(|e| HarnessError::Probe {
                pod: format!("{cluster}/{pod}"),
                detail: format!("{e}: {}", String::from_utf8_lossy(&out.stdout)),
            })?;
        Ok(answers_per_cluster(&summary).into_keys().next())
    }

    /// Makes a fault (`fault`, timed from just before it is called) and sends requests from
    /// pod `pod` of `cluster` to `addr`, one after the other, until one is answered by
    /// `by` and the next [`STABLE`] are too. Fails when that takes longer than `deadline`,
    /// or when an answer from another cluster (or a failure) comes after the first one.
    pub fn recovery(
        &self,
        (cluster, pod, addr): (&str, &str, &str),
        by: &str,
        deadline: Duration,
        fault: impl FnOnce(&DevEnv) -> Result<(), HarnessError>,
    ) -> Result<Recovery, HarnessError> {
        let started = Instant::now();
        fault(self)?;
        let fault_took = started.elapsed();
        let mut recovery = Recovery {
            fault_took,
            first_success: Duration::ZERO,
            failures: 0,
            requests: 0,
        };
        let failed = |detail: String| HarnessError::Probe {
            pod: format!("{cluster}/{pod}"),
            detail,
        };
        loop {
            recovery.requests += 1;
            match self.ask(cluster, pod, addr, "300ms")? {
                Some(answer) if answer == by => {
                    recovery.first_success = started.elapsed();
                    break;
                }
                other => {
                    recovery.failures += 1;
                    if started.elapsed() > deadline {
                        return Err(failed(format!(
                            "{addr}: no answer from {by} within {deadline:?} of the fault                              ({recovery:?}, last answer {other:?})"
                        )));
                    }
                }
            }
        }
        for i in 0..STABLE {
            let answer = self.ask(cluster, pod, addr, "300ms")?;
            if answer.as_deref() != Some(by) {
                return Err(failed(format!(
                    "{addr}: answered by {by} at {:?} after the fault, then request {} of \
                     the next {STABLE} got {answer:?}",
                    recovery.first_success,
                    i + 1
                )));
            }
        }
        Ok(recovery)
    }

    /// Restarts daemon `what` (`a/apiserver` with its store, `a/kvstoremesh`,
    /// `a-node-1/agent`) as a rolling restart would, and waits until every daemon is ready
    /// again: the new process, as `what (pid)`.
    pub fn restart(&self, what: &str) -> Result<String, HarnessError> {
        Ok(self
            .state()?
            .restart_daemon(what, Duration::from_secs(90))?)
    }

    /// `clustermesh dev down`; the drop guard does nothing afterwards.
    pub fn down(&mut self) -> Result<(), HarnessError> {
        self.up = false;
        self.cli_ok(&["dev", "down", "--name", &self.name])
            .map(drop)
    }

    /// What to read when a scenario fails: `clustermesh status` and the last lines of every
    /// daemon's log, so a CI failure says which daemon fell behind and why.
    pub fn diagnostics(&self) -> String {
        let mut out = match self.cli(&["status", "--context", &self.name]) {
            Ok(o) => format!(
                "clustermesh status:\n{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
            Err(e) => format!("clustermesh status: {e}\n"),
        };
        let logs = self.home().env_dir(&self.name).join("logs");
        let mut files: Vec<PathBuf> = std::fs::read_dir(&logs)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .collect();
        files.sort();
        for file in files {
            out.push_str(&format!(
                "--- {} (last {DIAGNOSTIC_LINES} lines)\n{}\n",
                file.display(),
                mesh_devenv::sys::log_tail(&file, DIAGNOSTIC_LINES)
            ));
        }
        out
    }

    /// Kernel objects named after this environment that still exist: network namespaces,
    /// host interfaces, cgroups, bpffs directories, nftables tables.
    pub fn leftovers(&self) -> Vec<String> {
        let naming = Naming::new(&self.name);
        let prefix = naming.prefix();
        let mut found = Vec::new();
        let mut scan = |dir: &Path, prefix: &str| {
            for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.starts_with(prefix) {
                    found.push(dir.join(name).display().to_string());
                }
            }
        };
        scan(Path::new(mesh_devenv::sys::NETNS_DIR), &prefix);
        scan(Path::new("/sys/class/net"), &naming.link_prefix());
        scan(&mesh_devenv::sys::cgroup2_root(), &prefix);
        scan(Path::new("/sys/fs/bpf"), &prefix);
        // nftables tables (a cut left in place), named after the link prefix.
        if let Ok(out) = Command::new("nft").args(["list", "tables"]).output() {
            let text = String::from_utf8_lossy(&out.stdout);
            found.extend(
                text.lines()
                    .filter(|line| line.contains(&naming.link_prefix()))
                    .map(str::to_owned),
            );
        }
        found
    }
}

impl Drop for DevEnv {
    fn drop(&mut self) {
        if self.up
            && let Err(e) = self.down()
        {
            eprintln!("dev down {}: {e}", self.name);
        }
    }
}

/// How many requests in a row must be answered by the expected cluster after the first for
/// [`DevEnv::recovery`] to count it as recovered.
pub const STABLE: u32 = 20;

/// What a client saw from a fault to its recovery.
#[derive(Clone, Copy, Debug)]
pub struct Recovery {
    /// How long making the fault took (part of `first_success`).
    pub fault_took: Duration,
    /// From just before the fault to the first answer from the expected cluster.
    pub first_success: Duration,
    /// Requests before it that failed or were answered by another cluster.
    pub failures: u32,
    /// Requests sent up to and including it.
    pub requests: u32,
}

/// How many answers of a probe summary came from each cluster (the first part of the
/// `cluster/node/pod` names the servers answer with).
pub fn answers_per_cluster(summary: &Value) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for (name, n) in summary["answers"].as_object().into_iter().flatten() {
        let cluster = name.split('/').next().unwrap_or_default().to_owned();
        *out.entry(cluster).or_default() += n.as_u64().unwrap_or(0);
    }
    out
}

/// Polls `f` every 200 ms until it gives `Ok`; after `timeout`, the last `Err`.
pub fn wait_for<T>(
    timeout: Duration,
    mut f: impl FnMut() -> Result<T, String>,
) -> Result<T, String> {
    let deadline = Instant::now() + timeout;
    loop {
        match f() {
            Ok(v) => return Ok(v),
            Err(last) if Instant::now() >= deadline => {
                return Err(format!("after {timeout:?}: {last}"));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}
