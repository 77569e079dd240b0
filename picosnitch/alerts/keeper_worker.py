"""The record keeper process: record.json, exe.log, alert.log and error.log, fed by every
other worker.

What is new (an executable, a name, a sha256) goes on to the notifier at once, and new hashes
to the VirusTotal worker, whose verdicts come back here to be recorded. Alerts from the baseline
worker are logged and kept in record.json, and go on to the notifier. The outlet (event stream,
webhooks, metrics) gets all of it, every error report and the baseline's traffic totals.
"""

import signal
import time
from multiprocessing.connection import Connection, wait
from typing import cast

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
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    errors = ErrorLog(paths.error_log)
    keeper = RecordKeeper(paths.record, paths.exe_log, Packages(dpkg_admindir).origin, paths.alert_log)
    if keeper.load_problem:
        errors.error(keeper.load_problem)
    if to_vt:
        for request in unchecked_hashes(keeper):
            to_vt.send(request)
    stopped: set[str] = set()
    next_save = time.monotonic() + SAVE_EVERY
    try:
        while not set(wait_for) <= stopped:
            for inbox in wait(inboxes, timeout=SAVE_EVERY):
                message = cast(Connection, inbox).recv()
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
                    alert(keeper, errors, message, to_notifier, to_outlet)
                elif isinstance(message, Traffic) and to_outlet:
                    to_outlet.send(message)
                elif isinstance(message, VtResult):
                    record_result(keeper, message)
                    if to_notifier:
                        to_notifier.send(message)
            if time.monotonic() >= next_save:
                next_save = time.monotonic() + SAVE_EVERY
                keeper.save()
                errors.flush()
    finally:
        keeper.save()
        errors.flush()
        for helper in (to_notifier, to_vt, to_outlet):
            if helper:
                helper.send(Stop("keeper"))
    return 0


def alert(keeper: RecordKeeper, errors: ErrorLog, message: Alert, to_notifier, to_outlet) -> None:
    """Log and keep an alert, and pass it on; one that cannot be logged is still passed on."""
    try:
        keeper.alert(message)
    except OSError as error:
        errors.error(f"cannot write {keeper.alert_log_path} ({error.strerror or error}): {message.kind} "
                     f"of {message.exe}: {' '.join(message.values)}", "alert.log")
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
