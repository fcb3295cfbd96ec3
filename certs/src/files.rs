//! Writing PEM files: keys are born 0600, and files appear whole or not at all.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::Error;

/// What to do when a file to be written already exists.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum WriteMode {
    /// Refuse with [`Error::Exists`]: the default, so a typo cannot destroy a working key.
    #[default]
    CreateNew,
    /// Atomically replace the file (rename over it), so a daemon watching it for rotation
    /// never reads half a certificate.
    Replace,
}

/// Permission bits of a private key: readable by its owner only.
pub const KEY_MODE: u32 = 0o600;
/// Permission bits of certificates, which are public.
pub const CERT_MODE: u32 = 0o644;

/// Fails with [`Error::Exists`] on the first of `paths` that exists (even as a dangling
/// symlink), so a multi-file operation can refuse before writing anything.
pub fn ensure_absent<'a>(paths: impl IntoIterator<Item = &'a Path>) -> Result<(), Error> {
    for path in paths {
        if fs::symlink_metadata(path).is_ok() {
            return Err(Error::Exists {
                path: path.to_owned(),
            });
        }
    }
    Ok(())
}

/// Writes `contents` to `path` with permission bits `perm`, creating parent directories.
///
/// The data goes to a temporary file in the same directory, created with `perm` from the
/// start (a key is never readable by others, not even briefly), then is linked (create-new)
/// or renamed (replace) into place.
pub(crate) fn write_file(
    path: &Path,
    contents: &[u8],
    perm: u32,
    mode: WriteMode,
) -> Result<(), Error> {
    let write_err = |error| Error::Write {
        path: path.to_owned(),
        error,
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    fs::create_dir_all(dir).map_err(|error| Error::Write {
        path: dir.to_owned(),
        error,
    })?;
    if mode == WriteMode::CreateNew {
        ensure_absent([path])?;
    }
    let tmp = temp_path(dir, path);
    let result = write_new(&tmp, contents, perm).and_then(|()| match mode {
        WriteMode::Replace => fs::rename(&tmp, path),
        WriteMode::CreateNew => fs::hard_link(&tmp, path),
    });
    // After a rename the temporary name is gone already; otherwise drop it.
    let _ = fs::remove_file(&tmp);
    match result {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Err(Error::Exists {
            path: path.to_owned(),
        }),
        // Some filesystems have no hard links: create the file in place instead.
        Err(_) if mode == WriteMode::CreateNew && fs::symlink_metadata(path).is_err() => {
            write_new(path, contents, perm).map_err(write_err)
        }
        Err(e) => Err(write_err(e)),
    }
}

fn write_new(path: &Path, contents: &[u8], perm: u32) -> io::Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(perm)
        .open(path)?;
    let result = file.write_all(contents).and_then(|()| file.sync_all());
    if result.is_err() {
        let _ = fs::remove_file(path);
    }
    result
}

fn temp_path(dir: &Path, path: &Path) -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    dir.join(format!(
        ".{name}.tmp-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ))
}

/// Reads a whole file, naming it in the error.
pub(crate) fn read_file(path: &Path) -> Result<Vec<u8>, Error> {
    fs::read(path).map_err(|error| Error::Read {
        path: path.to_owned(),
        error,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode_of(p: &Path) -> u32 {
        fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn create_new_refuses_and_replace_resets_mode() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sub/tls.key");
        write_file(&p, b"one", KEY_MODE, WriteMode::CreateNew).unwrap();
        assert_eq!(mode_of(&p), 0o600);
        let err = write_file(&p, b"two", KEY_MODE, WriteMode::CreateNew).unwrap_err();
        assert!(matches!(err, Error::Exists { .. }), "{err}");
        assert_eq!(fs::read(&p).unwrap(), b"one");

        // A key someone loosened is tightened again by a replace.
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
        write_file(&p, b"two", KEY_MODE, WriteMode::Replace).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(mode_of(&p), 0o600);
        // No temporary files are left behind.
        assert_eq!(fs::read_dir(p.parent().unwrap()).unwrap().count(), 1);
    }
}
