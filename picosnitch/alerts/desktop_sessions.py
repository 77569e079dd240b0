"""Which users get desktop notifications, and becoming one of them.

By default the users are those with an active, local, graphical (x11 or wayland) session, as
systemd-logind reports on the system bus; the config key "Desktop notification users" (user
names or uids) replaces that list. A user's notifications go to their session bus at
/run/user/UID/bus, reached from a process that has become that user (become()), since a
session bus only lets its own user in and picosnitch never speaks D-Bus as root.
"""

from __future__ import annotations

import dataclasses
import os
import pwd
from typing import Callable, Iterable, Union

from picosnitch.sanitize import printable

USERS_KEY = "Desktop notification users"
GRAPHICAL_TYPES = ("x11", "wayland")
LOGIND = "org.freedesktop.login1"


@dataclasses.dataclass(frozen=True)
class DesktopUser:
    """A user account as the notifier needs it."""

    uid: int
    gid: int
    name: str
    home: str

    @property
    def runtime_dir(self) -> str:
        return "/run/user/%d" % self.uid

    @property
    def bus_address(self) -> str:
        """The D-Bus address of this user's session bus."""
        return "unix:path=%s/bus" % self.runtime_dir


def lookup(user: Union[str, int]) -> DesktopUser:
    """The account with this name or uid; KeyError when there is none."""
    entry = pwd.getpwuid(user) if isinstance(user, int) else pwd.getpwnam(user)
    return DesktopUser(entry.pw_uid, entry.pw_gid, entry.pw_name, entry.pw_dir)


def configured_users(config) -> list[Union[str, int]]:
    """The names and uids the config lists ([] means: ask logind)."""
    return list(config[USERS_KEY])


def graphical_session_uids(bus: str = "SYSTEM", timeout: float = 5.0) -> list[int]:
    """Uids with an active local x11/wayland session, asking logind over the system bus.

    `bus` is a D-Bus address, or "SYSTEM" for the system bus ($DBUS_SYSTEM_BUS_ADDRESS or
    /run/dbus/system_bus_socket). Raises ImportError without jeepney, OSError or
    jeepney's DBusErrorResponse when logind cannot be asked.
    """
    from jeepney import DBusAddress, Properties, new_method_call
    from jeepney.io.blocking import open_dbus_connection
    from jeepney.wrappers import unwrap_msg

    manager = DBusAddress("/org/freedesktop/login1", bus_name=LOGIND,
                          interface=LOGIND + ".Manager")
    uids = []
    with open_dbus_connection(bus=bus, auth_timeout=timeout) as connection:
        sessions, = unwrap_msg(connection.send_and_get_reply(
            new_method_call(manager, "ListSessions"), timeout=timeout))
        for _session_id, uid, _user, _seat, path in sessions:
            session = DBusAddress(path, bus_name=LOGIND, interface=LOGIND + ".Session")
            reply, = unwrap_msg(connection.send_and_get_reply(Properties(session).get_all(),
                                                              timeout=timeout))
            properties = {key: value for key, (_signature, value) in reply.items()}
            if (properties.get("Type") in GRAPHICAL_TYPES and properties.get("Active") is True
                    and properties.get("Remote") is False and uid not in uids):
                uids.append(uid)
    return uids


def close_fds_except(keep: Iterable[int]) -> None:
    """Close every file descriptor above stderr but `keep`.

    A forked child that is about to become another user must not keep the parent's pipes: the
    other ends belong to root processes that trust what comes through them.
    """
    keep = set(keep)
    for name in os.listdir("/proc/self/fd"):
        descriptor = int(name)
        if descriptor > 2 and descriptor not in keep:
            try:
                os.close(descriptor)
            except OSError:  # the directory listing's own descriptor, already closed
                pass


def fork_child(what: str, body: Callable[[], None]) -> int:
    """Fork a child that runs `body` and exits: status 0, or 1 after saying on stderr, as `what`,
    what stopped it. It never returns into the parent's code. The parent gets its pid."""
    pid = os.fork()
    if pid:
        return pid
    status = 1
    try:
        body()
        status = 0
    except BaseException as error:
        os.write(2, ("picosnitch %s: %s\n" % (what, printable(repr(error)))).encode())
    finally:
        os._exit(status)


def become(user: DesktopUser) -> None:
    """Irrevocably switch this (root) process to `user`: groups, gid, then uid, all of them.

    Also points HOME, USER and XDG_RUNTIME_DIR at the user's, and the working directory at /.
    """
    os.setgroups(os.getgrouplist(user.name, user.gid))
    os.setresgid(user.gid, user.gid, user.gid)
    os.setresuid(user.uid, user.uid, user.uid)
    if os.getresuid() != (user.uid,) * 3 or os.getresgid() != (user.gid,) * 3:
        raise PermissionError("could not become user %s" % user.name)
    os.chdir("/")
    os.environ.update(HOME=user.home, USER=user.name, LOGNAME=user.name,
                      XDG_RUNTIME_DIR=user.runtime_dir)
