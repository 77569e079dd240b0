"""Real receivers on loopback for the event stream: HTTP servers that speak ntfy's and Gotify's
publishing APIs as their documentation gives them, a generic webhook, and a syslog socket.

Each can be taken down (its port refuses connections) and brought back on the same port, or made
slow (it waits before it answers), so the tests can show that a receiver that is down or slow
loses nothing and holds up no one else.
"""

import http.server
import json
import os
import re
import shutil
import socket
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path

NTFY_TOPIC = re.compile(r"/([-_A-Za-z0-9]{1,64})")
NTFY_PRIORITIES = {"1": 1, "min": 1, "2": 2, "low": 2, "3": 3, "default": 3, "4": 4, "high": 4, "5": 5,
                   "max": 5, "urgent": 5}


def shared_tempdir(prefix: str) -> Path:
    """A directory other users can traverse (the outlet's sender runs as nobody)."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    path.chmod(0o755)
    return path


def _header(headers, *names):
    """The first of several names a server accepts for one header (ntfy takes X-Title, Title, t...)."""
    return next((headers[name] for name in names if headers.get(name) is not None), None)


class Receiver:
    """An HTTP server on 127.0.0.1; `received` holds what each accepted request carried."""

    def __init__(self, token: str = ""):
        self.token = token
        self.received: list = []
        self.arrived: list = []  # time.monotonic() of each accepted request, beside `received`
        self.requests = 0  # every request, accepted or not
        self.delay = 0.0
        self.lock = threading.Lock()
        self.server = None
        self.port = 0
        self.up()

    def handle(self, request) -> tuple:
        """(status, JSON answer) for one POST; subclasses speak their API."""
        raise NotImplementedError

    def up(self) -> None:
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with owner.lock:
                    owner.requests += 1
                time.sleep(owner.delay)
                status, answer = owner.handle(self, body)
                if 200 <= status < 300:
                    owner.arrived.append(time.monotonic())
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_PUT = do_POST  # noqa: N815 - ntfy takes PUT too

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def down(self) -> None:
        """Stop listening: connections to the port are refused until up()."""
        self.server.shutdown()
        self.server.server_close()

    def wait_for(self, count: int, timeout: float = 30.0) -> list:
        deadline = time.monotonic() + timeout
        while len(self.received) < count:
            assert time.monotonic() < deadline, f"{type(self).__name__} got {len(self.received)} of {count}"
            time.sleep(0.05)
        return self.received

    def _bearer_ok(self, request) -> bool:
        return not self.token or request.headers.get("Authorization") == f"Bearer {self.token}"


class NtfyServer(Receiver):
    """ntfy's publish: POST or PUT /<topic> with the message as the body; title, priority and tags
    in headers (X-Title/Title/t, X-Priority/Priority/p, X-Tags/Tags/ta); an access token as a
    bearer token. Answers the message as JSON, as ntfy does."""

    def handle(self, request, body):
        topic = NTFY_TOPIC.fullmatch(urllib.parse.urlsplit(request.path).path)
        if not topic:
            return 404, {"code": 40401, "http": 404, "error": "page not found"}
        if not self._bearer_ok(request):
            return 401, {"code": 40101, "http": 401, "error": "unauthorized"}
        priority = _header(request.headers, "X-Priority", "Priority", "prio", "p") or "3"
        if priority.lower() not in NTFY_PRIORITIES:
            return 400, {"code": 40007, "http": 400, "error": "invalid priority"}
        tags = _header(request.headers, "X-Tags", "Tags", "tag", "ta")
        message = {"id": os.urandom(6).hex(), "time": int(time.time()), "event": "message",
                   "topic": topic.group(1), "message": body.decode("utf-8"),
                   "title": _header(request.headers, "X-Title", "Title", "ti", "t") or "",
                   "priority": NTFY_PRIORITIES[priority.lower()], "tags": tags.split(",") if tags else []}
        with self.lock:
            self.received.append(message)
        return 200, message


class GotifyServer(Receiver):
    """Gotify's POST /message: the application token in X-Gotify-Key (or ?token=, or a bearer
    token), a JSON body whose `message` is required, `title`, `priority` and `extras` optional.
    Answers the stored message, as Gotify does; 401 without a valid token."""

    def handle(self, request, body):
        parts = urllib.parse.urlsplit(request.path)
        if parts.path != "/message":
            return 404, {"error": "Not Found", "errorCode": 404, "errorDescription": "page not found"}
        token = (request.headers.get("X-Gotify-Key") or urllib.parse.parse_qs(parts.query).get("token", [""])[0]
                 or (request.headers.get("Authorization") or "").removeprefix("Bearer "))
        if token != self.token:
            return 401, {"error": "Unauthorized", "errorCode": 401,
                         "errorDescription": "you need to provide a valid access token or user credentials to "
                                             "access this api"}
        try:
            sent = json.loads(body)
            assert isinstance(sent.get("message"), str) and sent["message"]
        except (ValueError, AssertionError, AttributeError):
            return 400, {"error": "Bad Request", "errorCode": 400, "errorDescription": "Field 'message' is required"}
        message = {"id": len(self.received) + 1, "appid": 1, "message": sent["message"],
                   "title": sent.get("title", ""), "priority": sent.get("priority", 0),
                   "extras": sent.get("extras"), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        with self.lock:
            self.received.append(message)
        return 200, message


class WebhookServer(Receiver):
    """A generic receiver: any path, a JSON body, an optional bearer token."""

    def handle(self, request, body):
        if not self._bearer_ok(request):
            return 401, {"error": "unauthorized"}
        if request.headers.get("Content-Type") != "application/json":
            return 415, {"error": "JSON only"}
        with self.lock:
            self.received.append(json.loads(body))
        return 204, {}


# RFC 5424: <PRI>VERSION SP TIMESTAMP SP HOSTNAME SP APP-NAME SP PROCID SP MSGID SP SD [SP MSG]
SYSLOG = re.compile(rb"<(?P<pri>\d{1,3})>1 (?P<time>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d{1,6})?(?:Z|[+-]\d\d:\d\d)) "
                    rb"(?P<host>[!-~]{1,255}) (?P<app>[!-~]{1,48}) (?P<pid>[!-~]{1,128}) (?P<msgid>[!-~]{1,32}) "
                    rb"(?P<sd>-|\[.*?\]) (?P<msg>.*)", re.S)


class SyslogSocket:
    """A unix datagram socket anyone may send to, as /dev/log is; `messages` holds what arrived
    (the fields of each RFC 5424 message, or None for one that is not)."""

    def __init__(self):
        self.directory = shared_tempdir("picosnitch-syslog-")
        self.path = str(self.directory / "log")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        os.chmod(self.path, 0o666)
        self.messages: list = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        while True:
            try:
                data = self.sock.recv(1 << 16)
            except OSError:
                return
            match = SYSLOG.fullmatch(data)
            self.messages.append(match.groupdict() if match else None)

    def wait_for(self, count: int, timeout: float = 30.0) -> list:
        deadline = time.monotonic() + timeout
        while len(self.messages) < count:
            assert time.monotonic() < deadline, f"syslog got {len(self.messages)} of {count}"
            time.sleep(0.05)
        return self.messages

    def close(self):
        self.sock.close()
        shutil.rmtree(self.directory, ignore_errors=True)
