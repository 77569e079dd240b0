"""The `picosnitch` command."""

import json
import os
import shutil
import signal
import sys
import threading
from typing import List, Optional

from picosnitch import __version__, daemon_control, systemd_unit
from picosnitch.kernel_monitor import KernelMonitor, MonitorError
from picosnitch.kernel_records import to_json_dict
from picosnitch.libbpf import LibbpfError
from picosnitch.paths import Paths

USAGE = """\
usage: picosnitch COMMAND

picosnitch tells you when a program you have not seen before connects to the network, or a
known program's executable changes, and keeps a history of who sent what, where.

commands:
  start             start the daemon in the background (as root)
  stop              stop the daemon
  restart           stop, then start
  start-no-daemon   run the daemon in the foreground (what the systemd unit runs)
  systemd           install picosnitch.service for systemd
  status            say whether the daemon runs (exit status 3 when not)
  version           print the version and every path in use
  view              browse the history in snitch.db (terminal UI; no root needed)
  view --db URL     browse the central server instead: postgresql://USER@HOST/DB or
                    mysql://USER@HOST/DB (?table=NAME; password from $PICOSNITCH_DB_PASSWORD),
                    or --db config for config.json's "DB sql server"
  top               live traffic per executable (terminal UI; root or "Live feed group")
  dash              web dashboard on http://localhost:5100 (HOST, PORT; no root needed)
  dash --db URL     the dashboard over the central server (URL as for view --db), with a
                    host dimension; --db config for config.json's "DB sql server"
  prompt            answer guard mode's prompts: allow or deny new connections (root or
                    "Guard prompt group")
  monitor --raw     print what the kernel monitor records, as JSON lines (for bug reports)
  help              print this text

PICOSNITCH_PREFIX=DIR relocates every path under DIR.
"""

ROOT_COMMANDS = {"start", "stop", "restart", "start-no-daemon", "systemd"}


def monitor_raw() -> int:
    """Prints every kernel record as one JSON line until interrupted."""
    stop = threading.Event()
    writing = False

    def interrupt(*_) -> None:
        stop.set()
        if writing:  # possibly blocked on a full pipe whose reader stopped reading: give up on it
            raise BrokenPipeError

    def emit(text: str) -> None:
        nonlocal writing
        writing = True
        try:
            sys.stdout.write(text)
            sys.stdout.flush()
        finally:
            writing = False

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, interrupt)
    monitor = KernelMonitor()
    try:
        for record in monitor.start():
            emit(json.dumps(to_json_dict(record)) + "\n")
        emit(json.dumps({"kind": "ready", "load_seconds": round(monitor.load_seconds, 3)}) + "\n")
        monitor.run(lambda batch: emit("".join(json.dumps(to_json_dict(r)) + "\n" for r in batch)),
                    stop.is_set)
    except BrokenPipeError:  # what is still buffered goes nowhere, rather than block the exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    finally:
        monitor.close()
    return 0


def version(paths: Paths) -> int:
    print(f"picosnitch {__version__}")
    print(f"python {sys.version.split()[0]} ({sys.executable})")
    for name, path in paths.as_dict().items():
        print(f"{name}: {path}")
    return 0


def needs_root(command: str) -> Optional[str]:
    """The sentence to print when `command` is run without root, else None."""
    if os.geteuid() == 0 or command not in ROOT_COMMANDS:
        return None
    message = f"picosnitch {command} needs root"
    if sys.stdin.isatty():
        helper = next((h for h in ("sudo", "doas") if shutil.which(h)), None)
        if helper:
            message += f": try `{helper} picosnitch {command}`"
    return message


def db_option(args: List[str]) -> Optional[str]:
    """The URL (or "config") of `COMMAND --db URL` or `COMMAND --db=URL`, else None."""
    if len(args) == 3 and args[1] == "--db":
        return args[2]
    if len(args) == 2 and args[1].startswith("--db="):
        return args[1][len("--db="):]
    return None


def run(args: List[str]) -> int:
    command = args[0] if args else "help"
    paths = Paths.current()
    if command in ("help", "--help", "-h") and len(args) <= 1:
        print(USAGE, end="")
        return 0
    if command == "version" and len(args) == 1:
        return version(paths)
    if command == "status" and len(args) == 1:
        return daemon_control.status(paths)
    db = db_option(args)
    if command == "view" and (len(args) == 1 or db is not None):
        from picosnitch import view_tui  # curses is loaded only for the UIs
        return view_tui.main(paths, db=db)
    if command == "top" and len(args) == 1:
        from picosnitch import top_tui
        return top_tui.main(paths)
    if command == "dash" and (len(args) == 1 or db is not None):
        try:
            from picosnitch import dash_app  # starlette and uvicorn only for the dashboard
        except ImportError as e:
            print(f"picosnitch dash needs the optional packages starlette and uvicorn "
                  f"(pip install 'picosnitch[dash]'): {e}", file=sys.stderr)
            return 1
        return dash_app.main(paths, db=db)
    if command == "prompt" and len(args) == 1:
        from picosnitch.guard import prompt_tui
        return prompt_tui.main(paths)
    if command == "monitor" and args[1:] == ["--raw"]:
        return monitor_raw()
    if command not in ROOT_COMMANDS or len(args) != 1:
        print(f"picosnitch: unknown command {' '.join(args)!r}\n\n{USAGE}", file=sys.stderr, end="")
        return 2
    refusal = needs_root(command)
    if refusal:
        print(refusal, file=sys.stderr)
        return 1
    if command == "stop":
        status = daemon_control.stop(paths)
        from picosnitch.guard import firewall  # a guard killed with the daemon leaves its rules
        firewall.remove_leftovers(paths)
        return status
    if command == "systemd":
        print(systemd_unit.install(paths.root))
        return 0
    if command == "restart":
        daemon_control.stop(paths)
    config = daemon_control.prepare(paths)
    if command == "start-no-daemon":
        return daemon_control.run_foreground(paths, config)
    return daemon_control.start_background(paths, config)


def main(argv: Optional[List[str]] = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    try:
        return run(args)
    except daemon_control.ControlError as e:
        print(f"picosnitch: {e}", file=sys.stderr)
        return e.status
    except (MonitorError, LibbpfError) as e:
        print(f"picosnitch: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `picosnitch version | head`: the reader has seen enough
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
