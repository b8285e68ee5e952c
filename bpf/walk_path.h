/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * Naming a file from its struct path, in BPF: what sensor.bpf.c (open, cwd,
 * exec) and prevent.bpf.c (the directory of a relative exec) share.  The
 * includer defines PATH_LEN, MAX_PATH_DEPTH and a struct scratch with a
 * char buf[2 * PATH_LEN] (per-CPU room: too large for the stack).
 */
#ifndef CORRAL_WALK_PATH_H
#define CORRAL_WALK_PATH_H

/*
 * What the walk needs of a dentry (its parent and name) and of a mount (its
 * parent, where it is mounted, its root), each in one bpf_probe_read_kernel()
 * where the fields are adjacent, as they are in every kernel we know of: the
 * walk runs for every open of every watched process, and these reads were
 * most of its cost at one read per field.  The CO-RE offsets decide at load
 * time; another layout gets one read per field.
 */
struct dentry_up {
	struct dentry *parent;
	struct qstr name;
};

struct mount_up {
	struct mount *parent;
	struct dentry *mountpoint;
	struct dentry *root;      /* of this mount's vfsmount */
};

static __always_inline void read_dentry_up(struct dentry *d, struct dentry_up *up)
{
	__u32 parent = bpf_core_field_offset(struct dentry, d_parent);

	if (bpf_core_field_offset(struct dentry, d_name) == parent + sizeof(up->parent)) {
		if (bpf_probe_read_kernel(up, sizeof(*up), (void *)d + parent) == 0)
			return;
		up->parent = d; /* unreadable: stop here, as at a root */
		return;
	}
	up->parent = BPF_CORE_READ(d, d_parent);
	up->name = BPF_CORE_READ(d, d_name);
}

static __always_inline void read_mount_up(struct mount *m, struct mount_up *up)
{
	__u32 parent = bpf_core_field_offset(struct mount, mnt_parent);

	if (bpf_core_field_offset(struct mount, mnt_mountpoint) == parent + sizeof(up->parent) &&
	    bpf_core_field_offset(struct mount, mnt) + bpf_core_field_offset(struct vfsmount, mnt_root) ==
		    parent + 2 * sizeof(up->parent)) {
		if (bpf_probe_read_kernel(up, sizeof(*up), (void *)m + parent) == 0)
			return;
		up->parent = m; /* unreadable: treat as the namespace root */
		up->root = NULL;
		return;
	}
	up->parent = BPF_CORE_READ(m, mnt_parent);
	up->mountpoint = BPF_CORE_READ(m, mnt_mountpoint);
	up->root = BPF_CORE_READ(m, mnt.mnt_root);
}

struct walk_ctx {
	struct scratch *s;
	struct dentry *dentry;
	struct mount *mnt;
	struct mount_up m;   /* of mnt */
	__u32 off;
	bool last;
	bool whole;          /* reached the root: nothing of the path was left out */
};

/* One step of walk_path: prepend one name, or cross one mount point. */
static long walk_step(__u32 i, struct walk_ctx *c)
{
	struct dentry *dentry = c->dentry;
	struct dentry_up up;
	__u32 len, off;

	if (dentry == c->m.root) {
		if (c->mnt == c->m.parent) {
			c->whole = true; /* the root of the namespace's mount tree */
			return 1;
		}
		c->dentry = c->m.mountpoint;
		c->mnt = c->m.parent;
		read_mount_up(c->mnt, &c->m);
		return 0;
	}
	read_dentry_up(dentry, &up);
	if (up.parent == dentry)
		return 1; /* the root of a filesystem that is not mounted here: unreachable */
	len = (up.name.len + 1) & (PATH_LEN - 1); /* the name and its '/' */
	off = c->off;
	if (len == 0 || len + 1 > off)
		return 1; /* too deep for the buffer: keep the tail we have */
	off -= len;
	/* writes the name and a NUL; the NUL becomes the '/' after it */
	if (bpf_probe_read_kernel_str(&c->s->buf[off & (PATH_LEN - 1)], len, up.name.name) < 0)
		return 1;
	if (!c->last)
		c->s->buf[(off + len - 1) & (2 * PATH_LEN - 1)] = '/';
	c->last = false;
	c->off = off;
	c->dentry = up.parent;
	return 0;
}

/*
 * Write the path of `path` into s->buf so that it ends just before
 * s->buf[PATH_LEN] (which stays NUL; the last name's NUL is at PATH_LEN - 1);
 * return where it starts.  Walks dentries up to the root of the task's mount
 * namespace, crossing mount points, so bind mounts, symlinks and relative
 * names all come out as the canonical absolute path.  Deeper than the buffer
 * (or MAX_PATH_DEPTH) holds, or not reachable from the root: the leading part
 * is cut, and *whole (when given) says false.  bpf_loop keeps the verifier's
 * work to one pass over the step.
 */
static __always_inline __u32 walk_path(struct scratch *s, const struct path *path, bool *whole)
{
	/* path is a copy on our stack: plain loads */
	struct walk_ctx c = {
		.s = s,
		.dentry = path->dentry,
		.off = PATH_LEN,
		.last = true,
	};

	c.mnt = container_of(path->mnt, struct mount, mnt);
	read_mount_up(c.mnt, &c.m);
	s->buf[PATH_LEN] = 0;
	bpf_loop(MAX_PATH_DEPTH, walk_step, &c, 0);
	if (whole)
		*whole = c.whole;
	c.off = (c.off - 1) & (PATH_LEN - 1);
	s->buf[c.off] = '/';
	return c.off;
}

#endif /* CORRAL_WALK_PATH_H */
