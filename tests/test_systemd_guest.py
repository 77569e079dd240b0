"""picosnitch.service under a real systemd, installed from the .deb with apt as a user would.

The host is never the place for this: installing and purging the package there would delete a
user's own /etc/picosnitch, /var/lib/picosnitch and /var/log/picosnitch (tests/host_guard.py fails
any test that touches them). Instead a Debian root made by debootstrap from the mirror apt is
configured with (cached, always remakeable: tests/guests.root_image) boots in a qemu guest with
Debian's default kernel (PICOSNITCH_SYSTEMD_KERNEL names another) and systemd as PID 1. The guest has no network but loopback; the .deb's
dependencies are in the root already, from the archive. tests/guest/systemd_facts.py installs the
package, drives the unit and writes down what it saw; the tests below judge those facts.
"""

import json
import os
import re
from pathlib import Path

import guests
import pytest

from picosnitch import __version__

REPO = guests.REPO
GUEST_TIMEOUT = 600  # seconds: the guest takes 2-3.5 min under TCG here


@pytest.fixture(scope="module")
def facts(deb):
    guests.require_guests()
    kernel = guests.fetch(guests.resolve([os.environ.get("PICOSNITCH_SYSTEMD_KERNEL", "default")])[0])
    image = guests.root_image(deb)
    results = guests.run_dir("systemd")
    for name in (deb, REPO / "tests/guest/systemd_facts.py"):
        (results / Path(name).name).write_bytes(Path(name).read_bytes())
    boot = guests.boot_systemd(kernel, image, f"/usr/bin/python3 {results}/systemd_facts.py {results}", results,
                               GUEST_TIMEOUT)
    guests.record_wall_time(f"systemd {kernel.release}", boot.seconds)
    found = guests.Results(results, boot)
    text = found.file("facts.json")
    assert text, found.why_unfinished()
    seen = json.loads(text)
    seen["_results"] = found
    return seen


def test_the_guest_runs_every_step(facts):
    assert facts.get("errors", []) == [] and facts.get("done"), facts["_results"].why_unfinished()


def test_the_system_boots_to_running_with_nothing_failed(facts):
    assert facts["system_state"] == "running", facts["failed_units"]


def test_apt_installs_the_deb_and_starts_the_unit(facts):
    assert facts["install"]["status"] == 0, facts["install"]["output"]
    assert facts["after_install"] == {"ActiveState": "active", "UnitFileState": "enabled", "Type": "notify"}
    assert all(facts["installed_files"].values()), facts["installed_files"]
    status, version = facts["version"]
    assert status == 0 and version.startswith(f"picosnitch {__version__}\n") and "(/usr/bin/python3" in version


def test_systemctl_start_returns_once_ready(facts):
    assert facts["start"]["status"] == 0, facts["start"]["output"]
    assert facts["after_start"]["ActiveState"] == "active" and facts["after_start"]["SubState"] == "running"
    assert facts["after_start"]["NRestarts"] == "0"


def test_traffic_sent_as_start_returns_is_recorded_under_the_sandbox(facts):
    # Sent the moment `systemctl start` returned: the BPF programs were attached by then.
    assert facts["first_client_status"] == 0
    rows = facts["first_rows"]
    assert [(r["send"], r["exe"], r["uid"]) for r in rows] == [(facts["first_sent"], "/usr/bin/python3.11", 0)]
    assert re.fullmatch(r"[0-9a-f]{64}", rows[0]["sha256"])


def test_systemd_analyze_security_gives_the_exposure_the_readme_states(facts):
    status, output = facts["security"]
    found = re.search(r"Overall exposure level for picosnitch\.service: (\d+\.\d)", output)
    assert found, output[-2000:]
    stated = re.search(r"exposure level of ([\d.]+)", (REPO / "README.md").read_text())
    assert stated and found.group(1) == stated.group(1)


def test_restart_and_stop_are_clean(facts):
    assert facts["restart"]["status"] == 0, facts["restart"]["output"]
    assert facts["after_restart"]["ActiveState"] == "active" and facts["restart_pid_changed"]
    assert facts["after_restart"]["NRestarts"] == "0"
    assert facts["stop"]["status"] == 0, facts["stop"]["output"]
    assert facts["after_stop"] == {"ActiveState": "inactive", "Result": "success", "ExecMainStatus": "0",
                                   "ExecMainCode": "1"}
    assert facts["processes_left"] == []


def test_a_broken_config_exits_78_without_a_restart_loop(facts):
    assert facts["start_broken"]["status"] != 0
    assert facts["after_broken"] == {"ActiveState": "failed", "Result": "exit-code", "ExecMainStatus": "78",
                                     "NRestarts": "0"}
    assert "/etc/picosnitch/config.json" in facts["broken_journal"] and "DB sql log" in facts["broken_journal"]


def test_apt_purge_removes_everything(facts):
    assert facts["purge"]["status"] == 0, facts["purge"]["output"]
    assert facts["left_after_purge"] == []
    assert facts["after_purge"]["LoadState"] == "not-found"
    status, output = facts["dpkg_after_purge"]
    assert "no packages found matching picosnitch" in output or output == "unknown ok not-installed"
