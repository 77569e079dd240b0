"""`picosnitch dash` in headless Chromium (Debian's chromium + chromium-driver, driven by
selenium), against the snitch.db the real daemon wrote from known traffic (see test_view_tui),
and, for the live tab, against the running daemon's live feed.

The page keeps what it drew in `window.picosnitchDash` (series labels and the uPlot charts), so
the test reads the charts' own data rather than pixels; a screenshot of each step is saved under
test-artifacts/ for a human to look at.
"""

import os
import shutil
import subprocess
import tempfile
import time

import pytest
from daemon_harness import Daemon, Sink, wait_for
from dash_harness import REPO, DashServer
from test_view_tui import daemon_db  # noqa: F401 (a fixture)

from picosnitch.connection import Connection, Endpoint, Identity, ProcessInfo
from picosnitch.paths import Paths
from picosnitch.store import sqlite as sqlite_store

ARTIFACTS = REPO / "test-artifacts"
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run",
                  "--disable-quic", "--window-size=1400,1500")


@pytest.fixture
def browser():
    webdriver = pytest.importorskip("selenium.webdriver")
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.skip("needs Debian's chromium and chromium-driver (scripts/install-system-deps.sh test)")
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="psdash-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS + (f"--user-data-dir={profile}",):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def loaded(driver, after: int = 0, timeout: float = 20) -> int:
    """Waits until the page has drawn a load newer than `after` and none is pending."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = driver.execute_script(
            "const s = window.picosnitchDash; const d = Number(document.body.dataset.loaded || 0);"
            "return s && d === s.loads ? d : 0;")
        if done > after:
            return done
        time.sleep(0.05)
    raise AssertionError("the page did not finish loading: "
                         + driver.find_element("id", "status").text)


def drawn(driver, which: str) -> dict:
    """{series label: sum of its points} of chart `which` ("send" or "recv"), from uPlot."""
    return driver.execute_script("""
        const u = window.picosnitchDash.charts[arguments[0]];
        const out = {};
        u.series.slice(1).forEach((s, i) => {
            out[s.label] = u.data[i + 1].reduce((a, b) => a + (b || 0), 0); });
        return out;""", which)


def choose(driver, select_id: str, value: str = None, text: str = None) -> None:
    from selenium.webdriver.support.ui import Select

    select = Select(driver.find_element("id", select_id))
    if value is not None:
        select.select_by_value(value)
    else:
        select.select_by_visible_text(text)


def shot(driver, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    driver.save_screenshot(str(ARTIFACTS / name))


def severe_console_messages(driver) -> list:
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def test_charts_filter_dimension_and_range(daemon_db, browser):  # noqa: F811
    prefix, ports = daemon_db
    alpha = str(prefix / "bin" / "psnv-alpha")
    server = DashServer(prefix)
    try:
        # Other programs on the machine talk too: draw up to 50 executables, not the default 10.
        browser.get(server.url + "#top=50")
        n = loaded(browser)
        # Both charts drawn (canvas with a size), one series per executable, exact sums.
        for which in ("send", "recv"):
            size = browser.execute_script(
                "const c = document.querySelector('#chart-' + arguments[0] + ' canvas');"
                "return c ? [c.width, c.height] : null;", which)
            assert size and size[0] > 300 and size[1] > 100, which
        sent, received = drawn(browser, "send"), drawn(browser, "recv")
        assert sent[alpha] == 300000 and received[alpha] == 7000
        hostile = [label for label in sent if "evil" in label]
        assert len(hostile) == 1 and "\\x1b[2J\\xffevil\\x0a" in hostile[0]
        assert sent[hostile[0]] == 123456 and received[hostile[0]] == 4321
        legend = browser.find_element("css selector", "#chart-send .u-legend").text
        assert "psnv-alpha" in legend
        shot(browser, "dash-1-executables.png")

        # where name is psnv-alpha
        choose(browser, "where", value="name")
        deadline = time.monotonic() + 20
        while "psnv-alpha" not in browser.find_element("id", "is").text:
            assert time.monotonic() < deadline, "the 'is' list never filled"
            time.sleep(0.05)
        n = loaded(browser, n)
        choose(browser, "is", text="psnv-alpha")
        n = loaded(browser, n)
        assert drawn(browser, "send") == {alpha: 300000}
        assert drawn(browser, "recv") == {alpha: 7000}
        cards = browser.find_element("id", "cards").text
        assert "300 KB" in cards and "7.00 KB" in cards
        assert "where name is psnv-alpha" in browser.find_element("id", "filters").text

        # by remote port
        choose(browser, "dim", value="rport")
        n = loaded(browser, n)
        assert drawn(browser, "send") == {str(ports[0]): 300000}
        assert drawn(browser, "recv") == {str(ports[0]): 7000}

        # a day, then a day further back (nothing: the database is minutes old)
        window_before = browser.find_element("id", "window").text
        choose(browser, "range", value="day")
        n = loaded(browser, n)
        assert browser.find_element("id", "window").text != window_before
        assert drawn(browser, "send") == {str(ports[0]): 300000}
        shot(browser, "dash-2-filtered-by-port-day.png")
        browser.find_element("id", "back").click()
        n = loaded(browser, n)
        assert drawn(browser, "send") == {} and "0 B" in browser.find_element("id", "cards").text
        browser.find_element("id", "forward").click()
        n = loaded(browser, n)
        assert drawn(browser, "send") == {str(ports[0]): 300000}

        # the drill-down of an executable
        browser.find_element("id", "clear-filter").click()
        n = loaded(browser, n)
        choose(browser, "dim", value="exe")
        n = loaded(browser, n)
        rows = browser.find_elements("css selector", "#table tbody tr")
        next(r for r in rows if r.text.startswith(alpha + " ")).click()
        deadline = time.monotonic() + 20
        while browser.find_element("id", "drill").get_attribute("hidden") is not None:
            assert time.monotonic() < deadline, "no drill-down"
            time.sleep(0.05)
        drill = browser.find_element("id", "drill").text
        assert alpha in drill and "first seen" in drill and str(ports[0]) in drill
        shot(browser, "dash-3-drill-down.png")
        assert severe_console_messages(browser) == []  # no CSP violation, no script error
    finally:
        server.close()


def test_markup_in_values_is_shown_as_text(tmp_path, browser):
    paths = Paths.under(tmp_path)
    paths.ensure_dirs()
    conn, _ = sqlite_store.open_db(str(paths.db))
    evil = "/tmp/<img src=x onerror=\"document.title='pwned'\">"
    process = ProcessInfo(evil, "<script>x</script>", evil, "0" * 64)
    sqlite_store.write_connections(conn, [Connection(
        Identity(process), Endpoint(2, 6, "10.0.0.1", 1, "<b>10.0.0.2</b>", 2), int(time.time()) - 60,
        1000, 2000)])
    sqlite_store.close_db(conn)
    server = DashServer(tmp_path, env={})
    try:
        browser.get(server.url)
        loaded(browser)
        assert browser.execute_script("return document.querySelectorAll('img, b, #table script').length") == 0
        assert browser.title == "picosnitch dash"
        cells = [c.text for c in browser.find_elements("css selector", "#table tbody td")]
        assert evil in cells
        assert drawn(browser, "send") == {evil: 1000}
        assert severe_console_messages(browser) == []
    finally:
        server.close()


def test_dark_theme_and_scroll_zoom_from_config(tmp_path, browser):
    paths = Paths.under(tmp_path)
    paths.ensure_dirs()
    paths.config.write_text('{"Dash theme": "dark", "Dash scroll zoom": true}\n')
    conn, _ = sqlite_store.open_db(str(paths.db))
    now = int(time.time())
    process = ProcessInfo("/usr/bin/curl", "curl", "curl x", "0" * 64)
    sqlite_store.write_connections(conn, [
        Connection(Identity(process), Endpoint(2, 6, "10.0.0.1", 1, "10.0.0.2", 443),
                   now - 600 + 10 * k, 1000 * k, 100 * k) for k in range(50)])
    sqlite_store.close_db(conn)
    server = DashServer(tmp_path)
    try:
        browser.get(server.url)
        loaded(browser)
        assert browser.execute_script("return document.documentElement.dataset.theme") == "dark"
        background = browser.execute_script("return getComputedStyle(document.body).backgroundColor")
        assert background == "rgb(22, 24, 28)"
        assert drawn(browser, "send") == {"/usr/bin/curl": sum(1000 * k for k in range(50))}
        before = browser.execute_script("const x = window.picosnitchDash.charts.send.scales.x;"
                                        "return x.max - x.min;")
        browser.execute_script("""
            const over = document.querySelector('#chart-send .u-over');
            const r = over.getBoundingClientRect();
            over.dispatchEvent(new WheelEvent('wheel', {deltaY: -100, clientX: r.left + r.width / 2,
                                                        clientY: r.top + 10, bubbles: true}));""")
        after = browser.execute_script("const x = window.picosnitchDash.charts.send.scales.x;"
                                       "return x.max - x.min;")
        assert after < before * 0.8  # the wheel zoomed in
        shot(browser, "dash-4-dark-theme.png")
        assert severe_console_messages(browser) == []
    finally:
        server.close()


# ---- the live tab: the daemon's live feed, relayed by /api/live ----

# Sends 20 kB every 50 ms (about 400 kB/s) for argv[2] seconds, then exits.
STEADY_SENDER = r"""
import socket, sys, time
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
deadline = time.monotonic() + float(sys.argv[2])
while time.monotonic() < deadline:
    s.sendall(b"x" * 20000)
    time.sleep(0.05)
"""


def live_rows(driver) -> list:
    """The cells of each row of the live table, as shown."""
    return [[td.text for td in tr.find_elements("css selector", "td")]
            for tr in driver.find_elements("css selector", "#live-table tbody tr")]


def test_live_tab_shows_a_running_program_and_says_when_picosnitch_stops(tmp_path, browser):
    if os.geteuid() != 0:
        pytest.skip("needs root: runs the daemon")
    exe = tmp_path / "bin" / "psdash-live"  # the daemon names the program after this file
    exe.parent.mkdir()
    shutil.copy("/usr/bin/python3.11", exe)
    sink = Sink()
    daemon = Daemon(tmp_path).start()
    sender = server = None
    try:
        sender = subprocess.Popen([exe, "-c", STEADY_SENDER, str(sink.port), "120"])
        wait_for(daemon.paths.db.exists, what="snitch.db")
        server = DashServer(tmp_path)
        browser.get(server.url)
        loaded(browser)
        browser.find_element("id", "tab-live").click()

        def sending():  # the live table's row for the program, once it shows a rate above 0
            row = next((r for r in live_rows(browser) if r and r[0] == str(exe)), None)
            return row if row and row[4] not in ("", "0 B") else None
        row = wait_for(sending, timeout=30, what="the program in the live table")
        assert row[1] == "psdash-live" and row[3] == "0"  # name, uid (root)
        rates = browser.execute_script(
            "return window.picosnitchDash.liveFrames.flatMap(f => f.rates)"
            ".filter(r => r.exe === arguments[0]).map(r => r.send);", str(exe))
        assert rates and max(rates) > 0
        chart = browser.execute_script("return window.picosnitchDash.liveChart.data[1];")
        assert max(chart) >= max(rates)  # the chart sums every program's rate
        assert "sent or received in the last second" in browser.find_element("id", "live-note").text
        wait_for(lambda: browser.execute_script("return window.picosnitchDash.liveFrames.length") >= 5,
                 what="five seconds of live frames")  # a chart worth looking at
        shot(browser, "dash-5-live.png")

        sender.kill()
        daemon.stop(timeout=30)
        note = wait_for(lambda: "picosnitch stopped" in browser.find_element("id", "live-note").text
                        and browser.find_element("id", "live-note").text, what="the stop noted")
        assert note == "picosnitch stopped (the live feed closed)"
        assert severe_console_messages(browser) == []
    finally:
        if sender is not None:
            sender.kill()
            sender.wait()
        if daemon.proc.poll() is None:
            daemon.stop(timeout=30)
        if server is not None:
            server.close()
        sink.close()


def test_live_tab_without_a_running_daemon_says_so(tmp_path, browser):
    paths = Paths.under(tmp_path)
    paths.ensure_dirs()
    conn, _ = sqlite_store.open_db(str(paths.db))
    sqlite_store.close_db(conn)
    server = DashServer(tmp_path)
    try:
        browser.get(server.url)
        loaded(browser)
        browser.find_element("id", "tab-live").click()
        note = wait_for(lambda: "not running" in browser.find_element("id", "live-note").text
                        and browser.find_element("id", "live-note"), what="the note")
        assert note.text == (f"picosnitch is not running (no live feed at {paths.live_socket}); "
                             "start it with `sudo picosnitch start`")
        assert note.get_attribute("class") == "error"
        assert browser.find_element("id", "status").text == "live feed unavailable"
        assert not browser.find_element("id", "live-data").is_displayed()  # no empty chart
        shot(browser, "dash-6-live-not-running.png")
        assert severe_console_messages(browser) == []
    finally:
        server.close()
