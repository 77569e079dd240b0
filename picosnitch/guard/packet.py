"""The addresses, ports and protocol of a queued packet's first bytes (IPv4 or IPv6)."""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass
from typing import Optional

# IPv6 extension headers that may sit before the transport header (hop-by-hop, routing,
# destination options; fragments carry ports only in the first fragment).
_EXTENSIONS = {0, 43, 60}
_FRAGMENT = 44
_PORTED = {socket.IPPROTO_TCP, socket.IPPROTO_UDP, 132, 136}  # tcp, udp, sctp, udplite


@dataclass(frozen=True)
class Header:
    family: int
    protocol: int
    src: str
    sport: int
    dst: str
    dport: int


def parse(data: bytes) -> Optional[Header]:
    """The header of an IP packet, None if it is too short or not IP. Ports are -1 for
    protocols without them."""
    if not data:
        return None
    version = data[0] >> 4
    if version == 4 and len(data) >= 20:
        header_length = (data[0] & 0xF) * 4
        protocol = data[9]
        src, dst = socket.inet_ntop(socket.AF_INET, data[12:16]), socket.inet_ntop(socket.AF_INET, data[16:20])
        family, offset = socket.AF_INET, header_length
        fragment_offset = struct.unpack_from("!H", data, 6)[0] & 0x1FFF
        if fragment_offset:
            return Header(family, protocol, src, -1, dst, -1)
    elif version == 6 and len(data) >= 40:
        protocol = data[6]
        src, dst = socket.inet_ntop(socket.AF_INET6, data[8:24]), socket.inet_ntop(socket.AF_INET6, data[24:40])
        family, offset = socket.AF_INET6, 40
        while protocol in _EXTENSIONS or protocol == _FRAGMENT:
            if len(data) < offset + 8:
                return Header(family, protocol, src, -1, dst, -1)
            if protocol == _FRAGMENT:
                if struct.unpack_from("!H", data, offset + 2)[0] & 0xFFF8:
                    return Header(family, data[offset], src, -1, dst, -1)
                protocol, offset = data[offset], offset + 8
            else:
                protocol, offset = data[offset], offset + (data[offset + 1] + 1) * 8
    else:
        return None
    if protocol in _PORTED and len(data) >= offset + 4:
        sport, dport = struct.unpack_from("!HH", data, offset)
        return Header(family, protocol, src, sport, dst, dport)
    return Header(family, protocol, src, -1, dst, -1)
