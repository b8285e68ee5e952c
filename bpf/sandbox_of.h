/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * Which sandbox a task, or a socket, belongs to: the lookup that egress.bpf.c and prevent.bpf.c
 * share.  Each object that includes this has a sandbox_of map of its own, filled by its own
 * guard (corral.sensor.guard.CgroupGuard binds a sandbox's cgroups to its id).
 */
#ifndef CORRAL_SANDBOX_OF_H
#define CORRAL_SANDBOX_OF_H

#define MAX_CGROUP_LEVEL 16  /* deepest ancestor looked at for a sandbox */

/* cgroup v2 id -> sandbox id: a sandbox's own cgroup and its step cgroups. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, __u64);
	__type(value, __u32);
} sandbox_of SEC(".maps");

/*
 * The sandbox of the current task (skb == NULL) or of the socket that owns
 * skb, or NULL.  Its own cgroup is the common case; otherwise the nearest
 * bound ancestor, so that a process which moves itself into a child cgroup it
 * made cannot leave its sandbox.  A socket belongs to the cgroup of the task
 * that made it.  (Always inlined with a constant skb: each program keeps only
 * the helpers of its own kind, and programs that have no skb never call the
 * skb helpers.)
 */
static __always_inline const __u32 *find_sandbox(struct __sk_buff *skb)
{
	__u64 id = skb ? bpf_skb_cgroup_id(skb) : bpf_get_current_cgroup_id();
	const __u32 *sandbox = bpf_map_lookup_elem(&sandbox_of, &id);

	if (sandbox)
		return sandbox;
	for (int level = MAX_CGROUP_LEVEL; level > 0; level--) {
		id = skb ? bpf_skb_ancestor_cgroup_id(skb, level) : bpf_get_current_ancestor_cgroup_id(level);
		if (!id)  /* deeper than the cgroup itself */
			continue;
		sandbox = bpf_map_lookup_elem(&sandbox_of, &id);
		if (sandbox)
			return sandbox;
	}
	return NULL;
}

static __always_inline const __u32 *current_sandbox(void)
{
	return find_sandbox(NULL);
}

#endif /* CORRAL_SANDBOX_OF_H */
