"""The live feed behind `picosnitch top`: current send/receive rates on a UNIX socket.

The daemon runs `run()` as a worker. It receives the Connections the identity worker produces
(lists, about twice a second), sums their bytes per (exe, name, pexe, pname, uid), and once a
second sends every connected client one JSON line:

    {"time": 1700000000.0, "interval": 1.0,
     "rates": [{"exe": ..., "name": ..., "pexe": ..., "pname": ..., "uid": 1000,
                "send": 1234.5, "recv": 0.0}, ...]}

`send`/`recv` are bytes per second over `interval` seconds (the time since the previous line);
only identities with traffic in that interval are listed. Strings are picosnitch's lossless
surrogateescape'd str; JSON's \\udcXX escapes carry them, so json.loads gives them back exactly.

The socket is `paths.live_socket`, mode 0660, owned by root and by the group named in
config.json's "Live feed group" ("" keeps it to root). A client that does not keep up (its
socket buffer full) is disconnected rather than allowed to slow the daemon.
"""

from __future__ import annotations

import grp
import json
import os
import socket
import stat
import time
from pathlib import Path
from typing import Optional

from picosnitch import channels
from picosnitch.messages import ErrorReport, Stop

FRAME_INTERVAL = 1.0
SOCKET_MODE = 0o660
MAX_CLIENTS = 64
KEY_FIELDS = ("exe", "name", "pexe", "pname", "uid")


class LiveFeedError(Exception):
    """The feed cannot be served or read; str() is one sentence for the user or error.log."""


class RateMeter:
    """Sums the bytes of Connections per identity between two frames."""

    def __init__(self, now: Optional[float] = None):
        self._since = time.monotonic() if now is None else now
        self._bytes: dict[tuple, list[int]] = {}

    def add(self, connections) -> None:
        """Count a list of picosnitch.connection.Connection."""
        for c in connections:
            i = c.identity
            key = (i.process.exe, i.process.name, i.parent.exe, i.parent.name, i.uid)
            total = self._bytes.setdefault(key, [0, 0])
            total[0] += c.send
            total[1] += c.recv

    def frame(self, now: Optional[float] = None) -> dict:
        """The rates since the previous frame (or creation), and start counting afresh."""
        now = time.monotonic() if now is None else now
        interval = max(now - self._since, 1e-3)
        rates = [dict(zip(KEY_FIELDS, key), send=sent / interval, recv=received / interval)
                 for key, (sent, received) in self._bytes.items() if sent or received]
        rates.sort(key=lambda r: r["send"] + r["recv"], reverse=True)
        self._since = now
        self._bytes = {}
        return {"time": time.time(), "interval": interval, "rates": rates}


def group_id(name: str) -> int:
    """The gid of group `name` ("" is root's group 0)."""
    if not name:
        return 0
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise LiveFeedError(f'"Live feed group" names a group that does not exist: {name!r}; '
                            "the live feed stays readable by root only") from None


class LiveFeedServer:
    """The listening socket and its clients."""

    def __init__(self, path: str | os.PathLike, gid: int = 0):
        self.path = Path(path)
        self._remove_stale()
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)  # never reachable by others, even before the chmod
        try:
            self.listener.bind(str(self.path))
        finally:
            os.umask(old_umask)
        os.chown(self.path, 0 if os.geteuid() == 0 else -1, gid if os.geteuid() == 0 else -1)
        os.chmod(self.path, SOCKET_MODE)
        self.listener.listen(16)
        self.listener.setblocking(False)
        self.clients: list[socket.socket] = []

    def _remove_stale(self) -> None:
        """Remove a socket left by a daemon that did not stop cleanly (never another file)."""
        try:
            if stat.S_ISSOCK(os.lstat(self.path).st_mode):
                os.unlink(self.path)
        except FileNotFoundError:
            pass

    def fileno(self) -> int:
        return self.listener.fileno()

    def accept(self) -> None:
        """Take every waiting client (beyond MAX_CLIENTS, new ones are closed at once)."""
        while True:
            try:
                client, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            if len(self.clients) >= MAX_CLIENTS:
                client.close()
                continue
            client.setblocking(False)
            client.shutdown(socket.SHUT_RD)
            self.clients.append(client)

    def broadcast(self, frame: dict) -> None:
        """Send one JSON line to every client; drop those that cannot take it whole."""
        line = (json.dumps(frame, separators=(",", ":")) + "\n").encode("ascii")
        kept = []
        for client in self.clients:
            try:
                if client.send(line) == len(line):
                    kept.append(client)
                    continue
            except OSError:
                pass
            client.close()  # gone, or too slow: a partial line would corrupt its stream
        self.clients = kept

    def close(self) -> None:
        for client in self.clients:
            client.close()
        self.listener.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def run(config, paths, inbox, to_keeper=None) -> int:
    """Worker: serve the feed from the Connections arriving on `inbox` until a Stop.

    `to_keeper` (optional) receives an ErrorReport when the group or socket is unusable; the
    worker then still drains `inbox`, so the identity worker never blocks on it.
    """
    channels.ends_on_stop()  # ends on Stop, like the other workers

    def report(message: str) -> None:
        if to_keeper is not None:
            to_keeper.send(ErrorReport(message, "live-feed"))

    try:
        gid = group_id(config["Live feed group"])
    except LiveFeedError as exc:
        report(str(exc))
        gid = 0
    try:
        server = LiveFeedServer(paths.live_socket, gid)
    except OSError as exc:
        report(f"picosnitch top will not work: cannot create {paths.live_socket}: {exc}")
        server = None
    meter = RateMeter()
    next_frame = time.monotonic() + FRAME_INTERVAL
    try:
        while True:
            sources = [inbox] + ([server] if server else [])
            for source in channels.wait(sources, max(next_frame - time.monotonic(), 0),
                                        [to_keeper] if to_keeper is not None else []):
                if server is not None and source is server:
                    server.accept()
                    continue
                message = inbox.recv()
                if isinstance(message, Stop):
                    return 0
                meter.add(message)
            if time.monotonic() >= next_frame:
                next_frame = time.monotonic() + FRAME_INTERVAL
                frame = meter.frame()
                if server:
                    server.broadcast(frame)
    finally:
        if server:
            server.close()


# ---- the client side (picosnitch top) ----

def _who_may_read(path: Path) -> str:
    try:
        gid = os.stat(path).st_gid
    except OSError:
        return "root and the group named by \"Live feed group\" in config.json"
    if gid == 0:
        return 'only root: set "Live feed group" in config.json to a group you are in'
    try:
        name = grp.getgrgid(gid).gr_name
    except KeyError:
        name = str(gid)
    return f"root and the group {name!r} (\"Live feed group\" in config.json)"


def connect(path: str | os.PathLike, timeout: float = 5.0) -> socket.socket:
    """A socket connected to the feed; LiveFeedError with a plain sentence when it cannot be."""
    path = Path(path)
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.settimeout(timeout)
    try:
        client.connect(str(path))
    except (FileNotFoundError, ConnectionRefusedError):
        client.close()
        raise LiveFeedError(f"picosnitch is not running (no live feed at {path}); "
                            "start it with `sudo picosnitch start`") from None
    except PermissionError:
        client.close()
        raise LiveFeedError(f"cannot read the live feed {path}: permission denied; it is "
                            f"readable by {_who_may_read(path)}") from None
    except OSError as exc:
        client.close()
        raise LiveFeedError(f"cannot connect to the live feed {path}: {exc.strerror}") from None
    client.shutdown(socket.SHUT_WR)
    return client


class FeedClient:
    """A connection to the feed that hands out whole frames without blocking."""

    def __init__(self, path: str | os.PathLike):
        self.socket = connect(path)
        self.socket.setblocking(False)
        self._buffer = b""
        self.closed = False

    def fileno(self) -> int:
        return self.socket.fileno()

    def read(self) -> list[dict]:
        """The frames that have arrived (maybe none); sets `closed` when the daemon hung up."""
        found = []
        while not self.closed:
            try:
                chunk = self.socket.recv(65536)
            except BlockingIOError:
                break
            except OSError:
                chunk = b""
            if not chunk:
                self.closed = True
                break
            self._buffer += chunk
            *lines, self._buffer = self._buffer.split(b"\n")
            found += [json.loads(line) for line in lines]
        return found

    def close(self) -> None:
        self.socket.close()
