"""The kernel's nfnetlink_queue protocol, spoken over a raw AF_NETLINK socket (no library).

iptables' NFQUEUE target hands packets to queue N; a program bound to N reads each packet's id,
its first bytes and the socket owner's uid/gid, and answers with a verdict per id (accept or
drop). Verdicts for many packets go out in one send. Constants are those of
<linux/netfilter/nfnetlink_queue.h> and <linux/netfilter/nfnetlink.h>.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from dataclasses import dataclass
from typing import Iterator, List, Optional, Tuple

NETLINK_NETFILTER = 12
NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET, NFQNL_MSG_VERDICT, NFQNL_MSG_CONFIG = 0, 1, 2
NFQA_CFG_CMD, NFQA_CFG_PARAMS, NFQA_CFG_QUEUE_MAXLEN, NFQA_CFG_MASK, NFQA_CFG_FLAGS = 1, 2, 3, 4, 5
NFQNL_CFG_CMD_BIND, NFQNL_CFG_CMD_UNBIND = 1, 2
NFQNL_COPY_PACKET = 2
NFQA_CFG_F_FAIL_OPEN, NFQA_CFG_F_UID_GID = 0x1, 0x8
NFQA_PACKET_HDR, NFQA_VERDICT_HDR, NFQA_MARK = 1, 2, 3
NFQA_IFINDEX_INDEV, NFQA_IFINDEX_OUTDEV = 5, 6
NFQA_PAYLOAD, NFQA_UID, NFQA_GID = 10, 16, 17
NF_DROP, NF_ACCEPT, NF_REPEAT = 0, 1, 4
ACCEPT, DROP, REJECT = "accept", "drop", "reject"
NLM_F_REQUEST, NLM_F_ACK = 0x1, 0x4
NLMSG_ERROR, NLMSG_DONE = 2, 3
NF_INET_LOCAL_IN, NF_INET_LOCAL_OUT = 1, 3

_NLMSGHDR = struct.Struct("=IHHII")
_NFGENMSG = struct.Struct("=BBH")  # family, version, res_id (big-endian, packed by hand)
_NLATTR = struct.Struct("=HH")


class QueueError(OSError):
    pass


@dataclass
class Packet:
    """One queued packet: its id (for the verdict), the hook it was queued at, its bytes."""

    id: int
    hook: int
    payload: bytes
    uid: int = -1
    gid: int = -1
    indev: int = 0
    outdev: int = 0


def _attr(kind: int, data: bytes) -> bytes:
    length = _NLATTR.size + len(data)
    return _NLATTR.pack(length, kind) + data + b"\0" * (-length % 4)


def _attrs(data: bytes, offset: int) -> Iterator[Tuple[int, bytes]]:
    end = len(data)
    while offset + 4 <= end:
        length, kind = _NLATTR.unpack_from(data, offset)
        if length < 4:
            return
        yield kind & 0x3FFF, data[offset + 4:offset + length]
        offset += (length + 3) & ~3


class Queue:
    """One bound queue. `receive()` returns the packets waiting; `verdicts()` answers them."""

    def __init__(self, number: int, max_length: int = 4096, copy_range: int = 128,
                 fail_open: bool = True, buffer_bytes: int = 8 << 20):
        self.number = number
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        self.sock.bind((0, 0))
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, 33, buffer_bytes)  # SO_RCVBUFFORCE (root)
        except OSError:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffer_bytes)
        # ENOBUFS instead of a silent loss would only tell us what the kernel already handles:
        # a packet the queue could not take is dropped (or accepted with fail_open).
        self.sock.setsockopt(270, 5, 1)  # SOL_NETLINK, NETLINK_NO_ENOBUFS
        self.seq = 0
        self._command(NFQNL_CFG_CMD_UNBIND, socket.AF_INET, quiet=True)
        try:
            self._config(_attr(NFQA_CFG_CMD, struct.pack("=BxH", NFQNL_CFG_CMD_BIND, socket.htons(socket.AF_UNSPEC))))
        except QueueError as e:
            self.sock.close()
            if e.errno == errno.EPERM and os.geteuid() == 0:
                raise QueueError(e.errno, "NFQUEUE %d is taken by another program (or CAP_NET_ADMIN is missing): "
                                          "choose another \"Guard queue number\"" % number) from None
            raise
        flags = NFQA_CFG_F_UID_GID | (NFQA_CFG_F_FAIL_OPEN if fail_open else 0)
        self._config(_attr(NFQA_CFG_PARAMS, struct.pack("!IB", copy_range, NFQNL_COPY_PACKET))
                     + _attr(NFQA_CFG_QUEUE_MAXLEN, struct.pack("!I", max_length))
                     + _attr(NFQA_CFG_FLAGS, struct.pack("!I", flags))
                     + _attr(NFQA_CFG_MASK, struct.pack("!I", flags)))

    def fileno(self) -> int:
        return self.sock.fileno()

    def _header(self, kind: int, flags: int, body_length: int, family: int = socket.AF_UNSPEC) -> bytes:
        self.seq += 1
        return (_NLMSGHDR.pack(_NLMSGHDR.size + _NFGENMSG.size + body_length, (NFNL_SUBSYS_QUEUE << 8) | kind,
                               flags, self.seq, 0)
                + struct.pack("=BB", family, 0) + struct.pack("!H", self.number))

    def _command(self, command: int, family: int, quiet: bool = False) -> None:
        body = _attr(NFQA_CFG_CMD, struct.pack("=BxH", command, socket.htons(family)))
        self.sock.send(self._header(NFQNL_MSG_CONFIG, NLM_F_REQUEST | NLM_F_ACK, len(body)) + body)
        self._ack(quiet)

    def _config(self, body: bytes) -> None:
        self.sock.send(self._header(NFQNL_MSG_CONFIG, NLM_F_REQUEST | NLM_F_ACK, len(body)) + body)
        self._ack()

    def _ack(self, quiet: bool = False) -> None:
        while True:
            data = self.sock.recv(65536)
            for kind, body in self._messages(data):
                if kind == NLMSG_ERROR:
                    code = -struct.unpack_from("=i", body)[0]
                    if code and not quiet:
                        raise QueueError(code, "nfnetlink_queue %d: %s" % (self.number, os.strerror(code)))
                    return

    @staticmethod
    def _messages(data: bytes) -> Iterator[Tuple[int, bytes]]:
        offset = 0
        while offset + _NLMSGHDR.size <= len(data):
            length, kind, _flags, _seq, _pid = _NLMSGHDR.unpack_from(data, offset)
            if length < _NLMSGHDR.size:
                return
            yield kind, data[offset + _NLMSGHDR.size:offset + length]
            offset += (length + 3) & ~3

    def receive(self, limit: int = 1024) -> List[Packet]:
        """The packets queued now (at least one: blocks until one comes, unless the socket is
        non-blocking), at most `limit` datagrams' worth."""
        packets: List[Packet] = []
        flags = 0
        for _ in range(limit):
            try:
                data = self.sock.recv(1 << 16, flags)
            except BlockingIOError:
                break
            except OSError as e:
                if e.errno == errno.ENOBUFS:
                    continue
                raise
            flags = socket.MSG_DONTWAIT
            for kind, body in self._messages(data):
                if kind & 0xFF == NFQNL_MSG_PACKET and kind >> 8 == NFNL_SUBSYS_QUEUE:
                    packet = self._packet(body)
                    if packet:
                        packets.append(packet)
        return packets

    @staticmethod
    def _packet(body: bytes) -> Optional[Packet]:
        packet = Packet(-1, 0, b"")
        for kind, value in _attrs(body, _NFGENMSG.size):
            if kind == NFQA_PACKET_HDR:
                packet.id, _proto, packet.hook = struct.unpack_from("!IHB", value)
            elif kind == NFQA_PAYLOAD:
                packet.payload = value
            elif kind == NFQA_UID:
                packet.uid = struct.unpack("!I", value)[0]
            elif kind == NFQA_GID:
                packet.gid = struct.unpack("!I", value)[0]
            elif kind == NFQA_IFINDEX_INDEV:
                packet.indev = struct.unpack("!I", value)[0]
            elif kind == NFQA_IFINDEX_OUTDEV:
                packet.outdev = struct.unpack("!I", value)[0]
        return packet if packet.id >= 0 else None

    def verdicts(self, decided: List[Tuple[int, str]], reject_mark: int = 0) -> None:
        """ACCEPT, DROP or REJECT each packet id, all in one send. REJECT hands the packet back
        to iptables (NF_REPEAT) carrying `reject_mark`, for a rule there to refuse it."""
        if not decided:
            return
        parts = []
        for packet_id, verdict in decided:
            if verdict == REJECT and reject_mark:
                body = (_attr(NFQA_VERDICT_HDR, struct.pack("!II", NF_REPEAT, packet_id))
                        + _attr(NFQA_MARK, struct.pack("!I", reject_mark)))
            else:
                body = _attr(NFQA_VERDICT_HDR, struct.pack("!II", NF_ACCEPT if verdict == ACCEPT else NF_DROP,
                                                           packet_id))
            parts.append(self._header(NFQNL_MSG_VERDICT, NLM_F_REQUEST, len(body)) + body)
        # One datagram may hold many messages; keep each send well below the socket's limits.
        for start in range(0, len(parts), 200):
            self.sock.send(b"".join(parts[start:start + 200]))

    def close(self) -> None:
        try:
            self._command(NFQNL_CFG_CMD_UNBIND, socket.AF_UNSPEC, quiet=True)
        except OSError:
            pass
        self.sock.close()
