"""Alerts from the real daemon, on real traffic into a namespace the test creates.

One run of `picosnitch start-no-daemon` (tests/daemon_harness.py) with a learning period of
LEARNING seconds, a GeoIP database the test writes (the lab's IPv4 network is Germany, its IPv6
one France) and real receivers on loopback. Three copies of the C traffic generator
(tests/c/netops.c: `named` names its server in an HTTP Host header, `serve` listens), each a
program of its own:

- `steady` learns: example.com (by the Host of its HTTP requests), port A, Germany, about 50 kB.
  After learning it does the same again (nothing is new), then each trigger twice: example.org,
  port B, France (IPv6), a listening port a peer in the namespace connects to, and 3 MB in an
  hour. Each kind must be alerted on once, with the new value, and nothing else.
- `talker.py`, a Python script, learns port A, then uses port B: one alert, about the script (its
  path and sha256; the interpreter is a program of its own).
- `muted` learns port A, is muted with `picosnitch baseline mute`, then uses port B: no alert.
- `burst` learns port A, then uses BURST new ports in two halves 1.5 s apart (so they are seen in
  two batches at least): the first alert goes out at once with what its batch found, the rest of
  the burst as one more when "Alert coalesce (seconds)" have passed.

ntfy is down from the end of learning until the end: after it comes back it gets every alert
the daemon raised (other programs on the machine learn and raise alerts too, so the count is
alert.log's), while the generic webhook had them all along. Other processes make traffic too:
alerts are picked by the copies' paths.
"""

import hashlib
import json
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.request

import mmdb_writer
import pytest
from daemon_harness import Daemon, wait_for
from mmdb_writer import country
from netlab import HOST4, PEER4, PEER6, listen
from prometheus_client import parser as prometheus_parser
from receivers import NtfyServer, WebhookServer, shared_tempdir

LEARNING = 12.0  # seconds
COALESCE = 5.0
BURST = 12
KINDS = ("new domain", "new country", "new port", "new listener", "traffic spike")


class Acceptor:
    """Accepts connections on one port of an address in the lab namespace and reads them to EOF."""

    def __init__(self, lab, host, port=0):
        self.ready = threading.Event()
        self.host, self.port = host, port
        lab.in_peer(self._serve)
        assert self.ready.wait(10)

    def _serve(self):
        sock = listen(self.host) if not self.port else _bound(self.host, self.port)
        self.port = sock.getsockname()[1]
        self.ready.set()
        while True:
            conn, _ = sock.accept()
            threading.Thread(target=_drain, args=(conn,), daemon=True).start()


def _bound(host, port):
    import socket
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((host, port))
    sock.listen()
    return sock


def _drain(conn):
    with conn:
        while conn.recv(65536):
            pass


def connect_from_peer(lab, host, port, count):
    """`count` connections from the namespace to host:port, each sending a few bytes."""
    import socket

    def run():
        for _ in range(count):
            with socket.create_connection((host, port), timeout=10) as sock:
                sock.sendall(b"hello")
    lab.in_peer(run).join(20)


def copy_of(netops, directory, name):
    path = directory / name
    shutil.copy2(netops, path)
    return str(path)


def run(program, *args):
    subprocess.run([program, *map(str, args)], check=True, timeout=60, capture_output=True)


TALKER = """import socket, sys
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10) as sock:
    sock.sendall(b"x" * 1000)
"""


def alerts_of(daemon, program, column=3):
    """alert.log's lines for one program (column 4: a script): (kind, [values])."""
    if not daemon.paths.alert_log.exists():
        return []
    found = []
    for line in daemon.paths.alert_log.read_text().splitlines():
        fields = line.split(", ")
        if fields[column] == program:
            found.append((fields[1], fields[6].split(" ") if fields[1] != "traffic spike" else [fields[6]]))
    return found


@pytest.fixture(scope="module")
def alerting(lab, netops):
    """Runs the whole story once; the tests read what it left."""
    prefix = shared_tempdir("picosnitch-alerts-")
    mmdb = mmdb_writer.write(prefix / "countries.mmdb", {"10.232.0.0/14": country("DE", "Germany"),
                                                        "fd00:5e::/32": country("FR", "France")})
    port_a = Acceptor(lab, PEER4)
    Acceptor(lab, PEER6, port_a.port)
    port_b = Acceptor(lab, PEER4)
    burst_ports = [Acceptor(lab, PEER4).port for _ in range(BURST)]
    a, b = port_a.port, port_b.port
    programs = shared_tempdir("picosnitch-alert-programs-")
    steady, muted, burst = (copy_of(netops, programs, name) for name in ("steady", "muted", "burst"))
    talker = programs / "talker.py"
    talker.write_text(TALKER)
    ntfy, hook = NtfyServer(), WebhookServer()
    metrics_port = _free_port()
    daemon = Daemon(prefix, **{
        "Alert learning (days)": LEARNING / 86400, "Alert coalesce (seconds)": COALESCE,
        "Alert spike period (hours)": 1, "Alert spike minimum (MB)": 0.01, "GeoIP database": str(mmdb),
        "Desktop notifications": False, "ntfy URL": f"http://127.0.0.1:{ntfy.port}/alerts",
        "Webhook URL": f"http://127.0.0.1:{hook.port}/", "Webhook events": ["alert"],
        "Webhook backoff (seconds)": 1, "Metrics address": f"127.0.0.1:{metrics_port}"})
    daemon.start()
    try:
        run(steady, "named", PEER4, a, 50000, "www.example.com")
        run(steady, "named", PEER4, a, 1000, "cdn.example.com")
        run(muted, "quick", PEER4, a, 1000)
        run(burst, "quick", PEER4, a, 1000)
        run(sys.executable, talker, PEER4, a)

        def first_seen():
            if not daemon.paths.baseline.exists():
                return None
            programs = {p["script"] or p["exe"]: p for p in json.loads(daemon.paths.baseline.read_text())["programs"]}
            if all(p in programs for p in (steady, muted, burst, str(talker))):
                return max(programs[p]["first seen"] for p in (steady, muted, burst, str(talker)))
            return None
        learned_at = wait_for(first_seen, 30, "the four programs in baseline.json") + LEARNING
        assert daemon.cli("baseline", "mute", muted).returncode == 0
        ntfy.down()
        time.sleep(max(learned_at - time.time() + 1, 0))

        for _ in range(2):  # what was learned: no alert
            run(steady, "named", PEER4, a, 1000, "www.example.com")
            run(steady, "named", PEER4, a, 1000, "static.cdn.example.com")
            run(burst, "quick", PEER4, a, 1000)
            run(sys.executable, talker, PEER4, a)
        time.sleep(2)
        quiet = {p: alerts_of(daemon, p) for p in (steady, muted, burst)}
        quiet[str(talker)] = alerts_of(daemon, str(talker), column=4)

        for _ in range(2):  # each trigger twice: one alert each
            run(steady, "named", PEER4, a, 1000, "www.example.org")
            run(steady, "quick", PEER4, b, 1000)
            run(steady, "quick", PEER6, a, 1000)
            run(sys.executable, talker, PEER4, b)
        server = subprocess.Popen([steady, "serve", "0", "3"], stdout=subprocess.PIPE, text=True)
        listening = int(server.stdout.readline().split()[1])
        connect_from_peer(lab, HOST4, listening, 2)
        run(steady, "named", PEER4, a, 3_000_000, "www.example.com")
        run(steady, "named", PEER4, a, 1_000_000, "www.example.com")
        run(muted, "quick", PEER4, b, 1000)
        for half in (burst_ports[:BURST // 2], burst_ports[BURST // 2:]):
            for port in half:
                run(burst, "quick", PEER4, port, 100)
            time.sleep(1.5)
        time.sleep(3)  # the listener stays open while its traffic is handled
        connect_from_peer(lab, HOST4, listening, 1)
        server.wait(10)

        wait_for(lambda: len(alerts_of(daemon, steady)) >= len(KINDS) and len(alerts_of(daemon, burst)) >= 2
                 and alerts_of(daemon, str(talker), column=4), 30, "the alerts")
        time.sleep(COALESCE + 2)  # anything more would come by now
        ours = len(alerts_of(daemon, steady) + alerts_of(daemon, muted) + alerts_of(daemon, burst))
        wait_for(lambda: len(_about(hook.received, (steady, muted, burst))) >= ours, 20, "the webhook")
        ntfy.up()
        wait_for(lambda: len(_about(ntfy.received, (steady, muted, burst))) >= ours, 30, "ntfy")
        time.sleep(2)
        scraped = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
        result = {"daemon": daemon, "steady": steady, "talker": str(talker), "muted": muted, "burst": burst, "a": a, "b": b,
                  "listening": listening, "burst_ports": burst_ports, "quiet": quiet, "ntfy": ntfy, "hook": hook,
                  "ours": ours, "metrics": scraped}
    finally:
        assert daemon.stop() == 0
    yield result
    ntfy.down()
    hook.down()


def _about(received, programs):
    """What a receiver got about these programs (a webhook's events, ntfy's messages)."""
    return [r for r in received if r.get("exe") in programs or any(f"({p})" in r["message"] for p in programs)]


def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_known_traffic_raises_nothing(alerting):
    assert alerting["quiet"] == {alerting["steady"]: [], alerting["muted"]: [], alerting["burst"]: [],
                                 alerting["talker"]: []}


def test_each_kind_fires_once_for_its_trigger(alerting):
    found = alerts_of(alerting["daemon"], alerting["steady"])
    by_kind = {kind: values for kind, values in found}
    assert sorted(kind for kind, _ in found) == sorted(KINDS), found
    assert by_kind["new domain"] == ["example.org"]
    assert by_kind["new port"] == [f"{alerting['b']}/tcp"]
    assert by_kind["new country"] == ["FR"]
    assert by_kind["new listener"] == [f"{alerting['listening']}/tcp"]
    spike, = by_kind["traffic spike"]
    assert re.fullmatch(r"sent 3\.\d MB in 1 h usually at most 5\d\.\d kB", spike), spike  # alert.log drops commas


def test_a_script_is_a_program_of_its_own_with_its_own_hash(alerting):
    assert alerts_of(alerting["daemon"], alerting["talker"], column=4) == [("new port", [f"{alerting['b']}/tcp"])]
    line, = [line for line in alerting["daemon"].paths.alert_log.read_text().splitlines()
             if line.split(", ")[4] == alerting["talker"]]
    assert line.split(", ")[5] == hashlib.sha256(TALKER.encode()).hexdigest()
    logged = [json.loads(line) for line in alerting["daemon"].paths.event_log.read_text().splitlines()]
    assert any(e["kind"] == "new program" and e["exe"] == alerting["talker"] and e.get("role") == "script"
               for e in logged)


def test_a_muted_program_raises_nothing(alerting):
    assert alerts_of(alerting["daemon"], alerting["muted"]) == []


def test_a_burst_is_one_alert_at_once_and_one_for_the_rest(alerting):
    found = alerts_of(alerting["daemon"], alerting["burst"])
    assert [kind for kind, _ in found] == ["new port", "new port"], found
    values = [v for _, vs in found for v in vs]
    assert sorted(values) == sorted(f"{port}/tcp" for port in alerting["burst_ports"])


def test_every_alert_reached_the_webhook_and_ntfy_once_it_came_back(alerting):
    """ntfy was down from the end of learning until every alert had been raised."""
    programs = (alerting["steady"], alerting["muted"], alerting["burst"])
    hook, ntfy = _about(alerting["hook"].received, programs), _about(alerting["ntfy"].received, programs)
    assert alerting["ours"] == len(KINDS) + 2
    assert len(hook) == len(ntfy) == alerting["ours"]
    assert all(h["kind"] == "alert" for h in alerting["hook"].received)  # "Webhook events": ["alert"]
    assert sorted(h["alert"] for h in hook if h["exe"] == alerting["steady"]) == sorted(KINDS)
    assert [m["message"] for m in ntfy] == [h["message"] for h in hook]  # in order


def test_alerts_are_kept_in_the_record_and_the_event_log(alerting):
    daemon = alerting["daemon"]
    record = json.loads(daemon.paths.record.read_text())
    kept = [a for a in record["Alerts"] if a["exe"] == alerting["steady"]]
    assert sorted(a["alert"] for a in kept) == sorted(KINDS)
    logged = [json.loads(line) for line in daemon.paths.event_log.read_text().splitlines()]
    assert sorted(e["alert"] for e in logged if e["kind"] == "alert" and e["exe"] == alerting["steady"]) == \
        sorted(KINDS)
    assert any(e["kind"] == "new program" and e["exe"] == alerting["steady"] for e in logged)


def test_the_metrics_count_the_programs_bytes(alerting):
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in prometheus_parser.text_string_to_metric_families(alerting["metrics"])
               for s in family.samples}
    sent = samples[("picosnitch_bytes_total", (("direction", "sent"), ("exe", alerting["steady"]), ("script", "")))]
    assert sent >= 4_000_000 + 50_000
    assert samples[("picosnitch_alerts_total", (("kind", "traffic spike"),))] >= 1
    assert samples[("picosnitch_receiver_up", (("receiver", "ntfy"),))] == 1
