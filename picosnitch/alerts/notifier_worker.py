"""The notifier process: desktop notifications for what is new, VirusTotal warnings and errors.

Its inbox (from the record keeper) carries lists of NewThing, ErrorReport, VtResult and Stop.
This process stays root only to start, for each desktop user, a child that has become that user
(desktop_sessions.become) and talks to the user's session bus; the root side never speaks
D-Bus. Even asking logind who is logged in is done by a child that has become `nobody`.
Children get plain Notices (pickled, root to child) and answer only with JSON text, so nothing
a user's process sends is ever unpickled by root.

Timing: the first change after a quiet spell waits SETTLE seconds for company, then goes out
(one notice each, or one summary for a burst, see notification_text.coalesce); changes in the
following WINDOW seconds are held and sent together when it ends. Errors: the first of a
window is shown, the rest counted and shown as a count at its end. VirusTotal warnings are
never held.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import time
from multiprocessing.connection import Connection
from typing import Callable, Optional, Sequence, cast

from picosnitch import channels
from picosnitch.alerts import desktop_sessions, notification_text
from picosnitch.alerts.desktop_sessions import DesktopUser
from picosnitch.alerts.notification_text import Notice
from picosnitch.alerts.virustotal import is_flagged
from picosnitch.installed import install_extra
from picosnitch.messages import Alert, ErrorReport, Stop, VtResult
from picosnitch.sanitize import printable

SETTLE = 1.0
WINDOW = 30.0
ERROR_WINDOW = 300.0
USERS_REFRESH = 30.0  # seconds a logind answer is trusted
CHILD_TIMEOUT = 10.0
KEY = "desktop notifications"  # error keys start with it; such errors are never shown as notices
UNPRIVILEGED_USER = "nobody"
NOTIFICATIONS = "org.freedesktop.Notifications"
JEEPNEY, NOTIFY_SEND = "jeepney", "notify-send"


def load_jeepney() -> bool:
    """Import every part of jeepney the children use, now, while still root; False without it.

    A child that has become a user may not be allowed to read the directory picosnitch's
    dependencies are installed in (a virtualenv under /root, say), so it must find them loaded.
    """
    try:
        import jeepney  # noqa: F401
        import jeepney.io.blocking  # noqa: F401
        import jeepney.wrappers  # noqa: F401
        return True
    except ImportError:
        return False


def choose_method() -> Optional[str]:
    """JEEPNEY when it can be imported, else NOTIFY_SEND when installed, else None."""
    if load_jeepney():
        return JEEPNEY
    return NOTIFY_SEND if shutil.which("notify-send") else None


class BurstGate:
    """Holds new things (or alerts) so that those arriving close together are shown together."""

    def __init__(self, settle: float = SETTLE, window: float = WINDOW) -> None:
        self.settle, self.window = settle, window
        self.pending: list = []
        self.deadline: Optional[float] = None

    def add(self, things: list, now: float) -> None:
        self.pending += things
        if self.deadline is None and things:
            self.deadline = now + self.settle

    def due(self, now: float) -> list:
        """What to show now (often nothing); starts or ends the holding window."""
        if self.deadline is None or now < self.deadline:
            return []
        things, self.pending = self.pending, []
        self.deadline = now + self.window if things else None
        return things


class ErrorGate:
    """Lets one error notice out per window and counts the ones held back."""

    def __init__(self, window: float = ERROR_WINDOW) -> None:
        self.window = window
        self.held = 0
        self.deadline: Optional[float] = None

    def add(self, now: float) -> bool:
        """Whether this error may be shown now (else it is counted)."""
        if self.deadline is None:
            self.deadline = now + self.window
            return True
        self.held += 1
        return False

    def due(self, now: float) -> int:
        """The number of errors held back, once their window has ended (else 0)."""
        if self.deadline is None or now < self.deadline:
            return 0
        held, self.held = self.held, 0
        self.deadline = now + self.window if held else None
        return held


class DBusSender:
    """Sends notices to one session bus with jeepney, reconnecting once when it fails."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.connection = None
        self.markup = False

    def __call__(self, notice: Notice) -> None:
        for attempt in (1, 2):
            try:
                self._notify(notice)
                return
            except Exception:
                if self.connection is not None:
                    self.connection.close()
                    self.connection = None
                if attempt == 2:
                    raise

    def _call(self, method: str, signature: Optional[str] = None, body: tuple = ()):
        assert self.connection is not None, "opened by the caller"
        from jeepney import DBusAddress, new_method_call
        from jeepney.wrappers import unwrap_msg
        target = DBusAddress("/org/freedesktop/Notifications", bus_name=NOTIFICATIONS,
                             interface=NOTIFICATIONS)
        return unwrap_msg(self.connection.send_and_get_reply(
            new_method_call(target, method, signature, body), timeout=CHILD_TIMEOUT))

    def _notify(self, notice: Notice) -> None:
        if self.connection is None:
            from jeepney.io.blocking import open_dbus_connection
            self.connection = open_dbus_connection(bus=self.address, auth_timeout=CHILD_TIMEOUT)
            capabilities, = self._call("GetCapabilities")
            self.markup = "body-markup" in capabilities
        body = notification_text.markup_escape(notice.body) if self.markup else notice.body
        self._call("Notify", "susssasa{sv}i", ("picosnitch", 0, "dialog-information",
                                               notice.summary, body, [], {}, -1))


def notify_send(notice: Notice) -> None:
    """Sends one notice with the notify-send program (to $DBUS_SESSION_BUS_ADDRESS)."""
    subprocess.run(["notify-send", "--app-name=picosnitch", "--icon=dialog-information", "--",
                    notice.summary, notification_text.markup_escape(notice.body)],
                   check=True, capture_output=True, timeout=CHILD_TIMEOUT)


def fork_as(user: DesktopUser, keep: set[int], body: Callable[[], None]) -> int:
    """Fork a child that closes all other descriptors, becomes `user` and runs `body`."""
    pid = os.fork()
    if pid:
        return pid
    status = 1
    try:
        desktop_sessions.close_fds_except(keep)
        desktop_sessions.become(user)
        body()
        status = 0
    except BaseException as error:  # the child must never return into the parent's code
        os.write(2, ("picosnitch notifier child: %s\n" % printable(repr(error))).encode())
    finally:
        os._exit(status)


def _serve_user(user: DesktopUser, inbox: Connection, answers: Connection, method: str) -> None:
    """A user's child: send each notice it gets, answering failures as JSON text."""
    os.environ["DBUS_SESSION_BUS_ADDRESS"] = user.bus_address
    send = DBusSender(user.bus_address) if method == JEEPNEY else notify_send
    while True:
        try:
            notices = inbox.recv()
        except EOFError:
            return
        for notice in notices:
            try:
                send(notice)
            except Exception as error:
                answers.send_bytes(json.dumps(str(error) or repr(error)).encode())


def ask_logind_unprivileged() -> list[int]:
    """graphical_session_uids(), asked by a child that has become `nobody`.

    Raises OSError with the child's reason when it could not answer.
    """
    load_jeepney()  # nobody may not be able to import it
    reader, writer = os.pipe()

    def answer() -> None:
        try:
            reply: dict[str, object] = {"uids": desktop_sessions.graphical_session_uids()}
        except Exception as error:
            reply = {"error": str(error) or repr(error)}
        os.write(writer, json.dumps(reply).encode())

    pid = fork_as(desktop_sessions.lookup(UNPRIVILEGED_USER), {writer}, answer)
    os.close(writer)
    try:
        data = b""
        deadline = time.monotonic() + CHILD_TIMEOUT
        while select.select([reader], [], [], max(deadline - time.monotonic(), 0))[0]:
            chunk = os.read(reader, 65536)
            if not chunk:
                break
            data += chunk
    finally:
        os.close(reader)
        os.kill(pid, signal.SIGKILL)  # harmless if it has exited; a hung child must not stay
        os.waitpid(pid, 0)
    try:
        reply = json.loads(data)
        if isinstance(reply.get("uids"), list) and all(type(uid) is int for uid in reply["uids"]):
            return reply["uids"]
        problem = reply["error"]
    except (ValueError, KeyError, TypeError, AttributeError):
        problem = "no answer"
    raise OSError("cannot ask logind for graphical sessions: %s" % printable(str(problem), 200))


class UserChild:
    """The process sending one user's notices: its pid and both ends the root side holds."""

    def __init__(self, user: DesktopUser, method: str) -> None:
        self.user = user
        notices_in, notices_out = os.pipe()
        answers_in, answers_out = os.pipe()
        inbox = Connection(notices_in, writable=False)
        answers = Connection(answers_out, readable=False)
        self.pid = fork_as(user, {notices_in, answers_out},
                            lambda: _serve_user(user, inbox, answers, method))
        inbox.close()
        answers.close()
        self.notices = Connection(notices_out, readable=False)
        self.answers = Connection(answers_in, writable=False)

    def close(self) -> None:
        """Let the child finish what it was sent, then reap it (killing it if it hangs)."""
        self.notices.close()
        deadline = time.monotonic() + CHILD_TIMEOUT
        while os.waitpid(self.pid, os.WNOHANG) == (0, 0):
            if time.monotonic() > deadline:
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
                break
            time.sleep(0.05)
        self.answers.close()


class Desktops:
    """Delivers notices to every desktop user, through one child per user."""

    def __init__(self, config, report: Callable[[str, str], None],
                 method: Optional[str]) -> None:
        self.configured = desktop_sessions.configured_users(config)
        self.report = report
        self.method = method
        self.children: dict[int, UserChild] = {}
        self._users: list[DesktopUser] = []
        self._asked: Optional[float] = None
        self._said_no_session = False

    def users(self) -> list[DesktopUser]:
        """The users to notify now: the configured ones, else logind's (asked at most every
        USERS_REFRESH seconds)."""
        now = time.monotonic()
        if self._asked is not None and now - self._asked < USERS_REFRESH:
            return self._users
        self._asked = now
        wanted: Sequence[str | int] = self.configured
        if not wanted:
            try:
                wanted = ask_logind_unprivileged()
            except (OSError, KeyError) as error:
                self.report(str(error), KEY + ": logind")
                wanted = []
        self._users = []
        for entry in wanted:
            try:
                self._users.append(desktop_sessions.lookup(entry))
            except KeyError:
                self.report("%s: no user %s on this system" % (KEY, printable(str(entry))),
                            KEY + ": user")
        return self._users

    def deliver(self, notices: list[Notice]) -> None:
        """Send `notices` to each desktop user; with nobody logged in, say so once."""
        if not notices:
            return
        if self.method is None:
            self.report("%s need jeepney (install it with: %s) or notify-send"
                        % (KEY, install_extra("notify")), KEY)
            return
        users = self.users()
        if not users:
            if not self._said_no_session:
                self.report("%s skipped: no active graphical session" % KEY, KEY + ": session")
                self._said_no_session = True
            return
        self._said_no_session = False
        for uid in set(self.children) - {user.uid for user in users}:
            self.children.pop(uid).close()
        for user in users:
            for _attempt in (1, 2):  # a child that died is replaced once
                child = self.children.get(user.uid)
                if child is None:
                    child = self.children[user.uid] = UserChild(user, self.method)
                try:
                    child.notices.send(notices)
                    break
                except OSError:
                    self.children.pop(user.uid).close()

    def read_answer(self, connection: Connection) -> None:
        """Pass on a child's failure report; a closed one means the child is gone."""
        child = next(c for c in self.children.values() if c.answers is connection)
        try:
            problem = json.loads(connection.recv_bytes(65536))
        except (EOFError, OSError, ValueError):
            self.children.pop(child.user.uid).close()
            return
        self.report("%s for user %s failed: %s" % (KEY, printable(child.user.name),
                                                    printable(str(problem), 300)), KEY)

    def close(self) -> None:
        for child in self.children.values():
            child.close()
        self.children.clear()


def run(config, paths, inbox, report, method: Optional[str] = "auto",
        settle: float = SETTLE, window: float = WINDOW, error_window: float = ERROR_WINDOW) -> int:
    """Serves `inbox` until Stop; failures go to `report` (the keeper) as ErrorReports.

    `method` is JEEPNEY, NOTIFY_SEND or "auto" (choose_method()). With "Desktop notifications"
    false everything received is dropped.
    """
    channels.ends_on_stop()  # ends on Stop from the keeper
    enabled = config["Desktop notifications"]
    method = choose_method() if method == "auto" else method
    if method == JEEPNEY:
        load_jeepney()
    desktops = Desktops(config, lambda message, key: report.send(ErrorReport(message, key)), method)
    bursts, errors = BurstGate(settle, window), ErrorGate(error_window)
    alerts = BurstGate(settle, window)
    exe_log, error_log, alert_log = str(paths.exe_log), str(paths.error_log), str(paths.alert_log)
    try:
        while True:
            deadlines = [d for d in (bursts.deadline, errors.deadline, alerts.deadline) if d is not None]
            timeout = max(min(deadlines) - time.monotonic(), 0) if deadlines else None
            for source in channels.wait([inbox] + [c.answers for c in desktops.children.values()],
                                        timeout, [report]):
                if source is not inbox:
                    desktops.read_answer(cast(Connection, source))
                    continue
                try:
                    message = cast(Connection, inbox).recv()
                except EOFError:
                    return 0
                now = time.monotonic()
                if isinstance(message, Stop):
                    if enabled:  # what is held goes out now
                        desktops.deliver(notification_text.coalesce(
                            notification_text.group(bursts.pending), exe_log))
                        desktops.deliver(notification_text.coalesce_alerts(alerts.pending, alert_log))
                    return 0
                if not enabled:
                    continue
                if isinstance(message, list):
                    bursts.add(message, now)
                elif isinstance(message, Alert):
                    alerts.add([message], now)
                elif isinstance(message, VtResult) and is_flagged(message.status):
                    desktops.deliver([notification_text.for_verdict(
                        message.exe, message.name, message.sha256, message.status)])
                elif (isinstance(message, ErrorReport) and not (message.key or "").startswith(KEY)
                      and errors.add(now)):
                    desktops.deliver([notification_text.for_error(message.message, error_log)])
            now = time.monotonic()
            desktops.deliver(notification_text.coalesce(
                notification_text.group(bursts.due(now)), exe_log))
            desktops.deliver(notification_text.coalesce_alerts(alerts.due(now), alert_log))
            held = errors.due(now)
            if held:
                desktops.deliver([notification_text.for_more_errors(held, error_log)])
    finally:
        desktops.close()
