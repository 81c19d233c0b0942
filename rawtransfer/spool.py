"""The packing spool: local scratch space for ``.fz`` files, one directory per process.

Several processes may share a state directory (the service and a ``--backfill-only``
catch-up beside it). Each works in its own ``spool/HOST-PID`` directory and holds an
exclusive ``flock`` on a lock file inside it for as long as it lives; the kernel drops
the lock when the process dies, however it dies. At start a process removes only the
directories whose lock it can take, i.e. those of dead owners: never a live
neighbour's files.

A full spool is the host's problem, not the file's: packing that meets ENOSPC raises
SpoolUnavailable (the file waits, the queue pauses through the canary, an alert goes
out when it lasts), and ``check`` keeps failing until the space the failed file needed
is free again.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import shutil
import time
from pathlib import Path

from rawtransfer.destination.base import TMP_SUFFIX
from rawtransfer.errors import SpoolUnavailable
from rawtransfer.names import plural

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"
# Spool files of the layout before per-process directories (no lock tells whose they
# are): removed only once they are older than any honest packing can take.
LEGACY_MAX_AGE = 24 * 3600.0
# How much room a frame needs in the spool, as a multiple of its raw size: the packed
# file is smaller than the raw one, but a frame of noise can grow slightly when packed.
ROOM_FACTOR = 1.1


class Spool:
    def __init__(self, base: Path, name: str) -> None:
        self.base = base
        self.path = base / name
        self.need = 0  # bytes the last ENOSPC asked for; 0 when the spool is healthy
        base.mkdir(parents=True, exist_ok=True)
        self.clean_dead()
        self.path.mkdir(exist_ok=True)
        self._lock_fd = os.open(self.path / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)

    def clean_dead(self) -> int:
        """Remove the spool directories of processes that no longer hold their lock."""
        removed = 0
        for d in self.base.iterdir():
            if d.is_dir() and not d.is_symlink():
                try:
                    fd = os.open(d / LOCK_NAME, os.O_RDWR | os.O_CLOEXEC)
                except FileNotFoundError:
                    # no lock yet: a process between its mkdir and its flock, unless the
                    # directory is older than any start can take
                    if not _older_than(d, LEGACY_MAX_AGE):
                        continue
                    fd = -1
                try:
                    if fd >= 0:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # a live process's spool: not ours to touch
                finally:
                    if fd >= 0:
                        os.close(fd)
                n = sum(1 for p in d.iterdir() if p.name != LOCK_NAME)
                shutil.rmtree(d, ignore_errors=True)
                removed += n
            elif d.name.endswith(TMP_SUFFIX) and _older_than(d, LEGACY_MAX_AGE):
                d.unlink(missing_ok=True)
                removed += 1
        if removed:
            log.info(
                "removed %s of dead processes from %s",
                plural(removed, "stale temporary file"),
                self.base,
            )
        return removed

    def full(self, raw_size: int, exc: OSError) -> SpoolUnavailable:
        """Remember that a frame of ``raw_size`` bytes did not fit; the error to raise."""
        self.need = max(self.need, int(raw_size * ROOM_FACTOR))
        return SpoolUnavailable(f"{self.path}: {exc.strerror or exc} (spool full?)")

    def free(self) -> int:
        st = os.statvfs(self.path)
        return st.f_bavail * st.f_frsize

    def check(self) -> None:
        """Raise SpoolUnavailable while the room a failed frame needed is not free."""
        if not self.need:
            return
        try:
            free = self.free()
        except OSError as exc:
            raise SpoolUnavailable(f"{self.path}: {exc.strerror}") from None
        if free < self.need:
            raise SpoolUnavailable(
                f"{self.path}: {free} bytes free, a waiting frame needs {self.need} (spool full?)"
            )
        self.need = 0

    def close(self) -> None:
        if self._lock_fd >= 0:
            shutil.rmtree(self.path, ignore_errors=True)
            os.close(self._lock_fd)
            self._lock_fd = -1


def _older_than(path: Path, seconds: float) -> bool:
    try:
        return time.time() - path.lstat().st_mtime > seconds
    except FileNotFoundError:
        return False


def is_full(exc: OSError) -> bool:
    return exc.errno in (errno.ENOSPC, errno.EDQUOT)
