"""The SQL behind `picosnitch view`: one query per tab, over a time window, with filters.

Each tab ("dimension") groups the traffic of a time window by one column of the `connections`
view (exe, raddr, ...) and sums sent and received bytes. The third figure, `conns`, counts the
distinct identity x endpoint pairs behind a value: one process talking from one local port to
one remote address and port, which is one connection for TCP. It reads the same from the raw
`traffic` table and from the hourly rollup, unlike a count of stored rows.

Speed on large databases comes from two steps. First the window is summed per (identity,
endpoint) into a temporary table (`pairs`), reading whole hours from `traffic_hourly` and only
the partial hours at either end from `traffic`, so the result is exact at any range yet never
scans more than two hours of raw rows. Every tab and filter of that window is then grouped from
`pairs`, which is small, joined to the small `identities`, `processes` and `endpoints` tables.
Only a new window (another range, a step back in history, a refresh) repeats the first step.

Filters on the entry time tab narrow the window instead (they are time ranges); every other
filter becomes a condition on the identity or endpoint id.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from typing import Optional

from picosnitch.sanitize import to_bytes

HOUR = 3600


@dataclass(frozen=True)
class Dimension:
    """A tab: `column` is the connections-view column it groups by, `expression` its SQL."""

    column: str
    title: str
    side: str  # "identity", "endpoint" or "time"
    expression: str
    is_text: bool = True


def _process_dimensions(prefix: str, alias: str, who: str) -> list[Dimension]:
    return [Dimension(prefix + "exe", who + "executable", "identity", alias + ".exe"),
            Dimension(prefix + "name", who + "name", "identity", alias + ".name"),
            Dimension(prefix + "cmdline", who + "command", "identity", alias + ".cmdline"),
            Dimension(prefix + "sha256", who + "sha256", "identity", alias + ".sha256")]


DIMENSIONS: tuple[Dimension, ...] = tuple(
    _process_dimensions("", "p", "")
    + _process_dimensions("p", "pp", "parent ")
    + _process_dimensions("gp", "gp", "grandparent ")
    + [Dimension("uid", "user", "identity", "i.uid", False),
       Dimension("lport", "local port", "endpoint", "e.lport", False),
       Dimension("rport", "remote port", "endpoint", "e.rport", False),
       Dimension("laddr", "local address", "endpoint", "e.laddr"),
       Dimension("raddr", "remote address", "endpoint", "e.raddr"),
       Dimension("domain", "domain", "endpoint", "e.domain"),
       Dimension("container", "container", "identity", "i.container"),
       Dimension("contime", "entry time", "time", "")])

BY_COLUMN = {d.column: d for d in DIMENSIONS}

_IDENTITY_JOINS = """JOIN processes AS p ON p.id = i.process_id
JOIN processes AS pp ON pp.id = i.parent_id
JOIN processes AS gp ON gp.id = i.grandparent_id"""


@dataclass(frozen=True)
class Filter:
    """Keep (or, with `exclude`, drop) the traffic whose `column` equals `value`.

    On the entry time tab `value` is the unix time a bucket starts and `width` its length.
    """

    column: str
    value: object
    exclude: bool = False
    width: int = 0


@dataclass(frozen=True)
class Row:
    """One line of a tab: a value and its traffic in the window."""

    value: object
    send: int
    recv: int
    conns: int


def _bind(dimension: Dimension, value: object) -> object:
    """`value` as bound in SQL: text as its exact bytes, compared after CAST(? AS TEXT)."""
    return to_bytes(value) if dimension.is_text and isinstance(value, str) else value


def _id_condition(f: Filter) -> tuple[str, list]:
    """SQL (over identity_id / endpoint_id) and parameters for a non-time filter."""
    dimension = BY_COLUMN[f.column]
    placeholder = "CAST(? AS TEXT)" if dimension.is_text else "?"
    negate = "NOT " if f.exclude else ""
    if dimension.side == "identity":
        sql = (f"identity_id {negate}IN (SELECT i.id FROM identities AS i {_IDENTITY_JOINS} "
               f"WHERE {dimension.expression} = {placeholder})")
    else:
        sql = (f"endpoint_id {negate}IN (SELECT e.id FROM endpoints AS e "
               f"WHERE {dimension.expression} = {placeholder})")
    return sql, [_bind(dimension, f.value)]


def _ranges(start: Optional[int], end: Optional[int]) -> list[tuple[str, int, int]]:
    """Split [start, end) into (table, from, to) pieces: whole hours from the rollup.

    None stands for an open end. The pieces cover exactly the window.
    """
    low = -(2 ** 62) if start is None else start
    high = 2 ** 62 if end is None else end
    if low >= high:
        return []
    first_hour = -(-low // HOUR) * HOUR
    last_hour = high // HOUR * HOUR
    if first_hour >= last_hour:
        return [("traffic", low, high)]
    pieces = []
    if low < first_hour:
        pieces.append(("traffic", low, first_hour))
    pieces.append(("traffic_hourly", first_hour, last_hour))
    if last_hour < high:
        pieces.append(("traffic", last_hour, high))
    return pieces


def _window(start: Optional[int], end: Optional[int], filters: list[Filter]):
    """The window narrowed by the entry-time filters: (start, end, excluded ranges)."""
    excluded = []
    for f in filters:
        if f.column != "contime":
            continue
        low, high = int(f.value), int(f.value) + f.width
        if f.exclude:
            excluded.append((low, high))
        else:
            start = low if start is None else max(start, low)
            end = high if end is None else min(end, high)
    return start, end, excluded


def _source(start: Optional[int], end: Optional[int], filters: list[Filter],
            bucket: int = 0) -> tuple[str, list]:
    """A SELECT of (t, identity_id, endpoint_id, send, recv) rows covering the window.

    `t` is the row's time, cut down to `bucket` seconds when bucket is given.
    """
    start, end, excluded = _window(start, end, filters)
    parts, params = [], []
    for table, low, high in _ranges(start, end):
        time_column = "hour" if table == "traffic_hourly" else "ts"
        t = f"{time_column} - {time_column} % {bucket:d}" if bucket else time_column
        sql = (f"SELECT {t} AS t, identity_id, endpoint_id, send, recv FROM {table} "
               f"WHERE {time_column} >= ? AND {time_column} < ?")
        params += [low, high]
        for ex_low, ex_high in excluded:
            sql += f" AND NOT ({time_column} >= ? AND {time_column} < ?)"
            params += [ex_low, ex_high]
        parts.append(sql)
    if not parts:
        parts.append("SELECT 0 AS t, 0 AS identity_id, 0 AS endpoint_id, 0 AS send, 0 AS recv "
                     "WHERE 0")
    return " UNION ALL ".join(parts), params


def bucket_width(start: Optional[int], end: Optional[int]) -> int:
    """Length of an entry-time bucket: an hour where the window uses the rollup, else 0 (rows).

    0 means each write window is its own bucket.
    """
    return HOUR if any(t == "traffic_hourly" for t, _, _ in _ranges(start, end)) else 0


class History:
    """Tabs over one read-only snitch.db connection (see sqlite_store.open_readonly)."""

    def __init__(self, conn: sqlite3.Connection):
        self.conn = conn
        self.conn.execute("PRAGMA temp_store = MEMORY")
        self._pairs_key: Optional[tuple] = None

    def _pairs(self, start: Optional[int], end: Optional[int], filters: list[Filter]) -> None:
        """(Re)build temp.pairs for the window, unless it already holds it."""
        time_filters = tuple(f for f in filters if f.column == "contime")
        key = (start, end, time_filters)
        if key == self._pairs_key:
            return
        source, params = _source(start, end, list(time_filters))
        with self.conn:
            self.conn.execute("DROP TABLE IF EXISTS temp.pairs")
            self.conn.execute(
                "CREATE TEMP TABLE pairs AS SELECT identity_id, endpoint_id, sum(send) AS send, "
                f"sum(recv) AS recv FROM ({source}) GROUP BY identity_id, endpoint_id", params)
        self._pairs_key = key

    def forget_window(self) -> None:
        """Read the window afresh next time (the database may have grown)."""
        self._pairs_key = None

    def tab(self, column: str, start: Optional[int], end: Optional[int],
            filters: list[Filter]) -> list[Row]:
        """The rows of tab `column` for [start, end) (None: open) under `filters`, most
        traffic first."""
        conditions, params = [], []
        for f in filters:
            if f.column != "contime":
                sql, values = _id_condition(f)
                conditions.append(sql)
                params += values
        where = " AND ".join(conditions) or "1"
        dimension = BY_COLUMN[column]
        if dimension.side == "time":
            source, source_params = _source(start, end, filters, bucket_width(start, end))
            sql = f"""SELECT t, sum(send), sum(recv), count(*) FROM (
                SELECT t, sum(send) AS send, sum(recv) AS recv FROM ({source})
                WHERE {where} GROUP BY t, identity_id, endpoint_id)
            GROUP BY t ORDER BY sum(send) + sum(recv) DESC, t DESC"""
            rows = self.conn.execute(sql, source_params + params)
        else:
            self._pairs(start, end, filters)
            joins = ("JOIN identities AS i ON i.id = pairs.identity_id " + _IDENTITY_JOINS
                     if dimension.side == "identity"
                     else "JOIN endpoints AS e ON e.id = pairs.endpoint_id")
            sql = f"""SELECT {dimension.expression} AS value, sum(send), sum(recv), count(*)
                FROM temp.pairs {joins} WHERE {where}
                GROUP BY value ORDER BY sum(send) + sum(recv) DESC, value"""
            rows = self.conn.execute(sql, params)
        return [Row(*row) for row in rows]

    def bounds(self) -> tuple[Optional[int], Optional[int]]:
        """Unix times of the first and last stored write window (None when empty)."""
        return self.conn.execute("SELECT min(ts), max(ts) FROM traffic").fetchone()
