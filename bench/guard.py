"""Guard mode's cost: new connections decided per second, and bulk TCP throughput on an
established connection, with the guard on and off side by side. Prints figures; asserts nothing.

    sudo python3 -m bench.guard [--seconds 5] [--rounds 3] [--clients 4]

Traffic goes over a veth pair into a network namespace this benchmark creates (tests/netlab),
and the guard watches only that pair, so nothing else on the machine is queued. The traffic
programs are C, compiled here (Python would be the bottleneck):

- new connections: --clients processes connect to a server in the namespace, close, and again,
  for --seconds; connections per second completed. With the guard on, every one of them is
  queued, parsed, matched against 1,000 rules and accepted by the guard worker.
  Two rule sets: "destination" (999 rules naming other addresses and ports, then the rule that
  allows the server's address and port: the program is never looked up) and "program" (the
  same plus 300 exe and 200 domain rules before it, and the deciding rule names the client's
  exe: every connection's program is found through sock_diag and the kernel's socket owner map).
- bulk: one TCP connection sends 64 KiB writes for --bulk-seconds to a reader in the namespace;
  bytes per second. The guard only ever sees the connection's first packet. --bulk-pairs pairs
  (off, then on with a fresh guard), the ratio of each pair; the median ratio is the figure.

Rounds alternate off and on so that drift on a shared machine falls on both.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from guard_harness import GuardRun  # noqa: E402
from netlab import PEER4, NetLab  # noqa: E402

LOAD_C = r"""
/* gload server ADDR PORT NPROC MODE   MODE accept: accept and close; MODE sink: read to EOF
 * gload connect ADDR PORT SECONDS NPROC   prints "<connections> <failures> <seconds>"
 * gload bulk ADDR PORT SECONDS            prints "<bytes> <seconds>"
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
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec / 1e9; }

static struct sockaddr_in target(const char *addr, const char *port)
{
	struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(atoi(port)) };
	inet_pton(AF_INET, addr, &a.sin_addr);
	return a;
}

int main(int argc, char **argv)
{
	if (argc < 5) return 2;
	struct sockaddr_in a = target(argv[2], argv[3]);
	if (!strcmp(argv[1], "server")) {
		int ls = socket(AF_INET, SOCK_STREAM, 0), one = 1, n = atoi(argv[4]);
		int sink = argc > 5 && !strcmp(argv[5], "sink");
		setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
		if (bind(ls, (void *)&a, sizeof(a)) || listen(ls, 4096)) { perror("listen"); return 1; }
		for (int i = 1; i < n; i++) if (fork() == 0) break;
		static char buf[1 << 16];
		for (;;) {
			int c = accept(ls, NULL, NULL);
			if (c < 0) continue;
			if (sink) while (read(c, buf, sizeof(buf)) > 0) ;
			close(c);
		}
	}
	double seconds = atof(argv[4]);
	if (!strcmp(argv[1], "connect")) {
		int n = argc > 5 ? atoi(argv[5]) : 1;
		uint64_t *counts = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
		double start = now();
		for (int p = 0; p < n; p++) {
			if (fork() == 0) {
				uint64_t ok = 0, bad = 0;
				while (now() - start < seconds) {
					int s = socket(AF_INET, SOCK_STREAM, 0);
					struct linger l = { 1, 0 };  /* reset on close: no TIME_WAIT to run out of ports */
					setsockopt(s, SOL_SOCKET, SO_LINGER, &l, sizeof(l));
					if (connect(s, (void *)&a, sizeof(a)) == 0) ok++; else bad++;
					close(s);
				}
				__atomic_add_fetch(&counts[0], ok, __ATOMIC_RELAXED);
				__atomic_add_fetch(&counts[1], bad, __ATOMIC_RELAXED);
				_exit(0);
			}
		}
		while (wait(NULL) > 0) ;
		printf("%llu %llu %.3f\n", (unsigned long long)counts[0], (unsigned long long)counts[1], now() - start);
		return 0;
	}
	if (!strcmp(argv[1], "bulk")) {
		int s = socket(AF_INET, SOCK_STREAM, 0);
		if (connect(s, (void *)&a, sizeof(a))) { perror("connect"); return 1; }
		static char buf[1 << 16];
		uint64_t total = 0;
		double start = now();
		while (now() - start < seconds) {
			ssize_t w = write(s, buf, sizeof(buf));
			if (w <= 0) break;
			total += w;
		}
		printf("%llu %.3f\n", (unsigned long long)total, now() - start);
		return 0;
	}
	return 2;
}
"""


def compile_load(directory: Path) -> Path:
    if shutil.which("gcc") is None:
        sys.exit("gcc is needed to build the traffic program: apt-get install gcc")
    source, binary = directory / "gload.c", directory / "gload"
    source.write_text(LOAD_C)
    subprocess.run(["gcc", "-O2", "-Wall", "-o", str(binary), str(source)], check=True)
    return binary


def rules(kind: str, port: int, gload: Path, bulk_port: int) -> str:
    """1,000 rules; the last decides the benchmark's connections (the first lets the bulk
    connection through)."""
    lines = [f"allow out addr {PEER4} port {bulk_port} proto tcp"]
    if kind == "program":
        lines += [f"deny exe /opt/bench/program{i}" for i in range(300)]
        lines += [f"deny domain host{i}.bench.example" for i in range(200)]
    while len(lines) < 999:
        i = len(lines)
        lines += [f"deny addr 10.{100 + i // 250}.{i % 250}.0/24", f"deny port {1000 + i} proto udp",
                  f"allow out addr 192.0.2.{i % 250} port {2000 + i}"][: 999 - len(lines)]
    lines.append(f"allow out exe {gload} port {port} proto tcp" if kind == "program"
                 else f"allow out addr {PEER4}/30 port {port} proto tcp")
    assert len(lines) == 1000
    return "\n".join(lines) + "\n"


def connect_rate(gload: Path, port: int, seconds: float, clients: int) -> tuple:
    out = subprocess.run([str(gload), "connect", PEER4, str(port), str(seconds), str(clients)],
                         capture_output=True, text=True, check=True).stdout.split()
    ok, bad, took = int(out[0]), int(out[1]), float(out[2])
    return ok / took, bad


def bulk_rate(gload: Path, port: int, seconds: float) -> float:
    out = subprocess.run([str(gload), "bulk", PEER4, str(port), str(seconds), "1"],
                         capture_output=True, text=True, check=True).stdout.split()
    return int(out[0]) / float(out[1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--bulk-seconds", type=float, default=1.5)
    parser.add_argument("--bulk-pairs", type=int, default=9)
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root: iptables, network namespaces")
    work = Path(tempfile.mkdtemp(prefix="psn-bench-guard-"))
    gload = compile_load(work)
    print(f"guard benchmark: {os.cpu_count()} cores, {args.rounds} rounds of {args.seconds:.0f} s, "
          f"{args.clients} connecting processes")
    with NetLab() as lab:
        accept_port, sink_port = 18000 + os.getpid() % 1000, 19000 + os.getpid() % 1000
        # Each in its own process group: a server forks, and the group is what is stopped.
        servers = [subprocess.Popen(lab.prefix() + [str(gload), "server", PEER4, str(accept_port), "2", "accept"],
                                    start_new_session=True),
                   subprocess.Popen(lab.prefix() + [str(gload), "server", PEER4, str(sink_port), "1", "sink"],
                                    start_new_session=True)]
        time.sleep(0.5)
        try:
            results = {"off": [], "destination": [], "program": []}
            for round_number in range(args.rounds):
                for setting in ("off", "destination", "program"):
                    if setting == "off":
                        rate, bad = connect_rate(gload, accept_port, args.seconds, args.clients)
                        results["off"].append(rate)
                    else:
                        prefix = work / f"{setting}{round_number}"
                        with GuardRun(prefix, lab, rules(setting, accept_port, gload, sink_port),
                                      **{"Guard mode": "deny unknown"}):
                            rate, bad = connect_rate(gload, accept_port, args.seconds, args.clients)
                            results[setting].append(rate)
                    print(f"  round {round_number + 1} {setting:>11}: {rate:9,.0f} new connections/s"
                          + (f" ({bad} failed)" if bad else ""), flush=True)
            print()
            off = statistics.median(results["off"])
            print("new connections per second, decided (median of %d rounds):" % args.rounds)
            print(f"  guard off:                                   {off:9,.0f}/s")
            for setting, label in (("destination", "guard on, 1,000 rules, destination decides"),
                                   ("program", "guard on, 1,000 rules, program decides")):
                on = statistics.median(results[setting])
                print(f"  {label + ':':<45}{on:9,.0f}/s  ({on / off:.2f} of off)")
            offs, ons = [], []
            for pair in range(args.bulk_pairs):
                offs.append(bulk_rate(gload, sink_port, args.bulk_seconds))
                with GuardRun(work / f"bulk{pair}", lab, rules("destination", accept_port, gload, sink_port),
                              **{"Guard mode": "deny unknown"}):
                    ons.append(bulk_rate(gload, sink_port, args.bulk_seconds))
            ratios = [on / off for on, off in zip(ons, offs)]
            print("bulk TCP on one established connection, %d pairs of %.1f s (median):" % (
                args.bulk_pairs, args.bulk_seconds))
            print(f"  guard off: {statistics.median(offs) * 8 / 1e9:6.2f} Gbit/s   guard on: "
                  f"{statistics.median(ons) * 8 / 1e9:6.2f} Gbit/s   ratio of pairs: median "
                  f"{statistics.median(ratios):.3f} (from {min(ratios):.2f} to {max(ratios):.2f})")
        finally:
            for server in servers:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
