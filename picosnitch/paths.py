"""Every file and directory picosnitch reads or writes, in one place.

The defaults follow the Filesystem Hierarchy Standard: configuration in /etc, state in /var/lib,
logs in /var/log and runtime files in /run. Setting `PICOSNITCH_PREFIX=/some/dir` moves all of
them under that directory (so `/some/dir/etc/picosnitch/config.json`, ...), which lets tests and
side-by-side installs run without touching the real ones.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

PREFIX_VARIABLE = "PICOSNITCH_PREFIX"

# Every directory is root-owned and 0o755: nothing root writes may live somewhere a user can
# write, yet the unprivileged readers (view, top, dash) must reach snitch.db, the live socket and
# config.json. Logs get no tighter mode because conn.log and exe.log only repeat what snitch.db
# already shows those readers; hiding them would add inconvenience, not privacy.
DIRECTORY_MODE = 0o755


@dataclasses.dataclass(frozen=True)
class Paths:
    """Absolute locations of picosnitch's files, all below `root` ("/" unless relocated)."""

    root: Path
    config_dir: Path
    config: Path
    data_dir: Path
    db: Path
    record: Path
    record_journal: Path  # changes to record.json since it was last saved
    baseline: Path
    baseline_requests: Path
    # Reserved for the remote SQL writer's disk backlog. Not made by ensure_dirs(): that writer
    # runs unprivileged, so whoever starts it creates this directory owned by its user.
    sql_backlog: Path
    # The events waiting for webhooks and syslog: made, like sql_backlog, by the worker that
    # becomes the user who owns it.
    outbox: Path
    log_dir: Path
    exe_log: Path
    error_log: Path
    conn_log: Path
    alert_log: Path
    event_log: Path
    run_dir: Path
    pid_file: Path
    live_socket: Path
    error_counts: Path  # error.log's repeat counts not yet written
    writer_spill: Path  # what the writer received and its destinations lack (store.spill)
    rules: Path  # guard mode's rules file
    guard_socket: Path  # guard mode's prompts

    @classmethod
    def under(cls, root: str | os.PathLike = "/") -> Paths:
        """The standard layout below `root` (made absolute against the current directory)."""
        base = Path(os.path.abspath(root))
        config_dir = base / "etc" / "picosnitch"
        data_dir = base / "var" / "lib" / "picosnitch"
        log_dir = base / "var" / "log" / "picosnitch"
        run_dir = base / "run" / "picosnitch"
        return cls(
            root=base,
            config_dir=config_dir,
            config=config_dir / "config.json",
            data_dir=data_dir,
            db=data_dir / "snitch.db",
            record=data_dir / "record.json",
            record_journal=data_dir / "record.journal",
            baseline=data_dir / "baseline.json",
            baseline_requests=data_dir / "baseline-requests",
            sql_backlog=data_dir / "sql-backlog",
            outbox=data_dir / "outbox",
            log_dir=log_dir,
            exe_log=log_dir / "exe.log",
            error_log=log_dir / "error.log",
            conn_log=log_dir / "conn.log",
            alert_log=log_dir / "alert.log",
            event_log=log_dir / "events.log",
            run_dir=run_dir,
            pid_file=run_dir / "picosnitch.pid",
            live_socket=run_dir / "live.sock",
            error_counts=run_dir / "error-counts.json",
            writer_spill=run_dir / "writer.spill",
            rules=config_dir / "rules",
            guard_socket=run_dir / "guard.sock",
        )

    @classmethod
    def current(cls) -> Paths:
        """The layout for this moment's environment: below $PICOSNITCH_PREFIX if set, else "/"."""
        return cls.under(os.environ.get(PREFIX_VARIABLE) or "/")

    def directories(self) -> tuple[Path, ...]:
        """The directories ensure_dirs() creates."""
        return (self.config_dir, self.data_dir, self.log_dir, self.run_dir)

    def ensure_dirs(self) -> list[str]:
        """Create the directories (mode 0o755; owned by root when running as root).

        An existing directory is brought back to that mode and owner too, so a directory left
        group- or world-writable by hand cannot be used to plant files that root then writes.
        Returns a sentence for each directory that cannot be made or fixed (a read-only
        filesystem): what would be written there waits, or is said lost, where it is used.
        """
        problems = []
        for directory in self.directories():
            try:
                directory.mkdir(parents=True, exist_ok=True)
                if os.geteuid() == 0:
                    os.chown(directory, 0, 0)
                os.chmod(directory, DIRECTORY_MODE)
            except OSError as error:
                problems.append(f"{directory} cannot be prepared ({error.strerror}): nothing is written there "
                                "until it can be")
        return problems

    def root_writes(self) -> tuple[Path, ...]:
        """The files the daemon writes as root."""
        db = str(self.db)
        return (self.db, Path(db + "-wal"), Path(db + "-shm"), Path(db + "-journal"), self.record,
                self.record_journal, self.exe_log, self.error_log, self.conn_log, self.error_counts,
                self.writer_spill, self.baseline, self.alert_log, self.event_log)

    def as_dict(self) -> dict[str, str]:
        """Every path by field name, as strings (what `picosnitch version` prints)."""
        return {field.name: str(getattr(self, field.name)) for field in dataclasses.fields(self)}
