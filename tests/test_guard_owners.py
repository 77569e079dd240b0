"""Guard mode names the program behind a held connection from the kernel's socket owners, and only
while that process still runs the executable it ran when it used the socket."""

import ctypes
import os
import socket
import subprocess
import sys

import pytest

from picosnitch.guard.sockets import OwnerMap, ProgramFinder
from picosnitch.kernel.records import ConnectionKey, SocketOwner

SO_COOKIE = 57

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: loads BPF programs")

CLIENT = """
import socket, struct, sys
host, port, source_port = sys.argv[2] if len(sys.argv) > 2 else "127.0.0.1", int(sys.argv[1]), 0
if len(sys.argv) > 3:
    source_port = int(sys.argv[3])
s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close with a reset
s.bind(("::" if ":" in host else "0.0.0.0", source_port))  # port 0: one no other socket's reuse rules refuse
s.connect((host, port))
print(s.getsockname()[1], int.from_bytes(s.getsockopt(socket.SOL_SOCKET, 57, 8), "little"), flush=True)
sys.stdin.read()
"""


@pytest.fixture
def finder():
    found = ProgramFinder(owner_map=OwnerMap())
    yield found
    found.close()


def connect(port, host="127.0.0.1", source_port=0, program=sys.executable):
    """A process that connects to host:port and holds the connection until its stdin closes:
    (process, its local port, its socket's cookie)."""
    proc = subprocess.Popen([program, "-c", CLIENT, str(port), host, str(source_port)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    lport, cookie = map(int, proc.stdout.readline().split())
    return proc, lport, cookie


def hang_up(proc):
    proc.stdin.close()
    proc.wait(10)


@pytest.fixture
def client():
    """A process holding a connection to a listener here: (process, listener, its port, its cookie)."""
    listener = socket.create_server(("127.0.0.1", 0))
    proc, lport, cookie = connect(listener.getsockname()[1])
    yield proc, listener, lport, cookie
    hang_up(proc)
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


def test_an_outgoing_connection_is_found_by_what_its_first_packet_carries(finder, client):
    # The SYN's addresses and ports name the owner directly: no sock_diag round trip (its socket
    # is closed here, so nothing could be found that way).
    proc, listener, lport, _cookie = client
    finder.diag.close()
    program = finder.find(socket.AF_INET, socket.IPPROTO_TCP, "127.0.0.1", lport, "127.0.0.1",
                          listener.getsockname()[1], outgoing=True)
    assert program.pid == proc.pid and program.exe == os.path.realpath(sys.executable)


@pytest.mark.parametrize("listen, connect_to, family, address", [
    ("::1", "::1", socket.AF_INET6, "::1"),
    ("0.0.0.0", "::ffff:127.0.0.1", socket.AF_INET, "127.0.0.1"),  # an IPv6 socket sends IPv4 packets
])
def test_ipv6_and_ipv4_mapped_connections_are_filed_as_their_packets_look(finder, listen, connect_to, family,
                                                                         address):
    listener = socket.create_server((listen, 0), family=socket.AF_INET6 if ":" in listen else socket.AF_INET)
    proc, lport, _cookie = connect(listener.getsockname()[1], connect_to)
    try:
        owner = finder.owner_map.connection_owner(family, address, lport, address, listener.getsockname()[1])
        assert owner is not None and owner.tgid == proc.pid
    finally:
        hang_up(proc)
        listener.close()


def test_a_reused_address_and_port_name_the_socket_that_connects_now(finder):
    # The first process connects from a port and hangs up with a reset; a second process binds
    # the same port and connects to the same listener: the same addresses and ports, its owner.
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    first, lport, _ = connect(port)
    listener.accept()[0].close()
    hang_up(first)
    second, same_port, _ = connect(port, source_port=lport)
    try:
        assert same_port == lport
        owner = finder.owner_map.connection_owner(socket.AF_INET, "127.0.0.1", lport, "127.0.0.1", port)
        assert owner is not None and owner.tgid == second.pid
    finally:
        hang_up(second)
        listener.close()


def test_a_connection_whose_owner_now_runs_another_executable_is_looked_up_the_slow_way(finder, client):
    proc, listener, lport, _cookie = client
    key_args = (socket.AF_INET, "127.0.0.1", lport, "127.0.0.1", listener.getsockname()[1])
    assert finder.owner_map.connection_owner(*key_args).tgid == proc.pid
    key = ConnectionKey(family=socket.AF_INET, lport=lport, rport=listener.getsockname()[1])
    key.laddr[:4] = key.raddr[:4] = socket.inet_aton("127.0.0.1")
    forged = SocketOwner(tgid=proc.pid, uid=0, exe_ino=1, exe_dev=1)  # not what the process runs
    finder.owner_map.connections.update(key, forged)
    program = finder.find(socket.AF_INET, socket.IPPROTO_TCP, *key_args[1:], outgoing=True)
    assert program.pid == proc.pid  # through sock_diag and the owner by cookie instead


def test_without_the_program_that_files_connections_by_their_syn_owners_come_through_sock_diag(client):
    # What a kernel that refuses the sockops program gets: the owners by cookie alone.
    finder = ProgramFinder(owner_map=OwnerMap(by_syn=False))
    owners = finder.owner_map
    try:
        _proc, listener, _lport, _cookie = client
        later, later_port, later_cookie = connect(listener.getsockname()[1])  # connects with it loaded
        assert owners.connection_owner(socket.AF_INET, "127.0.0.1", later_port, "127.0.0.1",
                                       listener.getsockname()[1]) is None
        assert finder._mapped_owner(later_cookie) == later.pid
        program = finder.find(socket.AF_INET, socket.IPPROTO_TCP, "127.0.0.1", later_port, "127.0.0.1",
                              listener.getsockname()[1], outgoing=True)
        assert program.pid == later.pid
        hang_up(later)
    finally:
        finder.close()
