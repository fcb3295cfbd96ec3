//! Files the agent keeps across restarts (its state, the registered endpoints), written so a
//! crash leaves either the old content or the new, never a torn file or a lost rename.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Writes `bytes` to `path` durably: a temporary file beside it, fsync, rename over `path`,
/// then fsync of the directory, without which the rename itself may not survive a crash.
pub fn write_durably(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut file = File::create(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&tmp, path)?;
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    File::open(dir)?.sync_all()
}

/// Writes one file from a task of its own, so the task that produces the content never
/// waits for the disk. Only the newest content counts: what is handed over while a write is
/// under way replaces whatever was waiting before it.
#[derive(Debug)]
pub struct FileWriter {
    tx: watch::Sender<Option<Arc<[u8]>>>,
    task: JoinHandle<()>,
}

impl FileWriter {
    /// Starts the writer of `path`; `what` names the file in the log.
    pub fn spawn(path: PathBuf, what: &'static str) -> Self {
        let (tx, mut rx) = watch::channel(None::<Arc<[u8]>>);
        let task = tokio::spawn(async move {
            // Ends once the sender is gone and its last content is written.
            while rx.changed().await.is_ok() {
                let Some(bytes) = rx.borrow_and_update().clone() else {
                    continue;
                };
                let target = path.clone();
                let written =
                    tokio::task::spawn_blocking(move || write_durably(&target, &bytes)).await;
                match written {
                    Ok(Ok(())) => {}
                    Ok(Err(error)) => {
                        tracing::warn!(path = %path.display(), %error, "cannot write the {what}");
                    }
                    Err(error) => {
                        tracing::warn!(path = %path.display(), %error, "writing the {what} failed");
                    }
                }
            }
        });
        FileWriter { tx, task }
    }

    /// Hands over the file's new content, replacing any content not yet written.
    pub fn write(&self, bytes: Vec<u8>) {
        self.tx.send_replace(Some(bytes.into()));
    }

    /// Waits until the last content handed over is written, then stops the writer.
    pub async fn close(self) {
        drop(self.tx);
        if let Err(error) = self.task.await {
            tracing::warn!(%error, "file writer task failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_the_file_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        write_durably(&path, b"one").unwrap();
        write_durably(&path, b"two").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["state.json"]);
    }

    #[test]
    fn a_missing_directory_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gone").join("state.json");
        assert!(write_durably(&path, b"x").is_err());
    }

    #[tokio::test]
    async fn close_writes_the_newest_content() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let writer = FileWriter::spawn(path.clone(), "state file");
        for i in 0..100 {
            writer.write(format!("v{i}").into_bytes());
        }
        writer.close().await;
        assert_eq!(std::fs::read(&path).unwrap(), b"v99");
    }

    #[tokio::test]
    async fn nothing_handed_over_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        FileWriter::spawn(path.clone(), "state file").close().await;
        assert!(!path.exists());
    }
}
