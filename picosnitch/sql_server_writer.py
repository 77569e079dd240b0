"""Append batches of rows to a PostgreSQL or MariaDB/MySQL server, each batch exactly once.

The server holds two tables (`<table>` is "DB sql server" table_name, default "connections"):

- `<table>`: one row per connection row of a host's snitch.db, with the columns of its
  `connections` view (db_schema.VIEW_COLUMNS, same names, same order) after three more:
  `host` (hostname), `machine_id` (stable id of the machine: an HMAC of /etc/machine-id, which
  is not sent itself) and `batch_id`. Text is valid UTF-8: control characters and bytes that
  are not UTF-8 appear as `\\xNN` escapes, as in picosnitch's other output. `contime` is the
  sending host's local time.
- `<table>_batches`: one row per batch (`batch_id` primary key, `host`, `machine_id`,
  `row_count`, `written_at`). A batch's rows are inserted in the transaction that inserts its
  batch id, so a batch re-sent after an outage (its commit was not acknowledged) fails on the
  primary key and is rolled back: every row is stored exactly once. This needs no privilege
  beyond INSERT on both tables.

The tables and their indexes (ts; host, ts) are created on first use when the user may;
otherwise create them once as an administrator with create_statements().
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import socket
import time
from types import ModuleType
from typing import Callable, Optional

from picosnitch.connection import Connection
from picosnitch.db_schema import VIEW_COLUMNS
from picosnitch.messages import ErrorReport
from picosnitch.sanitize import printable
from picosnitch.sql_backlog import Batch
from picosnitch.sql_server_config import ServerConfig

COLUMNS = ("host", "machine_id", "batch_id") + tuple(name for name, _ in VIEW_COLUMNS)
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


def make_row(connection: Connection, host: str, machine: str) -> list:
    """A Connection as the server row's values, batch_id left out (see COLUMNS)."""
    row = connection.as_row()
    values = [host, machine]
    for name, _ in VIEW_COLUMNS:
        if name == "contime":
            values.append(time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(connection.ts)))
        else:
            value = row[name]
            values.append(printable(value) if isinstance(value, str) else value)
    return values


def _quote(dialect: str, name: str) -> str:
    mark = '"' if dialect == "postgres" else "`"
    return ".".join(mark + part + mark for part in name.split("."))


def create_statements(dialect: str, table: str) -> list:
    """The SQL that creates both tables (and indexes) if missing, for `dialect`."""
    base = table.split(".")[-1]
    column_types = []
    for name in COLUMNS:
        if name in INTEGER_COLUMNS:
            kind = "BIGINT"
        elif name in _SHORT_TEXT:
            kind = "VARCHAR(%d)" % _SHORT_TEXT[name]
        else:
            kind = "TEXT" if dialect == "postgres" else "MEDIUMTEXT"
        column_types.append("%s %s NOT NULL" % (_quote(dialect, name), kind))
    batches = _quote(dialect, table + "_batches")
    batch_columns = ("batch_id VARCHAR(64) PRIMARY KEY, host VARCHAR(255) NOT NULL, "
                     "machine_id VARCHAR(64) NOT NULL, row_count INTEGER NOT NULL, ")
    if dialect == "postgres":
        return [
            "CREATE TABLE IF NOT EXISTS %s (%s)" % (_quote(dialect, table), ", ".join(column_types)),
            "CREATE INDEX IF NOT EXISTS %s ON %s (ts)" % (
                _quote(dialect, base + "_ts"), _quote(dialect, table)),
            "CREATE INDEX IF NOT EXISTS %s ON %s (host, ts)" % (
                _quote(dialect, base + "_host_ts"), _quote(dialect, table)),
            "CREATE TABLE IF NOT EXISTS %s (%swritten_at TIMESTAMP WITH TIME ZONE NOT NULL "
            "DEFAULT CURRENT_TIMESTAMP)" % (batches, batch_columns),
        ]
    indexes = "INDEX %s (ts), INDEX %s (host, ts)" % (
        _quote(dialect, base + "_ts"), _quote(dialect, base + "_host_ts"))
    return [
        "CREATE TABLE IF NOT EXISTS %s (%s, %s) CHARACTER SET utf8mb4" % (
            _quote(dialect, table), ", ".join(column_types), indexes),
        "CREATE TABLE IF NOT EXISTS %s (%swritten_at TIMESTAMP NOT NULL DEFAULT "
        "CURRENT_TIMESTAMP) CHARACTER SET utf8mb4" % (batches, batch_columns),
    ]


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


def _one_line(error: BaseException) -> str:
    return printable(" ".join(str(error).split()), limit=400) or type(error).__name__


class ServerWriter:
    """One connection to the server, opened when needed and dropped after any failure."""

    def __init__(self, server: ServerConfig, driver: ModuleType,
                 report: Callable[[ErrorReport], None]):
        self.server, self.driver, self.report = server, driver, report
        self.where = server.describe()
        self.conn = None
        self.create_problem: Optional[str] = None  # why the tables could not be created
        mark = "?" if getattr(driver, "paramstyle", "format") == "qmark" else "%s"
        self._insert_batch = "INSERT INTO %s (batch_id, host, machine_id, row_count) " \
            "VALUES (%s)" % (_quote(server.dialect, server.table + "_batches"),
                             ", ".join([mark] * 4))
        self._insert_rows = "INSERT INTO %s (%s) VALUES (%s)" % (
            _quote(server.dialect, server.table),
            ", ".join(_quote(server.dialect, name) for name in COLUMNS),
            ", ".join([mark] * len(COLUMNS)))

    def _connect(self) -> None:
        try:
            self.conn = self.driver.connect(**self.server.params)
        except self.driver.Error as error:
            raise ServerError("cannot connect to the SQL server %s: %s"
                              % (self.where, _one_line(error))) from None
        except OSError as error:  # some drivers let socket errors through
            raise ServerError("cannot connect to the SQL server %s: %s"
                              % (self.where, _one_line(error))) from None
        self._warn_if_clear_text()
        self._create_tables()

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
        self.create_problem = None
        for statement in create_statements(self.server.dialect, self.server.table):
            cursor = self.conn.cursor()
            try:
                cursor.execute(statement)
                self.conn.commit()
            except self.driver.Error as error:
                self.conn.rollback()
                self.create_problem = self.create_problem or _one_line(error)

    def write(self, batch: Batch) -> bool:
        """Insert the batch in one transaction; False when the server already had it.

        Raises ServerError (try again later) or BatchRejected (its data cannot be stored).
        """
        if self.conn is None:
            self._connect()
        rows = [[host, machine, batch.batch_id, *rest] for host, machine, *rest in batch.rows]
        host, machine = batch.rows[0][0], batch.rows[0][1]
        try:
            cursor = self.conn.cursor()
            try:
                cursor.execute(self._insert_batch, (batch.batch_id, host, machine, len(rows)))
            except self.driver.IntegrityError:
                self.conn.rollback()
                return False  # committed before; the acknowledgement was lost
            cursor.executemany(self._insert_rows, rows)
            self.conn.commit()
            return True
        except self.driver.DataError as error:
            self._rollback()
            raise BatchRejected("the SQL server %s refused a batch of %d rows: %s"
                                % (self.where, len(rows), _one_line(error))) from None
        except (self.driver.Error, OSError) as error:
            self.close()
            message = "writing to table %s on the SQL server %s failed: %s" % (
                self.server.table, self.where, _one_line(error))
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
