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
import socket
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from enum import StrEnum
from typing import Protocol


class State(StrEnum):
    CLAIMED = "claimed"
    DONE = "done"
    FAILED = "failed"
    QUARANTINED = "quarantined"
    DUPLICATE = "duplicate"  # recorded as an event for the second source path
    RELEASED = "released"  # a claim given back (shutdown, resource away)
    RETRY = "retry"  # event only: a transient failure, or an operator asked for a retry
    CHANGED = "changed"  # event only: the file changed while it was processed


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

# Outcomes after which a source file needs nothing more.
TERMINAL = frozenset({State.DONE, State.FAILED, State.QUARANTINED, State.DUPLICATE})


def utcnow() -> datetime:
    """Naive UTC, matching upstream's ``timestamp without time zone`` columns."""
    return datetime.now(UTC).replace(tzinfo=None)


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
class Handled:
    """The last terminal record of a source path: when, in which state, and the identity
    (device:inode:size:mtime:ctime) the file had then."""

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


def merge_handled(
    events: list[tuple[str, datetime, str, str | None]], done_rows: list[tuple[str, datetime]]
) -> dict[str, Handled]:
    """Paths handled, from each path's latest event (path, at, state, identity) and, for
    paths with no event at all (upstream rows), their done rows (path, time)."""
    out: dict[str, Handled] = {}
    for src, at, state, identity in events:
        if state in TERMINAL:
            out[src] = Handled(at, state, identity)
    seen = {e[0] for e in events}
    for src, at in done_rows:
        if src not in seen and (src not in out or out[src].at < at):
            out[src] = Handled(at, State.DONE, None)
    return out


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

    def source_state(self, source_filepath: str) -> State | None:
        """The latest recorded outcome for this source path, if any."""

    def handled(self, source_filepath: str) -> Handled | None:
        """The path's latest record if that is terminal (done, duplicate, failed,
        quarantined); None if it was never handled or something is pending (a claim, a
        change, a retry asked for). A file whose identity differs from the record's is a
        new file under an old name, and is looked at again rather than skipped.
        """

    def handled_sources(self, since: datetime) -> dict[str, Handled]:
        """Source paths recorded since ``since`` that need nothing more (one query; see
        handled)."""

    def verified_sources(self, since: datetime) -> dict[str, str]:
        """Source path -> packed SHA1 of rows done *and verified* since ``since``.

        Only these originals may ever be replaced locally (rows an upstream deployment
        left have no verification time and are never tidied).
        """

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

    def close(self) -> None: ...
