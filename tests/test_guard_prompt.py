"""`picosnitch prompt` driven in tmux against a guard on real netfilter."""

import os
import sys
import time

import pytest

from daemon_harness import REPO
from guard_harness import PYTHON, GuardRun, Peer, client
from netlab import PEER4, NetLab
from test_view_tui import Tmux


@pytest.fixture(scope="module")
def lab():
    if os.geteuid() != 0:
        pytest.skip("needs root: iptables and network namespaces")
    with NetLab() as lab:
        lab.peer = Peer(lab, [PEER4])
        yield lab
        lab.peer.stopped = True


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
