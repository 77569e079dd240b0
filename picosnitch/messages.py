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
    """One line for error.log; reports with the same key are counted rather than repeated."""

    message: str
    key: Optional[str] = None


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
