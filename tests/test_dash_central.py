"""`picosnitch dash --db URL`: the web dashboard over the central SQL server, against real
PostgreSQL and MariaDB on loopback (tests/sql_servers.py).

The server's table is filled by the project's own writer (sql_server_writer.ServerWriter, which
the daemon's remote SQL worker uses) with known traffic of two hosts over two days: one with the
hourly rollup, as the daemon sends it, the other without, as an older picosnitch did. Some names
differ only in case or a trailing space (MariaDB's default collation would take them for one),
and one process has hostile text. Every figure the API gives is compared with the server's
table, read row by row and summed here.
"""

import json
import os
import shutil
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest
from dash_harness import REPO, DashServer

from picosnitch import cli, config
from picosnitch.central.backlog import Batch
from picosnitch.central.queries import server_readers
from picosnitch.central.rollup import HourlyRollup, hour_of
from picosnitch.central.settings import load_driver, parse
from picosnitch.central.writer import ROW_COLUMNS, ServerWriter, make_row
from picosnitch.connection import Connection, Endpoint, Identity, ProcessInfo
from picosnitch.installed import install_extra
from picosnitch.paths import Paths
from picosnitch.store import sqlite as sqlite_store
from picosnitch.store.schema import VIEW_COLUMNS
from picosnitch.ui.dash import api as dash_api

sys.path.insert(0, str(Path(__file__).parent))
import sql_servers  # noqa: E402
from test_dash_browser import browser, choose, drawn, loaded, severe_console_messages, shot  # noqa: E402,F401 (a fixture)
from test_view_tui import url_of  # noqa: E402

TABLE = "dash_central"
TS = ROW_COLUMNS.index("ts")
HOSTS = {"alpha.example": "a" * 32, "beta.example": "b" * 32}
HOSTILE_EXE = "/tmp/evil\n\x1b[2J\udcff"
# Executables the same to a case-folding, trailing-space-ignoring collation; and twelve more,
# so that the charts have an "other".
PROCESSES = ([ProcessInfo(exe, exe.rsplit("/", 1)[1], exe + " --run", "%064x" % n)
              for n, exe in enumerate(("/usr/bin/app", "/usr/bin/App", "/usr/bin/app ",
                                       HOSTILE_EXE))]
             + [ProcessInfo("/usr/bin/tool%d" % n, "tool%d" % n, "tool%d -v" % n,
                            "%064x" % (100 + n)) for n in range(12)])
PARENT = ProcessInfo("/usr/bin/bash", "bash", "bash", "ab" * 32)
# What a row of the central table is, besides its time and figures: one connection of one
# process of one machine (the `conns` the API counts are the distinct ones).
PAIR = ("host", "machine_id", "exe", "name", "cmdline", "sha256", "pexe", "pname", "pcmdline",
        "psha256", "gpexe", "gpname", "gpcmdline", "gpsha256", "uid", "netns", "container",
        "family", "protocol", "laddr", "lport", "raddr", "rport", "domain")
NOW = int(time.time()) // 10 * 10


def windows() -> list:
    """Write windows: every 30 minutes over two days, and every 10 s of the last 10 minutes."""
    return ([NOW - 2 * 86400 + 1800 * k for k in range(95)]
            + [NOW - 600 + 10 * k for k in range(60)])


def traffic(host_number: int) -> list:
    """One host's Connections: in window w, process i talks when (w + i) % 3 != host_number;
    the second host sends twice as much."""
    found = []
    for w, ts in enumerate(windows()):
        for i, process in enumerate(PROCESSES):
            if (w + i) % 3 == host_number:
                continue
            identity = Identity(process, PARENT, ProcessInfo(), uid=1000 + i % 3,
                                netns=4026531840, container="docker:%d" % (i % 2) if i % 4 else "")
            endpoint = Endpoint(2 if i % 5 else 10, 6 if i % 2 else 17, "10.0.0.1", 40000 + i,
                                "10.%d.0.%d" % (host_number, i % 4 + 2), 443 if i % 2 else 53,
                                "com.example.s%d" % (i % 3))
            send = (1000 + 37 * i + w) * (host_number + 1)
            found.append(Connection(identity, endpoint, ts, send, 2 * send + host_number, 1, 2))
    return found


TS = ROW_COLUMNS.index("ts")


def write_traffic(server) -> None:
    """alpha's rows as the daemon sends them: a batch per hour, each closing the hours before
    it in the rollup (all but the last hour are marked); beta's in one batch, no rollup."""
    setting = config.parse(json.dumps({"DB sql server": server.params(table_name=TABLE)}))
    writer = ServerWriter(parse(setting), load_driver(parse(setting), setting), print)
    for number, (host, machine) in enumerate(HOSTS.items()):
        rows = [make_row(c, host, machine) for c in traffic(number)]
        if number:
            assert writer.write(Batch("batch-%s" % host, rows, (0, 0)))
            continue
        hours = sorted({hour_of(row[TS]) for row in rows})
        rollup = HourlyRollup(since=hours[0])
        for hour in hours:
            batch = Batch("batch-%s-%d" % (host, hour),
                          [row for row in rows if hour_of(row[TS]) == hour], (0, 0), hour)
            plan = rollup.plan(batch.rows, batch.closes, markable=True)
            assert writer.write(batch, plan.hourly, plan.hours)
            rollup.committed(plan)
    writer.close()


class Central:
    """A server holding the known traffic, and `picosnitch dash --db URL` over it."""

    def __init__(self, server, prefix: Path):
        self.server, self.prefix = server, prefix
        self.url = url_of(server, table=TABLE)
        names = [name for name, _ in VIEW_COLUMNS]
        quote = '"%s"' if server.dialect == "postgres" else "`%s`"
        columns = ["host", "machine_id"] + names
        self.rows = [dict(zip(columns, row)) for row in server.query(
            "SELECT %s FROM %s" % (", ".join(quote % c for c in columns), TABLE))]
        self.dash = DashServer(prefix, args=("--db", self.url))

    def expected(self, column: str, start: int, end: int, keep=lambda row: True) -> dict:
        """{key: (send, recv, conns)} of `column` for [start, end), from the table's rows."""
        sums = defaultdict(lambda: [0, 0, set()])
        for row in self.rows:
            if start <= row["ts"] < end and keep(row):
                entry = sums[dash_api.key_of(column, row[column])]
                entry[0] += row["send"]
                entry[1] += row["recv"]
                entry[2].add(tuple(row[c] for c in PAIR))
        return {key: (send, recv, len(pairs)) for key, (send, recv, pairs) in sums.items()}

    def totals(self, start: int, end: int, keep=lambda row: True) -> tuple:
        rows = [r for r in self.rows if start <= r["ts"] < end and keep(r)]
        return sum(r["send"] for r in rows), sum(r["recv"] for r in rows)

    def close(self) -> None:
        self.dash.close()


@pytest.fixture(scope="module", params=["postgres", "mariadb"])
def central(request):
    if not sql_servers.available(request.param):
        pytest.fail("needs root and the %s server (scripts/install-system-deps.sh test)"
                    % request.param)
    base = sql_servers.shared_tempdir("psdash-central-")
    server = sql_servers.start_server(request.param, base)
    prefix = sql_servers.shared_tempdir("psdash-prefix-")
    write_traffic(server)
    found = Central(server, prefix)
    yield found
    found.close()
    server.close()
    shutil.rmtree(prefix, ignore_errors=True)
    shutil.rmtree(base, ignore_errors=True)


def sums_by_key(result: dict) -> dict:
    return {s["key"]: (sum(s["send"]), sum(s["recv"])) for s in result["series"]}


def key(value: str) -> str:
    return dash_api.key_of("exe", value)


def test_the_dashboard_names_the_server_and_offers_a_host_dimension(central):
    banner = central.dash.banner
    assert f"127.0.0.1:{central.server.port}/picosnitch" in banner and "(server " in banner
    assert sql_servers.PASSWORD not in banner
    meta = central.dash.api("meta")
    assert meta["dimensions"][0] == {"column": "host", "title": "host"}
    assert "contime" not in [d["column"] for d in meta["dimensions"]]
    assert meta["source"].endswith(f"snitch_full@127.0.0.1:{central.server.port}/picosnitch")
    assert (meta["first"], meta["last"]) == (min(r["ts"] for r in central.rows),
                                             max(r["ts"] for r in central.rows))


@pytest.mark.parametrize("range_name, bucket", [("all", 3600), ("hour", 20), ("10 minutes", 10)])
def test_totals_and_series_match_the_server_table(central, range_name, bucket):
    result = central.dash.api("series", {"dim": "exe", "range": range_name, "top": 3})
    start, end = result["start"], result["end"]
    assert result["bucket"] == bucket and result["send"] > 0
    expected = central.expected("exe", start, end)
    assert (result["send"], result["recv"]) == central.totals(start, end)
    assert result["values"] == len(expected)
    cells = defaultdict(lambda: [0, 0])
    for row in central.rows:
        if start <= row["ts"] < end:
            cell = cells[(row["ts"] - row["ts"] % bucket, key(row["exe"]))]
            cell[0] += row["send"]
            cell[1] += row["recv"]
    shown = [s["key"] for s in result["series"]]
    got = {(t, s["key"]): [s["send"][k], s["recv"][k]] for s in result["series"]
           for k, t in enumerate(result["times"]) if s["send"][k] or s["recv"][k]}
    assert got == {cell: sums for cell, sums in cells.items() if cell[1] in shown}
    ranked = sorted(expected, key=lambda k: -(expected[k][0] + expected[k][1]))
    assert shown == ranked[:3]  # the most traffic first
    other = result["other"]
    assert (sum(other["send"]), sum(other["recv"])) == tuple(
        sum(expected[k][i] for k in ranked[3:]) for i in (0, 1))


def test_whole_hours_of_the_rollup_are_read_from_it(central):
    marked = central.server.query("SELECT machine_id, count(*) FROM %s_hours GROUP BY machine_id"
                                  % TABLE)
    assert marked == [(HOSTS["alpha.example"], len({hour_of(r["ts"]) for r in central.rows
                                                    if r["host"] == "alpha.example"}) - 1)]
    reader = server_readers(central.url, None)()
    pieces = reader.pieces(NOW - 86400, NOW + 1)  # as the dashboard reads the last day
    reader.close()
    [(start, end)] = pieces.whole
    assert ("beta.example", HOSTS["beta.example"], start, end) in pieces.uncovered
    alpha = [(a, b) for host, _, a, b in pieces.uncovered if host == "alpha.example"]
    # Of alpha's hours, only its last (never marked) may have rows there: it is whole in this
    # window when NOW is within 10 s of an hour's start, its last row 10 s before NOW.
    last = max(hour_of(row["ts"]) for row in central.rows if row["host"] == "alpha.example")
    assert not [row for row in central.rows if row["host"] == "alpha.example"
                and hour_of(row["ts"]) != last and any(a <= row["ts"] < b for a, b in alpha)]


def test_every_dimension_breaks_down_the_same_totals(central):
    for column in [d["column"] for d in central.dash.api("meta")["dimensions"]]:
        result = central.dash.api("series", {"dim": column, "range": "all", "top": 50})
        expected = central.expected(column, result["start"], result["end"])
        assert sums_by_key(result) == {k: v[:2] for k, v in expected.items()}, column
        table = central.dash.api("values", {"dim": column, "range": "all"})
        assert {v["key"]: (v["send"], v["recv"], v["conns"]) for v in table["values"]} == \
            expected, column


def test_text_is_compared_byte_for_byte(central):
    result = central.dash.api("values", {"dim": "exe", "range": "all"})
    texts = {v["text"]: v for v in result["values"]}
    assert {"/usr/bin/app", "/usr/bin/App", "/usr/bin/app "} <= set(texts)
    hostile = texts["/tmp/evil\\x0a\\x1b[2J\\xff"]  # stored escaped by the writer, shown as is
    for exe in ("/usr/bin/app ", hostile["text"]):
        only = central.dash.api("series", {"dim": "exe", "range": "all",
                                           "f": f"exe:is:{texts[exe]['key']}"})
        assert list(sums_by_key(only)) == [texts[exe]["key"]]
        assert (only["send"], only["recv"]) == central.totals(
            only["start"], only["end"], lambda row: row["exe"] == exe)
    # A value the server cannot hold (not UTF-8) matches nothing, and excludes nothing.
    nothing = central.dash.api("series", {"dim": "exe", "range": "all", "f": "exe:is:ff"})
    everything = central.dash.api("series", {"dim": "exe", "range": "all", "f": "exe:not:ff"})
    assert nothing["send"] == 0 and everything["send"] == sum(r["send"] for r in central.rows)


def test_the_host_filter(central):
    alpha = dash_api.key_of("host", "alpha.example")
    by_host = central.dash.api("values", {"dim": "host", "range": "all"})
    assert sorted(v["text"] for v in by_host["values"]) == sorted(HOSTS)
    for op, keep in (("is", lambda row: row["host"] == "alpha.example"),
                     ("not", lambda row: row["host"] != "alpha.example")):
        result = central.dash.api("series", {"dim": "raddr", "range": "all", "top": 50,
                                             "f": f"host:{op}:{alpha}"})
        start, end = result["start"], result["end"]
        assert (result["send"], result["recv"]) == central.totals(start, end, keep)
        assert sums_by_key(result) == {
            k: v[:2] for k, v in central.expected("raddr", start, end, keep).items()}
    # host and another filter together
    both = central.dash.api("values", [("dim", "host"), ("range", "all"), ("f", f"host:is:{alpha}"),
                                       ("f", f"exe:is:{key('/usr/bin/App')}")])
    keep = lambda row: row["host"] == "alpha.example" and row["exe"] == "/usr/bin/App"  # noqa: E731
    assert [(v["key"], v["send"], v["recv"], v["conns"]) for v in both["values"]] == [
        (alpha, *central.expected("host", both["start"], both["end"], keep)[alpha])]


def test_drill_down_for_one_executable(central):
    beta = dash_api.key_of("host", "beta.example")
    d = central.dash.api("executable", {"key": key("/usr/bin/app"), "range": "day",
                                        "f": f"host:is:{beta}"})
    keep = lambda row: row["exe"] == "/usr/bin/app" and row["host"] == "beta.example"  # noqa: E731
    assert d["text"] == "/usr/bin/app"
    assert (d["send"], d["recv"]) == central.totals(d["start"], d["end"], keep)
    sections = {s["column"]: s["values"] for s in d["sections"]}
    assert [v["text"] for v in sections["sha256"]] == ["0" * 64]
    assert [v["text"] for v in sections["raddr"]] == ["10.1.0.2"]
    seen = [r["ts"] for r in central.rows if r["exe"] == "/usr/bin/app"]  # on every host
    assert (d["first_seen"], d["last_seen"]) == (min(seen), max(seen))


def test_a_stopped_server_is_one_sentence_and_the_next_request_reconnects(central):
    before = central.dash.api("series", {"dim": "host", "range": "all"})
    central.server.stop()
    try:
        for name in ("series", "values", "meta"):
            status, _, body = central.dash.request(f"/api/{name}?dim=host&range=all")
            error = json.loads(body)["error"]
            assert status == 503 and "\n" not in error, (status, body)
            assert error.startswith("cannot connect to the SQL server")
            assert f"127.0.0.1:{central.server.port}/picosnitch" in error
            assert sql_servers.PASSWORD not in error
    finally:
        central.server.start()
    after = central.dash.api("series", {"dim": "host", "range": "all"})
    assert sums_by_key(after) == sums_by_key(before)


def test_snitch_db_has_no_host_dimension(tmp_path):
    paths = Paths.under(tmp_path)
    paths.ensure_dirs()
    conn, _ = sqlite_store.open_db(str(paths.db))
    sqlite_store.write_connections(conn, traffic(0)[:20])
    sqlite_store.close_db(conn)
    dash = DashServer(tmp_path)
    try:
        meta = dash.api("meta")
        assert "host" not in [d["column"] for d in meta["dimensions"]] and meta["source"] == ""
        for query in ("series?dim=host", "values?dim=exe&f=host:is:00"):
            status, _, body = dash.request(f"/api/{query}")
            assert status == 400 and b"host" in body
    finally:
        dash.close()


def run_dash(prefix, *args) -> subprocess.CompletedProcess:
    env = dict(os.environ, PICOSNITCH_PREFIX=str(prefix), PYTHONPATH=str(REPO))
    env.pop("SUDO_UID", None)
    return subprocess.run([sys.executable, "-m", "picosnitch", "dash", *args], capture_output=True,
                          text=True, env=env, timeout=60)


def one_sentence(result, *needles) -> None:
    assert result.returncode == 1 and result.stdout == "", result
    assert result.stderr.startswith("picosnitch dash: ") and result.stderr.count("\n") == 1, result
    assert all(needle in result.stderr for needle in needles), result.stderr


def test_a_bad_url_or_server_is_one_sentence_and_exit_status_1(central, tmp_path):
    one_sentence(run_dash(tmp_path, "--db", "ftp://somewhere/x"), "postgresql://", "mysql://")
    one_sentence(run_dash(tmp_path, "--db=mysql://u@h:port/x"), "port", "not a number")
    one_sentence(run_dash(tmp_path, "--db", url_of(central.server, table="no_such_table")),
                 "no_such_table")
    wrong = run_dash(tmp_path, "--db", url_of(central.server).replace(sql_servers.PASSWORD, "nope"))
    one_sentence(wrong, "cannot connect to the SQL server")
    one_sentence(run_dash(tmp_path, "--db", "config"), "config.json: cannot be read")
    paths = Paths.under(tmp_path)
    paths.ensure_dirs()
    paths.config.write_text('{"DB sql server": {}}\n')
    one_sentence(run_dash(tmp_path, "--db", "config"), '"DB sql server"', "is {}")


def test_db_config_reads_the_server_of_config_json(central):
    prefix = sql_servers.shared_tempdir("psdash-config-")
    paths = Paths.under(prefix)
    paths.ensure_dirs()
    paths.config.write_text(json.dumps(
        {"DB sql server": central.server.params(table_name=TABLE)}, indent=1))
    dash = DashServer(prefix, args=("--db", "config"))
    try:
        result = dash.api("series", {"dim": "host", "range": "all"})
        assert (result["send"], result["recv"]) == central.totals(result["start"], result["end"])
    finally:
        dash.close()
        shutil.rmtree(prefix, ignore_errors=True)


@pytest.mark.parametrize("scheme, drivers, extra", [
    ("postgresql", ("psycopg", "psycopg2"), "postgres"),
    ("mysql", ("pymysql", "mariadb"), "mysql")])
def test_a_missing_driver_names_what_to_install(monkeypatch, capsys, tmp_path, scheme, drivers,
                                                extra):
    for driver in drivers:
        monkeypatch.setitem(sys.modules, driver, None)  # import now raises ImportError
    monkeypatch.setenv("PICOSNITCH_PREFIX", str(tmp_path))
    monkeypatch.delenv("SUDO_UID", raising=False)
    assert cli.main(["dash", "--db", f"{scheme}://reader@db.example/picosnitch"]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert f'the client "{drivers[0]}" is not installed' in err
    assert f"install it with: {install_extra(extra)}" in err


def test_the_page_charts_by_host_and_shows_a_lost_server(central, browser):
    browser.get(central.dash.url + "#dim=host&range=all")
    n = loaded(browser)
    for select in ("dim", "where"):
        columns = [o.get_attribute("value")
                   for o in browser.find_elements("css selector", f"#{select} option")]
        assert "host" in columns, select
    source = browser.find_element("id", "source").text  # which server, never its password
    assert source.startswith("server: ") and "@" in source and "secret" not in source
    assert browser.find_element("id", "tab-live").text == "Live (this machine)"
    start, end = browser.execute_script(
        "const s = window.picosnitchDash.lastSeries; return [s.start, s.end];")
    expected = central.expected("host", start, end)
    assert drawn(browser, "send") == {host: expected[dash_api.key_of("host", host)][0]
                                      for host in HOSTS}
    assert severe_console_messages(browser) == []
    central.server.stop()
    try:
        choose(browser, "range", value="day")
        deadline = time.monotonic() + 20
        status = browser.find_element("id", "status")
        while "cannot connect to the SQL server" not in status.text:
            assert time.monotonic() < deadline, status.text
            time.sleep(0.05)
        assert status.get_attribute("class") == "error"
        shot(browser, "dash-central-server-lost.png")
    finally:
        central.server.start()
    choose(browser, "range", value="all")  # the next load reconnects
    loaded(browser, n)
    assert drawn(browser, "send") == {host: expected[dash_api.key_of("host", host)][0]
                                      for host in HOSTS}
