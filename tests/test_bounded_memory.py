"""What keeps the daemon's memory bounded under a connection storm, and gives it back afterwards.

A storm (thousands of short TCP connections a second) makes one endpoint per ephemeral port.
The identity worker sends its Connections in messages of at most channels.MAX_PACKET bytes,
pickled once for all consumers; the writer writes a window in parts once it holds writer_worker.MAX_PENDING rows
(snitch.db still has one row per key and window), and after a burst, at the first quiet window,
it forgets cached ids and SQLite's page cache and returns free heap pages (heap.trim).
bench/daemon_load.py measures the memory this saves; these tests check that nothing is lost.
"""

import json
import multiprocessing
import os
import re
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

from picosnitch import channels, config, heap
from picosnitch.connection import Connection, Endpoint, Identity, ProcessInfo
from picosnitch.identity import worker as identity_worker
from picosnitch.identity.resolver import IdentityResolver
from picosnitch.kernel import worker as kernel_worker
from picosnitch.kernel.records import Flow
from picosnitch.messages import Stop
from picosnitch.paths import Paths
from picosnitch.store import worker as writer_worker
from picosnitch.store.sqlite import decode_text

ctx = multiprocessing.get_context("fork")
CLIENT = Identity(ProcessInfo("/usr/bin/storm", "storm", "storm client", "ab" * 32),
                  ProcessInfo("/usr/bin/bash", "bash", "bash", "cd" * 32), ProcessInfo(), 1000, 4026531840)
TS = 1_700_000_000


def cfg():
    values = {"DB write limit (seconds)": 1, "DB text log": True}
    return config.parse(json.dumps(values), "/etc/picosnitch/config.json")


def to_port(port: int) -> Connection:
    """100 bytes from the storm client's local `port` to its server, in window TS."""
    return Connection(CLIENT, Endpoint(2, 6, "127.0.0.1", port, "127.0.0.1", 4000), TS, 100, 0, 3, 2)


class Writer:
    """writer_worker.run in its own process, as the supervisor starts it."""

    def __init__(self, tmp_path: Path, start_method: str = "fork"):
        """start_method "spawn" gives a writer that shares no memory with this (pytest) process,
        whose own writes would otherwise turn the writer's inherited pages private."""
        context = multiprocessing.get_context(start_method)
        self.paths = Paths.under(tmp_path)
        self.paths.ensure_dirs()
        inbox, self.inbox = channels.pair(sender_waits=True)
        self.keeper, to_keeper = channels.pair()
        self.process = context.Process(target=writer_worker.run, args=(cfg(), self.paths, inbox, to_keeper))
        self.process.start()
        to_keeper.close()  # the writer's is the only one left: its exit ends the pipe

    def stop(self) -> list:
        """Stops it; returns what it told the keeper (a few messages, which the pipe holds)."""
        self.inbox.send(Stop("identity"))
        self.process.join(30)
        assert self.process.exitcode == 0
        reports = []
        try:
            while True:
                reports.append(self.keeper.recv())
        except EOFError:
            return reports

    def rows(self) -> list:
        conn = sqlite3.connect(f"file:{self.paths.db}?mode=ro", uri=True)
        conn.text_factory = decode_text
        try:
            return conn.execute("SELECT lport, send, packets_sent FROM connections ORDER BY lport").fetchall()
        finally:
            conn.close()

    def private_kib(self) -> int:
        """Memory only the writer process uses (not shared with its parent or other processes)."""
        rollup = Path(f"/proc/{self.process.pid}/smaps_rollup").read_text()
        return sum(int(kib) for kib in re.findall(r"^Private_(?:Clean|Dirty):\s+(\d+) kB", rollup, re.M))


def test_a_window_too_big_to_hold_is_written_in_parts_and_summed_exactly(tmp_path, monkeypatch):
    monkeypatch.setattr(writer_worker, "MAX_PENDING", 4)  # inherited by the forked writer
    writer = Writer(tmp_path)
    writer.inbox.send([to_port(1), to_port(2), to_port(3)])
    writer.inbox.send([to_port(4), to_port(1), to_port(5)])  # 5 rows held: written at once
    writer.inbox.send([to_port(1), to_port(2)])  # the rest of the window, written at Stop
    assert writer.stop() == [Stop("writer")]
    assert writer.rows() == [(1, 300, 9), (2, 200, 6), (3, 100, 3), (4, 100, 3), (5, 100, 3)]
    # conn.log has a line per part: ports 1 and 2 are in both
    lines = writer.paths.conn_log.read_text().splitlines()
    assert sorted(int(line.split(",")[12]) for line in lines) == [1, 1, 2, 2, 3, 4, 5]


def eventually(condition, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.2)


def test_after_a_storm_the_writer_gives_its_memory_back(tmp_path):
    writer = Writer(tmp_path, "spawn")
    try:
        writer.inbox.send([to_port(1)])
        # written (snitch.db first, then conn.log): the database is set up
        eventually(lambda: writer.paths.conn_log.exists() and writer.paths.conn_log.read_text())
        before = writer.private_kib()
        for part in range(40):  # 200,000 Connections: 28,000 ports, each seen about 7 times
            writer.inbox.send([to_port(32768 + (part * 5000 + i) % 28000) for i in range(5000)])
        # The window with the storm is written, then the next, quiet, one ends the burst.
        eventually(lambda: writer.private_kib() - before < 12 * 1024)
        grown = writer.private_kib() - before
    finally:
        assert writer.stop() == [Stop("writer")]
    # Measured on 2026-11-21: 21 MiB more just after the storm (a MAX_PENDING part of the window,
    # cached ids, SQLite's page cache, free heap), and that stays if release_memory() does
    # nothing; 4-5 MiB once it has run. Private memory is the writer's own, whatever else runs.
    assert grown < 12 * 1024, f"the writer kept {grown} KiB more than before the storm"
    rows = writer.rows()
    assert len(rows) == 28001 and sum(send for _, send, _ in rows) == 200001 * 100


def test_a_storm_batch_reaches_every_consumer_in_messages_pickled_once():
    resolver = IdentityResolver(config.defaults(), lambda message: None)
    me = Path("/proc/self/exe").stat()
    flows = [Flow(os.getpid(), os.getppid(), 1000, 4026531840, me.st_dev, me.st_ino, 2, 6, "127.0.0.1", port, "127.0.0.1",
                  4000, 100, 0, 3, 2, time=TS) for port in range(32768, 35268)]
    links = [channels.pair() for _ in range(2)]
    sent = []

    class Counting:
        """One consumer's channel, noting every message it is given."""

        def __init__(self, end):
            self.end = end

        def send_bytes(self, data, tally=None):
            sent.append((data, tally))
            self.end.send_bytes(data, tally)

    received = [[], []]

    def read(reader, into):
        while sum(len(part) for part in into) < len(flows):
            into.append(reader.recv())

    readers = [threading.Thread(target=read, args=(reader, into)) for (reader, _), into in zip(links, received)]
    for thread in readers:
        thread.start()
    identity_worker.resolve(resolver, flows, 1, {"one": Counting(links[0][1]), "two": Counting(links[1][1])})
    for thread in readers:
        thread.join(30)
    assert len(received[0]) > 1 and received[0] == received[1]
    assert [c.endpoint.lport for part in received[0] for c in part] == list(range(32768, 35268))
    assert {c.ts for part in received[0] for c in part} == {TS}  # the window it was drained in
    assert all(len(data) <= channels.MAX_PACKET for data, _ in sent)
    assert [data for data, _ in sent[::2]] == [data for data, _ in sent[1::2]]  # one pickle per message, for both
    assert len({id(data) for data, _ in sent}) == len(received[0])
    assert sum(tally.rows for _, tally in sent[::2]) == len(flows)
    assert sum(tally.traffic for _, tally in sent[::2]) == 100 * len(flows)


def test_trim_returns_the_free_pages_of_the_heap():
    def rss_kib() -> int:
        return int(re.search(r"^Rss:\s+(\d+) kB", Path("/proc/self/smaps_rollup").read_text(), re.M).group(1))

    blocks = [bytearray(600) for _ in range(100_000)]  # above Python's small-object size: malloc
    kept = blocks[::100]  # live blocks all over the heap, so it cannot shrink from its top
    del blocks
    before = rss_kib()
    heap.trim()
    assert rss_kib() < before - 30 * 1024
    assert len(kept) == 1000


def test_a_burst_ends_at_the_first_quiet_period_after_busy_ones():
    burst = heap.Burst(quiet=1000)
    assert [burst.over(n) for n in (0, 5000, 7000, 999, 10, 0, 1000, 0)] == [
        False, False, False, True, False, False, False, True]


PRIVATE_KIB = ("import re, pathlib\n"
               "def private_kib():\n"
               "    text = pathlib.Path('/proc/self/smaps_rollup').read_text()\n"
               "    return sum(int(n) for n in re.findall(r'^Private_(?:Clean|Dirty):\\s+(\\d+)', text, re.M))\n")


def test_finding_a_files_package_keeps_the_index_and_not_what_building_it_took(tmp_path):
    """The keeper indexes dpkg's file lists once (about 130,000 paths on a desktop); made among
    the short-lived objects of that work, a few lasting ones kept ~15 MiB of arenas for good."""
    info = tmp_path / "info"
    info.mkdir()
    for package in range(800):
        lines = "".join(f"/usr/share/p{package}/file-{i}\n" for i in range(160))
        (info / f"p{package}:amd64.list").write_text(lines)
    (tmp_path / "status").write_text("".join(
        f"Package: p{i}\nStatus: install ok installed\nArchitecture: amd64\nVersion: 1.{i}\n\n" for i in range(800)))
    script = PRIVATE_KIB + (
        "from picosnitch import heap\n"
        "from picosnitch.alerts.packages import Dpkg\n"
        f"dpkg = Dpkg({str(tmp_path)!r})\n"
        "heap.trim(); before = private_kib()\n"
        "assert dpkg._owner('/usr/share/p799/file-159') == ('p799:amd64', '/usr/share/p799/file-159')\n"
        "heap.trim(); print(private_kib() - before)\n")
    grown = int(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                               cwd=Path(__file__).parent.parent).stdout)
    # Measured on 2026-12-07: 15-17 MiB kept before the lasting objects were made first; 2-3 MiB
    # (the index, ~12 bytes a path, and the versions) after.
    assert grown < 6 * 1024, f"indexing 128,000 paths kept {grown} KiB"


def test_what_the_identity_worker_could_not_take_is_handed_on_without_waiting_for_the_next_batch():
    """After a storm the monitor has little new to send; what waits in its outbox must not wait
    for that (one socket buffer per drain interval), nor keep the storm's memory meanwhile."""
    receiver, sender = channels.pair()
    delivery = kernel_worker.Delivery(sender)
    records = [to_port(port) for port in range(40_000)]  # several MiB pickled: more than the socket takes
    delivery(records)
    assert not delivery.hand_on() and sender.queued  # nobody reads yet
    received: list = []

    def read():
        while len(received) < len(records):
            received.extend(receiver.recv())

    reader = threading.Thread(target=read)
    reader.start()
    deadline = time.monotonic() + 30
    while not delivery.hand_on() and time.monotonic() < deadline:
        time.sleep(0.01)
    reader.join(30)
    assert sender.queued == 0 and len(received) == len(records)
