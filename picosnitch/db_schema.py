"""The snitch.db schema, in one place: tables, indexes, views and migrations.

Processes, identities and endpoints are stored once each and referred to by integer id;
`traffic` holds one row per (write window, identity, endpoint) and `traffic_hourly` the same
sums per hour. People query the file with their own tools through the `connections` view,
whose columns are documented in VIEW_COLUMNS and kept stable.

Text columns hold the exact bytes picosnitch saw (see sqlite_store for how they are bound and
read back): they may contain escape sequences, newlines, NUL and invalid UTF-8. Note that
SQLite's length() and some string functions stop at the first NUL; compare with
CAST(column AS BLOB) when that matters.
"""

import sqlite3

SCHEMA_VERSION = 1

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
)

_TABLES = """
CREATE TABLE processes (
    id INTEGER PRIMARY KEY,
    exe TEXT NOT NULL,
    name TEXT NOT NULL,
    cmdline TEXT NOT NULL,
    sha256 TEXT NOT NULL
);
CREATE UNIQUE INDEX processes_key ON processes (exe, name, cmdline, sha256);

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
    domain TEXT NOT NULL
);
CREATE UNIQUE INDEX endpoints_key
    ON endpoints (family, protocol, laddr, lport, raddr, rport, domain);
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

# Where each view column comes from; `t` is the traffic table (or its hourly rollup).
_SOURCES = {
    "contime": "datetime(t.{ts}, 'unixepoch', 'localtime')",
    "send": "t.send", "recv": "t.recv",
    "exe": "p.exe", "name": "p.name", "cmdline": "p.cmdline", "sha256": "p.sha256",
    "pexe": "pp.exe", "pname": "pp.name", "pcmdline": "pp.cmdline", "psha256": "pp.sha256",
    "uid": "i.uid",
    "lport": "e.lport", "rport": "e.rport", "laddr": "e.laddr", "raddr": "e.raddr",
    "domain": "e.domain",
    "gpexe": "gp.exe", "gpname": "gp.name", "gpcmdline": "gp.cmdline", "gpsha256": "gp.sha256",
    "family": "e.family", "protocol": "e.protocol",
    "packets_sent": "t.packets_sent", "packets_recv": "t.packets_recv",
    "netns": "i.netns", "container": "i.container",
    "ts": "t.{ts}",
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

# MIGRATIONS[n] upgrades a version-n database to version n + 1, inside the caller's
# transaction. Add an entry here (and bump SCHEMA_VERSION) whenever the schema changes.
MIGRATIONS: dict = {}


class SchemaError(Exception):
    """The file is a SQLite database, but not one this version of picosnitch can use."""


class NewerSchemaError(SchemaError):
    """The database was made by a newer picosnitch: upgrade rather than discard it."""


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
            return
        if version > SCHEMA_VERSION:
            raise NewerSchemaError(
                f"schema version {version} is newer than this picosnitch's ({SCHEMA_VERSION})")
        if version == 0:
            if not _is_empty(conn):
                raise SchemaError("the database holds tables picosnitch did not create")
            for statement in (_TABLES + _VIEWS).split(";\n"):
                if statement.strip():
                    conn.execute(statement)
        else:
            for step in range(version, SCHEMA_VERSION):
                MIGRATIONS[step](conn)
        # PRAGMA cannot take parameters; SCHEMA_VERSION is our own integer.
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION:d}")
