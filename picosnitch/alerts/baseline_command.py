"""`picosnitch baseline`: what the baseline holds, and the user's word on a program.

The listing reads baseline.json (no root needed). The requests (learned, mute, unmute, forget)
are appended to baseline-requests in the data directory (root only), which the baseline worker
reads on from where it stopped: the running daemon applies one within a second, a stopped one
when it starts, and nothing is lost between the two.
"""

from __future__ import annotations

import json
import os
from typing import Optional

from picosnitch.alerts.baseline import ALL, ANY, DIMENSIONS, Baseline, Settings
from picosnitch.paths import Paths
from picosnitch.sanitize import printable
from picosnitch.timestamps import local_time

ACTIONS = ("learned", "mute", "unmute", "forget")
REQUESTS_MODE = 0o600


def request(paths: Paths, action: str, program: str) -> str:
    """Append one request; the sentence that says so."""
    line = json.dumps({"action": action, "program": program}) + "\n"
    descriptor = os.open(paths.baseline_requests, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                         REQUESTS_MODE)
    try:
        os.write(descriptor, line.encode("utf-8", "surrogateescape"))
    finally:
        os.close(descriptor)
    what = {"learned": "has learned (alerts from now on)", "mute": "is muted", "unmute": "is no longer muted",
            "forget": "is forgotten (it learns again)"}[action]
    who = "every program seen" if program == ALL and action == "learned" else printable(program)
    return f"{who} {what}: the daemon applies it within a second, or when it starts"


def load(paths: Paths) -> Optional[Baseline]:
    """The saved baseline; None when there is none yet."""
    baseline = Baseline(Settings())
    try:
        baseline.load(paths.baseline.read_bytes())
    except FileNotFoundError:
        return None
    return baseline


def listing(baseline: Baseline) -> str:
    """One line per program: its state, the size of each part of its baseline, its path."""
    lines = ["%-8s %-19s %7s %9s %5s %9s  %s" % ("state", "since", "domains", "countries", "ports", "listeners",
                                                 "program")]
    for program in sorted(baseline.programs.values(), key=lambda p: (p.exe, p.script)):
        state = "muted" if baseline.is_muted(program) else "learning" if program.learned is None else "learned"
        since = local_time(program.first_seen if program.learned is None else program.learned)
        sizes = [ANY if values is None else str(len(values)) for values in
                 (program.values[d] for d in DIMENSIONS.values())]
        who = printable(program.exe) + (f" {printable(program.script)}" if program.script else "")
        lines.append("%-8s %-19s %7s %9s %5s %9s  %s" % (state, since, *sizes, who))
    muted = sorted(baseline.muted)
    if muted:
        lines.append("muted paths: " + ", ".join(printable(path) for path in muted))
    return "\n".join(lines) + "\n"
