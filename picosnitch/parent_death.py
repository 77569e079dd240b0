"""Stopping with the supervisor: a worker asks the kernel for a signal when its parent dies.

If the supervisor is killed outright (SIGKILL, OOM killer), nobody would tell the workers to
stop and they would keep running, holding snitch.db and the BPF programs. The monitor, head of
the pipeline, asks for SIGTERM instead, which it already handles by draining the kernel and
sending Stop down the pipeline: every other worker then finishes and exits as in a normal stop.
"""

import ctypes
import os

PR_SET_PDEATHSIG = 1


def signal_when_parent_dies(parent_pid: int, signum: int) -> None:
    """Have `signum` sent to this process when `parent_pid` (the process that forked it) dies;
    at once if it already has (it may have died before this call)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent_pid:
        os.kill(os.getpid(), signum)
