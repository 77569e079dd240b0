"""Real PostgreSQL and MariaDB servers on loopback, in a private directory, for tests and bench.

Each server listens on 127.0.0.1 on a free port and a unix socket in its directory, and has a
database `picosnitch` with three users (password "secret"): `snitch_full` (may create tables),
`snitch_insert` (only what `grant` gives it, on tables another user created) and nothing else.
Needs root and Debian's `postgresql` and `mariadb-server` packages.
"""

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

PASSWORD = "secret"
# A "DB sql server" table_name's tables: the rows, the batches, the hourly rollup and its marks.
SUFFIXES = ("", "_batches", "_hourly", "_hours")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shared_tempdir(prefix: str) -> Path:
    """A directory other users can traverse (pytest's tmp_path is 0700 root)."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    path.chmod(0o755)
    return path


def _wait_for(check, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception:  # noqa: BLE001 - not up yet
            pass
        time.sleep(0.1)
    raise RuntimeError("%s did not come up" % what)


class Postgres:
    dialect, client = "postgres", "psycopg"

    def __init__(self, base: Path):
        self.dir = base / "postgres"
        self.data = self.dir / "data"
        self.port = free_port()
        self.bin = sorted(glob.glob("/usr/lib/postgresql/*/bin"))[-1]
        self.dir.mkdir()
        shutil.chown(self.dir, "postgres", "postgres")
        self._as_postgres(self.bin + "/initdb", "-D", str(self.data), "-U", "postgres",
                          "--auth-local=trust", "--auth-host=scram-sha-256")

    def _as_postgres(self, *command: str) -> None:
        subprocess.run(["runuser", "-u", "postgres", "--", *command], check=True,
                       capture_output=True, timeout=120)

    def start(self) -> None:
        self._as_postgres(self.bin + "/pg_ctl", "-D", str(self.data), "-l", str(self.dir / "log"),
                          "-w", "-o", "-p %d -k %s -c listen_addresses=127.0.0.1" % (
                              self.port, self.dir), "start")

    def stop(self) -> None:
        self._as_postgres(self.bin + "/pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def admin(self, dbname: str = "picosnitch"):
        import psycopg
        return psycopg.connect(host=str(self.dir), port=self.port, user="postgres",
                               dbname=dbname, autocommit=True)

    def create_users(self) -> None:
        with self.admin("postgres") as conn:
            conn.execute("CREATE USER snitch_full PASSWORD '%s'" % PASSWORD)
            conn.execute("CREATE USER snitch_insert PASSWORD '%s'" % PASSWORD)
            conn.execute("CREATE DATABASE picosnitch OWNER snitch_full")
        with self.admin() as conn:
            conn.execute("GRANT ALL ON SCHEMA public TO snitch_full")
            conn.execute("GRANT USAGE ON SCHEMA public TO snitch_insert")

    def params(self, user: str = "snitch_full", **extra) -> dict:
        return dict(client="psycopg", host="127.0.0.1", port=self.port, dbname="picosnitch",
                    user=user, password=PASSWORD, **extra)

    def grant(self, privilege: str, table: str, suffixes=SUFFIXES) -> None:
        with self.admin() as conn:
            conn.execute('GRANT %s ON %s TO snitch_insert' % (
                privilege, ", ".join('"%s%s"' % (table, s) for s in suffixes)))
    def query(self, sql: str) -> list:
        with self.admin() as conn:
            cursor = conn.execute(sql)
            return cursor.fetchall() if cursor.description else []

    def drop(self, table: str) -> None:
        with self.admin() as conn:
            conn.execute("DROP TABLE IF EXISTS %s" % ", ".join(
                '"%s%s"' % (table, s) for s in SUFFIXES))

    def close(self) -> None:
        try:
            self.stop()
        except subprocess.CalledProcessError:
            pass


class MariaDB:
    dialect, client = "mysql", "pymysql"

    def __init__(self, base: Path):
        self.dir = base / "mariadb"
        self.data = self.dir / "data"
        self.socket = self.dir / "mysqld.sock"
        self.port = free_port()
        self.process = None
        self.dir.mkdir()
        shutil.chown(self.dir, "mysql", "mysql")
        subprocess.run(["mariadb-install-db", "--no-defaults", "--user=mysql",
                        "--datadir=%s" % self.data, "--auth-root-authentication-method=normal",
                        "--skip-test-db"], check=True, capture_output=True, timeout=120)

    def start(self) -> None:
        self.process = subprocess.Popen(
            ["mariadbd", "--no-defaults", "--user=mysql", "--datadir=%s" % self.data,
             "--socket=%s" % self.socket, "--port=%d" % self.port, "--bind-address=127.0.0.1",
             "--skip-name-resolve", "--log-error=%s" % (self.dir / "log"),
             "--tmpdir=%s" % self.dir,  # not /tmp, which other programs clean up
             "--pid-file=%s" % (self.dir / "pid")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_for(lambda: self.admin(None).close() or True, "mariadbd")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(60)

    def admin(self, database: "str | None" = "picosnitch"):
        import pymysql
        return pymysql.connect(unix_socket=str(self.socket), user="root", database=database,
                               autocommit=True)

    def _execute(self, *statements: str, database=None) -> list:
        conn = self.admin(database)
        try:
            with conn.cursor() as cursor:
                for statement in statements:
                    cursor.execute(statement)
                return list(cursor.fetchall())
        finally:
            conn.close()

    def create_users(self) -> None:
        self._execute(
            "CREATE DATABASE picosnitch",
            "CREATE USER 'snitch_full'@'%%' IDENTIFIED BY '%s'" % PASSWORD,
            "CREATE USER 'snitch_insert'@'%%' IDENTIFIED BY '%s'" % PASSWORD,
            "GRANT ALL ON picosnitch.* TO 'snitch_full'@'%'")

    def params(self, user: str = "snitch_full", **extra) -> dict:
        return dict(client="pymysql", host="127.0.0.1", port=self.port, database="picosnitch",
                    user=user, password=PASSWORD, **extra)

    def grant(self, privilege: str, table: str, suffixes=SUFFIXES) -> None:
        for suffix in suffixes:
            self._execute("GRANT %s ON picosnitch.`%s%s` TO 'snitch_insert'@'%%'"
                          % (privilege, table, suffix))
    def query(self, sql: str) -> list:
        return self._execute(sql, database="picosnitch")

    def drop(self, table: str) -> None:
        self._execute("DROP TABLE IF EXISTS %s" % ", ".join(
            "`%s%s`" % (table, s) for s in SUFFIXES), database="picosnitch")

    def close(self) -> None:
        self.stop()


class HangingServer:
    """Accepts TCP connections on loopback and never says a word."""

    def __init__(self):
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.port = self.listener.getsockname()[1]
        self.accepted = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                self.accepted.append(self.listener.accept()[0])
            except OSError:
                return

    def close(self) -> None:
        self.listener.close()
        for conn in self.accepted:
            conn.close()


def start_server(kind: str, base: Path):
    """A started server of `kind` ("postgres" or "mariadb") with its users."""
    server = (Postgres if kind == "postgres" else MariaDB)(base)
    server.start()
    server.create_users()
    return server


def available(kind: str) -> bool:
    if os.geteuid() != 0:
        return False
    if kind == "postgres":
        return bool(glob.glob("/usr/lib/postgresql/*/bin/initdb")) and shutil.which("runuser")
    return bool(shutil.which("mariadbd") and shutil.which("mariadb-install-db"))
