"""What outlives a monitor restart: the kernel's maps and links, kept by the supervisor.

The BPF programs stay attached, and their maps, ring buffers and counters stay filled, as long
as some file descriptor refers to them. Once loaded, the monitor hands a duplicate of every map
and link descriptor to the supervisor (SCM_RIGHTS over a socket pair: send()), which keeps them
(receive()). A monitor started again inherits them and adopts the maps instead of loading the
programs anew (KernelMonitor(adopt=...)): the drain epoch, the ring buffers' read positions and
the counts made meanwhile are all still there. The supervisor closes them once the monitor has
stopped for good, which detaches the programs.

Shared is a small block of memory the supervisor makes before the monitor starts, so that it
outlives the monitor too: the loss counts already reported, when the current drain epoch began,
and what the monitor has taken from the kernel but not yet handed to the identity worker, which
a restarted monitor reports as lost.
"""

import ctypes
import json
import mmap
import socket
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from picosnitch.connection import widen
from picosnitch.timestamps import local_time

MAX_FDS = 200  # per message; the kernel takes at most 253
MAP, LINK, LIBC = "map:", "link:", "libc:"  # names: map:NAME, link:N, libc:DEV:INO:N (a uprobe link)


def send(sock: socket.socket, named: Dict[str, int]) -> None:
    """Hands the supervisor a duplicate of each descriptor, by name."""
    items = list(named.items())
    for start in range(0, len(items), MAX_FDS):
        part = items[start:start + MAX_FDS]
        socket.send_fds(sock, [json.dumps([name for name, _ in part]).encode()], [fd for _, fd in part])


def receive(sock: socket.socket) -> Optional[Dict[str, int]]:
    """The descriptors of one send() message, by name (the supervisor's own now); None once
    no monitor can send any more (every sending end is closed)."""
    data, fds, _, _ = socket.recv_fds(sock, 65536, MAX_FDS)
    if not data and not fds:
        return None
    names = json.loads(data)
    if len(names) != len(fds):  # cut short: keep nothing rather than mismatch names and maps
        for fd in fds:
            socket.close(fd)
        return {}
    return dict(zip(names, fds))


def libc_files(named: Dict[str, int]) -> List[Tuple[int, int]]:
    """(device, inode) of each C library whose getaddrinfo probes are among `named`."""
    files = set()
    for name in named:
        if name.startswith(LIBC):
            _, dev, ino, _ = name.split(":")
            files.add((int(dev), int(ino)))
    return sorted(files)


class Shared(ctypes.Structure):
    """Memory shared by the supervisor and each monitor it starts (one page, zeroed at first)."""

    _fields_ = [("losses_seen", ctypes.c_uint64 * 32),  # per LOSS_KINDS: counts already reported
                ("epoch_began", ctypes.c_double),  # unix time the current drain epoch began
                # taken from the kernel and not yet handed to the identity worker's socket:
                ("flows", ctypes.c_uint64), ("traffic", ctypes.c_uint64), ("events", ctypes.c_uint64),
                ("first", ctypes.c_double), ("last", ctypes.c_double)]


def shared_block() -> mmap.mmap:
    """Anonymous shared memory for a Shared, inherited by the processes forked after it is made."""
    return mmap.mmap(-1, mmap.PAGESIZE, mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)


@dataclass
class Held:
    """What some records hold: flows and their bytes, other events, and when they happened."""

    flows: int = 0
    traffic: int = 0
    events: int = 0
    first: Optional[float] = None
    last: Optional[float] = None

    @classmethod
    def of(cls, records: list) -> "Held":
        held = cls()
        for record in records:
            kind = getattr(record, "kind", "")  # an ErrorReport has none
            if kind == "flow":
                held.flows += 1
                held.traffic += record.bytes_sent + record.bytes_recv
            elif kind in ("exec", "fork", "exit", "dns", "payload"):
                held.events += 1
            when = getattr(record, "time", 0)
            if when:
                held.first = when if held.first is None else min(held.first, when)
                held.last = when if held.last is None else max(held.last, when)
        return held

    def add(self, other: "Held") -> None:
        self.flows += other.flows
        self.traffic += other.traffic
        self.events += other.events
        widen(self, other)

    def __bool__(self) -> bool:
        return bool(self.flows or self.events)

    def sentence(self) -> str:
        """"N flows (M bytes of traffic) and K process and DNS events between T1 and T2"."""
        span = f" between {local_time(self.first)} and {local_time(self.last)}" if self.first and self.last else ""
        return f"{self.flows} flows ({self.traffic} bytes of traffic) and {self.events} process and DNS events{span}"

    def keep_in(self, shared: Shared) -> None:
        shared.flows, shared.traffic, shared.events = self.flows, self.traffic, self.events
        shared.first, shared.last = self.first or 0.0, self.last or 0.0

    @classmethod
    def kept_in(cls, shared: Shared) -> "Held":
        return cls(shared.flows, shared.traffic, shared.events, shared.first or None, shared.last or None)
