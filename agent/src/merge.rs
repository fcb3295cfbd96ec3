//! Global services: the per-cluster parts of one service merged into the backend list of each
//! of its frontends. Pure.
//!
//! - Frontends come from the local cluster's Service only: clients reach a service through
//!   the local cluster IP, so a service the local cluster does not run is not programmed.
//! - The local cluster's own backends are always eligible. A remote cluster's backends are
//!   eligible only when the service is global here and the remote part is shared
//!   (`service.cilium.io/shared: "false"` keeps a cluster's backends out of the others). A
//!   non-global service never receives remote backends.
//! - Each part is one cluster's, and replaces only that cluster's backends: the merge is a
//!   function of the set of parts, whatever their order.
//! - Backends are ranked, and only the best non-empty rank is used:
//!   1. ready backends of healthy clusters ([`BackendState::Active`]),
//!   2. terminating-but-serving backends of healthy clusters ([`BackendState::Terminating`]),
//!   3. backends of clusters lost for longer than the grace period ([`BackendState::Stale`]),
//!      ready before serving.
//!
//!   Within a rank, affinity `local` prefers local backends and falls back to remote ones
//!   only when no local backend is in that rank; `remote` is the mirror image; `none` (or no
//!   annotation) uses all of them alike.

use std::collections::BTreeMap;
use std::net::IpAddr;

use model::{Backend, ClusterName, ClusterService, PortMap};

use crate::tables::{
    AffinityMode, BackendState, Frontend, ServiceBackend, ServiceEntry, ServiceName,
};

pub use agent_api::ClusterHealth;

/// One cluster's part of a service.
#[derive(Clone, Copy, Debug)]
pub struct ClusterPart<'a> {
    /// The cluster.
    pub cluster: &'a ClusterName,
    /// Whether it is the local cluster.
    pub local: bool,
    /// The cluster's health (the local cluster is always healthy).
    pub health: ClusterHealth,
    /// What the cluster publishes (or, for the local cluster, holds) about the service.
    pub service: &'a ClusterService,
}

/// A service to merge: the local cluster's view of it and every cluster's part.
#[derive(Clone, Debug)]
pub struct ServiceInput<'a> {
    /// The service.
    pub name: &'a ServiceName,
    /// The local cluster's frontends (cluster IPs) and their ports.
    pub frontends: &'a BTreeMap<IpAddr, PortMap>,
    /// Whether the service is global in the local cluster.
    pub global: bool,
    /// The local cluster's affinity for the service.
    pub affinity: AffinityMode,
    /// Every cluster's part, the local one included, in any order.
    pub parts: &'a [ClusterPart<'a>],
}

/// A backend's rank: lower is better. Ready and healthy first, then terminating and
/// healthy, then whatever a stale cluster offers.
fn quality(part: &ClusterPart, backend: &Backend) -> Option<(u8, BackendState)> {
    let healthy = part.local || part.health == ClusterHealth::Healthy;
    let ready = backend.ready && !backend.terminating;
    match (healthy, ready, backend.serving) {
        (true, true, _) => Some((0, BackendState::Active)),
        (true, false, true) => Some((1, BackendState::Terminating)),
        (false, true, _) => Some((2, BackendState::Stale)),
        (false, false, true) => Some((3, BackendState::Stale)),
        (_, false, false) => None,
    }
}

/// Whether `part`'s backends may be used by the local cluster for a service that is (or is
/// not) global here.
pub fn eligible(part: &ClusterPart, global: bool) -> bool {
    part.local || (global && part.service.shared)
}

/// Whether `part` is preferred under `affinity`.
fn preferred(part: &ClusterPart, affinity: AffinityMode) -> bool {
    match affinity {
        AffinityMode::None => true,
        AffinityMode::Local => part.local,
        AffinityMode::Remote => !part.local,
    }
}

/// The backends of one frontend port (by the service port's name and protocol).
pub fn select_backends(
    port_name: &str,
    protocol: model::Protocol,
    global: bool,
    affinity: AffinityMode,
    parts: &[ClusterPart],
) -> Vec<ServiceBackend> {
    // (rank, not preferred) → candidates; the first key present wins.
    let mut tiers: BTreeMap<(u8, bool), Vec<(bool, ServiceBackend)>> = BTreeMap::new();
    for part in parts.iter().filter(|p| eligible(p, global)) {
        let prefer = preferred(part, affinity);
        for (ip, backend) in &part.service.backends {
            let Some(port) = backend
                .ports
                .get(port_name)
                .filter(|p| p.protocol == protocol)
            else {
                continue;
            };
            let Some((rank, state)) = quality(part, backend) else {
                continue;
            };
            tiers.entry((rank, !prefer)).or_default().push((
                part.local,
                ServiceBackend {
                    ip: *ip,
                    port: port.port,
                    cluster: part.cluster.clone(),
                    state,
                },
            ));
        }
    }
    let Some((_, mut chosen)) = tiers.into_iter().next() else {
        return Vec::new();
    };
    // Local first, then by cluster, address and port.
    chosen.sort_by(|(la, a), (lb, b)| {
        (!la, &a.cluster, a.ip, a.port).cmp(&(!lb, &b.cluster, b.ip, b.port))
    });
    chosen.dedup_by(|(_, a), (_, b)| a.cluster == b.cluster && a.ip == b.ip && a.port == b.port);
    chosen.into_iter().map(|(_, b)| b).collect()
}

/// One entry per frontend (cluster IP × service port) of the service.
pub fn merge_service(input: &ServiceInput) -> Vec<ServiceEntry> {
    let mut entries = Vec::new();
    for (ip, ports) in input.frontends {
        for (port_name, port) in ports {
            entries.push(ServiceEntry {
                frontend: Frontend {
                    ip: *ip,
                    port: port.port,
                    protocol: port.protocol,
                },
                service: input.name.clone(),
                port_name: port_name.clone(),
                global: input.global,
                affinity: if input.global {
                    input.affinity
                } else {
                    AffinityMode::None
                },
                backends: select_backends(
                    port_name,
                    port.protocol,
                    input.global,
                    input.affinity,
                    input.parts,
                ),
            });
        }
    }
    entries
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use model::{ClusterId, DnsLabel, L4Port, Protocol, SchemaVersion};
    use proptest::collection::{btree_map, vec};
    use proptest::prelude::*;
    use std::collections::BTreeSet;
    use std::net::Ipv4Addr;

    pub(crate) fn name() -> ServiceName {
        ServiceName {
            namespace: DnsLabel::new("shop").unwrap(),
            name: DnsLabel::new("web").unwrap(),
        }
    }

    pub(crate) fn http() -> PortMap {
        PortMap::from([(
            "http".to_owned(),
            L4Port {
                protocol: Protocol::Tcp,
                port: 8080,
            },
        )])
    }

    pub(crate) fn backend(ready: bool, serving: bool, terminating: bool) -> Backend {
        Backend {
            ports: http(),
            ready,
            serving,
            terminating,
            zone: None,
            node_name: None,
            hostname: None,
        }
    }

    pub(crate) fn service(
        cluster: &ClusterName,
        id: u16,
        shared: bool,
        backends: BTreeMap<IpAddr, Backend>,
    ) -> ClusterService {
        ClusterService {
            schema: SchemaVersion,
            cluster: cluster.clone(),
            cluster_id: ClusterId::try_from(id).unwrap(),
            namespace: DnsLabel::new("shop").unwrap(),
            name: DnsLabel::new("web").unwrap(),
            frontends: BTreeMap::from([(
                IpAddr::V4(Ipv4Addr::new(10, 96, 0, id as u8)),
                PortMap::from([(
                    "http".to_owned(),
                    L4Port {
                        protocol: Protocol::Tcp,
                        port: 80,
                    },
                )]),
            )]),
            backends,
            shared,
            include_external: true,
            labels: BTreeMap::new(),
            selector: BTreeMap::new(),
        }
    }

    /// A generated cluster: (shared, stale, backends by last octet → (ready, serving,
    /// terminating)).
    #[derive(Clone, Debug)]
    struct Gen {
        shared: bool,
        stale: bool,
        backends: BTreeMap<u8, (bool, bool, bool)>,
    }

    fn gen_cluster() -> impl Strategy<Value = Gen> {
        (
            any::<bool>(),
            any::<bool>(),
            btree_map(0u8..6, (any::<bool>(), any::<bool>(), any::<bool>()), 0..4),
        )
            .prop_map(|(shared, stale, backends)| Gen {
                shared,
                stale,
                backends,
            })
    }

    fn affinity() -> impl Strategy<Value = AffinityMode> {
        prop_oneof![
            Just(AffinityMode::None),
            Just(AffinityMode::Local),
            Just(AffinityMode::Remote)
        ]
    }

    fn names(n: usize) -> Vec<ClusterName> {
        (0..n)
            .map(|i| ClusterName::new(format!("c{i}")).unwrap())
            .collect()
    }

    /// Cluster i's backends are 10.<i>.0.<octet>; cluster 0 is local.
    fn services(names: &[ClusterName], gens: &[Gen]) -> Vec<ClusterService> {
        gens.iter()
            .enumerate()
            .map(|(i, g)| {
                let backends = g
                    .backends
                    .iter()
                    .map(|(o, (r, s, t))| {
                        (
                            IpAddr::V4(Ipv4Addr::new(10, i as u8, 0, *o)),
                            backend(*r, *s, *t),
                        )
                    })
                    .collect();
                service(&names[i], i as u16 + 1, g.shared, backends)
            })
            .collect()
    }

    fn parts<'a>(
        names: &'a [ClusterName],
        gens: &[Gen],
        services: &'a [ClusterService],
    ) -> Vec<ClusterPart<'a>> {
        gens.iter()
            .enumerate()
            .map(|(i, g)| ClusterPart {
                cluster: &names[i],
                local: i == 0,
                health: if g.stale && i != 0 {
                    ClusterHealth::Stale
                } else {
                    ClusterHealth::Healthy
                },
                service: &services[i],
            })
            .collect()
    }

    fn select(global: bool, affinity: AffinityMode, parts: &[ClusterPart]) -> Vec<ServiceBackend> {
        select_backends("http", Protocol::Tcp, global, affinity, parts)
    }

    fn active(part: &ClusterPart) -> impl Iterator<Item = IpAddr> {
        let healthy = part.local || part.health == ClusterHealth::Healthy;
        part.service
            .backends
            .iter()
            .filter(move |(_, b)| healthy && b.ready && !b.terminating)
            .map(|(ip, _)| *ip)
    }

    fn ips(backends: &[ServiceBackend]) -> BTreeSet<IpAddr> {
        backends.iter().map(|b| b.ip).collect()
    }

    proptest! {
        /// Only eligible clusters contribute: the local one, and remote ones only when the
        /// service is global and they share their backends.
        #[test]
        fn only_eligible_backends(
            gens in vec(gen_cluster(), 1..5),
            global in any::<bool>(),
            affinity in affinity(),
        ) {
            let names = names(gens.len());
            let services = services(&names, &gens);
            let parts = parts(&names, &gens, &services);
            let chosen = select(global, affinity, &parts);
            for b in &chosen {
                let part = parts.iter().find(|p| *p.cluster == b.cluster).unwrap();
                prop_assert!(part.local || (global && part.service.shared), "{:?}", b);
                prop_assert!(part.service.backends.contains_key(&b.ip));
            }
            if !global {
                prop_assert!(chosen.iter().all(|b| b.cluster == names[0]));
            }
        }

        /// `local` uses local backends while any is active; else healthy remote ones.
        /// `remote` is the mirror image. `none` uses every active backend alike.
        #[test]
        fn affinity_rules(gens in vec(gen_cluster(), 1..5), affinity in affinity()) {
            let names = names(gens.len());
            let services = services(&names, &gens);
            let parts = parts(&names, &gens, &services);
            let chosen = ips(&select(true, affinity, &parts));
            let usable: Vec<&ClusterPart> = parts.iter().filter(|p| eligible(p, true)).collect();
            let local_active: BTreeSet<IpAddr> =
                usable.iter().filter(|p| p.local).flat_map(|p| active(p)).collect();
            let remote_active: BTreeSet<IpAddr> =
                usable.iter().filter(|p| !p.local).flat_map(|p| active(p)).collect();
            let all_active: BTreeSet<IpAddr> = local_active.union(&remote_active).copied().collect();
            match affinity {
                AffinityMode::Local if !local_active.is_empty() => {
                    prop_assert_eq!(chosen, local_active)
                }
                AffinityMode::Remote if !remote_active.is_empty() => {
                    prop_assert_eq!(chosen, remote_active)
                }
                _ if !all_active.is_empty() => prop_assert_eq!(chosen, all_active),
                // No active backend anywhere: whatever is chosen is not active.
                _ => prop_assert!(select(true, affinity, &parts)
                    .iter()
                    .all(|b| b.state != BackendState::Active)),
            }
        }

        /// `none` behaves exactly like... itself everywhere: the same result whatever the
        /// order of the parts, and a stale cluster's backends appear only when nothing
        /// healthier is eligible.
        #[test]
        fn stale_only_as_last_resort(
            gens in vec(gen_cluster(), 1..5),
            affinity in affinity(),
            global in any::<bool>(),
        ) {
            let names = names(gens.len());
            let services = services(&names, &gens);
            let parts = parts(&names, &gens, &services);
            let chosen = select(global, affinity, &parts);
            let healthy_usable = parts.iter().filter(|p| eligible(p, global)).any(|p| {
                (p.local || p.health == ClusterHealth::Healthy)
                    && p.service.backends.values().any(|b| (b.ready && !b.terminating) || b.serving)
            });
            if healthy_usable {
                prop_assert!(chosen.iter().all(|b| b.state != BackendState::Stale), "{:?}", chosen);
            }
            // All chosen backends share one state.
            prop_assert!(chosen.windows(2).all(|w| w[0].state == w[1].state));
            let mut reversed = parts.clone();
            reversed.reverse();
            prop_assert_eq!(select(global, affinity, &reversed), chosen);
        }

        /// A cluster's update replaces only that cluster's backends: with every backend
        /// active and every cluster healthy and shared, each cluster's share of the result is
        /// exactly its own backends.
        #[test]
        fn per_cluster_replacement(
            gens in vec(gen_cluster(), 2..5),
            which in 0usize..4,
            replacement in btree_map(0u8..6, Just((true, true, false)), 0..4),
        ) {
            let mut gens: Vec<Gen> = gens
                .into_iter()
                .map(|g| Gen {
                    shared: true,
                    stale: false,
                    backends: g.backends.into_keys().map(|k| (k, (true, true, false))).collect(),
                })
                .collect();
            let names = names(gens.len());
            let before_services = services(&names, &gens);
            let before = select(true, AffinityMode::None, &parts(&names, &gens, &before_services));
            let which = which % gens.len();
            gens[which].backends = replacement;
            let after_services = services(&names, &gens);
            let after = select(true, AffinityMode::None, &parts(&names, &gens, &after_services));
            for (i, name) in names.iter().enumerate() {
                let of = |list: &[ServiceBackend]| -> Vec<ServiceBackend> {
                    list.iter().filter(|b| &b.cluster == name).cloned().collect()
                };
                let expected: BTreeSet<IpAddr> =
                    after_services[i].backends.keys().copied().collect();
                prop_assert_eq!(ips(&of(&after)), expected);
                if i != which {
                    prop_assert_eq!(of(&after), of(&before));
                }
            }
        }
    }

    #[test]
    fn ordering_local_first_then_cluster_then_ip() {
        let names = names(3);
        let ip = |c: u8, o: u8| IpAddr::V4(Ipv4Addr::new(10, c, 0, o));
        let svc = |i: usize, octets: &[u8]| {
            service(
                &names[i],
                i as u16 + 1,
                true,
                octets
                    .iter()
                    .map(|o| (ip(i as u8, *o), backend(true, true, false)))
                    .collect(),
            )
        };
        let services = [svc(0, &[9, 1]), svc(1, &[5]), svc(2, &[2, 3])];
        let parts: Vec<ClusterPart> = [2usize, 0, 1]
            .iter()
            .map(|&i| ClusterPart {
                cluster: &names[i],
                local: i == 0,
                health: ClusterHealth::Healthy,
                service: &services[i],
            })
            .collect();
        let got: Vec<(String, IpAddr)> = select(true, AffinityMode::None, &parts)
            .into_iter()
            .map(|b| (b.cluster.to_string(), b.ip))
            .collect();
        assert_eq!(
            got,
            vec![
                ("c0".into(), ip(0, 1)),
                ("c0".into(), ip(0, 9)),
                ("c1".into(), ip(1, 5)),
                ("c2".into(), ip(2, 2)),
                ("c2".into(), ip(2, 3)),
            ]
        );
    }

    #[test]
    fn port_names_and_protocols_must_match() {
        let names = names(1);
        let mut b = backend(true, true, false);
        b.ports.insert(
            "dns".into(),
            L4Port {
                protocol: Protocol::Udp,
                port: 53,
            },
        );
        let svc = service(
            &names[0],
            1,
            true,
            BTreeMap::from([("10.0.0.1".parse().unwrap(), b)]),
        );
        let parts = [ClusterPart {
            cluster: &names[0],
            local: true,
            health: ClusterHealth::Healthy,
            service: &svc,
        }];
        assert_eq!(
            select_backends("dns", Protocol::Udp, false, AffinityMode::None, &parts)[0].port,
            53
        );
        assert!(
            select_backends("dns", Protocol::Tcp, false, AffinityMode::None, &parts).is_empty()
        );
        assert!(
            select_backends("grpc", Protocol::Tcp, false, AffinityMode::None, &parts).is_empty()
        );
    }

    #[test]
    fn merge_service_one_entry_per_frontend_port() {
        let names = names(2);
        let local = service(
            &names[0],
            1,
            true,
            BTreeMap::from([("10.0.0.1".parse().unwrap(), backend(true, true, false))]),
        );
        let remote = service(
            &names[1],
            2,
            true,
            BTreeMap::from([("10.1.0.1".parse().unwrap(), backend(true, true, false))]),
        );
        let parts = [
            ClusterPart {
                cluster: &names[0],
                local: true,
                health: ClusterHealth::Healthy,
                service: &local,
            },
            ClusterPart {
                cluster: &names[1],
                local: false,
                health: ClusterHealth::Healthy,
                service: &remote,
            },
        ];
        let name = name();
        let entries = merge_service(&ServiceInput {
            name: &name,
            frontends: &local.frontends,
            global: false,
            affinity: AffinityMode::Local,
            parts: &parts,
        });
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].frontend.to_string(), "10.96.0.1:80/TCP");
        assert_eq!(
            entries[0].affinity,
            AffinityMode::None,
            "not global: no affinity"
        );
        assert_eq!(
            entries[0].backends.len(),
            1,
            "not global: local backends only"
        );
    }
}
