"""What the writer has received but not yet written, kept where a restarted writer finds it.

Every message from the identity worker is appended, as it arrived, to the spill file in the run
directory (memory, on most systems) before the writer adds it to its window. A writer killed at
any moment, or the whole daemon, leaves those messages there, and the next writer writes them.
Nothing is written twice: each message has a sequence number, snitch.db keeps the last one whose
rows it holds in the same transaction as the rows (store.sqlite, `writer_state`), and the
spill's header keeps conn.log's. Once every destination has taken everything, the spill is
emptied. While one cannot be written (a full disk) the spill grows; beyond LIMIT bytes, or when
the writer drops rows it can no longer hold, it is rewritten as one snapshot per destination of
exactly the rows that destination still lacks (compact()), so what it keeps stays bounded and
never includes rows already said to be lost.

Layout: a header (MAGIC, the spill's random id, conn.log's last sequence number, the number
reached when it was last emptied), then records (sequence number, kind, length, crc32, data). A
record cut short by a kill, or damaged, ends what is read.
"""

import os
import struct
import uuid
import zlib
from typing import List, NamedTuple, Tuple

MAGIC = b"picosnitch-spill2"
_HEADER = struct.Struct("<17s32sQQ")
_RECORD = struct.Struct("<QBII")  # sequence number, kind, length, crc32
MESSAGE, SNAPSHOT = 0, 1  # a message as it arrived; (destination, rows) it still lacked at a sequence number
LIMIT = 64 << 20  # bytes


class Record(NamedTuple):
    seq: int
    kind: int
    data: bytes


class Spill:
    """The spill file, opened (or made) at `path`; `records` are what the last writer left."""

    def __init__(self, path: str, limit: int = LIMIT):
        self.path, self.limit = path, limit
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        self.records: List[Record] = []
        self.cut_short = 0  # bytes of a record the last writer did not finish writing
        self.id, self.text_log_seq, self.emptied_at = self._read()
        self.seq = max([self.emptied_at, self.text_log_seq] + [r.seq for r in self.records])
        self.size = os.lseek(self.fd, 0, os.SEEK_END)
        self.broken = False  # it could not be written: it keeps nothing until emptied

    def _read(self) -> Tuple[str, int, int]:
        data = b""
        while chunk := os.read(self.fd, 1 << 20):
            data += chunk
        if len(data) < _HEADER.size or not data.startswith(MAGIC):
            spill_id = uuid.uuid4().hex
            self._rewrite(spill_id, 0, 0, [])
            return spill_id, 0, 0
        _, raw_id, text_log_seq, emptied_at = _HEADER.unpack_from(data)
        offset = _HEADER.size
        while offset + _RECORD.size <= len(data):
            seq, kind, length, crc = _RECORD.unpack_from(data, offset)
            payload = data[offset + _RECORD.size:offset + _RECORD.size + length]
            if len(payload) < length or zlib.crc32(payload) != crc:
                break
            self.records.append(Record(seq, kind, payload))
            offset += _RECORD.size + length
        self.cut_short = len(data) - offset
        os.ftruncate(self.fd, offset)
        return raw_id.decode(), text_log_seq, emptied_at

    def append(self, message: bytes) -> int:
        """Keeps one message; returns its sequence number (given even when it cannot be kept:
        see `broken`)."""
        self.seq += 1
        if not self.broken:
            self._append(Record(self.seq, MESSAGE, message))
        return self.seq

    def _append(self, record: Record) -> None:
        packed = _pack(record)
        try:
            written = os.pwrite(self.fd, packed, self.size)
        except OSError:
            written = 0
        if written < len(packed):
            self._break()
        else:
            self.size += written

    def _break(self) -> None:
        """It cannot be written: keep nothing rather than part (the writer says so)."""
        self.broken = True
        try:
            os.ftruncate(self.fd, _HEADER.size)
        except OSError:
            pass
        self.size = _HEADER.size

    def too_large(self) -> bool:
        return self.size > self.limit

    def compact(self, snapshots: List[Tuple[str, bytes]]) -> None:
        """Replaces every record by one snapshot per destination (name, pickled rows it lacks),
        numbered with the last sequence number given."""
        records = [Record(self.seq, SNAPSHOT, data) for _, data in snapshots]
        try:
            self._rewrite(self.id, self.text_log_seq, self.emptied_at, records)
            self.broken = False
        except OSError:
            self._break()

    def _rewrite(self, spill_id: str, text_log_seq: int, emptied_at: int, records: List[Record]) -> None:
        """The whole file anew: written beside it, then renamed over it, so a kill leaves one or the other."""
        temporary = self.path + ".new"
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            data = _HEADER.pack(MAGIC, spill_id.encode(), text_log_seq, emptied_at) + b"".join(map(_pack, records))
            if os.write(fd, data) < len(data):
                raise OSError("the spill could not be written whole")
            os.rename(temporary, self.path)
        except OSError:
            os.unlink(temporary)
            raise
        finally:
            os.close(fd)
        os.close(self.fd)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
        self.size = len(data)

    def text_log_written(self, seq: int) -> None:
        """conn.log holds the rows of every message up to `seq`."""
        self.text_log_seq = seq
        self._write_header()

    def empty(self) -> None:
        """Every destination has taken everything: the records go, the numbering goes on."""
        self.records = []
        self.emptied_at = self.seq
        self._write_header()
        os.ftruncate(self.fd, _HEADER.size)
        self.size = _HEADER.size
        self.broken = False

    def _write_header(self) -> None:
        os.pwrite(self.fd, _HEADER.pack(MAGIC, self.id.encode(), self.text_log_seq, self.emptied_at), 0)

    def close(self) -> None:
        os.close(self.fd)


def _pack(record: Record) -> bytes:
    return _RECORD.pack(record.seq, record.kind, len(record.data), zlib.crc32(record.data)) + record.data
