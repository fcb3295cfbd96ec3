/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Map key and value layouts shared by the eBPF programs and the agent. The agent mirrors
 * every struct here as a #[repr(C)] Rust type (bpf/src/maps.rs); a test compares each size
 * and field offset with the BTF of the compiled object, so the two cannot drift apart.
 *
 * Addresses and ports are in network byte order, as the kernel hands them to the programs.
 */
#ifndef MESH_H
#define MESH_H

#include <linux/types.h>

/* Traffic direction, seen from the local pod. */
#define MESH_DIR_INGRESS 0
#define MESH_DIR_EGRESS 1

/* The protocol value that matches every protocol in a policy key. */
#define MESH_PROTO_ANY 0

/* Reserved identities (Cilium's numbering). */
#define MESH_IDENTITY_WORLD 2

/* Why a packet was forwarded or dropped: the index of the metrics map is
 * reason * 2 + direction. */
#define MESH_FWD_UNENFORCED 0  /* the local identity is not under default-deny */
#define MESH_FWD_POLICY 1      /* a policy entry allows the new flow */
#define MESH_FWD_ESTABLISHED 2 /* a flow allowed before, same direction */
#define MESH_FWD_REPLY 3       /* a reply of a flow allowed before */
#define MESH_DROP_POLICY 4     /* default-deny and no policy entry allows it */
#define MESH_REASONS 5

/* Services: slot 0 of a frontend holds the backend count, slots 1..=count the backends. */
struct lb4_key {
	__be32 address;
	__be16 port;
	__u8 proto;
	__u8 pad;
	__u16 slot;
	__u16 pad2;
};

struct lb4_slot {
	__be32 address; /* the backend (slots 1..) */
	__be16 port;    /* the backend's port (slots 1..) */
	__u16 count;    /* the number of backends (slot 0) */
};

/* What a socket was balanced to, by socket cookie: restores the frontend for
 * getpeername/recvmsg and keeps an unconnected UDP socket on its backend. */
struct sock_lb4 {
	__be32 frontend_address;
	__be32 backend_address;
	__be16 frontend_port;
	__be16 backend_port;
	__u16 slot;
	__u8 proto;
	__u8 pad;
};

/* ipcache: LPM trie from an IPv4 prefix to its identity. prefixlen counts the bits of
 * address that match (0..=32). */
struct ipcache4_key {
	__u32 prefixlen;
	__be32 address;
};

struct ipcache_value {
	__u32 identity;
	__be32 node_address; /* the node hosting the address, 0 when unknown */
	__u16 cluster_id;
	__u16 pad;
};

/* An allowed (direction, local identity, peer identity, port, protocol); peer identity 0,
 * port 0 and protocol MESH_PROTO_ANY are wildcards. */
struct policy_key {
	__u32 local_identity;
	__u32 peer_identity;
	__be16 port;
	__u8 proto;
	__u8 direction;
};

struct policy_value {
	__u32 flags; /* reserved; presence allows */
};

/* A local identity under default-deny in one direction. */
struct enforcement_key {
	__u32 identity;
	__u8 direction;
	__u8 pad[3];
};

/* Connection tracking, per endpoint interface: a flow allowed in one direction lets its
 * replies through. */
struct ct4_key {
	__u32 ifindex;
	__be32 saddr;
	__be32 daddr;
	__be16 sport;
	__be16 dport;
	__u8 proto;
	__u8 pad[3];
};

struct ct_value {
	__u64 last_seen_ns;
};

/* Forwarded and dropped packets and bytes, per CPU. */
struct metrics_value {
	__u64 packets;
	__u64 bytes;
};

/* One dropped packet, sent to the agent through the ring buffer. */
struct drop_event {
	__u64 timestamp_ns;
	__be32 saddr;
	__be32 daddr;
	__u32 src_identity;
	__u32 dst_identity;
	__u32 ifindex;
	__be16 sport;
	__be16 dport;
	__u16 src_cluster;
	__u16 dst_cluster;
	__u8 proto;
	__u8 direction;
	__u8 reason;
	__u8 pad;
};

#endif
