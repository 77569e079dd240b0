"""The SQL behind `picosnitch view --db` (and the dashboard's): the central server's tabs.

The central server holds the table the daemons' "DB sql server" writers fill: one flat row per
snitch.db row, with `host` and `machine_id` in front. ServerHistory reads it with the tabs,
filters and figures of store.queries.History, plus a `host` tab, and gives the dashboard the
series, bounds and first/last seen that store.queries gives it for snitch.db. Its SQL is
written for PostgreSQL or MySQL/MariaDB and the driver's paramstyle. There a pair is (machine,
identity, endpoint) and the window is grouped in one query.

Like snitch.db, the server has an hourly rollup (central.rollup keeps it), but one a machine's writer
fills only for the hours it knows it has every row of, and marks in `<table>_hours`; and older
writers fill none. So a window is read as its partial hours from the raw rows, the whole hours
each machine's rollup marks from `<table>_hourly`, and every other whole hour of every machine
(listed from `<table>_batches`) from the raw rows again, through the (host, ts) index. Every
figure equals the raw rows' (tests/test_sql_rollup.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

from picosnitch.central import connect as central_db
from picosnitch.config import Config
from picosnitch.store.queries import (
    BY_COLUMN,
    DIMENSIONS,
    HOUR,
    Dimension,
    Filter,
    Row,
    SeriesResult,
    bucket_width,
    narrowed_window,
    ranked_series,
    series_bucket,
    split_hours,
)

# The central server has one more tab, first: the machine that sent the rows.
HOST = Dimension("host", "host", "host", "host")
SERVER_DIMENSIONS: tuple[Dimension, ...] = (HOST,) + DIMENSIONS

class QueryError(Exception):
    """The server could not answer (gone away, no such table, no permission): one sentence."""


# PostgreSQL's memory for each sort or hash of a read, instead of its default 4 MB: grouping a
# week of pairs (24 text columns) spills to disk otherwise, and took 5x as long in
# bench/sql_server.py --queries (docs/BENCHMARKS.md).
WORK_MEM = "64MB"

# A pair on the server: the machine, the identity and the endpoint (every column but the
# figures and the time).
_PAIR_COLUMNS = ("host", "machine_id", "exe", "name", "cmdline", "sha256", "pexe", "pname",
                 "pcmdline", "psha256", "gpexe", "gpname", "gpcmdline", "gpsha256", "uid", "netns",
                 "container", "family", "protocol", "laddr", "lport", "raddr", "rport", "domain", "domain_source",
                 "script", "script_sha256", "exe_state")
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


def _filter_conditions(sql: ServerSQL, filters: list[Filter]) -> tuple[list[str], list]:
    """SQL conditions (with their parameters) for every filter but the entry-time ones."""
    conditions, params = [], []
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
    return conditions, params


def _server_where(sql: ServerSQL, start: Optional[int], end: Optional[int],
                  filters: list[Filter]) -> tuple[str, list]:
    start, end, excluded = narrowed_window(start, end, filters)
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
    others, other_params = _filter_conditions(sql, filters)
    return " AND ".join(conditions + others) or "1 = 1", params + other_params


@dataclass(frozen=True)
class Source:
    """Where a query reads the window's rows under the filters: parts, each a table and a
    condition on it with its parameters, whose rows together are those rows."""

    parts: tuple  # of (table, condition, parameters)

    def union(self, select: Callable[[str, str], str]) -> tuple[str, list]:
        """The parts' SELECTs, `select(table, condition)`, joined by UNION ALL."""
        return (" UNION ALL ".join(select(table, where) for table, where, _ in self.parts),
                [value for _, _, params in self.parts for value in params])

    def rows(self, sql: ServerSQL) -> tuple[str, str, list]:
        """A FROM item, a condition and parameters giving the rows (their pair, time and
        figures): the one table, or a derived table of the parts' rows."""
        if len(self.parts) == 1:
            return self.parts[0]
        columns = ", ".join(sql.quote(name) for name in _PAIR_COLUMNS + ("ts", "send", "recv"))
        rows, params = self.union(lambda table, where: "SELECT %s FROM %s WHERE %s" % (
            columns, table, where))
        return "(%s) AS src" % rows, "1 = 1", params


def raw_source(sql: ServerSQL, start: Optional[int], end: Optional[int],
               filters: list[Filter]) -> Source:
    """The window's raw rows under `filters`."""
    return Source(((sql.quote(sql.table), *_server_where(sql, start, end, filters)),))


def server_tab_query(sql: ServerSQL, column: str, start: Optional[int], end: Optional[int],
                     source: Source) -> tuple[str, list]:
    """SQL and parameters giving (value, send, recv, conns) rows of tab `column` for
    [start, end) from `source`, most traffic first.

    The entry time tab groups by write window, or by hour when the window uses whole hours
    (bucket_width), as History does. (The parts' rows are grouped together: summing each part
    per pair first, then the sums, made both servers slower.)
    """
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
    table, where, params = source.rows(sql)
    query = ("SELECT val, sum(sent), sum(received), count(*) FROM ("
             "SELECT %s AS val, sum(%s) AS sent, sum(%s) AS received FROM %s WHERE %s "
             "GROUP BY %s, %s) AS pairs "
             "GROUP BY val ORDER BY sum(sent) + sum(received) DESC, %s") % (
        value, send, recv, table, where, value, pair, order)
    return query, params


def server_series_query(sql: ServerSQL, column: str, source: Source,
                        bucket: int) -> tuple[str, list]:
    """SQL and parameters giving (bucket start, value, send, recv) rows, whose sums per bucket
    and value (`bucket` seconds, value of `column`) are the traffic of `source`: each part is
    grouped on its own (ranked_series adds up the cells)."""
    if column not in _PAIR_COLUMNS:
        raise ValueError("no such column: %r" % column)
    ts, value = sql.quote("ts"), sql.column(column)
    t = "%s - MOD(%s, %d)" % (ts, ts, bucket)
    return source.union(lambda table, where: "SELECT %s, %s, sum(%s), sum(%s) FROM %s WHERE %s "
                        "GROUP BY %s, %s" % (t, value, sql.quote("send"), sql.quote("recv"),
                                             table, where, t, value))


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
    return int(value)  # type: ignore[call-overload]  # Decimal sums (the drivers' type)


# ---- the hourly rollup (central.rollup writes it) ----

_OPEN = 2 ** 62  # an open end of a window, as store.queries.split_hours reads None
# More (machine, hours) the rollup lacks than this, each a condition with 4 parameters, and the
# window is read raw: a statement takes at most 65535 parameters on PostgreSQL.
MAX_UNCOVERED = 2000


def _minus(ranges: list, holes) -> list:
    """The [low, high) `ranges` less the [low, high) `holes`."""
    for hole_low, hole_high in holes:
        ranges = [piece for low, high in ranges
                  for piece in ((low, min(high, hole_low)), (max(low, hole_high), high))
                  if piece[0] < piece[1]]
    return ranges


def _intervals(start: Optional[int], end: Optional[int], filters: list[Filter]) -> list:
    """[start, end) narrowed and cut by the entry-time filters: disjoint [low, high) ranges."""
    start, end, excluded = narrowed_window(start, end, filters)
    return _minus([(-_OPEN if start is None else start, _OPEN if end is None else end)],
                  excluded)


def _ts_in(sql: ServerSQL, ranges: list) -> tuple[str, list]:
    ts = sql.quote("ts")
    condition = " OR ".join("(%s >= %s AND %s < %s)" % (ts, sql.mark, ts, sql.mark)
                            for _ in ranges)
    return "(%s)" % condition, [bound for pair in ranges for bound in pair]


def coverage_query(sql: ServerSQL, start: int, end: int) -> tuple[str, list]:
    """SQL giving (machine_id, first hour, last hour) for each run of consecutive hours in
    [start, end) that `<table>_hours` marks complete for a machine."""
    number = "row_number() OVER (PARTITION BY m ORDER BY hour)"
    if sql.dialect == "mysql":
        number = "CAST(%s AS SIGNED)" % number  # else unsigned, and the difference too
    query = ("SELECT m, min(hour), max(hour) FROM (SELECT m, hour, hour - %d * %s AS run FROM ("
             "SELECT DISTINCT %s AS m, hour FROM %s WHERE hour >= %s AND hour < %s) AS marked) "
             "AS numbered GROUP BY m, run") % (HOUR, number, sql.column("machine_id"),
                                                sql.quote(sql.table + "_hours"), sql.mark, sql.mark)
    return query, [start, end]


def writers_query(sql: ServerSQL) -> str:
    """SQL giving each (host, machine_id) that ever wrote a batch, from the index on
    `<table>_batches` (a loose index scan; PostgreSQL needs it spelled out). On MySQL, hosts
    that the collation takes for equal come once, and `host = %s` matches them all."""
    batches = sql.quote(sql.table + "_batches")
    if sql.dialect == "mysql":
        return "SELECT host, machine_id FROM %s GROUP BY host, machine_id" % batches
    return ("WITH RECURSIVE w (host, machine_id) AS ("
            "(SELECT host, machine_id FROM %s ORDER BY host, machine_id LIMIT 1) UNION ALL "
            "SELECT n.host, n.machine_id FROM w CROSS JOIN LATERAL (SELECT b.host, b.machine_id "
            "FROM %s AS b WHERE (b.host, b.machine_id) > (w.host, w.machine_id) "
            "ORDER BY b.host, b.machine_id LIMIT 1) AS n) SELECT host, machine_id FROM w") % (
        batches, batches)


@dataclass(frozen=True)
class Split:
    """A window's pieces: raw rows (`raw`: partial hours, and `uncovered`: (host, machine,
    low, high) of whole hours the rollup lacks) and whole hours (`whole`) from the rollup."""

    raw: list
    whole: list
    uncovered: list

    def source(self, sql: ServerSQL, filters: list[Filter]) -> Source:
        """The pieces' rows under `filters`."""
        conditions, condition_params = _filter_conditions(sql, filters)
        host, machine, ts = (sql.quote(name) for name in ("host", "machine_id", "ts"))
        writer = "(%s = %s AND %s = %s AND %s >= %s AND %s < %s)" % (
            host, sql.mark, machine, sql.mark, ts, sql.mark, ts, sql.mark)
        pieces = [(sql.table, *_ts_in(sql, self.raw)) if self.raw else None,
                  (sql.table + "_hourly", *_ts_in(sql, self.whole)) if self.whole else None,
                  (sql.table, "(%s)" % " OR ".join([writer] * len(self.uncovered)),
                   [v for piece in self.uncovered for v in piece]) if self.uncovered else None]
        return Source(tuple((sql.quote(table), " AND ".join([where] + conditions),
                             where_params + condition_params)
                            for table, where, where_params in filter(None, pieces)))


def split(run, sql: ServerSQL, intervals: list) -> Optional[Split]:
    """`intervals` as pieces, whole hours from the rollup wherever `<table>_hours` marks them
    complete for a machine; None when it marks none of them, or lacks too many (MAX_UNCOVERED).
    `run(query, params)` reads."""
    raw: list[tuple[int, int]] = []
    whole: list[tuple[int, int]] = []
    for low, high in intervals:
        for table, a, b in split_hours(low, high):
            (whole if table == "traffic_hourly" else raw).append((a, b))
    if not whole:
        return None
    covered: dict = {}
    for machine, first, last in run(*coverage_query(sql, whole[0][0], whole[-1][1])):
        covered.setdefault(machine, []).append((first, last + HOUR))
    if not covered:
        return None
    uncovered = [(host, machine, a, b) for host, machine in run(writers_query(sql), [])
                 for a, b in _minus(whole, covered.get(machine, ()))]
    if len(uncovered) > MAX_UNCOVERED:
        return None
    return Split(raw, whole, uncovered)


class ServerHistory:
    """Tabs over the central server, with the interface of History (plus `host`).

    `connect()` returns a new DB-API connection; `errors` are the exception classes that mean
    the server could not answer. A failed query drops the connection and is tried once more on
    a new one (unless it just failed on a new one): a server restarted since the last query
    costs nothing, one that is down gives QueryError, and the next query reconnects. Every read
    ends its transaction, so a refresh sees rows written since.

    Whole hours come from the hourly rollup where `<table>_hours` marks them complete for a
    machine (its rows there are summed in `<table>_hourly`), the rest from the raw rows: the
    figures are those of the raw rows alone. The machines are listed from `<table>_batches`.
    The queries of one answer read one snapshot (REPEATABLE READ), so a rollup hour written
    meanwhile is read either as raw rows or from the rollup. Without the rollup tables (an
    older server, or a reader without SELECT on them), or with `rollup` False, every row is
    read raw. On PostgreSQL each read may use WORK_MEM per sort or hash.
    """

    dimensions = SERVER_DIMENSIONS

    def __init__(self, connect, errors: tuple, sql: ServerSQL, label: str = "",
                 rollup: bool = True):
        self._connect, self.errors, self.sql, self.label = connect, errors, sql, label
        self.rollup = rollup
        self.conn: Any = None  # the driver's DB-API connection, once opened
        self._readable: Optional[bool] = None  # whether this connection may read the rollup

    def _run(self, query: str, params: list) -> list:
        cursor = self.conn.cursor()
        try:
            cursor.execute(query, params)
            rows = cursor.fetchall() if cursor.description else []
        finally:
            cursor.close()
        return [tuple(_plain(v) for v in row) for row in rows]

    def _transaction(self, work: Callable):
        """`work(run, rollup)` in one read transaction; `run(query, params)` gives rows, and
        `rollup` says whether to read the rollup."""
        while True:
            fresh = self.conn is None
            try:
                if fresh:
                    self.conn = self._connect()
                rollup = self.rollup and self._rollup_readable()
                if rollup:
                    self._run("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ", [])
                if self.sql.dialect == "postgres":
                    self._run("SET LOCAL work_mem = '%s'" % WORK_MEM, [])
                result = work(self._run, rollup)
                self.conn.rollback()
                return result
            except self.errors as error:
                self.close()
                if fresh:  # a kept connection may just be stale (server restarted): retry once
                    text = " ".join(str(error).split()) or type(error).__name__
                    if "SQL server" not in text:
                        text = "the SQL server %s: %s" % (self.label, text)
                    raise QueryError(text[:400]) from None

    def _rollup_readable(self) -> bool:
        """Whether this connection may read the rollup tables, with the SQL split() uses
        (window functions: MariaDB 10.2, MySQL 8)."""
        if self._readable is None:
            try:
                for name in ("_hourly", "_batches"):
                    self._run("SELECT 1 FROM %s WHERE 1 = 0"
                              % self.sql.quote(self.sql.table + name), [])
                self._run(*coverage_query(self.sql, 0, 0))
                self._readable = True
            except self.errors:
                self._readable = False
            self.conn.rollback()
        return self._readable

    def _query(self, query: str, params: list) -> list:
        return self._transaction(lambda run, rollup: run(query, params))

    def pieces(self, start: Optional[int], end: Optional[int],
               filters: tuple = ()) -> Optional[Split]:
        """How [start, end) is read under `filters`: None when every row is read raw."""
        return self._transaction(lambda run, rollup: split(
            run, self.sql, _intervals(start, end, list(filters))) if rollup else None)

    def _source(self, run, rollup: bool, start: Optional[int], end: Optional[int],
                filters: list[Filter]) -> Source:
        """The window's rows under `filters`: from the rollup where it may be read."""
        pieces = split(run, self.sql, _intervals(start, end, filters)) if rollup else None
        if pieces is None:
            return raw_source(self.sql, start, end, filters)
        return pieces.source(self.sql, filters)

    def tab(self, column: str, start: Optional[int], end: Optional[int],
            filters: list[Filter]) -> list[Row]:
        def work(run, rollup):
            source = self._source(run, rollup, start, end, filters)
            return run(*server_tab_query(self.sql, column, start, end, source))
        return [Row(*row) for row in self._transaction(work)]

    def bounds(self) -> tuple[Optional[int], Optional[int]]:
        return self._query(*server_bounds_query(self.sql))[0]

    def series(self, column: str, start: int, end: int, filters: list[Filter],
               top: int = 10) -> SeriesResult:
        """As store.queries.series: bytes per bucket (series_bucket) by value of `column`.
        Whole hours come from the rollup only when the buckets are whole hours."""
        bucket = series_bucket(start, end)

        def work(run, rollup):
            source = self._source(run, rollup and bucket % HOUR == 0, start, end, filters)
            return run(*server_series_query(self.sql, column, source, bucket))
        return ranked_series(self._transaction(work), start, end, bucket, top)

    def first_last_seen(self, filters: list[Filter]) -> tuple[Optional[int], Optional[int]]:
        """As store.queries.first_last_seen: over all history, time filters ignored.

        With the rollup: its first and last hour with such traffic, then the raw rows of those
        two hours and of the hours it lacks."""
        filters = [f for f in filters if f.column != "contime"]

        def work(run, rollup):
            pieces = split(run, self.sql, _intervals(None, None, [])) if rollup else None
            if pieces is None:
                return run(*server_bounds_query(self.sql, filters))[0]
            conditions, params = _filter_conditions(self.sql, filters)
            first, last = run("SELECT min(ts), max(ts) FROM %s WHERE %s" % (
                self.sql.quote(self.sql.table + "_hourly"), " AND ".join(conditions) or "1 = 1"),
                params)[0]
            hours = [(h, h + HOUR) for h in sorted({first, last} - {None})]
            found, params = Split(pieces.raw + hours, [], pieces.uncovered).source(
                self.sql, filters).union(lambda table, where: (
                    "SELECT min(ts) AS low, max(ts) AS high FROM %s WHERE %s" % (table, where)))
            return run("SELECT min(low), max(high) FROM (%s) AS found" % found, params)[0]
        return self._transaction(work)

    def forget_window(self) -> None:
        """Nothing is cached: every tab is read afresh."""

    def close(self) -> None:
        self._readable = None
        if self.conn is not None:
            try:
                self.conn.close()
            except self.errors:
                pass
            self.conn = None


def server_readers(target: str, cfg: Optional[Config]) -> Callable[[], ServerHistory]:
    """A function opening a new ServerHistory (its own connection, made on first use) on the
    server `target` names: a URL, or "config" for the "DB sql server" of config.json's settings
    `cfg`.

    Raises central.connect.CentralError when `target` names no server or its driver is missing.
    """
    server, driver = central_db.open_server(target, cfg)
    sql = ServerSQL.for_driver(server.dialect, server.table, getattr(driver, "paramstyle", ""))
    errors = (driver.Error, OSError, central_db.CentralError)
    return lambda: ServerHistory(lambda: central_db.connect(server, driver), errors, sql,
                                 server.describe())
