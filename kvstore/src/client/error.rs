//! The client layer's error type.

use std::path::PathBuf;
use std::time::Duration;

use super::LeaseId;

/// A result with the client layer's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A boxed error from a codec or another layer, kept as a `#[source]`.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Everything that can go wrong when talking to a store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The client configuration is invalid; nothing was started.
    #[error("invalid store client configuration")]
    Config(#[from] ConfigError),

    /// The store could not be reached or answered that it cannot serve now (no leader,
    /// connection refused or reset, too many requests). Retrying later may succeed.
    #[error("store at {endpoints} unavailable during {op}")]
    Unavailable {
        /// The operation that failed.
        op: &'static str,
        /// The endpoints the client was configured with.
        endpoints: String,
        /// What the transport or the server said.
        #[source]
        source: etcd_client::Error,
    },

    /// The store did not answer within the configured request timeout.
    #[error("{op} on store at {endpoints} timed out after {after:?}")]
    Timeout {
        /// The operation that timed out.
        op: &'static str,
        /// The endpoints the client was configured with.
        endpoints: String,
        /// How long the client waited.
        after: Duration,
    },

    /// A read asked for a revision that the store has already compacted away; the caller
    /// must list again at the current revision.
    #[error("revision {revision} requested by {op} has been compacted")]
    Compacted {
        /// The operation that failed.
        op: &'static str,
        /// The revision that was asked for.
        revision: i64,
    },

    /// A read asked for a revision the store has not reached yet (for example after the
    /// store was replaced by one with a shorter history).
    #[error("revision {revision} requested by {op} is in the future of the store")]
    FutureRevision {
        /// The operation that failed.
        op: &'static str,
        /// The revision that was asked for.
        revision: i64,
    },

    /// The lease does not exist (it expired, was revoked, or the store was replaced).
    #[error("lease {lease} not found")]
    LeaseNotFound {
        /// The lease that was used.
        lease: LeaseId,
    },

    /// A stored value (or key) could not be decoded by the codec.
    #[error("cannot decode the value of key {key:?}")]
    Decode {
        /// The key whose value could not be decoded (lossily converted if not UTF-8).
        key: String,
        /// The codec's error.
        #[source]
        source: BoxError,
    },

    /// A value could not be encoded by the codec; nothing was written.
    #[error("cannot encode the value for key {key:?}")]
    Encode {
        /// The key the value was meant for.
        key: String,
        /// The codec's error.
        #[source]
        source: BoxError,
    },

    /// The store refused the request (permission denied, request too large, invalid
    /// argument, ...). Retrying the same request will fail again.
    #[error("store at {endpoints} rejected {op}")]
    Rejected {
        /// The operation that failed.
        op: &'static str,
        /// The endpoints the client was configured with.
        endpoints: String,
        /// What the server said.
        #[source]
        source: etcd_client::Error,
    },

    /// The store answered with something the client did not expect (a missing header,
    /// an unknown event type, a watch that was not created, ...).
    #[error("unexpected answer from store during {op}: {detail}")]
    Protocol {
        /// The operation that failed.
        op: &'static str,
        /// What was wrong with the answer.
        detail: String,
    },

    /// A guarded batch's guard no longer holds: the key changed since its holder wrote it.
    #[error("guard {key} changed: no longer the writer that held it")]
    GuardFailed {
        /// The guard key.
        key: String,
    },

    /// A batch failed part way through: the first `applied` operations were committed
    /// (in order), the rest were not.
    #[error("batch failed after {applied} of {total} operations were applied")]
    BatchFailed {
        /// How many operations, counted from the start of the batch, were committed.
        applied: usize,
        /// How many operations the batch had.
        total: usize,
        /// Why the next transaction failed.
        #[source]
        source: Box<Error>,
    },
}

impl Error {
    /// Whether retrying the same call later may succeed (the store was unreachable, busy,
    /// or slow). Compaction, decode, configuration and rejection errors are not retryable
    /// as such: the caller has to change what it asks for.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Unavailable { .. } | Error::Timeout { .. } => true,
            Error::BatchFailed { source, .. } => source.is_retryable(),
            _ => false,
        }
    }

    /// Whether this error says that a revision was compacted (directly or inside a failed
    /// batch).
    pub fn is_compacted(&self) -> bool {
        match self {
            Error::Compacted { .. } => true,
            Error::BatchFailed { source, .. } => source.is_compacted(),
            _ => false,
        }
    }

    /// Whether a guarded batch found its guard changed (directly or inside a failed batch).
    pub fn is_guard_failed(&self) -> bool {
        match self {
            Error::GuardFailed { .. } => true,
            Error::BatchFailed { source, .. } => source.is_guard_failed(),
            _ => false,
        }
    }

    /// The gRPC status code the store answered with, if the error came from one.
    pub fn grpc_code(&self) -> Option<tonic::Code> {
        match self {
            Error::Unavailable { source, .. } | Error::Rejected { source, .. } => match source {
                etcd_client::Error::GRpcStatus(status) => Some(status.code()),
                _ => None,
            },
            Error::BatchFailed { source, .. } => source.grpc_code(),
            _ => None,
        }
    }
}

/// Why a [`ClientConfig`](super::ClientConfig) is invalid. Each variant names the field.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// `endpoints` is empty.
    #[error("endpoints: at least one endpoint is required")]
    NoEndpoints,

    /// An entry of `endpoints` is not `http://host:port`, `https://host:port` or `host:port`.
    #[error("endpoints: {endpoint:?} is not a valid endpoint: {reason}")]
    InvalidEndpoint {
        /// The endpoint as given.
        endpoint: String,
        /// What is wrong with it.
        reason: &'static str,
    },

    /// An `https://` endpoint was given but `tls` is not set.
    #[error("tls: endpoint {endpoint:?} uses https, so tls (at least a CA file) is required")]
    TlsRequired {
        /// The https endpoint.
        endpoint: String,
    },

    /// `tls` is set but an endpoint explicitly uses plain `http://`.
    #[error("endpoints: {endpoint:?} uses plain http but tls is configured; use https://")]
    PlainEndpointWithTls {
        /// The http endpoint.
        endpoint: String,
    },

    /// `tls.cert` is set without `tls.key`, or the other way round.
    #[error("tls.{missing}: a client certificate needs both tls.cert and tls.key")]
    IncompleteIdentity {
        /// The field that is missing (`cert` or `key`).
        missing: &'static str,
    },

    /// A timeout or limit is zero.
    #[error("{field}: must be greater than zero")]
    Zero {
        /// The field that is zero.
        field: &'static str,
    },

    /// A file named in the configuration could not be read.
    #[error("{field}: cannot read {path}")]
    ReadFile {
        /// The field that names the file (`tls.ca`, `tls.cert`, `tls.key`).
        field: &'static str,
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },

    /// A file named in the configuration does not hold what it should (no PEM certificate,
    /// no PEM private key).
    #[error("{field}: {path} {problem}")]
    InvalidPem {
        /// The field that names the file.
        field: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong with its content.
        problem: String,
    },

    /// The underlying etcd client refused the configuration.
    #[error("endpoints: the etcd client refused the configuration")]
    Client {
        /// The etcd client's error.
        #[source]
        source: etcd_client::Error,
    },
}

/// Sorts an `etcd_client` error into the client layer's [`Error`] variants.
/// Whether a failed call certainly changed nothing in the store: no connection to the member
/// was made, or the member answered that it has no leader (it proposes nothing then). Only
/// then is a write sent again to another member, as etcd's own client decides.
pub(crate) fn never_applied(err: &etcd_client::Error) -> bool {
    let etcd_client::Error::GRpcStatus(status) = err else {
        return matches!(err, etcd_client::Error::TransportError(_));
    };
    if status.message() == NO_LEADER {
        return true;
    }
    let mut source = std::error::Error::source(status);
    while let Some(cause) = source {
        if let Some(io) = cause.downcast_ref::<std::io::Error>()
            && matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionRefused
                    // Written to a connection the member had already closed: not received.
                    | std::io::ErrorKind::BrokenPipe
                    | std::io::ErrorKind::HostUnreachable
                    | std::io::ErrorKind::NetworkUnreachable
                    | std::io::ErrorKind::AddrNotAvailable
            )
        {
            return true;
        }
        source = cause.source();
    }
    false
}

/// etcd's answer (and ours) when a member knows no leader: nothing was proposed.
const NO_LEADER: &str = "etcdserver: no leader";

pub(crate) fn classify(
    op: &'static str,
    endpoints: &str,
    revision: Option<i64>,
    lease: Option<LeaseId>,
    err: etcd_client::Error,
) -> Error {
    use tonic::Code;
    let status = match &err {
        etcd_client::Error::GRpcStatus(status) => status,
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => {
            return Error::Unavailable {
                op,
                endpoints: endpoints.to_owned(),
                source: err,
            };
        }
        etcd_client::Error::LeaseKeepAliveError(msg) if msg.contains("not found") => {
            if let Some(lease) = lease {
                return Error::LeaseNotFound { lease };
            }
            return Error::Rejected {
                op,
                endpoints: endpoints.to_owned(),
                source: err,
            };
        }
        _ => {
            return Error::Rejected {
                op,
                endpoints: endpoints.to_owned(),
                source: err,
            };
        }
    };
    let message = status.message();
    match status.code() {
        Code::OutOfRange if message.contains("compacted") => Error::Compacted {
            op,
            revision: revision.unwrap_or_default(),
        },
        Code::OutOfRange if message.contains("future revision") => Error::FutureRevision {
            op,
            revision: revision.unwrap_or_default(),
        },
        // "etcdserver: requested lease not found", for a request that uses a lease.
        Code::NotFound if lease.is_some() => Error::LeaseNotFound {
            lease: lease.unwrap_or_default(),
        },
        Code::Unavailable
        | Code::DeadlineExceeded
        | Code::ResourceExhausted
        | Code::Aborted
        | Code::Cancelled
        | Code::Unknown => Error::Unavailable {
            op,
            endpoints: endpoints.to_owned(),
            source: err,
        },
        _ => Error::Rejected {
            op,
            endpoints: endpoints.to_owned(),
            source: err,
        },
    }
}
