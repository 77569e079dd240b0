"""How the daemon, as root, writes its files: whole or not at all, and never where it should not.

Appends are all or nothing: a write the disk could only take in part (it filled up meanwhile) is
taken back, so a retry later never leaves half a line in a log. Files are opened without
following a symbolic link: a link planted in a data or log directory would otherwise have root
write wherever it points.

At start, each file root writes is checked (repair()): a symbolic link, anything but a regular
file, or a file with other names (hard links) is moved aside; a file another user owns, or that
others may write, becomes root's. Each is said in one sentence.
"""

import errno
import os
import stat
import time
from typing import Optional, Union

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


def repair(path: PathLike) -> Optional[str]:
    """Makes `path`, if it exists, a regular file only root writes, or moves it aside; a sentence
    saying what was wrong, or None."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(st.st_mode):
        target = os.readlink(path)
        return f"{path} was a symbolic link to {target}: root does not write through links; moved it to " \
               f"{_move_aside(path)}"
    if not stat.S_ISREG(st.st_mode):
        return f"{path} was not a regular file; moved it to {_move_aside(path)}"
    if st.st_nlink > 1:
        return f"{path} had {st.st_nlink} names (hard links), so writing it would change another file too; " \
               f"moved it to {_move_aside(path)}"
    uid = os.geteuid()
    if st.st_uid != uid or (uid == 0 and st.st_gid != 0) or st.st_mode & 0o022:
        descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            if uid == 0:
                os.fchown(descriptor, 0, 0)
            os.fchmod(descriptor, stat.S_IMODE(st.st_mode) & ~0o022)
        finally:
            os.close(descriptor)
        return f"{path} was owned by uid {st.st_uid} and gid {st.st_gid} with mode {stat.S_IMODE(st.st_mode):o}; " \
               "only root may write it now"
    return None


def _move_aside(path: PathLike) -> str:
    """Renames `path` itself (a link is not followed) to PATH.bad-<unix time>, never over another."""
    aside = f"{path}.bad-{int(time.time())}"
    attempt = 0
    while os.path.lexists(aside):
        attempt += 1
        aside = f"{path}.bad-{int(time.time())}-{attempt}"
    os.rename(path, aside)
    return aside
