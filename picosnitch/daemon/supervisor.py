"""Starts the worker processes, wires their pipes, restarts a crashed one, and stops them in order.

    monitor ──► identity ──► writer (snitch.db, conn.log) ──┐
                   ├──────► live (picosnitch top's feed) ────┤
                   ├──────► sql (remote server; optional) ───┤
                   ├──────► baseline (alerts; optional) ─────┤
                   └────────────────────────────────────────► keeper ──► notifier (optional)
                                        supervisor's errors ──┘    ├───► vt (optional) ──┘
                                                                   └───► outlet (events, webhooks,
                                                                         metrics; optional) ──┘

Every worker also reports errors to the keeper, which owns record.json, exe.log and error.log.
Stopping: SIGTERM to the monitor, which drains the kernel and sends Stop down the pipeline; each
worker finishes what it holds and passes Stop on, so nothing pending is lost.

Not every worker needs a process of its own: privilege separation decides. The live feed and the
baseline run as threads in the record keeper's process (ROOMMATES): all three run as root, parse
nothing from the network and fork nothing, so apart they would only cost an interpreter each
(~4.5 MiB). The monitor and the identity worker hold the kernel's and the files' privileges; the
writer is the storms' busiest; the SQL, VirusTotal and outlet workers drop privileges or hand
data to a child that does, and the notifier forks children that become the desktop's users: each
of those keeps its own process. A room's worker that crashes takes its room down, and the
supervisor starts the room again.

A worker that ends tells the supervisor why first (WorkerEnded), so the line saying it is
restarted names the reason. One that keeps crashing is started again after a pause that grows,
never given up on: the others go on with what still works, and error.log says what does not.
Only a kernel monitor that cannot run here at all stops the daemon, with its reason.

The supervisor keeps what the kernel monitor hands over (handover: its maps and attached
programs), so a monitor restarted after a crash takes over instead of starting empty.
"""

import ctypes
import gc
import multiprocessing
import os
import signal
import socket
import sys
import threading
import time
import traceback
from collections import deque
from typing import Callable, Dict, List, Optional, cast

from picosnitch import channels
from picosnitch.alerts import baseline_worker, keeper_worker, notifier_worker, outlet_worker, vt_worker
from picosnitch.central import worker as sql_worker
from picosnitch.daemon import live_feed
from picosnitch.guard import worker as guard_worker
from picosnitch.identity import interpreters
from picosnitch.identity import worker as identity_worker
from picosnitch.kernel import handover
from picosnitch.kernel import worker as monitor_worker
from picosnitch.messages import ErrorReport, Resend, Stop, WorkerEnded
from picosnitch.sanitize import printable
from picosnitch.store import worker as writer_worker

RESTARTS_ALLOWED = 5  # within RESTART_WINDOW seconds, per worker; more is a crash loop
RESTART_WINDOW = 60.0
FIRST_PAUSE = 10.0  # seconds before a crash-looping worker is started again; doubles each time
LONGEST_PAUSE = 600.0
STOP_TIMEOUT = 30.0
SIGN_OF_LIFE = 2.0  # seconds between touches of the pid file
PR_SET_NAME = 15
REPORTS_LIMIT = 4 << 20  # bytes of error reports a worker holds for a keeper that does not read them
# Workers that run as threads in another worker's process (its room): worker -> the room's worker.
ROOMMATES = {"live": "keeper", "baseline": "keeper"}
EXIT_MONITOR_FATAL = 78  # EX_CONFIG, as for a bad config.json: systemd must not restart us in a loop

# What stops working while a worker is down, for the line that says it keeps crashing.
WITHOUT = {
    "monitor": "no traffic is recorded",
    "identity": "no traffic is recorded",
    "writer": "snitch.db and conn.log are not written (the other workers keep what they can)",
    "live": "picosnitch top shows nothing",
    "sql": "the SQL server gets no rows",
    "keeper": "record.json, exe.log and error.log are not written",
    "notifier": "no desktop notifications are shown",
    "vt": "no VirusTotal lookups are made",
    "baseline": "no baseline alerts are raised and the metrics' traffic totals stand still",
    "outlet": "events, webhooks and metrics wait in the record keeper's queue",
}

_ctx = multiprocessing.get_context("fork")


def sd_notify(state: str) -> None:
    """Tells systemd (Type=notify) about our state, when it runs us. Best effort: a notification
    socket that has gone away is no reason to stop (or to fail to stop the workers)."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        try:
            s.sendto(state.encode(), address)
        except OSError:
            pass


class Supervisor:
    def __init__(self, config, paths, notes=()):
        """notes: sentences for error.log about how the last daemon ended."""
        self.config, self.paths, self.notes = config, paths, list(notes)
        self.ready = _ctx.Event()
        metrics = bool(config["Metrics address"] or config["Metrics textfile"])
        consumers = (["writer", "live"] + (["sql"] if config["DB sql server"] else [])
                     + (["baseline"] if config["Alert kinds"] or metrics else []))
        outlet = bool(config["Event log"] or config["Syslog socket"] or metrics
                      or any(config[f"{key} URL"] for key in ("Webhook", "ntfy", "Gotify")))
        helpers = ((["notifier"] if config["Desktop notifications"] else []) + (["vt"] if config["VT API key"] else [])
                   + (["outlet"] if outlet else []))
        guard = ["guard"] if config["Guard mode"] != "off" else []  # guard mode: picosnitch/guard
        self.order = (*helpers, "keeper", *guard, *consumers, "identity", "monitor")  # start order; stop: reversed
        # Each worker's inbox, and who speaks for its upstream when that died without saying Stop.
        inbox = {name: channels.pair() for name in ("identity", *guard, *consumers, *helpers)}
        self.inbox_out = {name: sender for name, (_, sender) in inbox.items()}
        self.upstream = {"identity": "monitor", **{c: "identity" for c in consumers + guard},
                         **{h: "keeper" for h in helpers}}
        to_keeper = {name: channels.pair(REPORTS_LIMIT)
                     for name in ("supervisor", "identity", *guard, *consumers, *helpers)}
        self.to_keeper = to_keeper["supervisor"][1]
        self.keeper_waits_for = {"identity", "writer"} | ({"sql", "baseline"} & set(consumers))  # those that say Stop
        self.last_words, self.to_supervisor = channels.pair(REPORTS_LIMIT)  # WorkerEnded, from any worker
        # What the kernel monitor leaves for the next one (handover): its maps and links, and memory.
        self.kept_r, kept_w = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.kept: Dict[str, int] = {}  # descriptors by name; a restarted monitor inherits them
        self.shared = handover.shared_block()
        to_helper = {h: inbox[h][1] if h in inbox else None for h in ("notifier", "vt", "outlet")}
        # The files each exec ran, pinned by the monitor, go to the identity worker on their own socket.
        pins_out, pins_in = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        targets = {
            "monitor": (monitor_worker.run, (config, inbox["identity"][1], self.ready, os.getpid(),
                                             self.to_supervisor, kept_w, self.kept, self.shared, pins_out,
                                             interpreters.classify)),
            "identity": (identity_worker.run, (config, inbox["identity"][0], {c: inbox[c][1] for c in consumers},
                                               to_keeper["identity"][1], inbox["guard"][1] if guard else None,
                                               handover.shared_block(), pins_in)),
            "writer": (writer_worker.run, (config, paths, inbox["writer"][0], to_keeper["writer"][1])),
            "live": (live_feed.run, (config, paths, inbox["live"][0], to_keeper["live"][1])),
            "keeper": (keeper_worker.run, (paths, [r for r, _ in to_keeper.values()], self.keeper_waits_for,
                                           to_helper["notifier"], to_helper["vt"], to_helper["outlet"],
                                           config["Dpkg database"])),
        }
        if "baseline" in inbox:
            targets["baseline"] = (baseline_worker.run, (config, paths, inbox["baseline"][0], to_keeper["baseline"][1]))
        if "outlet" in inbox:
            targets["outlet"] = (outlet_worker.run, (config, paths, inbox["outlet"][0], to_keeper["outlet"][1]))
        if guard:
            targets["guard"] = (guard_worker.run, (config, paths, inbox["guard"][0], to_keeper["guard"][1],
                                                   os.getpid()))
        if "sql" in inbox:
            targets["sql"] = (sql_worker.run, (config, paths, inbox["sql"][0], to_keeper["sql"][1]))
        if "notifier" in inbox:
            targets["notifier"] = (notifier_worker.run, (config, paths, inbox["notifier"][0], to_keeper["notifier"][1]))
        if "vt" in inbox:
            targets["vt"] = (vt_worker.run, (config, inbox["vt"][0], to_keeper["vt"][1]))
        self.targets: Dict[str, tuple] = targets
        # Each worker's process, by the worker whose room it is; its roommates, in start order.
        self.room = {name: ROOMMATES.get(name, name) for name in self.order}
        self.roommates = {host: [n for n in self.order if self.room[n] == host and n != host] for host in self.order}
        self.processes: Dict[str, multiprocessing.process.BaseProcess] = {}
        self.restarts: Dict[str, deque] = {name: deque() for name in self.order}
        self.reasons: Dict[str, str] = {}  # each worker's last words, until its exit is handled
        self.paused: Dict[str, float] = {}  # crash-looping workers: when each is started again
        self.pauses: Dict[str, float] = {}  # the pause each crash loop gets next
        self.stopping = False
        self.failure: Optional[str] = None  # why the daemon stopped on its own, for the command's stderr

    def _start(self, name: str) -> None:
        """Starts a worker's process, with its roommates."""
        target, args = self.targets[name]
        if self.roommates[name]:
            target, args = _room, ([(n, *self.targets[n]) for n in (name, *self.roommates[name])], self.to_supervisor)
        process = _ctx.Process(target=_exit_with, args=(name, target, args, self.to_supervisor, self.kept),
                               name=f"picosnitch-{name}", daemon=False)
        # The forked worker shares the supervisor's objects until it writes to them, and a full
        # collection (heap.trim) writes to every object it examines: frozen, they are not examined.
        gc.freeze()
        process.start()
        self.processes[name] = process

    def report(self, message: str, key: Optional[str] = None) -> None:
        """A line for error.log; also on stderr while the keeper, who writes error.log, is down."""
        self.to_keeper.send(ErrorReport(message, key))
        if "keeper" in self.paused:
            print(f"picosnitch: {message}", file=sys.stderr, flush=True)

    def run(self, on_ready: Optional[Callable[[], None]] = None) -> int:
        """Runs until SIGTERM/SIGINT, or until the kernel monitor cannot run (`failure` says
        why); returns the exit status."""
        signal.signal(signal.SIGTERM, lambda *_: self._request_stop())
        signal.signal(signal.SIGINT, lambda *_: self._request_stop())
        for name in self.order:
            if self.room[name] == name:
                self._start(name)
        for warning in [*self.notes, *self.config.warnings]:
            self.report(warning)
        next_sign_of_life = time.monotonic() + SIGN_OF_LIFE
        announced = False
        try:
            while not self.stopping:
                if not announced and self.ready.is_set():
                    announced = True
                    sd_notify("READY=1")
                    if on_ready:
                        on_ready()
                self._start_paused()
                if time.monotonic() >= next_sign_of_life:
                    next_sign_of_life = time.monotonic() + SIGN_OF_LIFE
                    self._sign_of_life()
                running = {p.sentinel: name for name, p in self.processes.items() if name not in self.paused}
                senders = [self.to_keeper, *self.inbox_out.values()]
                for ready in channels.wait([*running, self.last_words, self.kept_r], self._wait_time(), senders):
                    if ready is self.last_words:
                        self._read_last_words()
                        continue
                    if ready is self.kept_r:
                        self._keep()
                        continue
                    name = running[cast(int, ready)]
                    if self.stopping:
                        break
                    self.processes[name].join(5)  # reaped, so that its exit code is known
                    if self.processes[name].exitcode is None:  # still exiting: next round
                        continue
                    self._read_last_words()
                    if self.processes[name].exitcode == 0:  # finished: its upstream stopped
                        self._request_stop()
                    elif not self._restart(name):
                        self._request_stop()
        finally:  # even after a bug here: workers left running would keep the exit waiting forever
            sd_notify("STOPPING=1")
            self._stop_all()
        return EXIT_MONITOR_FATAL if self.failure else 0

    def _request_stop(self) -> None:
        self.stopping = True

    def _wait_time(self) -> float:
        if not self.paused:
            return 0.2
        return min(0.2, max(min(self.paused.values()) - time.monotonic(), 0))

    def _sign_of_life(self) -> None:
        """The pid file's time says when the daemon was last seen running (control.unclean_end)."""
        try:
            os.utime(self.paths.pid_file)
        except OSError:
            pass

    def _keep(self) -> None:
        """Keeps the descriptors the monitor hands over, until the daemon stops."""
        while channels.wait([self.kept_r], 0):
            received = handover.receive(self.kept_r)
            if received is None:
                return
            for name, fd in received.items():
                if name in self.kept:
                    os.close(self.kept[name])
                self.kept[name] = fd

    def _let_go(self) -> None:
        """Closes what the monitor left: its programs are detached, its maps freed."""
        for fd in self.kept.values():
            os.close(fd)
        self.kept.clear()

    def _read_last_words(self) -> None:
        while self.last_words.poll():
            ended = self.last_words.recv()
            if not isinstance(ended, WorkerEnded):
                continue
            self.reasons[ended.name] = ended.reason
            if ended.fatal and self.failure is None:
                self.failure = f"{ended.reason}; picosnitch stops"
                self.report(self.failure)
                self._request_stop()

    def _restart(self, name: str) -> bool:
        """Restarts a worker that exited, at once or after a pause if it keeps crashing; False
        when it must not be (the kernel monitor cannot run here)."""
        code = self.processes[name].exitcode
        assert code is not None, "it has exited"
        why = f"killed by signal {-code}" if code < 0 else f"exit status {code}"
        reason = self.reasons.pop(name, None)
        if reason:
            why += ": " + reason
        if name == "monitor":
            self._keep()  # all it handed over, before the next one inherits it
        if name == "monitor" and code == monitor_worker.EXIT_NOT_TAKEN_OVER:
            self._let_go()
            self.report(f"the kernel monitor could not take over ({why}); it starts afresh: what the kernel had "
                        "counted since the last monitor ended is lost")
            self._start_now(name)
            return True
        if name == "monitor" and code == monitor_worker.EXIT_FATAL:
            if self.failure is None:
                self.failure = f"the kernel monitor cannot start ({why}); picosnitch stops"
                self.report(self.failure)
            return False
        now = time.monotonic()
        history = self.restarts[name]
        while history and now - history[0] > RESTART_WINDOW:
            history.popleft()
        if len(history) >= RESTARTS_ALLOWED:
            pause = self.pauses.get(name, FIRST_PAUSE)
            self.pauses[name] = min(pause * 2, LONGEST_PAUSE)
            self.paused[name] = now + pause
            history.clear()
            without = "; ".join(WITHOUT[n] for n in (name, *self.roommates[name]))
            self.report(f"the {name} worker crashed {RESTARTS_ALLOWED + 1} times within {RESTART_WINDOW:.0f} s "
                        f"(the last time {why}); until it runs again {without}; it is started again "
                        f"in {pause:.0f} s")
            return True
        history.append(now)
        self.report(f"the {name} worker stopped unexpectedly ({why}); restarting it", f"restart:{name}")
        self._start_now(name)
        return True

    def _start_paused(self) -> None:
        for name, when in list(self.paused.items()):
            if time.monotonic() >= when:
                del self.paused[name]
                self._start_now(name)

    def _start_now(self, name: str) -> None:
        """Starts a worker again."""
        if name == "monitor":
            self.ready.clear()
        self._start(name)
        if name == "keeper":  # what the old one was told and had not recorded comes again
            self.inbox_out["identity"].send(Resend())

    def _stop_all(self) -> None:
        """Stops the pipeline from its head. A worker whose upstream died without saying Stop is
        sent one by the supervisor instead (a duplicate Stop is never read, so it is harmless)."""
        monitor = self.processes["monitor"]
        if monitor.is_alive() and monitor.pid is not None:
            os.kill(monitor.pid, signal.SIGTERM)
        for name in reversed(self.order):
            process = self.processes[self.room[name]]
            if process.is_alive() and name == "keeper":
                for producer in self.keeper_waits_for:
                    self.to_keeper.send(Stop(producer))
            elif process.is_alive() and name in self.inbox_out:
                self.inbox_out[name].send(Stop(self.upstream[name]))
            if self.room[name] != name:
                continue  # its room ends with the worker whose room it is, stopped later
            self._join(process, STOP_TIMEOUT)
            if process.is_alive():
                self.report(f"the {name} worker did not stop within {STOP_TIMEOUT:.0f} s; killing it")
                process.kill()
                process.join()
            if name == "monitor":  # it has drained the kernel: the programs go
                self._keep()
                self._let_go()


    def _join(self, process, timeout: float) -> None:
        """Waits for a worker to exit, sending meanwhile what the supervisor has queued for the others."""
        deadline = time.monotonic() + timeout
        senders = [self.to_keeper, *self.inbox_out.values()]
        while process.is_alive() and time.monotonic() < deadline:
            channels.wait([process.sentinel], min(0.1, deadline - time.monotonic()), senders)


def _exit_with(name: str, target, args, to_supervisor, kept: Dict[str, int]) -> None:
    """A worker's life: its target's return value is the exit status; an exception is told to
    the supervisor in one line (and in full on stderr, which the journal keeps) first. What the
    kernel monitor left is the next monitor's alone: a copy held elsewhere would keep programs
    attached that the supervisor lets go."""
    name_this_process(f"snitch-{name}")
    if name != "monitor":
        for fd in kept.values():
            os.close(fd)
    try:
        status = target(*args) or 0
    except SystemExit as e:
        status = e.code if isinstance(e.code, int) else 1
    except BaseException as e:  # noqa: BLE001 - whatever ends a worker is reported
        traceback.print_exc()
        try:
            to_supervisor.send(WorkerEnded(name, describe(e)))
        except OSError:
            pass
        status = 1
    os._exit(status)


def _room(workers, to_supervisor) -> int:
    """Runs each of `workers` ((name, target, args)) in a thread of this process, the first in the
    main thread (its exception ends the process as any worker's does); the exit status is the
    highest of theirs. An exception in another ends the whole room at once, named."""
    host = workers[0][0]
    statuses: List[int] = []

    def roommate(name: str, target, args) -> None:
        name_this_process(f"snitch-{name}")  # this thread's name, as `ps -L` shows it
        try:
            statuses.append(target(*args) or 0)
        except BaseException as e:  # noqa: BLE001 - whatever ends a worker is reported
            traceback.print_exc()
            try:
                to_supervisor.send(WorkerEnded(host, f"its {name} worker failed: {describe(e)}"))
                to_supervisor.finish(5)
            finally:
                os._exit(1)

    channels.ends_on_stop()
    threads = [threading.Thread(target=roommate, args=worker, name=f"snitch-{worker[0]}") for worker in workers[1:]]
    for thread in threads:
        thread.start()
    statuses.append(workers[0][1](*workers[0][2]) or 0)
    for thread in threads:
        thread.join()
    return max(statuses)


def name_this_process(name: str) -> None:
    """The name ps, top and /proc/PID/comm show for this process (15 characters at most)."""
    libc = ctypes.CDLL(None)
    libc.prctl(PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]), 0, 0, 0)


def describe(error: BaseException) -> str:
    """An exception in one line: its type, message, and the innermost line of picosnitch it came from."""
    where = ""
    for frame in traceback.extract_tb(error.__traceback__):
        if "picosnitch" in frame.filename:
            where = f" (at picosnitch/{frame.filename.rpartition('picosnitch/')[2]} line {frame.lineno})"
    text = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
    return printable(text, limit=300) + where
