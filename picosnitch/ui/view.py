"""`picosnitch view`: browse the history in snitch.db in a curses terminal UI.

One tab per column of the `connections` view (store.queries.DIMENSIONS); each lists the values
seen in the time window with their sent and received bytes and connection counts, most traffic
first. Filtering on an entry narrows every tab to it, so the other tabs break it down. It only
reads snitch.db (and record.json, config.json and an optional GeoIP database), never as root
by necessity.

Every value shown went through `safe` and `fit` (ui.text): control characters, escape sequences, invalid
UTF-8 and Unicode format characters are written as escapes, and a value never takes more cells
than its column, so hostile process names cannot break the screen.
"""

from __future__ import annotations

import curses
import grp
import os
import pwd
import stat
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from picosnitch.central.queries import QueryError
from picosnitch.config import Config
from picosnitch.paths import Paths
from picosnitch.sanitize import printable
from picosnitch.store.queries import DIMENSIONS, HOUR, Dimension, Filter, History, Row, bucket_width
from picosnitch.store.sqlite import open_readonly
from picosnitch.timestamps import local_time
from picosnitch.ui import terminal
from picosnitch.ui.annotations import Annotations
from picosnitch.ui.terminal import put
from picosnitch.ui.text import RANGES, UNITS, alert_line, cells, fit, format_bytes, safe, show_value, window

DEFAULT_RANGE = "all"


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
  a                 the latest alerts (new domains, countries, ports, listeners, spikes)
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
        self.alerts: Optional[list[str]] = None  # the alerts screen's lines while it shows
        self.alerts_top = 0  # the first alert shown (the list scrolls)
        self.showing_guard = False  # guard mode's verdicts (picosnitch/ui/verdicts.py)
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
            "?": self.show_help, "a": self.show_alerts, curses.KEY_RESIZE: self.screen.clear,
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

    def show_alerts(self) -> None:
        found = self.annotations.alerts()
        self.alerts = [f"picosnitch view │ alerts: {len(found)} (newest first; ↑ ↓ PgUp PgDn scroll, any other "
                       "key goes back)"]
        self.alerts += [alert_line(alert) for alert in found] or ["no alerts (see picosnitch baseline)"]
        self.alerts_top = 0

    def scroll_alerts(self, key) -> bool:
        """Move the alerts list for a scrolling key; False for any other key."""
        assert self.alerts is not None
        steps = {curses.KEY_UP: -1, curses.KEY_DOWN: 1, curses.KEY_PPAGE: -self.page(), curses.KEY_NPAGE: self.page(),
                 curses.KEY_HOME: -len(self.alerts), curses.KEY_END: len(self.alerts)}
        if key not in steps:
            return False
        shown = max(self.screen.getmaxyx()[0] - 2, 1)  # below the title line
        self.alerts_top = min(max(self.alerts_top + steps[key], 0), max(len(self.alerts) - 1 - shown, 0))
        return True

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
        if self.showing_help or self.showing_guard or self.alerts is not None:
            if self.alerts is not None:
                text = self.alerts[:1] + self.alerts[1 + self.alerts_top:]
            elif self.showing_help:
                text = HELP.splitlines()
            else:
                from picosnitch.ui import verdicts
                text = verdicts.lines(getattr(self.history, "conn", None) if not self.history.label else None,
                                      height - 3)
            for y, line in enumerate(text[: height - 1]):
                put(self.screen, y, 0, fit(line, width - 1), curses.A_BOLD if self.alerts and y == 0 else 0)
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
        when = "all time" if start is None or end is None else f"{local_time(start)} → {local_time(end)}"
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
            "u/U units  / search  a alerts  ? help  q quit")
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
            if self.alerts is not None and self.scroll_alerts(key):
                continue
            if self.showing_help or self.showing_guard or self.alerts is not None:
                self.showing_help = self.showing_guard = False
                self.alerts = None
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


def _open_server(target: str, paths: Paths, cfg: Config):
    """A ServerHistory for `target` (a URL, or "config"); the first read checks it works."""
    from picosnitch.central.queries import server_readers
    history = server_readers(target, cfg)()
    history.bounds()
    return history


def main(paths: Paths, cfg: Config, db: Optional[str] = None) -> int:
    """Run the UI; returns an exit status. Errors opening snitch.db are one plain sentence.

    `cfg` is config.json's settings, as the CLI read them. `db` is a central server's URL (or
    "config" for config.json's "DB sql server") to browse instead of this machine's snitch.db.
    """
    if db is not None:
        from picosnitch.central.connect import CentralError
        try:
            history = _open_server(db, paths, cfg)
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
    try:
        annotations = Annotations.load(paths, cfg)
        return terminal.run("view", lambda screen: ViewUI(screen, history, annotations).run())
    finally:
        close()
