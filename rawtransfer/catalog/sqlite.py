"""The embedded catalog: SQLite in WAL mode in the state directory, for a single host.

The table has the same shape as the PostgreSQL one (upstream columns, metadata columns,
the extra columns), so a later move to PostgreSQL is a copy of rows. One connection is
shared by the worker threads behind a lock: SQLite serialises writers anyway, and the
catalog's statements are tiny next to packing and copying a frame.
"""

from __future__ import annotations

import sqlite3
import threading
from datetime import datetime
from pathlib import Path
from typing import Any

from rawtransfer.catalog.base import (
    EXTRA_COLUMNS,
    UPSTREAM_COLUMNS,
    ClaimOutcome,
    ClaimResult,
    FileFacts,
    Handled,
    Owner,
    State,
    judge_existing,
    merge_handled,
    utcnow,
)
from rawtransfer.config import IDENTIFIER_RE
from rawtransfer.errors import CatalogUnavailable, ConfigError, catalog_error

# Another process on this host (a backfill run beside the service) may hold the write
# lock for a moment; half a minute is far longer than any statement here takes.
BUSY_TIMEOUT_MS = 30_000


def _ident(name: str) -> str:
    if not IDENTIFIER_RE.match(name):
        raise ConfigError(f"{name!r} is not a lower-case SQL identifier")
    return f'"{name}"'


def _ts(value: datetime | None) -> str | None:
    return value.isoformat(sep=" ") if value is not None else None


def _events(rows: list[Any]) -> list[tuple[str, datetime, str, str | None]]:
    return [(r[0], datetime.fromisoformat(r[1]), r[2], r[3]) for r in rows]


def _rows(rows: list[Any]) -> list[tuple[str, datetime]]:
    return [(r[0], datetime.fromisoformat(r[1])) for r in rows if r[1]]


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

    def check(self) -> None:
        with self._lock:
            self._x("select 1").fetchone()

    def source_state(self, source_filepath: str) -> State | None:
        with self._lock:
            row = self._x(
                f"select state from {self.t} where source_filepath = ? and state = 'done' limit 1",
                (source_filepath,),
            ).fetchone()
            if row:
                return State.DONE
            row = self._x(
                f"select state from {self.ev} where source_filepath = ? order by id desc limit 1",
                (source_filepath,),
            ).fetchone()
        return State(row[0]) if row else None

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

    def handled_sources(self, since: datetime) -> dict[str, Handled]:
        with self._lock:
            ev = self._x(
                f"select e.source_filepath, e.at, e.state, e.identity from {self.ev} e "
                f"where e.at >= ? and e.id = (select max(id) from {self.ev} f "
                "where f.source_filepath = e.source_filepath)",
                (_ts(since),),
            ).fetchall()
            rows = self._x(
                f"select source_filepath, max(coalesce(updated_at, created_at)) from {self.t} "
                "where state = 'done' and source_filepath is not null "
                "and coalesce(updated_at, created_at) >= ? group by source_filepath",
                (_ts(since),),
            ).fetchall()
        return merge_handled(_events(ev), _rows(rows))

    def verified_sources(self, since: datetime) -> dict[str, str]:
        with self._lock:
            rows = self._x(
                f"select source_filepath, sha1_hash from {self.t} where state = 'done' "
                "and verified_at is not null and source_filepath is not null "
                "and updated_at >= ?",
                (_ts(since),),
            ).fetchall()
        return {r[0]: r[1] for r in rows}

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
        with self._lock:
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
        with self._lock:
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
        with self._lock:
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
        with self._lock:
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
