"""Central logging to PostgreSQL and MariaDB ("DB sql server"), against real servers on loopback.

The remote SQL worker runs in its own process with real pipes, next to the real snitch.db writer
process; the test plays the identity worker and sends both the same lists of Connections.
"""

import dataclasses
import json
import multiprocessing
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from picosnitch import channels, config
from picosnitch.central import worker as sql_worker
from picosnitch.central.backlog import Backlog
from picosnitch.central.settings import load_driver, parse
from picosnitch.central.writer import ServerWriter, complete_rows, is_local, make_row
from picosnitch.connection import Connection, Endpoint, Identity, ProcessInfo
from picosnitch.identity.worker import window_start
from picosnitch.installed import install_extra
from picosnitch.messages import ErrorReport, Stop
from picosnitch.paths import Paths
from picosnitch.sanitize import printable
from picosnitch.store import worker as writer_worker
from picosnitch.store.schema import VIEW_COLUMNS
from picosnitch.store.sqlite import open_readonly

sys.path.insert(0, str(Path(__file__).parent))
import sql_servers  # noqa: E402

ctx = multiprocessing.get_context("fork")
NAMES = [name for name, _ in VIEW_COLUMNS]


# -- configuration -------------------------------------------------------------------------------

def cfg(server=None, **settings):
    values = {"DB write limit (seconds)": 1, "DB sql server": server or {}, **settings}
    return config.parse(json.dumps(values, indent=1), "/etc/picosnitch/config.json")


def test_an_empty_setting_turns_the_server_off():
    assert parse(cfg()) is None


def test_the_setting_is_checked_with_clear_messages():
    with pytest.raises(config.ConfigError, match='"DB sql server" needs a "client": one of '
                                                 '"psycopg", "psycopg2", "pymysql", "mariadb"'):
        parse(cfg({"host": "db.example"}))
    with pytest.raises(config.ConfigError, match='unknown "client" \'pymsql\' \\(did you mean '
                                                 '"pymysql"\\?\\)'):
        parse(cfg({"client": "pymsql"}))
    with pytest.raises(config.ConfigError, match='"table_name" must be a table name') as caught:
        parse(cfg({"client": "psycopg", "table_name": "x; DROP TABLE y"}))
    assert caught.value.line == 3 and caught.value.key == "DB sql server"
    server = parse(cfg({"client": "pymysql", "table_name": "logs.conns", "host": "db.example",
                        "user": "u", "password": "hidden", "read_timeout": 5}))
    assert (server.table, server.dialect) == ("logs.conns", "mysql")
    assert server.params["read_timeout"] == 5 and server.params["connect_timeout"] == 10
    assert "hidden" not in server.describe() and "u@db.example" in server.describe()


@pytest.mark.parametrize("client, extra", [("psycopg", install_extra("postgres")),
                                           ("pymysql", install_extra("mysql"))])
def test_a_missing_driver_names_the_extra_to_install(monkeypatch, client, extra):
    monkeypatch.setitem(sys.modules, client, None)  # import now raises ImportError
    setting = cfg({"client": client})
    with pytest.raises(config.ConfigError) as caught:
        load_driver(parse(setting), setting)
    assert 'uses the client "%s", which is not installed' % client in str(caught.value)
    assert str(caught.value).endswith("install it with: " + extra)


def test_only_loopback_and_sockets_count_as_local():
    for host in (None, "", "localhost", "127.0.0.1", "127.3.4.5", "::1", "/run/postgresql"):
        assert is_local(host)
    for host in ("db.example", "10.0.0.5", "::ffff:10.0.0.5", "localhost,db.example"):
        assert not is_local(host)


# -- the backlog ---------------------------------------------------------------------------------

def test_the_backlog_keeps_order_and_survives_a_restart(tmp_path):
    backlog = Backlog(tmp_path, 10_000_000)
    for n in range(5):
        backlog.append("b%d" % n, [[n, "x"]] * (n + 1))
    first = backlog.peek()
    assert (first.batch_id, first.rows) == ("b0", [[0, "x"]])
    backlog.consume(first)
    assert backlog.peek().batch_id == "b1"  # not consumed: comes again
    backlog.close()
    again = Backlog(tmp_path, 10_000_000)
    ids = []
    while (batch := again.peek()) is not None:
        ids.append(batch.batch_id)
        again.consume(batch)
    assert ids == ["b1", "b2", "b3", "b4"]
    again.append("b5", [[5]])
    assert again.peek().batch_id == "b5"


def test_a_torn_record_at_the_end_is_cut_off(tmp_path):
    backlog = Backlog(tmp_path, 10_000_000)
    backlog.append("whole", [[1]])
    backlog.append("torn", [[2]])
    backlog.close()
    segment = next(tmp_path.glob("segment-*"))
    segment.write_bytes(segment.read_bytes()[:-3])  # a crash while appending
    again = Backlog(tmp_path, 10_000_000)
    assert "incomplete batch" in again.take_notices()[0]
    assert again.peek().batch_id == "whole"
    again.consume(again.peek())
    assert again.peek() is None


def test_a_full_backlog_drops_the_oldest_rows_and_counts_them(tmp_path):
    backlog = Backlog(tmp_path, 64 * 1024)  # segments of 4 KiB
    dropped = sum(backlog.append("b%03d" % n, [["x" * 90]] * 10) for n in range(200))
    assert dropped == backlog.lost_rows > 0
    assert backlog.size() <= 64 * 1024
    kept = []
    while (batch := backlog.peek()) is not None:
        kept.append(batch.batch_id)
        backlog.consume(batch)
    assert kept == ["b%03d" % n for n in range(200 - len(kept), 200)]  # the newest, in order
    assert dropped == (200 - len(kept)) * 10


# -- traffic and the rig that runs both writers --------------------------------------------------

def connection(n: int, ts: int, send: int) -> Connection:
    """The n-th of a few identities and endpoints; n == 0 has hostile bytes in its text."""
    weird = "evil\n\x1b[31m\udcff" if n == 0 else ""
    process = ProcessInfo("/usr/bin/app%d" % n, "app%d%s" % (n, weird), "app%d --flag" % n,
                          "%064x" % n)
    parent = ProcessInfo("/usr/bin/bash", "bash", "bash", "ab" * 32)
    identity = Identity(process, parent, ProcessInfo(), uid=1000 + n, netns=4026531840)
    endpoint = Endpoint(2, 6, "10.0.0.1", 40000 + n, "10.0.0.%d" % (n % 5 + 2), 443,
                        "com.example.www%d" % n)
    return Connection(identity, endpoint, ts, send, 2 * send, 1, 2)


def traffic(seconds: float, identities: int = 8):
    """Lists of Connections as the identity worker sends them: every 0.1 s, this window's ts."""
    end = time.time() + seconds
    step = 0
    while time.time() < end:
        ts = window_start(time.time(), 1)
        yield [connection((step + k) % identities, ts, 100 + step) for k in range(3)]
        step += 1
        time.sleep(0.1)


class Rig:
    """The snitch.db writer and the remote SQL worker as processes, fed the same lists."""

    def __init__(self, prefix: Path, setting: dict, **settings):
        self.paths = Paths.under(prefix)
        self.paths.ensure_dirs()
        self.config = cfg(setting, **settings)
        self.reports = []
        self.sent = 0  # bytes sent by all Connections fed in
        self.inboxes, self.processes = [], []
        for target in (writer_worker.run, sql_worker.run):
            inbox_r, inbox_w = channels.pair(sender_waits=True)
            keeper_r, keeper_w = channels.pair()
            process = ctx.Process(target=target, args=(self.config, self.paths, inbox_r, keeper_w))
            process.start()
            keeper_w.close()
            threading.Thread(target=self._collect, args=(keeper_r,), daemon=True).start()
            self.inboxes.append(inbox_w)
            self.processes.append(process)
        self.sql_process = self.processes[1]

    def _collect(self, keeper_r) -> None:
        try:
            while True:
                self.reports.append(keeper_r.recv())
        except EOFError:
            pass

    def send(self, connections) -> None:
        self.sent += sum(c.send for c in connections)
        for inbox in self.inboxes:
            inbox.send(connections)

    def run(self, seconds: float) -> None:
        for connections in traffic(seconds):
            self.send(connections)

    def stop(self, timeout: float = 20) -> float:
        """Stop both; returns how long the SQL worker took."""
        started = time.monotonic()
        for inbox in self.inboxes:
            inbox.send(Stop("identity"))
        self.sql_process.join(timeout)
        took = time.monotonic() - started
        for process in self.processes:
            process.join(timeout)
            assert process.exitcode == 0
        time.sleep(0.2)  # the collector threads read the last reports
        return took

    def errors(self) -> list:
        return [r.message for r in self.reports if isinstance(r, ErrorReport)]

    def local_rows(self) -> Counter:
        conn = open_readonly(str(self.paths.db))
        rows = conn.execute("SELECT %s FROM connections" % ", ".join(NAMES)).fetchall()
        conn.close()
        return Counter(tuple(printable(v) if isinstance(v, str) else v for v in row)
                       for row in rows)


def server_rows(server, table: str = "connections") -> Counter:
    columns = ", ".join(('"%s"' if server.dialect == "postgres" else "`%s`") % n for n in NAMES)
    return Counter(tuple(row) for row in server.query("SELECT %s FROM %s" % (columns, table)))


@pytest.fixture(scope="module", params=["postgres", "mariadb"])
def server(request):
    if not sql_servers.available(request.param):
        pytest.skip("needs root and the %s server installed" % request.param)
    base = sql_servers.shared_tempdir("picosnitch-sql-")
    started = sql_servers.start_server(request.param, base)
    yield started
    started.close()


@pytest.fixture
def prefix():
    return sql_servers.shared_tempdir("picosnitch-prefix-")


@pytest.fixture
def table(server, request):
    """A fresh table name per test."""
    name = "t_" + request.node.name.split("[")[0][5:40]
    server.drop(name)
    return name


def assert_exactly_once(server, table: str, local: Counter) -> None:
    remote = server_rows(server, table)
    assert remote == local
    batches = server.query("SELECT count(*), sum(row_count) FROM %s_batches" % table)[0]
    assert batches[1] == sum(local.values())
    hosts = server.query("SELECT DISTINCT host, machine_id FROM %s" % table)
    assert len(hosts) == 1 and hosts[0][0] and len(hosts[0][1]) == 32


# -- acceptance ----------------------------------------------------------------------------------

def test_rows_match_snitch_db_row_for_row(server, prefix, table):
    rig = Rig(prefix, server.params(table_name=table))
    rig.run(3.5)
    rig.stop()
    local = rig.local_rows()
    assert len(local) > 8 and any("\\x1b[31m\\xff" in row[NAMES.index("name")] for row in local)
    assert_exactly_once(server, table, local)
    assert not rig.errors()
    assert (prefix / "var/lib/picosnitch/sql-backlog").stat().st_uid != 0  # unprivileged


def test_an_outage_and_a_restart_lose_nothing_and_write_each_row_once(server, prefix, table):
    rig = Rig(prefix, server.params(table_name=table))
    rig.run(1.5)
    server.stop()
    rig.run(3.5)  # windows complete while the server is down: they go to the backlog
    assert rig.stop() < 10
    assert any("rows wait in the backlog" in e for e in rig.errors())
    backlog = Paths.under(prefix).sql_backlog
    assert list(backlog.glob("segment-*"))
    server.start()  # the daemon restarts before the server is back: the backlog waits on disk
    time.sleep(1)  # a window split by a restart would be two rows on the server (one locally)
    rig2 = Rig(prefix, server.params(table_name=table))
    rig2.run(2.5)
    rig2.stop()
    assert_exactly_once(server, table, rig2.local_rows())


def test_a_batch_sent_again_is_stored_once(server, prefix, table):
    setting = cfg(server.params(table_name=table))
    writer = ServerWriter(parse(setting), load_driver(parse(setting), setting), print)
    backlog = Backlog(prefix, 1_000_000)
    backlog.append("lost-ack", [make_row(connection(n, 1000, 5), "h", "m" * 32) for n in (1, 2)])
    batch = backlog.peek()
    assert writer.write(batch) is True
    assert writer.write(batch) is False  # e.g. the commit's acknowledgement was lost
    writer.close()
    assert server.query("SELECT count(*) FROM %s" % table)[0][0] == 2


def test_tables_of_an_older_picosnitch_get_the_new_columns_and_its_queued_rows_are_stored(server, prefix, table):
    setting = cfg(server.params(table_name=table))
    ServerWriter(parse(setting), load_driver(parse(setting), setting), print)._connect()
    quote = '"' if server.dialect == "postgres" else "`"
    for name in (table, table + "_hourly"):  # as an older picosnitch made them: no domain_source
        server.query(f"ALTER TABLE {quote}{name}{quote} DROP COLUMN domain_source")
    backlog = Backlog(prefix, 1_000_000)
    old_rows = [make_row(connection(n, 1000, 5), "h", "m" * 32)[:-1] for n in (1, 2)]  # queued by it
    backlog.append("from-before", old_rows)
    backlog.append("from-now", [make_row(connection(3, 1000, 5), "h", "m" * 32)])
    writer = ServerWriter(parse(setting), load_driver(parse(setting), setting), print)
    for _ in range(2):
        batch = backlog.peek()
        assert writer.write(dataclasses.replace(batch, rows=complete_rows(batch.rows))) is True
        backlog.consume(batch)
    writer.close()
    stored = server.query(f"SELECT rport, domain_source FROM {table}")
    assert sorted(stored) == [(443, ""), (443, ""), (443, "")]


def test_a_user_with_insert_privilege_only_works(server, prefix, table):
    setting = cfg(server.params(table_name=table))
    ServerWriter(parse(setting), load_driver(parse(setting), setting), print)._connect()
    server.grant("INSERT", table)  # an administrator made the tables and granted INSERT
    rig = Rig(prefix, server.params(user="snitch_insert", table_name=table))
    rig.run(2.5)
    rig.stop()
    assert not rig.errors()
    assert_exactly_once(server, table, rig.local_rows())


def clear_failure(rig: Rig, *needles: str) -> None:
    """The worker reported the problem, kept reading, stopped promptly; snitch.db is complete."""
    for _ in range(50):  # 50 lists arrive while the server fails: nothing may block
        rig.send([connection(1, window_start(time.time(), 1), 10)])
    assert rig.stop() < 10
    errors = rig.errors()
    assert any(all(needle in e for needle in needles) for e in errors), errors
    assert sum(row[NAMES.index("send")] for row in rig.local_rows()) == rig.sent


def test_wrong_credentials_are_reported_clearly(server, prefix):
    rig = Rig(prefix, dict(server.params(), password="wrong"))
    needle = ("password authentication failed for user \"snitch_full\""
              if server.dialect == "postgres" else "Access denied for user 'snitch_full'")
    clear_failure(rig, "cannot connect to the SQL server", needle)


def test_a_wrong_table_name_is_reported_clearly(server, prefix):
    rig = Rig(prefix, server.params(user="snitch_insert", table_name="no_such_table"))
    rig.run(2.5)
    clear_failure(rig, "writing to table no_such_table", "creating the tables failed too",
                  "check \"table_name\"")


def test_a_server_that_hangs_is_reported_and_does_not_block(server, prefix):
    hanging = sql_servers.HangingServer()
    timeouts = ({"connect_timeout": 2} if server.dialect == "postgres"
                else {"connect_timeout": 2, "read_timeout": 2})
    rig = Rig(prefix, dict(server.params(), port=hanging.port, **timeouts))
    rig.run(3.5)  # windows complete and are tried while the server hangs
    try:
        clear_failure(rig, "cannot connect to the SQL server",
                      "timeout expired" if server.dialect == "postgres" else "timed out")
    finally:
        hanging.close()


def test_a_clear_text_connection_to_another_host_is_warned_about(server, prefix, table):
    if server.dialect != "postgres":
        pytest.skip("libpq's hostaddr lets a loopback test use a non-local host name")
    rig = Rig(prefix, dict(server.params(table_name=table), host="db.example", hostaddr="127.0.0.1"))
    rig.run(2.5)
    rig.stop()
    assert any("is not encrypted" in e and "sslmode=verify-full" in e for e in rig.errors())
    assert_exactly_once(server, table, rig.local_rows())


def test_a_full_backlog_during_an_outage_reports_the_loss(server, prefix, table):
    server.stop()
    try:
        rig = Rig(prefix, server.params(table_name=table), **{"DB sql backlog (MB)": 1})
        big = [connection(n, 1000 + step, 1) for step in range(40) for n in range(1, 100)]
        for start in range(0, len(big), 99):  # 40 windows of 99 rows, about 2 MB of backlog
            rig.send(big[start:start + 99])
        rig.stop()
    finally:
        server.start()
    assert any("the SQL backlog" in e and "is full" in e and "dropped the oldest" in e
               for e in rig.errors())


# -- the real daemon -----------------------------------------------------------------------------
#
# `picosnitch start-no-daemon` under a private prefix, with "DB sql server" set to the fixture's
# server. A copied python named KNOWN_NAME sends known amounts over loopback to a server of the
# test; everything else the machine does (the daemon's own SQL traffic included) is recorded too,
# and the comparison covers every row, not only the known ones.

from daemon_harness import Daemon  # noqa: E402

KNOWN_NAME = "psql-known"
KNOWN_SEND, KNOWN_REPLY = 2345, 678
CLIENT = r"""
import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
s.sendall(b"q" * int(sys.argv[2]))
s.shutdown(socket.SHUT_WR)
while s.recv(65536):
    pass
"""


class KnownTraffic:
    """A loopback server answering KNOWN_REPLY bytes, and a client executable of our own."""

    def __init__(self, prefix: Path):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.1)
        self.port = self.listener.getsockname()[1]
        (prefix / "bin").mkdir(exist_ok=True)
        self.exe = prefix / "bin" / KNOWN_NAME
        shutil.copy("/usr/bin/python3.11", self.exe)
        self.clients = 0  # completed client runs
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.done.is_set():
            try:
                conn, _ = self.listener.accept()
            except socket.timeout:
                continue
            with conn:
                while conn.recv(65536):
                    pass
                conn.sendall(b"r" * KNOWN_REPLY)

    def run_client(self) -> None:
        subprocess.run([self.exe, "-c", CLIENT, str(self.port), str(KNOWN_SEND)], check=True,
                       timeout=30)
        self.clients += 1

    def keep_going(self, seconds: float, every: float = 0.3) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.run_client()
            time.sleep(every)

    def expected(self) -> tuple:
        return self.clients * KNOWN_SEND, self.clients * KNOWN_REPLY

    def close(self) -> None:
        self.done.set()
        self.thread.join()
        self.listener.close()


def daemon_local_rows(paths: Paths) -> Counter:
    conn = open_readonly(str(paths.db))
    try:
        rows = conn.execute("SELECT %s FROM connections" % ", ".join(NAMES)).fetchall()
    finally:
        conn.close()
    return Counter(tuple(printable(v) if isinstance(v, str) else v for v in row) for row in rows)


def known_sums(rows: Counter) -> tuple:
    name, send, recv = (NAMES.index(n) for n in ("name", "send", "recv"))
    found = [(row, count) for row, count in rows.items() if row[name] == KNOWN_NAME]
    return (sum(row[send] * count for row, count in found),
            sum(row[recv] * count for row, count in found))


def wait_until(check, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except Exception:  # noqa: BLE001 - e.g. the table is not created yet
            pass
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for " + what)
        time.sleep(0.3)


@pytest.fixture
def daemon_rig(server, prefix, table):
    """start(): a real daemon logging to `server`'s `table`; known: the known traffic."""
    if os.geteuid() != 0:
        pytest.skip("needs root: runs the daemon")
    known = KnownTraffic(prefix)
    started = []

    def start() -> Daemon:
        daemon = Daemon(prefix, **{"DB sql server": server.params(table_name=table)}).start()
        started.append(daemon)
        return daemon

    start.known = known
    yield start
    for daemon in started:
        if daemon.proc and daemon.proc.poll() is None:
            daemon.kill_group()
    known.close()
    shutil.rmtree(prefix, ignore_errors=True)


def test_the_daemon_writes_the_rows_of_snitch_db_to_the_server(server, table, daemon_rig):
    daemon = daemon_rig()
    known = daemon_rig.known
    known.keep_going(3)
    # the known traffic has reached the server, so what is left to send is the last windows
    wait_until(lambda: known_sums(server_rows(server, table)) == known.expected(),
               "the known traffic on the server")
    assert daemon.stop() == 0
    local = daemon_local_rows(daemon.paths)
    assert known_sums(local) == known.expected()
    assert_exactly_once(server, table, local)
    host = server.query("SELECT DISTINCT host FROM %s" % table)[0][0]
    assert host == socket.gethostname()
    assert "SQL server" not in daemon.error_log(), daemon.error_log()


def test_the_daemon_recovers_from_an_outage_across_a_restart(server, table, daemon_rig):
    daemon = daemon_rig()
    known = daemon_rig.known
    known.keep_going(2)
    wait_until(lambda: known_sums(server_rows(server, table)) == known.expected(),
               "the known traffic on the server")
    server.stop()
    try:
        known.keep_going(3)  # windows complete while the server is down
        assert daemon.stop() == 0  # the daemon stops and starts while the server is down
        backlog = daemon.paths.sql_backlog
        assert list(backlog.glob("segment-*"))
        assert "rows wait in the backlog" in daemon.error_log()
        daemon = daemon_rig()
        known.keep_going(2)
    finally:
        server.start()
    known.keep_going(2)
    wait_until(lambda: known_sums(server_rows(server, table)) == known.expected(),
               "the backlog and the new traffic on the server", timeout=120)
    assert daemon.stop() == 0
    local = daemon_local_rows(daemon.paths)
    assert known_sums(local) == known.expected()
    assert_exactly_once(server, table, local)
    assert "accepts rows again" in daemon.error_log()


def test_a_window_is_sent_once_a_later_one_arrives_or_late_after_its_end():
    windows = sql_worker.Windows(10)
    windows.add([connection(1, 1000, 5)])
    assert windows.take(1015) == []  # its end is past, but a batch stamped 1000 may still come
    windows.add([connection(1, 1000, 7), connection(2, 1010, 1)])
    taken = windows.take(1015)
    assert [(c.ts, c.send) for c in taken] == [(1000, 12)]  # one row, both batches summed
    assert windows.take(1010 + 10 + sql_worker.LATE) != []  # a quiet machine: sent LATE s on
