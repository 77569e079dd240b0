"""How fast the remote SQL worker fills PostgreSQL and MariaDB, what it costs in CPU, and how
fast `view --db` and `dash --db` read a week with and without the hourly rollup.

    sudo python3 -m bench.sql_server [--rows 100000] [--per-window 2000] [--seconds 20]
                                     [--rate 1000]
    sudo python3 -m bench.sql_server --queries [--query-rows 1000000] [--hosts 4]

(from the repository root, as root, with Debian's postgresql and mariadb-server and the
psycopg / PyMySQL drivers installed; prints figures, asserts nothing.)

Per server (started on loopback in a private directory, as the tests do), two runs of the real
worker (`picosnitch.central.worker.run` in its own process, fed over a real pipe):

- sustained: `--rows` rows in windows of `--per-window` rows, sent as fast as the pipe takes
  them; the figure is rows / seconds until the server holds them all, and the worker's CPU time
  (user + system, from /proc) over that time. Twice: windows 10 minutes apart a month ago (hours
  the worker does not roll up), then two days ahead (each hour rolled up once the next begins).
- daemon-like: for `--seconds`, every 0.5 s a list of Connections with the current 1 s window's
  ts, `--rate` rows per second in all; the figure is the worker's CPU share while it keeps up,
  and the time the sender (the identity worker, in the daemon) spends per list on the extra pipe.

With --queries, instead: a table of `--query-rows` rows over the last 7 days from `--hosts`
machines (10 s windows; connections come and go, each with its own local port, popular ones
lasting longer), written as the sender does (ServerWriter.write with what HourlyRollup.plan adds,
one batch per machine and hour, each closing the hour before; the current hour stays open). Then
the reads of the view and the dashboard over the week that ends now (mid-hour edges), each timed
with the rollup and without (ServerHistory(rollup=False): every row raw), alternately, and the
median of `--repeats` printed side by side; the two answers are checked equal.
"""

import argparse
import json
import multiprocessing
import os
import random
import shutil
import statistics
import sys
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import sql_servers  # noqa: E402

from picosnitch import channels, config  # noqa: E402
from picosnitch.central import worker as sql_worker  # noqa: E402
from picosnitch.central.backlog import Batch  # noqa: E402
from picosnitch.central.queries import ServerHistory, ServerSQL  # noqa: E402
from picosnitch.central.rollup import HOUR, HourlyRollup, hour_of  # noqa: E402
from picosnitch.central.settings import load_driver, parse  # noqa: E402
from picosnitch.central.writer import ServerWriter, make_row  # noqa: E402
from picosnitch.connection import Connection, Endpoint, Identity, ProcessInfo  # noqa: E402
from picosnitch.messages import Stop  # noqa: E402
from picosnitch.paths import Paths  # noqa: E402
from picosnitch.store.queries import Filter  # noqa: E402
from picosnitch.ui.dash.api import DRILL_DOWN  # noqa: E402

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
        inbox_r, self.inbox = channels.pair(sender_waits=True)
        keeper_r, keeper_w = channels.pair()
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
        shutil.rmtree(self.prefix, ignore_errors=True)


def count(server, table: str) -> int:
    return server.query("SELECT count(*) FROM %s" % table)[0][0]


def sustained(server, rows: int, per_window: int, rollup: bool) -> dict:
    """Windows 10 minutes apart: in the past (before the worker started, so no hour is rolled
    up), or, with `rollup`, in the future (every hour closed is rolled up as the daemon does)."""
    table = "bench_sustained"
    server.drop(table)
    worker = Worker(server, table)
    time.sleep(1)  # started, privileges dropped
    first = hour_of(int(time.time())) + (86400 if rollup else -30 * 86400)
    lists = [[connection(n, first + 600 * w) for n in range(per_window)]
             for w in range(rows // per_window + 1)]  # the last one is not waited for
    total = (len(lists) - 1) * per_window
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


# ---- --queries: reading a week with and without the rollup ----

WEEK = 7 * 86400
WINDOW = 10
ACTIVE = 600  # connections open at any moment on a machine, as in bench/view_queries.py


class Machine:
    """One machine's traffic: processes, and connections that come and go."""

    def __init__(self, number: int, rng: random.Random):
        self.host, self.machine = "host%d.example" % number, "%032x" % (number + 1)
        self.rng = rng
        processes = [ProcessInfo("/usr/bin/prog%d" % n, "prog%d" % n,
                                 "prog%d --option %d" % (n, n), "%064x" % n) for n in range(150)]
        parent = ProcessInfo("/usr/bin/bash", "bash", "bash -l", "ab" * 32)
        self.identities = [Identity(p, parent, ProcessInfo(), uid=1000, netns=4026531840)
                           for p in processes]
        self.opened = 0
        self.active = [self.connect() for _ in range(ACTIVE)]
        self.weights = [1 / (k + 1) for k in range(ACTIVE)]

    def connect(self) -> tuple:
        n, rng = self.opened, self.rng
        self.opened += 1
        identity = self.identities[min(int(rng.paretovariate(1.1)) - 1, len(self.identities) - 1)]
        peer = min(int(rng.paretovariate(1.2)), 3000)
        return identity, Endpoint(2, 6, "192.168.1.20", 32768 + n % 28000,
                                  "203.0.%d.%d" % (peer // 250, peer % 250 + 1),
                                  rng.choice((443, 443, 80, 53)), "com.site%d.www" % peer)

    def window(self, ts: int, count: int) -> list:
        for _ in range(2):  # connections close and open
            self.active[self.rng.randrange(ACTIVE)] = self.connect()
        chosen = set(self.rng.choices(range(ACTIVE), self.weights, k=count))
        return [Connection(*self.active[k], ts, self.rng.randrange(40, 200000),
                           self.rng.randrange(40, 2000000), 3, 4) for k in chosen]


def fill(server, table: str, rows: int, hosts: int, now: int) -> None:
    """`rows` rows of `hosts` machines over the week before `now`, with their rollup."""
    setting = config.parse(json.dumps({"DB sql server": server.params(table_name=table)}))
    writer = ServerWriter(parse(setting), load_driver(parse(setting), setting), print)
    assert writer.open(), writer.rollup_problem
    rng = random.Random(1)
    machines = [Machine(n, rng) for n in range(hosts)]
    per_window = rows / hosts / (WEEK // WINDOW)
    for machine in machines:
        rollup = HourlyRollup(hour_of(now - WEEK))
        first = now - WEEK - (now - WEEK) % WINDOW
        for hour in range(hour_of(first), now, HOUR):
            connections = []
            for ts in range(max(hour, first), min(hour + HOUR, now), WINDOW):
                connections += machine.window(ts, int(per_window + rng.random()))
            batch = Batch(uuid.uuid4().hex, [make_row(c, machine.host, machine.machine)
                                              for c in connections], (0, 0), hour)
            if batch.rows:
                plan = rollup.plan(batch.rows, batch.closes, True)
                assert writer.write(batch, plan.hourly, plan.hours)
                rollup.committed(plan)
    writer.close()
    analyze = "ANALYZE %s" if server.dialect == "postgres" else "ANALYZE TABLE %s"
    for suffix in sql_servers.SUFFIXES:
        server.query(analyze % (table + suffix))


def reads(history: ServerHistory, start: int, end: int) -> dict:
    """What the view and the dashboard ask for a week, by name."""
    exe = "/usr/bin/prog3"
    only = [Filter("exe", exe)]
    return {
        "view: executable tab": lambda: history.tab("exe", start, end, []),
        "view: remote address tab": lambda: history.tab("raddr", start, end, []),
        "view: entry time tab": lambda: history.tab("contime", start, end, []),
        "dash: series by executable": lambda: history.series("exe", start, end, []),
        "dash: series by host": lambda: history.series("host", start, end, []),
        "dash: local port values": lambda: history.tab("lport", start, end, []),
        "dash: drill-down (%d tabs + first/last seen)" % len(DRILL_DOWN): lambda: (
            [history.tab(column, start, end, only) for column in DRILL_DOWN],
            history.first_last_seen(only)),
    }


def queries(server, rows: int, hosts: int, repeats: int) -> None:
    table = "bench_queries"
    server.drop(table)
    now = int(time.time())
    began = time.monotonic()
    fill(server, table, rows, hosts, now)
    counts = {suffix or "raw": count(server, table + suffix)
              for suffix in ("", "_hourly", "_hours")}
    print("%s: %d raw rows, %d hourly rows, %d hours marked (filled in %.0f s)" % (
        server.dialect, counts["raw"], counts["_hourly"], counts["_hours"],
        time.monotonic() - began))
    setting = config.parse(json.dumps({"DB sql server": server.params(table_name=table)}))
    client = parse(setting)
    driver = load_driver(client, setting)
    sql = ServerSQL.for_driver(client.dialect, table, driver.paramstyle)
    histories = {rollup: ServerHistory(lambda: driver.connect(**client.params),
                                       (driver.Error, OSError), sql, rollup=rollup)
                 for rollup in (False, True)}
    start, end = now + 1 - WEEK, now + 1
    print("%-46s %10s %10s %8s" % ("week ending now", "raw s", "rollup s", "ratio"))
    for name in reads(histories[False], start, end):
        times = {False: [], True: []}
        answers = {}
        for _ in range(repeats):
            for rollup, history in histories.items():
                read = reads(history, start, end)[name]
                started = time.perf_counter()
                answers[rollup] = read()
                times[rollup].append(time.perf_counter() - started)
        assert answers[False] == answers[True], name
        raw, rolled = (statistics.median(times[r]) for r in (False, True))
        print("%-46s %10.3f %10.3f %8.1f" % (name, raw, rolled, raw / rolled), flush=True)
    for history in histories.values():
        history.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--per-window", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--rate", type=int, default=1000)
    parser.add_argument("--queries", action="store_true",
                        help="time reads of a week with and without the rollup instead")
    parser.add_argument("--query-rows", type=int, default=2_000_000)
    parser.add_argument("--hosts", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--server", choices=("postgres", "mariadb"), action="append",
                        help="only this server (default: both)")
    args = parser.parse_args()
    base = sql_servers.shared_tempdir("picosnitch-bench-servers-")
    for kind in args.server or ("postgres", "mariadb"):
        server = sql_servers.start_server(kind, base)
        try:
            if args.queries:
                queries(server, args.query_rows, args.hosts, args.repeats)
                continue
            for rollup in (False, True):
                print(kind, "sustained", "with rollup" if rollup else "no rollup", json.dumps(
                    sustained(server, args.rows, args.per_window, rollup)))
            print(kind, "daemon-like", json.dumps(daemon_like(server, args.seconds, args.rate)))
        finally:
            server.close()
    shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
