"""What the UIs show next to values: the country of a remote address (GeoIP) and the
VirusTotal status of a hash (from record.json). view and dash both use it."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Optional

from picosnitch.alerts.record_keeper import SHA256_BY_EXE
from picosnitch.installed import install_extra
from picosnitch.paths import Paths
from picosnitch.sanitize import printable


class Annotations:
    """GeoIP countries (optional maxminddb + a configured mmdb) and VirusTotal statuses.

    A configured GeoIP database that cannot be used turns GeoIP off and leaves one sentence in
    `problem` for the UI to show; nothing here raises over it.
    """

    def __init__(self, geoip_path: str = "", vt_status: Optional[dict] = None):
        self.vt_status = vt_status or {}
        self.problem = ""
        self._reader: Any = None
        self._geoip_path = geoip_path
        if geoip_path:
            self._open_geoip()

    def _open_geoip(self) -> None:
        shown = printable(self._geoip_path)
        try:
            import maxminddb  # optional extra [geoip]
        except ImportError:
            self.problem = (f"GeoIP off: reading {shown} needs the Python package maxminddb "
                            f"(install it with: {install_extra('geoip')})")
            return
        try:
            self._reader = maxminddb.open_database(self._geoip_path)
        except OSError as exc:
            self.problem = f"GeoIP off: cannot read {shown}: {exc.strerror or exc}"
        except (maxminddb.InvalidDatabaseError, ValueError):  # ValueError: an empty file
            self.problem = f"GeoIP off: {shown} is not a MaxMind DB (.mmdb) file"

    @property
    def geoip(self) -> bool:
        """Whether countries are looked up."""
        return self._reader is not None

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
        return cls(geoip, statuses)

    def country(self, address: str) -> str:
        """The ISO code of `address`'s country ("" when unknown or GeoIP is off)."""
        if self._reader is None or not address:
            return ""
        try:
            found = self._reader.get(address)
        except ValueError:  # not an IP address
            return ""
        except Exception:  # the reader's errors for a damaged file; GeoIP is optional, stop it
            self._reader = None  # not closed: another dash thread may be reading it
            self.problem = f"GeoIP off: {printable(self._geoip_path)} is damaged (a lookup failed)"
            return ""
        if not isinstance(found, dict):
            return ""
        country = found.get("country") or found.get("registered_country") or {}
        return str(country.get("iso_code", "")) if isinstance(country, dict) else ""

    def note(self, column: str, value: object) -> str:
        """Text shown after `value` in tab `column` ("" for none)."""
        if column == "raddr" and isinstance(value, str):
            country = self.country(value)
            return f" [{country}]" if country else ""
        if column.endswith("sha256") and value in self.vt_status:
            return f"[VT: {self.vt_status[value]}]"
        return ""
