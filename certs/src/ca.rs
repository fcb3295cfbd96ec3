//! The mesh CA and the certificates it issues.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use time::OffsetDateTime;

use crate::bundle::CA_FILE;
use crate::files::{self, CERT_MODE, KEY_MODE, WriteMode};
use crate::params::{DEFAULT_CA_LIFETIME, DEFAULT_LEAF_LIFETIME};
use crate::{ClusterName, Error, KeyType, TrustBundle, User, Validity, x509};

/// Domain under which a cluster's store is named by default: `<cluster>.mesh.local`.
pub const MESH_DOMAIN: &str = "mesh.local";

/// What a new CA looks like.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CaParams {
    /// Subject common name; make it tell CAs apart when meshes are joined or a CA rotates.
    pub common_name: String,
    /// Key type of the CA's own key.
    pub key_type: KeyType,
    /// When the CA is valid.
    pub validity: Validity,
}

impl CaParams {
    /// A CA valid for [`DEFAULT_CA_LIFETIME`] from now, with an ECDSA P-256 key.
    pub fn new(common_name: impl Into<String>) -> Self {
        CaParams {
            common_name: common_name.into(),
            key_type: KeyType::default(),
            validity: Validity::from_now_saturating(DEFAULT_CA_LIFETIME),
        }
    }
}

impl Default for CaParams {
    fn default() -> Self {
        CaParams::new("clustermesh CA")
    }
}

/// What a cluster's store server certificate covers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerParams {
    /// The cluster whose store this is.
    pub cluster: ClusterName,
    /// DNS names beyond the defaults (`<cluster>.mesh.local`, `localhost`).
    pub dns_names: Vec<String>,
    /// IP addresses beyond the defaults (`127.0.0.1`, `::1`).
    pub ips: Vec<IpAddr>,
    /// Key type of the server's key.
    pub key_type: KeyType,
    /// When the certificate is valid.
    pub validity: Validity,
}

impl ServerParams {
    /// Defaults only: valid for [`DEFAULT_LEAF_LIFETIME`], ECDSA P-256.
    pub fn new(cluster: ClusterName) -> Self {
        ServerParams {
            cluster,
            dns_names: Vec::new(),
            ips: Vec::new(),
            key_type: KeyType::default(),
            validity: Validity::from_now_saturating(DEFAULT_LEAF_LIFETIME),
        }
    }

    /// The name a cluster's store is reached by in the mesh: `<cluster>.mesh.local`.
    pub fn default_dns_name(cluster: &ClusterName) -> String {
        format!("{cluster}.{MESH_DOMAIN}")
    }

    /// Every subject alternative name, defaults first, validated and without duplicates.
    pub fn subject_alt_names(&self) -> Result<(Vec<String>, Vec<IpAddr>), Error> {
        let mut dns = vec![
            Self::default_dns_name(&self.cluster),
            "localhost".to_owned(),
        ];
        for name in &self.dns_names {
            let name = validate_dns_name(name)?;
            if !dns.contains(&name) {
                dns.push(name);
            }
        }
        let mut ips = vec![
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(Ipv6Addr::LOCALHOST),
        ];
        for ip in &self.ips {
            if !ips.contains(ip) {
                ips.push(*ip);
            }
        }
        Ok((dns, ips))
    }
}

/// What a client certificate says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientParams {
    /// The user, which becomes the common name.
    pub user: User,
    /// Key type of the client's key.
    pub key_type: KeyType,
    /// When the certificate is valid.
    pub validity: Validity,
}

impl ClientParams {
    /// Defaults: valid for [`DEFAULT_LEAF_LIFETIME`], ECDSA P-256.
    pub fn new(user: User) -> Self {
        ClientParams {
            user,
            key_type: KeyType::default(),
            validity: Validity::from_now_saturating(DEFAULT_LEAF_LIFETIME),
        }
    }
}

/// Checks a DNS name for a certificate (an optional leading `*.` wildcard, then labels of
/// letters, digits and inner `-`); returns it lowercased, as DNS compares case-blind.
pub fn validate_dns_name(name: &str) -> Result<String, Error> {
    let invalid = |reason| Error::InvalidDnsName {
        name: name.to_owned(),
        reason,
    };
    if name.parse::<IpAddr>().is_ok() {
        return Err(invalid(
            "is an IP address; give it as an IP, not a DNS name",
        ));
    }
    if name.is_empty() || name.len() > 253 {
        return Err(invalid("must be 1 to 253 characters long"));
    }
    let lower = name.to_ascii_lowercase();
    let labels = lower.strip_prefix("*.").unwrap_or(&lower);
    for label in labels.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err(invalid(
                "each dot-separated label must be 1 to 63 characters",
            ));
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return Err(invalid("may hold only letters, digits, '-' and '.'"));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(invalid("labels must not start or end with '-'"));
        }
    }
    Ok(lower)
}

/// A certificate authority: its certificate and the key that signs with it.
pub struct Ca {
    cert: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
    subject: String,
    validity: (OffsetDateTime, OffsetDateTime),
}

impl fmt::Debug for Ca {
    /// Shows who the CA is, never its key.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ca")
            .field("subject", &self.subject)
            .field("not_before", &self.validity.0)
            .field("not_after", &self.validity.1)
            .finish_non_exhaustive()
    }
}

impl Ca {
    /// Name of the CA certificate file in a CA directory.
    pub const CERT_FILE: &'static str = CA_FILE;
    /// Name of the CA key file in a CA directory.
    pub const KEY_FILE: &'static str = "ca.key";

    /// Creates a self-signed CA that may sign leaves only (path length 0).
    pub fn generate(params: &CaParams) -> Result<Ca, Error> {
        let key = params.key_type.generate()?;
        let mut cp = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, params.common_name.as_str());
        dn.push(DnType::OrganizationName, "clustermesh");
        cp.distinguished_name = dn;
        cp.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        cp.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        cp.not_before = params.validity.not_before();
        cp.not_after = params.validity.not_after();
        let cert = cp.self_signed(&key).map_err(Error::Generate)?;
        Ok(Ca {
            cert: cert.der().clone(),
            subject: params.common_name.clone(),
            validity: (cp.not_before, cp.not_after),
            issuer: Issuer::new(cp, key),
        })
    }

    /// Rebuilds a CA from its PEM certificate (exactly one) and PKCS#8 key.
    pub fn from_pem(cert_pem: &[u8], key_pem: &[u8]) -> Result<Ca, Error> {
        let certs = x509::parse_certs_pem(cert_pem)?;
        let [cert] = <[_; 1]>::try_from(certs).map_err(|v| Error::CertificateCount(v.len()))?;
        let key = parse_key(key_pem)?;
        Ca::from_parts(cert, key)
    }

    fn from_parts(cert: CertificateDer<'static>, key: KeyPair) -> Result<Ca, Error> {
        let info = x509::inspect(&cert)?;
        if !info.is_ca {
            return Err(Error::NotACa {
                subject: info.subject,
            });
        }
        if info.public_key != rcgen::PublicKeyData::der_bytes(&key) {
            return Err(Error::KeyMismatch);
        }
        let issuer = Issuer::from_ca_cert_der(&cert, key)
            .map_err(|e| Error::BadCertificate(e.to_string()))?;
        Ok(Ca {
            cert,
            issuer,
            subject: info.subject,
            validity: (info.not_before, info.not_after),
        })
    }

    /// Loads `ca.crt` and `ca.key` from `dir`, checking that they belong together.
    pub fn load(dir: &Path) -> Result<Ca, Error> {
        let (cert_path, key_path) = Ca::paths(dir);
        let cert = files::read_file(&cert_path)?;
        let key = files::read_file(&key_path)?;
        let certs = x509::parse_certs_pem(&cert).map_err(|e| e.in_file(&cert_path))?;
        let [cert] = <[_; 1]>::try_from(certs)
            .map_err(|v| Error::CertificateCount(v.len()).in_file(&cert_path))?;
        let key = parse_key(&key).map_err(|e| e.in_file(&key_path))?;
        Ca::from_parts(cert, key).map_err(|e| e.in_file(&cert_path))
    }

    /// Whether `dir` holds a complete CA; `Ok(false)` when it holds neither file, an error
    /// when it holds only one (a half-deleted CA must not be silently replaced).
    pub fn exists_in(dir: &Path) -> Result<bool, Error> {
        let (cert, key) = Ca::paths(dir);
        match (cert.exists(), key.exists()) {
            (true, true) => Ok(true),
            (false, false) => Ok(false),
            (true, false) => Err(Error::IncompleteCa {
                dir: dir.to_owned(),
                missing: key,
            }),
            (false, true) => Err(Error::IncompleteCa {
                dir: dir.to_owned(),
                missing: cert,
            }),
        }
    }

    /// The paths of `ca.crt` and `ca.key` in `dir`.
    pub fn paths(dir: &Path) -> (PathBuf, PathBuf) {
        (dir.join(Ca::CERT_FILE), dir.join(Ca::KEY_FILE))
    }

    /// Writes `ca.crt` (0644) and `ca.key` (0600) into `dir`; returns the paths written.
    ///
    /// With [`WriteMode::CreateNew`] nothing is written if either file exists.
    pub fn write(&self, dir: &Path, mode: WriteMode) -> Result<Vec<PathBuf>, Error> {
        let (cert, key) = Ca::paths(dir);
        if mode == WriteMode::CreateNew {
            files::ensure_absent([cert.as_path(), key.as_path()])?;
        }
        files::write_file(&key, self.key_pem().as_bytes(), KEY_MODE, mode)?;
        files::write_file(&cert, self.cert_pem().as_bytes(), CERT_MODE, mode)?;
        Ok(vec![cert, key])
    }

    /// The CA certificate.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    /// The CA certificate as PEM.
    pub fn cert_pem(&self) -> String {
        x509::cert_pem(&self.cert)
    }

    /// The CA key as PKCS#8 PEM. Secret.
    pub fn key_pem(&self) -> String {
        x509::key_pem(self.issuer.key().serialized_der())
    }

    /// The CA's subject, for messages.
    pub fn subject(&self) -> &str {
        &self.subject
    }

    /// When the CA is valid.
    pub fn not_before(&self) -> OffsetDateTime {
        self.validity.0
    }

    /// When the CA expires; leaves may not outlive it.
    pub fn not_after(&self) -> OffsetDateTime {
        self.validity.1
    }

    /// A bundle trusting this CA alone.
    pub fn trust_bundle(&self) -> TrustBundle {
        let mut bundle = TrustBundle::new();
        // Our own certificate is a CA by construction.
        let _ = bundle.push(self.cert.clone());
        bundle
    }

    /// Issues the server certificate of a cluster's store (EKU serverAuth and clientAuth).
    ///
    /// Its CN is `<cluster>.mesh.local`, which contains a dot and so can never parse as a
    /// [`User`]: presented as a client certificate it is refused by the store.
    pub fn issue_server(&self, params: &ServerParams) -> Result<Issued, Error> {
        let (dns, ips) = params.subject_alt_names()?;
        let mut cp = CertificateParams::default();
        cp.distinguished_name = common_name(&ServerParams::default_dns_name(&params.cluster));
        for name in dns {
            let name = name.try_into().map_err(Error::Generate)?;
            cp.subject_alt_names.push(SanType::DnsName(name));
        }
        cp.subject_alt_names
            .extend(ips.into_iter().map(SanType::IpAddress));
        cp.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        self.issue(cp, params.key_type, params.validity)
    }

    /// Issues a client certificate for `user` with default key type and validity.
    pub fn issue_client(&self, user: &User) -> Result<Issued, Error> {
        self.issue_client_with(&ClientParams::new(user.clone()))
    }

    /// Issues a client certificate (EKU clientAuth) whose CN is the user's [`User::cn`].
    pub fn issue_client_with(&self, params: &ClientParams) -> Result<Issued, Error> {
        let mut cp = CertificateParams::default();
        cp.distinguished_name = common_name(&params.user.cn());
        cp.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.issue(cp, params.key_type, params.validity)
    }

    fn issue(
        &self,
        mut cp: CertificateParams,
        key_type: KeyType,
        validity: Validity,
    ) -> Result<Issued, Error> {
        if OffsetDateTime::now_utc() > self.not_after() {
            return Err(Error::CaExpired {
                not_after: self.not_after(),
            });
        }
        if validity.not_after() > self.not_after() {
            return Err(Error::OutlivesCa {
                not_after: validity.not_after(),
                ca_not_after: self.not_after(),
            });
        }
        cp.not_before = validity.not_before();
        cp.not_after = validity.not_after();
        cp.is_ca = IsCa::ExplicitNoCa;
        cp.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        // Lets path building pick the right CA when a bundle holds several with one name.
        cp.use_authority_key_identifier_extension = true;
        let key = key_type.generate()?;
        let cert = cp.signed_by(&key, &self.issuer).map_err(Error::Generate)?;
        Ok(Issued {
            cert: cert.der().clone(),
            key,
            trust: self.trust_bundle(),
            validity,
        })
    }
}

fn common_name(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn
}

fn parse_key(text: &[u8]) -> Result<KeyPair, Error> {
    let der = x509::parse_key_pem(text)?;
    KeyPair::try_from(der.as_slice()).map_err(|e| Error::BadKey(e.to_string()))
}

/// A freshly issued certificate with its key and the trust bundle to ship beside it.
pub struct Issued {
    cert: CertificateDer<'static>,
    key: KeyPair,
    trust: TrustBundle,
    validity: Validity,
}

impl fmt::Debug for Issued {
    /// Shows the certificate's validity and trust, never the key.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Issued")
            .field("validity", &self.validity)
            .field("trust", &self.trust.len())
            .finish_non_exhaustive()
    }
}

impl Issued {
    /// Certificate file name, as in a Kubernetes TLS secret.
    pub const CERT_FILE: &'static str = "tls.crt";
    /// Private key file name, as in a Kubernetes TLS secret.
    pub const KEY_FILE: &'static str = "tls.key";
    /// Trust bundle file name.
    pub const CA_FILE: &'static str = CA_FILE;

    /// The certificate.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    /// The certificate as PEM.
    pub fn cert_pem(&self) -> String {
        x509::cert_pem(&self.cert)
    }

    /// The private key as PKCS#8 PEM. Secret.
    pub fn key_pem(&self) -> String {
        x509::key_pem(self.key.serialized_der())
    }

    /// The private key, ready for a rustls config.
    pub fn private_key_der(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key.serialize_der()))
    }

    /// The bundle written as `ca.crt`: the issuing CA unless replaced.
    pub fn trust(&self) -> &TrustBundle {
        &self.trust
    }

    /// Ships `trust` as `ca.crt` instead, e.g. old and new CA during a rotation.
    pub fn with_trust(mut self, trust: TrustBundle) -> Self {
        self.trust = trust;
        self
    }

    /// When the certificate is valid.
    pub fn validity(&self) -> Validity {
        self.validity
    }

    /// The paths of `tls.crt`, `tls.key` and `ca.crt` in `dir`.
    pub fn paths(dir: &Path) -> [PathBuf; 3] {
        [
            dir.join(Issued::CERT_FILE),
            dir.join(Issued::KEY_FILE),
            dir.join(Issued::CA_FILE),
        ]
    }

    /// Writes `tls.crt`, `tls.key` (0600) and `ca.crt` into `dir`; returns the paths.
    ///
    /// With [`WriteMode::CreateNew`] nothing is written if any of them exists.
    pub fn write(&self, dir: &Path, mode: WriteMode) -> Result<Vec<PathBuf>, Error> {
        let paths = Issued::paths(dir);
        if mode == WriteMode::CreateNew {
            files::ensure_absent(paths.iter().map(PathBuf::as_path))?;
        }
        let [cert, key, ca] = &paths;
        // Key before certificate: a watcher that reloads on tls.crt finds its key there.
        files::write_file(key, self.key_pem().as_bytes(), KEY_MODE, mode)?;
        files::write_file(cert, self.cert_pem().as_bytes(), CERT_MODE, mode)?;
        self.trust.write(ca, mode)?;
        Ok(paths.into())
    }
}
