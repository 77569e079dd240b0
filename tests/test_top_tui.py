"""`picosnitch top` and the live feed, driven in tmux.

Most tests run the live-feed worker (live_feed.run) in its own process as the daemon runs it, fed
the Connections the real daemon recorded from known traffic (test_view_tui's daemon_db: read back
from snitch.db with connection.from_row) twice a second, as the identity worker would send them.
The last one runs the whole daemon and a program that keeps talking.
"""

import grp
import multiprocessing
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from daemon_harness import REPO
from test_view_tui import Tmux, daemon_db, line_with  # noqa: F401 - daemon_db is a fixture

from picosnitch import channels
from picosnitch.connection import from_row
from picosnitch.daemon import live_feed
from picosnitch.messages import Stop
from picosnitch.paths import Paths
from picosnitch.store.sqlite import decode_text

_ctx = multiprocessing.get_context("fork")


def recorded(prefix, name: str) -> list:
    conn = sqlite3.connect(f"file:{Paths.under(prefix).db}?mode=ro", uri=True)
    conn.text_factory = decode_text
    conn.row_factory = sqlite3.Row
    try:
        return [from_row(dict(r)) for r in conn.execute(
            "SELECT * FROM connections WHERE name = ?", (name,))]
    finally:
        conn.close()


class Feed:
    """live_feed.run in a worker process under `prefix`, with a pipe to send it batches."""

    def __init__(self, prefix, group: str = ""):
        self.paths = Paths.under(prefix)
        self.paths.ensure_dirs()
        inbox, self.outbox = channels.pair(sender_waits=True)
        self.process = _ctx.Process(target=live_feed.run,
                                    args=({"Live feed group": group}, self.paths, inbox))
        self.process.start()
        deadline = time.monotonic() + 10
        while not self.paths.live_socket.exists():
            assert time.monotonic() < deadline, "no live socket"
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process.is_alive():
            self.outbox.send(Stop("identity"))
            self.process.join(10)


@pytest.fixture
def feed():
    """Starts Feeds in a prefix every user may traverse (so `nobody` reaches the socket)."""
    prefix = Path(tempfile.mkdtemp(dir="/var/tmp"))
    os.chmod(prefix, 0o755)
    feeds = []

    def start(group=""):
        feeds.append(Feed(prefix, group))
        return feeds[-1]

    yield start
    for f in feeds:
        f.stop()
    shutil.rmtree(prefix)


def run_top(prefix, as_nobody=False) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "picosnitch", "top"]
    if as_nobody:
        command = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                   "/usr/bin/python3", "-m", "picosnitch", "top"]
    return subprocess.run(command, capture_output=True, text=True, timeout=30, env=dict(
        os.environ, PICOSNITCH_PREFIX=str(prefix), PYTHONPATH=str(REPO)))


def test_without_a_daemon_top_says_so(tmp_path):
    result = run_top(tmp_path)
    assert result.returncode == 1
    assert result.stdout.startswith("picosnitch top: picosnitch is not running (no live feed at")


def test_the_socket_is_root_only_unless_a_group_is_configured(feed):
    f = feed()
    st = os.stat(f.paths.live_socket)
    assert (st.st_mode & 0o777, st.st_uid, st.st_gid) == (0o660, 0, 0)
    result = run_top(f.paths.root, as_nobody=True)
    assert result.returncode == 1
    assert "permission denied" in result.stdout and '"Live feed group"' in result.stdout
    f.stop()
    f = feed("nogroup")
    assert os.stat(f.paths.live_socket).st_gid == 65534
    client = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3", "-c",
         "from picosnitch.daemon.live_feed import FeedClient; import sys; FeedClient(sys.argv[1])",
         str(f.paths.live_socket)], env=dict(os.environ, PYTHONPATH=str(REPO)),
        capture_output=True, text=True, timeout=30)
    assert client.returncode == 0, client.stdout + client.stderr


def test_frames_carry_per_identity_rates(daemon_db, feed):
    batch = recorded(daemon_db[0], "psnv-alpha")
    f = feed()
    client = live_feed.FeedClient(f.paths.live_socket)
    for _ in range(4):
        f.outbox.send(batch)
        time.sleep(0.5)
    frames = []
    deadline = time.monotonic() + 5
    while len(frames) < 3 and time.monotonic() < deadline:
        frames += client.read()
        time.sleep(0.1)
    sent = sum(rate["send"] * frame["interval"] for frame in frames for rate in frame["rates"])
    assert 300000 <= round(sent) <= 4 * 300000 and round(sent) % 300000 == 0
    rate = next(r for frame in frames for r in frame["rates"])
    assert (rate["name"], rate["exe"].endswith("/bin/psnv-alpha")) == ("psnv-alpha", True)
    assert rate["pexe"] and rate["uid"] == 0
    f.stop()
    time.sleep(0.5)
    client.read()
    assert client.closed


def test_top_shows_rates_sorts_pauses_and_quits(daemon_db, feed):
    batch = recorded(daemon_db[0], "psnv-alpha")
    f = feed()
    top = Tmux([sys.executable, "-m", "picosnitch", "top"],
               {"PICOSNITCH_PREFIX": str(f.paths.root), "PYTHONPATH": str(REPO)}, 110, 20)
    try:
        top.wait_for("picosnitch top")
        top.keys("u")  # bytes
        for _ in range(3):
            f.outbox.send(batch)
            time.sleep(0.5)
        screen = top.wait_for("psnv-alpha")
        assert "← python3" in line_with(screen, "psnv-alpha") or "←" in screen
        top.wait_for(lambda s: "900000 B" in s)  # total sent, once all three batches are in
        top.keys("s")
        top.wait_for("sort: recv/s")
        top.keys("p")
        top.wait_for("PAUSED")
        f.outbox.send(batch)
        time.sleep(1.5)
        assert "1200000 B" not in top.screen()  # frozen while paused
        top.keys("p")
        top.wait_for("1200000 B")
        for width, height in ((80, 24), (30, 5), (5, 2), (110, 20)):
            top.resize(width, height)
            time.sleep(0.2)
            assert "Traceback" not in top.screen()
        f.stop()
        top.wait_for("live feed closed")
        top.keys("q")
        assert "EXIT=0" in top.wait_for("EXIT=")
    finally:
        top.close()


# ---- through the real daemon ----

RATE = re.compile(r"\s*(\d+(?:\.\d+)?) (B|kB|MB|GB)\b")


def sending(screen: str, name: str) -> float:
    """The send/s figure on the line of `name` (0 when there is no such line)."""
    for line in screen.splitlines():
        if name in line:
            match = RATE.match(line)
            return float(match.group(1)) if match else 0.0
    return 0.0


@pytest.fixture
def feed_group():
    """A new group, and its gid; removed afterwards."""
    name = "pstop%d" % os.getpid()
    subprocess.run(["groupadd", "--system", name], check=True)
    try:
        yield name, grp.getgrnam(name).gr_gid
    finally:
        subprocess.run(["groupdel", name], check=True)


def test_top_through_the_daemon_shows_a_steady_program_to_the_feed_group(netops, feed_group):
    if os.geteuid() != 0:
        pytest.skip("needs root: runs the daemon")
    from daemon_harness import Daemon
    from test_daemon_lifecycle import Sink
    group, gid = feed_group
    prefix = Path(tempfile.mkdtemp(dir="/var/tmp"))
    os.chmod(prefix, 0o755)  # so the group's users reach the socket
    steady = prefix / "psn-top-steady"
    shutil.copy(netops, steady)
    sink = Sink()
    # About 50 kB every 50 ms, from a copy of netops only this test runs.
    loop = subprocess.Popen(["bash", "-c", 'while :; do "$0" quick 127.0.0.1 "$1" 50000 '
                             '>/dev/null || exit; sleep 0.05; done', str(steady), str(sink.port)])
    top = None
    try:
        with Daemon(prefix / "root", **{"Live feed group": group}) as daemon:
            st = os.stat(daemon.paths.live_socket)
            assert (st.st_mode & 0o777, st.st_uid, st.st_gid) == (0o660, 0, gid)
            denied = run_top(daemon.prefix, as_nobody=True)  # nobody, not in the group
            assert denied.returncode == 1
            assert "permission denied" in denied.stdout and repr(group) in denied.stdout
            # `env -u`: this process's environment has COLUMNS=80 and LINES=24 (set by the
            # readline module when something imported it), which curses would believe.
            top = Tmux(["env", "-u", "COLUMNS", "-u", "LINES",
                        "setpriv", "--reuid=65534", "--regid=65534", f"--groups={gid}",
                        "/usr/bin/python3", "-m", "picosnitch", "top"],
                       {"PICOSNITCH_PREFIX": str(daemon.prefix), "PYTHONPATH": str(REPO)}, 150, 30)
            screen = top.wait_for(lambda s: sending(s, "psn-top-steady") > 0
                                  and f" {steady}  ← bash " in s, timeout=15)
            line = line_with(screen, "psn-top-steady")
            assert line.split()[:2] != ["0", "B"], line
            assert "Traceback" not in screen
            top.keys("q")
            assert "EXIT=0" in top.wait_for("EXIT=")
            assert daemon.stop() == 0
    finally:
        if top:
            top.close()
        loop.kill()
        loop.wait()
        sink.sock.close()
        shutil.rmtree(prefix)
