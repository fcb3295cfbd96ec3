//! The peers directory: one file per peer, named after it, in the etcd client-config format
//! ([`model::peerfile`]). Polled and compared by content, so files written in place, renamed
//! over, or swapped through a Kubernetes secret volume's `..data` symlink are all noticed.
//! Names starting with `.` and names that are not cluster names (a peer's `ca.crt`, say) are
//! not peers; neither is this cluster's own file.
//!
//! A file that exists but cannot be read right now (permissions being fixed, a volume being
//! swapped) keeps its peer as it is: only a file that is gone removes a peer.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::{Path, PathBuf};

use model::ClusterName;

/// What a scan found: file name → its path and content (`None`: present but unreadable).
pub type Scan = BTreeMap<String, (PathBuf, Option<Vec<u8>>)>;

/// What changed in the directory since the last scan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DirChange {
    /// A new peer file.
    Added {
        /// The peer (the file's name).
        peer: ClusterName,
        /// The file.
        path: PathBuf,
        /// Its content.
        bytes: Vec<u8>,
    },
    /// A peer's file has new content.
    Changed {
        /// The peer.
        peer: ClusterName,
        /// The file.
        path: PathBuf,
        /// Its new content.
        bytes: Vec<u8>,
    },
    /// A peer's file is gone.
    Removed {
        /// The peer.
        peer: ClusterName,
    },
}

/// The peers a directory configures, as of the last scan.
#[derive(Debug)]
pub struct PeerDirectory {
    dir: PathBuf,
    local: ClusterName,
    known: BTreeMap<ClusterName, Vec<u8>>,
    /// File names already reported as not being peers.
    noted: HashSet<String>,
    scan_error: Option<String>,
}

impl PeerDirectory {
    /// Follows `dir` for the peers of cluster `local`.
    pub fn new(dir: PathBuf, local: ClusterName) -> Self {
        PeerDirectory {
            dir,
            local,
            known: BTreeMap::new(),
            noted: HashSet::new(),
            scan_error: None,
        }
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The peers configured as of the last scan.
    pub fn peers(&self) -> impl Iterator<Item = &ClusterName> {
        self.known.keys()
    }

    /// Scans the directory and says what changed. A directory that cannot be read changes
    /// nothing (said once per distinct error): peers are not dropped because a volume is
    /// being remounted.
    pub async fn poll(&mut self) -> Vec<DirChange> {
        match scan(&self.dir).await {
            Ok(files) => {
                if self.scan_error.take().is_some() {
                    tracing::info!(dir = %self.dir.display(), "peers directory readable again");
                }
                self.reconcile(files)
            }
            Err(error) => {
                let text = error.to_string();
                if self.scan_error.as_deref() != Some(&text) {
                    tracing::warn!(
                        dir = %self.dir.display(),
                        error = %text,
                        "cannot read the peers directory; keeping the peers as they are"
                    );
                    self.scan_error = Some(text);
                }
                Vec::new()
            }
        }
    }

    /// What changed between the last scan and `files`.
    pub fn reconcile(&mut self, files: Scan) -> Vec<DirChange> {
        let mut changes = Vec::new();
        let mut present = BTreeSet::new();
        for (name, (path, bytes)) in files {
            let Ok(peer) = ClusterName::new(name.as_str()) else {
                let looks_like_peer = bytes
                    .as_ref()
                    .is_some_and(|b| String::from_utf8_lossy(b).contains("endpoints"));
                if looks_like_peer && self.noted.insert(name) {
                    tracing::warn!(
                        file = %path.display(),
                        "ignoring a peer file whose name is not a cluster name (lowercase \
                         letters, digits and '-', at most 32 characters)"
                    );
                }
                continue;
            };
            if peer == self.local {
                if self.noted.insert(name) {
                    tracing::info!(file = %path.display(), "ignoring the peer file of this cluster itself");
                }
                continue;
            }
            present.insert(peer.clone());
            let Some(bytes) = bytes else {
                if self.noted.insert(name) {
                    tracing::warn!(file = %path.display(), "cannot read the peer file; keeping the peer as it is");
                }
                continue;
            };
            self.noted.remove(peer.as_str());
            match self.known.get(&peer) {
                Some(known) if *known == bytes => {}
                Some(_) => {
                    self.known.insert(peer.clone(), bytes.clone());
                    changes.push(DirChange::Changed { peer, path, bytes });
                }
                None => {
                    self.known.insert(peer.clone(), bytes.clone());
                    changes.push(DirChange::Added { peer, path, bytes });
                }
            }
        }
        let removed: Vec<ClusterName> = self
            .known
            .keys()
            .filter(|peer| !present.contains(*peer))
            .cloned()
            .collect();
        for peer in removed {
            self.known.remove(&peer);
            changes.push(DirChange::Removed { peer });
        }
        changes
    }
}

/// Reads every candidate file of `dir`.
pub async fn scan(dir: &Path) -> std::io::Result<Scan> {
    let mut files = Scan::new();
    let mut entries = tokio::fs::read_dir(dir).await?;
    while let Some(entry) = entries.next_entry().await? {
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        if name.starts_with('.') {
            continue;
        }
        let path = entry.path();
        // Follows symlinks; a dangling one is skipped like a missing file.
        match tokio::fs::metadata(&path).await {
            Ok(meta) if meta.is_file() => {}
            _ => continue,
        }
        let bytes = tokio::fs::read(&path).await.ok();
        files.insert(name, (path, bytes));
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(n: &str) -> ClusterName {
        ClusterName::new(n).unwrap()
    }

    fn files(entries: &[(&str, Option<&str>)]) -> Scan {
        entries
            .iter()
            .map(|(n, b)| {
                (
                    (*n).to_owned(),
                    (
                        PathBuf::from("/p").join(n),
                        b.map(|b| b.as_bytes().to_vec()),
                    ),
                )
            })
            .collect()
    }

    #[tokio::test]
    async fn scan_skips_hidden_entries_and_directories() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("b"), "endpoints: [\"http://a:1\"]\n").unwrap();
        std::fs::write(dir.path().join(".hidden"), "x").unwrap();
        std::fs::create_dir(dir.path().join("..data")).unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("..data").join("c"), "endpoints: []\n").unwrap();
        std::os::unix::fs::symlink(dir.path().join("..data").join("c"), dir.path().join("c"))
            .unwrap();
        std::os::unix::fs::symlink(dir.path().join("nowhere"), dir.path().join("d")).unwrap();
        let files = scan(dir.path()).await.unwrap();
        assert_eq!(files.keys().collect::<Vec<_>>(), vec!["b", "c"]);
        assert_eq!(files["c"].1.as_deref(), Some(&b"endpoints: []\n"[..]));
    }

    #[test]
    fn added_changed_removed() {
        let mut dir = PeerDirectory::new("/p".into(), name("a"));
        let changes = dir.reconcile(files(&[
            ("a", Some("own")),
            ("b", Some("1")),
            ("ca.crt", Some("endpoints")),
        ]));
        assert_eq!(
            changes,
            vec![DirChange::Added {
                peer: name("b"),
                path: "/p/b".into(),
                bytes: b"1".to_vec()
            }]
        );
        assert!(dir.reconcile(files(&[("b", Some("1"))])).is_empty());
        let changes = dir.reconcile(files(&[("b", Some("2")), ("c", Some("1"))]));
        assert!(
            matches!(&changes[0], DirChange::Changed { peer, bytes, .. } if *peer == name("b") && bytes == b"2")
        );
        assert!(matches!(&changes[1], DirChange::Added { peer, .. } if *peer == name("c")));
        assert_eq!(
            dir.reconcile(files(&[("c", Some("1"))])),
            vec![DirChange::Removed { peer: name("b") }]
        );
        assert_eq!(dir.peers().collect::<Vec<_>>(), vec![&name("c")]);
    }

    /// The agent's direct mode used to tear a peer down when its file could not be read;
    /// kvstoremesh kept it. Keeping it is the rule now, for both.
    #[test]
    fn an_unreadable_file_keeps_its_peer() {
        let mut dir = PeerDirectory::new("/p".into(), name("a"));
        dir.reconcile(files(&[("b", Some("1"))]));
        assert!(dir.reconcile(files(&[("b", None)])).is_empty());
        assert_eq!(dir.peers().collect::<Vec<_>>(), vec![&name("b")]);
        // Readable again with the same content: nothing to do; changed: a change.
        assert!(dir.reconcile(files(&[("b", Some("1"))])).is_empty());
        assert!(matches!(
            dir.reconcile(files(&[("b", Some("2"))]))[..],
            [DirChange::Changed { .. }]
        ));
        // Unreadable from the start: not a peer until it can be read.
        assert!(
            dir.reconcile(files(&[("b", Some("2")), ("c", None)]))
                .is_empty()
        );
    }

    #[tokio::test]
    async fn an_unreadable_directory_changes_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("b"), "x").unwrap();
        let mut dir = PeerDirectory::new(tmp.path().to_owned(), name("a"));
        assert_eq!(dir.poll().await.len(), 1);
        std::fs::remove_file(tmp.path().join("b")).unwrap();
        std::fs::remove_dir(tmp.path()).unwrap();
        assert!(dir.poll().await.is_empty());
        assert_eq!(dir.peers().count(), 1);
    }
}
