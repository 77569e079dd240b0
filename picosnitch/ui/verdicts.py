"""`picosnitch view`'s guard screen (key g): the latest guard verdicts in snitch.db, newest first."""

from __future__ import annotations

import time
from typing import List

from picosnitch.guard import store
from picosnitch.guard.rules import PROTOCOL_NAMES
from picosnitch.sanitize import printable

TITLE = "guard verdicts, newest first (any key: back)"


def lines(conn, limit: int) -> List[str]:
    """One line per verdict (time, verdict, why, direction, program, destination, rule)."""
    if conn is None:
        return [TITLE, "", "Guard verdicts are kept in this machine's snitch.db, not on the central server."]
    rows = store.recent(conn, limit)
    out = [TITLE, ""]
    if not rows:
        out.append('No verdicts: guard mode is off ("Guard mode" in config.json) or has decided nothing yet.')
    for r in rows:
        port = r["rport"] if r["direction"] == "out" else r["lport"]
        where = r["domain"] or r["raddr"]
        if r["domain"]:
            where += " " + r["raddr"]
        out.append("%s  %-7s %-8s %-3s %s → %s port %s %s%s" % (
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["ts"])), r["verdict"], r["reason"],
            r["direction"], r["exe"] or "(program not looked up)", where, port,
            PROTOCOL_NAMES.get(r["protocol"], r["protocol"]), ("  [%s]" % r["rule"]) if r["rule"] else ""))
    return [printable(line) for line in out]
