"""Identity that is never wrong and cannot be dodged, against the real daemon.

Each module fixture is one run of `picosnitch start-no-daemon` (tests/daemon_harness.py) while
real processes try what a program that wants to hide would: exec its parent's binary, run through
ld.so or an interpreter, run from a memfd, delete or replace its executable, rename itself. The
tests read the `connections` view it left and compare each row with what the process really was:
its own command line, the program that ran (path and a sha256 equal to hashlib's of that file),
the script an interpreter ran, and the name it had when it sent.
"""

import socket
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from daemon_harness import Daemon
from netlab import UdpEcho
from test_daemon_identity import PY, Servers, run, stopped

GEN = str(Path(__file__).resolve().parent / "traffic_gen.py")
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
