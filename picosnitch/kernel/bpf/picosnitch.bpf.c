// SPDX-License-Identifier: GPL-2.0
/* picosnitch kernel side: counts application bytes per (process, executable, endpoint) in
 * counter cells and a flow map that user space drains, and reports process and DNS events through
 * a ring buffer.
 *
 * Hooks, each optional (user space disables what the kernel lacks and reports it):
 *   tp_btf/sock_send_length, sock_recv_length  bytes of every send/recv, in the caller's context
 *   tp_btf/tcp_rcv_space_adjust                TCP bytes received, by recvmsg, splice or any other
 *                                              reader (sock_recv_length leaves TCP to it); before
 *                                              kernel 6.2, tcp_rcv_space_adjust_compat instead
 *   tp_btf/inet_sock_set_state                 TCP receive baseline at connection set-up
 *   cgroup/sendmsg4|6, recvmsg4|6              the peer of unconnected UDP
 *   cgroup/sock_release                        retires a closing socket's counter cells
 *   tp_btf/sched_process_exec|fork|exit        the process table
 *   uprobe+uretprobe getaddrinfo               which name resolved to which addresses
 *   fexit/inet[6]_sendmsg|recvmsg              fallback for kernels before the sock tracepoints,
 *   fexit/inet_sendpage, packet_sendmsg|recvmsg  with sendfile/splice (before 6.5) and AF_PACKET
 */
#include "kernel_types.h"
#include <linux/bpf.h>
#include <asm/ptrace.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_endian.h>
#include "picosnitch.h"
#include "core_fixes.bpf.h"

#define AF_INET 2
#define AF_INET6 10
#define AF_UNIX 1
#define AF_KEY 15
#define AF_NETLINK 16
#define AF_PACKET 17
#define AF_ALG 38
#define IPPROTO_ICMP 1
#define IPPROTO_TCP 6
#define IPPROTO_UDP 17
#define IPPROTO_ICMPV6 58
#define IPPROTO_UDPLITE 136
#define SOCK_STREAM 1
#define SOCK_RAW 3
#define MSG_PEEK 2
#define SOCK_DONE 1
#define TCP_ESTABLISHED 1
#define EEXIST 17
#define X86_64_USER_CS 0x33  /* the code segment of 64-bit user mode (32-bit tasks: 0x23) */
#define X86_64_READ 0
#define X86_64_WRITE 1
#define X86_64_READV 19
#define X86_64_WRITEV 20
#define X86_64_SENDTO 44
#define X86_64_RECVFROM 45
#define X86_64_SENDMSG 46
#define X86_64_RECVMSG 47

char LICENSE[] SEC("license") = "GPL";

const volatile struct monitor_config cfg SEC(".rodata.config") = {};

/* Two flow maps, for bytes that have no counter cell (see below): the kernel fills the one of
 * generation drain.epoch & 1 while user space drains the other, so draining never races with an
 * increment. */
#define FLOW_MAP(name)                                  \
	struct {                                        \
		__uint(type, BPF_MAP_TYPE_HASH);        \
		__uint(max_entries, 65536);             \
		__type(key, struct flow_key);           \
		__type(value, struct flow_value);       \
	} name SEC(".maps")
FLOW_MAP(flows_0);
FLOW_MAP(flows_1);

/* Written by user space only (a whole value per drain): see struct drain_state. */
struct drain_state drain SEC(".data.drain") = {};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, LOSS_KINDS);
	__type(key, __u32);
	__type(value, __u64);
} losses SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 256 * 4096);
} events SEC(".maps");

/* DNS answers and first sends: a ring of their own, so that a burst of them never costs an exec event. */
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 256 * 1024);
} payloads SEC(".maps");

/* The records sent through the ring buffers, named here so that the object's BTF describes them:
 * user space checks its mirrors of them against it (kernel_monitor.check_boundary). */
const struct exec_event *btf_exec_event __attribute__((unused));
const struct fork_event *btf_fork_event __attribute__((unused));
const struct exit_event *btf_exit_event __attribute__((unused));
const struct dns_event *btf_dns_event __attribute__((unused));
const struct payload_event *btf_payload_event __attribute__((unused));

/* Counter cells: the counts of one process (or thread) on one socket under one flow key, in arrays
 * user space maps into its memory. A socket's state names its owners' cells, so a send or receive
 * adds to its cell with an array access and two atomics, instead of hashing a flow key. User space
 * reads the cells the dirty bitmap of the idle generation marks, so nothing has to visit the
 * sockets (which needs an iterator, and some kernels refuse those). A cell's key never changes
 * while the cell is in use: when the traffic's key changes (exec, new parent, uid or endpoint), the
 * owner retires the cell and takes another. Cell 0 is never handed out: it means "none". */
#define CELL_ARRAY(name, value_type)                    \
	struct {                                        \
		__uint(type, BPF_MAP_TYPE_ARRAY);       \
		__uint(map_flags, BPF_F_MMAPABLE);      \
		__uint(max_entries, 65536);             \
		__type(key, __u32);                     \
		__type(value, value_type);              \
	} name SEC(".maps")
CELL_ARRAY(cell_keys, struct flow_key);
CELL_ARRAY(cells_0, struct flow_value);
CELL_ARRAY(cells_1, struct flow_value);
CELL_ARRAY(dirty_0, __u64);  /* bit n of word n / 64: cell n has counts in this generation */
CELL_ARRAY(dirty_1, __u64);

/* Retired cells in the order they were retired, each waiting out CELL_QUARANTINE epochs. */
struct {
	__uint(type, BPF_MAP_TYPE_QUEUE);
	__uint(max_entries, 65536);
	__type(value, struct retired_cell);
} retired_cells SEC(".maps");

__u32 fresh_cells = 0;  /* cells handed out so far that were never used before */

/* Peer of the datagram a thread is sending or receiving on an unconnected UDP socket, left in the
 * socket's state by the cgroup hook and taken by the sock tracepoint that fires later in the same
 * syscall. `owner` (pid_tgid) pairs the two, one slot per thread, so threads sharing a socket keep
 * their own peers. Only when more threads than slots are between hook and tracepoint at once is
 * a slot overwritten: that datagram is counted without its peer rather than charged to a wrong
 * one. */
struct peer {
	__u64 owner;
	__u16 family;
	__u16 port;
	__u8 addr[16];
};

#define PEER_SLOTS 4  /* a power of two */
#define READ_ONCE(x) (*(volatile typeof(x) *)&(x))

/* One process (or, for datagrams with a named peer, one thread) on one socket, and the counter
 * cell its traffic goes to. */
struct owner_slot {
	__u32 owner;         /* tgid, or thread id | THREAD_OWNED; 0: free; claimed with compare-and-swap */
	__u32 cell;          /* 0: none yet, or none was free (then the flow map takes the bytes) */
	__u64 exe_file;      /* task->mm->exe_file when the cell's key was made */
	__u64 parent;        /* task->real_parent when the cell's key was made */
	__u32 failed_epoch;  /* epoch + 1 of the last time no cell was free: no new try until the next */
	__u32 _pad;
};

#define OWNER_SLOTS 2  /* owners sharing a socket beyond this use the flow map directly */
#define THREAD_OWNED 0x80000000u

#define SEQ_KNOWN 1    /* counted_seq holds */
#define FIRST_SEEN 2   /* the socket's first send was looked at for a name */

struct sock_state {
	__u32 counted_seq;  /* TCP: copied_seq up to which received bytes have been counted */
	__u16 flags;
	__u16 lport;        /* the local port, kept: the kernel zeroes it when a TCP socket closes */
	struct peer send_peers[PEER_SLOTS];
	struct peer recv_peers[PEER_SLOTS];
	struct owner_slot slots[OWNER_SLOTS];
};

struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct sock_state);
} sock_states SEC(".maps");

struct gai_call {
	__u64 node;  /* const char * in the caller */
	__u64 res;   /* struct addrinfo ** in the caller */
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u64);
	__type(value, struct gai_call);
} gai_calls SEC(".maps");

static __always_inline void count_loss(__u32 kind, __u64 n)
{
	__u64 *v = bpf_map_lookup_elem(&losses, &kind);
	if (v)
		__sync_fetch_and_add(v, n);
}

static __always_inline void fill_header(struct event_header *h, __u32 type, __u32 tgid)
{
	h->type = type;
	h->tgid = tgid;
	h->ktime_ns = bpf_ktime_get_boot_ns();
}

static __always_inline __u32 current_epoch(void)
{
	return READ_ONCE(drain.epoch);
}

static __always_inline void fill_endpoint(struct flow_key *key, struct sock *sk, struct sock_state *st,
					  const struct peer *peer)
{
	struct sock_common *c = &sk->__sk_common;
	__u16 type = sk->sk_type;

	key->netns = c->skc_net.net->ns.inum;
	key->family = c->skc_family;
	key->protocol = sk->sk_protocol;
	if (key->family == AF_INET) {
		__builtin_memcpy(key->laddr, &c->skc_rcv_saddr, 4);
		__builtin_memcpy(key->raddr, &c->skc_daddr, 4);
	} else if (key->family == AF_INET6) {
		BPF_CORE_READ_INTO(&key->laddr, c, skc_v6_rcv_saddr);
		BPF_CORE_READ_INTO(&key->raddr, c, skc_v6_daddr);
	} else {
		/* AF_PACKET and others: the protocol is all there is. packet_sock lies beyond struct sock,
		 * where only a probe read may go. */
		if (key->family == AF_PACKET)
			key->protocol = bpf_ntohs(BPF_CORE_READ((struct packet_sock *)sk, num));
		return;
	}
	/* Raw sockets keep the protocol number in skc_num and ICMP sockets an echo id: no ports. */
	if (type != SOCK_RAW && key->protocol != IPPROTO_ICMP && key->protocol != IPPROTO_ICMPV6) {
		key->lport = c->skc_num;
		if (st && !key->lport)  /* closed, with data still to read */
			key->lport = st->lport;
		else if (st && st->lport != key->lport)
			st->lport = key->lport;
		key->rport = bpf_ntohs(c->skc_dport);
	}
	if (peer && peer->family == key->family) {
		__builtin_memcpy(key->raddr, peer->addr, sizeof(key->raddr));
		key->rport = peer->port;
	}
}

static __always_inline void add_to_flow(const struct flow_key *key, const struct flow_value *add, __u32 epoch)
{
	void *flows = epoch & 1 ? (void *)&flows_1 : (void *)&flows_0;
	struct flow_value *v = bpf_map_lookup_elem(flows, key);

	if (!v) {
		long err = bpf_map_update_elem(flows, key, add, BPF_NOEXIST);

		if (!err)
			return;
		if (err != -EEXIST || !(v = bpf_map_lookup_elem(flows, key))) {
			count_loss(LOSS_FLOW_MAP_FULL, 1);
			count_loss(LOSS_FLOW_MAP_BYTES, add->bytes_sent + add->bytes_recv);
			return;
		}
	}
	__sync_fetch_and_add(&v->bytes_sent, add->bytes_sent);
	__sync_fetch_and_add(&v->bytes_recv, add->bytes_recv);
	__sync_fetch_and_add(&v->packets_sent, add->packets_sent);
	__sync_fetch_and_add(&v->packets_recv, add->packets_recv);
}

/* The task's real uid, as bpf_get_current_uid_gid() gives it (uids in the initial user namespace map
 * to themselves), read directly: the helper and its from_kuid() calls cost as much as all the rest
 * of a send's accounting. */
static __always_inline __u32 uid_of(struct task_struct *task)
{
	return task->cred->uid.val;
}

/* bpf_get_current_pid_tgid(), from the task already at hand instead of another helper call. */
static __always_inline __u64 pid_tgid_of(struct task_struct *task)
{
	return (__u64)task->tgid << 32 | (__u32)task->pid;
}

static __always_inline void fill_key(struct flow_key *key, struct task_struct *task, struct sock *sk,
				     struct sock_state *st, const struct peer *peer)
{
	struct inode *exe = task->mm->exe_file->f_inode;

	__builtin_memset(key, 0, sizeof(*key));
	key->tgid = task->tgid;
	key->ppid = task->real_parent->tgid;
	key->uid = uid_of(task);
	key->exe_ino = exe->i_ino;
	key->exe_dev = exe->i_sb->s_dev;
	key->exec_id = task->self_exec_id;
	__builtin_memcpy(key->comm, task->group_leader->comm, sizeof(key->comm));
	fill_endpoint(key, sk, st, peer);
}

/* A counter cell for a new key: one never used, else the longest retired if it has waited out its
 * quarantine; 0 when there is none. */
static __always_inline __u32 take_cell(__u32 epoch)
{
	struct retired_cell r;

	if (READ_ONCE(fresh_cells) < cfg.cells - 1) {
		__u32 fresh = __sync_fetch_and_add(&fresh_cells, 1) + 1;

		if (fresh < cfg.cells)
			return fresh;
	}
	if (bpf_map_pop_elem(&retired_cells, &r))
		return 0;
	if (epoch - r.epoch >= CELL_QUARANTINE)
		return r.cell;
	bpf_map_push_elem(&retired_cells, &r, 0);  /* too recent: back in line */
	return 0;
}

/* No socket will add to the cell any more; user space reads what it holds before it is reused. */
static __always_inline void retire_cell(__u32 cell, __u32 epoch)
{
	struct retired_cell r = {.cell = cell, .epoch = epoch};

	bpf_map_push_elem(&retired_cells, &r, 0);  /* cannot be full: it has room for every cell */
}

/* Retires the slot's cell, once, whichever of the threads sharing the slot gets here first. */
static __always_inline void release_cell(struct owner_slot *slot, __u32 cell, __u32 epoch)
{
	if (cell && __sync_val_compare_and_swap(&slot->cell, cell, 0) == cell)
		retire_cell(cell, epoch);
}

/* The owner's slot in the socket state, claiming a free one if needed (NULL: none left). */
static __always_inline struct owner_slot *slot_of(struct sock_state *st, __u32 owner)
{
	for (int i = 0; i < OWNER_SLOTS; i++) {
		struct owner_slot *slot = &st->slots[i];

		if (slot->owner == owner ||
		    (slot->owner == 0 && __sync_val_compare_and_swap(&slot->owner, 0, owner) == 0))
			return slot;
	}
	return NULL;
}

static __always_inline bool same16(const void *a, const void *b)
{
	const __u32 *x = a, *y = b;

	return x[0] == y[0] && x[1] == y[1] && x[2] == y[2] && x[3] == y[3];
}

/* Whether the key of the slot's cell still describes traffic of this task on this socket. */
static __always_inline bool key_current(const struct owner_slot *slot, const struct flow_key *key,
					struct task_struct *task, struct sock *sk, const struct peer *peer)
{
	struct sock_common *c = &sk->__sk_common;
	__u32 raddr4 = c->skc_daddr;

	const __u64 *comm = (const __u64 *)key->comm, *now = (const __u64 *)task->group_leader->comm;

	if (slot->exe_file != (__u64)task->mm->exe_file || slot->parent != (__u64)task->real_parent ||
	    key->uid != uid_of(task) || key->exec_id != (__u32)task->self_exec_id ||
	    comm[0] != now[0] || comm[1] != now[1])  /* renamed (prctl PR_SET_NAME) */
		return false;
	if (peer)
		return key->rport == peer->port && same16(key->raddr, peer->addr);
	if (key->family == AF_INET6) {
		struct in6_addr_k laddr = c->skc_v6_rcv_saddr, raddr = c->skc_v6_daddr;

		if (!same16(key->laddr, &laddr) || !same16(key->raddr, &raddr))
			return false;
	} else if (*(__u32 *)key->laddr != c->skc_rcv_saddr || *(__u32 *)key->raddr != raddr4) {
		return false;
	}
	/* A port of 0 in the socket: closed, and the key made while it was open still holds. */
	return key->lport == 0 || c->skc_num == 0 ||
	       (key->lport == c->skc_num && key->rport == bpf_ntohs(c->skc_dport));
}

/* The cell this task's traffic on this socket goes to: the slot's, while its key still holds, else
 * a new one with a new key; 0 when no cell is free. */
static __always_inline __u32 cell_for(struct owner_slot *slot, struct task_struct *task, struct sock *sk,
				      struct sock_state *st, const struct peer *peer, __u32 epoch)
{
	__u32 cell = READ_ONCE(slot->cell);
	struct flow_key *key;

	if (cell) {
		key = bpf_map_lookup_elem(&cell_keys, &cell);
		if (key && key_current(slot, key, task, sk, peer))
			return cell;
		release_cell(slot, cell, epoch);
	} else if (slot->failed_epoch == epoch + 1) {
		return 0;
	}
	cell = take_cell(epoch);
	key = cell ? bpf_map_lookup_elem(&cell_keys, &cell) : NULL;
	if (!key) {
		slot->failed_epoch = epoch + 1;
		return 0;
	}
	fill_key(key, task, sk, st, peer);
	slot->exe_file = (__u64)task->mm->exe_file;
	slot->parent = (__u64)task->real_parent;
	/* The key is complete before another thread of the owner can see the cell. */
	if (__sync_val_compare_and_swap(&slot->cell, 0, cell) != 0) {
		retire_cell(cell, epoch);  /* another thread gave the slot a cell meanwhile: use that one */
		cell = READ_ONCE(slot->cell);
	}
	return cell;
}

static __always_inline void mark_dirty(void *dirty, __u32 cell)
{
	__u32 word = cell / CELL_DIRTY_BITS;
	__u64 bit = 1ULL << (cell % CELL_DIRTY_BITS);
	__u64 *w = bpf_map_lookup_elem(dirty, &word);

	if (w && !(READ_ONCE(*w) & bit))
		__sync_fetch_and_or(w, bit);
}

static __always_inline bool local_only_family(__u16 family)
{
	return family == AF_UNIX || family == AF_NETLINK || family == AF_KEY || family == AF_ALG;
}

/* Adds bytes to the flow of the current task on socket sk. */
static __always_inline void account(struct task_struct *task, struct sock *sk, struct sock_state *st,
				    const struct peer *peer, __u64 bytes, bool sent)
{
	__u32 epoch = current_epoch(), cell = 0;
	struct flow_value *counts = NULL;
	struct owner_slot *slot = NULL;

	/* Datagrams with a named peer re-key their slot whenever the peer changes, and a re-key is
	 * not atomic against another thread's add: each thread keeps its own slot for them. */
	if (st && READ_ONCE(drain.cells_on))
		slot = slot_of(st, peer ? task->pid | THREAD_OWNED : task->tgid);
	if (slot)
		cell = cell_for(slot, task, sk, st, peer, epoch);
	if (cell)
		counts = bpf_map_lookup_elem(epoch & 1 ? (void *)&cells_1 : (void *)&cells_0, &cell);
	if (!counts) {
		struct flow_value add = {};
		struct flow_key key;

		if (sent) {
			add.bytes_sent = bytes;
			add.packets_sent = 1;
		} else {
			add.bytes_recv = bytes;
			add.packets_recv = 1;
		}
		fill_key(&key, task, sk, st, peer);
		add_to_flow(&key, &add, epoch);
		return;
	}
	if (sent) {
		__sync_fetch_and_add(&counts->bytes_sent, bytes);
		__sync_fetch_and_add(&counts->packets_sent, 1);
	} else {
		__sync_fetch_and_add(&counts->bytes_recv, bytes);
		__sync_fetch_and_add(&counts->packets_recv, 1);
	}
	mark_dirty(epoch & 1 ? (void *)&dirty_1 : (void *)&dirty_0, cell);
}

/* The state of an IP socket (created on first use), or NULL for other families. */
static __always_inline struct sock_state *state_of(struct sock *sk)
{
	__u16 family = sk->__sk_common.skc_family;
	struct sock_state *st;

	if (family != AF_INET && family != AF_INET6)
		return NULL;
	st = bpf_sk_storage_get(&sock_states, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!st)
		count_loss(LOSS_SOCKET_STORAGE, 1);
	return st;
}

static __always_inline bool is_udp(struct sock *sk)
{
	__u16 proto = sk->sk_protocol;
	__u16 family = sk->__sk_common.skc_family;

	return (family == AF_INET || family == AF_INET6) && (proto == IPPROTO_UDP || proto == IPPROTO_UDPLITE);
}

static __always_inline bool is_tcp(struct sock *sk)
{
	__u16 family = sk->__sk_common.skc_family;

	return (family == AF_INET || family == AF_INET6) && sk->sk_protocol == IPPROTO_TCP &&
	       sk->sk_type == SOCK_STREAM;
}

/* Takes the peer a cgroup hook left for this thread, if any, into *out. Runs outside the socket
 * lock, so a hook may overwrite the slot meanwhile; the hook stores the owner first, so reading
 * the owner again after the copy tells a whole peer from a torn one. */
static __always_inline bool take_peer(struct task_struct *task, struct peer *peers, struct peer *out)
{
	__u64 me = pid_tgid_of(task);

	for (__u32 n = 0; n < PEER_SLOTS; n++) {
		struct peer *p = &peers[((__u32)me + n) & (PEER_SLOTS - 1)];  /* leave_peer's order */

		if (READ_ONCE(p->owner) != me)
			continue;
		barrier();
		*out = *p;
		barrier();
		if (READ_ONCE(p->owner) != me)
			return false;
		p->owner = 0;
		return true;
	}
	return false;
}

/* The user-space buffer the current syscall sent from or received into, and its length: the buffer
 * of read/write/recvfrom/sendto, or the first iovec of readv/writev/recvmsg/sendmsg. 0 for every
 * other way of moving data (sendfile, splice, io_uring, sendmmsg, ...), and on architectures other
 * than x86_64, whose syscall registers this does not know. */
static __always_inline __u64 syscall_buffer(struct task_struct *task, bool sending, __u64 *len)
{
#ifdef __TARGET_ARCH_x86
	struct pt_regs *regs = (struct pt_regs *)bpf_task_pt_regs(task);
	unsigned long nr, cs, arg, count;
	__u64 iov[2];

	if (!regs || bpf_probe_read_kernel(&nr, sizeof(nr), &regs->orig_rax) ||
	    bpf_probe_read_kernel(&cs, sizeof(cs), &regs->cs) || cs != X86_64_USER_CS ||
	    bpf_probe_read_kernel(&arg, sizeof(arg), &regs->rsi) ||
	    bpf_probe_read_kernel(&count, sizeof(count), &regs->rdx))
		return 0;
	if (nr == (sending ? X86_64_WRITE : X86_64_READ) || nr == (sending ? X86_64_SENDTO : X86_64_RECVFROM)) {
		*len = count;
		return arg;
	}
	if (nr == (sending ? X86_64_SENDMSG : X86_64_RECVMSG)) {  /* struct msghdr: msg_iov at 16 */
		if (bpf_probe_read_user(&arg, sizeof(arg), (void *)(arg + 16)))
			return 0;
	} else if (nr != (sending ? X86_64_WRITEV : X86_64_READV)) {
		return 0;
	}
	if (bpf_probe_read_user(iov, sizeof(iov), (void *)arg))  /* struct iovec: base, len */
		return 0;
	*len = iov[1];
	return iov[0];
#else
	return 0;
#endif
}

/* Sends `len` bytes of the process's own buffer to user space, who parses the names in them. */
static __always_inline void send_payload(struct task_struct *task, struct sock *sk, struct sock_state *st,
					 const struct peer *peer, __u32 kind, __u64 buf, __u64 len)
{
	struct payload_event *e;

	if (!buf || !len)
		return;
	e = bpf_ringbuf_reserve(&payloads, sizeof(*e), 0);
	if (!e) {
		count_loss(LOSS_RINGBUF_PAYLOAD, 1);
		return;
	}
	fill_header(&e->h, EVENT_PAYLOAD, task->tgid);
	e->kind = kind;
	fill_key(&e->key, task, sk, st, peer);
	/* Up to PS_PAYLOAD_MAX - 1 bytes: a mask on the register passed is a bound every verifier keeps
	 * (6.1's loses a comparison's bound when the value is spilled to the stack and read back). The
	 * barrier keeps clang from dropping the mask as redundant after the comparison. */
	if (len >= PS_PAYLOAD_MAX)
		len = PS_PAYLOAD_MAX - 1;
	barrier_var(len);
	len &= PS_PAYLOAD_MAX - 1;
	if (bpf_probe_read_user(e->data, len, (void *)buf)) {
		bpf_ringbuf_discard(e, 0);
		return;
	}
	e->len = len;
	bpf_ringbuf_submit(e, 0);
}

/* Whether bytes a TCP connection starts with may name its server: a TLS handshake record holding
 * a ClientHello (SNI), or an HTTP/1 request (Host). */
static __always_inline bool may_name_server(const __u8 *b)
{
	__u32 word = b[0] | b[1] << 8 | b[2] << 16 | (__u32)b[3] << 24;

	if (b[0] == 0x16 && b[1] == 0x03 && b[5] == 0x01)
		return true;
	switch (word) {  /* the first four bytes of each method, little-endian */
	case 0x20544547:  /* "GET " */
	case 0x54534f50:  /* "POST" */
	case 0x20545550:  /* "PUT " */
	case 0x44414548:  /* "HEAD" */
	case 0x454c4544:  /* "DELE" */
	case 0x4954504f:  /* "OPTI" */
	case 0x43544150:  /* "PATC" */
	case 0x4e4e4f43:  /* "CONN" */
		return true;
	}
	return false;
}

/* A TCP socket's first send: its bytes go to user space if they may name the server. */
static __always_inline void look_at_first_send(struct task_struct *task, struct sock *sk, struct sock_state *st,
					       int ret)
{
	__u8 head[8] = {};
	__u64 len = 0, buf;

	st->flags |= FIRST_SEEN;
	buf = syscall_buffer(task, true, &len);
	if (ret < 6 || !buf || bpf_probe_read_user(head, 6, (void *)buf) || !may_name_server(head))
		return;
	send_payload(task, sk, st, NULL, PAYLOAD_FIRST_SEND, buf, len < (__u64)ret ? len : (__u64)ret);
}

/* A message received from port 53 (UDP, or TCP with its length prefix): to user space, which reads
 * the answers in it. */
static __always_inline void look_at_dns_answer(struct task_struct *task, struct sock *sk, struct sock_state *st,
					       const struct peer *peer, __u64 received)
{
	__u64 len = 0, buf = syscall_buffer(task, false, &len);

	send_payload(task, sk, st, peer, PAYLOAD_DNS_ANSWER, buf, len < received ? len : received);
}

static __always_inline __u16 remote_port(struct sock *sk, const struct peer *peer)
{
	return peer ? peer->port : bpf_ntohs(sk->__sk_common.skc_dport);
}

static __always_inline void on_send(struct sock *sk, int ret)
{
	struct task_struct *task;
	struct sock_state *st;
	struct peer peer = {};
	bool has_peer;

	if (local_only_family(sk->__sk_common.skc_family))
		return;
	task = bpf_get_current_task_btf();
	st = state_of(sk);
	has_peer = st && is_udp(sk) && take_peer(task, st->send_peers, &peer);
	if (ret <= 0)
		return;
	account(task, sk, st, has_peer ? &peer : NULL, ret, true);
	if (cfg.read_payloads && st && !(st->flags & FIRST_SEEN) && is_tcp(sk))
		look_at_first_send(task, sk, st, ret);
}

/* TCP data consumed so far, as a sequence number: copied_seq, less the FIN once read. */
static __always_inline __u32 tcp_consumed_seq(struct sock *sk, struct tcp_sock *tp)
{
	__u32 seq = tp->copied_seq;

	if ((sock_flags(sk) & (1UL << SOCK_DONE)) && seq == tp->rcv_nxt)
		seq -= 1;
	return seq;
}

/* Counts the TCP bytes the current task consumed since the last count on this socket. A socket
 * first seen here (opened before the monitor started) only sets the baseline. */
static __always_inline void tcp_count_consumed(struct sock *sk, struct tcp_sock *tp, struct sock_state *st)
{
	struct task_struct *task;
	__u32 seq;
	__s32 delta;

	if (!tp || !st)
		return;
	seq = tcp_consumed_seq(sk, tp);
	if (!(st->flags & SEQ_KNOWN)) {
		st->counted_seq = seq;
		st->flags |= SEQ_KNOWN;
		return;
	}
	delta = (__s32)(seq - st->counted_seq);
	if (delta <= 0)
		return;
	st->counted_seq = seq;
	task = bpf_get_current_task_btf();
	account(task, sk, st, NULL, delta, false);
	if (cfg.read_payloads && remote_port(sk, NULL) == 53)
		look_at_dns_answer(task, sk, st, NULL, delta);
}

static __always_inline void on_recv(struct sock *sk, int ret, int flags)
{
	struct task_struct *task;
	struct sock_state *st;
	struct peer peer = {};
	bool has_peer;

	/* TCP data is counted at tcp_rcv_space_adjust, which every reader of a TCP socket (recvmsg,
	 * splice, zero-copy receive, sockmap) calls under the socket lock right after it advances
	 * copied_seq. Counting here as well, outside the lock, could charge one reader's bytes to
	 * another that reads the same socket at the same time. */
	if (local_only_family(sk->__sk_common.skc_family) || (cfg.tcp_rx_by_seq && is_tcp(sk)))
		return;
	task = bpf_get_current_task_btf();
	st = state_of(sk);
	has_peer = st && is_udp(sk) && take_peer(task, st->recv_peers, &peer);
	if (ret <= 0 || (flags & MSG_PEEK))
		return;
	account(task, sk, st, has_peer ? &peer : NULL, ret, false);
	if (cfg.read_payloads && remote_port(sk, has_peer ? &peer : NULL) == 53 && is_udp(sk))
		look_at_dns_answer(task, sk, st, has_peer ? &peer : NULL, ret);
}

SEC("tp_btf/sock_send_length")
int BPF_PROG(sock_send_length, struct sock *sk, int ret, int flags)
{
	on_send(sk, ret);
	return 0;
}

SEC("tp_btf/sock_recv_length")
int BPF_PROG(sock_recv_length, struct sock *sk, int ret, int flags)
{
	on_recv(sk, ret, flags);
	return 0;
}

/* Fires in the reader's context, under the socket lock, after it consumed data: inside tcp_recvmsg,
 * and in tcp_read_sock, which splice() uses instead of recvmsg. */
SEC("tp_btf/tcp_rcv_space_adjust")
int BPF_PROG(tcp_rcv_space_adjust, struct sock *sk)
{
	/* Only TCP sockets get here, so a cast will do: bpf_rdonly_cast() costs no call, where
	 * bpf_skc_to_tcp_sock() made this program 10-17 ns slower per run. Reads through the cast
	 * pointer are fault-checked like any other. */
	tcp_count_consumed(sk, tcp_sk_cast(sk), state_of(sk));
	return 0;
}

/* Stand-in for tcp_rcv_space_adjust on kernels without bpf_rdonly_cast(): user space loads it
 * only when the kernel refuses that one. */
SEC("tp_btf/tcp_rcv_space_adjust")
int BPF_PROG(tcp_rcv_space_adjust_compat, struct sock *sk)
{
	tcp_count_consumed(sk, tcp_sk_checked(sk), state_of(sk));
	return 0;
}

/* The receive baseline of a new connection: nothing has been consumed yet. */
SEC("tp_btf/inet_sock_set_state")
int BPF_PROG(inet_sock_set_state, struct sock *sk, int oldstate, int newstate)
{
	struct sock_state *st;
	struct tcp_sock *tp;

	if (newstate != TCP_ESTABLISHED || !is_tcp(sk))
		return 0;
	st = state_of(sk);
	tp = tcp_sk_checked(sk);
	if (st && tp) {
		st->counted_seq = tcp_consumed_seq(sk, tp);
		st->flags |= SEQ_KNOWN;
		st->lport = sk->__sk_common.skc_num;
	}
	return 0;
}

/* A socket is closing: its owners' cells are retired, to be reused once user space has read them. */
SEC("cgroup/sock_release")
int sock_release(struct bpf_sock *sk)
{
	struct sock_state *st = bpf_sk_storage_get(&sock_states, sk, 0, 0);
	__u32 epoch = current_epoch();

	if (!st)
		return 1;
	for (int i = 0; i < OWNER_SLOTS; i++)
		release_cell(&st->slots[i], READ_ONCE(st->slots[i].cell), epoch);
	return 1;
}

/* Fallback for kernels without the sock tracepoints (before 6.3). It cannot run on kernels
 * without BPF trampolines, so it is untested where those are missing; it covers IPv4/IPv6
 * sockets only and misses sendfile/splice on kernels that send pages without sendmsg. */
SEC("fexit/inet_sendmsg")
int BPF_PROG(inet_sendmsg_exit, struct socket *sock, void *msg, __u64 size, int ret)
{
	on_send(sock->sk, ret);
	return 0;
}

SEC("fexit/inet6_sendmsg")
int BPF_PROG(inet6_sendmsg_exit, struct socket *sock, void *msg, __u64 size, int ret)
{
	on_send(sock->sk, ret);
	return 0;
}

SEC("fexit/inet_recvmsg")
int BPF_PROG(inet_recvmsg_exit, struct socket *sock, void *msg, __u64 size, int flags, int ret)
{
	on_recv(sock->sk, ret, flags);
	return 0;
}

SEC("fexit/inet6_recvmsg")
int BPF_PROG(inet6_recvmsg_exit, struct socket *sock, void *msg, __u64 size, int flags, int ret)
{
	on_recv(sock->sk, ret, flags);
	return 0;
}

/* Kernels before 6.5 send the pages of sendfile() and splice() into a TCP or UDP socket through
 * sendpage, not sendmsg. (Other protocols fall back to sendmsg there, so they are counted at
 * inet_sendmsg and not here.) */
SEC("fexit/inet_sendpage")
int BPF_PROG(inet_sendpage_exit, struct socket *sock, void *page, int offset, __u64 size, int flags, long ret)
{
	struct sock *sk = sock->sk;

	if (is_tcp(sk) || is_udp(sk))
		on_send(sk, ret);
	return 0;
}

/* AF_PACKET, which the inet fallback does not see. */
SEC("fexit/packet_sendmsg")
int BPF_PROG(packet_sendmsg_exit, struct socket *sock, void *msg, __u64 len, int ret)
{
	on_send(sock->sk, ret);
	return 0;
}

SEC("fexit/packet_recvmsg")
int BPF_PROG(packet_recvmsg_exit, struct socket *sock, void *msg, __u64 len, int flags, int ret)
{
	on_recv(sock->sk, ret, flags);
	return 0;
}

static __always_inline void leave_peer(struct bpf_sock_addr *ctx, bool sending, __u16 family, const __u32 *ip)
{
	struct bpf_sock *sk = ctx->sk;
	struct peer *peers, *p;
	struct sock_state *st;
	__u64 me;
	__u32 slot;

	/* A connected socket receives only from its peer, which the sock tracepoint reads from the
	 * socket itself (a send may still name another destination). */
	if (!sk || (!sending && sk->dst_port))
		return;
	st = bpf_sk_storage_get(&sock_states, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!st) {
		count_loss(LOSS_PEER_STORAGE, 1);
		return;
	}
	me = bpf_get_current_pid_tgid();
	peers = sending ? st->send_peers : st->recv_peers;
	/* The first slot that is free or this thread's, scanning from the thread's own (thread id %
	 * PEER_SLOTS, so one thread alone finds it at once); if none, that own slot, whose owner then
	 * loses a peer. Hooks on one socket run under its lock, so no two of them pick at once. */
	slot = (__u32)me;
	for (__u32 n = 0; n < PEER_SLOTS; n++) {
		__u64 owner = READ_ONCE(peers[((__u32)me + n) & (PEER_SLOTS - 1)].owner);

		if (!owner || owner == me) {
			slot = (__u32)me + n;
			break;
		}
	}
	p = &peers[slot & (PEER_SLOTS - 1)];
	READ_ONCE(p->owner) = me;  /* first: see take_peer */
	barrier();
	p->family = family;
	p->port = bpf_ntohs((__u16)ctx->user_port);
	__builtin_memcpy(p->addr, ip, 16);
}

SEC("cgroup/sendmsg4")
int sendmsg4(struct bpf_sock_addr *ctx)
{
	__u32 ip[4] = {ctx->user_ip4};

	leave_peer(ctx, true, AF_INET, ip);
	return 1;
}

SEC("cgroup/sendmsg6")
int sendmsg6(struct bpf_sock_addr *ctx)
{
	__u32 ip[4] = {ctx->user_ip6[0], ctx->user_ip6[1], ctx->user_ip6[2], ctx->user_ip6[3]};

	leave_peer(ctx, true, AF_INET6, ip);
	return 1;
}

SEC("cgroup/recvmsg4")
int recvmsg4(struct bpf_sock_addr *ctx)
{
	__u32 ip[4] = {ctx->user_ip4};

	leave_peer(ctx, false, AF_INET, ip);
	return 1;
}

SEC("cgroup/recvmsg6")
int recvmsg6(struct bpf_sock_addr *ctx)
{
	__u32 ip[4] = {ctx->user_ip6[0], ctx->user_ip6[1], ctx->user_ip6[2], ctx->user_ip6[3]};

	leave_peer(ctx, false, AF_INET6, ip);
	return 1;
}

/* An exec event is built here and only its used bytes are copied into the ring buffer. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct exec_event);
} exec_scratch SEC(".maps");

/* Bytes a bpf_probe_read_*_str into a buffer of PS_FILENAME_MAX used, NUL included (0 on failure),
 * masked so that every verifier keeps the bound (see send_payload). */
static __always_inline __u32 used_path_bytes(long n)
{
	if (n < 0)
		n = 0;
	barrier_var(n);
	return (__u32)n & (2 * PS_FILENAME_MAX - 1);
}

SEC("tp_btf/sched_process_exec")
int BPF_PROG(sched_process_exec, struct task_struct *p, int old_pid, struct linux_binprm *bprm)
{
	__u32 zero = 0, off, n;
	struct exec_event *e = bpf_map_lookup_elem(&exec_scratch, &zero);
	struct inode *inode = bprm->file->f_inode;
	unsigned long start, len;

	if (!e)
		return 0;
	fill_header(&e->h, EVENT_EXEC, p->tgid);
	e->ppid = p->real_parent->tgid;
	e->uid = (__u32)bpf_get_current_uid_gid();
	e->exe_ino = inode->i_ino;
	e->exe_dev = inode->i_sb->s_dev;
	e->exec_id = p->self_exec_id;
	inode = p->fs->pwd.dentry->d_inode;
	e->cwd_ino = inode->i_ino;
	e->cwd_dev = inode->i_sb->s_dev;
	inode = p->fs->root.dentry->d_inode;
	e->root_ino = inode->i_ino;
	e->root_dev = inode->i_sb->s_dev;
	bpf_get_current_comm(e->comm, sizeof(e->comm));
	off = used_path_bytes(bpf_probe_read_kernel_str(e->strings, PS_FILENAME_MAX, bprm->interp));
	e->filename_len = off;
	n = used_path_bytes(bpf_probe_read_kernel_str(e->strings + off, PS_FILENAME_MAX, bprm->filename));
	e->path_len = n;
	off += n;
	e->_pad = 0;

	/* Up to PS_ARGS_MAX - 1 bytes: a power-of-two mask is what the verifier accepts as a bound. */
	start = p->mm->arg_start;
	len = p->mm->arg_end - start;
	e->args_truncated = len >= PS_ARGS_MAX;
	if (len >= PS_ARGS_MAX)
		len = PS_ARGS_MAX - 1;
	barrier_var(len);
	len &= PS_ARGS_MAX - 1;
	if (bpf_probe_read_user(e->strings + off, len, (void *)start))
		len = 0;
	e->args_len = len;
	if (bpf_ringbuf_output(&events, e, offsetof(struct exec_event, strings) + off + len, 0))
		count_loss(LOSS_RINGBUF_EXEC, 1);
	return 0;
}

SEC("tp_btf/sched_process_fork")
int BPF_PROG(sched_process_fork, struct task_struct *parent, struct task_struct *child)
{
	struct fork_event *e;

	if (child->pid != child->tgid)  /* a new thread, not a new process */
		return 0;
	e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
	if (!e) {
		count_loss(LOSS_RINGBUF_OTHER, 1);
		return 0;
	}
	fill_header(&e->h, EVENT_FORK, child->tgid);
	e->ppid = child->real_parent->tgid;
	e->_pad = 0;
	bpf_ringbuf_submit(e, 0);
	return 0;
}

SEC("tp_btf/sched_process_exit")
int BPF_PROG(sched_process_exit, struct task_struct *p)
{
	struct exit_event *e;

	if (p->signal->live.counter != 0)  /* other threads of the process still run */
		return 0;
	e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
	if (!e) {
		count_loss(LOSS_RINGBUF_OTHER, 1);
		return 0;
	}
	fill_header(&e->h, EVENT_EXIT, p->tgid);
	bpf_ringbuf_submit(e, 0);
	return 0;
}

/* glibc's struct addrinfo on 64-bit: ai_family at 4, ai_addr at 24, ai_next at 40. */
#define AI_FAMILY 4
#define AI_ADDR 24
#define AI_NEXT 40
#define SIN_ADDR 4
#define SIN6_ADDR 8

SEC("uprobe")
int BPF_KPROBE(getaddrinfo_enter, const char *node, const char *service, const void *hints, void **res)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct gai_call call = {.node = (__u64)node, .res = (__u64)res};

	bpf_map_update_elem(&gai_calls, &id, &call, BPF_ANY);
	return 0;
}

SEC("uretprobe")
int BPF_KRETPROBE(getaddrinfo_exit, int ret)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct gai_call *call = bpf_map_lookup_elem(&gai_calls, &id);
	struct dns_event *e;
	__u64 ai = 0, addr;

	if (!call)
		return 0;
	if (ret != 0 || !call->node)
		goto out;
	e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
	if (!e) {
		count_loss(LOSS_RINGBUF_OTHER, 1);
		goto out;
	}
	__builtin_memset(e, 0, sizeof(*e));
	fill_header(&e->h, EVENT_DNS, id >> 32);
	bpf_probe_read_user_str(e->name, sizeof(e->name), (void *)call->node);
	bpf_probe_read_user(&ai, sizeof(ai), (void *)call->res);
	/* Every entry as it comes, duplicates included (user space drops them): an index that only
	 * grows with the loop keeps the verifier's work small, a count of distinct addresses did not. */
	for (int i = 0; i < PS_DNS_ENTRIES_MAX && ai; i++) {
		struct dns_address *a = &e->addrs[i];
		__s32 family = 0;

		bpf_probe_read_user(&family, sizeof(family), (void *)(ai + AI_FAMILY));
		bpf_probe_read_user(&addr, sizeof(addr), (void *)(ai + AI_ADDR));
		if (family == AF_INET && !bpf_probe_read_user(a->addr, 4, (void *)(addr + SIN_ADDR)))
			a->family = family;
		else if (family == AF_INET6 && !bpf_probe_read_user(a->addr, 16, (void *)(addr + SIN6_ADDR)))
			a->family = family;
		e->count = i + 1;
		bpf_probe_read_user(&ai, sizeof(ai), (void *)(ai + AI_NEXT));
	}
	bpf_ringbuf_submit(e, 0);
out:
	bpf_map_delete_elem(&gai_calls, &id);
	return 0;
}
