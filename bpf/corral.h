/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * Event records shared by the kernel programs (sensor.bpf.c) and the Python
 * decoder (src/corral/sensor/records.py).  Python mirrors every struct here;
 * tests/test_layout.py compares both against the compiled object's BTF, so
 * change them together.
 *
 * Naming follows user space, not the kernel: `pid` is the process id (the
 * kernel's tgid) and `tid` the thread id (the kernel's pid).
 */
#ifndef CORRAL_H
#define CORRAL_H

#define COMM_LEN 16
#define PATH_LEN 256      /* also the LPM key size for watched path prefixes */
#define ARGS_LEN 2048     /* argv bytes kept per exec; longer argv is flagged */
#define STR_LEN 128

enum event_type {
	EV_EXEC = 1,
	EV_FORK,
	EV_EXIT,
	EV_CONNECT,
	EV_SEND,
	EV_BIND,
	EV_LISTEN,
	EV_ACCEPT,
	EV_OPEN,
	EV_UNLINK,
	EV_RENAME,
	EV_DUP_SOCKET,
	EV_PTRACE,
	EV_MOUNT,
	EV_NS,
	EV_MODULE_LOAD,
	EV_BPF,
	EV_MEMFD_EXEC,
	EV_SETUID,
	EV_CAPSET,
	EV_SIGNAL,
};

/* exec flags */
#define EXEC_ARGS_TRUNCATED (1u << 0)
#define EXEC_STDIN_SOCKET   (1u << 1)
#define EXEC_STDOUT_SOCKET  (1u << 2)
#define EXEC_STDERR_SOCKET  (1u << 3)
#define EXEC_CWD_TRUNCATED  (1u << 4)

/* open/unlink/rename flags (in file_event.match) */
#define MATCH_PREFIX (1u << 0)  /* path is under a watched prefix */
#define MATCH_INODE  (1u << 1)  /* the file's inode is watched (canaries) */
#define MATCH_DEBUG  (1u << 2)  /* reported because every open is traced */

struct event_header {
	__u64 ts_ns;       /* bpf_ktime_get_boot_ns(): CLOCK_BOOTTIME */
	__u64 cgroup_id;   /* cgroup v2 id of the task */
	__u32 type;        /* enum event_type */
	__u32 pid;         /* process id (kernel tgid) */
	__u32 tid;         /* thread id (kernel pid) */
	__u32 ppid;        /* real parent's process id */
	__u32 uid;
	__u32 sandbox_id;  /* from the watched-cgroup map; 0 in host-wide mode */
	__u32 step_id;
	__u32 _pad;
	char comm[COMM_LEN];
};

struct exec_event {
	struct event_header hdr;
	__u32 flags;       /* EXEC_* */
	__u32 args_len;    /* bytes used in args: NUL-separated argv */
	__u64 exe_ctime_ns; /* when the executable's inode last changed (CLOCK_REALTIME): written in this step? */
	char filename[PATH_LEN];
	char cwd[PATH_LEN];
	char args[ARGS_LEN];
};

/* connect, send, bind, listen, accept */
struct net_event {
	struct event_header hdr;
	__s32 result;      /* syscall return: 0 or fd, or -errno */
	__u32 fd;
	__u16 family;      /* AF_INET, AF_INET6, AF_UNIX */
	__u16 port;        /* remote port (local port for bind/listen), host order */
	__u16 sock_type;   /* SOCK_STREAM, SOCK_DGRAM, ... */
	__u16 protocol;    /* IPPROTO_* */
	__u8 addr[16];     /* IPv4 in the first 4 bytes, or IPv6 */
	__u16 local_port;
	__u16 _pad[3];
	char unix_path[STR_LEN]; /* AF_UNIX destination (docker.sock and friends) */
};

/* open, unlink, rename */
struct file_event {
	struct event_header hdr;
	__s32 result;      /* fd or 0, or -errno; 0 for unlink/rename (seen at entry) */
	__u32 flags;       /* open(2) flags */
	__u32 match;       /* MATCH_* */
	__u32 dev;
	__u64 ino;
	char path[PATH_LEN];
	char path2[PATH_LEN]; /* rename: the new name */
};

/*
 * Everything else: one generic record whose meaning of arg[] and str[] per
 * type is spelled out in records.py (fork: arg0 = child pid; exit: arg0 =
 * exit code, arg1 = signal; ptrace: request, target pid; ...).
 */
struct sys_event {
	struct event_header hdr;
	__s64 arg[4];
	char str[STR_LEN];
	char str2[STR_LEN];
	char str3[32];     /* mount: the filesystem type */
};

/* Value of the watched-cgroup map. */
struct watch {
	__u32 sandbox_id;
	__u32 step_id;
};

/* Key of the watched path prefix LPM trie. */
struct path_key {
	__u32 prefixlen;   /* in bits */
	char path[PATH_LEN];
};

/* Key of the watched inode map (canary files). */
struct inode_key {
	__u64 ino;
	__u32 dev;
	__u32 _pad;
};

#endif
