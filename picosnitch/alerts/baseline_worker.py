"""The baseline process: Connections in (it is a consumer of the identity worker, like the
writer), alerts out to the record keeper.

It keeps baseline.json (alerts.baseline) in the data directory, written atomically a few seconds
after what it learned changed, at once after an alert (so a restart does not raise it again),
and at least every SAVE_TRAFFIC_EVERY seconds for the byte counts. It applies what `picosnitch
baseline` appends to baseline-requests (mark learned, mute, unmute, forget), reading on from
where it stopped, so a request made while the daemon is down is applied when it starts. For the
metrics it sends the keeper the totals of every program every TRAFFIC_EVERY seconds (Traffic).
"""

from __future__ import annotations

import json
import os
import time
from typing import Callable, Optional

from picosnitch import channels
from picosnitch.alerts.baseline import Baseline, Coalescer, Settings, program_key
from picosnitch.alerts.geoip import CountryReader
from picosnitch.alerts.listeners import ServedPorts
from picosnitch.alerts.public_suffix import PublicSuffixError, PublicSuffixList
from picosnitch.alerts.record_keeper import move_aside, write_atomically
from picosnitch.messages import NEW_COUNTRY, NEW_DOMAIN, ErrorReport, Stop, Traffic
from picosnitch.sanitize import printable

SAVE_EVERY = 5.0  # seconds after a change of what was learned
SAVE_TRAFFIC_EVERY = 60.0
REQUESTS_EVERY = 1.0
TRAFFIC_EVERY = 2.0
COUNTRIES_CACHED = 100_000
KEY = "baseline"
FINISH_TIMEOUT = 5.0  # seconds at exit to hand the keeper the last alerts


class Countries:
    """Country codes of addresses, remembered."""

    def __init__(self, reader: CountryReader) -> None:
        self.reader = reader
        self.cache: dict[str, str] = {}

    def __call__(self, address: str) -> str:
        found = self.cache.get(address)
        if found is None:
            if len(self.cache) >= COUNTRIES_CACHED:
                self.cache.clear()
            found = self.cache[address] = self.reader.country(address)
        return found


class BaselineKeeper:
    """A Baseline with its file, its requests and its traffic totals."""

    def __init__(self, config, paths, report: Callable[[str, str], None]) -> None:
        self.paths, self.report = paths, report
        settings = Settings.from_config(config)
        registrable = self._public_suffixes(config, settings)
        countries = self._countries(config, settings)
        self.served = ServedPorts()
        self.baseline = Baseline(settings, registrable, countries or (lambda address: ""), self.served.serves)
        self.coalescer = Coalescer(config["Alert coalesce (seconds)"])
        self.totals: dict[tuple[str, str], list[int]] = {}
        self.totals_changed = False
        self.traffic_changed = False
        self.said_save = False
        self._load()

    def _public_suffixes(self, config, settings: Settings) -> Optional[Callable[[str], str]]:
        try:
            return PublicSuffixList.load(config["Public suffix list"]).registrable
        except PublicSuffixError as error:
            if NEW_DOMAIN in settings.kinds:
                self.report(f"new domains are not alerted on: the public suffix list {error} "
                            "(install the package publicsuffix, or set \"Public suffix list\")", KEY)
            return None

    def _countries(self, config, settings: Settings) -> Optional[Countries]:
        path = config["GeoIP database"] if config["GeoIP lookup"] else ""
        if not path:
            return None
        reader = CountryReader(path)
        if reader.problem and NEW_COUNTRY in settings.kinds:
            self.report(f"new countries are not alerted on: {reader.problem}", KEY)
        return Countries(reader) if reader.on else None

    def _load(self) -> None:
        try:
            raw = self.paths.baseline.read_bytes()
        except FileNotFoundError:
            return
        except OSError as error:
            self.report(f"cannot read {self.paths.baseline} ({error.strerror}); learning starts afresh", KEY)
            return
        try:
            self.baseline.load(raw)
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            aside = move_aside(self.paths.baseline)
            self.report(f"{self.paths.baseline} could not be read ({printable(str(error), 200)}); moved it to "
                        f"{aside} and started learning afresh", KEY)

    def observe(self, connections, now: float) -> list:
        """Learn from a batch; the alerts to raise now."""
        self.served.new_batch()
        findings = []
        for connection in connections:
            findings += self.baseline.observe(connection, now)
            key = program_key(connection.identity.process)
            if key is not None:
                total = self.totals.setdefault(key, [0, 0, 0])
                total[0] += connection.send
                total[1] += connection.recv
                total[2] += 1
                self.totals_changed = self.traffic_changed = True
        if self.served.problem:
            self.report(self.served.problem, KEY + ": listeners")
            self.served.problem = ""
        return self.coalescer.add(findings, now)

    def read_requests(self, now: float) -> None:
        """Apply the requests appended since the last read."""
        path = self.paths.baseline_requests
        try:
            size = os.stat(path).st_size
        except FileNotFoundError:
            return
        if size < self.baseline.requests_read:  # replaced by a shorter file
            self.baseline.requests_read = 0
        if size == self.baseline.requests_read:
            return
        with open(path, "rb") as file:
            file.seek(self.baseline.requests_read)
            data = file.read(size - self.baseline.requests_read)
        complete = data[:data.rfind(b"\n") + 1]
        for line in complete.splitlines():
            try:
                request = json.loads(line)
                problem = self.baseline.apply(request, now) if isinstance(request, dict) else "not an object"
            except ValueError:
                problem = "picosnitch baseline: a request that is not JSON was skipped"
            if problem:
                self.report(printable(problem, 300), KEY + ": request")
        self.baseline.requests_read += len(complete)
        self.baseline.changed = True

    def save(self) -> bool:
        """Write baseline.json; False (said once) when it cannot be written now."""
        try:
            write_atomically(self.paths.baseline, self.baseline.to_json())
        except OSError as error:
            if not self.said_save:
                self.report(f"cannot save {self.paths.baseline} ({error.strerror or error}); what was learned "
                            "is kept in memory and saved when it can be", KEY + ": save")
                self.said_save = True
            return False
        self.said_save = False
        self.baseline.changed = self.traffic_changed = False
        return True

    def traffic(self) -> Traffic:
        self.totals_changed = False
        learning = sum(1 for p in self.baseline.programs.values() if p.learned is None)
        muted = sum(1 for p in self.baseline.programs.values() if self.baseline.is_muted(p))
        return Traffic({key: tuple(values) for key, values in self.totals.items()},
                       {"learning": learning, "learned": len(self.baseline.programs) - learning, "muted": muted})


def run(config, paths, inbox, to_keeper) -> int:
    """Learns from every batch of Connections until Stop; alerts and reports go to the keeper."""
    channels.ends_on_stop()  # ends on Stop, after saving
    keeper = BaselineKeeper(config, paths, lambda message, key: to_keeper.send(ErrorReport(message, key)))
    metrics_on = bool(config["Metrics address"] or config["Metrics textfile"])
    now = time.monotonic()
    next_save, next_traffic_save, next_requests, next_totals = now + SAVE_EVERY, now + SAVE_TRAFFIC_EVERY, now, now
    try:
        while True:
            # A save is due only when there is something to save: a deadline passed with nothing
            # to save would make every wait return at once (the worker spun in a quiet minute).
            deadlines = [next_requests] + [when for when, due in ((next_save, keeper.baseline.changed),
                                                                  (next_traffic_save, keeper.traffic_changed)) if due]
            coalesced = keeper.coalescer.next_deadline()  # wall-clock time, as the alerts' times
            if coalesced is not None:
                deadlines.append(time.monotonic() + coalesced - time.time())
            if metrics_on:
                deadlines.append(next_totals)
            if channels.wait([inbox], max(min(deadlines) - time.monotonic(), 0), [to_keeper]):
                message = inbox.recv()
                if isinstance(message, Stop):
                    for alert in keeper.coalescer.flush(time.time()):
                        to_keeper.send(alert)
                    return 0
                alerts = keeper.observe(message, time.time())
                for alert in alerts:
                    to_keeper.send(alert)
                if alerts:
                    keeper.save()
            now = time.monotonic()
            for alert in keeper.coalescer.due(time.time()):
                to_keeper.send(alert)
            if now >= next_requests:
                next_requests = now + REQUESTS_EVERY
                keeper.read_requests(time.time())
            if (keeper.baseline.changed and now >= next_save) or (keeper.traffic_changed and now >= next_traffic_save):
                keeper.save()
                next_save, next_traffic_save = now + SAVE_EVERY, now + SAVE_TRAFFIC_EVERY
            if metrics_on and now >= next_totals:
                next_totals = now + TRAFFIC_EVERY
                if keeper.totals_changed:
                    to_keeper.send(keeper.traffic())
    finally:
        keeper.save()
        keeper.served.close()
        to_keeper.send(Stop("baseline"))
        to_keeper.finish(FINISH_TIMEOUT)
