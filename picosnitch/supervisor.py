"""Starts the worker processes, wires their pipes, restarts a crashed one, and stops them in order.

    monitor ──► identity ──► writer ──┐
                   └───────────────► keeper ◄── supervisor (its own errors)

Stopping: SIGTERM to the monitor, which drains the kernel and sends Stop down the pipeline; each
worker finishes what it holds and passes Stop on, so nothing pending is lost.
"""

import multiprocessing
import os
import signal
import socket
import time
from collections import deque
from multiprocessing.connection import wait
from typing import Callable, Dict, Optional

from picosnitch import identity_worker, keeper_worker, monitor_worker, writer_worker
from picosnitch.messages import ErrorReport, Stop

RESTARTS_ALLOWED = 5  # within RESTART_WINDOW seconds, per worker; more is a crash loop
RESTART_WINDOW = 60.0
STOP_TIMEOUT = 30.0
ORDER = ("keeper", "writer", "identity", "monitor")  # start order; stop order is the reverse

_ctx = multiprocessing.get_context("fork")


def sd_notify(state: str) -> None:
    """Tells systemd (Type=notify) about our state, when it runs us."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendto(state.encode(), address)


class Supervisor:
    def __init__(self, config, paths):
        self.config, self.paths = config, paths
        self.ready = _ctx.Event()
        mon_in, self.mon_out = _ctx.Pipe(duplex=False)
        writer_in, self.writer_out = _ctx.Pipe(duplex=False)
        keeper_from_id, id_to_keeper = _ctx.Pipe(duplex=False)
        keeper_from_writer, writer_to_keeper = _ctx.Pipe(duplex=False)
        keeper_from_sup, self.to_keeper = _ctx.Pipe(duplex=False)
        self.targets: Dict[str, tuple] = {
            "keeper": (keeper_worker.run, (paths, [keeper_from_id, keeper_from_writer, keeper_from_sup])),
            "writer": (writer_worker.run, (config, paths, writer_in, writer_to_keeper)),
            "identity": (identity_worker.run, (config, mon_in, self.writer_out, id_to_keeper)),
            "monitor": (monitor_worker.run, (config, self.mon_out, self.ready)),
        }
        self.processes: Dict[str, multiprocessing.process.BaseProcess] = {}
        self.restarts: Dict[str, deque] = {name: deque() for name in ORDER}
        self.stopping = False

    def _start(self, name: str) -> None:
        target, args = self.targets[name]
        process = _ctx.Process(target=_exit_with, args=(target, args), name=f"picosnitch-{name}", daemon=False)
        process.start()
        self.processes[name] = process

    def report(self, message: str) -> None:
        self.to_keeper.send(ErrorReport(message))

    def run(self, on_ready: Optional[Callable[[], None]] = None) -> int:
        """Runs until SIGTERM/SIGINT; returns the exit status."""
        signal.signal(signal.SIGTERM, lambda *_: self._request_stop())
        signal.signal(signal.SIGINT, lambda *_: self._request_stop())
        for name in ORDER:
            self._start(name)
        announced = False
        status = 0
        while not self.stopping:
            if not announced and self.ready.is_set():
                announced = True
                sd_notify("READY=1")
                if on_ready:
                    on_ready()
            sentinels = {p.sentinel: name for name, p in self.processes.items()}
            for sentinel in wait(list(sentinels), timeout=0.2):
                name = sentinels[sentinel]
                if self.stopping:
                    break
                if self.processes[name].exitcode == 0:  # finished: its upstream stopped
                    self._request_stop()
                elif not self._restart(name):
                    status = 1
                    self._request_stop()
        sd_notify("STOPPING=1")
        self._stop_all()
        return status

    def _request_stop(self) -> None:
        self.stopping = True

    def _restart(self, name: str) -> bool:
        """Restarts a worker that exited; False when it must not be (fatal, or crash loop)."""
        code = self.processes[name].exitcode
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
        self.report(f"the {name} worker stopped unexpectedly ({why}); restarting it")
        if name == "monitor":
            self.ready.clear()
        self._start(name)
        return True

    def _stop_all(self) -> None:
        """Stops the pipeline from its head. A worker whose upstream died without saying Stop is
        sent one by the supervisor instead (a duplicate Stop is never read, so it is harmless)."""
        stand_ins = {
            "identity": lambda: self.mon_out.send(Stop("monitor")),
            "writer": lambda: self.writer_out.send(Stop("identity")),
            "keeper": lambda: (self.to_keeper.send(Stop("identity")), self.to_keeper.send(Stop("writer"))),
        }
        monitor = self.processes["monitor"]
        if monitor.is_alive():
            os.kill(monitor.pid, signal.SIGTERM)
        for name in reversed(ORDER):
            process = self.processes[name]
            if name in stand_ins and process.is_alive():
                stand_ins[name]()
            process.join(STOP_TIMEOUT)
            if process.is_alive():
                self.report(f"the {name} worker did not stop within {STOP_TIMEOUT:.0f} s; killing it")
                process.kill()
                process.join()


def _exit_with(target, args) -> None:
    os._exit(target(*args) or 0)
