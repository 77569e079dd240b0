"""Reaching the central SQL server the daemons write to ("DB sql server"), for the UIs.

A server is named by a URL, or by the word `config` for the "DB sql server" setting of
config.json:

    postgresql://USER:PASSWORD@HOST:PORT/DATABASE?table=connections&sslmode=verify-full
    mysql://USER:PASSWORD@HOST:PORT/DATABASE          (also mariadb://)

`postgres://` is accepted for `postgresql://`. A driver can be chosen with `+`, as in
`postgresql+psycopg2://` or `mysql+mariadb://`; otherwise the first installed of psycopg,
psycopg2 (PostgreSQL) or pymysql, mariadb (MySQL) is used. Query parameters other than `table`
are passed to the driver's connect() (numbers as numbers). A password left out of the URL is
taken from $PICOSNITCH_DB_PASSWORD when set (a URL on the command line is visible to other
users in `ps`); libpq also reads ~/.pgpass and $PGPASSWORD itself.

Drivers are the same as the daemon's (central.settings.CLIENTS), loaded the same way, with the
same messages when one is missing.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from types import ModuleType
from typing import Optional
from urllib.parse import parse_qsl, unquote, urlsplit

from picosnitch.central.settings import (
    CLIENTS,
    DEFAULT_TABLE,
    TABLE_NAME,
    DriverMissing,
    ServerConfig,
    import_driver,
    load_driver,
    parse,
)
from picosnitch.config import Config, ConfigError
from picosnitch.sanitize import one_line, printable

PASSWORD_VARIABLE = "PICOSNITCH_DB_PASSWORD"
SCHEMES = {"postgresql": "postgres", "postgres": "postgres", "mysql": "mysql", "mariadb": "mysql"}
CLIENT_ORDER = {"postgres": ("psycopg", "psycopg2"), "mysql": ("pymysql", "mariadb")}
_DATABASE_KEY = {"postgres": "dbname", "mysql": "database"}


class CentralError(Exception):
    """One sentence for the user: a bad URL, a missing driver, a server that cannot be reached."""


def _value(text: str):
    return int(text) if text.isdigit() else text


def parse_url(url: str, environ: Optional[Mapping[str, str]] = None) -> ServerConfig:
    """The ServerConfig a URL names (the client chosen but its driver not imported yet when the
    URL names it; else the first of CLIENT_ORDER that is installed)."""
    environ = os.environ if environ is None else environ
    parts = urlsplit(url)
    scheme, _, client = parts.scheme.lower().partition("+")
    if scheme not in SCHEMES:
        raise CentralError("%s is not a database URL: it should start with postgresql:// or "
                           "mysql:// (or mariadb://)" % printable(repr(url.split("@")[-1]), 80))
    dialect = SCHEMES[scheme]
    if client and (client not in CLIENTS or CLIENTS[client].dialect != dialect):
        raise CentralError('unknown client "%s" for %s://; use one of %s' % (
            printable(client, 40), scheme, ", ".join(CLIENT_ORDER[dialect])))
    params: dict = {}
    try:
        port = parts.port
    except ValueError:
        raise CentralError("the port in the database URL is not a number") from None
    if parts.hostname:
        params["host"] = unquote(parts.hostname)
    if port:
        params["port"] = port
    if parts.username:
        params["user"] = unquote(parts.username)
    if parts.password is not None:
        params["password"] = unquote(parts.password)
    elif environ.get(PASSWORD_VARIABLE):
        params["password"] = environ[PASSWORD_VARIABLE]
    database = unquote(parts.path.lstrip("/"))
    if database:
        params[_DATABASE_KEY[dialect]] = database
    table = DEFAULT_TABLE
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key == "table":
            table = value
        else:
            params[key] = _value(value)
    if not TABLE_NAME.fullmatch(table):
        raise CentralError('"table" must be a table name of letters, digits and _ (optionally '
                           '"schema.table"), not %s' % printable(repr(table), 60))
    if not client:
        client = next((c for c in CLIENT_ORDER[dialect] if _installed(c)), CLIENT_ORDER[dialect][0])
    return ServerConfig(client, table, dict(CLIENTS[client].defaults, **params))


def _installed(client: str) -> bool:
    try:
        import_driver(client)
        return True
    except DriverMissing:
        return False


def from_url(url: str) -> tuple[ServerConfig, ModuleType]:
    """The server a URL names and its imported driver; CentralError when either fails."""
    server = parse_url(url)
    try:
        return server, import_driver(server.client)
    except DriverMissing as missing:
        raise CentralError(str(missing)) from None


def from_config(cfg: Config) -> tuple[ServerConfig, ModuleType]:
    """The "DB sql server" of config.json's settings `cfg` and its imported driver."""
    if cfg.missing is not None:  # "config" names the file: its defaults will not do
        raise CentralError(str(cfg.missing))
    try:
        server = parse(cfg)
        if server is None:
            raise CentralError('"DB sql server" in %s is {}: no central server is configured'
                               % cfg.path)
        return server, load_driver(server, cfg)
    except ConfigError as error:
        raise CentralError(str(error)) from None


def open_server(target: str, cfg: Optional[Config]) -> tuple[ServerConfig, ModuleType]:
    """`target` is a URL, or "config" for the "DB sql server" of config.json's settings `cfg`."""
    if target != "config":
        return from_url(target)
    assert cfg is not None, "--db config needs config.json's settings"
    return from_config(cfg)


def connect(server: ServerConfig, driver: ModuleType):
    """A DB-API connection to the server; CentralError with the driver's reason when refused."""
    try:
        return driver.connect(**server.params)
    except (driver.Error, OSError) as error:
        raise CentralError("cannot connect to the SQL server %s: %s"
                           % (server.describe(), one_line(error))) from None
