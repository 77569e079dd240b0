"""Names read off the wire: the answers in a DNS message, the server name in a TLS ClientHello (SNI),
the Host header of an HTTP/1 request.

The bytes come from the process's own buffers (kernel_records.Payload): what it received from port
53, or the first thing it sent on a TCP connection. Every parser is strict: a message that does not
parse to its last byte (DNS) or whose fields run past their bounds gives nothing, never a guess, so
that stray bytes can never become a name.
"""

import ipaddress
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

TYPE_A, TYPE_CNAME, TYPE_AAAA = 1, 5, 28
MAX_POINTERS = 64  # compression pointers followed in one name: more is a loop
_HOSTNAME = re.compile(r"^(?=.{1,253}$)([A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\.)*"
                       r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\.?$")


class Malformed(Exception):
    """The bytes are not the message they were taken for."""


@dataclass(frozen=True)
class DnsAnswer:
    """The names a DNS response gives: each address, with the name that was asked for."""

    question: str
    addresses: Dict[str, str]  # address -> the name asked for (the start of its CNAME chain)


def hostname(name: str) -> Optional[str]:
    """name, lower-cased and without a trailing dot, if it is a DNS host name (not an address)."""
    name = name.rstrip(".").lower()
    if not name or not _HOSTNAME.match(name):
        return None
    try:
        ipaddress.ip_address(name)
        return None
    except ValueError:
        return name


# --- DNS (RFC 1035) ---

def _name(msg: bytes, pos: int) -> Tuple[str, int]:
    """The (possibly compressed) name at pos, and the position after it in the message."""
    labels: List[str] = []
    end = None
    for _ in range(MAX_POINTERS):
        if pos >= len(msg):
            raise Malformed("name runs past the message")
        length = msg[pos]
        if length & 0xC0 == 0xC0:  # a pointer to an earlier name
            if pos + 1 >= len(msg):
                raise Malformed("pointer runs past the message")
            target = (length & 0x3F) << 8 | msg[pos + 1]
            if target >= pos:
                raise Malformed("pointer points forward")
            end = pos + 2 if end is None else end
            pos = target
            continue
        if length & 0xC0:
            raise Malformed("unknown label type")
        if length == 0:
            name = ".".join(labels)
            if len(name) > 253:
                raise Malformed("name too long")
            return name, (pos + 1 if end is None else end)
        label = msg[pos + 1:pos + 1 + length]
        if len(label) != length:
            raise Malformed("label runs past the message")
        labels.append(label.decode("ascii", "replace"))
        pos += 1 + length
    raise Malformed("too many compression pointers")


def _u16(msg: bytes, pos: int) -> int:
    if pos + 2 > len(msg):
        raise Malformed("field runs past the message")
    return msg[pos] << 8 | msg[pos + 1]


def parse_dns_response(msg: bytes) -> DnsAnswer:
    """The A/AAAA answers of a DNS response, each with the name asked for; raises Malformed unless
    the whole message parses."""
    if len(msg) < 12:
        raise Malformed("shorter than a DNS header")
    flags, qdcount = _u16(msg, 2), _u16(msg, 4)
    counts = [_u16(msg, 6), _u16(msg, 8), _u16(msg, 10)]
    if not flags & 0x8000 or qdcount != 1:
        raise Malformed("not a response to one question")
    question, pos = _name(msg, 12)
    if pos + 4 > len(msg):
        raise Malformed("question runs past the message")
    pos += 4
    cnames: Dict[str, str] = {}
    addresses: List[Tuple[str, str]] = []
    for section, count in enumerate(counts):
        for _ in range(count):
            owner, pos = _name(msg, pos)
            rtype, length = _u16(msg, pos), _u16(msg, pos + 8)
            rdata_at, pos = pos + 10, pos + 10 + length
            if pos > len(msg):
                raise Malformed("record runs past the message")
            if section != 0:
                continue  # authority and additional records name nothing the process asked for
            if rtype == TYPE_CNAME:
                target, after = _name(msg, rdata_at)
                if after != pos:
                    raise Malformed("CNAME longer than its record")
                cnames[target.lower()] = owner.lower()
            elif rtype in (TYPE_A, TYPE_AAAA) and length == (4 if rtype == TYPE_A else 16):
                addresses.append((owner.lower(), str(ipaddress.ip_address(msg[rdata_at:pos]))))
    if pos != len(msg):
        raise Malformed("bytes after the last record")
    asked = hostname(question)
    if asked is None:
        raise Malformed("the question is not a host name")
    named = {}
    for owner, address in addresses:
        if _chain_start(owner, cnames) == asked:
            named[address] = asked
    return DnsAnswer(asked, named)


def _chain_start(name: str, cnames: Dict[str, str]) -> str:
    """The name a CNAME chain ending in `name` started from."""
    for _ in range(len(cnames) + 1):
        if name not in cnames:
            return name.rstrip(".")
        name = cnames[name]
    return ""  # a loop


def parse_dns_payload(data: bytes, tcp: bool) -> DnsAnswer:
    """A DNS response as a process read it: over TCP with its 2-byte length prefix (or without it,
    when the prefix was read separately)."""
    if tcp and len(data) >= 2 and data[0] << 8 | data[1] == len(data) - 2:
        data = data[2:]
    return parse_dns_response(data)


# --- TLS ClientHello (RFC 8446 4.1.2, RFC 6066 3) ---

def _take(data: bytes, pos: int, size: int) -> Tuple[bytes, int]:
    if pos + size > len(data):
        raise Malformed("field runs past the bytes read")
    return data[pos:pos + size], pos + size


def _vector(data: bytes, pos: int, length_bytes: int) -> Tuple[bytes, int]:
    raw, pos = _take(data, pos, length_bytes)
    return _take(data, pos, int.from_bytes(raw, "big"))


def parse_tls_sni(data: bytes) -> str:
    """The host name a TLS ClientHello asks for; raises Malformed if there is none to be read."""
    if len(data) < 9 or data[0] != 0x16 or data[1] != 0x03 or data[5] != 0x01:
        raise Malformed("not a TLS handshake record with a ClientHello")
    pos = 9 + 2 + 32  # record header, handshake header, client_version, random
    _, pos = _vector(data, pos, 1)  # session id
    _, pos = _vector(data, pos, 2)  # cipher suites
    _, pos = _vector(data, pos, 1)  # compression methods
    extensions, _ = _vector(data, pos, 2)
    at = 0
    while at < len(extensions):
        ext_type, at = _take(extensions, at, 2)
        body, at = _vector(extensions, at, 2)
        if ext_type != b"\x00\x00":
            continue
        names, _ = _vector(body, 0, 2)
        i = 0
        while i < len(names):
            name_type, i = _take(names, i, 1)
            name, i = _vector(names, i, 2)
            if name_type == b"\x00":
                host = hostname(name.decode("ascii", "replace"))
                if host is None:
                    raise Malformed("the server name is not a host name")
                return host
    raise Malformed("no server name extension in the bytes read")


# --- HTTP/1 (RFC 9112 3, 3.2) ---

_REQUEST_LINE = re.compile(rb"^[A-Z]{3,7} \S+ HTTP/1\.[01]\r\n")


def parse_http_host(data: bytes) -> str:
    """The host an HTTP/1 request's Host header names; raises Malformed if there is none."""
    if not _REQUEST_LINE.match(data):
        raise Malformed("not an HTTP/1 request line")
    for line in data.split(b"\r\n")[1:]:
        if not line:
            break
        field, sep, value = line.partition(b":")
        if sep and field.strip().lower() == b"host":
            host = value.strip().decode("ascii", "replace")
            host = host.rsplit(":", 1)[0] if host.count(":") == 1 else host  # a port
            named = hostname(host)
            if named is None:
                raise Malformed("the Host header is not a host name")
            return named
    raise Malformed("no Host header in the bytes read")
