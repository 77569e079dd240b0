"""What the kernel monitor costs: loopback throughput with its BPF programs attached vs. detached,
measured side by side in one run, and each program's cost per invocation. Prints figures;
asserts nothing.

    python3 -m bench.overhead [--seconds 3] [--rounds 5] [--markdown] [--no-stats]

Run as root from the repository root, after `make -C picosnitch/bpf`. Needs gcc: the traffic
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
"""

import argparse
import ctypes
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from picosnitch import libbpf
from picosnitch.kernel_monitor import DRAIN_INTERVAL, KernelMonitor

BPF_STATS_SYSCTL = "/proc/sys/kernel/bpf_stats_enabled"
WARMUP_SECONDS = 0.3
LOAD_TARGET_SECONDS = 1.0


@dataclass(frozen=True)
class Workload:
    label: str
    short: str
    protocol: str  # "tcp" or "udp"
    size: int  # bytes per write or datagram
    target: float  # attached/detached throughput ratio to reach


WORKLOADS = (
    Workload("bulk TCP, 128 KiB writes", "TCP 128K", "tcp", 128 * 1024, 0.97),
    Workload("TCP, 1 KiB writes", "TCP 1K", "tcp", 1024, 0.90),
    Workload("UDP, 64-byte datagrams", "UDP 64", "udp", 64, 0.93),
)

GENERATOR_C = r"""
/* Loopback traffic for bench/overhead.py.
 *   gen tcp|udp SIZE WARMUP SECONDS
 * A forked child writes SIZE bytes at a time on a TCP connection, or sends SIZE-byte datagrams
 * with sendto() on an unconnected UDP socket, to 127.0.0.1 as fast as it can. The parent
 * receives (recvfrom() with the source address for UDP) and, after WARMUP seconds, counts for
 * SECONDS, then prints one line:
 *   <bytes counted> <seconds counted> <bytes in all> <seconds in all> <writes sent while counting>
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

static double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void die(const char *what)
{
	perror(what);
	exit(1);
}

static void send_forever(int tcp, const struct sockaddr_in *to, size_t size, volatile uint64_t *sent)
{
	char *buf = calloc(1, size);
	int fd = socket(AF_INET, tcp ? SOCK_STREAM : SOCK_DGRAM, 0);

	if (fd < 0 || !buf)
		die("sender socket");
	if (tcp && connect(fd, (const struct sockaddr *)to, sizeof(*to)))
		die("connect");
	for (;;) {
		ssize_t n = tcp ? write(fd, buf, size)
				: sendto(fd, buf, size, 0, (const struct sockaddr *)to, sizeof(*to));
		if (n > 0)
			*sent += 1; /* the only writer; the parent just reads it */
		else if (tcp)
			exit(0);
	}
}

int main(int argc, char **argv)
{
	struct sockaddr_in addr = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
	struct sockaddr_in from;
	socklen_t len = sizeof(addr), fromlen;
	struct timeval timeout = {.tv_sec = 5};
	volatile uint64_t *sent;
	uint64_t total = 0, counted = 0, sent_at_begin = 0;
	double start, begin, end, t, t0 = 0;
	int tcp, ls, fd, counting = 0;
	size_t size, bufsize;
	unsigned calls = 0;
	pid_t child;
	char *buf;

	if (argc != 5) {
		fprintf(stderr, "usage: %s tcp|udp SIZE WARMUP SECONDS\n", argv[0]);
		return 2;
	}
	tcp = !strcmp(argv[1], "tcp");
	size = strtoul(argv[2], NULL, 10);
	ls = socket(AF_INET, tcp ? SOCK_STREAM : SOCK_DGRAM, 0);
	if (ls < 0 || bind(ls, (struct sockaddr *)&addr, len) || getsockname(ls, (struct sockaddr *)&addr, &len))
		die("receiver socket");
	if (tcp && listen(ls, 1))
		die("listen");
	sent = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	if (sent == MAP_FAILED)
		die("mmap");
	child = fork();
	if (child < 0)
		die("fork");
	if (child == 0) {
		prctl(PR_SET_PDEATHSIG, SIGKILL);
		close(ls);
		send_forever(tcp, &addr, size, sent);
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
	for (;;) {
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
		if (counting)
			counted += n;
		if (tcp || (++calls & 31) == 0) {
			t = now();
			if (!counting && t >= begin) {
				counting = 1;
				t0 = t;
				sent_at_begin = *sent;
			} else if (counting && t >= end) {
				break;
			}
		}
	}
	printf("%llu %.6f %llu %.6f %llu\n", (unsigned long long)counted, t - t0, (unsigned long long)total,
	       t - start, (unsigned long long)(*sent - sent_at_begin));
	kill(child, SIGKILL);
	waitpid(child, NULL, 0);
	return 0;
}
"""


# --- traffic ---

@dataclass
class Traffic:
    counted_bytes: int
    counted_seconds: float
    total_bytes: int
    total_seconds: float
    writes_sent: int

    @property
    def rate(self) -> float:
        """Bytes per second received while counting."""
        return self.counted_bytes / self.counted_seconds


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


def run_traffic(generator: str, workload: Workload, seconds: float) -> Traffic:
    out = subprocess.run([generator, workload.protocol, str(workload.size), str(WARMUP_SECONDS), str(seconds)],
                         check=True, capture_output=True, text=True, timeout=seconds + WARMUP_SECONDS + 60)
    counted, counted_s, total, total_s, sent = out.stdout.split()
    return Traffic(int(counted), float(counted_s), int(total), float(total_s), int(sent))


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


# --- the rounds ---

@dataclass
class Results:
    rates: Dict[Tuple[str, bool], List[float]] = field(default_factory=dict)  # (workload, attached)
    writes_per_s: Dict[Tuple[str, bool], List[float]] = field(default_factory=dict)
    stats: Dict[Tuple[str, str], List[int]] = field(default_factory=dict)  # (workload, prog) -> [cnt, ns]
    attached_seconds: Dict[str, float] = field(default_factory=dict)  # workload -> traffic seconds
    load_seconds: List[float] = field(default_factory=list)
    degraded: List = field(default_factory=list)
    losses: List = field(default_factory=list)
    others_seen: int = 0  # runs during which another monitor was loaded
    started: str = field(default_factory=lambda: time.strftime("%Y-%m-%d %H:%M %Z"))


def run_once(generator: str, workload: Workload, seconds: float, attached: bool, stats: bool,
             results: Results) -> None:
    monitor = drainer = None
    try:
        if attached:
            monitor = KernelMonitor()
            results.degraded = monitor.start()
            results.load_seconds.append(monitor.load_seconds)
            fds = loaded_programs(monitor)
            drainer = Drainer(monitor)
        else:
            fds = {}
        if other_monitors(fds):
            results.others_seen += 1
        with BpfStats(attached and stats):
            before = run_stats(fds)
            traffic = run_traffic(generator, workload, seconds)
            after = run_stats(fds)
    finally:
        if drainer:
            drainer.close()
            results.losses += drainer.losses
        if monitor:
            monitor.close()
    key = (workload.label, attached)
    results.rates.setdefault(key, []).append(traffic.rate)
    results.writes_per_s.setdefault(key, []).append(traffic.writes_sent / traffic.counted_seconds)
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
        for r in range(args.rounds):
            for workload in WORKLOADS:
                order = (False, True) if r % 2 == 0 else (True, False)
                for attached in order:
                    run_once(generator, workload, args.seconds, attached, not args.no_stats, results)
                last = {m: results.rates[(workload.label, m)][-1] for m in (False, True)}
                print(f"  round {r + 1}/{args.rounds}  {workload.label:<26} detached {mib(last[False]):>9}  "
                      f"attached {mib(last[True]):>9}  ratio {last[True] / last[False]:.3f}",
                      file=sys.stderr, flush=True)
    return results


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
    for w in WORKLOADS:
        off, on = results.rates[(w.label, False)], results.rates[(w.label, True)]
        ratio = statistics.median(on) / statistics.median(off)
        paired = [a / b for a, b in zip(on, off)]
        added = 1e9 * w.size * (1 / statistics.median(on) - 1 / statistics.median(off))
        throughput.append([
            w.label,
            rate_text(w, statistics.median(off), statistics.median(results.writes_per_s[(w.label, False)])),
            rate_text(w, statistics.median(on), statistics.median(results.writes_per_s[(w.label, True)])),
            f"{ratio:.3f}", f"{statistics.median(paired):.3f} ({min(paired):.3f}–{max(paired):.3f})",
            f"{added:+,.0f}", f"≥ {w.target:.2f}", "yes" if ratio >= w.target else f"no (−{w.target - ratio:.3f})"])
    out = {"Throughput (median of the rounds; received bytes)": (
        ["workload", "detached", "attached", "ratio", "per-round ratios: median (range)", "ns added per write",
         "target", "met"], throughput)}

    loads = results.load_seconds
    out["Load time (KernelMonitor.load_seconds: open, load, attach)"] = (
        ["loads", "first", "median", "max", "target", "met"],
        [[str(len(loads)), f"{loads[0]:.3f} s", f"{statistics.median(loads):.3f} s", f"{max(loads):.3f} s",
          f"< {LOAD_TARGET_SECONDS:.0f} s", "yes" if max(loads) < LOAD_TARGET_SECONDS else
          ("median only" if statistics.median(loads) < LOAD_TARGET_SECONDS else "no")]])

    if not args.no_stats:
        rows = []
        for w in WORKLOADS:
            seconds = results.attached_seconds[w.label]
            writes = statistics.median(results.writes_per_s[(w.label, True)])
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
    parser.add_argument("--no-stats", action="store_true",
                        help="leave kernel.bpf_stats_enabled alone (no per-invocation table)")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        sys.exit("run as root: the benchmark loads the BPF programs")
    report(run(args), args)


if __name__ == "__main__":
    main()
