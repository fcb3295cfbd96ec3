//! A peer's store as its peer file ([`model::peerfile`]) describes it: the content parsed,
//! the TLS files it names found, and a validated [`ClientConfig`] built from it. Every error
//! names the peer file.

use std::path::{Path, PathBuf};
use std::time::Duration;

use model::{ClusterName, PeerFile};

use super::{ClientConfig, ConfigError, Limits, TlsFiles};

/// Keys per page when listing a peer's store: a peer publishes a whole cluster, so pages are
/// larger than the client's default.
pub const PEER_LIST_PAGE_SIZE: u32 = 5000;

/// A peer file that cannot be used; each variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum PeerFileError {
    /// The content is not a usable peer file.
    #[error("peer file {path}: {source}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What the format refuses.
        source: model::PeerFileError,
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

/// Reads the peer file at `path` (`bytes` is its content) for peer `name`. Relative TLS
/// paths are resolved against `dir`. The client gets `request_timeout` for each request and
/// lists [`PEER_LIST_PAGE_SIZE`] keys per page.
pub fn parse_peer_file(
    name: &ClusterName,
    path: &Path,
    bytes: &[u8],
    dir: &Path,
    request_timeout: Duration,
) -> Result<PeerConfig, PeerFileError> {
    let file = PeerFile::parse(bytes)
        .map_err(|source| PeerFileError::Format {
            path: path.to_path_buf(),
            source,
        })?
        .resolve(dir);
    for (field, file) in [
        ("trusted-ca-file", &file.trusted_ca_file),
        ("cert-file", &file.cert_file),
        ("key-file", &file.key_file),
    ] {
        if let Some(file) = file
            && let Err(source) = std::fs::metadata(file)
        {
            return Err(PeerFileError::Unreadable {
                path: path.to_path_buf(),
                field,
                file: file.clone(),
                source,
            });
        }
    }
    let tls = file.trusted_ca_file.map(|ca| TlsFiles {
        ca,
        cert: file.cert_file,
        key: file.key_file,
    });
    let client = ClientConfig {
        endpoints: file.endpoints,
        tls,
        request_timeout,
        limits: Limits {
            list_page_size: PEER_LIST_PAGE_SIZE,
            ..Limits::default()
        },
        ..ClientConfig::default()
    };
    client.validate().map_err(|source| PeerFileError::Client {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(PeerConfig {
        name: name.clone(),
        client,
        unknown_keys: file.unknown_keys,
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
        assert_eq!(peer.client.limits.list_page_size, PEER_LIST_PAGE_SIZE);
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
                "endpoints: [\"https://a:1\"]\ntrusted-ca-file: ca.crt\ncert-file: c.crt\n\
                 key-file: c.key\n",
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
