"""The faults of issue 15 made to the real daemon, with what each lost, what error.log said about
it, and how long the daemon took to recover: the figures of docs/BENCHMARKS.md's fault table.

    sudo python3 -m bench.faults [--only writer,monitor,...]

(from the repository root, as root; prints one line per fault, asserts nothing.) Each fault runs
the daemon under a private prefix with real traffic to a loopback server, as tests/test_faults.py
does, whose helpers it uses; "lost" compares the bytes the clients sent with what snitch.db holds.
"Recovered" is the time from the fault (or from its end: space back, the worker let go) until the
daemon works again: for a killed worker, until its successor runs; for the rest, until the traffic
held meanwhile is in snitch.db, or the fault's sentence is in error.log.
"""

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from daemon_harness import Daemon, Sink, wait_for  # noqa: E402
from test_daemon_lifecycle import talk  # noqa: E402
from test_faults import (  # noqa: E402
    HELD,
    IDENTITY_HELD,
    LOST,
    Workload,
    churn,
    conn_log_traffic,
    exe_log_news,
    fill,
    read_only,
    recorded_executables,
    said_times,
    sent_by,
    sent_to,
    small_filesystem,
    stored_traffic,
    wal_frames,
)


def kb(n: int) -> str:
    return f"{n / 1000:,.1f} kB"


def killed_worker(prefix, sink, netops, work, worker, pattern, times=3):
    """`worker` killed `times` times under churn: bytes lost, bytes said lost, slowest restart."""
    with Daemon(prefix) as daemon:
        load = churn(sink.port, 8)
        restarts = []
        for _ in range(times):
            time.sleep(1 + (len(restarts) * 0.37) % 1)
            victim = daemon.worker(worker)
            os.kill(victim, signal.SIGKILL)
            killed = time.monotonic()
            wait_for(lambda: (daemon.worker(worker) or victim) != victim, what=f"a new {worker}")
            restarts.append(time.monotonic() - killed)
        sent = int(load.communicate(timeout=60)[0])
        said = sum(int(t) for t in pattern.findall(daemon.error_log())) if pattern else 0
        try:
            wait_for(lambda: sent_to(daemon, sink.port) >= sent - said, timeout=30)
        except AssertionError:
            pass
        time.sleep(2)
        lost = sent - sent_to(daemon, sink.port)
        daemon.stop()
    lines = restart_lines(daemon, worker)
    return (f"{worker} killed {times}× under churn ({kb(sent)} sent)", kb(max(lost, 0)),
            f"{lines} restart lines; {kb(said)} said lost", f"{max(restarts):.2f} s (slowest restart)")


def restart_lines(daemon, worker):
    return said_times(daemon.error_log(), f"the {worker} worker stopped unexpectedly (killed by signal 9); "
                                          "restarting it")


def keeper(prefix, sink, netops, work):
    with Daemon(prefix) as daemon:
        programs, slowest = [], 0.0
        for round in range(3):
            program = work / f"new-{round}"
            shutil.copy(netops, program)
            programs.append(program)
            victim = daemon.worker("keeper")
            talk(program, sink.port, 100)
            os.kill(victim, signal.SIGKILL)
            killed = time.monotonic()
            wait_for(lambda: str(program) in recorded_executables(daemon.paths), what="the executable recorded")
            slowest = max(slowest, time.monotonic() - killed)
        daemon.stop()
    news = exe_log_news(daemon.paths)
    missing = [p for p in programs if str(p) not in recorded_executables(daemon.paths)]
    twice = [p for p in programs if news.count(str(p)) != 1]
    return ("keeper killed 3× just after a new executable's first connection",
            f"{len(missing)} executables (record.json), {len(twice)} exe.log lines missing or doubled",
            f"{restart_lines(daemon, 'keeper')} restart lines", f"{slowest:.2f} s (until record.json has it)")


def daemon_killed(prefix, sink, netops, work):
    daemon = Daemon(prefix, **{"DB write limit (seconds)": 5}).start()
    sent = int(churn(sink.port, 3).communicate(timeout=60)[0])
    time.sleep(1.5)
    daemon.kill_group()
    begun = time.monotonic()
    with daemon:
        wait_for(lambda: sent_to(daemon, sink.port) == sent, what="the window written")
        recovered = time.monotonic() - begun
    said = "did not stop cleanly" in daemon.error_log()
    return (f"kill -9 of the whole daemon, a 5 s window unwritten ({kb(sent)})", kb(sent - sent_to(daemon, sink.port)),
            "the unclean end, with when it was last seen" if said else "nothing",
            f"{recovered:.2f} s (start until the window is in snitch.db)")


def full_disk(prefix, sink, netops, work):
    with small_filesystem(prefix / "var", "32m") as var:
        with Daemon(prefix, **{"DB text log": True}) as daemon:
            load = Workload(netops, sink.port, work)
            time.sleep(2)
            filler = fill(var)
            for _ in range(5):
                load.new()
                time.sleep(1.5)
            filler.unlink()
            freed = time.monotonic()
            time.sleep(2)
            load.finish()
            wait_for(lambda: {p: sent_by(daemon, p, sink.port) for p in load.sent} == dict(load.sent), timeout=60)
            recovered = time.monotonic() - freed
            wait_for(lambda: set(map(str, load.programs)) <= recorded_executables(daemon.paths))
            lost = sum(load.sent.values()) - sum(sent_by(daemon, p, sink.port) for p in load.programs)
            daemon.stop()
        missing = len(set(map(str, load.programs)) - recorded_executables(daemon.paths))
        log = daemon.error_log()
    held = re.search(r"snitch\.db can be written again after \d+ s: (\d+) rows?, (\d+) bytes", log)
    return ("data filesystem full for 7.5 s, 5 new executables meanwhile", f"{kb(lost)}, {missing} executables",
            f"written again: {held.group(1)} rows, {kb(int(held.group(2)))} held" if held else "nothing",
            f"{recovered:.2f} s (space back until every byte is in snitch.db)")


def disk_and_spill_full(prefix, sink, netops, work):
    with small_filesystem(prefix / "var/lib", "32m") as lib, small_filesystem(prefix / "run", "1m") as run:
        with Daemon(prefix, **{"DB text log": True}) as daemon:
            load = Workload(netops, sink.port, work)
            time.sleep(2)
            fill(run)
            fill(lib)
            time.sleep(4)
            load.finish()
            time.sleep(1)
            daemon.stop()
        lost = conn_log_traffic(daemon.paths) - stored_traffic(daemon)
        said = sum(int(traffic) for _, traffic in LOST.findall(daemon.error_log()))
    return ("data and run filesystems both full until stop", kb(lost), f"{kb(said)} said lost",
            "– (still full at stop)")


def stalled(prefix, sink, netops, work, worker="writer"):
    program = work / "short-lived"
    shutil.copy(netops, program)
    with Daemon(prefix) as daemon:
        target = daemon.worker(worker)
        os.kill(target, signal.SIGSTOP)
        made = {}
        try:
            for i in range(60):
                begun = time.time()
                talk(program, sink.port, 1000 + i)
                made[1000 + i] = begun
                time.sleep(0.2)
        finally:
            os.kill(target, signal.SIGCONT)
        woke = time.monotonic()

        def rows():
            return daemon.rows("(rport = ? OR lport = ?) AND send >= 1000 AND send < 1060", (sink.port, sink.port))
        wait_for(lambda: len(rows()) >= 60, timeout=30)
        recovered = time.monotonic() - woke
        unknown = sum(r["exe"] != str(program) for r in rows())
        late = max(r["ts"] - made[r["send"]] for r in rows())
        daemon.stop()
    return (f"{worker} stopped (SIGSTOP) 12 s, 60 short-lived processes", f"{unknown} identities; timestamps at most "
            f"{late:.1f} s after the connection", "nothing to say", f"{recovered:.2f} s (SIGCONT until all written)")


def read_only_data(prefix, sink, netops, work):
    daemon = Daemon(prefix)
    with read_only(daemon.paths.data_dir):
        daemon.start()
        talk(netops, sink.port, 2345)
        wait_for(lambda: "snitch.db cannot be written (" in daemon.error_log())
    writable = time.monotonic()
    wait_for(lambda: sent_by(daemon, netops, sink.port) == 2345, timeout=30)
    recovered = time.monotonic() - writable
    daemon.stop()
    said = [what for what, line in (("the directory", "cannot be prepared (Read-only file system)"),
                                    ("snitch.db cannot be written", "snitch.db cannot be written ("),
                                    ("written again", "snitch.db can be written again"))
            if line in daemon.error_log() + daemon.stderr()]
    return ("data directory read-only at start", kb(2345 - sent_by(daemon, netops, sink.port)),
            "; ".join(said) or "nothing", f"{recovered:.2f} s (writable until written)")


def planted_link(prefix, sink, netops, work):
    daemon = Daemon(prefix)
    daemon.paths.data_dir.mkdir(parents=True)
    outside = work / "outside"
    outside.write_bytes(b"")
    daemon.paths.db.symlink_to(outside)
    begun = time.monotonic()
    with daemon:
        talk(netops, sink.port, 1234)
        wait_for(lambda: sent_by(daemon, netops, sink.port) == 1234)
        recovered = time.monotonic() - begun
    untouched = outside.read_bytes() == b"" and not Path(f"{outside}-wal").exists()
    said = f"{daemon.paths.db} was a symbolic link to {outside}: root does not write through links; moved it to"
    return ("snitch.db a symbolic link to a file outside", "nothing" + ("" if untouched else "; TARGET WRITTEN"),
            "the link, and where it was moved" if said in daemon.error_log() else "nothing",
            f"{recovered:.2f} s (start until first row)")


def damaged_wal(prefix, sink, netops, work):
    daemon = Daemon(prefix).start()
    churn(sink.port, 4).communicate(timeout=60)
    wait_for(lambda: sent_to(daemon, sink.port) > 0)
    time.sleep(2)
    daemon.kill_group()
    wal_path = Path(f"{daemon.paths.db}-wal")
    wal = bytearray(wal_path.read_bytes())
    frames, size = wal_frames(bytes(wal))
    commits = [offset for offset, commit in frames if commit]
    wal[commits[-3] + size + 30] ^= 0xFF
    wal_path.write_bytes(bytes(wal))
    begun = time.monotonic()
    with daemon:
        wait_for(lambda: "could not be recovered" in daemon.error_log())
        recovered = time.monotonic() - begun
    said = re.search(r"(\d+) committed transactions? in it could not be recovered", daemon.error_log())
    return ("a page of snitch.db-wal spoiled before start", f"{said.group(1) if said else '?'} transactions",
            "those transactions, and where the -wal is damaged", f"{recovered:.2f} s (start until said)")


FAULTS = {
    "writer": lambda *a: killed_worker(*a, "writer", None, 5),
    "monitor": lambda *a: killed_worker(*a, "monitor", HELD),
    "identity": lambda *a: killed_worker(*a, "identity", IDENTITY_HELD),
    "keeper": keeper,
    "daemon": daemon_killed,
    "full": full_disk,
    "spill": disk_and_spill_full,
    "stall": stalled,
    "readonly": read_only_data,
    "link": planted_link,
    "wal": damaged_wal,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(FAULTS), help="comma-separated: " + ", ".join(FAULTS))
    args = parser.parse_args()
    netops = Path(tempfile.mkdtemp(prefix="faults-")) / "netops"
    subprocess.run(["gcc", "-O2", "-o", str(netops), str(REPO / "tests/c/netops.c"), "-luring", "-pthread"],
                   check=True)
    print("| Fault | Lost | Reported in error.log | Recovered in |")
    print("|---|---|---|---|")
    for name in args.only.split(","):
        work = Path(tempfile.mkdtemp(prefix=f"fault-{name}-"))
        sink = Sink()
        try:
            row = FAULTS[name](work / "prefix", sink, netops, work)
        except Exception as e:  # noqa: BLE001 - a fault the bench could not measure is a row too
            row = (name, "?", f"not measured: {type(e).__name__}: {e}".splitlines()[0][:200], "?")
        finally:
            sink.sock.close()
            Daemon(work / "prefix").cli("stop")
        print("| " + " | ".join(row) + " |", flush=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
