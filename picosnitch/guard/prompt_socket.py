"""The unix socket prompt clients speak over (`picosnitch prompt`, the dashboard).

One JSON object a line, both ways:

    daemon -> client  {"type": "prompts", "prompts": [{...}, ...]}   on connecting, and whenever
                                                                     the list changes
                      {"type": "answered", "id": 3}  /  {"type": "error", "message": "..."}
    client -> daemon  {"type": "answer", "id": 3, "action": "allow", "duration": "once",
                       "any_port": false, "whole_domain": false, "any_program": false}

`duration` is "once", "restart", "forever" or a number of minutes ("9"). The socket is
/run/picosnitch/guard.sock, mode 0660, owned by root and by the group named in config.json's
"Guard prompt group" ("" keeps it to root): whoever may connect may allow connections.
"""

from __future__ import annotations

import json
import os
import select
import socket
import stat
from pathlib import Path
from typing import Iterator, List, Tuple

SOCKET_MODE = 0o660
MAX_CLIENTS = 16
MAX_LINE = 65536


class PromptServer:
    def __init__(self, path: str | os.PathLike, gid: int = 0):
        self.path = Path(path)
        try:
            if stat.S_ISSOCK(os.lstat(self.path).st_mode):
                os.unlink(self.path)
        except FileNotFoundError:
            pass
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)
        try:
            self.listener.bind(str(self.path))
        finally:
            os.umask(old_umask)
        if os.geteuid() == 0:
            os.chown(self.path, 0, gid)
        os.chmod(self.path, SOCKET_MODE if gid else 0o600)
        self.listener.listen(16)
        self.listener.setblocking(False)
        self.clients: List[socket.socket] = []
        self.buffers: dict = {}

    def fileno(self) -> int:
        return self.listener.fileno()

    def accept(self) -> List[socket.socket]:
        """The clients that just connected."""
        new: List[socket.socket] = []
        while True:
            try:
                client, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return new
            if len(self.clients) >= MAX_CLIENTS:
                client.close()
                continue
            client.setblocking(False)
            self.clients.append(client)
            self.buffers[client] = b""
            new.append(client)

    def read(self, client: socket.socket) -> Iterator[dict]:
        """The messages a client sent (it is dropped when it closes or talks nonsense)."""
        try:
            data = client.recv(MAX_LINE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self.drop(client)
            return
        buffer = self.buffers[client] + data
        *lines, rest = buffer.split(b"\n")
        if len(rest) > MAX_LINE:
            self.drop(client)
            return
        self.buffers[client] = rest
        for line in lines:
            try:
                message = json.loads(line)
            except ValueError:
                continue
            if isinstance(message, dict):
                yield message

    def send(self, client: socket.socket, message: dict) -> None:
        line = (json.dumps(message, separators=(",", ":")) + "\n").encode("ascii")
        try:
            if client.send(line) == len(line):
                return
        except OSError:
            pass
        self.drop(client)  # gone, or too slow to take a whole line

    def broadcast(self, message: dict) -> None:
        for client in list(self.clients):
            self.send(client, message)

    def drop(self, client: socket.socket) -> None:
        if client in self.clients:
            self.clients.remove(client)
            self.buffers.pop(client, None)
        client.close()

    def close(self) -> None:
        for client in list(self.clients):
            self.drop(client)
        self.listener.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


class PromptClient:
    """The client side: connect, read the prompt list, send answers."""

    def __init__(self, path: str | os.PathLike, timeout: float = 5.0):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.buffer = b""

    def fileno(self) -> int:
        return self.sock.fileno()

    def messages(self, block: bool = True) -> List[dict]:
        """What the daemon sent (with `block`, waits for at least one line); raises EOFError
        when the daemon closed the connection."""
        out: List[dict] = []
        while True:
            if (out or not block) and not select.select([self.sock], [], [], 0)[0]:
                return out
            data = self.sock.recv(1 << 20)
            if not data:
                raise EOFError("the daemon closed the prompt socket")
            *lines, self.buffer = (self.buffer + data).split(b"\n")
            out += [json.loads(line) for line in lines if line.strip()]

    def answer(self, prompt_id: int, action: str, duration: str = "once", **options: bool) -> None:
        message = {"type": "answer", "id": prompt_id, "action": action, "duration": duration, **options}
        self.sock.sendall((json.dumps(message) + "\n").encode())

    def close(self) -> None:
        self.sock.close()


def latest_prompts(messages: List[dict]) -> Tuple[bool, list]:
    """(whether a prompt list came, the last list) among `messages`."""
    lists = [m["prompts"] for m in messages if m.get("type") == "prompts"]
    return (bool(lists), lists[-1] if lists else [])
