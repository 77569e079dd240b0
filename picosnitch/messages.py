"""The messages workers send each other over their pipes, besides kernel records and Connections."""

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Stop:
    """The sender has sent everything it will: finish, pass Stop on, exit."""

    sender: str


@dataclass(frozen=True)
class Resend:
    """To the identity worker: the record keeper was restarted; send it again every identity
    observed, so nothing the old keeper had not recorded is lost (it ignores what it knows)."""


@dataclass(frozen=True)
class ErrorReport:
    """One line for error.log; reports with the same key are counted rather than repeated.
    `count` is how many things were lost, for a kernel loss (key "loss:...")."""

    message: str
    key: Optional[str] = None
    count: int = 0


@dataclass(frozen=True)
class Observed:
    """An identity seen talking (or executing): the record keeper decides what is new about it."""

    exe: str
    name: str
    sha256: str
    parent_exe: str
    parent_name: str
    script: str = ""  # the script an interpreter ran, recorded like an executable
    script_sha256: str = ""


@dataclass(frozen=True)
class VtRequest:
    """The keeper asks for the VirusTotal status of `sha256`, a hash of `exe`."""

    exe: str
    name: str
    sha256: str


@dataclass(frozen=True)
class VtResult:
    """The VirusTotal status of `sha256`, a hash of `exe` (see virustotal's statuses)."""

    exe: str
    name: str
    sha256: str
    status: str


@dataclass(frozen=True)
class WorkerEnded:
    """A worker's last words to the supervisor: why it is about to exit. `fatal`: restarting it
    cannot help (the kernel monitor cannot run here), so the daemon stops."""

    name: str
    reason: str
    fatal: bool = False


NEW_DOMAIN, NEW_COUNTRY, NEW_PORT, NEW_LISTENER = "new domain", "new country", "new port", "new listener"
TRAFFIC_SPIKE = "traffic spike"
ALERT_KINDS = (NEW_DOMAIN, NEW_COUNTRY, NEW_PORT, NEW_LISTENER, TRAFFIC_SPIKE)

# What the event stream (events.log, syslog, webhooks) carries, by its "kind".
NEW_PROGRAM, NEW_NAME, CHANGED_HASH, ALERT, LOSS, DEGRADED_HOOK = (
    "new program", "new name", "changed hash", "alert", "loss", "degraded hook")
EVENT_KINDS = (NEW_PROGRAM, NEW_NAME, CHANGED_HASH, ALERT, LOSS, DEGRADED_HOOK)


@dataclass(frozen=True)
class Alert:
    """Something new about a program that has learned its baseline (alerts.baseline): `kind` is
    "new domain", "new country", "new port", "new listener" or "traffic spike"; `values` the
    first of the `count` new values (domains, countries, ports, or the spike's words)."""

    kind: str
    exe: str
    name: str
    sha256: str
    values: tuple
    count: int
    time: float
    script: str = ""


@dataclass(frozen=True)
class Traffic:
    """The baseline worker's totals since the daemon started, for the metrics: `totals` maps
    (exe, script) to (bytes sent, bytes received, connections); `programs` counts the programs
    of the baseline by state (learning, learned, muted)."""

    totals: dict
    programs: dict
