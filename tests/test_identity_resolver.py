"""Which image sent: the resolver never lends one program's identity to another's traffic.

Real processes, read from /proc as the identity worker reads them; the flow keys are what the
kernel would report for them.
"""

import os
import subprocess
from pathlib import Path

import pytest

from picosnitch import config
from picosnitch.identity.resolver import UNKNOWN, IdentityResolver
from picosnitch.kernel.records import Exec
from picosnitch.messages import ErrorReport

NETNS = 4026531840


@pytest.fixture
def sleeper():
    proc = subprocess.Popen(["sleep", "30"])
    yield proc
    proc.kill()
    proc.wait()


def test_traffic_from_an_executable_the_known_image_did_not_run_is_unknown_not_borrowed(sleeper):
    # The image read from /proc is what the process runs now. Traffic it sent under an earlier
    # exec whose record was lost came from another executable (here: python's).
    reports: list = []
    resolver = IdentityResolver(config.defaults(), reports.append)
    python = Path("/proc/self/exe").stat()
    identity = resolver.identity(sleeper.pid, os.getpid(), 7, "sleep", python.st_dev, python.st_ino, 0, NETNS)

    assert (identity.process.exe, identity.process.sha256, identity.process.name) == (UNKNOWN, UNKNOWN, "sleep")
    (why,) = [r.message for r in reports if isinstance(r, ErrorReport)]
    assert why == (f"traffic from process {sleeper.pid} came from executable device {python.st_dev} inode "
                   f"{python.st_ino}, but the image known for it ran {os.path.realpath('/bin/sleep')} (device "
                   f"{os.stat('/bin/sleep').st_dev} inode {os.stat('/bin/sleep').st_ino}): recorded as unknown")


def test_traffic_from_the_executable_the_image_ran_is_its_own(sleeper):
    reports: list = []
    resolver = IdentityResolver(config.defaults(), reports.append)
    sleep = os.stat(f"/proc/{sleeper.pid}/exe")
    identity = resolver.identity(sleeper.pid, os.getpid(), 7, "sleep", sleep.st_dev, sleep.st_ino, 0, NETNS)

    assert identity.process.exe == os.path.realpath("/bin/sleep")
    assert identity.process.sha256 not in (UNKNOWN, "")
    assert not [r for r in reports if isinstance(r, ErrorReport)]


def test_an_exec_names_its_executable_by_the_kernels_device_exactly(sleeper):
    # Two btrfs subvolumes (or overlay mounts) are two anonymous devices, and their inode numbers
    # repeat: the same inode number on another of them is another file. Only an image read from
    # /proc has stat's device, which on btrfs is not the kernel's, and is matched by inode.
    reports: list = []
    resolver = IdentityResolver(config.defaults(), reports.append)
    subvolume, other = os.makedev(0, 40), os.makedev(0, 41)
    resolver.table.apply(Exec(sleeper.pid, os.getpid(), 0, subvolume, 257, "sleep", "/bin/sleep",
                              ("sleep", "30"), False, 0.0, exec_id=9))

    elsewhere = resolver.identity(sleeper.pid, os.getpid(), 9, "sleep", other, 257, 0, NETNS)
    assert elsewhere.process.exe == UNKNOWN
    assert [r.key for r in reports if isinstance(r, ErrorReport)] == [f"unknown-exe:{other}:257"]
    resolver.batch_identities.clear()
    assert resolver.identity(sleeper.pid, os.getpid(), 9, "sleep", subvolume, 257, 0, NETNS).process.exe != UNKNOWN
