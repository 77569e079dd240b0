"""snitch.db: the schema, writing Connections, reading them back, pruning and recovery."""

import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from picosnitch.connection import Connection, Endpoint, Identity, ProcessInfo, from_row
from picosnitch.sanitize import to_bytes
from picosnitch.store import schema as db_schema
from picosnitch.store import sqlite as sqlite_store

REPO = Path(__file__).resolve().parent.parent

ORIGINAL_COLUMNS = ["contime", "send", "recv", "exe", "name", "cmdline", "sha256", "pexe",
                    "pname", "pcmdline", "psha256", "uid", "lport", "rport", "laddr", "raddr",
                    "domain"]
NEW_COLUMNS = ["gpexe", "gpname", "gpcmdline", "gpsha256", "family", "protocol", "packets_sent",
               "packets_recv", "netns", "container", "ts", "domain_source"]
IDENTITY_COLUMNS = ["script", "script_sha256", "exe_state"]  # issue 14: scripts and unusual executables

CURL = ProcessInfo("/usr/bin/curl", "curl", "curl https://example.com", "ab" * 32)
BASH = ProcessInfo("/usr/bin/bash", "bash", "bash", "cd" * 32)
SYSTEMD = ProcessInfo("/usr/lib/systemd/systemd", "systemd", "/sbin/init", "ef" * 32)
HTTPS = Endpoint(2, 6, "10.0.0.2", 40000, "93.184.216.34", 443, "com.example")


def connection(process=CURL, endpoint=HTTPS, ts=1_700_000_000, send=100, recv=2000,
               packets_sent=1, packets_recv=2, **identity) -> Connection:
    identity = Identity(process, BASH, SYSTEMD, **{"uid": 1000, **identity})
    return Connection(identity, endpoint, ts, send, recv, packets_sent, packets_recv)


def read_back(conn, view="connections"):
    cursor = conn.execute(f"SELECT * FROM {view} ORDER BY ts, exe")
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, row)) for row in cursor]


@pytest.fixture
def db(tmp_path):
    conn, problem = sqlite_store.open_db(str(tmp_path / "snitch.db"))
    assert problem is None
    yield conn
    conn.close()


@pytest.fixture
def tokyo_time(monkeypatch):
    """Local time is UTC+9 (a POSIX TZ string, so no tzdata is needed)."""
    monkeypatch.setenv("TZ", "JST-9")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


# The schema


def test_connections_view_has_the_documented_columns_in_order(db):
    columns = [d[0] for d in db.execute("SELECT * FROM connections").description]
    assert columns == ORIGINAL_COLUMNS + NEW_COLUMNS + IDENTITY_COLUMNS
    assert columns == [name for name, _ in db_schema.VIEW_COLUMNS]


def test_hourly_view_has_the_same_columns(db):
    columns = [d[0] for d in db.execute("SELECT * FROM connections_hourly").description]
    assert columns == ORIGINAL_COLUMNS + NEW_COLUMNS + IDENTITY_COLUMNS


def test_new_database_is_wal_and_versioned(db):
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("PRAGMA user_version").fetchone()[0] == db_schema.SCHEMA_VERSION


def test_reopening_keeps_the_data(tmp_path):
    path = str(tmp_path / "snitch.db")
    conn, _ = sqlite_store.open_db(path)
    sqlite_store.write_connections(conn, [connection()])
    sqlite_store.close_db(conn)
    conn, problem = sqlite_store.open_db(path)
    assert problem is None
    assert len(read_back(conn)) == 1


def test_database_from_a_newer_picosnitch_is_refused_and_left_alone(tmp_path):
    path = tmp_path / "snitch.db"
    conn, _ = sqlite_store.open_db(str(path))
    conn.execute(f"PRAGMA user_version = {db_schema.SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(db_schema.NewerSchemaError):
        sqlite_store.open_db(str(path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["snitch.db"]


def test_migrations_run_from_the_stored_version(tmp_path, monkeypatch):
    path = str(tmp_path / "snitch.db")
    conn, _ = sqlite_store.open_db(path)
    conn.close()
    version = db_schema.SCHEMA_VERSION
    monkeypatch.setattr(db_schema, "SCHEMA_VERSION", version + 1)
    monkeypatch.setitem(db_schema.MIGRATIONS, version,
                        lambda c: c.execute("ALTER TABLE endpoints ADD COLUMN country TEXT"))
    conn, problem = sqlite_store.open_db(path)
    assert problem is None
    assert conn.execute("PRAGMA user_version").fetchone()[0] == version + 1
    assert "country" in [r[1] for r in conn.execute("PRAGMA table_info(endpoints)")]


# A database made by picosnitch at schema version 1 (commit 9469e44), with that version's
# SqliteWriter: 5 hours of 10-minute windows from three programs (one with a NUL, invalid UTF-8
# and an escape sequence in its path, name and command line) to reused local ports, then pruned
# so that its oldest hour has a rollup row but only part of its raw rows (as version 1 pruned).
V1_DATABASE = Path(__file__).parent / "data" / "snitch-v1.db"


def rollups_by_definition(conn) -> dict:
    """What the rollups must hold, computed from traffic_hourly by their definition."""
    pairs = """SELECT h.identity_id, {key}, sum(h.send), sum(h.recv), count(DISTINCT h.endpoint_id)
        FROM traffic_hourly AS h JOIN endpoints AS e ON e.id = h.endpoint_id
        GROUP BY h.identity_id, {key} ORDER BY 1, 2"""
    return {
        "hourly_by_identity": conn.execute(
            """SELECT hour, identity_id, sum(send), sum(recv), count(*) FROM traffic_hourly
               GROUP BY hour, identity_id ORDER BY 1, 2""").fetchall(),
        "totals_by_peer": conn.execute(pairs.format(
            key="CAST(e.raddr AS BLOB), e.rport, CAST(e.domain AS BLOB), CAST(e.laddr AS BLOB)"
        )).fetchall(),
        "totals_by_lport": conn.execute(pairs.format(key="e.lport")).fetchall(),
    }


def stored_rollups(conn) -> dict:
    return {
        "hourly_by_identity": conn.execute(
            "SELECT hour, identity_id, send, recv, pairs FROM hourly_by_identity ORDER BY 1, 2"
        ).fetchall(),
        "totals_by_peer": conn.execute(
            """SELECT identity_id, CAST(raddr AS BLOB), rport, CAST(domain AS BLOB),
               CAST(laddr AS BLOB), send, recv, pairs FROM totals_by_peer ORDER BY 1, 2"""
        ).fetchall(),
        "totals_by_lport": conn.execute(
            "SELECT identity_id, lport, send, recv, pairs FROM totals_by_lport ORDER BY 1, 2"
        ).fetchall(),
    }


def test_version_1_database_is_migrated_with_its_rollups(tmp_path):
    path = tmp_path / "snitch.db"
    shutil.copy(V1_DATABASE, path)
    old = sqlite3.connect(path)
    old.text_factory = bytes
    assert old.execute("PRAGMA user_version").fetchone()[0] == 1
    cursor = old.execute("SELECT * FROM connections ORDER BY ts, CAST(exe AS BLOB), lport, CAST(raddr AS BLOB)")
    view_before = cursor.fetchall()
    columns_before = ", ".join(d[0] for d in cursor.description)
    old.close()

    conn, problem = sqlite_store.open_db(str(path))

    assert problem is None
    assert conn.execute("PRAGMA user_version").fetchone()[0] == db_schema.SCHEMA_VERSION == 4
    conn.text_factory = bytes
    # Every column keeps its values; those added since are empty for the rows written before.
    assert conn.execute(f"SELECT {columns_before} FROM connections ORDER BY ts, CAST(exe AS BLOB), lport, "
                        "CAST(raddr AS BLOB)").fetchall() == view_before
    assert {r[0] for r in conn.execute("SELECT domain_source FROM connections")} == {b""}  # not known then
    assert set(conn.execute("SELECT script, script_sha256, exe_state FROM connections")) == {(b"", b"", b"")}
    expected = rollups_by_definition(conn)
    assert all(expected.values()) and stored_rollups(conn) == expected
    # and the writer goes on from there
    writer = sqlite_store.SqliteWriter(conn)
    last = conn.execute("SELECT max(ts) FROM traffic").fetchone()[0]
    writer.write([connection(ts=last + 10), connection(ts=last + 4000)])
    writer.prune(1, now=last + 86400 - 1800)
    assert stored_rollups(conn) == rollups_by_definition(conn)


# Writing and reading back


def test_connections_round_trip_through_the_view(db):
    written = [connection(), connection(BASH, send=5, recv=6, netns=4026531840,
                                        container="docker-0123abcd.scope")]
    sqlite_store.write_connections(db, written)
    rows = read_back(db)
    assert sorted((from_row(r) for r in rows), key=lambda c: c.identity.process.exe) == \
        sorted(written, key=lambda c: c.identity.process.exe)
    assert rows[0]["pexe"] == "/usr/bin/bash" and rows[0]["gpname"] == "systemd"


def test_contime_is_local_time_of_ts(db, tokyo_time):
    sqlite_store.write_connections(db, [connection(ts=1_700_000_000)])  # 22:13:20 UTC
    assert read_back(db)[0]["contime"] == "2023-11-15 07:13:20"


HOSTILE = {
    "escape": "\x1b[31mred\x1b[0m",
    "newline": "line one\nline two\r\n",
    "comma": "a,b,,c",
    "nul": "before\x00after",
    "invalid utf-8": b"caf\xe9 \xff\xfe".decode("utf-8", "surrogateescape"),
    "64 KiB": "x" * 65536 + "\x00end",
}


@pytest.mark.parametrize("value", HOSTILE.values(), ids=HOSTILE.keys())
def test_hostile_text_is_stored_byte_exact(db, value):
    process = ProcessInfo(value, value, value, value)
    endpoint = Endpoint(2, 17, value, 53, value, 53, value)
    written = connection(process, endpoint, container=value)
    sqlite_store.write_connections(db, [written])

    assert from_row(read_back(db)[0]) == written
    stored = db.execute("""SELECT CAST(exe AS BLOB), CAST(cmdline AS BLOB), typeof(cmdline)
                           FROM processes WHERE id = (SELECT process_id FROM identities)""")
    assert stored.fetchone() == (to_bytes(value), to_bytes(value), "text")
    assert db.execute("SELECT CAST(domain AS BLOB) FROM connections").fetchone()[0] == \
        to_bytes(value)


def test_values_differing_only_after_a_nul_stay_distinct(db):
    sqlite_store.write_connections(db, [connection(ProcessInfo("/bin/a")),
                                        connection(ProcessInfo("/bin/a\x00b"))])
    assert sorted(r["exe"] for r in read_back(db)) == ["/bin/a", "/bin/a\x00b"]


def test_same_key_is_summed_within_and_across_writes(db):
    sqlite_store.write_connections(db, [connection(send=1, recv=2), connection(send=10, recv=20)])
    sqlite_store.write_connections(db, [connection(send=100, recv=200, packets_sent=5)])
    [row] = read_back(db)
    assert (row["send"], row["recv"], row["packets_sent"], row["packets_recv"]) == (111, 222, 7, 6)


def test_a_different_window_is_a_new_row(db):
    sqlite_store.write_connections(db, [connection(ts=1000), connection(ts=1010)])
    assert [r["ts"] for r in read_back(db)] == [1000, 1010]


def test_processes_and_endpoints_are_stored_once(db):
    writer = sqlite_store.SqliteWriter(db)
    for ts in range(0, 100, 10):
        writer.write([connection(ts=ts), connection(BASH, ts=ts)])
    sqlite_store.write_connections(db, [connection(ts=500)])  # fresh writer, no cache
    counts = [db.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
              for t in ("processes", "identities", "endpoints", "traffic")]
    assert counts == [3, 2, 1, 21]


def test_hourly_rollup_equals_the_sums_of_traffic(db):
    rng = random.Random(1)
    writer = sqlite_store.SqliteWriter(db)
    processes = [CURL, BASH, ProcessInfo("/usr/bin/ssh", "ssh")]
    start = 1_699_999_200  # on the hour
    for ts in range(start, start + 4 * 3600, 600):
        writer.write([connection(rng.choice(processes), ts=ts, send=rng.randrange(10**6),
                                 recv=rng.randrange(10**9), packets_sent=rng.randrange(100))
                      for _ in range(5)])
    by_hour = """SELECT ts - ts % 3600, exe, sum(send), sum(recv), sum(packets_sent),
                        sum(packets_recv) FROM connections GROUP BY 1, 2 ORDER BY 1, 2"""
    hourly = """SELECT ts, exe, send, recv, packets_sent, packets_recv
                FROM connections_hourly ORDER BY 1, 2"""
    assert db.execute(hourly).fetchall() == db.execute(by_hour).fetchall()
    assert len(db.execute(hourly).fetchall()) == 4 * len(processes)


def test_rollups_follow_writes_and_retention(db):
    rng = random.Random(7)
    writer = sqlite_store.SqliteWriter(db)
    processes = [CURL, BASH, ProcessInfo("/usr/bin/ssh", "ssh")]
    # few local ports and addresses, so that pairs share peers and ports and come back later
    endpoints = [Endpoint(2, rng.choice((6, 17)), "10.0.0.2", 40000 + rng.randrange(4),
                          rng.choice(("93.184.216.34", "10.0.0.9")), rng.choice((53, 443)),
                          rng.choice(("com.example", "")))
                 for _ in range(12)]
    start = 1_700_000_000

    def write(first: int, windows: int) -> None:
        for w in range(windows):
            ts = first + 600 * w
            # a batch may span two hours, and repeat what an earlier batch wrote
            writer.write([connection(rng.choice(processes), rng.choice(endpoints),
                                     ts=ts + rng.choice((0, 0, 3600)), send=rng.randrange(10**6))
                          for _ in range(rng.randrange(1, 8))])

    write(start, 60)
    assert stored_rollups(db) == rollups_by_definition(db)
    writer.prune(1, now=start + 86400 + 5 * 3600 + 1234)  # the cutoff cuts an hour in two
    assert 0 < db.execute("SELECT count(*) FROM totals_by_peer").fetchone()[0]
    assert stored_rollups(db) == rollups_by_definition(db)
    write(start + 4 * 3600, 30)  # new traffic for pairs that were pruned, or kept
    writer.prune(1, now=start + 86400 + 8 * 3600)
    assert stored_rollups(db) == rollups_by_definition(db)
    writer.prune(1, now=start + 10 * 86400)  # everything goes
    assert stored_rollups(db) == {name: [] for name in stored_rollups(db)}


def test_the_writer_remembers_the_ids_of_what_recurs_only(db):
    """A storm's endpoints (one per ephemeral port) are looked up once and not kept; an endpoint
    that comes back is looked up once more, then remembered until release_memory()."""
    lookups = []
    db.set_trace_callback(lambda sql: lookups.append(sql) if sql.startswith("SELECT id FROM endpoints") else None)
    writer = sqlite_store.SqliteWriter(db)
    storm = [Endpoint(2, 6, "127.0.0.1", port, "127.0.0.1", 4000) for port in range(32768, 33768)]
    writer.write([connection(endpoint=e, ts=1000) for e in storm])
    assert len(lookups) == 1000 and len(writer._endpoints) == 0

    for ts in (1010, 1020, 1030, 1040):
        lookups.clear()
        writer.write([connection(endpoint=storm[0], ts=ts), connection(ts=ts)])
        assert len(lookups) == {1010: 2, 1020: 1, 1030: 0, 1040: 0}[ts]  # HTTPS is new at 1010
    writer.release_memory()
    lookups.clear()
    writer.write([connection(endpoint=storm[0], ts=1050), connection(ts=1050)])
    assert len(lookups) == 2
    assert db.execute("SELECT count(*) FROM endpoints").fetchone()[0] == 1001
    assert sorted((r["ts"], r["lport"], r["send"]) for r in read_back(db) if r["ts"] >= 1010) == \
        [(ts, port, 100) for ts in range(1010, 1060, 10) for port in (32768, 40000)]


def test_ids_forgotten_by_the_bounded_cache_are_read_again_not_inserted_again(db, monkeypatch):
    """With room for 2 ids per generation, 12 processes, 12 identities and 12 endpoints that all
    recur are forgotten and found again many times: each stays one row, and every write's
    traffic lands on its own identity and endpoint."""
    monkeypatch.setattr(sqlite_store.SqliteWriter, "CACHE_LIMIT", 2)
    writer = sqlite_store.SqliteWriter(db)
    keys = [(ProcessInfo(f"/usr/bin/p{i}", f"p{i}", f"p{i}", "%064x" % i), Endpoint(2, 6, "127.0.0.1", 1000 + i))
            for i in range(12)]
    rng = random.Random(7)
    for ts in range(1000, 1200, 10):
        writer.write([connection(*keys[i], ts=ts, send=i) for i in rng.sample(range(12), 8)])
    assert len(writer._identities) <= 4 and len(writer._endpoints) <= 4
    assert [db.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
            for table in ("processes", "identities", "endpoints")] == [14, 12, 12]  # + BASH, SYSTEMD
    rows = read_back(db)
    assert len(rows) == 20 * 8
    for row in rows:  # process i only ever talked to endpoint i, sending i bytes
        i = int(row["name"][1:])
        assert (row["lport"], row["send"]) == (1000 + i, i)


def test_remembered_ids_are_bounded_and_those_in_use_stay():
    ids = sqlite_store.RecentIds(limit=2)
    ids.keep("a", 1)
    ids.keep("b", 2)
    ids.keep("c", 3)  # the newer generation was full: a and b are now the older one
    assert ids.get("a") == 1  # used: back in the newer generation, with c
    ids.keep("d", 4)  # full again: b, unused for two generations, is forgotten
    assert (ids.get("b"), ids.get("a"), ids.get("c"), ids.get("d"), len(ids)) == (None, 1, 3, 4, 3)


def test_a_failed_write_leaves_nothing_behind(db):
    writer = sqlite_store.SqliteWriter(db)
    with pytest.raises(OverflowError):
        writer.write([connection(), connection(BASH, send=2**64)])
    assert read_back(db) == []
    assert stored_rollups(db) == {name: [] for name in stored_rollups(db)}
    writer.write([connection()])  # ids from the rolled-back transaction were not cached
    assert len(read_back(db)) == 1


# Pruning


def test_prune_deletes_traffic_older_than_retention_and_what_only_it_used(db):
    now = 1_700_000_000
    writer = sqlite_store.SqliteWriter(db)
    old, recent = now - 31 * 86400, now - 29 * 86400
    writer.write([connection(BASH, Endpoint(raddr="old"), ts=old),
                  connection(ts=old), connection(ts=recent)])
    writer.prune(30, now=now)

    assert [(r["exe"], r["ts"]) for r in read_back(db)] == [("/usr/bin/curl", recent)]
    assert [r["ts"] for r in read_back(db, "connections_hourly")] == [recent - recent % 3600]
    assert db.execute("SELECT count(*) FROM identities").fetchone()[0] == 1
    assert db.execute("SELECT raddr FROM endpoints").fetchall() == [(HTTPS.raddr,)]
    # BASH is still the parent of curl; the old process itself is gone
    assert db.execute("SELECT count(*) FROM processes").fetchone()[0] == 3

    writer.write([connection(BASH, ts=now)])  # cached ids were forgotten with the rows
    assert len(read_back(db)) == 2


def test_prune_keeps_an_hour_that_still_holds_recent_traffic(db):
    now = 1_700_000_000
    cutoff = now - 86400
    sqlite_store.write_connections(db, [connection(ts=cutoff - 10), connection(ts=cutoff + 10)])
    sqlite_store.prune(db, 1, now=now)
    assert [r["ts"] for r in read_back(db)] == [cutoff + 10]
    assert [r["ts"] for r in read_back(db, "connections_hourly")] == [cutoff - cutoff % 3600]


def test_retention_zero_keeps_everything(db):
    sqlite_store.write_connections(db, [connection(ts=0)])
    sqlite_store.prune(db, 0, now=10**10)
    assert len(read_back(db)) == 1


# Damaged files


def test_garbage_file_is_moved_aside_and_a_fresh_database_created(tmp_path):
    path = tmp_path / "snitch.db"
    garbage = os.urandom(8192)
    path.write_bytes(garbage)
    (tmp_path / "snitch.db-wal").write_bytes(b"wal garbage")

    conn, problem = sqlite_store.open_db(str(path))

    [bad] = tmp_path.glob("snitch.db.bad-*[0-9]")
    assert bad.read_bytes() == garbage
    assert Path(str(bad) + "-wal").read_bytes() == b"wal garbage"
    assert "snitch.db" in problem and str(bad) in problem
    sqlite_store.write_connections(conn, [connection()])
    assert len(read_back(conn)) == 1


def test_database_with_a_damaged_page_is_moved_aside(tmp_path):
    path = tmp_path / "snitch.db"
    conn, _ = sqlite_store.open_db(str(path))
    sqlite_store.write_connections(conn, [connection(ts=ts) for ts in range(2000)])
    sqlite_store.close_db(conn)
    data = bytearray(path.read_bytes())
    page_size = 4096
    data[3 * page_size: 5 * page_size] = b"\xa5" * (2 * page_size)  # wipe two b-tree pages
    path.write_bytes(bytes(data))

    conn, problem = sqlite_store.open_db(str(path))
    assert problem is not None and "moved to" in problem
    assert len(list(tmp_path.glob("snitch.db.bad-*[0-9]"))) == 1
    assert read_back(conn) == []


def test_someone_elses_database_is_moved_aside(tmp_path):
    path = tmp_path / "snitch.db"
    other = sqlite3.connect(path)
    other.execute("CREATE TABLE connections (exe TEXT, name TEXT)")  # the original's layout
    other.commit()
    other.close()
    conn, problem = sqlite_store.open_db(str(path))
    assert "did not create" in problem
    kind = conn.execute("SELECT type FROM sqlite_master WHERE name = 'connections'").fetchall()
    assert kind == [("view",)]


# Crash safety

CHILD = textwrap.dedent("""
    import sys
    sys.path.insert(0, sys.argv[3])
    from picosnitch.store import sqlite as sqlite_store
    from picosnitch.connection import Connection, Endpoint, Identity, ProcessInfo

    conn, problem = sqlite_store.open_db(sys.argv[1])
    assert problem is None, problem
    writer = sqlite_store.SqliteWriter(conn)
    batch = int(sys.argv[2])
    while True:
        # new processes and endpoints in every batch, so inserts happen too
        writer.write([Connection(Identity(ProcessInfo("/bin/p%d" % (i % 7), cmdline=str(batch))),
                                 Endpoint(2, 6, raddr="10.0.%d.%d" % (batch % 250, i)),
                                 ts=batch, send=i, recv=1) for i in range(200)])
        print(batch, flush=True)
        batch += 1
""")


def test_sigkill_while_writing_loses_no_committed_batch(tmp_path):
    path = str(tmp_path / "snitch.db")
    rng = random.Random(20)
    committed = []
    for round_ in range(20):
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, path, str(round_ * 1_000_000), str(REPO)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(rng.uniform(0.05, 0.4))  # sometimes still starting up or opening the db
        child.send_signal(signal.SIGKILL)
        out, err = child.communicate()
        assert child.returncode == -signal.SIGKILL, err
        committed += [int(line) for line in out.splitlines(keepends=True) if line.endswith("\n")]

        conn, problem = sqlite_store.open_db(path)
        assert problem is None
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        counts = dict(conn.execute("SELECT ts, count(*) FROM traffic GROUP BY ts"))
        sums = dict(conn.execute("SELECT hour, sum(send) FROM traffic_hourly GROUP BY hour"))
        conn.close()
        for batch in committed:
            assert counts.get(batch) == 200
        assert sum(sums.values()) == sum(counts.values()) // 200 * sum(range(200))
    assert len(committed) > 20  # the kills did land while writing
    conn = sqlite_store.open_readonly(path)
    assert conn.execute("SELECT count(*) FROM connections").fetchone() == \
        conn.execute("SELECT count(*) FROM traffic").fetchone()


# Readers


def test_readonly_connection_reads_but_cannot_write(tmp_path):
    path = str(tmp_path / "snitch.db")
    conn, _ = sqlite_store.open_db(path)
    sqlite_store.write_connections(conn, [connection(ProcessInfo("bad\udcff\x00"))])
    reader = sqlite_store.open_readonly(path)
    assert read_back(reader)[0]["exe"] == "bad\udcff\x00"
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        reader.execute("DELETE FROM traffic")


def test_readonly_open_of_a_missing_file_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        sqlite_store.open_readonly(str(tmp_path / "snitch.db"))


READER = ("import sys; sys.path.insert(0, sys.argv[2]); from picosnitch.store import sqlite as sqlite_store\n"
          "try:\n"
          "    print(sqlite_store.open_readonly(sys.argv[1])"
          ".execute('SELECT count(*) FROM connections').fetchone()[0])\n"
          "except PermissionError as e:\n"
          "    print(e)\n")


def read_as_nobody(path: str) -> str:
    return subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                           SYSTEM_PYTHON, "-c", READER, path, str(REPO)],
                          capture_output=True, text=True, check=True).stdout.strip()


# sys.executable may live under /root, out of an unprivileged user's reach
SYSTEM_PYTHON = "/usr/bin/python3"


@pytest.fixture
def shared_dir():
    """A root-owned directory others may enter but not write (tmp_path is private to root)."""
    if os.geteuid() != 0 or not shutil.which("setpriv") or not os.path.exists(SYSTEM_PYTHON):
        pytest.skip("needs root, setpriv and " + SYSTEM_PYTHON)
    path = tempfile.mkdtemp()
    os.chmod(path, 0o755)
    yield Path(path)
    shutil.rmtree(path)


def test_unprivileged_reader_while_daemon_runs_and_after_it_stops(shared_dir):
    path = str(shared_dir / "snitch.db")
    conn, _ = sqlite_store.open_db(path)
    sqlite_store.write_connections(conn, [connection()])
    assert read_as_nobody(path) == "1"  # -wal and -shm exist and are readable
    sqlite_store.close_db(conn)
    assert sorted(p.name for p in shared_dir.iterdir()) == ["snitch.db"]
    assert read_as_nobody(path) == "1"  # rollback journal: nothing to create


def test_unprivileged_reader_without_permission_is_told_what_is_missing(shared_dir):
    path = shared_dir / "snitch.db"
    sqlite_store.close_db(sqlite_store.open_db(str(path))[0])
    path.chmod(0o600)
    assert "needs read permission on the file" in read_as_nobody(str(path))


def test_unprivileged_reader_of_a_wal_file_without_shm_is_told_how_to_fix_it(shared_dir):
    path = shared_dir / "snitch.db"
    sqlite_store.open_db(str(path))[0].close()  # plain close: stays in WAL mode
    assert "-shm is missing" in read_as_nobody(str(path))
