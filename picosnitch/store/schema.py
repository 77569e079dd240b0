"""The snitch.db schema, in one place: tables, indexes, views and migrations.

Processes, identities and endpoints are stored once each and referred to by integer id;
`traffic` holds one row per (write window, identity, endpoint) and `traffic_hourly` the same
sums per hour. People query the file with their own tools through the `connections` view,
whose columns are documented in VIEW_COLUMNS and kept stable.

Three more rollups let the UIs answer long time ranges without touching every connection (a
month of a busy machine holds ~10^6 (identity, endpoint) pairs, one per TCP connection, because
each has its own local port; see store.queries for how they are read):

- `hourly_by_identity`: traffic_hourly summed per (hour, identity), with how many of its rows
  (distinct endpoints) went into each sum: the entry-time tab, by hour.
- `totals_by_peer`: everything stored, summed per identity and endpoint without its local port
  (laddr, raddr, rport, domain), with the number of distinct (identity, endpoint) pairs in each.
- `totals_by_lport`: the same per identity and local port.

All three are derived from traffic_hourly: they change in the transaction that writes traffic
(store.sqlite.SqliteWriter) and in the one that prunes it (store.sqlite.prune), through
add_to_rollups, which also fills them when a version-1 database is migrated.

Text columns hold the exact bytes picosnitch saw (see store.sqlite for how they are bound and
read back): they may contain escape sequences, newlines, NUL and invalid UTF-8. Note that
SQLite's length() and some string functions stop at the first NUL; compare with
CAST(column AS BLOB) when that matters.
"""

import sqlite3
from typing import Optional

SCHEMA_VERSION = 4

# (column, meaning) in the order the `connections` view exposes them. The README quotes this.
VIEW_COLUMNS = (
    ("contime", "local time of the start of the write window, 'YYYY-MM-DD HH:MM:SS'"),
    ("send", "bytes sent in the window (payload bytes as the socket saw them)"),
    ("recv", "bytes received in the window"),
    ("exe", "path of the process's executable"),
    ("name", "process name (comm)"),
    ("cmdline", "command line, arguments separated by spaces"),
    ("sha256", "sha256 of the executable, hex"),
    ("pexe", "parent's executable"),
    ("pname", "parent's name"),
    ("pcmdline", "parent's command line"),
    ("psha256", "parent's executable sha256"),
    ("uid", "user id the process ran as (-1 unknown)"),
    ("lport", "local port (-1 not logged or not applicable)"),
    ("rport", "remote port (-1 not logged or not applicable)"),
    ("laddr", "local address"),
    ("raddr", "remote address"),
    ("domain", "domain name the remote address was resolved from, reversed (com.example.www)"),
    ("gpexe", "grandparent's executable"),
    ("gpname", "grandparent's name"),
    ("gpcmdline", "grandparent's command line"),
    ("gpsha256", "grandparent's executable sha256"),
    ("family", "address family number (2 AF_INET, 10 AF_INET6, 17 AF_PACKET, ...)"),
    ("protocol", "IP protocol number (6 TCP, 17 UDP, ...), ethertype for AF_PACKET"),
    ("packets_sent", "send operations (datagrams, send calls) in the window"),
    ("packets_recv", "receive operations in the window"),
    ("netns", "network namespace inode number (0 unknown)"),
    ("container", "container id or systemd unit from the cgroup path ('' none)"),
    ("ts", "unix time (seconds, UTC) of the start of the write window"),
    ("domain_source", "how the domain was learned: getaddrinfo, dns, sni or http; with ':parent' when the "
                      "parent looked it up, 'dns:resolver' from the namespace's resolver daemon ('' no domain)"),
    ("script", "the script an interpreter ran (python3 evil.py: evil.py), as the process named it, made "
               "absolute; '' for none"),
    ("script_sha256", "sha256 of that script, of the file that ran ('' for no script)"),
    ("exe_state", "markers of an unusual executable, comma-separated: memfd, deleted, replaced, "
                  "world-writable-dir, loader:PATH (ld.so ran the program in exe); '' for none"),
)

_TABLES = """
CREATE TABLE processes (
    id INTEGER PRIMARY KEY,
    exe TEXT NOT NULL,
    name TEXT NOT NULL,
    cmdline TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    script TEXT NOT NULL DEFAULT '',
    script_sha256 TEXT NOT NULL DEFAULT '',
    exe_state TEXT NOT NULL DEFAULT ''
);
CREATE UNIQUE INDEX processes_key ON processes (exe, name, cmdline, sha256, script, script_sha256, exe_state);

CREATE TABLE identities (
    id INTEGER PRIMARY KEY,
    process_id INTEGER NOT NULL REFERENCES processes (id),
    parent_id INTEGER NOT NULL REFERENCES processes (id),
    grandparent_id INTEGER NOT NULL REFERENCES processes (id),
    uid INTEGER NOT NULL,
    netns INTEGER NOT NULL,
    container TEXT NOT NULL
);
CREATE UNIQUE INDEX identities_key
    ON identities (process_id, parent_id, grandparent_id, uid, netns, container);

CREATE TABLE endpoints (
    id INTEGER PRIMARY KEY,
    family INTEGER NOT NULL,
    protocol INTEGER NOT NULL,
    laddr TEXT NOT NULL,
    lport INTEGER NOT NULL,
    raddr TEXT NOT NULL,
    rport INTEGER NOT NULL,
    domain TEXT NOT NULL,
    domain_source TEXT NOT NULL DEFAULT ''
);
CREATE UNIQUE INDEX endpoints_key
    ON endpoints (family, protocol, laddr, lport, raddr, rport, domain, domain_source);
-- "who talked to this address / domain" without scanning every endpoint
CREATE INDEX endpoints_raddr ON endpoints (raddr);
CREATE INDEX endpoints_domain ON endpoints (domain);

-- The primary key doubles as the time index the UIs scan most.
CREATE TABLE traffic (
    ts INTEGER NOT NULL,
    identity_id INTEGER NOT NULL REFERENCES identities (id),
    endpoint_id INTEGER NOT NULL REFERENCES endpoints (id),
    send INTEGER NOT NULL,
    recv INTEGER NOT NULL,
    packets_sent INTEGER NOT NULL,
    packets_recv INTEGER NOT NULL,
    PRIMARY KEY (ts, identity_id, endpoint_id)
) WITHOUT ROWID;
CREATE INDEX traffic_identity ON traffic (identity_id, ts);
CREATE INDEX traffic_endpoint ON traffic (endpoint_id, ts);

-- Same sums per hour (hour = ts - ts % 3600), upserted in the transaction that writes traffic,
-- so long time ranges are read from a table about 360 times smaller at the default 10 s window.
CREATE TABLE traffic_hourly (
    hour INTEGER NOT NULL,
    identity_id INTEGER NOT NULL REFERENCES identities (id),
    endpoint_id INTEGER NOT NULL REFERENCES endpoints (id),
    send INTEGER NOT NULL,
    recv INTEGER NOT NULL,
    packets_sent INTEGER NOT NULL,
    packets_recv INTEGER NOT NULL,
    PRIMARY KEY (hour, identity_id, endpoint_id)
) WITHOUT ROWID;
CREATE INDEX traffic_hourly_identity ON traffic_hourly (identity_id, hour);
CREATE INDEX traffic_hourly_endpoint ON traffic_hourly (endpoint_id, hour);
"""

# Added in version 2 (the module docstring says what they hold). `pairs` counts distinct
# (identity, endpoint) pairs: rows of traffic_hourly in hourly_by_identity, pairs with any
# traffic_hourly row in the totals, whose rows go once their last pair is pruned.
_ROLLUP_TABLES = """
CREATE TABLE hourly_by_identity (
    hour INTEGER NOT NULL,
    identity_id INTEGER NOT NULL REFERENCES identities (id),
    send INTEGER NOT NULL,
    recv INTEGER NOT NULL,
    pairs INTEGER NOT NULL,
    PRIMARY KEY (hour, identity_id)
) WITHOUT ROWID;

CREATE TABLE totals_by_peer (
    identity_id INTEGER NOT NULL REFERENCES identities (id),
    raddr TEXT NOT NULL,
    rport INTEGER NOT NULL,
    domain TEXT NOT NULL,
    laddr TEXT NOT NULL,
    send INTEGER NOT NULL,
    recv INTEGER NOT NULL,
    pairs INTEGER NOT NULL,
    PRIMARY KEY (identity_id, raddr, rport, domain, laddr)
) WITHOUT ROWID;

CREATE TABLE totals_by_lport (
    identity_id INTEGER NOT NULL REFERENCES identities (id),
    lport INTEGER NOT NULL,
    send INTEGER NOT NULL,
    recv INTEGER NOT NULL,
    pairs INTEGER NOT NULL,
    PRIMARY KEY (lport, identity_id)  -- the local port tab groups in this order, unsorted
) WITHOUT ROWID;
"""

# Guard mode's verdicts, one row per connection it decided (see picosnitch/guard/store.py).
# Created in every database at open (IF NOT EXISTS): it needs no schema version of its own.
GUARD_TABLES = """
CREATE TABLE IF NOT EXISTS guard_verdicts (
    ts REAL NOT NULL,
    direction TEXT NOT NULL,
    family INTEGER NOT NULL,
    protocol INTEGER NOT NULL,
    laddr TEXT NOT NULL,
    lport INTEGER NOT NULL,
    raddr TEXT NOT NULL,
    rport INTEGER NOT NULL,
    domain TEXT NOT NULL,
    exe TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    pexe TEXT NOT NULL,
    cmdline TEXT NOT NULL,
    uid INTEGER NOT NULL,
    verdict TEXT NOT NULL,
    reason TEXT NOT NULL,
    rule TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS guard_verdicts_ts ON guard_verdicts (ts);
"""

# Where each view column comes from; `t` is the traffic table (or its hourly rollup).
_SOURCES = {
    "contime": "datetime(t.{ts}, 'unixepoch', 'localtime')",
    "send": "t.send", "recv": "t.recv",
    "exe": "p.exe", "name": "p.name", "cmdline": "p.cmdline", "sha256": "p.sha256",
    "pexe": "pp.exe", "pname": "pp.name", "pcmdline": "pp.cmdline", "psha256": "pp.sha256",
    "uid": "i.uid",
    "lport": "e.lport", "rport": "e.rport", "laddr": "e.laddr", "raddr": "e.raddr",
    "domain": "e.domain", "domain_source": "e.domain_source",
    "gpexe": "gp.exe", "gpname": "gp.name", "gpcmdline": "gp.cmdline", "gpsha256": "gp.sha256",
    "family": "e.family", "protocol": "e.protocol",
    "packets_sent": "t.packets_sent", "packets_recv": "t.packets_recv",
    "netns": "i.netns", "container": "i.container",
    "ts": "t.{ts}",
    "script": "p.script", "script_sha256": "p.script_sha256", "exe_state": "p.exe_state",
}


def _view_sql(view: str, table: str, ts: str) -> str:
    columns = ",\n    ".join(
        "%s AS %s" % (_SOURCES[name].format(ts=ts), name) for name, _ in VIEW_COLUMNS)
    return f"""
CREATE VIEW {view} AS SELECT
    {columns}
FROM {table} AS t
JOIN identities AS i ON i.id = t.identity_id
JOIN endpoints AS e ON e.id = t.endpoint_id
JOIN processes AS p ON p.id = i.process_id
JOIN processes AS pp ON pp.id = i.parent_id
JOIN processes AS gp ON gp.id = i.grandparent_id;
"""


# `connections`: one row per (identity x endpoint x write window).
# `connections_hourly`: the same columns over the hourly rollup; ts is the start of the hour.
_VIEWS = _view_sql("connections", "traffic", "ts") + _view_sql(
    "connections_hourly", "traffic_hourly", "hour")


_CREATE_PAIR_DELTAS = """CREATE TEMP TABLE IF NOT EXISTS pair_deltas (identity_id INTEGER,
    endpoint_id INTEGER, send INTEGER, recv INTEGER, new INTEGER)"""


def _upsert_sums(table: str, key: str, columns: str, select: str) -> str:
    """INSERT of `select`'s rows into `table` that adds send, recv and pairs to an existing
    row with the same `key`. (`WHERE true` keeps SQLite's parser from reading ON CONFLICT as
    a join's ON.)"""
    return f"""INSERT INTO {table} ({columns}, send, recv, pairs) {select}
ON CONFLICT ({key}) DO UPDATE SET send = send + excluded.send, recv = recv + excluded.recv,
    pairs = pairs + excluded.pairs"""


def add_to_rollups(conn: "sqlite3.Connection | sqlite3.Cursor", pairs: str, hours: Optional[str] = None,
                   params: "dict | tuple" = ()) -> None:
    """Add to the rollups, inside the caller's transaction, before traffic_hourly changes.

    `pairs` is a SELECT of (identity_id, endpoint_id, send, recv, new): one row per pair with
    what to add to its sums, and `new` 1 if the pair had no traffic_hourly row before (-1 if it
    has none left, when pruning). `hours`, if given, is a SELECT of (hour, identity_id, send,
    recv, new) with `new` the number of traffic_hourly rows it adds. Both may use `params`.
    """
    conn.execute(_CREATE_PAIR_DELTAS)
    conn.execute(f"INSERT INTO temp.pair_deltas {pairs}", params)
    for table, key in (("totals_by_peer", "identity_id, raddr, rport, domain, laddr"),
                       ("totals_by_lport", "lport, identity_id")):
        columns = ", ".join(f"e.{c}" if c != "identity_id" else "d.identity_id"
                            for c in key.split(", "))
        conn.execute(_upsert_sums(table, key, key, f"""SELECT {columns}, sum(d.send),
            sum(d.recv), sum(d.new) FROM temp.pair_deltas AS d
            JOIN endpoints AS e ON e.id = d.endpoint_id WHERE true GROUP BY {columns}"""))
    conn.execute("DELETE FROM temp.pair_deltas")
    if hours is not None:
        conn.execute(_upsert_sums("hourly_by_identity", "hour, identity_id", "hour, identity_id",
                                  hours), params)


def fill_rollups(conn: sqlite3.Connection) -> None:
    """Fill the (empty) rollups from traffic_hourly, inside the caller's transaction."""
    add_to_rollups(
        conn, "SELECT identity_id, endpoint_id, sum(send) AS send, sum(recv) AS recv, 1 AS new "
              "FROM traffic_hourly GROUP BY identity_id, endpoint_id",
        "SELECT hour, identity_id, sum(send), sum(recv), count(*) FROM traffic_hourly "
        "WHERE true GROUP BY hour, identity_id")


def _add_rollups(conn: sqlite3.Connection) -> None:
    """Version 1 -> 2: create the rollups and fill them from traffic_hourly."""
    _run_script(conn, _ROLLUP_TABLES)
    fill_rollups(conn)


def _recreate_views(conn: sqlite3.Connection) -> None:
    conn.execute("DROP VIEW IF EXISTS connections")
    conn.execute("DROP VIEW IF EXISTS connections_hourly")
    _run_script(conn, _VIEWS)


def _add_domain_source(conn: sqlite3.Connection) -> None:
    """Version 2 -> 3: endpoints say how their domain was learned ('' for rows written before)."""
    conn.execute("ALTER TABLE endpoints ADD COLUMN domain_source TEXT NOT NULL DEFAULT ''")
    conn.execute("DROP INDEX endpoints_key")
    conn.execute("CREATE UNIQUE INDEX endpoints_key "
                 "ON endpoints (family, protocol, laddr, lport, raddr, rport, domain, domain_source)")
    _recreate_views(conn)


# Added in version 4: what identifies a process besides its executable (connection.ProcessInfo).
SCRIPT_COLUMNS = {"script": "''", "script_sha256": "''", "exe_state": "''"}


def _add_script_columns(conn: sqlite3.Connection) -> None:
    """Version 3 -> 4: the script an interpreter ran and exe_state ('' for rows written before)."""
    for name in SCRIPT_COLUMNS:
        conn.execute(f"ALTER TABLE processes ADD COLUMN {name} TEXT NOT NULL DEFAULT ''")
    conn.execute("DROP INDEX processes_key")
    conn.execute("CREATE UNIQUE INDEX processes_key "
                 "ON processes (exe, name, cmdline, sha256, script, script_sha256, exe_state)")
    _recreate_views(conn)


# MIGRATIONS[n] upgrades a version-n database to version n + 1, inside the caller's
# transaction. Add an entry here (and bump SCHEMA_VERSION) whenever the schema changes.
MIGRATIONS: dict = {1: _add_rollups, 2: _add_domain_source, 3: _add_script_columns}


# Columns added to tables since version 1, with the value rows written before hold. A reader of a
# database the daemon has not migrated yet (it is read-only to readers) sees them with that value.
ADDED_COLUMNS = {"endpoints": {"domain_source": "''"}, "processes": SCRIPT_COLUMNS}


def add_missing_columns_for_reading(conn: sqlite3.Connection) -> None:
    """Give a read-only connection to an older database the columns added since, as TEMP views
    named like the tables they stand for (SQLite looks names up in temp before main). Readers keep
    temp objects in memory; temp_store is set first, because changing it drops every temp object."""
    conn.execute("PRAGMA temp_store = MEMORY")
    for table, columns in ADDED_COLUMNS.items():
        present = {row[1] for row in conn.execute(f"PRAGMA main.table_info({table})")}
        missing = [f"{value} AS {name}" for name, value in columns.items() if name not in present]
        if present and missing:
            conn.execute(f"CREATE TEMP VIEW {table} AS SELECT *, {', '.join(missing)} FROM main.{table}")


class SchemaError(Exception):
    """The file is a SQLite database, but not one this version of picosnitch can use."""


class NewerSchemaError(SchemaError):
    """The database was made by a newer picosnitch: upgrade rather than discard it."""


def _run_script(conn: sqlite3.Connection, script: str) -> None:
    """Each statement of `script` (executescript would commit the caller's transaction)."""
    for statement in script.split(";\n"):
        if statement.strip():
            conn.execute(statement)


def _is_empty(conn: sqlite3.Connection) -> bool:
    return conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0


def ensure_schema(conn: sqlite3.Connection) -> None:
    """Create the schema in an empty database, or migrate an older one, in one transaction.

    Raises NewerSchemaError for a database made by a newer picosnitch, and SchemaError for
    one that holds tables but no picosnitch version (such as the original picosnitch's).
    """
    with conn:
        conn.execute("BEGIN IMMEDIATE")  # no other writer may create the schema meanwhile
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version == SCHEMA_VERSION:
            _run_script(conn, GUARD_TABLES)
            return
        if version > SCHEMA_VERSION:
            raise NewerSchemaError(
                f"schema version {version} is newer than this picosnitch's ({SCHEMA_VERSION})")
        if version == 0:
            if not _is_empty(conn):
                raise SchemaError("the database holds tables picosnitch did not create")
            _run_script(conn, _TABLES + _ROLLUP_TABLES + _VIEWS + GUARD_TABLES)
        else:
            for step in range(version, SCHEMA_VERSION):
                MIGRATIONS[step](conn)
            _run_script(conn, GUARD_TABLES)
        # PRAGMA cannot take parameters; SCHEMA_VERSION is our own integer.
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION:d}")
