"""The JSON endpoints of `picosnitch dash`, over snitch.db or the central SQL server.

Every endpoint is a GET (Starlette runs these plain functions in its thread pool) answered by a
history reader: LocalHistory over a read-only snitch.db connection (store.queries), or, with
`picosnitch dash --db URL`, central.queries.ServerHistory over the central server, which adds the
dimension `host`. Both have the same methods (tab, series, bounds, first_last_seen), so the
endpoints do not care which. A server that cannot answer gives HTTP 503 with {"error": one
sentence}; the next request connects again. Query parameters:

    range=<name>   one of RANGES ("minute" ... "all"), default "hour"
    offset=<n>     whole ranges back in history (0: the latest)
    start, end     a custom window in unix seconds (instead of range and offset)
    dim=<column>   the dimension a breakdown is by (the reader's dimensions, but not "contime")
    f=<column>:<is|not>:<key>   a where/is filter; repeat for several

Values travel in two forms: `text`, safe to show (control characters, escape sequences and
undecodable bytes written as escapes; the page still inserts it as text only), and `key`, which
names the exact stored value: the hex of its bytes for text columns, the decimal number for
numeric ones. Filters name values by key, so any value, even invalid UTF-8, round-trips.
"""

from __future__ import annotations

import collections
import contextlib
import json
import select
import threading
import time
from pathlib import Path
from typing import Optional

from starlette.requests import Request
from starlette.responses import Response

from picosnitch.central.queries import SERVER_DIMENSIONS, QueryError
from picosnitch.daemon import live_feed
from picosnitch.sanitize import from_bytes, to_bytes
from picosnitch.store import queries as view_queries
from picosnitch.store.queries import Filter, History
from picosnitch.ui import text
from picosnitch.ui.annotations import Annotations
from picosnitch.ui.text import RANGES, safe, user_name

DEFAULT_RANGE = "hour"
MAX_TOP = 50
MAX_VALUES = 1000
DRILL_DOWN = ("sha256", "name", "cmdline", "pexe", "gpexe", "uid", "domain", "domain_source", "raddr", "rport",
              "lport", "container")


class BadRequest(Exception):
    """A parameter the API cannot use; str() says which."""


class JSONResponse(Response):
    """JSON with every non-ASCII character escaped (a lone surrogate cannot break it)."""

    media_type = "application/json"

    def render(self, content) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


# Every column either reader may group by (snitch.db's are the server's without `host`).
BY_COLUMN = {d.column: d for d in SERVER_DIMENSIONS}


# ---- values: text to show and a key that names them exactly ----

def key_of(column: str, value) -> str:
    if BY_COLUMN[column].is_text:
        return to_bytes(str(value)).hex()
    return str(int(value))


def value_of(column: str, key: str):
    """The stored value a key names; BadRequest when it names none."""
    try:
        if BY_COLUMN[column].is_text:
            return from_bytes(bytes.fromhex(key))
        return int(key)
    except ValueError:
        raise BadRequest(f"bad value key for {column}: {key[:40]!r}") from None


def text_of(column: str, value) -> str:
    if value is None:
        return "(other)"
    if column == "uid":
        name = user_name(int(value))
        return f"{value} ({safe(name)})" if name else str(value)
    if not BY_COLUMN[column].is_text:
        return str(value)
    return safe(value) if value != "" else "(none)"


# ---- parameters ----

def _int(params, name: str, default: Optional[int] = None) -> Optional[int]:
    raw = params.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise BadRequest(f"{name} must be an integer") from None


def breakdowns(db) -> list:
    """The dimensions reader `db` can break traffic down by (all but the entry time)."""
    return [d for d in db.dimensions if d.side != "time"]


def dimension(params, db, name: str = "dim", default: str = "exe") -> str:
    column = params.get(name) or default
    if column not in {d.column for d in breakdowns(db)}:
        raise BadRequest(f"unknown dimension {column[:40]!r}")
    return column


def filters(params, db) -> list[Filter]:
    columns = {d.column for d in breakdowns(db)}
    found = []
    for raw in params.getlist("f"):
        column, _, rest = raw.partition(":")
        op, _, key = rest.partition(":")
        if column not in columns or op not in ("is", "not"):
            raise BadRequest(f"bad filter {raw[:60]!r} (column:is|not:key)")
        found.append(Filter(column, value_of(column, key), exclude=op == "not"))
    return found


class LocalHistory(History):
    """snitch.db as the dashboard reads it: History's tabs, plus what ServerHistory also
    answers for the charts and the drill-down."""

    def series(self, column: str, start: int, end: int, filters: list[Filter],
               top: int = 10) -> view_queries.SeriesResult:
        return view_queries.series(self.conn, column, start, end, filters, 0, top)

    def first_last_seen(self, filters: list[Filter]) -> tuple[Optional[int], Optional[int]]:
        return view_queries.first_last_seen(self.conn, filters)


class Dash:
    """What the endpoints share: the history readers, GeoIP, the live feed, the options.

    `open_reader()` returns a new reader (LocalHistory or ServerHistory). A request takes an
    idle one, or opens one, and gives it back when done: each is used by one request at a time
    (with its cache of the last window), so a slow query never holds up another chart, and
    there are never more than the most requests that ever ran at once.
    """

    def __init__(self, open_reader, annotations: Optional[Annotations] = None,
                 options: Optional[dict] = None, live_socket=None):
        self.open_reader = open_reader
        self._idle: list = []
        self._lock = threading.Lock()
        self.annotations = annotations or Annotations()
        self.options = options or {}
        self.live_socket = live_socket
        self.guard_socket: Optional[Path] = None  # guard mode's prompts (ui.dash.guard), if it runs
        self.guard_db: Optional[Path] = None  # where its verdicts are, for the Guard tab
        self._live: Optional[LiveRelay] = None
        self._live_lock = threading.Lock()

    @contextlib.contextmanager
    def reader(self):
        with self._lock:
            db = self._idle.pop() if self._idle else None
        if db is None:
            db = self.open_reader()
        try:
            yield db
        finally:
            with self._lock:
                self._idle.append(db)

    def window(self, params, db) -> tuple[int, int]:
        """[start, end) from start/end, or range and offset (relative to now)."""
        start, end = _int(params, "start"), _int(params, "end")
        if start is not None or end is not None:
            if start is None or end is None or start >= end:
                raise BadRequest("a custom window needs start < end")
            return start, end
        name = params.get("range") or DEFAULT_RANGE
        lengths = dict(RANGES)
        if name not in lengths:
            raise BadRequest(f"unknown range {name[:40]!r}")
        offset = _int(params, "offset", 0) or 0
        if offset < 0:
            raise BadRequest("offset must not be negative")
        if lengths[name] is None:
            first, last = db.bounds()
            now = int(time.time())
            return (first, last + 1) if first is not None else (now, now + 1)
        start, end = text.window(name, offset, time.time())
        assert start is not None and end is not None  # a range of a length
        return start, end

    def live(self) -> "LiveRelay":
        with self._live_lock:
            if self._live is None:
                self._live = LiveRelay(self.live_socket)
            return self._live


def _rows(column: str, rows, annotations: Annotations, limit: int = MAX_VALUES) -> list[dict]:
    out = []
    for row in rows[:limit]:
        item = {"key": key_of(column, row.value), "text": text_of(column, row.value),
                "send": row.send, "recv": row.recv, "conns": row.conns}
        if column == "raddr":
            item["country"] = annotations.country(row.value)
        out.append(item)
    return out


# ---- endpoints (each takes the Dash, a reader and the request's query parameters) ----

def meta(dash: Dash, db, params) -> dict:
    first, last = db.bounds()
    return {"dimensions": [{"column": d.column, "title": d.title} for d in breakdowns(db)],
            "source": db.label,
            "ranges": [{"name": n, "seconds": s} for n, s in RANGES],
            "default_range": DEFAULT_RANGE,
            "theme": dash.options.get("theme", ""),
            "scroll_zoom": bool(dash.options.get("scroll_zoom", True)),
            "geoip": dash.annotations.geoip, "geoip_problem": dash.annotations.problem,
            "live": dash.live_socket is not None,
            "first": first, "last": last, "now": int(time.time())}


def series(dash: Dash, db, params) -> dict:
    column = dimension(params, db)
    start, end = dash.window(params, db)
    top = min(max(_int(params, "top", 10) or 10, 1), MAX_TOP)
    result = db.series(column, start, end, filters(params, db), top)
    return {"dim": column, "start": result.start, "end": result.end, "bucket": result.bucket,
            "times": result.times,
            "series": [{"key": key_of(column, s.value), "text": text_of(column, s.value),
                        "send": s.send, "recv": s.recv} for s in result.series],
            "other": ({"send": result.other.send, "recv": result.other.recv}
                      if result.other else None),
            "values": result.values, "send": result.send, "recv": result.recv}


def values(dash: Dash, db, params) -> dict:
    column = dimension(params, db)
    start, end = dash.window(params, db)
    chosen = filters(params, db)
    db.forget_window()  # "now"-relative windows move; never serve a stale one
    rows = db.tab(column, start, end, chosen)
    return {"dim": column, "start": start, "end": end, "count": len(rows),
            "values": _rows(column, rows, dash.annotations)}


def addresses(dash: Dash, db, params) -> dict:
    return values(dash, db, _Params(params, dim="raddr"))


def executable(dash: Dash, db, params) -> dict:
    """Drill-down for one executable (key=...): what it was, who ran it, where it talked."""
    key = params.get("key") or ""
    exe = value_of("exe", key)
    start, end = dash.window(params, db)
    chosen = [f for f in filters(params, db) if f.column != "exe"] + [Filter("exe", exe)]
    sections = {}
    db.forget_window()
    for column in DRILL_DOWN:
        rows = db.tab(column, start, end, chosen)
        sections[column] = _rows(column, rows, dash.annotations, 200)
    first, last = db.first_last_seen([Filter("exe", exe)])
    send = sum(r["send"] for r in sections["sha256"])
    recv = sum(r["recv"] for r in sections["sha256"])
    return {"key": key, "text": text_of("exe", exe), "start": start, "end": end,
            "first_seen": first, "last_seen": last, "send": send, "recv": recv,
            "sections": [{"column": c, "title": BY_COLUMN[c].title, "values": sections[c]}
                         for c in DRILL_DOWN]}


def live(dash: Dash, db, params) -> dict:
    """This machine's live feed (whichever history the dashboard reads)."""
    since = params.get("since")
    try:
        since = float(since) if since else 0.0
    except ValueError:
        raise BadRequest("since must be a number") from None
    relay = dash.live()
    frames, error = relay.frames(since)
    return {"frames": frames, "error": error}


class _Params:
    """Query parameters with some overridden."""

    def __init__(self, params, **fixed):
        self._params, self._fixed = params, fixed

    def get(self, name, default=None):
        return self._fixed[name] if name in self._fixed else self._params.get(name, default)

    def getlist(self, name):
        return [self._fixed[name]] if name in self._fixed else self._params.getlist(name)


# ---- the live feed, relayed to pages that poll /api/live ----

class LiveRelay:
    """Reads the daemon's live feed in a thread; keeps the last frames, safe to show."""

    KEEP = 300
    RETRY = 5.0

    def __init__(self, path):
        self.path = path
        self._frames = collections.deque(maxlen=self.KEEP)
        self._error: Optional[str] = None
        self._lock = threading.Lock()
        threading.Thread(target=self._run, daemon=True, name="live-feed").start()

    def frames(self, since: float) -> tuple[list, Optional[str]]:
        with self._lock:
            return [f for f in self._frames if f["time"] > since], self._error

    @staticmethod
    def _clean(frame: dict) -> dict:
        rates = [{"exe": safe(str(r.get("exe", ""))), "name": safe(str(r.get("name", ""))),
                  "pexe": safe(str(r.get("pexe", ""))), "pname": safe(str(r.get("pname", ""))),
                  "uid": int(r.get("uid", -1)), "send": float(r.get("send", 0)),
                  "recv": float(r.get("recv", 0))} for r in frame.get("rates", [])]
        return {"time": float(frame.get("time", 0)), "interval": float(frame.get("interval", 1)),
                "rates": rates}

    def _run(self) -> None:
        while True:
            try:
                client = live_feed.FeedClient(self.path)
            except live_feed.LiveFeedError as exc:
                with self._lock:
                    self._error = str(exc)
                time.sleep(self.RETRY)
                continue
            with self._lock:
                self._error = None
            try:
                while not client.closed:
                    select.select([client], [], [], 2.0)
                    for frame in client.read():
                        with self._lock:
                            self._frames.append(self._clean(frame))
            except (OSError, ValueError) as exc:
                with self._lock:
                    self._error = f"live feed interrupted: {exc}"
            finally:
                client.close()
            with self._lock:
                self._error = self._error or "picosnitch stopped (the live feed closed)"
            time.sleep(self.RETRY)


def alerts(dash: Dash, db, params) -> dict:
    """This machine's latest alerts (record.json), newest first, as safe text."""
    return {"alerts": [text.alert_fields(alert) for alert in dash.annotations.alerts()]}


ENDPOINTS = {"meta": meta, "series": series, "values": values, "addresses": addresses,
             "executable": executable, "live": live, "alerts": alerts}


def endpoint(dash: Dash, name: str):
    """A Starlette endpoint (a plain function: run in the thread pool) for ENDPOINTS[name]."""
    handler = ENDPOINTS[name]

    def run(request: Request) -> Response:
        try:
            with dash.reader() as db:
                return JSONResponse(handler(dash, db, request.query_params))
        except BadRequest as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        except QueryError as exc:  # the central server is down or refuses: say so, retry later
            return JSONResponse({"error": str(exc)}, status_code=503)

    return run
