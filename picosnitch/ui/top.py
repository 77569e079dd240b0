"""`picosnitch top`: live send/receive rates per executable, like nethogs, in curses.

It reads the daemon's live feed (live_feed.FeedClient), one frame a second. Each line is one
(executable, name, parent, user); it shows the current rates and what it sent and received since
`top` started. Keys: s/S sort column, p or space pause, u/U units, arrows/PgUp/PgDn scroll,
q quit. Values are made safe and fitted as in `picosnitch view` (ui.text).
"""

from __future__ import annotations

import curses
import dataclasses
import select
import time
from dataclasses import dataclass

from picosnitch.daemon.live_feed import KEY_FIELDS, FeedClient, LiveFeedError
from picosnitch.paths import Paths
from picosnitch.ui import terminal
from picosnitch.ui.terminal import put
from picosnitch.ui.text import UNITS, fit, format_bytes, safe, show_value

# (title, key of a Line) in the order s cycles through them
SORTS = (("send/s", "send"), ("recv/s", "recv"), ("sent", "sent"), ("received", "received"),
         ("program", "name"))


@dataclass
class Line:
    """One identity: its latest rates and its totals since `top` started."""

    exe: str
    name: str
    pexe: str
    pname: str
    uid: int
    send: float = 0.0
    recv: float = 0.0
    sent: float = 0.0
    received: float = 0.0


class Rates:
    """The lines, updated by each frame of the feed."""

    def __init__(self):
        self.lines: dict[tuple, Line] = {}
        self.frames = 0

    def apply(self, frame: dict) -> None:
        for line in self.lines.values():
            line.send = line.recv = 0.0
        for rate in frame["rates"]:
            key = tuple(rate[f] for f in KEY_FIELDS)
            found = self.lines.get(key)
            line = found if found is not None else self.lines.setdefault(key, Line(*key))
            line.send, line.recv = rate["send"], rate["recv"]
            line.sent += rate["send"] * frame["interval"]
            line.received += rate["recv"] * frame["interval"]
        self.frames += 1

    def sorted(self, sort: str) -> list[Line]:
        if sort == "name":
            return sorted(self.lines.values(), key=lambda l: (l.name, l.exe))
        return sorted(self.lines.values(), key=lambda l: (-getattr(l, sort), l.name, l.exe))


class TopUI:
    """The curses screen over a FeedClient."""

    def __init__(self, screen, client: FeedClient):
        self.screen = screen
        self.client = client
        self.rates = Rates()
        self.shown: list[Line] = []
        self.sort = 0
        self.unit = 0
        self.paused = False
        self.top = 0

    def handle(self, key) -> bool:
        """Act on a key; False to quit."""
        if key == "q":
            return False
        if key == curses.KEY_RESIZE:
            self.screen.clear()  # repaint everything at the new size
        if key in ("s", "S"):
            self.sort = (self.sort + (1 if key == "s" else -1)) % len(SORTS)
        elif key in ("p", " "):
            self.paused = not self.paused
        elif key in ("u", "U"):
            self.unit = (self.unit + (1 if key == "u" else -1)) % len(UNITS)
        elif key == curses.KEY_DOWN:
            self.top = min(self.top + 1, max(len(self.shown) - 1, 0))
        elif key == curses.KEY_UP:
            self.top = max(self.top - 1, 0)
        elif key == curses.KEY_NPAGE:
            self.top = min(self.top + self.screen.getmaxyx()[0] - 3, max(len(self.shown) - 1, 0))
        elif key == curses.KEY_PPAGE:
            self.top = max(self.top - self.screen.getmaxyx()[0] + 3, 0)
        return True

    def update(self) -> None:
        for frame in self.client.read():
            self.rates.apply(frame)
        if not self.paused:
            # copies: the lines change with every frame, the screen must not while paused
            self.shown = [dataclasses.replace(l) for l in self.rates.sorted(SORTS[self.sort][1])]

    def draw(self) -> None:
        self.screen.erase()
        height, width = self.screen.getmaxyx()
        if height < 4 or width < 30:
            put(self.screen, 0, 0, fit("window too small", max(width - 1, 0)))
            self.screen.refresh()
            return
        state = "PAUSED" if self.paused else time.strftime("%H:%M:%S")
        if self.client.closed:
            state = "live feed closed (picosnitch stopped?)"
        title = (f"picosnitch top │ {state} │ sort: {SORTS[self.sort][0]} │ "
                 f"units: {UNITS[self.unit]} │ s sort  p pause  u units  q quit")
        put(self.screen, 0, 0, fit(title, width - 1), curses.A_BOLD)
        columns = ("send/s", "recv/s", "sent", "received")
        head = " ".join(fit(c, 10, True) for c in columns) + "  " + fit("user", 8) + " program"
        put(self.screen, 1, 0, fit(head + "  ← parent", width - 1), curses.A_UNDERLINE)
        unit = UNITS[self.unit]
        if not self.shown:
            put(self.screen, 2, 0, fit("no traffic yet", width - 1))
        for y, line in enumerate(self.shown[self.top: self.top + height - 2], start=2):
            numbers = " ".join(fit(format_bytes(value, unit), 10, True) for value in
                               (line.send, line.recv, line.sent, line.received))
            user = fit(show_value("uid", line.uid), 8)
            who = (f"{safe(line.name)} {safe(line.exe)}  ← {safe(line.pname)} "
                   f"{safe(line.pexe)}")
            put(self.screen, y, 0, fit(f"{numbers}  {user} {who}", width - 1))
        self.screen.refresh()

    def run(self) -> None:
        curses.curs_set(0)
        self.screen.keypad(True)
        self.screen.timeout(0)
        while True:
            self.update()
            self.draw()
            select.select([self.client] if not self.client.closed else [], [], [], 0.5)
            try:
                key = self.screen.get_wch()
            except curses.error:  # no key pressed
                continue
            if not self.handle(key):
                return


def main(paths: Paths) -> int:
    """Run the UI; a daemon that does not run or a feed that cannot be read is one sentence."""
    try:
        client = FeedClient(paths.live_socket)
    except LiveFeedError as exc:
        print(f"picosnitch top: {exc}")
        return 1
    try:
        return terminal.run("top", lambda screen: TopUI(screen, client).run())
    finally:
        client.close()
