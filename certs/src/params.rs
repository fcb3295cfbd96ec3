//! Key types and validity windows.

use std::fmt;
use std::str::FromStr;

use rcgen::{KeyPair, SignatureAlgorithm};
use time::{Duration, OffsetDateTime};

use crate::Error;

/// The kind of key generated for a CA or a leaf.
///
/// ECDSA P-256 is the default: every TLS stack (etcd's Go one included) supports it and it is
/// fast. Ed25519 is smaller still but not accepted by every client.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum KeyType {
    /// ECDSA on NIST P-256 with SHA-256.
    #[default]
    EcdsaP256,
    /// ECDSA on NIST P-384 with SHA-384.
    EcdsaP384,
    /// Ed25519.
    Ed25519,
}

impl KeyType {
    /// Every supported key type.
    pub const ALL: [KeyType; 3] = [KeyType::EcdsaP256, KeyType::EcdsaP384, KeyType::Ed25519];

    /// The name used on the command line: `ecdsa-p256`, `ecdsa-p384` or `ed25519`.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyType::EcdsaP256 => "ecdsa-p256",
            KeyType::EcdsaP384 => "ecdsa-p384",
            KeyType::Ed25519 => "ed25519",
        }
    }

    fn algorithm(self) -> &'static SignatureAlgorithm {
        match self {
            KeyType::EcdsaP256 => &rcgen::PKCS_ECDSA_P256_SHA256,
            KeyType::EcdsaP384 => &rcgen::PKCS_ECDSA_P384_SHA384,
            KeyType::Ed25519 => &rcgen::PKCS_ED25519,
        }
    }

    pub(crate) fn generate(self) -> Result<KeyPair, Error> {
        KeyPair::generate_for(self.algorithm()).map_err(Error::Generate)
    }
}

impl fmt::Display for KeyType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for KeyType {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        KeyType::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| Error::UnknownKeyType(s.to_owned()))
    }
}

/// Default lifetime of a CA: rotating a CA means touching every cluster, so it lives long.
pub const DEFAULT_CA_LIFETIME: Duration = Duration::days(3650);

/// Default lifetime of server and client certificates.
pub const DEFAULT_LEAF_LIFETIME: Duration = Duration::days(365);

/// Longest lifetime [`parse_lifetime`] accepts; beyond that a typo is likelier than intent.
pub const MAX_LIFETIME: Duration = Duration::days(100 * 365);

/// How far before "now" a fresh certificate becomes valid, so that peers whose clocks lag
/// a little accept it straight away.
pub const BACKDATE: Duration = Duration::minutes(5);

/// When a certificate is valid: `not_before..=not_after`, whole seconds (X.509 has no more).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Validity {
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
}

impl Validity {
    /// An explicit window; it must not end before it starts.
    pub fn new(not_before: OffsetDateTime, not_after: OffsetDateTime) -> Result<Self, Error> {
        let not_before = whole_seconds(not_before);
        let not_after = whole_seconds(not_after);
        if not_after < not_before {
            return Err(Error::EmptyValidity {
                not_before,
                not_after,
            });
        }
        Ok(Validity {
            not_before,
            not_after,
        })
    }

    /// Valid from [`BACKDATE`] ago until `lifetime` from now.
    pub fn starting_now(lifetime: Duration) -> Result<Self, Error> {
        let now = OffsetDateTime::now_utc();
        Validity::new(now - BACKDATE, now + lifetime)
    }

    /// Like [`Validity::starting_now`], for the built-in positive defaults: a negative
    /// lifetime counts as zero, so there is nothing to fail.
    pub(crate) fn from_now_saturating(lifetime: Duration) -> Self {
        let now = whole_seconds(OffsetDateTime::now_utc());
        Validity {
            not_before: now - BACKDATE,
            not_after: now + lifetime.max(Duration::ZERO),
        }
    }

    /// Start of the window.
    pub fn not_before(&self) -> OffsetDateTime {
        self.not_before
    }

    /// End of the window.
    pub fn not_after(&self) -> OffsetDateTime {
        self.not_after
    }

    /// Whether `at` falls inside the window.
    pub fn contains(&self, at: OffsetDateTime) -> bool {
        self.not_before <= at && at <= self.not_after
    }
}

fn whole_seconds(t: OffsetDateTime) -> OffsetDateTime {
    t.replace_nanosecond(0).unwrap_or(t)
}

/// Parses a lifetime such as `365d`, `12h` or `10y` (a year is 365 days).
pub fn parse_lifetime(value: &str) -> Result<Duration, Error> {
    let invalid = |reason| Error::InvalidLifetime {
        value: value.to_owned(),
        reason,
    };
    let digits = value.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let unit = &value[digits.len()..];
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid(
            "expected a whole number followed by h, d or y, e.g. 365d",
        ));
    }
    let per_unit = match unit {
        "h" => Duration::HOUR,
        "d" => Duration::DAY,
        "y" => Duration::days(365),
        "" => return Err(invalid("missing unit: add h, d or y, e.g. 365d")),
        _ => return Err(invalid("unknown unit: use h, d or y")),
    };
    let count: i32 = digits.parse().map_err(|_| invalid("number too large"))?;
    let lifetime = per_unit
        .checked_mul(count)
        .ok_or_else(|| invalid("number too large"))?;
    if lifetime.is_zero() {
        return Err(invalid("must be longer than zero"));
    }
    if lifetime > MAX_LIFETIME {
        return Err(invalid("must be at most 100 years"));
    }
    Ok(lifetime)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lifetimes() {
        assert_eq!(parse_lifetime("365d").unwrap(), Duration::days(365));
        assert_eq!(parse_lifetime("12h").unwrap(), Duration::hours(12));
        assert_eq!(parse_lifetime("10y").unwrap(), Duration::days(3650));
        for bad in [
            "",
            "d",
            "0d",
            "365",
            "1.5d",
            "-1d",
            "1w",
            "1 d",
            "99999999999d",
            "101y",
        ] {
            let err = parse_lifetime(bad).unwrap_err();
            assert!(err.to_string().contains(&format!("{bad:?}")), "{err}");
        }
    }

    #[test]
    fn key_type_names_round_trip() {
        for k in KeyType::ALL {
            assert_eq!(k.as_str().parse::<KeyType>().unwrap(), k);
        }
        assert!("rsa".parse::<KeyType>().is_err());
    }

    #[test]
    fn validity_rejects_backwards_window() {
        let now = OffsetDateTime::now_utc();
        assert!(Validity::new(now, now - Duration::SECOND).is_err());
        let v = Validity::starting_now(Duration::days(1)).unwrap();
        assert!(v.contains(now));
        assert_eq!(v.not_before().nanosecond(), 0);
    }
}
