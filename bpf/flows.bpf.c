// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * corral's flow sniffer: the first payload bytes of each flow in and out of
 * a sandbox, for user space to classify (TLS SNI, SSH banner, HTTP, stratum,
 * DNS).  The programs are attached once to <cgroup v2 root>/corral, so they
 * run for exactly the sockets created by processes below it: sandboxes.
 *
 * A flow is a socket and a direction (TCP), or a socket, a direction and a
 * remote address and port (UDP: one unconnected socket may ask several DNS
 * servers).  Each is reported once, by its first packet that carries
 * payload; later packets cost one hash lookup.
 *
 * Observation only: every program returns 1 (pass).  Prevention is the
 * egress guard's job (egress.bpf.c), before a packet exists.
 *
 * The record is in flows.h, decoded by src/corral/detect/flows.py.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "flows.h"

char LICENSE[] SEC("license") = "GPL";

#define PASS 1                /* cgroup_skb: let the packet through */
#define AF_INET 2
#define AF_INET6 10
#define IPPROTO_HOPOPTS 0
#define IPPROTO_ROUTING 43
#define IPPROTO_DSTOPTS 60
#define IP_OFFSET_MASK 0x1fff /* IPv4 fragment offset, in host order */
#define MAX_IPV6_EXT 4        /* extension headers skipped before giving up */
#define UDP_PEERS_MAX 64      /* UDP remotes reported per socket and direction */

_Static_assert((FLOW_PAYLOAD_MAX & (FLOW_PAYLOAD_MAX - 1)) == 0, "FLOW_PAYLOAD_MAX: a power of two");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 22);
} flows SEC(".maps");

/* Records the kernel could not reserve in the ring buffer, per CPU. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} dropped SEC(".maps");

/* UDP remotes not reported because their socket already had UDP_PEERS_MAX. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} capped SEC(".maps");

/* Flows already reported.  Socket cookies are never reused, so a closed
 * socket's entries are simply left for the LRU to evict. */
struct flow_key {
	__u64 cookie;
	__u8 remote_addr[16];  /* UDP only; zero for TCP */
	__u16 remote_port;     /* UDP only */
	__u8 direction;
	__u8 proto;
	__u32 _pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct flow_key);
	__type(value, __u8);
} seen SEC(".maps");

/* (cookie, direction) -> UDP remotes reported: the cap on a spraying socket. */
struct peers_key {
	__u64 cookie;
	__u32 direction;
	__u32 _pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, struct peers_key);
	__type(value, __u32);
} udp_peers SEC(".maps");

/* Put the record type into the object's BTF for user space's layout check. */
struct flow_record *btf_flow_record __attribute__((unused));

/* What the headers say: addresses in the packet's order, and where the payload is. */
struct packet {
	__u8 saddr[16];
	__u8 daddr[16];
	__u32 payload_off;
	__u32 payload_len;
	__u16 sport;
	__u16 dport;
	__u16 family;
	__u8 proto;
};

static __always_inline void count(void *counter)
{
	__u32 zero = 0;
	__u64 *n = bpf_map_lookup_elem(counter, &zero);

	if (n)
		*n += 1;
}

/* The IPv6 header and up to MAX_IPV6_EXT extension headers; sets *l4 and p->proto. */
static __always_inline bool parse_ipv6(struct __sk_buff *skb, struct packet *p, __u32 *l4)
{
	struct ipv6hdr ip6;
	__u8 ext[2];
	__u8 next;
	__u32 off = sizeof(ip6);

	if (bpf_skb_load_bytes(skb, 0, &ip6, sizeof(ip6)) < 0)
		return false;
	__builtin_memcpy(p->saddr, &ip6.saddr, 16);
	__builtin_memcpy(p->daddr, &ip6.daddr, 16);
	next = ip6.nexthdr;
	for (int i = 0; i < MAX_IPV6_EXT; i++) {
		/* fragments and anything else unusual are not a flow's first bytes */
		if (next != IPPROTO_HOPOPTS && next != IPPROTO_ROUTING && next != IPPROTO_DSTOPTS)
			break;
		if (bpf_skb_load_bytes(skb, off, ext, sizeof(ext)) < 0)
			return false;
		next = ext[0];
		off += ((__u32)ext[1] + 1) * 8;
	}
	p->family = AF_INET6;
	p->proto = next;
	*l4 = off;
	return true;
}

/* Parse IP and TCP/UDP headers; false for anything else or no payload. */
static __always_inline bool parse(struct __sk_buff *skb, struct packet *p)
{
	__u8 first;
	__u32 l4 = 0;

	/* cgroup_skb data starts at the network header, in both directions */
	if (bpf_skb_load_bytes(skb, 0, &first, 1) < 0)
		return false;
	if ((first >> 4) == 4) {
		struct iphdr ip;

		if (bpf_skb_load_bytes(skb, 0, &ip, sizeof(ip)) < 0)
			return false;
		if (bpf_ntohs(ip.frag_off) & IP_OFFSET_MASK)
			return false;  /* a later fragment: no L4 header */
		__builtin_memcpy(p->saddr, &ip.saddr, 4);
		__builtin_memcpy(p->daddr, &ip.daddr, 4);
		p->family = AF_INET;
		p->proto = ip.protocol;
		l4 = (__u32)ip.ihl * 4;
	} else if ((first >> 4) == 6) {
		if (!parse_ipv6(skb, p, &l4))
			return false;
	} else {
		return false;
	}

	if (p->proto == IPPROTO_TCP) {
		struct tcphdr tcp;

		if (bpf_skb_load_bytes(skb, l4, &tcp, sizeof(tcp)) < 0)
			return false;
		p->sport = bpf_ntohs(tcp.source);
		p->dport = bpf_ntohs(tcp.dest);
		p->payload_off = l4 + (__u32)tcp.doff * 4;
	} else if (p->proto == IPPROTO_UDP) {
		struct udphdr udp;

		if (bpf_skb_load_bytes(skb, l4, &udp, sizeof(udp)) < 0)
			return false;
		p->sport = bpf_ntohs(udp.source);
		p->dport = bpf_ntohs(udp.dest);
		p->payload_off = l4 + sizeof(udp);
	} else {
		return false;
	}
	/* skb->len: the whole packet from the IP header (a GSO one too, before
	 * segmentation), so SYNs and bare ACKs come out as 0 */
	if (skb->len <= p->payload_off)
		return false;
	p->payload_len = skb->len - p->payload_off;
	return true;
}

/* Is this UDP socket over its cap of reported remotes? */
static __always_inline bool udp_capped(const struct peers_key *pk)
{
	__u32 *n = bpf_map_lookup_elem(&udp_peers, pk);

	return n && *n >= UDP_PEERS_MAX;
}

static __always_inline void udp_count(const struct peers_key *pk)
{
	__u32 one = 1;
	__u32 *n = bpf_map_lookup_elem(&udp_peers, pk);

	if (n)
		__sync_fetch_and_add(n, 1);
	else
		bpf_map_update_elem(&udp_peers, pk, &one, BPF_NOEXIST);
}

static __always_inline int capture(struct __sk_buff *skb, __u8 direction)
{
	struct packet p = {};
	struct flow_key key = {};
	struct peers_key pk = {};
	struct flow_record *e;
	const __u8 *remote;
	__u32 len;
	__u8 one = 1;

	key.cookie = bpf_get_socket_cookie(skb);
	key.direction = direction;
	/* Most packets belong to a TCP flow already reported: a socket is TCP
	 * or UDP for life, so its TCP key can be looked up before any parsing. */
	key.proto = IPPROTO_TCP;
	if (bpf_map_lookup_elem(&seen, &key))
		return PASS;
	if (!parse(skb, &p))
		return PASS;
	if (p.proto == IPPROTO_UDP) {
		remote = direction == FLOW_OUT ? p.daddr : p.saddr;
		key.proto = IPPROTO_UDP;
		__builtin_memcpy(key.remote_addr, remote, 16);
		key.remote_port = direction == FLOW_OUT ? p.dport : p.sport;
		if (bpf_map_lookup_elem(&seen, &key))
			return PASS;
		pk.cookie = key.cookie;
		pk.direction = direction;
		if (udp_capped(&pk)) {
			count(&capped);
			return PASS;
		}
	}

	e = bpf_ringbuf_reserve(&flows, sizeof(*e), 0);
	if (!e) {
		count(&dropped);  /* not marked seen: a later packet may still report the flow */
		return PASS;
	}
	/* Mark before filling: of two CPUs with the same flow's packets, one reports. */
	if (bpf_map_update_elem(&seen, &key, &one, BPF_NOEXIST) < 0) {
		bpf_ringbuf_discard(e, 0);
		return PASS;
	}
	if (p.proto == IPPROTO_UDP)
		udp_count(&pk);

	len = p.payload_len;  /* at least 1: parse() refused empty payloads */
	if (len > FLOW_PAYLOAD_MAX)
		len = FLOW_PAYLOAD_MAX;
	/* The same value, written so the verifier sees 1..FLOW_PAYLOAD_MAX
	 * (clang may pass it the unclamped register otherwise). */
	len = ((len - 1) & (FLOW_PAYLOAD_MAX - 1)) + 1;
	if (bpf_skb_load_bytes(skb, p.payload_off, e->payload, len) < 0) {
		bpf_ringbuf_discard(e, 0);
		return PASS;
	}
	e->ts_ns = bpf_ktime_get_boot_ns();
	/* the socket's cgroup, not the current task's: in softirq (a TCP ACK
	 * clocking out queued data, any ingress) current is whoever ran */
	e->cgroup_id = bpf_skb_cgroup_id(skb);
	e->cookie = key.cookie;
	e->payload_len = p.payload_len;
	e->uid = bpf_get_socket_uid(skb);
	e->captured = len;
	e->family = p.family;
	e->direction = direction;
	e->proto = p.proto;
	__builtin_memset(e->_pad, 0, sizeof(e->_pad));
	if (direction == FLOW_OUT) {
		e->local_port = p.sport;
		e->remote_port = p.dport;
		__builtin_memcpy(e->local_addr, p.saddr, 16);
		__builtin_memcpy(e->remote_addr, p.daddr, 16);
	} else {
		e->local_port = p.dport;
		e->remote_port = p.sport;
		__builtin_memcpy(e->local_addr, p.daddr, 16);
		__builtin_memcpy(e->remote_addr, p.saddr, 16);
	}
	bpf_ringbuf_submit(e, 0);
	return PASS;
}

SEC("cgroup_skb/egress")
int flows_egress(struct __sk_buff *skb)
{
	return capture(skb, FLOW_OUT);
}

SEC("cgroup_skb/ingress")
int flows_ingress(struct __sk_buff *skb)
{
	return capture(skb, FLOW_IN);
}
