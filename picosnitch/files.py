"""How the daemon, as root, writes its files: whole or not at all, and never where it should not.

Appends are all or nothing: a write the disk could only take in part (it filled up meanwhile) is
taken back, so a retry later never leaves half a line in a log. Files are opened without
following a symbolic link: a link planted in a data or log directory would otherwise have root
write wherever it points.
"""

import errno
import os
from typing import Union

PathLike = Union[str, "os.PathLike[str]"]
LOG_FILE_MODE = 0o644


def open_append(path: PathLike, mode: int = LOG_FILE_MODE) -> int:
    """A descriptor for appending to `path` (created if missing), refusing a symbolic link."""
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, mode)


def append_all(descriptor: int, data: bytes) -> None:
    """Appends `data` in one write, or nothing: a short write (the disk filled up in the middle)
    is cut off again and raised as ENOSPC."""
    written = os.write(descriptor, data)
    if written < len(data):
        os.ftruncate(descriptor, os.fstat(descriptor).st_size - written)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def append(path: PathLike, data: bytes, mode: int = LOG_FILE_MODE) -> None:
    """Opens `path`, appends `data` whole or not at all (see append_all), and closes it: a log
    rotated meanwhile is followed at once."""
    descriptor = open_append(path, mode)
    try:
        append_all(descriptor, data)
    finally:
        os.close(descriptor)
