"""The identity process: kernel records in, Connections out to the writer, news to the keeper."""

import signal
import time
from itertools import islice
from multiprocessing.connection import wait
from multiprocessing.reduction import ForkingPickler

from picosnitch import heap
from picosnitch.identity.fanotify import ExecutableWatcher, FanotifyUnavailable
from picosnitch.identity.pin_store import PinStore
from picosnitch.identity.resolver import IdentityResolver
from picosnitch.kernel import pins
from picosnitch.kernel.pins import pin_capacity
from picosnitch.messages import ErrorReport, Stop

EXPIRE_EVERY = 30.0
CHUNK = 5_000  # Connections per message: a storm's batch is sent, and unpickled, in parts


def window_start(now: float, limit: int) -> int:
    """The write window a moment falls in: windows are `limit` seconds, aligned to the epoch."""
    return int(now // limit * limit)


def resolve(resolver: IdentityResolver, batch: list, ts: int, consumers) -> None:
    """Turns one batch of kernel records into Connections and sends them to every consumer,
    CHUNK at a time, each part pickled once for all of them."""
    resolver.new_batch()
    connections = (c for record in batch for c in resolver.handle(record, ts))
    while part := list(islice(connections, CHUNK)):
        message = ForkingPickler.dumps(part)
        for consumer in consumers:
            consumer.send_bytes(message)


def run(config, from_monitor, consumers, to_keeper, to_guard=None, pin_socket=None) -> int:
    """Sends every batch's Connections to each of `consumers` (writer, live feed, SQL server),
    and the batch's getaddrinfo answers to `to_guard` (guard mode's domains), if given.
    `pin_socket` brings the files the monitor pinned at exec (kernel.pins)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # ends on Stop from the monitor, after draining
    watcher = None
    try:
        watcher = ExecutableWatcher()
    except FanotifyUnavailable as e:
        to_keeper.send(ErrorReport(f"changes to executables will not be noticed: {e}"))
    resolver = IdentityResolver(config, to_keeper.send, watcher.watch if watcher else None)
    resolver.table.scan()
    if pin_socket is not None:
        resolver.pins = PinStore(pin_capacity(), resolver.hash_before_closing)
    limit = config["DB write limit (seconds)"]
    next_expiry = time.monotonic() + EXPIRE_EVERY
    sources = [from_monitor] + ([watcher] if watcher else []) + ([pin_socket] if pin_socket else [])
    try:
        while True:
            for source in wait(sources, timeout=EXPIRE_EVERY):
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
                    for consumer in consumers + ([to_guard] if to_guard else []):
                        consumer.send(Stop("identity"))
                    to_keeper.send(Stop("identity"))
                    return 0
                if to_guard is not None:
                    answers = [r for r in batch if getattr(r, "kind", None) == "dns"]
                    if answers:
                        to_guard.send(answers)
                resolve(resolver, batch, window_start(time.time(), limit), consumers)
                del batch  # a storm's batch is large: not kept until the next one arrives
            if time.monotonic() >= next_expiry:
                next_expiry = time.monotonic() + EXPIRE_EVERY
                resolver.expire()
                heap.trim()  # what a burst of batches left free in the heap
    finally:
        if watcher:
            watcher.close()
        if resolver.pins is not None:
            resolver.pins.close()
