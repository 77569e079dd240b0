"""The writer process: Connections in, one transaction per write window into snitch.db and conn.log.

Memory stays bounded under a connection storm: once a window holds MAX_PENDING rows they are
written and the window goes on, so a busy window is written in parts (snitch.db sums a key's
parts into its one row of the window; conn.log gets a line per part). The first quiet window
after a busy one gives memory back (Destinations.release_memory).

A destination that cannot be written (a full disk, EIO, a read-only directory) never stops the
writer: its rows are held, merged by key, and written with the next window once it can take
them. Beyond MAX_HELD rows the oldest windows are dropped, and error.log says exactly how many
rows and bytes of which windows could not be written.

Every message is kept in the spill (store.spill) until every destination has it, so a writer
killed at any moment, or the whole daemon, loses nothing it had been given: the next writer
writes what the spill holds and its destinations lack, once. Rows still held when the writer
stops wait there for the next start.
"""

import dataclasses
import pickle
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from picosnitch import channels, heap
from picosnitch.connection import Connection, Tally
from picosnitch.messages import ErrorReport, Stop
from picosnitch.store.conn_log import ConnLog
from picosnitch.store.spill import MESSAGE, SNAPSHOT, Spill
from picosnitch.store.sqlite import SqliteWriter, close_db, open_db

PRUNE_EVERY = 86400.0
MAX_PENDING = 10_000  # rows of a window held before they are written (about 5 MB)
MAX_HELD = 100_000  # rows a failing destination holds for later (about 50 MB)
REPORT_LOST_EVERY = 60.0  # seconds between reports of rows dropped while a destination still fails
QUIET_ROWS = 1_000  # a window with fewer rows than this ends a burst
FINISH_TIMEOUT = 20.0  # seconds at exit to hand the keeper what is still queued

Replayed = List[Tuple[int, list]]  # (sequence number, Connections) a destination may lack


def merged(connections) -> Dict[tuple, Connection]:
    """Connections summed by key, as copies (others may hold the same objects)."""
    rows: Dict[tuple, Connection] = {}
    for c in connections:
        same = rows.get(c.key())
        if same is None:
            rows[c.key()] = dataclasses.replace(c)
        else:
            same.add(c)
    return rows


class Destination:
    """snitch.db or conn.log: opened when first needed; while it fails, rows wait in `held`.

    `opener()` returns the target: write(rows, upto) stores rows and notes that they hold every
    message up to sequence number `upto`; committed() is that number as the target knows it."""

    def __init__(self, name: str, opener: Callable[[], Any], report, limit: int = MAX_HELD):
        self.name, self.opener, self.report, self.limit = name, opener, report, limit
        self.target: Any = None
        self.held: Dict[tuple, Connection] = {}
        self.upto = 0  # the last message whose rows are written or held
        self.committed = 0  # the last message whose rows are written
        self.replay: Optional[Replayed] = None  # the spill's messages, until the target says which it lacks
        self.lost = Tally()  # rows dropped since they were last reported
        self.lost_reported = time.monotonic()
        self.cut = False  # rows were dropped since the spill was last compacted
        self.failing_since: Optional[float] = None

    def write(self, connections: list, upto: int) -> None:
        self.upto = upto
        if not self.held and self.replay is None and self._try(connections):
            return
        for key, row in merged(connections).items():
            same = self.held.get(key)
            if same is None:
                self.held[key] = row
            else:
                same.add(row)
        self.retry()

    def retry(self) -> None:
        """Writes what is held, if the destination takes it now; says what was dropped meanwhile
        (at recovery, else at most every REPORT_LOST_EVERY seconds)."""
        if (self.held or self.replay is not None) and self._try(list(self.held.values())):
            if self.failing_since is not None:
                self.report(ErrorReport(f"{self.name} can be written again after "
                                        f"{time.monotonic() - self.failing_since:.0f} s: "
                                        f"{Tally.of(self.held.values()).sentence()} held meanwhile are written now"))
                self.failing_since = None
            self.held.clear()
            self.report_lost(f"it failed for longer than {self.limit} rows could be held")
        self._bound()
        if self.lost and time.monotonic() - self.lost_reported >= REPORT_LOST_EVERY:
            self.report_lost(f"it fails for longer than {self.limit} rows can be held")

    def _try(self, rows: list) -> bool:
        try:
            if self.target is None:
                self.target = self.opener()
            if self.replay is not None:
                self._take_replay()
                rows = list(self.held.values())
            self.target.write(rows, self.upto)
        except Exception as e:  # noqa: BLE001 - whatever the file does, the rows are kept
            if self.failing_since is None:
                self.failing_since = time.monotonic()
                self.report(ErrorReport(f"{self.name} cannot be written ({e}); rows are held (up to {self.limit}) "
                                        "and written as soon as it can be", "write:" + self.name))
            return False
        self.committed = self.upto
        return True

    def _take_replay(self) -> None:
        """The spill's messages this destination lacks join what it holds."""
        assert self.replay is not None
        committed = self.target.committed()
        lacking = [row for seq, rows in self.replay if seq > committed for row in rows]
        self.replay = None
        rows = merged(lacking)
        if rows:
            self.report(ErrorReport(f"the writer had stopped before {self.name} had "
                                    f"{Tally.of(rows.values()).sentence()}; they are written now"))
        for key, row in rows.items():
            same = self.held.get(key)
            if same is None:
                self.held[key] = row
            else:
                same.add(row)

    def _bound(self) -> None:
        """Drops the oldest windows' rows beyond `limit`, counted in `lost`."""
        if len(self.held) <= self.limit:
            return
        oldest = sorted(self.held, key=lambda key: key[2])[:len(self.held) - self.limit]
        self.lost.add(Tally.of(self.held.pop(key) for key in oldest))
        self.cut = True

    def report_lost(self, why: str) -> None:
        """Says what was dropped since the last report: the sum of these lines is all that was lost."""
        if self.lost:
            self.report(ErrorReport(f"{self.lost.sentence()} could not be written to {self.name}: {why}"))
            self.lost = Tally()
        self.lost_reported = time.monotonic()

    def snapshot(self) -> Tuple[str, bytes]:
        """(name, pickled (name, rows held)): what the spill keeps for this destination when compacted."""
        return self.name, pickle.dumps((self.name, list(self.held.values())), pickle.HIGHEST_PROTOCOL)

    def stop(self, spilled: bool) -> None:
        """At exit: what is still held waits in the spill for the next start, or (`spilled`
        false: the spill cannot keep it) is lost; either is said."""
        if self.held and spilled:
            self.report(ErrorReport(f"{Tally.of(self.held.values()).sentence()} not yet written to {self.name} "
                                    "are kept in the writer's spill and written when picosnitch next starts"))
        else:
            self.lost.add(Tally.of(self.held.values()))
        self.held.clear()
        self.report_lost("it still could not be written when picosnitch stopped")

    def close(self) -> None:
        if self.target is not None:
            self.target.close()


class Database:
    """snitch.db as a Destination's target."""

    def __init__(self, path: str, spill: Optional[Spill], report, prune: Callable[[SqliteWriter], None]):
        db, problem = open_db(path)
        if problem:
            report(ErrorReport(problem))
        self.writer = SqliteWriter(db)
        self.spill = spill
        committed = self.committed()
        if spill and 0 < committed < spill.emptied_at:
            report(ErrorReport(f"{path} has lost transactions it had written: they held messages {committed + 1} "
                               f"to {spill.emptied_at} of the writer, which no longer has them; its -wal file was cut "
                               "short or damaged (a disk error, or a hand), and those write windows' rows are missing"))
        prune(self.writer)

    def write(self, rows: list, upto: int) -> None:
        self.writer.write(rows, (self.spill.id, upto) if self.spill else None)

    def committed(self) -> int:
        return self.writer.committed(self.spill.id) if self.spill else 0

    def close(self) -> None:
        close_db(self.writer.conn)


class TextLog:
    """conn.log as a Destination's target; the spill's header keeps how far it got."""

    def __init__(self, path: str, spill: Optional[Spill]):
        self.log = ConnLog(path)
        self.spill = spill

    def write(self, rows: list, upto: int) -> None:
        if rows:
            self.log.write(rows)
        if self.spill:
            try:
                self.spill.text_log_written(upto)
            except OSError:
                pass  # a kill before the next try would write these lines twice, nothing worse

    def committed(self) -> int:
        return self.spill.text_log_seq if self.spill else 0

    def close(self) -> None:
        self.log.close()


class Destinations:
    """snitch.db and conn.log, each optional; a failing one is reported and the other goes on."""

    def __init__(self, config, paths, report, spill: Optional[Spill] = None):
        self.report = report
        self.retention = config["DB retention (days)"]
        self.sqlite: Optional[Destination] = None
        self.text: Optional[Destination] = None
        if config["DB sql log"]:
            self.sqlite = Destination("snitch.db", lambda: Database(str(paths.db), spill, report, self._prune), report)
        if config["DB text log"]:
            self.text = Destination("conn.log", lambda: TextLog(str(paths.conn_log), spill), report)
        self.all = [d for d in (self.sqlite, self.text) if d]

    def open(self, spill: Optional[Spill]) -> None:
        """Opens each destination (a problem is said at once) and writes what the spill holds
        that it lacks."""
        for destination in self.all:
            destination.replay = replayed(spill, destination.name)
            destination.upto = spill.seq if spill else 0
            destination.retry()
            if destination.target is None:
                destination._try([])

    def write(self, connections: list, upto: int) -> None:
        for destination in self.all:
            destination.write(connections, upto)

    def retry(self) -> None:
        """Each write window: failing destinations try again."""
        for destination in self.all:
            destination.retry()

    def committed(self) -> int:
        """The last message every destination has written."""
        return min(d.committed for d in self.all)

    def release_memory(self) -> None:
        """After a burst: drop cached ids and pages (they are read again when needed) and give
        the heap's free pages back to the system."""
        if self.sqlite and self.sqlite.target:
            self.sqlite.target.writer.release_memory()
        heap.trim()

    def prune(self) -> None:
        if self.sqlite and self.sqlite.target:
            self._prune(self.sqlite.target.writer)

    def _prune(self, writer: SqliteWriter) -> None:
        if self.retention:
            try:
                writer.prune(self.retention)
            except Exception as e:  # noqa: BLE001
                self.report(ErrorReport(f"pruning snitch.db failed: {e}", "prune"))
            heap.trim()  # pruning read much of the file (SqliteWriter.prune let SQLite free it)

    def keep(self, spill: Spill, report) -> None:
        """After a write: empties the spill once every destination has everything; compacts it
        when it grows too large or a destination dropped rows (they must not come back)."""
        cut = any(d.cut for d in self.all)
        try:
            if self.committed() == spill.seq:
                spill.empty()
            elif spill.too_large() or cut or (spill.broken and any(d.held for d in self.all)):
                spill.compact([d.snapshot() for d in self.all if d.held])
                if spill.broken:
                    report(ErrorReport(f"{spill.path} cannot be written: if the writer is killed before its "
                                       "destinations recover, the rows they lack are lost", "spill"))
        except OSError as e:
            report(ErrorReport(f"{spill.path} cannot be written ({e.strerror or e})", "spill"))
        for destination in self.all:
            destination.cut = False

    def close(self, spilled: bool) -> None:
        """At exit; `spilled`: the spill keeps what is still held, for the next writer."""
        for destination in self.all:
            destination.stop(spilled)
            destination.close()


def open_spill(paths, report) -> Optional[Spill]:
    try:
        spill = Spill(str(paths.writer_spill))
    except OSError as e:
        report(ErrorReport(f"{paths.writer_spill} cannot be used ({e.strerror or e}): rows the writer holds are "
                           "lost if it is killed"))
        return None
    if spill.cut_short:
        report(ErrorReport(f"the writer was killed while keeping a message of {spill.cut_short} bytes in "
                           f"{paths.writer_spill}; its rows are lost"))
    return spill


def replayed(spill: Optional[Spill], name: str) -> Replayed:
    """What the spill holds that destination `name` may lack: every message, and the snapshot of
    what it lacked when the spill was compacted."""
    found: Replayed = []
    for record in spill.records if spill else ():
        content = pickle.loads(record.data)
        if record.kind == MESSAGE and isinstance(content, list):
            found.append((record.seq, content))
        elif record.kind == SNAPSHOT and content[0] == name:
            found.append((record.seq, content[1]))
    return found


def run(config, paths, from_identity, to_keeper) -> int:
    channels.ends_on_stop()  # ends on Stop, after writing what is pending
    limit = config["DB write limit (seconds)"]
    report = to_keeper.send
    spill = open_spill(paths, report) if config["DB sql log"] or config["DB text log"] else None
    destinations = Destinations(config, paths, report, spill)
    destinations.open(spill)
    pending: Dict[tuple, Connection] = {}
    upto = spill.seq if spill else 0  # the last message received
    written = 0  # rows written in this window so far
    burst = heap.Burst(QUIET_ROWS)  # a window with fewer rows after busy ones gives memory back
    next_write = time.monotonic() + limit
    next_prune = time.monotonic() + PRUNE_EVERY

    def flush():
        nonlocal written
        written += len(pending)
        if pending:
            destinations.write(list(pending.values()), upto)
            pending.clear()
        if spill and destinations.all:
            destinations.keep(spill, report)

    def receive() -> bool:
        """Adds the next message's Connections to the window; False when it is Stop."""
        nonlocal upto
        data = from_identity.recv_bytes()
        if spill:
            upto = spill.append(data)
        message = pickle.loads(data)
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
                destinations.retry()
                flush()
                if burst.over(written):
                    destinations.release_memory()
                written = 0
            if time.monotonic() >= next_prune:
                next_prune = time.monotonic() + PRUNE_EVERY
                destinations.prune()
    finally:
        destinations.close(spilled=spill is not None and not spill.broken)
        if spill:
            spill.close()
        to_keeper.send(Stop("writer"))
        to_keeper.finish(FINISH_TIMEOUT)
