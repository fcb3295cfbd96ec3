//! The mesh home: `$CLUSTERMESH_HOME`, else `$HOME/.clustermesh`. A mesh context named N is
//! the directory `contexts/N/` with one `<cluster>.yaml` per cluster; `current-context`
//! holds the name of the current one; a dev environment's state lives in `dev/N/`.

use std::path::{Path, PathBuf};

/// The mesh home could not be found.
#[derive(Debug, thiserror::Error)]
pub enum HomeError {
    /// Neither `$CLUSTERMESH_HOME` nor `$HOME` is set.
    #[error("neither CLUSTERMESH_HOME nor HOME is set: cannot find the mesh home")]
    Unset,
    /// `current-context` could not be read.
    #[error("{path}: {source} (name the environment with --name)")]
    NoCurrent {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// A mesh home directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MeshHome {
    root: PathBuf,
}

impl MeshHome {
    /// The home at `root`.
    pub fn at(root: impl Into<PathBuf>) -> MeshHome {
        MeshHome { root: root.into() }
    }

    /// `$CLUSTERMESH_HOME`, else `$HOME/.clustermesh`.
    pub fn from_env() -> Result<MeshHome, HomeError> {
        if let Some(home) = std::env::var_os("CLUSTERMESH_HOME").filter(|h| !h.is_empty()) {
            return Ok(MeshHome::at(home));
        }
        std::env::var_os("HOME")
            .filter(|h| !h.is_empty())
            .map(|h| MeshHome::at(Path::new(&h).join(".clustermesh")))
            .ok_or(HomeError::Unset)
    }

    /// The home directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The directory of mesh context `name`.
    pub fn context_dir(&self, name: &str) -> PathBuf {
        self.root.join("contexts").join(name)
    }

    /// The file naming the current mesh context.
    pub fn current_context_file(&self) -> PathBuf {
        self.root.join("current-context")
    }

    /// The current mesh context's name.
    pub fn current_context(&self) -> Result<String, HomeError> {
        let path = self.current_context_file();
        std::fs::read_to_string(&path)
            .map(|s| s.trim().to_owned())
            .map_err(|source| HomeError::NoCurrent { path, source })
    }

    /// The state directory of dev environment `name`.
    pub fn env_dir(&self, name: &str) -> PathBuf {
        self.root.join("dev").join(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_layout_is_the_contract_with_the_cli() {
        let home = MeshHome::at("/h");
        assert_eq!(home.context_dir("two"), Path::new("/h/contexts/two"));
        assert_eq!(home.current_context_file(), Path::new("/h/current-context"));
        assert_eq!(home.env_dir("two"), Path::new("/h/dev/two"));
        let err = home.current_context().unwrap_err().to_string();
        assert!(err.contains("/h/current-context"), "{err}");
    }
}
