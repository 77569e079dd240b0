"""Guard mode in the whole daemon (real BPF): a name looked up with getaddrinfo, as the kernel
monitor reports it, decides a `domain` rule; the verdict lands in snitch.db with the name."""

import os
import sqlite3
import subprocess
import time

import pytest
from daemon_harness import Daemon
from guard_harness import CLIENT, PYTHON, peer_lab
from netlab import PEER4


@pytest.fixture(scope="module")
def lab(lab):
    yield from peer_lab(lab, [PEER4])


def test_a_domain_rule_decides_a_name_getaddrinfo_returned(lab, tmp_path):
    port = lab.peer.ports[PEER4]
    hosts = tmp_path / "hosts"
    hosts.write_text(f"127.0.0.1 localhost\n{PEER4} www.guard-test.example\n")
    daemon = Daemon(tmp_path, **{"Guard mode": "ask", "Guard interfaces": [lab.host_if],
                                 "Guard queue number": 30000 + os.getpid() % 10000,
                                 "Desktop notifications": False, "Guard timeout (seconds)": 20})
    daemon.paths.config_dir.mkdir(parents=True, exist_ok=True)
    daemon.paths.rules.write_text("allow out domain *.guard-test.example proto tcp\n")
    with daemon:
        # The client resolves the name through /etc/hosts (its own, in a private mount namespace).
        lookup = CLIENT.replace("s.connect((host, port))",
                                "s.connect((socket.getaddrinfo(host, port, socket.AF_INET)[0][4][0], port))")
        script = f'mount --bind {hosts} /etc/hosts && exec {PYTHON} -c "$0" "$@"'
        out = subprocess.run(["unshare", "-m", "sh", "-c", script, lookup, "tcp", "www.guard-test.example",
                              str(port), "15"], capture_output=True, text=True, timeout=60)
        assert out.stdout.strip() == "ok hi", out
        time.sleep(1.5)
        conn = sqlite3.connect(daemon.paths.db)
        rows = conn.execute("SELECT exe, domain, raddr, verdict, reason, rule FROM guard_verdicts").fetchall()
        assert (PYTHON, "www.guard-test.example", PEER4, "allowed", "rule",
                "line 1: allow out domain *.guard-test.example proto tcp") in rows, rows
        assert "guard" not in daemon.error_log(), daemon.error_log()
