"""fanotify reports executables changed in place and replaced by rename (needs root)."""

import os
import select
import shutil
import subprocess

import pytest

from picosnitch.identity.fanotify import FAN_REPORT_FID, ExecutableWatcher

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="fanotify needs root")


class FidOnlyWatcher(ExecutableWatcher):
    """What Linux 5.1-5.8 offers: directory events without the entry's name."""

    FID_MODES = (FAN_REPORT_FID,)


class PlainWatcher(ExecutableWatcher):
    """What kernels without file handle reporting offer: writes to the file only."""

    FID_MODES = ()


@pytest.fixture
def exe(tmp_path):
    path = tmp_path / "tool"
    shutil.copy2("/bin/true", path)
    return path


def changes(watcher, timeout=2.0):
    """The next batch of changed paths, waiting for the watcher's fd to become readable."""
    readable, _, _ = select.select([watcher], [], [], timeout)
    return watcher.read_changes() if readable else []


def modify_in_place(path):
    with open(path, "r+b") as f:
        f.seek(0, os.SEEK_END)
        f.write(b"\0appended")


def replace_by_rename(path):
    new = path.with_name(path.name + ".new")
    shutil.copy2("/bin/false", new)
    os.rename(new, path)


def test_a_change_in_place_is_reported(exe):
    with ExecutableWatcher() as watcher:
        assert watcher.watch(str(exe)) is True
        assert watcher.read_changes() == []
        modify_in_place(exe)
        assert changes(watcher) == [str(exe)]


def test_replacement_by_rename_is_reported(exe):
    with ExecutableWatcher() as watcher:
        watcher.watch(str(exe))
        replace_by_rename(exe)
        assert changes(watcher) == [str(exe)]


def test_the_file_that_replaced_a_watched_one_is_watched_too(exe):
    with ExecutableWatcher() as watcher:
        watcher.watch(str(exe))
        replace_by_rename(exe)
        assert changes(watcher) == [str(exe)]
        modify_in_place(exe)
        assert changes(watcher) == [str(exe)]


def test_unlink_and_create_at_the_same_path_is_reported(exe):
    with ExecutableWatcher() as watcher:
        watcher.watch(str(exe))
        exe.unlink()
        exe.write_bytes(b"#!/bin/sh\n")
        assert changes(watcher) == [str(exe)]


def test_other_files_in_the_directory_are_not_reported(exe):
    with ExecutableWatcher() as watcher:
        watcher.watch(str(exe))
        (exe.parent / "unrelated").write_bytes(b"x")
        os.rename(exe.parent / "unrelated", exe.parent / "moved")
        assert changes(watcher, timeout=0.3) == []


def test_reading_an_executable_is_not_a_change(exe):
    with ExecutableWatcher() as watcher:
        watcher.watch(str(exe))
        exe.read_bytes()
        subprocess.run([str(exe)], check=True)
        assert changes(watcher, timeout=0.3) == []


def test_symlinks_are_reported_by_their_target(exe):
    link = exe.with_name("link")
    link.symlink_to(exe)
    with ExecutableWatcher() as watcher:
        watcher.watch(str(link))
        modify_in_place(exe)
        assert changes(watcher) == [str(exe)]


def test_several_files_in_one_directory(tmp_path):
    paths = [tmp_path / name for name in ("a", "b", "c")]
    for path in paths:
        shutil.copy2("/bin/true", path)
    with ExecutableWatcher() as watcher:
        for path in paths:
            watcher.watch(str(path))
        modify_in_place(paths[0])
        replace_by_rename(paths[2])
        assert changes(watcher) == [str(paths[0]), str(paths[2])]


def test_without_entry_names_every_watched_file_of_the_directory_is_reported(tmp_path):
    paths = [tmp_path / name for name in ("a", "b")]
    for path in paths:
        shutil.copy2("/bin/true", path)
    with FidOnlyWatcher() as watcher:
        assert not watcher.reports_names
        for path in paths:
            assert watcher.watch(str(path)) is True
        modify_in_place(paths[0])
        assert changes(watcher) == [str(paths[0])]
        replace_by_rename(paths[1])
        assert changes(watcher) == [str(p) for p in paths]


def test_without_file_handles_only_changes_in_place_are_seen(exe):
    with PlainWatcher() as watcher:
        assert watcher.watch(str(exe)) is False
        modify_in_place(exe)
        assert changes(watcher) == [str(exe)]
        replace_by_rename(exe)
        assert changes(watcher, timeout=0.3) == []


def test_watching_a_missing_file_is_an_error(tmp_path):
    with ExecutableWatcher() as watcher:
        with pytest.raises(OSError):
            watcher.watch(str(tmp_path / "missing"))
