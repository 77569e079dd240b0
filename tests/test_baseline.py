"""The baseline: what a program learns while learning, and the one alert each new thing gets after.

Connections are built by hand here; tests/test_daemon_alerts.py has the real daemon and real
traffic. The served ports are the kernel's (sock_diag) in the last tests."""

import json
import multiprocessing
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from picosnitch import channels, config
from picosnitch.alerts import baseline_worker
from picosnitch.alerts.baseline import (
    ALL,
    ANY,
    OPEN_AFTER,
    Baseline,
    Coalescer,
    Settings,
)
from picosnitch.alerts.listeners import ServedPorts, ephemeral_range
from picosnitch.alerts.public_suffix import PublicSuffixList
from picosnitch.connection import Connection, Endpoint, Identity, ProcessInfo
from picosnitch.messages import NEW_COUNTRY, NEW_DOMAIN, NEW_LISTENER, NEW_PORT, TRAFFIC_SPIKE, Stop
from picosnitch.paths import Paths

TCP, UDP = socket.IPPROTO_TCP, socket.IPPROTO_UDP
REPO = Path(__file__).resolve().parent.parent
CURL = ProcessInfo("/usr/bin/curl", "curl", "curl x", "c" * 64)
DAY = 86400
PSL = PublicSuffixList("com\nuk\nco.uk\n*.ck\n!www.ck\n")
COUNTRIES = {"192.0.2.1": "DE", "192.0.2.2": "FR", "198.51.100.1": "DE"}
SERVED = {(TCP, 8080), (UDP, 5353)}


def conn(domain="", raddr="192.0.2.1", rport=443, lport=40000, protocol=TCP, send=100, recv=100, ts=0,
         process=CURL, netns=1):
    return Connection(Identity(process, netns=netns),
                      Endpoint(socket.AF_INET, protocol, "10.0.0.1", lport, raddr, rport, domain), ts, send, recv)


def baseline(**settings) -> Baseline:
    chosen = {"learning": DAY, "spike_factor": 10, "spike_period": DAY, "spike_minimum": 1000, **settings}
    return Baseline(Settings(**chosen), PSL.registrable, lambda a: COUNTRIES.get(a, ""),
                    lambda netns, protocol, port: (protocol, port) in SERVED)


def kinds(findings):
    return sorted((f.kind, f.value) for f in findings)


def test_nothing_is_new_while_a_program_learns_and_everything_it_did_is_known_after():
    b = baseline()
    assert b.observe(conn("com.example.www"), now=0) == []
    assert b.observe(conn("com.example.cdn", raddr="198.51.100.1"), now=DAY - 1) == []
    assert b.observe(conn("com.example.api"), now=DAY) == []  # learned now: the same domain and port
    program = b.programs[("/usr/bin/curl", "")]
    assert program.learned == DAY and program.values["domains"] == {"example.com"}
    assert program.values["countries"] == {"DE"} and program.values["ports"] == {"443/tcp"}


def test_after_learning_each_new_destination_is_found_once():
    b = baseline()
    b.observe(conn("com.example.www"), now=0)
    found = b.observe(conn("uk.co.example.www", raddr="192.0.2.2", rport=8443), now=DAY + 1)
    assert kinds(found) == [(NEW_COUNTRY, "FR"), (NEW_DOMAIN, "example.co.uk"), (NEW_PORT, "8443/tcp")]
    assert found[0].exe == "/usr/bin/curl" and found[0].name == "curl" and found[0].sha256 == "c" * 64
    assert b.observe(conn("uk.co.example.mail", raddr="192.0.2.2", rport=8443), now=DAY + 2) == []


def test_a_port_is_its_protocol_and_number_and_ports_of_other_protocols_are_not_destinations():
    b = baseline()
    b.observe(conn(rport=53, protocol=UDP), now=0)
    found = b.observe(conn(rport=53, protocol=TCP), now=DAY)
    assert kinds(found) == [(NEW_PORT, "53/tcp")]
    assert b.observe(conn(rport=0, protocol=1), now=DAY) == []  # ICMP
    assert b.observe(Connection(Identity(CURL), Endpoint(socket.AF_PACKET, 0x0800), 0, 5, 5), now=DAY) == []


def test_serving_on_a_port_is_a_listener_and_its_clients_ports_are_not_destinations():
    b = baseline()
    b.observe(conn(lport=40000), now=0)
    found = b.observe(conn(lport=8080, rport=51515, raddr="192.0.2.2"), now=DAY)
    assert kinds(found) == [(NEW_LISTENER, "8080/tcp")]
    assert b.observe(conn(lport=8080, rport=51516, raddr="192.0.2.2"), now=DAY) == []
    assert kinds(b.observe(conn(lport=5353, rport=5353, protocol=UDP), now=DAY)) == [(NEW_LISTENER, "5353/udp")]


def test_the_volume_of_a_period_above_factor_times_the_learned_most_is_one_spike():
    b = baseline()
    b.observe(conn(send=5000, recv=20000, ts=0), now=0)
    b.observe(conn(send=8000, recv=1000, ts=DAY), now=DAY - 1)  # the most sent in a learning period
    assert b.observe(conn(send=70000, ts=2 * DAY), now=DAY + 10) == []  # 10 x 8000 not passed yet
    spike, = b.observe(conn(send=20000, ts=2 * DAY), now=DAY + 20)
    assert spike.kind == TRAFFIC_SPIKE and spike.value == "sent 90.0 kB in 24 h, usually at most 8.0 kB"
    assert b.observe(conn(send=10**6, ts=2 * DAY), now=DAY + 30) == []  # once a period
    assert b.observe(conn(send=80000, ts=3 * DAY), now=DAY + 40) == []  # the spike is the new usual


def test_received_bytes_spike_on_their_own_and_small_programs_only_above_the_minimum():
    b = baseline()
    b.observe(conn(send=10, recv=10), now=0)
    assert b.observe(conn(send=0, recv=9000, ts=DAY), now=DAY) == []  # under 10 x the 1000 B minimum
    spike, = b.observe(conn(send=0, recv=2000, ts=DAY), now=DAY)
    assert spike.value.startswith("received 11.0 kB in 24 h")


def test_a_program_that_used_many_values_while_learning_may_use_any():
    b = baseline()
    for port in range(1, OPEN_AFTER + 2):
        b.observe(conn(rport=port), now=0)
    assert b.programs[("/usr/bin/curl", "")].values["ports"] is None
    assert kinds(b.observe(conn(rport=60000, domain="com.example"), now=DAY)) == [(NEW_DOMAIN, "example.com")]


def test_a_kind_switched_off_is_learned_but_not_found():
    b = baseline(kinds=frozenset({NEW_DOMAIN}))
    b.observe(conn("com.example"), now=0)
    assert kinds(b.observe(conn("com.example.other", rport=22), now=DAY)) == []  # same registrable domain
    assert kinds(b.observe(conn("com.other", rport=23), now=DAY)) == [(NEW_DOMAIN, "other.com")]
    assert "23/tcp" in b.programs[("/usr/bin/curl", "")].values["ports"]


def test_a_muted_program_learns_and_is_silent_until_unmuted():
    b = baseline()
    b.observe(conn(), now=0)
    assert b.apply({"action": "mute", "program": "/usr/bin/curl"}, now=1) == ""
    assert b.observe(conn(rport=22), now=DAY) == []
    b.apply({"action": "unmute", "program": "/usr/bin/curl"}, now=DAY)
    assert b.observe(conn(rport=22), now=DAY) == []  # learned while muted
    assert kinds(b.observe(conn(rport=23), now=DAY)) == [(NEW_PORT, "23/tcp")]


def test_marked_learned_it_alerts_at_once_and_forgotten_it_learns_again():
    b = baseline(learning=None)
    b.observe(conn(), now=0)
    assert b.observe(conn(rport=22), now=10 * DAY) == []  # learning until marked
    assert b.apply({"action": "learned", "program": ALL}, now=10 * DAY) == ""
    assert kinds(b.observe(conn(rport=23), now=10 * DAY)) == [(NEW_PORT, "23/tcp")]
    assert b.apply({"action": "forget", "program": "/usr/bin/curl"}, now=11 * DAY) == ""
    assert b.observe(conn(rport=24), now=11 * DAY) == []
    assert b.apply({"action": "learned", "program": "/nowhere"}, now=0) == (
        "picosnitch baseline learned: no program /nowhere has been seen")


def test_a_script_is_its_own_program_beside_its_interpreter_and_its_alerts_carry_the_scripts_hash():
    b = baseline()
    python = ProcessInfo("/usr/bin/python3", "python3", "", "p" * 64)
    script = ProcessInfo("/usr/bin/python3", "python3", "", "p" * 64, script="/opt/tool.py", script_sha256="s" * 64)
    b.observe(conn(process=python), now=0)
    b.observe(conn(process=script), now=0)
    assert set(b.programs) == {("/usr/bin/python3", ""), ("/usr/bin/python3", "/opt/tool.py")}
    assert b.programs[("/usr/bin/python3", "/opt/tool.py")].hashes == ["s" * 64]
    [finding] = b.observe(conn(process=script, rport=8443), now=2 * DAY)
    assert (finding.kind, finding.exe, finding.script, finding.sha256) == (
        "new port", "/usr/bin/python3", "/opt/tool.py", "s" * 64)
    assert b.observe(conn(process=python, rport=443), now=2 * DAY) == []


def test_unknown_executables_have_no_baseline():
    b = baseline()
    assert b.observe(conn(process=ProcessInfo("!unknown", "x", "", "!unknown")), now=0) == []
    assert b.programs == {}


def test_the_baseline_is_saved_and_read_back_whole():
    b = baseline()
    b.observe(conn("com.example", send=500), now=0)
    for port in range(OPEN_AFTER + 2):
        b.observe(conn(rport=port + 1), now=0)
    b.apply({"action": "mute", "program": "/opt/x"}, now=0)
    b.requests_read = 77
    again = baseline()
    again.load(b.to_json())
    assert again.to_json() == b.to_json()
    assert json.loads(b.to_json())["programs"][0]["ports"] == ANY
    with pytest.raises(ValueError):
        again.load(b'{"format": 99}')


def picosnitch(prefix, *args):
    return subprocess.run([sys.executable, "-m", "picosnitch", *args], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, PICOSNITCH_PREFIX=str(prefix), PYTHONPATH=str(REPO)))


def test_the_baseline_command_lists_each_program_and_appends_the_users_word_for_the_daemon(tmp_path):
    paths = Paths.under(tmp_path)
    paths.ensure_dirs()
    assert picosnitch(tmp_path, "baseline").stdout == "picosnitch baseline: nothing learned yet\n"
    b = baseline()
    b.observe(conn("com.example", process=CURL), now=0)
    b.observe(conn(process=ProcessInfo("/usr/bin/python3", "python3", script="/opt/\x1btool.py")), now=0)
    b.apply({"action": "learned", "program": CURL.exe}, now=DAY)
    b.apply({"action": "mute", "program": "/opt/later"}, now=DAY)
    paths.baseline.write_bytes(b.to_json())
    header, curl, python, muted = picosnitch(tmp_path, "baseline").stdout.splitlines()
    assert header.split() == ["state", "since", "domains", "countries", "ports", "listeners", "program"]
    assert python.split()[0] == "learning" and python.endswith("/usr/bin/python3 /opt/\\x1btool.py")
    assert curl.split()[0] == "learned" and curl.split()[3:] == ["1", "1", "1", "0", CURL.exe]
    assert muted == "muted paths: /opt/later"
    said = picosnitch(tmp_path, "baseline", "learned", "all")
    assert said.returncode == 0 and said.stdout.startswith("every program seen has learned")
    assert picosnitch(tmp_path, "baseline", "mute", "/usr/bin/curl").returncode == 0
    assert [json.loads(line) for line in paths.baseline_requests.read_text().splitlines()] == [
        {"action": "learned", "program": "all"}, {"action": "mute", "program": "/usr/bin/curl"}]
    assert picosnitch(tmp_path, "baseline", "ignore", "/usr/bin/curl").returncode != 0


def test_the_first_finding_goes_out_at_once_and_the_rest_of_the_burst_together():
    b = baseline()
    b.observe(conn(), now=0)
    coalescer = Coalescer(window=60)
    first = coalescer.add(b.observe(conn(rport=1), now=DAY) + b.observe(conn(rport=2), now=DAY), now=DAY)
    assert [(a.kind, a.values, a.count) for a in first] == [(NEW_PORT, ("1/tcp", "2/tcp"), 2)]
    assert coalescer.add(b.observe(conn(rport=3), now=DAY + 1), now=DAY + 1) == []
    assert coalescer.add(b.observe(conn(rport=4), now=DAY + 2), now=DAY + 2) == []
    assert coalescer.due(DAY + 59) == []
    burst, = coalescer.due(DAY + 60)
    assert (burst.values, burst.count, burst.exe) == (("3/tcp", "4/tcp"), 2, "/usr/bin/curl")
    assert coalescer.due(DAY + 120) == [] and coalescer.held == {}  # quiet: the window closes
    assert [a.values for a in coalescer.add(b.observe(conn(rport=5), now=DAY + 121), DAY + 121)] == [("5/tcp",)]


# ---- the kernel's view of served ports ----

def needs_root():
    if os.geteuid() != 0:
        pytest.skip("needs root: reads sockets of every process and enters a namespace")


def test_tcp_listeners_and_fixed_udp_ports_are_served_and_client_sockets_are_not():
    served = ServedPorts()
    listener = socket.create_server(("127.0.0.1", 0))
    low, high = ephemeral_range()
    fixed = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    fixed.bind(("127.0.0.1", low - 1 if low > 1025 else high + 1))
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.bind(("127.0.0.1", 0))
    outbound = socket.create_connection(listener.getsockname())
    try:
        served.new_batch()
        assert served.serves(served.own, TCP, listener.getsockname()[1])
        assert served.serves(served.own, UDP, fixed.getsockname()[1])
        assert not served.serves(served.own, UDP, client.getsockname()[1])
        assert not served.serves(served.own, TCP, outbound.getsockname()[1])
    finally:
        for sock in (listener, fixed, client, outbound):
            sock.close()
        served.close()


def test_a_listener_in_a_namespace_only_a_thread_has_entered_is_found(lab):
    needs_root()
    from netlab import PEER4, listen
    ready, done = threading.Event(), threading.Event()
    found = {}

    def serve():
        sock = listen(PEER4)
        found["port"] = sock.getsockname()[1]
        found["netns"] = os.stat(f"/proc/self/task/{threading.get_native_id()}/ns/net").st_ino
        ready.set()
        done.wait(20)
        sock.close()

    lab.in_peer(serve)
    assert ready.wait(10)
    served = ServedPorts()
    try:
        served.new_batch()
        assert found["netns"] != served.own
        assert served.serves(found["netns"], TCP, found["port"])
        assert not served.serves(served.own, TCP, found["port"])
        assert os.stat("/proc/self/ns/net").st_ino == served.own  # back home
    finally:
        done.set()
        served.close()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_the_worker_sleeps_while_nothing_is_left_to_save(tmp_path, monkeypatch):
    """Once the byte counts are saved, a quiet spell must cost nothing: a save deadline that had
    passed with nothing to save made every wait return at once, and the worker spun."""
    monkeypatch.setattr(baseline_worker, "SAVE_TRAFFIC_EVERY", 0.2)
    paths = Paths.under(tmp_path)
    paths.ensure_dirs()
    inbox, to_worker = channels.pair(sender_waits=True)
    from_worker, to_keeper = channels.pair()
    worker = multiprocessing.get_context("fork").Process(
        target=baseline_worker.run, args=(config.defaults(), paths, inbox, to_keeper))
    worker.start()
    try:
        to_worker.send([conn()])
        time.sleep(1)  # the counts are saved after 0.2 s; nothing happens after that
        before = cpu_seconds(worker.pid)
        time.sleep(2)
        idle = cpu_seconds(worker.pid) - before
    finally:
        to_worker.send(Stop("identity"))
        worker.join(20)
    assert worker.exitcode == 0
    assert idle < 0.2, f"{idle:.2f} s of CPU in 2 quiet seconds"
