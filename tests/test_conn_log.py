"""conn.log: the original 17 comma-separated fields, one line per Connection."""

import time

import pytest

from picosnitch.connection import Connection, Endpoint, Identity, ProcessInfo
from picosnitch.store import conn_log

CURL = ProcessInfo("/usr/bin/curl", "curl", "curl https://example.com", "ab" * 32)
BASH = ProcessInfo("/usr/bin/bash", "bash", "bash", "cd" * 32)
SYSTEMD = ProcessInfo("/usr/lib/systemd/systemd", "systemd", "/sbin/init", "ef" * 32)
HTTPS = Endpoint(2, 6, "10.0.0.2", 40000, "93.184.216.34", 443, "com.example")


def connection(process=CURL, endpoint=HTTPS, ts=1_700_000_000) -> Connection:
    return Connection(Identity(process, BASH, SYSTEMD, uid=1000, netns=4026531840,
                               container="docker-0123.scope"),
                      endpoint, ts, send=100, recv=2000, packets_sent=1, packets_recv=2)


@pytest.fixture(autouse=True)
def utc(monkeypatch):
    """contime is local time; make local time UTC so the expected lines are fixed."""
    monkeypatch.setenv("TZ", "UTC0")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def test_fields_are_the_original_seventeen_in_order():
    assert conn_log.FIELDS == (
        "contime", "send", "recv", "exe", "name", "cmdline", "sha256", "pexe", "pname",
        "pcmdline", "psha256", "uid", "lport", "rport", "laddr", "raddr", "domain")


def test_a_line_holds_those_fields_comma_separated():
    assert conn_log.format_line(connection()) == ",".join([
        "2023-11-14 22:13:20", "100", "2000",
        "/usr/bin/curl", "curl", "curl https://example.com", "ab" * 32,
        "/usr/bin/bash", "bash", "bash", "cd" * 32,
        "1000", "40000", "443", "10.0.0.2", "93.184.216.34", "com.example"])


def test_commas_newlines_and_nul_are_removed_from_values():
    process = ProcessInfo("/tmp/a,b", "x\ny", "sh -c 'a\r\nb,c'\x00--flag", "")
    assert conn_log.format_line(connection(process)).split(",")[3:7] == \
        ["/tmp/ab", "xy", "sh -c 'abc'--flag", ""]


def test_other_control_characters_and_invalid_utf8_are_made_printable():
    name = "\x1b[31mred\x1b[0m\t" + b"\xff".decode("utf-8", "surrogateescape")
    fields = conn_log.format_line(connection(ProcessInfo(name=name))).split(",")
    assert fields[4] == "\\x1b[31mred\\x1b[0m\\x09\\xff"


def test_every_line_splits_into_seventeen_fields_whatever_the_values():
    hostile = "a,\n\x00\x1b\r\udcff" * 3
    c = connection(ProcessInfo(hostile, hostile, hostile, hostile),
                   Endpoint(2, 17, hostile, 1, hostile, 2, hostile))
    line = conn_log.format_line(c)
    assert "\n" not in line and "\x00" not in line
    assert len(line.split(",")) == 17


def test_a_64_kib_command_line_is_kept_whole():
    cmdline = "x" * 65536
    assert conn_log.format_line(connection(ProcessInfo(cmdline=cmdline))).split(",")[5] == cmdline


def test_write_appends_one_line_per_connection_and_flushes(tmp_path):
    path = tmp_path / "conn.log"
    log = conn_log.ConnLog(str(path))
    log.write([connection(), connection(BASH)])
    assert path.read_text().splitlines() == [conn_log.format_line(connection()),
                                             conn_log.format_line(connection(BASH))]
    log.close()


def test_reopening_appends_rather_than_truncates(tmp_path):
    path = tmp_path / "conn.log"
    for ts in (1_700_000_000, 1_700_000_010):
        with conn_log.ConnLog(str(path)) as log:
            log.write([connection(ts=ts)])
    assert [line[:19] for line in path.read_text().splitlines()] == \
        ["2023-11-14 22:13:20", "2023-11-14 22:13:30"]


def test_an_empty_batch_writes_nothing(tmp_path):
    path = tmp_path / "conn.log"
    with conn_log.ConnLog(str(path)) as log:
        log.write([])
    assert path.read_bytes() == b""
