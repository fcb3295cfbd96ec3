//! Cluster ids and the mesh-wide limit on how many clusters can connect.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A cluster id or limit outside what the mesh allows.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    /// The id is 0 or above the limit; 0 is refused because identities of cluster 0 would
    /// collide with every cluster's reserved and local identities.
    #[error(
        "cluster id {id} is out of range 1..={max} (ids are 1..=255, or 1..=511 when \
         max-connected-clusters is 511)"
    )]
    ClusterId {
        /// The refused id.
        id: u32,
        /// The highest id allowed where it was checked.
        max: u16,
    },
    /// A max-connected-clusters value other than the two the identity layout supports.
    #[error("max-connected-clusters must be 255 or 511, not {value}")]
    MaxConnectedClusters {
        /// The refused value.
        value: u32,
    },
}

/// How many clusters may connect; decides how the 24 identity bits are split.
///
/// Every cluster of a mesh must use the same value, or their identity ranges overlap.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum MaxConnectedClusters {
    /// 255 clusters: 8 bits of cluster id, 16 bits of cluster-local identity.
    #[default]
    Max255,
    /// 511 clusters: 9 bits of cluster id, 15 bits of cluster-local identity.
    Max511,
}

impl MaxConnectedClusters {
    /// The number as users write it: 255 or 511.
    pub const fn value(self) -> u16 {
        match self {
            MaxConnectedClusters::Max255 => 255,
            MaxConnectedClusters::Max511 => 511,
        }
    }

    /// Parses 255 or 511.
    pub fn from_value(value: u32) -> Result<Self, IdError> {
        match value {
            255 => Ok(MaxConnectedClusters::Max255),
            511 => Ok(MaxConnectedClusters::Max511),
            value => Err(IdError::MaxConnectedClusters { value }),
        }
    }

    /// Bits of a numeric identity that hold the cluster id (8 or 9).
    pub const fn cluster_id_bits(self) -> u32 {
        match self {
            MaxConnectedClusters::Max255 => 8,
            MaxConnectedClusters::Max511 => 9,
        }
    }

    /// Bits of a numeric identity below the cluster id (16 or 15): where the id is shifted to.
    pub const fn local_identity_bits(self) -> u32 {
        crate::identity::IDENTITY_BITS - self.cluster_id_bits()
    }
}

impl fmt::Display for MaxConnectedClusters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.value())
    }
}

impl Serialize for MaxConnectedClusters {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_u16(self.value())
    }
}

impl<'de> Deserialize<'de> for MaxConnectedClusters {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = u32::deserialize(deserializer)?;
        MaxConnectedClusters::from_value(value).map_err(serde::de::Error::custom)
    }
}

/// A cluster id: 1..=255, or 1..=511 in a mesh with `max-connected-clusters: 511`.
///
/// The type holds any id valid in some mesh (1..=511); [`ClusterId::new`] checks against a
/// given limit, and a [`crate::ClusterConfig`] checks its id against its own limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClusterId(u16);

impl ClusterId {
    /// Validates `id` against `max`.
    pub fn new(id: u16, max: MaxConnectedClusters) -> Result<Self, IdError> {
        if id == 0 || id > max.value() {
            return Err(IdError::ClusterId {
                id: id.into(),
                max: max.value(),
            });
        }
        Ok(ClusterId(id))
    }

    /// The id as a number.
    pub const fn get(self) -> u16 {
        self.0
    }

    /// Whether the id is allowed under `max`.
    pub const fn fits(self, max: MaxConnectedClusters) -> bool {
        self.0 <= max.value()
    }
}

impl TryFrom<u16> for ClusterId {
    type Error = IdError;

    /// Accepts 1..=511, the widest range; check [`ClusterId::fits`] against the mesh's limit.
    fn try_from(id: u16) -> Result<Self, IdError> {
        ClusterId::new(id, MaxConnectedClusters::Max511)
    }
}

impl From<ClusterId> for u16 {
    fn from(id: ClusterId) -> u16 {
        id.0
    }
}

impl fmt::Display for ClusterId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl Serialize for ClusterId {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_u16(self.0)
    }
}

impl<'de> Deserialize<'de> for ClusterId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let id = u32::deserialize(deserializer)?;
        let err = || IdError::ClusterId { id, max: 511 };
        let id = u16::try_from(id).map_err(|_| serde::de::Error::custom(err()))?;
        ClusterId::try_from(id).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_within_limits() {
        use MaxConnectedClusters::*;
        assert!(ClusterId::new(1, Max255).is_ok());
        assert!(ClusterId::new(255, Max255).is_ok());
        assert!(ClusterId::new(256, Max511).is_ok());
        assert!(ClusterId::new(511, Max511).is_ok());
        for (id, max) in [(0, Max255), (0, Max511), (256, Max255), (512, Max511)] {
            let err = ClusterId::new(id, max).unwrap_err();
            assert!(
                err.to_string().contains(&format!("cluster id {id} ")),
                "{err}"
            );
        }
        assert!(ClusterId::try_from(300).unwrap().fits(Max511));
        assert!(!ClusterId::try_from(300).unwrap().fits(Max255));
    }

    #[test]
    fn serde_plain_numbers() {
        let id: ClusterId = serde_json::from_str("7").unwrap();
        assert_eq!(serde_json::to_string(&id).unwrap(), "7");
        for bad in ["0", "512", "70000", "-1", "\"7\"", "7.5"] {
            assert!(serde_json::from_str::<ClusterId>(bad).is_err(), "{bad}");
        }
        let max: MaxConnectedClusters = serde_json::from_str("511").unwrap();
        assert_eq!(max, MaxConnectedClusters::Max511);
        assert_eq!(serde_json::to_string(&max).unwrap(), "511");
        let err = serde_json::from_str::<MaxConnectedClusters>("300").unwrap_err();
        assert!(err.to_string().contains("255 or 511, not 300"), "{err}");
    }
}
