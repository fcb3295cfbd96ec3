//! What the reconciled maps hold, as plain data, and the ordered diff between two such states.
//!
//! The agent computes the desired [`MapState`] from its tables; the loader reads the actual
//! one back from the pinned maps. [`diff`] orders its operations so that a program looking
//! up the maps while they are applied one by one never sees a hole:
//!
//! - a frontend's backend slots are written before its count (slot 0), and its count is
//!   lowered before surplus slots are deleted, so every slot `1..=count` always exists;
//! - allow entries are added before an identity is put under default-deny, and default-deny is
//!   lifted before allow entries are removed, so a flow allowed before and after is never
//!   dropped in between;
//! - ipcache entries are added first and removed last.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use crate::maps::{
    EnforcementKey, Ipcache4Key, IpcacheValue, Lb4Key, Lb4Slot, PolicyKey, PolicyValue,
};
use crate::maps::{addr, port};

/// The reconciled maps' contents.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapState {
    /// `mesh_svc4`: frontend slots.
    pub services: BTreeMap<Lb4Key, Lb4Slot>,
    /// `mesh_ipc4`: prefix → identity.
    pub ipcache: BTreeMap<Ipcache4Key, IpcacheValue>,
    /// `mesh_policy`: allow entries.
    pub policy: BTreeMap<PolicyKey, PolicyValue>,
    /// `mesh_enforce`: identities under default-deny.
    pub enforcement: BTreeSet<EnforcementKey>,
}

/// A frontend: address, port and IP protocol number.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Frontend4 {
    /// The VIP.
    pub ip: Ipv4Addr,
    /// The port.
    pub port: u16,
    /// `IPPROTO_TCP` (6) or `IPPROTO_UDP` (17).
    pub proto: u8,
}

impl Frontend4 {
    /// The key of the frontend's slot `slot`.
    pub fn key(&self, slot: u16) -> Lb4Key {
        Lb4Key {
            address: addr(self.ip),
            port: port(self.port),
            proto: self.proto,
            slot,
            ..Lb4Key::default()
        }
    }

    /// The frontend a key belongs to.
    pub fn of(key: &Lb4Key) -> Frontend4 {
        Frontend4 {
            ip: crate::maps::ip(key.address),
            port: crate::maps::host_port(key.port),
            proto: key.proto,
        }
    }
}

/// The largest number of backends one frontend can have (slots are `u16`, slot 0 counts).
pub const MAX_BACKENDS: usize = u16::MAX as usize;

impl MapState {
    /// Sets a frontend's backends (in order; at most [`MAX_BACKENDS`], the rest is cut);
    /// an empty list keeps the frontend with count 0, so connects to it are refused.
    pub fn set_frontend(&mut self, frontend: Frontend4, backends: &[(Ipv4Addr, u16)]) {
        self.remove_frontend(frontend);
        let backends = &backends[..backends.len().min(MAX_BACKENDS)];
        let count = u16::try_from(backends.len()).unwrap_or(u16::MAX);
        self.services.insert(
            frontend.key(0),
            Lb4Slot {
                count,
                ..Lb4Slot::default()
            },
        );
        for (slot, (ip, p)) in (1u16..).zip(backends) {
            self.services.insert(
                frontend.key(slot),
                Lb4Slot {
                    address: addr(*ip),
                    port: port(*p),
                    count: 0,
                },
            );
        }
    }

    /// Removes a frontend and its slots.
    pub fn remove_frontend(&mut self, frontend: Frontend4) {
        let slots: Vec<Lb4Key> = self
            .services
            .range(frontend.key(0)..=frontend.key(u16::MAX))
            .map(|(k, _)| *k)
            .collect();
        for key in slots {
            self.services.remove(&key);
        }
    }

    /// The frontends and their backend counts.
    pub fn frontends(&self) -> impl Iterator<Item = (Frontend4, u16)> + '_ {
        self.services
            .iter()
            .filter(|(k, _)| k.slot == 0)
            .map(|(k, v)| (Frontend4::of(k), v.count))
    }

    /// Applies `ops` in order.
    pub fn apply(&mut self, ops: &[MapOp]) {
        for op in ops {
            self.apply_one(op);
        }
    }

    /// Applies one operation.
    pub fn apply_one(&mut self, op: &MapOp) {
        match op {
            MapOp::PutService(k, v) => drop(self.services.insert(*k, *v)),
            MapOp::DeleteService(k) => drop(self.services.remove(k)),
            MapOp::PutIpcache(k, v) => drop(self.ipcache.insert(*k, *v)),
            MapOp::DeleteIpcache(k) => drop(self.ipcache.remove(k)),
            MapOp::PutPolicy(k, v) => drop(self.policy.insert(*k, *v)),
            MapOp::DeletePolicy(k) => drop(self.policy.remove(k)),
            MapOp::PutEnforcement(k) => drop(self.enforcement.insert(*k)),
            MapOp::DeleteEnforcement(k) => drop(self.enforcement.remove(k)),
        }
    }
}

/// One write to one map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapOp {
    /// Write a service slot.
    PutService(Lb4Key, Lb4Slot),
    /// Delete a service slot.
    DeleteService(Lb4Key),
    /// Write an ipcache entry.
    PutIpcache(Ipcache4Key, IpcacheValue),
    /// Delete an ipcache entry.
    DeleteIpcache(Ipcache4Key),
    /// Write an allow entry.
    PutPolicy(PolicyKey, PolicyValue),
    /// Delete an allow entry.
    DeletePolicy(PolicyKey),
    /// Put an identity under default-deny.
    PutEnforcement(EnforcementKey),
    /// Lift default-deny.
    DeleteEnforcement(EnforcementKey),
}

/// The operations that turn `actual` into `desired`, in an order that never leaves a hole
/// (see the module docs). Empty when they are equal.
pub fn diff(desired: &MapState, actual: &MapState) -> Vec<MapOp> {
    let mut ops = Vec::new();
    let (ipc_put, ipc_del) = diff_map(&desired.ipcache, &actual.ipcache);
    let (pol_put, pol_del) = diff_map(&desired.policy, &actual.policy);
    let (svc_put, svc_del) = diff_map(&desired.services, &actual.services);
    ops.extend(ipc_put.into_iter().map(|(k, v)| MapOp::PutIpcache(k, v)));
    ops.extend(pol_put.into_iter().map(|(k, v)| MapOp::PutPolicy(k, v)));
    ops.extend(
        desired
            .enforcement
            .difference(&actual.enforcement)
            .map(|k| MapOp::PutEnforcement(*k)),
    );
    // Backend slots before counts.
    let (counts, slots): (Vec<_>, Vec<_>) = svc_put.into_iter().partition(|(k, _)| k.slot == 0);
    ops.extend(slots.into_iter().map(|(k, v)| MapOp::PutService(k, v)));
    ops.extend(counts.into_iter().map(|(k, v)| MapOp::PutService(k, v)));
    // Key order puts a frontend's count (slot 0) before its slots: a removed frontend
    // disappears before its backends do.
    ops.extend(svc_del.into_iter().map(MapOp::DeleteService));
    ops.extend(
        actual
            .enforcement
            .difference(&desired.enforcement)
            .map(|k| MapOp::DeleteEnforcement(*k)),
    );
    ops.extend(pol_del.into_iter().map(MapOp::DeletePolicy));
    ops.extend(ipc_del.into_iter().map(MapOp::DeleteIpcache));
    ops
}

type Puts<K, V> = Vec<(K, V)>;

/// One ordered merge-join: (entries to write, keys to delete).
fn diff_map<K: Ord + Copy, V: PartialEq + Copy>(
    desired: &BTreeMap<K, V>,
    actual: &BTreeMap<K, V>,
) -> (Puts<K, V>, Vec<K>) {
    let mut puts = Vec::new();
    let mut deletes = Vec::new();
    let mut want = desired.iter().peekable();
    let mut have = actual.iter().peekable();
    loop {
        match (want.peek(), have.peek()) {
            (None, None) => break,
            (Some((k, v)), None) => {
                puts.push((**k, **v));
                want.next();
            }
            (None, Some((k, _))) => {
                deletes.push(**k);
                have.next();
            }
            (Some((wk, wv)), Some((hk, hv))) => match wk.cmp(hk) {
                std::cmp::Ordering::Less => {
                    puts.push((**wk, **wv));
                    want.next();
                }
                std::cmp::Ordering::Greater => {
                    deletes.push(**hk);
                    have.next();
                }
                std::cmp::Ordering::Equal => {
                    if wv != hv {
                        puts.push((**wk, **wv));
                    }
                    want.next();
                    have.next();
                }
            },
        }
    }
    (puts, deletes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::maps::{DIR_EGRESS, DIR_INGRESS, PROTO_ANY};
    use proptest::collection::{btree_map, btree_set, vec};
    use proptest::prelude::*;

    fn frontend(i: u8) -> Frontend4 {
        Frontend4 {
            ip: Ipv4Addr::new(10, 96, 0, i),
            port: 80,
            proto: 6,
        }
    }

    fn policy_key(local: u32, peer: u32, p: u16, dir: bool) -> PolicyKey {
        PolicyKey {
            local_identity: local,
            peer_identity: peer,
            port: port(p),
            proto: if p == 0 { PROTO_ANY } else { 6 },
            direction: if dir { DIR_EGRESS } else { DIR_INGRESS },
        }
    }

    fn state() -> impl Strategy<Value = MapState> {
        (
            btree_map(0u8..5, vec((1u8..6, 1u16..3), 0..5), 0..4),
            btree_map((0u32..33, 0u8..4), 256u32..260, 0..5),
            btree_set((256u32..259, 0u32..3, 0u16..2, any::<bool>()), 0..8),
            btree_set((256u32..259, any::<bool>()), 0..4),
        )
            .prop_map(|(svcs, ipc, pol, enf)| {
                let mut s = MapState::default();
                for (f, backends) in svcs {
                    let backends: Vec<_> = backends
                        .into_iter()
                        .map(|(b, p)| (Ipv4Addr::new(10, 0, 0, b), 8000 + p))
                        .collect();
                    s.set_frontend(frontend(f), &backends);
                }
                for ((len, a), id) in ipc {
                    s.ipcache.insert(
                        Ipcache4Key {
                            prefixlen: len,
                            address: addr(Ipv4Addr::new(10, a, 0, 0)),
                        },
                        IpcacheValue {
                            identity: id,
                            ..IpcacheValue::default()
                        },
                    );
                }
                for (local, peer, p, dir) in pol {
                    s.policy
                        .insert(policy_key(local, peer, p, dir), PolicyValue::default());
                }
                for (id, dir) in enf {
                    s.enforcement.insert(EnforcementKey {
                        identity: id,
                        direction: if dir { DIR_EGRESS } else { DIR_INGRESS },
                        pad: [0; 3],
                    });
                }
                s
            })
    }

    /// Every frontend with a count has every slot up to it.
    fn no_holes(s: &MapState) -> Result<(), String> {
        for (f, count) in s.frontends() {
            for slot in 1..=count {
                if !s.services.contains_key(&f.key(slot)) {
                    return Err(format!("{f:?} counts {count} but slot {slot} is missing"));
                }
            }
        }
        Ok(())
    }

    /// Whether the policy maps let a flow through (the program's lookup, without CT).
    fn allows(s: &MapState, local: u32, peer: u32, p: u16, dir: bool) -> bool {
        let direction = if dir { DIR_EGRESS } else { DIR_INGRESS };
        let enforced = s.enforcement.contains(&EnforcementKey {
            identity: local,
            direction,
            pad: [0; 3],
        });
        if !enforced {
            return true;
        }
        [peer, 0].iter().any(|peer| {
            [p, 0].iter().any(|p| {
                [6, PROTO_ANY].iter().any(|proto| {
                    s.policy.contains_key(&PolicyKey {
                        local_identity: local,
                        peer_identity: *peer,
                        port: port(*p),
                        proto: *proto,
                        direction,
                    })
                })
            })
        })
    }

    proptest! {
        /// The diff turns actual into desired, minimally.
        #[test]
        fn diff_then_apply_yields_desired(desired in state(), actual in state()) {
            let ops = diff(&desired, &actual);
            let mut s = actual.clone();
            s.apply(&ops);
            prop_assert_eq!(&s, &desired);
            prop_assert!(diff(&desired, &desired).is_empty());
        }

        /// Applied one operation at a time, no intermediate state has a frontend missing a
        /// slot, drops a frontend both states have, or denies a flow both states allow.
        #[test]
        fn no_intermediate_state_has_a_hole(desired in state(), actual in state()) {
            let ops = diff(&desired, &actual);
            let both: Vec<Frontend4> = actual
                .frontends()
                .filter(|(f, _)| desired.services.contains_key(&f.key(0)))
                .map(|(f, _)| f)
                .collect();
            let mut s = actual.clone();
            prop_assert!(no_holes(&s).is_ok());
            for op in &ops {
                s.apply_one(op);
                if let Err(e) = no_holes(&s) {
                    return Err(TestCaseError::fail(format!("after {op:?}: {e}")));
                }
                for f in &both {
                    prop_assert!(s.services.contains_key(&f.key(0)), "{:?} vanished after {:?}", f, op);
                }
                for local in 256..259 {
                    for peer in 0..3 {
                        for p in 0..2 {
                            for dir in [false, true] {
                                if allows(&actual, local, peer, p, dir) && allows(&desired, local, peer, p, dir) {
                                    prop_assert!(allows(&s, local, peer, p, dir), "flow {local}->{peer}:{p} dropped after {op:?}");
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn an_empty_frontend_keeps_its_count_of_zero() {
        let mut s = MapState::default();
        s.set_frontend(frontend(1), &[]);
        assert_eq!(s.frontends().collect::<Vec<_>>(), vec![(frontend(1), 0)]);
        s.set_frontend(frontend(1), &[(Ipv4Addr::new(10, 0, 0, 1), 80)]);
        assert_eq!(s.services.len(), 2);
        s.remove_frontend(frontend(1));
        assert!(s.services.is_empty());
    }
}
