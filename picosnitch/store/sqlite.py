"""Write Connections to snitch.db and open it for reading.

Text values are stored byte-exact: every string is bound as the bytes it stands for
(`sanitize.to_bytes`) and turned into TEXT by `CAST(? AS TEXT)`, which copies the bytes
unchanged, NUL and invalid UTF-8 included. Connections opened here read them back through
`decode_text`, so a value comes back as the same surrogateescape'd str it went in as. Any other
connection to the file must set `conn.text_factory = decode_text` as well, or reading invalid
UTF-8 raises.

Crash safety comes from WAL mode and one short transaction per write window: after a kill -9 at
any moment the file opens cleanly and holds every committed window.
"""

import os
import sqlite3
import time
from pathlib import Path

from picosnitch.connection import Connection, Endpoint, Identity, ProcessInfo
from picosnitch.sanitize import to_bytes
from picosnitch.store import schema as db_schema

BUSY_TIMEOUT_MS = 10_000

# Error codes (primary, low byte) that mean the file itself is damaged.
_SQLITE_CORRUPT, _SQLITE_NOTADB = 11, 26
_DAMAGE_MESSAGES = ("file is not a database", "database disk image is malformed")


def decode_text(raw: bytes) -> str:
    """text_factory for snitch.db: TEXT bytes as picosnitch's lossless str."""
    return raw.decode("utf-8", "surrogateescape")


def _connect(target: str, uri: bool = False) -> sqlite3.Connection:
    # isolation_level=None: we issue BEGIN/COMMIT ourselves, so no transaction is ever left
    # open behind our back between write windows.
    conn = sqlite3.connect(target, uri=uri, isolation_level=None, check_same_thread=False)
    conn.text_factory = decode_text
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS:d}")
    return conn


def _readonly_uri(path: str) -> str:
    return Path(path).absolute().as_uri() + "?mode=ro"


class _Damaged(Exception):
    """The file is not a usable database; the message says why."""


def _check(conn: sqlite3.Connection) -> None:
    """Raise _Damaged if the file is not a database or `PRAGMA quick_check` finds a fault."""
    try:
        result = conn.execute("PRAGMA quick_check(1)").fetchone()[0]
    except sqlite3.DatabaseError as exc:
        code = getattr(exc, "sqlite_errorcode", None)  # Python 3.11+
        damaged = (code & 0xFF in (_SQLITE_CORRUPT, _SQLITE_NOTADB) if code is not None
                   else any(message in str(exc) for message in _DAMAGE_MESSAGES))
        if damaged:
            raise _Damaged(str(exc)) from exc
        raise  # locked, permission denied, disk full...: not the file's fault
    if result != "ok":
        raise _Damaged(f"quick_check: {result}")


def _open_checked(path: str) -> sqlite3.Connection:
    """Open, check and prepare the database; raise _Damaged or SchemaError if it is unusable."""
    checked = False
    if os.path.exists(path):
        # Check read-only first: a writable connection to a damaged file checkpoints or
        # deletes its -wal on close, and the -wal is part of what we move aside.
        reader = _connect(_readonly_uri(path), uri=True)
        try:
            _check(reader)
            checked = True
        except sqlite3.DatabaseError:
            pass  # e.g. a hot journal only a writer may roll back: checked below instead
        finally:
            reader.close()
    conn = _connect(path)
    try:
        if not checked:
            _check(conn)
        # WAL: readers never block the writer, and a commit is one append to the -wal file.
        # synchronous=NORMAL: in WAL mode a commit survives a crash of the process (kill -9);
        # only a power loss or OS crash can drop the last commits, never corrupt the file.
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
        # Each window touches index pages all over the file (one per identity and endpoint);
        # caching them (up to 16 MiB, taken only as the file grows) made bench/sqlite_write.py
        # about 1.3x faster than the 2 MiB default.
        conn.execute("PRAGMA cache_size = -16384")
        conn.execute("PRAGMA temp_store = MEMORY")  # the writer's temp.batch
        db_schema.ensure_schema(conn)
    except BaseException:
        conn.close()
        raise
    return conn


def _move_aside(path: str) -> str:
    bad = f"{path}.bad-{int(time.time())}"
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(path + suffix):
            os.replace(path + suffix, bad + suffix)
    return bad


def open_db(path: str) -> "tuple[sqlite3.Connection, str | None]":
    """Open (creating if needed) snitch.db for writing; return (connection, problem).

    If the file is damaged (not a database, or `PRAGMA quick_check` fails) or holds a schema
    this picosnitch did not create, it is renamed to `<path>.bad-<unix time>` together with its
    -wal and -shm files, a fresh database is created, and `problem` is a message for error.log.
    Otherwise `problem` is None. A database from a newer picosnitch raises SchemaError instead:
    it is healthy, and moving it aside would hide its history from that newer version. Other
    errors (permission denied, locked, disk full) are raised as sqlite3 errors and leave the
    file alone. The directory must already exist.
    """
    try:
        return _open_checked(path), None
    except db_schema.SchemaError as exc:
        if isinstance(exc, db_schema.NewerSchemaError):
            raise
        reason = str(exc)
    except _Damaged as exc:
        reason = str(exc)
    bad = _move_aside(path)
    return _open_checked(path), f"{path} was unusable ({reason}); moved to {bad}, started a new one"


def close_db(conn: sqlite3.Connection) -> None:
    """Close the writer's connection at a clean shutdown.

    Switching back to a rollback journal checkpoints the WAL and removes -wal/-shm, so readers
    without write access to the directory can open the file while the daemon is stopped (a
    read-only WAL database needs an -shm file they cannot create). If a reader has the file
    open the switch does not happen; the -wal/-shm files then stay, and readers can use them.
    """
    try:
        conn.execute("PRAGMA busy_timeout = 0")
        conn.execute("PRAGMA journal_mode = DELETE")
    except sqlite3.OperationalError:
        pass  # busy: a reader holds the file, see above
    conn.close()


def open_readonly(path: str) -> sqlite3.Connection:
    """Open snitch.db read-only for a UI (never creates or changes anything).

    Raises FileNotFoundError if there is no such file, and PermissionError naming what is
    missing when it cannot be read.
    """
    try:
        os.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist (has picosnitch run yet?)") from None
    except OSError:
        pass  # unreadable directory: connect below fails and says what permission is needed
    try:
        conn = _connect(_readonly_uri(path), uri=True)
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except sqlite3.OperationalError as exc:
        if os.access(path, os.R_OK) and not os.path.exists(path + "-shm"):
            # WAL mode without an -shm file: only someone who may write the directory can make
            # one. close_db() avoids this; starting the daemon once repairs it.
            raise PermissionError(
                f"cannot read {path} ({exc}): it is in WAL mode and {path}-shm is missing; it "
                f"needs write permission on the directory, or start picosnitch once") from exc
        raise PermissionError(
            f"cannot read {path} ({exc}): it needs read permission on the file and on its -wal "
            f"and -shm files if they exist, and search permission on its directory") from exc
    db_schema.add_missing_columns_for_reading(conn)
    return conn


class RecentIds:
    """Ids of rows that recur, by key, in two generations of at most `limit` entries each.

    Only keys that come back are worth remembering: a connection storm makes an endpoint per
    connection (its local port), and remembering those would keep tens of thousands of objects
    alive long after the storm. A key used while in the older generation moves to the newer one;
    when the newer one is full it becomes the older one, and what was older is forgotten.
    """

    def __init__(self, limit: int):
        self.limit = limit
        self._new: dict = {}
        self._old: dict = {}

    def __len__(self) -> int:
        return len(self._new) + len(self._old)

    def get(self, key) -> "int | None":
        found = self._new.get(key)
        if found is None:
            found = self._old.pop(key, None)
            if found is not None:
                self.keep(key, found)
        return found

    def keep(self, key, row_id: int) -> None:
        if len(self._new) >= self.limit:
            self._old, self._new = self._new, {}
        self._new[key] = row_id

    def clear(self) -> None:
        self._new.clear()
        self._old.clear()


class SqliteWriter:
    """Writes Connections, remembering the ids of processes, identities and endpoints that recur.

    An id is remembered when a write finds its row already stored (RecentIds), so the cache only
    ever holds ids of committed rows; prune(), which may delete them, empties it. Use one writer
    per database and let nothing else write to it.
    """

    CACHE_LIMIT = 4096  # entries per kind and generation (RecentIds)

    def __init__(self, conn: sqlite3.Connection):
        self.conn = conn
        self.conn.execute(_CREATE_BATCH)
        # One cursor for every statement of a write. conn.execute() makes a cursor per call, and
        # the connection keeps a weak reference to each of the last 200: garbage per row, and
        # after a storm those last references would pin the memory around them.
        self._cursor = conn.cursor()
        self._processes = RecentIds(self.CACHE_LIMIT)
        self._identities = RecentIds(self.CACHE_LIMIT)
        self._endpoints = RecentIds(self.CACHE_LIMIT)

    def write(self, connections: "list[Connection]") -> None:
        """Add the traffic of `connections` to snitch.db in one transaction.

        Rows with the same (identity, endpoint, ts), in this batch or already stored, are
        summed; the hourly rollup and the others derived from it (db_schema) get the same sums.
        The rows go into temp.batch first, and every table is then changed by one statement
        over it: the rollups need to know which pairs and hourly rows are new, which is a
        set-wide question, and that way the writer's per-row cost is SQLite's, not Python's.
        """
        merged: dict = {}
        for c in connections:
            total = merged.get(c.key())
            if total is None:
                merged[c.key()] = [c.send, c.recv, c.packets_sent, c.packets_recv]
            else:
                total[0] += c.send
                total[1] += c.recv
                total[2] += c.packets_sent
                total[3] += c.packets_recv
        if not merged:
            return
        new: tuple[dict, dict, dict] = ({}, {}, {})  # ids inserted by this transaction, never cached: see RecentIds
        with self.conn:
            self._cursor.execute("BEGIN IMMEDIATE")
            self._cursor.executemany(_INSERT_BATCH, [
                (ts, ts - ts % 3600, self._identity_id(identity, new),
                 self._endpoint_id(endpoint, new[2]), *counts)
                for (identity, endpoint, ts), counts in merged.items()])
            db_schema.add_to_rollups(self._cursor, _BATCH_PAIRS, _BATCH_HOURS)  # runs conn.execute()
            self._cursor.execute(_UPSERT_TRAFFIC)
            self._cursor.execute(_UPSERT_HOURLY)
            self._cursor.execute("DELETE FROM temp.batch")

    def release_memory(self) -> None:
        """Forget the cached ids and let SQLite free its page cache (sqlite3_db_release_memory),
        after a burst; both fill again as rows are written."""
        for cache in (self._processes, self._identities, self._endpoints):
            cache.clear()
        self._cursor.execute("PRAGMA shrink_memory")

    def prune(self, retention_days: int, now: "float | None" = None) -> None:
        """prune() this database, then release_memory(): forget the cached ids it may have
        deleted, and the pages it read."""
        prune(self.conn, retention_days, now)
        self.release_memory()

    def _lookup(self, cache: RecentIds, fresh: dict, key, select: str, insert: str, params) -> int:
        """Id of `key`'s row, inserting it if new; `params()` gives the values to bind."""
        found = cache.get(key)
        if found is None:
            found = fresh.get(key)
        if found is None:
            values = params()
            row = self._cursor.execute(select, values).fetchone()
            if row:  # stored by an earlier write: it recurs
                found = row[0]
                cache.keep(key, found)
            else:
                found = fresh[key] = self._cursor.execute(insert, values).lastrowid
        assert found is not None, "an INSERT has a row id"
        return found

    def _process_id(self, p: ProcessInfo, fresh: dict) -> int:
        return self._lookup(
            self._processes, fresh, p, _SELECT_PROCESS, _INSERT_PROCESS,
            lambda: tuple(to_bytes(getattr(p, name)) for name in _PROCESS_COLUMNS))

    def _identity_id(self, i: Identity, new: tuple) -> int:
        return self._lookup(
            self._identities, new[1], i, _SELECT_IDENTITY, _INSERT_IDENTITY,
            lambda: (self._process_id(i.process, new[0]), self._process_id(i.parent, new[0]),
                     self._process_id(i.grandparent, new[0]), i.uid, i.netns,
                     to_bytes(i.container)))

    def _endpoint_id(self, e: Endpoint, fresh: dict) -> int:
        return self._lookup(
            self._endpoints, fresh, e, _SELECT_ENDPOINT, _INSERT_ENDPOINT,
            lambda: (e.family, e.protocol, to_bytes(e.laddr), e.lport, to_bytes(e.raddr),
                     e.rport, to_bytes(e.domain), to_bytes(e.domain_source)))


_T = "CAST(? AS TEXT)"
_PROCESS_COLUMNS = ("exe", "name", "cmdline", "sha256", "script", "script_sha256", "exe_state")
_SELECT_PROCESS = (f"SELECT id FROM processes WHERE exe = {_T} AND name = {_T} "
                   f"AND cmdline = {_T} AND sha256 = {_T} AND script = {_T} AND script_sha256 = {_T} "
                   f"AND exe_state = {_T}")
_INSERT_PROCESS = ("INSERT INTO processes (exe, name, cmdline, sha256, script, script_sha256, exe_state) "
                   f"VALUES ({_T}, {_T}, {_T}, {_T}, {_T}, {_T}, {_T})")
_SELECT_IDENTITY = ("SELECT id FROM identities WHERE process_id = ? AND parent_id = ? "
                    f"AND grandparent_id = ? AND uid = ? AND netns = ? AND container = {_T}")
_INSERT_IDENTITY = ("INSERT INTO identities (process_id, parent_id, grandparent_id, uid, netns, "
                    f"container) VALUES (?, ?, ?, ?, ?, {_T})")
_SELECT_ENDPOINT = ("SELECT id FROM endpoints WHERE family = ? AND protocol = ? "
                    f"AND laddr = {_T} AND lport = ? AND raddr = {_T} AND rport = ? "
                    f"AND domain = {_T} AND domain_source = {_T}")
_INSERT_ENDPOINT = ("INSERT INTO endpoints (family, protocol, laddr, lport, raddr, rport, domain, domain_source) "
                    f"VALUES (?, ?, {_T}, ?, {_T}, ?, {_T}, {_T})")


# One write's rows, merged per (ts, identity, endpoint); `hour` computed in Python (floor).
_CREATE_BATCH = """CREATE TEMP TABLE IF NOT EXISTS batch (ts INTEGER, hour INTEGER,
    identity_id INTEGER, endpoint_id INTEGER, send INTEGER, recv INTEGER, packets_sent INTEGER,
    packets_recv INTEGER)"""
_INSERT_BATCH = "INSERT INTO temp.batch VALUES (?, ?, ?, ?, ?, ?, ?, ?)"

# What the batch adds to the rollups (db_schema.add_to_rollups), asked before traffic_hourly
# takes it: per pair, and whether the pair is new; per (hour, identity), how many hourly rows
# are new.
_BATCH_PAIRS = """SELECT identity_id, endpoint_id, sum(send), sum(recv),
    NOT EXISTS (SELECT 1 FROM traffic_hourly AS h WHERE h.endpoint_id = b.endpoint_id
                AND h.identity_id = b.identity_id)
    FROM temp.batch AS b GROUP BY identity_id, endpoint_id"""
_BATCH_HOURS = """SELECT hour, identity_id, sum(send), sum(recv),
    sum(NOT EXISTS (SELECT 1 FROM traffic_hourly AS h WHERE h.hour = g.hour
                    AND h.identity_id = g.identity_id AND h.endpoint_id = g.endpoint_id))
    FROM (SELECT hour, identity_id, endpoint_id, sum(send) AS send, sum(recv) AS recv
          FROM temp.batch GROUP BY hour, identity_id, endpoint_id) AS g
    WHERE true GROUP BY hour, identity_id"""


def _upsert(table: str, time_column: str) -> str:
    """INSERT of temp.batch's rows (summed per hour for the rollup) that adds the counts to
    an existing row with the same key."""
    key = f"{time_column}, identity_id, endpoint_id"
    return f"""INSERT INTO {table} ({key}, send, recv, packets_sent, packets_recv)
SELECT {key}, sum(send), sum(recv), sum(packets_sent), sum(packets_recv) FROM temp.batch
WHERE true GROUP BY {key} ON CONFLICT ({key}) DO UPDATE SET
    send = send + excluded.send, recv = recv + excluded.recv,
    packets_sent = packets_sent + excluded.packets_sent,
    packets_recv = packets_recv + excluded.packets_recv"""


_UPSERT_TRAFFIC = _upsert("traffic", "ts")
_UPSERT_HOURLY = _upsert("traffic_hourly", "hour")

# Pruning: what the hourly rows about to go take from the rollups; a pair left with no hourly
# row (EXISTS is 0) takes its count.
_PRUNED_PAIRS = """SELECT identity_id, endpoint_id, -sum(send), -sum(recv),
    EXISTS (SELECT 1 FROM traffic_hourly AS h WHERE h.endpoint_id = d.endpoint_id
            AND h.identity_id = d.identity_id AND h.hour > :last) - 1
    FROM traffic_hourly AS d WHERE hour <= :last GROUP BY identity_id, endpoint_id"""


def write_connections(conn: sqlite3.Connection, connections: "list[Connection]") -> None:
    """Add `connections` to snitch.db in one transaction (see SqliteWriter.write).

    Looks every id up afresh; a long-running writer should keep one SqliteWriter instead.
    """
    SqliteWriter(conn).write(connections)


def prune(conn: sqlite3.Connection, retention_days: int, now: "float | None" = None) -> None:
    """Delete traffic older than `retention_days` (0 keeps everything) and what it alone used.

    An hourly rollup row goes once its whole hour is older than the retention, and the rollups
    derived from it (db_schema) lose what it added. Processes, identities and endpoints no
    longer referenced by any traffic are deleted too.
    """
    if retention_days <= 0:
        return
    cutoff = int(time.time() if now is None else now) - retention_days * 86400
    last = {"last": cutoff - 3600}  # hourly rows up to this one end before the cutoff
    with conn:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("DELETE FROM traffic WHERE ts < ?", (cutoff,))
        db_schema.add_to_rollups(conn, _PRUNED_PAIRS, params=last)
        conn.execute("DELETE FROM totals_by_peer WHERE pairs = 0")
        conn.execute("DELETE FROM totals_by_lport WHERE pairs = 0")
        conn.execute("DELETE FROM hourly_by_identity WHERE hour <= :last", last)
        conn.execute("DELETE FROM traffic_hourly WHERE hour <= :last", last)
        conn.execute("""DELETE FROM identities WHERE
            NOT EXISTS (SELECT 1 FROM traffic WHERE identity_id = identities.id) AND
            NOT EXISTS (SELECT 1 FROM traffic_hourly WHERE identity_id = identities.id)""")
        conn.execute("""DELETE FROM endpoints WHERE
            NOT EXISTS (SELECT 1 FROM traffic WHERE endpoint_id = endpoints.id) AND
            NOT EXISTS (SELECT 1 FROM traffic_hourly WHERE endpoint_id = endpoints.id)""")
        conn.execute("""DELETE FROM processes WHERE id NOT IN (
            SELECT process_id FROM identities UNION SELECT parent_id FROM identities
            UNION SELECT grandparent_id FROM identities)""")
    conn.execute("PRAGMA optimize")  # refresh the planner's statistics now and then
