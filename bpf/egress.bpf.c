// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * corral's egress guard: default-deny network egress per sandbox, decided in
 * the kernel before a packet leaves.  connect() (TCP, and UDP connect) and
 * unconnected UDP sendmsg() are refused with EPERM when the destination is
 * outside the sandbox's allow list.  A sandbox in CUT mode also loses the
 * flows it already has: cgroup_skb programs drop every packet of its sockets,
 * both ways.
 *
 * The programs are attached once to <cgroup v2 root>/corral and run for
 * every cgroup below it; a cgroup that belongs to no sandbox is always
 * allowed (several corral processes may attach their own copy at once, and
 * each must leave the others' cgroups alone).  Only cgroup sock_addr and skb
 * hooks are used: kprobes, fentry and LSM programs are not available everywhere.
 *
 * Map layouts are in egress.h, mirrored by src/corral/sandbox/egress.py.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "egress.h"
#include "sandbox_of.h"

char LICENSE[] SEC("license") = "GPL";

#define ALLOW 1
#define DENY 0               /* the caller's connect()/sendmsg() gets EPERM */

/* sandbox id -> enum egress_mode.  Cutting a sandbox off is one update. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, __u32);
	__type(value, __u32);
} sandbox_mode SEC(".maps");

/* sandbox id -> decisions taken for it. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, __u32);
	__type(value, struct egress_counters);
} counters SEC(".maps");

/* (sandbox, port, CIDR) entries; the value is unused.  Deny wins over allow. */
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct egress_key4);
	__type(value, __u32);
} allow4 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct egress_key6);
	__type(value, __u32);
} allow6 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct egress_key4);
	__type(value, __u32);
} deny4 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct egress_key6);
	__type(value, __u32);
} deny6 SEC(".maps");

/* Put the key and counter types into the object's BTF for user space. */
struct egress_key4 *btf_egress_key4 __attribute__((unused));
struct egress_key6 *btf_egress_key6 __attribute__((unused));
struct egress_counters *btf_egress_counters __attribute__((unused));

/* Is (addr, port) in the trie for this sandbox, with this port or any port? */
static __always_inline bool match4(void *trie, __u32 sandbox, __u16 port, __u32 addr)
{
	struct egress_key4 key = {
		.prefixlen = EGRESS_KEY_FIXED_BITS + 32,
		.sandbox_id = sandbox,
		.port = port,
	};

	__builtin_memcpy(key.addr, &addr, sizeof(addr));
	if (bpf_map_lookup_elem(trie, &key))
		return true;
	key.port = 0;
	return bpf_map_lookup_elem(trie, &key) != NULL;
}

static __always_inline bool match6(void *trie, __u32 sandbox, __u16 port, const __u32 addr[4])
{
	struct egress_key6 key = {
		.prefixlen = EGRESS_KEY_FIXED_BITS + 128,
		.sandbox_id = sandbox,
		.port = port,
	};

	__builtin_memcpy(key.addr, addr, 16);
	if (bpf_map_lookup_elem(trie, &key))
		return true;
	key.port = 0;
	return bpf_map_lookup_elem(trie, &key) != NULL;
}

static __always_inline bool permitted4(__u32 sandbox, __u16 port, __u32 addr)
{
	return !match4(&deny4, sandbox, port, addr) && match4(&allow4, sandbox, port, addr);
}

/* The verdict for a sandbox whose destination is (not) permitted, counted. */
static __always_inline int verdict(__u32 sandbox, __u32 mode, bool permitted)
{
	struct egress_counters *c = bpf_map_lookup_elem(&counters, &sandbox);
	int ret = ALLOW;

	if (mode == EGRESS_CUT)
		permitted = false;
	if (permitted) {
		if (c)
			__sync_fetch_and_add(&c->allowed, 1);
	} else if (mode == EGRESS_OBSERVE) {
		if (c)
			__sync_fetch_and_add(&c->would_deny, 1);
	} else {
		if (c)
			__sync_fetch_and_add(&c->denied, 1);
		ret = DENY;
	}
	return ret;
}

/* A bound sandbox without a mode (being removed) fails closed. */
static __always_inline __u32 mode_of(__u32 sandbox)
{
	const __u32 *mode = bpf_map_lookup_elem(&sandbox_mode, &sandbox);

	return mode ? *mode : EGRESS_ENFORCE;
}

static __always_inline int check4(struct bpf_sock_addr *ctx)
{
	const __u32 *sandbox = current_sandbox();
	__u32 mode;

	if (!sandbox)
		return ALLOW;
	mode = mode_of(*sandbox);
	if (mode == EGRESS_CUT)  /* no lookups needed */
		return verdict(*sandbox, mode, false);
	return verdict(*sandbox, mode, permitted4(*sandbox, (__u16)ctx->user_port, ctx->user_ip4));
}

static __always_inline int check6(struct bpf_sock_addr *ctx)
{
	const __u32 *sandbox = current_sandbox();
	__u32 addr[4];
	__u16 port;
	__u32 mode;
	bool ok;

	if (!sandbox)
		return ALLOW;
	mode = mode_of(*sandbox);
	if (mode == EGRESS_CUT)
		return verdict(*sandbox, mode, false);
	port = (__u16)ctx->user_port;
	addr[0] = ctx->user_ip6[0];
	addr[1] = ctx->user_ip6[1];
	addr[2] = ctx->user_ip6[2];
	addr[3] = ctx->user_ip6[3];
	if (addr[0] == 0 && addr[1] == 0 && addr[2] == bpf_htonl(0xffff)) {
		/* ::ffff:a.b.c.d on a dual-stack socket goes out as IPv4 without
		 * passing the connect4 hook: judge it by the IPv4 lists. */
		ok = permitted4(*sandbox, port, addr[3]);
	} else {
		ok = !match6(&deny6, *sandbox, port, addr) && match6(&allow6, *sandbox, port, addr);
	}
	return verdict(*sandbox, mode, ok);
}

SEC("cgroup/connect4")
int egress_connect4(struct bpf_sock_addr *ctx)
{
	return check4(ctx);
}

SEC("cgroup/connect6")
int egress_connect6(struct bpf_sock_addr *ctx)
{
	return check6(ctx);
}

/* UDP sendto()/sendmsg() with an address on an unconnected socket. */
SEC("cgroup/sendmsg4")
int egress_sendmsg4(struct bpf_sock_addr *ctx)
{
	return check4(ctx);
}

SEC("cgroup/sendmsg6")
int egress_sendmsg6(struct bpf_sock_addr *ctx)
{
	return check6(ctx);
}

/*
 * Every packet of a socket in a CUT sandbox is dropped, both ways, which ends
 * flows that were established before the cut (connect4/6 and sendmsg4/6 only
 * see new ones).  A dropped TCP segment is retransmitted and dropped again,
 * so the flow stalls until its retries run out or the process gives up.
 * Per packet: the cgroup lookup and the mode lookup (more only for a cgroup
 * bound through an ancestor, or not bound at all).  Nothing is counted here:
 * the counters are per decision, not per packet.
 */
static __always_inline int skb_verdict(struct __sk_buff *skb)
{
	const __u32 *sandbox = find_sandbox(skb);
	const __u32 *mode;

	if (!sandbox)
		return ALLOW;
	mode = bpf_map_lookup_elem(&sandbox_mode, sandbox);
	return mode && *mode == EGRESS_CUT ? DENY : ALLOW;
}

SEC("cgroup_skb/egress")
int egress_skb_out(struct __sk_buff *skb)
{
	return skb_verdict(skb);
}

SEC("cgroup_skb/ingress")
int egress_skb_in(struct __sk_buff *skb)
{
	return skb_verdict(skb);
}
