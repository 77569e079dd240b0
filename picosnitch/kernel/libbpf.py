"""A small ctypes binding to the system libbpf (libbpf.so.1): just what the monitor uses.

libbpf's own log lines are collected while a call runs and put into the exception message,
so "failed to load" always says what the kernel or libbpf objected to.
"""

import ctypes
import ctypes.util
import errno
import mmap
import os
import select
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Set, Tuple, Type

c_void_p, c_int, c_char_p, c_size_t, c_uint32 = (
    ctypes.c_void_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint32)

BPF_ANY = 0
LIBBPF_WARN = 0
BTF_KIND_STRUCT = 4
BTF_KIND_TYPEDEF = 8
BTF_KIND_FUNC = 12


class LibbpfError(Exception):
    """A libbpf call failed; the message includes libbpf's log lines for that call."""


class _UprobeOpts(ctypes.Structure):
    # struct bpf_uprobe_opts of libbpf 1.x; sz tells libbpf which fields we know.
    _fields_ = [("sz", c_size_t), ("ref_ctr_offset", c_size_t), ("bpf_cookie", ctypes.c_uint64),
                ("retprobe", ctypes.c_bool), ("func_name", c_char_p)]


class _BatchOpts(ctypes.Structure):
    _fields_ = [("sz", c_size_t), ("elem_flags", ctypes.c_uint64), ("flags", ctypes.c_uint64)]


_PRINT_FN = ctypes.CFUNCTYPE(c_int, c_int, c_char_p, c_void_p)
SAMPLE_FN = ctypes.CFUNCTYPE(c_int, c_void_p, c_void_p, c_size_t)


def _load_library() -> ctypes.CDLL:
    try:
        return ctypes.CDLL("libbpf.so.1", use_errno=True)
    except OSError:
        raise LibbpfError("libbpf.so.1 was not found: install libbpf1 (apt-get install libbpf1)") from None


_lib = None
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_log: List[str] = []


def _on_print(level: int, fmt: bytes, args: int) -> int:
    if level > LIBBPF_WARN:  # info and debug lines would bury the one that matters
        return 0
    buf = ctypes.create_string_buffer(65536)  # verifier logs come as one long line
    _libc.vsnprintf(buf, len(buf), fmt, ctypes.c_void_p(args))
    _log.append(buf.value.decode("utf-8", "replace").rstrip())
    return 0


_print_callback = _PRINT_FN(_on_print)


def lib() -> ctypes.CDLL:
    """The loaded libbpf, with argument types declared and log capture installed."""
    global _lib
    if _lib is None:
        _lib = _load_library()
        _declare(_lib)
        _libc.vsnprintf.argtypes = [c_char_p, c_size_t, c_char_p, c_void_p]
        _lib.libbpf_set_print(_print_callback)
    return _lib


def _declare(l: ctypes.CDLL) -> None:
    sig = {
        "libbpf_set_print": (c_void_p, [_PRINT_FN]),
        "bpf_object__open_file": (c_void_p, [c_char_p, c_void_p]),
        "bpf_object__load": (c_int, [c_void_p]),
        "bpf_object__close": (None, [c_void_p]),
        "bpf_object__next_program": (c_void_p, [c_void_p, c_void_p]),
        "bpf_object__find_map_by_name": (c_void_p, [c_void_p, c_char_p]),
        "bpf_object__next_map": (c_void_p, [c_void_p, c_void_p]),
        "bpf_map__name": (c_char_p, [c_void_p]),
        "bpf_map__reuse_fd": (c_int, [c_void_p, c_int]),
        "bpf_program__name": (c_char_p, [c_void_p]),
        "bpf_program__section_name": (c_char_p, [c_void_p]),
        "bpf_program__set_autoload": (c_int, [c_void_p, ctypes.c_bool]),
        "bpf_program__autoload": (ctypes.c_bool, [c_void_p]),
        "bpf_program__attach": (c_void_p, [c_void_p]),
        "bpf_program__attach_cgroup": (c_void_p, [c_void_p, c_int]),
        "bpf_program__attach_uprobe_opts": (c_void_p, [c_void_p, c_int, c_char_p, c_size_t,
                                                       ctypes.POINTER(_UprobeOpts)]),
        "bpf_link__destroy": (c_int, [c_void_p]),
        "bpf_prog_load": (c_int, [c_int, c_char_p, c_char_p, c_void_p, c_size_t, ctypes.POINTER(_ProgLoadOpts)]),
        "bpf_link__fd": (c_int, [c_void_p]),
        "bpf_map__fd": (c_int, [c_void_p]),
        "bpf_map__set_max_entries": (c_int, [c_void_p, c_uint32]),
        "bpf_map__max_entries": (c_uint32, [c_void_p]),
        "bpf_map__key_size": (c_uint32, [c_void_p]),
        "bpf_map__value_size": (c_uint32, [c_void_p]),
        "bpf_map__initial_value": (c_void_p, [c_void_p, ctypes.POINTER(c_size_t)]),
        "bpf_map__set_initial_value": (c_int, [c_void_p, c_void_p, c_size_t]),
        "bpf_map_lookup_elem": (c_int, [c_int, c_void_p, c_void_p]),
        "bpf_map_update_elem": (c_int, [c_int, c_void_p, c_void_p, ctypes.c_uint64]),
        "bpf_map_lookup_and_delete_batch": (c_int, [c_int, c_void_p, c_void_p, c_void_p, c_void_p,
                                                    ctypes.POINTER(c_uint32), ctypes.POINTER(_BatchOpts)]),
        "btf__load_vmlinux_btf": (c_void_p, []),
        "btf__find_by_name_kind": (c_int, [c_void_p, c_char_p, c_uint32]),
        "btf__free": (None, [c_void_p]),
        "btf__type_by_id": (c_void_p, [c_void_p, c_uint32]),
        "btf__name_by_offset": (c_char_p, [c_void_p, c_uint32]),
        "bpf_object__btf": (c_void_p, [c_void_p]),
        "ring_buffer__new": (c_void_p, [c_int, SAMPLE_FN, c_void_p, c_void_p]),
        "ring_buffer__poll": (c_int, [c_void_p, c_int]),
        "ring_buffer__add": (c_int, [c_void_p, c_int, SAMPLE_FN, c_void_p]),
        "ring_buffer__free": (None, [c_void_p]),
        "ring_buffer__consume": (c_int, [c_void_p]),
        "ring_buffer__epoll_fd": (c_int, [c_void_p]),
    }
    for name, (restype, argtypes) in sig.items():
        fn = getattr(l, name)
        fn.restype, fn.argtypes = restype, argtypes


def _fail(what: str, err: int) -> LibbpfError:
    err = abs(err) or ctypes.get_errno() or errno.EINVAL
    details = "; ".join(line for line in _log if line)
    _log.clear()
    message = f"{what}: {os.strerror(err)}"
    return LibbpfError(f"{message} ({details})" if details else message)


def _call_ptr(what: str, ptr: Optional[int]) -> int:
    if not ptr:
        raise _fail(what, ctypes.get_errno())
    return ptr


def _call_int(what: str, ret: int) -> int:
    if ret < 0:
        raise _fail(what, ret)
    return ret


def take_log() -> List[str]:
    """libbpf's log lines since the last call that raised (or since the last take_log)."""
    lines = list(_log)
    _log.clear()
    return lines


def kernel_btf_types(names: Iterable[str], kind: int = BTF_KIND_TYPEDEF) -> Set[str]:
    """Those of `names` that the running kernel's BTF defines as `kind` (e.g. the typedefs
    btf_trace_<tracepoint>)."""
    return {name for name, k in kernel_btf_kinds((name, kind) for name in names)}


def kernel_btf_kinds(wanted: Iterable[Tuple[str, int]]) -> Set[Tuple[str, int]]:
    """Those of the (name, kind) pairs that the running kernel's BTF defines; the BTF is parsed
    once for all of them, as parsing it takes some 10 ms."""
    btf = _call_ptr("reading the kernel's BTF (/sys/kernel/btf/vmlinux)", lib().btf__load_vmlinux_btf())
    try:
        return {(name, kind) for name, kind in wanted if lib().btf__find_by_name_kind(btf, name.encode(), kind) > 0}
    finally:
        lib().btf__free(btf)


class _ProgLoadOpts(ctypes.Structure):
    # The leading fields of libbpf 1.x's struct bpf_prog_load_opts; sz tells libbpf which we know.
    _fields_ = [("sz", c_size_t), ("attempts", c_int), ("expected_attach_type", c_uint32),
                ("prog_btf_fd", c_uint32), ("prog_flags", c_uint32), ("prog_ifindex", c_uint32),
                ("kern_version", c_uint32), ("attach_btf_id", c_uint32), ("attach_prog_fd", c_uint32),
                ("attach_btf_obj_fd", c_uint32)]


BPF_PROG_TYPE_TRACING, BPF_TRACE_FEXIT = 26, 25
_RETURN_0 = bytes([0xb7, 0, 0, 0, 0, 0, 0, 0, 0x95, 0, 0, 0, 0, 0, 0, 0])  # r0 = 0; exit


def loads_fexit(function: str) -> bool:
    """Whether this kernel loads an fexit program (which needs BPF trampolines) on `function`:
    one that does nothing is loaded and closed at once."""
    btf = _call_ptr("reading the kernel's BTF (/sys/kernel/btf/vmlinux)", lib().btf__load_vmlinux_btf())
    try:
        btf_id = lib().btf__find_by_name_kind(btf, function.encode(), BTF_KIND_FUNC)
    finally:
        lib().btf__free(btf)
    if btf_id <= 0:
        return False
    opts = _ProgLoadOpts(sz=ctypes.sizeof(_ProgLoadOpts), expected_attach_type=BPF_TRACE_FEXIT, attach_btf_id=btf_id)
    insns = ctypes.create_string_buffer(_RETURN_0, len(_RETURN_0))
    fd = lib().bpf_prog_load(BPF_PROG_TYPE_TRACING, b"ps_probe_fexit", b"GPL", insns, 2, ctypes.byref(opts))
    take_log()
    if fd < 0:
        return False
    os.close(fd)
    return True


class _BtfType(ctypes.Structure):
    _fields_ = [("name_off", c_uint32), ("info", c_uint32), ("size", c_uint32)]


class _BtfMember(ctypes.Structure):
    _fields_ = [("name_off", c_uint32), ("type", c_uint32), ("offset", c_uint32)]


def _struct_layout(btf: int, name: str) -> Optional[Tuple[int, Dict[str, int]]]:
    """(size, {member: byte offset}) of a struct described by a BTF, or None if it has none."""
    type_id = lib().btf__find_by_name_kind(btf, name.encode(), BTF_KIND_STRUCT)
    if type_id <= 0:
        return None
    address = lib().btf__type_by_id(btf, type_id)
    t = _BtfType.from_address(address)
    bitfields = t.info >> 31  # then a member's offset holds its bit size in the top 8 bits
    members = (_BtfMember * (t.info & 0xFFFF)).from_address(address + ctypes.sizeof(_BtfType))
    offsets = {}
    for m in members:
        bits = m.offset & 0xFFFFFF if bitfields else m.offset
        offsets[lib().btf__name_by_offset(btf, m.name_off).decode()] = bits // 8
    return t.size, offsets


def destroy_link(link: int) -> None:
    lib().bpf_link__destroy(link)


def link_fd(link: int) -> int:
    """The file descriptor that keeps a link (a program's attachment) in place."""
    return lib().bpf_link__fd(link)


class Program:
    """One BPF program of an object, before or after load."""

    def __init__(self, ptr: int):
        self.ptr = ptr
        self.name = lib().bpf_program__name(ptr).decode()
        self.section = lib().bpf_program__section_name(ptr).decode()

    @property
    def autoload(self) -> bool:
        return lib().bpf_program__autoload(self.ptr)

    @autoload.setter
    def autoload(self, value: bool) -> None:
        lib().bpf_program__set_autoload(self.ptr, value)

    def attach(self) -> int:
        """Attaches by section name (tracepoints, fentry/fexit); returns the bpf_link."""
        return _call_ptr(f"attaching {self.name} ({self.section})", lib().bpf_program__attach(self.ptr))

    def attach_cgroup(self, cgroup_fd: int) -> int:
        return _call_ptr(f"attaching {self.name} to the cgroup",
                         lib().bpf_program__attach_cgroup(self.ptr, cgroup_fd))

    def attach_uprobe(self, binary: str, function: str, retprobe: bool) -> int:
        opts = _UprobeOpts(sz=ctypes.sizeof(_UprobeOpts), retprobe=retprobe, func_name=function.encode())
        return _call_ptr(f"attaching {self.name} to {function} in {binary}",
                         lib().bpf_program__attach_uprobe_opts(self.ptr, -1, binary.encode(), 0,
                                                               ctypes.byref(opts)))


class Map:
    """A BPF map of a loaded object, addressed by fd, with fixed-size ctypes keys and values."""

    def __init__(self, ptr: int, name: str):
        self.ptr = ptr
        self.name = name

    @property
    def fd(self) -> int:
        return lib().bpf_map__fd(self.ptr)

    def reuse_fd(self, fd: int) -> None:
        """Before load: use the existing map `fd` refers to (another process's) instead of creating one."""
        _call_int(f"reusing map {self.name}", lib().bpf_map__reuse_fd(self.ptr, fd))

    def set_max_entries(self, n: int) -> None:
        _call_int(f"resizing map {self.name}", lib().bpf_map__set_max_entries(self.ptr, n))

    @property
    def max_entries(self) -> int:
        return lib().bpf_map__max_entries(self.ptr)

    @property
    def key_size(self) -> int:
        return lib().bpf_map__key_size(self.ptr)

    @property
    def value_size(self) -> int:
        return lib().bpf_map__value_size(self.ptr)

    def mmap(self) -> mmap.mmap:
        """The values of a BPF_F_MMAPABLE array, shared with the kernel (read and write)."""
        stride = (self.value_size + 7) // 8 * 8
        size = -(-stride * self.max_entries // mmap.PAGESIZE) * mmap.PAGESIZE
        try:
            return mmap.mmap(self.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as e:
            raise LibbpfError(f"mapping {self.name} into memory: {e.strerror}") from None

    def set_initial_value(self, data: ctypes.Structure) -> None:
        _call_int(f"setting {self.name}",
                  lib().bpf_map__set_initial_value(self.ptr, ctypes.byref(data), ctypes.sizeof(data)))

    def lookup(self, key: "ctypes._CData", value: "ctypes._CData") -> bool:
        ret = lib().bpf_map_lookup_elem(self.fd, ctypes.byref(key), ctypes.byref(value))
        if ret < 0 and ctypes.get_errno() != errno.ENOENT:
            raise _fail(f"reading map {self.name}", ret)
        return ret == 0

    def update(self, key: "ctypes._CData", value: "ctypes._CData") -> None:
        _call_int(f"writing map {self.name}",
                  lib().bpf_map_update_elem(self.fd, ctypes.byref(key), ctypes.byref(value), BPF_ANY))

    def pop_all(self, key_type: Type[ctypes.Structure], value_type: Type[ctypes.Structure],
                batch: int = 1024) -> Iterator[Tuple]:
        """Reads and deletes every entry (hash maps), a batch per syscall. Each key and value is a
        copy: the buffers are filled again by the next batch."""
        keys, values = (key_type * batch)(), (value_type * batch)()
        token = ctypes.c_uint64()
        opts = _BatchOpts(sz=ctypes.sizeof(_BatchOpts))
        in_batch = None
        while True:
            count = c_uint32(batch)
            ret = lib().bpf_map_lookup_and_delete_batch(
                self.fd, in_batch, ctypes.byref(token), keys, values, ctypes.byref(count), ctypes.byref(opts))
            err = ctypes.get_errno() if ret < 0 else 0
            if ret < 0 and err != errno.ENOENT:
                raise _fail(f"draining map {self.name}", ret)
            for i in range(count.value):
                yield key_type.from_buffer_copy(keys[i]), value_type.from_buffer_copy(values[i])
            if err == errno.ENOENT:
                return
            in_batch = ctypes.byref(token)


class BpfObject:
    """An opened BPF object file: configure programs and maps, then load() and attach."""

    def __init__(self, path: str):
        self.path = path
        self.ptr: Optional[int] = _call_ptr(f"opening {path}", lib().bpf_object__open_file(path.encode(), None))
        self.links: List[int] = []

    def _each(self, next_one: Callable[[Optional[int], Optional[int]], Optional[int]]) -> List[int]:
        """Pointers to the object's programs or maps, by libbpf's iterator `next_one`."""
        found: List[int] = []
        prev = None
        while True:
            prev = next_one(self.ptr, prev)
            if not prev:
                return found
            found.append(prev)

    def programs(self) -> List[Program]:
        return [Program(ptr) for ptr in self._each(lib().bpf_object__next_program)]

    def program(self, name: str) -> Program:
        for prog in self.programs():
            if prog.name == name:
                return prog
        raise LibbpfError(f"{self.path} has no program {name}")

    def maps(self) -> List[Map]:
        return [Map(ptr, lib().bpf_map__name(ptr).decode()) for ptr in self._each(lib().bpf_object__next_map)]

    def map(self, name: str) -> Map:
        ptr = lib().bpf_object__find_map_by_name(self.ptr, name.encode())
        if not ptr:
            raise LibbpfError(f"{self.path} has no map {name}")
        return Map(ptr, name)

    def struct_layout(self, name: str) -> Optional[Tuple[int, Dict[str, int]]]:
        """(size, {member: byte offset}) of struct `name` as the object's BTF describes it."""
        btf = lib().bpf_object__btf(self.ptr)
        return _struct_layout(btf, name) if btf else None

    def load(self) -> None:
        take_log()
        _call_int(f"loading {os.path.basename(self.path)}", lib().bpf_object__load(self.ptr))

    def keep_link(self, link: int) -> None:
        self.links.append(link)

    def close(self) -> None:
        for link in self.links:
            lib().bpf_link__destroy(link)
        self.links.clear()
        if self.ptr:
            lib().bpf_object__close(self.ptr)
            self.ptr = None


class RingBuffer:
    """A libbpf ring_buffer over one or more BPF_MAP_TYPE_RINGBUF maps; calls on_sample(bytes)."""

    def __init__(self, ring_maps: List[Map], on_sample: Callable[[bytes], None]):
        def sample(_ctx: int, data: int, size: int) -> int:
            on_sample(ctypes.string_at(data, size))
            return 0

        self._callback = SAMPLE_FN(sample)  # must outlive the ring buffer
        self._waiter: Optional[select.epoll] = None  # the ring's epoll and a socket (poll_or_writable)
        self._writable: Optional[int] = None
        first, *more = ring_maps
        self.ptr: Optional[int] = _call_ptr(f"opening ring buffer {first.name}",
                                            lib().ring_buffer__new(first.fd, self._callback, None, None))
        for ring_map in more:
            _call_int(f"opening ring buffer {ring_map.name}",
                      lib().ring_buffer__add(self.ptr, ring_map.fd, self._callback, None))

    def poll(self, timeout_ms: int) -> int:
        """Delivers pending samples; returns how many (0 after timeout_ms without any)."""
        ret = lib().ring_buffer__poll(self.ptr, timeout_ms)
        if ret < 0 and -ret != errno.EINTR:
            raise _fail("polling the ring buffer", ret)
        return max(ret, 0)

    def poll_or_writable(self, timeout_ms: int, fd: int) -> int:
        """As poll(), but returns as soon as `fd` can be written to as well: a sender that has
        more for its receiver than the socket took wakes when the receiver has read some."""
        if self._waiter is None:
            self._waiter = select.epoll()
            self._waiter.register(lib().ring_buffer__epoll_fd(self.ptr), select.EPOLLIN)
        if fd != self._writable:
            if self._writable is not None:
                self._waiter.unregister(self._writable)
            self._waiter.register(fd, select.EPOLLOUT)
            self._writable = fd
        self._waiter.poll(timeout_ms / 1000)
        ret = lib().ring_buffer__consume(self.ptr)
        if ret < 0 and -ret != errno.EINTR:
            raise _fail("reading the ring buffer", ret)
        return max(ret, 0)

    def close(self) -> None:
        if self._waiter is not None:
            self._waiter.close()
            self._waiter = None
        if self.ptr:
            lib().ring_buffer__free(self.ptr)
            self.ptr = None
