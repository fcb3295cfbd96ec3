//! ip→identity entries: which identity traffic from an address carries.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::identity::NumericIdentity;
use crate::keys::StateKey;
use crate::name::{ClusterName, DnsLabel, DnsSubdomain};
use crate::net::IpPrefix;
use crate::value::{SchemaVersion, StoreValue, ValueError};

/// `cilium/state/ip/v1/default/<ip>`: the identity of a pod address (or prefix).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct IpIdentity {
    /// Schema version (1).
    pub schema: SchemaVersion<1>,
    /// The address or prefix; the last key segment(s).
    pub ip: IpPrefix,
    /// Its identity; must lie in the publishing cluster's identity range.
    pub identity: NumericIdentity,
    /// The node hosting the address, to tunnel to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_ip: Option<IpAddr>,
    /// The pod's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<DnsLabel>,
    /// The pod's name; only with a namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_name: Option<DnsSubdomain>,
    /// The publishing cluster; the key does not carry it, so readers check it here.
    pub cluster: ClusterName,
}

impl IpIdentity {
    /// The entry's state key.
    pub fn key(&self) -> StateKey {
        StateKey::Ip { ip: self.ip }
    }
}

impl StoreValue for IpIdentity {
    const SCHEMA: u32 = 1;
    const WHAT: &'static str = "ip identity";

    fn validate(&self) -> Result<(), ValueError> {
        match (&self.namespace, &self.pod_name) {
            (None, Some(pod)) => Err(ValueError::PodWithoutNamespace {
                pod: pod.to_string(),
            }),
            _ => Ok(()),
        }
    }
}
