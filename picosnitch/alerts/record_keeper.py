"""The files users read directly: record.json, exe.log, alert.log and error.log.

record.json lists every executable picosnitch has seen with its names, parents and sha256
hashes (each with its VirusTotal status), and, once there are any, the latest ALERTS_KEPT
alerts ("Alerts", oldest first), which view and dash show. exe.log gets one line each time something new turns up: an
executable, a new name for one, or a new hash (the file changed). alert.log gets one line per
alert (alerts.baseline). error.log gets one line per problem, with bursts of the same problem
collapsed into a count.

Names and paths are `str` decoded with surrogateescape (see sanitize). In record.json they are
kept losslessly: the file is UTF-8 JSON in which undecodable bytes are written as their lone
surrogate escape (`\\udcff` for the byte 0xff), and control characters, DEL and C1 controls are
escaped as JSON allows, so reading it back with `json.load` gives the exact original strings and
`cat record.json` cannot drive the terminal. The logs show values through sanitize instead.

None of these files may stop the keeper, nor lose what it was told (a full disk, EIO, a
read-only directory): record.json is rewritten as a whole, so its changes simply wait for the
next save that succeeds; log lines that could not be appended are held (HeldLines, bounded:
beyond its bound the oldest are dropped and counted) and appended, in order, once they can be.
Between saves every change to the record is appended to a journal beside it, which a restarted
keeper replays, so a keeper killed at any moment has recorded all it announced. error.log's
repeat counts not yet written are kept in a small file too, for the same reason.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
import tempfile
import threading
import time
from collections import deque
from pathlib import Path
from typing import Callable, Optional

from picosnitch import files
from picosnitch.alerts.packages import Origin, change_note
from picosnitch.messages import Alert, VtResult
from picosnitch.sanitize import log_field, printable
from picosnitch.timestamps import local_time

NAMES_BY_EXE = "Names by executable"
EXES_BY_NAME = "Executables by name"
PARENT_EXES_BY_EXE = "Parent executables by executable"
PARENT_NAMES_BY_NAME = "Parent names by name"
SHA256_BY_EXE = "SHA256 by executable"
ALERTS = "Alerts"
ALERTS_KEPT = 1000
PACKAGE_BY_SHA256 = "Package by SHA256"  # exe -> sha256 -> "curl 8.6.0": the package that installed it
LIST_SECTIONS = (NAMES_BY_EXE, EXES_BY_NAME, PARENT_EXES_BY_EXE, PARENT_NAMES_BY_NAME)

NEW_EXE = "new executable"
NEW_NAME = "new name"
NEW_SHA256 = "new sha256"
SCRIPT = "script"  # NewThing.role of an interpreter's script, which is recorded like an executable

VT_NOT_CHECKED = "not checked"  # status of a hash until the VirusTotal worker reports on it

LOG_FILE_MODE = 0o644
RECORD_FILE_MODE = 0o644


def append_lines(path: str | os.PathLike, lines: list[str]) -> None:
    """Append `lines` to a log file in one write.

    The file is opened for each call so a rotated log is followed at once, and O_APPEND with a
    single write keeps lines from several processes from interleaving.
    """
    if not lines:
        return
    files.append(path, "".join(line + "\n" for line in lines).encode("utf-8", "surrogateescape"), LOG_FILE_MODE)


class HeldLines:
    """Lines for one log file, appended in order; those that cannot be appended yet (a full disk)
    are held, at most `limit` of them (beyond, the oldest are dropped and counted in `dropped`),
    and go first at the next append() or retry() that succeeds."""

    def __init__(self, path: str | os.PathLike, limit: int = 100_000) -> None:
        self.path = Path(path)
        self.limit = limit
        self.held: list[str] = []
        self.dropped = 0
        self.failing_since: Optional[float] = None  # when appending first failed, until it succeeds
        self.error: Optional[OSError] = None  # why, the last time it failed

    def append(self, lines: list[str]) -> bool:
        """Appends what is held, then `lines`; False (they are held) when the file refuses."""
        self.held += lines
        if self.retry():
            return True
        if len(self.held) > self.limit:
            self.dropped += len(self.held) - self.limit
            del self.held[:len(self.held) - self.limit]
        return False

    def retry(self) -> bool:
        if not self.held:
            return True
        try:
            append_lines(self.path, self.held)
        except OSError as error:
            self.error = error
            if self.failing_since is None:
                self.failing_since = time.time()
            return False
        self.held = []
        self.failing_since = None
        return True


def write_atomically(path: str | os.PathLike, data: bytes, mode: int = RECORD_FILE_MODE,
                     sync: bool = True) -> None:
    """Replace `path` with `data` so that a crash leaves either the old or the new file whole
    (`sync`: a power loss too)."""
    path = Path(path)
    descriptor, temporary = tempfile.mkstemp(prefix="." + path.name + ".", dir=path.parent)
    try:
        with os.fdopen(descriptor, "wb") as file:
            os.fchmod(file.fileno(), mode)
            file.write(data)
            file.flush()
            if sync:
                os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise
    if not sync:
        return
    directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(directory)  # make the rename itself durable
    finally:
        os.close(directory)


# Left raw by json.dumps(ensure_ascii=False): DEL, C1 controls and lone surrogates.
_RAW_IN_JSON = re.compile("[\x7f-\x9f\ud800-\udfff]")


def record_to_json(record: dict) -> bytes:
    """record.json's bytes: sorted, indented UTF-8 JSON that json.loads reads back exactly."""
    text = json.dumps(record, ensure_ascii=False, indent=2, sort_keys=True)
    text = _RAW_IN_JSON.sub(lambda match: "\\u%04x" % ord(match.group()), text)
    return (text + "\n").encode("utf-8")


def _check_record(record: object) -> dict:
    """`record` if it has the shape of record.json; ValueError naming the first part that has not.

    Sections may be missing (they start empty); sections this version does not know are dropped.
    """
    if not isinstance(record, dict):
        raise ValueError("it is not a JSON object")
    for section in LIST_SECTIONS + (SHA256_BY_EXE, PACKAGE_BY_SHA256):
        by_key = record.get(section, {})
        if not isinstance(by_key, dict):
            raise ValueError('"%s" is not an object' % section)
        for key, values in by_key.items():
            if section in (SHA256_BY_EXE, PACKAGE_BY_SHA256):
                ok = isinstance(values, dict) and all(isinstance(v, str) for v in values.values())
            else:
                ok = isinstance(values, list) and all(isinstance(v, str) for v in values)
            if not ok:
                raise ValueError('"%s" of %s is not %s' % (section, printable(key), "an object of "
                                 "strings" if section == SHA256_BY_EXE else "a list of strings"))
    alerts = record.get(ALERTS, [])
    if not isinstance(alerts, list) or not all(isinstance(alert, dict) for alert in alerts):
        raise ValueError('"%s" is not a list of objects' % ALERTS)
    return record


def move_aside(path: Path) -> Path:
    """Rename an unusable file to `<name>.bad-<unix time>` (never over an earlier one)."""
    stem = "%s.bad-%d" % (path.name, time.time())
    aside = path.with_name(stem)
    attempt = 1
    while aside.exists():
        aside = path.with_name("%s-%d" % (stem, attempt))
        attempt += 1
    os.rename(path, aside)
    return aside


def load_record(path: str | os.PathLike) -> tuple[dict, Optional[str]]:
    """The record stored at `path` ({} when there is none) and a problem report or None.

    A file that is not a valid record (truncated, edited by hand, not UTF-8) is moved aside
    to `record.json.bad-<unix time>` so nothing is destroyed, the record starts empty, and the
    report (one sentence, for error.log) says so. Errors reading the file are raised: starting
    over then would overwrite a record that may be fine.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return {}, None
    try:
        # UnicodeDecodeError and JSONDecodeError are ValueErrors as well.
        return _check_record(json.loads(raw.decode("utf-8"))), None
    except ValueError as error:
        aside = move_aside(path)
        return {}, "%s could not be read (%s); moved it to %s and started a new record" % (
            printable(str(path)), printable(str(error), limit=200), printable(str(aside)))


def alert_fields(alert: Alert) -> dict:
    """An alert as record.json and the event stream hold it."""
    return {"time": alert.time, "alert": alert.kind, "exe": alert.exe, "script": alert.script,
            "name": alert.name, "sha256": alert.sha256, "values": list(alert.values), "count": alert.count}


def alert_log_line(alert: Alert) -> str:
    """alert.log's line: time, kind, name, exe, script, sha256, then the values."""
    more = " (%d in all)" % alert.count if alert.count > len(alert.values) else ""
    return ", ".join([local_time(alert.time), alert.kind] + [log_field(value) for value in (
        alert.name, alert.exe, alert.script, alert.sha256, " ".join(alert.values) + more)])


@dataclasses.dataclass(frozen=True)
class NewThing:
    """Something observe() saw for the first time: `kind` is NEW_EXE, NEW_NAME or NEW_SHA256, of an
    executable or (`role` SCRIPT) of a script; `note` says where a new sha256 came from."""

    kind: str
    exe: str
    name: str
    sha256: str
    role: str = "executable"
    note: str = ""

    def logged_kind(self) -> str:
        """exe.log's word for it: "new script" and "new script sha256" for scripts."""
        if self.role != SCRIPT:
            return self.kind
        return {NEW_EXE: "new script", NEW_SHA256: "new script sha256"}.get(self.kind, self.kind)


class RecordKeeper:
    """Keeps record.json and exe.log up to date with every executable seen.

    `load_problem` is None, or a sentence for error.log when record.json was unusable and has
    been moved aside (see load_record). `journal_path` (record.json's journal) holds the changes
    since the last save, replayed here when a keeper was stopped before it could save them.
    """

    def __init__(self, record_path: str | os.PathLike, exe_log_path: str | os.PathLike,
                 origin: Optional[Callable[[str, str], Optional[Origin]]] = None,
                 journal_path: Optional[str | os.PathLike] = None,
                 alert_log_path: Optional[str | os.PathLike] = None) -> None:
        """`origin(path, sha256)` says which package installed a file (alerts.packages), if any;
        alerts are logged to `alert_log_path`."""
        self.record_path = Path(record_path)
        self.exe_log_path = Path(exe_log_path)
        self.origin = origin
        self.journal_path = Path(journal_path) if journal_path else None
        self.alert_log_path = Path(alert_log_path) if alert_log_path else None
        self.alert_log = HeldLines(self.alert_log_path) if self.alert_log_path else None
        self.exe_log = HeldLines(self.exe_log_path)
        record, self.load_problem = load_record(self.record_path)
        self._alerts: deque[dict] = deque(record.get(ALERTS, []), maxlen=ALERTS_KEPT)
        self._sets = {section: {key: set(values) for key, values in record.get(section, {}).items()}
                      for section in LIST_SECTIONS}
        self._hashes: dict[str, dict[str, str]] = {
            exe: dict(hashes) for exe, hashes in record.get(SHA256_BY_EXE, {}).items()}
        self._packages: dict[str, dict[str, str]] = {
            exe: dict(labels) for exe, labels in record.get(PACKAGE_BY_SHA256, {}).items()}
        self._changed = False
        self.replayed = self._replay()  # changes the journal held: record.json lacked them

    def observe(self, exe: str, name: str, sha256: str = "", parent_exe: str = "",
                parent_name: str = "", role: str = "executable") -> list[NewThing]:
        """Record a process and return what about it is new, having logged each to exe.log.

        An unknown `exe` is one NEW_EXE. For a known one, an unseen `name` is NEW_NAME, and an
        unseen `sha256` is NEW_SHA256 when another hash was recorded before (the file changed),
        with a note on whether its package manager put it there; a first hash for an executable
        that could not be hashed earlier is recorded quietly. A script (`role` SCRIPT, `exe` its
        path, the interpreter as its parent) is recorded the same way, but its names are those of
        interpreters and never news. Empty `sha256` or parents mean unknown and are not recorded.
        The record (and its journal) changes before exe.log is written, so nothing is new twice;
        exe.log lines that cannot be written yet are held (self.exe_log).
        """
        names = self._sets[NAMES_BY_EXE]
        hashes = self._hashes.get(exe, {})
        verifiable = bool(sha256) and not sha256.startswith("!")
        label = ""
        origin: Optional[Origin] = None
        if verifiable and sha256 not in hashes and self.origin is not None:
            origin = self.origin(exe, sha256)
            label = origin.label() if origin else ""
        new = []
        if exe not in names:
            new.append(NewThing(NEW_EXE, exe, name, sha256, role))
        elif name not in names[exe] and role != SCRIPT:
            new.append(NewThing(NEW_NAME, exe, name, sha256, role))
        if sha256 and hashes and sha256 not in hashes:
            note = change_note(origin, self._packages.get(exe, {}).values()) if verifiable and self.origin else ""
            new.append(NewThing(NEW_SHA256, exe, name, sha256, role, note))
        if self._apply(exe, name, sha256, parent_exe, parent_name, label):
            self._journal({"observe": [exe, name, sha256, parent_exe, parent_name, label]})
        now = time.time()
        self.exe_log.append([", ".join(
            [local_time(now), thing.logged_kind(), log_field(name), log_field(exe), log_field(sha256)]
            + ([log_field(thing.note)] if thing.note else [])) for thing in new])
        return new

    def _apply(self, exe: str, name: str, sha256: str, parent_exe: str, parent_name: str,
               label: str = "") -> bool:
        """Adds what is not yet in the record (`label`: the package that installed this hash);
        whether anything was."""
        changed = self._add(NAMES_BY_EXE, exe, name)
        changed = self._add(EXES_BY_NAME, name, exe) or changed
        if parent_exe:
            changed = self._add(PARENT_EXES_BY_EXE, exe, parent_exe) or changed
        if parent_name:
            changed = self._add(PARENT_NAMES_BY_NAME, name, parent_name) or changed
        if sha256 and sha256 not in self._hashes.get(exe, {}):
            self._hashes.setdefault(exe, {})[sha256] = VT_NOT_CHECKED
            self._changed = changed = True
        if label and self._packages.get(exe, {}).get(sha256) != label:
            self._packages.setdefault(exe, {})[sha256] = label
            self._changed = changed = True
        return changed

    def _add(self, section: str, key: str, value: str) -> bool:
        values = self._sets[section].setdefault(key, set())
        if value in values:
            return False
        values.add(value)
        self._changed = True
        return True

    def set_vt_status(self, exe: str, sha256: str, status: str) -> None:
        """Store the VirusTotal verdict for one hash of `exe` (recording the hash if unknown)."""
        hashes = self._hashes.setdefault(exe, {})
        if hashes.get(sha256) != status:
            hashes[sha256] = status
            self._changed = True
            self._journal({"vt": [exe, sha256, status]})

    def alert(self, alert: Alert) -> bool:
        """Keep an alert in the record (the oldest of ALERTS_KEPT goes) and log it to alert.log;
        False when alert.log refuses (a full disk): the line is held and goes with the next one
        that can be written (HeldLines)."""
        fields = alert_fields(alert)
        self._alerts.append(fields)
        self._changed = True
        self._journal({"alert": fields})
        return self.alert_log.append([alert_log_line(alert)]) if self.alert_log else True

    def as_dict(self) -> dict:
        """The record as written to record.json: every list sorted, alerts oldest first."""
        record: dict = {section: {key: sorted(values) for key, values in by_key.items()}
                        for section, by_key in self._sets.items()}
        record[SHA256_BY_EXE] = {exe: dict(hashes) for exe, hashes in self._hashes.items()}
        if self._alerts:
            record[ALERTS] = list(self._alerts)
        if self._packages:  # (absent until a package's file is recorded)
            record[PACKAGE_BY_SHA256] = {exe: dict(labels) for exe, labels in self._packages.items()}
        return record

    def save(self) -> bool:
        """Write record.json atomically if anything changed since the last save; return whether.
        OSError when it cannot be written: the changes are kept for the next try."""
        if not self._changed:
            return False
        write_atomically(self.record_path, record_to_json(self.as_dict()))
        self._changed = False
        if self.journal_path:
            try:
                self.journal_path.unlink()
            except FileNotFoundError:
                pass
        return True

    # --- the journal: what changed since the last save ---

    def _journal(self, change: dict) -> None:
        """Appends one change; a journal that cannot be written (a full disk) only means the change
        waits in memory for the next save, as it did before journals."""
        if self.journal_path:
            try:
                append_lines(self.journal_path, [json.dumps(change)])
            except OSError:
                pass

    def _replay(self) -> int:
        if not self.journal_path:
            return 0
        try:
            lines = self.journal_path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return 0
        replayed = 0
        for line in lines:
            try:
                change = json.loads(line)
                if "observe" in change:
                    replayed += self._apply(*map(str, change["observe"][:6]))
                elif "vt" in change:
                    exe, sha256, status = map(str, change["vt"][:3])
                    if self._hashes.setdefault(exe, {}).get(sha256) != status:
                        self._hashes[exe][sha256] = status
                        self._changed = True
                        replayed += 1
                elif "alert" in change and isinstance(change["alert"], dict):
                    self._alerts.append(change["alert"])
                    self._changed = True
                    replayed += 1
            except (ValueError, TypeError, AttributeError):
                continue  # a line cut short by a kill: the change it held is lost
        return replayed


@dataclasses.dataclass
class _Burst:
    """Repeats of one error key since its line was written."""

    started: float
    count: int = 0
    message: str = ""
    last: float = 0.0


class ErrorLog:
    """Appends one timestamped, sanitised line per error to error.log, collapsing bursts.

    The first error with a given key is written at once. Further errors with that key within
    `window` seconds are only counted; the count (with the latest message) is written as
    `... (repeated N times)` by the next flush(), or by the first error() after the window
    ends. So every error is accounted for, and a flood costs one line per key per window plus
    one per flush. Call flush() periodically and before exiting. Lines are cut to `line_limit`
    characters. Safe to share between threads.

    Counts not yet written are also kept in `counts_path` (a small file, rewritten as they
    change), which the next ErrorLog on that path writes out first: a keeper killed between two
    flushes loses none. Lines error.log refuses (a full disk) are held and written later
    (HeldLines), and meanwhile shown on stderr, which the service manager's journal keeps.
    """

    max_keys = 1000  # beyond this many distinct keys in one window, counts are flushed early

    def __init__(self, path: str | os.PathLike, window: float = 60.0,
                 clock: Callable[[], float] = time.time, line_limit: int = 4096,
                 counts_path: Optional[str | os.PathLike] = None) -> None:
        self.path = Path(path)
        self.window = window
        self.clock = clock
        self.line_limit = line_limit
        self.counts_path = Path(counts_path) if counts_path else None
        self.lines = HeldLines(self.path)
        self._bursts: dict[str, _Burst] = {}
        self._lock = threading.Lock()
        self._saved_counts = False
        self._write(self._recover_counts())

    def error(self, message: str, key: Optional[str] = None) -> None:
        """Log `message`; errors with the same `key` (default: the message itself) collapse."""
        key = message if key is None else key
        with self._lock:
            now = self.clock()
            lines = self._end_windows(now)
            burst = self._bursts.get(key)
            if burst is None:
                lines.append(self._line(now, message))
                self._bursts[key] = _Burst(started=now)
            else:
                burst.count += 1
                burst.message = message
                burst.last = now
            if len(self._bursts) > self.max_keys:
                lines += self._counts()
                self._bursts.clear()
            self._write(lines)

    def flush(self) -> None:
        """Write the count of every error repeated since its last line."""
        with self._lock:
            self._write(self._end_windows(self.clock()) + self._counts())

    def _end_windows(self, now: float) -> list[str]:
        """Count lines for bursts whose window has ended; those keys start afresh."""
        lines = []
        for key, burst in list(self._bursts.items()):
            if now - burst.started >= self.window:
                lines += self._counts([burst])
                del self._bursts[key]
        return lines

    def _counts(self, bursts: Optional[list[_Burst]] = None) -> list[str]:
        """Count lines for `bursts` (default all) that have repeats, resetting their counts."""
        lines = []
        for burst in self._bursts.values() if bursts is None else bursts:
            if burst.count:
                suffix = " (repeated %d time%s)" % (burst.count, "" if burst.count == 1 else "s")
                lines.append(self._line(burst.last, burst.message, suffix))
                burst.count = 0
        return lines

    def _line(self, timestamp: float, message: str, suffix: str = "") -> str:
        room = max(self.line_limit - len(suffix) - 20, 1)  # 20 = timestamp and space
        return "%s %s%s" % (local_time(timestamp), printable(message, limit=room), suffix)

    def _write(self, lines: list[str]) -> None:
        held = len(self.lines.held)
        if not self.lines.append(lines):
            for line in lines:  # the journal of the service manager keeps stderr meanwhile
                print("picosnitch: %s (cannot write %s now: %s)" % (line, printable(str(self.path)),
                      self.lines.error and self.lines.error.strerror), file=sys.stderr)
        elif held:
            self.lines.append([self._line(self.clock(), "error.log could be written again; the %d lines "
                                          "above were held meanwhile" % held)])
        if self.lines.dropped:
            dropped, self.lines.dropped = self.lines.dropped, 0
            self.lines.append([self._line(self.clock(), "%d error.log lines were dropped while it could "
                                          "not be written (they went to stderr)" % dropped)])
        self._save_counts()

    def _save_counts(self) -> None:
        """Keeps the counts not yet written where a restarted keeper finds them."""
        if not self.counts_path:
            return
        pending = {key: dataclasses.asdict(b) for key, b in self._bursts.items() if b.count}
        try:
            if pending:
                write_atomically(self.counts_path, json.dumps(pending).encode(), sync=False)
            elif self._saved_counts:
                self.counts_path.unlink(missing_ok=True)
        except OSError:
            return  # the counts stay in memory: only a kill now would lose them
        self._saved_counts = bool(pending)

    def _recover_counts(self) -> list[str]:
        """The count lines a keeper that was killed had not written."""
        if not self.counts_path:
            return []
        try:
            pending = json.loads(self.counts_path.read_text())
            bursts = [_Burst(**fields) for fields in pending.values()]
        except (OSError, ValueError, TypeError):
            return []
        self._saved_counts = True
        return self._counts(bursts)


# ---- VirusTotal's answers, as the keeper stores them ----

def exe_log_line(result: VtResult, now: float) -> str:
    """The exe.log line for a status: time, "virustotal", name, exe, sha256, status."""
    return ", ".join([local_time(now), "virustotal", log_field(result.name),
                      log_field(result.exe), log_field(result.sha256), log_field(result.status)])


def record_result(keeper: RecordKeeper, result: VtResult) -> None:
    """Store a status in the record (saved with it) and log it to exe.log."""
    keeper.set_vt_status(result.exe, result.sha256, result.status)
    keeper.exe_log.append([exe_log_line(result, time.time())])
