"""The guard's rules file: what each line means, which rule wins, and how a reload goes."""

import os
import socket

import pytest

from picosnitch.guard import rules
from picosnitch.guard.rules import Attempt, Program, RuleSet, RulesFile, parse_line, parse_text

CURL = Program(pid=10, exe="/usr/bin/curl", sha256="a" * 64, parent="/usr/bin/bash", uid=1000)


def attempt(direction="out", raddr="93.184.216.34", rport=443, lport=40000, protocol=socket.IPPROTO_TCP,
            domain="", program=CURL, laddr="10.0.0.2"):
    family = socket.AF_INET6 if ":" in raddr else socket.AF_INET
    calls = []

    def who():
        calls.append(1)
        return program
    a = Attempt(direction, family, protocol, laddr, lport, raddr, rport, domain, program.uid, who)
    a.calls = calls
    return a


def first(text, a):
    rule = RuleSet(parse_text(text)).decide(a)
    return None if rule is None else (rule.action, rule.line)


@pytest.mark.parametrize("line, hit, miss", [
    ("allow exe /usr/bin/curl", {}, {"program": Program(exe="/usr/bin/wget")}),
    ("allow sha256 " + "A" * 64, {}, {"program": Program(exe="/usr/bin/curl", sha256="b" * 64)}),
    ("allow parent /usr/bin/bash", {}, {"program": Program(exe="/usr/bin/curl", parent="/usr/bin/zsh")}),
    ("allow user 1000", {}, {"program": Program(uid=0)}),
    ("allow domain example.com", {"domain": "example.com"}, {"domain": "www.example.com"}),
    ("allow domain *.example.com", {"domain": "a.b.example.com"}, {"domain": "badexample.com"}),
    ("allow domain *.example.com", {"domain": "example.com."}, {"domain": ""}),
    ("allow addr 93.184.216.0/24", {}, {"raddr": "93.184.217.1"}),
    ("allow addr 93.184.216.34", {}, {"raddr": "93.184.216.35"}),
    ("allow addr fd00::/8", {"raddr": "fd00:5e::2"}, {"raddr": "fe80::1"}),
    ("allow addr 2001:db8::1", {"raddr": "2001:db8::1"}, {"raddr": "2001:db8::2"}),
    ("allow port 443", {}, {"rport": 80}),
    ("allow port 400-500", {"rport": 500}, {"rport": 501}),
    ("allow proto udp", {"protocol": socket.IPPROTO_UDP}, {}),
    ("allow in port 22", {"direction": "in", "lport": 22, "rport": 5555}, {"direction": "in", "lport": 23}),
    ("allow out", {}, {"direction": "in"}),
    ("allow exe !unknown", {"program": Program()}, {}),
    ("allow script /usr/bin/thing.py", None, {}),  # identities have no script yet: never matches
])
def test_every_matcher_matches_what_it_names_and_nothing_else(line, hit, miss):
    if hit is not None:
        assert first(line, attempt(**hit)) == ("allow", 1)
    assert first(line, attempt(**miss)) is None


def test_first_match_wins_and_all_matchers_must_match():
    text = """# comment
    deny exe /usr/bin/curl port 80   # trailing comment
    allow exe /usr/bin/curl domain *.example.com
    deny domain example.com
    allow
    """
    assert first(text, attempt(rport=80, domain="example.com")) == ("deny", 2)
    assert first(text, attempt(domain="www.example.com")) == ("allow", 3)
    assert first(text, attempt(domain="example.com", program=Program(exe="/usr/bin/wget"))) == ("deny", 4)
    assert first(text, attempt(domain="other.org", program=Program(exe="/usr/bin/wget"))) == ("allow", 5)


def test_the_program_is_looked_up_only_when_a_rule_before_the_winner_needs_it():
    text = "allow port 443\nallow exe /usr/bin/curl\n"
    a = attempt()
    assert first(text, a) == ("allow", 1) and a.calls == []
    a = attempt(rport=80)
    assert first(text, a) == ("allow", 2) and a.calls == [1]
    a = attempt(rport=80)
    assert first("allow exe /usr/bin/curl\nallow port 80\n", a) == ("allow", 1) and a.calls == [1]


def test_a_thousand_rules_are_indexed_and_order_is_kept():
    lines = [f"deny exe /opt/p{i}" for i in range(300)] + [f"deny addr 10.{1 + i // 200}.{i % 200}.0/24" for i in range(300)]
    lines += [f"deny domain d{i}.example" for i in range(200)] + [f"deny port {2000 + i}" for i in range(199)]
    lines += ["allow exe /usr/bin/curl port 443"]
    ruleset = RuleSet(parse_text("\n".join(lines)))
    assert len(ruleset) == 1000
    assert ruleset.decide(attempt()).line == 1000
    assert ruleset.decide(attempt(raddr="10.1.7.9")).line == 308
    assert ruleset.decide(attempt(domain="d5.example")).line == 606
    assert ruleset.decide(attempt(program=Program(exe="/opt/p3"), rport=2001)).line == 4


@pytest.mark.parametrize("text, duration", [
    ("allow", "forever"), ("allow forever", "forever"), ("allow once", "once"),
    ("allow restart", "restart"), ("allow until restart", "restart"), ("allow 9m", "9"),
    ("allow 3 minutes", "3"), ("allow port 1 15min", "15"),
])
def test_durations(text, duration):
    assert parse_line(text).duration == duration


@pytest.mark.parametrize("text, complaint", [
    ("permit port 22", "not allow or deny"),
    ("allow prot 22", "where a matcher"),
    ("allow port", "without a value"),
    ("allow port 70000", "within 0-65535"),
    ("allow port 9-3", "within 0-65535"),
    ("allow addr 300.1.1.1", "not an IPv4 or IPv6"),
    ("allow domain *.", "not a domain"),
    ("allow exe curl", "absolute path"),
    ("allow sha256 abc", "64 hex digits"),
    ("allow proto tcpp", "not a protocol"),
    ("allow port 1 port 2", "twice"),
    ("allow forever port 2", "after its duration"),
    ("allow exe '/usr/bin/x", "split into words"),
    ("allow user no-such-user-psn", "no user"),
])
def test_an_invalid_line_is_one_sentence_naming_the_line(text, complaint):
    with pytest.raises(rules.RuleError) as e:
        parse_text("allow port 1\n\n" + text, "/etc/picosnitch/rules")
    assert str(e.value).startswith("/etc/picosnitch/rules line 3: ")
    assert complaint in str(e.value)


def test_format_rule_reads_back():
    line = rules.format_rule("allow", "out", "9", exe="/opt/my app/run", domain="*.example.com", port="443",
                             proto="tcp")
    rule = parse_line(line)
    assert rule.matchers["exe"] == "/opt/my app/run" and rule.duration == "9" and rule.direction == "out"


def test_reload_is_atomic_and_keeps_the_old_rules_on_a_bad_line(tmp_path):
    path = tmp_path / "rules"
    f = RulesFile(str(path))
    assert f.reload() and len(f.ruleset) == 0  # no file: no rules
    path.write_text("allow port 443\n")
    assert f.reload() and len(f.ruleset) == 1 and f.problem is None
    assert not f.reload()  # unchanged
    path.write_text("allow port 443\ndeny port 80\nallow porty 1\n")
    assert not f.reload()
    assert f.problem == f"{path} line 3: has 'porty' where a matcher (exe, sha256, script, parent, user, " \
        "domain, addr, port, proto) or a duration (forever, once, restart, Nm) belongs; the previous rules " \
        "stay in force"
    assert len(f.ruleset) == 1
    path.write_bytes(b"allow port 1\nallow exe /\xff\n")
    assert not f.reload() and "line 2: is not valid UTF-8" in f.problem
    rules.append_rule(str(path.with_name("new")), "deny port 80")
    os.replace(path.with_name("new"), path)
    assert f.reload() and f.problem is None and f.ruleset.rules[0].action == "deny"


def test_minutes_count_from_first_reading_and_once_is_spent(tmp_path):
    path = tmp_path / "rules"
    path.write_text("allow port 443 once\nallow port 80 2m\n")
    f = RulesFile(str(path))
    f.reload(now=1000.0)
    once, minutes = f.ruleset.rules
    assert minutes.expires == 1120.0
    a = attempt()
    assert f.ruleset.decide(a, now=1001.0) is once
    f.spend(once)
    assert f.ruleset.decide(a, now=1001.0) is None
    path.write_text("allow port 443 once\nallow port 80 2m\n# edited\n")
    f.reload(now=1100.0)
    assert f.ruleset.decide(a, now=1101.0) is None  # still spent
    assert f.ruleset.decide(attempt(rport=80), now=1110.0).line == 2
    assert f.ruleset.decide(attempt(rport=80), now=1121.0) is None  # expired: not reset by the reload


def test_append_rule_keeps_mode_and_refuses_bad_lines(tmp_path):
    path = tmp_path / "rules"
    path.write_text("allow port 1")
    os.chmod(path, 0o600)
    rules.append_rule(str(path), "deny port 2")
    assert path.read_text() == "allow port 1\ndeny port 2\n"
    assert os.stat(path).st_mode & 0o777 == 0o600
    with pytest.raises(ValueError):
        rules.append_rule(str(path), "deny porty 2")
