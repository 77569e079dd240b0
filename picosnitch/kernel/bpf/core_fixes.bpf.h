/* What differs between the kernels picosnitch runs on, each behind a named accessor that says which
 * kernels it covers (after libbpf-tools' core_fixes.bpf.h). Where a difference needs a whole other
 * program (a hook the kernel lacks), the program is named here with the kernels it is for, and
 * kernel_monitor.py's feature probe decides which one is loaded.
 *
 *   sock_send_length, sock_recv_length   tracepoints since 6.3; before, fexit on inet[6]_sendmsg and
 *                                        inet[6]_recvmsg (bytes_fallback in kernel/monitor.py), on
 *                                        inet_sendpage (sendfile and splice, until 6.5 removed
 *                                        sendpage) and on packet_sendmsg|recvmsg (AF_PACKET)
 *   tcp_rcv_space_adjust                 casts with bpf_rdonly_cast(), a kfunc since 6.2; before,
 *                                        tcp_rcv_space_adjust_compat uses bpf_skc_to_tcp_sock()
 */
#ifndef PICOSNITCH_CORE_FIXES_H
#define PICOSNITCH_CORE_FIXES_H

#include "kernel_types.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>

/* Kernel 6.2 and later: a type cast the verifier turns into a register move. Weak, so that on an
 * older kernel only the program using it is refused. */
extern void *bpf_rdonly_cast(const void *obj, __u32 btf_id) __ksym __weak;

/* The tcp_sock of a socket known to be TCP, without a helper call: kernels 6.2 and later. */
static __always_inline struct tcp_sock *tcp_sk_cast(struct sock *sk)
{
	return bpf_rdonly_cast(sk, bpf_core_type_id_kernel(struct tcp_sock));
}

/* The same with the helper, which also checks the socket's type: every kernel since 5.9, 10-17 ns
 * slower per call than the cast. */
static __always_inline struct tcp_sock *tcp_sk_checked(struct sock *sk)
{
	return bpf_skc_to_tcp_sock(sk);
}

/* sk_flags (SOCK_DONE, ...). `#define sk_flags __sk_common.skc_flags` on every kernel with BTF. */
static __always_inline unsigned long sock_flags(struct sock *sk)
{
	return sk->__sk_common.skc_flags;
}

#endif
