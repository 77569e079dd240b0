"""Runs the guard worker against real netfilter, limited to a test's own veth pair.

The guard's iptables chains jump only from traffic on the lab's host interface ("Guard
interfaces"), and its queue number is this session's own, so nothing else on the machine is
queued, and sessions side by side do not meet.
"""

import hashlib
import itertools
import json
import multiprocessing
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import List

from netlab import NetLab, family_of, listen

from picosnitch import config as config_module
from picosnitch.guard import firewall
from picosnitch.guard import worker as guard_worker
from picosnitch.guard.prompt_socket import PromptClient
from picosnitch.messages import ErrorReport, Stop
from picosnitch.paths import Paths

QUEUE = 20000 + os.getpid() % 10000 * 4  # this session's first queue number; each run takes the next
_queues = itertools.count(QUEUE)
# The clients run the system python, which every user (nobody too) may execute.
PYTHON = os.path.realpath("/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable)
_ctx = multiprocessing.get_context("fork")

CLIENT = r"""
import os, socket, sys, time
time.sleep(float(os.environ.get("CLIENT_DELAY", "0")))
kind, host, port, timeout = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET,
                  socket.SOCK_STREAM if kind == "tcp" else socket.SOCK_DGRAM)
s.settimeout(timeout)
try:
    s.connect((host, port))
    if kind == "udp":
        s.send(b"ping")
    print("ok", s.recv(100).decode(), flush=True)
except ConnectionRefusedError:
    print("refused", flush=True)
except socket.timeout:
    print("timeout", flush=True)
except OSError as e:
    print("error", e.errno, flush=True)
"""


def sha256_of(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def peer_lab(lab: NetLab, hosts):
    """A generator for a module's fixture over the session's lab (conftest): the lab, with a
    Peer serving `hosts` as lab.peer while the module runs."""
    lab.peer = Peer(lab, hosts)
    yield lab
    lab.peer.stopped = True


def serve_until(socks, stopped) -> None:
    """Each TCP connection gets "hi", each UDP datagram its echo, until stopped()."""
    import select
    while not stopped():
        for s in select.select(socks, [], [], 0.2)[0]:
            if s.type == socket.SOCK_STREAM:
                c, _ = s.accept()
                c.sendall(b"hi")
                c.close()
            else:
                data, peer = s.recvfrom(100)
                s.sendto(data, peer)


class Peer:
    """TCP and UDP servers in the lab's namespace, on IPv4 and IPv6: each TCP connection gets
    "hi", each UDP datagram its echo ("ping")."""

    def __init__(self, lab: NetLab, hosts):
        self.ports = {}
        self.ready = threading.Event()
        self.stopped = False
        lab.in_peer(lambda: self._serve(hosts))
        self.ready.wait(10)

    def _serve(self, hosts):
        socks = []
        for host in hosts:
            t = listen(host)
            u = socket.socket(family_of(host), socket.SOCK_DGRAM)
            u.bind((host, t.getsockname()[1]))
            self.ports[host] = t.getsockname()[1]
            socks += [t, u]
        self.ready.set()
        serve_until(socks, lambda: self.stopped)


class HostServer:
    """A TCP and a UDP server on the host side (the test process owns them: exe = PYTHON)."""

    def __init__(self, host: str):
        self.tcp = listen(host)
        self.port = self.tcp.getsockname()[1]
        self.udp = socket.socket(family_of(host), socket.SOCK_DGRAM)
        self.udp.bind((host, self.port))
        self.stopped = False
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        serve_until([self.tcp, self.udp], lambda: self.stopped)

    def close(self):
        self.stopped = True
        time.sleep(0.3)
        self.tcp.close()
        self.udp.close()


def client(kind: str, host: str, port: int, timeout: float = 8.0, prefix=(), wait=True, **popen):
    """Runs the client program; returns its outcome ("ok hi", "refused", "timeout", ...), or the
    Popen when not `wait`. The default timeout is for outcomes that should come at once: on a machine
    at load 7 a guarded connect took over 3 s twice (TCP resends its SYN after 1 s and 3 s). Tests
    that expect "timeout" pass a short one."""
    proc = subprocess.Popen([*prefix, PYTHON, "-c", CLIENT, kind, host, str(port), str(timeout)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)
    if not wait:
        return proc
    out, _ = proc.communicate(timeout=timeout + 30)
    return out.strip()


def peer_client(lab: NetLab, kind: str, host: str, port: int, timeout: float = 8.0) -> str:
    """The client program run inside the lab's namespace (inbound to the host)."""
    return client(kind, host, port, timeout, prefix=lab.prefix())


class GuardRun:
    """The guard worker in its own process under a private prefix."""

    def __init__(self, prefix: Path, lab: NetLab, rules: str = "", **settings):
        self.paths = Paths.under(prefix)
        self.paths.ensure_dirs()
        self.lab = lab
        if rules is not None:
            self.paths.rules.write_text(rules)
        self.queue = next(_queues)
        values = {"Guard mode": "ask", "Guard interfaces": [lab.host_if], "Guard queue number": self.queue,
                  "Desktop notifications": False, "Guard timeout (seconds)": 30, **settings}
        self.config = config_module.parse(json.dumps(values))
        self.inbox_r, self.inbox_w = _ctx.Pipe(duplex=False)
        self.keeper_r, self.keeper_w = _ctx.Pipe(duplex=False)
        self.reports: List[str] = []
        self.process = _ctx.Process(target=guard_worker.run,
                                    args=(self.config, self.paths, self.inbox_r, self.keeper_w))
        self.process.start()
        deadline = time.monotonic() + 20
        while not (self.paths.guard_socket.exists() and firewall.installed(self.queue)):
            if time.monotonic() > deadline or not self.process.is_alive():
                raise RuntimeError("guard did not start: %s" % self.errors())
            time.sleep(0.05)

    def errors(self) -> List[str]:
        while self.keeper_r.poll():
            message = self.keeper_r.recv()
            if isinstance(message, ErrorReport):
                self.reports.append(message.message)
        return self.reports

    def set_rules(self, text: str) -> None:
        """Replaces the rules file in one step and waits until the guard has read it."""
        temporary = self.paths.rules.with_name("rules.tmp")
        temporary.write_text(text)
        os.replace(temporary, self.paths.rules)
        time.sleep(0.4)

    def send(self, message) -> None:
        self.inbox_w.send(message)

    def prompt_client(self) -> PromptClient:
        return PromptClient(self.paths.guard_socket)

    def stop(self) -> None:
        if self.process.is_alive():
            self.inbox_w.send(Stop("identity"))
            self.process.join(20)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        firewall.remove(self.queue)

    def kill(self) -> None:
        self.process.kill()
        self.process.join()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def wait_for_prompts(client: PromptClient, count: int = 1, timeout: float = 10.0) -> list:
    """The prompt list once it holds at least `count` prompts."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for message in client.messages(block=False):
            if message.get("type") == "prompts":
                client.latest = message["prompts"]
        prompts = getattr(client, "latest", [])
        if (len(prompts) >= count) if count else not prompts:
            return prompts
        time.sleep(0.05)
    raise AssertionError("expected %d prompts, have %r" % (count, getattr(client, "latest", [])))
