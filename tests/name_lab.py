"""A lab where every kind of program learns a name its own way, for tests/test_domain_names.py and
bench/names.py.

A real DNS server (dnsmasq) runs in the lab namespace and gives every name the same address, the
lab peer's, where one TCP server takes every connection; a second dnsmasq is a local stub resolver
on 127.0.0.53 there. Clients on the host resolve through the first with their own /etc/resolv.conf
(a private mount namespace). What tells their rows apart is only who connected and how it learned
the name: the situation of thousands of names behind one CDN address.
"""

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List

from netlab import PEER4

TESTS = Path(__file__).resolve().parent
CLIENT = str(TESTS / "name_client.py")
MUSL_LIBC = "/usr/lib/x86_64-linux-musl/libc.so"
RESOLVED = ("libc", "curl", "own-dns", "static", "musl-root", "two-a", "two-b", "stub")  # names in DNS
KINDS = RESOLVED + ("tls", "http", "plain")


def available() -> bool:
    return bool(shutil.which("dnsmasq") and shutil.which("musl-gcc") and os.path.exists(MUSL_LIBC))


def tag(kind: str, round_: int = 0) -> str:
    return f"{kind}{'-%d' % round_ if round_ else ''}.names.picosnitch.test"


def marker(kind: str, port: int, round_: int = 0) -> str:
    """What only that client's command line holds."""
    if kind in ("tls", "http"):
        return f"{kind} {PEER4} {port} {tag(kind, round_)}"
    if kind == "plain":
        return f"plain {PEER4} {port}"
    return tag(kind, round_)


class TcpServer:
    """Takes any number of connections on PEER4 in the lab namespace and reads each to EOF."""

    def __init__(self):
        self.ready = threading.Event()

    def serve(self):
        self.sock = socket.create_server((PEER4, 0), backlog=64)
        self.port = self.sock.getsockname()[1]
        self.ready.set()
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._drain, args=(conn,), daemon=True).start()

    @staticmethod
    def _drain(conn):
        conn.settimeout(3)
        with conn:
            try:
                while conn.recv(65536):
                    pass
            except OSError:
                pass


def _dnsmasq(lab, *args: str) -> subprocess.Popen:
    proc = subprocess.Popen([*lab.prefix(), "dnsmasq", "--keep-in-foreground", "--no-resolv", "--no-hosts",
                             "--bind-interfaces", "--pid-file=", "--user=root", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(0.5)
    assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
    return proc


def _private_etc(directory: Path, nameserver: str) -> str:
    """A shell prefix that gives the command its own resolv.conf and an /etc/hosts without the names."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "resolv.conf").write_text(f"nameserver {nameserver}\noptions attempts:1 timeout:2\n")
    (directory / "hosts").write_text("127.0.0.1 localhost\n")
    return (f"mount --bind {directory}/resolv.conf /etc/resolv.conf && "
            f"mount --bind {directory}/hosts /etc/hosts && exec ")


def _shell(etc: str, *command: str) -> str:
    return etc + " ".join(f"'{c}'" for c in command)


class NameLab:
    """The servers, the programs and where the clients' rows are; start() before run(), stop() after."""

    def __init__(self, lab, work: Path, rounds: int = 1):
        self.lab, self.work, self.rounds = lab, Path(work), rounds
        self.servers: List[subprocess.Popen] = []

    def start(self) -> "NameLab":
        hosts = self.work / "lab-hosts"
        self.work.mkdir(parents=True, exist_ok=True)
        hosts.write_text("".join(f"{PEER4} {tag(kind, r)}\n" for kind in RESOLVED for r in range(self.rounds)))
        self.server = TcpServer()
        self.lab.in_peer(self.server.serve)
        assert self.server.ready.wait(5)
        gai_c = TESTS / "c" / "gai.c"
        self.static = self.work / "gai-static"
        subprocess.run(["musl-gcc", "-O2", "-static", "-o", str(self.static), str(gai_c)], check=True)
        self.root = self.work / "musl-root"  # a root of its own with musl, as a container has
        (self.root / "lib").mkdir(parents=True, exist_ok=True)
        (self.root / "etc").mkdir(exist_ok=True)
        shutil.copy(MUSL_LIBC, self.root / "lib" / "ld-musl-x86_64.so.1")
        (self.root / "etc" / "resolv.conf").write_text(f"nameserver {PEER4}\n")
        (self.root / "etc" / "hosts").write_text("127.0.0.1 localhost\n")
        subprocess.run(["musl-gcc", "-O2", "-o", str(self.root / "gai"), str(gai_c)], check=True)
        self.servers = [
            _dnsmasq(self.lab, f"--listen-address={PEER4}", f"--addn-hosts={hosts}", "--local=/picosnitch.test/"),
            _dnsmasq(self.lab, "--listen-address=127.0.0.53", f"--server={PEER4}")]  # a local stub resolver
        self.etc = _private_etc(self.work / "etc", PEER4)
        self.stub_etc = _private_etc(self.work / "stub-etc", "127.0.0.53")
        return self

    @property
    def port(self) -> int:
        return self.server.port

    def commands(self, round_: int) -> Dict[str, List[str]]:
        """The command of each kind of client, for one round."""
        port = str(self.port)
        host = ["unshare", "--mount", "--propagation", "private", "sh", "-c"]
        py = [sys.executable, CLIENT]
        return {
            "libc": host + [_shell(self.etc, *py, "libc", tag("libc", round_), port)],
            "curl": host + [_shell(self.etc, "curl", "--silent", "--max-time", "2",
                                   f"http://{tag('curl', round_)}:{port}/")],
            "own-dns": host + [_shell(self.etc, *py, "own-dns", tag("own-dns", round_), port, PEER4)],
            "static": host + [_shell(self.etc, str(self.static), tag("static", round_), "0", port)],
            "tls": host + [_shell(self.etc, *py, "tls", PEER4, port, tag("tls", round_))],
            "http": host + [_shell(self.etc, *py, "http", PEER4, port, tag("http", round_))],
            "plain": host + [_shell(self.etc, *py, "plain", PEER4, port)],
            # Two programs resolving different names to the one address at the same moment.
            "two-a": host + [_shell(self.etc, *py, "libc", tag("two-a", round_), port)],
            "two-b": host + [_shell(self.etc, *py, "libc", tag("two-b", round_), port)],
            # Its own mount and network namespaces and its own C library, resolving after 0.5 s: a
            # root is probed when a process first execs in it.
            "musl-root": [*self.lab.prefix(), "unshare", "--mount", f"--root={self.root}", "/gai",
                          tag("musl-root", round_), "0.5", port],
            "stub": [*self.lab.prefix(), "unshare", "--mount", "--propagation", "private", "sh", "-c",
                     _shell(self.stub_etc, *py, "libc", tag("stub", round_), port)],
        }

    def run(self, round_: int = 0) -> None:
        """Every kind of client once, at the same time; raises if one could not do its part."""
        running = {kind: subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                   for kind, command in self.commands(round_).items()}
        for kind, proc in running.items():
            out, err = proc.communicate(timeout=60)
            if kind != "curl" and proc.returncode != 0:  # curl gets no HTTP answer: that is all right
                raise RuntimeError(f"the {kind} client failed: {out} {err}")

    def rows_of(self, rows: List[dict], kind: str, round_: int = 0) -> List[dict]:
        return [r for r in rows if marker(kind, self.port, round_) in r["cmdline"]]

    def stop(self) -> None:
        for proc in self.servers:
            proc.terminate()
            proc.wait(10)
        self.server.sock.close()
