//! How values are encoded: versioned, canonical JSON, checked on the way in.

use std::fmt;
use std::net::IpAddr;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::cluster::{ClusterId, MaxConnectedClusters};
use crate::label::LabelError;
use crate::name::NameError;
use crate::net::IpPrefix;

/// The `schema` field of a value: always `V` when written; anything else is refused on read.
///
/// A zero-sized field, so a value cannot be built or encoded without its version.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SchemaVersion<const V: u32>;

impl<const V: u32> SchemaVersion<V> {
    /// The version this field stands for.
    pub const VERSION: u32 = V;
}

impl<const V: u32> Serialize for SchemaVersion<V> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_u32(V)
    }
}

impl<'de, const V: u32> Deserialize<'de> for SchemaVersion<V> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let found = u64::deserialize(deserializer)?;
        if found == u64::from(V) {
            Ok(SchemaVersion)
        } else {
            Err(serde::de::Error::custom(format_args!(
                "unsupported schema version {found} (this build reads {V})"
            )))
        }
    }
}

/// A value published in a store: versioned JSON with invariants checked on decode.
pub trait StoreValue: Serialize + DeserializeOwned {
    /// The schema version this build writes and the only one it reads.
    const SCHEMA: u32;

    /// What the value is, for messages: `node`, `service`, ...
    const WHAT: &'static str;

    /// Checks the invariants that types alone do not carry.
    fn validate(&self) -> Result<(), ValueError>;

    /// The canonical encoding: equal values give equal bytes, so a publisher can skip writes
    /// whose bytes did not change.
    fn encode(&self) -> Vec<u8> {
        // Serializing cannot fail: every map key is a string or an IP, every field plain data.
        serde_json::to_vec(self).expect("store values always serialize")
    }

    /// Decodes and validates bytes read from a store; never panics on any input.
    fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        decode(bytes)
    }
}

/// Only the version, read before the whole value so an unknown version is named as such
/// rather than as whichever field it broke.
#[derive(Deserialize)]
struct Probe {
    #[serde(default)]
    schema: Option<serde_json::Value>,
}

fn decode<T: StoreValue>(bytes: &[u8]) -> Result<T, DecodeError> {
    let what = T::WHAT;
    let supported = T::SCHEMA;
    let json_error = |source| DecodeError::Json { what, source };
    // Serde would also read a struct from an array; a value is only ever an object.
    if !matches!(
        bytes.iter().find(|b| !b.is_ascii_whitespace()),
        None | Some(b'{')
    ) {
        serde_json::from_slice::<serde::de::IgnoredAny>(bytes).map_err(json_error)?;
        return Err(DecodeError::NotAnObject { what });
    }
    let probe: Probe = serde_json::from_slice(bytes).map_err(json_error)?;
    match probe.schema {
        None => return Err(DecodeError::MissingSchema { what, supported }),
        Some(found) if found.as_u64() != Some(supported.into()) => {
            return Err(DecodeError::UnsupportedSchema {
                what,
                found: found.to_string(),
                supported,
            });
        }
        Some(_) => {}
    }
    let value: T = serde_json::from_slice(bytes).map_err(|source| DecodeError::Fields {
        what,
        schema: supported,
        source,
    })?;
    value
        .validate()
        .map_err(|source| DecodeError::Invalid { what, source })?;
    Ok(value)
}

/// Bytes that are not a value of this build's schema.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// Not JSON at all, or cut short.
    #[error("{what} value is not valid JSON: {source}")]
    Json {
        /// What was being decoded.
        what: &'static str,
        /// The parser's complaint, with its position.
        source: serde_json::Error,
    },
    /// JSON, but not an object.
    #[error("{what} value is not a JSON object")]
    NotAnObject {
        /// What was being decoded.
        what: &'static str,
    },
    /// No `schema` field (or `null`): refused rather than guessed.
    #[error("{what} value has no \"schema\" version (this build reads \"schema\": {supported})")]
    MissingSchema {
        /// What was being decoded.
        what: &'static str,
        /// The version this build reads.
        supported: u32,
    },
    /// A version this build does not read: written by a newer (or broken) publisher.
    #[error("{what} value has schema version {found}; this build reads only version {supported}")]
    UnsupportedSchema {
        /// What was being decoded.
        what: &'static str,
        /// The version found, as JSON.
        found: String,
        /// The version this build reads.
        supported: u32,
    },
    /// The right version, but fields are missing or of the wrong type.
    #[error("{what} value does not match schema version {schema}: {source}")]
    Fields {
        /// What was being decoded.
        what: &'static str,
        /// The version it claimed.
        schema: u32,
        /// The parser's complaint, naming the field or value.
        source: serde_json::Error,
    },
    /// Well-formed, but an invariant is broken.
    #[error("invalid {what} value: {source}")]
    Invalid {
        /// What was being decoded.
        what: &'static str,
        /// The broken invariant.
        source: ValueError,
    },
}

/// Where a port sits in a service, for messages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PortPlace {
    /// A frontend (cluster IP) port.
    Frontend(IpAddr),
    /// A backend port.
    Backend(IpAddr),
    /// A port of an exported service.
    Export,
}

impl fmt::Display for PortPlace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PortPlace::Frontend(ip) => write!(f, "frontend {ip}"),
            PortPlace::Backend(ip) => write!(f, "backend {ip}"),
            PortPlace::Export => f.write_str("export"),
        }
    }
}

/// A value whose fields are well-typed but contradict each other.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ValueError {
    /// The cluster id is above the configured max-connected-clusters.
    #[error("cluster id {id} exceeds max-connected-clusters {max}")]
    ClusterIdExceedsMax {
        /// The cluster id.
        id: ClusterId,
        /// The configured limit.
        max: MaxConnectedClusters,
    },
    /// The same node address listed twice.
    #[error("address {ip} is listed twice")]
    DuplicateAddress {
        /// The repeated address.
        ip: IpAddr,
    },
    /// The same pod CIDR listed twice.
    #[error("pod CIDR {cidr} is listed twice")]
    DuplicatePodCidr {
        /// The repeated CIDR.
        cidr: IpPrefix,
    },
    /// Port 0 cannot be connected to.
    #[error("{place} port {name:?} is 0")]
    ZeroPort {
        /// Where the port is.
        place: PortPlace,
        /// The port's name.
        name: String,
    },
    /// Identity labels out of order or repeated, so equal sets would encode differently.
    #[error("identity labels must be sorted and unique: {before} is followed by {after}")]
    LabelsNotSorted {
        /// The earlier label.
        before: String,
        /// The label that should not follow it.
        after: String,
    },
    /// An identity without the label that says which cluster it belongs to.
    #[error("identity has no k8s:io.cilium.k8s.policy.cluster label")]
    MissingClusterLabel,
    /// More than one label with the cluster key: policies could match either.
    #[error("identity has more than one cluster label: {first} and {second}")]
    ConflictingClusterLabels {
        /// One cluster label.
        first: String,
        /// Another.
        second: String,
    },
    /// The cluster label's key under a source other than `k8s`, which policies matching any
    /// source would read as a cluster claim.
    #[error("cluster label {label} must have source k8s")]
    ClusterLabelSource {
        /// The offending label.
        label: String,
    },
    /// The cluster label's value is not a cluster name.
    #[error("cluster label {label} does not name a cluster: {source}")]
    ClusterLabelName {
        /// The offending label.
        label: String,
        /// Why its value is not a cluster name.
        source: NameError,
    },
    /// A pod name without the namespace that scopes it.
    #[error("pod {pod:?} has no namespace")]
    PodWithoutNamespace {
        /// The pod name.
        pod: String,
    },
    /// A label that does not parse.
    #[error(transparent)]
    Label(#[from] LabelError),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil;
    use crate::{ClusterConfig, Entry, Identity, Node};
    use proptest::prelude::*;

    const NODE: &str = r#"{"schema":1,"name":"n1","cluster":"a","cluster_id":1,"addresses":[{"kind":"InternalIP","ip":"10.0.0.1"}],"pod_cidrs":["10.1.0.0/24"],"labels":{}}"#;

    #[test]
    fn decodes_a_node() {
        let node = Node::decode(NODE.as_bytes()).unwrap();
        assert_eq!(node.name, "n1");
        assert_eq!(node.encode(), NODE.as_bytes(), "canonical bytes");
    }

    fn node_with(field: &str, value: &str) -> Vec<u8> {
        let mut v: serde_json::Value = serde_json::from_str(NODE).unwrap();
        let obj = v.as_object_mut().unwrap();
        if value.is_empty() {
            obj.remove(field);
        } else {
            obj.insert(field.into(), serde_json::from_str(value).unwrap());
        }
        serde_json::to_vec(&v).unwrap()
    }

    #[test]
    fn schema_rule() {
        let err = Node::decode(&node_with("schema", "")).unwrap_err();
        assert!(
            matches!(err, DecodeError::MissingSchema { supported: 1, .. }),
            "{err}"
        );
        assert_eq!(
            err.to_string(),
            "node value has no \"schema\" version (this build reads \"schema\": 1)"
        );
        let err = Node::decode(&node_with("schema", "null")).unwrap_err();
        assert!(matches!(err, DecodeError::MissingSchema { .. }), "{err}");
        for found in ["2", "0", "\"1\"", "1.0", "-1", "{}"] {
            let err = Node::decode(&node_with("schema", found)).unwrap_err();
            match &err {
                DecodeError::UnsupportedSchema { found: f, .. } => assert_eq!(f, found),
                other => panic!("{found}: {other}"),
            }
            assert!(err.to_string().contains("reads only version 1"), "{err}");
        }
        let twice = NODE.replacen("{\"schema\":1,", "{\"schema\":1,\"schema\":1,", 1);
        assert!(Node::decode(twice.as_bytes()).is_err());
    }

    #[test]
    fn refusals() {
        let cases: &[(&[u8], &str)] = &[
            (b"", "Json"),
            (b"   ", "Json"),
            (b"{", "Json"),
            (b"nul", "Json"),
            (b"{\"schema\":1,}", "Json"),
            (b"\xff\xfe", "Json"),
            (b"[1,\"n1\",\"a\",1,[],[],{}]", "NotAnObject"),
            (b"\"node\"", "NotAnObject"),
            (b"17", "NotAnObject"),
            (b"{\"schema\":1}", "Fields"),
            (b"{\"schema\":1} x", "Json"),
        ];
        for (bytes, variant) in cases {
            let err = Node::decode(bytes).unwrap_err();
            assert!(
                format!("{err:?}").starts_with(variant),
                "{:?}: {err:?}",
                String::from_utf8_lossy(bytes)
            );
        }
        let err = Node::decode(&node_with("cluster", "\"A\"")).unwrap_err();
        assert!(matches!(err, DecodeError::Fields { .. }), "{err}");
        assert!(err.to_string().contains("\"A\""), "{err}");
        let err = Node::decode(&node_with("cluster_id", "0")).unwrap_err();
        assert!(matches!(err, DecodeError::Fields { .. }), "{err}");
        let err = Node::decode(&node_with("pod_cidrs", r#"["10.1.0.1/24"]"#)).unwrap_err();
        assert!(err.to_string().contains("host bits"), "{err}");
        let err =
            Node::decode(&node_with("pod_cidrs", r#"["10.1.0.0/24","10.1.0.0/24"]"#)).unwrap_err();
        assert!(
            matches!(
                err,
                DecodeError::Invalid {
                    source: ValueError::DuplicatePodCidr { .. },
                    ..
                }
            ),
            "{err}"
        );
        // Unknown fields are ignored: adding an optional field does not need a new version.
        Node::decode(&node_with("future", "{\"x\":1}")).unwrap();
        // Deep nesting is an error, not a stack overflow.
        let deep = format!(
            "{{\"schema\":1,\"x\":{}{}}}",
            "[".repeat(10_000),
            "]".repeat(10_000)
        );
        assert!(Node::decode(deep.as_bytes()).is_err());
    }

    #[test]
    fn identity_labels_are_checked() {
        let id = r#"{"schema":1,"id":65792,"labels":["k8s:app=web","k8s:io.cilium.k8s.policy.cluster=a"]}"#;
        Identity::decode(id.as_bytes()).unwrap();
        let unsorted = r#"{"schema":1,"id":65792,"labels":["k8s:io.cilium.k8s.policy.cluster=a","k8s:app=web"]}"#;
        let err = Identity::decode(unsorted.as_bytes()).unwrap_err();
        assert!(err.to_string().contains("sorted and unique"), "{err}");
        let dup = r#"{"schema":1,"id":65792,"labels":["k8s:app=web","k8s:app=web","k8s:io.cilium.k8s.policy.cluster=a"]}"#;
        assert!(Identity::decode(dup.as_bytes()).is_err());
        let none = r#"{"schema":1,"id":65792,"labels":["k8s:app=web"]}"#;
        let err = Identity::decode(none.as_bytes()).unwrap_err();
        assert!(
            matches!(
                err,
                DecodeError::Invalid {
                    source: ValueError::MissingClusterLabel,
                    ..
                }
            ),
            "{err}"
        );
        let two = r#"{"schema":1,"id":65792,"labels":["k8s:io.cilium.k8s.policy.cluster=a","k8s:io.cilium.k8s.policy.cluster=b"]}"#;
        let err = Identity::decode(two.as_bytes()).unwrap_err();
        assert!(
            matches!(
                err,
                DecodeError::Invalid {
                    source: ValueError::ConflictingClusterLabels { .. },
                    ..
                }
            ),
            "{err}"
        );
        let other_source = r#"{"schema":1,"id":65792,"labels":["container:io.cilium.k8s.policy.cluster=b","k8s:io.cilium.k8s.policy.cluster=a"]}"#;
        let err = Identity::decode(other_source.as_bytes()).unwrap_err();
        assert!(
            matches!(
                err,
                DecodeError::Invalid {
                    source: ValueError::ClusterLabelSource { .. },
                    ..
                }
            ),
            "{err}"
        );
        let bad_name = r#"{"schema":1,"id":65792,"labels":["k8s:io.cilium.k8s.policy.cluster=A"]}"#;
        let err = Identity::decode(bad_name.as_bytes()).unwrap_err();
        assert!(
            matches!(
                err,
                DecodeError::Invalid {
                    source: ValueError::ClusterLabelName { .. },
                    ..
                }
            ),
            "{err}"
        );
        let bad_label = r#"{"schema":1,"id":65792,"labels":["app=web"]}"#;
        assert!(matches!(
            Identity::decode(bad_label.as_bytes()).unwrap_err(),
            DecodeError::Fields { .. }
        ));
    }

    #[test]
    fn cluster_config_limits() {
        let ok = r#"{"schema":1,"name":"a","id":300,"max_connected_clusters":511,"capabilities":{"sync_canaries":true,"cached":true,"service_exports":false}}"#;
        let config = ClusterConfig::decode(ok.as_bytes()).unwrap();
        assert_eq!(config.encode(), ok.as_bytes());
        let too_big = ok.replace("511", "255");
        let err = ClusterConfig::decode(too_big.as_bytes()).unwrap_err();
        assert!(
            err.to_string()
                .contains("cluster id 300 exceeds max-connected-clusters 255"),
            "{err}"
        );
        let bad_max = ok.replace("511", "300");
        assert!(ClusterConfig::decode(bad_max.as_bytes()).is_err());
    }

    proptest! {
        #[test]
        fn round_trip_is_canonical((_, entry) in testutil::peer_and_entry()) {
            let bytes = entry.encode();
            let prefix = "{\"schema\":1,";
            prop_assert!(bytes.starts_with(prefix.as_bytes()));
            let decoded = Entry::decode(entry.kind(), &bytes).unwrap();
            prop_assert_eq!(&decoded, &entry);
            prop_assert_eq!(decoded.encode(), bytes);
        }

        #[test]
        fn config_round_trip(config in testutil::cluster_config()) {
            let bytes = config.encode();
            prop_assert_eq!(ClusterConfig::decode(&bytes).unwrap(), config);
        }

        /// Every strict prefix of a value is refused, never half-read.
        #[test]
        fn truncation_refused((_, entry) in testutil::peer_and_entry(), cut in any::<prop::sample::Index>()) {
            let bytes = entry.encode();
            let cut = cut.index(bytes.len());
            let err = Entry::decode(entry.kind(), &bytes[..cut]).unwrap_err();
            prop_assert!(matches!(err, DecodeError::Json { .. }), "{}", err);
        }

        #[test]
        fn garbage_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..64)) {
            for kind in crate::Kind::ALL {
                prop_assert!(Entry::decode(kind, &bytes).is_err());
            }
        }

        /// Flipping one byte either is refused or decodes to a value that is valid and
        /// re-encodes canonically; it never panics.
        #[test]
        fn mutation_never_panics((_, entry) in testutil::peer_and_entry(), at in any::<prop::sample::Index>(), byte in any::<u8>()) {
            let mut bytes = entry.encode();
            let at = at.index(bytes.len());
            bytes[at] = byte;
            if let Ok(decoded) = Entry::decode(entry.kind(), &bytes) {
                let again = Entry::decode(entry.kind(), &decoded.encode()).unwrap();
                prop_assert_eq!(again, decoded);
            }
        }
    }
}
