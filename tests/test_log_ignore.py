"""The "Log ignore" option: hashes, ports, addresses and subnets, domains and their subdomains."""

import re

import pytest

from picosnitch.identity.log_ignore import IgnoreRules

SHA = "a3" * 32


def rules(*entries):
    return IgnoreRules.from_config(list(entries))


def test_no_entries_ignore_nothing():
    empty = rules()
    assert not empty
    assert not empty.ignores(SHA, "com.example", "10.0.0.1", "10.0.0.2", 1, 2)


def test_sha256_of_the_executable():
    assert rules(SHA).ignores(sha256=SHA)
    assert rules(SHA.upper()).ignores(sha256=SHA)
    assert not rules(SHA).ignores(sha256="b4" * 32)


def test_sha256_of_the_script_an_interpreter_runs():
    assert rules(SHA).ignores(sha256="b4" * 32, script_sha256=SHA)
    assert not rules(SHA).ignores(sha256="b4" * 32, script_sha256="c5" * 32)


def test_port_matches_local_or_remote():
    r = rules(53, "853")
    assert r.ignores(lport=53)
    assert r.ignores(rport=853)
    assert not r.ignores(lport=443, rport=443)
    assert not rules(0).ignores()  # -1 means "not logged" and never matches


def test_subnet_matches_local_or_remote_address():
    r = rules("10.0.0.0/8", "fd00::/8")
    assert r.ignores(laddr="10.200.1.1")
    assert r.ignores(raddr="fd12:3456::1")
    assert not r.ignores(laddr="192.168.1.1", raddr="2001:db8::1")


def test_a_single_address_is_a_subnet_of_one():
    r = rules("192.0.2.7", "2001:db8::1")
    assert r.ignores(raddr="192.0.2.7")
    assert r.ignores(raddr="2001:db8::1")
    assert not r.ignores(raddr="192.0.2.8")


def test_ipv4_entries_match_ipv4_mapped_ipv6_addresses():
    assert rules("10.0.0.0/8").ignores(raddr="::ffff:10.1.2.3")
    assert not rules("10.0.0.0/8").ignores(raddr="::ffff:11.1.2.3")


def test_mapped_ipv6_entries_match_plain_ipv4_addresses():
    assert rules("::ffff:10.0.0.0/104").ignores(raddr="10.1.2.3")


def test_host_bits_in_a_subnet_are_allowed():
    assert rules("10.1.2.3/8").ignores(raddr="10.9.9.9")


def test_addresses_that_are_not_ip_are_skipped():
    r = rules("10.0.0.0/8")
    assert not r.ignores(laddr="", raddr="")
    assert not r.ignores(laddr="00:11:22:33:44:55")  # AF_PACKET


def test_domain_and_all_its_subdomains():
    r = rules("example.com")
    assert r.ignores(domain_reversed="com.example")
    assert r.ignores(domain_reversed="com.example.www")
    assert r.ignores(domain_reversed="com.example.a.b.c")
    assert not r.ignores(domain_reversed="com.notexample")
    assert not r.ignores(domain_reversed="com.example-cdn")
    assert not r.ignores(domain_reversed="com")


def test_a_subdomain_entry_does_not_match_its_parent():
    r = rules("api.example.com")
    assert r.ignores(domain_reversed="com.example.api.v2")
    assert not r.ignores(domain_reversed="com.example")
    assert not r.ignores(domain_reversed="com.example.www")


def test_domains_may_be_written_reversed_as_stored_in_the_database():
    assert rules("com.example").domains == rules("example.com").domains == {"com.example"}
    assert rules("uk.co.bbc").domains == {"uk.co.bbc"}
    assert rules("io.github").domains == rules("github.io").domains


def test_a_trailing_dot_means_the_usual_order():
    assert rules("ns.mycorp.").domains == {"mycorp.ns"}
    assert rules("ns.mycorp").domains == {"ns.mycorp"}  # ns looks like a top-level domain


def test_domains_are_case_insensitive_and_may_be_internationalised():
    assert rules("WWW.Example.COM").ignores(domain_reversed="com.example.www")
    assert rules("*.example.com").ignores(domain_reversed="com.example.cdn")
    assert rules("bücher.de").ignores(domain_reversed="de.xn--bcher-kva")


def test_single_label_names():
    assert rules("localhost").ignores(domain_reversed="localhost")


def test_kinds_combine():
    r = rules(SHA, 443, "10.0.0.0/8", "example.com")
    assert r.ignores(sha256=SHA)
    assert r.ignores(rport=443)
    assert r.ignores(raddr="10.0.0.1")
    assert r.ignores(domain_reversed="com.example.www")
    assert not r.ignores("c" * 64, "org.example", "192.0.2.1", "192.0.2.2", 1000, 80)


@pytest.mark.parametrize("entry, message", [
    ("10.0.0.0/33", "'10.0.0.0/33'"),
    ("10.0.0.300", "'10.0.0.300'"),
    ("not a domain!", "'not a domain!'"),
    ("fe80::zz", "'fe80::zz'"),
    (70000, "70000"),
    (True, "True"),
    (1.5, "1.5"),
    (None, "None"),
    (["nested"], "['nested']"),
])
def test_entries_it_cannot_understand_are_named_in_the_error(entry, message):
    with pytest.raises(ValueError, match="Log ignore.*" + re.escape(message)):
        rules(entry)


def test_the_option_must_be_a_list():
    with pytest.raises(ValueError, match="must be a list"):
        IgnoreRules.from_config("example.com")
