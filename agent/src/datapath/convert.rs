//! The agent's tables as the datapath's map contents: pure, incremental, and the same result
//! whether built from scratch or change by change (see the property test).

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};

use bpf::maps::{
    DIR_EGRESS, DIR_INGRESS, EnforcementKey, Ipcache4Key, IpcacheValue, PROTO_ANY, PolicyKey,
    PolicyValue, addr, port,
};
use bpf::{Frontend4, MapState};
use cluster_source::L4Protocol;
use model::{IpPrefix, MaxConnectedClusters, Protocol};

use crate::tables::{
    Change, Direction, EnforcementEntry, Frontend, IpcacheEntry, PolicyEntry, RouteEntry,
    ServiceEntry, Tables,
};

/// IPv4 routes the datapath programs: pod CIDR → next hop.
pub type Routes = BTreeMap<(Ipv4Addr, u8), Ipv4Addr>;

/// What the datapath should hold, kept up to date change by change.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Desired {
    /// The reconciled maps.
    pub maps: MapState,
    /// The routes.
    pub routes: Routes,
    /// Entries the IPv4 datapath cannot hold (IPv6 addresses, SCTP frontends), by table.
    pub skipped: BTreeMap<&'static str, u64>,
}

impl Desired {
    /// Everything in `tables`.
    pub fn from_tables(tables: &Tables, max: MaxConnectedClusters) -> Desired {
        let mut desired = Desired::default();
        for e in tables.services.values() {
            desired.upsert_service(e);
        }
        for e in tables.ipcache.values() {
            desired.upsert_ipcache(e, max);
        }
        for e in tables.policy.values() {
            desired.upsert_policy(e);
        }
        for e in tables.enforcement.values() {
            desired.upsert_enforcement(e);
        }
        for e in tables.routes.values() {
            desired.upsert_route(e);
        }
        desired
    }

    /// Applies one change of the tables.
    pub fn apply(&mut self, change: &Change, max: MaxConnectedClusters) {
        match change {
            Change::UpsertService(e) => self.upsert_service(e),
            Change::DeleteService(f) => {
                if let Some(f) = frontend4(f) {
                    self.maps.remove_frontend(f);
                }
            }
            Change::UpsertIpcache(e) => self.upsert_ipcache(e, max),
            Change::DeleteIpcache(p) => {
                if let Some(k) = ipcache_key(p) {
                    self.maps.ipcache.remove(&k);
                }
            }
            Change::UpsertPolicy(e) => self.upsert_policy(e),
            Change::DeletePolicy(k) => {
                self.maps.policy.remove(&policy_key(k));
            }
            Change::UpsertEnforcement(e) => self.upsert_enforcement(e),
            Change::DeleteEnforcement(e) => {
                self.maps.enforcement.remove(&enforcement_key(e));
            }
            Change::UpsertRoute(e) => self.upsert_route(e),
            Change::DeleteRoute(p) => {
                if let IpAddr::V4(a) = p.addr() {
                    self.routes.remove(&(a, p.prefix_len()));
                }
            }
        }
    }

    fn skip(&mut self, table: &'static str) {
        *self.skipped.entry(table).or_default() += 1;
    }

    fn upsert_service(&mut self, e: &ServiceEntry) {
        let Some(f) = frontend4(&e.frontend) else {
            self.skip("services");
            return;
        };
        let backends: Vec<(Ipv4Addr, u16)> = e
            .backends
            .iter()
            .filter_map(|b| match b.ip {
                IpAddr::V4(ip) => Some((ip, b.port)),
                IpAddr::V6(_) => None,
            })
            .collect();
        self.maps.set_frontend(f, &backends);
    }

    fn upsert_ipcache(&mut self, e: &IpcacheEntry, max: MaxConnectedClusters) {
        let Some(key) = ipcache_key(&e.prefix) else {
            self.skip("ipcache");
            return;
        };
        let node_address = match e.host_ip {
            Some(IpAddr::V4(ip)) => addr(ip),
            _ => 0,
        };
        let cluster_id = e.identity.cluster(max).map_or(0, |c| c.get());
        self.maps.ipcache.insert(
            key,
            IpcacheValue {
                identity: e.identity.get(),
                node_address,
                cluster_id,
                pad: 0,
            },
        );
    }

    fn upsert_policy(&mut self, e: &PolicyEntry) {
        self.maps
            .policy
            .insert(policy_key(&e.key), PolicyValue::default());
    }

    fn upsert_enforcement(&mut self, e: &EnforcementEntry) {
        self.maps.enforcement.insert(enforcement_key(e));
    }

    fn upsert_route(&mut self, e: &RouteEntry) {
        match (e.prefix.addr(), e.via) {
            (IpAddr::V4(a), Some(IpAddr::V4(via))) => {
                self.routes.insert((a, e.prefix.prefix_len()), via);
            }
            _ => self.skip("routes"),
        }
    }
}

/// The IPv4 frontend of a table frontend; `None` for IPv6 and SCTP.
pub fn frontend4(f: &Frontend) -> Option<Frontend4> {
    let IpAddr::V4(ip) = f.ip else { return None };
    let proto = match f.protocol {
        Protocol::Tcp => 6,
        Protocol::Udp => 17,
        Protocol::Sctp => return None,
    };
    Some(Frontend4 {
        ip,
        port: f.port,
        proto,
    })
}

fn ipcache_key(prefix: &IpPrefix) -> Option<Ipcache4Key> {
    match prefix.addr() {
        IpAddr::V4(a) => Some(Ipcache4Key {
            prefixlen: u32::from(prefix.prefix_len()),
            address: addr(a),
        }),
        IpAddr::V6(_) => None,
    }
}

fn direction(d: Direction) -> u8 {
    match d {
        Direction::Ingress => DIR_INGRESS,
        Direction::Egress => DIR_EGRESS,
    }
}

fn policy_key(k: &crate::tables::PolicyKey) -> PolicyKey {
    PolicyKey {
        local_identity: k.local_identity.get(),
        peer_identity: k.peer_identity.get(),
        port: port(k.port),
        proto: match k.protocol {
            L4Protocol::Tcp => 6,
            L4Protocol::Udp => 17,
            L4Protocol::Sctp => 132,
            L4Protocol::Any => PROTO_ANY,
        },
        direction: direction(k.direction),
    }
}

fn enforcement_key(e: &EnforcementEntry) -> EnforcementKey {
    EnforcementKey {
        identity: e.local_identity.get(),
        direction: direction(e.direction),
        pad: [0; 3],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tables::diff;
    use agent_api::tables::strategies::tables;
    use proptest::prelude::*;

    proptest! {
        /// Change by change gives what a build from scratch gives.
        #[test]
        fn incremental_equals_from_scratch(before in tables(), after in tables()) {
            let max = MaxConnectedClusters::default();
            let mut desired = Desired::from_tables(&before, max);
            for change in diff(&after, &before) {
                desired.apply(&change, max);
            }
            let scratch = Desired::from_tables(&after, max);
            prop_assert_eq!(desired.maps, scratch.maps);
            prop_assert_eq!(desired.routes, scratch.routes);
        }
    }

    #[test]
    fn sctp_and_ipv6_frontends_are_not_programmed() {
        let sctp = Frontend {
            ip: "10.96.0.1".parse().unwrap(),
            port: 80,
            protocol: Protocol::Sctp,
        };
        assert_eq!(frontend4(&sctp), None);
        let v6 = Frontend {
            ip: "fd00::1".parse().unwrap(),
            port: 80,
            protocol: Protocol::Tcp,
        };
        assert_eq!(frontend4(&v6), None);
    }
}
