"""The whole daemon under load: a loopback connection storm, a thousand short-lived programs, and
what the daemon's own processes cost in CPU and memory meanwhile. Prints figures; asserts nothing.

    python3 -m bench.daemon_load [--quick] [--storm-seconds 30] [--processes 1000] ...

Run as root from the repository root, after `make -C picosnitch/kernel/bpf`. Needs gcc: the traffic
programs are small C programs compiled at run time (Python would be the bottleneck).

1. Baseline: the storm client runs for a while with no daemon, for the connection rate this
   machine reaches without the BPF programs attached.
2. A daemon (`picosnitch start-no-daemon`, through tests/daemon_harness.Daemon) in a private
   PICOSNITCH_PREFIX, as configured by default on a desktop: its "Syslog socket" is a socket the
   bench reads (tests/receivers.SyslogSocket; journald's /dev/log there), so the outlet runs with its unprivileged
   sender (--no-syslog: without). Idle: nothing but the machine's background traffic for --idle-seconds.
   Storm: --clients processes open TCP connections to a loopback server (--servers processes that
   accept and read to EOF) as fast as they can for --storm-seconds; each connection writes
   --bytes bytes and closes. The client counts its connections, bytes, and a histogram of the
   local ports it used. Then we wait until the daemon's CPU falls back to idle (its backlog is
   written), read PSS, and again after --settle-seconds more of idle (the workers give memory
   back a write window or two after a burst), stop it (SIGTERM drains everything), and read the
   `connections` view:
   accounted bytes = SUM(send) of rows whose exe is the client binary and rport the server's port;
   accounted connections = sum over local ports of min(connections the client made from that
   port, bytes the view has for it // --bytes). Ports are reused during a long storm, so this is
   per port rather than per connection, but any missing connection shows as a deficit somewhere.
   error.log is read for what the daemon itself reported losing.
3. A fresh daemon. Short-lived (an exec storm of one binary): a tiny C program, copied to a
   temporary path whose sha256 we take with hashlib, runs --processes times (--parallel at a time);
   each run connects to the loopback server, writes a few bytes and exits at once. Every run has
   its own tag in argv, so its row is found by cmdline; a run counts as attributed with a verified
   sha256 when a row has that cmdline, exe = the path, sha256 = the file's hash, and the bytes it
   sent. Then --distinct copies of the program, each with bytes of its own (so each is a file of
   its own, with its own sha256 and its own pin), run once each the same way: each must have its
   own row with its own file's hash. This daemon runs with "Set RLIMIT_NOFILE" --nofile (512), so
   its identity worker holds at most 256 pinned executables, fewer than --distinct: the oldest are
   hashed and closed. Meanwhile the open descriptors of the monitor and the identity worker and
   their PSS are sampled every 50 ms.

Daemon CPU = utime+stime of every process in the daemon's process group (/proc/PID/stat) over the
interval, divided by wall time (100 % = one core); PSS = sum of Pss from /proc/PID/smaps_rollup.
Both are also split by worker, told apart by their open files (bpf links: monitor; fanotify:
identity; snitch.db: writer; the live socket: live; the group leader: supervisor; the others, the
keeper, notifier, outlet and baseline, by the order the supervisor starts them in; the outlet's
unprivileged sender counts as the outlet). BPF programs run in
the context of the processes making traffic, so their cost shows in the storm rate, not here.
"""

import argparse
import hashlib
import json
import os
import platform
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from array import array
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from picosnitch.daemon.supervisor import ROOMMATES
from tests.daemon_harness import Daemon
from tests.receivers import SyslogSocket, shared_tempdir

CLK_TCK = os.sysconf("SC_CLK_TCK")
SAMPLE_EVERY = 1.0  # seconds between CPU/PSS samples
SETTLE_SECONDS = 3.0  # after start: the initial /proc scan and hashing are not "idle"
# The daemon's processes: a worker that runs in another's room (supervisor.ROOMMATES) is counted
# with the process it runs in, which holds the live socket if the live feed is among them.
LIVE_ROOM = ROOMMATES.get("live", "live")
ROLES = tuple(r for r in ("supervisor", "monitor", "identity", "writer", "live", "keeper", "notifier", "outlet",
                          "baseline") if r not in ROOMMATES)
HELD_OPEN = ("monitor", "identity", "writer", LIVE_ROOM)  # the processes roles_of tells apart by their files

STORM_C = r"""
/* Loopback TCP connection storm for bench/daemon_load.py.
 *   storm server NPROC
 *       listens on 127.0.0.1 (ephemeral port), prints the port, and serves with NPROC processes:
 *       accept, read to EOF, close. On SIGTERM prints "<connections> <bytes>" and exits.
 *   storm client PORT SECONDS BYTES NPROC HISTFILE
 *       NPROC processes each open connections to 127.0.0.1:PORT as fast as they can for SECONDS:
 *       connect, write BYTES, note the local port, close. Prints
 *       "<connections> <bytes> <failures> <seconds>" and writes the local ports used as a
 *       uint32[65536] histogram to HISTFILE.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MAXPROC 64

struct shared {
	uint64_t conns, bytes, failures;
	uint32_t hist[65536];
};

static volatile sig_atomic_t stopping;

static void on_term(int sig)
{
	(void)sig;
	stopping = 1;
}

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

static struct shared *shared_counters(void)
{
	struct shared *s = mmap(NULL, sizeof(*s), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);

	if (s == MAP_FAILED)
		die("mmap");
	return s;
}

static void serve(int ls, struct shared *s)
{
	char buf[65536];
	uint64_t conns = 0, bytes = 0;

	while (!stopping) {
		int fd = accept(ls, NULL, NULL);
		ssize_t n;

		if (fd < 0)
			continue;
		while ((n = read(fd, buf, sizeof(buf))) > 0)
			bytes += n;
		close(fd);
		conns++;
	}
	__atomic_fetch_add(&s->conns, conns, __ATOMIC_SEQ_CST);
	__atomic_fetch_add(&s->bytes, bytes, __ATOMIC_SEQ_CST);
	exit(0);
}

static int server(int nproc)
{
	struct sockaddr_in addr = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
	struct sigaction sa = {.sa_handler = on_term}; /* no SA_RESTART: accept() returns EINTR */
	socklen_t len = sizeof(addr);
	struct shared *s = shared_counters();
	pid_t kids[MAXPROC];
	int ls = socket(AF_INET, SOCK_STREAM, 0), one = 1, i;

	sigaction(SIGTERM, &sa, NULL);
	setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	if (ls < 0 || bind(ls, (struct sockaddr *)&addr, len) || listen(ls, 4096) ||
	    getsockname(ls, (struct sockaddr *)&addr, &len))
		die("server socket");
	printf("%d\n", ntohs(addr.sin_port));
	fflush(stdout);
	for (i = 0; i < nproc; i++) {
		kids[i] = fork();
		if (kids[i] < 0)
			die("fork");
		if (kids[i] == 0) {
			prctl(PR_SET_PDEATHSIG, SIGKILL);
			serve(ls, s);
		}
	}
	while (!stopping)
		pause();
	for (i = 0; i < nproc; i++)
		kill(kids[i], SIGTERM);
	for (i = 0; i < nproc; i++)
		waitpid(kids[i], NULL, 0);
	printf("%llu %llu\n", (unsigned long long)s->conns, (unsigned long long)s->bytes);
	return 0;
}

static void storm(int port, double end, size_t size, struct shared *s)
{
	struct sockaddr_in to = {.sin_family = AF_INET, .sin_port = htons(port),
				 .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
	struct sockaddr_in local;
	static uint32_t hist[65536];
	uint64_t conns = 0, bytes = 0, failures = 0;
	char *buf = calloc(1, size + 1);
	int i;

	while (now() < end) {
		socklen_t len = sizeof(local);
		size_t done = 0;
		int fd = socket(AF_INET, SOCK_STREAM, 0);

		if (fd < 0 || connect(fd, (struct sockaddr *)&to, sizeof(to))) {
			failures++;
			if (fd >= 0)
				close(fd);
			continue;
		}
		while (done < size) {
			ssize_t n = write(fd, buf + done, size - done);

			if (n <= 0)
				break;
			done += n;
		}
		bytes += done;
		if (done < size)
			failures++;
		else
			conns++;
		if (!getsockname(fd, (struct sockaddr *)&local, &len))
			hist[ntohs(local.sin_port)]++;
		close(fd);
	}
	__atomic_fetch_add(&s->conns, conns, __ATOMIC_SEQ_CST);
	__atomic_fetch_add(&s->bytes, bytes, __ATOMIC_SEQ_CST);
	__atomic_fetch_add(&s->failures, failures, __ATOMIC_SEQ_CST);
	for (i = 0; i < 65536; i++)
		if (hist[i])
			__atomic_fetch_add(&s->hist[i], hist[i], __ATOMIC_SEQ_CST);
	exit(0);
}

static int client(int port, double seconds, size_t size, int nproc, const char *histfile)
{
	struct shared *s = shared_counters();
	double start = now(), took;
	FILE *f;
	int i;

	for (i = 0; i < nproc; i++) {
		pid_t kid = fork();

		if (kid < 0)
			die("fork");
		if (kid == 0) {
			prctl(PR_SET_PDEATHSIG, SIGKILL);
			storm(port, start + seconds, size, s);
		}
	}
	while (wait(NULL) > 0 || errno == EINTR)
		;
	took = now() - start;
	f = fopen(histfile, "wb");
	if (!f || fwrite(s->hist, sizeof(s->hist), 1, f) != 1 || fclose(f))
		die(histfile);
	printf("%llu %llu %llu %.6f\n", (unsigned long long)s->conns, (unsigned long long)s->bytes,
	       (unsigned long long)s->failures, took);
	return 0;
}

int main(int argc, char **argv)
{
	if (argc == 3 && !strcmp(argv[1], "server"))
		return server(atoi(argv[2]) < MAXPROC ? atoi(argv[2]) : MAXPROC);
	if (argc == 7 && !strcmp(argv[1], "client"))
		return client(atoi(argv[2]), atof(argv[3]), strtoul(argv[4], NULL, 10), atoi(argv[5]), argv[6]);
	fprintf(stderr, "usage: %s server NPROC | client PORT SECONDS BYTES NPROC HISTFILE\n", argv[0]);
	return 2;
}
"""

ONCE_C = r"""
/* once PORT BYTES TAG: one TCP connection to 127.0.0.1:PORT, BYTES bytes written, exit.
 * TAG only marks this run's command line. */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	struct sockaddr_in to = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
	char buf[256] = {0};
	size_t size;
	int fd;

	if (argc != 4)
		return 2;
	to.sin_port = htons(atoi(argv[1]));
	size = strtoul(argv[2], NULL, 10);
	fd = socket(AF_INET, SOCK_STREAM, 0);
	if (fd < 0 || size > sizeof(buf) || connect(fd, (struct sockaddr *)&to, sizeof(to)))
		return 1;
	if (write(fd, buf, size) != (ssize_t)size)
		return 1;
	return close(fd) ? 1 : 0;
}
"""


# --- programs ---

def compile_c(directory: Path, name: str, source: str) -> Path:
    src, binary = directory / f"{name}.c", directory / name
    src.write_text(source)
    if shutil.which("gcc") is None:
        sys.exit("gcc is needed to build the traffic programs: apt-get install gcc")
    subprocess.run(["gcc", "-O2", "-Wall", "-o", str(binary), str(src)], check=True)
    return binary


class Server:
    """The storm binary in server mode, running until stop()."""

    def __init__(self, storm: Path, processes: int):
        self.proc = subprocess.Popen([str(storm), "server", str(processes)], stdout=subprocess.PIPE, text=True)
        self.port = int(self.proc.stdout.readline())

    def stop(self) -> Tuple[int, int]:
        """(connections, bytes) it accepted and read."""
        time.sleep(0.3)  # let it read what is still queued
        self.proc.send_signal(signal.SIGTERM)
        out, _ = self.proc.communicate(timeout=30)
        conns, nbytes = out.split()
        return int(conns), int(nbytes)


@dataclass
class StormResult:
    connections: int
    bytes: int
    failures: int
    seconds: float
    ports: array  # connections made from each local port

    @property
    def rate(self) -> float:
        return self.connections / self.seconds if self.seconds else 0.0


def run_storm(storm: Path, port: int, seconds: float, size: int, clients: int, directory: Path) -> StormResult:
    histfile = directory / "ports.bin"
    out = subprocess.run([str(storm), "client", str(port), str(seconds), str(size), str(clients), str(histfile)],
                         capture_output=True, text=True, check=True, timeout=seconds + 120).stdout.split()
    ports = array("I")
    ports.frombytes(histfile.read_bytes())
    return StormResult(int(out[0]), int(out[1]), int(out[2]), float(out[3]), ports)


# --- the daemon's processes ---

def group_pids(pgid: int) -> List[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid:  # fields[0] is state: pgrp is field 5 of stat
                pids.append(int(entry))
    return pids


def _fd_targets(pid: int) -> List[str]:
    targets = []
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                targets.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
            except OSError:
                pass
    except OSError:
        pass
    return targets


def _socket_inodes(path: Path) -> List[str]:
    """fd link targets of the UNIX sockets bound to `path`."""
    with open("/proc/net/unix") as f:
        return [f"socket:[{line.split()[6]}]" for line in f if line.rstrip("\n").endswith(" " + str(path))]


def _ppid_and_start(pid: int) -> Tuple[int, int]:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0, 0
    return int(fields[1]), int(fields[19])  # ppid, starttime (fields 4 and 22 of stat)


def start_order(daemon: Daemon) -> List[str]:
    """The workers that hold nothing of their own open (the keeper, the notifier, the outlet, the
    baseline, ...), in the order the daemon's supervisor starts them with this daemon's settings."""
    from picosnitch import config as config_module
    from picosnitch.daemon.supervisor import Supervisor
    order = Supervisor(config_module.parse(json.dumps(daemon.settings)), daemon.paths).order
    return [name for name in order if name not in HELD_OPEN and name not in ROOMMATES]


def roles_of(pids: List[int], leader: int, live_socket: Path, by_start: List[str]) -> Dict[int, str]:
    """Which worker each of the daemon's processes is, by what it holds open: bpf links (monitor),
    fanotify (identity), snitch.db (writer), the live socket (live); the others, which hold nothing
    of their own, by when they started (`by_start`: start_order). A child of a worker (the
    notifier's per-user helpers, the outlet's unprivileged sender) counts as that worker."""
    live = set(_socket_inodes(live_socket))
    roles, rest = {leader: "supervisor"}, []
    for pid in pids:
        if pid == leader or _ppid_and_start(pid)[0] != leader:
            continue
        targets = _fd_targets(pid)
        if "anon_inode:bpf_link" in targets:
            roles[pid] = "monitor"
        elif "anon_inode:[fanotify]" in targets:
            roles[pid] = "identity"
        elif any(t.endswith("/snitch.db") for t in targets):
            roles[pid] = "writer"
        elif live & set(targets):
            roles[pid] = LIVE_ROOM
        else:
            rest.append(pid)
    rest.sort(key=lambda pid: (_ppid_and_start(pid)[1], pid))
    roles.update(zip(rest, by_start))
    for pid in pids:
        if pid not in roles:
            roles[pid] = roles.get(_ppid_and_start(pid)[0], "?")
    return roles


def cpu_ticks(pid: int) -> Optional[int]:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)


def pss_kib(pid: int) -> int:
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0
    m = re.search(r"^Pss:\s+(\d+) kB", text, re.M)
    return int(m.group(1)) if m else 0


@dataclass
class Sample:
    time: float
    ticks: Dict[int, int]  # pid -> utime+stime
    pss: Dict[int, int]  # pid -> KiB


class Sampler:
    """Samples CPU ticks and PSS of the daemon's processes every SAMPLE_EVERY seconds, in a thread."""

    def __init__(self, daemon: Daemon):
        self.leader = daemon.proc.pid
        self.live_socket = daemon.paths.live_socket
        self.by_start = start_order(daemon)
        self.roles: Dict[int, str] = {}
        self.samples: List[Sample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def sample(self) -> Sample:
        pids = group_pids(self.leader)
        if set(pids) - set(self.roles):
            self.roles.update(roles_of(pids, self.leader, self.live_socket, self.by_start))
        ticks = {pid: t for pid in pids if (t := cpu_ticks(pid)) is not None}
        s = Sample(time.monotonic(), ticks, {pid: pss_kib(pid) for pid in pids})
        self.samples.append(s)
        return s

    def _loop(self) -> None:
        while not self._stop.wait(SAMPLE_EVERY):
            self.sample()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()

    def cpu(self, a: Sample, b: Sample) -> Dict[str, float]:
        """CPU use between two samples as a fraction of one core, per role and in "all"."""
        wall = b.time - a.time
        use = {role: 0.0 for role in ROLES + ("all",)}
        for pid, t in b.ticks.items():
            seconds = (t - a.ticks.get(pid, 0)) / CLK_TCK
            role = self.roles.get(pid, "?")
            use[role] = use.get(role, 0.0) + seconds / wall
            use["all"] += seconds / wall
        return use

    def pss(self, s: Sample) -> Dict[str, int]:
        out = {role: 0 for role in ROLES + ("all",)}
        for pid, kib in s.pss.items():
            role = self.roles.get(pid, "?")
            out[role] = out.get(role, 0) + kib
            out["all"] += kib
        return out

    def between(self, a: Sample, b: Sample) -> List[Sample]:
        return [s for s in self.samples if a.time <= s.time <= b.time]


def other_picosnitch(ours: Optional[int] = None) -> List[str]:
    """Command lines of other picosnitch daemons or benchmarks on this machine (they skew figures)."""
    found = []
    ours_group = set(group_pids(ours)) if ours else set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in ours_group or int(entry) == os.getpid():
            continue
        try:
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if re.search(r"picosnitch (start|restart|systemd)|bench\.(overhead|sqlite_write|daemon_load)|pytest", cmd):
            found.append(f"{entry}: {cmd.strip()[:100]}")
    return found


def wait_until_quiet(sampler: Sampler, idle_cpu: float, limit: float) -> float:
    """Seconds until the daemon's CPU use stays near idle for 3 consecutive samples (its backlog
    is processed); `limit` if it never does."""
    begin = time.monotonic()
    threshold = max(3 * idle_cpu, 0.05)
    quiet = 0
    prev = sampler.sample()
    while time.monotonic() - begin < limit:
        time.sleep(SAMPLE_EVERY)
        cur = sampler.sample()
        quiet = quiet + 1 if sampler.cpu(prev, cur)["all"] < threshold else 0
        prev = cur
        if quiet >= 3:
            return cur.time - begin - 3 * SAMPLE_EVERY
    return limit


def stop_daemon(daemon: Daemon, limit: float, problems: List[str]) -> float:
    """SIGTERM and wait; seconds it took. A daemon that does not stop within `limit` is described
    in `problems` (where each process waits) and killed."""
    begin = time.monotonic()
    try:
        daemon.stop(timeout=limit)
    except subprocess.TimeoutExpired:
        problems.append(f"the daemon did not stop within {limit:g} s after SIGTERM; killed. Its processes:")
        pids = group_pids(daemon.proc.pid)
        roles = roles_of(pids, daemon.proc.pid, daemon.paths.live_socket, start_order(daemon))
        for pid in pids:
            try:
                wchan = Path(f"/proc/{pid}/wchan").read_text()
                stack = Path(f"/proc/{pid}/stack").read_text().split("\n")[:3]
            except OSError:
                wchan, stack = "?", []
            problems.append(f"  pid {pid} ({roles.get(pid, '?')}): wchan {wchan}, {' < '.join(stack)}")
        daemon.kill_group()
    return time.monotonic() - begin


def loss_lines(daemon: Daemon) -> List[str]:
    return [line for line in daemon.error_log().splitlines() if line.strip()]


def query(daemon: Daemon, sql: str, params=()) -> list:
    conn = sqlite3.connect(f"file:{daemon.paths.db}?mode=ro", uri=True)
    conn.text_factory = lambda b: b.decode("utf-8", "surrogateescape")
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- the phases ---

@dataclass
class Results:
    baseline: Optional[StormResult] = None
    storm: Optional[StormResult] = None
    server: Tuple[int, int] = (0, 0)
    idle_cpu: Dict[str, float] = field(default_factory=dict)
    idle_pss: Dict[str, int] = field(default_factory=dict)
    storm_cpu: Dict[str, float] = field(default_factory=dict)
    storm_pss_max: Dict[str, int] = field(default_factory=dict)
    storm_pss_end: Dict[str, int] = field(default_factory=dict)
    cpu_series: List[float] = field(default_factory=list)
    catch_up: float = 0.0
    work_seconds: Dict[str, float] = field(default_factory=dict)  # CPU from storm start until quiet again
    after_pss: Dict[str, int] = field(default_factory=dict)
    settled_pss: Dict[str, int] = field(default_factory=dict)  # --settle-seconds after catching up
    stop_seconds: float = 0.0
    client_sent_in_view: int = 0
    client_rows: int = 0
    connections_accounted: int = 0
    connections_over: int = 0
    ports_partial: int = 0
    client_sha_ok: bool = False
    server_recv_in_view: int = 0
    db_rows: int = 0
    db_bytes: int = 0
    storm_errors: List[str] = field(default_factory=list)
    short_runs: int = 0
    short_ok_runs: int = 0
    short_seconds: float = 0.0
    short_attributed: int = 0
    short_verified: int = 0
    short_bytes_ok: int = 0
    short_shas: Dict[str, int] = field(default_factory=dict)
    short_errors: List[str] = field(default_factory=list)
    distinct_runs: int = 0
    distinct_seconds: float = 0.0
    distinct_verified: int = 0
    fds: Dict[str, Tuple[int, int]] = field(default_factory=dict)  # role -> (before, max during the runs)
    pin_capacity: int = 0
    short_pss_max: Dict[str, int] = field(default_factory=dict)
    others: List[str] = field(default_factory=list)
    problems: List[str] = field(default_factory=list)
    syslog_messages: Optional[int] = None  # None: run without a syslog socket


def syslog_setting(args) -> dict:
    """The daemon's "Syslog socket": the bench's sink, or none (--no-syslog)."""
    return {"Syslog socket": args.syslog.path if args.syslog else ""}


def storm_phase(args, storm: Path, work: Path, r: Results) -> None:
    client_path = work / "storm-client"
    shutil.copy2(storm, client_path)  # its own exe path, so its rows are told from the server's
    server = Server(storm, args.servers)
    print(f"baseline: storm without the daemon, {args.baseline_seconds:g} s ...", flush=True)
    r.baseline = run_storm(client_path, server.port, args.baseline_seconds, args.bytes, args.clients, work)
    server.stop()
    time.sleep(2)  # TIME_WAIT sockets of the baseline are reused on loopback anyway

    prefix = shared_tempdir("picosnitch-load-a-")
    daemon = Daemon(prefix, **{"DB write limit (seconds)": args.write_limit, **syslog_setting(args)}).start()
    sampler = Sampler(daemon)
    try:
        time.sleep(SETTLE_SECONDS)
        print(f"idle: {args.idle_seconds:g} s ...", flush=True)
        a = sampler.sample()
        time.sleep(args.idle_seconds)
        b = sampler.sample()
        r.idle_cpu, r.idle_pss = sampler.cpu(a, b), sampler.pss(b)

        print(f"storm: {args.storm_seconds:g} s with the daemon ...", flush=True)
        server = Server(storm, args.servers)
        c = sampler.sample()
        r.storm = run_storm(client_path, server.port, args.storm_seconds, args.bytes, args.clients, work)
        d = sampler.sample()
        r.storm_cpu = sampler.cpu(c, d)
        during = sampler.between(c, d)
        r.cpu_series = [sampler.cpu(x, y)["all"] for x, y in zip(during, during[1:])]
        pss = [sampler.pss(s) for s in during]
        r.storm_pss_max = {role: max(p[role] for p in pss) for role in pss[0]}
        r.storm_pss_end = sampler.pss(d)
        print("waiting for the daemon to catch up ...", flush=True)
        r.catch_up = wait_until_quiet(sampler, r.idle_cpu["all"], args.catch_up_limit)
        e = sampler.sample()
        r.work_seconds = {role: use * (e.time - c.time) for role, use in sampler.cpu(c, e).items()}
        r.after_pss = sampler.pss(e)
        print(f"settling: {args.settle_seconds:g} s ...", flush=True)
        time.sleep(args.settle_seconds)
        r.settled_pss = sampler.pss(sampler.sample())
        r.server = server.stop()
        r.stop_seconds = stop_daemon(daemon, args.stop_limit, r.problems)
    finally:
        sampler.close()
        if daemon.proc.poll() is None:
            daemon.kill_group()

    sha = sha256_file(client_path)
    rows = query(daemon, "SELECT lport, SUM(send), COUNT(*), SUM(sha256 = ?) FROM connections "
                         "WHERE exe = ? AND rport = ? AND raddr = '127.0.0.1' AND protocol = 6 GROUP BY lport",
                 (sha, str(client_path), server.port))
    for lport, sent, count, sha_ok in rows:
        r.client_sent_in_view += sent
        r.client_rows += count
        made = r.storm.ports[lport] if 0 <= lport < 65536 else 0
        r.connections_accounted += min(made, sent // args.bytes)
        r.connections_over += max(0, sent // args.bytes - made)
        r.ports_partial += sent % args.bytes != 0
    r.client_sha_ok = bool(rows) and all(row[3] == row[2] for row in rows)
    r.server_recv_in_view = query(daemon, "SELECT COALESCE(SUM(recv), 0) FROM connections WHERE exe = ? AND lport = ?",
                                  (str(storm), server.port))[0][0]
    r.db_rows = query(daemon, "SELECT COUNT(*) FROM connections")[0][0]
    r.db_bytes = sum(p.stat().st_size for p in daemon.paths.db.parent.glob("snitch.db*"))
    r.storm_errors = loss_lines(daemon)
    shutil.rmtree(prefix, ignore_errors=True)


class FdSampler:
    """The open descriptors and PSS of each of the daemon's workers, every 50 ms, in a thread."""

    def __init__(self, daemon: Daemon):
        self.leader, self.live_socket = daemon.proc.pid, daemon.paths.live_socket
        self.by_start = start_order(daemon)
        self.roles: Dict[int, str] = {}
        self.fds: Dict[str, int] = {}
        self.pss: Dict[str, int] = {}
        self.before = self.sample()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def sample(self) -> Dict[str, int]:
        pids = group_pids(self.leader)
        if set(pids) - set(self.roles):
            self.roles.update(roles_of(pids, self.leader, self.live_socket, self.by_start))
        now: Dict[str, int] = {}
        for pid in pids:
            role = self.roles.get(pid, "?")
            now[role] = now.get(role, 0) + len(_fd_targets(pid))
            self.pss[role] = max(self.pss.get(role, 0), pss_kib(pid))
        for role, count in now.items():
            self.fds[role] = max(self.fds.get(role, 0), count)
        return now

    def _loop(self) -> None:
        while not self._stop.wait(0.05):
            self.sample()

    def close(self) -> Dict[str, Tuple[int, int]]:
        self._stop.set()
        self._thread.join()
        return {role: (self.before.get(role, 0), self.fds[role]) for role in self.fds}


def run_tagged(programs: List[Path], port: int, size: int, tags: List[str], parallel: int) -> List[int]:
    """Runs programs[i] with tags[i], --parallel at a time."""
    def one(i: int) -> int:
        return subprocess.run([str(programs[i]), str(port), str(size), tags[i]]).returncode
    with ThreadPoolExecutor(parallel) as pool:
        return list(pool.map(one, range(len(tags))))


def pin_capacity_of(daemon: Daemon) -> int:
    """How many pins the daemon's identity worker may hold (kernel.pins.pin_capacity, from its limit)."""
    soft = 1024
    for pid in group_pids(daemon.proc.pid):
        m = re.search(r"^Max open files\s+(\d+)", Path(f"/proc/{pid}/limits").read_text(), re.M)
        if m:
            soft = int(m.group(1))
            break
    return max(16, min(soft // 2, 8192))


def short_lived_phase(args, storm: Path, once: Path, work: Path, r: Results) -> None:
    prefix = shared_tempdir("picosnitch-load-b-")
    program = work / "short-lived"
    shutil.copy2(once, program)
    expected_sha = sha256_file(program)
    size = 7
    distinct = [work / f"distinct-{i:05d}" for i in range(args.distinct)]
    distinct_sha = {}
    for i, path in enumerate(distinct):
        path.write_bytes(once.read_bytes() + i.to_bytes(4, "little"))
        path.chmod(0o755)
        distinct_sha[str(path)] = sha256_file(path)
    daemon = Daemon(prefix, **{"DB write limit (seconds)": args.write_limit,
                               "Set RLIMIT_NOFILE": args.nofile, **syslog_setting(args)}).start()
    try:
        time.sleep(SETTLE_SECONDS)
        server = Server(storm, 1)
        fds = FdSampler(daemon)
        tags = [f"run-{i:05d}" for i in range(args.processes)]
        print(f"short-lived: {args.processes} runs, {args.parallel} at a time ...", flush=True)
        begin = time.monotonic()
        codes = run_tagged([program] * len(tags), server.port, size, tags, args.parallel)
        r.short_seconds = time.monotonic() - begin
        r.short_runs = len(tags)
        r.short_ok_runs = codes.count(0)
        print(f"distinct executables: {args.distinct}, each run once ...", flush=True)
        begin = time.monotonic()
        run_tagged(distinct, server.port, size, [f"distinct-{i:05d}" for i in range(args.distinct)], args.parallel)
        r.distinct_seconds = time.monotonic() - begin
        r.distinct_runs = len(distinct)
        time.sleep(args.write_limit + 3)  # written in the ordinary way, not by the final drain
        r.fds, r.short_pss_max = fds.close(), dict(fds.pss)
        r.pin_capacity = pin_capacity_of(daemon)
        server.stop()
        stop_daemon(daemon, args.stop_limit, r.problems)
    finally:
        if daemon.proc.poll() is None:
            daemon.kill_group()
    for exe, sha in query(daemon, "SELECT DISTINCT exe, sha256 FROM connections WHERE exe LIKE ?",
                          (str(work / "distinct-") + "%",)):
        r.distinct_verified += distinct_sha.get(exe) == sha
    by_tag: Dict[str, List[Tuple[str, int]]] = {}
    for cmdline, sha, sent in query(daemon, "SELECT cmdline, sha256, SUM(send) FROM connections WHERE exe = ? "
                                            "GROUP BY cmdline, sha256", (str(program),)):
        by_tag.setdefault(cmdline.rsplit(" ", 1)[-1], []).append((sha, sent))
        label = "expected" if sha == expected_sha else sha
        r.short_shas[label] = r.short_shas.get(label, 0) + 1
    for tag, code in zip(tags, codes):
        found = by_tag.get(tag, [])
        r.short_attributed += bool(found)
        r.short_verified += any(sha == expected_sha for sha, _ in found)
        r.short_bytes_ok += sum(sent for _, sent in found) == size
    r.short_errors = loss_lines(daemon)
    shutil.rmtree(prefix, ignore_errors=True)


# --- report ---

def pct(part: float, whole: float) -> str:
    return f"{100 * part / whole:.2f} %" if whole else "n/a"


def mib(kib: int) -> str:
    return f"{kib / 1024:.1f} MiB"


def report(args, r: Results) -> None:
    print()
    print(f"machine: {os.cpu_count()} CPUs, kernel {platform.release()}, {time.strftime('%Y-%m-%d %H:%M %Z')}")
    print(f"command: python3 -m bench.daemon_load{' --quick' if args.quick else ''}  (storm {args.storm_seconds:g} s, "
          f"{args.clients} client + {args.servers} server processes, {args.bytes} B/connection, "
          f"DB write limit {args.write_limit} s)")
    print("syslog: " + (f"the outlet's sender delivered to the bench's socket ({r.syslog_messages:,} messages)"
                        if r.syslog_messages is not None else "none (--no-syslog): the outlet has no sender"))
    if r.others:
        print("WARNING: other picosnitch daemons/benchmarks/tests ran meanwhile:")
        for line in r.others[:8]:
            print("   ", line)
    for line in r.problems:
        print("PROBLEM:", line)
    s, b = r.storm, r.baseline
    rows = [
        ("Storm rate without daemon", f"{b.rate:,.0f} conn/s ({b.connections:,} in {b.seconds:.1f} s, "
                                      f"{b.failures} failures)", "-"),
        ("Storm rate with daemon", f"{s.rate:,.0f} conn/s ({s.connections:,} in {s.seconds:.1f} s, "
                                   f"{s.failures} failures); {pct(s.rate, b.rate)} of baseline", "-"),
        ("Storm bytes accounted (client send)", f"{pct(r.client_sent_in_view, s.bytes)} "
                                               f"({r.client_sent_in_view:,} of {s.bytes:,} B)", "100 %"),
        ("Storm connections accounted (by local port)", f"{pct(r.connections_accounted, s.connections)} "
                                                        f"({r.connections_accounted:,} of {s.connections:,}; "
                                                        f"{r.connections_over} over-counted, "
                                                        f"{r.ports_partial} ports with partial bytes)", "100 %"),
        ("Storm bytes accounted (server recv)", f"{pct(r.server_recv_in_view, r.server[1])} "
                                               f"({r.server_recv_in_view:,} of {r.server[1]:,} B)", "100 %"),
        ("Client rows: sha256 verified", "all" if r.client_sha_ok else "NOT all", "all"),
        ("Losses reported in error.log", f"{sum('dropped' in l for l in r.storm_errors)} lines", "= shortfall"),
        ("Short-lived: attributed with verified sha256",
         f"{pct(r.short_verified, r.short_runs)} ({r.short_verified} of {r.short_runs}; "
         f"{r.short_ok_runs} runs succeeded, {r.short_runs / r.short_seconds:,.0f} runs/s)", "100 %"),
        ("Short-lived: any row / exact bytes", f"{pct(r.short_attributed, r.short_runs)} / "
                                               f"{pct(r.short_bytes_ok, r.short_runs)}", "100 %"),
        ("Distinct executables, each run once: own row with its file's sha256",
         f"{pct(r.distinct_verified, r.distinct_runs)} ({r.distinct_verified} of {r.distinct_runs}, "
         f"{r.distinct_runs / max(r.distinct_seconds, 1e-9):,.0f} runs/s)", "100 %"),
        ("Open descriptors, identity (before / max during the runs)",
         "%d / %d (pins held at most: %d)" % (*r.fds.get("identity", (0, 0)), r.pin_capacity), "bounded"),
        ("Open descriptors, monitor (before / max during the runs)", "%d / %d" % r.fds.get("monitor", (0, 0)), "-"),
        ("PSS max during the runs (identity / monitor)", f"{mib(r.short_pss_max.get('identity', 0))} / "
                                                          f"{mib(r.short_pss_max.get('monitor', 0))}", "-"),
        ("Daemon CPU idle", f"{100 * r.idle_cpu['all']:.1f} % of a core", "-"),
        ("Daemon CPU during storm", f"{100 * r.storm_cpu['all']:.1f} % of a core "
                                    f"(per second: max {100 * max(r.cpu_series or [0]):.0f} %)", "-"),
        ("Catch-up after storm / stop", f"{r.catch_up:.1f} s / {r.stop_seconds:.1f} s", "-"),
        ("Daemon CPU for the whole storm (until quiet)", f"{r.work_seconds['all']:.1f} s = "
         f"{1e6 * r.work_seconds['all'] / max(s.connections, 1):.0f} µs per connection", "-"),
        ("Daemon PSS idle", mib(r.idle_pss["all"]), "-"),
        ("Daemon PSS storm (max / end / after catch-up)", f"{mib(r.storm_pss_max['all'])} / "
         f"{mib(r.storm_pss_end['all'])} / {mib(r.after_pss['all'])}", "-"),
        (f"Daemon PSS settled ({args.settle_seconds:g} s after catch-up)", mib(r.settled_pss["all"]), "-"),
        ("snitch.db after storm", f"{r.db_rows:,} rows, {r.db_bytes / 2**20:.1f} MiB (with WAL)", "-"),
    ]
    print("\n| Figure | Result | Target |\n|---|---|---|")
    for name, value, target in rows:
        print(f"| {name} | {value} | {target} |")
    print("\n| Worker | CPU idle | CPU storm | CPU s, storm until quiet | PSS idle | PSS storm max | PSS after | "
          "PSS settled |\n|---|---|---|---|---|---|---|---|")
    for role in ROLES:
        mates = [m for m, host in ROOMMATES.items() if host == role]
        shown = f"{role} (with {', '.join(mates)})" if mates else role
        print(f"| {shown} | {100 * r.idle_cpu.get(role, 0):.1f} % | {100 * r.storm_cpu.get(role, 0):.1f} % | "
              f"{r.work_seconds.get(role, 0):.1f} | {mib(r.idle_pss.get(role, 0))} | "
              f"{mib(r.storm_pss_max.get(role, 0))} | {mib(r.after_pss.get(role, 0))} | "
              f"{mib(r.settled_pss.get(role, 0))} |")
    print("\nDaemon CPU per second during the storm (% of a core):",
          " ".join(f"{100 * c:.0f}" for c in r.cpu_series))
    print("short-lived sha256 values recorded:", r.short_shas)
    print("\nerror.log after the storm:")
    for line in r.storm_errors or ["(empty)"]:
        print("   ", line[:300])
    print("error.log after the short-lived runs:")
    for line in r.short_errors or ["(empty)"]:
        print("   ", line[:300])


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="short versions, for a smoke test")
    p.add_argument("--storm-seconds", type=float)
    p.add_argument("--baseline-seconds", type=float)
    p.add_argument("--idle-seconds", type=float)
    p.add_argument("--processes", type=int, help="short-lived runs")
    p.add_argument("--parallel", type=int, default=4, help="short-lived runs at a time")
    p.add_argument("--distinct", type=int, help="distinct executables run once each")
    p.add_argument("--nofile", type=int, default=512,
                   help='"Set RLIMIT_NOFILE" of the short-lived daemon (it holds half as many pins)')
    p.add_argument("--clients", type=int, default=os.cpu_count(), help="storm client processes")
    p.add_argument("--servers", type=int, default=os.cpu_count(), help="storm server processes")
    p.add_argument("--bytes", type=int, default=100, help="bytes each storm connection writes")
    p.add_argument("--write-limit", type=int, default=10, help='"DB write limit (seconds)" (daemon default 10)')
    p.add_argument("--catch-up-limit", type=float, default=300.0)
    p.add_argument("--settle-seconds", type=float, default=30.0,
                   help="idle seconds after catching up before PSS is read again")
    p.add_argument("--stop-limit", type=float, default=150.0, help="seconds to wait for the daemon to stop")
    p.add_argument("--no-syslog", dest="with_syslog", action="store_false",
                   help="no syslog socket: the outlet runs without its sender, as on a machine without /dev/log")
    args = p.parse_args(argv)
    quick = args.quick
    args.storm_seconds = args.storm_seconds or (5 if quick else 30)
    args.baseline_seconds = args.baseline_seconds or (3 if quick else 10)
    args.idle_seconds = args.idle_seconds or (3 if quick else 10)
    args.processes = args.processes or (100 if quick else 1000)
    args.distinct = args.distinct or (300 if quick else 2000)
    if quick and args.write_limit == 10:
        args.write_limit = 2
    if os.geteuid() != 0:
        sys.exit("run as root: the daemon loads BPF programs")
    r = Results(others=other_picosnitch())
    # A socket standing in for journald's /dev/log: the daemon runs as a desktop's does by
    # default, its outlet with the unprivileged sender; the host's journal gets nothing.
    args.syslog = SyslogSocket() if args.with_syslog else None
    with tempfile.TemporaryDirectory(prefix="picosnitch-load-") as tmp:
        work = Path(tmp)
        storm = compile_c(work, "storm", STORM_C)
        once = compile_c(work, "once", ONCE_C)
        try:
            storm_phase(args, storm, work, r)
            short_lived_phase(args, storm, once, work, r)
        finally:
            if args.syslog:
                r.syslog_messages = len(args.syslog.messages)
                args.syslog.close()
    r.others += [o for o in other_picosnitch() if o not in r.others]
    report(args, r)


if __name__ == "__main__":
    main()
