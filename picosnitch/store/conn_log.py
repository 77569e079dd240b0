"""The optional conn.log: one comma-separated line per Connection, as the original wrote it.

Fields, in order: contime, send, recv, exe, name, cmdline, sha256, pexe, pname, pcmdline,
psha256, uid, lport, rport, laddr, raddr, domain. Commas, newlines and NUL are removed from
values so that every line splits into exactly these 17 fields; other control characters and
undecodable bytes are written as `\\xNN` so the file is safe to `cat` in a terminal.
"""

import os
import re

from picosnitch import files
from picosnitch.connection import Connection
from picosnitch.sanitize import printable
from picosnitch.timestamps import local_time

FIELDS = ("contime", "send", "recv", "exe", "name", "cmdline", "sha256", "pexe", "pname",
          "pcmdline", "psha256", "uid", "lport", "rport", "laddr", "raddr", "domain")

# Carriage return counts as a newline: many viewers break lines on it too.
_REMOVED = re.compile("[,\n\r\x00]")


def clean(value) -> str:
    """`value` as one conn.log field: no commas, newlines or NUL, nothing unprintable."""
    return printable(_REMOVED.sub("", str(value)))


def format_line(connection: Connection) -> str:
    """The conn.log line for `connection`, without the trailing newline."""
    row = connection.as_row()
    row["contime"] = local_time(connection.ts)
    return ",".join(clean(row[name]) for name in FIELDS)


class ConnLog:
    """conn.log opened for appending; `write` adds one batch, whole or not at all (a full disk
    raises OSError and leaves the file as it was, so the batch can be written again later)."""

    def __init__(self, path: str):
        self.descriptor = files.open_append(path)

    def write(self, connections: "list[Connection]") -> None:
        """Append one line per connection, in one write."""
        files.append_all(self.descriptor, "".join(format_line(c) + "\n" for c in connections).encode())

    def close(self) -> None:
        """Close the file."""
        os.close(self.descriptor)

    def __enter__(self) -> "ConnLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
