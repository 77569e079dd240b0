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

The central server is read with the same tabs and filters by server_queries.
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


def _id_conditions(filters: list[Filter]) -> tuple[list[str], list]:
    """SQL conditions (with their parameters) for every filter but the entry-time ones, which
    narrow the time window instead."""
    conditions, params = [], []
    for f in filters:
        if f.column != "contime":
            sql, values = _id_condition(f)
            conditions.append(sql)
            params += values
    return conditions, params


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

    dimensions = DIMENSIONS
    label = ""  # where the rows come from, when not this machine's snitch.db

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
        conditions, params = _id_conditions(filters)
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


# ---- time series, bounds and first/last seen, for `picosnitch dash` ----
# Kept apart from the tab queries above: these sum per (time bucket, value) in one pass over the
# window, reusing _window, _ranges and _id_condition.

SERIES_POINTS = 240  # aim for at most about this many buckets on a chart
# Below a day, raw write windows give finer buckets; from there whole hours of the rollup.
SERIES_RAW_LIMIT = 12 * HOUR
_SERIES_BUCKETS = (10, 20, 30, 60, 120, 300, 600, 900, 1800, HOUR, 2 * HOUR, 3 * HOUR,
                   6 * HOUR, 12 * HOUR, 24 * HOUR, 2 * 24 * HOUR, 7 * 24 * HOUR, 30 * 24 * HOUR)


@dataclass(frozen=True)
class Series:
    """One value's bytes per bucket (lists aligned with SeriesResult.times)."""

    value: object
    send: list
    recv: list

    @property
    def total(self) -> int:
        return sum(self.send) + sum(self.recv)


@dataclass(frozen=True)
class SeriesResult:
    """Traffic of [start, end) per bucket of `bucket` seconds, one Series per top value.

    `times[k]` is the start of bucket k (unix seconds; a multiple of `bucket`, so the first
    bucket may begin before `start`). `other` sums every value beyond the top ones (None when
    there are none), `values` is how many distinct values had traffic, and `send`/`recv` are
    the totals of the whole window under the filters.
    """

    start: int
    end: int
    bucket: int
    times: list
    series: list
    other: Optional[Series]
    values: int
    send: int
    recv: int


def series_bucket(start: int, end: int, points: int = SERIES_POINTS) -> int:
    """Bucket length for [start, end): the smallest step giving at most `points` buckets.

    Windows longer than SERIES_RAW_LIMIT get whole hours (or more), so that they are read from
    the hourly rollup.
    """
    length = max(end - start, 1)
    floor = HOUR if length > SERIES_RAW_LIMIT else 0
    for step in _SERIES_BUCKETS:
        if step >= floor and length / step <= points:
            return step
    return _SERIES_BUCKETS[-1]


def _grouped_pieces(start: int, end: int, filters: list[Filter], bucket: int, key: str,
                    where: str, where_params: list) -> tuple[str, list]:
    """A SELECT of (t, key, send, recv) summed per stored time and `key` (identity_id or
    endpoint_id) over the window, where the id conditions `where` hold.

    Each piece groups by its table's own time column first, which follows the primary key's
    order (no sorting for identity_id); callers cut `t` down to buckets afterwards. Whole
    hours come from the rollup only when `bucket` is a multiple of an hour.
    """
    start, end, excluded = _window(start, end, filters)
    pieces = (_ranges(start, end) if bucket % HOUR == 0
              else [("traffic", start, end)] if start < end else [])
    parts, params = [], []
    for table, low, high in pieces:
        column = "hour" if table == "traffic_hourly" else "ts"
        sql = (f"SELECT {column} AS t, {key}, sum(send) AS send, sum(recv) AS recv "
               f"FROM {table} WHERE {column} >= ? AND {column} < ?")
        params += [low, high]
        for ex_low, ex_high in excluded:
            sql += f" AND NOT ({column} >= ? AND {column} < ?)"
            params += [ex_low, ex_high]
        parts.append(f"{sql} AND {where} GROUP BY {column}, {key}")
        params += where_params
    if not parts:
        parts.append(f"SELECT 0 AS t, 0 AS {key}, 0 AS send, 0 AS recv WHERE 0")
    return " UNION ALL ".join(parts), params


def series(conn: sqlite3.Connection, column: str, start: int, end: int, filters: list[Filter],
           bucket: int = 0, top: int = 10) -> SeriesResult:
    """Sent and received bytes per bucket of [start, end), by value of dimension `column`.

    Exact: whole hours come from the rollup only when `bucket` is a multiple of an hour, so
    every bucket sums the same rows the `connections` view holds for it. `bucket` 0 chooses
    with series_bucket(). The `top` values with most traffic get a Series each, most first.
    """
    dimension = BY_COLUMN[column]
    if dimension.side == "time":
        raise ValueError("the entry time is the x axis of a series, not a breakdown")
    bucket = bucket or series_bucket(start, end)
    conditions, where_params = _id_conditions(filters)
    where = " AND ".join(conditions) or "1"
    if dimension.side == "identity":
        key, joins = "identity_id", "JOIN identities AS i ON i.id = s.identity_id " + _IDENTITY_JOINS
    else:
        key, joins = "endpoint_id", "JOIN endpoints AS e ON e.id = s.endpoint_id"
    source, params = _grouped_pieces(start, end, filters, bucket, key, where, where_params)
    sql = f"""SELECT s.t - s.t % {bucket:d} AS b, {dimension.expression} AS value,
        sum(s.send), sum(s.recv) FROM ({source}) AS s {joins}
        GROUP BY b, value"""
    first = start - start % bucket
    times = list(range(first, end, bucket))
    count = len(times)
    per_value: dict = {}
    for t, value, sent, received in conn.execute(sql, params):
        slot = per_value.get(value)
        if slot is None:
            slot = per_value[value] = ([0] * count, [0] * count)
        k = (t - first) // bucket
        slot[0][k] += sent
        slot[1][k] += received
    ranked = sorted(per_value.items(), key=lambda item: (-(sum(item[1][0]) + sum(item[1][1])),
                                                         item[0]))
    chosen = [Series(value, sent, received) for value, (sent, received) in ranked[:top]]
    other = None
    if len(ranked) > top:
        sent, received = [0] * count, [0] * count
        for _, (s, r) in ranked[top:]:
            for k in range(count):
                sent[k] += s[k]
                received[k] += r[k]
        other = Series(None, sent, received)
    total_send = sum(sum(s) for s, _ in per_value.values())
    total_recv = sum(sum(r) for _, r in per_value.values())
    return SeriesResult(start, end, bucket, times, chosen, other, len(per_value),
                        total_send, total_recv)


def time_bounds(conn: sqlite3.Connection) -> tuple[Optional[int], Optional[int]]:
    """Like History.bounds, from the primary key's two ends: (min, max) in one SELECT reads the
    whole table (SQLite optimises a lone min() or max() only), ~0.5 s at 10M rows."""
    return tuple(conn.execute(
        "SELECT (SELECT min(ts) FROM traffic), (SELECT max(ts) FROM traffic)").fetchone())


def first_last_seen(conn: sqlite3.Connection,
                    filters: list[Filter]) -> tuple[Optional[int], Optional[int]]:
    """Unix times of the first and last write window with traffic under `filters`, over all
    history (time filters are ignored). (None, None) when there is none.

    Filters on identity columns only (the drill-down's exe) are answered per identity from the
    traffic_identity index, without scanning their traffic.
    """
    conditions, params = _id_conditions(filters)
    if conditions and all(BY_COLUMN[f.column].side == "identity"
                          for f in filters if f.column != "contime"):
        where = " AND ".join(c.replace("identity_id", "ids.id", 1) for c in conditions)
        sql = f"""SELECT min(first), max(last) FROM (SELECT
            (SELECT min(ts) FROM traffic WHERE identity_id = ids.id) AS first,
            (SELECT max(ts) FROM traffic WHERE identity_id = ids.id) AS last
            FROM identities AS ids WHERE {where})"""
    else:
        sql = f"SELECT min(ts), max(ts) FROM traffic WHERE {' AND '.join(conditions) or '1'}"
    return tuple(conn.execute(sql, params).fetchone())
