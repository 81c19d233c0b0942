"""The embedded catalog: SQLite in WAL mode in the state directory, for a single host.

The table has the same shape as the PostgreSQL one (upstream columns, metadata columns,
the extra columns), so a later move to PostgreSQL is a copy of rows. One connection is
shared by the worker threads behind a lock: SQLite serialises writers anyway, and the
catalog's statements are tiny next to packing and copying a frame.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Iterable, Iterator
from datetime import date, datetime
from pathlib import Path
from typing import Any

from rawtransfer.catalog.base import (
    EVENT_SELECT,
    EXTRA_COLUMNS,
    ROW_SELECT,
    TERMINAL,
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
    identifier,
    judge_existing,
    merge_done_rows,
    merge_handled,
    resolve_history,
    utcnow,
)
from rawtransfer.errors import CatalogUnavailable, catalog_error

# Another process on this host (a backfill run beside the service) may hold the write
# lock for a moment; half a minute is far longer than any statement here takes.
BUSY_TIMEOUT_MS = 30_000
# The last component of a source path, as an indexable expression (SQLite has no
# basename): rtrim strips every character but '/' from the right, leaving the directory.
NAME_EXPR = (
    "substr(source_filepath, length(rtrim(source_filepath, replace(source_filepath, '/', ''))) + 1)"
)
# The columns ``why`` may look a row or an event up by, all indexed.
_LOOKUP = {
    "sha1_hash": "sha1_hash",
    "raw_sha1": "raw_sha1",
    "source_filepath": "source_filepath",
    "filepath": "filepath",
    "name": NAME_EXPR,
}
_EVENT_LOOKUP = ("sha1_hash", "source_filepath", "name")
# the terminal states, as SQL literals
_TERMINAL = ", ".join(f"'{s}'" for s in sorted(TERMINAL))
# the paths of the done rows of a window (handled_sources)
_DONE_PATHS = (
    "select source_filepath from {t} where state = 'done' and source_filepath is not null "
    "and coalesce(updated_at, created_at) >= ?"
)


def _ident(name: str) -> str:
    return f'"{identifier(name)}"'


def _ts(value: datetime | None) -> str | None:
    return value.isoformat(sep=" ") if value is not None else None


def _sql_value(value: Any) -> Any:
    """A Python value as this catalog stores it: times and days as ISO text."""
    if isinstance(value, datetime):
        return _ts(value)
    if isinstance(value, date):
        return value.isoformat()
    return value


def _events(rows: Iterable[Any]) -> Iterator[tuple[str, datetime, str, str | None]]:
    return ((r[0], datetime.fromisoformat(r[1]), r[2], r[3]) for r in rows)


def _rows(rows: Iterable[Any]) -> Iterator[tuple[str, datetime]]:
    return ((r[0], datetime.fromisoformat(r[1])) for r in rows if r[1])


def _dt(text: str | None) -> datetime | None:
    return datetime.fromisoformat(text) if text else None


def _row(r: Any) -> Row:
    a, b, c, d, e, f, g, h, created, updated, by, at = r
    return Row(a, b, c, d, e, f, g, h, _dt(created), _dt(updated), by, _dt(at))


def _event(r: Any) -> Event:
    return Event(r[0], datetime.fromisoformat(r[1]), *r[2:])


class SqliteCatalog:
    def __init__(self, path: Path, table: str, metadata_columns: tuple[str, ...] = ()) -> None:
        self.path = path
        self.table = table
        self.t = _ident(table)
        self.ev = _ident(f"{table}_events")
        self.metadata_columns = metadata_columns
        for c in metadata_columns:
            _ident(c)
        self._lock = threading.Lock()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(
                path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None, check_same_thread=False
            )
            self._db.execute("pragma journal_mode=wal")
            self._db.execute("pragma synchronous=full")  # a done row must survive power loss
            self._db.execute(f"pragma busy_timeout={BUSY_TIMEOUT_MS}")
            self._create()
        except (sqlite3.Error, OSError) as exc:
            raise catalog_error(f"SQLite catalog {path}: {exc}", exc) from None

    def _create(self) -> None:
        meta = "".join(f", {_ident(c)}" for c in self.metadata_columns)
        upstream = ", ".join(f"{name} {ddl}" for name, ddl in UPSTREAM_COLUMNS)
        extra = "".join(f", {name} {ddl}" for name, ddl in EXTRA_COLUMNS)
        self._db.executescript(
            f"""
            create table if not exists {self.t} (
                {upstream}{meta},
                created_at timestamp default current_timestamp not null{extra}
            );
            create index if not exists {_ident(self.table + "_source_idx")}
                on {self.t} (source_filepath);
            create index if not exists {_ident(self.table + "_state_idx")}
                on {self.t} (state, updated_at);
            create table if not exists {self.ev} (
                id integer primary key autoincrement,
                at timestamp not null,
                sha1_hash varchar(40),
                source_filepath text not null,
                state text not null,
                host text,
                pid integer,
                reason text,
                identity text
            );
            create index if not exists {_ident(self.table + "_events_source_idx")}
                on {self.ev} (source_filepath, id);
            create index if not exists {_ident(self.table + "_events_at_idx")} on {self.ev} (at);
            create index if not exists {_ident(self.table + "_raw_sha1_idx")}
                on {self.t} (raw_sha1);
            create index if not exists {_ident(self.table + "_filepath_idx")}
                on {self.t} (filepath);
            create index if not exists {_ident(self.table + "_name_idx")} on {self.t} ({NAME_EXPR});
            create index if not exists {_ident(self.table + "_events_sha1_idx")}
                on {self.ev} (sha1_hash);
            create index if not exists {_ident(self.table + "_events_name_idx")}
                on {self.ev} ({NAME_EXPR});
            """
        )
        have_ev = {row[1] for row in self._db.execute(f"pragma table_info({self.ev})")}
        if "identity" not in have_ev:  # a catalog from before identities were recorded
            self._db.execute(f"alter table {self.ev} add column identity text")
        have = {row[1] for row in self._db.execute(f"pragma table_info({self.t})")}
        for c in self.metadata_columns:
            if c not in have:
                self._db.execute(f"alter table {self.t} add column {_ident(c)}")

    def _x(self, sql: str, params: tuple[Any, ...] | dict[str, Any] = ()) -> sqlite3.Cursor:
        try:
            return self._db.execute(sql, params)
        except sqlite3.OperationalError as exc:
            # locked: passes; a read-only database or directory: refused until fixed
            raise catalog_error(f"SQLite catalog {self.path}: {exc}", exc) from None

    @contextlib.contextmanager
    def _write(self) -> Iterator[None]:
        """The lock, and one transaction: a row's change and its event are written
        together or not at all, with one sync of the log instead of one per statement
        (synchronous=full syncs at every commit)."""
        with self._lock:
            if self._db.in_transaction:  # a caller's own (a bulk load): part of it
                yield
                return
            self._x("begin immediate")
            try:
                yield
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    self._db.execute("rollback")
                raise
            self._x("commit")

    def check(self) -> None:
        with self._lock:
            self._x("select 1").fetchone()

    def clock(self) -> datetime:
        return utcnow()

    def handled(self, source_filepath: str) -> Handled | None:
        with self._lock:
            ev = self._x(
                f"select source_filepath, at, state, identity from {self.ev} "
                "where source_filepath = ? order by id desc limit 1",
                (source_filepath,),
            ).fetchall()
            rows = (
                []
                if ev
                else self._x(
                    f"select source_filepath, max(coalesce(updated_at, created_at)) from {self.t} "
                    "where source_filepath = ? and state = 'done' group by source_filepath",
                    (source_filepath,),
                ).fetchall()
            )
        return merge_handled(_events(ev), _rows(rows)).get(source_filepath)

    def handled_sources(self, since: datetime) -> HandledSources:
        since_ts = (_ts(since),)
        with self._lock:
            # read from the cursor into the result: 100,000 rows fetched into a list
            # first, and converted into another, cost a backfill pass 25 MB more. Each
            # record comes as HandledSources keeps it, one string made here by SQLite
            # (the time stays the ISO text it is stored as), and only the terminal
            # ones: no tuple, time or state per row in Python
            # (a path's latest event: none of the path has a greater id; a fifth cheaper
            # than comparing the id with their max)
            ev = self._x(
                f"select e.source_filepath, coalesce(e.identity, '') || ' ' || e.state || ' ' "
                f"|| e.at from {self.ev} e where e.at >= ? and e.state in ({_TERMINAL}) "
                f"and not exists (select 1 from {self.ev} f "
                "where f.source_filepath = e.source_filepath and f.id > e.id)",
                since_ts,
            )
            records: dict[str, str] = dict(ev)
            # the done rows that merge_handled would read: of paths whose latest event
            # is not in the window (upstream's, which have none). Usually there are none,
            # and their paths alone tell: looking up each path's latest event in SQL
            # costs more than reading the paths. Only if some are left is that asked
            done = self._x(_DONE_PATHS.format(t=self.t), since_ts)
            try:
                if all(r[0] in records for r in done):
                    return HandledSources(records)
            finally:
                done.close()  # read no further
            # ...their latest time taken in merge_done_rows (a group by here costs a sort
            # of every row). So no path of theirs has a latest event left out above as
            # not terminal
            rows = self._x(
                f"select source_filepath, coalesce(updated_at, created_at) from {self.t} t "
                "where state = 'done' and source_filepath is not null "
                "and coalesce(updated_at, created_at) >= :since "
                f"and coalesce((select f.at from {self.ev} f where f.source_filepath = "
                "t.source_filepath order by f.id desc limit 1) < :since, 1)",
                {"since": since_ts[0]},
            )
            return merge_done_rows(records, set(), _rows(rows))

    def verified_sources(self, since: datetime) -> dict[str, str]:
        with self._lock:
            rows = self._x(
                f"select source_filepath, sha1_hash from {self.t} where state = 'done' "
                "and verified_at is not null and source_filepath is not null "
                "and updated_at >= ?",
                (_ts(since),),
            ).fetchall()
        return {r[0]: r[1] for r in rows}

    def verified_copies(self, sources: list[str]) -> dict[str, VerifiedCopy]:
        out: dict[str, VerifiedCopy] = {}
        for i in range(0, len(sources), 500):  # SQLite's limit on parameters
            chunk = sources[i : i + 500]
            marks = ",".join("?" * len(chunk))
            with self._lock:
                rows = self._x(
                    f"select source_filepath, sha1_hash, raw_sha1, filepath, verified_at "
                    f"from {self.t} where source_filepath in ({marks}) and state = 'done' "
                    "and verified_at is not null and filepath is not null",
                    tuple(chunk),
                ).fetchall()
            for r in rows:
                out[r[0]] = VerifiedCopy(r[1], r[2], r[3], datetime.fromisoformat(r[4]))
        return out

    def claim(self, sha1: str, facts: FileFacts, owner: Owner, lease_seconds: float) -> ClaimResult:
        now = utcnow()
        cols = [
            "sha1_hash",
            "source_filepath",
            "file_created_at",
            "state",
            "raw_sha1",
            "raw_size",
            "packed_size",
            "obs_date",
            "claimed_by",
            "claimed_at",
            "updated_at",
            "attempts",
        ]
        vals: list[Any] = [
            sha1,
            facts.source_filepath,
            _ts(facts.file_created_at),
            State.CLAIMED.value,
            facts.raw_sha1,
            facts.raw_size,
            facts.packed_size,
            facts.obs_date.isoformat() if facts.obs_date else None,
            str(owner),
            _ts(now),
            _ts(now),
            1,
        ]
        for c in self.metadata_columns:
            cols.append(c)
            vals.append(facts.metadata.get(c))
        collist = ", ".join(_ident(c) for c in cols)
        marks = ", ".join("?" * len(cols))
        with self._write():
            cur = self._x(
                f"insert into {self.t} ({collist}) values ({marks}) "
                "on conflict (sha1_hash) do nothing",
                tuple(vals),
            )
            if cur.rowcount == 1:
                self._event(sha1, facts.source_filepath, State.CLAIMED, "", owner, now)
                return ClaimResult(ClaimOutcome.CLAIMED)
            row = self._x(
                f"select state, claimed_by, claimed_at, source_filepath, filepath "
                f"from {self.t} where sha1_hash = ?",
                (sha1,),
            ).fetchone()
            if row is None:  # deleted between the two statements: a released claim
                return ClaimResult(ClaimOutcome.BUSY)
            state, claimed_by, claimed_at, src, filepath = row
            at = datetime.fromisoformat(claimed_at) if claimed_at else None
            verdict = judge_existing(
                state, claimed_by, at, src, filepath, owner, lease_seconds, now
            )
            if verdict is not None:
                return verdict
            # compare-and-swap on the old owner and time: exactly one taker wins
            cur = self._x(
                f"update {self.t} set state = ?, claimed_by = ?, claimed_at = ?, updated_at = ?, "
                "source_filepath = ?, error = null, attempts = attempts + 1 "
                "where sha1_hash = ? and state = ? and claimed_by is ? and claimed_at is ?",
                (
                    State.CLAIMED.value,
                    str(owner),
                    _ts(now),
                    _ts(now),
                    facts.source_filepath,
                    sha1,
                    state,
                    claimed_by,
                    claimed_at,
                ),
            )
            if cur.rowcount != 1:
                return ClaimResult(ClaimOutcome.BUSY, source_filepath=src)
            # a released or failed row has no holder: it is simply taken again
            reason = (
                f"took over a stale claim of {claimed_by}"
                if claimed_by
                else f"claimed again ({state})"
            )
            self._event(sha1, facts.source_filepath, State.CLAIMED, reason, owner, now)
            return ClaimResult(ClaimOutcome.CLAIMED, taken_over_from=claimed_by)

    def mark_done(
        self, sha1: str, filepath: str, owner: Owner, identity: str | None = None
    ) -> None:
        now = utcnow()
        with self._write():
            cur = self._x(
                f"update {self.t} set state = 'done', filepath = ?, file_transferred_at = ?, "
                "verified_at = ?, updated_at = ?, error = null where sha1_hash = ? "
                "and state = 'claimed' and claimed_by = ?",
                (filepath, _ts(now), _ts(now), _ts(now), sha1, str(owner)),
            )
            if cur.rowcount != 1:
                raise CatalogUnavailable(f"claim on {sha1} was lost before it could be recorded")
            src = self._x(
                f"select source_filepath from {self.t} where sha1_hash = ?", (sha1,)
            ).fetchone()[0]
            self._event(sha1, src, State.DONE, filepath, owner, now, identity)

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
        with self._write():
            self._x(
                f"insert into {self.t} (sha1_hash, source_filepath, file_created_at, state, "
                "error, raw_sha1, raw_size, packed_size, updated_at, claimed_by, claimed_at, "
                "filepath) values (?, ?, ?, ?, ?, ?, ?, ?, ?, null, null, ?) "
                "on conflict (sha1_hash) do update set state = excluded.state, "
                "error = excluded.error, updated_at = excluded.updated_at, claimed_by = null, "
                "claimed_at = null, filepath = excluded.filepath where state != 'done'",
                (
                    key,
                    facts.source_filepath,
                    _ts(facts.file_created_at),
                    state.value,
                    reason,
                    facts.raw_sha1,
                    facts.raw_size,
                    facts.packed_size,
                    _ts(now),
                    filepath,
                ),
            )
            self._event(key, facts.source_filepath, state, reason, owner, now, facts.identity)

    def failed_at_destination(self, since: datetime) -> dict[str, str]:
        with self._lock:
            rows = self._x(
                f"select source_filepath, filepath from {self.t} where state = 'failed' "
                "and filepath is not null and updated_at >= ?",
                (_ts(since),),
            ).fetchall()
        return {r[0]: r[1] for r in rows}

    def release(self, sha1: str, owner: Owner, reason: str) -> None:
        now = utcnow()
        with self._write():
            row = self._x(
                f"select source_filepath from {self.t} where sha1_hash = ? and state = 'claimed' "
                "and claimed_by = ?",
                (sha1, str(owner)),
            ).fetchone()
            if row is None:
                return
            # an update, not a delete (as in PostgreSQL, where the service has no DELETE)
            self._x(
                f"update {self.t} set state = 'released', claimed_by = null, claimed_at = null, "
                "updated_at = ?, error = ? where sha1_hash = ? and state = 'claimed' "
                "and claimed_by = ?",
                (_ts(now), reason, sha1, str(owner)),
            )
            self._event(sha1, row[0], State.RELEASED, reason, owner, now)

    def record_event(
        self,
        sha1: str | None,
        source_filepath: str,
        state: State,
        reason: str,
        owner: Owner,
        identity: str | None = None,
    ) -> None:
        with self._lock:
            self._event(sha1, source_filepath, state, reason, owner, utcnow(), identity)

    # raw-transfer audit -----------------------------------------------------------------
    def audit_rows(self, after: str, limit: int, since: date | None = None) -> list[Row]:
        day = "" if since is None else "and (state <> 'done' or obs_date is null or obs_date >= ?)"
        params: tuple[Any, ...] = (after,) if since is None else (after, since.isoformat())
        with self._lock:
            found = self._x(
                f"select {ROW_SELECT} from {self.t} where sha1_hash > ? {day} "
                "order by sha1_hash limit ?",
                (*params, limit),
            ).fetchall()
        return [_row(r) for r in found]

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
        values = {
            k: _sql_value(v)
            for k, v in done_values(
                sha1, facts, filepath, transferred_at, now, self.metadata_columns
            ).items()
        }
        cols = ", ".join(_ident(c) for c in values)
        with self._write():
            cur = self._x(
                f"insert into {self.t} ({cols}) values ({', '.join('?' * len(values))}) "
                "on conflict (sha1_hash) do nothing",
                tuple(values.values()),
            )
            if cur.rowcount != 1:
                row = self._x(
                    f"select state, claimed_by, claimed_at, source_filepath, filepath "
                    f"from {self.t} where sha1_hash = ?",
                    (sha1,),
                ).fetchone()
                if row is None:
                    return "its row changed meanwhile; try again"
                state, by, at, src, existing = row
                verdict = judge_existing(
                    state, by, _dt(at), src, existing, owner, lease_seconds, now
                )
                if verdict is not None:
                    if verdict.outcome == ClaimOutcome.DONE:
                        return f"the same content is recorded as done at {existing}"
                    return f"the same content is being transferred (claimed by {by})"
                cur = self._x(
                    f"update {self.t} set state = 'done', source_filepath = ?, filepath = ?, "
                    "file_transferred_at = ?, verified_at = ?, updated_at = ?, error = null, "
                    "claimed_by = null, claimed_at = null, raw_sha1 = ?, raw_size = ?, "
                    "packed_size = ?, obs_date = ? where sha1_hash = ? and state = ? "
                    "and claimed_by is ? and claimed_at is ?",
                    (
                        facts.source_filepath,
                        filepath,
                        values["file_transferred_at"],
                        values["verified_at"],
                        values["updated_at"],
                        facts.raw_sha1,
                        facts.raw_size,
                        facts.packed_size,
                        values["obs_date"],
                        sha1,
                        state,
                        by,
                        at,
                    ),
                )
                if cur.rowcount != 1:
                    return "its row changed meanwhile; try again"
            self._event(sha1, facts.source_filepath, State.DONE, reason, owner, now, facts.identity)
        return None

    def reopen_lost(self, sha1: str, filepath: str, source: str, owner: Owner, reason: str) -> bool:
        now = utcnow()
        with self._write():
            cur = self._x(
                f"update {self.t} set state = 'released', error = ?, updated_at = ?, "
                "claimed_by = null, claimed_at = null "
                "where sha1_hash = ? and state = 'done' and filepath = ?",
                (reason, _ts(now), sha1, filepath),
            )
            if cur.rowcount != 1:
                return False
            self._event(sha1, source, State.RETRY, reason, owner, now)
        return True

    def release_stale(
        self,
        sha1: str,
        claimed_by: str,
        claimed_at: datetime | None,
        owner: Owner,
        reason: str,
    ) -> bool:
        now = utcnow()
        claim = (sha1, claimed_by, _ts(claimed_at))
        with self._write():
            row = self._x(
                f"select source_filepath from {self.t} where sha1_hash = ? "
                "and state = 'claimed' and claimed_by = ? and claimed_at is ?",
                claim,
            ).fetchone()
            if row is None:
                return False
            # compare-and-swap: another process may take the claim over meanwhile
            cur = self._x(
                f"update {self.t} set state = 'released', claimed_by = null, claimed_at = null, "
                "updated_at = ?, error = ? where sha1_hash = ? and state = 'claimed' "
                "and claimed_by = ? and claimed_at is ?",
                (_ts(now), reason, *claim),
            )
            if cur.rowcount != 1:
                return False
            self._event(sha1, row[0], State.RELEASED, reason, owner, now)
        return True

    def status(self, since: datetime, recent: int, in_flight: int) -> CatalogStatus:
        t = self.t
        with self._lock:
            counts = dict(self._x(f"select state, count(*) from {t} group by state").fetchall())

            def rows(where: str, order: str, limit: int) -> list[Row]:
                found = self._x(
                    f"select {ROW_SELECT} from {t} where {where} order by {order} limit ?",
                    (limit,),
                ).fetchall()
                return [_row(r) for r in found]

            claimed = rows("state = 'claimed'", "claimed_at", in_flight)
            waiting = rows("state in ('claimed', 'released')", "file_created_at", 1)
            last = rows("state = 'done' and updated_at is not null", "updated_at desc", 1)
            window = self._x(
                f"select count(*), coalesce(sum(packed_size), 0), coalesce(sum(raw_size), 0) "
                f"from {t} where state = 'done' and updated_at >= ?",
                (_ts(since),),
            ).fetchone()
            failed = rows("state = 'failed' and updated_at is not null", "updated_at desc", recent)
            quarantined = rows(
                "state = 'quarantined' and updated_at is not null", "updated_at desc", recent
            )
        return CatalogStatus(
            counts=counts,
            claimed=claimed,
            oldest_waiting=waiting[0] if waiting else None,
            last_done=last[0] if last else None,
            window_files=window[0],
            window_packed_bytes=window[1],
            window_raw_bytes=window[2],
            failed=failed,
            quarantined=quarantined,
        )

    def history(self, key: str, paths: list[str]) -> History:
        with self._lock:
            return resolve_history(key, paths, self._lookup_rows, self._lookup_events)

    # for resolve_history, with the lock held
    def _lookup_rows(self, column: str, values: list[str]) -> list[Row]:
        return [
            _row(r) for r in self._where_in(f"select {ROW_SELECT} from {self.t}", column, values)
        ]

    def _lookup_events(self, column: str, values: list[str]) -> list[Event]:
        if column not in _EVENT_LOOKUP:
            raise ValueError(f"events cannot be looked up by {column}")
        found = self._where_in(f"select {EVENT_SELECT} from {self.ev}", column, values)
        return [_event(r) for r in found]

    def _where_in(self, select: str, column: str, values: list[str]) -> list[Any]:
        """``select ... where COLUMN in (values)``, 500 values a query (SQLite's limit on
        parameters)."""
        out: list[Any] = []
        for i in range(0, len(values), 500):
            chunk = values[i : i + 500]
            out += self._x(
                f"{select} where {_LOOKUP[column]} in ({','.join('?' * len(chunk))})",
                tuple(chunk),
            ).fetchall()
        return out

    def _event(
        self,
        sha1: str | None,
        source: str,
        state: State,
        reason: str,
        owner: Owner,
        at: datetime,
        identity: str | None = None,
    ) -> None:
        self._x(
            f"insert into {self.ev} (at, sha1_hash, source_filepath, state, host, pid, reason, "
            "identity) values (?, ?, ?, ?, ?, ?, ?, ?)",
            (_ts(at), sha1, source, state.value, owner.host, owner.pid, reason, identity),
        )

    def close(self) -> None:
        with self._lock:
            self._db.close()
