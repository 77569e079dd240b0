"""The record keeper process: record.json, exe.log and error.log, fed by every other worker."""

import signal
import time
from multiprocessing.connection import wait

from picosnitch.messages import ErrorReport, Observed, Stop
from picosnitch.record_keeper import ErrorLog, RecordKeeper

SAVE_EVERY = 5.0
PRODUCERS_THAT_STOP = {"identity", "writer"}


def run(paths, inboxes) -> int:
    """Serves until both the identity worker and the writer have said Stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    errors = ErrorLog(paths.error_log)
    keeper = RecordKeeper(paths.record, paths.exe_log)
    if keeper.load_problem:
        errors.error(keeper.load_problem)
    stopped = set()
    open_inboxes = list(inboxes)
    next_save = time.monotonic() + SAVE_EVERY
    try:
        while not PRODUCERS_THAT_STOP <= stopped and open_inboxes:
            for inbox in wait(open_inboxes, timeout=SAVE_EVERY):
                try:
                    message = inbox.recv()
                except EOFError:
                    open_inboxes.remove(inbox)
                    continue
                if isinstance(message, Stop):
                    stopped.add(message.sender)
                elif isinstance(message, ErrorReport):
                    errors.error(message.message, message.key)
                elif isinstance(message, Observed):
                    keeper.observe(message.exe, message.name, message.sha256, message.parent_exe,
                                   message.parent_name)
            if time.monotonic() >= next_save:
                next_save = time.monotonic() + SAVE_EVERY
                keeper.save()
                errors.flush()
    finally:
        keeper.save()
        errors.flush()
    return 0
