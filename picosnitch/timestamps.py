"""The one way picosnitch writes a moment: local time as `YYYY-MM-DD HH:MM:SS`.

It is the `contime` of snitch.db, conn.log and the central server, the start of every line of
exe.log and error.log, and what view shows; one definition keeps them the same.
"""

import time


def local_time(ts: float) -> str:
    """`ts` (unix seconds) in this machine's local time, `YYYY-MM-DD HH:MM:SS`."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))
