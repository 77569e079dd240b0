"""`picosnitch view`: browse the history in snitch.db in a curses terminal UI.

One tab per column of the `connections` view (view_queries.DIMENSIONS); each lists the values
seen in the time window with their sent and received bytes and connection counts, most traffic
first. Filtering on an entry narrows every tab to it, so the other tabs break it down. It only
reads snitch.db (and record.json, config.json and an optional GeoIP database), never as root
by necessity.

Every value shown went through `safe` and `fit`: control characters, escape sequences, invalid
UTF-8 and Unicode format characters are written as escapes, and a value never takes more cells
than its column, so hostile process names cannot break the screen.
"""

from __future__ import annotations

import curses
import grp
import json
import locale
import os
import pwd
import stat
import time
import unicodedata
from dataclasses import dataclass, field
from typing import Callable, Optional

from picosnitch import config as config_module
from picosnitch import record_keeper
from picosnitch.paths import Paths
from picosnitch.sanitize import printable
from picosnitch.sqlite_store import open_readonly
from picosnitch.server_queries import QueryError
from picosnitch.view_queries import DIMENSIONS, HOUR, Dimension, Filter, History, Row, bucket_width

# ---- text that is safe to show and fits its cells (also used by top_tui) ----

_ESCAPED_CATEGORIES = {"Cf", "Zl", "Zp", "Co", "Cn", "Cs"}
_ZERO_WIDTH_CATEGORIES = {"Mn", "Me"}


def _char_cells(char: str) -> int:
    if unicodedata.category(char) in _ZERO_WIDTH_CATEGORIES:
        return 0
    return 2 if unicodedata.east_asian_width(char) in ("W", "F") else 1


def safe(value: str) -> str:
    """`value` with anything that could steer a terminal written as an escape.

    Beyond sanitize.printable (controls, undecodable bytes): format characters such as
    right-to-left overrides, line/paragraph separators, private-use and unassigned code points.
    """
    text = printable(value)
    if text.isascii():
        return text
    return "".join(f"\\u{ord(c):04x}" if unicodedata.category(c) in _ESCAPED_CATEGORIES else c
                   for c in text)


def cells(text: str) -> int:
    """How many terminal cells already-safe `text` takes (wide characters take two)."""
    return len(text) if text.isascii() else sum(_char_cells(c) for c in text)


def fit(text: str, width: int, align_right: bool = False) -> str:
    """Already-safe `text` cut (ending in an ellipsis) or padded to exactly `width` cells."""
    if width <= 0:
        return ""
    if cells(text) > width:
        out, used = [], 0
        for char in text:
            size = _char_cells(char)
            if used + size > width - 1:
                break
            out.append(char)
            used += size
        text = "".join(out) + "…"
    padding = " " * (width - cells(text))
    return padding + text if align_right else text + padding


_SIZES = {"B": 1, "kB": 10**3, "MB": 10**6, "GB": 10**9, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}
UNITS = ("auto", "B", "kB", "MB", "GB", "KiB", "MiB", "GiB")


def format_bytes(count: float, unit: str) -> str:
    """`count` bytes in `unit` (one of UNITS); "auto" picks the largest decimal unit that fits."""
    if unit == "auto":
        unit = next((u for u in ("GB", "MB", "kB") if count >= _SIZES[u]), "B")
    if unit == "B":
        return f"{round(count)} B"
    return f"{count / _SIZES[unit]:.1f} {unit}"


def put(screen, y: int, x: int, text: str, attr: int = 0) -> None:
    """Write already-fitted text, ignoring the error curses raises for the last cell."""
    try:
        screen.addstr(y, x, text, attr)
    except curses.error:
        pass


# ---- time windows ----

# (name, length in seconds); None is everything stored.
RANGES = (("minute", 60), ("10 minutes", 600), ("hour", HOUR), ("6 hours", 6 * HOUR),
          ("day", 24 * HOUR), ("week", 7 * 24 * HOUR), ("month", 30 * 24 * HOUR),
          ("year", 365 * 24 * HOUR), ("all", None))
DEFAULT_RANGE = "all"


def window(range_name: str, offset: int, now: float) -> tuple[Optional[int], Optional[int]]:
    """[start, end) of range `range_name`, `offset` whole ranges back from `now`."""
    length = dict(RANGES)[range_name]
    if length is None:
        return None, None
    end = int(now) + 1 - offset * length
    return end - length, end


def local_time(ts: Optional[int]) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts is not None else "…"


# ---- what is shown next to values: country of an address, VirusTotal status of a hash ----

class Annotations:
    """GeoIP countries (optional maxminddb + a configured mmdb) and VirusTotal statuses.

    A configured GeoIP database that cannot be used turns GeoIP off and leaves one sentence in
    `problem` for the UI to show; nothing here raises over it.
    """

    def __init__(self, geoip_path: str = "", vt_status: Optional[dict] = None):
        self.vt_status = vt_status or {}
        self.problem = ""
        self._reader = None
        self._geoip_path = geoip_path
        if geoip_path:
            self._open_geoip()

    def _open_geoip(self) -> None:
        shown = printable(self._geoip_path)
        try:
            import maxminddb  # optional extra [geoip]
        except ImportError:
            self.problem = (f"GeoIP off: reading {shown} needs the Python package maxminddb "
                            "(the geoip extra, or Debian's python3-maxminddb)")
            return
        try:
            self._reader = maxminddb.open_database(self._geoip_path)
        except OSError as exc:
            self.problem = f"GeoIP off: cannot read {shown}: {exc.strerror or exc}"
        except (maxminddb.InvalidDatabaseError, ValueError):  # ValueError: an empty file
            self.problem = f"GeoIP off: {shown} is not a MaxMind DB (.mmdb) file"

    @property
    def geoip(self) -> bool:
        """Whether countries are looked up."""
        return self._reader is not None

    @classmethod
    def load(cls, paths: Paths) -> "Annotations":
        """From config.json (defaults if unreadable) and record.json (nothing if unreadable)."""
        try:
            cfg = config_module.load(paths.config)
        except config_module.ConfigError:
            cfg = config_module.defaults()
        geoip = cfg["GeoIP database"] if cfg["GeoIP lookup"] else ""
        statuses = {}
        try:
            record = json.loads(paths.record.read_bytes())
            for hashes in record.get(record_keeper.SHA256_BY_EXE, {}).values():
                statuses.update(hashes)
        except (OSError, ValueError, AttributeError):
            pass
        return cls(geoip, statuses)

    def country(self, address: str) -> str:
        """The ISO code of `address`'s country ("" when unknown or GeoIP is off)."""
        if self._reader is None or not address:
            return ""
        try:
            found = self._reader.get(address)
        except ValueError:  # not an IP address
            return ""
        except Exception:  # the reader's errors for a damaged file; GeoIP is optional, stop it
            self._reader = None  # not closed: another dash thread may be reading it
            self.problem = f"GeoIP off: {printable(self._geoip_path)} is damaged (a lookup failed)"
            return ""
        if not isinstance(found, dict):
            return ""
        country = found.get("country") or found.get("registered_country") or {}
        return str(country.get("iso_code", "")) if isinstance(country, dict) else ""

    def note(self, column: str, value: object) -> str:
        """Text shown after `value` in tab `column` ("" for none)."""
        if column == "raddr" and isinstance(value, str):
            country = self.country(value)
            return f" [{country}]" if country else ""
        if column.endswith("sha256") and value in self.vt_status:
            return f"[VT: {self.vt_status[value]}]"
        return ""


def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except (KeyError, OverflowError):
        return "?"


def show_value(column: str, value: object, width: int = 0) -> str:
    """A tab value as displayed (safe text). `width` is the entry-time bucket length."""
    if column == "contime":
        shown = local_time(int(value))
        return shown[:13] + ":00 (hour)" if width == HOUR else shown
    if column == "uid":
        return f"{value} ({user_name(value)})" if value >= 0 else f"{value} (unknown)"
    if value == "":
        return "(none)"
    return safe(str(value))


# ---- the state of the screen, without curses (so it can be reasoned about and tested) ----

@dataclass
class State:
    """Everything the keys change; `rows` is what the current tab shows."""

    tab: int = 0
    range_index: int = [name for name, _ in RANGES].index(DEFAULT_RANGE)
    offset: int = 0
    unit: int = 0
    filters: list[Filter] = field(default_factory=list)
    now: float = field(default_factory=time.time)
    rows: list[Row] = field(default_factory=list)
    cursor: int = 0
    top: int = 0
    search: str = ""
    message: str = ""
    dimensions: tuple[Dimension, ...] = DIMENSIONS  # the tabs (the central server adds host)

    @property
    def column(self) -> str:
        return self.dimensions[self.tab].column

    @property
    def range_name(self) -> str:
        return RANGES[self.range_index][0]

    def window(self) -> tuple[Optional[int], Optional[int]]:
        return window(self.range_name, self.offset, self.now)


HELP = """\
picosnitch view: the traffic in snitch.db, by executable, address, user, ...

  Left/Right        previous/next tab            Up/Down PgUp/PgDn Home/End  move
  space/Enter/f     filter on the entry, then show the next tab (breaks it down)
  e                 exclude the entry
  Backspace/F/E     remove the last filter
  h / H             one time range back / forward in history
  t / T             next / previous time range (minute ... all)
  u / U             next / previous byte unit
  / then n          search the values of this tab; n finds the next match
  r                 refresh (re-read snitch.db, move "now")
  g                 guard mode's latest verdicts (allowed/denied, by rule, user, timeout)
  ?                 this help                     q  quit

conns counts distinct connections (process x local and remote address and port).
Values are shown with escapes for control characters and invalid UTF-8 (\\xNN, \\uNNNN).
Press any key to go back."""


class ViewUI:
    """The curses screen over a History."""

    HEADER_LINES = 4

    def __init__(self, screen, history: History, annotations: Annotations):
        self.screen = screen
        self.history = history
        self.annotations = annotations
        self.state = State(dimensions=history.dimensions)
        self.showing_help = False
        self.showing_guard = False  # guard mode's verdicts (picosnitch/guard/view_guard.py)
        self.keys: dict[object, Callable[[], None]] = {
            curses.KEY_LEFT: lambda: self.switch_tab(-1),
            curses.KEY_RIGHT: lambda: self.switch_tab(1),
            curses.KEY_UP: lambda: self.move(-1), curses.KEY_DOWN: lambda: self.move(1),
            curses.KEY_PPAGE: lambda: self.move(-self.page()),
            curses.KEY_NPAGE: lambda: self.move(self.page()),
            curses.KEY_HOME: lambda: self.move(-len(self.state.rows)),
            curses.KEY_END: lambda: self.move(len(self.state.rows)),
            " ": self.filter, "\n": self.filter, "\r": self.filter, curses.KEY_ENTER: self.filter,
            "f": self.filter, "e": lambda: self.filter(exclude=True),
            curses.KEY_BACKSPACE: self.unfilter, "\x7f": self.unfilter, "\b": self.unfilter,
            "F": self.unfilter, "E": self.unfilter,
            "h": lambda: self.step_history(1), "H": lambda: self.step_history(-1),
            "t": lambda: self.cycle_range(1), "T": lambda: self.cycle_range(-1),
            "u": lambda: self.cycle_unit(1), "U": lambda: self.cycle_unit(-1),
            "r": self.refresh, "/": self.ask_search, "n": self.next_match,
            "?": self.show_help, curses.KEY_RESIZE: self.screen.clear,
            "g": self.show_guard,
        }

    # -- data --

    def load(self) -> None:
        s = self.state
        start, end = s.window()
        try:
            s.rows = self.history.tab(s.column, start, end, s.filters)
        except QueryError as error:  # the central server went away: say so, keep running
            s.rows = []
            s.message = f"{safe(str(error))} (r: retry)"
        s.cursor = min(s.cursor, max(len(s.rows) - 1, 0))

    def refresh(self, keep_time: bool = False) -> None:
        if not keep_time:
            self.state.now = time.time()
            self.history.forget_window()
        self.load()

    # -- actions --

    def switch_tab(self, step: int) -> None:
        self.state.tab = (self.state.tab + step) % len(self.state.dimensions)
        self.state.cursor = self.state.top = 0
        self.load()

    def move(self, step: int) -> None:
        s = self.state
        s.cursor = max(0, min(s.cursor + step, len(s.rows) - 1))

    def page(self) -> int:
        return max(self.screen.getmaxyx()[0] - self.HEADER_LINES - 1, 1)

    def filter(self, exclude: bool = False) -> None:
        s = self.state
        if not s.rows:
            return
        # An entry-time value is an hour of the rollup, or exactly one stored write window.
        width = (bucket_width(*s.window()) or 1) if s.column == "contime" else 0
        s.filters.append(Filter(s.column, s.rows[s.cursor].value, exclude, width))
        if not exclude:
            s.tab = (s.tab + 1) % len(s.dimensions)
        s.cursor = s.top = 0
        self.load()

    def unfilter(self) -> None:
        if self.state.filters:
            self.state.filters.pop()
            self.state.cursor = self.state.top = 0
            self.load()

    def step_history(self, step: int) -> None:
        s = self.state
        if dict(RANGES)[s.range_name] is None:
            s.message = "history steps need a time range other than all (t/T)"
            return
        s.offset = max(0, s.offset + step)
        s.cursor = s.top = 0
        self.refresh()

    def cycle_range(self, step: int) -> None:
        s = self.state
        s.range_index = (s.range_index + step) % len(RANGES)
        s.offset = 0
        s.cursor = s.top = 0
        self.refresh()

    def cycle_unit(self, step: int) -> None:
        self.state.unit = (self.state.unit + step) % len(UNITS)

    def ask_search(self) -> None:
        text = self.read_line("/")
        if text is not None:
            self.state.search = text.strip()
            self.next_match(from_current=True)

    def read_line(self, prompt: str) -> Optional[str]:
        """A line typed on the bottom row (Enter ends it, Esc gives None).

        Read key by key rather than with curses' getstr, which ends the line early, as if
        Enter were typed, on a terminal resize, so the rest of the typing became commands.
        """
        text = ""
        while True:
            height, width = self.screen.getmaxyx()
            shown = safe(prompt + text)[-max(width - 2, 1):]  # the end, where typing happens
            put(self.screen, height - 1, 0, fit(shown, width - 1), curses.A_BOLD)
            self.screen.move(height - 1, min(cells(shown), width - 2))
            curses.curs_set(1)
            try:
                key = self.screen.get_wch()
            except curses.error:  # no key after all (an interrupted read): keep waiting
                continue
            finally:
                curses.curs_set(0)
            if key in ("\n", "\r", curses.KEY_ENTER):
                return text
            if key == "\x1b":
                return None
            if key in (curses.KEY_BACKSPACE, "\x7f", "\b"):
                text = text[:-1]
            elif isinstance(key, str) and key.isprintable():
                text += key
            elif key == curses.KEY_RESIZE:
                self.draw()

    def next_match(self, from_current: bool = False) -> None:
        s = self.state
        if not s.search:
            return
        needle = s.search.casefold()
        count = len(s.rows)
        first = s.cursor if from_current else s.cursor + 1
        for i in range(count):
            index = (first + i) % count
            if needle in self.describe(s.rows[index]).casefold():
                s.cursor = index
                return
        s.message = f"not found: {safe(s.search)}"

    def show_help(self) -> None:
        self.showing_help = True

    def show_guard(self) -> None:
        self.showing_guard = True

    def describe(self, row: Row) -> str:
        s = self.state
        width = bucket_width(*s.window()) if s.column == "contime" else 0
        shown = show_value(s.column, row.value, width)
        note = safe(self.annotations.note(s.column, row.value))
        # a hash's status goes first: 64 hex digits would push it off a narrow screen
        return f"{note} {shown}" if note and s.column.endswith("sha256") else shown + note

    # -- drawing --

    def draw(self) -> None:
        self.screen.erase()
        height, width = self.screen.getmaxyx()
        if height < 6 or width < 30:
            put(self.screen, 0, 0, fit("window too small", max(width - 1, 0)))
            self.screen.refresh()
            return
        if self.showing_help or self.showing_guard:
            from picosnitch.guard import view_guard
            text = HELP.splitlines() if self.showing_help else view_guard.lines(
                getattr(self.history, "conn", None) if not self.history.label else None, height - 3)
            for y, line in enumerate(text[: height - 1]):
                put(self.screen, y, 0, fit(line, width - 1))
            self.screen.refresh()
            return
        widths = self.number_widths()  # one pass over the tab's rows, for header and rows
        self._draw_header(width, widths)
        self._draw_rows(height, width, widths)
        self._draw_footer(height, width)
        self.screen.refresh()

    def _draw_header(self, width: int, widths: tuple) -> None:
        s = self.state
        start, end = s.window()
        when = "all time" if start is None else f"{local_time(start)} → {local_time(end)}"
        history = f"  (history -{s.offset})" if s.offset else ""
        title = (f"picosnitch view │ range: {s.range_name}{history} │ {when} │ "
                 f"units: {UNITS[s.unit]}")
        if self.history.label:
            title += f" │ server: {safe(self.history.label)}"
        put(self.screen, 0, 0, fit(title, width - 1), curses.A_BOLD)
        self._draw_tabs(1, width)
        described = []
        for f in s.filters:
            shown = show_value(f.column, f.value, f.width if f.width == HOUR else 0)
            title = next(d.title for d in s.dimensions if d.column == f.column)
            described.append(f"{title} {'≠' if f.exclude else '='} {shown}")
        line = "filters: " + (" · ".join(described) if described else "none")
        put(self.screen, 2, 0, fit(line, width - 1), curses.A_BOLD if described else 0)
        title = s.dimensions[s.tab].title
        sent, received, conns = widths
        head = f"{fit('sent', sent, True)} {fit('received', received, True)} {fit('conns', conns, True)}  "
        put(self.screen, 3, 0, fit(head + title, width - 1), curses.A_UNDERLINE)

    def _draw_tabs(self, y: int, width: int) -> None:
        """The tab titles on one line, scrolled so the current one shows, current reversed."""
        titles = [f" {d.title} " for d in self.state.dimensions]
        first = self.state.tab
        used = cells(titles[first])
        while first > 0 and used + cells(titles[first - 1]) + 4 <= width - 1:
            first -= 1
            used += cells(titles[first])
        x = 0
        if first > 0:
            put(self.screen, y, 0, "◀ ")
            x = 2
        for index in range(first, len(titles)):
            text = titles[index]
            room = width - 1 - x - (2 if index < len(titles) - 1 else 0)
            if cells(text) > room:
                put(self.screen, y, x, fit("▶", max(width - 1 - x, 0)))
                break
            attr = curses.A_REVERSE if index == self.state.tab else 0
            put(self.screen, y, x, text, attr)
            x += cells(text)
            if index < len(titles) - 1:
                put(self.screen, y, x, "│")
                x += 1

    def number_widths(self) -> tuple:
        """Widths of the sent, received and conns columns: wide enough for every row of the tab
        (the largest value is the widest), so a number is never cut and columns stay put while
        scrolling."""
        rows, unit = self.state.rows, UNITS[self.state.unit]
        if not rows:
            return 11, 11, 7
        return (max(11, cells(format_bytes(max(r.send for r in rows), unit))),
                max(11, cells(format_bytes(max(r.recv for r in rows), unit))),
                max(7, len(str(max(r.conns for r in rows)))))

    def _draw_rows(self, height: int, width: int, widths: tuple) -> None:
        s = self.state
        visible = height - self.HEADER_LINES - 1
        if s.cursor < s.top:
            s.top = s.cursor
        elif s.cursor >= s.top + visible:
            s.top = s.cursor - visible + 1
        if not s.rows:
            put(self.screen, self.HEADER_LINES, 0,
                fit("no traffic in this window (t/T: time range, Backspace: remove a filter)",
                    width - 1))
        unit = UNITS[s.unit]
        sent, received, conns = widths
        for line, row in enumerate(s.rows[s.top: s.top + visible]):
            numbers = (f"{fit(format_bytes(row.send, unit), sent, True)} "
                       f"{fit(format_bytes(row.recv, unit), received, True)} "
                       f"{fit(str(row.conns), conns, True)}  ")
            text = fit(numbers + self.describe(row), width - 1)
            attr = curses.A_REVERSE if s.top + line == s.cursor else 0
            put(self.screen, self.HEADER_LINES + line, 0, text, attr)

    def _draw_footer(self, height: int, width: int) -> None:
        s = self.state
        where = f"{s.cursor + 1 if s.rows else 0}/{len(s.rows)}"
        # a GeoIP problem stays in view until it is fixed, as countries stay missing
        hint = s.message or self.annotations.problem or (
            "←/→ tabs  ↵ filter  e exclude  ⌫ unfilter  h/H history  t/T range  "
            "u/U units  / search  ? help  q quit")
        put(self.screen, height - 1, 0, fit(f"{where}  {hint}", width - 1), curses.A_DIM)

    # -- the loop --

    def run(self) -> None:
        curses.curs_set(0)
        self.screen.keypad(True)
        self.load()
        while True:
            self.draw()
            key = self.screen.get_wch()
            self.state.message = ""
            if self.showing_help or self.showing_guard:
                self.showing_help = self.showing_guard = False
                continue
            if key == "q":
                return
            action = self.keys.get(key)
            if action:
                action()


def ownership(path) -> str:
    """Who may read `path` (or its nearest visible parent), to say what access is missing."""
    for candidate in (path, *path.parents):
        try:
            st = os.stat(candidate)
        except OSError:
            continue
        try:
            user = pwd.getpwuid(st.st_uid).pw_name
        except KeyError:
            user = str(st.st_uid)
        try:
            group = grp.getgrgid(st.st_gid).gr_name
        except KeyError:
            group = str(st.st_gid)
        return (f"; {candidate} is {stat.filemode(st.st_mode)}, user {user}, group {group}: "
                f"run as that user, join group {group}, or ask root to widen the mode")
    return ""


def _open_server(target: str, paths: Paths):
    """A ServerHistory for `target` (a URL, or "config"); the first read checks it works."""
    from picosnitch.server_queries import server_readers
    history = server_readers(target, paths.config)()
    history.bounds()
    return history


def main(paths: Paths, db: Optional[str] = None) -> int:
    """Run the UI; returns an exit status. Errors opening snitch.db are one plain sentence.

    `db` is a central server's URL (or "config" for config.json's "DB sql server") to browse
    instead of this machine's snitch.db.
    """
    if db is not None:
        from picosnitch.central_db import CentralError
        try:
            history = _open_server(db, paths)
        except (CentralError, QueryError) as exc:
            print(f"picosnitch view: {printable(str(exc))}")
            return 1
        close = history.close
    else:
        try:
            conn = open_readonly(str(paths.db))
        except FileNotFoundError as exc:
            print(f"picosnitch view: {printable(str(exc))}")
            return 1
        except PermissionError as exc:
            print(f"picosnitch view: {printable(str(exc))}{ownership(paths.db)}")
            return 1
        history = History(conn)
        close = conn.close
    locale.setlocale(locale.LC_ALL, "")
    annotations = Annotations.load(paths)
    try:
        curses.wrapper(lambda screen: ViewUI(screen, history, annotations).run())
    except KeyboardInterrupt:
        pass
    finally:
        close()
    return 0
