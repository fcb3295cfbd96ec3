//! Reaching a cluster's daemons and stores, and naming precisely why one could not be
//! reached: the cause an operator acts on differs for a refused connection, a TLS failure, a
//! timeout or a missing file.

use std::path::PathBuf;
use std::time::Duration;

use kvstore::client::{ClientConfig, StoreClient, StoreStatus, TlsFiles};
use model::PeerFile;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Why something is not as it should be; the JSON spelling is part of `status -o json`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Cause {
    /// Nothing listens at the address (connection refused).
    ConnectionRefused,
    /// An established connection broke: the other side stopped or restarted.
    ConnectionLost,
    /// No answer in time.
    Timeout,
    /// The address does not resolve or the network is unreachable.
    Unreachable,
    /// The TLS handshake failed: a certificate is not trusted, expired, or for another name.
    Tls,
    /// The store refused the request for the user the certificate names.
    PermissionDenied,
    /// A file the configuration names is missing or unreadable.
    FileMissing,
    /// The peer's config was refused (its id clashes, or its max-connected-clusters or name
    /// differ).
    IdClash,
    /// The peer has not published its cluster config (its apiserver is not running or not
    /// ready).
    ConfigMissing,
    /// A peer file exists but the daemon has not picked it up yet.
    NotPickedUp,
    /// Connected, the first full sync is not complete yet.
    SyncInProgress,
    /// A daemon answers but is not ready.
    NotReady,
    /// The answer was not what the CLI understands.
    BadAnswer,
    /// Nodes whose agent does not have every peer synced.
    NodesNotConnected,
    /// A certificate that expired, is not valid yet, or expires soon.
    CertificateExpiry,
    /// A certificate not issued by the CA that should have issued it, or for another user.
    CertificateChain,
    /// Clocks differ between clusters.
    ClockSkew,
    /// Anything else; the message says what.
    Other,
}

impl Cause {
    /// The name, as spelled in JSON.
    pub fn name(self) -> &'static str {
        match self {
            Cause::ConnectionRefused => "connection_refused",
            Cause::ConnectionLost => "connection_lost",
            Cause::Timeout => "timeout",
            Cause::Unreachable => "unreachable",
            Cause::Tls => "tls",
            Cause::PermissionDenied => "permission_denied",
            Cause::FileMissing => "file_missing",
            Cause::IdClash => "id_clash",
            Cause::ConfigMissing => "config_missing",
            Cause::NotPickedUp => "not_picked_up",
            Cause::SyncInProgress => "sync_in_progress",
            Cause::NotReady => "not_ready",
            Cause::BadAnswer => "bad_answer",
            Cause::NodesNotConnected => "nodes_not_connected",
            Cause::CertificateExpiry => "certificate_expiry",
            Cause::CertificateChain => "certificate_chain",
            Cause::ClockSkew => "clock_skew",
            Cause::Other => "other",
        }
    }

    /// What to do about it.
    pub fn hint(self) -> &'static str {
        match self {
            Cause::ConnectionRefused => {
                "nothing listens there: start the daemon or store, or fix the address in the context"
            }
            Cause::ConnectionLost => {
                "the other side went away mid-connection (stopped, killed or restarted): check that it runs; the reader reconnects by itself"
            }
            Cause::Timeout => {
                "no answer in time: check that the process is not stopped and that no firewall drops the traffic"
            }
            Cause::Unreachable => "check the address and the network route to it",
            Cause::Tls => {
                "the TLS handshake failed: check that each side trusts the other's CA (re-run `clustermesh connect`), that certificates are valid, and that the server certificate covers the address used (`clustermesh enable --force` after changing endpoints)"
            }
            Cause::PermissionDenied => {
                "the store refused the user: check the certificate's CN and, on etcd, run `clustermesh store provision-auth` with the peer"
            }
            Cause::FileMissing => {
                "a file named in the configuration is missing: run `clustermesh enable` and `clustermesh connect` again"
            }
            Cause::IdClash => {
                "give every cluster a unique id and the same max-connected-clusters, then restart its daemons"
            }
            Cause::ConfigMissing => {
                "the peer publishes no cluster config: start (or fix) the peer's clustermesh-apiserver"
            }
            Cause::NotPickedUp => {
                "kvstoremesh has not read the peer file yet: wait a second, or check its --peers-dir is the context's peers-dir"
            }
            Cause::SyncInProgress => {
                "the first sync is running: wait (`clustermesh status --wait`)"
            }
            Cause::NotReady => "the daemon is starting or waiting for its store: see its log",
            Cause::BadAnswer => "the address may belong to another program: check the context",
            Cause::NodesNotConnected => {
                "see the agents' peers with `clustermesh agent peers` and their logs"
            }
            Cause::CertificateExpiry => {
                "reissue the certificates: `clustermesh enable --force --cluster <name>`"
            }
            Cause::CertificateChain => {
                "the certificates do not belong together: `clustermesh enable --force --cluster <name>`, then `clustermesh connect` again"
            }
            Cause::ClockSkew => "synchronise the clocks (NTP) of the clusters' machines",
            Cause::Other => "see the message",
        }
    }

    /// The cause named by an error's text (an error chain, or a status's `last_error`).
    pub fn of_text(text: &str) -> Cause {
        let t = text.to_ascii_lowercase();
        if t.contains("no such file") || t.contains("cannot read") {
            Cause::FileMissing
        } else if t.contains("has not published") {
            Cause::ConfigMissing
        } else if t.contains("peer refused")
            || t.contains("already uses")
            || t.contains("cluster config is refused")
        {
            Cause::IdClash
        } else if [
            "close_notify",
            "unexpectedeof",
            "connection reset",
            "broken pipe",
            "error reading a body",
        ]
        .iter()
        .any(|w| t.contains(w))
        {
            // Before the TLS words: a TLS stream that ends abruptly names TLS, but nothing
            // about certificates is wrong.
            Cause::ConnectionLost
        } else if [
            "certificate",
            "unknownissuer",
            "unknownca",
            "fatal alert",
            "tls",
            "handshake",
            "badsignature",
            "notvalidforname",
        ]
        .iter()
        .any(|w| t.contains(w))
        {
            Cause::Tls
        } else if t.contains("permission denied") {
            Cause::PermissionDenied
        } else if t.contains("connection refused") {
            Cause::ConnectionRefused
        } else if t.contains("timed out") || t.contains("deadline") || t.contains("timeout") {
            Cause::Timeout
        } else if t.contains("unreachable")
            || t.contains("resolve")
            || t.contains("dns error")
            || t.contains("unavailable")
        {
            Cause::Unreachable
        } else {
            Cause::Other
        }
    }
}

/// An answer of a daemon's HTTP server.
#[derive(Debug, Clone)]
pub struct HttpAnswer {
    /// The status code.
    pub status: u16,
    /// The body.
    pub body: Vec<u8>,
}

/// Why an HTTP request failed.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// A URL the CLI cannot fetch.
    #[error("{url:?}: {reason}")]
    Url {
        /// The URL.
        url: String,
        /// Why not.
        reason: &'static str,
    },
    /// Connecting, sending or reading failed.
    #[error("{url}: {source}")]
    Io {
        /// The URL.
        url: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// No answer in time.
    #[error("{url}: timed out after {after:?}")]
    Timeout {
        /// The URL.
        url: String,
        /// How long the CLI waited.
        after: Duration,
    },
    /// Not an HTTP answer.
    #[error("{url}: the answer is not HTTP")]
    Malformed {
        /// The URL.
        url: String,
    },
}

impl HttpError {
    /// The cause an operator acts on.
    pub fn cause(&self) -> Cause {
        match self {
            HttpError::Url { .. } | HttpError::Malformed { .. } => Cause::BadAnswer,
            HttpError::Timeout { .. } => Cause::Timeout,
            HttpError::Io { source, .. } => match source.kind() {
                std::io::ErrorKind::ConnectionRefused => Cause::ConnectionRefused,
                std::io::ErrorKind::TimedOut => Cause::Timeout,
                _ => Cause::Unreachable,
            },
        }
    }
}

/// `GET base + path` over plain HTTP/1.0 (the daemons' health servers), bounded by `timeout`.
pub async fn http_get(base: &str, path: &str, timeout: Duration) -> Result<HttpAnswer, HttpError> {
    let url = format!("{}{path}", base.trim_end_matches('/'));
    let Some(rest) = base.strip_prefix("http://") else {
        return Err(HttpError::Url {
            url,
            reason: "only http:// health URLs are supported",
        });
    };
    let authority = rest.split('/').next().unwrap_or(rest).to_owned();
    let io = |url: &str| {
        let url = url.to_owned();
        move |source| HttpError::Io { url, source }
    };
    let request = async {
        let mut stream = TcpStream::connect(authority.as_str())
            .await
            .map_err(io(&url))?;
        stream
            .write_all(
                format!(
                    "GET {path} HTTP/1.0\r\nHost: {authority}\r\nAccept: application/json\r\n\r\n"
                )
                .as_bytes(),
            )
            .await
            .map_err(io(&url))?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await.map_err(io(&url))?;
        Ok(response)
    };
    let response =
        tokio::time::timeout(timeout, request)
            .await
            .map_err(|_| HttpError::Timeout {
                url: url.clone(),
                after: timeout,
            })??;
    parse_response(&response).ok_or(HttpError::Malformed { url })
}

fn parse_response(response: &[u8]) -> Option<HttpAnswer> {
    let split = response.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&response[..split]).ok()?;
    let mut words = head.split_whitespace();
    if !words.next()?.starts_with("HTTP/") {
        return None;
    }
    let status = words.next()?.parse().ok()?;
    Some(HttpAnswer {
        status,
        body: response[split + 4..].to_vec(),
    })
}

/// A store's status, or why it could not be had, with the cause.
#[derive(Debug, Clone)]
pub struct StoreProbe {
    /// The status, when the store answered.
    pub status: Option<StoreStatus>,
    /// The error chain otherwise.
    pub error: Option<(Cause, String)>,
}

/// The client configuration for a store described as a peer file (absolute paths).
pub fn client_config(store: &PeerFile, timeout: Duration) -> ClientConfig {
    let mut config = ClientConfig::new(store.endpoints.iter().cloned());
    config.connect_timeout = timeout;
    config.request_timeout = timeout;
    if let Some(ca) = &store.trusted_ca_file {
        config = config.with_tls(TlsFiles {
            ca: ca.clone(),
            cert: store.cert_file.clone(),
            key: store.key_file.clone(),
        });
    }
    config
}

/// Connects to a store and asks for its status.
pub async fn store_status(
    store: &PeerFile,
    timeout: Duration,
) -> (Option<StoreClient>, StoreProbe) {
    let config = client_config(store, timeout);
    let fail = |e: &(dyn std::error::Error + 'static)| {
        let text = model::error_chain(e);
        StoreProbe {
            status: None,
            error: Some((Cause::of_text(&text), text)),
        }
    };
    if let Err(e) = config.validate() {
        return (None, fail(&e));
    }
    let client = match tokio::time::timeout(timeout * 2, StoreClient::connect(&config)).await {
        Ok(Ok(client)) => client,
        Ok(Err(e)) => return (None, fail(&e)),
        Err(_) => {
            return (
                None,
                StoreProbe {
                    status: None,
                    error: Some((
                        Cause::Timeout,
                        format!("connecting to {} timed out", store.endpoints.join(",")),
                    )),
                },
            );
        }
    };
    match client.status().await {
        Ok(status) => (
            Some(client),
            StoreProbe {
                status: Some(status),
                error: None,
            },
        ),
        Err(e) => (None, fail(&e)),
    }
}

/// The files a peer file names that do not exist.
pub fn missing_files(store: &PeerFile) -> Vec<PathBuf> {
    [&store.trusted_ca_file, &store.cert_file, &store.key_file]
        .into_iter()
        .flatten()
        .filter(|p| !p.exists())
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [Cause; 18] = [
        Cause::ConnectionRefused,
        Cause::ConnectionLost,
        Cause::Timeout,
        Cause::Unreachable,
        Cause::Tls,
        Cause::PermissionDenied,
        Cause::FileMissing,
        Cause::IdClash,
        Cause::ConfigMissing,
        Cause::NotPickedUp,
        Cause::SyncInProgress,
        Cause::NotReady,
        Cause::BadAnswer,
        Cause::NodesNotConnected,
        Cause::CertificateExpiry,
        Cause::CertificateChain,
        Cause::ClockSkew,
        Cause::Other,
    ];

    #[test]
    fn causes_are_told_apart() {
        let cases = [
            (
                // What kvstoremesh said when the peer's store was killed under an open watch.
                "reading the peer's store: store at https://10.254.0.1:44935 unavailable during \
                 watch: grpc request error: code: 'Unknown error', message: \"h2 protocol error: \
                 error reading a body from connection\", source: hyper::Error(Body, Error { kind: \
                 Io(Custom { kind: UnexpectedEof, error: \"peer closed connection without \
                 sending TLS close_notify\" }) })",
                Cause::ConnectionLost,
            ),
            (
                "reading the peer's store: store at https://127.0.0.1:1 unavailable during \
                 status: transport error: invalid peer certificate: UnknownIssuer",
                Cause::Tls,
            ),
            (
                "status: transport error: hyper::Error(Io, Custom { kind: InvalidData, error: \
                 \"received fatal alert: UnknownCA\" })",
                Cause::Tls,
            ),
            (
                "store unavailable: tcp connect error: Connection refused (os error 111)",
                Cause::ConnectionRefused,
            ),
            ("status on store at x timed out after 2s", Cause::Timeout),
            (
                "peer refused: peer b uses cluster id 1, which is a's own",
                Cause::IdClash,
            ),
            (
                "peer b uses cluster id 3, which peer c already uses; refused",
                Cause::IdClash,
            ),
            (
                "peer b has not published cilium/cluster-config/b",
                Cause::ConfigMissing,
            ),
            ("cannot read /x/b.ca.crt: No such file", Cause::FileMissing),
            ("etcdserver: permission denied", Cause::PermissionDenied),
            ("something else", Cause::Other),
        ];
        for (text, cause) in cases {
            assert_eq!(Cause::of_text(text), cause, "{text}");
        }
    }

    #[test]
    fn names_are_the_json_spelling() {
        for cause in ALL {
            assert_eq!(
                serde_json::to_value(cause).unwrap(),
                serde_json::Value::from(cause.name())
            );
            assert!(!cause.hint().is_empty());
        }
    }

    #[test]
    fn http_answers() {
        let answer = parse_response(b"HTTP/1.1 503 Service Unavailable\r\nA: b\r\n\r\n{}").unwrap();
        assert_eq!(answer.status, 503);
        assert_eq!(answer.body, b"{}");
        assert!(parse_response(b"SSH-2.0\r\n\r\n").is_none());
    }

    #[tokio::test]
    async fn http_errors_have_causes() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        let err = http_get(
            &format!("http://127.0.0.1:{port}"),
            "/readyz",
            Duration::from_secs(2),
        )
        .await
        .unwrap_err();
        assert_eq!(err.cause(), Cause::ConnectionRefused, "{err}");
        let err = http_get("https://127.0.0.1:1", "/readyz", Duration::from_secs(1))
            .await
            .unwrap_err();
        assert_eq!(err.cause(), Cause::BadAnswer, "{err}");
    }
}
