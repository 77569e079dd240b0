"""Which domain an address was looked up as, from the getaddrinfo records.

A process's own lookups win over other processes' (it may have asked for a different name
that resolves to the same address); the most recent lookup wins; lookups expire.
"""

import ipaddress
import time
from typing import Dict, Optional, Tuple

from picosnitch.kernel.records import Dns

EXPIRY_SECONDS = 3600.0


def reverse_domain(name: str) -> str:
    """www.example.com -> com.example.www, the order the original stores domains in."""
    return ".".join(reversed(name.rstrip(".").split("."))) if name else ""


def is_address(name: str) -> bool:
    """True for a numeric IPv4/IPv6 address (with an optional %scope), which is not a domain."""
    try:
        ipaddress.ip_address(name.split("%", 1)[0])
    except ValueError:
        return False
    return True


class DnsCache:
    def __init__(self, expiry: float = EXPIRY_SECONDS):
        self.expiry = expiry
        self.by_process: Dict[Tuple[int, str], Tuple[str, float]] = {}
        self.by_address: Dict[str, Tuple[str, float]] = {}

    def add(self, record: Dns) -> None:
        if is_address(record.name):
            return  # getaddrinfo("10.0.0.1") converts an address; no name was looked up
        for address in record.addresses:
            self.by_process[(record.tgid, address)] = (record.name, record.time)
            self.by_address[address] = (record.name, record.time)

    def domain(self, tgid: int, address: str, now: Optional[float] = None) -> str:
        """The reversed domain for traffic of tgid to address, or "" when none is known."""
        if not address:
            return ""
        now = time.time() if now is None else now
        address = address[7:] if address.startswith("::ffff:") and "." in address else address
        for hit in (self.by_process.get((tgid, address)), self.by_address.get(address)):
            if hit and now - hit[1] <= self.expiry:
                return reverse_domain(hit[0])
        return ""

    def expire(self, now: Optional[float] = None) -> None:
        now = time.time() if now is None else now
        tables: tuple[dict, dict] = (self.by_process, self.by_address)
        for table in tables:
            for key in [k for k, (_, t) in table.items() if now - t > self.expiry]:
                del table[key]
