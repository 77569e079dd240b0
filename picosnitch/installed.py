"""How this copy of picosnitch was installed, so that a missing optional package is reported
with the command that installs it here.

The same sentence would be wrong for most users: `pip install` is refused by Debian's Python
(PEP 668) and does not reach the /opt/picosnitch virtual environment scripts/install.sh makes,
and the Debian package's Python finds only Debian's packages. So:

- the Debian package (the code under /usr/lib/python3/dist-packages): `sudo apt install python3-...`;
- pipx: `pipx inject picosnitch ...`;
- a virtual environment (scripts/install.sh's /opt/picosnitch, or your own): that environment's pip;
- a source tree run by the system's Python on Debian/Ubuntu: `sudo apt install python3-...`;
- anything else: `python -m pip install ...` for the Python that runs picosnitch.
`sudo` is added where the environment belongs to another user (root).
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Packages:
    """What provides an optional feature: requirements for pip, and Debian's packages (none
    where Debian has no such package)."""

    pip: tuple[str, ...]
    debian: tuple[str, ...] = ()


# The extras of pyproject.toml's [project.optional-dependencies] (tests/test_docs.py keeps them
# equal), with Debian's packages for the same modules.
EXTRAS = {
    "notify": Packages(("jeepney>=0.7",), ("python3-jeepney",)),
    "virustotal": Packages(("requests>=2.25",), ("python3-requests",)),
    "geoip": Packages(("maxminddb>=2.0",), ("python3-maxminddb",)),
    "postgres": Packages(("psycopg[binary]>=3.1",), ("python3-psycopg",)),
    "mysql": Packages(("PyMySQL>=1.0",), ("python3-pymysql",)),
    "dash": Packages(("starlette>=0.37", "uvicorn>=0.29"), ("python3-starlette", "python3-uvicorn")),
}

DEBIAN_SITE = "/usr/lib/python3/dist-packages"


def method(package_dir: str = "", prefix: str = "", base_prefix: str = "") -> str:
    """"deb", "pipx", "venv", "system" (Debian's own Python running a source tree) or "pip"."""
    package_dir = package_dir or str(Path(__file__).resolve().parent)
    prefix, base_prefix = prefix or sys.prefix, base_prefix or sys.base_prefix
    if package_dir.startswith(DEBIAN_SITE + "/"):
        return "deb"
    if prefix != base_prefix:
        return "pipx" if "/pipx/venvs/" in prefix + "/" else "venv"
    if prefix == "/usr" and shutil.which("apt-get"):
        return "system"
    return "pip"


def _sudo(path: str) -> str:
    return "" if os.access(path, os.W_OK) else "sudo "


def install_command(needed: Packages) -> str:
    """The command that installs `needed` for this copy of picosnitch."""
    how = method()
    if how in ("deb", "system") and needed.debian:
        return "sudo apt install " + " ".join(needed.debian)
    pip = " ".join(shlex.quote(requirement) for requirement in needed.pip)
    if how == "pipx":
        return f"{_sudo(sys.prefix)}pipx inject picosnitch {pip}"
    return f"{_sudo(sys.prefix)}{shlex.quote(sys.executable)} -m pip install {pip}"


def install_extra(extra: str) -> str:
    """The command that installs the packages of the extra named `extra` (see EXTRAS)."""
    return install_command(EXTRAS[extra])
