"""The VirusTotal process: looks up the hashes the record keeper asks about, uploads if allowed.

Inbox (from the keeper): VtRequest and Stop. Outbox (to the keeper): VtResult for each status
a hash gets (record_keeper.record_result() stores it in record.json and exe.log) and
ErrorReport.

Two processes. The root side only remembers which executables have which hash and, when the
checker asks to upload a hash the keeper asked about, opens that executable and hands over the
descriptor. The checker has become an unprivileged user (`nobody`) and does all the network
work. They talk JSON over a SOCK_SEQPACKET socket pair, so root never unpickles what the
process exposed to the network says:

    root → checker   {"check": sha256}     {"file": sha256} + descriptor, or {"file", "error"}
    checker → root   {"status": sha256, "text": status}   {"open": sha256}   {"error", "key"}
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import signal
import socket
import stat
import time
from multiprocessing.connection import wait
from typing import Optional

from picosnitch import channels
from picosnitch.alerts import desktop_sessions
from picosnitch.alerts.virustotal import DEFAULT_TIMEOUT, PENDING, UNKNOWN, Client, VtError
from picosnitch.installed import install_extra
from picosnitch.messages import ErrorReport, Stop, VtRequest, VtResult
from picosnitch.sanitize import printable

UNPRIVILEGED_USER = "nobody"
RETRY_BASE = 60.0  # first wait after a transient failure; doubles each time
RETRY_MAX = 3600.0
ANALYSIS_WAIT = 120.0  # first wait before asking again about an uploaded file; doubles
RECHECKS = 5  # times a file waiting for analysis is asked about again
FILE_WAIT = 10.0  # seconds the checker waits for the root side to open a file
RESTARTS_ALLOWED = 3  # checker restarts within RESTART_WINDOW
RESTART_WINDOW = 60.0
UPLOADED = "uploaded, " + PENDING
ERROR_KEY = "virustotal"
_SHA256 = re.compile("[0-9a-f]{64}")


def _send(sock: socket.socket, message: dict, fds: tuple[int, ...] = ()) -> None:
    """One JSON message (with descriptors, if any) over the SOCK_SEQPACKET pair."""
    data = json.dumps(message).encode()
    if fds:
        socket.send_fds(sock, [data], list(fds))
    else:
        sock.send(data)


@dataclasses.dataclass
class _Job:
    due: float
    failures: int = 0
    rechecks: int = 0
    uploaded: bool = False


class Checker:
    """The unprivileged side: one job per hash, run in order of when each is due."""

    def __init__(self, sock: socket.socket, client: Client, upload: bool,
                 retry_base: float = RETRY_BASE, analysis_wait: float = ANALYSIS_WAIT) -> None:
        self.sock, self.client, self.upload = sock, client, upload
        self.retry_base, self.analysis_wait = retry_base, analysis_wait
        self.jobs: dict[str, _Job] = {}
        self.files: dict[str, tuple[Optional[int], str]] = {}  # descriptors handed over
        self.refused = False

    def run(self) -> None:
        """Work until the root side closes the socket."""
        while True:
            due = min((job.due for job in self.jobs.values()), default=None)
            timeout = None if due is None else max(due - time.monotonic(), 0)
            if wait([self.sock], timeout) and not self._receive():
                return
            now = time.monotonic()
            for sha256 in [s for s, job in self.jobs.items() if job.due <= now][:1]:
                self._check(sha256)

    def _receive(self) -> bool:
        """Handle one message from the root side; False when it has gone."""
        data, fds, _flags, _address = socket.recv_fds(self.sock, 65536, 1)
        if not data:
            return False
        message = json.loads(data)
        if "check" in message and not self.refused:
            self.jobs.setdefault(message["check"], _Job(time.monotonic()))
        elif "file" in message:
            self.files[message["file"]] = (fds[0] if fds else None, message.get("error", ""))
        return True

    def _status(self, sha256: str, status: str) -> None:
        _send(self.sock, {"status": sha256, "text": status})

    def _report(self, message: str, key: str = ERROR_KEY) -> None:
        _send(self.sock, {"error": message, "key": key})

    def _check(self, sha256: str) -> None:
        job = self.jobs[sha256]
        try:
            status = self.client.lookup(sha256)
            if status == UNKNOWN and job.uploaded:
                status = UPLOADED  # not listed yet
            elif status == UNKNOWN and self.upload:
                self._upload(sha256)
                job.uploaded = True
                status = UPLOADED
        except VtError as error:
            self._failed(sha256, error)
            return
        self._status(sha256, status)
        if status in (PENDING, UPLOADED) and job.rechecks < RECHECKS:
            job.due = time.monotonic() + self.analysis_wait * 2 ** job.rechecks
            job.rechecks += 1
        else:
            del self.jobs[sha256]

    def _failed(self, sha256: str, error: VtError) -> None:
        job = self.jobs[sha256]
        if error.refused:
            self._report("%s; no more VirusTotal lookups until picosnitch restarts" % error)
            self.refused = True
            self.jobs.clear()
        elif error.retry:
            delay = min(self.retry_base * 2 ** job.failures, RETRY_MAX)
            job.failures += 1
            job.due = time.monotonic() + delay
            self._report("VirusTotal lookup of %s failed (%s); trying again in %.0f s" % (
                sha256, error, delay), ERROR_KEY + ": retry")
        else:
            self._status(sha256, "not checked: %s" % error)
            del self.jobs[sha256]

    def _upload(self, sha256: str) -> None:
        """Get the file from the root side, make sure it has this hash, and upload it."""
        _send(self.sock, {"open": sha256})
        deadline = time.monotonic() + FILE_WAIT
        while sha256 not in self.files:
            if not wait([self.sock], max(deadline - time.monotonic(), 0)) or not self._receive():
                raise VtError("the file to upload was not handed over")
        descriptor, problem = self.files.pop(sha256)
        if descriptor is None:
            raise VtError("cannot upload: %s" % problem)
        with os.fdopen(descriptor, "rb") as file:
            digest = hashlib.sha256()
            for chunk in iter(lambda: file.read(1 << 20), b""):
                digest.update(chunk)
            if digest.hexdigest() != sha256:
                raise VtError("cannot upload: the executable changed since it was hashed")
            size = file.tell()
            file.seek(0)
            self.client.upload(file, size)


def _open_regular(path: str) -> int:
    """A read-only descriptor for the regular file at `path` (never blocks on a FIFO)."""
    descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    if not stat.S_ISREG(os.fstat(descriptor).st_mode):
        os.close(descriptor)
        raise OSError("not a regular file")
    return descriptor


class RootSide:
    """Remembers who asked about which hash, starts the checker and answers it."""

    def __init__(self, config, outbox, user: str, timeout: tuple[float, float],
                 retry_base: float, analysis_wait: float) -> None:
        self.config, self.outbox, self.user = config, outbox, user
        self.checker_args = (timeout, retry_base, analysis_wait)
        self.watchers: dict[str, list[tuple[str, str]]] = {}  # sha256 → [(exe, name)]
        self.statuses: dict[str, str] = {}
        self.restarts: list[float] = []
        self.sock, self.pid = self._start()

    def _start(self) -> tuple[socket.socket, int]:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)

        def checker() -> None:
            ours.close()
            desktop_sessions.close_fds_except({theirs.fileno()})
            timeout, retry_base, analysis_wait = self.checker_args
            # Made (and `requests` imported) before becoming the user, who may not be
            # allowed to read where it is installed (a virtualenv under /root, say).
            client = Client(self.config["VT API key"], self.config["VT API URL"],
                            self.config["VT request limit (seconds)"], timeout)
            desktop_sessions.become(desktop_sessions.lookup(self.user))
            Checker(theirs, client, self.config["VT file upload"], retry_base, analysis_wait).run()

        pid = desktop_sessions.fork_child("VirusTotal checker", checker)
        theirs.close()
        for sha256 in self.watchers:
            if sha256 not in self.statuses:
                _send(ours, {"check": sha256})
        return ours, pid

    def request(self, request: VtRequest) -> None:
        """Take a request from the keeper; a hash already being checked is not asked twice."""
        if not _SHA256.fullmatch(request.sha256):
            return
        watchers = self.watchers.setdefault(request.sha256, [])
        who = (request.exe, request.name)
        if who in watchers:
            return
        watchers.append(who)
        if len(watchers) == 1:
            _send(self.sock, {"check": request.sha256})
        elif request.sha256 in self.statuses:
            self.outbox.send(VtResult(*who, request.sha256, self.statuses[request.sha256]))

    def answer(self) -> bool:
        """Handle one message from the checker; False when it is gone and cannot be restarted."""
        data = self.sock.recv(65536)
        if not data:
            return self._restart()
        try:
            message = json.loads(data)
            if "error" in message:
                self.outbox.send(ErrorReport(printable(str(message["error"]), 500),
                                             printable(str(message.get("key")), 60)))
                return True
            sha256 = message.get("status") or message.get("open")
            if sha256 not in self.watchers:
                raise ValueError("unrequested hash")
        except (ValueError, TypeError, AttributeError) as error:
            self.outbox.send(ErrorReport("the VirusTotal checker sent a bad message (%s)"
                                         % printable(str(error), 100), ERROR_KEY))
            return True
        if "status" in message:
            status = printable(str(message.get("text")), 200)
            self.statuses[sha256] = status
            for exe, name in self.watchers[sha256]:
                self.outbox.send(VtResult(exe, name, sha256, status))
        else:
            self._hand_over(sha256)
        return True

    def _hand_over(self, sha256: str) -> None:
        """Open an executable with this hash and pass the descriptor to the checker."""
        problems = []
        for exe, _name in self.watchers[sha256]:
            try:
                descriptor = _open_regular(exe)
            except OSError as error:
                problems.append("%s: %s" % (exe, error.strerror or error))
                continue
            try:
                _send(self.sock, {"file": sha256}, (descriptor,))
            finally:
                os.close(descriptor)
            return
        _send(self.sock, {"file": sha256, "error": "; ".join(problems)})

    def _restart(self) -> bool:
        self.sock.close()
        code = os.waitstatus_to_exitcode(os.waitpid(self.pid, 0)[1])  # -N: killed by signal N
        now = time.monotonic()
        self.restarts = [t for t in self.restarts if now - t < RESTART_WINDOW] + [now]
        if len(self.restarts) > RESTARTS_ALLOWED:
            self.outbox.send(ErrorReport("the VirusTotal checker keeps stopping (status %d); "
                                         "VirusTotal lookups are off" % code, ERROR_KEY))
            return False
        self.outbox.send(ErrorReport("the VirusTotal checker stopped (status %d); restarting it"
                                     % code, ERROR_KEY))
        self.sock, self.pid = self._start()
        return True

    def stop(self) -> None:
        """Close the socket (the checker then exits) and reap the checker."""
        self.sock.close()
        deadline = time.monotonic() + FILE_WAIT
        try:
            reaped = os.waitpid(self.pid, os.WNOHANG) != (0, 0)
        except ChildProcessError:  # reaped when it kept stopping
            return
        while not reaped:
            if time.monotonic() > deadline:
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
                return
            time.sleep(0.05)
            reaped = os.waitpid(self.pid, os.WNOHANG) != (0, 0)


def run(config, inbox, outbox, user: str = UNPRIVILEGED_USER,
        timeout: tuple[float, float] = DEFAULT_TIMEOUT, retry_base: float = RETRY_BASE,
        analysis_wait: float = ANALYSIS_WAIT) -> int:
    """Serve VtRequests from `inbox` until Stop; results and errors go to `outbox`.

    Start it only when "VT API key" is set. When the checker keeps crashing (reported), lookups
    stop but the worker still drains `inbox` until Stop: exiting would make the supervisor
    restart it into the same crash loop, or (status 0) stop the daemon.
    """
    channels.ends_on_stop()  # ends on Stop from the keeper
    try:
        import requests  # noqa: F401 - the checker's HTTP client, imported here only to know
    except ImportError:
        outbox.send(ErrorReport("VirusTotal lookups need the Python package requests (install it "
                                "with: %s); they are off" % install_extra("virustotal"), ERROR_KEY))
        return _drain_until_stop(inbox)
    root = RootSide(config, outbox, user, timeout, retry_base, analysis_wait)
    checking = True
    try:
        while True:
            for source in channels.wait([inbox, root.sock] if checking else [inbox], None, [outbox]):
                if source is root.sock:
                    checking = root.answer()
                    continue
                try:
                    message = inbox.recv()
                except EOFError:
                    return 0
                if isinstance(message, Stop):
                    return 0
                if isinstance(message, VtRequest) and checking:
                    root.request(message)
    finally:
        root.stop()


def _drain_until_stop(inbox) -> int:
    """Read and drop requests until Stop (or the keeper is gone), as a worker with nothing to do."""
    while True:
        try:
            if isinstance(inbox.recv(), Stop):
                return 0
        except EOFError:
            return 0
