"""Which executable image each process ran, as the kernel reported it (and /proc, for the rest).

A process may exec several times; traffic names the image it came from by exe device+inode,
so images are kept per (tgid, dev, ino). Exited processes are kept a while, because their
last flows arrive after their exit event.
"""

import os
import time
from dataclasses import dataclass, field, replace
from typing import Dict, Optional, Tuple

from picosnitch.kernel.records import Exec, Exit, Fork
from picosnitch.sanitize import from_bytes

EXITED_KEEP_SECONDS = 60.0


@dataclass(frozen=True)
class Image:
    """One executable image run by a process."""

    exe: str
    dev: int
    ino: int
    name: str
    argv: Tuple[str, ...]
    argv_complete: bool = True


@dataclass
class Process:
    tgid: int
    ppid: int
    image: Image
    history: Dict[Tuple[int, int], Image] = field(default_factory=dict)  # earlier images, by (dev, ino)
    exited: Optional[float] = None

    def image_for(self, dev: int, ino: int) -> Optional[Image]:
        if (self.image.dev, self.image.ino) == (dev, ino):
            return self.image
        return self.history.get((dev, ino))


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def from_proc(tgid: int, proc: str = "/proc") -> Optional[Process]:
    """A running process as /proc describes it (None if it is gone or a kernel thread)."""
    base = f"{proc}/{tgid}"
    try:
        exe = os.readlink(f"{base}/exe")
        st = os.stat(f"{base}/exe")
        stat = _read(f"{base}/stat")
        cmdline = _read(f"{base}/cmdline")
        comm = _read(f"{base}/comm").rstrip(b"\n")
    except OSError:
        return None
    ppid = int(stat[stat.rindex(b")") + 2:].split()[1])
    if exe.endswith(" (deleted)") and not os.path.exists(exe):
        exe = exe[: -len(" (deleted)")]
    argv = tuple(from_bytes(a) for a in cmdline.rstrip(b"\0").split(b"\0")) if cmdline else ()
    return Process(tgid, ppid, Image(exe, st.st_dev, st.st_ino, from_bytes(comm), argv))


class ProcessTable:
    def __init__(self, proc: str = "/proc"):
        self.proc = proc
        self.processes: Dict[int, Process] = {}

    def scan(self) -> int:
        """Adds every process running now (those that existed before the monitor); returns how many."""
        for entry in os.listdir(self.proc):
            if entry.isdigit() and int(entry) not in self.processes:
                p = from_proc(int(entry), self.proc)
                if p:
                    self.processes[p.tgid] = p
        return len(self.processes)

    def apply(self, event) -> None:
        """Updates the table from an Exec, Fork or Exit record."""
        if isinstance(event, Exec):
            old = self.processes.get(event.tgid)
            history = {}
            if old:
                history = dict(old.history)
                history[(old.image.dev, old.image.ino)] = old.image
            exe = self._canonical_exe(event)
            name = event.comm
            image = Image(exe, event.exe_dev, event.exe_ino, name, event.argv, not event.argv_truncated)
            self.processes[event.tgid] = Process(event.tgid, event.ppid, image, history)
        elif isinstance(event, Fork):
            parent = self.get(event.ppid)
            if parent:
                self.processes[event.tgid] = Process(event.tgid, event.ppid, parent.image)
        elif isinstance(event, Exit):
            p = self.processes.get(event.tgid)
            if p:
                p.exited = event.time

    def get(self, tgid: int) -> Optional[Process]:
        """The process, from the table or, failing that, from /proc."""
        p = self.processes.get(tgid)
        if p is None and tgid > 0:
            p = from_proc(tgid, self.proc)
            if p:
                self.processes[tgid] = p
        return p

    def image(self, tgid: int, dev: int, ino: int) -> Optional[Image]:
        """The image process tgid ran from executable (dev, ino), when it is known."""
        p = self.get(tgid)
        if p is None:
            return None
        image = p.image_for(dev, ino)
        if image is None and p.exited is None:
            fresh = from_proc(tgid, self.proc)  # it exec'd while its exec event was lost
            if fresh and (fresh.image.dev, fresh.image.ino) == (dev, ino):
                p.history[(p.image.dev, p.image.ino)] = p.image
                p.image = image = fresh.image
        return image

    def complete_argv(self, tgid: int, image: Image) -> Image:
        """The image with its full command line from /proc when the kernel's copy was cut short."""
        if image.argv_complete:
            return image
        fresh = from_proc(tgid, self.proc)
        if fresh and (fresh.image.dev, fresh.image.ino) == (image.dev, image.ino):
            complete = replace(image, argv=fresh.image.argv, argv_complete=True)
            process = self.processes.get(tgid)
            if process and process.image is image:  # read /proc once, not for every flow
                process.image = complete
            return complete
        return image

    def live_name(self, tgid: int) -> Optional[str]:
        """The name the process goes by now (it may have renamed itself), if it still runs."""
        try:
            return from_bytes(_read(f"{self.proc}/{tgid}/comm").rstrip(b"\n"))
        except OSError:
            return None

    def is_alive(self, tgid: int) -> bool:
        p = self.processes.get(tgid)
        return p is not None and p.exited is None and os.path.exists(f"{self.proc}/{tgid}")

    def expire(self, now: Optional[float] = None) -> None:
        """Forgets processes that exited more than EXITED_KEEP_SECONDS ago."""
        now = time.time() if now is None else now
        for tgid in [t for t, p in self.processes.items() if p.exited and now - p.exited > EXITED_KEEP_SECONDS]:
            del self.processes[tgid]

    def _canonical_exe(self, event: Exec) -> str:
        """The executable's real path, as /proc/PID/exe shows it: execve's path may be relative or
        a symlink (/usr/bin/python3), and one executable must have one name."""
        try:
            live = os.readlink(f"{self.proc}/{event.tgid}/exe")
            st = os.stat(f"{self.proc}/{event.tgid}/exe")
            if (st.st_dev, st.st_ino) == (event.exe_dev, event.exe_ino):
                return live
        except OSError:
            pass  # already gone (or exec'd again): resolve the path it was started by
        return os.path.realpath(event.filename) if event.filename.startswith("/") else event.filename
