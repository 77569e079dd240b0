"""The JSON API of `picosnitch dash`, against a snitch.db the real daemon wrote from known traffic.

The database is test_view_tui's: "psnv-alpha" sent 300000 bytes and received 7000, a hostile
client (escape sequences, newline and invalid UTF-8 in its names) sent 123456 and received 4321,
and whatever else ran on the machine meanwhile. Every figure the API gives is compared with the
`connections` view, which people query with their own tools.
"""

import hashlib
import os
import time

import pytest
from dash_harness import DashServer
from test_view_tui import HOSTILE_NAME, daemon_db  # noqa: F401 (a fixture)

from picosnitch.connection import Connection, Endpoint, Identity, ProcessInfo
from picosnitch.daemon.live_feed import LiveFeedServer
from picosnitch.paths import Paths
from picosnitch.store import sqlite as sqlite_store
from picosnitch.ui.dash import api as dash_api

HOSTILE_KEY = HOSTILE_NAME.hex()
ALPHA_KEY = b"psnv-alpha".hex()


@pytest.fixture(scope="module")
def dash(daemon_db):  # noqa: F811
    prefix, ports = daemon_db
    server = DashServer(prefix)
    yield server, prefix, ports
    server.close()


def view(prefix, sql, params=()):
    conn = sqlite_store.open_readonly(str(Paths.under(prefix).db))
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def window_of(result):
    return result["start"], result["end"]


def test_prints_the_url_and_serves_the_page(dash):
    server, _, _ = dash
    assert server.banner.strip() == f"picosnitch dash: http://127.0.0.1:{server.port}/"
    status, headers, body = server.request("/")
    assert status == 200 and b'<div id="chart-send"' in body
    assert "script-src 'self'" in headers["content-security-policy"]
    status, _, body = server.request("/static/vendor/uPlot.iife.min.js")
    assert status == 200 and b"uPlot" in body


@pytest.mark.parametrize("range_name", ["all", "day"])
def test_totals_and_series_by_executable_match_the_connections_view(dash, range_name):
    server, prefix, _ = dash
    result = server.api("series", {"dim": "exe", "range": range_name, "top": 50})
    start, end = window_of(result)
    bucket = result["bucket"]
    if range_name == "day":
        assert bucket == 3600  # whole hours come from traffic_hourly: the rollup is exact too
    expected = view(prefix, "SELECT sum(send), sum(recv), count(DISTINCT exe) FROM connections "
                            "WHERE ts >= ? AND ts < ?", (start, end))[0]
    assert (result["send"], result["recv"], result["values"]) == expected
    assert expected[0] >= 300000 + 123456
    cells = {}
    for ts, exe, sent, received in view(
            prefix, "SELECT ts - ts % ?, exe, sum(send), sum(recv) FROM connections "
                    "WHERE ts >= ? AND ts < ? GROUP BY 1, 2", (bucket, start, end)):
        cells[(ts, dash_api.key_of("exe", exe))] = (sent, received)
    got = {}
    for s in result["series"]:
        for k, t in enumerate(result["times"]):
            if s["send"][k] or s["recv"][k]:
                got[(t, s["key"])] = (s["send"][k], s["recv"][k])
    shown = {s["key"] for s in result["series"]}
    assert got == {cell: sums for cell, sums in cells.items() if cell[1] in shown}
    other = result["other"] or {"send": [0], "recv": [0]}
    assert sum(other["send"]) + sum(sum(s["send"]) for s in result["series"]) == expected[0]
    assert sum(other["recv"]) + sum(sum(s["recv"]) for s in result["series"]) == expected[1]


def test_every_dimension_breaks_down_the_same_totals(dash):
    server, prefix, _ = dash
    meta = server.api("meta")
    columns = [d["column"] for d in meta["dimensions"]]
    assert "contime" not in columns and {"exe", "pexe", "gpsha256", "uid", "rport", "raddr",
                                         "domain", "container"} <= set(columns)
    for column in columns:
        result = server.api("series", {"dim": column, "range": "all", "top": 50})
        start, end = window_of(result)
        expected = {dash_api.key_of(column, value): (sent, received) for value, sent, received in
                    view(prefix, f"SELECT {column}, sum(send), sum(recv) FROM connections "
                                 "WHERE ts >= ? AND ts < ? GROUP BY 1", (start, end))}
        got = {s["key"]: (sum(s["send"]), sum(s["recv"])) for s in result["series"]}
        assert result["values"] == len(expected), column
        assert all(expected[key] == sums for key, sums in got.items()), column
        assert len(got) == min(50, len(expected)), column


def test_a_filter_by_key_finds_the_hostile_process_exactly_and_shows_it_escaped(dash):
    server, prefix, _ = dash
    hostile = server.api("series", {"dim": "name", "range": "all", "f": f"name:is:{HOSTILE_KEY}"})
    assert (hostile["send"], hostile["recv"]) == (123456, 4321)
    (only,) = hostile["series"]
    assert only["key"] == HOSTILE_KEY
    assert only["text"] == "\\x1b[2J\\xffevil\\x0a"  # nothing that could steer a page or terminal
    everything = server.api("series", {"dim": "name", "range": "all"})
    rest = server.api("series", {"dim": "name", "range": "all", "f": f"name:not:{HOSTILE_KEY}"})
    assert rest["send"] == everything["send"] - 123456
    assert rest["recv"] == everything["recv"] - 4321
    # Filters combine: the alpha client's traffic by remote port is its one connection.
    _, ports = dash[1], dash[2]
    alpha = server.api("values", [("dim", "rport"), ("range", "all"), ("f", f"name:is:{ALPHA_KEY}")])
    assert [(v["key"], v["send"], v["recv"], v["conns"]) for v in alpha["values"]] == [
        (str(ports[0]), 300000, 7000, 1)]


def test_values_list_matches_the_view(dash):
    server, prefix, _ = dash
    result = server.api("values", {"dim": "raddr", "range": "all"})
    expected = {dash_api.key_of("raddr", a): (s, r) for a, s, r in view(
        prefix, "SELECT raddr, sum(send), sum(recv) FROM connections GROUP BY raddr")}
    assert {v["key"]: (v["send"], v["recv"]) for v in result["values"]} == expected
    loopback = [v for v in result["values"] if v["text"] == "127.0.0.1"]
    assert loopback and loopback[0]["country"] == ""  # no GeoIP database configured


def test_drill_down_for_one_executable(dash):
    server, prefix, ports = dash
    exe = str(prefix / "bin" / "psnv-alpha")
    d = server.api("executable", {"key": exe.encode().hex(), "range": "all"})
    assert d["text"] == exe and (d["send"], d["recv"]) == (300000, 7000)
    sections = {s["column"]: s["values"] for s in d["sections"]}
    sha = hashlib.sha256(open(exe, "rb").read()).hexdigest()
    assert [v["text"] for v in sections["sha256"]] == [sha]
    assert [v["text"] for v in sections["rport"]] == [str(ports[0])]
    assert [v["text"] for v in sections["raddr"]] == ["127.0.0.1"]
    assert sections["pexe"] and sections["uid"][0]["text"].startswith("0 (root)")
    first, last = view(prefix, "SELECT min(ts), max(ts) FROM connections WHERE exe = ?", (exe,))[0]
    assert (d["first_seen"], d["last_seen"]) == (first, last)


def test_time_ranges_and_stepping_back(dash):
    server, prefix, _ = dash
    now = time.time()
    hour = server.api("series", {"dim": "exe", "range": "hour"})
    assert hour["end"] - hour["start"] == 3600 and abs(hour["end"] - now) < 5
    assert hour["send"] > 0  # the daemon ran minutes ago
    earlier = server.api("series", {"dim": "exe", "range": "hour", "offset": 1})
    assert earlier["end"] == earlier["start"] + 3600 and abs(earlier["end"] - hour["start"]) <= 2
    first, last = view(prefix, "SELECT min(ts), max(ts) FROM connections")[0]
    custom = server.api("series", {"dim": "exe", "start": first, "end": last + 1})
    everything = server.api("series", {"dim": "exe", "range": "all"})
    assert (custom["send"], custom["recv"]) == (everything["send"], everything["recv"])
    empty = server.api("series", {"dim": "exe", "start": first - 7200, "end": first - 3600})
    assert (empty["send"], empty["recv"], empty["series"]) == (0, 0, [])


@pytest.mark.parametrize("query", [
    "series?dim=contime", "series?dim=exe%3Bdrop", "series?range=fortnight",
    "series?f=exe:is:zz", "series?f=exe:like:00", "series?f=bogus:is:00",
    "series?start=10&end=5", "series?offset=-1", "series?top=x", "executable?key=nothex",
    "live?since=soon"])
def test_bad_parameters_are_refused_with_a_message(dash, query):
    server, _, _ = dash
    status, _, body = server.request(f"/api/{query}")
    assert status == 400 and b'"error"' in body


def test_live_view_relays_the_daemon_feed(tmp_path):
    paths = Paths.under(tmp_path)
    paths.ensure_dirs()
    conn, _ = sqlite_store.open_db(str(paths.db))
    process = ProcessInfo("/usr/bin/x", "x", "x", "0" * 64)
    sqlite_store.write_connections(conn, [Connection(Identity(process), Endpoint(2, 6), 1000, 1, 1)])
    sqlite_store.close_db(conn)
    server = DashServer(tmp_path)
    try:
        deadline = time.monotonic() + 10
        while True:  # no daemon yet: the page is told so
            result = server.api("live")
            if result["error"]:
                break
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert result["frames"] == [] and "not running" in result["error"]
        feed = LiveFeedServer(paths.live_socket, os.getgid())
        try:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:  # the relay retries every few seconds
                feed.accept()
                feed.broadcast({"time": time.time(), "interval": 1.0, "rates": [
                    {"exe": "/tmp/\x1b[31m<b>evil", "name": "evil", "pexe": "/bin/sh",
                     "pname": "sh", "uid": 1000, "send": 2048.0, "recv": 10.5}]})
                result = server.api("live")
                if result["frames"]:
                    break
                time.sleep(0.3)
        finally:
            feed.close()
        rate = result["frames"][-1]["rates"][0]
        assert rate["exe"] == "/tmp/\\x1b[31m<b>evil" and rate["send"] == 2048.0
        later = server.api("live", {"since": result["frames"][-1]["time"]})
        assert all(f["time"] > result["frames"][-1]["time"] for f in later["frames"])
    finally:
        server.close()
