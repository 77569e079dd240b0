"""Runs inside the systemd guest (a Debian root with systemd as PID 1, no network but loopback):
installs the .deb with apt as a user would, drives picosnitch.service through its life, and writes
what it saw to facts.json. It judges nothing: tests/test_systemd_guest.py asserts on the facts, so
a failure reads there as a broken promise, not as a crash in here.

    python3 systemd_facts.py DIR     (DIR holds the .deb; facts.json and journal.txt go there)

Standard library only: this is the guest's own Python, before and after picosnitch is installed.
"""

import glob
import json
import os
import socket
import sqlite3
import subprocess
import sys
import threading
import time

DIR = sys.argv[1]
UNIT = "picosnitch"
CONFIG = "/etc/picosnitch/config.json"
DB = "/var/lib/picosnitch/snitch.db"
facts = {}


def sh(*args, timeout=300):
    """(exit status, stdout+stderr) of a command; a hang is status -1."""
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=timeout,
                              env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
        return done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as e:
        return -1, f"timed out after {timeout} s: {e.stdout or ''}{e.stderr or ''}"


def show(*properties):
    _, out = sh("systemctl", "show", UNIT, "-p", ",".join(properties))
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def save():
    with open(os.path.join(DIR, "facts.json"), "w") as f:
        json.dump(facts, f, indent=1, sort_keys=True)


class Sink:
    """A loopback TCP server that reads and counts whatever it is sent."""

    def __init__(self):
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            conn, _ = self.server.accept()
            while conn.recv(65536):
                pass
            conn.close()


def send(port, size):
    """A separate process sends `size` bytes to the sink (so its row has an executable of its own)."""
    script = f"import socket; s = socket.create_connection(('127.0.0.1', {port})); s.sendall(b'x' * {size}); s.close()"
    return sh("/usr/bin/python3", "-c", script)[0]


def rows_to(port, timeout=60):
    """The connections view's rows to that port, once some appear (the daemon writes every second)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            db = sqlite3.connect(f"file:{DB}?mode=ro", uri=True)
            db.row_factory = sqlite3.Row
            rows = [dict(r) for r in db.execute("SELECT send, exe, sha256, uid FROM connections WHERE rport = ?",
                                                 (port,))]
            db.close()
            if rows:
                return rows
        except sqlite3.Error:
            pass
        time.sleep(1)
    return []


def traffic(sink, size, key):
    """Sends `size` bytes right away and records the rows the daemon wrote for them."""
    facts[key + "_sent"] = size
    facts[key + "_client_status"] = send(sink.port, size)
    facts[key + "_rows"] = rows_to(sink.port)


def timed(key, *args):
    start = time.monotonic()
    status, out = sh(*args)
    facts[key] = {"status": status, "output": out[-3000:], "seconds": round(time.monotonic() - start, 1)}


def install():
    deb, = glob.glob(os.path.join(DIR, "picosnitch_*.deb"))
    timed("install", "apt-get", "install", "-y", "--no-install-recommends", deb)
    facts["after_install"] = show("ActiveState", "UnitFileState", "Type")
    facts["installed_files"] = {path: os.path.exists(path) for path in (
        "/usr/bin/picosnitch", "/lib/systemd/system/picosnitch.service",
        "/etc/systemd/system/multi-user.target.wants/picosnitch.service",
        "/usr/share/man/man1/picosnitch.1.gz", "/usr/lib/python3/dist-packages/picosnitch/__init__.py")}
    facts["version"] = sh("picosnitch", "version")


def start_and_record(sink):
    """Stopped, configured to write every second, started: start must return with the programs
    attached, so traffic sent the moment it returns is recorded."""
    timed("stop_before_config", "systemctl", "stop", UNIT)
    with open(CONFIG, "w") as f:
        json.dump({"DB write limit (seconds)": 1, "Desktop notifications": False}, f)
    timed("start", "systemctl", "start", UNIT)
    facts["after_start"] = show("ActiveState", "SubState", "MainPID", "NRestarts")
    traffic(sink, 54321, "first")


def stop_and_restart():
    pid_before = show("MainPID")["MainPID"]
    timed("restart", "systemctl", "restart", UNIT)
    facts["after_restart"] = show("ActiveState", "MainPID", "NRestarts")
    facts["restart_pid_changed"] = facts["after_restart"]["MainPID"] != pid_before
    timed("stop", "systemctl", "stop", UNIT)
    facts["after_stop"] = show("ActiveState", "Result", "ExecMainStatus", "ExecMainCode")
    facts["processes_left"] = daemon_processes()


def daemon_processes():
    """Command lines of processes running picosnitch, this script and its parents left out."""
    mine, pid = set(), os.getpid()
    while pid > 1:
        mine.add(pid)
        with open(f"/proc/{pid}/stat") as f:
            pid = int(f.read().rsplit(")", 1)[1].split()[1])
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) not in mine:
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    argv = f.read().split(b"\0")
            except OSError:
                continue
            if any(os.path.basename(a) == b"picosnitch" or a == b"picosnitch" for a in argv):
                found.append(b" ".join(argv).decode(errors="replace"))
    return found


def broken_config():
    """A config.json with an error: the daemon refuses with status 78 and systemd does not retry."""
    with open(CONFIG, "w") as f:
        f.write('{\n  "DB retention (days)": 30,\n  "DB sql log": "yes"\n}\n')
    timed("start_broken", "systemctl", "start", UNIT)
    time.sleep(12)  # past RestartSec=5, twice: a restart loop would show by now
    facts["after_broken"] = show("ActiveState", "Result", "ExecMainStatus", "NRestarts")
    _, facts["broken_journal"] = sh("journalctl", "-u", UNIT, "-n", "20", "--no-pager", "-o", "cat")


def security():
    facts["security"] = sh("systemd-analyze", "security", UNIT, "--no-pager")


def purge():
    timed("purge", "apt-get", "purge", "-y", "picosnitch")
    leftovers = ["/etc/picosnitch", "/var/lib/picosnitch", "/var/log/picosnitch", "/run/picosnitch",
                 "/usr/bin/picosnitch", "/lib/systemd/system/picosnitch.service",
                 "/etc/systemd/system/multi-user.target.wants/picosnitch.service",
                 "/usr/lib/python3/dist-packages/picosnitch"]
    facts["left_after_purge"] = [p for p in leftovers if os.path.lexists(p)]
    facts["after_purge"] = show("LoadState", "ActiveState")
    facts["dpkg_after_purge"] = sh("dpkg-query", "-W", "-f=${Status}", "picosnitch")


def main():
    facts["uname"] = os.uname().release
    # vng's guest set-up leaves journald writing to a journal directory that is gone (journalctl finds
    # no files): a restarted journald opens a new one, and the unit's messages can be read back.
    facts["journald_restart"] = sh("systemctl", "restart", "systemd-journald")
    facts["system_state"] = sh("systemctl", "is-system-running", "--wait", timeout=120)[1].strip()
    facts["failed_units"] = sh("systemctl", "--failed", "--no-legend", "--plain")[1]
    sink = Sink()
    steps = [install, lambda: start_and_record(sink), security, stop_and_restart, broken_config, purge]
    for step in steps:
        try:
            step()
        except Exception as e:  # the facts so far still go back, with what broke
            facts.setdefault("errors", []).append(f"{getattr(step, '__name__', 'step')}: {e!r}")
        save()
    _, journal = sh("journalctl", "-u", UNIT, "--no-pager")
    with open(os.path.join(DIR, "journal.txt"), "w") as f:
        f.write(journal)
    facts["done"] = True
    save()


if __name__ == "__main__":
    main()
