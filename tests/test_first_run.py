"""What a new user meets first: the readers without a terminal, a missing optional package, a
config.json that cannot be used. Each is one sentence on stderr and an exit status, never a
traceback, and a missing package names the command that installs it for this installation."""

import multiprocessing
import os
import subprocess
import sys

import pytest
from daemon_harness import REPO

from picosnitch import channels, config, installed
from picosnitch.alerts import vt_worker
from picosnitch.daemon.live_feed import LiveFeedServer
from picosnitch.installed import EXTRAS, install_command, install_extra, method
from picosnitch.messages import ErrorReport, Stop, VtRequest
from picosnitch.paths import Paths
from picosnitch.store import sqlite as sqlite_store


def picosnitch(prefix, *args, python=(sys.executable,)) -> subprocess.CompletedProcess:
    """`picosnitch ARGS` with no terminal: input from /dev/null, output captured."""
    env = dict(os.environ, PICOSNITCH_PREFIX=str(prefix), PYTHONPATH=str(REPO))
    env.pop("SUDO_UID", None)
    return subprocess.run([*python, "-m", "picosnitch", *args], stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, env=env, timeout=60)


def one_sentence(result, status: int, command: str) -> str:
    assert result.returncode == status and result.stdout == "", result
    assert result.stderr.startswith(f"picosnitch {command}") and result.stderr.count("\n") == 1, result
    assert "Traceback" not in result.stderr
    return result.stderr


@pytest.fixture
def prefix(tmp_path):
    """A prefix with an empty snitch.db."""
    paths = Paths.under(tmp_path)
    paths.ensure_dirs()
    conn, _ = sqlite_store.open_db(str(paths.db))
    sqlite_store.close_db(conn)
    return tmp_path


def test_view_without_a_terminal_says_so_and_exits_2(prefix):
    said = one_sentence(picosnitch(prefix, "view"), 2, "view")
    assert "run it in a terminal" in said


def test_top_without_a_terminal_says_so_and_exits_2(prefix):
    feed = LiveFeedServer(Paths.under(prefix).live_socket)
    try:
        said = one_sentence(picosnitch(prefix, "top"), 2, "top")
    finally:
        feed.close()
    assert "run it in a terminal" in said


def test_an_unusable_config_stops_view_with_its_sentence(prefix):
    paths = Paths.under(prefix)
    paths.config.write_text('{"GeoIP lookup": "yes"}\n')
    said = one_sentence(picosnitch(prefix, "view"), 1, "view")
    assert said == f'picosnitch view: {paths.config} line 1: "GeoIP lookup" must be true or false, not "yes"\n'


def test_dash_without_its_packages_names_the_command_that_installs_them(prefix):
    # `python -S`: no site-packages, so no starlette, as for an installation without them.
    result = picosnitch(prefix, "dash", python=(sys.executable, "-S"))
    said = one_sentence(result, 1, "dash")
    command = subprocess.run(
        [sys.executable, "-S", "-c", "from picosnitch.installed import install_extra; "
         "print(install_extra('dash'))"], capture_output=True, text=True, check=True,
        env=dict(os.environ, PYTHONPATH=str(REPO))).stdout.strip()
    assert said.endswith(f"install them with `{command}`\n")


# ---- the command for each way of installing ----

@pytest.mark.parametrize("package_dir, prefix, base, expected", [
    ("/usr/lib/python3/dist-packages/picosnitch", "/usr", "/usr", "deb"),
    ("/opt/picosnitch/lib/python3.11/site-packages/picosnitch", "/opt/picosnitch", "/usr", "venv"),
    ("/root/.local/share/pipx/venvs/picosnitch/lib/python3.11/site-packages/picosnitch",
     "/root/.local/share/pipx/venvs/picosnitch", "/usr", "pipx"),
    ("/home/me/src/picosnitch/picosnitch", "/opt/python3.12", "/opt/python3.12", "pip"),
])
def test_how_picosnitch_was_installed(package_dir, prefix, base, expected):
    assert method(package_dir, prefix, base) == expected


def test_each_installation_gets_its_own_command(monkeypatch):
    dash = EXTRAS["dash"]
    monkeypatch.setattr(installed, "method", lambda: "deb")
    assert install_command(dash) == "sudo apt install python3-starlette python3-uvicorn"
    monkeypatch.setattr(installed, "method", lambda: "venv")
    monkeypatch.setattr(sys, "prefix", "/opt/picosnitch")
    monkeypatch.setattr(sys, "executable", "/opt/picosnitch/bin/python3")
    expected = "/opt/picosnitch/bin/python3 -m pip install 'starlette>=0.37' 'uvicorn>=0.29'"
    assert install_command(dash) in (expected, "sudo " + expected)  # sudo unless it is ours
    monkeypatch.setattr(installed, "method", lambda: "pipx")
    assert install_command(dash).endswith("pipx inject picosnitch 'starlette>=0.37' 'uvicorn>=0.29'")
    # a package Debian does not have is installed with pip even for the Debian package
    monkeypatch.setattr(installed, "method", lambda: "deb")
    assert install_command(installed.Packages(("mariadb",))).endswith("-m pip install mariadb")


def test_virustotal_without_requests_says_what_to_install_once_and_waits_for_stop(monkeypatch):
    monkeypatch.setitem(sys.modules, "requests", None)  # import now raises ImportError
    ctx = multiprocessing.get_context("fork")
    inbox, to_worker = channels.pair(sender_waits=True)
    from_worker, outbox = channels.pair()
    cfg = dict(config.defaults(), **{"VT API key": "k" * 64})
    worker = ctx.Process(target=vt_worker.run, args=(cfg, inbox, outbox))
    worker.start()
    to_worker.send(VtRequest("/usr/bin/x", "x", "ab" * 32))
    to_worker.send(Stop("keeper"))
    worker.join(10)
    assert worker.exitcode == 0
    said = []
    while from_worker.poll(0.5):
        said.append(from_worker.recv())
    assert said == [ErrorReport("VirusTotal lookups need the Python package requests (install it with: "
                                f"{install_extra('virustotal')}); they are off", "virustotal")]
