"""Where a changed executable came from: its package manager, or not.

A new sha256 for a known executable is alarming unless the package manager put it there. dpkg keeps,
per installed package, the files it installed (`info/PACKAGE.list`) and their md5 sums
(`info/PACKAGE.md5sums`), and the installed version (`status`); rpm keeps each file's digest. A file
whose content matches its package's record was installed by that package, as that version; a file
that belongs to a package but does not match, or that belongs to none, was put there some other way.

`Packages.origin(path, sha256)` answers for the file at `path` only while it still has the sha256
that ran (it may have changed again since); the record keeper asks once per new hash, and keeps
the answer with the hash in record.json, so that the next change can name the version before it.
"""

from __future__ import annotations

import array
import bisect
import fcntl
import glob
import hashlib
import itertools
import os
import shutil
import struct
import subprocess
import time
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Tuple

DPKG_ADMINDIR = "/var/lib/dpkg"
LOCK_WAIT = 60.0  # seconds to wait for a running dpkg to record what it is installing
CHUNK = 1 << 20


@dataclass(frozen=True)
class Origin:
    """The package that owns a file and whether the file is what that package installed."""

    package: str
    version: str
    matches: bool

    def label(self) -> str:
        """How record.json keeps it: "curl 8.6.0", or "" when the file is not the package's."""
        return f"{self.package} {self.version}" if self.matches else ""


def change_note(new: Optional[Origin], before: Iterable[str]) -> str:
    """The sentence exe.log and the notification give for a changed sha256: `before` are the labels
    earlier hashes of the file had ("curl 8.5.0"; those that were no package's file have none)."""
    if new is None or not new.matches:
        return "modified outside any package"
    versions = [label.split(" ", 1)[1] for label in before if label.startswith(new.package + " ")]
    older = [v for v in versions if v != new.version]
    old_version = older[-1] if older else "?"
    return f"updated by the package manager: {new.package} {old_version} → {new.version}"


def _digest(path: str, algorithm: str) -> Tuple[str, str]:
    """(sha256, other digest) of the file at path."""
    sha, other = hashlib.sha256(), hashlib.new(algorithm)
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            sha.update(chunk)
            other.update(chunk)
    return sha.hexdigest(), other.hexdigest()


def _aliases(path: str) -> Tuple[str, ...]:
    """The names dpkg may list a file under: merged-/usr systems run /usr/bin/x that packages list
    as /bin/x (and the other way round)."""
    for top in ("/usr/bin/", "/usr/sbin/", "/usr/lib/", "/usr/lib64/", "/usr/lib32/"):
        if path.startswith(top):
            return (path, path[len("/usr"):])
    for top in ("/bin/", "/sbin/", "/lib/", "/lib64/", "/lib32/"):
        if path.startswith(top):
            return (path, "/usr" + path)
    return (path,)


class Dpkg:
    """dpkg's database in `admindir` (/var/lib/dpkg, or a private one: dpkg --admindir)."""

    def __init__(self, admindir: str = DPKG_ADMINDIR):
        self.admindir = admindir
        self._index: Optional[Tuple[List[str], "array.array[int]", "array.array[int]"]] = None
        self._versions: Dict[str, str] = {}
        self._stamp: Optional[float] = None

    def available(self) -> bool:
        return os.path.exists(os.path.join(self.admindir, "status"))

    def origin(self, path: str, sha256: str) -> Optional[Origin]:
        """The origin of the file at `path` if it still has `sha256`; None if no package owns it or
        the file has changed since. A file replaced while dpkg runs is seen before dpkg has
        recorded it: then the answer waits until dpkg is done (at most LOCK_WAIT seconds)."""
        found = self._origin(path, sha256)
        deadline = time.monotonic() + LOCK_WAIT
        while (found is None or not found.matches) and self._locked() and time.monotonic() < deadline:
            time.sleep(0.2)
            if not self._locked():
                found = self._origin(path, sha256)
        return found

    def _locked(self) -> bool:
        """Whether a dpkg holds its database lock now (asked without taking it: F_GETLK)."""
        try:
            fd = os.open(os.path.join(self.admindir, "lock"), os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return False
        try:
            probe = struct.pack("hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
            return struct.unpack("hhqqi4x", fcntl.fcntl(fd, fcntl.F_GETLK, probe))[0] != fcntl.F_UNLCK
        except OSError:
            return False
        finally:
            os.close(fd)

    def _origin(self, path: str, sha256: str) -> Optional[Origin]:
        self._refresh()
        owner = self._owner(path)
        if owner is None:
            return None
        package, listed = owner
        try:
            now_sha256, md5 = _digest(path, "md5")
        except OSError:
            return None
        if now_sha256 != sha256:
            return None
        expected = self._md5sums(package).get(listed.lstrip("/"))
        return Origin(package.split(":", 1)[0], self._versions.get(package, "?"), md5 == expected)

    def _refresh(self) -> None:
        """Forgets what it knew when dpkg has changed its database since."""
        try:
            stamp = os.stat(os.path.join(self.admindir, "status")).st_mtime
        except OSError:
            stamp = None
        if stamp != self._stamp:
            self._stamp = stamp
            self._index = None
            self._versions = self._read_versions()

    def _read_versions(self) -> Dict[str, str]:
        """Installed versions by package name, and by name:architecture (as .list files are named)."""
        versions: Dict[str, str] = {}
        try:
            with open(os.path.join(self.admindir, "status"), encoding="utf-8", errors="replace") as f:
                stanzas = f.read().split("\n\n")
        except OSError:
            return versions
        for stanza in stanzas:
            fields = dict(line.split(": ", 1) for line in stanza.splitlines() if ": " in line and line[0] != " ")
            if "Package" in fields and "Version" in fields and "installed" in fields.get("Status", ""):
                versions[fields["Package"]] = fields["Version"]
                if "Architecture" in fields:
                    versions[f"{fields['Package']}:{fields['Architecture']}"] = fields["Version"]
        return versions

    def _owner(self, path: str) -> Optional[Tuple[str, str]]:
        """(package, the name it lists the file under), from an index of every .list file: the
        sorted hashes of the listed paths beside their package's number, ~10 bytes a path."""
        if self._index is None:
            self._index = self._build_index()
        packages, hashes, owners = self._index
        for name in _aliases(path):
            wanted = hash(name.encode("utf-8", "surrogateescape"))
            at = bisect.bisect_left(hashes, wanted)
            if at < len(hashes) and hashes[at] == wanted:
                return packages[owners[at]], name
        return None

    def _build_index(self) -> Tuple[List[str], "array.array[int]", "array.array[int]"]:
        """What lives on (the package names, two arrays) is made before the ~130,000 short-lived
        objects of reading and sorting, so that these leave Python's arenas empty behind them and
        the arenas go back to the system; made among them, a few live objects would keep every
        arena (~15 MiB) for the life of the keeper."""
        listings = sorted(glob.glob(os.path.join(glob.escape(self.admindir), "info", "*.list")))
        packages = [os.path.basename(listing)[: -len(".list")] for listing in listings]
        hashes, owners = array.array("q"), array.array("I")
        for number, listing in enumerate(listings):
            try:
                with open(listing, "rb") as f:
                    lines = f.read().split(b"\n")
            except OSError:
                continue
            before = len(hashes)
            hashes.extend(hash(line) for line in lines if line)
            owners.extend(itertools.repeat(number, len(hashes) - before))
            del lines
        order = sorted(range(len(hashes)), key=hashes.__getitem__)
        hashes[:] = array.array("q", map(hashes.__getitem__, order))
        owners[:] = array.array("I", map(owners.__getitem__, order))
        return packages, hashes, owners

    def _md5sums(self, package: str) -> Dict[str, str]:
        sums: Dict[str, str] = {}
        try:
            with open(os.path.join(self.admindir, "info", package + ".md5sums"), "rb") as f:
                for line in f:
                    md5, _, name = line.rstrip(b"\n").partition(b"  ")
                    sums[name.decode("utf-8", "surrogateescape")] = md5.decode("ascii", "replace")
        except OSError:
            pass
        return sums


class Rpm:
    """rpm's database, through the rpm command, where rpm is installed."""

    def available(self) -> bool:
        return shutil.which("rpm") is not None

    def origin(self, path: str, sha256: str) -> Optional[Origin]:
        query = ["rpm", "-qf", "--qf", r"%{NAME}\t%{VERSION}-%{RELEASE}\t[%{FILENAMES}\t%{FILEDIGESTS}\n]", path]
        try:
            out = subprocess.run(query, capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.TimeoutExpired):
            return None
        first, _, files = out.partition("\t")
        version, _, files = files.partition("\t")
        digests = dict(line.split("\t", 1) for line in files.splitlines() if "\t" in line)
        if not first or path not in digests:
            return None
        return Origin(first, version, digests[path] == sha256)


class Packages:
    """Asks each package manager this system has (dpkg at `dpkg_admindir`, rpm)."""

    def __init__(self, dpkg_admindir: str = DPKG_ADMINDIR):
        self.managers = [m for m in (Dpkg(dpkg_admindir), Rpm()) if m.available()]

    def origin(self, path: str, sha256: str) -> Optional[Origin]:
        for manager in self.managers:
            found = manager.origin(path, sha256)
            if found is not None:
                return found
        return None
