"""The identity process: kernel records in, Connections out to the writer, news to the keeper.

It never waits for the workers it feeds (channels): a stalled writer does not keep it from
reading the monitor, so the kernel's ring buffer keeps draining and processes are still named
while they live. What a consumer does not read in time, beyond its channel's bound, is dropped
and reported exactly (rows, bytes, windows). Traffic is stamped with the write window it was
drained in, not the moment it was resolved, so late rows still land in their own window.
"""

import time
from typing import Dict, List, Optional

from picosnitch import channels, heap
from picosnitch.connection import Tally
from picosnitch.identity.fanotify import ExecutableWatcher, FanotifyUnavailable
from picosnitch.identity.pin_store import PinStore
from picosnitch.identity.resolver import IdentityResolver
from picosnitch.kernel import pins
from picosnitch.kernel.handover import Held, Shared
from picosnitch.kernel.pins import pin_capacity
from picosnitch.messages import ErrorReport, Observed, Resend, Stop

EXPIRE_EVERY = 30.0
REPORT_LOSSES_EVERY = 60.0  # while a consumer keeps dropping, its losses are told this often
FINISH_TIMEOUT = 20.0
# What each consumer is, for the sentence saying what it lost.
CONSUMER_NAMES = {"writer": "the writer (snitch.db, conn.log)", "live": "the live feed of picosnitch top",
                  "sql": "the SQL server's writer"}


def window_start(now: float, limit: int) -> int:
    """The write window a moment falls in: windows are `limit` seconds, aligned to the epoch."""
    return int(now // limit * limit)


def resolve(resolver: IdentityResolver, batch: list, limit: int, consumers: Dict[str, channels.Channel]) -> None:
    """Turns one batch of kernel records into Connections and sends them to every consumer,
    each message pickled once for all of them and tallied, in case it must be dropped."""
    resolver.new_batch()
    now = time.time()
    connections = [c for record in batch
                   for c in resolver.handle(record, window_start(getattr(record, "time", 0) or now, limit))]
    if connections:
        channels.send_parts(consumers.values(), connections, Tally.of)


class Losses:
    """What the consumers dropped, told to the keeper once a consumer has caught up again, or
    every REPORT_LOSSES_EVERY seconds while it still drops."""

    def __init__(self, consumers: Dict[str, channels.Channel], report):
        self.consumers, self.report = consumers, report
        self.lost = {name: Tally() for name in consumers}
        self.since = {name: 0.0 for name in consumers}

    def check(self) -> None:
        for name, consumer in self.consumers.items():
            dropped = consumer.take_dropped()
            if dropped and not self.lost[name]:
                self.since[name] = time.monotonic()
            for tally in dropped:
                self.lost[name].add(tally)
            caught_up = not consumer.queued or time.monotonic() - self.since[name] >= REPORT_LOSSES_EVERY
            if self.lost[name] and caught_up:
                self.report(ErrorReport(f"{self.lost[name].sentence()} could not be passed to "
                                        f"{CONSUMER_NAMES.get(name, name)}: it did not read them in time; "
                                        "they are lost"))
                self.lost[name] = Tally()


class Reports:
    """Messages for the keeper. An Observed the channel had to drop (the keeper not reading)
    is sent again once the channel is empty: every executable reaches record.json."""

    def __init__(self, to_keeper: channels.Channel):
        self.to_keeper = to_keeper
        self.retry: List[Observed] = []
        self.dropped_reports = 0

    def send(self, message) -> None:
        self.to_keeper.send(message, message if isinstance(message, Observed) else 1)

    def check(self) -> None:
        for tally in self.to_keeper.take_dropped():
            if isinstance(tally, Observed):
                self.retry.append(tally)
            else:
                self.dropped_reports += tally
        if self.to_keeper.queued:
            return
        retry, self.retry = self.retry, []
        for observed in retry:
            self.send(observed)
        if self.dropped_reports:
            count, self.dropped_reports = self.dropped_reports, 0
            self.send(ErrorReport(f"{count} error report{'' if count == 1 else 's'} of the identity worker "
                                  "were lost: the record keeper did not read them in time"))


class InHand:
    """What this worker has taken from the monitor and not yet handed to the writer's socket,
    kept in memory shared with the supervisor (handover.Shared), so that a restarted identity
    worker says exactly what the one before it lost."""

    def __init__(self, shared_block, writer: Optional[channels.Channel], report):
        self.shared = Shared.from_buffer(shared_block) if shared_block is not None else None
        self.writer = writer
        left = Held.kept_in(self.shared) if self.shared else Held()
        if left:
            report(ErrorReport(f"the identity worker stopped while it held {left.sentence()}; they are lost"))
        self.keep([])

    def keep(self, batch: list) -> None:
        """Notes a batch just taken (empty: nothing but what waits for the writer)."""
        if self.shared is None:
            return
        held = Held.of(batch)
        for tally in self.writer.queued_tallies() if self.writer else ():
            held.add(Held(tally.rows, tally.traffic, 0, tally.first, tally.last))
        held.keep_in(self.shared)


def run(config, from_monitor, consumers: Dict[str, channels.Channel], to_keeper, to_guard=None,
        shared_block=None, pin_socket=None) -> int:
    """Sends every batch's Connections to each of `consumers` (writer, live feed, SQL server),
    and the batch's getaddrinfo answers to `to_guard` (guard mode's domains), if given.
    `pin_socket` brings the files the monitor pinned at exec (kernel.pins)."""
    channels.ends_on_stop()  # ends on Stop from the monitor, after draining
    reports = Reports(to_keeper)
    losses = Losses(consumers, reports.send)
    in_hand = InHand(shared_block, consumers.get("writer"), reports.send)
    watcher = None
    try:
        watcher = ExecutableWatcher()
    except FanotifyUnavailable as e:
        reports.send(ErrorReport(f"changes to executables will not be noticed: {e}"))
    resolver = IdentityResolver(config, reports.send, watcher.watch if watcher else None)
    resolver.table.scan()
    if pin_socket is not None:
        resolver.pins = PinStore(pin_capacity(), resolver.hash_before_closing)
    limit = config["DB write limit (seconds)"]
    next_expiry = time.monotonic() + EXPIRE_EVERY
    sources = [from_monitor] + ([watcher] if watcher else []) + ([pin_socket] if pin_socket else [])
    senders = [*consumers.values(), to_keeper] + ([to_guard] if to_guard is not None else [])
    try:
        while True:
            waiting = any(sender.queued for sender in senders)
            for source in channels.wait(sources, 1.0 if waiting else EXPIRE_EVERY, senders):
                if watcher is not None and source is watcher:
                    for path in watcher.read_changes():
                        resolver.rehash(path)
                    continue
                if resolver.pins is not None:  # sent before the batch that names them
                    resolver.pins.add(pins.receive(pin_socket))
                if source is pin_socket:
                    continue
                batch = from_monitor.recv()
                if isinstance(batch, Stop):
                    _finish(consumers, reports, losses, to_guard)
                    return 0
                if isinstance(batch, Resend):
                    resolver.resend_observed()
                    continue
                if to_guard is not None:
                    answers = [r for r in batch if getattr(r, "kind", None) == "dns"]
                    if answers:
                        to_guard.send(answers)
                in_hand.keep(batch)
                resolve(resolver, batch, limit, consumers)
                in_hand.keep([])
                del batch  # a storm's batch is large: not kept until the next one arrives
            losses.check()
            reports.check()
            if time.monotonic() >= next_expiry:
                next_expiry = time.monotonic() + EXPIRE_EVERY
                resolver.expire()
                heap.trim()  # what a burst of batches left free in the heap
    finally:
        if watcher:
            watcher.close()
        if resolver.pins is not None:
            resolver.pins.close()


def _finish(consumers: Dict[str, channels.Channel], reports: Reports, losses: Losses, to_guard) -> None:
    """Stop: everything queued goes out first, then Stop to each consumer, the guard and the keeper."""
    receivers = [*consumers.values()] + ([to_guard] if to_guard is not None else [])
    for receiver in receivers:
        receiver.send(Stop("identity"))
    for receiver in receivers:
        receiver.finish(FINISH_TIMEOUT)
    losses.check()
    reports.check()
    reports.send(Stop("identity"))
    reports.to_keeper.finish(FINISH_TIMEOUT)
