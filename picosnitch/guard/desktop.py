"""Guard prompts as desktop notifications with actions: Allow once, Allow always, Deny.

As for the notifier (notifier_worker), the root side never speaks D-Bus: for each desktop user
a child that has become that user talks to the user's session bus. The root side sends it the
open prompts (pickled, root to child); the child answers only with JSON text naming a prompt
id and one of the three actions, which the guard checks like any other answer. The child takes
ActionInvoked signals only from the owner of org.freedesktop.Notifications, so another program
of the user cannot answer by sending the signal itself.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import time
from collections import deque
from multiprocessing.connection import Connection
from typing import Callable, Dict

from picosnitch import parent_death
from picosnitch.alerts import notifier_worker
from picosnitch.alerts.desktop_sessions import DesktopUser
from picosnitch.sanitize import printable

NOTIFICATIONS = "org.freedesktop.Notifications"
PATH = "/org/freedesktop/Notifications"
ACTIONS = {"allow-once": ("allow", "once"), "allow-always": ("allow", "forever"), "deny": ("deny", "once")}
ACTION_LIST = ["allow-once", "Allow once", "allow-always", "Allow always", "deny", "Deny"]


def text(prompt: dict) -> tuple:
    """(summary, body) of a prompt's notification."""
    p = prompt
    port = p["rport"] if p["direction"] == "out" else p["lport"]
    name = os.path.basename(p["exe"]) if p["exe"].startswith("/") else p["exe"]
    arrow = "to" if p["direction"] == "out" else "from"
    where = p["domain"] or p["raddr"]
    summary = "picosnitch: %s %s %s port %s?" % (name, "connects" if p["direction"] == "out" else "accepts a "
                                                 "connection", "%s %s" % (arrow, where), port)
    lines = [
        "program: %s (pid %s, user %s)" % (p["exe"], p["pid"] or "?", p.get("user", p["uid"])),
        "sha256: %s… (%s)" % (p["sha256"][:16], p.get("sha256_state", "")),
        "command: %s" % p["cmdline"],
        "parent: %s %s" % (p["parent"], p["parent_cmdline"]),
        "name: %s (%s)" % (p["domain"] or "(none)", p.get("domain_source", "")),
        "address: %s port %s %s%s" % (p["raddr"], port, p["protocol"],
                                       (" [%s]" % p["country"]) if p.get("country") else ""),
    ]
    return printable(summary, 200), "\n".join(printable(line, 300) for line in lines)


def _serve(user: DesktopUser, inbox: Connection, answers: Connection, guard_pid: int) -> None:
    """The child: show each open prompt once, close those that went, pass on actions. It ends
    when the guard goes (its pipe closes, or it dies) or the session bus does."""
    parent_death.signal_when_parent_dies(guard_pid, signal.SIGKILL)
    from jeepney import DBusAddress, HeaderFields, MatchRule, message_bus, new_method_call
    from jeepney.io.blocking import open_dbus_connection
    from jeepney.wrappers import unwrap_msg
    conn = open_dbus_connection(bus=user.bus_address, auth_timeout=notifier_worker.CHILD_TIMEOUT)
    target = DBusAddress(PATH, bus_name=NOTIFICATIONS, interface=NOTIFICATIONS)
    signals: deque = deque()
    rule = MatchRule(type="signal", interface=NOTIFICATIONS, member="ActionInvoked", path=PATH)
    shown: Dict[int, int] = {}  # notification id -> prompt id
    by_prompt: Dict[int, int] = {}

    def call(method, signature=None, body=()):
        return unwrap_msg(conn.send_and_get_reply(new_method_call(target, method, signature, body),
                                                  timeout=notifier_worker.CHILD_TIMEOUT))

    with conn.filter(rule, queue=signals, bufsize=1000):
        unwrap_msg(conn.send_and_get_reply(message_bus.AddMatch(rule), timeout=notifier_worker.CHILD_TIMEOUT))
        owner, = unwrap_msg(conn.send_and_get_reply(message_bus.GetNameOwner(NOTIFICATIONS),
                                                    timeout=notifier_worker.CHILD_TIMEOUT))
        while True:
            while signals:
                message = signals.popleft()
                if message.header.fields.get(HeaderFields.sender) != owner:
                    continue  # not from the notification server
                notification, action = message.body[:2]
                if notification in shown and action in ACTIONS:
                    answers.send_bytes(json.dumps({"id": shown[notification], "action": action}).encode())
            ready = select.select([inbox.fileno(), conn.sock.fileno()], [], [], None)[0]
            if inbox.fileno() in ready:
                try:
                    prompts = inbox.recv()
                except EOFError:
                    return
                open_ids = {p["id"] for p in prompts}
                for prompt in prompts:
                    if prompt["id"] not in by_prompt:
                        summary, body = text(prompt)
                        timeout_ms = max(int((prompt["deadline"] - time.time()) * 1000), 1000)
                        notification, = call("Notify", "susssasa{sv}i",
                                             ("picosnitch", 0, "dialog-question", summary, body, ACTION_LIST,
                                              {"urgency": ("y", 2)}, timeout_ms))
                        shown[notification], by_prompt[prompt["id"]] = prompt["id"], notification
                for prompt_id in [i for i in by_prompt if i not in open_ids]:
                    notification = by_prompt.pop(prompt_id)
                    shown.pop(notification, None)
                    try:
                        call("CloseNotification", "u", (notification,))
                    except Exception:
                        pass
            if conn.sock.fileno() in ready:
                if not conn.sock.recv(1, socket.MSG_PEEK):
                    return  # the bus went away
                # Every message already read (the filter puts ours in `signals`).
                timeout = 0.05
                while True:
                    try:
                        conn.recv_messages(timeout=timeout)
                    except (TimeoutError, BlockingIOError):
                        break
                    timeout = 0.001


class Child:
    def __init__(self, user: DesktopUser):
        self.user = user
        prompts_in, prompts_out = os.pipe()
        answers_in, answers_out = os.pipe()
        inbox = Connection(prompts_in, writable=False)
        answers = Connection(answers_out, readable=False)
        guard_pid = os.getpid()
        self.pid = notifier_worker.fork_as(user, {prompts_in, answers_out},
                                            lambda: _serve(user, inbox, answers, guard_pid))
        inbox.close()
        answers.close()
        self.prompts = Connection(prompts_out, readable=False)
        self.answers = Connection(answers_in, writable=False)

    def close(self) -> None:
        self.prompts.close()
        self.answers.close()
        try:
            os.kill(self.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        os.waitpid(self.pid, 0)


class DesktopPrompts:
    """The guard's side: one child per desktop user; show() sends each the open prompts."""

    def __init__(self, config, report: Callable[..., None]):
        if not notifier_worker.load_jeepney():
            raise RuntimeError("they need jeepney (the [notify] extra, or Debian's python3-jeepney)")
        self.report = report
        # Who gets them: the notifier's own choice ("Desktop notification users", else logind).
        self.sessions = notifier_worker.Desktops(config, lambda message, key: report("desktop prompts: " + message,
                                                                                     "guard: " + key),
                                                 notifier_worker.JEEPNEY)
        self.children: Dict[int, Child] = {}

    def show(self, prompts: list) -> None:
        self.last = prompts
        users = self.sessions.users() if prompts or self.children else []
        for uid in set(self.children) - {u.uid for u in users}:
            self.children.pop(uid).close()
        for user in users:
            for _attempt in (1, 2):
                child = self.children.get(user.uid)
                if child is None:
                    child = self.children[user.uid] = Child(user)
                try:
                    child.prompts.send(prompts)
                    break
                except OSError:
                    self.children.pop(user.uid).close()

    def sources(self) -> list:
        return [c.answers for c in self.children.values()]

    def read(self, source: Connection) -> list:
        """The answers a child sent, as guard answers ({"id", "action", "duration"})."""
        child = next(c for c in self.children.values() if c.answers is source)
        try:
            raw = json.loads(source.recv_bytes(4096))
            action, duration = ACTIONS[raw["action"]]
            return [{"type": "answer", "id": int(raw["id"]), "action": action, "duration": duration}]
        except (EOFError, OSError):
            self.children.pop(child.user.uid).close()
        except (ValueError, KeyError, TypeError):
            self.report("desktop prompts: user %s's child sent nonsense" % printable(child.user.name))
        return []

    def close(self) -> None:
        for child in self.children.values():
            child.close()
        self.children.clear()
