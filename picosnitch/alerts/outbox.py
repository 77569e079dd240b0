"""Events waiting for their receivers (webhooks, syslog), on disk, so that a receiver that is
down, slow or restarted, or a daemon that restarts, loses nothing.

The directory holds append-only segment files `segment-<number>` of JSON lines, one event a
line, and a file `cursor-<receiver>` per receiver saying where its next event starts
(segment and offset). Every append is fsync'ed before the events count as stored; each start of
the daemon appends to a new segment, so a crash can only leave a torn last line, which the next
start cuts off. A cursor is replaced (rename) after each delivery, without fsync: after a crash
a receiver may be sent an event again (each event has an id), never skip one.

Segments every receiver has passed are deleted. The total size is bounded: when an append takes
it over the limit, whole segments are deleted, oldest first, and the events a receiver had not
been sent are counted as dropped for it (`dropped`). A receiver that is new to the directory
starts at its end: it is sent what happens from now on, not the past.
"""

from __future__ import annotations

import bisect
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

SEGMENT_PREFIX = "segment-"
CURSOR_PREFIX = "cursor-"
MIN_SEGMENT_BYTES = 4096


@dataclass(frozen=True, order=True)
class Entry:
    """Where one stored event is: its segment, and its line's start and end offsets."""

    segment: int
    start: int
    end: int


class Outbox:
    """The queue in `directory` (which must exist), at most `limit_bytes`, for `receivers`.

    Thread-safe: the main thread appends while each receiver's thread peeks and marks done."""

    def __init__(self, directory: str | os.PathLike, limit_bytes: int, receivers: Iterable[str]) -> None:
        self.directory = Path(directory)
        self.limit = limit_bytes
        self.segment_limit = max(limit_bytes // 8, MIN_SEGMENT_BYTES)
        self.receivers = list(receivers)
        self.dropped = {name: 0 for name in self.receivers}
        self.lock = threading.Lock()
        self.arrived = threading.Condition(self.lock)  # notified after each append
        self.entries: list[Entry] = []  # every stored event, in order
        self.sizes: dict[int, int] = {}  # segment -> bytes
        self.cursors: dict[str, tuple[int, int]] = {}
        self._load()
        self.active = max(self.sizes, default=0) + 1
        self.active_fd: Optional[int] = None

    # -- start --

    def _segment_path(self, number: int) -> Path:
        return self.directory / ("%s%016d" % (SEGMENT_PREFIX, number))

    def _load(self) -> None:
        numbers = sorted(int(p.name[len(SEGMENT_PREFIX):]) for p in self.directory.iterdir()
                         if p.name.startswith(SEGMENT_PREFIX) and p.name[len(SEGMENT_PREFIX):].isdigit())
        for number in numbers:
            self._index(number)
        end = (max(self.sizes), self.sizes[max(self.sizes)]) if self.sizes else (0, 0)
        for name in self.receivers:
            cursor = self._read_cursor(name)
            if cursor is None:  # new here: from now on, and remembered as such
                self._move(name, end)
            else:
                self.cursors[name] = cursor
        for path in self.directory.glob(CURSOR_PREFIX + "*"):
            if path.name[len(CURSOR_PREFIX):] not in self.receivers:
                path.unlink()  # a receiver no longer configured
        self._delete_passed()

    def _index(self, number: int) -> None:
        """Read one segment's lines into the index; cut a torn last line off."""
        path = self._segment_path(number)
        data = path.read_bytes()
        complete = data.rfind(b"\n") + 1
        if complete < len(data):
            os.truncate(path, complete)
        start = 0
        while start < complete:
            end = data.index(b"\n", start) + 1
            self.entries.append(Entry(number, start, end))
            start = end
        self.sizes[number] = complete

    def _read_cursor(self, name: str) -> Optional[tuple[int, int]]:
        try:
            segment, offset = (int(part) for part in (self.directory / (CURSOR_PREFIX + name)).read_text().split())
            return segment, offset
        except (OSError, ValueError):
            return None

    # -- the main thread --

    def append(self, events: list[dict]) -> None:
        """Store events (fsync'ed); OSError when they could not be (then nothing was added)."""
        if not events:
            return
        data = b"".join(json.dumps(e, ensure_ascii=True, separators=(",", ":")).encode("ascii") + b"\n"
                        for e in events)
        with self.lock:
            if self.active_fd is None or self.sizes.get(self.active, 0) >= self.segment_limit:
                self._next_segment()
            assert self.active_fd is not None
            start = self.sizes[self.active]
            try:
                written = 0
                while written < len(data):  # a short write is followed by the one that says why
                    written += os.write(self.active_fd, data[written:])
                os.fsync(self.active_fd)
            except OSError:
                os.ftruncate(self.active_fd, start)  # all or nothing
                raise
            for line in data.splitlines(keepends=True):
                self.entries.append(Entry(self.active, start, start + len(line)))
                start += len(line)
            self.sizes[self.active] = start
            self._bound()
            self.arrived.notify_all()

    def _next_segment(self) -> None:
        if self.active_fd is not None:
            os.close(self.active_fd)
            self.active += 1
        self.active_fd = os.open(self._segment_path(self.active),
                                 os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        self.sizes.setdefault(self.active, 0)

    def _bound(self) -> None:
        """Delete the oldest segments while over the limit, counting what each receiver loses."""
        while sum(self.sizes.values()) > self.limit and len(self.sizes) > 1:
            oldest = min(self.sizes)
            following = (min(s for s in self.sizes if s != oldest), 0)
            for name, cursor in self.cursors.items():
                if cursor < following:
                    self.dropped[name] += sum(1 for e in self.entries
                                              if e.segment == oldest and (e.segment, e.start) >= cursor)
                    self._move(name, following)
            self._delete(oldest)

    # -- the receivers' threads --

    def peek(self, name: str) -> Optional[tuple[Entry, dict]]:
        """The next event for receiver `name`, and where it is; None when it has been sent all."""
        with self.lock:
            position = bisect.bisect_left(self.entries, Entry(*self.cursors[name], 0))
            if position == len(self.entries):
                return None
            entry = self.entries[position]
            with open(self._segment_path(entry.segment), "rb") as file:
                file.seek(entry.start)
                line = file.read(entry.end - entry.start)
        return entry, json.loads(line)

    def wait(self, timeout: float) -> None:
        """Wait until something is appended, or `timeout` seconds."""
        with self.arrived:
            self.arrived.wait(timeout)

    def done(self, name: str, entry: Entry) -> None:
        """Receiver `name` has been sent the event at `entry` (or skipped it)."""
        with self.lock:
            if (entry.segment, entry.end) > self.cursors[name]:
                self._move(name, (entry.segment, entry.end))
                self._delete_passed()

    def waiting(self, name: str) -> int:
        """Events stored that receiver `name` has not been sent."""
        with self.lock:
            return len(self.entries) - bisect.bisect_left(self.entries, Entry(*self.cursors[name], 0))

    # -- cursors and segments --

    def _move(self, name: str, cursor: tuple[int, int]) -> None:
        """Move a cursor; a disk that refuses the file only means a resend after a crash."""
        self.cursors[name] = cursor
        path = self.directory / (CURSOR_PREFIX + name)
        temporary = path.with_name("." + path.name)
        try:
            temporary.write_text("%d %d\n" % cursor)
            os.replace(temporary, path)
        except OSError:
            pass

    def _delete_passed(self) -> None:
        """Delete every segment all receivers are past (never the one being appended to)."""
        lowest = min(self.cursors.values(), default=(max(self.sizes, default=0) + 1, 0))
        for number in sorted(self.sizes):
            passed = number < lowest[0] or (number == lowest[0] and lowest[1] >= self.sizes[number])
            if not passed or (number == self.active and self.active_fd is not None):
                break
            self._delete(number)

    def _delete(self, number: int) -> None:
        try:
            self._segment_path(number).unlink()
        except FileNotFoundError:
            pass
        del self.sizes[number]
        self.entries = [e for e in self.entries if e.segment != number]

    def close(self) -> None:
        with self.lock:
            if self.active_fd is not None:
                os.close(self.active_fd)
                self.active_fd = None
