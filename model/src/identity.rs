//! Numeric security identities and how the cluster id is packed into them.
//!
//! An identity is 24 bits. The top 8 bits (9 with 511 clusters) hold the cluster id, the rest
//! a cluster-local number. Local numbers below [`MIN_LOCAL_IDENTITY`] are never allocated, so
//! a cluster's identities can never be mistaken for the reserved identities (host, world, ...)
//! that every cluster shares.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use std::collections::BTreeSet;

use crate::cluster::{ClusterId, IdError, MaxConnectedClusters};
use crate::keys::StateKey;
use crate::label::{CLUSTER_LABEL_KEY, K8S_SOURCE, Label};
use crate::name::ClusterName;
use crate::value::{SchemaVersion, StoreValue, ValueError};

/// Bits in a numeric identity.
pub const IDENTITY_BITS: u32 = 24;

/// Lowest cluster-local part a cluster allocates; lower values are reserved.
pub const MIN_LOCAL_IDENTITY: u32 = 256;

/// An identity that is not a number, does not fit, or belongs to no cluster.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    /// The value needs more than 24 bits.
    #[error("identity {value} does not fit in 24 bits (at most 16777215)")]
    TooLarge {
        /// The refused value, as written.
        value: String,
    },
    /// The text is not a plain decimal number.
    #[error("identity {value:?} is not a decimal number")]
    NotNumeric {
        /// The refused text.
        value: String,
    },
    /// The cluster bits are 0: a reserved or cluster-less identity, not a cluster's.
    #[error("identity {identity} carries no cluster id, so it is no cluster's identity")]
    NoCluster {
        /// The refused identity.
        identity: u32,
    },
    /// The local part is below 256, which no cluster allocates.
    #[error(
        "identity {identity} has local part {local} in cluster {cluster}'s reserved range \
         (below 256), which is never allocated"
    )]
    Reserved {
        /// The refused identity.
        identity: u32,
        /// The cluster id in its top bits.
        cluster: u16,
        /// Its cluster-local part.
        local: u32,
    },
    /// A local part that does not fit beside the cluster id.
    #[error("local identity {local} does not fit in {bits} bits")]
    LocalTooLarge {
        /// The refused local part.
        local: u32,
        /// The bits available for it.
        bits: u32,
    },
    /// The cluster id is not allowed under the given limit.
    #[error(transparent)]
    ClusterId(#[from] IdError),
}

/// A 24-bit numeric security identity.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NumericIdentity(u32);

impl NumericIdentity {
    /// Largest identity: 2^24 - 1.
    pub const MAX: u32 = (1 << IDENTITY_BITS) - 1;

    /// Checks that `value` fits in 24 bits.
    pub fn new(value: u32) -> Result<Self, IdentityError> {
        if value > Self::MAX {
            return Err(IdentityError::TooLarge {
                value: value.to_string(),
            });
        }
        Ok(NumericIdentity(value))
    }

    /// Packs a cluster id and a cluster-local part (≥ 256) into an identity.
    pub fn compose(
        cluster: ClusterId,
        local: u32,
        max: MaxConnectedClusters,
    ) -> Result<Self, IdentityError> {
        let cluster = ClusterId::new(cluster.get(), max)?;
        let bits = max.local_identity_bits();
        if local >= 1 << bits {
            return Err(IdentityError::LocalTooLarge { local, bits });
        }
        let identity = (u32::from(cluster.get()) << bits) | local;
        if local < MIN_LOCAL_IDENTITY {
            return Err(IdentityError::Reserved {
                identity,
                cluster: cluster.get(),
                local,
            });
        }
        Ok(NumericIdentity(identity))
    }

    /// The identity as a number.
    pub const fn get(self) -> u32 {
        self.0
    }

    /// The cluster that allocated this identity; see [`cluster_of`].
    pub fn cluster(self, max: MaxConnectedClusters) -> Result<ClusterId, IdentityError> {
        cluster_of(self, max)
    }
}

/// The cluster that allocated `identity` under `max`, or why it is no cluster's identity.
pub fn cluster_of(
    identity: NumericIdentity,
    max: MaxConnectedClusters,
) -> Result<ClusterId, IdentityError> {
    let bits = max.local_identity_bits();
    let value = identity.get();
    let cluster = value >> bits;
    let local = value & ((1 << bits) - 1);
    if cluster == 0 {
        return Err(IdentityError::NoCluster { identity: value });
    }
    // At most 9 bits after the shift, so it fits in u16 and under `max`.
    let cluster = u16::try_from(cluster).map_err(|_| IdentityError::TooLarge {
        value: value.to_string(),
    })?;
    if local < MIN_LOCAL_IDENTITY {
        return Err(IdentityError::Reserved {
            identity: value,
            cluster,
            local,
        });
    }
    Ok(ClusterId::new(cluster, max)?)
}

impl TryFrom<u32> for NumericIdentity {
    type Error = IdentityError;

    fn try_from(value: u32) -> Result<Self, IdentityError> {
        NumericIdentity::new(value)
    }
}

impl From<NumericIdentity> for u32 {
    fn from(identity: NumericIdentity) -> u32 {
        identity.0
    }
}

impl fmt::Display for NumericIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl FromStr for NumericIdentity {
    type Err = IdentityError;

    /// Accepts ASCII digits only (no sign, no spaces); leading zeros parse but are not the
    /// canonical spelling, which key parsers check separately.
    fn from_str(s: &str) -> Result<Self, IdentityError> {
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return Err(IdentityError::NotNumeric { value: s.into() });
        }
        let too_large = || IdentityError::TooLarge { value: s.into() };
        let trimmed = s.trim_start_matches('0');
        if trimmed.len() > 8 {
            return Err(too_large());
        }
        let value: u32 = if trimmed.is_empty() {
            0
        } else {
            trimmed.parse().map_err(|_| too_large())?
        };
        NumericIdentity::new(value)
    }
}

impl Serialize for NumericIdentity {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_u32(self.0)
    }
}

impl<'de> Deserialize<'de> for NumericIdentity {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = u64::deserialize(deserializer)?;
        let identity = u32::try_from(value)
            .map_err(|_| IdentityError::TooLarge {
                value: value.to_string(),
            })
            .and_then(NumericIdentity::new);
        identity.map_err(serde::de::Error::custom)
    }
}

/// The identities one cluster may allocate: its id in the top bits, local part ≥ 256.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct IdentityRange {
    cluster: ClusterId,
    first: NumericIdentity,
    last: NumericIdentity,
}

impl IdentityRange {
    /// The range of cluster `id` in a mesh of `max` clusters; refuses an id above `max`.
    pub fn for_cluster(id: ClusterId, max: MaxConnectedClusters) -> Result<Self, IdentityError> {
        let id = ClusterId::new(id.get(), max)?;
        let bits = max.local_identity_bits();
        let base = u32::from(id.get()) << bits;
        Ok(IdentityRange {
            cluster: id,
            first: NumericIdentity(base | MIN_LOCAL_IDENTITY),
            last: NumericIdentity(base | ((1 << bits) - 1)),
        })
    }

    /// The cluster the range belongs to.
    pub fn cluster(&self) -> ClusterId {
        self.cluster
    }

    /// Lowest identity in the range.
    pub fn first(&self) -> NumericIdentity {
        self.first
    }

    /// Highest identity in the range (inclusive).
    pub fn last(&self) -> NumericIdentity {
        self.last
    }

    /// How many identities the range holds.
    pub fn len(&self) -> u32 {
        self.last.0 - self.first.0 + 1
    }

    /// Always false: every range holds identities; here because `len` is.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Whether `identity` is one this cluster may allocate.
    pub fn contains(&self, identity: NumericIdentity) -> bool {
        (self.first..=self.last).contains(&identity)
    }
}

impl fmt::Display for IdentityRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}..={}", self.first, self.last)
    }
}

/// `cilium/state/identities/v1/id/<id>`: the labels a cluster identity stands for.
///
/// Labels are sorted and unique, so equal identities encode to equal bytes. Exactly one label
/// has the cluster key (`k8s:io.cilium.k8s.policy.cluster=<cluster>`): peers' policies select
/// clusters by it, so it is what ties the identity to its publisher.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Identity {
    /// Schema version (1).
    pub schema: SchemaVersion<1>,
    /// The numeric identity; the last key segment.
    pub id: NumericIdentity,
    /// The labels, sorted and unique.
    pub labels: Vec<Label>,
}

impl Identity {
    /// An identity with `labels` sorted and deduplicated.
    pub fn new(id: NumericIdentity, labels: impl IntoIterator<Item = Label>) -> Self {
        let labels: BTreeSet<Label> = labels.into_iter().collect();
        Identity {
            schema: SchemaVersion,
            id,
            labels: labels.into_iter().collect(),
        }
    }

    /// The identity's state key.
    pub fn key(&self) -> StateKey {
        StateKey::Identity { id: self.id }
    }

    /// The cluster named by the cluster label, if there is exactly one valid such label.
    pub fn cluster(&self) -> Result<ClusterName, ValueError> {
        let mut found = None;
        for label in self.labels.iter().filter(|l| l.key() == CLUSTER_LABEL_KEY) {
            if label.source() != K8S_SOURCE {
                return Err(ValueError::ClusterLabelSource {
                    label: label.to_string(),
                });
            }
            if let Some(first) = found.replace(label) {
                return Err(ValueError::ConflictingClusterLabels {
                    first: first.to_string(),
                    second: label.to_string(),
                });
            }
        }
        let label = found.ok_or(ValueError::MissingClusterLabel)?;
        ClusterName::new(label.value()).map_err(|source| ValueError::ClusterLabelName {
            label: label.to_string(),
            source,
        })
    }
}

impl StoreValue for Identity {
    const SCHEMA: u32 = 1;
    const WHAT: &'static str = "identity";

    fn validate(&self) -> Result<(), ValueError> {
        if let Some(w) = self.labels.windows(2).find(|w| w[0] >= w[1]) {
            return Err(ValueError::LabelsNotSorted {
                before: w[0].to_string(),
                after: w[1].to_string(),
            });
        }
        self.cluster().map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use MaxConnectedClusters::*;
    use proptest::prelude::*;

    fn id(n: u16) -> ClusterId {
        ClusterId::try_from(n).unwrap()
    }

    #[test]
    fn known_ranges() {
        let r = IdentityRange::for_cluster(id(1), Max255).unwrap();
        assert_eq!((r.first().get(), r.last().get()), (65536 + 256, 131071));
        let r = IdentityRange::for_cluster(id(255), Max255).unwrap();
        assert_eq!(r.last().get(), NumericIdentity::MAX);
        let r = IdentityRange::for_cluster(id(1), Max511).unwrap();
        assert_eq!((r.first().get(), r.last().get()), (32768 + 256, 65535));
        let r = IdentityRange::for_cluster(id(511), Max511).unwrap();
        assert_eq!(r.last().get(), NumericIdentity::MAX);
        assert_eq!(r.len(), 32768 - 256);
        let err = IdentityRange::for_cluster(id(256), Max255).unwrap_err();
        assert!(err.to_string().contains("cluster id 256"), "{err}");
    }

    #[test]
    fn refusals() {
        assert!(NumericIdentity::new(1 << 24).is_err());
        for reserved in [0, 1, 2, 6, 255, 65535] {
            let err = cluster_of(NumericIdentity::new(reserved).unwrap(), Max255).unwrap_err();
            assert!(matches!(err, IdentityError::NoCluster { .. }), "{err}");
        }
        let err = cluster_of(NumericIdentity::new(65536 + 255).unwrap(), Max255).unwrap_err();
        assert!(
            matches!(
                err,
                IdentityError::Reserved {
                    cluster: 1,
                    local: 255,
                    ..
                }
            ),
            "{err}"
        );
        assert!(NumericIdentity::compose(id(1), 100, Max255).is_err());
        assert!(NumericIdentity::compose(id(1), 1 << 15, Max511).is_err());
        assert!(NumericIdentity::compose(id(300), 300, Max255).is_err());
        assert_eq!(
            NumericIdentity::compose(id(2), 300, Max255).unwrap().get(),
            (2 << 16) | 300
        );
    }

    #[test]
    fn parsing() {
        assert_eq!("131072".parse::<NumericIdentity>().unwrap().get(), 131072);
        assert_eq!("007".parse::<NumericIdentity>().unwrap().get(), 7);
        for bad in [
            "",
            "-1",
            "+1",
            " 1",
            "1 ",
            "0x10",
            "1e3",
            "16777216",
            "99999999999999",
        ] {
            assert!(bad.parse::<NumericIdentity>().is_err(), "{bad:?}");
        }
        assert!(serde_json::from_str::<NumericIdentity>("16777216").is_err());
        assert!(serde_json::from_str::<NumericIdentity>("-5").is_err());
    }

    fn max() -> impl Strategy<Value = MaxConnectedClusters> {
        prop_oneof![Just(Max255), Just(Max511)]
    }

    fn cluster_and_max() -> impl Strategy<Value = (ClusterId, MaxConnectedClusters)> {
        max().prop_flat_map(|m| (1..=m.value()).prop_map(move |c| (id(c), m)))
    }

    proptest! {
        #[test]
        fn ranges_never_overlap(m in max(), a in 1u16..=511, b in 1u16..=511) {
            prop_assume!(a != b && a <= m.value() && b <= m.value());
            let ra = IdentityRange::for_cluster(id(a), m).unwrap();
            let rb = IdentityRange::for_cluster(id(b), m).unwrap();
            prop_assert!(ra.last() < rb.first() || rb.last() < ra.first());
        }

        #[test]
        fn members_map_back((c, m) in cluster_and_max(), offset in any::<u32>()) {
            let r = IdentityRange::for_cluster(c, m).unwrap();
            let identity = NumericIdentity::new(r.first().get() + offset % r.len()).unwrap();
            prop_assert!(r.contains(identity));
            prop_assert_eq!(cluster_of(identity, m).unwrap(), c);
        }

        /// Whatever `cluster_of` accepts lies in exactly that cluster's range, and whatever it
        /// refuses lies in no cluster's range.
        #[test]
        fn cluster_of_agrees_with_ranges(m in max(), value in 0u32..=NumericIdentity::MAX) {
            let identity = NumericIdentity::new(value).unwrap();
            match cluster_of(identity, m) {
                Ok(c) => prop_assert!(IdentityRange::for_cluster(c, m).unwrap().contains(identity)),
                Err(_) => {
                    for c in [1, (value >> m.local_identity_bits()) as u16, m.value()] {
                        if let Ok(c) = ClusterId::new(c, m) {
                            prop_assert!(!IdentityRange::for_cluster(c, m).unwrap().contains(identity));
                        }
                    }
                }
            }
        }

        #[test]
        fn out_of_range_refused((c, m) in cluster_and_max(), value in any::<u32>()) {
            let r = IdentityRange::for_cluster(c, m).unwrap();
            match NumericIdentity::new(value) {
                Err(_) => prop_assert!(value > NumericIdentity::MAX),
                Ok(identity) => prop_assert_eq!(
                    r.contains(identity),
                    cluster_of(identity, m).ok() == Some(c)
                ),
            }
        }

        #[test]
        fn text_round_trip(value in 0u32..=NumericIdentity::MAX) {
            let identity = NumericIdentity::new(value).unwrap();
            prop_assert_eq!(identity.to_string().parse::<NumericIdentity>().unwrap(), identity);
        }
    }
}
