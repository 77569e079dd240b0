"""Pins what a process executed, the moment its exec record arrives, and hands the pins on.

A hash taken when the traffic is handled comes too late: by then a short-lived process has exited,
and its executable may have been deleted, replaced by a rename, or been a memfd that is gone. So
the monitor, which sees each exec within microseconds, opens `/proc/PID/exe` at once (and the
script an interpreter runs or the program ld.so loads, as the daemon's classifier names them,
through the process's own cwd and root), and passes the open files to the identity worker over a
Unix socket (SCM_RIGHTS). Whatever happens to the paths afterwards, the identity worker hashes the
very files that ran.

Files are told apart by (st_dev, st_ino, st_ctime_ns, st_size): an exec storm of one binary costs
one descriptor, sent once; a file modified in place or an inode number reused by another file has
another key, so it is never taken for the one pinned before. The monitor remembers the last
`memory` keys it sent; the identity worker keeps at least that many open, in the same order of use
(PinStore), so every key the monitor sends without a descriptor is still held there.
"""

import array
import errno
import os
import pickle
import resource
import socket
import stat
from collections import OrderedDict
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from picosnitch.kernel.records import Exec, FileKey, Pinned, PinnedFile

FDS_PER_MESSAGE = 250  # SCM_RIGHTS carries at most 253 descriptors per message (SCM_MAX_FD)
MESSAGE_BYTES = 1 << 16
FD_SIZE = array.array("i").itemsize
OPEN_FLAGS = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY

# Given an exec and its executable's path, the other files it runs, as (role, path as the process
# named it): "script" for an interpreter's script, "program" for the program ld.so loads.
Classifier = Callable[[Exec, str], Sequence[Tuple[str, str]]]


def pin_capacity() -> int:
    """How many pinned files the identity worker may hold open: half its descriptor limit (which
    "Set RLIMIT_NOFILE" raises), at most 8192."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(16, min(soft // 2, 8192))


def key_of(st: os.stat_result) -> FileKey:
    return (st.st_dev, st.st_ino, st.st_ctime_ns, st.st_size)


def _strip_deleted(path: str) -> str:
    return path[: -len(" (deleted)")] if path.endswith(" (deleted)") else path


class ExecPinner:
    """Opens what each exec ran and queues the new descriptors until send() passes them on."""

    def __init__(self, classify: Optional[Classifier] = None, memory: int = 128, proc: str = "/proc"):
        self.classify = classify
        self.memory = memory
        self.proc = proc
        self._sent: "OrderedDict[FileKey, None]" = OrderedDict()
        self._queued: Dict[FileKey, int] = {}  # key -> descriptor, not yet sent

    def pin(self, record: Exec) -> Pinned:
        files: List[PinnedFile] = []
        missed: List[Tuple[str, str, str]] = []
        base = f"{self.proc}/{record.tgid}"
        exe: Optional[PinnedFile]
        try:
            shares_our_root = os.readlink(f"{base}/root") == "/"
            exe = self._open(f"{base}/exe", "exe", os.readlink(f"{base}/exe"))
        except OSError:
            exe = self._open_verified(record)  # found in our root: it ran in our root
            shares_our_root = exe is not None
            if exe is None:
                missed.append(("exe", record.filename, "the process was gone before it could be pinned"))
        if exe is not None:
            files.append(exe)
        for role, path in (self.classify(record, exe.path if exe else record.filename) if self.classify else ()):
            try:
                pinned = self._open_run_file(base, role, path, shares_our_root)
            except OSError as e:
                missed.append((role, path, e.strerror or str(e)))
                continue
            if exe is None or pinned.key != exe.key:
                files.append(pinned)
        return Pinned(record.tgid, record.exec_id, tuple(files), tuple(missed))

    def _open_run_file(self, base: str, role: str, path: str, shares_our_root: bool) -> PinnedFile:
        """A script or program as the process names it: from its root if absolute, else from its
        cwd. Once it has exited its cwd is gone; an absolute path is then opened in our root, which
        was its root too."""
        try:
            return self._open(f"{base}/root{path}" if path.startswith("/") else f"{base}/cwd/{path}", role, None)
        except OSError as e:
            if e.errno not in (errno.ENOENT, errno.ESRCH) or not (path.startswith("/") and shares_our_root):
                if not path.startswith("/") and not os.path.lexists(f"{base}/cwd/."):
                    raise OSError(e.errno, "the process exited before its cwd could be read") from None
                raise
        return self._open(path, role, None)

    def send(self, sock: socket.socket) -> None:
        """Sends the queued descriptors (key list as the payload), then closes them here."""
        queued = list(self._queued.items())
        self._queued.clear()
        for start in range(0, len(queued), FDS_PER_MESSAGE):
            part = queued[start:start + FDS_PER_MESSAGE]
            try:
                socket.send_fds(sock, [pickle.dumps([key for key, _ in part])], [fd for _, fd in part])
            finally:
                for _, fd in part:
                    os.close(fd)

    def close(self) -> None:
        for fd in self._queued.values():
            os.close(fd)
        self._queued.clear()

    def _open(self, where: str, role: str, path: Optional[str]) -> PinnedFile:
        fd = os.open(where, OPEN_FLAGS)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise OSError(0, "not a regular file")
            if path is None:
                path = os.readlink(f"/proc/self/fd/{fd}")
        except BaseException:
            os.close(fd)
            raise
        return self._keep(fd, PinnedFile(role, _strip_deleted(path), key_of(st), st.st_nlink))

    def _open_verified(self, record: Exec) -> Optional[PinnedFile]:
        """The process is gone already: its executable by the path it was started by, if that still
        names the file the kernel ran (the same inode; on btrfs the device numbers differ)."""
        if not record.filename.startswith("/"):
            return None
        try:
            fd = os.open(record.filename, OPEN_FLAGS)
        except OSError:
            return None
        st = os.fstat(fd)
        same_device = st.st_dev == record.exe_dev or os.major(st.st_dev) == 0
        if st.st_ino != record.exe_ino or not same_device or not stat.S_ISREG(st.st_mode):
            os.close(fd)
            return None
        return self._keep(fd, PinnedFile("exe", os.path.realpath(record.filename), key_of(st), st.st_nlink))

    def _keep(self, fd: int, pinned: PinnedFile) -> PinnedFile:
        """Queues fd to be sent, unless its file was sent recently (then the key is enough)."""
        key = pinned.key
        if key in self._sent or key in self._queued:
            os.close(fd)
        else:
            self._queued[key] = fd
        self._sent[key] = None
        self._sent.move_to_end(key)
        while len(self._sent) > self.memory:
            self._sent.popitem(last=False)
        return pinned


def receive(sock: socket.socket) -> List[Tuple[FileKey, int]]:
    """Every (key, descriptor) waiting on the identity worker's end of the socket (non-blocking)."""
    received: List[Tuple[FileKey, int]] = []
    room = socket.CMSG_LEN(FDS_PER_MESSAGE * FD_SIZE)
    while True:
        try:  # (socket.recv_fds would drop MSG_DONTWAIT)
            data, ancillary, _, _ = sock.recvmsg(MESSAGE_BYTES, room, socket.MSG_DONTWAIT | socket.MSG_CMSG_CLOEXEC)
        except (BlockingIOError, InterruptedError):
            return received
        fds = array.array("i")
        for level, kind, payload in ancillary:
            if (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS):
                fds.frombytes(payload[: len(payload) - len(payload) % FD_SIZE])
        if not data and not fds:
            return received
        received += list(zip(pickle.loads(data), fds))
