"""Read and check config.json.

The file is JSON with the keys of the original picosnitch, plus `#` comments, since users paste
the documented example (example_text()) which has them. Every value is checked for type and
range; a bad file raises ConfigError whose message names the file, the line and the key, so the
daemon can refuse to start with a sentence the user can act on instead of crash-looping.
"""

from __future__ import annotations

import collections.abc
import difflib
import json
import math
import os
import re
import stat
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple, Optional

from picosnitch.messages import ALERT_KINDS, EVENT_KINDS
from picosnitch.sanitize import printable


class ConfigError(Exception):
    """config.json cannot be used; str() is one sentence naming file, line and key."""

    def __init__(self, path: str | os.PathLike, problem: str,
                 line: Optional[int] = None, column: Optional[int] = None,
                 key: Optional[str] = None) -> None:
        self.path = str(path)
        self.problem = problem
        self.line = line
        self.column = column
        self.key = key
        super().__init__(_where(self.path, line, column) + problem)


def _where(path: str, line: Optional[int], column: Optional[int] = None) -> str:
    where = printable(path)
    if line is not None:
        where += " line %d" % line
    if column is not None:
        where += " column %d" % column
    return where + ": "


# A check returns None when the value is acceptable, else the complaint that follows the key.
Check = Callable[[Any], Optional[str]]


class Rule(NamedTuple):
    default: Any
    check: Check


def _shown(value: Any) -> str:
    """A value as it would look in the file, safe to print and short."""
    return printable(json.dumps(value, ensure_ascii=False), limit=60)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON true is not a number


def _boolean(value: Any) -> Optional[str]:
    return None if isinstance(value, bool) else "must be true or false, not %s" % _shown(value)


def _string(value: Any) -> Optional[str]:
    return None if isinstance(value, str) else "must be a string, not %s" % _shown(value)


def _object(value: Any) -> Optional[str]:
    if isinstance(value, dict):
        return None
    return "must be an object ({} for none), not %s" % _shown(value)


def _integer(minimum: int, maximum: int, note: str = "") -> Check:
    def check(value: Any) -> Optional[str]:
        if _is_int(value) and minimum <= value <= maximum:
            return None
        return "must be an integer from %d to %d%s, not %s" % (minimum, maximum, note, _shown(value))
    return check


def _null_or_integer(minimum: int, maximum: int) -> Check:
    def check(value: Any) -> Optional[str]:
        if value is None or (_is_int(value) and minimum <= value <= maximum):
            return None
        return "must be null or an integer from %d to %d, not %s" % (minimum, maximum, _shown(value))
    return check


def _power_of_two(maximum: int) -> Check:
    def check(value: Any) -> Optional[str]:
        if _is_int(value) and 1 <= value <= maximum and value & (value - 1) == 0:
            return None
        return "must be a power of two from 1 to %d (1, 2, 4, ... 256, ...), not %s" % (maximum, _shown(value))
    return check


def _seconds(maximum: int) -> Check:
    def check(value: Any) -> Optional[str]:
        number = _is_int(value) or isinstance(value, float)
        if number and math.isfinite(value) and 0 <= value <= maximum:
            return None
        return "must be a number of seconds from 0 to %d, not %s" % (maximum, _shown(value))
    return check


def _ignore_list(value: Any) -> Optional[str]:
    if not isinstance(value, list):
        return "must be a list ([] for none), not %s" % _shown(value)
    for index, item in enumerate(value, 1):
        if not (isinstance(item, str) or (_is_int(item) and 0 <= item <= 65535)):
            return "must list only strings and port numbers (0-65535), but item %d is %s" % (
                index, _shown(item))
    return None


def _user_list(value: Any) -> Optional[str]:
    if not isinstance(value, list):
        return "must be a list of user names or uids ([] for the logged-in users), not %s" % (
            _shown(value))
    for index, item in enumerate(value, 1):
        if not ((isinstance(item, str) and item) or (_is_int(item) and 0 <= item <= MAX_UID)):
            return "must list only user names and uids, but item %d is %s" % (index, _shown(item))
    return None


DASH_TOKEN_MIN_LENGTH = 16


def _secret(value: Any) -> Optional[str]:
    # The complaint never repeats the value: it is a secret, and error.log is not.
    if not isinstance(value, str):
        return "must be a string (in double quotes)"
    if value and len(value) < DASH_TOKEN_MIN_LENGTH:
        return 'must be "" (none) or at least %d characters, not %d' % (
            DASH_TOKEN_MIN_LENGTH, len(value))
    return None


def _number(minimum: float, maximum: float, nullable: bool = False, note: str = "") -> Check:
    def check(value: Any) -> Optional[str]:
        if nullable and value is None:
            return None
        if (_is_int(value) or isinstance(value, float)) and math.isfinite(value) and minimum <= value <= maximum:
            return None
        return "must be %sa number from %s to %s%s, not %s" % ("null or " if nullable else "", _plain(minimum),
                                                              _plain(maximum), note, _shown(value))
    return check


def _plain(number: float) -> str:
    """A bound as a person writes it: 1000000, 0.001."""
    return str(int(number)) if float(number).is_integer() else "%g" % number


def _choices(allowed: tuple[str, ...]) -> Check:
    def check(value: Any) -> Optional[str]:
        if isinstance(value, list) and all(isinstance(item, str) and item in allowed for item in value):
            return None
        return "must be a list of some of %s, not %s" % (", ".join('"%s"' % a for a in allowed), _shown(value))
    return check


def _token(value: Any) -> Optional[str]:
    # Never repeated in the complaint: it is a secret, and error.log is not.
    return None if isinstance(value, str) else "must be a string (in double quotes)"


def _optional_http_url(value: Any) -> Optional[str]:
    return None if value == "" else _http_url(value)


def _loopback_address(value: Any) -> Optional[str]:
    """"" or HOST:PORT with a loopback HOST (127.x.y.z, [::1], localhost) and a port 1-65535."""
    match = re.fullmatch(r"(127(?:\.\d{1,3}){3}|\[::1\]|localhost):(\d{1,5})", value) if isinstance(value, str) else None
    if value == "" or (match and 1 <= int(match.group(2)) <= 65535):
        return None
    return 'must be "" or a loopback address and port such as "127.0.0.1:9743", not %s' % _shown(value)
def _one_of(*choices: str) -> Check:
    def check(value: Any) -> Optional[str]:
        if value in choices:
            return None
        return "must be one of %s, not %s" % (", ".join(json.dumps(c) for c in choices), _shown(value))
    return check


def _name_list(value: Any) -> Optional[str]:
    if isinstance(value, list) and all(isinstance(item, str) and item for item in value):
        return None
    return "must be a list of network interface names ([] for all), not %s" % _shown(value)


def _http_url(value: Any) -> Optional[str]:
    if isinstance(value, str) and re.match(r"https?://[^/\s]+", value):
        return None
    return "must be an http:// or https:// URL, not %s" % _shown(value)


# Upper bounds: each far above any sensible setting, and low enough that the value fits what it is
# given to (a timeout in milliseconds, a u32 map size, memory the kernel must lock).
MAX_DAYS = 36500  # a century of history
MAX_SECONDS = 86400  # a day between writes or VirusTotal requests
MAX_BACKLOG_MB = 1_000_000  # a terabyte
MAX_FLOW_ENTRIES = 1 << 22  # about 1 GiB of kernel memory for the flow maps and counter cells
MAX_RING_PAGES = (1 << 30) // os.sysconf("SC_PAGE_SIZE")  # 1 GiB
MAX_OPEN_FILES = (1 << 31) - 1  # the kernel's own ceiling (fs.nr_open is checked when it is set)
MAX_UID = (1 << 32) - 2  # (uid_t) -1 means "no user"
MAX_DEV_MASK = (1 << 64) - 1
MAX_FACTOR = 1_000_000  # times a program's usual traffic
MAX_NESTING = 100  # arrays and objects within each other: config.json needs 3
MAX_SIZE = 1 << 20  # bytes: config.json is a few kilobytes

RULES: dict[str, Rule] = {
    "Alert coalesce (seconds)": Rule(60, _seconds(MAX_SECONDS)),
    "Alert kinds": Rule(list(ALERT_KINDS), _choices(ALERT_KINDS)),
    "Alert learning (days)": Rule(7, _number(0, MAX_DAYS, nullable=True, note=" (null: until marked learned)")),
    "Alert spike factor": Rule(10, _number(1, MAX_FACTOR)),
    "Alert spike minimum (MB)": Rule(1, _number(0, MAX_BACKLOG_MB)),
    "Alert spike period (hours)": Rule(24, _number(0.001, MAX_DAYS * 24)),
    "DB retention (days)": Rule(30, _integer(0, MAX_DAYS, " (0 keeps everything)")),
    "DB sql backlog (MB)": Rule(100, _integer(1, MAX_BACKLOG_MB)),
    "DB sql log": Rule(True, _boolean),
    "DB sql server": Rule({}, _object),
    "DB text log": Rule(False, _boolean),
    "DB write limit (seconds)": Rule(10, _integer(1, MAX_SECONDS)),
    "Dash scroll zoom": Rule(True, _boolean),
    "Dash theme": Rule("", _string),
    "Dash token": Rule("", _secret),
    "Desktop notification users": Rule([], _user_list),
    "Desktop notifications": Rule(True, _boolean),
    "Dpkg database": Rule("/var/lib/dpkg", _string),
    "Event log": Rule(True, _boolean),
    "Every exe (not just conns)": Rule(False, _boolean),
    "Flow map entries": Rule(65536, _integer(1, MAX_FLOW_ENTRIES)),
    "GeoIP database": Rule("", _string),
    # Guard mode (picosnitch/guard): an opt-in firewall; see the README's "Guard mode".
    "Guard fail open": Rule(True, _boolean),
    "Guard interfaces": Rule([], _name_list),
    "Guard mode": Rule("off", _one_of("off", "ask", "deny unknown")),
    "Guard prompt group": Rule("", _string),
    "Guard queue number": Rule(7455, _integer(0, 65535)),  # an NFQUEUE number is 16 bits
    "Guard timeout (seconds)": Rule(60, _seconds(MAX_SECONDS)),
    "Guard timeout action": Rule("deny", _one_of("deny", "allow")),
    "GeoIP lookup": Rule(True, _boolean),
    "Gotify token": Rule("", _token),
    "Gotify URL": Rule("", _optional_http_url),
    "Log addresses": Rule(True, _boolean),
    "Log commands": Rule(True, _boolean),
    "Log ignore": Rule([], _ignore_list),
    "Live feed group": Rule("", _string),
    "Log ports": Rule(True, _boolean),
    "Metrics address": Rule("", _loopback_address),
    "Metrics textfile": Rule("", _string),
    "Names from traffic": Rule(True, _boolean),
    "Perf ring buffer (pages)": Rule(256, _power_of_two(MAX_RING_PAGES)),
    "Public suffix list": Rule("/usr/share/publicsuffix/public_suffix_list.dat", _string),
    "Set RLIMIT_NOFILE": Rule(None, _null_or_integer(1, MAX_OPEN_FILES)),
    "Set st_dev mask": Rule(None, _null_or_integer(0, MAX_DEV_MASK)),
    "Syslog socket": Rule("/dev/log", _string),
    "VT API URL": Rule("https://www.virustotal.com/api/v3", _http_url),
    "VT API key": Rule("", _string),
    "VT file upload": Rule(False, _boolean),
    "VT request limit (seconds)": Rule(15, _seconds(MAX_SECONDS)),
    "Webhook backoff (seconds)": Rule(300, _number(1, MAX_SECONDS)),
    "Webhook events": Rule(list(EVENT_KINDS), _choices(EVENT_KINDS)),
    "Webhook queue (MB)": Rule(10, _integer(1, MAX_BACKLOG_MB)),
    "Webhook token": Rule("", _token),
    "Webhook URL": Rule("", _optional_http_url),
    "ntfy token": Rule("", _token),
    "ntfy URL": Rule("", _optional_http_url),
}


def defaults() -> dict[str, Any]:
    """A fresh dict of every key with its default value."""
    return json.loads(json.dumps({key: rule.default for key, rule in RULES.items()}))


class Config(collections.abc.Mapping):
    """Checked settings by their config.json key names, e.g. cfg["DB write limit (seconds)"].

    Keys the file leaves out hold their defaults. Unknown keys are kept as written and
    described in `warnings` (one sentence each, for error.log), since they are most often
    typos the user would want to hear about, yet no reason to refuse to start.
    """

    def __init__(self, values: dict[str, Any], path: str | os.PathLike = "",
                 warnings: tuple[str, ...] = (), lines: Optional[dict[str, int]] = None,
                 missing: Optional[ConfigError] = None) -> None:
        self._values = values
        self.path = str(path)
        self.warnings = list(warnings)
        self._lines = dict(lines or {})
        self.missing = missing  # why the file was not read, when its defaults stand in for it

    def __getitem__(self, key: str) -> Any:
        return self._values[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return "Config(%r)" % self._values

    def line_of(self, key: str) -> Optional[int]:
        """The line where `key` is set in the file, or None when it took its default.

        Modules that check their own part more deeply (e.g. "DB sql server") use it to raise
        ConfigError(cfg.path, problem, cfg.line_of(key), key=key) in the same style.
        """
        return self._lines.get(key)


# A JSON string (possibly unterminated, which json then reports) or a # comment up to the line end.
_STRING_OR_COMMENT = re.compile(r'"(?:[^"\\\n]|\\.)*"?|#[^\n]*')
_WHITESPACE = re.compile(r"[ \t\n\r]*")


def strip_comments(text: str) -> str:
    """`text` with each `#` comment outside JSON strings replaced by as many spaces.

    Lines and columns stay where they were, so JSON errors still point into the user's file,
    and a `#` inside a string (an API key, a path) is left alone.
    """
    def blank(match: "re.Match[str]") -> str:
        token = match.group()
        return token if token.startswith('"') else " " * len(token)
    return _STRING_OR_COMMENT.sub(blank, text)


def _skip(text: str, position: int) -> int:
    """The position of the first character at or after `position` that is not white space."""
    return _WHITESPACE.match(text, position).end()  # type: ignore[union-attr]  # matches ""


def _members(text: str) -> list[tuple[str, Any, int]]:
    """(key, value, line) of each member of the top-level object in already valid JSON `text`."""
    decoder = json.JSONDecoder()
    members: list[tuple[str, Any, int]] = []
    position = _skip(text, 0) + 1  # past "{"
    while True:
        position = _skip(text, position)
        if text[position] == "}":
            return members
        line = text.count("\n", 0, position) + 1
        key, position = json.decoder.scanstring(text, position + 1)  # type: ignore[attr-defined]
        position = _skip(text, position) + 1  # past ":"
        position = _skip(text, position)
        value, position = decoder.raw_decode(text, position)
        members.append((key, value, line))
        position = _skip(text, position)
        if text[position] == ",":
            position += 1


_STRING = re.compile(r'"(?:[^"\\\n]|\\.)*"?')
_BRACKET = re.compile(r"[][{}]")


def _too_deep(stripped: str) -> Optional[int]:
    """The line where arrays and objects first nest deeper than MAX_NESTING, else None.

    Checked before parsing: json would otherwise recurse once per level until Python's
    recursion limit, and a file of nested brackets would end in a RecursionError."""
    depth = 0
    for match in _BRACKET.finditer(_STRING.sub(lambda m: " " * len(m.group()), stripped)):
        depth += 1 if match.group() in "[{" else -1
        if depth > MAX_NESTING:
            return stripped.count("\n", 0, match.start()) + 1
    return None


def parse(text: str, path: str | os.PathLike = "config.json") -> Config:
    """Check config `text` (as read from `path`, which only names it in messages)."""
    path = str(path)
    stripped = strip_comments(text)
    deep = _too_deep(stripped)
    if deep is not None:
        raise ConfigError(path, "arrays and objects are nested more than %d deep" % MAX_NESTING, deep)
    try:
        top = json.loads(stripped)
    except json.JSONDecodeError as error:
        raise ConfigError(path, "invalid JSON: %s" % error.msg, error.lineno, error.colno) from None
    if not isinstance(top, dict):
        raise ConfigError(path, "must hold one JSON object: { \"key\": value, ... }", 1)

    values = defaults()
    lines: dict[str, int] = {}
    warnings = []
    for key, value, line in _members(stripped):
        if key in lines:
            warnings.append(_where(path, line) + '"%s" is set again (first on line %d); this '
                            "later value is used" % (printable(key), lines[key]))
        lines[key] = line
        rule = RULES.get(key)
        if rule is None:
            guess = difflib.get_close_matches(key, RULES, n=1)
            hint = ' (did you mean "%s"?)' % guess[0] if guess else ""
            warnings.append(_where(path, line) + 'unknown key "%s" is kept but not used%s'
                            % (printable(key), hint))
        else:
            complaint = rule.check(value)
            if complaint:
                raise ConfigError(path, '"%s" %s' % (key, complaint), line, key=key)
        values[key] = value
    return Config(values, path, tuple(warnings), lines)


def read_regular_file(path: str | os.PathLike, limit: int = MAX_SIZE, what: str = "a config file") -> bytes:
    """The bytes of `path`, which must be a regular file of at most `limit` bytes; OSError or
    ValueError (one sentence) otherwise.

    Opened without blocking and checked before reading: a FIFO, a device or a socket planted as
    config.json would otherwise hang the start, or feed it without end."""
    descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    try:
        st = os.fstat(descriptor)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError("is not a regular file (it is %s)" % _file_type(st.st_mode))
        if st.st_size > limit:
            raise ValueError("is %d bytes, more than the %d %s may have" % (st.st_size, limit, what))
        with os.fdopen(descriptor, "rb", closefd=False) as file:
            return file.read(limit + 1)
    finally:
        os.close(descriptor)


def _file_type(mode: int) -> str:
    kinds = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
             (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))
    return next((name for test, name in kinds if test(mode)), "not a file")


def load(path: str | os.PathLike) -> Config:
    """Read and check the config file at `path`; raises ConfigError when it cannot be used."""
    try:
        raw = read_regular_file(path)
    except OSError as error:
        raise ConfigError(path, "cannot be read (%s)" % (error.strerror or error)) from None
    except ValueError as error:
        raise ConfigError(path, str(error)) from None
    if len(raw) > MAX_SIZE:  # grew while it was read
        raise ConfigError(path, "is more than the %d bytes a config file may have" % MAX_SIZE)
    try:
        text = raw.decode("utf-8-sig")  # tolerate the byte order mark some editors add
    except UnicodeDecodeError as error:
        line = raw.count(b"\n", 0, error.start) + 1
        raise ConfigError(path, "is not valid UTF-8 text", line) from None
    return parse(text, path)


def load_or_defaults(path: str | os.PathLike) -> Config:
    """config.json for the readers (view, dash): the defaults when there is no such file, with
    `missing` saying so; ConfigError when the file is there but cannot be used.

    The one policy of every command: a file the user wrote is used as written or not at all
    (the daemon refuses to start, a reader stops with the same sentence), never half-read.
    """
    try:
        return load(path)
    except ConfigError as error:
        if os.path.lexists(path):
            raise
        return Config(defaults(), path, missing=error)


def write_default(path: str | os.PathLike) -> bool:
    """Create `path` holding every default (sorted, indented JSON) unless it exists.

    Returns whether it was created. The file appears complete or not at all: it is written
    to a temporary name, synced, then linked into place, and linking never replaces a file.
    The mode is 0o644 because the unprivileged readers (view, dash) read their settings here.
    """
    path = Path(path)
    if path.exists():
        return False
    text = json.dumps(defaults(), indent=2, sort_keys=True) + "\n"
    descriptor, temporary = tempfile.mkstemp(prefix="." + path.name + ".", dir=path.parent)
    try:
        os.fchmod(descriptor, 0o644)
        with os.fdopen(descriptor, "w", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.link(temporary, path)
    except FileExistsError:
        return False
    finally:
        os.unlink(temporary)
    return True


def example_text() -> str:
    """The documented example config: every default, with a `#` comment explaining each key."""
    return _EXAMPLE


_EXAMPLE = """\
# picosnitch configuration: /etc/picosnitch/config.json
# JSON, plus comments that start with "#". A key left out takes the default shown here.
{
  # Alerts that come close together for one program and kind are sent as one, at most once in
  # this many seconds (the first at once).
  "Alert coalesce (seconds)": 60,
  # What a program that has learned its baseline is alerted on; [] for nothing: a registrable
  # domain, country, remote port or listening port it never used, or more traffic than usual.
  "Alert kinds": ["new domain", "new country", "new port", "new listener", "traffic spike"],
  # Days a program learns its baseline after it is first seen; null learns until
  # `picosnitch baseline learned PROGRAM` (or `... learned all`).
  "Alert learning (days)": 7,
  # A traffic spike is a period in which a program sent (or received) more than this many times
  # the most it did in a period while learning...
  "Alert spike factor": 10,
  # ...and more than this many times this many megabytes...
  "Alert spike minimum (MB)": 1,
  # ...in periods of this many hours (counted from midnight UTC).
  "Alert spike period (hours)": 24,
  # Days of history kept in snitch.db; 0 keeps everything.
  "DB retention (days)": 30,
  # Disk space for rows waiting while the "DB sql server" is unreachable; when it is full the
  # oldest rows are dropped, counted and reported in error.log.
  "DB sql backlog (MB)": 100,
  # Record connections in snitch.db.
  "DB sql log": true,
  # A remote PostgreSQL or MariaDB/MySQL server that also receives every connection; {} for none.
  # "client" is "psycopg" or "pymysql" ("psycopg2", "mariadb" if installed), "table_name" is
  # optional ("connections"), every other key is a connection parameter: {"client": "psycopg",
  # "host": "db.example", "dbname": "picosnitch", "user": "snitch", "password": "...",
  # "sslmode": "verify-full"}
  "DB sql server": {},
  # Also append every connection to conn.log as a comma-separated line.
  "DB text log": false,
  # Seconds between writes: the traffic of each process and endpoint in that time becomes one row.
  "DB write limit (seconds)": 10,
  # Zoom the graphs of picosnitch dash with the mouse wheel.
  "Dash scroll zoom": true,
  # Theme of picosnitch dash; "" for the default.
  "Dash theme": "",
  # A secret every request to picosnitch dash must carry, at least 16 characters (e.g. from
  # `openssl rand -hex 16`); serving beyond loopback (HOST) needs one; "" for none. The variable
  # PICOSNITCH_DASH_TOKEN overrides it. Every user can read this file unless you `chmod o-r` it.
  "Dash token": "",
  # Users whose desktops get notifications (names or uids); [] for every user with an active
  # local graphical session, as systemd-logind reports.
  "Desktop notification users": [],
  # Tell the desktop about new executables, new names and changed executables (new sha256).
  "Desktop notifications": true,
  # dpkg's database, to tell a changed executable the package manager installed from one modified
  # outside any package (rpm's is asked too, where rpm is installed).
  "Dpkg database": "/var/lib/dpkg",
  # Append every event (new program, new name, changed hash, alert, loss, degraded hook) to
  # events.log as a line of JSON.
  "Event log": true,
  # Record every executable that runs, not only those that use the network.
  "Every exe (not just conns)": false,
  # Flows the kernel tracks between two reads; flows beyond this are counted and reported.
  "Flow map entries": 65536,
  # A DB-IP or MaxMind country database (.mmdb) for GeoIP lookup; "" for none. Never downloaded.
  "GeoIP database": "",
  # Show the country of remote addresses (and learn them for the alerts).
  "GeoIP lookup": true,
  # The application token Gotify gave you for picosnitch (sent as X-Gotify-Key).
  "Gotify token": "",
  # A Gotify server to send the events to (POST /message), e.g. "https://gotify.example"; "" for none.
  "Gotify URL": "",
  # With the daemon gone (crashed, killed), let new connections through as if the guard were
  # off (true), or drop them (false: loopback and established connections still pass).
  "Guard fail open": true,
  # Network interfaces the guard watches; [] for every one.
  "Guard interfaces": [],
  # "off": monitor only. "ask": new connections no rule decides wait for your answer
  # (picosnitch prompt, a desktop notification or picosnitch dash). "deny unknown": refuse them.
  "Guard mode": "off",
  # Group that may answer the guard's prompts (and so allow connections); "" for root only.
  "Guard prompt group": "",
  # The NFQUEUE number the guard's iptables rules use.
  "Guard queue number": 7455,
  # Seconds a connection waits for an answer before "Guard timeout action" applies to it
  # (to it alone: a timeout never makes a rule).
  "Guard timeout (seconds)": 60,
  # "deny" or "allow": what an unanswered connection gets.
  "Guard timeout action": "deny",
  # Record local and remote addresses.
  "Log addresses": true,
  # Record full command lines.
  "Log commands": true,
  # Connections not to record: sha256 hashes, domains or IP subnets (strings), ports (integers).
  "Log ignore": [],
  # Group that may read the live feed of picosnitch top; "" lets only root read it.
  "Live feed group": "",
  # Record local and remote ports.
  "Log ports": true,
  # Serve Prometheus metrics at http://ADDRESS/metrics, a loopback address and port such as
  # "127.0.0.1:9743"; "" for none.
  "Metrics address": "",
  # Write the same metrics to this file every 2 seconds, for node_exporter's textfile collector
  # (e.g. "/var/lib/prometheus/node-exporter/picosnitch.prom"); "" for none.
  "Metrics textfile": "",
  # Learn domain names from the DNS answers processes receive and from the first bytes of their TCP
  # connections (TLS server name, HTTP Host), read in the kernel from their own buffers; false
  # leaves names to getaddrinfo.
  "Names from traffic": true,
  # Size of the buffer carrying kernel events, in memory pages; a power of two.
  "Perf ring buffer (pages)": 256,
  # The Public Suffix List (Debian's package publicsuffix), which says which part of a name is
  # registered (example.co.uk); without it there are no "new domain" alerts.
  "Public suffix list": "/usr/share/publicsuffix/public_suffix_list.dat",
  # Open-file limit for the daemon; null keeps the system's.
  "Set RLIMIT_NOFILE": null,
  # Mask applied to device numbers when caching hashes; null chooses (0 on btrfs).
  "Set st_dev mask": null,
  # Send every event to syslog or journald, as RFC 5424 messages on this unix datagram socket;
  # "" for none. The default is left out on a machine that has no /dev/log when the daemon starts.
  "Syslog socket": "/dev/log",
  # Where the VirusTotal API (v3) is; only a test or a proxy needs another.
  "VT API URL": "https://www.virustotal.com/api/v3",
  # VirusTotal API key; "" turns VirusTotal lookups off.
  "VT API key": "",
  # Upload executables VirusTotal has never seen (this sends your files to a third party).
  "VT file upload": false,
  # Seconds between VirusTotal requests; 15 fits the free API's 4 requests a minute.
  "VT request limit (seconds)": 15,
  # The longest wait between two tries to deliver an event to a webhook or syslog that does not
  # take it (the first wait is 1 second, doubled each time).
  "Webhook backoff (seconds)": 300,
  # The kinds of events the webhooks (generic, ntfy, Gotify) are sent; syslog gets them all.
  "Webhook events": ["new program", "new name", "changed hash", "alert", "loss", "degraded hook"],
  # Disk space for events waiting for a webhook or syslog that is down; when it is full the
  # oldest are dropped, counted and reported in error.log.
  "Webhook queue (MB)": 10,
  # Sent to the webhook as "Authorization: Bearer TOKEN"; "" for none.
  "Webhook token": "",
  # A URL every event is POSTed to as JSON (the lines of events.log); "" for none.
  "Webhook URL": "",
  # An ntfy access token (tk_...), sent as a bearer token; "" for none.
  "ntfy token": "",
  # An ntfy topic to publish the events to, e.g. "https://ntfy.sh/some-long-secret-topic"; "" for none.
  "ntfy URL": ""
}
"""
