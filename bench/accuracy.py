"""Attribution accuracy: 24 traffic scenarios through the real daemon, scored against the
generators' own byte counts, with nethogs side by side where it is installed.

    sudo python3 -m bench.accuracy [--quick] [--repeats 3] [--only 1,4,16] [--json PATH] [--markdown]

For every scenario and repeat: a fresh daemon (`picosnitch start-no-daemon` through
tests/daemon_harness.Daemon, own PICOSNITCH_PREFIX, "DB write limit (seconds)" 1), the
generator (tests/traffic_gen.py, or tests/c/netops.c compiled here), SIGTERM (the daemon drains
and writes everything before it exits), then the `connections` view. Traffic crosses the veth
pair of tests/netlab.NetLab into a namespace this benchmark creates (its per-session addresses
only), or loopback where the scenario says so.

Scoring, per repeat:
- detection: the rows that carry the scenario's traffic are found by what the traffic is
  (remote address and port, or protocol / address family where the kernel gives no peer), not by
  who sent it. PASS: every byte of them is charged to the generator's executable (exact path and
  sha256; and for the container scenario, the container). PARTIAL: seen, but some bytes are
  charged to something else. FAIL: not seen.
- bytes: send and recv of the correctly attributed rows against the generator's own counts;
  the worst direction decides: PASS within 1 %, PARTIAL within 10 %, FAIL beyond.
A scenario the machine cannot run (SCTP without kernel support) is N/A with the reason.

`--quick` runs scenarios 1, 4, 11 and 16 once and exits 1 if any detection FAILs (CI runs this
through tests/test_bench_quick.py).
"""

import argparse
import contextlib
import errno
import hashlib
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

REPO = Path(__file__).resolve().parent.parent
TESTS = REPO / "tests"
sys.path.insert(0, str(TESTS))
sys.path.insert(0, str(REPO))

from daemon_harness import Daemon  # noqa: E402
from netlab import _SESSION, PEER4, PEER6, NetLab, sh  # noqa: E402

from bench.peers import TcpSink, UdpServer, start  # noqa: E402

GEN = str(TESTS / "traffic_gen.py")
PYTHON = os.path.realpath(sys.executable)
MiB = 1 << 20
CONTAINER_UP = 16 * MiB
QUICK = (1, 4, 11, 16)
# The container's own link to the peer namespace: a /64 of this session's lab prefix.
CONTAINER6, CONTAINER_PEER6 = f"fd00:5e:{_SESSION:x}:1::1", f"fd00:5e:{_SESSION:x}:1::2"


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class NotApplicable(Exception):
    """The machine cannot run this scenario; the message says why."""


@dataclass
class Outcome:
    """What a scenario did: its ground truth and how to find its rows in the view."""
    sent: int
    recv: int
    exe: List[str]                 # acceptable exe paths (the container's may be seen either way)
    sha256: str
    where: str                     # SQL on `connections` selecting the traffic, whoever sent it
    params: tuple = ()
    pids: List[int] = field(default_factory=list)
    container: Optional[str] = None
    note: str = ""


@dataclass
class Context:
    lab: NetLab
    work: Path
    netops: str
    netops_static: Optional[str]
    host_netns: int


def run_gen(argv: List[str], prefix=(), timeout: float = 180):
    """Runs one generator to completion; returns (pid, its JSON byte counts)."""
    proc = subprocess.Popen([*prefix, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{argv[:3]} exited {proc.returncode}: {err.strip()[-300:]}")
    return proc.pid, json.loads(out.strip().splitlines()[-1])


def py(*args) -> List[str]:
    return [PYTHON, GEN, *map(str, args)]


def endpoint(host: str, port: int, protocol: int):
    return "raddr = ? AND rport = ? AND protocol = ?", (host, port, protocol)


@contextlib.contextmanager
def serving(server, lab=None):
    start(server, lab)
    try:
        yield server
    finally:
        server.stop()


# --- scenarios -------------------------------------------------------------------------------

def tcp_transfer(host, up, down, lab=True, kind="tcp"):
    def run(ctx: Context) -> Outcome:
        with serving(TcpSink(host, reply=down), ctx.lab if lab else None) as sink:
            pid, c = run_gen(py(kind, host, sink.port, up))
        return Outcome(c["sent"], c["recv"], [PYTHON], sha256_file(PYTHON), *endpoint(host, sink.port, 6), [pid])
    return run


def udp_echo(host, port, count, size):
    def run(ctx):
        with serving(UdpServer(host, port, "echo"), ctx.lab) as echo:
            pid, c = run_gen(py("udp-connected", host, echo.port, count, size))
        return Outcome(c["sent"], c["recv"], [PYTHON], sha256_file(PYTHON), *endpoint(host, echo.port, 17), [pid])
    return run


def icmp_flood(ctx):
    pid, c = run_gen(py("ping-raw", PEER4, 500, 1000))
    return Outcome(c["sent"], c["recv"], [PYTHON], sha256_file(PYTHON),
                   "family = 2 AND protocol = 1 AND netns = ?", (ctx.host_netns,), [pid],
                   note="raw ICMP socket (the host's ping_group_range allows no ping sockets)")


def sctp_support() -> None:
    try:
        socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_SCTP).close()
    except OSError as e:
        has_module = any(Path(f"/lib/modules/{platform.release()}").rglob("sctp.ko*")) \
            if Path(f"/lib/modules/{platform.release()}").exists() else False
        raise NotApplicable(
            f"kernel {platform.release()} has no SCTP: socket(AF_INET, SOCK_STREAM, IPPROTO_SCTP) fails with "
            f"{errno.errorcode.get(e.errno, e.errno)}, /proc/net/sctp is absent and "
            + ("an sctp module exists but is not loaded" if has_module else "no sctp module is installed"))


def sctp(ctx):
    sctp_support()
    with serving(TcpSink(PEER4, proto=socket.IPPROTO_SCTP), ctx.lab) as sink:
        pid, c = run_gen(py("sctp", PEER4, sink.port, 8 * MiB))
    return Outcome(c["sent"], c["recv"], [PYTHON], sha256_file(PYTHON), *endpoint(PEER4, sink.port, 132), [pid])


def dns_flood(ctx):
    with serving(UdpServer(PEER4, 53, "sink"), ctx.lab):
        pid, c = run_gen(py("udp-flood", PEER4, 53, 20000, 40))
    return Outcome(c["sent"], c["recv"], [PYTHON], sha256_file(PYTHON), *endpoint(PEER4, 53, 17), [pid])


def raw_253(ctx):
    pid, c = run_gen(py("raw", PEER4, 2000, 1000, 253))
    return Outcome(c["sent"], c["recv"], [PYTHON], sha256_file(PYTHON),
                   "family = 2 AND protocol = 253 AND netns = ?", (ctx.host_netns,), [pid])


def many_processes(count, size, parallel):
    def run(ctx):
        with serving(TcpSink(PEER4), ctx.lab) as sink:
            with ThreadPoolExecutor(parallel) as pool:
                results = list(pool.map(lambda _: run_gen([ctx.netops, "quick", PEER4, str(sink.port), str(size)]),
                                        range(count)))
        return Outcome(sum(c["sent"] for _, c in results), 0, [ctx.netops], sha256_file(ctx.netops),
                       *endpoint(PEER4, sink.port, 6), [pid for pid, _ in results])
    return run


def af_packet(ctx):
    pid, c = run_gen(py("packet-send", ctx.lab.host_if, 2000, 200))
    return Outcome(c["sent"], c["recv"], [PYTHON], sha256_file(PYTHON),
                   "family = 17 AND protocol = 34997 AND netns = ?", (ctx.host_netns,), [pid])


def netops_tcp(mode_args, up, down):
    def run(ctx):
        with serving(TcpSink(PEER4, reply=down), ctx.lab) as sink:
            pid, c = run_gen([ctx.netops, mode_args, PEER4, str(sink.port), str(up)])
        return Outcome(c["sent"], c["recv"], [ctx.netops], sha256_file(ctx.netops),
                       *endpoint(PEER4, sink.port, 6), [pid])
    return run


def sendfile_up(ctx):
    with serving(TcpSink(PEER4), ctx.lab) as sink:
        pid, c = run_gen(py("sendfile", PEER4, sink.port, 32 * MiB))
    return Outcome(c["sent"], c["recv"], [PYTHON], sha256_file(PYTHON), *endpoint(PEER4, sink.port, 6), [pid])


def splice_down(ctx):
    with serving(TcpSink(PEER4, reply=32 * MiB), ctx.lab) as sink:
        pid, c = run_gen(py("splice", PEER4, sink.port))
    return Outcome(c["sent"], c["recv"], [PYTHON], sha256_file(PYTHON), *endpoint(PEER4, sink.port, 6), [pid])


def sendmmsg_up(ctx):
    with serving(UdpServer(PEER4, 0, "sink"), ctx.lab) as sink:
        pid, c = run_gen([ctx.netops, "mmsg-send", PEER4, str(sink.port), "200", "64", "1200"])
    return Outcome(c["sent"], c["recv"], [ctx.netops], sha256_file(ctx.netops), *endpoint(PEER4, sink.port, 17), [pid])


def recvmmsg_down(ctx):
    with serving(UdpServer(PEER4, 0, "pull"), ctx.lab) as server:
        pid, c = run_gen([ctx.netops, "mmsg-recv", PEER4, str(server.port), "8000", "1200"])
    return Outcome(c["sent"], c["recv"], [ctx.netops], sha256_file(ctx.netops),
                   *endpoint(PEER4, server.port, 17), [pid], note=f"{c['datagrams']} of 8000 datagrams arrived")


def udp6_down(ctx):
    with serving(UdpServer(PEER6, 0, "pull"), ctx.lab) as server:
        pid, c = run_gen(py("udp-pull", PEER6, server.port, 5000, 1200))
    return Outcome(c["sent"], c["recv"], [PYTHON], sha256_file(PYTHON), *endpoint(PEER6, server.port, 17), [pid],
                   note=f"{c['datagrams']} of 5000 datagrams arrived")


def drip(ctx):
    with serving(TcpSink(PEER4, reply=0), ctx.lab) as sink:
        pid, c = run_gen(py("drip", PEER4, sink.port, 60, 100, 0.5), timeout=120)
    return Outcome(c["sent"], c["recv"], [PYTHON], sha256_file(PYTHON), *endpoint(PEER4, sink.port, 6), [pid])


def many_connections(ctx):
    with serving(TcpSink(PEER4, reply=100), ctx.lab) as sink:
        pid, c = run_gen(py("tcp-many", PEER4, sink.port, 500, 200))
    return Outcome(c["sent"], c["recv"], [PYTHON], sha256_file(PYTHON), *endpoint(PEER4, sink.port, 6), [pid])


def cgroup2_dir() -> Path:
    from picosnitch.kernel.monitor import cgroup2_root
    root = cgroup2_root()
    if not root:
        raise NotApplicable("no cgroup2 hierarchy is mounted")
    return Path(root)


def container(ctx):
    """A process with its own mount, pid and network namespaces and its own root (busybox-static
    and a statically linked netops), in a cgroup named as systemd-nspawn names a machine's, talking
    to the peer over its own veth pair."""
    busybox = shutil.which("busybox")
    if not busybox or not _static(busybox):
        raise NotApplicable("no static busybox (apt-get install busybox-static)")
    if not ctx.netops_static:
        raise NotApplicable("netops could not be linked statically (liburing.a missing?)")
    rootfs = ctx.work / "rootfs"
    if not rootfs.exists():
        for d in ("bin", "proc", "dev", "tmp", "etc"):
            (rootfs / d).mkdir(parents=True, exist_ok=True)
        shutil.copy2(busybox, rootfs / "bin" / "busybox")
        for applet in ("sh", "sleep", "cat"):
            (rootfs / "bin" / applet).symlink_to("busybox")
        shutil.copy2(ctx.netops_static, rootfs / "bin" / "netops")
    (rootfs / "go").unlink(missing_ok=True)
    name = f"psbench{_SESSION}"
    cgroup = cgroup2_dir() / "machine.slice" / f"machine-{name}.scope"
    cgroup.mkdir(parents=True, exist_ok=True)
    tag = str(os.getpid())[-6:]
    host_if, peer_if = f"psc{tag}", f"pscp{tag}"
    script = (f"while [ ! -e /go ]; do sleep 0.05; done; "
              f"exec /bin/netops uring {CONTAINER_PEER6} PORT {CONTAINER_UP}")
    sink = TcpSink(CONTAINER_PEER6, reply=8 * MiB)
    proc = None
    try:
        sh("ip", "link", "add", host_if, "type", "veth", "peer", "name", peer_if)
        sh("ip", "link", "set", peer_if, "netns", ctx.lab.ns)
        ctx.lab.run("ip", "-6", "addr", "add", f"{CONTAINER_PEER6}/64", "dev", peer_if, "nodad")
        ctx.lab.run("ip", "link", "set", peer_if, "up")
        start(sink, ctx.lab)
        inner = script.replace("PORT", str(sink.port))
        proc = subprocess.Popen(
            ["sh", "-c", f'echo $$ > {cgroup}/cgroup.procs && exec unshare --mount --pid --net --fork '
                         f'--mount-proc={rootfs}/proc chroot {rootfs} /bin/sh -c "{inner}"'],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        own = os.readlink("/proc/self/ns/net")
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{proc.pid}/ns/net") != own:
                    break
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"container did not start: {proc.stderr.read() if proc.poll() is not None else ''}")
            time.sleep(0.02)
        sh("ip", "link", "set", host_if, "netns", str(proc.pid))
        enter = ["nsenter", "-t", str(proc.pid), "-n"]
        sh(*enter, "ip", "-6", "addr", "add", f"{CONTAINER6}/64", "dev", host_if, "nodad")
        sh(*enter, "ip", "link", "set", host_if, "up")
        sh(*enter, "ip", "link", "set", "lo", "up")
        container_netns = os.stat(f"/proc/{proc.pid}/ns/net").st_ino
        (rootfs / "go").touch()
        out, err = proc.communicate(timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"container exited {proc.returncode}: {err.strip()[-300:]}")
        c = json.loads(out.strip().splitlines()[-1])
    finally:
        sink.stop()
        if proc and proc.poll() is None:
            proc.kill()
            proc.wait()
        subprocess.run(["ip", "link", "del", host_if], capture_output=True)
        subprocess.run([*ctx.lab.prefix(), "ip", "link", "del", peer_if], capture_output=True)  # gone with its pair
        with contextlib.suppress(OSError):
            time.sleep(0.1)
            cgroup.rmdir()
    where, params = endpoint(CONTAINER_PEER6, sink.port, 6)
    return Outcome(c["sent"], c["recv"], ["/bin/netops", str(rootfs / "bin" / "netops")],
                   sha256_file(ctx.netops_static), where + " AND netns = ?", params + (container_netns,),
                   container=f"nspawn:{name}",
                   note=f"cgroup {cgroup.relative_to(cgroup2_dir())}; rootfs {rootfs}")


def _static(path: str) -> bool:
    out = subprocess.run(["ldd", path], capture_output=True, text=True)
    return "not a dynamic executable" in out.stdout + out.stderr


@dataclass
class Scenario:
    number: int
    name: str
    run: Callable[[Context], Outcome]
    where: str = "veth"


SCENARIOS = [
    Scenario(1, "TCP bulk download (64 MiB)", tcp_transfer(PEER4, 0, 64 * MiB)),
    Scenario(2, "TCP bulk upload (64 MiB)", tcp_transfer(PEER4, 64 * MiB, 0)),
    Scenario(3, "TCP full duplex (48 MiB up, 32 MiB down at once)",
             tcp_transfer(PEER4, 48 * MiB, 32 * MiB, kind="tcp-duplex")),
    Scenario(4, "UDP bulk both ways (3000 × 1400 B echoed)", udp_echo(PEER4, 0, 3000, 1400)),
    Scenario(5, "ICMP echo flood (500 × 1000 B payload)", icmp_flood),
    Scenario(6, "UDP to port 443 bulk (3000 × 1200 B echoed)", udp_echo(PEER4, 443, 3000, 1200)),
    Scenario(7, "IPv6 TCP (32 MiB up, 16 MiB down)", tcp_transfer(PEER6, 32 * MiB, 16 * MiB)),
    Scenario(8, "SCTP transfer (8 MiB)", sctp),
    Scenario(9, "small UDP flood to port 53 (20000 × 40 B, sendto)", dns_flood),
    Scenario(10, "raw IP, protocol 253 (2000 × 1000 B)", raw_253),
    Scenario(11, "200 short-lived processes (1000 B each, 4 at a time)", many_processes(200, 1000, 4)),
    Scenario(12, "AF_PACKET frame injection (2000 × 214 B)", af_packet),
    Scenario(13, "io_uring upload (32 MiB)", netops_tcp("uring", 32 * MiB, 0)),
    Scenario(14, "sendfile() upload (32 MiB)", sendfile_up),
    Scenario(15, "sendmmsg batched UDP upload (200 × 64 × 1200 B)", sendmmsg_up),
    Scenario(16, "loopback-only TCP (32 MiB up, 8 MiB down)", tcp_transfer("127.0.0.1", 32 * MiB, 8 * MiB, lab=False),
             "loopback"),
    Scenario(17, "container (mount+pid+net ns, own root, io_uring 16 MiB up / 8 MiB down)", container,
             "container veth"),
    Scenario(18, "low-and-slow drip upload (100 B every 0.5 s for 60 s)", drip),
    Scenario(19, "500 small TCP connections (200 B up, 100 B down each)", many_connections),
    Scenario(20, "parallel burst: 64 processes at once (64 KiB each)", many_processes(64, 65536, 64)),
    Scenario(21, "io_uring download (32 MiB)", netops_tcp("uring", 0, 32 * MiB)),
    Scenario(22, "splice() download (32 MiB)", splice_down),
    Scenario(23, "recvmmsg batched UDP download (8000 × 1200 B pulled)", recvmmsg_down),
    Scenario(24, "IPv6 UDP download (5000 × 1200 B pulled)", udp6_down),
]


# --- nethogs side by side --------------------------------------------------------------------

class Nethogs:
    """`nethogs -t -a -C -v 2` (trace mode, loopback allowed, TCP and UDP, totals in bytes) on the
    interface a scenario crosses, for the length of the scenario."""

    def __init__(self, devices: List[str]):
        self.devices = devices
        self.proc = None

    @staticmethod
    def available() -> Optional[str]:
        path = shutil.which("nethogs")
        if not path:
            return None
        out = subprocess.run([path, "-V"], capture_output=True, text=True)
        return (out.stdout + out.stderr).strip().replace("version ", "") or "?"

    def __enter__(self):
        self.proc = subprocess.Popen(["nethogs", "-t", "-a", "-C", "-v", "2", "-d", "1", *self.devices],
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        time.sleep(1.5)  # it has to open its captures before the traffic starts
        return self

    def __exit__(self, *exc):
        if self.proc.poll() is None:
            self.proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.output = self.proc.communicate(timeout=10)[0]

    def finish(self) -> Dict[tuple, List[int]]:
        """Waits for a last refresh, stops it, and returns (program, pid) -> [sent, recv], the
        highest totals it printed for each."""
        time.sleep(2.2)
        self.__exit__()
        seen: Dict[tuple, List[int]] = {}
        for line in getattr(self, "output", "").splitlines():
            parts = line.split("\t")
            if len(parts) != 3:
                continue
            ident, sent, recv = parts
            program, _, rest = ident.rpartition("/")  # program/pid/uid
            program, _, pid = program.rpartition("/")
            try:
                values = [int(float(sent)), int(float(recv))]
            except ValueError:
                continue
            key = (program, int(pid) if pid.isdigit() else 0)
            old = seen.get(key, [0, 0])
            seen[key] = [max(old[0], values[0]), max(old[1], values[1])]
        return seen


def score_nethogs(seen: Dict[tuple, List[int]], outcome: Outcome, own_pid: int) -> dict:
    pids = set(outcome.pids)
    mine = [v for (prog, pid), v in seen.items() if pid in pids]
    other = [(prog, pid, v) for (prog, pid), v in seen.items()
             if pid not in pids and pid != own_pid and sum(v)]
    sent, recv = sum(v[0] for v in mine), sum(v[1] for v in mine)
    if mine and sent + recv:
        detection = "PASS"
    elif other:
        detection = "PARTIAL"
    else:
        detection = "FAIL"
    return {"detection": detection, "sent": sent, "recv": recv, "bytes": grade_bytes(outcome, sent, recv)[0],
            "other": [f"{prog}/{pid}" for prog, pid, _ in other][:4]}


# --- scoring ---------------------------------------------------------------------------------

def grade_bytes(outcome: Outcome, sent: int, recv: int):
    """(grade, worst relative error): each direction with traffic against its truth; a direction
    with no true traffic against the total."""
    total = max(outcome.sent + outcome.recv, 1)
    errors = []
    for truth, got in ((outcome.sent, sent), (outcome.recv, recv)):
        errors.append(abs(got - truth) / truth if truth else got / total)
    worst = max(errors)
    return ("PASS" if worst <= 0.01 else "PARTIAL" if worst <= 0.10 else "FAIL"), worst


def score(rows: List[dict], outcome: Outcome) -> dict:
    def ours(r):
        return (r["exe"] in outcome.exe and r["sha256"] == outcome.sha256
                and (outcome.container is None or r["container"] == outcome.container))

    good = [r for r in rows if ours(r)]
    bad = [r for r in rows if not ours(r) and (r["send"] or r["recv"])]
    if not rows:
        detection = "FAIL"
    elif bad or not good:
        detection = "PARTIAL"
    else:
        detection = "PASS"
    sent, recv = sum(r["send"] for r in good), sum(r["recv"] for r in good)
    grade, worst = grade_bytes(outcome, sent, recv)
    wrong = sorted({(r["exe"], r["sha256"][:12], r["container"]) for r in bad})
    return {"detection": detection, "bytes": grade, "error": worst, "sent": sent, "recv": recv,
            "truth_sent": outcome.sent, "truth_recv": outcome.recv, "rows": len(rows),
            "misattributed": [f"{e} ({s}…, container {c!r}): "
                              f"{sum(r['send'] + r['recv'] for r in bad if r['exe'] == e)} B" for e, s, c in wrong],
            "seen_sent": sum(r["send"] for r in rows), "seen_recv": sum(r["recv"] for r in rows),
            "exe_seen": sorted({r["exe"] for r in good}), "container_seen": sorted({r["container"] for r in rows}),
            "note": outcome.note}


def run_scenario(scenario: Scenario, ctx: Context, repeat: int, nethogs: Optional[str]) -> dict:
    daemon = Daemon(ctx.work / f"daemon-{scenario.number}-{repeat}")
    daemon.start()
    hogs = None
    try:
        if nethogs:
            # Only the interface the scenario crosses: the machine's other loopback traffic stays out.
            hogs = Nethogs(["lo"] if scenario.where == "loopback" else [ctx.lab.host_if]).__enter__()
        outcome = scenario.run(ctx)
        seen = hogs.finish() if hogs else None
        hogs = None
    finally:
        if hogs:
            hogs.__exit__()
        daemon.stop()
    rows = daemon.rows(outcome.where, outcome.params)
    result = score(rows, outcome)
    if seen is not None:
        result["nethogs"] = score_nethogs(seen, outcome, os.getpid())
    errors = [line for line in daemon.error_log().splitlines() if line.strip()]
    if errors:
        result["error_log"] = errors[-5:]
    shutil.rmtree(daemon.prefix, ignore_errors=True)
    return result


def build_netops(work: Path):
    source = str(TESTS / "c" / "netops.c")
    dynamic = work / "netops"
    subprocess.run(["gcc", "-O2", "-o", str(dynamic), source, "-luring", "-pthread"], check=True)
    static = work / "netops-static"
    ok = subprocess.run(["gcc", "-O2", "-static", "-o", str(static), source, "-luring", "-pthread"],
                        capture_output=True).returncode == 0
    return str(dynamic), (str(static) if ok else None)


def ensure_packages(packages: List[str]) -> List[str]:
    """apt-get installs what is missing (Debian/Ubuntu); returns what is still missing."""
    missing = [p for p in packages if subprocess.run(["dpkg-query", "-W", "-f=${Status}", p], capture_output=True,
                                                     text=True).stdout != "install ok installed"]
    if missing and shutil.which("apt-get"):
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing],
                       capture_output=True, env=env)
        missing = [p for p in missing if subprocess.run(["dpkg-query", "-W", "-f=${Status}", p], capture_output=True,
                                                        text=True).stdout != "install ok installed"]
    return missing


def run(numbers: List[int], repeats: int, use_nethogs: bool = True, log=print) -> dict:
    work = Path(tempfile.mkdtemp(prefix="picosnitch-bench-accuracy-", dir="/var/tmp"))
    netops, netops_static = build_netops(work)
    nethogs = Nethogs.available() if use_nethogs else None
    results = {"started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "repeats": repeats,
               "nethogs": nethogs, "scenarios": []}
    try:
        with NetLab() as lab:
            ctx = Context(lab, work, netops, netops_static, os.stat("/proc/self/ns/net").st_ino)
            for scenario in SCENARIOS:
                if scenario.number not in numbers:
                    continue
                entry = {"number": scenario.number, "name": scenario.name, "where": scenario.where, "runs": []}
                results["scenarios"].append(entry)
                for repeat in range(repeats):
                    began = time.monotonic()
                    try:
                        result = run_scenario(scenario, ctx, repeat, nethogs)
                    except NotApplicable as e:
                        entry["na"] = str(e)
                        log(f"{scenario.number:>2} {scenario.name}: N/A ({e})")
                        break
                    except Exception as e:  # a generator that broke is the benchmark's failure, shown as such
                        result = {"detection": "ERROR", "bytes": "ERROR", "error": 1.0, "exception": repr(e)}
                    result["seconds"] = round(time.monotonic() - began, 1)
                    entry["runs"].append(result)
                    log(f"{scenario.number:>2} {scenario.name} [{repeat + 1}/{repeats}]: detection "
                        f"{result['detection']}, bytes {result['bytes']} "
                        + (f"(sent {result['sent']}/{result['truth_sent']}, recv {result['recv']}/"
                           f"{result['truth_recv']})" if "sent" in result else result.get("exception", ""))
                        + (f"; nethogs {result['nethogs']['detection']}/{result['nethogs']['bytes']}"
                           if "nethogs" in result else ""))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return results


# --- report ----------------------------------------------------------------------------------

def _grades(runs: List[dict], key: str, sub: Optional[str] = None) -> str:
    values = [(r[sub] if sub else r).get(key, "?") for r in runs if not sub or sub in r]
    if not values:
        return "–"
    if len(set(values)) == 1:
        return values[0] + (f" ×{len(values)}" if len(values) > 1 else "")
    return "**" + ", ".join(values) + "**"


def _bytes_text(runs: List[dict]) -> str:
    texts = []
    for r in runs:
        if "sent" not in r:
            continue
        texts.append(f"{r['sent']:,}/{r['truth_sent']:,} ↑, {r['recv']:,}/{r['truth_recv']:,} ↓")
    if not texts:
        return "–"
    return texts[0] if len(set(texts)) == 1 else "; ".join(dict.fromkeys(texts))


def markdown(results: dict) -> str:
    hogs = results.get("nethogs")
    lines = ["| # | scenario | path | detection | bytes | reported/true bytes (↑ sent, ↓ received) "
             + ("| nethogs " + hogs + " detection | nethogs bytes |" if hogs else "|"),
             "|---|---|---|---|---|---|" + ("---|---|" if hogs else "")]
    disagreements = []
    for s in results["scenarios"]:
        runs = s["runs"]
        if "na" in s and not runs:
            lines.append(f"| {s['number']} | {s['name']} | {s['where']} | N/A | N/A | {s['na']} |"
                         + (" N/A | N/A |" if hogs else ""))
            continue
        row = (f"| {s['number']} | {s['name']} | {s['where']} | {_grades(runs, 'detection')} | "
               f"{_grades(runs, 'bytes')} | {_bytes_text(runs)} |")
        if hogs:
            nh = [r["nethogs"] for r in runs if "nethogs" in r]
            nh_bytes = "; ".join(dict.fromkeys(f"{n['sent']:,} ↑ {n['recv']:,} ↓" for n in nh)) or "–"
            row += f" {_grades(runs, 'detection', 'nethogs')} | {nh_bytes} |"
        lines.append(row)
        for key in ("detection", "bytes"):
            if len({r.get(key) for r in runs}) > 1:
                disagreements.append(f"scenario {s['number']}: {key} " + ", ".join(r.get(key, '?') for r in runs))
    out = "\n".join(lines) + "\n"
    details = []
    for s in results["scenarios"]:
        for i, r in enumerate(s["runs"]):
            extra = []
            if r.get("misattributed"):
                extra.append("charged elsewhere: " + "; ".join(r["misattributed"])
                             + (f" (all rows of the traffic: {r['seen_sent']:,} B sent, {r['seen_recv']:,} B "
                                "received)" if "seen_sent" in r else ""))
            if r.get("exception"):
                extra.append("error: " + r["exception"])
            if r.get("detection") in ("PARTIAL", "FAIL") and not r.get("rows"):
                extra.append("no rows matched")
            if r.get("note"):
                extra.append(r["note"])
            if r.get("container_seen") and s["number"] == 17:
                extra.append(f"exe {r.get('exe_seen')}, container {r['container_seen']}")
            if extra:
                details.append(f"- {s['number']} run {i + 1}: " + "; ".join(extra))
    if disagreements:
        out += "\nDisagreements between repeats: " + "; ".join(disagreements) + ".\n"
    if details:
        out += "\nPer-run notes:\n\n" + "\n".join(details) + "\n"
    return out


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m bench.accuracy", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help=f"scenarios {QUICK} once; exit 1 on a detection FAIL")
    p.add_argument("--repeats", type=int)
    p.add_argument("--only", help="comma-separated scenario numbers")
    p.add_argument("--no-nethogs", action="store_true")
    p.add_argument("--no-install", action="store_true", help="do not apt-get install nethogs, busybox-static")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--markdown", action="store_true", help="print the scorecard as markdown")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("bench.accuracy loads BPF programs and creates namespaces: run as root", file=sys.stderr)
        return 2
    numbers = [int(n) for n in args.only.split(",")] if args.only else list(QUICK) if args.quick else \
        [s.number for s in SCENARIOS]
    repeats = args.repeats or (1 if args.quick else 3)
    if not args.no_install and not args.quick:
        missing = ensure_packages(["nethogs", "busybox-static"])
        if missing:
            print(f"could not install {missing}; the scenarios that need them are N/A", file=sys.stderr)
    subprocess.run(["make", "-s", "-C", str(REPO / "picosnitch" / "kernel" / "bpf")], check=True)
    results = run(numbers, repeats, use_nethogs=not args.no_nethogs and not args.quick)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    print()
    print(markdown(results))
    failed = [s["number"] for s in results["scenarios"] for r in s["runs"] if r["detection"] in ("FAIL", "ERROR")]
    if failed:
        print(f"detection FAIL in scenarios {sorted(set(failed))}", file=sys.stderr)
    return 1 if args.quick and failed else 0


if __name__ == "__main__":
    sys.exit(main())
