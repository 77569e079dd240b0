"""GeoIP: the country of remote addresses in `view` and `dash`.

The country database is a MaxMind DB file the tests write themselves (mmdb_writer, from the format's
specification; nothing is ever downloaded) and the real `maxminddb` package reads. Its networks are
the lab's (10.232.0.0/14, fd00:5e::/32) and loopback, where the daemon-made snitch.db of
test_view_tui has its traffic.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import maxminddb
import mmdb_writer
import pytest
from dash_harness import DashServer
from mmdb_writer import country
from test_dash_browser import browser, loaded, severe_console_messages, shot  # noqa: F401 (fixture)
from test_view_tui import REPO, Tmux, daemon_db, line_with, open_tab, ui  # noqa: F401 (fixtures)

from picosnitch import config
from picosnitch.connection import Connection, Endpoint, Identity, ProcessInfo
from picosnitch.paths import Paths
from picosnitch.store import sqlite as sqlite_store
from picosnitch.ui.annotations import Annotations

NETWORKS = {
    "10.232.0.0/14": country("DE", "Germany"),
    "10.233.0.0/16": country("NL", "Netherlands"),  # inside the /14: wins for its own addresses
    "fd00:5e::/32": country("FR", "France"),
    "127.0.0.0/8": country("JP", "Japan"),
}
# address -> country code the database gives it ("" for none)
EXPECTED = {"10.232.1.1": "DE", "10.235.255.254": "DE", "10.233.0.5": "NL", "fd00:5e:7::1": "FR",
            "::ffff:10.232.0.9": "DE", "127.0.0.1": "JP", "192.0.2.7": "", "fd00:5f::1": ""}


@pytest.fixture
def mmdb(tmp_path):
    return mmdb_writer.write(tmp_path / "countries.mmdb", NETWORKS)


# ---- the file the tests write is a valid MaxMind DB ----

@pytest.mark.parametrize("mode", ["MODE_FILE", "MODE_MMAP_EXT"])  # pure Python; libmaxminddb (C)
def test_the_written_database_reads_back_with_maxminddb(mmdb, mode):
    reader = maxminddb.open_database(str(mmdb), getattr(maxminddb, mode))
    try:
        meta = reader.metadata()
        assert (meta.binary_format_major_version, meta.binary_format_minor_version) == (2, 0)
        assert (meta.ip_version, meta.record_size, meta.languages) == (6, 24, ["en"])
        assert meta.database_type == "picosnitch-test-country"
        assert abs(meta.build_epoch - time.time()) < 60
        assert reader.get("10.233.200.1") == {"country": {"iso_code": "NL",
                                                         "names": {"en": "Netherlands"}}}
        for address, code in EXPECTED.items():
            found = reader.get(address)
            assert (found["country"]["iso_code"] if found else "") == code, address
        # Prefix lengths as a reader reports them: IPv4 in IPv4 bits, IPv6 in IPv6 bits.
        assert reader.get_with_prefix_len("127.1.2.3")[1] == 8
        assert reader.get_with_prefix_len("fd00:5e::1")[1] == 32
        assert reader.get_with_prefix_len("10.234.0.1")[1] == 15  # the /14 split around the /16
    finally:
        reader.close()


def test_the_data_section_encodes_every_type_a_reader_knows(tmp_path):
    value = {"text": "Zürich", "small": 7, "zero": 0, "big": 2**40, "ratio": 0.25, "yes": True,
             "no": False, "raw": b"\x00\xff", "list": ["a", 1], "long": "x" * 70000,
             "nested": {"names": {"en": "E", "de": "D"}}}
    path = mmdb_writer.write(tmp_path / "types.mmdb", {"10.232.0.0/14": value})
    for mode in (maxminddb.MODE_FILE, maxminddb.MODE_MMAP_EXT):
        with maxminddb.open_database(str(path), mode) as reader:
            assert reader.get("10.232.0.1") == value


# ---- Annotations: what view and dash show next to an address ----

def test_annotations_give_the_country_code_of_each_address(mmdb):
    notes = Annotations(str(mmdb))
    assert notes.geoip and notes.problem == ""
    assert {a: notes.country(a) for a in EXPECTED} == EXPECTED
    assert notes.country("") == "" and notes.country("not an address") == ""
    assert notes.note("raddr", "10.232.1.1") == " [DE]" and notes.note("raddr", "192.0.2.7") == ""
    assert notes.note("laddr", "10.232.1.1") == ""  # only remote addresses


def test_geoip_lookup_false_turns_it_off(tmp_path, mmdb):
    paths = Paths.under(tmp_path)
    paths.ensure_dirs()
    paths.config.write_text(json.dumps({"GeoIP database": str(mmdb), "GeoIP lookup": False}))
    notes = Annotations.load(paths, config.load(paths.config))
    assert not notes.geoip and notes.problem == "" and notes.country("10.232.1.1") == ""
    paths.config.write_text(json.dumps({"GeoIP database": str(mmdb)}))
    assert Annotations.load(paths, config.load(paths.config)).country("10.232.1.1") == "DE"


def damaged(tmp_path, how: str):
    """A path to a file that is not a usable MaxMind DB, in one of several ways."""
    good = mmdb_writer.build(NETWORKS)
    path = tmp_path / f"{how}.mmdb"
    if how == "directory":
        path.mkdir()
    elif how != "missing":
        path.write_bytes({"empty": b"", "text": b"country,code\nDE,Germany\n",
                          "truncated": good[: len(good) // 2],
                          "no metadata": good[: good.rfind(mmdb_writer.METADATA_MARKER)]}[how])
    return path


@pytest.mark.parametrize("how, problem", [
    ("missing", "GeoIP off: cannot read {path}: No such file or directory"),
    ("empty", "GeoIP off: {path} is not a MaxMind DB (.mmdb) file"),
    ("text", "GeoIP off: {path} is not a MaxMind DB (.mmdb) file"),
    ("truncated", "GeoIP off: {path} is not a MaxMind DB (.mmdb) file"),
    ("no metadata", "GeoIP off: {path} is not a MaxMind DB (.mmdb) file"),
    ("directory", "GeoIP off: {path} is not a MaxMind DB (.mmdb) file"),
])
def test_an_unusable_database_is_one_sentence_and_no_countries(tmp_path, how, problem):
    path = damaged(tmp_path, how)
    notes = Annotations(str(path))
    assert notes.problem == problem.format(path=path)
    assert not notes.geoip and notes.country("10.232.1.1") == ""


def test_a_search_tree_damaged_past_the_header_stops_geoip_at_the_first_lookup(tmp_path):
    good = mmdb_writer.build(NETWORKS)
    path = tmp_path / "tree.mmdb"
    path.write_bytes(b"\xff" * 60 + good[60:])  # records pointing far beyond the file
    notes = Annotations(str(path))
    assert notes.geoip and notes.problem == ""  # the reader opens it: only a lookup can tell
    assert notes.country("10.232.1.1") == ""
    assert notes.problem == f"GeoIP off: {path} is damaged (a lookup failed)"
    assert not notes.geoip and notes.country("10.233.0.5") == ""


# ---- view, in tmux, over the snitch.db the real daemon wrote ----

@pytest.fixture
def short_dir():
    """A directory with a short path, so that sentences naming a file in it fit the screen."""
    path = Path(tempfile.mkdtemp(prefix="psg", dir="/tmp"))
    yield path
    shutil.rmtree(path)


def prefix_reading(daemon_prefix, tmp_path, **settings):
    """A prefix with the daemon's snitch.db and a config.json of `settings`."""
    source, paths = Paths.under(daemon_prefix), Paths.under(tmp_path / "p")
    paths.ensure_dirs()
    for suffix in ("", "-wal"):
        if source.db.with_name(source.db.name + suffix).exists():
            shutil.copy(source.db.with_name(source.db.name + suffix), paths.data_dir)
    paths.config.write_text(json.dumps(settings))
    return paths.root


def test_view_shows_the_country_after_a_remote_address(daemon_db, ui, tmp_path, mmdb):  # noqa: F811
    prefix = prefix_reading(daemon_db[0], tmp_path, **{"GeoIP database": str(mmdb)})
    view = ui(prefix)
    screen = open_tab(view, "remote address")
    assert "127.0.0.1 [JP]" in line_with(screen, "127.0.0.1")
    assert "GeoIP off" not in screen


def test_view_with_geoip_lookup_false_shows_no_country(daemon_db, ui, tmp_path, mmdb):  # noqa: F811
    prefix = prefix_reading(daemon_db[0], tmp_path,
                            **{"GeoIP database": str(mmdb), "GeoIP lookup": False})
    view = ui(prefix)
    line = line_with(open_tab(view, "remote address"), "127.0.0.1")
    assert line.rstrip().endswith("127.0.0.1")


def test_view_says_in_one_sentence_that_a_damaged_database_turns_geoip_off(
        daemon_db, ui, tmp_path, short_dir):  # noqa: F811
    path = damaged(short_dir, "text")
    prefix = prefix_reading(daemon_db[0], tmp_path, **{"GeoIP database": str(path)})
    view = ui(prefix)
    screen = open_tab(view, "remote address")
    assert line_with(screen, "127.0.0.1").rstrip().endswith("127.0.0.1")  # the view still works
    footer = line_with(screen, "GeoIP off")  # in place of the key hints
    assert re.fullmatch(r"\d+/\d+  " + re.escape(f"GeoIP off: {path} is not a MaxMind DB (.mmdb) file"),
                        footer.rstrip())


def test_view_without_the_maxminddb_package_says_so(daemon_db, tmp_path, mmdb):  # noqa: F811
    prefix = prefix_reading(daemon_db[0], tmp_path, **{"GeoIP database": str(mmdb)})
    # `python -S`: no site-packages, as for a user who installed picosnitch without the extra.
    # Without COLUMNS and LINES, which tmux's shell may export while the window is still
    # 80x24 (curses would keep that size).
    view = Tmux(["env", "-u", "COLUMNS", "-u", "LINES", sys.executable, "-S", "-m", "picosnitch",
                 "view"], {"PICOSNITCH_PREFIX": str(prefix), "PYTHONPATH": str(REPO)}, 260, 30)
    try:
        # The command is the one for how this Python runs picosnitch (see installed.py).
        command = subprocess.run(
            [sys.executable, "-S", "-c", "from picosnitch.installed import install_extra; "
             "print(install_extra('geoip'))"], capture_output=True, text=True, check=True,
            env=dict(os.environ, PYTHONPATH=str(REPO))).stdout.strip()
        sentence = (f"GeoIP off: reading {mmdb} needs the Python package maxminddb "
                    f"(install it with: {command})")
        screen = view.wait_for(sentence)
        assert "conns  executable" in screen and "Traceback" not in screen
        view.keys("q")
        assert "EXIT=0" in view.wait_for("EXIT=")
    finally:
        view.close()


# ---- dash: the API and the page ----

def write_db(prefix, **settings):
    """A snitch.db with one connection to each address of EXPECTED; config.json of `settings`."""
    paths = Paths.under(prefix)
    paths.ensure_dirs()
    conn, _ = sqlite_store.open_db(str(paths.db))
    process = ProcessInfo("/usr/bin/curl", "curl", "curl", "0" * 64)
    now = int(time.time()) - 60
    sqlite_store.write_connections(conn, [
        Connection(Identity(process), Endpoint(10 if ":" in a else 2, 6, "", 1, a, 443), now, 100, 10)
        for a in EXPECTED])
    sqlite_store.close_db(conn)
    paths.config.write_text(json.dumps(settings))


def countries(server) -> dict:
    return {v["text"]: v["country"] for v in server.api("values", {"dim": "raddr"})["values"]}


def test_dash_api_gives_the_country_of_each_remote_address(tmp_path, mmdb):
    write_db(tmp_path, **{"GeoIP database": str(mmdb)})
    server = DashServer(tmp_path)
    try:
        meta = server.api("meta")
        assert meta["geoip"] is True and meta["geoip_problem"] == ""
        assert countries(server) == EXPECTED
        drill = server.api("executable", {"key": b"/usr/bin/curl".hex()})
        raddr = next(s for s in drill["sections"] if s["column"] == "raddr")
        assert {v["text"]: v["country"] for v in raddr["values"]} == EXPECTED
    finally:
        server.close()


def test_dash_with_geoip_lookup_false_gives_no_countries(tmp_path, mmdb):
    write_db(tmp_path, **{"GeoIP database": str(mmdb), "GeoIP lookup": False})
    server = DashServer(tmp_path)
    try:
        assert server.api("meta")["geoip"] is False
        assert set(countries(server).values()) == {""}
    finally:
        server.close()


def test_dash_page_shows_countries_in_the_remote_address_table(
        daemon_db, browser, tmp_path, mmdb):  # noqa: F811
    prefix = prefix_reading(daemon_db[0], tmp_path, **{"GeoIP database": str(mmdb)})
    server = DashServer(prefix)
    try:
        browser.get(server.url + "#dim=raddr")
        loaded(browser)
        head = [th.text for th in browser.find_elements("css selector", "#table thead th")]
        assert head[:2] == ["remote address", "country"]
        rows = [[td.text for td in tr.find_elements("css selector", "td")]
                for tr in browser.find_elements("css selector", "#table tbody tr")]
        assert ["127.0.0.1", "JP"] in [row[:2] for row in rows]
        assert browser.find_element("id", "notice").get_attribute("hidden") is not None
        shot(browser, "dash-geoip-1-countries.png")
        assert severe_console_messages(browser) == []
    finally:
        server.close()


def test_dash_page_says_in_one_sentence_that_a_damaged_database_turns_geoip_off(
        tmp_path, browser):  # noqa: F811
    path = damaged(tmp_path, "text")
    write_db(tmp_path, **{"GeoIP database": str(path)})
    server = DashServer(tmp_path)
    try:
        assert server.api("meta")["geoip"] is False
        browser.get(server.url + "#dim=raddr")
        loaded(browser)
        notice = browser.find_element("id", "notice")
        assert notice.is_displayed()
        assert notice.text == f"GeoIP off: {path} is not a MaxMind DB (.mmdb) file"
        head = [th.text for th in browser.find_elements("css selector", "#table thead th")]
        assert "country" not in head
        shot(browser, "dash-geoip-2-damaged-database.png")
    finally:
        server.close()
