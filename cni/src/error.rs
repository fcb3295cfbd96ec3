//! Every failure of an invocation, the CNI error code it maps to, and the error JSON a runtime
//! reads on stdout.

use std::error::Error as _;

use serde::Serialize;

use crate::agent::AgentError;
use crate::config::{CniVersion, ConfigError};
use crate::env::EnvError;
use crate::ipam::IpamError;
use crate::link::NetError;

/// The CNI error codes this plugin answers with: the spec's well-known ones (1..=11) and our
/// own from 100 on (documented in `docs/cni.md`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Code {
    /// 1: the config's `cniVersion` is not one we speak.
    IncompatibleVersion = 1,
    /// 2: the config asks for something this plugin does not do (an `ipam` section).
    UnsupportedField = 2,
    /// 3: the container (its netns or its allocation) does not exist.
    UnknownContainer = 3,
    /// 4: a `CNI_*` variable is missing or malformed.
    InvalidEnvironment = 4,
    /// 5: reading stdin, the netns or the allocation directory failed.
    Io = 5,
    /// 6: stdin is not a JSON object.
    Decode = 6,
    /// 7: a config field is missing or invalid.
    InvalidConfig = 7,
    /// 11: transient; the agent could not take the endpoint, retry the ADD later.
    TryAgainLater = 11,
    /// 100: every address of the pod CIDR is taken.
    RangeExhausted = 100,
    /// 101: the kernel refused a netlink request while building or removing the veth pair.
    Netlink = 101,
    /// 102: an interface that should exist does not, or CHECK found it not as ADD left it.
    CheckFailed = 102,
}

/// Why an invocation failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The `CNI_*` environment is unusable.
    #[error(transparent)]
    Env(#[from] EnvError),
    /// The network config on stdin is unusable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Allocating or releasing the pod's address failed.
    #[error(transparent)]
    Ipam(#[from] IpamError),
    /// Building, removing or checking the interfaces failed.
    #[error(transparent)]
    Net(#[from] NetError),
    /// The agent did not take the endpoint.
    #[error(transparent)]
    Agent(#[from] AgentError),
    /// The endpoint registration the agent would receive is malformed.
    #[error("endpoint registration refused before sending: {0}")]
    Registration(String),
    /// Reading the network config from stdin failed.
    #[error("reading the network config from stdin")]
    Stdin(#[source] std::io::Error),
}

impl Error {
    /// The CNI code a runtime sees.
    pub fn code(&self) -> Code {
        match self {
            Error::Env(e) => e.code(),
            Error::Config(e) => e.code(),
            Error::Ipam(e) => e.code(),
            Error::Net(e) => e.code(),
            Error::Agent(_) => Code::TryAgainLater,
            Error::Registration(_) => Code::InvalidEnvironment,
            Error::Stdin(_) => Code::Io,
        }
    }

    /// The error JSON for a runtime; `details` holds the chain of causes.
    pub fn reply(&self, version: CniVersion) -> ErrorReply {
        ErrorReply {
            cni_version: version.as_str(),
            code: self.code() as u32,
            msg: self.to_string(),
            details: self.source().map(describe),
        }
    }
}

/// An error and its causes on one line, `a: b: c`.
pub fn describe(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

impl ErrorReply {
    /// The JSON text a runtime reads.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("an error reply always serializes")
    }
}

/// The CNI error result, printed on stdout before a non-zero exit.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ErrorReply {
    /// The version the runtime asked for, or 1.0.0 when it asked for none we know.
    pub cni_version: &'static str,
    /// A [`Code`].
    pub code: u32,
    /// What failed.
    pub msg: String,
    /// Why, when a lower layer said so.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub details: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_carries_code_message_and_causes() {
        let io = std::io::Error::new(std::io::ErrorKind::BrokenPipe, "pipe closed");
        let reply = Error::Stdin(io).reply(CniVersion::V1_0_0);
        let json = serde_json::to_value(&reply).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "cniVersion": "1.0.0",
                "code": 5,
                "msg": "reading the network config from stdin",
                "details": "pipe closed",
            })
        );
    }

    #[test]
    fn reply_without_cause_has_no_details() {
        let err = Error::Config(ConfigError::Missing { field: "podCIDR" });
        let json = serde_json::to_value(err.reply(CniVersion::V0_4_0)).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "cniVersion": "0.4.0",
                "code": 7,
                "msg": "network config: field podCIDR is required",
            })
        );
    }

    #[test]
    fn codes_follow_the_spec() {
        let cases = [
            (Code::IncompatibleVersion, 1),
            (Code::UnsupportedField, 2),
            (Code::UnknownContainer, 3),
            (Code::InvalidEnvironment, 4),
            (Code::Io, 5),
            (Code::Decode, 6),
            (Code::InvalidConfig, 7),
            (Code::TryAgainLater, 11),
            (Code::RangeExhausted, 100),
            (Code::Netlink, 101),
            (Code::CheckFailed, 102),
        ];
        for (code, number) in cases {
            assert_eq!(code as u32, number, "{code:?}");
        }
        assert_eq!(
            Error::Registration("x".into()).code(),
            Code::InvalidEnvironment
        );
    }
}
