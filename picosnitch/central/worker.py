"""The remote SQL worker: Connections in, one batch per write window to a disk backlog, and from
there to the "DB sql server", each batch exactly once.

It runs as an unprivileged user (`picosnitch` if that system user exists, else `nobody`) and
never makes its sender wait: the main thread only reads the inbox and appends to the backlog;
a second thread sends the backlog to the server, backing off while the server is unreachable.

Rows are grouped like snitch.db's: one row per (identity, endpoint, write window), the window
being the `ts` the identity worker stamped. The identity worker stamps its batches in order, so a
window is complete, and sent, once traffic of a later window arrives; on a quiet machine, LATE
seconds after its end (a batch stamped earlier but held up longer than that, by hashing a huge
executable say, becomes a second row on the server). At Stop whatever is pending is stored.
So the server holds the rows of snitch.db's `connections` view, one for one, except that a window
cut by a restart of the daemon is two rows there (snitch.db adds them up): sum by
(host, ts, identity, endpoint) when that matters.

Each batch also says which hours the worker has every row of (`closes`): the sender then closes
them in the server's hourly rollup (central.rollup).
"""

import dataclasses
import threading
import time
import uuid
from pathlib import Path
from typing import Optional

from picosnitch import channels
from picosnitch.central.backlog import Backlog
from picosnitch.central.rollup import Horizon, HourlyRollup, hour_of
from picosnitch.central.settings import load_driver, parse
from picosnitch.central.writer import (
    BatchRejected,
    ServerError,
    ServerWriter,
    complete_rows,
    hostname,
    machine_id,
    make_row,
)
from picosnitch.config import ConfigError
from picosnitch.messages import ErrorReport, Stop
from picosnitch.unprivileged import drop_privileges

LATE = 30.0  # seconds after a window ends before it is sent though no later window was seen
TICK = 0.5
STOP_DRAIN = 5.0  # seconds at Stop to send what the backlog holds; the rest waits on disk
BACKOFF_FIRST, BACKOFF_MAX = 1.0, 60.0
class Windows:
    """Connections summed per (identity, endpoint, ts), released once their window is over."""

    def __init__(self, limit: int):
        self.limit = limit
        self.pending: dict = {}  # ts -> {key: Connection}
        self.latest = None  # the latest ts seen

    def add(self, connections) -> None:
        for c in connections:
            if self.latest is None or c.ts > self.latest:
                self.latest = c.ts
            window = self.pending.setdefault(c.ts, {})
            same = window.get(c.key())
            if same is None:
                window[c.key()] = c
            else:
                same.add(c)

    def take(self, now: Optional[float] = None) -> list:
        """The Connections of every complete window at `now` (all windows if None): a later
        window has begun arriving, or it ended LATE seconds ago."""
        done = [ts for ts in self.pending
                if now is None or ts < self.latest or ts + self.limit + LATE <= now]
        return [c for ts in sorted(done) for c in self.pending.pop(ts).values()]

    def settled(self, now: float) -> int:
        """The hour before which every window has been taken at `now`, as far as the worker
        can tell (a batch stamped earlier that is held up longer than LATE comes later)."""
        bound = int(now - self.limit - LATE)
        if self.latest is not None:
            bound = max(bound, self.latest)
        if self.pending:
            bound = min(bound, min(self.pending))
        return hour_of(bound)


class Sender(threading.Thread):
    """Sends the backlog's batches in order, each with what it adds to the hourly rollup; on
    failure reports and retries with backoff. When it ends, the rollup's sums are saved with
    the backlog for the next start."""

    def __init__(self, writer: ServerWriter, backlog: Backlog, rollup: HourlyRollup, report):
        super().__init__(name="sql-sender", daemon=True)
        self.writer, self.backlog, self.rollup, self.report = writer, backlog, rollup, report
        self.wake = threading.Event()  # a batch was appended
        self.finishing = threading.Event()  # Stop arrived: send what is there, then end
        self.down_since: Optional[float] = None
        self.rollup_reported = False

    def run(self) -> None:
        self._send()
        self.backlog.save_state(self.rollup.state())

    def _send(self) -> None:
        delay = BACKOFF_FIRST
        while True:
            batch = self.backlog.peek()
            if batch is None:
                if self.finishing.is_set():
                    return
                self.wake.wait(TICK)
                self.wake.clear()
                continue
            batch = dataclasses.replace(batch, rows=complete_rows(batch.rows))
            try:
                markable = self.writer.open()
                if not markable:
                    self._report_rollup_off()
                plan = self.rollup.plan(batch.rows, batch.closes, markable)
                self.writer.write(batch, plan.hourly, plan.hours)
            except BatchRejected as error:
                self.rollup.rejected(plan)
                self.backlog.lost_rows += len(batch.rows)
                self.report(ErrorReport("%s; the batch is dropped" % error, "sql-server:rejected"))
            except Exception as error:  # noqa: BLE001 - ServerError, or a driver's surprise
                problem = str(error)
                if not isinstance(error, ServerError):
                    self.writer.close()
                    problem = "unexpected error writing to the SQL server %s: %s: %s" % (
                        self.writer.where, type(error).__name__, error)
                self.report(ErrorReport("%s; rows wait in the backlog and are retried" % problem,
                                        "sql-server:" + problem[:60]))
                self.down_since = self.down_since or time.monotonic()
                if self.finishing.wait(delay):
                    return  # what is left waits on disk for the next start
                delay = min(delay * 2, BACKOFF_MAX)
                continue
            self.rollup.committed(plan)
            self.backlog.consume(batch)
            delay = BACKOFF_FIRST
            if self.down_since is not None:
                self.report(ErrorReport(
                    "the SQL server %s accepts rows again after %.0f s; sending the backlog "
                    "(%d bytes)" % (self.writer.where, time.monotonic() - self.down_since,
                                    self.backlog.size())))
                self.down_since = None

    def _report_rollup_off(self) -> None:
        if not self.rollup_reported:
            self.rollup_reported = True
            self.report(ErrorReport(
                "the SQL server %s keeps no hourly rollup (%s): rows are sent without it, and "
                "readers sum every row of long ranges; let the writer create the tables, or have "
                "an administrator create them and grant INSERT" % (
                    self.writer.where, self.writer.rollup_problem), "sql-server:rollup"))

    def finish(self, timeout: float) -> None:
        """Send what remains for up to `timeout` seconds; stop early when the server fails."""
        self.finishing.set()
        self.wake.set()
        self.join(timeout)


def _drain_until_stop(inbox) -> None:
    while not isinstance(inbox.recv(), Stop):
        pass


def run(config, paths, inbox, to_keeper) -> int:
    """Serves until Stop arrives on `inbox`; errors go to the keeper as ErrorReports."""
    channels.ends_on_stop()  # ends on Stop, after storing what is pending
    lock = threading.Lock()

    def report(message: "ErrorReport | Stop") -> None:
        with lock:
            to_keeper.send(message)

    try:
        # Import everything before dropping privileges: the unprivileged user may not be able to
        # read the Python installation (one under /root, say). Drivers look up the idna codec
        # only when they first resolve a host name.
        server = parse(config)
        writer = ServerWriter(server, load_driver(server, config), report) if server else None
        "localhost".encode("idna")
        drop_privileges(paths.sql_backlog)
    except (ConfigError, OSError, RuntimeError) as error:
        report(ErrorReport("the remote SQL server gets no rows: %s" % error, "sql-server:setup"))
        writer = None
    if writer is None:
        _drain_until_stop(inbox)
        report(Stop("sql"))
        return 0
    backlog = Backlog(paths.sql_backlog, config["DB sql backlog (MB)"] * 1_000_000)
    host = hostname()
    machine = machine_id(lambda: _saved_id(paths.sql_backlog))
    horizon = Horizon(paths.sql_backlog / "horizon")
    rollup = (HourlyRollup.from_state(backlog.saved_state)
              or HourlyRollup.fresh(time.time(), horizon.hour))
    sender = Sender(writer, backlog, rollup, report)
    sender.start()
    windows = Windows(config["DB write limit (seconds)"])

    def store(connections, closes: int) -> None:
        if not connections:
            return
        horizon.reach(max(c.ts for c in connections))
        rows = [make_row(c, host, machine) for c in connections]
        dropped = backlog.append(uuid.uuid4().hex, rows, closes)
        if dropped:
            report(ErrorReport(
                "the SQL backlog %s is full (\"DB sql backlog (MB)\": %d): dropped the oldest "
                "%d rows, %d since the daemon started" % (
                    paths.sql_backlog, config["DB sql backlog (MB)"], dropped, backlog.lost_rows),
                "sql-backlog:full"))
        sender.wake.set()

    try:
        for notice in backlog.take_notices():
            report(ErrorReport(notice))
        while True:
            if channels.wait([inbox], TICK, [to_keeper]):
                message = inbox.recv()
                if isinstance(message, Stop):
                    store(windows.take(), windows.settled(time.time()))
                    break
                windows.add(message)
            now = time.time()
            store(windows.take(now), windows.settled(now))
        sender.finish(STOP_DRAIN)
        for notice in backlog.take_notices():
            report(ErrorReport(notice))
    finally:
        backlog.close()
        report(Stop("sql"))
    return 0


def _saved_id(directory: Path) -> str:
    """A random machine id kept in the backlog directory, for machines without /etc/machine-id."""
    path = directory / "machine-id"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        path.write_text(uuid.uuid4().hex)
        return path.read_text().strip()
