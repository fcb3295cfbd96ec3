//! The one error type of the crate.

use std::io;
use std::path::PathBuf;

use time::OffsetDateTime;

/// Everything that can go wrong making, loading, writing or checking certificates.
///
/// Messages name the offending value or file, because they end up in front of an operator;
/// the cause (an I/O error, what is wrong inside a file) is the [`source`] chain, so print
/// the chain (e.g. `anyhow`'s `{:#}`) or use [`Error::report`].
///
/// [`source`]: std::error::Error::source
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A cluster name that breaks the mesh's naming rule.
    #[error(transparent)]
    InvalidClusterName(#[from] model::NameError),
    /// A common name that names no mesh user; the store must refuse such a peer.
    #[error("{cn:?} names no mesh user: {reason}")]
    InvalidUser {
        /// The common name as found.
        cn: String,
        /// Why it does not parse.
        reason: String,
    },
    /// A DNS name that cannot go into a certificate's subject alternative names.
    #[error("invalid DNS name {name:?}: {reason}")]
    InvalidDnsName {
        /// The name as given.
        name: String,
        /// Which rule it breaks.
        reason: &'static str,
    },
    /// A key type we do not generate.
    #[error("unknown key type {0:?} (expected ecdsa-p256, ecdsa-p384 or ed25519)")]
    UnknownKeyType(String),
    /// A lifetime such as `365d` that does not parse or is out of range.
    #[error("invalid validity {value:?}: {reason}")]
    InvalidLifetime {
        /// The text as given.
        value: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A validity window that ends before it starts.
    #[error(
        "validity ends ({}) before it starts ({})",
        rfc3339(not_after),
        rfc3339(not_before)
    )]
    EmptyValidity {
        /// Start of the window.
        not_before: OffsetDateTime,
        /// End of the window.
        not_after: OffsetDateTime,
    },
    /// A certificate that would outlive its CA, which could no longer vouch for it then.
    #[error(
        "certificate would expire at {}, after its CA does ({}); \
         shorten the validity or rotate the CA",
        rfc3339(not_after),
        rfc3339(ca_not_after)
    )]
    OutlivesCa {
        /// Requested end of the certificate's validity.
        not_after: OffsetDateTime,
        /// End of the CA's validity.
        ca_not_after: OffsetDateTime,
    },
    /// An expired CA, whose signatures nobody would accept.
    #[error("the CA expired at {}; create a new CA", rfc3339(not_after))]
    CaExpired {
        /// End of the CA's validity.
        not_after: OffsetDateTime,
    },
    /// A certificate used as a CA that is not marked as one (basic constraints `cA`).
    #[error("certificate {subject:?} is not a CA certificate")]
    NotACa {
        /// Subject of the certificate.
        subject: String,
    },
    /// A CA key that does not belong to the CA certificate beside it.
    #[error("the private key does not match the CA certificate")]
    KeyMismatch,
    /// A private key we cannot sign with (encrypted, unsupported algorithm, corrupt).
    #[error("unusable private key: {0}")]
    BadKey(String),
    /// DER that does not parse as an X.509 certificate.
    #[error("malformed certificate: {0}")]
    BadCertificate(String),
    /// Text that does not decode as PEM.
    #[error("malformed PEM")]
    Pem(#[from] pem::PemError),
    /// PEM without the certificate it should hold.
    #[error("no certificate found")]
    NoCertificate,
    /// More than one certificate where exactly one belongs (a CA's own `ca.crt`).
    #[error("expected exactly one certificate, found {0}")]
    CertificateCount(usize),
    /// PEM without a private key, or with more than one.
    #[error("expected exactly one PRIVATE KEY section, found {0}")]
    KeyCount(usize),
    /// A PEM section that does not belong in this file, such as a private key in a bundle.
    #[error("unexpected PEM section {0:?}")]
    UnexpectedPem(String),
    /// A problem with the contents of a file, tagged with the file's path.
    #[error("{}", path.display())]
    File {
        /// The file whose contents are wrong.
        path: PathBuf,
        /// What is wrong with them.
        #[source]
        error: Box<Error>,
    },
    /// A CA directory holding only one of `ca.crt` and `ca.key`.
    #[error("incomplete CA in {}: {} is missing", dir.display(), missing.display())]
    IncompleteCa {
        /// The CA directory.
        dir: PathBuf,
        /// The file that is not there.
        missing: PathBuf,
    },
    /// A file that could not be read.
    #[error("cannot read {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why not.
        #[source]
        error: io::Error,
    },
    /// A file or directory that could not be written.
    #[error("cannot write {}", path.display())]
    Write {
        /// The file or directory.
        path: PathBuf,
        /// Why not.
        #[source]
        error: io::Error,
    },
    /// A file we refuse to overwrite, so that a typo cannot destroy a working key.
    #[error("{} already exists", path.display())]
    Exists {
        /// The existing file.
        path: PathBuf,
    },
    /// A trust bundle with no certificate, which would trust nobody.
    #[error("the trust bundle is empty")]
    EmptyBundle,
    /// A certificate chain the trust bundle does not vouch for.
    #[error("certificate not trusted")]
    Untrusted(#[source] rustls::Error),
    /// rcgen could not produce a certificate or key; a bug or an unsupported combination.
    #[error("certificate generation failed")]
    Generate(#[source] rcgen::Error),
}

/// Formats a time for messages (RFC 3339, UTC), falling back to `time`'s own format.
pub fn rfc3339(t: &OffsetDateTime) -> String {
    t.to_offset(time::UtcOffset::UTC)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.to_string())
}

impl Error {
    /// Whether the error comes from what the caller asked for or pointed at (names, files,
    /// validity), as opposed to a failure while writing or inside the crypto code.
    ///
    /// Lets a command map the former to a usage/config exit status.
    pub fn is_usage(&self) -> bool {
        match self {
            Error::File { error, .. } => error.is_usage(),
            Error::Write { .. } | Error::Generate(_) | Error::Untrusted(_) => false,
            _ => true,
        }
    }

    /// The message with every cause after it, `: `-separated, for logs and tests.
    pub fn report(&self) -> String {
        let mut out = self.to_string();
        let mut cause = std::error::Error::source(self);
        while let Some(c) = cause {
            out.push_str(": ");
            out.push_str(&c.to_string());
            cause = c.source();
        }
        out
    }

    /// Wraps a content error with the path of the file it came from.
    pub(crate) fn in_file(self, path: impl Into<PathBuf>) -> Error {
        Error::File {
            path: path.into(),
            error: Box::new(self),
        }
    }
}
