"""The unit the daemon stores: one identity talking to one endpoint during one write window.

The identity worker builds these from kernel flow records; the SQLite writer, conn.log,
the remote SQL writer and the UIs all speak this one shape. Field names are the column
names of the `connections` view in snitch.db.
"""

from dataclasses import dataclass, field, fields


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

