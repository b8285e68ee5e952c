// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * corral's exec guard: a per-sandbox deny list for execve()/execveat(),
 * decided at the syscall's entry.  A denied exec in an enforcing sandbox gets
 * SIGKILL from bpf_send_signal() right there: the signal is pending before
 * the kernel starts the exec, which gives up at its first fatal-signal check
 * (copying argv), so the new image never runs; the old one dies on the way
 * back to user space.  Observing sandboxes only get the record.
 *
 * An exec is denied when, for the caller's sandbox,
 *   - the basename of the file executed is a denied name (exact match),
 *   - its path starts with a denied prefix (LPM trie), or
 *   - the first PREVENT_ARGV_LEN bytes of argv contain a denied pattern.
 *
 * The name is read as the caller passed it (the kernel has not resolved it
 * yet): relative names are joined to the cwd (or execveat's dirfd) by walking
 * dentries, but ".." and symlinks are not resolved, so path prefixes match
 * lexically.  Strings in user pages that are not resident cannot be read
 * here (a tracepoint cannot fault) and then match nothing.
 *
 * Only tracepoints are used: kprobes, fentry and LSM programs are not
 * available on every host corral runs on.  Layouts are in prevent.h,
 * mirrored by src/corral/respond/prevent.py.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include "prevent.h"
#include "sandbox_of.h"

char LICENSE[] SEC("license") = "GPL";

#define SIGKILL 9
#define AT_FDCWD -100
#define AT_EMPTY_PATH 0x1000
#define MAX_PATH_DEPTH 32    /* directories walked to name a cwd or dirfd */
#define MAX_ARGS 64          /* argv entries read (up to PREVENT_ARGV_LEN bytes) */
#define PATH_LEN PREVENT_PATH_LEN
#define ARGV_LEN PREVENT_ARGV_LEN

/* sandbox id -> mode and argv patterns.  Not preallocated: an update then
 * swaps in a new element under RCU, so a reader never sees half of one. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __u32);
	__type(value, struct prevent_sandbox);
} sandboxes SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, struct deny_name_key);
	__type(value, __u32);
} deny_names SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 16384);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct deny_path_key);
	__type(value, __u32);
} deny_paths SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 20);
} events SEC(".maps");

/* Records the kernel could not reserve in the ring buffer, per CPU. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} dropped SEC(".maps");

/* Per-CPU room for names and argv, too large for the 512-byte stack. */
struct scratch {
	char buf[2 * PATH_LEN];      /* a directory's path, then the name joined to it */
	char filename[PATH_LEN];     /* as given */
	char path[PATH_LEN];         /* resolved */
	struct deny_path_key key;
	struct deny_name_key name;
	char argv[2 * ARGV_LEN];     /* NUL-separated; the second half is slack for reads */
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct scratch);
} scratch_map SEC(".maps");

/* Put the layouts into the object's BTF for user space's checks. */
struct prevent_sandbox *btf_prevent_sandbox __attribute__((unused));
struct deny_name_key *btf_deny_name_key __attribute__((unused));
struct deny_path_key *btf_deny_path_key __attribute__((unused));
struct denied_exec *btf_denied_exec __attribute__((unused));

/* The reader polls meanwhile (ExecGuard.read); denied execs are rare, so the batch is small. */
#define WAKEUP_BYTES (64 * 1024)
#include "wakeup.h"

/* ---- naming a directory ---------------------------------------------------- */

#include "walk_path.h"  /* here: it needs struct scratch */

static __always_inline struct file *task_fd_file(struct task_struct *task, long fd)
{
	struct fdtable *fdt = BPF_CORE_READ(task, files, fdt);
	struct file **fds;
	struct file *f = NULL;

	if (fd < 0 || fd >= BPF_CORE_READ(fdt, max_fds))
		return NULL;
	fds = BPF_CORE_READ(fdt, fd);
	bpf_core_read(&f, sizeof(f), &fds[fd]);
	return f;
}

/*
 * The absolute path of the exec into s->path, its length with the NUL
 * returned (0: unknown).  Absolute names are taken as given; relative ones
 * (leading "./" dropped) are joined to the directory of dfd or the cwd, and an
 * empty name with AT_EMPTY_PATH (fexecve) is dfd's own path.
 */
static __always_inline long resolve(struct scratch *s, long dfd, long flags)
{
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
	const char *name = s->filename;
	struct path dir;
	__u32 skip = 0;
	bool whole;
	__u32 off;

	if (name[0] == '/')
		return bpf_probe_read_kernel_str(s->path, PATH_LEN, name);
	if (!name[0] && !(flags & AT_EMPTY_PATH))
		return 0;
#pragma clang loop unroll(disable)
	for (int i = 0; i < 4 && name[skip & 15] == '.' && name[(skip + 1) & 15] == '/'; i++)
		skip += 2;

	/* dfd is an int in a 64-bit register: compare its low 32 bits */
	if ((int)dfd == AT_FDCWD) {
		dir = BPF_CORE_READ(task, fs, pwd);
	} else {
		struct file *f = task_fd_file(task, (int)dfd);

		if (!f)
			return 0;
		dir = BPF_CORE_READ(f, f_path);
	}
	off = walk_path(s, &dir, &whole);
	if (!whole)
		return 0;  /* a tail of the path would match the wrong prefixes */
	if (name[0]) {
		/* the directory ends at buf[PATH_LEN - 1] (its NUL, or the '/' of "/") */
		s->buf[PATH_LEN - 1] = '/';
		if (bpf_probe_read_kernel_str(&s->buf[PATH_LEN], PATH_LEN, name + (skip & 15)) < 0)
			return 0;
	}
	return bpf_probe_read_kernel_str(s->path, PATH_LEN, &s->buf[off & (PATH_LEN - 1)]);
}

/* ---- the three kinds of deny entry --------------------------------------- */

struct slash_ctx {
	const char *path;
	__u32 last;  /* index just after the last '/' seen */
};

static long find_slash(__u32 i, struct slash_ctx *c)
{
	if (c->path[i & (PATH_LEN - 1)] == '/')
		c->last = i + 1;
	return 0;
}

/* Is the basename of path (len bytes with the NUL) a denied name? */
static __always_inline const __u32 *match_name(struct scratch *s, __u32 sandbox, const char *path,
					       __u32 len)
{
	struct slash_ctx c = { .path = path };

	if (len <= 1 || len > PATH_LEN)
		return NULL;
	bpf_loop(len - 1, find_slash, &c, 0);
	if (len - 1 - c.last >= PREVENT_NAME_LEN || c.last >= len - 1)
		return NULL;  /* longer than any denied name, or empty */
	s->name.sandbox_id = sandbox;
	__builtin_memset(s->name.name, 0, sizeof(s->name.name));  /* hash keys compare every byte */
	bpf_probe_read_kernel_str(s->name.name, PREVENT_NAME_LEN, &path[c.last & (PATH_LEN - 1)]);
	return bpf_map_lookup_elem(&deny_names, &s->name);
}

/* Does the resolved path (len bytes with the NUL) start with a denied prefix? */
static __always_inline const __u32 *match_path(struct scratch *s, __u32 sandbox, __u32 len)
{
	if (len <= 1 || len > PATH_LEN)
		return NULL;
	len -= 1;  /* the NUL is not part of any prefix */
	if (len > PREVENT_PREFIX_LEN)
		len = PREVENT_PREFIX_LEN;  /* no prefix is longer */
	__builtin_memcpy(s->key.path, s->path, PREVENT_PREFIX_LEN);
	s->key.prefixlen = DENY_PATH_FIXED_BITS + len * 8;
	s->key.sandbox_id = sandbox;
	return bpf_map_lookup_elem(&deny_paths, &s->key);
}

struct argv_ctx {
	struct scratch *s;
	const char *const *argv;
	__u32 off;  /* bytes of s->argv used */
};

/* Append argv[i] and its NUL to s->argv; stop at the end of argv or of the room. */
static long read_arg(__u32 i, struct argv_ctx *c)
{
	const char *arg = NULL;
	__u32 off = c->off;
	long n;

	if (bpf_probe_read_user(&arg, sizeof(arg), &c->argv[i]) < 0 || !arg)
		return 1;
	/* off < ARGV_LEN and the buffer is twice that: room for ARGV_LEN more */
	n = bpf_probe_read_user_str(&c->s->argv[off & (ARGV_LEN - 1)], ARGV_LEN, arg);
	if (n <= 0)
		return 1;
	c->off = off + n;
	return c->off >= ARGV_LEN;
}

/* argv[0], argv[1], ... NUL-separated into s->argv; the bytes used (<= ARGV_LEN). */
static __always_inline __u32 read_argv(struct scratch *s, const char *const *argv)
{
	struct argv_ctx c = { .s = s, .argv = argv };

	if (!argv)
		return 0;
	bpf_loop(MAX_ARGS, read_arg, &c, 0);
	return c.off < ARGV_LEN ? c.off : ARGV_LEN;
}

struct search_ctx {
	const char *argv;
	const char *pat;
	__u32 pat_len;
	bool found;
};

/* Does the pattern occur at argv[i]?  Patterns hold no NUL, so none spans two args. */
static long match_at(__u32 i, struct search_ctx *c)
{
	const char *argv = c->argv, *pat = c->pat;

	for (__u32 j = 0; j < PREVENT_ARGV_PAT; j++) {
		if (j >= c->pat_len)
			break;
		if (argv[(i + j) & (2 * ARGV_LEN - 1)] != pat[j])
			return 0;
	}
	c->found = true;
	return 1;
}

/* The index of the first denied pattern found in argv (len bytes), or -1. */
static __always_inline int match_argv(struct scratch *s, const struct prevent_sandbox *sb, __u32 len)
{
	struct search_ctx c = { .argv = s->argv };

	for (__u32 k = 0; k < PREVENT_ARGV_MAX; k++) {
		if (k >= sb->argv_count)
			break;
		c.pat = sb->argv[k];
		c.pat_len = sb->argv_len[k];
		if (!c.pat_len || c.pat_len > PREVENT_ARGV_PAT || c.pat_len > len)
			continue;
		/* one callback per start position: the verifier checks one, not 1 KiB of them */
		bpf_loop(len - c.pat_len + 1, match_at, &c, 0);
		if (c.found)
			return k;
	}
	return -1;
}

/* ---- the decision ------------------------------------------------------- */

static __always_inline void report(struct scratch *s, __u32 sandbox, __u32 kind, __u32 index,
				   bool enforced, long path_len)
{
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	struct denied_exec *e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);

	if (!e) {
		__u32 zero = 0;
		__u64 *count = bpf_map_lookup_elem(&dropped, &zero);

		if (count)
			*count += 1;
		return;
	}
	e->ts_ns = bpf_ktime_get_boot_ns();
	e->cgroup_id = bpf_get_current_cgroup_id();
	e->sandbox_id = sandbox;
	e->pid = pid_tgid >> 32;
	e->tid = (__u32)pid_tgid;
	e->uid = (__u32)bpf_get_current_uid_gid();
	e->kind = kind;
	e->rule_index = index;
	e->enforced = enforced;
	e->_pad = 0;
	bpf_get_current_comm(e->comm, sizeof(e->comm));
	__builtin_memcpy(e->filename, s->filename, PATH_LEN);
	if (path_len > 0)
		__builtin_memcpy(e->path, s->path, PATH_LEN);
	else
		e->path[0] = 0;
	bpf_ringbuf_submit(e, wakeup_flags(bpf_ringbuf_query(&events, BPF_RB_AVAIL_DATA),
					   sizeof(*e) + 8));
}

static __always_inline int check_exec(long dfd, const char *uname, const char *const *uargv,
				      long flags)
{
	const struct prevent_sandbox *sb;
	const __u32 *found, *rule;
	struct scratch *s;
	__u32 zero = 0, sandbox, kind = 0, index = 0;
	long flen, plen;
	int argv_rule;
	bool enforced;

	found = current_sandbox();
	if (!found)
		return 0;
	sandbox = *found;
	sb = bpf_map_lookup_elem(&sandboxes, &sandbox);
	s = bpf_map_lookup_elem(&scratch_map, &zero);
	if (!sb || !s)
		return 0;  /* being removed */

	flen = bpf_probe_read_user_str(s->filename, PATH_LEN, uname);
	if (flen < 0) {
		s->filename[0] = 0;  /* unreadable now: only argv can match */
		flen = 0;
	}
	plen = resolve(s, dfd, flags);
	if (plen < 0)
		plen = 0;

	/* the basename of the resolved path (fexecve has no other) unless it was cut
	 * short, else of the name given */
	if (plen > 0 && plen < PATH_LEN)
		rule = match_name(s, sandbox, s->path, plen);
	else
		rule = match_name(s, sandbox, s->filename, flen);
	if (rule) {
		kind = DENY_NAME;
		index = *rule;
	} else if ((rule = match_path(s, sandbox, plen))) {
		kind = DENY_PATH;
		index = *rule;
	} else if (sb->argv_count) {
		argv_rule = match_argv(s, sb, read_argv(s, uargv));
		if (argv_rule >= 0) {
			kind = DENY_ARGV;
			index = argv_rule;
		}
	}
	if (!kind)
		return 0;
	/* kill first: the record is evidence, the kill is the point */
	enforced = sb->mode == PREVENT_ENFORCE && bpf_send_signal(SIGKILL) == 0;
	report(s, sandbox, kind, index, enforced, plen);
	return 0;
}

SEC("tp/syscalls/sys_enter_execve")
int prevent_execve(struct trace_event_raw_sys_enter *ctx)
{
	return check_exec(AT_FDCWD, (const char *)ctx->args[0], (const char *const *)ctx->args[1], 0);
}

SEC("tp/syscalls/sys_enter_execveat")
int prevent_execveat(struct trace_event_raw_sys_enter *ctx)
{
	return check_exec(ctx->args[0], (const char *)ctx->args[1], (const char *const *)ctx->args[2],
			  ctx->args[4]);
}
