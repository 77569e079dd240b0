// SPDX-License-Identifier: GPL-2.0
/* Who owns a socket, by its cookie: guard mode's fast way to name the program behind a held
 * connection (picosnitch/guard/sockets.py). sock_diag gives the queued packet's socket cookie;
 * this map gives the process that connected, sent or bound on that socket last. It is loaded by
 * the guard worker only, and only in guard mode: the monitor never pays for it.
 *
 *   cgroup/connect4|6     the process connecting (outgoing TCP, connected UDP)
 *   cgroup/sendmsg4|6     the process sending a datagram to a named peer (unconnected UDP)
 *   cgroup/post_bind4|6   the process binding (listeners: incoming connections)
 *
 * An outgoing TCP connection's owner is also filed under its addresses and ports when its SYN is
 * about to be sent (sockops), so the guard finds it by what the queued SYN carries, without a
 * sock_diag round trip.
 */
#include "kernel_types.h"
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_endian.h>
#include "picosnitch.h"

#define AF_INET 2
#define AF_INET6 10

char LICENSE[] SEC("license") = "GPL";

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);  /* the least recently written goes first when full */
	__uint(max_entries, 65536);
	__type(key, __u64);                   /* socket cookie */
	__type(value, struct socket_owner);
} socket_owners SEC(".maps");

/* The owner of the socket an outgoing TCP connection's SYN comes from, by that SYN's addresses and
 * ports (at most one socket has them while it connects). */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct connection_key);
	__type(value, struct socket_owner);
} connection_owners SEC(".maps");

const struct socket_owner *btf_socket_owner __attribute__((unused));
const struct connection_key *btf_connection_key __attribute__((unused));

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

/* One 4-byte field of the context: the verifier refuses the 8-byte loads clang would merge two
 * neighbouring fields into. */
static __always_inline __u32 ctx_word(const __u32 *field)
{
	return *(volatile const __u32 *)field;
}

/* ::ffff:a.b.c.d, the IPv4 address of an IPv6 socket: its packets are IPv4. */
static __always_inline bool v4_mapped(const __u32 *ip6)
{
	return ip6[0] == 0 && ip6[1] == 0 && ip6[2] == bpf_htonl(0xffff);
}

/* When a connect()ed TCP socket is about to send its SYN: its ports are chosen by now, and
 * cgroup/connect4|6 has noted its owner by cookie in the same connect(). The entry is replaced
 * (or, without an owner, removed) at every connect, so it never names an earlier socket's owner. */
SEC("sockops")
int owner_of_connection(struct bpf_sock_ops *skops)
{
	struct connection_key key = {};
	struct socket_owner *owner;
	__u64 cookie;

	if (skops->op != BPF_SOCK_OPS_TCP_CONNECT_CB)
		return 1;
	key.lport = (__u16)skops->local_port;
	key.rport = (__u16)bpf_ntohl(skops->remote_port);
	if (skops->family == AF_INET) {
		key.family = AF_INET;
		__builtin_memcpy(key.laddr, &skops->local_ip4, 4);
		__builtin_memcpy(key.raddr, &skops->remote_ip4, 4);
	} else if (skops->family == AF_INET6) {
		__u32 local[4], remote[4];

		for (int i = 0; i < 4; i++) {
			local[i] = ctx_word(&skops->local_ip6[i]);
			remote[i] = ctx_word(&skops->remote_ip6[i]);
		}

		if (v4_mapped(remote)) {
			key.family = AF_INET;
			__builtin_memcpy(key.laddr, &local[3], 4);
			__builtin_memcpy(key.raddr, &remote[3], 4);
		} else {
			key.family = AF_INET6;
			__builtin_memcpy(key.laddr, local, 16);
			__builtin_memcpy(key.raddr, remote, 16);
		}
	} else {
		return 1;
	}
	cookie = bpf_get_socket_cookie(skops);
	owner = bpf_map_lookup_elem(&socket_owners, &cookie);
	if (owner)
		bpf_map_update_elem(&connection_owners, &key, owner, BPF_ANY);
	else
		bpf_map_delete_elem(&connection_owners, &key);
	return 1;
}
