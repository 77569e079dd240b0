"""Notice when a hashed executable changes, so it can be hashed again.

An executable changes in two ways: it is written in place (same inode: FAN_CLOSE_WRITE on the file,
once the writer is done; FAN_MODIFY would have it hashed half-written), or a new file is renamed
over it, which is what package managers do (new inode: only the directory sees it, as FAN_MOVED_TO
or FAN_CREATE). So both the file and its directory are marked, in an fanotify group that reports file handles (FID mode) instead of open files, because
directory events exist only in that mode. Handles are mapped back to paths with the handles
name_to_handle_at(2) gave for the same files and directories when they were watched.

What each kernel and filesystem allows decides how much is seen:

- Linux >= 5.9: directory handle and entry name (FAN_REPORT_DFID_NAME): exactly the replaced path.
- Linux 5.1-5.8: directory handle only (FAN_REPORT_FID): every watched path in that directory.
- Older kernels, or filesystems that cannot give file handles (some FUSE and network filesystems,
  btrfs subvolumes on some kernels): a plain group reports writes to the file only; a replacement by
  rename is not seen there, and `watch` returns False to say so.

Needs CAP_SYS_ADMIN.
"""

from __future__ import annotations

import ctypes
import errno
import os
import select
import struct
from typing import Dict, List, Optional, Set

from picosnitch.sanitize import from_bytes

# <linux/fanotify.h>
FAN_CLOSE_WRITE = 0x8
FAN_MOVED_TO = 0x80
FAN_CREATE = 0x100
FAN_Q_OVERFLOW = 0x4000
FAN_CLOEXEC = 0x1
FAN_NONBLOCK = 0x2
FAN_CLASS_NOTIF = 0x0
FAN_REPORT_FID = 0x200
FAN_REPORT_DFID_NAME = 0x400 | 0x800  # FAN_REPORT_DIR_FID | FAN_REPORT_NAME
FAN_MARK_ADD = 0x1
FAN_MARK_ONLYDIR = 0x8
FAN_EVENT_INFO_TYPE_FID = 1
FAN_EVENT_INFO_TYPE_DFID_NAME = 2
FANOTIFY_METADATA_VERSION = 3
AT_FDCWD = -100
AT_HANDLE_FID = 0x200
MAX_HANDLE_SZ = 128

FILE_EVENTS = FAN_CLOSE_WRITE
DIR_EVENTS = FAN_MOVED_TO | FAN_CREATE

_METADATA = struct.Struct("=IBBHQii")  # event_len, vers, reserved, metadata_len, mask, fd, pid
_INFO_HEADER = struct.Struct("=BBH")  # info_type, pad, len
_FSID_AND_HANDLE = struct.Struct("=8sIi")  # fsid, handle_bytes, handle_type

# Errors fanotify_mark / name_to_handle_at give for a filesystem that cannot report handles.
_NO_FID_SUPPORT = (errno.EOPNOTSUPP, errno.ENODEV, errno.EXDEV)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fanotify_init.argtypes = [ctypes.c_uint, ctypes.c_uint]
_libc.fanotify_mark.argtypes = [ctypes.c_int, ctypes.c_uint, ctypes.c_uint64, ctypes.c_int,
                                ctypes.c_char_p]
_libc.name_to_handle_at.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p,
                                    ctypes.POINTER(ctypes.c_int), ctypes.c_int]


class FanotifyUnavailable(OSError):
    """fanotify cannot be used here (not built into the kernel, or not permitted)."""


def _fail(what: str, path: Optional[str] = None) -> OSError:
    err = ctypes.get_errno()
    return OSError(err, f"{what}: {os.strerror(err)}", path)


def _fanotify_init(report_flags: int) -> int:
    flags = FAN_CLASS_NOTIF | FAN_CLOEXEC | FAN_NONBLOCK | report_flags
    fd = _libc.fanotify_init(flags, os.O_RDONLY | os.O_CLOEXEC | getattr(os, "O_LARGEFILE", 0))
    if fd >= 0:
        return fd
    err = ctypes.get_errno()
    if err == errno.EPERM:
        raise FanotifyUnavailable(err, "fanotify needs CAP_SYS_ADMIN: run picosnitch as root")
    if err == errno.ENOSYS:
        raise FanotifyUnavailable(err, "this kernel was built without fanotify (CONFIG_FANOTIFY)")
    raise _fail("fanotify_init")


def _fanotify_mark(fd: int, path: str, mask: int, flags: int = 0) -> None:
    if _libc.fanotify_mark(fd, FAN_MARK_ADD | flags, mask, AT_FDCWD, os.fsencode(path)) != 0:
        raise _fail("fanotify_mark", path)


def file_handle(path: str) -> bytes:
    """The handle type and bytes name_to_handle_at(2) gives for `path`, as fanotify reports them."""
    buf = ctypes.create_string_buffer(8 + MAX_HANDLE_SZ)
    struct.pack_into("=I", buf, 0, MAX_HANDLE_SZ)
    mount_id = ctypes.c_int()
    for flags in (0, AT_HANDLE_FID):  # AT_HANDLE_FID (6.5+): filesystems that cannot be exported
        if _libc.name_to_handle_at(AT_FDCWD, os.fsencode(path), buf, ctypes.byref(mount_id),
                                   flags) == 0:
            size, handle_type = struct.unpack_from("=Ii", buf)
            return struct.pack("=i", handle_type) + buf.raw[8:8 + size]
        if ctypes.get_errno() not in (errno.EOPNOTSUPP, errno.EINVAL):
            break
    raise _fail("name_to_handle_at", path)


class ExecutableWatcher:
    """Watches executables and reports the paths that changed and need hashing again.

    `fileno()` is readable (select/poll/epoll) when `read_changes()` has something to return.
    """

    # Reporting modes tried in order; the first the kernel accepts is used.
    FID_MODES = (FAN_REPORT_DFID_NAME | FAN_REPORT_FID, FAN_REPORT_FID)

    def __init__(self):
        self._epoll = select.epoll()
        self._fid_fd: Optional[int] = None
        self._plain_fd: Optional[int] = None  # created on first need
        self.reports_names = False
        self._watched: Set[str] = set()
        self._watched_in: Dict[str, Set[str]] = {}  # directory -> watched paths in it
        self._files: Dict[bytes, Set[str]] = {}  # handle -> paths (a set: handles of
        self._dirs: Dict[bytes, Set[str]] = {}  # different filesystems may coincide)
        self._plain_inodes: Dict[tuple, str] = {}  # (st_dev, st_ino) -> path, plain group
        try:
            for mode in self.FID_MODES:
                try:
                    self._fid_fd = _fanotify_init(mode)
                    self.reports_names = bool(mode & FAN_REPORT_DFID_NAME)
                    break
                except FanotifyUnavailable:
                    raise
                except OSError as e:
                    if e.errno != errno.EINVAL:  # EINVAL: this kernel lacks the mode
                        raise
            if self._fid_fd is None:
                self._plain_group()
            else:
                self._epoll.register(self._fid_fd, select.EPOLLIN)
        except BaseException:
            self.close()
            raise

    def fileno(self) -> int:
        return self._epoll.fileno()

    def watch(self, path: str) -> bool:
        """Report future changes of the executable at `path` (symlinks resolved).

        Returns True when both writes in place and replacement by rename will be seen, False when
        only writes in place will be (see the module docstring).
        """
        path = os.path.realpath(path)
        directory = os.path.dirname(path)
        if self._fid_fd is not None:
            try:
                self._watch_with_handles(path, directory)
                return True
            except OSError as e:
                if e.errno not in _NO_FID_SUPPORT:
                    raise
        st = os.stat(path)
        _fanotify_mark(self._plain_group(), path, FILE_EVENTS)
        self._plain_inodes[(st.st_dev, st.st_ino)] = path
        self._remember(path, directory)
        return False

    def read_changes(self) -> List[str]:
        """Paths of watched executables changed since the last call, sorted; [] if none.

        If the kernel's queue overflowed, every watched path is returned.
        """
        changed: Set[str] = set()
        if self._fid_fd is not None:
            for buf in self._drain(self._fid_fd):
                self._fid_events(buf, changed)
        if self._plain_fd is not None:
            for buf in self._drain(self._plain_fd):
                self._plain_events(buf, changed)
        return sorted(changed)

    def close(self) -> None:
        for fd in (self._fid_fd, self._plain_fd):
            if fd is not None:
                os.close(fd)
        self._fid_fd = self._plain_fd = None
        self._epoll.close()

    def __enter__(self) -> "ExecutableWatcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _plain_group(self) -> int:
        if self._plain_fd is None:
            self._plain_fd = _fanotify_init(0)
            self._epoll.register(self._plain_fd, select.EPOLLIN)
        return self._plain_fd

    def _watch_with_handles(self, path: str, directory: str) -> None:
        # Handles first: they fail on filesystems without FID support before anything is marked.
        file_key, dir_key = file_handle(path), file_handle(directory)
        assert self._fid_fd is not None, "only called with a FID group"
        _fanotify_mark(self._fid_fd, directory, DIR_EVENTS, FAN_MARK_ONLYDIR)
        _fanotify_mark(self._fid_fd, path, FILE_EVENTS)
        self._files.setdefault(file_key, set()).add(path)
        self._dirs.setdefault(dir_key, set()).add(directory)
        self._remember(path, directory)

    def _remember(self, path: str, directory: str) -> None:
        self._watched.add(path)
        self._watched_in.setdefault(directory, set()).add(path)

    @staticmethod
    def _drain(fd: int):
        while True:
            try:
                buf = os.read(fd, 65536)
            except BlockingIOError:
                return
            if not buf:
                return
            yield buf

    def _events(self, buf: bytes):
        """(mask, fd, info records) of each event in `buf`."""
        offset = 0
        while offset + _METADATA.size <= len(buf):
            event_len, version, _, metadata_len, mask, fd, _ = _METADATA.unpack_from(buf, offset)
            if version != FANOTIFY_METADATA_VERSION:
                raise OSError(errno.EPROTO, f"unknown fanotify event version {version}")
            yield mask, fd, buf[offset + metadata_len:offset + event_len]
            offset += event_len

    def _fid_events(self, buf: bytes, changed: Set[str]) -> None:
        for mask, _, info in self._events(buf):
            if mask & FAN_Q_OVERFLOW:
                changed.update(self._watched)
                continue
            named = []  # (directory, entry name) records
            whole_dirs: list[str] = []  # directories whose changed entry is not named (FID-only kernels)
            offset = 0
            while offset + _INFO_HEADER.size <= len(info):
                info_type, _, length = _INFO_HEADER.unpack_from(info, offset)
                if length == 0:
                    break
                record = info[offset + _INFO_HEADER.size:offset + length]
                offset += length
                if info_type not in (FAN_EVENT_INFO_TYPE_FID, FAN_EVENT_INFO_TYPE_DFID_NAME):
                    continue
                _, size, handle_type = _FSID_AND_HANDLE.unpack_from(record)
                start = _FSID_AND_HANDLE.size
                key = struct.pack("=i", handle_type) + record[start:start + size]
                if info_type == FAN_EVENT_INFO_TYPE_DFID_NAME:
                    name = record[start + size:].split(b"\0", 1)[0]
                    named += [(d, from_bytes(name)) for d in self._dirs.get(key, ())]
                else:
                    changed.update(self._files.get(key, ()))
                    whole_dirs += self._dirs.get(key, ())
            if mask & DIR_EVENTS:
                replaced = ([p for p in (os.path.join(d, n) for d, n in named) if p in self._watched]
                            if named else
                            [p for d in whole_dirs for p in self._watched_in.get(d, ())])
                changed.update(replaced)
                for path in replaced:
                    self._rewatch(path)
            else:
                changed.update(p for p in (os.path.join(d, n) for d, n in named)
                               if p in self._watched)

    def _rewatch(self, path: str) -> None:
        """Mark the new file now at a watched path, so its own writes are seen too."""
        try:
            self._watch_with_handles(path, os.path.dirname(path))
        except OSError:
            pass  # gone again or not markable: the next directory event still reports the path

    def _plain_events(self, buf: bytes, changed: Set[str]) -> None:
        for mask, fd, _ in self._events(buf):
            if mask & FAN_Q_OVERFLOW:
                changed.update(self._watched)
            if fd < 0:
                continue
            try:
                st = os.fstat(fd)
            finally:
                os.close(fd)
            path = self._plain_inodes.get((st.st_dev, st.st_ino))
            if path is not None:
                changed.add(path)
