"""What the UIs show next to values: the country of a remote address (GeoIP) and the
VirusTotal status of a hash (from record.json); and the latest alerts (record.json's "Alerts").
view and dash both use it."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Optional

from picosnitch.alerts.geoip import CountryReader
from picosnitch.alerts.record_keeper import ALERTS, SHA256_BY_EXE
from picosnitch.paths import Paths


class Annotations:
    """GeoIP countries (optional maxminddb + a configured mmdb) and VirusTotal statuses.

    A configured GeoIP database that cannot be used turns GeoIP off and leaves one sentence in
    `problem` for the UI to show; nothing here raises over it.
    """

    def __init__(self, geoip_path: str = "", vt_status: Optional[dict] = None, record_path=None):
        self.vt_status = vt_status or {}
        self._countries = CountryReader(geoip_path)
        self.record_path = record_path

    @property
    def problem(self) -> str:
        return self._countries.problem

    @property
    def geoip(self) -> bool:
        """Whether countries are looked up."""
        return self._countries.on

    @classmethod
    def load(cls, paths: Paths, cfg: Mapping) -> "Annotations":
        """From the settings `cfg` (config.json's, as the CLI read it) and record.json (nothing
        if unreadable)."""
        geoip = cfg["GeoIP database"] if cfg["GeoIP lookup"] else ""
        statuses = {}
        try:
            record = json.loads(paths.record.read_bytes())
            for hashes in record.get(SHA256_BY_EXE, {}).values():
                statuses.update(hashes)
        except (OSError, ValueError, AttributeError):
            pass
        return cls(geoip, statuses, paths.record)

    def alerts(self) -> list[dict]:
        """The alerts record.json keeps, newest first, read now ([] when it cannot be read)."""
        if self.record_path is None:
            return []
        try:
            kept = json.loads(self.record_path.read_bytes()).get(ALERTS, [])
        except (OSError, ValueError, AttributeError):
            return []
        return [a for a in reversed(kept) if isinstance(a, dict)] if isinstance(kept, list) else []

    def country(self, address: str) -> str:
        """The ISO code of `address`'s country ("" when unknown or GeoIP is off)."""
        return self._countries.country(address)

    def note(self, column: str, value: object) -> str:
        """Text shown after `value` in tab `column` ("" for none)."""
        if column == "raddr" and isinstance(value, str):
            country = self.country(value)
            return f" [{country}]" if country else ""
        if column.endswith("sha256") and value in self.vt_status:
            return f"[VT: {self.vt_status[value]}]"
        return ""
