//! Kernel sandboxes for root tests: network namespaces, a cgroup v2 directory and a bpffs
//! directory, each uniquely named and removed on drop, so a failing test leaves nothing
//! behind (`ip netns list`, `ls /sys/fs/bpf`, `ip link` stay clean).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};

/// Whether the test runs as root (CI does); root tests skip with a message otherwise.
pub fn is_root() -> bool {
    nix::unistd::Uid::effective().is_root()
}

/// A name unique to this process and call: `<prefix><pid>x<n>` (≤ 15 bytes for short
/// prefixes, so it can name an interface too).
pub fn unique_name(prefix: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}{}x{}",
        std::process::id() % 100_000,
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Runs a command and returns its output; a failure to start is an error naming it.
pub fn run(command: &mut Command) -> Result<Output, String> {
    command.output().map_err(|e| format!("{command:?}: {e}"))
}

/// Runs a command that must succeed.
pub fn run_ok(command: &mut Command) -> Result<String, String> {
    let out = run(command)?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{command:?}: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// A network namespace (`/run/netns/<name>`) with `lo` up, deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates one named `<prefix><unique>`.
    pub fn new(prefix: &str) -> Result<Netns, String> {
        let name = unique_name(prefix);
        run_ok(Command::new("ip").args(["netns", "add", &name]))?;
        let ns = Netns { name };
        run_ok(Command::new("ip").args(["-n", &ns.name, "link", "set", "lo", "up"]))?;
        Ok(ns)
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its path, for `nsenter --net=` and `CNI_NETNS`.
    pub fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    /// A command that runs `program` inside the namespace. `nsenter` rather than
    /// `ip netns exec`, which remounts /sys and hides bpffs and cgroupfs.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut command = Command::new("nsenter");
        command
            .arg(format!("--net={}", self.path().display()))
            .arg("--")
            .arg(program);
        command
    }

    /// Like [`Netns::command`], but the process joins `cgroup` before it enters the
    /// namespace, so the socket programs attached there see it from its first syscall.
    pub fn command_in(&self, cgroup: &Cgroup, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut command = Command::new("sh");
        command
            .arg("-c")
            .arg(r#"echo $$ > "$1" && shift && exec "$@""#)
            .arg("sh")
            .arg(cgroup.path().join("cgroup.procs"))
            .arg("nsenter")
            .arg(format!("--net={}", self.path().display()))
            .arg("--")
            .arg(program);
        command
    }

    /// Moves the calling thread into the namespace. Threads it starts afterwards (a tokio
    /// runtime's workers) and processes it spawns live there too; for a test's own thread,
    /// which ends with the test.
    pub fn enter_current_thread(&self) -> Result<(), String> {
        let file = std::fs::File::open(self.path())
            .map_err(|e| format!("{}: {e}", self.path().display()))?;
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(|e| format!("setns {}: {e}", self.name))
    }

    /// Runs `f` on a thread that has entered the namespace (netlink sockets and interface
    /// lookups made there see the namespace's interfaces).
    pub fn within<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, String> {
        let file = std::fs::File::open(self.path())
            .map_err(|e| format!("{}: {e}", self.path().display()))?;
        std::thread::spawn(move || {
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(|e| format!("setns: {e}"))?;
            Ok(f())
        })
        .join()
        .map_err(|_| "the thread in the namespace panicked".to_owned())?
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Processes still inside keep the namespace alive; kill them first.
        if let Ok(out) = run(Command::new("ip").args(["netns", "pids", &self.name])) {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                let _ = run(Command::new("kill").args(["-9", pid]));
            }
        }
        let _ = run(Command::new("ip").args(["netns", "del", &self.name]));
    }
}

/// A cgroup v2 directory, its processes killed and the directory removed on drop.
#[derive(Debug)]
pub struct Cgroup {
    path: PathBuf,
}

/// Where cgroup v2 is mounted on our machines (a hybrid layout) or, on a unified host, the
/// root.
pub fn cgroup2_root() -> PathBuf {
    let unified = Path::new("/sys/fs/cgroup/unified");
    if unified.join("cgroup.procs").exists() {
        unified.to_owned()
    } else {
        PathBuf::from("/sys/fs/cgroup")
    }
}

impl Cgroup {
    /// Creates `<cgroup2 root>/<prefix><unique>`.
    pub fn new(prefix: &str) -> Result<Cgroup, String> {
        let path = cgroup2_root().join(unique_name(prefix));
        std::fs::create_dir(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(Cgroup { path })
    }

    /// Its directory.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        for _ in 0..50 {
            let procs = std::fs::read_to_string(self.path.join("cgroup.procs")).unwrap_or_default();
            if procs.trim().is_empty() {
                break;
            }
            for pid in procs.split_whitespace() {
                let _ = run(Command::new("kill").args(["-9", pid]));
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let _ = std::fs::remove_dir(&self.path);
    }
}

/// A directory on bpffs for one test's pinned maps and links, removed (and so every link
/// pinned in it detached) on drop.
#[derive(Debug)]
pub struct BpfRoot {
    bpffs: PathBuf,
    name: String,
}

impl BpfRoot {
    /// Names `/sys/fs/bpf/<prefix><unique>` (created by the loader).
    pub fn new(prefix: &str) -> BpfRoot {
        BpfRoot {
            bpffs: PathBuf::from("/sys/fs/bpf"),
            name: unique_name(prefix),
        }
    }

    /// The bpffs mount.
    pub fn bpffs(&self) -> &Path {
        &self.bpffs
    }

    /// The directory's name under the mount.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The directory.
    pub fn path(&self) -> PathBuf {
        self.bpffs.join(&self.name)
    }
}

impl Drop for BpfRoot {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(self.path());
    }
}
