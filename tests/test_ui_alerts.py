"""`view` and `dash` show the latest alerts (record.json's "Alerts", newest first), as safe text.

The record is written here by the real RecordKeeper, as the daemon's keeper writes it, with one
alert whose names carry escape sequences and markup.
"""

import time

import pytest
from dash_harness import DashServer
from test_dash_browser import browser, severe_console_messages, shot  # noqa: F401 (fixture)
from test_view_tui import ui  # noqa: F401 (a fixture)

from picosnitch.alerts.record_keeper import RecordKeeper
from picosnitch.messages import Alert
from picosnitch.paths import Paths
from picosnitch.store import sqlite as sqlite_store
from picosnitch.timestamps import local_time
from picosnitch.ui import text

WHEN = time.time() - 100
HOSTILE = "/tmp/\x1b[2J<img src=x onerror=\"document.title='pwned'\">"


@pytest.fixture
def prefix(tmp_path):
    paths = Paths.under(tmp_path)
    paths.ensure_dirs()
    conn, _ = sqlite_store.open_db(str(paths.db))
    sqlite_store.close_db(conn)
    keeper = RecordKeeper(paths.record, paths.exe_log, alert_log_path=paths.alert_log)
    keeper.alert(Alert("new port", "/usr/bin/curl", "curl", "c" * 64, ("8443/tcp",), 1, WHEN))
    keeper.alert(Alert("new domain", HOSTILE, "<b>x</b>", "d" * 64, ("example.org", "evil.test"), 60, WHEN + 1))
    keeper.save()
    return tmp_path


def test_the_dash_api_lists_alerts_newest_first_as_safe_text(prefix):
    server = DashServer(prefix)
    try:
        newest, oldest = server.api("alerts", {})["alerts"]
    finally:
        server.close()
    assert oldest == {"time": local_time(WHEN), "kind": "new port", "name": "curl", "program": "/usr/bin/curl",
                      "values": "8443/tcp"}
    assert newest["program"] == "/tmp/\\x1b[2J<img src=x onerror=\"document.title='pwned'\">"
    assert newest["values"] == "example.org, evil.test (60 in all)"


def test_the_dash_page_shows_alerts_as_text(prefix, browser):  # noqa: F811
    server = DashServer(prefix)
    try:
        browser.get(server.url)
        browser.find_element("id", "tab-alerts").click()
        deadline = time.monotonic() + 10
        while not browser.find_elements("css selector", "#alerts-table tbody tr"):
            assert time.monotonic() < deadline, "no alerts shown"
            time.sleep(0.1)
        rows = [[c.text for c in row.find_elements("css selector", "td")]
                for row in browser.find_elements("css selector", "#alerts-table tbody tr")]
        shot(browser, "dash-alerts.png")
        assert rows[1] == [local_time(WHEN), "new port", "curl", "/usr/bin/curl", "8443/tcp"]
        assert rows[0][3].endswith("<img src=x onerror=\"document.title='pwned'\">")
        assert browser.execute_script("return document.querySelectorAll('#alerts-table img, #alerts-table b')"
                                      ".length") == 0
        assert browser.title == "picosnitch dash"
        assert browser.find_element("id", "alerts-note").text == "2 alerts, newest first"
        assert severe_console_messages(browser) == []
    finally:
        server.close()


def test_view_shows_the_alerts_on_a_key_and_goes_back_on_any(prefix, ui):  # noqa: F811
    view = ui(prefix)
    view.keys("a")
    screen = view.wait_for("alerts: 2")
    lines = screen.splitlines()
    assert lines[1].startswith(f"{local_time(WHEN + 1)}  new domain  <b>x</b>  /tmp/\\x1b[2J<img")
    assert lines[2] == f"{local_time(WHEN)}  new port  curl  /usr/bin/curl  8443/tcp"
    assert "\x1b" not in screen
    view.keys("x")
    view.wait_for("picosnitch view │ range")


@pytest.fixture
def quiet_prefix(tmp_path):
    """A prefix with a snitch.db and no record.json: nothing has been alerted on."""
    paths = Paths.under(tmp_path)
    paths.ensure_dirs()
    conn, _ = sqlite_store.open_db(str(paths.db))
    sqlite_store.close_db(conn)
    return tmp_path


def test_the_dash_says_so_when_there_are_no_alerts(quiet_prefix, browser):  # noqa: F811
    server = DashServer(quiet_prefix)
    try:
        assert server.api("alerts", {}) == {"alerts": []}
        browser.get(server.url)
        browser.find_element("id", "tab-alerts").click()
        deadline = time.monotonic() + 10
        while not browser.find_element("id", "alerts-note").text:
            assert time.monotonic() < deadline, "no note shown"
            time.sleep(0.1)
        assert browser.find_element("id", "alerts-note").text.startswith("no alerts")
        assert browser.find_elements("css selector", "#alerts-table tbody tr") == []
        assert severe_console_messages(browser) == []
    finally:
        server.close()


def test_view_says_so_when_there_are_no_alerts(quiet_prefix, ui):  # noqa: F811
    view = ui(quiet_prefix)
    view.keys("a")
    screen = view.wait_for("alerts: 0")
    assert screen.splitlines()[1] == "no alerts (see picosnitch baseline)"


def test_an_alert_about_a_script_names_the_script_as_its_program():
    shown = text.alert_fields({"time": WHEN, "alert": "new port", "exe": "/usr/bin/python3", "script": "/opt/tool.py",
                               "name": "python3", "values": ["8443/tcp"], "count": 1})
    assert shown == {"time": local_time(WHEN), "kind": "new port", "name": "python3", "program": "/opt/tool.py",
                     "values": "8443/tcp"}



def test_what_is_not_text_in_a_hand_edited_record_is_shown_empty():
    assert text.alert_fields({"alert": "new port", "exe": 3, "values": "not a list", "time": "noon"}) == {
        "time": "", "kind": "new port", "name": "", "program": "", "values": ""}


def test_view_scrolls_a_long_list_of_alerts(tmp_path, ui):  # noqa: F811
    paths = Paths.under(tmp_path)
    paths.ensure_dirs()
    conn, _ = sqlite_store.open_db(str(paths.db))
    sqlite_store.close_db(conn)
    keeper = RecordKeeper(paths.record, paths.exe_log, alert_log_path=paths.alert_log)
    for port in range(1, 41):  # newest first: port 40 on the first line
        keeper.alert(Alert("new port", "/usr/bin/curl", "curl", "c" * 64, (f"{port}/tcp",), 1, WHEN + port))
    keeper.save()
    view = ui(tmp_path, height=30)
    view.keys("a")
    lines = view.wait_for("alerts: 40").splitlines()
    assert lines[1].endswith(" 40/tcp") and lines[28].endswith(" 13/tcp") and len(lines) == 30
    view.keys("Down", "Down", "Down")
    assert view.wait_for(lambda s: s.splitlines()[1].endswith(" 37/tcp")).splitlines()[28].endswith(" 10/tcp")
    view.keys("End")
    assert view.wait_for(lambda s: s.splitlines()[28].endswith(" 1/tcp")).splitlines()[1].endswith(" 28/tcp")
    view.keys("Home")
    view.wait_for(lambda s: s.splitlines()[1].endswith(" 40/tcp"))
    view.keys("x")
    view.wait_for("picosnitch view │ range")
