"""One file, one snapshot: every step of one attempt reads the same bytes.

When a file has settled it is opened once, without following links, and its identity
(device, inode, size, mtime, ctime) is taken from the open descriptor. Every later step
reads through ``view``, a name of that descriptor (``/proc/self/fd/N``): opening it
gives a new, independent file position on the *same inode*, so a writer that replaces
the path by an atomic rename cannot change what this attempt reads, and astropy, fpack
and hashlib all take it like any path. A writer that rewrites the file in place changes
its mtime and ctime; ``changed()`` compares both the descriptor and the path with the
identity taken at settle, and the pipeline asks it before the claim, before publishing
and before recording, and whenever a step rejects the file.

"Already handled" is decided by this identity too, recorded with every terminal event:
never by comparing a file's mtime with the time of a record, which a copy that keeps an
old mtime (``cp -p``, ``rsync -t``) or a version renamed in during a copy defeats.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import stat
import uuid
from dataclasses import dataclass
from pathlib import Path

from rawtransfer.destination.local import fsync_dir
from rawtransfer.names import q
from rawtransfer.steps.settle import FileVanished, NotRegular

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Identity:
    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> Identity:
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    @classmethod
    def parse(cls, text: str | None) -> Identity | None:
        if not text:
            return None
        try:
            dev, ino, size, mtime, ctime = (int(x) for x in text.split(":"))
        except ValueError:
            return None
        return cls(dev, ino, size, mtime, ctime)

    def same_file_and_content(self, other: Identity) -> bool:
        """Equal but for the ctime (which a rename of the file itself moves on)."""
        return (self.dev, self.ino, self.size, self.mtime_ns) == (
            other.dev,
            other.ino,
            other.size,
            other.mtime_ns,
        )

    def __str__(self) -> str:
        return f"{self.dev}:{self.ino}:{self.size}:{self.mtime_ns}:{self.ctime_ns}"


# ``str(Identity)`` as a %-format: half the time of the f-string on five ints
IDENTITY_FORMAT = "%d:%d:%d:%d:%d"


def identity_text(st: os.stat_result) -> str:
    """``str(Identity.of(st))`` without the object: what a backfill pass compares with
    the catalog's record, 100,000 times."""
    return IDENTITY_FORMAT % (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def current_identity(path: Path) -> Identity | None:
    """The identity of the file now at ``path`` (not following links); None if absent."""
    try:
        return Identity.of(os.lstat(path))
    except FileNotFoundError:
        return None


class Snapshot:
    """An open descriptor on a settled file, and the identity it had when it was opened."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            # O_NONBLOCK: a FIFO swapped in after settle's lstat must not hang the worker
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except FileNotFoundError:
            raise FileVanished(str(path)) from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:  # O_NOFOLLOW met a symbolic link
                raise NotRegular(str(path)) from None
            raise
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise NotRegular(str(path))
        self.fd: int | None = fd
        self.identity = Identity.of(st)
        self.mode = st.st_mode

    @property
    def view(self) -> Path:
        """A path that reads this snapshot's inode, whatever happens to ``path``."""
        return Path(f"/proc/self/fd/{self.fd}")

    @property
    def size(self) -> int:
        return self.identity.size

    def changed(self) -> str | None:
        """Why the file is no longer what was opened, or None if it is unchanged."""
        assert self.fd is not None
        if Identity.of(os.fstat(self.fd)) != self.identity:
            return "rewritten in place"
        now = current_identity(self.path)
        if now is None:
            return "removed or renamed"
        if now != self.identity:
            return "replaced by another file" if now.ino != self.identity.ino else "modified"
        return None

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> Snapshot:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# A file renamed aside to be removed: ``.NAME.<12 hex>.rt-aside`` beside it.
ASIDE_SUFFIX = ".rt-aside"
_ASIDE_RE = re.compile(r"^\.(?P<name>.+)\.[0-9a-f]{12}" + re.escape(ASIDE_SUFFIX) + "$", re.DOTALL)


def recover_asides(root: Path) -> int:
    """Put back files left renamed aside by a process killed in remove_if_unchanged.

    The one put aside may be a newer version that arrived at the last moment: it goes
    back under its name (never over a file that is there now), and is judged again like
    any file. Returns how many were put back.
    """
    restored = 0
    for dirpath, _dirs, filenames in os.walk(root):
        for aside in filenames:
            m = _ASIDE_RE.match(aside)
            if m is None:
                continue
            src, dst = Path(dirpath, aside), Path(dirpath, m.group("name"))
            try:
                os.link(src, dst)  # never over a file there now
                src.unlink()
                restored += 1
                log.warning("put back %s, left aside by an interrupted removal", q(dst))
            except FileExistsError:
                log.error("%s and a file left aside as %s both exist: kept both", q(dst), q(src))
            except OSError as exc:
                log.error("cannot put back %s: %s", q(src), exc.strerror or exc)
    return restored


def remove_if_unchanged(path: Path, snap: Snapshot) -> bool:
    """Unlink ``path`` only if it is still the snapshot's file, unchanged.

    The file is first renamed to a hidden name in its directory (atomic, and no writer
    opens that name), then its identity is compared: checking and then unlinking the
    path itself would leave a moment in which a new version could be deleted.
    """
    if snap.changed() is not None:
        log.warning("not removing %s: it changed since it was verified", q(path))
        return False
    aside = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}{ASIDE_SUFFIX}")
    os.rename(path, aside)
    now = current_identity(aside)
    # the rename itself moves the ctime on: compare everything else
    if now is not None and now.same_file_and_content(snap.identity):
        aside.unlink()
        fsync_dir(path.parent)
        return True
    # another file arrived at the last moment: put it back, never over a newer one
    try:
        os.link(aside, path)
        aside.unlink()
    except FileExistsError:
        log.error(
            "not removing %s: it changed meanwhile; the other version is kept as %s",
            q(path),
            q(aside.name),
        )
    log.warning("not removing %s: it changed since it was verified", q(path))
    return False
