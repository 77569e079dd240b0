"""The central server's hourly rollup: the remote SQL worker fills `<table>_hourly` and
`<table>_hours` for the hours it has every row of, and `view --db` / `dash --db` read whole hours
from it; every figure must equal the one read from the raw rows alone (ServerHistory with
rollup=False), whatever happened on the way: stragglers, an outage, a restart, a crash, an
older writer on the same table, missing tables or privileges.

The worker runs in its own process with real pipes, as in test_sql_server; its traffic is
stamped two days ahead, so that hours close as its windows move on (the worker marks no hour
before it started).
"""

import json
import os
import signal
import sys
import time
from pathlib import Path

from picosnitch.central import worker as sql_worker
from picosnitch.central.backlog import Backlog, Batch
from picosnitch.central.queries import ServerHistory, ServerSQL
from picosnitch.central.rollup import HOUR, HourlyRollup, hour_of
from picosnitch.central.settings import load_driver, parse
from picosnitch.central.writer import ROW_COLUMNS, ServerWriter, create_statements, make_row, rollup_statements
from picosnitch.messages import Stop
from picosnitch.paths import Paths
from picosnitch.store.queries import Filter

sys.path.insert(0, str(Path(__file__).parent))
from test_sql_server import Rig, cfg, connection, prefix, server, table, wait_until  # noqa: E402,F401 (fixtures)

T0 = hour_of(int(time.time())) + 2 * 86400  # the first hour of the test traffic
OLD_HOST, OLD_MACHINE = "old.example", "0" * 32


def make_rows(ts: int, step: int, host: str = "rig", machine: str = "m" * 32) -> list:
    return [make_row(c, host, machine) for c in window(ts, step)]


def window(ts: int, step: int) -> list:
    """A window's Connections: a few identities and endpoints, varying with the window."""
    return [connection((step + k) % 6, ts, 100 + step % 50) for k in range(3)]


def feed(rig: Rig, start: int, end: int, every: int = 70) -> int:
    """Windows from `start` to `end` (offsets from T0), as the identity worker sends them;
    returns the bytes sent in the last, which the worker holds until a later one comes."""
    for step, ts in enumerate(range(T0 + start, T0 + end, every)):
        connections = window(ts, step)
        rig.send(connections)
    return sum(c.send for c in connections)


# -- the rollup's bookkeeping, alone -------------------------------------------------------------

def test_an_hour_closes_once_a_later_hour_is_taken_or_its_last_window_is_late():
    windows = sql_worker.Windows(10)
    windows.add([connection(1, T0 + 3590, 5)])
    assert windows.take(T0) == [] and windows.settled(T0) == T0  # hour T0 may get more
    windows.add([connection(1, T0 + 3600, 5)])
    assert len(windows.take(T0)) == 1 and windows.settled(T0) == T0 + HOUR
    quiet = sql_worker.Windows(10)
    quiet.add([connection(1, T0 + 3590, 5)])
    end_of_hour = T0 + HOUR + 10 + sql_worker.LATE  # its last window is sent by then
    assert len(quiet.take(end_of_hour - 1)) == 1 and quiet.settled(end_of_hour - 1) == T0
    assert quiet.settled(end_of_hour) == T0 + HOUR


def figures(hourly: list) -> dict:
    """{(hour, exe, lport): (send, recv)} of rollup rows (or raw rows, by their hour)."""
    found = {}
    ts, exe, lport, send_, recv_ = (ROW_COLUMNS.index(name) for name in ("ts", "exe", "lport", "send", "recv"))
    for row in hourly:
        key = (hour_of(row[ts]), row[exe], row[lport])
        send, recv = found.get(key, (0, 0))
        found[key] = (send + row[send_], recv + row[recv_])
    return found


def test_closing_an_hour_sums_its_committed_rows_and_marks_it():
    rollup = HourlyRollup(since=T0)
    before = make_rows(T0 - 60, 0)  # before `since`: never in the rollup
    first, second = make_rows(T0 + 10, 1), make_rows(T0 + 1800, 2)
    for rows, closes in ((before, T0), (first, T0), (second, T0)):
        plan = rollup.plan(rows, closes, markable=True)
        assert plan.hourly == [] and plan.hours == []
        rollup.committed(plan)
    lost = rollup.plan(make_rows(T0 + 1900, 3), T0, markable=True)  # never committed
    closing = make_rows(T0 + HOUR, 4)
    plan = rollup.plan(closing, T0 + HOUR, markable=True)
    assert plan.hours == [("m" * 32, T0)]
    assert figures(plan.hourly) == figures(first + second)
    assert {row[2] for row in plan.hourly} == {time.strftime("%Y-%m-%d %H:%M:%S",
                                                             time.localtime(T0))}
    assert lost.adds and rollup.plan(closing, T0 + HOUR, True).hourly == plan.hourly  # replay
    rollup.committed(plan)
    assert list(rollup.open) == [T0 + HOUR]


def test_a_late_row_brings_its_own_rollup_rows_and_mark():
    rollup = HourlyRollup(since=T0, closed=T0 + 2 * HOUR)
    late = make_rows(T0 + 100, 7) + make_rows(T0 + HOUR + 5, 8)
    plan = rollup.plan(late, None, markable=True)
    assert plan.hours == [("m" * 32, T0), ("m" * 32, T0 + HOUR)]
    assert figures(plan.hourly) == figures(late)
    assert rollup.plan(late, None, markable=False).hourly == []


def test_a_refused_batch_leaves_the_hours_it_closes_unmarked_for_good():
    rollup = HourlyRollup(since=T0)
    rollup.committed(rollup.plan(make_rows(T0 + 10, 1), None, True))
    rollup.rejected(rollup.plan(make_rows(T0 + HOUR, 2), T0 + HOUR, True))
    assert rollup.unmarkable == {T0} and rollup.open == {} and rollup.closed == T0 + HOUR
    assert rollup.plan(make_rows(T0 + 20, 3), None, True).hours == []  # late, but unmarkable
    rollup.committed(rollup.plan(make_rows(T0 + HOUR, 4), T0 + 2 * HOUR, markable=False))
    assert rollup.unmarkable == {T0, T0 + HOUR}  # the server took no rollup rows


def test_a_fresh_rollup_marks_nothing_an_earlier_run_may_have_written():
    now = T0 + 1234
    assert HourlyRollup.fresh(now, None).since == T0 + HOUR
    assert HourlyRollup.fresh(now, T0 + 5 * HOUR).since == T0 + 6 * HOUR


def test_the_state_is_kept_with_the_cursor_until_the_next_batch_is_committed(tmp_path):
    rollup = HourlyRollup(since=T0)
    rollup.committed(rollup.plan(make_rows(T0 + 10, 1), None, True))
    backlog = Backlog(tmp_path, 1_000_000)
    backlog.append("b1", make_rows(T0 + 20, 2), T0)
    backlog.save_state(json.loads(json.dumps(rollup.state())))
    backlog.close()
    again = Backlog(tmp_path, 1_000_000)
    restored = HourlyRollup.from_state(again.saved_state)
    assert restored.state() == rollup.state() and restored.open == rollup.open
    batch = again.peek()
    assert (batch.batch_id, batch.closes) == ("b1", T0)
    again.consume(batch)
    again.close()
    assert Backlog(tmp_path, 1_000_000).saved_state is None
    assert HourlyRollup.from_state({"since": "x"}) is None


# -- against real servers ------------------------------------------------------------------------

def histories(server, table: str, user: str = "snitch_full") -> dict:
    """{rollup: ServerHistory}: one reading the rollup where it may, one every row raw."""
    setting = cfg(server.params(user=user, table_name=table))
    client = parse(setting)
    driver = load_driver(client, setting)
    sql = ServerSQL.for_driver(client.dialect, table, driver.paramstyle)
    return {rollup: ServerHistory(lambda: driver.connect(**client.params),
                                  (driver.Error, OSError), sql, rollup=rollup)
            for rollup in (True, False)}


WINDOWS = [(T0 + 1234, T0 + 3 * HOUR + 77), (T0, T0 + 4 * HOUR), (None, None),
           (T0 + HOUR + 5, T0 + 2 * HOUR - 5), (T0 - 2 * HOUR, T0 + 2 * HOUR + 1800),
           (T0 + 1800, None)]
FILTERS = [[Filter("host", OLD_HOST, exclude=True)], [Filter("exe", "/usr/bin/app2")],
           [Filter("contime", T0 + HOUR, width=HOUR, exclude=True)],
           [Filter("contime", T0 + 1800, width=600, exclude=True)],
           [Filter("contime", T0 + HOUR, width=HOUR)]]


def assert_figures_of_the_raw_rows(server, table: str, user: str = "snitch_full") -> None:
    """Every tab, series and first/last seen reads the same with the rollup as without."""
    readers = histories(server, table, user)
    with_rollup, raw = readers[True], readers[False]
    try:
        for start, end in WINDOWS:
            for column in ("host", "exe", "name", "lport", "raddr", "contime"):
                assert with_rollup.tab(column, start, end, []) == raw.tab(column, start, end, []), \
                    (column, start, end)
            for filters in FILTERS:
                for column in ("exe", "contime"):
                    assert with_rollup.tab(column, start, end, filters) == \
                        raw.tab(column, start, end, filters), (column, start, end, filters)
        for filters in [[]] + FILTERS:
            for start, end in ((T0 - 6 * HOUR + 17, T0 + 10 * HOUR + 5), (T0 + 600, T0 + 3000)):
                assert with_rollup.series("exe", start, end, filters) == \
                    raw.series("exe", start, end, filters), (start, end, filters)
            assert with_rollup.first_last_seen(filters) == raw.first_last_seen(filters), filters
    finally:
        with_rollup.close()
        raw.close()


def marked(server, table: str) -> set:
    """The (machine_id, hour) pairs `<table>_hours` marks, as offsets from T0 in hours."""
    return {(machine, (hour - T0) // HOUR)
            for machine, hour in server.query("SELECT machine_id, hour FROM %s_hours" % table)}


def rig_machine(server, table: str) -> str:
    [(machine,)] = server.query("SELECT DISTINCT machine_id FROM %s" % table)
    return machine


def write_as_an_older_writer(server, table: str) -> None:
    """Rows of another machine in the same hours, by a writer that keeps no rollup."""
    setting = cfg(server.params(table_name=table))
    writer = ServerWriter(parse(setting), load_driver(parse(setting), setting), print)
    rows = [row for step, ts in enumerate(range(T0 - 900, T0 + 4 * HOUR, 600))
            for row in make_rows(ts, step, OLD_HOST, OLD_MACHINE)]
    assert writer.write(Batch("older-writer", rows, (0, 0)))
    writer.close()


def test_the_rollup_gives_the_figures_of_the_raw_rows(server, prefix, table):
    rig = Rig(prefix, server.params(table_name=table))
    feed(rig, 0, int(3.5 * HOUR))
    rig.send(window(T0 + 1810, 99))  # held up: hour 0 is closed by now
    rig.send(window(T0 - HOUR + 5, 98))  # and into a closed hour that had no row yet
    rig.stop()
    assert not rig.errors()
    machine = rig_machine(server, table)
    assert marked(server, table) == {(machine, hour) for hour in (-1, 0, 1, 2)}  # 3 is open
    hourly = server.query("SELECT count(*) FROM %s_hourly" % table)[0][0]
    raw = server.query("SELECT count(*) FROM %s WHERE ts < %d" % (table, T0 + 3 * HOUR))[0][0]
    assert 0 < hourly < raw / 5
    write_as_an_older_writer(server, table)
    assert_figures_of_the_raw_rows(server, table)
    reader = histories(server, table)[True]
    # whole hours come from the rollup, but the older writer's, from its raw rows
    pieces = reader.pieces(T0 + 1234, T0 + 3 * HOUR + 77)
    assert pieces.raw == [(T0 + 1234, T0 + HOUR), (T0 + 3 * HOUR, T0 + 3 * HOUR + 77)]
    assert pieces.whole == [(T0 + HOUR, T0 + 3 * HOUR)]
    assert pieces.uncovered == [(OLD_HOST, OLD_MACHINE, T0 + HOUR, T0 + 3 * HOUR)]
    reader.close()


def wait_for_rows(server, table: str, rig: Rig, held: int) -> None:
    """Until the server holds the bytes sent, but those of the window the worker holds."""
    wait_until(lambda: server.query("SELECT sum(send) FROM %s" % table)[0][0] == rig.sent - held,
               "the rows on the server")


def test_an_outage_mid_hour_delays_the_rollup_and_loses_nothing(server, prefix, table):
    rig = Rig(prefix, server.params(table_name=table))
    wait_for_rows(server, table, rig, feed(rig, 0, int(1.5 * HOUR)))
    server.stop()
    try:
        feed(rig, int(1.5 * HOUR), 3 * HOUR)  # hours 1 and 2 close while the server is down
        time.sleep(2)
        assert any("rows wait in the backlog" in e for e in rig.errors())
    finally:
        server.start()
    wait_for_rows(server, table, rig, feed(rig, 3 * HOUR, int(3.5 * HOUR)))
    rig.stop()
    machine = rig_machine(server, table)
    assert marked(server, table) == {(machine, hour) for hour in (0, 1, 2)}
    assert_figures_of_the_raw_rows(server, table)


def second_run(server, prefix, table: str) -> set:
    """The worker started again on the same backlog, for the rest of the traffic: the figures
    are checked, and the hours marked for the machine returned (offsets from T0)."""
    again = Rig(prefix, server.params(table_name=table))
    feed(again, int(1.5 * HOUR), int(3.5 * HOUR))
    again.stop()
    assert_figures_of_the_raw_rows(server, table)
    machine = rig_machine(server, table)
    return {hour for marker, hour in marked(server, table) if marker == machine}


def test_a_clean_restart_mid_hour_keeps_the_hour_in_the_rollup(server, prefix, table):
    rig = Rig(prefix, server.params(table_name=table))
    feed(rig, 0, int(1.5 * HOUR))
    rig.stop()
    saved = json.loads((Paths.under(prefix).sql_backlog / "cursor").read_text())
    assert [hour for hour, _ in saved["state"]["open"]] == [T0 + HOUR]
    assert second_run(server, prefix, table) == {0, 1, 2}


def test_a_crash_mid_hour_leaves_that_hour_to_the_raw_rows(server, prefix, table):
    rig = Rig(prefix, server.params(table_name=table))
    wait_for_rows(server, table, rig, feed(rig, 0, int(1.5 * HOUR)))
    os.kill(rig.sql_process.pid, signal.SIGKILL)  # its sums of hour 1 are gone
    rig.sql_process.join()
    rig.inboxes[0].send(Stop("identity"))
    rig.processes[0].join(20)
    assert second_run(server, prefix, table) == {0, 2}  # hour 1 is not marked


def create_tables(server, table: str, statements: list) -> None:
    """Tables made by an administrator (snitch_full), as they would be for INSERT-only users."""
    setting = cfg(server.params(table_name=table))
    client = parse(setting)
    conn = load_driver(client, setting).connect(**client.params)
    for statement in statements:
        conn.cursor().execute(statement)
        conn.commit()
    conn.close()


def test_a_user_with_insert_privilege_only_fills_the_rollup(server, prefix, table):
    create_tables(server, table, create_statements(server.dialect, table)
                  + rollup_statements(server.dialect, table))
    server.grant("INSERT", table)
    rig = Rig(prefix, server.params(user="snitch_insert", table_name=table))
    feed(rig, 0, int(2.5 * HOUR))
    rig.stop()
    assert not rig.errors()
    assert len(marked(server, table)) == 2
    assert_figures_of_the_raw_rows(server, table)


def test_a_server_without_the_rollup_tables_gets_every_row(server, prefix, table):
    create_tables(server, table, create_statements(server.dialect, table))  # as before the rollup
    server.grant("INSERT", table, ("", "_batches"))
    rig = Rig(prefix, server.params(user="snitch_insert", table_name=table))
    feed(rig, 0, int(2.5 * HOUR))
    rig.stop()
    [problem] = rig.errors()
    assert "keeps no hourly rollup" in problem and "%s_hourly" % table in problem
    assert server.query("SELECT sum(send) FROM %s" % table)[0][0] == rig.sent
    assert_figures_of_the_raw_rows(server, table)


def test_a_reader_without_select_on_the_rollup_reads_the_raw_rows(server, prefix, table):
    rig = Rig(prefix, server.params(table_name=table))
    feed(rig, 0, int(2.5 * HOUR))
    rig.stop()
    assert marked(server, table)
    server.grant("SELECT", table, ("",))
    reader = histories(server, table, user="snitch_insert")[True]
    assert reader.pieces(None, None) is None
    assert reader.tab("exe", None, None, []) == histories(server, table)[False].tab(
        "exe", None, None, [])
