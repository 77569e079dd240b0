"""Guard mode against real netfilter: NFQUEUE, iptables, traffic into a namespace the test makes.

Clients are separate processes (python, whose exe and sha256 the rules name); inbound
connections come from a client inside the lab's namespace to a server this test process owns.
"""

import os
import socket
import sys
import time

import pytest
from guard_harness import PYTHON, GuardRun, HostServer, client, peer_client, peer_lab, sha256_of, wait_for_prompts
from netlab import HOST4, HOST6, PEER4, PEER6

from picosnitch.kernel.records import Dns

SH = os.path.realpath("/bin/sh")
ME = os.path.realpath(sys.executable)  # owns the inbound tests' listening sockets
COMBOS = [("tcp", PEER4), ("udp", PEER4), ("tcp", PEER6), ("udp", PEER6)]
OK = {"tcp": "ok hi", "udp": "ok ping"}


@pytest.fixture(scope="module")
def lab(lab):
    yield from peer_lab(lab, [PEER4, PEER6])


@pytest.fixture(scope="module")
def strict_guard(lab, tmp_path_factory):
    with GuardRun(tmp_path_factory.mktemp("strict"), lab, "allow\n", **{"Guard mode": "deny unknown"}) as guard:
        yield guard


@pytest.fixture
def strict(strict_guard):
    """A guard in "deny unknown" mode: what no rule allows is refused at once. It stays for the
    module; each test's rules are replaced by "allow" after it."""
    yield strict_guard
    strict_guard.set_rules("allow\n")


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
            (f"allow in user root proto {kind}", "allow in user nobody"),
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


@pytest.fixture
def asking(lab, tmp_path):
    with GuardRun(tmp_path, lab, "", **{"Guard timeout (seconds)": 3}) as guard:
        yield guard


def test_a_held_connection_completes_once_allowed_and_fails_once_denied(asking, lab):
    port = peer_port(lab, PEER4)
    prompts = asking.prompt_client()
    for kind in ("tcp", "udp"):
        for action, outcome in (("allow", OK[kind]), ("deny", "refused")):
            proc = client(kind, PEER4, port, timeout=20, wait=False)
            shown = wait_for_prompts(prompts, 1)
            prompt = shown[0]
            assert (prompt["exe"], prompt["raddr"], prompt["rport"], prompt["protocol"], prompt["direction"]) == (
                PYTHON, PEER4, port, kind, "out")
            assert prompt["sha256"] == sha256_of(PYTHON) and prompt["user"] == "root"
            assert prompt["cmdline"].startswith(PYTHON + " -c ") or prompt["cmdline"].startswith("/usr/bin/python3 -c ")
            assert prompt["sha256_state"] == "new executable"
            time.sleep(1.0)  # held, not failed: still waiting
            assert proc.poll() is None
            prompts.answer(prompt["id"], action, "once")
            assert proc.communicate(timeout=20)[0].strip() == outcome
            assert wait_for_prompts(prompts, 0) == []
    assert asking.paths.rules.read_text() == ""  # "once" makes no rule
    prompts.close()


def test_a_timeout_applies_the_default_once_and_creates_no_rule(lab, tmp_path):
    port = peer_port(lab, PEER4)
    for default, outcome in (("deny", "refused"), ("allow", "ok hi")):
        with GuardRun(tmp_path / default, lab, "", **{"Guard timeout (seconds)": 1.5,
                                                       "Guard timeout action": default}) as guard:
            start = time.monotonic()
            assert client("tcp", PEER4, port, timeout=20) == outcome
            assert 1.4 < time.monotonic() - start < 6
            assert guard.paths.rules.read_text() == ""
            proc = client("tcp", PEER4, port, timeout=20, wait=False)  # asked again: no rule was made
            prompts = guard.prompt_client()
            assert len(wait_for_prompts(prompts, 1)) == 1
            assert proc.communicate(timeout=20)[0].strip() == outcome
            prompts.close()


def test_one_prompt_per_program_and_destination_and_queued_connections_follow_the_answer(asking, lab):
    port4, port6 = peer_port(lab, PEER4), peer_port(lab, PEER6)
    prompts = asking.prompt_client()
    first = [client("tcp", PEER4, port4, timeout=20, wait=False) for _ in range(3)]
    other = client("tcp", PEER6, port6, timeout=20, wait=False)
    shown = wait_for_prompts(prompts, 2)
    time.sleep(0.5)
    shown = wait_for_prompts(prompts, 2)
    assert len(shown) == 2  # three connections to one destination: one prompt
    to4 = next(p for p in shown if p["raddr"] == PEER4)
    assert to4["connections"] == 3
    prompts.answer(to4["id"], "allow", "forever")
    assert [p.communicate(timeout=20)[0].strip() for p in first] == ["ok hi"] * 3
    assert asking.paths.rules.read_text() == f"allow out exe {PYTHON} addr {PEER4} port {port4} proto tcp\n"
    assert client("tcp", PEER4, port4) == "ok hi"  # the rule decides now, no prompt
    assert other.poll() is None
    to6 = next(p for p in wait_for_prompts(prompts, 1) if p["raddr"] == PEER6)
    later = client("tcp", PEER6, port6, timeout=20, wait=False)  # queued after the prompt opened
    time.sleep(0.5)
    prompts.answer(to6["id"], "deny", "9")  # 9 minutes: in memory, not in the file
    assert other.communicate(timeout=20)[0].strip() == "refused"
    assert later.communicate(timeout=20)[0].strip() == "refused"
    assert client("tcp", PEER6, port6) == "refused"
    assert "fd00" not in asking.paths.rules.read_text()
    prompts.close()


def test_rules_reload_and_an_invalid_rule_is_refused_with_a_sentence(strict, lab):
    port = peer_port(lab, PEER4)
    strict.set_rules("allow port %d\n" % port)
    assert client("tcp", PEER4, port) == "ok hi"
    strict.errors()
    strict.set_rules("allow port %d\ndeny exe relative/path\n" % (port + 1))
    assert client("tcp", PEER4, port) == "ok hi"  # the previous rules stay in force
    assert any(r == f"guard: {strict.paths.rules} line 2: 'relative/path' is not an absolute path (or !unknown); "
               "the previous rules stay in force" for r in strict.errors()), strict.errors()
    strict.set_rules("deny port %d\nallow\n" % port)
    assert client("tcp", PEER4, port) == "refused"


@pytest.mark.parametrize("fail_open", [True, False], ids=["fail-open", "fail-closed"])
def test_with_the_guard_killed_the_fail_mode_holds(lab, tmp_path, fail_open):
    port = peer_port(lab, PEER4)
    # Rules that need the daemon (a bare "allow" would be given to iptables when failing closed).
    guard = GuardRun(tmp_path, lab, f"allow exe {ME}\nallow exe {PYTHON}\n", **{"Guard fail open": fail_open})
    try:
        established = socket.create_connection((PEER4, port), timeout=5)  # allowed by the rule
        guard.kill()  # kill -9: no clean-up
        expected = "ok hi" if fail_open else "timeout"
        assert client("tcp", PEER4, port, timeout=2) == expected
        assert client("udp", PEER4, port, timeout=2) == ("ok ping" if fail_open else "timeout")
        assert established.recv(10) == b"hi"  # an established connection is never cut
        established.close()
    finally:
        guard.stop()  # removes the rules, as `picosnitch stop` does
    assert client("tcp", PEER4, port) == "ok hi"


def test_verdicts_are_recorded_in_snitch_db(lab, tmp_path):
    import sqlite3
    port = peer_port(lab, PEER4)
    with GuardRun(tmp_path, lab, f"deny port {port} proto udp\nallow exe {PYTHON}\n",
                  **{"Guard mode": "deny unknown"}) as guard:
        assert client("tcp", PEER4, port) == "ok hi"
        assert client("udp", PEER4, port) == "refused"
        time.sleep(1.5)
    conn = sqlite3.connect(guard.paths.db)
    rows = conn.execute("SELECT direction, protocol, raddr, rport, exe, verdict, reason, rule FROM guard_verdicts "
                        "ORDER BY ts").fetchall()
    assert rows == [("out", 6, PEER4, port, PYTHON, "allowed", "rule", f"line 2: allow exe {PYTHON}"),
                    ("out", 17, PEER4, port, PYTHON, "denied", "rule", f"line 1: deny port {port} proto udp")]


def test_picosnitch_stop_removes_what_a_killed_guard_left(lab, tmp_path):
    import json
    import subprocess

    from daemon_harness import REPO

    from picosnitch.guard import firewall
    port = peer_port(lab, PEER4)
    guard = GuardRun(tmp_path, lab, "", **{"Guard fail open": False})
    try:
        guard.kill()
        assert client("tcp", PEER4, port, timeout=1.5) == "timeout"  # fail-closed, nobody answers
        guard.paths.config.write_text(json.dumps({"Guard queue number": guard.queue}))
        result = subprocess.run([sys.executable, "-m", "picosnitch", "stop"], capture_output=True, text=True,
                                env=dict(os.environ, PICOSNITCH_PREFIX=str(tmp_path), PYTHONPATH=str(REPO)))
        assert result.returncode == 0, result.stderr
        assert "removed the guard's firewall rules" in result.stdout
        assert not firewall.installed(guard.queue)
        assert client("tcp", PEER4, port) == "ok hi"
    finally:
        guard.stop()


def test_fail_closed_keeps_the_leading_address_and_port_rules_with_the_guard_killed(lab, tmp_path):
    port = peer_port(lab, PEER4)
    server = HostServer(HOST4)  # stands for sshd: it must stay reachable
    guard = GuardRun(tmp_path, lab, f"allow in port {server.port} proto tcp\nallow out addr {PEER4} proto udp\n"
                     f"allow exe {PYTHON}\n", **{"Guard fail open": False})
    try:
        assert client("tcp", PEER4, port) == "ok hi"  # decided by the guard (the exe rule)
        guard.kill()
        assert peer_client(lab, "tcp", HOST4, server.port) == "ok hi"  # iptables applies line 1 itself
        assert client("udp", PEER4, port) == "ok ping"  # and line 2
        assert client("tcp", PEER4, port, timeout=1.5) == "timeout"  # line 3 needs the daemon
    finally:
        guard.stop()
        server.close()
