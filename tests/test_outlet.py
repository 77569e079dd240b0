"""The outlet: events.log, syslog, webhooks (generic, ntfy, Gotify) and Prometheus metrics.

The real outlet worker runs in its own process, fed through real pipes as the keeper feeds it;
the receivers are real servers on loopback (tests/receivers.py) and the metrics are read by
prometheus_client's parser. A receiver that is down or slow loses nothing and holds up no one.
"""

import json
import multiprocessing
import os
import pwd
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import parser as prometheus_parser
from receivers import GotifyServer, NtfyServer, SyslogSocket, WebhookServer, shared_tempdir

from picosnitch import channels
from picosnitch import config as config_module
from picosnitch.alerts import events, outlet_worker
from picosnitch.alerts.outbox import Outbox
from picosnitch.alerts.record_keeper import NEW_EXE, NEW_SHA256, SCRIPT, NewThing
from picosnitch.messages import Alert, ErrorReport, Stop, Traffic
from picosnitch.paths import Paths

_ctx = multiprocessing.get_context("fork")
SHA = "a" * 64
NTFY_TOKEN, GOTIFY_TOKEN, HOOK_TOKEN = "tk_0123456789abcdefghijklmnopqrs", "AKcJ2wCR.Nj_Vv2", "hook-secret"


def needs_root():
    if os.geteuid() != 0:
        pytest.skip("needs root: the sender becomes nobody")


def alert(n: int, kind="new port") -> Alert:
    return Alert(kind, "/usr/bin/curl", "curl", SHA, (f"{1000 + n}/tcp",), 1, time.time())


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Outlet:
    """The real outlet worker in its own process; `send` is the keeper's end of its inbox."""

    def __init__(self, prefix: Path, settings: dict):
        self.config = config_module.parse(json.dumps(settings))
        self.paths = Paths.under(prefix)
        self.paths.ensure_dirs()
        inbox, self.to_outlet = channels.pair(sender_waits=True)  # the links the supervisor makes
        self.from_outlet, report = channels.pair()
        self.process = _ctx.Process(target=outlet_worker.run, args=(self.config, self.paths, inbox, report))
        self.process.start()

    def send(self, *messages):
        for message in messages:
            self.to_outlet.send(message)

    def reports(self) -> list:
        found = []
        try:
            while self.from_outlet.poll(0.2):
                found.append(self.from_outlet.recv())
        except EOFError:  # the worker has exited
            pass
        return found

    def stop(self):
        self.to_outlet.send(Stop("keeper"))
        self.process.join(30)
        assert self.process.exitcode == 0

    def events_log(self) -> list:
        return [json.loads(line) for line in self.paths.event_log.read_text().splitlines()]


@pytest.fixture
def prefix():
    return shared_tempdir("picosnitch-outlet-")


@pytest.fixture
def receivers():
    made = {"ntfy": NtfyServer(NTFY_TOKEN), "gotify": GotifyServer(GOTIFY_TOKEN),
            "webhook": WebhookServer(HOOK_TOKEN), "syslog": SyslogSocket()}
    yield made
    for receiver in made.values():
        if hasattr(receiver, "server"):
            receiver.down()
        else:
            receiver.close()


def settings_for(receivers, **more) -> dict:
    return {"ntfy URL": f"http://127.0.0.1:{receivers['ntfy'].port}/picosnitch-alerts", "ntfy token": NTFY_TOKEN,
            "Gotify URL": f"http://127.0.0.1:{receivers['gotify'].port}", "Gotify token": GOTIFY_TOKEN,
            "Webhook URL": f"http://127.0.0.1:{receivers['webhook'].port}/hooks/picosnitch",
            "Webhook token": HOOK_TOKEN, "Syslog socket": receivers["syslog"].path,
            "Webhook backoff (seconds)": 1, **more}


# ---- pure parts ----

def test_an_event_is_printable_json_with_an_id_and_says_what_happened_in_a_sentence():
    hostile = Alert("new domain", "/tmp/\x1b[2Jx\udcff", "x\n", SHA, ("example.org", "evil.test"), 2, 5.0)
    event = events.for_alert(hostile)
    assert event["kind"] == "alert" and event["alert"] == "new domain" and len(event["id"]) == 32
    assert event["exe"] == "/tmp/\\x1b[2Jx\\xff" and event["values"] == ["example.org", "evil.test"]
    assert event["message"] == "x\\x0a (/tmp/\\x1b[2Jx\\xff) used 2 new domains: example.org, evil.test"
    line = events.json_line(event)
    assert line.isascii() and "\n" not in line and json.loads(line) == event
    loss = events.for_error(ErrorReport("the kernel dropped 3 things", "loss:ringbuf_exec", 3))
    assert (loss["kind"], loss["what"], loss["count"]) == ("loss", "ringbuf_exec", 3)
    assert events.for_error(ErrorReport("something else")) is None
    new, changed = events.for_new_things([NewThing(NEW_EXE, "/opt/a", "a", SHA), NewThing(NEW_SHA256, "/b", "b", SHA)])
    assert (new["kind"], changed["kind"]) == ("new program", "changed hash")


def test_a_script_event_says_it_is_a_script_and_a_changed_hash_where_it_came_from():
    new_script, changed = events.for_new_things([
        NewThing(NEW_EXE, "/opt/tool.py", "python3", SHA, role=SCRIPT),
        NewThing(NEW_SHA256, "/usr/bin/curl", "curl", SHA, note="modified outside any package")])
    assert (new_script["kind"], new_script["role"], new_script["exe"]) == ("new program", "script", "/opt/tool.py")
    assert new_script["message"] == "new script: python3 (/opt/tool.py)"
    assert "role" not in changed and changed["note"] == "modified outside any package"
    assert changed["message"].endswith("curl (/usr/bin/curl) (modified outside any package)")


def test_a_syslog_message_is_rfc_5424_with_the_event_as_its_message():
    from receivers import SYSLOG
    event = events.for_alert(alert(1))
    message = events.syslog_message(event, 1234)
    fields = SYSLOG.fullmatch(message).groupdict()
    assert fields["pri"] == b"28"  # facility daemon (3) * 8 + warning (4)
    assert (fields["app"], fields["pid"], fields["msgid"], fields["sd"]) == (b"picosnitch", b"1234", b"alert", b"-")
    assert json.loads(fields["msg"]) == event
    assert fields["time"].endswith(b"Z")


def test_the_outbox_keeps_events_for_each_receiver_across_a_restart_and_cuts_a_torn_line(tmp_path):
    box = Outbox(tmp_path, 1 << 20, ["a", "b"])
    box.append([{"n": 1}, {"n": 2}])
    entry, event = box.peek("a")
    box.done("a", entry)
    box.close()
    segment = next(tmp_path.glob("segment-*"))
    with open(segment, "ab") as file:
        file.write(b'{"n": 3')  # a crash in the middle of an append
    again = Outbox(tmp_path, 1 << 20, ["a", "b", "c"])
    assert (again.waiting("a"), again.waiting("b"), again.waiting("c")) == (1, 2, 0)
    assert again.peek("a")[1] == {"n": 2}
    again.append([{"n": 4}])
    assert [again.peek("c")[1]] == [{"n": 4}]  # a new receiver starts at the end


def test_a_full_outbox_drops_the_oldest_events_and_counts_them_per_receiver(tmp_path):
    box = Outbox(tmp_path, 8192, ["slow", "fast"])
    for n in range(200):
        box.append([{"n": n, "pad": "x" * 60}])
        found = box.peek("fast")
        box.done("fast", found[0])
    assert box.dropped["fast"] == 0 and box.dropped["slow"] > 0
    assert box.waiting("slow") + box.dropped["slow"] == 200
    assert sum(p.stat().st_size for p in tmp_path.glob("segment-*")) <= 8192 + box.segment_limit
    assert box.peek("slow")[1]["n"] == box.dropped["slow"]  # the oldest went, in order


# ---- the worker, with real receivers ----

def test_every_receiver_gets_each_event_as_its_api_says(prefix, receivers):
    needs_root()
    outlet = Outlet(prefix, settings_for(receivers))
    outlet.send([NewThing(NEW_EXE, "/usr/bin/curl", "curl", SHA)], alert(1, "new domain"),
                ErrorReport("the kernel dropped 5 exec events", "loss:ringbuf_exec", 5),
                ErrorReport("an ordinary error"))
    ntfy = receivers["ntfy"].wait_for(3)
    assert [m["title"] for m in ntfy] == ["picosnitch on %s: new program" % os.uname().nodename,
                                          "picosnitch on %s: new domain" % os.uname().nodename,
                                          "picosnitch on %s: loss" % os.uname().nodename]
    assert [m["priority"] for m in ntfy] == [3, 4, 4]
    assert ntfy[1]["message"] == "curl (/usr/bin/curl) used a new domain: 1001/tcp"
    assert ntfy[1]["topic"] == "picosnitch-alerts" and ntfy[1]["tags"] == ["picosnitch", "alert"]
    gotify = receivers["gotify"].wait_for(3)
    assert [m["priority"] for m in gotify] == [5, 8, 8]
    assert gotify[1]["extras"]["picosnitch::event"]["values"] == ["1001/tcp"]
    hooks = receivers["webhook"].wait_for(3)
    assert [h["kind"] for h in hooks] == ["new program", "alert", "loss"]
    syslog = receivers["syslog"].wait_for(3)
    assert [json.loads(m["msg"]) for m in syslog] == hooks == outlet.events_log()
    time.sleep(0.5)
    assert len(receivers["webhook"].received) == 3  # the ordinary error is no event
    outlet.stop()
    assert outlet.reports() == []


def fill(path: Path) -> None:
    """Write `path` until the file system is full."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        with pytest.raises(OSError, match="No space left"):
            while True:
                os.write(descriptor, b"x" * 4096)
    finally:
        os.close(descriptor)


def test_a_full_disk_holds_events_in_memory_until_there_is_room_again(prefix, receivers):
    needs_root()
    outbox = Paths.under(prefix).outbox
    outbox.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "picosnitch-test", str(outbox)], check=True)
    outlet = None
    try:
        outlet = Outlet(prefix, settings_for(receivers))
        outlet.send(alert(0))
        receivers["webhook"].wait_for(1)
        fill(outbox / "filler")
        # More than the rest of the page the segment file already has: a write must allocate.
        large = [Alert("new domain", "/usr/bin/curl", "curl", SHA, tuple(f"{n}-{'x' * 200}.example" for n in
                                                                        range(50)), 50, time.time())] * 3
        outlet.send(*large)
        time.sleep(2)
        assert len(receivers["webhook"].received) == 1  # held, not stored, so not sent yet
        (outbox / "filler").unlink()
        got = receivers["webhook"].wait_for(4)
        assert [len(h["values"]) for h in got] == [1, 50, 50, 50]
        outlet.stop()
        reports = [r.message for r in outlet.reports()]
        assert any("cannot be stored" in r and "No space left on device" in r for r in reports), reports
        assert "events for delivery are stored again (0 were dropped meanwhile)" in reports
    finally:
        if outlet is not None and outlet.process.is_alive():
            outlet.process.kill()
            outlet.process.join()
        subprocess.run(["umount", "--lazy", str(outbox)], check=True)


def test_the_sender_is_unprivileged_and_owns_its_queue(prefix, receivers):
    needs_root()
    outlet = Outlet(prefix, settings_for(receivers))
    outlet.send(alert(1))
    receivers["webhook"].wait_for(1)
    children = [int(pid) for pid in Path(f"/proc/{outlet.process.pid}/task/{outlet.process.pid}/children")
                .read_text().split()]
    uids = [os.stat(f"/proc/{pid}").st_uid for pid in children]
    nobody = pwd.getpwnam("picosnitch" if _has_user("picosnitch") else "nobody").pw_uid
    assert uids == [nobody]
    assert os.stat(outlet.paths.outbox).st_uid == nobody
    assert os.stat(outlet.process.pid and f"/proc/{outlet.process.pid}").st_uid == 0
    outlet.stop()


def _has_user(name):
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


def test_a_receiver_that_is_down_loses_nothing_blocks_no_one_and_gets_everything_when_back(prefix, receivers):
    needs_root()
    ntfy = receivers["ntfy"]
    ntfy.down()
    outlet = Outlet(prefix, settings_for(receivers))
    started = time.monotonic()
    outlet.send(*[alert(n) for n in range(20)])
    receivers["webhook"].wait_for(20)
    receivers["gotify"].wait_for(20)
    assert time.monotonic() - started < 10  # the others were not held up
    outlet.stop()  # the daemon restarts while ntfy is down: what it has not had waits on disk
    outlet = Outlet(prefix, settings_for(receivers))
    outlet.send(*[alert(n) for n in range(20, 25)])
    receivers["webhook"].wait_for(25)
    time.sleep(1.5)
    assert ntfy.received == []
    ntfy.up()
    got = ntfy.wait_for(25, timeout=20)
    assert [m["message"].rsplit(" ", 1)[1] for m in got] == [f"{1000 + n}/tcp" for n in range(25)]
    time.sleep(1.5)
    assert len(ntfy.received) == 25 and len(receivers["webhook"].received) == 25
    outlet.stop()
    reports = [r.message for r in outlet.reports()]
    assert "ntfy accepts events again" in reports


def test_a_slow_receiver_holds_up_only_itself(prefix, receivers):
    needs_root()
    receivers["gotify"].delay = 2.0
    outlet = Outlet(prefix, settings_for(receivers))
    started = time.monotonic()
    outlet.send(*[alert(n) for n in range(5)])
    receivers["webhook"].wait_for(5)
    receivers["ntfy"].wait_for(5)
    assert time.monotonic() - started < 3
    assert len(receivers["gotify"].received) < 5
    receivers["gotify"].wait_for(5, timeout=30)
    outlet.stop()


def test_a_wrong_token_is_reported_and_the_event_waits(prefix, receivers):
    needs_root()
    outlet = Outlet(prefix, settings_for(receivers, **{"Gotify token": "wrong"}))
    outlet.send(alert(1))
    receivers["webhook"].wait_for(1)
    time.sleep(1)
    assert receivers["gotify"].received == [] and receivers["gotify"].requests >= 1
    outlet.stop()
    assert any("gotify cannot be reached (HTTP 401 Unauthorized)" in r.message for r in outlet.reports())


def test_only_the_chosen_kinds_go_to_webhooks_and_syslog_gets_them_all(prefix, receivers):
    needs_root()
    outlet = Outlet(prefix, settings_for(receivers, **{"Webhook events": ["alert"]}))
    outlet.send([NewThing(NEW_EXE, "/usr/bin/curl", "curl", SHA)], alert(1))
    receivers["syslog"].wait_for(2)
    assert [h["kind"] for h in receivers["webhook"].wait_for(1)] == ["alert"]
    assert [m["message"].endswith("1001/tcp") for m in receivers["ntfy"].wait_for(1)] == [True]
    outlet.stop()


def metric_samples(text: str) -> dict:
    """{(sample name, sorted labels): value}, read by prometheus_client's parser."""
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in prometheus_parser.text_string_to_metric_families(text) for sample in family.samples}


def test_metrics_are_served_on_loopback_and_written_for_node_exporter(prefix, receivers):
    needs_root()
    port = free_port()
    textfile = prefix / "picosnitch.prom"
    receivers["ntfy"].down()
    outlet = Outlet(prefix, settings_for(receivers, **{"Metrics address": f"127.0.0.1:{port}",
                                                      "Metrics textfile": str(textfile)}))
    outlet.send(Traffic({("/usr/bin/curl", ""): (1200, 34000, 3), ("/usr/bin/python3", "/opt/t.py"): (5, 6, 1)},
                        {"learning": 1, "learned": 1, "muted": 0}),
                ErrorReport("the kernel dropped 7 exec events", "loss:ringbuf_exec", 7),
                ErrorReport("the writer worker stopped unexpectedly", "restart:writer"),
                alert(1), alert(2, "new country"))
    receivers["webhook"].wait_for(3)  # the loss and the two alerts

    def scraped():
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        samples = metric_samples(text)
        return samples if samples.get(("picosnitch_outbox_events", (("receiver", "ntfy"),))) == 3 else None

    deadline = time.monotonic() + 15
    while not (samples := scraped()):
        assert time.monotonic() < deadline, "the metrics never showed the ntfy queue"
        time.sleep(0.3)
    curl = (("direction", "sent"), ("exe", "/usr/bin/curl"), ("script", ""))
    assert samples[("picosnitch_bytes_total", curl)] == 1200
    assert samples[("picosnitch_bytes_total", (("direction", "received"), ("exe", "/usr/bin/curl"),
                                               ("script", "")))] == 34000
    assert samples[("picosnitch_connections_total", (("exe", "/usr/bin/python3"), ("script", "/opt/t.py")))] == 1
    assert samples[("picosnitch_kernel_lost_total", (("what", "ringbuf_exec"),))] == 7
    assert samples[("picosnitch_worker_restarts_total", (("worker", "writer"),))] == 1
    assert samples[("picosnitch_alerts_total", (("kind", "new country"),))] == 1
    assert samples[("picosnitch_receiver_up", (("receiver", "ntfy"),))] == 0
    assert samples[("picosnitch_delivered_events_total", (("receiver", "webhook"),))] == 3
    assert samples[("picosnitch_baseline_programs", (("state", "learning"),))] == 1
    assert metric_samples(textfile.read_text())[("picosnitch_bytes_total", curl)] == 1200
    with pytest.raises(urllib.error.HTTPError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/other", timeout=5)
    outlet.stop()
