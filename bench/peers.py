"""Peer servers for the accuracy benchmark. Each runs as a thread; started through
`NetLab.in_peer` it lives in the lab's namespace, otherwise on the host (loopback scenarios).

The servers only serve: the bytes the benchmark checks are the ones the generators count
themselves, on the host side.
"""

import socket
import threading

from netlab import family_of


class _Server:
    def __init__(self, host: str, port: int = 0):
        self.host, self.port = host, port
        self.ready, self.stopped = threading.Event(), threading.Event()
        self.received = 0
        self.lock = threading.Lock()

    def _bind(self, kind: int, proto: int = 0) -> socket.socket:
        # Created in the serving thread, so that it belongs to that thread's namespace.
        sock = socket.socket(family_of(self.host), kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.settimeout(0.2)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        return sock

    def _count(self, n: int) -> None:
        with self.lock:
            self.received += n

    def stop(self) -> None:
        self.stopped.set()


class TcpSink(_Server):
    """Accepts any number of connections; on each, sends `reply` bytes (from a second thread, so
    both directions flow at once) while reading until EOF, then closes."""

    def __init__(self, host: str, port: int = 0, reply: int = 0, proto: int = 0):
        super().__init__(host, port)
        self.reply, self.proto = reply, proto

    def serve(self) -> None:
        sock = self._bind(socket.SOCK_STREAM, self.proto)
        sock.listen(1024)
        self.ready.set()
        while not self.stopped.is_set():
            try:
                conn, _ = sock.accept()
            except socket.timeout:
                continue
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()
        sock.close()

    def _handle(self, conn: socket.socket) -> None:
        sender = None
        if self.reply:
            sender = threading.Thread(target=self._send, args=(conn,), daemon=True)
            sender.start()
        try:
            while True:
                data = conn.recv(262144)
                if not data:
                    break
                self._count(len(data))
        except OSError:
            pass
        if sender:
            sender.join(120)
        conn.close()

    def _send(self, conn: socket.socket) -> None:
        block = b"s" * 65536
        left = self.reply
        try:
            while left:
                n = conn.send(block[:min(left, len(block))])
                left -= n
        except OSError:
            pass


class UdpServer(_Server):
    """`echo`: sends every datagram back; `sink`: only reads; `pull`: answers "pull COUNT SIZE"
    with COUNT datagrams of SIZE bytes."""

    def __init__(self, host: str, port: int = 0, mode: str = "echo"):
        super().__init__(host, port)
        self.mode = mode

    def serve(self) -> None:
        sock = self._bind(socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.ready.set()
        while not self.stopped.is_set():
            try:
                data, peer = sock.recvfrom(65536)
            except socket.timeout:
                continue
            self._count(len(data))
            if self.mode == "echo":
                sock.sendto(data, peer)
            elif self.mode == "pull" and data.startswith(b"pull "):
                count, size = (int(x) for x in data.split()[1:3])
                payload = b"P" * size
                for i in range(count):
                    try:
                        sock.sendto(payload, peer)
                    except OSError:
                        pass
                    if i % 16 == 15:
                        self.stopped.wait(0.0002)  # pace a little: the client reads in Python
        sock.close()


def start(server: _Server, lab=None, timeout: float = 5) -> _Server:
    """Starts `server` in the lab's namespace (lab given) or on the host; waits until it listens."""
    if lab is not None:
        lab.in_peer(server.serve)
    else:
        threading.Thread(target=server.serve, daemon=True).start()
    if not server.ready.wait(timeout):
        raise RuntimeError(f"{type(server).__name__} on {server.host} did not start")
    return server
