"""The kernel monitor against real traffic: exact application bytes, on the right process.

Every generator counts its own bytes (tests/traffic_gen.py, tests/c/netops.c); the monitor must
report exactly those counts for the generator's pid, over loopback and over a veth pair into a
network namespace the tests create.
"""

import contextlib
import ctypes
import json
import os
import resource
import select
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import Recorder, kernel_has
from netlab import HOST4, PEER4, PEER6, TcpPeer, UdpEcho

import picosnitch.kernel.records
from picosnitch.identity import interpreters
from picosnitch.kernel import libbpf
from picosnitch.kernel.monitor import (
    KernelFeatures,
    KernelMonitor,
    MonitorError,
    cgroup2_root,
    check_boundary,
    default_object_path,
    plan,
)
from picosnitch.kernel.pins import ExecPinner

GEN = str(Path(__file__).parent / "traffic_gen.py")
AF = {4: socket.AF_INET, 6: socket.AF_INET6}

# (where the peer listens, whether it is inside the lab namespace)
ENDPOINTS = {
    "loopback4": ("127.0.0.1", False),
    "loopback6": ("::1", False),
    "veth4": (PEER4, True),
    "veth6": (PEER6, True),
}


def generate(*args, prefix=()):
    """Runs a generator to completion; returns (pid, its own byte counts)."""
    proc = subprocess.Popen([*prefix, *args], stdout=subprocess.PIPE, text=True)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    return proc.pid, json.loads(out.strip().splitlines()[-1])


def serve(lab, server, inside):
    """Starts a peer server in the lab namespace (inside) or on the host; waits until it listens."""
    if inside:
        thread = lab.in_peer(server.serve)
    else:
        thread = threading.Thread(target=server.serve, daemon=True)
        thread.start()
    assert server.ready.wait(5)
    return thread


def family(host):
    return socket.AF_INET6 if ":" in host else socket.AF_INET


@pytest.fixture(params=sorted(ENDPOINTS))
def endpoint(request):
    return ENDPOINTS[request.param]


def test_tcp_bytes_are_exact_both_ways(recorder, lab, endpoint):
    host, inside = endpoint
    peer = TcpPeer(host, reply=300_000)
    thread = serve(lab, peer, inside)
    pid, counts = generate(sys.executable, GEN, "tcp", host, str(peer.port), "1000000")
    thread.join(5)

    totals = recorder.totals(pid)
    sent, recv, packets_sent, packets_recv = totals[(family(host), socket.IPPROTO_TCP, host, peer.port)]
    assert (sent, recv) == (counts["sent"], counts["recv"]) == (1_000_000, 300_000)
    assert packets_sent >= 1 and packets_recv >= 1


@pytest.mark.parametrize("receive", ["recv", "recvfrom"])
def test_connected_udp_bytes_are_exact(recorder, lab, endpoint, receive):
    host, inside = endpoint
    echo = UdpEcho(host)
    serve(lab, echo, inside)
    pid, counts = generate(sys.executable, GEN, "udp-connected", host, str(echo.port), "50", "1000", receive)
    echo.stop()

    assert recorder.totals(pid) == {
        (family(host), socket.IPPROTO_UDP, host, echo.port): [50_000, 50_000, 50, 50]}
    assert counts == {"sent": 50_000, "recv": 50_000}


def test_unconnected_udp_is_charged_to_the_real_peer(recorder, lab, endpoint):
    host, inside = endpoint
    echo = UdpEcho(host)
    serve(lab, echo, inside)
    pid, counts = generate(sys.executable, GEN, "udp-unconnected", host, str(echo.port), "20", "500")
    echo.stop()

    assert counts["peers"] == [host]
    assert recorder.totals(pid) == {
        (family(host), socket.IPPROTO_UDP, host, echo.port): [10_000, 10_000, 20, 20]}


@pytest.mark.parametrize("host,inside", [("127.0.0.1", False), (PEER6, True)])
def test_threads_sharing_an_unconnected_udp_socket_keep_their_own_peers(recorder, lab, netops, host, inside):
    # three threads each way: more than a socket's two counter slots, fewer than its peer slots
    echoes = [UdpEcho(host) for _ in range(3)]
    for echo in echoes:
        serve(lab, echo, inside)
    pid, counts = generate(netops, "udp-threads", host, "3", "3000", *(str(e.port) for e in echoes))
    for echo in echoes:
        echo.stop()

    totals = recorder.totals(pid)
    assert {key: value[:2] for key, value in totals.items()} == {
        (family(host), socket.IPPROTO_UDP, host, int(port)): sent_recv
        for port, sent_recv in counts["peers"].items()}
    assert counts["sent"] == 3000 * (40 + 60 + 80)


@pytest.mark.parametrize("host,inside", [("127.0.0.1", False), (PEER4, True)])
def test_sendfile_is_counted(recorder, lab, host, inside):
    peer = TcpPeer(host)
    thread = serve(lab, peer, inside)
    pid, counts = generate(sys.executable, GEN, "sendfile", host, str(peer.port), "3000000")
    thread.join(5)

    assert counts["sent"] == peer.received == 3_000_000
    assert recorder.totals(pid)[(socket.AF_INET, socket.IPPROTO_TCP, host, peer.port)][:2] == [3_000_000, 0]


@pytest.mark.parametrize("host,inside", [("127.0.0.1", False), (PEER6, True)])
def test_splice_from_a_socket_into_a_pipe_is_counted(recorder, lab, host, inside):
    peer = TcpPeer(host, reply=2_500_000)
    thread = serve(lab, peer, inside)
    pid, counts = generate(sys.executable, GEN, "splice", host, str(peer.port))
    thread.join(5)

    assert counts["recv"] == 2_500_000
    assert recorder.totals(pid)[(family(host), socket.IPPROTO_TCP, host, peer.port)][:2] == [0, 2_500_000]


@pytest.mark.parametrize("host,inside", [("127.0.0.1", False), (PEER4, True), (PEER6, True)])
def test_sendmmsg_and_recvmmsg_are_counted(recorder, lab, netops, host, inside):
    echo = UdpEcho(host)
    serve(lab, echo, inside)
    pid, counts = generate(netops, "mmsg", host, str(echo.port), "32", "700")
    echo.stop()

    assert counts == {"sent": 32 * 700, "recv": 32 * 700}
    assert recorder.totals(pid) == {(family(host), socket.IPPROTO_UDP, host, echo.port): [22_400, 22_400, 32, 32]}


@pytest.mark.parametrize("host,inside", [("127.0.0.1", False), (PEER4, True)])
def test_io_uring_send_and_recv_are_counted(recorder, lab, netops, host, inside):
    peer = TcpPeer(host, reply=400_000)
    thread = serve(lab, peer, inside)
    pid, counts = generate(netops, "uring", host, str(peer.port), "900000")
    thread.join(5)

    assert counts == {"sent": 900_000, "recv": 400_000}
    assert recorder.totals(pid)[(socket.AF_INET, socket.IPPROTO_TCP, host, peer.port)][:2] == [900_000, 400_000]


def test_unix_and_netlink_sockets_are_not_counted(recorder):
    noop_with_ack = "struct.pack('=IHHII', 16, 1, 5, 1, 0)"  # nlmsghdr: NLMSG_NOOP, NLM_F_REQUEST | NLM_F_ACK
    script = ("import socket, struct; a, b = socket.socketpair(); a.sendall(b'u' * 5000); b.recv(8192); "
              "d, e = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM); d.send(b'v' * 300); e.recv(512); "
              f"n = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW); n.sendto({noop_with_ack}, (0, 0)); "
              "n.recv(512); print('{}')")
    pid, _ = generate(sys.executable, "-c", script)

    assert recorder.flows(pid) == []


def test_icmp_ping_socket_is_counted_in_its_namespace(recorder, lab):
    pid, counts = generate(sys.executable, GEN, "ping", HOST4, "10", "56", prefix=lab.prefix())

    flows = recorder.flows(pid)
    assert sum(f.bytes_sent for f in flows) == counts["sent"] == 10 * 64
    assert sum(f.bytes_recv for f in flows) == counts["recv"] == 10 * 64
    assert {(f.family, f.protocol) for f in flows} == {(socket.AF_INET, socket.IPPROTO_ICMP)}
    assert {f.netns for f in flows} == {os.stat(f"/run/netns/{lab.ns}").st_ino}


def test_raw_ip_socket_is_counted(recorder, lab):
    pid, counts = generate(sys.executable, GEN, "raw", PEER4, "25", "300")

    assert counts["sent"] == 25 * 300
    flows = recorder.flows(pid)
    assert {(f.family, f.protocol, f.lport, f.rport) for f in flows} == {(socket.AF_INET, 253, 0, 0)}
    assert sum(f.bytes_sent for f in flows) == 7_500


def test_af_packet_frames_are_counted_both_ways(recorder, lab):
    receiver = subprocess.Popen([*lab.prefix(), sys.executable, GEN, "packet-recv", lab.peer_if, "40"],
                                stdout=subprocess.PIPE, text=True)
    assert receiver.stdout.readline().strip() == "ready"
    pid, counts = generate(sys.executable, GEN, "packet-send", lab.host_if, "40", "200")
    received = json.loads(receiver.communicate(timeout=20)[0].strip().splitlines()[-1])

    frame = 14 + 200
    assert counts["sent"] == received["recv"] == 40 * frame
    sender = recorder.flows(pid)
    assert {(f.family, f.protocol) for f in sender} == {(socket.AF_PACKET, 0x88B5)}
    assert sum(f.bytes_sent for f in sender) == 40 * frame
    assert sum(f.bytes_recv for f in recorder.flows(receiver.pid)) == 40 * frame


def test_renamed_process_is_tied_to_its_executable(recorder, lab):
    peer = TcpPeer(PEER4)
    thread = serve(lab, peer, True)
    pid, _ = generate(sys.executable, GEN, "renamed-tcp", "innocent", PEER4, str(peer.port), "12345")
    thread.join(5)

    exe = os.stat(os.path.realpath(sys.executable))
    flows = recorder.flows(pid)
    assert {(f.exe_dev, f.exe_ino) for f in flows} == {(exe.st_dev, exe.st_ino)}
    assert sum(f.bytes_sent for f in flows) == 12_345
    assert {f.comm for f in flows} == {"innocent"}  # the name it had when it sent, not its exec name


def test_flows_name_the_exec_they_came_from_not_the_fork_before_it(recorder, lab):
    echo = UdpEcho(PEER4)
    serve(lab, echo, True)
    pid, counts = generate(sys.executable, GEN, "exec-children", PEER4, str(echo.port), "10")
    echo.stop()

    recorder.settle()
    (parent_exec,) = recorder.of("exec", pid)
    assert {f.exec_id for f in recorder.of("flow", pid)} == {parent_exec.exec_id}
    for child, size in counts["children"]:  # the same binary as the parent, each with its own argv
        (child_exec,) = recorder.of("exec", child)
        assert child_exec.exec_id != parent_exec.exec_id and child_exec.argv[-1] == str(size)
        flows = recorder.of("flow", child)
        assert {f.exec_id for f in flows} == {child_exec.exec_id}
        assert sum(f.bytes_sent for f in flows) == size
    forked = recorder.of("flow", counts["forked"])  # forked, never exec'd: still the parent's image
    assert {f.exec_id for f in forked} == {parent_exec.exec_id} and sum(f.bytes_sent for f in forked) == 999


def test_short_lived_process_is_attributed_with_argv_and_executable(recorder, lab, netops):
    peer = TcpPeer(PEER4)
    thread = serve(lab, peer, True)
    pid, counts = generate(netops, "quick", PEER4, str(peer.port), "4321")
    thread.join(5)

    recorder.settle()
    (exec_event,) = recorder.of("exec", pid)
    exe = os.stat(netops)
    assert exec_event.argv == (netops, "quick", PEER4, str(peer.port), "4321")
    assert (exec_event.exe_dev, exec_event.exe_ino) == (exe.st_dev, exe.st_ino)
    assert exec_event.filename == netops and exec_event.ppid == os.getpid()
    flows = recorder.flows(pid)
    assert {(f.exe_dev, f.exe_ino) for f in flows} == {(exe.st_dev, exe.st_ino)}
    assert sum(f.bytes_sent for f in flows) == counts["sent"] == 4321
    assert recorder.of("exit", pid)


def test_child_is_charged_for_its_own_sends_on_an_inherited_socket(recorder, lab):
    echo = UdpEcho(PEER4)
    serve(lab, echo, True)
    pid, counts = generate(sys.executable, GEN, "fork-inherit", PEER4, str(echo.port), "3000", "7000")
    echo.stop()

    key = (socket.AF_INET, socket.IPPROTO_UDP, PEER4, echo.port)
    assert recorder.totals(pid)[key][0] == 3000
    assert recorder.totals(counts["child"])[key][0] == 7000
    (fork,) = recorder.of("fork", counts["child"])
    assert fork.ppid == pid


class Port53:
    """A UDP and a TCP echo on port 53 of a lab address, run in the lab namespace's threads."""

    def __init__(self, host):
        self.host, self.port = host, 53
        self.ready, self.stopped = threading.Event(), threading.Event()

    def serve(self):
        udp = socket.socket(family(self.host), socket.SOCK_DGRAM)
        tcp = socket.socket(family(self.host), socket.SOCK_STREAM)
        udp.bind((self.host, 53))
        tcp.bind((self.host, 53))
        tcp.listen()
        udp.settimeout(0.1)
        tcp.settimeout(0.1)
        self.ready.set()
        while not self.stopped.is_set():
            try:
                data, peer = udp.recvfrom(4096)
                udp.sendto(data, peer)
            except socket.timeout:
                pass
            try:
                conn, _ = tcp.accept()
            except socket.timeout:
                continue
            with conn:
                conn.sendall(conn.recv(4096))
        udp.close()
        tcp.close()


@pytest.fixture(scope="module")
def port53(lab):
    server = Port53(PEER4)
    serve(lab, server, True)
    yield server
    server.stopped.set()


@pytest.mark.parametrize("how", ["recv", "recvfrom", "recvmsg", "tcp"])
def test_what_a_process_receives_from_port_53_reaches_user_space_as_received(recorder, port53, how):
    pid, counts = generate(sys.executable, GEN, "dns-ask", PEER4, "53", how)

    recorder.settle()
    (answer,) = [p for p in recorder.of("payload", pid) if p.what == "dns_answer"]
    assert answer.data == bytes.fromhex(counts["answer"])  # TCP: with its 2-byte length prefix
    assert (answer.raddr, answer.rport, answer.protocol) == (PEER4, 53, socket.IPPROTO_TCP if how == "tcp" else
                                                            socket.IPPROTO_UDP)
    assert answer.comm == "python3" or answer.comm.startswith("python")


def test_with_names_from_traffic_off_nothing_a_process_sends_or_receives_is_read(port53, lab):
    monitor = KernelMonitor(names_from_traffic=False)
    try:
        monitor.start()
        rec = Recorder(monitor)
        peer = TcpPeer(PEER4)
        thread = serve(lab, peer, True)
        asked, _ = generate(sys.executable, GEN, "dns-ask", PEER4, "53", "recvfrom")
        sent, _ = generate(sys.executable, GEN, "first-send", PEER4, str(peer.port), "http")
        thread.join(5)
        rec.settle()
        assert rec.of("payload", asked) == [] and rec.of("payload", sent) == []
        assert rec.totals(asked) and rec.totals(sent)  # the bytes are still counted
    finally:
        rec.close()


@pytest.mark.parametrize("how,starts", [("tls", b"\x16\x03"), ("http", b"GET / HTTP/1.1\r\nHost: http.")])
def test_a_tcp_connections_first_send_reaches_user_space_if_it_may_name_the_server(recorder, lab, how, starts):
    peer = TcpPeer(PEER4)
    thread = serve(lab, peer, True)
    pid, _ = generate(sys.executable, GEN, "first-send", PEER4, str(peer.port), how)
    thread.join(5)

    recorder.settle()
    (first,) = recorder.of("payload", pid)  # the first send only, never the second
    assert first.what == "first_send" and first.data.startswith(starts)
    assert (b"tls.picosnitch.test" if how == "tls" else b"http.picosnitch.test") in first.data
    assert (first.raddr, first.rport) == (PEER4, peer.port)


def test_a_first_send_that_names_no_server_stays_in_the_kernel(recorder, lab):
    peer = TcpPeer(PEER4)
    thread = serve(lab, peer, True)
    pid, _ = generate(sys.executable, GEN, "first-send", PEER4, str(peer.port), "plain")
    thread.join(5)

    recorder.settle()
    assert recorder.of("payload", pid) == []  # not even the HTTP request it sent second


def test_getaddrinfo_of_a_name_from_etc_hosts_is_reported(recorder, tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n10.231.7.7 picosnitch-test.example\nfd00:5e:7::7 picosnitch-test.example\n")
    script = "import socket; socket.getaddrinfo('picosnitch-test.example', 443)"
    pid, _ = generate("unshare", "--mount", "--propagation", "private", "sh", "-c",
                      f"mount --bind {hosts} /etc/hosts && exec {sys.executable} -c \"{script}; print('{{}}')\"")

    recorder.settle()
    answers = [d for d in recorder.of("dns", pid) if d.name == "picosnitch-test.example"]
    assert answers and set(answers[0].addresses) == {"10.231.7.7", "fd00:5e:7::7"}


def test_the_running_kernel_gets_the_programs_its_features_call_for(recorder):
    attached = set(recorder.monitor.attached)
    if kernel_has(tracepoint="sock_send_length"):  # 6.3 and later
        assert {"sock_send_length", "sock_recv_length"} <= attached
        assert not attached & {"inet_sendmsg_exit", "inet_recvmsg_exit"}
    else:
        assert {"inet_sendmsg_exit", "inet6_sendmsg_exit", "inet_recvmsg_exit", "inet6_recvmsg_exit",
                "packet_sendmsg_exit", "packet_recvmsg_exit"} <= attached
        assert ("inet_sendpage_exit" in attached) == kernel_has(function="inet_sendpage")  # before 6.5
    if kernel_has(kfunc="bpf_rdonly_cast"):  # 6.2 and later
        assert "tcp_rcv_space_adjust" in attached and "tcp_rcv_space_adjust_compat" not in attached
    else:
        assert "tcp_rcv_space_adjust_compat" in attached and "tcp_rcv_space_adjust" not in attached
    assert "sock_release" in attached
    assert recorder.monitor.loads == 1


PROGRAMS = {"sock_send_length": "tp_btf/sock_send_length", "sock_recv_length": "tp_btf/sock_recv_length",
            "inet_sendmsg_exit": "fexit/inet_sendmsg", "inet_sendpage_exit": "fexit/inet_sendpage",
            "packet_sendmsg_exit": "fexit/packet_sendmsg", "tcp_rcv_space_adjust": "tp_btf/tcp_rcv_space_adjust",
            "tcp_rcv_space_adjust_compat": "tp_btf/tcp_rcv_space_adjust", "sock_release": "cgroup/sock_release"}
EVERY_TRACEPOINT = frozenset({"sock_send_length", "sock_recv_length", "tcp_rcv_space_adjust"})


FEXIT_TARGETS = frozenset({"inet_sendmsg", "inet_sendpage", "packet_sendmsg"})
FALLBACK = {"inet_sendmsg_exit", "inet_sendpage_exit", "packet_sendmsg_exit"}


@pytest.mark.parametrize("kernel,features,left_out", [
    ("6.5 and later", KernelFeatures(EVERY_TRACEPOINT, frozenset({"bpf_rdonly_cast"}), None,
                                     FEXIT_TARGETS - {"inet_sendpage"}), FALLBACK | {"tcp_rcv_space_adjust_compat"}),
    ("6.3", KernelFeatures(EVERY_TRACEPOINT, frozenset({"bpf_rdonly_cast"}), None, FEXIT_TARGETS),
     FALLBACK | {"tcp_rcv_space_adjust_compat"}),
    ("6.2", KernelFeatures(frozenset({"tcp_rcv_space_adjust"}), frozenset({"bpf_rdonly_cast"}), True, FEXIT_TARGETS),
     {"sock_send_length", "sock_recv_length", "tcp_rcv_space_adjust_compat"}),
    ("6.1", KernelFeatures(frozenset({"tcp_rcv_space_adjust"}), frozenset(), True, FEXIT_TARGETS),
     {"sock_send_length", "sock_recv_length", "tcp_rcv_space_adjust"}),
    ("no sock tracepoints, no trampolines", KernelFeatures(frozenset({"tcp_rcv_space_adjust"}), frozenset(), False),
     {"sock_send_length", "sock_recv_length", "tcp_rcv_space_adjust"} | FALLBACK),
])
def test_the_plan_leaves_out_what_each_kernel_lacks_and_says_why(kernel, features, left_out):
    disabled = plan(PROGRAMS, features)
    assert set(disabled) == left_out
    assert all(reason for reason in disabled.values())


def object_programs() -> dict:
    obj = libbpf.BpfObject(default_object_path())
    try:
        return {prog.name: prog.section for prog in obj.programs()}
    finally:
        obj.close()


KERNEL_6_1 = KernelFeatures(frozenset({"tcp_rcv_space_adjust", "inet_sock_set_state", "sched_process_exec",
                                       "sched_process_fork", "sched_process_exit"}), frozenset(), True,
                            frozenset({"inet_sendmsg", "inet6_sendmsg", "inet_recvmsg", "inet6_recvmsg",
                                       "inet_sendpage", "packet_sendmsg", "packet_recvmsg"}))


def reported(disabled: dict) -> list:
    monitor = KernelMonitor()
    monitor._report_disabled(disabled)
    return [(d.consequence, d.reason) for d in monitor.degraded]


def test_on_6_1_a_refused_fallback_is_said_once_with_the_kernels_reason():
    disabled = plan(object_programs(), KERNEL_6_1)
    for prog in ("inet_sendmsg_exit", "inet6_sendmsg_exit", "inet_recvmsg_exit", "inet6_recvmsg_exit"):
        disabled[prog] = "the kernel refused inet_sendmsg_exit: R2 unbounded memory access"
    assert reported(disabled) == [("no traffic will be counted",
                                   "the kernel refused inet_sendmsg_exit: R2 unbounded memory access")]


def test_on_6_1_a_refused_stand_in_is_said_with_its_reason():
    disabled = plan(object_programs(), KERNEL_6_1)
    assert "not needed" in disabled["tcp_rcv_space_adjust"]  # no bpf_rdonly_cast before 6.2
    disabled["tcp_rcv_space_adjust_compat"] = "the kernel refused tcp_rcv_space_adjust_compat: -22"
    disabled["inet_sock_set_state"] = "the kernel refused tcp_rcv_space_adjust_compat: -22"
    assert reported(disabled) == [("TCP data received with splice() will not be counted",
                                   "the kernel refused tcp_rcv_space_adjust_compat: -22")]


def test_on_6_1_nothing_is_left_out():
    assert reported(plan(object_programs(), KERNEL_6_1)) == []


def test_the_ctypes_mirrors_match_the_objects_btf():
    obj = libbpf.BpfObject(default_object_path())
    try:
        check_boundary(obj)  # raises on any difference in a struct's size or a field's offset
    finally:
        obj.close()


def test_an_object_that_disagrees_with_the_mirrors_is_refused_with_a_sentence(monkeypatch):
    class Drifted(ctypes.Structure):  # flow_key with a field it no longer has
        _fields_ = [("tgid", ctypes.c_uint32), ("ppid", ctypes.c_uint32), ("uid", ctypes.c_uint32)]

    monkeypatch.setitem(picosnitch.kernel.records.MIRRORS, "flow_key", Drifted)
    monitor = KernelMonitor()
    try:
        with pytest.raises(MonitorError, match="does not match this version of picosnitch .*struct flow_key"):
            monitor.start()
    finally:
        monitor.close()


MUSL_LIBC = "/usr/lib/x86_64-linux-musl/libc.so"


@pytest.mark.skipif(not shutil.which("musl-gcc") or not os.path.exists(MUSL_LIBC),
                    reason="needs musl-tools (scripts/install-system-deps.sh test)")
def test_getaddrinfo_in_another_root_with_its_own_c_library_is_reported(recorder, tmp_path):
    # A root of its own, as a container has: musl's C library (a file the host does not use) and
    # a program linked against it, run in its own mount and network namespaces.
    root = tmp_path / "root"
    (root / "lib").mkdir(parents=True)
    (root / "etc").mkdir()
    shutil.copy(MUSL_LIBC, root / "lib" / "ld-musl-x86_64.so.1")
    (root / "etc" / "hosts").write_text("10.231.8.8 musl-root.picosnitch.test\n")
    subprocess.run(["musl-gcc", "-O2", "-o", str(root / "gai"), str(Path(__file__).parent / "c" / "gai.c")],
                   check=True)
    # It resolves half a second after its exec: a root is probed when a process first execs in it.
    pid, out = generate("unshare", "--mount", "--net", f"--root={root}", "/gai", "musl-root.picosnitch.test", "0.5")

    assert out["address"] == "10.231.8.8"
    recorder.settle()
    (lookup,) = [d for d in recorder.of("dns", pid) if d.name == "musl-root.picosnitch.test"]
    assert lookup.addresses == ("10.231.8.8",)


def test_a_monitor_behind_its_receiver_sleeps_until_the_receiver_reads():
    # The monitor waits on its ring buffer and, while its outbox holds anything, on the receiver's
    # socket: it neither spins on a full socket nor waits for the next ring event to go on.
    reader, sender = _full_socketpair()
    monitor = KernelMonitor()
    try:
        monitor.start()
        start, wakes = time.monotonic(), 0
        while time.monotonic() - start < 1:
            monitor.poll(1, sender.fileno())
            wakes += 1
        # 6-23 on a busy machine (every exec, fork and exit anywhere is a ring event); polling
        # every 10 ms, as it did before, is 100.
        assert wakes < 60, f"{wakes} wake-ups in one second on a full socket: it polls or spins"

        reading = _drain_in(0.3, reader)
        start = time.monotonic()
        while not _writable(sender) and time.monotonic() - start < 5:
            monitor.poll(5, sender.fileno())
        reading.join()
        assert 0.25 < time.monotonic() - start < 4, "not woken when the receiver had read (it waited 5 s)"
    finally:
        monitor.close()
        reader.close()
        sender.close()


def _writable(sock) -> bool:
    return bool(select.select([], [sock], [], 0)[1])


def _full_socketpair():
    """(reader, sender): a SOCK_SEQPACKET pair whose sender's socket can take nothing more."""
    reader, sender = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sender.setblocking(False)
    with pytest.raises(BlockingIOError):
        while True:
            sender.send(b"r" * 60_000)
    return reader, sender


def _drain_in(seconds: float, reader) -> threading.Thread:
    """Reads everything `reader` holds, `seconds` from now, in a thread (join it before closing)."""
    def drain():
        reader.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            while True:
                reader.recv(65536)

    timer = threading.Timer(seconds, drain)
    timer.start()
    return timer


class _SilentRing:
    """A BPF ring buffer map no program writes to: a wait on it ends only by its timeout or by
    the socket it also waits on."""

    name = "silent"

    def __init__(self):
        create = libbpf.lib().bpf_map_create
        create.restype = ctypes.c_int
        create.argtypes = [ctypes.c_int, ctypes.c_char_p] + [ctypes.c_uint32] * 3 + [ctypes.c_void_p]
        self.fd = create(27, b"silent", 0, 0, os.sysconf("SC_PAGE_SIZE"), None)  # BPF_MAP_TYPE_RINGBUF
        assert self.fd >= 0, os.strerror(-self.fd)


def test_a_ring_wait_ends_when_the_socket_can_take_more_and_not_before():
    reader, sender = _full_socketpair()
    silent = _SilentRing()
    ring = libbpf.RingBuffer([silent], lambda sample: None)
    try:
        start = time.monotonic()
        ring.poll_or_writable(300, sender.fileno())
        assert 0.29 < time.monotonic() - start < 2, "a full socket ended the wait"

        reading = _drain_in(0.3, reader)
        start = time.monotonic()
        ring.poll_or_writable(5000, sender.fileno())
        reading.join()
        assert 0.29 < time.monotonic() - start < 4, "not woken when the receiver had read (it waited 5 s)"
        assert _writable(sender)
    finally:
        ring.close()
        os.close(silent.fd)
        reader.close()
        sender.close()


def exec_burst(ring_pages, runs):
    """Runs /bin/true `runs` times while nobody reads the ring; (the exec events that arrived for
    those runs, by the tag in their argv; the monitor's losses)."""
    monitor = KernelMonitor(ring_pages=ring_pages)
    try:
        monitor.start()
        subprocess.run(["sh", "-c", f"for i in $(seq {runs}); do /bin/true burst-$i; done"], check=True)
        received = monitor.poll(0.1)
        losses = {loss.what: loss.count for loss in monitor.losses()}
    finally:
        monitor.close()
    return {r.argv[-1] for r in received if r.kind == "exec" and r.argv[:1] == ("/bin/true",)}, losses


def test_a_tiny_ring_buffer_under_an_exec_storm_reports_its_losses():
    tags, losses = exec_burst(ring_pages=2, runs=200)
    assert losses.get("ringbuf_exec", 0) > 0
    assert len(tags) + losses["ringbuf_exec"] >= 200


def test_an_exec_costs_the_ring_buffer_only_the_bytes_it_uses():
    # 128 KiB of ring and nobody reading it meanwhile: 200 execs fit, as a burst must, where
    # records of the whole 6 KiB struct (two paths and 4 KiB of argv) fit about 20.
    tags, losses = exec_burst(ring_pages=32, runs=200)
    assert tags == {f"burst-{i}" for i in range(1, 201)}
    assert "ringbuf_exec" not in losses


def test_the_longest_paths_and_command_lines_come_through_whole_or_marked_truncated(recorder, tmp_path):
    # A script 511 bytes deep (the most a path field holds), run by an interpreter named in its #!
    # line, with a command line longer than the 4 KiB read at exec: each string keeps its place.
    deep = tmp_path
    while len(str(deep)) < 511 - 60:
        deep = deep / ("d" * 50)
    deep.mkdir(parents=True)
    script = deep / ("s" * (511 - len(str(deep)) - 1))
    script.write_text("#!/bin/sh\nexit 0\n")
    script.chmod(0o755)
    assert len(str(script)) == 511
    short = subprocess.Popen([str(script), "short"])
    long = subprocess.Popen([str(script), *["x" * 99] * 50])
    assert short.wait(10) == long.wait(10) == 0

    recorder.settle()
    (whole,) = recorder.of("exec", short.pid)
    assert (whole.filename, whole.path) == ("/bin/sh", str(script))
    assert whole.argv == ("/bin/sh", str(script), "short") and not whole.argv_truncated
    (cut,) = recorder.of("exec", long.pid)
    assert (cut.filename, cut.path) == ("/bin/sh", str(script))
    assert cut.argv_truncated and cut.argv[:2] == ("/bin/sh", str(script)) and cut.argv[2] == "x" * 99


def pinned_after_it_moved(tmp_path, back: bool):
    """The exec and Pinned records of `python3 job.py` started in tmp_path/start, as a monitor
    read only after the process had moved to tmp_path/elsewhere, where another job.py lies (and,
    with `back`, after it had come back as well)."""
    start, elsewhere = tmp_path / "start", tmp_path / "elsewhere"
    start.mkdir()
    elsewhere.mkdir()
    (start / "job.py").write_text("import os, sys\nos.chdir(sys.argv[1])\nprint('moved', flush=True)\n"
                                  "sys.stdin.readline()\nos.chdir(sys.argv[2])\nprint('back', flush=True)\n"
                                  "sys.stdin.readline()\n")
    (elsewhere / "job.py").write_text("print('a decoy with the same name')\n")
    monitor = KernelMonitor()
    monitor.pinner = ExecPinner(interpreters.classify)
    try:
        monitor.start()
        job = subprocess.Popen([sys.executable, "job.py", str(elsewhere), str(start)], cwd=start,
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert job.stdout.readline() == "moved\n"
        if back:
            job.stdin.write("\n")
            job.stdin.flush()
            assert job.stdout.readline() == "back\n"
        records = monitor.poll(0.1) + monitor.poll(0.1)
        job.communicate("\n", timeout=10)
    finally:
        monitor.pinner.close()
        monitor.close()
    (exec_record,) = [r for r in records if r.kind == "exec" and r.tgid == job.pid]
    (pinned,) = [r for r in records if r.kind == "pinned" and r.tgid == job.pid]
    return exec_record, pinned


def test_an_exec_read_after_the_process_exec_d_again_is_pinned_to_what_that_exec_ran():
    # Read late, /proc/PID/exe is already the second program: the first exec is pinned by its own
    # path, verified by inode, never as the program that came after it.
    monitor = KernelMonitor()
    monitor.pinner = ExecPinner(interpreters.classify)
    try:
        monitor.start()
        proc = subprocess.Popen([sys.executable, "-c", "import os; os.execv('/bin/sleep', ['sleep', '1'])"])
        deadline = time.monotonic() + 10
        while os.path.realpath(f"/proc/{proc.pid}/exe") != os.path.realpath("/bin/sleep"):
            assert time.monotonic() < deadline, "python did not exec sleep"
            time.sleep(0.01)
        records = monitor.poll(0.1) + monitor.poll(0.1)
        assert proc.wait(10) == 0
    finally:
        monitor.pinner.close()
        monitor.close()
    execs = {r.exec_id: r.filename for r in records if r.kind == "exec" and r.tgid == proc.pid}
    pinned = {r.exec_id: [(f.role, f.path) for f in r.files] for r in records if r.kind == "pinned" and r.tgid == proc.pid}
    first, second = sorted(execs)
    assert execs == {first: sys.executable, second: "/bin/sleep"}
    assert pinned == {first: [("exe", os.path.realpath(sys.executable))],
                      second: [("exe", os.path.realpath("/bin/sleep"))]}


def test_the_exec_record_names_the_cwd_and_root_the_process_started_in(tmp_path):
    exec_record, _ = pinned_after_it_moved(tmp_path, back=True)
    start, root = os.stat(tmp_path / "start"), os.stat("/")
    assert exec_record.cwd == (start.st_dev, start.st_ino)
    assert exec_record.root == (root.st_dev, root.st_ino)


def test_a_script_is_never_looked_for_where_its_process_went_after_exec(tmp_path):
    # Read late, the process's cwd is another directory with a job.py of its own: hashing that one
    # would give the program a wrong identity. The script is recorded as unknown, with why.
    _, pinned = pinned_after_it_moved(tmp_path, back=False)
    assert [f.role for f in pinned.files] == ["exe"]
    assert pinned.missed == (("script", "job.py", "its working directory was no longer the one it had at exec "
                                                   f"(it was {tmp_path / 'elsewhere'})"),)


def test_a_process_back_in_its_first_directory_has_its_script_pinned(tmp_path):
    # zsh names its cwd by walking up with chdir("..") and coming back: once back, all is well.
    _, pinned = pinned_after_it_moved(tmp_path, back=True)
    (script,) = [f for f in pinned.files if f.role == "script"]
    assert script.path == str(tmp_path / "start" / "job.py") and pinned.missed == ()


def test_when_cells_and_the_flow_map_are_full_the_dropped_flows_and_bytes_are_reported():
    monitor = KernelMonitor(flow_entries=64)  # 64 counter cells (63 usable) and 64 flow map entries
    try:
        monitor.start()
        receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        receiver.bind(("127.0.0.1", 0))
        senders = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(200)]
        for s in senders:  # 200 distinct flows (local ports): the cells and then the flow map run out
            s.sendto(b"z" * 100, receiver.getsockname())
        ours = [f for f in monitor.drain() + monitor.drain() if f.tgid == os.getpid() and f.bytes_sent]
        losses = {loss.what: loss.count for loss in monitor.losses()}
    finally:
        monitor.close()
    assert len(ours) <= 63 + 64
    assert losses["flow_map_full"] >= 200 - len(ours)  # other processes' flows may have been dropped too
    assert losses["flow_map_bytes"] >= 100 * (200 - len(ours))
    assert sum(f.bytes_sent for f in ours) == 100 * len(ours)


def test_more_flows_than_one_batch_of_the_flow_map_each_keep_their_own_key():
    # With 64 cells, these 3,000 flows go to the flow map, read 1,024 entries a syscall: each
    # flow must come out with its own key (once, the keys of an earlier batch were overwritten by
    # the next one's, and their bytes went to other flows: 20 % of a connection storm).
    monitor = KernelMonitor(cells=64)
    limits = resource.getrlimit(resource.RLIMIT_NOFILE)  # 1,024 in a guest: too few for 3,000 sockets
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(limits[0], 8192), max(limits[1], 8192)))
    senders = []
    try:
        monitor.start()
        receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        receiver.bind(("127.0.0.1", 0))
        senders = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(3000)]
        for size, s in enumerate(senders, 1):
            s.sendto(b"z" * size, receiver.getsockname())
        flows = monitor.drain() + monitor.drain()
        sent = {s.getsockname()[1]: size for size, s in enumerate(senders, 1)}
    finally:
        monitor.close()
        for s in senders:
            s.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, limits)
    ours = {f.lport: f.bytes_sent for f in flows if f.tgid == os.getpid() and f.bytes_sent}
    assert ours == sent


def test_counter_cells_are_reused_once_user_space_has_read_them():
    # 1,000 short-lived sockets and 511 cells: once the cells never used run out, retired ones are
    # handed out again. Other processes' traffic takes cells too, so which cells our sockets get is
    # seen from the cells user space reads (and bytes without a free cell go to the flow map).
    monitor = KernelMonitor(cells=512)
    cells_of = {}  # cell -> local ports of our sockets seen in it
    try:
        monitor.start()
        drain_cells = monitor._cells.drain_cells

        def noting(generation):
            for cell, key, value in drain_cells(generation):
                if key.tgid == os.getpid() and value.bytes_sent:
                    cells_of.setdefault(cell, set()).add(key.lport)
                yield cell, key, value

        monitor._cells.drain_cells = noting
        receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        receiver.bind(("127.0.0.1", 0))
        ours = []
        for _ in range(10):
            for _ in range(100):
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                    s.sendto(b"q" * 10, receiver.getsockname())
            for _ in range(3):  # a retired cell is handed out again after three epochs
                ours += [f for f in monitor.drain() if f.tgid == os.getpid() and f.bytes_sent]
        losses = {loss.what: loss.count for loss in monitor.losses()}
    finally:
        monitor.close()
    assert sum(f.bytes_sent for f in ours) == 1000 * 10
    assert "flow_map_full" not in losses
    assert any(len(ports) > 1 for ports in cells_of.values())  # a cell carried two of our sockets in turn


def test_a_hook_the_kernel_refuses_leaves_the_rest_working(monkeypatch):
    # A kernel without BPF trampolines (this machine's) refuses the fexit fallback for byte counting
    # by itself; a stock kernel would load it, so there it is refused as such a kernel would.
    if libbpf.loads_fexit("inet_sendmsg"):
        refuse(monkeypatch, "inet_sendmsg_exit")
    monitor = KernelMonitor(byte_hooks="fallback")
    try:
        degraded = monitor.start()
        subprocess.run(["/bin/true"], check=True)
        execs = [r for r in monitor.poll(0.5) if r.kind == "exec"]
    finally:
        monitor.close()
    assert [d.consequence for d in degraded] == ["no traffic will be counted"]
    assert "inet_sendmsg_exit" in degraded[0].hook and degraded[0].reason
    assert any(e.filename == "/bin/true" for e in execs)


def refuse(monkeypatch, *names):
    """Makes loading fail as on a kernel that refuses the named programs."""
    load = libbpf.BpfObject.load

    def refusing_load(self):
        for prog in self.programs():
            if prog.name in names and prog.autoload:
                raise libbpf.LibbpfError(f"loading: libbpf: prog '{prog.name}': failed to load: -22")
        load(self)

    monkeypatch.setattr(libbpf.BpfObject, "load", refusing_load)


def test_a_kernel_without_bpf_rdonly_cast_counts_tcp_receives_with_the_stand_in(monkeypatch, lab):
    refuse(monkeypatch, "tcp_rcv_space_adjust")
    monitor = KernelMonitor()
    assert monitor.start() == []
    rec = Recorder(monitor)
    try:
        peer = TcpPeer("127.0.0.1", reply=2_500_000)
        thread = serve(lab, peer, False)
        pid, counts = generate(sys.executable, GEN, "splice", "127.0.0.1", str(peer.port))
        thread.join(5)
        totals = rec.totals(pid)
    finally:
        rec.close()
    # splice() is only seen at tcp_rcv_space_adjust, so these bytes were counted by the stand-in.
    assert counts["recv"] == 2_500_000
    assert totals[(socket.AF_INET, socket.IPPROTO_TCP, "127.0.0.1", peer.port)][:2] == [0, 2_500_000]


def test_a_refused_stand_in_degrades_with_a_reason(monkeypatch):
    refuse(monkeypatch, "tcp_rcv_space_adjust", "tcp_rcv_space_adjust_compat")
    monitor = KernelMonitor()
    try:
        degraded = monitor.start()
    finally:
        monitor.close()
    assert [d.consequence for d in degraded] == ["TCP data received with splice() will not be counted"]
    assert "tcp_rcv_space_adjust" in degraded[0].hook and "refused" in degraded[0].reason


def test_missing_cgroup2_and_libc_degrade_with_a_reason():
    monitor = KernelMonitor(cgroup_root="/nonexistent", libc="/nonexistent/libc.so.6")
    try:
        degraded = {d.consequence: d.reason for d in monitor.start()}
    finally:
        monitor.close()
    assert set(degraded) == {"the remote address of unconnected UDP traffic will not be recorded",
                             "domain names will not be recorded",
                             "bytes are added to the flow map on every send and receive, which costs more"}
    assert all(degraded.values())


@pytest.mark.parametrize("line,root", [
    ("30 24 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate", "/sys/fs/cgroup"),
    ("35 25 0:30 / /sys/fs/cgroup/unified rw,relatime shared:10 - cgroup2 cgroup2 rw", "/sys/fs/cgroup/unified"),
    ("36 25 0:31 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu", None),
])
def test_cgroup2_root_is_found_in_pure_and_hybrid_layouts(tmp_path, line, root):
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text("22 1 0:21 / /proc rw - proc proc rw\n" + line + "\n")
    assert cgroup2_root(str(mountinfo)) == root


def _picosnitch(*args, user=None, extra_mounts=""):
    python = "/usr/bin/python3" if user else sys.executable  # pyenv's lives under /root
    cmd = f"{extra_mounts} exec {python} -m picosnitch {' '.join(args)}"
    base = ["unshare", "--mount", "--propagation", "private", "sh", "-c", cmd] if extra_mounts else \
        ["sh", "-c", cmd]
    if user:
        base = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *base]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parent.parent))
    return subprocess.run(base, capture_output=True, text=True, timeout=30, env=env)


def test_monitor_raw_prints_records_as_json_lines(lab):
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parent.parent))
    proc = subprocess.Popen([sys.executable, "-m", "picosnitch", "monitor", "--raw"], stdout=subprocess.PIPE,
                            text=True, env=env)
    try:
        assert json.loads(proc.stdout.readline())["kind"] == "ready"
        peer = TcpPeer(PEER4)
        thread = serve(lab, peer, True)
        pid, _ = generate(sys.executable, GEN, "tcp", PEER4, str(peer.port), "5555")
        thread.join(5)
        for line in proc.stdout:
            record = json.loads(line)
            if record["kind"] == "flow" and record["tgid"] == pid:
                assert record["bytes_sent"] == 5555 and record["raddr"] == PEER4
                break
    finally:
        proc.terminate()
        proc.communicate(timeout=10)
    assert proc.returncode == 0


def test_monitor_raw_exits_on_sigterm_while_its_reader_stopped_reading():
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parent.parent))
    proc = subprocess.Popen([sys.executable, "-m", "picosnitch", "monitor", "--raw"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)
    try:
        assert json.loads(proc.stdout.readline())["kind"] == "ready"
        # 500 execs, each an exec and an exit record of ~150 bytes: more than a pipe holds
        subprocess.run(["sh", "-c", "for i in $(seq 500); do /bin/true; done"], check=True)
        time.sleep(1.5)  # a drain: the monitor is now blocked writing to the full pipe
        proc.terminate()
        assert proc.wait(timeout=10) == 0
        assert proc.stderr.read() == b""  # no traceback, no "Exception ignored" at exit
    finally:
        proc.kill()
        proc.communicate()


def test_not_root_is_one_clear_sentence():
    result = _picosnitch("monitor", "--raw", user="65534")
    assert result.returncode == 1
    assert result.stderr.startswith("picosnitch: loading BPF programs needs root")
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1


def test_no_btf_is_one_clear_sentence():
    result = _picosnitch("monitor", "--raw", extra_mounts="mount -t tmpfs none /sys/kernel/btf &&")
    assert result.returncode == 1
    assert "CONFIG_DEBUG_INFO_BTF" in result.stderr and "Traceback" not in result.stderr


def test_no_libbpf_is_one_clear_sentence():
    libbpf = os.path.realpath("/usr/lib/x86_64-linux-gnu/libbpf.so.1")
    result = _picosnitch("monitor", "--raw", extra_mounts=f"mount --bind /dev/null {libbpf} &&")
    assert result.returncode == 1
    assert "install libbpf1" in result.stderr and "Traceback" not in result.stderr
