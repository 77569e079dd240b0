"""Traffic generators for the tests: each counts its own application bytes and prints them.

Run as `python3 traffic_gen.py SCENARIO ARGS...`; the last line printed is JSON with "sent"
and "recv" (bytes the application handed to / got from the kernel), the ground truth the
monitor is checked against.
"""

import ctypes
import json
import os
import socket
import struct
import sys
import tempfile
import time

CHUNK = 65536


def connect(host, port, kind=socket.SOCK_STREAM):
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, kind)
    s.connect((host, int(port)))
    return s


def read_to_eof(s):
    total = 0
    while True:
        data = s.recv(CHUNK)
        if not data:
            return total
        total += len(data)


def tcp(host, port, size):
    """Send `size` bytes, half-close, then read what the peer sends until EOF."""
    s = connect(host, port)
    s.sendall(b"u" * int(size))
    s.shutdown(socket.SHUT_WR)
    return {"sent": int(size), "recv": read_to_eof(s)}


def tcp_late_read(host, port, size, delay):
    """As `tcp`, but reads only `delay` seconds after half-closing, when the peer has long sent
    everything and closed: the connection is over before the application reads its last bytes."""
    s = connect(host, port)
    s.sendall(b"u" * int(size))
    s.shutdown(socket.SHUT_WR)
    time.sleep(float(delay))
    return {"sent": int(size), "recv": read_to_eof(s), "lport": s.getsockname()[1]}


def udp_connected(host, port, count, size):
    """`count` datagrams of `size` bytes on a connected socket; the peer echoes each."""
    s = connect(host, port, socket.SOCK_DGRAM)
    s.settimeout(5)
    recv = 0
    for _ in range(int(count)):
        s.send(b"c" * int(size))
        recv += len(s.recv(CHUNK))
    return {"sent": int(count) * int(size), "recv": recv}


def udp_unconnected(host, port, count, size):
    """sendto/recvfrom on an unbound-peer socket; reports the peers it saw."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_DGRAM)
    s.settimeout(5)
    recv, peers = 0, set()
    for _ in range(int(count)):
        s.sendto(b"d" * int(size), (host, int(port)))
        data, peer = s.recvfrom(CHUNK)
        recv += len(data)
        peers.add(peer[0])
    return {"sent": int(count) * int(size), "recv": recv, "lport": s.getsockname()[1], "peers": sorted(peers)}


def sendfile(host, port, size):
    with tempfile.TemporaryFile() as f:
        f.write(b"f" * int(size))
        f.flush()
        s = connect(host, port)
        sent, offset = 0, 0
        while offset < int(size):
            n = os.sendfile(s.fileno(), f.fileno(), offset, int(size) - offset)
            offset += n
            sent += n
        s.shutdown(socket.SHUT_WR)
        return {"sent": sent, "recv": read_to_eof(s)}


def splice(host, port):
    """Receive through splice(socket -> pipe), the path that bypasses recvmsg."""
    s = connect(host, port)
    s.shutdown(socket.SHUT_WR)
    r, w = os.pipe()
    total = 0
    while True:
        n = os.splice(s.fileno(), w, CHUNK)
        if n == 0:
            return {"sent": 0, "recv": total}
        total += n
        while n:
            n -= len(os.read(r, n))


def ping(host, count, size):
    """ICMP echo through an unprivileged ping socket (SOCK_DGRAM, IPPROTO_ICMP)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP)
    s.settimeout(5)
    sent = recv = 0
    for seq in range(int(count)):
        packet = struct.pack("!BBHHH", 8, 0, 0, 0, seq) + b"p" * int(size)
        sent += s.sendto(packet, (host, 0))
        recv += len(s.recv(CHUNK))
    return {"sent": sent, "recv": recv}


def raw(host, count, size, protocol=253):
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, int(protocol))
    sent = sum(s.sendto(b"r" * int(size), (host, 0)) for _ in range(int(count)))
    return {"sent": sent, "recv": 0}


ETHERTYPE = 0x88B5  # IEEE local experimental


def packet_send(ifname, count, size):
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETHERTYPE))
    s.bind((ifname, ETHERTYPE))
    frame = b"\xff" * 6 + s.getsockname()[4] + struct.pack("!H", ETHERTYPE) + b"e" * int(size)
    sent = sum(s.send(frame) for _ in range(int(count)))
    return {"sent": sent, "recv": 0}


def packet_recv(ifname, count):
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETHERTYPE))
    s.bind((ifname, ETHERTYPE))
    s.settimeout(10)
    print("ready", flush=True)
    recv = sum(len(s.recv(CHUNK)) for _ in range(int(count)))
    return {"sent": 0, "recv": recv}


def renamed_tcp(name, host, port, size):
    """Renames itself with prctl(PR_SET_NAME) before sending."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(15, name.encode(), 0, 0, 0)  # PR_SET_NAME
    return tcp(host, port, size)


def fork_inherit(host, port, parent_size, child_size):
    """The parent connects; a forked child sends on the inherited socket, then the parent does."""
    s = connect(host, port, socket.SOCK_DGRAM)
    pid = os.fork()
    if pid == 0:
        s.send(b"k" * int(child_size))
        os._exit(0)
    os.waitpid(pid, 0)
    s.send(b"p" * int(parent_size))
    return {"sent": int(parent_size), "recv": 0, "child": pid, "child_sent": int(child_size)}


def resolve_tcp(name, family, port, size):
    """getaddrinfo(name) for IPv`family` (4 or 6), then `tcp` to the first address it returns."""
    af = socket.AF_INET6 if family == "6" else socket.AF_INET
    address = socket.getaddrinfo(name, int(port), af, socket.SOCK_STREAM)[0][4][0]
    return {**tcp(address, port, size), "address": address}


SCENARIOS = {
    "tcp": tcp, "udp-connected": udp_connected, "udp-unconnected": udp_unconnected, "sendfile": sendfile,
    "splice": splice, "ping": ping, "raw": raw, "packet-send": packet_send, "packet-recv": packet_recv,
    "renamed-tcp": renamed_tcp, "fork-inherit": fork_inherit, "resolve-tcp": resolve_tcp,
    "tcp-late-read": tcp_late_read,
}


def main(argv):
    """`SCENARIO ARGS... [-- IGNORED...]`: arguments after `--` only make the command line longer
    or stranger. `gated SCENARIO ARGS...` prints "ready", waits for a line on stdin before running
    the scenario, and after printing its result waits for stdin to close before exiting."""
    gated = argv[0] == "gated"
    if gated:
        argv = argv[1:]
        print("ready", flush=True)
        sys.stdin.readline()
    args = argv[1:argv.index("--")] if "--" in argv else argv[1:]
    print(json.dumps(SCENARIOS[argv[0]](*args)), flush=True)
    if gated:
        sys.stdin.read()


if __name__ == "__main__":
    main(sys.argv[1:])
