"""A local or mounted directory as the destination (the embedded default).

Every path below the root is walked one component at a time with ``O_NOFOLLOW``
descriptors (``openat`` and friends), so nothing is ever read, written, linked or
removed through a symbolic link inside the archive tree, not even when one appears
between a check and the write. The root itself may be a link (a mount point made
elsewhere).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import stat
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import date
from fnmatch import fnmatchcase
from pathlib import Path, PurePosixPath

from rawtransfer import faults
from rawtransfer.destination.base import (
    CHUNK,
    DIR_MODE,
    FILE_MODE,
    SWEEP_DEPTH,
    TMP_SUFFIX,
    ArchiveEntry,
    Published,
    full_message,
    in_date_tree,
    is_temporary,
    temporaries_of,
)
from rawtransfer.errors import (
    DestinationConflict,
    DestinationLink,
    DestinationRefused,
    DestinationUnavailable,
    Interrupted,
    destination_error,
)
from rawtransfer.names import q

log = logging.getLogger(__name__)

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# a full disk or quota: the message says so, with the free space
_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def fsync_dir(path: Path) -> None:
    """Make a rename or link in ``path`` durable (the directory entry, not just the data)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalDestination:
    def __init__(self, root: Path, file_mode: int = FILE_MODE, dir_mode: int = DIR_MODE) -> None:
        self.root = root
        self.file_mode = file_mode
        self.dir_mode = dir_mode

    def check(self) -> None:
        # The root must exist already: creating it would write into an unmounted mount
        # point on the local disk and fill it.
        if not self.root.is_dir():
            raise DestinationUnavailable(f"{q(self.root)} is not an existing directory")
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise DestinationRefused(f"{q(self.root)} is not writable")

    def full_path(self, rel: PurePosixPath) -> str:
        return str(self.root / rel)

    # walking the tree without following links ------------------------------------------
    @contextlib.contextmanager
    def _dir(self, parts: tuple[str, ...], create: bool = False) -> Iterator[int]:
        """A descriptor of root/parts, opened component by component without following a
        link below the root; missing directories are made when ``create``."""
        # the root itself is followed (and never created): it may be a mount elsewhere
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            current = self.root
            for part in parts:
                current = current / part
                sub = self._step(fd, part, current, create)
                os.close(fd)
                fd = sub
            yield fd
        finally:
            os.close(fd)

    def _step(self, parent: int, name: str, path: Path, create: bool) -> int:
        """Open ``name`` in ``parent`` as a directory."""
        try:
            for _ in range(3):  # a race with another worker's mkdir, at worst
                try:
                    return os.open(name, _DIR_FLAGS, dir_fd=parent)
                except FileNotFoundError:
                    if not create:
                        raise
                with contextlib.suppress(FileExistsError):
                    # the mode is masked by the umask (the unit sets 0027); umask() itself
                    # is process-wide and must not be changed from a worker thread
                    os.mkdir(name, self.dir_mode, dir_fd=parent)
            return os.open(name, _DIR_FLAGS, dir_fd=parent)
        except OSError as exc:
            if exc.errno in (errno.ENOTDIR, errno.ELOOP) and _is_link(parent, name):
                raise DestinationLink(q(path)) from None
            if exc.errno == errno.ENOTDIR:
                raise DestinationUnavailable(f"{q(path)} exists and is not a directory") from None
            raise

    def _open_file(self, dirfd: int, name: str, path: Path) -> int:
        """Open an existing file for reading; a link is refused, not followed."""
        try:
            return os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd)
        except OSError as exc:
            if exc.errno == errno.ELOOP and _is_link(dirfd, name):
                raise DestinationLink(q(path)) from None
            raise

    def _sha1_at(self, dirfd: int, name: str, path: Path) -> str:
        fd = self._open_file(dirfd, name, path)
        with os.fdopen(fd, "rb") as fh:
            return hashlib.file_digest(fh, "sha1").hexdigest()

    # the protocol -----------------------------------------------------------------------
    def sha1(self, rel: PurePosixPath) -> str | None:
        path = self.root / rel
        try:
            with self._dir(rel.parts[:-1]) as dirfd:
                return self._sha1_at(dirfd, rel.name, path)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise destination_error(f"reading {q(path)}: {exc.strerror or exc}", exc) from None

    def _existing(self, dirfd: int, name: str, target: Path, sha1: str) -> Published:
        st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
        if stat.S_ISLNK(st.st_mode):
            raise DestinationLink(q(target))
        if not stat.S_ISREG(st.st_mode):
            raise DestinationConflict(f"{q(target)} exists and is not a regular file; not replaced")
        if self._sha1_at(dirfd, name, target) == sha1:
            return Published.PRESENT
        raise DestinationConflict(f"{q(target)} exists with different content; not overwritten")

    def publish(
        self, local: Path, rel: PurePosixPath, sha1: str, stop: threading.Event
    ) -> Published:
        target = self.root / rel
        name = rel.name
        try:
            # never create the root: it may be an unmounted mount point on the local disk
            self.check()
            with self._dir(rel.parts[:-1], create=True) as dirfd:
                if _lexists(dirfd, name):
                    return self._existing(dirfd, name, target, sha1)
                tmp = f".{name}.{uuid.uuid4().hex[:12]}{TMP_SUFFIX}"
                try:
                    try:
                        self._copy(local, dirfd, tmp, stop)
                    except OSError as exc:
                        if exc.errno not in _FULL_ERRNOS:
                            raise
                        # the free space as it is now, before the temporary is removed
                        raise DestinationUnavailable(
                            full_message(f"writing {q(target)}", exc, _free_bytes(dirfd))
                        ) from None
                    try:
                        # fails if the name exists, link or not: never clobbers
                        os.link(tmp, name, src_dir_fd=dirfd, dst_dir_fd=dirfd)
                    except FileExistsError:
                        return self._existing(dirfd, name, target, sha1)
                    except OSError as exc:
                        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EXDEV):
                            raise
                        # no hard links on this filesystem (some FUSE/SMB mounts): check,
                        # then rename; the window between the two is the best such a mount
                        # allows
                        if _lexists(dirfd, name):
                            return self._existing(dirfd, name, target, sha1)
                        os.rename(tmp, name, src_dir_fd=dirfd, dst_dir_fd=dirfd)
                finally:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(tmp, dir_fd=dirfd)
                os.fsync(dirfd)
            return Published.NEW
        except (DestinationConflict, DestinationLink, DestinationUnavailable, Interrupted):
            raise
        except OSError as exc:
            what = f"writing {q(target)}"
            if exc.errno in _FULL_ERRNOS:  # making a directory, say
                raise DestinationUnavailable(
                    full_message(what, exc, _free_bytes(self.root))
                ) from None
            # EACCES, EROFS: refused until a person acts; the rest passes by itself
            raise destination_error(f"{what}: {exc.strerror or exc}", exc) from None

    def _copy(self, src: Path, dirfd: int, tmp: str, stop: threading.Event) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(tmp, flags, self.file_mode, dir_fd=dirfd)
        with os.fdopen(fd, "wb") as out, open(src, "rb") as inp:
            while chunk := inp.read(CHUNK):
                if stop.is_set():
                    raise Interrupted(f"copy of {q(src)} abandoned at shutdown")
                out.write(chunk)
                faults.hit("during-copy")
            out.flush()
            os.fsync(out.fileno())
            os.fchmod(out.fileno(), self.file_mode)

    # temporary leftovers ------------------------------------------------------------------
    def discard_temporaries(self, rel: PurePosixPath) -> int:
        pattern = temporaries_of(rel.name)
        removed = 0
        try:
            with self._dir(tuple(rel.parent.parts)) as fd, os.scandir(fd) as entries:
                names = [
                    e.name
                    for e in entries
                    if fnmatchcase(e.name, pattern) and e.is_file(follow_symlinks=False)
                ]
                for name in names:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(name, dir_fd=fd)
                        removed += 1
        except FileNotFoundError:
            return 0
        except OSError as exc:
            raise destination_error(
                f"cleaning {q(self.root / rel.parent)}: {exc.strerror or exc}", exc
            ) from None
        return removed

    def sweep_temporaries(self, older_than: float, changed_within: float | None = None) -> int:
        """Remove temporary files (``.*.rt-tmp``) older than ``older_than`` seconds from
        the root and the year, month and day directories; with ``changed_within``, only
        from day directories modified that recently. Return how many were removed."""
        self.check()
        try:
            with self._dir(()) as rootfd:
                now = self._now(rootfd)
                since = None if changed_within is None else now - changed_within
                return self._sweep(rootfd, self.root, 0, now - older_than, since)
        except OSError as exc:
            raise destination_error(
                f"sweeping {q(self.root)}: {exc.strerror or exc}", exc
            ) from None

    def _now(self, dirfd: int) -> float:
        """The time as the destination's filesystem stamps it (an NFS server's clock may
        differ from ours): the mtime of a probe file made and removed at once."""
        probe = f".rt-clock.{uuid.uuid4().hex[:12]}{TMP_SUFFIX}"
        try:
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, dir_fd=dirfd)
        except OSError:
            return time.time()
        try:
            return os.fstat(fd).st_mtime
        finally:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(probe, dir_fd=dirfd)

    def _sweep(self, dirfd: int, path: Path, depth: int, cutoff: float, since: float | None) -> int:
        subdirs: list[str] = []
        candidates: list[str] = []
        # the names decide first (the directory entry's type costs no stat): a day
        # directory of thousands of frames costs one listing
        with os.scandir(dirfd) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    if depth < SWEEP_DEPTH:
                        subdirs.append(entry.name)
                elif is_temporary(entry.name):
                    candidates.append(entry.name)
        removed = 0
        for name in candidates:
            try:
                st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
                if not stat.S_ISREG(st.st_mode) or st.st_mtime >= cutoff:
                    continue
                os.unlink(name, dir_fd=dirfd)
            except FileNotFoundError:
                continue  # removed by its owner or another sweep meanwhile
            removed += 1
            log.debug("removed temporary file %s", q(path / name))
        for name in subdirs:
            try:
                sub = os.open(name, _DIR_FLAGS, dir_fd=dirfd)
            except OSError as exc:  # gone, replaced by a link, or not ours to read
                if exc.errno not in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                    log.warning("not sweeping %s: %s", q(path / name), exc.strerror)
                continue
            try:
                day = depth + 1 == SWEEP_DEPTH
                if day and since is not None and os.fstat(sub).st_mtime < since:
                    continue  # a day directory not changed lately
                removed += self._sweep(sub, path / name, depth + 1, cutoff, since)
            except OSError as exc:
                log.warning("not sweeping %s: %s", q(path / name), exc.strerror)
            finally:
                os.close(sub)
        return removed

    # the archive's listing (raw-transfer audit) -----------------------------------------
    def list_archive(self, since: date | None = None) -> Iterator[ArchiveEntry]:
        if not self.root.is_dir():
            raise DestinationUnavailable(f"{q(self.root)} is not an existing directory")
        try:
            with self._dir(()) as rootfd:
                yield from self._list(rootfd, (), since)
        except OSError as exc:
            raise destination_error(f"listing {q(self.root)}: {exc.strerror or exc}", exc) from None

    def _list(
        self, dirfd: int, parts: tuple[str, ...], since: date | None
    ) -> Iterator[ArchiveEntry]:
        try:
            with os.scandir(dirfd) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            where = q(self.root.joinpath(*parts))
            raise destination_error(f"listing {where}: {exc.strerror or exc}", exc) from None
        if len(parts) == 3:  # a day directory
            for e in entries:
                if not e.is_file(follow_symlinks=False):
                    continue
                try:
                    st = e.stat(follow_symlinks=False)  # fstatat on dirfd: no path walk
                except FileNotFoundError:
                    continue  # a temporary file gone meanwhile
                yield ArchiveEntry(PurePosixPath(*parts, e.name), st.st_size, st.st_mtime)
            return
        for e in entries:
            sub = (*parts, e.name)
            if not e.is_dir(follow_symlinks=False) or not in_date_tree(sub, since):
                continue
            try:
                fd = os.open(e.name, _DIR_FLAGS, dir_fd=dirfd)
            except OSError as exc:
                if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                    continue  # removed, or replaced by a link, since the listing
                where = q(self.root.joinpath(*sub))
                raise destination_error(f"listing {where}: {exc.strerror}", exc) from None
            try:
                yield from self._list(fd, sub, since)
            finally:
                os.close(fd)

    def file_done(self) -> None:
        pass

    def close(self) -> None:
        pass


def _free_bytes(where: int | Path) -> int | None:
    """Bytes free for us on the filesystem of a directory (descriptor or path)."""
    try:
        st = os.fstatvfs(where) if isinstance(where, int) else os.statvfs(where)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def _is_link(dirfd: int, name: str) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=dirfd, follow_symlinks=False).st_mode)
    except OSError:
        return False


def _lexists(dirfd: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=dirfd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True
