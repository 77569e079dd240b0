"""The presentation view, top and dash share: values made safe to show, sizes, time ranges.

Every value a UI shows went through `safe`: control characters, escape sequences, invalid UTF-8
and Unicode format characters are written as escapes, so hostile process names cannot steer a
terminal or fool a reader. The terminal UIs then `fit` it to its cells. Nothing here draws:
the dashboard uses it too, and never imports curses.
"""

from __future__ import annotations

import pwd
import unicodedata
from typing import Optional

from picosnitch.sanitize import printable
from picosnitch.store.queries import HOUR
from picosnitch.timestamps import local_time

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


# ---- time ranges: (name, length in seconds); None is everything stored ----

RANGES: tuple[tuple[str, Optional[int]], ...] = (
    ("minute", 60), ("10 minutes", 600), ("hour", HOUR), ("6 hours", 6 * HOUR),
    ("day", 24 * HOUR), ("week", 7 * 24 * HOUR), ("month", 30 * 24 * HOUR),
    ("year", 365 * 24 * HOUR), ("all", None))


def window(range_name: str, offset: int, now: float) -> tuple[Optional[int], Optional[int]]:
    """[start, end) of range `range_name`, `offset` whole ranges back from `now`."""
    length = dict(RANGES)[range_name]
    if length is None:
        return None, None
    end = int(now) + 1 - offset * length
    return end - length, end


# ---- values as shown ----

def user_name(uid: int) -> str:
    """The name of user `uid`, "" when the system has none."""
    try:
        return pwd.getpwuid(uid).pw_name
    except (KeyError, OverflowError):
        return ""


def show_value(column: str, value, width: int = 0) -> str:
    """A tab value as the terminal UIs show it (safe text). `width` is the entry-time bucket
    length: an hour of the rollup is shown as that hour."""
    if column == "contime":
        shown = local_time(int(value))
        return shown[:13] + ":00 (hour)" if width == HOUR else shown
    if column == "uid":
        return f"{value} ({safe(user_name(value)) or '?'})" if value >= 0 else f"{value} (unknown)"
    if value == "":
        return "(none)"
    return safe(str(value))


# ---- alerts (record.json's "Alerts") ----

def alert_fields(alert: dict) -> dict:
    """An alert as the UIs show it: time, kind, name, program (the script, else the executable)
    and its values, each safe text."""
    def text(key: str) -> str:
        value = alert.get(key, "")
        return safe(value) if isinstance(value, str) else ""
    listed = alert.get("values")
    values: list = listed if isinstance(listed, list) else []
    counted = alert.get("count")
    count: int = counted if isinstance(counted, int) else len(values)
    shown = ", ".join(safe(str(v)) for v in values)
    if count > len(values):
        shown += f" ({count} in all)"
    when = alert.get("time")
    return {"time": local_time(when) if isinstance(when, (int, float)) else "", "kind": text("alert"),
            "name": text("name"), "program": text("script") or text("exe"), "values": shown}


def alert_line(alert: dict) -> str:
    """One alert on one line, as view lists them."""
    shown = alert_fields(alert)
    return f"{shown['time']}  {shown['kind']}  {shown['name']}  {shown['program']}  {shown['values']}"
