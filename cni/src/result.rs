//! The JSON a successful ADD and VERSION print.

use std::net::Ipv4Addr;

use serde::Serialize;

use crate::config::CniVersion;
use crate::link::Attached;

/// The result of ADD, in the runtime's spec version.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AddResult {
    /// The version the config asked for.
    pub cni_version: &'static str,
    /// The host side first, then the pod side (with its `sandbox`).
    pub interfaces: Vec<Interface>,
    /// The pod's address.
    pub ips: Vec<IpConfig>,
    /// The pod's default route.
    pub routes: Vec<Route>,
    /// Nothing: DNS is the runtime's business.
    pub dns: Dns,
}

/// An interface ADD made.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Interface {
    /// Its name.
    pub name: String,
    /// Its MAC address.
    pub mac: String,
    /// The netns path, for the pod side; absent for the host side.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<String>,
}

/// An address ADD gave the pod.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct IpConfig {
    /// `"4"`, only in 0.4.0 results (1.0.0 dropped the field).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<&'static str>,
    /// `a.b.c.d/32`: the pod reaches even its node neighbours through the gateway.
    pub address: String,
    /// The host side's address.
    pub gateway: Ipv4Addr,
    /// Index into `interfaces`: the pod side.
    pub interface: usize,
}

/// A route ADD gave the pod.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Route {
    /// The destination prefix.
    pub dst: String,
    /// The next hop.
    pub gw: Ipv4Addr,
}

/// An empty DNS section.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Dns {}

impl AddResult {
    /// The result for a pair ADD built in `netns`, giving the pod `ip` behind `gateway`.
    pub fn new(
        version: CniVersion,
        attached: &Attached,
        netns: &str,
        ip: Ipv4Addr,
        gateway: Ipv4Addr,
    ) -> Self {
        AddResult {
            cni_version: version.as_str(),
            interfaces: vec![
                Interface {
                    name: attached.host.name.clone(),
                    mac: attached.host.mac.clone(),
                    sandbox: None,
                },
                Interface {
                    name: attached.pod.name.clone(),
                    mac: attached.pod.mac.clone(),
                    sandbox: Some(netns.to_owned()),
                },
            ],
            ips: vec![IpConfig {
                version: (version == CniVersion::V0_4_0).then_some("4"),
                address: format!("{ip}/32"),
                gateway,
                interface: 1,
            }],
            routes: vec![Route {
                dst: "0.0.0.0/0".to_owned(),
                gw: gateway,
            }],
            dns: Dns {},
        }
    }
}

/// The answer to VERSION.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct VersionResult {
    /// The newest version we speak.
    pub cni_version: &'static str,
    /// Every version we speak.
    pub supported_versions: Vec<&'static str>,
}

impl VersionResult {
    /// What this plugin speaks.
    pub fn current() -> Self {
        VersionResult {
            cni_version: CniVersion::V1_0_0.as_str(),
            supported_versions: CniVersion::ALL.iter().map(|v| v.as_str()).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::link::Iface;
    use serde_json::json;

    fn attached() -> Attached {
        Attached {
            host: Iface {
                name: "cm0123456789abc".into(),
                index: 9,
                mac: "aa:bb:cc:00:00:01".into(),
            },
            pod: Iface {
                name: "eth0".into(),
                index: 2,
                mac: "aa:bb:cc:00:00:02".into(),
            },
        }
    }

    #[test]
    fn add_result_has_the_1_0_0_shape() {
        let result = AddResult::new(
            CniVersion::V1_0_0,
            &attached(),
            "/run/netns/pod",
            Ipv4Addr::new(10, 1, 0, 2),
            Ipv4Addr::new(10, 1, 0, 1),
        );
        assert_eq!(
            serde_json::to_value(&result).unwrap(),
            json!({
                "cniVersion": "1.0.0",
                "interfaces": [
                    {"name": "cm0123456789abc", "mac": "aa:bb:cc:00:00:01"},
                    {"name": "eth0", "mac": "aa:bb:cc:00:00:02", "sandbox": "/run/netns/pod"},
                ],
                "ips": [{"address": "10.1.0.2/32", "gateway": "10.1.0.1", "interface": 1}],
                "routes": [{"dst": "0.0.0.0/0", "gw": "10.1.0.1"}],
                "dns": {},
            })
        );
    }

    #[test]
    fn add_result_in_0_4_0_tags_the_ip_version() {
        let result = AddResult::new(
            CniVersion::V0_4_0,
            &attached(),
            "/run/netns/pod",
            Ipv4Addr::new(10, 1, 0, 2),
            Ipv4Addr::new(10, 1, 0, 1),
        );
        let json = serde_json::to_value(&result).unwrap();
        assert_eq!(json["cniVersion"], "0.4.0");
        assert_eq!(json["ips"][0]["version"], "4");
    }

    #[test]
    fn version_result() {
        assert_eq!(
            serde_json::to_string(&VersionResult::current()).unwrap(),
            r#"{"cniVersion":"1.0.0","supportedVersions":["0.4.0","1.0.0"]}"#
        );
    }
}
