"""The Destination protocol: where packed files are published and verified.

Publishing is atomic and never clobbers: the bytes go to a temporary name in the target
directory, are flushed, then linked to the final name, which fails if that name exists.
An existing file with the same content counts as done (doing a finished file again is a
success); a different one is a conflict and is never overwritten.

Nothing is read or written through a symbolic link below the root: a year, month or day
directory, or a final name, that is a link fails the file with ``DestinationLink``. The
root itself may be a link (a mount made elsewhere).
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Iterator
from datetime import date
from enum import StrEnum
from fnmatch import fnmatchcase
from glob import escape as glob_escape
from pathlib import Path, PurePosixPath
from typing import NamedTuple, Protocol

from rawtransfer.errors import ResourceUnavailable

log = logging.getLogger(__name__)

# Temporary names at the destination: hidden, and unlike any FITS pattern.
TMP_SUFFIX = ".rt-tmp"
TMP_PATTERN = f".*{TMP_SUFFIX}"
# Temporaries are made in the day directories (root/YYYY/MM/DD) and, for a moment, in the
# root itself (probes): a sweep looks no deeper than that.
SWEEP_DEPTH = 3
# Chunk size for local copies and for checking the stop event between chunks.
CHUNK = 1 << 20
FILE_MODE = 0o640
DIR_MODE = 0o750


def full_message(what: str, exc: OSError, free: int | None) -> str:
    """``writing X: No space left on device (destination full? N bytes free)``."""
    space = "free space unknown" if free is None else f"{free} bytes free"
    return f"{what}: {exc.strerror or exc} (destination full? {space})"


def temporaries_of(name: str) -> str:
    """The glob of the temporary names of copies to the final name ``name``."""
    return f".{glob_escape(name)}.*{TMP_SUFFIX}"


def is_temporary(name: str) -> bool:
    """True for the names of our temporary files (``.NAME.<hex>.rt-tmp``, probes)."""
    return fnmatchcase(name, TMP_PATTERN)


class ArchiveEntry(NamedTuple):
    """A regular file in a day directory of the archive, as its directory's listing shows it."""

    rel: PurePosixPath  # YYYY/MM/DD/NAME
    size: int
    mtime: float  # by the destination's clock


_DATE_PART = re.compile(r"^[0-9]{2}$")


def in_date_tree(parts: tuple[str, ...], since: date | None = None) -> bool:
    """Whether ``root/YYYY[/MM[/DD]]`` is a year, month or day directory of the archive
    that may hold days from ``since`` on (any other directory is not the archive's)."""
    if not 1 <= len(parts) <= 3 or not re.fullmatch(r"[0-9]{4}", parts[0]):
        return False
    if not all(_DATE_PART.match(p) for p in parts[1:]):
        return False
    ymd = tuple(int(p) for p in parts)
    try:
        date(*ymd, *(1,) * (3 - len(ymd)))
    except ValueError:  # month 13, day 31 of a short month
        return False
    return since is None or ymd >= (since.year, since.month, since.day)[: len(ymd)]


class Published(StrEnum):
    NEW = "published"
    PRESENT = "already present"


class Destination(Protocol):
    """Implemented by the local-directory and SFTP destinations."""

    def check(self) -> None:
        """Raise DestinationUnavailable unless the archive root is reachable and writable."""

    def publish(
        self, local: Path, rel: PurePosixPath, sha1: str, stop: threading.Event
    ) -> Published:
        """Put ``local`` at ``rel`` under the root, atomically, without clobbering."""

    def sha1(self, rel: PurePosixPath) -> str | None:
        """SHA1 of the file at ``rel`` computed at the destination; None if absent."""

    def sweep_temporaries(self, older_than: float, changed_within: float | None = None) -> int:
        """Remove temporary files (``.*.rt-tmp``, regular files only) whose mtime is more
        than ``older_than`` seconds old (by the destination's clock), from the root and
        the directories below it down to the day directories, never following a link;
        return how many were removed.

        With ``changed_within`` (seconds), only day directories modified that recently
        are looked into: making a temporary file changes its directory's mtime, so a
        periodic sweep finds new leftovers without listing the whole archive."""

    def full_path(self, rel: PurePosixPath) -> str:
        """The path recorded in the catalog's ``filepath`` column."""

    def discard_temporaries(self, rel: PurePosixPath) -> int:
        """Remove the temporary files of copies to ``rel`` (``.NAME.*.rt-tmp`` in its
        directory), whatever their age: called by the holder of the claim on that file,
        after taking it over from a dead or stale owner, so no live copy writes them."""

    def list_archive(self, since: date | None = None) -> Iterator[ArchiveEntry]:
        """Every regular file (temporaries included) in the day directories (root/YYYY/MM/DD)
        of days from ``since`` on, one listing per directory, in order; links are never
        followed and other directories are not the archive's. Raises DestinationUnavailable
        (or DestinationRefused) when the root or a directory of the tree cannot be read:
        an audit must not take an unreadable day for an empty one."""

    def file_done(self) -> None:
        """The calling worker thread is finished with one file (connection reuse policy)."""

    def close(self) -> None: ...


def sweep_leftovers(
    destination: Destination, older_than: float, changed_within: float | None = None
) -> int:
    """Sweep temporary files older than ``older_than`` (the lease: no copy in progress
    anywhere is that old without a write) and log how many went. A sweep that fails is
    logged and does not stop the caller: transfers do not depend on it."""
    started = time.monotonic()
    try:
        n = destination.sweep_temporaries(older_than, changed_within)
    except ResourceUnavailable as exc:
        log.warning("temporary files not swept: %s", exc)
        return 0
    # a periodic sweep that finds nothing says so only in debug logs
    log.log(
        logging.INFO if n else logging.DEBUG,
        "removed %d temporary file%s older than %.0f s left at the destination by "
        "interrupted copies (looked for in %.1f s)",
        n,
        "" if n == 1 else "s",
        older_than,
        time.monotonic() - started,
    )
    return n
