"""Writes small MaxMind DB (.mmdb) files, so GeoIP is tested against the real `maxminddb` reader
without a database ever being downloaded.

Written from the MaxMind DB File Format Specification 2.0 (https://maxmind.github.io/MaxMind-DB/):
the file is a binary search tree over the 128 bits of an IPv6 address, 16 zero bytes, a data
section of typed values, then "\\xab\\xcd\\xefMaxMind.com" and a map of metadata. IPv4 networks
sit at ::/96 (where readers look IPv4 addresses up) and, as in DB-IP's and MaxMind's own files,
again at ::ffff:0:0/96, so IPv4-mapped addresses find them too.

    write(path, {"10.232.0.0/14": country("DE", "Germany"), "fd00:5e::/32": country("FR", "France")})
"""

from __future__ import annotations

import ipaddress
import struct
import time
from pathlib import Path

METADATA_MARKER = b"\xab\xcd\xefMaxMind.com"
DATA_SEPARATOR = bytes(16)
RECORD_BITS = 24  # each tree node is two 3-byte records

# Type numbers of the data section; those above 7 are "extended": the control byte's type bits
# are 0 and the byte after it holds the type number minus 7.
STRING, DOUBLE, BYTES, UINT16, UINT32, MAP, UINT64, ARRAY, BOOLEAN = 2, 3, 4, 5, 6, 7, 9, 11, 14


class UInt16(int):
    """An integer stored as uint16 (the metadata says which keys must be)."""


class UInt64(int):
    """An integer stored as uint64."""


def country(iso_code: str, name: str) -> dict:
    """A record in the layout of DB-IP's and MaxMind's country databases."""
    return {"country": {"iso_code": iso_code, "names": {"en": name}}}


# ---- the data section's encoding ----

def _control(type_number: int, size: int) -> bytes:
    """The control byte (and extended type and size bytes) that start a field."""
    if size < 29:
        size_bits, extra = size, b""
    elif size < 29 + 256:
        size_bits, extra = 29, bytes([size - 29])
    elif size < 285 + 65536:
        size_bits, extra = 30, (size - 285).to_bytes(2, "big")
    else:
        size_bits, extra = 31, (size - 65821).to_bytes(3, "big")
    if type_number <= 7:
        return bytes([type_number << 5 | size_bits]) + extra
    return bytes([size_bits, type_number - 7]) + extra


def _unsigned(type_number: int, value: int) -> bytes:
    payload = value.to_bytes((value.bit_length() + 7) // 8, "big")  # no leading zero bytes
    return _control(type_number, len(payload)) + payload


def encode(value) -> bytes:
    """`value` (str, int >= 0, float, bytes, bool, dict with str keys, list) as one field."""
    if isinstance(value, bool):
        return _control(BOOLEAN, int(value))  # the size bits are the value
    if isinstance(value, UInt16):
        return _unsigned(UINT16, value)
    if isinstance(value, int):
        return _unsigned(UINT32 if value < 2**32 and not isinstance(value, UInt64) else UINT64, value)
    if isinstance(value, float):
        return _control(DOUBLE, 8) + struct.pack(">d", value)
    if isinstance(value, str):
        raw = value.encode("utf-8")
        return _control(STRING, len(raw)) + raw
    if isinstance(value, bytes):
        return _control(BYTES, len(value)) + value
    if isinstance(value, dict):
        return _control(MAP, len(value)) + b"".join(encode(str(k)) + encode(v)
                                                     for k, v in value.items())
    if isinstance(value, list):
        return _control(ARRAY, len(value)) + b"".join(encode(v) for v in value)
    raise TypeError(f"no MaxMind DB type for {type(value).__name__}")


# ---- the search tree ----

def _tree_prefixes(network: str) -> list[tuple[int, int]]:
    """(address as 128 bits, prefix length over 128 bits) where `network` goes in the tree."""
    net = ipaddress.ip_network(network)
    if net.version == 6:
        return [(int(net.network_address), net.prefixlen)]
    v4 = int(net.network_address)
    return [(v4, 96 + net.prefixlen), (0xFFFF << 32 | v4, 96 + net.prefixlen)]


class _Node:
    def __init__(self, left=None, right=None):
        self.children = [left, right]  # each: None (no data), a _Node, or an int (data index)


def _insert(root: _Node, address: int, length: int, data: int) -> None:
    node = root
    for depth in range(length - 1):
        bit = address >> (127 - depth) & 1
        child = node.children[bit]
        if not isinstance(child, _Node):  # a wider network (or nothing) covers both halves
            child = node.children[bit] = _Node(child, child)
        node = child
    node.children[address >> (128 - length) & 1] = data


def _numbered(root: _Node) -> list[_Node]:
    """The nodes in breadth-first order: a node's number is its index."""
    nodes, index = [root], 0
    while index < len(nodes):
        nodes += [c for c in nodes[index].children if isinstance(c, _Node)]
        index += 1
    return nodes


def build(networks: dict, database_type: str = "picosnitch-test-country",
          languages=("en",)) -> bytes:
    """The bytes of a .mmdb mapping each network ("10.232.0.0/14", "fd00:5e::/32") to a value.

    A network inside a wider one overrides it for its own addresses, as in real databases.
    """
    root = _Node()
    data, offsets = bytearray(), {}
    values = []  # data index -> offset into the data section
    order = sorted(networks, key=lambda n: ipaddress.ip_network(n).prefixlen
                   + (96 if ipaddress.ip_network(n).version == 4 else 0))
    for network in order:
        field = encode(networks[network])
        if field not in offsets:  # equal values are stored once
            offsets[field] = len(data)
            data += field
        values.append(offsets[field])
        for address, length in _tree_prefixes(network):
            if length == 0:
                raise ValueError("a network needs a prefix length of at least 1")
            _insert(root, address, length, len(values) - 1)
    nodes = _numbered(root)
    number = {id(node): i for i, node in enumerate(nodes)}
    count = len(nodes)

    def record(child) -> int:
        if child is None:
            return count  # "no data"
        if isinstance(child, _Node):
            return number[id(child)]
        return count + len(DATA_SEPARATOR) + values[child]  # points into the data section

    size = RECORD_BITS // 8
    tree = b"".join(record(n.children[0]).to_bytes(size, "big")
                    + record(n.children[1]).to_bytes(size, "big") for n in nodes)
    metadata = {
        "binary_format_major_version": UInt16(2), "binary_format_minor_version": UInt16(0),
        "build_epoch": UInt64(int(time.time())), "database_type": database_type,
        "description": {"en": "picosnitch test database"}, "ip_version": UInt16(6),
        "languages": list(languages), "node_count": count, "record_size": UInt16(RECORD_BITS),
    }
    return tree + DATA_SEPARATOR + bytes(data) + METADATA_MARKER + encode(metadata)


def write(path, networks: dict, **kwargs) -> Path:
    """Writes build(networks) to `path`; returns it."""
    path = Path(path)
    path.write_bytes(build(networks, **kwargs))
    return path
