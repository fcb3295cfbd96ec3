//! Leases kept alive by a background task.

use std::fmt;
use std::time::Duration;

use std::sync::Arc;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::error::{Error, Result};
use super::{Retry, StoreClient};

/// An etcd lease id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct LeaseId(pub i64);

impl fmt::Display for LeaseId {
    /// Hexadecimal, as `etcdctl` prints lease ids.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:x}", self.0)
    }
}

/// Why a lease is no longer kept alive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseLost {
    /// The store said the lease no longer exists (keepalive answered TTL 0, or the lease
    /// was not found): its keys are gone.
    Expired,
    /// No keepalive succeeded for longer than the TTL: the store has probably expired the
    /// lease and deleted its keys.
    Unreachable {
        /// The last error seen while trying to keep the lease alive.
        last_error: String,
    },
    /// The lease was revoked through [`LeaseHandle::revoke`]: its keys are gone.
    Revoked,
    /// Keepalive was stopped (handle dropped, [`LeaseHandle::stop`] or the shutdown token)
    /// without revoking: the lease expires after its TTL.
    Stopped,
}

impl fmt::Display for LeaseLost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LeaseLost::Expired => write!(f, "lease expired on the store"),
            LeaseLost::Unreachable { last_error } => {
                write!(
                    f,
                    "lease keepalive failed for longer than the TTL: {last_error}"
                )
            }
            LeaseLost::Revoked => write!(f, "lease revoked"),
            LeaseLost::Stopped => write!(f, "lease keepalive stopped"),
        }
    }
}

/// A granted lease, kept alive every TTL/3 by a background task until it is revoked,
/// stopped or dropped, or until it is lost.
#[derive(Debug)]
pub struct LeaseHandle {
    id: LeaseId,
    ttl: Duration,
    client: StoreClient,
    cancel: CancellationToken,
    state: watch::Receiver<Option<LeaseLost>>,
    publish: Arc<watch::Sender<Option<LeaseLost>>>,
    task: Option<JoinHandle<()>>,
}

impl LeaseHandle {
    /// The lease id, to attach keys to.
    pub fn id(&self) -> LeaseId {
        self.id
    }

    /// The TTL the store granted (it may round up what was asked).
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Why the lease was lost, or `None` while it is kept alive.
    pub fn lost_reason(&self) -> Option<LeaseLost> {
        self.state.borrow().clone()
    }

    /// Whether the lease is still kept alive.
    pub fn is_alive(&self) -> bool {
        self.state.borrow().is_none()
    }

    /// Waits until the lease is lost (or stopped) and says why.
    pub async fn lost(&self) -> LeaseLost {
        let mut state = self.state.clone();
        let reason = match state.wait_for(Option::is_some).await {
            Ok(reason) => reason.clone(),
            // The task is gone without a verdict: it can only have been stopped.
            Err(_) => None,
        };
        reason.unwrap_or(LeaseLost::Stopped)
    }

    /// A receiver that changes from `None` to the reason once the lease is lost, for tasks
    /// that do not hold the handle.
    pub fn watch_lost(&self) -> watch::Receiver<Option<LeaseLost>> {
        self.state.clone()
    }

    /// Stops the keepalive without revoking; the lease expires after its TTL.
    pub fn stop(&self) {
        self.cancel.cancel();
    }

    /// Stops the keepalive and revokes the lease, deleting its keys now. A lease that is
    /// already gone counts as revoked.
    pub async fn revoke(mut self) -> Result<()> {
        self.cancel.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
        self.client.revoke_lease(self.id).await?;
        self.publish.send_replace(Some(LeaseLost::Revoked));
        Ok(())
    }
}

impl Drop for LeaseHandle {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// Grants a lease and starts its keepalive task, stopped through the handle or when
/// `shutdown` is canceled.
pub(crate) async fn grant(
    client: &StoreClient,
    ttl: Duration,
    shutdown: Option<&CancellationToken>,
) -> Result<LeaseHandle> {
    let cancel = shutdown.map_or_else(CancellationToken::new, CancellationToken::child_token);
    let asked = ttl.as_secs_f64().ceil().max(1.0) as i64;
    let started = Instant::now();
    let resp = client
        .request("lease_grant", None, None, Retry::Mutable, |c| async move {
            c.lease_client().grant(asked, None).await
        })
        .await?;
    if resp.ttl() <= 0 || resp.id() == 0 {
        return Err(Error::Protocol {
            op: "lease_grant",
            detail: format!(
                "granted lease {} has TTL {} ({})",
                resp.id(),
                resp.ttl(),
                resp.error()
            ),
        });
    }
    let id = LeaseId(resp.id());
    let granted = Duration::from_secs(resp.ttl() as u64);
    let period = keepalive_period(granted);
    // The store started the TTL somewhere between our request and its answer, so the lease
    // is counted from the request. An answer that came later than the TTL (a slow or frozen
    // store) would then read as lost before anything was tried: one keepalive decides.
    let deadline = (started + granted).max(Instant::now() + period);
    Ok(keep(
        client,
        id,
        granted,
        deadline,
        started + period,
        cancel,
    ))
}

/// Takes over a lease another process granted (and may still keep alive) and keeps it alive
/// from now on; `None` if the store no longer has it.
pub(crate) async fn adopt(
    client: &StoreClient,
    id: LeaseId,
    shutdown: Option<&CancellationToken>,
) -> Result<Option<LeaseHandle>> {
    let cancel = shutdown.map_or_else(CancellationToken::new, CancellationToken::child_token);
    let asked = Instant::now();
    let Some(resp) = time_to_live(client, id).await? else {
        return Ok(None);
    };
    if resp.ttl() <= 0 || resp.granted_ttl() <= 0 {
        return Ok(None);
    }
    let granted = Duration::from_secs(resp.granted_ttl() as u64);
    let deadline = asked + Duration::from_secs(resp.ttl() as u64);
    Ok(Some(keep(
        client,
        id,
        granted,
        deadline,
        Instant::now(),
        cancel,
    )))
}

/// The store's answer about lease `id`; `None` if it has no such lease.
pub(crate) async fn time_to_live(
    client: &StoreClient,
    id: LeaseId,
) -> Result<Option<etcd_client::LeaseTimeToLiveResponse>> {
    match client
        .request(
            "lease_time_to_live",
            None,
            Some(id),
            Retry::Repeatable,
            |c| async move { c.lease_client().time_to_live(id.0, None).await },
        )
        .await
    {
        Ok(resp) => Ok(Some(resp)),
        Err(Error::LeaseNotFound { .. }) => Ok(None),
        Err(err) => Err(err),
    }
}

/// Starts the keepalive task of lease `id`: first refresh at `next`, lost unless refreshed
/// by `deadline`.
fn keep(
    client: &StoreClient,
    id: LeaseId,
    ttl: Duration,
    deadline: Instant,
    next: Instant,
    cancel: CancellationToken,
) -> LeaseHandle {
    let (sender, state) = watch::channel(None);
    let publish = Arc::new(sender);
    let span = tracing::debug_span!(
        "lease_keepalive",
        endpoints = %client.endpoints(),
        lease = %id,
        ttl_secs = ttl.as_secs()
    );
    let task = tokio::spawn(
        keepalive(
            client.clone(),
            id,
            ttl,
            deadline,
            next,
            cancel.clone(),
            publish.clone(),
        )
        .instrument(span),
    );
    LeaseHandle {
        id,
        ttl,
        client: client.clone(),
        cancel,
        state,
        publish,
        task: Some(task),
    }
}

/// Keepalive period for a TTL: a third of it, at least 100 ms.
pub(crate) fn keepalive_period(ttl: Duration) -> Duration {
    (ttl / 3).max(Duration::from_millis(100))
}

/// The keepalive task: refreshes the lease every TTL/3 on one keepalive stream, reopens the
/// stream when it fails, and gives up when the store says the lease is gone or when no
/// refresh succeeded within the TTL.
async fn keepalive(
    client: StoreClient,
    id: LeaseId,
    ttl: Duration,
    mut deadline: Instant,
    mut next: Instant,
    cancel: CancellationToken,
    state: Arc<watch::Sender<Option<LeaseLost>>>,
) {
    let period = keepalive_period(ttl);
    let retry = (period / 2).min(Duration::from_secs(1));
    // The keepalive stream, with the endpoint it was opened on: a failure moves the client's
    // pin, and the next stream opens on the next member (keepalives reach the leader
    // through any member).
    let mut stream: Option<(etcd_client::LeaseKeeper, etcd_client::LeaseKeepAliveStream)> = None;
    let mut on = 0;
    let mut last_error = String::from("no keepalive attempted yet");
    let lost = loop {
        tokio::select! {
            biased;
            _ = cancel.cancelled() => break LeaseLost::Stopped,
            _ = tokio::time::sleep_until(deadline) => {
                break LeaseLost::Unreachable { last_error: last_error.clone() };
            }
            _ = tokio::time::sleep_until(next) => {}
        }
        // One attempt takes at most a period, so a member that went silent leaves time to
        // refresh through another before the lease runs out.
        let budget = client
            .request_timeout()
            .min(period)
            .min(deadline.saturating_duration_since(Instant::now()))
            .max(Duration::from_millis(50));
        let sent = Instant::now();
        let attempt = async {
            match &mut stream {
                Some((keeper, responses)) => {
                    keeper.keep_alive().await?;
                    match responses.message().await? {
                        Some(resp) => Ok(resp.ttl()),
                        None => Err(etcd_client::Error::LeaseKeepAliveError(
                            "keepalive stream closed by the store".to_owned(),
                        )),
                    }
                }
                None => {
                    // Opening the stream sends a first keepalive and checks its answer.
                    let (index, pinned) = client.members().pinned();
                    on = index;
                    let opened = pinned.lease_client().keep_alive(id.0).await?;
                    stream = Some(opened);
                    Ok(ttl.as_secs() as i64)
                }
            }
        };
        let outcome = tokio::select! {
            biased;
            _ = cancel.cancelled() => break LeaseLost::Stopped,
            outcome = tokio::time::timeout(budget, attempt) => outcome,
        };
        match outcome {
            Ok(Ok(remaining)) if remaining > 0 => {
                deadline = sent + Duration::from_secs(remaining as u64);
                next = sent + period;
                tracing::trace!(remaining, "lease refreshed");
            }
            Ok(Ok(_)) => break LeaseLost::Expired,
            Ok(Err(err)) => {
                if let etcd_client::Error::LeaseKeepAliveError(msg) = &err
                    && msg.contains("not found")
                {
                    break LeaseLost::Expired;
                }
                if let etcd_client::Error::GRpcStatus(status) = &err
                    && status.code() == tonic::Code::NotFound
                {
                    break LeaseLost::Expired;
                }
                tracing::debug!(error = %err, "lease keepalive failed, retrying");
                last_error = err.to_string();
                client.members().fail_over(on, &err);
                stream = None;
                next = Instant::now() + retry;
            }
            Err(_) => {
                tracing::debug!(?budget, "lease keepalive timed out, retrying");
                last_error = format!("keepalive timed out after {budget:?}");
                client.members().fail_over(on, &last_error);
                stream = None;
                next = Instant::now() + retry;
            }
        }
    };
    match &lost {
        LeaseLost::Stopped => tracing::debug!("lease keepalive stopped"),
        other => tracing::warn!(reason = %other, "lease lost"),
    }
    state.send_if_modified(|current| {
        if current.is_none() {
            *current = Some(lost);
            true
        } else {
            false
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn period_is_a_third_of_the_ttl() {
        assert_eq!(
            keepalive_period(Duration::from_secs(9)),
            Duration::from_secs(3)
        );
        assert_eq!(
            keepalive_period(Duration::from_millis(30)),
            Duration::from_millis(100)
        );
    }

    #[test]
    fn lease_id_prints_hex() {
        assert_eq!(LeaseId(255).to_string(), "ff");
    }
}
