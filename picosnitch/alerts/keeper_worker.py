"""The record keeper process: record.json, exe.log, alert.log and error.log, fed by every
other worker.

What is new (an executable, a name, a sha256) goes on to the notifier at once, and new hashes
to the VirusTotal worker, whose verdicts come back here to be recorded. Alerts from the baseline
worker are logged and kept in record.json, and go on to the notifier. The outlet (event stream,
webhooks, metrics) gets all of it, every error report and the baseline's traffic totals.
"""

import time
from typing import Optional

from picosnitch import channels, heap
from picosnitch.alerts.packages import DPKG_ADMINDIR, Packages
from picosnitch.alerts.record_keeper import (
    NAMES_BY_EXE,
    NEW_EXE,
    NEW_SHA256,
    SCRIPT,
    SHA256_BY_EXE,
    VT_NOT_CHECKED,
    ErrorLog,
    RecordKeeper,
    record_result,
)
from picosnitch.messages import Alert, ErrorReport, Observed, Stop, Traffic, VtRequest, VtResult

SAVE_EVERY = 5.0
QUIET_MESSAGES = 1  # any message makes a save period busy; the first quiet one after gives memory back (heap.Burst)
FINISH_TIMEOUT = 20.0  # seconds at exit to hand the helpers what is still queued


def unchecked_hashes(keeper: RecordKeeper):
    """VtRequests for every recorded hash VirusTotal has not answered for yet."""
    record = keeper.as_dict()
    for exe, hashes in record[SHA256_BY_EXE].items():
        name = (record[NAMES_BY_EXE].get(exe) or [""])[0]
        for sha256, status in hashes.items():
            if status == VT_NOT_CHECKED:
                yield VtRequest(exe, name, sha256)


def run(paths, inboxes, wait_for, to_notifier=None, to_vt=None, to_outlet=None,
        dpkg_admindir: str = DPKG_ADMINDIR) -> int:
    """Serves until every worker named in `wait_for` has said Stop, then tells the helpers to stop.
    A changed hash is checked against the package managers' records (dpkg's in `dpkg_admindir`)."""
    channels.ends_on_stop()
    errors = ErrorLog(paths.error_log, counts_path=paths.error_counts)
    keeper = RecordKeeper(paths.record, paths.exe_log, Packages(dpkg_admindir).origin,
                          journal_path=paths.record_journal, alert_log_path=paths.alert_log)
    if keeper.load_problem:
        errors.error(keeper.load_problem)
    if keeper.replayed:
        errors.error(f"{keeper.replayed} changes to {paths.record} were not saved when the record keeper last "
                     f"stopped; recovered them from {paths.record_journal}")
    upkeep = Upkeep(keeper, errors)
    if to_vt:
        for request in unchecked_hashes(keeper):
            to_vt.send(request)
    stopped: set[str] = set()
    helpers = [h for h in (to_notifier, to_vt, to_outlet) if h]
    next_save = time.monotonic() + SAVE_EVERY
    burst, handled = heap.Burst(QUIET_MESSAGES), 0

    def handle(message) -> None:
        if isinstance(message, Stop):
            stopped.add(message.sender)
        elif isinstance(message, ErrorReport):
            errors.error(message.message, message.key)
            for helper in (to_notifier, to_outlet):
                if helper:
                    helper.send(message)
        elif isinstance(message, Observed):
            observe(keeper, message, to_notifier, to_vt, to_outlet)
        elif isinstance(message, Alert):
            alert(keeper, message, to_notifier, to_outlet)
        elif isinstance(message, Traffic) and to_outlet:
            to_outlet.send(message)
        elif isinstance(message, VtResult):
            record_result(keeper, message)
            if to_notifier:
                to_notifier.send(message)

    try:
        while not set(wait_for) <= stopped:
            for inbox in channels.wait(inboxes, SAVE_EVERY, helpers):
                handle(inbox.recv())
                handled += 1
            if time.monotonic() >= next_save:
                next_save = time.monotonic() + SAVE_EVERY
                upkeep.save()
                if burst.over(handled):
                    heap.trim()  # what a burst of messages left free in the heap
                handled = 0
        for inbox in inboxes:  # what the others said last, e.g. the supervisor's reason for stopping
            while inbox.poll():
                handle(inbox.recv())
    finally:
        upkeep.save()
        for helper in helpers:
            helper.send(Stop("keeper"))
            helper.finish(FINISH_TIMEOUT)
    return 0


class Upkeep:
    """Saves record.json and appends what exe.log and alert.log hold back, every SAVE_EVERY seconds. None
    stops the keeper when it fails (a full disk): error.log says so once, and again when the file
    can be written, with what waited meanwhile; nothing the keeper was told is lost."""

    def __init__(self, keeper: RecordKeeper, errors: ErrorLog):
        self.keeper, self.errors = keeper, errors
        self.record_failing: Optional[float] = None
        self.failing: dict[str, float] = {}  # log file -> since when it refuses lines

    def save(self) -> None:
        try:
            self.keeper.save()
        except OSError as e:
            self._failed("record", str(self.keeper.record_path), e)
        else:
            self._recovered("record", str(self.keeper.record_path), "its changes were kept and are saved now")
        for log in (self.keeper.exe_log, self.keeper.alert_log):
            if log:
                self._retry(log)
        self.errors.flush()

    def _retry(self, log) -> None:
        """A log's held lines (HeldLines): written now, or said once to be waiting."""
        path, held = str(log.path), len(log.held)
        if log.retry():
            since = self.failing.pop(path, None)
            if since is not None:
                self.errors.error(f"{path} can be written again after {time.monotonic() - since:.0f} s; "
                                  f"the {held} lines it held back are written now")
        elif log.error and path not in self.failing:
            self.failing[path] = time.monotonic()
            self.errors.error(f"{path} cannot be written ({log.error.strerror or log.error}); what it would hold "
                              "is kept and written as soon as it can be", "files:" + path)
        if log.dropped:
            self.errors.error(f"{log.dropped} lines for {log.path} were dropped: more were held back "
                              f"than the {log.limit} kept while it cannot be written")
            log.dropped = 0

    def _failed(self, which: str, path: str, error: OSError) -> None:
        if getattr(self, which + "_failing") is None:
            setattr(self, which + "_failing", time.monotonic())
            self.errors.error(f"{path} cannot be written ({error.strerror or error}); what it would hold is kept "
                              "and written as soon as it can be", "files:" + path)

    def _recovered(self, which: str, path: str, what: str) -> None:
        since = getattr(self, which + "_failing")
        if since is not None:
            setattr(self, which + "_failing", None)
            self.errors.error(f"{path} can be written again after {time.monotonic() - since:.0f} s; {what}")


def alert(keeper: RecordKeeper, message: Alert, to_notifier, to_outlet) -> None:
    """Keep and log an alert, and pass it on; a line alert.log refuses waits in the keeper (Upkeep
    says so and writes it when it can)."""
    keeper.alert(message)
    for helper in (to_notifier, to_outlet):
        if helper:
            helper.send(message)


def observe(keeper: RecordKeeper, message: Observed, to_notifier, to_vt, to_outlet=None) -> None:
    """The executable, and the script it ran (recorded like an executable, the interpreter its
    parent): what is new goes to the notifier and the outlet at once, new hashes to VirusTotal."""
    new = keeper.observe(message.exe, message.name, message.sha256, message.parent_exe, message.parent_name)
    if message.script:
        new += keeper.observe(message.script, message.name, message.script_sha256, message.exe, message.name,
                              role=SCRIPT)
    for helper in (to_notifier, to_outlet):
        if new and helper:
            helper.send(new)  # now, not at the next write window
    for thing in new:
        verifiable = thing.sha256 and not thing.sha256.startswith("!")
        if to_vt and verifiable and thing.kind in (NEW_EXE, NEW_SHA256):
            to_vt.send(VtRequest(thing.exe, thing.name, thing.sha256))
