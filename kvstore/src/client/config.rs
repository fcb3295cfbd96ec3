//! Client configuration: endpoints, TLS files, timeouts and limits, validated before any
//! connection is made.

use std::path::{Path, PathBuf};
use std::time::Duration;

use etcd_client::{Certificate, ConnectOptions, Identity, TlsOptions};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use super::error::ConfigError;

/// Files for a TLS (optionally mutual TLS) connection, all PEM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The CA bundle that signs the server certificate; it may hold several CAs (for
    /// example during a CA rotation).
    pub ca: PathBuf,
    /// The client certificate (chain), for mutual TLS. Requires `key`.
    pub cert: Option<PathBuf>,
    /// The client certificate's private key. Requires `cert`.
    pub key: Option<PathBuf>,
}

/// Sizes that bound what one request carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Keys per range request when listing a prefix.
    pub list_page_size: u32,
    /// Operations per transaction in a batch (etcd's default `--max-txn-ops` is 128).
    pub txn_max_ops: usize,
    /// Approximate bytes (keys + values) per transaction in a batch; etcd refuses requests
    /// over `--max-request-bytes` (1.5 MiB by default). A single larger operation is sent
    /// alone.
    pub txn_max_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            list_page_size: 1000,
            txn_max_ops: 128,
            txn_max_bytes: 1024 * 1024,
        }
    }
}

/// How to reach a store (a real etcd cluster or our embedded server).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientConfig {
    /// `http://host:port`, `https://host:port` or `host:port` (https when `tls` is set).
    pub endpoints: Vec<String>,
    /// TLS files; required for https endpoints.
    pub tls: Option<TlsFiles>,
    /// How long to wait for a TCP + TLS connection.
    pub connect_timeout: Duration,
    /// How long to wait for the answer to one unary request (and for a watch or lease
    /// keepalive stream to open).
    pub request_timeout: Duration,
    /// Request size limits.
    pub limits: Limits,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            endpoints: Vec::new(),
            tls: None,
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(15),
            limits: Limits::default(),
        }
    }
}

/// HTTP/2 keepalive: detects dead connections under open watches. etcd refuses pings more
/// often than every 5 s and pings without open streams, so ping every 10 s and only while
/// streams are open.
const HTTP2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const HTTP2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);

/// A validated configuration, ready to hand to `etcd_client`.
pub(crate) struct Prepared {
    pub endpoints: Vec<String>,
    pub options: ConnectOptions,
    /// Each endpoint gets a channel of its own, built here rather than by `etcd_client`,
    /// whose balanced channel holds a request while its only endpoint is down instead of
    /// failing it, so the request could not move on to another member.
    pub channels: Vec<tonic::transport::Endpoint>,
}

impl ClientConfig {
    /// A configuration for these endpoints with default timeouts, no TLS.
    pub fn new<S: Into<String>>(endpoints: impl IntoIterator<Item = S>) -> Self {
        ClientConfig {
            endpoints: endpoints.into_iter().map(Into::into).collect(),
            ..ClientConfig::default()
        }
    }

    /// The same configuration with TLS files.
    pub fn with_tls(mut self, tls: TlsFiles) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Checks the configuration, including that the TLS files exist and hold PEM data,
    /// without connecting. The error names the offending field (and file).
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.prepare().map(|_| ())
    }

    /// Validates and builds the endpoint list and the `etcd_client` options.
    pub(crate) fn prepare(&self) -> Result<Prepared, ConfigError> {
        if self.connect_timeout.is_zero() {
            return Err(ConfigError::Zero {
                field: "connect_timeout",
            });
        }
        if self.request_timeout.is_zero() {
            return Err(ConfigError::Zero {
                field: "request_timeout",
            });
        }
        if self.limits.list_page_size == 0 {
            return Err(ConfigError::Zero {
                field: "limits.list_page_size",
            });
        }
        if self.limits.txn_max_ops == 0 {
            return Err(ConfigError::Zero {
                field: "limits.txn_max_ops",
            });
        }
        if self.limits.txn_max_bytes == 0 {
            return Err(ConfigError::Zero {
                field: "limits.txn_max_bytes",
            });
        }
        let endpoints = normalize_endpoints(&self.endpoints, self.tls.is_some())?;
        let tls = self.tls.as_ref().map(load_tls).transpose()?;
        let mut options = ConnectOptions::new()
            .with_connect_timeout(self.connect_timeout)
            .with_keep_alive(HTTP2_KEEPALIVE_INTERVAL, HTTP2_KEEPALIVE_TIMEOUT)
            .with_keep_alive_while_idle(false)
            .with_require_leader(true);
        if let Some(tls) = &tls {
            options = options.with_tls(tls.clone());
        }
        let channels = endpoints
            .iter()
            .map(|url| {
                let invalid = |reason| ConfigError::InvalidEndpoint {
                    endpoint: url.clone(),
                    reason,
                };
                let mut channel = tonic::transport::Endpoint::from_shared(url.clone())
                    .map_err(|_| invalid("it is not a valid URI"))?
                    .connect_timeout(self.connect_timeout)
                    .http2_keep_alive_interval(HTTP2_KEEPALIVE_INTERVAL)
                    .keep_alive_timeout(HTTP2_KEEPALIVE_TIMEOUT)
                    .keep_alive_while_idle(false);
                if let Some(tls) = &tls {
                    channel = channel
                        .tls_config(tls.clone())
                        .map_err(|_| invalid("TLS does not apply to it"))?;
                }
                Ok(channel)
            })
            .collect::<Result<_, ConfigError>>()?;
        Ok(Prepared {
            endpoints,
            options,
            channels,
        })
    }
}

/// Checks every endpoint and gives each an explicit scheme.
pub(crate) fn normalize_endpoints(
    endpoints: &[String],
    tls: bool,
) -> Result<Vec<String>, ConfigError> {
    if endpoints.is_empty() {
        return Err(ConfigError::NoEndpoints);
    }
    endpoints
        .iter()
        .map(|endpoint| normalize_endpoint(endpoint, tls))
        .collect()
}

fn normalize_endpoint(endpoint: &str, tls: bool) -> Result<String, ConfigError> {
    let invalid = |reason| ConfigError::InvalidEndpoint {
        endpoint: endpoint.to_owned(),
        reason,
    };
    let (scheme, rest) = match endpoint.split_once("://") {
        Some((scheme, rest)) => (Some(scheme), rest),
        None => (None, endpoint),
    };
    let https = match scheme {
        Some("https") => true,
        Some("http") => false,
        Some(_) => return Err(invalid("the scheme must be http or https")),
        None => tls,
    };
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    if authority.is_empty() {
        return Err(invalid("the host is missing"));
    }
    if authority.contains('/') {
        return Err(invalid("an endpoint has no path"));
    }
    if authority
        .chars()
        .any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(invalid("it contains whitespace"));
    }
    if authority.contains('@') {
        return Err(invalid("credentials in the URL are not supported"));
    }
    let port = if let Some(bracketed) = authority.strip_prefix('[') {
        let Some((host, after)) = bracketed.split_once(']') else {
            return Err(invalid("an IPv6 address misses its closing bracket"));
        };
        if host.is_empty() {
            return Err(invalid("the host is missing"));
        }
        match after {
            "" => None,
            after => match after.strip_prefix(':') {
                Some(port) => Some(port),
                None => return Err(invalid("junk after the IPv6 address")),
            },
        }
    } else {
        match authority.split(':').count() {
            1 => None,
            2 => {
                let (host, port) = authority.split_once(':').unwrap_or_default();
                if host.is_empty() {
                    return Err(invalid("the host is missing"));
                }
                Some(port)
            }
            _ => return Err(invalid("IPv6 addresses must be in brackets")),
        }
    };
    if let Some(port) = port
        && port.parse::<u16>().is_err()
    {
        return Err(invalid("the port must be a number from 0 to 65535"));
    }
    if https && !tls {
        return Err(ConfigError::TlsRequired {
            endpoint: endpoint.to_owned(),
        });
    }
    if !https && tls {
        return Err(ConfigError::PlainEndpointWithTls {
            endpoint: endpoint.to_owned(),
        });
    }
    let scheme = if https { "https" } else { "http" };
    Ok(format!("{scheme}://{authority}"))
}

fn read_file(field: &'static str, path: &Path) -> Result<Vec<u8>, ConfigError> {
    std::fs::read(path).map_err(|source| ConfigError::ReadFile {
        field,
        path: path.to_owned(),
        source,
    })
}

fn check_certificates(field: &'static str, path: &Path, pem: &[u8]) -> Result<(), ConfigError> {
    let mut count = 0usize;
    for cert in CertificateDer::pem_slice_iter(pem) {
        if let Err(err) = cert {
            return Err(ConfigError::InvalidPem {
                field,
                path: path.to_owned(),
                problem: format!("holds malformed PEM: {err}"),
            });
        }
        count += 1;
    }
    if count == 0 {
        return Err(ConfigError::InvalidPem {
            field,
            path: path.to_owned(),
            problem: "holds no PEM certificate".to_owned(),
        });
    }
    Ok(())
}

/// Reads and checks the TLS files.
pub(crate) fn load_tls(tls: &TlsFiles) -> Result<TlsOptions, ConfigError> {
    let ca = read_file("tls.ca", &tls.ca)?;
    check_certificates("tls.ca", &tls.ca, &ca)?;
    let mut options = TlsOptions::new().ca_certificate(Certificate::from_pem(ca));
    match (&tls.cert, &tls.key) {
        (None, None) => {}
        (Some(_), None) => return Err(ConfigError::IncompleteIdentity { missing: "key" }),
        (None, Some(_)) => return Err(ConfigError::IncompleteIdentity { missing: "cert" }),
        (Some(cert_path), Some(key_path)) => {
            let cert = read_file("tls.cert", cert_path)?;
            check_certificates("tls.cert", cert_path, &cert)?;
            let key = read_file("tls.key", key_path)?;
            if let Err(err) = PrivateKeyDer::from_pem_slice(&key) {
                return Err(ConfigError::InvalidPem {
                    field: "tls.key",
                    path: key_path.clone(),
                    problem: format!("holds no usable PEM private key: {err}"),
                });
            }
            options = options.identity(Identity::from_pem(cert, key));
        }
    }
    Ok(options)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(endpoints: &[&str], tls: bool) -> Result<Vec<String>, ConfigError> {
        let endpoints: Vec<String> = endpoints.iter().map(|e| e.to_string()).collect();
        normalize_endpoints(&endpoints, tls)
    }

    #[test]
    fn endpoints_get_a_scheme() {
        assert_eq!(
            norm(&["127.0.0.1:2379", "http://10.0.0.1:2379/"], false).unwrap(),
            vec!["http://127.0.0.1:2379", "http://10.0.0.1:2379"]
        );
        assert_eq!(
            norm(&["localhost:2379", "https://[::1]:2379"], true).unwrap(),
            vec!["https://localhost:2379", "https://[::1]:2379"]
        );
    }

    #[test]
    fn bad_endpoints_are_named() {
        assert!(matches!(norm(&[], false), Err(ConfigError::NoEndpoints)));
        for bad in [
            "ftp://x:1",
            "http://",
            "http://a:1/path",
            "a b:1",
            "host:port",
            "::1:2379",
        ] {
            match norm(&[bad], false) {
                Err(ConfigError::InvalidEndpoint { endpoint, .. }) => assert_eq!(endpoint, bad),
                other => panic!("{bad}: {other:?}"),
            }
        }
        assert!(matches!(
            norm(&["https://a:1"], false),
            Err(ConfigError::TlsRequired { .. })
        ));
        assert!(matches!(
            norm(&["http://a:1"], true),
            Err(ConfigError::PlainEndpointWithTls { .. })
        ));
    }

    #[test]
    fn zero_timeouts_and_limits_are_refused() {
        let mut config = ClientConfig::new(["127.0.0.1:2379"]);
        config.request_timeout = Duration::ZERO;
        let err = config.validate().unwrap_err();
        assert!(err.to_string().contains("request_timeout"), "{err}");
        let mut config = ClientConfig::new(["127.0.0.1:2379"]);
        config.limits.txn_max_ops = 0;
        let err = config.validate().unwrap_err();
        assert!(err.to_string().contains("limits.txn_max_ops"), "{err}");
    }

    #[test]
    fn missing_tls_file_is_named() {
        let config = ClientConfig::new(["https://127.0.0.1:2379"]).with_tls(TlsFiles {
            ca: PathBuf::from("/nonexistent/ca.pem"),
            cert: None,
            key: None,
        });
        let err = config.validate().unwrap_err();
        assert!(matches!(
            err,
            ConfigError::ReadFile {
                field: "tls.ca",
                ..
            }
        ));
        let text = err.to_string();
        assert!(
            text.contains("tls.ca") && text.contains("/nonexistent/ca.pem"),
            "{text}"
        );
    }

    #[test]
    fn file_without_certificate_is_refused() {
        let dir = std::env::temp_dir().join(format!("kvstore-client-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca = dir.join("ca.pem");
        std::fs::write(&ca, b"not a certificate\n").unwrap();
        let config = ClientConfig::new(["127.0.0.1:2379"]).with_tls(TlsFiles {
            ca: ca.clone(),
            cert: None,
            key: None,
        });
        let err = config.validate().unwrap_err();
        assert!(
            matches!(&err, ConfigError::InvalidPem { field: "tls.ca", path, .. } if *path == ca),
            "{err:?}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn cert_without_key_is_refused() {
        let dir = std::env::temp_dir().join(format!("kvstore-client-id-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca = dir.join("ca.pem");
        // A syntactically valid PEM block is enough for the CA check.
        std::fs::write(
            &ca,
            b"-----BEGIN CERTIFICATE-----\nMAA=\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let config = ClientConfig::new(["127.0.0.1:2379"]).with_tls(TlsFiles {
            ca,
            cert: Some(dir.join("client.pem")),
            key: None,
        });
        let err = config.validate().unwrap_err();
        assert!(
            matches!(err, ConfigError::IncompleteIdentity { missing: "key" }),
            "{err:?}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
