"""The iptables rules that hand new connections to the guard's queue (IPv4 and IPv6).

    OUTPUT ─► PICOSNITCH-N-OUT:  marked (denied) TCP ─► REJECT with a reset
                               marked (denied)     ─► REJECT (ICMP port unreachable)
                               loopback            ─► RETURN (unless a rule names a loopback address)
                               conntrack NEW       ─► NFQUEUE N [--queue-bypass]
    INPUT  ─► PICOSNITCH-N-IN:   the same, but loopback always returns: a loopback connection is
                               decided once, on its way out.

Only a connection's first packet (conntrack state NEW) is queued: established connections never
leave the kernel, so their throughput is unchanged. A denied packet is handed back to iptables
(NF_REPEAT) with the mark, so the program hears at once that it was refused.

Fail open (`--queue-bypass`): while nothing reads the queue (the daemon is gone) new
connections pass as if the guard were off. Fail closed: they are dropped, except loopback,
what is already established, and what the rules at the top of the rules file decide by
address, port and protocol alone (static_prefix: iptables applies those itself, before the
queue, e.g. `allow in port 22 proto tcp`). Either way a clean stop removes every rule.
"""

from __future__ import annotations

import shutil
import subprocess
from typing import List, Sequence


def chains(queue: int):
    """The two chains of the guard that uses `queue` (several may run side by side: tests)."""
    return "PICOSNITCH-%d-OUT" % queue, "PICOSNITCH-%d-IN" % queue

DENY_MARK = 0x20000000  # one bit of the packet mark, set only on packets the guard refused
TOOLS = ("iptables", "ip6tables")


class FirewallError(RuntimeError):
    pass


def _run(args: Sequence[str], stdin: str = "", check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(list(args), input=stdin, capture_output=True, text=True, timeout=30)
    if check and result.returncode:
        raise FirewallError("%s failed: %s" % (" ".join(args[:3]), (result.stderr or result.stdout).strip()))
    return result


CAP_NET_ADMIN = 12


def may_change_netfilter(status: str = "/proc/self/status") -> bool:
    """Whether this process has CAP_NET_ADMIN in its effective set (iptables and NFQUEUE need it)."""
    with open(status) as f:
        for line in f:
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> CAP_NET_ADMIN & 1)
    return False


def available() -> List[str]:
    """The iptables programs missing (empty when both are installed)."""
    return [tool for tool in TOOLS if not shutil.which(tool)]


def static_prefix(rules) -> list:
    """The leading rules iptables can apply by itself: forever, naming only direction,
    addresses, ports and protocols. Up to the first rule that needs the daemon (a program, a
    name, a duration), so that first match still wins."""
    prefix = []
    for rule in rules:
        if rule.duration != "forever" or any(key not in ("addr", "port", "proto") for key in rule.matchers):
            break
        prefix.append(rule)
    return prefix


def _static_lines(tool: str, chain: str, direction: str, rules) -> List[str]:
    version = 6 if tool == "ip6tables" else 4
    lines = []
    for rule in rules:
        if rule.direction and rule.direction != direction:
            continue
        m = rule.matchers
        if "addr" in m and m["addr"].version != version:
            continue
        words = ["-A", chain, "-m", "conntrack", "--ctstate", "NEW"]
        if "addr" in m:
            words += ["-d" if direction == "out" else "-s", str(m["addr"])]
        protocols = [m["proto"]] if "proto" in m else ([6, 17] if "port" in m else [None])
        for protocol in protocols:
            line = list(words)
            if protocol is not None:
                line += ["-p", str(protocol)]
            if "port" in m:
                if protocol not in (6, 17, 132, 136):
                    continue  # a port with a protocol that has none matches nothing
                line += ["-m", {6: "tcp", 17: "udp", 132: "sctp", 136: "udplite"}[protocol],
                         "--dport", "%d:%d" % m["port"]]
            if rule.allows:
                line += ["-j", "ACCEPT"]
            elif protocol == 6:
                line += ["-j", "REJECT", "--reject-with", "tcp-reset"]
            else:
                line += ["-j", "REJECT", "--reject-with",
                         "icmp6-port-unreachable" if version == 6 else "icmp-port-unreachable"]
            lines.append(" ".join(line))
    return lines


def chain_rules(tool: str, queue: int, fail_open: bool, queue_loopback: bool, static=()) -> str:
    """The iptables-restore text that fills both chains for one address family; `static` rules
    (see static_prefix) come before the queue, so they hold while nothing reads it."""
    reject = "icmp6-port-unreachable" if tool == "ip6tables" else "icmp-port-unreachable"
    mark = "-m mark --mark 0x%x/0x%x" % (DENY_MARK, DENY_MARK)
    bypass = " --queue-bypass" if fail_open else ""
    CHAIN_OUT, CHAIN_IN = chains(queue)
    lines = ["*filter", ":%s - [0:0]" % CHAIN_OUT, ":%s - [0:0]" % CHAIN_IN]
    for chain, loop in ((CHAIN_OUT, "-o lo"), (CHAIN_IN, "-i lo")):
        lines += ["-A %s -p tcp %s -j REJECT --reject-with tcp-reset" % (chain, mark),
                  "-A %s %s -j REJECT --reject-with %s" % (chain, mark, reject)]
        if chain == CHAIN_IN or not queue_loopback:
            lines.append("-A %s %s -j RETURN" % (chain, loop))
        lines += _static_lines(tool, chain, "out" if chain == CHAIN_OUT else "in", static)
        lines.append("-A %s -m conntrack --ctstate NEW -j NFQUEUE --queue-num %d%s" % (chain, queue, bypass))
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def _jumps(queue: int, interfaces: Sequence[str]) -> List[List[str]]:
    CHAIN_OUT, CHAIN_IN = chains(queue)
    if not interfaces:
        return [["OUTPUT", "-j", CHAIN_OUT], ["INPUT", "-j", CHAIN_IN]]
    jumps = []
    for name in interfaces:
        jumps += [["OUTPUT", "-o", name, "-j", CHAIN_OUT], ["INPUT", "-i", name, "-j", CHAIN_IN]]
    return jumps


def install(queue: int, fail_open: bool, queue_loopback: bool, interfaces: Sequence[str] = (), static=()) -> None:
    """Removes what an earlier run left, then adds the chains and the jumps to them (first in
    OUTPUT and INPUT). `interfaces`, if given, limits the guard to those network interfaces."""
    remove(queue)
    for tool in TOOLS:
        _run([tool + "-restore", "--noflush"], chain_rules(tool, queue, fail_open, queue_loopback, static))
        for jump in _jumps(queue, interfaces):
            _run([tool, "-I", jump[0], "1"] + jump[1:])


def update(queue: int, fail_open: bool, queue_loopback: bool, static=()) -> None:
    """Refills the chains in one step per family (the jumps stay)."""
    for tool in TOOLS:
        _run([tool + "-restore", "--noflush"], chain_rules(tool, queue, fail_open, queue_loopback, static))


def remove(queue: int) -> None:
    """Removes the jumps and both chains, wherever they are; harmless when absent."""
    CHAIN_OUT, CHAIN_IN = chains(queue)
    for tool in TOOLS:
        if not shutil.which(tool):
            continue
        listing = _run([tool, "-S"], check=False).stdout.splitlines()
        for line in listing:
            words = line.split()
            if words[:1] == ["-A"] and words[1] in ("OUTPUT", "INPUT") and words[-2:] in (
                    ["-j", CHAIN_OUT], ["-j", CHAIN_IN]):
                _run([tool, "-D"] + words[1:], check=False)
        for chain in (CHAIN_OUT, CHAIN_IN):
            _run([tool, "-F", chain], check=False)
            _run([tool, "-X", chain], check=False)


def installed(queue: int) -> bool:
    return _run(["iptables", "-S", chains(queue)[0]], check=False).returncode == 0


def remove_leftovers(paths) -> bool:
    """Removes the rules of config.json's "Guard queue number" if they are still there (the
    daemon was killed: `picosnitch stop` then lets new connections through again); True if
    there were some. A config that cannot be read means the default queue number."""
    from picosnitch import config as config_module
    try:
        number = config_module.load(paths.config)["Guard queue number"]
    except config_module.ConfigError:
        number = config_module.RULES["Guard queue number"].default
    if not shutil.which("iptables") or not installed(number):
        return False
    remove(number)
    print("removed the guard's firewall rules, left by a daemon that did not stop cleanly")
    return True
