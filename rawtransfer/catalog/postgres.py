"""The shared catalog: PostgreSQL through psycopg 3 and a checked connection pool.

Several hosts share one table, the upstream one after ``raw-transfer db upgrade``. The
semantics are those of the SQLite catalog (``sqlite.py``) statement for statement; what
differs is what a network database needs: a pool whose connections are checked before
use (a database restart costs a reconnect, not a file), a client-side deadline on every
call (a hung server fails the call instead of hanging a worker), row locks with
``SKIP LOCKED`` so exactly one host takes over a stale claim, and no DDL in the service
(it needs only SELECT, INSERT and UPDATE; ``init_schema``/``upgrade_schema`` are run
by an operator through ``raw-transfer db init|upgrade``).

Passwords come from ``~/.pgpass`` (or ``PGPASSFILE``) or ``PGPASSWORD``, read by libpq;
they are never accepted in a DSN, and error texts are scrubbed of ``password=`` anyway.
"""

from __future__ import annotations

import getpass
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any, Protocol, TypeVar, cast

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import TupleRow
from psycopg_pool import ConnectionPool, PoolClosed, PoolTimeout

from rawtransfer.catalog.base import (
    EVENT_SELECT,
    EXTRA_COLUMNS,
    ROW_SELECT,
    UPSTREAM_COLUMNS,
    CatalogStatus,
    ClaimOutcome,
    ClaimResult,
    Event,
    FileFacts,
    Handled,
    HandledSources,
    History,
    Owner,
    Row,
    State,
    VerifiedCopy,
    identifier,
    judge_existing,
    merge_handled,
    resolve_history,
    utcnow,
)
from rawtransfer.errors import (
    CatalogRefused,
    CatalogUnavailable,
    ConfigError,
    FileFailed,
    catalog_error,
)

log = logging.getLogger(__name__)

Conn = psycopg.Connection[TupleRow]
T = TypeVar("T")

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
# A claim's lease is written and judged by the catalog server's clock (naive UTC: the
# session's time zone is UTC), never by a host's: hosts share this catalog, and one
# whose clock runs ahead by more than the lease would take over the live claims of the
# others (and send their files a second time); one running behind would hold its own
# past their time.
SERVER_NOW = "localtimestamp"
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
# Schema changes: CREATE INDEX on a large upstream table can take minutes; an ALTER TABLE
# waiting for the table lock blocks every other user of the table, so it gives up soon.
SCHEMA_DEADLINE = 1800.0
SCHEMA_LOCK_TIMEOUT_MS = 10_000
# close() waits this long for the pool's threads to finish what they are doing.
POOL_CLOSE_TIMEOUT = 5.0

# Metadata columns created by rawtransfer have no declared type upstream could tell us;
# text holds every value a regex group yields (integers are cast on assignment), while
# an existing upstream table keeps its own smallint/int columns.
METADATA_TYPE = "text"

# The last component of a source path, as an indexable (immutable) expression.
NAME_EXPR = "regexp_replace(source_filepath, '^.*/', '')"
# The columns ``why`` may look a row or an event up by, all indexed.
_LOOKUP = {
    "sha1_hash": "sha1_hash",
    "raw_sha1": "raw_sha1",
    "source_filepath": "source_filepath",
    "filepath": "filepath",
    "name": NAME_EXPR,
}
_EVENT_LOOKUP = ("sha1_hash", "source_filepath", "name")

_EVENT_COLUMNS = (
    "id",
    "at",
    "sha1_hash",
    "source_filepath",
    "state",
    "host",
    "pid",
    "reason",
    "identity",
)

_PASSWORD_RE = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE)
_URI_PASSWORD_RE = re.compile(r"(://[^:/@\s]*:)[^@\s]*@")


def redact(text: str) -> str:
    """Remove anything that looks like a password from a message."""
    return _URI_PASSWORD_RE.sub(r"\1***@", _PASSWORD_RE.sub(r"\1***", text))


def _name(name: str) -> sql.Identifier:
    return sql.Identifier(identifier(name))


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


def _message(exc: BaseException) -> str:
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


class _Guard:
    __slots__ = ("fired",)

    def __init__(self) -> None:
        self.fired = False


class Deadlines:
    """One thread that cuts the socket of any call that overruns its deadline.

    A stopped (SIGSTOP) or wedged backend never answers, so neither statement_timeout nor
    a cancel request helps; shutting the socket down makes libpq's pending read return
    at once with an error, the connection is marked broken and the pool replaces it.
    """

    def __init__(self, name: str = "catalog-deadlines") -> None:
        self._cond = threading.Condition()
        self._armed: dict[_Guard, tuple[float, int]] = {}
        self._wake_at = float("inf")
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @contextmanager
    def guard(self, conn: Conn, seconds: float) -> Iterator[_Guard]:
        g = _Guard()
        fd = conn.fileno()
        due = time.monotonic() + seconds
        with self._cond:
            self._armed[g] = (due, fd)
            if due < self._wake_at:  # the thread sleeps past this deadline: wake it
                self._cond.notify()
        try:
            yield g
        finally:
            # under the lock, so the socket is never cut after the call has finished
            with self._cond:
                self._armed.pop(g, None)

    def _run(self) -> None:
        with self._cond:
            while not self._stopping:
                now = time.monotonic()
                for g, (due, fd) in list(self._armed.items()):
                    if due <= now:
                        del self._armed[g]
                        g.fired = True
                        _cut(fd)
                self._wake_at = min((due for due, _ in self._armed.values()), default=now + 3600)
                self._cond.wait(self._wake_at - now)

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(POOL_CLOSE_TIMEOUT)


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


def _connect(target: PgTarget) -> Conn:
    """One connection outside the pool, failing with a message an operator can act on."""
    try:
        return psycopg.connect(target.conninfo, autocommit=True)
    except psycopg.OperationalError as exc:
        message = f"cannot connect to {target.description}: {_message(exc)}"
        # libpq reports a refused login as text, with no SQLSTATE on the exception
        if any(t in str(exc) for t in _REFUSED_AT_CONNECT):
            raise CatalogRefused(message) from None
        raise catalog_error(message, exc) from None
    except psycopg.Error as exc:  # a malformed parameter, say
        raise ConfigError(f"{target.description}: {_message(exc)}") from None


# ---------------------------------------------------------------------------------------
# the catalog


class PostgresCatalog:
    """The Catalog protocol on a PostgreSQL table shared by every host."""

    def __init__(
        self,
        target: PgTarget,
        table: str,
        metadata_columns: tuple[str, ...] = (),
        pool_size: int = 4,
    ) -> None:
        self.target = target
        self.table = table
        self.t = _name(table)
        self.ev = _name(f"{table}_events")
        self.metadata_columns = metadata_columns
        for c in metadata_columns:
            _name(c)
        self._deadlines = Deadlines()
        try:
            self._verify_schema()
            self._pool: ConnectionPool[Conn] = ConnectionPool(
                target.conninfo,
                kwargs={"autocommit": True},
                min_size=1,
                max_size=max(1, pool_size),
                timeout=POOL_TIMEOUT,
                check=self._check_connection,
                open=False,
            )
            try:
                self._pool.open(wait=True, timeout=POOL_TIMEOUT + CONNECT_TIMEOUT)
            except PoolTimeout:
                self._pool.close(POOL_CLOSE_TIMEOUT)
                raise CatalogUnavailable(
                    f"{target.description}: no connection within "
                    f"{POOL_TIMEOUT + CONNECT_TIMEOUT:g} s"
                ) from None
        except BaseException:
            self._deadlines.stop()
            raise
        log.info("catalog: %s table %s", target.description, table)

    @classmethod
    def from_settings(cls, s: PgSettings) -> PostgresCatalog:
        # one connection per worker, plus the canary and the scans
        return cls(PgTarget.from_settings(s), s.db_table, s.metadata_columns, s.workers + 2)

    # plumbing ----------------------------------------------------------------------
    def _check_connection(self, conn: Conn) -> None:
        """The pool's own check, under a deadline: a stopped backend must not hang it."""
        with self._deadlines.guard(conn, CHECK_DEADLINE):
            ConnectionPool.check_connection(conn)

    def _verify_schema(self) -> None:
        """Refuse to start on a table that ``db init``/``db upgrade`` has not prepared."""
        conn = _connect(self.target)
        try:
            with self._deadlines.guard(conn, CALL_DEADLINE) as g:
                try:
                    have = _columns(conn, self.table)
                    have_ev = _columns(conn, f"{self.table}_events")
                except psycopg.Error as exc:
                    why = "no answer in time" if g.fired else _message(exc)
                    raise CatalogUnavailable(f"{self.target.description}: {why}") from None
        finally:
            conn.close()
        if have is None:
            raise ConfigError(
                f"{self.target.description}: table {self.table} does not exist; "
                f"create it with: raw-transfer db init --db-table {self.table} (and the same "
                "--db-* and --metadata-regex flags)"
            )
        need = [c for c, _ in (*UPSTREAM_COLUMNS, *EXTRA_COLUMNS)]
        need += ["created_at", *self.metadata_columns]
        missing = [c for c in need if c not in have]
        if have_ev is None or missing or any(c not in have_ev for c in _EVENT_COLUMNS):
            what = f"columns {', '.join(missing)}" if missing else f"table {self.table}_events"
            raise ConfigError(
                f"{self.target.description}: table {self.table} lacks {what}; upgrade it "
                f"(existing rows are kept) with: raw-transfer db upgrade --db-table {self.table} "
                "(and the same --db-* and --metadata-regex flags)"
            )

    def _run(self, what: str, fn: Callable[[Conn], T], seconds: float = CALL_DEADLINE) -> T:
        """Run ``fn`` on a checked pooled connection within ``seconds``; map the errors."""
        guard: _Guard | None = None
        try:
            with self._pool.connection() as conn, self._deadlines.guard(conn, seconds) as guard:
                return fn(conn)
        except PoolTimeout:
            why = f"no working connection within {POOL_TIMEOUT:g} s (server down or hung?)"
        except PoolClosed:
            why = "the catalog is closed"
        except psycopg.DataError as exc:
            # a value that does not fit its column (a metadata group vs a smallint):
            # this file's problem, not the database's
            raise FileFailed(f"catalog {what}: {_message(exc)}") from None
        except psycopg.Error as exc:
            if guard is not None and guard.fired:
                why = f"no answer within {seconds:g} s (server hung?); connection dropped"
            else:
                # a missing privilege is refused until a person grants it
                raise catalog_error(
                    f"{self.target.description}: {what}: {_message(exc)}", exc
                ) from None
        raise CatalogUnavailable(f"{self.target.description}: {what}: {why}")

    def _event_sql(self) -> sql.Composed:
        return sql.SQL(
            "insert into {ev} (at, sha1_hash, source_filepath, state, host, pid, reason, "
            "identity) values (%(at)s, %(sha1)s, %(src)s, %(state)s, %(host)s, %(pid)s, "
            "%(reason)s, %(identity)s)"
        ).format(ev=self.ev)

    @staticmethod
    def _event_params(
        sha1: str | None,
        src: str,
        state: State,
        reason: str,
        owner: Owner,
        at: datetime,
        identity: str | None = None,
    ) -> dict[str, Any]:
        return {
            "identity": identity,
            "at": at,
            "sha1": sha1,
            "src": src,
            "state": state.value,
            "host": owner.host,
            "pid": owner.pid,
            "reason": reason,
        }

    # the protocol --------------------------------------------------------------------
    def check(self) -> None:
        self._run("check", lambda c: c.execute("select 1").fetchone())

    def clock(self) -> datetime:
        row = self._run("clock", lambda c: c.execute("select " + SERVER_NOW).fetchone())
        assert row is not None  # a select of one value has one row
        return cast(datetime, row[0])

    def handled(self, source_filepath: str) -> Handled | None:
        q = sql.SQL(
            "select source_filepath, at, state, identity from {ev} "
            "where source_filepath = %(src)s order by id desc limit 1"
        ).format(ev=self.ev)
        legacy = sql.SQL(
            "select source_filepath, max(coalesce(updated_at, created_at)) from {t} "
            "where source_filepath = %(src)s and state = 'done' group by source_filepath"
        ).format(t=self.t)
        params = {"src": source_filepath}

        def fetch(c: Conn) -> tuple[list[Any], list[Any]]:
            ev = c.execute(q, params).fetchall()
            return ev, ([] if ev else c.execute(legacy, params).fetchall())

        ev, rows = self._run("handled", fetch)
        return merge_handled([tuple(r) for r in ev], [(r[0], r[1]) for r in rows if r[1]]).get(
            source_filepath
        )

    def handled_sources(self, since: datetime) -> HandledSources:
        events = sql.SQL(
            "select e.source_filepath, e.at, e.state, e.identity from {ev} e "
            "where e.at >= %(since)s and e.id = (select max(id) from {ev} f "
            "where f.source_filepath = e.source_filepath)"
        ).format(ev=self.ev)
        # coalesce(updated_at, created_at) >= since, spelled so that the (state,
        # updated_at) index serves rawtransfer's own rows
        rows = sql.SQL(
            "select source_filepath, max(coalesce(updated_at, created_at)) from {t} "
            "where state = 'done' and source_filepath is not null and (updated_at >= %(since)s "
            "or (updated_at is null and created_at >= %(since)s)) group by source_filepath"
        ).format(t=self.t)
        params = {"since": since}

        def fetch(c: Conn) -> tuple[list[Any], list[Any]]:
            return c.execute(events, params).fetchall(), c.execute(rows, params).fetchall()

        ev, done = self._run("handled_sources", fetch, SCAN_DEADLINE)
        return merge_handled([tuple(r) for r in ev], [(r[0], r[1]) for r in done if r[1]])

    def verified_sources(self, since: datetime) -> dict[str, str]:
        q = sql.SQL(
            "select source_filepath, sha1_hash from {t} where state = 'done' "
            "and verified_at is not null and source_filepath is not null "
            "and updated_at >= %(since)s"
        ).format(t=self.t)
        rows = self._run(
            "verified_sources", lambda c: c.execute(q, {"since": since}).fetchall(), SCAN_DEADLINE
        )
        return {r[0]: r[1] for r in rows}

    def verified_copies(self, sources: list[str]) -> dict[str, VerifiedCopy]:
        q = sql.SQL(
            "select source_filepath, sha1_hash, raw_sha1, filepath, verified_at from {t} "
            "where source_filepath = any(%(src)s) and state = 'done' "
            "and verified_at is not null and filepath is not null"
        ).format(t=self.t)
        out: dict[str, VerifiedCopy] = {}
        for i in range(0, len(sources), 1000):
            params = {"src": sources[i : i + 1000]}

            def fetch(c: Conn, p: dict[str, Any] = params) -> list[Any]:
                return c.execute(q, p).fetchall()

            for r in self._run("verified_copies", fetch):
                out[r[0]] = VerifiedCopy(r[1], r[2], r[3], r[4])
        return out

    def claim(self, sha1: str, facts: FileFacts, owner: Owner, lease_seconds: float) -> ClaimResult:
        now = utcnow()
        values: dict[str, Any] = {
            "sha1_hash": sha1,
            "source_filepath": facts.source_filepath,
            "file_created_at": facts.file_created_at,
            "state": State.CLAIMED.value,
            "raw_sha1": facts.raw_sha1,
            "raw_size": facts.raw_size,
            "packed_size": facts.packed_size,
            "obs_date": facts.obs_date,
            "claimed_by": str(owner),
            "claimed_at": now,
            "updated_at": now,
            "attempts": 1,
        }
        for c in self.metadata_columns:
            values[c] = facts.metadata.get(c)
        # insert and its history line in one statement: one round trip for a new file
        # the lease is the catalog server's time (see SERVER_NOW), not this host's
        del values["claimed_at"]
        insert = sql.SQL(
            "with ins as (insert into {t} ({cols}, claimed_at) values ({vals}, "
            + SERVER_NOW
            + ") on conflict (sha1_hash) do nothing returning sha1_hash), "
            "e as (insert into {ev} (at, sha1_hash, source_filepath, state, host, pid, reason) "
            "select %(at)s, sha1_hash, %(src)s, %(state)s, %(host)s, %(pid)s, %(reason)s "
            "from ins) select count(*) from ins"
        ).format(
            t=self.t,
            ev=self.ev,
            cols=sql.SQL(", ").join(sql.Identifier(c) for c in values),
            vals=sql.SQL(", ").join(sql.Placeholder(f"v_{i}") for i in range(len(values))),
        )
        params = {f"v_{i}": v for i, v in enumerate(values.values())}
        params.update(
            self._event_params(sha1, facts.source_filepath, State.CLAIMED, "", owner, now)
        )
        current = sql.SQL(
            "select state, claimed_by, claimed_at, source_filepath, filepath, "
            + SERVER_NOW
            + " from {t} where sha1_hash = %s"
        ).format(t=self.t)

        def first_try(c: Conn) -> tuple[Any, ...] | None:
            row = c.execute(insert, params).fetchone()
            if row and row[0] == 1:
                return None
            return c.execute(current, (sha1,)).fetchone() or ()

        row = self._run("claim", first_try)
        if row is None:
            return ClaimResult(ClaimOutcome.CLAIMED)
        if not row:  # deleted between the two statements: a released claim
            return ClaimResult(ClaimOutcome.BUSY)
        state, claimed_by, claimed_at, src, filepath, server_now = row
        verdict = judge_existing(
            state, claimed_by, claimed_at, src, filepath, owner, lease_seconds, server_now
        )
        if verdict is not None:
            return verdict
        if self._take_over(sha1, facts, owner, now, (state, claimed_by, claimed_at)):
            return ClaimResult(ClaimOutcome.CLAIMED, taken_over_from=claimed_by)
        return ClaimResult(ClaimOutcome.BUSY, source_filepath=src)

    def _take_over(
        self, sha1: str, facts: FileFacts, owner: Owner, now: datetime, seen: tuple[Any, ...]
    ) -> bool:
        """Take a stale claim: lock the row (or give up if another taker has it), check it
        is still the claim judged stale, and move it to us, all in one transaction."""
        lock = sql.SQL(
            "select state, claimed_by, claimed_at from {t} where sha1_hash = %s "
            "for update skip locked"
        ).format(t=self.t)
        update = sql.SQL(
            "update {t} set state = %(state)s, claimed_by = %(owner)s, claimed_at = "
            + SERVER_NOW
            + ", "
            "updated_at = %(at)s, source_filepath = %(src)s, error = null, "
            "attempts = attempts + 1 where sha1_hash = %(sha1)s"
        ).format(t=self.t)
        # a released or failed row has no holder: it is simply taken again
        reason = (
            f"took over a stale claim of {seen[1]}" if seen[1] else f"claimed again ({seen[0]})"
        )
        event = self._event_params(sha1, facts.source_filepath, State.CLAIMED, reason, owner, now)

        def take(c: Conn) -> bool:
            with c.transaction():
                row = c.execute(lock, (sha1,)).fetchone()
                if row is None or tuple(row) != seen:
                    return False
                c.execute(update, {**event, "owner": str(owner)})
                c.execute(self._event_sql(), event)
                return True

        return self._run("claim", take)

    def mark_done(
        self, sha1: str, filepath: str, owner: Owner, identity: str | None = None
    ) -> None:
        now = utcnow()
        q = sql.SQL(
            "with u as (update {t} set state = 'done', filepath = %(filepath)s, "
            "file_transferred_at = %(at)s, verified_at = %(at)s, updated_at = %(at)s, "
            "error = null where sha1_hash = %(sha1)s and state = 'claimed' "
            "and claimed_by = %(owner)s returning source_filepath) "
            "insert into {ev} (at, sha1_hash, source_filepath, state, host, pid, reason, "
            "identity) select %(at)s, %(sha1)s, source_filepath, %(state)s, %(host)s, "
            "%(pid)s, %(reason)s, %(identity)s from u"
        ).format(t=self.t, ev=self.ev)
        params = self._event_params(sha1, "", State.DONE, filepath, owner, now, identity)
        params.update(owner=str(owner), filepath=filepath)
        n = self._run("mark_done", lambda c: c.execute(q, params).rowcount)
        if n != 1:
            raise CatalogUnavailable(f"claim on {sha1} was lost before it could be recorded")

    def mark_failed(
        self,
        key: str,
        facts: FileFacts,
        state: State,
        reason: str,
        owner: Owner,
        filepath: str | None = None,
    ) -> None:
        now = utcnow()
        q = sql.SQL(
            "with up as (insert into {t} as cur (sha1_hash, source_filepath, file_created_at, "
            "state, error, raw_sha1, raw_size, packed_size, updated_at, claimed_by, claimed_at, "
            "filepath) values (%(sha1)s, %(src)s, %(created)s, %(state)s, %(reason)s, "
            "%(raw_sha1)s, %(raw_size)s, %(packed_size)s, %(at)s, null, null, %(filepath)s) "
            "on conflict (sha1_hash) do update set state = excluded.state, "
            "error = excluded.error, updated_at = excluded.updated_at, claimed_by = null, "
            "claimed_at = null, filepath = excluded.filepath where cur.state <> 'done') "
            "insert into {ev} (at, sha1_hash, source_filepath, state, host, pid, reason, "
            "identity) values (%(at)s, %(sha1)s, %(src)s, %(state)s, %(host)s, %(pid)s, "
            "%(reason)s, %(identity)s)"
        ).format(t=self.t, ev=self.ev)
        params = self._event_params(
            key, facts.source_filepath, state, reason, owner, now, facts.identity
        )
        params.update(
            created=facts.file_created_at,
            raw_sha1=facts.raw_sha1,
            raw_size=facts.raw_size,
            packed_size=facts.packed_size,
            filepath=filepath,
        )
        self._run("mark_failed", lambda c: c.execute(q, params))

    def failed_at_destination(self, since: datetime) -> dict[str, str]:
        q = sql.SQL(
            "select source_filepath, filepath from {t} where state = 'failed' "
            "and filepath is not null and updated_at >= %(since)s"
        ).format(t=self.t)
        rows = self._run(
            "failed_at_destination",
            lambda c: c.execute(q, {"since": since}).fetchall(),
            SCAN_DEADLINE,
        )
        return {r[0]: r[1] for r in rows}

    def release(self, sha1: str, owner: Owner, reason: str) -> None:
        now = utcnow()
        q = sql.SQL(
            # an update, not a delete: the service needs only SELECT, INSERT and UPDATE
            "with d as (update {t} set state = 'released', claimed_by = null, "
            "claimed_at = null, updated_at = %(at)s, error = %(reason)s "
            "where sha1_hash = %(sha1)s and state = 'claimed' "
            "and claimed_by = %(owner)s returning source_filepath) "
            "insert into {ev} (at, sha1_hash, source_filepath, state, host, pid, reason) "
            "select %(at)s, %(sha1)s, source_filepath, %(state)s, %(host)s, %(pid)s, "
            "%(reason)s from d"
        ).format(t=self.t, ev=self.ev)
        params = self._event_params(sha1, "", State.RELEASED, reason, owner, now)
        params["owner"] = str(owner)
        self._run("release", lambda c: c.execute(q, params))

    def record_event(
        self,
        sha1: str | None,
        source_filepath: str,
        state: State,
        reason: str,
        owner: Owner,
        identity: str | None = None,
    ) -> None:
        params = self._event_params(sha1, source_filepath, state, reason, owner, utcnow(), identity)
        q = self._event_sql()
        self._run("record_event", lambda c: c.execute(q, params))

    # raw-transfer audit -----------------------------------------------------------------
    def audit_rows(self, after: str, limit: int, since: date | None = None) -> list[Row]:
        day = sql.SQL(
            ""
            if since is None
            else "and (state <> 'done' or obs_date is null or obs_date >= %(day)s)"
        )
        q = sql.SQL(
            "select {cols} from {t} where sha1_hash > %(after)s {day} "
            "order by sha1_hash limit %(limit)s"
        ).format(cols=sql.SQL(ROW_SELECT), t=self.t, day=day)
        params = {"after": after, "limit": limit, "day": since}
        found = self._run("audit_rows", lambda c: c.execute(q, params).fetchall(), SCAN_DEADLINE)
        return [Row(*r) for r in found]

    def register_done(
        self,
        sha1: str,
        facts: FileFacts,
        filepath: str,
        transferred_at: datetime,
        owner: Owner,
        lease_seconds: float,
        reason: str,
    ) -> str | None:
        now = utcnow()
        values: dict[str, Any] = {
            "sha1_hash": sha1,
            "source_filepath": facts.source_filepath,
            "file_created_at": facts.file_created_at,
            "file_transferred_at": transferred_at,
            "filepath": filepath,
            "state": State.DONE.value,
            "raw_sha1": facts.raw_sha1,
            "raw_size": facts.raw_size,
            "packed_size": facts.packed_size,
            "obs_date": facts.obs_date,
            "verified_at": now,
            "updated_at": now,
        }
        for c in self.metadata_columns:
            values[c] = facts.metadata.get(c)
        insert = sql.SQL(
            "insert into {t} ({cols}) values ({vals}) on conflict (sha1_hash) do nothing"
        ).format(
            t=self.t,
            cols=sql.SQL(", ").join(sql.Identifier(c) for c in values),
            vals=sql.SQL(", ").join(sql.Placeholder(c) for c in values),
        )
        # the row locked while it is judged: a claimer holding it is waited for no longer
        # than that (skip locked: it is being changed, so not ours to register now)
        current = sql.SQL(
            "select state, claimed_by, claimed_at, source_filepath, filepath, "
            + SERVER_NOW
            + " from {t} where sha1_hash = %s for update skip locked"
        ).format(t=self.t)
        update = sql.SQL(
            "update {t} set state = 'done', source_filepath = %(source_filepath)s, "
            "filepath = %(filepath)s, file_transferred_at = %(file_transferred_at)s, "
            "verified_at = %(verified_at)s, updated_at = %(updated_at)s, error = null, "
            "claimed_by = null, claimed_at = null, raw_sha1 = %(raw_sha1)s, "
            "raw_size = %(raw_size)s, packed_size = %(packed_size)s, obs_date = %(obs_date)s "
            "where sha1_hash = %(sha1_hash)s"
        ).format(t=self.t)
        event = self._event_params(
            sha1, facts.source_filepath, State.DONE, reason, owner, now, facts.identity
        )

        def run(c: Conn) -> str | None:
            with c.transaction():
                if c.execute(insert, values).rowcount != 1:
                    row = c.execute(current, (sha1,)).fetchone()
                    if row is None:
                        return "its row is being changed; try again"
                    state, by, at, src, existing, server_now = row
                    verdict = judge_existing(
                        state, by, at, src, existing, owner, lease_seconds, server_now
                    )
                    if verdict is not None:
                        if verdict.outcome == ClaimOutcome.DONE:
                            return f"the same content is recorded as done at {existing}"
                        return f"the same content is being transferred (claimed by {by})"
                    c.execute(update, values)
                c.execute(self._event_sql(), event)
            return None

        return self._run("register_done", run)

    def reopen_lost(self, sha1: str, filepath: str, source: str, owner: Owner, reason: str) -> bool:
        now = utcnow()
        q = sql.SQL(
            "with u as (update {t} set state = 'released', error = %(reason)s, "
            "updated_at = %(at)s, claimed_by = null, claimed_at = null "
            "where sha1_hash = %(sha1)s and state = 'done' and filepath = %(filepath)s "
            "returning sha1_hash) "
            "insert into {ev} (at, sha1_hash, source_filepath, state, host, pid, reason) "
            "select %(at)s, %(sha1)s, %(src)s, %(state)s, %(host)s, %(pid)s, %(reason)s from u"
        ).format(t=self.t, ev=self.ev)
        params = self._event_params(sha1, source, State.RETRY, reason, owner, now)
        params["filepath"] = filepath
        n = self._run("reopen_lost", lambda c: c.execute(q, params).rowcount)
        return n == 1

    def release_stale(
        self,
        sha1: str,
        claimed_by: str,
        claimed_at: datetime | None,
        owner: Owner,
        reason: str,
    ) -> bool:
        now = utcnow()
        q = sql.SQL(
            "with d as (update {t} set state = 'released', claimed_by = null, "
            "claimed_at = null, updated_at = %(at)s, error = %(reason)s "
            "where sha1_hash = %(sha1)s and state = 'claimed' and claimed_by = %(holder)s "
            "and claimed_at is not distinct from %(claimed_at)s::timestamp "
            "returning source_filepath) "
            "insert into {ev} (at, sha1_hash, source_filepath, state, host, pid, reason) "
            "select %(at)s, %(sha1)s, source_filepath, %(state)s, %(host)s, %(pid)s, "
            "%(reason)s from d"
        ).format(t=self.t, ev=self.ev)
        params = self._event_params(sha1, "", State.RELEASED, reason, owner, now)
        params.update(holder=claimed_by, claimed_at=claimed_at)
        n = self._run("release_stale", lambda c: c.execute(q, params).rowcount)
        return n == 1

    def status(self, since: datetime, recent: int, in_flight: int) -> CatalogStatus:
        t = self.t

        def rows(c: Conn, where: str, order: str, limit: int) -> list[Row]:
            q = sql.SQL("select {cols} from {t} where {where} order by {order} limit %s").format(
                cols=sql.SQL(ROW_SELECT), t=t, where=sql.SQL(where), order=sql.SQL(order)
            )
            return [Row(*r) for r in c.execute(q, (limit,)).fetchall()]

        def fetch(c: Conn) -> CatalogStatus:
            counts = sql.SQL("select state, count(*) from {t} group by state").format(t=t)
            window = sql.SQL(
                "select count(*), coalesce(sum(packed_size), 0), coalesce(sum(raw_size), 0) "
                "from {t} where state = 'done' and updated_at >= %s"
            ).format(t=t)
            w = c.execute(window, (since,)).fetchone() or (0, 0, 0)
            waiting = rows(c, "state in ('claimed', 'released')", "file_created_at", 1)
            # "is not null": descending, PostgreSQL puts the upstream rows' nulls first
            last = rows(c, "state = 'done' and updated_at is not null", "updated_at desc", 1)
            return CatalogStatus(
                counts={r[0]: r[1] for r in c.execute(counts).fetchall()},
                claimed=rows(c, "state = 'claimed'", "claimed_at", in_flight),
                oldest_waiting=waiting[0] if waiting else None,
                last_done=last[0] if last else None,
                window_files=int(w[0]),
                window_packed_bytes=int(w[1]),
                window_raw_bytes=int(w[2]),
                failed=rows(
                    c, "state = 'failed' and updated_at is not null", "updated_at desc", recent
                ),
                quarantined=rows(
                    c, "state = 'quarantined' and updated_at is not null", "updated_at desc", recent
                ),
            )

        return self._run("status", fetch, SCAN_DEADLINE)

    def history(self, key: str, paths: list[str]) -> History:
        def lookup_rows(c: Conn, column: str, values: list[str]) -> list[Row]:
            q = sql.SQL("select {cols} from {t} where {col} = any(%s)").format(
                cols=sql.SQL(ROW_SELECT), t=self.t, col=sql.SQL(_LOOKUP[column])
            )
            return [Row(*r) for r in c.execute(q, (values,)).fetchall()]

        def lookup_events(c: Conn, column: str, values: list[str]) -> list[Event]:
            if column not in _EVENT_LOOKUP:
                raise ValueError(f"events cannot be looked up by {column}")
            q = sql.SQL("select {cols} from {ev} where {col} = any(%s)").format(
                cols=sql.SQL(EVENT_SELECT), ev=self.ev, col=sql.SQL(_LOOKUP[column])
            )
            return [Event(*r) for r in c.execute(q, (values,)).fetchall()]

        def fetch(c: Conn) -> History:
            return resolve_history(
                key,
                paths,
                lambda col, vals: lookup_rows(c, col, vals),
                lambda col, vals: lookup_events(c, col, vals),
            )

        return self._run("history", fetch, SCAN_DEADLINE)

    def close(self) -> None:
        pool = getattr(self, "_pool", None)
        if pool is not None and not pool.closed:
            pool.close(POOL_CLOSE_TIMEOUT)
        self._deadlines.stop()


# ---------------------------------------------------------------------------------------
# schema: run by an operator (raw-transfer db init|upgrade), never by the service


def _indexes(conn: Conn, table: str) -> set[str]:
    """The names of the indexes on ``table`` and on its events table."""
    rows = conn.execute(
        "select indexrelid::regclass::text from pg_index "
        "where indrelid in (to_regclass(quote_ident(%s)), to_regclass(quote_ident(%s)))",
        (table, f"{table}_events"),
    ).fetchall()
    return {r[0] for r in rows}


def _columns(conn: Conn, table: str) -> set[str] | None:
    """The columns of ``table`` as the search path resolves it, or None if it is absent."""
    row = conn.execute("select to_regclass(quote_ident(%s))::oid", (table,)).fetchone()
    if row is None or row[0] is None:
        return None
    rows = conn.execute(
        "select attname from pg_attribute where attrelid = %s and attnum > 0 and not attisdropped",
        (row[0],),
    ).fetchall()
    return {r[0] for r in rows}


def _schema_statements(
    table: str, metadata_columns: tuple[str, ...], create: bool
) -> list[sql.Composed]:
    t = _name(table)
    ev = _name(f"{table}_events")
    meta = [(c, METADATA_TYPE) for c in metadata_columns]
    for c, _ in meta:
        _name(c)
    out: list[sql.Composed] = []
    if create:
        # the upstream DDL (SPEC.md), then the metadata and the extra columns
        cols = [*UPSTREAM_COLUMNS, *meta, ("created_at", "timestamp default now() not null")]
        cols += list(EXTRA_COLUMNS)
        out.append(
            sql.SQL("create table if not exists {t} ({cols})").format(
                t=t,
                cols=sql.SQL(", ").join(
                    sql.SQL("{} {}").format(sql.Identifier(c), sql.SQL(ddl)) for c, ddl in cols
                ),
            )
        )
    # On an existing (upstream) table: a constant default makes ADD COLUMN a catalog-only
    # change in PostgreSQL 11+, and state defaults to 'done', which is what upstream rows are.
    for c, ddl in (*meta, *EXTRA_COLUMNS):
        out.append(
            sql.SQL("alter table {t} add column if not exists {c} {ddl}").format(
                t=t, c=sql.Identifier(c), ddl=sql.SQL(ddl)
            )
        )
    out += [
        sql.SQL("create index if not exists {i} on {t} (source_filepath)").format(
            i=_name(f"{table}_source_idx"), t=t
        ),
        sql.SQL("create index if not exists {i} on {t} (state, updated_at)").format(
            i=_name(f"{table}_state_idx"), t=t
        ),
        sql.SQL(
            "create table if not exists {ev} ("
            "id bigint generated always as identity primary key, "
            "at timestamp not null, sha1_hash varchar(40), source_filepath text not null, "
            "state text not null, host text, pid integer, reason text, identity text)"
        ).format(ev=ev),
        sql.SQL("alter table {ev} add column if not exists identity text").format(ev=ev),
        sql.SQL("create index if not exists {i} on {ev} (source_filepath, id)").format(
            i=_name(f"{table}_events_source_idx"), ev=ev
        ),
        sql.SQL("create index if not exists {i} on {ev} (at)").format(
            i=_name(f"{table}_events_at_idx"), ev=ev
        ),
        # for the operators' status and why (look-ups by content, archive path and name)
        *(
            sql.SQL("create index if not exists {i} on {t} ({e})").format(
                i=_name(f"{table}_{suffix}"), t=on, e=sql.SQL(expr)
            )
            for suffix, on, expr in (
                ("raw_sha1_idx", t, "raw_sha1"),
                ("filepath_idx", t, "filepath"),
                ("name_idx", t, NAME_EXPR),
                ("events_sha1_idx", ev, "sha1_hash"),
                ("events_name_idx", ev, NAME_EXPR),
            )
        ),
    ]
    return out


def _apply(target: PgTarget, table: str, metadata_columns: tuple[str, ...], init: bool) -> str:
    statements = _schema_statements(table, metadata_columns, create=init)  # validates names
    deadlines = Deadlines("schema-deadline")
    try:
        conn = _connect(target)
        try:
            with deadlines.guard(conn, SCHEMA_DEADLINE) as g:
                try:
                    before = _columns(conn, table)
                    if before is None and not init:
                        raise ConfigError(
                            f"{target.description}: table {table} does not exist; "
                            "create it with: raw-transfer db init"
                        )
                    had_events = _columns(conn, f"{table}_events") is not None
                    indexes_before = _indexes(conn, table)
                    # all or nothing: PostgreSQL's DDL is transactional
                    with conn.transaction():
                        conn.execute(
                            sql.SQL("set local lock_timeout = {}").format(
                                sql.Literal(SCHEMA_LOCK_TIMEOUT_MS)
                            )
                        )
                        for st in statements:
                            conn.execute(st)
                    after = _columns(conn, table) or set()
                    new_indexes = sorted(_indexes(conn, table) - indexes_before)
                except psycopg.Error as exc:
                    why = "no answer in time" if g.fired else _message(exc)
                    raise CatalogUnavailable(f"{target.description}: {why}") from None
        finally:
            conn.close()
    finally:
        deadlines.stop()
    if before is None:
        return f"created table {table} and {table}_events in {target.description}"
    added = sorted(after - before)
    parts = [f"added columns {', '.join(added)}"] if added else []
    if new_indexes and had_events:
        parts.append(f"added indexes {', '.join(new_indexes)}")
    if not had_events:
        parts.append(f"created {table}_events")
    did = "; ".join(parts) or "already up to date"
    return f"table {table} in {target.description}: {did}; every existing row kept"


def init_schema(target: PgTarget, table: str, metadata_columns: tuple[str, ...] = ()) -> str:
    """Create the catalog table, its indexes and its events table (an existing table is
    upgraded instead); returns a one-line summary."""
    return _apply(target, table, metadata_columns, init=True)


def upgrade_schema(target: PgTarget, table: str, metadata_columns: tuple[str, ...] = ()) -> str:
    """Add the missing columns, indexes and the events table to an existing (upstream)
    table, keeping its rows; safe to run again. Returns a one-line summary."""
    return _apply(target, table, metadata_columns, init=False)
