"""Domain names from every resolver, and never a wrong one, against the real daemon.

Every kind of program learns a name its own way (tests/name_lab.py): through the C library, its
own DNS client, a statically linked resolver, another root with musl, a local stub resolver, TLS
SNI or an HTTP Host header alone. All of them connect to one address moments apart, and each must
get the name it used, and a program that named nothing must get none: the situation of thousands
of names behind one CDN address.
"""

import time

import pytest
from daemon_harness import Daemon, wait_for
from name_lab import NameLab, available, tag
from netlab import PEER4


@pytest.fixture(scope="module")
def named(lab, tmp_path_factory):
    if not available():
        pytest.skip("needs dnsmasq-base and musl-tools (scripts/install-system-deps.sh test)")
    work = tmp_path_factory.mktemp("names")
    names = NameLab(lab, work).start()
    daemon = Daemon(work / "prefix").start()
    try:
        names.run()
        wait_for(lambda: len({r["cmdline"] for r in daemon.rows("raddr = ? AND rport = ?", (PEER4, names.port))})
                 >= len(names.commands(0)), what="a row for every client")
        time.sleep(1.5)
    finally:
        daemon.stop()
        names.stop()
    rows = daemon.rows("raddr = ? AND rport = ?", (PEER4, names.port))
    return {kind: names.rows_of(rows, kind) for kind in names.commands(0)}


@pytest.mark.parametrize("kind,sources", [
    ("libc", {"getaddrinfo", "dns"}),  # glibc's own DNS client, through the uprobes or the answer
    ("curl", {"http", "getaddrinfo", "dns"}),
    ("own-dns", {"dns"}),  # no C library involved: only the answer, read in the kernel, names it
    ("static", {"dns"}),  # statically linked musl: no uprobe can see its resolver
    ("musl-root", {"getaddrinfo", "dns"}),
    ("two-a", {"getaddrinfo", "dns"}),
    ("two-b", {"getaddrinfo", "dns"}),
    ("stub", {"getaddrinfo", "dns"}),  # answered by the local stub on 127.0.0.53
    ("tls", {"sni"}),
    ("http", {"http"}),
])
def test_each_kind_of_client_gets_the_name_it_used_and_how_it_was_learned(named, kind, sources):
    rows = named[kind]
    assert rows, f"no row for the {kind} client"
    expected = ".".join(reversed(tag(kind).split(".")))
    assert {r["domain"] for r in rows} == {expected}
    assert {r["domain_source"] for r in rows} <= sources


def test_a_client_that_named_nothing_gets_no_name_though_the_others_used_its_address(named):
    rows = named["plain"]
    assert rows and {(r["domain"], r["domain_source"]) for r in rows} == {("", "")}
