"""The outlet process: the event stream and the metrics, for whoever is not at the desktop.

Inbox (from the keeper): what the keeper saw new (lists of NewThing), Alerts, ErrorReports
(losses and hooks left out become events; every one is counted), Traffic (the baseline worker's
totals) and Stop. Outbox (to the keeper): ErrorReports.

Two processes, as for VirusTotal. The root side writes events.log (one JSON line per event,
alerts.events) and the metrics textfile for node_exporter, and keeps the metrics. The sender
has become an unprivileged user (`picosnitch`, else `nobody`) and does the network work: it
stores each event in the outbox (a disk queue it owns) and delivers it to every receiver
(delivery), and serves the metrics on a loopback port. They talk JSON lines over a socket pair,
so root never unpickles what the process exposed to the network says:

    root → sender   {"event": {...}}   {"metrics": "exposition text"}
    sender → root   {"stats": {receiver: {...}}}   {"error": sentence, "key": key}

The root side never waits for the sender: what it cannot write at once is kept (up to
BUFFER_LIMIT bytes, else the oldest events are dropped and counted) and written when the
socket takes it, also to a sender restarted after a crash.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from collections import deque
from multiprocessing.connection import wait
from pathlib import Path
from typing import Optional

from picosnitch import channels
from picosnitch.alerts import delivery, desktop_sessions
from picosnitch.alerts import events as event_stream
from picosnitch.alerts.metrics import Metrics
from picosnitch.alerts.outbox import Outbox
from picosnitch.alerts.record_keeper import NewThing, append_lines, write_atomically
from picosnitch.messages import Alert, ErrorReport, Stop, Traffic
from picosnitch.sanitize import printable
from picosnitch.unprivileged import drop_privileges

FINISH_TIMEOUT = 5.0  # seconds at exit to hand the keeper the last reports
METRICS_EVERY = 2.0  # seconds between renderings of the metrics (textfile, HTTP)
STATS_EVERY = 1.0  # seconds between the sender's reports of its receivers
BUFFER_LIMIT = 16 << 20  # bytes held for a sender that does not read
PENDING_LIMIT = 10_000  # events the sender holds while the outbox cannot store them
STOP_DRAIN = 2.0  # seconds the sender's receivers get to finish at Stop
LINE_LIMIT = 1 << 20  # longest line the root side reads from the sender
RESTARTS_ALLOWED, RESTART_WINDOW = 3, 60.0
KEY = "outlet"


# ---- the sender (unprivileged) ----

class SenderSide:
    """Reads the root side's lines, stores events, runs the receivers' threads."""

    def __init__(self, sock: socket.socket, config, outbox: Optional[Outbox], receivers: list,
                 metrics: Optional[delivery.MetricsServer]) -> None:
        self.sock, self.outbox, self.metrics = sock, outbox, metrics
        self.stop = threading.Event()
        self.lock = threading.Lock()  # the socket is written by the receivers' threads too
        self.pending: deque[dict] = deque()
        self.said_full = False
        self.lost = 0
        self.senders = [delivery.Sender(r, outbox, self.report, self.stop, config["Webhook backoff (seconds)"])
                        for r in receivers] if outbox else []

    def send(self, message: dict) -> None:
        with self.lock:
            self.sock.sendall((json.dumps(message) + "\n").encode())

    def report(self, message: str, key: str) -> None:
        self.send({"error": message, "key": key})

    def run(self) -> None:
        for sender in self.senders:
            sender.start()
        buffer = b""
        next_stats = time.monotonic()
        try:
            while True:
                timeout = max(next_stats - time.monotonic(), 0)
                if wait([self.sock], timeout):
                    data = self.sock.recv(1 << 16)
                    if not data:
                        return
                    buffer += data
                    *lines, buffer = buffer.split(b"\n")
                    self._handle([json.loads(line) for line in lines if line])
                if time.monotonic() >= next_stats:
                    next_stats = time.monotonic() + STATS_EVERY
                    self._store()
                    self.send({"stats": self.stats()})
        finally:
            self.stop.set()
            for sender in self.senders:
                sender.join(STOP_DRAIN)
            if self.metrics:
                self.metrics.close()

    def _handle(self, messages: list[dict]) -> None:
        for message in messages:
            if "event" in message and self.outbox is not None:
                self.pending.append(message["event"])
                if len(self.pending) > PENDING_LIMIT:
                    self.pending.popleft()
                    self.lost += 1
            elif "metrics" in message and self.metrics is not None:
                self.metrics.text = message["metrics"]
        self._store()

    def _store(self) -> None:
        """Put what is pending in the outbox; while the disk refuses, keep it and say so once."""
        if not self.pending or self.outbox is None:
            return
        try:
            self.outbox.append(list(self.pending))
        except OSError as error:
            if not self.said_full:
                self.report(f"events for delivery cannot be stored in {self.outbox.directory} "
                            f"({error.strerror or error}); up to {PENDING_LIMIT} wait in memory", KEY + ":store")
                self.said_full = True
            return
        self.pending.clear()
        if self.said_full:
            self.report(f"events for delivery are stored again ({self.lost} were dropped meanwhile)",
                        KEY + ":store")
            self.said_full, self.lost = False, 0

    def stats(self) -> dict:
        found = {}
        for sender in self.senders:
            name = sender.receiver.name
            assert self.outbox is not None
            found[name] = dict(sender.stats, waiting=self.outbox.waiting(name) + len(self.pending),
                               dropped=self.outbox.dropped[name])
        return found


def _sender_main(sock: socket.socket, config, directory: Path) -> None:
    """The forked sender: become the unprivileged user, open the outbox, serve the root side."""
    desktop_sessions.close_fds_except({sock.fileno()})
    receivers = delivery.receivers(config)
    if config["Metrics address"] or any(isinstance(r, delivery.HttpReceiver) for r in receivers):
        delivery.load_http()
    drop_privileges(directory)
    outbox = Outbox(directory, config["Webhook queue (MB)"] << 20, [r.name for r in receivers]) if receivers else None
    side = SenderSide(sock, config, outbox, receivers, None)
    side.metrics = delivery.open_metrics_server(config["Metrics address"], side.report)
    side.run()


# ---- the root side ----

class RootSide:
    """Events to events.log and the sender; the metrics, to the textfile and the sender."""

    def __init__(self, config, paths, report) -> None:
        self.config, self.paths, self.report = config, paths, report
        self.metrics = Metrics()
        self.event_log = paths.event_log if config["Event log"] else None
        self.textfile = config["Metrics textfile"]
        self.needs_sender = bool(delivery.receivers(config) or config["Metrics address"])
        self.out = bytearray()
        self.queued: deque[int] = deque()  # the length of each event line in `out`, for dropping
        self.dropped = 0
        self.restarts: list[float] = []
        self.said: set[str] = set()
        self.sock: Optional[socket.socket] = None
        self.pid = 0
        self.lines = b""
        if self.needs_sender:
            self._start()

    def _start(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)

        def sender() -> None:
            ours.close()
            _sender_main(theirs, self.config, self.paths.outbox)

        pid = desktop_sessions.fork_child("outlet sender", sender)
        theirs.close()
        ours.setblocking(False)
        self.sock, self.pid, self.lines = ours, pid, b""

    # -- from the keeper --

    def handle(self, message) -> None:
        if isinstance(message, list):
            self._emit(event_stream.for_new_things(t for t in message if isinstance(t, NewThing)))
        elif isinstance(message, Alert):
            self.metrics.alerts[message.kind] += 1
            self._emit([event_stream.for_alert(message)])
        elif isinstance(message, ErrorReport):
            self._count(message)
            event = event_stream.for_error(message)
            if event:
                self._emit([event])
        elif isinstance(message, Traffic):
            self.metrics.traffic = {key: list(values) for key, values in message.totals.items()}
            self.metrics.baseline = dict(message.programs)

    def _count(self, report: ErrorReport) -> None:
        key = report.key or ""
        self.metrics.errors += 1
        if key.startswith("loss:"):
            self.metrics.lost[key[len("loss:"):]] += report.count
        elif key.startswith("degraded:"):
            self.metrics.degraded.add(key[len("degraded:"):])
        elif key.startswith("restart:"):
            self.metrics.restarts[key[len("restart:"):]] += 1

    def _emit(self, found: list[dict]) -> None:
        if not found:
            return
        for event in found:
            self.metrics.events[event["kind"]] += 1
        if self.event_log:
            try:
                append_lines(self.event_log, [event_stream.json_line(e) for e in found])
            except OSError as error:
                self._say_once(f"cannot write {self.event_log}: {error.strerror or error}", KEY + ":event log")
        if self.needs_sender:
            for event in found:
                self._queue({"event": event})

    def _say_once(self, message: str, key: str) -> None:
        if key not in self.said:
            self.said.add(key)
            self.report(message, key)

    # -- to the sender --

    def _queue(self, message: dict, is_event: bool = True) -> None:
        line = (json.dumps(message, ensure_ascii=True) + "\n").encode("ascii")
        self.out += line
        self.queued.append(len(line) if is_event else -len(line))
        while len(self.out) > BUFFER_LIMIT and self.queued:
            size = self.queued.popleft()
            del self.out[:abs(size)]
            self.dropped += size > 0
        self.flush()

    def flush(self) -> None:
        """Write what the socket takes now."""
        if self.sock is None or not self.out:
            return
        try:
            sent = self.sock.send(self.out)
        except BlockingIOError:
            return
        except OSError:  # the sender is gone: its end-of-file restarts it
            return
        del self.out[:sent]
        while self.queued and sent >= abs(self.queued[0]):
            sent -= abs(self.queued.popleft())
        if self.queued and sent:
            size = self.queued[0]
            self.queued[0] = (abs(size) - sent) * (1 if size > 0 else -1)
        if self.dropped:
            self.report(f"{self.dropped} events for delivery were dropped: the sender did not take them",
                        KEY + ":dropped")
            self.dropped = 0

    # -- from the sender --

    def read(self) -> bool:
        """Take what the sender wrote; False when it has gone and may not be started again."""
        assert self.sock is not None
        try:
            data = self.sock.recv(1 << 16)
        except BlockingIOError:
            return True
        except OSError:  # reset: the sender died
            data = b""
        if not data:
            return self._restart()
        self.lines += data
        *complete, self.lines = self.lines.split(b"\n")
        if len(self.lines) > LINE_LIMIT:
            self.lines = b""
        for line in complete:
            self._answer(line)
        return True

    def _answer(self, line: bytes) -> None:
        try:
            message = json.loads(line)
            if "error" in message:
                self.report(printable(str(message["error"]), 500), printable(str(message.get("key")), 60))
            elif "stats" in message:
                self.metrics.receivers = {printable(str(name), 60): {field: int(value) for field, value in stats.items()}
                                          for name, stats in message["stats"].items()}
        except (ValueError, TypeError, AttributeError) as error:
            self.report("the outlet sender sent a bad message (%s)" % printable(str(error), 100), KEY)

    def _restart(self) -> bool:
        assert self.sock is not None
        self.sock.close()
        self.sock = None
        code = os.waitstatus_to_exitcode(os.waitpid(self.pid, 0)[1])
        now = time.monotonic()
        self.restarts = [t for t in self.restarts if now - t < RESTART_WINDOW] + [now]
        if len(self.restarts) > RESTARTS_ALLOWED:
            self.report("the outlet sender keeps stopping (status %d); webhooks, syslog and the metrics "
                        "endpoint are off until picosnitch restarts" % code, KEY)
            return False
        self.report("the outlet sender stopped (status %d); restarting it" % code, KEY)
        self._start()
        self.flush()
        return True

    # -- the metrics --

    def render_metrics(self) -> None:
        self.metrics.sql_backlog = _directory_size(self.paths.sql_backlog)
        text = self.metrics.render()
        if self.textfile:
            try:
                write_atomically(self.textfile, text.encode("utf-8"))
                self.said.discard(KEY + ":textfile")
            except OSError as error:
                self._say_once(f"cannot write the metrics to {self.textfile}: {error.strerror or error}",
                               KEY + ":textfile")
        if self.config["Metrics address"]:
            self._queue({"metrics": text}, is_event=False)

    def stop(self) -> None:
        """Hand the sender what is left (a few seconds at most), close the socket, reap it."""
        deadline = time.monotonic() + STOP_DRAIN
        while self.sock is not None and self.out and time.monotonic() < deadline:
            wait([self.sock], 0.05)  # the socket is never waited on for writing: poll
            self.flush()
        if self.sock is None:
            return
        self.sock.close()
        deadline = time.monotonic() + STOP_DRAIN + 3
        while os.waitpid(self.pid, os.WNOHANG) == (0, 0):
            if time.monotonic() > deadline:
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
                return
            time.sleep(0.05)


def _directory_size(directory: Path) -> int:
    try:
        return sum(entry.stat().st_size for entry in directory.iterdir() if entry.is_file())
    except OSError:
        return 0


def run(config, paths, inbox, report) -> int:
    """Serves `inbox` until Stop; problems go to `report` (the keeper) as ErrorReports."""
    channels.ends_on_stop()  # ends on Stop from the keeper
    root = RootSide(config, paths, lambda message, key: report.send(ErrorReport(message, key)))
    metrics_on = bool(config["Metrics textfile"] or config["Metrics address"])
    next_metrics = time.monotonic()
    try:
        while True:
            sources = [inbox] + ([root.sock] if root.sock is not None else [])
            timeout = 0.2 if root.out else (max(next_metrics - time.monotonic(), 0) if metrics_on else None)
            for source in channels.wait(sources, timeout, [report]):
                if source is root.sock:
                    if not root.read():
                        root.needs_sender = False
                    continue
                try:
                    message = inbox.recv()
                except EOFError:
                    return 0
                if isinstance(message, Stop):
                    if metrics_on:
                        root.render_metrics()
                    return 0
                root.handle(message)
            root.flush()
            if metrics_on and time.monotonic() >= next_metrics:
                next_metrics = time.monotonic() + METRICS_EVERY
                root.render_metrics()
    finally:
        root.stop()
        report.finish(FINISH_TIMEOUT)
