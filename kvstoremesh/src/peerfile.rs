//! Peer files: one file per peer cluster in the peers directory, named after the peer, in the
//! etcd client-config YAML Cilium users know:
//!
//! ```yaml
//! endpoints:
//! - https://clustermesh-apiserver.eu-2.example:2379
//! trusted-ca-file: /var/lib/kvstoremesh/eu-2/ca.crt
//! cert-file: /var/lib/kvstoremesh/eu-2/tls.crt
//! key-file: /var/lib/kvstoremesh/eu-2/tls.key
//! ```
//!
//! TLS keys may be absent for plain `http://` endpoints. Relative paths are relative to the
//! peers directory. Unknown keys are reported (a typo must not silently drop TLS) but do not
//! make the file unusable.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use kvstore::client::{ClientConfig, ConfigError, Limits, TlsFiles};
use model::ClusterName;
use serde::Deserialize;

/// A peer file that cannot be used; each variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum PeerFileError {
    /// The file is not YAML of the expected shape.
    #[error("peer file {path}: not a valid etcd client config: {source}")]
    Yaml {
        /// The file.
        path: PathBuf,
        /// The parser's complaint, with its position.
        source: serde_yaml_ng::Error,
    },
    /// No `endpoints:` (or an empty list).
    #[error("peer file {path}: endpoints: at least one endpoint URL is required")]
    NoEndpoints {
        /// The file.
        path: PathBuf,
    },
    /// `cert-file` without `key-file`, or the other way round.
    #[error(
        "peer file {path}: {present} is set but {missing} is not; a client certificate needs both"
    )]
    IncompleteIdentity {
        /// The file.
        path: PathBuf,
        /// The key that is set.
        present: &'static str,
        /// The key that is missing.
        missing: &'static str,
    },
    /// A client certificate without `trusted-ca-file`: the server could not be verified.
    #[error(
        "peer file {path}: cert-file and key-file need trusted-ca-file (the CA that signs the \
         peer's server certificate)"
    )]
    MissingCa {
        /// The file.
        path: PathBuf,
    },
    /// A file named by `trusted-ca-file`, `cert-file` or `key-file` cannot be read.
    #[error("peer file {path}: {field} {file}: {source}")]
    Unreadable {
        /// The peer file.
        path: PathBuf,
        /// The YAML key naming the unreadable file.
        field: &'static str,
        /// The unreadable file.
        file: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The client configuration built from the file is refused (a bad endpoint URL, PEM
    /// files that hold no certificate or key, https without a CA, ...).
    #[error("peer file {path}: {source}")]
    Client {
        /// The file.
        path: PathBuf,
        /// What the store client refused; `tls.ca`, `tls.cert`, `tls.key` are
        /// `trusted-ca-file`, `cert-file`, `key-file`.
        source: ConfigError,
    },
}

/// A usable peer: its name and how to reach its store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerConfig {
    /// The peer cluster's name (the file's name).
    pub name: ClusterName,
    /// How to reach the peer's store, read-only as `remote-<local cluster>`.
    pub client: ClientConfig,
    /// Keys of the file this build does not know, ignored.
    pub unknown_keys: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct RawPeerFile {
    #[serde(default)]
    endpoints: Vec<String>,
    trusted_ca_file: Option<PathBuf>,
    cert_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
    #[serde(flatten)]
    other: BTreeMap<String, serde_yaml_ng::Value>,
}

/// Reads the peer file at `path` (`bytes` is its content) for peer `name`. Relative TLS
/// paths are resolved against `dir`. The client gets `request_timeout` for each request.
pub fn parse_peer_file(
    name: &ClusterName,
    path: &Path,
    bytes: &[u8],
    dir: &Path,
    request_timeout: Duration,
) -> Result<PeerConfig, PeerFileError> {
    let path_buf = || path.to_path_buf();
    let raw: RawPeerFile = if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(PeerFileError::NoEndpoints { path: path_buf() });
    } else {
        serde_yaml_ng::from_slice(bytes).map_err(|source| PeerFileError::Yaml {
            path: path_buf(),
            source,
        })?
    };
    let endpoints: Vec<String> = raw
        .endpoints
        .iter()
        .map(|e| e.trim().to_owned())
        .filter(|e| !e.is_empty())
        .collect();
    if endpoints.is_empty() {
        return Err(PeerFileError::NoEndpoints { path: path_buf() });
    }
    let resolve = |p: PathBuf| if p.is_relative() { dir.join(p) } else { p };
    let ca = raw.trusted_ca_file.map(resolve);
    let cert = raw.cert_file.map(resolve);
    let key = raw.key_file.map(resolve);
    match (&cert, &key) {
        (Some(_), None) => {
            return Err(PeerFileError::IncompleteIdentity {
                path: path_buf(),
                present: "cert-file",
                missing: "key-file",
            });
        }
        (None, Some(_)) => {
            return Err(PeerFileError::IncompleteIdentity {
                path: path_buf(),
                present: "key-file",
                missing: "cert-file",
            });
        }
        _ => {}
    }
    for (field, file) in [
        ("trusted-ca-file", &ca),
        ("cert-file", &cert),
        ("key-file", &key),
    ] {
        if let Some(file) = file
            && let Err(source) = std::fs::metadata(file)
        {
            return Err(PeerFileError::Unreadable {
                path: path_buf(),
                field,
                file: file.clone(),
                source,
            });
        }
    }
    let tls = match ca {
        Some(ca) => Some(TlsFiles { ca, cert, key }),
        None if cert.is_some() => return Err(PeerFileError::MissingCa { path: path_buf() }),
        None => None,
    };
    let client = ClientConfig {
        endpoints,
        tls,
        request_timeout,
        limits: Limits {
            list_page_size: crate::LIST_PAGE_SIZE,
            ..Limits::default()
        },
        ..ClientConfig::default()
    };
    client.validate().map_err(|source| PeerFileError::Client {
        path: path_buf(),
        source,
    })?;
    Ok(PeerConfig {
        name: name.clone(),
        client,
        unknown_keys: raw.other.into_keys().collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(dir: &Path, text: &str) -> Result<PeerConfig, PeerFileError> {
        parse_peer_file(
            &ClusterName::new("b").unwrap(),
            &dir.join("b"),
            text.as_bytes(),
            dir,
            Duration::from_secs(5),
        )
    }

    const PEM_CERT: &str = "-----BEGIN CERTIFICATE-----\nMAA=\n-----END CERTIFICATE-----\n";

    #[test]
    fn plain_endpoints() {
        let dir = tempfile::tempdir().unwrap();
        let peer = parse(
            dir.path(),
            "endpoints:\n- http://127.0.0.1:2379\n- 10.0.0.1:2379\nfoo: 1\n",
        )
        .unwrap();
        assert_eq!(peer.name, "b");
        assert_eq!(
            peer.client.endpoints,
            vec!["http://127.0.0.1:2379", "10.0.0.1:2379"]
        );
        assert!(peer.client.tls.is_none());
        assert_eq!(peer.client.request_timeout, Duration::from_secs(5));
        assert_eq!(peer.unknown_keys, vec!["foo"]);
    }

    #[test]
    fn tls_paths_resolve_against_the_directory() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.crt"), PEM_CERT).unwrap();
        let peer = parse(
            dir.path(),
            "endpoints: [\"https://127.0.0.1:2379\"]\ntrusted-ca-file: ca.crt\n",
        )
        .unwrap();
        let tls = peer.client.tls.unwrap();
        assert_eq!(tls.ca, dir.path().join("ca.crt"));
        assert!(tls.cert.is_none() && tls.key.is_none());
    }

    #[test]
    fn refusals_name_the_file_and_key() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.crt"), PEM_CERT).unwrap();
        let cases = [
            ("", "endpoints: at least one"),
            ("endpoints: []\n", "endpoints: at least one"),
            ("endpoints: http://a:1\n", "not a valid etcd client config"),
            ("- a\n- b\n", "not a valid etcd client config"),
            (
                "endpoints: [\"http://a:1\"]\ncert-file: c.crt\n",
                "cert-file is set but key-file is not",
            ),
            (
                "endpoints: [\"http://a:1\"]\ncert-file: c.crt\nkey-file: c.key\n",
                "cert-file",
            ),
            (
                "endpoints: [\"https://a:1\"]\ntrusted-ca-file: missing.crt\n",
                "trusted-ca-file",
            ),
            ("endpoints: [\"https://a:1\"]\n", "tls"),
            ("endpoints: [\"ftp://a:1\"]\n", "ftp://a:1"),
        ];
        for (text, expected) in cases {
            let err = parse(dir.path(), text).unwrap_err().to_string();
            assert!(err.contains(expected), "{text:?}: {err}");
            assert!(
                err.contains(&dir.path().join("b").display().to_string()),
                "{err}"
            );
        }
    }
}
