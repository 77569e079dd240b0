"""What each program normally does on the network, and what is new once it has learned that.

A program is its executable's path, with the script when an interpreter runs one (the identity
worker names it); its hashes are recorded with it (the script's, for a script: that is the file
whose change matters). A changed hash does not start the learning
again: exe.log and the desktop already say that the file changed, and a replaced executable that
got a fresh learning period would have days to do what it liked unnoticed.

Per program the baseline holds:

- the registrable domains (eTLD+1, public_suffix) of the names its connections were made to;
- the countries of its remote addresses (geoip; only with a "GeoIP database");
- its remote ports, as `443/tcp`;
- the ports it serves on (`8080/tcp`): its traffic on a local port the kernel lists as a TCP
  listener, or as an unconnected UDP socket bound outside the ephemeral range (listeners);
- how many bytes it sent and received in each "Alert spike period (hours)".

While a program learns, everything it does is added. A program has learned once "Alert learning
(days)" have passed since it was first seen, or when `picosnitch baseline learned` says so. From
then on, each value it has never used is a Finding (and is added, so it is found once), and so is
a period in which it sent or received more than "Alert spike factor" times the most it did in a
period while learning (and at least that factor times "Alert spike minimum (MB)").

A program that used more than OPEN_AFTER different values of one kind while learning (a browser's
domains, a peer-to-peer program's ports) is taken to use any, and nothing new of that kind is
found for it; so is one whose values of a kind pass VALUES_KEPT. Traffic on a port the program
serves tells nothing about where the program goes: it only counts as a listener (and as volume).

Muted programs (any whose executable or script is a muted path) learn as usual and have no
findings. The Coalescer turns findings into alerts: the first of a program and kind goes out at
once, the rest of a burst together when it is over.
"""

from __future__ import annotations

import dataclasses
import json
import socket
from typing import Callable, Iterator, Optional

from picosnitch.alerts.public_suffix import unreversed
from picosnitch.connection import Connection, ProcessInfo
from picosnitch.messages import (
    ALERT_KINDS,
    NEW_COUNTRY,
    NEW_DOMAIN,
    NEW_LISTENER,
    NEW_PORT,
    TRAFFIC_SPIKE,
    Alert,
)

KINDS = ALERT_KINDS
DIMENSIONS = {NEW_DOMAIN: "domains", NEW_COUNTRY: "countries", NEW_PORT: "ports", NEW_LISTENER: "listeners"}
OPEN_AFTER = 64  # different values of one kind while learning: beyond, the program may use any
VALUES_KEPT = 1000  # values of one kind kept; beyond, the program may use any
NAMES_KEPT = 16  # names and hashes kept per program, for the alerts' words
VALUES_IN_ALERT = 50  # values an alert lists (its count says how many there were)
ANY = "any"  # a dimension the program may use any value of
ALL = "all"  # picosnitch baseline learned all: every program seen
PROTOCOLS = {socket.IPPROTO_TCP: "tcp", socket.IPPROTO_UDP: "udp"}
DAY = 86400.0
FORMAT = 1

ProgramKey = tuple[str, str]  # (executable, script or "")


@dataclasses.dataclass(frozen=True)
class Settings:
    """The config.json keys the baseline follows."""

    kinds: frozenset[str] = frozenset(KINDS)
    learning: Optional[float] = 7 * DAY  # seconds; None: until marked learned
    spike_factor: float = 10.0
    spike_period: int = 86400  # seconds
    spike_minimum: int = 1_000_000  # bytes

    @classmethod
    def from_config(cls, cfg) -> "Settings":
        days = cfg["Alert learning (days)"]
        return cls(frozenset(cfg["Alert kinds"]), None if days is None else days * DAY,
                   float(cfg["Alert spike factor"]), max(int(cfg["Alert spike period (hours)"] * 3600), 1),
                   int(cfg["Alert spike minimum (MB)"] * 1_000_000))


def program_key(process: ProcessInfo) -> Optional[ProgramKey]:
    """The program a process runs; None when its executable is unknown."""
    exe = process.exe
    if not exe or exe.startswith("!"):
        return None
    return exe, process.script


def program_sha256(process: ProcessInfo) -> str:
    """The hash that identifies the program: its script's when it ran one, else its executable's."""
    return process.script_sha256 if process.script else process.sha256


def format_bytes(count: int) -> str:
    unit, size = next(((u, s) for u, s in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)) if count >= s), ("B", 1))
    return f"{count} B" if size == 1 else f"{count / size:.1f} {unit}"


@dataclasses.dataclass
class Volume:
    """Bytes of the current period, and the most of any period the program learned."""

    period: int = 0
    sent: int = 0
    received: int = 0
    usual_sent: int = 0
    usual_received: int = 0
    alerted: bool = False

    def fold(self) -> None:
        """The current period's bytes become usual (the most seen so far)."""
        self.usual_sent = max(self.usual_sent, self.sent)
        self.usual_received = max(self.usual_received, self.received)


@dataclasses.dataclass
class Program:
    exe: str
    script: str
    first_seen: float
    learned: Optional[float] = None  # when learning ended
    names: list[str] = dataclasses.field(default_factory=list)
    hashes: list[str] = dataclasses.field(default_factory=list)
    values: dict[str, Optional[set[str]]] = dataclasses.field(
        default_factory=lambda: {dimension: set() for dimension in DIMENSIONS.values()})  # None: any
    volume: Volume = dataclasses.field(default_factory=Volume)

    @property
    def key(self) -> ProgramKey:
        return self.exe, self.script

    def note(self, process: ProcessInfo) -> None:
        for kept, value in ((self.names, process.name), (self.hashes, program_sha256(process))):
            if value and value not in kept and len(kept) < NAMES_KEPT:
                kept.append(value)

    def add(self, dimension: str, value: str, learning: bool) -> bool:
        """Add a `value` it has not used; whether that is news (never while learning)."""
        values = self.values[dimension]
        assert values is not None, "the caller checked that the dimension is not open"
        values.add(value)
        if len(values) > (OPEN_AFTER if learning else VALUES_KEPT):
            self.values[dimension] = None
        return not learning

    def to_json(self) -> dict:
        return {"exe": self.exe, "script": self.script, "first seen": float(self.first_seen),
                "learned": None if self.learned is None else float(self.learned),
                "names": self.names, "sha256": self.hashes,
                **{dimension: ANY if values is None else sorted(values) for dimension, values in self.values.items()},
                "volume": dataclasses.asdict(self.volume)}

    @classmethod
    def from_json(cls, data: dict) -> "Program":
        program = cls(str(data["exe"]), str(data["script"]), float(data["first seen"]),
                      None if data["learned"] is None else float(data["learned"]),
                      [str(n) for n in data["names"]], [str(h) for h in data["sha256"]])
        for dimension in DIMENSIONS.values():
            values = data[dimension]
            program.values[dimension] = None if values == ANY else {str(v) for v in values}
        program.volume = Volume(**{field.name: type(getattr(Volume(), field.name))(data["volume"][field.name])
                                   for field in dataclasses.fields(Volume)})
        return program


@dataclasses.dataclass(frozen=True)
class Finding:
    """Something new about a learned program: `value` is a domain, country, port or volume."""

    kind: str
    exe: str
    script: str
    name: str
    sha256: str
    value: str


class Baseline:
    """Every program's baseline. `registrable(name)` gives a host name's registrable domain
    (None: no domains), `country(address)` an address's country code ("" unknown), and
    `serves(netns, protocol, port)` whether a local port is one the kernel lists as listening."""

    def __init__(self, settings: Settings, registrable: Optional[Callable[[str], str]] = None,
                 country: Callable[[str], str] = lambda address: "",
                 serves: Callable[[int, int, int], bool] = lambda netns, protocol, port: False) -> None:
        self.settings = settings
        self.registrable, self.country, self.serves = registrable, country, serves
        self.programs: dict[ProgramKey, Program] = {}
        self.muted: set[str] = set()
        self.requests_read = 0  # bytes of the requests file already applied
        self.changed = False  # since the last save, beyond byte counts

    # -- traffic in, findings out --

    def observe(self, connection: Connection, now: float) -> list[Finding]:
        """Learn from one Connection; what is new about its program, if it has learned."""
        process = connection.identity.process
        key = program_key(process)
        if key is None:
            return []
        program = self.programs.get(key)
        if program is None:
            program = self.programs[key] = Program(*key, first_seen=now)
            self.changed = True
        program.note(process)
        learning = self._learning(program, now)
        findings = []
        for kind, value in self._values(connection):
            values = program.values[DIMENSIONS[kind]]
            if values is None or value in values:
                continue
            self.changed = True
            if program.add(DIMENSIONS[kind], value, learning):
                findings.append(self._finding(program, process, kind, value))
        spike = self._volume(program, connection, learning)
        if spike:
            self.changed = True
            findings.append(self._finding(program, process, TRAFFIC_SPIKE, spike))
        if not findings or self.is_muted(program):
            return []
        return [f for f in findings if f.kind in self.settings.kinds]

    def _finding(self, program: Program, process: ProcessInfo, kind: str, value: str) -> Finding:
        return Finding(kind, program.exe, program.script, process.name, program_sha256(process), value)

    def _values(self, connection: Connection) -> Iterator[tuple[str, str]]:
        """(kind, value) of what a Connection says about its program's destinations."""
        endpoint = connection.endpoint
        if endpoint.family not in (socket.AF_INET, socket.AF_INET6):
            return
        protocol = PROTOCOLS.get(endpoint.protocol)
        if protocol and endpoint.lport > 0 and self.serves(connection.identity.netns, endpoint.protocol,
                                                           endpoint.lport):
            yield NEW_LISTENER, f"{endpoint.lport}/{protocol}"
            return
        if endpoint.domain and self.registrable is not None:
            yield NEW_DOMAIN, self.registrable(unreversed(endpoint.domain))
        country = self.country(endpoint.raddr) if endpoint.raddr else ""
        if country:
            yield NEW_COUNTRY, country
        if protocol and endpoint.rport > 0:
            yield NEW_PORT, f"{endpoint.rport}/{protocol}"

    def _learning(self, program: Program, now: float) -> bool:
        if program.learned is not None:
            return False
        learning = self.settings.learning
        if learning is not None and now >= program.first_seen + learning:
            self._end_learning(program, program.first_seen + learning)
            return False
        return True

    def _end_learning(self, program: Program, when: float) -> None:
        program.learned = when
        program.volume.fold()
        self.changed = True

    def _volume(self, program: Program, connection: Connection, learning: bool) -> str:
        """Counts the bytes; the words of a spike when this period just became one, else ""."""
        volume, settings = program.volume, self.settings
        period = connection.ts - connection.ts % settings.spike_period
        if period > volume.period:
            if learning or volume.alerted:  # a spike alerted on is the program's new usual
                volume.fold()
            volume.period, volume.sent, volume.received, volume.alerted = period, 0, 0, False
        volume.sent += connection.send
        volume.received += connection.recv
        if learning or volume.alerted:
            return ""
        for moved, usual, verb in ((volume.sent, volume.usual_sent, "sent"),
                                   (volume.received, volume.usual_received, "received")):
            if moved > settings.spike_factor * max(usual, settings.spike_minimum):
                volume.alerted = True
                return (f"{verb} {format_bytes(moved)} in {settings.spike_period / 3600:g} h, "
                        f"usually at most {format_bytes(usual)}")
        return ""

    # -- what the user says (picosnitch baseline ...) --

    def matching(self, path: str) -> list[Program]:
        """The programs whose executable or script is `path`."""
        return [p for p in self.programs.values() if path in (p.exe, p.script)]

    def is_muted(self, program: Program) -> bool:
        return program.exe in self.muted or (bool(program.script) and program.script in self.muted)

    def apply(self, request: dict, now: float) -> str:
        """Carry out one request of `picosnitch baseline`; a sentence for error.log when it names
        no program it can apply to, else ""."""
        action, path = request.get("action"), request.get("program")
        if not isinstance(path, str) or action not in ("learned", "mute", "unmute", "forget"):
            return "picosnitch baseline: a request it does not understand was skipped"
        self.changed = True
        if action == "mute":
            self.muted.add(path)
            return ""
        if action == "unmute":
            self.muted.discard(path)
            return ""
        programs = list(self.programs.values()) if action == "learned" and path == ALL else self.matching(path)
        for program in programs:
            if action == "forget":
                del self.programs[program.key]
            elif program.learned is None:
                self._end_learning(program, now)
        return "" if programs else f"picosnitch baseline {action}: no program {path} has been seen"

    # -- baseline.json --

    def to_json(self) -> bytes:
        data = {"format": FORMAT, "requests read": self.requests_read, "muted": sorted(self.muted),
                "programs": [p.to_json() for p in self.programs.values()]}
        return (json.dumps(data, indent=1, sort_keys=True) + "\n").encode("utf-8", "surrogateescape")

    def load(self, raw: bytes) -> None:
        """Take the state saved in `raw`; ValueError (or KeyError, TypeError) when it is not one."""
        data = json.loads(raw.decode("utf-8", "surrogateescape"))
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError("it is not a baseline of format %d" % FORMAT)
        programs = [Program.from_json(p) for p in data["programs"]]
        self.programs = {p.key: p for p in programs}
        self.muted = {str(path) for path in data["muted"]}
        self.requests_read = int(data["requests read"])


@dataclasses.dataclass
class _Held:
    deadline: float
    findings: list[Finding]


class Coalescer:
    """Findings in, alerts out: the first of a program and kind at once (with what the same
    batch found), the rest of a burst as one alert once `window` seconds have passed."""

    def __init__(self, window: float) -> None:
        self.window = window
        self.held: dict[tuple[str, str, str], _Held] = {}

    def add(self, findings: list[Finding], now: float) -> list[Alert]:
        fresh: dict[tuple[str, str, str], list[Finding]] = {}
        for finding in findings:
            key = (finding.exe, finding.script, finding.kind)
            held = self.held.get(key)
            if held is None:
                fresh.setdefault(key, []).append(finding)
            else:
                held.findings.append(finding)
        for key in fresh:
            self.held[key] = _Held(now + self.window, [])
        return [to_alert(group, now) for group in fresh.values()]

    def due(self, now: float) -> list[Alert]:
        """The bursts whose window has ended; a window with nothing held closes."""
        alerts = []
        for key, held in list(self.held.items()):
            if now < held.deadline:
                continue
            if held.findings:
                alerts.append(to_alert(held.findings, now))
                self.held[key] = _Held(now + self.window, [])
            else:
                del self.held[key]
        return alerts

    def flush(self, now: float) -> list[Alert]:
        """Everything held, now (at Stop)."""
        alerts = [to_alert(held.findings, now) for held in self.held.values() if held.findings]
        self.held.clear()
        return alerts

    def next_deadline(self) -> Optional[float]:
        return min((held.deadline for held in self.held.values()), default=None)


def to_alert(findings: list[Finding], now: float) -> Alert:
    """One alert for findings of one program and kind."""
    first = findings[0]
    values = tuple(dict.fromkeys(f.value for f in findings))
    return Alert(first.kind, first.exe, first.name, first.sha256, values[:VALUES_IN_ALERT], len(values), now,
                 first.script)
