"""sha256 of executables, cached by what the file is: (device, inode, ctime, size).

The best source is the descriptor the monitor pinned at exec (kernel.pins): it is the very file
that ran, whatever happened to its path since (`hash_fd`). Without one, while the process lives,
its executable is read through `/proc/PID/exe`, which reaches the same file; once it has exited
only its path is left, so the file there is opened and its device and inode are checked against
the kernel's before the hash is trusted.

The cache key is taken from fstat of the open file, never from the kernel's numbers alone: an
inode number reused by another file, or a file modified in place, has another ctime, so a cached
hash can never be returned for a file it was not taken from.

Failures are explicit results, never guesses: `sha256` is then one of the sentinels below (they
cannot be mistaken for a hash, which is 64 hex digits) and `error` says what happened.

Devices are given in userspace `st_dev` encoding. btrfs reports a per-subvolume device in `stat`
that differs from the device the kernel sees, so on btrfs the device is masked out (mask 0) and
only the inode is compared, as with the original "Set st_dev mask" option.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import stat
from dataclasses import dataclass
from typing import Dict, Optional

from picosnitch.kernel.pins import key_of
from picosnitch.kernel.records import FileKey

MISSING = "!missing"  # no such file, or the process exited
MISMATCH = "!mismatch"  # the file there is not the one that was executed (replaced)
UNREADABLE = "!unreadable"  # it exists but cannot be read (permission, I/O error, not a file)

ALL_BITS = (1 << 64) - 1  # st_dev mask that compares the whole device number
BTRFS_SUPER_MAGIC = 0x9123683E
CHUNK = 1 << 20

_libc = ctypes.CDLL(None, use_errno=True)


@dataclass(frozen=True)
class HashResult:
    """A sha256 (64 lowercase hex digits), or a sentinel from this module with an `error` message."""

    sha256: str
    error: Optional[str] = None

    @property
    def ok(self) -> bool:
        return self.error is None


def filesystem_magic(fd: int) -> int:
    """The `f_type` magic number from fstatfs(2) of an open file."""
    buf = ctypes.create_string_buffer(256)  # larger than struct statfs on every architecture
    if _libc.fstatfs(fd, buf) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    # f_type is the first member, a C long; magic numbers fit in 32 bits.
    return ctypes.c_long.from_buffer(buf).value & 0xFFFFFFFF


def _sha256_of_fd(fd: int) -> str:
    """The sha256 of the whole file (read from offset 0, whoever read the descriptor before)."""
    digest = hashlib.sha256()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    offset = 0
    while True:
        n = os.preadv(fd, [buf], offset)
        if not n:
            return digest.hexdigest()
        digest.update(view[:n])
        offset += n


class HashCache:
    """Hashes executables and remembers them by file key (device, inode, ctime, size).

    `st_dev_mask` applies when the kernel's device is compared with the file's: None picks the
    mask per device, 0 on btrfs (whose stat device is per subvolume), all bits elsewhere; an
    integer is applied to every device. Not thread-safe.
    """

    LIMIT = 65536  # cached hashes; the oldest half is forgotten beyond this

    def __init__(self, st_dev_mask: Optional[int] = None):
        self._fixed_mask = st_dev_mask
        self._dev_masks: Dict[int, int] = {}  # learnt per device when the mask is automatic
        self._hashes: Dict[FileKey, str] = {}

    def __len__(self) -> int:
        return len(self._hashes)

    def hash_live(self, pid: int, dev: int, ino: int) -> HashResult:
        """Hash the executable of running process `pid`, which the kernel saw as (dev, ino)."""
        return self._hash(f"/proc/{pid}/exe", dev, ino, what=f"process {pid}")

    def hash_path(self, path: str, dev: int, ino: int) -> HashResult:
        """Hash the file at `path`, but only if it is still (dev, ino): for exited processes."""
        return self._hash(path, dev, ino, what=path)

    def hash_fd(self, key: FileKey, fd: int, what: str) -> HashResult:
        """Hash a pinned file, which `key` names (kernel.pins.key_of when it was pinned)."""
        known = self._hashes.get(key)
        if known is not None:
            return HashResult(known)
        try:
            sha256 = _sha256_of_fd(fd)
        except OSError as e:
            return HashResult(UNREADABLE, f"{what}: cannot read: {e.strerror}")
        return HashResult(self._remember(key, sha256))

    def hash_if_same(self, path: str, key: FileKey) -> HashResult:
        """The hash of the file `key` names (a pin this process never held): from the cache, or from
        the file at `path` if it is still that very file (device, inode, ctime and size)."""
        known = self._hashes.get(key)
        if known is not None:
            return HashResult(known)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
        except OSError as e:
            return HashResult(MISSING, f"{path}: the file that ran is gone ({e.strerror})")
        try:
            if key_of(os.fstat(fd)) != key:
                return HashResult(MISMATCH, f"{path}: is no longer the file that ran")
            return self.hash_fd(key, fd, path)
        finally:
            os.close(fd)

    def cached(self, key: FileKey) -> Optional[str]:
        return self._hashes.get(key)

    def _remember(self, key: FileKey, sha256: str) -> str:
        if len(self._hashes) >= self.LIMIT:
            for old in list(self._hashes)[: self.LIMIT // 2]:
                del self._hashes[old]
        self._hashes[key] = sha256
        return sha256

    def _mask(self, dev: int) -> Optional[int]:
        if self._fixed_mask is not None:
            return self._fixed_mask
        return self._dev_masks.get(dev)

    def _hash(self, path: str, dev: int, ino: int, what: str) -> HashResult:
        mask = self._mask(dev)
        try:
            # O_NONBLOCK: a FIFO planted at the path must not hang the daemon.
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
        except FileNotFoundError:
            return HashResult(MISSING, f"{what}: no longer exists")
        except OSError as e:
            if e.errno == errno.ESRCH:
                return HashResult(MISSING, f"{what}: no longer exists")
            return HashResult(UNREADABLE, f"{what}: cannot open: {e.strerror}")
        try:
            st = os.fstat(fd)
            learning = mask is None
            if mask is None:
                mask = 0 if filesystem_magic(fd) == BTRFS_SUPER_MAGIC else ALL_BITS
                self._dev_masks[st.st_dev] = mask
            if (st.st_dev & mask, st.st_ino) != (dev & mask, ino):
                return HashResult(MISMATCH, f"{what}: is device {st.st_dev} inode {st.st_ino}, "
                                            f"expected device {dev} inode {ino} (file replaced)")
            if not stat.S_ISREG(st.st_mode):
                return HashResult(UNREADABLE, f"{what}: not a regular file")
            if learning:  # verified: the caller's device (the kernel's, on btrfs) is this one
                self._dev_masks[dev] = mask
            return self.hash_fd(key_of(st), fd, what)
        except OSError as e:
            return HashResult(UNREADABLE, f"{what}: cannot read: {e.strerror}")
        finally:
            os.close(fd)
