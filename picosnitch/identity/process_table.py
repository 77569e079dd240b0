"""Which executable image each process ran, keyed by the exec the kernel says the traffic came from.

A flow carries the sender's exec_id (task->self_exec_id: every exec increments it, a fork keeps
the parent's), so its image is the one that exec produced: (tgid, exec_id) names it exactly. A
child that exec's its parent's binary gets a new exec_id and so its own command line, which keying
by executable (device, inode) could not tell from a plain fork. A forked child without exec runs
its parent's image as it was at the fork.

Processes that ran before the monitor are read from /proc; their exec_id is unknown, so their
image stands for the first exec_id their traffic names and for no other. An image that is not
known (its exec event was lost) is None: the caller records it as unknown, never a neighbour's.
Exited processes are kept a while, because their last flows arrive after their exit event.
"""

import os
import time
from dataclasses import dataclass, field, replace
from typing import Dict, Optional, Tuple

from picosnitch.kernel.records import Exec, Exit, Fork, Pinned, PinnedFile, stat_is
from picosnitch.sanitize import from_bytes

EXITED_KEEP_SECONDS = 60.0
IMAGES_KEPT = 8  # per process: the last images it exec'd (a flow names one within seconds)


@dataclass(frozen=True)
class Image:
    """One executable image run by a process: what one exec (or the /proc scan) produced."""

    exe: str
    dev: int
    ino: int
    name: str
    argv: Tuple[str, ...]
    argv_complete: bool = True
    exec_id: Optional[int] = None  # None: read from /proc, the exec that made it is unknown
    filename: str = ""  # what the kernel executed (the interpreter of a #! script)
    path: str = ""  # the path given to execve
    pins: Tuple[PinnedFile, ...] = ()  # the files it ran, pinned at exec (kernel.pins)
    missed: Tuple[Tuple[str, str, str], ...] = ()  # (role, path, why) of those that could not be
    from_stat: bool = False  # dev and ino are stat's (read from /proc), not the kernel's

    def pin(self, role: str) -> Optional[PinnedFile]:
        return next((p for p in self.pins if p.role == role), None)

    def ran(self, dev: int, ino: int) -> bool:
        """Whether this image's executable is (dev, ino) as the kernel names it (exactly, unless
        the image was read from /proc: stat's device, on btrfs, is not the kernel's)."""
        if self.from_stat:
            return stat_is(self.dev, self.ino, dev, ino)
        return (dev, ino) == (self.dev, self.ino)

    def is_file(self, stat_dev: int, stat_ino: int) -> bool:
        """Whether a file stat reports as (stat_dev, stat_ino) is this image's executable."""
        if self.from_stat:
            return (stat_dev, stat_ino) == (self.dev, self.ino)
        return stat_is(stat_dev, stat_ino, self.dev, self.ino)

    def missed_pin(self, role: str) -> Optional[Tuple[str, str, str]]:
        return next((m for m in self.missed if m[0] == role), None)


@dataclass
class Process:
    tgid: int
    ppid: int
    image: Image  # the latest
    images: Dict[Optional[int], Image] = field(default_factory=dict)  # by exec_id
    exited: Optional[float] = None

    def image_for(self, exec_id: int) -> Optional[Image]:
        """The image exec `exec_id` produced; an image of unknown exec_id is given to the first
        exec_id asked for, and then stands for that one only."""
        image = self.images.get(exec_id)
        if image is None and None in self.images:
            image = self.images.pop(None)
            image = self.images[exec_id] = replace(image, exec_id=exec_id)
            if self.image.exec_id is None:
                self.image = image
        return image


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
    image = Image(exe, st.st_dev, st.st_ino, from_bytes(comm), argv, from_stat=True)
    return Process(tgid, ppid, image, {None: image})


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
            self._exec(event)
        elif isinstance(event, Fork):
            parent = self.get(event.ppid)
            if parent:  # the child's flows carry the exec_id the parent had at the fork
                self.processes[event.tgid] = Process(event.tgid, event.ppid, parent.image,
                                                     {parent.image.exec_id: parent.image})
        elif isinstance(event, Exit):
            p = self.processes.get(event.tgid)
            if p:
                p.exited = event.time

    def _exec(self, event: Exec) -> None:
        image = Image(self._canonical_exe(event), event.exe_dev, event.exe_ino, event.comm, event.argv,
                      not event.argv_truncated, event.exec_id, event.filename, event.path)
        old = self.processes.get(event.tgid)
        images: Dict[Optional[int], Image] = {k: v for k, v in old.images.items() if k is not None} if old else {}
        images[event.exec_id] = image
        while len(images) > IMAGES_KEPT:
            del images[next(iter(images))]
        self.processes[event.tgid] = Process(event.tgid, event.ppid, image, images)

    def pin(self, record: Pinned) -> None:
        """Attaches the files the monitor pinned at exec to the image that exec made."""
        p = self.processes.get(record.tgid)
        image = p.images.get(record.exec_id) if p else None
        if p is None or image is None:
            return
        pins = record.files
        exe = next((f for f in pins if f.role == "exe"), None)
        pinned = replace(image, pins=pins, missed=record.missed, exe=exe.path if exe else image.exe)
        p.images[record.exec_id] = pinned
        if p.image is image:
            p.image = pinned

    def get(self, tgid: int) -> Optional[Process]:
        """The process, from the table or, failing that, from /proc."""
        p = self.processes.get(tgid)
        if p is None and tgid > 0:
            p = from_proc(tgid, self.proc)
            if p:
                self.processes[tgid] = p
        return p

    def image(self, tgid: int, exec_id: int) -> Optional[Image]:
        """The image exec `exec_id` of process tgid produced, when it is known."""
        p = self.get(tgid)
        return p.image_for(exec_id) if p else None

    def complete_argv(self, tgid: int, image: Image) -> Image:
        """The image with its full command line from /proc when the kernel's copy was cut short
        (and the process still runs that image)."""
        if image.argv_complete:
            return image
        process = self.processes.get(tgid)
        if process is None or process.image is not image:
            return image  # it exec'd since: /proc describes another image
        fresh = from_proc(tgid, self.proc)
        if fresh and image.is_file(fresh.image.dev, fresh.image.ino):
            complete = replace(image, argv=fresh.image.argv, argv_complete=True)
            process.image = process.images[image.exec_id] = complete  # read /proc once, not for every flow
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
            if stat_is(st.st_dev, st.st_ino, event.exe_dev, event.exe_ino):
                return live
        except OSError:
            pass  # already gone (or exec'd again): resolve the path it was started by
        return os.path.realpath(event.filename) if event.filename.startswith("/") else event.filename
