"""sha256 of executables, cached by (masked device, inode).

A process is identified by the executable the kernel ran, named by its device and inode. While the
process lives, its executable is read through `/proc/PID/exe`, which reaches the very file it runs
even when that path was since deleted or replaced. Once it has exited only its path is left, so the
file there is opened and its device and inode are checked before the hash is trusted.

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
from typing import Dict, Optional, Tuple

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
    digest = hashlib.sha256()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    while True:
        n = os.readv(fd, [buf])
        if not n:
            return digest.hexdigest()
        digest.update(view[:n])


class HashCache:
    """Hashes executables and remembers them by (device & mask, inode).

    `st_dev_mask` None picks the mask per device: 0 on btrfs, all bits elsewhere. An integer is
    applied to every device. A cache hit does not touch the file at all, so entries must be
    dropped with `invalidate` when the file changes (identity.fanotify reports that). Not thread-safe.
    """

    def __init__(self, st_dev_mask: Optional[int] = None):
        self._fixed_mask = st_dev_mask
        self._dev_masks: Dict[int, int] = {}  # learnt per device when the mask is automatic
        self._hashes: Dict[Tuple[int, int], str] = {}

    def __len__(self) -> int:
        return len(self._hashes)

    def hash_live(self, pid: int, dev: int, ino: int) -> HashResult:
        """Hash the executable of running process `pid`, which the kernel saw as (dev, ino)."""
        return self._hash(f"/proc/{pid}/exe", dev, ino, what=f"process {pid}")

    def hash_path(self, path: str, dev: int, ino: int) -> HashResult:
        """Hash the file at `path`, but only if it is still (dev, ino): for exited processes."""
        return self._hash(path, dev, ino, what=path)

    def invalidate(self, dev: int, ino: int) -> None:
        """Forget the hash of (dev, ino), e.g. because the file was modified in place."""
        mask = self._mask(dev)
        if mask is not None:
            self._hashes.pop((dev & mask, ino), None)
        else:  # device never opened: it may still be a btrfs alias of one that was
            self._hashes.pop((dev, ino), None)
            self._hashes.pop((0, ino), None)

    def _mask(self, dev: int) -> Optional[int]:
        if self._fixed_mask is not None:
            return self._fixed_mask
        return self._dev_masks.get(dev)

    def _hash(self, path: str, dev: int, ino: int, what: str) -> HashResult:
        mask = self._mask(dev)
        if mask is not None and (dev & mask, ino) in self._hashes:
            return HashResult(self._hashes[(dev & mask, ino)])
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
            sha256 = _sha256_of_fd(fd)
            if learning:  # verified: the caller's device (the kernel's, on btrfs) is this one
                self._dev_masks[dev] = mask
        except OSError as e:
            return HashResult(UNREADABLE, f"{what}: cannot read: {e.strerror}")
        finally:
            os.close(fd)
        self._hashes[(dev & mask, ino)] = sha256
        return HashResult(sha256)
