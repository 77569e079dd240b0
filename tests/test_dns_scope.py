"""A domain names the traffic of the process that learned it, never an unrelated process's."""

import struct

from picosnitch.identity.dns import FRESH_SECONDS, DnsCache
from picosnitch.kernel.records import Dns, Payload

NOW = 1_800_000_000.0
CDN = "203.0.113.7"  # one address serving many names


def name(text: str) -> bytes:
    return b"".join(bytes([len(label)]) + label.encode() for label in text.split(".")) + b"\0"


def dns_answer(question: str, address: str) -> bytes:
    header = struct.pack(">HHHHHH", 7, 0x8180, 1, 1, 0, 0)
    record = b"\xc0\x0c" + struct.pack(">HHIH", 1, 1, 60, 4) + bytes(int(x) for x in address.split("."))
    return header + name(question) + struct.pack(">HH", 1, 1) + record


def payload(tgid: int, what: str, data: bytes, comm: str = "client", netns: int = 1, protocol: int = 17,
            raddr: str = "10.0.0.53", rport: int = 53, lport: int = 40000) -> Payload:
    return Payload(tgid, what, data, comm, netns, 2, protocol, "10.0.0.2", lport, raddr, rport, NOW)


def looked_up(cache: DnsCache, tgid: int, name_: str, address: str = CDN) -> None:
    cache.add(Dns(tgid, name_, (address,), NOW))


def test_a_process_gets_the_name_it_looked_up_and_how():
    cache = DnsCache()
    looked_up(cache, 100, "www.example.org")
    assert cache.domain(100, CDN, NOW + 1) == ("org.example.www", "getaddrinfo")


def test_another_process_never_gets_it_just_because_the_address_matches():
    cache = DnsCache()
    looked_up(cache, 100, "www.example.org")
    assert cache.domain(200, CDN, NOW + 1, ppid=1, netns=1) == ("", "")


def test_two_processes_resolving_different_names_to_one_address_each_get_their_own():
    cache = DnsCache()
    looked_up(cache, 100, "shop.example.org")
    cache.add_payload(payload(200, "dns_answer", dns_answer("news.example.net", CDN)))
    assert cache.domain(100, CDN, NOW + 1)[0] == "org.example.shop"
    assert cache.domain(200, CDN, NOW + 1) == ("net.example.news", "dns")


def test_the_server_name_a_connection_sent_names_that_connection_first():
    cache = DnsCache()
    looked_up(cache, 100, "cdn.example.org")
    hello = payload(100, "first_send", b"GET / HTTP/1.1\r\nHost: api.example.org\r\n\r\n", protocol=6,
                    raddr=CDN, rport=80, lport=41000)
    assert cache.add_payload(hello)
    assert cache.domain(100, CDN, NOW + 1, laddr="10.0.0.2", lport=41000, rport=80) == ("org.example.api", "http")
    # the process's other connections to that address keep the name it looked up
    assert cache.domain(100, CDN, NOW + 1, laddr="10.0.0.2", lport=41001, rport=80)[0] == "org.example.cdn"


def test_a_child_gets_a_lookup_its_parent_made_marked_as_such():
    cache = DnsCache()
    looked_up(cache, 100, "www.example.org")
    assert cache.domain(101, CDN, NOW + 1, ppid=100) == ("org.example.www", "getaddrinfo:parent")


def test_a_namespaces_resolver_daemon_names_its_clients_traffic_while_fresh():
    cache = DnsCache()
    cache.add_payload(payload(300, "dns_answer", dns_answer("www.example.org", CDN), comm="dnsmasq", netns=7))
    assert cache.domain(400, CDN, NOW + 1, netns=7) == ("org.example.www", "dns:resolver")
    assert cache.domain(400, CDN, NOW + 1, netns=8) == ("", "")  # another namespace
    assert cache.domain(400, CDN, NOW + FRESH_SECONDS + 1, netns=7) == ("", "")  # stale


def test_an_answer_an_ordinary_process_received_stays_its_own():
    cache = DnsCache()
    cache.add_payload(payload(300, "dns_answer", dns_answer("www.example.org", CDN), comm="dig", netns=7))
    assert cache.domain(400, CDN, NOW + 1, netns=7) == ("", "")


def test_bytes_that_are_not_what_they_seem_name_nothing():
    cache = DnsCache()
    assert not cache.add_payload(payload(100, "dns_answer", b"\x00" * 40))
    assert not cache.add_payload(payload(100, "first_send", b"\x16\x03\x01\x00\x05\x01garbage", protocol=6))
    assert cache.domain(100, CDN, NOW + 1) == ("", "")


def test_a_lookup_of_an_address_is_no_name():
    cache = DnsCache()
    looked_up(cache, 100, "203.0.113.7")
    assert cache.domain(100, CDN, NOW + 1) == ("", "")
