"""The test suite never touches the host's own picosnitch: a user may run the README's test
command on a machine where picosnitch keeps their history.

A test once installed the .deb on the host and purged it, which deleted /etc/picosnitch,
/var/lib/picosnitch and /var/log/picosnitch of a picosnitch installed by scripts/install.sh. Tests
now run the installed package only inside a guest (tests/test_systemd_guest.py). This plugin
(loaded by conftest.py) takes a picture of those paths and of picosnitch's systemd units before
and after every test: a test that changed them errors, naming what changed, and the session fails
if anything changed between its start and its end.

Inside a kernel-matrix guest (PICOSNITCH_IN_GUEST=1) the guard is off: there the host's root is
shared read-only and live, so whatever changes in it is the host's doing, not the guest's tests'.

While the host's own daemon runs, its data and log files grow by themselves: then only which
files exist (name, type, inode) is compared under /var/lib and /var/log, not their sizes or times.
"""

import os
from pathlib import Path
from typing import Dict, Tuple

import pytest

STATE = (Path("/var/lib/picosnitch"), Path("/var/log/picosnitch"))
GUARDED = (Path("/etc/picosnitch"), *STATE,
           Path("/etc/systemd/system/picosnitch.service"),
           Path("/etc/systemd/system/multi-user.target.wants/picosnitch.service"),
           Path("/lib/systemd/system/picosnitch.service"),
           Path("/usr/lib/systemd/system/picosnitch.service"))
PID_FILE = Path("/run/picosnitch/picosnitch.pid")

Picture = Dict[str, Tuple]


def host_daemon_runs() -> bool:
    try:
        pid = int(PID_FILE.read_text().split()[0])
        return b"picosnitch" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError, IndexError):
        return False


def describe(path: Path, live: bool) -> Tuple:
    st = os.lstat(path)
    if live and any(path == d or d in path.parents for d in STATE):
        return (st.st_mode >> 12, st.st_ino)
    target = os.readlink(path) if os.path.islink(path) else None
    return (st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns, st.st_ino, target)


def picture() -> Picture:
    """Every guarded path and what lies below it, as (type, owner, size, time, inode, link)."""
    live = host_daemon_runs()
    seen = {}
    if os.environ.get("PICOSNITCH_IN_GUEST") == "1":
        return seen
    for top in GUARDED:
        if not os.path.lexists(top):
            continue
        seen[str(top)] = describe(top, live)
        if top.is_dir() and not top.is_symlink():
            for folder, dirs, files in os.walk(top):
                for name in dirs + files:
                    path = Path(folder) / name
                    try:
                        seen[str(path)] = describe(path, live)
                    except FileNotFoundError:  # went while walking: the comparison says so
                        pass
    return seen


def changes(before: Picture, after: Picture) -> list:
    gone = [f"{p} removed" for p in before if p not in after]
    new = [f"{p} created" for p in after if p not in before]
    changed = [f"{p} changed" for p in before if p in after and before[p] != after[p]]
    return sorted(gone + new + changed)


_session_start: Picture = {}
_touched_in_session: list = []


def pytest_sessionstart(session):
    _session_start.update(picture())


@pytest.fixture(autouse=True)
def _host_picosnitch_untouched():
    before = picture()
    yield
    touched = changes(before, picture())
    if touched:
        pytest.fail("this test changed the host's own picosnitch: " + "; ".join(touched[:10]), pytrace=False)


def pytest_sessionfinish(session, exitstatus):
    touched = changes(_session_start, picture())
    if touched:
        _touched_in_session.extend(touched)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter):
    if _touched_in_session:
        terminalreporter.section("THE HOST'S PICOSNITCH WAS CHANGED BY THIS RUN", sep="!", red=True, bold=True)
        for line in _touched_in_session:
            terminalreporter.line(line, red=True)
