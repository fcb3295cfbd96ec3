//! Loading an identity directory (`tls.crt`, `tls.key`, `ca.crt`) for use with rustls.

use std::fmt;
use std::path::Path;

use rcgen::{KeyPair, PublicKeyData};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::files::read_file;
use crate::{Error, Issued, TrustBundle, User, x509};

/// A certificate chain, its private key and the bundle of CAs to trust for peers, as read
/// from a directory laid out like a Kubernetes TLS secret.
pub struct Identity {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    trust: TrustBundle,
}

impl fmt::Debug for Identity {
    /// Shows the chain length and trust, never the key.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("chain", &self.chain.len())
            .field("trust", &self.trust.len())
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// Loads `dir/{tls.crt,tls.key,ca.crt}`, checking that the key belongs to the leaf, so
    /// a half-finished rotation is caught here rather than as a failed handshake.
    pub fn load(dir: &Path) -> Result<Self, Error> {
        let [cert_path, key_path, ca_path] = Issued::paths(dir);
        let chain =
            x509::parse_certs_pem(&read_file(&cert_path)?).map_err(|e| e.in_file(&cert_path))?;
        let pkcs8 =
            x509::parse_key_pem(&read_file(&key_path)?).map_err(|e| e.in_file(&key_path))?;
        let key = KeyPair::try_from(pkcs8.as_slice())
            .map_err(|e| Error::BadKey(e.to_string()).in_file(&key_path))?;
        let leaf = x509::inspect(&chain[0]).map_err(|e| e.in_file(&cert_path))?;
        if leaf.public_key != key.der_bytes() {
            return Err(Error::KeyMismatch.in_file(&key_path));
        }
        let trust = TrustBundle::load(&ca_path)?;
        Ok(Identity {
            chain,
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pkcs8)),
            trust,
        })
    }

    /// The certificate chain, leaf first.
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    /// The private key of the leaf.
    pub fn key(&self) -> &PrivateKeyDer<'static> {
        &self.key
    }

    /// The CAs to trust for peers.
    pub fn trust(&self) -> &TrustBundle {
        &self.trust
    }

    /// The user the leaf names; an error for server certificates.
    pub fn user(&self) -> Result<User, Error> {
        User::from_certificate(&self.chain[0])
    }
}
