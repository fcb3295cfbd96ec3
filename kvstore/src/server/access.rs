//! A connection's [`Role`] in the embedded store, from its client certificate's CN, and
//! whether the [`access`](crate::access) rules let it read or write a key range.

use certs::{ClusterName, User};

use super::mvcc::KeyRange;
use crate::access::{Permission, local_permissions, remote_permissions};

impl Permission {
    /// Whether this grant covers every key `range` can name.
    fn covers(&self, range: &KeyRange) -> bool {
        let (start, end) = match range {
            KeyRange::Single(k) => {
                return if self.range_end.is_empty() {
                    *k == self.key
                } else {
                    k.as_slice() >= self.key.as_slice() && within_end(k, &self.range_end)
                };
            }
            KeyRange::Interval { start, end } => (start, end),
        };
        if self.range_end.is_empty() {
            // `[k, k\0)` is the single key `k`, written as a range.
            let mut only = self.key.clone();
            only.push(0);
            return *start == self.key && end.as_ref() == Some(&only);
        }
        let Some(end) = end else {
            // A from-key range reaches every key after `start`.
            return self.range_end == [0] && start.as_slice() >= self.key.as_slice();
        };
        start.as_slice() >= self.key.as_slice()
            && (self.range_end == [0] || end.as_slice() <= self.range_end.as_slice())
    }
}

fn within_end(key: &[u8], range_end: &[u8]) -> bool {
    range_end == [0] || key < range_end
}

/// What a connection may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// Full rights: the cluster's own apiserver and kvstoremesh, or a store without rules.
    Admin,
    /// Read-only rights of a peer or of local agents.
    ReadOnly(Vec<Permission>),
    /// A valid certificate whose CN names nobody this store serves.
    Nobody,
}

impl Role {
    /// The role of `user` in the store of cluster `us`.
    pub fn of(user: &User, us: &ClusterName) -> Self {
        match user {
            User::Admin(c) if c == us => Self::Admin,
            User::Remote(peer) if peer != us => Self::ReadOnly(remote_permissions(us)),
            User::Local(c) if c == us => Self::ReadOnly(local_permissions()),
            _ => Self::Nobody,
        }
    }

    /// The role of a certificate CN; one that is no mesh user at all has no rights.
    pub fn of_cn(cn: &str, us: &ClusterName) -> Self {
        User::parse(cn).map_or(Self::Nobody, |user| Self::of(&user, us))
    }

    pub fn can_read(&self, range: &KeyRange) -> bool {
        match self {
            Self::Admin => true,
            Self::ReadOnly(perms) => perms.iter().any(|p| p.covers(range)),
            Self::Nobody => false,
        }
    }

    pub fn can_write(&self, range: &KeyRange) -> bool {
        match self {
            Self::Admin => true,
            Self::ReadOnly(perms) => perms.iter().any(|p| p.write && p.covers(range)),
            Self::Nobody => false,
        }
    }

    /// Compaction, leases and anything store-wide.
    pub fn is_admin(&self) -> bool {
        matches!(self, Self::Admin)
    }

    /// Whether the certificate names a user of this store at all (enough for `Status`).
    pub fn is_known(&self) -> bool {
        !matches!(self, Self::Nobody)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::access::prefix_end;
    use proptest::prelude::*;

    fn us() -> ClusterName {
        ClusterName::new("a").unwrap()
    }

    fn key(k: &str) -> KeyRange {
        KeyRange::Single(k.as_bytes().to_vec())
    }

    fn prefix(p: &str) -> KeyRange {
        KeyRange::Interval {
            start: p.as_bytes().to_vec(),
            end: Some(prefix_end(p.as_bytes())),
        }
    }

    #[test]
    fn a_remote_reads_published_state_and_nothing_else() {
        let remote = Role::of_cn("remote-b", &us());
        assert!(remote.can_read(&prefix("cilium/state/")));
        assert!(remote.can_read(&prefix("cilium/state/nodes/v1/")));
        assert!(remote.can_read(&key("cilium/.heartbeat")));
        assert!(remote.can_read(&key("cilium/cluster-config/a")));
        assert!(remote.can_read(&prefix("cilium/synced/a/")));
        assert!(!remote.can_read(&prefix("cilium/synced/c/")));
        assert!(!remote.can_read(&prefix("cilium/synced/")));
        assert!(!remote.can_read(&key("cilium/cluster-config/c")));
        assert!(!remote.can_read(&prefix("cilium/cluster-config/a")));
        assert!(!remote.can_read(&prefix("cilium/cache/")));
        assert!(!remote.can_read(&prefix("cilium/")));
        assert!(!remote.can_write(&key("cilium/state/nodes/v1/x")));
        assert!(!remote.is_admin());
    }

    #[test]
    fn from_key_ranges_reach_past_every_prefix() {
        let remote = Role::of_cn("remote-b", &us());
        let from_key = KeyRange::Interval {
            start: b"cilium/state/".to_vec(),
            end: None,
        };
        assert!(!remote.can_read(&from_key));
    }

    #[test]
    fn only_our_own_admin_and_local_users_count() {
        assert!(Role::of_cn("admin-a", &us()).is_admin());
        assert_eq!(Role::of_cn("admin-b", &us()), Role::Nobody);
        assert_eq!(Role::of_cn("local-b", &us()), Role::Nobody);
        assert_eq!(Role::of_cn("remote-a", &us()), Role::Nobody);
        assert_eq!(Role::of_cn("mallory", &us()), Role::Nobody);
        let local = Role::of_cn("local-a", &us());
        assert!(local.can_read(&prefix("cilium/cache/")));
        assert!(local.can_read(&prefix("cilium/synced/")));
        assert!(!local.can_read(&prefix("cilium/state/")));
    }

    fn near_the_rules() -> impl Strategy<Value = Vec<u8>> {
        let bases = prop::sample::select(vec![
            "cilium/state/",
            "cilium/.heartbeat",
            "cilium/synced/a/",
            "cilium/synced/",
            "cilium/cluster-config/a",
            "cilium/cache/",
            "cilium/",
        ]);
        (bases, proptest::collection::vec(any::<u8>(), 0..3)).prop_map(|(base, tail)| {
            let mut key = base.as_bytes().to_vec();
            key.extend(tail);
            key
        })
    }

    proptest! {
        #[test]
        fn a_readable_range_only_names_readable_keys(
            start in near_the_rules(),
            end_kind in 0..4u8,
            end_tail in near_the_rules(),
            probe in near_the_rules(),
        ) {
            let end = match end_kind {
                0 => Vec::new(),
                1 => vec![0],
                2 => prefix_end(&start),
                _ => end_tail,
            };
            let role = Role::of_cn("remote-b", &us());
            let range = KeyRange::new(&start, &end);
            if role.can_read(&range) && range.contains(&probe) {
                prop_assert!(role.can_read(&KeyRange::Single(probe.clone())));
            }
        }
    }
}
