"""Pins what a process executed, the moment its exec record arrives, and hands the pins on.

A hash taken when the traffic is handled comes too late: by then a short-lived process has exited,
and its executable may have been deleted, replaced by a rename, or been a memfd that is gone. So
the monitor, which sees each exec within microseconds, opens `/proc/PID/exe` at once (and the
script an interpreter runs or the program ld.so loads, as the daemon's classifier names them,
through the process's own cwd and root), and passes the open files to the identity worker over a
Unix socket (SCM_RIGHTS). Whatever happens to the paths afterwards, the identity worker hashes the
very files that ran.

A process may leave its directory at once (zsh walks up its cwd with chdir("..") to name it), so
the script's name is resolved only in the cwd and root the kernel saw at exec (Exec.cwd,
Exec.root), never in wherever the process is by the time the monitor reads the record.

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
import time
from collections import OrderedDict
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from picosnitch.kernel.records import Exec, FileKey, Pinned, PinnedFile, stat_is

FDS_PER_MESSAGE = 64  # at most SCM_MAX_FD (253); few, so the receiver holds few beyond its own store
FLUSH_AT = 64  # descriptors the monitor holds before it sends them, batch or not
MESSAGE_BYTES = 1 << 16
FD_SIZE = array.array("i").itemsize
OPEN_FLAGS = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY
DIRECTORY_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC
# How long a process's cwd or root that is not the one it had at exec is asked for again: zsh, for
# one, walks up its cwd with chdir("..") to name it and comes back, within a millisecond unless it
# is preempted. The monitor waits at most WAIT_BUDGET of each second so, however many do this.
RETURN_WAIT = 0.02
WAIT_BUDGET = 0.1
RETRY_EVERY = 0.0002

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


class Grab:
    """What could be opened of a process that just exec'd (None: it was gone)."""

    def __init__(self) -> None:
        self.known: Optional[PinnedFile] = None  # the executable, sent recently
        self.exe_fd: Optional[int] = None
        self.exe_path: Optional[str] = None
        self.root_fd: Optional[int] = None
        self.cwd_fd: Optional[int] = None
        self.shares_our_root = False
        self.moved = ""  # why a handle was not taken: the process had left its exec's cwd or root

    def close(self) -> None:
        for fd in (self.exe_fd, self.root_fd, self.cwd_fd):
            if fd is not None:
                os.close(fd)
        self.exe_fd = self.root_fd = self.cwd_fd = None


def _ran(st: os.stat_result, record: Exec) -> bool:
    """Whether a file is the one the exec ran."""
    return stat_is(st.st_dev, st.st_ino, record.exe_dev, record.exe_ino)


def _is_directory(fd: int, at_exec: Tuple[int, int]) -> bool:
    """Whether an open directory is (st_dev, st_ino) as the kernel named it, with the inode
    number as the kernel holds it (fdinfo; overlayfs may stat another)."""
    st = os.fstat(fd)
    ino = st.st_ino
    try:
        with open(f"/proc/self/fdinfo/{fd}", "rb") as info:
            ino = next((int(line.split()[1]) for line in info if line.startswith(b"ino:")), ino)
    except OSError:
        pass
    return stat_is(st.st_dev, ino, *at_exec)


def _named(fd: int) -> str:
    """The path an open handle names now, for messages."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError as e:
        return f"(unnamed: {e.strerror})"


def _strip_deleted(path: str) -> str:
    return path[: -len(" (deleted)")] if path.endswith(" (deleted)") else path


class ExecPinner:
    """Opens what each exec ran and queues the new descriptors until send() passes them on."""

    def __init__(self, classify: Optional[Classifier] = None, memory: int = 128, proc: str = "/proc",
                 sock: Optional[socket.socket] = None, flush_at: int = FLUSH_AT):
        """With `sock`, descriptors are sent as soon as `flush_at` are queued, and by flush()."""
        self.classify = classify
        self.memory = memory
        self.proc = proc
        self.sock = sock
        self.flush_at = flush_at
        self.dropped = 0  # descriptors closed unsent: the identity worker was too far behind
        self._sent: "OrderedDict[FileKey, str]" = OrderedDict()  # key -> path, recently sent
        self._queued: Dict[FileKey, int] = {}  # key -> descriptor, not yet sent
        self._waited = 0.0  # seconds waited for processes to come back (RETURN_WAIT) this second
        self._second = 0.0

    def pin(self, record: Exec) -> Pinned:
        """The Pinned record for an exec: its executable, and the script or program the classifier
        names, opened through O_PATH handles on the process's cwd and root (taken only then)."""
        grab = Grab()
        exe = f"{self.proc}/{record.tgid}/exe"
        try:
            # Only the file this exec ran: by now the process may have exec'd again, or exited and
            # left its pid to another. Else it is found by path, verified (_open_verified).
            st = os.stat(exe)
            ran = _ran(st, record)
            if ran:
                grab.known = self._recent(st)  # an exec storm of one binary: one stat each
            if ran and grab.known is None:
                fd = os.open(exe, OPEN_FLAGS)
                if _ran(os.fstat(fd), record):
                    grab.exe_fd, grab.exe_path = fd, _named(fd)
                else:
                    os.close(fd)
        except OSError:
            pass
        try:
            return self._pin(record, grab)
        finally:
            grab.close()

    def _recent(self, st: os.stat_result) -> Optional[PinnedFile]:
        """The pin of a file sent recently, refreshed as used, or None."""
        key = key_of(st)
        path = self._sent.get(key)
        if path is None or not stat.S_ISREG(st.st_mode):
            return None
        self._sent.move_to_end(key)
        return PinnedFile("exe", path, key, st.st_nlink)

    def _handles(self, record: Exec, grab: "Grab") -> None:
        """O_PATH handles on the cwd and root the process had at exec, usable after it has exited.
        By now it may be elsewhere (a script's name resolved there would be another file), so each
        handle must be the directory the kernel reported at exec (Exec.cwd, Exec.root)."""
        base = f"{self.proc}/{record.tgid}"
        grab.root_fd = self._directory(f"{base}/root", record.root, "root", grab)
        if grab.root_fd is not None:
            grab.shares_our_root = grab.shares_our_root or _named(grab.root_fd) == "/"
            grab.cwd_fd = self._directory(f"{base}/cwd", record.cwd, "working directory", grab)

    def _directory(self, link: str, at_exec: Tuple[int, int], what: str, grab: "Grab") -> Optional[int]:
        """A handle on the directory `link` names, if it is the one the process had at exec; asked
        again for up to RETURN_WAIT while it is another. None if gone (or elsewhere: grab.moved)."""
        start = time.monotonic()
        if start - self._second >= 1:
            self._second, self._waited = start, 0.0
        deadline = start + min(RETURN_WAIT, max(0.0, WAIT_BUDGET - self._waited))
        try:
            while True:
                try:
                    fd = os.open(link, DIRECTORY_FLAGS)
                except OSError:
                    return None  # gone: _open_run_file says what could not be found
                if at_exec == (0, 0) or _is_directory(fd, at_exec):
                    return fd
                now = _named(fd)
                os.close(fd)
                if time.monotonic() >= deadline:
                    grab.moved = f"its {what} was no longer the one it had at exec (it was {now})"
                    return None
                time.sleep(RETRY_EVERY)
        finally:
            self._waited += time.monotonic() - start

    def _pin(self, record: Exec, grab: "Grab") -> Pinned:
        files: List[PinnedFile] = []
        missed: List[Tuple[str, str, str]] = []
        exe: Optional[PinnedFile] = grab.known
        if exe is None and grab.exe_fd is not None and grab.exe_path is not None:
            exe = self._pinned(grab.exe_fd, "exe", grab.exe_path)
            grab.exe_fd = None  # kept (or closed) by _pinned
        if exe is None:
            exe = self._open_verified(record)  # found in our root: it ran in our root
            grab.shares_our_root = grab.shares_our_root or exe is not None
            if exe is None:
                missed.append(("exe", record.filename, "the process had exited or exec'd again before it could "
                                                       "be pinned, and its path names another file now"))
        if exe is not None:
            files.append(exe)
        targets = self.classify(record, exe.path if exe else record.filename) if self.classify else ()
        if targets:
            self._handles(record, grab)
        for role, path in targets:
            try:
                pinned = self._open_run_file(grab, role, path)
            except OSError as e:
                missed.append((role, path, e.strerror or str(e)))
                continue
            if exe is None or pinned.key != exe.key:
                files.append(pinned)
        return Pinned(record.tgid, record.exec_id, tuple(files), tuple(missed))

    def _open_run_file(self, grab: "Grab", role: str, path: str) -> PinnedFile:
        """A script or program as the process names it: from its root if absolute, else from its
        cwd, through the handles grab() took. Without them (it exited first), an absolute path is
        opened in our root when that was its root too; a relative one cannot be found."""
        if not path.startswith("/") and grab.cwd_fd is not None:
            try:
                return self._open(path, role, dir_fd=grab.cwd_fd)
            except OSError as e:
                raise OSError(e.errno, f"{e.strerror} in its cwd {_named(grab.cwd_fd)}") from e
        if path.startswith("/") and grab.root_fd is not None:
            return self._open(path.lstrip("/") or ".", role, dir_fd=grab.root_fd)
        if grab.moved:
            raise OSError(errno.ESTALE, grab.moved)
        if path.startswith("/") and grab.shares_our_root:
            return self._open(path, role)
        raise OSError(errno.ESRCH, "the process exited before its cwd could be read")

    def take(self) -> List[Tuple[FileKey, int]]:
        """The descriptors queued since the last call, for send(); they are the caller's now."""
        queued = list(self._queued.items())
        self._queued.clear()
        return queued

    def flush(self) -> None:
        """Sends what is queued to the identity worker now, without waiting for it: a burst of new
        executables holds at most `flush_at` descriptors here. Those its socket has no room for
        are closed (the identity worker then hashes by path, verified: hashing.hash_if_same)."""
        if self.sock is not None and self._queued:
            self.dropped += send(self.sock, self.take(), socket.MSG_DONTWAIT)


    def close(self) -> None:
        for fd in self._queued.values():
            os.close(fd)
        self._queued.clear()

    def _open(self, where: str, role: str, dir_fd: Optional[int] = None) -> PinnedFile:
        fd = os.open(where, OPEN_FLAGS, dir_fd=dir_fd)
        try:
            path = os.readlink(f"/proc/self/fd/{fd}")
        except BaseException:
            os.close(fd)
            raise
        pinned = self._pinned(fd, role, path)
        if pinned is None:
            raise OSError(errno.EINVAL, "not a regular file")
        return pinned

    def _pinned(self, fd: int, role: str, path: str) -> Optional[PinnedFile]:
        """The pin of an open file (None, and closed, if it is not a regular file)."""
        try:
            st = os.fstat(fd)
        except OSError:
            st = None
        if st is None or not stat.S_ISREG(st.st_mode):
            os.close(fd)
            return None
        return self._keep(fd, PinnedFile(role, _strip_deleted(path), key_of(st), st.st_nlink))

    def _open_verified(self, record: Exec) -> Optional[PinnedFile]:
        """The process is gone already (or runs another exec now): its executable by the path it
        was started by, if that still names the file the kernel ran (_ran)."""
        if not record.filename.startswith("/"):
            return None
        try:
            fd = os.open(record.filename, OPEN_FLAGS)
        except OSError:
            return None
        st = os.fstat(fd)
        if not _ran(st, record) or not stat.S_ISREG(st.st_mode):
            os.close(fd)
            return None
        try:
            path = os.readlink(f"/proc/self/fd/{fd}")  # its real path, as /proc/PID/exe would have said
        except OSError:
            path = record.filename
        return self._keep(fd, PinnedFile("exe", _strip_deleted(path), key_of(st), st.st_nlink))

    def _keep(self, fd: int, pinned: PinnedFile) -> PinnedFile:
        """Queues fd to be sent, unless its file was sent recently (then the key is enough)."""
        key = pinned.key
        if key in self._sent or key in self._queued:
            os.close(fd)
        else:
            self._queued[key] = fd
            if len(self._queued) >= self.flush_at:
                self.flush()
        self._sent[key] = pinned.path
        self._sent.move_to_end(key)
        while len(self._sent) > self.memory:
            self._sent.popitem(last=False)
        return pinned


def send(sock: socket.socket, queued: List[Tuple[FileKey, int]], flags: int = 0) -> int:
    """Sends descriptors (their keys as the payload) to the identity worker, then closes them here;
    returns how many could not be sent (no room, with MSG_DONTWAIT; too many in flight)."""
    unsent = 0
    for start in range(0, len(queued), FDS_PER_MESSAGE):
        part = queued[start:start + FDS_PER_MESSAGE]
        try:
            socket.send_fds(sock, [pickle.dumps([key for key, _ in part])], [fd for _, fd in part], flags)
        except (BlockingIOError, InterruptedError):
            unsent += len(part)
        except OSError as e:
            if e.errno != errno.ETOOMANYREFS:
                raise
            unsent += len(part)
        finally:
            for _, fd in part:
                os.close(fd)
    return unsent


def receive(sock: socket.socket) -> Iterator[Tuple[FileKey, int]]:
    """Every (key, descriptor) waiting on the identity worker's end of the socket (non-blocking),
    one message at a time: a consumer that keeps few open never holds a whole burst at once."""
    room = socket.CMSG_LEN(FDS_PER_MESSAGE * FD_SIZE)
    while True:
        try:  # (socket.recv_fds would drop MSG_DONTWAIT)
            data, ancillary, _, _ = sock.recvmsg(MESSAGE_BYTES, room, socket.MSG_DONTWAIT | socket.MSG_CMSG_CLOEXEC)
        except (BlockingIOError, InterruptedError):
            return
        fds = array.array("i")
        for level, kind, payload in ancillary:
            if (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS):
                fds.frombytes(payload[: len(payload) - len(payload) % FD_SIZE])
        if not data and not fds:
            return
        yield from zip(pickle.loads(data), fds)
