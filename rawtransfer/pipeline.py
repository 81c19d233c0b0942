"""process_one: the steps for one file, in order, short enough to read at once.

    settle -> snapshot -> check -> place -> pack (raw SHA1 meanwhile, packed SHA1 as it streams)
    -> claim -> copy -> verify -> record

Every step reads one snapshot of the file (steps/snapshot.py), which is compared with
the path before the claim, after it and before the record. process_one never raises:
it returns an Outcome saying what happened and why, and records every outcome but an
outage (RETRY, after any claim is given back) in the catalog; errors are judged there
once, by their kind (errors.Kind).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from rawtransfer import faults
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
    DestinationConflict,
    FileFailed,
    FileIncomplete,
    FileRejected,
    InternalError,
    Interrupted,
    ResourceUnavailable,
    SourceUnreadable,
    VerifyError,
)
from rawtransfer.metrics import Recorder
from rawtransfer.names import cut, plural, q
from rawtransfer.outcome import Outcome, Result
from rawtransfer.spool import Spool, is_full
from rawtransfer.steps import check, hashing, metadata, pack, place, settle
from rawtransfer.steps.snapshot import Identity, Snapshot, current_identity

log = logging.getLogger(__name__)

# How long a claim protects a transfer before another worker may take it over. It must
# outlast the slowest honest transfer of one frame, with room to spare.
MIN_LEASE_SECONDS = 600.0
# In watcher mode a file whose FITS headers declare more bytes than it has is waited for
# (the writer may be slow); if it has not changed for this long it is truncated for good.
STALL_SECONDS = 600.0


@dataclass
class Context:
    """What every call of process_one shares; built once by the service."""

    settings: Settings
    catalog: Catalog
    destination: Destination
    spool: Spool
    stop: threading.Event
    owner: Owner = field(default_factory=Owner)
    burst: bool = False
    metrics: Recorder = field(default_factory=Recorder)
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


def _facts(path: Path, raw_sha1: str, snap: Snapshot, **kw: object) -> FileFacts:
    return FileFacts(
        source_filepath=str(path),
        raw_sha1=raw_sha1,
        raw_size=snap.size,
        file_created_at=utc_from_epoch(snap.identity.mtime_ns / 1e9),
        identity=str(snap.identity),
        **kw,  # type: ignore[arg-type]
    )


@dataclass
class Attempt:
    """What one attempt on one file has learnt so far (for recording its outcome)."""

    path: Path
    snap: Snapshot | None = None
    raw_sha1: str | None = None


def _changed(a: Attempt, when: str) -> Outcome | None:
    """CHANGED if the file is no longer the snapshot this attempt works from."""
    assert a.snap is not None
    why = a.snap.changed()
    if why is None:
        return None
    return Outcome(Result.CHANGED, a.path, reason=f"changed while it was processed ({why}, {when})")


def _record_failure(ctx: Context, a: Attempt, exc: FileRejected | FileFailed) -> Outcome:
    """Record a per-file failure with its reason; it is keyed by the raw SHA1 (there may
    be no packed file), or, for a file that cannot even be read, by the SHA1 of its path
    and identity. A file that changed meanwhile is looked at again instead."""
    if a.snap is not None and (changed := _changed(a, "then rejected")) is not None:
        return changed
    identity: str | None = None
    try:
        if a.snap is not None:
            identity = str(a.snap.identity)
            a.raw_sha1 = a.raw_sha1 or hashing.sha1_file(a.snap.view)
            size = a.snap.size
            mtime = a.snap.identity.mtime_ns / 1e9
        else:
            st = a.path.lstat()
            identity = str(Identity.of(st))
            size, mtime = st.st_size, st.st_mtime
    except FileNotFoundError:
        return Outcome(Result.SKIPPED, a.path, reason="vanished")
    except OSError:
        if a.snap is None:
            return Outcome(Result.SKIPPED, a.path, reason="vanished")
        size, mtime = a.snap.size, a.snap.identity.mtime_ns / 1e9
    label = f"{a.path}\0{identity}".encode(errors="replace")
    key = a.raw_sha1 or hashlib.sha1(label, usedforsecurity=False).hexdigest()
    facts = FileFacts(
        source_filepath=str(a.path),
        raw_sha1=a.raw_sha1 or "",
        raw_size=size,
        file_created_at=utc_from_epoch(mtime),
        identity=identity,
    )
    reason = cut(str(exc))
    ctx.catalog.mark_failed(key, facts, State(exc.state), reason, ctx.owner)
    result = Result.QUARANTINED if exc.state == State.QUARANTINED else Result.FAILED
    return Outcome(result, a.path, reason=reason, raw_size=size)


def process_one(path: Path, ctx: Context, *, closed: bool = False) -> Outcome:
    """Process one file; every outcome but a resource outage is recorded in the catalog.

    The one place where errors are judged (errors.classify): the file's fault ends
    quarantined, a fault of the environment that will not pass by itself ends failed,
    a resource that is away or a shutdown is RETRY, and anything else is a defect of
    ours: logged once with its traceback and recorded as failed, never retried in a loop.
    """
    a = Attempt(path)
    faults.working_on(path)
    try:
        return _process(a, ctx, closed)
    except (ResourceUnavailable, Interrupted) as exc:
        return Outcome(Result.RETRY, path, reason=str(exc))
    except FileNotFoundError:
        # renamed or removed before it was opened (the rename is queued as its own event)
        return Outcome(Result.SKIPPED, path, reason="vanished while it was processed")
    except (FileRejected, FileFailed) as exc:
        return _record_failure(ctx, a, exc)
    except PermissionError as exc:
        return _record_failure(ctx, a, SourceUnreadable(exc.strerror or str(exc)))
    except MemoryError:
        return _record_failure(ctx, a, InternalError("out of memory while processing this file"))
    except Exception as exc:
        log.exception("%s: internal error", q(path))
        detail = f"{type(exc).__name__}: {exc}"
        try:
            return _record_failure(ctx, a, InternalError(detail))
        except ResourceUnavailable as exc2:
            return Outcome(Result.RETRY, path, reason=str(exc2))
    finally:
        faults.working_on(None)
        if a.snap is not None:
            a.snap.close()


def _process(a: Attempt, ctx: Context, closed: bool) -> Outcome:
    s = ctx.settings
    path = a.path
    # one query per file: what (if anything) was recorded for this path, with the
    # identity the file had then
    handled = ctx.catalog.handled(str(path))
    if handled is not None:
        if handled.covers(current_identity(path)):
            return Outcome(Result.ALREADY_DONE, path)
        # not the file that was dealt with: a new file under an old name. It is never
        # skipped silently; if the archive holds other content under this name, the copy
        # fails with that reason and a person is told.
        log.info("%s is not the file handled on %s; looking at it", q(path), handled.at)

    # never taken, whatever the patterns: an empty file is not a frame (yet); when it is
    # written, its events queue it again
    try:
        if path.lstat().st_size == 0:
            return Outcome(Result.IGNORED, path, reason="empty (zero bytes)")
    except FileNotFoundError:
        return Outcome(Result.SKIPPED, path, reason="vanished before it could be read")

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
            raise
        return Outcome(Result.WAIT, path, reason=str(exc), delay=max(s.patience, 1.0))
    if isinstance(st, settle.Wait):
        return Outcome(Result.WAIT, path, reason="still being written", delay=st.seconds)
    try:
        a.snap = snap = Snapshot(path)
    except settle.FileVanished:
        return Outcome(Result.SKIPPED, path, reason="vanished before it could be read")
    except settle.NotRegular:
        return Outcome(Result.SKIPPED, path, reason="not a regular file (links are not followed)")
    if (snap.identity.ino, snap.size, snap.identity.mtime_ns) != (st.ino, st.size, st.mtime_ns):
        return Outcome(
            Result.WAIT, path, reason="changed as it settled", delay=max(s.patience, 0.1)
        )
    faults.hit("after-settle", path)

    # check and place, from the snapshot: a file that cannot be placed is not worth packing
    with ctx.metrics.step("check"):
        checked = check.check(snap.view, max_bytes=s.max_frame_bytes)
    day = place.header_date(checked.headers, s.header_card)
    rel = place.remote_relpath(day, path.name)
    faults.hit("after-check", path)

    spool = ctx.spool.path
    try:
        with ctx.metrics.step("pack"):
            if checked.packed:
                # already a .fz (check() decompressed every HDU): upload a private copy
                result = pack.copy_to_spool(snap.view, spool)
            else:
                result = pack.pack_hashed(
                    snap.view,
                    spool,
                    float_images=checked.float_images,
                    between=lambda: faults.hit("during-pack", path),
                    layout=checked.layout,
                )
    except OSError as exc:
        if is_full(exc):
            raise ctx.spool.full(snap.size, exc) from None
        raise
    # both hashes were taken while packing: the raw one while fpack read the same inode
    packed, sha1 = result.path, result.sha1
    a.raw_sha1 = raw_sha1 = result.raw_sha1
    try:
        facts = _facts(
            path,
            raw_sha1,
            snap,
            packed_size=packed.stat().st_size,
            obs_date=day,
            metadata=metadata.metadata_from_name(s.metadata_pattern, path.name),
        )
        return _transfer(a, ctx, sha1, facts, packed, rel)
    finally:
        packed.unlink(missing_ok=True)


def _transfer(
    a: Attempt, ctx: Context, sha1: str, facts: FileFacts, packed: Path, rel: PurePosixPath
) -> Outcome:
    path = a.path
    faults.hit("before-claim", path)
    if (changed := _changed(a, "before the claim")) is not None:
        return changed
    if not ctx.enter(sha1):
        return Outcome(Result.BUSY, path, reason="same content in flight here", delay=1.0)
    try:
        # a row the catalog refuses (a metadata value too large) raises FileFailed, which
        # process_one records against the raw SHA1
        claim = ctx.catalog.claim(sha1, facts, ctx.owner, ctx.lease_seconds)
        if claim.outcome == ClaimOutcome.DONE:
            # the same file, or the .fz that tidying left in place of that file
            if claim.source_filepath in (str(path), str(path)[: -len(".fz")]):
                # recorded, so that a file merely touched is not packed again at every scan
                reason = f"same content already at {claim.filepath}"
                ctx.catalog.record_event(
                    sha1, str(path), State.DONE, reason, ctx.owner, identity=facts.identity
                )
                return Outcome(Result.ALREADY_DONE, path, dest=claim.filepath or "")
            reason = f"same content as {claim.source_filepath}, already at {claim.filepath}"
            ctx.catalog.record_event(
                sha1, str(path), State.DUPLICATE, reason, ctx.owner, identity=facts.identity
            )
            return Outcome(Result.DUPLICATE, path, reason=reason, raw_size=facts.raw_size)
        if claim.outcome == ClaimOutcome.BUSY:
            return Outcome(Result.BUSY, path, reason="claimed by another worker", delay=5.0)
        if claim.taken_over_from:
            log.warning("%s: took over a claim of %s", q(path), claim.taken_over_from)
            # the copy of the previous holder (killed mid-copy) left its temporary file;
            # the claim is ours now, so nobody else writes to it
            if n := ctx.destination.discard_temporaries(rel):
                log.info(
                    "%s: removed %s of an abandoned copy", q(path), plural(n, "temporary file")
                )
        try:
            faults.hit("after-claim", path)
            if (changed := _changed(a, "after the claim")) is not None:
                _release_quietly(ctx, sha1, changed.reason)
                return changed
            with ctx.metrics.step("copy"):
                ctx.destination.publish(packed, rel, sha1, ctx.stop)
            faults.hit("after-publish", path)
            with ctx.metrics.step("verify"):
                remote = ctx.destination.sha1(rel)
            if remote != sha1:
                raise VerifyError(
                    f"{q(ctx.destination.full_path(rel))}: SHA1 at the destination is "
                    f"{remote}, expected {sha1}"
                )
            dest = ctx.destination.full_path(rel)
            # The archive now holds exactly this snapshot, verified, and the row describes
            # it (its SHA1, raw SHA1 and day): it is recorded even if the path changed
            # meanwhile, since abandoning it would leave a file with no row. A newer
            # version at the path has another identity and is looked at again.
            assert a.snap is not None  # set before anything is packed
            again = a.snap.changed()
            ctx.catalog.mark_done(sha1, dest, ctx.owner, identity=facts.identity)
        except FileFailed as exc:
            where = ctx.destination.full_path(rel) if isinstance(exc, DestinationConflict) else None
            ctx.catalog.mark_failed(sha1, facts, State.FAILED, cut(str(exc)), ctx.owner, where)
            return Outcome(Result.FAILED, path, reason=cut(str(exc)), raw_size=facts.raw_size)
        except (ResourceUnavailable, Interrupted) as exc:
            _release_quietly(ctx, sha1, str(exc))
            raise
        except BaseException as exc:
            _release_quietly(ctx, sha1, f"internal error: {type(exc).__name__}")
            raise
        faults.hit("after-record", path)
        return Outcome(
            Result.DONE,
            path,
            raw_size=facts.raw_size,
            packed_size=facts.packed_size or 0,
            dest=dest,
            sha1=sha1,
            reason=f"changed while it was recorded ({again}): looking at it again" if again else "",
            again=again is not None,
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
