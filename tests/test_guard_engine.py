"""The guard's engine and iptables text without the kernel: loopback, modes, the packet parser."""

import socket
import struct

from picosnitch.guard import firewall, packet
from picosnitch.guard.engine import DENY_UNKNOWN, Engine, names_loopback
from picosnitch.guard.nfqueue import ACCEPT, REJECT, Packet
from picosnitch.guard.rules import Program, RuleSet, RulesFile, parse_text


def tcp_packet(src, dst, sport, dport, packet_id=1, hook=3):
    if ":" in src:
        ip = struct.pack("!IHBB16s16s", 6 << 28, 20, 6, 64, socket.inet_pton(socket.AF_INET6, src),
                         socket.inet_pton(socket.AF_INET6, dst))
    else:
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40, 0, 0, 64, 6, 0, socket.inet_aton(src), socket.inet_aton(dst))
    return Packet(packet_id, hook, ip + struct.pack("!HHIIHHHH", sport, dport, 0, 0, 0x5002, 0, 0, 0))


def engine(text, mode=DENY_UNKNOWN):
    f = RulesFile("/nonexistent")
    f.ruleset = RuleSet(parse_text(text))
    records = []
    return Engine(f, mode, find_program=lambda a: Program(exe="/usr/bin/x"), record=records.append), records


def test_loopback_is_allowed_unless_a_rule_names_it():
    e, records = engine("deny exe /usr/bin/x port 80\n")
    assert e.packets([tcp_packet("127.0.0.1", "127.0.0.1", 5000, 81)]) == [(1, ACCEPT)]
    assert records[-1].reason == "loopback"
    assert e.packets([tcp_packet("::1", "::1", 5000, 82, 2)]) == [(2, ACCEPT)]
    assert e.packets([tcp_packet("127.0.0.1", "127.0.0.1", 5000, 80, 3)]) == [(3, REJECT)]  # a rule says so
    assert e.packets([tcp_packet("10.0.0.1", "10.0.0.2", 5000, 81, 4)]) == [(4, REJECT)]  # deny unknown
    assert not names_loopback(e.rules_file.ruleset)
    assert names_loopback(RuleSet(parse_text("deny addr 127.0.0.0/8\n")))
    assert names_loopback(RuleSet(parse_text("deny addr ::1\n")))
    assert not names_loopback(RuleSet(parse_text("deny addr 10.0.0.0/8\n")))


def test_inbound_packets_are_decided_by_the_local_port():
    e, records = engine("allow in port 22\n")
    assert e.packets([tcp_packet("10.0.0.9", "10.0.0.1", 40000, 22, 1, hook=1)]) == [(1, ACCEPT)]
    assert (records[-1].attempt.direction, records[-1].attempt.lport, records[-1].attempt.raddr) == (
        "in", 22, "10.0.0.9")


def test_the_packet_parser_reads_ipv4_and_ipv6_ports():
    h = packet.parse(tcp_packet("fd00::1", "fd00::2", 1234, 443).payload)
    assert (h.family, h.protocol, h.src, h.sport, h.dst, h.dport) == (socket.AF_INET6, 6, "fd00::1", 1234,
                                                                       "fd00::2", 443)
    assert packet.parse(b"") is None and packet.parse(b"\x45" + b"\0" * 5) is None


def test_the_chains_queue_new_connections_and_refuse_marked_ones():
    text = firewall.chain_rules("ip6tables", 7455, fail_open=False, queue_loopback=False)
    assert "-A PICOSNITCH-7455-OUT -m conntrack --ctstate NEW -j NFQUEUE --queue-num 7455\n" in text
    assert "--queue-bypass" not in text and "-A PICOSNITCH-7455-OUT -o lo -j RETURN" in text
    assert "REJECT --reject-with icmp6-port-unreachable" in text
    text = firewall.chain_rules("iptables", 7455, fail_open=True, queue_loopback=True)
    assert "--queue-bypass" in text and "-o lo -j RETURN" not in text and "-A PICOSNITCH-7455-IN -i lo -j RETURN" in text


def test_fail_closed_gives_the_leading_address_and_port_rules_to_iptables():
    rules = parse_text("allow in port 22 proto tcp\ndeny out addr fd00::/8 port 53\nallow exe /usr/bin/ssh\n"
                       "allow port 80\n")
    static = firewall.static_prefix(rules)
    assert [r.line for r in static] == [1, 2]  # stops at the first rule that needs the daemon
    v4 = firewall.chain_rules("iptables", 7, False, False, static)
    v6 = firewall.chain_rules("ip6tables", 7, False, False, static)
    assert "-A PICOSNITCH-7-IN -m conntrack --ctstate NEW -p 6 -m tcp --dport 22:22 -j ACCEPT" in v4
    assert "fd00" not in v4 and "-A PICOSNITCH-7-OUT" in v6
    assert ("-A PICOSNITCH-7-OUT -m conntrack --ctstate NEW -d fd00::/8 -p 17 -m udp --dport 53:53 -j REJECT "
            "--reject-with icmp6-port-unreachable") in v6
    assert v6.index("--dport 53:53") < v6.index("NFQUEUE")


def test_cap_net_admin_is_read_from_the_effective_set(tmp_path):
    status = tmp_path / "status"
    status.write_text("Name:\tpython\nCapEff:\t00000000a80425fb\n")  # systemd's root without CAP_NET_ADMIN
    assert not firewall.may_change_netfilter(str(status))
    status.write_text("Name:\tpython\nCapEff:\t000001ffffffffff\n")
    assert firewall.may_change_netfilter(str(status))
