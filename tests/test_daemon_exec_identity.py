"""Identity that is never wrong and cannot be dodged, against the real daemon.

Each module fixture is one run of `picosnitch start-no-daemon` (tests/daemon_harness.py) while
real processes try what a program that wants to hide would: exec its parent's binary, run through
ld.so or an interpreter, run from a memfd, delete or replace its executable, rename itself. The
tests read the `connections` view it left and compare each row with what the process really was:
its own command line, the program that ran (path and a sha256 equal to hashlib's of that file),
the script an interpreter ran, and the name it had when it sent.
"""

import hashlib
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from daemon_harness import Daemon
from netlab import TcpPeer, UdpEcho
from test_daemon_identity import PY, Servers, run, stopped

TESTS = Path(__file__).resolve().parent
GEN = str(TESTS / "traffic_gen.py")
LD_SO = "/lib64/ld-linux-x86-64.so.2"
LD_MUSL = "/lib/ld-musl-x86_64.so.1"
UDP = socket.IPPROTO_UDP
CHILDREN = 100
ROUNDS = 3


@pytest.fixture(scope="module")
def exec_run(lab, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("exec-identity")
    serve = Servers(lab)
    w = SimpleNamespace(rounds=[])
    daemon = Daemon(tmp / "prefix")
    daemon.start()
    try:
        for _ in range(ROUNDS):
            echo = serve(UdpEcho("127.0.0.1"), inside=False)
            args = [sys.executable, GEN, "exec-children", "127.0.0.1", str(echo.port), str(CHILDREN)]
            w.rounds.append((echo.port, args, run(args)))
    except BaseException:
        daemon.kill_group()
        raise
    finally:
        serve.close()
    w.result = stopped(daemon)
    return w


def test_children_that_exec_their_parents_binary_each_keep_their_own_argv(exec_run):
    for port, parent_args, _ in exec_run.rounds:
        rows = [r for r in exec_run.result.rows if r["rport"] == port and r["protocol"] == UDP]
        sent: dict = {}
        for row in rows:
            assert row["exe"] == PY
            sent[row["cmdline"]] = sent.get(row["cmdline"], 0) + row["send"]
        children = {f"{sys.executable} {GEN} udp-connected 127.0.0.1 {port} 1 {1000 + i}": 1000 + i
                    for i in range(1, CHILDREN + 1)}
        # Each child's bytes under its own command line; the parent's, and its forked child's
        # (which never exec'd), under the parent's.
        assert sent == {**children, " ".join(parent_args): 1000 + 999}


# --- run 2: programs that hide behind ld.so, interpreters, memfd, deleted and replaced files -----

# Each client waits 100 ms (the acceptance's bound for short-lived processes), connects to HOST PORT
# and sends SIZE bytes, in the interpreter's own words.
CLIENTS = {
    "python": ("client.py", "import socket, sys, time\ntime.sleep(0.1)\n"
                            "s = socket.create_connection((sys.argv[1], int(sys.argv[2])))\n"
                            "s.sendall(b'p' * int(sys.argv[3]))\ns.close()\n"),
    "perl": ("client.pl", "use IO::Socket::INET;\nselect(undef, undef, undef, 0.1);\n"
                          "my $s = IO::Socket::INET->new(PeerAddr => $ARGV[0], PeerPort => $ARGV[1], Proto => 'tcp')"
                          " or die;\nprint $s 'l' x $ARGV[2];\nclose $s;\n"),
    "ruby": ("client.rb", "require 'socket'\nsleep 0.1\ns = TCPSocket.new(ARGV[0], ARGV[1].to_i)\n"
                          "s.write('r' * ARGV[2].to_i)\ns.close\n"),
    "node": ("client.js", "const net = require('net');\nconst [host, port, size] = process.argv.slice(2);\n"
                          "setTimeout(() => { const s = net.connect(+port, host, () => s.end('n'.repeat(+size))); }, 100);\n"),
    "php": ("client.php", "<?php usleep(100000);\n$s = stream_socket_client(\"tcp://{$argv[1]}:{$argv[2]}\");\n"
                          "fwrite($s, str_repeat('h', (int)$argv[3]));\nfclose($s);\n"),
    "bash": ("client.bash", "sleep 0.1\nexec 3<>/dev/tcp/$1/$2\nprintf '%*s' \"$3\" '' >&3\n"),
    "zsh": ("client.zsh", "sleep 0.1\nzmodload zsh/net/tcp\nztcp $1 $2\nprintf '%*s' $3 '' >&$REPLY\n"
                          "ztcp -c $REPLY\n"),
}
LIFETIME_MS = "100"  # how long the short-lived programs wait before they send: the acceptance's bound
JAVA_CLIENT = """import java.net.Socket;
public class Client {
    public static void main(String[] a) throws Exception {
        try (Socket s = new Socket(a[0], Integer.parseInt(a[1]))) {
            s.getOutputStream().write(new byte[Integer.parseInt(a[2])]);
        }
    }
}
"""
INTERPRETERS = {"python": PY, **{name: shutil.which(name) for name in CLIENTS if name != "python"},
                "java": shutil.which("java"), "dash": shutil.which("dash")}


def sha256_of(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def java_client(tmp: Path) -> Path:
    (tmp / "Client.java").write_text(JAVA_CLIENT)
    subprocess.run(["javac", "-d", str(tmp), str(tmp / "Client.java")], check=True)
    subprocess.run(["jar", "cfe", str(tmp / "client.jar"), "Client", "-C", str(tmp), "Client.class"], check=True)
    return tmp / "client.jar"


def memfd_exec(program: str, argv: list) -> list:
    """A command that runs `program` from a memfd (memfd_create + fexecve), never from its file."""
    code = ("import os, sys; fd = os.memfd_create('psn-hidden'); os.write(fd, open(sys.argv[1], 'rb').read()); "
            "os.execve(fd, sys.argv[2:], dict(os.environ))")
    return [sys.executable, "-c", code, program, *argv]


@pytest.fixture(scope="module")
def hiding_run(lab, netops, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hiding")
    w = SimpleNamespace(tmp=tmp, cases={}, netops=netops)
    missing = [name for name, path in INTERPRETERS.items() if not path]
    assert not missing, f"install {missing} (scripts/install-system-deps.sh test)"
    peers = {}

    def peer(case: str) -> str:
        peers[case] = TcpPeer("127.0.0.1")
        serve(peers[case], inside=False)
        return str(peers[case].port)

    serve = Servers(lab)
    jar = java_client(tmp)
    scripts = {name: tmp / file for name, (file, _) in CLIENTS.items()}
    for name, (file, text) in CLIENTS.items():
        (tmp / file).write_text(text)
    (tmp / "quiet.sh").write_text("exit 0\n")
    hashbang = tmp / "hashbang.pl"
    hashbang.write_text("#!/usr/bin/perl\n" + CLIENTS["perl"][1])
    hashbang.chmod(0o755)
    w.send = tmp / "send"
    subprocess.run(["gcc", "-O2", "-o", str(w.send), str(TESTS / "c" / "send.c")], check=True)
    shutil.copy2(w.send, tmp / "ldprog")
    subprocess.run(["musl-gcc", "-O2", "-o", str(tmp / "muslprog"), str(TESTS / "c" / "send.c")], check=True)
    public = tmp / "public"
    public.mkdir(mode=0o1777)
    public.chmod(0o1777)
    shutil.copy2(netops, public / "dropped")
    shutil.copy2(w.send, tmp / "gone")
    shutil.copy2(shutil.which("bash"), tmp / "victim")
    w.expected = {}
    daemon = Daemon(tmp / "prefix", **{"Every exe (not just conns)": True})
    daemon.start()
    try:
        for name, script in scripts.items():  # relative paths: resolved against the process's cwd
            size = 100 + len(w.cases)
            w.cases[name] = run([INTERPRETERS[name], script.name, "127.0.0.1", peer(name), str(size)], cwd=tmp)
        w.cases["java"] = run(["java", "-Xshare:auto", "-jar", "client.jar", "127.0.0.1", peer("java"), "321"], cwd=tmp)
        w.cases["dash"] = run(["dash", "-e", str(tmp / "quiet.sh")])  # exits at once: named absolutely
        w.cases["hashbang"] = run(["./hashbang.pl", "127.0.0.1", peer("hashbang"), "222"], cwd=tmp)
        w.cases["ld.so"] = run([LD_SO, "./ldprog", "127.0.0.1", peer("ld.so"), "333", LIFETIME_MS], cwd=tmp)
        w.cases["ld-musl"] = run([LD_MUSL, "./muslprog", "127.0.0.1", peer("ld-musl"), "444", LIFETIME_MS], cwd=tmp)
        w.cases["memfd"] = run(memfd_exec(str(w.send), ["hidden", "127.0.0.1", peer("memfd"), "555", LIFETIME_MS]))
        w.cases["world-writable"] = run([str(public / "dropped"), "quick", "127.0.0.1", peer("world-writable"), "666"])
        w.cases["renamed"] = run([sys.executable, GEN, "renamed-tcp", "firefox", "127.0.0.1", peer("renamed"), "777"])
        gone = subprocess.Popen([str(tmp / "gone"), "127.0.0.1", peer("deleted"), "888", LIFETIME_MS])
        os.unlink(tmp / "gone")  # while it runs: it lives a few milliseconds
        assert gone.wait(30) == 0
        w.cases["deleted"] = SimpleNamespace(pid=gone.pid)
        victim = subprocess.Popen([str(tmp / "victim"), "-c", "read go; exec 3<>/dev/tcp/127.0.0.1/$1; "
                                   "printf '%*s' 999 '' >&3", "victim", peer("replaced")], stdin=subprocess.PIPE)
        time.sleep(0.5)
        (tmp / "victim.new").write_bytes(b"#!/bin/sh\nexit 0\n")
        os.replace(tmp / "victim.new", tmp / "victim")  # renamed over it while it runs
        victim.communicate(b"go\n", timeout=30)
        assert victim.returncode == 0
        w.cases["replaced"] = SimpleNamespace(pid=victim.pid)
    except BaseException:
        daemon.kill_group()
        raise
    finally:
        serve.close()
    w.result = stopped(daemon)
    w.peers = {case: p.port for case, p in peers.items()}
    w.scripts, w.jar, w.hashbang, w.public = scripts, jar, hashbang, public
    return w


def rows_for(w, case: str) -> list:
    rows = [r for r in w.result.rows if r["rport"] == w.peers[case] and r["protocol"] == socket.IPPROTO_TCP]
    assert rows, f"no row for {case}"
    return rows


def one(rows: list, *columns: str) -> tuple:
    values = {tuple(r[c] for c in columns) for r in rows}
    assert len(values) == 1, values
    return values.pop()


@pytest.mark.parametrize("interpreter", [*CLIENTS])
def test_an_interpreters_script_is_part_of_its_identity(hiding_run, interpreter):
    w = hiding_run
    exe = os.path.realpath(INTERPRETERS[interpreter])
    script = w.scripts[interpreter]
    assert one(rows_for(w, interpreter), "exe", "sha256", "script", "script_sha256", "exe_state") == (
        exe, sha256_of(exe), str(script), sha256_of(script), "")


def test_java_minus_jar_has_the_jar_as_its_script(hiding_run):
    w = hiding_run
    exe = os.path.realpath(INTERPRETERS["java"])
    assert one(rows_for(w, "java"), "exe", "sha256", "script", "script_sha256") == (
        exe, sha256_of(exe), str(w.jar), sha256_of(w.jar))


def test_a_hashbang_script_is_its_own_script(hiding_run):
    w = hiding_run
    assert one(rows_for(w, "hashbang"), "exe", "script", "script_sha256") == (
        os.path.realpath("/usr/bin/perl"), str(w.hashbang), sha256_of(w.hashbang))


def test_a_shell_script_that_never_talks_is_recorded_with_its_script_when_every_exe_is_on(hiding_run):
    w = hiding_run
    dash = os.path.realpath(INTERPRETERS["dash"])
    rows = [r for r in w.result.rows if r["exe"] == dash and r["script"] == str(w.tmp / "quiet.sh")]
    assert one(rows, "script_sha256", "rport") == (sha256_of(w.tmp / "quiet.sh"), -1)


@pytest.mark.parametrize("case, loader, program", [("ld.so", LD_SO, "ldprog"), ("ld-musl", LD_MUSL, "muslprog")])
def test_the_program_ld_so_runs_is_the_exe_and_ld_so_the_loader(hiding_run, case, loader, program):
    w = hiding_run
    path = w.tmp / program
    assert one(rows_for(w, case), "exe", "sha256", "exe_state") == (
        str(path), sha256_of(path), "loader:" + os.path.realpath(loader))


def test_a_program_run_from_a_memfd_has_the_hash_of_what_ran(hiding_run):
    w = hiding_run
    assert one(rows_for(w, "memfd"), "exe", "sha256", "exe_state", "cmdline") == (
        "/memfd:psn-hidden", sha256_of(w.send), "memfd", f"hidden 127.0.0.1 {w.peers['memfd']} 555 {LIFETIME_MS}")


def test_a_program_deleted_while_it_ran_has_the_hash_of_what_ran(hiding_run):
    w = hiding_run
    assert one(rows_for(w, "deleted"), "exe", "sha256", "exe_state") == (
        str(w.tmp / "gone"), sha256_of(w.send), "deleted")


def test_a_program_renamed_over_while_it_ran_has_the_hash_of_what_ran(hiding_run):
    w = hiding_run
    bash = shutil.which("bash")
    assert one(rows_for(w, "replaced"), "exe", "sha256", "exe_state") == (
        str(w.tmp / "victim"), sha256_of(bash), "replaced")


def test_a_program_in_a_world_writable_directory_is_marked(hiding_run):
    w = hiding_run
    assert one(rows_for(w, "world-writable"), "exe", "sha256", "exe_state") == (
        str(w.public / "dropped"), sha256_of(w.netops), "world-writable-dir")


def test_a_renamed_process_shows_its_new_name_next_to_its_real_exe(hiding_run):
    w = hiding_run
    assert one(rows_for(w, "renamed"), "exe", "name", "sha256") == (PY, "firefox", sha256_of(PY))




# --- run 3: where a changed sha256 came from ------------------------------------------------------


def build_deb(tmp: Path, version: str, program: Path, content: bytes) -> Path:
    """A real .deb of package psn-pkgtool at `version` that installs `content` as `program`."""
    tree = tmp / f"deb-{version}"
    target = tree / str(program).lstrip("/")
    target.parent.mkdir(parents=True)
    target.write_bytes(content)
    target.chmod(0o755)
    (tree / "DEBIAN").mkdir()
    (tree / "DEBIAN" / "control").write_text(
        f"Package: psn-pkgtool\nVersion: {version}\nArchitecture: all\nMaintainer: picosnitch tests <root@localhost>\n"
        "Description: a program the picosnitch tests install and upgrade\n")
    (tree / "DEBIAN" / "md5sums").write_text(f"{hashlib.md5(content).hexdigest()}  {str(program).lstrip('/')}\n")
    deb = tmp / f"psn-pkgtool_{version}_all.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "--build", str(tree), str(deb)], check=True,
                   capture_output=True)
    return deb


def private_dpkg(admindir: Path, log: Path) -> list:
    """dpkg with a database of its own (never the host's); files go where the package says, which
    is inside this test's directory."""
    for sub in ("info", "updates", "triggers"):
        (admindir / sub).mkdir(parents=True, exist_ok=True)
    (admindir / "status").touch()
    return ["dpkg", f"--admindir={admindir}", "--instdir=/", f"--log={log}", "--force-not-root"]


def exe_log_line(daemon: Daemon, *words: str, timeout: float = 15) -> str:
    """The first exe.log line holding every one of `words`, waited for."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = daemon.paths.exe_log
        for line in (log.read_text(errors="surrogateescape").splitlines() if log.exists() else []):
            if all(word in line for word in words):
                return line
        time.sleep(0.2)
    raise AssertionError(f"no exe.log line with {words}")


@pytest.fixture(scope="module")
def package_run(netops, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("package")
    admindir = tmp / "dpkg"
    dpkg = private_dpkg(admindir, tmp / "dpkg.log")
    program = tmp / "installed" / "psn-pkgtool"
    original = Path(netops).read_bytes()
    w = SimpleNamespace(program=program, lines={})
    sink = socket.create_server(("127.0.0.1", 0), backlog=16)  # connections complete in its backlog
    port = sink.getsockname()[1]
    daemon = Daemon(tmp / "prefix", **{"Dpkg database": str(admindir)})
    daemon.start()
    try:
        steps = (("1.0", original + b"\0psn-pkgtool 1.0"), ("2.0", original + b"\0psn-pkgtool 2.0"))
        for version, content in steps:
            subprocess.run([*dpkg, "-i", str(build_deb(tmp, version, program, content))], check=True,
                           capture_output=True)
            w.lines[version] = talk(daemon, program, port)
        program.write_bytes(original + b"\0changed by hand")  # in place: no package did this
        w.lines["by hand"] = talk(daemon, program, port)
    except BaseException:
        daemon.kill_group()
        raise
    finally:
        sink.close()
    w.result = stopped(daemon)
    return w


def talk(daemon: Daemon, program: Path, port: int) -> str:
    """Runs the program and returns the exe.log line its sha256 got."""
    subprocess.run([str(program), "quick", "127.0.0.1", str(port), "10"], check=True, capture_output=True)
    return exe_log_line(daemon, str(program), sha256_of(program))


def test_a_package_upgrade_is_reported_as_the_package_managers_doing(package_run):
    line = package_run.lines["2.0"]
    assert ", new sha256, " in line
    assert line.endswith(", updated by the package manager: psn-pkgtool 1.0 → 2.0")


def test_the_same_executable_changed_by_hand_is_modified_outside_any_package(package_run):
    line = package_run.lines["by hand"]
    assert ", new sha256, " in line and line.endswith(", modified outside any package")


def test_the_first_version_is_simply_new(package_run):
    assert ", new executable, " in package_run.lines["1.0"]
