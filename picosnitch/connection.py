"""The unit the daemon stores: one identity talking to one endpoint during one write window.

The identity worker builds these from kernel flow records; the SQLite writer, conn.log,
the remote SQL writer and the UIs all speak this one shape. Field names are the column
names of the `connections` view in snitch.db.
"""

from dataclasses import dataclass, field, fields
from typing import Iterable, Optional

from picosnitch.timestamps import local_time


@dataclass(frozen=True)
class ProcessInfo:
    """What identifies one process: its executable, its name, its command line and the hash, and
    the script it ran (an interpreter's) with that hash; exe_state marks an unusual executable
    (identity.exe_state). Parents are stored with the first four only (PARENT_FIELDS)."""

    exe: str = ""
    name: str = ""
    cmdline: str = ""
    sha256: str = ""
    script: str = ""
    script_sha256: str = ""
    exe_state: str = ""


PARENT_FIELDS = ("exe", "name", "cmdline", "sha256")


@dataclass(frozen=True)
class Endpoint:
    """Where the traffic went. Ports are -1 when not logged or not applicable."""

    family: int = 0  # AF_INET, AF_INET6, AF_PACKET, ...
    protocol: int = 0  # IPPROTO_* (ethertype for AF_PACKET)
    laddr: str = ""
    lport: int = -1
    raddr: str = ""
    rport: int = -1
    domain: str = ""  # reversed, as the original stores it: com.example.www
    domain_source: str = ""  # how the domain was learned: getaddrinfo, dns, sni, http (identity.dns)


@dataclass(frozen=True)
class Identity:
    """Who sent the traffic: the process, its parent and grandparent, and where it ran."""

    process: ProcessInfo = field(default_factory=ProcessInfo)
    parent: ProcessInfo = field(default_factory=ProcessInfo)
    grandparent: ProcessInfo = field(default_factory=ProcessInfo)
    uid: int = -1
    netns: int = 0
    container: str = ""  # container id, or systemd unit, from the cgroup path


@dataclass
class Connection:
    """Bytes and packets one identity exchanged with one endpoint in one write window.

    `ts` is the unix time (seconds) of the start of the window the traffic was seen in.
    """

    identity: Identity
    endpoint: Endpoint
    ts: int
    send: int = 0
    recv: int = 0
    packets_sent: int = 0
    packets_recv: int = 0

    def key(self) -> tuple:
        """What makes two observations the same row of a write window."""
        return (self.identity, self.endpoint, self.ts)

    def add(self, other: "Connection") -> None:
        """Fold another observation with the same key into this one."""
        self.send += other.send
        self.recv += other.recv
        self.packets_sent += other.packets_sent
        self.packets_recv += other.packets_recv

    def as_row(self) -> dict:
        """Flat dict with the `connections` view's column names (except contime)."""
        i, e = self.identity, self.endpoint
        row = {}
        for prefix, proc in (("", i.process), ("p", i.parent), ("gp", i.grandparent)):
            for name in PARENT_FIELDS if prefix else [f.name for f in fields(ProcessInfo)]:
                row[prefix + name] = getattr(proc, name)
        row.update(uid=i.uid, netns=i.netns, container=i.container)
        row.update({f.name: getattr(e, f.name) for f in fields(Endpoint)})
        row.update(ts=self.ts, send=self.send, recv=self.recv,
                   packets_sent=self.packets_sent, packets_recv=self.packets_recv)
        return row


def from_row(row: dict) -> Connection:
    """Inverse of Connection.as_row (extra keys such as contime are ignored)."""

    def proc(prefix: str) -> ProcessInfo:
        return ProcessInfo(**{f.name: row.get(prefix + f.name, "") for f in fields(ProcessInfo)})

    identity = Identity(proc(""), proc("p"), proc("gp"), row["uid"], row["netns"], row["container"])
    endpoint = Endpoint(**{f.name: row[f.name] for f in fields(Endpoint)})
    return Connection(identity, endpoint, row["ts"], row["send"], row["recv"],
                      row["packets_sent"], row["packets_recv"])



def widen(span, other) -> None:
    """Makes `span`'s first and last (None: unknown) take in `other`'s."""
    for edge, pick in (("first", min), ("last", max)):
        mine, theirs = getattr(span, edge), getattr(other, edge)
        setattr(span, edge, theirs if mine is None else mine if theirs is None else pick(mine, theirs))


@dataclass
class Tally:
    """How much traffic some Connections hold: rows, bytes both ways, and the span of their
    windows. What cannot be stored is told the user as a tally, exactly (lost_sentence())."""

    rows: int = 0
    traffic: int = 0  # bytes sent and received
    first: Optional[int] = None  # the earliest window start
    last: Optional[int] = None  # the latest window start

    @classmethod
    def of(cls, connections: Iterable[Connection]) -> "Tally":
        tally = cls()
        for c in connections:
            tally.rows += 1
            tally.traffic += c.send + c.recv
            tally.first = c.ts if tally.first is None else min(tally.first, c.ts)
            tally.last = c.ts if tally.last is None else max(tally.last, c.ts)
        return tally

    def add(self, other: "Tally") -> None:
        self.rows += other.rows
        self.traffic += other.traffic
        widen(self, other)

    def __bool__(self) -> bool:
        return self.rows > 0

    def sentence(self) -> str:
        """"N rows, M bytes of traffic between T1 and T2": what a report of lost rows begins with."""
        span = ""
        if self.first is not None and self.last is not None:
            span = f" between {local_time(self.first)} and {local_time(self.last)}"
        return f"{self.rows} row{'' if self.rows == 1 else 's'}, {self.traffic} bytes of traffic{span}"
