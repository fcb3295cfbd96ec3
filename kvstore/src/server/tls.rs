//! Serving TLS with rustls: certificates from PEM files, optional client-certificate
//! verification, and an accept loop where one bad handshake never stops the listener.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::RootCertStore;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use thiserror::Error;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;

/// A handshake that has not finished by then is dropped, so idle sockets cannot pile up.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the server's TLS material lives.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Client certificates must chain to one of these CAs; `None` serves TLS without client auth.
    pub client_ca: Option<PathBuf>,
}

/// Errors loading TLS material.
#[derive(Debug, Error)]
pub enum TlsError {
    /// A PEM file could not be read or holds nothing usable.
    #[error("{what} {path}: {detail}")]
    File {
        what: &'static str,
        path: PathBuf,
        detail: String,
    },
    /// rustls refused the configuration (e.g. the key does not match the certificate).
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
    /// The client CA bundle could not become a verifier.
    #[error("client CA bundle: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

fn certs(path: &Path, what: &'static str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let err = |detail: String| TlsError::File {
        what,
        path: path.to_path_buf(),
        detail,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| err(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(e.to_string()))?;
    if certs.is_empty() {
        return Err(err("no PEM certificate found".into()));
    }
    Ok(certs)
}

impl TlsFiles {
    /// Builds the rustls server configuration, checking every file.
    pub fn server_config(&self) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let chain = certs(&self.cert, "certificate")?;
        let key = PrivateKeyDer::from_pem_file(&self.key).map_err(|e| TlsError::File {
            what: "private key",
            path: self.key.clone(),
            detail: e.to_string(),
        })?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(rustls::DEFAULT_VERSIONS)?;
        let builder = match &self.client_ca {
            Some(ca) => {
                let mut roots = RootCertStore::empty();
                for cert in certs(ca, "client CA bundle")? {
                    roots.add(cert).map_err(|e| TlsError::File {
                        what: "client CA bundle",
                        path: ca.clone(),
                        detail: e.to_string(),
                    })?;
                }
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                        .build()?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let mut config = builder.with_single_cert(chain, key)?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(config))
    }
}

/// How often the TLS files are checked for changes.
const RELOAD_INTERVAL: Duration = Duration::from_secs(1);

/// The server configuration in force; replaced when the files change.
type Current = Arc<RwLock<Arc<rustls::ServerConfig>>>;

/// Accepts TCP connections and hands back those whose handshake succeeded.
///
/// Each handshake uses the newest configuration, so replaced certificates and CA bundles take
/// effect for new connections without a restart while established ones (open watches) go on.
pub fn accept_loop(
    listener: TcpListener,
    files: TlsFiles,
    config: Arc<rustls::ServerConfig>,
    cancel: CancellationToken,
) -> mpsc::Receiver<Result<TlsStream<TcpStream>, std::io::Error>> {
    let (tx, rx) = mpsc::channel(64);
    let current: Current = Arc::new(RwLock::new(config));
    tokio::spawn(reload_on_change(files, current.clone(), cancel.clone()));
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                () = cancel.cancelled() => return,
                accepted = listener.accept() => accepted,
            };
            let (socket, peer) = match accepted {
                Ok(pair) => pair,
                Err(error) => {
                    // Usually a transient resource limit (EMFILE); pause instead of spinning.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = socket.set_nodelay(true);
            let config = current.read().unwrap_or_else(|e| e.into_inner()).clone();
            let acceptor = TlsAcceptor::from(config);
            let tx = tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(socket)).await {
                    Ok(Ok(stream)) => {
                        let _ = tx.send(Ok(stream)).await;
                    }
                    Ok(Err(error)) => tracing::info!(%peer, %error, "TLS handshake refused"),
                    Err(_) => tracing::info!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });
    rx
}

/// The files' bytes, to notice a change whatever tool replaced them (rename, copy, editor).
fn snapshot(files: &TlsFiles) -> Vec<Option<Vec<u8>>> {
    [
        Some(&files.cert),
        Some(&files.key),
        files.client_ca.as_ref(),
    ]
    .into_iter()
    .map(|path| path.and_then(|p| std::fs::read(p).ok()))
    .collect()
}

async fn reload_on_change(files: TlsFiles, current: Current, cancel: CancellationToken) {
    // Nothing seen yet: the first tick (at once) loads the files again, so a change made
    // between building the first configuration and this task starting (a CA bundle
    // rewritten by `clustermesh connect` while the store starts) is not missed.
    let mut seen = Vec::new();
    let mut tick = tokio::time::interval(RELOAD_INTERVAL);
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = snapshot(&files);
        if now == seen {
            continue;
        }
        match files.server_config() {
            Ok(config) => {
                *current.write().unwrap_or_else(|e| e.into_inner()) = config;
                if !seen.is_empty() {
                    tracing::info!(cert = %files.cert.display(), "reloaded TLS certificates");
                }
                seen = now;
            }
            // A rotation in progress (the key written, the certificate not yet): keep serving
            // with the old material and look again at the next tick.
            Err(error) => {
                tracing::warn!(%error, "changed TLS files do not load yet; keeping the previous ones")
            }
        }
    }
}
