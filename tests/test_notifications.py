"""Desktop notifications over real D-Bus: a private session bus owned by a test user, a
notification server (org.freedesktop.Notifications) running as that user, a stand-in logind on
a private system bus, and the real notifier worker fed through real pipes."""

import hashlib
import json
import multiprocessing
import os
import queue
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque

import pytest

pytest.importorskip("jeepney")
from jeepney import (
    HeaderFields,
    MatchRule,
    MessageType,
    message_bus,
    new_error,
    new_method_return,  # noqa: E402
)
from jeepney.io.blocking import open_dbus_connection  # noqa: E402
from jeepney.wrappers import unwrap_msg  # noqa: E402

from picosnitch import channels  # noqa: E402
from picosnitch import config as config_module  # noqa: E402
from picosnitch.alerts import desktop_sessions, notification_text, notifier_worker  # noqa: E402
from picosnitch.alerts.record_keeper import NEW_EXE, NEW_NAME, NEW_SHA256, NewThing, RecordKeeper  # noqa: E402
from picosnitch.alerts.vt_worker import VtResult  # noqa: E402
from picosnitch.messages import Alert, ErrorReport, Stop  # noqa: E402
from picosnitch.paths import Paths  # noqa: E402

SETTLE, WINDOW, ERROR_WINDOW = 0.3, 2.0, 1.5
SHA_A, SHA_B = "a" * 64, "b" * 64
_ctx = multiprocessing.get_context("fork")


def needs_root():
    if os.geteuid() != 0:
        pytest.skip("needs root: creates a user and drops privileges")


# ---------------------------------------------------------------- pure text rules

def test_one_observation_is_one_notice_and_a_new_executable_says_everything():
    things = [NewThing(NEW_NAME, "/usr/bin/curl", "curl2", SHA_B),
              NewThing(NEW_SHA256, "/usr/bin/curl", "curl2", SHA_B)]
    notices = notification_text.coalesce(notification_text.group(things), "/var/log/exe.log")
    assert notices == [notification_text.Notice(
        "picosnitch: executable changed",
        "curl2\n/usr/bin/curl\nnew sha256 bbbbbbbbbbbbbbb…\nalso running under a new name")]
    new = notification_text.for_change(notification_text.group(
        [NewThing(NEW_EXE, "/opt/x", "x", SHA_A)])[0])
    assert new == notification_text.Notice("picosnitch: new executable", "x\n/opt/x")


def test_a_script_is_named_as_a_script_and_a_change_says_where_it_came_from():
    def notice(*things):
        return notification_text.coalesce(notification_text.group(list(things)), "/var/log/exe.log")
    assert notice(NewThing(NEW_EXE, "/home/u/sync.py", "python3", SHA_A, "script")) == [
        notification_text.Notice("picosnitch: new script", "python3\n/home/u/sync.py")]
    assert notice(NewThing(NEW_SHA256, "/home/u/sync.py", "python3", SHA_B, "script",
                           "modified outside any package")) == [notification_text.Notice(
        "picosnitch: script changed", "python3\n/home/u/sync.py\nnew sha256 bbbbbbbbbbbbbbb…\nmodified outside any package")]
    assert notice(NewThing(NEW_SHA256, "/usr/bin/curl", "curl", SHA_B, note="updated by the package manager: "
                           "curl 8.5.0 → 8.6.0"))[0].body.endswith("\nupdated by the package manager: curl 8.5.0 → 8.6.0")


def test_a_burst_becomes_one_summary_that_counts_and_points_to_the_log():
    things = [NewThing(NEW_EXE, "/bin/p%d" % i, "p%d" % i, SHA_A) for i in range(28)]
    things += [NewThing(NEW_SHA256, "/bin/q%d" % i, "q%d" % i, SHA_B) for i in range(2)]
    notice, = notification_text.coalesce(notification_text.group(things), "/l/exe.log")
    assert notice.summary == "picosnitch: 30 changes"
    assert notice.body == ("28 new executables, 2 changed executables: p0, p1, p2, p3, p4, …\n"
                           "See picosnitch view or /l/exe.log")


def test_an_alert_is_one_notice_and_a_burst_of_them_one_that_counts():
    new_port = Alert("new port", "/usr/bin/curl", "curl", SHA_A, tuple(f"{p}/tcp" for p in range(1, 8)), 7, 0.0)
    assert notification_text.for_alert(new_port) == notification_text.Notice(
        "picosnitch: new port", "curl\n/usr/bin/curl\n1/tcp, 2/tcp, 3/tcp, 4/tcp, 5/tcp and 2 more")
    spike = Alert("traffic spike", "/usr/bin/python3", "python3", SHA_B, ("sent 2.0 GB in 24 h, usually at most "
                                                                          "1.0 MB",), 1, 0.0, "/opt/sync.py")
    assert notification_text.for_alert(spike).body == (
        "python3\n/opt/sync.py\nsent 2.0 GB in 24 h, usually at most 1.0 MB")
    notice, = notification_text.coalesce_alerts([new_port] * 3 + [spike], "/l/alert.log")
    assert notice == notification_text.Notice("picosnitch: 4 alerts", "3 new port, 1 traffic spike: curl, python3"
                                              "\nSee picosnitch view or /l/alert.log")


def test_text_is_printable_short_and_escaped_as_markup():
    hostile = "\x1b]0;owned\x07<b>big</b> & \u202egnp.exe\udcff"
    assert notification_text.clean(hostile, 80) == (
        "\\x1b]0;owned\\x07<b>big</b> & \\u202egnp.exe\\xff")
    assert notification_text.markup_escape("<a href='x'>&") == "&lt;a href='x'&gt;&amp;"
    assert notification_text.clean("/very/long/path/tail", 10, keep_end=True) == "…path/tail"
    assert notification_text.clean("x" * 100, 10) == "x" * 9 + "…"


def test_gates_hold_bursts_and_count_errors():
    gate = notifier_worker.BurstGate(settle=1, window=10)
    gate.add(["a"], now=0)
    assert gate.due(0.5) == [] and gate.due(1) == ["a"]
    gate.add(["b"], now=2)
    gate.add(["c"], now=3)
    assert gate.due(10) == [] and gate.due(11) == ["b", "c"]
    assert gate.due(21) == [] and gate.deadline is None  # quiet again
    errors = notifier_worker.ErrorGate(window=5)
    assert [errors.add(t) for t in (0, 1, 2)] == [True, False, False]
    assert errors.due(4) == 0 and errors.due(5) == 2
    assert errors.add(6) is False and errors.due(10) == 1 and errors.due(15) == 0
    assert errors.add(16) is True


# ---------------------------------------------------------------- real D-Bus fixtures

BUS_POLICY = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <listen>unix:path=%s</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_destination="*"/>
    <allow receive_sender="*"/>
  </policy>
</busconfig>
"""


def wait_for_socket(path, process):
    deadline = time.monotonic() + 10
    while not os.path.exists(path):
        assert process.poll() is None, "dbus-daemon exited"
        assert time.monotonic() < deadline, "dbus-daemon did not start"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def desktop_user():
    """A fresh system user with a session bus at the real place, /run/user/UID/bus."""
    needs_root()
    name = "pstest%d" % os.getpid()
    subprocess.run(["useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent",
                    "--shell", "/usr/sbin/nologin", name], check=True)
    user = desktop_sessions.lookup(name)
    runtime = user.runtime_dir
    made_run_user = not os.path.exists("/run/user")
    bus = None
    try:
        assert not os.path.exists(runtime)
        os.makedirs(runtime, mode=0o700)
        os.chown(runtime, user.uid, user.gid)
        bus = subprocess.Popen(
            ["dbus-daemon", "--session", "--nofork", "--nopidfile",
             "--address=" + user.bus_address], user=user.uid, group=user.gid, extra_groups=[],
            env={"PATH": "/usr/bin:/bin", "HOME": "/", "XDG_RUNTIME_DIR": runtime},
            stdout=subprocess.DEVNULL)
        wait_for_socket(runtime + "/bus", bus)
        yield user
    finally:
        if bus:
            bus.terminate()
            bus.wait()
        shutil.rmtree(runtime, ignore_errors=True)
        if made_run_user:
            os.rmdir("/run/user")
        subprocess.run(["userdel", name], check=True)


def serve_notifications(user, calls):
    """A notification server running as `user` on the user's session bus.

    Each Notify call is put on `calls` with what the bus and /proc say about its sender.
    """
    os.setgroups([])
    os.setresgid(user.gid, user.gid, user.gid)
    os.setresuid(user.uid, user.uid, user.uid)
    connection = open_dbus_connection(bus=user.bus_address)
    incoming = deque()
    with connection.filter(MatchRule(type="method_call"), queue=incoming, bufsize=1000):
        unwrap_msg(connection.send_and_get_reply(message_bus.RequestName(
            "org.freedesktop.Notifications")))
        calls.put("ready")
        serial = 0
        while True:
            message = connection.recv_until_filtered(incoming)
            member = message.header.fields[HeaderFields.member]
            if member == "GetCapabilities":
                connection.send(new_method_return(message, "as", (["body", "body-markup"],)))
            elif member == "GetServerInformation":
                connection.send(new_method_return(message, "ssss", ("test", "t", "1", "1.2")))
            elif member == "Notify":
                sender = message.header.fields[HeaderFields.sender]
                uid, = unwrap_msg(connection.send_and_get_reply(
                    message_bus.GetConnectionUnixUser(sender)))
                pid, = unwrap_msg(connection.send_and_get_reply(
                    message_bus.GetConnectionUnixProcessID(sender)))
                with open("/proc/%d/status" % pid) as status:
                    ids = {line.split(":")[0]: line.split(":")[1].split() for line in status
                           if line.startswith(("Uid:", "Gid:", "Groups:", "PPid:"))}
                app, _replaces, _icon, summary, body = message.body[:5]
                calls.put({"at": time.monotonic(), "app": app, "summary": summary,
                           "body": body, "bus_uid": uid, "pid": pid, "ids": ids,
                           "pgid": os.getpgid(pid)})
                serial += 1
                connection.send(new_method_return(message, "u", (serial,)))
            else:
                connection.send(new_error(message, "org.freedesktop.DBus.Error.UnknownMethod"))


@pytest.fixture(scope="module")
def server(desktop_user):
    calls = _ctx.Queue()
    process = _ctx.Process(target=serve_notifications, args=(desktop_user, calls), daemon=True)
    process.start()
    assert calls.get(timeout=10) == "ready"
    yield calls
    process.kill()
    process.join()


class FakeLogind:
    """org.freedesktop.login1 on a private system bus: ListSessions and session properties."""

    def __init__(self, address):
        self.sessions = []  # (uid, name, properties)
        self.connection = open_dbus_connection(bus=address)
        unwrap_msg(self.connection.send_and_get_reply(message_bus.RequestName(
            "org.freedesktop.login1")))
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                message = self.connection.receive()
            except (OSError, EOFError):
                return
            if message.header.message_type != MessageType.method_call:
                continue
            fields = message.header.fields
            member, path = fields[HeaderFields.member], fields[HeaderFields.path]
            if member == "ListSessions":
                listed = [(str(i), uid, name, "seat0", "/org/freedesktop/login1/session/_%d" % i)
                          for i, (uid, name, _properties) in enumerate(self.sessions)]
                self.connection.send(new_method_return(message, "a(susso)", (listed,)))
            elif member == "GetAll":
                properties = self.sessions[int(path.rsplit("_", 1)[1])][2]
                self.connection.send(new_method_return(message, "a{sv}", (
                    {key: ("b" if isinstance(value, bool) else "s", value)
                     for key, value in properties.items()},)))


@pytest.fixture(scope="module")
def logind():
    needs_root()
    directory = tempfile.mkdtemp(prefix="picosnitch-system-bus-")
    os.chmod(directory, 0o755)  # the logind question is asked as nobody
    socket_path = os.path.join(directory, "system_bus_socket")
    with open(os.path.join(directory, "bus.conf"), "w") as policy:
        policy.write(BUS_POLICY % socket_path)
    bus = subprocess.Popen(["dbus-daemon", "--nofork", "--nopidfile",
                            "--config-file=" + os.path.join(directory, "bus.conf")])
    try:
        wait_for_socket(socket_path, bus)
        fake = FakeLogind("unix:path=" + socket_path)
        fake.address = "unix:path=" + socket_path
        yield fake
        fake.connection.close()
    finally:
        bus.terminate()
        bus.wait()
        shutil.rmtree(directory)


def graphical(active=True, remote=False, kind="wayland"):
    return {"Type": kind, "Active": active, "Remote": remote, "Class": "user"}


class Notifier:
    """The real notifier worker in its own process, fed and heard through real pipes."""

    def __init__(self, tmp_path, settings, method="auto"):
        cfg = config_module.parse(json.dumps(settings))
        self.paths = Paths.under(tmp_path)
        self.paths.ensure_dirs()
        self.keeper = RecordKeeper(self.paths.record, self.paths.exe_log)
        inbox, self.to_notifier = channels.pair(sender_waits=True)
        self.from_notifier, report = channels.pair()
        self.process = _ctx.Process(target=notifier_worker.run, args=(
            cfg, self.paths, inbox, report, method, SETTLE, WINDOW, ERROR_WINDOW))
        self.process.start()

    def observe(self, exe, name, sha256):
        """What the keeper does: observe, and send what is new to the notifier."""
        things = self.keeper.observe(exe, name, sha256)
        if things:
            self.to_notifier.send(things)
        return things

    def reports(self):
        found = []
        try:
            while self.from_notifier.poll(0.2):
                found.append(self.from_notifier.recv())
        except EOFError:  # the worker has exited
            pass
        return found

    def stop(self):
        self.to_notifier.send(Stop("keeper"))
        self.process.join(20)
        assert self.process.exitcode == 0


@pytest.fixture
def notifier(tmp_path, server, desktop_user):
    made = []

    def start(settings=None, method="auto"):
        settings = {"Desktop notification users": [desktop_user.name], **(settings or {})}
        made.append(Notifier(tmp_path, settings, method))
        return made[-1]
    yield start
    for each in made:
        if each.process.is_alive():
            each.stop()
    while True:  # nothing left over for the next test
        try:
            server.get(timeout=0.1)
        except queue.Empty:
            break


def received(server, count, quiet=WINDOW + SETTLE + 0.5):
    """Exactly `count` Notify calls, then none for `quiet` seconds."""
    calls = [server.get(timeout=10) for _ in range(count)]
    with pytest.raises(queue.Empty):
        extra = server.get(timeout=quiet)
        pytest.fail("one notification too many: %r" % (extra,))
    return calls


# ---------------------------------------------------------------- end to end

def test_a_new_program_is_one_notification_sent_as_the_desktop_user(notifier, server,
                                                                    desktop_user):
    started = time.monotonic()
    worker = notifier()
    worker.observe("/usr/local/bin/never-seen", "never-seen", SHA_A)
    call, = received(server, 1)
    assert call["at"] - started < SETTLE + 1  # not held until a write window
    assert call["app"] == "picosnitch"
    assert call["summary"] == "picosnitch: new executable"
    assert call["body"] == "never-seen\n/usr/local/bin/never-seen"
    uid, gid = str(desktop_user.uid), str(desktop_user.gid)
    assert call["bus_uid"] == desktop_user.uid
    assert call["ids"]["Uid"] == [uid] * 4 and call["ids"]["Gid"] == [gid] * 4
    assert call["ids"]["Groups"] in ([], [gid])
    assert call["pid"] != worker.process.pid  # the root worker itself never spoke D-Bus

    worker.observe("/usr/local/bin/never-seen", "never-seen", SHA_A)  # nothing new: no toast
    worker.observe("/usr/local/bin/never-seen", "never-seen", SHA_B)  # modified executable
    call, = received(server, 1)
    assert call["summary"] == "picosnitch: executable changed"
    assert call["body"].startswith("never-seen\n/usr/local/bin/never-seen\nnew sha256 bbbb")
    worker.stop()
    assert worker.reports() == []


def test_a_burst_of_thirty_new_programs_is_one_summary(notifier, server):
    worker = notifier()
    for i in range(30):
        worker.observe("/usr/lib/update/tool%02d" % i, "tool%02d" % i, "%064x" % i)
    call, = received(server, 1)
    assert call["summary"] == "picosnitch: 30 changes", call
    assert call["body"].startswith("30 new executables: tool00, tool01, tool02, tool03, tool04")
    assert call["body"].endswith("See picosnitch view or %s" % worker.paths.exe_log)


def test_a_hostile_name_arrives_printable_and_escaped(notifier, server):
    worker = notifier()
    worker.observe("/tmp/<i>x</i>", "\x1b[31m<b>bold</b>&\x07", SHA_A)
    call, = received(server, 1)
    assert call["body"] == "\\x1b[31m&lt;b&gt;bold&lt;/b&gt;&amp;\\x07\n/tmp/&lt;i&gt;x&lt;/i&gt;"


def test_an_alert_is_one_notification_at_once_and_a_burst_of_alerts_one_that_counts(notifier, server):
    worker = notifier()
    started = time.monotonic()
    worker.to_notifier.send(Alert("new domain", "/usr/bin/curl", "curl", SHA_A, ("example.org",), 1, time.time()))
    call, = received(server, 1)
    assert call["at"] - started < SETTLE + 1
    assert (call["summary"], call["body"]) == ("picosnitch: new domain", "curl\n/usr/bin/curl\nexample.org")
    for port in range(1, 6):
        worker.to_notifier.send(Alert("new port", "/usr/bin/curl", "curl", SHA_A, (f"{port}/tcp",), 1, time.time()))
    call, = received(server, 1)
    assert call["summary"] == "picosnitch: 5 alerts"
    assert call["body"] == "5 new port: curl\nSee picosnitch view or %s" % worker.paths.alert_log
    worker.stop()


def test_notify_send_is_the_fallback(notifier, server):
    if not shutil.which("notify-send"):
        pytest.skip("notify-send (libnotify-bin) is not installed")
    worker = notifier(method=notifier_worker.NOTIFY_SEND)
    worker.observe("/opt/a&b", "a&b", SHA_A)
    call, = received(server, 1)
    assert call["summary"] == "picosnitch: new executable"
    assert call["body"] == "a&amp;b\n/opt/a&amp;b"
    assert call["bus_uid"] != 0


def test_virustotal_warnings_go_out_and_clean_verdicts_do_not(notifier, server):
    worker = notifier()
    worker.to_notifier.send(VtResult("/opt/ok", "ok", SHA_A, "clean: 0 malicious and 0 "
                                     "suspicious of 70 engines"))
    worker.to_notifier.send(VtResult("/opt/bad", "bad", SHA_B, "malicious: 5 malicious and 1 "
                                     "suspicious of 70 engines"))
    call, = received(server, 1, quiet=1)
    assert call["summary"] == "picosnitch: VirusTotal warning"
    assert call["body"].startswith("bad\n/opt/bad\nmalicious: 5 malicious")


def test_errors_are_rate_limited_and_counted(notifier, server):
    worker = notifier()
    for i in range(5):
        worker.to_notifier.send(ErrorReport("missed %d events" % i))
    worker.to_notifier.send(ErrorReport("own failure", notifier_worker.KEY))  # never echoed
    first = server.get(timeout=10)
    assert (first["summary"], first["body"]) == (
        "picosnitch: error", "missed 0 events\nSee %s" % worker.paths.error_log)
    count, = received(server, 1, quiet=ERROR_WINDOW + 0.5)
    assert count["summary"] == "picosnitch: 4 more errors"


def test_turned_off_means_no_notifications(notifier, server):
    worker = notifier({"Desktop notifications": False})
    worker.observe("/opt/quiet", "quiet", SHA_A)
    received(server, 0, quiet=SETTLE + 1)


def test_logind_picks_the_active_local_graphical_users(logind, monkeypatch, desktop_user):
    logind.sessions = [(0, "root", {"Type": "tty", "Active": True, "Remote": False}),
                       (1000, "remote", graphical(remote=True)),
                       (1001, "away", graphical(active=False, kind="x11")),
                       (desktop_user.uid, desktop_user.name, graphical()),
                       (desktop_user.uid, desktop_user.name, graphical(kind="x11"))]
    assert desktop_sessions.graphical_session_uids(logind.address) == [desktop_user.uid]
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", logind.address)
    assert notifier_worker.ask_logind_unprivileged() == [desktop_user.uid]


def test_without_override_the_logind_users_are_notified(notifier, server, logind, monkeypatch,
                                                        desktop_user):
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", logind.address)
    logind.sessions = [(desktop_user.uid, desktop_user.name, graphical())]
    worker = notifier({"Desktop notification users": []})
    worker.observe("/opt/seen-by-session", "seen", SHA_A)
    call, = received(server, 1, quiet=1)
    assert call["bus_uid"] == desktop_user.uid


def test_with_no_graphical_session_it_skips_and_says_so_once(notifier, server, logind,
                                                            monkeypatch):
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", logind.address)
    logind.sessions = [(0, "root", {"Type": "tty", "Active": True, "Remote": False})]
    worker = notifier({"Desktop notification users": []})
    worker.observe("/opt/one", "one", SHA_A)
    time.sleep(SETTLE + 0.5)
    worker.observe("/opt/two", "two", SHA_A)
    received(server, 0, quiet=WINDOW + 0.5)
    worker.stop()
    assert worker.reports() == [ErrorReport("desktop notifications skipped: no active "
                                            "graphical session", "desktop notifications: session")]


# ---------------------------------------------------------------- through the real daemon
#
# The daemon runs as systemd would run it (tests/daemon_harness.py), with "Desktop notification
# users" naming the test user (so no logind is needed) and a write window of a minute: a toast
# must not wait for the database. Programs are copies of the compiled `netops` helper, named for
# each test, talking to a loopback sink in this process. A daemon started on an empty record
# would find this very process (the sink's receiver) new as well, so each run starts from the
# record.json of a first run that has already met it (`known_record`).
#
# Other programs on this machine may be new at the same moment (other tests, benchmarks): the
# daemon rightly counts them in, and a notice meant for one program becomes part of a summary.
# So a run whose check fails while its exe.log names executables that are not ours is tried
# again (`without_noise`); a failure on a quiet machine is a failure.

DAEMON_WINDOW = 60  # "DB write limit (seconds)"
TOAST_WITHIN = 4.0  # seconds from the traffic to the notification, at most
TRIES = 3
ERROR_SUMMARY = r"picosnitch: (error|\d+ more errors?)"


@pytest.fixture(scope="module")
def sink():
    from test_daemon_lifecycle import Sink
    s = Sink()
    yield s
    s.sock.close()


@pytest.fixture(scope="module")
def programs():
    """A short directory for the test programs (so their paths are never cut in a notice)."""
    directory = tempfile.mkdtemp(prefix="psn-")
    yield directory
    shutil.rmtree(directory)


def install(netops, directory, name, extra=b""):
    """A copy of netops named `name` (with `extra` bytes appended: another sha256)."""
    path = os.path.join(directory, name)
    with open(netops, "rb") as original, open(path, "wb") as copy:
        copy.write(original.read() + extra)
    os.chmod(path, 0o755)
    return path


def talk(program, port, size=100):
    subprocess.run([program, "quick", "127.0.0.1", str(port), str(size)], check=True,
                   capture_output=True)


def drain(server):
    found = []
    while True:
        try:
            found.append(server.get(timeout=0.1))
        except queue.Empty:
            return found


@pytest.fixture(scope="module")
def known_record(tmp_path_factory, netops, sink, programs):
    """record.json of a first run (notifications off) that met this process and the program
    `psn-changing`; returns (record.json text, psn-changing's path)."""
    needs_root()
    from daemon_harness import Daemon
    changing = install(netops, programs, "psn-changing")
    daemon = Daemon(tmp_path_factory.mktemp("warm-up") / "prefix", **{
        "Desktop notifications": False, "DB write limit (seconds)": DAEMON_WINDOW})
    with daemon:
        talk(changing, sink.port)
        deadline = time.monotonic() + 15
        while not (daemon.paths.exe_log.exists()
                   and changing in daemon.paths.exe_log.read_text()):
            assert time.monotonic() < deadline, "the first run never saw psn-changing"
            time.sleep(0.1)
        time.sleep(1)  # whatever else talks now is known too
        assert daemon.stop() == 0
    return daemon.paths.record.read_text(), changing


@pytest.fixture
def notifying_daemon(tmp_path, known_record, server, desktop_user):
    """Starts the real daemon, notifying the test user, in a new prefix from the known record."""
    from daemon_harness import Daemon
    made = []

    def start(**settings):
        daemon = Daemon(tmp_path / ("prefix%d" % len(made)), **{
            "Desktop notification users": [desktop_user.name],
            "DB write limit (seconds)": DAEMON_WINDOW, **settings})
        daemon.paths.data_dir.mkdir(parents=True, exist_ok=True)
        daemon.paths.record.write_text(known_record[0])
        drain(server)
        made.append(daemon.start())
        return daemon
    yield start
    for daemon in made:
        daemon.stop()
    drain(server)


class Run:
    """What one daemon run showed: every Notify call, and the daemon's processes."""

    def __init__(self, daemon, server, started):
        self.daemon, self.started = daemon, started
        calls, deadline = [], time.monotonic() + 10
        while not any(not re.fullmatch(ERROR_SUMMARY, c["summary"]) for c in calls):
            try:
                calls.append(server.get(timeout=max(deadline - time.monotonic(), 0)))
            except queue.Empty:
                daemon.stop()
                pytest.fail("no notification; error.log:\n%s\nstderr:\n%s" % (
                    daemon.error_log(), daemon.proc.stderr.read()))
        self.workers = daemon.workers()
        time.sleep(1)  # company for the first one may be a moment later
        assert daemon.stop() == 0  # its notifier sends what it still holds
        time.sleep(0.5)
        calls += drain(server)
        # Error notices have their own rate limit and never hold back news; the daemon's errors
        # about other processes (which come and go on this machine) are not this test's business.
        self.calls = [c for c in calls if not re.fullmatch(ERROR_SUMMARY, c["summary"])]
        self.errors = [c for c in calls if re.fullmatch(ERROR_SUMMARY, c["summary"])]

    def about(self, text):
        return [call for call in self.calls if text in call["body"]]


def foreign(daemon, programs):
    """exe.log lines about executables that are not ours (not in `programs`)."""
    log = daemon.paths.exe_log
    lines = log.read_text(errors="surrogateescape").splitlines() if log.exists() else []
    return [line for line in lines if ", %s/" % programs not in line]


def without_noise(start, programs, scenario, check):
    """check(scenario(daemon)) for a new daemon; tried again when a failed check could be
    the doing of other programs that were new at the same time."""
    for attempt in range(1, TRIES + 1):
        run = scenario(start())
        try:
            assert not [e for e in run.errors if programs in e["body"]], run.errors
            return check(run)
        except AssertionError as error:
            others = foreign(run.daemon, programs)
            print("attempt %d failed (%s); new at the same time: %s" % (attempt, error, others))
            if not others:
                raise
            if attempt == TRIES:
                raise AssertionError("%s\n(other programs were new at the same time, in each of "
                                     "%d runs; the last: %s)" % (error, TRIES, others)) from error


def assert_sent_by_the_desktop_user(call, run, desktop_user):
    """The D-Bus sender is a process of the daemon that has become the desktop user."""
    uid, gid = str(desktop_user.uid), str(desktop_user.gid)
    assert call["bus_uid"] == desktop_user.uid
    assert call["ids"]["Uid"] == [uid] * 4 and call["ids"]["Gid"] == [gid] * 4
    assert call["ids"]["Groups"] in ([], [gid])
    assert call["pgid"] == run.daemon.proc.pid  # one of the daemon's processes, no impostor
    assert call["pid"] in run.workers
    notifier, = call["ids"]["PPid"]
    assert int(notifier) in run.workers  # forked by the notifier worker


def test_daemon_notifies_a_new_program_at_once_as_the_desktop_user(
        notifying_daemon, server, desktop_user, sink, netops, programs):
    fresh = install(netops, programs, "psn-neverseen")
    hostile = install(netops, programs, "\x1b[1m<b>&lt;\x07")  # 12 bytes: all of it is the name
    shown = "\\x1b[1m&lt;b&gt;&amp;lt;\\x07"  # printable, and the markup this server reads escaped

    def scenario(daemon):
        started = time.monotonic()
        talk(fresh, sink.port)
        talk(hostile, sink.port)
        return Run(daemon, server, started)

    def check(run):
        call, = run.about("psn-neverseen")
        assert (call["app"], call["summary"]) == ("picosnitch", "picosnitch: new executable")
        assert call["body"] == "psn-neverseen\n" + fresh
        assert call["at"] - run.started < TOAST_WITHIN  # long before the write window ends
        assert_sent_by_the_desktop_user(call, run, desktop_user)
        call, = run.about(shown)
        assert call["summary"] == "picosnitch: new executable"
        assert call["body"] == "%s\n%s/%s" % (shown, programs, shown)
        assert not any("\x1b" in c["body"] or "\x07" in c["body"] or "<b>" in c["body"]
                       for c in run.calls)
        assert len(run.calls) == 2, run.calls  # nothing else was new

    without_noise(notifying_daemon, programs, scenario, check)


def test_daemon_notifies_a_modified_executable_once(notifying_daemon, server, desktop_user,
                                                    sink, known_record, programs):
    changing = known_record[1]

    def scenario(daemon):
        talk(changing, sink.port)  # as known: nothing new, but now watched
        time.sleep(1.5)
        with open(changing, "ab") as program:  # modified in place
            program.write(b"\0modified")
        started = time.monotonic()
        talk(changing, sink.port)  # and it runs again, as the modified program
        return Run(daemon, server, started)

    def check(run):
        with open(changing, "rb") as program:
            new_sha256 = hashlib.sha256(program.read()).hexdigest()
        assert len(run.calls) == 1, run.calls
        call, = run.calls
        assert call["summary"] == "picosnitch: executable changed"
        assert call["body"] == "psn-changing\n%s\nnew sha256 %s…\nmodified outside any package" % (
            changing, new_sha256[:15])
        assert call["at"] - run.started < TOAST_WITHIN
        assert_sent_by_the_desktop_user(call, run, desktop_user)
        assert ", new sha256, psn-changing, %s, %s, modified outside any package\n" % (changing, new_sha256) in \
            run.daemon.paths.exe_log.read_text()

    without_noise(notifying_daemon, programs, scenario, check)


def test_daemon_notifies_a_new_script_and_a_changed_script(notifying_daemon, server, desktop_user, sink,
                                                           programs):
    """The interpreter is known (this very Python); the script it runs is what is new, then changed."""
    script = os.path.join(programs, "psn-script.py")
    client = ("import socket, sys\nsocket.create_connection(('127.0.0.1', int(sys.argv[1]))).sendall(b'x' * 100)\n")

    def scenario(daemon):
        with open(script, "w") as f:
            f.write(client)
        started = time.monotonic()
        subprocess.run([sys.executable, script, str(sink.port)], check=True)
        deadline = time.monotonic() + 15
        while ", new script, " not in (daemon.paths.exe_log.read_text() if daemon.paths.exe_log.exists() else ""):
            assert time.monotonic() < deadline, "the script was never seen"
            time.sleep(0.1)
        time.sleep(WINDOW + SETTLE)  # noticed on its own, not in one burst with its change
        with open(script, "a") as f:
            f.write("# changed\n")
        subprocess.run([sys.executable, script, str(sink.port)], check=True)
        time.sleep(WINDOW + 1)
        return Run(daemon, server, started)

    def check(run):
        with open(script, "rb") as f:
            changed = hashlib.sha256(f.read()).hexdigest()
        new, changed_call = run.about(script)
        assert new["summary"] == "picosnitch: new script" and new["body"].endswith("\n" + script)
        assert changed_call["summary"] == "picosnitch: script changed"
        assert changed_call["body"].endswith("\n%s\nnew sha256 %s…\nmodified outside any package" % (
            script, changed[:15]))
        assert new["at"] - run.started < TOAST_WITHIN
        assert_sent_by_the_desktop_user(new, run, desktop_user)
        log = run.daemon.paths.exe_log.read_text()
        assert ", new script, " in log and ", new script sha256, " in log

    without_noise(notifying_daemon, programs, scenario, check)


def test_daemon_sums_up_a_burst_of_thirty_new_programs(notifying_daemon, server, desktop_user,
                                                       sink, netops, programs):
    burst = [install(netops, programs, "psn-burst-%02d" % i) for i in range(30)]

    def scenario(daemon):
        started = time.monotonic()
        running = [subprocess.Popen([program, "quick", "127.0.0.1", str(sink.port), "100"],
                                    stdout=subprocess.DEVNULL) for program in burst]
        assert [process.wait() for process in running] == [0] * 30
        return Run(daemon, server, started)

    def check(run):
        assert len(run.calls) == 1, run.calls
        call, = run.calls
        assert call["summary"] == "picosnitch: 30 changes", call
        head, tail = call["body"].split("\n")
        listed = head.removeprefix("30 new executables: ").removesuffix(", …").split(", ")
        assert len(listed) == 5 and set(listed) <= {os.path.basename(p) for p in burst}, head
        assert tail == "See picosnitch view or %s" % run.daemon.paths.exe_log
        assert call["at"] - run.started < TOAST_WITHIN
        assert_sent_by_the_desktop_user(call, run, desktop_user)

    without_noise(notifying_daemon, programs, scenario, check)
