"""Clients that name (or do not name) the server they connect to, each the way a kind of program does.

    name_client.py libc NAME PORT            getaddrinfo through the C library, then connect
    name_client.py own-dns NAME PORT SERVER  its own DNS query to SERVER:53 (as Go, dig, Chromium,
                                             c-ares do), then connect to the answer
    name_client.py tls ADDRESS PORT NAME     by address, the name only in the TLS ClientHello (SNI)
    name_client.py http ADDRESS PORT NAME    by address, the name only in the HTTP Host header
    name_client.py plain ADDRESS PORT        by address, naming nothing

Each sends a byte or a request and closes. Prints the address it connected to.
"""

import random
import socket
import ssl
import struct
import sys


def connect(address: str, port: int) -> socket.socket:
    return socket.create_connection((address, port), timeout=5)


def own_dns(name: str, server: str) -> str:
    """The first A record of `name`, asked of `server` over UDP with a query built here."""
    ident = random.randrange(65536)
    question = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0" + struct.pack(">HH", 1, 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(5)
        s.connect((server, 53))
        s.send(struct.pack(">HHHHHH", ident, 0x0100, 1, 0, 0, 0) + question)
        answer = s.recv(4096)
    count = struct.unpack(">H", answer[6:8])[0]
    pos = 12 + len(question)
    for _ in range(count):
        pos += 2 if answer[pos] & 0xC0 == 0xC0 else answer.index(b"\0", pos) + 1 - pos
        rtype, _, _, length = struct.unpack(">HHIH", answer[pos:pos + 10])
        pos += 10
        if rtype == 1 and length == 4:
            return socket.inet_ntoa(answer[pos:pos + 4])
        pos += length
    raise SystemExit(f"no A record for {name}")


def main(mode: str, *args: str) -> None:
    if mode == "libc":
        name, port = args
        address = socket.getaddrinfo(name, int(port), socket.AF_INET, socket.SOCK_STREAM)[0][4][0]
        with connect(address, int(port)) as s:
            s.sendall(b"x")
    elif mode == "own-dns":
        name, port, server = args
        address = own_dns(name, server)
        with connect(address, int(port)) as s:
            s.sendall(b"x")
    elif mode == "tls":
        address, port, name = args
        context = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        with connect(address, int(port)) as s:
            s.settimeout(0.5)
            try:
                context.wrap_socket(s, server_hostname=name)  # the server does not answer: times out
            except (OSError, ssl.SSLError):
                pass
    elif mode == "http":
        address, port, name = args
        with connect(address, int(port)) as s:
            s.sendall(f"GET / HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n".encode())
    elif mode == "plain":
        address, port = args
        with connect(address, int(port)) as s:
            s.sendall(b"x")
    else:
        raise SystemExit(f"unknown mode {mode}")
    print(address if mode in ("libc", "own-dns") else args[0])


if __name__ == "__main__":
    main(*sys.argv[1:])
