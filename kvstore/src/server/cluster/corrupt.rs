//! The leader's corruption check: every `--corrupt-check-time` it asks each member for the
//! hash of its key-value history at the leader's revision and compares.
//!
//! Raft keeps logs equal, not stores: a disk that flips a bit, an applier bug or a hand-edited
//! data directory leaves one member answering reads from a history the others do not have,
//! and nothing in raft notices. When hashes differ, the members outside the majority get a
//! CORRUPT alarm through the log, and with it every member refuses reads and writes, as etcd
//! does, until an operator has repaired the member and disarmed the alarm (`etcdctl alarm
//! disarm`). Without a majority (say two members answer and disagree) no member can be
//! trusted over another, so every disagreeing member and the leader are named.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::proto::PbAlarmRequest;
use proto::peer::HashKvReply;
use tokio_util::sync::CancellationToken;

use super::ClusterConfig;
use super::node::RaftHandle;
use super::transport::Outbox;
use crate::server::applier::Shared;
use crate::server::mvcc::{ALARM_CORRUPT, WriteRequest};
use crate::server::storage::{StorageError, hash_history};

/// etcd's default is off; a check every few minutes costs one pass over each store.
pub const DEFAULT_CORRUPT_CHECK: Duration = Duration::from_secs(300);

/// etcd's `AlarmRequest.AlarmAction.ACTIVATE`.
const ACTIVATE: i32 = 1;

/// This member's hash of its history up to `revision`; not ready while it has not applied
/// that revision or has compacted past it (nothing comparable then).
pub async fn local_hash(shared: &Arc<Shared>, revision: i64) -> Result<HashKvReply, StorageError> {
    let compact_revision = shared.read().compact_revision();
    let mut reply = HashKvReply {
        member_id: shared.member_id(),
        ready: false,
        hash: 0,
        compact_revision,
    };
    if revision > shared.visible() || revision < compact_revision {
        return Ok(reply);
    }
    let storage = shared.storage().clone();
    reply.hash = tokio::task::spawn_blocking(move || hash_history(storage.as_ref(), revision))
        .await
        .map_err(|e| StorageError::Task(e.to_string()))??;
    reply.ready = true;
    Ok(reply)
}

/// The members whose history diverged, from the hashes of the `members`-strong cluster's
/// members that could be compared (the leader's among them).
pub fn diverged(members: usize, hashes: &[(u64, u32)], leader: u64) -> Vec<u64> {
    let mut counts: HashMap<u32, usize> = HashMap::new();
    for (_, hash) in hashes {
        *counts.entry(*hash).or_default() += 1;
    }
    if counts.len() <= 1 {
        return Vec::new();
    }
    let majority = counts
        .iter()
        .find(|(_, count)| 2 * **count > members)
        .map(|(hash, _)| *hash);
    let trusted = match majority {
        Some(hash) => hash,
        None => match hashes.iter().find(|(member, _)| *member == leader) {
            // No majority: the leader is no more credible than the others.
            Some(&(_, hash)) => {
                let mut out: Vec<u64> = hashes
                    .iter()
                    .filter(|(_, h)| *h != hash)
                    .map(|(m, _)| *m)
                    .collect();
                out.push(leader);
                out.sort_unstable();
                return out;
            }
            None => return hashes.iter().map(|(m, _)| *m).collect(),
        },
    };
    let mut out: Vec<u64> = hashes
        .iter()
        .filter(|(_, hash)| *hash != trusted)
        .map(|(member, _)| *member)
        .collect();
    out.sort_unstable();
    out
}

/// Runs the check while this member leads, until `cancel` fires; a zero interval turns it off.
pub async fn run(
    config: Arc<ClusterConfig>,
    outbox: Outbox,
    shared: Arc<Shared>,
    raft: Arc<RaftHandle>,
    cancel: CancellationToken,
) {
    let every = config.corrupt_check;
    if every.is_zero() {
        return;
    }
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = ticker.tick() => {}
        }
        if !shared.is_leader() {
            continue;
        }
        if let Err(error) = check(&config, &outbox, &shared, &raft).await {
            tracing::warn!(%error, "corruption check failed");
        }
    }
}

/// One round: hashes at the leader's revision, compared, alarms raised for what diverged.
async fn check(
    config: &ClusterConfig,
    outbox: &Outbox,
    shared: &Arc<Shared>,
    raft: &RaftHandle,
) -> Result<(), StorageError> {
    let revision = shared.visible();
    let own = local_hash(shared, revision).await?;
    if !own.ready {
        return Ok(());
    }
    let mut hashes = vec![(own.member_id, own.hash)];
    for peer in config.peers() {
        match outbox.hash_kv(peer.id, revision).await {
            Ok(reply) if reply.ready && reply.compact_revision == own.compact_revision => {
                hashes.push((peer.id, reply.hash));
            }
            Ok(_) => tracing::debug!(member = %peer.name, revision, "not comparable this time"),
            Err(status) => {
                tracing::debug!(member = %peer.name, error = %status.message(), "no hash this time")
            }
        }
    }
    let bad = diverged(config.members.len(), &hashes, own.member_id);
    if bad.is_empty() {
        tracing::debug!(
            revision,
            compared = hashes.len(),
            "members' histories agree"
        );
        return Ok(());
    }
    let raised = shared.read().alarms();
    for member in bad {
        if raised
            .iter()
            .any(|a| a.member_id == member && a.alarm == ALARM_CORRUPT)
        {
            continue;
        }
        let name = config
            .member(member)
            .map_or_else(|| format!("{member:x}"), |m| m.name.clone());
        tracing::error!(
            member = %name,
            revision,
            hashes = ?hashes.iter().map(|(m, h)| format!("{m:x}={h:08x}")).collect::<Vec<_>>(),
            "a member's history differs from the others': raising a CORRUPT alarm, reads and writes are refused until it is repaired and the alarm disarmed"
        );
        let alarm = PbAlarmRequest {
            action: ACTIVATE,
            member_id: member,
            alarm: ALARM_CORRUPT,
        };
        if let Err(error) = raft.submit(WriteRequest::Alarm(alarm)).await {
            tracing::warn!(%error, member = %name, "raising the CORRUPT alarm failed; the next check tries again");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_minority_is_named_and_agreement_names_nobody() {
        assert!(diverged(3, &[(1, 7), (2, 7), (3, 7)], 1).is_empty());
        assert!(diverged(3, &[(1, 7), (2, 7)], 1).is_empty());
        assert_eq!(diverged(3, &[(1, 7), (2, 7), (3, 9)], 1), vec![3]);
        // The leader itself can be the odd one out.
        assert_eq!(diverged(3, &[(1, 9), (2, 7), (3, 7)], 1), vec![1]);
        assert_eq!(
            diverged(5, &[(1, 7), (2, 7), (3, 7), (4, 9), (5, 8)], 1),
            vec![4, 5]
        );
    }

    #[test]
    fn without_a_majority_nobody_is_trusted() {
        // Two of three answered and disagree: either could be wrong.
        assert_eq!(diverged(3, &[(1, 7), (2, 9)], 1), vec![1, 2]);
        assert_eq!(diverged(3, &[(1, 7), (2, 9), (3, 8)], 1), vec![1, 2, 3]);
    }
}
