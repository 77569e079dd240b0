"""The "Log ignore" option: connections that are not logged.

Each entry of the list is one of:

- an executable's sha256, 64 hex digits: connections of that executable, or of an interpreter
  running the script with that sha256;
- a port, as a number (443, or the string "443"): connections with that local or remote port;
- an IP address or subnet ("10.0.0.0/8", "fd00::/8", "192.0.2.7"): connections whose local or
  remote address is in it. IPv4 entries also match IPv4-mapped IPv6 addresses (::ffff:10.1.2.3)
  and mapped IPv6 entries (::ffff:10.0.0.0/104) match plain IPv4 ones;
- a domain: connections to it and to all its subdomains, by whole labels ("example.com" matches
  "www.example.com", not "notexample.com").

Domains are canonically written the usual way, `example.com`. Because snitch.db stores them
reversed (`com.example`), that form is accepted too: an entry whose first label is a top-level
domain (com, org, a two-letter country code, ...) and whose last label is not, is read as
reversed. A trailing dot (`example.mycorp.`) always means the usual order. A leading `*.` is
allowed and changes nothing. Internationalised names are converted to their `xn--` form.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from dataclasses import dataclass
from typing import FrozenSet, Iterable, Optional, Tuple, Union

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

_SHA256 = re.compile(r"[0-9a-fA-F]{64}")
_LABEL = re.compile(r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?")
# Labels that end a domain written in the usual order. Two-letter labels count as country codes.
_TOP_LEVEL = frozenset(
    "com net org edu gov mil int arpa info biz name pro mobi app dev xyz online site tech store "
    "shop cloud blog page top club live news space website email link click host network systems "
    "services digital media group social video today world zone software tools "
    "local localhost localdomain lan home internal intranet corp private onion".split())


def _is_top_level(label: str) -> bool:
    return label in _TOP_LEVEL or (len(label) == 2 and label.isalpha())


def _as_ipv4_if_mapped(net: IPNetwork) -> IPNetwork:
    if net.version == 6 and net.prefixlen >= 96 and net.network_address.ipv4_mapped:
        return ipaddress.IPv4Network((net.network_address.ipv4_mapped, net.prefixlen - 96))
    return net


@functools.lru_cache(maxsize=4096)
def _address(text: str) -> Optional[IPAddress]:
    """The address in a logged laddr/raddr, IPv4-mapped IPv6 as IPv4; None if not an IP."""
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    return ip.ipv4_mapped if ip.version == 6 and ip.ipv4_mapped else ip


def _reversed_domain(entry: str) -> Optional[str]:
    """The entry as a reversed domain (com.example), or None if it is not a domain name."""
    text = entry.strip().lower()
    if text.startswith("*."):
        text = text[2:]
    usual_order = text.endswith(".")
    text = text.rstrip(".")
    if not text.isascii():
        try:
            text = text.encode("idna").decode("ascii")
        except UnicodeError:
            return None
    labels = text.split(".")
    if not all(_LABEL.fullmatch(label) for label in labels) or all(l.isdigit() for l in labels):
        return None  # all-numeric: a mistyped IP address, not a name
    written_reversed = (not usual_order and len(labels) > 1 and _is_top_level(labels[0])
                        and not _is_top_level(labels[-1]))
    return ".".join(labels if written_reversed else reversed(labels))


@dataclass(frozen=True)
class IgnoreRules:
    """Parsed "Log ignore" entries; false when there are none."""

    hashes: FrozenSet[str] = frozenset()
    ports: FrozenSet[int] = frozenset()
    networks: Tuple[IPNetwork, ...] = ()
    domains: FrozenSet[str] = frozenset()  # reversed: com.example

    @classmethod
    def from_config(cls, entries: Iterable) -> "IgnoreRules":
        """Parse the option's list; ValueError naming the first entry that is none of the kinds."""
        if isinstance(entries, (str, bytes, dict)) or not isinstance(entries, (list, tuple)):
            raise ValueError(f'"Log ignore" must be a list, not {entries!r}')
        hashes, ports, networks, domains = set(), set(), [], set()
        for entry in entries:
            if isinstance(entry, str) and re.fullmatch(r"[0-9]+", entry.strip()):
                entry = int(entry)
            if isinstance(entry, int) and not isinstance(entry, bool):
                if not 0 <= entry <= 65535:
                    raise ValueError(f'"Log ignore" entry {entry!r}: a port is 0 to 65535')
                ports.add(entry)
                continue
            if not isinstance(entry, str):
                raise ValueError(f'"Log ignore" entry {entry!r}: expected a string or a port number')
            text = entry.strip()
            if _SHA256.fullmatch(text):
                hashes.add(text.lower())
                continue
            try:
                networks.append(_as_ipv4_if_mapped(ipaddress.ip_network(text, strict=False)))
                continue
            except ValueError as e:
                if "/" in text or ":" in text:  # meant as an address: say what is wrong with it
                    raise ValueError(f'"Log ignore" entry {entry!r}: {e}') from None
            domain = _reversed_domain(text)
            if domain is None:
                raise ValueError(f'"Log ignore" entry {entry!r}: not a sha256, port, IP address, '
                                 "subnet or domain")
            domains.add(domain)
        return cls(frozenset(hashes), frozenset(ports), tuple(networks), frozenset(domains))

    def __bool__(self) -> bool:
        return bool(self.hashes or self.ports or self.networks or self.domains)

    def ignores(self, sha256: str = "", domain_reversed: str = "", laddr: str = "",
                raddr: str = "", lport: int = -1, rport: int = -1, script_sha256: str = "") -> bool:
        """True if a connection with these values must not be logged.

        Empty strings and port -1 (not logged, not applicable) never match.
        """
        if any(h and h.lower() in self.hashes for h in (sha256, script_sha256)):
            return True
        if lport in self.ports or rport in self.ports:
            return True
        if domain_reversed and self.domains:
            labels = domain_reversed.strip(".").lower().split(".")
            if any(".".join(labels[:n]) in self.domains for n in range(1, len(labels) + 1)):
                return True
        if self.networks:
            for text in (laddr, raddr):
                ip = _address(text) if text else None
                if ip is not None and any(ip in net for net in self.networks):
                    return True
        return False
