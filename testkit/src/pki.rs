//! A throwaway PKI for tests: one CA, a server certificate for loopback, client certificates by
//! common name, plus the "bad" certificates security tests need (foreign CA, expired).

use std::collections::HashMap;
use std::fmt;
use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, date_time_ymd,
};

use crate::Error;

/// Paths of one PEM certificate, its private key, and the CA bundle the peer should trust.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertFiles {
    /// The leaf certificate (PEM).
    pub cert: PathBuf,
    /// Its private key (PKCS#8 PEM, mode 0600).
    pub key: PathBuf,
    /// The CA certificate that signed `cert` (PEM).
    pub ca: PathBuf,
}

impl CertFiles {
    /// Client TLS options for `etcd_client` presenting this certificate and trusting `self.ca`.
    ///
    /// Panics if a file cannot be read: the files were written by this crate, so a failure is a
    /// bug in the test, not a condition to handle.
    pub fn tls_options(&self) -> etcd_client::TlsOptions {
        let read = |p: &Path| {
            std::fs::read(p).unwrap_or_else(|e| panic!("cannot read {}: {e}", p.display()))
        };
        etcd_client::TlsOptions::new()
            .ca_certificate(etcd_client::Certificate::from_pem(read(&self.ca)))
            .identity(etcd_client::Identity::from_pem(
                read(&self.cert),
                read(&self.key),
            ))
    }
}

/// A CA that can sign more certificates later. The key stays in memory only; the certificate
/// is written to disk so servers can load it as their trust bundle.
struct Ca {
    params: CertificateParams,
    key: KeyPair,
    cert_path: PathBuf,
}

impl Ca {
    fn new(dir: &Path, name: &str) -> Result<Self, Error> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = dn(&format!("testkit {name} CA"));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = date_time_ymd(2020, 1, 1);
        params.not_after = date_time_ymd(2099, 12, 31);
        let cert = params.self_signed(&key)?;
        let cert_path = dir.join(format!("{name}-ca.pem"));
        write_file(&cert_path, cert.pem().as_bytes(), 0o644)?;
        Ok(Ca {
            params,
            key,
            cert_path,
        })
    }

    /// Signs a leaf certificate and writes `<stem>.pem` / `<stem>-key.pem` into `dir`.
    fn issue(&self, dir: &Path, stem: &str, leaf: Leaf<'_>) -> Result<CertFiles, Error> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::new(leaf.sans.to_vec())?;
        params.distinguished_name = dn(leaf.cn);
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = leaf.eku.to_vec();
        params.use_authority_key_identifier_extension = true;
        if leaf.expired {
            // Valid for one day long ago: every verifier must refuse it as expired rather than
            // not-yet-valid, which is the case security tests want to see.
            params.not_before = date_time_ymd(2001, 1, 1);
            params.not_after = date_time_ymd(2001, 1, 2);
        } else {
            params.not_before = date_time_ymd(2020, 1, 1);
            params.not_after = date_time_ymd(2099, 12, 31);
        }
        let issuer = Issuer::from_params(&self.params, &self.key);
        let cert = params.signed_by(&key, &issuer)?;
        let files = CertFiles {
            cert: dir.join(format!("{stem}.pem")),
            key: dir.join(format!("{stem}-key.pem")),
            ca: self.cert_path.clone(),
        };
        write_file(&files.cert, cert.pem().as_bytes(), 0o644)?;
        write_file(&files.key, key.serialize_pem().as_bytes(), 0o600)?;
        Ok(files)
    }
}

struct Leaf<'a> {
    cn: &'a str,
    sans: &'a [String],
    eku: &'a [ExtendedKeyUsagePurpose],
    expired: bool,
}

fn dn(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn
}

/// Creates the file with the given mode from the start, so a private key is never readable by
/// others, not even for a moment.
fn write_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), Error> {
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .map_err(|e| Error::io(format!("create {}", path.display()), e))?;
    f.write_all(contents)
        .map_err(|e| Error::io(format!("write {}", path.display()), e))
}

/// A CA, a loopback server certificate and on-demand client certificates, as PEM files in a
/// temp dir that lives as long as this value.
///
/// Share it as `Arc<TestPki>` between a store and its clients; client certificates are cached
/// by common name so asking twice for "root" does not re-sign.
pub struct TestPki {
    dir: tempfile::TempDir,
    ca: Ca,
    server: CertFiles,
    clients: Mutex<HashMap<String, CertFiles>>,
    /// A second CA, made only when a test asks for a foreign client certificate.
    foreign: Mutex<Option<Ca>>,
    /// Distinguishes file names of certificates that are not cached (expired, foreign).
    counter: AtomicU64,
}

impl fmt::Debug for TestPki {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TestPki")
            .field("dir", &self.dir.path())
            .field("server", &self.server)
            .finish_non_exhaustive()
    }
}

impl TestPki {
    /// Makes a fresh ECDSA P-256 CA and a server certificate valid for `127.0.0.1` and
    /// `localhost`. Panics on failure (see [`TestPki::try_generate`]).
    pub fn generate() -> Self {
        Self::try_generate().expect("generate test PKI")
    }

    /// Like [`TestPki::generate`], returning the error instead of panicking.
    pub fn try_generate() -> Result<Self, Error> {
        let dir = tempfile::Builder::new()
            .prefix("testkit-pki-")
            .tempdir()
            .map_err(|e| Error::io("create PKI temp dir", e))?;
        let ca = Ca::new(dir.path(), "test")?;
        let server = ca.issue(
            dir.path(),
            "server",
            Leaf {
                cn: "testkit server",
                sans: &["127.0.0.1".to_string(), "localhost".to_string()],
                eku: &[ExtendedKeyUsagePurpose::ServerAuth],
                expired: false,
            },
        )?;
        Ok(TestPki {
            dir,
            ca,
            server,
            clients: Mutex::new(HashMap::new()),
            foreign: Mutex::new(None),
            counter: AtomicU64::new(0),
        })
    }

    /// The directory holding all PEM files.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The server certificate (SANs `127.0.0.1`, `localhost`; EKU server auth).
    pub fn server(&self) -> CertFiles {
        self.server.clone()
    }

    /// The CA certificate that signed the server and the client certificates.
    pub fn ca_path(&self) -> PathBuf {
        self.ca.cert_path.clone()
    }

    /// A client certificate (EKU client auth) with common name `cn`, signed by this CA.
    /// Panics on failure.
    pub fn client(&self, cn: &str) -> CertFiles {
        let mut clients = self.clients.lock().expect("pki lock");
        if let Some(files) = clients.get(cn) {
            return files.clone();
        }
        let files = self
            .ca
            .issue(
                self.dir.path(),
                &format!("client-{}", self.stem(cn)),
                Leaf {
                    cn,
                    sans: &[],
                    eku: &[ExtendedKeyUsagePurpose::ClientAuth],
                    expired: false,
                },
            )
            .expect("issue client certificate");
        clients.insert(cn.to_string(), files.clone());
        files
    }

    /// A client certificate with common name `cn` signed by this CA but expired (valid only on
    /// 2001-01-01). A server must refuse it. Panics on failure.
    pub fn expired_client(&self, cn: &str) -> CertFiles {
        self.ca
            .issue(
                self.dir.path(),
                &format!("expired-{}", self.stem(cn)),
                Leaf {
                    cn,
                    sans: &[],
                    eku: &[ExtendedKeyUsagePurpose::ClientAuth],
                    expired: true,
                },
            )
            .expect("issue expired client certificate")
    }

    /// A valid client certificate with common name `cn` signed by a second, independent CA
    /// that the server does not trust. `ca` in the result is that foreign CA; to get past
    /// server verification a client must still trust [`TestPki::ca_path`], which
    /// [`TestPki::foreign_client_tls_options`] does. Panics on failure.
    pub fn foreign_client(&self, cn: &str) -> CertFiles {
        self.with_foreign_ca(|ca| {
            ca.issue(
                self.dir.path(),
                &format!("foreign-{}", self.stem(cn)),
                Leaf {
                    cn,
                    sans: &[],
                    eku: &[ExtendedKeyUsagePurpose::ClientAuth],
                    expired: false,
                },
            )
            .expect("issue foreign client certificate")
        })
    }

    /// Runs `f` with the second CA, made on first use.
    fn with_foreign_ca<R>(&self, f: impl FnOnce(&Ca) -> R) -> R {
        let mut foreign = self.foreign.lock().expect("pki lock");
        let ca = foreign.get_or_insert_with(|| {
            Ca::new(self.dir.path(), "foreign").expect("generate foreign CA")
        });
        f(ca)
    }

    /// Client TLS options that trust our server (our CA) but present `client`, which may be a
    /// foreign or expired certificate. This is what a security test needs to get past server
    /// verification and be refused on the client certificate alone.
    pub fn tls_options_presenting(&self, client: &CertFiles) -> etcd_client::TlsOptions {
        CertFiles {
            ca: self.ca_path(),
            ..client.clone()
        }
        .tls_options()
    }

    /// Shorthand for `tls_options_presenting(&foreign_client(cn))`.
    pub fn foreign_client_tls_options(&self, cn: &str) -> etcd_client::TlsOptions {
        self.tls_options_presenting(&self.foreign_client(cn))
    }

    /// A certificate for a store member's peer port, signed by this CA: members dial each other
    /// with the same certificate they serve with, so it is valid for both server and client
    /// authentication (SANs `127.0.0.1`, `localhost`). Panics on failure.
    pub fn peer(&self) -> CertFiles {
        self.issue_peer(&self.ca, "peer")
    }

    /// Like [`TestPki::peer`], signed by the second CA that this PKI's members do not trust;
    /// `ca` in the result is still this PKI's CA, so only the certificate is foreign.
    pub fn foreign_peer(&self) -> CertFiles {
        CertFiles {
            ca: self.ca_path(),
            ..self.with_foreign_ca(|ca| self.issue_peer(ca, "foreign-peer"))
        }
    }

    fn issue_peer(&self, ca: &Ca, stem: &str) -> CertFiles {
        ca.issue(
            self.dir.path(),
            &self.stem(stem),
            Leaf {
                cn: "testkit peer",
                sans: &["127.0.0.1".to_string(), "localhost".to_string()],
                eku: &[
                    ExtendedKeyUsagePurpose::ServerAuth,
                    ExtendedKeyUsagePurpose::ClientAuth,
                ],
                expired: false,
            },
        )
        .expect("issue peer certificate")
    }

    /// A file-name-safe, unique stem for certificates with common name `cn`.
    fn stem(&self, cn: &str) -> String {
        let safe: String = cn
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        format!("{safe}-{n}")
    }
}
