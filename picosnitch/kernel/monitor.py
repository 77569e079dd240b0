"""Loads the BPF object, attaches what this kernel supports, and turns its output into records.

`KernelMonitor.start()` returns the hooks it had to leave out (as `Degraded` records, each
saying what will not be recorded); `run()` then delivers `Exec`/`Fork`/`Exit`/`Dns` records
as they happen and `Flow` totals at least once a second, plus `Loss` records whenever the
kernel had to drop something.
"""

import ctypes
import os
import re
import time
from importlib import resources
from typing import Callable, Dict, List, Optional

from picosnitch.kernel import libbpf
from picosnitch.kernel.records import (
    LOSS_KINDS,
    Degraded,
    Flow,
    FlowKey,
    FlowValue,
    Loss,
    MonitorConfig,
    Record,
    parse_event,
)

DRAIN_INTERVAL = 0.5  # seconds; a flow is reported at most two intervals after it happened
DELIVERY_PART = 5000  # records per deliver() call: a storm's drain is passed on, pickled and read in parts

# Programs by the capability they provide, with what is lost without them.
HOOK_GROUPS = {
    "bytes": (("sock_send_length", "sock_recv_length"), "no traffic will be counted"),
    "bytes_fallback": (("inet_sendmsg_exit", "inet6_sendmsg_exit", "inet_recvmsg_exit", "inet6_recvmsg_exit"),
                       "no traffic will be counted"),
    "tcp_consumed": (("tcp_rcv_space_adjust", "inet_sock_set_state"),
                     "TCP data received with splice() will not be counted"),
    "udp_peers": (("sendmsg4", "sendmsg6", "recvmsg4", "recvmsg6"),
                  "the remote address of unconnected UDP traffic will not be recorded"),
    "exec": (("sched_process_exec",), "command lines of short-lived processes will not be recorded"),
    "fork": (("sched_process_fork",), "parents of processes that fork without exec may be unknown"),
    "exit": (("sched_process_exit",), "process exits will be noticed late"),
    "dns": (("getaddrinfo_enter", "getaddrinfo_exit"), "domain names will not be recorded"),
    "socket_counters": (("sock_release", "flush_sockets"),
                        "bytes are added to the flow map on every send and receive, which costs more"),
}
# Programs with a stand-in, loaded in their place when the kernel refuses them (older kernels).
STAND_INS = {"tcp_rcv_space_adjust": "tcp_rcv_space_adjust_compat"}
GROUP_OF = {prog: group for group, (progs, _) in HOOK_GROUPS.items() for prog in progs}
GROUP_OF.update({stand_in: GROUP_OF[prog] for prog, stand_in in STAND_INS.items()})


def _in_place(prog: str, disabled: Dict[str, str]) -> bool:
    """Whether prog, or its stand-in, is to be loaded."""
    return prog not in disabled or (prog in STAND_INS and STAND_INS[prog] not in disabled)


class MonitorError(Exception):
    """The monitor cannot run at all; the message is one sentence for the user."""


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
        caps = int(re.search(r"^CapEff:\s*([0-9a-f]+)", f.read(), re.M).group(1), 16)
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
                 cgroup_root: Optional[str] = None, libc: Optional[str] = None, byte_hooks: str = "auto"):
        """byte_hooks: "auto" picks the sock tracepoints when the kernel has them, else the fexit
        fallback; "fallback" forces the fallback (to exercise it where it can run)."""
        self.object_path = object_path or default_object_path()
        self.byte_hooks = byte_hooks
        self.ring_pages = ring_pages
        self.flow_entries = flow_entries
        self.cgroup_root = cgroup_root
        self.libc = libc
        self.obj: Optional[libbpf.BpfObject] = None
        self.ring: Optional[libbpf.RingBuffer] = None
        self.degraded: List[Degraded] = []
        self.socket_flush: Optional[libbpf.MapIterator] = None
        self.load_seconds = 0.0
        self._slot = 0
        self._pending: List[Record] = []
        self._losses_seen = [0] * len(LOSS_KINDS)

    # --- loading ---

    def start(self) -> List[Degraded]:
        """Loads and attaches everything this kernel supports; returns what had to be left out."""
        _check_privileges()
        begin = time.monotonic()
        disabled: Dict[str, str] = self._unsupported_tracepoints()
        for _ in range(len(GROUP_OF) + 1):
            self.obj = self._open(disabled)
            try:
                self.obj.load()
                break
            except libbpf.LibbpfError as e:
                failed = set(re.findall(r"prog '(\w+)': failed to load", str(e)))
                self.obj.close()
                if not failed or failed <= set(disabled):
                    raise MonitorError(f"the kernel refused the BPF programs: {e}") from None
                for prog in failed:
                    stand_in = STAND_INS.get(prog)
                    if stand_in and disabled.get(stand_in, "").startswith("not needed"):
                        del disabled[stand_in]
                        disabled[prog] = f"the kernel refused {prog}: {_reason(str(e), prog)}"
                        continue
                    for other in (prog, *HOOK_GROUPS[GROUP_OF[prog]][0]):
                        disabled.setdefault(other, f"the kernel refused {prog}: {_reason(str(e), prog)}")
        self._attach(disabled)
        self._report_disabled(disabled)
        if not any(p in disabled for p in HOOK_GROUPS["socket_counters"][0]):
            self.obj.map(".data.counters_on").update(ctypes.c_uint32(0), ctypes.c_uint32(1))
        self.ring = libbpf.RingBuffer(self.obj.map("events"), self._on_event)
        self.load_seconds = time.monotonic() - begin
        return list(self.degraded)

    def _unsupported_tracepoints(self) -> Dict[str, str]:
        """Programs whose tracepoint this kernel lacks, and the fallback choice for byte counting."""
        disabled = {}
        obj = libbpf.BpfObject(self.object_path)
        try:
            targets = {prog.name: prog.section.partition("/")[2] for prog in obj.programs()
                       if prog.section.startswith("tp_btf/")}
        finally:
            obj.close()
        present = libbpf.kernel_btf_types("btf_trace_" + target for target in targets.values())
        for prog, target in targets.items():
            if "btf_trace_" + target not in present:
                disabled[prog] = f"this kernel has no tracepoint {target}"
        sock_tracepoints = HOOK_GROUPS["bytes"][0]
        fallback = HOOK_GROUPS["bytes_fallback"][0]
        if self.byte_hooks == "fallback" or any(p in disabled for p in sock_tracepoints):
            for p in sock_tracepoints:
                disabled.setdefault(p, "not needed: byte counting uses the fallback as asked")
        else:
            for p in fallback:
                disabled[p] = "not needed: the sock tracepoints are available"
        for prog, stand_in in STAND_INS.items():
            disabled.setdefault(stand_in, f"not needed: {prog} is used")
        return disabled

    def _open(self, disabled: Dict[str, str]) -> libbpf.BpfObject:
        obj = libbpf.BpfObject(self.object_path)
        for prog in obj.programs():
            prog.autoload = prog.name not in disabled
        obj.map("events").set_max_entries(self.ring_pages * os.sysconf("SC_PAGE_SIZE"))
        for name in ("flows_0", "flows_1"):
            obj.map(name).set_max_entries(self.flow_entries)
        tcp_by_seq = all(_in_place(p, disabled) for p in HOOK_GROUPS["tcp_consumed"][0])
        obj.map(".rodata.config").set_initial_value(MonitorConfig(tcp_rx_by_seq=int(tcp_by_seq)))
        return obj

    def _attach(self, disabled: Dict[str, str]) -> None:
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
                    elif kind == "iter":
                        self.socket_flush = libbpf.attach_map_iterator(prog, self.obj.map("sock_states"))
                        self.obj.keep_link(self.socket_flush.link)
                    elif kind in ("uprobe", "uretprobe"):
                        if libc is None:
                            raise libbpf.LibbpfError("the C library could not be found")
                        self.obj.keep_link(prog.attach_uprobe(libc, "getaddrinfo", kind == "uretprobe"))
                    else:
                        self.obj.keep_link(prog.attach())
                except (libbpf.LibbpfError, OSError) as e:
                    disabled[prog.name] = str(e)
        finally:
            if cgroup_fd >= 0:
                os.close(cgroup_fd)

    def _report_disabled(self, disabled: Dict[str, str]) -> None:
        counted = [g for g in ("bytes", "bytes_fallback")
                   if not any(p in disabled for p in HOOK_GROUPS[g][0])]
        for group, (progs, consequence) in HOOK_GROUPS.items():
            missing = [p for p in progs if not _in_place(p, disabled)]
            if not missing or disabled[missing[0]].startswith("not needed"):
                continue
            if group.startswith("bytes") and counted:
                continue  # the other byte-counting method is in place
            self.degraded.append(Degraded(", ".join(missing), consequence, disabled[missing[0]]))

    # --- records ---

    def _on_event(self, data: bytes) -> None:
        record = parse_event(data)
        if record is not None:
            self._pending.append(record)

    def poll(self, timeout: float) -> List[Record]:
        """Process, exit and DNS events that arrived within `timeout` seconds."""
        self.ring.poll(int(timeout * 1000))
        records, self._pending = self._pending, []
        return records

    def drain(self) -> List[Flow]:
        """Flow totals since the previous drain but one; switches the kernel to the drained map.

        The map drained here stopped receiving updates at the previous call, so no increment can
        race with reading and deleting it. Bytes waiting in sockets' counters are first moved
        into the active map, to be drained next time."""
        if self.socket_flush:
            self.socket_flush.run()
        flows_map = self.obj.map("flows_1" if self._slot == 0 else "flows_0")
        flows = [Flow.from_c(k, v) for k, v in flows_map.pop_all(FlowKey, FlowValue)]
        self._slot ^= 1
        self.obj.map("flow_slot").update(ctypes.c_uint32(0), ctypes.c_uint32(self._slot))
        return flows

    def drain_all(self) -> List[Flow]:
        """Everything still in the kernel (at shutdown): both maps, after a short grace period."""
        flows = self.drain()
        time.sleep(0.05)
        return flows + self.drain()

    def losses(self) -> List[Loss]:
        """What the kernel dropped since the last call, one record per non-zero counter."""
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
        while not should_stop():
            batch = self.poll(max(next_drain - time.monotonic(), 0))
            if time.monotonic() >= next_drain:
                next_drain += DRAIN_INTERVAL
                batch += self.drain() + self.losses()
            _deliver_in_parts(deliver, batch)
        _deliver_in_parts(deliver, self.poll(0) + self.drain_all() + self.losses())

    def close(self) -> None:
        if self.ring:
            self.ring.close()
            self.ring = None
        if self.obj:
            self.obj.close()
            self.obj = None


def _deliver_in_parts(deliver: Callable[[List[Record]], None], batch: List[Record]) -> None:
    for start in range(0, len(batch), DELIVERY_PART):
        deliver(batch[start:start + DELIVERY_PART])


def _reason(log: str, prog: str) -> str:
    """The most telling line libbpf logged about a program that failed to load."""
    lines = [s.strip() for s in log.split(";") if prog in s]
    return lines[-1] if lines else "see error.log"
