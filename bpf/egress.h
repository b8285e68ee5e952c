/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * Map layouts of the egress guard (egress.bpf.c), mirrored by
 * src/corral/sandbox/egress.py: change them together.
 */
#ifndef CORRAL_EGRESS_H
#define CORRAL_EGRESS_H

enum egress_mode {
	EGRESS_OBSERVE = 0,  /* allow everything, count what enforce would deny */
	EGRESS_ENFORCE = 1,  /* deny what the allow list does not admit */
	EGRESS_CUT = 2,      /* deny everything, allowed or not; drop established flows */
};

/*
 * Allow and deny entries: a CIDR plus a port, per sandbox, in LPM tries.
 * The trie matches the data bits in order, so sandbox, port and pad (64 bits)
 * always match in full and the address is matched for the CIDR's length:
 * prefixlen = 64 + CIDR length.  port is in network byte order; 0 = any port
 * (the programs look up the real port, then 0).  sandbox_id is in host order.
 */
#define EGRESS_KEY_FIXED_BITS 64

struct egress_key4 {
	__u32 prefixlen;
	__u32 sandbox_id;
	__u16 port;
	__u16 pad;        /* always zero: keeps addr aligned */
	__u8 addr[4];
};

struct egress_key6 {
	__u32 prefixlen;
	__u32 sandbox_id;
	__u16 port;
	__u16 pad;
	__u8 addr[16];
};

/* Per-sandbox decisions, counted per connect() / unconnected sendmsg(). */
struct egress_counters {
	__u64 allowed;
	__u64 denied;      /* refused (enforce or cut) */
	__u64 would_deny;  /* let through only because the sandbox observes */
};

#endif /* CORRAL_EGRESS_H */
