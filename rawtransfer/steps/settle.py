"""settle: decide whether a file is complete and may be processed.

A file is ready when it is a regular file (never a symlink) whose size and mtime have not
changed for ``patience`` seconds, or which was closed after writing or moved in, *and*
whose size is exactly what its FITS headers declare. The last test catches truncation
even when a frame carries no CHECKSUM cards.
"""

from __future__ import annotations

import math
import os
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from astropy.io import fits
from astropy.io.fits.verify import VerifyError
from astropy.utils.exceptions import AstropyUserWarning

from rawtransfer.errors import FileIncomplete, FileRejected

BLOCK = 2880
# A writer on another host (a network filesystem) may stamp mtimes a little ahead of our
# clock; such a file is waited for as usual. Further ahead than this, the clock moved.
CLOCK_SLACK = 60.0


# Files whose age the clock cannot tell (see settle): path -> (size, mtime_ns, first seen
# on the monotonic clock). Bounded: a path that vanished is forgotten at the next clear.
_ahead: dict[str, tuple[int, int, float]] = {}
_ahead_lock = threading.Lock()
MAX_WATCHED = 100_000


def _watched(path: Path, st: os.stat_result, patience: float) -> float:
    """Seconds still to wait before ``path`` counts as settled by watching it: two looks
    at least ``patience`` apart (monotonic clock) that see the same size and mtime."""
    if patience <= 0:
        return 0.0
    key, seen, now = str(path), (st.st_size, st.st_mtime_ns), time.monotonic()
    with _ahead_lock:
        first = _ahead.get(key)
        if first is None or first[:2] != seen:
            if len(_ahead) >= MAX_WATCHED:
                _ahead.clear()
            _ahead[key] = (*seen, now)
            return patience
        waited = now - first[2]
        if waited < patience:
            return patience - waited
        del _ahead[key]
        return 0.0


class FileVanished(Exception):
    """The file disappeared before it could be processed (renamed or removed)."""


class NotRegular(Exception):
    """The path is a symlink, a directory or a special file; it is never followed."""


@dataclass(frozen=True)
class Ready:
    size: int
    mtime: float
    mtime_ns: int = 0
    ino: int = 0


@dataclass(frozen=True)
class Wait:
    seconds: float


def _padded(n: int) -> int:
    return int(math.ceil(n / BLOCK) * BLOCK)


def data_size(header: fits.Header) -> int:
    """Bytes of the data unit an HDU header declares (FITS 4.0, section 4.4.1)."""
    naxis = int(header.get("NAXIS", 0))
    if naxis == 0:
        return 0
    bitpix = abs(int(header["BITPIX"]))
    axes = [int(header[f"NAXIS{i}"]) for i in range(1, naxis + 1)]
    if header.get("GROUPS") is True and axes[0] == 0:  # random groups
        axes = axes[1:]
    count = math.prod(axes)
    gcount = int(header.get("GCOUNT", 1))
    pcount = int(header.get("PCOUNT", 0))
    return bitpix // 8 * gcount * (pcount + count)


def fits_expected_size(path: Path) -> int:
    """Walk the HDU headers and return the file size they declare.

    Raises ``FileIncomplete`` when the file ends inside a header or data unit, and
    ``FileRejected`` when it is not FITS at all or has trailing bytes that are not an HDU.
    """
    size = os.stat(path).st_size
    pos = 0
    index = 0
    with open(path, "rb") as fh:
        while pos < size:
            fh.seek(pos)
            first = fh.read(80)
            if index == 0 and not first.startswith(b"SIMPLE  ="):
                raise FileRejected("not a FITS file (no SIMPLE card)")
            if index > 0 and not first.startswith(b"XTENSION="):
                if first.strip(b"\x00 ") == b"" and len(first) < 80:
                    raise FileIncomplete(f"ends inside HDU {index}")
                raise FileRejected(f"{size - pos} trailing bytes after HDU {index - 1}")
            fh.seek(pos)
            try:
                header = fits.Header.fromfile(fh, endcard=True, padding=True)
            except EOFError:
                raise FileIncomplete(f"truncated inside the header of HDU {index}") from None
            except (ValueError, OSError, AstropyUserWarning, VerifyError) as exc:
                # non-ASCII header bytes come as a warning, which check.py makes an error
                if fh.tell() >= size:
                    raise FileIncomplete(f"truncated inside the header of HDU {index}") from None
                raise FileRejected(f"unreadable header of HDU {index}: {exc}") from None
            header_end = fh.tell()
            if header_end > size or (header_end - pos) % BLOCK:
                raise FileIncomplete(f"truncated inside the header of HDU {index}")
            try:
                dsize = data_size(header)
            except (KeyError, ValueError, TypeError) as exc:
                raise FileRejected(f"HDU {index} has a malformed size card: {exc}") from None
            pos = header_end + _padded(dsize)
            index += 1
    if pos > size:
        raise FileIncomplete(f"truncated: headers declare {pos} bytes, file has {size}")
    return pos


def lstat_regular(path: Path) -> os.stat_result:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise FileVanished(str(path)) from None
    if not stat.S_ISREG(st.st_mode):
        raise NotRegular(str(path))
    return st


def settle(
    path: Path, patience: float, *, closed: bool = False, now: float | None = None
) -> Ready | Wait:
    """Ready when complete; Wait(seconds) while the file may still be written.

    ``closed`` says a close-after-write or move-in event was seen, so there is no need
    to wait for the mtime to age. Raises FileIncomplete when the FITS layout says
    bytes are missing, FileRejected when the file is empty or not FITS.
    """
    st = lstat_regular(path)
    t = time.time() if now is None else now
    age = t - st.st_mtime
    # An mtime far ahead of our clock (the clock was set back, or the file server's runs
    # ahead) says nothing about the file's age, and waiting for our clock to catch up
    # would hold it for as long as the clock is off: its stability is watched instead.
    if not closed and age < -CLOCK_SLACK:
        wait = _watched(path, st, patience)
        if wait > 0:
            return Wait(wait)
        closed = True
    if not closed and age < patience:
        return Wait(patience - age)
    if st.st_size == 0:
        raise FileIncomplete("empty file (zero bytes)")
    fits_expected_size(path)
    st2 = lstat_regular(path)
    if (st2.st_size, st2.st_mtime_ns) != (st.st_size, st.st_mtime_ns):
        return Wait(max(patience, 0.1))
    return Ready(size=st.st_size, mtime=st.st_mtime, mtime_ns=st.st_mtime_ns, ino=st.st_ino)
