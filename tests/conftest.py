"""Shared fixtures: the real kernel monitor, a private veth/netns lab, compiled C generators."""

import multiprocessing
import os
import shutil
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import pytest

from picosnitch.kernel import libbpf
from picosnitch.kernel.monitor import DRAIN_INTERVAL, KernelMonitor

TESTS = Path(__file__).parent
sys.path.insert(0, str(TESTS))

from netlab import NetLab  # noqa: E402

pytest_plugins = ["host_guard"]  # fails any test that touches the host's own picosnitch


def pytest_sessionfinish(session, exitstatus):
    """A test that failed half-way may leave a worker process behind; Python would wait for it at
    exit (multiprocessing joins its children), and the run would never end."""
    for child in multiprocessing.active_children():
        child.kill()
        child.join(5)


def needs_root():
    if os.geteuid() != 0:
        pytest.skip("needs root: loads BPF programs")


class Recorder:
    """Runs a KernelMonitor in a thread and keeps every record it delivers."""

    def __init__(self, monitor: KernelMonitor):
        self.monitor = monitor
        self.records = []
        self.drains = 0
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self):
        while not self.stop.is_set():
            got = self.monitor.poll(DRAIN_INTERVAL)
            got += self.monitor.drain() + self.monitor.losses()
            with self.lock:
                self.records += got
                self.drains += 1

    def settle(self):
        """Waits until everything that happened before this call has been drained."""
        with self.lock:
            target = self.drains + 3
        while True:
            with self.lock:
                if self.drains >= target:
                    return
            time.sleep(0.05)

    def flows(self, tgid):
        """Flows of one process, once everything before this call has been drained."""
        self.settle()
        return self.of("flow", tgid)

    def of(self, kind, tgid=None):
        with self.lock:
            return [r for r in self.records if r.kind == kind and (tgid is None or r.tgid == tgid)]

    def totals(self, tgid):
        """Sent/received bytes of one process, summed per (family, protocol, raddr, rport)."""
        self.settle()
        out = defaultdict(lambda: [0, 0, 0, 0])
        for f in self.of("flow", tgid):
            t = out[(f.family, f.protocol, f.raddr, f.rport)]
            t[0] += f.bytes_sent
            t[1] += f.bytes_recv
            t[2] += f.packets_sent
            t[3] += f.packets_recv
        return dict(out)

    def close(self):
        self.stop.set()
        self.thread.join()
        self.monitor.close()


def kernel_has(*, tracepoint: str = "", kfunc: str = "", function: str = "") -> bool:
    """Whether the running kernel's BTF describes this tracepoint, or this kfunc or function."""
    if tracepoint:
        return bool(libbpf.kernel_btf_types({"btf_trace_" + tracepoint}))
    return bool(libbpf.kernel_btf_types({kfunc or function}, libbpf.BTF_KIND_FUNC))


def expected_degradations() -> list:
    """The hooks the monitor must leave out here: none on a kernel that counts bytes with the sock
    tracepoints (6.3 and later) or with the fexit fallback (BPF trampolines, probed by loading one)."""
    if kernel_has(tracepoint="sock_send_length") or libbpf.loads_fexit("inet_sendmsg"):
        return []
    return ["no traffic will be counted"]


@pytest.fixture(scope="session")
def recorder():
    needs_root()
    monitor = KernelMonitor()
    degraded = monitor.start()
    assert [d.consequence for d in degraded] == expected_degradations(), degraded
    assert monitor.loads == 1
    rec = Recorder(monitor)
    yield rec
    rec.close()


@pytest.fixture(scope="session")
def lab():
    needs_root()
    with NetLab() as lab:
        yield lab


@pytest.fixture(scope="session")
def netops(tmp_path_factory):
    out = tmp_path_factory.mktemp("netops") / "netops"
    subprocess.run(["gcc", "-O2", "-o", str(out), str(TESTS / "c" / "netops.c"), "-luring", "-pthread"], check=True)
    return str(out)


@pytest.fixture(scope="session")
def deb(tmp_path_factory):
    """The Debian package: scripts/test.sh builds it once (PICOSNITCH_DEB); otherwise it is built here."""
    given = os.environ.get("PICOSNITCH_DEB")
    if given:
        return Path(given)
    if not shutil.which("dpkg-buildpackage") or not shutil.which("dh"):
        pytest.skip("needs dpkg-dev and debhelper (scripts/install-system-deps.sh test)")
    out = tmp_path_factory.mktemp("deb")
    built = subprocess.run([str(TESTS.parent / "scripts/build-deb.sh"), str(out)], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    return Path(built.stdout.strip())
