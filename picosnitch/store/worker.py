"""The writer process: Connections in, one transaction per write window into snitch.db and conn.log.

Memory stays bounded under a connection storm: once a window holds MAX_PENDING rows they are
written and the window goes on, so a busy window is written in parts (snitch.db sums a key's
parts into its one row of the window; conn.log gets a line per part). The first quiet window
after a busy one gives memory back (Destinations.release_memory).

A destination that cannot be written (a full disk, EIO, a read-only directory) never stops the
writer: its rows are held, merged by key, and written with the next window once it can take
them. Beyond MAX_HELD rows the oldest windows are dropped, and error.log says exactly how many
rows and bytes of which windows could not be written.
"""

import dataclasses
import signal
import time
from typing import Any, Callable, Dict, Optional

from picosnitch import channels, heap
from picosnitch.connection import Connection, Tally
from picosnitch.messages import ErrorReport, Stop
from picosnitch.store.conn_log import ConnLog
from picosnitch.store.sqlite import SqliteWriter, close_db, open_db

PRUNE_EVERY = 86400.0
MAX_PENDING = 10_000  # rows of a window held before they are written (about 5 MB)
MAX_HELD = 100_000  # rows a failing destination holds for later (about 50 MB)
REPORT_LOST_EVERY = 60.0  # seconds between reports of rows dropped while a destination still fails
QUIET_ROWS = 1_000  # a window with fewer rows than this ends a burst
FINISH_TIMEOUT = 20.0  # seconds at exit to hand the keeper what is still queued


class Destination:
    """snitch.db or conn.log: opened when first needed; while it fails, rows wait in `held`."""

    def __init__(self, name: str, opener: Callable[[], object], report, limit: int = MAX_HELD):
        self.name, self.opener, self.report, self.limit = name, opener, report, limit
        self.target: Any = None  # what opener() returned: has write(rows) and close()
        self.held: Dict[tuple, Connection] = {}
        self.lost = Tally()  # rows dropped since they were last reported
        self.lost_reported = time.monotonic()
        self.failing_since: Optional[float] = None

    def write(self, connections: list) -> None:
        if not self.held and self._try(connections):
            return
        for c in connections:  # copies: the other destination holds the same Connections
            same = self.held.get(c.key())
            if same is None:
                self.held[c.key()] = dataclasses.replace(c)
            else:
                same.add(c)
        self.retry()

    def retry(self) -> None:
        """Writes what is held, if the destination takes it now; says what was dropped meanwhile
        (at recovery, else at most every REPORT_LOST_EVERY seconds)."""
        if self.held and self._try(list(self.held.values())):
            self.report(ErrorReport(f"{self.name} can be written again after "
                                    f"{time.monotonic() - (self.failing_since or time.monotonic()):.0f} s: "
                                    f"{Tally.of(self.held.values()).sentence()} held meanwhile are written now"))
            self.held.clear()
            self.failing_since = None
            self.report_lost(f"it failed for longer than {self.limit} rows could be held")
        self._bound()
        if self.lost and time.monotonic() - self.lost_reported >= REPORT_LOST_EVERY:
            self.report_lost(f"it fails for longer than {self.limit} rows can be held")

    def open(self) -> None:
        """Opens the file now (a problem is said at once), unless it is open."""
        self._try([])

    def _try(self, rows: list) -> bool:
        try:
            if self.target is None:
                self.target = self.opener()
            self.target.write(rows)
            return True
        except Exception as e:  # noqa: BLE001 - whatever the file does, the rows are kept
            if self.failing_since is None:
                self.failing_since = time.monotonic()
                self.report(ErrorReport(f"{self.name} cannot be written ({e}); rows are held (up to {self.limit}) "
                                        "and written as soon as it can be", "write:" + self.name))
            return False

    def _bound(self) -> None:
        """Drops the oldest windows' rows beyond `limit`, counted in `lost`."""
        if len(self.held) <= self.limit:
            return
        oldest = sorted(self.held, key=lambda key: key[2])[:len(self.held) - self.limit]
        self.lost.add(Tally.of(self.held.pop(key) for key in oldest))

    def report_lost(self, why: str) -> None:
        """Says what was dropped since the last report: the sum of these lines is all that was lost."""
        if self.lost:
            self.report(ErrorReport(f"{self.lost.sentence()} could not be written to {self.name}: {why}"))
            self.lost = Tally()
        self.lost_reported = time.monotonic()

    def give_up(self) -> None:
        """At exit: what is still held is lost, and said so."""
        self.lost.add(Tally.of(self.held.values()))
        self.held.clear()
        self.report_lost("it still could not be written when picosnitch stopped")

    def close(self) -> None:
        if self.target is not None:
            self.target.close()


class Destinations:
    """snitch.db and conn.log, each optional; a failing one is reported and the other goes on."""

    def __init__(self, config, paths, report):
        self.report = report
        self.retention = config["DB retention (days)"]
        self.sqlite: Optional[Destination] = None
        self.text: Optional[Destination] = None
        if config["DB sql log"]:
            self.sqlite = Destination("snitch.db", lambda: self._open_db(str(paths.db)), report)
        if config["DB text log"]:
            self.text = Destination("conn.log", lambda: ConnLog(str(paths.conn_log)), report)
        self.all = [d for d in (self.sqlite, self.text) if d]
        for destination in self.all:
            destination.open()

    def _open_db(self, path: str) -> SqliteWriter:
        db, problem = open_db(path)
        if problem:
            self.report(ErrorReport(problem))
        writer = _ClosingWriter(db)
        self._prune(writer)
        return writer

    def write(self, connections) -> None:
        for destination in self.all:
            destination.write(connections)

    def retry(self) -> None:
        """Each write window: failing destinations try again."""
        for destination in self.all:
            destination.retry()

    def release_memory(self) -> None:
        """After a burst: drop cached ids and pages (they are read again when needed) and give
        the heap's free pages back to the system."""
        if self.sqlite and self.sqlite.target:
            self.sqlite.target.release_memory()
        heap.trim()

    def prune(self) -> None:
        if self.sqlite and self.sqlite.target:
            self._prune(self.sqlite.target)

    def _prune(self, writer: SqliteWriter) -> None:
        if self.retention:
            try:
                writer.prune(self.retention)
            except Exception as e:  # noqa: BLE001
                self.report(ErrorReport(f"pruning snitch.db failed: {e}", "prune"))
            heap.trim()  # pruning read much of the file (SqliteWriter.prune let SQLite free it)

    def close(self) -> None:
        for destination in self.all:
            destination.give_up()
            destination.close()


class _ClosingWriter(SqliteWriter):
    """The writer of snitch.db, which closes its database as close_db() does."""

    def close(self) -> None:
        close_db(self.conn)


def run(config, paths, from_identity, to_keeper) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # ends on Stop, after writing what is pending
    limit = config["DB write limit (seconds)"]
    destinations = Destinations(config, paths, to_keeper.send)
    pending: Dict[tuple, Connection] = {}
    written = 0  # rows written in this window so far
    busy = False  # a window since memory was last given back had QUIET_ROWS rows or more
    next_write = time.monotonic() + limit
    next_prune = time.monotonic() + PRUNE_EVERY

    def flush():
        nonlocal written
        written += len(pending)
        if pending:
            destinations.write(list(pending.values()))
            pending.clear()

    def receive() -> bool:
        """Adds the next message's Connections to the window; False when it is Stop."""
        message = from_identity.recv()
        if isinstance(message, Stop):
            return False
        for c in message:
            same = pending.get(c.key())
            if same is None:
                pending[c.key()] = c
            else:
                same.add(c)
        if len(pending) >= MAX_PENDING:
            flush()
        return True

    try:
        while True:
            if channels.wait([from_identity], max(next_write - time.monotonic(), 0), [to_keeper]) and not receive():
                flush()
                return 0
            if time.monotonic() >= next_write:
                next_write = time.monotonic() + limit
                flush()
                destinations.retry()
                if written >= QUIET_ROWS:
                    busy = True
                elif busy:
                    busy = False
                    destinations.release_memory()
                written = 0
            if time.monotonic() >= next_prune:
                next_prune = time.monotonic() + PRUNE_EVERY
                destinations.prune()
    finally:
        destinations.close()
        to_keeper.send(Stop("writer"))
        to_keeper.finish(FINISH_TIMEOUT)
