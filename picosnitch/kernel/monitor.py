"""Loads the BPF object, attaches what this kernel supports, and turns its output into records.

`KernelMonitor.start()` returns the hooks it had to leave out (as `Degraded` records, each
saying what will not be recorded); `run()` then delivers `Exec`/`Fork`/`Exit`/`Dns` records
as they happen and `Flow` totals at least once a second, plus `Loss` records whenever the
kernel had to drop something.
"""

import ctypes
import mmap
import os
import re
import time
from dataclasses import dataclass
from importlib import resources
from typing import Callable, Dict, FrozenSet, Iterable, List, Mapping, Optional, Sequence, Tuple

from picosnitch import heap
from picosnitch.kernel import handover, libbpf
from picosnitch.kernel.libc_probes import LibcProbes
from picosnitch.kernel.pins import ExecPinner
from picosnitch.kernel.records import (
    CELL_DIRTY_BITS,
    LOSS_KINDS,
    MIRRORS,
    Degraded,
    DrainState,
    Exec,
    Flow,
    FlowKey,
    FlowValue,
    Loss,
    MonitorConfig,
    Record,
    RetiredCell,
    parse_event,
)

DRAIN_INTERVAL = 0.5  # seconds; a flow is reported at most two intervals after it happened
QUIET_RECORDS = 1_000  # a drain interval with fewer records than this ends a burst (heap.Burst)
DELIVERY_PART = 5000  # records per deliver() call: a storm's drain is passed on, pickled and read in parts
DEFAULT_CELLS = 16384  # sockets' owners counting at once without a flow map lookup

# Programs by the capability they provide, with what is lost without them.
HOOK_GROUPS = {
    "bytes": (("sock_send_length", "sock_recv_length"), "no traffic will be counted"),
    "bytes_fallback": (("inet_sendmsg_exit", "inet6_sendmsg_exit", "inet_recvmsg_exit", "inet6_recvmsg_exit"),
                       "no traffic will be counted"),
    "pages_fallback": (("inet_sendpage_exit",), "TCP and UDP data sent with sendfile() or splice() will not be counted"),
    "packet_fallback": (("packet_sendmsg_exit", "packet_recvmsg_exit"), "AF_PACKET traffic will not be counted"),
    "tcp_consumed": (("tcp_rcv_space_adjust", "inet_sock_set_state"),
                     "TCP data received with splice() will not be counted"),
    "udp_peers": (("sendmsg4", "sendmsg6", "recvmsg4", "recvmsg6"),
                  "the remote address of unconnected UDP traffic will not be recorded"),
    "exec": (("sched_process_exec",), "command lines of short-lived processes will not be recorded"),
    "fork": (("sched_process_fork",), "parents of processes that fork without exec may be unknown"),
    "exit": (("sched_process_exit",), "process exits will be noticed late"),
    "dns": (("getaddrinfo_enter", "getaddrinfo_exit"), "domain names will not be recorded"),
    "socket_counters": (("sock_release",),
                        "bytes are added to the flow map on every send and receive, which costs more"),
}
# Programs with a stand-in, loaded in their place on kernels without what they use (core_fixes.bpf.h).
STAND_INS = {"tcp_rcv_space_adjust": "tcp_rcv_space_adjust_compat"}
# The kernel functions (kfuncs) a program calls, and since which kernel they exist.
KFUNCS = {"tcp_rcv_space_adjust": ("bpf_rdonly_cast", "6.2")}
GROUP_OF = {prog: group for group, (progs, _) in HOOK_GROUPS.items() for prog in progs}
GROUP_OF.update({stand_in: GROUP_OF[prog] for prog, stand_in in STAND_INS.items()})
SOCK_TRACEPOINTS_SINCE = "6.3"
# The groups that stand in for the sock tracepoints, and fexit targets a kernel may rightly lack.
FALLBACK_GROUPS = ("bytes_fallback", "pages_fallback", "packet_fallback")
WITHOUT_FUNCTION = {"inet_sendpage": "since 6.5 sendfile and splice go through sendmsg, which is counted"}


def _why_missing(prog: str, disabled: Dict[str, str]) -> str:
    """Why prog is not in place: its own reason, or its stand-in's when prog was not needed."""
    stand_in = STAND_INS.get(prog)
    if disabled[prog].startswith("not needed") and stand_in in disabled:
        return disabled[stand_in]
    return disabled[prog]


def _in_place(prog: str, disabled: Dict[str, str]) -> bool:
    """Whether prog, or its stand-in, is to be loaded."""
    return prog not in disabled or (prog in STAND_INS and STAND_INS[prog] not in disabled)


class MonitorError(Exception):
    """The monitor cannot run at all; the message is one sentence for the user."""


@dataclass(frozen=True)
class KernelFeatures:
    """What the running kernel offers of what the object's programs differ on: tracepoints and
    kfuncs, read from its BTF, and whether it runs fexit programs (BPF trampolines), probed by
    loading a program that does nothing, only when the byte counting fallback is wanted."""

    tracepoints: FrozenSet[str]
    kfuncs: FrozenSet[str]
    trampolines: Optional[bool]  # None: not probed (not needed)
    functions: Optional[FrozenSet[str]] = None  # fexit targets the kernel has; None: not asked, all

    @property
    def sock_tracepoints(self) -> bool:
        return {"sock_send_length", "sock_recv_length"} <= self.tracepoints


def probe_kernel(tracepoints: Iterable[str], byte_hooks: str = "auto", functions: Iterable[str] = ()) -> KernelFeatures:
    """Which of `tracepoints`, of the kfuncs in KFUNCS and of the fexit targets `functions` this
    kernel has, and, where the byte counting fallback is wanted (asked for, or no sock tracepoints),
    whether it loads fexit programs."""
    wanted, targets = set(tracepoints), set(functions)
    found = libbpf.kernel_btf_kinds([("btf_trace_" + t, libbpf.BTF_KIND_TYPEDEF) for t in wanted]
                                    + [(f, libbpf.BTF_KIND_FUNC) for f in targets | {k for k, _ in KFUNCS.values()}])
    present = frozenset(t for t in wanted if ("btf_trace_" + t, libbpf.BTF_KIND_TYPEDEF) in found)
    kfuncs = frozenset(kfunc for kfunc, _ in KFUNCS.values() if (kfunc, libbpf.BTF_KIND_FUNC) in found)
    have = frozenset(f for f in targets if (f, libbpf.BTF_KIND_FUNC) in found)
    features = KernelFeatures(present, kfuncs, None, have)
    if byte_hooks == "fallback" or not features.sock_tracepoints:
        features = KernelFeatures(present, kfuncs, libbpf.loads_fexit("inet_sendmsg"), have)
    return features


def plan(programs: Dict[str, str], features: KernelFeatures, byte_hooks: str = "auto") -> Dict[str, str]:
    """The programs (name: section) not to load on this kernel, each with the reason."""
    disabled = {}
    for prog, section in programs.items():
        kind, _, target = section.partition("/")
        if kind == "tp_btf" and target not in features.tracepoints:
            disabled[prog] = f"this kernel has no tracepoint {target}"
    sock_tracepoints = HOOK_GROUPS["bytes"][0]
    fallback = [p for group in FALLBACK_GROUPS for p in HOOK_GROUPS[group][0]]
    if byte_hooks == "fallback" or not features.sock_tracepoints:
        why = ("byte counting uses the fallback as asked" if byte_hooks == "fallback" else
               f"the kernel lacks the sock tracepoints (added in {SOCK_TRACEPOINTS_SINCE})")
        for p in sock_tracepoints:
            disabled.setdefault(p, f"not needed: {why}")
        for p in fallback:
            target = programs.get(p, "").partition("/")[2]
            if features.trampolines is False:
                disabled[p] = "this kernel does not load fexit programs (no BPF trampolines)"
            elif features.functions is not None and target not in features.functions:
                disabled[p] = (f"not needed: this kernel has no {target} ({WITHOUT_FUNCTION[target]})"
                               if target in WITHOUT_FUNCTION else f"this kernel has no function {target}")
    else:
        for p in fallback:
            disabled[p] = "not needed: the sock tracepoints are available"
    for prog, stand_in in STAND_INS.items():
        kfunc, since = KFUNCS.get(prog, (None, ""))
        if kfunc and kfunc not in features.kfuncs and prog not in disabled:
            disabled[prog] = f"not needed: this kernel has no {kfunc} (added in {since}), {stand_in} is used"
        else:
            disabled.setdefault(stand_in, f"not needed: {prog} is used")
    return {prog: why for prog, why in disabled.items() if prog in programs}


def default_object_path() -> str:
    path = str(resources.files("picosnitch.kernel.bpf") / "picosnitch.bpf.o")
    if not os.path.exists(path):
        raise MonitorError(f"the BPF object {path} is missing: build it with `make -C picosnitch/kernel/bpf` "
                           "(needs clang and libbpf-dev) or reinstall picosnitch")
    return path


def cgroup2_root(mountinfo: str = "/proc/self/mountinfo") -> Optional[str]:
    """Where the unified (v2) cgroup hierarchy is mounted: /sys/fs/cgroup, or /sys/fs/cgroup/unified
    on hybrid systems; None without one."""
    with open(mountinfo) as f:
        for line in f:
            left, _, right = line.partition(" - ")
            if right.split(" ", 1)[0] == "cgroup2":
                return left.split(" ")[4].replace("\\040", " ")
    return None


def libc_path(maps: str = "/proc/self/maps") -> Optional[str]:
    """The C library this (and, normally, every) process maps, for the getaddrinfo uprobes."""
    with open(maps) as f:
        for line in f:
            path = line.rstrip("\n").split(None, 5)[-1]
            if re.search(r"/libc(\.so\.6|-[\d.]+\.so)$", path):
                return path
    return None


def _check_privileges() -> None:
    with open("/proc/self/status") as f:
        caps = int(re.search(r"^CapEff:\s*([0-9a-f]+)", f.read(), re.M).group(1), 16)  # type: ignore[union-attr]
    sys_admin, perfmon, bpf = 1 << 21, 1 << 38, 1 << 39
    if not caps & sys_admin and (caps & (perfmon | bpf)) != perfmon | bpf:
        raise MonitorError("loading BPF programs needs root (or CAP_BPF and CAP_PERFMON): "
                           "run picosnitch as root, e.g. with sudo")
    if not os.path.exists("/sys/kernel/btf/vmlinux"):
        raise MonitorError("this kernel does not describe its types with BTF (/sys/kernel/btf/vmlinux is "
                           "missing): picosnitch needs a kernel built with CONFIG_DEBUG_INFO_BTF=y")


def preflight() -> None:
    """Raises MonitorError when the monitor cannot run at all here (checked before forking)."""
    _check_privileges()
    default_object_path()
    libbpf.lib()


class KernelMonitor:
    def __init__(self, object_path: Optional[str] = None, ring_pages: int = 256, flow_entries: int = 65536,
                 cgroup_root: Optional[str] = None, libc: Optional[str] = None, byte_hooks: str = "auto",
                 cells: Optional[int] = None, names_from_traffic: bool = True,
                 hand_over: Optional[Callable[[Dict[str, int]], None]] = None,
                 adopt: Optional[Dict[str, int]] = None, shared: Optional[handover.Shared] = None):
        """byte_hooks: "auto" picks the sock tracepoints when the kernel has them, else the fexit
        fallback; "fallback" forces the fallback (to exercise it where it can run).
        names_from_traffic: read DNS answers and TCP connections' first bytes (Payload records).
        hand_over, adopt, shared: surviving a restart (see handover): hand_over(descriptors) gets
        every map and link to keep; `adopt` are those a monitor before this one handed over, to
        go on with instead of loading anew; `shared` outlives this monitor."""
        self.object_path = object_path or default_object_path()
        self.byte_hooks = byte_hooks
        self.ring_pages = ring_pages
        self.flow_entries = flow_entries
        self.cgroup_root = cgroup_root
        self.names_from_traffic = names_from_traffic
        self.libc = libc
        # Counter cells, in whole words of the dirty bitmaps: DEFAULT_CELLS unless told (a socket's
        # owner without a cell adds to the flow map instead: exact, a little slower). They are
        # mapped into this process, so they count in its memory: 152 bytes each.
        wanted = cells or min(DEFAULT_CELLS, flow_entries)
        self.cells = max(CELL_DIRTY_BITS, -(-wanted // CELL_DIRTY_BITS) * CELL_DIRTY_BITS)
        self.obj: Optional[libbpf.BpfObject] = None
        self.ring: Optional[libbpf.RingBuffer] = None
        self.features: Optional[KernelFeatures] = None
        self.degraded: List[Degraded] = []
        self.loads = 0  # times the object was loaded by start(): 1 unless the kernel refused a program
        self.attached: List[str] = []  # the programs in place
        self.load_seconds = 0.0
        self._epoch = 0
        self._epoch_began = time.time()  # when the kernel began counting into the current generation
        self._cells: Optional[CellViews] = None
        self._uprobes: List[libbpf.Program] = []
        self.libcs: Optional[LibcProbes] = None
        self._pending: List[Record] = []
        self.hand_over, self.adopt, self.shared = hand_over, adopt, shared or handover.Shared()
        self._losses_seen = self.shared.losses_seen  # counts already reported, per LOSS_KINDS
        self._libc_links: Dict[int, Tuple[int, int]] = {}  # uprobe link -> (device, inode) of its C library
        self._handed_over = 0  # links handed over so far (their names' numbers)
        self._leftovers = False  # the idle generation may hold what a killed monitor had begun to read
        self.taken: Callable[[Sequence[Record]], None] = lambda records: None  # called with what is read
        # Sends on what was delivered and still waits for its receiver; True once nothing waits.
        # While something waits, the monitor also wakes when `hand_on_fd` (the receiver's socket)
        # can take more.
        self.hand_on: Callable[[], bool] = lambda: True
        self.hand_on_fd: Optional[int] = None
        self.pinner: Optional[ExecPinner] = None  # pins what each exec ran (kernel.pins), when set

    # --- loading ---

    def start(self) -> List[Degraded]:
        """Loads and attaches everything this kernel supports; returns what had to be left out.

        A feature probe of the running kernel decides, before loading, which programs it can take
        (plan()), so the object is loaded once. Should the kernel still refuse a program, its hook
        group is left out and the object loaded again: correct, but slower to start, and
        `loads` says so. With `adopt`, takes over what the monitor before this one left instead."""
        _check_privileges()
        begin = time.monotonic()
        if self.adopt:
            self._take_over()
            self.load_seconds = time.monotonic() - begin
            return []
        ctypes.memset(ctypes.addressof(self._losses_seen), 0, ctypes.sizeof(self._losses_seen))  # new counters
        self.obj = libbpf.BpfObject(self.object_path)
        programs = {prog.name: prog.section for prog in self.obj.programs()}
        self.features = probe_kernel((s.partition("/")[2] for s in programs.values() if s.startswith("tp_btf/")),
                                     self.byte_hooks,
                                     (s.partition("/")[2] for s in programs.values() if s.startswith("fexit/")))
        disabled = plan(programs, self.features, self.byte_hooks)
        for _ in range(len(GROUP_OF) + 1):
            self._configure(disabled)
            self.loads += 1
            try:
                self.obj.load()
                break
            except libbpf.LibbpfError as e:
                self.obj.close()
                self.obj = libbpf.BpfObject(self.object_path)
                self._refused(str(e), disabled)
        self._attach(disabled)
        self._report_disabled(disabled)
        if not any(p in disabled for p in HOOK_GROUPS["socket_counters"][0]):
            self._map_cells()
        self._write_drain_state()
        self.ring = libbpf.RingBuffer([self.obj.map("events"), self.obj.map("payloads")], self._on_event)
        self.watch_running_roots()
        self._hand_over_all()
        self.load_seconds = time.monotonic() - begin
        return list(self.degraded)

    def _refused(self, log: str, disabled: Dict[str, str]) -> None:
        """Leaves out the programs the kernel refused, with their hook groups (or puts in their stand-ins)."""
        failed = set(re.findall(r"prog '(\w+)': failed to load", log))
        if not failed or failed <= set(disabled):
            raise MonitorError(f"the kernel refused the BPF programs: {log}") from None
        for prog in failed:
            stand_in = STAND_INS.get(prog)
            if stand_in and disabled.get(stand_in, "").startswith("not needed"):
                del disabled[stand_in]
                disabled[prog] = f"the kernel refused {prog}: {_reason(log, prog)}"
                continue
            for other in (prog, *HOOK_GROUPS[GROUP_OF[prog]][0]):
                disabled.setdefault(other, f"the kernel refused {prog}: {_reason(log, prog)}")

    def _configure(self, disabled: Dict[str, str]) -> None:
        obj = self.obj
        assert obj is not None
        for prog in obj.programs():
            prog.autoload = prog.name not in disabled
        obj.map("events").set_max_entries(self.ring_pages * os.sysconf("SC_PAGE_SIZE"))
        for name in ("flows_0", "flows_1"):
            obj.map(name).set_max_entries(self.flow_entries)
        for name in ("cell_keys", "cells_0", "cells_1", "retired_cells"):
            obj.map(name).set_max_entries(self.cells)
        for name in ("dirty_0", "dirty_1"):
            obj.map(name).set_max_entries(self.cells // CELL_DIRTY_BITS)
        tcp_by_seq = all(_in_place(p, disabled) for p in HOOK_GROUPS["tcp_consumed"][0])
        obj.map(".rodata.config").set_initial_value(MonitorConfig(
            tcp_rx_by_seq=int(tcp_by_seq), cells=self.cells, read_payloads=int(self.names_from_traffic)))
        check_boundary(obj)

    def _attach(self, disabled: Dict[str, str]) -> None:
        assert self.obj is not None
        cgroup_fd = -1
        root = self.cgroup_root or cgroup2_root()
        libc = self.libc or libc_path()
        try:
            for prog in self.obj.programs():
                if prog.name in disabled:
                    continue
                kind = prog.section.split("/")[0]
                try:
                    if kind == "cgroup":
                        if root is None:
                            raise libbpf.LibbpfError("no cgroup2 hierarchy is mounted")
                        if cgroup_fd < 0:
                            cgroup_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
                        self.obj.keep_link(prog.attach_cgroup(cgroup_fd))
                    elif kind in ("uprobe", "uretprobe"):
                        self._uprobes.append(prog)  # attached to each C library below
                        continue
                    else:
                        self.obj.keep_link(prog.attach())
                    self.attached.append(prog.name)
                except (libbpf.LibbpfError, OSError) as e:
                    disabled[prog.name] = str(e)
        finally:
            if cgroup_fd >= 0:
                os.close(cgroup_fd)
        if self._uprobes:
            self.libcs = LibcProbes(self._probe_libc, self._report_libc)
            try:
                if libc is None:
                    raise libbpf.LibbpfError("the C library could not be found")
                self.libcs.add(libc, strict=True)
                self.attached += [prog.name for prog in self._uprobes]
            except (libbpf.LibbpfError, OSError) as e:
                self.libcs = None
                for prog in self._uprobes:
                    disabled[prog.name] = str(e)

    def _probe_libc(self, path: str) -> None:
        """Attaches the getaddrinfo uprobes to one C library (by any path to the file)."""
        assert self.obj is not None
        st = os.stat(path)
        links = []
        try:
            for prog in self._uprobes:
                links.append(prog.attach_uprobe(path, "getaddrinfo", prog.section.startswith("uretprobe")))
        except libbpf.LibbpfError as e:
            for link in links:
                libbpf.destroy_link(link)
            raise OSError(str(e)) from None
        for link in links:
            self.obj.keep_link(link)
            self._libc_links[link] = (st.st_dev, st.st_ino)
        if self._handed_over:  # after start(): the new links are kept for the next monitor too
            self._hand_over_links(links)

    def _report_libc(self, message: str) -> None:
        self._pending.append(Degraded("getaddrinfo_enter, getaddrinfo_exit", message, "see the message"))

    def watch_running_roots(self) -> None:
        """Probes the C libraries of the roots processes already run in (containers started before)."""
        if self.libcs:
            for entry in os.listdir("/proc"):
                if entry.isdigit():
                    self.libcs.notice(int(entry))

    def _report_disabled(self, disabled: Dict[str, str]) -> None:
        counted = [g for g in ("bytes", "bytes_fallback")
                   if not any(p in disabled for p in HOOK_GROUPS[g][0])]
        for group, (progs, consequence) in HOOK_GROUPS.items():
            missing = [p for p in progs if not _in_place(p, disabled)]
            why = _why_missing(missing[0], disabled) if missing else ""
            if not missing or why.startswith("not needed"):
                continue
            if group.startswith("bytes") and counted:
                continue  # the other byte-counting method is in place
            if not counted and (group in FALLBACK_GROUPS[1:] or (group == "bytes" and self._fallback_tried(disabled))):
                continue  # no traffic is counted at all: that is said once, with why the fallback failed
            self.degraded.append(Degraded(", ".join(missing), consequence, why))

    @staticmethod
    def _fallback_tried(disabled: Dict[str, str]) -> bool:
        return not disabled.get(HOOK_GROUPS["bytes_fallback"][0][0], "").startswith("not needed")

    # --- records ---

    def _on_event(self, data: bytes) -> None:
        record = parse_event(data)
        if record is not None:
            self._pending.append(record)
            if isinstance(record, Exec):
                self._pin_exec(record)
                if self.libcs:
                    self.libcs.notice(record.tgid)

    def _pin_exec(self, record: Exec) -> None:
        """Now, within microseconds of the exec, while what it ran is still there (a short-lived
        process may be gone a millisecond later): the Pinned record follows its Exec."""
        if self.pinner is not None:
            self._pending.append(self.pinner.pin(record))

    def poll(self, timeout: float, or_writable: Optional[int] = None) -> List[Record]:
        """Process, exit and DNS events that arrived within `timeout` seconds (or until the
        socket `or_writable` can take more)."""
        assert self.ring is not None
        if or_writable is None:
            self.ring.poll(int(timeout * 1000))
        else:
            self.ring.poll_or_writable(int(timeout * 1000), or_writable)
        records, self._pending = self._pending, []
        if records:
            self.taken(records)
        return records

    def drain(self) -> List[Flow]:
        """Flow totals of the previous epoch, stamped with the moment it ended; then starts the next.

        The kernel adds to the counter cells and flow map of generation epoch & 1. Those read here
        are the other generation's, which stopped receiving updates when the previous call moved
        the epoch on, so no increment races with reading and clearing them."""
        assert self.obj is not None
        idle = (self._epoch + 1) & 1
        totals: Dict[bytes, Tuple[FlowKey, FlowValue]] = {}
        if self._cells:
            _add_up(totals, self._cells.drain(idle, every_cell=self._leftovers))
        self._leftovers = False
        _add_up(totals, self.obj.map(f"flows_{idle}").pop_all(FlowKey, FlowValue))
        counted_until = self._epoch_began  # the idle generation's epoch ended when the current one began
        self._epoch += 1
        self._write_drain_state()
        self._epoch_began = self.shared.epoch_began = time.time()
        flows = [Flow.from_c(k, v, counted_until) for k, v in totals.values()]
        if flows:
            self.taken(flows)
        return flows

    def drain_all(self) -> List[Flow]:
        """Everything still in the kernel (at shutdown): both maps, after a short grace period."""
        flows = self.drain()
        time.sleep(0.05)
        return flows + self.drain()

    def losses(self) -> List[Loss]:
        """What the kernel dropped since the last call, one record per non-zero counter."""
        assert self.obj is not None
        reports = []
        counters = self.obj.map("losses")
        for i, (what, description) in enumerate(LOSS_KINDS):
            value = ctypes.c_uint64()
            counters.lookup(ctypes.c_uint32(i), value)
            if value.value > self._losses_seen[i]:
                reports.append(Loss(what, value.value - self._losses_seen[i], description))
                self._losses_seen[i] = value.value
        return reports

    def run(self, deliver: Callable[[List[Record]], None], should_stop: Callable[[], bool]) -> None:
        """Delivers records in batches until should_stop() is true, then everything still pending."""
        next_drain = time.monotonic() + DRAIN_INTERVAL
        burst, delivered = heap.Burst(QUIET_RECORDS), 0
        while not should_stop():
            # What the receiver could not take yet goes as soon as it can, not with the next batch:
            # after a storm that would be one socket buffer a drain interval.
            behind = not self.hand_on()
            wait = max(next_drain - time.monotonic(), 0)
            batch = self.poll(wait, self.hand_on_fd if behind else None)
            if time.monotonic() >= next_drain:
                next_drain += DRAIN_INTERVAL
                flows = self.drain()
                # The exec that made a drained flow's sender was in the ring before the flow was
                # sent: read it now, so it precedes its flows in the batch.
                batch += [*self.poll(0), *flows, *self.losses()]
                # Memory goes back once the storm is over and handed on: what waits is still held.
                if burst.over(QUIET_RECORDS if behind else delivered):
                    heap.trim()  # what a storm's records and their pickles left free in the heap
                delivered = 0
            delivered += len(batch)
            _deliver_in_parts(deliver, batch)
            del batch
        _deliver_in_parts(deliver, [*self.poll(0), *self.drain_all(), *self.losses()])

    # --- surviving a restart (see handover) ---

    def _hand_over_all(self) -> None:
        """Every map and link, to be kept for the monitor after this one."""
        assert self.obj is not None
        if self.hand_over:
            self.hand_over({handover.MAP + m.name: m.fd for m in self.obj.maps()})
            self._hand_over_links(self.obj.links)
        self._handed_over = max(self._handed_over, 1)

    def _hand_over_links(self, links: List[int]) -> None:
        named = {}
        for link in links:
            self._handed_over += 1
            where = self._libc_links.get(link)
            name = (f"{handover.LIBC}{where[0]}:{where[1]}:{self._handed_over}" if where
                    else f"{handover.LINK}{self._handed_over}")
            named[name] = libbpf.link_fd(link)
        if self.hand_over and named:
            self.hand_over(named)

    def _take_over(self) -> None:
        """Goes on with the maps of the monitor before this one (its programs stay attached, held
        by the supervisor): the same drain epoch, ring buffers and counts. Only the getaddrinfo
        programs are loaded, for C libraries seen from now on; those probed already stay probed."""
        assert self.adopt is not None
        self.obj = self._reusing_maps(uprobes=True)
        try:
            self.obj.load()
        except libbpf.LibbpfError:  # without new C libraries' probes, rather than not at all
            self.obj.close()
            self.obj = self._reusing_maps(uprobes=False)
            self.obj.load()
        state = DrainState()
        self.obj.map(".data.drain").lookup(ctypes.c_uint32(0), state)
        self._epoch = state.epoch
        self._epoch_began = self.shared.epoch_began or time.time()
        if state.cells_on:
            self._map_cells()
        self._leftovers = True
        self.ring = libbpf.RingBuffer([self.obj.map("events"), self.obj.map("payloads")], self._on_event)
        self._uprobes = [p for p in self.obj.programs() if p.autoload and p.section.startswith(("uprobe", "uretprobe"))]
        if self._uprobes:
            self.libcs = LibcProbes(self._probe_libc, self._report_libc)
            self.libcs.files.update(handover.libc_files(self.adopt))
            self.watch_running_roots()
        self._handed_over = 1 + max((int(name.rpartition(":")[2]) for name in self.adopt
                                     if name.startswith((handover.LINK, handover.LIBC))), default=0)

    def _reusing_maps(self, uprobes: bool) -> libbpf.BpfObject:
        """The object, every map of it the one handed over; only the uprobe programs to load, if any."""
        assert self.adopt is not None
        obj = libbpf.BpfObject(self.object_path)
        check_boundary(obj)
        for m in obj.maps():
            fd = self.adopt.get(handover.MAP + m.name)
            if fd is None:
                obj.close()
                raise MonitorError(f"the map {m.name} was not handed over by the monitor before")
            m.reuse_fd(fd)
        for prog in obj.programs():
            prog.autoload = uprobes and prog.section.startswith(("uprobe", "uretprobe"))
        return obj

    def _map_cells(self) -> None:
        assert self.obj is not None
        self._cells = CellViews(*(self.obj.map(name).mmap() for name in
                                  ("cell_keys", "cells_0", "cells_1", "dirty_0", "dirty_1")))

    def _write_drain_state(self) -> None:
        assert self.obj is not None
        state = DrainState(epoch=self._epoch, cells_on=int(self._cells is not None))
        self.obj.map(".data.drain").update(ctypes.c_uint32(0), state)

    def close(self) -> None:
        if self._cells:
            self._cells.close()
            self._cells = None
        if self.ring:
            self.ring.close()
            self.ring = None
        if self.obj:
            self.obj.close()
            self.obj = None


class CellViews:
    """The counter cells and their dirty bitmaps, mapped into this process's memory."""

    def __init__(self, keys: mmap.mmap, counts_0: mmap.mmap, counts_1: mmap.mmap, dirty_0: mmap.mmap,
                 dirty_1: mmap.mmap):
        self._maps = (keys, counts_0, counts_1, dirty_0, dirty_1)
        cells = len(keys) // ctypes.sizeof(FlowKey)
        self.keys = (FlowKey * cells).from_buffer(keys)
        self.counts = tuple((FlowValue * cells).from_buffer(m) for m in (counts_0, counts_1))
        self.dirty = tuple(memoryview(m).cast("Q") for m in (dirty_0, dirty_1))

    def drain(self, generation: int, every_cell: bool = False) -> Iterable[Tuple[FlowKey, FlowValue]]:
        """Every cell with counts in `generation` (which the kernel must not be adding to), with
        its key; the counts and the dirty bits are cleared. `every_cell`: not only those marked
        dirty (a monitor killed in the middle of a drain may have cleared marks it did not read)."""
        for _, key, value in (self.counted_cells if every_cell else self.drain_cells)(generation):
            yield key, value

    def counted_cells(self, generation: int) -> Iterable[Tuple[int, FlowKey, FlowValue]]:
        """drain_cells(), of every cell that has counts, marked dirty or not."""
        dirty, counts = self.dirty[generation], self.counts[generation]
        for word in range(len(dirty)):
            dirty[word] = 0
        for cell, value in enumerate(counts):
            if value.bytes_sent or value.bytes_recv or value.packets_sent or value.packets_recv:
                taken = FlowValue.from_buffer_copy(value)
                ctypes.memset(ctypes.addressof(value), 0, ctypes.sizeof(FlowValue))
                yield cell, FlowKey.from_buffer_copy(self.keys[cell]), taken

    def drain_cells(self, generation: int) -> Iterable[Tuple[int, FlowKey, FlowValue]]:
        """drain(), with each cell's number."""
        dirty, counts = self.dirty[generation], self.counts[generation]
        for word, bits in enumerate(dirty):
            if not bits:
                continue
            dirty[word] = 0
            while bits:
                low = bits & -bits
                bits ^= low
                cell = word * CELL_DIRTY_BITS + low.bit_length() - 1
                value = FlowValue.from_buffer_copy(counts[cell])
                ctypes.memset(ctypes.addressof(counts[cell]), 0, ctypes.sizeof(FlowValue))
                yield cell, FlowKey.from_buffer_copy(self.keys[cell]), value

    def close(self) -> None:
        for view in self.dirty:
            view.release()
        del self.keys, self.counts, self.dirty
        for m in self._maps:
            m.close()


def _add_up(totals: Dict[bytes, Tuple[FlowKey, FlowValue]], entries: Iterable[Tuple[FlowKey, FlowValue]]) -> None:
    """Sums entries into totals by key: a flow may have counts in a cell and in the flow map."""
    for key, value in entries:
        known = totals.setdefault(bytes(key), (key, FlowValue()))[1]
        for name, *_ in FlowValue._fields_:
            setattr(known, name, getattr(known, name) + getattr(value, name))


def check_boundary(obj: libbpf.BpfObject) -> None:
    """Refuses an object whose structs or maps disagree with the ctypes mirrors in kernel_records.py:
    the kernel would otherwise write past a buffer of the wrong size instead of failing."""
    check_structs(obj, MIRRORS)
    maps = {"flows_0": (FlowKey, FlowValue), "flows_1": (FlowKey, FlowValue), "cell_keys": (ctypes.c_uint32, FlowKey),
            "cells_0": (ctypes.c_uint32, FlowValue), "cells_1": (ctypes.c_uint32, FlowValue),
            "dirty_0": (ctypes.c_uint32, ctypes.c_uint64), "dirty_1": (ctypes.c_uint32, ctypes.c_uint64),
            "retired_cells": (None, RetiredCell), "losses": (ctypes.c_uint32, ctypes.c_uint64),
            ".rodata.config": (ctypes.c_uint32, MonitorConfig), ".data.drain": (ctypes.c_uint32, DrainState)}
    for name, (key, value) in maps.items():
        m = obj.map(name)
        want = (ctypes.sizeof(key) if key else 0, ctypes.sizeof(value))
        if (m.key_size, m.value_size) != want:
            _mismatch(obj, f"map {name} has {m.key_size}-byte keys and {m.value_size}-byte values, not {want}")


def check_structs(obj: libbpf.BpfObject, mirrors: Mapping[str, type[ctypes.Structure]]) -> None:
    """Refuses an object in whose BTF a struct of `mirrors` (C name: ctypes mirror) has another size,
    or a field another offset."""
    for c_name, mirror in mirrors.items():
        layout = obj.struct_layout(c_name)
        ours = (ctypes.sizeof(mirror), {name: getattr(mirror, name).offset for name, *_ in mirror._fields_})
        if layout != ours:
            _mismatch(obj, f"struct {c_name} is {layout} in its BTF, {ours} in kernel/records.py")


def _mismatch(obj: libbpf.BpfObject, what: str) -> None:
    raise MonitorError(f"the BPF object {obj.path} does not match this version of picosnitch ({what}): rebuild "
                       "it with `make -C picosnitch/kernel/bpf` or reinstall picosnitch")


def _deliver_in_parts(deliver: Callable[[List[Record]], None], batch: List[Record]) -> None:
    for start in range(0, len(batch), DELIVERY_PART):
        deliver(batch[start:start + DELIVERY_PART])


def _reason(log: str, prog: str) -> str:
    """The most telling line libbpf logged about a program that failed to load."""
    lines = [s.strip() for s in log.split(";") if prog in s]
    return lines[-1] if lines else "see error.log"
