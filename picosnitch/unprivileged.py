"""Becoming the unprivileged user a worker that talks to other machines runs as.

The remote SQL writer and the delivery of events (webhooks, syslog, metrics) parse what the
network sends them, so they run as `picosnitch` when that system user exists, else `nobody`.
Each keeps a queue on disk, in a directory of its own that it must be able to write once it has
become that user: it is made (or taken over) first, then the process changes user for good.
"""

from __future__ import annotations

import os
import pwd
from pathlib import Path

USERS = ("picosnitch", "nobody")


def drop_privileges(directory: Path) -> str:
    """Become the unprivileged user, after making `directory` (a queue) its own.

    Returns the user name. Without root, only makes sure the directory exists.
    """
    if os.geteuid() != 0:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        return pwd.getpwuid(os.geteuid()).pw_name
    for name in USERS:
        try:
            user = pwd.getpwnam(name)
            break
        except KeyError:
            continue
    else:
        raise RuntimeError("neither of the users %s exists" % " nor ".join(USERS))
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        os.fchown(fd, user.pw_uid, user.pw_gid)
        os.fchmod(fd, 0o700)
        for entry in os.listdir(fd):  # left by another user (e.g. picosnitch created since)
            os.chown(entry, user.pw_uid, user.pw_gid, dir_fd=fd, follow_symlinks=False)
    finally:
        os.close(fd)
    os.setgroups([])
    os.setgid(user.pw_gid)
    os.setuid(user.pw_uid)
    return user.pw_name
