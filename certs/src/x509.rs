//! The few facts we read back from certificates, and PEM encoding.

use rustls_pki_types::CertificateDer;
use time::OffsetDateTime;

use crate::Error;

/// What loading and bundling need to know about a certificate.
#[derive(Debug)]
pub(crate) struct CertInfo {
    pub subject: String,
    pub is_ca: bool,
    pub not_after: OffsetDateTime,
    pub not_before: OffsetDateTime,
    /// The raw subject public key (the BIT STRING contents), to match against a private key.
    pub public_key: Vec<u8>,
}

pub(crate) fn inspect(der: &CertificateDer<'_>) -> Result<CertInfo, Error> {
    let (rest, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| Error::BadCertificate(e.to_string()))?;
    if !rest.is_empty() {
        return Err(Error::BadCertificate(
            "trailing bytes after the certificate".into(),
        ));
    }
    let is_ca = cert
        .basic_constraints()
        .map_err(|e| Error::BadCertificate(e.to_string()))?
        .is_some_and(|bc| bc.value.ca);
    Ok(CertInfo {
        subject: cert.subject().to_string(),
        is_ca,
        not_before: cert.validity().not_before.to_datetime(),
        not_after: cert.validity().not_after.to_datetime(),
        public_key: cert.public_key().subject_public_key.data.to_vec(),
    })
}

const PEM_CONFIG: pem::EncodeConfig = pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF);

pub(crate) fn cert_pem(der: &CertificateDer<'_>) -> String {
    pem::encode_config(&pem::Pem::new("CERTIFICATE", der.to_vec()), PEM_CONFIG)
}

pub(crate) fn key_pem(pkcs8: &[u8]) -> String {
    pem::encode_config(&pem::Pem::new("PRIVATE KEY", pkcs8.to_vec()), PEM_CONFIG)
}

/// The single PKCS#8 `PRIVATE KEY` section of `pem`; anything else is refused so a
/// certificate file passed by mistake is caught here.
pub(crate) fn parse_key_pem(text: &[u8]) -> Result<Vec<u8>, Error> {
    let sections = pem::parse_many(text)?;
    let mut keys = Vec::new();
    for s in sections {
        match s.tag() {
            "PRIVATE KEY" => keys.push(s.into_contents()),
            "EC PRIVATE KEY" | "RSA PRIVATE KEY" => {
                return Err(Error::BadKey(format!(
                    "{} is not supported: convert it to PKCS#8 (PRIVATE KEY)",
                    s.tag()
                )));
            }
            other => return Err(Error::UnexpectedPem(other.to_owned())),
        }
    }
    match keys.len() {
        1 => Ok(keys.pop().unwrap_or_default()),
        n => Err(Error::KeyCount(n)),
    }
}

/// All `CERTIFICATE` sections of `pem`, refusing any other section.
pub(crate) fn parse_certs_pem(text: &[u8]) -> Result<Vec<CertificateDer<'static>>, Error> {
    let mut certs = Vec::new();
    for s in pem::parse_many(text)? {
        if s.tag() != "CERTIFICATE" {
            return Err(Error::UnexpectedPem(s.tag().to_owned()));
        }
        certs.push(CertificateDer::from(s.into_contents()));
    }
    if certs.is_empty() {
        return Err(Error::NoCertificate);
    }
    Ok(certs)
}
