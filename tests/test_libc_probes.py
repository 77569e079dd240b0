"""Which files of a root get the getaddrinfo uprobes, and that each gets them once."""

import os

from picosnitch.kernel.libc_probes import MAX_LIBRARIES, LibcProbes, c_libraries


def elf(path, body=b""):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x7fELF" + body)


def test_c_libraries_are_found_in_the_usual_directories_of_a_root(tmp_path):
    elf(tmp_path / "lib/x86_64-linux-gnu/libc.so.6")  # glibc
    elf(tmp_path / "usr/lib/x86_64-linux-musl/libc.so")  # musl, Debian
    elf(tmp_path / "lib/ld-musl-x86_64.so.1")  # musl, Alpine
    (tmp_path / "usr/lib/x86_64-linux-gnu").mkdir(parents=True)
    (tmp_path / "usr/lib/x86_64-linux-gnu/libc.so").write_text("/* GNU ld script */\n")  # not a library
    os.symlink("/lib/ld-musl-x86_64.so.1", tmp_path / "lib/libc.musl-x86_64.so.1")  # a link: found by its target
    elf(tmp_path / "opt/lib/libc.so.6")  # not a usual directory
    elf(tmp_path / "lib/libm.so.6")  # not a C library

    found = {os.path.relpath(p, tmp_path) for p in c_libraries(str(tmp_path))}
    assert found == {"lib/x86_64-linux-gnu/libc.so.6", "usr/lib/x86_64-linux-musl/libc.so", "lib/ld-musl-x86_64.so.1"}


def test_each_file_is_probed_once_whatever_path_leads_to_it(tmp_path):
    elf(tmp_path / "lib/libc.so.6")
    os.link(tmp_path / "lib/libc.so.6", tmp_path / "libc-hardlink.so.6")
    attached = []
    probes = LibcProbes(attached.append, lambda message: None)
    assert probes.add(str(tmp_path / "lib/libc.so.6"))
    assert not probes.add(str(tmp_path / "libc-hardlink.so.6"))
    assert attached == [str(tmp_path / "lib/libc.so.6")]


def test_a_root_is_scanned_when_a_process_first_execs_in_it(tmp_path):
    proc = tmp_path / "proc"
    root = tmp_path / "container"
    elf(root / "lib/libc.so.6")
    for pid in (100, 101):
        (proc / str(pid) / "ns").mkdir(parents=True)
        os.symlink("mnt:[4026532000]", proc / str(pid) / "ns" / "mnt")
        os.symlink(root, proc / str(pid) / "root")
    attached = []
    probes = LibcProbes(attached.append, lambda message: None, proc=str(proc))
    assert probes.notice(100) == [str(proc / "100/root/lib/libc.so.6")]
    assert probes.notice(101) == []  # the same namespace and root: nothing to do
    assert len(attached) == 1


def test_past_the_limit_libraries_are_reported_once_not_probed(tmp_path):
    reports, attached = [], []
    probes = LibcProbes(attached.append, reports.append)
    for i in range(MAX_LIBRARIES + 3):
        elf(tmp_path / f"{i}/libc.so.6")
        probes.add(str(tmp_path / f"{i}/libc.so.6"))
    assert len(attached) == MAX_LIBRARIES
    assert len(reports) == 1 and "getaddrinfo" in reports[0]


def test_a_library_that_cannot_be_probed_is_reported_and_skipped(tmp_path):
    def refuse(path):
        raise OSError("no getaddrinfo symbol")

    elf(tmp_path / "libc.so.6")
    reports = []
    probes = LibcProbes(refuse, reports.append)
    assert not probes.add(str(tmp_path / "libc.so.6"))
    assert reports == [f"getaddrinfo in {tmp_path / 'libc.so.6'} cannot be watched: no getaddrinfo symbol"]
