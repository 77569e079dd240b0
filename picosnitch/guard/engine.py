"""Deciding queued connections: rules first, then the user; held connections wait meanwhile.

- A connection's first packet is decided by the answers given this run (newest first), then
  the rules file; a loopback connection no rule decides is allowed.
- Otherwise, in "ask" mode, it is held: its packets stay in the kernel's queue (retransmissions
  join them) and it joins the prompt for its (program, destination), or opens one. There is one
  prompt per (program, destination) at a time.
- An answer makes a rule (except "once", which decides only that prompt's connections) and
  every held connection is checked again, so connections queued meanwhile that the answer
  covers go too. "forever" answers are appended to the rules file.
- A prompt nobody answers within the timeout gets the default action, for its connections
  only: a timeout never makes a rule.
- In "deny unknown" mode nothing is held: what no rule allows is refused.
"""

from __future__ import annotations

import itertools
import socket
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

from picosnitch.guard import packet as packets_module
from picosnitch.guard.nfqueue import ACCEPT, DROP, NF_INET_LOCAL_IN, REJECT, Packet
from picosnitch.guard.rules import (
    FOREVER,
    ONCE,
    PROTOCOL_NAMES,
    UNKNOWN,
    Attempt,
    Program,
    RuleSet,
    RulesFile,
    append_rule,
    format_rule,
    parse_line,
    with_expiry,
)

ASK, DENY_UNKNOWN = "ask", "deny unknown"
ALLOWED, DENIED = "allowed", "denied"
# Why: the reason column of snitch.db's guard_verdicts.
BY_RULE, BY_USER, BY_TIMEOUT, BY_LOOPBACK, BY_MODE, BY_ANSWER_RULE = (
    "rule", "user", "timeout", "loopback", "mode", "answer")
INPUT_GRACE = 0.5  # seconds a prompt ignores keys after it is shown


@dataclass
class Verdict:
    """One connection decided: what snitch.db records."""

    ts: float
    attempt: Attempt
    verdict: str  # ALLOWED or DENIED
    reason: str  # BY_RULE, BY_USER, BY_TIMEOUT, BY_LOOPBACK, BY_MODE, BY_ANSWER_RULE
    rule: str = ""  # the rule's text (with its line in the rules file), if a rule decided


@dataclass
class Held:
    key: tuple
    attempt: Attempt
    packet_ids: List[int]
    since: float
    prompt: Optional["Prompt"] = None


@dataclass
class Prompt:
    id: int
    key: tuple  # (exe, sha256, direction, destination, port, protocol)
    attempt: Attempt  # the first connection's, shown to the user
    created: float
    deadline: float
    held: List[Held] = field(default_factory=list)


def connection_key(a: Attempt) -> tuple:
    return (a.direction, a.family, a.protocol, a.laddr, a.lport, a.raddr, a.rport)


def destination(a: Attempt) -> str:
    return a.domain or a.raddr


def prompt_key(a: Attempt) -> tuple:
    who = a.who
    port = a.rport if a.direction == "out" else a.lport
    return (who.exe, who.sha256, a.direction, destination(a), port, a.protocol)


def names_loopback(ruleset: RuleSet) -> bool:
    """Whether any rule names a loopback address (then loopback connections are queued too)."""
    import ipaddress
    loops = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))
    for rule in ruleset.rules:
        net = rule.matchers.get("addr")
        if net is not None and any(net.version == loop.version and net.overlaps(loop) for loop in loops):
            return True
    return False


class Engine:
    def __init__(self, rules_file: RulesFile, mode: str = ASK, timeout: float = 60.0, default: str = "deny",
                 find_program: Optional[Callable[[Attempt], Program]] = None,
                 find_domain: Optional[Callable[[Attempt], str]] = None,
                 record: Optional[Callable[[Verdict], None]] = None,
                 report: Optional[Callable[[str], None]] = None, now: Callable[[], float] = time.time,
                 fail_open: bool = True):
        self.rules_file = rules_file
        self.mode, self.timeout, self.default = mode, timeout, default
        self.find_program = find_program
        self.find_domain = find_domain
        self.record = record or (lambda verdict: None)
        self.report = report or (lambda message: None)
        self.now = now
        self.fail_open = fail_open
        self.answers = RuleSet()  # rules made from answers this run, newest first
        self.held: Dict[tuple, Held] = {}
        self.prompts: Dict[int, Prompt] = {}
        self.prompt_by_key: Dict[tuple, Prompt] = {}
        self._ids = itertools.count(1)
        self.changed = False  # the prompt list changed since the clients last heard

    # --- packets in, verdicts out ---

    def attempt_of(self, pkt: Packet) -> Optional[Attempt]:
        header = packets_module.parse(pkt.payload)
        if header is None:
            return None
        if pkt.hook == NF_INET_LOCAL_IN:
            attempt = Attempt("in", header.family, header.protocol, header.dst, header.dport, header.src,
                              header.sport, None, pkt.uid)
        else:
            attempt = Attempt("out", header.family, header.protocol, header.src, header.sport, header.dst,
                              header.dport, None, pkt.uid)
        if self.find_program:
            attempt.program = lambda: self.find_program(attempt)
        attempt.find_domain = self.find_domain
        return attempt

    def packets(self, batch: List[Packet]) -> List[Tuple[int, str]]:
        """Verdicts for the packets that can be decided now; the others are held."""
        now = self.now()
        verdicts: List[Tuple[int, str]] = []
        for pkt in batch:
            try:
                self._packet(pkt, now, verdicts)
            except Exception as e:  # a bug must not leave the packet in the queue forever
                verdicts.append((pkt.id, ACCEPT if self.fail_open else DROP))
                self.report("a packet could not be decided (%s: %s); it was %s as the fail mode says" % (
                    type(e).__name__, e, "accepted" if self.fail_open else "dropped"))
        return verdicts

    def _packet(self, pkt: Packet, now: float, verdicts: List[Tuple[int, str]]) -> None:
        attempt = self.attempt_of(pkt)
        if attempt is None:  # not IP we can read: not ours to judge
            verdicts.append((pkt.id, ACCEPT))
            return
        key = connection_key(attempt)
        held = self.held.get(key)
        if held is not None:  # a retransmission of a held connection waits with it
            held.packet_ids.append(pkt.id)
            return
        decided = self.decide(attempt, now)
        if decided is not None:
            verdicts.append((pkt.id, ACCEPT if decided.verdict == ALLOWED else REJECT))
            self.record(decided)
        else:
            self.hold(Held(key, attempt, [pkt.id], now), now)

    def decide(self, attempt: Attempt, now: float) -> Optional[Verdict]:
        """The verdict rules give (None: nobody decided yet: ask)."""
        rule = self.answers.decide(attempt, now)
        reason = BY_ANSWER_RULE
        if rule is None:
            rule = self.rules_file.ruleset.decide(attempt, now)
            reason = BY_RULE
        if rule is not None:
            if rule.duration == ONCE:
                self.rules_file.spend(rule)
            text = ("line %d: %s" % (rule.line, rule.text)) if rule.line else rule.text
            return Verdict(now, attempt, ALLOWED if rule.allows else DENIED, reason, text)
        if attempt.loopback:
            return Verdict(now, attempt, ALLOWED, BY_LOOPBACK)
        if self.mode == DENY_UNKNOWN:
            return Verdict(now, attempt, DENIED, BY_MODE)
        return None

    def hold(self, held: Held, now: float) -> None:
        self.held[held.key] = held
        key = prompt_key(held.attempt)
        prompt = self.prompt_by_key.get(key)
        if prompt is None:
            prompt = Prompt(next(self._ids), key, held.attempt, now, now + self.timeout)
            self.prompts[prompt.id] = prompt
            self.prompt_by_key[key] = prompt
            self.changed = True
        prompt.held.append(held)
        held.prompt = prompt
        self.changed = True  # its count of connections changed

    def _release(self, held: Held, verdict: Verdict, out: List[Tuple[int, str]]) -> None:
        self.held.pop(held.key, None)
        prompt = held.prompt
        if prompt is not None and held in prompt.held:
            prompt.held.remove(held)
            if not prompt.held:
                self._close(prompt)
        out += [(i, ACCEPT if verdict.verdict == ALLOWED else REJECT) for i in held.packet_ids]
        self.record(verdict)

    def _close(self, prompt: Prompt) -> None:
        self.prompts.pop(prompt.id, None)
        if self.prompt_by_key.get(prompt.key) is prompt:
            del self.prompt_by_key[prompt.key]
        self.changed = True

    def recheck(self) -> List[Tuple[int, str]]:
        """Checks every held connection against the rules again (after an answer, a reload,
        a new DNS answer)."""
        now = self.now()
        out: List[Tuple[int, str]] = []
        for held in list(self.held.values()):
            verdict = self.decide(held.attempt, now)
            if verdict is not None:
                self._release(held, verdict, out)
        return out

    def tick(self) -> List[Tuple[int, str]]:
        """Reloads the rules file if it changed, applies timeouts; returns the verdicts."""
        now = self.now()
        out: List[Tuple[int, str]] = []
        problem = self.rules_file.problem
        if self.rules_file.changed():
            if self.rules_file.reload(now):
                out += self.recheck()
            if self.rules_file.problem and self.rules_file.problem != problem:
                self.report(self.rules_file.problem)
        for prompt in [p for p in self.prompts.values() if now >= p.deadline]:
            for held in list(prompt.held):
                allowed = self.default == "allow"
                self._release(held, Verdict(now, held.attempt, ALLOWED if allowed else DENIED, BY_TIMEOUT), out)
            self._close(prompt)
        return out

    def next_deadline(self) -> Optional[float]:
        return min((p.deadline for p in self.prompts.values()), default=None)

    # --- answers ---

    def answer(self, prompt_id: int, action: str, duration: str = ONCE, any_port: bool = False,
               whole_domain: bool = False, any_program: bool = False) -> List[Tuple[int, str]]:
        """Applies the user's answer to a prompt; raises KeyError when the prompt is gone
        (answered elsewhere, or timed out) and ValueError for a bad answer."""
        if action not in ("allow", "deny"):
            raise ValueError("the action must be allow or deny")
        prompt = self.prompts[prompt_id]
        now = self.now()
        out: List[Tuple[int, str]] = []
        if duration == ONCE:
            for held in list(prompt.held):
                self._release(held, Verdict(now, held.attempt, ALLOWED if action == "allow" else DENIED, BY_USER,
                                            "once"), out)
            self._close(prompt)
            return out
        line = rule_for(prompt.attempt, action, duration, any_port, whole_domain, any_program)
        parsed = parse_line(line)
        assert parsed is not None, "rule_for makes a rule line"
        rule = with_expiry(parsed, now)
        if duration == FOREVER:
            append_rule(self.rules_file.path, line)
            self.rules_file.reload(now)
            if self.rules_file.problem:
                raise ValueError(self.rules_file.problem)
        else:
            self.answers = RuleSet([rule] + self.answers.rules)
        for held in list(prompt.held):  # what the rule covers goes as answered by the user
            if rule.matches(held.attempt):
                self._release(held, Verdict(now, held.attempt, ALLOWED if rule.allows else DENIED, BY_USER, line),
                              out)
        out += self.recheck()
        return out

    def forget_expired(self) -> None:
        now = self.now()
        if any(not r.live(now) for r in self.answers.rules):
            self.answers = RuleSet([r for r in self.answers.rules if r.live(now)])

    def describe(self, prompt: Prompt) -> dict:
        """What a prompt client shows (the worker adds sha256 state, user, country)."""
        a, who = prompt.attempt, prompt.attempt.who
        return {
            "id": prompt.id, "created": prompt.created, "deadline": prompt.deadline,
            "direction": a.direction, "family": a.family,
            "protocol": PROTOCOL_NAMES.get(a.protocol, str(a.protocol)),
            "laddr": a.laddr, "lport": a.lport, "raddr": a.raddr, "rport": a.rport,
            "domain": a.domain, "pid": who.pid, "exe": who.exe, "sha256": who.sha256, "name": who.name,
            "cmdline": who.cmdline, "parent": who.parent, "parent_cmdline": who.parent_cmdline,
            "uid": who.uid if who.uid >= 0 else a.uid, "connections": len(prompt.held),
        }


def rule_for(a: Attempt, action: str, duration: str, any_port: bool = False, whole_domain: bool = False,
             any_program: bool = False) -> str:
    """The rules-file line an answer makes: this program (its exe: an update of it does not ask
    again; the prompt shows whether its sha256 is new), this direction, destination (the
    domain when one is known, else the address), port and protocol."""
    who = a.who
    matchers = {}
    if not any_program:
        matchers["exe"] = who.exe if who.exe else UNKNOWN
    if a.domain:
        labels = a.domain.rstrip(".").split(".")
        matchers["domain"] = ("*." + ".".join(labels[-2:])) if whole_domain else a.domain
    else:
        matchers["addr"] = a.raddr
    if not any_port:
        matchers["port"] = str(a.rport if a.direction == "out" else a.lport)
    matchers["proto"] = PROTOCOL_NAMES.get(a.protocol, str(a.protocol))
    return format_rule(action, a.direction, duration, **matchers)


def family_name(family: int) -> str:
    return "IPv6" if family == socket.AF_INET6 else "IPv4"
