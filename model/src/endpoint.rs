//! The contract between the CNI plugin and the node's agent: a pod's network endpoint.
//!
//! `clustermesh-cni` creates the pod's interface and registers it with the agent over the
//! agent's local API; the agent attaches the policy program to the host side. The type lives
//! here (no I/O) so neither binary links the other.
//!
//! | call | body | answer |
//! |---|---|---|
//! | `PUT /v1/endpoints/{container_id}` | [`EndpointRegistration`] | 200 with the registration |
//! | `DELETE /v1/endpoints/{container_id}` | — | 200 (also when unknown: DEL is idempotent) |
//! | `GET /v1/endpoints` | — | list of [`EndpointRegistration`] |
//!
//! Errors answer 4xx/5xx with [`ApiError`] as the body.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use crate::name::{DnsLabel, DnsSubdomain};

/// A pod's attached interface, as the CNI plugin made it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointRegistration {
    /// The container runtime's id of the pod sandbox (`CNI_CONTAINERID`).
    pub container_id: String,
    /// The pod's namespace (`K8S_POD_NAMESPACE` in `CNI_ARGS`).
    pub namespace: DnsLabel,
    /// The pod's name (`K8S_POD_NAME` in `CNI_ARGS`).
    pub pod: DnsSubdomain,
    /// The interface inside the pod (`CNI_IFNAME`).
    pub ifname: String,
    /// The host side of the veth pair: the policy program is attached here.
    pub host_ifname: String,
    /// The host side's interface index.
    pub host_ifindex: u32,
    /// The pod's address.
    pub ip: Ipv4Addr,
    /// The pod's network namespace (`CNI_NETNS`).
    pub netns: String,
}

impl EndpointRegistration {
    /// Whether the fields are usable: a container id and interface names of the kernel's
    /// shape (1..=15 bytes, no `/`, no whitespace), a non-zero interface index.
    pub fn validate(&self) -> Result<(), String> {
        if self.container_id.is_empty()
            || self.container_id.len() > 256
            || self.container_id.contains(['/', ' '])
        {
            return Err(format!(
                "container_id {:?}: must be 1..=256 characters without '/' or spaces",
                self.container_id
            ));
        }
        for (field, name) in [("ifname", &self.ifname), ("host_ifname", &self.host_ifname)] {
            if !valid_ifname(name) {
                return Err(format!(
                    "{field} {name:?}: an interface name is 1..=15 bytes without '/', ':' or whitespace"
                ));
            }
        }
        if self.host_ifindex == 0 {
            return Err("host_ifindex: must not be 0".to_owned());
        }
        Ok(())
    }
}

/// Whether `name` can name a Linux network interface.
pub fn valid_ifname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 15
        && name != "."
        && name != ".."
        && !name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace())
}

/// The body of an error answer from the agent's API.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    /// What went wrong, for a person.
    pub error: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registration() -> EndpointRegistration {
        EndpointRegistration {
            container_id: "abc123".to_owned(),
            namespace: DnsLabel::new("default").unwrap(),
            pod: DnsSubdomain::new("web-0").unwrap(),
            ifname: "eth0".to_owned(),
            host_ifname: "cm1a2b3c4d".to_owned(),
            host_ifindex: 7,
            ip: Ipv4Addr::new(10, 1, 0, 5),
            netns: "/run/netns/pod".to_owned(),
        }
    }

    #[test]
    fn round_trips_and_refuses_unknown_fields() {
        let r = registration();
        let text = serde_json::to_string(&r).unwrap();
        assert_eq!(
            serde_json::from_str::<EndpointRegistration>(&text).unwrap(),
            r
        );
        let extra = text.replacen('{', "{\"surprise\":1,", 1);
        assert!(serde_json::from_str::<EndpointRegistration>(&extra).is_err());
    }

    #[test]
    fn validation_names_the_field() {
        assert!(registration().validate().is_ok());
        let mut r = registration();
        r.host_ifname = "a-much-too-long-name".to_owned();
        assert!(r.validate().unwrap_err().starts_with("host_ifname"));
        let mut r = registration();
        r.container_id = "../x".to_owned();
        assert!(r.validate().unwrap_err().starts_with("container_id"));
        let mut r = registration();
        r.host_ifindex = 0;
        assert!(r.validate().unwrap_err().starts_with("host_ifindex"));
    }
}
