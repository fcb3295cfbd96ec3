//! The record of what an environment made: one JSON line per resource, appended and synced
//! **before** the resource is made (a process right after it starts, inside a cgroup recorded
//! before), so `dev down` after a crash or a half-failed `up` finds everything and touches
//! nothing else. Teardown stops processes first, then undoes the rest in reverse order; every
//! step tolerates a resource that is already gone, so it is idempotent.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::sys;

/// The record could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// Reading, appending or syncing the record file failed.
    #[error("record {path}: {source}")]
    Io {
        /// The record file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A line of the record is not a resource this build knows.
    #[error("record {path}, line {line}: {source}")]
    Corrupt {
        /// The record file.
        path: PathBuf,
        /// The 1-based line number.
        line: usize,
        /// The parser's complaint.
        source: serde_json::Error,
    },
}

/// One thing an environment made.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Resource {
    /// A directory, removed with its content.
    Dir {
        /// Its path.
        path: PathBuf,
    },
    /// A file (the mesh home's `current-context`), removed only while it still holds `content`.
    File {
        /// Its path.
        path: PathBuf,
        /// What it held when written.
        content: String,
    },
    /// A host network interface (a bridge, a veth's host end).
    Link {
        /// Its name.
        name: String,
    },
    /// A network namespace; processes still inside are killed first.
    Netns {
        /// Its name under /run/netns.
        name: String,
    },
    /// A cgroup v2 directory; its processes are killed first.
    Cgroup {
        /// Its path.
        path: PathBuf,
    },
    /// A directory on bpffs holding pinned maps and links.
    BpfRoot {
        /// Its path.
        path: PathBuf,
    },
    /// An nftables table (family `inet`), as a cut-off cluster's drop rules.
    NftTable {
        /// Its name.
        name: String,
    },
    /// A detached process.
    Process {
        /// What it is (for logs).
        what: String,
        /// Its pid.
        pid: i32,
        /// Its start time; a different process with the same pid is left alone.
        start_time: u64,
    },
}

/// An environment's record file.
#[derive(Debug)]
pub struct Record {
    path: PathBuf,
}

impl Record {
    /// The record at `path` (the file need not exist yet).
    pub fn at(path: impl Into<PathBuf>) -> Record {
        Record { path: path.into() }
    }

    /// Its file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn io(&self, source: std::io::Error) -> RecordError {
        RecordError::Io {
            path: self.path.clone(),
            source,
        }
    }

    /// Appends `resource` and syncs it to disk, before the caller makes it.
    pub fn add(&self, resource: &Resource) -> Result<(), RecordError> {
        let mut file = File::options()
            .create(true)
            .append(true)
            .open(&self.path)
            .map_err(|e| self.io(e))?;
        let line = serde_json::to_string(resource).expect("resources always serialize");
        writeln!(file, "{line}").map_err(|e| self.io(e))?;
        file.sync_data().map_err(|e| self.io(e))
    }

    /// Every resource recorded, in order (none when the file does not exist). A last line
    /// cut short by a crash is ignored.
    pub fn resources(&self) -> Result<Vec<Resource>, RecordError> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(self.io(e)),
        };
        let complete = text.ends_with('\n');
        let lines: Vec<&str> = text.lines().collect();
        let mut out = Vec::new();
        for (index, line) in lines.iter().enumerate() {
            match serde_json::from_str(line) {
                Ok(resource) => out.push(resource),
                Err(_) if index + 1 == lines.len() && !complete => break,
                Err(source) => {
                    return Err(RecordError::Corrupt {
                        path: self.path.clone(),
                        line: index + 1,
                        source,
                    });
                }
            }
        }
        Ok(out)
    }
}

/// Undoes `resources`: processes and cgroups' processes first, then everything in reverse
/// order. Resources already gone are skipped; failures are logged and teardown goes on. The
/// failures, as messages.
pub fn teardown(resources: &[Resource]) -> Vec<String> {
    let mut failures = Vec::new();
    for resource in resources.iter().rev() {
        match resource {
            Resource::Process {
                what,
                pid,
                start_time,
            } if sys::stop_process(*pid, *start_time, Duration::from_secs(3)) => {
                tracing::info!(%what, pid, "stopped");
            }
            Resource::Cgroup { path } => sys::kill_cgroup(path),
            _ => {}
        }
    }
    for resource in resources.iter().rev() {
        if let Err(e) = undo(resource) {
            tracing::warn!(?resource, error = %e, "could not remove");
            failures.push(e);
        }
    }
    failures
}

fn undo(resource: &Resource) -> Result<(), String> {
    let gone = |e: &std::io::Error| e.kind() == std::io::ErrorKind::NotFound;
    match resource {
        Resource::Process { .. } => Ok(()),
        Resource::Dir { path } | Resource::BpfRoot { path } => {
            match std::fs::remove_dir_all(path) {
                Err(e) if !gone(&e) => Err(format!("{}: {e}", path.display())),
                _ => Ok(()),
            }
        }
        Resource::File { path, content } => {
            if std::fs::read_to_string(path).is_ok_and(|c| c == *content) {
                std::fs::remove_file(path).map_err(|e| format!("{}: {e}", path.display()))?;
            }
            Ok(())
        }
        Resource::Link { name } => {
            if sys::link_exists(name) {
                sys::ip(["link", "del", name.as_str()]).map_err(|e| e.to_string())?;
            }
            Ok(())
        }
        Resource::Netns { name } => {
            if !sys::netns_exists(name) {
                return Ok(());
            }
            // Processes still inside keep it alive: kill them first.
            if let Ok(pids) = sys::ip(["netns", "pids", name.as_str()]) {
                for pid in pids.split_whitespace().filter_map(|p| p.parse().ok()) {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
            sys::ip(["netns", "del", name.as_str()])
                .map(drop)
                .map_err(|e| e.to_string())
        }
        Resource::NftTable { name } => {
            if crate::faults::nft_table_exists(name) {
                sys::run(std::process::Command::new("nft").args(["delete", "table", "inet", name]))
                    .map_err(|e| e.to_string())?;
            }
            Ok(())
        }
        Resource::Cgroup { path } => {
            sys::kill_cgroup(path);
            match std::fs::remove_dir(path) {
                Err(e) if !gone(&e) => Err(format!("{}: {e}", path.display())),
                _ => Ok(()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resources_round_trip_and_a_torn_last_line_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let record = Record::at(dir.path().join("record"));
        assert!(record.resources().unwrap().is_empty());
        let made = [
            Resource::Dir {
                path: dir.path().join("d"),
            },
            Resource::Process {
                what: "x".into(),
                pid: 1,
                start_time: 2,
            },
        ];
        for r in &made {
            record.add(r).unwrap();
        }
        assert_eq!(record.resources().unwrap(), made);
        let mut file = File::options().append(true).open(record.path()).unwrap();
        write!(file, "{{\"kind\":\"di").unwrap();
        assert_eq!(record.resources().unwrap(), made);
        writeln!(file).unwrap();
        let err = record.resources().unwrap_err().to_string();
        assert!(err.contains("line 3"), "{err}");
    }

    #[test]
    fn teardown_removes_what_is_recorded_and_tolerates_what_is_gone() {
        let dir = tempfile::tempdir().unwrap();
        let made = dir.path().join("made");
        std::fs::create_dir_all(made.join("sub")).unwrap();
        let current = dir.path().join("current");
        std::fs::write(&current, "env\n").unwrap();
        let other = dir.path().join("other");
        std::fs::write(&other, "someone else's\n").unwrap();
        let resources = [
            Resource::Dir { path: made.clone() },
            Resource::File {
                path: current.clone(),
                content: "env\n".into(),
            },
            Resource::File {
                path: other.clone(),
                content: "env\n".into(),
            },
            Resource::Dir {
                path: dir.path().join("never-made"),
            },
            Resource::Process {
                what: "gone".into(),
                pid: i32::MAX,
                start_time: 1,
            },
        ];
        assert!(teardown(&resources).is_empty());
        assert!(!made.exists() && !current.exists());
        assert!(other.exists(), "a file that changed since is not ours");
        assert!(teardown(&resources).is_empty(), "idempotent");
    }
}
