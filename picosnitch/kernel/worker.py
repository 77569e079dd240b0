"""The privileged monitor process: runs the kernel monitor and passes its records on in batches."""

import signal
import threading

from picosnitch import parent_death
from picosnitch.kernel.libbpf import LibbpfError
from picosnitch.kernel.monitor import KernelMonitor, MonitorError
from picosnitch.kernel.pins import ExecPinner, pin_capacity
from picosnitch.messages import ErrorReport, Stop

EXIT_FATAL = 3  # the monitor cannot run here: the supervisor must not restart it


def run(config, to_identity, ready, supervisor_pid: int, pin_socket=None, classify=None) -> int:
    """Loads the BPF programs, sets `ready`, and sends record batches until SIGTERM (also sent
    when the supervisor dies). With `pin_socket`, what each exec ran is pinned (kernel.pins, with
    the daemon's `classify` naming scripts and programs) and its descriptors are sent there,
    each batch's before the batch."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent_death.signal_when_parent_dies(supervisor_pid, signal.SIGTERM)
    monitor = KernelMonitor(ring_pages=config["Perf ring buffer (pages)"],
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
    deliver = to_identity.send
    if pin_socket is not None:
        monitor.pinner = pinner = ExecPinner(classify, memory=min(128, pin_capacity() // 4))

        def deliver(batch) -> None:
            pinner.send(pin_socket)
            to_identity.send(batch)
    try:
        monitor.run(deliver, stop.is_set)
    finally:
        monitor.close()
        if monitor.pinner:
            monitor.pinner.close()
    to_identity.send(Stop("monitor"))
    return 0
