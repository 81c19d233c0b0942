"""A local or mounted directory as the destination (the embedded default)."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import threading
import uuid
from pathlib import Path, PurePosixPath

from rawtransfer.destination.base import CHUNK, DIR_MODE, FILE_MODE, TMP_SUFFIX, Published
from rawtransfer.errors import DestinationConflict, DestinationUnavailable, Interrupted
from rawtransfer.names import q

log = logging.getLogger(__name__)


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
            raise DestinationUnavailable(f"{q(self.root)} is not writable")

    def full_path(self, rel: PurePosixPath) -> str:
        return str(self.root / rel)

    def _sha1_of(self, path: Path) -> str:
        with open(path, "rb") as fh:
            return hashlib.file_digest(fh, "sha1").hexdigest()

    def sha1(self, rel: PurePosixPath) -> str | None:
        try:
            return self._sha1_of(self.root / rel)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise DestinationUnavailable(f"reading {q(self.root / rel)}: {exc.strerror}") from None

    def _existing(self, target: Path, sha1: str) -> Published:
        if self._sha1_of(target) == sha1:
            return Published.PRESENT
        raise DestinationConflict(f"{q(target)} exists with different content; not overwritten")

    def publish(
        self, local: Path, rel: PurePosixPath, sha1: str, stop: threading.Event
    ) -> Published:
        target = self.root / rel
        try:
            # never create the root: it may be an unmounted mount point on the local disk
            self.check()
            if os.path.lexists(target):
                return self._existing(target, sha1)
            self._makedirs(target.parent)
            tmp = target.parent / f".{target.name}.{uuid.uuid4().hex[:12]}{TMP_SUFFIX}"
            try:
                self._copy(local, tmp, stop)
                try:
                    os.link(tmp, target)  # fails if target exists: never clobbers
                except FileExistsError:
                    return self._existing(target, sha1)
                except OSError as exc:
                    if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EXDEV):
                        raise
                    # no hard links on this filesystem (some FUSE/SMB mounts): check, then
                    # rename; the window between the two is the best such a mount allows
                    if os.path.lexists(target):
                        return self._existing(target, sha1)
                    os.rename(tmp, target)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
            fsync_dir(target.parent)
            return Published.NEW
        except (DestinationConflict, Interrupted):
            raise
        except OSError as exc:
            raise DestinationUnavailable(f"writing {q(target)}: {exc.strerror or exc}") from None

    def _makedirs(self, path: Path) -> None:
        if path.is_dir():
            return
        # exist_ok: two workers creating the same day directory at once is not an error.
        # The mode is masked by the umask (the unit sets 0027); umask() itself is
        # process-wide and must not be changed from a worker thread.
        path.mkdir(mode=self.dir_mode, parents=True, exist_ok=True)

    def _copy(self, src: Path, tmp: Path, stop: threading.Event) -> None:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, self.file_mode)
        with os.fdopen(fd, "wb") as out, open(src, "rb") as inp:
            while chunk := inp.read(CHUNK):
                if stop.is_set():
                    raise Interrupted(f"copy of {q(src)} abandoned at shutdown")
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, self.file_mode)

    def file_done(self) -> None:
        pass

    def close(self) -> None:
        pass
