"""Runs `picosnitch dash` (the real command, as a subprocess) and talks HTTP to it."""

import http.client
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlencode

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class DashServer:
    """`picosnitch dash ARGS` under PICOSNITCH_PREFIX=prefix, bound to 127.0.0.1 on a free port."""

    def __init__(self, prefix, host: str = "127.0.0.1", token: str = "", env: dict = None,
                 args: tuple = ()):
        self.host, self.port = host, free_port()
        self.env = dict(os.environ, PICOSNITCH_PREFIX=str(prefix), HOST=host, PORT=str(self.port),
                        PYTHONPATH=str(REPO), **(env or {}))
        self.env.pop("PICOSNITCH_DASH_TOKEN", None)
        if token:
            self.env["PICOSNITCH_DASH_TOKEN"] = token
        self.env.pop("SUDO_UID", None)
        self.proc = subprocess.Popen([sys.executable, "-m", "picosnitch", "dash", *args],
                                     env=self.env, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.banner = self.proc.stdout.readline()
        if "http://" not in self.banner:
            self.proc.kill()
            raise AssertionError(f"dash did not start: {self.banner}{self.proc.stderr.read()}")
        self.url = self.banner.split()[2]
        deadline = time.monotonic() + 20
        while True:  # the URL is printed just before uvicorn binds
            try:
                socket.create_connection((host, self.port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise AssertionError(f"dash does not listen: {self.proc.stderr.read()}")
                time.sleep(0.05)

    def request(self, path: str, method: str = "GET", host_header: str = None,
                headers: dict = None):
        """(status, headers dict with lower-case names, body bytes)."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=30)
        all_headers = {"Host": host_header or f"{self.host}:{self.port}", **(headers or {})}
        conn.request(method, path, headers=all_headers)
        response = conn.getresponse()
        body = response.read()
        conn.close()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, body

    def api(self, name: str, params=(), **kwargs):
        """The JSON of /api/<name>?params (a dict or a list of pairs); fails unless 200."""
        status, _, body = self.request(f"/api/{name}?{urlencode(params)}", **kwargs)
        assert status == 200, (status, body)
        return json.loads(body)

    def close(self) -> str:
        """Stops the server; returns what it wrote on stderr."""
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        errors = self.proc.stderr.read()
        self.proc.stdout.close()
        self.proc.stderr.close()
        return errors
