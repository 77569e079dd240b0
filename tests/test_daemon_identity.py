"""The real daemon, end to end: known workloads in, the right rows in the `connections` view out.

Each module fixture below is one run of `picosnitch start-no-daemon` under a private
PICOSNITCH_PREFIX with a 1-second write limit (tests/daemon_harness.py): servers are started in
the lab namespace (or on loopback), workloads run, the daemon is stopped, and the tests read what
it stored. Rows are picked by the workloads' own executables and server ports, because other
processes on the machine make traffic too. Byte counts are exact: every server and generator
counts its application bytes.

Hostile names are stored faithfully. "Faithfully" means byte for byte: `exe` is the executable's
path exactly as the file system names it (escape sequences, newline, comma, invalid UTF-8), `name`
is the kernel's comm (the first 15 bytes of the file name), and `cmdline` is the arguments' exact
bytes joined by one space each. NUL cannot be stored inside a value because no value can hold
one: the kernel keeps argv as NUL-terminated strings, so NUL only ever separates arguments, and
that separator is what becomes the space (an empty argument therefore shows as two spaces in a
row). File names and comm cannot hold NUL either. The logs (conn.log, exe.log, error.log) show the
same values sanitised: one line per entry, escape sequences, newlines, NUL and other control
characters written as visible `\\xNN`, and commas removed from conn.log fields.

Options keep the original's meaning: "Log addresses" false leaves out where the traffic went (the
remote address and its domain; the local address stays), "Log ports" false stores -1 for both
ports, "Log commands" false blanks the command lines of the process, parent and grandparent,
"Log ignore" drops connections matching a sha256, a domain and its subdomains, an IP subnet (IPv4
rules cover IPv4-mapped IPv6 traffic and the other way round) or a port, and "Every exe (not just
conns)" adds a row with ports -1 and no bytes for every exec.
"""

import hashlib
import json
import os
import re
import shutil
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from daemon_harness import Daemon
from netlab import HOST4, HOST6, PEER4, PEER6, SUBNET4, TcpPeer, UdpEcho, listen

TESTS = Path(__file__).resolve().parent
GEN = str(TESTS / "traffic_gen.py")
PY = os.path.realpath(sys.executable)
PY_NAME = os.path.basename(sys.executable)[:15]  # the comm exec gives it: "python" in a venv
DOMAIN_ADDR = "127.0.0.77"  # a loopback address only the domain workload talks to
TCP, UDP = socket.IPPROTO_TCP, socket.IPPROTO_UDP

HOSTILE_ARGS = [b"\x1b[31mred\x1b[0m", b"\x1b]0;owned\x07", b"two\nlines\r", b"a,b,,c", b"",
                b"\xff\xfe\xc3(", b"\xc2\x9b2J", "\u00fcn\u00ef".encode()]
HOSTILE_EXE = b"e\xfe\x1b[1m\nx,y"  # 10 bytes: the whole file name is the comm
GONE_EXE = b"gone\x1b]0;t\x07\n,\xff"  # deleted as soon as it exits: cannot be hashed afterwards


def fs(raw: bytes) -> str:
    """Bytes as the lossless str the view gives back (surrogateescape)."""
    return raw.decode("utf-8", "surrogateescape")


def raw(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def sha256_of(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def proc_identity(pid: int) -> tuple:
    """(exe, name, cmdline, sha256) of a running process, as /proc shows it."""
    exe = os.readlink(f"/proc/{pid}/exe")
    with open(f"/proc/{pid}/comm", "rb") as f:
        name = fs(f.read().rstrip(b"\n"))
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        argv = f.read().rstrip(b"\0").split(b"\0")
    return exe, name, fs(b" ".join(argv)), sha256_of(f"/proc/{pid}/exe")


def who(row: dict, prefix: str = "") -> tuple:
    return tuple(row[prefix + key] for key in ("exe", "name", "cmdline", "sha256"))


def one_identity(rows: list) -> dict:
    """The identity columns shared by all `rows` (they must agree), as one dict. The local port is
    left out: see test_tcp_bytes_read_after_the_connection_closed_keep_their_local_port."""
    keys = ("exe", "name", "cmdline", "sha256", "pexe", "pname", "pcmdline", "psha256", "gpexe",
            "gpname", "gpcmdline", "gpsha256", "uid", "family", "protocol", "laddr", "raddr",
            "rport", "domain", "netns")
    assert rows, "no rows"
    identities = {tuple(r[k] for k in keys) for r in rows}
    assert len(identities) == 1, identities
    return dict(zip(keys, identities.pop()))


def totals(rows: list) -> tuple:
    return sum(r["send"] for r in rows), sum(r["recv"] for r in rows)


class HttpPeer:
    """Answers one HTTP request with `body`; counts the bytes it read and wrote."""

    def __init__(self, host: str, body: bytes):
        self.host, self.body = host, body
        self.received = self.sent = 0
        self.ready = threading.Event()

    def serve(self) -> None:
        self.sock = listen(self.host)
        self.port = self.sock.getsockname()[1]
        self.ready.set()
        conn, _ = self.sock.accept()
        with conn:
            request = b""
            while b"\r\n\r\n" not in request:
                chunk = conn.recv(65536)
                if not chunk:
                    break
                request += chunk
            response = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(
                self.body) + self.body
            conn.sendall(response)
            self.sent = len(response)
            while chunk:
                chunk = conn.recv(65536)
                request += chunk
            self.received = len(request)
        self.sock.close()


class Servers:
    """Peer servers for one daemon run, each waited for until it listens."""

    def __init__(self, lab):
        self.lab, self.threads, self.echoes = lab, [], []

    def __call__(self, server, inside: bool = True):
        if inside:
            thread = self.lab.in_peer(server.serve)
        else:
            thread = threading.Thread(target=server.serve, daemon=True)
            thread.start()
        assert server.ready.wait(5)
        self.threads.append(thread)
        if isinstance(server, UdpEcho):
            self.echoes.append(server)
        return server

    def close(self) -> None:
        for echo in self.echoes:
            echo.stop()


def run(args, **kwargs) -> SimpleNamespace:
    """Runs a workload to completion; its pid and the last line it printed (its own counts)."""
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, **kwargs)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, (args, out)
    return SimpleNamespace(pid=proc.pid, out=out.decode().strip().splitlines()[-1] if out.strip() else "")


def with_hosts(hosts: Path, command: str) -> list:
    """`command` (a shell command ending in exec) run with `hosts` bind-mounted on /etc/hosts in a
    private mount namespace, as test_getaddrinfo in test_kernel_monitor.py does."""
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c",
            f"mount --bind {hosts} /etc/hosts && exec {command}"]


def python_script(path: Path) -> Path:
    """An executable script that runs traffic_gen through the interpreter named in its #! line."""
    path.write_text(f"#!{sys.executable}\nimport sys\nsys.path.insert(0, {str(TESTS)!r})\n"
                    "import traffic_gen\ntraffic_gen.main(sys.argv[1:])\n")
    path.chmod(0o755)
    return path


def wait_for_rows(daemon: Daemon, where: str, params=(), timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if daemon.rows(where, params):
                return
        except sqlite3.OperationalError:
            pass  # not created yet
        time.sleep(0.2)
    raise AssertionError(f"no row where {where} {params} within {timeout} s")


def stopped(daemon: Daemon) -> SimpleNamespace:
    """Stops the daemon and returns what it left: rows and the three logs (bytes)."""
    try:
        status = daemon.stop(timeout=45)
    except subprocess.TimeoutExpired:
        daemon.kill_group()
        raise AssertionError("the daemon did not stop: " + daemon.proc.stderr.read()[-5000:]) from None
    assert status == 0, daemon.proc.stderr.read()[-5000:]

    def read(path):
        return path.read_bytes() if path.exists() else b""
    return SimpleNamespace(rows=daemon.rows(), conn_log=read(daemon.paths.conn_log),
                           exe_log=read(daemon.paths.exe_log), error_log=read(daemon.paths.error_log),
                           paths=daemon.paths)


# --- run 1: identities, bytes, hostile names, logs -------------------------------------------


@pytest.fixture(scope="module")
def main_run(lab, netops, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("identity")
    serve = Servers(lab)
    w = SimpleNamespace()
    w.pre_peer = serve(TcpPeer(PEER6, reply=2222))
    w.http = serve(HttpPeer(PEER4, b"h" * 7000))
    w.unconnected_echo = serve(UdpEcho(PEER6))
    w.script_echo = serve(UdpEcho(PEER4))
    w.copy_echo = serve(UdpEcho(PEER6))
    w.short_peer = serve(TcpPeer(PEER4))
    w.domain_peer = serve(TcpPeer(DOMAIN_ADDR, reply=777), inside=False)
    w.hostile_echo = serve(UdpEcho(PEER4))
    w.long_echo = serve(UdpEcho(PEER6))
    w.hostile_exe_peer = serve(TcpPeer(PEER4))
    w.gone_peer = serve(TcpPeer(PEER4))
    w.mapped_echo = serve(UdpEcho("127.0.0.1"), inside=False)
    w.late_peer = serve(TcpPeer(PEER4, reply=4444))

    # Started before the daemon; sends only once the daemon runs.
    pre = subprocess.Popen([sys.executable, GEN, "gated", "tcp", PEER6, str(w.pre_peer.port), "5000"],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert pre.stdout.readline() == "ready\n"
    w.pre_pid = pre.pid

    daemon = Daemon(tmp / "prefix", **{"DB text log": True})
    daemon.start()
    try:
        pre.stdin.write("go\n")
        pre.stdin.flush()
        w.pre_out = pre.stdout.readline()
        pre.stdin.close()
        assert pre.wait(30) == 0

        # curl, run as nobody by a shell that outlives it: parent sh, grandparent this process.
        w.curl_script = (f"setpriv --reuid=65534 --regid=65534 --clear-groups curl -s --noproxy '*' "
                         f"-o /dev/null http://{PEER4}:{w.http.port}/picosnitch; exit $?")
        run(["sh", "-c", w.curl_script])

        # A Python client, UDP both ways on an unconnected socket.
        w.unconnected = run([sys.executable, GEN, "udp-unconnected", PEER6, str(w.unconnected_echo.port),
                             "20", "500"])

        # An IPv6 socket talking to an IPv4 address (IPv4-mapped).
        w.mapped = run([sys.executable, GEN, "udp-connected", "::ffff:127.0.0.1", str(w.mapped_echo.port),
                        "4", "10"])

        # TCP bytes read only after the connection is over (the peer has closed).
        w.late = run([sys.executable, GEN, "tcp-late-read", PEER4, str(w.late_peer.port), "1000", "0.5"])

        # A script run by the interpreter in its #! line.
        w.script = python_script(tmp / "pclient.py")
        w.script_args = ["udp-connected", PEER4, str(w.script_echo.port), "30", "400"]
        run([str(w.script), *w.script_args])

        # A binary copied under a new name.
        w.copy = tmp / "renamed-netops"
        shutil.copy2(netops, w.copy)
        run([str(w.copy), "mmsg", PEER6, str(w.copy_echo.port), "32", "700"])

        # A short-lived process whose parent shell is gone as well when its traffic is resolved.
        w.short_script = f"{netops} quick {PEER4} {w.short_peer.port} 4321; exit 0"
        run(["sh", "-c", w.short_script])

        # A name resolved through getaddrinfo from a private /etc/hosts.
        hosts = tmp / "hosts"
        hosts.write_text(f"127.0.0.1 localhost\n{DOMAIN_ADDR} picosnitch-test.example\n")
        w.domain_cmd = f"{sys.executable} {GEN} resolve-tcp picosnitch-test.example 4 {w.domain_peer.port} 3333"
        w.domain = run(with_hosts(hosts, w.domain_cmd))

        # Hostile argv.
        w.hostile_argv = [raw(sys.executable), raw(GEN), b"udp-connected", PEER4.encode(),
                          str(w.hostile_echo.port).encode(), b"3", b"100", b"--", *HOSTILE_ARGS]
        run(w.hostile_argv)

        # A 64 KiB command line (beyond what the kernel event carries), alive until its row exists.
        w.long_argv = [raw(sys.executable), raw(GEN), b"gated", b"udp-connected", PEER6.encode(),
                       str(w.long_echo.port).encode(), b"5", b"200", b"--", b"L" * 65536, b"\x1bend"]
        held = subprocess.Popen(w.long_argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert held.stdout.readline() == "ready\n"
        held.stdin.write("go\n")
        held.stdin.flush()
        held.stdout.readline()
        try:
            wait_for_rows(daemon, "rport = ? AND protocol = ?", (w.long_echo.port, UDP))
        finally:
            held.stdin.close()
            assert held.wait(30) == 0

        # Executables with hostile file names: one kept, one deleted as soon as it exits.
        w.hostile_exe = os.fsencode(tmp) + b"/" + HOSTILE_EXE
        w.gone_exe = os.fsencode(tmp) + b"/" + GONE_EXE
        for path in (w.hostile_exe, w.gone_exe):
            shutil.copyfile(os.fsencode(netops), path)
            os.chmod(path, 0o755)
        run([w.hostile_exe, b"quick", PEER4.encode(), str(w.hostile_exe_peer.port).encode(), b"4000"])
        run([w.gone_exe, b"quick", PEER4.encode(), str(w.gone_peer.port).encode(), b"1234"])
        os.unlink(w.gone_exe)  # at least half a second before its traffic reaches the daemon
    except BaseException:
        daemon.kill_group()
        raise
    finally:
        serve.close()
        if pre.poll() is None:
            pre.kill()
    w.result = stopped(daemon)
    w.netops = netops
    for thread in serve.threads:
        thread.join(5)
    return w


def rows_of(run_, exe, rport=None, protocol=None) -> list:
    return [r for r in run_.result.rows if r["exe"] == exe and (rport is None or r["rport"] == rport)
            and (protocol is None or r["protocol"] == protocol)]


@pytest.fixture(scope="module")
def me():
    """This test process (the workloads' parent) and its parent (their grandparent)."""
    return SimpleNamespace(me=proc_identity(os.getpid()), parent=proc_identity(os.getppid()),
                           netns=os.stat("/proc/self/ns/net").st_ino)


def test_process_started_before_the_daemon_is_attributed(main_run, me):
    w = main_run
    rows = rows_of(w, PY, w.pre_peer.port, TCP)
    row = one_identity(rows)
    assert who(row) == (PY, PY_NAME, f"{sys.executable} {GEN} gated tcp {PEER6} {w.pre_peer.port} 5000",
                        sha256_of(PY))
    assert who(row, "p") == me.me and who(row, "gp") == me.parent
    assert (row["uid"], row["family"], row["laddr"], row["raddr"], row["domain"]) == (
        0, socket.AF_INET6, HOST6, PEER6, "")
    assert totals(rows) == (5000, 2222) == (w.pre_peer.received, 2222)


def test_curl_as_another_user_has_its_shell_parent_and_grandparent(main_run, me):
    w = main_run
    rows = rows_of(w, "/usr/bin/curl", w.http.port, TCP)
    row = one_identity(rows)
    assert who(row) == ("/usr/bin/curl", "curl",
                        f"curl -s --noproxy * -o /dev/null http://{PEER4}:{w.http.port}/picosnitch",
                        sha256_of("/usr/bin/curl"))
    sh = os.path.realpath(shutil.which("sh"))
    assert who(row, "p") == (sh, "sh", f"sh -c {w.curl_script}", sha256_of(sh))
    assert who(row, "gp") == me.me
    assert row["uid"] == 65534
    assert (row["family"], row["laddr"], row["raddr"], row["rport"], row["domain"], row["netns"]) == (
        socket.AF_INET, HOST4, PEER4, w.http.port, "", me.netns)
    assert len({r["lport"] for r in rows}) == 1 and rows[0]["lport"] > 0
    assert totals(rows) == (w.http.received, w.http.sent) and w.http.sent > 7000


def test_python_client_unconnected_udp_both_ways(main_run, me):
    w = main_run
    rows = rows_of(w, PY, w.unconnected_echo.port, UDP)
    row = one_identity(rows)
    assert who(row) == (PY, PY_NAME, f"{sys.executable} {GEN} udp-unconnected {PEER6} "
                                       f"{w.unconnected_echo.port} 20 500", sha256_of(PY))
    assert who(row, "p") == me.me and who(row, "gp") == me.parent
    # The socket is not bound to an address: its local address is the wildcard.
    assert (row["family"], row["laddr"], row["raddr"]) == (socket.AF_INET6, "::", PEER6)
    assert {r["lport"] for r in rows} == {json.loads(w.unconnected.out)["lport"]}
    assert totals(rows) == (10_000, 10_000)


def test_script_run_by_its_interpreter(main_run, me):
    w = main_run
    rows = rows_of(w, PY, w.script_echo.port, UDP)
    row = one_identity(rows)
    # The kernel runs the interpreter named in the #! line with the script's path as an argument;
    # the process is named after the script.
    assert who(row) == (PY, "pclient.py", " ".join([sys.executable, str(w.script), *w.script_args]),
                        sha256_of(PY))
    assert who(row, "p") == me.me and who(row, "gp") == me.parent
    assert totals(rows) == (12_000, 12_000)


def test_binary_copied_under_a_new_name(main_run, me):
    w = main_run
    rows = rows_of(w, str(w.copy), w.copy_echo.port, UDP)
    row = one_identity(rows)
    assert who(row) == (str(w.copy), "renamed-netops", f"{w.copy} mmsg {PEER6} {w.copy_echo.port} 32 700",
                        sha256_of(w.copy))
    assert who(row, "p") == me.me
    assert totals(rows) == (32 * 700, 32 * 700)


def test_ipv4_mapped_traffic_is_recorded_as_ipv6(main_run):
    w = main_run
    rows = rows_of(w, PY, w.mapped_echo.port, UDP)
    row = one_identity(rows)
    assert (row["family"], row["raddr"], row["laddr"]) == (socket.AF_INET6, "::ffff:127.0.0.1", "::ffff:127.0.0.1")
    assert totals(rows) == (40, 40)


def test_tcp_bytes_read_after_the_connection_closed_keep_their_local_port(main_run):
    w = main_run
    rows = rows_of(w, PY, w.late_peer.port, TCP)
    assert totals(rows) == (1000, 4444)
    assert {r["lport"] for r in rows} == {json.loads(w.late.out)["lport"]}


def test_short_lived_process_and_its_exited_parent(main_run, me):
    w = main_run
    rows = rows_of(w, w.netops, w.short_peer.port, TCP)
    row = one_identity(rows)
    assert who(row) == (w.netops, "netops", f"{w.netops} quick {PEER4} {w.short_peer.port} 4321",
                        sha256_of(w.netops))
    sh = os.path.realpath(shutil.which("sh"))
    assert who(row, "p") == (sh, "sh", f"sh -c {w.short_script}", sha256_of(sh))
    assert who(row, "gp") == me.me
    assert totals(rows) == (4321, 0) == (w.short_peer.received, 0)


def test_domain_resolved_from_a_private_hosts_file(main_run, me):
    w = main_run
    rows = rows_of(w, PY, w.domain_peer.port, TCP)
    row = one_identity(rows)
    assert row["domain"] == "example.picosnitch-test"
    assert (row["raddr"], row["family"]) == (DOMAIN_ADDR, socket.AF_INET)
    assert who(row) == (PY, PY_NAME, w.domain_cmd, sha256_of(PY))
    assert who(row, "p") == me.me  # unshare and sh exec'd into the client
    assert totals(rows) == (3333, 777)


def test_hostile_arguments_are_stored_byte_for_byte(main_run):
    w = main_run
    rows = rows_of(w, PY, w.hostile_echo.port, UDP)
    row = one_identity(rows)
    assert raw(row["cmdline"]) == b" ".join(w.hostile_argv)
    assert b"  " + HOSTILE_ARGS[5] in raw(row["cmdline"])  # the empty argument between two separators
    assert totals(rows) == (300, 300)


def test_a_64_kib_command_line_is_stored_whole(main_run):
    w = main_run
    rows = rows_of(w, PY, w.long_echo.port, UDP)
    row = one_identity(rows)
    assert len(raw(row["cmdline"])) > 65536
    assert raw(row["cmdline"]) == b" ".join(w.long_argv)
    assert totals(rows) == (1000, 1000)


def test_hostile_executable_name_is_stored_byte_for_byte(main_run, me):
    w = main_run
    rows = rows_of(w, fs(w.hostile_exe), w.hostile_exe_peer.port, TCP)
    row = one_identity(rows)
    assert raw(row["exe"]) == w.hostile_exe
    assert raw(row["name"]) == HOSTILE_EXE
    assert raw(row["cmdline"]) == b" ".join([w.hostile_exe, b"quick", PEER4.encode(),
                                            str(w.hostile_exe_peer.port).encode(), b"4000"])
    assert row["sha256"] == sha256_of(w.hostile_exe)
    assert who(row, "p") == me.me
    assert totals(rows) == (4000, 0)


def test_an_executable_deleted_before_it_was_hashed_has_the_hash_of_the_file_that_ran(main_run):
    w = main_run
    rows = rows_of(w, fs(w.gone_exe), w.gone_peer.port, TCP)
    row = one_identity(rows)
    assert row["sha256"] == sha256_of(w.netops)  # pinned at exec: the copy that ran, hashed after
    assert [r["exe_state"] for r in rows] == ["deleted"] * len(rows)
    assert totals(rows) == (1234, 0)


# --- the logs ---

TIMESTAMP = rb"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d"
CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")


def log_lines(data: bytes) -> list:
    """The lines of a log, each checked to be printable UTF-8 without control characters."""
    assert data.endswith(b"\n")
    assert b"\0" not in data and b"\r" not in data and b"\x1b" not in data
    lines = []
    for line in data[:-1].split(b"\n"):
        text = line.decode("utf-8")  # strict: invalid bytes must have been escaped
        assert not CONTROL.search(text), text
        lines.append(text)
    return lines


def escaped(value: bytes) -> str:
    """How a log shows a value: control characters and undecodable bytes as \\xNN."""
    text = value.decode("utf-8", "surrogateescape")
    return re.sub("[\x00-\x1f\x7f-\x9f\udc80-\udcff]", lambda m: "\\x%02x" % (ord(m.group()) & 0xFF), text)


def test_conn_log_has_one_sanitised_line_per_row(main_run):
    w = main_run
    lines = log_lines(w.result.conn_log)
    for line in lines:
        fields = line.split(",")
        assert len(fields) == 17, line
        assert re.fullmatch(TIMESTAMP.decode(), fields[0])
    # A row may be written in more than one batch (conn.log appends, snitch.db adds up).
    assert sum(int(line.split(",")[1]) for line in lines) == sum(r["send"] for r in w.result.rows)
    assert sum(int(line.split(",")[2]) for line in lines) == sum(r["recv"] for r in w.result.rows)
    hostile = [f for f in (line.split(",") for line in lines) if f[5].startswith(escaped(raw(sys.executable)))
               and f[13] == str(w.hostile_echo.port)]
    assert hostile, "the hostile command line is not in conn.log"
    expected = escaped(re.sub(rb"[,\n\r\0]", b"", b" ".join(w.hostile_argv)))
    assert {f[5] for f in hostile} == {expected}
    assert "\\x1b[31mred" in expected and "\\xff\\xfe" in expected and "\\xc2\\x9b" not in expected
    exe_fields = {f[3] for f in (line.split(",") for line in lines)}
    assert escaped(w.hostile_exe.replace(b",", b"").replace(b"\n", b"")) in exe_fields


def test_exe_log_and_error_log_are_sanitised(main_run):
    w = main_run
    exe_lines = log_lines(w.result.exe_log)
    error_lines = log_lines(w.result.error_log)
    for line in exe_lines:
        assert re.match(TIMESTAMP.decode() + ", ", line), line
    for line in error_lines:
        assert re.match(TIMESTAMP.decode() + " ", line), line
    # exe.log fields are comma-separated as well: commas are removed from values.
    assert any(escaped(w.hostile_exe).replace(",", "") in line for line in exe_lines)
    assert any(escaped(w.gone_exe).replace(",", "") in line for line in exe_lines)


# --- run 2: "Log addresses", "Log ports" and "Log commands" false ----------------------------


@pytest.fixture(scope="module")
def quiet_run(lab, netops, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("quiet")
    serve = Servers(lab)
    w = SimpleNamespace()
    w.echo = serve(UdpEcho(PEER4))
    w.peer = serve(TcpPeer(PEER4))
    w.domain_peer = serve(TcpPeer(DOMAIN_ADDR, reply=500), inside=False)
    w.copy = tmp / "netops-quiet"
    shutil.copy2(netops, w.copy)
    hosts = tmp / "hosts"
    hosts.write_text(f"127.0.0.1 localhost\n{DOMAIN_ADDR} picosnitch-test.example\n")
    w.script = python_script(tmp / "resolve_quiet")
    daemon = Daemon(tmp / "prefix", **{"Log addresses": False, "Log ports": False, "Log commands": False})
    daemon.start()
    try:
        run([str(w.copy), "mmsg", PEER4, str(w.echo.port), "16", "300"])
        run([str(w.copy), "quick", PEER4, str(w.peer.port), "2500"])
        run(with_hosts(hosts, f"{w.script} resolve-tcp picosnitch-test.example 4 {w.domain_peer.port} 1500"))
    except BaseException:
        daemon.kill_group()
        raise
    finally:
        serve.close()
    w.result = stopped(daemon)
    return w


def test_log_addresses_ports_and_commands_off(quiet_run, me):
    w = quiet_run
    rows = [r for r in w.result.rows if r["exe"] == str(w.copy)]
    for protocol, expected in ((UDP, (4800, 4800)), (TCP, (2500, 0))):
        selected = [r for r in rows if r["protocol"] == protocol]
        row = one_identity(selected)
        assert totals(selected) == expected
        # Recorded: who it was, and the local address. Not recorded: where the traffic went
        # (remote address and domain), the ports, and the command lines of all three processes.
        assert who(row) == (str(w.copy), "netops-quiet", "", sha256_of(w.copy))
        assert who(row, "p") == me.me[:2] + ("", me.me[3])
        assert who(row, "gp") == me.parent[:2] + ("", me.parent[3])
        assert (row["laddr"], row["raddr"], row["domain"], row["rport"]) == (HOST4, "", "", -1)
        assert {r["lport"] for r in selected} == {-1}
    rows = [r for r in w.result.rows if r["name"] == "resolve_quiet"]
    row = one_identity(rows)
    assert (row["exe"], row["cmdline"], row["pcmdline"], row["gpcmdline"]) == (PY, "", "", "")
    assert (row["raddr"], row["domain"], row["rport"]) == ("", "", -1)
    assert {r["lport"] for r in rows} == {-1}
    assert row["laddr"].startswith("127.")
    assert totals(rows) == (1500, 500)


# --- run 3: "Log ignore" and "Every exe (not just conns)" ------------------------------------


@pytest.fixture(scope="module")
def ignore_run(lab, netops, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ignore")
    serve = Servers(lab)
    w = SimpleNamespace()
    w.hash_peer = serve(TcpPeer("::1"), inside=False)
    w.kept_peer = serve(TcpPeer("::1"), inside=False)
    w.mapped_echo = serve(UdpEcho("127.0.0.1"), inside=False)
    w.peer4 = serve(TcpPeer(PEER4))
    w.port_echo = serve(UdpEcho(PEER6))
    w.other_echo = serve(UdpEcho(PEER6))
    w.sub_peer = serve(TcpPeer(PEER6))
    w.rev_peer = serve(TcpPeer(PEER6))
    w.not_peer = serve(TcpPeer(PEER6, reply=99))

    w.ignored = tmp / "netops-ignored"
    w.ignored.write_bytes(Path(netops).read_bytes() + b"\0not the same file")
    w.ignored.chmod(0o755)
    w.kept = tmp / "netops-kept"
    shutil.copy2(netops, w.kept)
    w.true = tmp / "true-copy"
    shutil.copy2("/bin/true", w.true)
    hosts = tmp / "hosts"
    hosts.write_text(f"127.0.0.1 localhost\n{PEER6} sub.picosnitch-test.example deep.x.picosnitch-rev.lan "
                     "notpicosnitch-test.example\n")
    w.ignored_script = python_script(tmp / "ignored-script")
    w.ignored_script.write_text(w.ignored_script.read_text() + "# another sha256\n")
    w.kept_script = python_script(tmp / "kept-script")
    w.ignored_script_echo = serve(UdpEcho(PEER6))
    w.kept_script_echo = serve(UdpEcho(PEER6))
    w.ignore = [sha256_of(w.ignored), "picosnitch-test.example", "lan.picosnitch-rev", "127.0.0.0/8",
                f"::ffff:{SUBNET4[:-3]}/126", w.port_echo.port, sha256_of(w.ignored_script)]
    daemon = Daemon(tmp / "prefix", **{"Log ignore": w.ignore, "Every exe (not just conns)": True})
    daemon.start()
    try:
        run([str(w.ignored), "quick", "::1", str(w.hash_peer.port), "1111"])  # by sha256
        run([str(w.kept), "quick", "::1", str(w.kept_peer.port), "2222"])  # recorded
        run([sys.executable, GEN, "udp-connected", "::ffff:127.0.0.1", str(w.mapped_echo.port),
                        "4", "10"])  # IPv4 subnet, IPv4-mapped IPv6 traffic
        run([sys.executable, GEN, "tcp", PEER4, str(w.peer4.port), "100"])  # mapped subnet, IPv4 traffic
        run([sys.executable, GEN, "udp-connected", PEER6, str(w.port_echo.port), "2", "10"])  # by port
        run([sys.executable, GEN, "udp-connected", PEER6, str(w.other_echo.port), "3", "10"])  # recorded
        run([str(w.ignored_script), "udp-connected", PEER6, str(w.ignored_script_echo.port), "2", "10"])  # script
        run([str(w.kept_script), "udp-connected", PEER6, str(w.kept_script_echo.port), "2", "10"])  # recorded
        # Domains last, once the traffic above has reached the daemon: a lookup names PEER6 for
        # everyone's traffic to it that the daemon has not yet seen, and only the port rule (not
        # the domain rules) may be what ignores the traffic to port_echo.
        wait_for_rows(daemon, "rport = ?", (w.other_echo.port,))
        for name, peer in (("sub.picosnitch-test.example", w.sub_peer), ("deep.x.picosnitch-rev.lan", w.rev_peer),
                           ("notpicosnitch-test.example", w.not_peer)):
            run(with_hosts(hosts, f"{sys.executable} {GEN} resolve-tcp {name} 6 {peer.port} 700"))
        w.true_script = f"{w.true} picosnitch-every-exe; exit 0"
        run(["sh", "-c", w.true_script])
    except BaseException:
        daemon.kill_group()
        raise
    finally:
        serve.close()
    w.result = stopped(daemon)
    return w


def test_log_ignore_by_sha256_port_subnet_and_domain(ignore_run):
    w = ignore_run
    rows = w.result.rows
    assert not [r for r in rows if r["exe"] == str(w.ignored)]  # neither traffic nor its exec
    kept = [r for r in rows if r["exe"] == str(w.kept) and r["rport"] == w.kept_peer.port]
    assert totals(kept) == (2222, 0)
    assert one_identity(kept)["raddr"] == "::1"
    ignored_ports = {w.mapped_echo.port: "127.0.0.0/8 (traffic to ::ffff:127.0.0.1)",
                     w.peer4.port: f"::ffff:{SUBNET4[:-3]}/126 (traffic to {PEER4})",
                     w.port_echo.port: "port", w.sub_peer.port: "domain picosnitch-test.example",
                     w.rev_peer.port: "reversed domain lan.picosnitch-rev"}
    for port, rule in ignored_ports.items():
        assert not [r for r in rows if r["exe"] == PY and r["rport"] == port], rule
    assert not [r for r in rows if r["script"] == str(w.ignored_script)]  # by its script's sha256
    kept_script = [r for r in rows if r["rport"] == w.kept_script_echo.port]
    assert one_identity(kept_script)["exe"] == PY and totals(kept_script) == (20, 20)
    assert {r["script"] for r in kept_script} == {str(w.kept_script)}
    other = [r for r in rows if r["exe"] == PY and r["rport"] == w.other_echo.port]
    assert totals(other) == (30, 30) and one_identity(other)["domain"] == ""
    not_sub = [r for r in rows if r["exe"] == PY and r["rport"] == w.not_peer.port]
    assert totals(not_sub) == (700, 99)
    assert one_identity(not_sub)["domain"] == "example.notpicosnitch-test"  # whole labels only


def test_every_exe_records_each_exec_with_ports_minus_one(ignore_run, me):
    w = ignore_run
    rows = [r for r in w.result.rows if r["exe"] == str(w.true)]
    row = one_identity(rows)
    assert who(row) == (str(w.true), "true-copy", f"{w.true} picosnitch-every-exe", sha256_of(w.true))
    sh = os.path.realpath(shutil.which("sh"))
    assert who(row, "p") == (sh, "sh", f"sh -c {w.true_script}", sha256_of(sh))
    assert who(row, "gp") == me.me
    assert (row["rport"], row["laddr"], row["raddr"], row["domain"]) == (-1, "", "", "")
    assert {r["lport"] for r in rows} == {-1}
    assert totals(rows) == (0, 0)
    # A process that also talks gets its exec row and its traffic rows.
    kept = [r for r in w.result.rows if r["exe"] == str(w.kept)]
    assert {(r["lport"], r["rport"]) for r in kept if r["rport"] == -1} == {(-1, -1)}
    assert any(r["rport"] == w.kept_peer.port for r in kept)
