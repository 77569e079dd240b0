"""Turns kernel flow records into Connections: who (exe, sha256, parents, container) sent what.

Hashes are taken through /proc/PID/exe while the process lives and by path, with device+inode
verified, after it exits. What cannot be verified is recorded with an explicit `!…` value and
reported, never guessed.
"""

import os
from typing import Callable, Dict, List, Optional, Set, Tuple

from picosnitch.connection import Connection, Endpoint, Identity, ProcessInfo
from picosnitch.identity.containers import container_of_pid
from picosnitch.identity.dns import DnsCache
from picosnitch.identity.hashing import HashCache
from picosnitch.identity.log_ignore import IgnoreRules
from picosnitch.identity.process_table import Image, ProcessTable
from picosnitch.kernel.records import Exec, Flow
from picosnitch.messages import ErrorReport, Observed

UNKNOWN = "!unknown"  # sha256/exe of traffic whose executable could not be identified


class IdentityResolver:
    def __init__(self, config, report: Callable[[object], None], watch: Optional[Callable[[str], object]] = None,
                 proc: str = "/proc"):
        """report(message) receives ErrorReport and Observed messages; watch(path) is called
        once for every executable hashed, so that changes to it are noticed."""
        self.log_addresses = config["Log addresses"]
        self.log_ports = config["Log ports"]
        self.log_commands = config["Log commands"]
        self.every_exe = config["Every exe (not just conns)"]
        self.ignore = IgnoreRules.from_config(config["Log ignore"])
        self.report = report
        self.watch = watch
        self.table = ProcessTable(proc)
        self.dns = DnsCache()
        self.hashes = HashCache(config["Set st_dev mask"])
        self.containers: Dict[int, str] = {}
        self.watched: Set[str] = set()
        self.observed: Set[Tuple[str, str, str, str, str]] = set()
        self.batch_identities: Dict[Tuple[int, ...], Identity] = {}
        self.loss_totals: Dict[str, int] = {}
        self.names: Dict[str, str] = {}  # last name seen per exe, for re-hash reports

    # --- kernel records in, Connections out ---

    def handle(self, record, ts: int) -> List[Connection]:
        """Applies one kernel record; returns the Connections it yields (window start ts)."""
        kind = record.kind
        if kind in ("exec", "fork", "exit"):
            self.table.apply(record)
            if kind == "exec":
                # Now, while it most likely still runs: its traffic may come after it exited.
                container = container_of_pid(record.tgid)
                if container:
                    self.containers[record.tgid] = container
                if self.every_exe:
                    return self._exec_row(record, ts)
        elif kind == "dns":
            self.dns.add(record)
        elif kind == "payload":
            self.dns.add_payload(record)
        elif kind == "flow":
            conn = self.connection(record, ts)
            return [conn] if conn else []
        elif kind == "loss":
            # With the running total: error.log collapses repeats of a key into one line.
            total = self.loss_totals[record.what] = self.loss_totals.get(record.what, 0) + record.count
            self.report(ErrorReport(f"the kernel dropped {record.count} {record.description} ({total} since "
                                    "the daemon started)", "loss:" + record.what, record.count))
        elif kind == "degraded":
            self.report(ErrorReport(f"{record.consequence}: {record.hook} could not be used ({record.reason})",
                                    "degraded:" + record.hook))
        return []

    def connection(self, flow: Flow, ts: int) -> Optional[Connection]:
        identity = self.identity(flow.tgid, flow.ppid, flow.exe_dev, flow.exe_ino, flow.uid, flow.netns)
        domain, source = self.dns.domain(flow.tgid, flow.raddr, None, flow.ppid, flow.netns,
                                         flow.laddr, flow.lport, flow.rport)
        # As in the original, "Log addresses" false hides where the traffic went: the remote
        # address and the domain it was looked up as. The local address is still recorded.
        # "Log ignore" rules are matched against the real values, whatever is recorded.
        endpoint = Endpoint(
            flow.family, flow.protocol,
            flow.laddr, flow.lport if self.log_ports else -1,
            flow.raddr if self.log_addresses else "", flow.rport if self.log_ports else -1,
            domain if self.log_addresses else "", source if self.log_addresses and domain else "")
        if self.ignore and self.ignore.ignores(identity.process.sha256, domain, flow.laddr, flow.raddr,
                                               flow.lport, flow.rport):
            return None
        return Connection(identity, endpoint, ts, flow.bytes_sent, flow.bytes_recv, flow.packets_sent,
                          flow.packets_recv)

    def _exec_row(self, event: Exec, ts: int) -> List[Connection]:
        identity = self.identity(event.tgid, event.ppid, event.exe_dev, event.exe_ino, event.uid, 0)
        if self.ignore and self.ignore.ignores(identity.process.sha256):
            return []
        return [Connection(identity, Endpoint(), ts)]

    def new_batch(self) -> None:
        """Identities are worked out once per batch of kernel records (half a second), however
        many flows of the same process the batch holds: a connection storm costs one lookup."""
        self.batch_identities.clear()

    def identity(self, tgid: int, ppid: int, dev: int, ino: int, uid: int, netns: int) -> Identity:
        key = (tgid, ppid, dev, ino, uid, netns)
        known = self.batch_identities.get(key)
        if known is None:
            known = self.batch_identities[key] = self._identity(*key)
        return known

    def _identity(self, tgid: int, ppid: int, dev: int, ino: int, uid: int, netns: int) -> Identity:
        process = self.describe(tgid, self.table.image(tgid, dev, ino), dev, ino, live=True)
        parent_proc = self.table.get(ppid)
        parent = self.describe(ppid, parent_proc.image) if parent_proc else ProcessInfo()
        grandparent = ProcessInfo()
        if parent_proc and parent_proc.ppid:
            gp_proc = self.table.get(parent_proc.ppid)
            if gp_proc:
                grandparent = self.describe(gp_proc.tgid, gp_proc.image)
        identity = Identity(process, parent, grandparent, uid, netns, self.container(tgid, ppid))
        self._observe(identity)
        return identity

    def describe(self, tgid: int, image: Optional[Image], dev: int = 0, ino: int = 0,
                 live: bool = False) -> ProcessInfo:
        """exe, name, cmdline and sha256 of one process image."""
        if image is None:
            self.report(ErrorReport(f"traffic from process {tgid} (executable device {dev} inode {ino}) "
                                    "whose executable could not be identified", f"unknown:{dev}:{ino}"))
            return ProcessInfo(UNKNOWN, self.table.live_name(tgid) or "", "", UNKNOWN)
        if live:
            image = self.table.complete_argv(tgid, image)
        name = (self.table.live_name(tgid) if live else None) or image.name
        cmdline = " ".join(image.argv) if self.log_commands else ""
        return ProcessInfo(image.exe, name, cmdline, self.sha256(tgid, image))

    def sha256(self, tgid: int, image: Image) -> str:
        result = None
        if self.table.is_alive(tgid):
            result = self.hashes.hash_live(tgid, image.dev, image.ino)
        if result is None or not result.ok:
            result = self.hashes.hash_path(image.exe, image.dev, image.ino)
        if not result.ok:
            self.report(ErrorReport(f"sha256 of {image.exe} could not be verified: {result.error}",
                                    f"hash:{image.exe}:{result.sha256}"))
        elif self.watch and image.exe not in self.watched:
            self.watched.add(image.exe)
            try:
                self.watch(image.exe)
            except OSError as e:
                # Hashed through /proc/PID/exe, but not reachable by its path here: deleted since,
                # a memfd, or a path inside another mount namespace (a container).
                self.report(ErrorReport(f"changes to {image.exe} will not be noticed: {e.strerror or e}",
                                        f"watch:{image.exe}"))
        return result.sha256

    def container(self, tgid: int, ppid: int) -> str:
        if tgid not in self.containers:
            if self.table.is_alive(tgid):
                self.containers[tgid] = container_of_pid(tgid)
            else:
                return self.containers.get(ppid, "")
        return self.containers[tgid]

    def _observe(self, identity: Identity) -> None:
        p, parent = identity.process, identity.parent
        key = (p.exe, p.name, p.sha256, parent.exe, parent.name)
        if key not in self.observed:
            self.observed.add(key)
            self.names[p.exe] = p.name
            self.report(Observed(*key))

    # --- executables changed on disk ---

    def rehash(self, path: str) -> None:
        """A watched executable changed: hash it again and report the new sha256."""
        try:
            st = os.stat(path)
        except OSError as e:
            self.report(ErrorReport(f"{path} changed and cannot be hashed again: {e.strerror}", f"rehash:{path}"))
            return
        self.hashes.invalidate(st.st_dev, st.st_ino)
        result = self.hashes.hash_path(path, st.st_dev, st.st_ino)
        if not result.ok:
            self.report(ErrorReport(f"{path} changed and cannot be hashed again: {result.error}", f"rehash:{path}"))
            return
        name = self.names.get(path, os.path.basename(path))
        self.report(Observed(path, name, result.sha256, "", ""))

    def expire(self) -> None:
        """Forgets long-exited processes and stale DNS answers."""
        self.table.expire()
        self.dns.expire()
        for tgid in [t for t in self.containers if t not in self.table.processes]:
            del self.containers[tgid]
