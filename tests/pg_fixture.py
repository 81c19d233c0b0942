"""pytest plugin: a scratch PostgreSQL cluster, started once per session.

``initdb``/``pg_ctl`` run as the ``postgres`` user (initdb refuses root) in a private
temporary directory; the server listens on 127.0.0.1 on a free port and on a unix socket
in that directory. The test role logs in with a password (scram-sha-256) read from a
0600 pgpass file, exactly as a deployment does. A missing server or one that does not
start fails the tests with the command that installs it: never a skip.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

INSTALL = "apt-get install postgresql"
# A scratch cluster starts in about a second; a loaded CI machine may take much longer.
START_TIMEOUT = 60
STOP_TIMEOUT = 60


def _find_bindir() -> Path | None:
    """The newest PostgreSQL server binaries (Debian keeps them out of PATH)."""
    candidates = sorted(
        Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
        reverse=True,
    )
    if initdb := shutil.which("initdb"):
        candidates.append(Path(initdb).parent)
    for bindir in candidates:
        if (bindir / "initdb").exists() and (bindir / "pg_ctl").exists():
            return bindir
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class PgServer:
    """Where the scratch server is and how to reach it as the test role."""

    host: str
    port: int
    user: str
    password: str = field(repr=False)
    dbname: str
    socket_dir: Path
    data_dir: Path
    passfile: Path
    bindir: Path
    postmaster_pid: int

    @property
    def env(self) -> dict[str, str]:
        """An environment for a subprocess: the password comes from the pgpass file only."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["PGPASSFILE"] = str(self.passfile)
        return env

    def connect(self, dbname: str | None = None) -> psycopg.Connection[tuple[Any, ...]]:
        return psycopg.connect(
            host=self.host,
            port=self.port,
            user=self.user,
            dbname=dbname or self.dbname,
            passfile=str(self.passfile),
            autocommit=True,
            connect_timeout=10,
        )

    def db_flags(self, table: str) -> list[str]:
        return [
            "--db-host", self.host, "--db-port", str(self.port), "--db-user", self.user,
            "--db-name", self.dbname, "--db-table", table,
        ]  # fmt: skip


def _as_postgres(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    if os.geteuid() == 0:
        cmd = ["runuser", "-u", "postgres", "--", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, check=False, **kw)  # type: ignore[call-overload, no-any-return]


def _fail(what: str, proc: subprocess.CompletedProcess[str] | None = None) -> None:
    out = f"\n{proc.stdout}\n{proc.stderr}" if proc is not None else ""
    pytest.fail(
        f"PostgreSQL test server: {what}; install the server with `{INSTALL}` "
        f"(tests that need PostgreSQL never skip){out}",
        pytrace=False,
    )


def _postmaster_pid(data: Path) -> int:
    return int((data / "postmaster.pid").read_text().split()[0])


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    bindir = _find_bindir()
    if bindir is None:
        _fail("initdb/pg_ctl not found under /usr/lib/postgresql/*/bin or on PATH")
    assert bindir is not None
    if os.geteuid() == 0:
        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            _fail("there is no `postgres` user to run initdb as")
    root = Path(tempfile.mkdtemp(prefix="rt-pg-"))
    if os.geteuid() == 0:
        os.chown(root, pw.pw_uid, pw.pw_gid)
    root.chmod(0o700)  # the socket with trust for the superuser lives here
    data, sock = root / "data", root
    password = secrets.token_urlsafe(18)
    user, dbname = "rt_test", "rt_test"
    started: int | None = None
    try:
        proc = _as_postgres(
            [str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust",
             "--auth-host=scram-sha-256", "--no-sync", "-E", "UTF8", "--locale=C"]
        )  # fmt: skip
        if proc.returncode != 0:
            _fail("initdb failed", proc)
        # superuser over the private socket only; everything on TCP needs a password
        (data / "pg_hba.conf").write_text(
            "local all postgres trust\n"
            "local all all scram-sha-256\n"
            "host all all 127.0.0.1/32 scram-sha-256\n"
        )
        for attempt in range(3):  # the free port may be taken in the meantime
            port = _free_port()
            opts = (
                f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={sock} "
                "-c max_connections=200 -c password_encryption=scram-sha-256"
            )
            proc = _as_postgres(
                [str(bindir / "pg_ctl"), "-D", str(data), "-l", str(root / "server.log"),
                 "-o", opts, "-w", "-t", str(START_TIMEOUT), "start"]
            )  # fmt: skip
            if proc.returncode == 0:
                started = _postmaster_pid(data)
                break
            if attempt == 2:
                log = (root / "server.log").read_text() if (root / "server.log").exists() else ""
                _fail(f"pg_ctl start failed\n{log}", proc)
        setup = (
            f"create role {user} login createdb password '{password}';\n"
            f"create database {dbname} owner {user};\n"
        )
        proc = _as_postgres(
            [str(bindir / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", str(sock),
             "-p", str(port), "-U", "postgres", "-d", "postgres"],
            input=setup,
        )  # fmt: skip
        if proc.returncode != 0:
            _fail("creating the test role and database failed", proc)
        passfile = root / "pgpass"
        passfile.write_text(
            f"127.0.0.1:{port}:*:{user}:{password}\n{sock}:{port}:*:{user}:{password}\n"
        )
        passfile.chmod(0o600)  # libpq ignores a pgpass file others can read
        yield PgServer(
            host="127.0.0.1",
            port=port,
            user=user,
            password=password,
            dbname=dbname,
            socket_dir=sock,
            data_dir=data,
            passfile=passfile,
            bindir=bindir,
            postmaster_pid=started,  # type: ignore[arg-type]
        )
    finally:
        if started is not None:
            _stop(bindir, data, started)
        shutil.rmtree(root, ignore_errors=True)


def _stop(bindir: Path, data: Path, pid: int) -> None:
    """Stop the server we started (by its pid), even if a test left it SIGSTOPped."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGCONT)
    _as_postgres([str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w",
                  "-t", str(STOP_TIMEOUT), "stop"])  # fmt: skip
    deadline = time.monotonic() + STOP_TIMEOUT
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGQUIT)  # immediate shutdown of our own postmaster


@dataclass
class PgTable:
    """A fresh catalog table name in the scratch database, dropped after the test."""

    server: PgServer
    name: str

    def drop(self) -> None:
        with self.server.connect() as conn:
            for t in (f"{self.name}_events", self.name):
                conn.execute(sql.SQL("drop table if exists {}").format(sql.Identifier(t)))


@pytest.fixture
def pg_table(pg_server: PgServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[PgTable]:
    """A unique table name per test, and libpq pointed at the pgpass file in-process."""
    for var in [v for v in os.environ if v.startswith("PG")]:
        monkeypatch.delenv(var)
    monkeypatch.setenv("PGPASSFILE", str(pg_server.passfile))
    table = PgTable(pg_server, f"t_{uuid.uuid4().hex[:16]}")
    try:
        yield table
    finally:
        table.drop()
