"""The `picosnitch` command."""

import json
import signal
import sys
import threading
from typing import List, Optional

from picosnitch import __version__
from picosnitch.kernel_monitor import KernelMonitor, MonitorError
from picosnitch.kernel_records import to_json_dict
from picosnitch.libbpf import LibbpfError

USAGE = """usage: picosnitch COMMAND

commands:
  monitor --raw   print what the kernel monitor records, as JSON lines (for bug reports)
  version         print the version
  help            print this text
"""


def monitor_raw() -> int:
    """Prints every kernel record as one JSON line until interrupted."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    monitor = KernelMonitor()
    try:
        for record in monitor.start():
            print(json.dumps(to_json_dict(record)), flush=True)
        print(json.dumps({"kind": "ready", "load_seconds": round(monitor.load_seconds, 3)}), flush=True)
        monitor.run(lambda r: print(json.dumps(to_json_dict(r)), flush=True), stop.is_set)
    except BrokenPipeError:
        pass
    finally:
        monitor.close()
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    command = args[0] if args else "help"
    try:
        if command == "monitor" and args[1:] == ["--raw"]:
            return monitor_raw()
        if command == "version":
            print(f"picosnitch {__version__}")
            return 0
        if command in ("help", "--help", "-h"):
            print(USAGE, end="")
            return 0
    except (MonitorError, LibbpfError) as e:
        print(f"picosnitch: {e}", file=sys.stderr)
        return 1
    print(f"picosnitch: unknown command {' '.join(args)!r}\n{USAGE}", file=sys.stderr, end="")
    return 2
