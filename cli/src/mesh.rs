//! Finding the clusters a verb works on: a mesh context is a directory of cluster contexts
//! ([`model::ClusterContext`], one `<cluster>.yaml` each), named under the mesh home or given
//! as a path.
//!
//! - mesh home: `$CLUSTERMESH_HOME`, else `$HOME/.clustermesh`;
//! - a context named `N` is the directory `<home>/contexts/N/`;
//! - `<home>/current-context` holds the name of the context used when none is given;
//! - a `--context` value containing `/` is a directory path instead of a name.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};

use model::{ClusterContext, ClusterName, ContextError};

/// The variable naming the mesh home.
pub const HOME_ENV: &str = "CLUSTERMESH_HOME";
/// The file, in the mesh home, holding the current context's name.
pub const CURRENT_CONTEXT_FILE: &str = "current-context";
/// The directory, in the mesh home, holding one directory per named context.
pub const CONTEXTS_DIR: &str = "contexts";
/// The extension of cluster context files.
pub const CONTEXT_EXTENSION: &str = "yaml";

/// Why the clusters of a mesh context could not be found or read.
#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    /// Neither `$CLUSTERMESH_HOME` nor `$HOME` is set.
    #[error("neither ${HOME_ENV} nor $HOME is set: cannot find the mesh home")]
    NoHome,
    /// No `--context` and no current context.
    #[error(
        "no context given and no current context ({} does not exist); pass --context NAME|DIR \
         or write the name of a context into that file",
        path.display()
    )]
    NoCurrentContext {
        /// The current-context file.
        path: PathBuf,
    },
    /// A context name that cannot name a directory of the mesh home.
    #[error("{0:?} is not a context name (empty, `.`, `..`, or blank)")]
    BadContextName(String),
    /// The named context does not exist.
    #[error("context {name:?} not found: {} is not a directory", dir.display())]
    UnknownContext {
        /// The name.
        name: String,
        /// Where it was looked for.
        dir: PathBuf,
    },
    /// A file or directory that could not be read.
    #[error("cannot read {}", path.display())]
    Read {
        /// The path.
        path: PathBuf,
        /// Why not.
        #[source]
        source: std::io::Error,
    },
    /// A cluster context that does not parse.
    #[error("{}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong in it.
        #[source]
        source: ContextError,
    },
    /// A context file whose name is not the cluster's.
    #[error(
        "{}: the file must be named after its cluster ({name}.{CONTEXT_EXTENSION})",
        path.display()
    )]
    StemMismatch {
        /// The file.
        path: PathBuf,
        /// The `name:` inside.
        name: ClusterName,
    },
    /// A context directory without any cluster.
    #[error("context {context:?} ({}) holds no <cluster>.{CONTEXT_EXTENSION} file", dir.display())]
    Empty {
        /// The context.
        context: String,
        /// Its directory.
        dir: PathBuf,
    },
    /// A cluster the context does not hold.
    #[error("cluster {cluster} is not in context {context:?} (it holds: {known})")]
    UnknownCluster {
        /// The cluster asked for.
        cluster: ClusterName,
        /// The context.
        context: String,
        /// The clusters it holds, comma separated.
        known: String,
    },
}

/// The mesh home: `$CLUSTERMESH_HOME`, else `$HOME/.clustermesh`.
pub fn home() -> Result<PathBuf, MeshError> {
    home_from(
        std::env::var_os(HOME_ENV).as_deref(),
        std::env::var_os("HOME").as_deref(),
    )
}

fn home_from(mesh_home: Option<&OsStr>, home: Option<&OsStr>) -> Result<PathBuf, MeshError> {
    match (mesh_home, home) {
        (Some(dir), _) if !dir.is_empty() => Ok(PathBuf::from(dir)),
        (_, Some(home)) if !home.is_empty() => Ok(Path::new(home).join(".clustermesh")),
        _ => Err(MeshError::NoHome),
    }
}

/// The clusters of one mesh context, sorted by name, paths resolved.
#[derive(Debug, Clone)]
pub struct Mesh {
    /// The context's name, or its directory as given.
    pub name: String,
    /// The context's directory.
    pub dir: PathBuf,
    /// Its clusters, sorted by name.
    pub clusters: Vec<ClusterContext>,
}

impl Mesh {
    /// The context `selected` (a name, or a directory when it contains `/`), else the
    /// current context of the mesh home.
    pub fn load(selected: Option<&str>) -> Result<Mesh, MeshError> {
        match selected {
            Some(value) if value.contains('/') => Mesh::load_dir(value, Path::new(value)),
            _ => Mesh::load_from_home(&home()?, selected),
        }
    }

    /// Like [`Mesh::load`] for names, with the mesh home given.
    pub fn load_from_home(home: &Path, selected: Option<&str>) -> Result<Mesh, MeshError> {
        let name = match selected {
            Some(name) => name.to_owned(),
            None => {
                let path = home.join(CURRENT_CONTEXT_FILE);
                match fs::read_to_string(&path) {
                    Ok(text) => text.trim().to_owned(),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        return Err(MeshError::NoCurrentContext { path });
                    }
                    Err(source) => return Err(MeshError::Read { path, source }),
                }
            }
        };
        if name.is_empty() || name == "." || name == ".." || name.contains('/') {
            return Err(MeshError::BadContextName(name));
        }
        let dir = home.join(CONTEXTS_DIR).join(&name);
        if !dir.is_dir() {
            return Err(MeshError::UnknownContext { name, dir });
        }
        Mesh::load_dir(&name, &dir)
    }

    /// Every `<cluster>.yaml` of `dir`, each checked to be named after its cluster.
    pub fn load_dir(name: &str, dir: &Path) -> Result<Mesh, MeshError> {
        let read_err = |path: &Path| {
            let path = path.to_owned();
            move |source| MeshError::Read { path, source }
        };
        let entries = fs::read_dir(dir).map_err(read_err(dir))?;
        let mut clusters = BTreeMap::new();
        for entry in entries {
            let path = entry.map_err(read_err(dir))?.path();
            let Some(stem) = path.file_stem().and_then(OsStr::to_str) else {
                continue;
            };
            if stem.starts_with('.')
                || path.extension() != Some(OsStr::new(CONTEXT_EXTENSION))
                || !path.is_file()
            {
                continue;
            }
            let bytes = fs::read(&path).map_err(read_err(&path))?;
            let context = ClusterContext::parse(&bytes).map_err(|source| MeshError::Parse {
                path: path.clone(),
                source,
            })?;
            if context.name.as_str() != stem {
                return Err(MeshError::StemMismatch {
                    path,
                    name: context.name,
                });
            }
            clusters.insert(context.name.clone(), context.resolve(dir));
        }
        if clusters.is_empty() {
            return Err(MeshError::Empty {
                context: name.to_owned(),
                dir: dir.to_owned(),
            });
        }
        Ok(Mesh {
            name: name.to_owned(),
            dir: dir.to_owned(),
            clusters: clusters.into_values().collect(),
        })
    }

    /// The context of `cluster`.
    pub fn cluster(&self, cluster: &ClusterName) -> Result<&ClusterContext, MeshError> {
        self.clusters
            .iter()
            .find(|c| &c.name == cluster)
            .ok_or_else(|| MeshError::UnknownCluster {
                cluster: cluster.clone(),
                context: self.name.clone(),
                known: self
                    .clusters
                    .iter()
                    .map(|c| c.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }

    /// Only `cluster`'s context when given, else every cluster.
    pub fn select(&self, cluster: Option<&ClusterName>) -> Result<Vec<&ClusterContext>, MeshError> {
        match cluster {
            Some(name) => Ok(vec![self.cluster(name)?]),
            None => Ok(self.clusters.iter().collect()),
        }
    }
}

/// Two clusters of a mesh that share an id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdClash {
    /// The shared id.
    pub id: u16,
    /// The clusters using it, sorted.
    pub clusters: Vec<ClusterName>,
}

/// Every id used by more than one cluster of `clusters`.
pub fn id_clashes<'a>(clusters: impl IntoIterator<Item = &'a ClusterContext>) -> Vec<IdClash> {
    let mut by_id: BTreeMap<u16, Vec<ClusterName>> = BTreeMap::new();
    for c in clusters {
        by_id.entry(c.id.get()).or_default().push(c.name.clone());
    }
    by_id
        .into_iter()
        .filter(|(_, names)| names.len() > 1)
        .map(|(id, mut clusters)| {
            clusters.sort();
            IdClash { id, clusters }
        })
        .collect()
}

/// The peers configured in `peers_dir`: files named after a cluster other than `own`, the
/// rule kvstoremesh follows (hidden files and TLS material beside the peer files are not
/// peers). A missing directory has no peers.
pub fn configured_peers(
    peers_dir: &Path,
    own: &ClusterName,
) -> Result<Vec<ClusterName>, MeshError> {
    let entries = match fs::read_dir(peers_dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(MeshError::Read {
                path: peers_dir.to_owned(),
                source,
            });
        }
    };
    let mut peers = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| MeshError::Read {
            path: peers_dir.to_owned(),
            source,
        })?;
        let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        if let Ok(peer) = ClusterName::new(&name)
            && &peer != own
            && entry.path().is_file()
        {
            peers.push(peer);
        }
    }
    peers.sort();
    Ok(peers)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn context_yaml(name: &str, id: u16, extra: &str) -> String {
        format!(
            "name: {name}\nid: {id}\nstore:\n  endpoints: [http://127.0.0.1:1]\napiserver: \
             http://127.0.0.1:2\npeers-dir: {name}/peers\ncerts-dir: {name}/certs\n{extra}"
        )
    }

    #[test]
    fn the_home_comes_from_the_environment() {
        assert_eq!(
            home_from(Some(OsStr::new("/m")), Some(OsStr::new("/h"))).unwrap(),
            Path::new("/m")
        );
        assert_eq!(
            home_from(Some(OsStr::new("")), Some(OsStr::new("/h"))).unwrap(),
            Path::new("/h/.clustermesh")
        );
        assert!(matches!(home_from(None, None), Err(MeshError::NoHome)));
    }

    #[test]
    fn contexts_by_name_current_and_directory() {
        let home = tempfile::tempdir().unwrap();
        let dir = home.path().join("contexts/dev");
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("b.yaml"), context_yaml("b", 2, "")).unwrap();
        fs::write(dir.join("a.yaml"), context_yaml("a", 1, "")).unwrap();
        fs::write(dir.join("notes.txt"), "not a context").unwrap();
        fs::write(dir.join(".a.yaml.swp"), "editor").unwrap();

        let err = Mesh::load_from_home(home.path(), None).unwrap_err();
        assert!(matches!(err, MeshError::NoCurrentContext { .. }), "{err}");
        fs::write(home.path().join(CURRENT_CONTEXT_FILE), "dev\n").unwrap();
        let mesh = Mesh::load_from_home(home.path(), None).unwrap();
        let names: Vec<_> = mesh.clusters.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
        assert_eq!(mesh.clusters[0].peers_dir, dir.join("a/peers"));

        let by_dir = Mesh::load(Some(dir.to_str().unwrap())).unwrap();
        assert_eq!(by_dir.clusters.len(), 2);

        let err = Mesh::load_from_home(home.path(), Some("prod")).unwrap_err();
        assert!(
            err.to_string().contains("context \"prod\" not found"),
            "{err}"
        );
        let err = Mesh::load_from_home(home.path(), Some("..")).unwrap_err();
        assert!(matches!(err, MeshError::BadContextName(_)), "{err}");
        let err = mesh.cluster(&ClusterName::new("c").unwrap()).unwrap_err();
        assert!(err.to_string().contains("it holds: a, b"), "{err}");
    }

    #[test]
    fn a_file_must_be_named_after_its_cluster() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("x.yaml"), context_yaml("a", 1, "")).unwrap();
        let err = Mesh::load_dir("t", dir.path()).unwrap_err();
        assert!(err.to_string().contains("(a.yaml)"), "{err}");
        let empty = tempfile::tempdir().unwrap();
        let err = Mesh::load_dir("t", empty.path()).unwrap_err();
        assert!(matches!(err, MeshError::Empty { .. }), "{err}");
    }

    #[test]
    fn clashes_and_peers() {
        let parse =
            |name, id| ClusterContext::parse(context_yaml(name, id, "").as_bytes()).unwrap();
        let all = [parse("a", 1), parse("b", 2), parse("c", 1)];
        let clashes = id_clashes(&all);
        assert_eq!(clashes.len(), 1);
        assert_eq!(clashes[0].id, 1);
        assert_eq!(clashes[0].clusters[1].as_str(), "c");

        let dir = tempfile::tempdir().unwrap();
        for file in ["b", "a", "b.ca.crt", ".c", "C"] {
            fs::write(dir.path().join(file), "").unwrap();
        }
        let a = ClusterName::new("a").unwrap();
        let peers = configured_peers(dir.path(), &a).unwrap();
        assert_eq!(peers, [ClusterName::new("b").unwrap()]);
        assert!(
            configured_peers(&dir.path().join("none"), &a)
                .unwrap()
                .is_empty()
        );
    }
}
