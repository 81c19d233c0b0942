"""The Catalog protocol: the one place that decides whether a file is transferred.

One row per *content* (keyed by the packed file's SHA1, as upstream) with a state:

* ``claimed``: a worker owns the transfer; ``claimed_by``/``claimed_at`` form a lease, so
  a claim left by a crashed worker is taken over once it is stale.
* ``done``: the copy at the destination was verified and recorded.
* ``failed``: a permanent failure with its reason (``error``).
* ``quarantined``: the file itself is bad; the row is keyed by the *raw* SHA1 since there
  is no packed file.
* ``released``: a claim given back (shutdown, the destination went away); the next
  claimer takes the row over.

Rows that existed before rawtransfer (an upstream table after ``db upgrade``) are
``done``. Every state change of every *source file* is also appended to an events table,
which records what has no row of its own: a second name for content already in the
catalog is a ``duplicate`` event. The operators' ``why`` command reads that history.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from enum import StrEnum
from typing import Any, Protocol

from rawtransfer.errors import ConfigError


class State(StrEnum):
    CLAIMED = "claimed"
    DONE = "done"
    FAILED = "failed"
    QUARANTINED = "quarantined"
    DUPLICATE = "duplicate"  # recorded as an event for the second source path
    RELEASED = "released"  # a claim given back (shutdown, resource away)
    RETRY = "retry"  # event only: a transient failure, or an operator asked for a retry
    CHANGED = "changed"  # event only: the file changed while it was processed
    REAPED = "reaped"  # event only: a local file deleted after its copy was verified


# The table's shape, shared by both catalogs: the upstream columns (``created_at``, with
# its default, is added by each dialect), then the columns rawtransfer adds. Existing
# upstream rows get state 'done'.
UPSTREAM_COLUMNS = (
    ("sha1_hash", "varchar(40) primary key"),
    ("source_filepath", "text"),
    ("file_created_at", "timestamp"),
    ("file_transferred_at", "timestamp"),
    ("filepath", "text"),
)
EXTRA_COLUMNS = (
    ("state", "text not null default 'done'"),
    ("error", "text"),
    ("raw_sha1", "varchar(40)"),
    ("raw_size", "bigint"),
    ("packed_size", "bigint"),
    ("obs_date", "date"),
    ("claimed_by", "text"),
    ("claimed_at", "timestamp"),
    ("verified_at", "timestamp"),
    ("updated_at", "timestamp"),
    ("attempts", "integer not null default 0"),
)
# Columns the catalog owns; a metadata group may not be named like one of them.
RESERVED_COLUMNS = frozenset(
    {name for name, _ in (*UPSTREAM_COLUMNS, *EXTRA_COLUMNS)} | {"created_at"}
)

# Table and column names are composed into SQL as identifiers; this is the only shape
# accepted (PostgreSQL's unquoted identifiers, lower case, at most 63 characters).
IDENTIFIER_RE = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


def identifier(name: str) -> str:
    """``name`` if it may be composed into SQL as an identifier; ConfigError if not."""
    if not IDENTIFIER_RE.match(name):
        raise ConfigError(f"{name!r} is not a lower-case SQL identifier")
    return name


# Outcomes after which a source file needs nothing more.
TERMINAL = frozenset({State.DONE, State.FAILED, State.QUARANTINED, State.DUPLICATE})


def utcnow() -> datetime:
    """Naive UTC, matching upstream's ``timestamp without time zone`` columns."""
    return datetime.now(UTC).replace(tzinfo=None)


def done_values(
    sha1: str,
    facts: FileFacts,
    filepath: str,
    transferred_at: datetime,
    now: datetime,
    metadata_columns: tuple[str, ...],
) -> dict[str, Any]:
    """The columns of a row recorded as done and verified from an archive file that had
    none (``register_done``), as Python values."""
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
    for c in metadata_columns:
        values[c] = facts.metadata.get(c)
    return values


def utc_from_epoch(epoch: float) -> datetime:
    """A file time (seconds since the epoch) in the catalog's naive UTC."""
    return datetime.fromtimestamp(epoch, UTC).replace(tzinfo=None)


@dataclass(frozen=True)
class Owner:
    """Who holds a claim: the host and the process."""

    host: str = field(default_factory=socket.gethostname)
    pid: int = field(default_factory=os.getpid)

    def __str__(self) -> str:
        return f"{self.host}:{self.pid}"

    @staticmethod
    def parse(text: str | None) -> Owner | None:
        if not text or ":" not in text:
            return None
        host, _, pid = text.rpartition(":")
        try:
            return Owner(host, int(pid))
        except ValueError:
            return None

    def looks_dead(self, other: Owner | None) -> bool:
        """True when ``other`` is a process on this host that no longer exists."""
        if other is None or other.host != self.host or other.pid == self.pid:
            return False
        try:
            os.kill(other.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False


@dataclass(frozen=True)
class FileFacts:
    """What the pipeline knows about a file when it claims or records it."""

    source_filepath: str
    raw_sha1: str
    raw_size: int
    file_created_at: datetime
    packed_size: int | None = None
    obs_date: date | None = None
    metadata: dict[str, int | str | None] = field(default_factory=dict)
    identity: str | None = None  # the source file's identity (steps.snapshot.Identity)


@dataclass(frozen=True)
class VerifiedCopy:
    """A done row whose archive copy was verified: what a local file must equal before
    it may be deleted."""

    sha1: str  # of the packed file (the archive copy, and the .fz left by tidying)
    raw_sha1: str | None  # of the original
    filepath: str  # the archive copy
    verified_at: datetime


@dataclass(frozen=True, slots=True)
class Handled:
    """The last terminal record of a source path: when, in which state, and the identity
    (device:inode:size:mtime:ctime) the file had then. A backfill pass does not hold one
    per path of its window (``HandledSources``)."""

    at: datetime
    state: str
    identity: str | None

    def covers(self, identity: object | None) -> bool:
        """True when the file now at the path is the one this record dealt with.

        Compared by identity, never by time. Rows an upstream deployment left (or events
        written before identities were recorded) have none: for those, the file counts as
        handled unless it was modified after the record, as upstream judged it.
        """
        if identity is None:
            return False
        if self.identity is not None:
            return self.identity == str(identity)
        mtime_ns = int(str(identity).split(":")[3])
        return utc_from_epoch(mtime_ns / 1e9) <= self.at


class HandledSources(Mapping[str, Handled]):
    """Source path -> Handled (``Catalog.handled_sources``), each record kept as one
    string, ``"IDENTITY STATE AT"`` (IDENTITY empty when the record has none, AT in ISO
    format): a ``Handled`` is made, and its time parsed, only for a path asked for.

    A backfill pass reads 100,000 of them to look up as many files and needs only the
    identity of each (``covers``): a record object, a parsed time and a state per row
    cost more time and memory than the query.
    """

    __slots__ = ("records",)

    def __init__(self, records: dict[str, str]) -> None:
        self.records = records

    def __getitem__(self, src: str) -> Handled:
        identity, state, at = self.records[src].split(" ", 2)
        return Handled(datetime.fromisoformat(at), state, identity or None)

    def __iter__(self) -> Iterator[str]:
        return iter(self.records)

    def __len__(self) -> int:
        return len(self.records)

    def __contains__(self, src: object) -> bool:
        return src in self.records

    def __delitem__(self, src: str) -> None:
        del self.records[src]

    def __repr__(self) -> str:
        return f"HandledSources({dict(self.items())!r})"

    def covers(self, src: str, identity: str) -> bool:
        """``self[src].covers(identity)`` (False for a path that is not here) without the
        Handled, unless the record has no identity to compare with (``identity`` is
        the text of one, steps.snapshot.identity_text)."""
        record = self.records.get(src)
        if record is None:
            return False
        if record.startswith(identity + " "):
            return True
        return record[0] == " " and self[src].covers(identity)


def handled_record(at: datetime | str, state: str, identity: str | None) -> str:
    """A ``HandledSources`` record (``at`` may be ISO text already, as SQLite keeps it)."""
    if isinstance(at, datetime):
        at = at.isoformat(sep=" ")
    return f"{identity or ''} {state} {at}"


def merge_handled(
    events: Iterable[tuple[str, datetime, str, str | None]],
    done_rows: Iterable[tuple[str, datetime]],
) -> HandledSources:
    """Paths handled, from each path's latest event (path, at, state, identity) and, for
    paths with no event at all (upstream rows), their done rows (path, time).

    Each is read once, as it comes (a cursor will do): no list of every row is kept
    beside the result."""
    out: dict[str, str] = {}
    unfinished: set[str] = set()  # paths whose latest event is not terminal
    for src, at, state, identity in events:
        if state in TERMINAL:
            out[src] = handled_record(at, state, identity)
        else:
            unfinished.add(src)
    return merge_done_rows(out, unfinished, done_rows)


def merge_done_rows(
    records: dict[str, str], unfinished: set[str], done_rows: Iterable[tuple[str, datetime]]
) -> HandledSources:
    """``merge_handled`` from the records of the terminal latest events (path -> record)
    and the paths whose latest event is not terminal."""
    upstream: dict[str, datetime] = {}
    for src, at in done_rows:
        if src in records or src in unfinished:
            continue
        prev = upstream.get(src)
        if prev is None or prev < at:
            upstream[src] = at
    for src, at in upstream.items():
        records[src] = handled_record(at, State.DONE, None)
    return HandledSources(records)


# What the operators' commands read (``status``, ``why``) -------------------------------

SHA1_RE = re.compile(r"^[0-9a-f]{40}$")
# A bare name can be a frame's name on many nights ("flat.fits"): a history names at most
# this many source files and shows at most this many lines, newest kept.
HISTORY_FILES = 50
HISTORY_LINES = 2000


@dataclass(frozen=True)
class Row:
    """A catalog row as the operators' commands show it."""

    sha1: str
    source_filepath: str | None
    state: str
    error: str | None
    filepath: str | None
    raw_sha1: str | None
    packed_size: int | None
    raw_size: int | None
    file_created_at: datetime | None
    updated_at: datetime | None  # an upstream row has none: its created_at stands in
    claimed_by: str | None
    claimed_at: datetime | None


# the select list that Row is built from, in its order (both dialects)
ROW_SELECT = (
    "sha1_hash, source_filepath, state, error, filepath, raw_sha1, packed_size, raw_size, "
    "file_created_at, coalesce(updated_at, created_at), claimed_by, claimed_at"
)


@dataclass(frozen=True)
class Event:
    """One line of a source file's history (the events table)."""

    id: int
    at: datetime
    source_filepath: str
    state: str
    host: str | None
    pid: int | None
    reason: str
    sha1: str | None
    identity: str | None


EVENT_SELECT = "id, at, source_filepath, state, host, pid, reason, sha1_hash, identity"


@dataclass(frozen=True)
class CatalogStatus:
    """The catalog's side of ``raw-transfer status``; every figure from an index."""

    counts: dict[str, int]  # rows per state
    claimed: list[Row]  # in flight, oldest claim first (at most the number asked for)
    oldest_waiting: Row | None  # claimed or released, with the oldest file time
    last_done: Row | None
    window_files: int  # done since the window's start
    window_packed_bytes: int
    window_raw_bytes: int
    failed: list[Row]  # the most recent first
    quarantined: list[Row]


@dataclass(frozen=True)
class History:
    """What ``raw-transfer why`` shows: the events of the files a key names, oldest
    first, and their rows (an upstream row has no events)."""

    matched_by: str  # "sha1", "path" or "name"
    events: list[Event]
    rows: list[Row]
    truncated: bool = False


# Indexed look-ups each catalog dialect answers: (column, values) -> rows or events, where
# column is sha1_hash, raw_sha1, source_filepath, filepath or name (the source path's last
# component, through an index on that expression); events have no raw_sha1 or filepath.
RowLookup = Callable[[str, list[str]], list[Row]]
EventLookup = Callable[[str, list[str]], list[Event]]


def resolve_history(key: str, paths: list[str], rows: RowLookup, events: EventLookup) -> History:
    """The history of what ``key`` names: a SHA1 (of the packed or of the raw file), a
    path (``paths``: the spellings to try, source or archive), else a bare name (the
    archive's ``NAME.fits.fz`` also finds ``NAME.fits``). Shared by both catalogs, so
    that they answer ``why`` the same way."""
    k = key.strip().lower()
    if SHA1_RE.match(k):
        how = "sha1"
        found = rows("sha1_hash", [k]) + rows("raw_sha1", [k])
        hits = events("sha1_hash", [k])
    else:
        how = "path"
        found = rows("source_filepath", paths) + rows("filepath", paths)
        hits = events("source_filepath", paths)
        if not found and not hits:
            how = "name"
            name = key.rstrip("/").rpartition("/")[2]
            names = [name, name.removesuffix(".fz")] if name.endswith(".fz") else [name]
            found = rows("name", names)
            hits = events("name", names)
    sources = {r.source_filepath for r in found if r.source_filepath}
    sources |= {e.source_filepath for e in hits}
    truncated = len(sources) > HISTORY_FILES
    chosen = sorted(sources)[:HISTORY_FILES]
    by_id = {e.id: e for e in hits if e.source_filepath in chosen}
    by_id.update((e.id, e) for e in events("source_filepath", chosen))
    by_sha1 = {r.sha1: r for r in found if r.source_filepath in (None, *chosen)}
    by_sha1.update((r.sha1, r) for r in rows("source_filepath", chosen))
    ordered = sorted(by_id.values(), key=lambda e: (e.at, e.id))
    if len(ordered) > HISTORY_LINES:
        ordered, truncated = ordered[-HISTORY_LINES:], True
    return History(how, ordered, list(by_sha1.values()), truncated)


class ClaimOutcome(StrEnum):
    CLAIMED = "claimed"  # ours now: transfer it
    DONE = "done"  # already transferred (by us or another name/host)
    BUSY = "busy"  # a live claim elsewhere: try again later


@dataclass(frozen=True)
class ClaimResult:
    outcome: ClaimOutcome
    source_filepath: str | None = None  # the source recorded in the existing row
    filepath: str | None = None  # its destination path, when done
    taken_over_from: str | None = None


def judge_existing(
    state: str,
    claimed_by: str | None,
    claimed_at: datetime | None,
    src: str | None,
    filepath: str | None,
    owner: Owner,
    lease_seconds: float,
    now: datetime,
) -> ClaimResult | None:
    """What an existing row means to a would-be claimer; None when it may be taken over.

    Shared by the catalogs so that SQLite and PostgreSQL judge a claim the same way: a
    claim is stale when its lease expired, when its owner is a dead process on this
    host, or when the owner is the claimer itself (see Catalog.claim).
    """
    if state == State.DONE:
        return ClaimResult(ClaimOutcome.DONE, source_filepath=src, filepath=filepath)
    # A failed row is taken over: the caller only gets here for a file that is not the
    # one that failed (its identity changed) or that an operator asked to retry, or
    # when the cause can have gone (the conflicting archive file was moved aside).
    holder = Owner.parse(claimed_by)
    stale = (
        claimed_at is None
        or claimed_at < now - timedelta(seconds=lease_seconds)
        or owner.looks_dead(holder)
        or holder == owner
    )
    if state == State.CLAIMED and not stale:
        return ClaimResult(ClaimOutcome.BUSY, source_filepath=src)
    return None


class Catalog(Protocol):
    """Implemented by the SQLite and PostgreSQL catalogs; all calls are thread-safe."""

    def check(self) -> None:
        """Raise CatalogUnavailable unless the catalog answers now."""

    def clock(self) -> datetime:
        """The time claims' leases are judged by (naive UTC): the catalog server's for
        PostgreSQL, which every host shares; this host's for SQLite, which is local."""

    def handled(self, source_filepath: str) -> Handled | None:
        """The path's latest record if that is terminal (done, duplicate, failed,
        quarantined); None if it was never handled or something is pending (a claim, a
        change, a retry asked for). A file whose identity differs from the record's is a
        new file under an old name, and is looked at again rather than skipped.
        """

    def handled_sources(self, since: datetime) -> HandledSources:
        """Source paths recorded since ``since`` that need nothing more (one query; see
        handled)."""

    def verified_sources(self, since: datetime) -> dict[str, str]:
        """Source path -> packed SHA1 of rows done *and verified* since ``since``.

        Only these originals may ever be replaced locally (rows an upstream deployment
        left have no verification time and are never tidied).
        """

    def verified_copies(self, sources: list[str]) -> dict[str, VerifiedCopy]:
        """For these source paths, their done rows whose copy was verified (indexed)."""

    def claim(self, sha1: str, facts: FileFacts, owner: Owner, lease_seconds: float) -> ClaimResult:
        """Insert a claimed row, or take over a stale one; never two live claims.

        A claim is stale when its lease expired, when its owner is a process on this host
        that no longer exists, or when the owner is ``owner`` itself: the caller makes
        sure no other thread of its own works on this content, so such a claim is a
        leftover of an attempt that could not release it (the catalog was away).
        """

    def mark_done(
        self, sha1: str, filepath: str, owner: Owner, identity: str | None = None
    ) -> None:
        """The copy is verified: record the destination path and times."""

    def mark_failed(
        self,
        key: str,
        facts: FileFacts,
        state: State,
        reason: str,
        owner: Owner,
        filepath: str | None = None,
    ) -> None:
        """Record a permanent failure (``failed`` or ``quarantined``) with its reason;
        ``filepath`` is the archive path involved (a conflicting file), if any."""

    def failed_at_destination(self, since: datetime) -> dict[str, str]:
        """Source path -> archive path of failed rows that name one (conflicts), so that
        they can be retried once the file in the way is gone."""

    def release(self, sha1: str, owner: Owner, reason: str) -> None:
        """Give back a claim we hold (shutdown, transient failure)."""

    def record_event(
        self,
        sha1: str | None,
        source_filepath: str,
        state: State,
        reason: str,
        owner: Owner,
        identity: str | None = None,
    ) -> None:
        """Append one line to the file's history."""

    # what ``raw-transfer audit`` reads and repairs (ops/audit.py) -----------------------
    def audit_rows(self, after: str, limit: int, since: date | None = None) -> list[Row]:
        """Up to ``limit`` rows whose SHA1 sorts after ``after``, in SHA1 order: the audit
        pages through the whole table without holding it. With ``since``, done rows only
        of frames observed from that day on (or of no known day: upstream's rows)."""

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
        """Record an archive file that has no row, verified against its source
        (``facts``), as done and verified: a new row, or the row of the same content when
        it is neither done nor claimed by a live holder (judge_existing); a done event
        for the source. None when recorded, else why not."""

    def reopen_lost(self, sha1: str, filepath: str, source: str, owner: Owner, reason: str) -> bool:
        """A done row whose archive file is gone: set it back to released and record a
        retry for ``source``, so that the next backfill copies the file again. False when
        the row is no longer done at ``filepath``."""

    def release_stale(
        self,
        sha1: str,
        claimed_by: str,
        claimed_at: datetime | None,
        owner: Owner,
        reason: str,
    ) -> bool:
        """Release a claim judged stale (judge_existing) if it is still that very claim
        (same holder, same time); the release event is ``owner``'s. False otherwise."""

    def status(self, since: datetime, recent: int, in_flight: int) -> CatalogStatus:
        """Counts per state, up to ``in_flight`` claims, the oldest file waiting, the last
        done, what was done since ``since``, and the ``recent`` latest failed and
        quarantined rows: index range scans only (see ``raw-transfer status``)."""

    def history(self, key: str, paths: list[str]) -> History:
        """The events and rows of the file(s) ``key`` names (see ``resolve_history``)."""

    def close(self) -> None: ...
