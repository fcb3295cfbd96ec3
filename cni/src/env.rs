//! The `CNI_*` environment a runtime sets, read into one request per command.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use model::endpoint::valid_ifname;
use model::{DnsLabel, DnsSubdomain};

use crate::error::Code;
use crate::ipam::Owner;

/// What the runtime asks for, with the variables that command needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    /// Report the spec versions we speak.
    Version,
    /// Attach the pod.
    Add {
        /// Container and interface.
        owner: Owner,
        /// The pod's network namespace.
        netns: PathBuf,
        /// Who the pod is, for the agent.
        pod: PodRef,
    },
    /// Verify an attachment.
    Check {
        /// Container and interface.
        owner: Owner,
        /// The pod's network namespace.
        netns: PathBuf,
    },
    /// Detach; the netns may already be gone, so it is not needed.
    Del {
        /// Container and interface.
        owner: Owner,
    },
}

/// The Kubernetes pod a sandbox belongs to, from `CNI_ARGS`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodRef {
    /// `K8S_POD_NAMESPACE`.
    pub namespace: DnsLabel,
    /// `K8S_POD_NAME`.
    pub name: DnsSubdomain,
}

/// An environment the plugin cannot act on.
#[derive(Debug, thiserror::Error)]
pub enum EnvError {
    /// A required variable is unset or empty.
    #[error("{var} is not set")]
    Missing {
        /// The variable, or the `CNI_ARGS` key.
        var: &'static str,
    },
    /// A variable has a value we cannot use.
    #[error("{var}: {why}")]
    Invalid {
        /// The variable, or the `CNI_ARGS` key.
        var: &'static str,
        /// What is wrong with it.
        why: String,
    },
    /// `CNI_NETNS` names no file: the container is gone.
    #[error("CNI_NETNS {}: no such network namespace", path.display())]
    NetnsMissing {
        /// The path given.
        path: PathBuf,
    },
    /// `CNI_NETNS` exists but cannot be opened.
    #[error("CNI_NETNS {}: cannot open", path.display())]
    NetnsOpen {
        /// The path given.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

impl EnvError {
    /// The CNI code for this error.
    pub fn code(&self) -> Code {
        match self {
            EnvError::Missing { .. } | EnvError::Invalid { .. } => Code::InvalidEnvironment,
            EnvError::NetnsMissing { .. } => Code::UnknownContainer,
            EnvError::NetnsOpen { .. } => Code::Io,
        }
    }
}

impl Request {
    /// Reads the request from the environment through `var` (so tests need not set the
    /// process's environment).
    pub fn from_env(var: impl Fn(&str) -> Option<String>) -> Result<Self, EnvError> {
        let get = |name: &'static str| {
            var(name)
                .filter(|value| !value.is_empty())
                .ok_or(EnvError::Missing { var: name })
        };
        let command = get("CNI_COMMAND")?;
        if command == "VERSION" {
            return Ok(Request::Version);
        }
        if !matches!(command.as_str(), "ADD" | "DEL" | "CHECK") {
            return Err(EnvError::Invalid {
                var: "CNI_COMMAND",
                why: format!("{command:?} is not one of ADD, DEL, CHECK, VERSION"),
            });
        }
        let container_id = get("CNI_CONTAINERID")?;
        if !valid_container_id(&container_id) {
            return Err(EnvError::Invalid {
                var: "CNI_CONTAINERID",
                why: format!(
                    "{container_id:?}: must be 1..=256 letters, digits, '_', '.' or '-', starting with a letter or digit"
                ),
            });
        }
        let ifname = get("CNI_IFNAME")?;
        if !valid_ifname(&ifname) {
            return Err(EnvError::Invalid {
                var: "CNI_IFNAME",
                why: format!(
                    "{ifname:?}: an interface name is 1..=15 bytes without '/', ':' or whitespace"
                ),
            });
        }
        let owner = Owner {
            container_id,
            ifname,
        };
        Ok(match command.as_str() {
            "ADD" => Request::Add {
                owner,
                netns: get("CNI_NETNS")?.into(),
                pod: PodRef::from_cni_args(&var("CNI_ARGS").unwrap_or_default())?,
            },
            "CHECK" => Request::Check {
                owner,
                netns: get("CNI_NETNS")?.into(),
            },
            _ => Request::Del { owner },
        })
    }
}

impl PodRef {
    /// Reads `K8S_POD_NAMESPACE` and `K8S_POD_NAME` from `CNI_ARGS` (`K=V;K=V`); other keys
    /// (`IgnoreUnknown`, `K8S_POD_UID`, ...) are ignored.
    pub fn from_cni_args(text: &str) -> Result<Self, EnvError> {
        let args = parse_cni_args(text)?;
        let get = |key: &'static str| {
            args.get(key)
                .filter(|v| !v.is_empty())
                .ok_or(EnvError::Missing { var: key })
        };
        let namespace = get("K8S_POD_NAMESPACE")?;
        let name = get("K8S_POD_NAME")?;
        Ok(PodRef {
            namespace: DnsLabel::new(*namespace).map_err(|e| EnvError::Invalid {
                var: "K8S_POD_NAMESPACE",
                why: e.to_string(),
            })?,
            name: DnsSubdomain::new(*name).map_err(|e| EnvError::Invalid {
                var: "K8S_POD_NAME",
                why: e.to_string(),
            })?,
        })
    }
}

/// Splits `CNI_ARGS` into its pairs; empty segments (a trailing `;`) are skipped.
pub fn parse_cni_args(text: &str) -> Result<BTreeMap<&str, &str>, EnvError> {
    text.split(';')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            pair.split_once('=')
                .filter(|(key, _)| !key.is_empty())
                .ok_or_else(|| EnvError::Invalid {
                    var: "CNI_ARGS",
                    why: format!("{pair:?} is not KEY=VALUE"),
                })
        })
        .collect()
}

/// Opens the pod's namespace, telling a gone container (code 3) from an I/O failure.
pub fn open_netns(path: &Path) -> Result<File, EnvError> {
    File::open(path).map_err(|source| match source.kind() {
        io::ErrorKind::NotFound => EnvError::NetnsMissing {
            path: path.to_owned(),
        },
        _ => EnvError::NetnsOpen {
            path: path.to_owned(),
            source,
        },
    })
}

/// The spec's shape for a container id, within the agent's 256-character limit; it also
/// keeps the id safe in the agent's URL path.
fn valid_container_id(id: &str) -> bool {
    id.len() <= 256
        && id.starts_with(|c: char| c.is_ascii_alphanumeric())
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: BTreeMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |key| map.get(key).cloned()
    }

    const ADD: &[(&str, &str)] = &[
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "abc-123"),
        ("CNI_NETNS", "/run/netns/pod"),
        ("CNI_IFNAME", "eth0"),
        (
            "CNI_ARGS",
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0;K8S_POD_UID=u",
        ),
        ("CNI_PATH", "/opt/cni/bin"),
    ];

    fn add_without(var: &str) -> Vec<(&'static str, &'static str)> {
        ADD.iter().copied().filter(|(k, _)| *k != var).collect()
    }

    fn add_with(var: &'static str, value: &'static str) -> Vec<(&'static str, &'static str)> {
        let mut pairs = add_without(var);
        pairs.push((var, value));
        pairs
    }

    #[test]
    fn add_reads_every_variable() {
        let request = Request::from_env(env(ADD)).unwrap();
        assert_eq!(
            request,
            Request::Add {
                owner: Owner {
                    container_id: "abc-123".into(),
                    ifname: "eth0".into()
                },
                netns: "/run/netns/pod".into(),
                pod: PodRef {
                    namespace: DnsLabel::new("default").unwrap(),
                    name: DnsSubdomain::new("web-0").unwrap(),
                },
            }
        );
    }

    #[test]
    fn del_needs_no_netns_and_no_args() {
        let pairs = [
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "abc"),
            ("CNI_IFNAME", "eth0"),
        ];
        assert!(matches!(
            Request::from_env(env(&pairs)).unwrap(),
            Request::Del { .. }
        ));
    }

    #[test]
    fn version_needs_nothing_else() {
        assert_eq!(
            Request::from_env(env(&[("CNI_COMMAND", "VERSION")])).unwrap(),
            Request::Version
        );
    }

    #[test]
    fn each_bad_variable_is_named() {
        let cases = [
            (add_without("CNI_COMMAND"), "CNI_COMMAND"),
            (add_with("CNI_COMMAND", "GC"), "CNI_COMMAND"),
            (add_without("CNI_CONTAINERID"), "CNI_CONTAINERID"),
            (add_with("CNI_CONTAINERID", "../x"), "CNI_CONTAINERID"),
            (add_with("CNI_CONTAINERID", "a b"), "CNI_CONTAINERID"),
            (add_without("CNI_IFNAME"), "CNI_IFNAME"),
            (add_with("CNI_IFNAME", "much-too-long-name"), "CNI_IFNAME"),
            (add_without("CNI_NETNS"), "CNI_NETNS"),
            (add_with("CNI_NETNS", ""), "CNI_NETNS"),
            (add_without("CNI_ARGS"), "K8S_POD_NAMESPACE"),
            (
                add_with("CNI_ARGS", "K8S_POD_NAMESPACE=default"),
                "K8S_POD_NAME",
            ),
            (
                add_with("CNI_ARGS", "K8S_POD_NAMESPACE=Bad_NS;K8S_POD_NAME=x"),
                "K8S_POD_NAMESPACE",
            ),
            (
                add_with("CNI_ARGS", "K8S_POD_NAMESPACE=a;K8S_POD_NAME=x/y"),
                "K8S_POD_NAME",
            ),
            (add_with("CNI_ARGS", "K8S_POD_NAMESPACE=a;junk"), "CNI_ARGS"),
        ];
        for (pairs, var) in cases {
            let err = Request::from_env(env(&pairs)).unwrap_err();
            assert_eq!(err.code(), Code::InvalidEnvironment, "{pairs:?}");
            assert!(
                err.to_string().starts_with(var),
                "{pairs:?}: {err} does not name {var}"
            );
        }
    }

    #[test]
    fn cni_args_parse_into_pairs() {
        let args = parse_cni_args("A=1;B=;C=x=y;").unwrap();
        assert_eq!(args.len(), 3);
        assert_eq!(args["A"], "1");
        assert_eq!(args["B"], "");
        assert_eq!(args["C"], "x=y");
        assert!(parse_cni_args("").unwrap().is_empty());
        assert!(parse_cni_args("=v").is_err());
    }

    #[test]
    fn netns_missing_is_an_unknown_container() {
        let err = open_netns(Path::new("/run/netns/does-not-exist-cni-unit")).unwrap_err();
        assert_eq!(err.code(), Code::UnknownContainer);
        assert!(err.to_string().starts_with("CNI_NETNS"), "{err}");
    }
}
