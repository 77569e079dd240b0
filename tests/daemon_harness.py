"""Runs the real daemon (`picosnitch start-no-daemon`) under a private PICOSNITCH_PREFIX."""

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

from picosnitch.paths import Paths
from picosnitch.store.sqlite import decode_text

REPO = Path(__file__).resolve().parent.parent
# In a kernel-matrix guest (qemu without KVM) everything runs about ten times slower: so do waits.
SLOWDOWN = 10 if os.environ.get("PICOSNITCH_IN_GUEST") else 1


class Daemon:
    """A daemon in its own prefix. `settings` override config.json keys (write limit 1 s by default;
    no syslog: the host's journal is not the tests')."""

    def __init__(self, prefix: Path, **settings):
        self.prefix = Path(prefix)
        self.paths = Paths.under(self.prefix)
        self.settings = {"DB write limit (seconds)": 1, "Syslog socket": "", **settings}
        self.proc = None
        self.notify = None  # the $NOTIFY_SOCKET the daemon reports READY=1 and STOPPING=1 on
        self.package_root = REPO  # where `picosnitch` is imported from

    def env(self) -> dict:
        return dict(os.environ, PICOSNITCH_PREFIX=str(self.prefix), PYTHONPATH=str(self.package_root))

    def cli(self, *args: str, **kwargs) -> subprocess.CompletedProcess:
        """Runs `picosnitch ARGS` against this prefix."""
        return subprocess.run([sys.executable, "-m", "picosnitch", *args], capture_output=True, text=True,
                              env=self.env(), timeout=kwargs.pop("timeout", 120), **kwargs)

    def write_config(self) -> None:
        self.paths.config.parent.mkdir(parents=True, exist_ok=True)
        config = json.loads(self.paths.config.read_text()) if self.paths.config.exists() else {}
        config.update(self.settings)
        self.paths.config.write_text(json.dumps(config, indent=2))

    def start(self, timeout: float = 30) -> "Daemon":
        """Starts in the foreground (in its own process group) and waits until the daemon tells
        systemd it is ready (READY=1 on $NOTIFY_SOCKET): every worker runs and the BPF programs
        are attached."""
        self.write_config()
        # The socket stays open until the daemon has exited, as systemd's does: the daemon also
        # sends STOPPING=1 on it, and a closed socket would refuse that.
        self.notify = notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        address = f"picosnitch-test-{os.getpid()}-{id(self)}-{time.monotonic_ns()}"
        notify.bind("\0" + address)
        notify.settimeout(0.1)
        self.proc = subprocess.Popen([sys.executable, "-m", "picosnitch", "start-no-daemon"],
                                     env=dict(self.env(), NOTIFY_SOCKET="@" + address),
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     errors="surrogateescape", start_new_session=True)
        timeout *= SLOWDOWN
        # stderr is read as it comes: a daemon that says much there (a full disk) never waits on it
        self._stderr = []
        self._stderr_reader = threading.Thread(target=lambda: self._stderr.extend(self.proc.stderr), daemon=True)
        self._stderr_reader.start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited {self.proc.returncode}: {self.stderr()}")
            try:
                if b"READY=1" in notify.recv(4096).split(b"\n"):
                    return self
            except socket.timeout:
                pass
        # Not left behind: its BPF programs would stay attached and slow whatever runs next.
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        raise RuntimeError(f"daemon did not become ready in {timeout:g} s")

    def stderr(self) -> str:
        """What the daemon wrote on stderr so far (all of it, once it has exited)."""
        if self.proc.poll() is not None:
            self._stderr_reader.join(10)
        return "".join(self._stderr)

    def worker(self, name: str):
        """The pid of the worker called `name` (monitor, identity, writer, keeper, ...), if it runs."""
        for pid in self.workers():
            try:
                if Path(f"/proc/{pid}/comm").read_text().strip() == f"snitch-{name}"[:15]:
                    return pid
            except FileNotFoundError:
                continue
        return None

    def workers(self) -> list:
        """Pids of the daemon's processes other than the supervisor."""
        found = subprocess.run(["pgrep", "-g", str(self.proc.pid)], capture_output=True, text=True).stdout
        return [int(pid) for pid in found.split() if int(pid) != self.proc.pid]

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM, as systemd would; waits for a clean exit and returns the status."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout * SLOWDOWN)
        self._close_notify()
        return self.proc.returncode

    def _close_notify(self) -> None:
        if self.notify is not None:
            self.notify.close()
            self.notify = None

    def kill_group(self) -> None:
        """kill -9 of the whole process group: no chance to clean up."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        self._close_notify()

    def rows(self, where: str = "1", params=()) -> list:
        """Rows of the connections view as dicts."""
        conn = sqlite3.connect(f"file:{self.paths.db}?mode=ro", uri=True)
        conn.text_factory = decode_text
        conn.row_factory = sqlite3.Row
        try:
            return [dict(r) for r in conn.execute(f"SELECT * FROM connections WHERE {where}", params)]
        finally:
            conn.close()

    def error_log(self) -> str:
        return self.paths.error_log.read_text(errors="surrogateescape") if self.paths.error_log.exists() else ""

    def __enter__(self) -> "Daemon":
        return self.start()

    def __exit__(self, *exc) -> None:
        if self.proc and self.proc.poll() is None:
            self.stop()


def wait_for(condition, timeout=20.0, what="condition"):
    """condition()'s first true value, polling until `timeout` seconds have passed (longer in a guest)."""
    timeout *= SLOWDOWN
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)


class Sink:
    """A loopback TCP server that reads every connection to EOF."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0), backlog=1024)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                while conn.recv(65536):
                    pass

    def close(self):
        self.sock.close()
