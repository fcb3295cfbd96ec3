//! Security labels (`source:key=value`), the sets an identity stands for.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::name::ClusterName;

/// Source of labels taken from Kubernetes objects.
pub const K8S_SOURCE: &str = "k8s";

/// Key of the label naming the cluster an identity belongs to; policies select peers by it.
pub const CLUSTER_LABEL_KEY: &str = "io.cilium.k8s.policy.cluster";

/// Key of the label every identity carries with its pods' namespace; policies select by it.
pub const NAMESPACE_LABEL_KEY: &str = "io.kubernetes.pod.namespace";

/// Text that is not a `source:key[=value]` label.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LabelError {
    /// No `:` separates a source from the key.
    #[error("label {label:?} has no source: expected source:key=value")]
    MissingSource {
        /// The refused text.
        label: String,
    },
    /// The source is empty or holds characters other than letters, digits, `-`, `_`, `.`.
    #[error(
        "label {label:?} has a bad source: it must be non-empty letters, digits, '-', '_' or '.'"
    )]
    BadSource {
        /// The refused text.
        label: String,
    },
    /// Nothing between the `:` and the `=`.
    #[error("label {label:?} has an empty key")]
    EmptyKey {
        /// The refused text.
        label: String,
    },
    /// A key holding `=` would print as a different key and value.
    #[error("label {label:?} has '=' in its key")]
    EqualsInKey {
        /// The refused text.
        label: String,
    },
    /// Control characters would make labels ambiguous in logs and policy output.
    #[error("label {label:?} holds a control character")]
    ControlCharacter {
        /// The refused text.
        label: String,
    },
}

/// A security label, written `source:key=value` (`source:key` when the value is empty).
///
/// Ordered by source, then key, then value; identities keep their labels in that order.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Label {
    source: String,
    key: String,
    value: String,
}

impl Label {
    /// A label from its parts; refuses the parts that would not print back to the same label.
    pub fn new(
        source: impl Into<String>,
        key: impl Into<String>,
        value: impl Into<String>,
    ) -> Result<Self, LabelError> {
        let label = Label {
            source: source.into(),
            key: key.into(),
            value: value.into(),
        };
        let text = || label.to_string();
        if label.source.is_empty()
            || !label
                .source
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        {
            return Err(LabelError::BadSource { label: text() });
        }
        if label.key.is_empty() {
            return Err(LabelError::EmptyKey { label: text() });
        }
        if label.key.contains('=') {
            return Err(LabelError::EqualsInKey { label: text() });
        }
        if [&label.source, &label.key, &label.value]
            .iter()
            .any(|s| s.chars().any(char::is_control))
        {
            return Err(LabelError::ControlCharacter { label: text() });
        }
        Ok(label)
    }

    /// `k8s:io.cilium.k8s.policy.cluster=<cluster>`, which every cluster identity carries.
    pub fn cluster(cluster: &ClusterName) -> Self {
        Label {
            source: K8S_SOURCE.into(),
            key: CLUSTER_LABEL_KEY.into(),
            value: cluster.as_str().into(),
        }
    }

    /// Where the label comes from, e.g. `k8s`.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The label's key, e.g. `app`.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The label's value; empty for a key-only label.
    pub fn value(&self) -> &str {
        &self.value
    }
}

impl fmt::Display for Label {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.value.is_empty() {
            write!(f, "{}:{}", self.source, self.key)
        } else {
            write!(f, "{}:{}={}", self.source, self.key, self.value)
        }
    }
}

impl FromStr for Label {
    type Err = LabelError;

    /// Splits at the first `:` and then at the first `=`.
    fn from_str(s: &str) -> Result<Self, LabelError> {
        let (source, rest) = s
            .split_once(':')
            .ok_or_else(|| LabelError::MissingSource { label: s.into() })?;
        let (key, value) = rest.split_once('=').unwrap_or((rest, ""));
        Label::new(source, key, value).map_err(|e| match e {
            LabelError::MissingSource { .. } => LabelError::MissingSource { label: s.into() },
            LabelError::BadSource { .. } => LabelError::BadSource { label: s.into() },
            LabelError::EmptyKey { .. } => LabelError::EmptyKey { label: s.into() },
            LabelError::EqualsInKey { .. } => LabelError::EqualsInKey { label: s.into() },
            LabelError::ControlCharacter { .. } => LabelError::ControlCharacter { label: s.into() },
        })
    }
}

impl Serialize for Label {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Label {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn examples() {
        let l: Label = "k8s:app=web".parse().unwrap();
        assert_eq!((l.source(), l.key(), l.value()), ("k8s", "app", "web"));
        let l: Label = "reserved:host".parse().unwrap();
        assert_eq!((l.key(), l.value()), ("host", ""));
        assert_eq!(l.to_string(), "reserved:host");
        let l: Label = "cidr:10.0.0.0/8".parse().unwrap();
        assert_eq!(l.key(), "10.0.0.0/8");
        let l: Label = "k8s:a=b=c".parse().unwrap();
        assert_eq!(l.value(), "b=c");
        assert_eq!(
            Label::cluster(&ClusterName::new("eu").unwrap()).to_string(),
            "k8s:io.cilium.k8s.policy.cluster=eu"
        );
        for bad in [
            "app=web", ":app=web", "k8s:", "k8s:=web", "k 8s:a", "k8s:a=\n",
        ] {
            let err = bad.parse::<Label>().unwrap_err();
            assert!(err.to_string().contains(&format!("{bad:?}")), "{err}");
        }
        assert!(Label::new("k8s", "a=b", "c").is_err());
    }

    proptest! {
        #[test]
        fn round_trip(l in crate::testutil::label()) {
            prop_assert_eq!(l.to_string().parse::<Label>().unwrap(), l.clone());
            let json = serde_json::to_string(&l).unwrap();
            prop_assert_eq!(serde_json::from_str::<Label>(&json).unwrap(), l);
        }

        #[test]
        fn parse_is_total(s in "\\PC{0,30}") {
            if let Ok(l) = s.parse::<Label>() {
                prop_assert_eq!(l.to_string().parse::<Label>().unwrap(), l);
            }
        }
    }
}
