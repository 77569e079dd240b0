"""Prometheus metrics: what the daemon counted, in the text exposition format (version 0.0.4)
that Prometheus scrapes and node_exporter's textfile collector reads.

    picosnitch_bytes_total{exe,script,direction}     bytes each program sent / received
    picosnitch_connections_total{exe,script}         its connections (rows of the connections view)
    picosnitch_kernel_lost_total{what}               what the kernel dropped, by counter
    picosnitch_hook_degraded{hook}                   1 for each hook left out
    picosnitch_alerts_total{kind}                    alerts raised
    picosnitch_events_total{kind}                    events of the stream
    picosnitch_errors_total                          lines for error.log (repeats included)
    picosnitch_worker_restarts_total{worker}         workers restarted after a crash
    picosnitch_baseline_programs{state}              programs learning, learned, muted
    picosnitch_outbox_events{receiver}               events waiting for a receiver (queue depth)
    picosnitch_delivered_events_total{receiver}      events a receiver took
    picosnitch_delivery_failures_total{receiver}     failed tries
    picosnitch_dropped_events_total{receiver}        events dropped because the queue was full
    picosnitch_receiver_up{receiver}                 1 when the last try succeeded
    picosnitch_sql_backlog_bytes                     rows waiting for the "DB sql server"
    picosnitch_start_time_seconds, picosnitch_info{version}

Counters count from the daemon's start (Prometheus handles the reset a restart is). Label values
are printable (\\xNN escapes for control characters and undecodable bytes) and escaped as the
format says.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Iterable

from picosnitch import __version__
from picosnitch.sanitize import printable

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def label_value(value: object) -> str:
    text = printable(str(value))
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _sample(name: str, labels: dict, value: float) -> str:
    inside = ",".join(f'{key}="{label_value(v)}"' for key, v in labels.items())
    number = repr(float(value)) if isinstance(value, float) and not float(value).is_integer() else str(int(value))
    return f"{name}{{{inside}}} {number}" if inside else f"{name} {number}"


class Metrics:
    """Everything the exposition shows, updated from the worker's messages."""

    def __init__(self, started: float | None = None) -> None:
        self.started = time.time() if started is None else started
        self.traffic: dict[tuple[str, str], list[int]] = {}  # (exe, script) -> [sent, received, connections]
        self.lost: Counter[str] = Counter()
        self.degraded: set[str] = set()
        self.alerts: Counter[str] = Counter()
        self.events: Counter[str] = Counter()
        self.errors = 0
        self.restarts: Counter[str] = Counter()
        self.baseline: dict[str, int] = {}
        self.receivers: dict[str, dict] = {}  # name -> waiting, delivered, failed, dropped, up
        self.sql_backlog = 0

    def families(self) -> Iterable[tuple[str, str, str, list[tuple[dict, float]]]]:
        """(name, type, help, [(labels, value)]) of each metric."""
        yield ("picosnitch_info", "gauge", "picosnitch's version.", [({"version": __version__}, 1)])
        yield ("picosnitch_start_time_seconds", "gauge", "When the daemon started (unix time).",
               [({}, self.started)])
        yield ("picosnitch_bytes_total", "counter", "Bytes each program sent and received since the daemon started.",
               [({"exe": exe, "script": script, "direction": direction}, totals[index])
                for (exe, script), totals in sorted(self.traffic.items())
                for index, direction in ((0, "sent"), (1, "received"))])
        yield ("picosnitch_connections_total", "counter",
               "Connections of each program (rows of the connections view: endpoint and write window).",
               [({"exe": exe, "script": script}, totals[2]) for (exe, script), totals in sorted(self.traffic.items())])
        yield ("picosnitch_kernel_lost_total", "counter", "What the kernel dropped, by counter.",
               [({"what": what}, count) for what, count in sorted(self.lost.items())])
        yield ("picosnitch_hook_degraded", "gauge", "1 for each kernel hook that could not be used.",
               [({"hook": hook}, 1) for hook in sorted(self.degraded)])
        yield ("picosnitch_alerts_total", "counter", "Alerts raised, by kind.",
               [({"kind": kind}, count) for kind, count in sorted(self.alerts.items())])
        yield ("picosnitch_events_total", "counter", "Events of the event stream, by kind.",
               [({"kind": kind}, count) for kind, count in sorted(self.events.items())])
        yield ("picosnitch_errors_total", "counter", "Problems reported to error.log (repeats included).",
               [({}, self.errors)])
        yield ("picosnitch_worker_restarts_total", "counter", "Workers restarted after they stopped unexpectedly.",
               [({"worker": worker}, count) for worker, count in sorted(self.restarts.items())])
        yield ("picosnitch_baseline_programs", "gauge", "Programs in the baseline, by state.",
               [({"state": state}, count) for state, count in sorted(self.baseline.items())])
        for name, field, kind, words in (
                ("picosnitch_outbox_events", "waiting", "gauge", "Events waiting for a receiver (queue depth)."),
                ("picosnitch_delivered_events_total", "delivered", "counter", "Events a receiver accepted."),
                ("picosnitch_delivery_failures_total", "failed", "counter", "Failed tries to deliver an event."),
                ("picosnitch_dropped_events_total", "dropped", "counter",
                 "Events dropped for a receiver because the queue was full."),
                ("picosnitch_receiver_up", "up", "gauge", "1 when the last try to deliver to a receiver succeeded.")):
            yield (name, kind, words, [({"receiver": receiver}, int(stats.get(field, 0)))
                                       for receiver, stats in sorted(self.receivers.items())])
        yield ("picosnitch_sql_backlog_bytes", "gauge", 'Bytes of rows waiting for the "DB sql server".',
               [({}, self.sql_backlog)])

    def render(self) -> str:
        """The text exposition."""
        lines = []
        for name, kind, words, samples in self.families():
            lines += [f"# HELP {name} {words}", f"# TYPE {name} {kind}"]
            lines += [_sample(name, labels, value) for labels, value in samples]
        return "\n".join(lines) + "\n"

