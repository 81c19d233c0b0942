"""process_one: the steps for one file, in order, short enough to read at once.

    settle -> check -> place -> hash raw -> pack -> hash packed -> claim -> copy -> verify
    -> record -> tidy (spool)

The function never raises for a problem with the file: it returns an Outcome saying what
happened and why. ResourceUnavailable (destination or catalog away) also becomes an
Outcome (RETRY) after any claim is given back, so the worker puts the file back on the
queue. Only programming errors escape.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path, PurePosixPath

from rawtransfer.catalog.base import (
    Catalog,
    ClaimOutcome,
    FileFacts,
    Owner,
    State,
    utc_from_epoch,
)
from rawtransfer.config import Settings
from rawtransfer.destination.base import Destination
from rawtransfer.errors import (
    FileFailed,
    FileIncomplete,
    FileRejected,
    Interrupted,
    ResourceUnavailable,
    VerifyError,
)
from rawtransfer.names import q
from rawtransfer.steps import check, hashing, metadata, pack, place, settle

log = logging.getLogger(__name__)

# How long a claim protects a transfer before another worker may take it over. It must
# outlast the slowest honest transfer of one frame, with room to spare.
MIN_LEASE_SECONDS = 600.0
# In watcher mode a file whose FITS headers declare more bytes than it has is waited for
# (the writer may be slow); if it has not changed for this long it is truncated for good.
STALL_SECONDS = 600.0


class Result(StrEnum):
    DONE = "done"
    ALREADY_DONE = "already done"
    DUPLICATE = "duplicate"
    QUARANTINED = "quarantined"
    FAILED = "failed"
    SKIPPED = "skipped"  # not a regular file, or vanished: nothing to do
    WAIT = "wait"  # still being written: look again after ``delay``
    BUSY = "busy"  # the same content is in flight elsewhere: look again later
    RETRY = "retry"  # a resource is away: back on the queue


@dataclass(frozen=True)
class Outcome:
    result: Result
    path: Path
    reason: str = ""
    delay: float = 0.0
    raw_size: int = 0
    packed_size: int = 0
    dest: str = ""
    sha1: str = ""


@dataclass
class Context:
    """What every call of process_one shares; built once by the service."""

    settings: Settings
    catalog: Catalog
    destination: Destination
    spool: Path
    stop: threading.Event
    owner: Owner = field(default_factory=Owner)
    burst: bool = False
    _inflight: set[str] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def lease_seconds(self) -> float:
        return max(MIN_LEASE_SECONDS, 4 * self.settings.copy_timeout)

    def enter(self, sha1: str) -> bool:
        with self._lock:
            if sha1 in self._inflight:
                return False
            self._inflight.add(sha1)
            return True

    def leave(self, sha1: str) -> None:
        with self._lock:
            self._inflight.discard(sha1)


def _facts(path: Path, raw_sha1: str, st: settle.Ready, **kw: object) -> FileFacts:
    created = utc_from_epoch(st.mtime)
    return FileFacts(
        source_filepath=str(path),
        raw_sha1=raw_sha1,
        raw_size=st.size,
        file_created_at=created,
        **kw,  # type: ignore[arg-type]
    )


def _reject(
    ctx: Context,
    path: Path,
    st: settle.Ready | None,
    exc: FileRejected | FileFailed,
    raw_sha1: str | None = None,
) -> Outcome:
    """Record a permanent per-file failure, keyed by the raw SHA1 (there is no packed file)."""
    try:
        raw_sha1 = raw_sha1 or hashing.sha1_file(path)
        ready = st or settle.Ready(size=path.stat().st_size, mtime=path.stat().st_mtime)
    except OSError:
        return Outcome(Result.SKIPPED, path, reason="vanished")
    facts = _facts(path, raw_sha1, ready)
    ctx.catalog.mark_failed(raw_sha1, facts, State(exc.state), str(exc), ctx.owner)
    result = Result.QUARANTINED if exc.state == State.QUARANTINED else Result.FAILED
    return Outcome(result, path, reason=str(exc), raw_size=ready.size)


def process_one(path: Path, ctx: Context, *, closed: bool = False) -> Outcome:
    try:
        return _process(path, ctx, closed)
    except ResourceUnavailable as exc:
        return Outcome(Result.RETRY, path, reason=str(exc))
    except Interrupted as exc:
        return Outcome(Result.RETRY, path, reason=str(exc))
    except FileNotFoundError:
        # renamed or removed between steps (the rename is queued as its own event)
        return Outcome(Result.SKIPPED, path, reason="vanished while it was processed")


def _process(path: Path, ctx: Context, closed: bool) -> Outcome:
    s = ctx.settings
    # one query per file: when (if ever) this path reached a terminal state
    handled = ctx.catalog.handled_at(str(path))
    if handled is not None:
        mtime = utc_from_epoch(path.lstat().st_mtime)
        if mtime <= handled:
            return Outcome(Result.ALREADY_DONE, path)
        # written again after it was dealt with: a new file under an old name. It is
        # never skipped silently; if the archive holds other content under this name,
        # the copy fails with that reason and a person is told.
        log.warning("%s changed after it was handled on %s; looking at it again", q(path), handled)

    # settle
    try:
        st = settle.settle(path, s.patience, closed=closed)
    except settle.FileVanished:
        return Outcome(Result.SKIPPED, path, reason="vanished before it could be read")
    except settle.NotRegular:
        return Outcome(Result.SKIPPED, path, reason="not a regular file (links are not followed)")
    except FileIncomplete as exc:
        age = time.time() - path.lstat().st_mtime
        if ctx.burst or age >= max(STALL_SECONDS, s.patience):
            return _reject(ctx, path, None, exc)
        return Outcome(Result.WAIT, path, reason=str(exc), delay=max(s.patience, 1.0))
    except FileRejected as exc:
        return _reject(ctx, path, None, exc)
    if isinstance(st, settle.Wait):
        return Outcome(Result.WAIT, path, reason="still being written", delay=st.seconds)

    # check and place: a file that cannot be placed is not worth packing
    try:
        checked = check.check(path)
        day = place.header_date(checked.headers, s.header_card)
        rel = place.remote_relpath(day, path.name)
    except FileRejected as exc:
        return _reject(ctx, path, st, exc)

    raw_sha1 = hashing.sha1_file(path)
    if checked.packed:
        packed = path  # already a .fz; check() decompressed every HDU successfully
    else:
        try:
            packed = pack.pack(path, ctx.spool, float_images=checked.float_images)
        except FileFailed as exc:
            return _reject(ctx, path, st, exc, raw_sha1)
    try:
        sha1 = hashing.sha1_file(packed)
        facts = _facts(
            path,
            raw_sha1,
            st,
            packed_size=packed.stat().st_size,
            obs_date=day,
            metadata=metadata.metadata_from_name(s.metadata_pattern, path.name),
        )
        return _transfer(path, ctx, sha1, facts, packed, rel)
    finally:
        if packed != path:
            packed.unlink(missing_ok=True)


def _transfer(
    path: Path, ctx: Context, sha1: str, facts: FileFacts, packed: Path, rel: PurePosixPath
) -> Outcome:
    if not ctx.enter(sha1):
        return Outcome(Result.BUSY, path, reason="same content in flight here", delay=1.0)
    try:
        try:
            claim = ctx.catalog.claim(sha1, facts, ctx.owner, ctx.lease_seconds)
        except FileFailed as exc:  # the row itself is refused (a metadata value too large)
            ctx.catalog.mark_failed(facts.raw_sha1, facts, State.FAILED, str(exc), ctx.owner)
            return Outcome(Result.FAILED, path, reason=str(exc), raw_size=facts.raw_size)
        if claim.outcome == ClaimOutcome.DONE:
            # the same file, or the .fz that tidying left in place of that file
            if claim.source_filepath in (str(path), str(path)[: -len(".fz")]):
                # recorded, so that a file merely touched is not packed again at every scan
                reason = f"same content already at {claim.filepath}"
                ctx.catalog.record_event(sha1, str(path), State.DONE, reason, ctx.owner)
                return Outcome(Result.ALREADY_DONE, path, dest=claim.filepath or "")
            reason = f"same content as {claim.source_filepath}, already at {claim.filepath}"
            ctx.catalog.record_event(sha1, str(path), State.DUPLICATE, reason, ctx.owner)
            return Outcome(Result.DUPLICATE, path, reason=reason, raw_size=facts.raw_size)
        if claim.outcome == ClaimOutcome.FAILED:
            reason = f"this content failed before (as {claim.source_filepath})"
            ctx.catalog.record_event(sha1, str(path), State.FAILED, reason, ctx.owner)
            return Outcome(Result.FAILED, path, reason=reason)
        if claim.outcome == ClaimOutcome.BUSY:
            return Outcome(Result.BUSY, path, reason="claimed by another worker", delay=5.0)
        if claim.taken_over_from:
            log.warning("%s: took over a stale claim of %s", q(path), claim.taken_over_from)
        try:
            ctx.destination.publish(packed, rel, sha1, ctx.stop)
            remote = ctx.destination.sha1(rel)
            if remote != sha1:
                raise VerifyError(
                    f"{ctx.destination.full_path(rel)}: SHA1 at the destination is {remote}, "
                    f"expected {sha1}"
                )
            dest = ctx.destination.full_path(rel)
            ctx.catalog.mark_done(sha1, dest, ctx.owner)
        except FileFailed as exc:
            ctx.catalog.mark_failed(sha1, facts, State.FAILED, str(exc), ctx.owner)
            return Outcome(Result.FAILED, path, reason=str(exc), raw_size=facts.raw_size)
        except (ResourceUnavailable, Interrupted) as exc:
            _release_quietly(ctx, sha1, str(exc))
            raise
        except BaseException:
            _release_quietly(ctx, sha1, "internal error")
            raise
        return Outcome(
            Result.DONE,
            path,
            raw_size=facts.raw_size,
            packed_size=facts.packed_size or 0,
            dest=dest,
            sha1=sha1,
        )
    finally:
        ctx.leave(sha1)
        ctx.destination.file_done()


def _release_quietly(ctx: Context, sha1: str, reason: str) -> None:
    """Give the claim back if the catalog lets us; if not, the lease will expire."""
    try:
        ctx.catalog.release(sha1, ctx.owner, reason)
    except ResourceUnavailable as exc:
        log.warning("could not release claim on %s (%s); it will be reclaimed", sha1, exc)
