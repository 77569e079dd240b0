"""The guard's rules file (/etc/picosnitch/rules): one rule a line, first match wins.

    # comments start with "#"
    ACTION [in|out] [MATCHER VALUE]... [DURATION]

    allow out exe /usr/bin/curl domain *.debian.org port 443 proto tcp
    deny in port 22
    allow parent /usr/bin/bash exe /usr/bin/ssh forever
    deny domain tracker.example 30m

- ACTION is `allow` or `deny`.
- `in` (inbound, to a listening socket) or `out`; neither: both ways.
- MATCHERs (all must match; a matcher may be given once):
  `exe PATH`, `sha256 HEX`, `script PATH` (the script an interpreter runs; matches nothing while
  identities have no script), `parent PATH` (the parent's executable), `user NAME|UID`,
  `domain NAME` (`*.example.com` is example.com and every name under it), `addr ADDRESS[/LEN]`
  (IPv4 or IPv6, a CIDR block), `port N` or `port N-M`, `proto tcp|udp|icmp|...|NUMBER`.
  `exe !unknown` matches connections whose program could not be identified.
- DURATION: `forever` (the default), `once` (the next matching connection only), `restart`
  (until the daemon restarts), `Nm` or `N minutes` (N minutes from when the line is first read).

Values with spaces are quoted ("..." or '...'). A rule without matchers matches every
connection of its direction.
"""

from __future__ import annotations

import ipaddress
import os
import pwd
import re
import shlex
import socket
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

ACTIONS = ("allow", "deny")
DIRECTIONS = ("in", "out")
PROGRAM_KEYS = ("exe", "sha256", "script", "parent", "user")
DESTINATION_KEYS = ("domain", "addr", "port", "proto")
KEYS = PROGRAM_KEYS + DESTINATION_KEYS
UNKNOWN = "!unknown"

PROTOCOLS = {"tcp": socket.IPPROTO_TCP, "udp": socket.IPPROTO_UDP, "icmp": socket.IPPROTO_ICMP,
             "icmpv6": socket.IPPROTO_ICMPV6, "sctp": 132, "udplite": 136}
PROTOCOL_NAMES = {number: name for name, number in PROTOCOLS.items()}

FOREVER, ONCE, RESTART = "forever", "once", "restart"
_MINUTES = re.compile(r"^(\d+)(m|min|mins|minute|minutes)?$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class RuleError(ValueError):
    """A line of the rules file cannot be used; str() is one sentence naming file and line."""


@dataclass
class Attempt:
    """A new connection to decide: where it goes, and (filled in on demand) who makes it.

    `program` is called at most once, the first time a rule needs the program: finding a
    socket's owner costs far more than matching addresses.
    """

    direction: str  # "in" or "out"
    family: int
    protocol: int
    laddr: str
    lport: int
    raddr: str  # the other end: the destination going out, the source coming in
    rport: int
    known_domain: Optional[str] = None  # forward order (www.example.com); "" none; None: ask find_domain
    uid: int = -1
    program: Optional[Callable[[], "Program"]] = None
    find_domain: Optional[Callable[["Attempt"], str]] = None
    _program: Optional["Program"] = None

    @property
    def who(self) -> "Program":
        if self._program is None:
            self._program = self.program() if self.program else Program()
        return self._program

    @property
    def looked_up(self) -> bool:
        """Whether the program has been found out (or found unknown) already."""
        return self._program is not None

    @property
    def domain(self) -> str:
        if self.known_domain is None:
            self.known_domain = self.find_domain(self) if self.find_domain else ""
        return self.known_domain

    @property
    def address(self) -> Tuple[int, int]:
        """(IP version, the other end's address as an integer)."""
        return _int_address(self.raddr)

    @property
    def loopback(self) -> bool:
        return _is_loopback(self.raddr) or _is_loopback(self.laddr)


@dataclass(frozen=True)
class Program:
    """The socket's owner, as far as it is known exactly ("!unknown" where not)."""

    pid: int = 0
    exe: str = UNKNOWN
    sha256: str = UNKNOWN
    script: str = ""  # the script an interpreter runs: not yet known to picosnitch
    parent: str = UNKNOWN
    cmdline: str = ""
    parent_cmdline: str = ""
    name: str = ""
    uid: int = -1


def _int_address(text: str) -> Tuple[int, int]:
    """(4 or 6, the address as an integer); (0, 0) for what is not an address."""
    text = text.split("%", 1)[0]
    try:
        if ":" in text:
            return 6, int.from_bytes(socket.inet_pton(socket.AF_INET6, text), "big")
        return 4, int.from_bytes(socket.inet_pton(socket.AF_INET, text), "big")
    except OSError:
        return 0, 0


def _is_loopback(text: str) -> bool:
    version, number = _int_address(text)
    return (version == 4 and number >> 24 == 127) or (version == 6 and number == 1) or (
        version == 6 and number >> 32 == 0xFFFF and (number >> 24) & 0xFF == 127)


def _mask(version: int, length: int) -> int:
    bits = 32 if version == 4 else 128
    return ((1 << length) - 1) << (bits - length)


def _user(value: str) -> int:
    if value.isdigit():
        return int(value)
    try:
        return pwd.getpwnam(value).pw_uid
    except KeyError:
        raise ValueError("no user %r on this system" % value) from None


def _network(value: str):
    try:
        return ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise ValueError("%r is not an IPv4 or IPv6 address or CIDR block" % value) from None


def _ports(value: str) -> Tuple[int, int]:
    low, _, high = value.partition("-")
    if not low.isdigit() or (high and not high.isdigit()):
        raise ValueError("%r is not a port (N) or range (N-M)" % value)
    first, last = int(low), int(high or low)
    if not 0 <= first <= last <= 65535:
        raise ValueError("%r is not a port range within 0-65535" % value)
    return first, last


def _protocol(value: str) -> int:
    if value.lower() in PROTOCOLS:
        return PROTOCOLS[value.lower()]
    if value.isdigit() and int(value) < 256:
        return int(value)
    raise ValueError("%r is not a protocol (tcp, udp, icmp, icmpv6, sctp, udplite or 0-255)" % value)


def _domain(value: str) -> str:
    name = value.lower().rstrip(".")
    bare = name[2:] if name.startswith("*.") else name
    if not bare or "*" in bare or any(not label for label in bare.split(".")):
        raise ValueError("%r is not a domain (example.com, or *.example.com for it and every "
                         "name under it)" % value)
    return name


def _path(value: str) -> str:
    if value != UNKNOWN and not value.startswith("/"):
        raise ValueError("%r is not an absolute path (or %s)" % (value, UNKNOWN))
    return value


def _sha256(value: str) -> str:
    if value != UNKNOWN and not _SHA256.match(value.lower()):
        raise ValueError("%r is not a sha256 (64 hex digits)" % value)
    return value.lower()


_CHECKS = {"exe": _path, "sha256": _sha256, "script": _path, "parent": _path, "user": _user,
           "domain": _domain, "addr": _network, "port": _ports, "proto": _protocol}


@dataclass
class Rule:
    """One rule. `expires` is a time.time() deadline (None: no deadline); `once` rules are
    spent by the connection they decide."""

    action: str
    direction: str = ""  # "", "in" or "out"
    matchers: Dict[str, Any] = field(default_factory=dict)  # key -> its parsed value (a network, a range, ...)
    duration: str = FOREVER  # FOREVER, ONCE, RESTART or "N" minutes
    line: int = 0  # line in the rules file (0: not from the file)
    text: str = ""  # the line as written (or as it would be written)
    expires: Optional[float] = None
    spent: bool = False

    @property
    def allows(self) -> bool:
        return self.action == "allow"

    def needs_program(self) -> bool:
        return any(key in self.matchers for key in PROGRAM_KEYS)

    def live(self, now: float) -> bool:
        return not self.spent and (self.expires is None or now < self.expires)

    def matches(self, attempt: Attempt) -> bool:
        m = self.matchers
        if self.direction and self.direction != attempt.direction:
            return False
        if "proto" in m and m["proto"] != attempt.protocol:
            return False
        if "port" in m:
            low, high = m["port"]
            # Going out, the port is the destination's; coming in, the local listening port.
            port = attempt.rport if attempt.direction == "out" else attempt.lport
            if not low <= port <= high:
                return False
        if "addr" in m:
            net = m["addr"]
            version, number = attempt.address
            if version != net.version or number & _mask(version, net.prefixlen) != int(net.network_address):
                return False
        if "domain" in m and not domain_matches(m["domain"], attempt.domain):
            return False
        if self.needs_program():
            who = attempt.who
            if "exe" in m and m["exe"] != who.exe:
                return False
            if "sha256" in m and m["sha256"] != who.sha256:
                return False
            if "script" in m and (not who.script or m["script"] != who.script):
                return False
            if "parent" in m and m["parent"] != who.parent:
                return False
            if "user" in m and m["user"] != (who.uid if who.uid >= 0 else attempt.uid):
                return False
        return True


def domain_matches(pattern: str, name: str) -> bool:
    name = name.lower().rstrip(".")
    if not name:
        return False
    if pattern.startswith("*."):
        base = pattern[2:]
        return name == base or name.endswith("." + base)
    return name == pattern


def parse_duration(tokens: Sequence[str]) -> Tuple[Optional[str], int]:
    """(duration, tokens used) for a duration at the start of `tokens`, else (None, 0)."""
    if not tokens:
        return None, 0
    word = tokens[0].lower()
    if word in (FOREVER, ONCE, RESTART):
        return word, 1
    if word == "until" and len(tokens) > 1 and tokens[1].lower() == "restart":
        return RESTART, 2
    match = _MINUTES.match(word)
    if match and (match.group(2) or (len(tokens) > 1 and tokens[1].lower() in ("min", "mins", "minute",
                                                                               "minutes"))):
        used = 1 if match.group(2) else 2
        if int(match.group(1)) < 1:
            raise ValueError("a duration in minutes must be at least 1")
        return match.group(1), used
    return None, 0


def parse_line(text: str, line: int = 0) -> Optional[Rule]:
    """The rule a line holds, None for a blank or comment line; raises ValueError (no line
    number) for anything else."""
    try:
        tokens = shlex.split(text, comments=True)
    except ValueError as e:
        raise ValueError("cannot be split into words (%s)" % e) from None
    if not tokens:
        return None
    action = tokens[0].lower()
    if action not in ACTIONS:
        raise ValueError("starts with %r, not allow or deny" % tokens[0])
    rule = Rule(action, line=line, text=text.strip())
    position = 1
    if position < len(tokens) and tokens[position].lower() in DIRECTIONS:
        rule.direction = tokens[position].lower()
        position += 1
    while position < len(tokens):
        duration, used = parse_duration(tokens[position:])
        if used:
            if position + used != len(tokens):
                raise ValueError("has words after its duration %r" % " ".join(tokens[position:position + used]))
            assert duration is not None, "a duration that took words is one"
            rule.duration = duration
            break
        key = tokens[position].lower()
        if key not in _CHECKS:
            raise ValueError("has %r where a matcher (%s) or a duration (forever, once, restart, Nm) "
                             "belongs" % (tokens[position], ", ".join(KEYS)))
        if key in rule.matchers:
            raise ValueError("gives %s twice" % key)
        if position + 1 >= len(tokens):
            raise ValueError("gives %s without a value" % key)
        rule.matchers[key] = _CHECKS[key](tokens[position + 1])
        position += 2
    return rule


def format_rule(action: str, direction: str = "", duration: str = FOREVER, **matchers: str) -> str:
    """A rules-file line (quoted where needed) for raw matcher values; parse_line reads it back."""
    words = [action] + ([direction] if direction else [])
    for key in KEYS:
        if matchers.get(key) not in (None, ""):
            words += [key, shlex.quote(str(matchers[key]))]
    if duration != FOREVER:
        words.append(duration if duration in (ONCE, RESTART) else "%sm" % duration)
    return " ".join(words)


@dataclass(frozen=True)
class Decision:
    rule: Rule
    allow: bool


class RuleSet:
    """Rules in order, indexed so that a connection is checked only against the rules that can
    match it: each rule is filed under one exact value it requires (an exe, a sha256, a port,
    a protocol, an address of some prefix length, a domain), or with the rules to check always."""

    def __init__(self, rules: Iterable[Rule] = ()):
        self.rules: List[Rule] = list(rules)
        self._index()

    def _index(self) -> None:
        self.by: Dict[str, Dict[object, List[int]]] = {k: {} for k in ("exe", "sha256", "domain", "port", "addr")}
        self.prefixes: Dict[Tuple[int, int, int], None] = {}  # (version, prefix length, mask) of addr rules
        self.suffix_domains = False
        self.always: List[int] = []
        for index, rule in enumerate(self.rules):
            m = rule.matchers
            if "exe" in m:
                self.by["exe"].setdefault(m["exe"], []).append(index)
            elif "sha256" in m:
                self.by["sha256"].setdefault(m["sha256"], []).append(index)
            elif "addr" in m:
                net = m["addr"]
                self.prefixes[(net.version, net.prefixlen, _mask(net.version, net.prefixlen))] = None
                self.by["addr"].setdefault((net.version, int(net.network_address), net.prefixlen), []).append(index)
            elif "port" in m and m["port"][0] == m["port"][1]:
                self.by["port"].setdefault(m["port"][0], []).append(index)
            elif "domain" in m:
                self.suffix_domains |= m["domain"].startswith("*.")
                self.by["domain"].setdefault(m["domain"], []).append(index)
            else:
                self.always.append(index)
        firsts = [v[0] for k in ("exe", "sha256") for v in self.by[k].values()]
        self.first_program = min(firsts) if firsts else len(self.rules)

    def __len__(self) -> int:
        return len(self.rules)

    def _destination_candidates(self, attempt: Attempt) -> List[int]:
        found = list(self.always)
        port = attempt.rport if attempt.direction == "out" else attempt.lport
        found += self.by["port"].get(port, ())
        if self.prefixes:
            version, number = attempt.address
            for prefix_version, length, mask in self.prefixes:
                if prefix_version == version:
                    found += self.by["addr"].get((version, number & mask, length), ())
        if self.by["domain"] and attempt.domain:
            name = attempt.domain.lower().rstrip(".")
            found += self.by["domain"].get(name, ())
            if self.suffix_domains:
                labels = name.split(".")
                for start in range(len(labels)):
                    found += self.by["domain"].get("*." + ".".join(labels[start:]), ())
        return sorted(set(found))

    def decide(self, attempt: Attempt, now: Optional[float] = None) -> Optional[Rule]:
        """The first live rule matching `attempt`, or None. The program is looked up only when
        a rule filed under an exe or sha256 comes before the first other rule that matches."""
        now = time.time() if now is None else now
        best = None
        for index in self._destination_candidates(attempt):
            rule = self.rules[index]
            if rule.live(now) and rule.matches(attempt):
                best = index
                break
        limit = len(self.rules) if best is None else best
        if self.first_program < limit:
            who = attempt.who
            for index in sorted(set(self.by["exe"].get(who.exe, ())) | set(self.by["sha256"].get(who.sha256, ()))):
                if index >= limit:
                    break
                rule = self.rules[index]
                if rule.live(now) and rule.matches(attempt):
                    return rule
        return None if best is None else self.rules[best]


@dataclass
class RulesFile:
    """The rules file and its last good contents. reload() swaps in a new RuleSet only when
    every line parses; otherwise `problem` says which line is wrong and the old rules stay."""

    path: str
    ruleset: RuleSet = field(default_factory=RuleSet)
    problem: Optional[str] = None
    stamp: Optional[tuple] = None
    first_seen: Dict[str, float] = field(default_factory=dict)  # N-minute lines, by text
    spent: set = field(default_factory=set)  # `once` lines already used, by text

    def changed(self) -> bool:
        try:
            st = os.stat(self.path)
            stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
        except FileNotFoundError:
            stamp = None
        return stamp != self.stamp

    def reload(self, now: Optional[float] = None) -> bool:
        """Reads the file if it changed; True when a new rule set took effect."""
        now = time.time() if now is None else now
        try:
            st = os.stat(self.path)
            stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
        except FileNotFoundError:  # no file: no rules
            if self.stamp == ():
                return False
            self.stamp, self.ruleset, self.problem = (), RuleSet(), None
            return True
        if stamp == self.stamp:
            return False
        self.stamp = stamp
        try:
            with open(self.path, "rb") as f:
                text = f.read().decode("utf-8")
        except UnicodeDecodeError as e:
            self.problem = "%s line %d: is not valid UTF-8 text; the previous rules stay in force" % (
                self.path, e.object.count(b"\n", 0, e.start) + 1)
            return False
        except OSError as e:
            self.problem = "%s cannot be read (%s); the previous rules stay in force" % (self.path, e.strerror)
            return False
        try:
            rules = parse_text(text, self.path)
        except RuleError as e:
            self.problem = "%s; the previous rules stay in force" % e
            return False
        for rule in rules:
            if rule.duration.isdigit():
                start = self.first_seen.setdefault(rule.text, now)
                rule.expires = start + 60 * int(rule.duration)
            if rule.duration == ONCE and rule.text in self.spent:
                rule.spent = True
        self.ruleset, self.problem = RuleSet(rules), None
        return True

    def spend(self, rule: Rule) -> None:
        """A `once` rule decided its connection."""
        rule.spent = True
        if rule.line:
            self.spent.add(rule.text)


def parse_text(text: str, path: str = "rules") -> List[Rule]:
    """Every rule of a rules file; raises RuleError naming the first bad line."""
    rules = []
    for number, line in enumerate(text.splitlines(), 1):
        try:
            rule = parse_line(line, number)
        except ValueError as e:
            raise RuleError("%s line %d: %s" % (path, number, e)) from None
        if rule:
            rules.append(rule)
    return rules


def append_rule(path: str, line: str) -> None:
    """Adds `line` at the end of the rules file, replacing the file in one step (a reader sees
    the old file or the new one), keeping its mode; creates it (0o644) if missing."""
    parse_line(line)  # never write a line the parser would refuse
    try:
        with open(path, "rb") as f:
            old = f.read()
        mode = os.stat(path).st_mode & 0o7777
    except FileNotFoundError:
        old, mode = b"", 0o644
    if old and not old.endswith(b"\n"):
        old += b"\n"
    temporary = "%s.%d.tmp" % (path, os.getpid())
    with open(temporary, "wb") as f:
        f.write(old + line.encode() + b"\n")
        f.flush()
        os.fsync(f.fileno())
    os.chmod(temporary, mode)
    os.replace(temporary, path)


def with_expiry(rule: Rule, now: float) -> Rule:
    """A rule made from an answer: N minutes count from now."""
    if rule.duration.isdigit():
        return replace(rule, expires=now + 60 * int(rule.duration))
    return rule
