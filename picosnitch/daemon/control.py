"""start, stop, status: the pid file (locked while the daemon lives) and running in the background."""

import fcntl
import os
import resource
import signal
import sys
import time
from typing import Optional

from picosnitch import config as config_file
from picosnitch import files
from picosnitch.central import settings as sql_server_config
from picosnitch.daemon.supervisor import Supervisor
from picosnitch.identity.log_ignore import IgnoreRules
from picosnitch.kernel.monitor import preflight
from picosnitch.paths import Paths
from picosnitch.timestamps import local_time

EXIT_CONFIG = 78  # EX_CONFIG: the unit file does not restart on it (RestartPreventExitStatus)
EXIT_NOT_RUNNING = 3  # LSB status code for "not running"


class ControlError(Exception):
    """A sentence for the user, and the exit status that goes with it."""

    def __init__(self, message: str, status: int = 1):
        super().__init__(message)
        self.status = status


def running_pid(paths: Paths) -> Optional[int]:
    """The daemon's pid when one runs: it holds the lock on the pid file and is picosnitch."""
    try:
        fd = os.open(paths.pid_file, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return None  # nobody holds it: a stale file
        except BlockingIOError:
            pass
        content = os.read(fd, 32).decode(errors="replace").strip()
    finally:
        os.close(fd)
    if not content.isdigit():
        return None
    pid = int(content)
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if b"picosnitch" not in f.read():
                return None
    except OSError:
        return None
    return pid


def load_config(paths: Paths):
    """config.json, created with defaults on first start; ControlError(EXIT_CONFIG) when invalid."""
    try:
        config_file.write_default(paths.config)
        config = config_file.load(paths.config)
        server = sql_server_config.parse(config)
        if server:
            sql_server_config.load_driver(server, config)  # a missing driver names the extra to install
        _check_log_ignore(config)
        _check_open_files(config)
    except config_file.ConfigError as e:
        raise _refusal(e) from None
    for warning in config.warnings:
        print(f"picosnitch: {warning}", file=sys.stderr)
    return config


def _refusal(error: config_file.ConfigError) -> ControlError:
    return ControlError(f"{error}; picosnitch will not start until it is fixed", EXIT_CONFIG)


def _check_log_ignore(config) -> None:
    """Each "Log ignore" entry must be something the identity worker can match (a subnet such as
    999.1.1.1/77 is not): refused here, with its line, rather than crash that worker."""
    try:
        IgnoreRules.from_config(config["Log ignore"])
    except ValueError as e:
        raise config_file.ConfigError(config.path, str(e), config.line_of("Log ignore"), key="Log ignore") from None


NR_OPEN = "/proc/sys/fs/nr_open"


def _check_open_files(config) -> None:
    """"Set RLIMIT_NOFILE" may not exceed what the kernel allows a process (fs.nr_open)."""
    limit = config["Set RLIMIT_NOFILE"]
    try:
        with open(NR_OPEN) as f:
            ceiling = int(f.read())
    except (OSError, ValueError):
        return  # not knowable here: setrlimit() will say
    if limit is not None and limit > ceiling:
        raise config_file.ConfigError(
            config.path, f'"Set RLIMIT_NOFILE" must be at most {ceiling} (fs.nr_open), not {limit}',
            config.line_of("Set RLIMIT_NOFILE"), key="Set RLIMIT_NOFILE")


def _lock_pid_file(paths: Paths) -> int:
    try:
        fd = os.open(paths.pid_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
    except OSError as e:
        raise ControlError(f"{paths.pid_file} cannot be written ({e.strerror}); picosnitch needs it to "
                           "start") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ControlError(f"picosnitch is already running (pid {running_pid(paths)})") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def _apply_limits(config) -> None:
    limit = config["Set RLIMIT_NOFILE"]
    if limit:
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (limit, max(limit, hard)))
        except (OSError, ValueError) as e:
            raise _refusal(config_file.ConfigError(
                config.path, f'"Set RLIMIT_NOFILE" {limit} cannot be set ({e})',
                config.line_of("Set RLIMIT_NOFILE"), key="Set RLIMIT_NOFILE")) from None


def prepare(paths: Paths):
    """Everything that can fail with a clear message, checked before any worker starts."""
    problems = paths.ensure_dirs()
    config = load_config(paths)
    preflight()
    if running_pid(paths):
        raise ControlError(f"picosnitch is already running (pid {running_pid(paths)})")
    problems += [problem for path in paths.root_writes() if (problem := _repaired(path))]
    for problem in problems:  # said on stderr, and in error.log with the configuration's warnings
        print(f"picosnitch: {problem}", file=sys.stderr)
    config.warnings[:0] = problems
    return config


def _repaired(path) -> Optional[str]:
    try:
        return files.repair(path)
    except OSError as e:
        return f"{path} cannot be checked ({e.strerror}): it is not written until it can be"


def unclean_end(paths: Paths) -> Optional[str]:
    """A sentence when the last daemon ended without stopping (killed, crashed, power lost): its
    pid is still in the pid file, which a clean stop empties, and the file's time is the last
    time it was seen running (the supervisor touches it every few seconds)."""
    try:
        content = paths.pid_file.read_text(errors="replace").strip()
        seen = paths.pid_file.stat().st_mtime
    except OSError:
        return None
    if not content.isdigit() or running_pid(paths):
        return None
    return (f"picosnitch (pid {content}) did not stop cleanly; it was last seen running at {local_time(seen)}: "
            "the traffic of about its last second before it ended, and from then until now, was not recorded")


def run_foreground(paths: Paths, config, on_ready=None) -> int:
    """start-no-daemon: the supervisor in this process, holding the pid file lock."""
    previous = unclean_end(paths)
    lock = _lock_pid_file(paths)
    try:
        _apply_limits(config)
        supervisor = Supervisor(config, paths, [previous] if previous else [])
        status = supervisor.run(on_ready)
        os.ftruncate(lock, 0)  # stopped cleanly
    finally:
        os.close(lock)
    if supervisor.failure:
        raise ControlError(supervisor.failure, status)
    return status


def start_background(paths: Paths, config) -> int:
    """Forks the daemon and waits until its BPF programs are attached (or it failed)."""
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid:
        os.close(ready_w)
        answer = b""
        while not answer.endswith(b"\n"):  # the workers inherit the pipe: never wait for EOF
            chunk = os.read(ready_r, 4096)
            if not chunk:
                break
            answer += chunk
        os.close(ready_r)
        if answer.startswith(b"ready"):
            print(f"picosnitch started (pid {answer.split()[1].decode()})")
            return 0
        code, _, message = answer.decode(errors="replace").strip().partition(" ")
        raise ControlError(message or f"picosnitch did not start; see {paths.error_log}",
                           int(code) if code.isdigit() else 1)
    os.close(ready_r)
    os.setsid()
    if os.fork():
        os._exit(0)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.chdir("/")

    def on_ready():
        os.write(ready_w, f"ready {os.getpid()}\n".encode())
        os.close(ready_w)

    try:
        status = run_foreground(paths, config, on_ready)
    except ControlError as e:
        try:
            os.write(ready_w, f"{e.status} {e}\n".encode())
        except OSError:
            pass  # it was ready, and said so: the reason is in error.log
        status = e.status
    os._exit(status)


def stop(paths: Paths, timeout: float = 60.0) -> int:
    pid = running_pid(paths)
    if pid is None:
        print("picosnitch is not running")
        return 0
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if running_pid(paths) is None:
            print(f"picosnitch stopped (pid {pid})")
            return 0
        time.sleep(0.1)
    raise ControlError(f"picosnitch (pid {pid}) did not stop within {timeout:.0f} s")


def status(paths: Paths) -> int:
    pid = running_pid(paths)
    if pid is None:
        print("picosnitch is not running")
        return EXIT_NOT_RUNNING
    print(f"picosnitch is running (pid {pid})")
    return 0

