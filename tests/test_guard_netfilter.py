"""Guard mode against real netfilter: NFQUEUE, iptables, traffic into a namespace the test makes.

Clients are separate processes (python, whose exe and sha256 the rules name); inbound
connections come from a client inside the lab's namespace to a server this test process owns.
"""

import os
import socket
import sys
import time

import pytest

from guard_harness import (PYTHON, QUEUE, GuardRun, HostServer, Peer, client, peer_client, sha256_of,
                           wait_for_prompts)
from netlab import HOST4, HOST6, PEER4, PEER6, NetLab
from picosnitch.kernel_records import Dns

SH = os.path.realpath("/bin/sh")
ME = os.path.realpath(sys.executable)  # owns the inbound tests' listening sockets
COMBOS = [("tcp", PEER4), ("udp", PEER4), ("tcp", PEER6), ("udp", PEER6)]
OK = {"tcp": "ok hi", "udp": "ok ping"}


@pytest.fixture(scope="module")
def lab():
    if os.geteuid() != 0:
        pytest.skip("needs root: iptables and network namespaces")
    with NetLab() as lab:
        lab.peer = Peer(lab, [PEER4, PEER6])
        yield lab
        lab.peer.stopped = True


@pytest.fixture(scope="module")
def strict(lab, tmp_path_factory):
    """A guard in "deny unknown" mode: what no rule allows is refused at once."""
    with GuardRun(tmp_path_factory.mktemp("strict"), lab, "", **{"Guard mode": "deny unknown"}) as guard:
        yield guard


def run_as_nobody():
    os.setgid(65534)
    os.setuid(65534)


def outbound(kind, host, port, how="plain", guard=None, domain=""):
    """One outbound connection made `how`: plain, under sh (parent), as nobody, or after a
    getaddrinfo answer naming `domain` (sent to the guard as the monitor would)."""
    if how == "sh":
        return client(kind, host, port, prefix=[SH, "-c", '"$0" "$@"; true'])
    if how == "nobody":
        return client(kind, host, port, preexec_fn=run_as_nobody)
    if how == "dns":
        proc = client(kind, host, port, wait=False, env=dict(os.environ, CLIENT_DELAY="0.5"))
        guard.send([Dns(proc.pid, domain, (host,), time.time())])
        return proc.communicate(timeout=30)[0].strip()
    return client(kind, host, port)


def peer_port(lab, host):
    return lab.peer.ports[host]


# (matcher for the hit, how the hit connects, matcher for the miss, how the miss connects)
KINDS = {
    "exe": lambda h, p: (f"exe {PYTHON}", "plain", "exe /usr/bin/true", "plain"),
    "sha256": lambda h, p: (f"sha256 {sha256_of(PYTHON)}", "plain", "sha256 " + "0" * 64, "plain"),
    "parent": lambda h, p: (f"parent {SH}", "sh", f"parent {SH}", "plain"),
    "user": lambda h, p: ("user nobody", "nobody", "user nobody", "plain"),
    "domain": lambda h, p: ("domain *.example.test", "dns:www.example.test", "domain *.example.test",
                            "dns:www.other.test"),
    "addr": lambda h, p: ("addr " + (h + "/64" if ":" in h else h + "/30"), "plain",
                          "addr " + ("fd00:5f::/32" if ":" in h else "10.0.0.0/16"), "plain"),
    "port": lambda h, p: (f"port {p - 1}-{p + 1}", "plain", f"port {p + 1}-{p + 2}", "plain"),
    "proto": lambda h, p: (None, "plain", None, "plain"),
    "direction": lambda h, p: ("out", "plain", "in", "plain"),
}


@pytest.mark.parametrize("kind, host", COMBOS, ids=["tcp4", "udp4", "tcp6", "udp6"])
@pytest.mark.parametrize("matcher", list(KINDS))
def test_every_rule_kind_allows_and_denies_outbound(strict, lab, matcher, kind, host):
    port = peer_port(lab, host)
    hit, hit_how, miss, miss_how = KINDS[matcher](host, port)
    if matcher == "proto":
        hit, miss = f"proto {kind}", "proto " + ("udp" if kind == "tcp" else "tcp")

    def connect(how):
        if how.startswith("dns:"):
            return outbound(kind, host, port, "dns", strict, how[4:])
        return outbound(kind, host, port, how)

    strict.set_rules(f"allow {hit}\n")
    assert connect(hit_how) == OK[kind], "allow " + hit
    strict.set_rules(f"allow {miss}\n")
    assert connect(miss_how) == "refused", "allow " + miss + " (should not match)"
    strict.set_rules(f"deny {hit}\nallow\n")
    assert connect(hit_how) == "refused", "deny " + hit
    strict.set_rules(f"deny {miss}\nallow\n")
    assert connect(miss_how) == OK[kind], "deny " + miss + " (should not match)"


@pytest.mark.parametrize("kind, host, peer", [("tcp", HOST4, PEER4), ("udp", HOST4, PEER4),
                                               ("tcp", HOST6, PEER6), ("udp", HOST6, PEER6)],
                         ids=["tcp4", "udp4", "tcp6", "udp6"])
def test_inbound_connections_to_listening_sockets_are_decided(strict, lab, kind, host, peer):
    server = HostServer(host)
    try:
        p = server.port
        cases = [  # (allowing rule, rule that must not match)
            (f"allow in exe {ME} port {p} proto {kind}", f"allow in exe /usr/bin/true port {p}"),
            (f"allow in addr {peer}", f"allow out addr {peer}"),
            (f"allow in port {p}", f"allow in port {p + 1}"),
            (f"allow in user root proto {kind}", f"allow in user nobody"),
        ]
        for allowing, other in cases:
            strict.set_rules(allowing + "\n")
            assert peer_client(lab, kind, host, p) == OK[kind], allowing
            strict.set_rules(other + "\n")
            assert peer_client(lab, kind, host, p) == "refused", other
            strict.set_rules(allowing.replace("allow", "deny", 1) + "\nallow\n")
            assert peer_client(lab, kind, host, p) == "refused", "deny: " + allowing
    finally:
        server.close()
