//! `clustermesh connect` and `disconnect`: each cluster that reads another gets the other's
//! peer file, CA and its own client identity in its peers-dir; each cluster that is read
//! keeps the reader's CA and trusts it in its store's trust bundle. Clusters from different
//! CAs join this way, by bundle. Everything is checked before the first file is written.

use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};

use certs::{CERT_MODE, Issued, KEY_MODE};
use model::{ClusterContext, ClusterName, PeerFile};

use crate::enable::{self, EnableError};
use crate::layout::{self, CertsLayout, FileError, PeerFiles};
use crate::mesh::{self, Mesh, MeshError};

/// Which clusters read which.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ConnectionMode {
    /// Source and each destination read each other.
    #[default]
    Bidirectional,
    /// The source reads each destination; destinations do not read the source.
    Unicast,
    /// Every cluster named (source and destinations) reads every other.
    Mesh,
}

impl fmt::Display for ConnectionMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ConnectionMode::Bidirectional => "bidirectional",
            ConnectionMode::Unicast => "unicast",
            ConnectionMode::Mesh => "mesh",
        })
    }
}

/// `reader` mirrors `target`'s store.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Link {
    /// The cluster whose kvstoremesh (or agents) read.
    pub reader: ClusterName,
    /// The cluster whose store is read.
    pub target: ClusterName,
}

impl fmt::Display for Link {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} reads {}", self.reader, self.target)
    }
}

/// Why clusters could not be connected or disconnected.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The mesh context could not be used.
    #[error(transparent)]
    Mesh(#[from] MeshError),
    /// No destination given.
    #[error("--destination: at least one cluster is required")]
    NoDestination,
    /// A cluster connected to itself.
    #[error("--destination {0}: a cluster cannot be connected to itself")]
    SelfConnect(ClusterName),
    /// The same destination twice.
    #[error("--destination {0} is given twice")]
    Duplicate(ClusterName),
    /// Two clusters of the mesh share an id.
    #[error(
        "cluster id {id} is used by {}: ids must be unique in the mesh; change the id in one \
         of the contexts (and restart its daemons with it)",
        clusters.iter().map(ClusterName::as_str).collect::<Vec<_>>().join(" and ")
    )]
    IdClash {
        /// The id.
        id: u16,
        /// The clusters using it.
        clusters: Vec<ClusterName>,
    },
    /// Two clusters to connect disagree on max-connected-clusters.
    #[error(
        "max-connected-clusters differs: {a} has {a_max}, {b} has {b_max}; every cluster of a \
         mesh must use the same value"
    )]
    MaxMismatch {
        /// One cluster.
        a: ClusterName,
        /// Its setting.
        a_max: u16,
        /// The other.
        b: ClusterName,
        /// Its setting.
        b_max: u16,
    },
    /// A cluster whose certificates are missing.
    #[error(
        "cluster {cluster} is not enabled ({} is missing); run `clustermesh enable --cluster \
         {cluster}` first",
        missing.display()
    )]
    NotEnabled {
        /// The cluster.
        cluster: ClusterName,
        /// The first missing file.
        missing: PathBuf,
    },
    /// A trust bundle could not be rebuilt.
    #[error(transparent)]
    Enable(#[from] EnableError),
    /// A file could not be read, written or removed.
    #[error(transparent)]
    File(#[from] FileError),
}

impl ConnectError {
    /// Whether the error is in what the user asked for (exit status 64): everything found
    /// before a file was written.
    pub fn is_usage(&self) -> bool {
        match self {
            ConnectError::Enable(e) => e.is_usage(),
            ConnectError::File(_) => false,
            _ => true,
        }
    }
}

/// The links `mode` asks for between `source` and `destinations`, checked for self links
/// and duplicates.
pub fn links(
    source: &ClusterName,
    destinations: &[ClusterName],
    mode: ConnectionMode,
) -> Result<Vec<Link>, ConnectError> {
    if destinations.is_empty() {
        return Err(ConnectError::NoDestination);
    }
    let mut seen = BTreeSet::new();
    for d in destinations {
        if d == source {
            return Err(ConnectError::SelfConnect(d.clone()));
        }
        if !seen.insert(d) {
            return Err(ConnectError::Duplicate(d.clone()));
        }
    }
    let link = |reader: &ClusterName, target: &ClusterName| Link {
        reader: reader.clone(),
        target: target.clone(),
    };
    let mut out = Vec::new();
    match mode {
        ConnectionMode::Unicast => out.extend(destinations.iter().map(|d| link(source, d))),
        ConnectionMode::Bidirectional => {
            for d in destinations {
                out.push(link(source, d));
                out.push(link(d, source));
            }
        }
        ConnectionMode::Mesh => {
            let all: Vec<&ClusterName> = std::iter::once(source).chain(destinations).collect();
            for r in &all {
                for t in &all {
                    if r != t {
                        out.push(link(r, t));
                    }
                }
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Checks everything `connect` relies on, without writing: the clusters are in the mesh,
/// ids are unique across the whole mesh, the clusters agree on max-connected-clusters, and
/// each is enabled.
pub fn validate(mesh: &Mesh, links: &[Link]) -> Result<(), ConnectError> {
    let mut involved: Vec<&ClusterContext> = Vec::new();
    for link in links {
        for name in [&link.reader, &link.target] {
            let context = mesh.cluster(name)?;
            if !involved.iter().any(|c| &c.name == name) {
                involved.push(context);
            }
        }
    }
    if let Some(clash) = mesh::id_clashes(&mesh.clusters).into_iter().next() {
        return Err(ConnectError::IdClash {
            id: clash.id,
            clusters: clash.clusters,
        });
    }
    for link in links {
        let (r, t) = (mesh.cluster(&link.reader)?, mesh.cluster(&link.target)?);
        if r.max_connected_clusters != t.max_connected_clusters {
            return Err(ConnectError::MaxMismatch {
                a: r.name.clone(),
                a_max: r.max_connected_clusters.value(),
                b: t.name.clone(),
                b_max: t.max_connected_clusters.value(),
            });
        }
    }
    for context in involved {
        enable::is_enabled(&context.certs_dir, &context.name).map_err(|missing| {
            ConnectError::NotEnabled {
                cluster: context.name.clone(),
                missing,
            }
        })?;
    }
    Ok(())
}

/// One file to write.
struct Planned {
    path: PathBuf,
    bytes: Vec<u8>,
    mode: u32,
}

/// Reads everything a link needs; writes nothing.
fn plan_link(reader: &ClusterContext, target: &ClusterContext) -> Result<Vec<Planned>, FileError> {
    let reader_certs = CertsLayout::new(reader.name.clone(), &reader.certs_dir);
    let target_certs = CertsLayout::new(target.name.clone(), &target.certs_dir);
    let files = PeerFiles::new(&reader.peers_dir, &target.name);
    let [cert, key, _] = Issued::paths(&reader_certs.remote());
    let relative = |p: &Path| p.file_name().map(PathBuf::from);
    let peer_file = PeerFile {
        endpoints: target.endpoints_for_peers().to_vec(),
        trusted_ca_file: relative(&files.ca),
        cert_file: relative(&files.cert),
        key_file: relative(&files.key),
        unknown_keys: Vec::new(),
    };
    Ok(vec![
        Planned {
            path: files.ca.clone(),
            bytes: layout::read(&target_certs.server_ca())?,
            mode: CERT_MODE,
        },
        Planned {
            path: files.cert.clone(),
            bytes: layout::read(&cert)?,
            mode: CERT_MODE,
        },
        Planned {
            path: files.key.clone(),
            bytes: layout::read(&key)?,
            mode: KEY_MODE,
        },
        Planned {
            path: target_certs.peer_ca(&reader.name),
            bytes: layout::read(&reader_certs.client_ca())?,
            mode: CERT_MODE,
        },
        // Last: kvstoremesh acts on the peer file, whose TLS files are then in place.
        Planned {
            path: files.peer_file.clone(),
            bytes: peer_file.to_yaml().into_bytes(),
            mode: CERT_MODE,
        },
    ])
}

/// Every cluster of the mesh context reads every other (`clustermesh dev up --connect`);
/// no links for a context of one cluster.
pub fn full_mesh(mesh: &Mesh) -> Result<Vec<Link>, ConnectError> {
    match mesh.clusters.split_first() {
        Some((first, rest)) if !rest.is_empty() => {
            let rest: Vec<ClusterName> = rest.iter().map(|c| c.name.clone()).collect();
            links(&first.name, &rest, ConnectionMode::Mesh)
        }
        _ => Ok(Vec::new()),
    }
}

/// What `connect` wrote.
#[derive(Debug, Clone, Default)]
pub struct Connected {
    /// The links made.
    pub links: Vec<Link>,
    /// Every file written.
    pub files: Vec<PathBuf>,
}

/// Connects the clusters: validates, reads everything, then writes each link's files
/// (atomically, peer file last) and rebuilds the trust bundles of the clusters read.
pub fn connect(mesh: &Mesh, links: &[Link]) -> Result<Connected, ConnectError> {
    validate(mesh, links)?;
    let mut plans = Vec::new();
    for link in links {
        plans.push(plan_link(
            mesh.cluster(&link.reader)?,
            mesh.cluster(&link.target)?,
        )?);
    }
    let mut written = Vec::new();
    for (link, plan) in links.iter().zip(plans) {
        // The target trusts the reader before the reader starts knocking.
        let (peer_file, rest) = plan.split_last().expect("a link plans its peer file");
        for file in rest {
            layout::write_atomic(&file.path, &file.bytes, file.mode)?;
            written.push(file.path.clone());
        }
        let target = mesh.cluster(&link.target)?;
        let target_certs = CertsLayout::new(target.name.clone(), &target.certs_dir);
        written.push(enable::rebuild_trust_bundle(&target_certs)?);
        layout::write_atomic(&peer_file.path, &peer_file.bytes, peer_file.mode)?;
        written.push(peer_file.path.clone());
    }
    written.sort();
    written.dedup();
    Ok(Connected {
        links: links.to_vec(),
        files: written,
    })
}

/// What `disconnect` removed, and what it could not do on a side that is gone.
#[derive(Debug, Clone, Default)]
pub struct Disconnected {
    /// Files removed.
    pub removed: Vec<PathBuf>,
    /// Steps skipped or failed on a side that is not there (its context or files are gone);
    /// the other side is disconnected anyway.
    pub warnings: Vec<String>,
}

/// Undoes `connect` for `links`. Needs neither side's daemons; a cluster missing from the
/// mesh context only has its part skipped (with a warning), so a dead cluster can be cut
/// off.
pub fn disconnect(mesh: &Mesh, links: &[Link]) -> Result<Disconnected, ConnectError> {
    let mut done = Disconnected::default();
    for link in links {
        match mesh.cluster(&link.reader) {
            Ok(reader) => {
                for path in PeerFiles::new(&reader.peers_dir, &link.target).all() {
                    if layout::remove(path)? {
                        done.removed.push(path.to_owned());
                    }
                }
            }
            Err(e) => done
                .warnings
                .push(format!("{link}: skipped the reader's peer files: {e}")),
        }
        match mesh.cluster(&link.target) {
            Ok(target) => {
                let certs = CertsLayout::new(target.name.clone(), &target.certs_dir);
                let path = certs.peer_ca(&link.reader);
                match layout::remove(&path) {
                    Ok(true) => done.removed.push(path),
                    Ok(false) => {}
                    Err(e) => done
                        .warnings
                        .push(format!("{link}: {}", model::error_chain(&e))),
                }
                if let Err(e) = enable::rebuild_trust_bundle(&certs) {
                    done.warnings.push(format!(
                        "{link}: the trust bundle of {} was not rebuilt: {}",
                        target.name,
                        model::error_chain(&e)
                    ));
                }
            }
            Err(e) => done
                .warnings
                .push(format!("{link}: skipped the target's trust: {e}")),
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(s: &str) -> ClusterName {
        ClusterName::new(s).unwrap()
    }

    #[test]
    fn links_per_mode() {
        let show = |links: Vec<Link>| -> Vec<String> {
            links
                .iter()
                .map(|l| format!("{}>{}", l.reader, l.target))
                .collect()
        };
        assert_eq!(
            show(links(&n("a"), &[n("b")], ConnectionMode::Bidirectional).unwrap()),
            ["a>b", "b>a"]
        );
        assert_eq!(
            show(links(&n("a"), &[n("b"), n("c")], ConnectionMode::Unicast).unwrap()),
            ["a>b", "a>c"]
        );
        assert_eq!(
            links(&n("a"), &[n("b"), n("c")], ConnectionMode::Mesh)
                .unwrap()
                .len(),
            6
        );
        let err = links(&n("a"), &[n("a")], ConnectionMode::Unicast).unwrap_err();
        assert!(err.to_string().contains("itself"), "{err}");
        let err = links(&n("a"), &[n("b"), n("b")], ConnectionMode::Unicast).unwrap_err();
        assert!(err.to_string().contains("twice"), "{err}");
        assert!(matches!(
            links(&n("a"), &[], ConnectionMode::Mesh),
            Err(ConnectError::NoDestination)
        ));
    }

    fn mesh_of(dir: &Path, clusters: &[(&str, u16, &str)]) -> Mesh {
        for (name, id, extra) in clusters {
            std::fs::write(
                dir.join(format!("{name}.yaml")),
                crate::mesh::tests::context_yaml(name, *id, extra),
            )
            .unwrap();
        }
        Mesh::load_dir("t", dir).unwrap()
    }

    #[test]
    fn refusals_come_before_any_write() {
        let dir = tempfile::tempdir().unwrap();
        let mesh = mesh_of(
            dir.path(),
            &[
                ("a", 1, ""),
                ("b", 2, "max-connected-clusters: 511\n"),
                ("c", 3, ""),
            ],
        );
        let ab = links(&n("a"), &[n("b")], ConnectionMode::Bidirectional).unwrap();
        let err = connect(&mesh, &ab).unwrap_err();
        assert!(err.to_string().contains("a has 255, b has 511"), "{err}");
        let ac = links(&n("a"), &[n("c")], ConnectionMode::Bidirectional).unwrap();
        let err = connect(&mesh, &ac).unwrap_err();
        assert!(
            err.to_string()
                .contains("run `clustermesh enable --cluster a`"),
            "{err}"
        );
        let ax = links(&n("a"), &[n("x")], ConnectionMode::Unicast).unwrap();
        assert!(matches!(
            connect(&mesh, &ax),
            Err(ConnectError::Mesh(MeshError::UnknownCluster { .. }))
        ));
        assert!(!dir.path().join("a/peers").exists());
        assert!(!dir.path().join("c/peers").exists());

        let clash = tempfile::tempdir().unwrap();
        let mesh = mesh_of(clash.path(), &[("a", 1, ""), ("b", 2, ""), ("d", 1, "")]);
        let err = connect(&mesh, &ab).unwrap_err();
        assert!(err.to_string().contains("used by a and d"), "{err}");
        assert!(err.is_usage());
    }

    #[test]
    fn connect_then_disconnect_with_the_other_side_gone() {
        let dir = tempfile::tempdir().unwrap();
        let mesh = mesh_of(dir.path(), &[("a", 1, ""), ("b", 2, "")]);
        for context in &mesh.clusters {
            enable::enable(context, &enable::EnableOptions::default()).unwrap();
        }
        let ab = links(&n("a"), &[n("b")], ConnectionMode::Bidirectional).unwrap();
        let done = connect(&mesh, &ab).unwrap();
        assert_eq!(done.links.len(), 2);
        let peer = PeerFile::parse(&std::fs::read(dir.path().join("a/peers/b")).unwrap())
            .unwrap()
            .resolve(&dir.path().join("a/peers"));
        assert_eq!(peer.endpoints, ["http://127.0.0.1:1"]);
        for path in [&peer.trusted_ca_file, &peer.cert_file, &peer.key_file] {
            assert!(path.as_ref().unwrap().is_file(), "{path:?}");
        }
        let bundle =
            certs::TrustBundle::load(&dir.path().join("b/certs/trust-bundle.crt")).unwrap();
        assert_eq!(bundle.len(), 2);

        // b's context is gone (a dead cluster someone cleaned up): a's side still goes.
        std::fs::remove_file(dir.path().join("b.yaml")).unwrap();
        let only_a = Mesh::load_dir("t", dir.path()).unwrap();
        let done = disconnect(&only_a, &ab).unwrap();
        assert_eq!(done.removed.len(), 5, "{done:?}");
        assert_eq!(done.warnings.len(), 2, "{done:?}");
        assert!(
            done.warnings[0].contains("cluster b is not in context"),
            "{done:?}"
        );
        let left = std::fs::read_dir(dir.path().join("a/peers"))
            .unwrap()
            .count();
        assert_eq!(left, 0);
        let bundle =
            certs::TrustBundle::load(&dir.path().join("a/certs/trust-bundle.crt")).unwrap();
        assert_eq!(bundle.len(), 1);
    }
}
