"""`picosnitch prompt`: answer guard mode's prompts from the keyboard, one at a time.

The oldest waiting prompt is shown; keys (ignored for the first half second a prompt is shown,
so that typing meant for something else does not answer it):

    y allow   n deny        o once (default)  1 / 3 / 9 minutes  2 24 hours  r until restart  f forever
    d this domain <-> every name under it      p this port <-> any port      a this program <-> any
    q quit
"""

from __future__ import annotations

import curses
import locale
import select
import sys
import time
from typing import Dict, List, Optional

from picosnitch.guard.engine import INPUT_GRACE
from picosnitch.guard.prompt_socket import PromptClient
from picosnitch.sanitize import printable

DURATIONS = {"o": "once", "1": "1", "3": "3", "9": "9", "2": "1440", "r": "restart", "f": "forever"}
DURATION_NAMES = {"once": "once", "1": "1 minute", "3": "3 minutes", "9": "9 minutes", "1440": "24 hours",
                  "restart": "until restart", "forever": "forever"}


def whole_domain(domain: str) -> str:
    labels = domain.rstrip(".").split(".")
    return "*." + ".".join(labels[-2:])


def lines_for(prompt: dict, choice: dict, now: float, width: int) -> List[str]:
    """The text of one prompt and the answer being put together."""
    p = prompt
    port = p["rport"] if p["direction"] == "out" else p["lport"]
    arrow = "to" if p["direction"] == "out" else "from"
    name = p["domain"] or "(no name)"
    where = "%s %s %s port %s %s" % (("outgoing" if p["direction"] == "out" else "incoming"), arrow, p["raddr"],
                                      port, p["protocol"])
    country = (" [%s]" % p["country"]) if p.get("country") else ""
    lines = [
        "%s%s" % (where, country),
        "  name     %s  (%s)" % (name, p.get("domain_source", "")),
        "  program  %s  (pid %s, user %s)" % (p["exe"], p["pid"] or "?", p.get("user", p["uid"])),
        "  sha256   %s  (%s)" % (p["sha256"], p.get("sha256_state", "")),
        "  command  %s" % p["cmdline"],
        "  parent   %s  %s" % (p["parent"], p["parent_cmdline"]),
        "  waiting  %d connection%s, %d s left" % (p["connections"], "" if p["connections"] == 1 else "s",
                                                   max(0, int(p["deadline"] - now))),
        "",
        "  answer   %s, %s, %s, %s" % (
            DURATION_NAMES.get(choice["duration"], choice["duration"]),
            ("any program" if choice["any_program"] else "this program"),
            (whole_domain(p["domain"]) if choice["whole_domain"] and p["domain"] else (p["domain"] or p["raddr"])),
            ("any port" if choice["any_port"] else "port %s" % port)),
        "",
        "  y allow  n deny   o once  1/3/9 minutes  2 24 h  r until restart  f forever",
        "  d domain/every name under it  p this port/any port  a this program/any  q quit",
    ]
    return [printable(line)[:max(width - 1, 1)] for line in lines]


class PromptUI:
    def __init__(self, screen, client: PromptClient):
        self.screen, self.client = screen, client
        self.prompts: List[dict] = []
        self.shown: Dict[int, float] = {}  # prompt id -> when it was first shown here
        self.choice = self.fresh_choice()
        self.message = ""

    @staticmethod
    def fresh_choice() -> dict:
        return {"duration": "once", "whole_domain": False, "any_port": False, "any_program": False}

    def current(self) -> Optional[dict]:
        return min(self.prompts, key=lambda p: p["id"]) if self.prompts else None

    def draw(self) -> None:
        self.screen.erase()
        height, width = self.screen.getmaxyx()
        now = time.time()
        prompt = self.current()
        title = "picosnitch prompt: %d waiting" % len(self.prompts)
        rows = [title, ""]
        if prompt is None:
            rows.append("No connection is waiting for an answer.")
        else:
            if prompt["id"] not in self.shown:
                self.shown[prompt["id"]] = time.monotonic()
                self.choice = self.fresh_choice()
            rows += lines_for(prompt, self.choice, now, width)
        if self.message:
            rows += ["", printable(self.message)]
        for y, row in enumerate(rows[:height]):
            try:
                self.screen.addstr(y, 0, row[:max(width - 1, 1)])
            except curses.error:
                pass
        self.screen.refresh()

    def key(self, ch: str) -> bool:
        """Handles one key; False to quit."""
        if ch == "q":
            return False
        prompt = self.current()
        if prompt is None or time.monotonic() - self.shown.get(prompt["id"], time.monotonic()) < INPUT_GRACE:
            return True  # too soon after it appeared: not meant for it
        if ch in DURATIONS:
            self.choice["duration"] = DURATIONS[ch]
        elif ch == "d":
            self.choice["whole_domain"] = not self.choice["whole_domain"]
        elif ch == "p":
            self.choice["any_port"] = not self.choice["any_port"]
        elif ch == "a":
            self.choice["any_program"] = not self.choice["any_program"]
        elif ch in ("y", "n"):
            self.client.answer(prompt["id"], "allow" if ch == "y" else "deny", self.choice["duration"],
                               any_port=self.choice["any_port"], whole_domain=self.choice["whole_domain"],
                               any_program=self.choice["any_program"])
            self.message = "%s %s" % ("allowed" if ch == "y" else "denied",
                                       DURATION_NAMES.get(self.choice["duration"], ""))
            self.prompts = [p for p in self.prompts if p["id"] != prompt["id"]]
        return True

    def receive(self) -> None:
        for message in self.client.messages(block=False):
            if message.get("type") == "prompts":
                self.prompts = message["prompts"]
            elif message.get("type") == "error":
                self.message = message.get("message", "")

    def run(self) -> None:
        curses.curs_set(0)
        self.screen.nodelay(True)
        while True:
            self.draw()
            ready: list = select.select([self.client.sock, sys.stdin], [], [], 0.5)[0]
            if self.client.sock in ready:
                self.receive()
            if sys.stdin in ready:
                while True:
                    try:
                        ch = self.screen.get_wch()
                    except curses.error:
                        break
                    if isinstance(ch, str) and not self.key(ch):
                        return


def main(paths) -> int:
    try:
        client = PromptClient(paths.guard_socket)
    except FileNotFoundError:
        print("picosnitch prompt: guard mode does not run (no %s): set \"Guard mode\" to \"ask\" in %s and "
              "restart picosnitch" % (paths.guard_socket, paths.config))
        return 1
    except PermissionError:
        print("picosnitch prompt: only root and the group named by \"Guard prompt group\" in %s may answer "
              "prompts" % paths.config)
        return 1
    except OSError as e:
        print("picosnitch prompt: cannot reach the guard at %s: %s" % (paths.guard_socket, e.strerror or e))
        return 1
    locale.setlocale(locale.LC_ALL, "")
    try:
        curses.wrapper(lambda screen: PromptUI(screen, client).run())
    except KeyboardInterrupt:
        pass
    except EOFError:
        print("picosnitch prompt: the daemon stopped")
        return 1
    finally:
        client.close()
    return 0
