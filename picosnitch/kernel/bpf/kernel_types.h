/* The few kernel types the programs read, declared by hand instead of a generated vmlinux.h.
 * preserve_access_index makes every field access a CO-RE relocation: libbpf finds the real
 * offsets in the running kernel's BTF at load time, so only the fields named here matter
 * and their order and the structs' sizes do not.
 */
#ifndef PICOSNITCH_KERNEL_TYPES_H
#define PICOSNITCH_KERNEL_TYPES_H

#include <linux/types.h>
#include <stdbool.h>

typedef __u8 u8;
typedef __u16 u16;
typedef __u32 u32;
typedef __u64 u64;
typedef __s32 s32;

#pragma clang attribute push (__attribute__((preserve_access_index)), apply_to = record)

struct ns_common { unsigned int inum; };
struct net { struct ns_common ns; };
typedef struct { struct net *net; } possible_net_t;

struct in6_addr_k { u8 s6_addr[16]; };

struct sock_common {
	__be32 skc_daddr;
	__be32 skc_rcv_saddr;
	__be16 skc_dport;
	u16 skc_num;
	unsigned short skc_family;
	possible_net_t skc_net;
	struct in6_addr_k skc_v6_daddr;
	struct in6_addr_k skc_v6_rcv_saddr;
	unsigned long skc_flags;  /* sk_flags: SOCK_DONE, ... */
};

struct sock {
	struct sock_common __sk_common;
	u16 sk_protocol;
	u16 sk_type;
};

struct tcp_sock {
	u32 copied_seq;
	u32 rcv_nxt;
};

struct socket { struct sock *sk; };

struct packet_sock { __be16 num; };  /* AF_PACKET: the ethertype it was opened or bound for */


struct super_block { u32 s_dev; };
struct inode { unsigned long i_ino; struct super_block *i_sb; };
struct file { struct inode *f_inode; };
struct dentry { struct inode *d_inode; };
struct path { struct dentry *dentry; };
struct fs_struct { struct path root; struct path pwd; };

struct mm_struct {
	unsigned long arg_start;
	unsigned long arg_end;
	struct file *exe_file;
};

typedef struct { int counter; } atomic_t;
typedef struct { u32 val; } kuid_t;
struct cred { kuid_t uid; };
struct signal_struct { atomic_t live; };

struct task_struct {
	int pid;
	int tgid;
	u64 self_exec_id;  /* u64 since 5.7 */
	struct task_struct *real_parent;
	struct task_struct *group_leader;
	struct mm_struct *mm;
	struct signal_struct *signal;
	const struct cred *cred;
	struct fs_struct *fs;
	char comm[16];
};

struct linux_binprm {
	struct file *file;
	const char *filename;  /* the path given to execve */
	const char *interp;    /* the file actually executed: the interpreter, for scripts */
};

#pragma clang attribute pop

#endif
