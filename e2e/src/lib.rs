//! The end-to-end harness: a `clustermesh dev` environment driven through the real
//! `clustermesh` binary, in a mesh home of its own, torn down on drop (also when a scenario
//! fails), and probes run from its pods with `clustermesh dev exec ... mesh-echo probe`.
//! The scenarios are in `tests/`; they need root and skip with a message without it.

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

    /// `clustermesh dev down`; the drop guard does nothing afterwards.
    pub fn down(&mut self) -> Result<(), HarnessError> {
        self.up = false;
        self.cli_ok(&["dev", "down", "--name", &self.name])
            .map(drop)
    }

    /// Kernel objects named after this environment that still exist: network namespaces,
    /// host interfaces, cgroups, bpffs directories.
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
