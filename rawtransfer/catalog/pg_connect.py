"""How the service reaches the shared PostgreSQL catalog: where it is, how long a call may take.

A network database needs what a file does not: a libpq connection string with short
connect and TCP keepalive timeouts, server-side lock and idle-in-transaction limits, and
a client-side deadline on every call (a hung server fails the call instead of hanging a
worker). ``postgres.py`` (the catalog) and ``pg_schema.py`` (``db init|upgrade``) both
connect through this module.

Passwords come from ``~/.pgpass`` (or ``PGPASSFILE``) or ``PGPASSWORD``, read by libpq;
they are never accepted in a DSN, and error texts are scrubbed of ``password=`` anyway.
"""

from __future__ import annotations

import getpass
import os
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import TupleRow

from rawtransfer.errors import CatalogRefused, ConfigError, catalog_error

Conn = psycopg.Connection[TupleRow]

# libpq's connect_timeout (whole seconds). A healthy server answers in milliseconds, a
# busy one within a second or two; five seconds is long enough not to cry wolf and short
# enough that the canary notices an unreachable server within one of its intervals.
CONNECT_TIMEOUT = 5
# Client-side deadline for one catalog call. Each call is one or a few single-row index
# lookups that take well under a millisecond; five seconds means the server is hung (or
# the network is gone), and a worker must not wait longer than that to find out.
CALL_DEADLINE = 5.0
# handled_sources may scan every row of a years-old upstream table (no index covers the
# upstream rows' created_at); a few million rows take seconds, so it gets more room.
SCAN_DEADLINE = 30.0
# Deadline for the pool's liveness check of a connection before it is handed out: one
# empty query round trip. A connection that cannot answer that in two seconds is dropped
# and another is taken, so a single stopped backend costs two seconds, not a file.
CHECK_DEADLINE = 2.0
# How long a call waits for a connection from the pool (checks and reconnects included)
# before the catalog counts as unavailable: the same bound as a call, for the same reason.
POOL_TIMEOUT = 5.0
# Server side: a row lock held by another session (a claim being taken over) is waited
# for at most this long; shorter than CALL_DEADLINE, so the server gives a clean error
# and the connection survives, instead of the client cutting the socket.
LOCK_TIMEOUT_MS = 3_000
# Server side: a session that stops in the middle of a transaction (a host frozen or cut
# off while taking over a claim) releases its row locks after this long.
IDLE_IN_TRANSACTION_TIMEOUT_MS = 30_000
# TCP keepalives find a dead peer on an idle pooled connection (a rebooted server, a
# dropped NAT entry): first probe after 10 s idle, then every 5 s, gone after 3 misses.
# TCP_USER_TIMEOUT bounds unacknowledged writes the same way (milliseconds).
KEEPALIVE = {
    "keepalives": "1",
    "keepalives_idle": "10",
    "keepalives_interval": "5",
    "keepalives_count": "3",
    "tcp_user_timeout": "10000",
}
# close() waits this long for the pool's threads to finish what they are doing.
POOL_CLOSE_TIMEOUT = 5.0

_PASSWORD_RE = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE)
_URI_PASSWORD_RE = re.compile(r"(://[^:/@\s]*:)[^@\s]*@")


def redact(text: str) -> str:
    """Remove anything that looks like a password from a message."""
    return _URI_PASSWORD_RE.sub(r"\1***@", _PASSWORD_RE.sub(r"\1***", text))


class PgSettings(Protocol):
    """The settings the PostgreSQL catalog reads (config.Settings has them all; the
    catalog does not import the configuration)."""

    @property
    def db_host(self) -> str | None: ...
    @property
    def db_port(self) -> int: ...
    @property
    def db_user(self) -> str | None: ...
    @property
    def db_name(self) -> str | None: ...
    @property
    def db_dsn(self) -> str | None: ...
    @property
    def db_table(self) -> str: ...
    @property
    def workers(self) -> int: ...
    @property
    def metadata_columns(self) -> tuple[str, ...]: ...


def describe_error(exc: BaseException) -> str:
    # libpq messages run over several lines (FATAL, DETAIL, HINT); one line suits a log
    return redact(" ".join(str(exc).split()))


# ---------------------------------------------------------------------------------------
# where the database is


@dataclass(frozen=True)
class PgTarget:
    """A libpq connection string without a password, and how to name it in messages."""

    conninfo: str = field(repr=False)
    description: str

    @classmethod
    def from_settings(cls, s: PgSettings) -> PgTarget:
        return cls.build(s.db_host, s.db_port, s.db_user, s.db_name, s.db_dsn)

    @classmethod
    def build(
        cls,
        host: str | None = None,
        port: int | None = None,
        user: str | None = None,
        dbname: str | None = None,
        dsn: str | None = None,
    ) -> PgTarget:
        base: dict[str, Any] = {}
        if dsn:
            try:
                base = conninfo_to_dict(dsn)
            except psycopg.ProgrammingError:
                # psycopg's message quotes the string, which may hold a secret
                raise ConfigError("--db-dsn is not a valid libpq connection string") from None
            if "password" in base:
                raise ConfigError(
                    "--db-dsn must not contain a password: put it in ~/.pgpass "
                    "(or the file named by PGPASSFILE) or in PGPASSWORD"
                )
        for key, value in (("host", host), ("user", user), ("dbname", dbname)):
            if value:
                base[key] = value
        # --db-port has a default; it overrides a DSN's port only when it says something
        if port and (not dsn or port != 5432 or "port" not in base):
            base["port"] = str(port)
        params = {
            **KEEPALIVE,
            "connect_timeout": str(CONNECT_TIMEOUT),
            "application_name": "rawtransfer",
            **base,
        }
        # Our timestamps are naive UTC (as upstream's columns); the session time zone
        # makes the server's default now() for created_at agree with them.
        params["options"] = (
            f"-c TimeZone=UTC -c lock_timeout={LOCK_TIMEOUT_MS} "
            f"-c idle_in_transaction_session_timeout={IDLE_IN_TRANSACTION_TIMEOUT_MS} "
            + base.get("options", "")  # the operator's own options come last and win
        ).strip()
        env = os.environ
        who = base.get("user") or env.get("PGUSER") or getpass.getuser()
        where = base.get("host") or env.get("PGHOST") or "local socket"
        port_text = base.get("port") or env.get("PGPORT") or "5432"
        db = base.get("dbname") or env.get("PGDATABASE") or who
        return cls(make_conninfo("", **params), f"postgresql {who}@{where}:{port_text}/{db}")


# ---------------------------------------------------------------------------------------
# client-side deadlines


def cut(conn: Conn) -> Callable[[], None]:
    """What a deadline (rawtransfer.deadlines) does to an overrunning call on ``conn``.

    A stopped (SIGSTOP) or wedged backend never answers, so neither statement_timeout nor
    a cancel request helps; shutting the socket down makes libpq's pending read return
    at once with an error, the connection is marked broken and the pool replaces it.
    """
    fd = conn.fileno()
    return lambda: _cut(fd)


def _cut(fd: int) -> None:
    """Shut the connection's socket down without closing libpq's descriptor."""
    try:
        sock = socket.socket(fileno=os.dup(fd))
    except OSError:
        return
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    finally:
        sock.close()


_REFUSED_AT_CONNECT = (
    "password authentication failed",
    "no pg_hba.conf entry",
    "does not exist",  # the role or the database
    "permission denied",
    "no password supplied",
)


def connect(target: PgTarget) -> Conn:
    """One connection outside the pool, failing with a message an operator can act on."""
    try:
        return psycopg.connect(target.conninfo, autocommit=True)
    except psycopg.OperationalError as exc:
        message = f"cannot connect to {target.description}: {describe_error(exc)}"
        # libpq reports a refused login as text, with no SQLSTATE on the exception
        if any(t in str(exc) for t in _REFUSED_AT_CONNECT):
            raise CatalogRefused(message) from None
        raise catalog_error(message, exc) from None
    except psycopg.Error as exc:  # a malformed parameter, say
        raise ConfigError(f"{target.description}: {describe_error(exc)}") from None
