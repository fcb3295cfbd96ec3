//! Who may do what in a cluster's store, decided by the client certificate's CN.
//!
//! The rules are data ([`Permission`] lists in etcd's own terms: a key and a range end), so the
//! embedded store (`server::access`) enforces exactly what the etcd provisioner
//! ([`provision`](crate::client::provision)) grants on a real etcd cluster. They live outside
//! the server so that a client built without it can provision them.
//!
//! | user | rights in the store of cluster `us` |
//! |---|---|
//! | `admin-<us>` | everything |
//! | `remote-<peer>` (`peer != us`) | read `cilium/state/`, `cilium/.heartbeat`, `cilium/cluster-config/<us>`, `cilium/synced/<us>/` |
//! | `local-<us>` | read `cilium/cache/`, `cilium/cluster-config/`, `cilium/synced/`, `cilium/.heartbeat` |
//!
//! Anything else (another cluster's admin or local user, an unknown CN) has no rights.

use certs::ClusterName;

/// One grant: read (and maybe write) on `[key, range_end)`, or on `key` alone when
/// `range_end` is empty — the same shape as an etcd role permission.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Permission {
    pub key: Vec<u8>,
    pub range_end: Vec<u8>,
    pub write: bool,
}

impl Permission {
    fn read_prefix(prefix: &str) -> Self {
        Self {
            key: prefix.as_bytes().to_vec(),
            range_end: prefix_end(prefix.as_bytes()),
            write: false,
        }
    }

    fn read_key(key: &str) -> Self {
        Self {
            key: key.as_bytes().to_vec(),
            range_end: Vec::new(),
            write: false,
        }
    }
}

/// The end of the range holding every key that starts with `prefix`, as etcd clients compute
/// it; `"\0"` (every key from the start on) when no such end exists.
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// What a peer may read from the store of cluster `us`.
pub fn remote_permissions(us: &ClusterName) -> Vec<Permission> {
    vec![
        Permission::read_prefix("cilium/state/"),
        Permission::read_key("cilium/.heartbeat"),
        Permission::read_key(&format!("cilium/cluster-config/{us}")),
        Permission::read_prefix(&format!("cilium/synced/{us}/")),
    ]
}

/// What the cluster's own node agents may read.
pub fn local_permissions() -> Vec<Permission> {
    vec![
        Permission::read_prefix("cilium/cache/"),
        Permission::read_prefix("cilium/cluster-config/"),
        Permission::read_prefix("cilium/synced/"),
        Permission::read_key("cilium/.heartbeat"),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_matches_etcd_clients() {
        assert_eq!(prefix_end(b"a/"), b"a0");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff\xff"), b"\0");
    }
}
