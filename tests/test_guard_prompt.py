"""`picosnitch prompt` driven in tmux against a guard on real netfilter."""

import os
import sys
import time

import pytest
from daemon_harness import REPO
from guard_harness import PYTHON, GuardRun, client, peer_lab
from netlab import PEER4
from test_view_tui import Tmux


@pytest.fixture(scope="module")
def lab(lab):
    yield from peer_lab(lab, [PEER4])


def test_the_terminal_prompt_answers_from_the_keyboard_and_ignores_early_keys(lab, tmp_path):
    port = lab.peer.ports[PEER4]
    with GuardRun(tmp_path, lab, "") as guard:
        ui = Tmux([sys.executable, "-m", "picosnitch", "prompt"],
                  {"PICOSNITCH_PREFIX": str(tmp_path), "PYTHONPATH": str(REPO)}, width=120, height=24)
        try:
            ui.wait_for("No connection is waiting")
            proc = client("tcp", PEER4, port, timeout=30, wait=False)
            screen = ui.wait_for(f"outgoing to {PEER4} port {port} tcp")
            ui.keys("y")  # within half a second of the prompt appearing: ignored
            assert f"program  {PYTHON}" in screen and "(new executable)" in screen and "user root" in screen
            assert "name     (no name)  (none: no lookup seen)" in screen
            time.sleep(1.0)
            assert proc.poll() is None and "1 waiting" in ui.screen()
            ui.keys("f")
            ui.wait_for("answer   forever, this program")
            ui.keys("p")
            ui.wait_for("any port")
            ui.keys("y")
            assert proc.communicate(timeout=20)[0].strip() == "ok hi"
            ui.wait_for("No connection is waiting")
            assert guard.paths.rules.read_text() == f"allow out exe {PYTHON} addr {PEER4} proto tcp\n"
            guard.set_rules("")
            proc = client("udp", PEER4, port, timeout=30, wait=False)
            ui.wait_for(f"outgoing to {PEER4} port {port} udp")
            time.sleep(0.6)
            ui.keys("n")
            assert proc.communicate(timeout=20)[0].strip() == "refused"
            ui.wait_for("No connection is waiting")
            assert guard.paths.rules.read_text() == ""  # denied once: no rule
            ui.keys("q")
            ui.wait_for("EXIT=0")
        finally:
            ui.close()


def test_prompt_says_so_when_guard_mode_does_not_run(tmp_path):
    import subprocess
    result = subprocess.run([sys.executable, "-m", "picosnitch", "prompt"], capture_output=True, text=True,
                            env=dict(os.environ, PICOSNITCH_PREFIX=str(tmp_path), PYTHONPATH=str(REPO)))
    assert result.returncode == 1
    assert result.stdout.startswith("picosnitch prompt: guard mode does not run")


def test_view_shows_the_guard_verdicts(tmp_path):
    import socket as socket_module

    from picosnitch.guard.engine import Verdict
    from picosnitch.guard.rules import Attempt, Program
    from picosnitch.guard.store import VerdictStore
    from picosnitch.paths import Paths
    paths = Paths.under(tmp_path)
    paths.ensure_dirs()
    store = VerdictStore(str(paths.db))
    a = Attempt("out", socket_module.AF_INET, 6, "10.0.0.1", 40000, "93.184.216.34", 443, "www.example.com", 1000,
                lambda: Program(5, "/usr/bin/curl", "a" * 64, "", "/usr/bin/bash", "curl x", "", "curl", 1000))
    a.who
    b = Attempt("in", socket_module.AF_INET6, 17, "fd00::1", 53, "fd00::2", 5555, "", -1)
    store.write([Verdict(time.time() - 5, a, "allowed", "rule", "line 3: allow exe /usr/bin/curl"),
                 Verdict(time.time(), b, "denied", "timeout")])
    store.close()
    ui = Tmux([sys.executable, "-m", "picosnitch", "view"],
              {"PICOSNITCH_PREFIX": str(tmp_path), "PYTHONPATH": str(REPO)}, width=140, height=20)
    try:
        ui.wait_for("? help")
        ui.keys("g")
        screen = ui.wait_for("guard verdicts, newest first")
        lines = [line for line in screen.splitlines() if "allowed" in line or "denied" in line]
        assert "denied  timeout  in  (program not looked up) → fd00::2 port 53 udp" in lines[0]
        assert "allowed rule     out /usr/bin/curl → www.example.com 93.184.216.34 port 443 tcp  " \
               "[line 3: allow exe /usr/bin/curl]" in lines[1]
        ui.keys("x")
        ui.wait_for("? help")
    finally:
        ui.close()
