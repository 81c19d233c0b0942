"""The harness's own frames, made with rawtransfer.synth.

One realistic frame per size (sky, noise, stars, 16-bit with BZERO, CHECKSUM/DATASUM) is
drawn, and the others are that frame's pixels shifted along a row by a different amount
each, with their own FRAMENO: distinct content (no duplicates to skip), the same
statistics (the same work for fpack), and a night of 100 MB frames made in seconds
instead of minutes.
"""

from __future__ import annotations

import io
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from astropy.io import fits

from rawtransfer import synth

# Frames get this age: older than raw-transfer's --patience (the time a file must be
# left alone before it is taken), younger than the default --backfill-hours window.
AGE_SECONDS = 3600
# The observing date in the frames' headers; the archive's day directory follows it.
DATE_OBS = "2026-11-24T23:14:05.123"
DAY_DIR = "2026/11/24"


@dataclass(frozen=True)
class Size:
    key: str  # a short name used in the JSON keys: "100MB", "32MB", "100KB"
    label: str
    shape: tuple[int, int]  # (rows, columns), as numpy has it
    count: int

    @property
    def nbytes(self) -> int:
        return self.shape[0] * self.shape[1] * 2


def age(paths: list[Path], seconds: float = AGE_SECONDS) -> None:
    past = time.time() - seconds
    for p in paths:
        os.utime(p, (past, past))


def write_frames(directory: Path, size: Size, prefix: str = "f", seed: int = 1) -> list[Path]:
    """``size.count`` distinct frames of ``size.shape`` in ``directory``, aged."""
    directory.mkdir(parents=True, exist_ok=True)
    hdu = synth.raw_frame(size.shape, seed=seed, date_obs=DATE_OBS)
    base = hdu.data
    out = []
    for i in range(size.count):
        path = directory / f"{prefix}{i:05d}.fits"
        # a shift that no other frame of the set shares, so every frame's data differ
        hdu.data = np.roll(base, 37 * i + 1, axis=1)
        hdu.header["FRAMENO"] = (i, "benchmark frame number")
        fits.HDUList([hdu]).writeto(path, checksum=True)
        out.append(path)
    age(out)
    return out


def header_only_frame() -> bytes:
    """The smallest FITS file a camera might leave: one header block, no data."""
    hdu = fits.PrimaryHDU()
    hdu.header["DATE-OBS"] = DATE_OBS
    out = io.BytesIO()
    hdu.writeto(out)
    return out.getvalue()


def write_new(path: Path, body: bytes) -> None:
    """A new file with ``body`` (os.open/os.write: half the time of Path.write_bytes
    over 100,000 files)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.write(fd, body)
    finally:
        os.close(fd)


def small_tree(root: Path, count: int, per_dir: int = 1000) -> list[Path]:
    """``count`` header-only ``*.fits`` files (2880 bytes) in directories of ``per_dir``:
    what a scan of the source looks at (names, types, sizes, times), with no data to
    pack; aged. Not empty: a scan passes over empty files before the catalog is asked."""
    block = header_only_frame()
    out = []
    for i in range(count):
        d = root / f"d{i // per_dir:04d}"
        if i % per_dir == 0:
            d.mkdir(parents=True, exist_ok=True)
        p = d / f"t1_r{i:07d}_ut1.fits"
        write_new(p, block)
        out.append(p)
    age(out)
    return out
