"""The `picosnitch` command."""

import json
import os
import shutil
import signal
import sys
import threading
from typing import Callable, Dict, List, Optional

from picosnitch import __version__, config, installed
from picosnitch.daemon import control as daemon_control
from picosnitch.daemon import systemd_unit
from picosnitch.kernel.libbpf import LibbpfError
from picosnitch.kernel.monitor import KernelMonitor, MonitorError
from picosnitch.kernel.records import to_json_dict
from picosnitch.paths import Paths
from picosnitch.sanitize import printable

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
  baseline          each program's baseline for the alerts (learning, learned, muted)
  baseline learned PROGRAM  end a program's learning (PROGRAM: its executable's or
                    script's path; all: every program seen)
  baseline mute PROGRAM  no alerts for a program (baseline unmute PROGRAM: alerts again)
  baseline forget PROGRAM  forget what a program has learned: it learns again
  prompt            answer guard mode's prompts: allow or deny new connections (root or
                    "Guard prompt group")
  monitor --raw     print what the kernel monitor records, as JSON lines (for bug reports)
  help              print this text

PICOSNITCH_PREFIX=DIR relocates every path under DIR.
"""

GIVE_UP_WRITING = 1.0  # seconds a stopping `monitor --raw` waits for its reader, per write


def monitor_raw() -> int:
    """Prints every kernel record as one JSON line until interrupted."""
    stop = threading.Event()
    writing = False

    def interrupt(*_) -> None:
        stop.set()
        if writing:  # possibly blocked on a full pipe whose reader stopped reading: give up on it
            raise BrokenPipeError
        # Between writes: the last records are written on the way out, and a reader that stopped
        # reading must not hold that write forever either; asked again in a second.
        signal.setitimer(signal.ITIMER_REAL, GIVE_UP_WRITING)

    def emit(text: str) -> None:
        nonlocal writing
        writing = True
        try:
            sys.stdout.write(text)
            sys.stdout.flush()
        finally:
            writing = False

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGALRM):
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
        signal.setitimer(signal.ITIMER_REAL, 0)
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


def db_option(options: List[str]) -> Optional[str]:
    """The URL (or "config") of the options `--db URL` or `--db=URL`, else None."""
    if len(options) == 2 and options[0] == "--db":
        return options[1]
    if len(options) == 1 and options[0].startswith("--db="):
        return options[0][len("--db="):]
    return None


class ReaderConfigError(Exception):
    """config.json is there but unusable for a reader; str() is the one sentence to print."""


def reader_config(command: str, paths: Paths) -> config.Config:
    """config.json's settings for `picosnitch COMMAND` (view, dash), read once, here: the
    defaults when there is no such file; a file that is there but unusable stops the command
    with its one sentence (ReaderConfigError), as it stops the daemon."""
    try:
        return config.load_or_defaults(paths.config)
    except config.ConfigError as error:
        raise ReaderConfigError(f"picosnitch {command}: {printable(str(error))}") from None


# Each command: a function of the paths and the words after the command, returning the exit
# status, or None when those words are not options it takes (then it is an unknown command).
Command = Callable[[Paths, List[str]], Optional[int]]


def _help(paths: Paths, options: List[str]) -> Optional[int]:
    if options:
        return None
    print(USAGE, end="")
    return 0


def _version(paths: Paths, options: List[str]) -> Optional[int]:
    return None if options else version(paths)


def _status(paths: Paths, options: List[str]) -> Optional[int]:
    return None if options else daemon_control.status(paths)


def _view(paths: Paths, options: List[str]) -> Optional[int]:
    db = db_option(options)
    if options and db is None:
        return None
    from picosnitch.ui import view  # curses is loaded only for the terminal UIs
    return view.main(paths, reader_config("view", paths), db=db)


def _top(paths: Paths, options: List[str]) -> Optional[int]:
    if options:
        return None
    from picosnitch.ui import top
    return top.main(paths)


def _dash(paths: Paths, options: List[str]) -> Optional[int]:
    db = db_option(options)
    if options and db is None:
        return None
    try:
        from picosnitch.ui.dash import app  # starlette and uvicorn only for the dashboard
    except ImportError as e:
        print(f"picosnitch dash needs the Python packages starlette and uvicorn ({e}): install "
              f"them with `{installed.install_extra('dash')}`", file=sys.stderr)
        return 1
    app.drop_privileges()  # before reading config.json: as the user it serves
    return app.main(paths, reader_config("dash", paths), db=db)


def _baseline(paths: Paths, options: List[str]) -> Optional[int]:
    from picosnitch.alerts import baseline_command
    if not options:
        try:
            baseline = baseline_command.load(paths)
        except (OSError, ValueError, KeyError, TypeError) as e:
            print(f"picosnitch baseline: cannot read {printable(str(paths.baseline))} ({printable(str(e))})",
                  file=sys.stderr)
            return 1
        print(baseline_command.listing(baseline) if baseline else "picosnitch baseline: nothing learned yet\n",
              end="")
        return 0
    if len(options) != 2 or options[0] not in baseline_command.ACTIONS:
        return None
    refusal = needs_root("baseline")
    if refusal:
        print(refusal, file=sys.stderr)
        return 1
    try:
        print(baseline_command.request(paths, options[0], options[1]))
    except OSError as e:
        print(f"picosnitch baseline: cannot write {printable(str(paths.baseline_requests))} "
              f"({e.strerror or e})", file=sys.stderr)
        return 1
    return 0
def _prompt(paths: Paths, options: List[str]) -> Optional[int]:
    if options:
        return None
    from picosnitch.ui import prompt
    return prompt.main(paths)


def _monitor(paths: Paths, options: List[str]) -> Optional[int]:
    return monitor_raw() if options == ["--raw"] else None


def _as_root(command: str, action: Callable[[Paths], int]) -> Command:
    """A command that takes no options and needs root (needs_root says so otherwise)."""
    def run(paths: Paths, options: List[str]) -> Optional[int]:
        if options:
            return None
        refusal = needs_root(command)
        if refusal:
            print(refusal, file=sys.stderr)
            return 1
        return action(paths)
    return run


def _stop(paths: Paths) -> int:
    status = daemon_control.stop(paths)
    from picosnitch.guard import firewall  # a guard killed with the daemon leaves its rules
    firewall.remove_leftovers(paths)
    return status


def _systemd(paths: Paths) -> int:
    print(systemd_unit.install(paths.root))
    return 0


def _start(paths: Paths) -> int:
    return daemon_control.start_background(paths, daemon_control.prepare(paths))


def _restart(paths: Paths) -> int:
    daemon_control.stop(paths)
    return _start(paths)


def _start_no_daemon(paths: Paths) -> int:
    return daemon_control.run_foreground(paths, daemon_control.prepare(paths))


COMMANDS: Dict[str, Command] = {
    "start": _as_root("start", _start),
    "stop": _as_root("stop", _stop),
    "restart": _as_root("restart", _restart),
    "start-no-daemon": _as_root("start-no-daemon", _start_no_daemon),
    "systemd": _as_root("systemd", _systemd),
    "status": _status,
    "version": _version,
    "view": _view,
    "top": _top,
    "dash": _dash,
    "baseline": _baseline,
    "prompt": _prompt,
    "monitor": _monitor,
    "help": _help,
}
ALIASES = {"--help": "help", "-h": "help"}
ROOT_COMMANDS = {"start", "stop", "restart", "start-no-daemon", "systemd", "baseline"}


def run(args: List[str]) -> int:
    command = args[0] if args else "help"
    handler = COMMANDS.get(ALIASES.get(command, command))
    status = handler(Paths.current(), args[1:]) if handler else None
    if status is None:
        print(f"picosnitch: unknown command {' '.join(args)!r}\n\n{USAGE}", file=sys.stderr, end="")
        return 2
    return status


def main(argv: Optional[List[str]] = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    try:
        return run(args)
    except daemon_control.ControlError as e:
        print(f"picosnitch: {e}", file=sys.stderr)
        return e.status
    except ReaderConfigError as e:
        print(e, file=sys.stderr)
        return 1
    except (MonitorError, LibbpfError) as e:
        print(f"picosnitch: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `picosnitch version | head`: the reader has seen enough
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
