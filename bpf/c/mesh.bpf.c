// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * The mesh datapath: a socket-level load balancer on a cgroup v2 (connect4, sendmsg4,
 * recvmsg4, getpeername4) and an identity-based policy program on each pod's host-side
 * interface. Maps are pinned by name, so they outlive the agent; their sizes are set by the
 * agent at load time (the numbers below are defaults).
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "mesh.h"

#define ECONNREFUSED 111
#define CT_LIFETIME_TCP_NS (6ULL * 3600 * 1000000000ULL)
#define CT_LIFETIME_OTHER_NS (60ULL * 1000000000ULL)
#define CT_REFRESH_NS 1000000000ULL

char LICENSE[] SEC("license") = "Dual BSD/GPL";

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, struct lb4_key);
	__type(value, struct lb4_slot);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} mesh_svc4 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, __u64);
	__type(value, struct sock_lb4);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} mesh_sock4 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 65536);
	__type(key, struct ipcache4_key);
	__type(value, struct ipcache_value);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} mesh_ipc4 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, struct policy_key);
	__type(value, struct policy_value);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} mesh_policy SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, struct enforcement_key);
	__type(value, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} mesh_enforce SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct ct4_key);
	__type(value, struct ct_value);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} mesh_ct4 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, MESH_REASONS * 2);
	__type(key, __u32);
	__type(value, struct metrics_value);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} mesh_metrics SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 256 * 1024);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} mesh_drops SEC(".maps");

/* --- socket load balancer --- */

static __always_inline __be16 ctx_port(const struct bpf_sock_addr *ctx)
{
	/* user_port is a 32-bit field holding a 16-bit port in network order: read it whole. */
	volatile __u32 port = ctx->user_port;
	return (__be16)port;
}

static __always_inline int lb4_key_of(const struct bpf_sock_addr *ctx, struct lb4_key *key)
{
	__u32 proto = ctx->protocol;

	if (proto != IPPROTO_TCP && proto != IPPROTO_UDP)
		return -1;
	key->address = ctx->user_ip4;
	key->port = ctx_port(ctx);
	key->proto = proto;
	key->pad = 0;
	key->slot = 0;
	key->pad2 = 0;
	return 0;
}

/* Balances the socket's destination when it is a frontend; 1 to go on, 0 to refuse. */
static __always_inline int lb4_balance(struct bpf_sock_addr *ctx, int reuse)
{
	struct lb4_key key;
	struct lb4_slot *svc, *backend = NULL;
	struct sock_lb4 *known, record = {};
	__u64 cookie;
	__u16 slot = 0;

	if (lb4_key_of(ctx, &key))
		return 1;
	svc = bpf_map_lookup_elem(&mesh_svc4, &key);
	if (!svc)
		return 1;
	if (svc->count == 0) {
		/* A frontend with nothing behind it: fail now rather than time out. */
		bpf_set_retval(-ECONNREFUSED);
		return 0;
	}
	cookie = bpf_get_socket_cookie(ctx);
	if (reuse) {
		known = bpf_map_lookup_elem(&mesh_sock4, &cookie);
		if (known && known->frontend_address == key.address &&
		    known->frontend_port == key.port && known->slot <= svc->count) {
			key.slot = known->slot;
			backend = bpf_map_lookup_elem(&mesh_svc4, &key);
			if (backend && (backend->address != known->backend_address ||
					backend->port != known->backend_port))
				backend = NULL;
			if (backend)
				slot = known->slot;
		}
	}
	if (!backend) {
		slot = (bpf_get_prandom_u32() % svc->count) + 1;
		key.slot = slot;
		backend = bpf_map_lookup_elem(&mesh_svc4, &key);
		if (!backend) {
			/* The agent is shrinking this frontend right now; slot 1 is always kept. */
			slot = 1;
			key.slot = 1;
			backend = bpf_map_lookup_elem(&mesh_svc4, &key);
			if (!backend) {
				bpf_set_retval(-ECONNREFUSED);
				return 0;
			}
		}
	}
	record.frontend_address = key.address;
	record.frontend_port = key.port;
	record.backend_address = backend->address;
	record.backend_port = backend->port;
	record.slot = slot;
	record.proto = key.proto;
	bpf_map_update_elem(&mesh_sock4, &cookie, &record, BPF_ANY);
	ctx->user_ip4 = backend->address;
	ctx->user_port = (__u32)backend->port;
	return 1;
}

/* Shows the frontend where the kernel would show the backend. */
static __always_inline int lb4_restore(struct bpf_sock_addr *ctx)
{
	__u64 cookie = bpf_get_socket_cookie(ctx);
	struct sock_lb4 *known = bpf_map_lookup_elem(&mesh_sock4, &cookie);

	if (known && known->backend_address == ctx->user_ip4 &&
	    known->backend_port == ctx_port(ctx)) {
		ctx->user_ip4 = known->frontend_address;
		ctx->user_port = (__u32)known->frontend_port;
	}
	return 1;
}

SEC("cgroup/connect4")
int mesh_connect4(struct bpf_sock_addr *ctx)
{
	return lb4_balance(ctx, 0);
}

SEC("cgroup/sendmsg4")
int mesh_sendmsg4(struct bpf_sock_addr *ctx)
{
	return lb4_balance(ctx, 1);
}

SEC("cgroup/recvmsg4")
int mesh_recvmsg4(struct bpf_sock_addr *ctx)
{
	return lb4_restore(ctx);
}

SEC("cgroup/getpeername4")
int mesh_getpeername4(struct bpf_sock_addr *ctx)
{
	return lb4_restore(ctx);
}

/* --- identity policy on pod interfaces --- */

static __always_inline void count(__u32 reason, __u8 direction, __u32 bytes)
{
	__u32 index = reason * 2 + direction;
	struct metrics_value *m = bpf_map_lookup_elem(&mesh_metrics, &index);

	if (m) {
		m->packets += 1;
		m->bytes += bytes;
	}
}

static __always_inline struct ipcache_value *ipcache_lookup(__be32 address)
{
	struct ipcache4_key key = { .prefixlen = 32, .address = address };

	return bpf_map_lookup_elem(&mesh_ipc4, &key);
}

static __always_inline int ct_fresh(struct ct4_key *key, __u64 now)
{
	struct ct_value *ct = bpf_map_lookup_elem(&mesh_ct4, key);
	__u64 lifetime = key->proto == IPPROTO_TCP ? CT_LIFETIME_TCP_NS : CT_LIFETIME_OTHER_NS;

	if (!ct || now - ct->last_seen_ns > lifetime)
		return 0;
	if (now - ct->last_seen_ns > CT_REFRESH_NS)
		ct->last_seen_ns = now;
	return 1;
}

static __always_inline int policy_allows(__u32 local, __u32 peer, __be16 port, __u8 proto,
					 __u8 direction)
{
	struct policy_key key = { .local_identity = local, .direction = direction };
	__u32 peers[2] = { peer, 0 };
	__be16 ports[2] = { port, 0 };
	__u8 protos[2] = { proto, MESH_PROTO_ANY };
	int i, j, k;

#pragma unroll
	for (i = 0; i < 2; i++)
#pragma unroll
		for (j = 0; j < 2; j++)
#pragma unroll
			for (k = 0; k < 2; k++) {
				key.peer_identity = peers[i];
				key.port = ports[j];
				key.proto = protos[k];
				if (bpf_map_lookup_elem(&mesh_policy, &key))
					return 1;
			}
	return 0;
}

/* Not inlined, so the object's BTF describes struct drop_event for the agent's layout test. */
static __noinline void send_drop(struct drop_event *event)
{
	bpf_ringbuf_output(&mesh_drops, event, sizeof(*event), 0);
}

static __always_inline int policy(struct __sk_buff *skb, __u8 direction)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip;
	struct ct4_key ct = {}, reply = {};
	struct ct_value fresh = {};
	struct enforcement_key enforced = {};
	struct ipcache_value *src_info, *dst_info;
	struct drop_event event = {};
	__u32 src_id, dst_id, local, peer;
	__be16 sport = 0, dport = 0;
	__u64 now;

	if ((void *)(eth + 1) > end || eth->h_proto != bpf_htons(ETH_P_IP))
		return TC_ACT_UNSPEC;
	ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > end || ip->ihl < 5)
		return TC_ACT_UNSPEC;
	if ((ip->protocol == IPPROTO_TCP || ip->protocol == IPPROTO_UDP ||
	     ip->protocol == IPPROTO_SCTP) &&
	    !(ip->frag_off & bpf_htons(0x1fff))) {
		__be16 *ports = (void *)ip + ip->ihl * 4;

		if ((void *)(ports + 2) > end)
			return TC_ACT_UNSPEC;
		sport = ports[0];
		dport = ports[1];
	}

	now = bpf_ktime_get_ns();
	ct.ifindex = skb->ifindex;
	ct.saddr = ip->saddr;
	ct.daddr = ip->daddr;
	ct.sport = sport;
	ct.dport = dport;
	ct.proto = ip->protocol;
	if (ct_fresh(&ct, now)) {
		count(MESH_FWD_ESTABLISHED, direction, skb->len);
		return TC_ACT_UNSPEC;
	}
	reply.ifindex = skb->ifindex;
	reply.saddr = ip->daddr;
	reply.daddr = ip->saddr;
	reply.sport = dport;
	reply.dport = sport;
	reply.proto = ip->protocol;
	if (ct_fresh(&reply, now)) {
		count(MESH_FWD_REPLY, direction, skb->len);
		return TC_ACT_UNSPEC;
	}

	src_info = ipcache_lookup(ip->saddr);
	dst_info = ipcache_lookup(ip->daddr);
	src_id = src_info ? src_info->identity : MESH_IDENTITY_WORLD;
	dst_id = dst_info ? dst_info->identity : MESH_IDENTITY_WORLD;
	local = direction == MESH_DIR_EGRESS ? src_id : dst_id;
	peer = direction == MESH_DIR_EGRESS ? dst_id : src_id;

	enforced.identity = local;
	enforced.direction = direction;
	if (!bpf_map_lookup_elem(&mesh_enforce, &enforced)) {
		count(MESH_FWD_UNENFORCED, direction, skb->len);
	} else if (policy_allows(local, peer, dport, ip->protocol, direction)) {
		count(MESH_FWD_POLICY, direction, skb->len);
	} else {
		count(MESH_DROP_POLICY, direction, skb->len);
		event.timestamp_ns = now;
		event.saddr = ip->saddr;
		event.daddr = ip->daddr;
		event.src_identity = src_id;
		event.dst_identity = dst_id;
		event.ifindex = skb->ifindex;
		event.sport = sport;
		event.dport = dport;
		event.src_cluster = src_info ? src_info->cluster_id : 0;
		event.dst_cluster = dst_info ? dst_info->cluster_id : 0;
		event.proto = ip->protocol;
		event.direction = direction;
		event.reason = MESH_DROP_POLICY;
		send_drop(&event);
		return TC_ACT_SHOT;
	}
	fresh.last_seen_ns = now;
	bpf_map_update_elem(&mesh_ct4, &ct, &fresh, BPF_ANY);
	return TC_ACT_UNSPEC;
}

/* Attached to tc ingress of the host-side interface: packets leaving the pod. */
SEC("classifier")
int mesh_from_pod(struct __sk_buff *skb)
{
	return policy(skb, MESH_DIR_EGRESS);
}

/* Attached to tc egress of the host-side interface: packets entering the pod. */
SEC("classifier")
int mesh_to_pod(struct __sk_buff *skb)
{
	return policy(skb, MESH_DIR_INGRESS);
}
