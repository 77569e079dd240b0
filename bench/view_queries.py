"""How fast `picosnitch view` answers on a large snitch.db.

Generates (once, cached under /var/tmp) a database of 10 million `traffic` rows in the real
schema: 30 days of 10-second write windows with about 39 rows each, from 400 identities whose
connections come and go (each new connection is a new endpoint with its own local port, as TCP
gives), plus the rollups the writer maintains. A cached database of an older schema is migrated
(on a copy, replaced when done), and the migration timed. Then it times, like the UI does it,
the first screen (opening the file and the executable tab of the default range) and switching
tabs, for each time range, and prints a table.

"Now" is the end of the generated data (as if the daemon had just written), so the figures do
not depend on the cached file's age. One more line, "month +1 day", is a month a day later: a
day of traffic lies before its window, as it does just before the daily prune at the default
30-day retention.

    python3 -m bench.view_queries [--rows N] [--db PATH]
"""

import argparse
import os
import random
import shutil
import sqlite3
import statistics
import time

from picosnitch.store import queries as view_queries
from picosnitch.store import schema as db_schema
from picosnitch.store import sqlite as sqlite_store
from picosnitch.ui.text import RANGES, window

DEFAULT_DB = "/var/tmp/picosnitch-bench-view/snitch-{rows}.db"
WINDOW = 10
DAYS = 30
IDENTITIES = 400
ACTIVE = 600  # connections open at any moment


def _names(rng: random.Random, stem: str, n: int) -> list:
    return [f"{stem}{i}-{rng.randrange(10**6)}" for i in range(n)]


def generate(path: str, rows: int, seed: int = 1) -> None:
    """Write `rows` traffic rows (and their rollup) into a fresh database at `path`."""
    rng = random.Random(seed)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    partial = path + ".partial"
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(partial + suffix):
            os.unlink(partial + suffix)
    conn, _ = sqlite_store.open_db(partial)
    conn.execute("PRAGMA cache_size = -2000000")
    conn.execute("PRAGMA synchronous = OFF")
    exes = [f"/usr/bin/{name}" for name in _names(rng, "prog", 150)]
    processes = [(i + 1, exe, os.path.basename(exe)[:15], f"{exe} --arg {i}", f"{i:064x}")
                 for i, exe in enumerate(exes * 2)]
    identities = [(i + 1, rng.randrange(len(processes)) + 1, rng.randrange(len(processes)) + 1,
                   rng.randrange(len(processes)) + 1, rng.choice((0, 1000, 1000, 1000, 104)),
                   4026531840, rng.choice(("", "", "", "docker-abc", "user@1000.service")))
                  for i in range(IDENTITIES)]
    hosts = [(f"{rng.randrange(1, 224)}.{rng.randrange(256)}.{rng.randrange(256)}."
              f"{rng.randrange(1, 255)}", f"com.site{i}.www" if i % 3 else "")
             for i in range(3000)]
    endpoints = []

    def new_connection():
        raddr, domain = hosts[min(int(rng.paretovariate(1.2)) - 1, len(hosts) - 1)]
        n = len(endpoints)  # (laddr, lport) never repeats, like a client's TCP connections
        endpoints.append((n + 1, 2, 6, f"192.168.{n // 28000 % 256}.20", 32768 + n % 28000,
                          raddr, rng.choice((443, 443, 443, 80, 53, 22)), domain))
        return (min(int(rng.paretovariate(1.1)) - 1, IDENTITIES - 1) + 1, len(endpoints))

    active = [new_connection() for _ in range(ACTIVE)]
    weights = [1 / (k + 1) for k in range(ACTIVE)]
    per_window = rows / (DAYS * 86400 // WINDOW)
    end = int(time.time()) // WINDOW * WINDOW
    ts = end - DAYS * 86400
    written = 0
    with conn:
        conn.execute("BEGIN")
        conn.executemany("INSERT INTO processes VALUES (?, ?, ?, ?, ?)", processes)
        conn.executemany("INSERT INTO identities VALUES (?, ?, ?, ?, ?, ?, ?)", identities)
        batch = []
        while written < rows:
            for _ in range(2):  # connections close and open
                active[rng.randrange(ACTIVE)] = new_connection()
            count = min(int(per_window + rng.random()), rows - written)
            chosen = set(rng.choices(active, weights, k=count))
            written += len(chosen)
            for identity_id, endpoint_id in chosen:
                batch.append((ts, identity_id, endpoint_id, rng.randrange(40, 200000),
                              rng.randrange(40, 2000000), rng.randrange(1, 50),
                              rng.randrange(1, 80)))
            if len(batch) >= 100000:
                conn.executemany("INSERT INTO traffic VALUES (?, ?, ?, ?, ?, ?, ?)", batch)
                batch = []
            ts += WINDOW
            if ts >= end:
                ts = end - DAYS * 86400 + rng.randrange(1, WINDOW)  # wrap: more rows
        conn.executemany("INSERT INTO traffic VALUES (?, ?, ?, ?, ?, ?, ?)", batch)
        conn.executemany("INSERT INTO endpoints VALUES (?, ?, ?, ?, ?, ?, ?, ?)", endpoints)
        conn.execute("""INSERT INTO traffic_hourly SELECT ts - ts % 3600, identity_id, endpoint_id,
            sum(send), sum(recv), sum(packets_sent), sum(packets_recv) FROM traffic
            GROUP BY 1, 2, 3""")
        db_schema.fill_rollups(conn)
    conn.execute("ANALYZE")
    sqlite_store.close_db(conn)
    os.replace(partial, path)


def timed(action) -> float:
    start = time.perf_counter()
    action()
    return (time.perf_counter() - start) * 1000


def migrate(path: str) -> None:
    """Bring a cached database of an older schema up to date, as the daemon would."""
    partial = path + ".partial"
    shutil.copy(path, partial)
    started = time.perf_counter()
    conn, _ = sqlite_store.open_db(partial)
    seconds = time.perf_counter() - started
    sqlite_store.close_db(conn)
    os.replace(partial, path)
    print(f"migrated to schema {db_schema.SCHEMA_VERSION} in {seconds:.1f} s", flush=True)


def schema_version(path: str) -> int:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return conn.execute("PRAGMA user_version").fetchone()[0]
    finally:
        conn.close()


TABLES = ("traffic", "traffic_hourly", "hourly_by_identity", "totals_by_peer", "totals_by_lport",
          "identities", "endpoints")


def measure(path: str, repeats: int = 3) -> None:
    conn = sqlite_store.open_readonly(path)
    counts = [conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in TABLES]
    now = view_queries.time_bounds(conn)[1] + WINDOW - 1
    conn.close()
    print(f"database: {path} ({os.path.getsize(path) / 1e9:.2f} GB)")
    print("rows: " + ", ".join(f"{t} {n}" for t, n in zip(TABLES, counts)))
    print(f"{'range':<13} {'first screen ms':>16} {'tab switch ms (median, max)':>28}"
          f" {'filter ms':>10}")
    cases = [(name, name, now) for name, _ in RANGES] + [("month +1 day", "month", now + 86400)]
    for label, name, at in cases:
        firsts, switches, filters = [], [], []
        for _ in range(repeats):
            history = None

            def first():
                nonlocal history
                history = view_queries.History(sqlite_store.open_readonly(path))
                history.tab("exe", *window(name, 0, at), [])

            firsts.append(timed(first))
            start, end = window(name, 0, at)
            for dimension in view_queries.DIMENSIONS[1:]:
                switches.append(timed(lambda: history.tab(dimension.column, start, end, [])))
            top = history.tab("exe", start, end, [])
            if top:
                chosen = [view_queries.Filter("exe", top[0].value)]
                filters.append(timed(lambda: history.tab("raddr", start, end, chosen)))
            history.conn.close()
        print(f"{label:<13} {statistics.median(firsts):>16.0f} "
              f"{statistics.median(switches):>18.0f}, {max(switches):>7.0f}"
              f" {statistics.median(filters) if filters else 0:>10.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--db")
    args = parser.parse_args()
    path = args.db or DEFAULT_DB.format(rows=args.rows)
    if not os.path.exists(path):
        print(f"generating {args.rows} rows into {path} (once; cached) ...", flush=True)
        print(f"generated in {timed(lambda: generate(path, args.rows)) / 1000:.0f} s", flush=True)
    elif schema_version(path) < db_schema.SCHEMA_VERSION:
        migrate(path)
    measure(path)


if __name__ == "__main__":
    main()
