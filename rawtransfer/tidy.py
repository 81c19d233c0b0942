"""tidy: replace a local original by its packed version, only when that is safe.

Safe means: the catalog row for the original is ``done`` with a verification time (the
copy at the destination was verified), and the ``.fz`` written locally is byte-identical
to the verified one. fpack -C is deterministic, so the original is packed again and its
SHA1 compared with the catalog's before anything is replaced. The ``.fz`` is published
beside the original by LocalDestination (temporary name, fsync, no-clobber link), read
back once more, and only then is the original removed. Anything unexpected leaves both files alone.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path, PurePosixPath

from rawtransfer.catalog.base import Catalog, Owner, State, utc_from_epoch
from rawtransfer.destination.local import LocalDestination
from rawtransfer.errors import (
    DestinationConflict,
    DestinationUnavailable,
    FileFailed,
    FileRejected,
)
from rawtransfer.names import plural, q
from rawtransfer.steps import check, pack, place
from rawtransfer.steps.settle import FileVanished, NotRegular
from rawtransfer.steps.snapshot import Snapshot, remove_if_unchanged
from rawtransfer.watch import Matcher, scan

log = logging.getLogger(__name__)


def tidy_one(path: Path, sha1: str, spool: Path, catalog: Catalog, owner: Owner) -> bool:
    """Replace ``path`` by ``path.fz`` if that equals the verified copy; True if done.

    Everything is read from one snapshot of the original, and the original is removed
    only if the path still names that very file: a version written meanwhile (a
    rename over it, a rewrite in place) is never deleted.
    """
    if path.name.endswith(".fz"):
        return False
    rel = PurePosixPath(place.packed_name(path.name))
    target = path.with_name(rel.name)
    try:
        snap = Snapshot(path)
    except (FileVanished, NotRegular):
        return False
    with snap:
        try:
            checked = check.check(snap.view)
            result = pack.pack_hashed(
                snap.view, spool, float_images=checked.float_images, layout=checked.layout
            )
            packed = result.path
        except (FileRejected, FileFailed) as exc:
            log.error("not tidying %s: %s", q(path), exc)
            return False
        try:
            if result.sha1 != sha1:
                log.error("not tidying %s: packing again does not give the verified copy", q(path))
                return False
            # the same atomic, no-clobber publish as an archive copy, beside the original
            # and with its permissions; a foreign file under the .fz name is a conflict
            beside = LocalDestination(path.parent, file_mode=snap.mode & 0o777)
            beside.publish(packed, rel, sha1, threading.Event())
            if beside.sha1(rel) != sha1:
                log.error("not tidying %s: the local .fz does not read back right", q(path))
                return False
            if not remove_if_unchanged(path, snap):
                return False
        except (DestinationConflict, DestinationUnavailable) as exc:
            log.error("not tidying %s: %s", q(path), exc)
            return False
        finally:
            packed.unlink(missing_ok=True)
    catalog.record_event(sha1, str(path), State.DONE, f"original replaced by {target.name}", owner)
    log.info("tidied %s -> %s", q(path), q(target.name))
    return True


class Tidy:
    """The periodic pass (--overwrite-unpacked-*): originals in the window whose rows
    are done and verified, older than the recency window, are replaced by their .fz."""

    def __init__(
        self,
        root: Path,
        matcher: Matcher,
        catalog: Catalog,
        spool: Path,
        owner: Owner,
        hours: float,
        recency_window: float,
    ) -> None:
        self.root, self.matcher, self.catalog = root, matcher, catalog
        self.spool, self.owner = spool, owner
        self.hours, self.recency_window = hours, recency_window

    def __call__(self) -> int:
        now = time.time()
        since = now - self.hours * 3600
        verified = self.catalog.verified_sources(utc_from_epoch(since))
        n = 0
        for path, st in scan(self.root, self.matcher, since):
            sha1 = verified.get(str(path))
            if sha1 is None or st.st_mtime > now - self.recency_window:
                continue
            try:
                n += tidy_one(path, sha1, self.spool, self.catalog, self.owner)
            except OSError as exc:  # one file's trouble must not end the pass
                log.error("not tidying %s: %s", q(path), exc)
        if n:
            log.info(
                "tidy: replaced %s by %s",
                plural(n, "original"),
                "its packed version" if n == 1 else "their packed versions",
            )
        return n
