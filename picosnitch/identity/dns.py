"""Which domain traffic went to, learned from the process that sent it, never borrowed.

Names come from four sources, each kept as the row's `domain_source`:

- `sni` / `http`: the server name a TCP connection's first bytes carry (TLS ClientHello, HTTP
  Host header). It names that one connection, so it comes first.
- `dns`: a DNS answer the process itself received (from any resolver: its own DNS client, a
  local stub, another network namespace's server), read in the kernel.
- `getaddrinfo`: a lookup the process made through its C library.

A name applies to the process that looked it up (its thread group). Failing that, to its child:
a lookup the parent made (`…:parent`, e.g. a shell that resolved and then started a client).
Failing that, to processes of the same network namespace, within FRESH_SECONDS, but only names a
resolver daemon of that namespace received (`dns:resolver`): dnsmasq or systemd-resolved asking
upstream on behalf of the namespace's clients. A lookup by an unrelated process is never used
just because the address matches: content delivery networks serve thousands of names from one
address, so "someone looked this address up" would name other traffic wrongly.
"""

import ipaddress
import time
from collections import OrderedDict
from typing import Iterable, Optional, Tuple

from picosnitch.identity.names import Malformed, hostname, parse_dns_payload, parse_http_host, parse_tls_sni
from picosnitch.kernel.records import Dns, Payload

EXPIRY_SECONDS = 3600.0  # a process's own lookups and connection names
FRESH_SECONDS = 60.0  # names a namespace's resolver daemon received
MAX_ENTRIES = 65536  # per table; the oldest go first
RESOLVER_DAEMONS = frozenset({"systemd-resolve", "systemd-resolved", "dnsmasq", "unbound", "named", "nscd",
                              "coredns", "kresd", "pdns_recursor", "dnscrypt-proxy", "stubby", "avahi-daemon"})

Hit = Tuple[str, float, str]  # name, when learned, source


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


def _plain(address: str) -> str:
    """An IPv4-mapped IPv6 address as the IPv4 address it maps."""
    return address[7:] if address.startswith("::ffff:") and "." in address else address


class _Table:
    """A bounded map that forgets its oldest entries first."""

    def __init__(self, limit: int = MAX_ENTRIES):
        self.limit = limit
        self.items: "OrderedDict[tuple, Hit]" = OrderedDict()

    def put(self, key: tuple, hit: Hit) -> None:
        self.items[key] = hit
        self.items.move_to_end(key)
        while len(self.items) > self.limit:
            self.items.popitem(last=False)

    def get(self, key: tuple) -> Optional[Hit]:
        return self.items.get(key)

    def expire(self, before: float) -> None:
        for key in [k for k, hit in self.items.items() if hit[1] < before]:
            del self.items[key]


class DnsCache:
    """Names by (process, address), by connection, and by (namespace, address) for resolver daemons."""

    def __init__(self, expiry: float = EXPIRY_SECONDS, fresh: float = FRESH_SECONDS):
        self.expiry, self.fresh = expiry, fresh
        self.by_process = _Table()  # (tgid, address)
        self.by_connection = _Table()  # (tgid, laddr, lport, raddr, rport)
        self.by_namespace = _Table()  # (netns, address)

    def add(self, record: Dns) -> None:
        """A getaddrinfo lookup's answers."""
        name = hostname(record.name)
        if name is None:
            return  # getaddrinfo("10.0.0.1") converts an address; no name was looked up
        for address in record.addresses:
            self.by_process.put((record.tgid, _plain(address)), (name, record.time, "getaddrinfo"))

    def add_payload(self, record: Payload) -> bool:
        """What a process received from port 53, or first sent on a connection; whether it named anything."""
        try:
            if record.what == "dns_answer":
                answer = parse_dns_payload(record.data, tcp=record.protocol == 6)
                self._add_answer(record, answer.addresses.items())
                return bool(answer.addresses)
            if record.what == "first_send":
                tls = record.data[:1] == b"\x16"
                name = parse_tls_sni(record.data) if tls else parse_http_host(record.data)
                key = (record.tgid, record.laddr, record.lport, _plain(record.raddr), record.rport)
                self.by_connection.put(key, (name, record.time, "sni" if tls else "http"))
                return True
        except Malformed:
            return False
        return False

    def _add_answer(self, record: Payload, named: Iterable[Tuple[str, str]]) -> None:
        daemon = record.comm in RESOLVER_DAEMONS
        for address, name in named:
            self.by_process.put((record.tgid, address), (name, record.time, "dns"))
            if daemon:
                self.by_namespace.put((record.netns, address), (name, record.time, "dns:resolver"))

    def domain(self, tgid: int, address: str, now: Optional[float] = None, ppid: int = 0, netns: int = 0,
               laddr: str = "", lport: int = -1, rport: int = -1) -> Tuple[str, str]:
        """(reversed domain, source) for traffic of tgid to address, or ("", "") when none is known."""
        if not address:
            return "", ""
        now = time.time() if now is None else now
        address = _plain(address)
        hits = ((self.by_connection.get((tgid, laddr, lport, address, rport)), self.expiry, ""),
                (self.by_process.get((tgid, address)), self.expiry, ""),
                (self.by_process.get((ppid, address)) if ppid else None, self.expiry, ":parent"),
                (self.by_namespace.get((netns, address)) if netns else None, self.fresh, ""))
        for hit, window, suffix in hits:
            if hit and now - hit[1] <= window:
                return reverse_domain(hit[0]), hit[2] + suffix
        return "", ""

    def expire(self, now: Optional[float] = None) -> None:
        now = time.time() if now is None else now
        for table in (self.by_process, self.by_connection):
            table.expire(now - self.expiry)
        self.by_namespace.expire(now - self.fresh)

