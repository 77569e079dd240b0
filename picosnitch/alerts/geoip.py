"""The country of an IP address, from a DB-IP or MaxMind country database (.mmdb) the user
names in "GeoIP database"; picosnitch never downloads one.

The baseline learns the countries each program talks to, and view and dash show them next to
addresses (ui.annotations): both read the database through CountryReader. Reading it needs the
optional package maxminddb; a database that cannot be used turns GeoIP off and leaves one
sentence in `problem`, so nothing here raises over it.
"""

from __future__ import annotations

from typing import Any

from picosnitch.installed import install_extra
from picosnitch.sanitize import printable


class CountryReader:
    """Country codes of addresses; `problem` says why there are none ("" when fine or off)."""

    def __init__(self, path: str = "") -> None:
        self.path = path
        self.problem = ""
        self._reader: Any = None
        if path:
            self._open()

    def _open(self) -> None:
        shown = printable(self.path)
        try:
            import maxminddb  # optional extra [geoip]
        except ImportError:
            self.problem = (f"GeoIP off: reading {shown} needs the Python package maxminddb "
                            f"(install it with: {install_extra('geoip')})")
            return
        try:
            self._reader = maxminddb.open_database(self.path)
        except OSError as exc:
            self.problem = f"GeoIP off: cannot read {shown}: {exc.strerror or exc}"
        except (maxminddb.InvalidDatabaseError, ValueError):  # ValueError: an empty file
            self.problem = f"GeoIP off: {shown} is not a MaxMind DB (.mmdb) file"

    @property
    def on(self) -> bool:
        """Whether countries are looked up."""
        return self._reader is not None

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
            self.problem = f"GeoIP off: {printable(self.path)} is damaged (a lookup failed)"
            return ""
        if not isinstance(found, dict):
            return ""
        country = found.get("country") or found.get("registered_country") or {}
        return str(country.get("iso_code", "")) if isinstance(country, dict) else ""
