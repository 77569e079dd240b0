"""Where picosnitch keeps its files, and how PICOSNITCH_PREFIX moves them."""

import os
import stat

from picosnitch.paths import Paths


def test_default_locations_follow_the_filesystem_hierarchy(monkeypatch):
    monkeypatch.delenv("PICOSNITCH_PREFIX", raising=False)
    paths = Paths.current()
    assert str(paths.config) == "/etc/picosnitch/config.json"
    assert str(paths.db) == "/var/lib/picosnitch/snitch.db"
    assert str(paths.record) == "/var/lib/picosnitch/record.json"
    assert str(paths.sql_backlog) == "/var/lib/picosnitch/sql-backlog"
    assert str(paths.exe_log) == "/var/log/picosnitch/exe.log"
    assert str(paths.error_log) == "/var/log/picosnitch/error.log"
    assert str(paths.conn_log) == "/var/log/picosnitch/conn.log"
    assert str(paths.pid_file) == "/run/picosnitch/picosnitch.pid"
    assert str(paths.live_socket) == "/run/picosnitch/live.sock"


def test_prefix_relocates_every_path(monkeypatch, tmp_path):
    monkeypatch.setenv("PICOSNITCH_PREFIX", str(tmp_path))
    paths = Paths.current()
    assert paths.config == tmp_path / "etc/picosnitch/config.json"
    assert paths.db == tmp_path / "var/lib/picosnitch/snitch.db"
    assert paths.live_socket == tmp_path / "run/picosnitch/live.sock"
    default = Paths.under("/").as_dict()
    for name, path in paths.as_dict().items():
        assert path == str(tmp_path) + ("" if default[name] == "/" else default[name])


def test_prefix_is_read_on_every_call(monkeypatch, tmp_path):
    monkeypatch.setenv("PICOSNITCH_PREFIX", str(tmp_path / "one"))
    first = Paths.current()
    monkeypatch.setenv("PICOSNITCH_PREFIX", str(tmp_path / "two"))
    assert Paths.current().root == tmp_path / "two" != first.root


def test_relative_prefix_is_made_absolute(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PICOSNITCH_PREFIX", "side")
    assert Paths.current().config == tmp_path / "side/etc/picosnitch/config.json"


def test_as_dict_names_every_path_as_a_string(tmp_path):
    listing = Paths.under(tmp_path).as_dict()
    assert set(listing) >= {"config", "db", "record", "exe_log", "error_log", "conn_log",
                            "pid_file", "live_socket", "sql_backlog"}
    assert all(isinstance(value, str) for value in listing.values())


def test_ensure_dirs_creates_root_owned_directories_not_writable_by_others(tmp_path):
    paths = Paths.under(tmp_path)
    paths.log_dir.mkdir(parents=True)
    os.chmod(paths.log_dir, 0o777)  # left world-writable by hand: must be tightened
    paths.ensure_dirs()
    paths.ensure_dirs()  # running again is harmless
    for directory in (paths.config_dir, paths.data_dir, paths.log_dir, paths.run_dir):
        info = os.stat(directory)
        assert stat.S_IMODE(info.st_mode) == 0o755
        if os.geteuid() == 0:
            assert info.st_uid == 0 and info.st_gid == 0
    assert not paths.sql_backlog.exists()  # made by the unprivileged SQL writer's starter
