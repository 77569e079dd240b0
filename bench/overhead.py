"""What the kernel monitor costs: loopback throughput with its BPF programs attached vs. detached,
measured side by side in one run, and each program's cost per invocation. Prints figures;
asserts nothing.

    python3 -m bench.overhead [--seconds 3] [--rounds 5] [--markdown] [--no-stats] [--workload tcp1k ...]

Run as root from the repository root, after `make -C picosnitch/kernel/bpf`. Needs gcc: the traffic
generator is a small C program compiled at run time, since Python would be the bottleneck and
hide the cost being measured.

Each workload runs a forked sender and a receiver over 127.0.0.1 for --seconds (after a short
warm-up), once detached and once attached per round; the order alternates between rounds
(AB, BA, ...) so a drift in the machine's load falls on both modes alike. The figure is the
receiver's throughput; the ratio is median(attached) / median(detached). While attached, a
thread polls and drains the monitor every DRAIN_INTERVAL as the daemon does, and
kernel.bpf_stats_enabled is 1 so the kernel times every program run (this adds two clock reads
per run to the attached figures; --no-stats leaves it off and skips the per-invocation table).
The monitor is loaded afresh for every attached run, which also samples its load time.

The generator also reports each side's CPU time while counting, so the bench prints the CPU time
per write/datagram of the sender and of the receiver. Other jobs taking turns on the CPUs change
the throughput much more than these times: "ratio if CPU-bound" (the busier side's time, detached
over attached) estimates the throughput ratio of an otherwise idle machine.

--programs empty attaches, instead of the monitor, programs that return at once on the same
per-packet hooks (sock_send_length, sock_recv_length, tcp_rcv_space_adjust, cgroup sendmsg/recvmsg):
the cost of the hooks themselves, which no work in the programs can remove.

--peer nethogs adds a third mode to every round: nethogs (libpcap) watching the loopback interface
instead of our programs, on the same workload, so both ratios come from one run. --compare-names
adds the monitor with "Names from traffic" off (no DNS answers or first sends read): what reading
them costs, side by side.
"""

import argparse
import contextlib
import ctypes
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from picosnitch.kernel import libbpf
from picosnitch.kernel.monitor import DRAIN_INTERVAL, KernelMonitor, cgroup2_root

BPF_STATS_SYSCTL = "/proc/sys/kernel/bpf_stats_enabled"
WARMUP_SECONDS = 0.3
LOAD_TARGET_SECONDS = 1.0


@dataclass(frozen=True)
class Workload:
    name: str  # for --workload
    label: str
    short: str
    protocol: str  # "tcp" or "udp"
    size: int  # bytes per write or datagram
    target: float  # attached/detached throughput ratio to reach


WORKLOADS = (
    Workload("tcp128k", "bulk TCP, 128 KiB writes", "TCP 128K", "tcp", 128 * 1024, 0.97),
    Workload("tcp1k", "TCP, 1 KiB writes", "TCP 1K", "tcp", 1024, 0.95),
    Workload("udp64", "UDP, 64-byte datagrams", "UDP 64", "udp", 64, 0.95),
)

GENERATOR_C = r"""
/* Loopback traffic for bench/overhead.py.
 *   gen tcp|udp SIZE WARMUP SECONDS
 * A forked child writes SIZE bytes at a time on a TCP connection, or sends SIZE-byte datagrams
 * with sendto() on an unconnected UDP socket, to 127.0.0.1 as fast as it can. The parent
 * receives (recvfrom() with the source address for UDP) and, after WARMUP seconds, counts for
 * SECONDS, then prints one line:
 *   <bytes counted> <seconds counted> <bytes in all> <seconds in all> <writes sent while counting>
 *   <receiver CPU seconds while counting> <sender CPU seconds while counting>
 * CPU seconds are the thread's run time (CLOCK_THREAD_CPUTIME_ID), which includes the softirq
 * work done on its behalf (the loopback delivery runs in the sender's context).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

/* Shared with the sender: it counts its writes and notes its CPU time when the phase changes. */
struct shared {
	volatile uint64_t sent;
	volatile int phase;  /* 0 warm-up, 1 counting, 2 done */
	volatile double cpu[3];  /* sender CPU time seen at the start of each phase; 0 until seen */
};

static double clock_s(clockid_t id)
{
	struct timespec ts;

	clock_gettime(id, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static double now(void)
{
	return clock_s(CLOCK_MONOTONIC);
}

static void die(const char *what)
{
	perror(what);
	exit(1);
}

static void send_forever(int tcp, const struct sockaddr_in *to, size_t size, struct shared *sh)
{
	char *buf = calloc(1, size);
	int fd = socket(AF_INET, tcp ? SOCK_STREAM : SOCK_DGRAM, 0), seen = 0;

	if (fd < 0 || !buf)
		die("sender socket");
	if (tcp && connect(fd, (const struct sockaddr *)to, sizeof(*to)))
		die("connect");
	for (;;) {
		ssize_t n = tcp ? write(fd, buf, size)
				: sendto(fd, buf, size, 0, (const struct sockaddr *)to, sizeof(*to));
		if (n > 0)
			sh->sent += 1; /* the only writer; the parent just reads it */
		else if (tcp)
			exit(0);
		if (sh->phase != seen) {
			seen = sh->phase;
			sh->cpu[seen] = clock_s(CLOCK_THREAD_CPUTIME_ID);
		}
	}
}

/* gen ... one-thread: the sender and the receiver take turns in this thread (TCP: 64 KiB of writes
 * per turn, then reads until they have arrived; UDP: one datagram, received with its source
 * address as in the two-process run), so the run measures CPU time per operation with no waiting
 * and no wake-ups. Prints the same line, with the thread's CPU time as the sender's and 0 as the
 * receiver's. */
static void one_thread(int tcp, int ls, const struct sockaddr_in *to, size_t size, double warmup, double seconds)
{
	size_t batch = tcp ? (65536 + size - 1) / size : 1, k, bufsize = batch * size;
	int big = 4 << 20, s = socket(AF_INET, tcp ? SOCK_STREAM : SOCK_DGRAM, 0), fd = ls, counting = 0;
	uint64_t total = 0, counted = 0, writes = 0, writes0 = 0;
	double start = now(), t = start, t0 = 0, cpu0 = 0;
	unsigned turns = 0;
	char *out = calloc(1, size), *in = malloc(bufsize);

	if (s < 0 || !out || !in)
		die("one-thread socket");
	if (tcp && (setsockopt(s, SOL_SOCKET, SO_SNDBUF, &big, sizeof(big)) ||
		    connect(s, (const struct sockaddr *)to, sizeof(*to)) || (fd = accept(ls, NULL, NULL)) < 0 ||
		    setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &big, sizeof(big))))
		die("one-thread connection");
	for (;;) {
		size_t got = 0;

		for (k = 0; k < batch; k++, writes++)
			if ((tcp ? write(s, out, size) : sendto(s, out, size, 0, (const struct sockaddr *)to, sizeof(*to))) <= 0)
				die("send");
		while (got < bufsize) {
			struct sockaddr_in from;
			socklen_t fromlen = sizeof(from);
			ssize_t n = tcp ? read(fd, in, bufsize - got)
					: recvfrom(fd, in, bufsize, 0, (struct sockaddr *)&from, &fromlen);

			if (n <= 0)
				die("receive");
			got += n;
		}
		total += got;
		if (counting)
			counted += got;
		if (tcp || (++turns & 31) == 0) {
			t = now();
			if (!counting && t >= start + warmup) {
				counting = 1;
				t0 = t;
				cpu0 = clock_s(CLOCK_THREAD_CPUTIME_ID);
				writes0 = writes;
			} else if (counting && t >= start + warmup + seconds) {
				break;
			}
		}
	}
	printf("%llu %.6f %llu %.6f %llu 0 %.6f\n", (unsigned long long)counted, t - t0, (unsigned long long)total,
	       t - start, (unsigned long long)(writes - writes0), clock_s(CLOCK_THREAD_CPUTIME_ID) - cpu0);
	exit(0);
}

int main(int argc, char **argv)
{
	struct sockaddr_in addr = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
	struct sockaddr_in from;
	socklen_t len = sizeof(addr), fromlen;
	struct timeval timeout = {.tv_sec = 5};
	struct shared *sh;
	uint64_t total = 0, counted = 0, sent_at_begin = 0, sent_at_end = 0;
	double start, begin, end, t, t0 = 0, t1 = 0, cpu0 = 0, cpu1 = 0;
	int tcp, ls, fd, counting = 0;
	size_t size, bufsize;
	unsigned calls = 0;
	pid_t child;
	char *buf;

	if (argc != 5 && !(argc == 6 && !strcmp(argv[5], "one-thread"))) {
		fprintf(stderr, "usage: %s tcp|udp SIZE WARMUP SECONDS [one-thread]\n", argv[0]);
		return 2;
	}
	tcp = !strcmp(argv[1], "tcp");
	size = strtoul(argv[2], NULL, 10);
	ls = socket(AF_INET, tcp ? SOCK_STREAM : SOCK_DGRAM, 0);
	if (ls < 0 || bind(ls, (struct sockaddr *)&addr, len) || getsockname(ls, (struct sockaddr *)&addr, &len))
		die("receiver socket");
	if (tcp && listen(ls, 1))
		die("listen");
	if (argc == 6)
		one_thread(tcp, ls, &addr, size, atof(argv[3]), atof(argv[4]));
	sh = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	if (sh == MAP_FAILED)
		die("mmap");
	child = fork();
	if (child < 0)
		die("fork");
	if (child == 0) {
		prctl(PR_SET_PDEATHSIG, SIGKILL);
		close(ls);
		send_forever(tcp, &addr, size, sh);
	}
	fd = tcp ? accept(ls, NULL, NULL) : ls;
	if (fd < 0)
		die("accept");
	setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof(timeout));
	bufsize = tcp ? 256 * 1024 : 65536;
	buf = malloc(bufsize);
	start = now();
	begin = start + atof(argv[3]);
	end = begin + atof(argv[4]);
	t = start;
	/* After the count, keep receiving until the sender has noted its CPU time: a TCP sender
	 * blocked on a full socket would not get to it otherwise. */
	while (counting < 2 || (sh->cpu[2] == 0 && now() < t1 + 2)) {
		ssize_t n;

		if (tcp) {
			n = read(fd, buf, bufsize);
		} else {
			fromlen = sizeof(from);
			n = recvfrom(fd, buf, bufsize, 0, (struct sockaddr *)&from, &fromlen);
		}
		if (n <= 0)
			die("receive");
		total += n;
		if (counting == 1)
			counted += n;
		if (counting < 2 && (tcp || (++calls & 31) == 0)) {
			t = now();
			if (!counting && t >= begin) {
				counting = 1;
				t0 = t;
				cpu0 = clock_s(CLOCK_THREAD_CPUTIME_ID);
				sent_at_begin = sh->sent;
				sh->phase = 1;
			} else if (counting && t >= end) {
				counting = 2;
				t1 = t;
				cpu1 = clock_s(CLOCK_THREAD_CPUTIME_ID);
				sent_at_end = sh->sent;
				sh->phase = 2;
			}
		}
	}
	printf("%llu %.6f %llu %.6f %llu %.6f %.6f\n", (unsigned long long)counted, t1 - t0, (unsigned long long)total,
	       now() - start, (unsigned long long)(sent_at_end - sent_at_begin), cpu1 - cpu0,
	       sh->cpu[2] && sh->cpu[1] ? sh->cpu[2] - sh->cpu[1] : 0.0);
	kill(child, SIGKILL);
	waitpid(child, NULL, 0);
	return 0;
}
"""

EMPTY_HOOKS_C = r"""
/* The kernel monitor's per-packet hooks with programs that return at once, for
 * bench/overhead.py --programs empty: what attaching alone costs on this kernel. */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

char LICENSE[] SEC("license") = "GPL";

#define NOTHING(section, name, ret) SEC(section) int name(void *ctx) { return ret; }
NOTHING("tp_btf/sock_send_length", sock_send_length, 0)
NOTHING("tp_btf/sock_recv_length", sock_recv_length, 0)
NOTHING("tp_btf/tcp_rcv_space_adjust", tcp_rcv_space_adjust, 0)
NOTHING("cgroup/sendmsg4", sendmsg4, 1)
NOTHING("cgroup/sendmsg6", sendmsg6, 1)
NOTHING("cgroup/recvmsg4", recvmsg4, 1)
NOTHING("cgroup/recvmsg6", recvmsg6, 1)
"""


# --- traffic ---

@dataclass
class Traffic:
    counted_bytes: int
    counted_seconds: float
    total_bytes: int
    total_seconds: float
    writes_sent: int
    receiver_cpu: float  # seconds, while counting
    sender_cpu: float

    @property
    def rate(self) -> float:
        """Bytes per second received while counting."""
        return self.counted_bytes / self.counted_seconds

    def cpu_ns(self, size: int) -> Tuple[float, float]:
        """CPU time per write/datagram: (sender, receiver). The receiver's is per `size` bytes received."""
        return 1e9 * self.sender_cpu / self.writes_sent, 1e9 * self.receiver_cpu * size / self.counted_bytes


def build_generator(directory: str) -> str:
    source = os.path.join(directory, "overhead_gen.c")
    binary = os.path.join(directory, "overhead_gen")
    with open(source, "w") as f:
        f.write(GENERATOR_C)
    try:
        subprocess.run(["gcc", "-O2", "-Wall", "-o", binary, source], check=True)
    except FileNotFoundError:
        sys.exit("gcc is needed to build the traffic generator: apt-get install gcc")
    return binary


def build_empty_hooks(directory: str) -> str:
    source = os.path.join(directory, "empty_hooks.bpf.c")
    binary = os.path.join(directory, "empty_hooks.bpf.o")
    with open(source, "w") as f:
        f.write(EMPTY_HOOKS_C)
    multiarch = subprocess.run(["gcc", "-print-multiarch"], capture_output=True, text=True).stdout.strip()
    try:
        subprocess.run(["clang", "-target", "bpf", "-O2", "-g", "-Wall", *([f"-I/usr/include/{multiarch}"] * bool(multiarch)),
                        "-c", source, "-o", binary], check=True)
    except FileNotFoundError:
        sys.exit("clang is needed to build the empty programs: apt-get install clang libbpf-dev")
    return binary


def run_traffic(generator: str, workload: Workload, seconds: float, one_thread: bool = False) -> Traffic:
    """The generator's run; one_thread: sender and receiver take turns in one thread pinned to one CPU."""
    command = [generator, workload.protocol, str(workload.size), str(WARMUP_SECONDS), str(seconds)]
    if one_thread:
        command = ["taskset", "-c", str(os.cpu_count() - 1), *command, "one-thread"]
    out = subprocess.run(command, check=True, capture_output=True, text=True, timeout=seconds + WARMUP_SECONDS + 60)
    counted, counted_s, total, total_s, sent, receiver_cpu, sender_cpu = out.stdout.split()
    return Traffic(int(counted), float(counted_s), int(total), float(total_s), int(sent), float(receiver_cpu),
                   float(sender_cpu))


# --- program statistics (struct bpf_prog_info, the head of it up to the run statistics) ---

class ProgInfo(ctypes.Structure):
    u32, u64 = ctypes.c_uint32, ctypes.c_uint64
    _fields_ = [("type", u32), ("id", u32), ("tag", ctypes.c_uint8 * 8), ("jited_prog_len", u32),
                ("xlated_prog_len", u32), ("jited_prog_insns", u64), ("xlated_prog_insns", u64),
                ("load_time", u64), ("created_by_uid", u32), ("nr_map_ids", u32), ("map_ids", u64),
                ("name", ctypes.c_char * 16), ("ifindex", u32), ("gpl_compatible", u32), ("netns_dev", u64),
                ("netns_ino", u64), ("nr_jited_ksyms", u32), ("nr_jited_func_lens", u32), ("jited_ksyms", u64),
                ("jited_func_lens", u64), ("btf_id", u32), ("func_info_rec_size", u32), ("func_info", u64),
                ("nr_func_info", u32), ("nr_line_info", u32), ("line_info", u64), ("jited_line_info", u64),
                ("nr_jited_line_info", u32), ("line_info_rec_size", u32), ("jited_line_info_rec_size", u32),
                ("nr_prog_tags", u32), ("prog_tags", u64), ("run_time_ns", u64), ("run_cnt", u64),
                ("recursion_misses", u64)]


def _declare_extra() -> ctypes.CDLL:
    lib = libbpf.lib()
    lib.bpf_program__fd.restype, lib.bpf_program__fd.argtypes = ctypes.c_int, [ctypes.c_void_p]
    lib.bpf_obj_get_info_by_fd.restype = ctypes.c_int
    lib.bpf_obj_get_info_by_fd.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint32)]
    lib.bpf_prog_get_next_id.restype = ctypes.c_int
    lib.bpf_prog_get_next_id.argtypes = [ctypes.c_uint32, ctypes.POINTER(ctypes.c_uint32)]
    lib.bpf_prog_get_fd_by_id.restype, lib.bpf_prog_get_fd_by_id.argtypes = ctypes.c_int, [ctypes.c_uint32]
    return lib


def prog_info(fd: int) -> Optional[ProgInfo]:
    info = ProgInfo()
    size = ctypes.c_uint32(ctypes.sizeof(info))
    if _declare_extra().bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size)) < 0:
        return None
    return info


def loaded_programs(monitor: KernelMonitor) -> Dict[str, int]:
    """Name -> fd of every program of the monitor's object that is loaded (and so attached)."""
    lib = _declare_extra()
    found = {}
    for prog in monitor.obj.programs():
        fd = lib.bpf_program__fd(prog.ptr)
        if fd >= 0:
            found[prog.name] = fd
    return found


def run_stats(fds: Dict[str, int]) -> Dict[str, Tuple[int, int]]:
    """Name -> (run_cnt, run_time_ns) so far."""
    stats = {}
    for name, fd in fds.items():
        info = prog_info(fd)
        if info is not None:
            stats[name] = (info.run_cnt, info.run_time_ns)
    return stats


def other_monitors(ours: Dict[str, int]) -> int:
    """How many other picosnitch monitors (anyone's, e.g. a test run) have programs loaded now:
    their hooks would slow both modes alike and blur the ratio."""
    lib = _declare_extra()
    own_ids = {info.id for info in map(prog_info, ours.values()) if info}
    kernel_name = b"sock_send_length"[:15]  # names are cut to BPF_OBJ_NAME_LEN - 1
    count, current, following = 0, 0, ctypes.c_uint32()
    while lib.bpf_prog_get_next_id(current, ctypes.byref(following)) == 0:
        current = following.value
        fd = lib.bpf_prog_get_fd_by_id(current)
        if fd < 0:
            continue
        try:
            info = prog_info(fd)
            if info and info.name == kernel_name and info.id not in own_ids:
                count += 1
        finally:
            os.close(fd)
    return count


class BpfStats:
    """Sets kernel.bpf_stats_enabled for a while and puts back what was there."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.saved: Optional[str] = None

    def __enter__(self):
        if self.enabled:
            with open(BPF_STATS_SYSCTL) as f:
                self.saved = f.read().strip()
            with open(BPF_STATS_SYSCTL, "w") as f:
                f.write("1")
        return self

    def __exit__(self, *exc):
        if self.saved is not None:
            with open(BPF_STATS_SYSCTL, "w") as f:
                f.write(self.saved)
            self.saved = None


# --- the monitor, run as the daemon runs it ---

class Drainer:
    """Polls and drains the monitor every DRAIN_INTERVAL in a thread, keeping the losses."""

    def __init__(self, monitor: KernelMonitor):
        self.monitor = monitor
        self.flows = 0
        self.losses: List = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while not self.stop.is_set():
            self.monitor.poll(DRAIN_INTERVAL)
            self.flows += len(self.monitor.drain())
            self.losses += self.monitor.losses()

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        self.flows += len(self.monitor.drain_all())
        self.losses += self.monitor.losses()


class EmptyHooks:
    """The monitor's per-packet hooks with programs that do nothing (--programs empty): attached in
    place of the monitor, they show the part of its cost that no program can avoid."""

    def __init__(self, object_path: str):
        self.obj = libbpf.BpfObject(object_path)

    def start(self) -> List:
        self.obj.load()
        cgroup = os.open(cgroup2_root(), os.O_RDONLY | os.O_DIRECTORY)
        try:
            for prog in self.obj.programs():
                self.obj.keep_link(prog.attach_cgroup(cgroup) if prog.section.startswith("cgroup/") else prog.attach())
        finally:
            os.close(cgroup)
        return []

    def close(self) -> None:
        self.obj.close()


# --- the rounds ---

class NethogsPeer:
    """nethogs in trace mode on the loopback interface, as a user would run it, for one run."""

    def __enter__(self) -> "NethogsPeer":
        self.proc = subprocess.Popen(["nethogs", "-t", "-a", "-d", "1", "lo"], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        time.sleep(1.0)  # until its capture is open
        if self.proc.poll() is not None:
            sys.exit("nethogs exited at once: is it installed (apt-get install nethogs)?")
        return self

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


MODES = ("detached", "monitor", "nethogs", "no-names")


@dataclass
class Results:
    rates: Dict[Tuple[str, str], List[float]] = field(default_factory=dict)  # (workload, mode)
    writes_per_s: Dict[Tuple[str, str], List[float]] = field(default_factory=dict)
    cpu_ns: Dict[Tuple[str, str], List[Tuple[float, float]]] = field(default_factory=dict)  # (sender, receiver)
    stats: Dict[Tuple[str, str], List[int]] = field(default_factory=dict)  # (workload, prog) -> [cnt, ns]
    attached_seconds: Dict[str, float] = field(default_factory=dict)  # workload -> traffic seconds
    load_seconds: List[float] = field(default_factory=list)
    degraded: List = field(default_factory=list)
    losses: List = field(default_factory=list)
    others_seen: int = 0  # runs during which another monitor was loaded
    started: str = field(default_factory=lambda: time.strftime("%Y-%m-%d %H:%M %Z"))


def run_once(generator: str, workload: Workload, mode: str, args: argparse.Namespace, results: Results,
             empty_hooks: Optional[str]) -> None:
    """One run in one mode: detached, monitor (the monitor, or with empty_hooks, an object path, the
    empty programs), or nethogs."""
    stats = not args.no_stats
    attached = mode in ("monitor", "no-names")
    monitor = drainer = None
    peer = NethogsPeer() if mode == "nethogs" else contextlib.nullcontext()
    try:
        if attached and empty_hooks:
            monitor = EmptyHooks(empty_hooks)
            monitor.start()
            fds = loaded_programs(monitor)
        elif attached:
            monitor = KernelMonitor(names_from_traffic=mode == "monitor")
            results.degraded = monitor.start()
            results.load_seconds.append(monitor.load_seconds)
            fds = loaded_programs(monitor)
            drainer = Drainer(monitor)
        else:
            fds = {}
        if other_monitors(fds):
            results.others_seen += 1
        with BpfStats(attached and stats), peer:
            before = run_stats(fds)
            traffic = run_traffic(generator, workload, args.seconds, args.one_thread)
            after = run_stats(fds)
    finally:
        if drainer:
            drainer.close()
            results.losses += drainer.losses
        if monitor:
            monitor.close()
    key = (workload.label, mode)
    attached = mode == "monitor"  # the per-invocation figures are the monitor's with names on
    results.rates.setdefault(key, []).append(traffic.rate)
    results.writes_per_s.setdefault(key, []).append(traffic.writes_sent / traffic.counted_seconds)
    if traffic.sender_cpu > 0:  # 0: the sender did not get to note its CPU time
        results.cpu_ns.setdefault(key, []).append(traffic.cpu_ns(workload.size))
    if attached and stats:
        results.attached_seconds[workload.label] = (results.attached_seconds.get(workload.label, 0.0)
                                                    + traffic.total_seconds)
        for name, (cnt, ns) in after.items():
            cnt0, ns0 = before.get(name, (0, 0))
            total = results.stats.setdefault((workload.label, name), [0, 0])
            total[0] += cnt - cnt0
            total[1] += ns - ns0


def run(args: argparse.Namespace) -> Results:
    results = Results()
    with tempfile.TemporaryDirectory(prefix="picosnitch-bench-") as tmp:
        generator = build_generator(tmp)
        empty_hooks = build_empty_hooks(tmp) if args.programs == "empty" else None
        modes = modes_of(args)
        for r in range(args.rounds):
            for workload in chosen(args):
                order = modes[r % len(modes):] + modes[:r % len(modes)]  # each mode leads in turn
                for mode in order:
                    run_once(generator, workload, mode, args, results, empty_hooks)
                last = {m: results.rates[(workload.label, m)][-1] for m in modes}
                print(f"  round {r + 1}/{args.rounds}  {workload.label:<26} " + "  ".join(
                    f"{m} {mib(last[m]):>9}" + (f" ({last[m] / last['detached']:.3f})" if m != "detached" else "")
                    for m in modes), file=sys.stderr, flush=True)
    return results


def modes_of(args: argparse.Namespace) -> List[str]:
    return ["detached", "monitor"] + (["nethogs"] if args.peer == "nethogs" else []) + (
        ["no-names"] if args.compare_names else [])


def chosen(args: argparse.Namespace) -> List[Workload]:
    return [w for w in WORKLOADS if not args.workload or w.name in args.workload]


# --- reporting ---

def mib(rate: float) -> str:
    return f"{rate / 2**20:,.0f} MiB/s"


def per_second(rate: float) -> str:
    return f"{rate / 1e3:,.0f}k" if rate >= 10e3 else f"{rate:,.1f}"


def rate_text(workload: Workload, rate: float, writes: float) -> str:
    return f"{mib(rate)} ({writes / 1e3:,.0f}k writes/s)" if workload.protocol == "tcp" else \
        f"{mib(rate)} ({rate / workload.size / 1e3:,.0f}k dgrams/s)"


def tables(results: Results, args: argparse.Namespace) -> Dict[str, Tuple[List[str], List[List[str]]]]:
    """Title -> (header, rows) of each table to print."""
    throughput = []
    peer = args.peer == "nethogs"
    for w in chosen(args):
        off, on = results.rates[(w.label, "detached")], results.rates[(w.label, "monitor")]
        ratio = statistics.median(on) / statistics.median(off)
        paired = [a / b for a, b in zip(on, off)]
        added = 1e9 * w.size * (1 / statistics.median(on) - 1 / statistics.median(off))
        row = [
            w.label,
            rate_text(w, statistics.median(off), statistics.median(results.writes_per_s[(w.label, "detached")])),
            rate_text(w, statistics.median(on), statistics.median(results.writes_per_s[(w.label, "monitor")])),
            f"{ratio:.3f}", f"{statistics.median(paired):.3f} ({min(paired):.3f}–{max(paired):.3f})",
            f"{added:+,.0f}", f"≥ {w.target:.2f}", "yes" if ratio >= w.target else f"no (−{w.target - ratio:.3f})"]
        for mode in ("nethogs", "no-names"):
            if (w.label, mode) in results.rates:
                other = results.rates[(w.label, mode)]
                row += [f"{statistics.median(other) / statistics.median(off):.3f}",
                        f"{statistics.median([a / b for a, b in zip(other, off)]):.3f}"]
        throughput.append(row)
    extra = (["nethogs ratio", "nethogs per-round median"] if peer else []) + (
        ["names off ratio", "names off per-round median"] if args.compare_names else [])
    out = {"Throughput (median of the rounds; received bytes)": (
        ["workload", "detached", "attached", "ratio", "per-round ratios: median (range)", "ns added per write",
         "target", "met"] + extra, throughput)}

    cpu = []
    for w in chosen(args):
        sides = [[statistics.median(ns[i] for ns in results.cpu_ns.get((w.label, m), [(0, 0)]))
                  for m in ("detached", "monitor")] for i in (0, 1)][:1 if args.one_thread else 2]
        busiest = [max(side[m] for side in sides) for m in (0, 1)]
        cpu.append([w.label] + [f"{off:,.0f} → {on:,.0f} ({on - off:+,.0f})" for off, on in sides]
                   + [f"{busiest[0] / busiest[1]:.3f}" if busiest[1] else "–"])
    out["CPU time per write/datagram, ns (median of the rounds; detached → attached)"] = (
        ["workload", *(["send + receive, one thread"] if args.one_thread else ["sender", "receiver"]),
         "ratio if CPU-bound"], cpu)

    loads = results.load_seconds
    if loads:
        out["Load time (KernelMonitor.load_seconds: open, load, attach)"] = (
            ["loads", "first", "median", "max", "target", "met"],
            [[str(len(loads)), f"{loads[0]:.3f} s", f"{statistics.median(loads):.3f} s", f"{max(loads):.3f} s",
              f"< {LOAD_TARGET_SECONDS:.0f} s", "yes" if max(loads) < LOAD_TARGET_SECONDS else
              ("median only" if statistics.median(loads) < LOAD_TARGET_SECONDS else "no")]])

    if not args.no_stats:
        rows = []
        for w in chosen(args):
            seconds = results.attached_seconds[w.label]
            writes = statistics.median(results.writes_per_s[(w.label, "monitor")])
            per_write = 0.0
            for (label, name), (cnt, ns) in sorted(results.stats.items(), key=lambda kv: -kv[1][1]):
                if label != w.label or cnt == 0:
                    continue
                per_write += ns / seconds / writes
                rows.append([w.short, name, per_second(cnt / seconds), f"{ns / cnt:,.0f}",
                             f"{100 * ns / seconds / 1e9:.1f} %"])
            rows.append([w.short, "all programs, per write/datagram sent", "", f"{per_write:,.0f}", ""])
        out["Cost per invocation (kernel.bpf_stats_enabled, summed over the attached runs)"] = (
            ["workload", "program", "runs/s", "ns/run", "CPU (of one)"], rows)
    return out


def print_plain(title: str, header: List[str], rows: List[List[str]]) -> None:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    print(f"\n{title}")
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))


def print_markdown(title: str, header: List[str], rows: List[List[str]]) -> None:
    print(f"\n{title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


def report(results: Results, args: argparse.Namespace) -> None:
    print(f"\nKernel monitor overhead: {args.rounds} rounds × {args.seconds:g} s per mode, "
          f"{os.cpu_count()} CPUs, kernel {platform.release()}, started {results.started}, "
          f"bpf stats {'off' if args.no_stats else 'on'} while attached")
    if args.programs == "empty":
        print("attached: programs that return at once, on the monitor's per-packet hooks (not the monitor)")
    if results.degraded:
        print("degraded hooks: " + "; ".join(str(d) for d in results.degraded))
    if results.losses:
        print("kernel losses while attached: " + "; ".join(f"{l.what} {l.count}" for l in results.losses))
    if results.others_seen:
        print(f"warning: another picosnitch monitor was loaded during {results.others_seen} run(s); "
              "its hooks slow both modes and blur the ratio")
    made = tables(results, args)
    for title, (header, rows) in made.items():
        print_plain(title, header, rows)
    if args.markdown:
        for title, (header, rows) in made.items():
            print_markdown(f"**{title}**", header, rows)


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python3 -m bench.overhead", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="traffic per run (default 3)")
    parser.add_argument("--rounds", type=int, default=5, help="attached/detached pairs per workload (default 5)")
    parser.add_argument("--markdown", action="store_true", help="also print the tables as markdown")
    parser.add_argument("--workload", action="append", choices=[w.name for w in WORKLOADS],
                        help="run only this workload (repeatable; default: all)")
    parser.add_argument("--programs", choices=("monitor", "empty"), default="monitor",
                        help="what to attach: the monitor (default), or programs that return at once on the "
                             "same per-packet hooks, to measure what the hooks cost before any work")
    parser.add_argument("--one-thread", action="store_true",
                        help="sender and receiver take turns in one thread on one CPU: CPU time per operation "
                             "without waiting or wake-ups, the steadiest figure on a busy machine")
    parser.add_argument("--peer", choices=("nethogs",),
                        help="also run every workload with this peer watching the traffic instead of our programs")
    parser.add_argument("--compare-names", action="store_true",
                        help="also run the monitor with names from traffic off, side by side")
    parser.add_argument("--no-stats", action="store_true",
                        help="leave kernel.bpf_stats_enabled alone (no per-invocation table)")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        sys.exit("run as root: the benchmark loads the BPF programs")
    if args.peer and not shutil.which(args.peer):
        sys.exit(f"{args.peer} is not installed: apt-get install {args.peer}")
    report(run(args), args)


if __name__ == "__main__":
    main()
