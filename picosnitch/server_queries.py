"""The SQL behind `picosnitch view --db` (and the dashboard's): the central server's tabs.

The central server holds the table the daemons' "DB sql server" writers fill: one flat row per
snitch.db row, with `host` and `machine_id` in front. ServerHistory reads it with the tabs,
filters and figures of view_queries.History, plus a `host` tab, and gives the dashboard the
series, bounds and first/last seen that view_queries gives it for snitch.db. Its SQL is
written for PostgreSQL or MySQL/MariaDB and the driver's paramstyle. There a pair is (machine,
identity, endpoint) and the window is grouped in one query (no rollup table on the server: its
(ts) and (host, ts) indexes bound the scan).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from picosnitch import central_db
from picosnitch.view_queries import (BY_COLUMN, DIMENSIONS, Dimension, Filter, Row, SeriesResult,
                                     _window, bucket_width, ranked_series, series_bucket)

# The central server has one more tab, first: the machine that sent the rows.
HOST = Dimension("host", "host", "host", "host")
SERVER_DIMENSIONS: tuple[Dimension, ...] = (HOST,) + DIMENSIONS

class QueryError(Exception):
    """The server could not answer (gone away, no such table, no permission): one sentence."""


# A pair on the server: the machine, the identity and the endpoint (every column but the
# figures and the time).
_PAIR_COLUMNS = ("host", "machine_id", "exe", "name", "cmdline", "sha256", "pexe", "pname",
                 "pcmdline", "psha256", "gpexe", "gpname", "gpcmdline", "gpsha256", "uid", "netns",
                 "container", "family", "protocol", "laddr", "lport", "raddr", "rport", "domain")
_INTEGER_COLUMNS = {"uid", "netns", "family", "protocol", "lport", "rport", "ts"}


@dataclass(frozen=True)
class ServerSQL:
    """How to write SQL for one server: its dialect ("postgres" or "mysql"), the driver's
    parameter marker, and the table."""

    dialect: str
    table: str
    mark: str = "%s"  # "?" for qmark drivers (mariadb); never write a literal % in the SQL

    @classmethod
    def for_driver(cls, dialect: str, table: str, paramstyle: str) -> "ServerSQL":
        return cls(dialect, table, "?" if paramstyle == "qmark" else "%s")

    def quote(self, name: str) -> str:
        mark = '"' if self.dialect == "postgres" else "`"
        return ".".join(mark + part + mark for part in name.split("."))

    def column(self, name: str) -> str:
        """A column as grouped and compared: exactly, byte for byte. MySQL's default collations
        fold case and trailing spaces, so text is compared there as its binary string."""
        quoted = self.quote(name)
        if self.dialect == "mysql" and name not in _INTEGER_COLUMNS:
            return "CAST(%s AS BINARY)" % quoted
        return quoted

    def parameter(self, name: str) -> str:
        if self.dialect == "mysql" and name not in _INTEGER_COLUMNS:
            return "CAST(%s AS BINARY)" % self.mark
        return self.mark


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:  # surrogateescape'd bytes that are not UTF-8
        return False


def _server_where(sql: ServerSQL, start: Optional[int], end: Optional[int],
                  filters: list[Filter]) -> tuple[str, list]:
    start, end, excluded = _window(start, end, filters)
    ts = sql.quote("ts")
    conditions, params = [], []
    if start is not None:
        conditions.append("%s >= %s" % (ts, sql.mark))
        params.append(start)
    if end is not None:
        conditions.append("%s < %s" % (ts, sql.mark))
        params.append(end)
    for low, high in excluded:
        conditions.append("NOT (%s >= %s AND %s < %s)" % (ts, sql.mark, ts, sql.mark))
        params += [low, high]
    for f in filters:
        if f.column == "contime":
            continue
        if f.column not in _PAIR_COLUMNS:
            raise ValueError("no such column: %r" % f.column)
        if isinstance(f.value, str) and not _is_utf8(f.value):
            # The server holds valid UTF-8 only (the writer escapes the rest): no row matches.
            conditions.append("1 = 1" if f.exclude else "1 = 0")
            continue
        condition = "%s = %s" % (sql.column(f.column), sql.parameter(f.column))
        conditions.append("NOT (%s)" % condition if f.exclude else condition)
        params.append(f.value)
    return " AND ".join(conditions) or "1 = 1", params


def server_tab_query(sql: ServerSQL, column: str, start: Optional[int], end: Optional[int],
                     filters: list[Filter]) -> tuple[str, list]:
    """SQL and parameters giving (value, send, recv, conns) rows of tab `column` for
    [start, end) (None: open) under `filters`, most traffic first, on the central server.

    The entry time tab groups by write window, or by hour when the window uses whole hours
    (bucket_width), as History does.
    """
    where, params = _server_where(sql, start, end, filters)
    pair = ", ".join(sql.column(name) for name in _PAIR_COLUMNS)
    send, recv = sql.quote("send"), sql.quote("recv")
    if BY_COLUMN.get(column, HOST).side == "time":
        ts, bucket = sql.quote("ts"), bucket_width(start, end)
        value = "%s - MOD(%s, %d)" % (ts, ts, bucket) if bucket else ts
        order = "val DESC"
    else:
        if column not in _PAIR_COLUMNS:
            raise ValueError("no such column: %r" % column)
        value = sql.column(column)
        order = "val"
    query = ("SELECT val, sum(sent), sum(received), count(*) FROM ("
             "SELECT %s AS val, sum(%s) AS sent, sum(%s) AS received FROM %s WHERE %s "
             "GROUP BY %s, %s) AS pairs "
             "GROUP BY val ORDER BY sum(sent) + sum(received) DESC, %s") % (
        value, send, recv, sql.quote(sql.table), where, value, pair, order)
    return query, params


def server_series_query(sql: ServerSQL, column: str, start: int, end: int,
                        filters: list[Filter], bucket: int) -> tuple[str, list]:
    """SQL and parameters giving (bucket start, value, send, recv) rows: the traffic of
    [start, end) under `filters` summed per `bucket` seconds and value of `column`."""
    if column not in _PAIR_COLUMNS:
        raise ValueError("no such column: %r" % column)
    where, params = _server_where(sql, start, end, filters)
    ts, value = sql.quote("ts"), sql.column(column)
    t = "%s - MOD(%s, %d)" % (ts, ts, bucket)
    query = "SELECT %s, %s, sum(%s), sum(%s) FROM %s WHERE %s GROUP BY %s, %s" % (
        t, value, sql.quote("send"), sql.quote("recv"), sql.quote(sql.table), where, t, value)
    return query, params


def server_bounds_query(sql: ServerSQL, filters: tuple = ()) -> tuple[str, list]:
    """SQL giving the first and last write window on the server with traffic under `filters`
    (time filters ignored; NULLs when there is none)."""
    ts = sql.quote("ts")
    where, params = _server_where(sql, None, None, [f for f in filters if f.column != "contime"])
    return "SELECT min(%s), max(%s) FROM %s WHERE %s" % (
        ts, ts, sql.quote(sql.table), where), params


def _plain(value: object) -> object:
    """A value as the UI shows it: text as str (MySQL's binary strings decoded), sums as int."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).decode("utf-8", "surrogateescape")
    if value is None or isinstance(value, (str, int)):
        return value
    return int(value)  # Decimal sums


class ServerHistory:
    """Tabs over the central server, with the interface of History (plus `host`).

    `connect()` returns a new DB-API connection; `errors` are the exception classes that mean
    the server could not answer. A failed query drops the connection and is tried once more on
    a new one (unless it just failed on a new one): a server restarted since the last query
    costs nothing, one that is down gives QueryError, and the next query reconnects. Every read
    ends its transaction, so a refresh sees rows written since.
    """

    dimensions = SERVER_DIMENSIONS

    def __init__(self, connect, errors: tuple, sql: ServerSQL, label: str = ""):
        self._connect, self.errors, self.sql, self.label = connect, errors, sql, label
        self.conn = None

    def _query(self, query: str, params: list) -> list:
        while True:
            fresh = self.conn is None
            try:
                if fresh:
                    self.conn = self._connect()
                cursor = self.conn.cursor()
                try:
                    cursor.execute(query, params)
                    rows = cursor.fetchall()
                finally:
                    cursor.close()
                self.conn.rollback()
                return [tuple(_plain(v) for v in row) for row in rows]
            except self.errors as error:
                self.close()
                if fresh:  # a kept connection may just be stale (server restarted): retry once
                    text = " ".join(str(error).split()) or type(error).__name__
                    if "SQL server" not in text:
                        text = "the SQL server %s: %s" % (self.label, text)
                    raise QueryError(text[:400]) from None

    def tab(self, column: str, start: Optional[int], end: Optional[int],
            filters: list[Filter]) -> list[Row]:
        return [Row(*row) for row in
                self._query(*server_tab_query(self.sql, column, start, end, filters))]

    def bounds(self) -> tuple[Optional[int], Optional[int]]:
        return self._query(*server_bounds_query(self.sql))[0]

    def series(self, column: str, start: int, end: int, filters: list[Filter],
               top: int = 10) -> SeriesResult:
        """As view_queries.series: bytes per bucket (series_bucket) by value of `column`."""
        bucket = series_bucket(start, end)
        cells = self._query(*server_series_query(self.sql, column, start, end, filters, bucket))
        return ranked_series(cells, start, end, bucket, top)

    def first_last_seen(self, filters: list[Filter]) -> tuple[Optional[int], Optional[int]]:
        """As view_queries.first_last_seen: over all history, time filters ignored."""
        return self._query(*server_bounds_query(self.sql, filters))[0]

    def forget_window(self) -> None:
        """Nothing is cached: every tab is read afresh."""

    def close(self) -> None:
        if self.conn is not None:
            try:
                self.conn.close()
            except self.errors:
                pass
            self.conn = None


def server_readers(target: str, config_path) -> Callable[[], ServerHistory]:
    """A function opening a new ServerHistory (its own connection, made on first use) on the
    server `target` names: a URL, or "config" for config.json's "DB sql server".

    Raises central_db.CentralError when `target` names no server or its driver is missing.
    """
    server, driver = central_db.open_server(target, config_path)
    sql = ServerSQL.for_driver(server.dialect, server.table, getattr(driver, "paramstyle", ""))
    errors = (driver.Error, OSError, central_db.CentralError)
    return lambda: ServerHistory(lambda: central_db.connect(server, driver), errors, sql,
                                 server.describe())
