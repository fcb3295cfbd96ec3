//! Is this still the store we were following? A resume point (a revision) only means
//! something in the store it came from. A store restored from a backup, or rebuilt empty,
//! answers on the same endpoints with a history that disagrees with what we saw; resuming
//! there would skip or replay changes, so the follower must list again.

use kvstore::client::{LeaseId, StoreStatus};

/// What one store has shown of itself, and the checks that say it was replaced.
#[derive(Debug, Clone, Default)]
pub struct StoreWitness {
    /// With several endpoints another member may answer each time, and a lagging member
    /// may answer with an older revision: those checks need one endpoint.
    single_endpoint: bool,
    identity: Option<(u64, u64)>,
    /// The highest revision seen (status, listings, events).
    last_seen: i64,
    config: Option<ConfigSeen>,
}

/// A key's version as read (here: the peer's cluster config) and the store revision it was
/// read at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyVersion {
    /// The revision that created the key.
    pub create_revision: i64,
    /// The revision of its last change.
    pub mod_revision: i64,
    /// The lease it is attached to.
    pub lease: Option<LeaseId>,
}

#[derive(Debug, Clone, Copy)]
struct ConfigSeen {
    version: KeyVersion,
    read_at: i64,
}

impl StoreWitness {
    /// A witness for a store reached through `endpoints` endpoints.
    pub fn new(endpoints: usize) -> Self {
        StoreWitness {
            single_endpoint: endpoints <= 1,
            ..StoreWitness::default()
        }
    }

    /// Checks a status answer; says why the store was replaced, if it was. Afterwards the
    /// witness describes the store that answered.
    pub fn check_status(&mut self, store: &StoreStatus) -> Option<String> {
        let now = (store.cluster_id, store.member_id);
        let reason = match self.identity {
            None => None,
            Some((cluster, _)) if cluster != now.0 => Some(format!(
                "its cluster id changed from {cluster:x} to {:x}",
                now.0
            )),
            Some((_, member)) if self.single_endpoint && member != now.1 => Some(format!(
                "its member id changed from {member:x} to {:x}",
                now.1
            )),
            Some(_) if self.single_endpoint && store.revision < self.last_seen => Some(format!(
                "its revision went back from {} to {}",
                self.last_seen, store.revision
            )),
            Some(_) => None,
        };
        self.identity = Some(now);
        if reason.is_some() {
            self.last_seen = store.revision;
            // The config's history in the old store says nothing about the new one.
            self.config = None;
        } else {
            self.note_revision(store.revision);
        }
        reason
    }

    /// Records a revision seen in a listing or an event.
    pub fn note_revision(&mut self, revision: i64) {
        self.last_seen = self.last_seen.max(revision);
    }

    /// The highest revision seen.
    pub fn last_seen(&self) -> i64 {
        self.last_seen
    }

    /// Checks the cluster config's version read at store revision `read_at`; `true` when it
    /// contradicts what was read before (another version with a change at or before a
    /// revision where we saw the old one): not the same history, so not the same store.
    pub fn check_config(&mut self, version: KeyVersion, read_at: i64) -> bool {
        let replaced = self
            .config
            .is_some_and(|seen| version != seen.version && version.mod_revision <= seen.read_at);
        self.config = Some(ConfigSeen { version, read_at });
        replaced
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(cluster_id: u64, member_id: u64, revision: i64) -> StoreStatus {
        StoreStatus {
            cluster_id,
            member_id,
            revision,
            raft_term: 1,
            leader: member_id,
            version: "3.4".into(),
            db_size: 0,
        }
    }

    fn version(create_revision: i64, mod_revision: i64) -> KeyVersion {
        KeyVersion {
            create_revision,
            mod_revision,
            lease: None,
        }
    }

    #[test]
    fn a_store_with_another_identity_is_another_store() {
        let mut w = StoreWitness::new(1);
        assert_eq!(w.check_status(&status(1, 10, 5)), None);
        assert_eq!(w.check_status(&status(1, 10, 7)), None);
        assert!(
            w.check_status(&status(2, 10, 9))
                .unwrap()
                .contains("cluster id")
        );
        // The same cluster id, another member: a store rebuilt with a fixed cluster id.
        assert!(
            w.check_status(&status(2, 11, 9))
                .unwrap()
                .contains("member id")
        );
        w.note_revision(20);
        assert!(
            w.check_status(&status(2, 11, 12))
                .unwrap()
                .contains("went back from 20 to 12")
        );
        assert_eq!(w.check_status(&status(2, 11, 12)), None);
    }

    #[test]
    fn several_endpoints_may_answer_from_several_members() {
        let mut w = StoreWitness::new(3);
        assert_eq!(w.check_status(&status(1, 10, 5)), None);
        assert_eq!(w.check_status(&status(1, 11, 4)), None);
        assert!(w.check_status(&status(2, 11, 4)).is_some());
    }

    #[test]
    fn a_config_with_another_history_means_another_store() {
        let mut w = StoreWitness::new(1);
        assert!(!w.check_config(version(3, 3), 10));
        // Changed since: a newer revision than the one we read at.
        assert!(!w.check_config(version(3, 12), 15));
        assert!(!w.check_config(version(3, 12), 20));
        // Another version dated before what we already saw at revision 20.
        assert!(w.check_config(version(2, 4), 21));
        assert!(!w.check_config(version(2, 4), 22));
    }
}
