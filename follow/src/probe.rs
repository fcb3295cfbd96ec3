//! One look at a peer's store: is it still the store followed so far, what cluster config
//! does it publish, and its heartbeat. kvstoremesh and the agent's direct mode look the same
//! way, at the start of every session and every probe interval.
//!
//! The look has a deadline of its own, shorter than a request's: a partition drops packets
//! without refusing anything, so the look that does not come back in time is how a silent
//! peer is noticed, and how soon decides how long clients keep using its backends.

use std::time::Duration;

use kvstore::client::{Error as StoreError, StoreClient};
use model::ClusterName;
use model::keys::{HEARTBEAT_KEY, cluster_config_key};

use crate::witness::{KeyVersion, StoreWitness};

/// Largest heartbeat accepted (publishers write an RFC 3339 time).
pub const MAX_HEARTBEAT_BYTES: usize = 256;

/// The peer's heartbeat as found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Heartbeat {
    /// Not published.
    Absent,
    /// Short UTF-8 text.
    Valid(Vec<u8>),
    /// Something else (too long, not UTF-8): ignored, so a hostile peer cannot make its
    /// readers copy or compare megabytes.
    Refused {
        /// Its size.
        bytes: usize,
    },
}

/// What one look found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    /// The store's revision when it answered the status request.
    pub revision: i64,
    /// Why the store is not the one seen before (it was replaced), if it is not; the witness
    /// now describes the new store.
    pub replaced: Option<String>,
    /// The value of the peer's cluster-config key, if published.
    pub config: Option<Vec<u8>>,
    /// The peer's heartbeat.
    pub heartbeat: Heartbeat,
}

/// Looks at `peer`'s store through `client`, checking it against `witness`; a look that
/// takes longer than `timeout` is [`StoreError::Timeout`] (op `probe`).
pub async fn probe(
    client: &StoreClient,
    peer: &ClusterName,
    witness: &mut StoreWitness,
    timeout: Duration,
) -> Result<Probe, StoreError> {
    match tokio::time::timeout(timeout, look(client, peer, witness)).await {
        Ok(found) => found,
        Err(_) => Err(StoreError::Timeout {
            op: "probe",
            endpoints: client.endpoints().to_owned(),
            after: timeout,
        }),
    }
}

async fn look(
    client: &StoreClient,
    peer: &ClusterName,
    witness: &mut StoreWitness,
) -> Result<Probe, StoreError> {
    let status = client.status().await?;
    let mut replaced = witness.check_status(&status);
    let raw = client.raw();
    let config = raw.get(&cluster_config_key(peer)).await?;
    if let Some(entry) = &config {
        let version = KeyVersion {
            create_revision: entry.create_revision,
            mod_revision: entry.mod_revision,
            lease: entry.lease,
        };
        if witness.check_config(version, status.revision) && replaced.is_none() {
            replaced = Some("its cluster config has another history".to_owned());
        }
    }
    let heartbeat = match raw.get(HEARTBEAT_KEY).await? {
        None => Heartbeat::Absent,
        Some(entry)
            if entry.value.len() <= MAX_HEARTBEAT_BYTES
                && std::str::from_utf8(&entry.value).is_ok() =>
        {
            Heartbeat::Valid(entry.value)
        }
        Some(entry) => Heartbeat::Refused {
            bytes: entry.value.len(),
        },
    };
    Ok(Probe {
        revision: status.revision,
        replaced,
        config: config.map(|e| e.value),
        heartbeat,
    })
}
