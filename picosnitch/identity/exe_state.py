"""Markers for an executable that ran from somewhere a user should look at twice.

The `exe_state` column lists them, comma-separated ("" for an ordinary file):

- `memfd`: it ran from memory (memfd_create + fexecve), never from a file on disk;
- `deleted`: its file has no name left (deleted after, or before, it ran);
- `replaced`: its path now names another file (renamed over while it ran);
- `world-writable-dir`: its directory may be written by every user (/tmp, /dev/shm);
- `loader:PATH`: it was run by the dynamic loader at PATH (`ld.so ./prog`): exe is the program.

The sha256 is always that of the file that ran, taken from the descriptor pinned at exec.
"""

import os
import stat
from typing import List, Optional

from picosnitch.kernel.records import PinnedFile

MEMFD_PREFIX = "/memfd:"


def markers(pinned: PinnedFile, fd: Optional[int], loader: str = "") -> str:
    """The exe_state of a pinned file (`fd` its descriptor, if still held)."""
    found: List[str] = []
    if pinned.path.startswith(MEMFD_PREFIX):
        found.append("memfd")
    else:
        found += _on_disk(pinned, fd)
    if loader:
        found.append("loader:" + loader)
    return ",".join(found)


def _on_disk(pinned: PinnedFile, fd: Optional[int]) -> List[str]:
    found = []
    try:
        st = os.stat(pinned.path)
        if (st.st_dev, st.st_ino) != pinned.key[:2]:
            found.append("replaced")  # (a rename over it also leaves the file that ran without a name)
    except OSError:
        found.append("deleted")  # no file at this path (it may be linked elsewhere)
    if not found:
        try:
            if fd is not None and os.fstat(fd).st_nlink == 0:
                found.append("deleted")
        except OSError:
            pass
    try:
        if os.stat(os.path.dirname(pinned.path) or "/").st_mode & stat.S_IWOTH:
            found.append("world-writable-dir")
    except OSError:
        pass
    return found
