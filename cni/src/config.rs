//! The network config a runtime writes on stdin, checked field by field so an error names the
//! field at fault.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;

use model::IpPrefix;
use serde_json::{Map, Value};

use crate::error::Code;

/// The only `type` this plugin answers to.
pub const PLUGIN_TYPE: &str = "clustermesh-cni";
/// Where the agent's API listens unless `agent` says otherwise (the agent's own default).
pub const DEFAULT_AGENT: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 9890);
/// Where allocations persist unless `dataDir` says otherwise.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/cni/clustermesh";

/// A CNI spec version this plugin speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CniVersion {
    /// 0.4.0: the first with CHECK; its results tag each IP with `"version": "4"`.
    V0_4_0,
    /// 1.0.0, the current spec.
    V1_0_0,
}

impl CniVersion {
    /// Every version, oldest first, as VERSION reports them.
    pub const ALL: [CniVersion; 2] = [CniVersion::V0_4_0, CniVersion::V1_0_0];

    /// The spelling in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            CniVersion::V0_4_0 => "0.4.0",
            CniVersion::V1_0_0 => "1.0.0",
        }
    }

    fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.as_str() == text)
    }

    /// The version to answer an error in: the config's when it names one we speak, else 1.0.0.
    pub fn requested(stdin: &[u8]) -> Self {
        serde_json::from_slice::<Value>(stdin)
            .ok()
            .as_ref()
            .and_then(|v| v.get("cniVersion"))
            .and_then(Value::as_str)
            .and_then(Self::parse)
            .unwrap_or(CniVersion::V1_0_0)
    }
}

/// An IPv4 pod CIDR with room for a gateway and at least one pod (prefix length at most 30).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PodCidr {
    network: u32,
    len: u8,
}

impl PodCidr {
    /// The longest prefix that still leaves one pod address besides network, gateway and
    /// broadcast.
    pub const MAX_LEN: u8 = 30;

    /// Parses `a.b.c.d/len`; the reason names what is wrong.
    pub fn parse(text: &str) -> Result<Self, String> {
        if !text.contains('/') {
            return Err(format!("{text:?} is not a CIDR (address/length)"));
        }
        let prefix: IpPrefix = text.parse().map_err(|e| format!("{e}"))?;
        let IpAddr::V4(addr) = prefix.addr() else {
            return Err(format!("{text:?} is not IPv4"));
        };
        if prefix.prefix_len() > Self::MAX_LEN {
            return Err(format!(
                "{text:?} is too small: the prefix length must be at most {} (network, gateway, broadcast and one pod)",
                Self::MAX_LEN
            ));
        }
        Ok(PodCidr {
            network: addr.to_bits(),
            len: prefix.prefix_len(),
        })
    }

    /// The prefix length.
    pub fn prefix_len(self) -> u8 {
        self.len
    }

    /// The first host address: the host side of every veth carries it.
    pub fn gateway(self) -> Ipv4Addr {
        Ipv4Addr::from_bits(self.network + 1)
    }

    /// The addresses pods may get, lowest first: all but network, gateway and broadcast.
    pub fn pod_addresses(self) -> impl Iterator<Item = Ipv4Addr> {
        let broadcast = self.network | (u32::MAX >> self.len);
        (self.network + 2..broadcast).map(Ipv4Addr::from_bits)
    }

    /// Whether `ip` lies in the CIDR.
    pub fn contains(self, ip: Ipv4Addr) -> bool {
        ip.to_bits() & !(u32::MAX >> self.len) == self.network
    }
}

impl std::fmt::Display for PodCidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", Ipv4Addr::from_bits(self.network), self.len)
    }
}

/// The network config, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetConf {
    /// The spec version the runtime speaks; results are written in it.
    pub cni_version: CniVersion,
    /// The network's name; allocations live in `data_dir/name/`.
    pub name: String,
    /// This node's pod addresses.
    pub pod_cidr: PodCidr,
    /// The node agent's API.
    pub agent: SocketAddr,
    /// Where allocations persist.
    pub data_dir: PathBuf,
    /// The MTU of both veth ends; the kernel's default when absent.
    pub mtu: Option<u32>,
}

/// A network config that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Stdin is not JSON.
    #[error("network config is not JSON")]
    Json(#[source] serde_json::Error),
    /// Stdin is JSON but not an object.
    #[error("network config is not a JSON object")]
    NotAnObject,
    /// A required field is absent.
    #[error("network config: field {field} is required")]
    Missing {
        /// The field's JSON name.
        field: &'static str,
    },
    /// A field has a value we cannot use.
    #[error("network config: field {field}: {why}")]
    Invalid {
        /// The field's JSON name.
        field: &'static str,
        /// What is wrong with it.
        why: String,
    },
    /// `cniVersion` names a version we do not speak.
    #[error("network config: cniVersion {version:?} is not supported (supported: 0.4.0, 1.0.0)")]
    Version {
        /// The version asked for.
        version: String,
    },
    /// A field asks for something this plugin does not do.
    #[error("network config: field {field} is not supported: {why}")]
    Unsupported {
        /// The field's JSON name.
        field: &'static str,
        /// Why not.
        why: &'static str,
    },
}

impl ConfigError {
    /// The CNI code for this error.
    pub fn code(&self) -> Code {
        match self {
            ConfigError::Json(_) | ConfigError::NotAnObject => Code::Decode,
            ConfigError::Missing { .. } | ConfigError::Invalid { .. } => Code::InvalidConfig,
            ConfigError::Version { .. } => Code::IncompatibleVersion,
            ConfigError::Unsupported { .. } => Code::UnsupportedField,
        }
    }
}

impl NetConf {
    /// Parses and validates stdin. Unknown fields are allowed: runtimes add `prevResult`,
    /// `runtimeConfig`, `args` and the like.
    pub fn parse(stdin: &[u8]) -> Result<Self, ConfigError> {
        let value: Value = serde_json::from_slice(stdin).map_err(ConfigError::Json)?;
        let Value::Object(map) = value else {
            return Err(ConfigError::NotAnObject);
        };
        let version = required_str(&map, "cniVersion")?;
        let cni_version = CniVersion::parse(version).ok_or_else(|| ConfigError::Version {
            version: version.to_owned(),
        })?;
        let name = required_str(&map, "name")?;
        if !valid_network_name(name) {
            return Err(invalid(
                "name",
                format!(
                    "{name:?}: must start with a letter or digit and hold only letters, digits, '_', '.' and '-'"
                ),
            ));
        }
        let kind = required_str(&map, "type")?;
        if kind != PLUGIN_TYPE {
            return Err(invalid(
                "type",
                format!("{kind:?}: this plugin is {PLUGIN_TYPE:?}"),
            ));
        }
        if map.contains_key("ipam") {
            return Err(ConfigError::Unsupported {
                field: "ipam",
                why: "addresses come from podCIDR; remove the ipam section",
            });
        }
        let pod_cidr = PodCidr::parse(required_str(&map, "podCIDR")?)
            .map_err(|why| invalid("podCIDR", why))?;
        let agent = match optional_str(&map, "agent")? {
            None => DEFAULT_AGENT,
            Some(text) => text
                .parse()
                .map_err(|_| invalid("agent", format!("{text:?} is not an address host:port")))?,
        };
        let data_dir = PathBuf::from(optional_str(&map, "dataDir")?.unwrap_or(DEFAULT_DATA_DIR));
        if !data_dir.is_absolute() {
            return Err(invalid(
                "dataDir",
                format!(
                    "{:?} is not an absolute path",
                    data_dir.display().to_string()
                ),
            ));
        }
        let mtu = match map.get("mtu") {
            None | Some(Value::Null) => None,
            Some(value) => Some(
                value
                    .as_u64()
                    .filter(|mtu| (68..=65535).contains(mtu))
                    .and_then(|mtu| u32::try_from(mtu).ok())
                    .ok_or_else(|| {
                        invalid("mtu", format!("{value}: must be an integer 68..=65535"))
                    })?,
            ),
        };
        Ok(NetConf {
            cni_version,
            name: name.to_owned(),
            pod_cidr,
            agent,
            data_dir,
            mtu,
        })
    }
}

fn invalid(field: &'static str, why: String) -> ConfigError {
    ConfigError::Invalid { field, why }
}

fn optional_str<'a>(
    map: &'a Map<String, Value>,
    field: &'static str,
) -> Result<Option<&'a str>, ConfigError> {
    match map.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(text)) => Ok(Some(text)),
        Some(other) => Err(invalid(field, format!("{other}: must be a string"))),
    }
}

fn required_str<'a>(
    map: &'a Map<String, Value>,
    field: &'static str,
) -> Result<&'a str, ConfigError> {
    optional_str(map, field)?
        .filter(|text| !text.is_empty())
        .ok_or(ConfigError::Missing { field })
}

/// The spec's shape for a network name; it is also a directory name under `dataDir`, so this
/// rules out `/` and `..`.
fn valid_network_name(name: &str) -> bool {
    name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn base() -> Value {
        json!({
            "cniVersion": "1.0.0",
            "name": "mesh",
            "type": "clustermesh-cni",
            "podCIDR": "10.1.0.0/24",
        })
    }

    fn parse(value: &Value) -> Result<NetConf, ConfigError> {
        NetConf::parse(value.to_string().as_bytes())
    }

    fn with(field: &str, value: Value) -> Value {
        let mut config = base();
        config[field] = value;
        config
    }

    fn without(field: &str) -> Value {
        let mut config = base();
        config.as_object_mut().unwrap().remove(field);
        config
    }

    #[test]
    fn defaults_fill_the_optional_fields() {
        let conf = parse(&base()).unwrap();
        assert_eq!(conf.cni_version, CniVersion::V1_0_0);
        assert_eq!(conf.name, "mesh");
        assert_eq!(conf.pod_cidr.to_string(), "10.1.0.0/24");
        assert_eq!(conf.agent, DEFAULT_AGENT);
        assert_eq!(conf.data_dir, PathBuf::from(DEFAULT_DATA_DIR));
        assert_eq!(conf.mtu, None);
    }

    #[test]
    fn every_field_is_read_and_unknown_ones_are_allowed() {
        let mut config = base();
        config["cniVersion"] = json!("0.4.0");
        config["agent"] = json!("127.0.0.1:7000");
        config["dataDir"] = json!("/tmp/x");
        config["mtu"] = json!(1400);
        config["prevResult"] = json!({"ips": []});
        config["runtimeConfig"] = json!({"portMappings": []});
        let conf = parse(&config).unwrap();
        assert_eq!(conf.cni_version, CniVersion::V0_4_0);
        assert_eq!(conf.agent, "127.0.0.1:7000".parse().unwrap());
        assert_eq!(conf.data_dir, PathBuf::from("/tmp/x"));
        assert_eq!(conf.mtu, Some(1400));
    }

    #[test]
    fn each_bad_field_is_named() {
        let cases = [
            (without("name"), "name"),
            (with("name", json!("../etc")), "name"),
            (with("name", json!(7)), "name"),
            (without("type"), "type"),
            (with("type", json!("bridge")), "type"),
            (without("podCIDR"), "podCIDR"),
            (with("podCIDR", json!("10.1.0.0")), "podCIDR"),
            (with("podCIDR", json!("10.1.0.1/24")), "podCIDR"),
            (with("podCIDR", json!("10.1.0.0/31")), "podCIDR"),
            (with("podCIDR", json!("fd00::/64")), "podCIDR"),
            (with("podCIDR", json!("nonsense")), "podCIDR"),
            (with("agent", json!("localhost")), "agent"),
            (with("agent", json!(9890)), "agent"),
            (with("dataDir", json!("relative/dir")), "dataDir"),
            (with("mtu", json!(0)), "mtu"),
            (with("mtu", json!("1500")), "mtu"),
            (with("mtu", json!(70000)), "mtu"),
            (without("cniVersion"), "cniVersion"),
        ];
        for (config, field) in cases {
            let err = parse(&config).unwrap_err();
            assert_eq!(err.code(), Code::InvalidConfig, "{config}: {err}");
            assert!(
                err.to_string().contains(&format!("field {field}")),
                "{config}: {err} does not name {field}"
            );
        }
    }

    #[test]
    fn unknown_version_is_incompatible() {
        let err = parse(&with("cniVersion", json!("0.3.1"))).unwrap_err();
        assert_eq!(err.code(), Code::IncompatibleVersion);
        assert!(err.to_string().contains("0.3.1"), "{err}");
    }

    #[test]
    fn an_ipam_section_is_unsupported() {
        let err = parse(&with("ipam", json!({"type": "host-local"}))).unwrap_err();
        assert_eq!(err.code(), Code::UnsupportedField);
        assert!(err.to_string().contains("ipam"), "{err}");
    }

    #[test]
    fn undecodable_input_is_a_decode_error() {
        for input in ["", "{", "[1]", "\"x\""] {
            let err = NetConf::parse(input.as_bytes()).unwrap_err();
            assert_eq!(err.code(), Code::Decode, "{input:?}");
        }
    }

    #[test]
    fn requested_version_falls_back_to_1_0_0() {
        assert_eq!(
            CniVersion::requested(br#"{"cniVersion":"0.4.0"}"#),
            CniVersion::V0_4_0
        );
        assert_eq!(
            CniVersion::requested(br#"{"cniVersion":"9"}"#),
            CniVersion::V1_0_0
        );
        assert_eq!(CniVersion::requested(b"junk"), CniVersion::V1_0_0);
    }

    #[test]
    fn pod_cidr_arithmetic() {
        let cidr = PodCidr::parse("10.1.0.0/30").unwrap();
        assert_eq!(cidr.gateway(), Ipv4Addr::new(10, 1, 0, 1));
        assert_eq!(
            cidr.pod_addresses().collect::<Vec<_>>(),
            [Ipv4Addr::new(10, 1, 0, 2)]
        );
        let cidr = PodCidr::parse("10.1.0.0/24").unwrap();
        assert_eq!(cidr.pod_addresses().count(), 253);
        assert!(cidr.contains(Ipv4Addr::new(10, 1, 0, 255)));
        assert!(!cidr.contains(Ipv4Addr::new(10, 1, 1, 0)));
        assert_eq!(
            PodCidr::parse("0.0.0.0/0").unwrap().pod_addresses().next(),
            Some(Ipv4Addr::new(0, 0, 0, 2))
        );
    }
}
