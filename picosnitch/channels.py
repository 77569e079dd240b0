"""The links between workers: whole messages, and a sender that never waits for its receiver.

Each link is a SOCK_SEQPACKET socket pair, which delivers each packet whole or not at all. A
worker killed in the middle of sending or reading leaves nothing half-written for whoever reads
next (a pipe carries a byte stream: a restarted reader would take the rest of a message for the
start of the next, and never find its way back). The supervisor keeps both ends of every pair,
so messages wait in the socket while their reader is restarted.

A message is one pickled object. Lists are sent as lists of at most MAX_PACKET bytes (parts()),
which every receiver of lists takes as they come. Anything larger that cannot be cut (a
Connection with a command line of a megabyte) goes as numbered fragments; a reader that meets a
sequence it did not see begin, or that is broken off, drops it and counts it in `broken`.

Sending never blocks: what the socket cannot take yet waits in the sender's outbox and goes as
the receiver reads (wait() sends it while the worker waits for its own input). So a stalled
writer does not stall the identity worker, nor that the monitor, nor that the kernel's ring
buffer. The outbox is bounded: beyond `limit` bytes its oldest messages are dropped, and each
dropped message's tally (what the sender said it held) is kept for the sender to report.
"""

import errno
import itertools
import pickle
import select
import signal
import socket
import struct
import threading
import time
from collections import deque
from typing import Any, Callable, Iterable, List, Optional, Sequence, Tuple

MAX_PACKET = 64 * 1024  # bytes: small enough for the kernel to allocate at once, large enough for ~500 rows
SOCKET_BUFFER = 1 << 20  # asked for; the kernel caps it at net.core.wmem_max
OUTBOX_LIMIT = 64 << 20  # bytes a sender holds for a receiver that does not read

WHOLE = b"W"
FRAGMENT = b"F"
_FRAGMENT_HEADER = struct.Struct("<cIII")  # FRAGMENT, sequence id, index, count
_ROOM = MAX_PACKET - _FRAGMENT_HEADER.size
_ids = itertools.count(1)


def ends_on_stop() -> None:
    """Every worker ends on a Stop message, never on SIGINT or SIGTERM: the supervisor sends Stop
    in the order that loses nothing. A worker run as a thread of another's process (a room) leaves
    the signals to that process's main thread, the only one Python lets set them."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


class _Queued:
    """A message waiting in an outbox: its packets, how many of them are sent, and its tally."""

    __slots__ = ("packets", "sent", "tally", "size")

    def __init__(self, packets: List[bytes], tally: Any):
        self.packets, self.sent, self.tally = packets, 0, tally
        self.size = sum(len(p) for p in packets)


class Channel:
    """One end of a link. Either end can send and receive; each link is used one way."""

    def __init__(self, sock: socket.socket, limit: int = OUTBOX_LIMIT, waits: bool = False):
        """waits: each send() returns only once the socket has taken it, as suits a test or a
        benchmark feeding a worker (a worker's own sends never wait)."""
        self.sock = sock
        self.limit = limit
        self.waits = waits
        self._outbox: deque = deque()  # _Queued, oldest first
        self.queued = 0  # bytes in the outbox
        self.dropped: List[Any] = []  # tallies of messages dropped from a full outbox, oldest first
        self.broken = 0  # fragmented messages this reader received only part of
        self._assembling: Optional[Tuple[int, List[bytes]]] = None  # (sequence id, fragments so far)
        self._orphan = 0  # the sequence whose start was missed, counted once in `broken`
        self._lock = threading.Lock()  # the outbox, for workers that send from several threads

    def fileno(self) -> int:
        return self.sock.fileno()

    def __getstate__(self) -> dict:
        """For a worker started by spawning (the daemon forks): the socket, not what is queued."""
        return {"sock": self.sock, "limit": self.limit, "waits": self.waits}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["sock"], state["limit"], state["waits"])  # type: ignore[misc]

    # --- sending ---

    def send(self, obj: Any, tally: Any = None) -> None:
        """Sends one object (a large list as several), or queues it while the receiver is behind."""
        messages = [m for m, _ in parts(obj)] if isinstance(obj, list) else [pickle.dumps(obj, pickle.HIGHEST_PROTOCOL)]
        for message in messages:
            self.send_bytes(message, tally)
            tally = None  # counted once, with the first part
        if self.waits:
            self.finish()

    def send_bytes(self, message: bytes, tally: Any = None) -> None:
        """Sends one pickled message (fragmented if it must be), or queues it."""
        with self._lock:
            queued = _Queued(fragments(message), tally)
            self._outbox.append(queued)
            self.queued += queued.size
            self._flush()
            self._bound()

    def _bound(self) -> None:
        """Drops the oldest whole messages while the outbox holds more than `limit` bytes (one
        partly sent stays: its receiver waits for the rest)."""
        keep = 1 if self._outbox and self._outbox[0].sent else 0
        while self.queued > self.limit and len(self._outbox) > keep:
            dropped = self._outbox[keep]
            del self._outbox[keep]
            self.queued -= dropped.size
            if dropped.tally is not None:
                self.dropped.append(dropped.tally)

    def flush(self) -> bool:
        """Sends what the socket takes now; True once nothing is left waiting."""
        with self._lock:
            return self._flush()

    def _flush(self) -> bool:
        while self._outbox:
            head = self._outbox[0]
            packet = head.packets[head.sent]
            try:
                self.sock.send(packet, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return False
            except OSError as e:
                if e.errno == errno.ENOBUFS:  # no memory for the packet now: later
                    return False
                raise
            head.sent += 1
            self.queued -= len(packet)
            head.size -= len(packet)
            if head.sent == len(head.packets):
                self._outbox.popleft()
        return True

    def finish(self, timeout: Optional[float] = None) -> bool:
        """Waits until everything queued has been sent (at exit); False if `timeout` passed first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.flush():
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return False
            _poll([(self.fileno(), select.POLLOUT)], left)
        return True

    def queued_tallies(self) -> List[Any]:
        """The tallies of the messages waiting in the outbox."""
        with self._lock:
            return [queued.tally for queued in self._outbox if queued.tally is not None]

    def take_dropped(self) -> List[Any]:
        """The tallies of the messages dropped since the last call."""
        with self._lock:
            dropped, self.dropped = self.dropped, []
        return dropped

    # --- receiving ---

    def recv_bytes(self) -> bytes:
        """The next whole message, waiting for one."""
        while True:
            try:
                packet = self.sock.recv(MAX_PACKET)
            except InterruptedError:
                continue
            if not packet:
                raise EOFError("the other end is closed")
            message = self._take(packet)
            if message is not None:
                return message

    def _take(self, packet: bytes) -> Optional[bytes]:
        """The message `packet` completes, if any."""
        if packet[:1] == WHOLE:
            if self._assembling is not None:
                self._assembling, self.broken = None, self.broken + 1
            return packet[1:]
        _, sequence, index, count = _FRAGMENT_HEADER.unpack_from(packet)
        if index == 0:
            if self._assembling is not None:
                self.broken += 1
            self._assembling = (sequence, [])
        elif self._assembling is None or self._assembling[0] != sequence or len(self._assembling[1]) != index:
            if self._assembling is not None or sequence != self._orphan:
                self.broken += 1
            self._assembling, self._orphan = None, sequence
            return None  # the rest of a sequence whose start this reader never saw
        fragments = self._assembling[1]
        fragments.append(packet[_FRAGMENT_HEADER.size:])
        if len(fragments) < count:
            return None
        self._assembling = None
        return b"".join(fragments)

    def recv(self) -> Any:
        return pickle.loads(self.recv_bytes())

    def poll(self, timeout: float = 0.0) -> bool:
        """Whether a packet is waiting (within `timeout` seconds)."""
        return bool(_poll([(self.fileno(), select.POLLIN)], timeout))

    def close(self) -> None:
        self.sock.close()


def fragments(message: bytes) -> List[bytes]:
    """The packets that carry `message`: itself, or numbered fragments when it is too large."""
    if len(message) < MAX_PACKET:
        return [WHOLE + message]
    sequence = next(_ids) & 0xFFFFFFFF
    pieces = [message[start:start + _ROOM] for start in range(0, len(message), _ROOM)]
    return [_FRAGMENT_HEADER.pack(FRAGMENT, sequence, index, len(pieces)) + piece
            for index, piece in enumerate(pieces)]


def pair(limit: int = OUTBOX_LIMIT, sender_waits: bool = False) -> Tuple[Channel, Channel]:
    """(reading end, sending end) of a new link."""
    reader, sender = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sender.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
    return Channel(reader, limit), Channel(sender, limit, sender_waits)


def parts(items: list) -> List[Tuple[bytes, list]]:
    """`items` pickled as lists that each fit a packet (an item too large for one alone makes a
    list of one), with the items in each."""
    message = pickle.dumps(items, pickle.HIGHEST_PROTOCOL)
    if len(message) < MAX_PACKET or len(items) < 2:
        return [(message, items)]
    count = -(-len(message) // (MAX_PACKET * 3 // 4))  # aim below the limit: items differ in size
    size = -(-len(items) // count)
    return [part for start in range(0, len(items), size) for part in parts(items[start:start + size])]


def send_parts(senders: Iterable[Channel], items: list, tally: Callable[[list], Any]) -> None:
    """Sends `items` to each of `senders` as parts(), each part pickled once for all of them
    and tallied by `tally(part)`, so a part dropped from a full outbox is counted exactly."""
    senders = list(senders)
    for message, part in parts(items):
        counted = tally(part)
        for sender in senders:
            sender.send_bytes(message, counted)


def wait(readers: Iterable, timeout: Optional[float], senders: Sequence[Channel] = ()) -> list:
    """Those of `readers` (anything with fileno(), or a file descriptor) ready to be read within
    `timeout` seconds; while waiting, what `senders` hold goes out as their receivers make room."""
    by_fd = {}
    interest = []
    for reader in readers:
        fd = reader if isinstance(reader, int) else reader.fileno()
        by_fd[fd] = reader
        interest.append((fd, select.POLLIN))
    behind = {s.fileno(): s for s in senders if s.queued}
    interest += [(fd, select.POLLOUT) for fd in behind]
    ready = []
    for fd, events in _poll(interest, timeout):
        if fd in behind and events & (select.POLLOUT | select.POLLERR | select.POLLHUP):
            behind[fd].flush()
        if fd in by_fd and events & (select.POLLIN | select.POLLERR | select.POLLHUP):
            ready.append(by_fd[fd])
    return ready


def _poll(interest: List[Tuple[int, int]], timeout: Optional[float]) -> List[Tuple[int, int]]:
    poller = select.poll()
    merged: dict = {}
    for fd, events in interest:
        merged[fd] = merged.get(fd, 0) | events
    for fd, events in merged.items():
        poller.register(fd, events)
    milliseconds = None if timeout is None else max(int(timeout * 1000 + 0.999), 0)
    try:
        return poller.poll(milliseconds)
    except InterruptedError:
        return []
