// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * corral's kernel sensor: one program per hook, each of which first asks
 * "is the current task in a watched cgroup?" (one hash lookup) and returns
 * at once when it is not, so unrelated host activity costs almost nothing.
 *
 * Only tracepoints (tp/, tp_btf/) are used: kprobes, fentry and LSM programs
 * are not available on every host corral runs on.  Syscall tracepoints fire
 * only for their own syscall, which keeps the cost on unwatched processes
 * lower than one sys_enter program for every syscall.
 *
 * Records are defined in corral.h and decoded by src/corral/sensor/records.py.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_endian.h>
#include "corral.h"

char LICENSE[] SEC("license") = "GPL";

/* Configuration, set from Python before load (frozen afterwards). */
const volatile bool host_wide = false;        /* watch every task, not only watched cgroups */
const volatile bool trace_all_opens = false;  /* debug: report every open, not only watched paths */
const volatile __u32 monitor_pid = 0;         /* never report the monitor itself */

#define AF_UNIX 1
#define AF_INET 2
#define AF_INET6 10
#define S_IFMT 00170000
#define S_IFSOCK 0140000
#define AT_FDCWD -100
#define MAX_PATH_DEPTH 32
#define CLONE_NS_FLAGS (0x00020000 | 0x02000000 | 0x04000000 | 0x08000000 | \
			0x10000000 | 0x20000000 | 0x40000000 | 0x00000080)

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 24);
} events SEC(".maps");

/*
 * The sensor's reader also wakes on its own every few ms (Sensor.read polls in
 * short slices), or, once the ring has been quiet a while, asks to be woken by
 * the next record (reader_asleep below).
 */
#define WAKEUP_BYTES (256 * 1024)
#include "wakeup.h"

/*
 * Set by a reader that has stopped polling (after some quiet, see Sensor.read):
 * the next record wakes it, once.  Polling every few ms costs the reader CPU on
 * the cores the watched workload runs on even while nothing happens; one
 * wake-up per quiet spell costs one irq_work.  Written by user space through a
 * shared mapping, cleared by whichever record wakes the reader.
 */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__uint(map_flags, BPF_F_MMAPABLE);
	__type(key, __u32);
	__type(value, __u32);
} reader_asleep SEC(".maps");

/*
 * Called after a record is committed.  The commit is a full barrier (an xchg
 * on the record's header) between the record becoming visible and this load,
 * and the reader orders its store of the flag before its last look at the
 * ring: so either it sees the record, or this sees the flag.  The wake-up is a
 * discarded 8-byte record: a commit is the only way to wake a ring's reader.
 */
static __always_inline void wake_reader_if_asleep(void)
{
	__u32 zero = 0;
	__u32 *asleep = bpf_map_lookup_elem(&reader_asleep, &zero);
	void *r;

	if (!asleep || !*(volatile __u32 *)asleep)
		return;
	*asleep = 0;
	r = bpf_ringbuf_reserve(&events, 8, 0);
	if (r)
		bpf_ringbuf_discard(r, BPF_RB_FORCE_WAKEUP);
}

/* Submit a reserved record (already counted in the ring's available data). */
#define SUBMIT(e)                                                                           \
	do {                                                                                \
		bpf_ringbuf_submit(e, wakeup_flags(bpf_ringbuf_query(&events, BPF_RB_AVAIL_DATA), \
						   sizeof(*(e)) + 8));                            \
		wake_reader_if_asleep();                                                    \
	} while (0)

/* Records the kernel could not reserve in the ring buffer, per CPU. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} dropped SEC(".maps");

/* cgroup v2 id -> (sandbox, step).  The in-kernel scope of the sensor. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, __u64);
	__type(value, struct watch);
} watched SEC(".maps");

/* Path prefixes whose open/unlink/rename is reported (longest-prefix match). */
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 1024);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct path_key);
	__type(value, __u32);
} watched_prefixes SEC(".maps");

/* Inodes whose opening is always reported, under any name (canary files). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, struct inode_key);
	__type(value, __u32);
} watched_inodes SEC(".maps");

/* Per-CPU room for records and paths too large for the 512-byte stack. */
struct scratch {
	char buf[2 * PATH_LEN];
	struct path_key key;
	char path1[PATH_LEN];  /* rename: the old name, kept while the new one is resolved */
	struct exec_event exec;
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct scratch);
} scratch_map SEC(".maps");

/* The scope reported for tasks seen only because of host_wide. */
const volatile struct watch host_watch = {};

/* Put every record type into the object's BTF (types used only inside
 * inlined functions are left out), so user space can check its layouts. */
struct exec_event *btf_exec_event __attribute__((unused));
struct net_event *btf_net_event __attribute__((unused));
struct file_event *btf_file_event __attribute__((unused));
struct sys_event *btf_sys_event __attribute__((unused));

/* ---- scope and headers -------------------------------------------------- */

static __always_inline const struct watch *current_watch(__u64 cgroup_id)
{
	const struct watch *w = bpf_map_lookup_elem(&watched, &cgroup_id);

	if (w)
		return w;
	if (host_wide && (bpf_get_current_pid_tgid() >> 32) != monitor_pid)
		return (const struct watch *)&host_watch;
	return NULL;
}

static __always_inline void count_drop(void)
{
	__u32 zero = 0;
	__u64 *count = bpf_map_lookup_elem(&dropped, &zero);

	if (count)
		*count += 1;
}

static __always_inline void fill_header(struct event_header *h, __u32 type,
					 const struct watch *w, __u64 cgroup_id)
{
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
	__u64 pid_tgid = bpf_get_current_pid_tgid();

	h->ts_ns = bpf_ktime_get_boot_ns();
	h->cgroup_id = cgroup_id;
	h->type = type;
	h->pid = pid_tgid >> 32;
	h->tid = (__u32)pid_tgid;
	h->ppid = BPF_CORE_READ(task, real_parent, tgid);
	h->uid = (__u32)bpf_get_current_uid_gid();
	h->sandbox_id = w->sandbox_id;
	h->step_id = w->step_id;
	h->_pad = 0;
	bpf_get_current_comm(h->comm, sizeof(h->comm));
}

/* Reserve a record of a fixed type; counts the drop when the ring is full. */
#define RESERVE(rec_type, evtype, w, cgid)                                       \
	({                                                                         \
		rec_type *__r = bpf_ringbuf_reserve(&events, sizeof(rec_type), 0); \
		if (__r)                                                           \
			fill_header(&__r->hdr, evtype, w, cgid);                   \
		else                                                               \
			count_drop();                                              \
		__r;                                                               \
	})

static __always_inline struct sys_event *reserve_sys(__u32 type, const struct watch *w,
						       __u64 cgid)
{
	struct sys_event *e = RESERVE(struct sys_event, type, w, cgid);

	if (e) {
		__builtin_memset(e->arg, 0, sizeof(e->arg));
		e->str[0] = 0;
		e->str2[0] = 0;
		e->str3[0] = 0;
	}
	return e;
}

/* The common prologue of every syscall handler. */
#define WATCHED_OR_RETURN(w, cgid)                 \
	__u64 cgid = bpf_get_current_cgroup_id(); \
	const struct watch *w = current_watch(cgid); \
	if (!w)                                    \
		return 0

/*
 * The current syscall's arguments, read in its exit handler from the user
 * registers saved at entry (the syscalls read this way leave them as they
 * were).  This replaces an entry program that saved them in a hash map: that
 * was a second program run and a map update, lookup and delete per call, for
 * every open of every watched process.  The registers are those the syscall
 * used: ptrace changes them before the entry tracepoint, not after it.
 */
static __always_inline struct pt_regs *syscall_regs(void)
{
	return (struct pt_regs *)bpf_task_pt_regs(bpf_get_current_task_btf());
}

/* ---- files, sockets and paths ------------------------------------------ */

/* The current task's open file `fd`.  The task and its fd table are read with
 * plain loads through the task's BTF pointer (bpf_get_current_task_btf), not
 * one bpf_probe_read_kernel() each: this runs for every open of a watched
 * process. */
static __always_inline struct file *fd_file(long fd)
{
	struct task_struct *task = bpf_get_current_task_btf();
	struct fdtable *fdt = task->files->fdt;
	struct file **fds;
	struct file *f = NULL;

	if (fd < 0 || fd >= fdt->max_fds)
		return NULL;
	fds = fdt->fd;
	bpf_probe_read_kernel(&f, sizeof(f), &fds[fd]);
	return f;
}

static __always_inline struct socket *file_socket(struct file *f)
{
	if (!f)
		return NULL;
	if ((BPF_CORE_READ(f, f_inode, i_mode) & S_IFMT) != S_IFSOCK)
		return NULL;
	return (struct socket *)BPF_CORE_READ(f, private_data);
}

static __always_inline struct socket *fd_socket(long fd)
{
	return file_socket(fd_file(fd));
}

/* Type, protocol, local port and (when `peer`) the remote end of a socket. */
static __always_inline void read_socket(struct net_event *e, struct socket *sock, bool peer)
{
	struct sock *sk;
	__u16 family;

	if (!sock)
		return;
	sk = BPF_CORE_READ(sock, sk);
	e->sock_type = BPF_CORE_READ(sock, type);
	e->protocol = BPF_CORE_READ(sk, sk_protocol);
	e->local_port = BPF_CORE_READ(sk, __sk_common.skc_num);
	if (!peer)
		return;
	family = BPF_CORE_READ(sk, __sk_common.skc_family);
	e->family = family;
	e->port = bpf_ntohs(BPF_CORE_READ(sk, __sk_common.skc_dport));
	if (family == AF_INET) {
		__u32 a = BPF_CORE_READ(sk, __sk_common.skc_daddr);
		__builtin_memcpy(e->addr, &a, 4);
	} else if (family == AF_INET6) {
		BPF_CORE_READ_INTO(&e->addr, sk, __sk_common.skc_v6_daddr);
	}
}

/* Local address of a socket (listen). */
static __always_inline void read_socket_local(struct net_event *e, struct socket *sock)
{
	struct sock *sk;
	__u16 family;

	if (!sock)
		return;
	sk = BPF_CORE_READ(sock, sk);
	family = BPF_CORE_READ(sk, __sk_common.skc_family);
	e->family = family;
	e->port = BPF_CORE_READ(sk, __sk_common.skc_num);
	if (family == AF_INET) {
		__u32 a = BPF_CORE_READ(sk, __sk_common.skc_rcv_saddr);
		__builtin_memcpy(e->addr, &a, 4);
	} else if (family == AF_INET6) {
		BPF_CORE_READ_INTO(&e->addr, sk, __sk_common.skc_v6_rcv_saddr);
	}
}

/* Parse a user sockaddr into family/port/addr (or the AF_UNIX path). */
static __always_inline void read_user_sockaddr(struct net_event *e, const void *uaddr, long len)
{
	struct {
		__u16 family;
		__u16 port;
		__u32 v4_or_flowinfo;
		__u8 v6[16];
	} sa = {};

	if (!uaddr || len < 2)
		return;
	if (bpf_probe_read_user(&sa, sizeof(sa), uaddr) < 0 &&
	    bpf_probe_read_user(&sa, 16, uaddr) < 0)
		return;
	e->family = sa.family;
	if (sa.family == AF_INET) {
		e->port = bpf_ntohs(sa.port);
		__builtin_memcpy(e->addr, &sa.v4_or_flowinfo, 4);
	} else if (sa.family == AF_INET6) {
		e->port = bpf_ntohs(sa.port);
		__builtin_memcpy(e->addr, sa.v6, 16);
	} else if (sa.family == AF_UNIX) {
		char first = 0;

		bpf_probe_read_user(&first, 1, uaddr + 2);
		if (first) {
			bpf_probe_read_user_str(e->unix_path, sizeof(e->unix_path), uaddr + 2);
		} else {
			/* abstract socket: shown as "@name", like ss(8) does */
			e->unix_path[0] = '@';
			bpf_probe_read_user_str(&e->unix_path[1], sizeof(e->unix_path) - 1,
						uaddr + 3);
		}
	}
}

#include "walk_path.h"  /* here: it needs struct scratch */

/*
 * Resolve a user-supplied name the way openat(dfd, name) would, without
 * following links: absolute names as given, relative ones appended to the
 * directory of dfd (or the cwd).  The result is copied into s->key.path;
 * returns its length with the NUL, or 0.
 */
static __always_inline long resolve_user_path(struct scratch *s, long dfd, const char *uname)
{
	struct task_struct *task = bpf_get_current_task_btf();
	char head[2] = {};
	__u32 off;

	s->key.path[0] = 0; /* no stale name from an earlier call if this one fails */
	if (!uname || bpf_probe_read_user(head, 2, uname) < 0)
		return 0;
	if (head[0] == '/')
		return bpf_probe_read_user_str(s->key.path, PATH_LEN, uname);

	/* drop leading "./" so "./.aws/credentials" still meets its prefix */
#pragma clang loop unroll(disable)
	for (int i = 0; i < 4 && head[0] == '.' && head[1] == '/'; i++) {
		uname += 2;
		if (bpf_probe_read_user(head, 2, uname) < 0)
			return 0;
	}
	/* dfd is an int in a 64-bit register: compare its low 32 bits */
	if ((int)dfd == AT_FDCWD) {
		struct path pwd;

		bpf_probe_read_kernel(&pwd, sizeof(pwd), &task->fs->pwd);
		off = walk_path(s, &pwd, NULL);
	} else {
		struct file *f = fd_file((int)dfd);
		struct path fpath;

		if (!f)
			return 0;
		fpath = BPF_CORE_READ(f, f_path);
		off = walk_path(s, &fpath, NULL);
	}
	/* the directory ends at buf[PATH_LEN - 1] (its NUL, or the '/' of "/") */
	s->buf[PATH_LEN - 1] = '/';
	if (bpf_probe_read_user_str(&s->buf[PATH_LEN], PATH_LEN, uname) < 0)
		return 0;
	return bpf_probe_read_kernel_str(s->key.path, PATH_LEN, &s->buf[off & (PATH_LEN - 1)]);
}

/* The canonical path of an open file into s->key.path; its length with the NUL. */
static __always_inline long file_path(struct scratch *s, struct file *f)
{
	struct path fpath = BPF_CORE_READ(f, f_path);
	__u32 off = walk_path(s, &fpath, NULL);

	return bpf_probe_read_kernel_str(s->key.path, PATH_LEN, &s->buf[off & (PATH_LEN - 1)]);
}

static __always_inline bool prefix_watched(struct scratch *s, long len)
{
	if (len <= 1)
		return false;
	s->key.prefixlen = (len - 1) * 8;
	return bpf_map_lookup_elem(&watched_prefixes, &s->key) != NULL;
}

static __always_inline struct scratch *get_scratch(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&scratch_map, &zero);
}

/* ---- process lifecycle -------------------------------------------------- */

static __always_inline bool fd_is_socket(int fd)
{
	return file_socket(fd_file(fd)) != NULL;
}

/* The inode's change time moved twice in the kernel's struct inode: i_ctime (timespec64) until
 * 6.6, __i_ctime until 6.11, then i_ctime_sec and i_ctime_nsec.  These flavors let one object
 * read whichever the running kernel has. */
struct inode___ctime_split {
	time64_t i_ctime_sec;
	u32 i_ctime_nsec;
} __attribute__((preserve_access_index));

struct inode___ctime_hidden {
	struct timespec64 __i_ctime;
} __attribute__((preserve_access_index));

struct inode___ctime_plain {
	struct timespec64 i_ctime;
} __attribute__((preserve_access_index));

static __always_inline __u64 inode_ctime_ns(struct inode *inode)
{
	struct timespec64 ts = {};

	if (bpf_core_field_exists(struct inode___ctime_split, i_ctime_sec)) {
		struct inode___ctime_split *i = (void *)inode;

		return BPF_CORE_READ(i, i_ctime_sec) * 1000000000ull + BPF_CORE_READ(i, i_ctime_nsec);
	}
	if (bpf_core_field_exists(struct inode___ctime_hidden, __i_ctime))
		ts = BPF_CORE_READ((struct inode___ctime_hidden *)inode, __i_ctime);
	else if (bpf_core_field_exists(struct inode___ctime_plain, i_ctime))
		ts = BPF_CORE_READ((struct inode___ctime_plain *)inode, i_ctime);
	return ts.tv_sec * 1000000000ull + ts.tv_nsec;
}

SEC("tp/sched/sched_process_exec")
int handle_exec(struct trace_event_raw_sched_process_exec *ctx)
{
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
	struct scratch *s;
	struct exec_event *e;
	unsigned long arg_start, arg_end, len, size;
	struct path pwd;
	struct qstr exe_name;
	char exe_head[6] = {};
	__u32 off;

	WATCHED_OR_RETURN(w, cgid);
	s = get_scratch();
	if (!s)
		return 0;
	e = &s->exec;
	fill_header(&e->hdr, EV_EXEC, w, cgid);
	e->flags = 0;
	bpf_probe_read_kernel_str(e->filename, sizeof(e->filename),
				  (void *)ctx + (ctx->__data_loc_filename & 0xFFFF));

	arg_start = BPF_CORE_READ(task, mm, arg_start);
	arg_end = BPF_CORE_READ(task, mm, arg_end);
	len = arg_end - arg_start;
	if (len >= ARGS_LEN) {
		len = ARGS_LEN - 1;
		e->flags |= EXEC_ARGS_TRUNCATED;
	}
	len &= ARGS_LEN - 1;
	if (bpf_probe_read_user(e->args, len, (void *)arg_start) < 0)
		len = 0;
	e->args_len = len;

	/* A file written (or made executable) after its step began, then run, is a dropped payload
	 * more often than a build: user space compares this with the step's start. */
	e->exe_ctime_ns = inode_ctime_ns(BPF_CORE_READ(task, mm, exe_file, f_inode));

	pwd = BPF_CORE_READ(task, fs, pwd);
	off = walk_path(s, &pwd, NULL);
	bpf_probe_read_kernel_str(e->cwd, sizeof(e->cwd), &s->buf[off & (PATH_LEN - 1)]);

	if (fd_is_socket(0))
		e->flags |= EXEC_STDIN_SOCKET;
	if (fd_is_socket(1))
		e->flags |= EXEC_STDOUT_SOCKET;
	if (fd_is_socket(2))
		e->flags |= EXEC_STDERR_SOCKET;

	size = offsetof(struct exec_event, args) + len;
	/* output() copies the record in: it is not yet counted in the ring's data */
	if (bpf_ringbuf_output(&events, e, size, wakeup_flags(bpf_ringbuf_query(&events, BPF_RB_AVAIL_DATA)
							      + size + 8, size + 8)) < 0)
		count_drop();
	else
		wake_reader_if_asleep();

	/* A memfd has no path: its image never touched a filesystem. */
	exe_name = BPF_CORE_READ(task, mm, exe_file, f_path.dentry, d_name);
	bpf_probe_read_kernel(exe_head, sizeof(exe_head), exe_name.name);
	if (exe_head[0] == 'm' && exe_head[1] == 'e' && exe_head[2] == 'm' &&
	    exe_head[3] == 'f' && exe_head[4] == 'd' && exe_head[5] == ':') {
		struct sys_event *m = reserve_sys(EV_MEMFD_EXEC, w, cgid);

		if (m) {
			bpf_probe_read_kernel_str(m->str, sizeof(m->str), exe_name.name);
			bpf_probe_read_kernel_str(m->str2, sizeof(m->str2), e->filename);
			SUBMIT(m);
		}
	}
	return 0;
}

SEC("tp_btf/sched_process_fork")
int BPF_PROG(handle_fork, struct task_struct *parent, struct task_struct *child)
{
	struct sys_event *e;

	if (child->pid != child->tgid) /* a new thread, not a new process */
		return 0;
	WATCHED_OR_RETURN(w, cgid);
	e = reserve_sys(EV_FORK, w, cgid);
	if (!e)
		return 0;
	e->arg[0] = child->tgid;
	SUBMIT(e);
	return 0;
}

SEC("tp/sched/sched_process_exit")
int handle_exit(void *ctx)
{
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
	struct sys_event *e;
	int code;

	if (BPF_CORE_READ(task, signal, live.counter) != 0)
		return 0; /* other threads still run: not the process's exit */
	WATCHED_OR_RETURN(w, cgid);
	e = reserve_sys(EV_EXIT, w, cgid);
	if (!e)
		return 0;
	code = BPF_CORE_READ(task, exit_code);
	e->arg[0] = (code >> 8) & 0xff;
	e->arg[1] = code & 0x7f;
	SUBMIT(e);
	return 0;
}

/* ---- network ------------------------------------------------------------ */

static __always_inline struct net_event *reserve_net(__u32 type, const struct watch *w,
						       __u64 cgid)
{
	struct net_event *e = RESERVE(struct net_event, type, w, cgid);

	if (e) {
		e->result = 0;
		e->fd = 0;
		e->family = 0;
		e->port = 0;
		e->sock_type = 0;
		e->protocol = 0;
		__builtin_memset(e->addr, 0, sizeof(e->addr));
		e->local_port = 0;
		__builtin_memset(e->_pad, 0, sizeof(e->_pad));
		e->unix_path[0] = 0;
	}
	return e;
}

/* The first bytes of a user sockaddr: its family. */
static __always_inline __u16 user_family(const void *uaddr, long len)
{
	__u16 family = 0;

	if (uaddr && len >= 2)
		bpf_probe_read_user(&family, sizeof(family), uaddr);
	return family;
}

/*
 * A record reserved and then found not worth reporting.  Discarding with
 * flags 0 wakes the reader like a submit does (an irq_work, then a reader
 * woken for nothing), which made every discard cost tens of µs in the
 * syscall: callers decide before reserving, and this is for the rest.
 */
#define DISCARD(e) bpf_ringbuf_discard(e, BPF_RB_NO_WAKEUP)

/* connect and bind: the address comes from the caller, the result from the exit */
static __always_inline int exit_sockaddr_call(struct trace_event_raw_sys_exit *ctx, __u32 type)
{
	struct pt_regs *regs;
	struct net_event *e;
	const void *uaddr;
	long fd, len;
	__u16 family;

	WATCHED_OR_RETURN(w, cgid);
	regs = syscall_regs();
	fd = PT_REGS_PARM1_CORE_SYSCALL(regs);
	uaddr = (const void *)PT_REGS_PARM2_CORE_SYSCALL(regs);
	len = PT_REGS_PARM3_CORE_SYSCALL(regs);
	family = user_family(uaddr, len);
	if (family != AF_INET && family != AF_INET6 && family != AF_UNIX)
		return 0; /* netlink, packet, ...: not network egress */
	e = reserve_net(type, w, cgid);
	if (!e)
		return 0;
	e->result = ctx->ret;
	e->fd = fd;
	read_user_sockaddr(e, uaddr, len);
	read_socket(e, fd_socket(fd), false);
	if (e->family != AF_INET && e->family != AF_INET6 && e->family != AF_UNIX) {
		DISCARD(e); /* the caller rewrote its sockaddr meanwhile */
		return 0;
	}
	SUBMIT(e);
	return 0;
}

SEC("tp/syscalls/sys_exit_connect")
int exit_connect(struct trace_event_raw_sys_exit *ctx)
{
	return exit_sockaddr_call(ctx, EV_CONNECT);
}

SEC("tp/syscalls/sys_exit_bind")
int exit_bind(struct trace_event_raw_sys_exit *ctx)
{
	return exit_sockaddr_call(ctx, EV_BIND);
}

SEC("tp/syscalls/sys_exit_listen")
int exit_listen(struct trace_event_raw_sys_exit *ctx)
{
	struct net_event *e;
	struct socket *sock;
	long fd;

	WATCHED_OR_RETURN(w, cgid);
	fd = PT_REGS_PARM1_CORE_SYSCALL(syscall_regs());
	e = reserve_net(EV_LISTEN, w, cgid);
	if (!e)
		return 0;
	e->result = ctx->ret;
	e->fd = fd;
	sock = fd_socket(fd);
	read_socket(e, sock, false);
	read_socket_local(e, sock);
	SUBMIT(e);
	return 0;
}

static __always_inline int exit_accept_call(struct trace_event_raw_sys_exit *ctx)
{
	struct net_event *e;
	struct socket *sock;
	__u16 family;

	if (ctx->ret < 0)
		return 0;
	WATCHED_OR_RETURN(w, cgid);
	sock = fd_socket(ctx->ret);
	if (!sock)
		return 0;
	family = BPF_CORE_READ(sock, sk, __sk_common.skc_family);
	if (family != AF_INET && family != AF_INET6)
		return 0; /* unix sockets: local IPC, not a peer on the network */
	e = reserve_net(EV_ACCEPT, w, cgid);
	if (!e)
		return 0;
	e->result = ctx->ret;
	e->fd = ctx->ret;
	read_socket(e, sock, true);
	SUBMIT(e);
	return 0;
}

SEC("tp/syscalls/sys_exit_accept")
int exit_accept(struct trace_event_raw_sys_exit *ctx)
{
	return exit_accept_call(ctx);
}

SEC("tp/syscalls/sys_exit_accept4")
int exit_accept4(struct trace_event_raw_sys_exit *ctx)
{
	return exit_accept_call(ctx);
}

/* A datagram with an explicit destination: where UDP (and DNS) goes. */
static __always_inline int emit_send(const struct watch *w, __u64 cgid, long fd,
				     const void *uaddr, long addrlen, long bytes)
{
	struct net_event *e;
	__u16 family;

	if (!uaddr || addrlen <= 0)
		return 0;
	family = user_family(uaddr, addrlen);
	if (family != AF_INET && family != AF_INET6)
		return 0; /* netlink (getaddrinfo asks the kernel this way), unix, ... */
	e = reserve_net(EV_SEND, w, cgid);
	if (!e)
		return 0;
	e->result = bytes;
	e->fd = fd;
	read_user_sockaddr(e, uaddr, addrlen);
	read_socket(e, fd_socket(fd), false);
	if (e->family != AF_INET && e->family != AF_INET6) {
		DISCARD(e); /* the caller rewrote its sockaddr meanwhile */
		return 0;
	}
	SUBMIT(e);
	return 0;
}

SEC("tp/syscalls/sys_enter_sendto")
int enter_sendto(struct trace_event_raw_sys_enter *ctx)
{
	WATCHED_OR_RETURN(w, cgid);
	return emit_send(w, cgid, ctx->args[0], (const void *)ctx->args[4], ctx->args[5],
			 ctx->args[2]);
}

/* sendmsg and sendmmsg: the destination is msg_name of the (first) msghdr */
static __always_inline int emit_sendmsg(struct trace_event_raw_sys_enter *ctx)
{
	struct {
		void *name;
		int namelen;
	} hdr = {};

	WATCHED_OR_RETURN(w, cgid);
	if (bpf_probe_read_user(&hdr, sizeof(hdr), (const void *)ctx->args[1]) < 0)
		return 0;
	return emit_send(w, cgid, ctx->args[0], hdr.name, hdr.namelen, 0);
}

SEC("tp/syscalls/sys_enter_sendmsg")
int enter_sendmsg(struct trace_event_raw_sys_enter *ctx)
{
	return emit_sendmsg(ctx);
}

SEC("tp/syscalls/sys_enter_sendmmsg")
int enter_sendmmsg(struct trace_event_raw_sys_enter *ctx)
{
	return emit_sendmsg(ctx);
}

/* A socket made into stdin, stdout or stderr: the shape of a reverse shell. */
static __always_inline int check_dup(long oldfd, long newfd)
{
	struct net_event *e;
	struct socket *sock;

	if (newfd < 0 || newfd > 2)
		return 0;
	WATCHED_OR_RETURN(w, cgid);
	sock = fd_socket(oldfd);
	if (!sock)
		return 0;
	e = reserve_net(EV_DUP_SOCKET, w, cgid);
	if (!e)
		return 0;
	e->fd = newfd;
	e->result = oldfd;
	read_socket(e, sock, true);
	SUBMIT(e);
	return 0;
}

SEC("tp/syscalls/sys_enter_dup2")
int enter_dup2(struct trace_event_raw_sys_enter *ctx)
{
	return check_dup(ctx->args[0], ctx->args[1]);
}

SEC("tp/syscalls/sys_enter_dup3")
int enter_dup3(struct trace_event_raw_sys_enter *ctx)
{
	return check_dup(ctx->args[0], ctx->args[1]);
}

/* ---- files -------------------------------------------------------------- */

enum open_call { OPEN, CREAT, OPENAT, OPENAT2 };

/* (dfd, name) of the open call being returned from. */
static __always_inline void open_name(enum open_call call, struct pt_regs *regs, long *dfd,
				      const char **name)
{
	if (call == OPEN || call == CREAT) {
		*dfd = AT_FDCWD;
		*name = (const char *)PT_REGS_PARM1_CORE_SYSCALL(regs);
	} else {
		*dfd = PT_REGS_PARM1_CORE_SYSCALL(regs);
		*name = (const char *)PT_REGS_PARM2_CORE_SYSCALL(regs);
	}
}

/* The open(2) flags the call was made with (the file's f_flags lack O_CREAT, O_TRUNC...). */
static __always_inline __u32 open_flags(enum open_call call, struct pt_regs *regs)
{
	__u64 flags = 0;

	switch (call) {
	case OPEN:
		return PT_REGS_PARM2_CORE_SYSCALL(regs);
	case CREAT:
		return 0x241; /* O_CREAT|O_WRONLY|O_TRUNC */
	case OPENAT:
		return PT_REGS_PARM3_CORE_SYSCALL(regs);
	default: /* openat2: flags are the first member of struct open_how */
		bpf_probe_read_user(&flags, sizeof(flags), (const void *)PT_REGS_PARM3_CORE_SYSCALL(regs));
		return flags;
	}
}

static __always_inline int exit_open_call(struct trace_event_raw_sys_exit *ctx, enum open_call call)
{
	struct scratch *s;
	struct file_event *e;
	struct inode *inode;
	struct file *f;
	struct inode_key ik = {};
	const char *name;
	__u32 match = 0;
	long len, dfd;

	WATCHED_OR_RETURN(w, cgid);
	s = get_scratch();
	if (!s)
		return 0;
	if (ctx->ret >= 0) {
		f = fd_file(ctx->ret);
		if (!f)
			return 0;
		inode = BPF_CORE_READ(f, f_inode);
		ik.ino = BPF_CORE_READ(inode, i_ino);
		ik.dev = BPF_CORE_READ(inode, i_sb, s_dev);
		if (bpf_map_lookup_elem(&watched_inodes, &ik))
			match |= MATCH_INODE;
		len = file_path(s, f);
	} else {
		open_name(call, syscall_regs(), &dfd, &name);
		len = resolve_user_path(s, dfd, name);
	}
	if (prefix_watched(s, len))
		match |= MATCH_PREFIX;
	if (!match && trace_all_opens)
		match = MATCH_DEBUG;
	if (!match)
		return 0;

	e = RESERVE(struct file_event, EV_OPEN, w, cgid);
	if (!e)
		return 0;
	e->result = ctx->ret;
	e->flags = open_flags(call, syscall_regs());
	e->match = match;
	e->dev = ik.dev;
	e->ino = ik.ino;
	bpf_probe_read_kernel_str(e->path, sizeof(e->path), s->key.path);
	e->path2[0] = 0;
	SUBMIT(e);
	return 0;
}

SEC("tp/syscalls/sys_exit_open")
int exit_open(struct trace_event_raw_sys_exit *ctx)
{
	return exit_open_call(ctx, OPEN);
}

SEC("tp/syscalls/sys_exit_creat")
int exit_creat(struct trace_event_raw_sys_exit *ctx)
{
	return exit_open_call(ctx, CREAT);
}

SEC("tp/syscalls/sys_exit_openat")
int exit_openat(struct trace_event_raw_sys_exit *ctx)
{
	return exit_open_call(ctx, OPENAT);
}

SEC("tp/syscalls/sys_exit_openat2")
int exit_openat2(struct trace_event_raw_sys_exit *ctx)
{
	return exit_open_call(ctx, OPENAT2);
}

/*
 * unlink and rename are reported at entry, before the name is gone.  Nearly
 * every one is of an unwatched path (git unlinks a temporary file per object
 * it writes), so the match is decided before a record is reserved.
 */
static __always_inline int emit_path_op(__u32 type, long dfd, const char *name,
					long dfd2, const char *name2)
{
	struct scratch *s;
	struct file_event *e;
	__u32 match = 0;
	long len;

	WATCHED_OR_RETURN(w, cgid);
	s = get_scratch();
	if (!s)
		return 0;
	len = resolve_user_path(s, dfd, name);
	if (prefix_watched(s, len))
		match = MATCH_PREFIX;
	if (name2) {
		/* keep the old name; a rename into a watched place counts too (persistence) */
		__builtin_memcpy(s->path1, s->key.path, PATH_LEN);
		len = resolve_user_path(s, dfd2, name2);
		if (prefix_watched(s, len))
			match |= MATCH_PREFIX;
	}
	if (!match && !trace_all_opens)
		return 0;
	e = RESERVE(struct file_event, type, w, cgid);
	if (!e)
		return 0;
	e->result = 0;
	e->flags = 0;
	e->dev = 0;
	e->ino = 0;
	e->match = match;
	if (name2) {
		bpf_probe_read_kernel_str(e->path, sizeof(e->path), s->path1);
		bpf_probe_read_kernel_str(e->path2, sizeof(e->path2), s->key.path);
	} else {
		bpf_probe_read_kernel_str(e->path, sizeof(e->path), s->key.path);
		e->path2[0] = 0;
	}
	SUBMIT(e);
	return 0;
}

SEC("tp/syscalls/sys_enter_unlink")
int enter_unlink(struct trace_event_raw_sys_enter *ctx)
{
	return emit_path_op(EV_UNLINK, AT_FDCWD, (const char *)ctx->args[0], 0, NULL);
}

SEC("tp/syscalls/sys_enter_unlinkat")
int enter_unlinkat(struct trace_event_raw_sys_enter *ctx)
{
	return emit_path_op(EV_UNLINK, ctx->args[0], (const char *)ctx->args[1], 0, NULL);
}

SEC("tp/syscalls/sys_enter_rename")
int enter_rename(struct trace_event_raw_sys_enter *ctx)
{
	return emit_path_op(EV_RENAME, AT_FDCWD, (const char *)ctx->args[0], AT_FDCWD,
			    (const char *)ctx->args[1]);
}

SEC("tp/syscalls/sys_enter_renameat")
int enter_renameat(struct trace_event_raw_sys_enter *ctx)
{
	return emit_path_op(EV_RENAME, ctx->args[0], (const char *)ctx->args[1], ctx->args[2],
			    (const char *)ctx->args[3]);
}

SEC("tp/syscalls/sys_enter_renameat2")
int enter_renameat2(struct trace_event_raw_sys_enter *ctx)
{
	return emit_path_op(EV_RENAME, ctx->args[0], (const char *)ctx->args[1], ctx->args[2],
			    (const char *)ctx->args[3]);
}

/* ---- privilege, namespaces, kernel -------------------------------------- */

/* Emit a sys_event with up to four integer arguments and one user string. */
static __always_inline int emit_sys(__u32 type, long a0, long a1, long a2, long a3,
				    const char *ustr)
{
	struct sys_event *e;

	WATCHED_OR_RETURN(w, cgid);
	e = reserve_sys(type, w, cgid);
	if (!e)
		return 0;
	e->arg[0] = a0;
	e->arg[1] = a1;
	e->arg[2] = a2;
	e->arg[3] = a3;
	if (ustr)
		bpf_probe_read_user_str(e->str, sizeof(e->str), ustr);
	SUBMIT(e);
	return 0;
}

SEC("tp/syscalls/sys_enter_ptrace")
int enter_ptrace(struct trace_event_raw_sys_enter *ctx)
{
	return emit_sys(EV_PTRACE, ctx->args[0], ctx->args[1], 0, 0, NULL);
}

/* mount ops: 0 mount, 1 umount, 2 move_mount, 3 fsopen, 4 pivot_root */
SEC("tp/syscalls/sys_enter_mount")
int enter_mount(struct trace_event_raw_sys_enter *ctx)
{
	struct sys_event *e;

	WATCHED_OR_RETURN(w, cgid);
	e = reserve_sys(EV_MOUNT, w, cgid);
	if (!e)
		return 0;
	e->arg[0] = ctx->args[3];   /* flags */
	e->arg[1] = 0;
	bpf_probe_read_user_str(e->str, sizeof(e->str), (const char *)ctx->args[1]);   /* target */
	bpf_probe_read_user_str(e->str2, sizeof(e->str2), (const char *)ctx->args[0]); /* source */
	bpf_probe_read_user_str(e->str3, sizeof(e->str3), (const char *)ctx->args[2]); /* fstype */
	SUBMIT(e);
	return 0;
}

SEC("tp/syscalls/sys_enter_umount")
int enter_umount(struct trace_event_raw_sys_enter *ctx)
{
	return emit_sys(EV_MOUNT, ctx->args[1], 1, 0, 0, (const char *)ctx->args[0]);
}

SEC("tp/syscalls/sys_enter_move_mount")
int enter_move_mount(struct trace_event_raw_sys_enter *ctx)
{
	return emit_sys(EV_MOUNT, ctx->args[4], 2, 0, 0, (const char *)ctx->args[3]);
}

SEC("tp/syscalls/sys_enter_fsopen")
int enter_fsopen(struct trace_event_raw_sys_enter *ctx)
{
	struct sys_event *e;

	WATCHED_OR_RETURN(w, cgid);
	e = reserve_sys(EV_MOUNT, w, cgid);
	if (!e)
		return 0;
	e->arg[0] = ctx->args[1];
	e->arg[1] = 3;
	bpf_probe_read_user_str(e->str3, sizeof(e->str3), (const char *)ctx->args[0]);
	SUBMIT(e);
	return 0;
}

SEC("tp/syscalls/sys_enter_pivot_root")
int enter_pivot_root(struct trace_event_raw_sys_enter *ctx)
{
	return emit_sys(EV_MOUNT, 0, 4, 0, 0, (const char *)ctx->args[0]);
}

/* ns ops: 0 unshare, 1 setns, 2 clone, 3 clone3 (arg0 = CLONE_NEW* flags) */
SEC("tp/syscalls/sys_enter_unshare")
int enter_unshare(struct trace_event_raw_sys_enter *ctx)
{
	return emit_sys(EV_NS, ctx->args[0], 0, 0, 0, NULL);
}

SEC("tp/syscalls/sys_enter_setns")
int enter_setns(struct trace_event_raw_sys_enter *ctx)
{
	return emit_sys(EV_NS, ctx->args[1], 1, ctx->args[0], 0, NULL);
}

SEC("tp/syscalls/sys_enter_clone")
int enter_clone(struct trace_event_raw_sys_enter *ctx)
{
	if (!(ctx->args[0] & CLONE_NS_FLAGS))
		return 0;
	return emit_sys(EV_NS, ctx->args[0] & CLONE_NS_FLAGS, 2, 0, 0, NULL);
}

SEC("tp/syscalls/sys_enter_clone3")
int enter_clone3(struct trace_event_raw_sys_enter *ctx)
{
	__u64 flags = 0;

	bpf_probe_read_user(&flags, sizeof(flags), (const void *)ctx->args[0]);
	if (!(flags & CLONE_NS_FLAGS))
		return 0;
	return emit_sys(EV_NS, flags & CLONE_NS_FLAGS, 3, 0, 0, NULL);
}

/* module ops: 0 init_module (arg1 = image size), 1 finit_module (arg1 = fd) */
SEC("tp/syscalls/sys_enter_init_module")
int enter_init_module(struct trace_event_raw_sys_enter *ctx)
{
	return emit_sys(EV_MODULE_LOAD, 0, ctx->args[1], 0, 0, (const char *)ctx->args[2]);
}

SEC("tp/syscalls/sys_enter_finit_module")
int enter_finit_module(struct trace_event_raw_sys_enter *ctx)
{
	return emit_sys(EV_MODULE_LOAD, 1, ctx->args[0], ctx->args[2], 0,
			(const char *)ctx->args[1]);
}

SEC("tp/syscalls/sys_enter_bpf")
int enter_bpf(struct trace_event_raw_sys_enter *ctx)
{
	return emit_sys(EV_BPF, ctx->args[0], 0, 0, 0, NULL);
}

/* setuid ops: 0 setuid, 1 setgid, 2 setreuid, 3 setregid, 4 setresuid,
 * 5 setresgid, 6 setfsuid, 7 setfsgid; arg1..3 the ids asked for */
#define SETID_PROG(sys, op, a1, a2)                                           \
	SEC("tp/syscalls/sys_enter_" #sys)                                    \
	int enter_##sys(struct trace_event_raw_sys_enter *ctx)                \
	{                                                                     \
		return emit_sys(EV_SETUID, op, ctx->args[0], a1, a2, NULL);   \
	}
SETID_PROG(setuid, 0, 0, 0)
SETID_PROG(setgid, 1, 0, 0)
SETID_PROG(setreuid, 2, ctx->args[1], 0)
SETID_PROG(setregid, 3, ctx->args[1], 0)
SETID_PROG(setresuid, 4, ctx->args[1], ctx->args[2])
SETID_PROG(setresgid, 5, ctx->args[1], ctx->args[2])
SETID_PROG(setfsuid, 6, 0, 0)
SETID_PROG(setfsgid, 7, 0, 0)

SEC("tp/syscalls/sys_enter_capset")
int enter_capset(struct trace_event_raw_sys_enter *ctx)
{
	struct { __u32 effective, permitted, inheritable; } data = {};

	bpf_probe_read_user(&data, sizeof(data), (const void *)ctx->args[1]);
	return emit_sys(EV_CAPSET, data.effective, data.permitted, data.inheritable, 0, NULL);
}

/* signal ops: 0 kill, 1 tkill, 2 tgkill; arg0 = target, arg1 = signal.
 * Signals a process sends itself are not reported; whether the target is
 * outside the sender's sandbox is decided in user space. */
static __always_inline int emit_signal(long target, long sig, long op)
{
	if (target == (long)(bpf_get_current_pid_tgid() >> 32))
		return 0;
	return emit_sys(EV_SIGNAL, target, sig, op, 0, NULL);
}

SEC("tp/syscalls/sys_enter_kill")
int enter_kill(struct trace_event_raw_sys_enter *ctx)
{
	return emit_signal(ctx->args[0], ctx->args[1], 0);
}

SEC("tp/syscalls/sys_enter_tkill")
int enter_tkill(struct trace_event_raw_sys_enter *ctx)
{
	if (ctx->args[0] == (__u32)bpf_get_current_pid_tgid())
		return 0;
	return emit_signal(ctx->args[0], ctx->args[1], 1);
}

SEC("tp/syscalls/sys_enter_tgkill")
int enter_tgkill(struct trace_event_raw_sys_enter *ctx)
{
	return emit_signal(ctx->args[0], ctx->args[2], 2);
}
