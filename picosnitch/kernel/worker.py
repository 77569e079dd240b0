"""The privileged monitor process: runs the kernel monitor and passes its records on in batches.

It never waits for the identity worker (channels): the kernel's ring buffer and maps are read on
time whatever happens downstream, and so what each exec ran is pinned (kernel.pins) while the
identity worker is slow to read, instead of short-lived processes exiting unpinned. Records the
identity worker does not take in time, beyond the channel's bound, are dropped and said exactly
in the next batch it takes.

A monitor restarted after a crash or a kill takes over the maps and attached programs of the one
before it (handover), so what the kernel counted meanwhile is not lost; what that one had read
from the kernel and not yet handed on is said, exactly, at the head of the first batch.
"""

import os
import signal
import threading
from typing import List, Optional

from picosnitch import channels, parent_death
from picosnitch.kernel import handover
from picosnitch.kernel.handover import Held
from picosnitch.kernel.libbpf import LibbpfError
from picosnitch.kernel.monitor import KernelMonitor, MonitorError
from picosnitch.kernel.pins import ExecPinner, pin_capacity
from picosnitch.messages import ErrorReport, Stop, WorkerEnded
from picosnitch.sanitize import printable

EXIT_FATAL = 3  # the monitor cannot run here: the supervisor must not restart it
EXIT_NOT_TAKEN_OVER = 4  # what the last monitor left cannot be taken over: start afresh
FINISH_TIMEOUT = 20.0  # seconds to hand over what is still queued at exit
PIN_NICE = -10  # pins race the processes they pin: a busy machine must not keep the monitor waiting


def run(config, to_identity, ready, supervisor_pid: int, to_supervisor, keeper=None, left=None,
        shared_block=None, pin_socket=None, classify=None) -> int:
    """Loads the BPF programs, or takes over those `left` by the monitor before (descriptors the
    supervisor kept, see handover), sets `ready`, and sends record batches until SIGTERM (also
    sent when the supervisor dies). `keeper`: the socket that hands the supervisor descriptors
    to keep. With `pin_socket`, what each exec ran is pinned (kernel.pins, with the daemon's
    `classify` naming scripts and programs) and its descriptors are sent there, each batch's
    before the batch. When the programs cannot be loaded at all, the supervisor is told why
    (WorkerEnded) and the daemon stops."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent_death.signal_when_parent_dies(supervisor_pid, signal.SIGTERM)
    shared = handover.Shared.from_buffer(shared_block) if shared_block is not None else None
    delivery = Delivery(to_identity, shared)
    monitor = KernelMonitor(names_from_traffic=config["Names from traffic"],
                            ring_pages=config["Perf ring buffer (pages)"],
                            flow_entries=config["Flow map entries"],
                            hand_over=(lambda named: handover.send(keeper, named)) if keeper else None,
                            adopt=dict(left) if left else None, shared=shared)
    monitor.taken = delivery.taken
    monitor.hand_on = delivery.hand_on
    monitor.hand_on_fd = to_identity.fileno()
    try:
        degraded = monitor.start()
    except (MonitorError, LibbpfError, OSError) as e:
        if left:
            to_supervisor.send(WorkerEnded("monitor", "the kernel monitor could not take over what the one before "
                                           f"it left: {printable(str(e), 1000)}"))
            to_supervisor.finish(FINISH_TIMEOUT)
            return EXIT_NOT_TAKEN_OVER
        to_supervisor.send(WorkerEnded("monitor", f"the kernel monitor cannot start: {printable(str(e), 1000)}",
                                       fatal=True))
        to_supervisor.finish(FINISH_TIMEOUT)
        return EXIT_FATAL
    if degraded:
        to_identity.send(degraded)
    ready.set()
    if pin_socket is not None:
        try:
            os.setpriority(os.PRIO_PROCESS, 0, PIN_NICE)  # it only ever reacts to events: costs little
        except OSError:
            pass
        monitor.pinner = ExecPinner(classify, memory=min(128, pin_capacity() // 4), sock=pin_socket)
        delivery.pinner = monitor.pinner
    try:
        monitor.run(delivery, stop.is_set)
    finally:
        monitor.close()
        if monitor.pinner:
            monitor.pinner.close()
    to_identity.send(Stop("monitor"))
    to_identity.finish(FINISH_TIMEOUT)
    return 0


class Delivery:
    """Sends the monitor's batches to the identity worker without waiting; what the channel had
    to drop is said (ErrorReport, passed on to error.log) at the head of the next batch it takes.

    With `shared`, what the monitor has read from the kernel and not yet handed to the identity
    worker's socket is kept there, so that a monitor killed meanwhile is followed by one that
    says so; what the last one left there is said at the head of the first batch."""

    def __init__(self, to_identity: channels.Channel, shared: Optional[handover.Shared] = None):
        self.to_identity, self.shared = to_identity, shared
        self.pinner: Optional[ExecPinner] = None  # its descriptors go to their socket before each batch
        self.lost = Held()
        self.left = Held.kept_in(shared) if shared else Held()  # what the last monitor held when it ended
        if shared:
            Held().keep_in(shared)

    def taken(self, records) -> None:
        """Records read from the kernel: held by this process until the socket has them."""
        if self.shared:
            held = Held.kept_in(self.shared)
            held.add(Held.of(records))
            held.keep_in(self.shared)

    def __call__(self, batch: List) -> None:
        if self.pinner is not None:
            self.pinner.flush()
        for held in self.to_identity.take_dropped():
            self.lost.add(held)
        if self.left:
            batch = [ErrorReport(f"the kernel monitor stopped while it held {self.left.sentence()} it had read "
                                 "from the kernel; they are lost"), *batch]
            self.left = Held()
        if self.lost and not self.to_identity.queued:
            batch = [ErrorReport(f"{self.lost.sentence()} were dropped: the identity worker did not read them in "
                                 "time"), *batch]
            self.lost = Held()
        if batch:
            channels.send_parts([self.to_identity], batch, Held.of)
        self._note_held()

    def hand_on(self) -> bool:
        """Sends what the identity worker could not take yet; True once nothing waits."""
        if not self.to_identity.queued:
            return True
        done = self.to_identity.flush()
        self._note_held()
        return done

    def _note_held(self) -> None:
        """What waits in the outbox, in `shared`: a monitor killed now leaves it unsaid otherwise."""
        if self.shared:
            held = Held()
            for queued in self.to_identity.queued_tallies():
                held.add(queued)
            held.keep_in(self.shared)
