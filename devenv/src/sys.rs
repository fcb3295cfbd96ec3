//! The host operations an environment is made of: commands (`ip`, `nsenter`), cgroups,
//! detached processes identified by pid and start time, and a plain HTTP readiness check.

use std::ffi::OsStr;
use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// A host operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum SysError {
    /// A command could not be started.
    #[error("{command}: cannot start: {source}")]
    Spawn {
        /// The command line.
        command: String,
        /// Why.
        source: std::io::Error,
    },
    /// A command exited unsuccessfully.
    #[error("{command}: {status}: {stderr}")]
    Failed {
        /// The command line.
        command: String,
        /// Its exit status.
        status: std::process::ExitStatus,
        /// What it wrote on stderr.
        stderr: String,
    },
    /// A file or directory operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// Where network namespaces made by `ip netns add` live.
pub const NETNS_DIR: &str = "/run/netns";

fn describe(command: &Command) -> String {
    let mut out = command.get_program().to_string_lossy().into_owned();
    for arg in command.get_args() {
        out.push(' ');
        out.push_str(&arg.to_string_lossy());
    }
    out
}

/// Runs a command that must succeed; its stdout.
pub fn run(command: &mut Command) -> Result<String, SysError> {
    let out = command
        .stdin(Stdio::null())
        .output()
        .map_err(|source| SysError::Spawn {
            command: describe(command),
            source,
        })?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(SysError::Failed {
            command: describe(command),
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

/// `ip ARGS...`, which must succeed.
pub fn ip<I, S>(args: I) -> Result<String, SysError>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    run(Command::new("ip").args(args))
}

/// The path of network namespace `name`.
pub fn netns_path(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

/// Whether network namespace `name` exists.
pub fn netns_exists(name: &str) -> bool {
    netns_path(name).exists()
}

/// Whether a host interface named `name` exists.
pub fn link_exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

/// A command that runs `program` in namespace `netns` (or the host's when `None`), having
/// first joined `cgroup` (when given), so socket programs attached there see it from its
/// first syscall. `nsenter` rather than `ip netns exec`, which remounts /sys and hides bpffs
/// and cgroupfs.
pub fn command_in(
    netns: Option<&str>,
    cgroup: Option<&Path>,
    program: impl AsRef<OsStr>,
) -> Command {
    let mut command = match cgroup {
        Some(cgroup) => {
            let mut c = Command::new("sh");
            c.arg("-c")
                .arg(r#"echo $$ > "$1" && shift && exec "$@""#)
                .arg("sh")
                .arg(cgroup.join("cgroup.procs"));
            c
        }
        None => Command::new("env"),
    };
    if let Some(netns) = netns {
        command
            .arg("nsenter")
            .arg(format!("--net={}", netns_path(netns).display()))
            .arg("--");
    }
    command.arg(program);
    command
}

/// Where cgroup v2 is mounted: the `cgroup2` entry of `/proc/self/mounts` (a hybrid layout
/// mounts it at `/sys/fs/cgroup/unified`), else `/sys/fs/cgroup`.
pub fn cgroup2_root() -> PathBuf {
    std::fs::read_to_string("/proc/self/mounts")
        .ok()
        .and_then(|mounts| {
            mounts.lines().find_map(|line| {
                let mut fields = line.split_whitespace();
                let (_, mount, kind) = (fields.next()?, fields.next()?, fields.next()?);
                (kind == "cgroup2").then(|| PathBuf::from(mount))
            })
        })
        .unwrap_or_else(|| PathBuf::from("/sys/fs/cgroup"))
}

/// The processes in cgroup `path` (none when it is gone).
pub fn cgroup_pids(path: &Path) -> Vec<i32> {
    std::fs::read_to_string(path.join("cgroup.procs"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// A process's start time (clock ticks since boot, `/proc/<pid>/stat` field 22), or `None`
/// when no such process runs (a zombie has exited). With the pid it names one process across
/// pid reuse.
pub fn start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces; count after it.
    let mut rest = stat[stat.rfind(')')? + 1..].split_whitespace();
    if rest.next()? == "Z" {
        return None;
    }
    rest.nth(18)?.parse().ok()
}

/// Stops process `pid` if it is still the one that started at `started`: SIGTERM, then
/// SIGKILL after `grace`. Whether it was running.
pub fn stop_process(pid: i32, started: u64, grace: Duration) -> bool {
    if start_time(pid) != Some(started) {
        return false;
    }
    let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
    let deadline = Instant::now() + grace;
    while start_time(pid) == Some(started) {
        if Instant::now() >= deadline {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

/// SIGKILLs every process of cgroup `path` until it is empty (at most ~2 s).
pub fn kill_cgroup(path: &Path) {
    for _ in 0..100 {
        let pids = cgroup_pids(path);
        if pids.is_empty() {
            return;
        }
        for pid in pids {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A started detached process: its pid and start time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Started {
    /// Its pid.
    pub pid: i32,
    /// Its start time, see [`start_time`].
    pub start_time: u64,
}

/// Starts `command` detached: its own process group, stdin from /dev/null, stdout and stderr
/// appended to `log`. It outlives the caller (it is never waited for here).
pub fn spawn_detached(mut command: Command, log: &Path) -> Result<Started, SysError> {
    let io = |source| SysError::Io {
        path: log.to_owned(),
        source,
    };
    let out = File::options()
        .create(true)
        .append(true)
        .open(log)
        .map_err(io)?;
    let err = out.try_clone().map_err(io)?;
    command
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0);
    let child = command.spawn().map_err(|source| SysError::Spawn {
        command: describe(&command),
        source,
    })?;
    let pid = i32::try_from(child.id()).expect("pids fit in i32");
    // Read at once: the start time is fixed at fork and survives exec.
    let start_time = start_time(pid).unwrap_or(0);
    Ok(Started { pid, start_time })
}

/// `GET http://addr{path}` with HTTP/1.0: the status code and body, or why it failed.
pub fn http_get(addr: SocketAddr, path: &str, timeout: Duration) -> Result<(u16, String), String> {
    let mut stream = TcpStream::connect_timeout(&addr, timeout).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").map_err(|e| e.to_string())?;
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .map_err(|e| e.to_string())?;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| format!("not an HTTP response: {response:?}"))?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// The last `lines` lines of a log file (empty when unreadable).
pub fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn our_own_start_time_is_stable_and_a_dead_pid_has_none() {
        let me = i32::try_from(std::process::id()).unwrap();
        let t = start_time(me).unwrap();
        assert_eq!(start_time(me), Some(t));
        assert!(!stop_process(me, t + 1, Duration::ZERO), "wrong start time");
        assert_eq!(start_time(i32::MAX), None);
    }

    #[test]
    fn a_detached_process_is_stopped_by_pid_and_start_time() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        let mut command = Command::new("sh");
        command.args(["-c", "echo started; exec sleep 30"]);
        let started = spawn_detached(command, &log).unwrap();
        assert_eq!(start_time(started.pid), Some(started.start_time));
        let deadline = Instant::now() + Duration::from_secs(5);
        while !log_tail(&log, 5).contains("started") {
            assert!(Instant::now() < deadline, "nothing logged");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(stop_process(
            started.pid,
            started.start_time,
            Duration::from_secs(2)
        ));
        assert_eq!(start_time(started.pid), None);
    }

    #[test]
    fn cgroup2_is_found() {
        assert!(cgroup2_root().is_absolute());
    }
}
