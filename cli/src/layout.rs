//! Where `enable` and `connect` put things, and how files are written: whole or not at all.
//!
//! A cluster's certs-dir (from its context):
//!
//! | path | what |
//! |---|---|
//! | `ca/ca.crt`, `ca/ca.key` | the cluster's CA (unless `enable --ca-dir` points elsewhere) |
//! | `server/` | the store's server identity (`tls.crt`, `tls.key`, `ca.crt`) |
//! | `admin-<c>/`, `remote-<c>/`, `local-<c>/` | the cluster's users |
//! | `peer-cas/<peer>.crt` | the CA of each peer allowed to read this cluster's store |
//! | `trust-bundle.crt` | the CAs the store accepts clients from: ours and every `peer-cas/` |
//!
//! A cluster's peers-dir holds, per peer `p` it reads: `p` (the peer file), `p.ca.crt` (the
//! CA that signed `p`'s store certificate), `p.tls.crt` and `p.tls.key` (this cluster's
//! `remote-<c>` identity, presented to `p`'s store).

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use certs::{ClusterName, Issued, SERVER_DIR, User};

/// The trust bundle's file name in a certs-dir.
pub const TRUST_BUNDLE_FILE: &str = "trust-bundle.crt";
/// The directory of peers' CAs in a certs-dir.
pub const PEER_CAS_DIR: &str = "peer-cas";

/// A file operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// Writing (or renaming into place) failed.
    #[error("cannot write {}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// Why not.
        #[source]
        source: io::Error,
    },
    /// Reading failed.
    #[error("cannot read {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why not.
        #[source]
        source: io::Error,
    },
    /// Removing failed.
    #[error("cannot remove {}", path.display())]
    Remove {
        /// The file.
        path: PathBuf,
        /// Why not.
        #[source]
        source: io::Error,
    },
}

/// The files of one cluster's certs-dir.
#[derive(Debug, Clone)]
pub struct CertsLayout {
    /// The certs-dir.
    pub dir: PathBuf,
    /// The cluster.
    pub cluster: ClusterName,
}

impl CertsLayout {
    /// The layout of `cluster`'s certs in `dir`.
    pub fn new(cluster: ClusterName, dir: impl Into<PathBuf>) -> Self {
        CertsLayout {
            dir: dir.into(),
            cluster,
        }
    }

    /// The store's server identity directory.
    pub fn server(&self) -> PathBuf {
        self.dir.join(SERVER_DIR)
    }

    /// A user's identity directory.
    pub fn user(&self, user: &User) -> PathBuf {
        self.dir.join(user.cn())
    }

    /// `remote-<cluster>`'s identity directory: what this cluster shows peers' stores.
    pub fn remote(&self) -> PathBuf {
        self.user(&User::Remote(self.cluster.clone()))
    }

    /// Every identity directory with its expected user (`None`: the server).
    pub fn identities(&self) -> Vec<(Option<User>, PathBuf)> {
        let mut all = vec![(None, self.server())];
        for user in User::all(&self.cluster) {
            let dir = self.user(&user);
            all.push((Some(user), dir));
        }
        all
    }

    /// The CA that signed the store's certificate: what peers must trust to reach it.
    pub fn server_ca(&self) -> PathBuf {
        self.server().join(Issued::CA_FILE)
    }

    /// The CA that signed this cluster's `remote-<c>` certificate: what a peer's store must
    /// accept clients from for this cluster to read it.
    pub fn client_ca(&self) -> PathBuf {
        self.remote().join(Issued::CA_FILE)
    }

    /// The trust bundle the store should use for client certificates.
    pub fn trust_bundle(&self) -> PathBuf {
        self.dir.join(TRUST_BUNDLE_FILE)
    }

    /// Where a reader's CA is kept.
    pub fn peer_ca(&self, peer: &ClusterName) -> PathBuf {
        self.dir.join(PEER_CAS_DIR).join(format!("{peer}.crt"))
    }

    /// Every kept reader CA.
    pub fn peer_cas(&self) -> Result<Vec<PathBuf>, FileError> {
        let dir = self.dir.join(PEER_CAS_DIR);
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => return Err(FileError::Read { path: dir, source }),
        };
        let mut out = Vec::new();
        for entry in entries {
            let path = entry
                .map_err(|source| FileError::Read {
                    path: dir.clone(),
                    source,
                })?
                .path();
            let hidden = path
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with('.'));
            if !hidden && path.extension().is_some_and(|e| e == "crt") {
                out.push(path);
            }
        }
        out.sort();
        Ok(out)
    }
}

/// The files a reader keeps in its peers-dir for one peer.
#[derive(Debug, Clone)]
pub struct PeerFiles {
    /// The peer file.
    pub peer_file: PathBuf,
    /// The peer's server CA.
    pub ca: PathBuf,
    /// The reader's client certificate.
    pub cert: PathBuf,
    /// Its key.
    pub key: PathBuf,
}

impl PeerFiles {
    /// The files for `peer` in `peers_dir`.
    pub fn new(peers_dir: &Path, peer: &ClusterName) -> Self {
        PeerFiles {
            peer_file: peers_dir.join(peer.as_str()),
            ca: peers_dir.join(format!("{peer}.ca.crt")),
            cert: peers_dir.join(format!("{peer}.tls.crt")),
            key: peers_dir.join(format!("{peer}.tls.key")),
        }
    }

    /// The four files, the peer file first (it is removed first and written last).
    pub fn all(&self) -> [&Path; 4] {
        [&self.peer_file, &self.ca, &self.cert, &self.key]
    }
}

/// Reads a file, naming it in the error.
pub fn read(path: &Path) -> Result<Vec<u8>, FileError> {
    fs::read(path).map_err(|source| FileError::Read {
        path: path.to_owned(),
        source,
    })
}

/// Writes `bytes` to `path` atomically (a temporary file in the same directory, renamed over
/// it) with permission bits `perm` from the start, creating the directory.
pub fn write_atomic(path: &Path, bytes: &[u8], perm: u32) -> Result<(), FileError> {
    let err = |source| FileError::Write {
        path: path.to_owned(),
        source,
    };
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(err)?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let _ = fs::remove_file(&tmp);
    let result = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(perm)
        .open(&tmp)
        .and_then(|mut file| file.write_all(bytes).and_then(|()| file.sync_all()))
        .and_then(|()| fs::rename(&tmp, path));
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(err)
}

/// Removes `path`; true if it existed.
pub fn remove(path: &Path) -> Result<bool, FileError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(source) => Err(FileError::Remove {
            path: path.to_owned(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn atomic_writes_keep_the_mode_and_leave_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/b.tls.key");
        write_atomic(&path, b"one", 0o600).unwrap();
        write_atomic(&path, b"two", 0o600).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(fs::read_dir(path.parent().unwrap()).unwrap().count(), 1);
        assert!(remove(&path).unwrap());
        assert!(!remove(&path).unwrap());
    }

    #[test]
    fn names() {
        let b = ClusterName::new("b").unwrap();
        let files = PeerFiles::new(Path::new("/p"), &b);
        assert_eq!(files.all()[0], Path::new("/p/b"));
        assert_eq!(files.key, Path::new("/p/b.tls.key"));
        let layout = CertsLayout::new(ClusterName::new("a").unwrap(), "/c");
        assert_eq!(layout.client_ca(), Path::new("/c/remote-a/ca.crt"));
        assert_eq!(layout.peer_ca(&b), Path::new("/c/peer-cas/b.crt"));
        assert_eq!(layout.identities().len(), 4);
    }
}
