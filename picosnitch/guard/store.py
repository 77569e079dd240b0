"""Guard verdicts in snitch.db's table guard_verdicts (db_schema.GUARD_TABLES), one row per
connection decided, written once a second in one transaction.

Columns: ts (unix time, fractional), direction (in/out), family, protocol, laddr, lport, raddr,
rport, domain (forward order, "" none), exe, sha256, pexe (parent's executable), cmdline, uid,
verdict (allowed/denied), reason (rule: the rules file; answer: a rule made from an earlier
answer; user: the user's answer to this connection's prompt; timeout: nobody answered in time;
loopback: loopback, which no rule named; mode: "deny unknown" refused what no rule allowed),
rule (the rule's text, "line N: ..." for the rules file). exe and sha256 are "" when the
connection was decided without needing its program and could not be looked up afterwards
(connection storms), "!unknown" when the program could not be found.
"""

from __future__ import annotations

import sqlite3
from typing import List

from picosnitch.guard.engine import Verdict
from picosnitch.sanitize import to_bytes
from picosnitch.store import schema as db_schema
from picosnitch.store import sqlite as sqlite_store

_T = "CAST(? AS TEXT)"
INSERT = ("INSERT INTO guard_verdicts (ts, direction, family, protocol, laddr, lport, raddr, rport, domain, exe, "
          "sha256, pexe, cmdline, uid, verdict, reason, rule) VALUES (?, ?, ?, ?, %s, ?, %s, ?, %s, %s, ?, %s, %s, "
          "?, ?, ?, %s)" % (_T, _T, _T, _T, _T, _T, _T))


def row(v: Verdict) -> tuple:
    a = v.attempt
    if a.looked_up:
        who = a.who
        exe, sha256, pexe, cmdline, uid = who.exe, who.sha256, who.parent, who.cmdline, who.uid
    else:
        exe = sha256 = pexe = cmdline = ""
        uid = -1
    return (v.ts, a.direction, a.family, a.protocol, to_bytes(a.laddr), a.lport, to_bytes(a.raddr), a.rport,
            to_bytes(a.known_domain or ""), to_bytes(exe), sha256, to_bytes(pexe), to_bytes(cmdline),
            uid if uid >= 0 else a.uid, v.verdict, v.reason, to_bytes(v.rule))


class VerdictStore:
    def __init__(self, path: str):
        self.conn = sqlite_store._connect(path)
        self.conn.execute("PRAGMA journal_mode = WAL")
        db_schema.ensure_schema(self.conn)

    def write(self, verdicts: List[Verdict]) -> None:
        if not verdicts:
            return
        rows = [row(v) for v in verdicts]
        with self.conn:
            self.conn.execute("BEGIN IMMEDIATE")
            self.conn.executemany(INSERT, rows)

    def close(self) -> None:
        self.conn.close()


def recent(conn: sqlite3.Connection, limit: int = 1000, since: float = 0.0) -> List[dict]:
    """The latest verdicts, newest first, as dicts (for view and dash)."""
    try:
        cursor = conn.execute("SELECT * FROM guard_verdicts WHERE ts >= ? ORDER BY ts DESC LIMIT ?", (since, limit))
    except sqlite3.OperationalError:  # a database from before guard mode
        return []
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, r)) for r in cursor.fetchall()]
