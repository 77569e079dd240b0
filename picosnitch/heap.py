"""Giving memory back to the system after a burst of work.

A worker's memory grows with a connection storm, and much of it stays after the objects are
freed. glibc keeps freed chunks in its heap: only a free top of the heap goes back by itself.
Python's allocator returns a 1 MiB arena only once every object in it is gone, so a few objects
made during the burst that outlive it keep whole arenas. Workers keep few such objects, and
call trim() once a burst is over.
"""

import ctypes
import gc
import sys

_libc = ctypes.CDLL(None)
_malloc_trim = getattr(_libc, "malloc_trim", None)  # a glibc function; other C libraries may lack it
_clear_type_cache = getattr(sys, "_clear_internal_caches", None) or sys._clear_type_cache  # 3.13 renamed it


def trim() -> None:
    """Free what Python keeps for reuse and return the C heap's free pages to the system."""
    # A full collection also empties the interpreter's free lists (tuples, lists, dicts...),
    # whose last entries were made during the burst.
    gc.collect()
    # The attribute cache of types keeps the last names looked up; unpickling a message looks
    # up its class names, made afresh for each message.
    _clear_type_cache()
    if _malloc_trim is not None:
        _malloc_trim(0)  # every free page, wherever it is in the heap (madvise)


class Burst:
    """Tells, once, when a quiet period follows a busy one: the moment to trim().

    A worker counts its work per period (rows written, records delivered, messages handled)
    and calls over(count) at the end of each; a period with `quiet` or more makes the worker
    busy, and the first one with fewer after that ends the burst."""

    def __init__(self, quiet: int):
        self.quiet, self.busy = quiet, False

    def over(self, count: int) -> bool:
        if count >= self.quiet:
            self.busy = True
            return False
        ended, self.busy = self.busy, False
        return ended
