"""Which local ports are served: what the kernel lists as TCP listeners and as UDP sockets bound
to a fixed port, per network namespace.

Traffic on such a port is a program serving (a connection its listener accepted, a datagram to
its bound socket): the baseline learns the port as one the program listens on, and does not
take the client's port for a destination. The kernel's lists come from sock_diag
(NETLINK_SOCK_DIAG), which filters by socket state in the kernel, so a dump holds only the
listening and unconnected sockets however many connections the machine has. A netlink socket
speaks for the network namespace it was made in: one is made for each namespace traffic is seen
in, by entering it for a moment through a process (or a thread) that lives there.

How exact it is. TCP: connect() never takes an ephemeral port that a bound socket of the same
namespace holds, so a TCP connection on a listening port is one the listener accepted. UDP has no
listen(): a socket serves when it is unconnected and bound outside the ephemeral port range
(net.ipv4.ip_local_port_range), where clients' sockets never are. When: the lists are read again,
at most once per batch of traffic, when a port not known to be served turns up; a listener that
closed between its traffic and that reading (well under a second) is missed. A port stays known
as served for REMEMBER seconds after it was last listed.
"""

from __future__ import annotations

import ctypes
import os
import socket
import struct
import time
from typing import Iterator, Optional

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
TCP_ESTABLISHED, TCP_CLOSE, TCP_LISTEN = 1, 7, 10
CLONE_NEWNET = 0x40000000
NLMSG_HEADER = struct.Struct("=IHHII")  # length, type, flags, sequence, port id
DIAG_REQUEST = struct.Struct("=BBBxI48x")  # inet_diag_req_v2: family, protocol, ext, states, sockid
DIAG_STATE = struct.Struct("=BB")  # inet_diag_msg's start: family, state
DIAG_PORTS = struct.Struct(">HH")  # then the socket id: source and destination port (network order)
REMEMBER = 60.0
FIND_NAMESPACE_EVERY = 10.0  # seconds between scans of /proc for a namespace not found

_libc = ctypes.CDLL(None, use_errno=True)


def ephemeral_range(path: str = "/proc/sys/net/ipv4/ip_local_port_range") -> tuple[int, int]:
    """The ports the kernel gives clients' sockets (32768-60999 when it cannot be read)."""
    try:
        with open(path) as file:
            low, high = (int(part) for part in file.read().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999


def _dump(sock: socket.socket, family: int, protocol: int, states: int) -> list[tuple[int, int, int]]:
    """(state, local port, remote port) of the sockets of `family` and `protocol` in `states`."""
    request = DIAG_REQUEST.pack(family, protocol, 0, states)
    sock.send(NLMSG_HEADER.pack(NLMSG_HEADER.size + len(request), SOCK_DIAG_BY_FAMILY,
                                NLM_F_REQUEST | NLM_F_DUMP, 1, 0) + request)
    found: list[tuple[int, int, int]] = []
    while True:
        data = sock.recv(1 << 16)
        offset = 0
        while offset + NLMSG_HEADER.size <= len(data):
            length, kind, _flags, _seq, _port = NLMSG_HEADER.unpack_from(data, offset)
            if kind == NLMSG_DONE:
                return found
            if kind == NLMSG_ERROR:
                code = -struct.unpack_from("=i", data, offset + NLMSG_HEADER.size)[0]
                raise OSError(code, "sock_diag: %s" % os.strerror(code))
            if length < NLMSG_HEADER.size:
                raise OSError("sock_diag: a malformed answer")
            _family, state = DIAG_STATE.unpack_from(data, offset + NLMSG_HEADER.size)
            sport, dport = DIAG_PORTS.unpack_from(data, offset + NLMSG_HEADER.size + 4)
            found.append((state, sport, dport))
            offset += (length + 3) & ~3


def served_ports(sock: socket.socket, ephemeral: tuple[int, int]) -> set[tuple[int, int]]:
    """(protocol, port) of every TCP listener and fixed-port unconnected UDP socket."""
    ports = set()
    for family in (socket.AF_INET, socket.AF_INET6):
        for _state, port, _remote in _dump(sock, family, socket.IPPROTO_TCP, 1 << TCP_LISTEN):
            ports.add((socket.IPPROTO_TCP, port))
        for _state, port, remote in _dump(sock, family, socket.IPPROTO_UDP, 1 << TCP_CLOSE):
            if remote == 0 and port and not ephemeral[0] <= port <= ephemeral[1]:
                ports.add((socket.IPPROTO_UDP, port))
    return ports


class ServedPorts:
    """`serves(netns, protocol, port)` for the baseline; call new_batch() before each batch."""

    def __init__(self, proc: str = "/proc") -> None:
        self.proc = proc
        self.own = os.stat(f"{proc}/self/ns/net").st_ino
        self.ephemeral = ephemeral_range()
        self.sockets: dict[int, socket.socket] = {}
        self.seen: dict[int, dict[tuple[int, int], float]] = {}  # netns -> (protocol, port) -> last listed
        self.fresh: set[int] = set()  # namespaces read since the batch began
        self.missing: dict[int, float] = {}  # namespaces no process was found in, and when
        self.problem = ""  # the last failure, for error.log

    def new_batch(self) -> None:
        self.fresh.clear()

    def serves(self, netns: int, protocol: int, port: int) -> bool:
        seen = self.seen.get(netns)
        if seen and (protocol, port) in seen:
            return True
        if netns in self.fresh:
            return False
        self.fresh.add(netns)
        self._read(netns)
        return (protocol, port) in self.seen.get(netns, {})

    def _read(self, netns: int) -> None:
        sock: Optional[socket.socket] = self.sockets.get(netns) or self._open(netns)
        if sock is None:
            return
        try:
            ports = served_ports(sock, self.ephemeral)
        except OSError as error:
            self.problem = f"cannot list the listening sockets: {error.strerror or error}"
            sock.close()
            del self.sockets[netns]
            return
        now = time.monotonic()
        seen = self.seen.setdefault(netns, {})
        for key in ports:
            seen[key] = now
        for key in [k for k, last in seen.items() if now - last > REMEMBER]:
            del seen[key]

    def _open(self, netns: int) -> Optional[socket.socket]:
        """A sock_diag socket in namespace `netns` (0: unknown, taken as ours)."""
        own = netns in (0, self.own)
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG) if own else self._open_in(netns)
        if sock is not None:
            self.sockets[netns] = sock
        return sock

    def _open_in(self, netns: int) -> Optional[socket.socket]:
        """A socket made in `netns` through a task (process or thread: a thread may have entered
        a namespace its process has not) that lives there."""
        if time.monotonic() - self.missing.get(netns, -FIND_NAMESPACE_EVERY) < FIND_NAMESPACE_EVERY:
            return None
        for task in self._tasks():
            try:
                if os.stat(f"{task}/ns/net").st_ino == netns:
                    return self._made_in(f"{task}/ns/net")
            except OSError:  # it exited, or another namespace we cannot enter
                continue
        self.missing[netns] = time.monotonic()
        return None

    def _tasks(self) -> Iterator[str]:
        for pid in os.listdir(self.proc):
            if pid.isdigit():
                yield f"{self.proc}/{pid}"
                try:
                    yield from (f"{self.proc}/{pid}/task/{tid}" for tid in os.listdir(f"{self.proc}/{pid}/task")
                                if tid != pid)
                except OSError:
                    continue

    def _made_in(self, namespace: str) -> socket.socket:
        """A sock_diag socket made inside the namespace at path `namespace`, then back home."""
        home = os.open(f"{self.proc}/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        target = os.open(namespace, os.O_RDONLY | os.O_CLOEXEC)
        try:
            if _libc.setns(target, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns")
            try:
                return socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG)
            finally:
                if _libc.setns(home, CLONE_NEWNET) != 0:  # never stay in another namespace
                    raise SystemExit("picosnitch: cannot return to its own network namespace")
        finally:
            os.close(target)
            os.close(home)

    def close(self) -> None:
        for sock in self.sockets.values():
            sock.close()
        self.sockets.clear()
