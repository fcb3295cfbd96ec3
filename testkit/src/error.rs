//! The one error type of the testkit.

use std::path::PathBuf;
use std::time::Duration;

/// Why starting, restarting or talking to a store process failed.
///
/// Every variant that concerns a running store carries the tail of the store's own log, because
/// a test failure that only says "not ready" sends the reader digging for the log file of a
/// temp dir that is already gone.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file or directory operation failed (temp dir, log file, PEM file). `context` says which,
    /// since a bare `io::Error` does not name the path.
    #[error("{context}: {source}")]
    Io {
        /// What we were doing, including the path.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// The store binary could not be executed at all (missing `etcd`, stale
    /// `CARGO_BIN_EXE_kvstore` path, no execute bit).
    #[error("cannot spawn {program}: {source}")]
    Spawn {
        /// The program we tried to run.
        program: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// The store process exited before it became ready: bad flags, a broken data dir, or a
    /// crash at startup. The log tail usually says which.
    #[error("{program} exited during startup with {status}; log tail:\n{log_tail}")]
    Exited {
        /// The program that exited.
        program: PathBuf,
        /// Its exit status, as text.
        status: String,
        /// The last lines it wrote to stderr/stdout.
        log_tail: String,
    },

    /// The ports we picked were taken by someone else between picking and binding, on every
    /// attempt. Other test processes pick ports concurrently, so a clash is retried a few times
    /// before this is reported.
    #[error(
        "could not bind free loopback ports after {attempts} attempts; last log tail:\n{log_tail}"
    )]
    PortsUnavailable {
        /// How many starts were tried.
        attempts: u32,
        /// The log of the last attempt.
        log_tail: String,
    },

    /// The process kept running but never answered `Maintenance.Status` (or, for etcd, never
    /// elected itself leader) within the timeout.
    #[error(
        "{program} not ready after {timeout:?} (last probe error: {last_error}); log tail:\n{log_tail}"
    )]
    NotReady {
        /// The program that did not become ready.
        program: PathBuf,
        /// How long we waited.
        timeout: Duration,
        /// What the last readiness probe saw.
        last_error: String,
        /// The last lines of its log.
        log_tail: String,
    },

    /// The live members of a [`crate::cluster::StoreCluster`] did not agree on a leader within
    /// the timeout: no quorum is up, or elections keep failing on an overloaded machine.
    #[error("no agreed leader after {timeout:?} ({last_seen}); log tails:\n{log_tail}")]
    NoLeader {
        /// How long we waited.
        timeout: Duration,
        /// What each member said last (its leader, or why it did not answer).
        last_seen: String,
        /// The last lines of every member's log.
        log_tail: String,
    },

    /// Our store's binary could not be built (and none was left by an earlier build).
    #[error("{0}")]
    Build(String),

    /// The etcd client could not be built (bad endpoint or TLS material).
    #[error("etcd client: {0}")]
    Client(#[from] etcd_client::Error),

    /// Certificate generation failed; with fixed, valid parameters this means an rcgen bug or
    /// an exhausted random source.
    #[error("certificate generation: {0}")]
    Pki(#[from] rcgen::Error),
}

impl Error {
    /// Wraps an `io::Error` with what we were doing when it happened.
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}
