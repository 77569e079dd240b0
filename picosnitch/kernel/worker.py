"""The privileged monitor process: runs the kernel monitor and passes its records on in batches.

With pins (kernel.pins), batches leave through a thread of their own (Sender): the monitor goes on
reading the ring buffer, and so pinning what each exec ran, while the identity worker is slow to
read, instead of waiting on a full pipe while short-lived processes exit unpinned.
"""

import os
import queue
import signal
import threading

from picosnitch import parent_death
from picosnitch.kernel.libbpf import LibbpfError
from picosnitch.kernel.monitor import KernelMonitor, MonitorError
from picosnitch.kernel.pins import ExecPinner, pin_capacity
from picosnitch.messages import ErrorReport, Stop

EXIT_FATAL = 3  # the monitor cannot run here: the supervisor must not restart it
PIN_NICE = -10  # pins race the processes they pin: a busy machine must not keep the monitor waiting
SEND_QUEUE = 16  # batches waiting for the identity worker before the monitor waits too


class Sender:
    """Sends each batch from a thread, in order; the descriptors pinned for it go first, from the
    monitor's thread (ExecPinner.flush), so they are on their socket before the batch is queued."""

    def __init__(self, to_identity, pinner: ExecPinner):
        self.to_identity, self.pinner = to_identity, pinner
        self.queue: "queue.Queue" = queue.Queue(SEND_QUEUE)
        self.thread = threading.Thread(target=self._loop, name="sender", daemon=True)
        self.thread.start()

    def __call__(self, batch) -> None:
        self.pinner.flush()
        self.queue.put(batch)

    def _loop(self) -> None:
        while (batch := self.queue.get()) is not None:
            self.to_identity.send(batch)

    def close(self) -> None:
        """Returns once every batch has been sent."""
        self.queue.put(None)
        self.thread.join()


def run(config, to_identity, ready, supervisor_pid: int, pin_socket=None, classify=None) -> int:
    """Loads the BPF programs, sets `ready`, and sends record batches until SIGTERM (also sent
    when the supervisor dies). With `pin_socket`, what each exec ran is pinned (kernel.pins, with
    the daemon's `classify` naming scripts and programs) and its descriptors are sent there,
    each batch's before the batch."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent_death.signal_when_parent_dies(supervisor_pid, signal.SIGTERM)
    monitor = KernelMonitor(names_from_traffic=config["Names from traffic"],
                            ring_pages=config["Perf ring buffer (pages)"],
                            flow_entries=config["Flow map entries"])
    try:
        degraded = monitor.start()
    except (MonitorError, LibbpfError) as e:
        to_identity.send([ErrorReport(f"the kernel monitor cannot start: {e}")])
        to_identity.send(Stop("monitor"))
        return EXIT_FATAL
    if degraded:
        to_identity.send(degraded)
    ready.set()
    sender = None
    if pin_socket is not None:
        try:
            os.setpriority(os.PRIO_PROCESS, 0, PIN_NICE)  # it only ever reacts to events: costs little
        except OSError:
            pass
        monitor.pinner = ExecPinner(classify, memory=min(128, pin_capacity() // 4), sock=pin_socket)
        sender = Sender(to_identity, monitor.pinner)
    try:
        monitor.run(sender or to_identity.send, stop.is_set)
    finally:
        if sender is not None:
            sender.close()
        monitor.close()
        if monitor.pinner:
            monitor.pinner.close()
    to_identity.send(Stop("monitor"))
    return 0
