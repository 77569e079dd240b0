"""Check the "DB sql server" setting of config.json and load the database driver it names.

The setting is an object: `client` names the driver (`psycopg` or `pymysql`; `psycopg2` and
`mariadb` work when installed), the optional `table_name` names the table picosnitch appends
to (default "connections"), and every other key is passed to the driver's connect() as is,
e.g. {"client": "psycopg", "host": "db.example", "dbname": "picosnitch", "user": "snitch",
"password": "...", "sslmode": "verify-full"}. `{}` turns the remote server off.

config.py only checks that the value is an object; this module checks the rest and raises
config.ConfigError in the same style (file, line, key), so the daemon can refuse to start with a
sentence the user can act on.
"""

from __future__ import annotations

import difflib
import importlib
import re
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Optional

from picosnitch.config import Config, ConfigError
from picosnitch.installed import EXTRAS, Packages, install_command
from picosnitch.sanitize import printable

KEY = "DB sql server"
DEFAULT_TABLE = "connections"


@dataclass(frozen=True)
class Client:
    """A supported driver: its module, the SQL dialect it speaks, how to install it, and the
    connection parameters picosnitch sets unless the user does (timeouts, so that a server that
    hangs is reported instead of waited on forever)."""

    module: str
    dialect: str  # "postgres" or "mysql"
    packages: Packages
    defaults: dict = field(default_factory=dict)


_MYSQL_DEFAULTS = {"connect_timeout": 10, "read_timeout": 60, "write_timeout": 60}
CLIENTS = {
    "psycopg": Client("psycopg", "postgres", EXTRAS["postgres"], {"connect_timeout": 10}),
    "psycopg2": Client("psycopg2", "postgres", Packages(("psycopg2-binary",), ("python3-psycopg2",)),
                       {"connect_timeout": 10}),
    "pymysql": Client("pymysql", "mysql", EXTRAS["mysql"], dict(_MYSQL_DEFAULTS, charset="utf8mb4")),
    "mariadb": Client("mariadb", "mysql", Packages(("mariadb",)), dict(_MYSQL_DEFAULTS)),
}

# A table name, optionally schema-qualified; short enough for "<name>_batches" and index names
# to stay within MySQL's 64 and PostgreSQL's 63 characters.
_IDENTIFIER = r"[A-Za-z_][A-Za-z0-9_]{0,47}"
TABLE_NAME = re.compile(r"(%s\.)?%s" % (_IDENTIFIER, _IDENTIFIER))


@dataclass(frozen=True)
class ServerConfig:
    """A checked "DB sql server" setting."""

    client: str
    table: str  # as written: "name" or "schema.name"
    params: dict  # keyword arguments for the driver's connect(), defaults included

    @property
    def dialect(self) -> str:
        return CLIENTS[self.client].dialect

    def describe(self) -> str:
        """Where the server is, for messages: client, user, host, port and database, never the
        password."""
        p = self.params
        host = p.get("host") or p.get("hostaddr") or p.get("unix_socket") or "localhost"
        port = ":%s" % p["port"] if "port" in p else ""
        user = "%s@" % p["user"] if "user" in p else ""
        database = p.get("dbname") or p.get("database") or p.get("db") or ""
        where = "%s%s%s/%s" % (user, host, port, database)
        if "conninfo" in p:  # may hold a password: not repeated in logs
            where = "(conninfo in config.json)"
        return printable("%s %s" % (self.client, where), limit=200)


def _scalar_or_object(value: Any) -> bool:
    if isinstance(value, dict):
        return all(_scalar_or_object(v) for v in value.values())
    return isinstance(value, (str, int, float, bool)) or value is None


def _problem(cfg: Config, problem: str) -> ConfigError:
    return ConfigError(cfg.path, '"%s" %s' % (KEY, problem), cfg.line_of(KEY), key=KEY)


def parse(cfg: Config) -> Optional[ServerConfig]:
    """The checked setting, or None when it is `{}` (off). Raises ConfigError when it is unusable.

    Does not import the driver: see load_driver().
    """
    setting = cfg[KEY]
    if not setting:
        return None
    params = dict(setting)
    client = params.pop("client", None)
    if client not in CLIENTS:
        choices = ", ".join('"%s"' % name for name in CLIENTS)
        if client is None:
            raise _problem(cfg, 'needs a "client": one of %s' % choices)
        guess = difflib.get_close_matches(str(client), CLIENTS, n=1)
        hint = ' (did you mean "%s"?)' % guess[0] if guess else ""
        raise _problem(cfg, 'has an unknown "client" %s%s; use one of %s' % (
            printable(repr(client), limit=40), hint, choices))
    table = params.pop("table_name", DEFAULT_TABLE)
    if not isinstance(table, str) or not TABLE_NAME.fullmatch(table):
        raise _problem(cfg, '"table_name" must be a table name of letters, digits and _ (at most '
                            '48, optionally "schema.table"), not %s' % printable(repr(table), 60))
    for name, value in params.items():
        if not _scalar_or_object(value):
            raise _problem(cfg, '"%s" must be a string, number, true/false or object, not a list'
                           % printable(name, limit=40))
    return ServerConfig(client, table, dict(CLIENTS[client].defaults, **params))


class DriverMissing(ImportError):
    """A client's driver module is not installed; the message says what to install."""

    def __init__(self, client: str, error: ImportError):
        self.client, self.install = client, install_command(CLIENTS[client].packages)
        super().__init__('the client "%s" is not installed (%s); install it with: %s'
                         % (client, error, self.install))
        self.reason = str(error)


def import_driver(client: str) -> ModuleType:
    """Import the driver module of `client` (a key of CLIENTS); DriverMissing when it is not
    installed."""
    try:
        return importlib.import_module(CLIENTS[client].module)
    except ImportError as error:
        raise DriverMissing(client, error) from None


def load_driver(server: ServerConfig, cfg: Config) -> ModuleType:
    """Import the driver module; a missing one is a ConfigError that says what to install."""
    try:
        return import_driver(server.client)
    except DriverMissing as missing:
        raise _problem(cfg, 'uses the client "%s", which is not installed (%s); install it with: %s'
                       % (server.client, missing.reason, missing.install)) from None
