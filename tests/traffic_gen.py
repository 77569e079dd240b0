"""Traffic generators for the tests: each counts its own application bytes and prints them.

Run as `python3 traffic_gen.py SCENARIO ARGS...`; the last line printed is JSON with "sent"
and "recv" (bytes the application handed to / got from the kernel), the ground truth the
monitor is checked against.
"""

import ctypes
import json
import os
import socket
import ssl
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


def udp_connected(host, port, count, size, receive="recv"):
    """`count` datagrams of `size` bytes on a connected socket; the peer echoes each. `receive`:
    "recv", or "recvfrom" to ask for the sender's address as well."""
    s = connect(host, port, socket.SOCK_DGRAM)
    s.settimeout(5)
    recv = 0
    for _ in range(int(count)):
        s.send(b"c" * int(size))
        recv += len(s.recv(CHUNK) if receive == "recv" else s.recvfrom(CHUNK)[0])
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


def exec_children(host, port, count):
    """Sends a datagram, then starts `count` children that exec this same program to send datagrams
    of their own sizes (1001, 1002, ...), and one forked child that sends without exec."""
    s = connect(host, port, socket.SOCK_DGRAM)
    s.send(b"p" * 1000)
    children = []
    for i in range(1, int(count) + 1):
        pid = os.fork()
        if pid == 0:
            os.execv(sys.executable, [sys.executable, __file__, "udp-connected", host, port, "1", str(1000 + i)])
        children.append([pid, 1000 + i])
    forked = os.fork()
    if forked == 0:
        s.send(b"f" * 999)
        os._exit(0)
    for pid in [c[0] for c in children] + [forked]:
        os.waitpid(pid, 0)
    return {"sent": 1000, "recv": 0, "children": children, "forked": forked}


def dns_ask(host, port, how):
    """Sends a query-sized message to a DNS port and reads the answer back with `how`: recv on a
    connected UDP socket, recvfrom or recvmsg on an unconnected one, or over TCP (length-prefixed)."""
    query = b"\x12\x34\x01\x00\x00\x01" + b"q" * 40
    if how == "tcp":
        with connect(host, port) as s:
            s.sendall(len(query).to_bytes(2, "big") + query)
            answer = b""
            while len(answer) < 2 + len(query):
                answer += s.recv(4096)
        return {"sent": 2 + len(query), "recv": len(answer), "answer": answer.hex()}
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(5)
    if how == "recv":
        s.connect((host, int(port)))
        s.send(query)
        answer = s.recv(4096)
    else:
        s.sendto(query, (host, int(port)))
        answer = s.recvfrom(4096)[0] if how == "recvfrom" else s.recvmsg(4096)[0]
    return {"sent": len(query), "recv": len(answer), "answer": answer.hex()}


def first_send(host, port, how):
    """Opens a TCP connection and sends first a TLS ClientHello naming tls.picosnitch.test (a real
    one, from Python's ssl module), an HTTP request with a Host header, or plain bytes; then more."""
    s = connect(host, port)
    if how == "tls":
        context = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        s.settimeout(0.5)
        try:
            context.wrap_socket(s, server_hostname="tls.picosnitch.test")  # no TLS server: times out
        except (OSError, ssl.SSLError):
            pass
    else:
        s.sendall(b"GET / HTTP/1.1\r\nHost: http.picosnitch.test\r\n\r\n" if how == "http" else b"hello there")
        s.sendall(b"GET / HTTP/1.1\r\nHost: second.picosnitch.test\r\n\r\n")
    s.close()
    return {"sent": 0, "recv": 0}


def resolve_tcp(name, family, port, size):
    """getaddrinfo(name) for IPv`family` (4 or 6), then `tcp` to the first address it returns."""
    af = socket.AF_INET6 if family == "6" else socket.AF_INET
    address = socket.getaddrinfo(name, int(port), af, socket.SOCK_STREAM)[0][4][0]
    return {**tcp(address, port, size), "address": address}


def tcp_duplex(host, port, size):
    """Sends `size` bytes from a second thread while the main thread reads until EOF: both
    directions at once on one connection."""
    import threading
    s = connect(host, port)

    def upload():
        s.sendall(b"x" * int(size))
        s.shutdown(socket.SHUT_WR)

    sender = threading.Thread(target=upload)
    sender.start()
    recv = read_to_eof(s)
    sender.join()
    return {"sent": int(size), "recv": recv}


def tcp_many(host, port, count, size):
    """`count` connections one after another, each sends `size` bytes, half-closes and reads to EOF."""
    sent = recv = 0
    for _ in range(int(count)):
        s = connect(host, port)
        s.sendall(b"n" * int(size))
        sent += int(size)
        s.shutdown(socket.SHUT_WR)
        recv += read_to_eof(s)
        s.close()
    return {"sent": sent, "recv": recv}


def drip(host, port, seconds, size, interval):
    """Low and slow: `size` bytes every `interval` seconds for `seconds` seconds on one connection."""
    s = connect(host, port)
    sent, end = 0, time.monotonic() + float(seconds)
    while time.monotonic() < end:
        s.sendall(b"d" * int(size))
        sent += int(size)
        time.sleep(float(interval))
    s.shutdown(socket.SHUT_WR)
    return {"sent": sent, "recv": read_to_eof(s)}


def udp_flood(host, port, count, size):
    """`count` datagrams of `size` bytes with sendto() on an unconnected socket, as fast as
    possible, not waiting for any answer."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_DGRAM)
    payload, sent = b"q" * int(size), 0
    for _ in range(int(count)):
        while True:
            try:
                sent += s.sendto(payload, (host, int(port)))
                break
            except BlockingIOError:  # pragma: no cover - a full queue on a blocking socket
                time.sleep(0.001)
    return {"sent": sent, "recv": 0, "lport": s.getsockname()[1]}


def udp_pull(host, port, count, size):
    """Asks the peer (one datagram "pull COUNT SIZE") for `count` datagrams and reads them until
    it has them all or none arrives for a second."""
    s = connect(host, port, socket.SOCK_DGRAM)
    s.settimeout(1)
    request = f"pull {int(count)} {int(size)}".encode()
    sent, recv, got = s.send(request), 0, 0
    while got < int(count):
        try:
            recv += len(s.recv(CHUNK))
        except socket.timeout:
            break
        got += 1
    return {"sent": sent, "recv": recv, "datagrams": got}


def ping_raw(host, count, size):
    """ICMP echo through a raw socket (root; needs no ping_group_range), one request at a time.
    Every byte read from the socket counts (a raw socket delivers the IP header too)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    s.settimeout(2)
    ident, sent, recv = os.getpid() & 0xFFFF, 0, 0
    for seq in range(int(count)):
        body = struct.pack("!BBHHH", 8, 0, 0, ident, seq) + b"p" * int(size)
        padded = body + b"\0" * (len(body) % 2)
        total = sum(struct.unpack(f"!{len(padded) // 2}H", padded))
        total = (total >> 16) + (total & 0xFFFF)
        checksum = ~(total + (total >> 16)) & 0xFFFF
        sent += s.sendto(body[:2] + struct.pack("!H", checksum) + body[4:], (host, 0))
        while True:
            try:
                data = s.recv(CHUNK)
            except socket.timeout:
                break
            recv += len(data)
            header = (data[0] & 0x0F) * 4
            if data[header] == 0 and struct.unpack("!HH", data[header + 4:header + 8]) == (ident, seq):
                break
    return {"sent": sent, "recv": recv}


def sctp(host, port, size):
    """SCTP one-to-one socket: send `size` bytes, then close."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_SCTP)
    s.connect((host, int(port)))
    # One message per 64 KiB: SCTP keeps messages whole, and a kernel whose send buffer is
    # smaller than a message refuses it (EMSGSIZE on 6.1 and 6.12 in the guests, for 8 MiB).
    chunk = b"s" * 65536
    left = int(size)
    while left:
        left -= s.send(chunk[:min(left, len(chunk))])
    s.close()
    return {"sent": int(size), "recv": 0}


SCENARIOS = {
    "tcp": tcp, "udp-connected": udp_connected, "udp-unconnected": udp_unconnected, "sendfile": sendfile,
    "splice": splice, "ping": ping, "raw": raw, "packet-send": packet_send, "packet-recv": packet_recv,
    "renamed-tcp": renamed_tcp, "fork-inherit": fork_inherit, "exec-children": exec_children,
    "dns-ask": dns_ask, "first-send": first_send, "resolve-tcp": resolve_tcp,
    "tcp-late-read": tcp_late_read, "tcp-duplex": tcp_duplex, "tcp-many": tcp_many, "drip": drip,
    "udp-flood": udp_flood, "udp-pull": udp_pull, "ping-raw": ping_raw, "sctp": sctp,
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
