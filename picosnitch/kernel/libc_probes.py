"""The getaddrinfo uprobes on every C library processes use, not only the host's.

A uprobe is attached to a file (an inode), so it fires in every process that maps that file,
whatever its mount namespace. Containers and chroots bring their own C libraries (other glibc
builds, musl): when a process execs in a root this has not seen (a new mount namespace, or another
root directory), the C libraries in that root's usual library directories get the probes too.

A container's first process may resolve a name within milliseconds of its exec, before its C
library is probed; DNS answers read in the kernel still name that traffic.
"""

import os
from typing import Callable, Iterator, List, Optional, Set, Tuple

LIBRARY_DIRS = ("lib", "lib64", "usr/lib", "usr/lib64", "usr/local/lib")
MAX_LIBRARIES = 64  # files probed at most: each costs two uprobes
ELF_MAGIC = b"\x7fELF"


def is_c_library(name: str) -> bool:
    """glibc's libc.so.6, musl's libc.so (Debian), ld-musl-ARCH.so.1 and libc.musl-ARCH.so.1 (Alpine)."""
    return (name in ("libc.so.6", "libc.so") or (name.startswith("ld-musl-") and name.endswith(".so.1"))
            or (name.startswith("libc.musl-") and name.endswith(".so.1")))


def c_libraries(root: str) -> Iterator[str]:
    """Regular ELF files under root's library directories (and their multiarch subdirectories,
    e.g. lib/x86_64-linux-gnu) that are C libraries. Symbolic links are skipped: an absolute one
    inside another root would resolve against this process's root, and the file it names is found
    under its own name."""
    for top in LIBRARY_DIRS:
        base = os.path.join(root, top)
        dirs = [base]
        try:
            with os.scandir(base) as entries:
                dirs += [e.path for e in entries if e.is_dir(follow_symlinks=False) and
                         (e.name.endswith("-linux-gnu") or e.name.endswith("-linux-musl"))]
        except OSError:
            continue
        for directory in dirs:
            try:
                with os.scandir(directory) as entries:
                    for e in entries:
                        if is_c_library(e.name) and e.is_file(follow_symlinks=False) and _is_elf(e.path):
                            yield e.path
            except OSError:
                continue


def _is_elf(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == ELF_MAGIC  # Debian's glibc libc.so is a linker script
    except OSError:
        return False


class LibcProbes:
    """Attaches `attach(path)` once per C library file, for each root processes exec in."""

    def __init__(self, attach: Callable[[str], None], report: Callable[[str], None], proc: str = "/proc"):
        self.attach = attach
        self.report = report
        self.proc = proc
        self.roots: Set[Tuple[str, int, int]] = set()  # (mount namespace, root dev, root inode)
        self.files: Set[Tuple[int, int]] = set()  # (dev, inode) of probed libraries
        self.full = False

    def add(self, path: str, strict: bool = False) -> bool:
        """Probes one library (by any path to it); False if it already is, or cannot be (strict:
        raises OSError instead of reporting why)."""
        try:
            st = os.stat(path)
        except OSError:
            if strict:
                raise
            return False
        if (st.st_dev, st.st_ino) in self.files:
            return False
        if len(self.files) >= MAX_LIBRARIES:
            if not self.full:
                self.full = True
                self.report(f"more than {MAX_LIBRARIES} C libraries are in use: getaddrinfo in the others is not "
                            "watched (their names come from DNS answers only)")
            return False
        try:
            self.attach(path)
        except OSError as e:
            if strict:
                raise
            self.report(f"getaddrinfo in {path} cannot be watched: {e}")
            return False
        self.files.add((st.st_dev, st.st_ino))
        return True

    def notice(self, tgid: int) -> List[str]:
        """A process exec'd: if its root is new, probes the C libraries found there; returns them."""
        key = self._root_of(tgid)
        if key is None or key in self.roots:
            return []
        root = f"{self.proc}/{tgid}/root"
        added = [path for path in c_libraries(root) if self.add(path)]
        if os.path.exists(f"{self.proc}/{tgid}"):  # still there: root was the one it ran in
            self.roots.add(key)
        return added

    def _root_of(self, tgid: int) -> Optional[Tuple[str, int, int]]:
        try:
            namespace = os.readlink(f"{self.proc}/{tgid}/ns/mnt")
            st = os.stat(f"{self.proc}/{tgid}/root")
        except OSError:
            return None
        return namespace, st.st_dev, st.st_ino
