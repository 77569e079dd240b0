/* Structures shared by the kernel programs (picosnitch.bpf.c) and user space
 * (picosnitch/kernel_records.py mirrors every one of them with ctypes: keep both in step).
 * All fields are fixed-width and laid out without implicit padding.
 */
#ifndef PICOSNITCH_H
#define PICOSNITCH_H

#define PS_FILENAME_MAX 512
#define PS_ARGS_MAX 4096  /* argv captured at exec; longer command lines are read from /proc */
/* The strings of an exec event: two paths and argv. Each offset is bounded for the verifier by a
 * mask of twice PS_FILENAME_MAX, so the buffer is what those masks allow, not what is used. */
#define PS_EXEC_STRINGS_MAX (2 * 2 * PS_FILENAME_MAX + PS_ARGS_MAX)
#define PS_COMM_MAX 16
#define PS_DNS_NAME_MAX 256
#define PS_DNS_ENTRIES_MAX 24  /* getaddrinfo results read; glibc gives one per socket type, 3 per address */
#define PS_PAYLOAD_MAX 2048    /* bytes of a DNS answer or of a TCP connection's first send read */

/* One flow: who (process and executable) talked to whom (endpoint) in which network namespace.
 * IPv4 addresses occupy the first 4 bytes of laddr/raddr. Ports are in host byte order. */
struct flow_key {
	__u32 tgid;
	__u32 ppid;      /* tgid of real_parent at the time of the traffic */
	__u32 uid;
	__u32 netns;     /* inode number of the socket's network namespace */
	__u64 exe_ino;   /* mm->exe_file inode */
	__u32 exe_dev;   /* superblock s_dev, kernel encoding (MAJOR<<20 | MINOR) */
	__u16 family;    /* AF_INET, AF_INET6, AF_PACKET, ... */
	__u16 protocol;  /* sk_protocol: IPPROTO_* or, for AF_PACKET, the ethertype */
	__u16 lport;
	__u16 rport;
	__u32 exec_id;   /* task->self_exec_id: which exec of tgid the traffic came from (fork keeps it) */
	__u8 laddr[16];
	__u8 raddr[16];
	char comm[PS_COMM_MAX];  /* the process's name (its thread group leader's comm) when it sent */
};

/* Bytes are application payload; "packets" count the send/receive operations that moved them. */
struct flow_value {
	__u64 bytes_sent;
	__u64 bytes_recv;
	__u64 packets_sent;
	__u64 packets_recv;
};

/* Everything the kernel had to drop, by reason: user space reports each non-zero count. */
enum loss_kind {
	LOSS_RINGBUF_EXEC = 0,  /* exec events lost: ring buffer full */
	LOSS_RINGBUF_OTHER,     /* fork/exit/dns events lost: ring buffer full */
	LOSS_FLOW_MAP_FULL,     /* flow records not stored: flow map full */
	LOSS_FLOW_MAP_BYTES,    /* bytes carried by those records */
	LOSS_PEER_STORAGE,      /* unconnected-UDP peers not stored: socket storage failed */
	LOSS_SOCKET_STORAGE,    /* TCP receive counts not stored: socket storage failed */
	LOSS_RINGBUF_PAYLOAD,   /* DNS answers and first sends not read: payload ring buffer full */
	LOSS_KINDS,
};

/* Settings written into .rodata.config before the object is loaded. */
struct monitor_config {
	__u32 tcp_rx_by_seq;  /* TCP receive bytes from copied_seq (catches splice) instead of recvmsg */
	__u32 cells;          /* counter cells (entries of cell_keys, cells_0 and cells_1), a multiple of 64 */
	__u32 read_payloads;  /* read names from DNS answers and TCP connections' first sends */
	__u32 _pad;
};

/* The drain's state, shared with user space (section .data.drain). The kernel adds to the counter
 * cells and flow map of generation epoch & 1; user space reads the other generation, which has
 * been idle for a whole drain interval, then increments the epoch. */
struct drain_state {
	__u32 epoch;
	__u32 cells_on;  /* set by user space once sock_release is attached and the cells are mapped */
};

/* A counter cell no socket uses any more, and the epoch it was retired in: it may be handed out
 * again once user space has read both generations since (epoch + CELL_QUARANTINE). */
struct retired_cell {
	__u32 cell;
	__u32 epoch;
};

#define CELL_QUARANTINE 3
#define CELL_DIRTY_BITS 64  /* cells per word of the dirty bitmaps */

enum event_type {
	EVENT_EXEC = 1,
	EVENT_FORK = 2,
	EVENT_EXIT = 3,
	EVENT_DNS = 4,
	EVENT_PAYLOAD = 5,
};

enum payload_kind {
	PAYLOAD_DNS_ANSWER = 1,  /* a message from port 53, as the process received it */
	PAYLOAD_FIRST_SEND = 2,  /* the first bytes a TCP socket sent: a TLS ClientHello or an HTTP request */
};

struct event_header {
	__u32 type;
	__u32 tgid;
	__u64 ktime_ns;  /* bpf_ktime_get_boot_ns() */
};

/* An exec. Only the fixed fields and the used bytes of strings[] cross the ring buffer (the
 * sample's size says how many), so a typical exec costs a few hundred bytes of the ring, not
 * the 6 KiB of the whole struct: a burst of execs is what fills it. */
struct exec_event {
	struct event_header h;
	__u32 ppid;
	__u32 uid;
	__u64 exe_ino;
	__u32 exe_dev;
	__u32 args_len;  /* bytes of argv (NUL-separated) in strings[], after the two paths */
	__u32 args_truncated;
	__u32 exec_id;   /* task->self_exec_id after this exec */
	__u64 cwd_ino;   /* the working directory and root at exec: a relative script path is resolved */
	__u32 cwd_dev;   /* in the cwd, an absolute one in the root, and the process may change either */
	__u32 root_dev;  /* right after (zsh walks up its cwd to name it), before the monitor reads them */
	__u64 root_ino;
	char comm[PS_COMM_MAX];
	__u16 filename_len;  /* bytes of strings[] from 0, NUL included: the file executed (the interpreter, for #! scripts) */
	__u16 path_len;      /* bytes after those, NUL included: the path given to execve (the script, for #! scripts) */
	__u32 _pad;
	char strings[PS_EXEC_STRINGS_MAX];  /* filename, path, argv, each right after the other */
};

struct fork_event {
	struct event_header h;
	__u32 ppid;
	__u32 _pad;
};

struct exit_event {
	struct event_header h;
};

struct dns_address {
	__u32 family;
	__u8 addr[16];
};

struct dns_event {
	struct event_header h;
	__u32 count;
	__u32 _pad;
	char name[PS_DNS_NAME_MAX];
	struct dns_address addrs[PS_DNS_ENTRIES_MAX];  /* family 0: not an IP address */
};

/* The process that connected, sent or bound on a socket last (socket_owners.bpf.c, guard mode). */
struct socket_owner {
	__u32 tgid;
	__u32 uid;
	__u64 exe_ino;
	__u32 exe_dev;   /* kernel encoding, as flow_key's */
	__u32 _pad;
};

/* An outgoing TCP connection as its first packet names it (socket_owners.bpf.c, guard mode): the
 * owner of the connection is found by what the queued SYN carries, without asking sock_diag.
 * IPv4 (and IPv4-mapped IPv6) addresses occupy the first 4 bytes; ports in host byte order. */
struct connection_key {
	__u16 family;   /* AF_INET or AF_INET6: the family of the packets, not of the socket */
	__u16 lport;
	__u16 rport;
	__u16 _pad;
	__u8 laddr[16];
	__u8 raddr[16];
};

/* Bytes a process sent or received, read from its own buffer in the syscall that moved them: user
 * space parses the names in them (DNS answers, TLS SNI, HTTP Host). */
struct payload_event {
	struct event_header h;
	__u32 kind;   /* enum payload_kind */
	__u32 len;    /* bytes of data used */
	struct flow_key key;  /* who, and on which endpoint */
	__u8 data[PS_PAYLOAD_MAX];
};

#endif
