/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * Map layouts and the record of the exec guard (prevent.bpf.c), mirrored by
 * src/corral/respond/prevent.py (tests/test_prevent.py checks them against
 * the object's BTF): change them together.
 */
#ifndef CORRAL_PREVENT_H
#define CORRAL_PREVENT_H

#define PREVENT_COMM_LEN 16
#define PREVENT_PATH_LEN 256  /* filenames, NUL included */
#define PREVENT_PREFIX_LEN 252 /* denied path prefixes: an LPM key holds 256 data bytes */
#define PREVENT_NAME_LEN 32   /* denied basenames: up to 31 bytes and a NUL */
#define PREVENT_ARGV_MAX 8    /* argv patterns per sandbox ... */
#define PREVENT_ARGV_PAT 32   /* ... of up to 32 bytes each (no NUL needed) */
#define PREVENT_ARGV_LEN 1024 /* argv bytes searched: argv[0] on, NUL-separated */

enum prevent_mode {
	PREVENT_OBSERVE = 0,  /* report a denied exec, let it run */
	PREVENT_ENFORCE = 1,  /* SIGKILL it before the new image runs, and report it */
};

enum deny_kind {
	DENY_NAME = 1,  /* basename of the file executed */
	DENY_PATH = 2,  /* path prefix */
	DENY_ARGV = 3,  /* substring of argv */
};

/* Per sandbox: its mode and its argv patterns (one lookup gives both). */
struct prevent_sandbox {
	__u32 mode;        /* enum prevent_mode */
	__u32 argv_count;  /* patterns in use, from 0 */
	__u8 argv_len[PREVENT_ARGV_MAX];
	char argv[PREVENT_ARGV_MAX][PREVENT_ARGV_PAT];
};

/* Denied basenames: exact match, name zero-padded.  Value: the rule index. */
struct deny_name_key {
	__u32 sandbox_id;
	char name[PREVENT_NAME_LEN];
};

/*
 * Denied path prefixes in an LPM trie: the sandbox id always matches in full,
 * then the path for the prefix's length: prefixlen = 32 + 8 * strlen(prefix).
 * The kernel caps a key's data at 256 bytes, hence prefixes of up to 252
 * bytes (no NUL); longer paths are looked up by their first 252.
 * Value: the rule index.
 */
#define DENY_PATH_FIXED_BITS 32

struct deny_path_key {
	__u32 prefixlen;
	__u32 sandbox_id;
	char path[PREVENT_PREFIX_LEN];
};

/* One denied exec (killed, or only reported in observe mode). */
struct denied_exec {
	__u64 ts_ns;        /* bpf_ktime_get_boot_ns(): CLOCK_BOOTTIME */
	__u64 cgroup_id;
	__u32 sandbox_id;
	__u32 pid;          /* process id (kernel tgid) */
	__u32 tid;          /* thread id (kernel pid) */
	__u32 uid;
	__u32 kind;         /* enum deny_kind */
	__u32 rule_index;   /* which entry of that kind, as numbered by user space */
	__u32 enforced;     /* 1: SIGKILL was sent */
	__u32 _pad;
	char comm[PREVENT_COMM_LEN];    /* the caller's, before the exec */
	char filename[PREVENT_PATH_LEN]; /* as passed to execve() */
	char path[PREVENT_PATH_LEN];     /* resolved against cwd/dirfd; "" if not */
};

#endif /* CORRAL_PREVENT_H */
