// SPDX-License-Identifier: GPL-2.0
/* Who owns a socket, by its cookie: guard mode's fast way to name the program behind a held
 * connection (picosnitch/guard/sockets.py). sock_diag gives the queued packet's socket cookie;
 * this map gives the process that connected, sent or bound on that socket last. It is loaded by
 * the guard worker only, and only in guard mode: the monitor never pays for it.
 *
 *   cgroup/connect4|6     the process connecting (outgoing TCP, connected UDP)
 *   cgroup/sendmsg4|6     the process sending a datagram to a named peer (unconnected UDP)
 *   cgroup/post_bind4|6   the process binding (listeners: incoming connections)
 */
#include "kernel_types.h"
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include "picosnitch.h"

char LICENSE[] SEC("license") = "GPL";

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);  /* the least recently written goes first when full */
	__uint(max_entries, 65536);
	__type(key, __u64);                   /* socket cookie */
	__type(value, struct socket_owner);
} socket_owners SEC(".maps");

const struct socket_owner *btf_socket_owner __attribute__((unused));

static __always_inline void note_owner(__u64 cookie)
{
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
	struct socket_owner owner = {}, *known;
	struct file *exe;

	owner.tgid = bpf_get_current_pid_tgid() >> 32;
	owner.uid = (__u32)bpf_get_current_uid_gid();
	known = bpf_map_lookup_elem(&socket_owners, &cookie);
	if (known && known->tgid == owner.tgid)
		return;  /* the same owner again (every datagram of an unconnected socket comes here) */
	exe = BPF_CORE_READ(task, mm, exe_file);
	owner.exe_ino = BPF_CORE_READ(exe, f_inode, i_ino);
	owner.exe_dev = BPF_CORE_READ(exe, f_inode, i_sb, s_dev);
	bpf_map_update_elem(&socket_owners, &cookie, &owner, BPF_ANY);
}

#define OWNER_HOOK(section, name)                               \
	SEC(section)                                            \
	int name(struct bpf_sock_addr *ctx)                     \
	{                                                       \
		note_owner(bpf_get_socket_cookie(ctx));         \
		return 1;                                       \
	}

OWNER_HOOK("cgroup/connect4", owner_connect4)
OWNER_HOOK("cgroup/connect6", owner_connect6)
OWNER_HOOK("cgroup/sendmsg4", owner_sendmsg4)
OWNER_HOOK("cgroup/sendmsg6", owner_sendmsg6)

SEC("cgroup/post_bind4")
int owner_bind4(struct bpf_sock *sk)
{
	note_owner(bpf_get_socket_cookie(sk));
	return 1;
}

SEC("cgroup/post_bind6")
int owner_bind6(struct bpf_sock *sk)
{
	note_owner(bpf_get_socket_cookie(sk));
	return 1;
}
