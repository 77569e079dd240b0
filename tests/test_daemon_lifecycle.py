"""The daemon as users and systemd meet it: the CLI commands, config.json, crash safety of
snitch.db, damaged files, worker restarts, and executables that change on disk.

Every test runs the real daemon under its own PICOSNITCH_PREFIX; traffic goes over loopback only.
"""

import hashlib
import json
import multiprocessing
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
from daemon_harness import REPO, Daemon, Sink, wait_for

from picosnitch import channels
from picosnitch import config as config_file
from picosnitch.daemon import supervisor
from picosnitch.store.sqlite import decode_text

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: runs the daemon")

COUNTS = ("send", "recv", "packets_sent", "packets_recv", "contime")


@pytest.fixture(scope="module")
def sink():
    s = Sink()
    yield s
    s.sock.close()


@pytest.fixture
def prefix(tmp_path):
    """A private prefix; a daemon `picosnitch start` left running in it is stopped afterwards."""
    root = tmp_path / "prefix"
    yield root
    Daemon(root).cli("stop")


def talk(program, port, size):
    """Runs `program quick` (tests/c/netops.c): connect to the sink, send `size` bytes, exit."""
    subprocess.run([str(program), "quick", "127.0.0.1", str(port), str(size)], check=True,
                   capture_output=True)


def rows_to(daemon, port, where="1", params=()):
    return daemon.rows(f"(rport = ? OR lport = ?) AND {where}", (port, port, *params))


def recorded_hashes(paths):
    """record.json's "SHA256 by executable" ({} until the record keeper first saves it)."""
    try:
        return json.loads(paths.record.read_text())["SHA256 by executable"]
    except FileNotFoundError:
        return {}


def sha256_of(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# --- start, status, stop, restart, version, help, systemd ---------------------------------------

def test_start_status_stop_restart(prefix):
    daemon = Daemon(prefix)
    paths = daemon.paths

    assert daemon.cli("status").returncode == 3
    stopped = daemon.cli("stop")
    assert (stopped.returncode, stopped.stdout) == (0, "picosnitch is not running\n")

    started = daemon.cli("start")  # returns only once the daemon is ready
    assert started.returncode == 0, started.stderr
    pid = int(re.fullmatch(r"picosnitch started \(pid (\d+)\)\n", started.stdout).group(1))
    assert paths.pid_file.read_text().strip() == str(pid)
    assert os.getsid(pid) not in (os.getsid(0), pid)  # detached: a new session, and never its leader
    # First start writes config.json with every default.
    assert json.loads(paths.config.read_text()) == config_file.defaults()

    status = daemon.cli("status")
    assert (status.returncode, status.stdout) == (0, f"picosnitch is running (pid {pid})\n")

    again = daemon.cli("start")
    assert again.returncode == 1
    assert again.stderr == f"picosnitch: picosnitch is already running (pid {pid})\n"

    restarted = daemon.cli("restart")
    assert restarted.returncode == 0, restarted.stderr
    assert f"picosnitch stopped (pid {pid})" in restarted.stdout
    new_pid = int(re.search(r"picosnitch started \(pid (\d+)\)", restarted.stdout).group(1))
    assert new_pid != pid

    stopped = daemon.cli("stop")
    assert (stopped.returncode, stopped.stdout) == (0, f"picosnitch stopped (pid {new_pid})\n")
    wait_for(lambda: not os.path.exists(f"/proc/{new_pid}"), timeout=5, what="the daemon's exit")
    assert daemon.cli("status").returncode == 3


def test_stale_pid_file_is_not_signalled(prefix):
    daemon = Daemon(prefix)
    daemon.paths.run_dir.mkdir(parents=True)
    bystander = subprocess.Popen(["sleep", "300"])
    try:
        daemon.paths.pid_file.write_text(f"{bystander.pid}\n")
        assert daemon.cli("status").returncode == 3
        stopped = daemon.cli("stop")
        assert (stopped.returncode, stopped.stdout) == (0, "picosnitch is not running\n")
        started = daemon.cli("start")
        assert started.returncode == 0, started.stderr
        assert daemon.paths.pid_file.read_text().strip() != str(bystander.pid)
        assert daemon.cli("stop").returncode == 0
        assert bystander.poll() is None  # never signalled
    finally:
        bystander.kill()
        bystander.wait()


def test_version_help_unknown_command(prefix):
    daemon = Daemon(prefix)
    version = daemon.cli("version")
    assert version.returncode == 0
    assert version.stdout.startswith("picosnitch ")
    for name, path in daemon.paths.as_dict().items():
        assert f"{name}: {path}\n" in version.stdout

    for args in (("help",), ("--help",), ()):
        shown = daemon.cli(*args)
        assert shown.returncode == 0
        assert shown.stdout.startswith("usage: picosnitch COMMAND")
        for command in ("start", "stop", "restart", "start-no-daemon", "systemd", "status", "version", "help"):
            assert re.search(rf"^  {command} ", shown.stdout, re.M), command

    unknown = daemon.cli("frobnicate")
    assert unknown.returncode == 2 and unknown.stdout == ""
    assert "unknown command 'frobnicate'" in unknown.stderr and "usage: picosnitch COMMAND" in unknown.stderr


@pytest.mark.parametrize("command", ["start", "stop", "restart", "start-no-daemon", "systemd"])
def test_root_commands_refuse_without_root(prefix, command):
    env = dict(os.environ, PYTHONPATH=str(REPO), PICOSNITCH_PREFIX=str(prefix))
    result = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                             "/usr/bin/python3", "-m", "picosnitch", command],
                            capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL, timeout=60)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr == f"picosnitch {command} needs root\n"
    assert not prefix.exists()  # refused before touching anything


def test_systemd_writes_the_repository_unit(prefix):
    result = Daemon(prefix).cli("systemd")
    unit = prefix / "etc/systemd/system/picosnitch.service"
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"wrote {unit}\n"
    assert unit.read_text() == (REPO / "picosnitch.service").read_text()


# --- config.json ---------------------------------------------------------------------------------

BAD_CONFIGS = {
    "invalid JSON": ('{\n  "DB sql log": true\n  "Log ports": false\n}\n', 3, None),
    "wrong type": ('{\n  "DB retention (days)": 30,\n  "DB sql log": "yes"\n}\n', 3, "DB sql log"),
    "out of range": ('{\n  "DB write limit (seconds)": 0\n}\n', 2, "DB write limit (seconds)"),
    "not a power of two": ('{"Log ports": true,\n\n "Perf ring buffer (pages)": 100}', 3,
                           "Perf ring buffer (pages)"),
    "a write limit of 1e12 s": ('{\n"DB write limit (seconds)": 1000000000000}', 2, "DB write limit (seconds)"),
    "RLIMIT_NOFILE 1e20": ('{\n"Set RLIMIT_NOFILE": 100000000000000000000}', 2, "Set RLIMIT_NOFILE"),
    "RLIMIT_NOFILE above fs.nr_open": ('{\n"Set RLIMIT_NOFILE": %d}' % (int(Path("/proc/sys/fs/nr_open").read_text()) + 1),
                                       2, "Set RLIMIT_NOFILE"),
    "a flow map of 2^32 entries": ('{\n"Flow map entries": 4294967296}', 2, "Flow map entries"),
    "a ring buffer of 2^31 pages": ('{\n\n"Perf ring buffer (pages)": 2147483648}', 3, "Perf ring buffer (pages)"),
    "nested arrays": ('{\n"Log ignore": ' + "[" * 500_000 + "]" * 500_000 + "}", 2, None),
    "an invalid subnet to ignore": ('{"DB sql log": true,\n "Log ignore": [443, "999.1.1.1/77"]}', 2, "Log ignore"),
}


@pytest.mark.parametrize("command", ["start", "start-no-daemon"])
@pytest.mark.parametrize("case", BAD_CONFIGS)
def test_bad_config_refuses_to_start(prefix, case, command):
    text, line, key = BAD_CONFIGS[case]
    daemon = Daemon(prefix)
    daemon.paths.config_dir.mkdir(parents=True)
    daemon.paths.config.write_text(text)
    result = daemon.cli(command, timeout=30)
    assert result.returncode == 78  # EX_CONFIG: the unit's RestartPreventExitStatus
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1, result.stderr  # one message
    assert result.stderr.startswith(f"picosnitch: {daemon.paths.config} line {line}")
    if key:
        assert f'"{key}"' in result.stderr
    assert daemon.paths.config.read_text() == text  # left as the user wrote it
    assert daemon.cli("status").returncode == 3


def test_config_json_as_a_fifo_refuses_to_start_at_once(prefix):
    daemon = Daemon(prefix)
    daemon.paths.config_dir.mkdir(parents=True)
    os.mkfifo(daemon.paths.config)
    result = daemon.cli("start-no-daemon", timeout=30)
    assert result.returncode == 78
    assert result.stderr == (f"picosnitch: {daemon.paths.config}: is not a regular file (it is a FIFO); "
                             "picosnitch will not start until it is fixed\n")


def test_unknown_key_warns_and_is_kept(prefix):
    daemon = Daemon(prefix)
    daemon.paths.config_dir.mkdir(parents=True)
    daemon.paths.config.write_text('{"DB write limit (seconds)": 1,\n "Log port": false}\n')
    started = daemon.cli("start")
    assert started.returncode == 0, started.stderr
    assert daemon.cli("stop").returncode == 0
    warning = f'{daemon.paths.config} line 2: unknown key "Log port" is kept but not used (did you mean "Log ports"?)'
    assert started.stderr == f"picosnitch: {warning}\n"
    assert warning in daemon.error_log()
    assert json.loads(daemon.paths.config.read_text())["Log port"] is False


def test_documented_example_with_comments_is_accepted(prefix):
    daemon = Daemon(prefix)
    daemon.paths.config_dir.mkdir(parents=True)
    daemon.paths.config.write_text(config_file.example_text())
    started = daemon.cli("start")
    assert started.returncode == 0, started.stderr
    assert started.stderr == ""
    assert daemon.cli("stop").returncode == 0
    assert daemon.paths.config.read_text() == config_file.example_text()


# --- crash safety and damaged files ---------------------------------------------------------------

# Short connections, about 500 a second: each is a new endpoint (its own local port), so every
# write window is a transaction of some thousand rows.
CHURN = """\
import socket, sys, time
while True:
    with socket.create_connection(("127.0.0.1", int(sys.argv[1]))) as s:
        s.sendall(b"c" * 1000)
    time.sleep(0.002)
"""


def committed(db, port, check=False):
    """(send, recv) by every other column, of each row to or from `port`; rows with equal keys
    (if any) are summed. `check`: open read-write, as the restarted daemon would, after
    asserting that PRAGMA integrity_check finds nothing wrong."""
    conn = sqlite3.connect(db) if check else sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    conn.text_factory = decode_text
    try:
        if check:
            assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        cursor = conn.execute("SELECT * FROM connections WHERE rport = ? OR lport = ?", (port, port))
        columns = [c[0] for c in cursor.description]
        found = {}
        for values in cursor:
            row = dict(zip(columns, values))
            key = tuple((k, v) for k, v in row.items() if k not in COUNTS)
            send, recv = found.get(key, (0, 0))
            found[key] = (send + row["send"], recv + row["recv"])
        return found
    finally:
        conn.close()


def test_kill_9_during_busy_writes_keeps_committed_rows(prefix, sink):
    daemon = Daemon(prefix)
    churn = subprocess.Popen([sys.executable, "-c", CHURN, str(sink.port)])
    try:
        for cycle in range(20):
            daemon.start()
            wait_for(lambda: committed(daemon.paths.db, sink.port), what=f"cycle {cycle}: a window committed")
            time.sleep(random.random())  # then any moment of the next
            before = committed(daemon.paths.db, sink.port)
            daemon.kill_group()
            after = committed(daemon.paths.db, sink.port, check=True)
            assert before, f"cycle {cycle}: nothing recorded"
            lost = [key for key, (send, recv) in before.items()
                    if key not in after or after[key][0] < send or after[key][1] < recv]
            assert not lost, f"cycle {cycle}: {len(lost)} of {len(before)} committed rows lost or shrunk"
    finally:
        churn.kill()
        churn.wait()
    assert "unusable" not in daemon.error_log()
    assert not list(daemon.paths.data_dir.glob("snitch.db.bad-*"))


def test_sigterm_writes_traffic_made_just_before(prefix, sink, netops):
    # A write window far longer than the test: only the drain at exit can write these bytes.
    with Daemon(prefix, **{"DB write limit (seconds)": 3600}) as daemon:
        talk(netops, sink.port, 12345)
        assert daemon.stop() == 0
    sent = sum(r["send"] for r in rows_to(daemon, sink.port, "exe = ?", (netops,)))
    assert sent == 12345


@pytest.mark.parametrize("damage", ["not a database", "damaged pages"])
def test_corrupt_db_is_moved_aside(prefix, sink, netops, damage):
    daemon = Daemon(prefix)
    db = daemon.paths.db
    if damage == "not a database":
        db.parent.mkdir(parents=True)
        db.write_bytes(b"this is not an SQLite database\n" * 200)
    else:
        with daemon:
            talk(netops, sink.port, 100)
            time.sleep(1.5)
        data = bytearray(db.read_bytes())
        page = 4096
        assert len(data) > 4 * page
        rng = random.Random(1)
        data[page:] = bytes(rng.getrandbits(8) for _ in range(len(data) - page))  # all but the header page
        db.write_bytes(bytes(data))
    damaged = db.read_bytes()

    with daemon:
        talk(netops, sink.port, 200)
        wait_for(lambda: rows_to(daemon, sink.port, "send = 200"), what="a row in the new snitch.db")
    aside = list(db.parent.glob("snitch.db.bad-*"))
    assert [p.name for p in aside] == [re.fullmatch(r"snitch\.db\.bad-\d+", aside[0].name).group()]
    assert aside[0].read_bytes() == damaged
    assert f"{db} was unusable (" in daemon.error_log()
    assert f"moved to {aside[0]}, started a new one" in daemon.error_log()
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    conn.close()


def test_corrupt_record_json_is_moved_aside(prefix, sink, netops):
    daemon = Daemon(prefix)
    record = daemon.paths.record
    record.parent.mkdir(parents=True)
    record.write_text('{"Names by executable": {"/usr/bin/x": ["x"')
    with daemon:
        talk(netops, sink.port, 100)
        wait_for(lambda: netops in recorded_hashes(daemon.paths), what="a new record.json")
    aside = list(record.parent.glob("record.json.bad-*"))
    assert len(aside) == 1 and re.fullmatch(r"record\.json\.bad-\d+", aside[0].name)
    assert aside[0].read_text() == '{"Names by executable": {"/usr/bin/x": ["x"'
    assert f"{record} could not be read (" in daemon.error_log()
    assert f"moved it to {aside[0]} and started a new record" in daemon.error_log()
    assert "/usr/bin/x" not in json.loads(record.read_text())["Names by executable"]


# --- the supervisor ------------------------------------------------------------------------------

def holder_of(daemon, target):
    """The daemon process that has `target` open (a path or an anon_inode name)."""
    for pid in daemon.workers():
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except FileNotFoundError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                    return pid
            except FileNotFoundError:
                pass
    return None


@pytest.mark.parametrize("worker,target", [("writer", "snitch.db"), ("identity", "anon_inode:[fanotify]")])
def test_killed_worker_is_restarted(prefix, sink, netops, worker, target):
    with Daemon(prefix) as daemon:
        target = str(daemon.paths.db) if target == "snitch.db" else target
        victim = wait_for(lambda: holder_of(daemon, target), what=f"the {worker} worker")
        os.kill(victim, signal.SIGKILL)
        line = f"the {worker} worker stopped unexpectedly (killed by signal 9); restarting it"
        wait_for(lambda: line in daemon.error_log(), what="the restart in error.log")
        restarted = wait_for(lambda: holder_of(daemon, target), what=f"a new {worker} worker")
        assert restarted != victim
        talk(netops, sink.port, 4321)
        wait_for(lambda: rows_to(daemon, sink.port, "exe = ? AND send = 4321", (netops,)),
                 what="traffic recorded after the restart")
        assert daemon.stop() == 0


def is_running(pid):
    """True for a live process (not a zombie waiting to be reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(") ")[2][0] != "Z"
    except FileNotFoundError:
        return False


def test_killing_only_the_supervisor_stops_every_worker_and_keeps_the_traffic(prefix, sink, netops):
    with Daemon(prefix) as daemon:
        workers = daemon.workers()
        talk(netops, sink.port, 2468)
        os.kill(daemon.proc.pid, signal.SIGKILL)  # the workers are not signalled
        daemon.proc.wait(10)
        try:
            wait_for(lambda: not any(is_running(pid) for pid in workers),
                     timeout=30, what="every worker to exit after the supervisor died")
        finally:  # a failure must not leave them running
            for pid in filter(is_running, workers):
                os.kill(pid, signal.SIGKILL)
    # the monitor drained the kernel and the pipeline wrote what it held, as on SIGTERM
    assert rows_to(daemon, sink.port, "exe = ? AND send = 2468", (netops,))


def thread_names(pid):
    names = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            names.append(Path(f"/proc/{pid}/task/{task}/comm").read_text().strip())
        except FileNotFoundError:
            pass
    return names


def test_the_live_feed_and_the_baseline_run_in_the_keepers_process(prefix):
    """Privilege separation decides the processes: these three run as root, parse nothing from
    the network and fork nothing, so they share one interpreter."""
    with Daemon(prefix) as daemon:
        comms = {pid: Path(f"/proc/{pid}/comm").read_text().strip() for pid in daemon.workers()}
        assert "snitch-live" not in comms.values() and "snitch-baseline" not in comms.values()
        keeper = [pid for pid, comm in comms.items() if comm == "snitch-keeper"]
        assert len(keeper) == 1
        assert sorted(thread_names(keeper[0])) == ["snitch-baseline", "snitch-keeper", "snitch-live"]
        assert daemon.stop() == 0
    assert "stopped unexpectedly" not in daemon.error_log() and "did not stop" not in daemon.error_log()


def crashing_live_feed(*args):
    raise ValueError("a bug in the live feed")


def test_a_room_ends_at_once_when_one_of_its_workers_fails_and_says_which():
    last_words, to_supervisor = channels.pair()
    never = threading.Event()
    workers = [("keeper", never.wait, (60,)), ("live", crashing_live_feed, ())]
    room = multiprocessing.get_context("fork").Process(target=supervisor._room, args=(workers, to_supervisor))
    room.start()
    room.join(30)
    assert room.exitcode == 1
    ended = last_words.recv()
    assert ended.name == "keeper" and ended.reason.startswith("its live worker failed: ValueError: a bug in the live feed")


# --- executables that change on disk --------------------------------------------------------------

def test_changed_executables_get_their_new_sha256(prefix, sink, netops, tmp_path):
    programs = tmp_path / "programs"
    programs.mkdir()
    in_place, renamed = programs / "in-place", programs / "renamed"
    for program in (in_place, renamed):
        shutil.copy(netops, program)
    with Daemon(prefix) as daemon:
        old = {program: sha256_of(program) for program in (in_place, renamed)}
        for program in old:
            talk(program, sink.port, 100)
        wait_for(lambda: all(str(p) in recorded_hashes(daemon.paths) for p in old),
                 what="both executables in record.json")
        assert {p: list(recorded_hashes(daemon.paths)[str(p)]) for p in old} == {p: [h] for p, h in old.items()}

        with open(in_place, "ab") as f:  # modified in place: same inode
            f.write(b"\0appended")
        replacement = programs / ".renamed.new"  # replaced the way package managers do it
        replacement.write_bytes(renamed.read_bytes() + b"\0replaced")
        replacement.chmod(0o755)
        os.rename(replacement, renamed)
        new = {program: sha256_of(program) for program in (in_place, renamed)}

        wait_for(lambda: all(h in recorded_hashes(daemon.paths).get(str(p), {}) for p, h in new.items()),
                 what="the new hashes in record.json")
        exe_log = daemon.paths.exe_log.read_text()
        for program in (in_place, renamed):
            assert set(recorded_hashes(daemon.paths)[str(program)]) == {old[program], new[program]}
            changes = [line for line in exe_log.splitlines()
                       if ", new sha256, " in line and f", {program}, " in line]
            # (copies of a test program: no package installed them)
            assert len(changes) == 1 and changes[0].endswith(
                f", {program}, {new[program]}, modified outside any package"), exe_log


def test_rewrite_in_place_reports_only_the_final_hash(prefix, sink, netops, tmp_path):
    program = tmp_path / "rewritten"
    shutil.copy(netops, program)
    with Daemon(prefix) as daemon:
        talk(program, sink.port, 100)
        wait_for(lambda: str(program) in recorded_hashes(daemon.paths), what="the executable in record.json")
        content = program.read_bytes() + b"\0" * 4_000_000
        with open(program, "wb") as f:  # as `cp` does it: truncate, then write (here slowly)
            time.sleep(0.5)
            f.write(content)
        new = sha256_of(program)
        wait_for(lambda: new in recorded_hashes(daemon.paths)[str(program)], what="the new hash")
        assert set(recorded_hashes(daemon.paths)[str(program)]) == {sha256_of(netops), new}
