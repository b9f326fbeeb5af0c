"""A throw-away PostgreSQL server for tests: a temporary data directory, a free loopback port, a password.

Why this shape: CI runs as root and PostgreSQL refuses to run as root, so the
server runs as an unprivileged user (``postgres`` when Debian's package made
one, else ``nobody``) in a directory that user owns, outside pytest's 0700
temporary tree. Only TCP on 127.0.0.1 is opened (no Unix socket), ``fsync``
is off (a test server loses nothing worth keeping), and password
authentication is on so tests can check that the password never leaks.
"""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

PASSWORD = "s3cret-Pw-for-tests"
USER = "evomerge"


def find_bin(name: str) -> str | None:
    """``name`` on PATH, else in Debian's /usr/lib/postgresql/<version>/bin (newest version)."""
    found = shutil.which(name)
    if found:
        return found
    def version(path: str) -> int:
        v = Path(path).parts[4]
        return int(v) if v.isdigit() else 0

    cands = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), key=version)
    return cands[-1] if cands else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_as() -> pwd.struct_passwd | None:
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise RuntimeError("running as root and neither a 'postgres' nor a 'nobody' user exists to run PostgreSQL")


class PgServer:
    def __init__(self) -> None:
        self.initdb, self.pg_ctl = find_bin("initdb"), find_bin("pg_ctl")
        if not self.initdb or not self.pg_ctl:
            raise FileNotFoundError("PostgreSQL server binaries (initdb, pg_ctl) not found; .ci/run installs them")
        self.user = _run_as()
        self.root = Path(tempfile.mkdtemp(prefix="evomerge-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self.port = 0
        self.started = False

    def _cmd(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        kw: dict = {"capture_output": True, "text": True, "timeout": 120, "cwd": str(self.root)}
        if self.user is not None:
            kw.update(user=self.user.pw_uid, group=self.user.pw_gid, extra_groups=[])
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["LC_ALL"] = "C"
        proc = subprocess.run(list(args), env=env, **kw)
        if check and proc.returncode != 0:
            log = self.log.read_text()[-3000:] if self.log.exists() else ""
            raise RuntimeError(f"{args[0]} failed ({proc.returncode}): {proc.stdout[-2000:]}{proc.stderr[-2000:]}\n"
                               f"{log}")
        return proc

    def start(self) -> "PgServer":
        if self.user is not None:
            os.chown(self.root, self.user.pw_uid, self.user.pw_gid)
        pwfile = self.root / "pw"
        pwfile.write_text(PASSWORD + "\n")
        if self.user is not None:
            os.chown(pwfile, self.user.pw_uid, self.user.pw_gid)
        self._cmd(self.initdb, "-D", str(self.data), "-U", USER, "--pwfile", str(pwfile), "--auth", "scram-sha-256",
                  "-E", "UTF8", "--locale", "C", "--no-sync")
        pwfile.unlink()
        for attempt in range(5):
            self.port = _free_port()
            with (self.data / "postgresql.conf").open("a") as fh:
                fh.write(f"\nlisten_addresses = '127.0.0.1'\nport = {self.port}\nunix_socket_directories = ''\n"
                         f"fsync = off\nsynchronous_commit = off\nfull_page_writes = off\nmax_connections = 100\n")
            if self._cmd(self.pg_ctl, "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "start",
                         check=False).returncode == 0:
                self.started = True
                return self
            time.sleep(0.5)  # the port was taken between probing and binding: try another
        raise RuntimeError(f"PostgreSQL did not start: {self.log.read_text()[-3000:] if self.log.exists() else ''}")

    def url(self, database: str = "postgres", password: bool = True) -> str:
        auth = f"{USER}:{PASSWORD}" if password else USER
        return f"postgresql+psycopg2://{auth}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """A fresh database; returns its URL (with the password)."""
        import psycopg2

        conn = psycopg2.connect(host="127.0.0.1", port=self.port, user=USER, password=PASSWORD, dbname="postgres")
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}"')
        conn.close()
        return self.url(name)

    def stop(self) -> None:
        try:
            if self.started:
                self._cmd(self.pg_ctl, "-D", str(self.data), "-m", "immediate", "-w", "-t", "60", "stop", check=False)
        finally:
            self.started = False
            shutil.rmtree(self.root, ignore_errors=True)
