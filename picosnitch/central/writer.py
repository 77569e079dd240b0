"""Append batches of rows to a PostgreSQL or MariaDB/MySQL server, each batch exactly once.

The server holds four tables (`<table>` is "DB sql server" table_name, default "connections"):

- `<table>`: one row per connection row of a host's snitch.db, with the columns of its
  `connections` view (store.schema.VIEW_COLUMNS, same names, same order) after three more:
  `host` (hostname), `machine_id` (stable id of the machine: an HMAC of /etc/machine-id, which
  is not sent itself) and `batch_id`. Text is valid UTF-8: control characters and bytes that
  are not UTF-8 appear as `\\xNN` escapes, as in picosnitch's other output. `contime` is the
  sending host's local time.
- `<table>_batches`: one row per batch (`batch_id` primary key, `host`, `machine_id`,
  `row_count`, `written_at`). A batch's rows are inserted in the transaction that inserts its
  batch id, so a batch re-sent after an outage (its commit was not acknowledged) fails on the
  primary key and is rolled back: every row is stored exactly once. This needs no privilege
  beyond INSERT on both tables.
- `<table>_hourly`: the hourly rollup, with the columns of `<table>`: one row per (hour, machine,
  identity, endpoint) of the hours a machine's writer closed, `ts` the start of the hour.
- `<table>_hours`: one row per (machine_id, hour) whose rows `<table>_hourly` sums completely
  (`batch_id` says which batch wrote it; the same hour may appear more than once). The rollup
  rows of an hour and its row here are inserted with a batch, in its transaction: see
  central.rollup for when, and central.queries for how readers use them.

The tables and their indexes (ts; host, ts) are created on first use when the user may;
otherwise create them once as an administrator with create_statements() and
rollup_statements(). A server without the last two still gets every row (readers sum the raw
rows then).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import socket
from types import ModuleType
from typing import Any, Callable, Optional, Sequence

from picosnitch.central.backlog import Batch
from picosnitch.central.settings import ServerConfig
from picosnitch.connection import Connection
from picosnitch.messages import ErrorReport
from picosnitch.sanitize import one_line, printable
from picosnitch.store.schema import VIEW_COLUMNS
from picosnitch.timestamps import local_time

COLUMNS = ("host", "machine_id", "batch_id") + tuple(name for name, _ in VIEW_COLUMNS)
ROW_COLUMNS = tuple(name for name in COLUMNS if name != "batch_id")  # a row as make_row gives it
INTEGER_COLUMNS = {"send", "recv", "uid", "lport", "rport", "family", "protocol",
                   "packets_sent", "packets_recv", "netns", "ts"}
_SHORT_TEXT = {"host": 255, "machine_id": 64, "batch_id": 64, "contime": 19}
_MACHINE_ID_FILES = ("/etc/machine-id", "/var/lib/dbus/machine-id")


class ServerError(Exception):
    """The batch could not be written now (server down, refused, misconfigured): retry later."""


class BatchRejected(Exception):
    """The server refuses this batch's data itself: retrying it cannot help."""


def machine_id(fallback: Callable[[], str]) -> str:
    """A stable id for this machine that does not reveal /etc/machine-id (as systemd advises
    for ids sent over the network: an HMAC keyed with it). `fallback()` gives an id when the
    machine has no machine-id file."""
    for path in _MACHINE_ID_FILES:
        try:
            with open(path, "rb") as file:
                key = file.read().strip()
        except OSError:
            continue
        if key:
            return hmac.new(key, b"picosnitch remote SQL host", hashlib.sha256).hexdigest()[:32]
    return fallback()


def complete_rows(rows: list) -> list:
    """Rows an older picosnitch queued in the backlog, with the columns added since (always at
    the end of VIEW_COLUMNS) set to their empty values."""
    missing = [0 if name in INTEGER_COLUMNS else "" for name in ROW_COLUMNS]
    return [row + missing[len(row):] if len(row) < len(ROW_COLUMNS) else row for row in rows]


def make_row(connection: Connection, host: str, machine: str) -> list:
    """A Connection as the server row's values, batch_id left out (see COLUMNS)."""
    row = connection.as_row()
    values = [host, machine]
    for name, _ in VIEW_COLUMNS:
        if name == "contime":
            values.append(local_time(connection.ts))
        else:
            value = row[name]
            values.append(printable(value) if isinstance(value, str) else value)
    return values


def _quote(dialect: str, name: str) -> str:
    mark = '"' if dialect == "postgres" else "`"
    return ".".join(mark + part + mark for part in name.split("."))


def _column_type_pairs(dialect: str) -> list:
    """(column, SQL type) of each column of `<table>` (and `<table>_hourly`)."""
    pairs = []
    for name in COLUMNS:
        if name in INTEGER_COLUMNS:
            kind = "BIGINT"
        elif name in _SHORT_TEXT:
            kind = "VARCHAR(%d)" % _SHORT_TEXT[name]
        else:
            kind = "TEXT" if dialect == "postgres" else "MEDIUMTEXT"
        pairs.append((name, kind))
    return pairs


def _column_types(dialect: str) -> str:
    """The columns of `<table>` (and `<table>_hourly`) with their types."""
    return ", ".join("%s %s NOT NULL" % (_quote(dialect, name), kind) for name, kind in _column_type_pairs(dialect))


def _rows_table(dialect: str, table: str, base: str) -> list:
    """A table with the columns of `<table>`, indexed on (ts) and (host, ts)."""
    ts, host_ts = _quote(dialect, base + "_ts"), _quote(dialect, base + "_host_ts")
    quoted = _quote(dialect, table)
    if dialect == "postgres":
        return ["CREATE TABLE IF NOT EXISTS %s (%s)" % (quoted, _column_types(dialect)),
                "CREATE INDEX IF NOT EXISTS %s ON %s (ts)" % (ts, quoted),
                "CREATE INDEX IF NOT EXISTS %s ON %s (host, ts)" % (host_ts, quoted)]
    return ["CREATE TABLE IF NOT EXISTS %s (%s, INDEX %s (ts), INDEX %s (host, ts)) CHARACTER SET "
            "utf8mb4" % (quoted, _column_types(dialect), ts, host_ts)]


def create_statements(dialect: str, table: str) -> list:
    """The SQL that creates `<table>` and `<table>_batches` (and indexes) if missing."""
    batches = _quote(dialect, table + "_batches")
    batch_columns = ("batch_id VARCHAR(64) PRIMARY KEY, host VARCHAR(255) NOT NULL, "
                     "machine_id VARCHAR(64) NOT NULL, row_count INTEGER NOT NULL, ")
    if dialect == "postgres":
        written_at = "TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT CURRENT_TIMESTAMP)"
    else:
        written_at = "TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP) CHARACTER SET utf8mb4"
    return _rows_table(dialect, table, table.split(".")[-1]) + [
        "CREATE TABLE IF NOT EXISTS %s (%swritten_at %s" % (batches, batch_columns, written_at)]


def add_column_statements(dialect: str, table: str, present: set) -> list:
    """ALTER TABLE statements that give `table` the columns of COLUMNS it lacks."""
    types = dict(_column_type_pairs(dialect))
    empty = "''" if dialect == "postgres" else "('')"  # MySQL takes a text default only as an expression
    return ["ALTER TABLE %s ADD COLUMN %s %s NOT NULL DEFAULT %s" % (
        _quote(dialect, table), _quote(dialect, name), types[name], "0" if name in INTEGER_COLUMNS else empty)
        for name in COLUMNS if name.lower() not in present and name != "batch_id"]


def rollup_statements(dialect: str, table: str) -> list:
    """The SQL that creates the hourly rollup (`<table>_hourly`, `<table>_hours`) if missing,
    and an index on `<table>_batches` (host, machine_id), by which readers list the machines."""
    base = table.split(".")[-1]
    hours = _quote(dialect, table + "_hours")
    hour_index = _quote(dialect, base + "_hours_hour")
    writers = "CREATE INDEX IF NOT EXISTS %s ON %s (host, machine_id)" % (
        _quote(dialect, base + "_writers"), _quote(dialect, table + "_batches"))
    columns = "machine_id VARCHAR(64) NOT NULL, hour BIGINT NOT NULL, batch_id VARCHAR(64) NOT NULL"
    if dialect == "postgres":
        return _rows_table(dialect, table + "_hourly", base + "_hourly") + [
            "CREATE TABLE IF NOT EXISTS %s (%s)" % (hours, columns),
            "CREATE INDEX IF NOT EXISTS %s ON %s (hour)" % (hour_index, hours), writers]
    return _rows_table(dialect, table + "_hourly", base + "_hourly") + [
        "CREATE TABLE IF NOT EXISTS %s (%s, INDEX %s (hour)) CHARACTER SET utf8mb4" % (
            hours, columns, hour_index), writers]


def is_local(host: Optional[str]) -> bool:
    """Whether a host parameter means this machine: unset, a socket path, localhost, loopback."""
    if not host:
        return True
    for part in str(host).split(","):  # libpq accepts a list of hosts
        part = part.strip()
        if part.startswith(("/", "@")) or part == "localhost" or not part:
            continue
        try:
            if ipaddress.ip_address(part).is_loopback:
                continue
        except ValueError:
            pass
        return False
    return True


class ServerWriter:
    """One connection to the server, opened when needed and dropped after any failure."""

    def __init__(self, server: ServerConfig, driver: ModuleType,
                 report: Callable[[ErrorReport], None]):
        self.server, self.driver, self.report = server, driver, report
        self.where = server.describe()
        self.conn: Any = None  # the driver's DB-API connection, once opened
        self.create_problem: Optional[str] = None  # why the tables could not be created
        self.rollup_problem: Optional[str] = None  # why the rollup tables take no rows
        mark = "?" if getattr(driver, "paramstyle", "format") == "qmark" else "%s"
        dialect, table = server.dialect, server.table
        self._insert_batch = "INSERT INTO %s (batch_id, host, machine_id, row_count) " \
            "VALUES (%s)" % (_quote(dialect, table + "_batches"), ", ".join([mark] * 4))
        names = ", ".join(_quote(dialect, name) for name in COLUMNS)
        self._insert_rows, self._insert_hourly = (
            "INSERT INTO %s (%s) VALUES (%s)" % (_quote(dialect, name), names,
                                                 ", ".join([mark] * len(COLUMNS)))
            for name in (table, table + "_hourly"))
        self._insert_hours = "INSERT INTO %s (machine_id, hour, batch_id) VALUES (%s, %s, %s)" % (
            _quote(dialect, table + "_hours"), mark, mark, mark)
        # Inserting nothing checks that a table exists and takes INSERTs, without SELECT.
        nothing = " FROM DUAL WHERE 1 = 0" if dialect == "mysql" else " WHERE 1 = 0"
        literals = ", ".join("0" if name in INTEGER_COLUMNS else "''" for name in COLUMNS)
        self._rollup_probes = [
            "INSERT INTO %s (%s) SELECT %s%s" % (_quote(dialect, table + "_hourly"), names,
                                                 literals, nothing),
            "INSERT INTO %s (machine_id, hour, batch_id) SELECT '', 0, ''%s" % (
                _quote(dialect, table + "_hours"), nothing)]

    def _connect(self) -> None:
        try:
            self.conn = self.driver.connect(**self.server.params)
        except self.driver.Error as error:
            raise ServerError("cannot connect to the SQL server %s: %s"
                              % (self.where, one_line(error))) from None
        except OSError as error:  # some drivers let socket errors through
            raise ServerError("cannot connect to the SQL server %s: %s"
                              % (self.where, one_line(error))) from None
        self._warn_if_clear_text()
        self._create_tables()
        self._probe_rollup()

    def open(self) -> bool:
        """Connect unless connected (ServerError when that fails); whether the hourly rollup
        tables take rows (see rollup_problem when not)."""
        if self.conn is None:
            self._connect()
        return self.rollup_problem is None

    def _hosts(self) -> list:
        params = dict(self.server.params)
        if "conninfo" in params and self.server.client == "psycopg":
            params.update(self.driver.conninfo.conninfo_to_dict(params["conninfo"]))
        return [params.get(key) for key in ("host", "hostaddr", "unix_socket") if params.get(key)]

    def _warn_if_clear_text(self) -> None:
        if all(is_local(host) for host in self._hosts()):
            return
        if self.server.dialect == "postgres":
            query = "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
        else:
            query = "SHOW SESSION STATUS LIKE 'Ssl_cipher'"
        try:
            cursor = self.conn.cursor()
            cursor.execute(query)
            found = cursor.fetchone()
            self.conn.rollback()
        except self.driver.Error:
            self.conn.rollback()
            found = None
        encrypted = bool(found and found[-1])  # pg: (true,); MySQL: ('Ssl_cipher', '')
        if not encrypted:
            setting = "sslmode=verify-full" if self.server.dialect == "postgres" else "ssl"
            self.report(ErrorReport(
                "the connection to the SQL server %s is not encrypted: command lines and "
                "addresses cross the network in clear text (set %s in \"DB sql server\")"
                % (self.where, setting), "sql-server:clear-text"))

    def _create_tables(self) -> None:
        """Create what is missing; a user with INSERT privilege only is refused, which is fine
        when an administrator created the tables."""
        self.create_problem = self._run_each(
            create_statements(self.server.dialect, self.server.table))
        self._run_each(rollup_statements(self.server.dialect, self.server.table))
        self._add_missing_columns()

    def _add_missing_columns(self) -> None:
        """Tables an older picosnitch created lack the columns added since: add them (empty for
        the rows already there). A user who may not alter the tables is told what an
        administrator must run; rows then fail until it is done, and wait in the backlog."""
        for name in (self.server.table, self.server.table + "_hourly"):
            present = self._columns_of(name)
            if not present:
                continue  # not there, or not visible to this user: the inserts will tell
            for statement in add_column_statements(self.server.dialect, name, present):
                problem = self._run_each([statement])
                if problem:
                    self.report(ErrorReport(
                        "the SQL server %s refused to add a column picosnitch needs (%s): an administrator must "
                        "run: %s" % (self.where, problem, statement), "sql-server:alter"))

    def _columns_of(self, table: str) -> set:
        query = ("SELECT column_name FROM information_schema.columns WHERE table_name = %s"
                 % ("%s" if getattr(self.driver, "paramstyle", "format") != "qmark" else "?"))
        if self.server.dialect == "mysql":
            query += " AND table_schema = DATABASE()"
        else:
            query += " AND table_schema = current_schema()"
        try:
            cursor = self.conn.cursor()
            cursor.execute(query, (table,))
            found = {str(row[0]).lower() for row in cursor.fetchall()}
            self.conn.rollback()
            return found
        except self.driver.Error:
            self.conn.rollback()
            return set()

    def _probe_rollup(self) -> None:
        self.rollup_problem = self._run_each(self._rollup_probes)

    def _run_each(self, statements: list) -> Optional[str]:
        """Run each statement in a transaction of its own; the first failure, as a sentence."""
        problem = None
        for statement in statements:
            cursor = self.conn.cursor()
            try:
                cursor.execute(statement)
                self.conn.commit()
            except self.driver.Error as error:
                self.conn.rollback()
                problem = problem or one_line(error)
        return problem

    def write(self, batch: Batch, hourly: Sequence = (), hours: Sequence = ()) -> bool:
        """Insert the batch in one transaction, with `hourly` rows (as make_row gives them) for
        `<table>_hourly` and (machine_id, hour) pairs for `<table>_hours`; False when the server
        already had the batch.

        Raises ServerError (try again later) or BatchRejected (its data cannot be stored).
        """
        if self.conn is None:
            self._connect()

        def with_id(rows: Sequence) -> list:
            return [[host, machine, batch.batch_id, *rest] for host, machine, *rest in rows]

        rows = with_id(batch.rows)
        host, machine = batch.rows[0][0], batch.rows[0][1]
        try:
            cursor = self.conn.cursor()
            try:
                cursor.execute(self._insert_batch, (batch.batch_id, host, machine, len(rows)))
            except self.driver.IntegrityError:
                self.conn.rollback()
                return False  # committed before; the acknowledgement was lost
            cursor.executemany(self._insert_rows, rows)
            if hourly:
                cursor.executemany(self._insert_hourly, with_id(hourly))
            if hours:
                cursor.executemany(self._insert_hours, [(machine_id, hour, batch.batch_id)
                                                        for machine_id, hour in hours])
            self.conn.commit()
            return True
        except self.driver.DataError as error:
            self._rollback()
            raise BatchRejected("the SQL server %s refused a batch of %d rows: %s"
                                % (self.where, len(rows), one_line(error))) from None
        except (self.driver.Error, OSError) as error:
            self.close()
            message = "writing to table %s on the SQL server %s failed: %s" % (
                self.server.table, self.where, one_line(error))
            if self.create_problem:
                message += (" (creating the tables failed too: %s; check \"table_name\", or have"
                            " an administrator create them)" % self.create_problem)
            raise ServerError(message) from None

    def _rollback(self) -> None:
        try:
            self.conn.rollback()
        except (self.driver.Error, OSError):
            self.close()

    def close(self) -> None:
        if self.conn is not None:
            try:
                self.conn.close()
            except (self.driver.Error, OSError):
                pass
            self.conn = None


def hostname() -> str:
    """This machine's name as the server's `host` column shows it."""
    return printable(socket.gethostname(), limit=255)
