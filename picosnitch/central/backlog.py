"""A bounded queue of batches on disk, between the remote SQL writer's inbox and its server.

Every batch the writer makes is appended here first, and removed only once the server has
committed it, so neither an outage nor a restart of the daemon loses rows. Batches are records
in append-only segment files `segment-<number>` in one directory:

    record = header (payload length, crc32 of payload, row count: 3 x uint32 big-endian)
             + payload (JSON {"id": batch id, "rows": [[value, ...], ...], "closes": hour})

(`closes`, optional: the writer had every row of the hours before that time when it stored
this batch; see central.rollup.)

Each append is fsync'ed before it returns; each process appends to a segment of its own, so a
crash can only leave a torn record at the end of a segment, which the next start cuts off. The
file `cursor` says how far the server has committed (segment, offset); it is replaced without
fsync, because re-sending a batch is harmless: the server keeps each batch id once. At a clean
stop it may also hold a `state` (the hourly rollup's sums, which must match the cursor); it is
written with fsync, and the first consume() after it removes it, with fsync too, so that a
state can never be read back with a cursor it does not match.

The total size is bounded: when an append takes it over the limit, whole segments are deleted,
oldest first, and the rows they held that the server had not committed are counted as lost.
A batch being sent when its segment is dropped counts as lost even if that send then succeeds.
"""

from __future__ import annotations

import json
import os
import struct
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

HEADER = struct.Struct(">III")
SEGMENT_PREFIX = "segment-"
CURSOR = "cursor"
MIN_SEGMENT_BYTES = 4096


@dataclass(frozen=True)
class Batch:
    """One batch as read back: its id, its rows, and where the next record starts."""

    batch_id: str
    rows: list
    end: tuple  # (segment number, offset just past this record)
    closes: Optional[int] = None


class Backlog:
    """The queue in `directory` (which must exist), at most `limit_bytes` big.

    Thread-safe: one thread may append while another peeks and consumes.
    """

    def __init__(self, directory: str | os.PathLike, limit_bytes: int):
        self.directory = Path(directory)
        self.limit = limit_bytes
        self.segment_limit = max(limit_bytes // 16, MIN_SEGMENT_BYTES)
        self.lost_rows = 0  # rows dropped or found damaged since this Backlog was opened
        self._notices: list = []
        self._lock = threading.Lock()
        self._sizes: dict = {}  # segment number -> bytes
        self._active: Optional[int] = None  # the segment this process appends to
        self._active_fd: Optional[int] = None
        self._cursor = (0, 0)
        self.saved_state: Optional[dict] = None  # what save_state() stored with the cursor
        self._load()

    # -- reading the directory at start ----------------------------------------------------------

    def _path(self, number: int) -> Path:
        return self.directory / ("%s%016d" % (SEGMENT_PREFIX, number))

    def _load(self) -> None:
        for entry in self.directory.iterdir():
            if entry.name.startswith(SEGMENT_PREFIX) and entry.name[len(SEGMENT_PREFIX):].isdigit():
                self._sizes[int(entry.name[len(SEGMENT_PREFIX):])] = entry.stat().st_size
        try:
            saved = json.loads((self.directory / CURSOR).read_text())
            self._cursor = (int(saved["segment"]), int(saved["offset"]))
            self.saved_state = saved.get("state")
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            self._cursor = (min(self._sizes, default=0), 0)
        for number in sorted(self._sizes):
            if number < self._cursor[0]:
                self._delete(number)  # committed before the last stop
            else:
                self._cut_torn_tail(number)

    def _cut_torn_tail(self, number: int) -> None:
        """Truncate a segment after its last complete record (a crash while appending)."""
        path, size, offset = self._path(number), self._sizes[number], 0
        with open(path, "rb") as segment:
            while offset + HEADER.size <= size:
                segment.seek(offset)
                length, _, _ = HEADER.unpack(segment.read(HEADER.size))
                if offset + HEADER.size + length > size:
                    break
                offset += HEADER.size + length
        if offset != size:
            os.truncate(path, offset)
            self._sizes[number] = offset
            self._notices.append("cut %d bytes of an incomplete batch off the end of %s (written "
                                 "when the daemon stopped abruptly)" % (size - offset, path))

    # -- appending ---------------------------------------------------------------------------------

    def append(self, batch_id: str, rows: list, closes: Optional[int] = None) -> int:
        """Store a batch durably; returns how many rows of older batches had to be dropped."""
        data: dict[str, object] = {"id": batch_id, "rows": rows}
        if closes is not None:
            data["closes"] = closes
        payload = json.dumps(data, separators=(",", ":")).encode()
        record = HEADER.pack(len(payload), zlib.crc32(payload), len(rows)) + payload
        with self._lock:
            if self._active is None or self._sizes[self._active] >= self.segment_limit:
                self._start_segment()
            assert self._active_fd is not None  # _start_segment opened it
            os.write(self._active_fd, record)
            os.fsync(self._active_fd)
            self._sizes[self._active] += len(record)
            return self._enforce_limit()

    def _start_segment(self) -> None:
        if self._active_fd is not None:
            os.close(self._active_fd)
        self._active = max(max(self._sizes, default=0), self._cursor[0]) + 1
        self._active_fd = os.open(self._path(self._active),
                                  os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        self._sizes[self._active] = 0
        fsync_directory(self.directory)  # the new name survives a power loss too

    def _enforce_limit(self) -> int:
        dropped = 0
        while self._sizes and sum(self._sizes.values()) > self.limit:
            oldest = min(self._sizes)
            start = self._cursor[1] if self._cursor[0] == oldest else 0
            if self._cursor[0] <= oldest:
                dropped += self._rows_from(oldest, start)
            if oldest == self._active and self._active_fd is not None:
                os.close(self._active_fd)
                self._active = self._active_fd = None
            self._delete(oldest)
        self.lost_rows += dropped
        return dropped

    def _rows_from(self, number: int, offset: int) -> int:
        """Rows in the records of a segment from `offset` on (headers only, no payload parsed)."""
        rows, size = 0, self._sizes[number]
        with open(self._path(number), "rb") as segment:
            while offset + HEADER.size <= size:
                segment.seek(offset)
                length, _, count = HEADER.unpack(segment.read(HEADER.size))
                rows += count
                offset += HEADER.size + length
        return rows

    def _delete(self, number: int) -> None:
        self._path(number).unlink(missing_ok=True)
        del self._sizes[number]

    # -- reading and committing -------------------------------------------------------------------

    def peek(self) -> Optional[Batch]:
        """The oldest batch the server has not committed, or None when there is none."""
        with self._lock:
            while True:
                number, offset = self._cursor
                if number not in self._sizes:
                    later = [n for n in self._sizes if n > number]
                    if not later:
                        return None
                    self._cursor = (min(later), 0)
                    continue
                if offset + HEADER.size > self._sizes[number]:
                    if number == self._active:
                        return None
                    self._delete(number)  # read to its end: every batch in it is committed
                    continue
                batch = self._read(number, offset)
                if batch is not None:
                    return batch

    def _read(self, number: int, offset: int) -> Optional[Batch]:
        """The record at `offset`; a damaged one is skipped (cursor moved past it) and counted."""
        with open(self._path(number), "rb") as segment:
            segment.seek(offset)
            length, crc, count = HEADER.unpack(segment.read(HEADER.size))
            payload = segment.read(length)
        end = (number, offset + HEADER.size + length)
        try:
            if zlib.crc32(payload) != crc:
                raise ValueError("checksum mismatch")
            data = json.loads(payload)
            return Batch(data["id"], data["rows"], end, data.get("closes"))
        except (ValueError, KeyError, TypeError) as error:
            self._cursor = end
            self.lost_rows += count
            self._notices.append("skipped a damaged batch of %d rows in %s at offset %d (%s)"
                                 % (count, self._path(number), offset, error))
            return None

    def consume(self, batch: Batch) -> None:
        """Mark `batch` (and every batch before it) as committed by the server."""
        with self._lock:
            if batch.end <= self._cursor:
                return
            self._cursor = batch.end
            had_state, self.saved_state = self.saved_state is not None, None
            self._write_cursor(durably=had_state)

    def save_state(self, state: dict) -> None:
        """Keep `state` with the cursor, durably, until the next consume()."""
        with self._lock:
            self.saved_state = state
            self._write_cursor(durably=True)

    def _write_cursor(self, durably: bool) -> None:
        saved: dict[str, object] = {"segment": self._cursor[0], "offset": self._cursor[1]}
        if self.saved_state is not None:
            saved["state"] = self.saved_state
        replace_file(self.directory / CURSOR, json.dumps(saved, separators=(",", ":")), durably)

    # -- state -------------------------------------------------------------------------------------

    def size(self) -> int:
        """Bytes the segment files take (committed records of the current segment included)."""
        with self._lock:
            return sum(self._sizes.values())

    def take_notices(self) -> list:
        """Messages about damage found and repaired since the last call, for error.log."""
        with self._lock:
            notices, self._notices = self._notices, []
            return notices

    def close(self) -> None:
        with self._lock:
            if self._active_fd is not None:
                os.close(self._active_fd)
                self._active_fd = None
                self._active = None


def fsync_directory(path: Path) -> None:
    directory = os.open(path, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def replace_file(path: Path, text: str, durably: bool) -> None:
    """Replace `path` by a file holding `text` at once (a reader sees the old or the new);
    `durably`: it survives a power loss once this returns."""
    temporary = path.with_name(path.name + ".new")
    with open(temporary, "w") as file:
        file.write(text)
        if durably:
            file.flush()
            os.fsync(file.fileno())
    os.replace(temporary, path)
    if durably:
        fsync_directory(path.parent)
