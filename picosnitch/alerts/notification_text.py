"""The words of picosnitch's desktop notifications: short, sanitised, safe to show as markup.

Everything here is pure: what the record keeper found new (NewThing), a VirusTotal verdict or
an error goes in, a Notice (summary, body) comes out. Untrusted text (process names, paths) is
only ever put in the body, since the notification spec lets servers read the body as markup
but not the summary; markup_escape() is applied when the body is delivered.

Coalescing: what one observation found (a new name and a new hash of one executable) is one
notice; a burst of more than SHOW_SINGLY changes becomes a single summary notice that counts
them and points to `picosnitch view` and exe.log.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Iterable

from picosnitch.alerts.record_keeper import NEW_EXE, NEW_NAME, NEW_SHA256, SCRIPT, NewThing
from picosnitch.messages import TRAFFIC_SPIKE, Alert
from picosnitch.sanitize import printable

SHOW_SINGLY = 3  # bursts of up to this many changes (or alerts) are shown one notice each
VALUES_SHOWN = 5  # an alert's values in its notice
NAME_LIMIT = 60
PATH_LIMIT = 120
MESSAGE_LIMIT = 240
NAMES_IN_SUMMARY = 5

# Invisible or reordering characters a name could use to look like something else: bidi
# controls, zero-width characters, line/paragraph separators and the byte order mark.
_DECEPTIVE = re.compile("[\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff]")


@dataclasses.dataclass(frozen=True)
class Notice:
    """One desktop notification: a plain one-line `summary` and a plain-text `body`."""

    summary: str
    body: str


@dataclasses.dataclass(frozen=True)
class Change:
    """Everything new about one executable (or script: `role`): the kinds (NEW_EXE, ...), the names
    seen, and where a new sha256 came from (`note`)."""

    exe: str
    names: tuple[str, ...]
    kinds: frozenset[str]
    sha256: str
    role: str = "executable"
    note: str = ""


def clean(value: str, limit: int, keep_end: bool = False) -> str:
    """`value` made printable (see sanitize), without deceptive characters, cut to `limit`.

    With `keep_end` the end is kept instead of the start (the informative part of a path).
    """
    text = _DECEPTIVE.sub(lambda match: "\\u%04x" % ord(match.group()), printable(value))
    if len(text) <= limit:
        return text
    return "…" + text[-(limit - 1):] if keep_end else text[: limit - 1] + "…"


def markup_escape(text: str) -> str:
    """`text` as notification body markup that displays as exactly this text."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def group(things: Iterable[NewThing]) -> list[Change]:
    """One Change per executable, in order of first appearance."""
    changes: dict[str, Change] = {}
    for thing in things:
        seen = changes.get(thing.exe)
        if seen is None:
            changes[thing.exe] = Change(thing.exe, (thing.name,), frozenset([thing.kind]),
                                        thing.sha256, thing.role, thing.note)
        else:
            names = seen.names + (() if thing.name in seen.names else (thing.name,))
            changes[thing.exe] = Change(thing.exe, names, seen.kinds | {thing.kind},
                                        thing.sha256 or seen.sha256, seen.role, thing.note or seen.note)
    return list(changes.values())


def _who(names: tuple[str, ...], exe: str) -> str:
    """The body lines naming a process: its name(s), then its path."""
    return "%s\n%s" % (", ".join(clean(name, NAME_LIMIT) for name in names),
                       clean(exe, PATH_LIMIT, keep_end=True))


def for_change(change: Change) -> Notice:
    """The notice for one executable's (or script's) news; a new one says everything in one."""
    who = _who(change.names, change.exe)
    what = "script" if change.role == SCRIPT else "executable"
    if NEW_EXE in change.kinds:
        return Notice("picosnitch: new %s" % what, who)
    if NEW_SHA256 in change.kinds:
        extra = "\nalso running under a new name" if NEW_NAME in change.kinds else ""
        origin = "\n" + clean(change.note, MESSAGE_LIMIT) if change.note else ""
        return Notice("picosnitch: %s changed" % what,
                      "%s\nnew sha256 %s%s%s" % (who, clean(change.sha256, 16), origin, extra))
    return Notice("picosnitch: new process name", who)


def coalesce(changes: list[Change], exe_log: str) -> list[Notice]:
    """One notice per change, or for a burst of more than SHOW_SINGLY one summary notice."""
    if len(changes) <= SHOW_SINGLY:
        return [for_change(change) for change in changes]
    counts = {NEW_EXE: 0, NEW_SHA256: 0, NEW_NAME: 0}
    for change in changes:
        counts[next(kind for kind in counts if kind in change.kinds)] += 1
    words = {NEW_EXE: "new executable%s", NEW_SHA256: "changed executable%s",
             NEW_NAME: "new process name%s"}
    parts = ["%d %s" % (count, words[kind] % ("" if count == 1 else "s"))
             for kind, count in counts.items() if count]
    names = [clean(change.names[0], NAME_LIMIT) for change in changes[:NAMES_IN_SUMMARY]]
    more = ", …" if len(changes) > NAMES_IN_SUMMARY else ""
    return [Notice("picosnitch: %d changes" % len(changes),
                   "%s: %s%s\nSee picosnitch view or %s" % (
                       ", ".join(parts), ", ".join(names), more,
                       clean(exe_log, PATH_LIMIT, keep_end=True)))]


def for_verdict(exe: str, name: str, sha256: str, status: str) -> Notice:
    """The notice for a hash VirusTotal reports as malicious or suspicious."""
    return Notice("picosnitch: VirusTotal warning",
                  "%s\n%s\nsha256 %s" % (_who((name,), exe), clean(status, MESSAGE_LIMIT),
                                          clean(sha256, 16)))


def for_error(message: str, error_log: str) -> Notice:
    """The notice for the first error of a rate-limiting window."""
    return Notice("picosnitch: error", "%s\nSee %s" % (
        clean(message, MESSAGE_LIMIT), clean(error_log, PATH_LIMIT, keep_end=True)))


def for_more_errors(count: int, error_log: str) -> Notice:
    """The notice counting errors held back during a rate-limiting window."""
    return Notice("picosnitch: %d more error%s" % (count, "" if count == 1 else "s"),
                  "See %s" % clean(error_log, PATH_LIMIT, keep_end=True))


def for_alert(alert: Alert) -> Notice:
    """The notice for one alert: its kind, the program, and what is new."""
    if alert.kind == TRAFFIC_SPIKE:
        what = clean(alert.values[0] if alert.values else "", MESSAGE_LIMIT)
    else:
        what = ", ".join(clean(value, NAME_LIMIT) for value in alert.values[:VALUES_SHOWN])
        if alert.count > VALUES_SHOWN:
            what += " and %d more" % (alert.count - VALUES_SHOWN)
    return Notice("picosnitch: %s" % alert.kind, "%s\n%s" % (_who((alert.name,), alert.script or alert.exe), what))


def coalesce_alerts(alerts: list[Alert], alert_log: str) -> list[Notice]:
    """One notice per alert, or for a burst of more than SHOW_SINGLY one that counts them."""
    if len(alerts) <= SHOW_SINGLY:
        return [for_alert(alert) for alert in alerts]
    kinds: dict[str, int] = {}
    for alert in alerts:
        kinds[alert.kind] = kinds.get(alert.kind, 0) + 1
    names = list(dict.fromkeys(clean(alert.name, NAME_LIMIT) for alert in alerts))
    more = ", …" if len(names) > NAMES_IN_SUMMARY else ""
    return [Notice("picosnitch: %d alerts" % len(alerts), "%s: %s%s\nSee picosnitch view or %s" % (
        ", ".join("%d %s" % (count, kind) for kind, count in kinds.items()),
        ", ".join(names[:NAMES_IN_SUMMARY]), more, clean(alert_log, PATH_LIMIT, keep_end=True)))]
