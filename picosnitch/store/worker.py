"""The writer process: Connections in, one transaction per write window into snitch.db and conn.log.

Memory stays bounded under a connection storm: once a window holds MAX_PENDING rows they are
written and the window goes on, so a busy window is written in parts (snitch.db sums a key's
parts into its one row of the window; conn.log gets a line per part). The first quiet window
after a busy one gives memory back (Destinations.release_memory).
"""

import signal
import time
from multiprocessing.connection import wait
from typing import Dict

from picosnitch import heap
from picosnitch.connection import Connection
from picosnitch.messages import ErrorReport, Stop
from picosnitch.store.conn_log import ConnLog
from picosnitch.store.sqlite import SqliteWriter, close_db, open_db

PRUNE_EVERY = 86400.0
MAX_PENDING = 10_000  # rows of a window held before they are written (about 5 MB)
QUIET_ROWS = 1_000  # a window with fewer rows than this ends a burst


class Destinations:
    """snitch.db and conn.log, each optional; a failing one is reported and the other goes on."""

    def __init__(self, config, paths, report):
        self.report = report
        self.retention = config["DB retention (days)"]
        self.db = self.sqlite = self.text = None
        if config["DB sql log"]:
            self.db, problem = open_db(str(paths.db))
            if problem:
                report(ErrorReport(problem))
            self.sqlite = SqliteWriter(self.db)
            self.prune()
        if config["DB text log"]:
            self.text = ConnLog(str(paths.conn_log))

    def write(self, connections) -> None:
        for name, dest in (("snitch.db", self.sqlite), ("conn.log", self.text)):
            if dest is None:
                continue
            try:
                dest.write(connections)
            except Exception as e:  # noqa: BLE001 - any failure of one destination is reported, not fatal
                self.report(ErrorReport(f"writing {len(connections)} rows to {name} failed: {e}", "write:" + name))

    def release_memory(self) -> None:
        """After a burst: drop cached ids and pages (they are read again when needed) and give
        the heap's free pages back to the system."""
        if self.sqlite:
            self.sqlite.release_memory()
        heap.trim()

    def prune(self) -> None:
        if self.sqlite and self.retention:
            try:
                self.sqlite.prune(self.retention)
            except Exception as e:  # noqa: BLE001
                self.report(ErrorReport(f"pruning snitch.db failed: {e}", "prune"))
            heap.trim()  # pruning read much of the file (SqliteWriter.prune let SQLite free it)

    def close(self) -> None:
        if self.db:
            close_db(self.db)
        if self.text:
            self.text.close()


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
            if wait([from_identity], timeout=max(next_write - time.monotonic(), 0)) and not receive():
                flush()
                return 0
            if time.monotonic() >= next_write:
                next_write = time.monotonic() + limit
                flush()
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
