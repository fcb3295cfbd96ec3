//! Peer files: one file per peer cluster in a peers directory, named after the peer, in the
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
//! TLS keys may be absent for plain `http://` endpoints; a client certificate needs both
//! `cert-file` and `key-file`, and `trusted-ca-file` to verify the server it is shown to.
//! Relative paths are relative to the peers directory ([`PeerFile::resolve`]). Unknown keys
//! are reported (a typo must not silently drop TLS) but do not make the file unusable.
//!
//! Only the format lives here: whether the named files exist and the endpoints work is for
//! the store client that reads them.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Content that is not a usable peer file. The messages name the YAML keys, not the file:
/// the reader knows which file it read.
#[derive(Debug, thiserror::Error)]
pub enum PeerFileError {
    /// Not YAML of the expected shape.
    #[error("not a valid etcd client config: {source}")]
    Yaml {
        /// The parser's complaint, with its position.
        source: serde_yaml_ng::Error,
    },
    /// No `endpoints:` (or an empty list, or only blank entries).
    #[error("endpoints: at least one endpoint URL is required")]
    NoEndpoints,
    /// `cert-file` without `key-file`, or the other way round.
    #[error("{present} is set but {missing} is not; a client certificate needs both")]
    IncompleteIdentity {
        /// The key that is set.
        present: &'static str,
        /// The key that is missing.
        missing: &'static str,
    },
    /// A client certificate without `trusted-ca-file`: the server could not be verified.
    #[error(
        "cert-file and key-file need trusted-ca-file (the CA that signs the peer's server \
         certificate)"
    )]
    MissingCa,
}

/// A peer file's content: how to reach one peer's store.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerFile {
    /// The store's endpoints (`https://host:port`, `http://host:port` or `host:port`),
    /// trimmed, never empty.
    pub endpoints: Vec<String>,
    /// `trusted-ca-file`: the CA bundle that signs the store's server certificate.
    pub trusted_ca_file: Option<PathBuf>,
    /// `cert-file`: the client certificate; set exactly when `key_file` is.
    pub cert_file: Option<PathBuf>,
    /// `key-file`: the client certificate's private key.
    pub key_file: Option<PathBuf>,
    /// Keys this build does not know, ignored; sorted.
    pub unknown_keys: Vec<String>,
}

/// The YAML as written; unknown keys are collected rather than refused.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) struct RawPeerFile {
    #[serde(default)]
    endpoints: Vec<String>,
    trusted_ca_file: Option<PathBuf>,
    cert_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
    #[serde(flatten)]
    other: BTreeMap<String, serde_yaml_ng::Value>,
}

/// What [`PeerFile::to_yaml`] writes: the known keys only.
#[derive(Serialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) struct PeerFileOut<'a> {
    endpoints: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    trusted_ca_file: Option<Cow<'a, str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cert_file: Option<Cow<'a, str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    key_file: Option<Cow<'a, str>>,
}

impl PeerFile {
    /// Parses a peer file's content, refusing one that could not reach or trust a store:
    /// no endpoint, half a client identity, or a client identity without a CA.
    pub fn parse(bytes: &[u8]) -> Result<PeerFile, PeerFileError> {
        // An empty document is YAML's null, which would read as "no keys": name what is
        // missing instead.
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Err(PeerFileError::NoEndpoints);
        }
        let raw: RawPeerFile =
            serde_yaml_ng::from_slice(bytes).map_err(|source| PeerFileError::Yaml { source })?;
        PeerFile::from_raw(raw)
    }

    /// Checks what the YAML held (also for a peer file nested in a cluster context).
    pub(crate) fn from_raw(raw: RawPeerFile) -> Result<PeerFile, PeerFileError> {
        let endpoints: Vec<String> = raw
            .endpoints
            .iter()
            .map(|e| e.trim().to_owned())
            .filter(|e| !e.is_empty())
            .collect();
        if endpoints.is_empty() {
            return Err(PeerFileError::NoEndpoints);
        }
        match (&raw.cert_file, &raw.key_file) {
            (Some(_), None) => {
                return Err(PeerFileError::IncompleteIdentity {
                    present: "cert-file",
                    missing: "key-file",
                });
            }
            (None, Some(_)) => {
                return Err(PeerFileError::IncompleteIdentity {
                    present: "key-file",
                    missing: "cert-file",
                });
            }
            (Some(_), Some(_)) if raw.trusted_ca_file.is_none() => {
                return Err(PeerFileError::MissingCa);
            }
            _ => {}
        }
        Ok(PeerFile {
            endpoints,
            trusted_ca_file: raw.trusted_ca_file,
            cert_file: raw.cert_file,
            key_file: raw.key_file,
            unknown_keys: raw.other.into_keys().collect(),
        })
    }

    /// The same file with relative TLS paths resolved against `dir` (the peers directory).
    pub fn resolve(self, dir: &Path) -> PeerFile {
        let resolve = |p: Option<PathBuf>| p.map(|p| if p.is_relative() { dir.join(p) } else { p });
        PeerFile {
            trusted_ca_file: resolve(self.trusted_ca_file),
            cert_file: resolve(self.cert_file),
            key_file: resolve(self.key_file),
            ..self
        }
    }

    /// The file's YAML, known keys only (unknown keys are not carried over); what
    /// [`PeerFile::parse`] reads back.
    pub fn to_yaml(&self) -> String {
        // Strings only: serializing cannot fail.
        serde_yaml_ng::to_string(&self.out()).expect("peer files always serialize")
    }

    /// The known keys, as written.
    pub(crate) fn out(&self) -> PeerFileOut<'_> {
        // YAML is text: a path that is not UTF-8 (never one read by `parse`) is written
        // lossily rather than refused.
        fn text(path: &Option<PathBuf>) -> Option<Cow<'_, str>> {
            path.as_deref().map(Path::to_string_lossy)
        }
        PeerFileOut {
            endpoints: &self.endpoints,
            trusted_ca_file: text(&self.trusted_ca_file),
            cert_file: text(&self.cert_file),
            key_file: text(&self.key_file),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<PeerFile, PeerFileError> {
        PeerFile::parse(text.as_bytes())
    }

    #[test]
    fn plain_endpoints() {
        let file =
            parse("endpoints:\n- http://127.0.0.1:2379\n- ' 10.0.0.1:2379 '\n- ''\nfoo: 1\n")
                .unwrap();
        assert_eq!(
            file.endpoints,
            vec!["http://127.0.0.1:2379", "10.0.0.1:2379"]
        );
        assert!(file.trusted_ca_file.is_none() && file.cert_file.is_none());
        assert_eq!(file.unknown_keys, vec!["foo"]);
    }

    #[test]
    fn relative_paths_resolve_against_the_directory() {
        let file = parse(
            "endpoints: [\"https://a:1\"]\ntrusted-ca-file: ca.crt\ncert-file: /etc/tls.crt\n\
             key-file: keys/tls.key\n",
        )
        .unwrap()
        .resolve(Path::new("/peers"));
        assert_eq!(file.trusted_ca_file.unwrap(), Path::new("/peers/ca.crt"));
        assert_eq!(file.cert_file.unwrap(), Path::new("/etc/tls.crt"));
        assert_eq!(file.key_file.unwrap(), Path::new("/peers/keys/tls.key"));
    }

    #[test]
    fn refusals_name_the_key() {
        let cases = [
            ("", "endpoints: at least one"),
            ("  \n", "endpoints: at least one"),
            ("endpoints: []\n", "endpoints: at least one"),
            ("endpoints: ['  ']\n", "endpoints: at least one"),
            ("foo: 1\n", "endpoints: at least one"),
            ("endpoints: http://a:1\n", "not a valid etcd client config"),
            ("- a\n- b\n", "not a valid etcd client config"),
            (
                "endpoints: [http://a:1]\nendpoints: [http://b:1]\n",
                "not a valid",
            ),
            (
                "endpoints: [\"http://a:1\"]\ncert-file: c.crt\n",
                "cert-file is set but key-file is not",
            ),
            (
                "endpoints: [\"http://a:1\"]\nkey-file: c.key\n",
                "key-file is set but cert-file is not",
            ),
            (
                "endpoints: [\"http://a:1\"]\ncert-file: c.crt\nkey-file: c.key\n",
                "need trusted-ca-file",
            ),
        ];
        for (text, expected) in cases {
            let err = parse(text).unwrap_err().to_string();
            assert!(err.contains(expected), "{text:?}: {err}");
        }
    }

    #[test]
    fn the_builder_writes_what_the_parser_reads() {
        let files = [
            PeerFile {
                endpoints: vec!["http://127.0.0.1:2379".into()],
                ..PeerFile::default()
            },
            PeerFile {
                endpoints: vec!["https://a.example:2379".into(), "10.0.0.1:2379".into()],
                trusted_ca_file: Some("/peers/ca: odd name.crt".into()),
                cert_file: Some("tls.crt".into()),
                key_file: Some("tls.key".into()),
                unknown_keys: Vec::new(),
            },
        ];
        for file in files {
            let yaml = file.to_yaml();
            assert_eq!(PeerFile::parse(yaml.as_bytes()).unwrap(), file, "{yaml}");
        }
        let yaml = PeerFile {
            endpoints: vec!["https://a:1".into()],
            trusted_ca_file: Some("ca.crt".into()),
            ..PeerFile::default()
        }
        .to_yaml();
        assert_eq!(yaml, "endpoints:\n- https://a:1\ntrusted-ca-file: ca.crt\n");
    }
}
