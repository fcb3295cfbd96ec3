//! Trust bundles: the CA certificates a peer accepts, and verification against them.

use std::path::Path;
use std::sync::Arc;

use rustls::RootCertStore;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::ServerCertVerifier;
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::ClientCertVerifier;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use crate::files::{self, CERT_MODE, WriteMode};
use crate::{Error, User, x509};

/// File name of a trust bundle inside an identity or CA directory.
pub const CA_FILE: &str = "ca.crt";

/// An ordered, duplicate-free set of CA certificates.
///
/// Holding several CAs is what lets two meshes be joined (each trusts both) and a CA be
/// rotated (old and new are trusted while leaves are reissued).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TrustBundle {
    certs: Vec<CertificateDer<'static>>,
}

impl TrustBundle {
    /// An empty bundle.
    pub fn new() -> Self {
        TrustBundle::default()
    }

    /// Parses PEM holding one or more `CERTIFICATE` sections, each a CA certificate.
    ///
    /// Any other section is an error: a private key pasted into a bundle would be shipped to
    /// every peer.
    pub fn from_pem(text: &[u8]) -> Result<Self, Error> {
        let mut bundle = TrustBundle::new();
        for cert in x509::parse_certs_pem(text)? {
            bundle.push(cert)?;
        }
        Ok(bundle)
    }

    /// Loads a bundle file, or `ca.crt` inside a directory (a CA or identity directory).
    pub fn load(path: &Path) -> Result<Self, Error> {
        let file = if path.is_dir() {
            path.join(CA_FILE)
        } else {
            path.to_owned()
        };
        let pem = files::read_file(&file)?;
        TrustBundle::from_pem(&pem).map_err(|e| e.in_file(file))
    }

    /// Adds a CA certificate unless an identical one is present; returns whether it was added.
    pub fn push(&mut self, cert: CertificateDer<'static>) -> Result<bool, Error> {
        let info = x509::inspect(&cert)?;
        if !info.is_ca {
            return Err(Error::NotACa {
                subject: info.subject,
            });
        }
        if self.contains(&cert) {
            return Ok(false);
        }
        self.certs.push(cert);
        Ok(true)
    }

    /// Adds every certificate of `other` not already present; returns how many were added.
    pub fn merge(&mut self, other: &TrustBundle) -> usize {
        let before = self.certs.len();
        for cert in &other.certs {
            if !self.contains(cert) {
                self.certs.push(cert.clone());
            }
        }
        self.certs.len() - before
    }

    /// The union of `bundles`, in order of first appearance.
    pub fn merged<'a>(bundles: impl IntoIterator<Item = &'a TrustBundle>) -> TrustBundle {
        let mut all = TrustBundle::new();
        for b in bundles {
            all.merge(b);
        }
        all
    }

    /// Whether an identical certificate is in the bundle.
    pub fn contains(&self, cert: &CertificateDer<'_>) -> bool {
        self.certs.iter().any(|c| c.as_ref() == cert.as_ref())
    }

    /// The certificates, in order.
    pub fn certs(&self) -> &[CertificateDer<'static>] {
        &self.certs
    }

    /// Number of certificates.
    pub fn len(&self) -> usize {
        self.certs.len()
    }

    /// Whether the bundle is empty.
    pub fn is_empty(&self) -> bool {
        self.certs.is_empty()
    }

    /// The bundle as PEM, one `CERTIFICATE` section per CA.
    pub fn to_pem(&self) -> String {
        self.certs.iter().map(|c| x509::cert_pem(c)).collect()
    }

    /// Writes the bundle as PEM (mode 0644).
    pub fn write(&self, path: &Path, mode: WriteMode) -> Result<(), Error> {
        if self.is_empty() {
            return Err(Error::EmptyBundle);
        }
        files::write_file(path, self.to_pem().as_bytes(), CERT_MODE, mode)
    }

    /// The bundle as a rustls root store.
    pub fn root_store(&self) -> Result<RootCertStore, Error> {
        if self.is_empty() {
            return Err(Error::EmptyBundle);
        }
        let mut roots = RootCertStore::empty();
        for cert in &self.certs {
            roots
                .add(cert.clone())
                .map_err(|e| Error::BadCertificate(e.to_string()))?;
        }
        Ok(roots)
    }

    /// A verifier for a TLS server that requires client certificates from this bundle.
    ///
    /// It checks the chain only; map the accepted leaf to its rights with
    /// [`User::from_certificate`].
    pub fn client_verifier(&self) -> Result<Arc<dyn ClientCertVerifier>, Error> {
        WebPkiClientVerifier::builder_with_provider(Arc::new(self.root_store()?), provider())
            .build()
            .map_err(|e| Error::BadCertificate(e.to_string()))
    }

    /// A verifier for a TLS client that accepts servers certified by this bundle.
    pub fn server_verifier(&self) -> Result<Arc<WebPkiServerVerifier>, Error> {
        WebPkiServerVerifier::builder_with_provider(Arc::new(self.root_store()?), provider())
            .build()
            .map_err(|e| Error::BadCertificate(e.to_string()))
    }

    /// Verifies a client chain (leaf first) as a TLS server would, at time `now`, and
    /// returns the user its leaf names.
    pub fn verify_client(
        &self,
        chain: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<User, Error> {
        let (leaf, intermediates) = chain.split_first().ok_or(Error::NoCertificate)?;
        self.client_verifier()?
            .verify_client_cert(leaf, intermediates, now)
            .map_err(Error::Untrusted)?;
        User::from_certificate(leaf)
    }

    /// Verifies a server chain (leaf first) for `server_name` (a DNS name or an IP address)
    /// as a TLS client would, at time `now`.
    pub fn verify_server(
        &self,
        chain: &[CertificateDer<'_>],
        server_name: &str,
        now: UnixTime,
    ) -> Result<(), Error> {
        let (leaf, intermediates) = chain.split_first().ok_or(Error::NoCertificate)?;
        let name = ServerName::try_from(server_name).map_err(|_| Error::InvalidDnsName {
            name: server_name.to_owned(),
            reason: "neither a DNS name nor an IP address",
        })?;
        self.server_verifier()?
            .verify_server_cert(leaf, intermediates, &name, &[], now)
            .map_err(Error::Untrusted)?;
        Ok(())
    }
}

/// The crypto provider the mesh uses everywhere (ring), passed explicitly so verification
/// does not depend on a process-wide default being installed.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}
