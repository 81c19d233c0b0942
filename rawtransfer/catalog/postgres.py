"""The shared catalog: PostgreSQL through psycopg 3 and a checked connection pool.

Several hosts share one table, the upstream one after ``raw-transfer db upgrade``. The
semantics are those of the SQLite catalog (``sqlite.py``) statement for statement; what
differs is what a network database needs: a pool whose connections are checked before
use (a database restart costs a reconnect, not a file), a client-side deadline on every
call (``pg_connect.py``: a hung server fails the call instead of hanging a worker), row
locks with ``SKIP LOCKED`` so exactly one host takes over a stale claim, and no DDL in
the service (it needs only SELECT, INSERT and UPDATE; ``init_schema``/``upgrade_schema``
in ``pg_schema.py`` are run by an operator through ``raw-transfer db init|upgrade``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import date, datetime
from typing import Any, TypeVar, cast

import psycopg
from psycopg import sql
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
    done_values,
    judge_existing,
    merge_handled,
    resolve_history,
    utcnow,
)
from rawtransfer.catalog.pg_connect import (
    CALL_DEADLINE,
    CHECK_DEADLINE,
    CONNECT_TIMEOUT,
    POOL_CLOSE_TIMEOUT,
    POOL_TIMEOUT,
    SCAN_DEADLINE,
    Conn,
    PgSettings,
    PgTarget,
    connect,
    cut,
    describe_error,
)
from rawtransfer.catalog.pg_schema import NAME_EXPR, sql_name, table_columns
from rawtransfer.deadlines import Deadlines, Watch
from rawtransfer.errors import CatalogUnavailable, ConfigError, FileFailed, catalog_error

log = logging.getLogger(__name__)

T = TypeVar("T")

# A claim's lease is written and judged by the catalog server's clock (naive UTC: the
# session's time zone is UTC), never by a host's: hosts share this catalog, and one
# whose clock runs ahead by more than the lease would take over the live claims of the
# others (and send their files a second time); one running behind would hold its own
# past their time.
SERVER_NOW = "localtimestamp"

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
        self.t = sql_name(table)
        self.ev = sql_name(f"{table}_events")
        self.metadata_columns = metadata_columns
        for c in metadata_columns:
            sql_name(c)
        self._deadlines = Deadlines("catalog-deadlines")
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
            self._deadlines.close()
            raise
        log.info("catalog: %s table %s", target.description, table)

    @classmethod
    def from_settings(cls, s: PgSettings) -> PostgresCatalog:
        # one connection per worker, plus the canary and the scans
        return cls(PgTarget.from_settings(s), s.db_table, s.metadata_columns, s.workers + 2)

    # plumbing ----------------------------------------------------------------------
    def _check_connection(self, conn: Conn) -> None:
        """The pool's own check, under a deadline: a stopped backend must not hang it."""
        with self._deadlines.watch(CHECK_DEADLINE, cut(conn)):
            ConnectionPool.check_connection(conn)

    def _verify_schema(self) -> None:
        """Refuse to start on a table that ``db init``/``db upgrade`` has not prepared."""
        conn = connect(self.target)
        try:
            with self._deadlines.watch(CALL_DEADLINE, cut(conn)) as g:
                try:
                    have = table_columns(conn, self.table)
                    have_ev = table_columns(conn, f"{self.table}_events")
                except psycopg.Error as exc:
                    why = "no answer in time" if g.fired else describe_error(exc)
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
        guard: Watch | None = None
        try:
            with (
                self._pool.connection() as conn,
                self._deadlines.watch(seconds, cut(conn)) as guard,
            ):
                return fn(conn)
        except PoolTimeout:
            why = f"no working connection within {POOL_TIMEOUT:g} s (server down or hung?)"
        except PoolClosed:
            why = "the catalog is closed"
        except psycopg.DataError as exc:
            # a value that does not fit its column (a metadata group vs a smallint):
            # this file's problem, not the database's
            raise FileFailed(f"catalog {what}: {describe_error(exc)}") from None
        except psycopg.Error as exc:
            if guard is not None and guard.fired:
                why = f"no answer within {seconds:g} s (server hung?); connection dropped"
            else:
                # a missing privilege is refused until a person grants it
                raise catalog_error(
                    f"{self.target.description}: {what}: {describe_error(exc)}", exc
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
        values = done_values(sha1, facts, filepath, transferred_at, now, self.metadata_columns)
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
        self._deadlines.close()
