"""Guard mode names the program behind a held connection from the kernel's socket owners, and only
while that process still runs the executable it ran when it used the socket."""

import ctypes
import os
import socket
import subprocess
import sys

import pytest

from picosnitch.guard.sockets import OwnerMap, ProgramFinder
from picosnitch.kernel.records import SocketOwner

SO_COOKIE = 57

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: loads BPF programs")

CLIENT = """
import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
print(s.getsockname()[1], int.from_bytes(s.getsockopt(socket.SOL_SOCKET, 57, 8), "little"), flush=True)
sys.stdin.read()
"""


@pytest.fixture
def finder():
    found = ProgramFinder(owner_map=OwnerMap())
    yield found
    found.close()


@pytest.fixture
def client():
    """A process holding a connection to a listener here: (process, listener, its port, its cookie)."""
    listener = socket.create_server(("127.0.0.1", 0))
    proc = subprocess.Popen([sys.executable, "-c", CLIENT, str(listener.getsockname()[1])],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    lport, cookie = map(int, proc.stdout.readline().split())
    yield proc, listener, lport, cookie
    proc.stdin.close()
    proc.wait(10)
    listener.close()


def test_the_program_of_a_connection_comes_from_the_kernels_socket_owners(finder, client):
    proc, listener, lport, cookie = client
    program = finder.find(socket.AF_INET, socket.IPPROTO_TCP, "127.0.0.1", lport, "127.0.0.1",
                          listener.getsockname()[1])
    assert finder._mapped_owner(cookie) == proc.pid  # without searching /proc
    assert program.pid == proc.pid and program.exe == os.path.realpath(sys.executable)


def test_an_owner_whose_process_now_runs_another_executable_is_not_believed(finder, client):
    proc, listener, lport, cookie = client
    forged = SocketOwner(tgid=proc.pid, uid=0, exe_ino=1, exe_dev=1)  # not what the process runs
    finder.owner_map.map.update(ctypes.c_uint64(cookie), forged)
    assert finder._mapped_owner(cookie) == 0
    program = finder.find(socket.AF_INET, socket.IPPROTO_TCP, "127.0.0.1", lport, "127.0.0.1",
                          listener.getsockname()[1])
    assert program.pid == proc.pid  # found the slow way, through /proc
