"""Guard prompts as desktop notifications with actions, over a private D-Bus, answered by the
notification server's ActionInvoked signal as a desktop would."""

import multiprocessing
import os
import time
from collections import deque

import pytest

pytest.importorskip("jeepney")
from guard_harness import PYTHON, GuardRun, client, peer_lab  # noqa: E402
from jeepney import DBusAddress, HeaderFields, MatchRule, message_bus, new_error, new_method_return, new_signal  # noqa: E402
from jeepney.io.blocking import open_dbus_connection  # noqa: E402
from jeepney.wrappers import unwrap_msg  # noqa: E402
from netlab import PEER4  # noqa: E402
from test_notifications import desktop_user  # noqa: E402,F401  (a fixture)

_ctx = multiprocessing.get_context("fork")
PATH = "/org/freedesktop/Notifications"


def serve(user, calls, clicks, also_forge=False):
    """A notification server as `user`: records Notify calls, clicks an action when told (the
    ActionInvoked signal, from the server's own connection)."""
    os.setgroups([])
    os.setresgid(user.gid, user.gid, user.gid)
    os.setresuid(user.uid, user.uid, user.uid)
    connection = open_dbus_connection(bus=user.bus_address)
    forger = open_dbus_connection(bus=user.bus_address)  # another program of the same user
    incoming = deque()
    with connection.filter(MatchRule(type="method_call"), queue=incoming, bufsize=100):
        unwrap_msg(connection.send_and_get_reply(message_bus.RequestName("org.freedesktop.Notifications")))
        calls.put("ready")
        serial = 0
        while True:
            try:
                message = connection.recv_until_filtered(incoming, timeout=0.1)
            except TimeoutError:
                while not clicks.empty():
                    notification, action, forged = clicks.get()
                    signal = new_signal(DBusAddress(PATH, interface="org.freedesktop.Notifications"),
                                        "ActionInvoked", "us", (notification, action))
                    (forger if forged else connection).send(signal)
                continue
            member = message.header.fields[HeaderFields.member]
            if member == "Notify":
                serial += 1
                calls.put({"member": "Notify", "id": serial, "body": list(message.body)})
                connection.send(new_method_return(message, "u", (serial,)))
            elif member == "CloseNotification":
                calls.put({"member": "CloseNotification", "id": message.body[0]})
                connection.send(new_method_return(message))
            elif member == "GetCapabilities":
                connection.send(new_method_return(message, "as", (["body", "actions"],)))
            else:
                connection.send(new_error(message, "org.freedesktop.DBus.Error.UnknownMethod"))


@pytest.fixture
def lab(lab):
    yield from peer_lab(lab, [PEER4])


def next_call(calls, member, timeout=10):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        call = calls.get(timeout=max(deadline - time.monotonic(), 0.01))
        if call["member"] == member:
            return call
    raise AssertionError("no %s call" % member)


def test_notification_actions_answer_prompts_and_forged_signals_do_not(lab, tmp_path, desktop_user):  # noqa: F811
    calls, clicks = _ctx.Queue(), _ctx.Queue()
    server = _ctx.Process(target=serve, args=(desktop_user, calls, clicks), daemon=True)
    server.start()
    assert calls.get(timeout=10) == "ready"
    port = lab.peer.ports[PEER4]
    try:
        with GuardRun(tmp_path, lab, "", **{"Desktop notifications": True,
                                             "Desktop notification users": [desktop_user.name]}) as guard:
            proc = client("tcp", PEER4, port, timeout=30, wait=False)
            shown = next_call(calls, "Notify")
            app, _replaces, _icon, summary, body, actions, hints, timeout = shown["body"]
            assert app == "picosnitch" and summary == f"picosnitch: python3.11 connects to {PEER4} port {port}?"
            assert f"program: {PYTHON} (pid {proc.pid}, user root)" in body and "new executable" in body
            assert f"address: {PEER4} port {port} tcp" in body
            assert actions == ["allow-once", "Allow once", "allow-always", "Allow always", "deny", "Deny"]
            clicks.put((shown["id"], "allow-always", True))  # forged by another program: ignored
            time.sleep(1.0)
            assert proc.poll() is None
            clicks.put((shown["id"], "allow-always", False))
            assert proc.communicate(timeout=20)[0].strip() == "ok hi"
            assert guard.paths.rules.read_text() == f"allow out exe {PYTHON} addr {PEER4} port {port} proto tcp\n"
            assert next_call(calls, "CloseNotification")["id"] == shown["id"]
            guard.set_rules("")
            proc = client("udp", PEER4, port, timeout=30, wait=False)
            shown = next_call(calls, "Notify")
            clicks.put((shown["id"], "deny", False))
            assert proc.communicate(timeout=20)[0].strip() == "refused"
            assert guard.paths.rules.read_text() == ""
    finally:
        server.kill()
        server.join()
