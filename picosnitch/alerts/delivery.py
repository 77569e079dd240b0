"""Sending events to receivers (a generic webhook, ntfy, Gotify, a syslog socket) and serving
the metrics over HTTP: the network side of the outlet worker, which runs it unprivileged.

Each receiver has a thread of its own that takes the events from the outbox in order and tries
each until the receiver accepts it, waiting between tries 1 s, then twice as long each time, up
to "Webhook backoff (seconds)". So a receiver that is down or slow holds up nobody but itself,
and what it has not taken waits on disk. An answer that says the event itself is wrong (HTTP 400,
413, 422, or a datagram too long for the socket) would be the same at every try: that event is
skipped and reported. Each outage is reported once when it starts and once when it ends.

Everything the sender needs is imported before it becomes a user who may not be allowed to read
where Python's libraries are (a virtual environment under /root, say): HTTP (http.client,
http.server, ssl: 2.7 MiB of the supervisor's RSS, measured) by load_http(), and only when a
receiver or the metrics use it, so that the daemon's other processes, which share what the
supervisor imported, do not carry it.
"""

from __future__ import annotations

import encodings.idna  # noqa: F401 - http.client needs it for host names, after the user may not read it
import errno
import os
import socket
import threading
import urllib.parse
from typing import TYPE_CHECKING, Callable, Optional

from picosnitch.alerts import events
from picosnitch.alerts.outbox import Outbox
from picosnitch.sanitize import printable

if TYPE_CHECKING:
    import http.client

HTTP_TIMEOUT = 10.0
DEFAULT_SYSLOG = "/dev/log"  # left out where it does not exist: no syslog there, not an outage
REJECTED_STATUSES = {400, 413, 422}
FIRST_BACKOFF = 1.0

Report = Callable[[str, str], None]  # (message, key) for error.log


class DeliveryError(Exception):
    """The receiver did not take the event now; another try may work. str() is one sentence."""


class Rejected(Exception):
    """The receiver refused this event for what it is; trying again would not help."""


class HttpReceiver:
    """A webhook: `build(event, url, token)` gives the request (events.webhook_request, ...)."""

    def __init__(self, name: str, url: str, token: str, build, kinds: frozenset[str]) -> None:
        self.name, self.url, self.token, self.build, self.kinds = name, url, token, build, kinds

    def accepts(self, event: dict) -> bool:
        return event.get("kind") in self.kinds

    def send(self, event: dict) -> None:
        url, headers, body = self.build(event, self.url, self.token)
        import http.client  # noqa: PLC0415 - load_http() has: what the daemon's other processes need not share
        import ssl  # noqa: PLC0415

        parts = urllib.parse.urlsplit(url)
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        connection: http.client.HTTPConnection
        if parts.scheme == "https":
            connection = http.client.HTTPSConnection(parts.netloc, timeout=HTTP_TIMEOUT,
                                                     context=ssl.create_default_context())
        else:
            connection = http.client.HTTPConnection(parts.netloc, timeout=HTTP_TIMEOUT)
        try:
            connection.request("POST", path, body=body, headers=headers)
            response = connection.getresponse()
            response.read(65536)
        except (OSError, http.client.HTTPException) as error:
            raise DeliveryError(printable(str(error) or type(error).__name__, 200)) from None
        finally:
            connection.close()
        if response.status in REJECTED_STATUSES:
            raise Rejected(f"HTTP {response.status} {printable(response.reason, 100)}")
        if not 200 <= response.status < 300:
            raise DeliveryError(f"HTTP {response.status} {printable(response.reason, 100)}")


class SyslogReceiver:
    """RFC 5424 messages on a unix datagram socket (/dev/log: journald or a syslog daemon)."""

    name = "syslog"

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.settimeout(HTTP_TIMEOUT)

    def accepts(self, event: dict) -> bool:
        return True

    def send(self, event: dict) -> None:
        try:
            self.sock.sendto(events.syslog_message(event, os.getpid()), self.path)
        except OSError as error:
            if error.errno == errno.EMSGSIZE:
                raise Rejected("too long for the socket") from None
            raise DeliveryError(printable(error.strerror or str(error), 200)) from None


class Sender(threading.Thread):
    """Delivers what the outbox holds for one receiver, in order, until `stop` is set."""

    def __init__(self, receiver, outbox: Outbox, report: Report, stop: threading.Event,
                 longest_backoff: float) -> None:
        super().__init__(name=f"deliver-{receiver.name}", daemon=True)
        self.receiver, self.outbox, self.report, self.stop = receiver, outbox, report, stop
        self.longest_backoff = longest_backoff
        self.stats = {"delivered": 0, "failed": 0, "up": 1}
        self.backoff = 0.0

    def run(self) -> None:
        while not self.stop.is_set():
            found = self.outbox.peek(self.receiver.name)
            if found is None:
                self.outbox.wait(1.0)
                continue
            entry, event = found
            if self.receiver.accepts(event) and not self._deliver(event):
                self.stop.wait(self.backoff)
                continue
            self.outbox.done(self.receiver.name, entry)

    def _deliver(self, event: dict) -> bool:
        """Whether the event is done with (taken, or refused for good)."""
        name = self.receiver.name
        try:
            self.receiver.send(event)
        except Rejected as error:
            self.stats["failed"] += 1
            self.report(f"{name} refused an event ({error}); it is skipped", f"deliver:{name}:rejected")
            return True
        except DeliveryError as error:
            self.stats["failed"] += 1
            if self.stats["up"]:
                self.report(f"{name} cannot be reached ({error}); events wait on disk and are sent "
                            "when it can", f"deliver:{name}")
            self.stats["up"] = 0
            self.backoff = min(max(self.backoff * 2, FIRST_BACKOFF), self.longest_backoff)
            return False
        if not self.stats["up"]:
            self.report(f"{name} accepts events again", f"deliver:{name}:again")
        self.stats["delivered"] += 1
        self.stats["up"] = 1
        self.backoff = 0.0
        return True


class MetricsServer:
    """GET /metrics on a loopback address, answering the latest exposition `text`."""

    def __init__(self, address: str) -> None:
        import http.server  # noqa: PLC0415 - load_http() has

        host, _, port = address.rpartition(":")
        host = host.strip("[]")
        if host == "localhost":
            host = "127.0.0.1"
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the name http.server calls
                if urllib.parse.urlsplit(self.path).path != "/metrics":
                    self.send_error(404)
                    return
                body = owner.text.encode("utf-8")
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args) -> None:  # noqa: A002 - http.server's name
                pass

        class Server(http.server.ThreadingHTTPServer):
            address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
            daemon_threads = True

        self.text = ""
        self.server = Server((host, int(port)), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, name="metrics", daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def load_http() -> None:
    """Imports what webhooks and the metrics server need, while the Python library can be read."""
    import http.client  # noqa: F401, PLC0415
    import http.server  # noqa: F401, PLC0415
    import ssl  # noqa: F401, PLC0415


def receivers(config) -> list:
    """The receivers config.json names, each with its own name (the outbox's cursor)."""
    kinds = frozenset(config["Webhook events"])
    found: list = []
    for name, key, build in (("webhook", "Webhook", events.webhook_request),
                             ("ntfy", "ntfy", events.ntfy_request),
                             ("gotify", "Gotify", events.gotify_request)):
        if config[f"{key} URL"]:
            found.append(HttpReceiver(name, config[f"{key} URL"], config[f"{key} token"], build, kinds))
    path = config["Syslog socket"]
    if path and (path != DEFAULT_SYSLOG or os.path.exists(path)):
        found.append(SyslogReceiver(path))
    return found


def open_metrics_server(address: str, report: Report) -> Optional[MetricsServer]:
    if not address:
        return None
    try:
        return MetricsServer(address)
    except OSError as error:
        report(f"the metrics cannot be served on {address}: {error.strerror or error}", "metrics")
        return None
