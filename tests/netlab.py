"""A private network for tests: a veth pair from the host into a namespace the test creates.

Only the addresses below are used, and only inside this pair. Peer servers run as threads of
the test process that have switched into the namespace (setns is per thread), so the traffic
generators' own processes are the only ones on the host side of the conversation.
"""

import ctypes
import ipaddress
import os
import socket
import subprocess
import threading
from typing import Callable, List

# A /30 and a /64 of their own per test session, so that sessions running side by side (several
# developers on one machine) do not route into each other's namespace.
_SESSION = os.getpid() % 65536
_BASE4 = ipaddress.ip_address("10.232.0.0") + 4 * _SESSION  # within 10.232.0.0/14
SUBNET4 = f"{_BASE4}/30"
HOST4, PEER4 = str(_BASE4 + 1), str(_BASE4 + 2)
HOST6, PEER6 = f"fd00:5e:{_SESSION:x}::1", f"fd00:5e:{_SESSION:x}::2"
CLONE_NEWNET = 0x40000000

_libc = ctypes.CDLL(None, use_errno=True)


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True)


class NetLab:
    def __init__(self):
        tag = str(os.getpid())[-6:]
        self.ns = f"psnitch{tag}"
        self.host_if, self.peer_if = f"psh{tag}", f"psp{tag}"

    def __enter__(self) -> "NetLab":
        sh("ip", "netns", "add", self.ns)
        sh("ip", "link", "add", self.host_if, "type", "veth", "peer", "name", self.peer_if)
        sh("ip", "link", "set", self.peer_if, "netns", self.ns)
        sh("ip", "addr", "add", f"{HOST4}/30", "dev", self.host_if)
        sh("ip", "-6", "addr", "add", f"{HOST6}/64", "dev", self.host_if, "nodad")
        sh("ip", "link", "set", self.host_if, "up")
        self.run("ip", "addr", "add", f"{PEER4}/30", "dev", self.peer_if)
        self.run("ip", "-6", "addr", "add", f"{PEER6}/64", "dev", self.peer_if, "nodad")
        self.run("ip", "link", "set", self.peer_if, "up")
        self.run("ip", "link", "set", "lo", "up")
        self.run("sysctl", "-qw", "net.ipv4.ping_group_range=0 2147483647")
        return self

    def __exit__(self, *exc) -> None:
        subprocess.run(["ip", "link", "del", self.host_if], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.ns], capture_output=True)

    def run(self, *args: str) -> None:
        sh("ip", "netns", "exec", self.ns, *args)

    def prefix(self) -> List[str]:
        """Command prefix that runs a program inside the peer namespace."""
        return ["ip", "netns", "exec", self.ns]

    def in_peer(self, target: Callable[[], None]) -> threading.Thread:
        """Runs target in a new thread that lives in the peer namespace."""
        def enter_and_run():
            fd = os.open(f"/run/netns/{self.ns}", os.O_RDONLY)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns")
            finally:
                os.close(fd)
            target()

        thread = threading.Thread(target=enter_and_run, daemon=True)
        thread.start()
        return thread


def family_of(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def listen(host: str) -> socket.socket:
    """A TCP socket listening on an ephemeral port of host, created in the calling thread's
    namespace (so a peer thread must call it itself, after entering the lab)."""
    sock = socket.socket(family_of(host), socket.SOCK_STREAM)
    sock.bind((host, 0))
    sock.listen()
    return sock


class TcpPeer:
    """Accepts one connection, sends `reply` bytes, reads until EOF (counting), closes."""

    def __init__(self, host: str, reply: int = 0):
        self.host, self.reply, self.received = host, reply, 0
        self.ready = threading.Event()

    def serve(self) -> None:
        self.sock = listen(self.host)
        self.port = self.sock.getsockname()[1]
        self.ready.set()
        conn, _ = self.sock.accept()
        with conn:
            conn.sendall(b"s" * self.reply)
            while True:
                data = conn.recv(65536)
                if not data:
                    break
                self.received += len(data)
        self.sock.close()


class UdpEcho:
    """Echoes every datagram back to its sender until closed."""

    def __init__(self, host: str):
        self.host = host
        self.ready, self.stopped = threading.Event(), threading.Event()

    def serve(self) -> None:
        self.sock = socket.socket(family_of(self.host), socket.SOCK_DGRAM)
        self.sock.settimeout(0.2)
        self.sock.bind((self.host, 0))
        self.port = self.sock.getsockname()[1]
        self.ready.set()
        while not self.stopped.is_set():
            try:
                data, peer = self.sock.recvfrom(65536)
            except socket.timeout:
                continue
            self.sock.sendto(data, peer)
        self.sock.close()

    def stop(self) -> None:
        self.stopped.set()
