"""The kernel monitor on the kernels users run: every kernel-monitor test, the guard's socket
owner tests and the quick accuracy suite, inside a qemu guest booted with a stock Debian kernel from the archive (tests/guests.py).

By default the kernels are Debian's default (6.1 on Debian 12) and the newest the archive offers,
resolved when the tests run; PICOSNITCH_KERNELS="6.1 6.12 linux-image-..." picks others
(scripts/kernel-matrix.sh passes its arguments this way). One guest per kernel, one at a time.

A guest passes only when it ran every test the host collects from GUEST_TESTS (the same files as
tests/guest/matrix.sh runs) and each passed there: a skip in the guest is not a pass. Where qemu cannot run, these tests say
"not run" in the warnings summary and skip; under CI (CI=true) they fail instead, since CI
installs qemu itself (scripts/install-system-deps.sh test).
"""

import json
import os
import subprocess
import sys
from collections import Counter

import guests
import pytest

from bench.accuracy import QUICK

# Seconds per guest: measured 8-11 min under TCG here; three guests timing out must still leave CI
# (90 min in all, the host suite ~15 of them) time to report.
GUEST_TIMEOUT = float(os.environ.get("PICOSNITCH_GUEST_TIMEOUT", 1200))


def wanted_kernels():
    try:
        return guests.resolve(os.environ.get("PICOSNITCH_KERNELS", "").split())
    except (RuntimeError, OSError) as e:  # no apt here, or no kernel matching
        return [pytest.param(f"unresolved: {e}", id="unresolved")]


def per_function(test_ids) -> Counter:
    """How many cases each test function has (parameters name per-session addresses, which differ
    between the host and a guest)."""
    return Counter(test_id.split("[", 1)[0] for test_id in test_ids)


GUEST_TESTS = ("tests/test_kernel_monitor.py", "tests/test_guard_owners.py")


@pytest.fixture(scope="module")
def kernel_monitor_tests():
    """What the host collects from GUEST_TESTS: each case must run in a guest."""
    listed = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--collect-only", "-q",
                             *GUEST_TESTS], cwd=guests.REPO, capture_output=True, text=True)
    cases = per_function(line.split("::", 1)[1] for line in listed.stdout.splitlines() if "::" in line)
    assert cases, listed.stdout + listed.stderr
    return cases


@pytest.fixture(scope="module", params=wanted_kernels())
def guest(request):
    """One guest run per kernel: boots it with tests/guest/matrix.sh and returns its results."""
    guests.require_guests(request.param if request.param.startswith("unresolved:") else None)
    kernel = guests.fetch(request.param)
    results = guests.run_dir(kernel.release)
    boot = guests.boot(kernel, f"{guests.REPO}/tests/guest/matrix.sh tests {results}", results, GUEST_TIMEOUT)
    guests.record_wall_time(f"matrix {kernel.release}", boot.seconds)
    return guests.Results(results, boot)


def test_the_guest_runs_to_the_end(guest):
    assert guest.file("done"), guest.why_unfinished()


def test_the_guest_booted_the_kernel_it_was_given(guest, request):
    assert guest.file("uname").strip() == request.node.callspec.params["guest"].removeprefix("linux-image-")


def test_every_kernel_monitor_test_runs_in_the_guest(guest, kernel_monitor_tests):
    ran = guest.junit("kernel_monitor.xml")
    assert per_function(ran) == kernel_monitor_tests, guest.log_tail("kernel_monitor.log")
    skipped = {name: outcome[1] for name, outcome in ran.items() if outcome[0] == "skipped"}
    assert skipped == {}, "a skip in the guest is not a pass"


def test_every_kernel_monitor_test_passes_in_the_guest(guest):
    ran = guest.junit("kernel_monitor.xml")
    failed = {name: outcome[1] for name, outcome in ran.items() if outcome[0] in ("failure", "error")}
    assert failed == {}, guest.log_tail("load.log", 20) + "\n" + guest.log_tail("kernel_monitor.log", 60)
    assert guest.file("kernel_monitor.rc").strip() == "0"


def test_quick_accuracy_detects_every_scenario_exactly(guest):
    assert guest.file("accuracy.rc").strip() == "0", guest.log_tail("accuracy.log", 60)
    scenarios = json.loads(guest.file("accuracy.json"))["scenarios"]
    verdicts = {s["number"]: [(r["detection"], r["bytes"]) for r in s["runs"]] or s.get("na") for s in scenarios}
    assert verdicts == {n: [("PASS", "PASS")] for n in QUICK}, guest.log_tail("accuracy.log", 60)
