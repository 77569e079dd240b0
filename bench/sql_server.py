"""How fast the remote SQL worker fills PostgreSQL and MariaDB, and what it costs in CPU.

    sudo python3 -m bench.sql_server [--rows 100000] [--per-window 2000] [--seconds 20]
                                     [--rate 1000]

(from the repository root, as root, with Debian's postgresql and mariadb-server and the
psycopg / PyMySQL drivers installed; prints figures, asserts nothing.)

Per server (started on loopback in a private directory, as the tests do), two runs of the real
worker (`picosnitch.sql_worker.run` in its own process, fed over a real pipe):

- sustained: `--rows` rows in windows of `--per-window` rows, all already over, sent as fast as
  the pipe takes them; the figure is rows / seconds until the server holds them all, and the
  worker's CPU time (user + system, from /proc) over that time.
- daemon-like: for `--seconds`, every 0.5 s a list of Connections with the current 1 s window's
  ts, `--rate` rows per second in all; the figure is the worker's CPU share while it keeps up,
  and the time the sender (the identity worker, in the daemon) spends per list on the extra pipe.
"""

import argparse
import json
import multiprocessing
import os
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from picosnitch import config, sql_worker  # noqa: E402
from picosnitch.connection import Connection, Endpoint, Identity, ProcessInfo  # noqa: E402
from picosnitch.messages import Stop  # noqa: E402
from picosnitch.paths import Paths  # noqa: E402
import sql_servers  # noqa: E402

ctx = multiprocessing.get_context("fork")
TICKS = os.sysconf("SC_CLK_TCK")


def connection(n: int, ts: int) -> Connection:
    """The n-th distinct (identity, endpoint) pair of a window, with plausible text."""
    process = ProcessInfo("/usr/bin/prog%d" % (n % 300), "prog%d" % (n % 300),
                          "prog%d --option %s" % (n % 300, "a" * 100), "%064x" % (n % 300))
    parent = ProcessInfo("/usr/bin/bash", "bash", "bash -l", "ab" * 32)
    identity = Identity(process, parent, ProcessInfo(), uid=1000, netns=4026531840)
    endpoint = Endpoint(2, 6, "10.0.0.2", 40000 + n % 20000, "203.0.%d.%d" % (n // 250 % 250,
                        n % 250), 443, "com.example.host%d" % n)
    return Connection(identity, endpoint, ts, 1000 + n, 2000 + n, 3, 4)


def cpu_seconds(pid: int) -> float:
    fields = Path("/proc/%d/stat" % pid).read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime


class Worker:
    """The SQL worker in its own process, its keeper pipe drained by a thread."""

    def __init__(self, server, table: str):
        self.prefix = sql_servers.shared_tempdir("picosnitch-bench-")
        paths = Paths.under(self.prefix)
        paths.ensure_dirs()
        cfg = config.parse(json.dumps({"DB write limit (seconds)": 1,
                                       "DB sql server": server.params(table_name=table)}))
        inbox_r, self.inbox = ctx.Pipe(duplex=False)
        keeper_r, keeper_w = ctx.Pipe(duplex=False)
        self.process = ctx.Process(target=sql_worker.run, args=(cfg, paths, inbox_r, keeper_w))
        self.process.start()
        keeper_w.close()
        self.reports = []
        threading.Thread(target=self._collect, args=(keeper_r,), daemon=True).start()

    def _collect(self, keeper_r) -> None:
        try:
            while True:
                self.reports.append(keeper_r.recv())
        except EOFError:
            pass

    def stop(self) -> None:
        self.inbox.send(Stop("identity"))
        self.process.join(60)


def count(server, table: str) -> int:
    return server.query("SELECT count(*) FROM %s" % table)[0][0]


def sustained(server, rows: int, per_window: int) -> dict:
    table = "bench_sustained"
    server.drop(table)
    worker = Worker(server, table)
    time.sleep(1)  # started, privileges dropped
    lists = [[connection(n, 1_700_000_000 + w) for n in range(per_window)]
             for w in range(rows // per_window)]
    total = len(lists) * per_window
    cpu0, start = cpu_seconds(worker.process.pid), time.monotonic()
    for connections in lists:
        worker.inbox.send(connections)
    while count(server, table) < total:
        time.sleep(0.05)
    took = time.monotonic() - start
    cpu = cpu_seconds(worker.process.pid) - cpu0
    worker.stop()
    return {"rows": total, "seconds": took, "rows_per_s": total / took, "cpu_s": cpu,
            "cpu_us_per_row": cpu / total * 1e6, "errors": len(worker.reports) - 1}


def daemon_like(server, seconds: float, rate: int) -> dict:
    table = "bench_daemon"
    server.drop(table)
    worker = Worker(server, table)
    time.sleep(1)
    per_list = rate // 2
    cpu0, start = cpu_seconds(worker.process.pid), time.monotonic()
    sent = send_time = 0.0
    tick = start
    while time.monotonic() - start < seconds:
        ts = int(time.time())
        connections = [connection(n + int(sent) % 2 * per_list, ts) for n in range(per_list)]
        began = time.perf_counter()
        worker.inbox.send(connections)
        send_time += time.perf_counter() - began
        sent += 1
        tick += 0.5
        time.sleep(max(tick - time.monotonic(), 0))
    took = time.monotonic() - start
    cpu = cpu_seconds(worker.process.pid) - cpu0
    worker.stop()
    return {"rows_per_s": rate, "cpu_percent": 100 * cpu / took,
            "send_ms_per_list": send_time / sent * 1000, "rows_on_server": count(server, table),
            "errors": len(worker.reports) - 1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--per-window", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--rate", type=int, default=1000)
    args = parser.parse_args()
    base = sql_servers.shared_tempdir("picosnitch-bench-servers-")
    for kind in ("postgres", "mariadb"):
        server = sql_servers.start_server(kind, base)
        try:
            print(kind, "sustained", json.dumps(sustained(server, args.rows, args.per_window)))
            print(kind, "daemon-like", json.dumps(daemon_like(server, args.seconds, args.rate)))
        finally:
            server.close()


if __name__ == "__main__":
    main()
