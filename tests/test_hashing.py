"""Hashing executables: from the descriptor pinned at exec, live through /proc/PID/exe, after exit by
verified path; cached by what the file is (device, inode, ctime, size), never by inode number alone."""

import hashlib
import os
import shutil
import subprocess

import pytest

from picosnitch.identity.hashing import ALL_BITS, MISMATCH, MISSING, UNREADABLE, HashCache, HashResult, filesystem_magic
from picosnitch.kernel.pins import key_of


def sha256_of(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def sleeper(tmp_path):
    """A private copy of /bin/sleep, running: (process, path, dev, ino)."""
    exe = tmp_path / "sleeper"
    shutil.copy2("/bin/sleep", exe)
    proc = subprocess.Popen([str(exe), "60"])
    st = os.stat(exe)
    yield proc, exe, st.st_dev, st.st_ino
    proc.kill()
    proc.wait()


def test_hash_live_reads_the_running_executable(sleeper):
    proc, exe, dev, ino = sleeper
    result = HashCache().hash_live(proc.pid, dev, ino)
    assert result == HashResult(sha256_of(exe))
    assert result.ok


def test_hash_live_still_works_after_the_file_is_deleted(sleeper):
    proc, exe, dev, ino = sleeper
    expected = sha256_of(exe)
    exe.unlink()
    assert HashCache().hash_live(proc.pid, dev, ino).sha256 == expected


def test_a_deleted_file_is_never_answered_from_the_cache_by_its_inode_number(sleeper):
    """Once the file is gone its inode number may name another file: only a pin can vouch for it."""
    proc, exe, dev, ino = sleeper
    cache = HashCache()
    assert cache.hash_live(proc.pid, dev, ino).ok
    proc.kill()
    proc.wait()
    exe.unlink()
    assert cache.hash_path(str(exe), dev, ino).sha256 == MISSING


def test_a_file_modified_in_place_is_hashed_again_without_being_told(tmp_path):
    exe = tmp_path / "tool"
    exe.write_bytes(b"version 1")
    st = os.stat(exe)
    cache = HashCache()
    assert cache.hash_path(str(exe), st.st_dev, st.st_ino).sha256 == sha256_of(exe)
    with open(exe, "r+b") as f:  # same inode, another ctime: another key
        f.write(b"VERSION")
    assert cache.hash_path(str(exe), st.st_dev, st.st_ino).sha256 == sha256_of(exe)


def test_a_pinned_descriptor_hashes_the_file_that_ran_from_its_start(tmp_path):
    exe = tmp_path / "tool"
    exe.write_bytes(b"x" * 3_000_000)
    fd = os.open(exe, os.O_RDONLY)
    try:
        os.read(fd, 1000)  # whoever read it before: the hash still starts at offset 0
        expected = sha256_of(exe)
        exe.unlink()
        assert HashCache().hash_fd(key_of(os.fstat(fd)), fd, "tool").sha256 == expected
    finally:
        os.close(fd)


def test_hash_path_after_exit_verifies_the_inode(sleeper):
    proc, exe, dev, ino = sleeper
    proc.kill()
    proc.wait()
    assert HashCache().hash_path(str(exe), dev, ino) == HashResult(sha256_of(exe))


def test_a_replaced_file_is_a_mismatch_not_a_guess(sleeper):
    proc, exe, dev, ino = sleeper
    proc.kill()
    proc.wait()
    replacement = exe.with_name("new")
    replacement.write_bytes(b"#!/bin/sh\necho something else\n")
    os.rename(replacement, exe)  # what package managers do: new inode at the same path
    result = HashCache().hash_path(str(exe), dev, ino)
    assert result.sha256 == MISMATCH
    assert not result.ok
    assert f"inode {ino}" in result.error


def test_a_process_whose_executable_changed_is_a_mismatch(sleeper):
    proc, exe, dev, ino = sleeper
    result = HashCache().hash_live(proc.pid, dev, ino + 1)
    assert result.sha256 == MISMATCH


def test_missing_file_and_exited_process(tmp_path):
    cache = HashCache()
    result = cache.hash_path(str(tmp_path / "gone"), 1, 2)
    assert result.sha256 == MISSING
    assert "gone" in result.error
    proc = subprocess.Popen(["true"])
    proc.wait()
    assert cache.hash_live(proc.pid, 1, 2).sha256 == MISSING


def test_errors_are_not_cached(tmp_path):
    exe = tmp_path / "later"
    cache = HashCache()
    exe.write_bytes(b"")
    st = os.stat(exe)
    exe.unlink()
    assert cache.hash_path(str(exe), st.st_dev, st.st_ino).sha256 == MISSING
    assert len(cache) == 0


def test_a_fifo_at_the_path_does_not_block(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    st = os.stat(fifo)
    assert HashCache().hash_path(str(fifo), st.st_dev, st.st_ino).sha256 == UNREADABLE


def test_large_files_are_hashed_in_full(tmp_path):
    big = tmp_path / "big"
    big.write_bytes(os.urandom(3 * (1 << 20) + 12345))
    st = os.stat(big)
    assert HashCache().hash_path(str(big), st.st_dev, st.st_ino).sha256 == sha256_of(big)


def test_mask_zero_compares_only_the_inode(tmp_path):
    exe = tmp_path / "tool"
    exe.write_bytes(b"x")
    st = os.stat(exe)
    other_device = st.st_dev + 1  # as btrfs subvolumes report
    assert HashCache(0).hash_path(str(exe), other_device, st.st_ino).ok
    assert HashCache(ALL_BITS).hash_path(str(exe), other_device, st.st_ino).sha256 == MISMATCH


def test_filesystem_magic_names_the_filesystem():
    with open("/proc/self/status", "rb") as f:
        assert filesystem_magic(f.fileno()) == 0x9FA0  # PROC_SUPER_MAGIC


def test_automatic_mask_compares_the_device_on_this_filesystem(tmp_path):
    exe = tmp_path / "tool"
    exe.write_bytes(b"x")
    st = os.stat(exe)
    with open(exe, "rb") as f:
        assert filesystem_magic(f.fileno()) != 0x9123683E, "this test expects a non-btrfs tmp_path"
    assert HashCache().hash_path(str(exe), st.st_dev + 1, st.st_ino).sha256 == MISMATCH
