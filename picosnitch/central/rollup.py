"""The central server's hourly rollup, kept by the remote SQL writer: what it adds to a batch.

The sender thread (central.worker.Sender) sums, per hour and pair (host, machine, identity,
endpoint), the rows the server has committed: a batch's rows count once its transaction
commits (or is found committed before). When a batch arrives whose `closes` says the worker had
every row of the hours before that time, the open hours before it are closed: their sums go to
`<table>_hourly`, and a row (machine_id, hour) to `<table>_hours`, inside that batch's
transaction, so a reader sees both or neither. A row that still arrives for a closed hour (a
list held up for longer than the worker waits) brings its own rollup rows and mark in its
batch. Hence, for every (machine, hour) in `<table>_hours`, `<table>_hourly` sums exactly the
machine's rows of that hour in `<table>`: the invariant central.queries relies on.

That holds only if the sums cover every row the server has of the machine in that hour, rows
committed by earlier runs of the daemon included. A clean stop saves the sums with the backlog's
cursor (central.backlog), and the next start goes on from them. Otherwise (a crash, the first start)
the worker marks hours from `since` on only: after the hour it starts in, and after the last
hour any earlier run stored rows for (the horizon file, moved before rows of a later hour are
stored). The hours before stay unmarked: readers sum their raw rows. Marks are per machine id,
so this assumes one daemon per machine, as picosnitch runs.

Everything here is a function of the saved state and the batches in order, so a batch sent
again after a lost acknowledgement gives the same rollup rows, and a restart replays the
backlog to the same state.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from operator import itemgetter
from pathlib import Path
from typing import Optional

from picosnitch.central.backlog import replace_file
from picosnitch.central.writer import ROW_COLUMNS
from picosnitch.timestamps import local_time

HOUR = 3600
_FIGURES = tuple(ROW_COLUMNS.index(name)
                 for name in ("send", "recv", "packets_sent", "packets_recv"))
_CONTIME, _TS, _MACHINE = (ROW_COLUMNS.index(name) for name in ("contime", "ts", "machine_id"))
_PAIR = tuple(i for i in range(len(ROW_COLUMNS)) if i not in _FIGURES + (_CONTIME, _TS))
_pair_of, _figures_of = itemgetter(*_PAIR), itemgetter(*_FIGURES)


def hour_of(ts: int) -> int:
    return ts - ts % HOUR


@dataclass
class Plan:
    """What one batch adds: rollup rows and marks to insert with it, and the state after it."""

    adds: dict  # hour -> {pair: sums} of the batch's rows in open hours
    closing: list  # open hours that the batch closes
    closes: Optional[int]
    markable: bool  # the rollup rows of the closing hours go with the batch
    hourly: list = field(default_factory=list)  # rows for <table>_hourly (as make_row's)
    hours: list = field(default_factory=list)  # (machine_id, hour) for <table>_hours


def _add(sums: dict, pair: tuple, figures) -> None:
    found = sums.get(pair)
    if found is None:
        sums[pair] = list(figures)
    else:
        for k, value in enumerate(figures):
            found[k] += value


def _hourly_row(hour: int, pair: tuple, figures: list) -> list:
    row: list = [None] * len(ROW_COLUMNS)
    for index, value in zip(_PAIR, pair):
        row[index] = value
    for index, value in zip(_FIGURES, figures):
        row[index] = value
    row[_CONTIME], row[_TS] = local_time(hour), hour
    return row


class HourlyRollup:
    """The sums of the open hours, and which hours may still be marked complete.

    Hours before `since` are never marked; hours before `closed` are closed (marked if they had
    rows, unless in `unmarkable`: their rollup rows could not be stored); later ones are open.
    """

    def __init__(self, since: int, closed: Optional[int] = None, open_hours: Optional[dict] = None,
                 unmarkable=()):
        self.since = since
        self.closed = since if closed is None else closed
        self.open: dict = open_hours or {}  # hour -> {pair: [send, recv, packets_sent, ...]}
        self.unmarkable = set(unmarkable)

    @classmethod
    def fresh(cls, now: float, horizon: Optional[int]) -> "HourlyRollup":
        """A rollup that knows nothing of earlier runs: it marks hours after `now` and after
        `horizon` (the last hour earlier runs stored rows for) only."""
        since = hour_of(int(now)) + HOUR
        if horizon is not None:
            since = max(since, horizon + HOUR)
        return cls(since)

    def plan(self, rows: list, closes: Optional[int], markable: bool) -> Plan:
        """What to insert with a batch of `rows` (as make_row gives them) whose `closes` is
        given; `markable` says whether the server's rollup tables take rows."""
        adds: dict = {}
        late: dict = {}
        for row in rows:
            hour = hour_of(row[_TS])
            if hour < self.since:
                continue
            if hour >= self.closed:
                target = adds
            elif markable and hour not in self.unmarkable:
                target = late
            else:
                continue
            _add(target.setdefault(hour, {}), _pair_of(row), _figures_of(row))
        closing = sorted(h for h in set(self.open) | set(adds) if closes is not None and h < closes)
        plan = Plan(adds, closing, closes, markable)
        if markable:
            summed = dict(late)
            for hour in closing:
                summed[hour] = sums = {pair: list(f) for pair, f in self.open.get(hour, {}).items()}
                for pair, figures in adds.get(hour, {}).items():
                    _add(sums, pair, figures)
            for hour in sorted(summed):
                plan.hourly += [_hourly_row(hour, pair, f) for pair, f in summed[hour].items()]
                plan.hours += sorted({(pair[_PAIR.index(_MACHINE)], hour) for pair in summed[hour]})
        return plan

    def committed(self, plan: Plan) -> None:
        """The batch of `plan` is on the server (with plan.hourly and plan.hours)."""
        for hour, pairs in plan.adds.items():
            sums = self.open.setdefault(hour, {})
            for pair, figures in pairs.items():
                _add(sums, pair, figures)
        self._close(plan, marked=plan.markable)

    def rejected(self, plan: Plan) -> None:
        """The server refused the batch of `plan`: its rows and rollup rows are not stored.
        The hours it would have closed are closed unmarked (their rollup rows may be what
        the server refuses)."""
        self._close(plan, marked=False)

    def _close(self, plan: Plan, marked: bool) -> None:
        for hour in plan.closing:
            self.open.pop(hour, None)
            if not marked:
                self.unmarkable.add(hour)
        if plan.closes is not None:
            self.closed = max(self.closed, plan.closes)

    # -- saved with the backlog at a clean stop ----------------------------------------------------

    def state(self) -> dict:
        return {"since": self.since, "closed": self.closed, "unmarkable": sorted(self.unmarkable),
                "open": [[hour, [[*pair, *f] for pair, f in pairs.items()]]
                         for hour, pairs in self.open.items()]}

    @classmethod
    def from_state(cls, state) -> Optional["HourlyRollup"]:
        """The rollup a state() describes; None when there is none or it is not one."""
        try:
            open_hours = {}
            for hour, pairs in state["open"]:
                open_hours[int(hour)] = {tuple(p[:len(_PAIR)]): [int(v) for v in p[len(_PAIR):]]
                                         for p in pairs}
                if any(len(f) != len(_FIGURES) for f in open_hours[int(hour)].values()):
                    return None
            return cls(int(state["since"]), int(state["closed"]), open_hours,
                       (int(h) for h in state["unmarkable"]))
        except (KeyError, TypeError, ValueError):
            return None


class Horizon:
    """The last hour any run of the worker stored rows for, in a file of the backlog
    directory: a run that starts without a saved state marks no hour up to it."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.hour: Optional[int] = int(path.read_text())
        except (OSError, ValueError):
            self.hour = None

    def reach(self, ts: int) -> None:
        """Rows up to `ts` are about to be stored: durably move the horizon there first."""
        hour = hour_of(ts)
        if self.hour is not None and hour <= self.hour:
            return
        replace_file(self.path, str(hour), durably=True)
        self.hour = hour
