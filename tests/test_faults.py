"""Faults the daemon lives through: what it loses, what it says, and that it keeps monitoring.

Each test makes one fault happen to the real daemon under its own PICOSNITCH_PREFIX, with real
traffic to a loopback server whose bytes are counted, and checks the truth afterwards: nothing
lost, or exactly what was lost said in error.log; the daemon still recording at the end; no
traceback for anything a user or another program can do to it.
"""

import hashlib
import os
import shutil
import signal
import time

import pytest
from daemon_harness import REPO, Daemon, wait_for
from test_daemon_lifecycle import holder_of, prefix, sink, talk  # noqa: F401 (fixtures)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: runs the daemon")


def sent_by(daemon, program, port):
    rows = daemon.rows("exe = ? AND (rport = ? OR lport = ?)", (str(program), port, port))
    return sum(r["send"] for r in rows)


def still_monitoring(daemon, program, port, size=4321):
    """New traffic reaches snitch.db: the daemon is still doing its job."""
    before = sent_by(daemon, program, port)
    talk(program, port, size)
    wait_for(lambda: sent_by(daemon, program, port) >= before + size, what="new traffic in snitch.db")


def sha256_of(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def no_traceback(*texts):
    for text in texts:
        assert "Traceback" not in text, text


# --- a kernel monitor that cannot start ----------------------------------------------------------

def damaged_installation(tmp_path):
    """A copy of the package whose BPF object is cut short, as a disk error or a broken upgrade
    would leave it: the monitor cannot load it, everything before that works."""
    root = tmp_path / "installed"
    shutil.copytree(REPO / "picosnitch", root / "picosnitch", ignore=shutil.ignore_patterns("__pycache__"))
    bpf_object = root / "picosnitch/kernel/bpf/picosnitch.bpf.o"
    bpf_object.write_bytes(bpf_object.read_bytes()[:5000])
    return root, bpf_object


@pytest.mark.parametrize("command", ["start", "start-no-daemon"])
def test_a_monitor_that_cannot_start_says_why_and_the_daemon_stops_with_78(prefix, tmp_path, command):
    daemon = Daemon(prefix)
    daemon.package_root, bpf_object = damaged_installation(tmp_path)
    daemon.write_config()
    result = daemon.cli(command, timeout=60, cwd=tmp_path)  # not the repository: -m imports from the cwd first
    assert result.returncode == 78, result.stderr
    assert result.stderr.startswith(f"picosnitch: the kernel monitor cannot start: opening {bpf_object}: ")
    assert result.stderr.endswith("; picosnitch stops\n") and result.stderr.count("\n") == 1, result.stderr
    log = daemon.error_log()
    assert f"the kernel monitor cannot start: opening {bpf_object}: " in log
    assert "see the previous line" not in log and "stopped unexpectedly" not in log, log
    no_traceback(result.stderr, log)
    assert daemon.cli("status").returncode == 3


# --- a worker that keeps crashing ------------------------------------------------------------------

def test_a_worker_that_keeps_crashing_is_reported_and_started_again_later(prefix, sink, netops):
    with Daemon(prefix) as daemon:
        db = str(daemon.paths.db)
        for kill in range(6):
            victim = wait_for(lambda: holder_of(daemon, db), what="the writer")
            os.kill(victim, signal.SIGKILL)
            wait_for(lambda: holder_of(daemon, db) != victim, what="the writer gone")
        line = ("the writer worker crashed 6 times within 60 s (the last time killed by signal 9); until it "
                "runs again snitch.db and conn.log are not written (the other workers keep what they can); "
                "it is started again in 10 s")
        wait_for(lambda: line in daemon.error_log(), what="the crash loop in error.log")
        paused_at = time.monotonic()
        talk(netops, sink.port, 1111)  # while no writer runs
        assert holder_of(daemon, db) is None
        wait_for(lambda: holder_of(daemon, db), timeout=30, what="the writer started again")
        assert time.monotonic() - paused_at >= 8
        wait_for(lambda: sent_by(daemon, netops, sink.port) == 1111, what="the traffic made while it was down")
        still_monitoring(daemon, netops, sink.port)
        assert daemon.stop() == 0
    no_traceback(daemon.error_log())


# --- a stalled worker --------------------------------------------------------------------------------

@pytest.mark.parametrize("worker", ["writer", "identity"])
def test_a_stalled_worker_costs_no_identities_and_no_timestamps(prefix, sink, netops, tmp_path, worker):
    # A small ring buffer (64 KiB: about a dozen exec events) fills within a second if the
    # monitor stops reading it, as it did while the writer held up the whole pipeline.
    program = tmp_path / "short-lived"
    shutil.copy(netops, program)
    with Daemon(prefix, **{"Perf ring buffer (pages)": 16}) as daemon:
        held = str(daemon.paths.db) if worker == "writer" else "anon_inode:[fanotify]"
        stalled = wait_for(lambda: holder_of(daemon, held), what=f"the {worker} worker")
        os.kill(stalled, signal.SIGSTOP)
        made = {}
        try:
            for i in range(60):  # short-lived processes, for 12 s, while nothing is written
                made[1000 + i] = time.time()
                talk(program, sink.port, 1000 + i)
                time.sleep(0.2)
        finally:
            os.kill(stalled, signal.SIGCONT)
        wait_for(lambda: len(daemon.rows("exe = ?", (str(program),))) == len(made), timeout=30,
                 what="a row for every process")
        rows = daemon.rows("exe = ?", (str(program),))
        assert sorted(r["send"] for r in rows) == sorted(made)
        assert {r["sha256"] for r in rows} == {sha256_of(program)}  # none "!unknown"
        for row in rows:  # the window the traffic was drained in, not the one it was written in
            assert made[row["send"]] - 1 <= row["ts"] <= made[row["send"]] + 1.5, (row, made[row["send"]])
        still_monitoring(daemon, netops, sink.port)
        assert daemon.stop() == 0
    log = daemon.error_log()
    assert "the kernel dropped" not in log and "could not be" not in log, log
