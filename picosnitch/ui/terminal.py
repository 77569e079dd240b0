"""What the two curses UIs, view and top, share: starting curses, and writing to its screen.

Without a terminal (output piped, run from a script or a unit) curses would end in a traceback;
run() says so in one sentence and returns exit status 2 instead.
"""

from __future__ import annotations

import curses
import locale
import os
import sys
from typing import Any, Callable, Optional

from picosnitch.sanitize import printable

NO_TERMINAL = 2  # exit status: the command cannot run here as asked


def missing_terminal(command: str) -> Optional[str]:
    """The sentence to print when `picosnitch COMMAND` has no terminal to draw on, else None."""
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        return (f"picosnitch {command} is a terminal UI: run it in a terminal, with neither its input "
                "nor its output redirected")
    try:
        curses.setupterm(fd=sys.stdout.fileno())
    except curses.error:
        term = printable(os.environ.get("TERM", ""), limit=40)
        return f"picosnitch {command} cannot draw on this terminal: TERM={term} is not one curses knows"
    return None


def run(command: str, ui: Callable[[Any], None]) -> int:
    """Run `ui(screen)` under curses until it returns or Ctrl-C; the exit status."""
    problem = missing_terminal(command)
    if problem:
        print(problem, file=sys.stderr)
        return NO_TERMINAL
    locale.setlocale(locale.LC_ALL, "")
    try:
        curses.wrapper(ui)
    except KeyboardInterrupt:
        pass
    return 0


def put(screen, y: int, x: int, text: str, attr: int = 0) -> None:
    """Write already-fitted text, ignoring the error curses raises for the last cell."""
    try:
        screen.addstr(y, x, text, attr)
    except curses.error:
        pass
