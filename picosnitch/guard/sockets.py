"""Who owns a queued packet's socket: exact, or "!unknown".

1. sock_diag (NETLINK_SOCK_DIAG) looks the packet's addresses and ports up in the kernel's own
   socket tables, exactly as the kernel delivers packets: the connecting socket going out, the
   listening (or bound UDP) socket coming in. It answers with the socket's inode, uid and cookie.
2. The owner map (kernel/bpf/socket_owners.bpf.c) names the process that connected, sent or bound
   on that socket cookie last, with its executable's device and inode; it is taken when that
   process still runs that executable (a reused pid would not). For an outgoing TCP connection
   the same owner is filed under the SYN's addresses and ports when the SYN is sent, so step 1
   is skipped: the queued SYN carries them.
3. Otherwise the process holding that inode among its file descriptors (/proc/PID/fd) is the
   owner. Processes that owned a socket recently are looked at first; the rest of /proc only when
   they do not hold it. A socket several processes share (after fork) is attributed to the first
   of them found, which is one of its real owners.

Nothing is inferred from a port or an address alone: when either step finds nothing the
program is "!unknown", and the rules and prompts treat it so.
"""

from __future__ import annotations

import ctypes
import os
import socket
import struct
from collections import OrderedDict
from importlib import resources
from typing import Dict, Optional, Tuple

from picosnitch.guard.rules import UNKNOWN, Program
from picosnitch.identity.hashing import HashCache
from picosnitch.kernel import libbpf
from picosnitch.kernel.monitor import MonitorError, cgroup2_root, check_structs
from picosnitch.kernel.records import ConnectionKey, SocketOwner, st_dev_from_kernel, stat_is
from picosnitch.sanitize import from_bytes

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST = 1
NLMSG_ERROR = 2
INET_DIAG_NOCOOKIE = 0xFFFFFFFF
ALL_STATES = 0xFFFFFFFF
_NLMSGHDR = struct.Struct("=IHHII")
_REQUEST = struct.Struct("=BBBxI")  # family, protocol, extensions, states
_SOCKID = struct.Struct("!HH16s16s") # sport, dport, src, dst (then if, cookie: native order)
_TAIL = struct.Struct("=III")
RECENT_OWNERS = 64


def _packed(family: int, address: str) -> bytes:
    raw = socket.inet_pton(family, address)
    return raw + b"\0" * (16 - len(raw))


class SockDiag:
    """Exact socket lookups by address and port (one netlink round trip each)."""

    def __init__(self):
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG)
        self.sock.bind((0, 0))
        self.sock.settimeout(1.0)
        self.seq = 0

    def _ask(self, family: int, protocol: int, src: str, sport: int, dst: str,
             dport: int) -> Optional[Tuple[int, int, int]]:
        self.seq += 1
        body = (_REQUEST.pack(family, protocol, 0, ALL_STATES)
                + _SOCKID.pack(sport, dport, _packed(family, src), _packed(family, dst))
                + _TAIL.pack(0, INET_DIAG_NOCOOKIE, INET_DIAG_NOCOOKIE))
        self.sock.send(_NLMSGHDR.pack(_NLMSGHDR.size + len(body), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST,
                                      self.seq, 0) + body)
        while True:
            data = self.sock.recv(65536)
            length, kind, _flags, seq, _pid = _NLMSGHDR.unpack_from(data)
            if seq != self.seq:
                continue
            if kind == NLMSG_ERROR:
                return None
            # inet_diag_msg: family, state, timer, retrans, sockid (48 bytes: the cookie is its last
            # 8), expires, rqueue, wqueue, uid, inode
            cookie, = struct.unpack_from("=Q", data, _NLMSGHDR.size + 4 + 40)
            uid, inode = struct.unpack_from("=II", data, _NLMSGHDR.size + 4 + 48 + 12)
            return inode, uid, cookie

    def owner_socket(self, family: int, protocol: int, local: str, lport: int, remote: str,
                     rport: int) -> Optional[Tuple[int, int, int]]:
        """(inode, uid, cookie) of the socket that sends from, or receives at, local:lport for
        remote:rport; None when the kernel has no such socket."""
        try:
            # TCP's lookup takes the socket's own address as the source, UDP's the packet's.
            first = (local, lport, remote, rport) if protocol == socket.IPPROTO_TCP else (remote, rport, local, lport)
            found = self._ask(family, protocol, *first)
            if found is None or found[0] == 0:
                second = (remote, rport, local, lport) if protocol == socket.IPPROTO_TCP else (local, lport, remote, rport)
                found = self._ask(family, protocol, *second)
            return found if found and found[0] else None
        except (OSError, struct.error):
            return None

    def close(self) -> None:
        self.sock.close()


class SocketOwners:
    """inode -> pid, by reading /proc/PID/fd, recent owners first."""

    def __init__(self, proc: str = "/proc"):
        self.proc = proc
        self.recent: "OrderedDict[int, None]" = OrderedDict()

    def _holds(self, pid: int, target: str) -> bool:
        base = f"{self.proc}/{pid}/fd"
        try:
            for fd in os.listdir(base):
                try:
                    if os.readlink(f"{base}/{fd}") == target:
                        return True
                except OSError:
                    continue
        except OSError:
            self.recent.pop(pid, None)
        return False

    def pid_of(self, inode: int) -> int:
        """The pid of a process holding socket `inode`, 0 when none does (any more)."""
        target = f"socket:[{inode}]"
        for pid in list(reversed(self.recent)):
            if self._holds(pid, target):
                self.recent.move_to_end(pid)
                return pid
        for entry in os.listdir(self.proc):
            if entry.isdigit() and int(entry) not in self.recent and self._holds(int(entry), target):
                pid = int(entry)
                self.recent[pid] = None
                while len(self.recent) > RECENT_OWNERS:
                    self.recent.popitem(last=False)
                return pid
        return 0


class OwnerMap:
    """The kernel's socket owners (kernel/bpf/socket_owners.bpf.c), attached for this process's life."""

    def __init__(self, object_path: Optional[str] = None, by_syn: bool = True):
        """by_syn: file outgoing TCP connections by their SYN too (the sockops program), when the
        kernel takes it; the owners by cookie work without it."""
        path = object_path or str(resources.files("picosnitch.kernel.bpf") / "socket_owners.bpf.o")
        root = cgroup2_root()
        if root is None:
            raise libbpf.LibbpfError("no cgroup2 hierarchy is mounted")
        self.missing = "" if by_syn else "not asked for"  # why connections are not filed by their SYN
        try:
            self.obj = self._load(path, root, by_syn)
        except libbpf.LibbpfError as e:
            if not by_syn:
                raise
            self.obj = self._load(path, root, by_syn=False)
            self.missing = str(e)
        self.map = self.obj.map("socket_owners")
        self.connections = self.obj.map("connection_owners")

    @staticmethod
    def _load(path: str, root: str, by_syn: bool) -> libbpf.BpfObject:
        obj = libbpf.BpfObject(path)
        try:
            check_structs(obj, {"socket_owner": SocketOwner, "connection_key": ConnectionKey})
            obj.program("owner_of_connection").autoload = by_syn
            obj.load()
            fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
            try:
                for prog in obj.programs():
                    if prog.autoload:
                        obj.keep_link(prog.attach_cgroup(fd))
            finally:
                os.close(fd)
            return obj
        except (libbpf.LibbpfError, MonitorError, OSError):
            obj.close()
            raise

    def owner(self, cookie: int) -> Optional[SocketOwner]:
        found = SocketOwner()
        return found if self.map.lookup(ctypes.c_uint64(cookie), found) else None

    def connection_owner(self, family: int, local: str, lport: int, remote: str, rport: int) -> Optional[SocketOwner]:
        """The owner of the TCP socket that connected from local:lport to remote:rport."""
        key = ConnectionKey(family=family, lport=lport, rport=rport)
        key.laddr[:] = _packed(family, local)
        key.raddr[:] = _packed(family, remote)
        found = SocketOwner()
        return found if self.connections.lookup(key, found) else None

    def close(self) -> None:
        self.obj.close()


class ProgramFinder:
    """Program (exe, sha256, parent, command lines) of a socket's owner, from /proc."""

    def __init__(self, hashes: Optional[HashCache] = None, proc: str = "/proc", owner_map: Optional[OwnerMap] = None):
        self.diag = SockDiag()
        self.owners = SocketOwners(proc)
        self.owner_map = owner_map
        self.hashes = hashes or HashCache(None)
        self.proc = proc
        self.cache: Dict[Tuple[int, int, int], Program] = {}  # (pid, dev, ino) -> Program

    def find(self, family: int, protocol: int, local: str, lport: int, remote: str, rport: int,
             uid: int = -1, outgoing: bool = False) -> Program:
        if outgoing and protocol == socket.IPPROTO_TCP and self.owner_map:
            owner = self.owner_map.connection_owner(family, local, lport, remote, rport)
            exe = self._still_runs(owner) if owner else None
            if owner and exe:
                return self.describe(owner.tgid, owner.uid, exe)
        found = self.diag.owner_socket(family, protocol, local, lport, remote, rport)
        if not found:
            return Program(uid=uid)
        inode, socket_uid, cookie = found
        pid = self._mapped_owner(cookie) or self.owners.pid_of(inode)
        if not pid:
            return Program(uid=socket_uid)
        return self.describe(pid, socket_uid)

    def _mapped_owner(self, cookie: int) -> int:
        """The pid the owner map names for the socket, if that process still runs the executable
        it ran then; 0 otherwise."""
        owner = self.owner_map.owner(cookie) if self.owner_map and cookie else None
        return owner.tgid if owner and self._still_runs(owner) else 0

    def _still_runs(self, owner: SocketOwner) -> Optional[os.stat_result]:
        """The stat of the owner's /proc/PID/exe if that process still runs the executable the
        kernel saw it run; None otherwise (it exited, exec'd, or its pid is another's now)."""
        try:
            st = os.stat(f"{self.proc}/{owner.tgid}/exe")
        except OSError:
            return None
        return st if stat_is(st.st_dev, st.st_ino, st_dev_from_kernel(owner.exe_dev), owner.exe_ino) else None

    def _read(self, path: str) -> bytes:
        with open(path, "rb") as f:
            return f.read()

    def describe(self, pid: int, uid: int, st: Optional[os.stat_result] = None) -> Program:
        """The program process `pid` runs; `st`, when given, is the stat of its /proc/PID/exe."""
        base = f"{self.proc}/{pid}"
        try:
            st = st or os.stat(f"{base}/exe")
            key = (pid, st.st_dev, st.st_ino)
            if key in self.cache:
                return self.cache[key]
            exe = os.readlink(f"{base}/exe")
            stat = self._read(f"{base}/stat")
            cmdline = self._read(f"{base}/cmdline")
            name = self._read(f"{base}/comm").rstrip(b"\n")
        except OSError:
            return Program(pid=pid, uid=uid)
        if exe.endswith(" (deleted)"):
            exe = exe[:-len(" (deleted)")]
        ppid = int(stat[stat.rindex(b")") + 2:].split()[1])
        result = self.hashes.hash_live(pid, st.st_dev, st.st_ino)
        sha256 = result.sha256 if result is not None and result.ok else UNKNOWN
        parent, parent_cmdline = UNKNOWN, ""
        try:
            parent = os.readlink(f"{self.proc}/{ppid}/exe")
            parent_cmdline = _words(self._read(f"{self.proc}/{ppid}/cmdline"))
        except OSError:
            pass
        program = Program(pid, exe, sha256, "", parent, _words(cmdline), parent_cmdline, from_bytes(name), uid)
        if len(self.cache) > 4096:
            self.cache.clear()
        self.cache[key] = program
        return program

    def close(self) -> None:
        self.diag.close()
        if self.owner_map:
            self.owner_map.close()


def _words(cmdline: bytes) -> str:
    return " ".join(from_bytes(a) for a in cmdline.rstrip(b"\0").split(b"\0")) if cmdline else ""
