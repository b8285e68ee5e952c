/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * Wake a ring buffer's reader once per WAKEUP_BYTES of records, not once per
 * record: sensor.bpf.c and prevent.bpf.c, each of which defines WAKEUP_BYTES
 * for its ring before including this.  A wake-up (irq_work) costs
 * microseconds inside the syscall that submits the record, and the default
 * (flags 0) does it for every record while the reader keeps up, which a good
 * reader always does: that alone made watched processes ~80% slower.  The
 * readers therefore also poll on their own every few ms, which bounds the
 * latency.
 */
#ifndef CORRAL_WAKEUP_H
#define CORRAL_WAKEUP_H

/* `pending` bytes are in the ring including this record, which is `size` long. */
static __always_inline __u64 wakeup_flags(__u64 pending, __u64 size)
{
	if (pending < size)
		return BPF_RB_NO_WAKEUP;
	return pending / WAKEUP_BYTES != (pending - size) / WAKEUP_BYTES ? BPF_RB_FORCE_WAKEUP
									  : BPF_RB_NO_WAKEUP;
}

#endif /* CORRAL_WAKEUP_H */
