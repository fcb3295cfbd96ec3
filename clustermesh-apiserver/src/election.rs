//! One publisher among replicas (`--replica-name`). Every replica campaigns for
//! [`LEADER_KEY`]; the one holding it publishes, the others stand by.
//!
//! The leader's key is attached to the lease every published key is attached to, so the
//! published state lives exactly as long as someone keeps that lease alive. A standby follows
//! the lease's remaining TTL: a leader refreshes it every TTL/3, so a lease down to half its
//! granted TTL has missed a refresh, and the standby takes over (at once if the key names
//! the standby itself: its own previous life, restarted): it keeps the lease alive
//! itself and moves the key to its own name with a transaction on the key's revision (of
//! several standbys, one wins). Nothing published is rewritten: the keys stay on the lease
//! they were on. Every write of a leader is guarded by the key's revision
//! ([`kvstore::client::Guard`]), so a leader that was only paused past its takeover writes
//! nothing more once it resumes.

use std::time::Duration;

use kvstore::client::{CasOutcome, Expect, Guard, LeaseHandle, StoreClient, StringCodec};
use tokio_util::sync::CancellationToken;

/// The key the leader holds. It lives in the cluster's own store, so one per cluster.
pub const LEADER_KEY: &str = "cilium/.clustermesh-apiserver/leader";

/// What this replica is doing about leadership.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Role {
    /// Not decided yet (or the store cannot be reached).
    #[default]
    Campaigning,
    /// Another replica leads.
    Standby {
        /// The leader's replica name.
        leader: String,
    },
    /// This replica publishes.
    Leader,
}

/// Leadership won: the lease to publish under and the guard for every write.
#[derive(Debug)]
pub struct Leadership {
    /// The lease the leader key and every published key are attached to.
    pub lease: LeaseHandle,
    /// The leader key at the revision this replica wrote it (`None`: the only publisher).
    pub guard: Option<Guard>,
    /// Taken over from a leader that stopped: what it published is in place under `lease`.
    pub took_over: bool,
}

/// Campaigns until this replica leads (or `cancel`). `ttl` is the publishing lease's TTL;
/// `report` is told what the replica is doing meanwhile.
pub async fn lead(
    client: &StoreClient,
    replica: &str,
    ttl: Duration,
    report: &(dyn Fn(Role) + Sync),
    cancel: &CancellationToken,
) -> Result<Option<Leadership>, kvstore::client::Error> {
    let keys = client.typed(StringCodec);
    loop {
        report(Role::Campaigning);
        let lease = client.grant_lease_with_shutdown(ttl, cancel).await?;
        let CasOutcome { succeeded, current } = keys
            .compare_and_swap(
                LEADER_KEY,
                Expect::Absent,
                &replica.to_owned(),
                Some(lease.id()),
            )
            .await?;
        match current {
            Some(mine) if succeeded => {
                tracing::info!(replica, lease = %lease.id(), "leading: publishing");
                report(Role::Leader);
                return Ok(Some(Leadership {
                    lease,
                    guard: Some(Guard {
                        key: LEADER_KEY.to_owned(),
                        mod_revision: mine.mod_revision,
                    }),
                    took_over: false,
                }));
            }
            None => continue,
            Some(holder) => {
                // Not needed: the holder's lease is the one that matters.
                lease.stop();
                let _ = client.revoke_lease(lease.id()).await;
                if holder.value != replica {
                    tracing::info!(replica, leader = %holder.value, "standing by");
                }
                report(Role::Standby {
                    leader: holder.value.clone(),
                });
                if let Some(leadership) = stand_by(client, replica, ttl, holder, cancel).await? {
                    report(Role::Leader);
                    return Ok(Some(leadership));
                }
                if cancel.is_cancelled() {
                    return Ok(None);
                }
            }
        }
    }
}

/// Follows the holder's lease until the holder stops refreshing it (then takes over), the
/// key changes hands (then `None`: campaign again), or `cancel`.
async fn stand_by(
    client: &StoreClient,
    replica: &str,
    ttl: Duration,
    holder: kvstore::client::Entry<String>,
    cancel: &CancellationToken,
) -> Result<Option<Leadership>, kvstore::client::Error> {
    let Some(lease_id) = holder.lease else {
        // A leader key without a lease is not ours to judge; campaign again after a while.
        tracing::warn!(leader = %holder.value, "the leader key has no lease; waiting for it to change");
        pause(ttl, cancel).await;
        return Ok(None);
    };
    let keys = client.typed(StringCodec);
    let check = (ttl / 6).max(Duration::from_millis(200));
    let mine = holder.value == replica;
    loop {
        if !mine && !pause(check, cancel).await {
            return Ok(None);
        }
        let current = keys.get(LEADER_KEY).await?;
        if current.as_ref().map(|e| e.mod_revision) != Some(holder.mod_revision) {
            return Ok(None);
        }
        let Some((remaining, granted)) = client.lease_ttls(lease_id).await? else {
            return Ok(None);
        };
        if mine {
            tracing::info!(
                ?remaining,
                "the leader key names this replica: taking its lease back"
            );
        } else if remaining > granted / 2 {
            continue;
        } else {
            tracing::warn!(
                leader = %holder.value,
                ?remaining,
                "the leader stopped refreshing its lease; taking over"
            );
        }
        let Some(lease) = client.adopt_lease(lease_id, cancel).await? else {
            return Ok(None);
        };
        let outcome = keys
            .compare_and_swap(
                LEADER_KEY,
                Expect::ModRevision(holder.mod_revision),
                &replica.to_owned(),
                Some(lease_id),
            )
            .await?;
        match outcome.current {
            Some(mine) if outcome.succeeded => {
                tracing::info!(replica, lease = %lease_id, previous = %holder.value, "took over: publishing");
                return Ok(Some(Leadership {
                    lease,
                    guard: Some(Guard {
                        key: LEADER_KEY.to_owned(),
                        mod_revision: mine.mod_revision,
                    }),
                    took_over: true,
                }));
            }
            _ => {
                // Another standby was first; its keepalive is the one that counts now.
                lease.stop();
                return Ok(None);
            }
        }
    }
}

/// Sleeps unless cancelled first; says whether to go on.
async fn pause(delay: Duration, cancel: &CancellationToken) -> bool {
    tokio::select! {
        () = cancel.cancelled() => false,
        () = tokio::time::sleep(delay) => true,
    }
}
