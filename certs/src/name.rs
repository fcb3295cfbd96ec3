//! Cluster names and the users that certificates name.

use std::fmt;
use std::str::FromStr;

use rustls_pki_types::CertificateDer;

use crate::Error;

pub use model::ClusterName;

/// Who a client certificate speaks for; its common name is `<role>-<cluster>`.
///
/// The store maps a verified peer's CN to its rights through [`User::parse`], so parsing is
/// strict: anything but the exact `cn()` of some user is an error, never a default role.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum User {
    /// The cluster's own apiserver and kvstoremesh: read-write on the cluster's own store.
    Admin(ClusterName),
    /// The cluster as a peer, reading another cluster's store (presented by its kvstoremesh):
    /// read-only on what that store exports. Issued to and kept by the reading cluster, so
    /// its key never leaves it; only CA certificates are exchanged between clusters.
    Remote(ClusterName),
    /// The cluster's node agents: read-only on the cluster's own store's cache.
    Local(ClusterName),
}

impl User {
    const ADMIN: &'static str = "admin";
    const REMOTE: &'static str = "remote";
    const LOCAL: &'static str = "local";

    /// The admin user of `cluster`.
    pub fn admin(cluster: &str) -> Result<Self, Error> {
        Ok(User::Admin(ClusterName::new(cluster)?))
    }

    /// The user `cluster` presents when reading a peer's store.
    pub fn remote(cluster: &str) -> Result<Self, Error> {
        Ok(User::Remote(ClusterName::new(cluster)?))
    }

    /// The user `cluster`'s node agents use.
    pub fn local(cluster: &str) -> Result<Self, Error> {
        Ok(User::Local(ClusterName::new(cluster)?))
    }

    /// All three users of `cluster`, in the order admin, remote, local.
    pub fn all(cluster: &ClusterName) -> [User; 3] {
        [
            User::Admin(cluster.clone()),
            User::Remote(cluster.clone()),
            User::Local(cluster.clone()),
        ]
    }

    /// The role part of the common name: `admin`, `remote` or `local`.
    pub fn role(&self) -> &'static str {
        match self {
            User::Admin(_) => Self::ADMIN,
            User::Remote(_) => Self::REMOTE,
            User::Local(_) => Self::LOCAL,
        }
    }

    /// The cluster the user belongs to.
    pub fn cluster(&self) -> &ClusterName {
        match self {
            User::Admin(c) | User::Remote(c) | User::Local(c) => c,
        }
    }

    /// The certificate common name, e.g. `admin-a`; also the user's directory name.
    pub fn cn(&self) -> String {
        format!("{}-{}", self.role(), self.cluster())
    }

    /// Parses a common name back into a user; the inverse of [`User::cn`].
    ///
    /// Roles hold no `-`, so the first `-` splits role from cluster unambiguously
    /// (`admin-eu-west` is the admin of `eu-west`).
    pub fn parse(cn: &str) -> Result<Self, Error> {
        let invalid = |reason: String| Error::InvalidUser {
            cn: cn.to_owned(),
            reason,
        };
        let Some((role, cluster)) = cn.split_once('-') else {
            return Err(invalid(
                "expected admin-<cluster>, remote-<cluster> or local-<cluster>".into(),
            ));
        };
        let make: fn(ClusterName) -> User = match role {
            Self::ADMIN => User::Admin,
            Self::REMOTE => User::Remote,
            Self::LOCAL => User::Local,
            _ => {
                return Err(invalid(format!(
                    "unknown role {role:?} (expected admin, remote or local)"
                )));
            }
        };
        match ClusterName::new(cluster) {
            Ok(cluster) => Ok(make(cluster)),
            Err(e) => Err(invalid(e.to_string())),
        }
    }

    /// The user named by a certificate's subject, which must hold exactly one common name.
    ///
    /// Does not verify the certificate: call it on a chain the TLS stack (or
    /// [`TrustBundle::verify_client`](crate::TrustBundle::verify_client)) has accepted.
    pub fn from_certificate(cert: &CertificateDer<'_>) -> Result<Self, Error> {
        let (_, x509) = x509_parser::parse_x509_certificate(cert)
            .map_err(|e| Error::BadCertificate(e.to_string()))?;
        let subject = x509.subject().to_string();
        let mut cns = x509.subject().iter_common_name();
        let (Some(cn), None) = (cns.next(), cns.next()) else {
            return Err(Error::InvalidUser {
                cn: subject,
                reason: "the subject must hold exactly one common name".into(),
            });
        };
        let cn = cn.as_str().map_err(|_| Error::InvalidUser {
            cn: subject.clone(),
            reason: "the common name is not a text string".into(),
        })?;
        User::parse(cn)
    }
}

impl fmt::Display for User {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.role(), self.cluster())
    }
}

impl FromStr for User {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        User::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn cluster_names() {
        for ok in ["a", "a1", "eu-west-1", "0", &"x".repeat(32)] {
            ClusterName::new(ok).unwrap();
        }
        for bad in [
            "",
            "-a",
            "a-",
            "A",
            "a_b",
            "a.b",
            "a b",
            "é",
            &"x".repeat(33),
        ] {
            let err = ClusterName::new(bad).unwrap_err();
            assert!(
                err.to_string().contains(&format!("{bad:?}")),
                "error should name the value: {err}"
            );
        }
    }

    #[test]
    fn parse_examples() {
        assert_eq!(
            User::parse("admin-eu-west").unwrap(),
            User::admin("eu-west").unwrap()
        );
        assert_eq!(User::parse("remote-b").unwrap(), User::remote("b").unwrap());
        assert_eq!(User::parse("local-c1").unwrap(), User::local("c1").unwrap());
        for junk in [
            "",
            "admin",
            "admin-",
            "-a",
            "Admin-a",
            "root-a",
            "admin-A",
            "admin-a ",
            " admin-a",
            "admin--a",
            "admin-a-",
            "admin-a\0",
            "a.mesh.local",
            "local_a",
        ] {
            assert!(User::parse(junk).is_err(), "{junk:?} must not parse");
        }
    }

    fn cluster_name() -> impl Strategy<Value = ClusterName> {
        "[a-z0-9]([-a-z0-9]{0,30}[a-z0-9])?".prop_map(|s| ClusterName::new(s).unwrap())
    }

    fn user() -> impl Strategy<Value = User> {
        (0..3u8, cluster_name()).prop_map(|(r, c)| match r {
            0 => User::Admin(c),
            1 => User::Remote(c),
            _ => User::Local(c),
        })
    }

    proptest! {
        #[test]
        fn cn_round_trips(u in user()) {
            prop_assert_eq!(User::parse(&u.cn()).unwrap(), u.clone());
            prop_assert_eq!(u.to_string(), u.cn());
        }

        /// Whatever parses is canonical: it prints back to exactly the input, so two
        /// different CNs can never map to the same user.
        #[test]
        fn parse_is_canonical(s in "\\PC{0,40}") {
            if let Ok(u) = User::parse(&s) {
                prop_assert_eq!(u.cn(), s);
            }
        }

        #[test]
        fn parse_is_canonical_near_misses(s in "(admin|remote|local|Admin|x)[-_ ]?[-a-zA-Z0-9.]{0,34}") {
            match User::parse(&s) {
                Ok(u) => prop_assert_eq!(u.cn(), s),
                Err(e) => {
                    let quoted = format!("{s:?}");
                    prop_assert!(e.to_string().contains(&quoted));
                }
            }
        }
    }
}
