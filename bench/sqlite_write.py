"""How fast snitch.db and conn.log take Connections: prints rows/s, asserts nothing.

    python3 bench/sqlite_write.py [rows] [rows per window]

Every window holds distinct (identity, endpoint) pairs drawn from a fixed population, as a busy
machine would produce, so later windows mostly reuse known processes and endpoints. The storm
line is a loopback connection storm instead: one client's connections to one server, a local
port each, the ephemeral ports used over and over (both ends' rows, as the daemon stores them).
"""

import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from picosnitch.connection import Connection, Endpoint, Identity, ProcessInfo  # noqa: E402
from picosnitch.store import conn_log  # noqa: E402
from picosnitch.store import sqlite as sqlite_store


def population(rng: random.Random, identities: int = 300, endpoints: int = 3000):
    """Plausible identities and endpoints, with some long command lines among them."""
    procs = [ProcessInfo(f"/usr/bin/prog{n}", f"prog{n}",
                         f"prog{n} --option " + "a" * rng.choice((10, 100, 2000)), "%064x" % n)
             for n in range(identities)]
    people = [Identity(p, rng.choice(procs), rng.choice(procs), uid=rng.choice((0, 1000)),
                       netns=4026531840) for p in procs]
    places = [Endpoint(rng.choice((2, 10)), rng.choice((6, 17)), "10.0.0.2", rng.randrange(65536),
                       "203.0.%d.%d" % (n // 250, n % 250), rng.choice((53, 80, 443)),
                       f"com.example.host{n}") for n in range(endpoints)]
    return people, places


def windows(rng: random.Random, rows: int, per_window: int, start: int = 1_700_000_000):
    """Lists of Connections, one per write window of 10 s."""
    people, places = population(rng)
    result = []
    for w in range(rows // per_window):
        pairs = set()
        while len(pairs) < per_window:
            pairs.add((rng.choice(people), rng.choice(places)))
        result.append([Connection(i, e, start + 10 * w, rng.randrange(10**6),
                                  rng.randrange(10**6), 3, 4) for i, e in pairs])
    return result


EPHEMERAL = range(32768, 61000)  # Linux's default ip_local_port_range


def storm_windows(rows: int, per_window: int, start: int = 1_700_000_000):
    """Lists of Connections of a connection storm, one per write window of 10 s."""
    client = Identity(ProcessInfo("/usr/bin/client", "client", "client", "%064x" % 1), netns=4026531840)
    server = Identity(ProcessInfo("/usr/bin/server", "server", "server", "%064x" % 2), netns=4026531840)
    result, n = [], 0
    for w in range(rows // per_window):
        window = []
        while len(window) < per_window:
            port = EPHEMERAL[n % len(EPHEMERAL)]
            n += 1
            window.append(Connection(client, Endpoint(2, 6, "127.0.0.1", port, "127.0.0.1", 8000),
                                     start + 10 * w, 100, 0, 3, 2))
            window.append(Connection(server, Endpoint(2, 6, "127.0.0.1", 8000, "127.0.0.1", port),
                                     start + 10 * w, 0, 100, 2, 3))
        result.append(window)
    return result


def timed(label: str, rows: int, write, batches) -> None:
    started = time.perf_counter()
    for batch in batches:
        write(batch)
    elapsed = time.perf_counter() - started
    print(f"{label:<44} {rows / elapsed:>10,.0f} rows/s  ({elapsed:.2f} s)")


def main() -> None:
    rows = int(sys.argv[1]) if len(sys.argv) > 1 else 200_000
    per_window = int(sys.argv[2]) if len(sys.argv) > 2 else 1000
    batches = windows(random.Random(0), rows, per_window)
    rows = len(batches) * per_window
    print(f"{rows:,} connections in windows of {per_window:,}")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "snitch.db")
        conn, _ = sqlite_store.open_db(path)
        timed("SqliteWriter (ids cached across windows)", rows,
              sqlite_store.SqliteWriter(conn).write, batches)
        size = os.path.getsize(path) + os.path.getsize(path + "-wal")
        print(f"{'  snitch.db + -wal size':<44} {size / rows:>10,.0f} bytes/row")

        conn3, _ = sqlite_store.open_db(os.path.join(tmp, "storm.db"))
        storm = storm_windows(rows, 10 * per_window)
        timed("SqliteWriter, connection storm", sum(map(len, storm)),
              sqlite_store.SqliteWriter(conn3).write, storm)
        sqlite_store.close_db(conn3)

        conn2, _ = sqlite_store.open_db(os.path.join(tmp, "fresh.db"))
        timed("write_connections (ids looked up each time)", rows,
              lambda batch: sqlite_store.write_connections(conn2, batch), batches)

        timed("SqliteWriter, same windows again (upserts)", rows,
              sqlite_store.SqliteWriter(conn).write, batches)

        started = time.perf_counter()
        sqlite_store.prune(conn, 1, now=batches[len(batches) // 2][0].ts + 86400)
        print(f"{'prune half of it':<44} {time.perf_counter() - started:>10.2f} s")
        sqlite_store.close_db(conn)
        sqlite_store.close_db(conn2)

        with conn_log.ConnLog(os.path.join(tmp, "conn.log")) as log:
            timed("ConnLog", rows, log.write, batches)


if __name__ == "__main__":
    main()
