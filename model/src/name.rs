//! Validated names: cluster names, and the Kubernetes names that become store key segments.
//!
//! Every name here ends up as a segment of a store key, so each type refuses `/` (and anything
//! else its rule forbids) when it is made or decoded: a key built from these types always parses
//! back into the same parts.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A name that breaks its rule; the message names the value and the rule.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// Not a cluster name.
    #[error(
        "invalid cluster name {value:?}: {reason} \
         (cluster names match ^[a-z0-9]([-a-z0-9]*[a-z0-9])?$, at most 32 characters)"
    )]
    ClusterName {
        /// The refused value.
        value: String,
        /// Which part of the rule it breaks.
        reason: String,
    },
    /// Not an RFC 1123 label (namespaces, service names, hostnames).
    #[error(
        "invalid name {value:?}: {reason} (an RFC 1123 label: lowercase letters, digits and '-', \
         starting and ending with a letter or digit, at most 63 characters)"
    )]
    Label {
        /// The refused value.
        value: String,
        /// Which part of the rule it breaks.
        reason: String,
    },
    /// Not an RFC 1123 subdomain (node and pod names).
    #[error(
        "invalid name {value:?}: {reason} (an RFC 1123 subdomain: RFC 1123 labels joined by '.', \
         at most 253 characters)"
    )]
    Subdomain {
        /// The refused value.
        value: String,
        /// Which part of the rule it breaks.
        reason: String,
    },
}

/// Why `s` is not an RFC 1123 label of at most `max` characters, if it is not one.
fn label_problem(s: &str, max: usize) -> Option<String> {
    if s.is_empty() {
        return Some("must not be empty".into());
    }
    if let Some(c) = s
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
    {
        return Some(format!(
            "may hold only lowercase letters, digits and '-', not {c:?}"
        ));
    }
    if s.len() > max {
        return Some(format!("must be at most {max} characters, not {}", s.len()));
    }
    if s.starts_with('-') || s.ends_with('-') {
        return Some("must start and end with a lowercase letter or digit".into());
    }
    None
}

/// Why `s` is not an RFC 1123 subdomain, if it is not one.
fn subdomain_problem(s: &str) -> Option<String> {
    if s.len() > DnsSubdomain::MAX_LEN {
        return Some(format!(
            "must be at most {} characters, not {}",
            DnsSubdomain::MAX_LEN,
            s.len()
        ));
    }
    s.split('.')
        .enumerate()
        .find_map(|(i, part)| label_problem(part, DnsLabel::MAX_LEN).map(|p| (i, p)))
        .map(|(i, p)| format!("dot-separated part {} {p}", i + 1))
}

/// Shared trait impls of the string newtypes; `$check` returns the error for a bad value.
macro_rules! name_type {
    ($ty:ident, $check:expr) => {
        impl $ty {
            /// Validates `value`; the error names the value and the rule it breaks.
            pub fn new(value: impl Into<String>) -> Result<Self, NameError> {
                let value = value.into();
                let check: fn(String) -> Result<String, NameError> = $check;
                check(value).map($ty)
            }

            /// The name as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }

            /// The name as an owned string.
            pub fn into_string(self) -> String {
                self.0
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl AsRef<str> for $ty {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl PartialEq<str> for $ty {
            fn eq(&self, other: &str) -> bool {
                self.0 == other
            }
        }

        impl PartialEq<&str> for $ty {
            fn eq(&self, other: &&str) -> bool {
                self.0 == *other
            }
        }

        impl FromStr for $ty {
            type Err = NameError;

            fn from_str(s: &str) -> Result<Self, NameError> {
                $ty::new(s)
            }
        }

        impl TryFrom<&str> for $ty {
            type Error = NameError;

            fn try_from(s: &str) -> Result<Self, NameError> {
                $ty::new(s)
            }
        }

        impl TryFrom<String> for $ty {
            type Error = NameError;

            fn try_from(s: String) -> Result<Self, NameError> {
                $ty::new(s)
            }
        }

        impl From<$ty> for String {
            fn from(name: $ty) -> String {
                name.0
            }
        }

        impl Serialize for $ty {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let s = String::deserialize(deserializer)?;
                $ty::new(s).map_err(serde::de::Error::custom)
            }
        }
    };
}

/// A cluster name: `^[a-z0-9]([-a-z0-9]*[a-z0-9])?$`, at most 32 characters.
///
/// It becomes part of store keys, DNS names and certificate names, so it is checked once, here,
/// and carried as this type afterwards.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClusterName(String);

impl ClusterName {
    /// Longest name allowed.
    pub const MAX_LEN: usize = 32;
}

name_type!(
    ClusterName,
    |value| match label_problem(&value, ClusterName::MAX_LEN) {
        None => Ok(value),
        Some(reason) => Err(NameError::ClusterName { value, reason }),
    }
);

/// An RFC 1123 label: a Kubernetes namespace, service name or hostname.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DnsLabel(String);

impl DnsLabel {
    /// Longest label allowed.
    pub const MAX_LEN: usize = 63;
}

name_type!(
    DnsLabel,
    |value| match label_problem(&value, DnsLabel::MAX_LEN) {
        None => Ok(value),
        Some(reason) => Err(NameError::Label { value, reason }),
    }
);

/// An RFC 1123 subdomain: a Kubernetes node or pod name (may hold `.`, never `/`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DnsSubdomain(String);

impl DnsSubdomain {
    /// Longest subdomain allowed.
    pub const MAX_LEN: usize = 253;
}

name_type!(DnsSubdomain, |value| match subdomain_problem(&value) {
    None => Ok(value),
    Some(reason) => Err(NameError::Subdomain { value, reason }),
});

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn cluster_names() {
        for ok in ["a", "a1", "eu-west-1", "0", "a--b", &"x".repeat(32)] {
            assert_eq!(ClusterName::new(ok).unwrap().as_str(), ok);
        }
        for bad in [
            "",
            "-a",
            "a-",
            "A",
            "a_b",
            "a.b",
            "a/b",
            "a b",
            "é",
            &"x".repeat(33),
        ] {
            let err = ClusterName::new(bad).unwrap_err();
            let msg = err.to_string();
            assert!(msg.contains(&format!("{bad:?}")), "names the value: {msg}");
            assert!(msg.contains("[a-z0-9]"), "names the rule: {msg}");
        }
    }

    #[test]
    fn labels_and_subdomains() {
        DnsLabel::new("kube-system").unwrap();
        DnsLabel::new("x".repeat(63)).unwrap();
        for bad in ["", "a.b", "A", "-a", "a/b", &"x".repeat(64)] {
            assert!(DnsLabel::new(bad).is_err(), "{bad:?}");
        }
        DnsSubdomain::new("node-1.example.com").unwrap();
        DnsSubdomain::new(format!("{}.{}", "a".repeat(63), "b".repeat(63))).unwrap();
        for bad in [
            "",
            "a..b",
            ".a",
            "a.",
            "a/b",
            "A.b",
            "a.-b",
            &"a.".repeat(127),
        ] {
            let err = DnsSubdomain::new(bad).unwrap_err();
            assert!(err.to_string().contains(&format!("{bad:?}")), "{err}");
        }
    }

    #[test]
    fn serde_validates() {
        let name: ClusterName = serde_json::from_str("\"eu-1\"").unwrap();
        assert_eq!(serde_json::to_string(&name).unwrap(), "\"eu-1\"");
        let err = serde_json::from_str::<ClusterName>("\"EU\"").unwrap_err();
        assert!(err.to_string().contains("\"EU\""), "{err}");
        assert!(serde_json::from_str::<ClusterName>("7").is_err());
        assert!(serde_json::from_str::<DnsLabel>("\"a/b\"").is_err());
    }

    proptest! {
        /// The checker accepts exactly what the regex and the length limit describe.
        #[test]
        fn cluster_name_rule(s in "[a-z0-9-]{0,40}") {
            let expected = !s.is_empty()
                && s.len() <= ClusterName::MAX_LEN
                && !s.starts_with('-')
                && !s.ends_with('-');
            prop_assert_eq!(ClusterName::new(s.clone()).is_ok(), expected);
        }

        #[test]
        fn never_holds_a_slash(s in "\\PC{0,40}") {
            if let Ok(n) = ClusterName::new(s.clone()) { prop_assert!(!n.as_str().contains('/')); }
            if let Ok(n) = DnsLabel::new(s.clone()) { prop_assert!(!n.as_str().contains('/')); }
            if let Ok(n) = DnsSubdomain::new(s) { prop_assert!(!n.as_str().contains('/')); }
        }
    }
}
