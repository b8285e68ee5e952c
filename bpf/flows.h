/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * The record of the flow sniffer (flows.bpf.c), mirrored by
 * src/corral/detect/flows.py and checked against the object's BTF by
 * tests/test_flows.py: change them together.
 */
#ifndef CORRAL_FLOWS_H
#define CORRAL_FLOWS_H

#define FLOW_PAYLOAD_MAX 256   /* payload bytes kept from a flow's first packet */

enum flow_direction {
	FLOW_OUT = 1,          /* sent by a socket below the corral cgroup */
	FLOW_IN = 2,           /* received by one */
};

/* The first payload-carrying packet of a flow in one direction. */
struct flow_record {
	__u64 ts_ns;           /* bpf_ktime_get_boot_ns(): CLOCK_BOOTTIME, like the sensor */
	__u64 cgroup_id;       /* cgroup v2 id of the socket (where it was created) */
	__u64 cookie;          /* bpf_get_socket_cookie(): unique per socket until reboot */
	__u32 payload_len;     /* payload bytes in the packet (may exceed what was captured) */
	__u32 uid;             /* the socket owner's uid */
	__u16 captured;        /* bytes of payload[] filled: min(payload_len, FLOW_PAYLOAD_MAX) */
	__u16 family;          /* AF_INET or AF_INET6: of the packet, not of the socket */
	__u16 local_port;      /* host order */
	__u16 remote_port;     /* host order */
	__u8 direction;        /* enum flow_direction */
	__u8 proto;            /* IPPROTO_TCP or IPPROTO_UDP */
	__u8 _pad[6];
	__u8 local_addr[16];   /* IPv4 in the first 4 bytes, or IPv6 */
	__u8 remote_addr[16];
	__u8 payload[FLOW_PAYLOAD_MAX];
};

#endif
