"""The event stream: what picosnitch tells a log collector, a SIEM or a phone, as JSON.

One event is one JSON object (one line of events.log, one syslog message, one webhook call):

    {"id": "3f0c…", "time": 1700000000.123, "host": "laptop", "kind": "alert",
     "message": "curl (/usr/bin/curl) talked to a new domain: example.org", ...}

`kind` is one of messages.EVENT_KINDS, and says which fields follow:

    new program, new name, changed hash   exe, name, sha256; role "script" when exe is a script,
                                          note: where a changed hash came from (its package)
    alert                                 alert (its kind), exe, script, name, sha256, values, count
    loss                                  what (the kernel counter), count
    degraded hook                         hook

Text is printable (sanitize.printable: control characters and undecodable bytes as \\xNN), so
every line is valid UTF-8 JSON whatever a process was called. `id` is unique: a receiver that
was sent an event twice (delivery is at least once) can tell.

Also here, pure: the RFC 5424 form of an event for syslog, and the HTTP requests the generic
webhook, ntfy and Gotify are sent.
"""

from __future__ import annotations

import json
import socket
import time
import uuid
from datetime import datetime, timezone
from typing import Iterable, Optional

from picosnitch import __version__
from picosnitch.alerts.record_keeper import NEW_EXE, NEW_NAME, NEW_SHA256, SCRIPT, NewThing, alert_fields
from picosnitch.messages import (
    ALERT,
    CHANGED_HASH,
    DEGRADED_HOOK,
    LOSS,
    NEW_PROGRAM,
    TRAFFIC_SPIKE,
    Alert,
    ErrorReport,
)
from picosnitch.messages import NEW_NAME as NEW_NAME_EVENT
from picosnitch.sanitize import printable

KIND_OF_NEW_THING = {NEW_EXE: NEW_PROGRAM, NEW_NAME: NEW_NAME_EVENT, NEW_SHA256: CHANGED_HASH}
VALUES_IN_MESSAGE = 5
TEXT_LIMIT = 1000  # characters of one text field

# syslog: facility daemon; a severity per kind (warning for what may be an attack or a gap).
FACILITY_DAEMON = 3
SEVERITY = {ALERT: 4, CHANGED_HASH: 4, LOSS: 4, DEGRADED_HOOK: 4, NEW_PROGRAM: 5, NEW_NAME_EVENT: 6}
NOTICE = 5


def _text(value: str) -> str:
    return printable(value, limit=TEXT_LIMIT)


def _event(kind: str, message: str, when: Optional[float], fields: dict) -> dict:
    event = {"id": uuid.uuid4().hex, "time": round(time.time() if when is None else when, 6),
             "host": _text(socket.gethostname()), "kind": kind, "message": _text(message)}
    for name, value in fields.items():
        if isinstance(value, str):
            value = _text(value)
        elif isinstance(value, list):
            value = [_text(v) if isinstance(v, str) else v for v in value]
        event[name] = value
    return event


def _who(name: str, exe: str, script: str = "") -> str:
    return f"{name} ({script or exe})" if name else (script or exe)


def for_new_things(things: Iterable[NewThing]) -> list[dict]:
    """An event for each executable, script, name or hash the record keeper saw for the first time;
    a script's has "role": "script", a changed hash's "note" says where it came from."""
    events = []
    for thing in things:
        kind = KIND_OF_NEW_THING.get(thing.kind, thing.kind)
        what = "script" if thing.role == SCRIPT else "executable"
        words = {NEW_PROGRAM: f"new {'script' if thing.role == SCRIPT else 'program'}",
                 NEW_NAME_EVENT: "new name of a program",
                 CHANGED_HASH: f"the {what} changed, new sha256 {thing.sha256[:16]}…"}
        extra: dict = {"role": SCRIPT} if thing.role == SCRIPT else {}
        if thing.note:
            extra["note"] = thing.note
        note = f" ({thing.note})" if thing.note else ""
        events.append(_event(kind, f"{words.get(kind, kind)}: {_who(thing.name, thing.exe)}{note}", None,
                             dict(exe=thing.exe, name=thing.name, sha256=thing.sha256, **extra)))
    return events


PLURAL = {"new domain": "new domains", "new country": "new countries", "new port": "new ports",
          "new listener": "new listeners"}


def alert_message(alert: Alert) -> str:
    """The sentence that says what an alert is about."""
    who = _who(alert.name, alert.exe, alert.script)
    if alert.kind == TRAFFIC_SPIKE:
        return f"traffic spike of {who}: {alert.values[0] if alert.values else ''}"
    shown = ", ".join(alert.values[:VALUES_IN_MESSAGE])
    if alert.count == 1:
        return f"{who} used a {alert.kind}: {shown}"
    more = f" and {alert.count - VALUES_IN_MESSAGE} more" if alert.count > VALUES_IN_MESSAGE else ""
    return f"{who} used {alert.count} {PLURAL.get(alert.kind, alert.kind)}: {shown}{more}"


def for_alert(alert: Alert) -> dict:
    fields = alert_fields(alert)
    fields.pop("time")
    return _event(ALERT, alert_message(alert), alert.time, fields)


def for_error(report: ErrorReport, when: Optional[float] = None) -> Optional[dict]:
    """The event for a kernel loss or a hook left out (by their keys); None for other errors."""
    key = report.key or ""
    if key.startswith("loss:"):
        return _event(LOSS, report.message, when, {"what": key[len("loss:"):], "count": report.count})
    if key.startswith("degraded:"):
        return _event(DEGRADED_HOOK, report.message, when, {"hook": key[len("degraded:"):]})
    return None


def json_line(event: dict) -> str:
    """One line of ASCII JSON (non-ASCII characters as \\u escapes), no newline."""
    return json.dumps(event, ensure_ascii=True, separators=(",", ":"), sort_keys=False)


# ---- syslog (RFC 5424) ----

def _header_token(value: str, limit: int) -> str:
    """A header field: printable US-ASCII without spaces (RFC 5424's PRINTUSASCII), or "-"."""
    token = "".join(c for c in value if 33 <= ord(c) <= 126)[:limit]
    return token or "-"


def syslog_message(event: dict, pid: int) -> bytes:
    """`event` as an RFC 5424 message: <PRI>1 TIMESTAMP HOSTNAME picosnitch PID MSGID - JSON.

    The message part is the event's JSON in ASCII, so no byte order mark is needed."""
    priority = FACILITY_DAEMON * 8 + SEVERITY.get(event["kind"], NOTICE)
    stamp = datetime.fromtimestamp(event["time"], timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    header = "<%d>1 %s %s picosnitch %d %s -" % (priority, stamp, _header_token(event["host"], 255), pid,
                                               _header_token(event["kind"].replace(" ", "-"), 32))
    return (header + " " + json_line(event)).encode("ascii")


# ---- webhooks ----

def _title(event: dict) -> str:
    """A short ASCII title (HTTP header values are not UTF-8)."""
    kind = event.get("alert") if event["kind"] == ALERT else event["kind"]
    return printable(f"picosnitch on {event['host']}: {kind}".encode("ascii", "replace").decode(), limit=200)


def _bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"} if token else {}


USER_AGENT = f"picosnitch/{__version__}"


def webhook_request(event: dict, url: str, token: str) -> tuple[str, dict, bytes]:
    """(url, headers, body) of the generic webhook: the event's JSON, POSTed."""
    return url, {"Content-Type": "application/json", "User-Agent": USER_AGENT, **_bearer(token)}, \
        json_line(event).encode("ascii")


def ntfy_request(event: dict, url: str, token: str) -> tuple[str, dict, bytes]:
    """(url, headers, body) of ntfy's publish: the message as the body, POSTed to the topic's URL,
    with Title, Priority (4 "high" for alerts, changed hashes, losses and left-out hooks, else 3)
    and Tags headers, and the access token as a bearer token."""
    urgent = SEVERITY.get(event["kind"], NOTICE) <= 4
    headers = {"Title": _title(event), "Priority": "4" if urgent else "3",
               "Tags": "picosnitch," + event["kind"].replace(" ", "-"),
               "Content-Type": "text/plain; charset=utf-8", "User-Agent": USER_AGENT, **_bearer(token)}
    return url, headers, event["message"].encode("utf-8")


def gotify_request(event: dict, url: str, token: str) -> tuple[str, dict, bytes]:
    """(url, headers, body) of Gotify's POST /message: title, message and priority (8 for alerts,
    changed hashes, losses and left-out hooks, else 5) as JSON, the application token in
    X-Gotify-Key, the event itself in the extras."""
    urgent = SEVERITY.get(event["kind"], NOTICE) <= 4
    body = {"title": _title(event), "message": event["message"], "priority": 8 if urgent else 5,
            "extras": {"client::display": {"contentType": "text/plain"}, "picosnitch::event": event}}
    headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT,
               **({"X-Gotify-Key": token} if token else {})}
    return url.rstrip("/") + "/message", headers, json.dumps(body, ensure_ascii=True).encode("ascii")
