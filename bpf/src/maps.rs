//! The map key and value layouts of `c/mesh.h`, as `#[repr(C)]` Rust types.
//!
//! Each type encodes to and decodes from the exact bytes the kernel holds, field by field at
//! its `offset_of!`, so no `unsafe` transmute is needed (the workspace forbids `unsafe`).
//! `tests/layout.rs` checks every size and field offset against the BTF of the committed
//! object, so the C header and these types cannot drift apart.
//!
//! Fields named `*address`/`*port`/`*addr` hold network-order values, as the programs see
//! them; the constructors take host types and do the swapping.

use std::mem::offset_of;
use std::net::Ipv4Addr;

/// Traffic into the local pod.
pub const DIR_INGRESS: u8 = 0;
/// Traffic out of the local pod.
pub const DIR_EGRESS: u8 = 1;
/// The policy protocol that matches every protocol.
pub const PROTO_ANY: u8 = 0;
/// The identity of addresses the ipcache does not know.
pub const IDENTITY_WORLD: u32 = 2;

/// A field the layout macro can write and read at an offset.
trait Field: Sized {
    const SIZE: usize;
    fn put(&self, out: &mut [u8]);
    fn take(bytes: &[u8]) -> Self;
}

macro_rules! int_field {
    ($($t:ty),*) => {$(
        impl Field for $t {
            const SIZE: usize = size_of::<$t>();
            fn put(&self, out: &mut [u8]) {
                out[..Self::SIZE].copy_from_slice(&self.to_ne_bytes());
            }
            fn take(bytes: &[u8]) -> Self {
                let mut raw = [0u8; size_of::<$t>()];
                raw.copy_from_slice(&bytes[..Self::SIZE]);
                <$t>::from_ne_bytes(raw)
            }
        }
    )*};
}
int_field!(u8, u16, u32, u64);

impl<const N: usize> Field for [u8; N] {
    const SIZE: usize = N;
    fn put(&self, out: &mut [u8]) {
        out[..N].copy_from_slice(self);
    }
    fn take(bytes: &[u8]) -> Self {
        let mut raw = [0u8; N];
        raw.copy_from_slice(&bytes[..N]);
        raw
    }
}

/// Declares a `#[repr(C)]` mirror of a C struct with `encode`/`decode` of its exact bytes and
/// the list of its fields for the layout test.
macro_rules! layout {
    ($(#[$meta:meta])* $name:ident : $c:literal, $size:literal {
        $($(#[$fmeta:meta])* $field:ident : $ty:ty),* $(,)?
    }) => {
        $(#[$meta])*
        #[repr(C)]
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name {
            $($(#[$fmeta])* pub $field: $ty),*
        }

        const _: () = assert!(size_of::<$name>() == $size);

        impl $name {
            /// The size in bytes.
            pub const SIZE: usize = $size;
            /// The C struct's name in `mesh.h`.
            pub const C_NAME: &'static str = $c;
            /// Every field: (name, offset, size), in declaration order.
            pub const FIELDS: &'static [(&'static str, usize, usize)] =
                &[$((stringify!($field), offset_of!($name, $field), size_of::<$ty>())),*];

            /// The bytes the kernel holds for this value.
            pub fn encode(&self) -> [u8; $size] {
                let mut out = [0u8; $size];
                $(self.$field.put(&mut out[offset_of!($name, $field)..]);)*
                out
            }

            /// The value of the kernel's bytes.
            pub fn decode(bytes: &[u8; $size]) -> Self {
                $name {
                    $($field: <$ty as Field>::take(&bytes[offset_of!($name, $field)..])),*
                }
            }
        }
    };
}

layout! {
    /// A service map key: slot 0 of a frontend holds its backend count, slots 1..=count its
    /// backends.
    Lb4Key: "lb4_key", 12 {
        /// The frontend address (network order).
        address: u32,
        /// The frontend port (network order).
        port: u16,
        /// IPPROTO_TCP or IPPROTO_UDP.
        proto: u8,
        /// Zero.
        pad: u8,
        /// 0 for the frontend's count, 1.. for its backends.
        slot: u16,
        /// Zero.
        pad2: u16,
    }
}

layout! {
    /// A service map value: a backend (slots 1..) or the backend count (slot 0).
    Lb4Slot: "lb4_slot", 8 {
        /// The backend address (network order).
        address: u32,
        /// The backend port (network order).
        port: u16,
        /// Slot 0: the number of backends.
        count: u16,
    }
}

layout! {
    /// What a socket was balanced to (socket cookie → this).
    SockLb4: "sock_lb4", 16 {
        /// The frontend the application dialed.
        frontend_address: u32,
        /// The backend chosen.
        backend_address: u32,
        /// The frontend port.
        frontend_port: u16,
        /// The backend port.
        backend_port: u16,
        /// The backend's slot.
        slot: u16,
        /// The protocol.
        proto: u8,
        /// Zero.
        pad: u8,
    }
}

layout! {
    /// An ipcache (LPM trie) key.
    Ipcache4Key: "ipcache4_key", 8 {
        /// Significant bits of `address`, 0..=32.
        prefixlen: u32,
        /// The prefix (network order).
        address: u32,
    }
}

layout! {
    /// An ipcache value.
    IpcacheValue: "ipcache_value", 12 {
        /// The security identity.
        identity: u32,
        /// The node hosting the address (network order), 0 when unknown.
        node_address: u32,
        /// The cluster that owns the address.
        cluster_id: u16,
        /// Zero.
        pad: u16,
    }
}

layout! {
    /// An allow entry; zero peer identity, port or protocol are wildcards.
    PolicyKey: "policy_key", 12 {
        /// The local endpoint's identity.
        local_identity: u32,
        /// The peer's identity, 0 for any.
        peer_identity: u32,
        /// The destination port (network order), 0 for any.
        port: u16,
        /// The protocol, [`PROTO_ANY`] for any.
        proto: u8,
        /// [`DIR_INGRESS`] or [`DIR_EGRESS`].
        direction: u8,
    }
}

layout! {
    /// An allow entry's value (presence allows).
    PolicyValue: "policy_value", 4 {
        /// Reserved, zero.
        flags: u32,
    }
}

layout! {
    /// A local identity under default-deny in one direction.
    EnforcementKey: "enforcement_key", 8 {
        /// The local identity.
        identity: u32,
        /// [`DIR_INGRESS`] or [`DIR_EGRESS`].
        direction: u8,
        /// Zero.
        pad: [u8; 3],
    }
}

layout! {
    /// A connection-tracking key (per endpoint interface).
    Ct4Key: "ct4_key", 20 {
        /// The endpoint's host-side interface.
        ifindex: u32,
        /// Source address (network order).
        saddr: u32,
        /// Destination address (network order).
        daddr: u32,
        /// Source port (network order).
        sport: u16,
        /// Destination port (network order).
        dport: u16,
        /// The protocol.
        proto: u8,
        /// Zero.
        pad: [u8; 3],
    }
}

layout! {
    /// A connection-tracking value.
    CtValue: "ct_value", 8 {
        /// When the flow was last seen (CLOCK_MONOTONIC ns).
        last_seen_ns: u64,
    }
}

layout! {
    /// Packets and bytes for one (reason, direction), on one CPU.
    MetricsValue: "metrics_value", 16 {
        /// Packets.
        packets: u64,
        /// Bytes.
        bytes: u64,
    }
}

layout! {
    /// One dropped packet, as the policy program reports it.
    DropEventRaw: "drop_event", 40 {
        /// CLOCK_MONOTONIC ns.
        timestamp_ns: u64,
        /// Source address (network order).
        saddr: u32,
        /// Destination address (network order).
        daddr: u32,
        /// The source's identity.
        src_identity: u32,
        /// The destination's identity.
        dst_identity: u32,
        /// The endpoint interface.
        ifindex: u32,
        /// Source port (network order).
        sport: u16,
        /// Destination port (network order).
        dport: u16,
        /// The source's cluster id (0 when unknown).
        src_cluster: u16,
        /// The destination's cluster id (0 when unknown).
        dst_cluster: u16,
        /// The protocol.
        proto: u8,
        /// [`DIR_INGRESS`] or [`DIR_EGRESS`].
        direction: u8,
        /// The reason code.
        reason: u8,
        /// Zero.
        pad: u8,
    }
}

/// An address as the programs hold it (network order in a native `u32`).
pub fn addr(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

/// The address of a network-order `u32`.
pub fn ip(raw: u32) -> Ipv4Addr {
    Ipv4Addr::from(raw.to_ne_bytes())
}

/// A port as the programs hold it.
pub fn port(port: u16) -> u16 {
    port.to_be()
}

/// The port of a network-order `u16`.
pub fn host_port(raw: u16) -> u16 {
    u16::from_be(raw)
}

/// Why a packet was forwarded or dropped (`MESH_FWD_*`, `MESH_DROP_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reason {
    /// The local identity is not under default-deny.
    ForwardUnenforced,
    /// A policy entry allows the new flow.
    ForwardPolicy,
    /// A flow allowed before, same direction.
    ForwardEstablished,
    /// A reply of a flow allowed before.
    ForwardReply,
    /// Default-deny and no policy entry allows it.
    DropPolicy,
}

impl Reason {
    /// Every reason, in code order.
    pub const ALL: [Reason; 5] = [
        Reason::ForwardUnenforced,
        Reason::ForwardPolicy,
        Reason::ForwardEstablished,
        Reason::ForwardReply,
        Reason::DropPolicy,
    ];

    /// The code the programs use.
    pub fn code(self) -> u8 {
        self as u8
    }

    /// The reason of a code.
    pub fn from_code(code: u8) -> Option<Reason> {
        Reason::ALL.get(usize::from(code)).copied()
    }

    /// Whether packets of this reason are dropped.
    pub fn is_drop(self) -> bool {
        matches!(self, Reason::DropPolicy)
    }

    /// A stable name for metrics and the API.
    pub fn name(self) -> &'static str {
        match self {
            Reason::ForwardUnenforced => "forward-unenforced",
            Reason::ForwardPolicy => "forward-policy",
            Reason::ForwardEstablished => "forward-established",
            Reason::ForwardReply => "forward-reply",
            Reason::DropPolicy => "drop-policy-denied",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Encoding and decoding are inverse, and the bytes sit at the C offsets.
        #[test]
        fn encode_decode_round_trip(a in any::<u32>(), p in any::<u16>(), proto in any::<u8>(), slot in any::<u16>()) {
            let key = Lb4Key { address: a, port: p, proto, pad: 0, slot, pad2: 0 };
            let bytes = key.encode();
            prop_assert_eq!(Lb4Key::decode(&bytes), key);
            prop_assert_eq!(&bytes[0..4], &a.to_ne_bytes());
            prop_assert_eq!(&bytes[8..10], &slot.to_ne_bytes());
        }
    }

    #[test]
    fn addresses_and_ports_are_in_network_order() {
        let raw = addr(Ipv4Addr::new(10, 96, 0, 1));
        assert_eq!(raw.to_ne_bytes(), [10, 96, 0, 1]);
        assert_eq!(ip(raw), Ipv4Addr::new(10, 96, 0, 1));
        assert_eq!(port(80).to_ne_bytes(), [0, 80]);
        assert_eq!(host_port(port(8080)), 8080);
    }

    #[test]
    fn reasons_match_their_codes() {
        for (i, r) in Reason::ALL.iter().enumerate() {
            assert_eq!(usize::from(r.code()), i);
            assert_eq!(Reason::from_code(r.code()), Some(*r));
        }
        assert_eq!(Reason::from_code(9), None);
    }
}
