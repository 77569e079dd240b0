"""Faults the daemon lives through: what it loses, what it says, and that it keeps monitoring.

Each test makes one fault happen to the real daemon under its own PICOSNITCH_PREFIX, with real
traffic to a loopback server whose bytes are counted, and checks the truth afterwards: nothing
lost, or exactly what was lost said in error.log; the daemon still recording at the end; no
traceback for anything a user or another program can do to it.
"""

import collections
import contextlib
import hashlib
import json
import os
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from daemon_harness import REPO, Daemon, wait_for
from test_daemon_lifecycle import holder_of, prefix, sink, talk  # noqa: F401 (fixtures)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: runs the daemon")


NETNS = os.stat("/proc/self/ns/net").st_ino  # others' tests may use the same port in their own namespaces


def sent_by(daemon, program, port):
    rows = rows_of(daemon, "exe = ? AND (rport = ? OR lport = ?) AND netns = ?", (str(program), port, port, NETNS))
    return sum(r["send"] for r in rows)


def rows_of(daemon, where, params):
    """daemon.rows(), none while snitch.db is not there yet or has no tables yet."""
    try:
        return daemon.rows(where, params)
    except sqlite3.OperationalError:
        return []


def still_monitoring(daemon, program, port, size=4321):
    """New traffic reaches snitch.db: the daemon is still doing its job."""
    before = sent_by(daemon, program, port)
    talk(program, port, size)
    try:
        wait_for(lambda: sent_by(daemon, program, port) >= before + size)
    except AssertionError:
        states = {pid: Path(f"/proc/{pid}/stat").read_text().split()[1:3] for pid in daemon.workers()}
        raise AssertionError(f"no new traffic in snitch.db; workers {states}\n{daemon.error_log()}") from None


def sha256_of(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def said_times(log, line):
    """How many times error.log says `line`: once per line, or N for a line "... (repeated N times)"."""
    found = re.findall(re.escape(line) + r"(?: \(repeated (\d+) times?\))?$", log, re.M)
    return sum(int(repeats or 1) for repeats in found)


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
    # The ring buffer fills within seconds if the monitor stops reading it, as it did while the
    # writer held up the whole pipeline; then short-lived processes go unnamed ("!unknown").
    # (Its default size: other processes' exec storms on this machine must not fill it.)
    program = tmp_path / "short-lived"
    shutil.copy(netops, program)
    with Daemon(prefix) as daemon:
        held = str(daemon.paths.db) if worker == "writer" else "anon_inode:[fanotify]"
        stalled = wait_for(lambda: holder_of(daemon, held), what=f"the {worker} worker")
        os.kill(stalled, signal.SIGSTOP)
        made = {}
        try:
            for i in range(60):  # short-lived processes, for 12 s, while nothing is written
                begun = time.time()
                talk(program, sink.port, 1000 + i)
                made[1000 + i] = (begun, time.time())
                time.sleep(0.2)
        finally:
            os.kill(stalled, signal.SIGCONT)

        def rows():
            return daemon.rows("(rport = ? OR lport = ?) AND netns = ? AND send > 0", (sink.port, sink.port, NETNS))
        try:
            wait_for(lambda: sorted(r["send"] for r in rows()) == sorted(made), timeout=30)
        except AssertionError:
            got = collections.Counter(r["send"] for r in rows())
            raise AssertionError(f"missing {sorted(set(made) - set(got))}, more than once "
                                 f"{[n for n, k in got.items() if k > 1]}, others {set(got) - set(made)}\n"
                                 f"{daemon.error_log()}") from None
        assert {(r["exe"], r["sha256"]) for r in rows()} == {(str(program), sha256_of(program))}, (
            daemon.error_log())  # none "!unknown"
        for row in rows():  # the window it was counted in, give or take a late drain, not when it was written
            begun, ended = made[row["send"]]
            assert begun - 1 <= row["ts"] <= ended + 3, (row, made[row["send"]])
        still_monitoring(daemon, netops, sink.port)
        assert daemon.stop() == 0
    log = daemon.error_log()
    assert "could not be written" not in log and "could not be passed" not in log and "were dropped" not in log, log


# --- a full disk -------------------------------------------------------------------------------------

@contextlib.contextmanager
def small_filesystem(path, size):
    """A filesystem of `size` (tmpfs) mounted on `path` while the block runs."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "--lazy", str(path)], check=True)


def fill(directory):
    """Fills the filesystem of `directory` to the last byte; returns the file that does."""
    filler = directory / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    for size in (4096, 512, 1):
        try:
            with open(filler, "ab") as f:
                while True:
                    f.write(b"\0" * size)
                    f.flush()
        except OSError:
            pass
    return filler


class Workload:
    """Short-lived clients talking to the sink, each size counted per program; `new()` adds an
    executable no one has seen (a copy under a new name), used from the next client on."""

    def __init__(self, netops, port, directory):
        self.netops, self.port, self.directory = netops, port, directory
        self.sent = collections.Counter()
        self.programs = []
        self.new()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def new(self):
        program = self.directory / f"client-{len(self.programs)}"
        shutil.copy(self.netops, program)
        self.programs.append(program)
        return program

    def _run(self):
        size = 1000
        while not self.stop.is_set():
            program = self.programs[-1]
            talk(program, self.port, size)
            self.sent[program] += size
            size += 1
            time.sleep(0.02)

    def finish(self):
        self.stop.set()
        self.thread.join(30)


def every_byte(daemon, work, port, timeout=30):
    """Waits until snitch.db has every byte each program of `work` sent, no more."""
    def stored():
        return {p: sent_by(daemon, p, port) for p in work.sent}
    try:
        wait_for(lambda: stored() == dict(work.sent), timeout=timeout)
    except AssertionError:
        raise AssertionError(f"stored {stored()}, sent {dict(work.sent)}\n{daemon.error_log()}") from None


def exe_log_news(paths):
    """The programs exe.log announces as new executables, one entry per line."""
    return [line.split(", ")[3] for line in paths.exe_log.read_text().splitlines() if ", new executable, " in line]


def recorded_executables(paths):
    try:
        return set(json.loads(paths.record.read_text())["Names by executable"])
    except FileNotFoundError:
        return set()


def test_a_full_disk_loses_no_rows_and_no_executables_and_monitoring_goes_on(prefix, sink, netops, tmp_path):
    with small_filesystem(prefix / "var", "32m") as var:
        with Daemon(prefix, **{"DB text log": True}) as daemon:
            work = Workload(netops, sink.port, tmp_path)
            time.sleep(2)
            filler = fill(var)
            for _ in range(5):  # executables first seen while the disk is full
                work.new()
                time.sleep(1.5)
            failed = "snitch.db cannot be written (database or disk is full)"
            assert failed in daemon.error_log() + daemon.stderr()
            filler.unlink()
            time.sleep(2)
            work.finish()
            every_byte(daemon, work, sink.port)
            wait_for(lambda: set(map(str, work.programs)) <= recorded_executables(daemon.paths),
                     what="every executable in record.json")
            still_monitoring(daemon, netops, sink.port)
            assert daemon.stop() == 0
        log, stderr = daemon.error_log(), daemon.stderr()
        news = exe_log_news(daemon.paths)
        conn_log = collections.Counter()
        for line in daemon.paths.conn_log.read_text().splitlines():
            fields = line.split(",")
            conn_log[fields[3]] += int(fields[1])
    assert {str(p): news.count(str(p)) for p in work.programs} == {str(p): 1 for p in work.programs}
    assert {p: conn_log[str(p)] for p in work.programs} == dict(work.sent)
    assert re.search(r"snitch\.db can be written again after \d+ s: \d+ rows, \d+ bytes of traffic between .* "
                     r"held meanwhile are written now", log), log
    assert "conn.log can be written again after" in log
    assert "could not be written" not in log and "could not be passed" not in log  # nothing was lost
    no_traceback(log, stderr)


LOST = re.compile(r"(\d+) rows?, (\d+) bytes of traffic.* could not be written to snitch\.db: ")


def conn_log_traffic(paths):
    """Bytes both ways of every line of conn.log: every row the writer was given."""
    lines = paths.conn_log.read_text().splitlines()
    return sum(int(line.split(",")[1]) + int(line.split(",")[2]) for line in lines)


def stored_traffic(daemon):
    return sum(r["send"] + r["recv"] for r in daemon.rows())


def test_rows_a_disk_still_full_at_stop_are_written_at_the_next_start(prefix, sink, netops, tmp_path):
    # snitch.db on a filesystem that fills up; conn.log, on another, gets every row the writer had.
    with small_filesystem(prefix / "var/lib", "32m") as lib:
        daemon = Daemon(prefix, **{"DB text log": True}).start()
        work = Workload(netops, sink.port, tmp_path)
        time.sleep(2)
        filler = fill(lib)
        time.sleep(4)
        work.finish()
        time.sleep(1)  # drained
        assert daemon.stop() == 0
        kept = re.search(r"(\d+) rows?, (\d+) bytes of traffic between .* not yet written to snitch\.db are kept in "
                         r"the writer's spill and written when picosnitch next starts", daemon.error_log())
        assert kept, daemon.error_log()
        assert stored_traffic(daemon) + int(kept.group(2)) == conn_log_traffic(daemon.paths)
        filler.unlink()
        with daemon:
            every_byte(daemon, work, sink.port)
            still_monitoring(daemon, netops, sink.port)
        assert stored_traffic(daemon) == conn_log_traffic(daemon.paths)  # nothing twice, nothing lost
        log = daemon.error_log()
    assert "the writer had stopped before snitch.db had" in log and "could not be written" not in log, log
    no_traceback(log, daemon.stderr())


def test_rows_neither_the_disk_nor_the_spill_can_keep_are_counted_exactly(prefix, sink, netops, tmp_path):
    with small_filesystem(prefix / "var/lib", "32m") as lib, small_filesystem(prefix / "run", "1m") as run:
        with Daemon(prefix, **{"DB text log": True}) as daemon:
            work = Workload(netops, sink.port, tmp_path)
            time.sleep(2)
            fill(run)
            fill(lib)
            time.sleep(4)
            work.finish()
            time.sleep(1)  # drained
            assert daemon.stop() == 0
        stored = stored_traffic(daemon)
        ours = {p: sent_by(daemon, p, sink.port) for p in work.programs}
    log = daemon.error_log()
    lost = [int(traffic) for _, traffic in LOST.findall(log)]
    assert lost and sum(ours.values()) < sum(work.sent.values()), "the disk filled up too late to lose anything"
    assert sum(lost) == conn_log_traffic(daemon.paths) - stored  # every byte the writer had is stored, or said lost
    assert "it still could not be written when picosnitch stopped" in log
    no_traceback(log, daemon.stderr())


# --- a killed record keeper ---------------------------------------------------------------------------

def restarted(daemon, name, old):
    return wait_for(lambda: (daemon.worker(name) or old) != old and daemon.worker(name), what=f"a new {name} worker")


@pytest.mark.parametrize("delay", [0.0, 0.3, 0.6, 1.0, 2.0])
def test_an_executable_seen_just_before_the_keeper_is_killed_reaches_record_json_once(prefix, sink, netops,
                                                                                        tmp_path, delay):
    with Daemon(prefix) as daemon:
        programs = []
        for round in range(3):
            program = tmp_path / f"new-{round}"
            shutil.copy(netops, program)
            programs.append(program)
            keeper = daemon.worker("keeper")
            talk(program, sink.port, 100)
            time.sleep(delay)  # the keeper may not have it yet, or have it only in memory, or saved
            os.kill(keeper, signal.SIGKILL)
            restarted(daemon, "keeper", keeper)
        wait_for(lambda: set(map(str, programs)) <= recorded_executables(daemon.paths), what="every executable")
        still_monitoring(daemon, netops, sink.port)
        assert daemon.stop() == 0
    news = exe_log_news(daemon.paths)
    assert {str(p): news.count(str(p)) for p in programs} == {str(p): 1 for p in programs}
    no_traceback(daemon.error_log(), daemon.stderr())


# --- a killed writer -----------------------------------------------------------------------------------

# Short connections for a given time, a few hundred a second; prints the bytes sent.
CHURN = """\
import socket, sys, time
end, sent = time.monotonic() + float(sys.argv[2]), 0
while time.monotonic() < end:
    with socket.create_connection(("127.0.0.1", int(sys.argv[1]))) as s:
        s.sendall(b"c" * 1000)
        sent += 1000
    time.sleep(0.002)
print(sent)
"""


def churn(port, seconds):
    """Starts CHURN; returns the process, whose stdout has the total once it is done."""
    return subprocess.Popen([os.path.realpath(sys.executable), "-c", CHURN, str(port), str(seconds)],
                            stdout=subprocess.PIPE, text=True)


def sent_to(daemon, port):
    """Bytes sent to `port` (in this network namespace) that snitch.db holds, whoever sent them.

    (Other tests on this machine may fill the ring buffer with their forks and execs, and then
    some of these connections' programs are "!unknown": the bytes are still counted.)"""
    return sum(r["send"] for r in rows_of(daemon, "rport = ? AND netns = ?", (port, NETNS)))


def test_a_killed_writer_loses_nothing_and_writes_nothing_twice(prefix, sink):
    with Daemon(prefix) as daemon:
        load = churn(sink.port, 8)
        for kill in range(5):  # at any moment of a window: receiving, merging, in a transaction
            time.sleep(0.4 + random.random())
            writer = daemon.worker("writer")
            os.kill(writer, signal.SIGKILL)
            restarted(daemon, "writer", writer)
        sent = int(load.communicate(timeout=60)[0])
        try:
            wait_for(lambda: sent_to(daemon, sink.port) >= sent)
        except AssertionError:
            raise AssertionError(f"stored {sent_to(daemon, sink.port)} of {sent}\n{daemon.error_log()}") from None
        time.sleep(2)  # nothing more comes, not even twice
        assert sent_to(daemon, sink.port) == sent
        still_monitoring_python(daemon, sink.port)
        assert daemon.stop() == 0
    log = daemon.error_log()
    assert said_times(log, "the writer worker stopped unexpectedly (killed by signal 9); restarting it") == 5
    assert "the writer had stopped before snitch.db had" in log
    assert "could not be written" not in log and "could not be passed" not in log, log
    no_traceback(log, daemon.stderr())


def still_monitoring_python(daemon, port):
    before = sent_to(daemon, port)
    subprocess.run([os.path.realpath(sys.executable), "-c", CHURN, str(port), "0.2"], check=True, capture_output=True)
    wait_for(lambda: sent_to(daemon, port) > before, what="new traffic in snitch.db")


def test_a_connection_storm_is_stored_to_the_byte(prefix, sink):
    # Thousands of connections a second: more sockets than counter cells, so the flow map
    # carries many of them, and drains read it in several batches.
    with Daemon(prefix) as daemon:
        storm = subprocess.Popen([os.path.realpath(sys.executable), "-c", CHURN.replace("time.sleep(0.002)", "pass"),
                                  str(sink.port), "5"], stdout=subprocess.PIPE, text=True)
        sent = int(storm.communicate(timeout=60)[0])
        try:
            wait_for(lambda: nudged(sent_to(daemon, sink.port)) >= sent, timeout=60)
        except AssertionError:
            raise AssertionError(f"stored {sent_to(daemon, sink.port)} of {sent}") from None
        time.sleep(2)
        assert sent_to(daemon, sink.port) == sent
        assert daemon.stop() == 0


def nudged(value):
    """value, after starting one short-lived program, as a desktop does all the time.

    On this project's CI machines (a 6.18 VM kernel with a vendor's vCPU packing), after a storm
    a worker sometimes stays runnable or asleep with its socket readable for 40 s and more, until
    something else happens on the machine (a fork, a read of its /proc/PID/stack); seen with the
    daemon pinned to one CPU and with the code from before the channels alike. A real machine is
    never that quiet for long; the bytes are what this test is about."""
    subprocess.run(["true"], check=True)
    return value


# --- a killed kernel monitor ----------------------------------------------------------------------------

HELD = re.compile(r"the kernel monitor stopped while it held \d+ flows \((\d+) bytes of traffic\)")


def killed_under_churn(daemon, port, worker, times=3):
    """Kills `worker` `times` times while a client makes short connections to `port`; the bytes it sent."""
    load = churn(port, 8)
    for kill in range(times):
        time.sleep(1 + random.random())
        victim = daemon.worker(worker)
        os.kill(victim, signal.SIGKILL)
        restarted(daemon, worker, victim)
    return int(load.communicate(timeout=60)[0])


def test_a_killed_monitor_is_taken_over_without_losing_what_the_kernel_counted(prefix, sink):
    with Daemon(prefix) as daemon:
        sent = killed_under_churn(daemon, sink.port, "monitor")
        wait_for(lambda: sent_to(daemon, sink.port) >= sent - held_by_killed(daemon), timeout=30,
                 what="every byte in snitch.db")
        time.sleep(2)
        stored = sent_to(daemon, sink.port)
        assert sent - held_by_killed(daemon) <= stored <= sent  # nothing twice: one set of programs counts
        if not held_by_killed(daemon):
            assert stored == sent
        still_monitoring_python(daemon, sink.port)
        assert daemon.stop() == 0
    log = daemon.error_log()
    assert said_times(log, "the monitor worker stopped unexpectedly (killed by signal 9); restarting it") == 3
    no_traceback(log, daemon.stderr())


def held_by_killed(daemon):
    """Bytes the killed monitors had read from the kernel and not handed on, as error.log says."""
    return sum(int(traffic) for traffic in HELD.findall(daemon.error_log()))


# --- a killed identity worker ---------------------------------------------------------------------------

IDENTITY_HELD = re.compile(r"the identity worker stopped while it held \d+ flows \((\d+) bytes of traffic\)")


def test_a_killed_identity_worker_loses_no_byte_it_does_not_report(prefix, sink):
    with Daemon(prefix) as daemon:
        sent = killed_under_churn(daemon, sink.port, "identity")

        def reported():
            return sum(int(traffic) for traffic in IDENTITY_HELD.findall(daemon.error_log()))
        wait_for(lambda: sent_to(daemon, sink.port) >= sent - reported(), timeout=30, what="every byte in snitch.db")
        time.sleep(2)
        # what the killed workers held is said (with its other side, the server's receiving, and
        # other processes' traffic of the moment: more than our client's bytes alone)
        assert sent - reported() <= sent_to(daemon, sink.port) <= sent
        still_monitoring_python(daemon, sink.port)
        assert daemon.stop() == 0
    no_traceback(daemon.error_log(), daemon.stderr())


# --- kill -9 of the whole daemon ----------------------------------------------------------------------

def test_a_daemon_killed_outright_is_said_at_the_next_start_and_its_writer_loses_nothing(prefix, sink):
    daemon = Daemon(prefix, **{"DB write limit (seconds)": 5}).start()  # a window of rows waits in the writer
    load = churn(sink.port, 3)
    sent = int(load.communicate(timeout=60)[0])
    time.sleep(1.5)  # drained from the kernel and in the writer's window, not yet written
    before = sent_to(daemon, sink.port)
    killed_at = time.time()
    daemon.kill_group()
    with daemon:
        wait_for(lambda: sent_to(daemon, sink.port) == sent, what="the killed writer's window written from its spill")
        still_monitoring_python(daemon, sink.port)
    log = daemon.error_log()
    seen = re.search(r"picosnitch \(pid \d+\) did not stop cleanly; it was last seen running at "
                     r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d): the traffic of about its last second", log)
    assert seen, log
    assert killed_at - 5 <= time.mktime(time.strptime(seen.group(1), "%Y-%m-%d %H:%M:%S")) <= killed_at + 1
    assert before < sent  # the window was not written before the kill
    assert "the writer had stopped before snitch.db had" in log
    no_traceback(log, daemon.stderr())


# --- files root should not write ------------------------------------------------------------------

def test_a_link_planted_as_snitch_db_is_moved_aside_not_followed(prefix, sink, netops, tmp_path):
    daemon = Daemon(prefix)
    daemon.paths.data_dir.mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.write_bytes(b"")
    daemon.paths.db.symlink_to(outside)
    with daemon:
        still_monitoring(daemon, netops, sink.port)
        assert daemon.stop() == 0
    assert outside.read_bytes() == b"" and sorted(os.listdir(tmp_path)) == ["outside", "prefix"]  # no -wal beside it
    assert not daemon.paths.db.is_symlink() and daemon.paths.db.stat().st_size > 0
    aside = [p for p in daemon.paths.data_dir.iterdir() if p.name.startswith("snitch.db.bad-")]
    assert len(aside) == 1 and os.readlink(aside[0]) == str(outside)
    said = f"{daemon.paths.db} was a symbolic link to {outside}: root does not write through links; moved it to {aside[0]}"
    assert said in daemon.error_log() and said in daemon.stderr()


def test_files_another_user_owns_become_roots(prefix, sink, netops):
    daemon = Daemon(prefix)
    daemon.paths.log_dir.mkdir(parents=True)
    daemon.paths.error_log.write_text("")
    os.chown(daemon.paths.error_log, 1000, 1000)
    os.chmod(daemon.paths.error_log, 0o666)
    with daemon:
        still_monitoring(daemon, netops, sink.port)
        assert daemon.stop() == 0
    st = daemon.paths.error_log.stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (0, 0, 0o644)
    assert (f"{daemon.paths.error_log} was owned by uid 1000 and gid 1000 with mode 666; only root may write it now"
            in daemon.error_log())


@contextlib.contextmanager
def read_only(directory):
    """`directory` made read-only (a read-only bind mount of itself) while the block runs."""
    directory.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "--bind", str(directory), str(directory)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(directory)], check=True)
        yield directory
    finally:
        subprocess.run(["umount", "--lazy", str(directory)], check=True)


def test_a_read_only_data_directory_gets_a_sentence_and_its_rows_wait(prefix, sink, netops):
    daemon = Daemon(prefix)
    with read_only(daemon.paths.data_dir):
        daemon.start()
        talk(netops, sink.port, 2345)
        wait_for(lambda: "snitch.db cannot be written (" in daemon.error_log(), what="the sentence")
        assert daemon.paths.db.exists() is False
    # writable again: the rows it held are written with the next window
    wait_for(lambda: sent_by(daemon, netops, sink.port) == 2345, what="the held rows written")
    still_monitoring(daemon, netops, sink.port)
    assert daemon.stop() == 0
    assert f"{daemon.paths.data_dir} cannot be prepared (Read-only file system)" in daemon.stderr()
    no_traceback(daemon.error_log(), daemon.stderr())


def test_a_read_only_log_directory_gets_a_sentence_and_its_lines_wait(prefix, sink, netops):
    daemon = Daemon(prefix)
    with read_only(daemon.paths.log_dir):
        daemon.start()
        still_monitoring(daemon, netops, sink.port)
        wait_for(lambda: "cannot write" in daemon.stderr(), what="error.log's lines on stderr meanwhile")
    wait_for(lambda: "error.log could be written again" in daemon.error_log(), timeout=30,
             what="the held lines in error.log")
    wait_for(lambda: str(netops) in exe_log_news(daemon.paths), what="the held exe.log line")
    assert daemon.stop() == 0
    assert f"{daemon.paths.log_dir} cannot be prepared (Read-only file system)" in daemon.error_log()
    no_traceback(daemon.error_log(), daemon.stderr())


def wal_frames(wal: bytes):
    """(offset, is a commit) of each frame of a -wal file."""
    page_size = int.from_bytes(wal[8:12], "big")
    frame = 24 + page_size
    return [(offset, int.from_bytes(wal[offset + 4:offset + 8], "big") != 0)
            for offset in range(32, len(wal) - frame + 1, frame)], frame


@pytest.mark.parametrize("damage", ["cut short", "a page overwritten"])
def test_transactions_a_damaged_wal_loses_are_reported(prefix, sink, damage):
    daemon = Daemon(prefix).start()
    load = churn(sink.port, 4)
    load.communicate(timeout=60)
    wait_for(lambda: sent_to(daemon, sink.port) > 0, what="some windows committed")
    time.sleep(2)
    daemon.kill_group()  # the -wal keeps the last transactions
    wal_path = Path(str(daemon.paths.db) + "-wal")
    wal = wal_path.read_bytes()
    frames, size = wal_frames(wal)
    commits = [offset for offset, commit in frames if commit]
    assert len(commits) >= 3, "too few transactions to lose some"
    if damage == "cut short":
        wal_path.write_bytes(wal[:commits[-3] + size + 100])  # the last two transactions gone
        said = "has lost transactions it had written"
    else:
        spoiled = bytearray(wal)
        spoiled[commits[-3] + size + 30] ^= 0xFF  # a page of the transaction after
        wal_path.write_bytes(bytes(spoiled))
        said = "2 committed transactions in it could not be recovered"
    with daemon:
        still_monitoring_python(daemon, sink.port)
    assert said in daemon.error_log(), daemon.error_log()
    no_traceback(daemon.error_log(), daemon.stderr())
