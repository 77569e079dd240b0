"""The files the monitor pinned at exec (kernel.pins), held open here until they are hashed.

Descriptors are kept by file key in one LRU, bounded by kernel.pins.pin_capacity() (half the
descriptor limit that "Set RLIMIT_NOFILE" sets). Each pin record the monitor sends moves its keys
to the newest end, in the order the monitor's own memory of sent keys moves them, and this store is
at least that memory's size: a key the monitor sends without a descriptor is still held here. The
least recently executed file is closed first, and hashed before it is (`on_evict`): a burst of more
distinct executables than the store holds costs hashing, never a hash.
"""

import os
from collections import OrderedDict
from typing import Callable, Iterable, Optional, Tuple

from picosnitch.kernel.records import FileKey


class PinStore:
    def __init__(self, capacity: int, on_evict: Optional[Callable[[FileKey, int], object]] = None):
        self.capacity = capacity
        self.on_evict = on_evict
        self._fds: "OrderedDict[FileKey, int]" = OrderedDict()
        self.evicted = 0  # descriptors closed to stay within capacity

    def __len__(self) -> int:
        return len(self._fds)

    def add(self, received: Iterable[Tuple[FileKey, int]]) -> None:
        for key, fd in received:
            old = self._fds.pop(key, None)
            if old is not None:
                os.close(old)
            self._fds[key] = fd
            self._trim()

    def touch(self, key: FileKey) -> None:
        if key in self._fds:
            self._fds.move_to_end(key)

    def fd(self, key: FileKey) -> Optional[int]:
        return self._fds.get(key)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def _trim(self) -> None:
        while len(self._fds) > self.capacity:
            key, fd = self._fds.popitem(last=False)
            try:
                if self.on_evict is not None:
                    self.on_evict(key, fd)
            finally:
                os.close(fd)
            self.evicted += 1
