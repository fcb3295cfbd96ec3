//! IP prefixes: pod CIDRs and the addresses of ip→identity entries.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Text that is not an IP address or prefix.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PrefixError {
    /// The address part does not parse.
    #[error("{value:?} is not an IP address or prefix (address/length)")]
    Address {
        /// The refused text.
        value: String,
    },
    /// The length is not a number up to the family's width.
    #[error("{value:?} has a bad prefix length: must be 0..={max}")]
    Length {
        /// The refused text.
        value: String,
        /// 32 or 128.
        max: u8,
    },
    /// Bits beyond the prefix length are set, so the text names no single network.
    #[error("{value:?} has host bits set; the network is {network}")]
    HostBits {
        /// The refused text.
        value: String,
        /// The network the address lies in.
        network: String,
    },
}

/// An IP network: an address with a prefix length and no host bits set.
///
/// A full-length prefix (/32, /128) is a single host and is written as the bare address, so
/// each network has exactly one spelling, in keys as in values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IpPrefix {
    addr: IpAddr,
    len: u8,
}

impl IpPrefix {
    /// A network; refuses a length beyond the family's width or an address with host bits.
    pub fn new(addr: IpAddr, len: u8) -> Result<Self, PrefixError> {
        let max = Self::max_len_of(addr);
        if len > max {
            return Err(PrefixError::Length {
                value: format!("{addr}/{len}"),
                max,
            });
        }
        let network = Self::truncate(addr, len);
        if network != addr {
            return Err(PrefixError::HostBits {
                value: format!("{addr}/{len}"),
                network: IpPrefix { addr: network, len }.to_string(),
            });
        }
        Ok(IpPrefix { addr, len })
    }

    /// The single host `addr` (/32 or /128).
    pub fn host(addr: IpAddr) -> Self {
        IpPrefix {
            addr,
            len: Self::max_len_of(addr),
        }
    }

    /// The network address.
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// The prefix length.
    pub fn prefix_len(&self) -> u8 {
        self.len
    }

    /// Whether this names one host rather than a wider network.
    pub fn is_host(&self) -> bool {
        self.len == Self::max_len_of(self.addr)
    }

    /// Whether `ip` lies in this network.
    pub fn contains(&self, ip: IpAddr) -> bool {
        ip.is_ipv4() == self.addr.is_ipv4() && Self::truncate(ip, self.len) == self.addr
    }

    fn max_len_of(addr: IpAddr) -> u8 {
        if addr.is_ipv4() { 32 } else { 128 }
    }

    /// `addr` with every bit past `len` cleared; `len` is at most the family's width.
    pub(crate) fn truncate(addr: IpAddr, len: u8) -> IpAddr {
        match addr {
            IpAddr::V4(a) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
                IpAddr::V4((u32::from(a) & mask).into())
            }
            IpAddr::V6(a) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
                IpAddr::V6((u128::from(a) & mask).into())
            }
        }
    }
}

impl From<IpAddr> for IpPrefix {
    fn from(addr: IpAddr) -> Self {
        IpPrefix::host(addr)
    }
}

impl fmt::Display for IpPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_host() {
            write!(f, "{}", self.addr)
        } else {
            write!(f, "{}/{}", self.addr, self.len)
        }
    }
}

impl FromStr for IpPrefix {
    type Err = PrefixError;

    /// Parses `address` or `address/length`; the length is plain decimal digits.
    fn from_str(s: &str) -> Result<Self, PrefixError> {
        let (addr, len) = match s.split_once('/') {
            Some((addr, len)) => (addr, Some(len)),
            None => (s, None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| PrefixError::Address { value: s.into() })?;
        let Some(len) = len else {
            return Ok(IpPrefix::host(addr));
        };
        let max = Self::max_len_of(addr);
        let len = (!len.is_empty() && len.len() <= 3 && len.bytes().all(|b| b.is_ascii_digit()))
            .then(|| len.parse::<u8>().ok())
            .flatten()
            .filter(|len| *len <= max)
            .ok_or_else(|| PrefixError::Length {
                value: s.into(),
                max,
            })?;
        IpPrefix::new(addr, len).map_err(|e| match e {
            PrefixError::HostBits { network, .. } => PrefixError::HostBits {
                value: s.into(),
                network,
            },
            other => other,
        })
    }
}

impl Serialize for IpPrefix {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for IpPrefix {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn p(s: &str) -> IpPrefix {
        s.parse().unwrap()
    }

    #[test]
    fn spelling() {
        assert_eq!(p("10.0.0.0/24").to_string(), "10.0.0.0/24");
        assert_eq!(p("10.0.0.1/32").to_string(), "10.0.0.1");
        assert_eq!(p("10.0.0.1").prefix_len(), 32);
        assert_eq!(p("0.0.0.0/0").to_string(), "0.0.0.0/0");
        assert_eq!(p("fd00::/64").to_string(), "fd00::/64");
        assert_eq!(p("fd00:0::1").to_string(), "fd00::1");
        assert!(p("10.0.0.0/24").contains("10.0.0.9".parse().unwrap()));
        assert!(!p("10.0.0.0/24").contains("10.0.1.9".parse().unwrap()));
        assert!(!p("::/0").contains("10.0.1.9".parse().unwrap()));
    }

    #[test]
    fn refusals() {
        for bad in [
            "",
            "10.0.0",
            "10.0.0.0/",
            "10.0.0.0/33",
            "10.0.0.0/-1",
            "10.0.0.0/+8",
            "10.0.0.0/ 8",
            "fd00::/129",
            "10.0.0.0/24/1",
            "fe80::1%eth0",
            "x",
        ] {
            let err = bad.parse::<IpPrefix>().unwrap_err();
            assert!(err.to_string().contains(&format!("{bad:?}")), "{err}");
        }
        let err = "10.0.0.1/24".parse::<IpPrefix>().unwrap_err();
        assert_eq!(
            err.to_string(),
            "\"10.0.0.1/24\" has host bits set; the network is 10.0.0.0/24"
        );
    }

    proptest! {
        #[test]
        fn round_trip(prefix in crate::testutil::prefix()) {
            prop_assert_eq!(prefix.to_string().parse::<IpPrefix>().unwrap(), prefix);
            let json = serde_json::to_string(&prefix).unwrap();
            prop_assert_eq!(serde_json::from_str::<IpPrefix>(&json).unwrap(), prefix);
            prop_assert!(prefix.contains(prefix.addr()));
        }

        #[test]
        fn parse_never_panics(s in "\\PC{0,50}") {
            let _ = s.parse::<IpPrefix>();
        }
    }
}
