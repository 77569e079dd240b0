"""The guard process (root): reads the queue, decides, holds, prompts, records.

Inputs: the NFQUEUE (first packets of new connections), the identity worker's pipe (getaddrinfo
answers, for domains), prompt clients on the guard socket, desktop notification answers.
Outputs: verdicts to the kernel, rows to snitch.db's guard_verdicts, problems to the keeper.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import signal
import threading
import time
from typing import Any, Dict, List, Optional

from picosnitch import channels, parent_death
from picosnitch.alerts import record_keeper
from picosnitch.guard import firewall
from picosnitch.guard.engine import Engine, Verdict, names_loopback
from picosnitch.guard.nfqueue import Queue
from picosnitch.guard.prompt_socket import PromptServer
from picosnitch.guard.rules import UNKNOWN, Attempt, RulesFile
from picosnitch.guard.sockets import OwnerMap, ProgramFinder
from picosnitch.guard.store import VerdictStore
from picosnitch.identity.dns import DnsCache, is_address
from picosnitch.kernel import libbpf
from picosnitch.kernel.monitor import MonitorError
from picosnitch.messages import ErrorReport, Stop

KEY = "guard"
TICK = 0.25
WRITE_EVERY = 1.0
LOOKUPS_PER_SECOND = 200  # programs looked up after the fact, for the record only


class Annotator:
    """What a prompt shows beyond the engine's facts: sha256 state, user name, country, and how
    the domain was learned."""

    def __init__(self, paths, config):
        self.record_path = str(paths.record)
        self.stamp = None
        self.hashes: Dict[str, dict] = {}
        self.countries = None
        if config["GeoIP lookup"] and config["GeoIP database"]:
            try:
                from picosnitch.ui.annotations import Annotations
                self.countries = Annotations(config["GeoIP database"])
            except Exception:
                self.countries = None

    def _load(self) -> None:
        try:
            st = os.stat(self.record_path)
            if (st.st_ino, st.st_mtime_ns) == self.stamp:
                return
            with open(self.record_path, "rb") as f:
                self.hashes = json.load(f).get(record_keeper.SHA256_BY_EXE, {})
            self.stamp = (st.st_ino, st.st_mtime_ns)
        except (OSError, ValueError, AttributeError):
            pass

    def sha256_state(self, exe: str, sha256: str) -> str:
        if sha256 == UNKNOWN or not sha256:
            return "unknown (not hashed)"
        if exe == UNKNOWN:
            return "unknown program"
        self._load()
        known = self.hashes.get(exe)
        if not known:
            return "new executable"
        return "known" if sha256 in known else "new sha256: the executable changed"

    def annotate(self, described: dict) -> dict:
        described["sha256_state"] = self.sha256_state(described["exe"], described["sha256"])
        try:
            described["user"] = pwd.getpwuid(described["uid"]).pw_name if described["uid"] >= 0 else "unknown"
        except KeyError:
            described["user"] = str(described["uid"])
        described["domain_source"] = "getaddrinfo by this process" if described["domain"] else "none: no lookup seen"
        described["country"] = self.countries.country(described["raddr"]) if self.countries else ""
        return described


class Guard:
    def __init__(self, config, paths, report, queue_factory=Queue):
        self.config, self.paths, self.report = config, paths, report
        self.rules_file = RulesFile(str(paths.rules))
        self.rules_file.reload()
        if self.rules_file.problem:
            report(self.rules_file.problem)
        self.finder = ProgramFinder(owner_map=self._owner_map())
        self.dns = DnsCache()
        self.records: List[Verdict] = []
        self.completed = 0  # records[:completed] have had their program and name looked up, or a try
        self.engine = Engine(self.rules_file, config["Guard mode"], config["Guard timeout (seconds)"],
                             config["Guard timeout action"], find_program=self._program, find_domain=self._domain,
                             record=self.records.append, report=report, fail_open=config["Guard fail open"])
        self.annotator = Annotator(paths, config)
        self.number = config["Guard queue number"]
        self.fail_open = config["Guard fail open"]
        self.loopback = names_loopback(self.rules_file.ruleset)
        self.static = self._static()
        self.firewall_for = self.rules_file.ruleset
        self.queue = queue_factory(self.number, fail_open=self.fail_open)
        firewall.install(self.number, self.fail_open, self.loopback, config["Guard interfaces"], self.static)
        gid = 0
        if config["Guard prompt group"]:
            try:
                gid = grp.getgrnam(config["Guard prompt group"]).gr_gid
            except KeyError:
                report('"Guard prompt group" names a group that does not exist: %r; only root may answer '
                       "prompts" % config["Guard prompt group"])
        self.server = PromptServer(paths.guard_socket, gid)
        self.store: Optional[VerdictStore] = None
        if config["DB sql log"]:
            try:
                self.store = VerdictStore(str(paths.db))
            except Exception as e:
                report("guard verdicts will not be recorded in %s: %s" % (paths.db, e))
        self.last_write = time.monotonic()
        self.lookups = (0, 0)  # (second, lookups in it)
        self.desktop = None

    def _program(self, a: Attempt):
        return self.finder.find(a.family, a.protocol, a.laddr, a.lport, a.raddr, a.rport, a.uid,
                                outgoing=a.direction == "out")

    def _domain(self, a: Attempt) -> str:
        pid = a.who.pid
        if not pid:
            return ""
        address = a.raddr[7:] if a.raddr.startswith("::ffff:") else a.raddr
        hit = self.dns.by_process.get((pid, address))
        return hit[0].rstrip(".") if hit and time.time() - hit[1] <= self.dns.expiry else ""

    # --- events ---

    def on_queue(self) -> None:
        verdicts = self.engine.packets(self.queue.receive())
        self.send(verdicts)

    def on_dns(self, records: list) -> None:
        added = False
        for record in records:
            if getattr(record, "kind", None) == "dns" and not is_address(record.name):
                self.dns.add(record)
                added = True
        if added and self.engine.held:
            for held in self.engine.held.values():
                held.attempt.known_domain = None  # look again
            self.send(self.engine.recheck())

    def on_client(self, client) -> None:
        for message in self.server.read(client):
            if message.get("type") == "answer":
                self.server.send(client, self.apply_answer(message))

    def apply_answer(self, message: dict) -> dict:
        try:
            prompt_id = int(message["id"])
            verdicts = self.engine.answer(prompt_id, str(message.get("action")), str(message.get("duration", "once")),
                                          bool(message.get("any_port")), bool(message.get("whole_domain")),
                                          bool(message.get("any_program")))
        except KeyError:
            return {"type": "error", "message": "that prompt is no longer open (answered or timed out)"}
        except (ValueError, TypeError) as e:
            return {"type": "error", "message": str(e)}
        self._firewall_follows_rules()
        self.send(verdicts)
        return {"type": "answered", "id": prompt_id}

    def tick(self) -> None:
        verdicts = self.engine.tick()
        self.engine.forget_expired()
        self._firewall_follows_rules()
        self.send(verdicts)

    def _static(self) -> list:
        """Fail closed: the leading rules iptables applies itself, so they hold with the daemon
        gone (see firewall). Fail open needs none: everything passes then."""
        return [] if self.fail_open else firewall.static_prefix(self.rules_file.ruleset.rules)

    def _firewall_follows_rules(self) -> None:
        if self.rules_file.ruleset is self.firewall_for:
            return  # the same rules as when the chains were last filled
        self.firewall_for = self.rules_file.ruleset
        loopback, static = names_loopback(self.rules_file.ruleset), self._static()
        if loopback != self.loopback or [r.text for r in static] != [r.text for r in self.static]:
            self.loopback, self.static = loopback, static
            try:
                firewall.update(self.number, self.fail_open, loopback, static)
            except firewall.FirewallError as e:
                self.report(str(e))

    def send(self, verdicts) -> None:
        """Completes the records, sends the verdicts, tells prompt clients about changes."""
        now = time.monotonic()
        second = int(now)
        done = self.lookups[1] if self.lookups[0] == second else 0
        while self.completed < len(self.records) and done < LOOKUPS_PER_SECOND:
            verdict = self.records[self.completed]
            self.completed += 1
            if not verdict.attempt.looked_up:  # for the record, while the socket still exists
                verdict.attempt.who
                verdict.attempt.domain
                done += 1
        self.lookups = (second, done)
        self.queue.verdicts(verdicts, firewall.DENY_MARK)
        if self.engine.changed:
            self.engine.changed = False
            self.broadcast()
        if now - self.last_write >= WRITE_EVERY:
            self.flush()

    def flush(self) -> None:
        self.last_write = time.monotonic()
        records, self.records[:] = list(self.records), []
        self.completed = 0
        if self.store and records:
            try:
                self.store.write(records)
            except Exception as e:
                self.report("guard verdicts could not be written to %s: %s" % (self.paths.db, e))

    def prompts(self) -> List[dict]:
        return [self.annotator.annotate(self.engine.describe(p)) for p in self.engine.prompts.values()]

    def broadcast(self) -> None:
        prompts = self.prompts()
        self.server.broadcast({"type": "prompts", "prompts": prompts})
        if self.desktop:
            self.desktop.show(prompts)

    def _owner_map(self) -> Optional[OwnerMap]:
        """The kernel's socket owners, or None (then /proc is searched, which is slower)."""
        try:
            owners = OwnerMap()
            if owners.missing:
                self.report("outgoing connections' programs will be found through sock_diag, which is slower: the "
                            "kernel refused the program that files them by their first packet (%s)" % owners.missing)
            return owners
        except (libbpf.LibbpfError, MonitorError, OSError) as e:
            self.report("held connections' programs will be found through /proc, which is slower: the socket "
                        "owner map could not be attached (%s)" % e)
            return None

    def close(self) -> None:
        try:
            firewall.remove(self.number)
        finally:
            self.flush()
            self.queue.close()
            self.server.close()
            self.finder.close()
            if self.store:
                self.store.close()
            if self.desktop:
                self.desktop.close()


def run(config, paths, inbox, to_keeper, supervisor_pid: int = 0) -> int:
    """Guards until Stop arrives on `inbox` (or SIGTERM: the supervisor died)."""
    stop = threading.Event()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    if supervisor_pid:
        parent_death.signal_when_parent_dies(supervisor_pid, signal.SIGTERM)

    def report(message: str, key: str = KEY) -> None:
        to_keeper.send(ErrorReport("guard: " + message, key))

    missing = firewall.available()
    guard = None
    if missing:
        report("guard mode is off: %s not installed" % " and ".join(missing))
    elif not firewall.may_change_netfilter():
        report("guard mode is off: it needs the capability CAP_NET_ADMIN, which picosnitch.service does not "
               "grant; to add it: systemctl edit picosnitch, then [Service] and CapabilityBoundingSet=CAP_NET_ADMIN")
    else:
        try:
            guard = Guard(config, paths, report)
        except (OSError, firewall.FirewallError) as e:
            firewall.remove(config["Guard queue number"])
            report("guard mode is off: %s" % e)
    if guard and config["Desktop notifications"]:
        try:
            from picosnitch.guard.desktop import DesktopPrompts
            guard.desktop = DesktopPrompts(config, report)
        except Exception as e:
            report("guard prompts will not be shown on the desktop: %s" % e)
    last_tick = time.monotonic()
    try:
        while not stop.is_set():
            sources: List[Any] = [inbox]
            if guard:
                sources += [guard.queue, guard.server] + guard.server.clients
                if guard.desktop:
                    sources += guard.desktop.sources()
            ready: List[Any] = channels.wait(sources, TICK, [to_keeper])
            for source in ready:
                if source is inbox:
                    try:
                        message = inbox.recv()
                    except EOFError:
                        return 0
                    if isinstance(message, Stop):
                        return 0
                    if guard and isinstance(message, list):
                        guard.on_dns(message)
                elif guard is None:
                    continue
                elif source is guard.queue:
                    guard.on_queue()
                elif source is guard.server:
                    for client in guard.server.accept():
                        guard.server.send(client, {"type": "prompts", "prompts": guard.prompts()})
                elif guard.desktop and source in guard.desktop.sources():
                    for answer in guard.desktop.read(source):
                        guard.apply_answer(answer)
                else:
                    guard.on_client(source)
            if guard and time.monotonic() - last_tick >= TICK:
                last_tick = time.monotonic()
                guard.tick()
        return 0
    finally:
        if guard:
            guard.close()
