"""`picosnitch dash` is safe by default: loopback bind, Host-header check, token for anything
else, GET only, strict headers, values never turned into markup, nothing fetched at run time."""

import re
import subprocess
import sys

import pytest
from dash_harness import REPO, DashServer, free_port

from picosnitch import config
from picosnitch.connection import Connection, Endpoint, Identity, ProcessInfo
from picosnitch.paths import Paths
from picosnitch.store import sqlite as sqlite_store
from picosnitch.ui.dash import app as dash_app

TOKEN = "0123456789abcdef-token"
STATIC = REPO / "picosnitch" / "ui" / "dash" / "static"


@pytest.fixture(scope="module")
def prefix(tmp_path_factory):
    prefix = tmp_path_factory.mktemp("dashsec")
    paths = Paths.under(prefix)
    paths.ensure_dirs()
    conn, _ = sqlite_store.open_db(str(paths.db))
    process = ProcessInfo("/usr/bin/x", "x", "x", "0" * 64)
    sqlite_store.write_connections(conn, [Connection(Identity(process), Endpoint(2, 6), 1000, 5, 7)])
    sqlite_store.close_db(conn)
    return prefix


@pytest.fixture(scope="module")
def server(prefix):
    s = DashServer(prefix)
    yield s
    s.close()


@pytest.mark.parametrize("host_header", [
    "evil.example:{port}",        # DNS rebinding: the attacker's name pointing at 127.0.0.1
    "127.0.0.1.evil.example:{port}",
    "127.0.0.1:{other}",          # another port
    "127.0.0.1",                  # no port
    "",
])
def test_requests_naming_another_host_are_refused(server, host_header):
    header = host_header.format(port=server.port, other=server.port + 1)
    for path in ("/", "/api/meta", "/static/dash.js"):
        status, headers, body = server.request(path, host_header=header or " ")
        assert status == 421, (header, path)
        assert b"Host header" in body and "frame-ancestors 'none'" in headers[
            "content-security-policy"]


@pytest.mark.parametrize("name", ["127.0.0.1", "localhost", "LOCALHOST"])
def test_loopback_names_with_the_bound_port_are_served(server, name):
    status, _, _ = server.request("/api/meta", host_header=f"{name}:{server.port}")
    assert status == 200


def test_only_get_and_head(server):
    for method in ("POST", "PUT", "DELETE", "OPTIONS", "PATCH"):
        status, headers, _ = server.request("/api/meta", method=method)
        assert status == 405 and headers["allow"] == "GET, HEAD"
    assert server.request("/api/meta", method="HEAD")[0] == 200


def test_strict_headers_on_every_response(server):
    for path in ("/", "/api/series", "/static/dash.css", "/nothing-here"):
        _, headers, _ = server.request(path)
        assert headers["content-security-policy"].startswith("default-src 'none'; script-src 'self'")
        assert headers["x-content-type-options"] == "nosniff"
        assert headers["x-frame-options"] == "DENY"
        assert headers["referrer-policy"] == "no-referrer"
        assert "server" not in headers


def test_bind_check():
    for host in ("localhost", "127.0.0.1", "127.0.0.5", "::1"):
        assert dash_app.is_loopback_bind(host)
        dash_app.check_bind(host, None)
    for host in ("0.0.0.0", "::", "192.0.2.1", "no-such-host.invalid"):
        assert not dash_app.is_loopback_bind(host)
        with pytest.raises(dash_app.DashError, match="PICOSNITCH_DASH_TOKEN"):
            dash_app.check_bind(host, None)
        dash_app.check_bind(host, TOKEN)  # allowed with a token (not bound here: loopback only)
    with pytest.raises(dash_app.DashError, match="too short"):
        dash_app.check_bind("0.0.0.0", "short")


@pytest.mark.parametrize("host", ["0.0.0.0", "::"])
def test_command_refuses_a_wide_bind_without_a_token_and_binds_nothing(prefix, host):
    port = free_port()
    env = {"PICOSNITCH_PREFIX": str(prefix), "HOST": host, "PORT": str(port),
           "PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-m", "picosnitch", "dash"], env=env,
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 1
    assert f"HOST={host} is reachable from beyond this machine" in done.stderr
    assert "http://" not in done.stdout
    listening = subprocess.run(["ss", "-Htln", f"sport = :{port}"], capture_output=True,
                               text=True).stdout
    assert listening.strip() == ""


def test_allowed_hosts():
    assert dash_app.allowed_hosts("localhost", 5100) == {
        "localhost:5100", "127.0.0.1:5100", "[::1]:5100"}
    assert dash_app.allowed_hosts("dash.lan", 5100) == {"dash.lan:5100"}


def test_token_is_required_when_configured(prefix):
    server = DashServer(prefix, token=TOKEN)
    try:
        assert server.banner.strip().endswith("(token required)")
        for path in ("/", "/api/meta", "/static/dash.js"):
            assert server.request(path)[0] == 401
        assert server.request("/api/meta", headers={"Authorization": "Bearer wrong"})[0] == 401
        assert server.request("/api/meta", headers={"Authorization": f"Bearer {TOKEN}"})[0] == 200
        assert server.request("/?token=wrong")[0] == 401
        status, headers, _ = server.request(f"/?token={TOKEN}")
        assert status == 303 and headers["location"] == "/"
        cookie = headers["set-cookie"]
        assert "httponly" in cookie.lower() and "samesite=strict" in cookie.lower()
        value = cookie.split(";")[0]
        assert server.request("/api/meta", headers={"Cookie": value})[0] == 200
        assert server.request("/api/meta", headers={"Cookie": value + "x"})[0] == 401
        # The token does not excuse a foreign Host header.
        status, _, _ = server.request("/api/meta", host_header=f"evil.example:{server.port}",
                                      headers={"Authorization": f"Bearer {TOKEN}"})
        assert status == 421
    finally:
        server.close()


def test_too_short_token_refused(prefix):
    done = subprocess.run([sys.executable, "-m", "picosnitch", "dash"], capture_output=True,
                          text=True, timeout=30,
                          env={"PICOSNITCH_PREFIX": str(prefix), "HOST": "127.0.0.1",
                               "PORT": str(free_port()), "PICOSNITCH_DASH_TOKEN": "abc",
                               "PYTHONPATH": str(REPO)})
    assert done.returncode == 1 and "too short" in done.stderr


def test_page_code_inserts_text_only_and_fetches_nothing_from_elsewhere():
    js = (STATIC / "dash.js").read_text()
    html = (STATIC / "index.html").read_text()
    for forbidden in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(",
                      "new Function", "setAttribute(\"on", "javascript:"):
        assert forbidden not in js, forbidden
    vendor = (STATIC / "vendor" / "uPlot.iife.min.js").read_text()
    assert "innerHTML" not in vendor and "eval(" not in vendor
    assert not re.search(r"(src|href)=\"(https?:)?//", html)  # every asset is served locally
    assert "<script>" not in html and "style=" not in html  # CSP allows no inline code or style
    assert "fetch(`/api/" in js and "http" not in js.replace("HTTP ", "")
    for name in ("uPlot.iife.min.js", "uPlot.min.css", "uPlot.LICENSE", "VERSION"):
        assert (STATIC / "vendor" / name).is_file()
    assert (STATIC / "vendor" / "VERSION").read_text().startswith("uplot@1.6.32 ")


def test_database_is_opened_read_only(prefix, server):
    db = Paths.under(prefix).db
    before = db.stat().st_mtime_ns, sorted(p.name for p in db.parent.iterdir())
    server.api("series", {"range": "all"})
    server.api("executable", {"key": b"/usr/bin/x".hex(), "range": "all"})
    assert (db.stat().st_mtime_ns, sorted(p.name for p in db.parent.iterdir())) == before


# ---- the token in config.json ("Dash token") ----

def prefix_with_config(tmp_path, text: str, mode: int) -> Paths:
    """A prefix holding a copy of snitch.db and a config.json of `text` with file mode `mode`."""
    paths = Paths.under(tmp_path)
    paths.ensure_dirs()
    conn, _ = sqlite_store.open_db(str(paths.db))
    sqlite_store.close_db(conn)
    paths.config.write_text(text)
    paths.config.chmod(mode)
    return paths


def test_the_config_token_is_checked_without_being_repeated(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{\n  "Dash token": "short-secret"\n}')
    with pytest.raises(config.ConfigError) as caught:
        config.load(path)
    assert str(caught.value).endswith(
        'line 2: "Dash token" must be "" (none) or at least 16 characters, not 12')
    assert "short-secret" not in str(caught.value)
    path.write_text('{"Dash token": 1234567890123456789}')
    with pytest.raises(config.ConfigError, match=r'"Dash token" must be a string \(in double quotes\)$'):
        config.load(path)
    path.write_text(f'{{"Dash token": "{TOKEN}"}}')
    assert config.load(path)["Dash token"] == TOKEN
    assert config.defaults()["Dash token"] == ""


def test_a_wide_bind_takes_the_token_from_config_and_the_variable_overrides_it(tmp_path):
    paths = prefix_with_config(tmp_path, f'{{"Dash token": "{TOKEN}"}}', 0o640)
    cfg = config.load(paths.config)
    assert dash_app.settings({"HOST": "0.0.0.0"}, cfg) == ("0.0.0.0", 5100, TOKEN)
    dash_app.check_bind("0.0.0.0", TOKEN)  # allowed (only checked here, never bound)
    other = "fedcba9876543210-other"
    assert dash_app.settings({"HOST": "0.0.0.0", "PICOSNITCH_DASH_TOKEN": other}, cfg)[2] == other
    with pytest.raises(dash_app.DashError, match='set "Dash token" in config.json '
                                                 r'\(or PICOSNITCH_DASH_TOKEN\)'):
        dash_app.check_bind("0.0.0.0", dash_app.settings({"HOST": "0.0.0.0"})[2])


def test_every_request_needs_the_config_token_and_a_private_file_gets_no_warning(tmp_path):
    prefix_with_config(tmp_path, f'{{"Dash token": "{TOKEN}"}}', 0o640)
    server = DashServer(tmp_path)
    try:
        assert server.banner.strip().endswith("(token required)")
        assert server.request("/api/meta")[0] == 401
        assert server.request("/api/meta", headers={"Authorization": f"Bearer {TOKEN}"})[0] == 200
    finally:
        assert "warning" not in server.close()


def test_the_variable_overrides_the_config_token(tmp_path):
    prefix_with_config(tmp_path, f'{{"Dash token": "{TOKEN}"}}', 0o600)
    other = "fedcba9876543210-other"
    server = DashServer(tmp_path, token=other)
    try:
        assert server.request("/api/meta", headers={"Authorization": f"Bearer {other}"})[0] == 200
        assert server.request("/api/meta", headers={"Authorization": f"Bearer {TOKEN}"})[0] == 401
    finally:
        server.close()


def test_a_token_in_a_world_readable_config_is_served_with_one_warning(tmp_path):
    paths = prefix_with_config(tmp_path, f'{{"Dash token": "{TOKEN}"}}', 0o644)  # the default mode
    server = DashServer(tmp_path)
    try:
        assert server.request("/api/meta", headers={"Authorization": f"Bearer {TOKEN}"})[0] == 200
    finally:
        errors = server.close()
    assert errors.splitlines() == [
        f'picosnitch dash: warning: {paths.config} holds the "Dash token" and every user can read '
        "it: `chmod o-r` it (the dashboard's user reads it through its group), or set "
        "PICOSNITCH_DASH_TOKEN instead"]


def test_an_unusable_config_stops_the_dashboard_as_it_may_hold_the_token(tmp_path):
    paths = prefix_with_config(tmp_path, '{"Dash token": "too-short"}', 0o600)
    port = free_port()
    done = subprocess.run([sys.executable, "-m", "picosnitch", "dash"], capture_output=True,
                          text=True, timeout=30,
                          env={"PICOSNITCH_PREFIX": str(tmp_path), "HOST": "127.0.0.1",
                               "PORT": str(port), "PYTHONPATH": str(REPO)})
    assert done.returncode == 1 and "http://" not in done.stdout
    assert done.stderr == (f'picosnitch dash: {paths.config} line 1: "Dash token" must be "" '
                           "(none) or at least 16 characters, not 9\n")
