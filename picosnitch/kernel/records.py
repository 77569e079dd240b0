"""Typed records from the kernel side, and the ctypes mirrors of bpf/picosnitch.h they come from.

The kernel speaks in structs; everything after the monitor speaks in these frozen dataclasses.
Device numbers are converted here, once, from the kernel's encoding to userspace `st_dev`.
"""

import ctypes
import os
import socket
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, Tuple, Union

from picosnitch.sanitize import from_bytes

FILENAME_MAX, ARGS_MAX, COMM_MAX, DNS_NAME_MAX, DNS_ENTRIES_MAX, PAYLOAD_MAX = 512, 4096, 16, 256, 24, 2048
EXEC_STRINGS_MAX = 2 * 2 * FILENAME_MAX + ARGS_MAX
CELL_DIRTY_BITS = 64
EVENT_EXEC, EVENT_FORK, EVENT_EXIT, EVENT_DNS, EVENT_PAYLOAD = 1, 2, 3, 4, 5
PAYLOAD_KINDS = {1: "dns_answer", 2: "first_send"}  # enum payload_kind
u8, u16, u32, u64 = ctypes.c_uint8, ctypes.c_uint16, ctypes.c_uint32, ctypes.c_uint64

# enum loss_kind, in order: what each kernel counter means, said to the user.
LOSS_KINDS = (
    ("ringbuf_exec", "exec events lost (ring buffer full): those processes' command lines are unknown"),
    ("ringbuf_other", "fork/exit/DNS events lost (ring buffer full)"),
    ("flow_map_full", "flow records dropped (flow map full)"),
    ("flow_map_bytes", "bytes not attributed because the flow map was full"),
    ("peer_storage", "unconnected UDP peers not recorded (socket storage failed)"),
    ("socket_storage", "TCP sockets whose received bytes could not be tracked"),
    ("ringbuf_payload", "DNS answers and first sends not read (ring buffer full): some domain names are unknown"),
)


class FlowKey(ctypes.Structure):
    _fields_ = [("tgid", u32), ("ppid", u32), ("uid", u32), ("netns", u32), ("exe_ino", u64),
                ("exe_dev", u32), ("family", u16), ("protocol", u16), ("lport", u16), ("rport", u16),
                ("exec_id", u32), ("laddr", u8 * 16), ("raddr", u8 * 16), ("comm", ctypes.c_char * COMM_MAX)]


class FlowValue(ctypes.Structure):
    _fields_ = [("bytes_sent", u64), ("bytes_recv", u64), ("packets_sent", u64), ("packets_recv", u64)]


class MonitorConfig(ctypes.Structure):
    _fields_ = [("tcp_rx_by_seq", u32), ("cells", u32), ("read_payloads", u32), ("_pad", u32)]


class DrainState(ctypes.Structure):
    _fields_ = [("epoch", u32), ("cells_on", u32)]


class RetiredCell(ctypes.Structure):
    _fields_ = [("cell", u32), ("epoch", u32)]


class EventHeader(ctypes.Structure):
    _fields_ = [("type", u32), ("tgid", u32), ("ktime_ns", u64)]


_EXEC_HEAD = [("h", EventHeader), ("ppid", u32), ("uid", u32), ("exe_ino", u64), ("exe_dev", u32),
              ("args_len", u32), ("args_truncated", u32), ("exec_id", u32), ("cwd_ino", u64), ("cwd_dev", u32),
              ("root_dev", u32), ("root_ino", u64), ("comm", ctypes.c_char * COMM_MAX),
              ("filename_len", u16), ("path_len", u16), ("_pad", u32)]


class ExecEventHead(ctypes.Structure):
    """The fixed part of an exec event: what every sample holds before its strings."""

    _fields_ = _EXEC_HEAD


class ExecEventC(ctypes.Structure):
    """struct exec_event; a sample carries only the used bytes of `strings`."""

    _fields_ = _EXEC_HEAD + [("strings", ctypes.c_char * EXEC_STRINGS_MAX)]


class ForkEventC(ctypes.Structure):
    _fields_ = [("h", EventHeader), ("ppid", u32), ("_pad", u32)]


class PayloadEventC(ctypes.Structure):
    _fields_ = [("h", EventHeader), ("kind", u32), ("len", u32), ("key", FlowKey), ("data", u8 * PAYLOAD_MAX)]


class SocketOwner(ctypes.Structure):
    _fields_ = [("tgid", u32), ("uid", u32), ("exe_ino", u64), ("exe_dev", u32), ("_pad", u32)]


class ConnectionKey(ctypes.Structure):
    _fields_ = [("family", u16), ("lport", u16), ("rport", u16), ("_pad", u16), ("laddr", u8 * 16),
                ("raddr", u8 * 16)]


class DnsAddressC(ctypes.Structure):
    _fields_ = [("family", u32), ("addr", u8 * 16)]


class DnsEventC(ctypes.Structure):
    _fields_ = [("h", EventHeader), ("count", u32), ("_pad", u32), ("name", ctypes.c_char * DNS_NAME_MAX),
                ("addrs", DnsAddressC * DNS_ENTRIES_MAX)]


# The C struct each mirror above stands for: kernel_monitor.check_boundary compares them, field by
# field, with the BTF of the object it loads.
MIRRORS = {"flow_key": FlowKey, "flow_value": FlowValue, "monitor_config": MonitorConfig, "drain_state": DrainState,
           "retired_cell": RetiredCell, "event_header": EventHeader, "exec_event": ExecEventC,
           "fork_event": ForkEventC, "dns_address": DnsAddressC, "dns_event": DnsEventC,
           "payload_event": PayloadEventC}


def st_dev_from_kernel(dev: int) -> int:
    """The kernel's s_dev (MAJOR << 20 | MINOR) as userspace sees it in os.stat().st_dev."""
    return os.makedev(dev >> 20, dev & 0xFFFFF)


def stat_is(stat_dev: int, stat_ino: int, dev: int, ino: int) -> bool:
    """Whether a file that stat reports as (stat_dev, stat_ino) is the one the kernel names
    (dev, ino), both in st_dev encoding: the same inode, on the same device, unless stat's is an
    anonymous device (major 0), which btrfs reports per subvolume instead of its superblock's."""
    return stat_ino == ino and (stat_dev == dev or os.major(stat_dev) == 0)


def address(family: int, raw: bytes) -> str:
    """Text form of an address from a 16-byte field ("" for families without addresses)."""
    if family == socket.AF_INET:
        return socket.inet_ntop(socket.AF_INET, raw[:4])
    if family == socket.AF_INET6:
        return socket.inet_ntop(socket.AF_INET6, raw[:16])
    return ""


_boot_offset = time.time() - time.clock_gettime(time.CLOCK_BOOTTIME)


def unix_time(ktime_ns: int) -> float:
    """bpf_ktime_get_boot_ns() as unix time."""
    return _boot_offset + ktime_ns / 1e9


@dataclass(frozen=True)
class Flow:
    """Traffic of one process on one endpoint during one drain interval."""

    tgid: int
    ppid: int
    uid: int
    netns: int
    exe_dev: int  # userspace st_dev encoding
    exe_ino: int
    family: int
    protocol: int
    laddr: str
    lport: int
    raddr: str
    rport: int
    bytes_sent: int
    bytes_recv: int
    packets_sent: int
    packets_recv: int
    exec_id: int = 0  # which exec of tgid sent it (Exec.exec_id); a fork keeps its parent's
    comm: str = ""  # the process's name when it sent
    time: float = 0.0  # unix time the kernel stopped counting it here: it happened in the drain interval before
    kind: str = field(default="flow", repr=False)

    @classmethod
    def from_c(cls, key: FlowKey, value: FlowValue, when: float = 0.0) -> "Flow":
        return cls(key.tgid, key.ppid, key.uid, key.netns, st_dev_from_kernel(key.exe_dev), key.exe_ino,
                   key.family, key.protocol, address(key.family, bytes(key.laddr)), key.lport,
                   address(key.family, bytes(key.raddr)), key.rport, value.bytes_sent, value.bytes_recv,
                   value.packets_sent, value.packets_recv, key.exec_id, from_bytes(key.comm), when)


@dataclass(frozen=True)
class Exec:
    """A process replaced its image: exe identity, filename and argv as the kernel saw them."""

    tgid: int
    ppid: int
    uid: int
    exe_dev: int
    exe_ino: int
    comm: str
    filename: str  # the file executed: the interpreter, for a #! script
    argv: Tuple[str, ...]
    argv_truncated: bool
    time: float
    exec_id: int = 0  # counts the execs of the thread that exec'd; flows carry it (Flow.exec_id)
    path: str = ""  # the path given to execve: the script, for a #! script (may be relative)
    cwd: Tuple[int, int] = (0, 0)  # (st_dev, st_ino) of its working directory at exec; (0, 0): not known
    root: Tuple[int, int] = (0, 0)  # (st_dev, st_ino) of its root directory at exec
    kind: str = field(default="exec", repr=False)


@dataclass(frozen=True)
class Fork:
    tgid: int
    ppid: int
    time: float
    kind: str = field(default="fork", repr=False)


@dataclass(frozen=True)
class Exit:
    tgid: int
    time: float
    kind: str = field(default="exit", repr=False)


@dataclass(frozen=True)
class Dns:
    """getaddrinfo(name) in process tgid returned these addresses."""

    tgid: int
    name: str
    addresses: Tuple[str, ...]
    time: float
    kind: str = field(default="dns", repr=False)


@dataclass(frozen=True)
class Payload:
    """Bytes process tgid received from port 53 ("dns_answer") or first sent on a TCP connection
    ("first_send"), read from its own buffer: the names in them are parsed in user space."""

    tgid: int
    what: str
    data: bytes
    comm: str
    netns: int
    family: int
    protocol: int
    laddr: str
    lport: int
    raddr: str
    rport: int
    time: float
    kind: str = field(default="payload", repr=False)


@dataclass(frozen=True)
class Loss:
    """The kernel dropped `count` items of `what` since the last report."""

    what: str
    count: int
    description: str
    kind: str = field(default="loss", repr=False)


@dataclass(frozen=True)
class Degraded:
    """A hook that could not be loaded or attached, and what will therefore not be recorded."""

    hook: str
    consequence: str
    reason: str
    kind: str = field(default="degraded", repr=False)


FileKey = Tuple[int, int, int, int]  # st_dev, st_ino, st_ctime_ns, st_size (kernel.pins)


@dataclass(frozen=True)
class PinnedFile:
    """One file a process ran: `role` exe, script or program; `path` as it was named at exec."""

    role: str
    path: str
    key: FileKey
    nlink: int = 1  # links left when pinned: 0 for a deleted file or a memfd


@dataclass(frozen=True)
class Pinned:
    """The files exec `exec_id` of process tgid ran, pinned at once; `missed` says, per role, why a
    file could not be pinned (the process was already gone, the script did not exist, ...)."""

    tgid: int
    exec_id: int
    files: Tuple[PinnedFile, ...]
    missed: Tuple[Tuple[str, str, str], ...] = ()  # (role, path, why)
    kind: str = field(default="pinned", repr=False)


Record = Union[Flow, Exec, Fork, Exit, Dns, Payload, Loss, Degraded, Pinned]


def _argv(raw: bytes) -> Tuple[str, ...]:
    return tuple(from_bytes(a) for a in raw.rstrip(b"\0").split(b"\0")) if raw.strip(b"\0") else ()


def _exec(data: bytes, when: float) -> Exec:
    e = ExecEventHead.from_buffer_copy(data[:ctypes.sizeof(ExecEventHead)])
    strings = data[ctypes.sizeof(ExecEventHead):]
    path_end = e.filename_len + e.path_len
    return Exec(e.h.tgid, e.ppid, e.uid, st_dev_from_kernel(e.exe_dev), e.exe_ino, from_bytes(e.comm),
                from_bytes(strings[:e.filename_len].split(b"\0", 1)[0]), _argv(strings[path_end:path_end + e.args_len]),
                bool(e.args_truncated), when, e.exec_id, from_bytes(strings[e.filename_len:path_end].split(b"\0", 1)[0]),
                (st_dev_from_kernel(e.cwd_dev), e.cwd_ino), (st_dev_from_kernel(e.root_dev), e.root_ino))


def parse_event(data: bytes) -> Union[Exec, Fork, Exit, Dns, Payload, None]:
    """Decodes one ring buffer sample (None for a type this version does not know)."""
    header = EventHeader.from_buffer_copy(data[:ctypes.sizeof(EventHeader)])
    when = unix_time(header.ktime_ns)
    e: ctypes.Structure
    if header.type == EVENT_EXEC:
        return _exec(data, when)
    if header.type == EVENT_FORK:
        e = ForkEventC.from_buffer_copy(data[:ctypes.sizeof(ForkEventC)])
        return Fork(e.h.tgid, e.ppid, when)
    if header.type == EVENT_EXIT:
        return Exit(header.tgid, when)
    if header.type == EVENT_DNS:
        e = DnsEventC.from_buffer_copy(data[:ctypes.sizeof(DnsEventC)])
        entries = (address(a.family, bytes(a.addr)) for a in e.addrs[:min(e.count, DNS_ENTRIES_MAX)])
        addrs = tuple(dict.fromkeys(a for a in entries if a))  # getaddrinfo repeats each address per socket type
        return Dns(e.h.tgid, from_bytes(e.name), addrs, when)
    if header.type == EVENT_PAYLOAD:
        e = PayloadEventC.from_buffer_copy(data[:ctypes.sizeof(PayloadEventC)])
        k = e.key
        return Payload(e.h.tgid, PAYLOAD_KINDS.get(e.kind, str(e.kind)), bytes(e.data[:min(e.len, PAYLOAD_MAX)]),
                       from_bytes(k.comm), k.netns, k.family, k.protocol, address(k.family, bytes(k.laddr)), k.lport,
                       address(k.family, bytes(k.raddr)), k.rport, when)
    return None


def to_json_dict(record: Record) -> Dict:
    """A record as a JSON-ready dict, with its kind first (for `picosnitch monitor --raw`)."""
    d = asdict(record)
    return {"kind": d.pop("kind"), **d}
