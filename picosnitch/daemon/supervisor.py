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
"""

import gc
import multiprocessing
import os
import signal
import socket
import time
from collections import deque
from multiprocessing.connection import wait
from typing import Callable, Dict, Optional, cast

from picosnitch.alerts import baseline_worker, keeper_worker, notifier_worker, outlet_worker, vt_worker
from picosnitch.central import worker as sql_worker
from picosnitch.daemon import live_feed
from picosnitch.guard import worker as guard_worker
from picosnitch.identity import interpreters
from picosnitch.identity import worker as identity_worker
from picosnitch.kernel import worker as monitor_worker
from picosnitch.messages import ErrorReport, Stop
from picosnitch.store import worker as writer_worker

RESTARTS_ALLOWED = 5  # within RESTART_WINDOW seconds, per worker; more is a crash loop
RESTART_WINDOW = 60.0
STOP_TIMEOUT = 30.0

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
    def __init__(self, config, paths):
        self.config, self.paths = config, paths
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
        inbox = {name: _ctx.Pipe(duplex=False) for name in ("identity", *guard, *consumers, *helpers)}
        self.inbox_out = {name: sender for name, (_, sender) in inbox.items()}
        self.upstream = {"identity": "monitor", **{c: "identity" for c in consumers + guard},
                         **{h: "keeper" for h in helpers}}
        to_keeper = {name: _ctx.Pipe(duplex=False) for name in ("supervisor", "identity", *guard, *consumers,
                                                                 *helpers)}
        self.to_keeper = to_keeper["supervisor"][1]
        self.keeper_waits_for = {"identity", "writer"} | ({"sql", "baseline"} & set(consumers))  # those that say Stop
        to_helper = {h: inbox[h][1] if h in inbox else None for h in ("notifier", "vt", "outlet")}
        # The files each exec ran, pinned by the monitor, go to the identity worker on their own socket.
        pins_out, pins_in = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        targets = {
            "monitor": (monitor_worker.run, (config, inbox["identity"][1], self.ready, os.getpid(), pins_out,
                                             interpreters.classify)),
            "identity": (identity_worker.run, (config, inbox["identity"][0], [inbox[c][1] for c in consumers],
                                               to_keeper["identity"][1], inbox["guard"][1] if guard else None,
                                               pins_in)),
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
        self.processes: Dict[str, multiprocessing.process.BaseProcess] = {}
        self.restarts: Dict[str, deque] = {name: deque() for name in self.order}
        self.stopping = False

    def _start(self, name: str) -> None:
        target, args = self.targets[name]
        process = _ctx.Process(target=_exit_with, args=(target, args), name=f"picosnitch-{name}", daemon=False)
        # The forked worker shares the supervisor's objects until it writes to them, and a full
        # collection (heap.trim) writes to every object it examines: frozen, they are not examined.
        gc.freeze()
        process.start()
        self.processes[name] = process

    def report(self, message: str, key: Optional[str] = None) -> None:
        self.to_keeper.send(ErrorReport(message, key))

    def run(self, on_ready: Optional[Callable[[], None]] = None) -> int:
        """Runs until SIGTERM/SIGINT; returns the exit status."""
        signal.signal(signal.SIGTERM, lambda *_: self._request_stop())
        signal.signal(signal.SIGINT, lambda *_: self._request_stop())
        for name in self.order:
            self._start(name)
        for warning in self.config.warnings:
            self.report(warning)
        announced = False
        status = 0
        try:
            while not self.stopping:
                if not announced and self.ready.is_set():
                    announced = True
                    sd_notify("READY=1")
                    if on_ready:
                        on_ready()
                sentinels = {p.sentinel: name for name, p in self.processes.items()}
                for sentinel in wait(list(sentinels), timeout=0.2):
                    name = sentinels[cast(int, sentinel)]
                    if self.stopping:
                        break
                    self.processes[name].join(5)  # reaped, so that its exit code is known
                    if self.processes[name].exitcode is None:  # still exiting: next round
                        continue
                    if self.processes[name].exitcode == 0:  # finished: its upstream stopped
                        self._request_stop()
                    elif not self._restart(name):
                        status = 1
                        self._request_stop()
        finally:  # even after a bug here: workers left running would keep the exit waiting forever
            sd_notify("STOPPING=1")
            self._stop_all()
        return status

    def _request_stop(self) -> None:
        self.stopping = True

    def _restart(self, name: str) -> bool:
        """Restarts a worker that exited; False when it must not be (fatal, or crash loop)."""
        code = self.processes[name].exitcode
        assert code is not None, "it has exited"
        why = f"killed by signal {-code}" if code < 0 else f"exit status {code}"
        if name == "monitor" and code == monitor_worker.EXIT_FATAL:
            self.report("the kernel monitor cannot run here (see the previous line); picosnitch stops")
            return False
        now = time.monotonic()
        history = self.restarts[name]
        while history and now - history[0] > RESTART_WINDOW:
            history.popleft()
        if len(history) >= RESTARTS_ALLOWED:
            self.report(f"the {name} worker crashed {len(history) + 1} times within {RESTART_WINDOW:.0f} s "
                        f"({why}); picosnitch stops")
            return False
        history.append(now)
        self.report(f"the {name} worker stopped unexpectedly ({why}); restarting it", f"restart:{name}")
        if name == "monitor":
            self.ready.clear()
        self._start(name)
        return True

    def _stop_all(self) -> None:
        """Stops the pipeline from its head. A worker whose upstream died without saying Stop is
        sent one by the supervisor instead (a duplicate Stop is never read, so it is harmless)."""
        monitor = self.processes["monitor"]
        if monitor.is_alive() and monitor.pid is not None:
            os.kill(monitor.pid, signal.SIGTERM)
        for name in reversed(self.order):
            process = self.processes[name]
            if process.is_alive() and name == "keeper":
                for producer in self.keeper_waits_for:
                    self.to_keeper.send(Stop(producer))
            elif process.is_alive() and name in self.inbox_out:
                self.inbox_out[name].send(Stop(self.upstream[name]))
            process.join(STOP_TIMEOUT)
            if process.is_alive():
                self.report(f"the {name} worker did not stop within {STOP_TIMEOUT:.0f} s; killing it")
                process.kill()
                process.join()


def _exit_with(target, args) -> None:
    os._exit(target(*args) or 0)
