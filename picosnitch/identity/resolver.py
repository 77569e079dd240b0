"""Turns kernel flow records into Connections: who (exe, sha256, parents, container) sent what.

Hashes are taken through /proc/PID/exe while the process lives and by path, with device+inode
verified, after it exits. What cannot be verified is recorded with an explicit `!…` value and
reported, never guessed.
"""

import os
from typing import Callable, Dict, List, Optional, Set, Tuple

from picosnitch.connection import Connection, Endpoint, Identity, ProcessInfo
from picosnitch.identity import exe_state
from picosnitch.identity.containers import container_of_pid
from picosnitch.identity.dns import DnsCache
from picosnitch.identity.hashing import MISSING, HashCache
from picosnitch.identity.log_ignore import IgnoreRules
from picosnitch.identity.pin_store import PinStore
from picosnitch.identity.process_table import Image, ProcessTable
from picosnitch.kernel.records import Exec, FileKey, Flow, PinnedFile
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
        self.pins: Optional[PinStore] = None  # the files the monitor pinned at exec, when it sends them
        self.exec_rows: Dict[Tuple[int, int], Exec] = {}  # "Every exe" rows waiting for their pins
        self.table = ProcessTable(proc)
        self.dns = DnsCache()
        self.hashes = HashCache(config["Set st_dev mask"])
        self.containers: Dict[int, str] = {}
        self.watched: Set[str] = set()
        self.observed: Set[Tuple[str, ...]] = set()
        self.batch_identities: Dict[tuple, Identity] = {}
        self.loss_totals: Dict[str, int] = {}
        self.names: Dict[str, str] = {}  # last name seen per exe, for re-hash reports
        self.script_runners: Dict[str, Tuple[str, str]] = {}  # script -> (interpreter, name) last seen

    # --- kernel records in, Connections out ---

    def handle(self, record, ts: int) -> List[Connection]:
        """Applies one kernel record; returns the Connections it yields (window start ts). An
        ErrorReport among them is the monitor's, passed on to error.log."""
        if isinstance(record, ErrorReport):
            self.report(record)
            return []
        kind = record.kind
        if kind in ("exec", "fork", "exit"):
            self.table.apply(record)
            if kind == "exec":
                # Now, while it most likely still runs: its traffic may come after it exited.
                container = container_of_pid(record.tgid)
                if container:
                    self.containers[record.tgid] = container
                if self.every_exe and self.pins is None:
                    return self._exec_row(record, ts)
                if self.every_exe:  # once what it ran is pinned: its Pinned record comes next
                    self.exec_rows[(record.tgid, record.exec_id)] = record
        elif kind == "pinned":
            self.table.pin(record)
            if self.pins is not None:
                for pinned in record.files:
                    self.pins.touch(pinned.key)
            event = self.exec_rows.pop((record.tgid, record.exec_id), None)
            if event is not None:
                return self._exec_row(event, ts)
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
        identity = self.identity(flow.tgid, flow.ppid, flow.exec_id, flow.comm, flow.exe_dev, flow.exe_ino, flow.uid,
                                 flow.netns)
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
                                               flow.lport, flow.rport, identity.process.script_sha256):
            return None
        return Connection(identity, endpoint, ts, flow.bytes_sent, flow.bytes_recv, flow.packets_sent,
                          flow.packets_recv)

    def _exec_row(self, event: Exec, ts: int) -> List[Connection]:
        identity = self.identity(event.tgid, event.ppid, event.exec_id, event.comm, event.exe_dev, event.exe_ino,
                                 event.uid, 0)
        if self.ignore and self.ignore.ignores(identity.process.sha256,
                                               script_sha256=identity.process.script_sha256):
            return []
        return [Connection(identity, Endpoint(), ts)]

    def new_batch(self) -> None:
        """Identities are worked out once per batch of kernel records (half a second), however
        many flows of the same process the batch holds: a connection storm costs one lookup."""
        self.batch_identities.clear()

    def identity(self, tgid: int, ppid: int, exec_id: int, comm: str, dev: int, ino: int, uid: int,
                 netns: int) -> Identity:
        key = (tgid, ppid, exec_id, comm, dev, ino, uid, netns)
        known = self.batch_identities.get(key)
        if known is None:
            known = self.batch_identities[key] = self._identity(*key)
        return known

    def _identity(self, tgid: int, ppid: int, exec_id: int, comm: str, dev: int, ino: int, uid: int,
                  netns: int) -> Identity:
        """The sender is the image its exec produced, named as it was when it sent (comm), if
        that image ran the executable the kernel saw sending."""
        image = self.table.image(tgid, exec_id)
        if image is not None and not image.ran(dev, ino):
            # An image read from /proc after the exec it stands for was lost: another program.
            self.report(ErrorReport(f"traffic from process {tgid} came from executable device {dev} inode {ino}, but "
                                    f"the image known for it ran {image.exe} (device {image.dev} inode {image.ino}): "
                                    "recorded as unknown", f"unknown-exe:{dev}:{ino}"))
            process = ProcessInfo(UNKNOWN, comm, "", UNKNOWN)
        else:
            process = self.describe(tgid, image, dev, ino, live=True, name=comm)
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
                 live: bool = False, name: str = "") -> ProcessInfo:
        """exe, name, cmdline and sha256 of one process image, with the script an interpreter ran
        and the exe_state markers; `name` is its comm when it sent. When ld.so ran a program, the
        program is the exe and ld.so the loader (exe_state)."""
        if image is None:
            self.report(ErrorReport(f"traffic from process {tgid} (executable device {dev} inode {ino}) "
                                    "whose exec was not seen (it exited before the daemon saw it, or the exec event was lost): "
                                    "recorded as unknown",
                                    f"unknown:{dev}:{ino}"))
            return ProcessInfo(UNKNOWN, name or self.table.live_name(tgid) or "", "", UNKNOWN)
        if live:
            image = self.table.complete_argv(tgid, image)
        name = name or image.name
        cmdline = " ".join(image.argv) if self.log_commands else ""
        program = image.pin("program")
        if program:
            exe, sha256 = program.path, self.pinned_sha256(program)
            state = exe_state.markers(program, self._fd(program), loader=image.exe)
        else:
            exe, sha256 = image.exe, self.sha256(tgid, image)
            pinned = image.pin("exe")
            state = exe_state.markers(pinned, self._fd(pinned)) if pinned else ""
        script, script_sha256 = self.script(image)
        return ProcessInfo(exe, name, cmdline, sha256, script, script_sha256, state)

    def script(self, image: Image) -> Tuple[str, str]:
        """(path, sha256) of the script an interpreter ran, ("", "") for none."""
        pinned = image.pin("script")
        if pinned:
            return pinned.path, self.pinned_sha256(pinned)
        missed = image.missed_pin("script") or image.missed_pin("program")
        if missed:
            _, path, why = missed
            self.report(ErrorReport(f"sha256 of the script {path} run by {image.exe} is unknown: {why}",
                                    f"script:{path}"))
            return path, MISSING
        return "", ""

    def pinned_sha256(self, pinned: PinnedFile) -> str:
        """sha256 of a file pinned at exec: the very file that ran."""
        fd = self._fd(pinned)
        if fd is None:  # not held here (this worker restarted since): the path, if it is still that file
            result = self.hashes.hash_if_same(pinned.path, pinned.key)
        else:
            result = self.hashes.hash_fd(pinned.key, fd, pinned.path)
        if not result.ok:
            self.report(ErrorReport(f"sha256 of {pinned.path} could not be taken: {result.error}",
                                    f"hash:{pinned.path}:{result.sha256}"))
        else:
            self._watch(pinned.path)
        return result.sha256

    def hash_before_closing(self, key: FileKey, fd: int) -> None:
        """A pin given up to stay within the descriptor limit: its hash is kept (PinStore)."""
        if self.hashes.cached(key) is None:
            self.hashes.hash_fd(key, fd, "a pinned executable")

    def _fd(self, pinned: PinnedFile) -> Optional[int]:
        return self.pins.fd(pinned.key) if self.pins is not None else None

    def sha256(self, tgid: int, image: Image) -> str:
        pinned = image.pin("exe")
        if pinned and (self._fd(pinned) is not None or self.hashes.cached(pinned.key)):
            return self.pinned_sha256(pinned)
        result = None
        if self.table.is_alive(tgid):
            result = self.hashes.hash_live(tgid, image.dev, image.ino)
        if result is None or not result.ok:
            result = self.hashes.hash_path(image.exe, image.dev, image.ino)
        if not result.ok:
            self.report(ErrorReport(f"sha256 of {image.exe} could not be verified: {result.error}",
                                    f"hash:{image.exe}:{result.sha256}"))
        else:
            self._watch(image.exe)
        return result.sha256

    def _watch(self, path: str) -> None:
        if not self.watch or path in self.watched or path.startswith(exe_state.MEMFD_PREFIX):
            return
        self.watched.add(path)
        try:
            self.watch(path)
        except OSError as e:
            # Hashed through a pin or /proc/PID/exe, but not reachable by its path here: deleted
            # since, or a path inside another mount namespace (a container).
            self.report(ErrorReport(f"changes to {path} will not be noticed: {e.strerror or e}", f"watch:{path}"))

    def container(self, tgid: int, ppid: int) -> str:
        if tgid not in self.containers:
            if self.table.is_alive(tgid):
                self.containers[tgid] = container_of_pid(tgid)
            else:
                return self.containers.get(ppid, "")
        return self.containers[tgid]

    def _observe(self, identity: Identity) -> None:
        p, parent = identity.process, identity.parent
        key = (p.exe, p.name, p.sha256, parent.exe, parent.name, p.script, p.script_sha256)
        if key not in self.observed:
            self.observed.add(key)
            self.names[p.exe] = p.name
            if p.script:
                self.script_runners[p.script] = (p.exe, p.name)
            self.report(Observed(*key))

    # --- executables changed on disk ---

    def rehash(self, path: str) -> None:
        """A watched executable changed: hash it again and report the new sha256."""
        try:
            st = os.stat(path)
        except OSError as e:
            self.report(ErrorReport(f"{path} changed and cannot be hashed again: {e.strerror}", f"rehash:{path}"))
            return
        result = self.hashes.hash_path(path, st.st_dev, st.st_ino)
        if not result.ok:
            self.report(ErrorReport(f"{path} changed and cannot be hashed again: {result.error}", f"rehash:{path}"))
            return
        if path in self.script_runners:  # a script: it changed, its interpreter did not
            interpreter, name = self.script_runners[path]
            script_key = (interpreter, name, "", "", "", path, result.sha256)
            self.observed.add(script_key)  # re-sent to a restarted keeper too
            self.report(Observed(*script_key))
            return
        name = self.names.get(path, os.path.basename(path))
        key = (path, name, result.sha256, "", "")
        self.observed.add(key)
        self.report(Observed(*key))

    def resend_observed(self) -> None:
        """Every identity observed so far, reported again (a restarted keeper may lack some)."""
        for key in self.observed:
            self.report(Observed(*key))

    def expire(self) -> None:
        """Forgets long-exited processes and stale DNS answers."""
        self.table.expire()
        self.dns.expire()
        for tgid in [t for t in self.containers if t not in self.table.processes]:
            del self.containers[tgid]
