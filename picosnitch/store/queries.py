"""The SQL behind `picosnitch view`: one query per tab, over a time window, with filters.

Each tab ("dimension") groups the traffic of a time window by one column of the `connections`
view (exe, raddr, ...) and sums sent and received bytes. The third figure, `conns`, counts the
distinct identity x endpoint pairs behind a value: one process talking from one local port to
one remote address and port, which is one connection for TCP. It reads the same from the raw
`traffic` table and from the hourly rollup, unlike a count of stored rows. Every figure is exact
at every range; the two ways below give the same rows (tests/test_view_queries.py).

Pieces: a window [start, end) is read as whole hours from `traffic_hourly` and only the partial
hours at either end from `traffic`, so no query scans more than two hours of raw rows.

Short windows, and any window under filters the totals cannot apply: the window is summed per
(identity, endpoint) into a temporary table (`pairs`), under the filters' conditions, and every
tab is grouped from it joined to the small `identities`, `processes` and `endpoints` tables. A
table built without filters serves every filter of the same window. The cost grows with the
number of distinct connections in the window: about a second for the ~700k of a busy month.

Windows holding most of what is stored (with the default 30-day retention: month, year and all,
the default range): each tab is read from the totals of everything stored (store.schema's
`totals_by_peer`, or `totals_by_lport` for the local port tab; a few 10^4 rows) minus what lies
outside the window. The outside is summed per pair into `outside` (whole hours from the rollup,
less the raw rows of the window's partial hours), with whether the pair also has traffic inside;
a pair with none there is taken off its value's conns. So the cost grows with the traffic
outside the window (at most a day between two daily prunes), not with what is inside. Which way
is taken depends on the stored time span the window covers (more than half: the totals), and on
the filters: the totals keep the identity and the endpoint columns but the local port
(`totals_by_peer`), or the identity and the local port (`totals_by_lport`); entry-time filters
take the other way.

The entry time tab is grouped per hour from `hourly_by_identity` when every filter is on the
identity (or the entry time), otherwise per pair from the pieces.

A version-1 snitch.db (written by a daemon not yet restarted after an upgrade) has none of these
rollups: it is read the first way only, with the same figures.

Filters on the entry time tab narrow the window instead (they are time ranges); every other
filter becomes a condition on the identity or endpoint (id, or the totals' own columns).

The central server is read with the same tabs and filters by central.queries.
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
       Dimension("domain_source", "domain source", "endpoint", "e.domain_source"),
       Dimension("container", "container", "identity", "i.container"),
       Dimension("script", "script", "identity", "p.script"),
       Dimension("script_sha256", "script sha256", "identity", "p.script_sha256"),
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


def _equals(f: Filter) -> tuple[str, list]:
    """`column = value` for a non-time filter, over the aliases its expression names."""
    dimension = BY_COLUMN[f.column]
    placeholder = "CAST(? AS TEXT)" if dimension.is_text else "?"
    return f"{dimension.expression} = {placeholder}", [_bind(dimension, f.value)]


def _id_condition(f: Filter) -> tuple[str, list]:
    """SQL (over identity_id / endpoint_id) and parameters for a non-time filter."""
    equals, params = _equals(f)
    negate = "NOT " if f.exclude else ""
    if BY_COLUMN[f.column].side == "identity":
        sql = (f"identity_id {negate}IN (SELECT i.id FROM identities AS i {_IDENTITY_JOINS} "
               f"WHERE {equals})")
    else:
        sql = f"endpoint_id {negate}IN (SELECT e.id FROM endpoints AS e WHERE {equals})"
    return sql, params


def _totals_conditions(filters: list[Filter]) -> tuple[str, list]:
    """The filters as one condition over rows with an identity_id and the endpoint columns as
    `e` (a totals table, or `endpoints`)."""
    conditions, params = [], []
    for f in filters:
        if BY_COLUMN[f.column].side == "identity":
            sql, values = _id_condition(f)
        else:
            sql, values = _equals(f)
            sql = f"NOT ({sql})" if f.exclude else sql
        conditions.append(sql)
        params += values
    return " AND ".join(conditions) or "1", params


# The totals tables (store.schema) and the endpoint columns each keeps; every identity column is
# reached through identity_id.
_TOTALS = (("totals_by_peer", frozenset({"laddr", "raddr", "rport", "domain"})),
           ("totals_by_lport", frozenset({"lport"})))


def _totals_for(columns: set) -> Optional[str]:
    """The totals table that keeps every one of `columns`, or None."""
    if any(BY_COLUMN[c].side == "time" for c in columns):
        return None
    endpoint = {c for c in columns if BY_COLUMN[c].side == "endpoint"}
    return next((table for table, kept in _TOTALS if endpoint <= kept), None)


def split_hours(start: Optional[int], end: Optional[int]) -> list[tuple[str, int, int]]:
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


def narrowed_window(start: Optional[int], end: Optional[int], filters: list[Filter]):
    """The window narrowed by the entry-time filters: (start, end, excluded ranges)."""
    excluded = []
    for f in filters:
        if f.column != "contime":
            continue
        low = int(f.value)  # type: ignore[call-overload]  # an entry-time filter holds a unix time
        high = low + f.width
        if f.exclude:
            excluded.append((low, high))
        else:
            start = low if start is None else max(start, low)
            end = high if end is None else min(end, high)
    return start, end, excluded


def _source(start: Optional[int], end: Optional[int], filters: list[Filter]) -> tuple[str, list]:
    """A SELECT of (identity_id, endpoint_id, send, recv) rows covering the window, under
    every filter (time filters narrow or cut the window, the others are conditions)."""
    parts = ["SELECT 0 AS identity_id, 0 AS endpoint_id, 0 AS send, 0 AS recv WHERE 0"]
    params: list = []
    for table, _, where, piece_params in _pieces(start, end, filters):
        parts.append(f"SELECT identity_id, endpoint_id, send, recv FROM {table} WHERE {where}")
        params += piece_params
    return " UNION ALL ".join(parts), params


def _pieces(start: Optional[int], end: Optional[int], filters: list[Filter],
            rollup: Optional[str] = "traffic_hourly") -> list[tuple[str, str, str, list]]:
    """(table, time column, condition, parameters) for each piece of the window under the
    filters (see _source). Whole hours come from `rollup`, a table with the rollup's `hour`
    (traffic_hourly, or hourly_by_identity when only identities matter); None reads every
    piece from `traffic`."""
    start, end, excluded = narrowed_window(start, end, filters)
    conditions, condition_params = _id_conditions(filters)
    if rollup is None:
        ranges = [("traffic", start, end)] if start < end else []
    else:
        ranges = split_hours(start, end)
    pieces: list[tuple[str, str, str, list]] = []
    for table, low, high in ranges:
        column = "ts" if table == "traffic" else "hour"
        sql, params = f"{column} >= ? AND {column} < ?", [low, high]
        for ex_low, ex_high in excluded:
            sql += f" AND NOT ({column} >= ? AND {column} < ?)"
            params += [ex_low, ex_high]
        pieces.append((rollup or table if table == "traffic_hourly" else table, column,
                       " AND ".join([sql] + conditions), params + condition_params))
    return pieces


def bucket_width(start: Optional[int], end: Optional[int]) -> int:
    """Length of an entry-time bucket: an hour where the window uses the rollup, else 0 (rows).

    0 means each write window is its own bucket.
    """
    return HOUR if any(t == "traffic_hourly" for t, _, _ in split_hours(start, end)) else 0


class History:
    """Tabs over one read-only snitch.db connection (see store.sqlite.open_readonly)."""

    dimensions = DIMENSIONS
    label = ""  # where the rows come from, when not this machine's snitch.db

    def __init__(self, conn: sqlite3.Connection):
        self.conn = conn
        self.conn.execute("PRAGMA temp_store = MEMORY")
        self._pairs_key: Optional[tuple] = None
        self._outside_key: Optional[tuple] = None
        self._rollups = has_rollups(conn)

    def forget_window(self) -> None:
        """Read the window afresh next time (the database may have grown, or been migrated)."""
        self._pairs_key = self._outside_key = None
        self._rollups = has_rollups(self.conn)

    def tab(self, column: str, start: Optional[int], end: Optional[int],
            filters: list[Filter]) -> list[Row]:
        """The rows of tab `column` for [start, end) (None: open) under `filters`, most
        traffic first."""
        dimension = BY_COLUMN[column]
        if dimension.side == "time":
            return self._time_tab(start, end, filters)
        totals = self._rollups and _totals_for({column} | {f.column for f in filters})
        if totals and self._mostly_inside(start, end):
            return self._tab_from_totals(dimension, totals, start, end, filters)
        return self._tab_from_pairs(dimension, start, end, filters)

    def bounds(self) -> tuple[Optional[int], Optional[int]]:
        """Unix times of the first and last stored write window (None when empty)."""
        return time_bounds(self.conn)

    def _mostly_inside(self, start: Optional[int], end: Optional[int]) -> bool:
        """Whether [start, end) covers more than half the stored time span, and a whole hour
        of the rollup: then the totals minus the outside is the shorter way."""
        first, last = self.bounds()
        if first is None or last is None or not any(t == "traffic_hourly" for t, _, _ in split_hours(start, end)):
            return False
        low = first if start is None else max(start, first)
        high = last + 1 if end is None else min(end, last + 1)
        return 2 * (high - low) > last + 1 - first

    def _tab_from_pairs(self, dimension: Dimension, start: Optional[int], end: Optional[int],
                        filters: list[Filter]) -> list[Row]:
        self._pairs(start, end, filters)
        conditions, params = _id_conditions(filters)
        joins = ("JOIN identities AS i ON i.id = pairs.identity_id " + _IDENTITY_JOINS
                 if dimension.side == "identity"
                 else "JOIN endpoints AS e ON e.id = pairs.endpoint_id")
        sql = f"""SELECT {dimension.expression} AS value, sum(send), sum(recv), count(*)
            FROM temp.pairs {joins} WHERE {" AND ".join(conditions) or "1"}
            GROUP BY value ORDER BY sum(send) + sum(recv) DESC, value"""
        return [Row(*row) for row in self.conn.execute(sql, params)]

    def _pairs(self, start: Optional[int], end: Optional[int], filters: list[Filter]) -> None:
        """(Re)build temp.pairs for the window under `filters`, unless it already holds the
        window under some of them (none, say): tabs apply all their filters to it anyway."""
        times = tuple(f for f in filters if f.column == "contime")
        others = frozenset(f for f in filters if f.column != "contime")
        held = self._pairs_key
        if held and held[:3] == (start, end, times) and held[3] <= others:
            return
        source, params = _source(start, end, filters)
        with self.conn:
            self.conn.execute("DROP TABLE IF EXISTS temp.pairs")
            self.conn.execute(
                "CREATE TEMP TABLE pairs AS SELECT identity_id, endpoint_id, sum(send) AS send, "
                f"sum(recv) AS recv FROM ({source}) GROUP BY identity_id, endpoint_id", params)
        self._pairs_key = (start, end, times, others)

    def _tab_from_totals(self, dimension: Dimension, totals: str, start: Optional[int],
                         end: Optional[int], filters: list[Filter]) -> list[Row]:
        """The tab as `totals` (everything stored) less temp.outside (see the module doc)."""
        self._outside(start, end)
        where, params = _totals_conditions(filters)

        def identities(on: str) -> str:
            return (f"JOIN identities AS i ON i.id = {on} {_IDENTITY_JOINS}"
                    if dimension.side == "identity" else "")

        # each side grouped first: the totals may be in the value's order already
        sql = f"""SELECT value, sum(send), sum(recv), sum(pairs) FROM (
            SELECT {dimension.expression} AS value, sum(e.send) AS send, sum(e.recv) AS recv,
                sum(e.pairs) AS pairs FROM {totals} AS e {identities("e.identity_id")}
                WHERE {where} GROUP BY value
            UNION ALL
            SELECT {dimension.expression}, -sum(o.send), -sum(o.recv), sum(o.inside - 1)
                FROM temp.outside AS o JOIN endpoints AS e ON e.id = o.endpoint_id
                {identities("o.identity_id")} WHERE {where} GROUP BY 1)
            GROUP BY value HAVING sum(pairs) > 0
            ORDER BY sum(send) + sum(recv) DESC, value"""
        return [Row(*row) for row in self.conn.execute(sql, params + params)]

    def _outside(self, start: Optional[int], end: Optional[int]) -> None:
        """(Re)build temp.outside: per pair, its traffic outside [start, end), and whether it
        has any inside. The window's whole hours are [first, last) of the rollup; every other
        hourly row is outside, less the raw rows of its hour that lie in the window."""
        if self._outside_key == (start, end):
            return
        pieces = split_hours(start, end)
        [(first, last)] = [(low, high) for t, low, high in pieces if t == "traffic_hourly"]
        raw = [(low, high) for t, low, high in pieces if t == "traffic"]
        rows = ["SELECT identity_id, endpoint_id, send, recv, 0 AS inside FROM traffic_hourly "
                "WHERE hour < :first", "SELECT identity_id, endpoint_id, send, recv, 0 "
                "FROM traffic_hourly WHERE hour >= :last"]
        params = {"first": first, "last": last}
        for k, (low, high) in enumerate(raw):
            rows.append(f"SELECT identity_id, endpoint_id, -send, -recv, 1 FROM traffic "
                        f"WHERE ts >= :low{k} AND ts < :high{k}")
            params.update({f"low{k}": low, f"high{k}": high})
        with self.conn:
            self.conn.execute("DROP TABLE IF EXISTS temp.outside")
            self.conn.execute(f"""CREATE TEMP TABLE outside AS SELECT identity_id, endpoint_id,
                sum(send) AS send, sum(recv) AS recv, CASE WHEN max(inside) THEN 1 ELSE EXISTS (
                    SELECT 1 FROM traffic_hourly AS h WHERE h.endpoint_id = x.endpoint_id
                    AND h.identity_id = x.identity_id AND h.hour >= :first AND h.hour < :last)
                END AS inside FROM ({" UNION ALL ".join(rows)}) AS x
                GROUP BY identity_id, endpoint_id""", params)
        self._outside_key = (start, end)

    def _time_tab(self, start: Optional[int], end: Optional[int],
                  filters: list[Filter]) -> list[Row]:
        """Entry-time buckets: hours where the window uses the rollup, else write windows.
        conns of a bucket: the pairs with traffic in it."""
        bucket = bucket_width(start, end)
        by_identity = self._rollups and all(BY_COLUMN[f.column].side != "endpoint"
                                            for f in filters)
        parts, params = [], []
        for table, column, where, piece_params in _pieces(
                start, end, filters, "hourly_by_identity" if by_identity else "traffic_hourly"):
            if table == "hourly_by_identity":  # already per hour, with its pairs
                parts.append(f"SELECT hour AS t, send, recv, pairs FROM {table} WHERE {where}")
            else:
                t = f"{column} - {column} % {bucket:d}" if bucket else column
                parts.append(f"""SELECT t, sum(send), sum(recv), count(*) FROM (
                    SELECT {t} AS t, sum(send) AS send, sum(recv) AS recv FROM {table}
                    WHERE {where} GROUP BY t, identity_id, endpoint_id) GROUP BY t""")
            params += piece_params
        sql = f"""SELECT t, sum(send), sum(recv), sum(pairs) FROM (
            SELECT 0 AS t, 0 AS send, 0 AS recv, 0 AS pairs WHERE 0  -- names the columns
            UNION ALL {" UNION ALL ".join(parts) or "SELECT 0, 0, 0, 0 WHERE 0"})
            GROUP BY t ORDER BY sum(send) + sum(recv) DESC, t DESC"""
        return [Row(*row) for row in self.conn.execute(sql, params)]


# ---- time series, bounds and first/last seen, for `picosnitch dash` ----
# Kept apart from the tab queries above: these sum per (time bucket, value) in one pass over the
# window's pieces (_pieces).

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
                    rollups: bool) -> tuple[str, list]:
    """A SELECT of (t, key, send, recv) summed per stored time and `key` (identity_id or
    endpoint_id) over the window, under the filters.

    Each piece groups by its table's own time column first, which follows the primary key's
    order (no sorting for identity_id); callers cut `t` down to buckets afterwards. Whole
    hours come from a rollup only when `bucket` is a multiple of an hour: hourly_by_identity
    when only identities matter (and the database has it: `rollups`), else traffic_hourly.
    """
    by_identity = rollups and key == "identity_id" and all(BY_COLUMN[f.column].side != "endpoint"
                                               for f in filters)
    rollup = (None if bucket % HOUR else
              "hourly_by_identity" if by_identity else "traffic_hourly")
    parts, params = [], []
    for table, column, where, piece_params in _pieces(start, end, filters, rollup):
        parts.append(f"SELECT {column} AS t, {key}, sum(send) AS send, sum(recv) AS recv "
                     f"FROM {table} WHERE {where} GROUP BY {column}, {key}")
        params += piece_params
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
    if dimension.side == "identity":
        key, joins = "identity_id", "JOIN identities AS i ON i.id = s.identity_id " + _IDENTITY_JOINS
    else:
        key, joins = "endpoint_id", "JOIN endpoints AS e ON e.id = s.endpoint_id"
    source, params = _grouped_pieces(start, end, filters, bucket, key, has_rollups(conn))
    sql = f"""SELECT s.t - s.t % {bucket:d} AS b, {dimension.expression} AS value,
        sum(s.send), sum(s.recv) FROM ({source}) AS s {joins}
        GROUP BY b, value"""
    return ranked_series(conn.execute(sql, params), start, end, bucket, top)


def ranked_series(cells, start: int, end: int, bucket: int, top: int) -> SeriesResult:
    """The SeriesResult of (bucket start, value, send, recv) cells of [start, end): the `top`
    values with most traffic (ties by value) each a Series, the rest summed in `other`."""
    first = start - start % bucket
    times = list(range(first, end, bucket))
    per_value: dict = {}
    for t, value, sent, received in cells:
        send, recv = per_value.setdefault(value, ([0] * len(times), [0] * len(times)))
        send[(t - first) // bucket] += sent
        recv[(t - first) // bucket] += received
    ranked = sorted((Series(value, send, recv) for value, (send, recv) in per_value.items()),
                    key=lambda s: (-s.total, s.value))
    rest = ranked[top:]
    other = Series(None, [sum(column) for column in zip(*(s.send for s in rest))],
                   [sum(column) for column in zip(*(s.recv for s in rest))]) if rest else None
    return SeriesResult(start, end, bucket, times, ranked[:top], other, len(ranked),
                        sum(sum(s.send) for s in ranked), sum(sum(s.recv) for s in ranked))


def has_rollups(conn: sqlite3.Connection) -> bool:
    """Whether snitch.db has the rollups of schema version 2 (store.schema). A daemon not yet
    restarted after an upgrade still writes version 1, which is read without them."""
    return conn.execute("PRAGMA user_version").fetchone()[0] >= 2


def time_bounds(conn: sqlite3.Connection) -> tuple[Optional[int], Optional[int]]:
    """Unix times of the first and last stored write window (None when empty), from the primary
    key's two ends: (min, max) in one SELECT reads the whole table (SQLite optimises a lone
    min() or max() only), ~0.5 s at 10M rows."""
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
