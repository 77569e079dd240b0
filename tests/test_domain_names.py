"""Domain names from every resolver, and never a wrong one, against the real daemon.

A real DNS server (dnsmasq) runs in the lab namespace and gives every test name the same address,
the lab peer's, where one TCP server takes every connection: what tells the rows apart is only
who connected and how it learned the name. Clients on the host resolve through it with their own
/etc/resolv.conf (a private mount namespace). Each kind of program must get the name it used, and
a program that named nothing must get none, although all of them talked to one address moments
apart: the same situation as thousands of names behind one CDN address.
"""

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from daemon_harness import Daemon, wait_for
from netlab import PEER4

TESTS = Path(__file__).resolve().parent
CLIENT = str(TESTS / "name_client.py")
MUSL_LIBC = "/usr/lib/x86_64-linux-musl/libc.so"
NAMES = ("libc", "curl", "own-dns", "static", "musl-root", "two-a", "two-b", "stub")


def tag(kind: str) -> str:
    return f"{kind}.names.picosnitch.test"


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


def dnsmasq(lab, *args: str) -> subprocess.Popen:
    proc = subprocess.Popen([*lab.prefix(), "dnsmasq", "--keep-in-foreground", "--no-resolv", "--no-hosts",
                             "--bind-interfaces", "--pid-file=", "--user=root", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(0.5)
    assert proc.poll() is None, proc.stderr.read()
    return proc


def private_etc(directory: Path, nameserver: str) -> str:
    """A shell prefix that gives the command its own resolv.conf and an /etc/hosts without the names."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "resolv.conf").write_text(f"nameserver {nameserver}\noptions attempts:1 timeout:2\n")
    (directory / "hosts").write_text("127.0.0.1 localhost\n")
    return (f"mount --bind {directory}/resolv.conf /etc/resolv.conf && "
            f"mount --bind {directory}/hosts /etc/hosts && exec ")


def on_host(etc: str, *command: str) -> subprocess.Popen:
    return subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                             etc + " ".join(f"'{c}'" for c in command)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(kind: str, proc: subprocess.Popen) -> str:
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, f"the {kind} client failed: {out} {err}"
    return out


@pytest.fixture(scope="module")
def named(lab, netops, tmp_path_factory):
    if not shutil.which("dnsmasq") or not shutil.which("musl-gcc") or not os.path.exists(MUSL_LIBC):
        pytest.skip("needs dnsmasq-base and musl-tools (scripts/install-system-deps.sh test)")
    work = tmp_path_factory.mktemp("names")
    hosts = work / "lab-hosts"
    hosts.write_text("".join(f"{PEER4} {tag(kind)}\n" for kind in NAMES))
    server = TcpServer()
    lab.in_peer(server.serve)
    assert server.ready.wait(5)
    port = str(server.port)
    gai_c = TESTS / "c" / "gai.c"
    static = work / "gai-static"
    subprocess.run(["musl-gcc", "-O2", "-static", "-o", str(static), str(gai_c)], check=True)
    root = work / "musl-root"  # a root of its own with musl, as a container has
    (root / "lib").mkdir(parents=True)
    (root / "etc").mkdir()
    shutil.copy(MUSL_LIBC, root / "lib" / "ld-musl-x86_64.so.1")
    (root / "etc" / "resolv.conf").write_text(f"nameserver {PEER4}\n")
    (root / "etc" / "hosts").write_text("127.0.0.1 localhost\n")
    subprocess.run(["musl-gcc", "-O2", "-o", str(root / "gai"), str(gai_c)], check=True)

    servers = [dnsmasq(lab, f"--listen-address={PEER4}", f"--addn-hosts={hosts}", "--local=/picosnitch.test/"),
               dnsmasq(lab, "--listen-address=127.0.0.53", f"--server={PEER4}")]  # a local stub resolver
    etc = private_etc(work / "etc", PEER4)
    stub_etc = private_etc(work / "stub-etc", "127.0.0.53")
    daemon = Daemon(work / "prefix").start()
    try:
        clients = {
            "libc": on_host(etc, sys.executable, CLIENT, "libc", tag("libc"), port),
            "curl": on_host(etc, "curl", "--silent", "--max-time", "2", f"http://{tag('curl')}:{port}/"),
            "own-dns": on_host(etc, sys.executable, CLIENT, "own-dns", tag("own-dns"), port, PEER4),
            "static": on_host(etc, str(static), tag("static"), "0", port),
            "tls": on_host(etc, sys.executable, CLIENT, "tls", PEER4, port, tag("tls")),
            "http": on_host(etc, sys.executable, CLIENT, "http", PEER4, port, tag("http")),
            "plain": on_host(etc, sys.executable, CLIENT, "plain", PEER4, port),
        }
        # Two programs resolving different names to the one address at the same moment.
        clients["two-a"] = on_host(etc, sys.executable, CLIENT, "libc", tag("two-a"), port)
        clients["two-b"] = on_host(etc, sys.executable, CLIENT, "libc", tag("two-b"), port)
        # Its own mount and network namespaces and its own C library (resolving after 0.5 s: a
        # root is probed when a process first execs in it).
        clients["musl-root"] = subprocess.Popen(
            [*lab.prefix(), "unshare", "--mount", f"--root={root}", "/gai", tag("musl-root"), "0.5", port],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        clients["stub"] = subprocess.Popen(
            [*lab.prefix(), "unshare", "--mount", "--propagation", "private", "sh", "-c",
             stub_etc + f"'{sys.executable}' '{CLIENT}' libc '{tag('stub')}' {port}"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for kind, proc in clients.items():
            if kind == "curl":
                proc.communicate(timeout=60)  # it gets no HTTP answer: that is all right
            else:
                finish(kind, proc)
        wait_for(lambda: len({(r["cmdline"]) for r in daemon.rows("raddr = ? AND rport = ?", (PEER4, server.port))})
                 >= len(clients), what="a row for every client")
        time.sleep(1.5)
    finally:
        daemon.stop()
        for proc in servers:
            proc.terminate()
            proc.wait(10)
        server.sock.close()
    rows = daemon.rows("raddr = ? AND rport = ?", (PEER4, server.port))
    return {kind: [r for r in rows if marker(kind, port) in r["cmdline"]] for kind in clients}


def marker(kind: str, port: str) -> str:
    """What only that client's command line holds."""
    if kind in ("tls", "http"):
        return f"{kind} {PEER4} {port} {tag(kind)}"
    if kind == "plain":
        return f"plain {PEER4} {port}"
    return tag(kind)


@pytest.mark.parametrize("kind,sources", [
    ("libc", {"getaddrinfo", "dns"}),  # glibc's own DNS client, through the uprobes or the answer
    ("curl", {"http", "getaddrinfo", "dns"}),
    ("own-dns", {"dns"}),  # no C library involved: only the answer, read in the kernel, names it
    ("static", {"dns"}),  # statically linked musl: no uprobe can see its resolver
    ("musl-root", {"getaddrinfo", "dns"}),
    ("two-a", {"getaddrinfo", "dns"}),
    ("two-b", {"getaddrinfo", "dns"}),
    ("stub", {"getaddrinfo", "dns"}),  # answered by the local stub on 127.0.0.53
    ("tls", {"sni"}),
    ("http", {"http"}),
])
def test_each_kind_of_client_gets_the_name_it_used_and_how_it_was_learned(named, kind, sources):
    rows = named[kind]
    assert rows, f"no row for the {kind} client"
    expected = ".".join(reversed(tag(kind).split(".")))
    assert {r["domain"] for r in rows} == {expected}
    assert {r["domain_source"] for r in rows} <= sources


def test_a_client_that_named_nothing_gets_no_name_though_the_others_used_its_address(named):
    rows = named["plain"]
    assert rows and {(r["domain"], r["domain_source"]) for r in rows} == {("", "")}
